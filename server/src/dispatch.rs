//! Dispatch: which runner gets which job. A job goes to a runner when the runner serves the
//! job's queue, offers its executor, carries every label the job requires, has a free slot
//! ([`crate::capacity`]), the job's `not_before` has passed, and the job's `lock_key` (if
//! any) is free ([`crate::locks`]). Among those, higher priority first, then the oldest
//! (UUIDv7 order).
//!
//! One task, the [`Claimer`], claims for every runner: the claims waiting at a moment share
//! one write transaction, one read of the runners and one scan of candidates, given out
//! round robin. The scan walks the queue in dispatch order by key (not by offset), with
//! jobs whose lock key is held left out by the query itself. On PostgreSQL candidate rows are
//! read `FOR UPDATE SKIP LOCKED`, so replicas claiming at once never hand out one job twice.
//! An answer never grows past the server's message limit.
use std::collections::{BTreeSet, HashMap, HashSet};

use gantry_proto as pb;
use prost::Message;
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{LockBehavior, LockType},
};
use uuid::Uuid;

use crate::{
    batch::{GroupCommit, Queue},
    capacity,
    error::{Error, Result},
    jobs::lifecycle::{Env, job_view},
    jobs::state,
    locks,
    store::entity::{job, runner},
    work,
};

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
/// Bytes of an assignment besides its spec (ids, work token, times, framing), counted
/// generously.
const ASSIGNMENT_OVERHEAD: usize = 384;

/// A claim: the runner, and how many jobs it asks for at most.
pub type Want = (Uuid, usize);

/// Handle to the claimer: claims are group-committed (see [`crate::batch`]).
pub type Claimer = GroupCommit<Want, Vec<pb::Assignment>>;

/// Starts the claimer on `queue`; an answer holds at most `max_answer_bytes` of
/// assignments (at least one). SQLite has one writer: one claim transaction at a time. On
/// PostgreSQL a few overlap (every statement is a network round trip).
pub fn start_claimer(env: Env, max_answer_bytes: usize, queue: Queue<Want, Vec<pb::Assignment>>) {
    let parallel = if env.store.is_postgres() {
        PARALLEL_CLAIMS_POSTGRES
    } else {
        1
    };
    GroupCommit::spawn(queue, "claim", MAX_CLAIMS_AT_ONCE, parallel, move |wants| {
        let env = env.clone();
        async move { claim_for(&env, max_answer_bytes, &wants).await }
    });
}

/// One claim of the batch: what the runner offers, what it may still take, what it got.
struct Taker {
    id: Uuid,
    labels: HashMap<String, String>,
    executors: Vec<i32>,
    queues: Vec<String>,
    capacity: u32,
    /// It holds sandboxes (RegisterRequest.sandboxes).
    sandboxes: bool,
    room: usize,
    bytes_left: usize,
    got: Vec<pb::Assignment>,
}

impl Taker {
    fn takes(&self, job: &job::Model, spec: &pb::JobSpec) -> bool {
        self.room > 0
            && (self.sandboxes || state::Kind::of(job.kind) != state::Kind::Sandbox)
            && self.queues.contains(&job.queue)
            && self.executors.contains(&job.executor)
            && spec
                .labels
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Claims for every want in one transaction. Answers in the order asked; a runner that is
/// unknown or revoked is refused (UNAUTHENTICATED), a draining one gets nothing.
async fn claim_for(
    env: &Env,
    max_answer_bytes: usize,
    wants: &[Want],
) -> Result<Vec<Result<Vec<pb::Assignment>>>> {
    let ids: Vec<Uuid> = wants.iter().map(|(id, _)| *id).collect();
    let rows: HashMap<Uuid, runner::Model> = runner::Entity::find()
        .filter(runner::Column::Id.is_in(ids))
        .all(env.store.db())
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let mut takers: Vec<Result<Taker>> = wants
        .iter()
        .map(|(id, asked)| {
            let row = rows.get(id).ok_or_else(|| Error::unknown_runner(*id))?;
            if row.revoked_at.is_some() {
                return Err(Error::revoked_runner(*id));
            }
            let info = pb::RegisterRequest::decode(row.info.as_slice())?;
            let draining = row.state == pb::RunnerState::Draining as i32;
            Ok(Taker {
                id: *id,
                labels: info.labels,
                executors: info.executors,
                queues: info.queues,
                capacity: u32::try_from(row.capacity).unwrap_or(1),
                sandboxes: info.sandboxes,
                room: if draining { 0 } else { *asked },
                bytes_left: max_answer_bytes,
                got: Vec::new(),
            })
        })
        .collect();
    let answer =
        |takers: Vec<Result<Taker>>| takers.into_iter().map(|t| t.map(|t| t.got)).collect();
    // Capacity first from a plain read, so that a runner with no free slot costs no write
    // transaction; counted again inside the claim's transaction below.
    fit_to_capacity(env.store.db(), &mut takers).await?;
    let open = |takers: &[Result<Taker>]| {
        takers
            .iter()
            .flatten()
            .filter(|t| t.room > 0)
            .map(|t| (t.queues.clone(), t.executors.clone()))
            .collect::<Vec<_>>()
    };
    let wanted = open(&takers);
    let queues: Vec<String> = wanted
        .iter()
        .flat_map(|(q, _)| q.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let executors: Vec<i32> = wanted
        .iter()
        .flat_map(|(_, e)| e.iter().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if queues.is_empty() {
        return Ok(answer(takers));
    }
    let now = env.clock.now_ms();
    let dispatchable = || {
        Condition::all()
            .add(job::Column::Status.eq(pb::JobStatus::Queued as i32))
            .add(job::Column::Queue.is_in(queues.clone()))
            .add(job::Column::Executor.is_in(executors.clone()))
            .add(job::Column::NotBefore.lte(now))
            // A command is started by its sandbox, never dispatched.
            .add(job::Column::Kind.ne(state::Kind::Command.as_i32()))
            .add(locks::free())
    };
    // A read first: no write transaction (on SQLite, the one writer) when nothing waits.
    let waiting = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(dispatchable())
        .limit(1)
        .into_tuple::<Uuid>()
        .one(env.store.db())
        .await?;
    if waiting.is_none() {
        return Ok(answer(takers));
    }
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    // Capacity, counted inside the claim's own transaction.
    fit_to_capacity(lc.txn(), &mut takers).await?;
    let room: usize = takers.iter().flatten().map(|t| t.room).sum();
    let postgres = env.store.is_postgres();
    let window = room as u64 + WINDOW_SLACK;
    let mut left = room;
    let mut claimed = 0usize;
    let mut next = 0usize; // round robin over the takers
    let mut seen = 0u64;
    let mut cursor: Option<(i32, Uuid)> = None;
    // Keys taken in this transaction: later candidates with them wait.
    let mut keys: HashSet<String> = HashSet::new();
    while left > 0 && seen < MAX_CANDIDATES {
        let mut q = job::Entity::find().filter(dispatchable());
        if let Some((priority, id)) = cursor {
            // Keyset: after the last candidate in (priority desc, id asc) order.
            q = q.filter(
                Condition::any()
                    .add(job::Column::Priority.lt(priority))
                    .add(
                        Condition::all()
                            .add(job::Column::Priority.eq(priority))
                            .add(job::Column::Id.gt(id)),
                    ),
            );
        }
        q = q
            .order_by_desc(job::Column::Priority)
            .order_by_asc(job::Column::Id)
            .limit(window);
        if postgres {
            q = q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let candidates = q.all(lc.txn()).await?;
        let count = candidates.len() as u64;
        seen += count;
        for candidate in candidates {
            cursor = Some((candidate.priority, candidate.id));
            if left == 0 {
                break;
            }
            if candidate
                .lock_key
                .as_ref()
                .is_some_and(|k| keys.contains(k))
            {
                continue;
            }
            let Ok(spec) = pb::JobSpec::decode(candidate.spec.as_slice()) else {
                tracing::error!(job = %candidate.id, "a queued job's stored spec does not decode; it cannot be dispatched");
                continue;
            };
            let size = spec.encoded_len() + ASSIGNMENT_OVERHEAD;
            let n = takers.len();
            let Some(i) = (0..n).map(|k| (next + k) % n).find(|&i| {
                takers[i].as_ref().is_ok_and(|t| {
                    t.takes(&candidate, &spec) && (t.got.is_empty() || size <= t.bytes_left)
                })
            }) else {
                continue;
            };
            let Ok(taker) = takers[i].as_mut() else {
                continue;
            };
            let view = job_view(&candidate);
            let lease = Uuid::now_v7();
            let Ok(decision) = state::claim(&view, taker.id, lease, lc.now, env.rules.lease_ms)
            else {
                continue;
            };
            let Some(start) = decision.start.clone() else {
                continue;
            };
            if let Some(key) = &candidate.lock_key {
                // Decided; the lock is taken before the decision is applied, and an apply
                // that failed after it would fail the whole transaction (no stale lock).
                if !locks::try_take(lc.txn(), key, candidate.id, lease).await? {
                    continue; // another replica took it meanwhile
                }
                keys.insert(key.clone());
            }
            let job_id = candidate.id;
            let sandbox = state::Kind::of(candidate.kind) == state::Kind::Sandbox;
            // Read just now in this transaction (and locked on PostgreSQL): no second read.
            lc.adopt_job(candidate);
            lc.apply(decision)?;
            let (work_token, hash) = work::token::issue(lease);
            lc.set_work_token_hash(lease, hash);
            taker.got.push(pb::Assignment {
                job_id: job_id.to_string(),
                lease_id: lease.to_string(),
                attempt: start.number,
                spec: Some(spec),
                lease_expires_at_unix_ms: start.lease_expires_at,
                deadline_unix_ms: start.deadline_at,
                sandbox,
                work_token,
            });
            taker.bytes_left = taker.bytes_left.saturating_sub(size);
            taker.room -= 1;
            if taker.bytes_left < ASSIGNMENT_OVERHEAD {
                taker.room = 0;
            }
            left -= 1;
            claimed += 1;
            next = i + 1;
        }
        if count < window {
            break;
        }
    }
    if claimed == 0 {
        // Nothing changed: release the transaction (and the SQLite gate) without writing.
        drop(lc);
        wtx.txn.rollback().await?;
        return Ok(answer(takers));
    }
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    Ok(answer(takers))
}

/// Lowers each taker's room to what its capacity leaves free.
async fn fit_to_capacity(
    db: &impl sea_orm::ConnectionTrait,
    takers: &mut [Result<Taker>],
) -> Result<()> {
    let asking: Vec<Uuid> = takers
        .iter()
        .flatten()
        .filter(|t| t.room > 0)
        .map(|t| t.id)
        .collect();
    let held = capacity::held(db, &asking).await?;
    for t in takers.iter_mut().flatten() {
        t.room = capacity::room(t.capacity, held.get(&t.id).copied().unwrap_or(0), t.room);
    }
    Ok(())
}

/// Takes back claims whose assignments could not be sent (see [`state::take_back`]).
pub async fn return_undelivered(env: &Env, runner: Uuid, leases: Vec<Uuid>) -> Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    lc.load_attempts(leases.iter().copied()).await?;
    for lease in leases {
        let why = format!("the assignment never reached runner {runner}; queued again");
        if let Err(e) = lc.take_back(lease, why) {
            tracing::warn!(%lease, error = %e, "could not take back an undelivered claim");
        }
    }
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await
}

/// Long-poll claim: waits up to `wait` for work, woken by the hub.
pub async fn claim_wait(
    claimer: &Claimer,
    hub: &crate::signals::Hub,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    runner_id: Uuid,
    max: usize,
    wait: std::time::Duration,
) -> Result<Vec<pb::Assignment>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut work = hub.subscribe_work();
    loop {
        work.borrow_and_update();
        let got = claimer.call((runner_id, max)).await?;
        if !got.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(got);
        }
        tokio::select! {
            _ = work.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = crate::signals::stopped(&mut shutdown) => return Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        auth::Auth,
        clock::Clock,
        jobs::lifecycle::{Rules, new_job},
        signals::Hub,
        store::Store,
    };
    use sea_orm::TransactionTrait;

    async fn env() -> Env {
        Env {
            store: Store::memory().await.expect("store"),
            hub: std::sync::Arc::new(Hub::default()),
            clock: Clock::manual(1_000_000),
            rules: Rules::with_lease(3_000),
        }
    }

    async fn runner(env: &Env, labels: &[(&str, &str)], capacity: u32) -> Uuid {
        let id = Uuid::now_v7();
        let (_, hash) = Auth::issue_credential(id);
        crate::runners::register(
            &env.store,
            0,
            id,
            hash,
            pb::RegisterRequest {
                name: "r".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                capacity,
                executors: vec![pb::ExecutorKind::Process as i32],
                ..Default::default()
            },
        )
        .await
        .expect("register");
        id
    }

    /// Submits jobs (already valid) in one transaction; returns their ids in order.
    async fn submit(env: &Env, specs: Vec<pb::JobSpec>) -> Vec<Uuid> {
        let txn = env.store.db().begin().await.expect("txn");
        let mut lc = crate::jobs::lifecycle::Lifecycle::new(&txn, env.rules, 0);
        let mut ids = Vec::new();
        for mut spec in specs {
            spec.executor = pb::ExecutorKind::Process as i32;
            if spec.queue.is_empty() {
                spec.queue = "default".into();
            }
            let model = new_job(&spec, None, 0);
            ids.push(model.id);
            lc.insert_job(model);
        }
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        ids
    }

    fn spec() -> pb::JobSpec {
        pb::JobSpec {
            command: vec!["true".into()],
            timeout_seconds: 60,
            ..Default::default()
        }
    }

    async fn claim(env: &Env, runner: Uuid, n: usize) -> Result<Vec<Uuid>> {
        claim_bytes(env, runner, n, 4 << 20).await
    }

    async fn claim_bytes(env: &Env, runner: Uuid, n: usize, bytes: usize) -> Result<Vec<Uuid>> {
        let mut answers = claim_for(env, bytes, &[(runner, n)]).await?;
        let got = answers.pop().expect("one answer")?;
        Ok(got
            .iter()
            .map(|a| Uuid::parse_str(&a.job_id).expect("uuid"))
            .collect())
    }

    #[tokio::test]
    async fn claims_follow_queues_labels_and_priority_then_age() {
        let env = env().await;
        let gpu = runner(&env, &[("gpu", "yes")], 10).await;
        let plain = runner(&env, &[], 10).await;
        let labelled = pb::JobSpec {
            labels: [("gpu".to_string(), "yes".to_string())].into(),
            ..spec()
        };
        let urgent = pb::JobSpec {
            priority: 5,
            ..spec()
        };
        let elsewhere = pb::JobSpec {
            queue: "other".into(),
            ..spec()
        };
        let ids = submit(&env, vec![labelled, spec(), urgent, elsewhere]).await;
        // The plain runner cannot take the labelled job; the other queue is nobody's here.
        assert_eq!(
            claim(&env, plain, 10).await.expect("claim"),
            [ids[2], ids[1]]
        );
        assert_eq!(claim(&env, gpu, 10).await.expect("claim"), [ids[0]]);
    }

    #[tokio::test]
    async fn a_held_lock_key_hides_its_waiters_from_the_scan() {
        let env = env().await;
        let holder = runner(&env, &[], 1).await;
        let other = runner(&env, &[], 1).await;
        let locked = pb::JobSpec {
            lock_key: "k".into(),
            ..spec()
        };
        // Far more waiters than one claim looks at.
        let mut specs = vec![locked; MAX_CANDIDATES as usize * 2];
        specs.push(spec());
        let ids = submit(&env, specs).await;
        assert_eq!(claim(&env, holder, 1).await.expect("claim"), [ids[0]]);
        assert_eq!(
            claim(&env, other, 1).await.expect("claim"),
            [*ids.last().expect("free job")]
        );
    }

    #[tokio::test]
    async fn capacity_counts_what_the_runner_already_holds() {
        let env = env().await;
        let r = runner(&env, &[], 2).await;
        submit(&env, vec![spec(); 5]).await;
        assert_eq!(claim(&env, r, 1).await.expect("claim").len(), 1);
        assert_eq!(claim(&env, r, 5).await.expect("claim").len(), 1);
        assert!(claim(&env, r, 5).await.expect("claim").is_empty());
    }

    #[tokio::test]
    async fn unknown_runners_are_refused_and_draining_ones_get_nothing() {
        let env = env().await;
        submit(&env, vec![spec()]).await;
        assert!(matches!(
            claim(&env, Uuid::now_v7(), 1).await,
            Err(Error::Unauthenticated(_))
        ));
        let r = runner(&env, &[], 1).await;
        crate::runners::drain_self(&env.store, r, "test")
            .await
            .expect("drain");
        assert!(claim(&env, r, 1).await.expect("claim").is_empty());
    }

    #[tokio::test]
    async fn an_answer_stays_within_the_message_limit_but_always_carries_one() {
        let env = env().await;
        let r = runner(&env, &[], 10).await;
        let big = pb::JobSpec {
            env: [("PAD".to_string(), "x".repeat(4096))].into(),
            ..spec()
        };
        submit(&env, vec![big; 4]).await;
        // Room for two by the limit; one more does not fit.
        assert_eq!(
            claim_bytes(&env, r, 10, 10_000).await.expect("claim").len(),
            2
        );
        // Even a limit below one assignment hands out one.
        assert_eq!(claim_bytes(&env, r, 10, 100).await.expect("claim").len(), 1);
    }
}
