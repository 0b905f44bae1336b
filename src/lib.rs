//! walsync: change data capture from PostgreSQL to Kafka to Elasticsearch.
//!
//! Data flows one way, and the modules follow it:
//!
//! ```text
//!   WAL ──► postgres ──────► kafka ──► sink ──► Elasticsearch
//!          (replication,      (topics,   (bulk,
//!           pgoutput, types,   producer,  versions,
//!           slots, writing     consumer)  deletes, TOAST fills)
//!           events)
//!                 └── event ──┘  the model both sides share (envelope, key, headers)
//! ```
//!
//! `postgres` and `kafka` each depend on `event` and never on each other. `source` wires the
//! first half (WAL → Kafka) together and owns the confirmation loop; what needs both
//! PostgreSQL and Kafka (the snapshot's copy, the tables being copied) lives under it.
//! `sink` reads from Kafka and writes to the search server; it re-reads rows from PostgreSQL
//! through the `event::rows::RowSource` contract, which `postgres` implements.
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
