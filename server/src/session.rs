//! The `Session` stream: the fast path a real runner holds.
//!
//! One task per session owns the runner's credits and reads three sources: the runner's
//! messages, the runner's command signal (a cancel is pushed the moment its transaction
//! commits, with no polling interval in the way) and the work signal (new jobs are pushed
//! while the runner has credits). Reports go to the group-committing ingester; their acks
//! (and fencing rejections) come back on the same stream.
use std::time::Duration;

use gantry_proto as pb;
use pb::{session_request::Kind as In, session_response::Kind as Out};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use uuid::Uuid;

use crate::{App, dispatch, error::Error, leases, runners};

/// Messages buffered toward the runner before the session task waits for it.
pub const OUTBOUND_BUFFER: usize = 256;
/// Runner messages buffered before reading pauses (backpressure).
const INBOUND_BUFFER: usize = 256;
/// Runner messages handled together at most.
const DRAIN_AT_ONCE: usize = 256;
/// Log bytes of merged report batches stored in one go.
const MERGED_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Messages toward the runner, boxed: a response inline is 448 bytes, and the channel's
/// first block holds 32 of them for every idle session.
pub type Outbound = mpsc::Sender<Result<Box<pb::SessionResponse>, Status>>;

async fn send(out: &Outbound, kind: Out) -> bool {
    out.send(Ok(Box::new(pb::SessionResponse { kind: Some(kind) })))
        .await
        .is_ok()
}

/// Runs a session until the runner leaves, the stream breaks or the server stops.
pub async fn run(app: App, runner_id: Uuid, inbound: Streaming<pb::SessionRequest>, out: Outbound) {
    if let Err(e) = serve(&app, runner_id, inbound, &out).await {
        let _ = out.send(Err(e.into())).await;
    }
    tracing::debug!(runner = %runner_id, "session ended");
}

/// The session's loop. It lives as long as the session, and every idle session holds its
/// future: the database calls it awaits are boxed so that their (large) futures take memory
/// only while they run, not for the session's whole life.
async fn serve(
    app: &App,
    runner_id: Uuid,
    mut inbound: Streaming<pb::SessionRequest>,
    out: &Outbound,
) -> Result<(), Error> {
    let hello = match inbound.message().await {
        Ok(Some(pb::SessionRequest {
            kind: Some(In::Hello(hello)),
        })) => hello,
        Ok(Some(_)) => {
            return Err(Error::invalid(
                "kind",
                "the first session message must be `hello`",
            ));
        }
        Ok(None) => return Ok(()),
        Err(status) => {
            tracing::debug!(%status, "session closed before hello");
            return Ok(());
        }
    };
    // Subscribe before the first reads, so nothing signalled in between is missed.
    let mut commands_rx = app.hub.subscribe_runner(runner_id);
    let mut work_rx = app.hub.subscribe_work();
    let mut shutdown = app.shutdown.clone();

    // Work given to this runner before the session that it no longer holds is lost now.
    Box::pin(leases::release_unheld(
        app,
        runner_id,
        &hello.held,
        crate::lifecycle::now_ms(),
    ))
    .await?;
    Box::pin(runners::session_opened(app, runner_id)).await?;
    let beat = Box::pin(leases::heartbeat(
        app,
        runner_id,
        &hello.held,
        leases::Commands::Pushed,
    ))
    .await?;
    // Credits never exceed the registered capacity, whatever the runner grants.
    let capacity = Box::pin(dispatch::profile(app, runner_id)).await?.capacity;
    let mut credits = hello.free_slots.min(capacity);
    if !send(
        out,
        Out::Welcome(pb::Welcome {
            runner_id: runner_id.to_string(),
            lease_seconds: app.config.lease_seconds,
            heartbeat_interval_seconds: (app.config.lease_seconds / 3).max(1),
            revoked: beat.revoked,
        }),
    )
    .await
    {
        return Ok(());
    }
    tracing::info!(runner = %runner_id, credits, "session opened");

    // Reader task: turns the inbound stream into a cancel-safe channel.
    let (in_tx, mut in_rx) = mpsc::channel(INBOUND_BUFFER);
    let reader = tokio::spawn(async move {
        loop {
            match inbound.message().await {
                Ok(Some(msg)) => {
                    if in_tx.send(msg).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(%status, "session stream broke");
                    return;
                }
            }
        }
    });
    let _reader_guard = AbortOnDrop(reader);

    let mut sent_commands: i64 = 0;
    let mut check_commands = true;
    let mut check_work = true;
    // Safety net only (see Config::session_recheck_ms); pushes come from signals.
    let period = Duration::from_millis(app.config.session_recheck_ms);
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A runner heartbeats every interval: a session silent for two of them is dead (a
    // connection black-holed by the network looks open for much longer). It is closed
    // so that no further assignment vanishes into it.
    let silence_limit = Duration::from_secs(2 * u64::from((app.config.lease_seconds / 3).max(1)));
    let mut last_heard = tokio::time::Instant::now();

    loop {
        if check_commands {
            check_commands = false;
            commands_rx.borrow_and_update();
            let acked = Box::pin(runners_acked(app, runner_id)).await?;
            for cmd in Box::pin(runners::pending_commands(
                app,
                runner_id,
                acked.max(sent_commands),
            ))
            .await?
            {
                sent_commands = sent_commands.max(i64::try_from(cmd.sequence).unwrap_or(0));
                if !send(out, Out::Command(cmd)).await {
                    return Ok(());
                }
            }
        }
        if check_work && credits > 0 {
            check_work = false;
            work_rx.borrow_and_update();
            let got = app.claimer.call((runner_id, credits as usize)).await?;
            let mut pending = got.into_iter();
            while let Some(assignment) = pending.next() {
                credits -= 1;
                let lease = assignment.lease_id.clone();
                if !send(out, Out::Assignment(assignment)).await {
                    // The runner is gone: take back what it never received.
                    let undelivered = std::iter::once(lease)
                        .chain(pending.map(|a| a.lease_id))
                        .filter_map(|l| Uuid::try_parse(&l).ok())
                        .collect();
                    Box::pin(dispatch::return_undelivered(app, undelivered)).await?;
                    return Ok(());
                }
            }
        }
        tokio::select! {
            msg = in_rx.recv() => {
                let Some(first) = msg else { return Ok(()) };
                last_heard = tokio::time::Instant::now();
                // Everything the runner has sent meanwhile is handled together: consecutive
                // report batches become one (one group commit, one ack), and credits add up
                // before the next claim.
                let mut msgs = vec![first];
                while msgs.len() < DRAIN_AT_ONCE {
                    match in_rx.try_recv() {
                        Ok(m) => msgs.push(m),
                        Err(_) => break,
                    }
                }
                let mut reports = Vec::new();
                let mut merged_bytes = 0usize;
                for msg in msgs {
                    if let Some(In::Reports(batch)) = msg.kind {
                        // Bounded: a merged batch holds a few MiB of output at most.
                        merged_bytes += batch
                            .reports
                            .iter()
                            .map(|r| match &r.body {
                                Some(pb::report::Body::Log(l)) => l.data.len(),
                                _ => 0,
                            })
                            .sum::<usize>();
                        reports.extend(batch.reports);
                        if merged_bytes >= MERGED_BATCH_BYTES {
                            merged_bytes = 0;
                            if !Box::pin(ingest(app, runner_id, std::mem::take(&mut reports), out)).await? {
                                return Ok(());
                            }
                        }
                        continue;
                    }
                    merged_bytes = 0;
                    if !reports.is_empty() && !Box::pin(ingest(app, runner_id, std::mem::take(&mut reports), out)).await? {
                        return Ok(());
                    }
                    match msg.kind {
                        Some(In::Credits(c)) => {
                            credits = credits.saturating_add(c.slots).min(capacity);
                            check_work = true;
                        }
                        Some(In::Heartbeat(h)) => {
                            // Commands travel separately on this stream.
                            let resp = Box::pin(leases::heartbeat(app, runner_id, &h.held, leases::Commands::Pushed)).await?;
                            if !send(out, Out::HeartbeatAck(resp)).await {
                                return Ok(());
                            }
                        }
                        Some(In::Reports(_)) => {}
                        Some(In::Drain(d)) => {
                            Box::pin(runners::drain_self(app, runner_id, &d.reason)).await?;
                            credits = 0;
                        }
                        Some(In::CommandAck(a)) => {
                            Box::pin(runners::ack_commands(app, runner_id, a.sequence)).await?;
                        }
                        Some(In::Hello(_)) => {
                            return Err(Error::invalid("hello", "sent twice on one session"));
                        }
                        None => return Err(Error::invalid("kind", "is required")),
                    }
                }
                if !reports.is_empty() && !Box::pin(ingest(app, runner_id, reports, out)).await? {
                    return Ok(());
                }
            }
            _ = commands_rx.changed() => check_commands = true,
            _ = work_rx.changed(), if credits > 0 => check_work = true,
            _ = recheck.tick() => {
                check_commands = true;
                check_work = true;
            }
            _ = tokio::time::sleep_until(last_heard + silence_limit) => {
                tracing::warn!(runner = %runner_id, silent = ?silence_limit, "no word from the runner; closing its session");
                return Ok(());
            }
            _ = crate::events::stopped(&mut shutdown) => return Ok(()),
        }
    }
}

/// Stores reports and answers with their acks and rejections. `Ok(false)`: the runner is gone.
async fn ingest(
    app: &App,
    runner_id: Uuid,
    reports: Vec<pb::Report>,
    out: &Outbound,
) -> Result<bool, Error> {
    let outcome = match app.ingester.call((runner_id, reports)).await {
        Ok(outcome) => outcome,
        Err(e) => {
            // Not stored, not acknowledged. The session ends so that the runner reconnects
            // and sends them again before anything newer: a later report must never be
            // applied past a gap.
            tracing::warn!(runner = %runner_id, error = %e, "report batch not stored; ending the session");
            return Err(e);
        }
    };
    if !outcome.acks.is_empty()
        && !send(out, Out::Acks(pb::ReportAcks { acks: outcome.acks })).await
    {
        return Ok(false);
    }
    for r in outcome.rejected {
        if !send(out, Out::Rejected(r.to_proto())).await {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn runners_acked(app: &App, runner_id: Uuid) -> Result<i64, Error> {
    use sea_orm::EntityTrait;
    Ok(crate::store::entity::runner::Entity::find_by_id(runner_id)
        .one(app.store.db())
        .await?
        .map_or(0, |r| r.acked_command_seq))
}

/// Aborts the reader task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
