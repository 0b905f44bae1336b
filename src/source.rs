//! The source pipeline: WAL → events → Kafka, and the confirmation loop back to PostgreSQL.
//!
//! Start-up checks everything first (and changes nothing when something is wrong), then
//! applies migrations, reconciles the publication, creates or resumes the slot, creates the
//! topics and streams. While streaming, two tasks share the connection:
//! - the reader decodes pgoutput, turns rows into events and hands them to the producer; when
//!   the producer's bounded queue is full it waits, and so stops reading WAL;
//! - the status task sends standby status updates on a timer (and when the server asks),
//!   whatever the reader is doing, with the flush LSN from the [`FlushFrontier`]: only what
//!   Kafka has acknowledged is ever confirmed (design invariant 3).
//!
//! Its parts that need both sides: `snapshot` (the consistent initial copy and backfills,
//! read from PostgreSQL and produced to Kafka at `cp − 1`) and `copies` (the tables being
//! copied, whose deletes become soft tombstones, and the backfills other processes register).
//! Living here, they keep the PostgreSQL side free of Kafka and the Kafka side free of
//! PostgreSQL.

pub mod copies;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, watch};

use crate::config::{Config, SnapshotMode};
use crate::event::{SourceInfo, TxContext};
use crate::health::HEALTH;
use crate::kafka::frontier::{FlushFrontier, TxAcks};
use crate::kafka::producer::EventProducer;
use crate::kafka::topics;
use crate::lsn::Lsn;
use crate::metrics::{CommitTimes, SourceCounters, record_source_progress};
use crate::postgres::catalog::Catalog;
use crate::postgres::copy_registry::RegistryError;
use crate::postgres::events::{EventWriter, RowChange, TableRoute};
use crate::postgres::pgoutput::{self, LogicalMessage, OldTuple, Relations};
use crate::postgres::replication::frames::{ReplicationMessage, StatusUpdate};
use crate::postgres::replication::{
    ConnectParams, ReplicationClient, ReplicationError, ReplicationStream, SlotSnapshot,
    StatusSender,
};
use crate::postgres::slot::{self, CapturedTable};
use crate::postgres::types::{Codec, CodecOptions};
use crate::retry::{Backoff, Disposition};
use crate::source::copies::{CopiesInProgress, RegistryFollower};

/// How the source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceExit {
    /// Stopped on request with every event acknowledged and confirmed.
    Drained,
    /// Stopped on request, but Kafka did not acknowledge everything in time: those changes
    /// were not confirmed and will be read again on the next start.
    Undrained,
}

/// Captured tables by (schema, name): their topic and key column names.
/// Each captured table by `(schema, name)`: its topic, its key columns and the relation OID the
/// name had when the source started.
type RouteTargets = HashMap<(String, String), RouteTarget>;

struct RouteTarget {
    topic: Arc<str>,
    key_names: Vec<String>,
    /// The relation captured under the name: a Relation message of another OID under it is
    /// another table ([`Reader::refuse_another_relation_under`]).
    oid: u32,
}

/// How long a requested stop waits for Kafka to acknowledge what was handed to it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the source until `stop` turns true or an error that needs an operator.
pub async fn run(config: Config, mut stop: watch::Receiver<bool>) -> anyhow::Result<SourceExit> {
    let params = ConnectParams::from_config(&config)?;
    let mut catalog = Catalog::connect(&params).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {}:{} as {}",
            params.host, params.port, params.user
        )
    })?;

    let preflight =
        slot::preflight(&catalog, &config.postgres, &config.tables, &params.dbname).await?;
    if !preflight.problems.is_empty() {
        let list: Vec<String> = preflight
            .problems
            .iter()
            .map(|p| format!("  ✗ {p}"))
            .collect();
        bail!(
            "the source cannot start; nothing was changed:\n{}",
            list.join("\n")
        );
    }
    let tables = preflight.tables;
    let table_names: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.info.schema.clone(), t.info.name.clone()))
        .collect();
    let topic_names = topics::plan_topics(&config.kafka.topic_prefix, &table_names)?;

    let applied = slot::migrate(&mut catalog).await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "applied migrations");
    }
    slot::reconcile_publication(&catalog, &config.postgres.publication, &tables, config.postgres.prune_publication)
        .await
        .context("cannot create or update the publication (walsync's role must own the tables, or be superuser)")?;
    topics::ensure_topics(&config.kafka, &topic_names).await?;

    let mut codec = Codec::new(CodecOptions::default());
    for (oid, kind) in catalog.custom_types().await? {
        codec.register(oid, kind);
    }
    let producer = Arc::new(EventProducer::new(&config.kafka)?);
    producer.count_into(Arc::new(SourceCounters::new(
        tables
            .iter()
            .zip(&topic_names)
            .map(|(table, topic)| (table.qualified_name(), topic.as_str())),
    )));
    let routes_by_name: RouteTargets = tables
        .iter()
        .zip(&topic_names)
        .map(|(table, topic)| {
            (
                (table.info.schema.clone(), table.info.name.clone()),
                RouteTarget {
                    topic: Arc::from(topic.as_str()),
                    key_names: table.key_columns.clone(),
                    oid: table.info.oid,
                },
            )
        })
        .collect();

    let mut backoff = Backoff::starting_at(Duration::from_millis(500));
    let mut first_attempt = true;
    loop {
        let attempt = stream_once(
            &config,
            &params,
            &catalog,
            &tables,
            &codec,
            &producer,
            &routes_by_name,
            &mut stop,
            first_attempt,
        )
        .await;
        first_attempt = false;
        match attempt {
            Ok(exit) => return Ok(exit),
            Err(error) => {
                if !is_transient(&error) || *stop.borrow() {
                    return Err(error);
                }
                tracing::warn!(error = %format!("{error:#}"), backoff = ?backoff.next_delay(), "replication interrupted; waiting for Kafka, then resuming from the confirmed LSN");
                let producer = Arc::clone(&producer);
                tokio::task::spawn_blocking(move || producer.flush(DRAIN_TIMEOUT)).await??;
                backoff.wait().await;
                // A restarted server closed the metadata connection too.
                if catalog.client().is_closed() {
                    match Catalog::connect(&params).await {
                        Ok(reconnected) => catalog = reconnected,
                        Err(error) => tracing::warn!(%error, "PostgreSQL is not reachable yet"),
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_once(
    config: &Config,
    params: &ConnectParams,
    catalog: &Catalog,
    tables: &[CapturedTable],
    codec: &Codec,
    producer: &Arc<EventProducer>,
    routes_by_name: &RouteTargets,
    stop: &mut watch::Receiver<bool>,
    first_attempt: bool,
) -> anyhow::Result<SourceExit> {
    let mut client = ReplicationClient::connect(params).await?;
    let identity = client.identify_system().await?;
    let slot_name = &config.postgres.slot;
    let start = match catalog.slot(slot_name).await? {
        Some(slot) => slot.confirmed_flush_lsn.unwrap_or(Lsn::ZERO),
        // Created only at start-up, after preflight: a slot that vanishes while walsync runs is
        // never silently recreated (the changes in between would be skipped).
        None if !first_attempt => anyhow::bail!(
            "replication slot {slot_name} disappeared while walsync was running (dropped, or lost in a failover); \
             changes since are not recoverable from the WAL. Set postgres.recreate_lost_slot = true to start a new slot, \
             then rebuild the index from a fresh copy; see docs/runbook.md, \"A lost slot\""
        ),
        None => {
            let created = client
                .create_logical_slot(slot_name, false, SlotSnapshot::NoExport)
                .await?;
            tracing::info!(slot = %slot_name, consistent_point = %created.consistent_point, "created replication slot");
            created.consistent_point
        }
    };
    slot::record_slot(catalog, slot_name, &identity.system_id, &params.dbname).await?;
    tracing::info!(
        slot = %slot_name, %start, system_id = %identity.system_id, timeline = identity.timeline,
        tables = tables.len(), "streaming"
    );

    let writer = EventWriter::new(
        Arc::new(codec.clone()),
        Arc::new(SourceInfo {
            name: config.kafka.topic_prefix.clone(),
            database: params.dbname.clone(),
            system_id: identity.system_id.clone(),
            timeline: identity.timeline,
        }),
    );
    // A fresh set per attempt: an interrupted copy is copied again under a new snapshot and
    // registered again.
    let copies = Arc::new(CopiesInProgress::new(
        Arc::clone(producer),
        identity.system_id.clone(),
    ));
    // Backfills in other processes: the ones still running are registered before any delete
    // is read (crate::postgres::copy_registry).
    let mut registry = RegistryFollower::new(
        Catalog::connect(params).await?,
        slot_name.to_owned(),
        Arc::clone(&copies),
    );
    registry
        .sync()
        .await
        .context("cannot read the backfills registered in walsync.copy_registrations")?;
    // Every copy worker imports its snapshot before streaming starts; then both run.
    let copy = prepare_snapshot(
        config,
        params,
        catalog,
        tables,
        routes_by_name,
        &writer,
        producer,
        &copies,
    )
    .await?;
    let (stream, status) = client
        .start_replication(slot_name, start, &config.postgres.publication)
        .await?;
    let _stream_open = HEALTH.stream_opened();
    let shared = Arc::new(SharedProgress {
        frontier: Mutex::new(FlushFrontier::new(start)),
        received: AtomicU64::new(start.as_u64()),
        reply_now: Notify::new(),
        server_wal_end: AtomicU64::new(start.as_u64()),
        commit_times: Mutex::new(CommitTimes::default()),
    });
    let status_task = tokio::spawn(send_status(
        status,
        Arc::clone(&shared),
        Duration::from_millis(config.postgres.status_interval_ms.max(10)),
    ));
    let heartbeat_task = spawn_heartbeat(config, params.clone());

    let copy_task = copy.map(|(job, started)| tokio::spawn(snapshot::run_copy(job, started)));
    let copy_abort = copy_task
        .as_ref()
        .map(tokio::task::JoinHandle::abort_handle);
    let copy_failure = failure_of(copy_task, "the initial snapshot");
    let registry_task = tokio::spawn(registry.run());
    let registry_abort = registry_task.abort_handle();
    let registry_failure = failure_of(Some(registry_task), "following the registered backfills");
    let mut reader = Reader {
        stream,
        writer,
        producer: Arc::clone(producer),
        shared: Arc::clone(&shared),
        relations: Relations::new(),
        routes: HashMap::new(),
        routes_by_name,
        catalog,
        tx: None,
        tombstones: config.kafka.tombstones,
        copies,
    };
    let outcome = tokio::select! {
        outcome = reader.run(stop) => outcome,
        failure = copy_failure => Err(failure),
        failure = registry_failure => Err(failure),
    };
    registry_abort.abort();
    if let Some(task) = heartbeat_task {
        task.abort();
    }
    // An unfinished copy is not recorded as done: it starts over under a new snapshot.
    if let Some(copy) = copy_abort {
        copy.abort();
    }

    // Stop (requested or not): let Kafka acknowledge what it has, then confirm exactly that.
    let drain_producer = Arc::clone(producer);
    let drained = tokio::task::spawn_blocking(move || drain_producer.flush(DRAIN_TIMEOUT)).await?;
    // An empty queue is not a delivered one: a record Kafka refused leaves the queue too.
    let drained = drained.map_err(|error| error.to_string()).and_then(|()| {
        producer.refused().map_or(Ok(()), |reason| {
            Err(format!("Kafka refused a record: {reason}"))
        })
    });
    shared.reply_now.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;
    status_task.abort();
    let _ = status_task.await;
    // A stop on an error says whether everything sent before it reached Kafka: an operator
    // told to move the slot past a point must know that nothing before it is still unsent.
    // (A transient failure is retried, and says nothing to an operator.)
    if let Err(error) = outcome {
        if is_transient(&error) {
            return Err(error);
        }
        return Err(error.context(match &drained {
            Ok(()) => "Kafka acknowledged every event sent before the stop".to_owned(),
            Err(error) => format!(
                "Kafka did NOT acknowledge every event sent before the stop ({error}): do not move the slot; \
                 start again once Kafka answers, and they are sent again"
            ),
        }));
    }
    let confirmed = shared
        .frontier
        .lock()
        .map(|mut f| f.confirmable())
        .unwrap_or(Lsn::ZERO);
    tracing::info!(%confirmed, "source stopped");
    Ok(match drained {
        Ok(()) => SourceExit::Drained,
        Err(error) => {
            tracing::warn!(%error, "stopped before Kafka acknowledged everything; the rest is re-read on the next start");
            SourceExit::Undrained
        }
    })
}

/// Resolves with the error of a task that runs beside the stream (`what` says which); never
/// resolves while it runs, when it succeeded, or when there is no task.
async fn failure_of(
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    what: &str,
) -> anyhow::Error {
    match task {
        Some(task) => match task.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(error)) => error.context(format!("{what} failed")),
            Err(error) => anyhow::anyhow!("the task of {what} failed: {error}"),
        },
        None => std::future::pending().await,
    }
}

/// Whether reconnecting can help: the PostgreSQL rule (`postgres::disposition`) for either
/// connection says retry.
fn is_transient(error: &anyhow::Error) -> bool {
    let disposition = if let Some(replication) = error.downcast_ref::<ReplicationError>() {
        replication.disposition()
    } else if let Some(postgres) = error.downcast_ref::<tokio_postgres::Error>() {
        crate::postgres::disposition(postgres)
    } else if let Some(RegistryError::Postgres(postgres)) = error.downcast_ref::<RegistryError>() {
        crate::postgres::disposition(postgres)
    } else {
        Disposition::Stop
    };
    disposition == Disposition::Retry
}

/// Starts the copy of the tables whose initial copy is not complete (all of them again with
/// `snapshot.mode = "always"`, none with `"never"`): plans their chunks and imports a fresh
/// snapshot into the copy workers.
#[allow(clippy::too_many_arguments)]
async fn prepare_snapshot(
    config: &Config,
    params: &ConnectParams,
    catalog: &Catalog,
    tables: &[CapturedTable],
    routes_by_name: &RouteTargets,
    writer: &EventWriter,
    producer: &Arc<EventProducer>,
    copies: &Arc<CopiesInProgress>,
) -> anyhow::Result<Option<(snapshot::CopyJob, snapshot::StartedCopy)>> {
    let slot = &config.postgres.slot;
    match config.snapshot.mode {
        SnapshotMode::Never => return Ok(None),
        SnapshotMode::Always => snapshot::forget_copies(catalog, slot).await?,
        SnapshotMode::Initial => {}
    }
    let pending = snapshot::tables_to_copy(catalog, slot, tables).await?;
    let targets: Vec<snapshot::CopyTarget> = pending
        .into_iter()
        .filter_map(|table| {
            let key = (table.info.schema.clone(), table.info.name.clone());
            routes_by_name.get(&key).map(|target| snapshot::CopyTarget {
                table,
                topic: Arc::clone(&target.topic),
            })
        })
        .collect();
    if targets.is_empty() {
        return Ok(None);
    }
    let job = snapshot::CopyJob {
        params: params.clone(),
        slot: slot.clone(),
        settings: snapshot::SnapshotSettings::from_config(&config.snapshot),
        writer: writer.clone(),
        producer: Arc::clone(producer),
        hooks: Arc::new(SoftTombstoneHooks(Arc::clone(copies))),
    };
    let started = snapshot::begin_copy(&job, targets).await?;
    Ok(Some((job, started)))
}

/// Progress shared between the reader and the status task.
struct SharedProgress {
    frontier: Mutex<FlushFrontier>,
    /// The newest WAL position received (the status update's `written`).
    received: AtomicU64,
    reply_now: Notify,
    /// The server's end of WAL, from data messages and keepalives: for the lag metric only.
    server_wal_end: AtomicU64,
    /// Commit times of unconfirmed transactions: for the lag metric only.
    commit_times: Mutex<CommitTimes>,
}

impl SharedProgress {
    /// The next status update. With nothing in flight it asks the server for a keepalive, whose
    /// WAL position can then be confirmed: that keeps an idle publication's slot moving on a
    /// busy server.
    fn status(&self) -> StatusUpdate {
        let (flushed, idle) = match self.frontier.lock() {
            Ok(mut frontier) => (
                frontier.confirmable(),
                frontier.in_flight_transactions() == 0,
            ),
            Err(_) => (Lsn::ZERO, false),
        };
        let received = Lsn(self.received.load(Ordering::Acquire)).max(flushed);
        let oldest_unconfirmed = self
            .commit_times
            .lock()
            .ok()
            .and_then(|mut times| times.oldest_unconfirmed(flushed.as_u64()));
        record_source_progress(
            flushed.as_u64(),
            self.server_wal_end.load(Ordering::Acquire),
            if idle { None } else { oldest_unconfirmed },
        );
        StatusUpdate {
            written: received,
            flushed,
            applied: flushed,
            reply_requested: idle,
        }
    }
}

/// Sends status updates on a timer and on request, independently of the reader.
async fn send_status(mut sender: StatusSender, shared: Arc<SharedProgress>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.reply_now.notified() => {}
        }
        if let Err(error) = sender.send(shared.status()).await {
            tracing::debug!(%error, "status update not sent; the reader will see the connection drop");
            return;
        }
    }
}

fn spawn_heartbeat(config: &Config, params: ConnectParams) -> Option<tokio::task::JoinHandle<()>> {
    let interval = config.postgres.heartbeat_interval_secs;
    if interval == 0 {
        return None;
    }
    let slot_name = config.postgres.slot.clone();
    Some(tokio::spawn(async move {
        let mut catalog = None;
        let mut ticker = tokio::time::interval(Duration::from_secs(interval));
        loop {
            ticker.tick().await;
            if catalog.is_none() {
                catalog = Catalog::connect(&params).await.ok();
            }
            if let Some(connected) = &catalog
                && let Err(error) = slot::heartbeat(connected, &slot_name).await
            {
                tracing::warn!(%error, "heartbeat failed");
                catalog = None;
            }
        }
    }))
}

/// The open transaction: its context and its acknowledgement counter.
struct OpenTx {
    context: TxContext,
    acks: Arc<TxAcks>,
}

struct Reader<'a> {
    stream: ReplicationStream,
    writer: EventWriter,
    producer: Arc<EventProducer>,
    shared: Arc<SharedProgress>,
    relations: Relations,
    /// Routes of captured relations, by OID, as of the Relation message in force.
    routes: HashMap<u32, TableRoute>,
    routes_by_name: &'a RouteTargets,
    /// The metadata connection, to tell a replaced table from a replayed one.
    catalog: &'a Catalog,
    tx: Option<OpenTx>,
    tombstones: bool,
    /// Tables being copied: their deletes are marked for soft tombstones.
    copies: Arc<CopiesInProgress>,
}

impl Reader<'_> {
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        loop {
            if let Some(reason) = self.producer.refused() {
                bail!("Kafka refused an event: {reason}");
            }
            let message = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                reason = self.producer.wait_refused() => bail!("Kafka refused an event: {reason}"),
                message = self.stream.next() => message?,
            };
            match message {
                ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    data,
                } => {
                    self.shared
                        .received
                        .fetch_max(wal_start.as_u64(), Ordering::AcqRel);
                    self.shared
                        .server_wal_end
                        .fetch_max(wal_end.as_u64(), Ordering::AcqRel);
                    let decoded =
                        pgoutput::decode(data).context("cannot decode a pgoutput message")?;
                    self.apply(wal_start, decoded).await?;
                }
                ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    if let Ok(mut frontier) = self.shared.frontier.lock() {
                        frontier.observe_keepalive(wal_end);
                    }
                    self.shared
                        .server_wal_end
                        .fetch_max(wal_end.as_u64(), Ordering::AcqRel);
                    if reply_requested {
                        self.shared.reply_now.notify_one();
                    }
                }
            }
        }
    }

    async fn apply(&mut self, lsn: Lsn, message: LogicalMessage) -> anyhow::Result<()> {
        match message {
            LogicalMessage::Begin(begin) => {
                let acks = self
                    .shared
                    .frontier
                    .lock()
                    .map_err(|_| anyhow::anyhow!("frontier lock poisoned"))?
                    .begin();
                if let Ok(mut times) = self.shared.commit_times.lock() {
                    times.begin(
                        begin.final_lsn.as_u64(),
                        pgoutput::pg_epoch_micros_to_unix_millis(begin.commit_time_micros),
                    );
                }
                self.tx = Some(OpenTx {
                    context: TxContext {
                        xid: begin.xid,
                        commit_lsn: begin.final_lsn,
                        commit_time_millis: pgoutput::pg_epoch_micros_to_unix_millis(
                            begin.commit_time_micros,
                        ),
                    },
                    acks,
                });
            }
            LogicalMessage::Commit(commit) => {
                self.tx = None;
                self.shared
                    .frontier
                    .lock()
                    .map_err(|_| anyhow::anyhow!("frontier lock poisoned"))?
                    .commit(commit.end_lsn)?;
            }
            LogicalMessage::Relation(relation) => {
                let key = (relation.namespace.clone(), relation.name.clone());
                let relation = self.relations.apply(relation);
                match self.routes_by_name.get(&key) {
                    Some(target) => {
                        self.refuse_another_relation_under(&relation, target, &key)
                            .await?;
                        let route = TableRoute::new(
                            relation,
                            Arc::clone(&target.topic),
                            &target.key_names,
                        )?;
                        self.routes.insert(route.relation.oid, route);
                    }
                    None => self.follow_renamed_table(relation, &key)?,
                }
            }
            LogicalMessage::Insert(insert) => {
                self.relations.resolve(insert.relation_oid, &insert.new)?;
                let Some(route) = self.routes.get(&insert.relation_oid) else {
                    return Ok(());
                };
                let change = RowChange::insert(&insert.new.0, lsn);
                let record = self
                    .writer
                    .row_event(route, &change, &self.open_tx()?.context)?;
                self.send(record).await?;
            }
            LogicalMessage::Update(update) => {
                self.relations.resolve(update.relation_oid, &update.new)?;
                let Some(route) = self.routes.get(&update.relation_oid) else {
                    return Ok(());
                };
                let route = route.clone();
                self.apply_update(&route, lsn, update).await?;
            }
            LogicalMessage::Delete(delete) => {
                self.relations
                    .resolve(delete.relation_oid, delete.old.tuple())?;
                let Some(route) = self.routes.get(&delete.relation_oid) else {
                    return Ok(());
                };
                let route = route.clone();
                self.send_delete(&route, lsn, &delete.old).await?;
            }
            LogicalMessage::Truncate(truncate) => {
                for oid in truncate.relation_oids {
                    let Some(route) = self.routes.get(&oid) else {
                        continue;
                    };
                    let record = self
                        .writer
                        .truncate_event(route, lsn, &self.open_tx()?.context);
                    self.send(record).await?;
                }
            }
            LogicalMessage::Type(_) | LogicalMessage::Origin(_) | LogicalMessage::Message(_) => {}
        }
        Ok(())
    }

    /// An update; a changed key becomes a delete of the old key and a create of the new one.
    async fn apply_update(
        &mut self,
        route: &TableRoute,
        lsn: Lsn,
        update: pgoutput::Update,
    ) -> anyhow::Result<()> {
        let new = &update.new.0;
        if let Some(old) = &update.old {
            let old_key = self.writer.key(route, &old.tuple().0)?;
            let new_key = self.writer.key(route, new)?;
            if old_key != new_key {
                self.send_delete(route, lsn, old).await?;
                let change = RowChange::key_change_create(new, update.old.as_ref(), lsn);
                let record = self
                    .writer
                    .row_event(route, &change, &self.open_tx()?.context)?;
                return self.send(record).await;
            }
        }
        let change = RowChange::update(new, update.old.as_ref(), lsn);
        let record = self
            .writer
            .row_event(route, &change, &self.open_tx()?.context)?;
        self.send(record).await
    }

    async fn send_delete(
        &mut self,
        route: &TableRoute,
        lsn: Lsn,
        old: &OldTuple,
    ) -> anyhow::Result<()> {
        let change = RowChange::delete(old, lsn);
        // Held until the delete is handed to the producer, so a copy cannot complete (and send
        // its control records) between the decision and the send.
        let copies = Arc::clone(&self.copies);
        let gate = copies.delete_gate().await;
        let context = &self.open_tx()?.context;
        let record = if gate.is_copying(&route.qualified_name()) {
            self.writer
                .delete_during_copy_event(route, &change, context)?
        } else {
            self.writer.row_event(route, &change, context)?
        };
        let tombstone = self.tombstones.then(|| self.writer.tombstone(&record));
        self.send(record).await?;
        if let Some(tombstone) = tombstone {
            self.send(tombstone).await?;
        }
        drop(gate);
        Ok(())
    }

    async fn send(&mut self, record: crate::event::Record) -> anyhow::Result<()> {
        let acks = Arc::clone(&self.open_tx()?.acks);
        if let (Some(counters), Some(_)) = (self.producer.counters(), &record.value) {
            counters.read(&record.topic, record.headers.op.code());
        }
        self.producer.send(&record, &acks).await?;
        Ok(())
    }

    /// A Relation under a name the configuration does not list is either a published table
    /// walsync does not capture (ignored), or a captured table that was renamed (same OID). A
    /// rename stops the source before any change under the new name is sent or confirmed: the
    /// table's topic and its events' `source.table` must agree (the sink routes by topic and
    /// refuses events naming another table), so the operator moves the table to its new name
    /// in the configuration, and the changes since are decoded again under it
    /// (docs/runbook.md, "Schema changes").
    fn follow_renamed_table(
        &mut self,
        relation: Arc<crate::postgres::pgoutput::Relation>,
        name: &(String, String),
    ) -> anyhow::Result<()> {
        let new_name = format!("{}.{}", name.0, name.1);
        let Some(previous) = self.routes.get(&relation.oid) else {
            tracing::warn!(table = %new_name, "published but not configured: its changes are ignored");
            return Ok(());
        };
        let old_name = format!("{}.{}", previous.relation.namespace, previous.relation.name);
        if old_name != new_name {
            anyhow::bail!(
                "captured table {old_name} was renamed to {new_name}; nothing after the rename was sent. \
                 Replace {old_name} with {new_name} in postgres.tables and set tables.\"{new_name}\".index to the old alias \
                 (or backfill into a new index), let the sink apply what topic {} still holds, then start again: \
                 the changes since the rename are captured under the new name (docs/runbook.md, \"Schema changes\")",
                previous.topic
            );
        }
        let key_names: Vec<String> = previous
            .key_columns
            .iter()
            .map(|&index| previous.relation.columns[index].name.clone())
            .collect();
        let topic = Arc::clone(&previous.topic);
        let route = TableRoute::new(relation, topic, &key_names)?;
        self.routes.insert(route.relation.oid, route);
        Ok(())
    }

    /// A configured name now belongs to another relation than the one captured under it: a
    /// captured table renamed onto it (two tables swapping names), the table dropped and created
    /// again, or another table renamed onto its name. Its events would go on to the same topic
    /// and index, whose documents are the other relation's rows (a drop sends no deletes), so
    /// the source stops before sending any of them, with the way out (docs/runbook.md, "Schema
    /// changes"). The point of the change is recognised three ways:
    /// - in this stream, the name was routed to another relation before (the DDL is between);
    /// - in this stream, the relation was routed under another name (renamed onto this one);
    /// - the relation is not the one the name had at the start (`RouteTarget::oid`), and it is
    ///   the one the name has now (the DDL happened since the start). When it is not the one the
    ///   name has now either, the stream is replaying the time before a change made while the
    ///   source was stopped: those events are the old relation's, for the old index, and go on;
    ///   the stop comes where the stream reaches the new relation.
    async fn refuse_another_relation_under(
        &self,
        relation: &crate::postgres::pgoutput::Relation,
        target: &RouteTarget,
        name: &(String, String),
    ) -> anyhow::Result<()> {
        let new_name = format!("{}.{}", name.0, name.1);
        let named = |route: &TableRoute| {
            route.relation.namespace == name.0 && route.relation.name == name.1
        };
        let what = if let Some(previous) = self.routes.get(&relation.oid).filter(|r| !named(r)) {
            format!(
                "captured table {}.{} was renamed to {new_name}, the name of another captured table",
                previous.relation.namespace, previous.relation.name
            )
        } else if let Some((before, _)) = self
            .routes
            .iter()
            .find(|(oid, route)| **oid != relation.oid && named(route))
        {
            format!(
                "the table named {new_name} is now relation {}, no longer relation {before}: it was dropped and created again, \
                 or another table took its name",
                relation.oid
            )
        } else if relation.oid != target.oid && self.catalog_oid(name).await? == Some(relation.oid)
        {
            format!(
                "the table named {new_name} is now relation {}, not the relation {} walsync started with: it was dropped \
                 and created again, or another table took its name",
                relation.oid, target.oid
            )
        } else {
            if relation.oid != target.oid {
                tracing::warn!(table = %new_name, relation = relation.oid, "replaying changes of the relation that had this name before a schema change made while walsync was stopped; the source stops where the stream reaches the new relation");
            }
            return Ok(());
        };
        // The Relation message comes inside the transaction of the first change under the
        // name: moving the slot past that transaction's commit skips it (its changes of other
        // tables that come after this point too).
        let skip_to = self
            .tx
            .as_ref()
            .map(|tx| Lsn::from(tx.context.commit_lsn.as_u64() + 1));
        let skip = match skip_to {
            Some(skip_to) => format!(
                "move the slot past the transaction (SELECT pg_replication_slot_advance('<postgres.slot>', '{skip_to}'); \
                 its changes of other tables after this point are skipped too: touch those rows), "
            ),
            None => String::new(),
        };
        anyhow::bail!(
            "{what}; nothing of it was sent. The indices of the tables involved hold the rows of the relations they had \
             before. Once this process has exited and said that Kafka acknowledged everything: let the sink apply what \
             the topics hold, {skip}start again, and rebuild each involved table's index with \
             `walsync backfill <table> --into <new index>` (docs/runbook.md, \"Schema changes\")"
        )
    }

    /// The OID the table `name` has in the catalog now (`None`: no such table).
    async fn catalog_oid(&self, name: &(String, String)) -> anyhow::Result<Option<u32>> {
        let row = self
            .catalog
            .client()
            .query_opt(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&name.0, &name.1],
            )
            .await
            .context("reading the catalog to tell a replaced table from a replayed one")?;
        Ok(row.map(|row| row.get::<_, u32>(0)))
    }

    fn open_tx(&self) -> anyhow::Result<&OpenTx> {
        self.tx.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "a row change arrived outside a transaction: the replication stream is out of order"
            )
        })
    }
}

/// The copy hooks that turn deletes during a copy into soft tombstones, purged once the copy's
/// rows are all in Kafka (design invariant 5, `crate::source::copies`).
struct SoftTombstoneHooks(Arc<CopiesInProgress>);

impl snapshot::CopyHooks for SoftTombstoneHooks {
    fn copy_started<'a>(&'a self, table: &'a CapturedTable) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.0.copy_started(&table.qualified_name()).await })
    }

    fn copy_completed<'a>(
        &'a self,
        target: &'a snapshot::CopyTarget,
        consistent_point: Lsn,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.0
                .copy_completed(
                    &target.table.info.schema,
                    &target.table.info.name,
                    Arc::clone(&target.topic),
                    consistent_point,
                )
                .await
        })
    }
}
