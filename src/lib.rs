//! walsync: change data capture from PostgreSQL to Kafka to Elasticsearch.
//!
//! Data flows one way, and the modules follow it:
//!
//! ```text
//!   WAL ──► postgres ──► event ──► kafka ──► sink ──► Elasticsearch
//!          (replication,  (the     (topics,   (bulk,
//!           pgoutput,     change    producer,  versions,
//!           types, slots, envelope) consumer)  deletes)
//!           snapshots)
//! ```
//!
//! `source` wires the first half (WAL → Kafka) together and owns the confirmation loop.
//! `backfill` re-copies one table beside the running pipeline (`walsync backfill`).
//! `shell` is the operational shell around that path (the roof): the CLI, the operator's
//! commands (`check`, `slot`, `verify`) and the HTTP endpoints.
//!
//! The ground floor, below every side and importing none of them: `config` (the configuration
//! and its validation, secrets), `metrics` (metric names and the recorder), `health` (the
//! readiness state the sides update), `lsn` (the log sequence number, every version's type),
//! `retry` (what to do about a failure, and the one backoff).
//! The invariants every module keeps are written down in `docs/design.md`: versions are commit
//! LSNs, Postgres hears "flushed" only after Kafka has the data, partitions are applied in order,
//! and every queue is bounded.

pub mod backfill;
pub mod config;
pub mod event;
pub mod health;
pub mod kafka;
pub mod lsn;
pub mod metrics;
pub mod postgres;
pub mod retry;
pub mod shell;
pub mod sink;
pub mod source;
