//! gantry-server: the gRPC job server.
//!
//! [`start`] opens the database (running migrations), starts the background tasks (report
//! ingester, reaper, health prober, replica notifications on PostgreSQL) and serves
//! `gantry.v1.{JobService, RunnerService, AdminService}`, `grpc.health.v1.Health` and server
//! reflection on a listener. [`RunningServer::shutdown`] stops it gracefully: followers and
//! sessions end, in-flight calls finish, the pool closes.
pub mod auth;
pub mod batch;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod jobs;
pub mod leases;
pub mod lifecycle;
pub mod replicas;
pub mod reports;
pub mod runners;
pub mod service;
pub mod session;
pub mod store;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use gantry_proto as pb;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::{Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

pub use config::Config;

/// Everything a request handler or background task needs. Cheap to clone.
#[derive(Clone)]
pub struct App {
    /// The database.
    pub store: store::Store,
    /// Change signals (local, and across replicas on PostgreSQL).
    pub hub: Arc<events::Hub>,
    /// The configuration the server started with.
    pub config: Arc<Config>,
    /// Token checks.
    pub auth: Arc<auth::Auth>,
    /// The group-committing report writer.
    pub ingester: reports::Ingester,
    /// The group-committing job submitter.
    pub submitter: jobs::submit::Submitter,
    /// The group-committing claimer (dispatch for every runner).
    pub claimer: dispatch::Claimer,
    /// The group-committing heartbeat writer.
    pub heartbeats: leases::Heartbeats,
    /// Becomes `true` when the server is stopping; long-lived streams end on it.
    pub shutdown: watch::Receiver<bool>,
}

impl App {
    /// Lifecycle timing rules from the configuration.
    pub fn rules(&self) -> lifecycle::Rules {
        lifecycle::Rules {
            lease_ms: i64::from(self.config.lease_seconds) * 1000,
        }
    }
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

    let store = store::Store::connect(&config.database_url)
        .await
        .with_context(|| format!("opening database {}", redact(&config.database_url)))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ingester, ingest_rx) = reports::Ingester::channel(1024);
    let (submitter, submit_rx) = jobs::submit::Submitter::channel(4096);
    let (claimer, claim_rx) = dispatch::Claimer::channel(4096);
    let (heartbeats, beat_rx) = leases::Heartbeats::channel(4096);
    let app = App {
        store: store.clone(),
        hub: Arc::new(events::Hub::default()),
        auth: Arc::new(auth::Auth::new(&registration_token, &api_tokens)),
        config: Arc::new(config.clone()),
        ingester,
        submitter,
        claimer,
        heartbeats,
        shutdown: shutdown_rx.clone(),
    };
    reports::start(app.clone(), ingest_rx);
    jobs::submit::start(app.clone(), submit_rx);
    dispatch::start_claimer(app.clone(), claim_rx);
    leases::start_heartbeats(app.clone(), beat_rx);
    let mut tasks = vec![tokio::spawn(leases::run_reaper(app.clone()))];
    if store.is_postgres() {
        tasks.push(tokio::spawn(replicas::run(app.clone())));
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
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::job_service_server::JobServiceServer::new(
            service::jobs::JobApi(app.clone()),
        ))
        .add_service(pb::runner_service_server::RunnerServiceServer::new(
            service::runner::RunnerApi(app.clone()),
        ))
        .add_service(pb::admin_service_server::AdminServiceServer::new(
            service::admin::AdminApi(app.clone()),
        ));
    let mut stop = shutdown_rx;
    // No Nagle: a session's small frames (an assignment, a cancel, an ack) go out at once
    // instead of waiting for the peer's delayed ACK (tens of milliseconds).
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let serve = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = crate::events::stopped(&mut stop).await;
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
                let _ = crate::events::stopped(&mut stop).await;
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
            _ = crate::events::stopped(&mut shutdown) => {
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
    let status = if app.store.ping().await {
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
