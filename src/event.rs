//! The event model: one change to one row, as it travels from the source to the sink.
//!
//! Owns the Debezium-compatible envelope (`before`, `after`, `op`, `source` with `lsn`,
//! `commit_lsn`, `txId`, system identifier and timeline), the message key built from the
//! primary key columns, and the headers. The `commit_lsn` of an event is its version in the
//! search index (design invariant 1); nothing downstream may invent another one.
