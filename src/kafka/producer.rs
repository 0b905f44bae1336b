//! The producer the source writes events through.
//!
//! Settings walsync owns: idempotence with `acks=all` (no duplicates from producer retries, no
//! reordering within a partition), and no message timeout: while Kafka is down, records wait
//! and the LSN is not confirmed, so nothing is dropped. The producer's queue is bounded in
//! messages and bytes; a full queue makes `send` wait, which stops WAL reading upstream.
//!
//! Each record carries its transaction's `Arc<TxAcks>` as the delivery opaque, so the delivery
//! callback acknowledges it without a lookup or a lock. The callback also counts the event
//! (per-table counters registered once, looked up by topic), records the delivery latency from
//! the record's create timestamp, and tells readiness that Kafka answered.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders, Timestamp};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::Notify;

use crate::config::KafkaConfig;
use crate::event::Record;
use crate::health::HEALTH;
use crate::kafka::control::{CONTROL_HEADER, ControlRecord};
use crate::kafka::frontier::TxAcks;
use crate::metrics::{self, SourceCounters};

/// librdkafka settings walsync sets itself and refuses from `kafka.extra`.
const OWNED_SETTINGS: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "bootstrap.servers",
];

/// Builds the client settings shared by the producer and the admin client.
pub fn client_config(config: &KafkaConfig) -> Result<ClientConfig, ProducerError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    // Nagle's algorithm holds small requests back until the broker acknowledges the previous
    // segment, which its delayed ACK postpones by up to 40 ms: a change must not wait for that.
    client.set("socket.nagle.disable", "true");
    client.set_log_level(RDKafkaLogLevel::Warning);
    let security = &config.security;
    if let Some(protocol) = &security.protocol {
        client.set("security.protocol", protocol);
    }
    if let Some(mechanism) = &security.sasl_mechanism {
        client.set("sasl.mechanism", mechanism);
    }
    if let Some(username) = &security.sasl_username {
        client.set("sasl.username", username);
    }
    if let Some(password) = &security.sasl_password {
        client.set("sasl.password", password.expose());
    }
    if let Some(ca) = &security.ca_file {
        client.set("ssl.ca.location", ca.display().to_string());
    }
    for (key, value) in &config.extra {
        if OWNED_SETTINGS.contains(&key.as_str()) {
            return Err(ProducerError::OwnedSetting(key.clone()));
        }
        client.set(key, value);
    }
    Ok(client)
}

fn producer_config(config: &KafkaConfig) -> Result<ClientConfig, ProducerError> {
    let mut client = ClientConfig::new();
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // 0 = no limit: a record waits for Kafka however long it is down.
        .set("message.timeout.ms", "0")
        .set("compression.type", &config.compression)
        // The Java clients' partitioner, so keys land where any other producer puts them.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "100000")
        .set("queue.buffering.max.kbytes", "65536");
    // User settings may tune batching and the queue bounds above.
    for (key, value) in client_config(config)?.config_map() {
        client.set(key.to_string(), value.to_string());
    }
    client.set_log_level(RDKafkaLogLevel::Warning);
    Ok(client)
}

/// Receives delivery reports on librdkafka's polling thread.
pub struct DeliveryContext {
    /// Wakes a sender waiting for queue space.
    queue_space: Notify,
    /// The first delivery Kafka refused for good, which stops the source.
    refused: Mutex<Option<String>>,
    /// Wakes whoever waits in [`EventProducer::wait_refused`].
    refusal: Notify,
    /// Per-table event counters, set once the source knows its tables.
    counters: OnceLock<Arc<SourceCounters>>,
    delivery_seconds: ::metrics::Histogram,
}

impl DeliveryContext {
    /// Counts an acknowledged event and records how long Kafka took (from the record's create
    /// timestamp, which librdkafka sets when the record is handed over).
    fn observe_delivery(&self, message: &BorrowedMessage<'_>) {
        use rdkafka::Message;
        if message.payload().is_none() {
            return; // a compaction tombstone, not an event
        }
        if let Timestamp::CreateTime(created) = message.timestamp() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |now| now.as_millis() as i64);
            self.delivery_seconds
                .record((now - created).max(0) as f64 / 1000.0);
        }
        if let Some(counters) = self.counters.get() {
            let op = message
                .headers()
                .and_then(|headers| headers.iter().find(|header| header.key == "op"))
                .and_then(|header| header.value)
                .and_then(|value| std::str::from_utf8(value).ok());
            if let Some(op) = op {
                counters.produced(message.topic(), op);
            }
        }
    }
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error (librdkafka retries on its own)");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Arc<TxAcks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<TxAcks>) {
        HEALTH.delivery_done();
        match result {
            Ok(message) => {
                acks.event_acknowledged();
                self.observe_delivery(message);
            }
            Err((error, message)) => {
                acks.event_failed();
                let reason = describe_refusal(error, rdkafka::Message::topic(message));
                tracing::error!(%reason, "kafka refused an event");
                if let Ok(mut refused) = self.refused.lock() {
                    refused.get_or_insert(reason);
                }
                self.refusal.notify_waiters();
            }
        }
        self.queue_space.notify_one();
    }
}

fn describe_refusal(error: &KafkaError, topic: &str) -> String {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => format!(
            "a row is larger than Kafka accepts on topic {topic}: raise the topic's max.message.bytes \
             and the producer's message.max.bytes (kafka.extra.\"message.max.bytes\"), or exclude the large column"
        ),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => format!(
            "walsync is not allowed to write to topic {topic}: grant WRITE on it to walsync's principal"
        ),
        _ => format!("delivery to topic {topic} failed: {error}"),
    }
}

/// The source's producer.
pub struct EventProducer {
    producer: ThreadedProducer<DeliveryContext>,
}

impl EventProducer {
    pub fn new(config: &KafkaConfig) -> Result<Self, ProducerError> {
        let context = DeliveryContext {
            queue_space: Notify::new(),
            refused: Mutex::new(None),
            refusal: Notify::new(),
            counters: OnceLock::new(),
            delivery_seconds: ::metrics::histogram!(metrics::SOURCE_KAFKA_DELIVERY_SECONDS),
        };
        let producer = producer_config(config)?
            .create_with_context(context)
            .map_err(ProducerError::Create)?;
        Ok(Self { producer })
    }

    /// Counts acknowledged events per table from now on (set once; later calls are ignored).
    pub fn count_into(&self, counters: Arc<SourceCounters>) {
        let _ = self.producer.context().counters.set(counters);
    }

    /// The per-table counters given to [`count_into`](Self::count_into), if any.
    pub fn counters(&self) -> Option<&SourceCounters> {
        self.producer.context().counters.get().map(Arc::as_ref)
    }

    /// Hands one record to the producer, counted against `acks`. Waits while the producer's
    /// queue is full: that wait is the back-pressure that pauses WAL reading.
    pub async fn send(&self, record: &Record, acks: &Arc<TxAcks>) -> Result<(), ProducerError> {
        let headers = headers(record);
        acks.event_sent();
        let mut pending = BaseRecord::with_opaque_to(&record.topic, Arc::clone(acks))
            .key(&record.key[..])
            .headers(headers);
        if let Some(value) = &record.value {
            pending = pending.payload(&value[..]);
        }
        self.enqueue(pending, acks, &record.topic).await
    }

    /// Hands one control record to the producer, for its explicit partition, counted against
    /// `acks`. Waits while the queue is full, like [`EventProducer::send`]. Records to one
    /// partition keep the order they were handed over in, whichever method sent them.
    pub async fn send_control(
        &self,
        record: &ControlRecord,
        acks: &Arc<TxAcks>,
    ) -> Result<(), ProducerError> {
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: CONTROL_HEADER,
            value: Some(record.kind),
        });
        acks.event_sent();
        let pending = BaseRecord::with_opaque_to(&record.topic, Arc::clone(acks))
            .partition(record.partition)
            .key(record.key)
            .payload(&record.value[..])
            .headers(headers);
        self.enqueue(pending, acks, &record.topic).await
    }

    /// Hands `pending` to the producer, waiting while its queue is full (woken by a delivery
    /// report; the timeout covers a report that raced the wait).
    async fn enqueue<K, P>(
        &self,
        mut pending: BaseRecord<'_, K, P, Arc<TxAcks>>,
        acks: &TxAcks,
        topic: &str,
    ) -> Result<(), ProducerError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        loop {
            match self.producer.send(pending) {
                Ok(()) => {
                    HEALTH.delivery_sent();
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    pending = returned;
                    let space = self.producer.context().queue_space.notified();
                    let _ = tokio::time::timeout(Duration::from_millis(50), space).await;
                }
                Err((error, _)) => {
                    acks.event_failed();
                    return Err(ProducerError::Refused(describe_refusal(&error, topic)));
                }
            }
        }
    }

    /// The number of partitions of `topic`, from the cluster's metadata. Blocking: call it
    /// from a blocking task.
    pub fn partition_count(&self, topic: &str) -> Result<i32, ProducerError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(ProducerError::Metadata)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|found| found.name() == topic)
            .map_or(0, |found| found.partitions().len());
        match i32::try_from(partitions) {
            Ok(count) if count > 0 => Ok(count),
            _ => Err(ProducerError::NoPartitions(topic.to_owned())),
        }
    }

    /// Resolves with the reason once Kafka refuses an event for good.
    pub async fn wait_refused(&self) -> String {
        loop {
            let notified = self.producer.context().refusal.notified();
            if let Some(reason) = self.refused() {
                return reason;
            }
            notified.await;
        }
    }

    /// The first event Kafka refused for good, if any: the source must stop.
    pub fn refused(&self) -> Option<String> {
        self.producer
            .context()
            .refused
            .lock()
            .ok()
            .and_then(|refused| refused.clone())
    }

    /// Waits up to `timeout` for every record to be acknowledged. Blocking: call it from a
    /// blocking task.
    pub fn flush(&self, timeout: Duration) -> Result<(), ProducerError> {
        self.producer.flush(timeout).map_err(ProducerError::Flush)
    }

    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

fn headers(record: &Record) -> OwnedHeaders {
    let mut numbers = itoa::Buffer::new();
    let headers = OwnedHeaders::new_with_capacity(4).insert(Header {
        key: "commit_lsn",
        value: Some(numbers.format(record.headers.commit_lsn.as_u64())),
    });
    let headers = headers.insert(Header {
        key: "lsn",
        value: Some(numbers.format(record.headers.lsn.as_u64())),
    });
    let headers = headers.insert(Header {
        key: "txid",
        value: Some(numbers.format(record.headers.xid)),
    });
    headers.insert(Header {
        key: "op",
        value: Some(record.headers.op.code()),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error(
        "kafka.extra sets `{0}`, which walsync owns (idempotence, acks and timeouts are what make delivery safe); remove it"
    )]
    OwnedSetting(String),
    #[error("cannot create the Kafka producer: {0}")]
    Create(KafkaError),
    #[error("{0}")]
    Refused(String),
    #[error("Kafka did not acknowledge every event in time: {0}")]
    Flush(KafkaError),
    #[error("cannot read the partitions of a topic from Kafka's metadata: {0}")]
    Metadata(KafkaError),
    #[error("Kafka's metadata lists no partition for topic {0}")]
    NoPartitions(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_settings_are_refused_by_name() {
        let mut config = KafkaConfig::default();
        config.extra.insert("acks".into(), "1".into());
        let error = client_config(&config).unwrap_err();
        assert!(error.to_string().contains("`acks`"), "{error}");
    }

    #[test]
    fn the_producer_never_times_out_and_waits_for_all_replicas() {
        let config = producer_config(&KafkaConfig::default()).unwrap();
        assert_eq!(config.get("message.timeout.ms"), Some("0"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn user_settings_can_tune_batching() {
        let mut config = KafkaConfig::default();
        config.extra.insert("linger.ms".into(), "50".into());
        let producer = producer_config(&config).unwrap();
        assert_eq!(producer.get("linger.ms"), Some("50"));
    }
}
