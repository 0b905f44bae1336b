//! The command line.

use clap::Parser;

/// Change data capture from PostgreSQL (pgoutput) to Kafka to Elasticsearch.
#[derive(Debug, Parser)]
#[command(name = "walsync", version, about, long_about = None)]
pub struct Cli {}
