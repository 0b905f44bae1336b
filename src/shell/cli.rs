//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Change data capture from PostgreSQL (pgoutput) to Kafka to Elasticsearch.
///
/// Reads the configuration from a TOML file (default walsync.toml); every key can be
/// overridden with WALSYNC_<SECTION>__<KEY> environment variables.
#[derive(Debug, Parser)]
#[command(name = "walsync", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "walsync.toml",
        env = "WALSYNC_CONFIG"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream changes from PostgreSQL to Kafka. Confirms WAL to PostgreSQL only once Kafka has
    /// acknowledged it; stops cleanly on SIGTERM or Ctrl-C (exit 0 when everything drained).
    Source,
    /// Apply events from Kafka to Elasticsearch: idempotent writes versioned by commit LSN,
    /// offsets committed only after the documents are written. Stops cleanly on SIGTERM.
    Sink,
    /// Run the source and the sink in one process (the everyday deployment).
    Run,
    /// Apply walsync's pending migrations (its `walsync` schema in the source database) and
    /// print what was applied.
    Migrate,
    /// Preflight: check everything the pipeline needs, changing nothing.
    ///
    /// Prints one line per check, `✓ <what>` or `✗ <what>: <problem> — fix: <how>`:
    /// PostgreSQL (reachable, wal_level, free slots and wal senders, the role's replication
    /// privilege, publication, tables, keys, replica identity and TOAST, the slot), Kafka
    /// (reachable, topics present or creatable) and the search server (engine, version, each
    /// index's system identifier). Every step has a deadline. Exit code 1 when any check fails.
    Check,
    /// Inspect or drop walsync's replication slot (`postgres.slot`).
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
    /// Compare each table with its index on the live system; exit 1 on divergence.
    ///
    /// Compares as of one exported snapshot, once the sink has passed it: documents newer than
    /// the snapshot are skipped and every difference is re-checked under a second snapshot, so
    /// lag never reads as divergence. Prints per table the counts, then the missing, extra and
    /// different ids.
    /// Exit code 0: no divergence; 1: divergence found; 2: verify could not run (an error, or
    /// the pipeline did not catch up in time).
    Verify(VerifyArgs),
    /// Re-copy one table (or a slice) while the pipeline keeps running: its rows go through the
    /// table's topic at the version of a fresh snapshot, below every change streamed after it.
    /// A full backfill then removes documents of rows deleted while nobody was watching.
    /// With --into, builds a new index and swaps the table's alias to it (zero downtime).
    /// Needs the source running: it registers with it first, so deletes during the copy
    /// become soft tombstones.
    Backfill(BackfillArgs),
}

#[derive(Debug, Subcommand)]
pub enum SlotAction {
    /// Show the slot's position, health and lag.
    ///
    /// Shows the active pid, confirmed_flush_lsn, restart_lsn, wal_status, the lag in
    /// bytes (unconfirmed and retained WAL) and in time (the walsender's flush_lag).
    Status,
    /// Drop the slot and walsync's records of it (needs --yes).
    ///
    /// Clears walsync's records of the slot (walsync.snapshot_progress,
    /// walsync.source_state, walsync.heartbeat). PostgreSQL stops holding WAL for it; the next
    /// start creates a new slot and copies every table again. Refuses without --yes, and while
    /// a walsender uses the slot.
    Drop {
        /// Confirm: the slot's position is lost and the tables are copied again on next start.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Verify only this table (`schema.table`, as in postgres.tables); repeat for several.
    /// Default: every configured table.
    #[arg(long = "table", value_name = "SCHEMA.TABLE")]
    pub tables: Vec<String>,
    /// Compare only this fraction (0 < f ≤ 1) of the ids, chosen by a stable hash, so the same
    /// ids are compared every run.
    #[arg(long, value_name = "FRACTION")]
    pub sample: Option<f64>,
    /// How many ids of each kind (missing, extra, different) to print per table.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub show: usize,
    /// How long to wait for the source and the sink to pass the snapshot before giving up.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub wait_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// The table, as `schema.table` (a name without a schema means `public`).
    pub table: String,
    /// Copy only the rows matching this SQL predicate, e.g. "updated_at > now() - interval '1 day'".
    #[arg(long = "where", value_name = "PREDICATE")]
    pub filter: Option<String>,
    /// Build this new index (same settings and mappings as walsync would create) and swap the
    /// table's alias to it once it has caught up with the stream.
    #[arg(long, value_name = "INDEX")]
    pub into: Option<String>,
    /// With --into: delete the index the alias pointed to before, after the swap.
    #[arg(long, requires = "into")]
    pub delete_old: bool,
    /// How long to wait for the stream and the sink to apply the copy, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
    pub timeout: u64,
}
