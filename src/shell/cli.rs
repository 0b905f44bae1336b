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
}
