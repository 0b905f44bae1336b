//! The initial snapshot under a crash, as the released binary: `kill -9` in the middle of a
//! chunked copy of several tables, then a restart. Chunks Kafka acknowledged before the crash
//! are not copied again; the rest resume under a new snapshot; the indices end equal.
//!
//! Needs `cargo build --release` (or `WALSYNC_BIN`). It kills only its own process.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::kafka::{read_records_until, topic_size};
use common::pipeline::wait_equal;
use common::process::{Walsync, pipeline_config};
use common::source::{drop_slot, name, sql};
use common::wait_for;

const TABLES: usize = 4;
const ROWS: i32 = 60_000;

/// A completed chunk as `walsync.snapshot_chunks` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CompletedChunk {
    table: String,
    chunk_no: i32,
    start_block: i64,
    end_block: Option<i64>,
    consistent_point: String,
}

async fn completed_chunks(client: &tokio_postgres::Client, slot: &str) -> Vec<CompletedChunk> {
    client
        .query(
            "SELECT table_name, chunk_no, start_block, end_block, consistent_point
             FROM walsync.snapshot_chunks WHERE slot_name = $1 AND completed_at IS NOT NULL
             ORDER BY table_name, chunk_no",
            &[&slot],
        )
        .await
        .expect("read walsync.snapshot_chunks")
        .iter()
        .map(|row| CompletedChunk {
            table: row.get(0),
            chunk_no: row.get(1),
            start_block: row.get(2),
            end_block: row.get(3),
            consistent_point: row.get(4),
        })
        .collect()
}

async fn count(client: &tokio_postgres::Client, sql: &str, slot: &str) -> i64 {
    client.query_one(sql, &[&slot]).await.expect(sql).get(0)
}

/// The ids in a chunk's blocks (the tables do not change during the test, so ctids are stable).
async fn ids_in(client: &tokio_postgres::Client, chunk: &CompletedChunk) -> Vec<i32> {
    let end = chunk
        .end_block
        .map(|end| format!(" AND ctid < '({end},0)'::tid"))
        .unwrap_or_default();
    client
        .query(
            &format!(
                "SELECT id FROM {} WHERE ctid >= '({},0)'::tid{end}",
                chunk.table, chunk.start_block
            ),
            &[],
        )
        .await
        .expect("ids of a chunk")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Per id: the commit LSNs of its `r` events on `topic`.
async fn snapshot_versions(topic: &str) -> HashMap<i64, Vec<u64>> {
    let total = topic_size(topic) as usize;
    let mut versions: HashMap<i64, Vec<u64>> = HashMap::new();
    let mut seen = 0;
    // Control records count in the topic's size, so they are read (and skipped) too.
    read_records_until(topic, Duration::from_secs(120), |record| {
        seen += 1;
        if record.op() == Some("r") {
            let id = record.key["id"].as_i64().expect("an integer id");
            versions.entry(id).or_default().push(record.commit_lsn());
        }
        seen >= total
    })
    .await;
    versions
}

#[tokio::test]
async fn a_crash_during_the_snapshot_resumes_the_chunks_left_under_a_new_snapshot() {
    let name = name("snap_kill");
    let client = sql().await;
    let tables: Vec<String> = (0..TABLES).map(|i| format!("public.{name}_{i}")).collect();
    for table in &tables {
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, note text);
                 INSERT INTO {table} SELECT g, repeat('x', 100) || g FROM generate_series(1, {ROWS}) g;
                 ANALYZE {table};"
            ))
            .await
            .expect("a table with rows");
    }
    let table_refs: Vec<&str> = tables.iter().map(String::as_str).collect();
    let config = format!(
        "{}\n[snapshot]\nworkers = 2\nchunk_rows = 2000\n",
        pipeline_config(&name, &table_refs)
    );

    let mut walsync = Walsync::spawn("run", &name, &config);
    let completed_sql = "SELECT count(*) FROM walsync.snapshot_chunks WHERE slot_name = $1 AND completed_at IS NOT NULL";
    wait_for(
        "a few chunks to complete",
        Duration::from_secs(120),
        || async {
            let exists: bool = client
                .query_one(
                    "SELECT to_regclass('walsync.snapshot_chunks') IS NOT NULL",
                    &[],
                )
                .await
                .expect("to_regclass")
                .get(0);
            if !exists {
                return None;
            }
            (count(&client, completed_sql, &name).await >= 8).then_some(())
        },
    )
    .await;
    walsync.kill_9();

    let before = completed_chunks(&client, &name).await;
    let planned = count(
        &client,
        "SELECT count(*) FROM walsync.snapshot_chunks WHERE slot_name = $1",
        &name,
    )
    .await;
    assert!(
        (before.len() as i64) < planned,
        "the kill came after the whole copy ({} of {planned} chunks): make the tables larger",
        before.len()
    );
    let mut done_before: HashSet<(String, i64)> = HashSet::new();
    for chunk in &before {
        for id in ids_in(&client, chunk).await {
            done_before.insert((chunk.table.clone(), i64::from(id)));
        }
    }
    let first_run_points: HashSet<String> = before
        .iter()
        .map(|chunk| chunk.consistent_point.clone())
        .collect();
    eprintln!(
        "killed with {} of {planned} chunks complete ({} rows), under snapshot(s) {first_run_points:?}",
        before.len(),
        done_before.len()
    );

    let mut walsync = Walsync::spawn("run", &name, &config);
    wait_for(
        "every table to be copied",
        Duration::from_secs(300),
        || async {
            (count(
                &client,
                "SELECT count(*) FROM walsync.snapshot_progress WHERE slot_name = $1",
                &name,
            )
            .await
                == TABLES as i64)
                .then_some(())
        },
    )
    .await;
    let after = completed_chunks(&client, &name).await;
    assert_eq!(
        after.len() as i64,
        planned,
        "every planned chunk is complete"
    );
    for chunk in &before {
        assert!(
            after.contains(chunk),
            "a chunk completed before the crash was copied again: {chunk:?}"
        );
    }
    let resumed: Vec<&CompletedChunk> = after.iter().filter(|c| !before.contains(c)).collect();
    for chunk in &resumed {
        assert!(
            !first_run_points.contains(&chunk.consistent_point),
            "a resumed chunk carries the first run's snapshot: {chunk:?}"
        );
    }

    for (index, table) in tables.iter().enumerate() {
        let topic = format!("{name}.public.{name}_{index}");
        let versions = snapshot_versions(&topic).await;
        let mut once = 0;
        for id in 1..=i64::from(ROWS) {
            let seen = versions
                .get(&id)
                .unwrap_or_else(|| panic!("{table}: id {id} was never copied"));
            if done_before.contains(&(table.clone(), id)) {
                assert_eq!(
                    seen.len(),
                    1,
                    "{table}: id {id} was in a chunk completed before the crash, yet copied {} times",
                    seen.len()
                );
                once += 1;
            }
        }
        // The resumed rows carry the new snapshot's version.
        let resumed_versions: HashSet<u64> = resumed
            .iter()
            .filter(|chunk| &chunk.table == table)
            .map(|chunk| {
                chunk
                    .consistent_point
                    .parse::<walsync::lsn::Lsn>()
                    .expect("an LSN")
                    .as_u64()
                    - 1
            })
            .collect();
        for id in 1..=i64::from(ROWS) {
            if !done_before.contains(&(table.clone(), id)) {
                assert!(
                    versions[&id].iter().any(|v| resumed_versions.contains(v)),
                    "{table}: id {id} was not copied under the new snapshot: {:?} vs {resumed_versions:?}",
                    versions[&id]
                );
            }
        }
        eprintln!("{table}: {once} rows copied once before the crash, the rest after it");
    }

    let check = common::pipeline::pipeline_config(&name, &table_refs);
    for index in 0..TABLES {
        wait_equal(
            &check,
            "public",
            &format!("{name}_{index}"),
            &["id"],
            Duration::from_secs(300),
        )
        .await;
    }
    let code = walsync.terminate(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "a clean stop:\n{}", walsync.log_text());
    drop_slot(&name).await;
}
