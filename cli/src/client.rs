//! The connection to the server, and errors as the user sees them: one line, a fitting exit
//! status.
use std::fmt;

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

/// Turns a gRPC status into the user's error: the server's message, its field violations, and
/// the exit status that fits.
pub fn from_status(server: &str, status: &Status) -> CliError {
    // A status the client made from a broken connection (the server crashed, the network
    // failed mid-stream) carries its cause; the server's own statuses never do.
    if let Some(cause) = std::error::Error::source(status) {
        return CliError::new(
            exit::UNREACHABLE,
            format!(
                "lost the connection to the server at {server}: {}",
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
                "cannot reach the server at {server}: {} (is it running? set --server or GANTRY_SERVER)",
                if message.is_empty() {
                    "unavailable"
                } else {
                    &message
                }
            ),
        ),
        Code::Unauthenticated | Code::PermissionDenied => CliError::new(
            exit::AUTH,
            format!("authentication failed: {message} (check --token or GANTRY_TOKEN)"),
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

/// An authenticated channel.
pub type Authed = InterceptedService<Channel, Bearer>;

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
        let token = match global.token.as_deref() {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| CliError::usage("--token must be printable ASCII"))?,
            ),
            None => None,
        };
        let mut endpoint = Endpoint::from_shared(server.clone())
            .map_err(|_| CliError::usage(format!("--server `{server}` is not a URL")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            // A server host that vanishes without closing the connection is noticed.
            .http2_keep_alive_interval(std::time::Duration::from_secs(20))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if https {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &global.tls_ca {
                let pem = std::fs::read(ca)
                    .map_err(|e| CliError::usage(format!("--tls-ca {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(domain) = &global.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
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
        let bearer = Bearer(token);
        Ok(Clients {
            jobs: pb::job_service_client::JobServiceClient::with_interceptor(
                channel.clone(),
                bearer.clone(),
            ),
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
