//! `walsync verify`: the comparison core ([`crate::sink::compare`]) on a live system, while the
//! pipeline keeps running.
//!
//! A table and its index are never read at the same instant, so verify fixes one point and
//! makes both sides agree on it:
//!
//! 1. A temporary logical slot with an exported snapshot gives a consistent point `cp`; a
//!    repeatable-read transaction imports the snapshot, so the table is read exactly as of
//!    `cp` (every transaction whose commit record starts before `cp`, nothing after).
//! 2. Verify waits until walsync's slot has `confirmed_flush_lsn >= cp` (the source confirms
//!    only what Kafka has acknowledged, so Kafka holds every change before `cp`), then reads
//!    the high watermarks of the tables' topics and waits until the sink's consumer group
//!    (`sink.group_id`) has committed offsets up to them (the sink commits only what it wrote).
//! 3. The comparison skips documents whose stored commit LSN is `>= cp` (and their rows):
//!    they were written by changes the snapshot does not contain.
//! 4. What still differs can be lag of another kind: a row deleted after `cp` is in the
//!    snapshot while its document is already gone. Every differing id is therefore checked
//!    again under a second, fresh snapshot (same waiting); only ids that differ both times
//!    are reported.
//!
//! The snapshot transaction holds back VACUUM's horizon while verify runs (as a snapshot copy
//! does). Exit codes: 0 no divergence, 1 divergence, 2 verify could not run.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use elasticsearch::Elasticsearch;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::split_table_name;
use crate::config::{Config, TableConfig};
use crate::kafka::consumer::{GroupPosition, group_positions};
use crate::kafka::producer::client_config;
use crate::kafka::topics::topic_name;
use crate::lsn::Lsn;
use crate::postgres::catalog::{Catalog, SlotWait};
use crate::postgres::replication::{ConnectParams, quote_identifier};
use crate::postgres::types::CodecOptions;
use crate::shell::cli::VerifyArgs;
use crate::sink::compare::{
    CompareError, ComparisonOptions, ComparisonReport, ComparisonTarget, compare_table,
};
use crate::sink::index::{alias_name, build_client, refresh};
use crate::source::snapshot;

/// Exit code when verify found divergence.
const DIVERGENCE: u8 = 1;
/// Exit code when verify could not run.
const ERROR: u8 = 2;

/// How often the waits look again.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Deadline of one Kafka metadata or offset request.
const KAFKA_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs verify and prints its report; see the module doc for the exit codes.
pub async fn run(config: &Config, args: &VerifyArgs) -> ExitCode {
    match verify(config, args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(DIVERGENCE),
        Err(error) => {
            println!("verify: could not run: {error:#}");
            eprintln!("error: {error:#}");
            ExitCode::from(ERROR)
        }
    }
}

/// One table to verify, with everything resolved from the configuration and the catalog.
struct Target {
    schema: String,
    table: String,
    key_columns: Vec<String>,
    table_config: TableConfig,
    alias: String,
    topic: String,
}

impl Target {
    fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// A read-only transaction that imported a slot's exported snapshot.
struct Snapshot {
    worker: Catalog,
    consistent_point: Lsn,
}

/// Returns whether everything compared equal.
async fn verify(config: &Config, args: &VerifyArgs) -> anyhow::Result<bool> {
    if let Some(fraction) = args.sample {
        if !(fraction > 0.0 && fraction <= 1.0) {
            bail!("--sample must be above 0 and at most 1 (a fraction of the ids), not {fraction}");
        }
    }
    let params = crate::postgres::replication::ConnectParams::from_config(config)?;
    let monitor = Catalog::connect(&params).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {}:{} as {}",
            params.host, params.port, params.user
        )
    })?;
    let targets = resolve_targets(&monitor, config, &args.tables).await?;
    let search = build_client(&config.elasticsearch)?;
    let deadline = Duration::from_secs(args.wait_secs);

    let first = take_snapshot(&params, &config.postgres.slot).await?;
    println!(
        "snapshot at {}; waiting for the source and the sink to pass it",
        first.consistent_point
    );
    wait_for_pipeline(&monitor, config, &targets, first.consistent_point, deadline).await?;
    let first_reports = compare_all(&first, &search, &targets, args.sample).await?;
    drop(first);

    let suspects: Vec<usize> = first_reports
        .iter()
        .enumerate()
        .filter(|(_, report)| !report.is_equal())
        .map(|(position, _)| position)
        .collect();
    let mut final_reports = first_reports.clone();
    // Ids that differed under one snapshot only, per table: changes in flight.
    let mut in_flight = vec![0_usize; targets.len()];
    if !suspects.is_empty() {
        let second = take_snapshot(&params, &config.postgres.slot).await?;
        println!(
            "{} table(s) differ; checking the differing ids again under a second snapshot at {}",
            suspects.len(),
            second.consistent_point
        );
        wait_for_pipeline(
            &monitor,
            config,
            &targets,
            second.consistent_point,
            deadline,
        )
        .await?;
        let again: Vec<&Target> = suspects
            .iter()
            .map(|&position| &targets[position])
            .collect();
        for (&position, target) in suspects.iter().zip(again) {
            let report = compare_one(&second, &search, target, args.sample).await?;
            let confirmed = confirmed_differences(&first_reports[position], report.clone());
            in_flight[position] = differing_ids(&first_reports[position])
                .union(&differing_ids(&report))
                .count()
                - differing_ids(&confirmed).len();
            final_reports[position] = confirmed;
        }
    }

    let mut equal = true;
    for (report, in_flight) in final_reports.iter().zip(in_flight) {
        print_report(report, in_flight, args.show);
        equal &= report.is_equal();
    }
    let divergent = final_reports.iter().filter(|r| !r.is_equal()).count();
    if equal {
        println!("verify: no divergence in {} table(s)", final_reports.len());
    } else {
        let count = |pick: fn(&ComparisonReport) -> usize| -> usize {
            final_reports.iter().map(pick).sum()
        };
        println!(
            "verify: DIVERGENCE in {divergent} of {} table(s): {} missing, {} extra, {} different",
            final_reports.len(),
            count(|r| r.missing.len()),
            count(|r| r.extra.len()),
            count(|r| r.different.len()),
        );
    }
    Ok(equal)
}

/// The configured tables (or those named by `--table`) with their keys, aliases and topics.
async fn resolve_targets(
    catalog: &Catalog,
    config: &Config,
    only: &[String],
) -> anyhow::Result<Vec<Target>> {
    let configured: Vec<(String, String)> = config
        .postgres
        .tables
        .iter()
        .map(|name| split_table_name(name))
        .collect();
    let wanted: Vec<(String, String)> = if only.is_empty() {
        configured.clone()
    } else {
        only.iter().map(|name| split_table_name(name)).collect()
    };
    if wanted.is_empty() {
        bail!("no tables to verify: postgres.tables is empty");
    }
    let mut targets = Vec::with_capacity(wanted.len());
    for (schema, table) in wanted {
        let qualified = format!("{schema}.{table}");
        if !configured.contains(&(schema.clone(), table.clone())) {
            bail!(
                "table {qualified} is not in postgres.tables; verify compares the tables walsync captures"
            );
        }
        let table_config = config.tables.get(&qualified).cloned().unwrap_or_default();
        let info = catalog
            .table(&schema, &table)
            .await?
            .with_context(|| format!("table {qualified} does not exist"))?;
        let key_columns = if table_config.key_columns.is_empty() {
            info.primary_key
        } else {
            table_config.key_columns.clone()
        };
        if key_columns.is_empty() {
            bail!(
                "table {qualified} has no primary key and no tables.\"{qualified}\".key_columns: its documents have no id"
            );
        }
        targets.push(Target {
            alias: alias_name(&config.elasticsearch, &table_config, &schema, &table),
            topic: topic_name(&config.kafka.topic_prefix, &schema, &table),
            schema,
            table,
            key_columns,
            table_config,
        });
    }
    Ok(targets)
}

/// One read-only repeatable-read transaction under a fresh temporary slot's exported snapshot.
async fn take_snapshot(params: &ConnectParams, slot: &str) -> anyhow::Result<Snapshot> {
    let imported = snapshot::import_snapshot(params, slot, "verify", 1).await?;
    let consistent_point = imported.consistent_point();
    let worker = imported
        .into_workers()
        .pop()
        .context("the snapshot has no worker connection")?;
    Ok(Snapshot {
        worker,
        consistent_point,
    })
}

/// Waits until everything before `cp` is in Kafka and applied by the sink.
async fn wait_for_pipeline(
    monitor: &Catalog,
    config: &Config,
    targets: &[Target],
    consistent_point: Lsn,
    deadline: Duration,
) -> anyhow::Result<()> {
    wait_for_source(monitor, &config.postgres.slot, consistent_point, deadline).await?;
    let topics: Vec<String> = targets.iter().map(|target| target.topic.clone()).collect();
    let mut consumer_config = client_config(&config.kafka)?;
    consumer_config
        .set("group.id", &config.sink.group_id)
        .set("enable.auto.commit", "false");
    let group = config.sink.group_id.clone();
    tokio::task::spawn_blocking(move || wait_for_sink(consumer_config, &group, &topics, deadline))
        .await
        .context("the Kafka offset check panicked")?
}

/// Waits until walsync's slot has confirmed `cp` (`Catalog::wait_slot_confirmed`).
async fn wait_for_source(
    monitor: &Catalog,
    slot: &str,
    consistent_point: Lsn,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    match monitor
        .wait_slot_confirmed(slot, consistent_point, until, |_| {})
        .await?
    {
        SlotWait::Confirmed => Ok(()),
        SlotWait::Missing => bail!(
            "walsync's slot {slot} does not exist: is walsync's source set up (postgres.slot)?"
        ),
        SlotWait::TimedOut {
            confirmed,
            read_by_nobody,
        } => bail!(
            "the source did not pass the snapshot within {} s: slot {slot} has confirmed \
             {confirmed}, the snapshot is at {consistent_point} ({} bytes behind{}). Is the \
             source running and Kafka reachable? (walsync slot status; --wait-secs waits longer)",
            deadline.as_secs(),
            consistent_point.as_u64().saturating_sub(confirmed.as_u64()),
            if read_by_nobody {
                "; no walsender uses the slot"
            } else {
                ""
            }
        ),
    }
}

/// Reads the topics' high watermarks once, then waits until the sink's group has committed
/// offsets up to them. Blocking: runs on a blocking thread.
fn wait_for_sink(
    consumer_config: rdkafka::ClientConfig,
    group: &str,
    topics: &[String],
    deadline: Duration,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = consumer_config
        .create()
        .context("cannot create the Kafka client for the offset check (kafka.brokers)")?;
    let mut partitions: Vec<(String, i32)> = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), KAFKA_REQUEST_TIMEOUT)
            .with_context(|| format!("cannot read the metadata of topic {topic}"))?;
        let count = metadata
            .topics()
            .first()
            .map(|topic| topic.partitions().len() as i32)
            .unwrap_or(0);
        partitions.extend((0..count).map(|partition| (topic.clone(), partition)));
    }
    let read_positions = || {
        group_positions(&consumer, &partitions, KAFKA_REQUEST_TIMEOUT)
            .with_context(|| format!("cannot read the position of group {group}"))
    };
    // The ends as of now: what the sink must have applied. A partition the group never
    // committed counts from its log start as of now too, not from a later one (retention
    // moving on is no progress of the sink).
    let marks: Vec<(i64, i64)> = read_positions()?.iter().map(|p| (p.low, p.high)).collect();
    let start = Instant::now();
    loop {
        let behind: Vec<String> = read_positions()?
            .into_iter()
            .zip(&marks)
            .map(|(position, (low, target))| {
                (
                    GroupPosition {
                        low: *low,
                        ..position
                    },
                    target,
                )
            })
            .filter(|(position, target)| position.behind(**target) > 0)
            .map(|(position, target)| {
                format!(
                    "{}[{}] committed {} of {target} ({} behind)",
                    position.topic,
                    position.partition,
                    position
                        .committed
                        .map_or_else(|| "nothing".into(), |o| o.to_string()),
                    position.behind(*target)
                )
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= deadline {
            bail!(
                "the sink (consumer group {group}) did not reach the snapshot within {} s: {}. \
                 Is the sink running? (--wait-secs waits longer)",
                deadline.as_secs(),
                behind.join("; ")
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

async fn compare_all(
    snapshot: &Snapshot,
    search: &Elasticsearch,
    targets: &[Target],
    sample: Option<f64>,
) -> anyhow::Result<Vec<ComparisonReport>> {
    let mut reports = Vec::with_capacity(targets.len());
    for target in targets {
        reports.push(compare_one(snapshot, search, target, sample).await?);
    }
    Ok(reports)
}

/// Compares one table as of the snapshot, skipping documents written at or after `cp`.
async fn compare_one(
    snapshot: &Snapshot,
    search: &Elasticsearch,
    target: &Target,
    sample: Option<f64>,
) -> anyhow::Result<ComparisonReport> {
    // Searches see what the sink wrote only after a refresh.
    if let Err(error) = refresh(search, &target.alias).await {
        tracing::debug!(%error, alias = %target.alias, "refresh failed; the comparison says why");
    }
    let comparison = ComparisonTarget {
        schema: &target.schema,
        table: &target.table,
        key_columns: &target.key_columns,
        table_config: &target.table_config,
        alias: &target.alias,
    };
    let options = ComparisonOptions {
        sample_fraction: sample,
        // A commit at cp itself is not in the snapshot (design invariant 2).
        max_commit_lsn: Some(snapshot.consistent_point.as_u64().saturating_sub(1)),
        codec: CodecOptions::default(),
    };
    match compare_table(snapshot.worker.client(), search, &comparison, &options).await {
        Ok(report) => Ok(report),
        Err(CompareError::IndexNotFound { alias }) => {
            // The sink creates the index with a table's first event: an empty table has none.
            if table_is_empty(snapshot, target).await? {
                Ok(ComparisonReport {
                    table: target.qualified(),
                    ..ComparisonReport::default()
                })
            } else {
                bail!(
                    "index {alias} does not exist but table {} has rows: is the sink running \
                     (and elasticsearch.index_prefix / tables.\"{}\".index right)?",
                    target.qualified(),
                    target.qualified()
                )
            }
        }
        Err(error) => Err(error).with_context(|| {
            format!(
                "cannot compare {} with {}",
                target.qualified(),
                target.alias
            )
        }),
    }
}

async fn table_is_empty(snapshot: &Snapshot, target: &Target) -> anyhow::Result<bool> {
    let sql = format!(
        "SELECT NOT EXISTS (SELECT 1 FROM {}.{})",
        quote_identifier(&target.schema),
        quote_identifier(&target.table)
    );
    Ok(snapshot.worker.client().query_one(&sql, &[]).await?.get(0))
}

/// Every id a report names: missing, extra or different.
fn differing_ids(report: &ComparisonReport) -> BTreeSet<&str> {
    report
        .missing
        .iter()
        .chain(&report.extra)
        .map(String::as_str)
        .chain(report.different.iter().map(|(id, _)| id.as_str()))
        .collect()
}

/// The second pass's differences restricted to ids that differed in the first pass too.
fn confirmed_differences(
    first: &ComparisonReport,
    mut second: ComparisonReport,
) -> ComparisonReport {
    let earlier = differing_ids(first);
    second.missing.retain(|id| earlier.contains(id.as_str()));
    second.extra.retain(|id| earlier.contains(id.as_str()));
    second
        .different
        .retain(|(id, _)| earlier.contains(id.as_str()));
    second
}

/// One table's result; the counts are those of the last comparison of the table.
fn print_report(report: &ComparisonReport, in_flight: usize, show: usize) {
    let skipped = if report.skipped_newer > 0 {
        format!(
            " ({} newer than the snapshot, skipped)",
            report.skipped_newer
        )
    } else {
        String::new()
    };
    println!(
        "{}: {} rows, {} documents{skipped}",
        report.table, report.rows, report.documents
    );
    print_ids("missing", &report.missing, show);
    print_ids("extra", &report.extra, show);
    let different: Vec<String> = report
        .different
        .iter()
        .map(|(id, fields)| format!("{id} [{}]", fields.join(", ")))
        .collect();
    print_ids("different", &different, show);
    if in_flight > 0 {
        println!(
            "  ({in_flight} id(s) differed under one of the two snapshots only: changes in flight, not divergence)"
        );
    }
}

fn print_ids(kind: &str, ids: &[String], show: usize) {
    if ids.is_empty() {
        println!("  {kind}: 0");
        return;
    }
    let shown: Vec<&str> = ids.iter().take(show).map(String::as_str).collect();
    let more = if ids.len() > shown.len() {
        format!(", … ({} more)", ids.len() - shown.len())
    } else {
        String::new()
    };
    println!("  {kind}: {}: {}{more}", ids.len(), shown.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(missing: &[&str], extra: &[&str], different: &[&str]) -> ComparisonReport {
        ComparisonReport {
            table: "public.t".into(),
            missing: missing.iter().map(|id| id.to_string()).collect(),
            extra: extra.iter().map(|id| id.to_string()).collect(),
            different: different
                .iter()
                .map(|id| (id.to_string(), vec!["f".to_owned()]))
                .collect(),
            ..ComparisonReport::default()
        }
    }

    #[test]
    fn only_ids_that_differ_under_both_snapshots_are_reported() {
        // 1 was deleted after the first snapshot (lag); 2 diverges both times, once as
        // different and once as missing; 3 appears only in the second pass (a change after the
        // first snapshot, not yet re-checked): none but 2 is reported.
        let first = report(&["1"], &[], &["2"]);
        let second = report(&["2", "3"], &["4"], &[]);
        let confirmed = confirmed_differences(&first, second);
        assert_eq!(confirmed.missing, ["2"]);
        assert!(confirmed.extra.is_empty());
        assert!(confirmed.different.is_empty());
    }

    #[test]
    fn no_first_differences_means_nothing_confirmed() {
        let confirmed = confirmed_differences(&report(&[], &[], &[]), report(&["9"], &[], &["8"]));
        assert!(confirmed.is_equal());
    }
}
