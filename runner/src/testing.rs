//! A stand-in for the server's WorkService, for the runner's own tests: it knows one work
//! token, serves declared inputs, and records what reaches it (the artifacts above all).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use futures::Stream;
use gantry_proto as pb;
use pb::work_service_server::{WorkService, WorkServiceServer};
use sha2::{Digest as _, Sha256};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming, transport::Channel};

/// The token the fake server takes.
pub const TOKEN: &str = "gwt_test_token";
/// An artifact name the fake server refuses.
pub const REFUSED: &str = "refused.txt";

/// One input the fake server serves.
#[derive(Clone, Debug)]
pub enum FakeInput {
    /// These bytes, announced with their own blob.
    Bytes(Vec<u8>),
    /// These bytes, announced with another digest (a corrupt store).
    Corrupt(Vec<u8>),
    /// Not to be had, for this reason.
    Unavailable(String),
    /// Announced with these bytes' blob; ReadInput answers this status.
    Refused(Vec<u8>, tonic::Code),
    /// Announced with these bytes' blob; the read breaks off after the first chunk.
    BreaksOff(Vec<u8>),
}

/// What reached the fake server.
#[derive(Debug, Default)]
pub struct Seen {
    /// Stored artifacts by name.
    pub artifacts: BTreeMap<String, Vec<u8>>,
    /// The largest data message of any upload.
    pub largest_chunk: usize,
    /// Progress reports, by job id.
    pub progress: Vec<(String, u32)>,
    /// Inputs read, by index.
    pub reads: Vec<u32>,
}

/// A running fake server.
pub struct FakeServer {
    pub channel: Channel,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    /// Serves `inputs` for job `job_id` on a local port.
    pub async fn start(job_id: &str, inputs: Vec<FakeInput>) -> FakeServer {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let fake = Fake {
            job_id: job_id.to_string(),
            inputs,
            seen: seen.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let addr: SocketAddr = listener.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(WorkServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect_lazy();
        FakeServer {
            channel,
            seen,
            task,
        }
    }

    /// Stops serving: calls find nothing listening (UNAVAILABLE).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// What reached it so far.
    pub fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The blob of `data`.
pub fn blob_of(data: &[u8]) -> pb::Blob {
    pb::Blob {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(data))),
        size: data.len() as u64,
    }
}

struct Fake {
    job_id: String,
    inputs: Vec<FakeInput>,
    seen: Arc<Mutex<Seen>>,
}

impl Fake {
    /// The work's own calls only, on its own job.
    fn check<T>(&self, request: &Request<T>, job_id: &str) -> Result<(), Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated("not this work's token"));
        }
        if job_id != self.job_id {
            return Err(Status::permission_denied(format!(
                "the token is not {job_id}'s"
            )));
        }
        Ok(())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Chunks = std::pin::Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl WorkService for Fake {
    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        self.check(&request, &request.get_ref().job_id)?;
        let r = request.into_inner();
        self.seen()
            .progress
            .push((r.job_id, r.progress.map_or(0, |p| p.percent)));
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    async fn append_event(
        &self,
        _: Request<pb::AppendEventRequest>,
    ) -> Result<Response<pb::AppendEventResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn set_result(
        &self,
        _: Request<pb::SetResultRequest>,
    ) -> Result<Response<pb::SetResultResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::UploadArtifactRequest>>,
    ) -> Result<Response<pb::UploadArtifactResponse>, Status> {
        use pb::upload_artifact_request::Part;
        let auth_ok = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        if !auth_ok {
            return Err(Status::unauthenticated("not this work's token"));
        }
        let mut inbound = request.into_inner();
        let Some(pb::UploadArtifactRequest {
            part: Some(Part::Header(header)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument("header first"));
        };
        if header.job_id != self.job_id {
            return Err(Status::permission_denied("another job"));
        }
        let mut data = Vec::new();
        while let Some(m) = inbound.message().await? {
            let Some(Part::Data(d)) = m.part else {
                return Err(Status::invalid_argument("data after the header"));
            };
            let mut seen = self.seen();
            seen.largest_chunk = seen.largest_chunk.max(d.len());
            drop(seen);
            data.extend_from_slice(&d);
        }
        if header.size.is_some_and(|s| s != data.len() as u64) {
            return Err(Status::invalid_argument("size does not match"));
        }
        if header.name == REFUSED {
            return Err(Status::resource_exhausted(
                "the job's artifacts are past --max-artifact-bytes",
            ));
        }
        let blob = blob_of(&data);
        self.seen().artifacts.insert(header.name.clone(), data);
        Ok(Response::new(pb::UploadArtifactResponse {
            artifact: Some(pb::Artifact {
                job_id: header.job_id,
                name: header.name,
                blob: Some(blob),
                ..Default::default()
            }),
        }))
    }

    async fn list_inputs(
        &self,
        request: Request<pb::ListInputsRequest>,
    ) -> Result<Response<pb::ListInputsResponse>, Status> {
        self.check(&request, &request.get_ref().job_id)?;
        let inputs = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                match input {
                    FakeInput::Bytes(data)
                    | FakeInput::Refused(data, _)
                    | FakeInput::BreaksOff(data) => pb::ResolvedInput {
                        index,
                        blob: Some(blob_of(data)),
                        ..Default::default()
                    },
                    FakeInput::Corrupt(data) => pb::ResolvedInput {
                        index,
                        blob: Some(pb::Blob {
                            digest: blob_of(b"something else").digest,
                            size: data.len() as u64,
                        }),
                        ..Default::default()
                    },
                    FakeInput::Unavailable(why) => pb::ResolvedInput {
                        index,
                        unavailable: why.clone(),
                        ..Default::default()
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::ListInputsResponse { inputs }))
    }

    type ReadInputStream = Chunks;

    async fn read_input(
        &self,
        request: Request<pb::ReadInputRequest>,
    ) -> Result<Response<Self::ReadInputStream>, Status> {
        self.check(&request, &request.get_ref().job_id)?;
        let index = request.get_ref().index;
        self.seen().reads.push(index);
        let (data, breaks) = match self.inputs.get(index as usize) {
            Some(FakeInput::Bytes(d) | FakeInput::Corrupt(d)) => (d.clone(), false),
            Some(FakeInput::BreaksOff(d)) => (d.clone(), true),
            Some(FakeInput::Refused(_, code)) => {
                return Err(Status::new(*code, format!("refused with {code:?}")));
            }
            _ => return Err(Status::not_found("no such input")),
        };
        let mut chunks: Vec<Result<pb::BlobChunk, Status>> = data
            .chunks(64 * 1024)
            .enumerate()
            .map(|(i, c)| {
                Ok(pb::BlobChunk {
                    offset: (i * 64 * 1024) as u64,
                    data: c.to_vec(),
                })
            })
            .collect();
        if breaks {
            chunks.truncate(1);
            chunks.push(Err(Status::internal("the disk went away")));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn submit_child(
        &self,
        _: Request<pb::SubmitChildRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// The e2e tests' image: `FROM scratch` with a static busybox (`GANTRY_TEST_BUSYBOX`)
/// and the same applets (no `setsid` among them), built locally.
pub async fn busybox_image() -> String {
    let busybox = std::env::var_os("GANTRY_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    assert!(
        busybox.exists(),
        "set GANTRY_TEST_BUSYBOX to a static busybox ({} is missing)",
        busybox.display()
    );
    let ctx = tempfile::tempdir().expect("build context");
    let bin = ctx.path().join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
    for applet in [
        "sh", "sleep", "echo", "cat", "printf", "seq", "head", "tail", "true", "false", "env",
        "ls", "touch", "test", "[", "kill", "wc", "yes", "tr", "pwd", "mkdir", "cp",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY bin /bin\nENV PATH=/bin\nCMD [\"sh\"]\n",
    )
    .expect("Dockerfile");
    let name = "gantry-runner-test/busybox:1".to_string();
    let out = tokio::process::Command::new("docker")
        .args(["build", "-q", "-t", &name])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .await
        .expect("run docker build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    name
}
