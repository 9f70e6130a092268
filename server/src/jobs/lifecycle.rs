//! The unit of work through which every job changes: decide, then apply.
//!
//! A [`Lifecycle`] lives for one write transaction. It loads the jobs and attempts a change
//! touches (locking their rows on PostgreSQL) and offers them as read-only views; the job
//! state machine ([`crate::jobs::state`]) decides each change from those views and returns
//! one complete [`Decision`]; [`Lifecycle::apply`] checks the whole decision against the
//! rows it was decided from — and only then changes them, in memory, in steps that cannot
//! fail. Output ([`Lifecycle::record_log`]) and progress are checked the same way before
//! anything changes. So an error anywhere — a refused report in the middle of a batch, a
//! decision that no longer fits the row — leaves every row as it was: no transition is ever
//! half-applied. At the end [`Lifecycle::flush`] writes everything in a handful of statements
//! (rows, events, logs, released locks, issued commands), and the caller commits and
//! publishes the signals.
//!
//! Services, the session handler, the report ingester, dispatch and the reaper all go
//! through it; the rules themselves live in the state machine, [`crate::locks`],
//! [`crate::logs`] and [`crate::commands`].
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use gantry_proto::{
    CommandUpdate, ExecCommand, ExecutorPhase, FailureKind, JobEvent, JobSpec, JobStatus,
    LimitReached, LogStream, PhaseChange, Progress, SandboxChange, StatusChange, StorageLimit,
    command, job_event,
};
use prost::Message;
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, IntoActiveModel,
    Iterable, QueryFilter, QueryOrder, QuerySelect, sea_query::OnConflict,
};
use uuid::Uuid;

use crate::{
    clock::Clock,
    commands,
    error::{Error, Result},
    jobs::{
        sandbox_state as sandbox_rules,
        state::{self, AttemptEnd, AttemptView, Decision, JobView, Kind, Retry, status_of},
    },
    locks, logs,
    signals::{Hub, Signals},
    store::{
        Store, WriteTxn,
        entity::{attempt, event, job, log_chunk, sandbox, sandbox_command},
    },
};

/// The rules the lifecycle applies, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Lease length, ms.
    pub lease_ms: i64,
    /// Log bytes stored per job, every attempt together (0: no limit).
    pub max_log_bytes_per_job: u64,
    /// Events stored per job before progress and phase events are dropped (0: no limit).
    pub max_events_per_job: u64,
    /// Largest log data of one report.
    pub max_log_data_bytes: usize,
    /// Largest message the server sends a runner (and the runner decodes): an ExecCommand
    /// must fit in it.
    pub max_message_bytes: usize,
}

impl Rules {
    /// The rules with a lease of `lease_ms` and no storage limits.
    pub fn with_lease(lease_ms: i64) -> Rules {
        Rules {
            lease_ms,
            max_log_bytes_per_job: 0,
            max_events_per_job: 0,
            max_log_data_bytes: logs::MAX_LOG_DATA_BYTES,
            max_message_bytes: 4 << 20,
        }
    }
}

/// What a unit of work needs, and nothing more: where to write, whom to tell, what time it
/// is, which rules hold. Cheap to clone.
#[derive(Clone)]
pub struct Env {
    pub store: Store,
    pub hub: Arc<Hub>,
    pub clock: Clock,
    pub rules: Rules,
}

impl Env {
    /// A unit of work in `wtx`, at the clock's now.
    pub fn lifecycle<'t>(&self, wtx: &'t WriteTxn) -> Lifecycle<'t> {
        Lifecycle::new(&wtx.txn, self.rules, self.clock.now_ms())
    }

    /// Commits `wtx` (after the unit of work in it was flushed into `signals`) and publishes
    /// what changed.
    pub async fn commit(&self, wtx: WriteTxn, signals: Signals) -> Result<()> {
        wtx.commit().await?;
        self.hub.publish(signals);
        Ok(())
    }
}

/// Rows a batch of statements can carry without hitting SQLite's bound-parameter limit.
const INSERT_CHUNK: usize = 500;
/// Rows per upsert of changed jobs or attempts (about 25 bind values a row).
const UPSERT_CHUNK: usize = 200;

/// One transaction's worth of job changes. See the module comment.
pub struct Lifecycle<'t> {
    txn: &'t DatabaseTransaction,
    postgres: bool,
    /// The transaction's clock, Unix ms: every change in it carries the same time.
    pub now: i64,
    pub rules: Rules,
    jobs: HashMap<Uuid, job::Model>,
    dirty_jobs: HashSet<Uuid>,
    new_jobs: HashSet<Uuid>,
    attempts: HashMap<Uuid, attempt::Model>,
    dirty_attempts: HashSet<Uuid>,
    new_attempts: HashSet<Uuid>,
    /// Stored attempts taken back: deleted at flush.
    removed_attempts: HashSet<Uuid>,
    events: Vec<event::ActiveModel>,
    logs: Vec<log_chunk::ActiveModel>,
    /// Locks to release at flush: (key, lease).
    released_locks: Vec<(String, Uuid)>,
    /// Commands to issue at flush, per runner in order.
    commands: BTreeMap<Uuid, Vec<command::Kind>>,
    /// Sandbox rows of the loaded sandboxes (and of the loaded commands' sandboxes).
    sandboxes: HashMap<Uuid, sandbox::Model>,
    dirty_sandboxes: HashSet<Uuid>,
    new_sandboxes: HashSet<Uuid>,
    /// Command rows inserted by this unit of work.
    new_commands: Vec<sandbox_command::Model>,
    /// Running sandboxes that may start their next command at flush, and whether one of
    /// their commands ended (one-shot).
    advance: BTreeMap<Uuid, bool>,
    /// Sandboxes that ended: their unfinished commands end too at flush.
    ended_sandboxes: BTreeSet<Uuid>,
    /// What to announce after commit.
    signals: Signals,
    /// A test double for a fault between a decision and its application (see the tests).
    #[cfg(test)]
    fault: Option<String>,
}

/// The state machine's view of a stored job. A spec that does not decode (a corrupted row)
/// still gives a view — no retry, default grace — so that a bad row never blocks the others.
pub fn job_view(model: &job::Model) -> JobView {
    let spec = JobSpec::decode(model.spec.as_slice()).ok();
    let retry = match &spec {
        Some(spec) => {
            let policy = spec.retry.unwrap_or_default();
            Retry {
                max_attempts: u32::try_from(model.max_attempts).unwrap_or(1),
                initial_backoff_ms: u64::from(policy.initial_backoff_ms),
                max_backoff_ms: u64::from(policy.max_backoff_ms),
            }
        }
        None => Retry::NONE,
    };
    let seconds = |s: u32| i64::from(s) * 1000;
    JobView {
        id: model.id,
        kind: Kind::of(model.kind),
        parent: model.parent_id,
        status: status_of(model.status),
        attempt_count: u32::try_from(model.attempt_count).unwrap_or_default(),
        current_lease: model.current_lease,
        runner: model.runner_id,
        lock_key: model.lock_key.clone(),
        retry,
        timeout_ms: spec.as_ref().map_or(0, |s| seconds(s.timeout_seconds)),
        cancel_grace_ms: spec.as_ref().map_or(
            seconds(crate::jobs::spec::DEFAULT_CANCEL_GRACE_SECONDS),
            |s| seconds(s.cancel_grace_seconds),
        ),
    }
}

/// The state machine's view of a stored attempt.
pub fn attempt_view(model: &attempt::Model) -> AttemptView {
    AttemptView {
        lease: model.lease_id,
        job: model.job_id,
        number: u32::try_from(model.number).unwrap_or_default(),
        runner: model.runner_id,
        started: model.started_at.is_some(),
        finished: model.finished_at.is_some(),
        acked_seq: model.acked_seq,
    }
}

impl<'t> Lifecycle<'t> {
    /// Starts a unit of work inside `txn` at `now`.
    pub fn new(txn: &'t DatabaseTransaction, rules: Rules, now: i64) -> Self {
        Lifecycle {
            txn,
            postgres: txn.get_database_backend() == sea_orm::DbBackend::Postgres,
            now,
            rules,
            jobs: HashMap::new(),
            dirty_jobs: HashSet::new(),
            new_jobs: HashSet::new(),
            attempts: HashMap::new(),
            dirty_attempts: HashSet::new(),
            new_attempts: HashSet::new(),
            removed_attempts: HashSet::new(),
            events: Vec::new(),
            logs: Vec::new(),
            released_locks: Vec::new(),
            commands: BTreeMap::new(),
            sandboxes: HashMap::new(),
            dirty_sandboxes: HashSet::new(),
            new_sandboxes: HashSet::new(),
            new_commands: Vec::new(),
            advance: BTreeMap::new(),
            ended_sandboxes: BTreeSet::new(),
            signals: Signals::default(),
            #[cfg(test)]
            fault: None,
        }
    }

    /// The transaction, for statements of the caller's own.
    pub fn txn(&self) -> &'t DatabaseTransaction {
        self.txn
    }

    /// Loads jobs not yet loaded, locking their rows on PostgreSQL.
    pub async fn load_jobs(&mut self, ids: impl IntoIterator<Item = Uuid>) -> Result<()> {
        let mut missing: Vec<Uuid> = ids
            .into_iter()
            .filter(|id| !self.jobs.contains_key(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if self.postgres && !missing.is_empty() {
            // A command comes with its sandbox: found first with a plain read, so that both
            // are locked in the one order (by id; a sandbox is older than its commands).
            for chunk in missing.clone().chunks(INSERT_CHUNK) {
                let parents: Vec<Option<Uuid>> = job::Entity::find()
                    .select_only()
                    .column(job::Column::ParentId)
                    .filter(job::Column::Id.is_in(chunk.iter().copied()))
                    .filter(job::Column::ParentId.is_not_null())
                    .into_tuple()
                    .all(self.txn)
                    .await?;
                missing.extend(parents.into_iter().flatten());
            }
            missing.sort();
            missing.dedup();
            missing.retain(|id| !self.jobs.contains_key(id));
        }
        for chunk in missing.chunks(INSERT_CHUNK) {
            let mut q = job::Entity::find().filter(job::Column::Id.is_in(chunk.iter().copied()));
            if self.postgres {
                // A fixed lock order (by id) keeps concurrent writers from deadlocking.
                q = q.order_by_asc(job::Column::Id).lock_exclusive();
            }
            for model in q.all(self.txn).await? {
                self.jobs.insert(model.id, model);
            }
        }
        // A command comes with its sandbox (its changes show in the sandbox's trail), and a
        // sandbox with its own row.
        let parents: Vec<Uuid> = self
            .jobs
            .values()
            .filter_map(|j| j.parent_id)
            .filter(|p| !self.jobs.contains_key(p))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for chunk in parents.chunks(INSERT_CHUNK) {
            let mut q = job::Entity::find().filter(job::Column::Id.is_in(chunk.iter().copied()));
            if self.postgres {
                q = q.order_by_asc(job::Column::Id).lock_exclusive();
            }
            for model in q.all(self.txn).await? {
                self.jobs.insert(model.id, model);
            }
        }
        let rows: Vec<Uuid> = self
            .jobs
            .values()
            .filter(|j| Kind::of(j.kind) == Kind::Sandbox && !self.sandboxes.contains_key(&j.id))
            .map(|j| j.id)
            .collect();
        for chunk in rows.chunks(INSERT_CHUNK) {
            for model in sandbox::Entity::find()
                .filter(sandbox::Column::Id.is_in(chunk.iter().copied()))
                .all(self.txn)
                .await?
            {
                self.sandboxes.insert(model.id, model);
            }
        }
        Ok(())
    }

    /// Loads attempts by lease not yet loaded, with their jobs.
    pub async fn load_attempts(&mut self, leases: impl IntoIterator<Item = Uuid>) -> Result<()> {
        let mut missing: Vec<Uuid> = leases
            .into_iter()
            .filter(|id| !self.attempts.contains_key(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if self.postgres && !missing.is_empty() {
            // A command's attempt comes with its sandbox's: found first with a plain read, so
            // that both are locked in the one order (by lease, before any job). A sandbox's
            // follow-up then finds its attempt loaded instead of locking it after its job.
            for chunk in missing.clone().chunks(INSERT_CHUNK) {
                let parents: Vec<Option<Uuid>> = attempt::Entity::find()
                    .select_only()
                    .column(attempt::Column::ParentLease)
                    .filter(attempt::Column::LeaseId.is_in(chunk.iter().copied()))
                    .filter(attempt::Column::ParentLease.is_not_null())
                    .into_tuple()
                    .all(self.txn)
                    .await?;
                missing.extend(parents.into_iter().flatten());
            }
            missing.sort();
            missing.dedup();
            missing.retain(|id| !self.attempts.contains_key(id));
        }
        let mut job_ids = Vec::new();
        for chunk in missing.chunks(INSERT_CHUNK) {
            let mut q = attempt::Entity::find()
                .filter(attempt::Column::LeaseId.is_in(chunk.iter().copied()));
            if self.postgres {
                // Locked, so that what this transaction decides from the row (sequence,
                // lease expiry, finished) is still true when it commits; fixed order.
                q = q.order_by_asc(attempt::Column::LeaseId).lock_exclusive();
            }
            for model in q.all(self.txn).await? {
                job_ids.push(model.job_id);
                self.attempts.insert(model.lease_id, model);
            }
        }
        // Lock order everywhere: attempts (by lease), then jobs (by id), then runners.
        self.load_jobs(job_ids).await
    }

    /// Takes a job row this transaction has just read (and locked), instead of reading it
    /// again.
    pub fn adopt_job(&mut self, model: job::Model) {
        self.jobs.entry(model.id).or_insert(model);
    }

    /// A loaded job.
    pub fn job(&self, id: &Uuid) -> Option<&job::Model> {
        self.jobs.get(id)
    }

    /// A loaded attempt.
    pub fn attempt(&self, lease: &Uuid) -> Option<&attempt::Model> {
        self.attempts.get(lease)
    }

    /// The view of a loaded job.
    pub fn job_view(&self, id: &Uuid) -> Result<JobView> {
        self.jobs
            .get(id)
            .map(job_view)
            .ok_or_else(|| Error::Internal(format!("job {id} used before it was loaded")))
    }

    /// The view of a loaded attempt.
    pub fn attempt_view(&self, lease: &Uuid) -> Option<AttemptView> {
        self.attempts.get(lease).map(attempt_view)
    }

    /// Loads job `id` for a change (a cancel, a delete), with its current attempt, in the one
    /// lock order every writer keeps (the attempt, then the job): the attempt is found with a
    /// plain read first. Locking the job first would deadlock against the ingester storing
    /// that attempt's reports. `None` when no job has that id.
    pub async fn load_for_change(&mut self, id: Uuid) -> Result<Option<JobView>> {
        let current: Option<Option<Uuid>> = job::Entity::find_by_id(id)
            .select_only()
            .column(job::Column::CurrentLease)
            .into_tuple()
            .one(self.txn)
            .await?;
        let Some(current) = current else {
            return Ok(None);
        };
        if let Some(lease) = current {
            self.load_attempts([lease]).await?;
        }
        self.load_jobs([id]).await?;
        let view = self.job_view(&id)?;
        if let Some(lease) = view.current_lease.filter(|l| Some(*l) != current) {
            // Assigned again between the read and the lock (rare): that attempt too.
            self.load_attempts([lease]).await?;
        }
        Ok(Some(view))
    }

    /// Decides and applies the end of the loaded attempt of `lease`.
    pub fn end_attempt(&mut self, lease: Uuid, end: AttemptEnd) -> Result<()> {
        let attempt = self
            .attempt_view(&lease)
            .ok_or_else(|| Error::Internal(format!("attempt {lease} used before it was loaded")))?;
        let job = self.job_view(&attempt.job)?;
        let decision = state::end(&job, &attempt, end, self.now)?;
        self.apply(decision)
    }

    /// Takes back the loaded claim of `lease` if it is still untouched (see
    /// [`state::take_back`]); returns whether it was.
    pub fn take_back(&mut self, lease: Uuid, why: String) -> Result<bool> {
        let Some(attempt) = self.attempt_view(&lease) else {
            return Ok(false);
        };
        let job = self.job_view(&attempt.job)?;
        match state::take_back(&job, &attempt, why) {
            Some(decision) => self.apply(decision).map(|()| true),
            None => Ok(false),
        }
    }

    /// Makes the next [`Lifecycle::apply`] fail after checking its decision and before
    /// changing anything: a test double for a fault no real input causes there.
    #[cfg(test)]
    pub fn fail_next_apply(&mut self, why: &str) {
        self.fault = Some(why.to_string());
    }

    /// Applies a decision of the state machine: checks all of it against the loaded rows,
    /// then changes them. Either everything in it is applied, or (with an error) nothing.
    pub fn apply(&mut self, d: Decision) -> Result<()> {
        // 1. Check the whole decision; change nothing.
        let job = self
            .jobs
            .get(&d.job)
            .ok_or_else(|| Error::Internal(format!("job {} used before it was loaded", d.job)))?;
        let status = status_of(job.status);
        let kind = Kind::of(job.kind);
        let parent = job.parent_id;
        if let Some(m) = &d.status {
            if m.from != status {
                return Err(Error::FailedPrecondition(format!(
                    "job {} is {}, not {}",
                    d.job,
                    status.as_str_name(),
                    m.from.as_str_name()
                )));
            }
            if !state::allowed(m.from, m.to) {
                return Err(Error::FailedPrecondition(format!(
                    "job {} cannot go from {} to {}",
                    d.job,
                    m.from.as_str_name(),
                    m.to.as_str_name()
                )));
            }
        }
        if let Some(s) = &d.start
            && (self.attempts.contains_key(&s.lease) || job.current_lease.is_some())
        {
            return Err(Error::Internal(format!(
                "job {} claimed twice in one transaction",
                d.job
            )));
        }
        let touched = [
            d.started.as_ref().map(|(lease, _)| *lease),
            d.end.as_ref().map(|e| e.lease),
            d.take_back,
            d.cancel_deadline.map(|(lease, _)| lease),
        ];
        for lease in touched.into_iter().flatten() {
            match self.attempts.get(&lease) {
                Some(a) if a.job_id == d.job && a.finished_at.is_none() => {}
                Some(_) => {
                    return Err(Error::FailedPrecondition(format!(
                        "attempt {lease} of job {} has already ended",
                        d.job
                    )));
                }
                None => {
                    return Err(Error::Internal(format!(
                        "attempt {lease} used before it was loaded"
                    )));
                }
            }
            // A status move rides on the job's current attempt only.
            if d.status.is_some() && job.current_lease != Some(lease) {
                return Err(Error::FailedPrecondition(format!(
                    "lease {lease} is not the current lease of job {}",
                    d.job
                )));
            }
        }
        #[cfg(test)]
        if let Some(why) = self.fault.take() {
            return Err(Error::Internal(why));
        }

        // 2. Apply: nothing below can fail.
        let now = self.now;
        let lease_ms = self.rules.lease_ms;
        self.dirty_jobs.insert(d.job);
        self.signals.jobs.insert(d.job);
        if let Some(s) = &d.start
            && let Some(job) = self.jobs.get_mut(&d.job)
        {
            job.attempt_count = i32::try_from(s.number).unwrap_or(i32::MAX);
            job.current_lease = Some(s.lease);
            job.runner_id = Some(s.runner);
            job.progress = None;
            self.attempts.insert(
                s.lease,
                attempt::Model {
                    lease_id: s.lease,
                    job_id: d.job,
                    number: i32::try_from(s.number).unwrap_or(i32::MAX),
                    runner_id: s.runner,
                    status: JobStatus::Assigned as i32,
                    lease_expires_at: s.lease_expires_at,
                    deadline_at: s.deadline_at,
                    assigned_at: now,
                    started_at: None,
                    finished_at: None,
                    container_id: String::new(),
                    exit_code: None,
                    failure_kind: 0,
                    failure_message: String::new(),
                    acked_seq: 0,
                    stdout_len: 0,
                    stderr_len: 0,
                    cancel_deadline_at: None,
                    log_capped: false,
                    parent_lease: s.parent_lease,
                    work_token_hash: None,
                },
            );
            self.new_attempts.insert(s.lease);
        }
        if let Some((lease, container)) = &d.started
            && let Some(a) = self.attempts.get_mut(lease)
        {
            self.dirty_attempts.insert(*lease);
            a.started_at.get_or_insert(now);
            if !container.is_empty() {
                a.container_id = container.clone();
            }
            if d.status
                .as_ref()
                .is_some_and(|m| m.to == JobStatus::Running)
            {
                a.status = JobStatus::Running as i32;
            }
        }
        if let Some(e) = &d.end
            && let Some(a) = self.attempts.get_mut(&e.lease)
        {
            self.dirty_attempts.insert(e.lease);
            a.finished_at = Some(now);
            a.status = e.status as i32;
            a.exit_code = e.exit_code;
            a.failure_kind = e.failure_kind as i32;
            a.failure_message = e.message.clone();
        }
        if let Some((lease, at)) = d.cancel_deadline
            && let Some(a) = self.attempts.get_mut(&lease)
        {
            self.dirty_attempts.insert(lease);
            a.cancel_deadline_at = Some(at);
            // The lease is extended: a runner told to stop gets its grace.
            a.lease_expires_at = a.lease_expires_at.max(now + lease_ms);
        }
        if let Some(lease) = d.take_back {
            self.attempts.remove(&lease);
            self.dirty_attempts.remove(&lease);
            if !self.new_attempts.remove(&lease) {
                self.removed_attempts.insert(lease);
            }
            if let Some(job) = self.jobs.get_mut(&d.job) {
                job.attempt_count = job.attempt_count.saturating_sub(1);
                job.current_lease = None;
                job.runner_id = None;
            }
            self.signals.work = true;
        }
        if let Some(m) = &d.status
            && let Some(job) = self.jobs.get_mut(&d.job)
        {
            job.status = m.to as i32;
            job.updated_at = now;
            if state::is_terminal(m.to) {
                job.finished_at = Some(now);
                job.failure_kind = m.failure_kind as i32;
                job.failure_message = m.message.clone();
                job.current_lease = None;
            }
            if m.to == JobStatus::Queued {
                job.current_lease = None;
                job.not_before = d.not_before.unwrap_or(job.not_before);
                self.signals.work = true;
            }
            if m.exit_code.is_some() {
                job.exit_code = m.exit_code;
            }
            let event = job_event::Kind::Status(StatusChange {
                from: m.from as i32,
                to: m.to as i32,
                failure_kind: m.failure_kind as i32,
                message: m.message.clone(),
                exit_code: m.exit_code,
            });
            match kind {
                Kind::Job => self.push_event(d.job, d.attempt, event, false),
                Kind::Sandbox => self.sandbox_moved(d.job, d.attempt, m),
                Kind::Command => {
                    self.push_event(d.job, d.attempt, event, false);
                    if let Some(sandbox) = parent {
                        self.command_moved(sandbox, d.job, m);
                    }
                }
            }
        }
        if let Some(held) = d.release_lock {
            self.released_locks.push(held);
            self.signals.work = true;
        }
        if let Some((runner, kind)) = d.command {
            self.commands.entry(runner).or_default().push(kind);
            self.signals.runners.insert(runner);
        }
        Ok(())
    }

    /// Appends an event to a loaded job's trail. A `limited` event (progress, phase) is
    /// dropped once the job holds `max_events_per_job` events; the first one dropped records
    /// a `LimitReached` event instead. Status changes are never dropped.
    fn push_event(&mut self, job_id: Uuid, attempt: u32, kind: job_event::Kind, limited: bool) {
        let now = self.now;
        let max = self.rules.max_events_per_job;
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        self.dirty_jobs.insert(job_id);
        let mut kinds = vec![kind];
        if limited && max > 0 && u64::try_from(job.event_seq).unwrap_or(0) >= max {
            if job.events_capped {
                return;
            }
            job.events_capped = true;
            kinds = vec![job_event::Kind::Limit(LimitReached {
                limit: StorageLimit::Events as i32,
                value: max,
                message: format!(
                    "the job holds {max} events: further progress and phase events are not stored (the latest progress still is)"
                ),
            })];
        }
        for kind in kinds {
            job.event_seq += 1;
            let seq = job.event_seq;
            let body = JobEvent {
                job_id: job_id.to_string(),
                sequence: u64::try_from(seq).unwrap_or_default(),
                at_unix_ms: now,
                attempt,
                kind: Some(kind),
            };
            self.events.push(
                event::Model {
                    job_id,
                    seq,
                    attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
                    at: now,
                    body: body.encode_to_vec(),
                }
                .into_active_model(),
            );
        }
        self.signals.jobs.insert(job_id);
    }

    /// A sandbox's status moved: its trail records the lifecycle step; RUNNING may start its
    /// first command, an end ends its commands (both at flush).
    fn sandbox_moved(&mut self, id: Uuid, attempt: u32, m: &state::Move) {
        let starting = self.sandboxes.get(&id).is_some_and(|s| s.starting);
        let (runner, container) = match self.jobs.get(&id) {
            Some(j) => (
                j.runner_id.map(|r| r.to_string()).unwrap_or_default(),
                j.current_lease
                    .and_then(|l| self.attempts.get(&l))
                    .map(|a| a.container_id.clone())
                    .unwrap_or_default(),
            ),
            None => (String::new(), String::new()),
        };
        let event = job_event::Kind::Sandbox(SandboxChange {
            from: sandbox_rules::sandbox_status(m.from, starting) as i32,
            to: sandbox_rules::sandbox_status(m.to, starting) as i32,
            failure_kind: sandbox_rules::sandbox_failure(m.to, m.failure_kind) as i32,
            message: m.message.clone(),
            runner_id: runner,
            container_id: container,
        });
        self.push_event(id, attempt, event, false);
        if m.to == JobStatus::Running {
            self.touch(id);
            self.advance.entry(id).or_insert(false);
        }
        if state::is_terminal(m.to) {
            self.ended_sandboxes.insert(id);
        }
    }

    /// A command's status moved: its sandbox's trail records it; an end lets the sandbox
    /// start its next command (at flush).
    fn command_moved(&mut self, sandbox: Uuid, id: Uuid, m: &state::Move) {
        let number = self.command_number(&id);
        let event = job_event::Kind::Command(CommandUpdate {
            command_id: id.to_string(),
            number,
            status: sandbox_rules::command_status(m.to) as i32,
            failure_kind: m.failure_kind as i32,
            message: m.message.clone(),
            exit_code: m.exit_code,
            progress: None,
        });
        self.push_event(sandbox, 0, event, false);
        if state::is_terminal(m.to) {
            self.touch(sandbox);
            // A queued command canceled is no turn taken: a one-shot sandbox waits on.
            let ran = m.from != JobStatus::Queued;
            *self.advance.entry(sandbox).or_insert(false) |= ran;
        }
    }

    /// A loaded command's number in its sandbox.
    fn command_number(&self, id: &Uuid) -> u32 {
        self.jobs
            .get(id)
            .and_then(|j| JobSpec::decode(j.spec.as_slice()).ok())
            .map_or(0, |s| sandbox_rules::command_number(&s))
    }

    /// The sandbox was active now (its idle timeout counts from here).
    fn touch(&mut self, sandbox: Uuid) {
        if let Some(row) = self.sandboxes.get_mut(&sandbox) {
            row.last_activity_at = self.now;
            self.dirty_sandboxes.insert(sandbox);
        }
    }

    /// A loaded sandbox's row.
    pub fn sandbox(&self, id: &Uuid) -> Option<&sandbox::Model> {
        self.sandboxes.get(id)
    }

    /// Inserts a new PENDING sandbox: its job row (kind SANDBOX, already validated) and its
    /// own row, with its first lifecycle event.
    pub fn insert_sandbox(&mut self, model: job::Model, row: sandbox::Model) {
        let id = model.id;
        self.jobs.insert(id, model);
        self.new_jobs.insert(id);
        self.sandboxes.insert(id, row);
        self.new_sandboxes.insert(id);
        self.push_event(
            id,
            0,
            job_event::Kind::Sandbox(SandboxChange {
                from: gantry_proto::SandboxStatus::Unspecified as i32,
                to: gantry_proto::SandboxStatus::Pending as i32,
                failure_kind: 0,
                message: "created".into(),
                runner_id: String::new(),
                container_id: String::new(),
            }),
            false,
        );
        self.signals.work = true;
    }

    /// Accepts a new QUEUED command (job row of kind COMMAND, already validated) for the
    /// loaded sandbox `row.sandbox_id`; a running sandbox sends it at flush when it is next.
    pub fn insert_command(&mut self, model: job::Model, row: sandbox_command::Model) {
        let id = model.id;
        let sandbox = row.sandbox_id;
        self.jobs.insert(id, model);
        self.new_jobs.insert(id);
        self.push_event(
            id,
            0,
            job_event::Kind::Status(StatusChange {
                from: JobStatus::Unspecified as i32,
                to: JobStatus::Queued as i32,
                failure_kind: FailureKind::Unspecified as i32,
                message: "accepted".into(),
                exit_code: None,
            }),
            false,
        );
        self.push_event(
            sandbox,
            0,
            job_event::Kind::Command(CommandUpdate {
                command_id: id.to_string(),
                number: u32::try_from(row.number).unwrap_or_default(),
                status: gantry_proto::CommandStatus::Queued as i32,
                failure_kind: 0,
                message: "accepted".into(),
                exit_code: None,
                progress: None,
            }),
            false,
        );
        if let Some(s) = self.sandboxes.get_mut(&sandbox) {
            s.command_count = s.command_count.max(row.number);
            s.last_activity_at = self.now;
            self.dirty_sandboxes.insert(sandbox);
        }
        self.new_commands.push(row);
        self.advance.entry(sandbox).or_insert(false);
    }

    /// Inserts a new QUEUED job (already validated) with its submit event.
    pub fn insert_job(&mut self, model: job::Model) {
        let id = model.id;
        self.jobs.insert(id, model);
        self.new_jobs.insert(id);
        self.push_event(
            id,
            0,
            job_event::Kind::Status(StatusChange {
                from: JobStatus::Unspecified as i32,
                to: JobStatus::Queued as i32,
                failure_kind: FailureKind::Unspecified as i32,
                message: "submitted".into(),
                exit_code: None,
            }),
            false,
        );
        self.signals.work = true;
    }

    /// The loaded attempt of `lease` and its job, for a report.
    fn reported(&self, lease: &Uuid) -> Result<(Uuid, u32)> {
        let a = self
            .attempts
            .get(lease)
            .ok_or_else(|| Error::Internal(format!("attempt {lease} used before it was loaded")))?;
        if !self.jobs.contains_key(&a.job_id) {
            return Err(Error::Internal(format!(
                "job {} used before it was loaded",
                a.job_id
            )));
        }
        Ok((a.job_id, u32::try_from(a.number).unwrap_or_default()))
    }

    /// Records progress reported by the work: the job's latest progress, and an event.
    pub fn record_progress(&mut self, lease: Uuid, progress: Progress) -> Result<()> {
        let (job_id, number) = self.reported(&lease)?;
        let mut parent = None;
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.progress = Some(progress.encode_to_vec());
            parent = job.parent_id;
        }
        if let Some(sandbox) = parent {
            let update = CommandUpdate {
                command_id: job_id.to_string(),
                number: self.command_number(&job_id),
                status: gantry_proto::CommandStatus::Running as i32,
                failure_kind: 0,
                message: String::new(),
                exit_code: None,
                progress: Some(progress.clone()),
            };
            self.push_event(sandbox, 0, job_event::Kind::Command(update), true);
        }
        self.push_event(job_id, number, job_event::Kind::Progress(progress), true);
        Ok(())
    }

    /// Records an event of the work's own (a `WorkEvent`, a stored artifact, a result) on
    /// the job of the loaded attempt of `lease`; `limited` events count against the job's
    /// event limit. Returns the event's sequence, or 0 when the limit dropped it.
    pub fn record_work(
        &mut self,
        lease: Uuid,
        kind: job_event::Kind,
        limited: bool,
    ) -> Result<u64> {
        let (job_id, number) = self.reported(&lease)?;
        let before = self.jobs.get(&job_id).map_or(0, |j| j.event_seq);
        self.push_event(job_id, number, kind, limited);
        let after = self.jobs.get(&job_id).map_or(0, |j| j.event_seq);
        let stored = after > before
            && self
                .jobs
                .get(&job_id)
                .is_some_and(|j| !j.events_capped || !limited);
        Ok(if stored {
            u64::try_from(after).unwrap_or_default()
        } else {
            0
        })
    }

    /// Keeps the hash of the work token of the new attempt of `lease` (made by this unit of
    /// work), written with it at flush.
    pub fn set_work_token_hash(&mut self, lease: Uuid, hash: String) {
        if let Some(a) = self.attempts.get_mut(&lease) {
            a.work_token_hash = Some(hash);
        }
    }

    /// Records an executor phase.
    pub fn record_phase(&mut self, lease: Uuid, phase: PhaseChange) -> Result<()> {
        let (job_id, number) = self.reported(&lease)?;
        let starting = phase.phase == ExecutorPhase::Starting as i32;
        if starting
            && let Some(job) = self.jobs.get(&job_id)
            && status_of(job.status) == JobStatus::Assigned
            && let Some(row) = self.sandboxes.get_mut(&job_id)
            && !row.starting
        {
            // CREATING -> STARTING is a lifecycle step of its own.
            row.starting = true;
            self.dirty_sandboxes.insert(job_id);
            let runner = job.runner_id.map(|r| r.to_string()).unwrap_or_default();
            let event = job_event::Kind::Sandbox(SandboxChange {
                from: gantry_proto::SandboxStatus::Creating as i32,
                to: gantry_proto::SandboxStatus::Starting as i32,
                failure_kind: 0,
                message: phase.message.clone(),
                runner_id: runner,
                container_id: String::new(),
            });
            self.push_event(job_id, number, event, false);
        }
        self.push_event(job_id, number, job_event::Kind::Phase(phase), true);
        Ok(())
    }

    /// Stores output bytes at `offset` of `stream`, as [`logs::plan`] decides (bytes already
    /// stored are dropped; a gap is refused; the per-job limit cuts and marks).
    pub fn record_log(
        &mut self,
        lease: Uuid,
        stream: LogStream,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<()> {
        let (job_id, number) = self.reported(&lease)?;
        let limit = self.rules.max_log_bytes_per_job;
        let (stored, capped) = match self.attempts.get(&lease) {
            Some(a) => (
                if stream == LogStream::Stdout {
                    a.stdout_len
                } else {
                    a.stderr_len
                },
                a.log_capped,
            ),
            None => return Err(Error::Internal(format!("attempt {lease} not loaded"))),
        };
        let job_bytes = self.jobs.get(&job_id).map_or(0, |j| j.log_bytes);
        let plan = logs::plan(
            u64::try_from(stored).unwrap_or_default(),
            offset,
            data.len(),
            u64::try_from(job_bytes).unwrap_or_default(),
            limit,
            capped,
        )?;
        // Decided: from here on nothing fails.
        let logs::Plan::Store {
            at,
            skip,
            take,
            marker,
        } = plan
        else {
            return Ok(());
        };
        let now = self.now;
        let chunk = |at: u64, bytes: Vec<u8>| log_chunk::ActiveModel {
            id: ActiveValue::NotSet,
            job_id: ActiveValue::Set(job_id),
            attempt: ActiveValue::Set(i32::try_from(number).unwrap_or(i32::MAX)),
            stream: ActiveValue::Set(stream as i32),
            offset: ActiveValue::Set(i64::try_from(at).unwrap_or(i64::MAX)),
            data: ActiveValue::Set(bytes),
            at: ActiveValue::Set(now),
        };
        let mut written = 0u64;
        if take > 0 {
            let end = skip.saturating_add(take).min(data.len());
            let part = data.get(skip..end).map(<[u8]>::to_vec).unwrap_or_default();
            written += part.len() as u64;
            self.logs.push(chunk(at, part));
        }
        let fresh = written;
        if marker {
            let line = logs::marker(limit);
            let len = line.len() as u64;
            self.logs.push(chunk(at + written, line));
            written += len;
        }
        if let Some(a) = self.attempts.get_mut(&lease) {
            self.dirty_attempts.insert(lease);
            let end = i64::try_from(at + written).unwrap_or(i64::MAX);
            if stream == LogStream::Stdout {
                a.stdout_len = end;
            } else {
                a.stderr_len = end;
            }
            a.log_capped |= marker;
        }
        if let Some(job) = self.jobs.get_mut(&job_id) {
            self.dirty_jobs.insert(job_id);
            job.log_bytes = job
                .log_bytes
                .saturating_add(i64::try_from(fresh).unwrap_or(i64::MAX));
        }
        if marker {
            self.push_event(
                job_id,
                number,
                job_event::Kind::Limit(LimitReached {
                    limit: StorageLimit::LogBytes as i32,
                    value: limit,
                    message: format!(
                        "the job's output reached {limit} bytes: further output is not stored"
                    ),
                }),
                false,
            );
        }
        self.signals.jobs.insert(job_id);
        Ok(())
    }

    /// A report of the holder was applied: its lease is extended (any report counts as a
    /// heartbeat) and its sequence acknowledged.
    pub fn acknowledge(&mut self, lease: Uuid, seq: i64) {
        let until = self.now + self.rules.lease_ms;
        if let Some(a) = self.attempts.get_mut(&lease) {
            self.dirty_attempts.insert(lease);
            a.lease_expires_at = a.lease_expires_at.max(until);
            a.acked_seq = a.acked_seq.max(seq);
        }
    }

    /// What sandboxes do after this unit of work's changes, decided by
    /// [`sandbox_rules::next`] and [`state::abandon`]: a sandbox that ended ends its
    /// unfinished commands; a running one whose command ended (or that started, or accepted a
    /// command) sends its next command to its runner, or ends itself when one-shot. Repeated
    /// until nothing follows (an end can follow from a one-shot, and so on).
    async fn follow_up(&mut self) -> Result<()> {
        for _ in 0..8 {
            let ended = std::mem::take(&mut self.ended_sandboxes);
            let advance = std::mem::take(&mut self.advance);
            if ended.is_empty() && advance.is_empty() {
                return Ok(());
            }
            let all: Vec<Uuid> = ended.iter().chain(advance.keys()).copied().collect();
            // Their unfinished commands, with the attempts of those under way.
            let open: Vec<(Uuid, Option<Uuid>)> = job::Entity::find()
                .select_only()
                .column(job::Column::Id)
                .column(job::Column::CurrentLease)
                .filter(job::Column::ParentId.is_in(all.clone()))
                .filter(job::Column::FinishedAt.is_null())
                .into_tuple()
                .all(self.txn)
                .await?;
            // The sandboxes' own attempts too: a one-shot delete touches them.
            let sandbox_leases: Vec<Uuid> = all
                .iter()
                .filter_map(|id| self.jobs.get(id).and_then(|j| j.current_lease))
                .collect();
            self.load_attempts(open.iter().filter_map(|(_, l)| *l).chain(sandbox_leases))
                .await?;
            self.load_jobs(open.iter().map(|(id, _)| *id)).await?;
            let unfinished = |lc: &Self, sandbox: Uuid| -> Vec<sandbox_rules::CommandView> {
                let mut v: Vec<sandbox_rules::CommandView> = lc
                    .jobs
                    .values()
                    .filter(|j| j.parent_id == Some(sandbox))
                    .filter(|j| !state::is_terminal(status_of(j.status)))
                    .map(|j| sandbox_rules::CommandView {
                        id: j.id,
                        number: lc.command_number(&j.id),
                        status: status_of(j.status),
                    })
                    .collect();
                v.sort_by_key(|c| (c.number, c.id));
                v
            };
            for sandbox in &ended {
                let Some(row) = self.jobs.get(sandbox) else {
                    continue;
                };
                let status = status_of(row.status);
                let failed = (status == JobStatus::Failed).then(|| {
                    FailureKind::try_from(row.failure_kind).unwrap_or(FailureKind::ExecutorError)
                });
                let message = match failed {
                    Some(_) => format!("the sandbox failed: {}", row.failure_message),
                    None => format!("the sandbox ended: {}", row.failure_message),
                };
                for command in unfinished(self, *sandbox) {
                    let view = self.job_view(&command.id)?;
                    let attempt = view.current_lease.and_then(|l| self.attempt_view(&l));
                    if let Some(d) =
                        state::abandon(&view, attempt.as_ref(), failed, &message, self.now)?
                    {
                        self.apply(d)?;
                    }
                }
            }
            for (sandbox, a_command_ended) in advance {
                if ended.contains(&sandbox) {
                    continue;
                }
                let Some(row) = self.jobs.get(&sandbox) else {
                    continue;
                };
                if status_of(row.status) != JobStatus::Running {
                    continue;
                }
                let one_shot = self.sandboxes.get(&sandbox).is_some_and(|s| s.one_shot);
                let views = unfinished(self, sandbox);
                match sandbox_rules::next(one_shot, a_command_ended, &views) {
                    sandbox_rules::Next::Wait => {}
                    sandbox_rules::Next::Delete(message) => {
                        let view = self.job_view(&sandbox)?;
                        let d = state::stop(
                            &view,
                            format!("deleting: {message}"),
                            &message,
                            self.now,
                            self.rules.lease_ms,
                        )?;
                        self.apply(d)?;
                    }
                    sandbox_rules::Next::Start(command) => {
                        self.start_command(sandbox, command).await?
                    }
                }
            }
        }
        Err(Error::Internal(
            "sandbox follow-ups did not settle within 8 rounds".into(),
        ))
    }

    /// Claims `command` for the runner holding the running `sandbox`, under a lease that
    /// lives with the sandbox's, and sends it to that runner (an [`ExecCommand`]).
    async fn start_command(&mut self, sandbox: Uuid, command: Uuid) -> Result<()> {
        let holder = self
            .jobs
            .get(&sandbox)
            .and_then(|j| j.runner_id.zip(j.current_lease));
        let Some((runner, sandbox_lease)) = holder else {
            return Err(Error::Internal(format!(
                "running sandbox {sandbox} has no runner or lease"
            )));
        };
        let stdin: Vec<u8> = match self.new_commands.iter().find(|c| c.id == command) {
            Some(row) => row.stdin.clone(),
            None => sandbox_command::Entity::find_by_id(command)
                .select_only()
                .column(sandbox_command::Column::Stdin)
                .into_tuple()
                .one(self.txn)
                .await?
                .unwrap_or_default(),
        };
        let view = self.job_view(&command)?;
        let lease = Uuid::now_v7();
        let mut decision = state::claim(&view, runner, lease, self.now, self.rules.lease_ms)?;
        let Some(start) = decision.start.as_mut() else {
            return Err(Error::Internal(format!(
                "claim of command {command} started nothing"
            )));
        };
        // Not heartbeated: the command lives and dies with its sandbox's lease.
        start.lease_expires_at = i64::MAX;
        start.parent_lease = Some(sandbox_lease);
        let deadline = start.deadline_at;
        let number = self.command_number(&command);
        let spec_of = |id: &Uuid| -> Result<JobSpec> {
            Ok(self
                .jobs
                .get(id)
                .map(|j| JobSpec::decode(j.spec.as_slice()))
                .transpose()?
                .unwrap_or_default())
        };
        let spec = spec_of(&command)?;
        let parent = spec_of(&sandbox)?;
        // The sandbox's environment and working directory, the command's own over them.
        let mut env = parent.env;
        env.extend(spec.env);
        let working_dir = if spec.working_dir.is_empty() {
            parent.working_dir
        } else {
            spec.working_dir
        };
        decision.command = Some((
            runner,
            command::Kind::Exec(ExecCommand {
                sandbox_id: sandbox.to_string(),
                sandbox_lease_id: sandbox_lease.to_string(),
                command_id: command.to_string(),
                lease_id: lease.to_string(),
                number,
                argv: spec.command,
                env,
                working_dir,
                stdin,
                deadline_unix_ms: deadline,
                grace_seconds: spec.cancel_grace_seconds,
            }),
        ));
        self.apply(decision)
    }

    /// Writes every change; returns the signals to publish after commit.
    pub async fn flush(mut self) -> Result<Signals> {
        self.follow_up().await?;
        let mut new_jobs = Vec::new();
        for id in std::mem::take(&mut self.new_jobs) {
            self.dirty_jobs.remove(&id);
            if let Some(model) = self.jobs.get(&id) {
                new_jobs.push(model.clone().into_active_model());
            }
        }
        for chunk in new_jobs.chunks(INSERT_CHUNK / 10) {
            job::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(self.txn)
                .await?;
        }
        // Changed rows are written back with one upsert per chunk instead of one UPDATE
        // each (a statement costs a round trip to the database, or to SQLite's thread).
        // Rows go in id order: a fixed lock order on PostgreSQL.
        let mut dirty: Vec<Uuid> = std::mem::take(&mut self.dirty_jobs).into_iter().collect();
        dirty.sort();
        let rows: Vec<job::ActiveModel> = dirty
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .map(|m| m.clone().into_active_model())
            .collect();
        for chunk in rows.chunks(UPSERT_CHUNK) {
            job::Entity::insert_many(chunk.to_vec())
                .on_conflict(
                    OnConflict::column(job::Column::Id)
                        // The spec is written once, at submit: never rewritten.
                        .update_columns(
                            job::Column::iter()
                                .filter(|c| !matches!(c, job::Column::Id | job::Column::Spec)),
                        )
                        .to_owned(),
                )
                .exec_without_returning(self.txn)
                .await?;
        }
        let mut dirty: Vec<Uuid> = std::mem::take(&mut self.dirty_attempts)
            .into_iter()
            .filter(|lease| !self.new_attempts.contains(lease))
            .collect();
        dirty.sort();
        let rows: Vec<attempt::ActiveModel> = dirty
            .iter()
            .filter_map(|lease| self.attempts.get(lease))
            .map(|m| m.clone().into_active_model())
            .collect();
        for chunk in rows.chunks(UPSERT_CHUNK) {
            attempt::Entity::insert_many(chunk.to_vec())
                .on_conflict(
                    OnConflict::column(attempt::Column::LeaseId)
                        .update_columns(
                            attempt::Column::iter()
                                .filter(|c| !matches!(c, attempt::Column::LeaseId)),
                        )
                        .to_owned(),
                )
                .exec_without_returning(self.txn)
                .await?;
        }
        let inserts: Vec<attempt::ActiveModel> = self
            .new_attempts
            .iter()
            .filter_map(|lease| self.attempts.get(lease))
            .map(|m| m.clone().into_active_model())
            .collect();
        for chunk in inserts.chunks(INSERT_CHUNK / 2) {
            attempt::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(self.txn)
                .await?;
        }
        let removed: Vec<Uuid> = self.removed_attempts.iter().copied().collect();
        for chunk in removed.chunks(INSERT_CHUNK) {
            attempt::Entity::delete_many()
                .filter(attempt::Column::LeaseId.is_in(chunk.iter().copied()))
                .exec(self.txn)
                .await?;
        }
        for chunk in self.events.chunks(INSERT_CHUNK) {
            event::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(self.txn)
                .await?;
        }
        for chunk in self.logs.chunks(INSERT_CHUNK / 2) {
            log_chunk::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(self.txn)
                .await?;
        }
        let sandboxes: Vec<sandbox::ActiveModel> = self
            .new_sandboxes
            .iter()
            .filter_map(|id| self.sandboxes.get(id))
            .map(|m| m.clone().into_active_model())
            .collect();
        for chunk in sandboxes.chunks(INSERT_CHUNK / 10) {
            sandbox::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(self.txn)
                .await?;
        }
        let mut dirty: Vec<Uuid> = std::mem::take(&mut self.dirty_sandboxes)
            .into_iter()
            .filter(|id| !self.new_sandboxes.contains(id))
            .collect();
        dirty.sort();
        let rows: Vec<sandbox::ActiveModel> = dirty
            .iter()
            .filter_map(|id| self.sandboxes.get(id))
            .map(|m| m.clone().into_active_model())
            .collect();
        for chunk in rows.chunks(UPSERT_CHUNK) {
            sandbox::Entity::insert_many(chunk.to_vec())
                .on_conflict(
                    OnConflict::column(sandbox::Column::Id)
                        .update_columns([
                            sandbox::Column::LastActivityAt,
                            sandbox::Column::CommandCount,
                            sandbox::Column::Starting,
                        ])
                        .to_owned(),
                )
                .exec_without_returning(self.txn)
                .await?;
        }
        let commands: Vec<sandbox_command::ActiveModel> = std::mem::take(&mut self.new_commands)
            .into_iter()
            .map(IntoActiveModel::into_active_model)
            .collect();
        for chunk in commands.chunks(INSERT_CHUNK / 10) {
            sandbox_command::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(self.txn)
                .await?;
        }
        locks::release(self.txn, &self.released_locks).await?;
        // Runners in id order: a fixed lock order on PostgreSQL.
        for (runner, kinds) in std::mem::take(&mut self.commands) {
            commands::issue(self.txn, runner, kinds, self.now).await?;
        }
        Ok(self.signals)
    }
}

/// A new job's row as submitted (already validated).
pub fn new_job(spec: &JobSpec, retried_from: Option<Uuid>, now: i64) -> job::Model {
    job::Model {
        id: Uuid::now_v7(),
        status: JobStatus::Queued as i32,
        queue: spec.queue.clone(),
        priority: spec.priority,
        executor: spec.executor,
        lock_key: (!spec.lock_key.is_empty()).then(|| spec.lock_key.clone()),
        idempotency_key: (!spec.idempotency_key.is_empty()).then(|| spec.idempotency_key.clone()),
        spec: spec.encode_to_vec(),
        attempt_count: 0,
        max_attempts: i32::try_from(spec.retry.as_ref().map_or(1, |r| r.max_attempts.max(1)))
            .unwrap_or(1),
        current_lease: None,
        runner_id: None,
        failure_kind: 0,
        failure_message: String::new(),
        exit_code: None,
        progress: None,
        event_seq: 0,
        not_before: 0,
        created_at: now,
        updated_at: now,
        finished_at: None,
        retried_from,
        log_bytes: 0,
        events_capped: false,
        kind: Kind::Job.as_i32(),
        parent_id: None,
        parent_job: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entity::lock;
    use gantry_proto as pb;
    use sea_orm::{PaginatorTrait, TransactionTrait};

    fn rules() -> Rules {
        Rules::with_lease(3_000)
    }

    /// A store with one job, claimed by a runner under a lease holding lock key `k`.
    async fn claimed(store: &Store, retries: u32) -> (Uuid, Uuid, Uuid) {
        let spec = pb::JobSpec {
            command: vec!["true".into()],
            executor: pb::ExecutorKind::Process as i32,
            lock_key: "k".into(),
            timeout_seconds: 60,
            retry: Some(pb::RetryPolicy {
                max_attempts: retries,
                initial_backoff_ms: 100,
                max_backoff_ms: 1000,
            }),
            ..Default::default()
        };
        let model = new_job(&spec, None, 1_000);
        let (job, runner, lease) = (model.id, Uuid::now_v7(), Uuid::now_v7());
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, rules(), 1_000);
        lc.insert_job(model);
        let view = lc.job_view(&job).expect("view");
        let d = state::claim(&view, runner, lease, 1_000, 3_000).expect("claim");
        assert!(locks::try_take(&txn, "k", job, lease).await.expect("lock"));
        lc.apply(d).expect("apply");
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        (job, runner, lease)
    }

    async fn rows(store: &Store, job: Uuid) -> (job::Model, Vec<attempt::Model>, u64, u64) {
        let j = job::Entity::find_by_id(job)
            .one(store.db())
            .await
            .expect("read")
            .expect("job");
        let a = attempt::Entity::find()
            .filter(attempt::Column::JobId.eq(job))
            .all(store.db())
            .await
            .expect("read");
        let events = event::Entity::find()
            .filter(event::Column::JobId.eq(job))
            .count(store.db())
            .await
            .expect("count");
        let locks = lock::Entity::find().count(store.db()).await.expect("count");
        (j, a, events, locks)
    }

    #[tokio::test]
    async fn a_failure_between_decision_and_apply_changes_no_row() {
        let store = Store::memory().await.expect("store");
        let (job, _runner, lease) = claimed(&store, 1).await;
        let before = rows(&store, job).await;

        // The end of the attempt is decided; then a fault strikes before it is applied (a
        // test double: no real input fails there). The transaction goes on and commits, as
        // the report ingester's does for the other reports of its batch.
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, rules(), 2_000);
        lc.load_attempts([lease]).await.expect("load");
        lc.fail_next_apply("injected fault");
        let err = lc
            .end_attempt(lease, AttemptEnd::Succeeded { exit_code: Some(0) })
            .expect_err("the fault");
        assert!(err.to_string().contains("injected fault"));
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");

        let after = rows(&store, job).await;
        assert_eq!(before, after, "no row may change");
        assert_eq!(after.0.status, JobStatus::Assigned as i32);
        assert_eq!(
            after.1[0].finished_at, None,
            "the reaper still sees the attempt"
        );
        assert_eq!(after.3, 1, "the lock is still held");

        // And the same end, without the fault, applies all of it.
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, rules(), 3_000);
        lc.load_attempts([lease]).await.expect("load");
        lc.end_attempt(lease, AttemptEnd::Succeeded { exit_code: Some(0) })
            .expect("end");
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        let (j, a, events, locks) = rows(&store, job).await;
        assert_eq!(j.status, JobStatus::Succeeded as i32);
        assert_eq!(a[0].finished_at, Some(3_000));
        assert_eq!(events, before.2 + 1);
        assert_eq!(locks, 0);
    }

    #[tokio::test]
    async fn a_stale_decision_is_refused_whole() {
        let store = Store::memory().await.expect("store");
        let (job, _runner, lease) = claimed(&store, 1).await;
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, rules(), 2_000);
        lc.load_attempts([lease]).await.expect("load");
        let view = lc.job_view(&job).expect("view");
        let attempt = lc.attempt_view(&lease).expect("attempt");
        let first = state::end(
            &view,
            &attempt,
            AttemptEnd::Succeeded { exit_code: None },
            2_000,
        )
        .expect("decided");
        let second = state::end(
            &view,
            &attempt,
            AttemptEnd::Lost {
                message: "x".into(),
            },
            2_000,
        )
        .expect("decided");
        lc.apply(first).expect("first applies");
        // Decided from the same (now outdated) views: refused, and nothing of it applied.
        assert!(lc.apply(second).is_err());
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        let (j, a, _, _) = rows(&store, job).await;
        assert_eq!(j.status, JobStatus::Succeeded as i32);
        assert_eq!(a[0].status, JobStatus::Succeeded as i32);
    }

    #[tokio::test]
    async fn a_lost_claim_never_acknowledged_is_taken_back_uncounted() {
        let store = Store::memory().await.expect("store");
        let (job, _runner, lease) = claimed(&store, 1).await;
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, rules(), 9_000);
        lc.load_attempts([lease]).await.expect("load");
        lc.end_attempt(
            lease,
            AttemptEnd::Lost {
                message: "lease expired".into(),
            },
        )
        .expect("end");
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        let (j, a, _, locks) = rows(&store, job).await;
        assert_eq!(j.status, JobStatus::Queued as i32);
        assert_eq!(j.attempt_count, 0, "the attempt does not count");
        assert!(a.is_empty());
        assert_eq!(locks, 0);
    }

    #[tokio::test]
    async fn the_log_limit_cuts_marks_and_drops() {
        let store = Store::memory().await.expect("store");
        let (job, _runner, lease) = claimed(&store, 1).await;
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(
            &txn,
            Rules {
                max_log_bytes_per_job: 10,
                ..rules()
            },
            2_000,
        );
        lc.load_attempts([lease]).await.expect("load");
        lc.record_log(lease, LogStream::Stdout, 0, b"0123456789abcdef".to_vec())
            .expect("stored");
        lc.record_log(lease, LogStream::Stderr, 0, b"more".to_vec())
            .expect("dropped");
        // A gap is refused and changes nothing.
        assert!(
            lc.record_log(lease, LogStream::Stdout, 9_999, b"x".to_vec())
                .is_ok(),
            "capped: dropped without a check"
        );
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        let chunks = log_chunk::Entity::find()
            .filter(log_chunk::Column::JobId.eq(job))
            .order_by_asc(log_chunk::Column::Id)
            .all(store.db())
            .await
            .expect("read");
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].data, b"0123456789");
        assert_eq!(chunks[1].offset, 10);
        assert!(String::from_utf8_lossy(&chunks[1].data).contains("limit of 10 bytes"));
        let (j, a, _, _) = rows(&store, job).await;
        assert_eq!(j.log_bytes, 10);
        assert!(a[0].log_capped);
    }

    #[tokio::test]
    async fn a_log_gap_is_refused_and_changes_nothing() {
        let store = Store::memory().await.expect("store");
        let (job, _runner, lease) = claimed(&store, 1).await;
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, rules(), 2_000);
        lc.load_attempts([lease]).await.expect("load");
        assert!(matches!(
            lc.record_log(lease, LogStream::Stdout, 5, b"x".to_vec()),
            Err(Error::Invalid { .. })
        ));
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        let (j, a, _, _) = rows(&store, job).await;
        assert_eq!((j.log_bytes, a[0].stdout_len), (0, 0));
    }

    #[tokio::test]
    async fn progress_beyond_the_event_limit_is_dropped_after_one_notice() {
        let store = Store::memory().await.expect("store");
        let (job, _runner, lease) = claimed(&store, 1).await;
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(
            &txn,
            Rules {
                max_events_per_job: 5,
                ..rules()
            },
            2_000,
        );
        lc.load_attempts([lease]).await.expect("load");
        for percent in 0..50 {
            lc.record_progress(
                lease,
                Progress {
                    percent,
                    ..Default::default()
                },
            )
            .expect("recorded");
        }
        lc.end_attempt(lease, AttemptEnd::Succeeded { exit_code: Some(0) })
            .expect("end");
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        let (j, _, events, _) = rows(&store, job).await;
        // submit + claim + 3 progress = 5, then the notice, then the final status.
        assert_eq!(events, 7);
        assert!(j.events_capped);
        let latest = Progress::decode(j.progress.as_deref().unwrap_or_default()).expect("progress");
        assert_eq!(latest.percent, 49, "the latest progress is kept");
        assert_eq!(j.status, JobStatus::Succeeded as i32);
    }
}
