//! A work's files: its inputs, placed in its workspace before anything of it runs, and its
//! artifacts, stored once it has ended.
//!
//! Both go through WorkService with the work's own token ([`Access`]), so the server checks
//! them as it checks the work's own calls: a runner reads only the inputs of work it runs,
//! and stores artifacts only for the attempt that is current.
//!
//! # Inputs
//! `ListInputs` resolves the spec's inputs; each is then read with `ReadInput` and written,
//! as it streams, to its path under a directory on this host (the workspace itself for the
//! process executor; a temporary directory the docker executor copies into the container),
//! its SHA-256 and size checked against the resolved blob ([`Tally`]). Memory stays bounded
//! by one chunk, and each is written under a temporary name beside its path and renamed into
//! place once it checked out, so no partial input is ever at an input's path. The first input
//! that cannot be had fails the attempt, naming it (`input 0 (data/in.bin): …`): as
//! INPUT_UNAVAILABLE (not retried) when the input itself cannot be had — the server says so
//! (`ResolvedInput.unavailable`, or ReadInput answers NOT_FOUND or INVALID_ARGUMENT), or its
//! bytes do not match its digest or size; as EXECUTOR_ERROR (retried under the job's policy)
//! when the fault is elsewhere — the server unreachable past a few seconds, a read that broke
//! off or another status, a file this host cannot write.
//!
//! Inputs are placed, and artifacts read, through no symbolic link ([`beneath`]): a
//! workspace a job reuses may hold links an earlier job left there. An input whose path goes
//! through a link is not placed (the attempt fails EXECUTOR_ERROR, naming the link); an input
//! replaces a file or a link that has its name, never writing through it.
//!
//! # Artifacts
//! The spec's `artifacts` are files, directories (every file under them) or glob patterns
//! (`*`, `?`, `[...]` within a path component, `**` across them), relative to the
//! workspace. [`find_artifacts`] matches them over a directory on this host (the workspace;
//! for the docker executor, what was read out of the container) without following symbolic
//! links; each regular file found is uploaded, streamed from disk in chunks, under its path
//! relative to the workspace (opened anew through no link, and uploaded only if it still is a
//! regular file). A pattern that matches nothing, a symbolic link it matches (`gantry:
//! artifact "x" is a symbolic link; not stored`), or an upload the server refuses, is a line
//! on the attempt's stderr and changes nothing else.
pub mod archive;
pub mod beneath;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::{OsStr, OsString},
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Component, Path, PathBuf},
};

use futures::StreamExt as _;
use gantry_proto as pb;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

use crate::{
    executor::{Io, Outcome, StopReason, StopSignal, Work, stop_requested},
    relay::Access,
};
use beneath::{Placing, Refusal};
use nix::sys::stat::SFlag;

/// Files the artifact patterns of one attempt may find at most; the rest are not stored
/// (the server's own limit on a job's artifacts is usually far lower).
pub const MAX_ARTIFACT_FILES: usize = 10_000;

/// Symbolic links the artifact paths match that are named on stderr; past that, one line
/// counts the rest.
const MAX_LINK_NOTES: usize = 20;

/// Directories deep the artifact search goes at most (each level holds a descriptor open).
const MAX_DEPTH: usize = 128;

/// Times a call that finds the server unreachable is tried again (over about 4 s).
const CALL_RETRIES: usize = 4;

/// The wait before the first retry of such a call (it doubles after each).
const FIRST_RETRY: std::time::Duration =
    std::time::Duration::from_millis(if cfg!(test) { 10 } else { 250 });

/// Matching: `*` and `?` stay within a path component; hidden files match like others.
const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// A path of the spec (an input's, an artifact pattern's) as a relative path with no way out
/// of the workspace: not empty, no NUL, no leading `/`, no `..` component. (The server
/// checks the same; the runner does not write or read outside a workspace on its word.)
pub fn relative(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("is empty".to_string());
    }
    if path.contains('\0') {
        return Err("contains NUL".to_string());
    }
    if path.starts_with('/') {
        return Err("is absolute (it must be relative to the workspace)".to_string());
    }
    let mut out = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err("has a `..` component".to_string()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("is absolute (it must be relative to the workspace)".to_string());
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err("names the workspace itself".to_string());
    }
    Ok(out)
}

/// A relative path as an artifact name: components joined by `/`. `None`: not UTF-8.
fn name_of(path: &Path) -> Option<String> {
    let parts: Option<Vec<&str>> = path.components().map(|c| c.as_os_str().to_str()).collect();
    parts.map(|p| p.join("/"))
}

/// A relative path as named in messages: its artifact name, or as near as it has one.
pub fn display_name(path: &Path) -> String {
    name_of(path).unwrap_or_else(|| path.to_string_lossy().into_owned())
}

/// The stderr line for a symbolic link an artifact path matched.
pub fn link_note(path: &Path) -> String {
    format!(
        "gantry: artifact {:?} is a symbolic link; not stored",
        display_name(path)
    )
}

/// Whether a path is a glob pattern rather than a literal path.
fn is_pattern(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// The literal directories a pattern can only match under: its components before the first
/// with a glob character (the path itself when it has none). Empty: the whole workspace.
pub fn literal_prefix(path: &Path) -> PathBuf {
    path.components()
        .take_while(|c| !c.as_os_str().to_str().is_some_and(is_pattern))
        .collect()
}

/// The few places under the workspace that hold whatever `patterns` can match (the docker
/// executor reads only these out of a container): their literal prefixes, without those
/// inside another. Patterns that are not valid are left out.
pub fn artifact_roots(patterns: &[String]) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = patterns
        .iter()
        .filter_map(|p| relative(p).ok())
        .map(|p| literal_prefix(&p))
        .collect();
    roots.sort();
    roots.dedup();
    let all = roots.clone();
    roots.retain(|r| !all.iter().any(|o| o != r && r.starts_with(o)));
    roots
}

/// Which paths under a workspace the artifact patterns take (as [`find_artifacts`] finds
/// them): a path named, everything under a directory named, what matches a glob pattern
/// and everything under a directory that does. The docker executor writes only these out of
/// a container's archives.
#[derive(Debug, Clone, Default)]
pub struct Wanted {
    paths: Vec<PathBuf>,
    patterns: Vec<glob::Pattern>,
}

impl Wanted {
    /// The valid ones of `patterns`.
    pub fn new(patterns: &[String]) -> Self {
        let mut wanted = Wanted::default();
        for raw in patterns {
            let Ok(path) = relative(raw) else {
                continue;
            };
            if is_pattern(raw) {
                if let Some(p) = name_of(&path).and_then(|n| glob::Pattern::new(&n).ok()) {
                    wanted.patterns.push(p);
                }
            } else {
                wanted.paths.push(path);
            }
        }
        wanted
    }

    /// Whether the file at `rel` (relative to the workspace) is taken.
    pub fn wants(&self, rel: &Path) -> bool {
        rel.ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| {
                self.paths.iter().any(|p| p == a)
                    || name_of(a)
                        .is_some_and(|n| self.patterns.iter().any(|p| p.matches_with(&n, MATCH)))
            })
    }
}

// ----------------------------------------------------------------------------------------
// Inputs
// ----------------------------------------------------------------------------------------

/// An input written on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Its path relative to the workspace, `/`-separated.
    pub name: String,
    /// Where its bytes are.
    pub file: PathBuf,
}

/// Writes the work's inputs under `root` (making parent directories). `Err` is how the
/// attempt ends: FAILED naming the input (INPUT_UNAVAILABLE, EXECUTOR_ERROR: see the module
/// comment), or the stop that came first.
pub async fn place_inputs(
    work: &Work,
    root: &Path,
    stop: &mut StopSignal,
) -> Result<Vec<Placed>, Outcome> {
    if work.spec.inputs.is_empty() {
        return Ok(Vec::new());
    }
    tokio::select! {
        placed = fetch_inputs(work, root) => {
            placed.map_err(|f| Outcome::failed(f.kind, f.message))
        }
        s = stop_requested(stop) => Err(Outcome::failed(
            pb::FailureKind::Canceled,
            format!("stopped while reading its inputs: {}", s.message),
        )),
    }
}

/// How an input is named in messages.
fn label(index: usize, input: &pb::Input) -> String {
    format!("input {index} ({})", input.path)
}

/// Why the inputs were not placed: how the attempt fails, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFailure {
    pub kind: pb::FailureKind,
    pub message: String,
}

impl InputFailure {
    /// The input itself cannot be had (not retried).
    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: pb::FailureKind::InputUnavailable,
            message: message.into(),
        }
    }

    /// Something else failed: the server, the connection, this host (retried).
    fn executor(message: impl Into<String>) -> Self {
        Self {
            kind: pb::FailureKind::ExecutorError,
            message: message.into(),
        }
    }

    /// The same, its message naming the input.
    fn of(self, what: &str) -> Self {
        Self {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }
}

/// How a status of ReadInput fails the attempt: NOT_FOUND and INVALID_ARGUMENT are the
/// server saying the input cannot be had; anything else is a fault elsewhere.
fn read_refused(status: &tonic::Status) -> InputFailure {
    let message = format!("cannot be read: {}", status_text(status));
    match status.code() {
        Code::NotFound | Code::InvalidArgument => InputFailure::unavailable(message),
        _ => InputFailure::executor(message),
    }
}

async fn fetch_inputs(work: &Work, root: &Path) -> Result<Vec<Placed>, InputFailure> {
    let inputs = &work.spec.inputs;
    let mut paths = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let path = relative(&input.path).map_err(|e| InputFailure {
            kind: pb::FailureKind::InvalidSpec,
            message: format!("{}: its path {e}", label(i, input)),
        })?;
        paths.push(path);
    }
    let access = &work.access;
    let listed = patiently(|| async {
        access
            .client()
            .list_inputs(access.request(pb::ListInputsRequest {
                job_id: work.job_id.clone(),
            }))
            .await
    })
    .await
    .map_err(|s| {
        let more = match inputs.len() {
            0 | 1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        InputFailure::executor(format!(
            "{}{more}: the inputs could not be listed: {}",
            label(0, &inputs[0]),
            status_text(&s)
        ))
    })?
    .into_inner();
    let mut resolved: HashMap<u32, pb::ResolvedInput> =
        listed.inputs.into_iter().map(|r| (r.index, r)).collect();
    let mut placed = Vec::with_capacity(inputs.len());
    for (i, (input, path)) in inputs.iter().zip(paths).enumerate() {
        let what = label(i, input);
        let index = u32::try_from(i).map_err(|_| InputFailure {
            kind: pb::FailureKind::InvalidSpec,
            message: format!("{what}: too many inputs"),
        })?;
        let r = resolved.remove(&index).ok_or_else(|| {
            InputFailure::executor(format!("{what}: the server did not resolve it"))
        })?;
        if !r.unavailable.is_empty() {
            return Err(InputFailure::unavailable(format!(
                "{what}: {}",
                r.unavailable
            )));
        }
        let blob = r.blob.ok_or_else(|| {
            InputFailure::executor(format!("{what}: the server named no blob for it"))
        })?;
        fetch_one(access, &work.job_id, index, &blob, root, &path)
            .await
            .map_err(|f| f.of(&what))?;
        let name = name_of(&path).unwrap_or_else(|| input.path.clone());
        placed.push(Placed {
            name,
            file: root.join(&path),
        });
    }
    Ok(placed)
}

/// Tries a call again while the server cannot be reached (it restarts, the connection is
/// being made again), a few times: an attempt does not fail for a moment's outage.
async fn patiently<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut delay = FIRST_RETRY;
    for _ in 0..CALL_RETRIES {
        match call().await {
            Err(s) if s.code() == Code::Unavailable => {
                tracing::debug!(status = %s, retry_in = ?delay, "the server is unreachable");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    call().await
}

/// Streams one input to `rel` under `root`, checking it against `blob` as it comes, and
/// puts it in place once it checked out.
async fn fetch_one(
    access: &Access,
    job_id: &str,
    index: u32,
    blob: &pb::Blob,
    root: &Path,
    rel: &Path,
) -> Result<(), InputFailure> {
    let mut tally = Tally::new(blob).map_err(InputFailure::unavailable)?;
    let mut chunks = patiently(|| async {
        access
            .client()
            .read_input(access.request(pb::ReadInputRequest {
                job_id: job_id.to_string(),
                index,
            }))
            .await
    })
    .await
    .map_err(|s| read_refused(&s))?
    .into_inner();
    let placing = {
        let (root, rel) = (root.to_path_buf(), rel.to_path_buf());
        tokio::task::spawn_blocking(move || Placing::start(&root, &rel)).await
    };
    let not_placed =
        |e: &dyn std::fmt::Display| InputFailure::executor(format!("cannot be placed: {e}"));
    let (placing, file) = placing
        .map_err(|e| not_placed(&e))?
        .map_err(|e| not_placed(&e))?;
    let mut out = tokio::fs::File::from_std(file);
    let not_written = |e: std::io::Error| InputFailure::executor(format!("cannot be written: {e}"));
    loop {
        match chunks.message().await {
            Ok(Some(chunk)) => {
                tally
                    .add(chunk.offset, &chunk.data)
                    .map_err(InputFailure::unavailable)?;
                out.write_all(&chunk.data).await.map_err(not_written)?;
            }
            Ok(None) => break,
            Err(s) => {
                return Err(InputFailure::executor(format!(
                    "reading it broke off: {}",
                    status_text(&s)
                )));
            }
        }
    }
    out.flush().await.map_err(not_written)?;
    drop(out);
    tally.finish().map_err(InputFailure::unavailable)?;
    tokio::task::spawn_blocking(move || placing.commit())
        .await
        .map_err(|e| not_placed(&e))?
        .map_err(|e| not_placed(&e))
}

/// An input's bytes checked against its blob as they come: in order, no more than its size,
/// and at the end exactly its size and its digest.
pub struct Tally {
    /// `sha256:<hex>`, lowercase.
    digest: String,
    size: u64,
    received: u64,
    hasher: Sha256,
}

impl Tally {
    /// A tally for `blob`; `Err` when its digest is not `sha256:<64 hex>`.
    pub fn new(blob: &pb::Blob) -> Result<Tally, String> {
        let digest = blob.digest.to_ascii_lowercase();
        let valid = digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(format!(
                "the server gave {:?}, not a sha256:<64 hex> digest",
                blob.digest
            ));
        }
        Ok(Tally {
            digest,
            size: blob.size,
            received: 0,
            hasher: Sha256::new(),
        })
    }

    /// The next chunk, at `offset`.
    pub fn add(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        if offset != self.received {
            return Err(format!(
                "a chunk came at offset {offset} where {} was expected",
                self.received
            ));
        }
        self.received += data.len() as u64;
        if self.received > self.size {
            return Err(format!("more than its {} bytes came", self.size));
        }
        self.hasher.update(data);
        Ok(())
    }

    /// All came: the size and the digest must be the blob's.
    pub fn finish(self) -> Result<(), String> {
        if self.received != self.size {
            return Err(format!("{} bytes came of its {}", self.received, self.size));
        }
        let got = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if got != self.digest {
            return Err(format!("its bytes have digest {got}, not {}", self.digest));
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// Artifacts
// ----------------------------------------------------------------------------------------

/// What the artifact patterns found under a workspace.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Regular files, by artifact name, with their paths relative to the workspace.
    pub files: BTreeMap<String, PathBuf>,
    /// Lines for the attempt's stderr: patterns that matched nothing or are not valid,
    /// symbolic links matched, files left out.
    pub notes: Vec<String>,
}

/// Matches `patterns` over `root` (blocking: it walks directories). Symbolic links are
/// neither followed nor stored (those a pattern matches are noted); only regular files are.
/// The walk opens each directory from the one above it, through no link.
pub fn find_artifacts(root: &Path, patterns: &[String]) -> Found {
    let top = match beneath::open_root(root) {
        Ok(fd) => fd,
        Err(e) => {
            return Found {
                files: BTreeMap::new(),
                notes: vec![format!("gantry: the artifacts could not be collected: {e}")],
            };
        }
    };
    let mut walk = Walk {
        top,
        found: Found::default(),
        matched: false,
        full: false,
        links: BTreeSet::new(),
        deep: false,
    };
    for raw in patterns {
        if walk.full {
            break;
        }
        let path = match relative(raw) {
            Ok(p) => p,
            Err(e) => {
                walk.found.notes.push(format!(
                    "gantry: artifact path {raw:?} is not valid: it {e}"
                ));
                continue;
            }
        };
        walk.matched = false;
        if is_pattern(raw) {
            let pattern = match glob::Pattern::new(&name_of(&path).unwrap_or_default()) {
                Ok(p) => p,
                Err(e) => {
                    walk.found
                        .notes
                        .push(format!("gantry: artifact path {raw:?} is not valid: {e}"));
                    continue;
                }
            };
            let prefix = literal_prefix(&path);
            if let Some(dir) = walk.open(&prefix) {
                walk.dir(dir, &prefix, Some(&pattern), false, 0);
            }
        } else {
            walk.path(&path);
        }
        if !walk.matched && !walk.full {
            walk.found
                .notes
                .push(format!("gantry: artifact path {raw:?} matched nothing"));
        }
    }
    walk.finish()
}

/// The walk of the patterns over the workspace.
struct Walk {
    /// The workspace's directory.
    top: OwnedFd,
    found: Found,
    /// The pattern walked now matched a file or a link.
    matched: bool,
    /// [`MAX_ARTIFACT_FILES`] reached.
    full: bool,
    /// Symbolic links matched, by name.
    links: BTreeSet<String>,
    /// A directory deeper than [`MAX_DEPTH`] was not searched.
    deep: bool,
}

/// The type of entry `name` of `dir` (`kind`: what the directory listing said, if it did).
fn entry_kind(dir: &nix::dir::Dir, name: &OsStr, kind: Option<nix::dir::Type>) -> Option<SFlag> {
    use nix::dir::Type;
    match kind {
        Some(Type::Directory) => Some(SFlag::S_IFDIR),
        Some(Type::File) => Some(SFlag::S_IFREG),
        Some(Type::Symlink) => Some(SFlag::S_IFLNK),
        Some(_) => None,
        None => beneath::kind_at(dir.as_fd(), name).ok(),
    }
}

impl Walk {
    /// The notes, once every pattern was walked.
    fn finish(mut self) -> Found {
        if self.links.len() > MAX_LINK_NOTES {
            self.found.notes.push(format!(
                "gantry: {} more symbolic links matched the artifact paths; not stored",
                self.links.len() - MAX_LINK_NOTES
            ));
        }
        if self.deep {
            self.found.notes.push(format!(
                "gantry: directories more than {MAX_DEPTH} levels deep were not searched for artifacts"
            ));
        }
        if self.full {
            self.found.notes.push(format!(
                "gantry: the artifact paths match more than {MAX_ARTIFACT_FILES} files; the rest are not stored"
            ));
        }
        self.found
    }

    /// Directory `rel` (relative), opened through no link; a link on the way is noted.
    fn open(&mut self, rel: &Path) -> Option<OwnedFd> {
        match beneath::descend(self.top.as_fd(), rel, false) {
            Ok(dir) => Some(dir),
            Err(Refusal::Link(link)) => {
                self.link(&link);
                None
            }
            Err(_) => None,
        }
    }

    /// A path named literally: a file, a directory (all under it), or a link.
    fn path(&mut self, rel: &Path) {
        let Some(name) = rel.file_name() else {
            return;
        };
        let Some(dir) = self.open(rel.parent().unwrap_or(Path::new(""))) else {
            return;
        };
        match beneath::kind_at(dir.as_fd(), name) {
            Ok(SFlag::S_IFREG) => self.file(rel),
            Ok(SFlag::S_IFLNK) => self.link(rel),
            Ok(SFlag::S_IFDIR) => match beneath::open_dir(dir.as_fd(), name) {
                Ok(sub) => self.dir(sub, rel, None, true, 0),
                // Made a link since.
                Err(_) if beneath::kind_at(dir.as_fd(), name) == Ok(SFlag::S_IFLNK) => {
                    self.link(rel)
                }
                Err(_) => {}
            },
            _ => {}
        }
    }

    /// A symbolic link the pattern matched: noted (once), not stored.
    fn link(&mut self, rel: &Path) {
        self.matched = true;
        if self.links.insert(display_name(rel)) && self.links.len() <= MAX_LINK_NOTES {
            self.found.notes.push(link_note(rel));
        }
    }

    /// A regular file the pattern matched, at `rel`.
    fn file(&mut self, rel: &Path) {
        self.matched = true;
        let Some(name) = name_of(rel) else {
            self.found.notes.push(format!(
                "gantry: artifact {:?} not stored: its name is not UTF-8",
                rel.display()
            ));
            return;
        };
        if !self.found.files.contains_key(&name) {
            if self.found.files.len() >= MAX_ARTIFACT_FILES {
                self.full = true;
                return;
            }
            self.found.files.insert(name, rel.to_path_buf());
        }
    }

    /// Everything in directory `dir` (at `rel`): files matching `pattern`, and every file
    /// under a directory that matches it (`inherited`: an enclosing one did).
    fn dir(
        &mut self,
        dir: OwnedFd,
        rel: &Path,
        pattern: Option<&glob::Pattern>,
        inherited: bool,
        depth: usize,
    ) {
        let Ok(mut dir) = nix::dir::Dir::from_fd(dir) else {
            return;
        };
        let mut entries: Vec<(OsString, Option<nix::dir::Type>)> = dir
            .iter()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = OsStr::from_bytes(e.file_name().to_bytes());
                (name != "." && name != "..").then(|| (name.to_os_string(), e.file_type()))
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in entries {
            if self.full {
                return;
            }
            let child = rel.join(&name);
            let hit = inherited
                || pattern
                    .is_none_or(|p| name_of(&child).is_some_and(|n| p.matches_with(&n, MATCH)));
            match entry_kind(&dir, &name, kind) {
                Some(SFlag::S_IFDIR) => {
                    if depth >= MAX_DEPTH {
                        self.deep = true;
                        continue;
                    }
                    match beneath::open_dir(dir.as_fd(), &name) {
                        Ok(sub) => self.dir(sub, &child, pattern, hit, depth + 1),
                        Err(_)
                            if hit
                                && beneath::kind_at(dir.as_fd(), &name) == Ok(SFlag::S_IFLNK) =>
                        {
                            self.link(&child)
                        }
                        Err(_) => {}
                    }
                }
                Some(SFlag::S_IFREG) if hit => self.file(&child),
                Some(SFlag::S_IFLNK) if hit => self.link(&child),
                _ => {}
            }
        }
    }
}

/// Whether the server no longer honours the attempt (nothing more is stored for it).
fn lease_lost(stop: &StopSignal) -> bool {
    stop.borrow()
        .as_ref()
        .is_some_and(|s| s.reason == StopReason::LeaseLost)
}

/// Waits until the lease is lost.
async fn until_lease_lost(mut stop: StopSignal) {
    loop {
        if lease_lost(&stop) {
            return;
        }
        if stop.changed().await.is_err() {
            futures::future::pending::<()>().await;
        }
    }
}

/// Finds the work's artifacts under `root` and stores each (see the module comment); what
/// matched nothing or was refused goes to the attempt's stderr. Nothing is stored once the
/// lease is lost.
pub async fn store_artifacts(work: &Work, root: &Path, io: &mut Io, stop: &StopSignal) {
    let patterns = work.spec.artifacts.clone();
    if patterns.is_empty() || lease_lost(stop) {
        return;
    }
    let dir = root.to_path_buf();
    let found = match tokio::task::spawn_blocking(move || find_artifacts(&dir, &patterns)).await {
        Ok(found) => found,
        Err(e) => {
            io.note(&format!(
                "gantry: the artifacts could not be collected: {e}"
            ))
            .await;
            return;
        }
    };
    for note in &found.notes {
        io.note(note).await;
    }
    let total = found.files.len();
    for (done, (name, rel)) in found.files.into_iter().enumerate() {
        let stored = tokio::select! {
            stored = upload(&work.access, &work.job_id, &name, root, &rel) => stored,
            () = until_lease_lost(stop.clone()) => return,
        };
        match stored {
            Ok(blob) => {
                tracing::debug!(job = %work.job_id, artifact = %name, size = blob.size, "artifact stored")
            }
            // Made a link since it was found.
            Err(Refused { link: true, .. }) => io.note(&link_note(&rel)).await,
            Err(Refused { message, code, .. }) => {
                io.note(&format!("gantry: artifact {name:?} not stored: {message}"))
                    .await;
                // The work's token no longer counts: the rest would be refused alike.
                if matches!(
                    code,
                    Some(Code::Unauthenticated | Code::FailedPrecondition | Code::PermissionDenied)
                ) && done + 1 < total
                {
                    io.note(&format!(
                        "gantry: the {} artifacts left were not stored",
                        total - done - 1
                    ))
                    .await;
                    return;
                }
            }
        }
    }
}

/// Why an artifact was not stored.
struct Refused {
    message: String,
    /// The server's status code, when it answered.
    code: Option<Code>,
    /// It is a symbolic link.
    link: bool,
}

impl Refused {
    fn local(message: String) -> Self {
        Self {
            message,
            code: None,
            link: false,
        }
    }
}

/// A status in words: its message, or its code when it has none.
fn status_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    }
}

/// Uploads the file at `rel` under `root` as artifact `name`: the header with its size,
/// then its bytes in chunks read from disk as the server takes them. The file is opened
/// through no link, and only if it is a regular file.
async fn upload(
    access: &Access,
    job_id: &str,
    name: &str,
    root: &Path,
    rel: &Path,
) -> Result<pb::Blob, Refused> {
    use pb::upload_artifact_request::Part;
    let opened = {
        let (root, rel) = (root.to_path_buf(), rel.to_path_buf());
        tokio::task::spawn_blocking(move || beneath::open_file(&root, &rel)).await
    };
    let (f, size) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(Refusal::Link(_))) => {
            return Err(Refused {
                link: true,
                ..Refused::local(String::new())
            });
        }
        Ok(Err(e)) => return Err(Refused::local(format!("cannot open it: {e}"))),
        Err(e) => return Err(Refused::local(format!("cannot open it: {e}"))),
    };
    let f = tokio::fs::File::from_std(f);
    let header = pb::UploadArtifactRequest {
        part: Some(Part::Header(pb::ArtifactHeader {
            job_id: job_id.to_string(),
            name: name.to_string(),
            size: Some(size),
            digest: String::new(),
        })),
    };
    let chunk = access.chunk_bytes();
    // A file that shrank or cannot be read ends the stream short: the server, holding the
    // size, stores nothing and says so.
    let data = futures::stream::unfold((f, size), move |(mut f, left)| async move {
        if left == 0 {
            return None;
        }
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk);
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match f.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    tracing::warn!(error = %e, "reading an artifact");
                    break;
                }
            }
        }
        if filled == 0 {
            return None;
        }
        buf.truncate(filled);
        let message = pb::UploadArtifactRequest {
            part: Some(Part::Data(buf)),
        };
        Some((message, (f, left - filled as u64)))
    });
    let messages = futures::stream::iter([header]).chain(data);
    let answer = access
        .client()
        .upload_artifact(access.request(messages))
        .await
        .map_err(|s| Refused {
            message: status_text(&s),
            code: Some(s.code()),
            link: false,
        })?
        .into_inner();
    Ok(answer.artifact.and_then(|a| a.blob).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_paths_stay_inside_the_workspace() {
        assert_eq!(relative("data/in.bin"), Ok(PathBuf::from("data/in.bin")));
        assert_eq!(relative("./a//b"), Ok(PathBuf::from("a/b")));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/..", ".", "a\0b"] {
            assert!(relative(bad).is_err(), "{bad:?}");
        }
        assert_eq!(literal_prefix(Path::new("out/*.bin")), PathBuf::from("out"));
        assert_eq!(literal_prefix(Path::new("**/*.log")), PathBuf::new());
        assert_eq!(
            literal_prefix(Path::new("a/b/c.txt")),
            PathBuf::from("a/b/c.txt")
        );
        assert_eq!(literal_prefix(Path::new("a/[xy]/c")), PathBuf::from("a"));
    }

    #[test]
    fn artifact_roots_are_the_outermost_literal_prefixes() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            artifact_roots(&p(&["out/*.bin", "out/sub/x", "report.txt", "../bad"])),
            [PathBuf::from("out"), PathBuf::from("report.txt")]
        );
        assert_eq!(artifact_roots(&p(&["out/a", "**/*.log"])), [PathBuf::new()]);
    }

    fn touch(root: &Path, name: &str) {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, name).expect("write");
    }

    #[test]
    fn patterns_find_files_directories_and_globs_and_name_the_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for f in [
            "report.txt",
            "out/a.bin",
            "out/b.bin",
            "out/c.txt",
            "out/deep/d.bin",
            "logs/x/1.log",
            "logs/2.log",
            "logs/.hidden.log",
            "tree/one",
            "tree/sub/two",
            "sets/k1/f",
            "sets/k2/g",
        ] {
            touch(root, f);
        }
        std::os::unix::fs::symlink("/etc/passwd", root.join("out/link.bin")).expect("link");
        std::os::unix::fs::symlink(root.join("tree"), root.join("treelink")).expect("link");
        let patterns: Vec<String> = [
            "report.txt",
            "out/*.bin",
            "tree",
            "**/*.log",
            "sets/k[12]",
            "missing/*.x",
            "treelink",
            "nothing.txt",
            "../escape",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let found = find_artifacts(root, &patterns);
        let names: Vec<&str> = found.files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "logs/.hidden.log",
                "logs/2.log",
                "logs/x/1.log",
                "out/a.bin",
                "out/b.bin",
                "report.txt",
                "sets/k1/f",
                "sets/k2/g",
                "tree/one",
                "tree/sub/two",
            ]
        );
        assert_eq!(found.files["out/a.bin"], PathBuf::from("out/a.bin"));
        assert_eq!(
            found.notes,
            [
                "gantry: artifact \"out/link.bin\" is a symbolic link; not stored",
                "gantry: artifact path \"missing/*.x\" matched nothing",
                "gantry: artifact \"treelink\" is a symbolic link; not stored",
                "gantry: artifact path \"nothing.txt\" matched nothing",
                "gantry: artifact path \"../escape\" is not valid: it has a `..` component",
            ]
        );
    }

    #[test]
    fn nothing_is_found_through_a_link_and_links_are_named_once_up_to_a_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        touch(outside.path(), ".ssh/id_rsa");
        let root = dir.path();
        let link =
            |to: &Path, at: &str| std::os::unix::fs::symlink(to, root.join(at)).expect("link");
        link(&outside.path().join(".ssh"), "out");
        touch(root, "tree/real.txt");
        link(&outside.path().join(".ssh"), "tree/ssh");
        for i in 0..(MAX_LINK_NOTES + 5) {
            link(
                &outside.path().join(".ssh/id_rsa"),
                &format!("tree/l{i:02}"),
            );
        }
        let patterns: Vec<String> = ["out/*", "out", "out/id_rsa", "**/id_rsa", "tree", "tree/*"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let found = find_artifacts(root, &patterns);
        assert_eq!(
            found.files.keys().collect::<Vec<_>>(),
            ["tree/real.txt"],
            "{:?}",
            found.notes
        );
        // `out`, 25 links in `tree` and `tree/ssh`: the first 20 named.
        let mut expected = vec![
            link_note(Path::new("out")),
            "gantry: artifact path \"**/id_rsa\" matched nothing".to_string(),
        ];
        expected.extend(
            (0..MAX_LINK_NOTES - 1).map(|i| link_note(Path::new(&format!("tree/l{i:02}")))),
        );
        expected.push(
            "gantry: 7 more symbolic links matched the artifact paths; not stored".to_string(),
        );
        assert_eq!(found.notes, expected);
    }

    #[test]
    fn the_wanted_paths_are_those_the_patterns_find() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let wanted = Wanted::new(&p(&["out", "report.txt", "**/*.log", "sets/k[12]", "../x"]));
        for yes in [
            "out/a",
            "out/deep/b",
            "report.txt",
            "a/b/c.log",
            "x.log",
            "sets/k1/f",
            "sets/k2",
        ] {
            assert!(wanted.wants(Path::new(yes)), "{yes}");
        }
        for no in ["outside", "report.txt.bak", "a/b/c.txt", "sets/k3/f", "x"] {
            assert!(!wanted.wants(Path::new(no)), "{no}");
        }
        assert!(!Wanted::new(&[]).wants(Path::new("a")));
    }

    #[test]
    fn a_pattern_matched_by_files_already_found_still_matched() {
        let dir = tempfile::tempdir().expect("tempdir");
        touch(dir.path(), "out/a.bin");
        let found = find_artifacts(dir.path(), &["out".to_string(), "out/a.bin".to_string()]);
        assert_eq!(found.files.len(), 1);
        assert!(found.notes.is_empty(), "{:?}", found.notes);
    }

    fn blob_of(data: &[u8]) -> pb::Blob {
        pb::Blob {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(data))),
            size: data.len() as u64,
        }
    }

    #[test]
    fn an_input_is_checked_against_its_blob_as_it_streams() {
        let data = b"hello, input";
        let blob = blob_of(data);
        let mut t = Tally::new(&blob).expect("digest");
        t.add(0, &data[..5]).expect("first");
        t.add(5, &data[5..]).expect("rest");
        assert_eq!(t.finish(), Ok(()));

        // Short, long, out of order, or other bytes of the right size.
        let mut t = Tally::new(&blob).expect("digest");
        t.add(0, &data[..5]).expect("first");
        assert!(
            t.finish()
                .expect_err("short")
                .contains("5 bytes came of its 12")
        );
        let mut t = Tally::new(&blob).expect("digest");
        assert!(t.add(0, b"hello, input!").is_err());
        let mut t = Tally::new(&blob).expect("digest");
        assert!(t.add(3, data).expect_err("gap").contains("offset 3"));
        let mut t = Tally::new(&blob).expect("digest");
        t.add(0, b"HELLO, INPUT").expect("same size");
        assert!(t.finish().expect_err("digest").contains("digest"));
        // Upper-case hex from the server is the same digest.
        let upper = pb::Blob {
            digest: format!("sha256:{}", hex::encode_upper(Sha256::digest(data))),
            size: blob.size,
        };
        let mut t = Tally::new(&upper).expect("digest");
        t.add(0, data).expect("all");
        assert_eq!(t.finish(), Ok(()));
        assert!(
            Tally::new(&pb::Blob {
                digest: "md5:abc".into(),
                size: 1
            })
            .is_err()
        );
    }
}
