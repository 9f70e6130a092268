//! The reaper: what ends by itself with time. On every replica, every `--reap-interval-ms`:
//! - attempts whose lease expired end as lost (retried, or `FAILED/runner_lost`, or CANCELED
//!   when a cancel was pending, or taken back when their runner never acknowledged them);
//! - attempts past their deadline plus `--timeout-grace-seconds` end TIMED_OUT;
//! - cancels the runner has not confirmed by their deadline (the job's grace plus a lease)
//!   end CANCELED, even while the runner keeps heartbeating;
//! - runners silent for a lease period go OFFLINE;
//! - sandboxes idle past their idle timeout are deleted;
//! - backoffs that ended wake dispatch;
//! - retention deletes what is old enough.
//!
//! Each attempt is decided and applied on its own ([`end_each`]): one that cannot be ended
//! is logged and skipped, never holding up the others, and a scan walks on past it (by lease
//! order) instead of reading it again. Every query filters in SQL before it limits. Two
//! replicas never end one attempt twice: rows are locked (PostgreSQL) or written behind the
//! one writer (SQLite), and the decision is taken again on the locked row.
use std::time::Duration;

use gantry_proto as pb;
use sea_orm::{
    ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, sea_query::SimpleExpr,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    error::Result,
    jobs::lifecycle::Env,
    jobs::state::AttemptEnd,
    retention, runners,
    signals::Signals,
    store::entity::{attempt, job},
};

/// Attempts read (and ended) per transaction.
const REAP_BATCH: u64 = 256;

/// What the reaper is told by the configuration.
#[derive(Clone)]
pub struct Settings {
    /// Between passes.
    pub interval: Duration,
    /// Past an attempt's deadline before the server times it out itself, ms.
    pub timeout_grace_ms: i64,
    /// Terminal jobs and gone runners older than this are deleted, ms (0: never).
    pub retention_ms: i64,
    /// Blobs no artifact names are deleted this long after their last use, ms (0: never).
    pub blob_grace_ms: i64,
    /// Where blob bytes are.
    pub blobs: crate::blobs::BlobStore,
}

/// Runs the reaper until shutdown.
pub async fn run(env: Env, settings: Settings, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(settings.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = env.clock.now_ms();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = crate::signals::stopped(&mut shutdown) => return,
        }
        let now = env.clock.now_ms();
        pass(&env, &settings, last, now).await;
        last = now;
        env.hub.prune_runners();
    }
}

/// One reaper pass. `since` is the previous pass's time (for backoff wake-ups). Each step
/// runs even when another failed; failures are logged and retried on the next pass.
pub async fn pass(env: &Env, settings: &Settings, since: i64, now: i64) {
    let grace = settings.timeout_grace_ms;
    let steps = [
        (
            "expired leases",
            scan(env, attempt::Column::LeaseExpiresAt.lt(now), |a| {
                AttemptEnd::Lost {
                    message: format!("runner {} stopped heartbeating; lease expired", a.runner_id),
                }
            })
            .await,
        ),
        (
            "overdue attempts",
            scan(env, attempt::Column::DeadlineAt.lt(now - grace), |_| {
                AttemptEnd::TimedOut {
                    message:
                        "the server marked the attempt timed out: no final report past its deadline"
                            .into(),
                    exit_code: None,
                }
            })
            .await,
        ),
        (
            "unconfirmed cancels",
            scan(env, attempt::Column::CancelDeadlineAt.lt(now), |a| {
                AttemptEnd::Canceled {
                    message: format!("runner {} did not confirm the cancel in time", a.runner_id),
                    exit_code: None,
                }
            })
            .await,
        ),
        (
            "silent runners",
            runners::mark_silent(&env.store, now - env.rules.lease_ms)
                .await
                .map(|_| ()),
        ),
        (
            "idle sandboxes",
            crate::sandboxes::reap_idle(env, now).await,
        ),
        (
            "backoff wake-ups",
            wake_after_backoff(env, since, now).await,
        ),
        ("retention", retain(env, settings, now).await),
    ];
    for (step, result) in steps {
        if let Err(e) = result {
            tracing::warn!(step, error = %e, "reaper step failed; will try again");
        }
    }
}

/// Ends every unfinished attempt matching `due` (re-checked on the locked row), in pages by
/// lease order, as `end` says.
async fn scan(
    env: &Env,
    due: SimpleExpr,
    end: impl Fn(&attempt::Model) -> AttemptEnd,
) -> Result<()> {
    let mut after: Option<Uuid> = None;
    loop {
        let mut q = attempt::Entity::find()
            .select_only()
            .column(attempt::Column::LeaseId)
            .filter(attempt::Column::FinishedAt.is_null())
            .filter(due.clone());
        if let Some(after) = after {
            q = q.filter(attempt::Column::LeaseId.gt(after));
        }
        let page: Vec<Uuid> = q
            .order_by_asc(attempt::Column::LeaseId)
            .limit(REAP_BATCH)
            .into_tuple()
            .all(env.store.db())
            .await?;
        let full = page.len() as u64 == REAP_BATCH;
        after = page.last().copied();
        end_each(env, page, &due, &end).await?;
        if !full {
            return Ok(());
        }
    }
}

/// Ends each attempt of `leases` that is still unfinished and still `due` once locked, each
/// on its own.
async fn end_each(
    env: &Env,
    leases: Vec<Uuid>,
    due: &SimpleExpr,
    end: &impl Fn(&attempt::Model) -> AttemptEnd,
) -> Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    // Locked first (PostgreSQL; on SQLite the writer excludes every other), then asked
    // again: a report, a heartbeat or another replica may have ended or extended them since
    // the page was read, and what is decided must hold until the commit.
    lc.load_attempts(leases.iter().copied()).await?;
    let still: Vec<Uuid> = attempt::Entity::find()
        .select_only()
        .column(attempt::Column::LeaseId)
        .filter(attempt::Column::LeaseId.is_in(leases))
        .filter(attempt::Column::FinishedAt.is_null())
        .filter(due.clone())
        .into_tuple()
        .all(lc.txn())
        .await?;
    for lease in still {
        let Some(row) = lc.attempt(&lease).cloned() else {
            continue;
        };
        let why = end(&row);
        tracing::info!(job = %row.job_id, attempt = row.number, reason = %why.message(), "ending attempt");
        if let Err(e) = lc.end_attempt(lease, why) {
            tracing::warn!(job = %row.job_id, %lease, error = %e, "could not end the attempt; skipping it");
        }
    }
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await
}

/// Backoffs that ended since the last pass make work dispatchable.
async fn wake_after_backoff(env: &Env, since: i64, now: i64) -> Result<()> {
    let woke = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::Status.eq(pb::JobStatus::Queued as i32))
        .filter(job::Column::NotBefore.gt(since))
        .filter(job::Column::NotBefore.lte(now))
        .limit(1)
        .into_tuple::<Uuid>()
        .all(env.store.db())
        .await?;
    if !woke.is_empty() {
        env.hub.publish(Signals {
            work: true,
            ..Default::default()
        });
    }
    Ok(())
}

async fn retain(env: &Env, settings: &Settings, now: i64) -> Result<()> {
    if settings.retention_ms > 0 {
        let horizon = now.saturating_sub(settings.retention_ms);
        retention::purge_finished_before(&env.store, horizon).await?;
        retention::purge_runners_gone_before(&env.store, horizon).await?;
    }
    if settings.blob_grace_ms > 0 {
        let horizon = now.saturating_sub(settings.blob_grace_ms);
        crate::work::artifacts::purge_unreferenced(&env.store, &settings.blobs, horizon).await?;
    }
    Ok(())
}
