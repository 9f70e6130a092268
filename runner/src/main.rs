//! `gantry-runner`: parses flags, runs the runner, drains on SIGTERM or SIGINT (a second
//! signal stops the running work at once), and exits with the runner's outcome.
use std::process::ExitCode;

use clap::Parser;
use gantry_runner::{Config, Runner, Signal};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi({
            use std::io::IsTerminal as _;
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        })
        .init();
    let config = Config::parse();
    match run(config).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<u8> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let runner = Runner::new(config).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let signal = if first {
                Signal::Drain(format!("{name} received"))
            } else {
                Signal::StopNow(format!("{name} received again"))
            };
            first = false;
            if tx.send(signal).await.is_err() {
                return;
            }
        }
    });
    let exit = runner.run(rx).await?;
    tracing::info!(?exit, "runner stopped");
    Ok(exit.code())
}
