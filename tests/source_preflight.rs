//! The source's failure modes against real PostgreSQL: each stops with one error naming the
//! fix, exits non-zero as the release binary (`target/release/walsync`, built by `make test`),
//! and changes nothing in the database. Also the accepted variant of a table without a primary
//! key, a row larger than Kafka accepts, and the transactional heartbeat.
//!
//! Nothing here pauses or stops a shared service; `wal_level = replica` gets a throwaway
//! cluster of its own (`scripts/stack scratch-pg`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::kafka::read_topic;
use common::process::{Walsync, source_config};
use common::scratch::{ScratchPg, stack_script};
use common::source::{RunningSource, config_for, name, sql};
use common::{admin_client, stack, wait_for};
use serde_json::json;
use tokio::sync::{RwLock, watch};
use tokio_postgres::Client;
use walsync::config::{Config, TableConfig};
use walsync::lsn::Lsn;
use walsync::source::{self, SourceExit};

/// A source that starts creates walsync's schema in a database that has none. Tests that check
/// "nothing was changed" hold this shared while they look, and tests that start a source hold
/// it exclusively until it streams, so a neighbour's first migration is never mistaken for a
/// change made by a refused start.
static MIGRATIONS: RwLock<()> = RwLock::const_new(());

/// Runs SQL as the superuser through `scripts/stack psql`: usable from `Drop`.
fn admin_psql(sql: &str) -> Option<String> {
    let output = stack_script().args(["psql", "-Atc", sql]).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Drops a replication slot when the test ends, failing or not. Its walsender may hold it a
/// moment after the client went away, so this retries for a while.
struct SlotCleanup(String);

impl Drop for SlotCleanup {
    fn drop(&mut self) {
        let name = self.0.replace('\'', "''");
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let _ = admin_psql(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{name}' AND NOT active"
            ));
            let left = admin_psql(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}'"
            ));
            if left.as_deref() == Some("0") || Instant::now() > end {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The refusal of a source that must not start, as its operator reads it.
async fn refusal(config: Config) -> String {
    let (_stop, stopped) = watch::channel(false);
    let outcome = tokio::time::timeout(Duration::from_secs(60), source::run(config, stopped))
        .await
        .expect("a refused start returns within 60 s");
    format!(
        "{:#}",
        outcome.expect_err("the source must refuse to start")
    )
}

/// One problem, stated with every expected phrase, under the "nothing was changed" heading.
#[track_caller]
fn assert_one_problem(message: &str, expected: &[&str]) {
    assert!(
        message.contains("the source cannot start; nothing was changed"),
        "{message}"
    );
    assert_eq!(
        message.matches('✗').count(),
        1,
        "exactly one problem: {message}"
    );
    for phrase in expected {
        assert!(
            message.contains(phrase),
            "{phrase:?} missing from: {message}"
        );
    }
}

/// The error the binary printed last (`error: …` on stderr), without the log lines before it.
#[track_caller]
fn final_error(stderr: &str) -> &str {
    let start = stderr
        .rfind("\nerror: ")
        .map(|at| at + 1)
        .or_else(|| stderr.starts_with("error: ").then_some(0))
        .unwrap_or_else(|| panic!("no `error: …` on stderr:\n{stderr}"));
    &stderr[start..]
}

async fn wait_exit(walsync: &mut Walsync, deadline: Duration) -> i32 {
    let child = &mut walsync.child;
    wait_for("walsync to exit", deadline, || {
        let exited = child.try_wait().ok().flatten();
        async move { exited }
    })
    .await
    .code()
    .unwrap_or(-1)
}

/// `walsync source --config …` as the release binary, until it exits: its code and stderr.
async fn run_binary(log_name: &str, config: &str) -> (i32, String) {
    let mut walsync = Walsync::spawn("source", log_name, config);
    let code = wait_exit(&mut walsync, Duration::from_secs(60)).await;
    (code, walsync.log_text())
}

/// Waits until walsync's walsender streams. The slot alone is not enough: it shows as active
/// while CREATE_REPLICATION_SLOT still waits for running transactions, and a row written then
/// is before the slot's consistent point.
async fn wait_streaming(admin: &Client, slot: &str) {
    let application = format!("walsync-{slot}");
    wait_for(
        "the source to stream from its slot",
        Duration::from_secs(60),
        || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication
                     WHERE application_name = $1 AND state IN ('catchup', 'streaming')",
                    &[&application],
                )
                .await
                .ok()
                .flatten()
                .map(|_| ())
        },
    )
    .await;
}

async fn wait_inactive(admin: &Client, slot: &str) {
    wait_for(
        "the slot to be released",
        Duration::from_secs(30),
        || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                    &[&slot],
                )
                .await
                .ok()
                .flatten()
                .map(|_| ())
        },
    )
    .await;
}

/// What a start of the source named `name` leaves behind in the shared database.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    publication: bool,
    slot: bool,
    /// walsync's own relations (the schema itself as `walsync`), which other tests may have
    /// created before.
    walsync_objects: Vec<String>,
    /// walsync.source_state remembers the slot.
    recorded: bool,
}

async fn footprint(admin: &Client, name: &str) -> Footprint {
    let publication = admin
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&format!("{name}_pub")],
        )
        .await
        .expect("read pg_publication")
        .is_some();
    let slot = admin
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("read pg_replication_slots")
        .is_some();
    let walsync_objects: Vec<String> = admin
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname = 'walsync'
             UNION ALL
             SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'walsync'
             ORDER BY 1",
            &[],
        )
        .await
        .expect("read walsync's objects")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let recorded = walsync_objects.iter().any(|o| o == "source_state")
        && admin
            .query_opt(
                "SELECT 1 FROM walsync.source_state WHERE slot_name = $1",
                &[&name],
            )
            .await
            .expect("read walsync.source_state")
            .is_some();
    Footprint {
        publication,
        slot,
        walsync_objects,
        recorded,
    }
}

/// Asserts the refused start of `name` left the database as `before` found it.
async fn assert_unchanged(admin: &Client, name: &str, before: &Footprint) {
    let after = footprint(admin, name).await;
    assert_eq!(&after, before, "a refused start changed the database");
    assert!(!after.publication, "no publication was created");
    assert!(!after.slot, "no slot was created");
    assert!(!after.recorded, "the slot was not recorded as used");
}

async fn create_table(client: &Client, table: &str, columns: &str) {
    client
        .batch_execute(&format!("CREATE TABLE {table} ({columns})"))
        .await
        .unwrap_or_else(|error| panic!("create {table}: {error}"));
}

async fn drop_publication(client: &Client, name: &str) {
    let _ = client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {name}_pub"))
        .await;
}

async fn lsn(client: &Client, sql: &str) -> Lsn {
    let text: String = client.query_one(sql, &[]).await.expect(sql).get(0);
    text.parse().expect("an LSN")
}

// --- 1. wal_level = replica --------------------------------------------------------------------

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"));
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn wal_level_replica_stops_the_source_with_the_fix_and_changes_nothing() {
    let cluster = ScratchPg::up(&["-c", "wal_level=replica"]);
    let client = connect(&cluster.url).await;
    let name = name("pre_wal");
    let table = format!("public.{name}");
    create_table(&client, &table, "id int PRIMARY KEY").await;
    let mut config = config_for(&name, &[&table]);
    config.postgres.url = cluster.url.clone();

    let message = refusal(config).await;
    assert_one_problem(
        &message,
        &[
            "wal_level is 'replica'",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    );

    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_publication),
                    (SELECT count(*) FROM pg_replication_slots),
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'walsync')",
            &[],
        )
        .await
        .expect("read the scratch cluster's catalog");
    let (publications, slots, schemas): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(publications, 0, "no publication was created");
    assert_eq!(slots, 0, "no slot was created");
    assert_eq!(schemas, 0, "the walsync schema was not created");
}

// --- 2. a missing table, as the binary -----------------------------------------------------------

#[tokio::test]
async fn a_missing_table_stops_the_binary_with_the_fix_and_changes_nothing() {
    let name = name("pre_missing");
    let table = format!("public.{name}");
    let admin = admin_client().await;
    let _looking = MIGRATIONS.read().await;
    let before = footprint(&admin, &name).await;

    let (code, stderr) = run_binary(&name, &source_config(&name, &[&table])).await;
    assert_ne!(code, 0, "{stderr}");
    assert_one_problem(
        final_error(&stderr),
        &[
            &format!("table {table} does not exist"),
            &format!("create it, or remove \"{table}\" from postgres.tables"),
        ],
    );
    assert_unchanged(&admin, &name, &before).await;
}

/// A replica identity index that does not hold the key: a deleted row would arrive without it.
#[tokio::test]
async fn a_key_outside_the_replica_identity_index_is_refused_with_the_fix() {
    let name = name("pre_identidx");
    let table = format!("public.{name}");
    let client = sql().await;
    let admin = admin_client().await;
    create_table(
        &client,
        &table,
        "id int PRIMARY KEY, sku text NOT NULL, note text",
    )
    .await;
    client
        .batch_execute(&format!(
            "CREATE UNIQUE INDEX {name}_sku ON {table} (sku);
             ALTER TABLE {table} REPLICA IDENTITY USING INDEX {name}_sku"
        ))
        .await
        .expect("replica identity using an index on sku");
    let config = config_for(&name, &[&table]);
    let _looking = MIGRATIONS.read().await;
    let before = footprint(&admin, &name).await;
    let message = refusal(config).await;
    assert_one_problem(
        &message,
        &[
            &format!("a deleted row of {table} would not carry its key column(s) id"),
            "its replica identity index (sku)",
            &format!("ALTER TABLE {table} REPLICA IDENTITY FULL"),
        ],
    );
    assert_unchanged(&admin, &name, &before).await;
}

// --- 3. a table without a primary key ------------------------------------------------------------

#[tokio::test]
async fn a_table_without_primary_key_is_refused_until_replica_identity_full_and_key_columns() {
    let name = name("pre_nopk");
    let table = format!("public.{name}");
    let client = sql().await;
    let admin = admin_client().await;
    create_table(&client, &table, "id int NOT NULL, note text").await;
    let mut config = config_for(&name, &[&table]);
    config.tables.insert(
        table.clone(),
        TableConfig {
            key_columns: vec!["id".into()],
            ..TableConfig::default()
        },
    );

    {
        let _looking = MIGRATIONS.read().await;
        let before = footprint(&admin, &name).await;
        // REPLICA IDENTITY DEFAULT without a primary key: key_columns alone are not enough,
        // publishing would make the application's UPDATEs and DELETEs fail.
        let message = refusal(config.clone()).await;
        assert_one_problem(
            &message,
            &[
                &format!("{table} has no usable replica identity"),
                &format!("ALTER TABLE {table} REPLICA IDENTITY FULL"),
                &format!("tables.\"{table}\".key_columns"),
            ],
        );

        // REPLICA IDENTITY FULL, but no key for the events.
        client
            .batch_execute(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL"))
            .await
            .expect("replica identity full");
        let mut keyless = config.clone();
        keyless.tables.clear();
        let message = refusal(keyless).await;
        assert_one_problem(
            &message,
            &[
                &format!("{table} has no primary key"),
                &format!("tables.\"{table}\".key_columns"),
            ],
        );
        assert_unchanged(&admin, &name, &before).await;
    }

    // REPLICA IDENTITY FULL and key_columns: accepted, and it streams.
    let _cleanup = SlotCleanup(name.clone());
    let source = {
        let _migrating = MIGRATIONS.write().await;
        let source = RunningSource::start(config).await;
        wait_streaming(&admin, &name).await;
        source
    };
    client
        .batch_execute(&format!("INSERT INTO {table} VALUES (7, 'seven')"))
        .await
        .expect("insert");
    let records = read_topic(&format!("{name}.public.{name}"), 1, Duration::from_secs(60)).await;
    assert_eq!(records[0].key, json!({"id": 7}));
    assert_eq!(records[0].op(), Some("c"));
    assert_eq!(
        records[0].value.as_ref().expect("not a tombstone")["after"],
        json!({"id": 7, "note": "seven"})
    );
    assert_eq!(source.stop().await, SourceExit::Drained);
    drop_publication(&client, &name).await;
}

// --- 4. a role without the replication privilege ---------------------------------------------------

#[tokio::test]
async fn a_role_without_replication_stops_the_source_with_the_fix_and_changes_nothing() {
    const ROLE: &str = "walsync_norepl";
    let name = name("pre_norepl");
    let table = format!("public.{name}");
    let admin = admin_client().await;
    let _looking = MIGRATIONS.read().await;
    // Everything else the role needs: its own table, and reading walsync's slot records when
    // another role made them (preflight looks there for a slot it used before).
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY);
             ALTER TABLE {table} OWNER TO {ROLE};
             DO $$ BEGIN
               IF to_regnamespace('walsync') IS NOT NULL THEN
                 GRANT USAGE ON SCHEMA walsync TO {ROLE};
               END IF;
               IF to_regclass('walsync.source_state') IS NOT NULL THEN
                 GRANT SELECT ON walsync.source_state TO {ROLE};
               END IF;
             END $$;"
        ))
        .await
        .expect("create the role's table");
    let before = footprint(&admin, &name).await;

    let mut config = config_for(&name, &[&table]);
    let url = config
        .postgres
        .url
        .replace("//walsync:walsync@", &format!("//{ROLE}:{ROLE}@"));
    assert_ne!(url, config.postgres.url, "PG_URL names walsync:walsync");
    config.postgres.url = url;

    let message = refusal(config).await;
    assert_one_problem(
        &message,
        &[
            &format!("role {ROLE} may not use replication connections"),
            &format!("ALTER ROLE \"{ROLE}\" REPLICATION"),
            "rds_replication",
        ],
    );
    assert_unchanged(&admin, &name, &before).await;
}

// --- 5. a slot of another database --------------------------------------------------------------------

const OTHER_DATABASE: &str = "walsync_other";

async fn other_database_admin() -> Client {
    let admin = admin_client().await;
    if let Err(error) = admin
        .batch_execute(&format!("CREATE DATABASE {OTHER_DATABASE}"))
        .await
    {
        // Another run may have created it first: 42P04 duplicate_database, or 23505 when the
        // two CREATEs race on the catalog.
        let code = error.code().map(|code| code.code());
        assert!(
            matches!(code, Some("42P04" | "23505")),
            "create {OTHER_DATABASE}: {error:?}"
        );
    }
    let mut config: tokio_postgres::Config =
        stack().pg_admin_url.parse().expect("PG_ADMIN_URL parses");
    config.dbname(OTHER_DATABASE);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the other database as the superuser");
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn a_slot_of_another_database_stops_the_source_naming_it_and_changes_nothing() {
    let name = name("pre_otherdb");
    let table = format!("public.{name}");
    let client = sql().await;
    let admin = admin_client().await;
    create_table(&client, &table, "id int PRIMARY KEY").await;
    let other = other_database_admin().await;
    let _cleanup = SlotCleanup(name.clone());
    other
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .expect("create a slot in the other database");

    let _looking = MIGRATIONS.read().await;
    let mut before = footprint(&admin, &name).await;
    assert!(before.slot);
    let message = refusal(config_for(&name, &[&table])).await;
    assert_one_problem(
        &message,
        &[
            &format!("replication slot {name} belongs to database {OTHER_DATABASE}, not walsync"),
            "choose another postgres.slot",
        ],
    );

    let slot = admin
        .query_one(
            "SELECT database::text, active FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("the other database's slot is still there");
    assert_eq!(slot.get::<_, String>(0), OTHER_DATABASE);
    assert!(!slot.get::<_, bool>(1), "walsync did not use it");
    // The slot is the other database's, not this test's start: compare the rest.
    before.slot = false;
    other
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .expect("drop the other database's slot");
    assert_unchanged(&admin, &name, &before).await;
}

// --- 6. a slot dropped under walsync, as the binary ------------------------------------------------

#[tokio::test]
async fn a_slot_dropped_under_walsync_stops_the_binary_and_is_not_recreated() {
    let name = name("pre_lost");
    let table = format!("public.{name}");
    let client = sql().await;
    let admin = admin_client().await;
    create_table(&client, &table, "id int PRIMARY KEY").await;
    let _cleanup = SlotCleanup(name.clone());
    let config = source_config(&name, &[&table]);

    let mut first = {
        let _migrating = MIGRATIONS.write().await;
        let walsync = Walsync::spawn("source", &name, &config);
        wait_streaming(&admin, &name).await;
        walsync
    };
    let code = first.terminate(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "a drained stop: {}", first.log_text());
    wait_inactive(&admin, &name).await;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .expect("drop the slot under walsync");

    let _looking = MIGRATIONS.read().await;
    let before = footprint(&admin, &name).await;
    assert!(before.recorded && before.publication && !before.slot);
    let (code, stderr) = run_binary(&format!("{name}_again"), &config).await;
    assert_ne!(code, 0, "{stderr}");
    assert_one_problem(
        final_error(&stderr),
        &[
            &format!("replication slot {name} cannot be resumed"),
            "postgres.recreate_lost_slot = true",
        ],
    );
    let after = footprint(&admin, &name).await;
    assert_eq!(after, before, "the refused start changed the database");
    assert!(!after.slot, "the slot was not recreated");
    drop_publication(&client, &name).await;
}

/// The same while walsync runs: the slot disappears under a running source (dropped after its
/// connection was cut, as in a failover to a server without it). Reconnecting must not create
/// a new slot, which would skip every change made in between without a word.
#[tokio::test]
async fn a_slot_dropped_under_a_running_source_stops_it_and_is_not_recreated() {
    let name = name("pre_lost_running");
    let table = format!("public.{name}");
    let client = sql().await;
    let admin = admin_client().await;
    create_table(&client, &table, "id int PRIMARY KEY").await;
    let _cleanup = SlotCleanup(name.clone());
    let mut walsync = {
        let _migrating = MIGRATIONS.write().await;
        let walsync = Walsync::spawn("source", &name, &source_config(&name, &[&table]));
        wait_streaming(&admin, &name).await;
        walsync
    };
    // Cut walsync's replication connection and drop the slot before it reconnects.
    wait_for(
        "the slot to be dropped",
        Duration::from_secs(30),
        || async {
            let _ = admin
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                     WHERE slot_name = $1 AND active",
                    &[&name],
                )
                .await;
            admin
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
                .ok()
        },
    )
    .await;

    // Either walsync stops, or the bug shows: the slot is back.
    let child = &mut walsync.child;
    let exited = wait_for(
        "walsync to exit or the slot to reappear",
        Duration::from_secs(60),
        || {
            let exited = child.try_wait().ok().flatten();
            let admin = &admin;
            let name = &name;
            async move {
                if let Some(status) = exited {
                    return Some(Some(status));
                }
                let back = footprint(admin, name).await.slot;
                back.then_some(None)
            }
        },
    )
    .await;
    let stderr = walsync.log_text();
    let status = exited.unwrap_or_else(|| panic!("the slot was silently recreated:\n{stderr}"));
    assert!(!status.success(), "{stderr}");
    assert!(
        final_error(&stderr).contains("postgres.recreate_lost_slot = true"),
        "{stderr}"
    );
    assert!(
        !footprint(&admin, &name).await.slot,
        "the slot was recreated"
    );
    drop_publication(&client, &name).await;
}

// --- 7. a row larger than Kafka accepts, as the binary ---------------------------------------------

/// Streams one row of `md5_blocks` × 32 hex digits in a transaction of its own through the
/// binary, with `extra_config` appended to the test configuration: the binary must stop with
/// the size fix and leave that transaction unconfirmed in the slot.
async fn a_row_too_large_for_kafka_is_refused(name: &str, extra_config: &str, md5_blocks: i32) {
    let table = format!("public.{name}");
    let mut client = sql().await;
    let admin = admin_client().await;
    create_table(&client, &table, "id int PRIMARY KEY, body text").await;
    let _cleanup = SlotCleanup(name.to_owned());
    let config = format!("{}\n{extra_config}", source_config(name, &[&table]));
    let mut walsync = {
        let _migrating = MIGRATIONS.write().await;
        let walsync = Walsync::spawn("source", name, &config);
        wait_streaming(&admin, name).await;
        walsync
    };

    let transaction = client.transaction().await.expect("begin");
    let xid: String = transaction
        .query_one("SELECT xid(pg_current_xact_id())::text", &[])
        .await
        .expect("the transaction's xid")
        .get(0);
    transaction
        .execute(
            &format!(
                "INSERT INTO {table} SELECT 1, string_agg(md5(random()::text), '') \
                 FROM generate_series(1, $1)"
            ),
            &[&md5_blocks],
        )
        .await
        .expect("insert the large row");
    transaction.commit().await.expect("commit");
    let after_insert = lsn(&client, "SELECT pg_current_wal_insert_lsn()::text").await;

    // Generous: a refusal in a delivery report is only noticed when the next replication
    // message arrives (seconds to tens of seconds later), and Kafka may be briefly paused by
    // another suite.
    let code = wait_exit(&mut walsync, Duration::from_secs(120)).await;
    let stderr = walsync.log_text();
    assert_ne!(code, 0, "{stderr}");
    let error = final_error(&stderr);
    for phrase in [
        &format!("a row is larger than Kafka accepts on topic {name}.public.{name}"),
        "max.message.bytes",
        "message.max.bytes",
    ] {
        assert!(error.contains(phrase), "{phrase:?} missing from: {error}");
    }

    // Not confirmed: the slot still holds the transaction, to be read again once Kafka takes it.
    wait_inactive(&admin, name).await;
    let confirmed = lsn(
        &admin,
        &format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{name}'"
        ),
    )
    .await;
    assert!(
        confirmed < after_insert,
        "confirmed {confirmed}, the large row's transaction ended before {after_insert}"
    );
    let pending: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(
                 $1, $2::text::pg_lsn, NULL, 'proto_version', '1', 'publication_names', $3)
             WHERE xid = $4::text::xid",
            &[
                &name,
                &after_insert.to_string(),
                &format!("{name}_pub"),
                &xid,
            ],
        )
        .await
        .expect("peek at the slot")
        .get(0);
    assert!(
        pending > 0,
        "the refused transaction {xid} must still be in the slot"
    );
    drop(walsync);
    drop_publication(&client, name).await;
}

/// librdkafka refuses the record itself: it is over the producer's message.max.bytes.
#[tokio::test]
async fn a_row_over_the_producer_limit_stops_the_binary_without_confirming_it() {
    // About 2.2 MB of hex digits.
    a_row_too_large_for_kafka_is_refused(&name("pre_large"), "", 70_000).await;
}

/// The producer would send it, the broker refuses it: over the topic's max.message.bytes even
/// compressed. The refusal arrives in a delivery report.
#[tokio::test]
async fn a_row_over_the_topic_limit_stops_the_binary_without_confirming_it() {
    // About 3.2 MB of hex digits, well over 1 MB compressed.
    a_row_too_large_for_kafka_is_refused(
        &name("pre_large_broker"),
        "[kafka.extra]\n\"message.max.bytes\" = \"20000000\"\n",
        100_000,
    )
    .await;
}

// --- 8. the transactional heartbeat ---------------------------------------------------------------

#[tokio::test]
async fn the_heartbeat_counts_beats_for_the_slot() {
    let name = name("pre_beat");
    let table = format!("public.{name}");
    let client = sql().await;
    let admin = admin_client().await;
    create_table(&client, &table, "id int PRIMARY KEY").await;
    let _cleanup = SlotCleanup(name.clone());
    let mut config = config_for(&name, &[&table]);
    config.postgres.heartbeat_interval_secs = 1;
    let source = {
        let _migrating = MIGRATIONS.write().await;
        let source = RunningSource::start(config).await;
        wait_streaming(&admin, &name).await;
        source
    };

    let beats = |at_least: i64| {
        let admin = &admin;
        let name = &name;
        async move {
            let row = admin
                .query_opt(
                    "SELECT beats FROM walsync.heartbeat WHERE slot_name = $1",
                    &[name],
                )
                .await
                .ok()??;
            let beats: i64 = row.get(0);
            (beats >= at_least).then_some(beats)
        }
    };
    let first = wait_for("a first heartbeat", Duration::from_secs(30), || beats(1)).await;
    let later = wait_for("more heartbeats", Duration::from_secs(30), || {
        beats(first + 2)
    })
    .await;
    assert!(later > first);
    assert_eq!(source.stop().await, SourceExit::Drained);
    let _ = admin
        .execute(
            "DELETE FROM walsync.heartbeat WHERE slot_name = $1",
            &[&name],
        )
        .await;
    drop_publication(&client, &name).await;
}

#[tokio::test]
async fn walsyncs_starting_at_once_on_a_fresh_database_apply_each_migration_once() {
    let database = name("mig_race");
    let admin = admin_client().await;
    admin
        .batch_execute(&format!("CREATE DATABASE {database} OWNER walsync"))
        .await
        .expect("create a fresh database");
    let mut config = config_for(&database, &[]);
    let (server, _) = stack()
        .pg_url
        .rsplit_once('/')
        .expect("the URL names a database");
    config.postgres.url = format!("{server}/{database}");
    let params = walsync::postgres::replication::ConnectParams::from_config(&config)
        .expect("connection parameters");

    let runs = (0..4).map(|_| {
        let params = params.clone();
        async move {
            let mut catalog = walsync::postgres::catalog::Catalog::connect(&params)
                .await
                .expect("connect");
            walsync::postgres::slot::migrate(&mut catalog).await
        }
    });
    let results = futures_util::future::join_all(runs).await;
    let mut applied = Vec::new();
    for result in results {
        applied.extend(result.expect("every start migrates or finds nothing to do"));
    }
    let on_disk = std::fs::read_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations"))
        .expect("the migrations folder")
        .count();
    assert_eq!(
        applied.len(),
        on_disk,
        "each migration applied once: {applied:?}"
    );
    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await
        .expect("drop the database");
}
