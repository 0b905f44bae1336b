//! Index management against the real search server: the alias, `gc_deletes`, the mapping and
//! the recorded system identifier, and what the default mapping accepts and refuses.
//!
//! These tests need `make stack-up` (or run them through `make test`).

mod common;

use common::{stack, unique_name};
use elasticsearch::http::request::JsonBody;
use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesGetAliasParts, IndicesGetMappingParts,
    IndicesGetSettingsParts,
};
use elasticsearch::params::Refresh;
use elasticsearch::{BulkParts, Elasticsearch};
use serde_json::{Value, json};
use walsync::config::ElasticsearchConfig;
use walsync::sink::index::{self, EnsuredIndex, IndexError};

const SYSTEM_ID: &str = "7412345678901234567";

fn client() -> Elasticsearch {
    index::build_client(&ElasticsearchConfig {
        url: stack().es_url.clone(),
        ..ElasticsearchConfig::default()
    })
    .expect("a client for ES_URL")
}

/// One node: replicas would never be assigned, so the tests override them (the code keeps the
/// server's default).
fn single_node_settings() -> Value {
    json!({"index": {"number_of_replicas": 0}})
}

async fn ensure(
    client: &Elasticsearch,
    alias: &str,
    system_id: &str,
) -> Result<EnsuredIndex, IndexError> {
    let settings = single_node_settings();
    index::ensure_index(client, alias, system_id, Some(&settings), None, "15m").await
}

async fn get_json(response: elasticsearch::http::response::Response) -> Value {
    assert!(
        response.status_code().is_success(),
        "{:?}",
        response.text().await
    );
    response.json().await.expect("a JSON response")
}

async fn delete_index(client: &Elasticsearch, index: &str) {
    let _ = client
        .indices()
        .delete(IndicesDeleteParts::Index(&[index]))
        .send()
        .await;
}

/// Indexes documents as one bulk with refresh, and returns the bulk items.
async fn bulk_index(
    client: &Elasticsearch,
    alias: &str,
    documents: &[(&str, Value)],
) -> Vec<Value> {
    let mut body: Vec<JsonBody<Value>> = Vec::new();
    for (id, document) in documents {
        body.push(json!({"index": {"_id": id}}).into());
        body.push(document.clone().into());
    }
    let response = client
        .bulk(BulkParts::Index(alias))
        .refresh(Refresh::True)
        .body(body)
        .send()
        .await
        .expect("bulk request");
    let result = get_json(response).await;
    result["items"]
        .as_array()
        .expect("bulk items")
        .iter()
        .map(|item| item["index"].clone())
        .collect()
}

fn metadata(commit_lsn: u64) -> Value {
    json!({"commit_lsn": commit_lsn, "lsn": commit_lsn - 8, "op": "c", "deleted": false,
           "tx_id": 7, "source_ts_ms": 1_700_000_000_000u64})
}

#[tokio::test]
async fn a_new_index_gets_its_alias_gc_deletes_mapping_and_system_id() {
    let client = client();
    let alias = unique_name("walsync-index-new");

    let ensured = ensure(&client, &alias, SYSTEM_ID).await.expect("ensure");
    assert_eq!(
        ensured,
        EnsuredIndex {
            alias: alias.clone(),
            index: format!("{alias}_v1"),
            created: true
        }
    );

    let aliases = get_json(
        client
            .indices()
            .get_alias(IndicesGetAliasParts::Name(&[&alias]))
            .send()
            .await
            .expect("get alias"),
    )
    .await;
    assert!(
        aliases[&ensured.index]["aliases"].get(&alias).is_some(),
        "{aliases}"
    );

    let settings = get_json(
        client
            .indices()
            .get_settings(IndicesGetSettingsParts::Index(&[&ensured.index]))
            .send()
            .await
            .expect("get settings"),
    )
    .await;
    let index_settings = &settings[&ensured.index]["settings"]["index"];
    assert_eq!(index_settings["gc_deletes"], json!("15m"), "{settings}");
    assert_eq!(
        index_settings["number_of_replicas"],
        json!("0"),
        "{settings}"
    );

    let mappings = get_json(
        client
            .indices()
            .get_mapping(IndicesGetMappingParts::Index(&[&alias]))
            .send()
            .await
            .expect("get mapping"),
    )
    .await;
    let mapping = &mappings[&ensured.index]["mappings"];
    assert_eq!(mapping["_meta"]["walsync"]["system_id"], json!(SYSTEM_ID));
    assert!(
        mapping["_meta"]["walsync"]["created_by"]
            .as_str()
            .is_some_and(|text| text.starts_with("walsync ")),
        "{mapping}"
    );
    assert_eq!(mapping["date_detection"], json!(false));
    assert_eq!(mapping["numeric_detection"], json!(false));
    let metadata_fields = &mapping["properties"]["walsync"]["properties"];
    for (field, kind) in [
        ("commit_lsn", "long"),
        ("lsn", "long"),
        ("op", "keyword"),
        ("deleted", "boolean"),
        ("tx_id", "long"),
        ("source_ts_ms", "long"),
    ] {
        assert_eq!(
            metadata_fields[field]["type"],
            json!(kind),
            "{field}: {mapping}"
        );
    }

    delete_index(&client, &ensured.index).await;
}

#[tokio::test]
async fn ensuring_twice_finds_the_same_index() {
    let client = client();
    let alias = unique_name("walsync-index-twice");

    let first = ensure(&client, &alias, SYSTEM_ID)
        .await
        .expect("first ensure");
    let second = ensure(&client, &alias, SYSTEM_ID)
        .await
        .expect("second ensure");
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.index, second.index);

    delete_index(&client, &first.index).await;
}

#[tokio::test]
async fn concurrent_creators_both_end_up_on_one_index() {
    let client = client();
    let alias = unique_name("walsync-index-race");

    let (left, right) = tokio::join!(
        ensure(&client, &alias, SYSTEM_ID),
        ensure(&client, &alias, SYSTEM_ID)
    );
    let (left, right) = (left.expect("left ensure"), right.expect("right ensure"));
    assert!(
        left.created != right.created,
        "exactly one creates: {left:?} {right:?}"
    );
    assert_eq!(left.index, format!("{alias}_v1"));
    assert_eq!(left.index, right.index);

    delete_index(&client, &left.index).await;
}

#[tokio::test]
async fn an_index_from_another_cluster_is_refused_with_the_way_out() {
    let client = client();
    let alias = unique_name("walsync-index-foreign");
    let ensured = ensure(&client, &alias, SYSTEM_ID).await.expect("ensure");

    let error = ensure(&client, &alias, "7499999999999999999")
        .await
        .expect_err("another system identifier must be refused");
    assert!(
        matches!(error, IndexError::ForeignSystem { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    for expected in [
        SYSTEM_ID,
        "7499999999999999999",
        "another PostgreSQL cluster",
        "rejected as stale",
        "silent total loss",
        "backfill --into",
        "swap the alias",
        "delete",
    ] {
        assert!(
            message.contains(expected),
            "missing {expected:?} in: {message}"
        );
    }

    delete_index(&client, &ensured.index).await;
}

#[tokio::test]
async fn an_index_walsync_did_not_create_is_refused() {
    let client = client();
    let alias = unique_name("walsync-index-foreign-made");
    let index = format!("{alias}_v1");
    let created = client
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(json!({"settings": single_node_settings(), "aliases": {&alias: {}}}))
        .send()
        .await
        .expect("create request");
    get_json(created).await;

    let error = ensure(&client, &alias, SYSTEM_ID)
        .await
        .expect_err("unmanaged");
    assert!(matches!(error, IndexError::Unmanaged { .. }), "{error:?}");

    delete_index(&client, &index).await;
}

#[tokio::test]
async fn a_concrete_index_under_the_alias_name_is_refused() {
    let client = client();
    let name = unique_name("walsync-index-concrete");
    let created = client
        .indices()
        .create(IndicesCreateParts::Index(&name))
        .body(json!({"settings": single_node_settings()}))
        .send()
        .await
        .expect("create request");
    get_json(created).await;

    let error = ensure(&client, &name, SYSTEM_ID)
        .await
        .expect_err("not an alias");
    assert!(matches!(error, IndexError::NotAnAlias { .. }), "{error:?}");

    delete_index(&client, &name).await;
}

#[tokio::test]
async fn the_default_mapping_takes_changing_jsonb_shapes_but_not_a_changing_top_level_type() {
    let client = client();
    let alias = unique_name("walsync-index-mapping");
    let ensured = ensure(&client, &alias, SYSTEM_ID).await.expect("ensure");

    let first = bulk_index(
        &client,
        &alias,
        &[(
            "1",
            json!({"id": 1, "code": "00123", "amount": 5,
                   "payload": {"nested": {"deep": [1, 2, 3]}, "when": "2024-01-02"},
                   "walsync": metadata(100)}),
        )],
    )
    .await;
    assert_eq!(first[0]["status"], json!(201), "{first:?}");

    // The jsonb column changes shape completely, and the numeric-looking string is now text.
    let second = bulk_index(
        &client,
        &alias,
        &[(
            "2",
            json!({"id": 2, "code": "abc", "amount": 6,
                   "payload": {"nested": "now a string", "when": {"a": [{"b": true}]}},
                   "walsync": metadata(200)}),
        )],
    )
    .await;
    assert_eq!(second[0]["status"], json!(201), "{second:?}");

    let mappings = get_json(
        client
            .indices()
            .get_mapping(IndicesGetMappingParts::Index(&[&alias]))
            .send()
            .await
            .expect("get mapping"),
    )
    .await;
    let properties = &mappings[&ensured.index]["mappings"]["properties"];
    assert_eq!(properties["code"]["type"], json!("text"), "{properties}");
    assert_eq!(
        properties["code"]["fields"]["keyword"]["type"],
        json!("keyword")
    );
    assert_eq!(
        properties["payload"]["enabled"],
        json!(false),
        "{properties}"
    );
    assert!(
        properties["payload"].get("properties").is_none(),
        "{properties}"
    );

    // Once mapped as a disabled object, the field takes scalars and arrays too (seen on
    // OpenSearch 2.19: a disabled object's value is not parsed at all).
    let scalar_after_object = bulk_index(
        &client,
        &alias,
        &[
            (
                "4",
                json!({"id": 4, "payload": 5, "walsync": metadata(400)}),
            ),
            (
                "5",
                json!({"id": 5, "payload": [1, "two", null], "walsync": metadata(500)}),
            ),
        ],
    )
    .await;
    assert_eq!(
        scalar_after_object[0]["status"],
        json!(201),
        "{scalar_after_object:?}"
    );
    assert_eq!(
        scalar_after_object[1]["status"],
        json!(201),
        "{scalar_after_object:?}"
    );

    // The limit: a top-level field mapped as a number cannot become an object.
    let third = bulk_index(
        &client,
        &alias,
        &[(
            "3",
            json!({"id": 3, "code": "x", "amount": {"value": 7}, "walsync": metadata(300)}),
        )],
    )
    .await;
    assert_eq!(third[0]["status"], json!(400), "{third:?}");
    let error_type = third[0]["error"]["type"].as_str().unwrap_or_default();
    assert!(
        error_type.contains("parsing_exception"),
        "a per-document mapping error, not {error_type}: {third:?}"
    );

    assert_eq!(index::count(&client, &alias).await.expect("count"), 4);

    delete_index(&client, &ensured.index).await;
}

#[tokio::test]
async fn refresh_makes_writes_countable_and_count_live_skips_soft_tombstones() {
    let client = client();
    let alias = unique_name("walsync-index-count");
    let ensured = ensure(&client, &alias, SYSTEM_ID).await.expect("ensure");

    let mut tombstone = metadata(400);
    tombstone["deleted"] = json!(true);
    tombstone["op"] = json!("d");
    let mut body: Vec<JsonBody<Value>> = Vec::new();
    for (id, document) in [
        ("1", json!({"id": 1, "walsync": metadata(100)})),
        ("2", json!({"id": 2, "walsync": tombstone})),
    ] {
        body.push(json!({"index": {"_id": id}}).into());
        body.push(document.into());
    }
    let written = client
        .bulk(BulkParts::Index(&alias))
        .body(body)
        .send()
        .await
        .expect("bulk");
    assert_eq!(get_json(written).await["errors"], json!(false));

    index::refresh(&client, &alias).await.expect("refresh");
    assert_eq!(index::count(&client, &alias).await.expect("count"), 2);
    assert_eq!(
        index::count_live(&client, &alias)
            .await
            .expect("count live"),
        1
    );

    delete_index(&client, &ensured.index).await;
}
