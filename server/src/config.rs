//! Server configuration: flags, each with a `GANTRY_*` environment variable.
use std::{net::SocketAddr, path::PathBuf};

use crate::store::SqliteSync;

/// Everything `gantry-server` can be told.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "gantry-server", version, about = "Gantry job server (gRPC)")]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "GANTRY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Database: `sqlite://PATH?mode=rwc` (embedded, the default) or `postgres://…`
    /// (for several server replicas).
    #[arg(
        long,
        env = "GANTRY_DATABASE_URL",
        default_value = "sqlite://gantry.db?mode=rwc"
    )]
    pub database_url: String,

    /// Token runners present to `Register`. Generated and logged when absent.
    #[arg(long, env = "GANTRY_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,

    /// API tokens accepted for JobService and AdminService (comma-separated in the
    /// environment). One is generated and logged when none is given.
    #[arg(
        long = "api-token",
        env = "GANTRY_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_tokens: Vec<String>,

    /// Lease length in seconds: a runner that does not heartbeat for this long loses its jobs.
    #[arg(long, env = "GANTRY_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub lease_seconds: u32,

    /// Timeout of jobs that name none, in seconds.
    #[arg(long, env = "GANTRY_DEFAULT_TIMEOUT_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u32).range(1..=604800))]
    pub default_timeout_seconds: u32,

    /// Seconds past a job's deadline after which the server itself marks the attempt
    /// TIMED_OUT when its runner has not.
    #[arg(long, env = "GANTRY_TIMEOUT_GRACE_SECONDS", default_value_t = 30)]
    pub timeout_grace_seconds: u32,

    /// Terminal jobs older than this many seconds are deleted with their events and logs
    /// (0 keeps them forever). Default: 7 days.
    #[arg(long, env = "GANTRY_RETENTION_SECONDS", default_value_t = 604800)]
    pub retention_seconds: u64,

    /// How often the reaper looks for expired leases and overdue attempts, in milliseconds.
    #[arg(long, env = "GANTRY_REAP_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60000))]
    pub reap_interval_ms: u64,

    /// Safety-net interval, in milliseconds, at which a runner session re-reads its commands
    /// and the queue even without a signal (signals push at once; this only covers a signal
    /// lost between replicas).
    #[arg(long, env = "GANTRY_SESSION_RECHECK_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    pub session_recheck_ms: u64,

    /// On SIGTERM/SIGINT, seconds to let open calls finish before connections are closed.
    #[arg(long, env = "GANTRY_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,

    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "GANTRY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, env = "GANTRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// An extra plaintext listener that serves only `grpc.health.v1.Health`, for health
    /// checkers that cannot speak TLS (Kubernetes' native gRPC probes). Off when absent.
    #[arg(long, env = "GANTRY_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Largest message the server accepts from a client or runner, in bytes (a larger one is
    /// refused with RESOURCE_EXHAUSTED); also the most a Claim answer carries. Runners learn
    /// it from `Limits` and size their batches by it.
    #[arg(long, env = "GANTRY_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(65_536..=67_108_864))]
    pub max_message_bytes: u32,

    /// Log bytes stored per job, every attempt together; output beyond it is dropped after a
    /// marker line and a `LimitReached` event. 0 stores everything.
    #[arg(long, env = "GANTRY_MAX_LOG_BYTES_PER_JOB", default_value_t = 1 << 30)]
    pub max_log_bytes_per_job: u64,

    /// Events stored per job; progress and phase events beyond it are dropped after a
    /// `LimitReached` event (status changes are always stored). 0 stores everything.
    #[arg(long, env = "GANTRY_MAX_EVENTS_PER_JOB", default_value_t = 100_000)]
    pub max_events_per_job: u64,

    /// How SQLite commits: `full` (the default) puts every commit on disk before the server
    /// acknowledges what it holds; `normal` is faster, but a power loss (not a crash of the
    /// server) can lose reports the runners were told are stored. See BENCHMARKS.md.
    #[arg(long, env = "GANTRY_SQLITE_SYNCHRONOUS", value_enum, default_value_t = SqliteSync::Full)]
    pub sqlite_synchronous: SqliteSync,

    /// Directory of the local blob store (artifacts, uploaded inputs). Default: beside a
    /// SQLite database file (`<file>.blobs`), else `gantry-blobs`. Not used with --s3-bucket.
    #[arg(long, env = "GANTRY_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,

    /// Keep blobs in this bucket of an S3-compatible object store instead of a local
    /// directory (what several replicas need).
    #[arg(long, env = "GANTRY_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Endpoint URL of the S3-compatible store (e.g. `http://minio:9000`); empty for AWS.
    #[arg(long, env = "GANTRY_S3_ENDPOINT", default_value = "")]
    pub s3_endpoint: String,

    /// Region of the bucket.
    #[arg(long, env = "GANTRY_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// Access key id for the S3-compatible store.
    #[arg(
        long,
        env = "GANTRY_S3_ACCESS_KEY_ID",
        default_value = "",
        hide_env_values = true
    )]
    pub s3_access_key_id: String,

    /// Secret access key for the S3-compatible store (prefer the environment variable).
    #[arg(
        long,
        env = "GANTRY_S3_SECRET_ACCESS_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub s3_secret_access_key: String,

    /// Largest job result (WorkService.SetResult), bytes. At most 16 MiB; lowered to
    /// --max-message-bytes less 4 KiB when that is smaller.
    #[arg(long, env = "GANTRY_MAX_RESULT_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(0..=16 * 1024 * 1024))]
    pub max_result_bytes: u64,

    /// Largest artifact or uploaded blob, bytes; 0 for no limit. Default: 5 GiB (an S3
    /// store cannot address larger ones: it moves an upload to its address with one
    /// CopyObject, which AWS limits to 5 GiB).
    #[arg(long, env = "GANTRY_MAX_ARTIFACT_BYTES", default_value_t = 5 << 30)]
    pub max_artifact_bytes: u64,

    /// Artifacts kept per job; 0 for no limit.
    #[arg(long, env = "GANTRY_MAX_ARTIFACTS_PER_JOB", default_value_t = 1000)]
    pub max_artifacts_per_job: u64,

    /// Blobs nothing names — no artifact, no job's input (an upload never used, the
    /// artifacts of a deleted job) — are removed this many seconds after their last upload;
    /// 0 keeps them. Default: 7 days.
    #[arg(long, env = "GANTRY_BLOB_GRACE_SECONDS", default_value_t = 604800)]
    pub blob_grace_seconds: u64,

    /// How far this host's clock is off, in ms: a stand-in, for tests, for a host whose clock
    /// is wrong (a fault no test can cause on the real clock). Not a command-line option.
    #[arg(skip)]
    pub clock_skew_ms: i64,
}

impl Config {
    /// The S3 settings, when a bucket is configured.
    pub fn s3(&self) -> Option<crate::blobs::S3Settings> {
        self.s3_bucket
            .as_ref()
            .map(|bucket| crate::blobs::S3Settings {
                endpoint: self.s3_endpoint.clone(),
                bucket: bucket.clone(),
                region: self.s3_region.clone(),
                access_key_id: self.s3_access_key_id.clone(),
                secret_access_key: self.s3_secret_access_key.clone(),
            })
    }

    /// The local blob directory: `--blob-dir`, else beside a SQLite database file, else
    /// `gantry-blobs`.
    pub fn local_blob_dir(&self) -> PathBuf {
        if let Some(dir) = &self.blob_dir {
            return dir.clone();
        }
        let file = self
            .database_url
            .strip_prefix("sqlite://")
            .map(|rest| rest.split('?').next().unwrap_or(rest))
            .filter(|path| !path.is_empty() && !path.starts_with(':'));
        match file {
            Some(path) => PathBuf::from(format!("{path}.blobs")),
            None => PathBuf::from("gantry-blobs"),
        }
    }

    /// The limits on stored data.
    pub fn data_limits(&self) -> crate::work::artifacts::Limits {
        crate::work::artifacts::Limits {
            max_artifact_bytes: self.max_artifact_bytes,
            max_artifacts_per_job: self.max_artifacts_per_job,
            max_result_bytes: self.max_result_bytes,
        }
    }

    /// A configuration with every default, for embedding and tests.
    /// The environment is not read: an embedding program (`gantry dev`, the tests) says
    /// everything that differs from the defaults.
    pub fn with_database(database_url: impl Into<String>) -> Config {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let defaults = Config::command()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(["gantry-server"])
            .and_then(|m| Config::from_arg_matches(&m));
        match defaults {
            Ok(mut config) => {
                config.database_url = database_url.into();
                config
            }
            // Only a defect in the declarations above can get here (no input is read).
            Err(e) => panic!("the server's default configuration does not parse: {e}"),
        }
    }
}
