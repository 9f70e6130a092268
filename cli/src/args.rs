//! The command line.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use gantry_proto as pb;

/// gantry: submit, follow and steer jobs on a Gantry server; `gantry dev` runs a whole
/// system on this machine.
///
/// Exit status: 0 success; 1 the server refused the request (the message says why); 2 a bad
/// command line; 3 the server cannot be reached; 4 authentication failed. Commands that wait
/// for a job (`submit --wait/--follow`, `watch`) or a sandbox command (`exec`) exit with its
/// own exit code, or 124 when it timed out, 125 when it failed without an exit code (e.g. its
/// image was unavailable, an input could not be had, or its runner was lost), 130 when it was
/// canceled. `sandbox create --wait` exits 125 when the sandbox ended before it ran; `sandbox
/// watch` exits 0 when the sandbox ended DELETED, 125 when it ended FAILED. `download` and
/// `blob get` exit 1 when the bytes that arrived do not have the expected digest. `gantry job
/// …` exits 2 when the work's environment (GANTRY_ENDPOINT, GANTRY_WORK_TOKEN, GANTRY_JOB_ID)
/// is missing, 3 when its endpoint does not answer, 4 when its work token is refused.
#[derive(Parser, Debug)]
#[command(name = "gantry", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Server URL (http://HOST:PORT, or https:// with --tls-ca).
    #[arg(
        long,
        env = "GANTRY_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// API token.
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate.
    #[arg(long, env = "GANTRY_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry, when it differs from the --server host
    /// (e.g. through `kubectl port-forward`, where the host is 127.0.0.1).
    #[arg(long, env = "GANTRY_TLS_DOMAIN", global = true)]
    pub tls_domain: Option<String>,
    /// Output format of read commands: a table for people, or JSON (one document; NDJSON
    /// for streams) for programs.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// Output formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a whole system in this process: a server on an embedded SQLite file and a local
    /// runner (process executor, plus docker when an engine answers). Ctrl-C stops both.
    Dev(DevArgs),
    /// Submit a job: `gantry submit [OPTIONS] -- COMMAND [ARGS]...`. Prints its id.
    Submit(Box<SubmitArgs>),
    /// List jobs, newest first.
    #[command(visible_alias = "ls")]
    Jobs(JobsArgs),
    /// Show one job with its attempts, its result and its parent.
    Get(IdArg),
    /// Follow a job live (status changes, executor phases, progress) until it ends.
    Watch(IdArg),
    /// Print a job's output.
    Logs(LogsArgs),
    /// Cancel a job.
    Cancel(CancelArgs),
    /// Submit a finished job's spec again as a new job.
    Retry(IdArg),
    /// Sandboxes: long-lived workspaces on a runner that run commands one after another.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Run a command in a sandbox: `gantry exec SANDBOX [OPTIONS] -- COMMAND [ARGS]...`.
    /// Prints its output and exits with its exit code.
    ///
    /// The command's stdout and stderr come out on ours as they arrive. Exit status: the
    /// command's exit code; 124 when it timed out, 125 when it failed without an exit code
    /// (e.g. its sandbox's runner was lost), 130 when it was canceled, each with a line on
    /// stderr saying how it ended. Ctrl-C cancels the command and keeps printing its output
    /// until it has ended; a second Ctrl-C stops waiting at once (exit status 130).
    Exec(ExecArgs),
    /// List runners.
    Runners(RunnersArgs),
    /// Drain a runner: it takes no new work and leaves once its work is done.
    Drain(DrainArgs),
    /// List a job's (or a sandbox's) artifacts.
    Artifacts(IdArg),
    /// Download an artifact of a job, checking its digest.
    Download(DownloadArgs),
    /// Blobs: bytes uploaded beforehand, to be named as inputs (`--input PATH=sha256:…`).
    #[command(subcommand)]
    Blob(BlobCommand),
    /// Commands for the code inside a job, acting as that job's work: progress, events, its
    /// result, artifacts, inputs and child jobs.
    ///
    /// They use the environment the runner gives the work: GANTRY_ENDPOINT (where to call),
    /// GANTRY_WORK_TOKEN (the work's identity) and GANTRY_JOB_ID (the job); no API token.
    #[command(subcommand)]
    Job(JobCommand),
    /// Job counts by status and queue, runner counts by state.
    Stats,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Address the server listens on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: std::net::SocketAddr,
    /// Where the database, tokens and runner state live (default: the user's data dir).
    #[arg(long, env = "GANTRY_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Jobs the local runner runs at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub capacity: u32,
}

#[derive(Args, Debug)]
pub struct IdArg {
    /// Job id.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// What to run and how.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Wait for the job to end, print its output, and exit with its exit code.
    #[arg(long, conflicts_with = "follow")]
    pub wait: bool,
    /// Stream the job's output while it runs, and exit with its exit code.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// The flags of a job spec, shared by `gantry submit` and `gantry job submit`.
#[derive(Args, Debug)]
pub struct SpecArgs {
    /// Run in a container of this image (docker executor); without it the command runs as a
    /// local process on the runner.
    #[arg(long)]
    pub image: Option<String>,
    /// Queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// A label the runner must carry, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = key_value("--label"))]
    pub labels: Vec<(String, String)>,
    /// An environment variable of the job, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = key_value("--env"))]
    pub env: Vec<(String, String)>,
    /// Metadata for your own bookkeeping, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_parser = key_value("--meta"))]
    pub metadata: Vec<(String, String)>,
    /// Higher runs first (-1000..=1000).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,
    /// Time limit of one attempt: 90, 90s, 15m, 2h, 1d.
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub timeout: Option<Duration>,
    /// Attempts after the first one on a retryable failure.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Delay before the first retry (doubled for each further one): 500ms, 10s …
    #[arg(long, value_parser = parse_duration)]
    pub retry_backoff: Option<Duration>,
    /// Mutual exclusion: at most one running job holds this key.
    #[arg(long = "lock")]
    pub lock_key: Option<String>,
    /// Submitting again with the same key returns the first job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Working directory of the command.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Docker: replace the image's entrypoint with this program.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Docker: when to pull the image.
    #[arg(long, value_enum)]
    pub pull: Option<Pull>,
    /// Memory limit: 512m, 2g, or bytes.
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<u64>,
    /// CPU limit in cores: 0.5, 2.
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<u32>,
    /// Time between the stop signal and the kill on cancel or timeout.
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// A file placed in the job's workspace before it starts (repeatable): PATH=JOB:NAME for
    /// the artifact NAME of job JOB, PATH=sha256:DIGEST for a blob (`gantry blob put`).
    #[arg(long = "input", value_name = "PATH=SOURCE", value_parser = parse_input)]
    pub inputs: Vec<pb::Input>,
    /// An output path stored as the job's artifacts after it ends (repeatable): a file, a
    /// directory, or a glob (`out/*.bin`), relative to the workspace.
    #[arg(long = "artifact", value_name = "PATH", value_parser = parse_artifact_path)]
    pub artifacts: Vec<String>,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Pull policies.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Pull {
    IfNotPresent,
    Always,
    Never,
}

impl From<Pull> for pb::PullPolicy {
    fn from(p: Pull) -> Self {
        match p {
            Pull::IfNotPresent => pb::PullPolicy::IfNotPresent,
            Pull::Always => pb::PullPolicy::Always,
            Pull::Never => pb::PullPolicy::Never,
        }
    }
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Only jobs in this status (repeatable): queued, assigned, running, canceling,
    /// succeeded, failed, canceled, timed-out.
    #[arg(long = "status", value_enum)]
    pub statuses: Vec<Status>,
    /// Only jobs of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only jobs requiring this runner label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = key_value("--label"))]
    pub labels: Vec<(String, String)>,
    /// Only jobs that ran on this runner.
    #[arg(long)]
    pub runner: Option<String>,
    /// Only children of this job (jobs its work submitted with `gantry job submit`).
    #[arg(long, value_name = "JOB")]
    pub parent: Option<String>,
    /// Jobs per page (1..=1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Continue after a previous page (its `next_page_token`).
    #[arg(long)]
    pub page_token: Option<String>,
}

/// Job statuses, as typed on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Status {
    Queued,
    Assigned,
    Running,
    Canceling,
    Succeeded,
    Failed,
    Canceled,
    TimedOut,
}

impl From<Status> for pb::JobStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Queued => pb::JobStatus::Queued,
            Status::Assigned => pb::JobStatus::Assigned,
            Status::Running => pb::JobStatus::Running,
            Status::Canceling => pb::JobStatus::Canceling,
            Status::Succeeded => pb::JobStatus::Succeeded,
            Status::Failed => pb::JobStatus::Failed,
            Status::Canceled => pb::JobStatus::Canceled,
            Status::TimedOut => pb::JobStatus::TimedOut,
        }
    }
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Job id.
    pub id: String,
    /// Keep following new output until the job ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only one stream.
    #[arg(long, value_enum)]
    pub stream: Option<Stream>,
    /// Attempt number (default: the latest).
    #[arg(long, default_value_t = 0)]
    pub attempt: u32,
}

/// Output streams.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// Job id.
    pub id: String,
    /// Why (recorded with the job).
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct RunnersArgs {
    /// Only runners in this state (repeatable): online, draining, offline.
    #[arg(long = "state", value_enum)]
    pub states: Vec<RunnerState>,
}

/// Runner states, as typed.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum RunnerState {
    Online,
    Draining,
    Offline,
}

impl From<RunnerState> for pb::RunnerState {
    fn from(s: RunnerState) -> Self {
        match s {
            RunnerState::Online => pb::RunnerState::Online,
            RunnerState::Draining => pb::RunnerState::Draining,
            RunnerState::Offline => pb::RunnerState::Offline,
        }
    }
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Runner id.
    pub runner: String,
    /// Why.
    #[arg(long, default_value = "")]
    pub reason: String,
}

/// `gantry sandbox …`.
#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox. Prints its id.
    Create(Box<SandboxCreateArgs>),
    /// List sandboxes, newest first.
    #[command(visible_alias = "list")]
    Ls(SandboxLsArgs),
    /// Show one sandbox with its commands.
    Get(SandboxIdArg),
    /// Delete a sandbox: stop its running command, remove its workspace.
    #[command(visible_alias = "delete")]
    Rm(SandboxRmArgs),
    /// Follow a sandbox live (lifecycle, phases, its commands and their progress) until it
    /// ends.
    Watch(SandboxIdArg),
}

#[derive(Args, Debug)]
pub struct SandboxCreateArgs {
    /// A container of this image kept running (docker executor); each command is a `docker
    /// exec` in it.
    #[arg(long, conflicts_with = "process")]
    pub image: Option<String>,
    /// A workspace directory on the runner's host (process executor); the default without
    /// --image.
    #[arg(long)]
    pub process: bool,
    /// Queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// A label the runner must carry, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = key_value("--label"))]
    pub labels: Vec<(String, String)>,
    /// An environment variable of every command, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = key_value("--env"))]
    pub env: Vec<(String, String)>,
    /// Metadata for your own bookkeeping, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_parser = key_value("--meta"))]
    pub metadata: Vec<(String, String)>,
    /// Working directory of commands that name none.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Docker: when to pull the image.
    #[arg(long, visible_alias = "pull-policy", value_enum)]
    pub pull: Option<Pull>,
    /// Memory limit: 512m, 2g, or bytes.
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<u64>,
    /// CPU limit in cores: 0.5, 2.
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<u32>,
    /// Mutual exclusion with jobs and sandboxes of the same key, held until the sandbox ends.
    #[arg(long = "lock", visible_alias = "lock-key")]
    pub lock_key: Option<String>,
    /// Delete the sandbox after this long with no command queued or running: 90, 15m, 2h
    /// (default 10m).
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Delete the sandbox this long after a runner took it, whatever it does: 2h, 1d
    /// (default 1d, at most 7d).
    #[arg(long, value_parser = parse_duration)]
    pub lifetime: Option<Duration>,
    /// Delete the sandbox once its first command has ended.
    #[arg(long)]
    pub one_shot: bool,
    /// Time between the stop signal and the kill when a command is canceled or times out,
    /// or the sandbox is deleted.
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Creating again with the same key returns the first sandbox.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A file placed in the workspace before it starts (repeatable): PATH=JOB:NAME for the
    /// artifact NAME of job JOB, PATH=sha256:DIGEST for a blob (`gantry blob put`).
    #[arg(long = "input", value_name = "PATH=SOURCE", value_parser = parse_input)]
    pub inputs: Vec<pb::Input>,
    /// An output path stored as the sandbox's artifacts when it ends (repeatable): a file,
    /// a directory, or a glob, relative to the workspace.
    #[arg(long = "artifact", value_name = "PATH", value_parser = parse_artifact_path)]
    pub artifacts: Vec<String>,
    /// Wait until the sandbox runs (exit 125 with the reason if it ends first).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args, Debug)]
pub struct SandboxLsArgs {
    /// Only sandboxes in this status (repeatable): pending, creating, starting, running,
    /// deleting, deleted, failed.
    #[arg(long = "status", value_enum)]
    pub statuses: Vec<SandboxStatus>,
    /// Only sandboxes of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only sandboxes placed on this runner.
    #[arg(long)]
    pub runner: Option<String>,
    /// Sandboxes per page (1..=1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Continue after a previous page (its `next_page_token`).
    #[arg(long)]
    pub page_token: Option<String>,
}

/// Sandbox statuses, as typed on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum SandboxStatus {
    Pending,
    Creating,
    Starting,
    Running,
    Deleting,
    Deleted,
    Failed,
}

impl From<SandboxStatus> for pb::SandboxStatus {
    fn from(s: SandboxStatus) -> Self {
        match s {
            SandboxStatus::Pending => pb::SandboxStatus::Pending,
            SandboxStatus::Creating => pb::SandboxStatus::Creating,
            SandboxStatus::Starting => pb::SandboxStatus::Starting,
            SandboxStatus::Running => pb::SandboxStatus::Running,
            SandboxStatus::Deleting => pb::SandboxStatus::Deleting,
            SandboxStatus::Deleted => pb::SandboxStatus::Deleted,
            SandboxStatus::Failed => pb::SandboxStatus::Failed,
        }
    }
}

#[derive(Args, Debug)]
pub struct SandboxIdArg {
    /// Sandbox id.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct SandboxRmArgs {
    /// Sandbox id.
    pub id: String,
    /// Why (recorded in its events).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Wait until the sandbox has ended: its runner stopped it and removed its workspace
    /// (deleted), or it failed. Exits 0 either way; the line printed says which.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Sandbox id.
    pub sandbox: String,
    /// An environment variable of the command, over the sandbox's, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = key_value("--env"))]
    pub env: Vec<(String, String)>,
    /// Working directory of the command (default: the sandbox's).
    #[arg(long)]
    pub workdir: Option<String>,
    /// Time limit of the command: 90, 90s, 15m, 2h (default 1h).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Give the command this file as its standard input (at most 1 MiB).
    #[arg(long, value_name = "PATH", conflicts_with = "stdin")]
    pub stdin_file: Option<PathBuf>,
    /// Give the command all of this program's standard input (read to its end; at most
    /// 1 MiB). Without --stdin or --stdin-file the command's standard input is empty.
    #[arg(long, short = 'i')]
    pub stdin: bool,
    /// Running again with the same key returns the first command (and its output).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Print the command's id and return at once instead of printing its output.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// Job (or sandbox) id.
    pub job: String,
    /// Artifact name (as `gantry artifacts` lists it).
    pub name: String,
    /// Where to write it: a file, a directory (the artifact's base name in it), or `-` for
    /// standard output (default: the artifact's base name in the current directory).
    #[arg(long, value_name = "PATH")]
    pub to: Option<PathBuf>,
}

/// `gantry blob …`.
#[derive(Subcommand, Debug)]
pub enum BlobCommand {
    /// Upload a file (or `-` for standard input) as a blob. Prints its digest, for
    /// `--input PATH=sha256:DIGEST`.
    Put(BlobPutArgs),
    /// Download a blob, checking its digest.
    Get(BlobGetArgs),
}

#[derive(Args, Debug)]
pub struct BlobPutArgs {
    /// The file (`-`: standard input).
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct BlobGetArgs {
    /// The blob's digest: sha256:<64 hex>.
    #[arg(value_parser = parse_digest)]
    pub digest: String,
    /// Where to write it: a file, or `-` for standard output (the default).
    #[arg(long, value_name = "PATH")]
    pub to: Option<PathBuf>,
}

/// `gantry job …`: the work's own commands.
#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Report the job's progress: `gantry job progress 40 "copying" --stage download`.
    Progress(ProgressArgs),
    /// Append an event of the work's own to the job's trail.
    Event(EventArgs),
    /// Set the job's result (replacing an earlier one); `gantry get` shows it.
    Result(ResultArgs),
    /// The job's artifacts.
    #[command(subcommand)]
    Artifact(ArtifactCommand),
    /// List the job's inputs, each with its blob or why it cannot be had.
    Inputs,
    /// Submit a child job (canceled with this job): the flags of `gantry submit`.
    Submit(Box<JobSubmitArgs>),
}

#[derive(Args, Debug)]
pub struct ProgressArgs {
    /// Percent done (0..=100).
    #[arg(value_parser = clap::value_parser!(u32).range(0..=100))]
    pub percent: u32,
    /// What is happening, in words.
    pub message: Option<String>,
    /// Short name of the current stage, e.g. `download`.
    #[arg(long)]
    pub stage: Option<String>,
}

#[derive(Args, Debug)]
pub struct EventArgs {
    /// What kind of event, in the work's own terms, e.g. `checkpoint` ([A-Za-z0-9._/-]).
    pub kind: String,
    /// Free text.
    pub message: Option<String>,
    /// Structured detail, KEY=VALUE (repeatable).
    #[arg(long = "field", value_parser = key_value("--field"))]
    pub fields: Vec<(String, String)>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["file", "data", "stdin"])))]
pub struct ResultArgs {
    /// The result is this file's bytes.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The result is this text.
    #[arg(long, value_name = "STRING")]
    pub data: Option<String>,
    /// The result is all of standard input.
    #[arg(long)]
    pub stdin: bool,
    /// Its media type (default: application/json for a --file ending in .json, else none,
    /// which readers take as application/octet-stream).
    #[arg(long, value_name = "TYPE")]
    pub content_type: Option<String>,
}

/// `gantry job artifact …`.
#[derive(Subcommand, Debug)]
pub enum ArtifactCommand {
    /// Store files as the job's artifacts: each named by its path as given (relative, without
    /// `..`); a directory stores every file under it. Prints each stored artifact.
    Put(ArtifactPutArgs),
}

#[derive(Args, Debug)]
pub struct ArtifactPutArgs {
    /// Files or directories, relative to the current directory.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The artifact's name, instead of the path (one file only; then the path may be
    /// absolute).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct JobSubmitArgs {
    /// What to run and how.
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// A parser of KEY=VALUE for `flag`.
fn key_value(flag: &'static str) -> impl Fn(&str) -> Result<(String, String), String> + Clone {
    move |s: &str| match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{flag} takes KEY=VALUE, got `{s}`")),
    }
}

/// Why a relative path (an input's, an artifact's) is unfit, if it is: empty, absolute, or
/// with a `..` component or a NUL.
pub fn relative_path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("is empty")
    } else if path.starts_with('/') {
        Some("must be relative, not absolute")
    } else if path.split('/').any(|c| c == "..") {
        Some("must not have `..` components")
    } else if path.contains('\0') {
        Some("must not contain NUL")
    } else {
        None
    }
}

/// `sha256:<64 hex>` (or the 64 hex digits alone), as the proto writes it: lower case.
pub fn parse_digest(s: &str) -> Result<String, String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
    } else {
        Err(format!("`{s}` is not a digest (sha256: and 64 hex digits)"))
    }
}

/// `--input PATH=JOB:NAME` (an artifact of another job) or `--input PATH=sha256:DIGEST` (a
/// blob).
pub fn parse_input(s: &str) -> Result<pb::Input, String> {
    let forms = "--input takes PATH=JOB:NAME or PATH=sha256:DIGEST";
    let (path, source) = s
        .split_once('=')
        .ok_or_else(|| format!("{forms}, got `{s}`"))?;
    if let Some(problem) = relative_path_problem(path) {
        return Err(format!("--input `{s}`: the path {problem}"));
    }
    let source = if source.starts_with("sha256:") {
        let digest = parse_digest(source).map_err(|e| format!("--input `{s}`: {e}"))?;
        pb::input::Source::BlobDigest(digest)
    } else {
        match source.split_once(':') {
            Some((job, name)) if !job.is_empty() && !name.is_empty() => {
                pb::input::Source::Artifact(pb::ArtifactRef {
                    job_id: job.to_string(),
                    name: name.to_string(),
                })
            }
            _ => return Err(format!("{forms}, got `{s}`")),
        }
    };
    Ok(pb::Input {
        path: path.to_string(),
        source: Some(source),
    })
}

/// `--artifact PATH`: relative to the workspace, without `..`.
fn parse_artifact_path(s: &str) -> Result<String, String> {
    match relative_path_problem(s) {
        Some(problem) => Err(format!("--artifact `{s}`: the path {problem}")),
        None => Ok(s.to_string()),
    }
}

/// `90`, `90s`, `500ms`, `15m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (e.g. 90, 90s, 500ms, 15m, 2h, 1d)");
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(bad)
}

/// Whole seconds for a duration field of the proto, rounded up (`500ms` is 1 s, not the
/// field's default 0); a value past the field's range goes as `u32::MAX`, for the server to
/// refuse naming the field.
pub fn seconds_up(d: Duration) -> u32 {
    u32::try_from(d.as_millis().div_ceil(1000)).unwrap_or(u32::MAX)
}

/// The proto's `cancel_grace_seconds` for a `--grace`: whole seconds, at least 1 (0 would
/// mean the default).
pub fn grace_seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)
}

/// `512m`, `2g`, `64k`, or bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size (e.g. 512m, 2g, 1048576)");
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower, 1),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Cores as thousandths: `0.5` → 500.
fn parse_cpus(s: &str) -> Result<u32, String> {
    let bad = || format!("`{s}` is not a number of CPUs (e.g. 0.5, 2)");
    let v: f64 = s.trim().parse().map_err(|_| bad())?;
    if !(v > 0.0 && v <= 1024.0) {
        return Err(bad());
    }
    Ok((v * 1000.0).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_cpus_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("5 minutes").is_err());
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert!(parse_cpus("0").is_err());
    }

    #[test]
    fn inputs_name_an_artifact_or_a_blob() {
        let digest = "ab".repeat(32);
        assert_eq!(
            parse_input("in/model.bin=0190a0b0-0000-7000-8000-000000000001:out/dir/model.bin"),
            Ok(pb::Input {
                path: "in/model.bin".into(),
                source: Some(pb::input::Source::Artifact(pb::ArtifactRef {
                    job_id: "0190a0b0-0000-7000-8000-000000000001".into(),
                    name: "out/dir/model.bin".into(),
                })),
            })
        );
        assert_eq!(
            parse_input(&format!("data.csv=sha256:{}", digest.to_uppercase())),
            Ok(pb::Input {
                path: "data.csv".into(),
                source: Some(pb::input::Source::BlobDigest(format!("sha256:{digest}"))),
            })
        );
        // The artifact's name may hold `:` and `=`; the path ends at the first `=`.
        assert_eq!(
            parse_input("a=j1:x:y=z").map(|i| i.source),
            Ok(Some(pb::input::Source::Artifact(pb::ArtifactRef {
                job_id: "j1".into(),
                name: "x:y=z".into(),
            })))
        );
        for bad in [
            "model.bin",
            "=j1:out.bin",
            "in.bin=",
            "in.bin=j1",
            "in.bin=j1:",
            "in.bin=:out.bin",
            "in.bin=sha256:abc",
            "/abs/in.bin=j1:out.bin",
            "../in.bin=j1:out.bin",
            "a/../../in.bin=j1:out.bin",
        ] {
            let e = parse_input(bad).err().unwrap_or_default();
            assert!(e.starts_with("--input"), "{bad}: {e}");
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn artifact_paths_are_relative() {
        assert_eq!(parse_artifact_path("out/*.bin"), Ok("out/*.bin".into()));
        assert_eq!(
            parse_artifact_path("**/report.txt"),
            Ok("**/report.txt".into())
        );
        for bad in ["", "/out", "../out", "out/../../x"] {
            let e = parse_artifact_path(bad).err().unwrap_or_default();
            assert!(e.starts_with("--artifact"), "{bad}: {e}");
        }
    }

    #[test]
    fn digests_are_sha256_in_lower_case() {
        let hex = "0f".repeat(32);
        assert_eq!(
            parse_digest(&format!("sha256:{}", hex.to_uppercase())),
            Ok(format!("sha256:{hex}"))
        );
        assert_eq!(parse_digest(&hex), Ok(format!("sha256:{hex}")));
        for bad in [
            "sha256:",
            "sha256:xyz",
            "md5:abc",
            &format!("sha256:{hex}0"),
        ] {
            assert!(parse_digest(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn submit_and_sandbox_create_take_inputs_and_artifacts() {
        let line = [
            "--input",
            "a.bin=j1:out/a.bin",
            "--input",
            &format!("b.bin=sha256:{}", "1".repeat(64)),
            "--artifact",
            "out/",
            "--artifact",
            "*.log",
        ];
        let cli = Cli::try_parse_from(
            ["gantry", "submit"]
                .into_iter()
                .chain(line)
                .chain(["--", "true"]),
        );
        match cli.map(|c| c.command) {
            Ok(Command::Submit(s)) => {
                assert_eq!(s.spec.inputs.len(), 2);
                assert_eq!(s.spec.artifacts, ["out/", "*.log"]);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["gantry", "sandbox", "create"].into_iter().chain(line));
        match cli.map(|c| c.command) {
            Ok(Command::Sandbox(SandboxCommand::Create(c))) => {
                assert_eq!(c.inputs.len(), 2);
                assert_eq!(c.artifacts, ["out/", "*.log"]);
            }
            other => panic!("{other:?}"),
        }
        // `-o` stays the output format.
        let cli = Cli::try_parse_from(["gantry", "submit", "-o", "json", "--", "true"]);
        assert!(cli.is_ok_and(|c| c.global.output == Output::Json));
        let e = Cli::try_parse_from(["gantry", "submit", "--input", "x", "--", "true"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--input takes PATH=JOB:NAME"), "{e}");
    }

    #[test]
    fn ls_lists_a_jobs_children() {
        match Cli::try_parse_from(["gantry", "ls", "--parent", "j1"]).map(|c| c.command) {
            Ok(Command::Jobs(j)) => assert_eq!(j.parent.as_deref(), Some("j1")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
