//! The operational shell: what turns the pipeline into a program an operator runs.
//!
//! - `cli`: the command line (`walsync run | source | sink | check | …`).
//! - `health`: the `/metrics`, `/healthz` and `/readyz` endpoints and their probes.
//! - `check`, `slot_command`, `verify`: the operator's commands `check`, `slot status|drop`
//!   and `verify`.

pub mod check;
pub mod cli;
pub mod health;
pub mod slot_command;
pub mod verify;

/// Logs through `tracing`: human-readable by default, JSON when `format` is "json". The level
/// comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
