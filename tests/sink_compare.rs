//! The comparison core against the real PostgreSQL and search server: a table and an index
//! written by hand (as the sink would write it) compare equal, and every kind of divergence is
//! named by id.
//!
//! These tests need `make stack-up` (or run them through `make test`).

mod common;

use common::{stack, unique_name};
use elasticsearch::http::request::JsonBody;
use elasticsearch::params::Refresh;
use elasticsearch::{BulkParts, Elasticsearch};
use serde_json::{Value, json};
use walsync::config::{ElasticsearchConfig, TableConfig};
use walsync::sink::compare::{
    ComparisonOptions, ComparisonReport, ComparisonTarget, compare_table,
};
use walsync::sink::index;

const SYSTEM_ID: &str = "7400000000000000042";

async fn postgres() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&stack().pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect to the local PostgreSQL with PG_URL");
    tokio::spawn(connection);
    client
}

fn search() -> Elasticsearch {
    index::build_client(&ElasticsearchConfig {
        url: stack().es_url.clone(),
        ..ElasticsearchConfig::default()
    })
    .expect("a client for ES_URL")
}

/// A table name PostgreSQL takes unquoted, and the alias of its index.
fn names(prefix: &str) -> (String, String) {
    let table = unique_name(prefix).replace('-', "_");
    let alias = format!("public.{table}");
    (table, alias)
}

async fn create_index(search: &Elasticsearch, alias: &str) {
    let settings = json!({"index": {"number_of_replicas": 0}});
    index::ensure_index(search, alias, SYSTEM_ID, Some(&settings), None, "10m")
        .await
        .expect("create the index");
}

fn metadata(commit_lsn: u64, deleted: bool) -> Value {
    json!({"commit_lsn": commit_lsn, "lsn": commit_lsn - 8,
           "op": if deleted { "d" } else { "r" }, "deleted": deleted,
           "tx_id": 1, "source_ts_ms": 1_700_000_000_000u64})
}

enum Write {
    Index(&'static str, Value),
    Delete(&'static str),
}

/// Writes as the sink does (the id, the body with its metadata) and refreshes.
async fn write(search: &Elasticsearch, alias: &str, writes: Vec<Write>) {
    let mut body: Vec<JsonBody<Value>> = Vec::new();
    for write in writes {
        match write {
            Write::Index(id, document) => {
                body.push(json!({"index": {"_id": id}}).into());
                body.push(document.into());
            }
            Write::Delete(id) => body.push(json!({"delete": {"_id": id}}).into()),
        }
    }
    let response = search
        .bulk(BulkParts::Index(alias))
        .refresh(Refresh::True)
        .body(body)
        .send()
        .await
        .expect("bulk request");
    let result: Value = response.json().await.expect("bulk response");
    assert_eq!(result["errors"], json!(false), "{result}");
}

fn with_metadata(mut document: Value, commit_lsn: u64) -> Value {
    document["walsync"] = metadata(commit_lsn, false);
    document
}

async fn compare(
    postgres: &tokio_postgres::Client,
    search: &Elasticsearch,
    table: &str,
    key_columns: &[String],
    table_config: &TableConfig,
    alias: &str,
    options: ComparisonOptions,
) -> ComparisonReport {
    let target = ComparisonTarget {
        schema: "public",
        table,
        key_columns,
        table_config,
        alias,
    };
    compare_table(postgres, search, &target, &options)
        .await
        .expect("comparison runs")
}

/// The table's rows as the source renders them (numeric as a string, timestamps in UTC ISO
/// 8601, arrays and jsonb as JSON), shaped: `secret` excluded, `title` renamed to `name`.
fn expected_documents() -> Vec<(&'static str, Value)> {
    vec![
        (
            "1",
            json!({"id": 1, "name": "plain", "price": "12.50", "tags": ["a", "b"],
                   "attrs": {"size": {"w": 2, "h": 3}}, "created": "2024-01-02T03:04:05Z"}),
        ),
        (
            "2",
            json!({"id": 2, "name": "quote \" and ünïcode", "price": "0.1", "tags": [],
                   "attrs": {"list": [1, "two", null]}, "created": "2024-06-30T23:59:59.5Z"}),
        ),
        (
            "3",
            json!({"id": 3, "name": null, "price": null, "tags": null,
                   "attrs": null, "created": "infinity"}),
        ),
        (
            "4",
            json!({"id": 4, "name": "four", "price": "1000", "tags": ["x"],
                   "attrs": {}, "created": "1999-12-31T00:00:00Z"}),
        ),
        (
            "5",
            json!({"id": 5, "name": "five", "price": "NaN", "tags": ["NULL"],
                   "attrs": {"n": 5.0}, "created": "2000-01-01T00:00:00Z"}),
        ),
    ]
}

#[tokio::test]
async fn an_index_written_like_the_sink_equals_its_table_and_each_divergence_is_named() {
    let postgres = postgres().await;
    let search = search();
    let (table, alias) = names("sink_compare");
    postgres
        .batch_execute(&format!(
            "CREATE TABLE public.{table} (
                 id int PRIMARY KEY, title text, price numeric, tags text[], attrs jsonb,
                 created timestamptz, secret text);
             INSERT INTO public.{table} VALUES
                 (1, 'plain', 12.50, '{{a,b}}', '{{\"size\": {{\"w\": 2, \"h\": 3}}}}',
                  '2024-01-02 04:04:05+01', 's1'),
                 (2, 'quote \" and ünïcode', 0.1, '{{}}', '{{\"list\": [1, \"two\", null]}}',
                  '2024-06-30 23:59:59.5+00', 's2'),
                 (3, NULL, NULL, NULL, NULL, 'infinity', NULL),
                 (4, 'four', 1e3, '{{x}}', '{{}}', '1999-12-31 00:00:00+00', 's4'),
                 (5, 'five', 'NaN', '{{\"NULL\"}}', '{{\"n\": 5.0}}', '2000-01-01 00:00:00+00', 's5');"
        ))
        .await
        .expect("create and fill the table");
    create_index(&search, &alias).await;
    write(
        &search,
        &alias,
        expected_documents()
            .into_iter()
            .map(|(id, document)| Write::Index(id, with_metadata(document, 1_000)))
            .collect(),
    )
    .await;

    let table_config = TableConfig {
        exclude_columns: vec!["secret".into()],
        rename: [("title".to_owned(), "name".to_owned())].into(),
        ..TableConfig::default()
    };
    let key = vec!["id".to_owned()];
    let options = ComparisonOptions::default();

    let equal = compare(
        &postgres,
        &search,
        &table,
        &key,
        &table_config,
        &alias,
        options,
    )
    .await;
    assert!(equal.is_equal(), "{equal:#?}");
    assert_eq!(equal.table, format!("public.{table}"));
    assert_eq!((equal.rows, equal.documents), (5, 5));

    // Diverge: one field changed, one document deleted, one extra, one soft-tombstoned.
    let mut changed = expected_documents()[1].1.clone();
    changed["name"] = json!("edited behind walsync's back");
    let mut tombstone = expected_documents()[3].1.clone();
    tombstone["walsync"] = metadata(2_000, true);
    write(
        &search,
        &alias,
        vec![
            Write::Index("2", with_metadata(changed, 2_000)),
            Write::Delete("3"),
            Write::Index(
                "99",
                with_metadata(json!({"id": 99, "name": "ghost"}), 2_000),
            ),
            Write::Index("4", tombstone),
        ],
    )
    .await;

    let diverged = compare(
        &postgres,
        &search,
        &table,
        &key,
        &table_config,
        &alias,
        options,
    )
    .await;
    assert!(!diverged.is_equal());
    assert_eq!(diverged.missing, ["3", "4"], "{diverged:#?}");
    assert_eq!(diverged.extra, ["99"], "{diverged:#?}");
    assert_eq!(
        diverged.different,
        [("2".to_owned(), vec!["name".to_owned()])],
        "{diverged:#?}"
    );
    assert_eq!((diverged.rows, diverged.documents), (5, 4));

    // Without the shaping, every document lacks `secret` and has `name` instead of `title`.
    let unshaped = compare(
        &postgres,
        &search,
        &table,
        &key,
        &TableConfig::default(),
        &alias,
        options,
    )
    .await;
    let (_, fields) = unshaped
        .different
        .iter()
        .find(|(id, _)| id == "1")
        .expect("document 1 differs from the unshaped row");
    assert_eq!(fields, &["name", "secret", "title"]);
}

#[tokio::test]
async fn composite_keys_and_documents_newer_than_the_limit() {
    let postgres = postgres().await;
    let search = search();
    let (table, alias) = names("sink_compare_composite");
    postgres
        .batch_execute(&format!(
            "CREATE TABLE public.{table} (shop int, sku text, qty int, PRIMARY KEY (shop, sku));
             INSERT INTO public.{table} VALUES (1, 'a', 10), (1, 'b', 20), (2, 'a', 30);"
        ))
        .await
        .expect("create and fill the table");
    create_index(&search, &alias).await;
    let mut newer_tombstone = json!({"shop": 2, "sku": "a"});
    newer_tombstone["walsync"] = metadata(900, true);
    write(
        &search,
        &alias,
        vec![
            Write::Index(
                "[1,\"a\"]",
                with_metadata(json!({"shop": 1, "sku": "a", "qty": 10}), 100),
            ),
            // Changed by a transaction after the table was read: lag, not divergence.
            Write::Index(
                "[1,\"b\"]",
                with_metadata(json!({"shop": 1, "sku": "b", "qty": 21}), 800),
            ),
            // Deleted after the table was read.
            Write::Index("[2,\"a\"]", newer_tombstone),
        ],
    )
    .await;
    let key = vec!["shop".to_owned(), "sku".to_owned()];
    let table_config = TableConfig::default();

    let limited = compare(
        &postgres,
        &search,
        &table,
        &key,
        &table_config,
        &alias,
        ComparisonOptions {
            max_commit_lsn: Some(500),
            ..ComparisonOptions::default()
        },
    )
    .await;
    assert!(limited.is_equal(), "{limited:#?}");
    assert_eq!(
        (limited.rows, limited.documents, limited.skipped_newer),
        (1, 1, 2)
    );

    let unlimited = compare(
        &postgres,
        &search,
        &table,
        &key,
        &table_config,
        &alias,
        ComparisonOptions::default(),
    )
    .await;
    assert_eq!(unlimited.missing, ["[2,\"a\"]"], "{unlimited:#?}");
    assert_eq!(
        unlimited.different,
        [("[1,\"b\"]".to_owned(), vec!["qty".to_owned()])]
    );
}

#[tokio::test]
async fn a_sample_compares_a_stable_subset() {
    let postgres = postgres().await;
    let search = search();
    let (table, alias) = names("sink_compare_sample");
    postgres
        .batch_execute(&format!(
            "CREATE TABLE public.{table} (id int PRIMARY KEY);
             INSERT INTO public.{table} SELECT generate_series(1, 400);"
        ))
        .await
        .expect("create and fill the table");
    create_index(&search, &alias).await;
    let key = vec!["id".to_owned()];
    let table_config = TableConfig::default();
    let sampled = ComparisonOptions {
        sample_fraction: Some(0.25),
        ..ComparisonOptions::default()
    };

    let first = compare(
        &postgres,
        &search,
        &table,
        &key,
        &table_config,
        &alias,
        sampled,
    )
    .await;
    let second = compare(
        &postgres,
        &search,
        &table,
        &key,
        &table_config,
        &alias,
        sampled,
    )
    .await;
    assert_eq!(first.missing, second.missing, "the same ids every time");
    assert_eq!(first.rows, first.missing.len());
    assert!(
        (50..150).contains(&first.rows),
        "about a quarter of 400 rows, got {}",
        first.rows
    );

    let everything = compare(
        &postgres,
        &search,
        &table,
        &key,
        &table_config,
        &alias,
        ComparisonOptions::default(),
    )
    .await;
    assert_eq!(everything.missing.len(), 400);
}

#[tokio::test]
async fn a_missing_index_and_an_unknown_key_column_are_errors() {
    let postgres = postgres().await;
    let search = search();
    let (table, alias) = names("sink_compare_errors");
    postgres
        .batch_execute(&format!("CREATE TABLE public.{table} (id int PRIMARY KEY)"))
        .await
        .expect("create the table");
    let table_config = TableConfig::default();
    let target = |key_columns| ComparisonTarget {
        schema: "public",
        table: &table,
        key_columns,
        table_config: &table_config,
        alias: &alias,
    };
    let options = ComparisonOptions::default();

    let key = vec!["id".to_owned()];
    let error = compare_table(&postgres, &search, &target(&key), &options)
        .await
        .expect_err("no index");
    assert!(error.to_string().contains(&alias), "{error}");

    create_index(&search, &alias).await;
    let wrong_key = vec!["nope".to_owned()];
    let error = compare_table(&postgres, &search, &target(&wrong_key), &options)
        .await
        .expect_err("no such key column");
    assert!(error.to_string().contains("nope"), "{error}");
}
