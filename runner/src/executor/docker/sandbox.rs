//! The `docker` executor's sandbox workspace: one container per sandbox, kept running, in
//! which every command is a `docker exec`.
//!
//! # The container
//! Pulled per the pull policy as a job's image is, then created from the sandbox's image
//! with its env (plus `GANTRY_SANDBOX_ID`, and the variables of a job's container:
//! `GANTRY_JOB_ID` — the sandbox id —, `GANTRY_ATTEMPT`, `GANTRY_RUNNER_ID`,
//! `GANTRY_WORK_TOKEN`, `GANTRY_ENDPOINT`), the mounts of a job's container (the sandbox's
//! endpoint, the `gantry` binary), working dir, memory and CPU limits, the labels of a job's
//! container (`gantry.job-id` holds the sandbox id,
//! `gantry.attempt`, `gantry.runner-id`, `gantry.lease-id`) plus `gantry.sandbox-id`, and
//! `HostConfig.init`: the engine's init is PID 1, and it reaps whatever the commands orphan.
//! Its main process is the image's `/bin/sh`: it starts the image's own entrypoint and
//! command in the background, then idles ([`IDLE`]), so the container stays up whether that
//! command runs on or exits; it exits at once on SIGTERM. Removing the sandbox removes the
//! container by force. Since it carries `gantry.runner-id`, a container left behind by a
//! runner that crashed goes with that runner's other containers when it starts again
//! ([`DockerExecutor::remove_orphans`]). The sandbox's inputs are copied into the container
//! after it is created and before it starts; its artifacts are read out of it (still
//! running) before it is removed.
//!
//! # A command, and its process group
//! Stopping a command (a cancel, its timeout, the sandbox's deletion) must stop it and what
//! it started, and nothing else: not the container's init, not its idle loop. So every
//! command leads a process group of its own, and the runner signals that group. The command
//! runs as `docker exec` of `/bin/sh -c LAUNCH gantry-exec ARGV...` ([`LAUNCH`]), not a tty,
//! stdout and stderr apart, stdin attached only when the command has input (written, then
//! the connection's write side is closed: the command reads end-of-file). The launcher:
//! 1. checks that the program exists (`command -v`); if not it says so on stderr and exits
//!    127 without starting anything, and the runner reports EXECUTOR_ERROR with that text;
//! 2. makes sure it leads a process group: Docker's runtime (runc, crun) starts every
//!    exec'd process in a session of its own (`setsid`), so its process group id — read from
//!    `/proc/$$/stat` — is its own pid. Where that is not so, it re-execs through `setsid`,
//!    which (the launcher then not being a group leader) makes a new session without
//!    forking: the pid stays. Without `/proc` it trusts the runtime; without `setsid` where
//!    one is needed it refuses (exit 126) rather than share a group it could not stop alone;
//! 3. prints one line, `gantry-pgid <pid>`, as the first bytes of the exec's stdout — the
//!    runner takes it off the output (it is never logged) — then `exec`s the program, which
//!    keeps that pid: the program is the leader of the group, and whatever it starts is in
//!    the group unless it leaves on purpose (`setsid`, a daemon).
//!
//! The runner reports RUNNING (with the exec id) once it has that line. A stop runs a second
//! exec, `kill -s TERM -<pgid>` (the image shell's `kill`), then `kill -s KILL -<pgid>`
//! after the grace ([`SIGNAL`]); a group id below 2 is never signalled. When the command's
//! leader exits, the runner kills what it left in its group (the same exec with KILL), as a
//! job leaves nothing behind, and reads the exit code with `inspect_exec`. The command's end
//! is its exit as `inspect_exec` tells it (polled every second; quickly once its output has
//! ended), not the end of its output: a process that escaped the group may hold the output
//! open, and it is then read for [`OUTPUT_DRAIN`] at most.
use std::{collections::HashMap, time::Duration};

use bollard::{
    Docker,
    container::LogOutput,
    errors::Error as DockerError,
    exec::{StartExecOptions, StartExecResults},
    models::{ContainerCreateBody, ExecConfig, Mount},
    query_parameters::CreateContainerOptions,
};
use futures::{StreamExt as _, future::BoxFuture};
use gantry_proto as pb;
use tokio::{io::AsyncWriteExt as _, time::Instant};

use super::{
    DockerExecutor, LABEL_ATTEMPT, LABEL_JOB, LABEL_LEASE, LABEL_RUNNER, files::Transfer,
    force_remove, host_config, is_not_found, short,
};
use crate::{
    executor::{
        Exec, Io, NEVER, OUTPUT_DRAIN, Outcome, StopSignal, Work, Workspace, stop_requested,
    },
    relay,
};

/// Label naming the sandbox of a container.
pub const LABEL_SANDBOX: &str = "gantry.sandbox-id";

/// The container's main process: idle until SIGTERM (`sleep` in the background, so that the
/// shell takes the signal at once).
pub const IDLE: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// The container's main process when the image has an entrypoint or command of its own
/// (`$@`): that runs in the background (stdin empty, its output in the container's log),
/// and [`IDLE`] keeps the container up whether it keeps running or exits.
const OWN_THEN_IDLE: &str = "if [ \"$#\" -gt 0 ]; then \"$@\" </dev/null & fi; ";

/// Starts a command as the leader of its own process group and says which (see the module
/// comment). `$0` is `gantry-exec`; `$@` the command.
pub const LAUNCH: &str = r#"command -v "$1" >/dev/null 2>&1 || { printf 'gantry: %s: command not found\n' "$1" >&2; exit 127; }
g=
{ read -r s </proc/$$/stat; } 2>/dev/null && s=${s##*) } && s=${s#* } && s=${s#* } && g=${s%% *}
if [ -n "$g" ] && [ "$g" != "$$" ]; then
  command -v setsid >/dev/null 2>&1 || { echo 'gantry: cannot give the command a process group of its own (the image has no setsid)' >&2; exit 126; }
  printf 'gantry-pgid %s\n' "$$"
  exec setsid "$@"
fi
printf 'gantry-pgid %s\n' "$$"
exec "$@"
"#;

/// Signals a process group: `$1` the signal name, `$2` the group id. (Some `kill`s want
/// `--` before a negative pid, others refuse it.)
pub const SIGNAL: &str =
    r#"kill -s "$1" "-$2" 2>/dev/null || kill -s "$1" -- "-$2" 2>/dev/null; exit 0"#;

/// What the launcher's line starts with.
const MARKER: &[u8] = b"gantry-pgid ";
/// The launcher's line is at most this long; longer first output is not it.
const MAX_MARKER_LINE: usize = 64;
/// What the launcher said before the command started, kept for the failure message.
const MAX_LAUNCH_ERROR: usize = 1024;
/// How often a running command's exec is inspected for its exit.
const EXEC_POLL: Duration = Duration::from_secs(1);
/// The first inspection after the output ended (then doubling up to [`EXEC_POLL`]).
const EXIT_POLL: Duration = Duration::from_millis(10);
/// Inspections that may fail in a row before the runner gives up on a command.
const MAX_INSPECT_FAILURES: u32 = 5;
/// Longest a signalling exec may take.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A sandbox's container.
pub struct DockerWorkspace {
    docker: Docker,
    /// The container's id.
    container: String,
    /// Its working directory (artifacts are relative to it).
    working_dir: String,
    /// GANTRY_ENDPOINT of its commands (`None`: the sandbox has no endpoint).
    endpoint: Option<String>,
    /// Files out of the container.
    transfer: Transfer,
}

impl DockerExecutor {
    /// Pulls the image (per the pull policy), creates the container and starts it.
    pub(super) async fn create_sandbox(
        &self,
        sandbox: &Work,
        io: &mut Io,
        mut stop: StopSignal,
    ) -> Result<Box<dyn Workspace>, Outcome> {
        let spec = &sandbox.spec;
        if spec.image.is_empty() {
            return Err(Outcome::failed(
                pb::FailureKind::InvalidSpec,
                "spec.image is required by the docker executor",
            ));
        }
        self.ensure_image(spec, io, &mut stop).await?;
        if let Some(s) = stop.borrow().clone() {
            return Err(Outcome::failed(pb::FailureKind::Canceled, s.message));
        }
        // The image's own entrypoint and command, run beside the idle loop.
        let own = match self.docker.inspect_image(&spec.image).await {
            Ok(image) => image
                .config
                .map(|c| {
                    let mut own = c.entrypoint.unwrap_or_default();
                    own.extend(c.cmd.unwrap_or_default());
                    own
                })
                .unwrap_or_default(),
            Err(e) => {
                return Err(Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!("inspecting image {}: {e}", spec.image),
                ));
            }
        };
        io.phase(pb::ExecutorPhase::Creating, spec.image.as_str())
            .await;
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(format!("gantry-sandbox-{}", sandbox.job_id)),
                    ..Default::default()
                }),
                container_body(sandbox, &own, self.mounts(sandbox)),
            )
            .await;
        let container = match created {
            Ok(c) => c.id,
            Err(e) => {
                // An image that vanished between the check and the create is unavailable.
                let kind = if is_not_found(&e) {
                    pb::FailureKind::ImageUnavailable
                } else {
                    pb::FailureKind::ExecutorError
                };
                return Err(Outcome::failed(
                    kind,
                    format!("creating the sandbox's container: {e}"),
                ));
            }
        };
        let transfer = self.transfer();
        let working_dir = transfer.working_dir(&container, spec).await;
        let workspace = DockerWorkspace {
            docker: self.docker.clone(),
            container,
            working_dir,
            endpoint: sandbox
                .access
                .relay_dir()
                .map(|_| relay::CONTAINER_ENDPOINT.to_string()),
            transfer,
        };
        if let Err(failed) = workspace
            .transfer
            .copy_inputs(
                sandbox,
                &workspace.container,
                &workspace.working_dir,
                &mut stop,
            )
            .await
        {
            if let Err(why) = workspace.remove_container().await {
                tracing::warn!("{why}");
            }
            return Err(failed);
        }
        io.phase(pb::ExecutorPhase::Starting, short(&workspace.container))
            .await;
        if let Err(e) = self
            .docker
            .start_container(&workspace.container, None)
            .await
        {
            if let Err(why) = workspace.remove_container().await {
                tracing::warn!("{why}");
            }
            return Err(Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("starting the sandbox's container: {e}"),
            ));
        }
        Ok(Box::new(workspace))
    }
}

/// The sandbox's container: its image, its own entrypoint and command (`own`) started in the
/// background, kept running by [`IDLE`] under the engine's init.
fn container_body(sandbox: &Work, own: &[String], mounts: Vec<Mount>) -> ContainerCreateBody {
    let spec = &sandbox.spec;
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("GANTRY_SANDBOX_ID={}", sandbox.job_id));
    env.extend(DockerExecutor::gantry_env(sandbox));
    let labels = HashMap::from([
        (LABEL_JOB.to_string(), sandbox.job_id.clone()),
        (LABEL_ATTEMPT.to_string(), sandbox.attempt.to_string()),
        (LABEL_RUNNER.to_string(), sandbox.runner_id.clone()),
        (LABEL_LEASE.to_string(), sandbox.lease_id.clone()),
        (LABEL_SANDBOX.to_string(), sandbox.job_id.clone()),
    ]);
    let mut host_config = host_config(spec);
    host_config.init = Some(true);
    host_config.mounts = Some(mounts);
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        // With an entrypoint given, the image's command is not appended: it is in `own`.
        entrypoint: Some(
            [
                "/bin/sh",
                "-c",
                &format!("{OWN_THEN_IDLE}{IDLE}"),
                "gantry-sandbox",
            ]
            .into_iter()
            .map(String::from)
            .chain(own.iter().cloned())
            .collect(),
        ),
        env: Some(env),
        labels: Some(labels),
        working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
        tty: Some(false),
        open_stdin: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The launcher's line, read off the start of a command's stdout.
#[derive(Debug, Default)]
struct Launch {
    /// Stdout bytes until the line is complete.
    line: Vec<u8>,
    /// The line was read (or the output did not start with one): the command runs.
    started: bool,
    /// The command's process group, as the line says.
    pgid: Option<u32>,
}

impl Launch {
    /// Feeds stdout bytes (while not `started`); returns those that are the command's output.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let Some(end) = data.iter().position(|&b| b == b'\n') else {
            self.line.extend_from_slice(data);
            if self.line.len() > MAX_MARKER_LINE {
                // Not the launcher's: the output is the command's.
                self.started = true;
                return std::mem::take(&mut self.line);
            }
            return Vec::new();
        };
        self.line.extend_from_slice(&data[..end]);
        self.started = true;
        self.pgid = parse_marker(&self.line);
        let mut rest = Vec::new();
        if self.pgid.is_none() {
            rest = std::mem::take(&mut self.line);
            rest.push(b'\n');
        }
        rest.extend_from_slice(&data[end + 1..]);
        rest
    }
}

/// The group id of a launcher's line; `None` for anything else, and for 0 or 1 (never a
/// command's group: signalling one would reach the whole container).
fn parse_marker(line: &[u8]) -> Option<u32> {
    let digits = std::str::from_utf8(line.strip_prefix(MARKER)?).ok()?;
    digits.trim().parse().ok().filter(|pgid| *pgid > 1)
}

/// One command as it runs: what has been read and done so far.
struct ExecRun<'a> {
    workspace: &'a DockerWorkspace,
    io: &'a mut Io,
    exec_id: String,
    launch: Launch,
    /// What the launcher said on stderr before the command started (why it did not).
    launch_error: Vec<u8>,
    /// A stop was requested.
    stopping: bool,
    /// The grace passed: the group is to be killed.
    killing: bool,
    /// The group got a stop signal.
    signalled: bool,
}

impl ExecRun<'_> {
    /// Takes one item of the exec's output; returns false once the output has ended.
    async fn output(&mut self, item: Option<Result<LogOutput, DockerError>>) -> bool {
        match item {
            Some(Ok(LogOutput::StdOut { message })) => {
                if self.launch.started {
                    self.io.output(pb::LogStream::Stdout, &message).await;
                } else {
                    let rest = self.launch.feed(&message);
                    if self.launch.started {
                        self.on_start().await;
                    }
                    if !rest.is_empty() {
                        self.io.output(pb::LogStream::Stdout, &rest).await;
                    }
                }
                true
            }
            Some(Ok(LogOutput::StdErr { message })) => {
                if !self.launch.started {
                    let room = MAX_LAUNCH_ERROR.saturating_sub(self.launch_error.len());
                    self.launch_error
                        .extend_from_slice(&message[..message.len().min(room)]);
                }
                self.io.output(pb::LogStream::Stderr, &message).await;
                true
            }
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                tracing::warn!(exec = %self.exec_id, error = %e, "reading a command's output");
                false
            }
            None => false,
        }
    }

    /// The launcher said the command runs: report it, and pass on a stop that came first.
    async fn on_start(&mut self) {
        self.io.started(short(&self.exec_id)).await;
        if self.launch.pgid.is_none() {
            tracing::warn!(exec = %self.exec_id, "the command's launcher did not say its process group: it cannot be stopped");
        }
        if self.stopping {
            self.signal("TERM").await;
        }
        if self.killing {
            self.signal("KILL").await;
        }
    }

    /// Signals the command's group, once it is known.
    async fn signal(&mut self, signal: &str) {
        if let Some(pgid) = self.launch.pgid {
            self.workspace.signal_group(pgid, signal).await;
            self.signalled = true;
        }
    }
}

impl DockerWorkspace {
    async fn run(&self, exec: &Exec, io: &mut Io, mut stop: StopSignal) -> Outcome {
        let Some(program) = exec.argv.first() else {
            return Outcome::failed(pb::FailureKind::ExecutorError, "the command is empty");
        };
        let mut cmd = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            LAUNCH.to_string(),
            "gantry-exec".to_string(),
        ];
        cmd.extend(exec.argv.iter().cloned());
        let config = ExecConfig {
            attach_stdin: Some(!exec.stdin.is_empty()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(exec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            cmd: Some(cmd),
            working_dir: exec.working_dir.clone(),
            ..Default::default()
        };
        let exec_id = match self.docker.create_exec(&self.container, config).await {
            Ok(created) => created.id,
            Err(e) => {
                return Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!(
                        "cannot run a command in the sandbox's container {}: {e}",
                        short(&self.container)
                    ),
                );
            }
        };
        let options = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: None,
        };
        let (mut output, input) = match self.docker.start_exec(&exec_id, Some(options)).await {
            Ok(StartExecResults::Attached { output, input }) => (output, input),
            Ok(StartExecResults::Detached) => {
                return Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    "the engine started the command detached",
                );
            }
            Err(e) => {
                return Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!("starting the command: {e}"),
                );
            }
        };
        // Its input is written aside (a command that does not read it must not hold up its
        // output), then the write side is shut: the engine closes the command's stdin.
        let feeder = (!exec.stdin.is_empty()).then(|| {
            let data = exec.stdin.clone();
            let mut input = input;
            tokio::spawn(async move {
                if let Err(e) = input.write_all(&data).await {
                    tracing::debug!(error = %e, "the command did not take all of its input");
                }
                if let Err(e) = input.shutdown().await {
                    tracing::debug!(error = %e, "closing the command's input");
                }
            })
        });

        let mut run = ExecRun {
            workspace: self,
            io,
            exec_id,
            launch: Launch::default(),
            launch_error: Vec::new(),
            stopping: false,
            killing: false,
            signalled: false,
        };
        let kill_at = tokio::time::sleep(NEVER);
        tokio::pin!(kill_at);
        let poll = tokio::time::sleep(EXEC_POLL);
        tokio::pin!(poll);
        let mut poll_every = EXEC_POLL;
        let mut output_open = true;
        let mut failures = 0;
        // The exit code once the exec has ended; `None`: the runner lost track of it.
        let code = loop {
            tokio::select! {
                item = output.next(), if output_open => {
                    output_open = run.output(item).await;
                    if !output_open {
                        // The command has most likely exited: ask soon.
                        poll_every = EXIT_POLL;
                        poll.as_mut().reset(Instant::now());
                    }
                }
                _ = &mut poll => {
                    match self.docker.inspect_exec(&run.exec_id).await {
                        Ok(state) if state.running == Some(false) => break state.exit_code.or(Some(-1)),
                        Ok(_) => failures = 0,
                        Err(e) if is_not_found(&e) => break None,
                        Err(e) => {
                            failures += 1;
                            if failures > MAX_INSPECT_FAILURES {
                                tracing::warn!(exec = %run.exec_id, error = %e, "cannot inspect the command");
                                break None;
                            }
                        }
                    }
                    if !output_open {
                        poll_every = (poll_every * 2).min(EXEC_POLL);
                    }
                    poll.as_mut().reset(Instant::now() + poll_every);
                }
                s = stop_requested(&mut stop), if !run.stopping => {
                    run.stopping = true;
                    run.signal("TERM").await;
                    kill_at.as_mut().reset(Instant::now() + s.grace);
                }
                _ = &mut kill_at, if run.stopping && !run.killing => {
                    run.killing = true;
                    run.signal("KILL").await;
                }
            }
        };
        // Whatever the command left in its group goes with it (and closes the output).
        if let Some(pgid) = run.launch.pgid {
            self.signal_group(pgid, "KILL").await;
        }
        let drained = tokio::time::timeout(OUTPUT_DRAIN, async {
            while output_open {
                let item = output.next().await;
                output_open = run.output(item).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(exec = %run.exec_id, "a process outside the command's group keeps its output open; not waiting for it");
        }
        if let Some(feeder) = feeder {
            feeder.abort();
        }
        let Some(code) = code else {
            return Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("lost track of the command (exec {})", short(&run.exec_id)),
            );
        };
        if !run.launch.started {
            let said = String::from_utf8_lossy(&run.launch_error);
            let said = said.trim();
            return Outcome::failed(
                pb::FailureKind::ExecutorError,
                if said.is_empty() {
                    format!("could not start `{program}` in the sandbox (exit code {code})")
                } else {
                    format!("could not start `{program}` in the sandbox: {said}")
                },
            );
        }
        Outcome::Exited {
            code: i32::try_from(code).unwrap_or(i32::MAX),
            oom_killed: false,
            stopped: run.signalled,
        }
    }

    /// Sends `signal` (TERM, KILL) to the process group `pgid` in the container, through
    /// another exec ([`SIGNAL`]); waits until it ran. A group that is gone is fine.
    async fn signal_group(&self, pgid: u32, signal: &str) {
        let config = ExecConfig {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            cmd: Some(vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                SIGNAL.to_string(),
                "gantry-signal".to_string(),
                signal.to_string(),
                pgid.to_string(),
            ]),
            ..Default::default()
        };
        let sent = async {
            let id = self.docker.create_exec(&self.container, config).await?.id;
            if let StartExecResults::Attached { mut output, .. } =
                self.docker.start_exec(&id, None).await?
            {
                while let Some(item) = output.next().await {
                    item?;
                }
            }
            Ok::<(), DockerError>(())
        };
        match tokio::time::timeout(SIGNAL_TIMEOUT, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(container = %short(&self.container), pgid, signal, error = %e, "signalling a command's process group")
            }
            Err(_) => {
                tracing::warn!(container = %short(&self.container), pgid, signal, "signalling a command's process group took too long")
            }
        }
    }

    async fn remove_container(&self) -> Result<(), String> {
        match self
            .docker
            .remove_container(&self.container, Some(force_remove()))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(format!(
                "removing the sandbox's container {}: {e}",
                short(&self.container)
            )),
        }
    }
}

impl Workspace for DockerWorkspace {
    fn id(&self) -> String {
        short(&self.container).to_string()
    }

    fn exec<'a>(
        &'a self,
        exec: &'a Exec,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run(exec, io, stop))
    }

    fn remove(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.remove_container())
    }

    fn endpoint(&self) -> Option<String> {
        self.endpoint.clone()
    }

    fn store_artifacts<'a>(
        &'a self,
        sandbox: &'a Work,
        io: &'a mut Io,
        stop: StopSignal,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.transfer
                .store_artifacts(sandbox, &self.container, &self.working_dir, io, &stop)
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_line_leaves_the_output_and_names_the_group() {
        let mut l = Launch::default();
        assert_eq!(l.feed(b"gantry-pg"), b"");
        assert!(!l.started);
        assert_eq!(l.feed(b"id 42\nhello\n"), b"hello\n");
        assert!(l.started);
        assert_eq!(l.pgid, Some(42));
        // Anything else is the command's output, byte for byte.
        let mut l = Launch::default();
        assert_eq!(l.feed(b"plain\nrest"), b"plain\nrest");
        assert_eq!((l.started, l.pgid), (true, None));
        let mut l = Launch::default();
        let long = vec![b'x'; MAX_MARKER_LINE + 1];
        assert_eq!(l.feed(&long), long);
        assert!(l.started);
        // Never the container's init, nor a group id that does not parse.
        assert_eq!(parse_marker(b"gantry-pgid 1"), None);
        assert_eq!(parse_marker(b"gantry-pgid 0"), None);
        assert_eq!(parse_marker(b"gantry-pgid -5"), None);
        assert_eq!(parse_marker(b"gantry-pgid 77"), Some(77));
    }
}
