//! The operator's commands as the built binary runs them, against the running stack:
//! `check` (all ✓ on the good stack; ✗ lines with fixes for a `wal_level = replica` cluster, a
//! role without replication and a table without primary key), `slot status`, `slot drop`, and
//! `verify` on a live pipeline (no difference under a running workload; a document altered
//! behind walsync's back is found).
//!
//! Nothing here pauses or stops a shared service; `wal_level = replica` gets a throwaway
//! cluster of its own (`scripts/stack scratch-pg`).

mod common;

use std::time::Duration;

use common::pipeline::{RunningPipeline, alias_of, search_client, wait_equal};
use common::process::{pipeline_config, source_config};
use common::scratch::ScratchPg;
use common::source::{RunningSource, config_for, drop_slot, name, sql};
use common::{admin_client, stack, wait_for};
use elasticsearch::{GetParts, IndexParts};
use serde_json::{Value, json};

/// What one run of the binary printed, and how it ended.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `walsync <args> --config <file>`, the file holding `config`. Async, so an in-process
/// pipeline keeps running meanwhile.
async fn walsync(args: &[&str], test: &str, config: &str) -> Outcome {
    let dir = std::env::temp_dir().join(format!("walsync-cli-{test}"));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let config_path = dir.join("walsync.toml");
    std::fs::write(&config_path, config).expect("write the config");
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_walsync"))
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .expect("walsync finishes within 300 s")
    .expect("run walsync");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The database PG_URL names.
fn database() -> String {
    let url = &stack().pg_url;
    let path = url.rsplit('/').next().unwrap_or_default();
    path.split('?').next().unwrap_or_default().to_owned()
}

/// The ✗ line that starts with `✗ <what>`, with every phrase in it.
#[track_caller]
fn assert_failed_check(outcome: &Outcome, what: &str, phrases: &[&str]) {
    let line = outcome
        .stdout
        .lines()
        .find(|line| line.starts_with(&format!("✗ {what}")))
        .unwrap_or_else(|| panic!("no `✗ {what}` line:\n{outcome}"));
    assert!(line.contains(" — fix: "), "no fix in {line:?}");
    for phrase in phrases {
        assert!(line.contains(phrase), "{phrase:?} missing from {line:?}");
    }
    assert_eq!(outcome.code, 1, "a failed check exits 1:\n{outcome}");
}

// --- check ------------------------------------------------------------------------------------

#[tokio::test]
async fn check_passes_every_check_against_the_good_stack() {
    let name = name("cli_check_ok");
    let table = format!("public.{name}");
    sql()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, body text)"
        ))
        .await
        .expect("create the table");

    let outcome = walsync(&["check"], &name, &pipeline_config(&name, &[&table])).await;

    assert_eq!(outcome.code, 0, "{outcome}");
    let lines: Vec<&str> = outcome.stdout.lines().collect();
    let (summary, checks) = lines.split_last().expect("output");
    assert!(
        summary.starts_with("all ") && summary.ends_with(" checks passed"),
        "{outcome}"
    );
    assert!(
        checks.iter().all(|line| line.starts_with("✓ ")),
        "{outcome}"
    );
    for expected in [
        "✓ wal_level = logical",
        "✓ role walsync may replicate",
        &format!("✓ table {table}: key (id) from the primary key; replica identity DEFAULT"),
        &format!("✓ publication {name}_pub does not exist yet"),
        &format!("✓ slot {name} does not exist yet"),
        &format!("✓ topic {name}.public.{name} missing; creatable"),
        "reachable: OpenSearch",
        &format!("✓ index {name}-public.{name}: alias does not exist yet"),
    ] {
        assert!(
            outcome.stdout.contains(expected),
            "{expected:?} missing:\n{outcome}"
        );
    }
    // It changed nothing: no publication, no slot, no topic.
    let client = sql().await;
    let publications: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = $1",
            &[&format!("{name}_pub")],
        )
        .await
        .expect("read pg_publication")
        .get(0);
    assert_eq!(publications, 0);
    let again = walsync(&["check"], &name, &pipeline_config(&name, &[&table])).await;
    assert!(
        again.stdout.contains("missing; creatable"),
        "the topic was not created:\n{again}"
    );
}

#[tokio::test]
async fn check_names_wal_level_replica_with_its_fix() {
    let cluster = ScratchPg::up(&["-c", "wal_level=replica"]);
    let name = name("cli_check_wal");
    let table = format!("public.{name}");
    let (client, connection) = tokio_postgres::connect(&cluster.url, tokio_postgres::NoTls)
        .await
        .expect("connect to the scratch cluster");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create the table");
    let config = pipeline_config(&name, &[&table]).replace(&stack().pg_url, &cluster.url);

    let outcome = walsync(&["check"], &name, &config).await;

    assert_failed_check(
        &outcome,
        "wal_level",
        &[
            "wal_level is 'replica'",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    );
    assert!(
        outcome.stdout.contains(&format!("✓ table {table}")),
        "{outcome}"
    );
}

#[tokio::test]
async fn check_names_a_role_without_replication_with_its_fix() {
    const ROLE: &str = "walsync_norepl";
    let name = name("cli_check_norepl");
    let table = format!("public.{name}");
    admin_client()
        .await
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
    // The stack's test roles have their own name as password.
    let config = pipeline_config(&name, &[&table])
        .replace("//walsync:walsync@", &format!("//{ROLE}:{ROLE}@"));
    assert!(config.contains(ROLE), "PG_URL names walsync:walsync");

    let outcome = walsync(&["check"], &name, &config).await;

    assert_failed_check(
        &outcome,
        "replication privilege",
        &[
            &format!("role {ROLE} may not use replication connections"),
            &format!("ALTER ROLE \"{ROLE}\" REPLICATION"),
            "rds_replication",
        ],
    );
}

#[tokio::test]
async fn check_names_a_table_without_primary_key_with_its_fix() {
    let name = name("cli_check_nopk");
    let table = format!("public.{name}");
    sql()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int, body text)"))
        .await
        .expect("create the table");

    let outcome = walsync(&["check"], &name, &pipeline_config(&name, &[&table])).await;

    assert_failed_check(
        &outcome,
        &format!("table {table}"),
        &[
            "no usable replica identity",
            "add a primary key",
            "REPLICA IDENTITY FULL",
        ],
    );
}

#[tokio::test]
async fn check_names_an_index_built_from_another_cluster() {
    let name = name("cli_check_foreign");
    let table = format!("public.{name}");
    sql()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create the table");
    let config = common::pipeline::pipeline_config(&name, &[&table]);
    let alias = alias_of(&config, "public", &name);
    let settings = json!({"index": {"number_of_replicas": 0}});
    walsync::sink::index::ensure_index(
        &search_client(),
        &alias,
        "42",
        Some(&settings),
        None,
        "10m",
    )
    .await
    .expect("an index recorded as built from system 42");

    let outcome = walsync(&["check"], &name, &pipeline_config(&name, &[&table])).await;

    assert_failed_check(
        &outcome,
        &format!("index {alias}"),
        &[
            "was built from PostgreSQL system 42",
            "walsync backfill --into",
        ],
    );
}

// --- slot status / slot drop ---------------------------------------------------------------------

#[tokio::test]
async fn slot_status_shows_a_running_source_and_drop_refuses_while_it_streams() {
    let name = name("cli_slot_status");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY); INSERT INTO {table} VALUES (1)"
        ))
        .await
        .expect("create the table");
    let source = RunningSource::start(config_for(&name, &[&table])).await;
    let config = source_config(&name, &[&table]);

    let status = walsync(&["slot", "status"], &name, &config).await;
    assert_eq!(status.code, 0, "{status}");
    assert!(
        status.stdout.starts_with(&format!(
            "slot {name} (database {}, plugin pgoutput)",
            database()
        )),
        "{status}"
    );
    let field = |label: &str| -> String {
        status
            .stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label:?} line:\n{status}"))
            .trim()
            .to_owned()
    };
    let pid: i32 = field("active pid:")
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("an active pid:\n{status}"));
    let confirmed: walsync::lsn::Lsn = field("confirmed_flush_lsn:").parse().expect("an LSN");
    let (active_pid, slot_confirmed): (i32, String) = {
        let row = client
            .query_one(
                "SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .expect("read the slot");
        (row.get(0), row.get(1))
    };
    assert_eq!(pid, active_pid);
    let now: walsync::lsn::Lsn = slot_confirmed.parse().expect("an LSN");
    assert!(confirmed <= now, "{confirmed} printed, {now} now");
    assert!(field("wal_status:").starts_with("reserved"), "{status}");
    assert!(
        field("lag (bytes):").contains("not yet confirmed"),
        "{status}"
    );
    assert!(field("lag (time):").contains("flush_lag"), "{status}");

    let refused = walsync(&["slot", "drop", "--yes"], &name, &config).await;
    assert_eq!(refused.code, 1, "{refused}");
    assert!(
        refused
            .stdout
            .contains(&format!("SELECT pg_terminate_backend({pid})")),
        "{refused}"
    );
    source.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn slot_drop_refuses_without_yes_then_drops_the_slot_and_its_records() {
    let name = name("cli_slot_drop");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create the table");
    // A source that ran once: its slot, and walsync's records of it.
    let source = RunningSource::start(config_for(&name, &[&table])).await;
    wait_for(
        "the table's copy to be recorded",
        Duration::from_secs(60),
        || async { (records(&client, &name).await.2 == 1).then_some(()) },
    )
    .await;
    source.stop().await;
    // The slot is inactive a moment after the source stopped.
    wait_for(
        "the slot to be released",
        Duration::from_secs(30),
        || async {
            client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                    &[&name],
                )
                .await
                .ok()
                .flatten()
        },
    )
    .await;
    assert_eq!(records(&client, &name).await, (1, 1, 1));
    let config = source_config(&name, &[&table]);

    let refused = walsync(&["slot", "drop"], &name, &config).await;
    assert_ne!(refused.code, 0, "{refused}");
    assert!(refused.stdout.contains("without --yes"), "{refused}");
    assert!(refused.stdout.contains("no longer holds WAL"), "{refused}");
    assert_eq!(
        records(&client, &name).await,
        (1, 1, 1),
        "nothing was dropped"
    );

    let dropped = walsync(&["slot", "drop", "--yes"], &name, &config).await;
    assert_eq!(dropped.code, 0, "{dropped}");
    assert!(
        dropped.stdout.contains(&format!("dropped slot {name}")),
        "{dropped}"
    );
    assert_eq!(records(&client, &name).await, (0, 0, 0));

    let status = walsync(&["slot", "status"], &name, &config).await;
    assert_eq!(status.code, 1, "{status}");
    assert!(status.stdout.contains("does not exist"), "{status}");
}

/// The slot's count in pg_replication_slots, and its rows in walsync.source_state and
/// walsync.snapshot_progress.
async fn records(client: &tokio_postgres::Client, slot: &str) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT count(*) FROM walsync.source_state WHERE slot_name = $1),
                    (SELECT count(*) FROM walsync.snapshot_progress WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .expect("read the slot and walsync's records");
    (row.get(0), row.get(1), row.get(2))
}

// --- verify -------------------------------------------------------------------------------------------

#[tokio::test]
async fn verify_finds_no_difference_under_a_live_workload_and_names_an_altered_document() {
    let name = name("cli_verify");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, body text, price numeric, stock int);
             INSERT INTO {table} SELECT g, repeat('long description ', 500) || g, g * 1.25, g
             FROM generate_series(1, 300) g"
        ))
        .await
        .expect("create and fill the table");
    let config = common::pipeline::pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!(
            "UPDATE {table} SET stock = stock + 1 WHERE id % 3 = 0;
             DELETE FROM {table} WHERE id % 10 = 0;
             INSERT INTO {table} SELECT g, 'new ' || g, g, 0 FROM generate_series(301, 400) g"
        ))
        .await
        .expect("the workload");
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;

    // A workload keeps running while verify compares: changes in flight are not divergence.
    let (stop_workload, mut stopped) = tokio::sync::watch::channel(false);
    let workload = {
        let table = table.clone();
        tokio::spawn(async move {
            let client = sql().await;
            let mut round = 0_i64;
            while !*stopped.borrow_and_update() {
                round += 1;
                let id = 1_000 + round;
                client
                    .batch_execute(&format!(
                        "UPDATE {table} SET price = price + 1, stock = stock - 1 WHERE id BETWEEN 100 AND 200;
                         INSERT INTO {table} VALUES ({id}, 'w', 1, 1);
                         DELETE FROM {table} WHERE id = {id} - 3 OR id = {round} + 200;"
                    ))
                    .await
                    .expect("a workload round");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            round
        })
    };
    let toml = pipeline_config(&name, &[&table]);
    let verified = walsync(&["verify"], &name, &toml).await;
    stop_workload.send(true).expect("the workload listens");
    let rounds = workload.await.expect("the workload ran");
    assert!(rounds > 0);
    assert_eq!(verified.code, 0, "{verified}");
    assert!(
        verified.stdout.contains(&format!("{table}: ")),
        "{verified}"
    );
    assert!(
        verified
            .stdout
            .contains("verify: no divergence in 1 table(s)"),
        "{verified}"
    );

    // Alter one document behind walsync's back (its stored commit LSN unchanged).
    let search = search_client();
    let alias = alias_of(&config, "public", &name);
    let response = search
        .get(GetParts::IndexId(&alias, "5"))
        .send()
        .await
        .expect("get document 5");
    let document: Value = response.json().await.expect("document 5");
    let mut source = document["_source"].clone();
    source["price"] = json!("999.99");
    let index = document["_index"]
        .as_str()
        .expect("the concrete index")
        .to_owned();
    let written = search
        .index(IndexParts::IndexId(&index, "5"))
        .body(source)
        .send()
        .await
        .expect("overwrite document 5");
    assert!(written.status_code().is_success(), "{written:?}");

    let diverged = walsync(&["verify", "--table", &table], &name, &toml).await;
    assert_eq!(diverged.code, 1, "{diverged}");
    assert!(
        diverged.stdout.contains("different: 1: 5 [price]"),
        "{diverged}"
    );
    assert!(diverged.stdout.contains("verify: DIVERGENCE"), "{diverged}");

    let sampled = walsync(&["verify", "--sample", "1.5"], &name, &toml).await;
    assert_eq!(sampled.code, 2, "{sampled}");
    assert!(sampled.stdout.contains("--sample"), "{sampled}");

    pipeline.stop().await;
    // With the pipeline stopped nothing passes a new snapshot: verify gives up, naming the lag.
    client
        .execute(
            &format!("INSERT INTO {table} VALUES (5000, 'x', 1, 1)"),
            &[],
        )
        .await
        .expect("a row after the stop");
    let stalled = walsync(&["verify", "--wait-secs", "2"], &name, &toml).await;
    assert_eq!(stalled.code, 2, "{stalled}");
    assert!(
        stalled.stdout.contains(&format!(
            "the source did not pass the snapshot within 2 s: slot {name} has confirmed"
        )),
        "{stalled}"
    );
    assert!(stalled.stdout.contains("bytes behind"), "{stalled}");
    drop_slot(&name).await;
}
