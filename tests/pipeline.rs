//! The whole pipeline on the real stack: PostgreSQL → Kafka → search server, checked with the
//! comparison core (every field, not counts).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::pipeline::{RunningPipeline, compare, pipeline_config, wait_equal};
use common::source::{drop_slot, name, sql};
use common::wait_for;

#[tokio::test]
async fn inserts_updates_deletes_truncate_and_key_changes_end_with_the_index_equal_to_the_table() {
    let name = name("pipe_e2e");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (shop int, sku text, price numeric, tags text[], attrs jsonb,
                                   PRIMARY KEY (shop, sku))"
        ))
        .await
        .expect("create table");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;

    for statement in [
        format!(
            "INSERT INTO {table} SELECT 1, 'sku-' || g, g * 1.5, ARRAY['a', 'b'], jsonb_build_object('n', g) FROM generate_series(1, 200) g"
        ),
        format!("UPDATE {table} SET price = price + 1 WHERE sku LIKE 'sku-1%'"),
        format!("DELETE FROM {table} WHERE sku IN ('sku-2', 'sku-3')"),
        format!("TRUNCATE {table}"),
        format!(
            "INSERT INTO {table} SELECT 2, 'sku-' || g, g, NULL, '{{\"x\": [1, 2]}}' FROM generate_series(1, 100) g"
        ),
        format!(
            "UPDATE {table} SET sku = 'renamed-' || sku WHERE shop = 2 AND sku IN ('sku-5', 'sku-6')"
        ),
        format!(
            "BEGIN; UPDATE {table} SET price = 1000 WHERE sku = 'sku-7'; UPDATE {table} SET price = 2000 WHERE sku = 'sku-7'; COMMIT"
        ),
        format!("DELETE FROM {table} WHERE sku = 'sku-8'"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }
    wait_equal(
        &config,
        "public",
        &name,
        &["shop", "sku"],
        Duration::from_secs(120),
    )
    .await;
    let report = compare(&config, "public", &name, &["shop", "sku"]).await;
    assert_eq!(report.rows, 99, "{report}");
    assert_eq!(report.documents, 99);

    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn replaying_the_topic_from_the_start_changes_nothing_and_counts_stale_writes() {
    let name = name("pipe_replay");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text)"
        ))
        .await
        .expect("create table");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    for statement in [
        format!("INSERT INTO {table} SELECT g, 'v1' FROM generate_series(1, 50) g"),
        format!("UPDATE {table} SET note = 'v2' WHERE id <= 25"),
        format!("DELETE FROM {table} WHERE id > 45"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;
    pipeline.stop().await;

    // A second sink in a new group reads the topic from offset 0 over the current index.
    let mut replay = config.clone();
    replay.sink.group_id = format!("{name}-replay");
    // One event per bulk, so no collapsing hides the older versions.
    replay.sink.batch_max_docs = 1;
    let sink = walsync::sink::apply::Sink::new(replay)
        .await
        .expect("create the replay sink");
    let stats = std::sync::Arc::clone(&sink.stats);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { sink.run(stopped).await });
    // 50 inserts + 25 updates + 5 deletes were applied already. An event older than what the
    // index holds is a version conflict (stale): the 25 inserts of rows updated later and the
    // 5 inserts of rows deleted later (their tombstones live for gc_deletes). The newest event
    // of each row carries the version the index already has: external_gte rewrites it
    // identically.
    wait_for(
        "the replay to reach the end",
        Duration::from_secs(60),
        || {
            let seen = stats.stale.load(Ordering::Relaxed)
                + stats.deleted.load(Ordering::Relaxed)
                + stats.indexed.load(Ordering::Relaxed);
            assert!(!running.is_finished(), "the replay sink stopped early");
            async move { (seen >= 80).then_some(()) }
        },
    )
    .await;
    stop.send(true).unwrap();
    running
        .await
        .unwrap()
        .expect("the replay sink stops cleanly");
    assert_eq!(
        stats.stale.load(Ordering::Relaxed),
        30,
        "stale writes are counted: {stats:?}"
    );
    let report = compare(&config, "public", &name, &["id"]).await;
    assert!(report.is_equal(), "{report}");
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_truncate_inside_a_transaction_removes_only_what_came_before_it() {
    let name = name("pipe_trunc_tx");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text);
             INSERT INTO {table} SELECT g, 'old' FROM generate_series(1, 50) g;"
        ))
        .await
        .expect("create table");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO {table} SELECT g, 'same tx, before' FROM generate_series(100, 120) g;
             TRUNCATE {table};
             INSERT INTO {table} SELECT g, 'same tx, after' FROM generate_series(200, 210) g;
             COMMIT;
             INSERT INTO {table} VALUES (300, 'later');"
        ))
        .await
        .expect("a transaction that truncates between inserts");
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;
    let report = compare(&config, "public", &name, &["id"]).await;
    assert_eq!(report.rows, 12, "{report}");
    pipeline.stop().await;
    drop_slot(&name).await;
}
