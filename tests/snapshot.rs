//! The initial snapshot: rows that existed before walsync started reach the index, while the
//! stream flows, and completed copies are not repeated.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::kafka::{Consumed, read_topic, read_topic_until, read_whole_topic, topic_size};
use common::pipeline::{RunningPipeline, pipeline_config, wait_equal};
use common::source::{RunningSource, config_for, drop_slot, name, sql, wait_copy_recorded};
use common::{admin_client, wait_for};
use walsync::config::{Config, SnapshotMode};
use walsync::event::SourceInfo;
use walsync::kafka::producer::EventProducer;
use walsync::lsn::Lsn;
use walsync::postgres::catalog::Catalog;
use walsync::postgres::events::EventWriter;
use walsync::postgres::replication::ReplicationClient;
use walsync::postgres::slot::CapturedTable;
use walsync::postgres::types::{Codec, CodecOptions};
use walsync::source::snapshot::{self, CopyJob, CopyTarget, NoHooks, SnapshotSettings};

/// Counts the `r` (snapshot) events on a topic, reading until `expected_total` records.
/// The number of snapshot rows (`r`) and of all change records in the whole topic; call it once
/// the source stopped, so that a second copy would show.
async fn whole_topic_counts(topic: &str) -> (usize, usize) {
    let records = read_whole_topic(topic, Duration::from_secs(120)).await;
    let reads = records
        .iter()
        .filter(|record| record.op() == Some("r"))
        .count();
    (reads, records.len())
}

async fn snapshot_events(topic: &str, expected_total: usize) -> usize {
    let (mut seen, mut reads) = (0, 0);
    read_topic_until(topic, Duration::from_secs(120), |record| {
        seen += 1;
        if record.op() == Some("r") {
            reads += 1;
        }
        seen >= expected_total
    })
    .await;
    reads
}

#[tokio::test]
async fn existing_rows_are_copied_while_changes_stream_and_the_index_ends_equal() {
    let name = name("snap_copy");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text);
             INSERT INTO {table} SELECT g, 'before' FROM generate_series(1, 20000) g;"
        ))
        .await
        .expect("a table with rows");
    let config = pipeline_config(&name, &[&table]);
    let pipeline = RunningPipeline::start(config.clone()).await;
    // Changes while the copy runs: updates, deletes and re-inserts.
    for statement in [
        format!("UPDATE {table} SET note = 'during' WHERE id % 7 = 0"),
        format!("DELETE FROM {table} WHERE id % 11 = 0"),
        format!("INSERT INTO {table} VALUES (11, 'reinserted'), (30001, 'new')"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(180)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_restart_does_not_copy_again_and_a_table_added_later_is_copied() {
    let name = name("snap_resume");
    let (first, second) = (format!("public.{name}"), format!("public.{name}_later"));
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {first} (id int PRIMARY KEY); INSERT INTO {first} SELECT generate_series(1, 100);
             CREATE TABLE {second} (id int PRIMARY KEY); INSERT INTO {second} SELECT generate_series(1, 50);"
        ))
        .await
        .expect("two tables with rows");
    let topic = format!("{name}.public.{name}");
    let source = RunningSource::start(config_for(&name, &[&first])).await;
    assert_eq!(snapshot_events(&topic, 100).await, 100);
    // Recorded once Kafka acknowledged the rows, which is a moment after they can be read.
    wait_copy_recorded(&client, &name, None, Duration::from_secs(30)).await;
    source.stop().await;

    let source = RunningSource::start(config_for(&name, &[&first, &second])).await;
    let later = format!("{name}.public.{name}_later");
    assert_eq!(
        snapshot_events(&later, 50).await,
        50,
        "the new table is copied"
    );
    client
        .batch_execute(&format!("INSERT INTO {first} VALUES (1000)"))
        .await
        .unwrap();
    // The first table's topic: its 100 snapshot rows once, then the new insert.
    assert_eq!(
        snapshot_events(&topic, 101).await,
        100,
        "no second copy of the first table"
    );
    source.stop().await;
    assert_eq!(
        whole_topic_counts(&topic).await,
        (100, 101),
        "the whole topic: one copy of the first table and the insert"
    );
    drop_slot(&name).await;
}

/// A copy job for `table` as the source would build it, for a test that drives the copy's
/// steps itself.
async fn copy_job(config: &Config, schema: &str, table: &str) -> (CopyJob, CopyTarget) {
    let params = walsync::postgres::replication::ConnectParams::from_config(config)
        .expect("connection parameters");
    let identity = ReplicationClient::connect(&params)
        .await
        .expect("a replication connection")
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM");
    let writer = EventWriter::new(
        Arc::new(Codec::new(CodecOptions::default())),
        Arc::new(SourceInfo {
            name: config.kafka.topic_prefix.clone(),
            database: params.dbname.clone(),
            system_id: identity.system_id,
            timeline: identity.timeline,
        }),
    );
    let info = Catalog::connect(&params)
        .await
        .expect("a metadata connection")
        .table(schema, table)
        .await
        .expect("read the catalog")
        .expect("the table exists");
    let target = CopyTarget {
        table: CapturedTable {
            key_columns: info.primary_key.clone(),
            info,
        },
        topic: Arc::from(walsync::kafka::topics::topic_name(
            &config.kafka.topic_prefix,
            schema,
            table,
        )),
    };
    let job = CopyJob {
        params,
        slot: config.postgres.slot.clone(),
        settings: SnapshotSettings::from_config(&config.snapshot),
        writer,
        producer: Arc::new(EventProducer::new(&config.kafka).expect("a producer")),
        hooks: Arc::new(NoHooks),
    };
    (job, target)
}

/// A transaction of its own, on its own connection, with an xid.
async fn open_transaction_with_xid() -> (tokio_postgres::Client, String) {
    let client = sql().await;
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let xid: String = client
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("an xid")
        .get(0);
    (client, xid)
}

/// Waits until the walsender creating one of `slot`'s temporary slots waits for transaction
/// `xid` to end: the snapshot builder waits, at each of its steps, for every transaction the
/// step's running-transactions record lists. Other walsenders (other tests' copies) may wait
/// for the same transaction; only ours tells where our builder is.
async fn wait_for_builder_waiting_on(admin: &tokio_postgres::Client, slot: &str, xid: &str) {
    let what = format!("the copy's temporary slot to wait for transaction {xid}");
    wait_for(&what, Duration::from_secs(60), || async {
        // A CHECKPOINT logs a running-transactions record: the builder needs one after
        // every step, and the server's own come only every 15 s.
        admin.batch_execute("CHECKPOINT").await.expect("CHECKPOINT");
        admin
            .query_opt(
                "SELECT 1 FROM pg_locks l JOIN pg_replication_slots s ON s.active_pid = l.pid
                  WHERE starts_with(s.slot_name, $1 || '_') AND l.locktype = 'transactionid'
                    AND l.transactionid::text = $2 AND NOT l.granted",
                &[&slot, &xid],
            )
            .await
            .expect("pg_locks")
            .map(|_| ())
    })
    .await;
}

fn source_lsn(record: &Consumed) -> u64 {
    record.value.as_ref().expect("a value")["source"]["lsn"]
        .as_u64()
        .expect("source.lsn")
}

/// design-notes §2: a transaction whose change is written before the copy's consistent point
/// and whose commit comes after it. Its change is streamed with an LSN below `cp` but carries
/// its commit LSN, above `cp`, so it beats the snapshot row (which does not contain it).
#[tokio::test]
async fn a_change_written_before_the_consistent_point_and_committed_after_it_wins() {
    let name = name("snap_t3");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text);
             INSERT INTO {table} SELECT g, 'snapshot' FROM generate_series(1, 5) g;"
        ))
        .await
        .expect("a table with rows");
    // The main pipeline streams and indexes; the copy is driven by hand below.
    let mut config = pipeline_config(&name, &[&table]);
    config.snapshot.mode = SnapshotMode::Never;
    let pipeline = RunningPipeline::start(config.clone()).await;
    let (job, target) = copy_job(&config, "public", &name).await;
    let admin = admin_client().await;
    let checkpoint = || async { admin.batch_execute("CHECKPOINT").await.expect("CHECKPOINT") };

    // The snapshot builder (PostgreSQL's snapbuild.c) becomes consistent in three steps, each
    // at a running-transactions record: BUILDING at the first, waiting for the transactions it
    // lists (T1); FULL at the next one once those ended, waiting for the transactions that
    // one lists (T2); CONSISTENT at the next one once those ended. T3 begins after the FULL
    // step, so the builder never waits for it and becomes consistent while T3 is open.
    let slot = config.postgres.slot.clone();
    let (t1, t1_xid) = open_transaction_with_xid().await;
    let copy_job = job.clone();
    let creating = tokio::spawn(async move { snapshot::begin_copy(&copy_job, vec![target]).await });
    wait_for_builder_waiting_on(&admin, &slot, &t1_xid).await;
    let (t2, t2_xid) = open_transaction_with_xid().await;
    t1.batch_execute("COMMIT").await.expect("commit T1");
    wait_for_builder_waiting_on(&admin, &slot, &t2_xid).await;
    let t3 = sql().await;
    t3.batch_execute(&format!(
        "BEGIN; UPDATE {table} SET note = 't3' WHERE id = 1"
    ))
    .await
    .expect("T3 updates R");
    t2.batch_execute("COMMIT").await.expect("commit T2");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !creating.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the temporary slot never became consistent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        checkpoint().await;
    }
    let started = creating
        .await
        .expect("no panic")
        .expect("the copy's snapshot");
    let consistent_point = started.consistent_point().as_u64();
    let copying = tokio::spawn(snapshot::run_copy(job, started));
    t3.batch_execute("COMMIT").await.expect("commit T3");
    copying.await.expect("no panic").expect("the copy");

    let topic = format!("{name}.public.{name}");
    let records = read_topic(&topic, 6, Duration::from_secs(60)).await;
    let of_r = |op: &str| {
        records
            .iter()
            .find(|record| record.key["id"] == 1 && record.op() == Some(op))
            .unwrap_or_else(|| panic!("an {op:?} event for R in {records:#?}"))
            .clone()
    };
    let snapshot_row = of_r("r");
    assert_eq!(
        snapshot_row.value.as_ref().unwrap()["after"]["note"],
        "snapshot",
        "the exported snapshot does not contain T3's change"
    );
    assert_eq!(snapshot_row.commit_lsn(), consistent_point - 1);
    let update = of_r("u");
    eprintln!(
        "T3's change: lsn {} < cp {} < commit_lsn {}",
        Lsn(source_lsn(&update)),
        Lsn(consistent_point),
        Lsn(update.commit_lsn())
    );
    assert!(
        source_lsn(&update) < consistent_point && consistent_point < update.commit_lsn(),
        "T3's change: lsn {} < cp {} < commit_lsn {}",
        Lsn(source_lsn(&update)),
        Lsn(consistent_point),
        Lsn(update.commit_lsn())
    );

    // Every event applied (written or rejected as stale), then the index shows T3's value.
    let total = topic_size(&topic) as u64;
    let stats = Arc::clone(&pipeline.stats);
    wait_for(
        "the sink to apply every event",
        Duration::from_secs(60),
        || {
            let applied =
                stats.indexed.load(Ordering::Relaxed) + stats.stale.load(Ordering::Relaxed);
            async move { (applied >= total).then_some(()) }
        },
    )
    .await;
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(60)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

/// Reading a table through `COPY … TO STDOUT` against a cursor fetched in pages of 1000 rows,
/// both down to the values the codec reads. Prints the figures; run by hand:
/// `cargo test --release --test snapshot copy_against_cursor -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn copy_against_cursor() {
    use bytes::Bytes;
    use futures_util::StreamExt;
    use walsync::postgres::pgoutput::TupleValue;
    use walsync::source::snapshot::copy_text::decode_row;

    const ROWS: i64 = 200_000;
    let name = name("snap_bench");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text, price numeric, at timestamptz, tags text[]);
             INSERT INTO {table} SELECT g, 'note ' || g, g * 1.5, now(), ARRAY['a', 'b\tc']
             FROM generate_series(1, {ROWS}) g; ANALYZE {table};"
        ))
        .await
        .expect("a table with rows");
    let select = format!("SELECT id, note, price, at, tags FROM {table}");
    for round in 0..3 {
        let started = std::time::Instant::now();
        client
            .batch_execute(&format!("BEGIN; DECLARE c NO SCROLL CURSOR FOR {select}"))
            .await
            .unwrap();
        let mut rows = 0_i64;
        loop {
            let page = client.simple_query("FETCH 1000 FROM c").await.unwrap();
            let mut fetched = 0;
            for message in page {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                    let values: Vec<TupleValue> = (0..row.len())
                        .map(|i| match row.get(i) {
                            Some(text) => TupleValue::Text(Bytes::copy_from_slice(text.as_bytes())),
                            None => TupleValue::Null,
                        })
                        .collect();
                    std::hint::black_box(values);
                    fetched += 1;
                }
            }
            rows += fetched;
            if fetched < 1000 {
                break;
            }
        }
        client.batch_execute("COMMIT").await.unwrap();
        let cursor = started.elapsed();

        let started = std::time::Instant::now();
        let stream = client
            .copy_out(&format!("COPY ({select}) TO STDOUT"))
            .await
            .unwrap();
        futures_util::pin_mut!(stream);
        let mut values = Vec::new();
        let mut copied = 0_i64;
        while let Some(data) = stream.next().await {
            let data = data.unwrap();
            let line = data.slice(..data.len() - 1);
            decode_row(&line, 5, &mut values).unwrap();
            std::hint::black_box(&values);
            copied += 1;
        }
        let copy = started.elapsed();
        assert_eq!((rows, copied), (ROWS, ROWS));
        eprintln!(
            "round {round}: {ROWS} rows: cursor {:?} ({:.0} rows/s), COPY {:?} ({:.0} rows/s)",
            cursor,
            ROWS as f64 / cursor.as_secs_f64(),
            copy,
            ROWS as f64 / copy.as_secs_f64()
        );
    }
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// With a snapshot age bound of a second, a copy runs under several snapshots, each chunk at
/// its own snapshot's `cp − 1`, while changes stream; the index ends equal to the table.
#[tokio::test]
async fn a_long_copy_continues_under_fresh_snapshots_and_the_index_ends_equal() {
    let name = name("snap_age");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text);
             INSERT INTO {table} SELECT g, 'before' FROM generate_series(1, 50000) g;
             ANALYZE {table};"
        ))
        .await
        .expect("a table with rows");
    let mut config = pipeline_config(&name, &[&table]);
    config.snapshot.workers = 2;
    config.snapshot.chunk_rows = 1_000;
    config.snapshot.max_snapshot_age_secs = Some(1);
    let pipeline = RunningPipeline::start(config.clone()).await;
    for statement in [
        format!("UPDATE {table} SET note = 'during' WHERE id % 7 = 0"),
        format!("DELETE FROM {table} WHERE id % 11 = 0"),
        format!("INSERT INTO {table} VALUES (11, 'reinserted'), (50001, 'new')"),
    ] {
        client.batch_execute(&statement).await.expect(&statement);
    }
    wait_copy_recorded(&client, &name, None, Duration::from_secs(300)).await;
    let snapshots: i64 = client
        .query_one(
            "SELECT count(DISTINCT consistent_point) FROM walsync.snapshot_chunks WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("read walsync.snapshot_chunks")
        .get(0);
    assert!(snapshots >= 2, "the copy used {snapshots} snapshot(s)");
    eprintln!("the copy used {snapshots} snapshots");
    wait_equal(&config, "public", &name, &["id"], Duration::from_secs(180)).await;
    pipeline.stop().await;
    drop_slot(&name).await;
}

/// `always` copies every table again at every start; `never` copies nothing.
#[tokio::test]
async fn mode_always_copies_again_and_mode_never_copies_nothing() {
    let name = name("snap_modes");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY); INSERT INTO {table} SELECT generate_series(1, 30);"
        ))
        .await
        .expect("a table with rows");
    let topic = format!("{name}.public.{name}");
    let recorded = || async {
        wait_for(
            "the copy to be recorded",
            Duration::from_secs(60),
            || async {
                client
                    .query_opt(
                        "SELECT 1 FROM walsync.snapshot_progress WHERE slot_name = $1",
                        &[&name],
                    )
                    .await
                    .expect("read walsync.snapshot_progress")
                    .map(|_| ())
            },
        )
        .await
    };
    let mut config = config_for(&name, &[&table]);
    config.snapshot.mode = SnapshotMode::Always;
    let source = RunningSource::start(config.clone()).await;
    assert_eq!(snapshot_events(&topic, 30).await, 30);
    recorded().await;
    source.stop().await;

    let source = RunningSource::start(config.clone()).await;
    assert_eq!(snapshot_events(&topic, 60).await, 60, "copied again");
    recorded().await;
    source.stop().await;

    config.snapshot.mode = SnapshotMode::Never;
    client
        .execute(
            "DELETE FROM walsync.snapshot_progress WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("forget the copy");
    let source = RunningSource::start(config).await;
    client
        .batch_execute(&format!("INSERT INTO {table} VALUES (31)"))
        .await
        .unwrap();
    assert_eq!(
        snapshot_events(&topic, 61).await,
        60,
        "nothing copied, the insert streamed"
    );
    source.stop().await;
    assert_eq!(
        whole_topic_counts(&topic).await,
        (60, 61),
        "the whole topic: the two copies before and the insert, no third copy"
    );
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_new_plan_replaces_a_stored_one_for_a_rewritten_table() {
    // A rewrite (TRUNCATE, VACUUM FULL, CLUSTER) of a table whose copy did not finish makes the
    // next start plan it again; storing the new plan collided with the old chunks' keys, and
    // the source could not start.
    use walsync::source::snapshot::plan::{self, Chunk};
    let client = sql().await;
    walsync::postgres::slot::migrate(
        &mut walsync::postgres::catalog::Catalog::connect(
            &walsync::postgres::replication::ConnectParams::from_url(&common::stack().pg_url)
                .expect("PG_URL parses"),
        )
        .await
        .expect("connect"),
    )
    .await
    .expect("migrations");
    let slot = name("plan_replace");
    let table = "public.rewritten";
    let chunk = |no, start_block, end_block| Chunk {
        no,
        start_block,
        end_block,
    };
    plan::store(
        &client,
        &slot,
        table,
        100,
        &[
            chunk(0, 0, Some(8)),
            chunk(1, 8, Some(16)),
            chunk(2, 16, None),
        ],
    )
    .await
    .expect("the first plan");
    plan::complete(&client, &slot, table, 0, Lsn::from(77), 5)
        .await
        .expect("one chunk done");
    plan::store(
        &client,
        &slot,
        table,
        200,
        &[chunk(0, 0, Some(4)), chunk(1, 4, None)],
    )
    .await
    .expect("the new plan replaces the old one");
    let stored = plan::load(&client, &slot, table)
        .await
        .expect("load")
        .expect("a plan");
    assert_eq!(stored.relfilenode, 200);
    assert_eq!(stored.chunks, 2, "the old third chunk is gone");
    assert_eq!(stored.pending.len(), 2, "the old completion is forgotten");
    assert_eq!(stored.rows_done, 0);
    plan::forget_all(&client, &slot).await.expect("clean up");
}
