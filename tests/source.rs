//! The source against the real stack: PostgreSQL changes arrive in Kafka as events with the
//! right topic, key, op, images and versions, and bad setups stop with the fix and change
//! nothing.

mod common;

use std::time::Duration;

use common::kafka::{Consumed, read_topic, read_topic_until, read_whole_topic};
use common::source::{RunningSource, config_for, drop_slot, name, sql};
use serde_json::{Value, json};
use tokio::sync::watch;
use walsync::source::{self, SourceExit};

fn value(record: &Consumed) -> &Value {
    record.value.as_ref().expect("not a tombstone")
}

#[tokio::test]
async fn changes_to_a_composite_key_table_arrive_with_key_op_images_and_versions() {
    let name = name("src_events");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (shop int, sku text, price numeric, note text, PRIMARY KEY (shop, sku))"
        ))
        .await
        .expect("create table");
    let source = RunningSource::start(config_for(&name, &[&table])).await;

    // One transaction per statement (a multi-statement simple query would be one transaction).
    for statement in [
        format!("INSERT INTO {table} VALUES (1, 'a', 10.50, 'first'), (1, 'b', 20, NULL)"),
        format!("UPDATE {table} SET price = 11.00 WHERE shop = 1 AND sku = 'a'"),
        format!("DELETE FROM {table} WHERE shop = 1 AND sku = 'b'"),
        format!("UPDATE {table} SET sku = 'a2' WHERE shop = 1 AND sku = 'a'"),
        format!("TRUNCATE {table}"),
    ] {
        client
            .batch_execute(&statement)
            .await
            .expect("write the workload");
    }

    // 2 inserts, 1 update, delete + tombstone, key change (delete + tombstone + create), truncate.
    let topic = format!("{name}.public.{name}");
    read_topic(&topic, 9, Duration::from_secs(60)).await;
    assert!(source.stop().await == SourceExit::Drained);
    // The whole topic, once the source stopped: exactly these records, nothing more.
    let records = read_whole_topic(&topic, Duration::from_secs(60)).await;
    assert_eq!(records.len(), 9, "{records:#?}");

    // Per key, offsets follow commit order: every key's records sit in one partition.
    let mut by_key: std::collections::BTreeMap<String, Vec<&Consumed>> = Default::default();
    for record in &records {
        by_key
            .entry(record.key.to_string())
            .or_default()
            .push(record);
    }
    for (key, events) in &by_key {
        let partitions: std::collections::HashSet<_> = events.iter().map(|r| r.partition).collect();
        assert_eq!(partitions.len(), 1, "key {key} spans partitions");
        let versions: Vec<u64> = events.iter().map(|r| r.commit_lsn()).collect();
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "key {key}: {versions:?}"
        );
    }

    let key_a = json!({"shop": 1, "sku": "a"});
    let key_b = json!({"shop": 1, "sku": "b"});
    let key_a2 = json!({"shop": 1, "sku": "a2"});
    let of = |key: &Value| -> Vec<&Consumed> { records.iter().filter(|r| &r.key == key).collect() };

    let a = of(&key_a);
    let ops: Vec<_> = a.iter().map(|r| r.op()).collect();
    assert_eq!(
        ops,
        [Some("c"), Some("u"), Some("d"), None],
        "insert, update, key change away, tombstone"
    );
    assert_eq!(
        value(a[0])["after"],
        json!({"shop": 1, "sku": "a", "price": "10.50", "note": "first"})
    );
    assert_eq!(value(a[0])["before"], Value::Null);
    assert_eq!(value(a[1])["after"]["price"], "11.00");
    assert_eq!(
        value(a[2])["before"],
        json!({"shop": 1, "sku": "a"}),
        "key-only old tuple"
    );
    assert_eq!(value(a[2])["after"], Value::Null);

    let b = of(&key_b);
    assert_eq!(
        b.iter().map(|r| r.op()).collect::<Vec<_>>(),
        [Some("c"), Some("d"), None]
    );
    assert_eq!(value(b[0])["after"]["note"], Value::Null);

    let a2 = of(&key_a2);
    assert_eq!(a2.len(), 1);
    assert_eq!(value(a2[0])["op"], "c");
    assert_eq!(
        value(a2[0])["after"],
        json!({"shop": 1, "sku": "a2", "price": "11.00", "note": "first"})
    );
    assert_eq!(
        a2[0].commit_lsn(),
        a[2].commit_lsn(),
        "the delete and the create of a key change share their transaction's version"
    );

    let truncate = of(&json!({}));
    assert_eq!(truncate.len(), 1);
    assert_eq!(value(truncate[0])["op"], "t");

    // The two inserts of the first transaction share commit LSN and txId; later ones are newer.
    let first_tx = [a[0], b[0]];
    assert_eq!(first_tx[0].commit_lsn(), first_tx[1].commit_lsn());
    assert_eq!(
        value(first_tx[0])["source"]["txId"],
        value(first_tx[1])["source"]["txId"]
    );
    assert!(a[1].commit_lsn() > a[0].commit_lsn());
    assert!(truncate[0].commit_lsn() > a2[0].commit_lsn());
    for record in records.iter().filter(|r| r.value.is_some()) {
        let source = &value(record)["source"];
        assert_eq!(source["connector"], "walsync");
        assert_eq!(source["table"], name.as_str());
        assert!(source["lsn"].as_u64().unwrap() <= source["commit_lsn"].as_u64().unwrap());
        assert_eq!(
            record.headers["commit_lsn"],
            source["commit_lsn"].to_string()
        );
        assert_eq!(record.headers["op"], value(record)["op"].as_str().unwrap());
    }

    drop_slot(&name).await;
}

#[tokio::test]
async fn a_table_without_primary_key_stops_the_source_with_the_fix_and_changes_nothing() {
    let name = name("src_nopk");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int, note text)"))
        .await
        .expect("create table");
    let (_stop, stopped) = watch::channel(false);
    let error = source::run(
        config_for(&name, &[&table, "public.does_not_exist"]),
        stopped,
    )
    .await
    .expect_err("the source must refuse");
    let message = format!("{error:#}");
    assert!(message.contains("REPLICA IDENTITY FULL"), "{message}");
    assert!(
        message.contains("public.does_not_exist does not exist"),
        "{message}"
    );

    let publication: Option<tokio_postgres::Row> = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&format!("{name}_pub")],
        )
        .await
        .unwrap();
    assert!(publication.is_none(), "no publication was created");
    let slot = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap();
    assert!(slot.is_none(), "no slot was created");
}

#[tokio::test]
async fn a_slot_dropped_under_walsync_is_not_silently_recreated() {
    let name = name("src_lost");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create table");
    let config = config_for(&name, &[&table]);
    let source = RunningSource::start(config.clone()).await;
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;

    let (_stop, stopped) = watch::channel(false);
    let error = source::run(config.clone(), stopped)
        .await
        .expect_err("a lost slot must stop the source");
    let message = format!("{error:#}");
    assert!(message.contains("recreate_lost_slot"), "{message}");
    let slot = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap();
    assert!(slot.is_none(), "the slot was not recreated");

    let mut opted_in = config;
    opted_in.postgres.recreate_lost_slot = true;
    let source = RunningSource::start(opted_in).await;
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;
}

#[tokio::test]
async fn the_publication_gains_configured_tables_and_keeps_others_unless_pruning() {
    let name = name("src_pub");
    let (a, b, other) = (
        format!("public.{name}_a"),
        format!("public.{name}_b"),
        format!("public.{name}_o"),
    );
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {a} (id int PRIMARY KEY); CREATE TABLE {b} (id int PRIMARY KEY);
             CREATE TABLE {other} (id int PRIMARY KEY);
             CREATE PUBLICATION {name}_pub FOR TABLE {a}, {other};"
        ))
        .await
        .expect("create tables and a drifted publication");
    let tables_of = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        let mut names: Vec<String> = rows.iter().map(|row| row.get::<_, String>(0)).collect();
        names.sort();
        names
    };
    let query =
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1";
    let publication = format!("{name}_pub");

    let source = RunningSource::start(config_for(&name, &[&a, &b])).await;
    assert_eq!(source.stop().await, SourceExit::Drained);
    let mut expected = vec![a.clone(), b.clone(), other.clone()];
    expected.sort();
    assert_eq!(
        tables_of(client.query(query, &[&publication]).await.unwrap()),
        expected,
        "added, nothing removed"
    );

    let mut pruning = config_for(&name, &[&a, &b]);
    pruning.postgres.prune_publication = true;
    let source = RunningSource::start(pruning).await;
    assert_eq!(source.stop().await, SourceExit::Drained);
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(
        tables_of(client.query(query, &[&publication]).await.unwrap()),
        expected,
        "pruned when told to"
    );
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_partitioned_table_publishes_through_its_root() {
    let name = name("src_part");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
             CREATE TABLE {table}_eu PARTITION OF {table} FOR VALUES IN ('eu');
             CREATE TABLE {table}_us PARTITION OF {table} FOR VALUES IN ('us');"
        ))
        .await
        .expect("create a partitioned table");
    let source = RunningSource::start(config_for(&name, &[&table])).await;
    client
        .batch_execute(&format!("INSERT INTO {table} VALUES (1, 'eu'), (2, 'us')"))
        .await
        .unwrap();
    let records = read_topic(&format!("{name}.public.{name}"), 2, Duration::from_secs(60)).await;
    for record in &records {
        assert_eq!(
            value(record)["source"]["table"],
            name.as_str(),
            "events carry the root's name"
        );
    }
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_renamed_table_stops_the_source_with_the_fix_and_streams_under_its_new_name_after() {
    let name = name("src_rename");
    let table = format!("public.{name}");
    let renamed = format!("public.{name}_renamed");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text)"
        ))
        .await
        .expect("create table");
    let source = RunningSource::start(config_for(&name, &[&table])).await;
    client
        .batch_execute(&format!("INSERT INTO {table} VALUES (1, 'before')"))
        .await
        .unwrap();
    let old_topic = format!("{name}.public.{name}");
    read_topic(&old_topic, 1, Duration::from_secs(60)).await;
    client
        .batch_execute(&format!(
            "ALTER TABLE {table} RENAME TO {name}_renamed; ALTER TABLE {renamed} ADD COLUMN extra int;
             INSERT INTO {renamed} VALUES (2, 'after', 7);"
        ))
        .await
        .unwrap();
    // Events under the new name on the old topic would contradict their topic (the sink
    // routes by topic and would dead-letter them): the source stops and says what to change.
    let error = source
        .exited(Duration::from_secs(60))
        .await
        .expect_err("the source stops on the rename");
    let message = format!("{error:#}");
    assert!(
        message.contains(&table) && message.contains(&renamed),
        "{message}"
    );
    assert!(message.contains("postgres.tables"), "{message}");
    let old_records = read_whole_topic(&old_topic, Duration::from_secs(30)).await;
    let changes: Vec<&Value> = old_records.iter().map(|r| &value(r)["after"]).collect();
    assert_eq!(
        changes,
        [&json!({"id": 1, "note": "before"})],
        "nothing after the rename went to the old topic"
    );

    // The fix it names: the new name in postgres.tables. The change after the rename is
    // decoded again, from the slot's confirmed position, under the new name.
    let source = RunningSource::start(config_for(&name, &[&renamed])).await;
    let new_topic = format!("{name}.public.{name}_renamed");
    let mut records = Vec::new();
    read_topic_until(&new_topic, Duration::from_secs(60), |record| {
        let done = value(&record)["op"] == "c" && value(&record)["after"]["id"] == 2;
        records.push(record);
        done
    })
    .await;
    let streamed: Vec<&Value> = records
        .iter()
        .filter(|r| value(r)["op"] == "c")
        .map(|r| &value(r)["after"])
        .collect();
    assert_eq!(
        streamed,
        [&json!({"id": 2, "note": "after", "extra": 7})],
        "the change after the rename reached the new name's topic, once"
    );
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;
}

/// Two captured tables swap names (the zero-downtime migration pattern, in one transaction),
/// then a row goes into the one now named `_a`. With `seen_before`, both tables had a change
/// since the source started. Returns the source's error and the notes of the changes the `_a`
/// topic holds.
async fn swap_two_captured_tables(label: &str, seen_before: bool) -> (String, String, Vec<Value>) {
    let name = name(label);
    let first = format!("public.{name}_a");
    let second = format!("public.{name}_b");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {first} (id int PRIMARY KEY, note text);
             CREATE TABLE {second} (id int PRIMARY KEY, note text);"
        ))
        .await
        .expect("create the tables");
    let source = RunningSource::start(config_for(&name, &[&first, &second])).await;
    let first_topic = format!("{name}.public.{name}_a");
    if seen_before {
        client
            .batch_execute(&format!(
                "INSERT INTO {first} VALUES (1, 'a'); INSERT INTO {second} VALUES (1, 'b');"
            ))
            .await
            .expect("a change of each");
        read_topic(&first_topic, 1, Duration::from_secs(60)).await;
        read_topic(
            &format!("{name}.public.{name}_b"),
            1,
            Duration::from_secs(60),
        )
        .await;
    }
    client
        .batch_execute(&format!(
            "BEGIN;
             ALTER TABLE {first} RENAME TO {name}_tmp;
             ALTER TABLE {second} RENAME TO {name}_a;
             ALTER TABLE public.{name}_tmp RENAME TO {name}_b;
             COMMIT;
             INSERT INTO {first} VALUES (2, 'was b');"
        ))
        .await
        .expect("swap");
    let error = source
        .exited(Duration::from_secs(60))
        .await
        .expect_err("the source stops on the swap");
    // (The topic also holds the copy's control records, one per partition.)
    let notes = read_whole_topic(&first_topic, Duration::from_secs(30))
        .await
        .iter()
        .map(value)
        .filter(|record| record.get("op").is_some())
        .map(|record| record["after"]["note"].clone())
        .collect();
    drop_slot(&name).await;
    (name, format!("{error:#}"), notes)
}

#[tokio::test]
async fn two_captured_tables_swapping_names_stop_the_source_before_either_topic_gets_the_others_rows()
 {
    let (name, message, notes) = swap_two_captured_tables("src_swap", true).await;
    assert!(
        message.contains(&format!("public.{name}_b was renamed to public.{name}_a")),
        "{message}"
    );
    assert!(message.contains("pg_replication_slot_advance"), "{message}");
    assert_eq!(
        notes,
        [json!("a")],
        "nothing of the other table reached the topic"
    );
}

#[tokio::test]
async fn a_swap_made_while_the_source_was_stopped_stops_it_once_at_the_swap_and_the_fix_gets_it_going()
 {
    let name = name("src_swap_stopped");
    let first = format!("public.{name}_a");
    let second = format!("public.{name}_b");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {first} (id int PRIMARY KEY, note text);
             CREATE TABLE {second} (id int PRIMARY KEY, note text);"
        ))
        .await
        .expect("create the tables");
    let config = config_for(&name, &[&first, &second]);
    let source = RunningSource::start(config.clone()).await;
    assert_eq!(source.stop().await, SourceExit::Drained);
    // While it is stopped: a change of the old `_a`, the swap, a change of the new `_a`.
    client
        .batch_execute(&format!(
            "INSERT INTO {first} VALUES (1, 'old a');
             BEGIN;
             ALTER TABLE {first} RENAME TO {name}_tmp;
             ALTER TABLE {second} RENAME TO {name}_a;
             ALTER TABLE public.{name}_tmp RENAME TO {name}_b;
             COMMIT;
             INSERT INTO {first} VALUES (2, 'was b');"
        ))
        .await
        .expect("swap while stopped");
    let error = RunningSource::start_without_waiting(config.clone())
        .exited(Duration::from_secs(60))
        .await
        .expect_err("the source stops where the stream reaches the new relation");
    let message = format!("{error:#}");
    assert!(message.contains("no longer relation"), "{message}");
    let first_topic = format!("{name}.public.{name}_a");
    let notes: Vec<Value> = read_whole_topic(&first_topic, Duration::from_secs(30))
        .await
        .iter()
        .map(value)
        .filter(|record| record.get("op").is_some())
        .map(|record| record["after"]["note"].clone())
        .collect();
    assert_eq!(
        notes,
        [json!("old a")],
        "the old relation's change before the swap went on; nothing after"
    );
    // The way out the message gives: move the slot past that transaction, start again.
    let skip_to = message
        .split("pg_replication_slot_advance('<postgres.slot>', '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the message names where to move the slot")
        .to_owned();
    client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&config.postgres.slot, &skip_to],
        )
        .await
        .expect("advance the slot");
    let source = RunningSource::start(config.clone()).await;
    client
        .batch_execute(&format!("INSERT INTO {first} VALUES (3, 'new a')"))
        .await
        .expect("a change after the fix");
    read_topic_until(&first_topic, Duration::from_secs(60), |record| {
        record
            .value
            .as_ref()
            .is_some_and(|value| value["after"]["note"] == "new a")
    })
    .await;
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_swap_of_tables_the_stream_has_not_seen_yet_stops_the_source_too() {
    // No change of either table since the source started: it knows them only by the OIDs the
    // names had at its start.
    let (name, message, notes) = swap_two_captured_tables("src_swap_unseen", false).await;
    assert!(
        message.contains(&format!("public.{name}_a")) && message.contains("not the relation"),
        "{message}"
    );
    assert!(
        message.contains("Kafka acknowledged every event sent before the stop"),
        "{message}"
    );
    assert!(
        notes.is_empty(),
        "nothing of the other table reached the topic: {notes:?}"
    );
}
