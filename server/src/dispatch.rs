//! Dispatch: which runner gets which job. A job goes to a runner when the runner serves the
//! job's queue, offers its executor, carries every label the job requires, has a free slot,
//! the job's `not_before` has passed, and the job's `lock_key` (if any) is free. Among
//! those, higher priority first, then the oldest (UUIDv7 order).
//!
//! One task, the [`Claimer`], claims for every runner: the claims waiting at a moment share
//! one write transaction. On PostgreSQL candidate rows are read
//! `FOR UPDATE SKIP LOCKED`, so replicas claiming at once never hand out one job twice, and
//! a lock key is taken by inserting its row (primary key) in the same transaction.
use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use gantry_proto as pb;
use sea_orm::{
    ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{LockBehavior, LockType, OnConflict},
};
use uuid::Uuid;

use crate::{
    App,
    batch::{GroupCommit, Queue},
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

/// Claim transactions in flight at once on PostgreSQL.
const PARALLEL_CLAIMS_POSTGRES: usize = 4;

/// Claim requests answered by one transaction at most.
const MAX_CLAIMS_AT_ONCE: usize = 256;

/// Candidate rows read per window beyond what the waiting claims can take: jobs no waiting
/// runner can run (labels) are skipped, and further windows follow when needed.
const WINDOW_SLACK: u64 = 16;

/// Candidates one claim transaction looks at, at most: further windows find jobs behind
/// ones that no waiting runner can take (label matching in SQL is on the roadmap).
const MAX_CANDIDATES: u64 = 1024;

/// Handle to the claimer: the one task that claims jobs for runners. Claims,
/// `(runner, at most)`, are group-committed (see [`crate::batch`]): every claim waiting when
/// the claimer is free (one per session woken by new work, typically) is answered by one
/// transaction that reads one window of candidates for all of them.
pub type Claimer = GroupCommit<(Uuid, usize), Vec<pb::Assignment>>;

/// Starts the claimer for `app` on `queue`. SQLite has one writer: one claim transaction at
/// a time. On PostgreSQL a few overlap (every statement is a network round trip); SKIP
/// LOCKED keeps them apart.
pub fn start_claimer(app: App, queue: Queue<(Uuid, usize), Vec<pb::Assignment>>) {
    let parallel = if app.store.is_postgres() {
        PARALLEL_CLAIMS_POSTGRES
    } else {
        1
    };
    GroupCommit::spawn(queue, "claim", MAX_CLAIMS_AT_ONCE, parallel, move |wants| {
        let app = app.clone();
        async move { claim_for(&app, &wants).await }
    });
}

/// One claim of the batch: the runner, what it may still take, what it got.
struct Want {
    runner: RunnerProfile,
    room: usize,
    got: Vec<pb::Assignment>,
}

impl Want {
    fn takes(&self, job: &job::Model, spec: &pb::JobSpec) -> bool {
        self.room > 0
            && self.runner.queues.contains(&job.queue)
            && self.runner.executors.contains(&job.executor)
            && spec
                .labels
                .iter()
                .all(|(k, v)| self.runner.labels.get(k) == Some(v))
    }
}

/// Claims for every `(runner, max)` in one transaction: one window of candidates, in
/// dispatch order, each given to the next runner (round robin) that may take it. Answers
/// in the order asked; a runner that is unknown gets `NotFound`, a draining one nothing.
async fn claim_for(app: &App, wants: &[(Uuid, usize)]) -> Result<Vec<Result<Vec<pb::Assignment>>>> {
    let ids: Vec<Uuid> = wants.iter().map(|(id, _)| *id).collect();
    let mut profiles: HashMap<Uuid, RunnerProfile> = HashMap::new();
    for row in runner::Entity::find()
        .filter(runner::Column::Id.is_in(ids))
        .all(app.store.db())
        .await?
    {
        let info: pb::RegisterRequest = decode(&row.info)?;
        profiles.insert(
            row.id,
            RunnerProfile {
                id: row.id,
                labels: info.labels,
                executors: info.executors,
                queues: info.queues,
                state: row.state,
                capacity: u32::try_from(row.capacity).unwrap_or(1),
            },
        );
    }
    // Slot i of `claims` answers wants[i]; None: the runner is unknown.
    let mut claims: Vec<Option<Want>> = wants
        .iter()
        .map(|(id, max)| {
            profiles.get(id).map(|p| Want {
                room: if p.state == pb::RunnerState::Draining as i32 {
                    0
                } else {
                    *max
                },
                runner: p.clone(),
                got: Vec::new(),
            })
        })
        .collect();
    let answer = |claims: Vec<Option<Want>>| -> Vec<Result<Vec<pb::Assignment>>> {
        claims
            .into_iter()
            .zip(wants)
            .map(|(c, (id, _))| match c {
                Some(w) => Ok(w.got),
                None => Err(Error::NotFound(format!("runner {id}"))),
            })
            .collect()
    };
    let open = || claims.iter().flatten().filter(|w| w.room > 0);
    let room: usize = open().map(|w| w.room).sum();
    let queues: BTreeSet<&String> = open().flat_map(|w| &w.runner.queues).collect();
    let queues: Vec<String> = queues.into_iter().cloned().collect();
    let executors: BTreeSet<i32> = open()
        .flat_map(|w| w.runner.executors.iter().copied())
        .collect();
    let executors: Vec<i32> = executors.into_iter().collect();
    if room == 0 {
        return Ok(answer(claims));
    }
    // A read first: no write transaction (on SQLite, the one writer) when nothing waits.
    let waiting = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::Status.eq(pb::JobStatus::Queued as i32))
        .filter(job::Column::Queue.is_in(queues.clone()))
        .filter(job::Column::Executor.is_in(executors.clone()))
        .filter(job::Column::NotBefore.lte(crate::lifecycle::now_ms()))
        .limit(1)
        .into_tuple::<Uuid>()
        .one(app.store.db())
        .await?;
    if waiting.is_none() {
        return Ok(answer(claims));
    }
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    let postgres = app.store.is_postgres();
    let window = room as u64 + WINDOW_SLACK;
    let mut left = room;
    let mut next = 0usize; // round robin over the claims
    let mut offset = 0u64;
    while left > 0 && offset < MAX_CANDIDATES {
        let mut q = job::Entity::find()
            .filter(job::Column::Status.eq(pb::JobStatus::Queued as i32))
            .filter(job::Column::Queue.is_in(queues.clone()))
            .filter(job::Column::Executor.is_in(executors.clone()))
            .filter(job::Column::NotBefore.lte(lc.now))
            .order_by_desc(job::Column::Priority)
            .order_by_asc(job::Column::Id)
            .offset(offset)
            .limit(window);
        if postgres {
            q = q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let candidates = q.all(lc.txn()).await?;
        let seen = candidates.len() as u64;
        for candidate in candidates {
            if left == 0 {
                break;
            }
            let spec: pb::JobSpec = decode(&candidate.spec)?;
            let n = claims.len();
            let Some(taker) = (0..n).map(|k| (next + k) % n).find(|&i| {
                claims[i]
                    .as_ref()
                    .is_some_and(|w| w.takes(&candidate, &spec))
            }) else {
                continue;
            };
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
            let Some(want) = claims[taker].as_mut() else {
                continue;
            };
            let attempt = lc.start_attempt(job_id, want.runner.id, lease_id)?;
            want.got.push(pb::Assignment {
                job_id: job_id.to_string(),
                lease_id: attempt.lease_id.to_string(),
                attempt: u32::try_from(attempt.number).unwrap_or_default(),
                spec: Some(spec),
                lease_expires_at_unix_ms: attempt.lease_expires_at,
                deadline_unix_ms: attempt.deadline_at,
            });
            want.room -= 1;
            left -= 1;
            next = taker + 1;
        }
        if seen < window {
            break;
        }
        offset += seen;
    }
    if left == room {
        // Nothing changed: release the transaction (and the SQLite gate) without writing.
        drop(lc);
        wtx.txn.rollback().await?;
        return Ok(answer(claims));
    }
    let signals = lc.flush().await?;
    wtx.commit().await?;
    app.hub.publish(signals);
    Ok(answer(claims))
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
        let max = max.min(usize::try_from(room).unwrap_or(0));
        let got = if max == 0 {
            Vec::new()
        } else {
            app.claimer.call((runner_id, max)).await?
        };
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
