//! Running the whole pipeline in-process (source and sink) and checking an index against its
//! table: through the independent oracle (`compare`, `wait_equal`), or through walsync's own
//! comparison core when `verify` itself is under test (`verify_compare`).

use std::sync::Arc;
use std::time::Duration;

use elasticsearch::Elasticsearch;
use tokio::sync::watch;
use walsync::config::{Config, TableConfig};
use walsync::sink::apply::{Sink, SinkStats};
use walsync::sink::compare::{
    ComparisonOptions, ComparisonReport, ComparisonTarget, compare_table,
};
use walsync::sink::index::{alias_name, build_client, refresh};
use walsync::source::{self, SourceExit};

use super::oracle::{Oracle, OracleReport, Shape};
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
    /// Starts both halves and waits until the source streams (on the stack's PostgreSQL).
    pub async fn start(config: Config) -> Self {
        let slot = config.postgres.slot.clone();
        let pipeline = Self::start_without_waiting(config).await;
        super::source::wait_streaming(&slot).await;
        pipeline
    }

    /// Starts both halves; the caller waits for the source (on another cluster, say).
    pub async fn start_without_waiting(config: Config) -> Self {
        let (stop, stopped) = watch::channel(false);
        let sink = Sink::new(config.clone()).await.expect("create the sink");
        let stats = Arc::clone(&sink.stats);
        let sink_stop = stopped.clone();
        let sink = tokio::spawn(async move { sink.run(sink_stop).await });
        let source = tokio::spawn(source::run(config, stopped));
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
    let config = walsync::config::ElasticsearchConfig {
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

/// The oracle's shape for `schema.table` under `config`: the table's column settings, the id
/// from `key`.
pub fn oracle_shape(config: &Config, schema: &str, table: &str, key: &[&str]) -> Shape {
    let table_config = table_config(config, schema, table);
    Shape {
        key: key.iter().map(|k| k.to_string()).collect(),
        include: table_config.include_columns.iter().cloned().collect(),
        exclude: table_config.exclude_columns.iter().cloned().collect(),
        rename: table_config.rename.clone(),
    }
}

fn table_config(config: &Config, schema: &str, table: &str) -> TableConfig {
    config
        .tables
        .get(&format!("{schema}.{table}"))
        .cloned()
        .unwrap_or_default()
}

/// Compares one table with its index through the independent oracle (tests/common/oracle.rs),
/// which shares no code with walsync.
pub async fn compare(config: &Config, schema: &str, table: &str, key: &[&str]) -> OracleReport {
    let alias = alias_of(config, schema, table);
    Oracle::connect()
        .await
        .compare_shaped(
            schema,
            table,
            &alias,
            &oracle_shape(config, schema, table, key),
        )
        .await
        .unwrap_or_else(|error| panic!("the oracle cannot compare {schema}.{table}: {error}"))
}

/// Compares one table with its index through walsync's own comparison core (the one `walsync
/// verify` uses), after a refresh: for tests of `verify` itself.
pub async fn verify_compare(
    config: &Config,
    schema: &str,
    table: &str,
    key: &[&str],
) -> ComparisonReport {
    let client = sql().await;
    let search = search_client();
    let alias = alias_of(config, schema, table);
    refresh(&search, &alias)
        .await
        .unwrap_or_else(|error| panic!("cannot refresh {alias}: {error}"));
    let key_columns: Vec<String> = key.iter().map(|k| k.to_string()).collect();
    let table_config = table_config(config, schema, table);
    let target = ComparisonTarget {
        schema,
        table,
        key_columns: &key_columns,
        table_config: &table_config,
        alias: &alias,
    };
    compare_table(&client, &search, &target, &ComparisonOptions::default())
        .await
        .expect("compare the table with its index")
}

/// Waits until the index equals its table by the independent oracle; panics with the last
/// report (or the last error, such as a missing index) otherwise.
pub async fn wait_equal(
    config: &Config,
    schema: &str,
    table: &str,
    key: &[&str],
    deadline: Duration,
) {
    let alias = alias_of(config, schema, table);
    let shape = oracle_shape(config, schema, table, key);
    let oracle = Oracle::connect().await;
    let start = std::time::Instant::now();
    loop {
        let last = oracle.compare_shaped(schema, table, &alias, &shape).await;
        if last.as_ref().is_ok_and(OracleReport::is_equal) {
            return;
        }
        if start.elapsed() > deadline {
            match last {
                Ok(report) => {
                    panic!("the index never equalled the table within {deadline:?}:\n{report}")
                }
                Err(error) => panic!("no comparison succeeded within {deadline:?}: {error}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
