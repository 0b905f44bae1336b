//! The replication protocol client, built on `postgres-protocol` because upstream
//! `tokio-postgres` has no replication mode.
//!
//! Owns the replication connection (startup, authentication, TLS), replication commands
//! (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, START_REPLICATION), the CopyBoth stream of
//! XLogData and keepalives, and standby status updates, which keep flowing even while the
//! pipeline downstream is back-pressured.
