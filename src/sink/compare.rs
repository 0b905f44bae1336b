//! The comparison core: does an index equal its table?
//!
//! Both sides are turned into the same thing, a map from document id to document body, and
//! compared field by field:
//!
//! - **The table side** is read from PostgreSQL exactly as the source would send it: the
//!   session pins [`SESSION_SETTINGS`], custom types are registered with the codec as the
//!   source registers them, and rows are read with the simple query protocol so every value
//!   arrives in Postgres's text form and goes through [`Codec::write_json`] by its column's
//!   type OID (`pg_attribute.atttypid`). Generated columns are left out, as pgoutput leaves
//!   them out (unless a PostgreSQL 18 publication sets `publish_generated_columns`). Each row is shaped by the table's `include_columns`, `exclude_columns` and
//!   `rename` and keyed by the document id of its key columns.
//! - **The index side** is read with the scroll API (point-in-time search differs between
//!   Elasticsearch and OpenSearch; scroll is shared), 1,000 documents a page. The `walsync`
//!   metadata field is ignored, and soft tombstones (`walsync.deleted: true`) count as absent.
//!
//! Values are compared **exactly**, never through `f64`: both sides are read as raw JSON text
//! and brought to one canonical form ([`canonical_json`]) in which objects are sorted by key,
//! whitespace is gone, strings are re-escaped one way, and every number is an exact decimal
//! (`1.50`, `1.5` and `15e-1` are one number; `0.9407462388099621` and `0.940746238809962` are
//! two). So a one-ulp change of a `float8`, a `numeric` digit or a `jsonb` number beyond `f64`
//! precision is a difference, while field order and spacing are not.
//!
//! # Memory
//!
//! The index is read first into a map from id to a 64-bit hash of the document body (about
//! the id's length plus 60 bytes per document: ~0.8 GB for ten million short ids). The table is
//! then streamed row by row, each row's entry is removed from the map as it is matched, and
//! the entries left at the end are the extra documents. A row whose hash differs is
//! re-fetched from the index in batches (`_mget`) to name the fields that differ, so only the
//! report grows with the number of differences. A sample fraction shrinks the map in
//! proportion: only ids whose hash falls in the sample are kept or compared.
//!
//! # Lag
//!
//! A comparison is not a snapshot of both sides at one instant. With `max_commit_lsn`,
//! documents whose stored commit LSN is above it were written by changes the table read may
//! not reflect; they and their rows are skipped (counted in `skipped_newer`), so a sink that
//! is merely behind or ahead never reads as divergence.
//!
//! The connection passed in keeps the pinned session settings afterwards.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use elasticsearch::{ClearScrollParts, Elasticsearch, MgetParts, ScrollParts, SearchParts};
use futures_util::{TryStreamExt, pin_mut};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};

use crate::config::TableConfig;
use crate::event::{RawRow, raw_value};
use crate::postgres::replication::quote_identifier;
use crate::postgres::types::{Codec, CodecError, CodecOptions, SESSION_SETTINGS};
use crate::sink::document::{DocumentShape, document_id_of};
use crate::sink::index::{IndexError, METADATA_FIELD, success_json, transport_error};

/// Documents per scroll page.
const SCROLL_PAGE_SIZE: usize = 1_000;

/// How long the server keeps a scroll context between two pages.
const SCROLL_KEEP_ALIVE: &str = "5m";

/// Mismatching rows re-fetched from the index per `_mget` request.
const RECHECK_BATCH_SIZE: usize = 500;

/// One table and the alias it is indexed under.
#[derive(Debug, Clone, Copy)]
pub struct ComparisonTarget<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    /// The columns that form the document id, in key order (the primary key, or the table's
    /// configured `key_columns`).
    pub key_columns: &'a [String],
    /// The table's configuration: its include, exclude and rename rules shape the documents.
    pub table_config: &'a TableConfig,
    pub alias: &'a str,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ComparisonOptions {
    /// Compare only ids whose hash falls in this fraction (0 < f ≤ 1) of the hash space. The
    /// hash is stable across runs, so a sample names the same ids every time.
    pub sample_fraction: Option<f64>,
    /// Skip documents (and their rows) whose stored commit LSN is above this.
    pub max_commit_lsn: Option<u64>,
    /// The codec options the source runs with, so values render identically.
    pub codec: CodecOptions,
}

/// What a comparison found. Ids are sorted; so are the field names of each difference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComparisonReport {
    /// `schema.table`.
    pub table: String,
    /// Rows compared (in the sample, not skipped).
    pub rows: usize,
    /// Documents compared (live, in the sample, not skipped).
    pub documents: usize,
    /// Documents, live or tombstoned, skipped because their commit LSN is above
    /// `max_commit_lsn`.
    pub skipped_newer: usize,
    /// Ids of rows the index lacks (or holds only as a soft tombstone).
    pub missing: Vec<String>,
    /// Ids of documents the table has no row for.
    pub extra: Vec<String>,
    /// Ids whose document differs from its row, with the fields that differ.
    pub different: Vec<(String, Vec<String>)>,
}

impl ComparisonReport {
    pub fn is_equal(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("the sample fraction must be above 0 and at most 1, not {0}")]
    InvalidSampleFraction(f64),
    #[error("table {table}: no key columns given; a document id needs at least one")]
    NoKeyColumns { table: String },
    #[error("PostgreSQL: cannot {action}: {source}")]
    Postgres {
        action: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("table {table} does not exist (or has no columns walsync can read)")]
    TableNotFound { table: String },
    #[error("table {table} has no key column {column}")]
    UnknownKeyColumn { table: String, column: String },
    #[error(
        "table {table}: a row has a key column {column} that is null or empty, so it has no \
         document id"
    )]
    NoDocumentId { table: String, column: String },
    #[error("table {table}, column {column}: {source}")]
    Codec {
        table: String,
        column: String,
        source: CodecError,
    },
    #[error("table {table}, column {column}: the codec wrote invalid JSON: {source}")]
    CodecOutput {
        table: String,
        column: String,
        source: serde_json::Error,
    },
    #[error("table {table}: {source}")]
    Document {
        table: String,
        source: crate::sink::document::DocumentError,
    },
    #[error("the index {alias} does not exist")]
    IndexNotFound { alias: String },
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Compares the table with its index. See the module doc for how, and what it costs.
pub async fn compare_table(
    postgres: &tokio_postgres::Client,
    search: &Elasticsearch,
    target: &ComparisonTarget<'_>,
    options: &ComparisonOptions,
) -> Result<ComparisonReport, CompareError> {
    let sample = Sample::new(options.sample_fraction)?;
    let table_name = format!("{}.{}", target.schema, target.table);
    if target.key_columns.is_empty() {
        return Err(CompareError::NoKeyColumns { table: table_name });
    }
    pin_session_settings(postgres).await?;
    let encoder = RowEncoder::new(postgres, target, options.codec).await?;
    let indexed = read_index(search, target.alias, sample, options.max_commit_lsn).await?;
    let mut comparison = Comparison::new(table_name, indexed, options.max_commit_lsn);
    stream_table(
        postgres,
        &encoder,
        sample,
        search,
        target.alias,
        &mut comparison,
    )
    .await?;
    comparison.finish(search, target.alias).await
}

/// The same settings the source pins, so values render exactly as they were streamed.
async fn pin_session_settings(postgres: &tokio_postgres::Client) -> Result<(), CompareError> {
    let statements: String = SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} TO '{value}';"))
        .collect();
    postgres
        .batch_execute(&statements)
        .await
        .map_err(|source| CompareError::Postgres {
            action: "pin the session settings",
            source,
        })
}

// ---------------------------------------------------------------------------------------------
// The table side
// ---------------------------------------------------------------------------------------------

/// A column as the source sees it.
struct Column {
    name: String,
    type_oid: u32,
    /// The document field it becomes; `None` when the shaping drops it.
    field: Option<String>,
}

/// Turns rows of one table into expected documents.
struct RowEncoder {
    table: String,
    codec: Codec,
    columns: Vec<Column>,
    /// Positions of the key columns in `columns`, in key order.
    key_positions: Vec<usize>,
    select: String,
}

/// A row as the sink should have indexed it.
struct ExpectedDocument {
    id: String,
    body: RawRow,
}

impl RowEncoder {
    async fn new(
        postgres: &tokio_postgres::Client,
        target: &ComparisonTarget<'_>,
        codec_options: CodecOptions,
    ) -> Result<Self, CompareError> {
        let table = format!("{}.{}", target.schema, target.table);
        let mut codec = Codec::new(codec_options);
        let custom_types = crate::postgres::catalog::custom_types_of(postgres)
            .await
            .map_err(|source| CompareError::Postgres {
                action: "read pg_type",
                source,
            })?;
        for (oid, kind) in custom_types {
            codec.register(oid, kind);
        }
        let shape = DocumentShape::new(&table, target.table_config).map_err(|source| {
            CompareError::Document {
                table: table.clone(),
                source,
            }
        })?;
        let columns: Vec<Column> = table_columns(postgres, target.schema, target.table)
            .await?
            .into_iter()
            .map(|(name, type_oid)| Column {
                field: shape
                    .keeps(&name)
                    .then(|| shape.field_name(&name).to_owned()),
                name,
                type_oid,
            })
            .collect();
        if columns.is_empty() {
            return Err(CompareError::TableNotFound { table });
        }
        let key_positions = target
            .key_columns
            .iter()
            .map(|key| {
                columns
                    .iter()
                    .position(|column| &column.name == key)
                    .ok_or_else(|| CompareError::UnknownKeyColumn {
                        table: table.clone(),
                        column: key.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let select = select_statement(target.schema, target.table, &columns);
        Ok(Self {
            table,
            codec,
            columns,
            key_positions,
            select,
        })
    }

    fn expected_document(&self, row: &SimpleQueryRow) -> Result<ExpectedDocument, CompareError> {
        let values = self.row_values(row)?;
        let id = self.id_of(&values)?;
        let body = self
            .columns
            .iter()
            .zip(values)
            .filter_map(|(column, value)| Some((column.field.clone()?, value)))
            .collect();
        Ok(ExpectedDocument { id, body })
    }

    /// Every column's JSON value, NULL as `null`.
    fn row_values(&self, row: &SimpleQueryRow) -> Result<Vec<Box<RawValue>>, CompareError> {
        let mut scratch = Vec::with_capacity(64);
        self.columns
            .iter()
            .enumerate()
            .map(|(position, column)| {
                let text = row
                    .try_get(position)
                    .map_err(|source| CompareError::Postgres {
                        action: "read a row",
                        source,
                    })?;
                match text {
                    None => Ok(null()),
                    Some(text) => self.encode(&mut scratch, column, text),
                }
            })
            .collect()
    }

    fn encode(
        &self,
        scratch: &mut Vec<u8>,
        column: &Column,
        text: &str,
    ) -> Result<Box<RawValue>, CompareError> {
        scratch.clear();
        self.codec
            .write_json(scratch, column.type_oid, text.as_bytes())
            .map_err(|source| CompareError::Codec {
                table: self.table.clone(),
                column: column.name.clone(),
                source,
            })?;
        raw_value(scratch.clone()).map_err(|source| CompareError::CodecOutput {
            table: self.table.clone(),
            column: column.name.clone(),
            source,
        })
    }

    fn id_of(&self, values: &[Box<RawValue>]) -> Result<String, CompareError> {
        let key: Vec<(&str, &RawValue)> = self
            .key_positions
            .iter()
            .map(|&position| (self.columns[position].name.as_str(), &*values[position]))
            .collect();
        document_id_of(&key).map_err(|source| CompareError::Document {
            table: self.table.clone(),
            source,
        })
    }
}

/// The table's columns in order, with their type OIDs; generated columns are left out because
/// pgoutput does not send them.
async fn table_columns(
    postgres: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, u32)>, CompareError> {
    let postgres_error = |source| CompareError::Postgres {
        action: "read the table's columns",
        source,
    };
    let version: i32 = postgres
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(postgres_error)?
        .get(0);
    // `attgenerated` exists since PostgreSQL 12.
    let not_generated = if version >= 120_000 {
        "AND a.attgenerated = ''"
    } else {
        ""
    };
    let rows = postgres
        .query(
            &format!(
                "SELECT a.attname::text, a.atttypid
                 FROM pg_attribute a
                 JOIN pg_class c ON c.oid = a.attrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2
                   AND a.attnum > 0 AND NOT a.attisdropped {not_generated}
                 ORDER BY a.attnum"
            ),
            &[&schema, &table],
        )
        .await
        .map_err(postgres_error)?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

fn select_statement(schema: &str, table: &str, columns: &[Column]) -> String {
    let column_list: Vec<String> = columns
        .iter()
        .map(|column| quote_identifier(&column.name))
        .collect();
    format!(
        "SELECT {} FROM {}.{}",
        column_list.join(", "),
        quote_identifier(schema),
        quote_identifier(table)
    )
}

/// Reads the table row by row (the simple query protocol streams; nothing is collected) and
/// feeds each sampled row to the comparison.
async fn stream_table(
    postgres: &tokio_postgres::Client,
    encoder: &RowEncoder,
    sample: Sample,
    search: &Elasticsearch,
    alias: &str,
    comparison: &mut Comparison,
) -> Result<(), CompareError> {
    let read_error = |source| CompareError::Postgres {
        action: "read the table",
        source,
    };
    let messages = postgres
        .simple_query_raw(&encoder.select)
        .await
        .map_err(read_error)?;
    pin_mut!(messages);
    while let Some(message) = messages.try_next().await.map_err(read_error)? {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let expected = encoder.expected_document(&row)?;
        if sample.contains(&expected.id) {
            comparison.compare_row(expected);
            if comparison.pending_rechecks() >= RECHECK_BATCH_SIZE {
                comparison.recheck(search, alias).await?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The index side
// ---------------------------------------------------------------------------------------------

/// One page of a scroll.
#[derive(Deserialize)]
struct ScrollPage {
    #[serde(rename = "_scroll_id")]
    scroll_id: Option<String>,
    hits: HitList,
}

#[derive(Deserialize)]
struct HitList {
    hits: Vec<Hit>,
}

#[derive(Deserialize)]
struct Hit {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "_source", default)]
    source: RawRow,
}

/// What the comparison keeps of one indexed document.
enum IndexedDocument {
    /// A live document and the hash of its body without the metadata field.
    Current { body_hash: u64 },
    /// Written after `max_commit_lsn`: neither it nor its row is compared.
    Newer,
}

/// How one stored document counts.
enum DocumentState {
    Live,
    SoftDeleted,
    Newer,
}

fn document_state(source: &RawRow, max_commit_lsn: Option<u64>) -> DocumentState {
    #[derive(Deserialize, Default)]
    struct Metadata {
        commit_lsn: Option<u64>,
        #[serde(default)]
        deleted: bool,
    }
    let metadata: Metadata = source
        .get(METADATA_FIELD)
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_default();
    if let (Some(limit), Some(commit_lsn)) = (max_commit_lsn, metadata.commit_lsn) {
        if commit_lsn > limit {
            return DocumentState::Newer;
        }
    }
    if metadata.deleted {
        DocumentState::SoftDeleted
    } else {
        DocumentState::Live
    }
}

/// Scrolls through the whole index, keeping a body hash per sampled live document.
async fn read_index(
    search: &Elasticsearch,
    alias: &str,
    sample: Sample,
    max_commit_lsn: Option<u64>,
) -> Result<HashMap<String, IndexedDocument>, CompareError> {
    let response = search
        .search(SearchParts::Index(&[alias]))
        .scroll(SCROLL_KEEP_ALIVE)
        .body(json!({
            "size": SCROLL_PAGE_SIZE,
            "sort": ["_doc"],
            "query": {"match_all": {}}
        }))
        .send()
        .await
        .map_err(|source| transport_error("search", alias, source))?;
    if response.status_code().as_u16() == 404 {
        return Err(CompareError::IndexNotFound {
            alias: alias.to_owned(),
        });
    }
    let mut page: ScrollPage = success_json(response, "search", alias).await?;
    let mut documents = HashMap::new();
    let outcome = loop {
        if page.hits.hits.is_empty() {
            break Ok(());
        }
        for hit in page.hits.hits.drain(..) {
            if sample.contains(&hit.id) {
                keep_document(&mut documents, hit, max_commit_lsn);
            }
        }
        let Some(scroll_id) = page.scroll_id.as_deref() else {
            break Ok(());
        };
        match next_page(search, alias, scroll_id).await {
            Ok(next) => page = next,
            Err(error) => break Err(error),
        }
    };
    if let Some(scroll_id) = page.scroll_id {
        clear_scroll(search, &scroll_id).await;
    }
    outcome.map(|()| documents)
}

fn keep_document(
    documents: &mut HashMap<String, IndexedDocument>,
    hit: Hit,
    max_commit_lsn: Option<u64>,
) {
    let entry = match document_state(&hit.source, max_commit_lsn) {
        DocumentState::SoftDeleted => return,
        DocumentState::Newer => IndexedDocument::Newer,
        DocumentState::Live => IndexedDocument::Current {
            body_hash: body_hash(&hit.source),
        },
    };
    documents.insert(hit.id, entry);
}

async fn next_page(
    search: &Elasticsearch,
    alias: &str,
    scroll_id: &str,
) -> Result<ScrollPage, CompareError> {
    let response = search
        .scroll(ScrollParts::None)
        .body(json!({"scroll": SCROLL_KEEP_ALIVE, "scroll_id": scroll_id}))
        .send()
        .await
        .map_err(|source| transport_error("scroll", alias, source))?;
    Ok(success_json(response, "scroll", alias).await?)
}

/// Frees the server's scroll context early. Failing is harmless: it expires by itself.
async fn clear_scroll(search: &Elasticsearch, scroll_id: &str) {
    let cleared = search
        .clear_scroll(ClearScrollParts::None)
        .body(json!({"scroll_id": [scroll_id]}))
        .send()
        .await;
    if let Err(error) = cleared {
        tracing::debug!(%error, "clearing a scroll context failed; it expires by itself");
    }
}

/// The documents of `ids` as stored now; absent ids are missing from the result.
async fn fetch_documents(
    search: &Elasticsearch,
    alias: &str,
    ids: &[&str],
) -> Result<HashMap<String, RawRow>, CompareError> {
    #[derive(Deserialize)]
    struct MgetResponse {
        docs: Vec<MgetDocument>,
    }
    #[derive(Deserialize)]
    struct MgetDocument {
        #[serde(rename = "_id")]
        id: String,
        #[serde(default)]
        found: bool,
        #[serde(rename = "_source", default)]
        source: RawRow,
    }
    let response = search
        .mget(MgetParts::Index(alias))
        .body(json!({"ids": ids}))
        .send()
        .await
        .map_err(|source| transport_error("mget", alias, source))?;
    let fetched: MgetResponse = success_json(response, "mget", alias).await?;
    Ok(fetched
        .docs
        .into_iter()
        .filter(|document| document.found)
        .map(|document| (document.id, document.source))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Comparing
// ---------------------------------------------------------------------------------------------

/// The running comparison: the index side not matched yet, and the report so far.
struct Comparison {
    report: ComparisonReport,
    unmatched: HashMap<String, IndexedDocument>,
    /// Rows whose body hash differed, to be re-fetched and compared field by field.
    rechecks: Vec<ExpectedDocument>,
    max_commit_lsn: Option<u64>,
}

impl Comparison {
    fn new(
        table: String,
        indexed: HashMap<String, IndexedDocument>,
        max_commit_lsn: Option<u64>,
    ) -> Self {
        let report = ComparisonReport {
            table,
            documents: indexed
                .values()
                .filter(|document| matches!(document, IndexedDocument::Current { .. }))
                .count(),
            skipped_newer: indexed
                .values()
                .filter(|document| matches!(document, IndexedDocument::Newer))
                .count(),
            ..ComparisonReport::default()
        };
        Self {
            report,
            unmatched: indexed,
            rechecks: Vec::new(),
            max_commit_lsn,
        }
    }

    fn pending_rechecks(&self) -> usize {
        self.rechecks.len()
    }

    fn compare_row(&mut self, expected: ExpectedDocument) {
        match self.unmatched.remove(&expected.id) {
            Some(IndexedDocument::Newer) => {}
            None => {
                self.report.rows += 1;
                self.report.missing.push(expected.id);
            }
            Some(IndexedDocument::Current { body_hash: stored }) => {
                self.report.rows += 1;
                if body_hash(&expected.body) != stored {
                    self.rechecks.push(expected);
                }
            }
        }
    }

    /// Re-fetches the documents whose hash differed and names the fields that differ. A
    /// document that changed meanwhile is judged as it is now (it may have converged, become
    /// newer than `max_commit_lsn`, or been deleted).
    async fn recheck(&mut self, search: &Elasticsearch, alias: &str) -> Result<(), CompareError> {
        if self.rechecks.is_empty() {
            return Ok(());
        }
        let rechecks = std::mem::take(&mut self.rechecks);
        let ids: Vec<&str> = rechecks.iter().map(|row| row.id.as_str()).collect();
        let mut stored = fetch_documents(search, alias, &ids).await?;
        for expected in rechecks {
            let Some(source) = stored.remove(&expected.id) else {
                self.report.missing.push(expected.id);
                continue;
            };
            match document_state(&source, self.max_commit_lsn) {
                DocumentState::SoftDeleted => self.report.missing.push(expected.id),
                DocumentState::Newer => {
                    self.report.rows -= 1;
                    self.report.documents -= 1;
                    self.report.skipped_newer += 1;
                }
                DocumentState::Live => {
                    let fields = differing_fields(&expected.body, &source);
                    if !fields.is_empty() {
                        self.report.different.push((expected.id, fields));
                    }
                }
            }
        }
        Ok(())
    }

    async fn finish(
        mut self,
        search: &Elasticsearch,
        alias: &str,
    ) -> Result<ComparisonReport, CompareError> {
        self.recheck(search, alias).await?;
        let mut report = self.report;
        report.extra = self
            .unmatched
            .into_iter()
            .filter(|(_, document)| matches!(document, IndexedDocument::Current { .. }))
            .map(|(id, _)| id)
            .collect();
        report.missing.sort_unstable();
        report.extra.sort_unstable();
        report.different.sort_unstable();
        Ok(report)
    }
}

/// The fields whose values differ between a row's expected body and a stored document, the
/// metadata field aside; a field present on one side only differs. Values compare as their
/// exact JSON text.
fn differing_fields(expected: &RawRow, stored: &RawRow) -> Vec<String> {
    let names: BTreeSet<&str> = expected
        .iter()
        .chain(stored.iter())
        .map(|(name, _)| name)
        .filter(|name| *name != METADATA_FIELD)
        .collect();
    names
        .into_iter()
        .filter(|name| {
            expected.get(name).map(canonical_json) != stored.get(name).map(canonical_json)
        })
        .map(str::to_owned)
        .collect()
}

/// A hash of a document body that ignores field order and the metadata field: equal bodies
/// hash equally (values by their exact JSON text), and different ones collide with
/// probability 2⁻⁶⁴. `DefaultHasher::new` is deterministic within one process, which is all a
/// comparison needs.
fn body_hash(body: &RawRow) -> u64 {
    let mut fields: Vec<(&str, String)> = body
        .iter()
        .filter(|(name, _)| *name != METADATA_FIELD)
        .map(|(name, value)| (name, canonical_json(value)))
        .collect();
    fields.sort_unstable();
    let mut hasher = DefaultHasher::new();
    fields.len().hash(&mut hasher);
    for (name, value) in fields {
        name.hash(&mut hasher);
        value.hash(&mut hasher);
    }
    hasher.finish()
}

/// The canonical text of a JSON value (see the module doc): equal exactly when the values are
/// equal as JSON with numbers as exact decimals. Text that is not JSON stays as it is.
pub fn canonical_json(value: &RawValue) -> String {
    let mut out = String::with_capacity(value.get().len());
    write_canonical(value.get(), &mut out);
    out
}

fn write_canonical(raw: &str, out: &mut String) {
    let raw = raw.trim();
    match raw.as_bytes().first() {
        Some(b'{') => {
            let Ok(object) =
                serde_json::from_str::<std::collections::BTreeMap<String, &RawValue>>(raw)
            else {
                out.push_str(raw);
                return;
            };
            out.push('{');
            for (position, (name, value)) in object.into_iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(&name).unwrap_or_default());
                out.push(':');
                write_canonical(value.get(), out);
            }
            out.push('}');
        }
        Some(b'[') => {
            let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw) else {
                out.push_str(raw);
                return;
            };
            out.push('[');
            for (position, item) in items.into_iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                write_canonical(item.get(), out);
            }
            out.push(']');
        }
        Some(b'"') => match serde_json::from_str::<String>(raw) {
            Ok(text) => out.push_str(&serde_json::to_string(&text).unwrap_or_default()),
            Err(_) => out.push_str(raw),
        },
        Some(b'-' | b'0'..=b'9') => out.push_str(&canonical_number(raw)),
        _ => out.push_str(raw),
    }
}

/// A JSON number as an exact decimal: its significant digits without leading or trailing
/// zeros, and a power of ten (`1.50` → `15e-1`, `-0.0` → `0`, `1e2` → `1e2`, `100` → `1e2`).
fn canonical_number(text: &str) -> String {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (
            &unsigned[..at],
            unsigned[at + 1..].parse::<i64>().unwrap_or(0),
        ),
        None => (unsigned, 0),
    };
    let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = integer.chars().chain(fraction.chars()).collect();
    let mut exponent = exponent.saturating_sub(fraction.len() as i64);
    let leading = digits.len() - digits.trim_start_matches('0').len();
    digits.drain(..leading);
    while digits.ends_with('0') {
        digits.pop();
        exponent = exponent.saturating_add(1);
    }
    if digits.is_empty() {
        return "0".to_owned();
    }
    let sign = if negative { "-" } else { "" };
    if exponent == 0 {
        format!("{sign}{digits}")
    } else {
        format!("{sign}{digits}e{exponent}")
    }
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is JSON"))
}

// ---------------------------------------------------------------------------------------------
// Sampling, shaping and ids
// ---------------------------------------------------------------------------------------------

/// Which ids a comparison looks at: all of them, or those whose FNV-1a hash falls below a
/// fraction of the hash space (stable across runs and processes, unlike `DefaultHasher`).
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Ids hashing below this bound are in the sample; `None` means every id.
    bound: Option<u64>,
}

impl Sample {
    fn new(fraction: Option<f64>) -> Result<Self, CompareError> {
        let Some(fraction) = fraction else {
            return Ok(Self { bound: None });
        };
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(CompareError::InvalidSampleFraction(fraction));
        }
        if fraction == 1.0 {
            return Ok(Self { bound: None });
        }
        // The product is below 2⁶⁴, so the conversion cannot saturate.
        let bound = (fraction * u64::MAX as f64) as u64;
        Ok(Self { bound: Some(bound) })
    }

    fn contains(&self, id: &str) -> bool {
        self.bound.is_none_or(|bound| fnv1a(id.as_bytes()) < bound)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: serde_json::Value) -> RawRow {
        serde_json::from_str(&value.to_string()).unwrap()
    }

    fn raw(text: &str) -> RawRow {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn the_body_hash_ignores_field_order_and_metadata() {
        let left = raw(r#"{"a": 1, "b": {"x": [1, 2], "y": null}, "walsync": {"op": "c"}}"#);
        let right = raw(r#"{"b": {"x": [1, 2], "y": null}, "a": 1}"#);
        assert_eq!(body_hash(&left), body_hash(&right));
    }

    #[test]
    fn numbers_compare_as_exact_decimals_and_json_structurally() {
        let canonical = |text: &str| canonical_json(&RawValue::from_string(text.into()).unwrap());
        assert_eq!(canonical("1.50"), canonical("1.5"));
        assert_eq!(canonical("15e-1"), canonical("1.5"));
        assert_eq!(canonical("100"), canonical("1e2"));
        assert_eq!(canonical("-0.0"), canonical("0"));
        assert_ne!(
            canonical("0.9407462388099621"),
            canonical("0.940746238809962")
        );
        assert_ne!(
            canonical("123456789012345678901234567890"),
            canonical("123456789012345678901234567891")
        );
        assert_eq!(
            canonical(r#"{"b": [1, 2.0], "a": {"x": "y"}}"#),
            canonical(r#"{"a":{"x":"y"},"b":[1,2]}"#)
        );
        assert_ne!(
            canonical(r#"["1.5"]"#),
            canonical("[1.5]"),
            "a string is not a number"
        );
        assert_eq!(canonical(r#""\u00e9""#), canonical("\"\u{e9}\""));
    }

    #[test]
    fn values_compare_digit_for_digit() {
        for (expected, stored) in [
            (
                r#"{"f": 0.9407462388099621}"#,
                r#"{"f": 0.940746238809962}"#,
            ),
            (
                r#"{"j": {"n": 0.90372028726197960001}}"#,
                r#"{"j": {"n": 0.9037202872619796}}"#,
            ),
            (r#"{"n": "19.90"}"#, r#"{"n": "19.9"}"#),
            (r#"{"n": 1.51}"#, r#"{"n": 1.5}"#),
        ] {
            let (expected, stored) = (raw(expected), raw(stored));
            assert_ne!(body_hash(&expected), body_hash(&stored), "{expected:?}");
            assert_eq!(differing_fields(&expected, &stored).len(), 1);
        }
    }

    #[test]
    fn the_body_hash_sees_every_value_change() {
        let base = object(json!({"a": 1, "b": "1"}));
        let base = &base;
        for changed in [
            json!({"a": 2, "b": "1"}),
            json!({"a": 1, "b": 1}),
            json!({"a": 1}),
            json!({"a": 1, "b": "1", "c": null}),
            json!({"a": 1.5, "b": "1"}),
        ] {
            assert_ne!(
                body_hash(base),
                body_hash(&object(changed.clone())),
                "{changed}"
            );
        }
    }

    #[test]
    fn nested_metadata_named_fields_are_not_ignored() {
        let left = object(json!({"payload": {"walsync": 1}}));
        let right = object(json!({"payload": {"walsync": 2}}));
        assert_ne!(body_hash(&left), body_hash(&right));
    }

    #[test]
    fn differing_fields_name_changed_missing_and_added_fields() {
        let expected = object(json!({"a": 1, "b": "x", "c": true, "walsync": {"op": "r"}}));
        let stored = object(json!({"a": 1, "b": "y", "d": 0, "walsync": {"op": "u"}}));
        assert_eq!(differing_fields(&expected, &stored), ["b", "c", "d"]);
    }

    #[test]
    fn a_sample_is_stable_and_roughly_its_fraction() {
        let sample = Sample::new(Some(0.25)).expect("valid fraction");
        let ids: Vec<String> = (0..10_000).map(|n| n.to_string()).collect();
        let first: Vec<bool> = ids.iter().map(|id| sample.contains(id)).collect();
        let second: Vec<bool> = ids.iter().map(|id| sample.contains(id)).collect();
        assert_eq!(first, second);
        let taken = first.iter().filter(|&&taken| taken).count();
        assert!((2_000..3_000).contains(&taken), "{taken} of 10000");
        assert!(Sample::new(Some(1.0)).expect("all").contains("anything"));
    }

    #[test]
    fn a_sample_fraction_outside_zero_to_one_is_refused() {
        for fraction in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(Sample::new(Some(fraction)).is_err(), "{fraction}");
        }
    }

    #[test]
    fn newer_documents_are_skipped_before_tombstones_count() {
        let newer_tombstone = object(json!({"walsync": {"commit_lsn": 200, "deleted": true}}));
        assert!(matches!(
            document_state(&newer_tombstone, Some(100)),
            DocumentState::Newer
        ));
        assert!(matches!(
            document_state(&newer_tombstone, None),
            DocumentState::SoftDeleted
        ));
        let live = object(json!({"walsync": {"commit_lsn": 50, "deleted": false}}));
        assert!(matches!(
            document_state(&live, Some(100)),
            DocumentState::Live
        ));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("we\"ird"), "\"we\"\"ird\"");
    }
}
