//! Readiness under a Kafka outage, against `walsync run` (the binary this build made): `/readyz`
//! turns 503 within [`UNREADY_WITHIN`] of Kafka being paused (SIGSTOP: a hung broker, the hard
//! case, where connections stay open and nothing answers) and 200 again within
//! [`READY_AGAIN_WITHIN`] of its resumption. It pauses the shared Kafka, so `make test` runs it
//! with nothing beside it.

mod common;

use std::time::{Duration, Instant};

use common::endpoints::{free_address, get, sum};
use common::process::{Paused, Walsync, pipeline_config, test_binary};
use common::source::{drop_slot, name, sql};
use common::wait_for;
use walsync::metrics;

const UNREADY_WITHIN: Duration = Duration::from_secs(15);
const READY_AGAIN_WITHIN: Duration = Duration::from_secs(15);

/// Waits until `/readyz` answers `status`; returns its body and how long that took.
async fn wait_readyz(address: &str, status: u16, deadline: Duration) -> (String, Duration) {
    let start = Instant::now();
    let body = wait_for(&format!("/readyz to answer {status}"), deadline, || async {
        get(address, "/readyz")
            .await
            .and_then(|(code, body)| (code == status).then_some(body))
    })
    .await;
    (body, start.elapsed())
}

#[tokio::test]
async fn readyz_turns_unready_while_kafka_is_paused_and_ready_again_after() {
    let name = name("obs_fault");
    let table = format!("public.{name}");
    let client = sql().await;
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create table");
    let address = free_address();
    let config = format!(
        "{}\n[metrics]\nlisten = {address:?}\n",
        pipeline_config(&name, &[&table])
    );
    let mut walsync = Walsync::spawn_binary(&test_binary(), "run", &name, &config);
    wait_readyz(&address, 200, Duration::from_secs(90)).await;

    {
        let _paused = Paused::new("kafka");
        // Writes during the outage wait in the producer: /readyz must say so, not hang.
        client
            .batch_execute(&format!(
                "INSERT INTO {table} SELECT generate_series(1, 50)"
            ))
            .await
            .expect("insert during the outage");
        let (reason, took) =
            wait_readyz(&address, 503, UNREADY_WITHIN + Duration::from_secs(5)).await;
        assert!(
            took <= UNREADY_WITHIN,
            "unready only after {took:?} (reason: {reason})"
        );
        assert!(reason.contains("kafka"), "the reason names Kafka: {reason}");
        let (healthz, _) = get(&address, "/healthz").await.expect("/healthz answers");
        assert_eq!(healthz, 200, "alive while unready");
        let metrics_text = get(&address, "/metrics").await.expect("/metrics answers").1;
        assert_eq!(sum(&metrics_text, metrics::READY, &[]), Some(0.0));
    }

    let (_, took) = wait_readyz(&address, 200, READY_AGAIN_WITHIN + Duration::from_secs(5)).await;
    assert!(
        took <= READY_AGAIN_WITHIN,
        "ready again only after {took:?}"
    );
    // And what was written during the outage arrives.
    let labels = [("table", table.as_str()), ("op", "c")];
    wait_for(
        "the outage's rows to be indexed",
        Duration::from_secs(60),
        || async {
            let text = get(&address, "/metrics").await?.1;
            (sum(&text, metrics::SINK_DOCUMENTS_INDEXED, &labels)? >= 50.0).then_some(())
        },
    )
    .await;

    assert_eq!(walsync.terminate(Duration::from_secs(60)).await, 0);
    drop_slot(&name).await;
}
