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
//! `shell` is the operational shell around that path: CLI, configuration, metrics and health.
//! `retry` is the ground floor every side stands on: what to do about a failure (retry, stop,
//! dead-letter) and the one backoff.
//! The invariants every module keeps are written down in `docs/design.md`: versions are commit
//! LSNs, Postgres hears "flushed" only after Kafka has the data, partitions are applied in order,
//! and every queue is bounded.

pub mod backfill;
pub mod event;
pub mod kafka;
pub mod postgres;
pub mod retry;
pub mod shell;
pub mod sink;
pub mod source;
