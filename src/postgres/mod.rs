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

pub mod catalog;
pub mod copy_registry;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod slot;
pub mod snapshot;
pub mod types;
