//! How the runner reaches the server: the endpoint (and TLS), the bearer token on every call,
//! registration with the registration token, the jittered backoff between attempts, and
//! opening a `Session` (hello, then the server's welcome).
//!
//! Kept apart from the agent so that the agent's loop reads as the protocol (what to send,
//! what to do with what comes back) and this module answers "how do we get a working call":
//! everything here is about one call or one connection attempt, and nothing here knows about
//! jobs or phases. It also says, in one place, what a session's end status means to the
//! runner ([`SessionEnd`]).
use std::time::Duration;

use anyhow::Context as _;
use gantry_proto as pb;
use pb::{session_request::Kind as Out, session_response::Kind as In};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status, Streaming,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    config::Config,
    identity::{self, Identity, Registration},
};

/// Messages queued toward the server on the stream (small: the agent keeps its own queues
/// and only hands over a message when the stream has room).
const STREAM_BUFFER: usize = 32;
/// Longest a connection attempt (and the wait for `welcome`) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// The server's endpoint from the flags: URL, timeouts, keep-alive and TLS.
pub fn endpoint(config: &Config) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(config.server.clone())
        .with_context(|| format!("--server `{}` is not a URL", config.server))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(ca) = &config.tls_ca {
        let pem =
            std::fs::read(ca).with_context(|| format!("reading --tls-ca {}", ca.display()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        if let Some(domain) = &config.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
    } else if config.server.starts_with("https://") {
        anyhow::bail!("--server uses https:// but no --tls-ca was given");
    }
    Ok(endpoint)
}

fn bearer(token: &str) -> anyhow::Result<MetadataValue<tonic::metadata::Ascii>> {
    format!("Bearer {token}").parse().map_err(|_| {
        anyhow::anyhow!("the token is not valid in gRPC metadata (printable ASCII only)")
    })
}

/// Adds the runner's bearer token to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A `RunnerService` client that sends one token.
pub type Client = pb::runner_service_client::RunnerServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// Largest message the runner decodes: the most a server can be configured to send
/// (`--max-message-bytes` is at most 64 MiB), not tonic's 4 MiB default, so that a server
/// with a larger limit never sends a command this runner cannot read.
const MAX_DECODING_MESSAGE_BYTES: usize = 64 << 20;

/// A client on `channel` that authenticates with `token`.
pub fn client(channel: &Channel, token: &str) -> anyhow::Result<Client> {
    Ok(
        pb::runner_service_client::RunnerServiceClient::with_interceptor(
            channel.clone(),
            Bearer(bearer(token)?),
        )
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
    )
}

/// Jittered exponential backoff: many runners cut off by the same outage do not all come
/// back in the same instant.
pub struct Backoff {
    /// The step the next delay is drawn under.
    next: Duration,
    /// The largest step (`--reconnect-max-ms`).
    max: Duration,
}

impl Backoff {
    /// Backoff from 100 ms doubling up to `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            next: BACKOFF_BASE,
            max,
        }
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.next = BACKOFF_BASE;
    }

    /// The delay before the next attempt: between half and all of the current step.
    pub fn delay(&mut self) -> Duration {
        use rand::Rng as _;
        let step = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        let ms = step.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }
}

/// Why a call the runner makes with its credential failed.
#[derive(Debug)]
pub enum CallError {
    /// The server does not accept the credential (revoked, or the runner was deleted):
    /// the runner must register anew.
    Unauthenticated(Status),
    /// Anything else (unreachable, timed out, refused for another reason).
    Other(anyhow::Error),
}

impl CallError {
    fn from_status(status: Status) -> Self {
        match status.code() {
            Code::Unauthenticated => CallError::Unauthenticated(status),
            _ => CallError::Other(status.into()),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unauthenticated(status) => write!(f, "{status}"),
            CallError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// One open session.
pub struct Session {
    /// What goes to the server (the hello is already in it).
    pub tx: mpsc::Sender<pb::SessionRequest>,
    /// What comes from it, after the welcome.
    pub inbound: Streaming<pb::SessionResponse>,
    /// The server's answer to the hello.
    pub welcome: pb::Welcome,
}

/// Opens a session: sends `hello`, then waits (up to [`CONNECT_TIMEOUT`]) for the welcome.
pub async fn open(
    channel: &Channel,
    credential: &str,
    hello: pb::Hello,
) -> Result<Session, CallError> {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tx.try_send(pb::SessionRequest {
        kind: Some(Out::Hello(hello)),
    })
    .context("queueing hello")
    .map_err(CallError::Other)?;
    let mut client = client(channel, credential).map_err(CallError::Other)?;
    let opened = tokio::time::timeout(CONNECT_TIMEOUT, client.session(ReceiverStream::new(rx)))
        .await
        .map_err(|_| CallError::Other(anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}")))?;
    let mut inbound = opened.map_err(CallError::from_status)?.into_inner();
    let first = tokio::time::timeout(CONNECT_TIMEOUT, inbound.message())
        .await
        .map_err(|_| CallError::Other(anyhow::anyhow!("no welcome within {CONNECT_TIMEOUT:?}")))?
        .map_err(CallError::from_status)?;
    let Some(pb::SessionResponse {
        kind: Some(In::Welcome(welcome)),
    }) = first
    else {
        return Err(CallError::Other(anyhow::anyhow!(
            "the server's first session message was not a welcome"
        )));
    };
    Ok(Session {
        tx,
        inbound,
        welcome,
    })
}

/// Says the runner leaves (unary `Deregister`), within [`CONNECT_TIMEOUT`].
pub async fn deregister(
    channel: &Channel,
    credential: &str,
    reason: String,
) -> Result<pb::DeregisterResponse, CallError> {
    let mut client = client(channel, credential).map_err(CallError::Other)?;
    let resp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client.deregister(pb::DeregisterRequest { reason }),
    )
    .await
    .map_err(|_| CallError::Other(anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}")))?
    .map_err(CallError::from_status)?;
    Ok(resp.into_inner())
}

/// Registers with the registration token, retrying while the server is unreachable, and
/// saves the new identity.
pub async fn register(
    config: &Config,
    channel: &Channel,
    identity: &mut Identity,
    registration: Registration,
) -> anyhow::Result<()> {
    let token = config.registration_token.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "no runner identity in {} for these settings, and no --registration-token (GANTRY_REGISTRATION_TOKEN) to register with",
            config.state_dir.display()
        )
    })?;
    let request = pb::RegisterRequest {
        name: registration.name.clone(),
        labels: registration.labels.clone().into_iter().collect(),
        capacity: registration.capacity,
        executors: config.executors.iter().map(|e| *e as i32).collect(),
        queues: registration.queues.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: crate::config::hostname(),
        sandboxes: registration.sandboxes,
    };
    let mut backoff = Backoff::new(Duration::from_millis(config.reconnect_max_ms));
    let response = loop {
        let mut client = client(channel, token)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, client.register(request.clone())).await {
            Ok(Ok(r)) => break r.into_inner(),
            Ok(Err(status))
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) =>
            {
                let delay = backoff.delay();
                tracing::warn!(%status, retry_in = ?delay, "cannot reach the server to register");
                tokio::time::sleep(delay).await;
            }
            Ok(Err(status)) => {
                return Err(anyhow::anyhow!(
                    "registration refused: {} ({:?})",
                    status.message(),
                    status.code()
                ));
            }
            Err(_) => {
                let delay = backoff.delay();
                tracing::warn!(retry_in = ?delay, "registration timed out");
                tokio::time::sleep(delay).await;
            }
        }
    };
    identity.replace(response.runner_id, response.credential, registration);
    let (dir, saved) = (config.state_dir.clone(), identity.clone());
    tokio::task::spawn_blocking(move || identity::save(&dir, &saved))
        .await
        .context("saving the identity")??;
    tracing::info!(runner = %identity.runner_id, name = %identity.registration.name, "registered");
    Ok(())
}

/// The session's timing, as the welcome sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often to heartbeat (leases are extended by heartbeats; the server also closes a
    /// silent session).
    pub heartbeat_every: Duration,
    /// How long a lease lasts without a heartbeat.
    pub lease: Duration,
}

impl Default for Timing {
    /// Until a welcome says otherwise.
    fn default() -> Self {
        Self {
            heartbeat_every: Duration::from_secs(10),
            lease: Duration::from_secs(30),
        }
    }
}

impl Timing {
    /// The timing a welcome asks for: the millisecond fields when set, else the seconds
    /// fields of an older server; heartbeats at least twice per silence limit.
    pub fn from_welcome(w: &pb::Welcome) -> Timing {
        let mut heartbeat_every = match w.heartbeat_interval_ms {
            0 => Duration::from_secs(u64::from(w.heartbeat_interval_seconds.max(1))),
            ms => Duration::from_millis(u64::from(ms)),
        };
        let lease = match w.lease_ms {
            0 => Duration::from_secs(u64::from(w.lease_seconds.max(1))),
            ms => Duration::from_millis(u64::from(ms)),
        };
        if let Some(silence) = w.limits.as_ref().map(|l| l.session_silence_ms)
            && silence >= 2
        {
            heartbeat_every = heartbeat_every.min(Duration::from_millis(u64::from(silence / 2)));
        }
        Timing {
            heartbeat_every,
            lease,
        }
    }
}

/// What the end of a session means to the runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The connection broke or the server went away: reconnect; the work goes on.
    Broken,
    /// ABORTED: a newer session with this runner's credential replaced this one (another
    /// process holds this runner's identity). Do not reconnect.
    Replaced,
    /// UNAUTHENTICATED: the credential is no longer valid (revoked, or the runner was
    /// deleted): register anew.
    Unauthenticated,
    /// RESOURCE_EXHAUSTED: a message was larger than the server takes.
    TooLarge,
    /// INVALID_ARGUMENT: the server could not decode a message (the status names the field).
    Undecodable,
}

impl SessionEnd {
    /// How a session ended (`None`: the server closed it without a status).
    pub fn of(status: Option<&Status>) -> SessionEnd {
        match status.map(Status::code) {
            Some(Code::Aborted) => SessionEnd::Replaced,
            Some(Code::Unauthenticated) => SessionEnd::Unauthenticated,
            Some(Code::ResourceExhausted) => SessionEnd::TooLarge,
            Some(Code::InvalidArgument) => SessionEnd::Undecodable,
            _ => SessionEnd::Broken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_bound() {
        let mut b = Backoff::new(Duration::from_millis(1000));
        let delays: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= BACKOFF_BASE);
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1000)));
        assert!(delays[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.delay() <= BACKOFF_BASE);
    }

    #[test]
    fn the_welcome_sets_timing_in_milliseconds_or_seconds_from_an_older_server() {
        let precise = pb::Welcome {
            heartbeat_interval_seconds: 1,
            heartbeat_interval_ms: 333,
            lease_seconds: 1,
            lease_ms: 1000,
            ..Default::default()
        };
        assert_eq!(
            Timing::from_welcome(&precise),
            Timing {
                heartbeat_every: Duration::from_millis(333),
                lease: Duration::from_millis(1000)
            }
        );
        let older = pb::Welcome {
            heartbeat_interval_seconds: 4,
            lease_seconds: 12,
            ..Default::default()
        };
        assert_eq!(
            Timing::from_welcome(&older),
            Timing {
                heartbeat_every: Duration::from_secs(4),
                lease: Duration::from_secs(12)
            }
        );
        // Nothing at all: at least a second, never a zero interval.
        let empty = Timing::from_welcome(&pb::Welcome::default());
        assert_eq!(empty.heartbeat_every, Duration::from_secs(1));
        // The server's silence limit bounds the interval.
        let silent = pb::Welcome {
            heartbeat_interval_ms: 10_000,
            limits: Some(pb::Limits {
                session_silence_ms: 4_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            Timing::from_welcome(&silent).heartbeat_every,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn a_session_end_status_says_what_to_do() {
        let end = |code| SessionEnd::of(Some(&Status::new(code, "x")));
        assert_eq!(end(Code::Aborted), SessionEnd::Replaced);
        assert_eq!(end(Code::Unauthenticated), SessionEnd::Unauthenticated);
        assert_eq!(end(Code::ResourceExhausted), SessionEnd::TooLarge);
        assert_eq!(end(Code::InvalidArgument), SessionEnd::Undecodable);
        assert_eq!(end(Code::Unavailable), SessionEnd::Broken);
        assert_eq!(end(Code::Internal), SessionEnd::Broken);
        assert_eq!(SessionEnd::of(None), SessionEnd::Broken);
    }
}
