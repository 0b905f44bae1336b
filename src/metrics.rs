//! Metrics: their names, their descriptions, the Prometheus recorder, and the per-table
//! handles the hot paths count through.
//!
//! Every metric walsync exports is named here (docs/runbook.md, "Metrics and health", lists
//! them) and described in [`describe`]. Names follow Prometheus conventions: a `walsync_`
//! prefix, base units (`_seconds`, `_bytes`), `_total` on counters.
//!
//! Cost: the source handles tens of thousands of events per second, so the event paths never
//! build label strings. Each table's counters are registered once, when the table is first
//! seen, and kept in [`TableCounters`]; counting an event is then one atomic add. The recorder
//! is process-wide (the `metrics` facade has one global recorder): without it, as in library
//! tests, every handle is a no-op.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// Source: WAL → Kafka.
pub const SOURCE_EVENTS_READ: &str = "walsync_source_events_read_total";
pub const SOURCE_EVENTS_PRODUCED: &str = "walsync_source_events_produced_total";
pub const SOURCE_REPLICATION_LAG_BYTES: &str = "walsync_source_replication_lag_bytes";
pub const SOURCE_REPLICATION_LAG_SECONDS: &str = "walsync_source_replication_lag_seconds";
pub const SOURCE_CONFIRMED_LSN: &str = "walsync_source_confirmed_lsn";
pub const SOURCE_KAFKA_DELIVERY_SECONDS: &str = "walsync_source_kafka_delivery_seconds";
pub const SOURCE_KAFKA_OUTSTANDING: &str = "walsync_source_kafka_outstanding_events";
// Snapshot (counted by the snapshot copy).
pub const SNAPSHOT_ROWS_COPIED: &str = "walsync_snapshot_rows_copied_total";
pub const SNAPSHOT_TABLES_DONE: &str = "walsync_snapshot_tables_done_total";
// Sink: Kafka → search.
pub const SINK_EVENTS_CONSUMED: &str = "walsync_sink_events_consumed_total";
pub const SINK_DOCUMENTS_INDEXED: &str = "walsync_sink_documents_indexed_total";
pub const SINK_VERSION_CONFLICTS: &str = "walsync_sink_version_conflicts_total";
pub const SINK_CONSUMER_LAG: &str = "walsync_sink_consumer_lag_messages";
pub const SINK_ASSIGNED_PARTITIONS: &str = "walsync_sink_assigned_partitions";
pub const SINK_BULK_SECONDS: &str = "walsync_sink_bulk_request_duration_seconds";
pub const SINK_BULK_BYTES: &str = "walsync_sink_bulk_request_size_bytes";
pub const SINK_COMMIT_TO_INDEXED_SECONDS: &str = "walsync_sink_commit_to_indexed_seconds";
pub const SINK_RETRIES: &str = "walsync_sink_retries_total";
pub const SINK_DEAD_LETTERS: &str = "walsync_sink_dead_letters_total";
pub const SINK_BREAKER_OPEN: &str = "walsync_sink_breaker_open";
pub const SINK_TOAST_REREADS: &str = "walsync_sink_toast_rereads_total";
// The process.
pub const READY: &str = "walsync_ready";
pub const BUILD_INFO: &str = "walsync_build_info";

/// Every metric name, for tests and the runbook.
pub const ALL: &[&str] = &[
    SOURCE_EVENTS_READ,
    SOURCE_EVENTS_PRODUCED,
    SOURCE_REPLICATION_LAG_BYTES,
    SOURCE_REPLICATION_LAG_SECONDS,
    SOURCE_CONFIRMED_LSN,
    SOURCE_KAFKA_DELIVERY_SECONDS,
    SOURCE_KAFKA_OUTSTANDING,
    SNAPSHOT_ROWS_COPIED,
    SNAPSHOT_TABLES_DONE,
    SINK_EVENTS_CONSUMED,
    SINK_DOCUMENTS_INDEXED,
    SINK_VERSION_CONFLICTS,
    SINK_CONSUMER_LAG,
    SINK_ASSIGNED_PARTITIONS,
    SINK_BULK_SECONDS,
    SINK_BULK_BYTES,
    SINK_COMMIT_TO_INDEXED_SECONDS,
    SINK_RETRIES,
    SINK_DEAD_LETTERS,
    SINK_BREAKER_OPEN,
    SINK_TOAST_REREADS,
    READY,
    BUILD_INFO,
];

/// Latency buckets (seconds): from a millisecond to ten minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];
/// Bulk body sizes (bytes): 1 KiB to 64 MiB.
const BYTES_BUCKETS: &[f64] = &[
    1024.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle)
/// and describes every metric.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
        })
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|error| MetricsError::Recorder(error.to_string()))?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Drains histogram samples into their buckets every few seconds, so memory stays bounded
/// whether or not anyone scrapes. Runs until the task is aborted.
pub async fn run_upkeep(handle: PrometheusHandle) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        ticker.tick().await;
        handle.run_upkeep();
    }
}

/// The `# HELP` text and unit of every metric.
pub fn describe() {
    describe_counter!(
        SOURCE_EVENTS_READ,
        Unit::Count,
        "Change events decoded from the WAL and handed to the Kafka producer, by table and op (c, u, d, t)"
    );
    describe_counter!(
        SOURCE_EVENTS_PRODUCED,
        Unit::Count,
        "Change and snapshot events acknowledged by Kafka (acks=all), by table and op (c, u, d, t, r)"
    );
    describe_gauge!(
        SOURCE_REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "WAL the slot holds back: the server's WAL end (from keepalives and data messages) minus the confirmed flush LSN"
    );
    describe_gauge!(
        SOURCE_REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest transaction not yet confirmed to PostgreSQL (now minus its commit time); 0 when everything is confirmed"
    );
    describe_gauge!(
        SOURCE_CONFIRMED_LSN,
        Unit::Count,
        "The flush LSN last confirmed to PostgreSQL, as a number (pg_wal_lsn_diff(lsn, '0/0'))"
    );
    describe_histogram!(
        SOURCE_KAFKA_DELIVERY_SECONDS,
        Unit::Seconds,
        "Time from handing an event to the producer to Kafka's acknowledgement"
    );
    describe_gauge!(
        SOURCE_KAFKA_OUTSTANDING,
        Unit::Count,
        "Events handed to the producer that Kafka has not acknowledged yet"
    );
    describe_counter!(
        SNAPSHOT_ROWS_COPIED,
        Unit::Count,
        "Rows copied by the initial snapshot or a backfill and acknowledged by Kafka, by table"
    );
    describe_counter!(
        SNAPSHOT_TABLES_DONE,
        Unit::Count,
        "Tables whose snapshot copy is complete"
    );
    describe_counter!(
        SINK_EVENTS_CONSUMED,
        Unit::Count,
        "Change events read from Kafka by the sink, by table and op"
    );
    describe_counter!(
        SINK_DOCUMENTS_INDEXED,
        Unit::Count,
        "Events written to the search server (acknowledged by the bulk API; deletes included), by table and op"
    );
    describe_counter!(
        SINK_VERSION_CONFLICTS,
        Unit::Count,
        "Events the search server already held at an equal or newer version (stale: done, not written), by table"
    );
    describe_gauge!(
        SINK_CONSUMER_LAG,
        Unit::Count,
        "Events in Kafka not yet applied by this sink: the partition's last stable offset minus the group's committed offset, by topic and partition"
    );
    describe_gauge!(
        SINK_ASSIGNED_PARTITIONS,
        Unit::Count,
        "Partitions assigned to this sink by its consumer group (0: not joined yet, or more sinks than partitions)"
    );
    describe_histogram!(
        SINK_BULK_SECONDS,
        Unit::Seconds,
        "Duration of one bulk request, from sending to the whole response read"
    );
    describe_histogram!(
        SINK_BULK_BYTES,
        Unit::Bytes,
        "Size of one bulk request body"
    );
    describe_histogram!(
        SINK_COMMIT_TO_INDEXED_SECONDS,
        Unit::Seconds,
        "From a change's commit in PostgreSQL to its acknowledgement by the bulk API (searches see it after the index's refresh interval); snapshot rows excluded"
    );
    describe_counter!(
        SINK_RETRIES,
        Unit::Count,
        "Bulk requests or items retried (429, 5xx, transport errors, blocked or missing indices) and index checks retried"
    );
    describe_counter!(
        SINK_DEAD_LETTERS,
        Unit::Count,
        "Events written to the dead-letter topic, by source topic"
    );
    describe_gauge!(
        SINK_BREAKER_OPEN,
        Unit::Count,
        "1 when the dead-letter breaker tripped (the sink stops), else 0"
    );
    describe_counter!(
        SINK_TOAST_REREADS,
        Unit::Count,
        "Rows re-read from PostgreSQL to fill unchanged TOAST values that the batch could not give"
    );
    describe_gauge!(READY, Unit::Count, "1 when /readyz answers 200, else 0");
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1; the label carries the walsync version"
    );
}

/// The index of an op code in a [`TableCounters`] array.
fn op_slot(code: &str) -> Option<usize> {
    OPS.iter().position(|op| *op == code)
}

/// The ops counted per table: Debezium's codes.
const OPS: [&str; 5] = ["c", "u", "d", "t", "r"];

/// One counter per op for one table, registered once.
#[derive(Clone)]
pub struct TableCounters {
    by_op: [Counter; 5],
}

impl TableCounters {
    /// Registers `name{table=…, op=…}` for every op.
    pub fn new(name: &'static str, table: &str) -> Self {
        Self {
            by_op: OPS.map(|op| metrics::counter!(name, "table" => table.to_owned(), "op" => op)),
        }
    }

    /// Counts `count` events of op `code` (c, u, d, t, r); other codes are ignored.
    pub fn add(&self, code: &str, count: u64) {
        if let Some(slot) = op_slot(code) {
            self.by_op[slot].increment(count);
        }
    }
}

/// Per-table counters of the source, looked up by topic (every table has its own topic).
#[derive(Default)]
pub struct SourceCounters {
    by_topic: std::collections::HashMap<Box<str>, (TableCounters, TableCounters)>,
}

impl SourceCounters {
    /// Registers `read` and `produced` counters for each `(table, topic)`.
    pub fn new<T: AsRef<str>, U: AsRef<str>>(tables: impl IntoIterator<Item = (T, U)>) -> Self {
        let by_topic = tables
            .into_iter()
            .map(|(table, topic)| {
                (
                    Box::from(topic.as_ref()),
                    (
                        TableCounters::new(SOURCE_EVENTS_READ, table.as_ref()),
                        TableCounters::new(SOURCE_EVENTS_PRODUCED, table.as_ref()),
                    ),
                )
            })
            .collect();
        Self { by_topic }
    }

    /// One event read from the WAL for `topic`.
    pub fn read(&self, topic: &str, op: &str) {
        if let Some((read, _)) = self.by_topic.get(topic) {
            read.add(op, 1);
        }
    }

    /// One event acknowledged by Kafka on `topic`.
    pub fn produced(&self, topic: &str, op: &str) {
        if let Some((_, produced)) = self.by_topic.get(topic) {
            produced.add(op, 1);
        }
    }
}

/// Commit times of the transactions not yet confirmed, oldest first, for the replication lag
/// in seconds. Bounded: transactions that begin within [`CommitTimes::RESOLUTION_MS`] of the
/// newest entry share it (its time is the older one, so the lag is never under-reported).
#[derive(Debug, Default)]
pub struct CommitTimes {
    /// (commit LSN of the newest transaction in the group, commit time of its oldest, ms).
    entries: std::collections::VecDeque<(u64, i64)>,
}

impl CommitTimes {
    pub const RESOLUTION_MS: i64 = 100;

    /// A transaction began; it commits at `commit_lsn`, at `commit_ms` (Unix milliseconds).
    pub fn begin(&mut self, commit_lsn: u64, commit_ms: i64) {
        match self.entries.back_mut() {
            Some((lsn, time)) if commit_ms - *time < Self::RESOLUTION_MS => {
                *lsn = (*lsn).max(commit_lsn);
            }
            _ => self.entries.push_back((commit_lsn, commit_ms)),
        }
    }

    /// Forgets the transactions confirmed by `flushed` (a transaction's commit record starts
    /// below the end LSN that confirms it) and returns the commit time of the oldest left.
    pub fn oldest_unconfirmed(&mut self, flushed: u64) -> Option<i64> {
        while self.entries.front().is_some_and(|(lsn, _)| *lsn < flushed) {
            self.entries.pop_front();
        }
        self.entries.front().map(|(_, time)| *time)
    }
}

/// Sets the source's progress gauges: the confirmed LSN, the WAL the slot holds back, and the
/// age of the oldest unconfirmed transaction (`None`: everything is confirmed).
pub fn record_source_progress(
    confirmed: u64,
    server_wal_end: u64,
    oldest_unconfirmed_ms: Option<i64>,
) {
    metrics::gauge!(SOURCE_CONFIRMED_LSN).set(confirmed as f64);
    metrics::gauge!(SOURCE_REPLICATION_LAG_BYTES)
        .set(server_wal_end.saturating_sub(confirmed) as f64);
    let lag_seconds = oldest_unconfirmed_ms.map_or(0.0, |commit_ms| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |now| now.as_millis() as i64);
        (now - commit_ms).max(0) as f64 / 1000.0
    });
    metrics::gauge!(SOURCE_REPLICATION_LAG_SECONDS).set(lag_seconds);
}

/// Per-table handles of the sink, registered when it first meets the table.
pub struct SinkTableMetrics {
    pub consumed: TableCounters,
    pub indexed: TableCounters,
    pub conflicts: Counter,
    commit_to_indexed: metrics::Histogram,
}

impl SinkTableMetrics {
    pub fn new(table: &str) -> Self {
        Self {
            consumed: TableCounters::new(SINK_EVENTS_CONSUMED, table),
            indexed: TableCounters::new(SINK_DOCUMENTS_INDEXED, table),
            conflicts: metrics::counter!(SINK_VERSION_CONFLICTS, "table" => table.to_owned()),
            commit_to_indexed: metrics::histogram!(SINK_COMMIT_TO_INDEXED_SECONDS),
        }
    }

    /// Events the bulk API acknowledged: counted, and their commit → indexed latency recorded
    /// (snapshot rows excluded: their time is when they were read, not committed).
    pub fn written(&self, op: &str, commit_ms: i64, now_ms: i64) {
        self.indexed.add(op, 1);
        if op != "r" {
            self.commit_to_indexed
                .record((now_ms - commit_ms).max(0) as f64 / 1000.0);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        for name in ALL {
            assert!(name.starts_with("walsync_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
        for counter in [
            SOURCE_EVENTS_READ,
            SOURCE_EVENTS_PRODUCED,
            SNAPSHOT_ROWS_COPIED,
            SNAPSHOT_TABLES_DONE,
            SINK_EVENTS_CONSUMED,
            SINK_DOCUMENTS_INDEXED,
            SINK_VERSION_CONFLICTS,
            SINK_RETRIES,
            SINK_DEAD_LETTERS,
            SINK_TOAST_REREADS,
        ] {
            assert!(counter.ends_with("_total"), "{counter}");
        }
        let unique: std::collections::HashSet<_> = ALL.iter().collect();
        assert_eq!(unique.len(), ALL.len(), "names are unique");
    }

    /// Collects what `describe` describes, with units.
    #[derive(Default)]
    struct Descriptions(std::sync::Mutex<Vec<(String, Option<Unit>)>>);

    impl Descriptions {
        fn add(&self, key: metrics::KeyName, unit: Option<Unit>) {
            self.0
                .lock()
                .expect("not poisoned")
                .push((key.as_str().to_owned(), unit));
        }
    }

    impl metrics::Recorder for Descriptions {
        fn describe_counter(
            &self,
            key: metrics::KeyName,
            unit: Option<Unit>,
            _: metrics::SharedString,
        ) {
            self.add(key, unit);
        }
        fn describe_gauge(
            &self,
            key: metrics::KeyName,
            unit: Option<Unit>,
            _: metrics::SharedString,
        ) {
            self.add(key, unit);
        }
        fn describe_histogram(
            &self,
            key: metrics::KeyName,
            unit: Option<Unit>,
            _: metrics::SharedString,
        ) {
            self.add(key, unit);
        }
        fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[test]
    fn every_metric_is_described_once_with_a_unit_that_matches_its_name() {
        let recorder = Descriptions::default();
        metrics::with_local_recorder(&recorder, describe);
        let described = recorder.0.into_inner().expect("not poisoned");
        let names: Vec<&str> = described.iter().map(|(name, _)| name.as_str()).collect();
        let mut sorted_names = names.clone();
        sorted_names.sort_unstable();
        let mut all = ALL.to_vec();
        all.sort_unstable();
        assert_eq!(
            sorted_names, all,
            "described exactly the metrics in ALL, once each"
        );
        for (name, unit) in &described {
            let expected = if name.ends_with("_seconds") {
                Unit::Seconds
            } else if name.ends_with("_bytes") {
                Unit::Bytes
            } else {
                Unit::Count
            };
            assert_eq!(*unit, Some(expected), "{name}");
        }
    }

    #[test]
    fn every_op_code_has_a_counter_and_others_are_ignored() {
        for op in ["c", "u", "d", "t", "r"] {
            assert!(op_slot(op).is_some(), "{op}");
        }
        assert_eq!(op_slot("x"), None);
        // Without a recorder the handles are no-ops: counting must not panic.
        let counters = SourceCounters::new([("public.t", "p.public.t")]);
        counters.read("p.public.t", "c");
        counters.produced("unknown.topic", "u");
    }

    #[test]
    fn the_oldest_unconfirmed_transaction_goes_once_confirmed() {
        let mut times = CommitTimes::default();
        times.begin(100, 1_000);
        times.begin(200, 1_050); // within the resolution: shares the first entry
        times.begin(300, 2_000);
        assert_eq!(times.oldest_unconfirmed(50), Some(1_000));
        assert_eq!(
            times.oldest_unconfirmed(150),
            Some(1_000),
            "the group's newest (200) is not confirmed yet"
        );
        assert_eq!(
            times.oldest_unconfirmed(300),
            Some(2_000),
            "a commit at the flush LSN is not confirmed"
        );
        assert_eq!(times.oldest_unconfirmed(301), None);
    }
}
