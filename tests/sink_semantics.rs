//! The sink's versioning and error rules, with events written straight into Kafka so the test
//! controls their order and versions, plus TOAST and throttling through the whole pipeline.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::kafka::topic_size;
use common::pipeline::{RunningPipeline, pipeline_config, search_client, wait_equal};
use common::sink::{
    RunningSink, items_alias, items_config, items_topic, produce_keyed, stored_document,
};
use common::source::{drop_slot, name, sql};
use common::{stack, wait_for};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use walsync::config::{Config, DeleteMode};
use walsync::sink::index::{ensure_index, refresh};

const SYSTEM_ID: &str = "7000000000000000001";

/// A sink configuration reading `<name>.public.items`.
fn sink_config(name: &str) -> Config {
    items_config(name)
}

async fn create_topic(config: &Config) -> String {
    items_topic(config).await
}

fn envelope(op: &str, id: i64, note: Option<&str>, commit_lsn: u64) -> Value {
    let image = note.map(|note| json!({"id": id, "note": note}));
    json!({
        "before": if op == "d" { json!({"id": id}) } else { Value::Null },
        "after": if op == "d" { Value::Null } else { image.unwrap_or(Value::Null) },
        "op": op,
        "ts_ms": 0,
        "source": {"version": "test", "connector": "walsync", "db": "walsync",
                   "schema": "public", "table": "items", "txId": 1, "lsn": commit_lsn,
                   "commit_lsn": commit_lsn, "ts_ms": 0, "snapshot": "false",
                   "system_id": SYSTEM_ID, "timeline": 1}
    })
}

/// Writes events in order (same key → same partition, so this is their partition order).
async fn produce(topic: &str, events: &[Value]) {
    let keyed: Vec<(String, Value)> = events
        .iter()
        .map(|event| {
            let id = event["after"]["id"]
                .as_i64()
                .or(event["before"]["id"].as_i64());
            (json!({ "id": id }).to_string(), event.clone())
        })
        .collect();
    produce_keyed(topic, &keyed).await;
}

async fn stored(alias: &str, id: i64) -> Option<Value> {
    stored_document(alias, &id.to_string()).await
}

fn alias(config: &Config) -> String {
    items_alias(config)
}

#[tokio::test]
async fn an_older_version_after_a_newer_one_is_rejected_and_counted() {
    let config = sink_config(&name("sink_order"));
    let topic = create_topic(&config).await;
    let sink = RunningSink::start(config.clone()).await;
    produce(&topic, &[envelope("c", 1, Some("newer"), 200)]).await;
    sink.wait_processed(1).await;
    // A later batch: the index holds the newer version, so the older one is a conflict.
    produce(&topic, &[envelope("u", 1, Some("older"), 100)]).await;
    sink.wait_processed(2).await;
    let stale = sink.stats.stale.load(Ordering::Relaxed);
    sink.stop().await.expect("clean stop");
    assert_eq!(stored(&alias(&config), 1).await.unwrap()["note"], "newer");
    assert_eq!(stale, 1, "the older event is counted as a version conflict");
}

#[tokio::test]
async fn a_stale_insert_after_a_delete_does_not_bring_the_document_back() {
    let config = sink_config(&name("sink_resurrect_hard"));
    let topic = create_topic(&config).await;
    let sink = RunningSink::start(config.clone()).await;
    produce(
        &topic,
        &[
            envelope("c", 1, Some("x"), 100),
            envelope("d", 1, None, 300),
        ],
    )
    .await;
    sink.wait_processed(2).await;
    produce(&topic, &[envelope("c", 1, Some("stale"), 200)]).await;
    sink.wait_processed(3).await;
    assert_eq!(
        sink.stats.stale.load(Ordering::Relaxed),
        1,
        "the stale insert is a conflict"
    );
    sink.stop().await.expect("clean stop");
    assert_eq!(stored(&alias(&config), 1).await, None);
}

#[tokio::test]
async fn soft_deletes_keep_stale_inserts_out_even_after_gc_deletes() {
    let mut config = sink_config(&name("sink_resurrect_soft"));
    config.elasticsearch.delete_mode = DeleteMode::Soft;
    config.elasticsearch.gc_deletes = "1s".into();
    let topic = create_topic(&config).await;
    let sink = RunningSink::start(config.clone()).await;
    produce(
        &topic,
        &[
            envelope("c", 1, Some("x"), 100),
            envelope("d", 1, None, 300),
        ],
    )
    .await;
    sink.wait_processed(2).await;
    // The scenario: the stale insert arrives long after gc_deletes has passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    produce(&topic, &[envelope("c", 1, Some("stale"), 200)]).await;
    sink.wait_processed(3).await;
    sink.stop().await.expect("clean stop");
    let document = stored(&alias(&config), 1)
        .await
        .expect("the soft tombstone is kept");
    assert_eq!(document["walsync"]["deleted"], true);
    assert_eq!(document["walsync"]["commit_lsn"], 300);
    assert!(
        document.get("note").is_none(),
        "the tombstone holds the key only"
    );
}

#[tokio::test]
async fn a_poison_document_goes_to_the_dlq_and_later_events_are_indexed() {
    let config = sink_config(&name("sink_poison"));
    let topic = create_topic(&config).await;
    let mut poison = envelope("c", 2, Some("x"), 110);
    poison["after"]["note"] = json!({"an": "object where a string was mapped"});
    // The first document fixes the mapping of `note` as text before the poison arrives
    // (events on different partitions are applied in parallel, in no set order).
    produce(&topic, &[envelope("c", 1, Some("first"), 100)]).await;
    let sink = RunningSink::start(config.clone()).await;
    sink.wait_processed(1).await;
    produce(&topic, &[poison, envelope("c", 3, Some("after"), 120)]).await;
    sink.wait_processed(3).await;
    assert_eq!(sink.stats.dead_lettered.load(Ordering::Relaxed), 1);
    sink.stop().await.expect("clean stop");
    let dlq = format!("{}.dlq", config.kafka.topic_prefix);
    let mut reason = None;
    common::kafka::read_topic_until(&dlq, Duration::from_secs(30), |record| {
        reason = record.headers.get("walsync.dlq.reason").cloned();
        true
    })
    .await;
    let reason = reason.expect("the reason header");
    assert!(
        reason.contains("mapping") || reason.contains("parsing"),
        "{reason}"
    );
    assert_eq!(stored(&alias(&config), 3).await.unwrap()["note"], "after");
}

/// Waits for the sink to stop on its breaker (limit 3); checks that at most the limit reached
/// the DLQ (none when the burst came in one batch). Returns the error.
async fn breaker_trip(sink: RunningSink, config: &Config) -> anyhow::Error {
    let error = tokio::time::timeout(Duration::from_secs(60), sink.task)
        .await
        .expect("the sink stops by itself")
        .expect("no panic")
        .expect_err("the breaker stops the sink");
    assert!(
        format!("{error:#}").contains("breaker tripped"),
        "{error:#}"
    );
    assert!(
        topic_size(&format!("{}.dlq", config.kafka.topic_prefix)) <= 3,
        "at most the limit reached the DLQ"
    );
    error
}

#[tokio::test]
async fn a_burst_of_dead_letters_trips_the_breaker_instead_of_emptying_the_table_into_the_dlq() {
    let mut config = sink_config(&name("sink_breaker"));
    config.sink.dlq_breaker_per_minute = 3;
    let topic = create_topic(&config).await;
    let mut events = vec![envelope("c", 1, Some("string"), 100)];
    for id in 2..12 {
        let mut poison = envelope("c", id, Some("x"), 100 + id as u64);
        poison["after"]["note"] = json!({"object": id});
        events.push(poison);
    }
    produce(&topic, &events[..1]).await;
    let sink = RunningSink::start(config.clone()).await;
    sink.wait_processed(1).await;
    produce(&topic, &events[1..]).await;
    let error = breaker_trip(sink, &config).await;
    let counted: usize = format!("{error:#}")
        .split("tripped: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse().ok())
        .expect("the message counts the rejected documents");
    assert!(counted > 3, "{error:#}");
}

#[tokio::test]
async fn dead_letters_of_every_reason_count_towards_the_breaker() {
    // Updates whose unchanged TOAST value cannot be re-read (the table does not exist in
    // PostgreSQL), then records that are not change events: neither is a rejection by the
    // search server, and both must trip the breaker rather than fill the DLQ.
    for (case, poison) in [
        ("fill", None),
        ("unparsable", Some(json!({"not": "an envelope"}))),
    ] {
        let mut config = sink_config(&name(&format!("sink_breaker_{case}")));
        config.sink.dlq_breaker_per_minute = 3;
        let topic = create_topic(&config).await;
        let events: Vec<(String, Value)> = (1..12)
            .map(|id| {
                let mut event = envelope("u", id, Some("x"), 100 + id as u64);
                event["unchanged_toast_columns"] = json!(["big"]);
                (
                    json!({ "id": id }).to_string(),
                    poison.clone().unwrap_or(event),
                )
            })
            .collect();
        let sink = RunningSink::start(config.clone()).await;
        produce_keyed(&topic, &events).await;
        breaker_trip(sink, &config).await;
    }
}

#[tokio::test]
async fn an_index_built_from_another_cluster_is_refused_with_the_recovery_steps() {
    let config = sink_config(&name("sink_foreign"));
    let topic = create_topic(&config).await;
    ensure_index(
        &search_client(),
        &alias(&config),
        "6999999999999999999",
        None,
        None,
        "60s",
    )
    .await
    .expect("an index from another cluster");
    produce(&topic, &[envelope("c", 1, Some("x"), 100)]).await;
    let sink = RunningSink::start(config).await;
    let error = tokio::time::timeout(Duration::from_secs(60), sink.task)
        .await
        .expect("the sink stops by itself")
        .expect("no panic")
        .expect_err("the sink refuses");
    let message = format!("{error:#}");
    assert!(
        message.contains("6999999999999999999") && message.contains(SYSTEM_ID),
        "{message}"
    );
}

#[tokio::test]
async fn untouched_toast_values_survive_updates_and_key_changes_through_the_sink() {
    let name = name("sink_toast");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, big text, note text);
             ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create table");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    let big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)";
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, {big}, 'a'), (2, {big} || 'x', 'a')"
        ))
        .await
        .unwrap();
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    for statement in [
        format!("UPDATE {table} SET note = 'b' WHERE id = 1"),
        format!("UPDATE {table} SET id = 3 WHERE id = 2"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }
    // Equal field by field: `big` is in both documents, with the table's value.
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

/// What the proxy in front of the search server refuses or holds back.
#[derive(Clone)]
struct ProxyRules {
    /// The first this-many bulk requests get a 429.
    throttled_bulks: usize,
    /// Requests with a larger body get a 413, like nginx's `client_max_body_size`.
    max_body: usize,
    /// Bulk requests wait for this gate to open before they are forwarded.
    bulk_gate: Option<BulkGate>,
}

impl ProxyRules {
    fn refusing(throttled_bulks: usize, max_body: usize) -> Self {
        Self {
            throttled_bulks,
            max_body,
            bulk_gate: None,
        }
    }
}

/// Holds bulk requests (a search server that takes its time) until opened; counts them.
#[derive(Clone)]
struct BulkGate {
    open: watch::Receiver<bool>,
    held: Arc<AtomicUsize>,
}

/// A proxy to the search server that refuses what `rules` say, and counts the refusals.
async fn refusing_proxy(rules: ProxyRules) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let upstream = stack().es_url.trim_start_matches("http://").to_owned();
    let rejected = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&rejected);
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            let counter = Arc::clone(&counter);
            let rules = rules.clone();
            tokio::spawn(async move {
                let _ = proxy_connection(client, &upstream, &counter, rules).await;
            });
        }
    });
    (address, rejected)
}

/// Answers with `status`, a JSON error body and `Connection: close`.
async fn refuse(
    client: &mut tokio::net::TcpStream,
    status: &str,
    error_type: &str,
) -> std::io::Result<()> {
    let code = status.split(' ').next().unwrap_or("500");
    let body = format!(
        r#"{{"error":{{"type":"{error_type}","reason":"refused by the test proxy"}},"status":{code}}}"#
    );
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await
}

/// Serves one request per connection (answers with `Connection: close`).
async fn proxy_connection(
    mut client: tokio::net::TcpStream,
    upstream: &str,
    rejected: &AtomicUsize,
    rules: ProxyRules,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buffer = [0_u8; 65536];
    let header_end = loop {
        let read = client.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buffer[..read]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..header_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while request.len() < header_end + length {
        let read = client.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
    }
    if length > rules.max_body {
        rejected.fetch_add(1, Ordering::SeqCst);
        return refuse(&mut client, "413 Request Entity Too Large", "too_large").await;
    }
    if head.contains("/_bulk")
        && rules.throttled_bulks > 0
        && rejected.fetch_add(1, Ordering::SeqCst) < rules.throttled_bulks
    {
        return refuse(
            &mut client,
            "429 Too Many Requests",
            "es_rejected_execution_exception",
        )
        .await;
    }
    if let (true, Some(gate)) = (head.contains("/_bulk"), &rules.bulk_gate) {
        gate.held.fetch_add(1, Ordering::SeqCst);
        let mut open = gate.open.clone();
        let _ = open.wait_for(|open| *open).await;
    }
    let head_text = String::from_utf8_lossy(&request[..header_end]).into_owned();
    let mut rewritten: Vec<String> = head_text
        .split("\r\n")
        .filter(|line| !line.to_lowercase().starts_with("connection:"))
        .map(str::to_owned)
        .collect();
    rewritten.retain(|line| !line.is_empty());
    let mut forwarded = rewritten.join("\r\n").into_bytes();
    forwarded.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    forwarded.extend_from_slice(&request[header_end..]);
    let mut server = tokio::net::TcpStream::connect(upstream).await?;
    server.write_all(&forwarded).await?;
    let mut response = Vec::new();
    server.read_to_end(&mut response).await?;
    client.write_all(&response).await?;
    client.shutdown().await
}

/// A request body limit in front of the search server (a proxy's, or the server's own
/// `http.max_content_length`): bulks over it are split until they pass, and a document too
/// large alone is dead-lettered with the reason; every other document is indexed.
#[tokio::test]
async fn a_bulk_too_large_for_the_server_is_split_and_a_document_too_large_alone_is_dead_lettered()
{
    let (proxy, refused) = refusing_proxy(ProxyRules::refusing(0, 64 * 1024)).await;
    let mut config = sink_config(&name("sink_413"));
    config.elasticsearch.url = proxy;
    let topic = create_topic(&config).await;
    let note = "n".repeat(8 * 1024);
    let mut events: Vec<Value> = (1..=40)
        .map(|id| envelope("c", id, Some(&note), 100 + id as u64))
        .collect();
    events.push(envelope("c", 1000, Some(&"y".repeat(100 * 1024)), 200));
    // Produced before the sink starts: its first batches are full, far over the limit.
    produce(&topic, &events).await;
    let sink = RunningSink::start(config.clone()).await;
    sink.wait_processed(41).await;
    assert_eq!(sink.stats.dead_lettered.load(Ordering::Relaxed), 1);
    assert_eq!(sink.stats.indexed.load(Ordering::Relaxed), 40);
    assert!(
        refused.load(Ordering::SeqCst) >= 2,
        "the proxy refused bulks"
    );
    sink.stop().await.expect("clean stop");
    let dlq = format!("{}.dlq", config.kafka.topic_prefix);
    let mut dead = None;
    common::kafka::read_topic_until(&dlq, Duration::from_secs(30), |record| {
        dead = Some((
            record.key.clone(),
            record.headers.get("walsync.dlq.reason").cloned(),
        ));
        true
    })
    .await;
    let (key, reason) = dead.expect("a dead letter");
    assert_eq!(key["id"], 1000);
    let reason = reason.expect("the reason header");
    assert!(reason.contains("too large"), "{reason}");
    let mut direct = config.clone();
    direct.elasticsearch.url = stack().es_url.clone();
    assert_eq!(
        stored(&alias(&direct), 40).await.expect("id 40")["note"],
        note
    );
    assert!(stored(&alias(&direct), 1000).await.is_none());
}

/// Records that arrive while a batch is being applied are taken at once when it is done; only
/// an idle sink lingers for company. With a ten-minute linger, the event produced during the
/// first (throttled) batch would otherwise wait ten minutes; checked once with the old
/// collection (linger after every first record): `wait_processed` timed out.
#[tokio::test]
async fn records_that_piled_up_during_a_batch_are_applied_without_lingering() {
    let (proxy, rejected) = refusing_proxy(ProxyRules::refusing(8, usize::MAX)).await;
    let mut config = sink_config(&name("sink_backlog"));
    config.elasticsearch.url = proxy;
    config.sink.linger_ms = 600_000;
    config.sink.batch_max_docs = 2;
    let topic = create_topic(&config).await;
    let sink = RunningSink::start(config.clone()).await;
    // Two records fill the first batch, so its linger ends at once.
    produce(
        &topic,
        &[
            envelope("c", 1, Some("a"), 100),
            envelope("c", 2, Some("b"), 101),
        ],
    )
    .await;
    wait_for(
        "the first batch to be throttled",
        Duration::from_secs(60),
        || async { (rejected.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    // Arrives while the first batch is retried: waiting when it is done.
    produce(&topic, &[envelope("c", 3, Some("c"), 102)]).await;
    sink.wait_processed(3).await;
    assert_eq!(sink.stats.indexed.load(Ordering::Relaxed), 3);
    sink.stop().await.expect("clean stop");
}

#[tokio::test]
async fn two_updates_in_one_transaction_end_as_the_second_even_when_bulks_are_throttled() {
    let name = name("sink_429");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, price int)"
        ))
        .await
        .expect("create table");
    let (proxy, rejected) = refusing_proxy(ProxyRules::refusing(3, usize::MAX)).await;
    let mut config = pipeline_config(&name, &[&table]);
    config.elasticsearch.url = proxy;
    config.sink.batch_max_docs = 1;
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 1);
             BEGIN; UPDATE {table} SET price = 2 WHERE id = 1; UPDATE {table} SET price = 3 WHERE id = 1; COMMIT;"
        ))
        .await
        .unwrap();
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;
    assert!(
        rejected.load(Ordering::SeqCst) >= 3,
        "the proxy throttled bulks"
    );
    assert!(pipeline.stats.retries.load(Ordering::Relaxed) >= 3);
    pipeline.stop().await;
    let mut direct = config.clone();
    direct.elasticsearch.url = stack().es_url.clone();
    let alias = common::pipeline::alias_of(&direct, "public", &name);
    let client = search_client();
    refresh(&client, &alias).await.unwrap();
    let document: Value = client
        .get(elasticsearch::GetParts::IndexId(&alias, "1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["_source"]["price"], 3, "the second update wins");
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_committed_offset_that_fell_out_of_retention_stops_the_sink_instead_of_skipping() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let config = sink_config(&name("sink_gap"));
    let topic = create_topic(&config).await;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .create()
        .expect("producer");
    let send = |version: u64| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let value = envelope("u", 1, Some(&format!("v{version}")), version).to_string();
            producer
                .send(
                    FutureRecord::to(&topic).key(r#"{"id":1}"#).payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(error, _)| error)
                .expect("produce")
        }
    };
    let mut partition = 0;
    for version in [100, 200, 300] {
        partition = send(version).await.partition;
    }
    let sink = RunningSink::start(config.clone()).await;
    sink.wait_processed(3).await;
    sink.stop().await.expect("clean stop");

    // Three more events the sink never sees: retention removes them (and one more).
    for version in [400, 500, 600] {
        send(version).await;
    }
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .create()
        .expect("admin");
    let mut cut = rdkafka::TopicPartitionList::new();
    cut.add_partition_offset(&topic, partition, rdkafka::Offset::Offset(5))
        .unwrap();
    admin
        .delete_records(&cut, &AdminOptions::new())
        .await
        .expect("delete records before offset 5");

    let sink = RunningSink::start(config.clone()).await;
    let error = tokio::time::timeout(Duration::from_secs(60), sink.task)
        .await
        .expect("the sink stops by itself")
        .expect("no panic")
        .expect_err("a gap must stop the sink");
    let message = format!("{error:#}");
    assert!(
        message.contains("next offset to apply, 3") && message.contains("oldest retained offset 5"),
        "{message}"
    );
    assert_eq!(
        stored(&alias(&config), 1).await.unwrap()["note"],
        "v300",
        "nothing past the gap was applied"
    );
}

/// A sink whose partitions the group takes back while one of its bulks is in flight gives them
/// up only once that bulk is answered: nobody else applies those partitions meanwhile (design
/// invariant 4), and nothing is lost. The sink keeps reading while bulks are in flight, so the
/// revocation reaches it mid-bulk; carried out at once, the second sink would take over.
#[tokio::test]
async fn a_revoked_partition_is_given_up_only_after_its_bulk_in_flight_is_answered() {
    let direct = sink_config(&name("sink_revoke"));
    let topic = create_topic(&direct).await;
    let (open_gate, gate) = watch::channel(false);
    let held = Arc::new(AtomicUsize::new(0));
    let (proxy, _) = refusing_proxy(ProxyRules {
        bulk_gate: Some(BulkGate {
            open: gate,
            held: Arc::clone(&held),
        }),
        ..ProxyRules::refusing(0, usize::MAX)
    })
    .await;
    let mut slow = direct.clone();
    slow.elasticsearch.url = proxy;
    let first = RunningSink::start(slow).await;
    wait_for(
        "the first sink to hold every partition",
        Duration::from_secs(60),
        || {
            let assigned = first.sink.assigned_partitions();
            async move { (assigned == direct.kafka.partitions as usize).then_some(()) }
        },
    )
    .await;
    let events: Vec<Value> = (1..=60)
        .map(|id| envelope("c", id, Some("x"), 100 + id as u64))
        .collect();
    produce(&topic, &events).await;
    wait_for("a bulk held in flight", Duration::from_secs(60), || {
        let held = held.load(Ordering::SeqCst);
        async move { (held > 0).then_some(()) }
    })
    .await;

    let second = RunningSink::start(direct.clone()).await;
    wait_for(
        "the group to rebalance (the first sink told to give its partitions up)",
        Duration::from_secs(60),
        || {
            let rebalanced =
                first.sink.revocation_pending() || second.sink.assigned_partitions() > 0;
            async move { rebalanced.then_some(()) }
        },
    )
    .await;
    assert_eq!(
        second.sink.assigned_partitions(),
        0,
        "the partitions were handed over while a bulk for them was still in flight"
    );
    assert_eq!(second.stats.indexed.load(Ordering::Relaxed), 0);

    open_gate.send(true).expect("open the gate");
    wait_for(
        "the second sink to get partitions once the bulk was answered",
        Duration::from_secs(60),
        || {
            let assigned = second.sink.assigned_partitions();
            async move { (assigned > 0).then_some(()) }
        },
    )
    .await;
    wait_applied_between(&first, &second, 60).await;
    first.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
    assert_eq!(documents(&direct).await, 60);
}

/// Waits until two sinks have applied `events` events between them.
async fn wait_applied_between(first: &RunningSink, second: &RunningSink, events: u64) {
    let (a, b) = (Arc::clone(&first.stats), Arc::clone(&second.stats));
    wait_for(
        "both sinks to index everything between them",
        Duration::from_secs(90),
        || {
            let done = a.indexed.load(Ordering::Relaxed)
                + b.indexed.load(Ordering::Relaxed)
                + a.stale.load(Ordering::Relaxed)
                + b.stale.load(Ordering::Relaxed);
            async move { (done >= events).then_some(()) }
        },
    )
    .await;
}

/// The documents in the table's index, after a refresh.
async fn documents(config: &Config) -> u64 {
    let client = search_client();
    refresh(&client, &alias(config)).await.unwrap();
    walsync::sink::index::count(&client, &alias(config))
        .await
        .unwrap()
}

/// A sink whose loop is dropped mid-run (its task aborted, as on a panic elsewhere) still
/// closes: the revocation its consumer's close sends is not deferred to a loop that is gone.
#[tokio::test]
async fn a_sink_dropped_while_running_closes_without_hanging() {
    let config = sink_config(&name("sink_drop"));
    create_topic(&config).await;
    let RunningSink {
        stop: _stop,
        task,
        sink,
        ..
    } = RunningSink::start(config).await;
    wait_for(
        "the sink to hold partitions",
        Duration::from_secs(60),
        || {
            let assigned = sink.assigned_partitions();
            async move { (assigned > 0).then_some(()) }
        },
    )
    .await;
    task.abort();
    let _ = task.await;
    // On a thread of its own: a hung drop must fail the test, not hang the runtime's shutdown.
    let (dropped, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(sink);
        let _ = dropped.send(());
    });
    let closed = tokio::task::spawn_blocking(move || closed.recv_timeout(Duration::from_secs(60)))
        .await
        .expect("no panic");
    assert!(
        closed.is_ok(),
        "dropping the sink did not return within 60 s"
    );
}

#[tokio::test]
async fn two_sinks_in_one_group_share_the_partitions() {
    let config = sink_config(&name("sink_group"));
    let topic = create_topic(&config).await;
    let events: Vec<Value> = (1..=60)
        .map(|id| envelope("c", id, Some("x"), 100 + id as u64))
        .collect();
    let first = RunningSink::start(config.clone()).await;
    let second = RunningSink::start(config.clone()).await;
    wait_for(
        "both sinks to hold partitions",
        Duration::from_secs(60),
        || {
            let shared =
                first.sink.assigned_partitions() > 0 && second.sink.assigned_partitions() > 0;
            async move { shared.then_some(()) }
        },
    )
    .await;
    produce(&topic, &events).await;
    wait_applied_between(&first, &second, 60).await;
    let (a, b) = (Arc::clone(&first.stats), Arc::clone(&second.stats));
    first.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
    assert_eq!(documents(&config).await, 60);
    assert!(
        a.indexed.load(Ordering::Relaxed) > 0 && b.indexed.load(Ordering::Relaxed) > 0,
        "each sink applied part of the partitions: {a:?} {b:?}"
    );
}
