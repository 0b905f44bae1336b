//! `/healthz`, `/readyz` and `/metrics` of a running `walsync run` (the binary this build made),
//! on the real stack: metrics move under load, every metric is described.
//! The Kafka-pause readiness test is in tests/faults_observability.rs.

mod common;

use std::time::Duration;

use common::endpoints::{free_address, get, sum};
use common::process::{Walsync, pipeline_config, test_binary};
use common::source::{drop_slot, name, sql};
use common::wait_for;
use walsync::metrics;

/// Waits until `GET path` answers `status`, and returns the body.
async fn wait_status(address: &str, path: &str, status: u16, deadline: Duration) -> String {
    wait_for(&format!("{path} to answer {status}"), deadline, || async {
        get(address, path)
            .await
            .and_then(|(code, body)| (code == status).then_some(body))
    })
    .await
}

/// Waits until `/metrics` satisfies `check`, and returns it.
async fn wait_metrics(address: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let found = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if let Some((200, body)) = get(address, "/metrics").await {
                if check(&body) {
                    return body;
                }
                last = body;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("/metrics never showed {what}; last:\n{last}"))
}

#[tokio::test]
async fn health_readiness_and_metrics_move_under_load() {
    let name = name("obs_load");
    let table = format!("public.{name}");
    sql()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text)"
        ))
        .await
        .expect("create table");
    let address = free_address();
    let config = format!(
        "{}\n[metrics]\nlisten = {address:?}\nlog_format = \"json\"\n",
        pipeline_config(&name, &[&table])
    );
    let mut walsync = Walsync::spawn_binary(&test_binary(), "run", &name, &config);

    let body = wait_status(&address, "/healthz", 200, Duration::from_secs(60)).await;
    assert_eq!(body, "ok\n");
    wait_status(&address, "/readyz", 200, Duration::from_secs(90)).await;
    let (status, _) = get(&address, "/nothing-here").await.expect("an answer");
    assert_eq!(status, 404);

    let client = sql().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} SELECT g, 'v1' FROM generate_series(1, 300) g;
             UPDATE {table} SET note = 'v2' WHERE id <= 40;
             DELETE FROM {table} WHERE id > 290"
        ))
        .await
        .expect("write rows");
    let counted = |body: &str, metric: &str, op: &str, at_least: f64| {
        sum(body, metric, &[("table", table.as_str()), ("op", op)])
            .is_some_and(|value| value >= at_least)
    };
    let body = wait_metrics(&address, "every event read, produced and indexed", |body| {
        [
            metrics::SOURCE_EVENTS_READ,
            metrics::SOURCE_EVENTS_PRODUCED,
            metrics::SINK_EVENTS_CONSUMED,
            metrics::SINK_DOCUMENTS_INDEXED,
        ]
        .iter()
        .all(|metric| {
            counted(body, metric, "c", 300.0)
                && counted(body, metric, "u", 40.0)
                && counted(body, metric, "d", 10.0)
        })
    })
    .await;
    let histogram_count = |metric: &str| sum(&body, &format!("{metric}_count"), &[]).unwrap_or(0.0);
    assert!(histogram_count(metrics::SOURCE_KAFKA_DELIVERY_SECONDS) >= 350.0);
    assert!(histogram_count(metrics::SINK_BULK_SECONDS) >= 1.0);
    assert!(histogram_count(metrics::SINK_BULK_BYTES) >= 1.0);
    assert!(histogram_count(metrics::SINK_COMMIT_TO_INDEXED_SECONDS) >= 350.0);
    assert!(sum(&body, metrics::SOURCE_CONFIRMED_LSN, &[]).is_some_and(|lsn| lsn > 0.0));
    assert_eq!(sum(&body, metrics::READY, &[]), Some(1.0));
    assert_eq!(sum(&body, metrics::SINK_BREAKER_OPEN, &[]), Some(0.0));

    // Lag gauges: the source's at once, the consumer's once the lag probe has run. Everything
    // was applied, so the consumer lag of the table's topic settles at 0. The sink holds the
    // table topic's 3 partitions.
    let topic = format!("{name}.public.{name}");
    let body = wait_metrics(&address, "the lag gauges", |body| {
        sum(body, metrics::SOURCE_REPLICATION_LAG_BYTES, &[]).is_some()
            && sum(body, metrics::SOURCE_REPLICATION_LAG_SECONDS, &[]).is_some()
            && sum(body, metrics::SINK_CONSUMER_LAG, &[("topic", &topic)]) == Some(0.0)
            && sum(body, metrics::SINK_ASSIGNED_PARTITIONS, &[]) == Some(3.0)
    })
    .await;

    // Every metric exported is one of walsync's and is described.
    for line in body.lines().filter(|line| line.starts_with("# TYPE ")) {
        let metric = line.split(' ').nth(2).expect("a name");
        assert!(metrics::ALL.contains(&metric), "unknown metric {metric}");
        assert!(
            body.contains(&format!("# HELP {metric} ")),
            "{metric} has no description"
        );
    }

    // Stopping: a clean drain, and JSON logs that never carry the password.
    assert_eq!(walsync.terminate(Duration::from_secs(60)).await, 0);
    let log = walsync.log_text();
    assert!(
        log.lines()
            .filter(|line| !line.trim().is_empty())
            .all(|line| line.starts_with('{')),
        "log_format = json writes JSON lines:\n{log}"
    );
    assert!(log.contains("serving /metrics"), "{log}");
    // The URL's credentials (`user:password@`) never appear: a password may be a common word.
    if let Some((credentials, _)) = common::stack()
        .pg_url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .filter(|(credentials, _)| credentials.contains(':'))
    {
        assert!(
            !log.contains(&format!("{credentials}@")),
            "the PostgreSQL URL with its password is in the log"
        );
    }
    drop_slot(&name).await;
}

#[tokio::test]
async fn a_taken_listen_address_stops_walsync_and_names_the_key() {
    let name = name("obs_off");
    let table = format!("public.{name}");
    sql()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create table");
    // A port someone else holds: walsync stops at once and says which key to change.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let config = format!(
        "{}\n[metrics]\nlisten = {address:?}\n",
        pipeline_config(&name, &[&table])
    );
    let mut walsync = Walsync::spawn_binary(&test_binary(), "source", &name, &config);
    let child = &mut walsync.child;
    let status = wait_for(
        "walsync to refuse the taken port",
        Duration::from_secs(30),
        || {
            let exited = child.try_wait().ok().flatten();
            async move { exited }
        },
    )
    .await;
    assert_eq!(status.code(), Some(1));
    assert!(
        walsync.log_text().contains("metrics.listen"),
        "{}",
        walsync.log_text()
    );
    drop(taken);
}

#[tokio::test]
async fn a_sink_whose_search_server_hangs_is_alive_but_not_ready() {
    let name = name("obs_hung");
    // A "search server" that accepts connections and never answers, like a hung process.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_url = format!("http://{}", hung.local_addr().expect("address"));
    let address = free_address();
    let config = format!(
        "{}\n[metrics]\nlisten = {address:?}\n",
        pipeline_config(&name, &[]).replace(&common::stack().es_url, &hung_url)
    );
    let _walsync = Walsync::spawn_binary(&test_binary(), "sink", &name, &config);

    // Once Kafka has answered the probe, the search server is the one reason left.
    let body = wait_for(
        "/readyz to name only the search server",
        Duration::from_secs(60),
        || async {
            get(&address, "/readyz")
                .await
                .filter(|(code, body)| *code == 503 && !body.contains("kafka"))
                .map(|(_, body)| body)
        },
    )
    .await;
    assert_eq!(
        body, "not ready: sink: the search server has not answered yet\n",
        "a sink has no source part"
    );
    let (status, _) = get(&address, "/healthz").await.expect("an answer");
    assert_eq!(status, 200, "alive while unready");
    drop(hung);
}
