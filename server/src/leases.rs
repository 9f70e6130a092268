//! Leases: heartbeats extend them; the reaper ends what they no longer cover.
//!
//! The reaper runs on every replica; each change is a conditional update in a transaction
//! (rows locked on PostgreSQL), so two replicas never end one attempt twice. It handles:
//! expired leases (the attempt is lost: retried or `FAILED/runner_lost`, or `CANCELED` when a
//! cancel was pending), attempts past their deadline plus a grace (`TIMED_OUT`), runners
//! silent for a lease period (`OFFLINE`), retention of terminal jobs, and waking dispatch
//! when a retry backoff ends.
use std::{collections::HashMap, time::Duration};

use gantry_proto as pb;
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect, sea_query::Expr,
};
use uuid::Uuid;

use crate::{
    App,
    batch::{GroupCommit, Queue},
    error::{Error, Result},
    events::Signals,
    jobs::state::AttemptEnd,
    lifecycle::{Lifecycle, now_ms},
    store::entity::{attempt, command, event, job, job_label, lock, log_chunk, runner},
};

/// Attempts the reaper ends per transaction.
const REAP_BATCH: u64 = 256;

/// Most lease references one heartbeat or hello may carry.
const MAX_HELD: usize = 4096;

/// Checks a runner's list of held leases: bounded, and every id a UUID.
pub fn parse_held(field: &str, held: &[pb::LeaseRef]) -> Result<Vec<(Uuid, Uuid)>> {
    if held.len() > MAX_HELD {
        return Err(Error::invalid(field, format!("at most {MAX_HELD} entries")));
    }
    held.iter()
        .enumerate()
        .map(|(i, h)| {
            let job = Uuid::try_parse(&h.job_id).map_err(|_| {
                Error::invalid(
                    format!("{field}[{i}].job_id"),
                    format!("{:?} is not a UUID", h.job_id),
                )
            })?;
            let lease = Uuid::try_parse(&h.lease_id).map_err(|_| {
                Error::invalid(
                    format!("{field}[{i}].lease_id"),
                    format!("{:?} is not a UUID", h.lease_id),
                )
            })?;
            Ok((job, lease))
        })
        .collect()
}

/// Heartbeats answered by one transaction at most.
const MAX_BEATS_AT_ONCE: usize = 512;

/// Handle to the heartbeat writer. Heartbeats are group-committed (see [`crate::batch`]):
/// 10,000 runners beating every 10 s would otherwise be 1,000 write transactions a second,
/// a third of what SQLite commits on a small machine. Every heartbeat waiting when the
/// writer is free is written by one transaction (three updates per 500 runners).
pub type Heartbeats = GroupCommit<Uuid, Beaten>;

/// A runner after its heartbeat was written.
#[derive(Clone, Copy, Debug)]
pub struct Beaten {
    /// The new lease expiry (unix ms).
    until: i64,
    /// `RunnerState` number.
    state: i32,
    /// The last command sequence the runner acknowledged.
    acked_command_seq: i64,
}

/// Starts the heartbeat writer for `app` on `queue`.
pub fn start_heartbeats(app: App, queue: Queue<Uuid, Beaten>) {
    GroupCommit::spawn(queue, "heartbeats", MAX_BEATS_AT_ONCE, 1, move |beats| {
        let app = app.clone();
        async move {
            let mut ids = beats.clone();
            ids.sort();
            ids.dedup();
            let rows = write_beats(&app, &ids).await?;
            Ok(beats
                .iter()
                .map(|id| {
                    rows.get(id)
                        .copied()
                        .ok_or_else(|| Error::NotFound(format!("runner {id}")))
                })
                .collect())
        }
    });
}

/// One transaction for the heartbeats of `ids` (sorted: a fixed lock order on PostgreSQL).
/// Returns what each runner's heartbeat answers with.
async fn write_beats(app: &App, ids: &[Uuid]) -> Result<HashMap<Uuid, Beaten>> {
    let now = now_ms();
    let until = now + app.rules().lease_ms;
    let wtx = app.store.write().await?;
    for chunk in ids.chunks(500) {
        attempt::Entity::update_many()
            .col_expr(attempt::Column::LeaseExpiresAt, Expr::value(until))
            .filter(attempt::Column::RunnerId.is_in(chunk.to_vec()))
            .filter(attempt::Column::FinishedAt.is_null())
            .exec(&wtx.txn)
            .await?;
        runner::Entity::update_many()
            .col_expr(runner::Column::LastHeartbeat, Expr::value(now))
            .filter(runner::Column::Id.is_in(chunk.to_vec()))
            .exec(&wtx.txn)
            .await?;
        // Only OFFLINE becomes ONLINE: a conditional update never overwrites a concurrent drain.
        runner::Entity::update_many()
            .col_expr(
                runner::Column::State,
                Expr::value(pb::RunnerState::Online as i32),
            )
            .filter(runner::Column::Id.is_in(chunk.to_vec()))
            .filter(runner::Column::State.eq(pb::RunnerState::Offline as i32))
            .exec(&wtx.txn)
            .await?;
    }
    wtx.commit().await?;
    // Only what a heartbeat answers with: whole rows (with their registration blobs) for
    // thousands of runners at once cost the server resident memory it kept.
    let mut rows = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        for (id, state, acked_command_seq) in runner::Entity::find()
            .select_only()
            .columns([
                runner::Column::Id,
                runner::Column::State,
                runner::Column::AckedCommandSeq,
            ])
            .filter(runner::Column::Id.is_in(chunk.to_vec()))
            .into_tuple::<(Uuid, i32, i64)>()
            .all(app.store.db())
            .await?
        {
            rows.insert(
                id,
                Beaten {
                    until,
                    state,
                    acked_command_seq,
                },
            );
        }
    }
    Ok(rows)
}

/// Which commands a heartbeat answer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commands {
    /// The commands the runner has not acknowledged (the unary Heartbeat: no other way).
    Pending,
    /// None: a session pushes commands on its own stream.
    Pushed,
}

/// Extends every lease `runner_id` holds; marks it alive; tells which of `held` are revoked.
pub async fn heartbeat(
    app: &App,
    runner_id: Uuid,
    held: &[pb::LeaseRef],
    commands: Commands,
) -> Result<pb::HeartbeatResponse> {
    let parsed = parse_held("held", held)?;
    let beaten = app.heartbeats.call(runner_id).await?;
    let revoked = revoked(app, runner_id, &parsed).await?;
    let commands = match commands {
        Commands::Pending => {
            crate::runners::pending_commands(app, runner_id, beaten.acked_command_seq).await?
        }
        Commands::Pushed => Vec::new(),
    };
    Ok(pb::HeartbeatResponse {
        lease_expires_at_unix_ms: beaten.until,
        commands,
        revoked,
        state: beaten.state,
    })
}

/// Which of `held` the server no longer honours for `runner_id`.
async fn revoked(app: &App, runner_id: Uuid, held: &[(Uuid, Uuid)]) -> Result<Vec<pb::LeaseRef>> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let live: std::collections::HashSet<(Uuid, Uuid)> = attempt::Entity::find()
        .filter(attempt::Column::LeaseId.is_in(held.iter().map(|(_, lease)| *lease)))
        .filter(attempt::Column::RunnerId.eq(runner_id))
        .filter(attempt::Column::FinishedAt.is_null())
        .all(app.store.db())
        .await?
        .into_iter()
        .map(|a| (a.job_id, a.lease_id))
        .collect();
    Ok(held
        .iter()
        .filter(|key| !live.contains(key))
        .map(|(job, lease)| pb::LeaseRef {
            job_id: job.to_string(),
            lease_id: lease.to_string(),
        })
        .collect())
}

/// A session's `hello.held` is the runner's own account of its work: attempts it was given
/// before this session and does not hold (it restarted and lost them) are ended now as lost,
/// so they are retried at once instead of being kept alive by its heartbeats.
pub async fn release_unheld(
    app: &App,
    runner_id: Uuid,
    held: &[pb::LeaseRef],
    since: i64,
) -> Result<()> {
    let held: std::collections::HashSet<Uuid> = parse_held("hello.held", held)?
        .into_iter()
        .map(|(_, lease)| lease)
        .collect();
    let orphans: Vec<Uuid> = attempt::Entity::find()
        .select_only()
        .column(attempt::Column::LeaseId)
        .filter(attempt::Column::RunnerId.eq(runner_id))
        .filter(attempt::Column::FinishedAt.is_null())
        .filter(attempt::Column::AssignedAt.lt(since))
        .into_tuple::<Uuid>()
        .all(app.store.db())
        .await?
        .into_iter()
        .filter(|lease| !held.contains(lease))
        .collect();
    end_attempts(app, orphans, |a, _| {
        Some(AttemptEnd::Lost {
            message: format!("runner {} reconnected without this attempt", a.runner_id),
        })
    })
    .await
}

/// Ends every attempt `runner_id` still holds as lost (the runner deregistered); returns how
/// many there were. They are retried under their jobs' policies.
pub async fn release_all(app: &App, runner_id: Uuid, reason: &str) -> Result<u32> {
    let held: Vec<Uuid> = attempt::Entity::find()
        .select_only()
        .column(attempt::Column::LeaseId)
        .filter(attempt::Column::RunnerId.eq(runner_id))
        .filter(attempt::Column::FinishedAt.is_null())
        .into_tuple::<Uuid>()
        .all(app.store.db())
        .await?;
    let count = u32::try_from(held.len()).unwrap_or(u32::MAX);
    end_attempts(app, held, |a, _| {
        Some(AttemptEnd::Lost {
            message: format!(
                "runner {} deregistered ({reason}) holding this attempt",
                a.runner_id
            ),
        })
    })
    .await?;
    Ok(count)
}

/// Runs the reaper until shutdown.
pub async fn run_reaper(app: App) {
    let mut shutdown = app.shutdown.clone();
    let mut interval = tokio::time::interval(Duration::from_millis(app.config.reap_interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = now_ms();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = crate::events::stopped(&mut shutdown) => return,
        }
        let now = now_ms();
        reap_once(&app, last_tick, now).await;
        last_tick = now;
        app.hub.prune_runners();
    }
}

/// One reaper pass. `since` is the previous pass's time (for backoff wake-ups). Each step
/// runs even when another failed; failures are logged and retried on the next pass.
pub async fn reap_once(app: &App, since: i64, now: i64) {
    let steps = [
        ("expired leases", expire_leases(app, now).await),
        ("overdue attempts", time_out_overdue(app, now).await),
        (
            "unconfirmed cancels",
            finish_unconfirmed_cancels(app, now).await,
        ),
        ("silent runners", mark_silent_runners(app, now).await),
        (
            "backoff wake-ups",
            wake_after_backoff(app, since, now).await,
        ),
        ("retention", retain(app, now).await),
    ];
    for (step, result) in steps {
        if let Err(e) = result {
            tracing::warn!(step, error = %e, "reaper step failed; will try again");
        }
    }
}

async fn expire_leases(app: &App, now: i64) -> Result<()> {
    loop {
        let expired: Vec<Uuid> = attempt::Entity::find()
            .select_only()
            .column(attempt::Column::LeaseId)
            .filter(attempt::Column::FinishedAt.is_null())
            .filter(attempt::Column::LeaseExpiresAt.lt(now))
            .limit(REAP_BATCH)
            .into_tuple()
            .all(app.store.db())
            .await?;
        let n = expired.len() as u64;
        end_attempts(app, expired, |a, now| {
            (a.lease_expires_at < now).then(|| AttemptEnd::Lost {
                message: format!("runner {} stopped heartbeating; lease expired", a.runner_id),
            })
        })
        .await?;
        if n < REAP_BATCH {
            return Ok(());
        }
    }
}

/// Attempts past their deadline plus the grace, that the runner did not end.
async fn time_out_overdue(app: &App, now: i64) -> Result<()> {
    let grace = i64::from(app.config.timeout_grace_seconds) * 1000;
    let overdue: Vec<Uuid> = attempt::Entity::find()
        .select_only()
        .column(attempt::Column::LeaseId)
        .filter(attempt::Column::FinishedAt.is_null())
        .filter(attempt::Column::DeadlineAt.lt(now - grace))
        .limit(REAP_BATCH)
        .into_tuple()
        .all(app.store.db())
        .await?;
    end_attempts(app, overdue, move |a, now| {
        (a.deadline_at < now - grace).then(|| AttemptEnd::TimedOut {
            message: "the server marked the attempt timed out: no final report past its deadline"
                .into(),
            exit_code: None,
        })
    })
    .await
}

/// A cancel the holder never confirms ends the attempt CANCELED once the job's grace period
/// and one lease period have passed, even while the runner keeps heartbeating.
async fn finish_unconfirmed_cancels(app: &App, now: i64) -> Result<()> {
    let lease_ms = app.rules().lease_ms;
    let canceling = job::Entity::find()
        .filter(job::Column::Status.eq(pb::JobStatus::Canceling as i32))
        .filter(job::Column::UpdatedAt.lt(now - lease_ms))
        .limit(REAP_BATCH)
        .all(app.store.db())
        .await?;
    let mut overdue = Vec::new();
    for job in canceling {
        let spec: pb::JobSpec = crate::lifecycle::decode(&job.spec)?;
        let grace_ms = i64::from(spec.cancel_grace_seconds) * 1000;
        if job.updated_at + grace_ms + lease_ms < now
            && let Some(lease) = job.current_lease
        {
            overdue.push(lease);
        }
    }
    end_attempts(app, overdue, |a, _| {
        Some(AttemptEnd::Canceled {
            message: format!("runner {} did not confirm the cancel in time", a.runner_id),
            exit_code: None,
        })
    })
    .await
}

/// Online runners silent for a lease period go offline (a draining one stays draining, so
/// that coming back never makes it take work again).
async fn mark_silent_runners(app: &App, now: i64) -> Result<()> {
    let lease_ms = app.rules().lease_ms;
    let silent = runner::Entity::find()
        .filter(runner::Column::State.eq(pb::RunnerState::Online as i32))
        .filter(runner::Column::LastHeartbeat.lt(now - lease_ms))
        .count(app.store.db())
        .await?;
    if silent == 0 {
        return Ok(()); // the usual case: no write transaction at all
    }
    // Through the write gate like every write: on SQLite an ungated commit between another
    // transaction's read and its write fails that transaction (SQLITE_BUSY_SNAPSHOT).
    let wtx = app.store.write().await?;
    runner::Entity::update_many()
        .col_expr(
            runner::Column::State,
            Expr::value(pb::RunnerState::Offline as i32),
        )
        .filter(runner::Column::State.eq(pb::RunnerState::Online as i32))
        .filter(runner::Column::LastHeartbeat.lt(now - lease_ms))
        .exec(&wtx.txn)
        .await?;
    wtx.commit().await?;
    Ok(())
}

/// Backoffs that ended since the last pass make work dispatchable.
async fn wake_after_backoff(app: &App, since: i64, now: i64) -> Result<()> {
    let woke = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::Status.eq(pb::JobStatus::Queued as i32))
        .filter(job::Column::NotBefore.gt(since))
        .filter(job::Column::NotBefore.lte(now))
        .limit(1)
        .into_tuple::<Uuid>()
        .all(app.store.db())
        .await?;
    if !woke.is_empty() {
        app.hub.publish(Signals {
            work: true,
            ..Default::default()
        });
    }
    Ok(())
}

/// Deletes terminal jobs older than the retention.
async fn retain(app: &App, now: i64) -> Result<()> {
    if app.config.retention_seconds > 0 {
        let horizon = now.saturating_sub(
            i64::try_from(app.config.retention_seconds.saturating_mul(1000)).unwrap_or(i64::MAX),
        );
        purge_finished_before(app, horizon).await?;
        purge_runners_gone_before(app, horizon).await?;
    }
    Ok(())
}

/// Deletes runners OFFLINE since before `horizon` and holding nothing, with their commands.
pub async fn purge_runners_gone_before(app: &App, horizon: i64) -> Result<u64> {
    let wtx = app.store.write().await?;
    let gone: Vec<Uuid> = runner::Entity::find()
        .select_only()
        .column(runner::Column::Id)
        .filter(runner::Column::State.eq(pb::RunnerState::Offline as i32))
        .filter(runner::Column::LastHeartbeat.lt(horizon))
        .filter(
            runner::Column::Id.not_in_subquery(
                sea_orm::sea_query::Query::select()
                    .column(attempt::Column::RunnerId)
                    .from(attempt::Entity)
                    .and_where(attempt::Column::FinishedAt.is_null())
                    .to_owned(),
            ),
        )
        .limit(500)
        .into_tuple()
        .all(&wtx.txn)
        .await?;
    if gone.is_empty() {
        return Ok(0);
    }
    command::Entity::delete_many()
        .filter(command::Column::RunnerId.is_in(gone.clone()))
        .exec(&wtx.txn)
        .await?;
    let deleted = runner::Entity::delete_many()
        .filter(runner::Column::Id.is_in(gone))
        .exec(&wtx.txn)
        .await?
        .rows_affected;
    wtx.commit().await?;
    tracing::info!(deleted, "retention: deleted runners gone offline");
    Ok(deleted)
}

/// Ends each attempt in `leases` for which `decide` (re-checked under lock) says so.
async fn end_attempts(
    app: &App,
    leases: Vec<Uuid>,
    decide: impl Fn(&attempt::Model, i64) -> Option<AttemptEnd>,
) -> Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    lc.load_attempts(leases.iter().copied()).await?;
    for lease in leases {
        let Some(a) = lc.attempt(&lease).cloned() else {
            continue;
        };
        if a.finished_at.is_some() {
            continue; // ended meanwhile (another replica, or a late report)
        }
        if let Some(end) = decide(&a, lc.now) {
            tracing::info!(job = %a.job_id, attempt = a.number, reason = %end.message(), "ending attempt");
            lc.end_attempt(lease, end).await?;
        }
    }
    let signals = lc.flush().await?;
    wtx.commit().await?;
    app.hub.publish(signals);
    Ok(())
}

/// Deletes terminal jobs that finished before `horizon`, with everything they own.
pub async fn purge_finished_before(app: &App, horizon: i64) -> Result<u64> {
    let ids: Vec<Uuid> = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::FinishedAt.is_not_null())
        .filter(job::Column::FinishedAt.lt(horizon))
        .limit(500)
        .into_tuple()
        .all(app.store.db())
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let wtx = app.store.write().await?;
    let txn = &wtx.txn;
    log_chunk::Entity::delete_many()
        .filter(log_chunk::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    event::Entity::delete_many()
        .filter(event::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    attempt::Entity::delete_many()
        .filter(attempt::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    job_label::Entity::delete_many()
        .filter(job_label::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    lock::Entity::delete_many()
        .filter(lock::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    let deleted = job::Entity::delete_many()
        .filter(
            Condition::all()
                .add(job::Column::Id.is_in(ids))
                .add(job::Column::FinishedAt.is_not_null()),
        )
        .exec(txn)
        .await?
        .rows_affected;
    wtx.commit().await?;
    tracing::info!(deleted, "retention: deleted finished jobs");
    Ok(deleted)
}
