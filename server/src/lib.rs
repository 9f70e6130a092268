//! gantry-server: the gRPC job server.
//!
//! [`start`] opens the database (running migrations) and the blob store, starts the
//! background tasks (report ingester, reaper, health prober, replica notifications on
//! PostgreSQL) and serves `gantry.v1.{JobService, RunnerService, AdminService,
//! SandboxService, WorkService}`, `grpc.health.v1.Health` and server reflection on a
//! listener. [`RunningServer::shutdown`] stops it gracefully: followers and sessions end,
//! in-flight calls finish, the pool closes.
pub mod auth;
pub mod batch;
pub mod blobs;
pub mod capacity;
pub mod clock;
pub mod commands;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod jobs;
pub mod leases;
pub mod locks;
pub mod logs;
pub mod reaper;
pub mod replicas;
pub mod reports;
pub mod retention;
pub mod runners;
pub mod sandboxes;
pub mod service;
pub mod signals;
pub mod stats;
pub mod store;
pub mod work;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use gantry_proto as pb;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::{Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

pub use config::Config;

/// The composition root: everything the gRPC services need, built once by [`start`]. Domain
/// modules never see it; each takes only what it uses (the [`jobs::lifecycle::Env`] of a unit of
/// work, a database handle, a group-commit handle). Cheap to clone.
#[derive(Clone)]
pub struct App {
    /// Store, signal hub, clock and rules: what a unit of work needs.
    pub env: jobs::lifecycle::Env,
    /// The configuration the server started with.
    pub config: Arc<Config>,
    /// Token checks.
    pub auth: Arc<auth::Auth>,
    /// The group-committing report writer.
    pub ingester: reports::Ingester,
    /// The group-committing job submitter.
    pub submitter: jobs::submit::Submitter,
    /// The group-committing intake of sandbox commands.
    pub commands: sandboxes::Intake,
    /// The group-committing claimer (dispatch for every runner).
    pub claimer: dispatch::Claimer,
    /// The group-committing heartbeat writer.
    pub heartbeats: runners::heartbeats::Heartbeats,
    /// The group-committing session opener.
    pub openings: runners::sessions::Openings,
    /// Where blob bytes (artifacts, uploaded inputs) are.
    pub blobs: blobs::BlobStore,
    /// Becomes `true` when the server is stopping; long-lived streams end on it.
    pub shutdown: watch::Receiver<bool>,
}

impl App {
    /// What followers of a job's events or logs need.
    pub fn follow(&self) -> signals::Follow {
        signals::Follow {
            db: self.env.store.db().clone(),
            hub: self.env.hub.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Lease length, ms.
    pub fn lease_ms_u32(&self) -> u32 {
        self.config.lease_seconds.saturating_mul(1000)
    }

    /// How often runners heartbeat, ms: a third of the lease.
    pub fn heartbeat_ms(&self) -> u32 {
        (self.lease_ms_u32() / 3).max(1)
    }

    /// The same in whole seconds (at least 1), for runners that read only that field.
    pub fn heartbeat_seconds(&self) -> u32 {
        (self.config.lease_seconds / 3).max(1)
    }

    /// The sizes the server accepts, as runners are told.
    pub fn limits(&self) -> pb::Limits {
        pb::Limits {
            max_message_bytes: self.config.max_message_bytes,
            max_log_data_bytes: max_log_data_bytes(&self.config),
            max_held_leases: u32::try_from(leases::MAX_HELD).unwrap_or(u32::MAX),
            max_reports_per_call: u32::try_from(service::runner::MAX_REPORTS_PER_CALL)
                .unwrap_or(u32::MAX),
            session_silence_ms: self.heartbeat_ms().saturating_mul(2),
        }
    }
}

/// Largest log data of one report: 1 MiB, or half the message limit when that is smaller
/// (a report must fit in a message with room to spare).
fn max_log_data_bytes(config: &Config) -> u32 {
    let most = u32::try_from(logs::MAX_LOG_DATA_BYTES).unwrap_or(u32::MAX);
    most.min(config.max_message_bytes / 2)
}

/// A server started by [`start`].
pub struct RunningServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where the plaintext health-only listener is, when `health_listen` asked for one.
    pub health_addr: Option<SocketAddr>,
    /// The registration token in force (generated when the config had none).
    pub registration_token: String,
    /// The API tokens in force (one generated when the config had none).
    pub api_tokens: Vec<String>,
    shutdown: watch::Sender<bool>,
    grace_seconds: u64,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
    store: store::Store,
}

impl RunningServer {
    /// Stops accepting calls, ends streams, waits for in-flight calls, closes the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        // Streams of our own end on the shutdown signal; a client holding a stream we do not
        // control (e.g. Health/Watch) gets the grace period, then its connection is dropped.
        let mut serve = self.serve;
        let grace = Duration::from_secs(self.grace_seconds);
        let served = match tokio::time::timeout(grace, &mut serve).await {
            Ok(joined) => joined.context("server task panicked")?,
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "connections still open after the grace period; closing them"
                );
                serve.abort();
                Ok(())
            }
        };
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.store.close().await;
        served.context("gRPC server failed")
    }

    /// Waits until the server stops by itself (it only does on a transport error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.serve)
            .await
            .context("server task panicked")?
            .context("gRPC server failed")
    }
}

/// Starts a server on `listener` with `config`.
pub async fn start(mut config: Config, listener: TcpListener) -> anyhow::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let registration_token = match &config.registration_token {
        Some(t) if !t.is_empty() => t.clone(),
        _ => {
            let t = auth::random_token();
            tracing::warn!(token = %t, "no registration token configured; generated one for runners");
            config.registration_token = Some(t.clone());
            t
        }
    };
    config.api_tokens.retain(|t| !t.is_empty());
    if config.api_tokens.is_empty() {
        let t = auth::random_token();
        tracing::warn!(token = %t, "no API token configured; generated one for clients");
        config.api_tokens.push(t);
    }
    let api_tokens = config.api_tokens.clone();

    let store = store::Store::connect_with(&config.database_url, config.sqlite_synchronous)
        .await
        .with_context(|| format!("opening database {}", redact(&config.database_url)))?;
    let clock = clock::Clock::skewed(config.clock_skew_ms);
    if store.is_postgres() {
        // Replicas agree on lease times through the database's clock.
        let offset = clock
            .sync_with(&store)
            .await
            .context("reading the database's clock")?;
        tracing::info!(offset_ms = offset, "clock follows the database's");
    }
    // A result travels in one message: it is at most the message limit less some room.
    let most_result = u64::from(config.max_message_bytes).saturating_sub(4096);
    if config.max_result_bytes > most_result {
        tracing::info!(
            max_result_bytes = most_result,
            "--max-result-bytes lowered to fit within --max-message-bytes"
        );
        config.max_result_bytes = most_result;
    }
    let blobs = match config.s3() {
        Some(s3) => blobs::BlobStore::s3(&s3).context("configuring the S3 blob store")?,
        None => {
            let dir = config.local_blob_dir();
            blobs::BlobStore::local(&dir)
                .with_context(|| format!("opening the blob directory {}", dir.display()))?
        }
    };
    tracing::info!(store = blobs.describe(), "blob store");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ingester, ingest_rx) = reports::Ingester::channel(1024);
    let (submitter, submit_rx) = jobs::submit::Submitter::channel(4096);
    let (commands, command_rx) = sandboxes::Intake::channel(4096);
    let (claimer, claim_rx) = dispatch::Claimer::channel(4096);
    let (heartbeats, beat_rx) = runners::heartbeats::Heartbeats::channel(4096);
    let (openings, open_rx) = runners::sessions::Openings::channel(4096);
    let env = jobs::lifecycle::Env {
        store: store.clone(),
        hub: Arc::new(signals::Hub::default()),
        clock: clock.clone(),
        rules: jobs::lifecycle::Rules {
            lease_ms: i64::from(config.lease_seconds) * 1000,
            max_log_bytes_per_job: config.max_log_bytes_per_job,
            max_events_per_job: config.max_events_per_job,
            max_log_data_bytes: max_log_data_bytes(&config) as usize,
            max_message_bytes: config.max_message_bytes as usize,
        },
    };
    let app = App {
        env: env.clone(),
        auth: Arc::new(auth::Auth::new(&registration_token, &api_tokens)),
        config: Arc::new(config.clone()),
        ingester,
        submitter,
        commands,
        claimer,
        heartbeats,
        openings,
        blobs: blobs.clone(),
        shutdown: shutdown_rx.clone(),
    };
    reports::start(env.clone(), ingest_rx);
    jobs::submit::start(env.clone(), submit_rx);
    sandboxes::start(env.clone(), command_rx);
    dispatch::start_claimer(env.clone(), config.max_message_bytes as usize, claim_rx);
    runners::heartbeats::start(env.clone(), beat_rx);
    runners::sessions::start(env.clone(), open_rx);
    let reaping = reaper::Settings {
        interval: Duration::from_millis(config.reap_interval_ms),
        timeout_grace_ms: i64::from(config.timeout_grace_seconds) * 1000,
        retention_ms: i64::try_from(config.retention_seconds.saturating_mul(1000))
            .unwrap_or(i64::MAX),
        blob_grace_ms: i64::try_from(config.blob_grace_seconds.saturating_mul(1000))
            .unwrap_or(i64::MAX),
        blobs,
    };
    let mut tasks = vec![tokio::spawn(reaper::run(
        env.clone(),
        reaping,
        shutdown_rx.clone(),
    ))];
    if store.is_postgres() {
        tasks.push(tokio::spawn(replicas::run(
            store.clone(),
            env.hub.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(clock::follow_database(
            clock,
            store.clone(),
            shutdown_rx.clone(),
        )));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Health is known before the first call is accepted.
    let initial = set_health(&app, &health_reporter, None).await;
    health_reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let health_addr = match config.health_listen {
        Some(at) => {
            let (addr, task) = serve_health(at, health_service.clone(), shutdown_rx.clone())
                .await
                .with_context(|| format!("binding the health listener {at}"))?;
            tasks.push(task);
            Some(addr)
        }
        None => None,
    };
    tasks.push(tokio::spawn(probe_health(
        app.clone(),
        health_reporter,
        initial,
    )));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    let limit = config.max_message_bytes as usize;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let cert = tokio::fs::read(cert)
            .await
            .with_context(|| format!("reading TLS certificate {}", cert.display()))?;
        let key = tokio::fs::read(key)
            .await
            .with_context(|| format!("reading TLS key {}", key.display()))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .context("TLS configuration")?;
    }
    let router = builder
        .layer(service::status::RemapLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::job_service_server::JobServiceServer::new(service::jobs::JobApi(app.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            pb::runner_service_server::RunnerServiceServer::new(service::runner::RunnerApi(
                app.clone(),
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(service::admin::AdminApi(
                app.clone(),
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            pb::sandbox_service_server::SandboxServiceServer::new(service::sandbox::SandboxApi(
                app.clone(),
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            pb::work_service_server::WorkServiceServer::new(service::work::WorkApi(app.clone()))
                .max_decoding_message_size(limit),
        );
    let mut stop = shutdown_rx;
    // No Nagle: a session's small frames (an assignment, a cancel, an ack) go out at once
    // instead of waiting for the peer's delayed ACK (tens of milliseconds).
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let serve = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = crate::signals::stopped(&mut stop).await;
    }));
    tracing::info!(%addr, postgres = store.is_postgres(), "gantry-server listening");
    Ok(RunningServer {
        addr,
        health_addr,
        registration_token,
        api_tokens,
        shutdown: shutdown_tx,
        grace_seconds: config.shutdown_grace_seconds,
        serve,
        tasks,
        store,
    })
}

/// The health service name that is SERVING for as long as the process serves, whatever the
/// database says: for liveness checks, so that a database outage does not restart servers.
pub const LIVENESS: &str = "liveness";

/// Serves only `grpc.health.v1.Health`, in plaintext, on `at` until shutdown.
async fn serve_health(
    at: SocketAddr,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(at).await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = crate::signals::stopped(&mut stop).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the health listener failed");
        }
    });
    tracing::info!(%addr, "health listener (plaintext, grpc.health.v1 only)");
    Ok((addr, task))
}

/// Names the health service reports on besides the overall "".
const SERVICES: &[&str] = &[
    "",
    "gantry.v1.JobService",
    "gantry.v1.RunnerService",
    "gantry.v1.AdminService",
];

/// Keeps `grpc.health.v1` in step with the database: SERVING only while it answers.
async fn probe_health(
    app: App,
    reporter: tonic_health::server::HealthReporter,
    mut last: ServingStatus,
) {
    let mut shutdown = app.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = crate::signals::stopped(&mut shutdown) => {
                for name in SERVICES.iter().chain([&LIVENESS]) {
                    reporter.set_service_status(*name, ServingStatus::NotServing).await;
                }
                return;
            }
        }
        last = set_health(&app, &reporter, Some(last)).await;
    }
}

/// Pings the database and publishes the answer when it differs from `last`.
async fn set_health(
    app: &App,
    reporter: &tonic_health::server::HealthReporter,
    last: Option<ServingStatus>,
) -> ServingStatus {
    let status = if app.env.store.ping().await {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    if last != Some(status) {
        if status == ServingStatus::NotServing {
            tracing::warn!("database unreachable: health is NOT_SERVING");
        } else if last.is_some() {
            tracing::info!("database reachable again: health is SERVING");
        }
        for name in SERVICES {
            reporter.set_service_status(*name, status).await;
        }
    }
    status
}

/// A database URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
