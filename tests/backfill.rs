//! `walsync backfill` on the real stack, run as the built binary beside an in-process pipeline:
//! a backfill under a workload misses no change and removes documents of rows deleted while
//! nobody watched; `--where` copies only its slice; `--into` swaps the alias with no moment where
//! searches see an empty or partial index.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use elasticsearch::http::Method;
use elasticsearch::http::headers::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;
use walsync::config::Config;
use walsync::lsn::Lsn;

use common::pipeline::{RunningPipeline, alias_of, compare, search_client, wait_equal};
use common::source::{drop_slot, name, sql};

/// A pipeline configuration as TOML (what an operator's file holds), and the file it is in.
fn pipeline_config(name: &str, table: &str) -> (Config, PathBuf) {
    let text = format!(
        "{}linger_ms = 10\n",
        common::process::pipeline_config(name, &[table])
    );
    let dir = std::env::temp_dir().join(format!("walsync-test-{name}"));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let path = dir.join("walsync.toml");
    std::fs::write(&path, &text).expect("write the config");
    let config = Config::from_toml(&text).expect("a valid configuration");
    (config, path)
}

/// What a finished `walsync backfill` printed.
struct Backfill {
    success: bool,
    stdout: Vec<String>,
    stderr: String,
}

impl Backfill {
    /// The value after `prefix` on the first line that contains it.
    fn value_after(&self, prefix: &str) -> Option<String> {
        self.stdout.iter().find_map(|line| {
            line.split_once(prefix)
                .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_owned())
        })
    }

    fn lsn_after(&self, prefix: &str) -> u64 {
        let text = self
            .value_after(prefix)
            .unwrap_or_else(|| panic!("no {prefix:?} in the output: {:#?}", self.stdout));
        text.trim_end_matches([';', ',', ':'])
            .parse::<Lsn>()
            .unwrap_or_else(|_| panic!("{text:?} is not an LSN"))
            .as_u64()
    }

    fn printed(&self, text: &str) -> bool {
        self.stdout.iter().any(|line| line.contains(text))
    }
}

/// Runs `walsync backfill` with `args` to the end.
async fn backfill(config_path: &PathBuf, args: &[&str]) -> Backfill {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walsync"))
        .arg("backfill")
        .args(args)
        .arg("--config")
        .arg(config_path)
        .arg("--timeout")
        .arg("120")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn walsync backfill");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut reader = BufReader::new(stdout).lines();
    let mut collected = Vec::new();
    let read_all = async {
        while let Ok(Some(line)) = reader.next_line().await {
            collected.push(line);
        }
    };
    tokio::time::timeout(Duration::from_secs(300), read_all)
        .await
        .expect("the backfill finishes within 300 s");
    let status = child.wait().await.expect("wait for walsync backfill");
    let stderr = stderr_task.await.unwrap_or_default();
    println!(
        "walsync backfill {}: {status}\n{}\n{stderr}",
        args.join(" "),
        collected.join("\n")
    );
    Backfill {
        success: status.success(),
        stdout: collected,
        stderr,
    }
}

async fn es(method: Method, path: &str, body: Option<Value>) -> Value {
    let response = search_client()
        .send(
            method,
            path,
            HeaderMap::new(),
            Option::<&()>::None,
            body.map(|b| b.to_string()),
            Some(Duration::from_secs(60)),
        )
        .await
        .expect("the search server answers");
    let status = response.status_code();
    let value: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: HTTP {status}: {value}");
    value
}

async fn count_where(alias: &str, query: Value) -> u64 {
    es(Method::Post, &format!("/{alias}/_refresh"), None).await;
    es(
        Method::Post,
        &format!("/{alias}/_count"),
        Some(json!({"query": query})),
    )
    .await["count"]
        .as_u64()
        .expect("a count")
}

/// The concrete index behind an alias.
async fn index_behind(alias: &str) -> String {
    let answer = es(Method::Get, &format!("/_alias/{alias}"), None).await;
    let indices: Vec<&String> = answer.as_object().expect("an object").keys().collect();
    assert_eq!(indices.len(), 1, "{answer}");
    indices[0].clone()
}

async fn create_table(table: &str, rows: i32) {
    sql()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text, n int);
             INSERT INTO {table} SELECT g, 'row ' || g, g FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("create the table");
}

/// Changes to one table until stopped, each its own transaction, recording for every changed
/// id the WAL position read right after its commit (at or above the commit's LSN).
struct Workload {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(i32, u64)>>,
}

impl Workload {
    fn start(table: String, rows: i32, with_deletes: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let client = sql().await;
            let mut touched = Vec::new();
            let mut step: i32 = 0;
            while !stopped.load(Ordering::Relaxed) {
                step += 1;
                let id = (step * 7919) % rows + 1;
                let (statement, changed) = match step % 4 {
                    0 if with_deletes => (format!("DELETE FROM {table} WHERE id = {id}"), id),
                    1 => {
                        let new_id = rows * 10 + step;
                        (
                            format!("INSERT INTO {table} VALUES ({new_id}, 'new', {step})"),
                            new_id,
                        )
                    }
                    _ => (
                        format!(
                            "UPDATE {table} SET note = 'step {step}', n = n + 1 WHERE id = {id}"
                        ),
                        id,
                    ),
                };
                client.batch_execute(&statement).await.expect(&statement);
                let position: String = client
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .expect("read the WAL position")
                    .get(0);
                let position: Lsn = position.parse().expect("an LSN");
                touched.push((changed, position.as_u64()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            touched
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<(i32, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the workload did not panic")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_under_a_workload_misses_no_change_and_removes_rows_deleted_unwatched() {
    let name = name("backfill_load");
    let table = format!("public.{name}");
    let rows = 20_000;
    create_table(&table, rows).await;
    let (config, config_path) = pipeline_config(&name, &table);
    let pipeline = RunningPipeline::start(config.clone()).await;
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;

    // A document whose row was deleted while nobody was watching (say, the pipeline ran
    // against a restored index): an old version no stream event will ever touch again.
    let alias = alias_of(&config, "public", &name);
    es(
        Method::Put,
        &format!("/{alias}/_doc/999999?version=1&version_type=external_gte&refresh=true"),
        Some(json!({"id": 999999, "note": "ghost", "n": 0, "walsync": {
            "commit_lsn": 1, "lsn": 1, "op": "r", "deleted": false, "tx_id": 0, "source_ts_ms": 0
        }})),
    )
    .await;

    let workload = Workload::start(table.clone(), rows, true);
    let result = backfill(&config_path, &[&table]).await;
    let touched = workload.stop().await;
    assert!(
        result.success,
        "backfill failed: {}\n{:#?}",
        result.stderr, result.stdout
    );
    assert!(
        touched.len() > 20,
        "the workload ran during the backfill: {}",
        touched.len()
    );
    assert!(result.printed("copied "), "{:#?}", result.stdout);
    assert!(result.printed("stream lag"), "{:#?}", result.stdout);
    let removed: u64 = result
        .value_after("removed ")
        .expect("the number of removed documents")
        .parse()
        .expect("a number");
    assert_eq!(
        removed, 1,
        "exactly the ghost document: {:#?}",
        result.stdout
    );

    // Right as the backfill ends, everything committed before its stream position is indexed:
    // only ids the workload changed after that position may still differ.
    let caught_up_to = result.lsn_after("stream position: ");
    let late: std::collections::HashSet<String> = touched
        .iter()
        .filter(|(_, position)| *position >= caught_up_to)
        .map(|(id, _)| id.to_string())
        .collect();
    let report = compare(&config, "public", &name, &["id"]).await;
    let unexplained: Vec<&String> = report
        .missing
        .iter()
        .chain(&report.extra)
        .chain(report.differing.iter().map(|difference| &difference.id))
        .filter(|id| !late.contains(*id))
        .collect();
    assert!(
        unexplained.is_empty(),
        "changes committed before the backfill's stream position are missing: {unexplained:?} ({report})"
    );
    assert!(
        !report.extra.contains(&"999999".to_owned()),
        "the ghost is gone"
    );

    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_with_where_copies_only_its_slice_and_a_bad_predicate_is_refused() {
    let name = name("backfill_where");
    let table = format!("public.{name}");
    create_table(&table, 1_000).await;
    let (config, config_path) = pipeline_config(&name, &table);
    let pipeline = RunningPipeline::start(config.clone()).await;
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;

    let refused = backfill(&config_path, &[&table, "--where", "no_such_column > 1"]).await;
    assert!(!refused.success, "{:#?}", refused.stdout);
    assert!(
        refused.stderr.contains("is not a valid predicate")
            && refused.stderr.contains("no_such_column"),
        "{}",
        refused.stderr
    );

    let unknown = backfill(&config_path, &["public.not_captured_here"]).await;
    assert!(!unknown.success);
    assert!(
        unknown.stderr.contains("is not in postgres.tables"),
        "{}",
        unknown.stderr
    );

    let result = backfill(&config_path, &[&table, "--where", "id <= 100 AND n > 0"]).await;
    assert!(result.success, "{}\n{:#?}", result.stderr, result.stdout);
    assert!(result.printed("copied 100 rows"), "{:#?}", result.stdout);
    assert!(
        !result.printed("removed"),
        "a slice removes nothing: {:#?}",
        result.stdout
    );
    let version = result.lsn_after("versioned ");
    let alias = alias_of(&config, "public", &name);
    let at_backfill_version =
        count_where(&alias, json!({"term": {"walsync.commit_lsn": version}})).await;
    assert_eq!(at_backfill_version, 100, "only the slice was rewritten");
    let slice_rewritten = count_where(
        &alias,
        json!({"bool": {"filter": [
            {"term": {"walsync.commit_lsn": version}},
            {"range": {"id": {"lte": 100}}}
        ]}}),
    )
    .await;
    assert_eq!(slice_rewritten, 100);

    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_into_a_new_index_swaps_the_alias_without_searches_seeing_a_partial_index() {
    let name = name("backfill_into");
    let table = format!("public.{name}");
    let rows = 20_000;
    create_table(&table, rows).await;
    let (config, config_path) = pipeline_config(&name, &table);
    let pipeline = RunningPipeline::start(config.clone()).await;
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;
    let alias = alias_of(&config, "public", &name);
    let old_index = index_behind(&alias).await;
    let before = count_where(&alias, json!({"match_all": {}})).await;
    assert_eq!(before, rows as u64);

    // Searches on the alias all along: never empty, never fewer documents than the table had
    // (the workload only inserts and updates, so the table never shrinks).
    let searching = Arc::new(AtomicBool::new(true));
    let lowest = Arc::new(AtomicU64::new(u64::MAX));
    let searches = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let searcher = {
        let (searching, lowest, searches, failures) = (
            Arc::clone(&searching),
            Arc::clone(&lowest),
            Arc::clone(&searches),
            Arc::clone(&failures),
        );
        let alias = alias.clone();
        tokio::spawn(async move {
            let client = search_client();
            while searching.load(Ordering::Relaxed) {
                let answer = client
                    .send(
                        Method::Post,
                        &format!("/{alias}/_count"),
                        HeaderMap::new(),
                        Option::<&()>::None,
                        Some(json!({"query": {"match_all": {}}}).to_string()),
                        Some(Duration::from_secs(30)),
                    )
                    .await;
                match answer {
                    Ok(response) if response.status_code().is_success() => {
                        let body: Value = response.json().await.unwrap_or(Value::Null);
                        match body["count"].as_u64() {
                            Some(count) => {
                                lowest.fetch_min(count, Ordering::Relaxed);
                                searches.fetch_add(1, Ordering::Relaxed);
                            }
                            None => failures.lock().await.push(body.to_string()),
                        }
                    }
                    Ok(response) => {
                        let status = response.status_code();
                        let body = response.text().await.unwrap_or_default();
                        failures.lock().await.push(format!("HTTP {status}: {body}"));
                    }
                    Err(error) => failures.lock().await.push(error.to_string()),
                }
            }
        })
    };

    let workload = Workload::start(table.clone(), rows, false);
    let new_index = format!("{alias}_v2");
    let result = backfill(&config_path, &[&table, "--into", &new_index]).await;
    let touched = workload.stop().await;
    searching.store(false, Ordering::Relaxed);
    searcher.await.expect("the searcher did not panic");
    assert!(result.success, "{}\n{:#?}", result.stderr, result.stdout);
    assert!(touched.len() > 20, "the workload ran: {}", touched.len());

    let failures = failures.lock().await.clone();
    assert!(
        failures.is_empty(),
        "searches failed during the swap: {failures:?}"
    );
    assert!(
        searches.load(Ordering::Relaxed) > 20,
        "searches ran throughout"
    );
    let lowest = lowest.load(Ordering::Relaxed);
    assert!(
        lowest >= before,
        "a search saw {lowest} documents, fewer than the {before} the table had"
    );

    assert_eq!(index_behind(&alias).await, new_index);
    assert!(
        result.printed(&format!("the old index {old_index} is kept")),
        "{:#?}",
        result.stdout
    );
    assert!(result.printed("stream lag"), "{:#?}", result.stdout);
    // The old index is kept whole: every row it had before the rebuild (the workload only
    // inserts and updates).
    let kept = |count: Value| count["count"].as_u64().expect("a count");
    assert!(kept(es(Method::Get, &format!("/{old_index}/_count"), None).await) >= before);
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;

    // An existing index is never a target, and a refused --into leaves it alone.
    let refused = backfill(&config_path, &[&table, "--into", &old_index]).await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("already exists"),
        "{}",
        refused.stderr
    );
    assert!(
        kept(es(Method::Get, &format!("/{old_index}/_count"), None).await) >= before,
        "a refused --into leaves the old index alone"
    );
    assert_eq!(index_behind(&alias).await, new_index);

    // Once more with --delete-old: the v2 index goes after the swap to v3.
    let third = format!("{alias}_v3");
    let again = backfill(&config_path, &[&table, "--into", &third, "--delete-old"]).await;
    assert!(again.success, "{}\n{:#?}", again.stderr, again.stdout);
    assert_eq!(index_behind(&alias).await, third);
    let gone = search_client()
        .send(
            Method::Head,
            &format!("/{new_index}"),
            HeaderMap::new(),
            Option::<&()>::None,
            Option::<&[u8]>::None,
            None,
        )
        .await
        .expect("the search server answers");
    assert_eq!(gone.status_code().as_u16(), 404, "{new_index} was deleted");
    let touched_after = sql()
        .await
        .execute(
            &format!("UPDATE {table} SET note = 'after' WHERE id <= 10"),
            &[],
        )
        .await
        .expect("update after the swap");
    assert_eq!(touched_after, 10);
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;

    pipeline.stop().await;
    drop_slot(&name).await;
}
