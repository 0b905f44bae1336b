//! From a change event to an Elasticsearch document: its `_id` and its body. Pure functions.
//!
//! # Document ids
//!
//! The `_id` comes from the Kafka record key, which is the primary key as a JSON object in key
//! order (`{"shop":1,"sku":"a"}`):
//!
//! - one key column: the value's text — a string as is, a number as its digits exactly as the
//!   source printed them (never re-formatted), a boolean as `true`/`false`, an array (an array
//!   key column) as its compact JSON (`{"id":42}` → `42`, `{"code":"a-1"}` → `a-1`,
//!   `{"k":[3,null]}` → `[3,null]`);
//! - several key columns: the values as a compact JSON array in key order
//!   (`{"shop":1,"sku":"a"}` → `[1,"a"]`), strings escaped the one way serde_json escapes.
//!
//! Every table has exactly one key shape, so the ids within one index are all plain texts or all
//! JSON arrays, and JSON arrays are unambiguous: two different keys never share an id.
//!
//! Elasticsearch limits `_id` to 512 bytes. A longer id is replaced by `sha256:` followed by the
//! 64 hex digits of the SHA-256 of the full id text. SHA-256 is collision-resistant, so hashed ids
//! stay unique in practice; a natural key that itself reads `sha256:<64 hex digits>` would have
//! to be a preimage of another key's hash to collide.
//!
//! Null key values, JSON objects, an empty string id and the empty key object `{}`
//! (the key of a truncate event, never a document) are errors.
//!
//! # Document bodies
//!
//! A body is the event's row image shaped by the table's configuration (`include_columns`, then
//! `exclude_columns`, then `rename`) plus the metadata object under [`METADATA_FIELD`]:
//!
//! ```json
//! {"id": 1, "title": "x",
//!  "walsync": {"commit_lsn": 83886080, "lsn": 83885952, "op": "u", "deleted": false,
//!              "tx_id": 742, "source_ts_ms": 1700000000000}}
//! ```
//!
//! `commit_lsn` is the document's external version, stored again as a queryable `long`
//! (`_version` cannot be queried; truncates delete by it, design invariant 5). A soft tombstone
//! (`deleted: true`) also records the Kafka `partition` its delete came through, so the purge
//! after a table's copy can remove one partition's tombstones at a time. A table field that
//! would be named `walsync` collides with the metadata and is refused: rename the column with
//! `tables."schema.table".rename`.
//!
//! A body is never written from a guess (design invariant 6): an event whose unchanged TOAST
//! columns survive the shaping is refused until the caller has filled them in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use serde_json::value::RawValue;

use crate::config::TableConfig;
use crate::event::{Envelope, EnvelopeOp, RawRow};

/// The field of every document that holds walsync's metadata.
pub const METADATA_FIELD: &str = "walsync";

/// The path of the stored commit LSN, for queries (truncates) and mappings.
pub const COMMIT_LSN_PATH: &str = "walsync.commit_lsn";

/// The path of the stored change LSN (the order within a transaction), for truncates.
pub const LSN_PATH: &str = "walsync.lsn";

/// The path of the soft-tombstone flag, for queries that hide deleted documents.
pub const DELETED_PATH: &str = "walsync.deleted";

/// The path of the Kafka partition a soft tombstone came through: the purge after a copy
/// deletes one partition's tombstones at a time.
pub const PARTITION_PATH: &str = "walsync.partition";

/// Elasticsearch refuses an `_id` longer than this many bytes.
pub const MAX_ID_BYTES: usize = 512;

const HASHED_ID_PREFIX: &str = "sha256:";

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("the record key is not valid JSON: {0}")]
    KeyNotJson(#[source] serde_json::Error),
    #[error("the record key is not a JSON object: {0}")]
    KeyNotObject(String),
    #[error(
        "the record key is the empty object {{}}: that is a truncate event's key, not a document's"
    )]
    EmptyKey,
    #[error("key column {column} is null; key columns must be NOT NULL")]
    NullKeyValue { column: String },
    #[error("key column {column} holds a JSON object, which cannot form an id")]
    NestedKeyValue { column: String },
    #[error(
        "the key's only column {column} is an empty string; Elasticsearch refuses an empty _id"
    )]
    EmptyId { column: String },
    #[error(
        "table {table}: the field name \"{METADATA_FIELD}\" is reserved for walsync's metadata; rename column {column} via tables.\"{table}\".rename = {{ {column} = \"another_name\" }}"
    )]
    MetadataFieldCollision { table: String, column: String },
    #[error(
        "table {table}: columns {first} and {second} would both become field {field}; fix tables.\"{table}\".rename"
    )]
    FieldCollision {
        table: String,
        field: String,
        first: String,
        second: String,
    },
    #[error("table {table}: tables.\"{table}\".rename gives column {column} an empty field name")]
    EmptyFieldName { table: String, column: String },
    #[error(
        "a {op} event has no document body (only c, u and r events carry a row image to index)"
    )]
    NotAnUpsert { op: &'static str },
    #[error("a {op} event arrived without an `after` image")]
    MissingAfter { op: &'static str },
    #[error("a delete event is needed for a soft tombstone, got op {op}")]
    NotADelete { op: &'static str },
    #[error(
        "unchanged TOAST columns {columns:?} have no value yet; fill them (old tuple, the previous change in the batch, or a re-read by key) before writing the document"
    )]
    UnfilledToastColumns { columns: Vec<String> },
}

/// The `_id` of the document a record key stands for. See the module documentation.
pub fn document_id(key_json: &[u8]) -> Result<String, DocumentError> {
    let key = parse_key(key_json)?;
    let columns: Vec<(&str, &RawValue)> = key.iter().collect();
    document_id_of(&columns)
}

/// The `_id` of a row from its key columns' JSON values (raw, as the source wrote them), in key
/// order: the same rule as [`document_id`], for callers that hold the values rather than a
/// record key (the comparison core).
pub fn document_id_of(columns: &[(&str, &RawValue)]) -> Result<String, DocumentError> {
    let id = match columns {
        [] => return Err(DocumentError::EmptyKey),
        [(column, value)] => single_column_id(column, value)?,
        several => composite_id(several)?,
    };
    Ok(bounded_id(id))
}

/// Parses a record key: a JSON object of the key columns, in key order, values raw.
pub fn parse_key(key_json: &[u8]) -> Result<RawRow, DocumentError> {
    let text = std::str::from_utf8(key_json).map_err(|error| {
        DocumentError::KeyNotJson(<serde_json::Error as serde::de::Error>::custom(error))
    })?;
    let raw: Box<RawValue> = serde_json::from_str(text).map_err(DocumentError::KeyNotJson)?;
    if !raw.get().trim_start().starts_with('{') {
        return Err(DocumentError::KeyNotObject(raw.get().to_owned()));
    }
    serde_json::from_str(raw.get()).map_err(DocumentError::KeyNotJson)
}

/// A key value's kind, read off its first character (the value is valid JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyValueKind {
    String,
    Scalar,
    /// An array key column's value: its compact JSON text, as the source wrote it.
    Array,
    Null,
    Object,
}

fn key_value_kind(value: &RawValue) -> KeyValueKind {
    match value.get().trim_start().as_bytes().first() {
        Some(b'"') => KeyValueKind::String,
        Some(b'n') => KeyValueKind::Null,
        Some(b'[') => KeyValueKind::Array,
        Some(b'{') => KeyValueKind::Object,
        _ => KeyValueKind::Scalar,
    }
}

fn single_column_id(column: &str, value: &RawValue) -> Result<String, DocumentError> {
    let id = match check_key_value(column, value)? {
        KeyValueKind::String => {
            serde_json::from_str::<String>(value.get()).map_err(DocumentError::KeyNotJson)?
        }
        // A number keeps its digits exactly as the source printed them; true/false as is.
        _ => value.get().trim().to_owned(),
    };
    if id.is_empty() {
        return Err(DocumentError::EmptyId {
            column: column.to_owned(),
        });
    }
    Ok(id)
}

fn composite_id(columns: &[(&str, &RawValue)]) -> Result<String, DocumentError> {
    let mut id = String::from("[");
    for (position, (column, value)) in columns.iter().enumerate() {
        let kind = check_key_value(column, value)?;
        if position > 0 {
            id.push(',');
        }
        match kind {
            // Re-escaped the one way serde_json escapes, so the id never depends on how the
            // key's writer chose to escape.
            KeyValueKind::String => {
                let text: String =
                    serde_json::from_str(value.get()).map_err(DocumentError::KeyNotJson)?;
                id.push_str(&serde_json::to_string(&text).unwrap_or_default());
            }
            _ => id.push_str(value.get().trim()),
        }
    }
    id.push(']');
    Ok(id)
}

/// Scalars and arrays form ids: a null would make different rows share one, and an object has
/// no canonical text (an array key's text is the source's compact rendering, one per value).
fn check_key_value(column: &str, value: &RawValue) -> Result<KeyValueKind, DocumentError> {
    match key_value_kind(value) {
        KeyValueKind::Null => Err(DocumentError::NullKeyValue {
            column: column.to_owned(),
        }),
        KeyValueKind::Object => Err(DocumentError::NestedKeyValue {
            column: column.to_owned(),
        }),
        kind => Ok(kind),
    }
}

/// Keeps an id within Elasticsearch's limit by hashing it when it is too long.
fn bounded_id(id: String) -> String {
    if id.len() <= MAX_ID_BYTES {
        return id;
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut hashed = String::with_capacity(HASHED_ID_PREFIX.len() + 64);
    hashed.push_str(HASHED_ID_PREFIX);
    for byte in digest.iter() {
        // Writing to a String cannot fail.
        let _ = write!(hashed, "{byte:02x}");
    }
    hashed
}

/// How a table's rows become documents: which columns are kept and what their fields are
/// called. Built once per table from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentShape {
    table: String,
    /// Empty means every column.
    include: BTreeSet<String>,
    exclude: BTreeSet<String>,
    rename: BTreeMap<String, String>,
}

impl DocumentShape {
    /// The shape of table `table` (`schema.table`, used in error messages). Refuses
    /// configurations that would make two columns share a field or touch the metadata field;
    /// collisions with columns the configuration does not name are caught per row by
    /// [`DocumentShape::apply`].
    pub fn new(table: &str, config: &TableConfig) -> Result<Self, DocumentError> {
        let shape = Self {
            table: table.to_owned(),
            include: config.include_columns.iter().cloned().collect(),
            exclude: config.exclude_columns.iter().cloned().collect(),
            rename: config.rename.clone(),
        };
        shape.check_configured_fields()?;
        Ok(shape)
    }

    /// Checks the field names that the configuration alone determines.
    fn check_configured_fields(&self) -> Result<(), DocumentError> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        let named_columns = self.include.iter().chain(self.rename.keys());
        for column in named_columns.filter(|column| self.keeps(column)) {
            let field = self.field_name(column);
            self.check_field(column, field)?;
            match fields.insert(field, column) {
                Some(first) if first != column => {
                    return Err(self.field_collision(field, first, column));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether a column reaches the document.
    pub fn keeps(&self, column: &str) -> bool {
        (self.include.is_empty() || self.include.contains(column)) && !self.exclude.contains(column)
    }

    /// The document field a kept column is written to.
    pub fn field_name<'a>(&'a self, column: &'a str) -> &'a str {
        self.rename.get(column).map_or(column, String::as_str)
    }

    /// The row as document fields: unkept columns dropped, renamed columns renamed, values
    /// untouched. Errors when a field would be named [`METADATA_FIELD`] or two columns would
    /// share one field.
    pub fn apply(&self, row: &RawRow) -> Result<RawRow, DocumentError> {
        let mut document = RawRow::default();
        let mut sources: BTreeMap<&str, &str> = BTreeMap::new();
        for (column, value) in row.iter() {
            if !self.keeps(column) {
                continue;
            }
            let field = self.field_name(column);
            self.check_field(column, field)?;
            if let Some(first) = sources.insert(field, column) {
                return Err(self.field_collision(field, first, column));
            }
            document.insert(field.to_owned(), value.to_owned());
        }
        Ok(document)
    }

    /// The unchanged TOAST columns of an event that this shape keeps: the values the caller
    /// must fill in before [`document_body`] accepts the event. Excluded columns need no value.
    pub fn unfilled_columns<'e>(&self, envelope: &'e Envelope) -> Vec<&'e str> {
        envelope
            .unchanged_toast_columns
            .iter()
            .map(String::as_str)
            .filter(|column| self.keeps(column))
            .collect()
    }

    fn check_field(&self, column: &str, field: &str) -> Result<(), DocumentError> {
        if field == METADATA_FIELD {
            return Err(DocumentError::MetadataFieldCollision {
                table: self.table.clone(),
                column: column.to_owned(),
            });
        }
        if field.is_empty() {
            return Err(DocumentError::EmptyFieldName {
                table: self.table.clone(),
                column: column.to_owned(),
            });
        }
        Ok(())
    }

    fn field_collision(&self, field: &str, first: &str, second: &str) -> DocumentError {
        DocumentError::FieldCollision {
            table: self.table.clone(),
            field: field.to_owned(),
            first: first.to_owned(),
            second: second.to_owned(),
        }
    }
}

/// The metadata object every document carries under [`METADATA_FIELD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DocumentMetadata {
    /// The document's version: the commit LSN of the transaction (snapshot rows: `cp − 1`).
    pub commit_lsn: u64,
    /// The LSN of the change record itself.
    pub lsn: u64,
    /// `c`, `u`, `r` or `d`.
    pub op: &'static str,
    /// A soft tombstone: the row was deleted.
    pub deleted: bool,
    pub tx_id: u64,
    /// The commit time in PostgreSQL, in milliseconds since the epoch.
    pub source_ts_ms: i64,
    /// Soft tombstones only: the partition of the table's topic the delete came through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
}

impl DocumentMetadata {
    pub fn of(envelope: &Envelope) -> Self {
        let source = &envelope.source;
        Self {
            commit_lsn: source.commit_lsn,
            lsn: source.lsn,
            op: envelope.op.code(),
            deleted: envelope.op == EnvelopeOp::Delete,
            tx_id: source.tx_id,
            source_ts_ms: source.ts_ms,
            partition: None,
        }
    }

    /// The mapping of the metadata object, for the indices walsync creates. `commit_lsn` must
    /// be a `long`: truncates delete by it.
    pub fn mapping() -> Value {
        serde_json::json!({
            "properties": {
                "commit_lsn": {"type": "long"},
                "lsn": {"type": "long"},
                "op": {"type": "keyword"},
                "deleted": {"type": "boolean"},
                "tx_id": {"type": "long"},
                "source_ts_ms": {"type": "long"},
                "partition": {"type": "integer"}
            }
        })
    }

    #[cfg(test)]
    fn to_value(self) -> Value {
        // A struct of numbers, booleans and a static string always serializes.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The body of the document a create, update or snapshot-read event writes: the shaped
/// `after` image plus the metadata. Refuses events whose kept unchanged TOAST columns are not
/// filled in yet. Values are copied byte for byte.
pub fn document_body(shape: &DocumentShape, envelope: &Envelope) -> Result<Vec<u8>, DocumentError> {
    let op = envelope.op;
    if !matches!(
        op,
        EnvelopeOp::Create | EnvelopeOp::Update | EnvelopeOp::Read
    ) {
        return Err(DocumentError::NotAnUpsert { op: op.code() });
    }
    let unfilled = shape.unfilled_columns(envelope);
    if !unfilled.is_empty() {
        return Err(DocumentError::UnfilledToastColumns {
            columns: unfilled.into_iter().map(str::to_owned).collect(),
        });
    }
    let after = envelope
        .after
        .as_ref()
        .ok_or(DocumentError::MissingAfter { op: op.code() })?;
    let document = shape.apply(after)?;
    Ok(with_metadata(&document, DocumentMetadata::of(envelope)))
}

/// The body of a soft tombstone for a delete event that came through `partition`: the shaped
/// key columns plus the metadata with `deleted: true` and the partition. The key columns come
/// from the record key (the same values as the delete's `before` image, whatever the table's
/// replica identity), so a tombstone never keeps the rest of a deleted row.
pub fn soft_tombstone_body(
    shape: &DocumentShape,
    key_json: &[u8],
    envelope: &Envelope,
    partition: i32,
) -> Result<Vec<u8>, DocumentError> {
    if envelope.op != EnvelopeOp::Delete {
        return Err(DocumentError::NotADelete {
            op: envelope.op.code(),
        });
    }
    let key = parse_key(key_json)?;
    let document = shape.apply(&key)?;
    let metadata = DocumentMetadata {
        partition: Some(partition),
        ..DocumentMetadata::of(envelope)
    };
    Ok(with_metadata(&document, metadata))
}

/// The document's fields, byte for byte, then the metadata object.
fn with_metadata(document: &RawRow, metadata: DocumentMetadata) -> Vec<u8> {
    let mut body = document.to_json();
    body.pop(); // the closing brace
    if !document.is_empty() {
        body.push(b',');
    }
    body.push(b'"');
    body.extend_from_slice(METADATA_FIELD.as_bytes());
    body.extend_from_slice(b"\":");
    // A struct of numbers, booleans and a static string always serializes.
    let _ = serde_json::to_writer(&mut body, &metadata);
    body.push(b'}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(op: &str, before: Value, after: Value) -> Envelope {
        let value = json!({
            "before": before,
            "after": after,
            "op": op,
            "ts_ms": 5,
            "source": {
                "version": "0.1.0", "connector": "walsync", "name": "shop", "db": "shop",
                "schema": "public", "table": "products", "txId": 742, "lsn": 4000,
                "commit_lsn": 4096, "ts_ms": 1_700_000_000_000_i64, "snapshot": "false",
                "system_id": "73", "timeline": 1
            }
        });
        Envelope::parse(&serde_json::to_vec(&value).unwrap()).unwrap()
    }

    fn shape(config: TableConfig) -> DocumentShape {
        DocumentShape::new("public.products", &config).unwrap()
    }

    fn parse(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    fn raw(value: Value) -> RawRow {
        serde_json::from_str(&value.to_string()).unwrap()
    }

    fn value(row: &RawRow) -> Value {
        serde_json::from_slice(&row.to_json()).unwrap()
    }

    #[test]
    fn a_single_column_key_is_its_plain_text() {
        assert_eq!(document_id(br#"{"id":42}"#).unwrap(), "42");
        assert_eq!(document_id(br#"{"id":-7}"#).unwrap(), "-7");
        assert_eq!(document_id(br#"{"code":"a-1"}"#).unwrap(), "a-1");
        assert_eq!(document_id(br#"{"flag":true}"#).unwrap(), "true");
        assert_eq!(
            document_id(br#"{"id":"550e8400-e29b-41d4-a716-446655440000"}"#).unwrap(),
            "550e8400-e29b-41d4-a716-446655440000"
        );
        assert_eq!(document_id(br#"{"name":"qu\"ote"}"#).unwrap(), "qu\"ote");
    }

    #[test]
    fn a_composite_key_is_a_compact_json_array_in_key_order() {
        assert_eq!(
            document_id(br#"{"shop":1,"sku":"a"}"#).unwrap(),
            r#"[1,"a"]"#
        );
        assert_eq!(
            document_id(br#"{"sku":"a","shop":1}"#).unwrap(),
            r#"["a",1]"#,
            "key order is the record key's order, not alphabetical"
        );
        assert_ne!(
            document_id(br#"{"a":"1,2","b":"3"}"#).unwrap(),
            document_id(br#"{"a":"1","b":"2,3"}"#).unwrap(),
            "separators inside values cannot make two keys collide"
        );
    }

    #[test]
    fn ids_longer_than_512_bytes_are_hashed_and_stay_distinct() {
        let exactly_512 = "x".repeat(512);
        let key = json!({ "id": exactly_512 }).to_string();
        assert_eq!(document_id(key.as_bytes()).unwrap(), exactly_512);

        let long_a = json!({ "id": "a".repeat(600) }).to_string();
        let long_b = json!({ "id": "b".repeat(600) }).to_string();
        let id_a = document_id(long_a.as_bytes()).unwrap();
        let id_b = document_id(long_b.as_bytes()).unwrap();
        assert!(id_a.starts_with("sha256:"), "{id_a}");
        assert_eq!(id_a.len(), "sha256:".len() + 64);
        assert!(
            id_a["sha256:".len()..]
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        );
        assert_ne!(id_a, id_b);
        assert_eq!(
            id_a,
            document_id(long_a.as_bytes()).unwrap(),
            "deterministic"
        );
    }

    #[test]
    fn the_hash_is_sha256_of_the_full_id_text() {
        // SHA-256("abc"), the FIPS 180-2 test vector, checks the digest and the hex formatting.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let digest = Sha256::digest(b"abc");
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(hex, expected);
        let long = "é".repeat(300); // 600 bytes, 300 characters: the limit counts bytes
        let id = document_id(json!({ "id": long }).to_string().as_bytes()).unwrap();
        let full: String = Sha256::digest(long.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        assert_eq!(id, format!("sha256:{full}"));
    }

    #[test]
    fn keys_that_cannot_form_an_id_are_errors() {
        assert!(matches!(document_id(b"{}"), Err(DocumentError::EmptyKey)));
        assert!(matches!(
            document_id(br#"{"id":null}"#),
            Err(DocumentError::NullKeyValue { column }) if column == "id"
        ));
        assert!(matches!(
            document_id(br#"{"a":1,"b":null}"#),
            Err(DocumentError::NullKeyValue { column }) if column == "b"
        ));
        assert!(matches!(
            document_id(br#"{"id":{"x":1}}"#),
            Err(DocumentError::NestedKeyValue { .. })
        ));
        assert_eq!(document_id(br#"{"a":1,"b":[1,2]}"#).unwrap(), "[1,[1,2]]");
        assert_eq!(document_id(br#"{"k":[3,null]}"#).unwrap(), "[3,null]");
        assert!(matches!(
            document_id(br#"{"code":""}"#),
            Err(DocumentError::EmptyId { .. })
        ));
        assert!(matches!(
            document_id(b"[1]"),
            Err(DocumentError::KeyNotObject(_))
        ));
        assert!(matches!(
            document_id(b"not json"),
            Err(DocumentError::KeyNotJson(_))
        ));
    }

    #[test]
    fn the_shape_includes_then_excludes_then_renames() {
        let shape = shape(TableConfig {
            include_columns: vec!["id".into(), "title".into(), "secret".into()],
            exclude_columns: vec!["secret".into()],
            rename: [("title".to_owned(), "name".to_owned())].into(),
            ..TableConfig::default()
        });
        let row = raw(json!({"id": 1, "title": "x", "secret": "s", "price": 3}));
        let document = shape.apply(&row).unwrap();
        assert_eq!(value(&document), json!({"id": 1, "name": "x"}));
    }

    #[test]
    fn an_empty_configuration_keeps_every_column_in_order() {
        let shape = shape(TableConfig::default());
        let row = raw(json!({"b": 1, "a": null, "c": [1]}));
        let document = shape.apply(&row).unwrap();
        assert_eq!(document, row);
        assert_eq!(
            document.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            ["b", "a", "c"],
            "column order is kept"
        );
    }

    #[test]
    fn a_column_named_like_the_metadata_field_must_be_renamed() {
        let unconfigured = shape(TableConfig::default());
        let row = raw(json!({"id": 1, "walsync": "x"}));
        let error = unconfigured.apply(&row).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("tables.\"public.products\".rename"),
            "{error}"
        );

        let renamed = shape(TableConfig {
            rename: [("walsync".to_owned(), "walsync_column".to_owned())].into(),
            ..TableConfig::default()
        });
        let document = renamed.apply(&row).unwrap();
        assert_eq!(document.get("walsync_column").unwrap().get(), "\"x\"");

        let excluded = shape(TableConfig {
            exclude_columns: vec!["walsync".into()],
            ..TableConfig::default()
        });
        assert!(excluded.apply(&row).unwrap().get("walsync").is_none());
    }

    #[test]
    fn configurations_that_collide_are_refused_up_front() {
        let into_metadata = TableConfig {
            rename: [("note".to_owned(), "walsync".to_owned())].into(),
            ..TableConfig::default()
        };
        assert!(matches!(
            DocumentShape::new("public.t", &into_metadata),
            Err(DocumentError::MetadataFieldCollision { .. })
        ));
        let included_metadata = TableConfig {
            include_columns: vec!["walsync".into()],
            ..TableConfig::default()
        };
        let error = DocumentShape::new("public.t", &included_metadata).unwrap_err();
        assert!(error.to_string().contains("tables.\"public.t\".rename"));
        let two_into_one = TableConfig {
            rename: [
                ("a".to_owned(), "same".to_owned()),
                ("b".to_owned(), "same".to_owned()),
            ]
            .into(),
            ..TableConfig::default()
        };
        assert!(matches!(
            DocumentShape::new("public.t", &two_into_one),
            Err(DocumentError::FieldCollision { .. })
        ));
        let onto_included = TableConfig {
            include_columns: vec!["a".into(), "b".into()],
            rename: [("a".to_owned(), "b".to_owned())].into(),
            ..TableConfig::default()
        };
        assert!(matches!(
            DocumentShape::new("public.t", &onto_included),
            Err(DocumentError::FieldCollision { .. })
        ));
        let empty_name = TableConfig {
            rename: [("a".to_owned(), String::new())].into(),
            ..TableConfig::default()
        };
        assert!(matches!(
            DocumentShape::new("public.t", &empty_name),
            Err(DocumentError::EmptyFieldName { .. })
        ));
    }

    #[test]
    fn a_rename_onto_an_unconfigured_column_is_caught_per_row() {
        let shape = shape(TableConfig {
            rename: [("a".to_owned(), "b".to_owned())].into(),
            ..TableConfig::default()
        });
        let row = raw(json!({"a": 1, "b": 2}));
        assert!(matches!(
            shape.apply(&row),
            Err(DocumentError::FieldCollision { field, .. }) if field == "b"
        ));
    }

    #[test]
    fn a_document_body_is_the_shaped_after_image_plus_metadata() {
        let shape = shape(TableConfig {
            exclude_columns: vec!["secret".into()],
            ..TableConfig::default()
        });
        let event = envelope(
            "u",
            Value::Null,
            json!({"id": 1, "title": "x", "secret": "s"}),
        );
        let body = parse(&document_body(&shape, &event).unwrap());
        assert_eq!(
            body,
            json!({
                "id": 1,
                "title": "x",
                "walsync": {
                    "commit_lsn": 4096, "lsn": 4000, "op": "u", "deleted": false,
                    "tx_id": 742, "source_ts_ms": 1_700_000_000_000_i64
                }
            })
        );
        for (op, code) in [("c", "c"), ("r", "r")] {
            let event = envelope(op, Value::Null, json!({"id": 1}));
            let body = parse(&document_body(&shape, &event).unwrap());
            assert_eq!(body[METADATA_FIELD]["op"], code);
        }
    }

    #[test]
    fn a_document_body_is_a_single_ndjson_line() {
        let shape = shape(TableConfig::default());
        let event = envelope("c", Value::Null, json!({"id": 1, "note": "two\nlines"}));
        let body = document_body(&shape, &event).unwrap();
        assert!(!body.contains(&b'\n'));
    }

    #[test]
    fn unfilled_toast_columns_are_refused_unless_excluded() {
        let mut event = envelope("u", Value::Null, json!({"id": 1}));
        event.unchanged_toast_columns = vec!["description".into()];
        let keeps_everything = shape(TableConfig::default());
        assert!(matches!(
            document_body(&keeps_everything, &event),
            Err(DocumentError::UnfilledToastColumns { columns }) if columns == ["description"]
        ));
        assert_eq!(keeps_everything.unfilled_columns(&event), ["description"]);

        let excludes_it = shape(TableConfig {
            exclude_columns: vec!["description".into()],
            ..TableConfig::default()
        });
        assert!(excludes_it.unfilled_columns(&event).is_empty());
        let body = parse(&document_body(&excludes_it, &event).unwrap());
        assert!(body.get("description").is_none());
    }

    #[test]
    fn deletes_and_truncates_have_no_document_body() {
        let shape = shape(TableConfig::default());
        let delete = envelope("d", json!({"id": 1}), Value::Null);
        assert!(matches!(
            document_body(&shape, &delete),
            Err(DocumentError::NotAnUpsert { op: "d" })
        ));
        let truncate = envelope("t", Value::Null, Value::Null);
        assert!(matches!(
            document_body(&shape, &truncate),
            Err(DocumentError::NotAnUpsert { op: "t" })
        ));
        let no_after = envelope("u", Value::Null, Value::Null);
        assert!(matches!(
            document_body(&shape, &no_after),
            Err(DocumentError::MissingAfter { .. })
        ));
    }

    #[test]
    fn a_soft_tombstone_keeps_only_the_shaped_key_and_marks_deleted() {
        let shape = shape(TableConfig {
            rename: [("sku".to_owned(), "article".to_owned())].into(),
            ..TableConfig::default()
        });
        // REPLICA IDENTITY FULL: `before` carries the whole row; the tombstone keeps the key.
        let delete = envelope(
            "d",
            json!({"shop": 1, "sku": "a", "description": "long"}),
            Value::Null,
        );
        let body = soft_tombstone_body(&shape, br#"{"shop":1,"sku":"a"}"#, &delete, 2).unwrap();
        assert_eq!(
            parse(&body),
            json!({
                "shop": 1,
                "article": "a",
                "walsync": {
                    "commit_lsn": 4096, "lsn": 4000, "op": "d", "deleted": true,
                    "tx_id": 742, "source_ts_ms": 1_700_000_000_000_i64, "partition": 2
                }
            })
        );
        let update = envelope("u", Value::Null, json!({"shop": 1, "sku": "a"}));
        assert!(matches!(
            soft_tombstone_body(&shape, br#"{"shop":1,"sku":"a"}"#, &update, 0),
            Err(DocumentError::NotADelete { op: "u" })
        ));
    }

    #[test]
    fn the_metadata_mapping_covers_every_metadata_field() {
        let event = envelope("c", Value::Null, json!({"id": 1}));
        let Value::Object(metadata) = DocumentMetadata::of(&event).to_value() else {
            panic!("metadata is an object")
        };
        let mapping = DocumentMetadata::mapping();
        for field in metadata.keys() {
            assert!(mapping["properties"].get(field).is_some(), "{field}");
        }
        assert_eq!(mapping["properties"]["commit_lsn"]["type"], "long");
        assert_eq!(COMMIT_LSN_PATH, format!("{METADATA_FIELD}.commit_lsn"));
        assert_eq!(DELETED_PATH, format!("{METADATA_FIELD}.deleted"));
        assert_eq!(PARTITION_PATH, format!("{METADATA_FIELD}.partition"));
        assert_eq!(mapping["properties"]["partition"]["type"], "integer");
    }

    #[test]
    fn ids_from_values_follow_the_same_rule_as_ids_from_keys() {
        let shop = RawValue::from_string("1".into()).unwrap();
        let sku = RawValue::from_string("\"a\"".into()).unwrap();
        assert_eq!(
            document_id_of(&[("shop", &shop), ("sku", &sku)]).unwrap(),
            document_id(br#"{"shop":1,"sku":"a"}"#).unwrap()
        );
        assert_eq!(document_id_of(&[("sku", &sku)]).unwrap(), "a");
    }

    #[test]
    fn key_numbers_keep_their_digits_in_ids() {
        assert_eq!(
            document_id(br#"{"f":0.9407462388099621}"#).unwrap(),
            "0.9407462388099621"
        );
        assert_eq!(
            document_id(br#"{"f":0.9407462388099621,"n":123456789012345678901234567890}"#).unwrap(),
            "[0.9407462388099621,123456789012345678901234567890]"
        );
        assert_eq!(
            document_id(br#"{"a":"x\u00e9","b":"q\""}"#).unwrap(),
            "[\"x\u{e9}\",\"q\\\"\"]",
            "strings are re-escaped the one way serde_json escapes"
        );
    }

    #[test]
    fn a_document_body_copies_values_byte_for_byte() {
        let shape = shape(TableConfig::default());
        let payload = br#"{"before":null,"after":{"id":1,"f":0.9407462388099621,"j":{"n": 0.90372028726197960001}},"op":"c","ts_ms":5,"source":{"schema":"public","table":"products","txId":1,"lsn":4000,"commit_lsn":4096,"ts_ms":1,"snapshot":"false","system_id":"73","timeline":1}}"#;
        let event = Envelope::parse(payload).unwrap();
        let body = String::from_utf8(document_body(&shape, &event).unwrap()).unwrap();
        assert!(
            body.starts_with(
                r#"{"id":1,"f":0.9407462388099621,"j":{"n": 0.90372028726197960001},"walsync":{"#
            ),
            "{body}"
        );
    }
}
