//! Running the whole pipeline in-process (source and sink) and checking an index against its
//! table with the comparison core.

use std::sync::Arc;
use std::time::Duration;

use elasticsearch::Elasticsearch;
use tokio::sync::watch;
use walsync::shell::config::{Config, TableConfig};
use walsync::sink::apply::{Sink, SinkStats};
use walsync::sink::compare::{
    ComparisonOptions, ComparisonReport, ComparisonTarget, compare_table,
};
use walsync::sink::index::{alias_name, build_client, refresh};
use walsync::source::{self, SourceExit};

use super::source::{config_for, sql};
use super::stack;

/// A pipeline configuration of its own: slot, publication, topics, consumer group and index
/// prefix no other test shares.
pub fn pipeline_config(name: &str, tables: &[&str]) -> Config {
    let mut config = config_for(name, tables);
    config.elasticsearch.url = stack().es_url.clone();
    config.elasticsearch.index_prefix = format!("{name}-");
    config.sink.group_id = format!("{name}-sink");
    config.sink.linger_ms = 10;
    config
}

pub struct RunningPipeline {
    stop: watch::Sender<bool>,
    source: tokio::task::JoinHandle<anyhow::Result<SourceExit>>,
    sink: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub stats: Arc<SinkStats>,
}

impl RunningPipeline {
    pub async fn start(config: Config) -> Self {
        let (stop, stopped) = watch::channel(false);
        let sink = Sink::new(config.clone()).await.expect("create the sink");
        let stats = Arc::clone(&sink.stats);
        let sink_stop = stopped.clone();
        let sink = tokio::spawn(async move { sink.run(sink_stop).await });
        let slot = config.postgres.slot.clone();
        let source = tokio::spawn(source::run(config, stopped));
        super::source::wait_streaming(&slot).await;
        Self {
            stop,
            source,
            sink,
            stats,
        }
    }

    pub async fn stop(self) {
        self.stop.send(true).expect("the pipeline listens");
        let source = tokio::time::timeout(Duration::from_secs(60), self.source)
            .await
            .expect("the source stops within 60 s")
            .expect("no panic");
        assert_eq!(
            source.expect("the source stopped cleanly"),
            SourceExit::Drained
        );
        tokio::time::timeout(Duration::from_secs(60), self.sink)
            .await
            .expect("the sink stops within 60 s")
            .expect("no panic")
            .expect("the sink stopped cleanly");
    }
}

pub fn search_client() -> Elasticsearch {
    let config = walsync::shell::config::ElasticsearchConfig {
        url: stack().es_url.clone(),
        ..Default::default()
    };
    build_client(&config).expect("a search client")
}

/// The alias a table is written to under `config`.
pub fn alias_of(config: &Config, schema: &str, table: &str) -> String {
    let table_config = config
        .tables
        .get(&format!("{schema}.{table}"))
        .cloned()
        .unwrap_or_default();
    alias_name(&config.elasticsearch, &table_config, schema, table)
}

/// Compares one table with its index (after a refresh).
pub async fn compare(config: &Config, schema: &str, table: &str, key: &[&str]) -> ComparisonReport {
    try_compare(config, schema, table, key)
        .await
        .expect("the index exists")
}

/// Compares one table with its index (after a refresh); `None` while the index does not exist.
pub async fn try_compare(
    config: &Config,
    schema: &str,
    table: &str,
    key: &[&str],
) -> Option<ComparisonReport> {
    let client = sql().await;
    let search = search_client();
    let alias = alias_of(config, schema, table);
    // A missing index is "not yet"; any other failure is the test's to see, not a timeout.
    match refresh(&search, &alias).await {
        Ok(()) => {}
        Err(walsync::sink::index::IndexError::Refused { status: 404, .. }) => return None,
        Err(error) => panic!("cannot refresh {alias}: {error}"),
    }
    let key_columns: Vec<String> = key.iter().map(|k| k.to_string()).collect();
    let table_config: TableConfig = config
        .tables
        .get(&format!("{schema}.{table}"))
        .cloned()
        .unwrap_or_default();
    let target = ComparisonTarget {
        schema,
        table,
        key_columns: &key_columns,
        table_config: &table_config,
        alias: &alias,
    };
    Some(
        compare_table(&client, &search, &target, &ComparisonOptions::default())
            .await
            .expect("compare the table with its index"),
    )
}

/// Waits until the index equals its table; panics with the last report otherwise.
pub async fn wait_equal(
    config: &Config,
    schema: &str,
    table: &str,
    key: &[&str],
    deadline: Duration,
) {
    let start = std::time::Instant::now();
    loop {
        let report = try_compare(config, schema, table, key).await;
        if report.as_ref().is_some_and(ComparisonReport::is_equal) {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "the index never equalled the table within {deadline:?}: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
