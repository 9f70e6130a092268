//! The runner itself: the one `Session` stream, and the work it holds.
//!
//! One task owns everything (jobs, the phase, credits, the outbox's sending side) and reacts
//! to: server messages, finished jobs, new reports, the heartbeat tick, signals, the phase's
//! deadline and the reconnect timer. Sending never blocks that task: messages wait in a small
//! control queue (credits, acks, heartbeats, drain) or in the outbox (reports) until the
//! stream has room, so the runner always keeps reading what the server pushes (cancels above
//! all).
//!
//! Sandboxes are held like jobs (a slot, a lease, a stop request); what is theirs alone —
//! their commands (`ExecCommand`), the cancels and lost leases of those commands, and the
//! runner's drain — is handed to their task ([`crate::sandbox`]).
//!
//! When the stream breaks, the work keeps running and reporting into the outbox; the runner
//! reconnects with jittered exponential backoff, says in `hello` which leases it still holds
//! (and whether it is leaving), stops the work of any lease the server revoked meanwhile,
//! and sends again everything the server has not acknowledged.
//!
//! This module does the I/O and the protocol's reactions; the rules live elsewhere, each in
//! one place: when the runner leaves and what leaving does, in [`crate::phase`] (this module
//! feeds it events and carries out its actions); how to reach the server and what a
//! session's end status means, in [`crate::connection`]; how large a batch of reports may
//! be, in [`crate::batching`]. How the server's answers are taken:
//! - a refused report ([`Rejection`]): malformed ones are dropped, ones not applied because
//!   of an earlier refusal are sent again, anything else means the lease is lost;
//! - a session ended with ABORTED: another process holds this runner's identity, so all
//!   work is lost and [`Runner::run`] fails; with UNAUTHENTICATED (here, or on `Deregister`):
//!   the credential is gone, so the runner registers anew (its old work is lost to it);
//!   with RESOURCE_EXHAUSTED or INVALID_ARGUMENT: batches shrink, down to dropping the one
//!   report at fault.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use gantry_proto as pb;
use pb::{session_request::Kind as Out, session_response::Kind as In};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::StreamExt as _;
use tonic::{Code, Status, Streaming, transport::Channel};

pub use crate::phase::Exit;
use crate::{
    batching::{Batching, Refusal},
    config::Config,
    connection::{self, Backoff, CallError, SessionEnd, Timing},
    executor::{Executors, Stop, StopReason, docker::DockerExecutor, process::ProcessExecutor},
    identity::{self, Identity, Registration},
    job,
    outbox::Outbox,
    phase::{self, Action, Event, Phase},
    relay::Relays,
    sandbox,
};

/// Longest a registration made while leaving may take (the runner is on its way out).
const REGISTER_ON_EXIT: Duration = Duration::from_secs(15);

/// What the runner is asked to do from outside (signals, or an embedding program).
#[derive(Clone, Debug)]
pub enum Signal {
    /// Take no new work, let running work finish within the drain grace, then leave.
    Drain(String),
    /// Stop running work now (graceful signal, then kill after each job's grace) and leave.
    StopNow(String),
}

/// A job (or a sandbox) running here.
struct Running {
    /// For the logs (a sandbox's id).
    job_id: String,
    /// Asks the job's task to stop (cancel, drain, lost lease).
    stop: watch::Sender<Option<Stop>>,
    /// The stop grace its spec asks for.
    grace: Duration,
    /// A sandbox's commands and drain go through this; `None` for a job.
    sandbox: Option<sandbox::Handle>,
}

/// How a refused report is taken, by the `ReportRejected` code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// INVALID_ARGUMENT: that one report is malformed. Drop it; the attempt goes on.
    Malformed,
    /// ABORTED: not applied only because an earlier report of the attempt in that batch was
    /// refused. Send it again.
    NotApplied,
    /// FAILED_PRECONDITION, PERMISSION_DENIED, NOT_FOUND or anything else: the lease is
    /// lost. Stop the work.
    LeaseLost,
}

impl Rejection {
    /// How to take a rejection with this gRPC code.
    pub fn of(code: i32) -> Rejection {
        match Code::from(code) {
            Code::InvalidArgument => Rejection::Malformed,
            Code::Aborted => Rejection::NotApplied,
            _ => Rejection::LeaseLost,
        }
    }
}

/// What woke the runner's loop. (Short-lived, one at a time: the size of a server message
/// inline costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
enum Wake {
    Nothing,
    /// A server message, or the end of the stream (`None` / an error).
    Message(Option<Result<pb::SessionResponse, Status>>),
    /// A job's task ended (its lease, its status).
    Done(String, Option<pb::JobStatus>),
    Heartbeat,
    Signal(Signal),
    /// The phase's deadline.
    Clock,
}

/// How `run` ends.
enum End {
    /// Leave: deregister, then return the exit.
    Exit {
        /// The runner's outcome.
        exit: Exit,
        /// Why it leaves (sent to `Deregister`).
        reason: String,
    },
    /// Fail with this message, without deregistering.
    Fail(String),
}

/// One open session.
struct Link {
    /// What goes to the server.
    tx: mpsc::Sender<pb::SessionRequest>,
    /// What comes from it.
    inbound: Streaming<pb::SessionResponse>,
    /// When the server was last heard: every heartbeat is answered, so two intervals of
    /// silence mean a dead connection (or a stuck server), well before the leases run out.
    last_heard: Instant,
    /// This session's heartbeat clock.
    heartbeat: tokio::time::Interval,
}

/// A registered runner, ready to run.
pub struct Runner {
    /// The flags it runs with.
    config: Config,
    /// The phase machine's settings, from `config`.
    rules: phase::Rules,
    /// Who the runner is to the server (replaced when it registers anew).
    identity: Identity,
    /// One channel for every call; connected lazily, reconnected by tonic.
    channel: Channel,
    /// Unacknowledged reports, and the account of the leases held.
    outbox: Arc<Outbox>,
    /// What job tasks share (rebuilt when the runner id changes).
    ctx: Arc<job::Context>,
    /// Running jobs by lease id.
    jobs: HashMap<String, Running>,
    /// Job tasks say here that they ended (the slot comes back).
    done_tx: mpsc::UnboundedSender<(String, Option<pb::JobStatus>)>,
    /// Where the loop hears it.
    done_rx: mpsc::UnboundedReceiver<(String, Option<pb::JobStatus>)>,
    /// Messages waiting for room on the stream, ahead of reports.
    control: VecDeque<Out>,
    /// Where the runner is in its life (see [`crate::phase`]).
    phase: Phase,
    /// Set by an action that ends the run; the loop stops at the next turn.
    end: Option<End>,
    /// Heartbeat interval and lease length, from the welcome.
    timing: Timing,
    /// How many reports go in one batch.
    batching: Batching,
    /// Heartbeats queued and answered on the current stream (answers come in order): the
    /// phase machine proves the drain taken in by them.
    heartbeats_queued: u64,
    /// See `heartbeats_queued`.
    heartbeats_answered: u64,
}

impl Runner {
    /// Prepares a runner: executors (the Docker engine must answer if `docker` is offered),
    /// its identity (registering when there is none or the flags changed), and the removal of
    /// containers an earlier run of it left behind.
    pub async fn new(config: Config) -> anyhow::Result<Runner> {
        use anyhow::Context as _;
        let channel = connection::endpoint(&config)?.connect_lazy();
        let mut executors: Executors = Vec::new();
        let mut docker = None;
        if config.offers(pb::ExecutorKind::Docker) {
            let gantry = match config.gantry_binary()? {
                Some(source) => {
                    let staged =
                        DockerExecutor::stage_gantry_binary(&source, &config.state_dir.join("bin"))
                            .await
                            .with_context(|| {
                                format!(
                                    "copying the gantry binary {} into {}",
                                    source.display(),
                                    config.state_dir.display()
                                )
                            })?;
                    tracing::info!(binary = %source.display(), "containers get the gantry binary at {}", crate::executor::docker::GANTRY_IN_CONTAINER);
                    Some(staged)
                }
                None => {
                    tracing::info!(
                        "no gantry binary for containers (--gantry-binary, or `gantry` beside the runner): work in containers cannot run `gantry job …` unless its image has it"
                    );
                    None
                }
            };
            let d = Arc::new(
                DockerExecutor::connect(Duration::from_secs(config.pull_timeout_seconds))
                    .await?
                    .with_files(gantry, config.state_dir.join("transit"))
                    .with_max_transit_bytes(config.max_artifact_transit_bytes),
            );
            docker = Some(d.clone());
            executors.push(d);
        }
        if config.offers(pb::ExecutorKind::Process) {
            let process = ProcessExecutor::new(config.state_dir.join("work"));
            let removed = process.remove_orphan_workspaces().await;
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed sandbox workspaces left behind by an earlier run"
                );
            }
            executors.push(Arc::new(process));
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
            sandboxes: true,
        };
        let mut identity = identity::load(&config.state_dir)?.unwrap_or_default();
        if identity::must_register(
            &identity,
            &registration,
            config.registration_token.is_some(),
        ) {
            connection::register(&config, &channel, &mut identity, registration).await?;
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
        // Work endpoints and files in transit an earlier run left behind (it held no work
        // that is still this runner's).
        let relays = Relays::new(channel.clone(), config.state_dir.join("relay"));
        relays.remove_leftovers().await;
        match tokio::fs::remove_dir_all(config.state_dir.join("transit")).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "removing files in transit left behind"),
        }
        let ctx = Arc::new(job::Context {
            outbox: Arc::new(Outbox::new(
                usize::try_from(config.buffer_bytes).unwrap_or(usize::MAX),
            )),
            executors,
            runner_id: identity.runner_id.clone(),
            relays,
        });
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let rules = phase::Rules {
            once: config.once,
            drain_grace: config.drain_grace(),
            report_wait: Duration::from_secs(config.report_wait_seconds),
            idle_timeout: match config.idle_timeout_seconds {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
        };
        Ok(Runner {
            outbox: ctx.outbox.clone(),
            ctx,
            config,
            rules,
            identity,
            channel,
            jobs: HashMap::new(),
            done_tx,
            done_rx,
            control: VecDeque::new(),
            phase: Phase::start(Instant::now()),
            end: None,
            timing: Timing::default(),
            batching: Batching::default(),
            heartbeats_queued: 0,
            heartbeats_answered: 0,
        })
    }

    /// This runner's id.
    pub fn id(&self) -> &str {
        &self.identity.runner_id
    }

    /// Runs until the runner has drained (or its `--once` job is done), then deregisters.
    /// Fails when another process took over this runner's identity.
    pub async fn run(mut self, mut signals: mpsc::Receiver<Signal>) -> anyhow::Result<Exit> {
        // The open session, if any.
        let mut link: Option<Link> = None;
        let mut backoff = Backoff::new(Duration::from_millis(self.config.reconnect_max_ms));
        let mut retry_at = Instant::now();
        // Reports may be waiting in the outbox (false once it had nothing to give).
        let mut reports_pending = true;
        let mut signals_open = true;
        let outbox = self.outbox.clone();
        let far = Instant::now() + crate::executor::NEVER;

        let end = loop {
            // Acknowledgements may have emptied the outbox: the phase says whether to leave.
            self.step(Event::Clock, link.is_some());
            if let Some(end) = self.end.take() {
                break end;
            }
            if link.is_none() && self.phase.connects() && Instant::now() >= retry_at {
                match self.connect().await {
                    Ok(l) => {
                        backoff.reset();
                        reports_pending = true;
                        link = Some(l);
                        self.step(Event::SessionOpened, true);
                    }
                    Err(e) => {
                        let delay = backoff.delay();
                        tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "cannot open a session");
                        retry_at = Instant::now() + delay;
                    }
                }
                continue;
            }
            let connected = link.is_some();
            let want_send = !self.control.is_empty() || reports_pending;
            let deadline =
                phase::deadline(&self.phase, &self.rules, &self.facts(connected)).unwrap_or(far);
            let reconnects = !connected && self.phase.connects();
            let (tx, inbound, heartbeat) = match &mut link {
                Some(Link {
                    tx,
                    inbound,
                    heartbeat,
                    ..
                }) => (Some(&*tx), Some(inbound), Some(heartbeat)),
                None => (None, None, None),
            };
            let wake = tokio::select! {
                msg = next_message(inbound) => Wake::Message(msg),
                permit = reserve(tx), if want_send => match permit {
                    Some(permit) => {
                        if let Some(kind) = self.control.pop_front() {
                            permit.send(pb::SessionRequest { kind: Some(kind) });
                        } else if let Some(reports) = self.next_batch() {
                            permit.send(pb::SessionRequest {
                                kind: Some(Out::Reports(pb::ReportBatch { reports })),
                            });
                        } else {
                            reports_pending = false;
                        }
                        Wake::Nothing
                    }
                    None => Wake::Message(None),
                },
                _ = outbox.changed() => {
                    reports_pending = true;
                    Wake::Nothing
                }
                done = self.done_rx.recv() => match done {
                    Some((lease, status)) => Wake::Done(lease, status),
                    None => Wake::Nothing,
                },
                _ = tick(heartbeat) => Wake::Heartbeat,
                _ = tokio::time::sleep_until(retry_at), if reconnects => Wake::Nothing,
                signal = signals.recv(), if signals_open => match signal {
                    Some(s) => Wake::Signal(s),
                    None => {
                        signals_open = false;
                        Wake::Nothing
                    }
                },
                _ = tokio::time::sleep_until(deadline) => Wake::Clock,
            };
            match wake {
                Wake::Nothing | Wake::Clock => {}
                Wake::Message(Some(Ok(m))) => {
                    if let Some(l) = &mut link {
                        l.last_heard = Instant::now();
                    }
                    // An answer may free the next one-report batch.
                    reports_pending = true;
                    if let Some(kind) = m.kind {
                        self.on_message(kind);
                    }
                }
                Wake::Message(ended) => {
                    link = None;
                    let status = match ended {
                        Some(Err(status)) => Some(status),
                        _ => None,
                    };
                    retry_at = self.on_session_end(status, &mut backoff).await;
                }
                Wake::Done(lease, status) => self.on_done(&lease, status, connected),
                Wake::Heartbeat => {
                    let silent = link.as_ref().map(|l| l.last_heard.elapsed());
                    if let Some(silent) = silent
                        && silent > (self.timing.heartbeat_every * 2).max(Duration::from_secs(2))
                    {
                        tracing::warn!(
                            ?silent,
                            "no word from the server for two heartbeats; reconnecting"
                        );
                        link = None;
                        retry_at = Instant::now();
                    } else if !self.control.iter().any(|m| matches!(m, Out::Heartbeat(_))) {
                        self.queue_heartbeat();
                    }
                }
                Wake::Signal(Signal::Drain(reason)) => self.step(Event::Drain(reason), connected),
                Wake::Signal(Signal::StopNow(reason)) => {
                    self.step(Event::StopNow(reason), connected)
                }
            }
        };
        drop(link);
        match end {
            End::Exit { exit, reason } => {
                self.deregister(reason).await;
                Ok(exit)
            }
            End::Fail(message) => Err(anyhow::anyhow!(message)),
        }
    }

    /// What the phase machine needs to know now.
    fn facts(&self, connected: bool) -> phase::Facts {
        phase::Facts {
            now: Instant::now(),
            jobs_running: self.jobs.len(),
            outbox_empty: self.outbox.is_empty(),
            connected,
            next_heartbeat: self.heartbeats_queued + 1,
        }
    }

    /// Feeds an event to the phase machine and carries out its actions.
    fn step(&mut self, event: Event, connected: bool) {
        if self.end.is_some() {
            return;
        }
        let facts = self.facts(connected);
        let asked_again = match &event {
            Event::Drain(why) | Event::StopNow(why) if self.phase.leave().is_some() => {
                Some(why.clone())
            }
            _ => None,
        };
        let step = phase::transition(&self.phase, &self.rules, event, &facts);
        if let Some(why) = asked_again {
            tracing::info!(reason = %why, "asked again to leave");
        }
        let previous = std::mem::replace(&mut self.phase, step.next);
        let reason = previous
            .leave()
            .or(self.phase.leave())
            .map(|l| l.reason.clone());
        if previous.name() != self.phase.name() {
            tracing::info!(
                from = previous.name(),
                to = self.phase.name(),
                reason = reason.as_deref().unwrap_or(""),
                running = self.jobs.len(),
                grace = ?self.rules.drain_grace,
                "runner phase"
            );
        }
        for action in step.actions {
            match action {
                Action::AnnounceDrain(reason) => {
                    self.control
                        .push_back(Out::Drain(pb::SessionDrain { reason }));
                    // Numbered `facts.next_heartbeat`: its answer proves the drain taken in.
                    self.queue_heartbeat();
                }
                Action::StopAllWork(message) => self.stop_all(&message),
                Action::LoseAllWork(why) => {
                    tracing::error!("{why}: stopping all work as lost");
                    self.lose_all_work(&why);
                }
                Action::Exit { exit, acknowledged } => {
                    if !acknowledged {
                        tracing::error!(
                            held = self.outbox.held().len(),
                            "leaving before the server acknowledged everything (it is unreachable or slow)"
                        );
                    }
                    self.end = Some(End::Exit {
                        exit,
                        reason: reason.clone().unwrap_or_else(|| "leaving".to_string()),
                    });
                }
                Action::Fail(message) => self.end = Some(End::Fail(message)),
            }
        }
        if let Some(reason) = self.sandbox_drain() {
            for handle in self.jobs.values().filter_map(|j| j.sandbox.as_ref()) {
                handle.drain(&reason);
            }
        }
    }

    /// Why sandboxes drain, once they do: the runner is draining (a `--once` runner whose
    /// one job is a sandbox keeps it until its end, as it would a job).
    fn sandbox_drain(&self) -> Option<String> {
        match &self.phase {
            Phase::Draining(leave) => Some(leave.reason.clone()),
            _ => None,
        }
    }

    /// Opens a session: hello, then the server's welcome. A credential the server does not
    /// know makes the runner register anew (and try again later).
    async fn connect(&mut self) -> anyhow::Result<Link> {
        let hello = hello(&self.phase, self.free_slots(), self.outbox.held());
        match connection::open(&self.channel, &self.identity.credential, hello).await {
            Ok(session) => {
                self.on_welcome(session.welcome);
                let every = self.timing.heartbeat_every;
                Ok(Link {
                    tx: session.tx,
                    inbound: session.inbound,
                    last_heard: Instant::now(),
                    heartbeat: tokio::time::interval_at(Instant::now() + every, every),
                })
            }
            Err(CallError::Unauthenticated(status)) => {
                tracing::warn!(%status, "the server does not know this runner's credential; registering anew");
                self.register_anew().await?;
                anyhow::bail!("registered anew as {}", self.identity.runner_id);
            }
            Err(CallError::Other(e)) => Err(e),
        }
    }

    fn on_welcome(&mut self, w: pb::Welcome) {
        self.timing = Timing::from_welcome(&w);
        self.batching.set_limits(w.limits.as_ref());
        self.ctx.relays.set_limits(w.limits.as_ref());
        self.batching.session_opened(Instant::now());
        self.outbox
            .set_max_log_report(w.limits.as_ref().map_or(0, |l| {
                usize::try_from(l.max_log_data_bytes).unwrap_or(usize::MAX)
            }));
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
        self.outbox.resend_all();
        tracing::info!(
            runner = %self.identity.runner_id,
            held = self.jobs.len(),
            heartbeat = ?self.timing.heartbeat_every,
            lease = ?self.timing.lease,
            "session open"
        );
    }

    /// A session ended (`status`: how, if the server said). Returns when to reconnect.
    async fn on_session_end(&mut self, status: Option<Status>, backoff: &mut Backoff) -> Instant {
        let end = SessionEnd::of(status.as_ref());
        let refusal = match end {
            SessionEnd::Broken => {
                let delay = backoff.delay();
                match &status {
                    Some(status) => {
                        tracing::warn!(%status, retry_in = ?delay, "session broke; the work goes on")
                    }
                    None => {
                        tracing::warn!(retry_in = ?delay, "the server closed the session; the work goes on")
                    }
                }
                return Instant::now() + delay;
            }
            SessionEnd::Replaced => {
                self.step(Event::Replaced, false);
                return Instant::now();
            }
            SessionEnd::Unauthenticated => {
                tracing::warn!(
                    status = %status.as_ref().map_or_else(String::new, ToString::to_string),
                    "the server no longer accepts this runner's credential (revoked, or the runner was deleted); registering anew"
                );
                return match self.register_anew().await {
                    Ok(()) => Instant::now(),
                    Err(e) => {
                        let delay = backoff.delay();
                        tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "cannot register anew");
                        Instant::now() + delay
                    }
                };
            }
            SessionEnd::TooLarge => Refusal::TooLarge,
            SessionEnd::Undecodable => Refusal::Undecodable,
        };
        let status = status.map_or_else(String::new, |s| s.to_string());
        let outbox = &self.outbox;
        match self
            .batching
            .refused(refusal, |r| outbox.awaits_ack(&r.lease_id, r.sequence))
        {
            Some(culprit) => {
                outbox.drop_report(&culprit.lease_id, culprit.sequence);
                tracing::error!(
                    job = %culprit.job_id,
                    lease = %culprit.lease_id,
                    sequence = culprit.sequence,
                    %status,
                    "the server ended the session over this one report: dropping it (the attempt goes on)"
                );
            }
            None => tracing::warn!(
                %status,
                one_report_per_batch = self.batching.single(),
                "the server ended the session over what the runner sent: sending smaller batches"
            ),
        }
        Instant::now() + backoff.delay()
    }

    /// Registers anew (the server no longer accepts the credential) and carries on under the
    /// new identity; work held under the old one is lost to it.
    async fn register_anew(&mut self) -> anyhow::Result<()> {
        let registration = self.identity.registration.clone();
        connection::register(
            &self.config,
            &self.channel,
            &mut self.identity,
            registration,
        )
        .await?;
        // Work from now on runs under the new id.
        self.ctx = Arc::new(job::Context {
            outbox: self.outbox.clone(),
            executors: self.ctx.executors.clone(),
            runner_id: self.identity.runner_id.clone(),
            relays: self.ctx.relays.clone(),
        });
        self.lose_all_work("the runner registered anew; work held under its old identity is lost");
        Ok(())
    }

    fn free_slots(&self) -> u32 {
        if !self.phase.takes_work() {
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

    /// The next batch of reports within the budget, if any may go now.
    fn next_batch(&mut self) -> Option<Vec<pb::Report>> {
        let outbox = &self.outbox;
        let budget = self.batching.budget(Instant::now(), |r| {
            outbox.awaits_ack(&r.lease_id, r.sequence)
        })?;
        let reports = outbox.take_unsent(budget);
        if reports.is_empty() {
            return None;
        }
        self.batching.sent(&reports);
        Some(reports)
    }

    fn on_message(&mut self, kind: In) {
        match kind {
            In::Welcome(_) => tracing::warn!("ignoring a second welcome"),
            In::Assignment(a) => {
                if self.start(a) {
                    self.step(Event::JobTaken, true);
                }
            }
            In::Command(c) => {
                match c.kind {
                    Some(pb::command::Kind::Cancel(cancel)) => self.cancel(&cancel),
                    Some(pb::command::Kind::Exec(exec)) => self.exec(exec),
                    Some(pb::command::Kind::Drain(d)) => {
                        // The operator's reason as given: the runner announces it in its
                        // hellos, and the server takes at most what it let the operator give.
                        let reason = if d.reason.is_empty() {
                            "drain requested".to_string()
                        } else {
                            d.reason
                        };
                        self.step(Event::Drain(reason), true);
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
            In::Rejected(r) => self.on_rejected(&r),
            In::HeartbeatAck(h) => {
                self.heartbeats_answered += 1;
                self.step(Event::HeartbeatsAnswered(self.heartbeats_answered), true);
                for r in h.revoked {
                    self.lease_lost(&r.lease_id, "the server revoked the lease");
                }
            }
        }
    }

    fn cancel(&mut self, cancel: &pb::CancelCommand) {
        let Some(job) = self.jobs.get(&cancel.lease_id) else {
            if let Some(sandbox) = self.sandbox_of_command(&cancel.lease_id) {
                sandbox.cancel(cancel.clone());
            }
            return;
        };
        tracing::info!(job = %job.job_id, reason = %cancel.reason, "cancel");
        let grace = match cancel.grace_seconds {
            0 => job.grace,
            s => Duration::from_secs(u64::from(s)),
        };
        job::request_stop(
            &job.stop,
            Stop {
                reason: StopReason::Cancel,
                grace,
                message: job::cancel_message(cancel),
            },
        );
    }

    /// Hands a command to the sandbox it names; one that cannot run here (the runner does
    /// not hold that sandbox, e.g. after a restart) ends FAILED EXECUTOR_ERROR at once.
    fn exec(&mut self, exec: pb::ExecCommand) {
        if !self
            .outbox
            .open_within(&exec.sandbox_lease_id, &exec.command_id, &exec.lease_id)
        {
            tracing::warn!(command = %exec.command_id, lease = %exec.lease_id, "ignoring a second delivery of a command already held");
            return;
        }
        let sandbox = self
            .jobs
            .get(&exec.sandbox_lease_id)
            .filter(|j| j.job_id == exec.sandbox_id)
            .and_then(|j| j.sandbox.as_ref());
        let (exec, why) = match sandbox {
            Some(sandbox) => match sandbox.exec(Box::new(exec)) {
                Ok(()) => return,
                Err((exec, why)) => (*exec, why.to_string()),
            },
            None => {
                let why = format!(
                    "this runner does not hold sandbox {} under lease {} (it may have restarted since)",
                    exec.sandbox_id, exec.sandbox_lease_id
                );
                (exec, why)
            }
        };
        sandbox::refuse(self.outbox.clone(), exec, why);
    }

    /// The sandbox a command's lease belongs to, while the command is held.
    fn sandbox_of_command(&self, lease: &str) -> Option<&sandbox::Handle> {
        let sandbox_lease = self.outbox.within(lease)?;
        self.jobs.get(&sandbox_lease)?.sandbox.as_ref()
    }

    /// The server refused a report. The rejection names the attempt, not the report: it is
    /// about the attempt's oldest report sent and not acknowledged (the server answers a
    /// batch's acknowledgements first, and refuses the rest of an attempt's batch after the
    /// first refusal, in order).
    fn on_rejected(&mut self, r: &pb::ReportRejected) {
        // The refused report: named by the server, or (an older server) the attempt's oldest
        // sent one — rejections of an attempt come in the order of its reports.
        let refused = || match r.sequence {
            0 => self.outbox.first_sent(&r.lease_id),
            n => Some(n),
        };
        match Rejection::of(r.code) {
            Rejection::Malformed => match refused() {
                Some(sequence) => {
                    self.outbox.drop_report(&r.lease_id, sequence);
                    tracing::error!(
                        job = %r.job_id,
                        lease = %r.lease_id,
                        sequence,
                        message = %r.message,
                        "the server refused a report as malformed: dropping it (the attempt goes on)"
                    );
                }
                None => {
                    tracing::warn!(job = %r.job_id, lease = %r.lease_id, message = %r.message, "the server refused a report no longer held")
                }
            },
            Rejection::NotApplied => {
                if let Some(sequence) = refused() {
                    tracing::debug!(job = %r.job_id, sequence, message = %r.message, "report not applied; sending it again");
                    self.outbox.mark_unsent(&r.lease_id, sequence);
                }
            }
            Rejection::LeaseLost => {
                tracing::warn!(job = %r.job_id, code = r.code, message = %r.message, "the server refused a report");
                self.lease_lost(&r.lease_id, &r.message);
            }
        }
    }

    /// Starts an assignment. Returns false when it was a duplicate (nothing changes).
    fn start(&mut self, a: pb::Assignment) -> bool {
        let spec = a.spec.clone().unwrap_or_default();
        tracing::info!(job = %a.job_id, attempt = a.attempt, sandbox = a.sandbox, "assigned");
        if !self.outbox.open(&a.job_id, &a.lease_id) {
            tracing::warn!(job = %a.job_id, lease = %a.lease_id, "ignoring a second assignment of a lease already held");
            return false;
        }
        let (stop, _) = watch::channel(None);
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        let lease = a.lease_id.clone();
        let job_id = a.job_id.clone();
        let (sandbox, task): (_, futures::future::BoxFuture<'static, _>) = if a.sandbox {
            let (handle, inbox) = sandbox::channel(self.sandbox_drain());
            (
                Some(handle),
                Box::pin(sandbox::run(ctx, a, stop.clone(), inbox)),
            )
        } else {
            (None, Box::pin(job::run(ctx, a, stop.clone())))
        };
        self.jobs.insert(
            lease.clone(),
            Running {
                job_id: job_id.clone(),
                stop,
                grace: job::grace(&spec),
                sandbox,
            },
        );
        tokio::spawn(async move {
            // Whatever happens to the job's task, its slot comes back.
            let status = match tokio::spawn(task).await {
                Ok(status) => status,
                Err(e) => {
                    tracing::error!(job = %job_id, error = %e, "the job's task failed");
                    None
                }
            };
            let _ = done.send((lease, status));
        });
        true
    }

    /// A job task ended. `connected`: a session is open (otherwise the next hello counts the
    /// free slot, and the outbox sends the reports).
    fn on_done(&mut self, lease: &str, status: Option<pb::JobStatus>, connected: bool) {
        self.jobs.remove(lease);
        self.step(Event::JobEnded(status), connected);
        if self.phase.takes_work() && connected {
            // The attempt's last reports go ahead of the credit for its slot, so the server
            // records the end of one job before it hands out the next. (In one-report mode
            // a report still unanswered holds them back: the credit goes alone.)
            if let Some(reports) = self.next_batch() {
                self.control
                    .push_back(Out::Reports(pb::ReportBatch { reports }));
            }
            self.control
                .push_back(Out::Credits(pb::Credits { slots: 1 }));
        }
    }

    fn lease_lost(&mut self, lease: &str, why: &str) {
        // A sandbox's command: its sandbox stops it.
        if let Some(sandbox) = self.sandbox_of_command(lease) {
            sandbox.lost(lease);
        }
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

    /// Every lease is lost: stop all work and forget every report.
    fn lose_all_work(&mut self, why: &str) {
        let mut leases: Vec<String> = self.jobs.keys().cloned().collect();
        leases.extend(self.outbox.leases());
        for lease in leases {
            self.lease_lost(&lease, why);
        }
    }

    fn queue_heartbeat(&mut self) {
        self.heartbeats_queued += 1;
        self.control.push_back(Out::Heartbeat(pb::HeartbeatRequest {
            held: self.outbox.held(),
        }));
    }

    fn stop_all(&mut self, message: &str) {
        for job in self.jobs.values() {
            job::request_stop(
                &job.stop,
                Stop {
                    reason: StopReason::Drain,
                    grace: job.grace,
                    message: message.to_string(),
                },
            );
        }
    }

    /// Says the runner leaves. A credential the server no longer accepts is registered anew
    /// first (so the state directory holds a valid identity for the next start), and that
    /// identity deregistered.
    async fn deregister(&mut self, reason: String) {
        let result = match connection::deregister(
            &self.channel,
            &self.identity.credential,
            reason.clone(),
        )
        .await
        {
            Err(CallError::Unauthenticated(status)) => {
                tracing::warn!(%status, "the server no longer accepts this runner's credential; registering anew before leaving");
                match tokio::time::timeout(REGISTER_ON_EXIT, self.register_anew()).await {
                    Ok(Ok(())) => {
                        connection::deregister(&self.channel, &self.identity.credential, reason)
                            .await
                    }
                    Ok(Err(e)) => Err(CallError::Other(e)),
                    Err(_) => Err(CallError::Other(anyhow::anyhow!(
                        "registering anew took longer than {REGISTER_ON_EXIT:?}"
                    ))),
                }
            }
            other => other,
        };
        match result {
            Ok(r) => tracing::info!(released = r.released_attempts, "deregistered"),
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the server will mark this runner offline when its heartbeats stop")
            }
        }
    }
}

/// The hello that opens a session: free slots, leases held, and whether the runner is
/// leaving (so that the session opens DRAINING, with no moment in which it looks ready).
fn hello(phase: &Phase, free_slots: u32, held: Vec<pb::LeaseRef>) -> pb::Hello {
    let leave = phase.leave();
    pb::Hello {
        free_slots,
        held,
        draining: leave.is_some(),
        drain_reason: leave.map(|l| l.reason.clone()).unwrap_or_default(),
    }
}

async fn next_message(
    inbound: Option<&mut Streaming<pb::SessionResponse>>,
) -> Option<Result<pb::SessionResponse, Status>> {
    match inbound {
        Some(s) => s.next().await,
        None => futures::future::pending().await,
    }
}

async fn reserve(
    tx: Option<&mpsc::Sender<pb::SessionRequest>>,
) -> Option<mpsc::Permit<'_, pb::SessionRequest>> {
    match tx {
        Some(tx) => tx.reserve().await.ok(),
        None => futures::future::pending().await,
    }
}

async fn tick(heartbeat: Option<&mut tokio::time::Interval>) {
    match heartbeat {
        Some(h) => {
            h.tick().await;
        }
        None => futures::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_drop_a_malformed_report_resend_an_unapplied_one_or_lose_the_lease() {
        assert_eq!(
            Rejection::of(Code::InvalidArgument as i32),
            Rejection::Malformed
        );
        assert_eq!(Rejection::of(Code::Aborted as i32), Rejection::NotApplied);
        for code in [
            Code::FailedPrecondition,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Internal,
            Code::Unknown,
        ] {
            assert_eq!(Rejection::of(code as i32), Rejection::LeaseLost, "{code:?}");
        }
        assert_eq!(Rejection::of(1234), Rejection::LeaseLost);
    }

    #[test]
    fn a_leaving_runner_says_so_in_every_hello() {
        let now = Instant::now();
        let serving = hello(&Phase::start(now), 2, Vec::new());
        assert!(!serving.draining && serving.drain_reason.is_empty());
        assert_eq!(serving.free_slots, 2);
        let leave = phase::Leave {
            reason: "SIGTERM received".into(),
            stop_work: phase::StopWork::At(now),
            sync: phase::Sync::Unannounced,
            once_outcome: None,
        };
        for leaving in [
            Phase::Draining(leave.clone()),
            Phase::OnceTaken(leave.clone()),
            Phase::Settling {
                leave: leave.clone(),
                give_up_at: now,
            },
        ] {
            let h = hello(&leaving, 0, Vec::new());
            assert!(h.draining, "{}", leaving.name());
            assert_eq!(h.drain_reason, "SIGTERM received");
        }
    }
}
