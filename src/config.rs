//! Configuration: `walsync.toml` layered with `WALSYNC_<SECTION>__<KEY>` environment variables
//! (double underscore between levels), unknown keys rejected by name, secrets read from the
//! environment or from files.
//!
//! The whole layout is declared here, so every part of the pipeline extends one structure:
//! `[postgres]`, `[kafka]`, `[snapshot]`, `[sink]`, `[elasticsearch]`, `[metrics]` and per-table
//! overrides under `[tables."schema.table"]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The environment prefix of every override: `WALSYNC_KAFKA__BROKERS=…`.
pub const ENV_PREFIX: &str = "WALSYNC_";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub kafka: KafkaConfig,
    pub snapshot: SnapshotConfig,
    pub sink: SinkConfig,
    pub elasticsearch: ElasticsearchConfig,
    pub metrics: MetricsConfig,
    /// Per-table overrides, keyed by `schema.table`.
    pub tables: BTreeMap<String, TableConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style URL of the source database.
    pub url: String,
    /// Password, if not in the URL (prefer `password_file` or the environment).
    pub password: Option<Secret>,
    /// File holding the password (e.g. a mounted secret).
    pub password_file: Option<PathBuf>,
    /// The logical replication slot walsync owns.
    pub slot: String,
    /// The publication walsync reads (created when missing).
    pub publication: String,
    /// Tables to capture, as `schema.table`.
    pub tables: Vec<String>,
    /// Remove tables from the publication that are no longer configured.
    pub prune_publication: bool,
    /// Recreate a slot that walsync used before and that is now missing or lost (then a
    /// backfill is needed: changes in between are gone).
    pub recreate_lost_slot: bool,
    /// Interval of the transactional heartbeat in seconds; 0 turns it off.
    pub heartbeat_interval_secs: u64,
    /// How often standby status updates are sent, in milliseconds.
    pub status_interval_ms: u64,
    pub tls: PostgresTls,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://walsync@127.0.0.1:5432/walsync".into(),
            password: None,
            password_file: None,
            slot: "walsync".into(),
            publication: "walsync".into(),
            tables: Vec::new(),
            prune_publication: false,
            recreate_lost_slot: false,
            heartbeat_interval_secs: 10,
            status_interval_ms: 1_000,
            tls: PostgresTls::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresTls {
    /// disable, prefer, require, verify-ca or verify-full.
    pub mode: SslMode,
    /// CA certificate (PEM) for verify-ca and verify-full.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Topics are `<topic_prefix>.<schema>.<table>`; the dead-letter topic is `<topic_prefix>.dlq`.
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub min_insync_replicas: Option<i32>,
    /// `delete` or `compact` (compaction keeps the newest event per key).
    pub cleanup_policy: String,
    /// Send a tombstone (null value) after each delete, for log compaction.
    pub tombstones: bool,
    /// Producer compression: none, gzip, snappy, lz4 or zstd.
    pub compression: String,
    pub security: KafkaSecurity,
    /// Extra librdkafka settings, passed through; those walsync owns are refused.
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "walsync".into(),
            partitions: 3,
            replication_factor: 1,
            min_insync_replicas: None,
            cleanup_policy: "delete".into(),
            tombstones: true,
            compression: "zstd".into(),
            security: KafkaSecurity::default(),
            extra: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurity {
    /// plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub protocol: Option<String>,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    pub sasl_password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// initial (copy tables not copied yet), never, or always.
    pub mode: SnapshotMode,
    /// Parallel copy workers sharing one exported snapshot.
    pub workers: usize,
    /// Rows per chunk.
    pub chunk_rows: u64,
    /// Continue under a fresh snapshot after this many minutes, so VACUUM is not held back;
    /// 0: one snapshot for the whole copy.
    pub max_snapshot_age_mins: u64,
    /// The same bound in seconds; when set, it replaces `max_snapshot_age_mins`.
    pub max_snapshot_age_secs: Option<u64>,
}

impl SnapshotConfig {
    /// How long one exported snapshot may be used; `None`: no bound.
    pub fn max_snapshot_age(&self) -> Option<std::time::Duration> {
        let seconds = self
            .max_snapshot_age_secs
            .unwrap_or(self.max_snapshot_age_mins.saturating_mul(60));
        (seconds > 0).then(|| std::time::Duration::from_secs(seconds))
    }
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            mode: SnapshotMode::Initial,
            workers: 2,
            chunk_rows: 50_000,
            max_snapshot_age_mins: 30,
            max_snapshot_age_secs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    #[default]
    Initial,
    Never,
    Always,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    pub group_id: String,
    /// Explicit topics; empty means every `<topic_prefix>.*` topic except the dead-letter one.
    pub topics: Vec<String>,
    pub batch_max_docs: usize,
    pub batch_max_bytes: usize,
    pub linger_ms: u64,
    /// Bulk requests in flight at once, across partitions (never more than one per partition).
    pub concurrency: usize,
    /// Dead letters per minute that trip the breaker.
    pub dlq_breaker_per_minute: u32,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            group_id: "walsync-sink".into(),
            topics: Vec::new(),
            batch_max_docs: 1_000,
            batch_max_bytes: 5 * 1024 * 1024,
            linger_ms: 5,
            concurrency: 4,
            dlq_breaker_per_minute: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticsearchConfig {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub api_key: Option<Secret>,
    pub api_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Aliases are `<index_prefix><schema>.<table>`.
    pub index_prefix: String,
    /// hard (delete documents) or soft (keep versioned tombstones).
    pub delete_mode: DeleteMode,
    /// `index.gc_deletes` of the indices walsync creates.
    pub gc_deletes: String,
}

impl Default for ElasticsearchConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:9200".into(),
            username: None,
            password: None,
            password_file: None,
            api_key: None,
            api_key_file: None,
            ca_file: None,
            index_prefix: String::new(),
            delete_mode: DeleteMode::Hard,
            gc_deletes: "10m".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    #[default]
    Hard,
    Soft,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: String,
    /// Log format: text or json.
    pub log_format: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9898".into(),
            log_format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// Key columns for a table without a primary key.
    pub key_columns: Vec<String>,
    /// Alias to write to instead of `<index_prefix><schema>.<table>`.
    pub index: Option<String>,
    pub include_columns: Vec<String>,
    pub exclude_columns: Vec<String>,
    /// Column → field name in the document.
    pub rename: BTreeMap<String, String>,
    /// JSON files with index settings and mappings that replace the defaults.
    pub settings_file: Option<PathBuf>,
    pub mappings_file: Option<PathBuf>,
}

/// A secret: never printed by `Debug`, never logged.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    /// From the environment a password such as `12345` arrives as a number: take any scalar
    /// as its text.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Integer(i128),
            Float(f64),
            Flag(bool),
        }
        Ok(Secret(match Scalar::deserialize(deserializer)? {
            Scalar::Text(text) => text,
            Scalar::Integer(number) => number.to_string(),
            Scalar::Float(number) => number.to_string(),
            Scalar::Flag(flag) => flag.to_string(),
        }))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "configuration file {path} does not exist; pass --config or create it (see walsync.toml in the repository)"
    )]
    MissingFile { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error("cannot read the secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Config {
    /// Loads `path` (which must exist), then the `WALSYNC_*` environment on top.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::MissingFile {
                path: path.to_owned(),
            });
        }
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file(path)),
        )
    }

    /// Loads from TOML text, then the environment: for tests and embedding.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        // Only `WALSYNC_<SECTION>__<KEY>` names are configuration: other WALSYNC_ variables
        // (WALSYNC_CONFIG for --config, the local stack's WALSYNC_PG_PORT, …) are not keys.
        let figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let mut config: Config = figment
            .extract()
            .map_err(|error| ConfigError::Invalid(Box::new(error)))?;
        config.read_secret_files()?;
        Ok(config)
    }

    /// Secrets given as files replace the inline value, so a mounted secret wins.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        read_secret(&self.postgres.password_file, &mut self.postgres.password)?;
        read_secret(
            &self.kafka.security.sasl_password_file,
            &mut self.kafka.security.sasl_password,
        )?;
        read_secret(
            &self.elasticsearch.password_file,
            &mut self.elasticsearch.password,
        )?;
        read_secret(
            &self.elasticsearch.api_key_file,
            &mut self.elasticsearch.api_key,
        )?;
        Ok(())
    }
}

fn read_secret(file: &Option<PathBuf>, target: &mut Option<Secret>) -> Result<(), ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
            path: path.clone(),
            source,
        })?;
        *target = Some(Secret::new(text.trim_end_matches(['\n', '\r'])));
    }
    Ok(())
}

/// Splits a configured table name, `schema.table`; a name without a schema means `public`.
pub fn split_table_name(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((schema, table)) => (schema.to_owned(), table.to_owned()),
        None => ("public".to_owned(), name.to_owned()),
    }
}

/// `url` with the password of its user info (`scheme://user:password@host`) replaced by
/// `***`, for messages: a URL from the configuration may carry credentials.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info
                .split_once(':')
                .map_or(user_info, |(user, _)| user);
            let hidden = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
// figment's Jail dictates closures returning `Result<_, figment::Error>`.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    /// Runs `check` with `vars` set, in figment's sandbox (restores the environment after).
    fn with_env(vars: &[(&str, &str)], check: impl FnOnce() -> Result<(), figment::Error>) {
        figment::Jail::expect_with(|jail| {
            for (name, value) in vars {
                jail.set_env(name, value);
            }
            check()
        });
    }

    #[test]
    fn the_snapshot_age_bound_is_in_minutes_unless_seconds_are_set() {
        let mut snapshot = SnapshotConfig::default();
        assert_eq!(
            snapshot.max_snapshot_age(),
            Some(std::time::Duration::from_secs(30 * 60))
        );
        snapshot.max_snapshot_age_secs = Some(2);
        assert_eq!(
            snapshot.max_snapshot_age(),
            Some(std::time::Duration::from_secs(2))
        );
        snapshot.max_snapshot_age_secs = Some(0);
        assert_eq!(snapshot.max_snapshot_age(), None, "0 means no bound");
    }

    #[test]
    fn defaults_apply_when_the_file_is_empty() {
        with_env(&[], || {
            let config = Config::from_toml("").expect("empty config");
            assert_eq!(config, Config::default());
            assert_eq!(config.kafka.partitions, 3);
            Ok(())
        });
    }

    #[test]
    fn reads_every_section_and_per_table_overrides() {
        with_env(&[], || {
            let config = Config::from_toml(
                r#"
                [postgres]
                url = "postgres://u@db:5432/shop"
                tables = ["public.products"]
                tls = { mode = "verify-full", ca_file = "/ca.pem" }
                [kafka]
                brokers = "k:9092"
                extra = { "linger.ms" = "10" }
                [snapshot]
                mode = "never"
                [sink]
                linger_ms = 5
                [elasticsearch]
                delete_mode = "soft"
                [metrics]
                listen = "0.0.0.0:9000"
                [tables."public.products"]
                exclude_columns = ["secret"]
                rename = { title = "name" }
                "#,
            )
            .expect("valid config");
            assert_eq!(config.postgres.tls.mode, SslMode::VerifyFull);
            assert_eq!(config.kafka.extra["linger.ms"], "10");
            assert_eq!(config.snapshot.mode, SnapshotMode::Never);
            assert_eq!(config.sink.linger_ms, 5);
            assert_eq!(config.elasticsearch.delete_mode, DeleteMode::Soft);
            let table = &config.tables["public.products"];
            assert_eq!(table.exclude_columns, ["secret"]);
            assert_eq!(table.rename["title"], "name");
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_the_file_with_double_underscores_between_levels() {
        with_env(
            &[
                ("WALSYNC_KAFKA__BROKERS", "override:9092"),
                ("WALSYNC_POSTGRES__TLS__MODE", "require"),
            ],
            || {
                let config =
                    Config::from_toml("[kafka]\nbrokers = \"file:9092\"\n").expect("valid");
                assert_eq!(config.kafka.brokers, "override:9092");
                assert_eq!(config.postgres.tls.mode, SslMode::Require);
                Ok(())
            },
        );
    }

    #[test]
    fn other_walsync_variables_are_not_configuration() {
        with_env(
            &[
                ("WALSYNC_CONFIG", "/etc/walsync.toml"),
                ("WALSYNC_PG_PORT", "25432"),
                ("WALSYNC_POSTGRES__PASSWORD", "12345"),
            ],
            || {
                let config = Config::from_toml("").expect("valid");
                let password = config.postgres.password.expect("from the environment");
                assert_eq!(password.expose(), "12345", "a numeric secret stays text");
                Ok(())
            },
        );
    }

    #[test]
    fn an_unknown_key_is_rejected_by_name() {
        with_env(&[], || {
            let error = Config::from_toml("[kafka]\nbrokerz = \"x\"\n").unwrap_err();
            let message = error.to_string();
            assert!(message.contains("brokerz"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_section_is_rejected_by_name() {
        with_env(&[], || {
            let error = Config::from_toml("[kafak]\nbrokers = \"x\"\n").unwrap_err();
            assert!(error.to_string().contains("kafak"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        with_env(&[], || {
            let dir = tempdir();
            let file = dir.join("pg-password");
            std::fs::write(&file, "s3cret\n").expect("write secret");
            let config = Config::from_toml(&format!(
                "[postgres]\npassword_file = {:?}\n",
                file.display().to_string()
            ))
            .expect("valid");
            let password = config.postgres.password.as_ref().expect("read from file");
            assert_eq!(password.expose(), "s3cret");
            assert!(!format!("{config:?}").contains("s3cret"));
            Ok(())
        });
    }

    #[test]
    fn a_missing_secret_file_names_the_file() {
        with_env(&[], || {
            let error = Config::from_toml("[elasticsearch]\napi_key_file = \"/nonexistent/key\"\n")
                .unwrap_err();
            assert!(error.to_string().contains("/nonexistent/key"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn the_sample_config_at_the_repository_root_is_valid() {
        with_env(&[], || {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("walsync.toml");
            let config = Config::load(&path).expect("walsync.toml is valid");
            assert!(!config.postgres.tables.is_empty());
            Ok(())
        });
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "walsync-config-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn a_url_password_is_hidden_and_the_rest_kept() {
        assert_eq!(
            redact_url("https://elastic:s3cr@t@es.example:9200/x?y=1"),
            "https://elastic:***@es.example:9200/x?y=1"
        );
        assert_eq!(
            redact_url("postgres://walsync@db:5432/app"),
            "postgres://walsync@db:5432/app"
        );
        assert_eq!(redact_url("http://127.0.0.1:9200"), "http://127.0.0.1:9200");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
