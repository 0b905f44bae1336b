//! The Elasticsearch sink: applies change events to indices idempotently.
//!
//! Owns index and alias management, document ids from primary keys, bulk batching per
//! partition in offset order, external versions (`external_gte` with the commit LSN), the
//! classification of bulk errors into retry / dead-letter, deletes and truncates, and the
//! comparison core that decides whether an index equals its table. It speaks only the REST API
//! that Elasticsearch 7.10+/8/9 and OpenSearch 2.x share.
//!
//! - `document`: event → document id and body (pure).
//! - `bulk`: NDJSON bulk bodies and per-item outcomes (pure).
//! - `index`: indices, aliases, settings, mappings, the recorded system identifier.
//! - `partitions`: per-partition queues and bulks in flight (pure).
//! - `routing`: the topic decides a record's table; records that disagree are refused (pure).
//! - `toast`: where an unchanged TOAST value comes from (the fill rule, pure).
//! - `apply`: the loop that consumes, applies and commits; it never jumps over a gap.
//! - `compare`: does an index equal its table?

pub mod apply;
pub mod bulk;
pub mod compare;
pub mod document;
pub mod index;
pub mod partitions;
pub mod routing;
pub mod toast;
