//! The docker executor's side of a work's files (see [`crate::executor::files`]): inputs are read into
//! a temporary directory on this host, then copied into the created container as one tar
//! archive before it starts; artifacts are read out of the container (stopped, or a
//! sandbox's, still running) as tar archives of the few paths the patterns can match, into
//! a temporary directory, and stored from there. Archives stream both ways through
//! [`archive`]: neither an input nor an artifact is ever whole in memory. Of what comes out
//! of a container only the files the patterns take are written, and no more than the
//! runner's --max-artifact-transit-bytes ([`MAX_ARTIFACT_FILES`] files) per attempt: a
//! pattern such as `**/*.log` reads the whole working directory out of the container.
use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use bytes::Bytes;
use futures::StreamExt as _;
use gantry_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{DockerExecutor, is_not_found};
use crate::executor::{
    Io, Outcome, StopReason, StopSignal, Work,
    files::{self, MAX_ARTIFACT_FILES, Wanted, archive},
};
use bollard::Docker;

/// Archive pieces in flight between a blocking thread and the engine's connection.
const IN_FLIGHT: usize = 16;
/// Bytes gathered into one piece of an archive being sent.
const PIECE: usize = 256 * 1024;
/// Bytes of artifacts read out of a container per attempt at most, unless configured
/// (--max-artifact-transit-bytes): 16 GiB.
pub const DEFAULT_MAX_TRANSIT_BYTES: u64 = 16 << 30;

/// The engine, and where files in transit wait: what copying files in and out of a
/// container takes (a sandbox's workspace keeps one).
#[derive(Clone)]
pub(super) struct Transfer {
    docker: Docker,
    /// Temporary directories are made under this one.
    scratch: PathBuf,
    /// Bytes of artifacts read out of a container per attempt at most.
    max_transit_bytes: u64,
}

impl DockerExecutor {
    /// Files in and out of this executor's containers.
    pub(super) fn transfer(&self) -> Transfer {
        Transfer {
            docker: self.docker.clone(),
            scratch: self.scratch.clone(),
            max_transit_bytes: self.max_transit_bytes,
        }
    }
}

impl Transfer {
    /// The container's working directory: the spec's, else the image's, else `/`.
    pub(super) async fn working_dir(&self, container: &str, spec: &pb::JobSpec) -> String {
        if !spec.working_dir.is_empty() {
            return spec.working_dir.clone();
        }
        self.docker
            .inspect_container(container, None)
            .await
            .ok()
            .and_then(|c| c.config)
            .and_then(|c| c.working_dir)
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".to_string())
    }

    /// A temporary directory for files in transit.
    async fn transit(&self, prefix: &str) -> Result<tempfile::TempDir, String> {
        tokio::fs::create_dir_all(&self.scratch)
            .await
            .map_err(|e| format!("cannot create {}: {e}", self.scratch.display()))?;
        let scratch = self.scratch.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            tempfile::Builder::new()
                .prefix(&prefix)
                .tempdir_in(&scratch)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!(
                "cannot create a directory under {}: {e}",
                self.scratch.display()
            )
        })
    }

    /// Places the work's inputs in the created (not started) container, under
    /// `working_dir`. `Err` is how the attempt ends.
    pub(super) async fn copy_inputs(
        &self,
        work: &Work,
        container: &str,
        working_dir: &str,
        stop: &mut StopSignal,
    ) -> Result<(), Outcome> {
        if work.spec.inputs.is_empty() {
            return Ok(());
        }
        let dir = self
            .transit("in-")
            .await
            .map_err(|e| Outcome::failed(pb::FailureKind::ExecutorError, e))?;
        let placed = files::place_inputs(work, dir.path(), stop).await?;
        let list: Vec<(String, PathBuf)> = placed.into_iter().map(|p| (p.name, p.file)).collect();
        let copied = self.upload_archive(container, working_dir, list).await;
        remove_transit(dir).await;
        copied.map_err(|e| {
            Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("cannot copy the inputs into the container at {working_dir}: {e}"),
            )
        })
    }

    /// Sends `files` (name, file on this host) into the container as an archive extracted
    /// at `dir`.
    async fn upload_archive(
        &self,
        container: &str,
        dir: &str,
        files: Vec<(String, PathBuf)>,
    ) -> Result<(), String> {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(IN_FLIGHT);
        let packer = tokio::task::spawn_blocking(move || {
            let mut out = io::BufWriter::with_capacity(PIECE, archive::Outgoing::new(tx.clone()));
            let packed = archive::pack(&mut out, &files).and_then(|()| out.flush());
            if let Err(e) = &packed {
                // The engine must not take a cut archive for a whole one.
                let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
            }
            packed
        });
        let uploaded = self
            .docker
            .upload_to_container(
                container,
                Some(UploadToContainerOptions {
                    path: dir.to_string(),
                    ..Default::default()
                }),
                bollard::body_try_stream(ReceiverStream::new(rx)),
            )
            .await;
        let packed = packer.await;
        match (uploaded, packed) {
            (Ok(()), Ok(Ok(()))) => Ok(()),
            (_, Ok(Err(e))) => Err(format!("making the archive: {e}")),
            (_, Err(e)) => Err(format!("making the archive: {e}")),
            (Err(e), _) => Err(e.to_string()),
        }
    }

    /// Reads the artifacts out of the container (unless the lease is lost) and stores them;
    /// what cannot be read is a note on the attempt's stderr.
    pub(super) async fn store_artifacts(
        &self,
        work: &Work,
        container: &str,
        working_dir: &str,
        io: &mut Io,
        stop: &StopSignal,
    ) {
        let lost = stop
            .borrow()
            .as_ref()
            .is_some_and(|s| s.reason == StopReason::LeaseLost);
        if work.spec.artifacts.is_empty() || lost {
            return;
        }
        let dir = match self.transit("out-").await {
            Ok(dir) => dir,
            Err(e) => {
                io.note(&format!(
                    "gantry: the artifacts could not be collected: {e}"
                ))
                .await;
                return;
            }
        };
        let wanted = Arc::new(Wanted::new(&work.spec.artifacts));
        let mut budget = archive::Budget::new(self.max_transit_bytes, MAX_ARTIFACT_FILES);
        for root in files::artifact_roots(&work.spec.artifacts) {
            if budget.spent {
                break;
            }
            let (path, base) = source(working_dir, &root);
            let dest = dir.path().join(&root);
            let read = Read {
                path,
                base,
                dest: dest.clone(),
                root: root.clone(),
                wanted: wanted.clone(),
            };
            match self.download(container, read, budget.clone()).await {
                Ok((spent, notes)) => {
                    budget = spent;
                    for note in notes {
                        io.note(&note).await;
                    }
                }
                Err(e) => {
                    // Nothing half-read is stored.
                    remove_path(&dest).await;
                    io.note(&format!(
                        "gantry: the artifacts under {:?} could not be read from the container: {e}",
                        if root.as_os_str().is_empty() {
                            working_dir.to_string()
                        } else {
                            root.display().to_string()
                        }
                    ))
                    .await;
                }
            }
        }
        if let Some(note) = budget.note() {
            io.note(&note).await;
        }
        files::store_artifacts(work, dir.path(), io, stop).await;
        remove_transit(dir).await;
    }

    /// Reads `read.path` out of the container into `read.dest` (which stands for it), as
    /// far as `budget` goes; returns the budget left and lines for the attempt's stderr. A
    /// path that is not there is nothing to read.
    async fn download(
        &self,
        container: &str,
        read: Read,
        budget: archive::Budget,
    ) -> Result<(archive::Budget, Vec<String>), String> {
        let Read {
            path,
            base,
            dest,
            root,
            wanted,
        } = read;
        let mut archive = self
            .docker
            .download_from_container(container, Some(DownloadFromContainerOptions { path }));
        let first = match archive.next().await {
            None => return Ok((budget, Vec::new())),
            Some(Err(e)) if is_not_found(&e) => return Ok((budget, Vec::new())),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(bytes)) => bytes,
        };
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(IN_FLIGHT);
        let unpacker = tokio::task::spawn_blocking(move || {
            let mut budget = budget;
            archive::unpack(
                archive::Incoming::new(rx),
                &dest,
                &base,
                &root,
                &|rel| wanted.wants(rel),
                &mut budget,
            )
            .map(|unpacked| (budget, unpacked.notes))
        });
        let mut failure = None;
        let mut next: Option<Result<Bytes, bollard::errors::Error>> = Some(Ok(first));
        while let Some(item) = next {
            match item {
                Ok(bytes) => {
                    if tx.send(Ok(bytes)).await.is_err() {
                        // The unpacker stopped: its error says why.
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    break;
                }
            }
            next = archive.next().await;
        }
        drop(tx);
        let unpacked = unpacker.await;
        if let Some(failure) = failure {
            return Err(failure);
        }
        match unpacked {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(format!("reading the archive: {e}")),
            Err(e) => Err(format!("reading the archive: {e}")),
        }
    }
}

/// One path read out of a container.
struct Read {
    /// Its path in the container.
    path: String,
    /// The name its archive's entries start with.
    base: String,
    /// Where it goes on this host.
    dest: PathBuf,
    /// Its path relative to the workspace.
    root: PathBuf,
    /// What of it the artifact patterns take.
    wanted: Arc<Wanted>,
}

/// What to ask the engine for to read `root` (relative to `working_dir`; empty: all of it),
/// and the name its archive's entries start with.
fn source(working_dir: &str, root: &Path) -> (String, String) {
    let path: PathBuf = Path::new(working_dir)
        .components()
        .chain(root.components())
        .collect();
    match path.file_name().and_then(|n| n.to_str()) {
        Some(base) => (path.display().to_string(), base.to_string()),
        // The container's root: its contents, entries named `./…`.
        None => ("/.".to_string(), ".".to_string()),
    }
}

/// Removes a file or a directory with everything in it; one that is not there is fine.
async fn remove_path(path: &Path) {
    let removed = match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(path).await,
        Ok(_) => tokio::fs::remove_file(path).await,
        Err(_) => Ok(()),
    };
    if let Err(e) = removed {
        tracing::warn!(path = %path.display(), error = %e, "removing a partly read artifact");
    }
}

/// Removes a temporary directory (blocking work, off the runtime's threads).
async fn remove_transit(dir: tempfile::TempDir) {
    let path = dir.path().to_path_buf();
    let removed = tokio::task::spawn_blocking(move || dir.close()).await;
    if !matches!(removed, Ok(Ok(()))) {
        tracing::warn!(dir = %path.display(), "removing files in transit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_read_by_its_path_in_the_container() {
        assert_eq!(
            source("/work", Path::new("out")),
            ("/work/out".to_string(), "out".to_string())
        );
        assert_eq!(
            source("/work/", Path::new("")),
            ("/work".to_string(), "work".to_string())
        );
        assert_eq!(
            source("/", Path::new("a/b.txt")),
            ("/a/b.txt".to_string(), "b.txt".to_string())
        );
        assert_eq!(
            source("/", Path::new("")),
            ("/.".to_string(), ".".to_string())
        );
    }
}
