//! The job state machine: the one place that decides what happens to a job.
//!
//! Every change of a job is decided here, by pure functions, from read-only views of the job
//! and its attempt ([`JobView`], [`AttemptView`]), and returned as one complete [`Decision`]:
//! the status move with its reason, the attempt started, ended or taken back, the lock to
//! release, the command to send, the backoff. Nothing here touches a row.
//! [`crate::jobs::lifecycle::Lifecycle::apply`] checks a decision against the rows it was decided
//! from and then applies all of it, or nothing.
//!
//! The rules, in one place:
//! - which moves exist ([`allowed`]) and which statuses are final ([`is_terminal`]);
//! - fencing: which reports a runner may make about an attempt ([`fence`]);
//! - a claim: a new attempt, numbered after the last one ([`claim`]);
//! - RUNNING reported: ASSIGNED becomes RUNNING; while CANCELING (or already RUNNING) the
//!   status stays and only the attempt's start is recorded ([`started`]);
//! - an attempt's end: terminal, or QUEUED again under the retry policy, or CANCELED when a
//!   cancel was pending, or — for an attempt its runner never acknowledged — taken back
//!   without counting ([`end`]);
//! - a claim taken back ([`take_back`]);
//! - what a cancel does in each status ([`cancel`]).
use gantry_proto::{CancelCommand, FailureKind, JobStatus, command};
use uuid::Uuid;

use crate::error::{Error, Result};

/// What a job row is. A sandbox is placed and held like a job, but its attempt stays open
/// and is never placed again once a runner reported on it; a command is a child of a
/// sandbox, placed by its sandbox (never by dispatch) on the sandbox's runner, and is never
/// taken back or retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Job,
    Sandbox,
    Command,
}

impl Kind {
    /// The stored number.
    pub fn as_i32(self) -> i32 {
        match self {
            Kind::Job => 0,
            Kind::Sandbox => 1,
            Kind::Command => 2,
        }
    }

    /// The kind of a stored number (a job for a number this build does not know).
    pub fn of(raw: i32) -> Kind {
        match raw {
            1 => Kind::Sandbox,
            2 => Kind::Command,
            _ => Kind::Job,
        }
    }
}

/// A stored status number as the enum (UNSPECIFIED for a number this build does not know).
pub fn status_of(raw: i32) -> JobStatus {
    JobStatus::try_from(raw).unwrap_or(JobStatus::Unspecified)
}

/// Whether a status is final: a terminal job never changes again.
pub fn is_terminal(status: JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled | JobStatus::TimedOut
    )
}

/// Every move the design allows. Anything else is a bug or a stale request.
pub fn allowed(from: JobStatus, to: JobStatus) -> bool {
    use JobStatus::*;
    match from {
        // FAILED from QUEUED: a sandbox command whose sandbox failed before it ran.
        Queued => matches!(to, Assigned | Canceled | Failed),
        Assigned => matches!(
            to,
            Running | Canceling | Queued | Succeeded | Failed | Canceled | TimedOut
        ),
        Running => matches!(
            to,
            Canceling | Queued | Succeeded | Failed | Canceled | TimedOut
        ),
        Canceling => matches!(to, Canceled | Succeeded),
        Succeeded | Failed | Canceled | TimedOut | Unspecified => false,
    }
}

/// Failure kinds the retry policy retries while attempts remain.
pub fn is_retryable(kind: FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::ExitNonzero
            | FailureKind::RunnerLost
            | FailureKind::ExecutorError
            | FailureKind::OomKilled
    )
}

/// The retry policy as stored with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Total attempts allowed.
    pub max_attempts: u32,
    /// Delay before the second attempt, ms.
    pub initial_backoff_ms: u64,
    /// Upper bound of the delay, ms.
    pub max_backoff_ms: u64,
}

impl Retry {
    /// One attempt, no retry.
    pub const NONE: Retry = Retry {
        max_attempts: 1,
        initial_backoff_ms: 0,
        max_backoff_ms: 0,
    };

    /// Delay before attempt `attempts_made + 1`: initial × 2^(attempts_made − 1), capped.
    pub fn backoff_ms(&self, attempts_made: u32) -> u64 {
        let doublings = attempts_made.saturating_sub(1).min(40);
        let delay = self.initial_backoff_ms.saturating_mul(1u64 << doublings);
        delay.min(self.max_backoff_ms)
    }
}

/// What the state machine reads of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobView {
    pub id: Uuid,
    pub kind: Kind,
    /// A command's sandbox.
    pub parent: Option<Uuid>,
    pub status: JobStatus,
    /// Attempts made (claims that count).
    pub attempt_count: u32,
    /// Lease of the unfinished attempt, if any.
    pub current_lease: Option<Uuid>,
    /// Runner of the current or last attempt.
    pub runner: Option<Uuid>,
    pub lock_key: Option<String>,
    pub retry: Retry,
    /// Wall-clock limit of one attempt, ms.
    pub timeout_ms: i64,
    /// Time between the stop signal and the kill on cancel, ms.
    pub cancel_grace_ms: i64,
}

/// What the state machine reads of an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptView {
    pub lease: Uuid,
    pub job: Uuid,
    pub number: u32,
    pub runner: Uuid,
    /// The runner reported RUNNING.
    pub started: bool,
    /// The attempt has ended.
    pub finished: bool,
    /// Highest report sequence applied (0: the runner never reported on it).
    pub acked_seq: i64,
}

/// How an attempt ended, as reported by its runner or decided by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The work exited 0.
    Succeeded { exit_code: Option<i32> },
    /// The work failed.
    Failed {
        kind: FailureKind,
        message: String,
        exit_code: Option<i32>,
    },
    /// The work was stopped on a cancel (its exit code, when it exited).
    Canceled {
        message: String,
        exit_code: Option<i32>,
    },
    /// The work ran past its deadline (its exit code, when it was stopped and exited).
    TimedOut {
        message: String,
        exit_code: Option<i32>,
    },
    /// The lease ended without the runner finishing (runner lost).
    Lost { message: String },
}

impl AttemptEnd {
    /// Failure kind of this end (UNSPECIFIED for success).
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            AttemptEnd::Succeeded { .. } => FailureKind::Unspecified,
            AttemptEnd::Failed { kind, .. } => *kind,
            AttemptEnd::Canceled { .. } => FailureKind::Canceled,
            AttemptEnd::TimedOut { .. } => FailureKind::Timeout,
            AttemptEnd::Lost { .. } => FailureKind::RunnerLost,
        }
    }

    /// Human-readable reason.
    pub fn message(&self) -> String {
        match self {
            AttemptEnd::Succeeded { .. } => String::new(),
            AttemptEnd::Failed { message, .. }
            | AttemptEnd::Canceled { message, .. }
            | AttemptEnd::TimedOut { message, .. }
            | AttemptEnd::Lost { message } => message.clone(),
        }
    }

    /// Exit code, when the work exited.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            AttemptEnd::Succeeded { exit_code }
            | AttemptEnd::Failed { exit_code, .. }
            | AttemptEnd::Canceled { exit_code, .. }
            | AttemptEnd::TimedOut { exit_code, .. } => *exit_code,
            AttemptEnd::Lost { .. } => None,
        }
    }
}

/// A status move and why it happened (one status event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub from: JobStatus,
    pub to: JobStatus,
    pub failure_kind: FailureKind,
    pub message: String,
    pub exit_code: Option<i32>,
}

/// A new attempt: a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    pub lease: Uuid,
    pub runner: Uuid,
    pub number: u32,
    pub lease_expires_at: i64,
    pub deadline_at: i64,
    /// A command's attempt: its sandbox's lease.
    pub parent_lease: Option<Uuid>,
}

/// How an attempt ended, as recorded on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub lease: Uuid,
    /// The status the attempt ended the job with (FAILED for an attempt that was retried).
    pub status: JobStatus,
    pub failure_kind: FailureKind,
    pub message: String,
    pub exit_code: Option<i32>,
}

/// One complete change of one job, decided from views. See the module comment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub job: Uuid,
    /// The attempt the change belongs to (0: none), for its events.
    pub attempt: u32,
    /// The status move; `None` when the status stays.
    pub status: Option<Move>,
    /// A new attempt.
    pub start: Option<Start>,
    /// The runner reported RUNNING for this lease (with its container or process id).
    pub started: Option<(Uuid, String)>,
    /// An attempt ends.
    pub end: Option<Ended>,
    /// An attempt is taken back: removed, and not counted.
    pub take_back: Option<Uuid>,
    /// A requeued job is not dispatched before this time (Unix ms).
    pub not_before: Option<i64>,
    /// The lock released: (key, the lease that held it).
    pub release_lock: Option<(String, Uuid)>,
    /// A command for a runner.
    pub command: Option<(Uuid, command::Kind)>,
    /// When the server ends an unconfirmed cancel of this lease (Unix ms).
    pub cancel_deadline: Option<(Uuid, i64)>,
}

impl Decision {
    /// Nothing changes for `job`.
    pub fn nothing(job: Uuid) -> Decision {
        Decision {
            job,
            ..Default::default()
        }
    }

    /// Whether applying it changes nothing.
    pub fn is_nothing(&self) -> bool {
        *self == Decision::nothing(self.job)
    }
}

/// What [`fence`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// The report is about the current attempt of its runner: apply it.
    Current,
    /// Already applied (sequence at or below the acknowledged one): acknowledge it again,
    /// without effect. Carries the acknowledged sequence.
    Duplicate(u64),
}

/// Fencing: may `runner` report with `sequence` about (`job`, the attempt of `attempt`)?
/// `attempt` is `None` when no attempt has that lease.
pub fn fence(
    job: Uuid,
    attempt: Option<&AttemptView>,
    current_lease: Option<Uuid>,
    runner: Uuid,
    sequence: i64,
) -> Result<Fenced> {
    let attempt = match attempt {
        Some(a) if a.job == job => a,
        _ => {
            return Err(Error::FailedPrecondition(
                "the lease is not a lease of this job: stop this work".into(),
            ));
        }
    };
    if attempt.runner != runner {
        return Err(Error::PermissionDenied(format!(
            "attempt {} of job {job} belongs to another runner",
            attempt.number
        )));
    }
    if sequence <= attempt.acked_seq {
        return Ok(Fenced::Duplicate(
            u64::try_from(attempt.acked_seq).unwrap_or_default(),
        ));
    }
    if attempt.finished || current_lease != Some(attempt.lease) {
        return Err(Error::FailedPrecondition(format!(
            "the lease of attempt {} of job {job} is no longer current (the attempt ended): stop this work",
            attempt.number
        )));
    }
    Ok(Fenced::Current)
}

/// A claim of a QUEUED job by `runner` under the fresh `lease`: attempt `attempt_count + 1`.
pub fn claim(
    job: &JobView,
    runner: Uuid,
    lease: Uuid,
    now: i64,
    lease_ms: i64,
) -> Result<Decision> {
    if job.status != JobStatus::Queued {
        return Err(Error::FailedPrecondition(format!(
            "job {} is {}, not queued",
            job.id,
            job.status.as_str_name()
        )));
    }
    let number = job.attempt_count.saturating_add(1);
    Ok(Decision {
        job: job.id,
        attempt: number,
        status: Some(Move {
            from: JobStatus::Queued,
            to: JobStatus::Assigned,
            failure_kind: FailureKind::Unspecified,
            message: format!("claimed by runner {runner}"),
            exit_code: None,
        }),
        start: Some(Start {
            lease,
            runner,
            number,
            lease_expires_at: now.saturating_add(lease_ms),
            deadline_at: now.saturating_add(job.timeout_ms),
            parent_lease: None,
        }),
        ..Decision::nothing(job.id)
    })
}

/// The holder of the current attempt reported RUNNING (fencing has passed).
pub fn started(job: &JobView, attempt: &AttemptView, container_id: &str) -> Result<Decision> {
    let started = Some((attempt.lease, container_id.to_string()));
    match job.status {
        JobStatus::Assigned => Ok(Decision {
            attempt: attempt.number,
            status: Some(Move {
                from: JobStatus::Assigned,
                to: JobStatus::Running,
                failure_kind: FailureKind::Unspecified,
                message: if container_id.is_empty() {
                    "started".to_string()
                } else {
                    format!("started ({container_id})")
                },
                exit_code: None,
            }),
            started,
            ..Decision::nothing(job.id)
        }),
        // Already running (a repeated report), or a cancel is under way: the status stays;
        // only the attempt's start is recorded.
        JobStatus::Running | JobStatus::Canceling => Ok(Decision {
            attempt: attempt.number,
            started,
            ..Decision::nothing(job.id)
        }),
        other => Err(Error::FailedPrecondition(format!(
            "job {} is {}, not assigned",
            job.id,
            other.as_str_name()
        ))),
    }
}

/// Where a job goes when the attempt of `attempt` ends as `end` at `now`.
///
/// - An attempt that is not the job's current one (an inconsistent row) is closed on its
///   own, releasing any lock it held; the job is not touched.
/// - A lost attempt its runner never acknowledged (no report ever applied) is taken back:
///   the job is QUEUED again and the attempt does not count — a job never loses an attempt
///   that never started.
/// - Otherwise the retry policy decides: terminal, or QUEUED after a backoff; a pending
///   cancel makes every end but a success CANCELED.
pub fn end(job: &JobView, attempt: &AttemptView, end: AttemptEnd, now: i64) -> Result<Decision> {
    if attempt.finished {
        return Err(Error::FailedPrecondition(format!(
            "attempt {} of job {} has already ended",
            attempt.number, job.id
        )));
    }
    let lease = attempt.lease;
    let release_lock = job.lock_key.clone().map(|k| (k, lease));
    let record = |status: JobStatus, failure_kind: FailureKind, message: String| Ended {
        lease,
        status,
        failure_kind,
        message,
        exit_code: end.exit_code(),
    };
    if job.current_lease != Some(lease) || is_terminal(job.status) {
        return Ok(Decision {
            attempt: attempt.number,
            end: Some(record(
                JobStatus::Failed,
                end.failure_kind(),
                format!(
                    "{} (the attempt was no longer its job's current one)",
                    end.message()
                ),
            )),
            release_lock,
            ..Decision::nothing(job.id)
        });
    }
    if job.status == JobStatus::Assigned
        && job.kind != Kind::Command
        && matches!(end, AttemptEnd::Lost { .. })
        && attempt.acked_seq == 0
        && !attempt.started
    {
        return Ok(take_back_decision(
            job,
            attempt,
            format!(
                "runner {} never acknowledged the assignment ({}); queued again, the attempt does not count",
                attempt.runner,
                end.message()
            ),
        ));
    }
    let mut decision = Decision {
        attempt: attempt.number,
        release_lock,
        ..Decision::nothing(job.id)
    };
    match after_attempt(job.status, &end, attempt.number, job.retry, now) {
        Next::Terminal {
            status,
            failure_kind,
            message,
        } => {
            decision.end = Some(record(status, failure_kind, message.clone()));
            decision.status = Some(Move {
                from: job.status,
                to: status,
                failure_kind,
                message,
                exit_code: end.exit_code(),
            });
        }
        Next::Retry { not_before } => {
            let kind = end.failure_kind();
            decision.end = Some(record(JobStatus::Failed, kind, end.message()));
            decision.status = Some(Move {
                from: job.status,
                to: JobStatus::Queued,
                failure_kind: kind,
                message: format!(
                    "attempt {} failed ({}): {}; retrying",
                    attempt.number,
                    kind.as_str_name(),
                    end.message()
                ),
                exit_code: end.exit_code(),
            });
            decision.not_before = Some(not_before);
        }
    }
    Ok(decision)
}

/// Takes back a claim whose assignment never reached its runner: the job is QUEUED again as
/// if it had not been claimed, and the attempt does not count. `None` when the attempt is not
/// an untouched, current claim (a claim the runner reported on is left to its lease).
pub fn take_back(job: &JobView, attempt: &AttemptView, why: String) -> Option<Decision> {
    let untouched = !attempt.finished && attempt.acked_seq == 0 && !attempt.started;
    // A command's assignment is a persisted runner command, delivered until acknowledged:
    // never taken back (it would run twice).
    (untouched
        && job.kind != Kind::Command
        && job.status == JobStatus::Assigned
        && job.current_lease == Some(attempt.lease))
    .then(|| take_back_decision(job, attempt, why))
}

fn take_back_decision(job: &JobView, attempt: &AttemptView, why: String) -> Decision {
    Decision {
        attempt: attempt.number,
        status: Some(Move {
            from: JobStatus::Assigned,
            to: JobStatus::Queued,
            failure_kind: FailureKind::Unspecified,
            message: why,
            exit_code: None,
        }),
        take_back: Some(attempt.lease),
        release_lock: job.lock_key.clone().map(|k| (k, attempt.lease)),
        ..Decision::nothing(job.id)
    }
}

/// What a cancel does: QUEUED ends CANCELED at once; ASSIGNED or RUNNING becomes CANCELING,
/// its runner is sent a cancel command, and the server ends the attempt CANCELED itself if
/// the runner has not confirmed by the job's grace plus one lease; CANCELING stays as it is;
/// a terminal job is refused.
pub fn cancel(job: &JobView, reason: &str, now: i64, lease_ms: i64) -> Result<Decision> {
    let message = if reason.is_empty() {
        "canceled by user".to_string()
    } else {
        format!("canceled by user: {reason}")
    };
    stop(job, message, reason, now, lease_ms)
}

/// A cancel with the event's `message` given whole and `reason` passed to the runner: what
/// deletes a sandbox (by a user, its idle timeout, one-shot) and cancels its commands.
pub fn stop(
    job: &JobView,
    message: String,
    reason: &str,
    now: i64,
    lease_ms: i64,
) -> Result<Decision> {
    let to = |to: JobStatus| {
        Some(Move {
            from: job.status,
            to,
            failure_kind: FailureKind::Canceled,
            message: message.clone(),
            exit_code: None,
        })
    };
    match job.status {
        JobStatus::Queued => Ok(Decision {
            status: to(JobStatus::Canceled),
            ..Decision::nothing(job.id)
        }),
        JobStatus::Assigned | JobStatus::Running => {
            let (Some(lease), Some(runner)) = (job.current_lease, job.runner) else {
                return Err(Error::Internal(format!(
                    "claimed job {} has no current lease",
                    job.id
                )));
            };
            Ok(Decision {
                attempt: job.attempt_count,
                status: to(JobStatus::Canceling),
                command: Some((
                    runner,
                    command::Kind::Cancel(CancelCommand {
                        job_id: job.id.to_string(),
                        lease_id: lease.to_string(),
                        grace_seconds: u32::try_from(job.cancel_grace_ms / 1000).unwrap_or(0),
                        reason: reason.to_string(),
                    }),
                )),
                cancel_deadline: Some((
                    lease,
                    now.saturating_add(job.cancel_grace_ms)
                        .saturating_add(lease_ms),
                )),
                ..Decision::nothing(job.id)
            })
        }
        JobStatus::Canceling => Ok(Decision::nothing(job.id)),
        other => Err(Error::FailedPrecondition(format!(
            "job {} is already {}; a terminal job never changes",
            job.id,
            other.as_str_name()
        ))),
    }
}

/// What happens to a command of a sandbox that ended: a queued one ends at once (CANCELED
/// when the sandbox was deleted, FAILED with the sandbox's failure kind when it failed); one
/// under way ends its attempt so, whatever its runner still says about it. `None` when the
/// command has already ended.
pub fn abandon(
    job: &JobView,
    attempt: Option<&AttemptView>,
    failed: Option<FailureKind>,
    message: &str,
    now: i64,
) -> Result<Option<Decision>> {
    if is_terminal(job.status) {
        return Ok(None);
    }
    let (to, kind) = match failed {
        Some(kind) => (JobStatus::Failed, kind),
        None => (JobStatus::Canceled, FailureKind::Canceled),
    };
    if job.status == JobStatus::Queued {
        return Ok(Some(Decision {
            status: Some(Move {
                from: JobStatus::Queued,
                to,
                failure_kind: kind,
                message: message.to_string(),
                exit_code: None,
            }),
            ..Decision::nothing(job.id)
        }));
    }
    let Some(attempt) = attempt else {
        return Err(Error::Internal(format!(
            "command {} is {} without its attempt",
            job.id,
            job.status.as_str_name()
        )));
    };
    let end_as = match failed {
        Some(kind) => AttemptEnd::Failed {
            kind,
            message: message.to_string(),
            exit_code: None,
        },
        None => AttemptEnd::Canceled {
            message: message.to_string(),
            exit_code: None,
        },
    };
    end(job, attempt, end_as, now).map(Some)
}

/// Where a job goes when its current attempt ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// The job is final.
    Terminal {
        status: JobStatus,
        failure_kind: FailureKind,
        message: String,
    },
    /// The job waits for another attempt, not before `not_before` (Unix ms).
    Retry { not_before: i64 },
}

/// Decides where a job in `status` goes when its attempt number `attempts_made` ends as `end`.
pub fn after_attempt(
    status: JobStatus,
    end: &AttemptEnd,
    attempts_made: u32,
    retry: Retry,
    now_ms: i64,
) -> Next {
    let terminal = |status, failure_kind, message: String| Next::Terminal {
        status,
        failure_kind,
        message,
    };
    if status == JobStatus::Canceling {
        // A cancel was requested: only a success that raced it is recorded as such.
        return match end {
            AttemptEnd::Succeeded { .. } => terminal(
                JobStatus::Succeeded,
                FailureKind::Unspecified,
                String::new(),
            ),
            AttemptEnd::Canceled { message, .. } => {
                terminal(JobStatus::Canceled, FailureKind::Canceled, message.clone())
            }
            other => terminal(
                JobStatus::Canceled,
                FailureKind::Canceled,
                format!("canceled; the attempt ended: {}", other.message()),
            ),
        };
    }
    match end {
        AttemptEnd::Succeeded { .. } => terminal(
            JobStatus::Succeeded,
            FailureKind::Unspecified,
            String::new(),
        ),
        AttemptEnd::Canceled { message, .. } => {
            terminal(JobStatus::Canceled, FailureKind::Canceled, message.clone())
        }
        AttemptEnd::TimedOut { message, .. } => {
            terminal(JobStatus::TimedOut, FailureKind::Timeout, message.clone())
        }
        AttemptEnd::Failed { kind, message, .. } => {
            retry_or_fail(*kind, message, attempts_made, retry, now_ms)
        }
        AttemptEnd::Lost { message } => retry_or_fail(
            FailureKind::RunnerLost,
            message,
            attempts_made,
            retry,
            now_ms,
        ),
    }
}

fn retry_or_fail(
    kind: FailureKind,
    message: &str,
    attempts_made: u32,
    retry: Retry,
    now_ms: i64,
) -> Next {
    if is_retryable(kind) && attempts_made < retry.max_attempts {
        let delay = i64::try_from(retry.backoff_ms(attempts_made)).unwrap_or(i64::MAX / 2);
        Next::Retry {
            not_before: now_ms.saturating_add(delay),
        }
    } else {
        Next::Terminal {
            status: JobStatus::Failed,
            failure_kind: kind,
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY3: Retry = Retry {
        max_attempts: 3,
        initial_backoff_ms: 100,
        max_backoff_ms: 250,
    };

    fn job(status: JobStatus) -> (JobView, AttemptView) {
        let (id, lease, runner) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let claimed = !matches!(status, JobStatus::Queued) && !is_terminal(status);
        (
            JobView {
                id,
                kind: Kind::Job,
                parent: None,
                status,
                attempt_count: 1,
                current_lease: claimed.then_some(lease),
                runner: Some(runner),
                lock_key: Some("k".into()),
                retry: RETRY3,
                timeout_ms: 60_000,
                cancel_grace_ms: 5_000,
            },
            AttemptView {
                lease,
                job: id,
                number: 1,
                runner,
                started: status == JobStatus::Running,
                finished: false,
                acked_seq: 3,
            },
        )
    }

    #[test]
    fn a_command_is_never_taken_back_and_never_retried() {
        let (mut job, mut attempt) = job(JobStatus::Assigned);
        job.kind = Kind::Command;
        // A command's row stores one attempt.
        job.retry = Retry::NONE;
        attempt.acked_seq = 0;
        assert!(take_back(&job, &attempt, "undelivered".into()).is_none());
        let lost = AttemptEnd::Lost {
            message: "gone".into(),
        };
        let d = end(&job, &attempt, lost, 10).expect("end");
        assert_eq!(d.take_back, None);
        let m = d.status.expect("a move");
        assert_eq!(
            (m.to, m.failure_kind),
            (JobStatus::Failed, FailureKind::RunnerLost)
        );
        // The same attempt of a job is taken back.
        job.kind = Kind::Job;
        assert!(take_back(&job, &attempt, "undelivered".into()).is_some());
    }

    #[test]
    fn a_sandbox_that_ended_ends_its_commands() {
        let (queued, _) = job(JobStatus::Queued);
        let d = abandon(&queued, None, None, "deleted", 5)
            .expect("decided")
            .expect("a change");
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Canceled));
        let d = abandon(&queued, None, Some(FailureKind::RunnerLost), "lost", 5)
            .expect("decided")
            .expect("a change");
        let m = d.status.expect("a move");
        assert_eq!(
            (m.to, m.failure_kind),
            (JobStatus::Failed, FailureKind::RunnerLost)
        );
        assert!(allowed(JobStatus::Queued, JobStatus::Failed));
        let (mut running, attempt) = job(JobStatus::Running);
        running.retry = Retry::NONE;
        let d = abandon(
            &running,
            Some(&attempt),
            Some(FailureKind::RunnerLost),
            "lost",
            5,
        )
        .expect("decided")
        .expect("a change");
        assert_eq!(d.end.map(|e| e.lease), Some(attempt.lease));
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Failed));
        let d = abandon(&running, Some(&attempt), None, "deleted", 5)
            .expect("decided")
            .expect("a change");
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Canceled));
        assert!(
            abandon(&running, None, None, "x", 5).is_err(),
            "an attempt is needed"
        );
        let (done, _) = job(JobStatus::Succeeded);
        assert_eq!(abandon(&done, None, None, "x", 5).expect("decided"), None);
    }

    #[test]
    fn terminal_statuses_go_nowhere() {
        use JobStatus::*;
        let all = [
            Queued, Assigned, Running, Canceling, Succeeded, Failed, Canceled, TimedOut,
        ];
        for from in [Succeeded, Failed, Canceled, TimedOut] {
            assert!(is_terminal(from));
            for to in all {
                assert!(!allowed(from, to), "{from:?} -> {to:?} must be refused");
            }
        }
    }

    #[test]
    fn queued_is_only_left_by_a_claim_or_a_cancel() {
        use JobStatus::*;
        assert!(allowed(Queued, Assigned));
        assert!(allowed(Queued, Canceled));
        assert!(!allowed(Queued, Running));
        assert!(!allowed(Queued, Succeeded));
        assert!(!allowed(Canceling, Running));
        assert!(!allowed(Canceling, Failed));
    }

    #[test]
    fn a_lost_lease_retries_with_backoff_while_attempts_remain() {
        let lost = AttemptEnd::Lost {
            message: "lease expired".into(),
        };
        assert_eq!(
            after_attempt(JobStatus::Running, &lost, 1, RETRY3, 1_000),
            Next::Retry { not_before: 1_100 }
        );
        assert_eq!(
            after_attempt(JobStatus::Running, &lost, 2, RETRY3, 1_000),
            Next::Retry { not_before: 1_200 }
        );
        match after_attempt(JobStatus::Running, &lost, 3, RETRY3, 1_000) {
            Next::Terminal {
                status,
                failure_kind,
                ..
            } => {
                assert_eq!(status, JobStatus::Failed);
                assert_eq!(failure_kind, FailureKind::RunnerLost);
            }
            other => panic!("expected FAILED, got {other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(RETRY3.backoff_ms(1), 100);
        assert_eq!(RETRY3.backoff_ms(2), 200);
        assert_eq!(RETRY3.backoff_ms(3), 250);
        assert_eq!(RETRY3.backoff_ms(200), 250);
    }

    #[test]
    fn non_retryable_failures_end_the_job() {
        let end = AttemptEnd::Failed {
            kind: FailureKind::ImageUnavailable,
            message: "no such image".into(),
            exit_code: None,
        };
        assert!(matches!(
            after_attempt(JobStatus::Assigned, &end, 1, RETRY3, 0),
            Next::Terminal {
                status: JobStatus::Failed,
                failure_kind: FailureKind::ImageUnavailable,
                ..
            }
        ));
        let timeout = AttemptEnd::TimedOut {
            message: "deadline".into(),
            exit_code: None,
        };
        assert!(matches!(
            after_attempt(JobStatus::Running, &timeout, 1, RETRY3, 0),
            Next::Terminal {
                status: JobStatus::TimedOut,
                ..
            }
        ));
    }

    #[test]
    fn a_canceling_job_ends_canceled_whatever_the_attempt_did_but_success() {
        let lost = AttemptEnd::Lost {
            message: "lease expired".into(),
        };
        assert!(matches!(
            after_attempt(JobStatus::Canceling, &lost, 1, RETRY3, 0),
            Next::Terminal {
                status: JobStatus::Canceled,
                failure_kind: FailureKind::Canceled,
                ..
            }
        ));
        let ok = AttemptEnd::Succeeded { exit_code: Some(0) };
        assert!(matches!(
            after_attempt(JobStatus::Canceling, &ok, 1, RETRY3, 0),
            Next::Terminal {
                status: JobStatus::Succeeded,
                ..
            }
        ));
    }

    #[test]
    fn fencing_refuses_other_jobs_other_runners_and_ended_leases() {
        let (j, a) = job(JobStatus::Running);
        let lease = j.current_lease;
        assert_eq!(
            fence(j.id, Some(&a), lease, a.runner, 4).ok(),
            Some(Fenced::Current)
        );
        assert_eq!(
            fence(j.id, Some(&a), lease, a.runner, 3).ok(),
            Some(Fenced::Duplicate(3))
        );
        assert!(matches!(
            fence(Uuid::now_v7(), Some(&a), lease, a.runner, 4),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            fence(j.id, None, lease, a.runner, 4),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            fence(j.id, Some(&a), lease, Uuid::now_v7(), 4),
            Err(Error::PermissionDenied(_))
        ));
        // A newer lease, or an ended attempt: stale. A duplicate is still acknowledged.
        assert!(matches!(
            fence(j.id, Some(&a), Some(Uuid::now_v7()), a.runner, 4),
            Err(Error::FailedPrecondition(_))
        ));
        let ended = AttemptView {
            finished: true,
            ..a.clone()
        };
        assert!(matches!(
            fence(j.id, Some(&ended), lease, a.runner, 4),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(
            fence(j.id, Some(&ended), lease, a.runner, 2).ok(),
            Some(Fenced::Duplicate(3))
        );
    }

    #[test]
    fn a_claim_numbers_the_attempt_after_the_last_and_sets_its_deadlines() {
        let (mut j, _) = job(JobStatus::Queued);
        j.attempt_count = 2;
        let (runner, lease) = (Uuid::now_v7(), Uuid::now_v7());
        let d = claim(&j, runner, lease, 1_000, 3_000).expect("claimable");
        let start = d.start.expect("a new attempt");
        assert_eq!(
            (start.number, start.lease, start.runner),
            (3, lease, runner)
        );
        assert_eq!((start.lease_expires_at, start.deadline_at), (4_000, 61_000));
        assert_eq!(
            d.status.map(|m| (m.from, m.to)),
            Some((JobStatus::Queued, JobStatus::Assigned))
        );
        let (running, _) = job(JobStatus::Running);
        assert!(claim(&running, runner, lease, 0, 1).is_err());
    }

    #[test]
    fn running_while_canceling_records_the_start_and_keeps_the_status() {
        let (j, a) = job(JobStatus::Assigned);
        let d = started(&j, &a, "c1").expect("allowed");
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Running));
        let (j, a) = job(JobStatus::Canceling);
        let d = started(&j, &a, "c1").expect("allowed");
        assert_eq!(d.status, None);
        assert_eq!(d.started, Some((a.lease, "c1".to_string())));
        let (j, a) = job(JobStatus::Queued);
        assert!(matches!(
            started(&j, &a, ""),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn an_end_releases_the_lock_and_retries_or_finishes() {
        let (j, a) = job(JobStatus::Running);
        let failed = AttemptEnd::Failed {
            kind: FailureKind::ExitNonzero,
            message: "exit 1".into(),
            exit_code: Some(1),
        };
        let d = end(&j, &a, failed, 1_000).expect("decided");
        assert_eq!(d.release_lock, Some(("k".into(), a.lease)));
        assert_eq!(d.status.as_ref().map(|m| m.to), Some(JobStatus::Queued));
        assert_eq!(d.not_before, Some(1_100));
        assert_eq!(d.end.as_ref().map(|e| e.status), Some(JobStatus::Failed));
        let ok = end(&j, &a, AttemptEnd::Succeeded { exit_code: Some(0) }, 0).expect("decided");
        assert_eq!(ok.status.map(|m| m.to), Some(JobStatus::Succeeded));
        let done = AttemptView {
            finished: true,
            ..a.clone()
        };
        assert!(end(&j, &done, AttemptEnd::Succeeded { exit_code: None }, 0).is_err());
    }

    #[test]
    fn a_lost_attempt_that_was_never_acknowledged_does_not_count() {
        let (mut j, mut a) = job(JobStatus::Assigned);
        j.retry = Retry::NONE;
        a.acked_seq = 0;
        let lost = AttemptEnd::Lost {
            message: "lease expired".into(),
        };
        let d = end(&j, &a, lost.clone(), 0).expect("decided");
        assert_eq!(d.take_back, Some(a.lease));
        assert_eq!(d.end, None);
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Queued));
        // Acknowledged once: it counts, and with one attempt allowed the job fails.
        a.acked_seq = 1;
        let d = end(&j, &a, lost, 0).expect("decided");
        assert_eq!(d.take_back, None);
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Failed));
    }

    #[test]
    fn an_attempt_that_is_not_current_is_closed_alone() {
        let (mut j, a) = job(JobStatus::Running);
        j.current_lease = Some(Uuid::now_v7());
        let d = end(
            &j,
            &a,
            AttemptEnd::Lost {
                message: "x".into(),
            },
            0,
        )
        .expect("decided");
        assert_eq!(d.status, None);
        assert!(d.end.is_some());
        assert_eq!(d.release_lock, Some(("k".into(), a.lease)));
    }

    #[test]
    fn a_cancel_does_what_the_status_allows() {
        let (j, _) = job(JobStatus::Queued);
        let d = cancel(&j, "", 0, 3_000).expect("allowed");
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Canceled));
        assert_eq!(d.command, None);
        let (j, a) = job(JobStatus::Running);
        let d = cancel(&j, "stop", 1_000, 3_000).expect("allowed");
        assert_eq!(d.status.map(|m| m.to), Some(JobStatus::Canceling));
        assert_eq!(d.cancel_deadline, Some((a.lease, 9_000)));
        assert!(matches!(d.command, Some((r, command::Kind::Cancel(_))) if r == a.runner));
        let (j, _) = job(JobStatus::Canceling);
        assert!(cancel(&j, "", 0, 1).expect("allowed").is_nothing());
        let (j, _) = job(JobStatus::Succeeded);
        assert!(matches!(
            cancel(&j, "", 0, 1),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn a_claim_is_taken_back_only_while_untouched() {
        let (j, mut a) = job(JobStatus::Assigned);
        a.acked_seq = 0;
        assert!(take_back(&j, &a, "why".into()).is_some());
        a.acked_seq = 1;
        assert!(take_back(&j, &a, "why".into()).is_none());
    }
}
