//! `walsync backfill`: re-copies one table (or a slice of it) while the pipeline keeps running.
//!
//! The copy reads the table under the exported snapshot of a fresh temporary slot, whose
//! consistent point is `cp`, and produces its rows as `op: "r"` events at version `cp − 1` to
//! the table's topic (design notes §2): every streamed change committed at or after `cp` wins
//! over them, in whatever order the two reach the index, so the stream never pauses.
//!
//! Before its temporary slot exists, the backfill registers with the source streaming the
//! slot (`crate::postgres::copy_registry`), which then marks the table's deletes for soft
//! tombstones until the backfill's rows are all in Kafka (design invariant 5): a row deleted
//! during the copy cannot come back, however late its copied row reaches the index.
//!
//! - **In place** (no `--into`): the running sink applies the rows to the table's alias. The
//!   backfill then waits until everything committed before its copy ended is in the index: the
//!   source confirmed a WAL position read after the copy (so it is in Kafka), and the sink's
//!   group committed offsets past the topic's high watermarks read after that. A full-table
//!   backfill then deletes the documents whose stored commit LSN is below `cp − 1`: their rows
//!   were not in the snapshot, so they were deleted while nobody was watching.
//! - **Into a new index** (`--into <index>`): a second sink (its own consumer group, starting at
//!   the topic's high watermarks read *before* the temporary slot was created, so it sees every
//!   event committing at or after `cp` and every snapshot row) writes the table into the new
//!   index, while the main sink keeps writing to the alias. Once the second sink has caught up,
//!   one `_aliases` request moves the alias; the second sink keeps going until it has passed the
//!   topic's end as of the swap, which covers every event the main sink may have written to the
//!   old index before the swap (docs/design.md, "Online backfill").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use elasticsearch::Elasticsearch;
use elasticsearch::http::Method;
use elasticsearch::http::headers::HeaderMap;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::{Config, KafkaConfig};
use crate::event::SourceInfo;
use crate::kafka::consumer::{GroupPosition, group_positions};
use crate::kafka::producer::{EventProducer, client_config};
use crate::kafka::topics;
use crate::lsn::Lsn;
use crate::postgres::catalog::{Catalog, SlotWait};
use crate::postgres::copy_registry::{CopyRegistration, RegistrationState};
use crate::postgres::events::EventWriter;
use crate::postgres::replication::{ReplicationClient, quote_identifier};
use crate::postgres::slot::{self, CapturedTable};
use crate::postgres::types::{Codec, CodecOptions};
use crate::sink::apply::Sink;
use crate::sink::document::{COMMIT_LSN_PATH, DELETED_PATH};
use crate::sink::index::{self, IndexOverrides, alias_name, index_mappings, index_settings};
use crate::source::snapshot;

/// Kafka metadata and offset requests give up after this long (and are retried by the loops).
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the source may take to register the backfill (it looks every 250 ms).
const REGISTRATION_WAIT: Duration = Duration::from_secs(60);

/// How often progress lines are printed.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Where a backfill reports what it does, line by line, for the operator watching it. Library
/// code never prints: the CLI's implementation ([`PrintLines`]) writes each line to stdout.
pub trait Progress: Send + Sync + std::fmt::Debug {
    fn line(&self, line: std::fmt::Arguments<'_>);
}

/// Progress lines on stdout, for `walsync backfill`.
#[derive(Debug, Default)]
pub struct PrintLines;

impl Progress for PrintLines {
    fn line(&self, line: std::fmt::Arguments<'_>) {
        use std::io::Write as _;
        // A closed stdout (the operator's pipe went away) must not fail the backfill.
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
}

/// What to backfill, from the command line.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// `schema.table` (or `table`, meaning `public.table`).
    pub table: String,
    /// An SQL predicate selecting the rows to copy; all rows when `None`.
    pub filter: Option<String>,
    /// A new concrete index to build and swap the alias to.
    pub into: Option<String>,
    /// With `into`: delete the old index after the swap.
    pub delete_old: bool,
    /// How long to wait for the stream and the sink(s) to catch up.
    pub timeout: Duration,
    /// Where progress lines go.
    pub progress: Arc<dyn Progress>,
}

/// What a backfill did.
#[derive(Debug, Clone)]
pub struct BackfillReport {
    pub rows: u64,
    pub consistent_point: Lsn,
    /// Events the main sink had still to apply at the end.
    pub stream_lag: u64,
    /// Documents removed because their rows no longer exist (full in-place backfills).
    pub removed: Option<u64>,
    /// The index the alias pointed to before an `--into` swap.
    pub old_index: Option<String>,
    pub duration: Duration,
}

/// What an `--into` backfill that fails must not leave behind.
#[derive(Debug, Default)]
struct Leftovers {
    /// The new index, until the alias points to it.
    unswapped_index: Option<String>,
    /// The second sink's consumer group.
    group: Option<String>,
}

/// Runs a backfill, reporting progress lines to `options.progress` as it goes. An `--into` backfill that fails
/// before the swap deletes the index it created (searches never saw it), so it can be rerun.
pub async fn run(config: Config, options: BackfillOptions) -> anyhow::Result<BackfillReport> {
    let mut leftovers = Leftovers::default();
    let result = run_backfill(config.clone(), options, &mut leftovers).await;
    if result.is_err() {
        if let Some(group) = &leftovers.group {
            delete_group(&config.kafka, group).await;
        }
        if let Some(index) = &leftovers.unswapped_index {
            let deleted = match index::build_client(&config.elasticsearch) {
                Ok(search) => delete_index(&search, index).await,
                Err(error) => Err(error.into()),
            };
            return match deleted {
                Ok(()) => result.context(format!(
                    "the backfill stopped before the swap; the alias is unchanged and the half-built index {index} was deleted"
                )),
                Err(error) => result.context(format!(
                    "the backfill stopped before the swap; the alias is unchanged, but the half-built index {index} \
                     could not be deleted ({error:#}): delete it before running again"
                )),
            };
        }
    }
    result
}

async fn run_backfill(
    config: Config,
    options: BackfillOptions,
    leftovers: &mut Leftovers,
) -> anyhow::Result<BackfillReport> {
    let started = Instant::now();
    let progress_handle = Arc::clone(&options.progress);
    let progress: &dyn Progress = progress_handle.as_ref();
    if options.into.is_some() && options.filter.is_some() {
        bail!(
            "--into builds a complete new index, so it cannot be combined with --where (the index would hold only the slice); \
             drop --where, or backfill the slice in place without --into"
        );
    }
    if options.delete_old && options.into.is_none() {
        bail!(
            "--delete-old only applies with --into (it deletes the index the alias pointed to before the swap)"
        );
    }
    let params = crate::postgres::replication::ConnectParams::from_config(&config)?;
    let catalog = Catalog::connect(&params).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {}:{}",
            params.host, params.port
        )
    })?;
    let table = captured_table(&config, &catalog, &options.table).await?;
    let qualified = table.qualified_name();
    if let Some(filter) = &options.filter {
        check_filter(&catalog, &table, filter).await?;
    }
    let (schema, name) = (table.info.schema.clone(), table.info.name.clone());
    let topic = topics::topic_name(&config.kafka.topic_prefix, &schema, &name);
    let table_config = config.tables.get(&qualified).cloned().unwrap_or_default();
    let alias = alias_name(&config.elasticsearch, &table_config, &schema, &name);
    let search = index::build_client(&config.elasticsearch)?;

    let identity = ReplicationClient::connect(&params)
        .await?
        .identify_system()
        .await?;
    let main_group = GroupOffsets::new(&config.kafka, &config.sink.group_id, &topic).await?;

    // --into: the new index, and the second sink's start: the topic's end before the slot.
    let mut rebuild = None;
    if let Some(into) = &options.into {
        let old_index = current_index(&search, &alias).await?;
        create_index_like(&search, &config, &table_config, into, &identity.system_id).await?;
        leftovers.unswapped_index = Some(into.clone());
        progress.line(format_args!(
            "created index {into} (the alias {alias} points to {old_index})"
        ));
        let group = format!("{}-backfill-{into}", config.sink.group_id);
        let secondary = GroupOffsets::new(&config.kafka, &group, &topic).await?;
        let start = secondary.high_watermarks().await?;
        leftovers.group = Some(group.clone());
        secondary.commit(&start).await?;
        rebuild = Some(Rebuild {
            into: into.clone(),
            old_index,
            group,
            offsets: secondary,
        });
    }

    let registration = register_with_source(
        progress,
        &catalog,
        &config.postgres.slot,
        &schema,
        &name,
        &topic,
    )
    .await?;
    let copy = snapshot::import_snapshot(&params, &config.postgres.slot, "backfill", 1)
        .await
        .context("cannot create the backfill's temporary slot and import its snapshot")?;
    let version = copy.version();
    let consistent_point = Lsn(version.as_u64() + 1);
    progress.line(format_args!(
        "backfilling {qualified}{} under a snapshot at consistent point {consistent_point}; rows are versioned {version}",
        options
            .filter
            .as_ref()
            .map_or(String::new(), |filter| format!(" where {filter}"))
    ));

    let secondary_sink = match &rebuild {
        Some(rebuild) => Some(start_secondary_sink(&config, &table, &topic, rebuild).await?),
        None => None,
    };

    let rows = copy_rows(&config, &identity, copy, &table, &topic, &options).await?;
    progress.line(format_args!(
        "copied {rows} rows in {:.1} s; waiting for the stream to catch up",
        started.elapsed().as_secs_f64()
    ));

    let deadline = Instant::now() + options.timeout;
    complete_registration(progress, &catalog, registration, consistent_point, deadline).await?;
    let position = current_wal_position(&catalog).await?;
    wait_source_confirmed(
        progress,
        &catalog,
        &config.postgres.slot,
        position,
        deadline,
    )
    .await?;
    progress.line(format_args!("stream position: {position} is in Kafka"));
    let end = main_group.high_watermarks().await?;

    let mut report = BackfillReport {
        rows,
        consistent_point,
        stream_lag: 0,
        removed: None,
        old_index: None,
        duration: Duration::ZERO,
    };
    match (rebuild, secondary_sink) {
        (Some(rebuild), Some(secondary)) => {
            let outcome = finish_rebuild(
                progress,
                &search,
                &alias,
                &rebuild,
                &secondary,
                &main_group,
                &end,
                deadline,
                &mut leftovers.unswapped_index,
            )
            .await;
            // The second sink's own error, when it failed, is the cause of any other.
            let stopped = secondary.stop().await;
            stopped?;
            outcome?;
            delete_group(&config.kafka, &rebuild.group).await;
            leftovers.group = None;
            if options.delete_old {
                delete_index(&search, &rebuild.old_index).await?;
                progress.line(format_args!("deleted the old index {}", rebuild.old_index));
            } else {
                progress.line(format_args!(
                    "the old index {} is kept; delete it once you no longer need it: curl -X DELETE {}/{}",
                    rebuild.old_index,
                    config.elasticsearch.url.trim_end_matches('/'),
                    rebuild.old_index
                ));
            }
            report.old_index = Some(rebuild.old_index);
        }
        _ => {
            wait_group(progress, &main_group, "the sink", &end, deadline).await?;
            if options.filter.is_none() {
                let removed = remove_older_documents(&search, &alias, version).await?;
                progress.line(format_args!(
                    "removed {removed} documents whose rows no longer exist (stored commit LSN below {version})"
                ));
                report.removed = Some(removed);
            }
        }
    }
    let now = main_group.high_watermarks().await?;
    report.stream_lag = main_group.behind(&now).await?;
    report.duration = started.elapsed();
    progress.line(format_args!(
        "backfill of {qualified} done: {} rows copied, consistent point {}, stream lag {} events (sink group {}), {:.1} s",
        report.rows,
        report.consistent_point,
        report.stream_lag,
        config.sink.group_id,
        report.duration.as_secs_f64()
    ));
    Ok(report)
}

/// The configured table as the source captures it (its key columns), or a clear refusal.
async fn captured_table(
    config: &Config,
    catalog: &Catalog,
    requested: &str,
) -> anyhow::Result<CapturedTable> {
    let (schema, name) = slot::split_table_name(requested);
    let configured = config
        .postgres
        .tables
        .iter()
        .any(|table| slot::split_table_name(table) == (schema.clone(), name.clone()));
    if !configured {
        bail!(
            "{schema}.{name} is not in postgres.tables of this configuration: walsync only backfills tables it captures \
             (configured: {})",
            config.postgres.tables.join(", ")
        );
    }
    let info = catalog
        .table(&schema, &name)
        .await?
        .with_context(|| format!("table {schema}.{name} does not exist"))?;
    let key_override = config
        .tables
        .get(&format!("{schema}.{name}"))
        .map(|table| table.key_columns.clone())
        .unwrap_or_default();
    let mut problems = Vec::new();
    match slot::check_table(info, key_override, &mut problems) {
        Some(table) => Ok(table),
        None => bail!(
            "cannot backfill {schema}.{name}:\n{}",
            problems
                .iter()
                .map(|problem| format!("  ✗ {problem}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// Lets PostgreSQL parse and plan the predicate (without running it) before anything is created.
async fn check_filter(
    catalog: &Catalog,
    table: &CapturedTable,
    filter: &str,
) -> anyhow::Result<()> {
    let sql = format!(
        "SELECT 1 FROM {}.{} WHERE ({filter})",
        quote_identifier(&table.info.schema),
        quote_identifier(&table.info.name)
    );
    // A prepared statement is one statement: `x; DROP …` is refused here.
    if let Err(error) = catalog.client().prepare(&sql).await {
        let reason = error
            .as_db_error()
            .map_or_else(|| error.to_string(), |db| db.message().to_owned());
        bail!(
            "--where {filter:?} is not a valid predicate on {}: PostgreSQL says: {reason}. \
             Write an SQL boolean expression over the table's columns, e.g. --where \"id < 1000\"",
            table.qualified_name()
        );
    }
    Ok(())
}

/// Produces the table's rows to its topic, printing progress lines meanwhile.
async fn copy_rows(
    config: &Config,
    identity: &crate::postgres::replication::SystemIdentity,
    copy: snapshot::ImportedSnapshot,
    table: &CapturedTable,
    topic: &str,
    options: &BackfillOptions,
) -> anyhow::Result<u64> {
    let params = crate::postgres::replication::ConnectParams::from_config(config)?;
    let catalog = Catalog::connect(&params).await?;
    let mut codec = Codec::new(CodecOptions::default());
    for (oid, kind) in catalog.custom_types().await? {
        codec.register(oid, kind);
    }
    let writer = EventWriter::new(
        Arc::new(codec),
        Arc::new(SourceInfo {
            name: config.kafka.topic_prefix.clone(),
            database: params.dbname.clone(),
            system_id: identity.system_id.clone(),
            timeline: identity.timeline,
        }),
    );
    let producer = EventProducer::new(&config.kafka)?;
    let copied = AtomicU64::new(0);
    let target = snapshot::CopyTarget {
        table: table.clone(),
        topic: Arc::from(topic),
    };
    let copying = snapshot::copy_table_rows(
        &copy,
        &target,
        options.filter.as_deref(),
        &writer,
        &producer,
        &copied,
    );
    tokio::pin!(copying);
    // The planner's row estimate, for an ETA; a slice has none.
    let estimate = match options.filter {
        Some(_) => None,
        None => estimated_rows(&catalog, table).await,
    };
    let started = Instant::now();
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    ticker.tick().await;
    let rows = loop {
        tokio::select! {
            rows = &mut copying => break rows.with_context(|| {
                format!("the copy of {} failed", table.qualified_name())
            })?,
            _ = ticker.tick() => {
                let rows = copied.load(Ordering::Relaxed);
                let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
                options.progress.line(format_args!(
                    "copying {}: {rows} rows, {rate:.0} rows/s{}",
                    table.qualified_name(),
                    eta(rows, rate, estimate)
                ));
            }
        }
    };
    // The snapshot transaction ends with its connection (when `copy` drops); the temporary
    // slot went as soon as the snapshot was imported.
    Ok(rows)
}

/// `reltuples` of the table (as of its last VACUUM or ANALYZE); `None` when unknown.
async fn estimated_rows(catalog: &Catalog, table: &CapturedTable) -> Option<u64> {
    let row = catalog
        .client()
        .query_one(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = $1",
            &[&table.info.oid],
        )
        .await
        .ok()?;
    let estimate: f64 = row.get(0);
    (estimate > 0.0).then_some(estimate as u64)
}

/// `, about N rows, ETA Ts` for a progress line, when there is an estimate to go by.
fn eta(rows: u64, rate: f64, estimate: Option<u64>) -> String {
    match estimate {
        Some(total) if rate > 0.0 => {
            let left = total.saturating_sub(rows) as f64 / rate;
            format!(" of about {total}, ETA {left:.0} s")
        }
        _ => String::new(),
    }
}

async fn current_wal_position(catalog: &Catalog) -> anyhow::Result<Lsn> {
    let row = catalog
        .client()
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    let text: String = row.get(0);
    text.parse()
        .map_err(|_| anyhow::anyhow!("PostgreSQL returned an unreadable WAL position {text:?}"))
}

/// Tells the source streaming `slot` that `schema.table` is being copied, and waits until it
/// marks the table's deletes for soft tombstones: a delete of a row the copy reads later
/// must not let that row come back (design invariant 5, `crate::postgres::copy_registry`).
/// `catalog`'s session holds the registration until the backfill ends.
async fn register_with_source(
    progress: &dyn Progress,
    catalog: &Catalog,
    slot: &str,
    schema: &str,
    table: &str,
    topic: &str,
) -> anyhow::Result<CopyRegistration> {
    let client = catalog.client();
    let registration = CopyRegistration::request(client, slot, schema, table, topic).await?;
    let state = wait_while(
        catalog,
        &registration,
        RegistrationState::Requested,
        Instant::now() + REGISTRATION_WAIT,
    )
    .await?;
    if state == Some(RegistrationState::Requested) || state.is_none() {
        registration.remove(client).await?;
        bail!(
            "no walsync source streaming slot {slot} took the backfill's registration within {} s: \
             start `walsync run` (or `walsync source`) with this configuration, then run the backfill again \
             (the source must mark deletes during the copy, or rows deleted meanwhile could come back)",
            REGISTRATION_WAIT.as_secs()
        );
    }
    progress.line(format_args!(
        "registered with the source: deletes of {schema}.{table} become soft tombstones until the copy is complete"
    ));
    Ok(registration)
}

/// Polls the registration while it is in `state` and `deadline` is ahead; returns the state
/// it was last seen in (`None`: its row is gone).
async fn wait_while(
    catalog: &Catalog,
    registration: &CopyRegistration,
    state: RegistrationState,
    deadline: Instant,
) -> anyhow::Result<Option<RegistrationState>> {
    loop {
        let seen = registration.state(catalog.client()).await?;
        if seen != Some(state) || Instant::now() >= deadline {
            return Ok(seen);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every row is in Kafka: asks the source to end the copy (it writes the `copy_completed`
/// control records after every delete it marked, and the sink purges the soft tombstones when
/// it reaches them), waits for it, and removes the registration.
async fn complete_registration(
    progress: &dyn Progress,
    catalog: &Catalog,
    registration: CopyRegistration,
    consistent_point: Lsn,
    deadline: Instant,
) -> anyhow::Result<()> {
    let client = catalog.client();
    registration.mark_copied(client, consistent_point).await?;
    match wait_while(catalog, &registration, RegistrationState::Copied, deadline).await? {
        Some(RegistrationState::Completed) => {}
        None => bail!(
            "the backfill's registration {} disappeared before the source completed it; run the backfill again",
            registration.id()
        ),
        Some(state) => bail!(
            "the source has not completed the backfill's registration in time (still {}): is `walsync run` \
             (or `walsync source`) running? The rows were produced; rerun the backfill or raise --timeout",
            state.as_str()
        ),
    }
    registration.remove(client).await?;
    progress.line(format_args!(
        "the source wrote the copy's control records: soft tombstones are purged as the sink reaches them"
    ));
    Ok(())
}

/// Waits until the pipeline's slot confirmed `position` (`Catalog::wait_slot_confirmed`).
async fn wait_source_confirmed(
    progress: &dyn Progress,
    catalog: &Catalog,
    slot_name: &str,
    position: Lsn,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut last_print = Instant::now();
    let outcome = catalog
        .wait_slot_confirmed(slot_name, position, deadline, |confirmed| {
            if last_print.elapsed() >= PROGRESS_INTERVAL {
                progress.line(format_args!(
                    "waiting for the source: slot {slot_name} confirmed {confirmed}, target {position}"
                ));
                last_print = Instant::now();
            }
        })
        .await?;
    match outcome {
        SlotWait::Confirmed => Ok(()),
        SlotWait::Missing => bail!(
            "the pipeline's slot {slot_name} does not exist: is the source running with this configuration?"
        ),
        SlotWait::TimedOut {
            confirmed,
            read_by_nobody,
        } => bail!(
            "the source has not confirmed WAL position {position} in time (slot {slot_name} is at {confirmed}{}): \
             is `walsync run` (or `walsync source`) running? The rows were produced; rerun the backfill \
             or raise --timeout",
            if read_by_nobody {
                ", and nobody reads it"
            } else {
                ""
            }
        ),
    }
}

/// The offsets of one consumer group on one topic, and the topic's high watermarks.
struct GroupOffsets {
    consumer: Arc<BaseConsumer>,
    group: String,
    topic: String,
    partitions: Vec<i32>,
}

impl GroupOffsets {
    async fn new(kafka: &KafkaConfig, group: &str, topic: &str) -> anyhow::Result<Self> {
        let mut consumer_config = client_config(kafka)?;
        consumer_config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer = consumer_config
            .create()
            .context("cannot create a Kafka client to read offsets")?;
        let consumer = Arc::new(consumer);
        let topic_name = topic.to_owned();
        let partitions = blocking(Arc::clone(&consumer), move |consumer| {
            let metadata = consumer.fetch_metadata(Some(&topic_name), KAFKA_TIMEOUT)?;
            Ok(metadata
                .topics()
                .iter()
                .flat_map(|topic| topic.partitions().iter().map(|p| p.id()))
                .collect::<Vec<i32>>())
        })
        .await
        .with_context(|| format!("cannot read the partitions of topic {topic}"))?;
        if partitions.is_empty() {
            bail!("topic {topic} does not exist: has the source run with this configuration?");
        }
        Ok(Self {
            consumer,
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions,
        })
    }

    fn list(&self, offsets: Option<&[i64]>) -> anyhow::Result<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (position, partition) in self.partitions.iter().enumerate() {
            match offsets {
                Some(offsets) => list.add_partition_offset(
                    &self.topic,
                    *partition,
                    Offset::Offset(offsets[position]),
                )?,
                None => {
                    list.add_partition(&self.topic, *partition);
                }
            }
        }
        Ok(list)
    }

    /// Where the group stands on every partition (kafka::consumer's one definition).
    async fn positions(&self) -> anyhow::Result<Vec<GroupPosition>> {
        let partitions: Vec<(String, i32)> = self
            .partitions
            .iter()
            .map(|partition| (self.topic.clone(), *partition))
            .collect();
        blocking(Arc::clone(&self.consumer), move |consumer| {
            group_positions(consumer, &partitions, KAFKA_TIMEOUT)
        })
        .await
        .with_context(|| {
            format!(
                "cannot read the position of group {} on topic {}",
                self.group, self.topic
            )
        })
    }

    /// The next offset of every partition (the end of the topic now).
    async fn high_watermarks(&self) -> anyhow::Result<Vec<i64>> {
        Ok(self.positions().await?.iter().map(|p| p.high).collect())
    }

    /// Events the group has still to apply to reach `target`, summed over partitions.
    async fn behind(&self, target: &[i64]) -> anyhow::Result<u64> {
        Ok(self
            .positions()
            .await?
            .iter()
            .zip(target)
            .map(|(position, target)| position.behind(*target))
            .sum())
    }

    /// Commits `offsets` for the group (which has no members yet).
    async fn commit(&self, offsets: &[i64]) -> anyhow::Result<()> {
        let list = self.list(Some(offsets))?;
        blocking(Arc::clone(&self.consumer), move |consumer| {
            consumer.commit(&list, CommitMode::Sync)
        })
        .await
        .with_context(|| format!("cannot set the start offsets of group {}", self.group))
    }
}

async fn blocking<T: Send + 'static>(
    consumer: Arc<BaseConsumer>,
    work: impl FnOnce(&BaseConsumer) -> Result<T, rdkafka::error::KafkaError> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(move || work(&consumer)).await??)
}

/// Waits until `group` committed at least `target` on every partition, printing its lag.
async fn wait_group(
    progress: &dyn Progress,
    group: &GroupOffsets,
    who: &str,
    target: &[i64],
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut last_print = Instant::now();
    loop {
        let behind = group.behind(target).await?;
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{who} (consumer group {}) did not apply the backfill in time: {behind} events of topic {} still to go. \
                 Is it running? The rows are in Kafka and will be applied when it catches up; raise --timeout to wait longer",
                group.group,
                group.topic
            );
        }
        if last_print.elapsed() >= PROGRESS_INTERVAL {
            progress.line(format_args!(
                "waiting for {who} (group {}): {behind} events behind",
                group.group
            ));
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The new index of an `--into` backfill and the second sink that fills it.
struct Rebuild {
    into: String,
    old_index: String,
    group: String,
    offsets: GroupOffsets,
}

/// The second sink of an `--into` backfill. Dropped without [`SecondarySink::stop`] (an error
/// elsewhere), it is aborted, so it cannot write to an index that is being deleted.
struct SecondarySink {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl SecondarySink {
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        task.await
            .context("the backfill's sink panicked")?
            .context("the backfill's sink failed")
    }

    fn has_stopped(&self) -> bool {
        self.task.as_ref().is_none_or(|task| task.is_finished())
    }
}

impl Drop for SecondarySink {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn start_secondary_sink(
    config: &Config,
    table: &CapturedTable,
    topic: &str,
    rebuild: &Rebuild,
) -> anyhow::Result<SecondarySink> {
    let mut sink_config = config.clone();
    sink_config.sink.group_id = rebuild.group.clone();
    sink_config.sink.topics = vec![topic.to_owned()];
    let mut sink = Sink::new(sink_config).await?;
    sink.write_table_to(&table.info.schema, &table.info.name, &rebuild.into);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { sink.run(stopped).await });
    Ok(SecondarySink {
        stop,
        task: Some(task),
    })
}

/// Waits for the new index to catch up, swaps the alias, then lets the second sink pass the
/// topic's end as of the swap (see the module doc). Clears `unswapped` once the alias moved.
#[allow(clippy::too_many_arguments)]
async fn finish_rebuild(
    progress: &dyn Progress,
    search: &Elasticsearch,
    alias: &str,
    rebuild: &Rebuild,
    secondary: &SecondarySink,
    main_group: &GroupOffsets,
    end: &[i64],
    deadline: Instant,
    unswapped: &mut Option<String>,
) -> anyhow::Result<()> {
    wait_secondary(progress, rebuild, secondary, end, deadline).await?;
    // Searches see only refreshed documents: make the new index's writes visible before it
    // takes the alias, or a search right after the swap could count fewer documents.
    index::refresh(search, &rebuild.into).await?;
    swap_alias(search, alias, &rebuild.old_index, &rebuild.into).await?;
    *unswapped = None;
    progress.line(format_args!(
        "swapped alias {alias}: {} -> {}",
        rebuild.old_index, rebuild.into
    ));
    let end_at_swap = main_group.high_watermarks().await?;
    wait_secondary(
        progress,
        rebuild,
        secondary,
        &end_at_swap,
        deadline.max(Instant::now() + Duration::from_secs(60)),
    )
    .await
}

/// Waits until the second sink committed `target`, or fails as soon as it stopped.
async fn wait_secondary(
    progress: &dyn Progress,
    rebuild: &Rebuild,
    secondary: &SecondarySink,
    target: &[i64],
    deadline: Instant,
) -> anyhow::Result<()> {
    let catch_up = wait_group(
        progress,
        &rebuild.offsets,
        "the new index's sink",
        target,
        deadline,
    );
    tokio::pin!(catch_up);
    loop {
        tokio::select! {
            done = &mut catch_up => return done,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if secondary.has_stopped() {
                    bail!("the sink filling {} stopped before it caught up", rebuild.into);
                }
            }
        }
    }
}

/// The one concrete index behind `alias`.
async fn current_index(search: &Elasticsearch, alias: &str) -> anyhow::Result<String> {
    let response = send(search, Method::Get, &format!("/_alias/{alias}"), None).await?;
    if response.status_code().as_u16() == 404 {
        bail!(
            "alias {alias} does not exist yet: nothing to rebuild. Let the sink create it (walsync run), or backfill without --into"
        );
    }
    let body: Value = json_of(response, "read alias", alias).await?;
    let indices: Vec<String> = body
        .as_object()
        .map(|indices| indices.keys().cloned().collect())
        .unwrap_or_default();
    match indices.as_slice() {
        [only] => Ok(only.clone()),
        _ => bail!(
            "alias {alias} points to {} indices ({}); walsync writes to exactly one",
            indices.len(),
            indices.join(", ")
        ),
    }
}

/// Creates `index` as [`index::ensure_index`] would create the table's index (settings and
/// mappings from the configuration, the source's system identifier in `_meta`), without alias.
async fn create_index_like(
    search: &Elasticsearch,
    config: &Config,
    table: &crate::config::TableConfig,
    index: &str,
    system_id: &str,
) -> anyhow::Result<()> {
    let overrides = IndexOverrides::from_table(table)?;
    let body = json!({
        "settings": index_settings(overrides.settings.as_ref(), &config.elasticsearch.gc_deletes)?,
        "mappings": index_mappings(overrides.mappings.as_ref(), system_id)?,
    });
    let response = send(search, Method::Put, &format!("/{index}"), Some(body)).await?;
    let status = response.status_code();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        if text.contains("already_exists") {
            bail!(
                "index {index} already exists: --into needs a new name (e.g. the next version, <alias>_v<N+1>), \
                 or delete {index} first if it is a leftover of an interrupted backfill"
            );
        }
        bail!("cannot create index {index}: HTTP {status}: {text}");
    }
    Ok(())
}

/// Moves `alias` from `old` to `new` in one request: searches see one or the other, never none.
async fn swap_alias(
    search: &Elasticsearch,
    alias: &str,
    old: &str,
    new: &str,
) -> anyhow::Result<()> {
    let body = json!({"actions": [
        {"remove": {"index": old, "alias": alias}},
        {"add": {"index": new, "alias": alias}}
    ]});
    let response = send(search, Method::Post, "/_aliases", Some(body)).await?;
    json_of::<Value>(response, "swap alias", alias).await?;
    Ok(())
}

async fn delete_index(search: &Elasticsearch, index: &str) -> anyhow::Result<()> {
    let response = send(search, Method::Delete, &format!("/{index}"), None).await?;
    json_of::<Value>(response, "delete index", index).await?;
    Ok(())
}

/// Deletes the documents (not soft tombstones) whose commit LSN is below `version`; returns how
/// many. `delete_by_query` skips documents changed since it read them (a version conflict).
async fn remove_older_documents(
    search: &Elasticsearch,
    alias: &str,
    version: Lsn,
) -> anyhow::Result<u64> {
    match index::refresh(search, alias).await {
        Ok(()) => {}
        // No index yet (an empty table whose sink never wrote a document): nothing to remove.
        Err(index::IndexError::Refused { status: 404, .. }) => return Ok(0),
        Err(error) => return Err(error.into()),
    }
    let body = json!({"query": {"bool": {
        "filter": [{"range": {COMMIT_LSN_PATH: {"lt": version.as_u64()}}}],
        "must_not": [{"term": {DELETED_PATH: true}}]
    }}});
    let path = format!("/{alias}/_delete_by_query?conflicts=proceed&refresh=true");
    let response = send(search, Method::Post, &path, Some(body)).await?;
    let answer: Value = json_of(response, "delete_by_query", alias).await?;
    Ok(answer.get("deleted").and_then(Value::as_u64).unwrap_or(0))
}

async fn delete_group(kafka: &KafkaConfig, group: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
        match client_config(kafka) {
            Ok(config) => config.create(),
            Err(error) => {
                tracing::warn!(%error, "cannot delete the backfill's consumer group");
                return;
            }
        };
    let Ok(admin) = admin else {
        return;
    };
    if let Err(error) = admin.delete_groups(&[group], &AdminOptions::new()).await {
        tracing::warn!(%error, %group, "cannot delete the backfill's consumer group; it holds no data and can be deleted by hand");
    }
}

async fn send(
    search: &Elasticsearch,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<elasticsearch::http::response::Response> {
    search
        .send(
            method,
            path,
            HeaderMap::new(),
            Option::<&()>::None,
            body.map(|body| body.to_string()),
            Some(Duration::from_secs(600)),
        )
        .await
        .with_context(|| format!("request to the search server failed: {path}"))
}

async fn json_of<T: serde::de::DeserializeOwned>(
    response: elasticsearch::http::response::Response,
    action: &'static str,
    target: &str,
) -> anyhow::Result<T> {
    Ok(index::success_json(response, action, target).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_needs_an_estimate_and_a_rate() {
        assert_eq!(eta(500, 100.0, Some(1_500)), " of about 1500, ETA 10 s");
        assert_eq!(eta(2_000, 100.0, Some(1_500)), " of about 1500, ETA 0 s");
        assert_eq!(eta(500, 100.0, None), "");
        assert_eq!(eta(0, 0.0, Some(1_500)), "");
    }
}
