//! The `Session` stream: the fast path a real runner holds, read like the protocol.
//!
//! A session opens with the runner's `hello` ([`Session::open`]: the runner takes the state
//! it announces, the session gets the next epoch, its account of held leases is settled) and
//! is answered with `welcome`. Then one task per session owns the runner's credits and waits
//! on three sources: the runner's messages, each kind to its own handler (`on_credits`,
//! `on_heartbeat`, `on_reports`, `on_drain`, `on_command_ack`); the runner's command signal
//! (a cancel or drain is pushed the moment its transaction commits, with no polling interval
//! in the way); and the work signal (new jobs are pushed while the runner has credits).
//!
//! How a session ends, and the status it ends with:
//! - the runner closes its side: OK;
//! - a message over the server's size limit: RESOURCE_EXHAUSTED naming the limit;
//! - a message that does not decode, or breaks the protocol (a second hello, an empty
//!   message, a hello that is not first): INVALID_ARGUMENT naming the field;
//! - a newer session of the same runner opened (on any replica): ABORTED, "replaced";
//! - the runner's credential was revoked (it deregistered) or the runner was deleted:
//!   UNAUTHENTICATED — register again;
//! - nothing heard from the runner for two heartbeat intervals (`Limits.session_silence_ms`):
//!   UNAVAILABLE (a black-holed connection looks open for much longer; no assignment may
//!   vanish into it);
//! - a report batch could not be stored, or the server is stopping: UNAVAILABLE — reconnect
//!   and send unacknowledged reports again.
use std::{sync::Arc, time::Duration};

use gantry_proto as pb;
use pb::{session_request::Kind as In, session_response::Kind as Out};
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::{Status, Streaming};
use uuid::Uuid;

use super::status;
use crate::{
    App, commands, dispatch, error::Error, leases, reports::Batch, runners,
    runners::heartbeats::Beat,
};

/// Messages buffered toward the runner before the session task waits for it.
pub const OUTBOUND_BUFFER: usize = 256;
/// Runner messages buffered before reading pauses (backpressure).
const INBOUND_BUFFER: usize = 256;
/// Encoded bytes of runner messages read but not yet handled, at most: reading pauses past
/// this (one message larger than it still passes alone), so a session holds a few MiB of
/// input while the ingester is slow, not `INBOUND_BUFFER` messages of the largest size.
const INBOUND_BYTES: usize = 8 * 1024 * 1024;
/// Runner messages handled together at most.
const DRAIN_AT_ONCE: usize = 256;
/// Encoded bytes of merged report batches stored in one go.
const MERGED_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Messages toward the runner, boxed: a response inline is 448 bytes, and the channel's
/// first block holds 32 of them for every idle session.
pub type Outbound = mpsc::Sender<Result<Box<pb::SessionResponse>, Status>>;

/// Whether the session goes on after a handler.
enum Flow {
    Go,
    /// The runner's side is gone: end quietly.
    Gone,
}

/// What the reader task passes on from the runner's stream.
enum Inbound {
    /// A message, with its share of [`INBOUND_BYTES`] (given back when it is dropped).
    Message(pb::SessionRequest, OwnedSemaphorePermit),
    /// The stream failed (a message too large or undecodable, or a broken connection).
    Broken(Status),
}

/// What woke the session.
enum Wake {
    Inbound(Option<Inbound>),
    Commands,
    Work,
    Recheck,
    Silent,
    Stopping,
}

/// Runs a session until the runner leaves, the stream breaks or the server stops.
pub async fn run(app: App, runner: Uuid, inbound: Streaming<pb::SessionRequest>, out: Outbound) {
    let ended = match Box::pin(Session::open(app.clone(), runner, inbound, out.clone())).await {
        Ok(Some((session, rx))) => session.serve(rx).await,
        Ok(None) => Ok(()),
        Err(status) => Err(status),
    };
    if let Err(status) = ended {
        if status.code() == tonic::Code::Unauthenticated {
            app.auth.forget(runner);
        }
        tracing::debug!(%runner, %status, "session ended");
        let _ = out.send(Err(status)).await;
    }
}

/// One open session.
struct Session {
    app: App,
    runner: Uuid,
    /// This session's epoch: a newer session of the runner has a higher one and replaces it.
    epoch: i64,
    /// The runner's registered capacity: credits never exceed it.
    capacity: u32,
    /// Assignments the runner will still take (flow control).
    credits: u32,
    /// Highest command sequence pushed on this session.
    sent_commands: i64,
    out: Outbound,
    /// Bumped when the runner has a new command (or a newer session, or a revocation).
    commands_rx: watch::Receiver<u64>,
    /// Bumped when new work may be dispatchable.
    work_rx: watch::Receiver<u64>,
    check_commands: bool,
    check_work: bool,
}

impl Session {
    async fn send(&self, kind: Out) -> Flow {
        match self
            .out
            .send(Ok(Box::new(pb::SessionResponse { kind: Some(kind) })))
            .await
        {
            Ok(()) => Flow::Go,
            Err(_) => Flow::Gone,
        }
    }

    /// Reads the hello, opens the session, answers `welcome`, and starts reading the rest.
    async fn open(
        app: App,
        runner: Uuid,
        mut inbound: Streaming<pb::SessionRequest>,
        out: Outbound,
    ) -> Result<Option<(Session, mpsc::Receiver<Inbound>)>, Status> {
        let hello = match inbound.message().await {
            Ok(Some(pb::SessionRequest {
                kind: Some(In::Hello(hello)),
            })) => hello,
            Ok(Some(_)) => {
                return Err(
                    Error::invalid("kind", "the first session message must be `hello`").into(),
                );
            }
            Ok(None) => return Ok(None),
            Err(broken) => return status::inbound(&broken).map_or(Ok(None), Err),
        };
        // Subscribed before the first reads, so nothing signalled in between is missed.
        let commands_rx = app.env.hub.subscribe_runner(runner);
        let work_rx = app.env.hub.subscribe_work();
        let opened = app.openings.call((runner, hello.clone())).await?;
        let credits = if hello.draining {
            0
        } else {
            hello.free_slots.min(opened.capacity)
        };
        let session = Session {
            epoch: opened.epoch,
            capacity: opened.capacity,
            credits,
            sent_commands: 0,
            out,
            commands_rx,
            work_rx,
            check_commands: true,
            check_work: true,
            runner,
            app,
        };
        let welcome = pb::Welcome {
            runner_id: runner.to_string(),
            lease_seconds: session.app.config.lease_seconds,
            heartbeat_interval_seconds: session.app.heartbeat_seconds(),
            revoked: opened.revoked,
            heartbeat_interval_ms: session.app.heartbeat_ms(),
            lease_ms: session.app.lease_ms_u32(),
            limits: Some(session.app.limits()),
        };
        if let Flow::Gone = session.send(Out::Welcome(welcome)).await {
            return Ok(None);
        }
        // Reader task: turns the inbound stream into a cancel-safe channel.
        let (tx, rx) = mpsc::channel(INBOUND_BUFFER);
        let budget = Arc::new(Semaphore::new(INBOUND_BYTES));
        tokio::spawn(async move {
            loop {
                let item = match inbound.message().await {
                    Ok(Some(msg)) => {
                        let size = msg.encoded_len().clamp(1, INBOUND_BYTES);
                        let share = u32::try_from(size).unwrap_or(u32::MAX);
                        let Ok(permit) = budget.clone().acquire_many_owned(share).await else {
                            return;
                        };
                        Inbound::Message(msg, permit)
                    }
                    Ok(None) => return,
                    Err(status) => Inbound::Broken(status),
                };
                let broken = matches!(item, Inbound::Broken(_));
                if tx.send(item).await.is_err() || broken {
                    return;
                }
            }
        });
        Ok(Some((session, rx)))
    }

    /// The session's loop. It lives as long as the session, and every idle session holds its
    /// future: the handlers it awaits are boxed so that their (large) futures take memory
    /// only while they run, not for the session's whole life.
    async fn serve(mut self, mut rx: mpsc::Receiver<Inbound>) -> Result<(), Status> {
        let mut shutdown = self.app.shutdown.clone();
        // Safety net only (see Config::session_recheck_ms); pushes come from signals.
        let period = Duration::from_millis(self.app.config.session_recheck_ms);
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence = Duration::from_millis(u64::from(self.app.limits().session_silence_ms));
        let mut last_heard = tokio::time::Instant::now();
        loop {
            if self.check_commands {
                self.check_commands = false;
                if let Flow::Gone = Box::pin(self.push_commands()).await? {
                    return Ok(());
                }
            }
            if self.check_work && self.credits > 0 {
                self.check_work = false;
                if let Flow::Gone = Box::pin(self.push_work()).await? {
                    return Ok(());
                }
            }
            let wake = tokio::select! {
                item = rx.recv() => Wake::Inbound(item),
                _ = self.commands_rx.changed() => Wake::Commands,
                _ = self.work_rx.changed(), if self.credits > 0 => Wake::Work,
                _ = recheck.tick() => Wake::Recheck,
                _ = tokio::time::sleep_until(last_heard + silence) => Wake::Silent,
                _ = crate::signals::stopped(&mut shutdown) => Wake::Stopping,
            };
            match wake {
                Wake::Inbound(None) => return Ok(()),
                Wake::Inbound(Some(Inbound::Broken(broken))) => {
                    return status::inbound(&broken).map_or(Ok(()), Err);
                }
                Wake::Inbound(Some(Inbound::Message(first, share))) => {
                    last_heard = tokio::time::Instant::now();
                    // Everything the runner has sent meanwhile is handled together:
                    // consecutive report batches become one (one group commit, one ack),
                    // and credits add up before the next claim. Their shares of the
                    // input budget are held until they are handled.
                    let mut msgs = vec![first];
                    let mut shares = vec![share];
                    while msgs.len() < DRAIN_AT_ONCE {
                        match rx.try_recv() {
                            Ok(Inbound::Message(m, share)) => {
                                msgs.push(m);
                                shares.push(share);
                            }
                            Ok(Inbound::Broken(broken)) => {
                                Box::pin(self.on_messages(msgs)).await?;
                                return status::inbound(&broken).map_or(Ok(()), Err);
                            }
                            Err(_) => break,
                        }
                    }
                    let flow = Box::pin(self.on_messages(msgs)).await?;
                    drop(shares);
                    if let Flow::Gone = flow {
                        return Ok(());
                    }
                }
                Wake::Commands => self.check_commands = true,
                Wake::Work => self.check_work = true,
                Wake::Recheck => {
                    self.check_commands = true;
                    self.check_work = true;
                }
                Wake::Silent => {
                    tracing::warn!(runner = %self.runner, ?silence, "no word from the runner; closing its session");
                    return Err(Status::unavailable(format!(
                        "nothing heard from runner {} for {} ms (two heartbeat intervals): session closed",
                        self.runner,
                        silence.as_millis()
                    )));
                }
                Wake::Stopping => {
                    return Err(Status::unavailable(
                        "the server is stopping: reconnect (to another replica, or when it is back)",
                    ));
                }
            }
        }
    }

    /// Messages that arrived together, each to its handler; consecutive report batches are
    /// stored together.
    async fn on_messages(&mut self, msgs: Vec<pb::SessionRequest>) -> Result<Flow, Status> {
        let mut reports = Vec::new();
        let mut merged_bytes = 0usize;
        for msg in msgs {
            if let Some(In::Reports(batch)) = msg.kind {
                // Bounded: a merged batch holds a few MiB of reports at most.
                merged_bytes += batch.encoded_len();
                reports.extend(batch.reports);
                if merged_bytes >= MERGED_BATCH_BYTES {
                    merged_bytes = 0;
                    if let Flow::Gone = self.on_reports(std::mem::take(&mut reports)).await? {
                        return Ok(Flow::Gone);
                    }
                }
                continue;
            }
            merged_bytes = 0;
            if !reports.is_empty()
                && let Flow::Gone = self.on_reports(std::mem::take(&mut reports)).await?
            {
                return Ok(Flow::Gone);
            }
            let flow = match msg.kind {
                Some(In::Credits(c)) => self.on_credits(c),
                Some(In::Heartbeat(h)) => self.on_heartbeat(h).await?,
                Some(In::Drain(d)) => self.on_drain(d).await?,
                Some(In::CommandAck(a)) => self.on_command_ack(a).await?,
                Some(In::Reports(_)) => Flow::Go,
                Some(In::Hello(_)) => {
                    return Err(Error::invalid("hello", "sent twice on one session").into());
                }
                None => return Err(Error::invalid("kind", "is required").into()),
            };
            if let Flow::Gone = flow {
                return Ok(Flow::Gone);
            }
        }
        if reports.is_empty() {
            return Ok(Flow::Go);
        }
        self.on_reports(reports).await
    }

    /// `credits`: the runner takes more assignments (never beyond its capacity).
    fn on_credits(&mut self, c: pb::Credits) -> Flow {
        self.credits = self.credits.saturating_add(c.slots).min(self.capacity);
        self.check_work = true;
        Flow::Go
    }

    /// `heartbeat`: its account settled (see [`crate::leases`]); answered with
    /// `heartbeat_ack` (commands travel on their own on this stream).
    async fn on_heartbeat(&mut self, h: pb::HeartbeatRequest) -> Result<Flow, Status> {
        let held = leases::parse_held("heartbeat.held", &h.held)?;
        let beaten = self
            .app
            .heartbeats
            .call(Beat {
                runner: self.runner,
                held,
            })
            .await?;
        Ok(self
            .send(Out::HeartbeatAck(pb::HeartbeatResponse {
                lease_expires_at_unix_ms: beaten.until,
                commands: Vec::new(),
                revoked: beaten.revoked,
                state: beaten.state,
            }))
            .await)
    }

    /// `reports`: stored, then answered with their acks and any refusals. A batch that could
    /// not be stored ends the session, so that the runner sends it again before anything
    /// newer (a later report is never applied past a gap).
    async fn on_reports(&mut self, reports: Vec<pb::Report>) -> Result<Flow, Status> {
        let batch = Batch {
            runner: self.runner,
            reports,
            stop_at_first: false,
        };
        let outcome = match self.app.ingester.call(batch).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(runner = %self.runner, error = %e, "report batch not stored; ending the session");
                return Err(e.into());
            }
        };
        if !outcome.acks.is_empty()
            && let Flow::Gone = self
                .send(Out::Acks(pb::ReportAcks { acks: outcome.acks }))
                .await
        {
            return Ok(Flow::Gone);
        }
        for r in outcome.rejected {
            let rejected = pb::ReportRejected {
                code: status::code(&r.error) as i32,
                message: r.error.to_string(),
                job_id: r.job_id,
                lease_id: r.lease_id,
                sequence: r.sequence,
            };
            if let Flow::Gone = self.send(Out::Rejected(rejected)).await {
                return Ok(Flow::Gone);
            }
        }
        Ok(Flow::Go)
    }

    /// `drain`: the runner takes no new work.
    async fn on_drain(&mut self, d: pb::SessionDrain) -> Result<Flow, Status> {
        runners::drain_self(&self.app.env.store, self.runner, &d.reason).await?;
        self.credits = 0;
        Ok(Flow::Go)
    }

    /// `command_ack`: every command up to the sequence is done with.
    async fn on_command_ack(&mut self, a: pb::AckCommandRequest) -> Result<Flow, Status> {
        commands::ack(&self.app.env.store, self.runner, a.sequence).await?;
        Ok(Flow::Go)
    }

    /// Pushes the commands the runner has not seen on this session. Finds out, too, whether
    /// the session was replaced or its runner revoked.
    async fn push_commands(&mut self) -> Result<Flow, Status> {
        self.commands_rx.borrow_and_update();
        let db = self.app.env.store.db();
        let acked = runners::session_check(db, self.runner, self.epoch).await?;
        for cmd in commands::pending(db, self.runner, acked.max(self.sent_commands)).await? {
            self.sent_commands = self
                .sent_commands
                .max(i64::try_from(cmd.sequence).unwrap_or(0));
            if let Flow::Gone = self.send(Out::Command(cmd)).await {
                return Ok(Flow::Gone);
            }
        }
        Ok(Flow::Go)
    }

    /// Claims work for the runner's credits and pushes it. What cannot be delivered (the
    /// runner went away) is taken back at once.
    async fn push_work(&mut self) -> Result<Flow, Status> {
        self.work_rx.borrow_and_update();
        let got = self
            .app
            .claimer
            .call((self.runner, self.credits as usize))
            .await?;
        let mut pending = got.into_iter();
        while let Some(assignment) = pending.next() {
            self.credits = self.credits.saturating_sub(1);
            let lease = assignment.lease_id.clone();
            if let Flow::Gone = self.send(Out::Assignment(assignment)).await {
                let undelivered = std::iter::once(lease)
                    .chain(pending.map(|a| a.lease_id))
                    .filter_map(|l| Uuid::try_parse(&l).ok())
                    .collect();
                dispatch::return_undelivered(&self.app.env, self.runner, undelivered).await?;
                return Ok(Flow::Gone);
            }
        }
        Ok(Flow::Go)
    }
}
