//! Benchmarks against the local stack that print figures: `make bench`.
//!
//! 1. source: one transaction of N rows, commit to "every event acknowledged by Kafka"; events/s
//!    and the process's CPU seconds per 100k events;
//! 2. sink: the same N events from Kafka into a new index; documents/s and the process's CPU
//!    seconds per 100k events;
//! 3. raw bulk: the same N documents bulk-indexed straight into a new index by this program,
//!    batches and parallelism as the sink's (one request in flight per partition); documents/s,
//!    and the sink's share of it;
//! 4. end to end at a fixed rate (default 5,000 changes/s): every row updated once; the latency
//!    of each change from its commit (the event's commit timestamp) to the bulk API's
//!    acknowledgement, from the sink's `walsync_sink_commit_to_indexed_seconds` histogram: p50
//!    and p99 as bucket bounds, and the share within 100 ms.
//!
//! Figures, not pass/fail: timings belong here, not in tests. Sizes: BENCH_ROWS (default
//! 200000), BENCH_RATE (5000), BENCH_SECONDS (20).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/workload.rs"]
mod workload;

use std::time::{Duration, Instant};

use common::kafka::topic_size;
use common::pipeline::{RunningPipeline, alias_of, pipeline_config, search_client};
use common::source::{RunningSource, config_for, drop_slot, name, sql};
use common::wait_for;
use elasticsearch::http::request::JsonBody;
use elasticsearch::{BulkParts, Elasticsearch};
use serde_json::{Value, json};
use tokio::sync::watch;
use walsync::config::{Config, SnapshotMode};
use walsync::sink::apply::Sink;
use walsync::sink::index::{count, refresh};
use workload::{create_table, env_or, insert_rows};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

async fn wait_indexed(client: &Elasticsearch, alias: &str, expected: u64, deadline: Duration) {
    wait_for("every document indexed", deadline, || async {
        refresh(client, alias).await.ok()?;
        (count(client, alias).await.ok()? >= expected).then_some(())
    })
    .await;
}

#[tokio::main]
async fn main() {
    let rows = env_or("BENCH_ROWS", 200_000);
    let rate = env_or("BENCH_RATE", 5_000);
    let seconds = env_or("BENCH_SECONDS", 20);
    println!("walsync benchmarks on the local stack: {rows} rows");
    // `BENCH_ONLY=latency` runs only the end-to-end latency benchmark.
    if std::env::var("BENCH_ONLY").is_ok_and(|only| only == "latency") {
        latency_bench(rate, seconds).await;
        return;
    }

    let config = source_bench(rows).await;
    let sink_rate = sink_bench(&config, rows).await;
    let raw_rate = raw_bulk_bench(&config, rows).await;
    println!(
        "sink / raw bulk         {:>10.1} %   (target ≥ 90 %)",
        100.0 * sink_rate / raw_rate
    );
    drop_slot(&config.postgres.slot).await;
    latency_bench(rate, seconds).await;
}

/// Source: returns the configuration whose topic now holds `rows` events.
async fn source_bench(rows: u64) -> Config {
    let name = name("bench_src");
    let table = format!("public.{name}");
    create_table(&sql().await, &table).await;
    let mut config = pipeline_config(&name, &[&table]);
    config.snapshot.mode = SnapshotMode::Never;
    let source = RunningSource::start(config_for(&name, &[&table])).await;
    let topic = format!("{name}.public.{name}");
    let cpu_before = cpu_seconds();
    insert_rows(&sql().await, &table, 1, rows).await;
    let committed = Instant::now();
    wait_for(
        "every event acknowledged by Kafka",
        Duration::from_secs(600),
        || async { (topic_size(&topic) >= rows as i64).then_some(()) },
    )
    .await;
    let elapsed = committed.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    source.stop().await;
    println!(
        "source                  {:>10.0} events/s   ({rows} rows in one transaction, {elapsed:.2} s; {:.2} CPU s per 100k events, this process)",
        rows as f64 / elapsed,
        cpu / rows as f64 * 100_000.0
    );
    config
}

/// Sink: the topic's events into a new index; returns documents/s.
async fn sink_bench(config: &Config, rows: u64) -> f64 {
    let client = search_client();
    let (table_schema, table_name) = ("public", config.postgres.slot.as_str());
    let alias = alias_of(config, table_schema, table_name);
    let (stop, stopped) = watch::channel(false);
    let sink = Sink::new(config.clone()).await.expect("create the sink");
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let task = tokio::spawn(async move { sink.run(stopped).await });
    wait_indexed(&client, &alias, rows, Duration::from_secs(900)).await;
    let elapsed = started.elapsed().as_secs_f64();
    // The sink is all this process does meanwhile (the count polls aside).
    let cpu = cpu_seconds() - cpu_before;
    stop.send(true).expect("the sink listens");
    task.await.expect("no panic").expect("the sink stopped");
    let rate = rows as f64 / elapsed;
    println!(
        "sink                    {rate:>10.0} docs/s     ({rows} events from Kafka, {elapsed:.2} s, includes consumer start; {:.2} CPU s per 100k events, this process)",
        cpu / rows as f64 * 100_000.0
    );
    rate
}

/// Raw bulk: the sink's documents, read back, bulk-indexed into a new index as the sink would
/// (same batch size, one request in flight per partition); returns documents/s.
async fn raw_bulk_bench(config: &Config, rows: u64) -> f64 {
    let client = search_client();
    let alias = alias_of(config, "public", &config.postgres.slot);
    let documents = read_back(&client, &alias, rows).await;
    let target = format!("{}-raw", config.postgres.slot);
    client
        .indices()
        .create(elasticsearch::indices::IndicesCreateParts::Index(&target))
        .body(json!({"mappings": walsync::sink::index::default_mappings()}))
        .send()
        .await
        .expect("create the raw index");
    let batch = config.sink.batch_max_docs.max(1);
    let parallel = config.kafka.partitions.max(1) as usize;
    let started = Instant::now();
    let chunks: Vec<Vec<(String, Value)>> = documents
        .chunks(batch)
        .map(<[(String, Value)]>::to_vec)
        .collect();
    let mut chunks = chunks.into_iter();
    loop {
        let wave: Vec<_> = chunks.by_ref().take(parallel).collect();
        if wave.is_empty() {
            break;
        }
        let requests = wave.into_iter().map(|chunk| bulk(&client, &target, chunk));
        futures_util::future::join_all(requests).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = rows as f64 / elapsed;
    println!(
        "raw bulk                {rate:>10.0} docs/s     (batches of {batch}, {parallel} in flight, {elapsed:.2} s)"
    );
    rate
}

async fn bulk(client: &Elasticsearch, index: &str, chunk: Vec<(String, Value)>) {
    let mut body: Vec<JsonBody<Value>> = Vec::with_capacity(chunk.len() * 2);
    for (id, source) in chunk {
        let version = source["walsync"]["commit_lsn"].as_u64().unwrap_or(1);
        body.push(
            json!({"index": {"_id": id, "version": version, "version_type": "external_gte"}})
                .into(),
        );
        body.push(source.into());
    }
    let response = client
        .bulk(BulkParts::Index(index))
        .body(body)
        .send()
        .await
        .expect("bulk");
    let result: Value = response.json().await.expect("bulk response");
    assert_eq!(
        result["errors"],
        json!(false),
        "raw bulk rejected documents"
    );
}

/// Every document behind `alias`, by scrolling through it.
async fn read_back(client: &Elasticsearch, alias: &str, rows: u64) -> Vec<(String, Value)> {
    let mut documents = Vec::with_capacity(rows as usize);
    let mut after: Option<Value> = None;
    loop {
        let mut query = json!({"size": 5000, "sort": [{"_id": "asc"}]});
        if let Some(after) = &after {
            query["search_after"] = after.clone();
        }
        let response: Value = client
            .search(elasticsearch::SearchParts::Index(&[alias]))
            .body(query)
            .send()
            .await
            .expect("search")
            .json()
            .await
            .expect("search response");
        let hits = response["hits"]["hits"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if hits.is_empty() {
            return documents;
        }
        after = hits.last().map(|hit| hit["sort"].clone());
        for hit in hits {
            let id = hit["_id"].as_str().unwrap_or_default().to_owned();
            documents.push((id, hit["_source"].clone()));
        }
    }
}

/// End to end at `rate` changes/s for `seconds`: the latency from commit to indexing (the
/// bulk API's acknowledgement) of every change, from the sink's own histogram.
async fn latency_bench(rate: u64, seconds: u64) {
    // Installed before the pipeline starts, so the sink's handles record into it.
    let metrics = walsync::metrics::install().expect("install the metrics recorder");
    let name = name("bench_e2e");
    let table = format!("public.{name}");
    let changes = rate * seconds;
    let client = sql().await;
    create_table(&client, &table).await;
    insert_rows(&client, &table, 1, changes).await;
    let client = search_client();
    let config = pipeline_config(&name, &[&table]);
    let alias = alias_of(&config, "public", &name);
    let pipeline = RunningPipeline::start(config.clone()).await;
    wait_indexed(&client, &alias, changes, Duration::from_secs(900)).await;
    // Histograms count from here: the initial copy is not part of the figures.
    metrics.run_upkeep();
    let before_updates = metrics.render();
    let cpu_before_updates = cpu_seconds();

    // Every row once, in transactions of `per_tick` rows every 10 ms.
    let writer = sql().await;
    let per_tick = (rate / 100).max(1);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut next = 1_u64;
    while next <= changes {
        tick.tick().await;
        let last = (next + per_tick - 1).min(changes);
        writer
            .batch_execute(&format!(
                "UPDATE {table} SET price = price + 1, updated_at = clock_timestamp() WHERE id BETWEEN {next} AND {last}"
            ))
            .await
            .expect("update");
        next = last + 1;
    }
    let achieved = changes as f64 / started.elapsed().as_secs_f64();
    wait_for("every update indexed", Duration::from_secs(300), || async {
        refresh(&client, &alias).await.ok()?;
        versions_moved(&client, &alias, changes)
            .await?
            .then_some(())
    })
    .await;
    let update_seconds = started.elapsed().as_secs_f64();
    let pipeline_cores = (cpu_seconds() - cpu_before_updates) / update_seconds;
    pipeline.stop().await;
    metrics.run_upkeep();
    let rendered = metrics.render();
    let commit_to_indexed = Quantiles::between(
        &before_updates,
        &rendered,
        walsync::metrics::SINK_COMMIT_TO_INDEXED_SECONDS,
    );
    println!(
        "end to end              p50 ≤ {:.0} ms, p99 ≤ {:.0} ms, {:.2} % within 100 ms   ({} changes at {achieved:.0}/s; target p99 ≤ 100 ms at 5000/s; bucket bounds)",
        commit_to_indexed.at(0.50) * 1000.0,
        commit_to_indexed.at(0.99) * 1000.0,
        100.0 * commit_to_indexed.share_within(0.1),
        commit_to_indexed.total,
    );
    println!(
        "  this process          {pipeline_cores:.2} cores (source, sink and the workload's writer)"
    );
    // Where the time goes: the source's Kafka delivery and the sink's bulk requests.
    for (what, metric) in [
        (
            "  kafka delivery",
            walsync::metrics::SOURCE_KAFKA_DELIVERY_SECONDS,
        ),
        ("  bulk request", walsync::metrics::SINK_BULK_SECONDS),
    ] {
        let quantiles = Quantiles::between(&before_updates, &rendered, metric);
        println!(
            "{what:<24}p50 ≤ {:.0} ms, p99 ≤ {:.0} ms   ({} samples)",
            quantiles.at(0.50) * 1000.0,
            quantiles.at(0.99) * 1000.0,
            quantiles.total,
        );
    }
    drop_slot(&name).await;
}

/// The cumulative buckets `(le, count)` of histogram `name` in a Prometheus text rendering,
/// summed over its label sets, in increasing `le` (`+Inf` last).
fn histogram_buckets(rendered: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in rendered.lines().filter(|line| line.starts_with(&prefix)) {
        let Some(le) = line
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Quantiles of a histogram as the bounds of the buckets they fall in.
struct Quantiles {
    buckets: Vec<(f64, u64)>,
    total: u64,
}

impl Quantiles {
    /// Of the samples of histogram `name` recorded between two renderings.
    fn between(earlier: &str, later: &str, name: &str) -> Self {
        let before = histogram_buckets(earlier, name);
        let mut buckets = histogram_buckets(later, name);
        for (le, count) in &mut buckets {
            let already = before
                .iter()
                .find(|(bound, _)| bound == le)
                .map_or(0, |(_, count)| *count);
            *count = count.saturating_sub(already);
        }
        let total = buckets.last().map_or(0, |(_, count)| *count);
        Self { buckets, total }
    }

    /// The upper bound of the bucket holding quantile `q`.
    fn at(&self, q: f64) -> f64 {
        let needed = (self.total as f64 * q).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, count)| *count >= needed)
            .map_or(f64::INFINITY, |(le, _)| *le)
    }

    /// The share of samples at most `bound` (a bucket bound).
    fn share_within(&self, bound: f64) -> f64 {
        let within = self
            .buckets
            .iter()
            .find(|(le, _)| (*le - bound).abs() < 1e-9)
            .map_or(0, |(_, count)| *count);
        within as f64 / self.total.max(1) as f64
    }
}

/// True when every document carries its update (its last write is an `u` event).
async fn versions_moved(client: &Elasticsearch, alias: &str, changes: u64) -> Option<bool> {
    let response: Value = client
        .count(elasticsearch::CountParts::Index(&[alias]))
        .body(json!({"query": {"term": {"walsync.op": "u"}}}))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(response["count"].as_u64()? >= changes)
}
