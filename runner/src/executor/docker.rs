//! The `docker` executor: the job in a container on the runner's Docker engine (bollard).
//!
//! Phases, reported as events: PULLING (per the pull policy), CREATING, STARTING, RUNNING,
//! STOPPING (cancel, timeout, drain), REMOVING. The container gets the job's command
//! (entrypoint), args (CMD), env plus `GANTRY_JOB_ID`, `GANTRY_ATTEMPT`, `GANTRY_RUNNER_ID`,
//! `GANTRY_WORK_TOKEN` and `GANTRY_ENDPOINT`, working dir, memory and CPU limits, and the
//! labels `gantry.job-id`, `gantry.attempt`, `gantry.runner-id`, `gantry.lease-id`. Two
//! mounts: the work's endpoint directory at `/run/gantry` (so `GANTRY_ENDPOINT` is
//! `unix:///run/gantry/gantry.sock`, see [`crate::relay`]), and the runner's `gantry` binary,
//! read-only, at `/usr/local/bin/gantry` (`--gantry-binary`, copied into the state
//! directory at start-up), so that any image can run `gantry job …`. Both are mounted by
//! their path on the engine's host: the engine must see the runner's state directory at
//! the runner's path. The inputs are copied into the created container before it starts, and
//! the artifacts read out of it once it has stopped, before it is removed ([`files`]).
//! Output is attached before the start, so no byte is missed. A stop sends the image's stop signal (SIGTERM by default) and SIGKILL once the
//! grace period has passed, as `docker stop` does. The container is removed when the attempt
//! ends; containers a crashed runner left behind are removed when it starts again
//! ([`DockerExecutor::remove_orphans`]).
//!
//! Sandboxes get one container each, kept running, whose commands are `docker exec`s
//! ([`sandbox`]); they carry the same labels (plus `gantry.sandbox-id`), so the same cleanup
//! removes them.
mod files;
pub mod sandbox;

pub use files::DEFAULT_MAX_TRANSIT_BYTES;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use bollard::{
    Docker,
    container::LogOutput,
    errors::Error as DockerError,
    models::{ContainerCreateBody, HostConfig, Mount, MountType},
    query_parameters::{
        AttachContainerOptions, CreateContainerOptions, CreateImageOptions, EventsOptions,
        KillContainerOptions, ListContainersOptions, RemoveContainerOptions, WaitContainerOptions,
    },
};
use futures::{StreamExt, future::BoxFuture};
use gantry_proto as pb;
use tokio::sync::watch;

use super::{Executor, Io, Outcome, StopSignal, Work, Workspace, stop_requested};
use crate::relay;

/// Label naming the runner that created a container.
pub const LABEL_RUNNER: &str = "gantry.runner-id";
/// Label naming the job of a container.
pub const LABEL_JOB: &str = "gantry.job-id";
/// Label naming the attempt number of a container.
pub const LABEL_ATTEMPT: &str = "gantry.attempt";
/// Label naming the lease of a container's attempt.
pub const LABEL_LEASE: &str = "gantry.lease-id";

/// Where the `gantry` binary is mounted in containers.
pub const GANTRY_IN_CONTAINER: &str = "/usr/local/bin/gantry";

/// Runs jobs in containers.
pub struct DockerExecutor {
    docker: Docker,
    /// Longest a pull may take before the attempt fails with IMAGE_UNAVAILABLE.
    pull_timeout: Duration,
    /// The `gantry` binary mounted into every container (absolute); `None`: none is.
    gantry_binary: Option<PathBuf>,
    /// Inputs on their way into a container, and artifacts on their way out of one, wait
    /// in temporary directories under this one.
    scratch: PathBuf,
    /// Bytes of artifacts read out of a container per attempt at most.
    max_transit_bytes: u64,
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// `image` with a tag: a pull without one would fetch every tag.
fn with_tag(image: &str) -> (String, String) {
    if image.contains('@') {
        return (image.to_string(), String::new());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) => {
            let repo = &image[..image.len() - tag.len() - 1];
            (repo.to_string(), tag.to_string())
        }
        None => (image.to_string(), "latest".to_string()),
    }
}

impl DockerExecutor {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket) and checks that it
    /// answers.
    pub async fn connect(pull_timeout: Duration) -> anyhow::Result<Self> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| {
            anyhow::anyhow!("the docker executor needs a Docker engine: {e} (offer only `--executors process` to run without one)")
        })?;
        docker.ping().await.map_err(|e| {
            anyhow::anyhow!("the Docker engine does not answer: {e} (offer only `--executors process` to run without one)")
        })?;
        Ok(Self {
            docker,
            pull_timeout,
            gantry_binary: None,
            scratch: std::env::temp_dir(),
            max_transit_bytes: files::DEFAULT_MAX_TRANSIT_BYTES,
        })
    }

    /// Copies the `gantry` binary at `source` to `dir` (the runner's state directory's
    /// `bin/`), for [`DockerExecutor::with_files`]. Why a copy: the engine mounts files by
    /// their path on its own host, and the runner's state directory is the one place the
    /// engine must see already (the work's endpoint sockets are there); the runner's own
    /// executable may be in a container of its own, out of the engine's sight.
    pub async fn stage_gantry_binary(source: &Path, dir: &Path) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        tokio::fs::create_dir_all(dir).await?;
        let staged = dir.join("gantry");
        let partial = dir.join(".gantry.partial");
        tokio::fs::copy(source, &partial).await?;
        tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).await?;
        tokio::fs::rename(&partial, &staged).await?;
        Ok(staged)
    }

    /// Mounts `gantry_binary` (absolute) into every container, and keeps files in transit
    /// under `scratch`.
    pub fn with_files(mut self, gantry_binary: Option<PathBuf>, scratch: PathBuf) -> Self {
        self.gantry_binary = gantry_binary;
        self.scratch = scratch;
        self
    }

    /// Reads no more than `bytes` of artifacts out of a container per attempt (what comes
    /// past that is not stored, and the attempt's stderr says so).
    pub fn with_max_transit_bytes(mut self, bytes: u64) -> Self {
        self.max_transit_bytes = bytes;
        self
    }

    /// The mounts of a work's container: its endpoint's directory, the `gantry` binary.
    fn mounts(&self, work: &Work) -> Vec<Mount> {
        let bind = |source: &std::path::Path, target: &str, read_only: bool| Mount {
            source: Some(source.display().to_string()),
            target: Some(target.to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Default::default()
        };
        let mut mounts = Vec::new();
        if let Some(dir) = work.access.relay_dir() {
            // Read-only: connecting to a socket needs no write access to its file system,
            // and the container has no business writing into the runner's state directory.
            mounts.push(bind(dir, relay::CONTAINER_DIR, true));
        }
        if let Some(binary) = &self.gantry_binary {
            mounts.push(bind(binary, GANTRY_IN_CONTAINER, true));
        }
        mounts
    }

    /// The work's environment variables in its container (GANTRY_ENDPOINT as mounted).
    fn gantry_env(work: &Work) -> impl Iterator<Item = String> {
        let endpoint = work
            .access
            .relay_dir()
            .map(|_| relay::CONTAINER_ENDPOINT.to_string());
        work.gantry_env(endpoint)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
    }

    /// Removes every container labelled with one of `runner_ids` (a runner holds no attempt
    /// when it starts, so any such container was left behind by a crash). Returns how many.
    pub async fn remove_orphans(&self, runner_ids: &[String]) -> anyhow::Result<usize> {
        let mut removed = 0;
        for id in runner_ids {
            let filters =
                HashMap::from([("label".to_string(), vec![format!("{LABEL_RUNNER}={id}")])]);
            let containers = self
                .docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters),
                    ..Default::default()
                }))
                .await?;
            for c in containers {
                let Some(cid) = c.id else { continue };
                let labels = c.labels.unwrap_or_default();
                tracing::info!(
                    container = %cid,
                    job = labels.get(LABEL_JOB).map(String::as_str).unwrap_or("?"),
                    sandbox = labels.get(sandbox::LABEL_SANDBOX).map(String::as_str).unwrap_or(""),
                    attempt = labels.get(LABEL_ATTEMPT).map(String::as_str).unwrap_or("?"),
                    "removing a container this runner left behind"
                );
                match self
                    .docker
                    .remove_container(&cid, Some(force_remove()))
                    .await
                {
                    Ok(()) => removed += 1,
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    }

    /// Makes sure the image is there, per the pull policy. `Err` is the failure to report.
    async fn ensure_image(
        &self,
        spec: &pb::JobSpec,
        io: &mut Io,
        stop: &mut StopSignal,
    ) -> Result<(), Outcome> {
        let image = &spec.image;
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => {
                return Err(Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!("inspecting image {image}: {e}"),
                ));
            }
        };
        let policy = pb::PullPolicy::try_from(spec.pull_policy).unwrap_or_default();
        let pull = match policy {
            pb::PullPolicy::Always => true,
            pb::PullPolicy::Never => false,
            pb::PullPolicy::IfNotPresent | pb::PullPolicy::Unspecified => !present,
        };
        if !pull {
            return if present {
                Ok(())
            } else {
                Err(Outcome::failed(
                    pb::FailureKind::ImageUnavailable,
                    format!(
                        "image {image} is not present on this runner's engine and the pull policy is NEVER"
                    ),
                ))
            };
        }
        io.phase(pb::ExecutorPhase::Pulling, image.as_str()).await;
        let (repo, tag) = with_tag(image);
        let options = CreateImageOptions {
            from_image: Some(repo),
            tag: (!tag.is_empty()).then_some(tag),
            ..Default::default()
        };
        let mut progress = self.docker.create_image(Some(options), None, None);
        let pulled = async {
            while let Some(item) = progress.next().await {
                item?;
            }
            Ok::<(), DockerError>(())
        };
        tokio::select! {
            r = tokio::time::timeout(self.pull_timeout, pulled) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Outcome::failed(
                    pb::FailureKind::ImageUnavailable,
                    format!("pulling image {image}: {e}"),
                )),
                Err(_) => Err(Outcome::failed(
                    pb::FailureKind::ImageUnavailable,
                    format!("pulling image {image}: no result within {} s", self.pull_timeout.as_secs()),
                )),
            },
            s = stop_requested(stop) => Err(Outcome::failed(
                pb::FailureKind::Canceled,
                format!("stopped while pulling image {image}: {}", s.message),
            )),
        }
    }

    fn container_body(&self, work: &Work) -> ContainerCreateBody {
        let spec = &work.spec;
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(Self::gantry_env(work));
        let mut host_config = host_config(spec);
        host_config.mounts = Some(self.mounts(work));
        let labels = HashMap::from([
            (LABEL_JOB.to_string(), work.job_id.clone()),
            (LABEL_ATTEMPT.to_string(), work.attempt.to_string()),
            (LABEL_RUNNER.to_string(), work.runner_id.clone()),
            (LABEL_LEASE.to_string(), work.lease_id.clone()),
        ]);
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            env: Some(env),
            labels: Some(labels),
            working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    async fn execute(&self, work: &Work, io: &mut Io, mut stop: StopSignal) -> Outcome {
        if work.spec.image.is_empty() {
            return Outcome::failed(
                pb::FailureKind::InvalidSpec,
                "spec.image is required by the docker executor",
            );
        }
        if let Err(failed) = self.ensure_image(&work.spec, io, &mut stop).await {
            return failed;
        }
        if let Some(s) = stop.borrow().clone() {
            return Outcome::failed(pb::FailureKind::Canceled, s.message);
        }
        io.phase(pb::ExecutorPhase::Creating, work.spec.image.as_str())
            .await;
        let name = format!("gantry-{}-{}", work.job_id, work.attempt);
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                self.container_body(work),
            )
            .await;
        let id = match created {
            Ok(c) => c.id,
            Err(e) => {
                // An image that vanished between the check and the create is unavailable.
                let kind = if is_not_found(&e) {
                    pb::FailureKind::ImageUnavailable
                } else {
                    pb::FailureKind::ExecutorError
                };
                return Outcome::failed(kind, format!("creating the container: {e}"));
            }
        };
        let outcome = self.run_in(work, &id, io, &mut stop).await;
        io.phase(pb::ExecutorPhase::Removing, short(&id)).await;
        if let Err(e) = self
            .docker
            .remove_container(&id, Some(force_remove()))
            .await
            && !is_not_found(&e)
        {
            tracing::warn!(container = %id, error = %e, "removing the container");
        }
        outcome
    }

    /// Copies the inputs into the created container `id`, runs it, and stores the
    /// artifacts from it.
    async fn run_in(&self, work: &Work, id: &str, io: &mut Io, stop: &mut StopSignal) -> Outcome {
        let spec = &work.spec;
        let transfer = self.transfer();
        let working_dir = if spec.inputs.is_empty() && spec.artifacts.is_empty() {
            String::new()
        } else {
            transfer.working_dir(id, spec).await
        };
        if let Err(failed) = transfer.copy_inputs(work, id, &working_dir, stop).await {
            return failed;
        }
        let outcome = self.attach_and_run(id, io, stop).await;
        transfer
            .store_artifacts(work, id, &working_dir, io, stop)
            .await;
        outcome
    }

    async fn attach_and_run(&self, id: &str, io: &mut Io, stop: &mut StopSignal) -> Outcome {
        let attached = self
            .docker
            .attach_container(
                id,
                Some(AttachContainerOptions {
                    stdout: true,
                    stderr: true,
                    stream: true,
                    // The attach completes before the start, so the stream sees every
                    // byte; a replay of the log as well could repeat output the start
                    // raced into both.
                    logs: false,
                    ..Default::default()
                }),
            )
            .await;
        let mut output = match attached {
            Ok(a) => a.output,
            Err(e) => {
                return Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!("attaching to the container: {e}"),
                );
            }
        };
        io.phase(pb::ExecutorPhase::Starting, short(id)).await;
        let oom = self.watch_oom(id);
        if let Err(e) = self.docker.start_container(id, None).await {
            return Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("starting the container: {e}"),
            );
        }
        io.started(short(id)).await;

        let mut wait = self.docker.wait_container(
            id,
            Some(WaitContainerOptions {
                condition: "not-running".to_string(),
            }),
        );
        let kill_at = tokio::time::sleep(super::NEVER);
        tokio::pin!(kill_at);
        let mut stopping = false;
        let mut output_open = true;
        let mut wait_failures = 0;
        let code = loop {
            tokio::select! {
                w = wait.next() => match w {
                    Some(Ok(r)) => break Some(r.status_code),
                    Some(Err(DockerError::DockerContainerWaitError { code, .. })) => break Some(code),
                    other => {
                        // The wait broke (an engine hiccup): the container may still run.
                        if let Some(code) = self.exit_code(id).await {
                            break Some(code);
                        }
                        wait_failures += 1;
                        if wait_failures > 3 {
                            tracing::warn!(container = %id, result = ?other.map(|r| r.map(|_| ())), "cannot wait for the container");
                            break None;
                        }
                        wait = self.docker.wait_container(
                            id,
                            Some(WaitContainerOptions {
                                condition: "not-running".to_string(),
                            }),
                        );
                    }
                },
                chunk = output.next(), if output_open => match chunk {
                    Some(Ok(LogOutput::StdOut { message })) => io.output(pb::LogStream::Stdout, &message).await,
                    Some(Ok(LogOutput::StdErr { message })) => io.output(pb::LogStream::Stderr, &message).await,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(container = %id, error = %e, "reading the container's output");
                        output_open = false;
                    }
                    None => output_open = false,
                },
                s = stop_requested(stop), if !stopping => {
                    // The runner keeps the grace itself (as `docker stop` would, but without
                    // an HTTP request that lasts the whole grace).
                    stopping = true;
                    let signal = self.stop_signal(id).await;
                    io.phase(
                        pb::ExecutorPhase::Stopping,
                        format!("{signal}, then SIGKILL after {} s", s.grace.as_secs()),
                    )
                    .await;
                    self.signal(id, &signal).await;
                    kill_at.as_mut().reset(tokio::time::Instant::now() + s.grace);
                }
                _ = &mut kill_at, if stopping => {
                    self.signal(id, "SIGKILL").await;
                    kill_at.as_mut().reset(tokio::time::Instant::now() + super::NEVER);
                }
            }
        };
        // The attach stream ends with the container: read what is left of it, within reason.
        let drained = tokio::time::timeout(super::OUTPUT_DRAIN, async {
            while output_open {
                match output.next().await {
                    Some(Ok(LogOutput::StdOut { message })) => {
                        io.output(pb::LogStream::Stdout, &message).await
                    }
                    Some(Ok(LogOutput::StdErr { message })) => {
                        io.output(pb::LogStream::Stderr, &message).await
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => output_open = false,
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(container = %id, "the container's output did not end after it exited");
        }
        let Some(code) = code else {
            self.signal(id, "SIGKILL").await;
            return Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("lost track of container {}", short(id)),
            );
        };
        let mut oom_killed = *oom.flag.borrow()
            || self
                .docker
                .inspect_container(id, None)
                .await
                .ok()
                .and_then(|c| c.state)
                .and_then(|s| s.oom_killed)
                .unwrap_or(false);
        if !oom_killed && !stopping && code == 137 {
            // Killed by SIGKILL and not by us: the engine's OOM event may trail the exit.
            let mut flag = oom.flag.clone();
            oom_killed = tokio::time::timeout(OOM_EVENT_WAIT, flag.wait_for(|f| *f))
                .await
                .is_ok_and(|r| r.is_ok());
        }
        Outcome::Exited {
            code: i32::try_from(code).unwrap_or(i32::MAX),
            oom_killed,
            stopped: stopping,
        }
    }

    /// Follows the engine's `oom` events for the container (replayed from a moment before,
    /// so none is missed between this call and the start), as the container state's
    /// OOMKilled flag is not always set when the exit is reported.
    fn watch_oom(&self, id: &str) -> OomWatch {
        let (tx, flag) = watch::channel(false);
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().saturating_sub(1));
        let filters = HashMap::from([
            ("container".to_string(), vec![id.to_string()]),
            ("event".to_string(), vec!["oom".to_string()]),
        ]);
        let docker = self.docker.clone();
        let task = tokio::spawn(async move {
            let mut events = docker.events(Some(EventsOptions {
                since: Some(since.to_string()),
                filters: Some(filters),
                ..Default::default()
            }));
            while let Some(Ok(_)) = events.next().await {
                tx.send_replace(true);
            }
        });
        OomWatch { flag, task }
    }

    /// The exit code of a container that is no longer running; `None` while it runs (or
    /// cannot be inspected).
    async fn exit_code(&self, id: &str) -> Option<i64> {
        let state = self.docker.inspect_container(id, None).await.ok()?.state?;
        if state.running == Some(false) {
            state.exit_code
        } else {
            None
        }
    }

    /// The container's stop signal (the image's STOPSIGNAL), SIGTERM by default.
    async fn stop_signal(&self, id: &str) -> String {
        self.docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|c| c.config)
            .and_then(|c| c.stop_signal)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "SIGTERM".to_string())
    }

    /// Sends a signal to the container; one that has already stopped is fine.
    async fn signal(&self, id: &str, signal: &str) {
        let options = KillContainerOptions {
            signal: signal.to_string(),
        };
        match self.docker.kill_container(id, Some(options)).await {
            Ok(()) => {}
            // 404: gone; 409: not running.
            Err(DockerError::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => {}
            Err(e) => {
                tracing::warn!(container = %id, signal, error = %e, "signalling the container")
            }
        }
    }
}

/// The memory and CPU limits of a spec.
fn host_config(spec: &pb::JobSpec) -> HostConfig {
    let limits = spec.resources.unwrap_or_default();
    let memory = i64::try_from(limits.memory_bytes).ok().filter(|m| *m > 0);
    HostConfig {
        memory,
        // No swap beyond the memory limit: the limit means what it says.
        memory_swap: memory,
        nano_cpus: (limits.cpu_millis > 0).then(|| i64::from(limits.cpu_millis) * 1_000_000),
        ..Default::default()
    }
}

/// How long an exit by SIGKILL waits for the engine's OOM event.
const OOM_EVENT_WAIT: Duration = Duration::from_secs(2);

/// A container's OOM events, followed until dropped.
struct OomWatch {
    flag: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OomWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn force_remove() -> RemoveContainerOptions {
    RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    }
}

/// The short form of a container id, as `docker ps` shows it.
fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

impl Executor for DockerExecutor {
    fn kind(&self) -> pb::ExecutorKind {
        pb::ExecutorKind::Docker
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

#[cfg(test)]
mod tests {
    use super::{DockerExecutor, with_tag};

    #[tokio::test]
    async fn the_gantry_binary_is_staged_executable_in_the_state_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("gantry-src");
        std::fs::write(&source, b"binary").expect("write");
        let bin = dir.path().join("state/bin");
        for _ in 0..2 {
            let staged = DockerExecutor::stage_gantry_binary(&source, &bin)
                .await
                .expect("staged");
            assert_eq!(staged, bin.join("gantry"));
            assert_eq!(std::fs::read(&staged).expect("read"), b"binary");
            let mode = std::fs::metadata(&staged)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);
        }
    }

    #[test]
    fn pulls_name_a_tag() {
        assert_eq!(with_tag("alpine"), ("alpine".into(), "latest".into()));
        assert_eq!(with_tag("alpine:3.20"), ("alpine".into(), "3.20".into()));
        assert_eq!(
            with_tag("localhost:5000/team/app"),
            ("localhost:5000/team/app".into(), "latest".into())
        );
        assert_eq!(
            with_tag("localhost:5000/team/app:v1"),
            ("localhost:5000/team/app".into(), "v1".into())
        );
        assert_eq!(
            with_tag("app@sha256:abc"),
            ("app@sha256:abc".into(), String::new())
        );
    }
}
