//! Running the source in-process for tests: its own slot, publication and topics per test.

use std::time::Duration;

use tokio::sync::watch;
use walsync::config::Config;
use walsync::source::{self, SourceExit};

use super::{stack, unique_name, wait_for};

pub async fn sql() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&stack().pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A source configuration of its own: slot, publication and topics no other test touches.
pub fn config_for(name: &str, tables: &[&str]) -> Config {
    let mut config = Config::default();
    config.postgres.url = stack().pg_url.clone();
    config.postgres.slot = name.to_owned();
    config.postgres.publication = format!("{name}_pub");
    config.postgres.tables = tables.iter().map(|t| t.to_string()).collect();
    config.postgres.heartbeat_interval_secs = 0;
    config.postgres.status_interval_ms = 200;
    config.kafka.brokers = stack().kafka_brokers.clone();
    config.kafka.topic_prefix = name.to_owned();
    config
}

pub fn name(prefix: &str) -> String {
    unique_name(prefix).replace('-', "_")
}

pub struct RunningSource {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<SourceExit>>,
}

impl RunningSource {
    pub async fn start(config: Config) -> Self {
        let slot = config.postgres.slot.clone();
        let source = Self::start_without_waiting(config);
        wait_streaming(&slot).await;
        source
    }

    /// Starts the source; the caller waits for what it expects (a stop, say).
    pub fn start_without_waiting(config: Config) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(source::run(config, stopped));
        Self { stop, task }
    }

    pub async fn stop(self) -> SourceExit {
        self.stop.send(true).expect("the source listens");
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the source stops within 60 s")
            .expect("the source task did not panic")
            .expect("the source stopped without error")
    }
}

impl RunningSource {
    /// Waits for the source to end by itself (an error it stops on, say) within `deadline`.
    pub async fn exited(self, deadline: Duration) -> anyhow::Result<SourceExit> {
        let exit = tokio::time::timeout(deadline, self.task)
            .await
            .expect("the source ends by itself within the deadline")
            .expect("the source task did not panic");
        drop(self.stop);
        exit
    }
}

pub async fn drop_slot(slot: &str) {
    let client = sql().await;
    let _ = client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
}

/// Waits until the walsender of `slot` streams (walsync's or any other client's). A slot shows
/// `active` already while it is being created, before its starting point exists: rows written
/// then would not be streamed.
pub async fn wait_streaming(slot: &str) {
    // The superuser sees every walsender's state.
    let admin = super::admin_client().await;
    wait_for("the slot's walsender to stream", Duration::from_secs(120), || async {
        admin
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                 WHERE s.slot_name = $1 AND r.state IN ('catchup', 'streaming')",
                &[&slot],
            )
            .await
            .ok()
            .flatten()
            .map(|_| ())
    })
    .await;
}

/// Whether the initial copy of `table` (of any table, with `None`) for `slot` is recorded as
/// complete in walsync.snapshot_progress.
pub async fn copy_recorded(
    client: &tokio_postgres::Client,
    slot: &str,
    table: Option<&str>,
) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM walsync.snapshot_progress
              WHERE slot_name = $1 AND ($2::text IS NULL OR table_name = $2)",
            &[&slot, &table],
        )
        .await
        .expect("read walsync.snapshot_progress")
        .is_some()
}

/// Waits until [`copy_recorded`] says so.
pub async fn wait_copy_recorded(
    client: &tokio_postgres::Client,
    slot: &str,
    table: Option<&str>,
    deadline: Duration,
) {
    wait_for("the copy to be recorded", deadline, || async {
        copy_recorded(client, slot, table).await.then_some(())
    })
    .await;
}
