//! The command line.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use gantry_proto as pb;

/// gantry: submit, follow and steer jobs on a Gantry server; `gantry dev` runs a whole
/// system on this machine.
///
/// Exit status: 0 success; 1 the server refused the request (the message says why); 2 a bad
/// command line; 3 the server cannot be reached; 4 authentication failed. Commands that wait
/// for a job (`submit --wait/--follow`, `watch`) exit with the job's own exit code, or 124
/// when it timed out, 125 when it failed without an exit code (e.g. its image was
/// unavailable or its runner was lost), 130 when it was canceled.
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
    Submit(SubmitArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Show one job with its attempts.
    Get(IdArg),
    /// Follow a job live (status changes, executor phases, progress) until it ends.
    Watch(IdArg),
    /// Print a job's output.
    Logs(LogsArgs),
    /// Cancel a job.
    Cancel(CancelArgs),
    /// Submit a finished job's spec again as a new job.
    Retry(IdArg),
    /// List runners.
    Runners(RunnersArgs),
    /// Drain a runner: it takes no new work and leaves once its work is done.
    Drain(DrainArgs),
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
    /// Wait for the job to end, print its output, and exit with its exit code.
    #[arg(long, conflicts_with = "follow")]
    pub wait: bool,
    /// Stream the job's output while it runs, and exit with its exit code.
    #[arg(long, short = 'f')]
    pub follow: bool,
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

/// A parser of KEY=VALUE for `flag`.
fn key_value(flag: &'static str) -> impl Fn(&str) -> Result<(String, String), String> + Clone {
    move |s: &str| match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{flag} takes KEY=VALUE, got `{s}`")),
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
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
