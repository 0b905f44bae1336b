//! Running the sink alone in-process, with records written straight into Kafka so a test
//! controls their order, keys and versions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tokio::sync::watch;
use walsync::config::Config;
use walsync::sink::apply::{Sink, SinkStats};
use walsync::sink::index::refresh;

use super::pipeline::{pipeline_config, search_client};
use super::{stack, wait_for};

/// A sink configuration of one table `public.items` whose events a test writes itself to
/// `<name>.public.items`.
pub fn items_config(name: &str) -> Config {
    let mut config = pipeline_config(name, &["public.items"]);
    config.sink.linger_ms = 5;
    config
}

/// Creates the topic of `public.items` under `config`.
pub async fn items_topic(config: &Config) -> String {
    let topic = format!("{}.public.items", config.kafka.topic_prefix);
    walsync::kafka::topics::ensure_topics(&config.kafka, std::slice::from_ref(&topic))
        .await
        .expect("create the topic");
    topic
}

/// The alias of `public.items` under `config`.
pub fn items_alias(config: &Config) -> String {
    format!("{}public.items", config.elasticsearch.index_prefix)
}

/// Writes `(key, value)` records to `topic` in order (one key → one partition, so this is
/// their partition order).
pub async fn produce_keyed(topic: &str, records: &[(String, Value)]) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for (key, value) in records {
        let value = value.to_string();
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("produce");
    }
}

/// A document's `_source` after a refresh, if it (and its index) exists.
pub async fn stored_document(alias: &str, id: &str) -> Option<Value> {
    let text = stored_source_text(alias, id).await?;
    Some(serde_json::from_str(&text).expect("a JSON document"))
}

/// A document's `_source` exactly as the server returns it (numbers as their text), after a
/// refresh, if it (and its index) exists.
pub async fn stored_source_text(alias: &str, id: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Found<'a> {
        #[serde(default)]
        found: bool,
        #[serde(rename = "_source", borrow)]
        source: Option<&'a serde_json::value::RawValue>,
    }
    let client = search_client();
    refresh(&client, alias).await.ok()?;
    let response = client
        .get(elasticsearch::GetParts::IndexId(alias, id))
        .send()
        .await
        .expect("get");
    let body = response.text().await.expect("body");
    let found: Found<'_> = serde_json::from_str(&body).expect("a get answer");
    found
        .found
        .then(|| found.source.map(|source| source.get().to_owned()))
        .flatten()
}

/// Runs a sink until it processed `records` (written to `topic` first), then stops it: the
/// state a later batch meets.
pub async fn apply_first(config: &Config, topic: &str, records: &[(String, Value)]) {
    produce_keyed(topic, records).await;
    let sink = RunningSink::start(config.clone()).await;
    sink.wait_processed(records.len() as u64).await;
    sink.stop().await.expect("clean stop");
}

pub struct RunningSink {
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub stats: Arc<SinkStats>,
    pub sink: Arc<Sink>,
}

impl RunningSink {
    pub async fn start(config: Config) -> Self {
        let sink = Arc::new(Sink::new(config).await.expect("create the sink"));
        let stats = Arc::clone(&sink.stats);
        let (stop, stopped) = watch::channel(false);
        let running = Arc::clone(&sink);
        let task = tokio::spawn(async move { running.run(stopped).await });
        Self {
            stop,
            task,
            stats,
            sink,
        }
    }

    /// Waits until the sink indexed, deleted, found stale or dead-lettered `events` events.
    pub async fn wait_processed(&self, events: u64) {
        let stats = Arc::clone(&self.stats);
        wait_for(
            "the sink to process the events",
            Duration::from_secs(60),
            || {
                let seen = stats.indexed.load(Ordering::Relaxed)
                    + stats.deleted.load(Ordering::Relaxed)
                    + stats.stale.load(Ordering::Relaxed)
                    + stats.dead_lettered.load(Ordering::Relaxed);
                async move { (seen >= events).then_some(()) }
            },
        )
        .await;
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.expect("no panic")
    }
}
