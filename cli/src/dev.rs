//! `gantry dev`: a whole system in one process — a server on an embedded SQLite file and a
//! local runner — for a first try and for development.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use gantry_runner::{Runner, Signal, executor::docker::DockerExecutor};

use crate::{
    args::{DevArgs, Global},
    client::{CliError, Result},
};

fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("gantry");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/gantry"),
        None => PathBuf::from(".gantry"),
    }
}

/// A token kept in `file`, made on first use (so the exported token stays valid across
/// restarts of `gantry dev`).
fn token_in(file: &Path) -> Result<String> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Never replace a token that exists but cannot be read: the user exported it.
        Err(e) => return Err(CliError::new(1, format!("reading {}: {e}", file.display()))),
    }
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let token = format!("gdt_{}", hex::encode(bytes));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| CliError::new(1, format!("writing {}: {e}", file.display())))?;
    std::io::Write::write_all(&mut f, token.as_bytes())
        .and_then(|_| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| CliError::new(1, format!("writing {}: {e}", file.display())))?;
    Ok(token)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs until Ctrl-C (or SIGTERM).
pub async fn run(global: &Global, args: DevArgs) -> Result<u8> {
    let fail = |what: &str, e: &dyn std::fmt::Display| CliError::new(1, format!("{what}: {e}"));
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    // Private: the database holds jobs' environments and output.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&data_dir)
        .map_err(|e| fail(&format!("creating {}", data_dir.display()), &e))?;
    // One `gantry dev` per data directory: two would share one SQLite file and one runner
    // identity (and each runner would remove the other's containers as its own orphans).
    let lock_file = std::fs::File::create(data_dir.join("lock"))
        .map_err(|e| fail(&format!("creating {}", data_dir.join("lock").display()), &e))?;
    if lock_file.try_lock().is_err() {
        return Err(CliError::new(
            1,
            format!(
                "another gantry dev is using {} (pass --data-dir and --listen to run a second one)",
                data_dir.display()
            ),
        ));
    }
    let api_token = match &global.token {
        Some(t) => t.clone(),
        None => token_in(&data_dir.join("api-token"))?,
    };
    let registration_token = token_in(&data_dir.join("registration-token"))?;
    let db = data_dir.join("gantry.db");
    let mut config =
        gantry_server::Config::with_database(format!("sqlite://{}?mode=rwc", db.display()));
    config.listen = args.listen;
    config.api_tokens = vec![api_token.clone()];
    config.registration_token = Some(registration_token.clone());
    config.tls_cert = None;
    config.tls_key = None;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            CliError::new(
                1,
                format!(
                    "cannot listen on {}: {e} (is another gantry dev running? pass --listen and --data-dir)",
                    args.listen
                ),
            )
        })?;
    let server = gantry_server::start(config, listener)
        .await
        .map_err(|e| fail("starting the server", &format!("{e:#}")))?;
    let addr = match server.addr {
        a if a.ip().is_unspecified() => SocketAddr::from((Ipv4Addr::LOCALHOST, a.port())),
        a => a,
    };
    let url = format!("http://{addr}");

    // The local runner: processes always, containers when an engine answers.
    let docker = matches!(
        tokio::time::timeout(
            Duration::from_secs(3),
            DockerExecutor::connect(Duration::from_secs(600))
        )
        .await,
        Ok(Ok(_))
    );
    let executors = if docker { "process,docker" } else { "process" };
    let state_dir = data_dir.join("runner");
    let runner_config = gantry_runner::Config::try_parse_from_args([
        "--server".to_string(),
        url.clone(),
        "--registration-token".to_string(),
        registration_token,
        "--name".to_string(),
        format!("dev-{}", gantry_runner::config::hostname()),
        "--executors".to_string(),
        executors.to_string(),
        "--capacity".to_string(),
        args.capacity.to_string(),
        "--state-dir".to_string(),
        state_dir.display().to_string(),
        "--drain-grace-seconds".to_string(),
        "5".to_string(),
    ])
    .map_err(|e| fail("configuring the local runner", &e));
    let runner = match runner_config {
        Ok(config) => Runner::new(config)
            .await
            .map_err(|e| fail("starting the local runner", &format!("{e:#}"))),
        Err(e) => Err(e),
    };
    let runner = match runner {
        Ok(r) => r,
        Err(e) => {
            // The server is up by now: it goes down with the error.
            let _ = server.shutdown().await;
            return Err(e);
        }
    };
    let (signals, signals_rx) = tokio::sync::mpsc::channel(4);
    let mut runner_task = tokio::spawn(runner.run(signals_rx));

    println!("Gantry dev is up.");
    println!("  server   {url}   (database {})", db.display());
    println!(
        "  runner   {} slots, executors: {}{}",
        args.capacity,
        executors.replace(',', ", "),
        if docker {
            ""
        } else {
            " (no Docker engine answered)"
        }
    );
    println!();
    println!("In another terminal:");
    println!();
    println!("  export GANTRY_SERVER={url}");
    println!("  export GANTRY_TOKEN={}", shell_quote(&api_token));
    println!("  gantry submit --wait -- sh -c 'echo hello from gantry'");
    println!(
        "  gantry watch $(gantry submit -- sh -c 'for i in 1 2 3 4; do sleep 1; echo \"::progress $((i*25)) step $i::\"; done')"
    );
    println!();
    println!("Ctrl-C stops the runner and the server.");

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            let _ = signals
                .send(Signal::StopNow("gantry dev cannot start".into()))
                .await;
            let _ = runner_task.await;
            let _ = server.shutdown().await;
            return Err(fail("installing the SIGTERM handler", &e));
        }
    };
    let mut server = server;
    let mut asked = 0;
    let mut server_failed = None;
    let runner_result = loop {
        tokio::select! {
            r = &mut runner_task => break r,
            r = server.wait(), if server_failed.is_none() => {
                // The server stopped by itself: stop the runner too, and say so.
                server_failed = Some(match r {
                    Ok(()) => "the server stopped".to_string(),
                    Err(e) => format!("the server failed: {e:#}"),
                });
                asked = 2;
            }
            _ = tokio::signal::ctrl_c() => asked += 1,
            _ = term.recv() => asked += 1,
        }
        let signal = if asked == 1 {
            eprintln!(
                "stopping: the runner finishes or stops its jobs (Ctrl-C again to stop them now)"
            );
            Signal::Drain("gantry dev is stopping".into())
        } else {
            Signal::StopNow("gantry dev is stopping now".into())
        };
        let _ = signals.send(signal).await;
    };
    let runner_error = match runner_result {
        Ok(Ok(_)) if asked > 0 => None,
        Ok(Ok(exit)) => Some(format!("the local runner stopped by itself ({exit:?})")),
        Ok(Err(e)) => Some(format!("the local runner failed: {e:#}")),
        Err(e) => Some(format!("the local runner failed: {e}")),
    };
    if let Some(why) = server_failed {
        // Its task has ended already: nothing to shut down (the process exits next).
        return Err(CliError::new(1, why));
    }
    let stopped = server.shutdown().await;
    if let Some(why) = runner_error {
        return Err(CliError::new(1, why));
    }
    stopped.map_err(|e| fail("stopping the server", &format!("{e:#}")))?;
    eprintln!("stopped");
    Ok(0)
}
