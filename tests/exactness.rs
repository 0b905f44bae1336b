//! The index equals the table: one test per divergence the independent check of issue #11
//! found, against the real stack. Each of those nine failed on f2ed01d (checked). The rest guard
//! cases that had no test: a topic created after the sink started (it depends on the explicit
//! start of never-committed partitions, since `auto.offset.reset = error`; a mutation that
//! drops it makes the test fail), TOAST fills with renames and exclusions, and a truncate mark
//! across a restart; those pass on f2ed01d too.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::kafka::read_topic_until;
use common::pipeline::{
    RunningPipeline, alias_of, compare, pipeline_config, search_client, verify_compare, wait_equal,
};
use common::process::{Walsync, test_binary};
use common::scratch::ScratchPg;
use common::sink::{
    RunningSink, apply_first, items_alias, items_config, items_topic, produce_keyed,
    stored_document, stored_source_text,
};
use common::source::{drop_slot, name, sql};
use common::{stack, wait_for};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use walsync::config::Config;
use walsync::sink::index::refresh;

const SYSTEM_ID: &str = "7000000000000000011";

/// A large text stored out of line, different for each `seed`.
fn big(seed: &str) -> String {
    format!("(SELECT string_agg(md5(g::text || '{seed}'), '') FROM generate_series(1, 600) g)")
}

async fn toast_table(client: &tokio_postgres::Client, table: &str, key: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} ({key} PRIMARY KEY, note text, big text);
             ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create the table");
}

async fn wait_document(alias: &str, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(60), || async {
        stored_document(alias, id)
            .await
            .filter(|document| check(document))
    })
    .await
}

/// A sink configuration whose captured table `<prefix>_s.items` exists in PostgreSQL (for the
/// re-reads of hand-written records), created by `setup` (SQL with `{schema}` for the schema):
/// the configuration, the schema, the topic (created) and the alias.
async fn items_table_for_rereads(config: Config, setup: &str) -> (Config, String, String, String) {
    let schema = format!("{}_s", config.kafka.topic_prefix);
    let mut config = config;
    config.postgres.tables = vec![format!("{schema}.items")];
    sql()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; {}",
            setup.replace("{schema}", &schema)
        ))
        .await
        .expect("create the table");
    let topic = format!("{}.{schema}.items", config.kafka.topic_prefix);
    walsync::kafka::topics::ensure_topics(&config.kafka, std::slice::from_ref(&topic))
        .await
        .expect("create the topic");
    let alias = format!("{}{schema}.items", config.elasticsearch.index_prefix);
    (config, schema, topic, alias)
}

/// `event` with its `source.schema` set to `schema`.
fn in_schema(schema: &str, (key, mut value): (String, Value)) -> (String, Value) {
    value["source"]["schema"] = json!(schema);
    (key, value)
}

/// Runs `sql`, panicking with `what` when it fails.
async fn run(client: &tokio_postgres::Client, sql: &str, what: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|error| panic!("{what}: {error}"));
}

async fn md5_of_big(client: &tokio_postgres::Client, table: &str, condition: &str) -> String {
    client
        .query_one(
            &format!("SELECT md5(big) FROM {table} WHERE {condition}"),
            &[],
        )
        .await
        .expect("read the row")
        .get(0)
}

fn md5_of(value: &Value) -> String {
    use std::fmt::Write as _;
    let text = value.as_str().expect("a text value");
    let digest = md5_digest(text.as_bytes());
    digest.iter().fold(String::new(), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// MD5 by the coreutils `md5sum`, so the test needs no hashing crate.
fn md5_digest(bytes: &[u8]) -> Vec<u8> {
    let output = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().expect("stdin").write_all(bytes)?;
            child.wait_with_output()
        })
        .expect("run md5sum");
    let hex = String::from_utf8(output.stdout).expect("md5sum prints text");
    (0..32)
        .step_by(2)
        .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Numbers are never re-formatted, and verify compares values exactly.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn numbers_reach_the_document_digit_for_digit_and_verify_sees_a_one_ulp_change() {
    let name = name("exact_numbers");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, f float8, j jsonb, n numeric, big text);
             ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create the table");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES
               (1, 0.9407462388099621, '{{\"n\": 0.90372028726197960001, \"big\": 123456789012345678901234567890}}',
                1234567890123456789012345678901234567890.5, {big}),
               (2, 5e-324, '{{\"n\": [0.9037202872619797, 1.50]}}', 'NaN', 'small')",
            big = big("one")
        ))
        .await
        .expect("insert");
    let alias = alias_of(&config, "public", &name);
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    let jsonb: String = client
        .query_one(&format!("SELECT j::text FROM {table} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    let source = stored_source_text(&alias, "1").await.expect("document 1");
    for expected in [
        "\"f\":0.9407462388099621".to_owned(),
        format!("\"j\":{jsonb}"),
        "\"n\":\"1234567890123456789012345678901234567890.5\"".to_owned(),
    ] {
        assert!(source.contains(&expected), "{expected} not in {source}");
    }
    let source = stored_source_text(&alias, "2").await.expect("document 2");
    assert!(source.contains("\"f\":5e-324"), "{source}");
    assert!(source.contains("[0.9037202872619797, 1.50]"), "{source}");
    pipeline.stop().await;

    // verify's comparison core: a one-ulp change, a wrong TOAST value, a missing document.
    // Documents are written by hand as text: parsing them would re-format their numbers.
    let search = search_client();
    let original = stored_source_text(&alias, "1").await.unwrap();
    let write_text = |text: String| {
        let search = search.clone();
        let alias = alias.clone();
        async move {
            let response = search
                .send(
                    elasticsearch::http::Method::Put,
                    &format!("/{alias}/_doc/1"),
                    elasticsearch::http::headers::HeaderMap::new(),
                    Option::<&()>::None,
                    Some(text),
                    None,
                )
                .await
                .expect("write document 1 by hand");
            assert!(response.status_code().is_success());
        }
    };
    // 0.9407462388099622 is the next float8 after 0.9407462388099621.
    write_text(original.replace("0.9407462388099621", "0.9407462388099622")).await;
    let report = verify_compare(&config, "public", &name, &["id"]).await;
    assert_eq!(report.different.len(), 1, "{report:#?}");
    assert_eq!(report.different[0].1, ["f"], "{report:#?}");
    // The oracle, which shares no code with verify, sees the same difference.
    let oracle = compare(&config, "public", &name, &["id"]).await;
    assert_eq!(oracle.differing.len(), 1, "{oracle}");
    assert_eq!(oracle.differing[0].fields, ["f"], "{oracle}");

    let parsed: Value = serde_json::from_str(&original).unwrap();
    let big_value = parsed["big"].as_str().unwrap();
    write_text(original.replace(big_value, "not the row's value")).await;
    let report = verify_compare(&config, "public", &name, &["id"]).await;
    assert_eq!(report.different[0].1, ["big"], "{report:#?}");
    let oracle = compare(&config, "public", &name, &["id"]).await;
    assert_eq!(oracle.differing[0].fields, ["big"], "{oracle}");

    let response = search
        .delete(elasticsearch::DeleteParts::IndexId(&alias, "2"))
        .send()
        .await
        .expect("delete document 2");
    assert!(response.status_code().is_success());
    refresh(&search, &alias).await.unwrap();
    let report = verify_compare(&config, "public", &name, &["id"]).await;
    assert_eq!(report.missing, ["2"], "{report:#?}");
    let oracle = compare(&config, "public", &name, &["id"]).await;
    assert_eq!(oracle.missing, ["2"], "{oracle}");
    drop_slot(&name).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Unchanged TOAST values come from the row's own latest state only.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_key_change_onto_a_key_deleted_in_the_same_transaction_keeps_the_moved_rows_toast() {
    let name = name("exact_toast_move");
    let table = format!("public.{name}");
    let client = sql().await;
    toast_table(&client, &table, "id int").await;
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'a', {}), (2, 'b', {})",
            big("one"),
            big("two")
        ))
        .await
        .expect("insert");
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    let moved = md5_of_big(&client, &table, "id = 1").await;
    client
        .batch_execute(&format!(
            "BEGIN; DELETE FROM {table} WHERE id = 2; UPDATE {table} SET id = 2 WHERE id = 1; COMMIT;
             UPDATE {table} SET note = 'after' WHERE id = 2;"
        ))
        .await
        .expect("move row 1 onto the deleted key 2");
    let alias = alias_of(&config, "public", &name);
    let document = wait_document(&alias, "2", "document 2 after the move", |document| {
        document["note"] == "after"
    })
    .await;
    assert_eq!(
        md5_of(&document["big"]),
        moved,
        "document 2 has the moved row's big"
    );
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

/// The sink-only configuration of one table `public.items` whose events a test writes itself.
fn sink_config(name: &str) -> Config {
    let mut config = items_config(name);
    config.sink.linger_ms = 20;
    config
}

/// An event of `public.items`; `after` as given, `unchanged` its unchanged TOAST columns.
fn event(op: &str, id: i64, after: Value, commit_lsn: u64, unchanged: &[&str]) -> (String, Value) {
    let mut value = json!({
        "before": if op == "d" { json!({"id": id}) } else { Value::Null },
        "after": if op == "d" { Value::Null } else { after },
        "op": op,
        "ts_ms": 0,
        "source": {"version": "test", "connector": "walsync", "db": "walsync",
                   "schema": "public", "table": "items", "txId": 1, "lsn": commit_lsn - 1,
                   "commit_lsn": commit_lsn, "ts_ms": 0,
                   "snapshot": if op == "r" { "true" } else { "false" },
                   "system_id": SYSTEM_ID, "timeline": 1}
    });
    if !unchanged.is_empty() {
        value["unchanged_toast_columns"] = json!(unchanged);
    }
    (json!({ "id": id }).to_string(), value)
}

#[tokio::test]
async fn a_snapshot_row_a_streamed_change_superseded_never_fills_a_later_update() {
    let (config, schema, topic, alias) = items_table_for_rereads(
        sink_config(&name("exact_toast_snapshot")),
        "CREATE TABLE {schema}.items (id int PRIMARY KEY, note text, big text);
         INSERT INTO {schema}.items VALUES (1, 'b', 'new');",
    )
    .await;
    // A streamed change (big = "new") is applied first.
    apply_first(
        &config,
        &topic,
        &[in_schema(
            &schema,
            event(
                "u",
                1,
                json!({"id": 1, "note": "a", "big": "new"}),
                1_000,
                &[],
            ),
        )],
    )
    .await;
    // Then, in one batch: the copy's stale row (cp − 1 below the change) and an update that
    // left big untouched.
    produce_keyed(
        &topic,
        &[
            in_schema(
                &schema,
                event(
                    "r",
                    1,
                    json!({"id": 1, "note": "a", "big": "old"}),
                    499,
                    &[],
                ),
            ),
            in_schema(
                &schema,
                event("u", 1, json!({"id": 1, "note": "b"}), 1_100, &["big"]),
            ),
        ],
    )
    .await;
    let sink = RunningSink::start(config.clone()).await;
    let document = wait_document(&alias, "1", "the update", |document| {
        document["note"] == "b"
    })
    .await;
    sink.stop().await.expect("clean stop");
    assert_eq!(
        document["big"], "new",
        "filled from the row's state, not the stale copy"
    );
}

// Found by review after the fix: a stored document is not proof of the row's previous state
// (an event in between may have been dead-lettered), the re-read's view of the table must follow
// the table, and a key change must not be re-read before its own transaction is visible.

#[tokio::test]
async fn an_update_after_a_dead_lettered_one_takes_the_rows_toast_value_not_the_older_documents() {
    let name = name("exact_dlq_fill");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note jsonb, big text);
             ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create the table");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, '\"a string\"', {})",
            big("zero")
        ))
        .await
        .expect("insert");
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    // `note` is mapped as text by its first value: the server refuses an object, and this
    // change of `big` is dead-lettered.
    client
        .batch_execute(&format!(
            "UPDATE {table} SET note = '{{\"an\": \"object\"}}', big = {} WHERE id = 1",
            big("one")
        ))
        .await
        .expect("the refused update");
    wait_for(
        "the refused update to be dead-lettered",
        Duration::from_secs(60),
        || {
            let dead = pipeline.stats.dead_lettered.load(Ordering::Relaxed);
            async move { (dead >= 1).then_some(()) }
        },
    )
    .await;
    // Leaves `big` untouched: its value must come from the row, not from the stored document,
    // which holds the value before the dead-lettered change.
    client
        .batch_execute(&format!(
            "UPDATE {table} SET note = '\"fixed\"' WHERE id = 1"
        ))
        .await
        .expect("the accepted update");
    let alias = alias_of(&config, "public", &name);
    let document = wait_document(&alias, "1", "the accepted update", |document| {
        document["note"] == "fixed"
    })
    .await;
    assert_eq!(
        md5_of(&document["big"]),
        md5_of_big(&client, &table, "id = 1").await,
        "the document holds the row's big, not the one before the dead-lettered change"
    );
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn the_re_read_follows_columns_added_and_retyped_after_it_first_read_the_table() {
    let name = name("exact_reread_ddl");
    let table = format!("public.{name}");
    let client = sql().await;
    toast_table(&client, &table, "id int").await;
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    let wait = || wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60));
    run(
        &client,
        &format!("INSERT INTO {table} VALUES (1, 'a', {})", big("one")),
        "insert",
    )
    .await;
    wait().await;
    // A key change is re-read: the reader learns the table's columns now.
    run(
        &client,
        &format!("UPDATE {table} SET id = 2 WHERE id = 1"),
        "the first key change",
    )
    .await;
    wait().await;
    run(
        &client,
        &format!(
            "ALTER TABLE {table} ADD COLUMN big2 text;
             ALTER TABLE {table} ALTER COLUMN big2 SET STORAGE EXTERNAL;
             UPDATE {table} SET big2 = {} WHERE id = 2;",
            big("two")
        ),
        "add a column",
    )
    .await;
    wait().await;
    // Needs big and big2, which the reader's first view of the table lacks.
    run(
        &client,
        &format!("UPDATE {table} SET id = 3 WHERE id = 2"),
        "the second key change",
    )
    .await;
    wait().await;
    // A bytea value is base64 in the document; read as the text it was, it would be hex.
    run(
        &client,
        &format!(
            "ALTER TABLE {table} ALTER COLUMN big2 TYPE bytea USING convert_to(big2, 'UTF8');
             ALTER TABLE {table} ALTER COLUMN big2 SET STORAGE EXTERNAL;
             UPDATE {table} SET big2 = big2 || '\\x00'::bytea WHERE id = 3;
             UPDATE {table} SET id = 4 WHERE id = 3;"
        ),
        "retype the column, then change the key",
    )
    .await;
    wait().await;
    let alias = alias_of(&config, "public", &name);
    let document = stored_document(&alias, "4").await.expect("document 4");
    assert!(
        document.get("big2").is_some_and(Value::is_string),
        "{document}"
    );
    pipeline.stop().await;
    drop_slot(&name).await;
}

/// A TOAST table keyed by `key`, captured by a running pipeline, through `steps`: each is SQL
/// (`{table}` stands for the table, `{big1}` and `{big2}` for two large values) and what it
/// does; the index must equal the table after each. An update of one row in a step of its own
/// is re-read (nothing earlier in its batch).
async fn rereads_through(label: &str, key: &str, steps: &[(&str, &str)]) {
    let name = name(label);
    let table = format!("public.{name}");
    let client = sql().await;
    toast_table(&client, &table, key).await;
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    for (statements, what) in steps {
        let statements = statements
            .replace("{table}", &table)
            .replace("{big1}", &big("one"))
            .replace("{big2}", &big("two"));
        run(&client, &statements, what).await;
        wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    }
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn the_re_read_follows_key_columns_retyped_after_it_first_read_the_table() {
    // A key cast to the length the reader first saw ('abcdefgh'::varchar(5) is 'abcde') would
    // find another row and fill its value.
    rereads_through(
        "exact_reread_key_ddl",
        "id varchar(5)",
        &[
            (
                "INSERT INTO {table} VALUES ('abcde', 'a', {big1})",
                "insert",
            ),
            // The reader learns the table with id varchar(5).
            (
                "UPDATE {table} SET note = 'b' WHERE id = 'abcde'",
                "the first re-read",
            ),
            (
                "ALTER TABLE {table} ALTER COLUMN id TYPE varchar(10);
                 INSERT INTO {table} VALUES ('abcdefgh', 'c', {big2});",
                "widen the key, insert a long one",
            ),
            (
                "UPDATE {table} SET note = 'd' WHERE id = 'abcdefgh'",
                "update the long key",
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn the_re_read_follows_an_integer_key_widened_after_it_first_read_the_table() {
    // Cast to int4, the key would overflow (22003) and the update be dead-lettered.
    rereads_through(
        "exact_reread_int_key",
        "id int",
        &[
            ("INSERT INTO {table} VALUES (1, 'a', {big1})", "insert"),
            (
                "UPDATE {table} SET note = 'b' WHERE id = 1",
                "the first re-read",
            ),
            (
                "ALTER TABLE {table} ALTER COLUMN id TYPE bigint;
                 INSERT INTO {table} VALUES (5000000000, 'c', {big2});",
                "widen the key, insert a key beyond int4",
            ),
            (
                "UPDATE {table} SET note = 'd' WHERE id = 5000000000",
                "update it",
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_char_key_is_re_read_by_its_whole_value() {
    // Cast to bare `character` (char(1)), 'abcde' would be 'a': another row's value.
    rereads_through(
        "exact_char_key",
        "id char(5)",
        &[
            (
                "INSERT INTO {table} VALUES ('abcde', 'a', {big1}), ('a', 'b', {big2})",
                "insert",
            ),
            (
                "UPDATE {table} SET note = 'c' WHERE id = 'abcde'",
                "update the long key",
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_key_change_is_re_read_only_once_its_own_transaction_is_visible() {
    // Commits wait for a synchronous standby that never comes: decoded and streamed as soon as
    // the commit record is flushed, but invisible to every reader until the wait ends.
    // Sessions commit locally unless they ask for the standby, as the moving one does.
    // Epoch 1: the waiting transaction's full id is above 2³² and above the snapshot's xmax —
    // the case a wrong epoch would call visible (and long committed).
    let cluster = ScratchPg::up_at_xid_epoch(
        1,
        &[
            "-c",
            "wal_level=logical",
            "-c",
            "synchronous_standby_names=nobody",
            "-c",
            "synchronous_commit=local",
        ],
    );
    let connect = |url: String| async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to the scratch cluster");
        tokio::spawn(connection);
        client
    };
    let client = connect(cluster.url.clone()).await;
    let name = name("exact_invisible");
    let table = format!("public.{name}");
    toast_table(&client, &table, "id int").await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'a', {}), (2, 'b', {})",
            big("one"),
            big("two")
        ))
        .await
        .expect("insert");
    let moved = md5_of_big(&client, &table, "id = 1").await;
    let mut config = pipeline_config(&name, &[&table]);
    config.postgres.url = cluster.url.clone();
    let pipeline = RunningPipeline::start_without_waiting(config.clone()).await;
    let alias = alias_of(&config, "public", &name);
    wait_document(&alias, "2", "the copy of row 2", |_| true).await;
    wait_document(&alias, "1", "the copy of row 1", |_| true).await;
    let retries_before = pipeline.stats.retries.load(Ordering::Relaxed);

    // A transaction that took its id before the mover's and stays open: the snapshot's xmax is
    // then at most that id, below the mover's — the mover's id is above xmax, not merely at it.
    let holder = connect(cluster.url.clone()).await;
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .expect("the holder takes an id");
    let mover = connect(cluster.url.clone()).await;
    mover
        .batch_execute("SET synchronous_commit = on")
        .await
        .expect("the mover waits for the standby");
    let mover_pid: i32 = mover
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the mover's pid")
        .get(0);
    let moving = tokio::spawn({
        let table = table.clone();
        async move {
            mover
                .batch_execute(&format!(
                    "BEGIN; DELETE FROM {table} WHERE id = 2; UPDATE {table} SET id = 2 WHERE id = 1; COMMIT;"
                ))
                .await
        }
    });
    // The sink meets the key change while its transaction waits, and must wait too.
    wait_for(
        "the re-read to wait for the transaction",
        Duration::from_secs(60),
        || {
            let retries = pipeline.stats.retries.load(Ordering::Relaxed);
            async move { (retries > retries_before).then_some(()) }
        },
    )
    .await;
    // Ends the wait: the transaction is committed locally and becomes visible.
    client
        .execute("SELECT pg_cancel_backend($1)", &[&mover_pid])
        .await
        .expect("cancel the wait for the standby");
    let _ = moving.await;
    holder
        .batch_execute("COMMIT")
        .await
        .expect("the holder ends");
    let document = wait_document(&alias, "2", "document 2 after the move", |document| {
        md5_of(&document["big"]) == moved
    })
    .await;
    assert_eq!(md5_of(&document["big"]), moved);
    assert_eq!(stored_document(&alias, "1").await, None, "row 1 moved away");
    pipeline.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The re-read binds the key's values, and has an outcome for every failure.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rows_with_bytea_and_array_keys_survive_key_changes_that_leave_toast_untouched() {
    let name = name("exact_keys");
    let bytea_table = format!("public.{name}_b");
    let array_table = format!("public.{name}_a");
    let client = sql().await;
    toast_table(&client, &bytea_table, "k bytea").await;
    toast_table(&client, &array_table, "k int[]").await;
    let config = pipeline_config(&name, &[&bytea_table, &array_table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {bytea_table} VALUES ('\\x01', 'a', {});
             INSERT INTO {array_table} VALUES ('{{1,2}}', 'a', {});
             UPDATE {bytea_table} SET k = '\\x10' WHERE k = '\\x01';
             UPDATE {array_table} SET k = '{{3,NULL}}' WHERE k = '{{1,2}}';
             UPDATE {bytea_table} SET note = 'later' WHERE k = '\\x10';
             UPDATE {array_table} SET note = 'later' WHERE k = '{{3,NULL}}';",
            big("b"),
            big("a")
        ))
        .await
        .expect("write");
    for (table, key) in [(&bytea_table, "k"), (&array_table, "k")] {
        let (_, short) = table.split_once('.').unwrap();
        wait_equal(&config, "public", short, &[key], Duration::from_secs(60)).await;
    }
    let document = stored_document(&alias_of(&config, "public", &format!("{name}_b")), "EA==")
        .await
        .expect("the moved bytea row");
    assert_eq!(document["note"], "later");
    assert_eq!(
        md5_of(&document["big"]),
        md5_of_big(&client, &bytea_table, "k = '\\x10'").await
    );
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_dropped_column_is_left_out_and_a_vanished_row_is_skipped() {
    // The topic's table: row 1 exists (without the column `gone`), row 2 does not.
    let (config, schema, topic, alias) = items_table_for_rereads(
        sink_config(&name("exact_reread")),
        "CREATE TABLE {schema}.items (id int PRIMARY KEY, note text, big text);
         INSERT INTO {schema}.items VALUES (1, 'x', 'the big value');",
    )
    .await;
    let with_schema = |event| in_schema(&schema, event);
    produce_keyed(
        &topic,
        &[
            with_schema(event(
                "u",
                1,
                json!({"id": 1, "note": "x"}),
                1_000,
                &["big", "gone"],
            )),
            with_schema(event(
                "u",
                2,
                json!({"id": 2, "note": "y"}),
                1_000,
                &["big"],
            )),
            with_schema(event(
                "c",
                3,
                json!({"id": 3, "note": "z", "big": "b"}),
                1_001,
                &[],
            )),
        ],
    )
    .await;
    let sink = RunningSink::start(config.clone()).await;
    let document = wait_document(&alias, "1", "document 1", |_| true).await;
    wait_document(&alias, "3", "document 3", |_| true).await;
    let dead = sink.stats.dead_lettered.load(Ordering::Relaxed);
    sink.stop().await.expect("clean stop");
    assert_eq!(document["big"], "the big value", "re-read by the bound key");
    assert!(document.get("gone").is_none(), "{document}");
    assert_eq!(
        stored_document(&alias, "2").await,
        None,
        "a vanished row is skipped"
    );
    assert_eq!(dead, 0);
}

// ---------------------------------------------------------------------------------------------
// 4. The topic decides, not the payload.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forged_records_are_dead_lettered_and_touch_no_other_table() {
    let name = name("exact_forged");
    let table = format!("public.{name}");
    let secret = format!("public.{name}_secret");
    let client = sql().await;
    toast_table(&client, &table, "id int").await;
    toast_table(&client, &secret, "id int").await;
    client
        .batch_execute(&format!(
            "INSERT INTO {secret} VALUES (1, 'n', 'the secret')"
        ))
        .await
        .unwrap();
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!("INSERT INTO {table} VALUES (1, 'a', 'small')"))
        .await
        .unwrap();
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    let system_id: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let topic = format!("{name}.public.{name}");
    let forged = |table_name: &str, id: i64| {
        let (key, mut value) = event("u", id, json!({"id": id, "note": "x"}), 9_000_000, &["big"]);
        value["source"]["table"] = json!(table_name);
        value["source"]["system_id"] = json!(system_id);
        (key, value)
    };
    let secret_name = format!("{name}_secret");
    produce_keyed(
        &topic,
        &[
            forged(&secret_name, 1),
            forged(&format!("{secret_name}'; select 1; --"), 1),
            forged(&secret_name, 2),
            forged(&format!("{secret_name}\"; drop table x; --"), 3),
        ],
    )
    .await;
    client
        .batch_execute(&format!("UPDATE {table} SET note = 'real' WHERE id = 1"))
        .await
        .unwrap();
    let alias = alias_of(&config, "public", &name);
    wait_document(&alias, "1", "the real update", |document| {
        document["note"] == "real"
    })
    .await;
    let mut reasons = Vec::new();
    read_topic_until(&format!("{name}.dlq"), Duration::from_secs(30), |record| {
        reasons.extend(record.headers.get("walsync.dlq.reason").cloned());
        reasons.len() >= 4
    })
    .await;
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .all(|reason| reason.contains("routed by topic")),
        "{reasons:?}"
    );
    let indices: Value = search_client()
        .cat()
        .indices(elasticsearch::cat::CatIndicesParts::Index(&[&format!(
            "{name}-*"
        )]))
        .format("json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = indices
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|index| index["index"].as_str())
        .collect();
    assert!(
        names.iter().all(|index| !index.contains("secret")),
        "{names:?}"
    );
    pipeline.stop().await;
    drop_slot(&name).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Never jump over a gap, while running.
// ---------------------------------------------------------------------------------------------

fn group_offsets(config: &Config, topic: &str, partitions: i32) -> Vec<Offset> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .set("group.id", &config.sink.group_id)
        .create()
        .expect("a consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|partition| committed.find_partition(topic, partition).unwrap().offset())
        .collect()
}

fn high_watermarks(topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .create()
        .expect("a consumer");
    (0..partitions)
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[tokio::test]
async fn a_running_sink_stops_when_records_it_has_not_applied_are_deleted() {
    let name = name("exact_gap");
    let config = sink_config(&name);
    let topic = items_topic(&config).await;
    let partitions = config.kafka.partitions;
    let first: Vec<(String, Value)> = (1..=100)
        .map(|id| {
            event(
                "c",
                id,
                json!({"id": id, "note": "first"}),
                1_000 + id as u64,
                &[],
            )
        })
        .collect();
    produce_keyed(&topic, &first).await;
    // The same consumer group as `config`'s; the [sink] section comes last.
    let toml = format!(
        "{}linger_ms = 5\n",
        common::process::pipeline_config(&name, &["public.items"])
    );
    let mut sink = Walsync::spawn_binary(&test_binary(), "sink", &name, &toml);
    let end = high_watermarks(&topic, partitions);
    wait_for(
        "the sink to commit the first records",
        Duration::from_secs(90),
        || {
            let done = group_offsets(&config, &topic, partitions)
                .iter()
                .zip(&end)
                .all(|(committed, end)| *committed == Offset::Offset(*end));
            async move { done.then_some(()) }
        },
    )
    .await;
    signal(sink.pid(), "-STOP");
    let more: Vec<(String, Value)> = (101..=5_100)
        .map(|id| {
            event(
                "c",
                id,
                json!({"id": id, "note": "second"}),
                2_000 + id as u64,
                &[],
            )
        })
        .collect();
    produce_keyed(&topic, &more).await;
    // Retention (or deleteRecords) removes most of what the sink has not applied yet.
    let high = high_watermarks(&topic, partitions);
    let mut delete = TopicPartitionList::new();
    for (partition, high) in high.iter().enumerate() {
        delete
            .add_partition_offset(&topic, partition as i32, Offset::Offset(high - 5))
            .unwrap();
    }
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .create()
        .expect("an admin client");
    admin
        .delete_records(&delete, &AdminOptions::new())
        .await
        .expect("delete records");
    signal(sink.pid(), "-CONT");
    let child = &mut sink.child;
    let status = wait_for(
        "the sink to stop on the gap",
        Duration::from_secs(90),
        || {
            let exited = child.try_wait().ok().flatten();
            async move { exited }
        },
    )
    .await;
    let log = sink.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("older than the oldest retained offset")
            || log.contains("offset out of range"),
        "{log}"
    );
    assert!(log.contains(&topic), "the message names the topic: {log}");
    assert_eq!(
        group_offsets(&config, &topic, partitions),
        end.iter()
            .map(|end| Offset::Offset(*end))
            .collect::<Vec<_>>(),
        "nothing past the gap was committed"
    );
}

#[tokio::test]
async fn the_sink_picks_up_the_topic_of_a_table_whose_topic_appears_after_it_started() {
    let name = name("exact_late_topic");
    let mut config = sink_config(&name);
    config.postgres.tables.push("public.later".into());
    let topic = items_topic(&config).await;
    produce_keyed(
        &topic,
        &[event("c", 1, json!({"id": 1, "note": "a"}), 1_000, &[])],
    )
    .await;
    let sink = RunningSink::start(config.clone()).await;
    sink.wait_processed(1).await;
    let later = format!("{name}.public.later");
    walsync::kafka::topics::ensure_topics(&config.kafka, std::slice::from_ref(&later))
        .await
        .expect("create the later topic");
    let (key, mut value) = event("c", 7, json!({"id": 7, "note": "late"}), 1_100, &[]);
    value["source"]["table"] = json!("later");
    produce_keyed(&later, &[(key, value)]).await;
    let alias = format!("{}public.later", config.elasticsearch.index_prefix);
    wait_document(&alias, "7", "the later topic's record", |document| {
        document["note"] == "late"
    })
    .await;
    sink.stop().await.expect("clean stop");
}

// ---------------------------------------------------------------------------------------------
// 6. The cluster identity is checked on every record.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn records_from_another_cluster_are_dead_lettered_not_dropped_as_stale() {
    let config = sink_config(&name("exact_cluster"));
    let topic = items_topic(&config).await;
    let alias = items_alias(&config);
    produce_keyed(
        &topic,
        &[event("c", 1, json!({"id": 1, "note": "ours"}), 90_000, &[])],
    )
    .await;
    let sink = RunningSink::start(config.clone()).await;
    sink.wait_processed(1).await;
    // A fresh cluster holding the same table: its LSNs start lower.
    let other: Vec<(String, Value)> = (1..=10)
        .map(|id| {
            let (key, mut value) = event(
                "c",
                id,
                json!({"id": id, "note": "theirs"}),
                500 + id as u64,
                &[],
            );
            value["source"]["system_id"] = json!("7999999999999999999");
            (key, value)
        })
        .collect();
    produce_keyed(&topic, &other).await;
    produce_keyed(
        &topic,
        &[event(
            "u",
            1,
            json!({"id": 1, "note": "ours again"}),
            90_100,
            &[],
        )],
    )
    .await;
    wait_document(&alias, "1", "our next update", |document| {
        document["note"] == "ours again"
    })
    .await;
    sink.wait_processed(12).await;
    let dead = sink.stats.dead_lettered.load(Ordering::Relaxed);
    let stale = sink.stats.stale.load(Ordering::Relaxed);
    sink.stop().await.expect("clean stop");
    assert_eq!(
        dead, 10,
        "every record of the other cluster is dead-lettered"
    );
    assert_eq!(stale, 0, "none is counted as a stale success");
    assert_eq!(stored_document(&alias, "2").await, None);
    let mut reasons = Vec::new();
    read_topic_until(
        &format!("{}.dlq", config.kafka.topic_prefix),
        Duration::from_secs(30),
        |record| {
            reasons.extend(record.headers.get("walsync.dlq.reason").cloned());
            reasons.len() >= 10
        },
    )
    .await;
    assert!(
        reasons
            .iter()
            .all(|reason| reason.contains("7999999999999999999")),
        "{reasons:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. A dead-lettered action never discards the valid events it superseded.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_dead_lettered_survivor_does_not_drop_the_delete_it_superseded() {
    let config = sink_config(&name("exact_dlq_collapse"));
    let topic = items_topic(&config).await;
    let alias = items_alias(&config);
    apply_first(
        &config,
        &topic,
        &[event(
            "c",
            1,
            json!({"id": 1, "note": "a string"}),
            1_000,
            &[],
        )],
    )
    .await;
    // One batch: a valid delete, then a re-insert the mapping refuses (note was mapped as text).
    produce_keyed(
        &topic,
        &[
            event("d", 1, Value::Null, 1_100, &[]),
            event(
                "c",
                1,
                json!({"id": 1, "note": {"an": "object"}}),
                1_200,
                &[],
            ),
        ],
    )
    .await;
    let sink = RunningSink::start(config.clone()).await;
    wait_for(
        "the rejected re-insert to be dead-lettered",
        Duration::from_secs(60),
        || {
            let dead = sink.stats.dead_lettered.load(Ordering::Relaxed);
            async move { (dead >= 1).then_some(()) }
        },
    )
    .await;
    wait_for("the delete to be applied", Duration::from_secs(60), || {
        let alias = alias.clone();
        async move { stored_document(&alias, "1").await.is_none().then_some(()) }
    })
    .await;
    let dead = sink.stats.dead_lettered.load(Ordering::Relaxed);
    sink.stop().await.expect("clean stop");
    assert_eq!(dead, 1, "only the refused re-insert is dead-lettered");
}

// ---------------------------------------------------------------------------------------------
// Untested before: the TOAST fill with renamed and excluded columns, and a truncate's mark
// against older events that arrive after a restart.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn toast_fills_follow_renames_and_exclusions() {
    let name = name("exact_toast_shape");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text, big text, secret text);
             ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL;
             ALTER TABLE {table} ALTER COLUMN secret SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create the table");
    let mut config = pipeline_config(&name, &[&table]);
    config.tables.insert(
        table.clone(),
        walsync::config::TableConfig {
            exclude_columns: vec!["secret".into()],
            rename: [("big".to_owned(), "body".to_owned())].into(),
            ..Default::default()
        },
    );
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'a', {}, {}), (2, 'a', {}, {})",
            big("one"),
            big("secret one"),
            big("two"),
            big("secret two")
        ))
        .await
        .expect("insert");
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    client
        .batch_execute(&format!(
            // From the stored document (renamed field), then a re-read (key change).
            "UPDATE {table} SET note = 'b' WHERE id = 1;
             UPDATE {table} SET id = 3 WHERE id = 2;"
        ))
        .await
        .expect("update");
    let alias = alias_of(&config, "public", &name);
    let one = wait_document(&alias, "1", "the update of row 1", |document| {
        document["note"] == "b"
    })
    .await;
    let three = wait_document(&alias, "3", "the moved row", |_| true).await;
    for (document, condition) in [(&one, "id = 1"), (&three, "id = 3")] {
        assert_eq!(
            md5_of(&document["body"]),
            md5_of_big(&client, &table, condition).await
        );
        assert!(
            document.get("big").is_none() && document.get("secret").is_none(),
            "{document}"
        );
    }
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn events_older_than_a_truncate_arriving_after_a_restart_are_dropped() {
    let config = sink_config(&name("exact_truncate_mark"));
    let topic = items_topic(&config).await;
    let alias = items_alias(&config);
    let truncate = {
        let (_, mut value) = event("t", 0, Value::Null, 2_000, &[]);
        value["after"] = Value::Null;
        value["before"] = Value::Null;
        ("{}".to_owned(), value)
    };
    produce_keyed(
        &topic,
        &[
            event("c", 1, json!({"id": 1, "note": "before"}), 1_000, &[]),
            truncate,
        ],
    )
    .await;
    let sink = RunningSink::start(config.clone()).await;
    wait_for(
        "the truncate to delete row 1",
        Duration::from_secs(60),
        || {
            let alias = alias.clone();
            async move {
                let gone = stored_document(&alias, "1").await.is_none();
                let counted = sink_has_applied_a_truncate(&alias).await;
                (gone && counted).then_some(())
            }
        },
    )
    .await;
    sink.stop().await.expect("clean stop");
    // A pre-truncate event of another partition that only arrives now, after the restart, and
    // one after the truncate.
    produce_keyed(
        &topic,
        &[
            event(
                "c",
                2,
                json!({"id": 2, "note": "older than the truncate"}),
                1_500,
                &[],
            ),
            event("c", 3, json!({"id": 3, "note": "after"}), 2_100, &[]),
        ],
    )
    .await;
    let sink = RunningSink::start(config.clone()).await;
    wait_document(&alias, "3", "the event after the truncate", |_| true).await;
    wait_for(
        "the older event to be dropped",
        Duration::from_secs(60),
        || {
            let dropped = sink.stats.dropped_before_truncate.load(Ordering::Relaxed);
            async move { (dropped >= 1).then_some(()) }
        },
    )
    .await;
    sink.stop().await.expect("clean stop");
    assert_eq!(
        stored_document(&alias, "2").await,
        None,
        "the mark survived the restart"
    );
}

/// Whether the index behind `alias` records a truncate mark.
async fn sink_has_applied_a_truncate(alias: &str) -> bool {
    let response = search_client()
        .send(
            elasticsearch::http::Method::Get,
            &format!("/{alias}/_mapping"),
            elasticsearch::http::headers::HeaderMap::new(),
            Option::<&()>::None,
            Option::<&[u8]>::None,
            None,
        )
        .await
        .expect("read the mapping");
    let mapping: Value = response.json().await.expect("a mapping");
    mapping
        .as_object()
        .into_iter()
        .flat_map(|indices| indices.values())
        .any(|index| index["mappings"]["_meta"]["walsync"]["truncated_before"] == json!(2_000))
}
