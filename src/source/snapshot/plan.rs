//! Chunk plans: how a table is split for the copy, and the persisted record of which chunks
//! are complete (`walsync.snapshot_chunks`, migration V3).
//!
//! Chunks are ranges of heap blocks, read with `ctid` conditions that PostgreSQL 14 and later
//! answer with a TID range scan (only the chunk's blocks are read). The number of blocks per
//! chunk comes from `snapshot.chunk_rows` and the table's rows per block; the last chunk is
//! open-ended, so rows in blocks added after the plan are still read. Partitioned tables
//! (whose partitions each have their own blocks) and servers before 14 (no TID range scan)
//! get one chunk per table.

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::postgres::slot::CapturedTable;

/// Blocks sampled to estimate rows per block when the statistics know nothing.
const SAMPLE_BLOCKS: i64 = 16;

/// One chunk: heap blocks `[start_block, end_block)`, `None` meaning to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub no: i32,
    pub start_block: i64,
    pub end_block: Option<i64>,
}

impl Chunk {
    /// The `WHERE` clause selecting the chunk's rows (empty for a whole table).
    pub fn condition(&self) -> String {
        match (self.start_block, self.end_block) {
            (0, None) => String::new(),
            (start, None) => format!(" WHERE ctid >= '({start},0)'::tid"),
            (start, Some(end)) => {
                format!(" WHERE ctid >= '({start},0)'::tid AND ctid < '({end},0)'::tid")
            }
        }
    }
}

/// Splits `blocks` heap blocks into chunks of about `chunk_rows` rows; the last is open-ended.
pub fn split(blocks: i64, rows_per_block: f64, chunk_rows: u64) -> Vec<Chunk> {
    let blocks_per_chunk = if rows_per_block > 0.0 {
        ((chunk_rows as f64 / rows_per_block).floor() as i64).max(1)
    } else {
        blocks.max(1)
    };
    let mut chunks = Vec::new();
    let mut start = 0_i64;
    while start + blocks_per_chunk < blocks {
        chunks.push(Chunk {
            no: chunks.len() as i32,
            start_block: start,
            end_block: Some(start + blocks_per_chunk),
        });
        start += blocks_per_chunk;
    }
    chunks.push(Chunk {
        no: chunks.len() as i32,
        start_block: start,
        end_block: None,
    });
    chunks
}

/// What the catalog says about a table's storage, for planning.
#[derive(Debug, Clone, Copy)]
pub struct Storage {
    pub relfilenode: i64,
    /// Heap blocks now (the file size, not the statistics).
    pub blocks: i64,
    /// The planner's row estimate; negative when the table was never analyzed.
    pub estimated_rows: f64,
    relpages: i64,
}

pub async fn storage(
    client: &Client,
    table: &CapturedTable,
) -> Result<Storage, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT c.relfilenode::bigint, c.relpages::bigint, c.reltuples::float8,
                    (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint
             FROM pg_class c WHERE c.oid = $1",
            &[&table.info.oid],
        )
        .await?;
    Ok(Storage {
        relfilenode: row.get(0),
        relpages: row.get(1),
        estimated_rows: row.get(2),
        blocks: row.get(3),
    })
}

/// The table's current storage identity (under the caller's snapshot).
pub async fn relfilenode(
    client: &Client,
    table: &CapturedTable,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT relfilenode::bigint FROM pg_class WHERE oid = $1",
            &[&table.info.oid],
        )
        .await?
        .get(0))
}

/// Plans a table's chunks from its storage; `ctid_ranges` is false where block ranges do not
/// help (partitioned tables, servers before 14).
pub async fn plan_table(
    client: &Client,
    table: &CapturedTable,
    storage: &Storage,
    chunk_rows: u64,
    ctid_ranges: bool,
) -> Result<Vec<Chunk>, tokio_postgres::Error> {
    if !ctid_ranges || table.info.kind == 'p' || storage.blocks == 0 {
        return Ok(split(0, 0.0, chunk_rows));
    }
    let rows_per_block = if storage.relpages > 0 && storage.estimated_rows > 0.0 {
        storage.estimated_rows / storage.relpages as f64
    } else {
        // Never vacuumed or analyzed: count the rows of the first blocks.
        let sampled = storage.blocks.min(SAMPLE_BLOCKS);
        let rows: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}{}",
                    super::qualified(table),
                    Chunk {
                        no: 0,
                        start_block: 0,
                        end_block: Some(sampled)
                    }
                    .condition()
                ),
                &[],
            )
            .await?
            .get(0);
        (rows.max(1) as f64) / sampled as f64
    };
    Ok(split(storage.blocks, rows_per_block, chunk_rows))
}

/// A table's persisted plan.
#[derive(Debug, Clone, Default)]
pub struct StoredPlan {
    pub relfilenode: i64,
    pub pending: Vec<Chunk>,
    /// Rows of the chunks already complete.
    pub rows_done: u64,
    /// The newest consistent point among the complete chunks.
    pub newest_consistent_point: Option<Lsn>,
    pub chunks: usize,
}

/// The persisted plan of `table` for `slot`, if one exists.
pub async fn load(client: &Client, slot: &str, table: &str) -> anyhow::Result<Option<StoredPlan>> {
    let rows = client
        .query(
            "SELECT chunk_no, start_block, end_block, relfilenode, consistent_point, rows
             FROM walsync.snapshot_chunks WHERE slot_name = $1 AND table_name = $2 ORDER BY chunk_no",
            &[&slot, &table],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut plan = StoredPlan {
        relfilenode: rows[0].get(3),
        chunks: rows.len(),
        ..StoredPlan::default()
    };
    for row in &rows {
        let consistent_point: Option<String> = row.get(4);
        match consistent_point {
            Some(text) => {
                let lsn: Lsn = text.parse().map_err(|_| {
                    anyhow::anyhow!("walsync.snapshot_chunks holds a bad LSN {text:?} for {table}")
                })?;
                plan.newest_consistent_point = plan.newest_consistent_point.max(Some(lsn));
                plan.rows_done += row.get::<_, Option<i64>>(5).unwrap_or(0) as u64;
            }
            None => plan.pending.push(Chunk {
                no: row.get(0),
                start_block: row.get(1),
                end_block: row.get(2),
            }),
        }
    }
    Ok(Some(plan))
}

/// Replaces the table's plan (all chunks pending) in one statement.
pub async fn store(
    client: &Client,
    slot: &str,
    table: &str,
    relfilenode: i64,
    chunks: &[Chunk],
) -> Result<(), tokio_postgres::Error> {
    let numbers: Vec<i32> = chunks.iter().map(|chunk| chunk.no).collect();
    let starts: Vec<i64> = chunks.iter().map(|chunk| chunk.start_block).collect();
    let ends: Vec<Option<i64>> = chunks.iter().map(|chunk| chunk.end_block).collect();
    client
        .execute(
            // The delete and the insert of one statement see the same snapshot: an insert of a
            // chunk number the delete removes would still collide with it, so the delete takes
            // only the numbers the new plan lacks and the insert overwrites the others.
            "WITH forgotten AS (
                 DELETE FROM walsync.snapshot_chunks
                 WHERE slot_name = $1 AND table_name = $2 AND chunk_no <> ALL($4::int[])
             )
             INSERT INTO walsync.snapshot_chunks (slot_name, table_name, chunk_no, start_block, end_block, relfilenode)
             SELECT $1, $2, no, start_block, end_block, $3
             FROM unnest($4::int[], $5::bigint[], $6::bigint[]) AS plan(no, start_block, end_block)
             ON CONFLICT (slot_name, table_name, chunk_no) DO UPDATE
             SET start_block = EXCLUDED.start_block, end_block = EXCLUDED.end_block,
                 relfilenode = EXCLUDED.relfilenode, consistent_point = NULL, rows = NULL,
                 completed_at = NULL",
            &[&slot, &table, &relfilenode, &numbers, &starts, &ends],
        )
        .await?;
    Ok(())
}

/// Records a chunk as complete: Kafka acknowledged its `rows` rows, read at `consistent_point`.
pub async fn complete(
    client: &Client,
    slot: &str,
    table: &str,
    chunk: i32,
    consistent_point: Lsn,
    rows: u64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE walsync.snapshot_chunks SET consistent_point = $4, rows = $5, completed_at = now()
             WHERE slot_name = $1 AND table_name = $2 AND chunk_no = $3",
            &[&slot, &table, &chunk, &consistent_point.to_string(), &(rows as i64)],
        )
        .await?;
    Ok(())
}

/// Records the table's copy as complete (all chunks acknowledged).
pub async fn table_done(
    client: &Client,
    slot: &str,
    table: &str,
    consistent_point: Lsn,
    rows: u64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO walsync.snapshot_progress (slot_name, table_name, consistent_point, rows_copied)
             VALUES ($1, $2, $3, $4) ON CONFLICT (slot_name, table_name) DO UPDATE
             SET consistent_point = excluded.consistent_point, rows_copied = excluded.rows_copied,
                 completed_at = now()",
            &[&slot, &table, &consistent_point.to_string(), &(rows as i64)],
        )
        .await?;
    Ok(())
}

/// Forgets every recorded copy and plan of `slot` (`snapshot.mode = "always"`).
pub async fn forget_all(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "WITH chunks AS (DELETE FROM walsync.snapshot_chunks WHERE slot_name = $1)
             DELETE FROM walsync.snapshot_progress WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_block_and_the_last_is_open_ended() {
        // 100 rows per block, 1000 rows per chunk: 10 blocks per chunk.
        let chunks = split(35, 100.0, 1_000);
        assert_eq!(
            chunks
                .iter()
                .map(|c| (c.start_block, c.end_block))
                .collect::<Vec<_>>(),
            vec![(0, Some(10)), (10, Some(20)), (20, Some(30)), (30, None)]
        );
        assert_eq!(
            chunks.iter().map(|c| c.no).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn a_chunk_is_at_least_one_block() {
        let chunks = split(3, 500.0, 10);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].end_block, None);
    }

    #[test]
    fn an_empty_or_unknown_table_is_one_open_chunk() {
        assert_eq!(
            split(0, 0.0, 50_000),
            vec![Chunk {
                no: 0,
                start_block: 0,
                end_block: None
            }]
        );
        assert_eq!(split(10, 0.0, 50_000).len(), 1);
    }

    #[test]
    fn conditions_select_block_ranges_with_tid_comparisons() {
        let chunk = Chunk {
            no: 1,
            start_block: 10,
            end_block: Some(20),
        };
        assert_eq!(
            chunk.condition(),
            " WHERE ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid"
        );
        let last = Chunk {
            no: 2,
            start_block: 20,
            end_block: None,
        };
        assert_eq!(last.condition(), " WHERE ctid >= '(20,0)'::tid");
        let whole = Chunk {
            no: 0,
            start_block: 0,
            end_block: None,
        };
        assert_eq!(whole.condition(), "");
    }
}
