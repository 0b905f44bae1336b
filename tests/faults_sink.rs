//! The sink under outages and crashes, as the released binary (`walsync run`: source and sink
//! in one process). These tests pause and stop the shared search server and kill walsync, so
//! `make test` runs them one at a time with nothing beside them.
//!
//! Each test drives a mixed workload from a background task while the fault happens: inserts,
//! updates, deletes, re-inserts of deleted keys (upserts), one row changed several times in one
//! transaction, wide updates of a few hundred rows, and rows whose TOASTed column is left
//! unchanged by updates (the sink must fill it in from the stored document). At the end the
//! index must equal the table field by field, the sink must have consumed and committed every
//! event, and nothing may have been dead-lettered.

mod common;

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use walsync::config::Config;

use common::kafka::topic_size;
use common::pipeline::{compare, wait_equal};
use common::process::{Paused, Walsync, pipeline_config, stack_control};
use common::rng::Rng;
use common::source::{drop_slot, name, sql};
use common::{stack, wait_for};

/// How long the index may take to equal the table once the fault is over.
const CATCH_UP: Duration = Duration::from_secs(180);

/// Samples of the committed offsets taken this soon after the fault began may still see the
/// commit of a batch whose bulk answer arrived just before it.
const SETTLE: Duration = Duration::from_secs(2);

// --- workload --------------------------------------------------------------------------------

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

async fn create_table(table: &str) {
    sql()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, n int NOT NULL, note text, body text);
             -- Never compressed: a body of a few kB is always stored out of line, so updates
             -- that leave it alone send it as an unchanged-TOAST marker.
             ALTER TABLE {table} ALTER COLUMN body SET STORAGE EXTERNAL"
        ))
        .await
        .expect("create the table");
}

struct WorkloadDone {
    changes: u64,
    transactions: u64,
    elapsed: Duration,
}

impl std::fmt::Display for WorkloadDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row changes in {} transactions over {:.1?}",
            self.changes, self.transactions, self.elapsed
        )
    }
}

/// About `target` row changes in many transactions, paced at `per_second`.
async fn workload(table: String, target: u64, per_second: u64, seed: u64) -> WorkloadDone {
    let mut client = sql().await;
    let mut rng = Rng::new(seed);
    // Every 40th row gets a ~3 kB body, TOASTed out of line.
    let insert = format!(
        "INSERT INTO {table} (id, n, note, body)
         SELECT g, 0, md5(g::text),
                CASE WHEN g % 40 = 0 THEN
                  (SELECT string_agg(md5(random()::text || g::text || s::text), '')
                   FROM generate_series(1, 100) s)
                END
         FROM generate_series($1::bigint, $2::bigint) g"
    );
    let update =
        format!("UPDATE {table} SET n = n + 1, note = md5(random()::text) WHERE id = ANY($1)");
    let delete = format!("DELETE FROM {table} WHERE id = ANY($1)");
    let upsert = format!(
        "INSERT INTO {table} AS t (id, n, note) SELECT unnest($1::bigint[]), 0, 'again'
         ON CONFLICT (id) DO UPDATE SET n = t.n + 100, note = 'upserted'"
    );
    let wide = format!("UPDATE {table} SET n = n + 1 WHERE id % 97 = $1");

    let start = Instant::now();
    let mut next_id: i64 = 0;
    let mut changes = 0_u64;
    let mut transactions = 0_u64;
    while changes < target {
        let transaction = client.transaction().await.expect("begin");
        let mut made = 0_u64;
        match rng.below(25) {
            0 if next_id > 0 => {
                let remainder = rng.below(97) as i64;
                made += transaction
                    .execute(&wide, &[&remainder])
                    .await
                    .expect("wide update");
            }
            1 if next_id > 0 => {
                // One row changed, deleted and re-inserted in one transaction: the events share
                // one commit LSN and only their order decides.
                let id = vec![rng.below(next_id as u64) as i64];
                for statement in [&update, &update, &delete, &upsert, &update] {
                    made += transaction
                        .execute(statement, &[&id])
                        .await
                        .expect("one row, many times");
                }
            }
            _ => {
                let count = rng.between(10, 40) as i64;
                made += transaction
                    .execute(&insert, &[&next_id, &(next_id + count - 1)])
                    .await
                    .expect("insert");
                next_id += count;
                let updated = random_ids(&mut rng, next_id, 5, 25);
                made += transaction
                    .execute(&update, &[&updated])
                    .await
                    .expect("update");
                let deleted = random_ids(&mut rng, next_id, 0, 8);
                made += transaction
                    .execute(&delete, &[&deleted])
                    .await
                    .expect("delete");
                let upserted = random_ids(&mut rng, next_id, 0, 4);
                made += transaction
                    .execute(&upsert, &[&upserted])
                    .await
                    .expect("upsert");
            }
        }
        transaction.commit().await.expect("commit");
        changes += made;
        transactions += 1;
        let due = start + Duration::from_secs_f64(changes as f64 / per_second as f64);
        tokio::time::sleep_until(due.into()).await;
    }
    WorkloadDone {
        changes,
        transactions,
        elapsed: start.elapsed(),
    }
}

/// Between `low` and `high` distinct ids below `below`, half of them among the newest 200
/// rows (hot rows: several changes per key in one batch).
fn random_ids(rng: &mut Rng, below: i64, low: u64, high: u64) -> Vec<i64> {
    let count = rng.between(low, high);
    let mut ids: Vec<i64> = (0..count)
        .map(|_| {
            let below = below as u64;
            if rng.below(2) == 0 {
                below.saturating_sub(1 + rng.below(200.min(below))) as i64
            } else {
                rng.below(below) as i64
            }
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

// --- observing the process, the group and the search server --------------------------------

/// The consumer group's committed offsets and the topic's high watermarks, read by a consumer
/// that names the group but never joins it (an offset fetch needs no membership).
struct GroupProbe {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl GroupProbe {
    fn new(group: &str, topic: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &stack().kafka_brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("create the offset probe");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "{topic} has partitions");
        Self {
            consumer,
            topic: topic.to_owned(),
            partitions,
        }
    }

    /// The group's committed offset per partition (0 where nothing was committed yet).
    fn committed(&self) -> Vec<i64> {
        let mut wanted = TopicPartitionList::new();
        for partition in 0..self.partitions {
            wanted.add_partition(&self.topic, partition);
        }
        let committed = self
            .consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .expect("fetch the group's committed offsets");
        (0..self.partitions)
            .map(|partition| {
                match committed
                    .find_partition(&self.topic, partition)
                    .map(|element| element.offset())
                {
                    Some(Offset::Offset(offset)) => offset,
                    _ => 0,
                }
            })
            .collect()
    }

    fn high_watermarks(&self) -> Vec<i64> {
        (0..self.partitions)
            .map(|partition| {
                self.consumer
                    .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .collect()
    }
}

fn total(offsets: &[i64]) -> i64 {
    offsets.iter().sum()
}

fn log_tail(walsync: &Walsync) -> String {
    let text = walsync.log_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Panics (with the end of its log) if walsync exited on its own.
fn assert_running(walsync: &mut Walsync) {
    if let Some(status) = walsync.child.try_wait().expect("check on walsync") {
        panic!(
            "walsync exited on its own ({status}); log {}:\n{}",
            walsync.log.display(),
            log_tail(walsync)
        );
    }
}

async fn exited(walsync: &mut Walsync) -> ExitStatus {
    loop {
        if let Some(status) = walsync.child.try_wait().expect("check on walsync") {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_streaming(slot: &str) {
    let client = sql().await;
    wait_for(
        "walsync to stream from its slot",
        Duration::from_secs(60),
        || async {
            client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
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

/// Waits until the sink has applied and committed something: it is working when the fault hits.
async fn wait_committing(walsync: &mut Walsync, probe: &GroupProbe) {
    let start = Instant::now();
    while total(&probe.committed()) == 0 {
        assert_running(walsync);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the sink committed nothing within 60 s:\n{}",
            log_tail(walsync)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples the committed offsets every second for `duration` (the fault is on): after
/// [`SETTLE`] they must not move at all, since nothing can be indexed. Returns them.
async fn committed_through_outage(
    walsync: &mut Walsync,
    probe: &GroupProbe,
    outage: Instant,
    duration: Duration,
) -> Vec<i64> {
    let mut baseline: Option<Vec<i64>> = None;
    loop {
        assert_running(walsync);
        let committed = probe.committed();
        if outage.elapsed() >= SETTLE {
            match &baseline {
                None => baseline = Some(committed),
                Some(baseline) => assert_eq!(
                    &committed,
                    baseline,
                    "offsets were committed after {:?} of the outage, while nothing could be indexed",
                    outage.elapsed()
                ),
            }
        }
        if outage.elapsed() >= duration && baseline.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    baseline.expect("sampled after the settle time")
}

/// Once the workload is over: the index equals the table, the sink committed every event
/// (nothing left that could still change the index), and the index still equals the table.
async fn wait_caught_up(
    walsync: &mut Walsync,
    config: &Config,
    table_name: &str,
    probe: &GroupProbe,
) {
    let start = Instant::now();
    tokio::select! {
        _ = wait_equal(config, "public", table_name, &["id"], CATCH_UP) => {}
        status = exited(walsync) => panic!(
            "walsync exited ({status}) before the index equalled the table:\n{}",
            log_tail(walsync)
        ),
    }
    println!(
        "index equal to the table {:?} after the workload",
        start.elapsed()
    );
    loop {
        assert_running(walsync);
        let committed = probe.committed();
        let high = probe.high_watermarks();
        if committed == high {
            break;
        }
        assert!(
            start.elapsed() < CATCH_UP,
            "the sink never committed every event: committed {committed:?}, high watermarks {high:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = compare(config, "public", table_name, &["id"]).await;
    assert!(
        report.is_equal(),
        "equal once, different after the sink committed everything: {report}"
    );
    println!(
        "{} rows, {} documents: equal; every event committed",
        report.rows, report.documents
    );
}

/// Drops the test's replication slot when a failing test unwinds (walsync, declared later, is
/// killed first), so a failed run does not leave a slot holding WAL on the shared server.
struct SlotCleanup(String);

impl Drop for SlotCleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");
        let slot = &self.0;
        let drop_inactive = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{slot}' AND NOT active"
        );
        let remaining =
            format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'");
        // The killed process's walsender may hold the slot for a moment.
        for _ in 0..20 {
            let output = Command::new(script)
                .args(["psql", "-qAt", "-c", &drop_inactive, "-c", &remaining])
                .output();
            if output.is_ok_and(|output| {
                String::from_utf8_lossy(&output.stdout).lines().last() == Some("0")
            }) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("could not drop the replication slot {}", self.0);
    }
}

/// No dead letters, a clean stop on SIGTERM, no slot left behind.
async fn finish(mut walsync: Walsync, name: &str) {
    let dead_letters = topic_size(&format!("{name}.dlq"));
    assert_eq!(
        dead_letters,
        0,
        "nothing may be dead-lettered by an outage or a crash:\n{}",
        log_tail(&walsync)
    );
    let code = walsync.terminate(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "walsync stops cleanly:\n{}", log_tail(&walsync));
    drop_slot(name).await;
}

/// Gives the sink's consumer a static group membership (`group.instance.id`), so a walsync
/// restarted after kill -9 takes over its partitions at once. Without it, the group waits for
/// the killed member's session to time out (45 s by default) before anyone consumes again, and
/// the restarted sink would sit out the fault instead of working through it.
fn static_membership(config: String, name: &str) -> String {
    format!("{config}\n[kafka.extra]\n\"group.instance.id\" = \"{name}-sink-0\"\n")
}

/// Stops the search server; starts it again when dropped, even when the test fails.
struct SearchStopped;

impl SearchStopped {
    fn new() -> Self {
        stack_control("stop", "search");
        Self
    }
}

impl Drop for SearchStopped {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");
        let started = Command::new(script)
            .args(["start", "search"])
            .status()
            .is_ok_and(|status| status.success());
        if !started {
            if std::thread::panicking() {
                eprintln!("could not start the search server again: run scripts/stack up");
            } else {
                panic!("scripts/stack start search failed");
            }
        }
    }
}

// --- the tests -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_server_paused_for_30_s_under_load_commits_nothing_meanwhile_and_catches_up() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let test_start = Instant::now();
    let name = name("fsink_pause");
    let table = format!("public.{name}");
    create_table(&table).await;
    // Declared before walsync, so dropped after it when a test fails.
    let _slot = SlotCleanup(name.clone());
    let mut walsync = Walsync::spawn("run", &name, &pipeline_config(&name, &[&table]));
    println!("walsync log: {}", walsync.log.display());
    wait_streaming(&name).await;
    let probe = GroupProbe::new(&format!("{name}-sink"), &format!("{name}.public.{name}"));
    let seed = clock_seed();
    println!("workload seed: {seed}");
    let load = tokio::spawn(workload(table.clone(), 20_000, 500, seed));
    wait_committing(&mut walsync, &probe).await;

    let paused = Paused::new("search");
    let outage = Instant::now();
    println!(
        "search server paused at {:?}; committed {} events",
        test_start.elapsed(),
        total(&probe.committed())
    );
    let committed = committed_through_outage(&mut walsync, &probe, outage, OUTAGE).await;
    let high = probe.high_watermarks();
    drop(paused);
    println!(
        "resumed after {:?}: committed {committed:?} (stable from {SETTLE:?} on), high watermarks {high:?}",
        outage.elapsed()
    );
    assert!(
        total(&high) > total(&committed),
        "events arrived during the outage and were not committed: committed {committed:?}, high {high:?}"
    );

    let done = load.await.expect("the workload ran");
    println!("workload: {done}");
    let config = common::pipeline::pipeline_config(&name, &[&table]);
    wait_caught_up(&mut walsync, &config, &name, &probe).await;
    finish(walsync, &name).await;
    println!("test took {:?}", test_start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_server_stopped_and_restarted_under_load_loses_nothing() {
    const DOWN: Duration = Duration::from_secs(10);
    let test_start = Instant::now();
    let name = name("fsink_stop");
    let table = format!("public.{name}");
    create_table(&table).await;
    // Declared before walsync, so dropped after it when a test fails.
    let _slot = SlotCleanup(name.clone());
    let config = static_membership(pipeline_config(&name, &[&table]), &name);
    let mut walsync = Walsync::spawn("run", &name, &config);
    println!("walsync log: {}", walsync.log.display());
    wait_streaming(&name).await;
    let probe = GroupProbe::new(&format!("{name}-sink"), &format!("{name}.public.{name}"));
    let seed = clock_seed();
    println!("workload seed: {seed}");
    let load = tokio::spawn(workload(table.clone(), 20_000, 800, seed));
    wait_committing(&mut walsync, &probe).await;

    // Stopping and starting block for a while; the workload keeps running meanwhile.
    let stopping = Instant::now();
    let stopped = tokio::task::spawn_blocking(SearchStopped::new)
        .await
        .expect("stop the search server");
    let outage = Instant::now();
    println!(
        "search server stopped at {:?} (stopping took {:?})",
        test_start.elapsed(),
        stopping.elapsed()
    );
    let committed = committed_through_outage(&mut walsync, &probe, outage, DOWN / 2).await;
    // Halfway through the outage walsync crashes and comes back while the search server is
    // still down: the new process has not checked its index yet and must wait for the server
    // instead of giving up.
    walsync.kill_9();
    walsync = Walsync::spawn("run", &name, &config);
    println!(
        "walsync killed and restarted {:?} into the outage",
        outage.elapsed()
    );
    let after_restart = committed_through_outage(&mut walsync, &probe, outage, DOWN).await;
    assert_eq!(
        after_restart, committed,
        "nothing was committed across the restart while the search server was down"
    );
    let high = probe.high_watermarks();
    let starting = Instant::now();
    tokio::task::spawn_blocking(move || drop(stopped))
        .await
        .expect("start the search server");
    println!(
        "search server back after {:?} (starting took {:?}): committed {committed:?} while down, high watermarks {high:?}",
        outage.elapsed(),
        starting.elapsed()
    );
    assert!(
        total(&high) > total(&committed),
        "events arrived during the outage and were not committed"
    );

    let done = load.await.expect("the workload ran");
    println!("workload: {done}");
    let config = common::pipeline::pipeline_config(&name, &[&table]);
    wait_caught_up(&mut walsync, &config, &name, &probe).await;
    finish(walsync, &name).await;
    println!("test took {:?}", test_start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_walsync_run_at_random_points_of_a_workload_ends_with_the_index_equal_to_the_table()
 {
    const KILLS: usize = 5;
    let test_start = Instant::now();
    let name = name("fsink_kill");
    let table = format!("public.{name}");
    create_table(&table).await;
    // Declared before walsync, so dropped after it when a test fails.
    let _slot = SlotCleanup(name.clone());
    let config = static_membership(pipeline_config(&name, &[&table]), &name);
    let mut walsync = Walsync::spawn("run", &name, &config);
    println!("walsync log: {}", walsync.log.display());
    wait_streaming(&name).await;
    let probe = GroupProbe::new(&format!("{name}-sink"), &format!("{name}.public.{name}"));
    let seed = clock_seed();
    println!("seed (workload and kill points): {seed}");
    let mut rng = Rng::new(seed);
    let load = tokio::spawn(workload(table.clone(), 50_000, 2_000, rng.next()));

    // At least KILLS kills, and on until the workload is over.
    let mut kills = 0;
    while kills < KILLS || (!load.is_finished() && kills < 3 * KILLS) {
        let delay = Duration::from_millis(rng.between(500, 4_000));
        tokio::time::sleep(delay).await;
        assert_running(&mut walsync);
        walsync.kill_9();
        kills += 1;
        println!(
            "kill -9 #{kills} at {:?}, {delay:?} after the start: committed {} of {} events",
            test_start.elapsed(),
            total(&probe.committed()),
            total(&probe.high_watermarks())
        );
        walsync = Walsync::spawn("run", &name, &config);
    }

    let done = load.await.expect("the workload ran");
    println!("workload: {done}; {kills} kills");
    let compare_config = common::pipeline::pipeline_config(&name, &[&table]);
    wait_caught_up(&mut walsync, &compare_config, &name, &probe).await;
    finish(walsync, &name).await;
    println!("test took {:?}", test_start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_search_outage_exits_and_the_batch_is_applied_after_restart() {
    let name = name("fsink_stop_outage");
    let table = format!("public.{name}");
    create_table(&table).await;
    let _slot = SlotCleanup(name.clone());
    let address = common::endpoints::free_address();
    let toml = format!(
        "{}\n[metrics]\nlisten = {address:?}\n",
        static_membership(pipeline_config(&name, &[&table]), &name)
    );
    let config = common::pipeline::pipeline_config(&name, &[&table]);
    let mut walsync = Walsync::spawn("run", &name, &toml);
    wait_streaming(&name).await;
    let client = sql().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (id, n, note) SELECT g, 0, 'before' FROM generate_series(1, 10) g"
        ))
        .await
        .expect("insert");
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;

    let paused = Paused::new("search");
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (id, n, note) SELECT g, 0, 'during' FROM generate_series(11, 20) g"
        ))
        .await
        .expect("insert during the outage");
    // The scenario: the sink holds a batch the hung server cannot take — it has consumed the
    // ten new events (counted before their bulk is sent) and cannot write them.
    let consumed = walsync::metrics::SINK_EVENTS_CONSUMED;
    wait_for(
        "the sink to hold the new events",
        Duration::from_secs(60),
        || async {
            let (_, body) = common::endpoints::get(&address, "/metrics").await?;
            (common::endpoints::sum(&body, consumed, &[])? >= 20.0).then_some(())
        },
    )
    .await;
    let code = walsync.terminate(Duration::from_secs(60)).await;
    assert_eq!(
        code,
        0,
        "SIGTERM during an outage still exits:\n{}",
        log_tail(&walsync)
    );
    drop(paused);

    let walsync = Walsync::spawn("run", &name, &toml);
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(180)).await;
    finish(walsync, &name).await;
}

/// A truncate that reaches the sink while the search server is down: recording its mark and
/// its delete_by_query are retried like a bulk (the partition waits) instead of stopping the
/// sink, and once the server is back the index holds exactly the rows inserted after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_during_a_search_outage_is_applied_once_the_server_is_back() {
    let name = name("fsink_trunc");
    let table = format!("public.{name}");
    create_table(&table).await;
    let _slot = SlotCleanup(name.clone());
    let mut walsync = Walsync::spawn("run", &name, &pipeline_config(&name, &[&table]));
    wait_streaming(&name).await;
    let config = common::pipeline::pipeline_config(&name, &[&table]);
    let client = sql().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} SELECT g, g, 'before', '' FROM generate_series(1, 100) g"
        ))
        .await
        .expect("insert rows");
    common::pipeline::wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;

    let stopped = tokio::task::spawn_blocking(SearchStopped::new)
        .await
        .expect("stop the search server");
    // The truncate alone: rows inserted in the outage would hold the sink in bulk retries, and
    // a truncate waits for the writes in flight before it.
    client
        .batch_execute(&format!("TRUNCATE {table}"))
        .await
        .expect("truncate");
    wait_for(
        "the sink to retry the truncate",
        Duration::from_secs(120),
        || async {
            walsync
                .log_text()
                .contains("recording a truncate mark failed; retrying")
                .then_some(())
        },
    )
    .await;
    assert!(
        walsync.child.try_wait().expect("wait on walsync").is_none(),
        "walsync keeps running through the outage:\n{}",
        log_tail(&walsync)
    );
    tokio::task::spawn_blocking(move || drop(stopped))
        .await
        .expect("start the search server");
    client
        .batch_execute(&format!(
            "INSERT INTO {table} SELECT g, g, 'after', '' FROM generate_series(1001, 1005) g"
        ))
        .await
        .expect("insert after the truncate");
    common::pipeline::wait_equal(&config, "public", &name, &["id"], Duration::from_secs(180)).await;
    assert!(
        walsync.log_text().contains("applied a truncate"),
        "{}",
        log_tail(&walsync)
    );
    finish(walsync, &name).await;
}

/// Stops PostgreSQL; starts it again when dropped, even when the test fails.
struct PostgresStopped;

impl PostgresStopped {
    fn new() -> Self {
        stack_control("stop", "pg");
        Self
    }
}

impl Drop for PostgresStopped {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");
        let started = Command::new(script)
            .args(["start", "pg"])
            .status()
            .is_ok_and(|status| status.success());
        if !started && !std::thread::panicking() {
            panic!("scripts/stack start pg failed");
        }
    }
}

/// A TOAST fill that must re-read its row while PostgreSQL is down waits the outage out (the
/// sink neither exits nor skips the event), then writes the row's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toast_re_read_during_a_postgres_outage_waits_and_then_fills() {
    use common::sink::{RunningSink, produce_keyed, stored_document};
    use serde_json::json;
    use std::sync::atomic::Ordering;

    let name = name("fault_reread");
    let schema = format!("{name}_s");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {schema}.items (id int PRIMARY KEY, note text, big text);
             INSERT INTO {schema}.items VALUES (1, 'x', 'the stored big value');"
        ))
        .await
        .expect("create the table");
    drop(client);
    let mut config = common::pipeline::pipeline_config(&name, &[&format!("{schema}.items")]);
    config.sink.linger_ms = 5;
    let topic = format!("{name}.{schema}.items");
    walsync::kafka::topics::ensure_topics(&config.kafka, std::slice::from_ref(&topic))
        .await
        .expect("create the topic");
    // A key change's create: its TOASTed value must come from a re-read.
    let event = json!({
        "before": null, "after": {"id": 1, "note": "x"}, "op": "c", "ts_ms": 0,
        "source": {"schema": schema, "table": "items", "txId": 1, "lsn": 999, "commit_lsn": 1_000,
                   "ts_ms": 0, "snapshot": "false", "system_id": "7000000000000000021", "timeline": 1},
        "unchanged_toast_columns": ["big"]
    });
    produce_keyed(&topic, &[(json!({"id": 1}).to_string(), event)]).await;

    let stopped = PostgresStopped::new();
    let sink = RunningSink::start(config.clone()).await;
    wait_for("the re-read to be retried", Duration::from_secs(60), || {
        let retries = sink.stats.retries.load(Ordering::Relaxed);
        async move { (retries >= 2).then_some(()) }
    })
    .await;
    assert!(!sink.task.is_finished(), "the sink waits, it does not exit");
    drop(stopped);
    let alias = format!("{}{schema}.items", config.elasticsearch.index_prefix);
    let document = wait_for("the filled document", Duration::from_secs(120), || {
        let alias = alias.clone();
        async move { stored_document(&alias, "1").await }
    })
    .await;
    assert_eq!(document["big"], "the stored big value");
    assert_eq!(sink.stats.dead_lettered.load(Ordering::Relaxed), 0);
    sink.stop().await.expect("clean stop");
}
