use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use walsync::config::Config;
use walsync::health::Roles;
use walsync::postgres::catalog::Catalog;
use walsync::postgres::slot;
use walsync::shell::cli::{Cli, Command, SlotAction};
use walsync::shell::health;
use walsync::sink::apply::Sink;
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
            let _endpoints = health::start(&config, Roles::SOURCE).await?;
            let (_stopper, stop) = stop_on_signal();
            match source::run(config, stop).await? {
                SourceExit::Drained => Ok(ExitCode::SUCCESS),
                SourceExit::Undrained => Ok(ExitCode::from(3)),
            }
        }
        Command::Sink => {
            let _endpoints = health::start(&config, Roles::SINK).await?;
            let sink = Sink::new(config).await?;
            let (_stopper, stop) = stop_on_signal();
            tokio::select! {
                result = sink.run(stop) => result?,
                never = health::watch_sink(&sink) => match never {},
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let _endpoints = health::start(&config, Roles::BOTH).await?;
            let stop = stop_on_signal();
            let sink = Sink::new(config.clone()).await?;
            // Whichever half ends first (a signal, or an error) stops the other.
            let stopper = stop.0.clone();
            let source_half = async {
                let result = source::run(config, stop.1.clone()).await;
                let _ = stopper.send(true);
                result
            };
            let sink_half = async {
                let result = tokio::select! {
                    result = sink.run(stop.1.clone()) => result,
                    never = health::watch_sink(&sink) => match never {},
                };
                let _ = stop.0.send(true);
                result
            };
            let (source, sink) = tokio::join!(source_half, sink_half);
            sink?;
            let exit = source?;
            match exit {
                SourceExit::Drained => Ok(ExitCode::SUCCESS),
                SourceExit::Undrained => Ok(ExitCode::from(3)),
            }
        }
        Command::Backfill(args) => {
            let options = walsync::backfill::BackfillOptions {
                table: args.table,
                filter: args.filter,
                into: args.into,
                delete_old: args.delete_old,
                timeout: std::time::Duration::from_secs(args.timeout),
                progress: std::sync::Arc::new(walsync::backfill::PrintLines),
            };
            walsync::backfill::run(config, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let params = walsync::postgres::replication::ConnectParams::from_config(&config)?;
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
        Command::Check => Ok(walsync::shell::check::run(&config).await),
        Command::Slot {
            action: SlotAction::Status,
        } => walsync::shell::slot_command::status(&config).await,
        Command::Slot {
            action: SlotAction::Drop { yes },
        } => walsync::shell::slot_command::drop_slot(&config, yes).await,
        Command::Verify(args) => Ok(walsync::shell::verify::run(&config, &args).await),
    }
}

/// A stop flag that turns true on SIGTERM or Ctrl-C (or when the sender is used).
fn stop_on_signal() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (sender, receiver) = watch::channel(false);
    let signal_sender = sender.clone();
    tokio::spawn(async move {
        let sender = signal_sender;
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
    (sender, receiver)
}
