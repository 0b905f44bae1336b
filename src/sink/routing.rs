//! The topic decides: which table a record belongs to, and which records the sink accepts.
//!
//! A Kafka record is untrusted input (design invariant 8). The sink never takes a table, an
//! index or a key's table from a record's payload: the topic a record came from names its
//! table, through the same naming rule the source writes with
//! ([`crate::kafka::topics::topic_name`]), and that table must be one of `postgres.tables`.
//! The payload must then agree with its topic, or the record is dead-lettered with the reason
//! and the pipeline goes on:
//!
//! - `source.schema` and `source.table` are the topic's table, and `source.name` (when
//!   present) is `kafka.topic_prefix`;
//! - `source.system_id` is the cluster the table's index was built from: versions are only
//!   comparable within one cluster, so a record from another one (a dump restored elsewhere, a
//!   re-pointed source) would otherwise be dropped as "stale" in silence (design invariant 1);
//!   this is checked on every record, not once per table;
//! - the version is possible: a commit LSN above 0 that fits Elasticsearch's signed 64-bit
//!   versions, and not below the change's own LSN (a commit record follows its changes).
//!
//! A record on a topic that no configured table writes to (the subscription pattern can match
//! other topics) is dead-lettered too.

use std::collections::HashMap;

use crate::config::Config;
use crate::config::split_table_name;
use crate::event::Envelope;
use crate::kafka::topics::topic_name;

/// A configured table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Topic → table, for every table in `postgres.tables`.
#[derive(Debug, Clone)]
pub struct Routes {
    prefix: String,
    by_topic: HashMap<String, TableName>,
}

impl Routes {
    pub fn new(config: &Config) -> Self {
        let prefix = config.kafka.topic_prefix.clone();
        let by_topic = config
            .postgres
            .tables
            .iter()
            .map(|name| {
                let (schema, table) = split_table_name(name);
                (
                    topic_name(&prefix, &schema, &table),
                    TableName { schema, table },
                )
            })
            .collect();
        Self { prefix, by_topic }
    }

    /// The table a topic belongs to, if walsync captures it.
    pub fn table_of(&self, topic: &str) -> Option<&TableName> {
        self.by_topic.get(topic)
    }

    /// Why a record on `topic` cannot be applied, when it cannot.
    pub fn unrouted_reason(&self, topic: &str) -> String {
        format!(
            "topic {topic} belongs to no table in postgres.tables; add the table there, or take the topic out of sink.topics"
        )
    }

    /// Checks that a change event agrees with its topic's table and the index's cluster
    /// (see the module doc); the reason otherwise.
    pub fn check_event(
        &self,
        table: &TableName,
        index_system_id: &str,
        envelope: &Envelope,
    ) -> Result<(), String> {
        let source = &envelope.source;
        if source.schema != table.schema || source.table != table.table {
            return Err(format!(
                "the record names table {}.{}, but its topic belongs to {}: records are routed by topic, never by payload",
                source.schema,
                source.table,
                table.qualified()
            ));
        }
        if !source.name.is_empty() && source.name != self.prefix {
            return Err(format!(
                "the record was written under topic prefix {:?}, but this pipeline's kafka.topic_prefix is {:?}",
                source.name, self.prefix
            ));
        }
        if source.system_id != index_system_id {
            return Err(format!(
                "the record comes from PostgreSQL system {}, but the index of {} was built from system {index_system_id}: \
                 versions (LSNs) of different clusters are not comparable. If the source moved to a new cluster, \
                 rebuild the index (walsync backfill --into) from it",
                source.system_id,
                table.qualified()
            ));
        }
        check_version(envelope)
    }
}

/// The highest external version Elasticsearch accepts.
const MAX_VERSION: u64 = i64::MAX as u64;

fn check_version(envelope: &Envelope) -> Result<(), String> {
    let source = &envelope.source;
    if source.commit_lsn == 0 || source.commit_lsn > MAX_VERSION {
        return Err(format!(
            "impossible version: commit_lsn {} (a commit LSN is above 0 and below 2^63)",
            source.commit_lsn
        ));
    }
    if source.lsn > source.commit_lsn {
        return Err(format!(
            "impossible version: the change's lsn {} is above its commit_lsn {} (a commit follows its changes)",
            source.lsn, source.commit_lsn
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut config = Config::default();
        config.kafka.topic_prefix = "shop".into();
        config.postgres.tables = vec!["public.products".into(), "sales.orders".into()];
        config
    }

    fn envelope(
        schema: &str,
        table: &str,
        name: &str,
        system_id: &str,
        lsn: u64,
        commit: u64,
    ) -> Envelope {
        let value = serde_json::json!({
            "before": null, "after": {"id": 1}, "op": "c", "ts_ms": 1,
            "source": {"name": name, "schema": schema, "table": table, "txId": 1, "lsn": lsn,
                       "commit_lsn": commit, "ts_ms": 1, "snapshot": "false",
                       "system_id": system_id, "timeline": 1}
        });
        Envelope::parse(value.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn the_topic_names_the_table() {
        let routes = Routes::new(&config());
        assert_eq!(
            routes
                .table_of("shop.public.products")
                .map(TableName::qualified),
            Some("public.products".into())
        );
        assert_eq!(routes.table_of("shop.public.secret"), None);
        assert_eq!(routes.table_of("other.public.products"), None);
    }

    #[test]
    fn a_payload_that_disagrees_with_its_topic_is_refused() {
        let routes = Routes::new(&config());
        let products = routes.table_of("shop.public.products").unwrap().clone();
        let good = envelope("public", "products", "shop", "73", 90, 100);
        assert_eq!(routes.check_event(&products, "73", &good), Ok(()));
        for (bad, what) in [
            (envelope("public", "secret", "shop", "73", 90, 100), "table"),
            (
                envelope("public", "products'; select 1; --", "shop", "73", 90, 100),
                "table",
            ),
            (
                envelope("sales", "products", "shop", "73", 90, 100),
                "schema",
            ),
            (
                envelope("public", "products", "other", "73", 90, 100),
                "prefix",
            ),
            (
                envelope("public", "products", "shop", "74", 90, 100),
                "system",
            ),
            (
                envelope("public", "products", "shop", "73", 90, 0),
                "version",
            ),
            (
                envelope("public", "products", "shop", "73", 200, 100),
                "lsn",
            ),
            (
                envelope("public", "products", "shop", "73", 1, u64::MAX),
                "version",
            ),
        ] {
            assert!(routes.check_event(&products, "73", &bad).is_err(), "{what}");
        }
    }
}
