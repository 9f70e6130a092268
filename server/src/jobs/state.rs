//! The job state machine: the one place that decides which transitions exist and where an
//! attempt's end leads. Pure functions, so every rule is unit-tested without a database;
//! [`crate::lifecycle`] applies their answers to stored rows.
use gantry_proto::{FailureKind, JobStatus};

/// Whether a status is final: a terminal job never changes again.
pub fn is_terminal(status: JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled | JobStatus::TimedOut
    )
}

/// Every transition the design allows. Anything else is a bug or a stale request.
pub fn allowed(from: JobStatus, to: JobStatus) -> bool {
    use JobStatus::*;
    match from {
        Queued => matches!(to, Assigned | Canceled),
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

/// How an attempt ended, as reported by its runner or decided by the reaper.
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
    /// The lease expired without the runner finishing (runner lost).
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
            _ => None,
        }
    }
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
    /// Delay before attempt `attempts_made + 1`: initial × 2^(attempts_made − 1), capped.
    pub fn backoff_ms(&self, attempts_made: u32) -> u64 {
        let doublings = attempts_made.saturating_sub(1).min(40);
        let delay = self.initial_backoff_ms.saturating_mul(1u64 << doublings);
        delay.min(self.max_backoff_ms)
    }
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
}
