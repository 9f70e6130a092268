//! The `process` executor: the job's command as a local process in its own process group.
//!
//! The process inherits the runner's environment minus every `GANTRY_*` variable (the
//! runner's tokens stay with the runner), plus the job's `env` and `GANTRY_JOB_ID`,
//! `GANTRY_ATTEMPT`, `GANTRY_RUNNER_ID`, `GANTRY_WORK_TOKEN` and `GANTRY_ENDPOINT` (the
//! work's socket, `unix://<state-dir>/relay/…/gantry.sock`). Without a `working_dir` it runs
//! in a fresh scratch directory that is removed afterwards. The inputs are written into that
//! directory (or `working_dir`) before the process starts; once it has ended the artifacts
//! are stored from there. A stop sends SIGTERM to the whole group, then SIGKILL after the
//! grace period; when the main process exits, whatever it left running in its group is
//! killed too, so no stray process outlives its job.
//!
//! Sandboxes get a workspace directory ([`sandbox`]) whose commands run the same way.
pub mod sandbox;

use std::{path::PathBuf, process::Stdio};

use futures::future::BoxFuture;
use gantry_proto as pb;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{io::AsyncReadExt, sync::mpsc};

use super::{Executor, Io, Outcome, StopSignal, Work, Workspace, stop_requested};
use crate::executor::files;

/// Output read at a time from a pipe.
const READ_BUFFER: usize = 64 * 1024;

/// Runs jobs as local processes.
pub struct ProcessExecutor {
    /// Scratch directories are made under this one.
    work_root: PathBuf,
}

impl ProcessExecutor {
    /// Scratch directories go under `work_root`.
    pub fn new(work_root: PathBuf) -> Self {
        Self { work_root }
    }
}

impl Executor for ProcessExecutor {
    fn kind(&self) -> pb::ExecutorKind {
        pb::ExecutorKind::Process
    }

    fn run<'a>(
        &'a self,
        work: &'a Work,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.execute(work, io, stop))
    }

    fn create_workspace<'a>(
        &'a self,
        sandbox: &'a Work,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, Result<Box<dyn Workspace>, Outcome>> {
        Box::pin(self.create_sandbox(sandbox, io, stop))
    }
}

/// Keeps the runner's own `GANTRY_*` variables (its tokens above all) from the process.
fn without_runner_env(cmd: &mut tokio::process::Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GANTRY_") {
            cmd.env_remove(name);
        }
    }
}

/// Sends `signal` to the process group `pgid`; a group that is already gone is fine.
fn signal_group(pgid: Pid, signal: Signal) {
    if let Err(e) = nix::sys::signal::killpg(pgid, signal)
        && e != nix::errno::Errno::ESRCH
    {
        tracing::warn!(%pgid, ?signal, error = %e, "signalling the job's process group");
    }
}

/// Reads a pipe into `tx` until it ends.
async fn pump(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    stream: pb::LogStream,
    tx: mpsc::Sender<(pb::LogStream, Vec<u8>)>,
) {
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(?stream, error = %e, "reading the job's output");
                return;
            }
        }
    }
}

impl ProcessExecutor {
    async fn execute(&self, work: &Work, io: &mut Io, mut stop: StopSignal) -> Outcome {
        let spec = &work.spec;
        let Some((program, first_args)) = spec.command.split_first() else {
            return Outcome::failed(
                pb::FailureKind::InvalidSpec,
                "spec.command is required by the process executor",
            );
        };
        io.phase(pb::ExecutorPhase::Creating, program.as_str())
            .await;
        let scratch = if spec.working_dir.is_empty() {
            // The lease id names the directory: only a UUID may (it comes from the network).
            let Ok(lease) = uuid::Uuid::try_parse(&work.lease_id) else {
                return Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!("lease id {:?} is not a UUID", work.lease_id),
                );
            };
            let dir = self.work_root.join(lease.to_string());
            if let Err(e) = tokio::fs::create_dir_all(&dir).await {
                return Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!("cannot create the scratch directory {}: {e}", dir.display()),
                );
            }
            Some(dir)
        } else {
            None
        };
        let dir = scratch
            .clone()
            .unwrap_or_else(|| PathBuf::from(&spec.working_dir));
        let outcome = self
            .run_in(work, io, &mut stop, program, first_args, &dir)
            .await;
        if let Some(dir) = scratch
            && let Err(e) = tokio::fs::remove_dir_all(&dir).await
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing the scratch directory");
        }
        outcome
    }

    /// Places the inputs in `dir`, runs the process there, and stores the artifacts.
    async fn run_in(
        &self,
        work: &Work,
        io: &mut Io,
        stop: &mut StopSignal,
        program: &str,
        first_args: &[String],
        dir: &std::path::Path,
    ) -> Outcome {
        let spec = &work.spec;
        if let Err(failed) = files::place_inputs(work, dir, stop).await {
            return failed;
        }
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(first_args)
            .args(&spec.args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        without_runner_env(&mut cmd);
        cmd.envs(&spec.env)
            .envs(work.gantry_env(work.access.local_endpoint()));

        io.phase(pb::ExecutorPhase::Starting, program).await;
        let outcome = match cmd.spawn() {
            Ok(child) => supervise(child, io, stop).await,
            Err(e) => Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("cannot start `{program}` in {}: {e}", dir.display()),
            ),
        };
        files::store_artifacts(work, dir, io, stop).await;
        outcome
    }
}

/// Follows a spawned process (the leader of its own process group) to its end: reports
/// RUNNING with its pid and its output, signals the group on a stop (SIGTERM, then SIGKILL
/// after the grace), and kills whatever the process left in its group once it exits.
async fn supervise(
    mut child: tokio::process::Child,
    io: &mut Io,
    stop: &mut StopSignal,
) -> Outcome {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return Outcome::failed(pb::FailureKind::ExecutorError, "the process has no id");
    };
    let pgid = Pid::from_raw(pid);
    io.started(&pid.to_string()).await;

    let (tx, mut rx) = mpsc::channel(16);
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, pb::LogStream::Stdout, tx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, pb::LogStream::Stderr, tx.clone())));
    }
    drop(tx);

    let kill_at = tokio::time::sleep(super::NEVER);
    tokio::pin!(kill_at);
    let mut stopping = false;
    let mut output_open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            chunk = rx.recv(), if output_open => match chunk {
                Some((stream, data)) => io.output(stream, &data).await,
                None => output_open = false,
            },
            s = stop_requested(stop), if !stopping => {
                stopping = true;
                io.phase(pb::ExecutorPhase::Stopping, format!("SIGTERM, then SIGKILL after {} s", s.grace.as_secs())).await;
                signal_group(pgid, Signal::SIGTERM);
                kill_at.as_mut().reset(tokio::time::Instant::now() + s.grace);
            }
            _ = &mut kill_at, if stopping => {
                signal_group(pgid, Signal::SIGKILL);
                kill_at.as_mut().reset(tokio::time::Instant::now() + super::NEVER);
            }
        }
    };
    // Anything the job left behind in its group goes with it (and closes the pipes).
    signal_group(pgid, Signal::SIGKILL);
    let drained = tokio::time::timeout(super::OUTPUT_DRAIN, async {
        while let Some((stream, data)) = rx.recv().await {
            io.output(stream, &data).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            pid,
            "a process outside the job's group keeps its output open; not waiting for it"
        );
    }
    for p in pumps {
        p.abort();
    }
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            let code = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(-1);
            Outcome::Exited {
                code,
                oom_killed: false,
                stopped: stopping,
            }
        }
        Err(e) => Outcome::failed(
            pb::FailureKind::ExecutorError,
            format!("waiting for process {pid}: {e}"),
        ),
    }
}
