//! The unit of work through which every job changes state.
//!
//! A [`Lifecycle`] lives for one write transaction. It loads the jobs and attempts a change
//! touches (locking their rows on PostgreSQL), applies the answers of [`crate::jobs::state`]
//! to them in memory, appends the events each transition produces, releases locks, issues
//! runner commands, and at the end writes everything in a handful of statements. Services,
//! the session handler, the report ingester and the reaper all go through it, so the rules
//! of the state machine are written once.
use std::collections::{HashMap, HashSet};

use gantry_proto::{
    Command, FailureKind, JobEvent, JobStatus, PhaseChange, Progress, StatusChange, command,
    job_event,
};
use prost::Message;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait,
    IntoActiveModel, Iterable, QueryFilter, QueryOrder, QuerySelect, sea_query::OnConflict,
};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    events::Signals,
    jobs::state::{self, AttemptEnd, Next, Retry},
    store::entity::{attempt, command as command_row, event, job, lock, log_chunk, runner},
};

/// Timing rules the lifecycle applies.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Lease length, ms.
    pub lease_ms: i64,
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
    attempts: HashMap<Uuid, attempt::Model>,
    dirty_attempts: HashSet<Uuid>,
    new_attempts: HashSet<Uuid>,
    new_jobs: HashSet<Uuid>,
    events: Vec<event::ActiveModel>,
    logs: Vec<log_chunk::ActiveModel>,
    /// What to announce after commit.
    pub signals: Signals,
}

/// Current time, Unix ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Decodes a stored protobuf column.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    Ok(M::decode(bytes)?)
}

/// A stored status number as the enum (UNSPECIFIED for a number this build does not know).
pub fn status_of(raw: i32) -> JobStatus {
    JobStatus::try_from(raw).unwrap_or(JobStatus::Unspecified)
}

impl<'t> Lifecycle<'t> {
    /// Starts a unit of work inside `txn`.
    pub fn new(txn: &'t DatabaseTransaction, rules: Rules) -> Self {
        Lifecycle {
            txn,
            postgres: txn.get_database_backend() == sea_orm::DbBackend::Postgres,
            now: now_ms(),
            rules,
            jobs: HashMap::new(),
            dirty_jobs: HashSet::new(),
            attempts: HashMap::new(),
            dirty_attempts: HashSet::new(),
            new_attempts: HashSet::new(),
            new_jobs: HashSet::new(),
            events: Vec::new(),
            logs: Vec::new(),
            signals: Signals::default(),
        }
    }

    /// The transaction, for statements of the caller's own.
    pub fn txn(&self) -> &'t DatabaseTransaction {
        self.txn
    }

    /// Loads jobs not yet loaded, locking their rows on PostgreSQL.
    pub async fn load_jobs(&mut self, ids: impl IntoIterator<Item = Uuid>) -> Result<()> {
        let missing: Vec<Uuid> = ids
            .into_iter()
            .filter(|id| !self.jobs.contains_key(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
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
        Ok(())
    }

    /// Takes a job row the caller read in this transaction (locked on PostgreSQL), instead of
    /// reading it again.
    pub fn adopt_job(&mut self, model: job::Model) {
        self.jobs.entry(model.id).or_insert(model);
    }

    /// Loads attempts by lease not yet loaded, with their jobs.
    pub async fn load_attempts(&mut self, leases: impl IntoIterator<Item = Uuid>) -> Result<()> {
        let missing: Vec<Uuid> = leases
            .into_iter()
            .filter(|id| !self.attempts.contains_key(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut job_ids = Vec::new();
        for chunk in missing.chunks(INSERT_CHUNK) {
            let mut q = attempt::Entity::find()
                .filter(attempt::Column::LeaseId.is_in(chunk.iter().copied()));
            if self.postgres {
                // Locked, so that what this transaction decides from the row (sequence,
                // lease expiry, finished) is still true when it commits; fixed order.
                q = q.order_by_asc(attempt::Column::LeaseId).lock_exclusive();
            }
            let found = q.all(self.txn).await?;
            for model in found {
                job_ids.push(model.job_id);
                self.attempts.insert(model.lease_id, model);
            }
        }
        // Lock order everywhere: attempts (by lease), then jobs (by id), then runners.
        self.load_jobs(job_ids).await
    }

    /// A loaded job.
    pub fn job(&self, id: &Uuid) -> Option<&job::Model> {
        self.jobs.get(id)
    }

    /// A loaded attempt.
    pub fn attempt(&self, lease: &Uuid) -> Option<&attempt::Model> {
        self.attempts.get(lease)
    }

    /// Loads one job (locked on PostgreSQL); NOT_FOUND when absent.
    pub async fn require_job(&mut self, id: Uuid) -> Result<&job::Model> {
        self.load_jobs([id]).await?;
        self.jobs
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("job {id}")))
    }

    fn job_mut(&mut self, id: &Uuid) -> Result<&mut job::Model> {
        self.dirty_jobs.insert(*id);
        self.jobs
            .get_mut(id)
            .ok_or_else(|| Error::Internal(format!("job {id} used before it was loaded")))
    }

    fn attempt_mut(&mut self, lease: &Uuid) -> Result<&mut attempt::Model> {
        self.dirty_attempts.insert(*lease);
        self.attempts
            .get_mut(lease)
            .ok_or_else(|| Error::Internal(format!("attempt {lease} used before it was loaded")))
    }

    /// Appends an event to a loaded job's trail.
    pub fn append_event(
        &mut self,
        job_id: Uuid,
        attempt: i32,
        kind: job_event::Kind,
    ) -> Result<()> {
        let now = self.now;
        let job = self.job_mut(&job_id)?;
        job.event_seq += 1;
        let seq = job.event_seq;
        let body = JobEvent {
            job_id: job_id.to_string(),
            sequence: u64::try_from(seq).unwrap_or_default(),
            at_unix_ms: now,
            attempt: u32::try_from(attempt).unwrap_or_default(),
            kind: Some(kind),
        };
        self.events.push(
            event::Model {
                job_id,
                seq,
                attempt,
                at: now,
                body: body.encode_to_vec(),
            }
            .into_active_model(),
        );
        self.signals.jobs.insert(job_id);
        Ok(())
    }

    /// Moves a loaded job to `to`, through the state machine, recording the event.
    fn transition(
        &mut self,
        job_id: Uuid,
        attempt: i32,
        to: JobStatus,
        failure_kind: FailureKind,
        message: String,
        exit_code: Option<i32>,
    ) -> Result<()> {
        let now = self.now;
        let job = self.job_mut(&job_id)?;
        let from = status_of(job.status);
        if !state::allowed(from, to) {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} cannot go from {} to {}",
                from.as_str_name(),
                to.as_str_name()
            )));
        }
        job.status = to as i32;
        job.updated_at = now;
        if state::is_terminal(to) {
            job.finished_at = Some(now);
            job.failure_kind = failure_kind as i32;
            job.failure_message = message.clone();
            job.current_lease = None;
        }
        if exit_code.is_some() {
            job.exit_code = exit_code;
        }
        self.append_event(
            job_id,
            attempt,
            job_event::Kind::Status(StatusChange {
                from: from as i32,
                to: to as i32,
                failure_kind: failure_kind as i32,
                message,
                exit_code,
            }),
        )
    }

    /// Inserts a new QUEUED job (already validated) with its submit event.
    pub fn insert_job(&mut self, model: job::Model) -> Result<()> {
        let id = model.id;
        self.jobs.insert(id, model);
        self.new_jobs.insert(id);
        self.append_event(
            id,
            0,
            job_event::Kind::Status(StatusChange {
                from: JobStatus::Unspecified as i32,
                to: JobStatus::Queued as i32,
                failure_kind: 0,
                message: "submitted".into(),
                exit_code: None,
            }),
        )?;
        self.signals.work = true;
        Ok(())
    }

    /// Claims a loaded QUEUED job for `runner`: a new attempt with a fresh lease.
    /// `lease_id` is fresh; the caller has already taken the job's lock key under it.
    pub fn start_attempt(
        &mut self,
        job_id: Uuid,
        runner_id: Uuid,
        lease_id: Uuid,
    ) -> Result<attempt::Model> {
        let now = self.now;
        let lease_ms = self.rules.lease_ms;
        let job = self.job_mut(&job_id)?;
        job.attempt_count += 1;
        job.current_lease = Some(lease_id);
        job.runner_id = Some(runner_id);
        job.progress = None;
        let number = job.attempt_count;
        let spec: gantry_proto::JobSpec = decode(&job.spec)?;
        let timeout_ms = i64::from(spec.timeout_seconds) * 1000;
        let model = attempt::Model {
            lease_id,
            job_id,
            number,
            runner_id,
            status: JobStatus::Assigned as i32,
            lease_expires_at: now + lease_ms,
            deadline_at: now.saturating_add(timeout_ms),
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
        };
        self.attempts.insert(lease_id, model.clone());
        self.new_attempts.insert(lease_id);
        self.transition(
            job_id,
            number,
            JobStatus::Assigned,
            FailureKind::Unspecified,
            format!("claimed by runner {runner_id}"),
            None,
        )?;
        Ok(model)
    }

    /// The holder reported that the work started.
    pub fn mark_running(&mut self, lease: Uuid, container_id: String) -> Result<()> {
        let now = self.now;
        let attempt = self.attempt_mut(&lease)?;
        let (job_id, number) = (attempt.job_id, attempt.number);
        if attempt.started_at.is_none() {
            attempt.started_at = Some(now);
        }
        if !container_id.is_empty() {
            attempt.container_id = container_id.clone();
        }
        let job_status = status_of(self.job_mut(&job_id)?.status);
        match job_status {
            JobStatus::Assigned => {
                self.attempt_mut(&lease)?.status = JobStatus::Running as i32;
                let msg = if container_id.is_empty() {
                    "started".to_string()
                } else {
                    format!("started ({container_id})")
                };
                self.transition(
                    job_id,
                    number,
                    JobStatus::Running,
                    FailureKind::Unspecified,
                    msg,
                    None,
                )
            }
            // Already running, or a cancel is under way: nothing changes status.
            JobStatus::Running | JobStatus::Canceling => Ok(()),
            other => Err(Error::FailedPrecondition(format!(
                "job {job_id} is {}, not assigned",
                other.as_str_name()
            ))),
        }
    }

    /// Records progress reported by the work.
    pub fn record_progress(&mut self, lease: Uuid, progress: Progress) -> Result<()> {
        let (job_id, number) = {
            let a = self.attempt_mut(&lease)?;
            (a.job_id, a.number)
        };
        self.job_mut(&job_id)?.progress = Some(progress.encode_to_vec());
        self.append_event(job_id, number, job_event::Kind::Progress(progress))
    }

    /// Records an executor phase.
    pub fn record_phase(&mut self, lease: Uuid, phase: PhaseChange) -> Result<()> {
        let (job_id, number) = {
            let a = self.attempt_mut(&lease)?;
            (a.job_id, a.number)
        };
        self.append_event(job_id, number, job_event::Kind::Phase(phase))
    }

    /// Stores output bytes at `offset` of `stream`, dropping any part already stored.
    /// An offset past the stored end would leave a hole and is refused.
    pub fn record_log(
        &mut self,
        lease: Uuid,
        stream: i32,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<()> {
        let now = self.now;
        let a = self.attempt_mut(&lease)?;
        let stored = if stream == gantry_proto::LogStream::Stdout as i32 {
            &mut a.stdout_len
        } else {
            &mut a.stderr_len
        };
        let stored_len = u64::try_from(*stored).unwrap_or_default();
        if offset > stored_len {
            return Err(Error::invalid(
                "log.offset",
                format!("{offset} is past the {stored_len} bytes stored for this stream"),
            ));
        }
        let end = offset + data.len() as u64;
        if end <= stored_len {
            return Ok(()); // already stored
        }
        let skip = usize::try_from(stored_len - offset).unwrap_or(0);
        let data = data[skip..].to_vec();
        *stored = i64::try_from(end).unwrap_or(i64::MAX);
        let (job_id, number) = (a.job_id, a.number);
        self.logs.push(log_chunk::ActiveModel {
            id: sea_orm::ActiveValue::NotSet,
            job_id: sea_orm::ActiveValue::Set(job_id),
            attempt: sea_orm::ActiveValue::Set(number),
            stream: sea_orm::ActiveValue::Set(stream),
            offset: sea_orm::ActiveValue::Set(i64::try_from(stored_len).unwrap_or(i64::MAX)),
            data: sea_orm::ActiveValue::Set(data),
            at: sea_orm::ActiveValue::Set(now),
        });
        self.signals.jobs.insert(job_id);
        Ok(())
    }

    /// Extends one attempt's lease (any report from its holder counts as a heartbeat).
    pub fn touch_lease(&mut self, lease: Uuid) -> Result<()> {
        let until = self.now + self.rules.lease_ms;
        let a = self.attempt_mut(&lease)?;
        a.lease_expires_at = a.lease_expires_at.max(until);
        Ok(())
    }

    /// Marks a report sequence as applied.
    pub fn ack(&mut self, lease: Uuid, seq: i64) -> Result<()> {
        let a = self.attempt_mut(&lease)?;
        a.acked_seq = a.acked_seq.max(seq);
        Ok(())
    }

    /// Ends a loaded, unfinished attempt, and moves its job where the state machine says:
    /// terminal, or QUEUED again with a backoff. Releases the job's lock key.
    pub async fn end_attempt(&mut self, lease: Uuid, end: AttemptEnd) -> Result<()> {
        let now = self.now;
        // Fence first, change nothing until it passed.
        let attempt = self
            .attempts
            .get(&lease)
            .ok_or_else(|| Error::Internal(format!("attempt {lease} used before it was loaded")))?;
        let (job_id, number) = (attempt.job_id, attempt.number);
        if attempt.finished_at.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "attempt {number} of job {job_id} has already ended"
            )));
        }
        if self.job(&job_id).and_then(|j| j.current_lease) != Some(lease) {
            return Err(Error::FailedPrecondition(format!(
                "lease {lease} is not the current lease of job {job_id}"
            )));
        }
        let attempt = self.attempt_mut(&lease)?;
        attempt.finished_at = Some(now);
        attempt.exit_code = end.exit_code();
        attempt.failure_kind = end.failure_kind() as i32;
        attempt.failure_message = end.message();

        let job = self.job_mut(&job_id)?;
        let status = status_of(job.status);
        let policy = decode::<gantry_proto::JobSpec>(&job.spec)?
            .retry
            .unwrap_or_default();
        let retry = Retry {
            max_attempts: u32::try_from(job.max_attempts).unwrap_or(1),
            initial_backoff_ms: u64::from(policy.initial_backoff_ms),
            max_backoff_ms: u64::from(policy.max_backoff_ms),
        };
        let lock_key = job.lock_key.clone();
        let attempts_made = u32::try_from(job.attempt_count).unwrap_or(u32::MAX);
        match state::after_attempt(status, &end, attempts_made, retry, now) {
            Next::Terminal {
                status: to,
                failure_kind,
                message,
            } => {
                self.attempt_mut(&lease)?.status = to as i32;
                self.transition(job_id, number, to, failure_kind, message, end.exit_code())?;
            }
            Next::Retry { not_before } => {
                self.attempt_mut(&lease)?.status = JobStatus::Failed as i32;
                let kind = end.failure_kind();
                let message = format!(
                    "attempt {number} failed ({}): {}; retrying",
                    kind.as_str_name(),
                    end.message()
                );
                self.transition(
                    job_id,
                    number,
                    JobStatus::Queued,
                    kind,
                    message,
                    end.exit_code(),
                )?;
                let job = self.job_mut(&job_id)?;
                job.not_before = not_before;
                job.current_lease = None;
            }
        }
        self.release_lock(lock_key, lease).await
    }

    /// Releases the lock key held under `lease`, if any; something may be dispatchable now
    /// (a slot, a lock, a requeued job).
    async fn release_lock(&mut self, lock_key: Option<String>, lease: Uuid) -> Result<()> {
        if let Some(key) = lock_key {
            lock::Entity::delete_many()
                .filter(lock::Column::LockKey.eq(key))
                .filter(lock::Column::LeaseId.eq(lease))
                .exec(self.txn)
                .await?;
        }
        self.signals.work = true;
        Ok(())
    }

    /// Takes back a claim whose assignment never reached the runner: the job is QUEUED
    /// again as if it had not been claimed (the attempt is removed and does not count), and
    /// its lock is released. A claim the runner already reported on is left to its lease.
    pub async fn undo_claim(&mut self, lease: Uuid) -> Result<()> {
        let Some(attempt) = self.attempts.get(&lease) else {
            return Ok(());
        };
        let (job_id, number, runner) = (attempt.job_id, attempt.number, attempt.runner_id);
        let untouched = attempt.finished_at.is_none() && attempt.acked_seq == 0;
        let job = self.require_job(job_id).await?;
        if !untouched
            || job.current_lease != Some(lease)
            || status_of(job.status) != JobStatus::Assigned
        {
            return Ok(());
        }
        let lock_key = job.lock_key.clone();
        self.transition(
            job_id,
            number,
            JobStatus::Queued,
            FailureKind::Unspecified,
            format!("the assignment never reached runner {runner}; queued again"),
            None,
        )?;
        let job = self.job_mut(&job_id)?;
        job.attempt_count -= 1;
        job.current_lease = None;
        job.runner_id = None;
        self.attempts.remove(&lease);
        self.dirty_attempts.remove(&lease);
        if !self.new_attempts.remove(&lease) {
            attempt::Entity::delete_by_id(lease).exec(self.txn).await?;
        }
        self.release_lock(lock_key, lease).await
    }

    /// Cancels a loaded job: QUEUED ends CANCELED at once; ASSIGNED/RUNNING becomes
    /// CANCELING and its holder gets a cancel command; CANCELING stays as it is.
    pub async fn request_cancel(&mut self, job_id: Uuid, reason: &str) -> Result<()> {
        let job = self.require_job(job_id).await?;
        let status = status_of(job.status);
        let message = if reason.is_empty() {
            "canceled by user".to_string()
        } else {
            format!("canceled by user: {reason}")
        };
        match status {
            JobStatus::Queued => self.transition(
                job_id,
                0,
                JobStatus::Canceled,
                FailureKind::Canceled,
                message,
                None,
            ),
            JobStatus::Assigned | JobStatus::Running => {
                let (lease, runner, number, spec) = (
                    job.current_lease,
                    job.runner_id,
                    job.attempt_count,
                    decode::<gantry_proto::JobSpec>(&job.spec)?,
                );
                let (Some(lease), Some(runner)) = (lease, runner) else {
                    return Err(Error::Internal(format!(
                        "claimed job {job_id} has no current lease"
                    )));
                };
                self.transition(
                    job_id,
                    number,
                    JobStatus::Canceling,
                    FailureKind::Canceled,
                    message,
                    None,
                )?;
                self.issue_command(
                    runner,
                    command::Kind::Cancel(gantry_proto::CancelCommand {
                        job_id: job_id.to_string(),
                        lease_id: lease.to_string(),
                        grace_seconds: spec.cancel_grace_seconds,
                        reason: reason.to_string(),
                    }),
                )
                .await
                .map(|_| ())
            }
            JobStatus::Canceling => Ok(()),
            other => Err(Error::FailedPrecondition(format!(
                "job {job_id} is already {}; a terminal job never changes",
                other.as_str_name()
            ))),
        }
    }

    /// Persists a command for `runner_id` with the next per-runner sequence.
    pub async fn issue_command(&mut self, runner_id: Uuid, kind: command::Kind) -> Result<u64> {
        let mut q = runner::Entity::find_by_id(runner_id);
        if self.postgres {
            q = q.lock_exclusive();
        }
        let row = q
            .one(self.txn)
            .await?
            .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
        let seq = row.command_seq + 1;
        let mut active = row.into_active_model();
        active.command_seq = sea_orm::ActiveValue::Set(seq);
        active.update(self.txn).await?;
        let body = Command {
            sequence: u64::try_from(seq).unwrap_or_default(),
            created_at_unix_ms: self.now,
            kind: Some(kind),
        };
        command_row::Entity::insert(
            command_row::Model {
                runner_id,
                seq,
                created_at: self.now,
                body: body.encode_to_vec(),
            }
            .into_active_model(),
        )
        .exec_without_returning(self.txn)
        .await?;
        self.signals.runners.insert(runner_id);
        Ok(body.sequence)
    }

    /// Writes every change; returns the signals to publish after commit.
    pub async fn flush(mut self) -> Result<Signals> {
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
        let mut inserts = Vec::new();
        for lease in &self.new_attempts {
            if let Some(model) = self.attempts.get(lease) {
                inserts.push(model.clone().into_active_model());
            }
        }
        for chunk in inserts.chunks(INSERT_CHUNK) {
            attempt::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(self.txn)
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
        Ok(self.signals)
    }
}
