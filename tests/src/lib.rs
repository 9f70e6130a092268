//! Test harness: real servers on ephemeral loopback ports, on SQLite (a temp file) or on a
//! fresh PostgreSQL database, with authenticated clients and a protocol-level runner.
//!
//! PostgreSQL comes from `GANTRY_TEST_POSTGRES_URL` (an admin URL; each test creates and
//! drops its own database). When it is unset the PostgreSQL variant of a test says so
//! loudly; with `GANTRY_TEST_REQUIRE_ALL=1` (set by `scripts/test.sh`) it fails instead.
pub mod data;
pub mod procs;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use gantry_proto as pb;
use gantry_server::{Config, RunningServer};
use pb::{
    admin_service_client::AdminServiceClient, job_service_client::JobServiceClient,
    runner_service_client::RunnerServiceClient, sandbox_service_client::SandboxServiceClient,
    work_service_client::WorkServiceClient,
};
use sea_orm::{ConnectionTrait, Database};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// Longest any single wait in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Which database a test runs on.
#[derive(Clone, Debug)]
pub enum Db {
    /// A SQLite file in a temp dir.
    Sqlite,
    /// A fresh database on the PostgreSQL server at this admin URL.
    Postgres(String),
}

impl Db {
    /// The PostgreSQL admin URL, or `None` after saying loudly why the test does not run.
    pub fn postgres() -> Option<Db> {
        match std::env::var("GANTRY_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(Db::Postgres(url)),
            _ => {
                let msg = "PostgreSQL is not available: GANTRY_TEST_POSTGRES_URL is unset. \
                           Run scripts/test.sh, which starts PostgreSQL and sets it.";
                if std::env::var("GANTRY_TEST_REQUIRE_ALL").as_deref() == Ok("1") {
                    panic!("{msg}");
                }
                eprintln!("\n!!!!!!!!!! NOT RUN ON POSTGRESQL !!!!!!!!!!\n{msg}\n");
                None
            }
        }
    }
}

/// Declares, for each scenario `async fn name(db: Db)`, a module `name` with a `sqlite` and
/// a `postgres` test.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) = $crate::Db::postgres() {
                    super::$name(db).await
                }
            }
        }
    )*};
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// A bearer for `token`.
    pub fn new(token: &str) -> Bearer {
        Bearer(Some(
            format!("Bearer {token}").parse().expect("tokens are ASCII"),
        ))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// An authenticated channel.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A database of its own for a test or a benchmark (a SQLite file in a temp dir, or a fresh
/// PostgreSQL database), removed by [`TestDatabase::remove`].
pub struct TestDatabase(Prepared);

impl TestDatabase {
    /// Prepares one on `db`.
    pub async fn new(db: &Db) -> TestDatabase {
        TestDatabase(prepare(db).await)
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.0.url
    }

    /// Drops it (a PostgreSQL database; a SQLite file goes with its temp dir).
    pub async fn remove(mut self) {
        if let Some((admin, name)) = self.0.drop_db.take() {
            drop_database(&admin, &name).await;
        }
    }
}

/// A database prepared for a test, kept across server restarts.
struct Prepared {
    url: String,
    _dir: Option<tempfile::TempDir>,
    drop_db: Option<(String, String)>,
}

async fn prepare(db: &Db) -> Prepared {
    match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("gantry.db").display()
            );
            Prepared {
                url,
                _dir: Some(dir),
                drop_db: None,
            }
        }
        Db::Postgres(admin) => {
            let name = format!("gantry_t_{}", uuid::Uuid::new_v4().simple());
            let conn = Database::connect(admin.as_str())
                .await
                .expect("connect to the PostgreSQL admin URL");
            conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
            let _ = conn.close().await;
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
            Prepared {
                url: format!("{base}/{name}"),
                _dir: Some(tempfile::tempdir().expect("temp dir")),
                drop_db: Some((admin.clone(), name)),
            }
        }
    }
}

/// A real gantry-server on a loopback port.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its configuration (restarts reuse it).
    pub config: Config,
    /// The API token for clients.
    pub api_token: String,
    /// The registration token for runners.
    pub registration_token: String,
    server: Option<RunningServer>,
    db: Prepared,
}

/// Settings tests use unless they say otherwise: short leases, a fast reaper, fixed tokens.
pub fn test_config(url: &str) -> Config {
    let mut config = Config::with_database(url);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.api_tokens = vec!["test-api-token".into()];
    config.registration_token = Some("test-registration-token".into());
    config.lease_seconds = 3;
    config.reap_interval_ms = 50;
    config.timeout_grace_seconds = 0;
    config
}

impl TestServer {
    /// Starts a server on `db` with the test defaults.
    pub async fn start(db: Db) -> TestServer {
        Self::start_with(db, |_| {}).await
    }

    /// Starts a server on `db`, letting the test adjust the configuration.
    pub async fn start_with(db: Db, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let prepared = prepare(&db).await;
        let mut config = test_config(&prepared.url);
        if let Some(dir) = &prepared._dir {
            config.blob_dir = Some(dir.path().join("blobs"));
        }
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind loopback");
        let server = gantry_server::start(config.clone(), listener)
            .await
            .expect("server starts");
        TestServer {
            addr: server.addr,
            api_token: server.api_tokens[0].clone(),
            registration_token: server.registration_token.clone(),
            config,
            server: Some(server),
            db: prepared,
        }
    }

    /// Another server (a replica) on the same database.
    pub async fn replica(&self) -> RunningServer {
        self.replica_with(|_| {}).await
    }

    /// A replica whose configuration the test adjusts.
    pub async fn replica_with(&self, adjust: impl FnOnce(&mut Config)) -> RunningServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let mut config = self.config.clone();
        adjust(&mut config);
        gantry_server::start(config, listener)
            .await
            .expect("replica starts")
    }

    /// Where the plaintext health-only listener is, when the configuration asked for one.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().and_then(|s| s.health_addr)
    }

    /// The database URL.
    pub fn database_url(&self) -> &str {
        &self.db.url
    }

    /// Stops the server and starts it again on the same address and database.
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind the same port");
        self.server = Some(
            gantry_server::start(self.config.clone(), listener)
                .await
                .expect("server restarts"),
        );
    }

    /// Stops the server and removes its database.
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
        if let Some((admin, name)) = self.db.drop_db.take() {
            drop_database(&admin, &name).await;
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        channel(&self.url()).await
    }

    /// JobService with the API token.
    pub async fn jobs(&self) -> JobServiceClient<Authed> {
        JobServiceClient::with_interceptor(self.channel().await, Bearer::new(&self.api_token))
    }

    /// SandboxService with the API token.
    pub async fn sandboxes(&self) -> SandboxServiceClient<Authed> {
        SandboxServiceClient::with_interceptor(self.channel().await, Bearer::new(&self.api_token))
    }

    /// WorkService with a work token (as the code inside a job calls it).
    pub async fn work(&self, token: &str) -> WorkServiceClient<Authed> {
        WorkServiceClient::with_interceptor(self.channel().await, Bearer::new(token))
    }

    /// The local blob directory, when the server keeps blobs in one.
    pub fn blob_dir(&self) -> Option<std::path::PathBuf> {
        self.config
            .s3_bucket
            .is_none()
            .then(|| self.config.local_blob_dir())
    }

    /// AdminService with the API token.
    pub async fn admin(&self) -> AdminServiceClient<Authed> {
        AdminServiceClient::with_interceptor(self.channel().await, Bearer::new(&self.api_token))
    }

    /// Registers a runner with these labels and capacity, offering both executors.
    pub async fn runner(&self, name: &str, labels: &[(&str, &str)], capacity: u32) -> TestRunner {
        let both = [pb::ExecutorKind::Process, pb::ExecutorKind::Docker];
        self.runner_offering(name, labels, capacity, &both).await
    }

    /// Registers a runner offering only `executors`.
    pub async fn runner_offering(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        capacity: u32,
        executors: &[pb::ExecutorKind],
    ) -> TestRunner {
        let mut reg = RunnerServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(&self.registration_token),
        );
        let resp = reg
            .register(pb::RegisterRequest {
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                capacity,
                executors: executors.iter().map(|e| *e as i32).collect(),
                queues: vec![],
                version: "test".into(),
                hostname: "localhost".into(),
                sandboxes: true,
            })
            .await
            .expect("register")
            .into_inner();
        TestRunner {
            id: resp.runner_id,
            credential: resp.credential.clone(),
            client: RunnerServiceClient::with_interceptor(
                self.channel().await,
                Bearer::new(&resp.credential),
            ),
            seq: Default::default(),
        }
    }
}

async fn drop_database(admin: &str, name: &str) {
    if let Ok(conn) = Database::connect(admin).await {
        let _ = conn
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
        let _ = conn.close().await;
    }
}

/// A channel to `url`.
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("valid url")
        .connect()
        .await
        .expect("connect to server")
}

/// A process job running `sh -c script`.
pub fn sh(script: &str) -> pb::JobSpec {
    pb::JobSpec {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// A process job running `sh -c script`, tried up to `max_attempts` times with no backoff.
pub fn sh_retried(script: &str, max_attempts: u32) -> pb::JobSpec {
    pb::JobSpec {
        retry: Some(pb::RetryPolicy {
            max_attempts,
            initial_backoff_ms: 0,
            max_backoff_ms: 0,
        }),
        ..sh(script)
    }
}

/// Submits `spec`; returns the job id.
pub async fn submit(jobs: &mut JobServiceClient<Authed>, spec: pb::JobSpec) -> String {
    jobs.submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
        .id
}

/// Reads a job.
pub async fn get(jobs: &mut JobServiceClient<Authed>, id: &str) -> pb::Job {
    jobs.get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .expect("get job")
        .into_inner()
}

/// Follows a job's events until a status change to `status`; returns every event seen.
pub async fn wait_for_status(
    jobs: &mut JobServiceClient<Authed>,
    id: &str,
    status: pb::JobStatus,
) -> Vec<pb::JobEvent> {
    let mut stream = watch(jobs, id, true).await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("job {id} never reached {status:?}; events: {seen:#?}"));
        let ev = match next {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => panic!("watch failed: {e}"),
            None => panic!("job {id} ended without reaching {status:?}; events: {seen:#?}"),
        };
        let hit = matches!(&ev.kind, Some(pb::job_event::Kind::Status(s)) if s.to == status as i32 && s.from != 0);
        seen.push(ev);
        if hit {
            return seen;
        }
    }
}

/// A job's events from the first (and, with `follow`, until it is terminal).
pub async fn watch(
    jobs: &mut JobServiceClient<Authed>,
    id: &str,
    follow: bool,
) -> tonic::Streaming<pb::JobEvent> {
    jobs.watch_job(pb::WatchJobRequest {
        job_id: id.into(),
        after_sequence: 0,
        follow,
    })
    .await
    .expect("watch")
    .into_inner()
}

/// Every event of a job so far (not following).
pub async fn events(jobs: &mut JobServiceClient<Authed>, id: &str) -> Vec<pb::JobEvent> {
    let mut stream = watch(jobs, id, false).await;
    let mut out = Vec::new();
    while let Some(e) = stream.next().await {
        out.push(e.expect("event"));
    }
    out
}

/// Follows a job until it is terminal (its event stream ends then); returns it.
pub async fn finished(jobs: &mut JobServiceClient<Authed>, id: &str) -> pb::Job {
    let mut stream = watch(jobs, id, true).await;
    tokio::time::timeout(PATIENCE, async {
        while let Some(e) = stream.next().await {
            e.expect("event");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job {id} did not finish"));
    get(jobs, id).await
}

/// Every file under `dir` (none when it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}

/// All stored output of a job's latest attempt, per stream.
pub async fn logs(jobs: &mut JobServiceClient<Authed>, id: &str) -> (Vec<u8>, Vec<u8>) {
    let stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("get logs")
        .into_inner();
    stdout_and_stderr(stream).await
}

/// Every chunk of a log stream, per output stream, checked contiguous.
async fn stdout_and_stderr(mut stream: tonic::Streaming<pb::LogChunk>) -> (Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("log chunk");
        let target = if chunk.stream == pb::LogStream::Stdout as i32 {
            &mut out
        } else {
            &mut err
        };
        assert_eq!(chunk.offset as usize, target.len(), "chunks are contiguous");
        target.extend_from_slice(&chunk.data);
    }
    (out, err)
}

/// A runner driven at protocol level by the test (the real runner crate comes with its own
/// issue); it talks to the real server over real gRPC.
pub struct TestRunner {
    /// Runner id.
    pub id: String,
    /// Its credential.
    pub credential: String,
    /// RunnerService with the credential.
    pub client: RunnerServiceClient<Authed>,
    seq: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl TestRunner {
    /// New connection to `server` (after a restart), same identity.
    pub async fn reconnect(&mut self, server: &TestServer) {
        self.client = RunnerServiceClient::with_interceptor(
            server.channel().await,
            Bearer::new(&self.credential),
        );
    }

    /// The same runner talking to the server (or replica) at `url`.
    pub async fn reconnect_to(&mut self, url: &str) {
        self.client = RunnerServiceClient::with_interceptor(
            channel(url).await,
            Bearer::new(&self.credential),
        );
    }

    /// The same runner (same credential, same report sequences) on a second connection, to
    /// the server or replica at `url`.
    pub async fn clone_on(&self, url: &str) -> TestRunner {
        TestRunner {
            id: self.id.clone(),
            credential: self.credential.clone(),
            client: RunnerServiceClient::with_interceptor(
                channel(url).await,
                Bearer::new(&self.credential),
            ),
            seq: self.seq.clone(),
        }
    }

    /// Heartbeats every 500 ms (well inside the tests' 3 s lease) until the handle is
    /// aborted, saying it holds `held` (a heartbeat's `held` is the runner's whole account:
    /// attempts it leaves out are given up): the runner stays alive without reporting.
    pub fn keep_alive(&self, held: &[&pb::Assignment]) -> tokio::task::JoinHandle<()> {
        let mut client = self.client.clone();
        let held: Vec<pb::LeaseRef> = held.iter().map(|a| lease_ref(a)).collect();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let _ = client
                    .heartbeat(pb::HeartbeatRequest { held: held.clone() })
                    .await;
            }
        })
    }

    /// Next report sequence for a lease.
    pub fn next_seq(&self, lease: &str) -> u64 {
        let mut seq = self.seq.lock().expect("seq lock");
        let s = seq.entry(lease.to_string()).or_insert(0);
        *s += 1;
        *s
    }

    /// Long-poll claim of one job (waits up to 10 s per call, until PATIENCE).
    pub async fn claim_one(&mut self) -> pb::Assignment {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let resp = self
                .client
                .claim(pb::ClaimRequest {
                    max_jobs: 1,
                    wait_seconds: 10,
                })
                .await
                .expect("claim")
                .into_inner();
            if let Some(a) = resp.assignments.into_iter().next() {
                return a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no job was assigned"
            );
        }
    }

    /// Sends one report through ReportEvents with the next sequence.
    pub async fn report(
        &mut self,
        a: &pb::Assignment,
        body: pb::report::Body,
    ) -> Result<pb::ReportEventsResponse, Status> {
        let seq = self.next_seq(&a.lease_id);
        self.report_seq(&a.job_id, &a.lease_id, seq, body).await
    }

    /// Sends one report with an explicit sequence.
    pub async fn report_seq(
        &mut self,
        job_id: &str,
        lease_id: &str,
        sequence: u64,
        body: pb::report::Body,
    ) -> Result<pb::ReportEventsResponse, Status> {
        let report = pb::Report {
            job_id: job_id.into(),
            lease_id: lease_id.into(),
            sequence,
            body: Some(body),
        };
        self.client
            .report_events(tokio_stream::iter(vec![report]))
            .await
            .map(|r| r.into_inner())
    }

    /// Opens a Session with `free_slots` credits, holding `held` (see [`holding`]); returns
    /// the stream ends.
    pub async fn session(&mut self, free_slots: u32, held: Vec<pb::LeaseRef>) -> Session {
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Hello(pb::Hello {
                free_slots,
                held,
                ..Default::default()
            })),
        })
        .await
        .expect("queue hello");
        let inbound = self
            .client
            .session(ReceiverStream::new(rx))
            .await
            .expect("open session")
            .into_inner();
        let mut s = Session { tx, inbound };
        match s.next().await {
            pb::session_response::Kind::Welcome(_) => s,
            other => panic!("expected welcome, got {other:?}"),
        }
    }
}

/// An open Session stream.
pub struct Session {
    /// Runner → server.
    pub tx: mpsc::Sender<pb::SessionRequest>,
    /// Server → runner.
    pub inbound: tonic::Streaming<pb::SessionResponse>,
}

impl Session {
    /// The next server message (fails the test after PATIENCE).
    pub async fn next(&mut self) -> pb::session_response::Kind {
        match tokio::time::timeout(PATIENCE, self.inbound.message()).await {
            Ok(Ok(Some(pb::SessionResponse { kind: Some(k) }))) => k,
            Ok(Ok(other)) => panic!("session ended or empty message: {other:?}"),
            Ok(Err(e)) => panic!("session failed: {e}"),
            Err(_) => panic!("no session message within {PATIENCE:?}"),
        }
    }

    /// The next message, which must be an assignment.
    pub async fn next_assignment(&mut self) -> pb::Assignment {
        match self.next().await {
            pb::session_response::Kind::Assignment(a) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    /// Sends a message.
    pub async fn send(&self, kind: pb::session_request::Kind) {
        self.tx
            .send(pb::SessionRequest { kind: Some(kind) })
            .await
            .expect("session open");
    }

    /// Sends reports and returns the acks (skipping other messages, which are returned too).
    pub async fn report(&mut self, reports: Vec<pb::Report>) -> pb::ReportAcks {
        self.send(pb::session_request::Kind::Reports(pb::ReportBatch {
            reports,
        }))
        .await;
        loop {
            match self.next().await {
                pb::session_response::Kind::Acks(a) => return a,
                pb::session_response::Kind::Rejected(r) => panic!("report rejected: {r:?}"),
                _ => continue,
            }
        }
    }
}

/// The (job, lease) of an assignment, as `held` lists it.
pub fn lease_ref(a: &pb::Assignment) -> pb::LeaseRef {
    pb::LeaseRef {
        job_id: a.job_id.clone(),
        lease_id: a.lease_id.clone(),
    }
}

/// A report body: status change.
pub fn status(s: pb::JobStatus) -> pb::report::Body {
    pb::report::Body::Status(pb::StatusReport {
        status: s as i32,
        exit_code: matches!(s, pb::JobStatus::Succeeded).then_some(0),
        ..Default::default()
    })
}

/// A hello's `held` that lists the attempt of assignment `a`.
pub fn holding(a: &pb::Assignment) -> Vec<pb::LeaseRef> {
    vec![pb::LeaseRef {
        job_id: a.job_id.clone(),
        lease_id: a.lease_id.clone(),
    }]
}

/// A report body: stdout bytes at offset.
pub fn stdout(offset: u64, data: &[u8]) -> pb::report::Body {
    pb::report::Body::Log(pb::LogData {
        stream: pb::LogStream::Stdout as i32,
        offset,
        data: data.to_vec(),
    })
}

/// A report body: stderr bytes at offset.
pub fn stderr(offset: u64, data: &[u8]) -> pb::report::Body {
    pb::report::Body::Log(pb::LogData {
        stream: pb::LogStream::Stderr as i32,
        offset,
        data: data.to_vec(),
    })
}

/// A self-signed certificate for one host, as `tls.crt` and `tls.key` in a temp dir that
/// lives as long as this value.
pub struct TlsFiles {
    /// The certificate (PEM); also the CA a client trusts.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The certificate's PEM text.
    pub cert_pem: String,
    _dir: tempfile::TempDir,
}

impl TlsFiles {
    /// A certificate naming `host`.
    pub fn self_signed(host: &str) -> TlsFiles {
        let dir = tempfile::tempdir().expect("temp dir");
        let made = rcgen::generate_simple_self_signed(vec![host.to_string()]).expect("certificate");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let cert_pem = made.cert.pem();
        std::fs::write(&cert, &cert_pem).expect("write cert");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
        TlsFiles {
            cert,
            key,
            cert_pem,
            _dir: dir,
        }
    }

    /// Makes a server configuration serve TLS with this certificate.
    pub fn serve(&self, config: &mut Config) {
        config.tls_cert = Some(self.cert.clone());
        config.tls_key = Some(self.key.clone());
    }

    /// The certificate's path as a command-line argument.
    pub fn cert_arg(&self) -> &str {
        self.cert.to_str().expect("utf-8 temp path")
    }
}

/// SandboxService with the API token.
pub type Sandboxes = SandboxServiceClient<Authed>;

/// Creates a sandbox; returns it.
pub async fn create_sandbox(sandboxes: &mut Sandboxes, spec: pb::SandboxSpec) -> pb::Sandbox {
    sandboxes
        .create_sandbox(pb::CreateSandboxRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect("create sandbox")
        .into_inner()
        .sandbox
        .expect("sandbox")
}

/// Reads a sandbox.
pub async fn get_sandbox(sandboxes: &mut Sandboxes, id: &str) -> pb::Sandbox {
    sandboxes
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: id.into(),
        })
        .await
        .expect("get sandbox")
        .into_inner()
}

/// Deletes a sandbox; returns it as the answer shows it (DELETING, or DELETED).
pub async fn delete_sandbox(sandboxes: &mut Sandboxes, id: &str) -> pb::Sandbox {
    sandboxes
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: id.into(),
            reason: String::new(),
        })
        .await
        .expect("delete sandbox")
        .into_inner()
        .sandbox
        .expect("sandbox")
}

/// Accepts `argv` in the sandbox; returns the command.
pub async fn run_in(sandboxes: &mut Sandboxes, id: &str, argv: &[&str]) -> pb::SandboxCommand {
    run_command(
        sandboxes,
        id,
        pb::CommandSpec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        },
    )
    .await
}

/// Accepts a command in the sandbox; returns it.
pub async fn run_command(
    sandboxes: &mut Sandboxes,
    id: &str,
    command: pb::CommandSpec,
) -> pb::SandboxCommand {
    sandboxes
        .run_command(pb::RunCommandRequest {
            sandbox_id: id.into(),
            command: Some(command),
        })
        .await
        .expect("run command")
        .into_inner()
        .command
        .expect("command")
}

/// Reads a command.
pub async fn get_command(sandboxes: &mut Sandboxes, id: &str) -> pb::SandboxCommand {
    sandboxes
        .get_command(pb::GetCommandRequest {
            command_id: id.into(),
        })
        .await
        .expect("get command")
        .into_inner()
}

/// Follows a sandbox's events until `done` says so of one; returns every event seen.
pub async fn watch_sandbox_until(
    sandboxes: &mut Sandboxes,
    id: &str,
    what: &str,
    done: impl Fn(&pb::JobEvent) -> bool,
) -> Vec<pb::JobEvent> {
    let mut stream = sandboxes
        .watch_sandbox(pb::WatchSandboxRequest {
            sandbox_id: id.into(),
            after_sequence: 0,
            follow: true,
        })
        .await
        .expect("watch sandbox")
        .into_inner();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("sandbox {id}: never saw {what}; events: {seen:#?}"));
        let ev = match next {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => panic!("watch sandbox failed: {e}"),
            None => panic!("sandbox {id} ended before {what}; events: {seen:#?}"),
        };
        let hit = done(&ev);
        seen.push(ev);
        if hit {
            return seen;
        }
    }
}

/// Follows a sandbox's events until its lifecycle reaches `status`.
pub async fn wait_for_sandbox(
    sandboxes: &mut Sandboxes,
    id: &str,
    status: pb::SandboxStatus,
) -> Vec<pb::JobEvent> {
    watch_sandbox_until(
        sandboxes,
        id,
        status.as_str_name(),
        |ev| matches!(&ev.kind, Some(pb::job_event::Kind::Sandbox(c)) if c.to == status as i32),
    )
    .await
}

/// Follows a sandbox's events until its command `command` reaches `status`.
pub async fn wait_for_command(
    sandboxes: &mut Sandboxes,
    sandbox: &str,
    command: &str,
    status: pb::CommandStatus,
) -> pb::SandboxCommand {
    watch_sandbox_until(sandboxes, sandbox, status.as_str_name(), |ev| {
        matches!(&ev.kind, Some(pb::job_event::Kind::Command(c))
            if c.command_id == command && c.status == status as i32)
    })
    .await;
    get_command(sandboxes, command).await
}

/// The sandbox lifecycle steps among events, in order.
pub fn lifecycle(events: &[pb::JobEvent]) -> Vec<pb::SandboxStatus> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Sandbox(c)) => pb::SandboxStatus::try_from(c.to).ok(),
            _ => None,
        })
        .collect()
}

/// All stored output of a command, per stream.
pub async fn command_logs(sandboxes: &mut Sandboxes, id: &str) -> (Vec<u8>, Vec<u8>) {
    let stream = sandboxes
        .get_command_logs(pb::GetCommandLogsRequest {
            command_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("command logs")
        .into_inner();
    stdout_and_stderr(stream).await
}
