//! The runner itself: registration, the one `Session` stream, and the work it holds.
//!
//! One task owns everything (jobs, credits, the outbox's sending side) and reacts to: server
//! messages, finished jobs, new reports, the heartbeat tick, signals, and the drain, idle and
//! reconnect timers. Sending never blocks that task: messages wait in a small control queue
//! (credits, acks, heartbeats, drain) or in the outbox (reports) until the stream has room,
//! so the runner always keeps reading what the server pushes (cancels above all).
//!
//! When the stream breaks, the work keeps running and reporting into the outbox; the runner
//! reconnects with jittered exponential backoff, says in `hello` which leases it still holds,
//! stops the work of any lease the server revoked meanwhile, and sends again everything the
//! server has not acknowledged.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use gantry_proto as pb;
use pb::{session_request::Kind as Out, session_response::Kind as In};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{
    Code, Status, Streaming,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    config::Config,
    executor::{Executors, Stop, StopReason, docker::DockerExecutor, process::ProcessExecutor},
    identity::{self, Identity, Registration},
    job,
    outbox::Outbox,
};

/// Messages queued toward the server on the stream.
const STREAM_BUFFER: usize = 32;
/// Report bytes sent in one batch.
const BATCH_BYTES: usize = 1024 * 1024;
/// Longest a connection attempt (and the wait for `welcome`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// What the runner is asked to do from outside (signals, or an embedding program).
#[derive(Clone, Debug)]
pub enum Signal {
    /// Take no new work, let running work finish within the drain grace, then leave.
    Drain(String),
    /// Stop running work now (graceful signal, then kill after each job's grace) and leave.
    StopNow(String),
}

/// How the runner ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Drained and deregistered.
    Drained,
    /// `--once`: the one job ended with this status (`None`: the lease was taken away; no
    /// job at all came before a drain or the idle timeout gives `Drained`).
    Once(Option<pb::JobStatus>),
}

impl Exit {
    /// The process exit code (see `gantry-runner --help`).
    pub fn code(self) -> u8 {
        match self {
            Exit::Drained | Exit::Once(Some(pb::JobStatus::Succeeded)) => 0,
            Exit::Once(Some(pb::JobStatus::Canceled)) => 3,
            Exit::Once(Some(pb::JobStatus::TimedOut)) => 4,
            Exit::Once(None) => 5,
            Exit::Once(Some(_)) => 1,
        }
    }
}

/// Jittered exponential backoff.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            next: BACKOFF_BASE,
            max,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_BASE;
    }

    /// The delay before the next attempt: between half and all of the current step.
    fn delay(&mut self) -> Duration {
        use rand::Rng as _;
        let step = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        let ms = step.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }
}

/// A job running here.
struct Running {
    job_id: String,
    stop: watch::Sender<Option<Stop>>,
    grace: Duration,
}

/// The runner is leaving (drain, `--once`, idle timeout).
struct Leaving {
    reason: String,
    /// When running work is stopped; `None` lets it finish (`--once`).
    stop_work_at: Option<Instant>,
    /// When the runner stops waiting for acknowledgements, once its work is done.
    give_up_at: Option<Instant>,
    /// The server has taken the drain in once this many heartbeats (queued after the
    /// `drain` on the current stream) are answered: every assignment it pushed before has
    /// arrived by then.
    sync_heartbeat: Option<u64>,
}

/// What woke the runner's loop. (Short-lived, one at a time: the size of a server message
/// inline costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
enum Event {
    Nothing,
    /// A server message, or the end of the stream (`None` / an error).
    Message(Option<Result<pb::SessionResponse, Status>>),
    Done(String, Option<pb::JobStatus>),
    Heartbeat,
    Signal(Signal),
    StopWork,
    Idle,
    GiveUp,
}

/// One open session.
struct Connection {
    tx: mpsc::Sender<pb::SessionRequest>,
    inbound: Streaming<pb::SessionResponse>,
}

/// A registered runner, ready to run.
pub struct Runner {
    config: Config,
    identity: Identity,
    channel: Channel,
    outbox: Arc<Outbox>,
    ctx: Arc<job::Context>,
    jobs: HashMap<String, Running>,
    done_tx: mpsc::UnboundedSender<(String, Option<pb::JobStatus>)>,
    done_rx: mpsc::UnboundedReceiver<(String, Option<pb::JobStatus>)>,
    control: VecDeque<Out>,
    leaving: Option<Leaving>,
    once_status: Option<Option<pb::JobStatus>>,
    idle_since: Instant,
    heartbeat_every: Duration,
    lease: Duration,
    /// Heartbeats queued and answered on the current stream (answers come in order).
    heartbeats_queued: u64,
    heartbeats_answered: u64,
}

fn endpoint(config: &Config) -> anyhow::Result<Endpoint> {
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
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = pb::runner_service_client::RunnerServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

fn client(channel: &Channel, token: &str) -> anyhow::Result<Client> {
    Ok(
        pb::runner_service_client::RunnerServiceClient::with_interceptor(
            channel.clone(),
            Bearer(bearer(token)?),
        ),
    )
}

impl Runner {
    /// Prepares a runner: executors (the Docker engine must answer if `docker` is offered),
    /// its identity (registering when there is none or the flags changed), and the removal of
    /// containers an earlier run of it left behind.
    pub async fn new(config: Config) -> anyhow::Result<Runner> {
        let channel = endpoint(&config)?.connect_lazy();
        let mut executors: Executors = Vec::new();
        let mut docker = None;
        if config.offers(pb::ExecutorKind::Docker) {
            let d = Arc::new(
                DockerExecutor::connect(Duration::from_secs(config.pull_timeout_seconds)).await?,
            );
            docker = Some(d.clone());
            executors.push(d);
        }
        if config.offers(pb::ExecutorKind::Process) {
            executors.push(Arc::new(ProcessExecutor::new(
                config.state_dir.join("work"),
            )));
        }
        anyhow::ensure!(
            !executors.is_empty(),
            "--executors must name at least one executor"
        );

        let registration = Registration {
            server: config.server.clone(),
            name: config.runner_name(),
            labels: config.label_map(),
            capacity: config.capacity,
            executors: executors
                .iter()
                .map(|e| e.kind().as_str_name().to_string())
                .collect(),
            queues: config.queue_list(),
        };
        let mut identity = identity::load(&config.state_dir)?.unwrap_or_default();
        if identity.runner_id.is_empty() || identity.registration != registration {
            register(&config, &channel, &mut identity, registration).await?;
        }
        if let Some(docker) = &docker {
            let removed = docker
                .remove_orphans(&identity.all_ids())
                .await
                .context("removing containers left behind by an earlier run")?;
            if removed > 0 {
                tracing::info!(removed, "removed containers left behind by an earlier run");
            }
        }
        let ctx = Arc::new(job::Context {
            outbox: Arc::new(Outbox::new(
                usize::try_from(config.buffer_bytes).unwrap_or(usize::MAX),
            )),
            executors,
            runner_id: identity.runner_id.clone(),
        });
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Runner {
            outbox: ctx.outbox.clone(),
            ctx,
            config,
            identity,
            channel,
            jobs: HashMap::new(),
            done_tx,
            done_rx,
            control: VecDeque::new(),
            leaving: None,
            once_status: None,
            idle_since: Instant::now(),
            heartbeat_every: Duration::from_secs(10),
            lease: Duration::from_secs(30),
            heartbeats_queued: 0,
            heartbeats_answered: 0,
        })
    }

    /// This runner's id.
    pub fn id(&self) -> &str {
        &self.identity.runner_id
    }

    fn free_slots(&self) -> u32 {
        if self.leaving.is_some() {
            return 0;
        }
        // `--once` takes one job whatever its capacity.
        let capacity = if self.config.once {
            1
        } else {
            self.config.capacity
        };
        capacity.saturating_sub(u32::try_from(self.jobs.len()).unwrap_or(u32::MAX))
    }

    /// Opens a session: hello, then the server's welcome.
    async fn connect(&mut self) -> anyhow::Result<Connection> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let hello = pb::Hello {
            free_slots: self.free_slots(),
            held: self.outbox.held(),
        };
        tx.try_send(pb::SessionRequest {
            kind: Some(Out::Hello(hello)),
        })
        .context("queueing hello")?;
        let mut client = client(&self.channel, &self.identity.credential)?;
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, client.session(ReceiverStream::new(rx)))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?;
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == Code::Unauthenticated => {
                tracing::warn!(%status, "the server does not know this runner's credential; registering anew");
                let registration = self.identity.registration.clone();
                register(
                    &self.config,
                    &self.channel,
                    &mut self.identity,
                    registration,
                )
                .await?;
                // Work from now on runs under the new id (work held under the old one is
                // lost to it anyway).
                self.ctx = Arc::new(job::Context {
                    outbox: self.outbox.clone(),
                    executors: self.ctx.executors.clone(),
                    runner_id: self.identity.runner_id.clone(),
                });
                anyhow::bail!("registered anew as {}", self.identity.runner_id);
            }
            Err(status) => return Err(status.into()),
        };
        let first = tokio::time::timeout(CONNECT_TIMEOUT, inbound.message())
            .await
            .map_err(|_| anyhow::anyhow!("no welcome within {CONNECT_TIMEOUT:?}"))??;
        let Some(pb::SessionResponse {
            kind: Some(In::Welcome(welcome)),
        }) = first
        else {
            anyhow::bail!("the server's first session message was not a welcome");
        };
        self.on_welcome(welcome);
        Ok(Connection { tx, inbound })
    }

    fn on_welcome(&mut self, w: pb::Welcome) {
        self.heartbeat_every = Duration::from_secs(u64::from(w.heartbeat_interval_seconds.max(1)));
        self.lease = Duration::from_secs(u64::from(w.lease_seconds.max(1)));
        for r in w.revoked {
            self.lease_lost(
                &r.lease_id,
                "the server revoked the lease while the runner was away",
            );
        }
        // What was queued for the previous stream: credits and heartbeats are superseded by
        // the hello, reports are sent again from the outbox; command acks still count.
        self.control.retain(|m| matches!(m, Out::CommandAck(_)));
        (self.heartbeats_queued, self.heartbeats_answered) = (0, 0);
        self.announce_leaving();
        self.outbox.resend_all();
        tracing::info!(runner = %self.identity.runner_id, held = self.jobs.len(), "session open");
    }

    /// Runs until the runner has drained (or its `--once` job is done), then deregisters.
    pub async fn run(mut self, mut signals: mpsc::Receiver<Signal>) -> anyhow::Result<Exit> {
        // The open session, if any: what goes to the server, what comes from it.
        let mut tx: Option<mpsc::Sender<pb::SessionRequest>> = None;
        let mut inbound: Option<Streaming<pb::SessionResponse>> = None;
        let mut last_heard = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(self.config.reconnect_max_ms));
        let mut retry_at = Instant::now();
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        let mut reports_pending = true;
        let mut signals_open = true;
        let outbox = self.outbox.clone();
        let far = Instant::now() + crate::executor::NEVER;

        let exit = loop {
            if let Some(exit) = self.finished() {
                break exit;
            }
            if tx.is_none() && Instant::now() >= retry_at {
                match self.connect().await {
                    Ok(c) => {
                        backoff.reset();
                        heartbeat = tokio::time::interval_at(
                            Instant::now() + self.heartbeat_every,
                            self.heartbeat_every,
                        );
                        reports_pending = true;
                        last_heard = Instant::now();
                        (tx, inbound) = (Some(c.tx), Some(c.inbound));
                    }
                    Err(e) => {
                        let delay = backoff.delay();
                        tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "cannot open a session");
                        retry_at = Instant::now() + delay;
                    }
                }
                continue;
            }
            let want_send = !self.control.is_empty() || reports_pending;
            let stop_work_at = self
                .leaving
                .as_ref()
                .and_then(|l| l.stop_work_at)
                .filter(|_| !self.jobs.is_empty())
                .unwrap_or(far);
            let give_up_at = self
                .leaving
                .as_ref()
                .and_then(|l| l.give_up_at)
                .unwrap_or(far);
            let idle_at = match self.config.idle_timeout_seconds {
                0 => far,
                _ if !self.jobs.is_empty() || self.leaving.is_some() => far,
                s => self.idle_since + Duration::from_secs(s),
            };
            let event = tokio::select! {
                msg = next_message(&mut inbound) => Event::Message(msg),
                permit = reserve(&tx), if want_send => match permit {
                    Some(permit) => {
                        if let Some(kind) = self.control.pop_front() {
                            permit.send(pb::SessionRequest { kind: Some(kind) });
                        } else {
                            let reports = outbox.take_unsent(BATCH_BYTES);
                            if reports.is_empty() {
                                reports_pending = false;
                            } else {
                                permit.send(pb::SessionRequest {
                                    kind: Some(Out::Reports(pb::ReportBatch { reports })),
                                });
                            }
                        }
                        Event::Nothing
                    }
                    None => Event::Message(None),
                },
                _ = outbox.changed() => {
                    reports_pending = true;
                    Event::Nothing
                }
                done = self.done_rx.recv() => match done {
                    Some((lease, status)) => Event::Done(lease, status),
                    None => Event::Nothing,
                },
                _ = heartbeat.tick(), if tx.is_some() => Event::Heartbeat,
                _ = tokio::time::sleep_until(retry_at), if tx.is_none() => Event::Nothing,
                signal = signals.recv(), if signals_open => match signal {
                    Some(s) => Event::Signal(s),
                    None => {
                        signals_open = false;
                        Event::Nothing
                    }
                },
                _ = tokio::time::sleep_until(stop_work_at) => Event::StopWork,
                _ = tokio::time::sleep_until(idle_at) => Event::Idle,
                _ = tokio::time::sleep_until(give_up_at) => Event::GiveUp,
            };
            match event {
                Event::Nothing => {}
                Event::Message(Some(Ok(m))) => {
                    last_heard = Instant::now();
                    if let Some(kind) = m.kind {
                        self.on_message(kind);
                    }
                }
                Event::Message(broken) => {
                    (tx, inbound) = (None, None);
                    let delay = backoff.delay();
                    match broken {
                        Some(Err(status)) => {
                            tracing::warn!(%status, retry_in = ?delay, "session broke; the work goes on")
                        }
                        _ => {
                            tracing::warn!(retry_in = ?delay, "the server closed the session; the work goes on")
                        }
                    }
                    retry_at = Instant::now() + delay;
                }
                Event::Done(lease, status) => self.on_done(&lease, status, tx.is_some()),
                Event::Heartbeat => {
                    // Every heartbeat is answered: two intervals of silence mean a dead
                    // connection (or a stuck server), well before the leases run out.
                    let silent = last_heard.elapsed();
                    if silent > (self.heartbeat_every * 2).max(Duration::from_secs(2)) {
                        tracing::warn!(
                            ?silent,
                            "no word from the server for two heartbeats; reconnecting"
                        );
                        (tx, inbound) = (None, None);
                        retry_at = Instant::now();
                    } else if !self.control.iter().any(|m| matches!(m, Out::Heartbeat(_))) {
                        self.queue_heartbeat();
                    }
                }
                Event::Signal(Signal::Drain(reason)) => self.drain(reason, false),
                Event::Signal(Signal::StopNow(reason)) => self.drain(reason, true),
                Event::StopWork => self.stop_all(),
                Event::Idle => {
                    let reason = format!("idle for {} s", self.config.idle_timeout_seconds);
                    self.drain(reason, false);
                }
                Event::GiveUp if self.jobs.is_empty() => {
                    let held = self.outbox.held().len();
                    tracing::error!(
                        held,
                        "leaving before the server acknowledged everything (it is unreachable or slow)"
                    );
                    break self.exit();
                }
                // Work came in after the clock started: it runs first.
                Event::GiveUp => {}
            }
        };
        drop((tx, inbound));
        self.deregister().await;
        Ok(exit)
    }

    fn exit(&self) -> Exit {
        match self.once_status {
            Some(status) if self.config.once => Exit::Once(status),
            _ => Exit::Drained,
        }
    }

    /// The runner may leave: it is leaving, the server has taken its drain in (so no
    /// assignment is still on its way), and its work is done and acknowledged.
    fn finished(&mut self) -> Option<Exit> {
        let answered = self.heartbeats_answered;
        let leaving = self.leaving.as_mut()?;
        if !self.jobs.is_empty() {
            leaving.give_up_at = None;
            return None;
        }
        let synced = leaving.sync_heartbeat.is_some_and(|n| answered >= n);
        if synced && self.outbox.is_empty() {
            return Some(self.exit());
        }
        if leaving.give_up_at.is_none() {
            leaving.give_up_at =
                Some(Instant::now() + Duration::from_secs(self.config.report_wait_seconds));
        }
        None
    }

    fn on_message(&mut self, kind: In) {
        match kind {
            In::Welcome(_) => tracing::warn!("ignoring a second welcome"),
            In::Assignment(a) => self.start(a),
            In::Command(c) => {
                match c.kind {
                    Some(pb::command::Kind::Cancel(cancel)) => {
                        if let Some(job) = self.jobs.get(&cancel.lease_id) {
                            tracing::info!(job = %job.job_id, reason = %cancel.reason, "cancel");
                            let grace = match cancel.grace_seconds {
                                0 => job.grace,
                                s => Duration::from_secs(u64::from(s)),
                            };
                            let message = if cancel.reason.is_empty() {
                                "canceled".to_string()
                            } else {
                                format!("canceled: {}", cancel.reason)
                            };
                            job::request_stop(
                                &job.stop,
                                Stop {
                                    reason: StopReason::Cancel,
                                    grace,
                                    message,
                                },
                            );
                        }
                    }
                    Some(pb::command::Kind::Drain(d)) => {
                        let reason = if d.reason.is_empty() {
                            "drain requested".to_string()
                        } else {
                            format!("drain requested: {}", d.reason)
                        };
                        self.drain(reason, false);
                    }
                    None => tracing::warn!(sequence = c.sequence, "a command of an unknown kind"),
                }
                self.control
                    .push_back(Out::CommandAck(pb::AckCommandRequest {
                        sequence: c.sequence,
                    }));
            }
            In::Acks(acks) => {
                for a in acks.acks {
                    self.outbox.ack(&a.lease_id, a.acked_sequence);
                }
            }
            In::Rejected(r) => {
                tracing::warn!(job = %r.job_id, code = r.code, message = %r.message, "the server refused a report");
                self.lease_lost(&r.lease_id, &r.message);
            }
            In::HeartbeatAck(h) => {
                self.heartbeats_answered += 1;
                for r in h.revoked {
                    self.lease_lost(&r.lease_id, "the server revoked the lease");
                }
            }
        }
    }

    fn start(&mut self, a: pb::Assignment) {
        let spec = a.spec.clone().unwrap_or_default();
        tracing::info!(job = %a.job_id, attempt = a.attempt, "assigned");
        if !self.outbox.open(&a.job_id, &a.lease_id) {
            tracing::warn!(job = %a.job_id, lease = %a.lease_id, "ignoring a second assignment of a lease already held");
            return;
        }
        let (stop, _) = watch::channel(None);
        self.jobs.insert(
            a.lease_id.clone(),
            Running {
                job_id: a.job_id.clone(),
                stop: stop.clone(),
                grace: job::grace(&spec),
            },
        );
        if self.config.once && self.leaving.is_none() {
            self.leaving = Some(Leaving {
                reason: "--once: took its one job".to_string(),
                stop_work_at: None,
                give_up_at: None,
                sync_heartbeat: None,
            });
            self.announce_leaving();
        }
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        let lease = a.lease_id.clone();
        let job_id = a.job_id.clone();
        tokio::spawn(async move {
            // Whatever happens to the job's task, its slot comes back.
            let status = match tokio::spawn(job::run(ctx, a, stop)).await {
                Ok(status) => status,
                Err(e) => {
                    tracing::error!(job = %job_id, error = %e, "the job's task failed");
                    None
                }
            };
            let _ = done.send((lease, status));
        });
    }

    /// A job task ended. `connected`: a session is open (otherwise the next hello counts the
    /// free slot, and the outbox sends the reports).
    fn on_done(&mut self, lease: &str, status: Option<pb::JobStatus>, connected: bool) {
        self.jobs.remove(lease);
        if self.jobs.is_empty() {
            self.idle_since = Instant::now();
        }
        if self.config.once && self.once_status.is_none() {
            self.once_status = Some(status);
        }
        if self.leaving.is_none() && connected {
            // The attempt's last reports go ahead of the credit for its slot, so the server
            // records the end of one job before it hands out the next.
            let reports = self.outbox.take_unsent(BATCH_BYTES);
            if !reports.is_empty() {
                self.control
                    .push_back(Out::Reports(pb::ReportBatch { reports }));
            }
            self.control
                .push_back(Out::Credits(pb::Credits { slots: 1 }));
        }
    }

    fn lease_lost(&mut self, lease: &str, why: &str) {
        self.outbox.drop_attempt(lease);
        if let Some(job) = self.jobs.get(lease) {
            tracing::warn!(job = %job.job_id, why, "lease lost: stopping the work, reporting nothing more");
            job::request_stop(
                &job.stop,
                Stop {
                    reason: StopReason::LeaseLost,
                    grace: job.grace,
                    message: why.to_string(),
                },
            );
        }
    }

    /// Takes no new work; running work may finish within the drain grace (`now`: none).
    fn drain(&mut self, reason: String, now: bool) {
        let at = Instant::now()
            + if now {
                Duration::ZERO
            } else {
                self.config.drain_grace()
            };
        match &mut self.leaving {
            Some(l) => {
                // Already leaving: a stop-now request (a second signal) stops the work at
                // once; a drain after `--once` took its job starts the drain grace.
                let when = if now {
                    Some(Instant::now())
                } else {
                    l.stop_work_at.or(Some(at))
                };
                if when != l.stop_work_at {
                    tracing::info!(%reason, "asked again to leave");
                }
                l.stop_work_at = when;
            }
            None => {
                tracing::info!(%reason, running = self.jobs.len(), grace = ?self.config.drain_grace(), "draining");
                self.leaving = Some(Leaving {
                    reason,
                    stop_work_at: Some(at),
                    give_up_at: None,
                    sync_heartbeat: None,
                });
                self.announce_leaving();
            }
        }
    }

    fn queue_heartbeat(&mut self) {
        self.heartbeats_queued += 1;
        self.control.push_back(Out::Heartbeat(pb::HeartbeatRequest {
            held: self.outbox.held(),
        }));
    }

    /// Tells the server (on the current stream) that the runner is leaving, followed by a
    /// heartbeat whose answer proves the server has taken it in.
    fn announce_leaving(&mut self) {
        let Some(reason) = self.leaving.as_ref().map(|l| l.reason.clone()) else {
            return;
        };
        self.control
            .push_back(Out::Drain(pb::SessionDrain { reason }));
        self.queue_heartbeat();
        let target = self.heartbeats_queued;
        if let Some(l) = &mut self.leaving {
            l.sync_heartbeat = Some(target);
        }
    }

    fn stop_all(&mut self) {
        let grace_s = self.config.drain_grace_seconds;
        let reason = self
            .leaving
            .as_ref()
            .map_or_else(String::new, |l| l.reason.clone());
        for job in self.jobs.values() {
            job::request_stop(
                &job.stop,
                Stop {
                    reason: StopReason::Drain,
                    grace: job.grace,
                    message: format!(
                        "the runner is leaving ({reason}) and the work did not finish within the drain grace of {grace_s} s"
                    ),
                },
            );
        }
        if let Some(l) = &mut self.leaving {
            // Stopped once; the jobs now end by their own grace.
            l.stop_work_at = Some(Instant::now() + crate::executor::NEVER);
        }
    }

    async fn deregister(&self) {
        let reason = self
            .leaving
            .as_ref()
            .map_or_else(|| "leaving".to_string(), |l| l.reason.clone());
        let result = async {
            let mut client = client(&self.channel, &self.identity.credential)?;
            let resp = tokio::time::timeout(
                CONNECT_TIMEOUT,
                client.deregister(pb::DeregisterRequest { reason }),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))??;
            anyhow::Ok(resp.into_inner())
        }
        .await;
        match result {
            Ok(r) => tracing::info!(released = r.released_attempts, "deregistered"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not deregister; the server will mark this runner offline when its heartbeats stop")
            }
        }
    }
}

async fn next_message(
    inbound: &mut Option<Streaming<pb::SessionResponse>>,
) -> Option<Result<pb::SessionResponse, Status>> {
    match inbound {
        Some(s) => s.next().await,
        None => futures::future::pending().await,
    }
}

async fn reserve(
    tx: &Option<mpsc::Sender<pb::SessionRequest>>,
) -> Option<mpsc::Permit<'_, pb::SessionRequest>> {
    match tx {
        Some(tx) => tx.reserve().await.ok(),
        None => futures::future::pending().await,
    }
}

/// Registers with the registration token, retrying while the server is unreachable, and
/// saves the new identity.
async fn register(
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
    fn exit_codes_follow_the_outcome() {
        assert_eq!(Exit::Drained.code(), 0);
        assert_eq!(Exit::Once(Some(pb::JobStatus::Succeeded)).code(), 0);
        assert_eq!(Exit::Once(Some(pb::JobStatus::Failed)).code(), 1);
        assert_eq!(Exit::Once(Some(pb::JobStatus::Canceled)).code(), 3);
        assert_eq!(Exit::Once(Some(pb::JobStatus::TimedOut)).code(), 4);
        assert_eq!(Exit::Once(None).code(), 5);
    }
}
