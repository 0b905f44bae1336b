//! Snapshots: the initial copy of each table, versioned just below a consistent point so it can
//! run while streaming continues (design invariant 2).
//!
//! Every table that has no completed copy recorded for the slot (`walsync.snapshot_progress`)
//! is split into chunks of heap blocks ([`plan`]), persisted in `walsync.snapshot_chunks`.
//! The chunks are copied under the exported snapshot of a fresh *temporary* slot, whose
//! consistent point is `cp`; its rows become `op: "r"` events with `commit_lsn = cp − 1`
//! ([`snapshot_version`]). Any streamed change the snapshot does not contain commits at or
//! after `cp` and wins over the row, while a change it does contain (commit before `cp`) is
//! overwritten by the row it is part of: so the copy and the stream run at the same time, in
//! any order.
//!
//! `snapshot.workers` connections import the same exported snapshot and take chunks from one
//! queue. Each chunk is read with `COPY (SELECT …) TO STDOUT` in text format; the rows are
//! decoded ([`copy_text`]) into exactly the text the stream's codec reads, under the same
//! session settings, and handed to the producer, which waits when its queue is full: memory
//! stays bounded whatever the table size. A chunk is recorded complete only once Kafka has
//! acknowledged every one of its rows, and a table once all its chunks are.
//!
//! A snapshot is used for at most `snapshot.max_snapshot_age_mins`: then the workers finish
//! their chunk and the remaining chunks continue under a fresh temporary slot's snapshot, at
//! its own `cp − 1`. A restart does the same with the chunks left by a crash; completed chunks
//! are not copied again. That is safe across snapshots: a row that moved between chunks
//! (an update) after the first snapshot's `cp` is streamed by the main slot, whose version
//! wins over every snapshot row read before it (docs/design.md, "Chunked copies").
//!
//! Hooks ([`CopyHooks`]) mark where a table's copy starts and where it is complete, for the
//! soft tombstones deletes need while a table is copied.
//!
//! Not built yet: soft tombstones for deletes during a copy (until then a row deleted during
//! a copy can come back if its snapshot row reaches the index more than `index.gc_deletes`
//! after the delete), and `walsync backfill`.

pub mod copy_text;
pub mod plan;
mod progress;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::config::SnapshotConfig;
use crate::event::TxContext;
use crate::kafka::frontier::TxAcks;
use crate::kafka::producer::EventProducer;
use crate::lsn::Lsn;
use crate::postgres::catalog::Catalog;
use crate::postgres::events::{EventWriter, RowChange, TableRoute};
use crate::postgres::pgoutput::{Column, Relation, ReplicaIdentity, TupleValue};
use crate::postgres::replication::{
    ConnectParams, ReplicationClient, SlotSnapshot, quote_identifier, quote_literal,
};
use crate::postgres::slot::CapturedTable;

use plan::Chunk;
use progress::{CopyProgress, TableProgress};

/// Rows counted towards progress at a time.
const PROGRESS_BATCH: u64 = 1_024;

/// The version of every row read under a snapshot consistent at `consistent_point`: just below
/// it, so a streamed commit at exactly `cp` (the first the snapshot does not contain) wins.
pub fn snapshot_version(consistent_point: Lsn) -> Lsn {
    Lsn(consistent_point.as_u64().saturating_sub(1))
}

/// How copies run (`[snapshot]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSettings {
    pub workers: usize,
    pub chunk_rows: u64,
    /// How long one exported snapshot is used; `None`: for the whole copy.
    pub max_age: Option<Duration>,
}

impl SnapshotSettings {
    pub fn from_config(config: &SnapshotConfig) -> Self {
        Self {
            workers: config.workers.max(1),
            chunk_rows: config.chunk_rows.max(1),
            max_age: config.max_snapshot_age(),
        }
    }
}

/// Where a table's copy starts and where it is complete. The soft tombstones of deletes
/// during copies (design invariant 5, `crate::source::copies`) hang on these.
pub trait CopyHooks: Send + Sync {
    /// Called for each table to be copied in this process run, before the snapshot its first
    /// rows are read under exists (so before any of its rows is produced, and before any
    /// change after that snapshot's `cp` is streamed).
    fn copy_started<'a>(&'a self, _table: &'a CapturedTable) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Called once every row of every chunk of the table has been acknowledged by Kafka,
    /// *before* the table is recorded as copied: a crash in between copies the table (and
    /// calls this) again. `consistent_point` is the newest `cp` its chunks were read under:
    /// every snapshot row of the table carries a version below it.
    fn copy_completed<'a>(
        &'a self,
        _target: &'a CopyTarget,
        _consistent_point: Lsn,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Hooks that do nothing.
pub struct NoHooks;

impl CopyHooks for NoHooks {}

/// A table to copy and the topic its events go to.
#[derive(Debug, Clone)]
pub struct CopyTarget {
    pub table: CapturedTable,
    pub topic: Arc<str>,
}

/// Everything a copy needs besides its tables; cheap to clone.
#[derive(Clone)]
pub struct CopyJob {
    pub params: ConnectParams,
    /// The main slot: it names the progress records and the temporary slots.
    pub slot: String,
    pub settings: SnapshotSettings,
    pub writer: EventWriter,
    pub producer: Arc<EventProducer>,
    pub hooks: Arc<dyn CopyHooks>,
}

/// Worker transactions that imported one exported snapshot.
pub struct ImportedSnapshot {
    workers: Vec<Catalog>,
    consistent_point: Lsn,
    imported_at: Instant,
}

impl ImportedSnapshot {
    /// The worker connections, each inside a transaction that imported the snapshot.
    pub fn into_workers(self) -> Vec<Catalog> {
        self.workers
    }

    pub fn consistent_point(&self) -> Lsn {
        self.consistent_point
    }

    /// The version of every row read under this snapshot.
    pub fn version(&self) -> Lsn {
        snapshot_version(self.consistent_point)
    }
}

/// Creates a temporary slot with an exported snapshot and imports that snapshot into
/// `workers` new read-only transactions. The temporary slot (and its connection) goes once
/// the snapshot is imported: the workers' transactions keep it. `purpose` names the slot
/// (`<slot>_<purpose>_<pid>_<n>`: `snapshot`, `backfill`, `verify`).
pub async fn import_snapshot(
    params: &ConnectParams,
    slot: &str,
    purpose: &str,
    workers: usize,
) -> anyhow::Result<ImportedSnapshot> {
    let mut exporter = ReplicationClient::connect(params).await.context(
        "cannot open a replication connection for the snapshot (the role needs the REPLICATION attribute)",
    )?;
    let temporary = temporary_slot_name(slot, purpose);
    let created = exporter
        .create_logical_slot(&temporary, true, SlotSnapshot::Export)
        .await
        .with_context(|| format!("cannot create the temporary slot {temporary}"))?;
    let snapshot = created
        .snapshot_name
        .context("CREATE_REPLICATION_SLOT exported no snapshot")?;
    let connecting = (0..workers.max(1)).map(|_| import_into_new_worker(params, &snapshot));
    let workers = futures_util::future::try_join_all(connecting).await?;
    drop(exporter);
    tracing::info!(
        consistent_point = %created.consistent_point,
        workers = workers.len(),
        purpose,
        "snapshot imported"
    );
    Ok(ImportedSnapshot {
        workers,
        consistent_point: created.consistent_point,
        imported_at: Instant::now(),
    })
}

/// `<slot>_<purpose>_<pid>_<n>`, within PostgreSQL's 63-byte limit; `n` counts this process's
/// temporary slots, so a new one never collides with one whose backend is still going away.
fn temporary_slot_name(slot: &str, purpose: &str) -> String {
    const MAX_SLOT_NAME: usize = 63;
    static TEMPORARY_SLOTS: AtomicU64 = AtomicU64::new(0);
    let suffix = format!(
        "_{purpose}_{}_{}",
        std::process::id(),
        TEMPORARY_SLOTS.fetch_add(1, Ordering::Relaxed)
    );
    let keep = MAX_SLOT_NAME.saturating_sub(suffix.len()).min(slot.len());
    // Slot names are ASCII ([a-z0-9_]), so any byte is a boundary.
    format!("{}{suffix}", &slot[..keep])
}

async fn import_into_new_worker(params: &ConnectParams, snapshot: &str) -> anyhow::Result<Catalog> {
    let worker = Catalog::connect(params)
        .await
        .context("cannot open a snapshot worker's connection")?;
    worker
        .client()
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .context("cannot import the exported snapshot")?;
    Ok(worker)
}

/// The tables of `tables` whose copy for `slot` is not recorded as complete.
pub async fn tables_to_copy(
    catalog: &Catalog,
    slot: &str,
    tables: &[CapturedTable],
) -> Result<Vec<CapturedTable>, tokio_postgres::Error> {
    let rows = catalog
        .client()
        .query(
            "SELECT table_name FROM walsync.snapshot_progress WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let done: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    Ok(tables
        .iter()
        .filter(|table| !done.contains(&table.qualified_name()))
        .cloned()
        .collect())
}

/// Forgets every recorded copy of `slot`, so every table is copied again.
pub async fn forget_copies(catalog: &Catalog, slot: &str) -> Result<(), tokio_postgres::Error> {
    plan::forget_all(catalog.client(), slot).await
}

/// One table's copy in this run: its plan and what is left of it.
struct TableCopy {
    target: CopyTarget,
    relfilenode: Option<i64>,
    /// Chunks not recorded complete yet.
    pending: Vec<Chunk>,
    /// Rows of the chunks recorded complete (this run and earlier ones).
    rows: u64,
    newest_consistent_point: Option<Lsn>,
    estimated_rows: f64,
    done: bool,
}

/// A copy whose first snapshot is imported, ready to run (streaming may start now).
pub struct StartedCopy {
    tables: Vec<TableCopy>,
    snapshot: ImportedSnapshot,
    /// walsync's own tables, read and written outside the snapshot.
    state: Catalog,
}

impl StartedCopy {
    pub fn consistent_point(&self) -> Lsn {
        self.snapshot.consistent_point
    }
}

/// Starts copying `targets`: calls [`CopyHooks::copy_started`] for each, imports a snapshot
/// and makes (or resumes) each table's chunk plan.
pub async fn begin_copy(job: &CopyJob, targets: Vec<CopyTarget>) -> anyhow::Result<StartedCopy> {
    for target in &targets {
        job.hooks.copy_started(&target.table).await;
    }
    let state = Catalog::connect(&job.params)
        .await
        .context("cannot open the snapshot's progress connection")?;
    let snapshot =
        import_snapshot(&job.params, &job.slot, "snapshot", job.settings.workers).await?;
    let mut tables: Vec<TableCopy> = targets
        .into_iter()
        .map(|target| TableCopy {
            target,
            relfilenode: None,
            pending: Vec::new(),
            rows: 0,
            newest_consistent_point: None,
            estimated_rows: -1.0,
            done: false,
        })
        .collect();
    for table in &mut tables {
        let name = table.target.table.qualified_name();
        if let Some(stored) = plan::load(state.client(), &job.slot, &name).await? {
            table.relfilenode = Some(stored.relfilenode);
            table.pending = stored.pending;
            table.rows = stored.rows_done;
            table.newest_consistent_point = stored.newest_consistent_point;
            tracing::info!(
                table = %name, chunks = stored.chunks, left = table.pending.len(),
                "resuming the table's copy: completed chunks are not copied again"
            );
        }
    }
    ensure_plans(job, &snapshot, &state, &mut tables).await?;
    Ok(StartedCopy {
        tables,
        snapshot,
        state,
    })
}

/// Plans the tables without a plan, and plans again those whose storage was rewritten since
/// their plan (VACUUM FULL, CLUSTER and TRUNCATE move rows between blocks without a change the
/// stream would see), as the snapshot sees them.
async fn ensure_plans(
    job: &CopyJob,
    snapshot: &ImportedSnapshot,
    state: &Catalog,
    tables: &mut [TableCopy],
) -> anyhow::Result<()> {
    let reader = snapshot.workers[0].client();
    let version = snapshot.workers[0].server_version_num().await?;
    for table in tables.iter_mut().filter(|table| !table.done) {
        let captured = &table.target.table;
        let name = captured.qualified_name();
        let storage = plan::storage(reader, captured).await?;
        table.estimated_rows = storage.estimated_rows;
        if table.relfilenode == Some(storage.relfilenode) {
            continue;
        }
        if table.relfilenode.is_some() {
            tracing::warn!(table = %name, "the table was rewritten since its copy was planned; copying all of it again");
        }
        let chunks = plan::plan_table(
            reader,
            captured,
            &storage,
            job.settings.chunk_rows,
            version >= 140_000,
        )
        .await?;
        plan::store(
            state.client(),
            &job.slot,
            &name,
            storage.relfilenode,
            &chunks,
        )
        .await?;
        tracing::info!(table = %name, chunks = chunks.len(), blocks = storage.blocks, "planned the table's copy");
        table.relfilenode = Some(storage.relfilenode);
        table.pending = chunks;
        table.rows = 0;
        table.newest_consistent_point = None;
    }
    Ok(())
}

/// A chunk handed to the producer, waiting for Kafka's acknowledgements.
struct ChunkSent {
    table: usize,
    chunk: Chunk,
    rows: u64,
    consistent_point: Lsn,
    acks: Arc<TxAcks>,
}

/// Copies every chunk left, under as many snapshots as the age bound needs, recording chunks
/// and tables as Kafka acknowledges them.
pub async fn run_copy(job: CopyJob, started: StartedCopy) -> anyhow::Result<()> {
    let StartedCopy {
        mut tables,
        mut snapshot,
        state,
    } = started;
    let progress = Arc::new(CopyProgress::new(
        &tables
            .iter()
            .map(|table| {
                (
                    table.target.table.qualified_name(),
                    table.estimated_rows,
                    table.rows,
                )
            })
            .collect::<Vec<_>>(),
    ));
    let logger = tokio::spawn(Arc::clone(&progress).log_until_done());
    let targets: Arc<Vec<CopyTarget>> =
        Arc::new(tables.iter().map(|table| table.target.clone()).collect());
    let result = async {
        // A crash between a table's last chunk and its record leaves nothing to copy.
        for (index, table) in tables.iter_mut().enumerate() {
            if table.pending.is_empty() {
                finish_table(&job, &state, table, progress.table(index)).await?;
            }
        }
        loop {
            let queue: VecDeque<(usize, Chunk)> = tables
                .iter()
                .enumerate()
                .flat_map(|(index, table)| table.pending.iter().map(move |chunk| (index, *chunk)))
                .collect();
            if queue.is_empty() {
                return Ok(());
            }
            copy_under(
                &job,
                snapshot,
                queue,
                &targets,
                &mut tables,
                &state,
                &progress,
            )
            .await?;
            if tables.iter().all(|table| table.done) {
                return Ok(());
            }
            tracing::info!(
                chunks_left = tables
                    .iter()
                    .map(|table| table.pending.len())
                    .sum::<usize>(),
                "the snapshot reached its age bound; continuing under a fresh snapshot"
            );
            snapshot =
                import_snapshot(&job.params, &job.slot, "snapshot", job.settings.workers).await?;
            ensure_plans(&job, &snapshot, &state, &mut tables).await?;
        }
    }
    .await;
    logger.abort();
    result
}

/// Runs the workers of one snapshot until the queue is empty or the snapshot is too old, and
/// records what Kafka acknowledged.
async fn copy_under(
    job: &CopyJob,
    snapshot: ImportedSnapshot,
    queue: VecDeque<(usize, Chunk)>,
    targets: &Arc<Vec<CopyTarget>>,
    tables: &mut [TableCopy],
    state: &Catalog,
    progress: &Arc<CopyProgress>,
) -> anyhow::Result<()> {
    let deadline = job.settings.max_age.map(|age| snapshot.imported_at + age);
    let queue = Arc::new(Mutex::new(queue));
    let (sent, acknowledged) = mpsc::channel(job.settings.workers * 2);
    let mut workers = tokio::task::JoinSet::new();
    for connection in snapshot.workers {
        let worker = Worker {
            connection,
            queue: Arc::clone(&queue),
            deadline,
            consistent_point: snapshot.consistent_point,
            targets: Arc::clone(targets),
            job: job.clone(),
            progress: Arc::clone(progress),
            sent: sent.clone(),
        };
        workers.spawn(worker.run());
    }
    drop(sent);
    let working = async move {
        while let Some(finished) = workers.join_next().await {
            finished.context("a snapshot worker panicked")??;
        }
        anyhow::Ok(())
    };
    let recording = record_chunks(job, acknowledged, tables, state, progress);
    let (worked, recorded) = tokio::join!(working, recording);
    worked?;
    recorded
}

/// Records each chunk once Kafka acknowledged all its rows, and each table once all its
/// chunks are recorded.
async fn record_chunks(
    job: &CopyJob,
    mut acknowledged: mpsc::Receiver<ChunkSent>,
    tables: &mut [TableCopy],
    state: &Catalog,
    progress: &CopyProgress,
) -> anyhow::Result<()> {
    while let Some(sent) = acknowledged.recv().await {
        let table = &mut tables[sent.table];
        let name = table.target.table.qualified_name();
        while !sent.acks.is_done() {
            if sent.acks.has_failed() {
                anyhow::bail!(
                    "Kafka refused a snapshot row of {name}: {}",
                    job.producer.refused().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        plan::complete(
            state.client(),
            &job.slot,
            &name,
            sent.chunk.no,
            sent.consistent_point,
            sent.rows,
        )
        .await?;
        table.pending.retain(|chunk| chunk.no != sent.chunk.no);
        table.rows += sent.rows;
        table.newest_consistent_point = table
            .newest_consistent_point
            .max(Some(sent.consistent_point));
        tracing::debug!(table = %name, chunk = sent.chunk.no, rows = sent.rows, "chunk copied");
        if table.pending.is_empty() {
            finish_table(job, state, table, progress.table(sent.table)).await?;
        }
    }
    Ok(())
}

/// Says to the hooks that a table's chunks are all complete, then records it as copied.
async fn finish_table(
    job: &CopyJob,
    state: &Catalog,
    table: &mut TableCopy,
    progress: &TableProgress,
) -> anyhow::Result<()> {
    let consistent_point = table.newest_consistent_point.unwrap_or(Lsn::ZERO);
    let name = table.target.table.qualified_name();
    job.hooks
        .copy_completed(&table.target, consistent_point)
        .await?;
    plan::table_done(
        state.client(),
        &job.slot,
        &name,
        consistent_point,
        table.rows,
    )
    .await?;
    table.done = true;
    progress.finish();
    Ok(())
}

/// One connection of a snapshot, taking chunks from the shared queue.
struct Worker {
    connection: Catalog,
    queue: Arc<Mutex<VecDeque<(usize, Chunk)>>>,
    deadline: Option<Instant>,
    consistent_point: Lsn,
    targets: Arc<Vec<CopyTarget>>,
    job: CopyJob,
    progress: Arc<CopyProgress>,
    sent: mpsc::Sender<ChunkSent>,
}

impl Worker {
    /// Copies chunks until none is left or the snapshot is past its age bound (a chunk
    /// started is always finished), then ends its transaction.
    async fn run(self) -> anyhow::Result<()> {
        loop {
            if self
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                break;
            }
            let next = self
                .queue
                .lock()
                .map_err(|_| anyhow::anyhow!("the chunk queue's lock is poisoned"))?
                .pop_front();
            let Some((table, chunk)) = next else { break };
            let (rows, acks) = self.copy_chunk(table, chunk).await?;
            let sent = ChunkSent {
                table,
                chunk,
                rows,
                consistent_point: self.consistent_point,
                acks,
            };
            if self.sent.send(sent).await.is_err() {
                anyhow::bail!("the snapshot's progress recorder stopped");
            }
        }
        self.connection.client().batch_execute("COMMIT").await?;
        Ok(())
    }

    /// Streams one chunk's rows to the producer; returns the row count and the chunk's
    /// acknowledgement counter.
    async fn copy_chunk(&self, table: usize, chunk: Chunk) -> anyhow::Result<(u64, Arc<TxAcks>)> {
        let progress = self.progress.table(table);
        stream_rows(
            &self.connection,
            &self.targets[table],
            &chunk.condition(),
            self.consistent_point,
            &self.job.writer,
            &self.job.producer,
            &|rows| progress.add_rows(rows),
        )
        .await
    }
}

/// Streams the rows of `target` matching `condition` (`""`, or `" WHERE …"`), as the snapshot
/// imported by `connection` sees them, to the producer as `op: "r"` events at
/// `consistent_point − 1`. Reports rows in batches to `on_rows`; returns the row count and the
/// acknowledgement counter of the rows sent.
async fn stream_rows(
    connection: &Catalog,
    target: &CopyTarget,
    condition: &str,
    consistent_point: Lsn,
    writer: &EventWriter,
    producer: &EventProducer,
    on_rows: &(dyn Fn(u64) + Send + Sync),
) -> anyhow::Result<(u64, Arc<TxAcks>)> {
    let client = connection.client();
    let relation = Arc::new(snapshot_relation(connection, &target.table).await?);
    let route = TableRoute::new(
        Arc::clone(&relation),
        Arc::clone(&target.topic),
        &target.table.key_columns,
    )?;
    let columns: Vec<String> = relation
        .columns
        .iter()
        .map(|column| quote_identifier(&column.name))
        .collect();
    let sql = format!(
        "COPY (SELECT {} FROM {}{condition}) TO STDOUT",
        columns.join(", "),
        qualified(&target.table),
    );
    let stream = client.copy_out(sql.as_str()).await?;
    futures_util::pin_mut!(stream);
    let version = snapshot_version(consistent_point);
    let tx = TxContext {
        xid: 0,
        commit_lsn: version,
        commit_time_millis: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64),
    };
    let acks = Arc::new(TxAcks::default());
    let (mut rows, mut uncounted) = (0_u64, 0_u64);
    let mut values: Vec<TupleValue> = Vec::with_capacity(relation.columns.len());
    let mut partial = BytesMut::new();
    while let Some(data) = stream.next().await {
        let mut data: Bytes = data?;
        if !partial.is_empty() {
            partial.extend_from_slice(&data);
            data = partial.split().freeze();
        }
        // The server sends one row per message; splitting on newlines covers any framing.
        while let Some(end) = data.iter().position(|byte| *byte == b'\n') {
            let line = data.slice(..end);
            data = data.slice(end + 1..);
            copy_text::decode_row(&line, relation.columns.len(), &mut values).with_context(
                || {
                    format!(
                        "cannot read a COPY row of {}",
                        target.table.qualified_name()
                    )
                },
            )?;
            let change = RowChange::snapshot_row(&values, version);
            let record = writer.row_event(&route, &change, &tx)?;
            producer.send(&record, &acks).await?;
            rows += 1;
            uncounted += 1;
            if uncounted == PROGRESS_BATCH {
                on_rows(uncounted);
                uncounted = 0;
            }
        }
        partial.extend_from_slice(&data);
    }
    if !partial.is_empty() {
        anyhow::bail!(
            "the COPY of {} ended in the middle of a row",
            target.table.qualified_name()
        );
    }
    on_rows(uncounted);
    Ok((rows, acks))
}

/// Copies the rows of one table that match `filter` (an SQL predicate; all rows when `None`)
/// under the first worker of `snapshot`, waiting until Kafka acknowledged every one: the
/// backfill's copy (crate::backfill). Counts rows into `copied` as it goes.
pub async fn copy_table_rows(
    snapshot: &ImportedSnapshot,
    target: &CopyTarget,
    filter: Option<&str>,
    writer: &EventWriter,
    producer: &EventProducer,
    copied: &AtomicU64,
) -> anyhow::Result<u64> {
    let connection = snapshot
        .workers
        .first()
        .context("the snapshot has no worker connection")?;
    let condition = filter.map_or(String::new(), |filter| format!(" WHERE ({filter})"));
    let (rows, acks) = stream_rows(
        connection,
        target,
        &condition,
        snapshot.consistent_point,
        writer,
        producer,
        &|rows| {
            copied.fetch_add(rows, Ordering::Relaxed);
        },
    )
    .await?;
    while !acks.is_done() {
        if acks.has_failed() {
            anyhow::bail!(
                "Kafka refused a row of {}: {}",
                target.table.qualified_name(),
                producer.refused().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(rows)
}

/// `"schema"."table"`.
fn qualified(table: &CapturedTable) -> String {
    format!(
        "{}.{}",
        quote_identifier(&table.info.schema),
        quote_identifier(&table.info.name)
    )
}

/// The table's columns as a Relation, as the snapshot sees them (generated columns left out,
/// as pgoutput leaves them out).
async fn snapshot_relation(
    worker: &Catalog,
    table: &CapturedTable,
) -> Result<Relation, tokio_postgres::Error> {
    let rows = worker
        .client()
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod
             FROM pg_attribute a
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&table.info.oid],
        )
        .await?;
    Ok(Relation {
        oid: table.info.oid,
        namespace: table.info.schema.clone(),
        name: table.info.name.clone(),
        replica_identity: ReplicaIdentity::Default,
        columns: rows
            .iter()
            .map(|row| Column {
                is_key: table.key_columns.contains(&row.get::<_, String>(0)),
                name: row.get(0),
                type_oid: row.get(1),
                type_modifier: row.get(2),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_slot_names_fit_postgres_limit_and_never_repeat() {
        let long = "s".repeat(80);
        let first = temporary_slot_name(&long, "verify");
        assert!(first.len() <= 63, "{first}");
        assert_ne!(first, temporary_slot_name(&long, "verify"));
        assert!(temporary_slot_name("walsync", "backfill").starts_with("walsync_backfill_"));
    }

    use crate::sink::bulk::{ActionKind, BulkAction, BulkRequest};

    fn write(version: Lsn, value: &str) -> BulkAction {
        BulkAction {
            index: "shop.public.products".into(),
            id: "42".into(),
            version: version.as_u64(),
            kind: ActionKind::Index(value.as_bytes().to_vec()),
        }
    }

    #[test]
    fn a_streamed_commit_at_exactly_the_consistent_point_beats_a_snapshot_row() {
        // The snapshot holds the commits whose record starts before cp; the slot streams
        // those at or after it, so the first streamed commit can sit at exactly cp.
        let consistent_point = Lsn(0x0583_ED80);
        let snapshot_row = write(snapshot_version(consistent_point), "snapshot");
        let streamed = write(consistent_point, "streamed");
        assert_eq!(snapshot_version(consistent_point), Lsn(0x0583_ED7F));
        // Whichever order they reach the sink in, the streamed change is what is written,
        // and external_gte makes a later snapshot row a version conflict.
        for batch in [
            [snapshot_row.clone(), streamed.clone()],
            [streamed.clone(), snapshot_row.clone()],
        ] {
            let request = BulkRequest::build(&batch);
            assert_eq!(request.items.len(), 1);
            let survivor = &batch[request.items[0].position];
            assert_eq!(survivor.kind, streamed.kind);
            assert_eq!(survivor.version, consistent_point.as_u64());
        }
    }

    #[test]
    fn the_version_never_underflows() {
        assert_eq!(snapshot_version(Lsn(0)), Lsn(0));
    }
}
