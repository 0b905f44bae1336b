//! The PostgreSQL side: everything that talks to, or decodes bytes from, the source database.
//!
//! - `replication`: the logical replication client (startup with `replication=database`,
//!   authentication, TLS, CopyBoth streaming, standby status updates).
//! - `lsn`: the log sequence number type.
//! - `pgoutput`: the pure decoder of pgoutput messages; no I/O, fuzzable.
//! - `types`: the codec from Postgres text values to JSON, shared by streaming and snapshots.
//! - `catalog`: the metadata connection (settings, privileges, tables, slots, publications).
//! - `slot`: replication slot and publication management, preflight checks, migrations.
//! - `snapshot`: the consistent initial copy and backfills, versioned at `cp − 1`.
//! - `copy_registry`: how a backfill in another process tells the source it is copying.
//! - `row_reader`: re-reads one row by its key for the sink's TOAST fill (bound parameters).

pub mod catalog;
pub mod copy_registry;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod row_reader;
pub mod slot;
pub mod snapshot;
pub mod types;

/// Whether a PostgreSQL error may pass by itself, so the operation is retried with backoff: the
/// connection broke or could not be made (class 08, a closed client), the server is shutting
/// down or restarting (57P), it is out of resources (53), a serialization failure or deadlock
/// (40001, 40P01), or an object is in use (55006). Anything else needs an operator.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    let code = error.code().map(|code| code.code()).unwrap_or("");
    error.is_closed()
        || code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("53")
        || matches!(code, "40001" | "40P01" | "55006")
}
