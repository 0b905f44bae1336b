//! The operational shell: what turns the pipeline into a program an operator runs.
//!
//! - `cli`: the command line (`walsync run | source | sink | check | …`).
//! - `config`: the TOML configuration with environment overrides.
//! - `metrics`: metric names, descriptions, the Prometheus recorder and per-table handles.
//! - `health`: the `/metrics`, `/healthz` and `/readyz` endpoints and the readiness state.
//! - `check`, `slot_command`, `verify`: the operator's commands `check`, `slot status|drop`
//!   and `verify`.

pub mod check;
pub mod cli;
pub mod config;
pub mod health;
pub mod metrics;
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

/// `url` with the password of its user info (`scheme://user:password@host`) replaced by
/// `***`, for messages: a URL from the configuration may carry credentials.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info
                .split_once(':')
                .map_or(user_info, |(user, _)| user);
            let hidden = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_url_password_is_hidden_and_the_rest_kept() {
        assert_eq!(
            redact_url("https://elastic:s3cr@t@es.example:9200/x?y=1"),
            "https://elastic:***@es.example:9200/x?y=1"
        );
        assert_eq!(
            redact_url("postgres://walsync@db:5432/app"),
            "postgres://walsync@db:5432/app"
        );
        assert_eq!(redact_url("http://127.0.0.1:9200"), "http://127.0.0.1:9200");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
