//! The operational shell: what turns the pipeline into a program an operator runs.
//!
//! - `cli`: the command line (`walsync run | source | sink | check | …`).
//! - `config`: the TOML configuration with environment overrides.
//! - `metrics`: Prometheus metrics, health and readiness endpoints.

pub mod cli;
pub mod config;
pub mod metrics;
