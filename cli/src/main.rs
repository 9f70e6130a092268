//! `gantry`: the Gantry command line.
mod admin;
mod args;
mod artifacts;
mod client;
mod dev;
mod exec;
mod follow;
mod jobs;
mod render;
mod sandbox;
mod transfer;
mod work;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::{
    args::{Cli, Command},
    client::CliError,
};

#[tokio::main]
async fn main() -> ExitCode {
    // Output into a closed pipe (`gantry logs J | head`) ends the program as it does any
    // Unix tool, instead of a panic in print.
    // SAFETY: at the start of main, before any other thread could be running a handler.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            // One line: clap's message without its usage block.
            let text = e.to_string();
            let message = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect::<Vec<_>>()
                .join(" ");
            let message = message
                .strip_prefix("error: ")
                .unwrap_or(&message)
                .to_string();
            return fail(CliError::usage(format!("{message} (see --help)")));
        }
    };
    let dev = matches!(cli.command, Command::Dev(_));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if dev {
                    "warn,gantry_runner::job=info"
                } else {
                    "error"
                })
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(render::colour_stderr())
        .init();
    let global = cli.global.clone();
    let result = match cli.command {
        Command::Dev(a) => dev::run(&global, a).await,
        Command::Submit(a) => jobs::submit(&global, *a).await,
        Command::Jobs(a) => jobs::list(&global, a).await,
        Command::Get(a) => jobs::get(&global, a.id).await,
        Command::Watch(a) => follow::watch(&global, a.id).await,
        Command::Logs(a) => follow::logs(&global, a).await,
        Command::Cancel(a) => jobs::cancel(&global, a.id, a.reason).await,
        Command::Retry(a) => jobs::retry(&global, a.id).await,
        Command::Sandbox(a) => sandbox::run(&global, a).await,
        Command::Exec(a) => exec::run(&global, a).await,
        Command::Runners(a) => admin::runners(&global, a).await,
        Command::Drain(a) => admin::drain(&global, a).await,
        Command::Stats => admin::stats(&global).await,
        Command::Artifacts(a) => artifacts::artifacts(&global, a.id).await,
        Command::Download(a) => artifacts::download(&global, a).await,
        Command::Blob(a) => artifacts::blob(&global, a).await,
        Command::Job(a) => work::run(&global, a).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "gantry", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(e),
    }
}

fn fail(e: CliError) -> ExitCode {
    let colour = render::colour_stderr();
    if colour {
        eprintln!("\x1b[31merror:\x1b[0m {e}");
    } else {
        eprintln!("error: {e}");
    }
    ExitCode::from(e.code)
}
