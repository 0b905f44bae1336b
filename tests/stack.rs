//! The local stack is real: each service answers a real client from Rust.
//!
//! These tests need `make stack-up` (or run them through `make test`).

mod common;

use std::time::Duration;

use common::{stack, unique_name, wait_for};
use elasticsearch::http::request::JsonBody;
use elasticsearch::http::transport::Transport;
use elasticsearch::indices::IndicesCreateParts;
use elasticsearch::{BulkParts, Elasticsearch, GetParts};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::{Value, json};

#[tokio::test]
async fn postgres_answers_with_logical_wal_level_and_a_replication_role() {
    let (client, connection) = tokio_postgres::connect(&stack().pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect to the local PostgreSQL with PG_URL");
    tokio::spawn(connection);

    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("SHOW wal_level")
        .get(0);
    assert_eq!(wal_level, "logical");

    let can_replicate: bool = client
        .query_one(
            "SELECT rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("read the role's attributes")
        .get(0);
    assert!(can_replicate, "the stack's role must have REPLICATION");
}

#[tokio::test]
async fn kafka_round_trips_records_through_a_fresh_three_partition_topic() {
    let brokers = &stack().kafka_brokers;
    let topic = unique_name("walsync-stack-test");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("create the admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.expect("the topic is created");
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("create the producer");
    let sent: Vec<(String, String)> = (0..30)
        .map(|i| (format!("key-{i}"), format!("value-{i}")))
        .collect();
    let mut partitions_written = std::collections::HashSet::new();
    for (key, value) in &sent {
        let delivery = producer
            .send(
                FutureRecord::to(&topic).key(key).payload(value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("the broker acknowledges the record");
        partitions_written.insert(delivery.partition);
    }
    assert!(
        partitions_written.len() > 1,
        "30 keys over 3 partitions must not all land in one: {partitions_written:?}"
    );

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("walsync-stack-test-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("create the consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");

    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while received.len() < sent.len() {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of 30 records came back", received.len()))
            .expect("consume");
        let key = String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8 key");
        let value = String::from_utf8(message.payload().expect("value").to_vec()).expect("utf-8");
        received.push((key, value));
    }
    received.sort();
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(received, expected);
}

#[tokio::test]
async fn search_server_rejects_a_stale_external_version_per_item() {
    let transport = Transport::single_node(&stack().es_url).expect("ES_URL is a valid URL");
    let client = Elasticsearch::new(transport);
    let index = unique_name("walsync-stack-test");

    let created = client
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0}}))
        .send()
        .await
        .expect("create index request");
    assert!(
        created.status_code().is_success(),
        "{:?}",
        created.text().await
    );

    let bulk = |version: u64, price: u64| {
        let client = client.clone();
        let index = index.clone();
        async move {
            let body: Vec<JsonBody<Value>> = vec![
                json!({"index": {"_index": index, "_id": "sku-1", "version": version, "version_type": "external"}}).into(),
                json!({"price": price}).into(),
            ];
            let response = client
                .bulk(BulkParts::None)
                .body(body)
                .send()
                .await
                .expect("bulk request");
            assert_eq!(
                response.status_code().as_u16(),
                200,
                "bulk as a whole succeeds"
            );
            response
                .json::<Value>()
                .await
                .expect("bulk response is JSON")
        }
    };

    let fresh = bulk(20, 100).await;
    assert_eq!(fresh["errors"], json!(false), "{fresh}");
    assert_eq!(fresh["items"][0]["index"]["_version"], json!(20));

    let stale = bulk(10, 50).await;
    assert_eq!(stale["errors"], json!(true), "{stale}");
    let item = &stale["items"][0]["index"];
    assert_eq!(item["status"], json!(409), "{stale}");
    assert_eq!(
        item["error"]["type"],
        json!("version_conflict_engine_exception")
    );

    let stored = wait_for(
        "the document to be readable",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            let index = index.clone();
            async move {
                let response = client
                    .get(GetParts::IndexId(&index, "sku-1"))
                    .send()
                    .await
                    .ok()?;
                let document: Value = response.json().await.ok()?;
                (document["found"] == json!(true)).then_some(document)
            }
        },
    )
    .await;
    assert_eq!(stored["_version"], json!(20));
    assert_eq!(
        stored["_source"]["price"],
        json!(100),
        "the stale write changed nothing"
    );
}
