//! Leases: heartbeats extend them; the reaper ends what they no longer cover.
//!
//! The reaper runs on every replica; each change is a conditional update in a transaction
//! (rows locked on PostgreSQL), so two replicas never end one attempt twice. It handles:
//! expired leases (the attempt is lost: retried or `FAILED/runner_lost`, or `CANCELED` when a
//! cancel was pending), attempts past their deadline plus a grace (`TIMED_OUT`), runners
//! silent for a lease period (`OFFLINE`), retention of terminal jobs, and waking dispatch
//! when a retry backoff ends.
use std::time::Duration;

use gantry_proto as pb;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect, sea_query::Expr};
use uuid::Uuid;

use crate::{
    App,
    error::Result,
    events::Signals,
    jobs::state::AttemptEnd,
    lifecycle::{Lifecycle, now_ms},
    store::entity::{attempt, event, job, job_label, lock, log_chunk, runner},
};

/// Attempts the reaper ends per transaction.
const REAP_BATCH: u64 = 256;

/// Extends every lease `runner_id` holds; marks it alive; tells which of `held` are revoked.
pub async fn heartbeat(
    app: &App,
    runner_id: Uuid,
    held: &[pb::LeaseRef],
) -> Result<pb::HeartbeatResponse> {
    let now = now_ms();
    let until = now + app.rules().lease_ms;
    let wtx = app.store.write().await?;
    attempt::Entity::update_many()
        .col_expr(attempt::Column::LeaseExpiresAt, Expr::value(until))
        .filter(attempt::Column::RunnerId.eq(runner_id))
        .filter(attempt::Column::FinishedAt.is_null())
        .exec(&wtx.txn)
        .await?;
    let row = runner::Entity::find_by_id(runner_id)
        .one(&wtx.txn)
        .await?
        .ok_or_else(|| crate::error::Error::NotFound(format!("runner {runner_id}")))?;
    let state = if row.state == pb::RunnerState::Offline as i32 {
        pb::RunnerState::Online as i32
    } else {
        row.state
    };
    runner::Entity::update_many()
        .col_expr(runner::Column::LastHeartbeat, Expr::value(now))
        .col_expr(runner::Column::State, Expr::value(state))
        .filter(runner::Column::Id.eq(runner_id))
        .exec(&wtx.txn)
        .await?;
    wtx.commit().await?;
    let revoked = revoked(app, runner_id, held).await?;
    let commands = crate::runners::pending_commands(app, runner_id, row.acked_command_seq).await?;
    Ok(pb::HeartbeatResponse {
        lease_expires_at_unix_ms: until,
        commands,
        revoked,
        state,
    })
}

/// Which of `held` the server no longer honours for `runner_id`.
pub async fn revoked(
    app: &App,
    runner_id: Uuid,
    held: &[pb::LeaseRef],
) -> Result<Vec<pb::LeaseRef>> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let leases: Vec<Uuid> = held
        .iter()
        .filter_map(|h| Uuid::try_parse(&h.lease_id).ok())
        .collect();
    let live: std::collections::HashSet<(Uuid, Uuid)> = attempt::Entity::find()
        .filter(attempt::Column::LeaseId.is_in(leases))
        .filter(attempt::Column::RunnerId.eq(runner_id))
        .filter(attempt::Column::FinishedAt.is_null())
        .all(app.store.db())
        .await?
        .into_iter()
        .map(|a| (a.job_id, a.lease_id))
        .collect();
    Ok(held
        .iter()
        .filter(|h| {
            let key = (
                Uuid::try_parse(&h.job_id).unwrap_or_default(),
                Uuid::try_parse(&h.lease_id).unwrap_or_default(),
            );
            !live.contains(&key)
        })
        .cloned()
        .collect())
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
        if let Err(e) = reap_once(&app, last_tick, now).await {
            tracing::warn!(error = %e, "reaper pass failed; will try again");
        }
        last_tick = now;
        app.hub.prune_runners();
    }
}

/// One reaper pass. `since` is the previous pass's time (for backoff wake-ups).
pub async fn reap_once(app: &App, since: i64, now: i64) -> Result<()> {
    // Expired leases.
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
            break;
        }
    }
    // Attempts past their deadline plus the grace, that the runner did not end.
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
        })
    })
    .await?;

    // Silent runners go offline.
    let lease_ms = app.rules().lease_ms;
    runner::Entity::update_many()
        .col_expr(
            runner::Column::State,
            Expr::value(pb::RunnerState::Offline as i32),
        )
        .filter(runner::Column::State.ne(pb::RunnerState::Offline as i32))
        .filter(runner::Column::LastHeartbeat.lt(now - lease_ms))
        .exec(app.store.db())
        .await?;

    // Backoffs that ended since the last pass make work dispatchable.
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

    if app.config.retention_seconds > 0 {
        let horizon = now.saturating_sub(
            i64::try_from(app.config.retention_seconds.saturating_mul(1000)).unwrap_or(i64::MAX),
        );
        purge_finished_before(app, horizon).await?;
    }
    Ok(())
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
