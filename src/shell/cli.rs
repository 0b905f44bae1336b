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
    /// Re-copy one table (or a slice) while the pipeline keeps running: its rows go through the
    /// table's topic at the version of a fresh snapshot, below every change streamed after it.
    /// A full backfill then removes documents of rows deleted while nobody was watching.
    /// With --into, builds a new index and swaps the table's alias to it (zero downtime).
    Backfill(BackfillArgs),
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
