use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use walsync::postgres::catalog::Catalog;
use walsync::postgres::slot;
use walsync::shell::cli::{Cli, Command};
use walsync::shell::config::Config;
use walsync::source::{self, SourceExit};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "walsync stopped");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(&cli.config)?;
    walsync::shell::init_logging(&config.metrics.log_format);
    match cli.command {
        Command::Source => {
            let stop = stop_on_signal();
            match source::run(config, stop).await? {
                SourceExit::Drained => Ok(ExitCode::SUCCESS),
                SourceExit::Undrained => Ok(ExitCode::from(3)),
            }
        }
        Command::Migrate => {
            let params = source::connect_params(&config)?;
            let mut catalog = Catalog::connect(&params).await.with_context(|| {
                format!(
                    "cannot connect to PostgreSQL at {}:{}",
                    params.host, params.port
                )
            })?;
            let applied = slot::migrate(&mut catalog).await?;
            if applied.is_empty() {
                println!("walsync schema is up to date");
            }
            for migration in applied {
                println!("applied {migration}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Turns true on SIGTERM or Ctrl-C.
fn stop_on_signal() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::error!(%error, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        let _ = sender.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stop requested: draining");
        let _ = sender.send(true);
    });
    receiver
}
