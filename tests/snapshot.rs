//! The initial snapshot: rows that existed before walsync started reach the index, while the
//! stream flows, and completed copies are not repeated.

mod common;

use std::time::Duration;

use common::kafka::read_topic_until;
use common::pipeline::{RunningPipeline, pipeline_config, wait_equal};
use common::source::{RunningSource, config_for, drop_slot, name, sql};

/// Counts the `r` (snapshot) events on a topic, reading until `expected_total` records.
async fn snapshot_events(topic: &str, expected_total: usize) -> usize {
    let (mut seen, mut reads) = (0, 0);
    read_topic_until(topic, Duration::from_secs(120), |record| {
        seen += 1;
        if record.op() == Some("r") {
            reads += 1;
        }
        seen >= expected_total
    })
    .await;
    reads
}

#[tokio::test]
async fn existing_rows_are_copied_while_changes_stream_and_the_index_ends_equal() {
    let name = name("snap_copy");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text);
             INSERT INTO {table} SELECT g, 'before' FROM generate_series(1, 20000) g;"
        ))
        .await
        .expect("a table with rows");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    // Changes while the copy runs: updates, deletes and re-inserts.
    for statement in [
        format!("UPDATE {table} SET note = 'during' WHERE id % 7 = 0"),
        format!("DELETE FROM {table} WHERE id % 11 = 0"),
        format!("INSERT INTO {table} VALUES (11, 'reinserted'), (30001, 'new')"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(180)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_restart_does_not_copy_again_and_a_table_added_later_is_copied() {
    let name = name("snap_resume");
    let (first, second) = (format!("public.{name}"), format!("public.{name}_later"));
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {first} (id int PRIMARY KEY); INSERT INTO {first} SELECT generate_series(1, 100);
             CREATE TABLE {second} (id int PRIMARY KEY); INSERT INTO {second} SELECT generate_series(1, 50);"
        ))
        .await
        .expect("two tables with rows");
    let topic = format!("{name}.public.{name}");
    let source = RunningSource::start(config_for(&name, &[&first])).await;
    assert_eq!(snapshot_events(&topic, 100).await, 100);
    // The copy is recorded only after its rows and its control records are acknowledged: a
    // stop before that copies the table again, by design.
    common::wait_for("the copy to be recorded", Duration::from_secs(60), || {
        let (client, slot, table) = (&client, &name, &first);
        async move {
            client
                .query_opt(
                    "SELECT 1 FROM walsync.snapshot_progress WHERE slot_name = $1 AND table_name = $2",
                    &[slot, table],
                )
                .await
                .ok()
                .flatten()
                .map(|_| ())
        }
    })
    .await;
    source.stop().await;

    let source = RunningSource::start(config_for(&name, &[&first, &second])).await;
    let later = format!("{name}.public.{name}_later");
    assert_eq!(
        snapshot_events(&later, 50).await,
        50,
        "the new table is copied"
    );
    client
        .batch_execute(&format!("INSERT INTO {first} VALUES (1000)"))
        .await
        .unwrap();
    // The first table's topic: its 100 snapshot rows once, then the new insert.
    assert_eq!(
        snapshot_events(&topic, 101).await,
        100,
        "no second copy of the first table"
    );
    source.stop().await;
    drop_slot(&name).await;
}
