//! The source against Debezium, in one run: `make bench` (or `cargo bench --bench debezium` after
//! `scripts/stack debezium-jars` and `cargo build --release`).
//!
//! The same work for both: one transaction of BENCH_ROWS inserted rows, from its commit until
//! Kafka holds every event. walsync is the release binary (`walsync source`); Debezium is its
//! PostgreSQL connector (pgoutput) in a Kafka Connect standalone worker, the way most of its
//! users run it. Both are separate processes measured the same way: wall time, and the CPU
//! seconds the process used (user + system, from /proc) over the transaction, and its peak
//! RSS. Each first streams a warm-up transaction, so the JVM's JIT and walsync's buffers start
//! warm.
//!
//! Both run in a database of their own (`walsync_bench`, recreated each run): Debezium's type
//! registry fails on a domain over an enum (`NullPointerException` in `TypeRegistry`), which the
//! test suites leave in the main database.
//!
//! Debezium's settings are its defaults, with what is fairest to it: JSON converters without the
//! embedded schemas (smaller records) and the producer's compression (zstd) and linger (5 ms)
//! set to walsync's.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/workload.rs"]
mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::kafka::try_topic_size;
use common::process::{Walsync, peak_rss_bytes};
use common::source::wait_streaming;
use common::{admin_client, stack, wait_for};
use workload::{create_table, env_or, insert_rows};

const DATABASE: &str = "walsync_bench";

/// What one contender did with the measured transaction.
struct Figures {
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_bytes: u64,
}

impl Figures {
    fn print(&self, who: &str, rows: u64) {
        println!(
            "{who:<10}{:>10.0} events/s   {:>6.2} CPU s per 100k events   peak RSS {:>5} MiB   ({rows} rows in {:.2} s)",
            rows as f64 / self.seconds,
            self.cpu_seconds / rows as f64 * 100_000.0,
            self.peak_rss_bytes / (1024 * 1024),
            self.seconds,
        );
    }
}

/// User + system CPU seconds of process `pid` (all its threads), from /proc/<pid>/stat.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are plain.
    let after_name = &stat[stat.rfind(')').expect("a command name in stat") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_second
}

/// The stack's PostgreSQL URL with the bench database in place of its own.
fn bench_database_url() -> String {
    let url = &stack().pg_url;
    let (without_query, query) = url
        .split_once('?')
        .map_or((url.as_str(), None), |(u, q)| (u, Some(q)));
    let (server, _) = without_query
        .rsplit_once('/')
        .expect("a database in PG_URL");
    match query {
        Some(query) => format!("{server}/{DATABASE}?{query}"),
        None => format!("{server}/{DATABASE}"),
    }
}

async fn bench_sql() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&bench_database_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the bench database");
    tokio::spawn(connection);
    client
}

async fn recreate_database() {
    let admin = admin_client().await;
    // Two statements: DROP DATABASE refuses to run inside the implicit transaction of a batch.
    for statement in [
        format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"),
        format!("CREATE DATABASE {DATABASE} OWNER walsync"),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .expect("recreate the bench database");
    }
}

async fn wait_topic_holds(topic: &str, records: u64) {
    wait_for("every event in Kafka", Duration::from_secs(900), || async {
        (try_topic_size(topic)? >= records as i64).then_some(())
    })
    .await;
}

/// Warm-up, then the measured transaction, on table `public.<name>` whose events go to topic
/// `<name>.public.<name>`; `pid` is the contender's process.
async fn measure(
    pid: u32,
    client: &tokio_postgres::Client,
    name: &str,
    warmup: u64,
    rows: u64,
) -> Figures {
    let table = format!("public.{name}");
    let topic = format!("{name}.public.{name}");
    insert_rows(client, &table, 1, warmup).await;
    wait_topic_holds(&topic, warmup).await;
    let cpu_before = process_cpu_seconds(pid);
    insert_rows(client, &table, warmup + 1, rows).await;
    let committed = Instant::now();
    wait_topic_holds(&topic, warmup + rows).await;
    let seconds = committed.elapsed().as_secs_f64();
    Figures {
        seconds,
        cpu_seconds: process_cpu_seconds(pid) - cpu_before,
        peak_rss_bytes: peak_rss_bytes(pid),
    }
}

async fn drop_slot(client: &tokio_postgres::Client, slot: &str) {
    let _ = client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
}

async fn walsync(client: &tokio_postgres::Client, name: &str, warmup: u64, rows: u64) -> Figures {
    let table = format!("public.{name}");
    create_table(client, &table).await;
    let config = format!(
        r#"[postgres]
url = {url:?}
slot = {name:?}
publication = "{name}_pub"
tables = [{table:?}]
heartbeat_interval_secs = 0

[kafka]
brokers = {brokers:?}
topic_prefix = {name:?}

[snapshot]
mode = "never"
"#,
        url = bench_database_url(),
        brokers = stack().kafka_brokers,
    );
    let mut source = Walsync::spawn("source", name, &config);
    wait_streaming(name).await;
    let figures = measure(source.pid(), client, name, warmup, rows).await;
    source.terminate(Duration::from_secs(60)).await;
    drop_slot(client, name).await;
    figures
}

/// A Kafka Connect standalone worker running Debezium's PostgreSQL connector; killed on drop.
struct Debezium {
    child: Child,
}

impl Debezium {
    fn start(libs: &Path, name: &str, table: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("walsync-bench-{name}"));
        std::fs::create_dir_all(&dir).expect("create the worker's directory");
        let pg = tokio_postgres::Config::from_str(&bench_database_url()).expect("PG_URL parses");
        let host = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        };
        let password = String::from_utf8_lossy(pg.get_password().unwrap_or_default()).into_owned();
        let worker = format!(
            "bootstrap.servers={brokers}
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter.schemas.enable=false
offset.storage.file.filename={offsets}
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:{rest_port}
producer.compression.type=zstd
producer.linger.ms=5
",
            brokers = stack().kafka_brokers,
            offsets = dir.join("offsets").display(),
            rest_port = common::endpoints::free_address()
                .rsplit_once(':')
                .map(|(_, port)| port.to_owned())
                .expect("a port"),
        );
        let connector = format!(
            "name={name}
connector.class=io.debezium.connector.postgresql.PostgresConnector
database.hostname={host}
database.port={port}
database.user={user}
database.password={password}
database.dbname={DATABASE}
topic.prefix={name}
plugin.name=pgoutput
slot.name={name}
publication.name={name}_pub
publication.autocreate.mode=filtered
table.include.list={table}
snapshot.mode=no_data
topic.creation.default.partitions=3
topic.creation.default.replication.factor=1
{extra}",
            extra = std::env::var("DEBEZIUM_EXTRA")
                .unwrap_or_default()
                .replace(';', "\n"),
            port = pg.get_ports().first().copied().unwrap_or(5432),
            user = pg.get_user().unwrap_or("walsync"),
        );
        let _ = std::fs::remove_file(dir.join("offsets"));
        std::fs::write(dir.join("worker.properties"), worker).expect("write worker.properties");
        std::fs::write(dir.join("connector.properties"), connector)
            .expect("write connector.properties");
        std::fs::write(dir.join("log4j2.properties"), LOG4J2).expect("write log4j2.properties");
        let log = std::fs::File::create(dir.join("connect.log")).expect("create the worker's log");
        println!("debezium worker log: {}", dir.join("connect.log").display());
        // The JVM options of Kafka's connect-standalone.sh.
        let child = Command::new("java")
            .args([
                "-Xms256m",
                "-Xmx2g",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
            ])
            .args([
                "-XX:InitiatingHeapOccupancyPercent=35",
                "-XX:+ExplicitGCInvokesConcurrent",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(dir.join("worker.properties"))
            .arg(dir.join("connector.properties"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the Kafka Connect worker (java)");
        Self { child }
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LOG4J2: &str = "status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.err.ref = ERR
logger.kafka.name = org.apache.kafka
logger.kafka.level = WARN
";

async fn debezium(
    libs: &Path,
    client: &tokio_postgres::Client,
    name: &str,
    warmup: u64,
    rows: u64,
) -> Figures {
    let table = format!("public.{name}");
    create_table(client, &table).await;
    let worker = Debezium::start(libs, name, &table);
    wait_streaming(name).await;
    let figures = measure(worker.child.id(), client, name, warmup, rows).await;
    drop(worker);
    drop_slot(client, name).await;
    figures
}

fn debezium_libs() -> PathBuf {
    let libs = std::env::var_os("DEBEZIUM_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".stack/debezium/libs"));
    assert!(
        libs.join(".complete").exists(),
        "{} is missing: run `scripts/stack debezium-jars` (make bench does)",
        libs.display()
    );
    libs
}

#[tokio::main]
async fn main() {
    let rows = env_or("BENCH_ROWS", 200_000);
    let warmup = env_or("BENCH_WARMUP_ROWS", 20_000);
    let libs = debezium_libs();
    println!(
        "walsync vs Debezium on the local stack: one transaction of {rows} rows, after {warmup} to warm up"
    );
    recreate_database().await;
    let client = bench_sql().await;
    let suffix = std::process::id();
    let ours = walsync(&client, &format!("cmp_walsync_{suffix}"), warmup, rows).await;
    let theirs = debezium(
        &libs,
        &client,
        &format!("cmp_debezium_{suffix}"),
        warmup,
        rows,
    )
    .await;
    ours.print("walsync", rows);
    theirs.print("debezium", rows);
    println!(
        "walsync/debezium: {:.1}× the events/s, {:.0} % of the CPU per event, {:.0} % of the peak RSS",
        theirs.seconds / ours.seconds,
        100.0 * ours.cpu_seconds / theirs.cpu_seconds,
        100.0 * ours.peak_rss_bytes as f64 / theirs.peak_rss_bytes as f64,
    );
}
