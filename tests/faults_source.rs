//! The source under crashes, outages and load, as the released binary. These tests pause
//! Kafka, change server settings or write hundreds of megabytes, so `make test` runs them one
//! at a time with nothing beside them.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::kafka::{read_topic_until, topic_size};
use common::process::{Paused, Walsync, source_config};
use common::{stack, unique_name, wait_for};
use walsync::lsn::Lsn;

async fn sql() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&stack().pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

fn name(prefix: &str) -> String {
    unique_name(prefix).replace('-', "_")
}

async fn current_wal_lsn(client: &tokio_postgres::Client) -> Lsn {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("pg_current_wal_lsn")
        .get(0);
    text.parse().expect("an LSN")
}

async fn confirmed_flush_lsn(client: &tokio_postgres::Client, slot: &str) -> Lsn {
    let text: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("the slot exists")
        .get(0);
    text.parse().expect("an LSN")
}

/// The walsender pid serving `slot`, once it is streaming.
async fn wait_streaming(client: &tokio_postgres::Client, slot: &str) -> i32 {
    wait_for(
        "walsync to stream from its slot",
        Duration::from_secs(60),
        || async {
            client
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&slot],
                )
                .await
                .ok()
                .flatten()
                .map(|row| row.get::<_, i32>(0))
        },
    )
    .await
}

async fn wait_confirmed(client: &tokio_postgres::Client, slot: &str, at_least: Lsn, what: &str) {
    wait_for(what, Duration::from_secs(120), || async {
        (confirmed_flush_lsn(client, slot).await >= at_least).then_some(())
    })
    .await;
}

async fn drop_slot(client: &tokio_postgres::Client, slot: &str) {
    let _ = client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
}

/// Reads a topic from the beginning until every id in `0..count` has been seen at least
/// once; panics (naming how many are missing) when that does not happen within `deadline`.
async fn read_ids(topic: &str, count: i64, deadline: Duration) {
    let mut missing: HashSet<i64> = (0..count).collect();
    if missing.is_empty() {
        return;
    }
    read_topic_until(topic, deadline, |record| {
        if let Some(id) = record.key["id"].as_i64() {
            missing.remove(&id);
        }
        missing.is_empty()
    })
    .await;
}

#[tokio::test]
async fn kill_9_while_kafka_holds_acknowledgements_loses_nothing_and_confirms_nothing_unacknowledged()
 {
    const BATCHES: i64 = 100;
    const ROWS: i64 = 1_000;
    let name = name("fault_kill");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, batch int NOT NULL, payload text)"
        ))
        .await
        .expect("create table");
    let mut walsync = Walsync::spawn("source", &name, &source_config(&name, &[&table]));
    wait_streaming(&client, &name).await;

    // One transaction per batch; remember where the WAL was after each commit.
    let mut committed_by = Vec::new();
    let mut paused = None;
    for batch in 0..BATCHES {
        if batch == BATCHES / 4 {
            // What came before the outage is confirmed first, so the kill has something that
            // must survive it.
            let before = *committed_by.last().expect("batches before the outage");
            wait_confirmed(
                &client,
                &name,
                before,
                "the batches before the outage to be confirmed",
            )
            .await;
            paused = Some(Paused::new("kafka"));
        }
        client
            .execute(
                &format!(
                    "INSERT INTO {table} SELECT g, $1, md5(g::text) FROM generate_series($2::bigint, $3::bigint) g"
                ),
                &[&(batch as i32), &(batch * ROWS), &(batch * ROWS + ROWS - 1)],
            )
            .await
            .expect("insert a batch");
        committed_by.push(current_wal_lsn(&client).await);
    }
    let last = *committed_by.last().unwrap();
    // Kafka is hung, so the producer's bounded queue fills and reading stops (back-pressure):
    // kill once the source has read well into the paused part of the workload.
    let midway = committed_by[(BATCHES / 2) as usize];
    // pg_stat_replication's positions are visible to the superuser only.
    let admin = common::admin_client().await;
    wait_for(
        "the source to read into the outage",
        Duration::from_secs(120),
        || async {
            let row = admin
                .query_opt(
                    "SELECT sent_lsn::text FROM pg_stat_replication WHERE application_name = $1",
                    &[&format!("walsync-{name}")],
                )
                .await
                .ok()??;
            let sent: Lsn = row.get::<_, Option<String>>(0)?.parse().ok()?;
            (sent >= midway).then_some(())
        },
    )
    .await;

    walsync.kill_9();
    let confirmed = confirmed_flush_lsn(&client, &name).await;
    drop(paused);
    println!("confirmed_flush_lsn at kill: {confirmed}, WAL end: {last}");
    assert!(
        confirmed < last,
        "with Kafka paused, the end of the workload must not have been confirmed"
    );

    // Every batch that was certainly confirmed (committed before the confirmed LSN) is in
    // Kafka in full, from the killed process alone.
    let topic = format!("{name}.public.{name}");
    let confirmed_batches = committed_by.iter().filter(|lsn| **lsn <= confirmed).count() as i64;
    println!("batches confirmed at kill: {confirmed_batches} of {BATCHES}");
    assert!(
        confirmed_batches >= BATCHES / 4,
        "the batches confirmed before the outage stay confirmed: {confirmed_batches}"
    );
    read_ids(&topic, confirmed_batches * ROWS, Duration::from_secs(60)).await;

    // Restarted, the source resends from the confirmed LSN: every row arrives.
    let mut walsync = Walsync::spawn("source", &name, &source_config(&name, &[&table]));
    wait_streaming(&client, &name).await;
    read_ids(&topic, BATCHES * ROWS, Duration::from_secs(300)).await;
    wait_confirmed(
        &client,
        &name,
        last,
        "everything to be confirmed after the restart",
    )
    .await;
    assert_eq!(
        walsync.terminate(Duration::from_secs(60)).await,
        0,
        "{}",
        walsync.log_text()
    );
    drop_slot(&client, &name).await;
}

/// Restores `wal_sender_timeout` when dropped.
struct WalSenderTimeout;

impl WalSenderTimeout {
    fn lower(value: &str) -> Self {
        admin_sql(&[&format!("ALTER SYSTEM SET wal_sender_timeout = '{value}'")]);
        Self
    }
}

impl Drop for WalSenderTimeout {
    fn drop(&mut self) {
        admin_sql(&["ALTER SYSTEM RESET wal_sender_timeout"]);
    }
}

/// Runs each statement as the superuser (`scripts/stack psql`), each in its own transaction
/// (ALTER SYSTEM refuses to run inside one), then reloads the configuration.
fn admin_sql(statements: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");
    let mut command = std::process::Command::new(script);
    command
        .args(["psql", "-qAt"])
        .stdout(std::process::Stdio::null());
    for statement in statements.iter().chain(&["SELECT pg_reload_conf()"]) {
        command.args(["-c", statement]);
    }
    let status = command.status().expect("run scripts/stack psql");
    assert!(status.success(), "scripts/stack psql {statements:?}");
}

#[tokio::test]
async fn kafka_down_longer_than_wal_sender_timeout_keeps_the_walsender_and_confirms_nothing() {
    let name = name("fault_outage");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, note text)"
        ))
        .await
        .expect("create table");
    let timeout = WalSenderTimeout::lower("3s");
    let mut walsync = Walsync::spawn("source", &name, &source_config(&name, &[&table]));
    let walsender = wait_streaming(&client, &name).await;

    client
        .execute(
            &format!("INSERT INTO {table} SELECT g, 'before' FROM generate_series(0, 9) g"),
            &[],
        )
        .await
        .unwrap();
    let before_outage = current_wal_lsn(&client).await;
    wait_confirmed(
        &client,
        &name,
        before_outage,
        "the first rows to be confirmed",
    )
    .await;

    let paused = Paused::new("kafka");
    let start_of_outage = current_wal_lsn(&client).await;
    client
        .execute(
            &format!("INSERT INTO {table} SELECT g, 'during' FROM generate_series(10, 19) g"),
            &[],
        )
        .await
        .unwrap();
    let after_outage_writes = current_wal_lsn(&client).await;
    // The outage itself: several times wal_sender_timeout.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let confirmed_during = confirmed_flush_lsn(&client, &name).await;
    let walsender_after: Option<i32> = client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    drop(paused);

    assert_eq!(
        walsender_after,
        Some(walsender),
        "the walsender survived the outage"
    );
    assert!(
        confirmed_during <= start_of_outage,
        "nothing written during the outage was confirmed: {confirmed_during} > {start_of_outage}"
    );
    // Everything arrives after the outage.
    read_ids(
        &format!("{name}.public.{name}"),
        20,
        Duration::from_secs(120),
    )
    .await;
    wait_confirmed(
        &client,
        &name,
        after_outage_writes,
        "the outage's rows to be confirmed",
    )
    .await;
    assert_eq!(
        walsync.terminate(Duration::from_secs(60)).await,
        0,
        "{}",
        walsync.log_text()
    );
    drop(timeout);
    drop_slot(&client, &name).await;
}

#[tokio::test]
async fn an_idle_published_table_does_not_hold_wal_while_other_tables_are_busy() {
    let name = name("fault_idle");
    let idle = format!("public.{name}");
    let busy = format!("public.{name}_busy");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {idle} (id bigint PRIMARY KEY); CREATE TABLE {busy} (id bigint PRIMARY KEY, payload text)"
        ))
        .await
        .expect("create tables");
    let mut walsync = Walsync::spawn("source", &name, &source_config(&name, &[&idle]));
    wait_streaming(&client, &name).await;
    let start = confirmed_flush_lsn(&client, &name).await;

    // About 100 MB of WAL on a table walsync does not capture.
    for batch in 0..10_i64 {
        client
            .execute(
                &format!(
                    "INSERT INTO {busy} SELECT g, repeat(md5(g::text), 32) FROM generate_series($1::bigint, $2::bigint) g"
                ),
                &[&(batch * 10_000), &(batch * 10_000 + 9_999)],
            )
            .await
            .expect("busy writes");
    }
    let end = current_wal_lsn(&client).await;
    assert!(
        end.as_u64() - start.as_u64() > 90 * 1024 * 1024,
        "the workload wrote ~100 MB of WAL"
    );
    wait_confirmed(
        &client,
        &name,
        end,
        "the idle slot to confirm past the busy writes",
    )
    .await;
    assert_eq!(
        walsync.terminate(Duration::from_secs(60)).await,
        0,
        "{}",
        walsync.log_text()
    );
    drop_slot(&client, &name).await;
}

#[tokio::test]
async fn a_million_row_transaction_streams_through_in_bounded_memory() {
    const ROWS: i64 = 1_000_000;
    let name = name("fault_big");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, payload text)"
        ))
        .await
        .expect("create table");
    let mut walsync = Walsync::spawn("source", &name, &source_config(&name, &[&table]));
    wait_streaming(&client, &name).await;

    client
        .execute(
            &format!(
                "INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g"
            ),
            &[],
        )
        .await
        .expect("one transaction of a million rows");
    let end = current_wal_lsn(&client).await;
    let topic = format!("{name}.public.{name}");
    wait_for(
        "a million events in Kafka",
        Duration::from_secs(600),
        || {
            let size = topic_size(&topic);
            async move { (size >= ROWS).then_some(()) }
        },
    )
    .await;
    wait_confirmed(&client, &name, end, "the transaction to be confirmed").await;
    let peak = walsync.peak_rss_bytes();
    println!(
        "peak RSS through a {ROWS}-row transaction: {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(
        peak < 256 * 1024 * 1024,
        "peak RSS {peak} bytes exceeds 256 MB"
    );
    assert_eq!(
        walsync.terminate(Duration::from_secs(60)).await,
        0,
        "{}",
        walsync.log_text()
    );
    drop_slot(&client, &name).await;
}

/// Starts PostgreSQL again when dropped, so a failing test does not leave it down.
struct PostgresStopped;

impl Drop for PostgresStopped {
    fn drop(&mut self) {
        common::process::stack_control("start", "pg");
    }
}

#[tokio::test]
async fn a_postgres_restart_is_ridden_out_and_streaming_resumes() {
    let name = name("fault_pg_restart");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY)"))
        .await
        .expect("create table");
    let mut walsync = Walsync::spawn("source", &name, &source_config(&name, &[&table]));
    wait_streaming(&client, &name).await;
    client
        .execute(
            &format!("INSERT INTO {table} SELECT generate_series(0, 9)"),
            &[],
        )
        .await
        .unwrap();
    drop(client);

    let restarted = PostgresStopped;
    common::process::stack_control("stop", "pg");
    drop(restarted);

    let client = sql().await;
    wait_streaming(&client, &name).await;
    client
        .execute(
            &format!("INSERT INTO {table} SELECT generate_series(10, 19)"),
            &[],
        )
        .await
        .unwrap();
    read_ids(
        &format!("{name}.public.{name}"),
        20,
        Duration::from_secs(120),
    )
    .await;
    assert!(
        walsync.child.try_wait().expect("poll the child").is_none(),
        "walsync kept running through the restart: {}",
        walsync.log_text()
    );
    assert_eq!(
        walsync.terminate(Duration::from_secs(60)).await,
        0,
        "{}",
        walsync.log_text()
    );
    drop_slot(&client, &name).await;
}
