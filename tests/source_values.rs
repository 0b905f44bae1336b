//! What values look like after streaming: the shared SQL-literal table, unchanged TOAST values,
//! and schema changes in the middle of a stream.

mod common;

use std::time::Duration;

use common::kafka::{Consumed, read_topic};
use common::literals::{LITERALS, TEST_TYPES_SQL, same_json};
use common::source::{RunningSource, config_for, drop_slot, name, sql};
use serde_json::{Value, json};
use walsync::source::SourceExit;

fn value(record: &Consumed) -> &Value {
    record.value.as_ref().expect("not a tombstone")
}

fn after(record: &Consumed) -> &Value {
    &value(record)["after"]
}

#[tokio::test]
async fn every_literal_of_the_shared_table_streams_as_expected() {
    let name = name("src_literals");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(TEST_TYPES_SQL)
        .await
        .expect("create the test types");
    let columns: Vec<String> = LITERALS
        .iter()
        .enumerate()
        .map(|(i, literal)| format!("v{i} {}", literal.sql_type))
        .collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, {})",
            columns.join(", ")
        ))
        .await
        .expect("create a table with one column per literal");
    let source = RunningSource::start(config_for(&name, &[&table])).await;

    let values: Vec<String> = LITERALS
        .iter()
        .map(|literal| format!("({})::{}", literal.literal, literal.sql_type))
        .collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, {})",
            values.join(", ")
        ))
        .await
        .expect("insert every literal");

    let records = read_topic(&format!("{name}.public.{name}"), 1, Duration::from_secs(60)).await;
    let row = records[0].raw_after();
    let mut failures = Vec::new();
    for (i, literal) in LITERALS.iter().enumerate() {
        let actual = row[&format!("v{i}")].get();
        if !same_json(literal.expected, actual) {
            failures.push(format!(
                "({})::{} streamed as {actual}, expected {}",
                literal.literal, literal.sql_type, literal.expected
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;
}

/// An incompressible value large enough to be stored out of line.
const BIG: &str = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)";

#[tokio::test]
async fn unchanged_toast_values_are_listed_under_default_identity_and_filled_under_full() {
    let name = name("src_toast");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, big text, note text);
             ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create table");
    let source = RunningSource::start(config_for(&name, &[&table])).await;
    let big: String = client
        .query_one(&format!("SELECT {BIG}"), &[])
        .await
        .unwrap()
        .get(0);

    for statement in [
        format!("INSERT INTO {table} VALUES (1, {BIG}, 'a')"),
        // DEFAULT identity: update of another column, then a key change, big untouched.
        format!("UPDATE {table} SET note = 'b' WHERE id = 1"),
        format!("UPDATE {table} SET id = 2 WHERE id = 1"),
        // FULL identity: the old tuple carries big, so it is filled in.
        format!("ALTER TABLE {table} REPLICA IDENTITY FULL"),
        format!("UPDATE {table} SET note = 'c' WHERE id = 2"),
        format!("UPDATE {table} SET id = 3 WHERE id = 2"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }

    // insert, update, delete + tombstone + create, update, delete + tombstone + create
    let records = read_topic(&format!("{name}.public.{name}"), 9, Duration::from_secs(60)).await;
    let mut events: Vec<&Consumed> = records.iter().filter(|r| r.value.is_some()).collect();
    // A key change's delete and create share one WAL record: the delete comes first.
    events.sort_by_key(|r| {
        (
            r.commit_lsn(),
            value(r)["source"]["lsn"].as_u64(),
            r.op() == Some("c"),
        )
    });
    let ops: Vec<&str> = events.iter().map(|r| r.op().unwrap()).collect();
    assert_eq!(ops, ["c", "u", "d", "c", "u", "d", "c"]);

    assert_eq!(after(events[0])["big"], big.as_str());

    let default_update = value(events[1]);
    assert!(
        default_update["after"].get("big").is_none(),
        "the value did not travel: absent, not null"
    );
    assert_eq!(default_update["after"]["note"], "b");
    assert_eq!(default_update["unchanged_toast_columns"], json!(["big"]));

    let default_key_change = value(events[3]);
    assert_eq!(default_key_change["after"]["id"], 2);
    assert!(default_key_change["after"].get("big").is_none());
    assert_eq!(
        default_key_change["unchanged_toast_columns"],
        json!(["big"])
    );

    let full_update = value(events[4]);
    assert_eq!(
        full_update["after"]["big"],
        big.as_str(),
        "filled from the old tuple"
    );
    assert_eq!(full_update["after"]["note"], "c");
    assert!(full_update.get("unchanged_toast_columns").is_none());
    assert_eq!(full_update["before"]["big"], big.as_str());

    let full_key_change = value(events[6]);
    assert_eq!(full_key_change["after"]["id"], 3);
    assert_eq!(full_key_change["after"]["big"], big.as_str());
    assert!(full_key_change.get("unchanged_toast_columns").is_none());

    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;
}

#[tokio::test]
async fn column_changes_mid_stream_give_each_event_the_shape_of_its_time() {
    let name = name("src_ddl");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, price int, old_col text)"
        ))
        .await
        .expect("create table");
    let source = RunningSource::start(config_for(&name, &[&table])).await;

    for statement in [
        format!("INSERT INTO {table} VALUES (1, 10, 'x')"),
        format!("ALTER TABLE {table} ADD COLUMN color text DEFAULT 'red'"),
        format!("INSERT INTO {table} VALUES (2, 20, 'y', 'blue')"),
        format!("ALTER TABLE {table} DROP COLUMN old_col"),
        format!("INSERT INTO {table} VALUES (3, 30, 'green')"),
        format!("ALTER TABLE {table} ALTER COLUMN price TYPE numeric(10,2)"),
        format!("INSERT INTO {table} VALUES (4, 40.5, 'black')"),
        format!("UPDATE {table} SET color = 'white' WHERE id = 1"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }

    let records = read_topic(&format!("{name}.public.{name}"), 5, Duration::from_secs(60)).await;
    let mut events: Vec<&Consumed> = records.iter().collect();
    events.sort_by_key(|r| r.commit_lsn());
    let images: Vec<&Value> = events.iter().map(|r| after(r)).collect();
    assert_eq!(images[0], &json!({"id": 1, "price": 10, "old_col": "x"}));
    assert_eq!(
        images[1],
        &json!({"id": 2, "price": 20, "old_col": "y", "color": "blue"})
    );
    assert_eq!(images[2], &json!({"id": 3, "price": 30, "color": "green"}));
    assert_eq!(
        images[3],
        &json!({"id": 4, "price": "40.50", "color": "black"})
    );
    assert_eq!(
        images[4],
        &json!({"id": 1, "price": "10.00", "color": "white"}),
        "the rewritten table's old row, in the new shape"
    );
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_slot(&name).await;
}
