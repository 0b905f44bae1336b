//! The Kafka side: topics, the producer the source writes through, and the consumer the sink
//! reads from.
//!
//! `consumer`: the sink's consumer group (gap rule, deferred revocations).
//!
//! Owns topic naming and creation (`<topic_prefix>.<schema>.<table>`), producer settings
//! (idempotence, acks=all, no message timeout), and the tracking of which transactions Kafka has
//! acknowledged, from which the source derives the LSN it may confirm to Postgres; control
//! records (`copy_completed`) and the set of tables whose copy is in progress.

pub mod consumer;
pub mod control;
pub mod frontier;
pub mod producer;
pub mod topics;
