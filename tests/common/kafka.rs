//! Reading topics back in tests.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};
use serde_json::Value;

use super::{stack, unique_name};

/// One record as a test sees it.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Value,
    /// `None` for a tombstone.
    pub value: Option<Value>,
    /// The value's bytes as they were in Kafka (numbers and JSON text exactly as written).
    pub raw_value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Consumed {
    /// A control record (`walsync.control` header, e.g. `copy_completed`), not a change.
    pub fn is_control(&self) -> bool {
        self.headers.contains_key("walsync.control")
    }

    pub fn op(&self) -> Option<&str> {
        self.value.as_ref()?.get("op")?.as_str()
    }

    /// The `after` image's fields as the exact JSON text the source wrote.
    pub fn raw_after(&self) -> std::collections::HashMap<String, Box<serde_json::value::RawValue>> {
        #[derive(serde::Deserialize)]
        struct Image {
            after: std::collections::HashMap<String, Box<serde_json::value::RawValue>>,
        }
        let raw = self.raw_value.as_deref().expect("not a tombstone");
        serde_json::from_slice::<Image>(raw)
            .expect("an after image")
            .after
    }

    pub fn commit_lsn(&self) -> u64 {
        self.value
            .as_ref()
            .and_then(|v| v["source"]["commit_lsn"].as_u64())
            .unwrap_or_else(|| {
                self.headers["commit_lsn"]
                    .parse()
                    .expect("commit_lsn header")
            })
    }
}

/// Reads `topic` from the beginning until at least `count` records arrived, or panics after
/// `deadline`. Records come back sorted by (partition, offset).
pub async fn read_topic(topic: &str, count: usize, deadline: Duration) -> Vec<Consumed> {
    let mut records = Vec::new();
    read_topic_until(topic, deadline, |record| {
        records.push(record);
        records.len() >= count
    })
    .await;
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// Every change record in `topic` (control records aside), read up to the high watermarks as
/// they are now, sorted by (partition, offset). For asserting that nothing more than expected
/// was written: call it once the writer stopped.
pub async fn read_whole_topic(topic: &str, deadline: Duration) -> Vec<Consumed> {
    let total = topic_size(topic) as usize;
    let mut records = Vec::new();
    if total > 0 {
        let mut seen = 0;
        read_records_until(topic, deadline, |record| {
            seen += 1;
            if !record.is_control() {
                records.push(record);
            }
            seen >= total
        })
        .await;
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// Reads `topic` from the beginning, handing each change record (control records are skipped)
/// to `visit` until it returns true; panics after `deadline`.
pub async fn read_topic_until(
    topic: &str,
    deadline: Duration,
    mut visit: impl FnMut(Consumed) -> bool,
) {
    read_records_until(topic, deadline, |record| {
        !record.is_control() && visit(record)
    })
    .await;
}

/// Reads `topic` from the beginning, handing every record, control records included, to
/// `visit` until it returns true; panics after `deadline`.
pub async fn read_records_until(
    topic: &str,
    deadline: Duration,
    mut visit: impl FnMut(Consumed) -> bool,
) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .set("group.id", unique_name("walsync-test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("create the test consumer");
    // Partitions are assigned, not subscribed: a reader that needs no group coordinator
    // keeps working while the broker recovers from a fault a test injected.
    consumer
        .assign(&all_partitions_from_the_beginning(&consumer, topic))
        .expect("assign");
    let end = tokio::time::Instant::now() + deadline;
    let mut seen = 0_usize;
    loop {
        let received = tokio::time::timeout_at(end, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("{topic}: the condition did not hold after {seen} records"));
        let message = match received {
            Ok(message) => message,
            // Connection errors right after a paused broker resumes are transient: librdkafka
            // reconnects by itself, and the deadline bounds the wait.
            Err(error) => {
                eprintln!("{topic}: transient consumer error: {error}");
                continue;
            }
        };
        seen += 1;
        let key = serde_json::from_slice(message.key().expect("every record has a key"))
            .expect("the key is JSON");
        let value = message
            .payload()
            .map(|payload| serde_json::from_slice(payload).expect("the value is JSON"));
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let record = Consumed {
            partition: message.partition(),
            offset: message.offset(),
            key,
            value,
            raw_value: message.payload().map(<[u8]>::to_vec),
            headers,
        };
        if visit(record) {
            return;
        }
    }
}

/// Every partition of `topic`, each from its first offset.
fn all_partitions_from_the_beginning(
    consumer: &StreamConsumer,
    topic: &str,
) -> rdkafka::TopicPartitionList {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let metadata = loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(metadata) if metadata.topics().iter().any(|t| !t.partitions().is_empty()) => {
                break metadata;
            }
            other if std::time::Instant::now() > end => {
                panic!("{topic}: no partition metadata within a minute: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut partitions = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        partitions
            .add_partition_offset(topic, partition.id(), rdkafka::Offset::Beginning)
            .expect("a partition offset");
    }
    partitions
}

/// The number of records ever written to `topic` (the sum of its partitions' high
/// watermarks).
pub fn topic_size(topic: &str) -> i64 {
    try_topic_size(topic).expect("the topic's metadata and watermarks")
}

/// [`topic_size`], or `None` while the broker cannot answer for the topic yet (e.g. just
/// created, its partitions' leaders not elected).
pub fn try_topic_size(topic: &str) -> Option<i64> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .create()
        .ok()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()?;
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
                .ok()
                .map(|(_, high)| high)
        })
        .sum()
}
