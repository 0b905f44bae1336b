//! Snapshots: the initial copy of each table, versioned just below a consistent point so it can
//! run while streaming continues (design invariant 2).
//!
//! Every table that has no completed copy recorded for the slot (`walsync.snapshot_progress`)
//! is copied under the exported snapshot of a fresh *temporary* slot, whose consistent point is
//! `cp`; its rows become `op: "r"` events with `commit_lsn = cp − 1`. Any streamed change to a
//! row commits at or after the main slot's start, and a change that the snapshot already
//! contains (commit before `cp`) is overwritten by the snapshot row it is part of, while a
//! change after it (commit ≥ `cp`) wins over the row: so the copy and the stream can run at the
//! same time in any order. The same mechanism covers a first start, a restart after a crash in
//! the middle of a copy (finished tables are not copied again; the rest use a new snapshot)
//! and a table added to the configuration later.
//!
//! Rows are read with a cursor in pages, through the same codec and session settings as the
//! stream, and handed to the producer, which waits when its queue is full: memory stays
//! bounded whatever the table size. A table is recorded as copied only once Kafka has
//! acknowledged every one of its rows.
//!
//! Not built yet: parallel chunked copies and bounding the age of a long-held snapshot.
//! Deletes during a copy become soft tombstones (`crate::kafka::copies`). `walsync backfill`
//! (crate::backfill) copies one table through [`copy_table_rows`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio_postgres::SimpleQueryMessage;

use crate::event::{EventWriter, Op, RowChange, SnapshotMarker, TableRoute, TxContext};
use crate::kafka::copies::CopiesInProgress;
use crate::kafka::frontier::TxAcks;
use crate::kafka::producer::EventProducer;
use crate::postgres::catalog::Catalog;
use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::{Column, Relation, ReplicaIdentity, TupleValue};
use crate::postgres::replication::{
    ConnectParams, ReplicationClient, SlotSnapshot, quote_identifier, quote_literal,
};
use crate::postgres::slot::CapturedTable;

/// Rows fetched from the cursor at a time.
const PAGE_ROWS: usize = 1_000;

/// A copy ready to run: a transaction that imported a snapshot, and what to copy under it.
pub struct PreparedCopy {
    worker: Catalog,
    consistent_point: Lsn,
    tables: Vec<CapturedTable>,
}

impl PreparedCopy {
    /// The version of every row of this copy: just below the snapshot's consistent point.
    pub fn version(&self) -> Lsn {
        Lsn(self.consistent_point.as_u64().saturating_sub(1))
    }

    pub fn tables(&self) -> &[CapturedTable] {
        &self.tables
    }
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

/// Creates a temporary slot with an exported snapshot and imports that snapshot into a new
/// worker transaction. The temporary slot (and its connection) can go once the snapshot is
/// imported: the worker's transaction keeps it.
pub async fn prepare_copy(
    params: &ConnectParams,
    slot: &str,
    tables: Vec<CapturedTable>,
) -> anyhow::Result<PreparedCopy> {
    let mut exporter = ReplicationClient::connect(params).await?;
    let temporary = format!("{}_snapshot_{}", slot, std::process::id());
    let created = exporter
        .create_logical_slot(&temporary, true, SlotSnapshot::Export)
        .await?;
    let snapshot = created
        .snapshot_name
        .context("CREATE_REPLICATION_SLOT exported no snapshot")?;
    let worker = Catalog::connect(params)
        .await
        .context("cannot open the snapshot worker's connection")?;
    worker
        .client()
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&snapshot)
        ))
        .await
        .context("cannot import the exported snapshot")?;
    drop(exporter);
    tracing::info!(
        consistent_point = %created.consistent_point,
        tables = tables.len(),
        "snapshot imported; copying while streaming"
    );
    Ok(PreparedCopy {
        worker,
        consistent_point: created.consistent_point,
        tables,
    })
}

/// Copies every prepared table, recording each as complete once Kafka acknowledged its rows.
pub async fn run_copy(
    copy: PreparedCopy,
    slot: &str,
    routes: &[(CapturedTable, Arc<str>)],
    writer: &EventWriter,
    producer: &EventProducer,
    progress: &Catalog,
    copies: &CopiesInProgress,
) -> anyhow::Result<()> {
    for table in &copy.tables {
        let Some((_, topic)) = routes
            .iter()
            .find(|(routed, _)| routed.qualified_name() == table.qualified_name())
        else {
            continue;
        };
        let rows = copy_table(&copy, table, Arc::clone(topic), writer, producer).await?;
        // Before recording the copy: a crash in between copies the table (and sends this) again.
        copies
            .copy_completed(
                &table.info.schema,
                &table.info.name,
                Arc::clone(topic),
                copy.consistent_point,
            )
            .await?;
        progress
            .client()
            .execute(
                "INSERT INTO walsync.snapshot_progress (slot_name, table_name, consistent_point, rows_copied)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (slot_name, table_name) DO UPDATE
                 SET consistent_point = excluded.consistent_point, rows_copied = excluded.rows_copied,
                     completed_at = now()",
                &[&slot, &table.qualified_name(), &copy.consistent_point.to_string(), &(rows as i64)],
            )
            .await?;
        tracing::info!(table = %table.qualified_name(), rows, "table copied");
    }
    copy.worker.client().batch_execute("COMMIT").await?;
    Ok(())
}

/// Copies one table; returns the number of rows.
async fn copy_table(
    copy: &PreparedCopy,
    table: &CapturedTable,
    topic: Arc<str>,
    writer: &EventWriter,
    producer: &EventProducer,
) -> anyhow::Result<u64> {
    let copied = AtomicU64::new(0);
    copy_table_rows(copy, table, topic, writer, producer, None, &copied).await
}

/// Copies the rows of one table that match `filter` (an SQL predicate, all rows when `None`),
/// counting them in `copied` as they go; returns the number of rows once Kafka acknowledged
/// every one of them. `walsync backfill` uses it (a `--where` slice, progress lines).
pub async fn copy_table_rows(
    copy: &PreparedCopy,
    table: &CapturedTable,
    topic: Arc<str>,
    writer: &EventWriter,
    producer: &EventProducer,
    filter: Option<&str>,
    copied: &AtomicU64,
) -> anyhow::Result<u64> {
    let relation = Arc::new(snapshot_relation(&copy.worker, table).await?);
    let route = TableRoute::new(Arc::clone(&relation), topic, &table.key_columns)?;
    let columns: Vec<String> = relation
        .columns
        .iter()
        .map(|column| quote_identifier(&column.name))
        .collect();
    let qualified = format!(
        "{}.{}",
        quote_identifier(&table.info.schema),
        quote_identifier(&table.info.name)
    );
    let client = copy.worker.client();
    client
        .batch_execute(&format!(
            "DECLARE walsync_copy NO SCROLL CURSOR FOR SELECT {} FROM {qualified}{}",
            columns.join(", "),
            filter.map_or(String::new(), |predicate| format!(" WHERE ({predicate})"))
        ))
        .await?;
    let tx = TxContext {
        xid: 0,
        commit_lsn: copy.version(),
        commit_time_millis: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64),
    };
    let acks = Arc::new(TxAcks::default());
    let mut rows = 0_u64;
    loop {
        let page = client
            .simple_query(&format!("FETCH {PAGE_ROWS} FROM walsync_copy"))
            .await?;
        let mut fetched = 0;
        for message in page {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            fetched += 1;
            let values: Vec<TupleValue> = (0..row.len())
                .map(|index| match row.get(index) {
                    Some(text) => TupleValue::Text(Bytes::copy_from_slice(text.as_bytes())),
                    None => TupleValue::Null,
                })
                .collect();
            let change = RowChange {
                op: Op::Read,
                before: None,
                before_is_key_only: false,
                after: Some(&values),
                fill_from: None,
                key_row: &values,
                lsn: copy.version(),
                snapshot: SnapshotMarker::True,
            };
            let record = writer.row_event(&route, &change, &tx)?;
            producer.send(&record, &acks).await?;
        }
        rows += fetched as u64;
        copied.fetch_add(fetched as u64, Ordering::Relaxed);
        if fetched < PAGE_ROWS {
            break;
        }
    }
    client.batch_execute("CLOSE walsync_copy").await?;
    while !acks.is_done() {
        if acks.has_failed() {
            anyhow::bail!(
                "Kafka refused a snapshot row of {}: {}",
                table.qualified_name(),
                producer.refused().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(rows)
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
