//! Topic naming and creation.
//!
//! One topic per table, `<topic_prefix>.<schema>.<table>`. Characters Kafka does not allow in
//! topic names become `_`. Two tables whose topic names would collide — identical after that
//! replacement, or differing only by case or by `.` versus `_` (which Kafka's metric names
//! conflate) — are refused at start-up rather than silently merged. Topics are created by
//! walsync through the admin API, because most managed Kafka turns auto-creation off.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::kafka::producer::{ProducerError, client_config};

/// The topic of a table.
pub fn topic_name(prefix: &str, schema: &str, table: &str) -> String {
    format!(
        "{}.{}.{}",
        sanitize(prefix),
        sanitize(schema),
        sanitize(table)
    )
}

/// The dead-letter topic of a pipeline.
pub fn dead_letter_topic(prefix: &str) -> String {
    format!("{}.dlq", sanitize(prefix))
}

/// The subscription pattern (a regular expression, as librdkafka takes one) of every table
/// topic under `prefix`: the inverse of [`topic_name`]. Table topics have at least two more
/// segments after the prefix; the dead-letter topic, `<prefix>.dlq`, has one.
pub fn table_topics_pattern(prefix: &str) -> String {
    format!("^{}\\.[^.]+\\..+", regex_escape(&sanitize(prefix)))
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// A topic name part with every character Kafka does not allow replaced by `_`.
pub fn sanitize(part: &str) -> String {
    part.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Refuses tables whose topics would collide; returns table → topic otherwise.
pub fn plan_topics(prefix: &str, tables: &[(String, String)]) -> Result<Vec<String>, TopicError> {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut topics = Vec::with_capacity(tables.len());
    for (schema, table) in tables {
        let topic = topic_name(prefix, schema, table);
        let folded = topic.to_ascii_lowercase().replace('.', "_");
        let qualified = format!("{schema}.{table}");
        if let Some(other) = seen.insert(folded, qualified.clone()) {
            return Err(TopicError::Collision {
                first: other,
                second: qualified,
                topic,
            });
        }
        topics.push(topic);
    }
    Ok(topics)
}

/// Creates the topics that do not exist yet, with the configured partitions, replication
/// factor, `min.insync.replicas` and cleanup policy. Existing topics are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config)?
        .create()
        .map_err(|error| TopicError::Admin(error.to_string()))?;
    let min_isr = config.min_insync_replicas.map(|n| n.to_string());
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|topic| {
            let mut new = NewTopic::new(
                topic,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
            .set("cleanup.policy", &config.cleanup_policy);
            if let Some(min_isr) = &min_isr {
                new = new.set("min.insync.replicas", min_isr);
            }
            new
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|error| TopicError::Admin(error.to_string()))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions = config.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(TopicError::Create {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error(
        "tables {first} and {second} would share topic {topic} (Kafka conflates case and `.`/`_` in names); rename one of them or capture only one"
    )]
    Collision {
        first: String,
        second: String,
        topic: String,
    },
    #[error(
        "cannot create topic {topic}: {reason}; create it yourself or grant walsync CREATE on the cluster"
    )]
    Create { topic: String, reason: String },
    #[error("Kafka admin request failed: {0}; check kafka.brokers")]
    Admin(String),
    #[error(transparent)]
    Config(#[from] ProducerError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_pattern_escapes_the_prefix_and_wants_two_more_segments() {
        // librdkafka matches it; the dead-letter topic `<prefix>.dlq` has one segment only.
        assert_eq!(table_topics_pattern("shop.v2"), "^shop\\.v2\\.[^.]+\\..+");
        assert_eq!(table_topics_pattern("a b"), "^a_b\\.[^.]+\\..+");
    }

    fn table(schema: &str, name: &str) -> (String, String) {
        (schema.to_owned(), name.to_owned())
    }

    #[test]
    fn topics_are_prefix_schema_table() {
        assert_eq!(
            topic_name("shop", "public", "products"),
            "shop.public.products"
        );
        assert_eq!(dead_letter_topic("shop"), "shop.dlq");
    }

    #[test]
    fn illegal_characters_become_underscores() {
        assert_eq!(
            topic_name("shop", "public", "order lines"),
            "shop.public.order_lines"
        );
        assert_eq!(topic_name("shop", "public", "prix€"), "shop.public.prix_");
    }

    #[test]
    fn tables_differing_only_by_case_are_refused() {
        let error = plan_topics(
            "shop",
            &[table("public", "Products"), table("public", "products")],
        )
        .unwrap_err();
        assert!(matches!(error, TopicError::Collision { .. }), "{error}");
        assert!(error.to_string().contains("public.Products"), "{error}");
    }

    #[test]
    fn tables_colliding_after_sanitizing_or_dot_underscore_are_refused() {
        assert!(plan_topics("p", &[table("s", "a b"), table("s", "a_b")]).is_err());
        assert!(plan_topics("p", &[table("s", "a.b"), table("s", "a_b")]).is_err());
    }

    #[test]
    fn distinct_tables_get_distinct_topics() {
        let topics = plan_topics("p", &[table("public", "a"), table("sales", "a")]).unwrap();
        assert_eq!(topics, ["p.public.a", "p.sales.a"]);
    }
}
