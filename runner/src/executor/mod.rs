//! Executors: how a job's work runs. Each executor is behind [`Executor`]; the job's spec says
//! which one it wants and the runner says which ones it offers.
//!
//! An executor runs one attempt from start to end: it prepares the container or process,
//! places the work's inputs in it, reports its phases and the RUNNING status through [`Io`],
//! streams output into it, stores the work's artifacts once it has ended (before the
//! workspace goes: see [`crate::executor::files`]), and returns how the work ended. The work reaches
//! WorkService as itself through [`Work::access`]: the executor hands it its token and its
//! endpoint (see [`crate::relay`]). It watches [`StopSignal`] the whole time: when a stop is
//! requested (cancel, timeout, drain, lost lease) it sends the graceful signal, waits up to
//! the stop's grace, then kills, and returns.
//!
//! An executor also makes sandboxes' workspaces ([`Executor::create_workspace`]): a
//! [`Workspace`] is made once, runs commands ([`Exec`]) one at a time with the same stop
//! rules (each command in a process group of its own, so that stopping one never touches the
//! workspace), and is removed at the end. [`crate::sandbox`] decides when.
pub mod docker;
pub mod files;
pub mod process;

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use gantry_proto as pb;

pub use crate::relay::Access;
use crate::{
    outbox::Outbox,
    output::{OutputStream, Piece, cut},
};

/// The server's limits on report fields (longer text is cut at a character boundary, so a
/// long command line or engine error never gets a report refused).
const MAX_PHASE_MESSAGE: usize = 1024;
const MAX_STATUS_MESSAGE: usize = 4096;
const MAX_CONTAINER_ID: usize = 255;

/// Largest log report the runner makes from one read of output (smaller still when the
/// server's limits say so; see `Outbox::max_log_report`).
const MAX_LOG_REPORT: usize = 256 * 1024;

/// A timer that is not meant to fire (a year).
pub(crate) const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

pub use crate::stop::{Stop, StopReason, StopSignal, stop_requested};

/// One attempt to execute.
#[derive(Clone, Debug)]
pub struct Work {
    /// Job id.
    pub job_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Lease of the attempt.
    pub lease_id: String,
    /// This runner's id.
    pub runner_id: String,
    /// What to run.
    pub spec: pb::JobSpec,
    /// The work's own identity toward WorkService: its token (never printed), its endpoint,
    /// and the runner's calls as the work (inputs, artifacts).
    pub access: Access,
}

impl Work {
    /// Environment variables the runner adds for every job: its id, attempt, runner, and its
    /// token and endpoint (`endpoint`: GANTRY_ENDPOINT as the work sees it; `None`: it has
    /// none). A sandbox's commands get the same with the sandbox's id as the job's.
    pub fn gantry_env(&self, endpoint: Option<String>) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("GANTRY_JOB_ID", self.job_id.clone()),
            ("GANTRY_ATTEMPT", self.attempt.to_string()),
            ("GANTRY_RUNNER_ID", self.runner_id.clone()),
        ];
        if !self.access.token().is_empty() {
            env.push(("GANTRY_WORK_TOKEN", self.access.token().to_string()));
        }
        if let Some(endpoint) = endpoint {
            env.push(("GANTRY_ENDPOINT", endpoint));
        }
        env
    }
}

/// How the work ended, as the executor saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The work exited (on its own, or after a stop was requested).
    Exited {
        /// Exit code (128 + signal number when a process was killed by a signal).
        code: i32,
        /// The engine killed it for exceeding its memory limit.
        oom_killed: bool,
        /// The executor had signalled it to stop (a stop requested after the work had
        /// exited on its own does not count).
        stopped: bool,
    },
    /// The executor could not run the work.
    Failed {
        /// Why (`executor_error`, `image_unavailable`, `invalid_spec` …).
        kind: pb::FailureKind,
        /// In words.
        message: String,
    },
}

impl Outcome {
    /// An executor failure.
    pub fn failed(kind: pb::FailureKind, message: impl Into<String>) -> Self {
        Outcome::Failed {
            kind,
            message: message.into(),
        }
    }
}

/// After the work exited, how long its remaining output may take to arrive (a descendant
/// that escaped the process group may hold a pipe open for ever).
pub(crate) const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// Runs jobs of one executor kind.
pub trait Executor: Send + Sync {
    /// The kind it implements.
    fn kind(&self) -> pb::ExecutorKind;
    /// Runs one attempt to its end.
    fn run<'a>(
        &'a self,
        work: &'a Work,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome>;
    /// Makes a sandbox's workspace from `sandbox.spec` (`sandbox.job_id` is the sandbox id),
    /// reporting its phases (CREATING, STARTING …) through `io` but not RUNNING (the sandbox
    /// does, once it has the workspace). `Err` is why it could not (an interrupted pull
    /// included: `stop` is watched while the image is pulled).
    fn create_workspace<'a>(
        &'a self,
        sandbox: &'a Work,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, Result<Box<dyn Workspace>, Outcome>>;
}

/// A sandbox's workspace on one executor: a container kept running, or a directory. It runs
/// commands one at a time (the sandbox never overlaps two) and is removed at the end.
pub trait Workspace: Send + Sync {
    /// What the sandbox's RUNNING report names: the container id, or the directory.
    fn id(&self) -> String;
    /// Runs one command to its end: reports RUNNING (with its exec or process id) and its
    /// output through `io`, in a process group of its own; a stop signals that group
    /// gracefully, then kills it after the stop's grace. Whatever the command left running
    /// in its group is killed when it exits. `Outcome::Failed` (EXECUTOR_ERROR): it could
    /// not be started.
    fn exec<'a>(
        &'a self,
        exec: &'a Exec,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome>;
    /// Removes the workspace and everything running in it. `Err` says why it could not.
    fn remove(&self) -> BoxFuture<'_, Result<(), String>>;
    /// GANTRY_ENDPOINT as the commands see it (`None`: the sandbox has no endpoint).
    fn endpoint(&self) -> Option<String>;
    /// Stores the sandbox's artifacts (`sandbox.spec.artifacts`) from the workspace, as
    /// [`crate::executor::files::store_artifacts`] does for a job; notes go to `io`'s stderr.
    fn store_artifacts<'a>(
        &'a self,
        sandbox: &'a Work,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, ()>;
}

/// One command to run in a workspace.
#[derive(Clone, Default)]
pub struct Exec {
    /// Program and arguments (at least the program).
    pub argv: Vec<String>,
    /// Its whole environment over the workspace's: the command's, then the runner's
    /// `GANTRY_SANDBOX_ID`, `GANTRY_COMMAND_ID`, `GANTRY_RUNNER_ID`.
    pub env: Vec<(String, String)>,
    /// Working directory; `None` for the workspace's default.
    pub working_dir: Option<String>,
    /// Written to its standard input, which is then closed (empty: an empty input).
    pub stdin: Vec<u8>,
}

impl std::fmt::Debug for Exec {
    /// Without the environment's values: GANTRY_WORK_TOKEN is among them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Exec")
            .field("argv", &self.argv)
            .field("env", &names)
            .field("working_dir", &self.working_dir)
            .field("stdin", &self.stdin.len())
            .finish()
    }
}

/// The executors a runner offers.
pub type Executors = Vec<Arc<dyn Executor>>;

/// Where an executor reports phases, the start of the work and its output.
pub struct Io {
    outbox: Arc<Outbox>,
    lease_id: String,
    /// The attempt's stop request: once set, output no longer waits for buffer space.
    stop: StopSignal,
    stdout: OutputStream,
    stderr: OutputStream,
    /// False once the server refused the attempt: the work is being stopped.
    held: bool,
    /// Whether executor phases are reported (a sandbox command's reports carry none: the
    /// phases are the sandbox's).
    phases: bool,
}

impl Io {
    /// Reports for the attempt of `lease_id` go to `outbox`.
    pub fn new(outbox: Arc<Outbox>, lease_id: &str, stop: StopSignal) -> Self {
        Self {
            outbox,
            lease_id: lease_id.to_string(),
            stop,
            stdout: OutputStream::default(),
            stderr: OutputStream::default(),
            held: true,
            phases: true,
        }
    }

    /// Reports for a sandbox command of `lease_id`: the same, without executor phases.
    pub fn command(outbox: Arc<Outbox>, lease_id: &str, stop: StopSignal) -> Self {
        Self {
            phases: false,
            ..Self::new(outbox, lease_id, stop)
        }
    }

    async fn push(&mut self, body: pb::report::Body) {
        if self.held {
            self.held = self.outbox.push(&self.lease_id, body, &mut self.stop).await;
        }
    }

    /// The executor entered a phase.
    pub async fn phase(&mut self, phase: pb::ExecutorPhase, message: impl Into<String>) {
        if !self.phases {
            return;
        }
        self.push(pb::report::Body::Phase(pb::PhaseChange {
            phase: phase as i32,
            message: cut(&message.into(), MAX_PHASE_MESSAGE),
        }))
        .await;
    }

    /// The work started: reports RUNNING with its container or process id.
    pub async fn started(&mut self, container_id: &str) {
        self.push(pb::report::Body::Status(pb::StatusReport {
            status: pb::JobStatus::Running as i32,
            container_id: cut(container_id, MAX_CONTAINER_ID),
            ..Default::default()
        }))
        .await;
        self.phase(pb::ExecutorPhase::Running, container_id).await;
    }

    /// Output bytes of the work.
    pub async fn output(&mut self, stream: pb::LogStream, data: &[u8]) {
        let pieces = self.stream(stream).feed(data);
        self.report(stream, pieces).await;
    }

    /// The output streams ended: releases anything held back.
    pub async fn finish_output(&mut self) {
        for stream in [pb::LogStream::Stdout, pb::LogStream::Stderr] {
            let pieces = self.stream(stream).finish();
            self.report(stream, pieces).await;
        }
    }

    /// A line of the runner's own on the attempt's stderr (after what the work wrote, on a
    /// line of its own), e.g. an artifact that was not stored.
    pub async fn note(&mut self, line: &str) {
        let mut text = String::with_capacity(line.len() + 2);
        if !self.stderr.at_line_start() {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
        self.output(pb::LogStream::Stderr, text.as_bytes()).await;
    }

    /// The final status of the attempt.
    pub async fn finish(&mut self, mut status: pb::StatusReport) {
        self.finish_output().await;
        status.message = cut(&status.message, MAX_STATUS_MESSAGE);
        self.push(pb::report::Body::Status(status)).await;
    }

    fn stream(&mut self, stream: pb::LogStream) -> &mut OutputStream {
        match stream {
            pb::LogStream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        }
    }

    async fn report(&mut self, stream: pb::LogStream, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Log { offset, data } => {
                    let mut at = offset;
                    let max = MAX_LOG_REPORT.min(self.outbox.max_log_report()).max(1);
                    for part in data.chunks(max) {
                        self.push(pb::report::Body::Log(pb::LogData {
                            stream: stream as i32,
                            offset: at,
                            data: part.to_vec(),
                        }))
                        .await;
                        at += part.len() as u64;
                    }
                }
                Piece::Progress(p) => self.push(pb::report::Body::Progress(p)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Budget;

    #[tokio::test]
    async fn log_reports_stay_within_the_servers_largest_log_report() {
        let outbox = Arc::new(Outbox::new(usize::MAX));
        outbox.set_max_log_report(100);
        outbox.open("j", "l");
        let (_stop, stop_rx) = tokio::sync::watch::channel(None);
        let mut io = Io::new(outbox.clone(), "l", stop_rx);
        io.output(pb::LogStream::Stdout, &[b'x'; 1000]).await;
        let reports = outbox.take_unsent(Budget::UNLIMITED);
        let sizes: Vec<usize> = reports
            .iter()
            .map(|r| match &r.body {
                Some(pb::report::Body::Log(l)) => l.data.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 1000);
        assert!(sizes.iter().all(|s| *s <= 100), "{sizes:?}");
    }
}
