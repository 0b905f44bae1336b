//! Shared helpers for integration tests: where the local stack listens, unique names, and
//! waiting on a condition with a deadline.
#![allow(dead_code)]

pub mod endpoints;
pub mod kafka;
pub mod literals;
pub mod oracle;
pub mod pipeline;
pub mod process;
pub mod rng;
pub mod scratch;
pub mod sink;
pub mod source;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The addresses of the local stack: the process environment first, then `.stack/env`
/// (written by `scripts/stack up`).
pub struct Stack {
    pub pg_url: String,
    /// The superuser over the local socket, for what walsync's own role may not see or do.
    pub pg_admin_url: String,
    /// The CA that signed the local PostgreSQL's server certificate (PEM).
    pub pg_tls_ca: String,
    pub kafka_brokers: String,
    pub es_url: String,
}

pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let file = stack_env_file();
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| file.get(name).cloned())
                .unwrap_or_else(|| {
                    panic!("{name} is not set and .stack/env lacks it: run `make stack-up` first")
                })
        };
        Stack {
            pg_url: var("PG_URL"),
            pg_admin_url: var("PG_ADMIN_URL"),
            pg_tls_ca: var("PG_TLS_CA"),
            kafka_brokers: var("KAFKA_BROKERS"),
            es_url: var("ES_URL"),
        }
    })
}

fn stack_env_file() -> HashMap<String, String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".stack/env");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.trim_matches('\'').to_owned()))
        .collect()
}

/// A name no other test run has used: tests share one stack and never clean up each other.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Poll `probe` until it yields a value or `deadline` passes; panics with `what` on timeout.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A connection as the superuser, over the local socket.
pub async fn admin_client() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&stack().pg_admin_url, tokio_postgres::NoTls)
            .await
            .expect("connect as the superuser with PG_ADMIN_URL");
    tokio::spawn(connection);
    client
}
