//! The `process` executor's sandbox workspace: a directory of its own under the runner's
//! work root (`<state-dir>/work/sandbox-<sandbox id>`), made fresh when the sandbox is
//! created and removed with it.
//!
//! Each command is a local process started in that directory (or in its own
//! `working_dir`), in a process group of its own, exactly as a job's process: the runner's
//! environment minus its `GANTRY_*` variables, plus the command's environment; its stdin
//! written from the command and then closed; a stop sends SIGTERM to the group, then SIGKILL
//! after the grace; whatever it leaves running in its group is killed when it exits. Files
//! stay: the next command sees what the previous one wrote.
//!
//! The sandbox's inputs are written into the directory when it is made (before the sandbox
//! reports RUNNING), and its artifacts are stored from it before it is removed.
//!
//! A runner that crashed leaves its workspaces behind; it removes them when it starts again
//! ([`ProcessExecutor::remove_orphan_workspaces`]), as the docker executor removes its
//! containers.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use futures::future::BoxFuture;
use gantry_proto as pb;
use tokio::io::AsyncWriteExt as _;

use super::{ProcessExecutor, supervise, without_runner_env};
use crate::executor::{Exec, Io, Outcome, StopSignal, Work, Workspace, files};

/// Workspace directories are named this, then the sandbox id.
const PREFIX: &str = "sandbox-";

/// A sandbox's directory.
pub struct ProcessWorkspace {
    /// The directory (absolute): the commands' default working directory.
    dir: PathBuf,
    /// GANTRY_ENDPOINT of its commands: the sandbox's socket on this host.
    endpoint: Option<String>,
}

impl ProcessExecutor {
    /// Makes the sandbox's directory, with its inputs in it.
    pub(super) async fn create_sandbox(
        &self,
        sandbox: &Work,
        io: &mut Io,
        mut stop: StopSignal,
    ) -> Result<Box<dyn Workspace>, Outcome> {
        // The sandbox id names the directory: only a UUID may (it comes from the network).
        let Ok(id) = uuid::Uuid::try_parse(&sandbox.job_id) else {
            return Err(Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("sandbox id {:?} is not a UUID", sandbox.job_id),
            ));
        };
        let dir = self.work_root.join(format!("{PREFIX}{id}"));
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        io.phase(pb::ExecutorPhase::Creating, dir.display().to_string())
            .await;
        // A sandbox is placed once, so a directory of that name is a leftover: start afresh.
        if let Err(e) = remove_dir(&dir).await {
            return Err(Outcome::failed(pb::FailureKind::ExecutorError, e));
        }
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return Err(Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("cannot create the workspace {}: {e}", dir.display()),
            ));
        }
        if let Err(failed) = files::place_inputs(sandbox, &dir, &mut stop).await {
            if let Err(e) = remove_dir(&dir).await {
                tracing::warn!("{e}");
            }
            return Err(failed);
        }
        // Nothing runs until a command comes: starting is instant.
        io.phase(pb::ExecutorPhase::Starting, dir.display().to_string())
            .await;
        Ok(Box::new(ProcessWorkspace {
            dir,
            endpoint: sandbox.access.local_endpoint(),
        }))
    }

    /// Removes the sandbox workspaces an earlier run of this runner left behind (a runner
    /// holds no sandbox when it starts). Returns how many.
    pub async fn remove_orphan_workspaces(&self) -> usize {
        let mut entries = match tokio::fs::read_dir(&self.work_root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                tracing::warn!(dir = %self.work_root.display(), error = %e, "listing the work directory");
                return 0;
            }
        };
        let mut removed = 0;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name();
            let is_workspace = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .is_some_and(|id| uuid::Uuid::try_parse(id).is_ok());
            if !is_workspace {
                continue;
            }
            let dir = entry.path();
            tracing::info!(dir = %dir.display(), "removing a sandbox workspace this runner left behind");
            match remove_dir(&dir).await {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("{e}"),
            }
        }
        removed
    }
}

/// Removes a directory and everything in it; one that is not there is fine.
async fn remove_dir(dir: &Path) -> Result<(), String> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "cannot remove the workspace {}: {e}",
            dir.display()
        )),
    }
}

impl ProcessWorkspace {
    async fn run(&self, exec: &Exec, io: &mut Io, mut stop: StopSignal) -> Outcome {
        let Some((program, args)) = exec.argv.split_first() else {
            return Outcome::failed(pb::FailureKind::ExecutorError, "the command is empty");
        };
        let dir = exec
            .working_dir
            .as_ref()
            .map_or_else(|| self.dir.clone(), PathBuf::from);
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(&dir)
            .stdin(if exec.stdin.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        without_runner_env(&mut cmd);
        cmd.envs(exec.env.iter().map(|(k, v)| (k, v)));
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Outcome::failed(
                    pb::FailureKind::ExecutorError,
                    format!("cannot start `{program}` in {}: {e}", dir.display()),
                );
            }
        };
        // Its input is written aside (a command that does not read it must not hold up its
        // output), then closed.
        let feeder = child.stdin.take().map(|mut pipe| {
            let data = exec.stdin.clone();
            tokio::spawn(async move {
                if let Err(e) = pipe.write_all(&data).await {
                    tracing::debug!(error = %e, "the command did not take all of its input");
                }
            })
        });
        let outcome = supervise(child, io, &mut stop).await;
        if let Some(feeder) = feeder {
            feeder.abort();
        }
        outcome
    }
}

impl Workspace for ProcessWorkspace {
    fn id(&self) -> String {
        self.dir.display().to_string()
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
        Box::pin(remove_dir(&self.dir))
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
        Box::pin(async move { files::store_artifacts(sandbox, &self.dir, io, &stop).await })
    }
}
