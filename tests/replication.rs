//! The replication client against the real PostgreSQL: authentication, IDENTIFY_SYSTEM, a slot
//! with an exported snapshot, streaming pgoutput, and status updates that move the slot.

mod common;

use std::time::Duration;

use common::{stack, unique_name, wait_for};
use walsync::lsn::Lsn;
use walsync::postgres::pgoutput::{self, LogicalMessage, TupleValue};
use walsync::postgres::replication::frames::{ReplicationMessage, StatusUpdate};
use walsync::postgres::replication::{
    ConnectParams, ReplicationClient, ReplicationError, ReplicationStream, SlotSnapshot,
};

async fn sql_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&stack().pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

fn params() -> ConnectParams {
    ConnectParams::from_url(&stack().pg_url).expect("PG_URL parses")
}

/// Reads until the next decoded pgoutput message, skipping keepalives.
async fn next_logical(stream: &mut ReplicationStream) -> (Lsn, LogicalMessage) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the server streams within 30 s")
            .expect("stream message");
        if let ReplicationMessage::XLogData {
            wal_start, data, ..
        } = message
        {
            return (wal_start, pgoutput::decode(data).expect("valid pgoutput"));
        }
    }
}

#[tokio::test]
async fn identify_system_names_the_cluster_and_timeline() {
    let mut client = ReplicationClient::connect(&params())
        .await
        .expect("connect");
    let identity = client.identify_system().await.expect("IDENTIFY_SYSTEM");
    assert!(
        identity.system_id.len() >= 10 && identity.system_id.chars().all(|c| c.is_ascii_digit()),
        "system id: {}",
        identity.system_id
    );
    assert!(identity.timeline >= 1);
    assert!(identity.xlog_position > Lsn::ZERO);
    assert_eq!(identity.database.as_deref(), Some("walsync"));
}

#[tokio::test]
async fn a_wrong_password_fails_with_the_servers_reason() {
    let mut params = params();
    params.password = Some("not-the-password".into());
    let error = ReplicationClient::connect(&params)
        .await
        .err()
        .expect("authentication must fail");
    let ReplicationError::Server(server) = &error else {
        panic!("expected a server error, got {error}");
    };
    assert_eq!(server.code, "28P01", "{error}");
    assert!(
        error.to_string().contains("password authentication failed"),
        "{error}"
    );
}

#[tokio::test]
async fn streams_a_transaction_and_confirms_it_through_status_updates() {
    let sql = sql_client().await;
    let table = unique_name("repl_test").replace('-', "_");
    let publication = format!("{table}_pub");
    sql.batch_execute(&format!(
        "CREATE TABLE {table} (shop int, sku text, price numeric, PRIMARY KEY (shop, sku));
         CREATE PUBLICATION {publication} FOR TABLE {table};"
    ))
    .await
    .expect("create table and publication");

    let mut client = ReplicationClient::connect(&params())
        .await
        .expect("connect");
    let slot_name = table.clone();
    let slot = client
        .create_logical_slot(&slot_name, true, SlotSnapshot::NoExport)
        .await
        .expect("create a temporary slot");
    assert!(slot.consistent_point > Lsn::ZERO);

    sql.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {table} VALUES (1, 'a-1', 9.99), (1, 'b-2', NULL);
         COMMIT;"
    ))
    .await
    .expect("write one transaction");

    let (mut stream, mut status) = client
        .start_replication(&slot_name, slot.consistent_point, &publication)
        .await
        .expect("START_REPLICATION");

    let (_, begin) = next_logical(&mut stream).await;
    let LogicalMessage::Begin(begin) = begin else {
        panic!("expected BEGIN first, got {begin:?}");
    };
    let (_, relation) = next_logical(&mut stream).await;
    let LogicalMessage::Relation(relation) = relation else {
        panic!("expected the table's Relation before its rows, got {relation:?}");
    };
    assert_eq!(relation.name, table);
    let column_names: Vec<_> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(column_names, ["shop", "sku", "price"]);

    let mut inserted = Vec::new();
    let commit = loop {
        match next_logical(&mut stream).await.1 {
            LogicalMessage::Insert(insert) => inserted.push(insert.new.0),
            LogicalMessage::Commit(commit) => break commit,
            other => panic!("unexpected message inside the transaction: {other:?}"),
        }
    };
    assert_eq!(inserted.len(), 2);
    assert_eq!(inserted[0][1], TupleValue::Text("a-1".into()));
    assert_eq!(inserted[0][2], TupleValue::Text("9.99".into()));
    assert_eq!(inserted[1][2], TupleValue::Null);
    assert_eq!(
        begin.final_lsn, commit.commit_lsn,
        "BEGIN announces the commit LSN every event of the transaction carries"
    );
    assert!(commit.end_lsn > commit.commit_lsn);

    status
        .send(StatusUpdate {
            written: commit.end_lsn,
            flushed: commit.end_lsn,
            applied: commit.end_lsn,
            reply_requested: false,
        })
        .await
        .expect("send a status update");
    let confirmed = wait_for(
        "the slot to confirm the transaction",
        Duration::from_secs(20),
        || async {
            let row = sql
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot_name],
                )
                .await
                .ok()?;
            let confirmed: Lsn = row.get::<_, String>(0).parse().ok()?;
            (confirmed >= commit.end_lsn).then_some(confirmed)
        },
    )
    .await;
    assert_eq!(confirmed, commit.end_lsn);

    drop(stream);
    drop(status);
    sql.batch_execute(&format!(
        "DROP PUBLICATION {publication}; DROP TABLE {table};"
    ))
    .await
    .expect("clean up");
}

#[tokio::test]
async fn a_transactions_full_id_takes_the_epoch_nearest_the_snapshot() {
    // (snapshot, xid) → (visible, full id). 4294967296 = 2³²: epoch 1 starts there.
    let cases: [(&str, i64, bool, u64); 10] = [
        ("100:110:", 0, true, 0),
        ("100:110:", 50, true, 50),
        ("100:110:105", 105, false, 105),
        // At or above xmax: still finishing its commit, in xmax's epoch.
        ("100:110:", 120, false, 120),
        ("4294967396:4294967406:", 120, false, 4294967416),
        ("4294967396:4294967406:", 50, true, 4294967346),
        // The counter wrapped since: below xmax, in the epoch before.
        ("4294967290:4294967301:", 4294967290, true, 4294967290),
        ("4294967290:4294967301:", 3, true, 4294967299),
        // Nearest would be below zero: not this cluster's, so in the future.
        ("100:110:", 4294967000, false, 4294967000),
        // More than 2³¹ transactions old: the nearest candidate is in the future; the reader
        // then asks the commit log about the epoch before (row_reader's invisibility_verdict).
        ("3000000000:3000000000:", 500000000, false, 4794967296),
    ];
    let client = sql_client().await;
    for (snapshot, xid, visible, full) in cases {
        let sql = walsync::postgres::row_reader::transaction_visibility_sql(
            1,
            &format!("'{snapshot}'::pg_snapshot"),
        );
        let row = client
            .query_one(&sql, &[&xid.to_string()])
            .await
            .expect("the visibility statement runs");
        let (answer_visible, answer_full): (bool, String) = (row.get(0), row.get(1));
        assert_eq!(
            (
                answer_visible,
                answer_full.parse::<u64>().expect("a full id")
            ),
            (visible, full),
            "snapshot {snapshot}, xid {xid}"
        );
    }
}
