//! Bulk requests for one partition's batch, and what their answers mean. Pure functions.
//!
//! # Building
//!
//! A batch is an ordered list of [`BulkAction`]s (index or delete one document at one external
//! version). Several actions for one `(index, _id)` collapse into one bulk item (design
//! invariant 4): a bulk request does not promise to apply its items in order, so two items for
//! one document must never travel together. The surviving action is the one that sequential
//! application with `version_type=external_gte` would end with: **the last of those with the
//! highest version**. Usually that is simply the last action, because versions (commit LSNs)
//! rise within a partition; but a snapshot row (`cp − 1`) or a replayed event can follow a newer
//! change of the same row, and keeping the last one blindly would drop the newer change.
//! Every item remembers the input positions it stands for — the survivor and the actions it
//! superseded — so the caller can map each outcome back to Kafka offsets; superseded actions
//! share their item's outcome.
//!
//! The body is plain NDJSON that Elasticsearch 7.10+/8/9 and OpenSearch 2.x all accept:
//!
//! ```text
//! {"index":{"_index":"shop.public.products","_id":"42","version":4096,"version_type":"external_gte"}}
//! {"id":42,"title":"x","walsync":{…}}
//! {"delete":{"_index":"shop.public.products","_id":"7","version":4096,"version_type":"external_gte"}}
//! ```
//!
//! # Outcomes
//!
//! Each item of a `_bulk` answer becomes one [`ItemOutcome`]. The rule: only what the server
//! will never accept goes to the dead-letter topic; anything else is retried — retrying forever
//! stalls a partition visibly and loses nothing, dead-lettering by mistake silently loses a
//! document.
//!
//! | item answer | outcome | why |
//! |---|---|---|
//! | 2xx (`created`, `updated`, `deleted`, `noop`) | `Done` | applied |
//! | 409 `version_conflict_engine_exception` | `Stale` | the index already holds an equal-or-newer version (`external_gte` only rejects older ones): the event is superseded; counted, success |
//! | 404 on a delete, `result: not_found`, no `error` | `AlreadyDeleted` | the document is not there (it never was, or an earlier delete removed it); the delete still left a versioned tombstone; success |
//! | 429 (`es_rejected_execution_exception`, `circuit_breaking_exception`, …) | `Retry` (throttled) | back-pressure: the cluster is busy |
//! | any 5xx (`unavailable_shards_exception`, `no_shard_available_action_exception`, node failures) | `Retry` (unavailable) | the cluster is degraded, not the document wrong |
//! | `cluster_block_exception` (e.g. read-only after the flood-stage disk watermark) | `Retry` (blocked) | the operator lifts the block; the documents are fine |
//! | `index_closed_exception` | `Retry` (index closed) | the operator reopens the index |
//! | `index_not_found_exception` (also for deletes) | `Retry` (index missing) | the caller re-creates the index or alias, then retries |
//! | `mapper_parsing_exception`, `document_parsing_exception`, `strict_dynamic_mapping_exception`, `mapper_exception`, `x_content_parse_exception`, `json_parse_exception` | `DeadLetter` | this document does not fit the mapping or is not parseable: it will never be accepted |
//! | `illegal_argument_exception` whose reason (or cause) is about a field or mapping (`mapper [price] cannot be changed…`, `Limit of total fields…`, `immense term…`) | `DeadLetter` | same: a per-document mapping problem |
//! | `illegal_argument_exception` about anything else (`no write index is defined for alias…`, `number of documents in the index cannot exceed…`) | `Retry` (other) | an index or alias problem the operator can fix |
//! | anything else: other 4xx, 401/403 `security_exception`, `action_request_validation_exception`, unknown types, a 404 without `not_found` | `Retry` (other) | not clearly a document problem: be conservative |
//!
//! A 429 or 5xx is retried even when its type looks like a document problem: the status says
//! the server did not get to judge the document.
//!
//! When the `_bulk` call itself fails, there are no items; the whole request gets a
//! [`BulkFailure`]:
//!
//! | HTTP status of `_bulk` | failure | what to do |
//! |---|---|---|
//! | 413 | `TooLarge` | split the batch in halves, down to one document; one document alone is dead-lettered |
//! | 408, 429, 5xx | `Retry` | back off and send the same batch again |
//! | `cluster_block_exception` (any status) | `Retry` | a cluster-wide write block; the operator lifts it |
//! | 401 | `Fatal` | check `elasticsearch.username`/`password` or `api_key` |
//! | 403 otherwise | `Fatal` | grant the user write privileges on walsync's indices and aliases |
//! | 404, 405 | `Fatal` | check `elasticsearch.url` (a path prefix, a proxy route) |
//! | any other status | `Fatal` | the server refused the request itself: a walsync bug or an unsupported server |
//!
//! Retry or fatal is the search side's one rule, `sink::index::answer_disposition`, which every
//! other request of the sink follows too.
//! | 2xx with an unreadable body | `UnreadableResponse` | retry the batch (idempotent thanks to external versions) |
//! | 2xx with a different number of items than sent, or an item for another `_id` or operation | `ItemMismatch` | retry the batch; never guess which item is which |
//!
//! Retrying a whole batch is always safe: every item carries its external version, so items
//! that were applied the first time come back as `Stale` or are rewritten identically.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use serde::{Deserialize, Serialize};

use crate::retry::Disposition;
use crate::sink::index::{answer_disposition, answer_error_type};
use serde_json::{Map, Value};

/// The version type of every write: equal versions are accepted, so a replayed event and the
/// last of several changes in one transaction (which share the commit LSN) are applied.
pub const VERSION_TYPE: &str = "external_gte";

/// One write of one document, in partition order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkAction {
    /// The alias (or index) to write to.
    pub index: String,
    pub id: String,
    /// The external version: the event's commit LSN.
    pub version: u64,
    pub kind: ActionKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    /// Write the whole document: one line of JSON.
    Index(Vec<u8>),
    Delete,
}

/// The bulk operation of an item, as the answer names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkOperation {
    Index,
    Delete,
}

impl BulkOperation {
    pub fn name(self) -> &'static str {
        match self {
            BulkOperation::Index => "index",
            BulkOperation::Delete => "delete",
        }
    }
}

/// A ready `_bulk` body and what each of its items stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkRequest {
    /// NDJSON, every line terminated by `\n` (the last one too, as `_bulk` requires).
    pub body: Vec<u8>,
    /// One per item of the body, in body order.
    pub items: Vec<BulkItem>,
}

/// One item of a bulk body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkItem {
    pub index: String,
    pub id: String,
    pub version: u64,
    pub operation: BulkOperation,
    /// The input position of the action this item writes.
    pub position: usize,
    /// Input positions of earlier or older actions for the same document that this item
    /// supersedes, ascending. They share the item's outcome.
    pub superseded: Vec<usize>,
}

impl BulkItem {
    /// Every input position this item stands for, ascending.
    pub fn positions(&self) -> Vec<usize> {
        let mut positions = self.superseded.clone();
        positions.push(self.position);
        positions.sort_unstable();
        positions
    }
}

impl BulkRequest {
    /// Builds the bulk body for one partition's batch, collapsing actions per document.
    pub fn build(actions: &[BulkAction]) -> Self {
        let items = collapse(actions);
        let body = ndjson_body(actions, &items);
        Self { body, items }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// One item per document: the last action with the highest version survives (what
/// `external_gte` applied in order would end with), the others are superseded.
fn collapse(actions: &[BulkAction]) -> Vec<BulkItem> {
    let mut items: Vec<BulkItem> = Vec::new();
    let mut item_of_document: HashMap<(&str, &str), usize> = HashMap::new();
    for (position, action) in actions.iter().enumerate() {
        match item_of_document.entry((action.index.as_str(), action.id.as_str())) {
            Entry::Vacant(slot) => {
                slot.insert(items.len());
                items.push(BulkItem {
                    index: action.index.clone(),
                    id: action.id.clone(),
                    version: action.version,
                    operation: operation_of(&action.kind),
                    position,
                    superseded: Vec::new(),
                });
            }
            Entry::Occupied(slot) => {
                let item = &mut items[*slot.get()];
                if action.version >= item.version {
                    item.superseded.push(item.position);
                    item.position = position;
                    item.version = action.version;
                    item.operation = operation_of(&action.kind);
                } else {
                    // Older than what the item writes: external_gte would reject it anyway.
                    item.superseded.push(position);
                }
            }
        }
    }
    for item in &mut items {
        item.superseded.sort_unstable();
    }
    // Items in the order of their surviving actions, so a batch reads like its partition.
    items.sort_by_key(|item| item.position);
    items
}

fn operation_of(kind: &ActionKind) -> BulkOperation {
    match kind {
        ActionKind::Index(_) => BulkOperation::Index,
        ActionKind::Delete => BulkOperation::Delete,
    }
}

/// The metadata line of one item.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum ActionLine<'a> {
    Index(ActionMetadata<'a>),
    Delete(ActionMetadata<'a>),
}

#[derive(Serialize)]
struct ActionMetadata<'a> {
    #[serde(rename = "_index")]
    index: &'a str,
    #[serde(rename = "_id")]
    id: &'a str,
    version: u64,
    version_type: &'static str,
}

fn ndjson_body(actions: &[BulkAction], items: &[BulkItem]) -> Vec<u8> {
    let capacity = items
        .iter()
        .map(|item| match &actions[item.position].kind {
            ActionKind::Index(document) => document.len() + 160,
            ActionKind::Delete => 160,
        })
        .sum();
    let mut body = Vec::with_capacity(capacity);
    for item in items {
        let metadata = ActionMetadata {
            index: &item.index,
            id: &item.id,
            version: item.version,
            version_type: VERSION_TYPE,
        };
        match &actions[item.position].kind {
            ActionKind::Index(document) => {
                write_line(&mut body, &ActionLine::Index(metadata));
                push_single_line(&mut body, document);
            }
            ActionKind::Delete => write_line(&mut body, &ActionLine::Delete(metadata)),
        }
    }
    body
}

fn write_line(body: &mut Vec<u8>, line: &ActionLine<'_>) {
    // Serializing strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *body, line);
    body.push(b'\n');
}

/// Appends a document as one NDJSON line. A raw line break can only be insignificant
/// whitespace in valid JSON (inside strings it must be escaped), so replacing it with a space
/// keeps the document and protects the framing from a pretty-printed body.
fn push_single_line(body: &mut Vec<u8>, document: &[u8]) {
    let start = body.len();
    body.extend_from_slice(document);
    for byte in &mut body[start..] {
        if matches!(*byte, b'\n' | b'\r') {
            *byte = b' ';
        }
    }
    body.push(b'\n');
}

/// What became of one bulk item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Applied.
    Done,
    /// An equal-or-newer version is already indexed: superseded, counted, success.
    Stale,
    /// A delete of a document that is not there: success.
    AlreadyDeleted,
    /// Send again later (with backoff), in order, without end.
    Retry { cause: RetryCause, reason: String },
    /// The server will never accept this document: to the dead-letter topic with the reason.
    DeadLetter { reason: String },
}

impl ItemOutcome {
    /// Whether the item is finished (its offsets may be committed once all before are).
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            ItemOutcome::Done | ItemOutcome::Stale | ItemOutcome::AlreadyDeleted
        )
    }
}

/// Why an item is retried: for metrics, and so the caller knows when to re-create an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// 429: the cluster pushes back.
    Throttled,
    /// 5xx: shards or nodes unavailable.
    Unavailable,
    /// A cluster or index write block (e.g. the flood-stage disk watermark).
    Blocked,
    IndexClosed,
    /// The index or alias does not exist: re-create it, then retry.
    IndexMissing,
    /// Not clearly a document problem.
    Other,
}

impl RetryCause {
    pub fn label(self) -> &'static str {
        match self {
            RetryCause::Throttled => "throttled",
            RetryCause::Unavailable => "unavailable",
            RetryCause::Blocked => "blocked",
            RetryCause::IndexClosed => "index_closed",
            RetryCause::IndexMissing => "index_missing",
            RetryCause::Other => "other",
        }
    }
}

/// The `_bulk` request as a whole did not produce per-item results.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BulkFailure {
    #[error("bulk request failed, will retry: {reason}")]
    Retry { reason: String },
    #[error("bulk request too large, split it and retry: {reason}")]
    TooLarge { reason: String },
    #[error("bulk request refused: {reason}")]
    Fatal { reason: String },
    #[error("the bulk response cannot be read: {reason}")]
    UnreadableResponse { reason: String },
    #[error("the bulk response does not match the request: {reason}")]
    ItemMismatch { reason: String },
}

impl BulkFailure {
    /// Whether sending the same batch again (after a backoff, or split for `TooLarge`) can
    /// succeed. Always safe: writes carry external versions.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, BulkFailure::Fatal { .. })
    }
}

/// The outcome of every item of `request`, in item order, from the HTTP status and body of
/// its `_bulk` call.
pub fn classify_response(
    request: &BulkRequest,
    http_status: u16,
    body: &[u8],
) -> Result<Vec<ItemOutcome>, BulkFailure> {
    if !(200..300).contains(&http_status) {
        return Err(request_failure(http_status, body));
    }
    let response: BulkResponse =
        serde_json::from_slice(body).map_err(|error| BulkFailure::UnreadableResponse {
            reason: error.to_string(),
        })?;
    if response.items.len() != request.items.len() {
        return Err(BulkFailure::ItemMismatch {
            reason: format!(
                "sent {} items, received {}",
                request.items.len(),
                response.items.len()
            ),
        });
    }
    request
        .items
        .iter()
        .zip(&response.items)
        .enumerate()
        .map(|(number, (sent, received))| {
            let (operation, result) = read_item(number, received)?;
            check_item_matches(number, sent, &operation, &result)?;
            Ok(classify_item(sent.operation, &result))
        })
        .collect()
}

#[derive(Deserialize)]
struct BulkResponse {
    items: Vec<Map<String, Value>>,
}

/// One item's result: `{"<operation>": {"_index", "_id", "status", "result", "error"}}`.
#[derive(Debug, Deserialize)]
struct ItemResult {
    #[serde(rename = "_id")]
    id: Option<String>,
    status: u16,
    result: Option<String>,
    error: Option<ErrorCause>,
}

/// Elasticsearch's error object; `caused_by` nests.
#[derive(Debug, Deserialize)]
struct ErrorCause {
    #[serde(rename = "type")]
    kind: String,
    reason: Option<String>,
    caused_by: Option<Box<ErrorCause>>,
}

impl ErrorCause {
    /// This error and its causes, outermost first.
    fn chain(&self) -> impl Iterator<Item = &ErrorCause> {
        std::iter::successors(Some(self), |cause| cause.caused_by.as_deref())
    }
}

fn read_item(
    number: usize,
    item: &Map<String, Value>,
) -> Result<(String, ItemResult), BulkFailure> {
    let mut entries = item.iter();
    let (Some((operation, result)), None) = (entries.next(), entries.next()) else {
        return Err(BulkFailure::UnreadableResponse {
            reason: format!("item {number} is not a single-operation object"),
        });
    };
    let result =
        ItemResult::deserialize(result).map_err(|error| BulkFailure::UnreadableResponse {
            reason: format!("item {number}: {error}"),
        })?;
    Ok((operation.clone(), result))
}

/// Items come back in request order; a different operation or `_id` means the answer is not
/// for this request, and no outcome can be trusted.
fn check_item_matches(
    number: usize,
    sent: &BulkItem,
    operation: &str,
    result: &ItemResult,
) -> Result<(), BulkFailure> {
    let same_operation = operation == sent.operation.name();
    let same_id = result.id.as_deref().is_none_or(|id| id == sent.id);
    if same_operation && same_id {
        return Ok(());
    }
    Err(BulkFailure::ItemMismatch {
        reason: format!(
            "item {number}: sent {} of _id {:?}, received {operation} of _id {:?}",
            sent.operation.name(),
            sent.id,
            result.id
        ),
    })
}

fn classify_item(operation: BulkOperation, result: &ItemResult) -> ItemOutcome {
    let status = result.status;
    if (200..300).contains(&status) {
        return ItemOutcome::Done;
    }
    let Some(error) = &result.error else {
        return classify_errorless(operation, result);
    };
    let reason = describe(status, error);
    if error.kind == "version_conflict_engine_exception" {
        return ItemOutcome::Stale;
    }
    if status == 429 || status >= 500 {
        let cause = retry_cause(status, &error.kind);
        return ItemOutcome::Retry { cause, reason };
    }
    if is_document_problem(error) {
        return ItemOutcome::DeadLetter { reason };
    }
    ItemOutcome::Retry {
        cause: retry_cause(status, &error.kind),
        reason,
    }
}

/// A non-2xx item without an error object: only a delete's `not_found` is expected.
fn classify_errorless(operation: BulkOperation, result: &ItemResult) -> ItemOutcome {
    let not_found = result
        .result
        .as_deref()
        .is_none_or(|text| text == "not_found");
    if operation == BulkOperation::Delete && result.status == 404 && not_found {
        return ItemOutcome::AlreadyDeleted;
    }
    ItemOutcome::Retry {
        cause: retry_cause(result.status, ""),
        reason: format!(
            "status {} without an error (result: {})",
            result.status,
            result.result.as_deref().unwrap_or("none")
        ),
    }
}

fn retry_cause(status: u16, error_type: &str) -> RetryCause {
    match error_type {
        "cluster_block_exception" => RetryCause::Blocked,
        "index_closed_exception" => RetryCause::IndexClosed,
        "index_not_found_exception" => RetryCause::IndexMissing,
        _ if status == 429 => RetryCause::Throttled,
        _ if status >= 500 => RetryCause::Unavailable,
        _ => RetryCause::Other,
    }
}

/// Error types that judge the document itself: it will never be accepted as it is.
const DOCUMENT_ERROR_TYPES: &[&str] = &[
    "mapper_parsing_exception",
    "document_parsing_exception",
    "strict_dynamic_mapping_exception",
    "mapper_exception",
    "x_content_parse_exception",
    "json_parse_exception",
];

/// Words in an `illegal_argument_exception`'s reason that point at a field or the mapping,
/// rather than at an index or alias (`no write index is defined for alias`) or a shard limit.
const DOCUMENT_ARGUMENT_HINTS: &[&str] = &[
    "field",
    "mapper",
    "mapping",
    "immense term",
    "failed to parse",
];

fn is_document_problem(error: &ErrorCause) -> bool {
    if DOCUMENT_ERROR_TYPES.contains(&error.kind.as_str()) {
        return true;
    }
    error.kind == "illegal_argument_exception"
        && error.chain().any(|cause| {
            DOCUMENT_ERROR_TYPES.contains(&cause.kind.as_str())
                || cause
                    .reason
                    .as_deref()
                    .is_some_and(mentions_field_or_mapping)
        })
}

fn mentions_field_or_mapping(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    DOCUMENT_ARGUMENT_HINTS
        .iter()
        .any(|hint| reason.contains(hint))
}

/// `400 mapper_parsing_exception: failed to parse … (caused by number_format_exception: …)`.
fn describe(status: u16, error: &ErrorCause) -> String {
    let mut text = format!("{status} {}", describe_cause(error));
    for cause in error.chain().skip(1) {
        text.push_str(" (caused by ");
        text.push_str(&describe_cause(cause));
        text.push(')');
    }
    text
}

fn describe_cause(cause: &ErrorCause) -> String {
    match &cause.reason {
        Some(reason) => format!("{}: {reason}", cause.kind),
        None => cause.kind.clone(),
    }
}

/// The failure of a `_bulk` call that did not answer 2xx: retried or fatal by the search side's
/// one rule ([`answer_disposition`]), with the hint for the status; a 413 is split instead.
fn request_failure(status: u16, body: &[u8]) -> BulkFailure {
    let error = request_error(body);
    let detail = format!("HTTP {status}: {error}");
    if status == 413 {
        return BulkFailure::TooLarge {
            reason: format!(
                "{detail}; lower sink.batch_max_bytes (or raise the server's http.max_content_length)"
            ),
        };
    }
    let error_type = answer_error_type(&String::from_utf8_lossy(body));
    match answer_disposition(status, error_type.as_deref()) {
        Disposition::Retry => BulkFailure::Retry {
            reason: if error_type.as_deref() == Some("cluster_block_exception") {
                format!("{detail}; the cluster refuses writes until the block is lifted")
            } else {
                detail
            },
        },
        Disposition::Stop | Disposition::DeadLetter => BulkFailure::Fatal {
            reason: format!("{detail}; {}", stop_hint(status)),
        },
    }
}

/// What to fix when the search server refuses a request with `status`.
fn stop_hint(status: u16) -> &'static str {
    match status {
        401 => "check elasticsearch.username/password or elasticsearch.api_key",
        403 => "grant the Elasticsearch user write privileges on walsync's indices and aliases",
        404 | 405 => "check elasticsearch.url (path prefix, proxy route)",
        _ => {
            "the server refused the request itself: a walsync bug or an unsupported server version"
        }
    }
}

/// The `{"error": {"type", "reason"}}` of an error answer, or the start of whatever else came
/// back (a proxy's HTML page, say).
fn request_error(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorAnswer {
        error: ErrorField,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ErrorField {
        Structured(ErrorCause),
        Text(String),
    }
    const EXCERPT_CHARS: usize = 300;
    match serde_json::from_slice::<ErrorAnswer>(body) {
        Ok(ErrorAnswer {
            error: ErrorField::Structured(cause),
        }) => describe_cause(&cause),
        Ok(ErrorAnswer {
            error: ErrorField::Text(text),
        }) => text,
        Err(_) if body.is_empty() => "empty body".to_owned(),
        Err(_) => String::from_utf8_lossy(body)
            .chars()
            .take(EXCERPT_CHARS)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn index(id: &str, version: u64, document: Value) -> BulkAction {
        BulkAction {
            index: "shop.public.products".into(),
            id: id.into(),
            version,
            kind: ActionKind::Index(serde_json::to_vec(&document).unwrap()),
        }
    }

    fn delete(id: &str, version: u64) -> BulkAction {
        BulkAction {
            index: "shop.public.products".into(),
            id: id.into(),
            version,
            kind: ActionKind::Delete,
        }
    }

    fn lines(request: &BulkRequest) -> Vec<Value> {
        assert!(request.body.ends_with(b"\n"), "the last line ends too");
        request.body[..request.body.len() - 1]
            .split(|byte| *byte == b'\n')
            .map(|line| serde_json::from_slice(line).expect("each line is JSON"))
            .collect()
    }

    /// A realistic `_bulk` answer around the given items.
    fn answer(items: Vec<Value>) -> Vec<u8> {
        let errors = items.iter().any(|item| {
            item.as_object()
                .unwrap()
                .values()
                .any(|r| r.get("error").is_some())
        });
        serde_json::to_vec(&json!({"took": 30, "errors": errors, "items": items})).unwrap()
    }

    fn ok_item(operation: &str, id: &str, result: &str, status: u16) -> Value {
        json!({ operation: {
            "_index": "shop.public.products-000001", "_id": id, "_version": 4096,
            "result": result,
            "_shards": {"total": 2, "successful": 1, "failed": 0},
            "_seq_no": 3, "_primary_term": 1, "status": status
        }})
    }

    fn error_item(operation: &str, id: &str, status: u16, error: Value) -> Value {
        json!({ operation: {
            "_index": "shop.public.products-000001", "_id": id, "status": status, "error": error
        }})
    }

    /// Classifies one item answer for a one-action request.
    fn outcome_of(action: BulkAction, item: Value) -> ItemOutcome {
        let request = BulkRequest::build(&[action]);
        let mut outcomes = classify_response(&request, 200, &answer(vec![item])).unwrap();
        assert_eq!(outcomes.len(), 1);
        outcomes.remove(0)
    }

    fn retry_cause_of(outcome: &ItemOutcome) -> RetryCause {
        match outcome {
            ItemOutcome::Retry { cause, .. } => *cause,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn the_body_is_ndjson_with_external_gte_metadata() {
        let request = BulkRequest::build(&[
            index("1", 4096, json!({"id": 1, "walsync": {"commit_lsn": 4096}})),
            delete("2", 5000),
        ]);
        let lines = lines(&request);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            json!({"index": {"_index": "shop.public.products", "_id": "1",
                             "version": 4096, "version_type": "external_gte"}})
        );
        assert_eq!(lines[1], json!({"id": 1, "walsync": {"commit_lsn": 4096}}));
        assert_eq!(
            lines[2],
            json!({"delete": {"_index": "shop.public.products", "_id": "2",
                              "version": 5000, "version_type": "external_gte"}})
        );
        assert_eq!(request.items.len(), 2);
        assert_eq!(request.items[0].operation, BulkOperation::Index);
        assert_eq!(request.items[1].operation, BulkOperation::Delete);
        assert_eq!(request.items[1].positions(), [1]);
    }

    #[test]
    fn ids_and_index_names_are_escaped() {
        let mut action = index(r#"[1,"a\"b"]"#, 1, json!({}));
        action.index = "odd\"alias".into();
        let lines = lines(&BulkRequest::build(&[action]));
        assert_eq!(lines[0]["index"]["_id"], r#"[1,"a\"b"]"#);
        assert_eq!(lines[0]["index"]["_index"], "odd\"alias");
    }

    #[test]
    fn a_pretty_printed_document_still_takes_one_line() {
        let document = serde_json::to_vec_pretty(&json!({"a": 1, "b": "x\ny"})).unwrap();
        let action = BulkAction {
            kind: ActionKind::Index(document),
            ..delete("1", 1)
        };
        let lines = lines(&BulkRequest::build(&[action]));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1], json!({"a": 1, "b": "x\ny"}));
    }

    #[test]
    fn actions_for_one_document_collapse_to_the_last() {
        let request = BulkRequest::build(&[
            index("1", 10, json!({"v": "first"})),
            index("2", 10, json!({"v": "other"})),
            index("1", 10, json!({"v": "second"})),
            delete("1", 11),
            index("1", 11, json!({"v": "reinserted"})),
        ]);
        assert_eq!(request.items.len(), 2);
        let other = &request.items[0];
        assert_eq!((other.id.as_str(), other.position), ("2", 1));
        let one = &request.items[1];
        assert_eq!(one.position, 4);
        assert_eq!(one.superseded, [0, 2, 3]);
        assert_eq!(one.positions(), [0, 2, 3, 4]);
        let lines = lines(&request);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[3], json!({"v": "reinserted"}));
        assert_eq!(lines[2]["index"]["version"], 11);
    }

    #[test]
    fn a_collapse_ends_with_a_delete_when_the_delete_is_last() {
        let request = BulkRequest::build(&[index("1", 10, json!({})), delete("1", 10)]);
        assert_eq!(request.items.len(), 1);
        assert_eq!(request.items[0].operation, BulkOperation::Delete);
        assert_eq!(lines(&request).len(), 1);
    }

    #[test]
    fn an_older_action_after_a_newer_one_does_not_win_the_collapse() {
        // A snapshot row (cp − 1) arriving after a streamed update of the same row: applied in
        // order with external_gte, the update stays. Keeping the last action would lose it.
        let request = BulkRequest::build(&[
            index("1", 5000, json!({"v": "streamed update"})),
            index("1", 4999, json!({"v": "snapshot row"})),
        ]);
        assert_eq!(request.items.len(), 1);
        assert_eq!(request.items[0].position, 0);
        assert_eq!(request.items[0].version, 5000);
        assert_eq!(request.items[0].superseded, [1]);
        assert_eq!(lines(&request)[1], json!({"v": "streamed update"}));
    }

    #[test]
    fn the_same_id_in_two_indices_does_not_collapse() {
        let mut elsewhere = index("1", 1, json!({}));
        elsewhere.index = "shop.public.orders".into();
        let request = BulkRequest::build(&[index("1", 1, json!({})), elsewhere]);
        assert_eq!(request.items.len(), 2);
    }

    #[test]
    fn an_empty_batch_builds_an_empty_request() {
        let request = BulkRequest::build(&[]);
        assert!(request.is_empty());
        assert!(request.body.is_empty());
    }

    #[test]
    fn successes_are_done() {
        for (result, status) in [("created", 201), ("updated", 200), ("noop", 200)] {
            let outcome = outcome_of(
                index("1", 1, json!({})),
                ok_item("index", "1", result, status),
            );
            assert_eq!(outcome, ItemOutcome::Done, "{result}");
        }
        let outcome = outcome_of(delete("1", 1), ok_item("delete", "1", "deleted", 200));
        assert_eq!(outcome, ItemOutcome::Done);
    }

    #[test]
    fn a_version_conflict_is_stale_for_writes_and_deletes() {
        let conflict = json!({
            "type": "version_conflict_engine_exception",
            "reason": "[1]: version conflict, current version [20] is higher or equal to the one provided [10]",
            "index_uuid": "aAsFqTI0Tc2W0LCWgPNrOA", "shard": "0", "index": "shop.public.products-000001"
        });
        let outcome = outcome_of(
            index("1", 10, json!({})),
            error_item("index", "1", 409, conflict.clone()),
        );
        assert_eq!(outcome, ItemOutcome::Stale);
        let outcome = outcome_of(delete("1", 10), error_item("delete", "1", 409, conflict));
        assert_eq!(outcome, ItemOutcome::Stale);
        assert!(ItemOutcome::Stale.is_success());
    }

    #[test]
    fn a_delete_of_a_missing_document_is_already_deleted() {
        let outcome = outcome_of(delete("1", 10), ok_item("delete", "1", "not_found", 404));
        assert_eq!(outcome, ItemOutcome::AlreadyDeleted);
        assert!(outcome.is_success());
    }

    #[test]
    fn a_delete_into_a_missing_index_is_retried_not_already_deleted() {
        let outcome = outcome_of(
            delete("1", 10),
            error_item(
                "delete",
                "1",
                404,
                json!({
                    "type": "index_not_found_exception",
                    "reason": "no such index [shop.public.products]",
                    "resource.type": "index_or_alias", "resource.id": "shop.public.products",
                    "index_uuid": "_na_", "index": "shop.public.products"
                }),
            ),
        );
        assert_eq!(retry_cause_of(&outcome), RetryCause::IndexMissing);
    }

    #[test]
    fn throttling_and_server_errors_are_retried() {
        let rejected = error_item(
            "index",
            "1",
            429,
            json!({
                "type": "es_rejected_execution_exception",
                "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, all_bytes=0, coordinating_operation_bytes=110, max_coordinating_and_primary_bytes=107374182]"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), rejected);
        assert_eq!(retry_cause_of(&outcome), RetryCause::Throttled);

        let breaker = error_item(
            "index",
            "1",
            429,
            json!({
                "type": "circuit_breaking_exception",
                "reason": "[parent] Data too large, data for [<http_request>] would be [1024/1kb], which is larger than the limit of [512/512b]",
                "bytes_wanted": 1024, "bytes_limit": 512, "durability": "TRANSIENT"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), breaker);
        assert_eq!(retry_cause_of(&outcome), RetryCause::Throttled);

        let unavailable = error_item(
            "index",
            "1",
            503,
            json!({
                "type": "unavailable_shards_exception",
                "reason": "[shop.public.products-000001][0] primary shard is not active Timeout: [1m], request: [BulkShardRequest [[shop.public.products-000001][0]] containing [index {[shop.public.products-000001][1]}]]"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), unavailable);
        assert_eq!(retry_cause_of(&outcome), RetryCause::Unavailable);

        let internal = error_item(
            "index",
            "1",
            500,
            json!({"type": "mapper_parsing_exception", "reason": "odd but a 500"}),
        );
        let outcome = outcome_of(index("1", 1, json!({})), internal);
        assert_eq!(
            retry_cause_of(&outcome),
            RetryCause::Unavailable,
            "a 5xx is retried whatever its type"
        );
    }

    #[test]
    fn blocks_closed_and_missing_indices_are_retried() {
        let flood_stage = error_item(
            "index",
            "1",
            429,
            json!({
                "type": "cluster_block_exception",
                "reason": "index [shop.public.products-000001] blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete block];"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), flood_stage);
        assert_eq!(retry_cause_of(&outcome), RetryCause::Blocked);

        let read_only = error_item(
            "index",
            "1",
            403,
            json!({
                "type": "cluster_block_exception",
                "reason": "index [shop.public.products-000001] blocked by: [FORBIDDEN/8/index write (api)];"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), read_only);
        assert_eq!(retry_cause_of(&outcome), RetryCause::Blocked);

        let closed = error_item(
            "index",
            "1",
            400,
            json!({
                "type": "index_closed_exception", "reason": "closed",
                "index_uuid": "aAsFqTI0Tc2W0LCWgPNrOA", "index": "shop.public.products-000001"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), closed);
        assert_eq!(retry_cause_of(&outcome), RetryCause::IndexClosed);

        let missing = error_item(
            "index",
            "1",
            404,
            json!({
                "type": "index_not_found_exception",
                "reason": "no such index [shop.public.products] and [action.auto_create_index] is [false]",
                "index_uuid": "_na_", "index": "shop.public.products"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), missing);
        assert_eq!(retry_cause_of(&outcome), RetryCause::IndexMissing);
    }

    #[test]
    fn mapping_and_parsing_errors_are_dead_lettered_with_the_reason() {
        // Elasticsearch 7.x and OpenSearch 2.x.
        let mapper = error_item(
            "index",
            "1",
            400,
            json!({
                "type": "mapper_parsing_exception",
                "reason": "failed to parse field [price] of type [long] in document with id '1'. Preview of field's value: 'abc'",
                "caused_by": {"type": "illegal_argument_exception", "reason": "For input string: \"abc\""}
            }),
        );
        let ItemOutcome::DeadLetter { reason } = outcome_of(index("1", 1, json!({})), mapper)
        else {
            panic!("expected a dead letter")
        };
        assert!(reason.starts_with("400 mapper_parsing_exception: failed to parse field [price]"));
        assert!(reason.contains("caused by illegal_argument_exception: For input string"));

        // Elasticsearch 8.8+.
        let document = error_item(
            "index",
            "1",
            400,
            json!({
                "type": "document_parsing_exception",
                "reason": "[1:25] failed to parse field [price] of type [long] in document with id '1'. Preview of field's value: 'abc'",
                "caused_by": {"type": "illegal_argument_exception", "reason": "For input string: \"abc\""}
            }),
        );
        assert!(matches!(
            outcome_of(index("1", 1, json!({})), document),
            ItemOutcome::DeadLetter { .. }
        ));

        let strict = error_item(
            "index",
            "1",
            400,
            json!({
                "type": "strict_dynamic_mapping_exception",
                "reason": "mapping set to strict, dynamic introduction of [extra] within [_doc] is not allowed"
            }),
        );
        assert!(matches!(
            outcome_of(index("1", 1, json!({})), strict),
            ItemOutcome::DeadLetter { .. }
        ));
    }

    #[test]
    fn illegal_arguments_are_dead_lettered_only_when_about_a_field_or_mapping() {
        let about_mapping = [
            "mapper [price] cannot be changed from type [long] to [text]",
            "Limit of total fields [1000] has been exceeded while adding new fields [3]",
            "Document contains at least one immense term in field=\"body\" (whose UTF8 encoding is longer than the max length 32766)",
        ];
        for reason in about_mapping {
            let item = error_item(
                "index",
                "1",
                400,
                json!({"type": "illegal_argument_exception", "reason": reason}),
            );
            assert!(
                matches!(
                    outcome_of(index("1", 1, json!({})), item),
                    ItemOutcome::DeadLetter { .. }
                ),
                "{reason}"
            );
        }
        let about_the_index = [
            "no write index is defined for alias [shop.public.products]. The write index may be explicitly disabled using is_write_index=false or the alias points to multiple indices without one being designated as a write index",
            "number of documents in the index cannot exceed 2147483519",
        ];
        for reason in about_the_index {
            let item = error_item(
                "index",
                "1",
                400,
                json!({"type": "illegal_argument_exception", "reason": reason}),
            );
            let outcome = outcome_of(index("1", 1, json!({})), item);
            assert_eq!(retry_cause_of(&outcome), RetryCause::Other, "{reason}");
        }
    }

    #[test]
    fn unknown_and_security_errors_are_retried_conservatively() {
        let security = error_item(
            "index",
            "1",
            403,
            json!({
                "type": "security_exception",
                "reason": "action [indices:data/write/bulk[s]] is unauthorized for user [walsync] with effective roles [reader] on indices [shop.public.products-000001], this action is granted by the index privileges [create_doc,create,delete,index,write,all]"
            }),
        );
        let outcome = outcome_of(index("1", 1, json!({})), security);
        assert_eq!(retry_cause_of(&outcome), RetryCause::Other);

        let unknown = error_item(
            "index",
            "1",
            400,
            json!({"type": "some_future_exception", "reason": "?"}),
        );
        let outcome = outcome_of(index("1", 1, json!({})), unknown);
        assert_eq!(retry_cause_of(&outcome), RetryCause::Other);

        let odd = ok_item("index", "1", "not_found", 404);
        let outcome = outcome_of(index("1", 1, json!({})), odd);
        assert_eq!(
            retry_cause_of(&outcome),
            RetryCause::Other,
            "not_found is only a success for deletes"
        );
    }

    #[test]
    fn outcomes_follow_item_order_in_a_mixed_answer() {
        let request = BulkRequest::build(&[
            index("1", 10, json!({})),
            delete("2", 10),
            index("3", 10, json!({"price": "abc"})),
            index("4", 10, json!({})),
        ]);
        let body = answer(vec![
            ok_item("index", "1", "created", 201),
            ok_item("delete", "2", "not_found", 404),
            error_item(
                "index",
                "3",
                400,
                json!({"type": "document_parsing_exception", "reason": "[1:10] failed to parse field [price]"}),
            ),
            error_item(
                "index",
                "4",
                429,
                json!({"type": "es_rejected_execution_exception", "reason": "rejected execution"}),
            ),
        ]);
        let outcomes = classify_response(&request, 200, &body).unwrap();
        assert_eq!(outcomes[0], ItemOutcome::Done);
        assert_eq!(outcomes[1], ItemOutcome::AlreadyDeleted);
        assert!(matches!(outcomes[2], ItemOutcome::DeadLetter { .. }));
        assert_eq!(retry_cause_of(&outcomes[3]), RetryCause::Throttled);
    }

    #[test]
    fn a_different_number_of_items_is_an_error() {
        let request = BulkRequest::build(&[index("1", 1, json!({})), index("2", 1, json!({}))]);
        let body = answer(vec![ok_item("index", "1", "created", 201)]);
        let failure = classify_response(&request, 200, &body).unwrap_err();
        assert!(matches!(failure, BulkFailure::ItemMismatch { .. }));
        assert!(failure.to_string().contains("sent 2 items, received 1"));
        assert!(failure.is_retryable());
    }

    #[test]
    fn an_item_for_another_id_or_operation_is_an_error() {
        let request = BulkRequest::build(&[index("1", 1, json!({}))]);
        let other_id = answer(vec![ok_item("index", "9", "created", 201)]);
        assert!(matches!(
            classify_response(&request, 200, &other_id),
            Err(BulkFailure::ItemMismatch { .. })
        ));
        let other_operation = answer(vec![ok_item("delete", "1", "deleted", 200)]);
        assert!(matches!(
            classify_response(&request, 200, &other_operation),
            Err(BulkFailure::ItemMismatch { .. })
        ));
    }

    #[test]
    fn an_unreadable_answer_is_an_error() {
        let request = BulkRequest::build(&[index("1", 1, json!({}))]);
        for body in [
            &b"<html>bad gateway</html>"[..],
            br#"{"took":1}"#,
            br#"{"items":[{}]}"#,
        ] {
            assert!(matches!(
                classify_response(&request, 200, body),
                Err(BulkFailure::UnreadableResponse { .. })
            ));
        }
    }

    #[test]
    fn whole_request_failures_are_classified_by_status() {
        let request = BulkRequest::build(&[index("1", 1, json!({}))]);
        let failure =
            |status: u16, body: &[u8]| classify_response(&request, status, body).unwrap_err();

        let too_large = failure(413, b"");
        assert!(matches!(too_large, BulkFailure::TooLarge { .. }));
        assert!(too_large.to_string().contains("sink.batch_max_bytes"));

        let throttled = failure(
            429,
            br#"{"error":{"root_cause":[{"type":"es_rejected_execution_exception","reason":"rejected execution of coordinating operation"}],"type":"es_rejected_execution_exception","reason":"rejected execution of coordinating operation"},"status":429}"#,
        );
        assert!(matches!(throttled, BulkFailure::Retry { .. }));
        assert!(
            throttled
                .to_string()
                .contains("es_rejected_execution_exception")
        );

        for status in [500, 502, 503, 504, 408] {
            assert!(matches!(
                failure(status, b"<html>proxy</html>"),
                BulkFailure::Retry { .. }
            ));
        }

        let unauthorized = failure(
            401,
            br#"{"error":{"root_cause":[{"type":"security_exception","reason":"unable to authenticate user [walsync] for REST request [/_bulk]","header":{"WWW-Authenticate":"Basic realm=\"security\" charset=\"UTF-8\""}}],"type":"security_exception","reason":"unable to authenticate user [walsync] for REST request [/_bulk]"},"status":401}"#,
        );
        assert!(matches!(unauthorized, BulkFailure::Fatal { .. }));
        assert!(!unauthorized.is_retryable());
        let message = unauthorized.to_string();
        assert!(
            message.contains("elasticsearch.username/password"),
            "{message}"
        );
        assert!(message.contains("api_key"), "{message}");

        let forbidden = failure(
            403,
            br#"{"error":{"type":"security_exception","reason":"action [indices:data/write/bulk] is unauthorized for user [walsync]"},"status":403}"#,
        );
        assert!(matches!(forbidden, BulkFailure::Fatal { .. }));
        assert!(forbidden.to_string().contains("privileges"));

        let blocked = failure(
            403,
            br#"{"error":{"type":"cluster_block_exception","reason":"blocked by: [FORBIDDEN/6/cluster read-only (api)];"},"status":403}"#,
        );
        assert!(matches!(blocked, BulkFailure::Retry { .. }));

        let malformed = failure(
            400,
            br#"{"error":{"type":"illegal_argument_exception","reason":"The bulk request must be terminated by a newline [\\n]"},"status":400}"#,
        );
        assert!(matches!(malformed, BulkFailure::Fatal { .. }));
        assert!(malformed.to_string().contains("terminated by a newline"));

        let wrong_url = failure(404, br#"{"error":"no handler found for uri [/es/_bulk]"}"#);
        assert!(matches!(wrong_url, BulkFailure::Fatal { .. }));
        assert!(wrong_url.to_string().contains("elasticsearch.url"));
        assert!(wrong_url.to_string().contains("no handler found"));
    }

    #[test]
    fn the_error_table_names_every_classified_type() {
        let table: String = include_str!("bulk.rs")
            .lines()
            .filter(|line| line.starts_with("//! |"))
            .collect();
        for error_type in DOCUMENT_ERROR_TYPES.iter().chain(&[
            "version_conflict_engine_exception",
            "cluster_block_exception",
            "index_closed_exception",
            "index_not_found_exception",
            "es_rejected_execution_exception",
            "illegal_argument_exception",
        ]) {
            assert!(
                table.contains(&format!("`{error_type}`")),
                "{error_type} is missing from the error table"
            );
        }
    }
}
