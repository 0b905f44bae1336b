//! Indices and aliases: names, the client, settings, mappings and the recorded system identifier.
//!
//! # Names
//!
//! walsync writes to an **alias**, never to an index directly: `tables."s.t".index` when set
//! (used verbatim), else `<index_prefix><schema>.<table>`, made a valid index name by
//! [`alias_name`]. The alias points to one **concrete index**, `<alias>_v1` at first; a backfill
//! into a new version (`_v2`, …) builds the next one beside it and swaps the alias atomically,
//! so readers never see a half-built index.
//!
//! # The system identifier
//!
//! External versions are commit LSNs, comparable only within one PostgreSQL cluster history
//! (design notes §1). Every index walsync creates records the source's system identifier in its
//! mapping's `_meta` (`_meta.walsync.system_id`, a string: a 64-bit identifier does not survive
//! a trip through a JSON double). [`ensure_index`] refuses an index recorded for another system
//! ([`IndexError::ForeignSystem`]) and an index walsync did not create
//! ([`IndexError::Unmanaged`]), instead of writing into it.
//!
//! # Settings
//!
//! Only `index.gc_deletes` is set by default: how long Elasticsearch remembers the version of a
//! deleted document, the window in which a stale insert cannot resurrect it (design notes §5).
//! Shards and replicas keep the server's defaults, so a production cluster gets its usual
//! redundancy; a per-table `settings_file` replaces the defaults, and `gc_deletes` is still
//! added unless the file sets it itself.
//!
//! # Mappings
//!
//! The default mapping is dynamic (new columns need no migration) but cannot be poisoned by
//! one unusual row:
//! - `date_detection` and `numeric_detection` are off, so the first row of a text column that
//!   happens to look like a date or a number (`"2024-01-02"`, `"42"`, a numeric kept as a string,
//!   a timestamp that is `"infinity"`) cannot fix the field's type and get every later row
//!   rejected. Strings are `text` with a `keyword` sub-field (`ignore_above: 256`), the usual
//!   dynamic default, stated explicitly so both engines agree.
//! - Every object below the top level maps to `{"type": "object", "enabled": false}`: `jsonb`
//!   columns are stored and returned in `_source` but not indexed, so documents with arbitrary
//!   or changing shapes can neither explode the field count nor conflict with each other.
//!   Search on jsonb content needs a `mappings_file`.
//! - The metadata object `walsync` is mapped explicitly: `commit_lsn`, `lsn`, `tx_id` and
//!   `source_ts_ms` as `long` (truncates and `verify` query `commit_lsn`; `_version` cannot be
//!   queried), `op` as `keyword`, `deleted` as `boolean` (soft tombstones).
//!
//! Limit: a top-level column still gets one type from its first value. When a `jsonb` column's
//! first value is a scalar (`5`, `"x"`), the field is mapped as that scalar and a later object
//! in it is rejected (a per-document mapping error, dead-lettered by the sink); a
//! `mappings_file` that maps the column as `{"type": "object", "enabled": false}` up front
//! avoids that. The other way round is fine: once mapped as a disabled object, later scalars
//! and arrays are accepted unparsed (seen on OpenSearch 2.19).
//!
//! A per-table `mappings_file` replaces the default mapping; the `walsync` field and `_meta`
//! are always added to it.

use std::path::{Path, PathBuf};

use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::Url;
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::{IndicesCreateParts, IndicesGetMappingParts, IndicesRefreshParts};
use elasticsearch::{CountParts, Elasticsearch};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::config::{ElasticsearchConfig, TableConfig};
use crate::retry::Disposition;
use crate::sink::document::DELETED_PATH;
/// The field every document carries its change metadata in (defined by `sink::document`).
pub use crate::sink::document::METADATA_FIELD;

/// Written into `_meta.walsync.created_by`, so an operator can tell who made an index.
const CREATED_BY: &str = concat!("walsync ", env!("CARGO_PKG_VERSION"));

/// Characters Elasticsearch forbids anywhere in an index name (`:` since 7.0).
const FORBIDDEN_NAME_CHARACTERS: &[char] =
    &['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':'];

/// Characters an index name must not start with (`.` marks hidden and system indices).
const FORBIDDEN_FIRST_CHARACTERS: &[char] = &['_', '-', '+', '.'];

/// Prepended to a generated name that would otherwise start with a forbidden character.
const LEADING_CHARACTER_GUARD: &str = "walsync";

/// Server responses quoted in errors are cut to this many bytes.
const MAX_QUOTED_BODY: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("elasticsearch.url {url:?} is not a valid URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("elasticsearch: both username/password and api_key are configured; keep one of them")]
    ConflictingCredentials,
    #[error("cannot read the Elasticsearch CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Elasticsearch CA file {path} holds no usable PEM certificate: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    #[error("cannot build the Elasticsearch client: {0}")]
    Client(String),
    #[error("cannot read the index override file {path}: {source}")]
    OverrideFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the index override file {path} is not valid JSON: {source}")]
    OverrideJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid index {what} override: {reason}")]
    InvalidOverride { what: &'static str, reason: String },
    #[error("Elasticsearch request failed ({action} {target}): {source}")]
    Transport {
        action: &'static str,
        target: String,
        source: elasticsearch::Error,
    },
    #[error("Elasticsearch refused {action} {target}: HTTP {status}: {body}")]
    Refused {
        action: &'static str,
        target: String,
        status: u16,
        body: String,
    },
    #[error("unexpected Elasticsearch response to {action} {target}: {reason}")]
    UnexpectedResponse {
        action: &'static str,
        target: String,
        reason: String,
    },
    #[error(
        "index {index} (alias {alias}) was built from another PostgreSQL cluster: its _meta \
         records system identifier {index_system_id}, but the source is system {system_id}. \
         After a dump/restore, a new initdb or a move to another cluster, LSNs restart lower, \
         so every write would be rejected as stale against the versions already stored: \
         silent total loss. walsync refuses to write to it. To recover, build a new index from \
         this cluster and swap the alias to it (bump the version: `walsync backfill --into \
         {alias}_v<N+1>`), or, if the index is disposable, delete {index} and let walsync \
         create it again"
    )]
    ForeignSystem {
        alias: String,
        index: String,
        index_system_id: String,
        system_id: String,
    },
    #[error(
        "index {index} (alias {alias}) was not created by walsync: its mapping has no \
         _meta.walsync.system_id. walsync only writes to indices whose source cluster it knows. \
         Delete the index or point the alias elsewhere; or, to adopt it, make sure it maps \
         `walsync.commit_lsn` as long and set `_meta.walsync.system_id` to {system_id} with \
         PUT {index}/_mapping"
    )]
    Unmanaged {
        alias: String,
        index: String,
        system_id: String,
    },
    #[error(
        "{alias} is a concrete index, not an alias: walsync writes through an alias so that a \
         backfill can swap indices atomically. Reindex it into {alias}_v1 and replace it with an \
         alias, or delete it"
    )]
    NotAnAlias { alias: String },
    #[error(
        "alias {alias} points to several indices ({indices}); walsync writes to exactly one. \
         Remove the alias from all but one of them"
    )]
    SeveralIndices { alias: String, indices: String },
    #[error(
        "index {index} exists but alias {alias} does not point to it; add the alias \
         (POST _aliases) if it is walsync's, or delete the index"
    )]
    IndexWithoutAlias { alias: String, index: String },
}

/// The concrete index behind an alias, after [`ensure_index`] checked or created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnsuredIndex {
    pub alias: String,
    pub index: String,
    /// This call created the index (a concurrent creator that lost the race finds it
    /// created by the winner: `false`).
    pub created: bool,
}

/// Per-table replacements of the default settings and mappings, read from the JSON files
/// named by `settings_file` and `mappings_file`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexOverrides {
    pub settings: Option<Value>,
    pub mappings: Option<Value>,
}

impl IndexOverrides {
    pub fn from_table(table: &TableConfig) -> Result<Self, IndexError> {
        Ok(Self {
            settings: table
                .settings_file
                .as_deref()
                .map(read_override_file)
                .transpose()?,
            mappings: table
                .mappings_file
                .as_deref()
                .map(read_override_file)
                .transpose()?,
        })
    }
}

/// The alias walsync writes a table to.
///
/// `tables."s.t".index` is used verbatim when set. Otherwise the name is
/// `<index_prefix><schema>.<table>`, made valid for Elasticsearch: lower-cased (index names
/// must be lower case, so `"Orders"` and `orders` share an alias), every character
/// Elasticsearch forbids (`\ / * ? " < > | , # :` and space) replaced by `_`, and a name that
/// would start with `_`, `-`, `+` or `.` prefixed with `walsync` (`_audit.log` becomes
/// `walsync_audit.log`).
pub fn alias_name(
    config: &ElasticsearchConfig,
    table: &TableConfig,
    schema: &str,
    table_name: &str,
) -> String {
    if let Some(index) = &table.index {
        return index.clone();
    }
    valid_index_name(&format!("{}{schema}.{table_name}", config.index_prefix))
}

fn valid_index_name(raw: &str) -> String {
    let replaced: String = raw
        .to_lowercase()
        .chars()
        .map(|character| {
            if FORBIDDEN_NAME_CHARACTERS.contains(&character) {
                '_'
            } else {
                character
            }
        })
        .collect();
    if replaced.starts_with(FORBIDDEN_FIRST_CHARACTERS) {
        format!("{LEADING_CHARACTER_GUARD}{replaced}")
    } else {
        replaced
    }
}

/// The concrete index of `alias` at `version` (1, 2, …): `<alias>_v<version>`.
pub fn versioned_index_name(alias: &str, version: u32) -> String {
    format!("{alias}_v{version}")
}

/// A client for the configured server: one node, basic auth or an API key, and the CA file
/// (when given) as the only extra trusted root.
///
/// An `api_key` is either the encoded form Elasticsearch prints (base64 of `id:key`) or
/// `id:key` itself. Credentials in the URL (`https://user:pass@host`) are used when no others
/// are configured.
pub fn build_client(config: &ElasticsearchConfig) -> Result<Elasticsearch, IndexError> {
    let mut url = Url::parse(&config.url).map_err(|error| IndexError::InvalidUrl {
        url: crate::config::redact_url(&config.url),
        reason: error.to_string(),
    })?;
    // reqwest would send URL credentials as a second Authorization header.
    let url_credentials = take_url_credentials(&mut url);
    let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(url));
    if let Some(credentials) = configured_credentials(config)?.or(url_credentials) {
        builder = builder.auth(credentials);
    }
    if let Some(path) = &config.ca_file {
        builder = builder.cert_validation(CertificateValidation::Full(read_ca(path)?));
    }
    let transport = builder
        .build()
        .map_err(|error| IndexError::Client(error.to_string()))?;
    Ok(Elasticsearch::new(transport))
}

fn configured_credentials(config: &ElasticsearchConfig) -> Result<Option<Credentials>, IndexError> {
    match (&config.username, &config.api_key) {
        (Some(_), Some(_)) => Err(IndexError::ConflictingCredentials),
        (Some(username), None) => Ok(Some(Credentials::Basic(
            username.clone(),
            config
                .password
                .as_ref()
                .map(|password| password.expose().to_owned())
                .unwrap_or_default(),
        ))),
        (None, Some(api_key)) => Ok(Some(match api_key.expose().split_once(':') {
            Some((id, key)) => Credentials::ApiKey(id.to_owned(), key.to_owned()),
            None => Credentials::EncodedApiKey(api_key.expose().to_owned()),
        })),
        (None, None) => Ok(None),
    }
}

fn take_url_credentials(url: &mut Url) -> Option<Credentials> {
    if url.username().is_empty() {
        return None;
    }
    let credentials = Credentials::Basic(
        url.username().to_owned(),
        url.password().unwrap_or_default().to_owned(),
    );
    // Both only fail for URLs that cannot carry credentials, and this one just did.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Some(credentials)
}

fn read_ca(path: &Path) -> Result<Certificate, IndexError> {
    let pem = std::fs::read(path).map_err(|source| IndexError::CaFile {
        path: path.to_owned(),
        source,
    })?;
    Certificate::from_pem(&pem).map_err(|error| IndexError::InvalidCa {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// Reads a settings or mappings override file: a JSON object, the body of `settings` or
/// `mappings` (a body wrapped in `{"settings": …}` or `{"mappings": …}` is accepted too).
pub fn read_override_file(path: &Path) -> Result<Value, IndexError> {
    let text = std::fs::read(path).map_err(|source| IndexError::OverrideFile {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| IndexError::OverrideJson {
        path: path.to_owned(),
        source,
    })
}

/// The mapping walsync gives an index unless a `mappings_file` replaces it (see the module
/// doc), without `_meta`.
pub fn default_mappings() -> Value {
    json!({
        "dynamic": true,
        "date_detection": false,
        "numeric_detection": false,
        "dynamic_templates": [
            {"objects_stored_not_indexed": {
                "match_mapping_type": "object",
                "mapping": {"type": "object", "enabled": false}
            }},
            {"strings_as_text_and_keyword": {
                "match_mapping_type": "string",
                "mapping": {
                    "type": "text",
                    "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}
                }
            }}
        ],
        "properties": {METADATA_FIELD: metadata_field_mapping()}
    })
}

fn metadata_field_mapping() -> Value {
    let mut mapping = crate::sink::document::DocumentMetadata::mapping();
    if let Some(object) = mapping.as_object_mut() {
        object.insert("type".into(), json!("object"));
    }
    mapping
}

/// The `mappings` of a new index: the override or the default, always with the metadata field
/// and `_meta.walsync` (other `_meta` keys of an override are kept).
pub fn index_mappings(
    mappings_override: Option<&Value>,
    system_id: &str,
) -> Result<Value, IndexError> {
    let mut mappings = match mappings_override {
        Some(value) => unwrap_section(value, "mappings")?,
        None => default_mappings(),
    };
    let root = mappings
        .as_object_mut()
        .ok_or_else(|| not_an_object("mappings", "the mapping"))?;
    object_entry(root, "properties", "mappings")?
        .insert(METADATA_FIELD.to_owned(), metadata_field_mapping());
    object_entry(root, "_meta", "mappings")?.insert(
        METADATA_FIELD.to_owned(),
        json!({"system_id": system_id, "created_by": CREATED_BY}),
    );
    Ok(mappings)
}

/// The `settings` of a new index: the override or none, plus `index.gc_deletes` unless the
/// override sets it (as `{"index": {"gc_deletes": …}}` or `{"index.gc_deletes": …}`).
pub fn index_settings(
    settings_override: Option<&Value>,
    gc_deletes: &str,
) -> Result<Value, IndexError> {
    let mut settings = match settings_override {
        Some(value) => unwrap_section(value, "settings")?,
        None => json!({}),
    };
    let root = settings
        .as_object_mut()
        .ok_or_else(|| not_an_object("settings", "the settings"))?;
    let sets_gc_deletes = root.contains_key("index.gc_deletes")
        || root
            .get("index")
            .and_then(|index| index.get("gc_deletes"))
            .is_some();
    if !sets_gc_deletes {
        object_entry(root, "index", "settings")?.insert(
            "gc_deletes".to_owned(),
            Value::String(gc_deletes.to_owned()),
        );
    }
    Ok(settings)
}

/// `{"mappings": {…}}` → `{…}`: files copied from an API response carry the wrapper.
fn unwrap_section(value: &Value, section: &'static str) -> Result<Value, IndexError> {
    let object = value
        .as_object()
        .ok_or_else(|| not_an_object(section, "the file"))?;
    match object.get(section) {
        Some(inner) if object.len() == 1 => Ok(inner.clone()),
        _ => Ok(value.clone()),
    }
}

/// The object under `key`, created when missing.
fn object_entry<'a>(
    parent: &'a mut Map<String, Value>,
    key: &str,
    what: &'static str,
) -> Result<&'a mut Map<String, Value>, IndexError> {
    parent
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| IndexError::InvalidOverride {
            what,
            reason: format!("`{key}` must be a JSON object"),
        })
}

fn not_an_object(what: &'static str, subject: &str) -> IndexError {
    IndexError::InvalidOverride {
        what,
        reason: format!("{subject} must be a JSON object"),
    }
}

/// Makes sure `alias` points to an index built from `system_id`, creating `<alias>_v1` when
/// the alias does not exist.
///
/// An existing index is accepted only if its `_meta.walsync.system_id` is `system_id`
/// (see [`IndexError::ForeignSystem`]); its settings and mappings are left as they are. A new
/// index gets [`index_settings`] and [`index_mappings`] and the alias in the same request, so
/// no one ever sees the index without its alias. When another walsync process creates it at
/// the same moment, the loser reads the winner's index.
pub async fn ensure_index(
    client: &Elasticsearch,
    alias: &str,
    system_id: &str,
    settings_override: Option<&Value>,
    mappings_override: Option<&Value>,
    gc_deletes: &str,
) -> Result<EnsuredIndex, IndexError> {
    if let Some(existing) = read_alias(client, alias).await? {
        check_system_id(&existing, alias, system_id)?;
        return Ok(EnsuredIndex {
            alias: alias.to_owned(),
            index: existing.index,
            created: false,
        });
    }
    let index = versioned_index_name(alias, 1);
    let body = json!({
        "settings": index_settings(settings_override, gc_deletes)?,
        "mappings": index_mappings(mappings_override, system_id)?,
        "aliases": {alias: {}},
    });
    let response = client
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(body)
        .send()
        .await
        .map_err(|source| transport_error("create index", &index, source))?;
    if response.status_code().is_success() {
        return Ok(EnsuredIndex {
            alias: alias.to_owned(),
            index,
            created: true,
        });
    }
    let refusal = refused(response, "create index", &index).await;
    if !is_error_type(&refusal, "resource_already_exists_exception") {
        return Err(refusal);
    }
    // A concurrent creator won, or the index exists without the alias.
    let existing =
        read_alias(client, alias)
            .await?
            .ok_or_else(|| IndexError::IndexWithoutAlias {
                alias: alias.to_owned(),
                index: index.clone(),
            })?;
    check_system_id(&existing, alias, system_id)?;
    Ok(EnsuredIndex {
        alias: alias.to_owned(),
        index: existing.index,
        created: false,
    })
}

/// What an alias points to, as far as [`ensure_index`] cares.
pub struct AliasTarget {
    pub index: String,
    pub system_id: Option<String>,
}

/// The concrete index behind `alias` and its recorded system identifier; `None` when nothing
/// has that name.
pub async fn read_alias(
    client: &Elasticsearch,
    alias: &str,
) -> Result<Option<AliasTarget>, IndexError> {
    let response = client
        .indices()
        .get_mapping(IndicesGetMappingParts::Index(&[alias]))
        .send()
        .await
        .map_err(|source| transport_error("read mapping", alias, source))?;
    if response.status_code().as_u16() == 404 {
        return Ok(None);
    }
    let mappings_by_index: Map<String, Value> =
        success_json(response, "read mapping", alias).await?;
    if mappings_by_index.contains_key(alias) {
        return Err(IndexError::NotAnAlias {
            alias: alias.to_owned(),
        });
    }
    let mut indices = mappings_by_index.into_iter();
    let (index, mapping) = match (indices.next(), indices.next()) {
        (Some(only), None) => only,
        (Some((first, _)), Some((second, _))) => {
            let mut names = vec![first, second];
            names.extend(indices.map(|(name, _)| name));
            return Err(IndexError::SeveralIndices {
                alias: alias.to_owned(),
                indices: names.join(", "),
            });
        }
        (None, _) => return Ok(None),
    };
    let system_id = mapping
        .pointer("/mappings/_meta/walsync/system_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Some(AliasTarget { index, system_id }))
}

fn check_system_id(target: &AliasTarget, alias: &str, system_id: &str) -> Result<(), IndexError> {
    match &target.system_id {
        Some(recorded) if recorded == system_id => Ok(()),
        Some(recorded) => Err(IndexError::ForeignSystem {
            alias: alias.to_owned(),
            index: target.index.clone(),
            index_system_id: recorded.clone(),
            system_id: system_id.to_owned(),
        }),
        None => Err(IndexError::Unmanaged {
            alias: alias.to_owned(),
            index: target.index.clone(),
            system_id: system_id.to_owned(),
        }),
    }
}

/// Makes every write acknowledged so far visible to searches and counts.
pub async fn refresh(client: &Elasticsearch, alias: &str) -> Result<(), IndexError> {
    let response = client
        .indices()
        .refresh(IndicesRefreshParts::Index(&[alias]))
        .send()
        .await
        .map_err(|source| transport_error("refresh", alias, source))?;
    success_json::<Value>(response, "refresh", alias)
        .await
        .map(drop)
}

/// The number of documents behind `alias` as of the last refresh, soft tombstones included.
pub async fn count(client: &Elasticsearch, alias: &str) -> Result<u64, IndexError> {
    count_matching(client, alias, json!({"match_all": {}})).await
}

/// The number of documents behind `alias` as of the last refresh that are not soft tombstones:
/// the number of rows the index claims the table has.
pub async fn count_live(client: &Elasticsearch, alias: &str) -> Result<u64, IndexError> {
    count_matching(client, alias, not_deleted_query()).await
}

/// Matches every document except soft tombstones; searches over a `delete_mode = "soft"` index
/// add this filter.
pub fn not_deleted_query() -> Value {
    json!({"bool": {"must_not": {"term": {DELETED_PATH: true}}}})
}

async fn count_matching(
    client: &Elasticsearch,
    alias: &str,
    query: Value,
) -> Result<u64, IndexError> {
    let response = client
        .count(CountParts::Index(&[alias]))
        .body(json!({"query": query}))
        .send()
        .await
        .map_err(|source| transport_error("count", alias, source))?;
    success_json::<Value>(response, "count", alias)
        .await?
        .get("count")
        .and_then(Value::as_u64)
        .ok_or_else(|| unexpected("count", alias, "no `count` number"))
}

/// The JSON body of a successful response, or [`IndexError::Refused`] with the server's words.
pub(crate) async fn success_json<T: DeserializeOwned>(
    response: Response,
    action: &'static str,
    target: &str,
) -> Result<T, IndexError> {
    if !response.status_code().is_success() {
        return Err(refused(response, action, target).await);
    }
    response
        .json()
        .await
        .map_err(|source| transport_error(action, target, source))
}

pub(crate) async fn refused(response: Response, action: &'static str, target: &str) -> IndexError {
    let status = response.status_code().as_u16();
    let mut body = response.text().await.unwrap_or_default();
    if body.len() > MAX_QUOTED_BODY {
        let cut = (0..=MAX_QUOTED_BODY)
            .rev()
            .find(|&position| body.is_char_boundary(position))
            .unwrap_or(0);
        body.truncate(cut);
        body.push('…');
    }
    IndexError::Refused {
        action,
        target: target.to_owned(),
        status,
        body,
    }
}

/// Whether a refusal carries Elasticsearch error `error_type` (`error.type` in the body).
/// The one rule for answers of the search server to a request (not to one bulk item, which
/// `sink::bulk` judges on top of this): what may pass by itself is retried with backoff — a
/// timeout or throttling (408, 429), the server or a proxy failing or starting (5xx), and a
/// cluster-wide write block (`cluster_block_exception`, e.g. read-only after the flood-stage
/// disk watermark, lifted by the operator or by the server once disk is freed). Everything
/// else needs an operator: wrong credentials (401), missing privileges (403), a wrong URL or
/// path prefix (404 where an index was expected to exist, 405), and requests the server
/// refused as such (other 4xx).
pub fn answer_disposition(status: u16, error_type: Option<&str>) -> Disposition {
    match status {
        408 | 429 | 500.. => Disposition::Retry,
        _ if error_type == Some("cluster_block_exception") => Disposition::Retry,
        _ => Disposition::Stop,
    }
}

/// The `error.type` of an error answer's body, when it is JSON.
pub fn answer_error_type(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    Some(value.pointer("/error/type")?.as_str()?.to_owned())
}

impl IndexError {
    /// What to do about it: the transport failing is retried, an answer by
    /// [`answer_disposition`], and everything walsync decided itself (a bad URL, credentials,
    /// override files, an index from another cluster or not walsync's) stops.
    pub fn disposition(&self) -> Disposition {
        match self {
            IndexError::Transport { .. } => Disposition::Retry,
            IndexError::Refused { status, body, .. } => {
                answer_disposition(*status, answer_error_type(body).as_deref())
            }
            _ => Disposition::Stop,
        }
    }
}

fn is_error_type(error: &IndexError, error_type: &str) -> bool {
    let IndexError::Refused { body, .. } = error else {
        return false;
    };
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| {
            value
                .pointer("/error/type")
                .and_then(Value::as_str)
                .map(|found| found == error_type)
        })
        .unwrap_or(false)
}

pub(crate) fn transport_error(
    action: &'static str,
    target: &str,
    source: elasticsearch::Error,
) -> IndexError {
    IndexError::Transport {
        action,
        target: target.to_owned(),
        source,
    }
}

pub(crate) fn unexpected(action: &'static str, target: &str, reason: &str) -> IndexError {
    IndexError::UnexpectedResponse {
        action,
        target: target.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn refused(status: u16, body: &str) -> IndexError {
        IndexError::Refused {
            action: "check",
            target: "shop".into(),
            status,
            body: body.into(),
        }
    }

    #[test]
    fn every_request_follows_one_rule_for_the_search_servers_answers() {
        // Creating or checking an index, delete-by-query and a bulk
        // request as a whole used to disagree on these; they all ask this one rule now.
        for status in [408, 429, 500, 502, 503, 504] {
            assert_eq!(
                answer_disposition(status, None),
                Disposition::Retry,
                "{status}"
            );
            assert_eq!(
                refused(status, "<html>proxy</html>").disposition(),
                Disposition::Retry
            );
        }
        let block = r#"{"error":{"type":"cluster_block_exception","reason":"index [shop_v1] blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete block]"},"status":429}"#;
        assert_eq!(refused(429, block).disposition(), Disposition::Retry);
        let read_only = r#"{"error":{"type":"cluster_block_exception","reason":"blocked by: [FORBIDDEN/6/cluster read-only (api)];"},"status":403}"#;
        assert_eq!(refused(403, read_only).disposition(), Disposition::Retry);
        // Credentials and privileges need an operator: never retried forever.
        let unauthorized = r#"{"error":{"type":"security_exception","reason":"unable to authenticate user [walsync]"},"status":401}"#;
        assert_eq!(refused(401, unauthorized).disposition(), Disposition::Stop);
        let forbidden = r#"{"error":{"type":"security_exception","reason":"action [indices:data/read/mget] is unauthorized"},"status":403}"#;
        assert_eq!(refused(403, forbidden).disposition(), Disposition::Stop);
        for status in [400, 404, 405, 406, 415] {
            assert_eq!(
                refused(status, "{}").disposition(),
                Disposition::Stop,
                "{status}"
            );
        }
        assert_eq!(
            IndexError::NotAnAlias {
                alias: "shop".into()
            }
            .disposition(),
            Disposition::Stop
        );
    }

    fn config_with_prefix(prefix: &str) -> ElasticsearchConfig {
        ElasticsearchConfig {
            index_prefix: prefix.to_owned(),
            ..ElasticsearchConfig::default()
        }
    }

    #[test]
    fn the_alias_is_prefix_schema_and_table_in_lower_case() {
        let name = alias_name(
            &config_with_prefix("Shop-"),
            &TableConfig::default(),
            "Sales",
            "Orders",
        );
        assert_eq!(name, "shop-sales.orders");
    }

    #[test]
    fn an_explicit_index_is_used_verbatim() {
        let table = TableConfig {
            index: Some("products-live".into()),
            ..TableConfig::default()
        };
        assert_eq!(
            alias_name(&config_with_prefix("x-"), &table, "public", "products"),
            "products-live"
        );
    }

    #[test]
    fn characters_elasticsearch_forbids_become_underscores() {
        let name = alias_name(
            &config_with_prefix(""),
            &TableConfig::default(),
            "my schema",
            "a\\b/c*d?e\"f<g>h|i,j#k:l",
        );
        assert_eq!(name, "my_schema.a_b_c_d_e_f_g_h_i_j_k_l");
    }

    #[test]
    fn a_forbidden_first_character_gets_a_prefix_not_a_replacement() {
        for (schema, expected) in [
            ("_audit", "walsync_audit.log"),
            ("-audit", "walsync-audit.log"),
            ("+audit", "walsync+audit.log"),
            (".audit", "walsync.audit.log"),
        ] {
            let name = alias_name(
                &config_with_prefix(""),
                &TableConfig::default(),
                schema,
                "log",
            );
            assert_eq!(name, expected);
        }
    }

    #[test]
    fn concrete_indices_are_versioned_from_one() {
        assert_eq!(versioned_index_name("public.orders", 1), "public.orders_v1");
    }

    #[test]
    fn the_default_mapping_turns_detection_off_and_objects_into_stored_values() {
        let mappings = index_mappings(None, "7300000000000000001").expect("default mapping");
        assert_eq!(mappings["date_detection"], json!(false));
        assert_eq!(mappings["numeric_detection"], json!(false));
        assert_eq!(
            mappings["dynamic_templates"][0]["objects_stored_not_indexed"]["mapping"],
            json!({"type": "object", "enabled": false})
        );
        assert_eq!(
            mappings["properties"]["walsync"]["properties"]["commit_lsn"],
            json!({"type": "long"})
        );
        assert_eq!(
            mappings["_meta"]["walsync"]["system_id"],
            json!("7300000000000000001")
        );
    }

    #[test]
    fn a_mappings_override_replaces_the_default_but_keeps_metadata_and_its_own_meta() {
        let custom = json!({"mappings": {
            "dynamic": "strict",
            "properties": {"title": {"type": "keyword"}, "walsync": {"type": "keyword"}},
            "_meta": {"team": "search"}
        }});
        let mappings = index_mappings(Some(&custom), "42").expect("override");
        assert_eq!(mappings["dynamic"], json!("strict"));
        assert!(mappings.get("dynamic_templates").is_none());
        assert_eq!(mappings["properties"]["title"], json!({"type": "keyword"}));
        assert_eq!(
            mappings["properties"]["walsync"]["properties"]["op"],
            json!({"type": "keyword"})
        );
        assert_eq!(mappings["_meta"]["team"], json!("search"));
        assert_eq!(mappings["_meta"]["walsync"]["system_id"], json!("42"));
    }

    #[test]
    fn gc_deletes_is_added_unless_the_override_sets_it() {
        assert_eq!(
            index_settings(None, "10m").expect("default"),
            json!({"index": {"gc_deletes": "10m"}})
        );
        let replicas = json!({"index": {"number_of_replicas": 0}});
        assert_eq!(
            index_settings(Some(&replicas), "10m").expect("override"),
            json!({"index": {"number_of_replicas": 0, "gc_deletes": "10m"}})
        );
        let flat = json!({"index.gc_deletes": "1h"});
        assert_eq!(
            index_settings(Some(&flat), "10m").expect("flat"),
            json!({"index.gc_deletes": "1h"})
        );
        let nested = json!({"settings": {"index": {"gc_deletes": "2h"}}});
        assert_eq!(
            index_settings(Some(&nested), "10m").expect("nested"),
            json!({"index": {"gc_deletes": "2h"}})
        );
    }

    #[test]
    fn an_override_that_is_not_an_object_is_refused() {
        let error = index_settings(Some(&json!([1])), "10m").unwrap_err();
        assert!(
            matches!(error, IndexError::InvalidOverride { .. }),
            "{error}"
        );
        let error = index_mappings(Some(&json!({"properties": 3})), "1").unwrap_err();
        assert!(error.to_string().contains("properties"), "{error}");
    }

    #[test]
    fn basic_auth_and_an_api_key_together_are_refused() {
        let config = ElasticsearchConfig {
            username: Some("elastic".into()),
            api_key: Some(Secret::new("abc")),
            ..ElasticsearchConfig::default()
        };
        assert!(matches!(
            build_client(&config),
            Err(IndexError::ConflictingCredentials)
        ));
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let config = ElasticsearchConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..ElasticsearchConfig::default()
        };
        let error = build_client(&config).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn an_invalid_url_is_named() {
        let config = ElasticsearchConfig {
            url: "not a url".into(),
            ..ElasticsearchConfig::default()
        };
        let error = build_client(&config).unwrap_err();
        assert!(error.to_string().contains("not a url"), "{error}");
    }

    #[test]
    fn url_credentials_move_out_of_the_url() {
        let mut url = Url::parse("https://user:pw@es.example:9200").expect("url");
        let credentials = take_url_credentials(&mut url);
        assert!(
            matches!(credentials, Some(Credentials::Basic(user, pw)) if user == "user" && pw == "pw")
        );
        assert_eq!(url.as_str(), "https://es.example:9200/");
    }
}
