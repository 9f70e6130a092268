//! Runner configuration: flags, each with a `GANTRY_*` environment variable.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use clap::Parser;
use gantry_proto as pb;

/// `gantry-runner`: executes Gantry jobs in Docker containers or local processes.
///
/// Exit status: 0 after a drain (SIGTERM, a drain command, --idle-timeout-seconds) or, with
/// --once, when the job SUCCEEDED; with --once, 1 when it FAILED, 3 when it was CANCELED,
/// 4 when it TIMED_OUT, 5 when the server took the lease away; 2 for bad flags; 1 for any
/// other error.
#[derive(Parser, Debug, Clone)]
#[command(name = "gantry-runner", version)]
pub struct Config {
    /// Server URL: http://HOST:PORT, or https://HOST:PORT with TLS.
    #[arg(long, env = "GANTRY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// Registration token; needed the first time (and whenever the runner must register again).
    #[arg(long, env = "GANTRY_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,

    /// Runner name (default: the host name).
    #[arg(long, env = "GANTRY_RUNNER_NAME")]
    pub name: Option<String>,

    /// A label the runner carries, KEY=VALUE; repeat the flag (or comma-separate in the env).
    #[arg(long = "label", env = "GANTRY_RUNNER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Jobs run at once.
    #[arg(long, env = "GANTRY_RUNNER_CAPACITY", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub capacity: u32,

    /// Executors offered: docker, process (comma-separated).
    #[arg(long, env = "GANTRY_RUNNER_EXECUTORS", value_delimiter = ',', default_value = "docker,process", value_parser = parse_executor)]
    pub executors: Vec<pb::ExecutorKind>,

    /// Queues served (default: `default`); repeat the flag or comma-separate.
    #[arg(long = "queue", env = "GANTRY_RUNNER_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,

    /// Where the runner keeps its identity (runner id and credential) and process scratch dirs.
    #[arg(long, env = "GANTRY_RUNNER_STATE_DIR", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,

    /// On SIGTERM or a drain: how long running work may take to finish before it is stopped.
    #[arg(long, env = "GANTRY_RUNNER_DRAIN_GRACE_SECONDS", default_value_t = 60)]
    pub drain_grace_seconds: u64,

    /// After the work is done, how long to wait for the server to acknowledge the last
    /// reports before leaving anyway.
    #[arg(long, env = "GANTRY_RUNNER_REPORT_WAIT_SECONDS", default_value_t = 30)]
    pub report_wait_seconds: u64,

    /// Take exactly one job, run it, and exit with its outcome (ephemeral runners).
    #[arg(long, env = "GANTRY_RUNNER_ONCE")]
    pub once: bool,

    /// Drain and exit after this many seconds without work (0: never).
    #[arg(long, env = "GANTRY_RUNNER_IDLE_TIMEOUT_SECONDS", default_value_t = 0)]
    pub idle_timeout_seconds: u64,

    /// PEM file of the CA that signed the server's certificate (for https:// servers).
    #[arg(long, env = "GANTRY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Name to verify in the server's certificate (default: the URL's host).
    #[arg(long, env = "GANTRY_TLS_DOMAIN")]
    pub tls_domain: Option<String>,

    /// Longest an image pull may take before the attempt fails with IMAGE_UNAVAILABLE.
    #[arg(
        long,
        env = "GANTRY_RUNNER_PULL_TIMEOUT_SECONDS",
        default_value_t = 600
    )]
    pub pull_timeout_seconds: u64,

    /// Unacknowledged log bytes buffered before job output waits for the server.
    #[arg(long, env = "GANTRY_RUNNER_BUFFER_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub buffer_bytes: u64,

    /// The `gantry` binary to mount read-only at /usr/local/bin/gantry in every job and
    /// sandbox container, so that work in any image can run `gantry job …` (it should be
    /// statically linked; it is copied into the state directory, which the engine must see
    /// anyway). Default: a file named `gantry` beside this runner's executable, when there
    /// is one; without one, containers get none.
    #[arg(long, env = "GANTRY_RUNNER_GANTRY_BINARY")]
    pub gantry_binary: Option<PathBuf>,

    /// Bytes of artifacts the docker executor reads out of one attempt's container at most
    /// (into the state directory, before they are stored; a pattern starting with `**` reads
    /// the whole working directory): the files past it are not stored, and the attempt's
    /// stderr says so. Default 16 GiB.
    #[arg(long, env = "GANTRY_RUNNER_MAX_ARTIFACT_TRANSIT_BYTES", default_value_t = crate::executor::docker::DEFAULT_MAX_TRANSIT_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_artifact_transit_bytes: u64,

    /// Longest wait between reconnect attempts, in milliseconds (the backoff doubles from
    /// 100 ms up to this, with jitter).
    #[arg(long, env = "GANTRY_RUNNER_RECONNECT_MAX_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    pub reconnect_max_ms: u64,
}

fn default_state_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/gantry-runner"),
        None => PathBuf::from(".gantry-runner"),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

fn parse_executor(s: &str) -> Result<pb::ExecutorKind, String> {
    match s.trim() {
        "docker" => Ok(pb::ExecutorKind::Docker),
        "process" => Ok(pb::ExecutorKind::Process),
        other => Err(format!("`{other}` is not an executor (docker, process)")),
    }
}

impl Config {
    /// A configuration from these flags (as if typed after `gantry-runner`), for programs
    /// that embed a runner (`gantry dev`).
    /// The environment is not read: the embedding program says everything.
    pub fn try_parse_from_args<I: IntoIterator<Item = String>>(
        args: I,
    ) -> Result<Config, clap::Error> {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let matches = Config::command()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(std::iter::once("gantry-runner".to_string()).chain(args))?;
        Config::from_arg_matches(&matches)
    }

    /// The name to register under.
    pub fn runner_name(&self) -> String {
        self.name.clone().unwrap_or_else(hostname)
    }

    /// Labels as a map.
    pub fn label_map(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }

    /// Queues served.
    pub fn queue_list(&self) -> Vec<String> {
        if self.queues.is_empty() {
            vec!["default".to_string()]
        } else {
            self.queues.clone()
        }
    }

    /// Drain grace.
    pub fn drain_grace(&self) -> Duration {
        Duration::from_secs(self.drain_grace_seconds)
    }

    /// The `gantry` binary containers get (absolute), if any: `--gantry-binary`, which must
    /// be a file, else `gantry` beside this executable when it is there.
    pub fn gantry_binary(&self) -> anyhow::Result<Option<PathBuf>> {
        match &self.gantry_binary {
            Some(path) => {
                let absolute = std::fs::canonicalize(path)
                    .map_err(|e| anyhow::anyhow!("--gantry-binary {}: {e}", path.display()))?;
                anyhow::ensure!(
                    absolute.is_file(),
                    "--gantry-binary {} is not a file",
                    path.display()
                );
                Ok(Some(absolute))
            }
            None => Ok(std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("gantry")))
                .filter(|candidate| candidate.is_file())
                .and_then(|candidate| std::fs::canonicalize(candidate).ok())),
        }
    }

    /// Whether an executor is offered.
    pub fn offers(&self, kind: pb::ExecutorKind) -> bool {
        self.executors.contains(&kind)
    }
}

/// This host's name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_bad_ones_name_the_rule() {
        let c = Config::try_parse_from([
            "gantry-runner",
            "--label",
            "gpu=a100",
            "--label",
            "zone=b",
            "--executors",
            "process",
            "--capacity",
            "3",
        ])
        .expect("parses");
        assert_eq!(c.label_map().get("gpu").map(String::as_str), Some("a100"));
        assert_eq!(c.executors, [pb::ExecutorKind::Process]);
        assert_eq!(c.queue_list(), ["default"]);
        let e = Config::try_parse_from(["gantry-runner", "--executors", "vm"]).unwrap_err();
        assert!(e.to_string().contains("not an executor"), "{e}");
        let e = Config::try_parse_from(["gantry-runner", "--label", "novalue"]).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
        let e = Config::try_parse_from(["gantry-runner", "--capacity", "0"]).unwrap_err();
        assert!(e.to_string().contains("capacity"), "{e}");
    }
}
