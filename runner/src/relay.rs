//! The work's endpoint: for each attempt and each sandbox the runner serves
//! `gantry.v1.WorkService` on a Unix socket made for that work, and relays every call, as it
//! came, to the server over the runner's own connection.
//!
//! Why a relay: the code inside a job needs no route to the server (a container on a network
//! of its own, a server behind TLS whose CA the work does not have): a socket in its
//! workspace, or mounted into its container, is enough. The relay adds nothing of the
//! runner's: the caller's metadata — `authorization: Bearer <work token>` above all — is what
//! the server sees, so the work acts only as itself, and the runner's credential never goes
//! near it. Answers and errors come back as the server gave them.
//!
//! Each work's socket is `gantry.sock` in a directory of its own under the runner's state
//! directory (`<state-dir>/relay/<random>/`: short, since a socket path is limited to about
//! 107 bytes), world-writable so that a container's non-root user can connect. The docker
//! executor mounts that directory at [`CONTAINER_DIR`]. The listener and the directory go
//! when the work ends ([`Relay::close`]); directories a crashed runner left behind are
//! removed when it starts again ([`Relays::remove_leftovers`]).
//!
//! [`Access`] is the other half of a work's identity: its token, and the client the runner
//! itself uses as the work (to read its inputs and store its artifacts, see
//! [`crate::executor::files`]).
use std::{
    fmt,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use gantry_proto as pb;
use pb::{work_service_client::WorkServiceClient, work_service_server::WorkServiceServer};
use tokio::{net::UnixListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap, transport::Channel};

/// The socket's file name in the work's directory.
pub const SOCKET: &str = "gantry.sock";
/// Where the docker executor mounts the work's directory in its container.
pub const CONTAINER_DIR: &str = "/run/gantry";
/// GANTRY_ENDPOINT inside a container.
pub const CONTAINER_ENDPOINT: &str = "unix:///run/gantry/gantry.sock";

/// Longest socket path the relay makes (`sun_path` holds 108 bytes on Linux, 104 on the
/// BSDs, with its NUL).
const MAX_SOCKET_PATH: usize = 100;
/// Random characters naming a work's directory.
const DIR_NAME_LEN: usize = 12;
/// Largest message relayed either way: the most a server can be configured to take
/// (`--max-message-bytes` is at most 64 MiB); the server enforces its own limit.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// The server's largest message when its welcome does not say (its default, 4 MiB).
const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;
/// How long calls still open when the work ends may take to finish (a process that escaped
/// the work's group may hold one) before they are cut.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Largest artifact chunk: the protocol's 1 MiB.
const MAX_CHUNK: usize = 1 << 20;
/// Room left in a message around an artifact chunk.
const CHUNK_HEADROOM: usize = 4 << 10;

/// What every work's relay shares: the runner's channel, where sockets go, the server's
/// message limit. Cloned into each job's context (clones share the limit).
#[derive(Clone)]
pub struct Relays {
    /// The runner's own channel to the server (its credential is added per call by the
    /// runner's clients, not by the channel: calls relayed on it carry only the caller's).
    channel: Channel,
    /// Directories for sockets are made under this one.
    root: PathBuf,
    /// The server's `Limits.max_message_bytes`, from its welcome.
    max_message_bytes: Arc<AtomicUsize>,
}

impl Relays {
    /// Relays over `channel`, with sockets under `root` (made absolute; a root too long for
    /// a socket path falls back to the system's temporary directory).
    pub fn new(channel: Channel, root: PathBuf) -> Self {
        let root = std::path::absolute(&root).unwrap_or(root);
        let longest = root.as_os_str().len() + 1 + DIR_NAME_LEN + 1 + SOCKET.len();
        let root = if longest > MAX_SOCKET_PATH {
            let fallback = std::env::temp_dir();
            tracing::info!(
                root = %root.display(),
                fallback = %fallback.display(),
                "the state directory's path is too long for Unix sockets; work endpoints go under the temporary directory"
            );
            fallback
        } else {
            root
        };
        Self {
            channel,
            root,
            max_message_bytes: Arc::new(AtomicUsize::new(DEFAULT_MAX_MESSAGE_BYTES)),
        }
    }

    /// Removes the socket directories an earlier run left behind (a runner holds no work
    /// when it starts). Only under the runner's own root, never the temporary directory.
    pub async fn remove_leftovers(&self) {
        if self.root == std::env::temp_dir() {
            return;
        }
        match tokio::fs::remove_dir_all(&self.root).await {
            Ok(()) => {
                tracing::debug!(dir = %self.root.display(), "removed work endpoints left behind")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.root.display(), error = %e, "removing work endpoints left behind")
            }
        }
    }

    /// Takes the server's limits (from its welcome).
    pub fn set_limits(&self, limits: Option<&pb::Limits>) {
        let bytes = match limits.map_or(0, |l| l.max_message_bytes) {
            0 => DEFAULT_MAX_MESSAGE_BYTES,
            b => usize::try_from(b).unwrap_or(usize::MAX),
        };
        self.max_message_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Serves a new work's endpoint.
    pub async fn open(&self) -> Result<Relay, String> {
        let dir = self.make_dir().await?;
        let socket = dir.join(SOCKET);
        let listener = match UnixListener::bind(&socket) {
            Ok(l) => l,
            Err(e) => {
                remove_dir(&dir).await;
                return Err(format!("cannot listen on {}: {e}", socket.display()));
            }
        };
        // A container's user need not be the runner's.
        if let Err(e) =
            tokio::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).await
        {
            remove_dir(&dir).await;
            return Err(format!("cannot open {} to the work: {e}", socket.display()));
        }
        let service = WorkServiceServer::new(Forward {
            client: self.client(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (shutdown, closed) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = closed.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "a work endpoint stopped");
            }
        });
        Ok(Relay {
            dir,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }

    /// The work's standing: its token, its relay's directory, the runner's client as it.
    pub fn access(&self, token: String, relay: Option<&Relay>) -> Access {
        let max = self.max_message_bytes.load(Ordering::Relaxed);
        Access {
            token,
            relay_dir: relay.map(|r| r.dir.clone()),
            client: self.client(),
            chunk_bytes: chunk_bytes(max),
        }
    }

    /// A WorkService client on the runner's channel, without the runner's credential.
    fn client(&self) -> WorkServiceClient<Channel> {
        WorkServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// A new directory of its own for a work's socket: readable and searchable by all (a
    /// container's user reaches the socket), writable by the runner only.
    async fn make_dir(&self) -> Result<PathBuf, String> {
        if let Err(e) = tokio::fs::create_dir_all(&self.root).await {
            return Err(format!("cannot create {}: {e}", self.root.display()));
        }
        let mut tries = 0;
        loop {
            let name = random_name();
            let name = if self.root == std::env::temp_dir() {
                format!("gantry-{name}")
            } else {
                name
            };
            let dir = self.root.join(name);
            match tokio::fs::create_dir(&dir).await {
                Ok(()) => {
                    if let Err(e) =
                        tokio::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                            .await
                    {
                        remove_dir(&dir).await;
                        return Err(format!("cannot set the mode of {}: {e}", dir.display()));
                    }
                    return Ok(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => {
                    tries += 1;
                }
                Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
            }
        }
    }
}

/// The largest artifact chunk for a server that decodes messages of at most `max` bytes.
pub fn chunk_bytes(max: usize) -> usize {
    MAX_CHUNK.min(max.saturating_sub(CHUNK_HEADROOM).max(1024))
}

/// Lowercase letters and digits.
fn random_name() -> String {
    use rand::Rng as _;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..DIR_NAME_LEN)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a work endpoint's directory");
    }
}

/// One work's endpoint, served until [`Relay::close`] (or until dropped).
pub struct Relay {
    /// The directory holding the socket.
    dir: PathBuf,
    /// Ends the server (graceful: open calls may finish).
    shutdown: Option<oneshot::Sender<()>>,
    /// The server's task.
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// The directory holding [`SOCKET`] on this host.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops serving (calls still open get [`CLOSE_GRACE`]) and removes the directory.
    pub async fn close(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err()
        {
            tracing::debug!(dir = %self.dir.display(), "a call to the work's endpoint outlived the work; cutting it");
            task.abort();
        }
        remove_dir(&self.dir).await;
    }
}

impl Drop for Relay {
    /// A task that ended without closing (it panicked): stop serving, remove the directory.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            if let Err(e) = std::fs::remove_dir_all(&self.dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %self.dir.display(), error = %e, "removing a work endpoint's directory");
            }
        }
    }
}

/// A work's standing toward WorkService: its token, where its endpoint is, and the
/// runner's calls made as the work (inputs, artifacts). The token is never printed.
#[derive(Clone)]
pub struct Access {
    /// `Assignment.work_token` (empty from a server that issues none).
    token: String,
    /// The relay's directory on this host; `None`: the work has no endpoint.
    relay_dir: Option<PathBuf>,
    /// A client on the runner's channel, without the runner's credential.
    client: WorkServiceClient<Channel>,
    /// Largest artifact chunk the server takes.
    chunk_bytes: usize,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("token", &"<redacted>")
            .field("relay_dir", &self.relay_dir)
            .field("chunk_bytes", &self.chunk_bytes)
            .finish()
    }
}

impl Access {
    /// The work token (for the work's environment only).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The directory of the work's socket on this host.
    pub fn relay_dir(&self) -> Option<&Path> {
        self.relay_dir.as_deref()
    }

    /// GANTRY_ENDPOINT for work on this host (`unix://` and the socket's path).
    pub fn local_endpoint(&self) -> Option<String> {
        self.relay_dir
            .as_ref()
            .map(|d| format!("unix://{}", d.join(SOCKET).display()))
    }

    /// A client for a call as the work (see [`Access::request`]).
    pub fn client(&self) -> WorkServiceClient<Channel> {
        self.client.clone()
    }

    /// Largest artifact chunk the server takes.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// `message` as a call of the work: with its token.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        // A token that is not valid metadata is left out: the server answers UNAUTHENTICATED.
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Stand-in for tests that make no call.
    #[cfg(test)]
    pub fn offline(token: &str) -> Access {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        Relays::new(channel, std::env::temp_dir()).access(token.to_string(), None)
    }
}

/// The service on a work's socket: every call goes to the server as it came.
struct Forward {
    client: WorkServiceClient<Channel>,
}

/// Metadata that describes the caller's own connection rather than the call (its
/// compression): the relay's connection to the server says its own.
const CONNECTION_METADATA: [&str; 2] = ["grpc-encoding", "grpc-accept-encoding"];

/// The caller's metadata, for the same call toward the server.
fn relayed(mut metadata: MetadataMap) -> MetadataMap {
    for name in CONNECTION_METADATA {
        metadata.remove(name);
    }
    metadata
}

/// A unary request, relayed.
fn outbound<T>(request: Request<T>) -> Request<T> {
    let (metadata, _, message) = request.into_parts();
    Request::from_parts(relayed(metadata), Default::default(), message)
}

/// The caller's messages as they come. A caller whose stream breaks must not look like one
/// that finished (its last message would pass for the upload's last byte): the break is
/// sent on `cut` and the stream never ends, so the relay abandons the call (see
/// [`Forward::upload_artifact`]).
fn passing<T: Send + 'static>(
    inbound: Streaming<T>,
    cut: oneshot::Sender<Status>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold((inbound, Some(cut)), |(mut inbound, mut cut)| async move {
        match inbound.message().await {
            Ok(Some(message)) => Some((message, (inbound, cut))),
            Ok(None) => None,
            Err(status) => {
                if let Some(cut) = cut.take() {
                    let _ = cut.send(status);
                }
                futures::future::pending().await
            }
        }
    })
}

#[tonic::async_trait]
impl pb::work_service_server::WorkService for Forward {
    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        self.client.clone().report_progress(outbound(request)).await
    }

    async fn append_event(
        &self,
        request: Request<pb::AppendEventRequest>,
    ) -> Result<Response<pb::AppendEventResponse>, Status> {
        self.client.clone().append_event(outbound(request)).await
    }

    async fn set_result(
        &self,
        request: Request<pb::SetResultRequest>,
    ) -> Result<Response<pb::SetResultResponse>, Status> {
        self.client.clone().set_result(outbound(request)).await
    }

    /// The caller's messages flow on as the server takes them (nothing is buffered beyond
    /// the transports' windows); a caller that breaks off makes the relay drop its call to
    /// the server, which then stores nothing.
    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::UploadArtifactRequest>>,
    ) -> Result<Response<pb::UploadArtifactResponse>, Status> {
        let (metadata, _, inbound) = request.into_parts();
        let (cut_tx, cut_rx) = oneshot::channel();
        let messages = passing(inbound, cut_tx);
        let mut client = self.client.clone();
        let call = client.upload_artifact(Request::from_parts(
            relayed(metadata),
            Default::default(),
            messages,
        ));
        tokio::select! {
            answer = call => answer,
            Ok(status) = cut_rx => Err(status),
        }
    }

    async fn list_inputs(
        &self,
        request: Request<pb::ListInputsRequest>,
    ) -> Result<Response<pb::ListInputsResponse>, Status> {
        self.client.clone().list_inputs(outbound(request)).await
    }

    type ReadInputStream = Streaming<pb::BlobChunk>;

    /// The server's stream itself: chunks reach the caller as it reads them.
    async fn read_input(
        &self,
        request: Request<pb::ReadInputRequest>,
    ) -> Result<Response<Self::ReadInputStream>, Status> {
        self.client.clone().read_input(outbound(request)).await
    }

    async fn submit_child(
        &self,
        request: Request<pb::SubmitChildRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.client.clone().submit_child(outbound(request)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_within_the_protocol_and_the_servers_messages() {
        assert_eq!(chunk_bytes(4 << 20), 1 << 20);
        assert_eq!(chunk_bytes(64 << 20), 1 << 20);
        assert_eq!(chunk_bytes(512 << 10), (512 << 10) - CHUNK_HEADROOM);
        assert!(chunk_bytes(0) >= 1);
    }

    #[test]
    fn the_callers_metadata_goes_on_but_not_its_compression() {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", "Bearer gwt_x".parse().expect("ascii"));
        metadata.insert("grpc-encoding", "gzip".parse().expect("ascii"));
        metadata.insert("x-trace", "abc".parse().expect("ascii"));
        let out = relayed(metadata);
        assert_eq!(
            out.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer gwt_x")
        );
        assert_eq!(
            out.get("x-trace").and_then(|v| v.to_str().ok()),
            Some("abc")
        );
        assert!(out.get("grpc-encoding").is_none());
    }

    #[tokio::test]
    async fn an_access_never_prints_its_token() {
        let access = Access::offline("gwt_secret");
        assert!(!format!("{access:?}").contains("gwt_secret"));
        let request = access.request(());
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer gwt_secret")
        );
    }

    #[tokio::test]
    async fn calls_reach_the_server_as_the_work_made_them_and_answers_come_back_as_given() {
        use crate::testing::{FakeInput, FakeServer, TOKEN};
        let input = b"0123456789".repeat(30_000);
        let server = FakeServer::start("job-1", vec![FakeInput::Bytes(input.clone())]).await;
        let root = tempfile::tempdir().expect("tempdir");
        let relays = Relays::new(server.channel.clone(), root.path().join("relay"));
        let relay = relays.open().await.expect("serving");
        let access = relays.access(TOKEN.to_string(), Some(&relay));
        let endpoint = access.local_endpoint().expect("an endpoint");
        // What `gantry job …` does inside the work.
        let channel = tonic::transport::Endpoint::from_shared(endpoint)
            .expect("unix:// endpoint")
            .connect()
            .await
            .expect("connects to the socket");
        let mut client = WorkServiceClient::new(channel);
        let progress = |job_id: &str| pb::ReportProgressRequest {
            job_id: job_id.to_string(),
            progress: Some(pb::Progress {
                percent: 40,
                ..Default::default()
            }),
        };

        client
            .report_progress(access.request(progress("job-1")))
            .await
            .expect("the work's own call");
        assert_eq!(server.seen().progress, [("job-1".to_string(), 40)]);
        // The runner adds nothing: without the work's token the server says no, as it said.
        let refused = client
            .report_progress(Request::new(progress("job-1")))
            .await
            .expect_err("no token");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.message(), "not this work's token");
        let other = client
            .report_progress(access.request(progress("job-2")))
            .await
            .expect_err("another job");
        assert_eq!(other.code(), tonic::Code::PermissionDenied);

        // Streams both ways.
        let mut chunks = client
            .read_input(access.request(pb::ReadInputRequest {
                job_id: "job-1".into(),
                index: 0,
            }))
            .await
            .expect("read")
            .into_inner();
        let mut read = Vec::new();
        while let Some(chunk) = chunks.message().await.expect("chunk") {
            assert_eq!(chunk.offset, read.len() as u64);
            read.extend_from_slice(&chunk.data);
        }
        assert_eq!(read, input);
        use pb::upload_artifact_request::Part;
        let messages = vec![
            pb::UploadArtifactRequest {
                part: Some(Part::Header(pb::ArtifactHeader {
                    job_id: "job-1".into(),
                    name: "out/a.txt".into(),
                    size: Some(6),
                    digest: String::new(),
                })),
            },
            pb::UploadArtifactRequest {
                part: Some(Part::Data(b"abc".to_vec())),
            },
            pb::UploadArtifactRequest {
                part: Some(Part::Data(b"def".to_vec())),
            },
        ];
        let stored = client
            .upload_artifact(access.request(futures::stream::iter(messages)))
            .await
            .expect("uploaded")
            .into_inner();
        assert_eq!(
            stored.artifact.map(|a| a.name).as_deref(),
            Some("out/a.txt")
        );
        assert_eq!(
            server.seen().artifacts.get("out/a.txt").map(Vec::as_slice),
            Some(&b"abcdef"[..])
        );
        relay.close().await;
    }

    #[tokio::test]
    async fn an_endpoint_is_a_world_reachable_socket_gone_when_closed() {
        let root = tempfile::tempdir().expect("tempdir");
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let relays = Relays::new(channel, root.path().join("relay"));
        let relay = relays.open().await.expect("serving");
        let socket = relay.dir().join(SOCKET);
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
        let access = relays.access("t".into(), Some(&relay));
        assert_eq!(
            access.local_endpoint(),
            Some(format!("unix://{}", socket.display()))
        );
        let dir = relay.dir().to_path_buf();
        relay.close().await;
        assert!(!dir.exists());
    }
}
