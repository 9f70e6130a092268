//! Dispatch: which runner gets which job. A job goes to a runner when the runner serves the
//! job's queue, offers its executor, carries every label the job requires, has a free slot,
//! the job's `not_before` has passed, and the job's `lock_key` (if any) is free. Among
//! those, higher priority first, then the oldest (UUIDv7 order).
//!
//! Claims run in a write transaction; on PostgreSQL candidate rows are read
//! `FOR UPDATE SKIP LOCKED`, so replicas claiming at once never hand out one job twice, and
//! a lock key is taken by inserting its row (primary key) in the same transaction.
use std::{collections::HashMap, time::Duration};

use gantry_proto as pb;
use sea_orm::{
    ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{LockBehavior, LockType, OnConflict},
};
use uuid::Uuid;

use crate::{
    App,
    error::{Error, Result},
    lifecycle::{Lifecycle, decode},
    store::entity::{attempt, job, lock, runner},
};

/// What dispatch needs to know about a runner.
#[derive(Clone, Debug)]
pub struct RunnerProfile {
    /// Runner id.
    pub id: Uuid,
    /// Labels it carries.
    pub labels: HashMap<String, String>,
    /// Executors it offers (`ExecutorKind` numbers).
    pub executors: Vec<i32>,
    /// Queues it serves.
    pub queues: Vec<String>,
    /// `RunnerState` number.
    pub state: i32,
    /// Concurrent jobs it takes.
    pub capacity: u32,
}

/// Loads a runner's profile.
pub async fn profile(app: &App, runner_id: Uuid) -> Result<RunnerProfile> {
    let row = runner::Entity::find_by_id(runner_id)
        .one(app.store.db())
        .await?
        .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
    let info: pb::RegisterRequest = decode(&row.info)?;
    Ok(RunnerProfile {
        id: row.id,
        labels: info.labels,
        executors: info.executors,
        queues: info.queues,
        state: row.state,
        capacity: u32::try_from(row.capacity).unwrap_or(1),
    })
}

/// How many candidates one claim looks at per window: what it can take and a little more
/// (jobs whose labels the runner lacks are skipped; further windows follow when needed).
/// Each candidate is a whole row with its spec, so a wide window costs every claim.
fn window(max: usize) -> u64 {
    (max as u64) + 16
}

/// Claims up to `max` jobs for `runner` now. Returns the assignments (possibly none).
pub async fn claim(app: &App, runner: &RunnerProfile, max: usize) -> Result<Vec<pb::Assignment>> {
    if max == 0 || runner.state == pb::RunnerState::Draining as i32 {
        return Ok(Vec::new());
    }
    // A read first: no write transaction (on SQLite, the one writer) when nothing waits.
    let waiting = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::Status.eq(pb::JobStatus::Queued as i32))
        .filter(job::Column::Queue.is_in(runner.queues.clone()))
        .filter(job::Column::Executor.is_in(runner.executors.clone()))
        .filter(job::Column::NotBefore.lte(crate::lifecycle::now_ms()))
        .limit(1)
        .into_tuple::<Uuid>()
        .one(app.store.db())
        .await?;
    if waiting.is_none() {
        return Ok(Vec::new());
    }
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    let postgres = app.store.is_postgres();
    let mut assignments = Vec::new();
    let mut offset = 0u64;
    // Further windows find jobs behind ones whose labels this runner lacks: up to about a
    // thousand candidates per claim (label matching in SQL is on the roadmap).
    let windows = 1024u64.div_ceil(window(max)).max(4);
    for _ in 0..windows {
        let mut q = job::Entity::find()
            .filter(job::Column::Status.eq(pb::JobStatus::Queued as i32))
            .filter(job::Column::Queue.is_in(runner.queues.clone()))
            .filter(job::Column::Executor.is_in(runner.executors.clone()))
            .filter(job::Column::NotBefore.lte(lc.now))
            .order_by_desc(job::Column::Priority)
            .order_by_asc(job::Column::Id)
            .offset(offset)
            .limit(window(max));
        if postgres {
            q = q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let candidates = q.all(lc.txn()).await?;
        let seen = candidates.len() as u64;
        for candidate in candidates {
            if assignments.len() >= max {
                break;
            }
            let spec: pb::JobSpec = decode(&candidate.spec)?;
            if !spec
                .labels
                .iter()
                .all(|(k, v)| runner.labels.get(k) == Some(v))
            {
                continue;
            }
            let job_id = candidate.id;
            let lock_key = candidate.lock_key.clone();
            // Read just now in this transaction (and locked on PostgreSQL): no second read.
            lc.adopt_job(candidate);
            // The attempt's lease is decided first: the lock row names it.
            let lease_id = Uuid::now_v7();
            if let Some(key) = &lock_key {
                let taken = lock::Entity::insert(sea_orm::IntoActiveModel::into_active_model(
                    lock::Model {
                        lock_key: key.clone(),
                        job_id,
                        lease_id,
                    },
                ))
                .on_conflict(
                    OnConflict::column(lock::Column::LockKey)
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(lc.txn())
                .await?;
                if taken == 0 {
                    continue; // held by another claimed job: this one waits.
                }
            }
            let attempt = lc.start_attempt(job_id, runner.id, lease_id)?;
            assignments.push(pb::Assignment {
                job_id: job_id.to_string(),
                lease_id: attempt.lease_id.to_string(),
                attempt: u32::try_from(attempt.number).unwrap_or_default(),
                spec: Some(spec),
                lease_expires_at_unix_ms: attempt.lease_expires_at,
                deadline_unix_ms: attempt.deadline_at,
            });
        }
        if assignments.len() >= max || seen < window(max) {
            break;
        }
        offset += seen;
    }
    if assignments.is_empty() {
        // Nothing changed: release the transaction (and the SQLite gate) without writing.
        drop(lc);
        wtx.txn.rollback().await?;
        return Ok(assignments);
    }
    let signals = lc.flush().await?;
    wtx.commit().await?;
    app.hub.publish(signals);
    Ok(assignments)
}

/// Takes back claims whose assignments could not be sent (see `Lifecycle::undo_claim`).
pub async fn return_undelivered(app: &App, leases: Vec<Uuid>) -> Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    lc.load_attempts(leases.iter().copied()).await?;
    for lease in leases {
        lc.undo_claim(lease).await?;
    }
    let signals = lc.flush().await?;
    wtx.commit().await?;
    app.hub.publish(signals);
    Ok(())
}

/// Long-poll claim: waits up to `wait` for work, woken by the hub.
pub async fn claim_wait(
    app: &App,
    runner_id: Uuid,
    max: usize,
    wait: Duration,
) -> Result<Vec<pb::Assignment>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut work = app.hub.subscribe_work();
    let mut shutdown = app.shutdown.clone();
    loop {
        work.borrow_and_update();
        let profile = profile(app, runner_id).await?;
        // Never more than the registered capacity, counting what it already holds.
        let active = attempt::Entity::find()
            .filter(attempt::Column::RunnerId.eq(runner_id))
            .filter(attempt::Column::FinishedAt.is_null())
            .count(app.store.db())
            .await?;
        let room = u64::from(profile.capacity).saturating_sub(active);
        let got = claim(app, &profile, max.min(usize::try_from(room).unwrap_or(0))).await?;
        if !got.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(got);
        }
        tokio::select! {
            _ = work.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = crate::events::stopped(&mut shutdown) => return Ok(Vec::new()),
        }
    }
}
