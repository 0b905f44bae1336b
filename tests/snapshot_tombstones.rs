//! No resurrection during copies (design invariant 5): deletes of a table whose copy is in
//! progress become versioned soft tombstones, purged per partition by the copy's
//! `copy_completed` control records once every snapshot row has been applied.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::kafka::{read_records_until, topic_size};
use common::pipeline::{RunningPipeline, alias_of, pipeline_config, search_client, wait_equal};
use common::source::{copy_recorded, drop_slot, name, sql, wait_copy_recorded};
use common::{stack, wait_for};
use elasticsearch::{CountParts, Elasticsearch};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use walsync::backfill::BackfillOptions;
use walsync::config::{Config, SnapshotMode};
use walsync::kafka::control::{CONTROL_HEADER, COPY_COMPLETED, CopyCompleted};
use walsync::postgres::copy_registry::CopyRegistration;
use walsync::sink::apply::Sink;
use walsync::sink::index::refresh;

const ROWS: i64 = 200_000;
/// Ids deleted, updated and re-inserted per round of the workload.
const SLICE: i64 = 2_000;
/// At most this many rounds while the copy runs: enough to delete rows whose snapshot rows
/// come late, few enough that the sink catches up soon after.
const MAX_ROUNDS: i64 = 8;

/// Documents behind `alias` matching `query`, after a refresh.
async fn count(search: &Elasticsearch, alias: &str, query: Value) -> u64 {
    refresh(search, alias).await.expect("refresh");
    let response = search
        .count(CountParts::Index(&[alias]))
        .body(json!({ "query": query }))
        .send()
        .await
        .expect("count");
    let body: Value = response.json().await.expect("count answer");
    body["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {body}"))
}

fn soft_tombstones() -> Value {
    json!({"term": {"walsync.deleted": true}})
}

/// One round of changes on ids (hi − SLICE, hi]: two thirds deleted, a third of those
/// re-inserted, and the slice below updated. High ids first: a fresh table's heap is in id
/// order, so the copy reads their rows last, long after their deletes were applied.
async fn workload_round(client: &tokio_postgres::Client, table: &str, hi: i64) {
    let lo = hi - SLICE;
    client
        .batch_execute(&format!(
            "DELETE FROM {table} WHERE id > {lo} AND id <= {hi} AND id % 3 <> 1;
             UPDATE {table} SET note = 'updated' WHERE id > {lo} - {SLICE} AND id <= {lo} AND id % 4 = 0;
             INSERT INTO {table} SELECT g, 'reinserted', '' FROM generate_series({lo} + 1, {hi}) g WHERE g % 3 = 0;"
        ))
        .await
        .expect("a workload round");
}

/// A table of [`ROWS`] rows with some padding, so that copying it takes a while.
async fn create_wide_table(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text, pad text);
             INSERT INTO {table} SELECT g, 'before', repeat('p', 200) FROM generate_series(1, {ROWS}) g;"
        ))
        .await
        .expect("a table with rows");
}

/// A pipeline over a fresh [`create_wide_table`] whose index forgets a hard delete's version
/// after a second (`gc_deletes`): without soft tombstones, any copied row applied more than a
/// second after its row's delete comes back.
struct WideTableRun {
    name: String,
    table: String,
    client: tokio_postgres::Client,
    config: Config,
    pipeline: RunningPipeline,
}

impl WideTableRun {
    async fn start(prefix: &str, configure: impl FnOnce(&mut Config)) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("walsync=info")
            .with_test_writer()
            .try_init();
        let name = name(prefix);
        let table = format!("public.{name}");
        let client = sql().await;
        create_wide_table(&client, &table).await;
        let mut config = pipeline_config(&name, &[&table]);
        config.elasticsearch.gc_deletes = "1s".into();
        configure(&mut config);
        let pipeline = RunningPipeline::start(config.clone()).await;
        Self {
            name,
            table,
            client,
            config,
            pipeline,
        }
    }

    /// After the copy: plain hard deletes again; then the index must end equal to the table
    /// without tombstones, and the topic must show the marked deletes before the control
    /// records.
    async fn finish(self) {
        workload_round(&self.client, &self.table, 2 * SLICE).await;
        assert_ends_equal_without_tombstones(&self.config, &self.name).await;
        self.pipeline.stop().await;
        assert_marked_deletes_precede_the_control_records(&self.name).await;
        drop_slot(&self.name).await;
    }
}

/// Workload rounds, from the highest ids down, for as long as `copying` says the copy runs
/// (at most [`MAX_ROUNDS`]); at least one must run during the copy.
async fn workload_during_copy<F, Fut>(client: &tokio_postgres::Client, table: &str, mut copying: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut hi = ROWS;
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && copying().await {
        workload_round(client, table, hi).await;
        hi -= SLICE;
        rounds += 1;
    }
    println!("{rounds} workload rounds ran during the copy");
    assert!(
        rounds >= 1,
        "the copy finished before any change: the test proves nothing"
    );
}

/// The index of `public.<name>` ends equal to the table, and no soft tombstone is left.
async fn assert_ends_equal_without_tombstones(config: &Config, name: &str) {
    wait_equal(config, "public", name, &["id"], Duration::from_secs(600)).await;
    let search = search_client();
    let alias = alias_of(config, "public", name);
    wait_for(
        "every soft tombstone to be purged",
        Duration::from_secs(120),
        || {
            let (search, alias) = (&search, &alias);
            async move { (count(search, alias, soft_tombstones()).await == 0).then_some(()) }
        },
    )
    .await;
    wait_equal(config, "public", name, &["id"], Duration::from_secs(60)).await;
}

/// The topic of table `public.<name>`: in each partition the copy's rows and its marked
/// deletes all come before the copy_completed record, some deletes were marked, and the deletes
/// after it are not marked.
async fn assert_marked_deletes_precede_the_control_records(name: &str) {
    let topic = format!("{name}.public.{name}");
    let total = topic_size(&topic) as usize;
    #[derive(Default, Debug)]
    struct Partition {
        last_read: i64,
        last_marked_delete: i64,
        control: Vec<i64>,
        marked_deletes: usize,
        unmarked_deletes_after_control: usize,
    }
    let mut partitions: HashMap<i32, Partition> = HashMap::new();
    let mut seen = 0;
    read_records_until(&topic, Duration::from_secs(300), |record| {
        seen += 1;
        let partition = partitions.entry(record.partition).or_default();
        if record.is_control() {
            assert_eq!(record.headers[CONTROL_HEADER], COPY_COMPLETED);
            let value = record.value.as_ref().expect("a control value");
            assert_eq!(value["partition"], record.partition);
            assert_eq!(value["table"], name);
            partition.control.push(record.offset);
        } else if let Some(value) = &record.value {
            match (record.op(), value["source"]["soft_delete"].as_bool()) {
                (Some("r"), _) => partition.last_read = record.offset,
                (Some("d"), Some(true)) => {
                    partition.last_marked_delete = record.offset;
                    partition.marked_deletes += 1;
                }
                (Some("d"), _) if !partition.control.is_empty() => {
                    partition.unmarked_deletes_after_control += 1
                }
                _ => {}
            }
        }
        seen >= total
    })
    .await;
    let mut marked = 0;
    for (number, partition) in &partitions {
        let control = *partition
            .control
            .last()
            .unwrap_or_else(|| panic!("partition {number} has no copy_completed record"));
        assert!(
            partition.last_read < control && partition.last_marked_delete < control,
            "partition {number}: {partition:?}"
        );
        marked += partition.marked_deletes;
    }
    println!(
        "{marked} marked deletes; {} unmarked after the copy",
        partitions
            .values()
            .map(|p| p.unmarked_deletes_after_control)
            .sum::<usize>()
    );
    assert!(marked > 0, "deletes during the copy were marked");
    assert!(
        partitions
            .values()
            .any(|p| p.unmarked_deletes_after_control > 0),
        "deletes after the copy are plain deletes"
    );
}

/// Checked once with the marker disabled (the source never marking deletes): the index ended
/// with 5,334 extra documents, every row the workload deleted during the copy and did not
/// re-insert, each an `op: "r"` snapshot row, and `wait_equal` failed.
#[tokio::test]
async fn deletes_during_a_copy_never_bring_rows_back_and_no_tombstone_outlives_the_copy() {
    let run = WideTableRun::start("snap_tomb", |_| {}).await;
    let (client, name, table) = (&run.client, &run.name, &run.table);

    // The snapshot is exported once the source streams: everything from here commits after
    // its consistent point, while the copy runs.
    workload_during_copy(client, table, || async {
        !copy_recorded(client, name, Some(table)).await
    })
    .await;
    wait_copy_recorded(client, name, Some(table), Duration::from_secs(300)).await;
    run.finish().await;
}

/// The sink alone, with events written straight into Kafka: a marked delete is a soft
/// tombstone even in hard mode, and a partition's `copy_completed` record purges exactly that
/// partition's tombstones.
#[tokio::test]
async fn a_copy_completed_record_purges_only_its_partitions_soft_tombstones() {
    const SYSTEM_ID: &str = "7000000000000000002";
    let name = name("sink_tomb");
    let mut config = pipeline_config(&name, &["public.items"]);
    config.sink.linger_ms = 5;
    let topic = format!("{name}.public.items");
    walsync::kafka::topics::ensure_topics(&config.kafka, std::slice::from_ref(&topic))
        .await
        .expect("create the topic");
    let event = |op: &str, id: i64, commit_lsn: u64, soft_delete: bool| {
        json!({
            "before": if op == "d" { json!({"id": id}) } else { Value::Null },
            "after": if op == "d" { Value::Null } else { json!({"id": id, "note": "x"}) },
            "op": op, "ts_ms": 0,
            "source": {"version": "test", "connector": "walsync", "db": "walsync",
                       "schema": "public", "table": "items", "txId": 1, "lsn": commit_lsn,
                       "commit_lsn": commit_lsn, "ts_ms": 0, "snapshot": "false",
                       "system_id": SYSTEM_ID, "timeline": 1, "soft_delete": soft_delete}
        })
    };
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack().kafka_brokers)
        .create()
        .expect("producer");
    let ids: Vec<i64> = (1..=30).collect();
    for id in &ids {
        for value in [event("c", *id, 100, false), event("d", *id, 300, true)] {
            let key = json!({ "id": id }).to_string();
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&value.to_string()),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(error, _)| error)
                .expect("produce");
        }
    }
    let sink = std::sync::Arc::new(Sink::new(config.clone()).await.expect("create the sink"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = std::sync::Arc::clone(&sink);
    let task = tokio::spawn(async move { running.run(stopped).await });

    let search = search_client();
    let alias = format!("{}public.items", config.elasticsearch.index_prefix);
    let ids_count = ids.len() as u64;
    wait_for(
        "every marked delete to be a soft tombstone",
        Duration::from_secs(60),
        || {
            let (search, alias) = (&search, &alias);
            async move {
                let ready = refresh(search, alias).await.is_ok()
                    && count(search, alias, soft_tombstones()).await == ids_count;
                ready.then_some(())
            }
        },
    )
    .await;
    let per_partition = |partition: i32| {
        json!({"bool": {"filter": [
            {"term": {"walsync.deleted": true}},
            {"term": {"walsync.partition": partition}}
        ]}})
    };
    let mut by_partition = Vec::new();
    for partition in 0..config.kafka.partitions {
        by_partition.push(count(&search, &alias, per_partition(partition)).await);
    }
    assert_eq!(
        by_partition.iter().sum::<u64>(),
        ids_count,
        "every tombstone names its partition: {by_partition:?}"
    );
    let purged = by_partition
        .iter()
        .position(|tombstones| *tombstones > 0)
        .expect("a partition with tombstones") as i32;

    let completed = CopyCompleted::new("public", "items", 250, purged, SYSTEM_ID, 0);
    let record = completed.record(topic.as_str().into());
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(record.partition)
                .key(record.key)
                .payload(&record.value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: CONTROL_HEADER,
                    value: Some(record.kind),
                })),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(error, _)| error)
        .expect("produce the control record");
    wait_for(
        "the partition's tombstones to be purged",
        Duration::from_secs(60),
        || {
            let (search, alias, query) = (&search, &alias, per_partition(purged));
            async move { (count(search, alias, query).await == 0).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        count(&search, &alias, soft_tombstones()).await,
        ids_count - by_partition[purged as usize],
        "the other partitions keep theirs"
    );
    let _ = stop.send(true);
    task.await
        .expect("no panic")
        .expect("the sink stopped cleanly");
}

/// The state of the backfill registered for `slot`, if any.
async fn registration_state(client: &tokio_postgres::Client, slot: &str) -> Option<String> {
    client
        .query_opt(
            "SELECT state FROM walsync.copy_registrations WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read the registrations")
        .map(|row| row.get(0))
}

/// The same guarantee for `walsync backfill`, a copy outside the source process: the source
/// learns of it through walsync.copy_registrations before the backfill's snapshot exists.
/// The stream starts with an empty index (no initial snapshot), so every row the backfill
/// reads after its delete was applied would come back without a soft tombstone. Checked once
/// with the source not counting registrations (deletes unmarked): `wait_equal` failed with
/// extra documents, the rows deleted during the backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_during_a_backfill_never_bring_rows_back_and_no_tombstone_outlives_it() {
    let run = WideTableRun::start("backfill_tomb", |config| {
        config.snapshot.mode = SnapshotMode::Never;
    })
    .await;
    let (client, name, table, config) = (&run.client, &run.name, &run.table, &run.config);

    // Search traffic refreshes the index; each refresh lets the engine forget the versions of
    // deletes older than gc_deletes, which is when a late snapshot row could come back.
    let search = search_client();
    let alias = alias_of(config, "public", name);
    let refresher = {
        let (search, alias) = (search.clone(), alias.clone());
        tokio::spawn(async move {
            loop {
                let _ = refresh(&search, &alias).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let backfill = tokio::spawn(walsync::backfill::run(
        config.clone(),
        BackfillOptions {
            table: table.clone(),
            filter: None,
            into: None,
            delete_old: false,
            timeout: Duration::from_secs(300),
            progress: std::sync::Arc::new(walsync::backfill::PrintLines),
        },
    ));
    wait_for(
        "the source to register the backfill",
        Duration::from_secs(60),
        || async {
            (registration_state(client, name).await.as_deref() == Some("registered")).then_some(())
        },
    )
    .await;
    workload_during_copy(client, table, || async {
        registration_state(client, name).await.as_deref() == Some("registered")
    })
    .await;
    let report = backfill
        .await
        .expect("no panic")
        .expect("the backfill succeeds");
    refresher.abort();
    assert!(report.rows > 0, "{report:?}");
    assert_eq!(
        registration_state(client, name).await,
        None,
        "the backfill removed its registration"
    );
    run.finish().await;
}

/// A backfill outlives a source restart and then dies: the restarted source counts its
/// registration again before it streams (the deletes after the restart are still marked), and
/// once the backfill's session is gone the source completes the registration for it: control
/// records written, soft tombstones purged, the row removed.
#[tokio::test]
async fn a_source_restart_keeps_a_backfills_registration_and_a_dead_backfill_is_completed() {
    let name = name("backfill_dies");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text);
             INSERT INTO {table} SELECT g, 'row' FROM generate_series(1, 10) g;"
        ))
        .await
        .expect("a table with rows");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(120)).await;

    // The backfill's side of the handshake, on a session of its own.
    let backfill_session = sql().await;
    let topic = format!("{name}.public.{name}");
    let _registration =
        CopyRegistration::request(&backfill_session, &name, "public", &name, &topic)
            .await
            .expect("register a copy");
    let registered = || async {
        (registration_state(&client, &name).await.as_deref() == Some("registered")).then_some(())
    };
    wait_for(
        "the source to register the copy",
        Duration::from_secs(30),
        registered,
    )
    .await;
    pipeline.stop().await;
    let pipeline = RunningPipeline::start(config.clone()).await;
    client
        .batch_execute(&format!("DELETE FROM {table} WHERE id <= 3"))
        .await
        .expect("delete three rows");
    let search = search_client();
    let alias = alias_of(&config, "public", &name);
    wait_for(
        "the deletes to be soft tombstones",
        Duration::from_secs(60),
        || {
            let (search, alias) = (&search, &alias);
            async move { (count(search, alias, soft_tombstones()).await == 3).then_some(()) }
        },
    )
    .await;

    drop(backfill_session);
    wait_for(
        "the source to complete the dead backfill's registration",
        Duration::from_secs(30),
        || async {
            registration_state(&client, &name)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    wait_for(
        "the soft tombstones to be purged",
        Duration::from_secs(60),
        || {
            let (search, alias) = (&search, &alias);
            async move { (count(search, alias, soft_tombstones()).await == 0).then_some(()) }
        },
    )
    .await;
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}
