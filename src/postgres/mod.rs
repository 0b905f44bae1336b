//! The PostgreSQL side: everything that talks to, or decodes bytes from, the source database.
//!
//! - `replication`: the logical replication client (startup with `replication=database`,
//!   authentication, TLS, CopyBoth streaming, standby status updates).
//! - `pgoutput`: the pure decoder of pgoutput messages; no I/O, fuzzable.
//! - `types`: the codec from Postgres text values to JSON, shared by streaming and snapshots.
//! - `catalog`: the metadata connection (settings, privileges, tables, slots, publications).
//! - `slot`: replication slot and publication management, preflight checks, migrations.
//! - `copy_registry`: how a backfill in another process tells the source it is copying.
//! - `row_reader`: re-reads one row by its key for the sink's TOAST fill (bound parameters).
//! - `events`: writes the event model's records from decoded tuples and copied rows.

pub mod catalog;
pub mod copy_registry;
pub mod events;
pub mod pgoutput;
pub mod replication;
pub mod row_reader;
pub mod slot;
pub mod types;

use crate::retry::Disposition;

/// The one rule for PostgreSQL errors, by SQLSTATE: what may pass by itself is retried with
/// backoff — the connection broke or could not be made (class 08), the server is shutting down
/// or restarting (57P), it is out of resources (53), a serialization failure or deadlock
/// (40001, 40P01), or an object is in use (55006: a slot still held by a dying walsender).
/// Anything else (privileges, missing objects, configuration, bad data) needs an operator.
/// Used for the replication protocol's errors and for every other connection's.
pub fn sqlstate_disposition(code: &str) -> Disposition {
    let transient = code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("53")
        || matches!(code, "40001" | "40P01" | "55006");
    if transient {
        Disposition::Retry
    } else {
        Disposition::Stop
    }
}

/// What to do about a `tokio_postgres` error: by its SQLSTATE when the server sent one; a
/// closed connection, or an I/O failure underneath (connection refused, reset, timed out), is
/// retried; anything else without a SQLSTATE (authentication, TLS, configuration, a value that
/// does not convert) needs an operator.
pub fn disposition(error: &tokio_postgres::Error) -> Disposition {
    if let Some(code) = error.code() {
        return sqlstate_disposition(code.code());
    }
    if error.is_closed() || has_io_cause(error) {
        Disposition::Retry
    } else {
        Disposition::Stop
    }
}

/// Whether an I/O error is among the causes of `error`.
fn has_io_cause(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = error.source();
    while let Some(inner) = cause {
        if inner.is::<std::io::Error>() {
            return true;
        }
        cause = inner.source();
    }
    false
}

/// Whether a PostgreSQL error may pass by itself ([`disposition`] says retry).
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    disposition(error) == Disposition::Retry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_shutdown_resource_lock_and_serialization_states_are_retried() {
        for code in [
            "08000", "08006", "08P01", "57P01", "57P02", "57P03", "57P04", "53000", "53100",
            "53200", "53300", "40001", "40P01", "55006",
        ] {
            assert_eq!(sqlstate_disposition(code), Disposition::Retry, "{code}");
        }
    }

    #[test]
    fn privileges_missing_objects_and_configuration_stop() {
        // 42501 insufficient privilege, 42P01 undefined table, 28P01 wrong password,
        // 55000 object not in prerequisite state (wal_level), 42704 undefined object (slot),
        // 22P02 invalid text representation.
        for code in [
            "42501", "42P01", "28P01", "28000", "55000", "42704", "22P02", "",
        ] {
            assert_eq!(sqlstate_disposition(code), Disposition::Stop, "{code}");
        }
    }
}
