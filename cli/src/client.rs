//! The connection to the server (as a user, with an API token) or to the work endpoint (as
//! the work of a job, with its work token), and errors as the user sees them: one line, a
//! fitting exit status.
use std::{env::VarError, fmt, path::PathBuf};

use gantry_proto as pb;
use tonic::{
    Code, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::StatusExt as _;

use crate::args::Global;

/// Exit statuses (see `gantry --help`).
pub mod exit {
    /// The server refused the request.
    pub const REFUSED: u8 = 1;
    /// A bad command line.
    pub const USAGE: u8 = 2;
    /// The server cannot be reached.
    pub const UNREACHABLE: u8 = 3;
    /// Authentication failed.
    pub const AUTH: u8 = 4;
    /// The awaited job or command ran past its timeout.
    pub const TIMED_OUT: u8 = 124;
    /// The awaited job or command failed without an exit code of its own (image unavailable,
    /// runner lost …), or the awaited sandbox ended before it ran.
    pub const NO_EXIT_CODE: u8 = 125;
    /// The awaited job or command was canceled (or, for `exec`, a second Ctrl-C stopped the
    /// waiting).
    pub const CANCELED: u8 = 130;
}

/// An error for the user: one line and an exit status.
#[derive(Debug)]
pub struct CliError {
    /// Exit status.
    pub code: u8,
    /// The line (without the `error: ` prefix).
    pub message: String,
}

impl CliError {
    /// An error with this exit status.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A bad command line.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(exit::USAGE, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A result for commands.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// Who a command calls, as error messages name it and say what to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The server, as a user (`--server`, `--token`).
    Api,
    /// The work endpoint, as a job's work (`GANTRY_ENDPOINT`, `GANTRY_WORK_TOKEN`).
    Work,
}

impl Peer {
    /// What is called: `the server`.
    fn name(self) -> &'static str {
        match self {
            Peer::Api => "the server",
            Peer::Work => "the work endpoint",
        }
    }

    /// What to check when it cannot be reached.
    fn reach_hint(self) -> &'static str {
        match self {
            Peer::Api => "is it running? set --server or GANTRY_SERVER",
            Peer::Work => "GANTRY_ENDPOINT; is this job's runner still serving it?",
        }
    }

    /// What to check when authentication fails.
    fn auth_hint(self) -> &'static str {
        match self {
            Peer::Api => "check --token or GANTRY_TOKEN",
            Peer::Work => "check GANTRY_WORK_TOKEN and GANTRY_JOB_ID",
        }
    }
}

/// Turns a gRPC status into the user's error: the server's message, its field violations, and
/// the exit status that fits.
pub fn from_status(server: &str, status: &Status) -> CliError {
    from_status_of(Peer::Api, server, status)
}

/// [`from_status`] for a call to `peer` at `server`.
pub fn from_status_of(peer: Peer, server: &str, status: &Status) -> CliError {
    let name = peer.name();
    // A status the client made from a broken connection (the server crashed, the network
    // failed mid-stream) carries its cause; the server's own statuses never do.
    if let Some(cause) = std::error::Error::source(status) {
        return CliError::new(
            exit::UNREACHABLE,
            format!(
                "lost the connection to {name} at {server}: {}",
                innermost(cause)
            ),
        );
    }
    let code = status.code();
    let mut message = status.message().trim().to_string();
    if let Some(bad) = status.get_details_bad_request() {
        let fields: Vec<String> = bad
            .field_violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .filter(|v| !message.contains(v.as_str()))
            .collect();
        if !fields.is_empty() {
            message = format!("{message} ({})", fields.join("; "));
        }
    }
    // One line, whatever the server said.
    let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match code {
        Code::Unavailable | Code::DeadlineExceeded => CliError::new(
            exit::UNREACHABLE,
            format!(
                "cannot reach {name} at {server}: {} ({})",
                if message.is_empty() {
                    "unavailable"
                } else {
                    &message
                },
                peer.reach_hint()
            ),
        ),
        Code::Unauthenticated | Code::PermissionDenied => CliError::new(
            exit::AUTH,
            format!("authentication failed: {message} ({})", peer.auth_hint()),
        ),
        Code::InvalidArgument => {
            CliError::new(exit::REFUSED, format!("invalid request: {message}"))
        }
        Code::NotFound => CliError::new(exit::REFUSED, format!("not found: {message}")),
        Code::FailedPrecondition => {
            CliError::new(exit::REFUSED, format!("not possible now: {message}"))
        }
        _ => CliError::new(exit::REFUSED, format!("{}: {message}", code.description())),
    }
}

/// The innermost cause of an error, as text.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// Adds the API token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Bearer {
    /// The `authorization` value for `token`, kept out of HPACK's index; `what` names the
    /// token in the error (which never holds the token itself).
    fn new(token: &str, what: &str) -> Result<Bearer> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| CliError::usage(format!("{what} must be printable ASCII")))?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }
}

/// An authenticated channel.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Timeouts and keep-alives every connection has.
fn tuned(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        // A server host that vanishes without closing the connection is noticed.
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// The TLS settings of the global options (`--tls-ca`, `--tls-domain`).
fn tls_config(global: &Global) -> Result<ClientTlsConfig> {
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &global.tls_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| CliError::usage(format!("--tls-ca {}: {e}", ca.display())))?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    if let Some(domain) = &global.tls_domain {
        tls = tls.domain_name(domain.clone());
    }
    Ok(tls)
}

/// Bytes a response may hold: a job with a large result (the server's
/// `--max-result-bytes` may be raised up to its `--max-message-bytes`).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The clients a command needs.
pub struct Clients {
    /// JobService.
    pub jobs: pb::job_service_client::JobServiceClient<Authed>,
    /// AdminService.
    pub admin: pb::admin_service_client::AdminServiceClient<Authed>,
    /// SandboxService.
    pub sandboxes: pb::sandbox_service_client::SandboxServiceClient<Authed>,
    /// The server URL (for messages).
    pub server: String,
}

impl Clients {
    /// Connects to the server named by the global options.
    pub async fn connect(global: &Global) -> Result<Clients> {
        let server = global.server.clone();
        // What the command line says is checked before any connection is tried.
        let https = server.starts_with("https://");
        if !https && !server.starts_with("http://") {
            return Err(CliError::usage(format!(
                "--server `{server}` must start with http:// or https://"
            )));
        }
        if global.tls_ca.is_some() && !https {
            return Err(CliError::usage(
                "--tls-ca needs an https:// --server (the token would go in clear text)",
            ));
        }
        if https && global.tls_ca.is_none() {
            return Err(CliError::usage(
                "an https:// --server needs --tls-ca (the CA that signed its certificate)",
            ));
        }
        if global.tls_domain.is_some() && !https {
            return Err(CliError::usage("--tls-domain needs an https:// --server"));
        }
        let bearer = match global.token.as_deref() {
            Some(t) => Bearer::new(t, "--token")?,
            None => Bearer(None),
        };
        let mut endpoint = tuned(
            Endpoint::from_shared(server.clone())
                .map_err(|_| CliError::usage(format!("--server `{server}` is not a URL")))?,
        );
        if https {
            endpoint = endpoint
                .tls_config(tls_config(global)?)
                .map_err(|e| CliError::usage(format!("TLS: {}", innermost(&e))))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            // The innermost cause says it best ("Connection refused").
            let cause = innermost(&e);
            CliError::new(
                exit::UNREACHABLE,
                format!(
                    "cannot reach the server at {server}: {cause} (is it running? set --server or GANTRY_SERVER)"
                ),
            )
        })?;
        Ok(Clients {
            jobs: pb::job_service_client::JobServiceClient::with_interceptor(
                channel.clone(),
                bearer.clone(),
            )
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
            admin: pb::admin_service_client::AdminServiceClient::with_interceptor(
                channel.clone(),
                bearer.clone(),
            ),
            sandboxes: pb::sandbox_service_client::SandboxServiceClient::with_interceptor(
                channel, bearer,
            ),
            server,
        })
    }

    /// One job, with its attempts.
    pub async fn job(&mut self, id: impl Into<String>) -> Result<pb::Job> {
        match self
            .jobs
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(&s)),
        }
    }

    /// One sandbox.
    pub async fn sandbox(&mut self, id: impl Into<String>) -> Result<pb::Sandbox> {
        match self
            .sandboxes
            .get_sandbox(pb::GetSandboxRequest {
                sandbox_id: id.into(),
            })
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(&s)),
        }
    }

    /// One command of a sandbox.
    pub async fn command(&mut self, id: impl Into<String>) -> Result<pb::SandboxCommand> {
        match self
            .sandboxes
            .get_command(pb::GetCommandRequest {
                command_id: id.into(),
            })
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(&s)),
        }
    }

    /// The user's error for a failed call.
    pub fn error(&self, status: &Status) -> CliError {
        from_status(&self.server, status)
    }
}

/// The environment a runner gives a job's work: where to call, as whom, for which job.
pub struct WorkEnv {
    /// `GANTRY_ENDPOINT`: `unix:///path.sock`, or an http(s) URL.
    pub endpoint: String,
    /// `GANTRY_WORK_TOKEN`: the work's identity. Never printed.
    token: String,
    /// `GANTRY_JOB_ID`: the job every request names.
    pub job_id: String,
}

impl fmt::Debug for WorkEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkEnv")
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .field("job_id", &self.job_id)
            .finish()
    }
}

impl WorkEnv {
    /// The work's environment, from this process's.
    pub fn from_env() -> Result<WorkEnv> {
        Self::from_vars(|name| std::env::var(name))
    }

    /// The work's environment, from `var`; a variable unset or empty is a usage error naming
    /// it.
    pub fn from_vars(var: impl Fn(&str) -> Result<String, VarError>) -> Result<WorkEnv> {
        let get = |name: &str| match var(name) {
            Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            Ok(_) | Err(VarError::NotPresent) => Err(CliError::usage(format!(
                "{name} is not set: `gantry job` commands run inside a job, whose runner sets \
                 GANTRY_ENDPOINT, GANTRY_WORK_TOKEN and GANTRY_JOB_ID"
            ))),
            Err(VarError::NotUnicode(_)) => {
                Err(CliError::usage(format!("{name} is not valid UTF-8")))
            }
        };
        Ok(WorkEnv {
            endpoint: get("GANTRY_ENDPOINT")?,
            token: get("GANTRY_WORK_TOKEN")?,
            job_id: get("GANTRY_JOB_ID")?,
        })
    }
}

/// Where a work endpoint is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// An http:// or https:// URL.
    Url(String),
}

/// `unix:///abs/path.sock` (or `unix:/abs/path.sock`), or an http(s) URL.
pub fn parse_endpoint(endpoint: &str) -> Result<Target> {
    let bad = |why: &str| CliError::usage(format!("GANTRY_ENDPOINT `{endpoint}` {why}"));
    if let Some(rest) = endpoint.strip_prefix("unix:") {
        // `unix:///abs` and `unix:/abs` name the same absolute path.
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if !path.starts_with('/') {
            return Err(bad("must name an absolute socket path (unix:///path.sock)"));
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        return Ok(Target::Url(endpoint.to_string()));
    }
    Err(bad("must be unix:///path.sock or an http(s):// URL"))
}

/// The work endpoint, called as the work of one job.
pub struct Work {
    /// WorkService, with the work token on every call.
    pub client: pb::work_service_client::WorkServiceClient<Authed>,
    /// The job every request names (GANTRY_JOB_ID).
    pub job_id: String,
    /// The endpoint (for messages).
    pub endpoint: String,
}

impl Work {
    /// Connects to the work endpoint the environment names (TLS from the global options,
    /// for an https:// one).
    pub async fn connect(global: &Global) -> Result<Work> {
        let env = WorkEnv::from_env()?;
        let target = parse_endpoint(&env.endpoint)?;
        let bearer = Bearer::new(&env.token, "GANTRY_WORK_TOKEN")?;
        let unreachable = |e: &tonic::transport::Error| {
            CliError::new(
                exit::UNREACHABLE,
                format!(
                    "cannot reach the work endpoint at {}: {} ({})",
                    env.endpoint,
                    innermost(e),
                    Peer::Work.reach_hint()
                ),
            )
        };
        let channel = match target {
            Target::Unix(path) => {
                let endpoint = Endpoint::from_static("http://localhost");
                tuned(endpoint)
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
                    .map_err(|e| unreachable(&e))?
            }
            Target::Url(url) => {
                let mut endpoint = tuned(Endpoint::from_shared(url).map_err(|_| {
                    CliError::usage(format!("GANTRY_ENDPOINT `{}` is not a URL", env.endpoint))
                })?);
                if env.endpoint.starts_with("https://") {
                    endpoint = endpoint
                        .tls_config(tls_config(global)?)
                        .map_err(|e| CliError::usage(format!("TLS: {}", innermost(&e))))?;
                }
                endpoint.connect().await.map_err(|e| unreachable(&e))?
            }
        };
        Ok(Work {
            client: pb::work_service_client::WorkServiceClient::with_interceptor(channel, bearer),
            job_id: env.job_id,
            endpoint: env.endpoint,
        })
    }

    /// The user's error for a failed call.
    pub fn error(&self, status: &Status) -> CliError {
        from_status_of(Peer::Work, &self.endpoint, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<WorkEnv> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorkEnv::from_vars(move |name| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .ok_or(VarError::NotPresent)
        })
    }

    #[test]
    fn the_work_environment_names_what_is_missing() {
        let full = [
            ("GANTRY_ENDPOINT", "unix:///run/gantry/gantry.sock"),
            ("GANTRY_WORK_TOKEN", "s3cret-token"),
            ("GANTRY_JOB_ID", "j1"),
        ];
        let ok = env(&full).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.job_id, "j1");
        assert!(!format!("{ok:?}").contains("s3cret"), "{ok:?}");
        for missing in ["GANTRY_ENDPOINT", "GANTRY_WORK_TOKEN", "GANTRY_JOB_ID"] {
            let vars: Vec<_> = full
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = env(&vars).err().map(|e| (e.code, e.message));
            let (code, message) = e.unwrap_or_else(|| panic!("{missing} unset was taken"));
            assert_eq!(code, exit::USAGE);
            assert!(
                message.starts_with(&format!("{missing} is not set")),
                "{message}"
            );
            assert!(!message.contains("s3cret"), "{message}");
        }
        let blank: Vec<_> = full
            .iter()
            .map(|&(k, v)| (k, if k == "GANTRY_JOB_ID" { " " } else { v }))
            .collect();
        assert!(env(&blank).is_err());
    }

    #[test]
    fn endpoints_are_unix_sockets_or_urls() {
        assert_eq!(
            parse_endpoint("unix:///run/gantry/gantry.sock").ok(),
            Some(Target::Unix("/run/gantry/gantry.sock".into()))
        );
        assert_eq!(
            parse_endpoint("unix:/tmp/w.sock").ok(),
            Some(Target::Unix("/tmp/w.sock".into()))
        );
        assert_eq!(
            parse_endpoint("http://10.0.0.1:50051").ok(),
            Some(Target::Url("http://10.0.0.1:50051".into()))
        );
        for bad in [
            "unix://relative.sock",
            "unix:relative.sock",
            "10.0.0.1:50051",
        ] {
            let e = parse_endpoint(bad).err().map(|e| (e.code, e.message));
            let (code, message) = e.unwrap_or_else(|| panic!("{bad} was taken"));
            assert_eq!(code, exit::USAGE);
            assert!(message.contains("GANTRY_ENDPOINT"), "{message}");
        }
    }

    #[test]
    fn a_bad_token_is_refused_without_showing_it() {
        let e = Bearer::new("bad\ntoken-s3cret", "GANTRY_WORK_TOKEN")
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.contains("GANTRY_WORK_TOKEN"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn work_errors_say_what_to_check() {
        let e = from_status_of(
            Peer::Work,
            "unix:///w.sock",
            &Status::unauthenticated("unknown work token"),
        );
        assert_eq!(e.code, exit::AUTH);
        assert!(e.message.contains("GANTRY_WORK_TOKEN"), "{}", e.message);
        let e = from_status(
            "http://127.0.0.1:50051",
            &Status::unauthenticated("bad token"),
        );
        assert!(e.message.contains("GANTRY_TOKEN"), "{}", e.message);
    }
}
