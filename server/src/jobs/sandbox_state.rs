//! The sandbox rules that are not the job state machine's: how a sandbox's job status reads
//! as a sandbox lifecycle, how a command's reads as a command status, and what a sandbox
//! does next once something changed (start its next command, or end itself when one-shot).
//! Pure: nothing here touches a row.
use gantry_proto::{CommandStatus, FailureKind, JobStatus, SandboxStatus};
use uuid::Uuid;

/// Metadata key of a command's job spec holding its number in the sandbox (internal: a
/// command's job spec is never shown as such).
pub const NUMBER_KEY: &str = "gantry/command-number";

/// A command's number in its sandbox, from its job spec.
pub fn command_number(spec: &gantry_proto::JobSpec) -> u32 {
    spec.metadata
        .get(NUMBER_KEY)
        .and_then(|n| n.parse().ok())
        .unwrap_or_default()
}

/// A sandbox's lifecycle status from its job's status: PENDING while queued, CREATING then
/// STARTING (once the runner reported that phase) while assigned, RUNNING, DELETING while a
/// stop is under way; a success, cancel or timeout (lifetime) is DELETED, a failure FAILED.
pub fn sandbox_status(job: JobStatus, starting: bool) -> SandboxStatus {
    match job {
        JobStatus::Queued => SandboxStatus::Pending,
        JobStatus::Assigned if starting => SandboxStatus::Starting,
        JobStatus::Assigned => SandboxStatus::Creating,
        JobStatus::Running => SandboxStatus::Running,
        JobStatus::Canceling => SandboxStatus::Deleting,
        JobStatus::Succeeded | JobStatus::Canceled | JobStatus::TimedOut => SandboxStatus::Deleted,
        JobStatus::Failed => SandboxStatus::Failed,
        JobStatus::Unspecified => SandboxStatus::Unspecified,
    }
}

/// The job statuses a sandbox status covers (for filters).
pub fn job_statuses(status: SandboxStatus) -> &'static [JobStatus] {
    match status {
        SandboxStatus::Pending => &[JobStatus::Queued],
        SandboxStatus::Creating | SandboxStatus::Starting => &[JobStatus::Assigned],
        SandboxStatus::Running => &[JobStatus::Running],
        SandboxStatus::Deleting => &[JobStatus::Canceling],
        SandboxStatus::Deleted => &[
            JobStatus::Succeeded,
            JobStatus::Canceled,
            JobStatus::TimedOut,
        ],
        SandboxStatus::Failed => &[JobStatus::Failed],
        SandboxStatus::Unspecified => &[],
    }
}

/// Why a sandbox ended, as users see it: nothing for a delete, else the job's failure kind
/// (TIMEOUT for its lifetime, RUNNER_LOST ...).
pub fn sandbox_failure(job: JobStatus, kind: FailureKind) -> FailureKind {
    match job {
        JobStatus::Succeeded | JobStatus::Canceled => FailureKind::Unspecified,
        _ => kind,
    }
}

/// A command's status from its job's status (ASSIGNED counts as running: it was sent).
pub fn command_status(job: JobStatus) -> CommandStatus {
    match job {
        JobStatus::Queued => CommandStatus::Queued,
        JobStatus::Assigned | JobStatus::Running => CommandStatus::Running,
        JobStatus::Canceling => CommandStatus::Canceling,
        JobStatus::Succeeded => CommandStatus::Succeeded,
        JobStatus::Failed => CommandStatus::Failed,
        JobStatus::Canceled => CommandStatus::Canceled,
        JobStatus::TimedOut => CommandStatus::TimedOut,
        JobStatus::Unspecified => CommandStatus::Unspecified,
    }
}

/// What the follow-up reads of one unfinished command of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandView {
    pub id: Uuid,
    /// Its number in the sandbox: the order it was accepted in.
    pub number: u32,
    pub status: JobStatus,
}

/// What a running sandbox does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing: a command is under way, or none waits.
    Wait,
    /// Start this command (the oldest queued) on the sandbox's runner.
    Start(Uuid),
    /// End the sandbox: it is one-shot and its command ended.
    Delete(String),
}

/// Decides what a RUNNING sandbox does next, from its unfinished commands (any order) and
/// whether a command of it that had started has just ended. Commands run one at a time, in
/// the order accepted (by number: ids come from each replica's clock and may disagree).
pub fn next(one_shot: bool, a_command_ended: bool, unfinished: &[CommandView]) -> Next {
    if one_shot && a_command_ended {
        return Next::Delete("one-shot: its command ended".to_string());
    }
    if unfinished.iter().any(|c| c.status != JobStatus::Queued) {
        return Next::Wait;
    }
    unfinished
        .iter()
        .filter(|c| c.status == JobStatus::Queued)
        .min_by_key(|c| (c.number, c.id))
        .map_or(Next::Wait, |c| Next::Start(c.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(status: JobStatus) -> CommandView {
        static NUMBER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        CommandView {
            id: Uuid::now_v7(),
            number: NUMBER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            status,
        }
    }

    #[test]
    fn commands_run_one_at_a_time_oldest_first() {
        let (a, b) = (cmd(JobStatus::Queued), cmd(JobStatus::Queued));
        assert_eq!(next(false, false, &[b, a]), Next::Start(a.id));
        let running = cmd(JobStatus::Running);
        assert_eq!(next(false, false, &[a, running, b]), Next::Wait);
        let sent = cmd(JobStatus::Assigned);
        assert_eq!(next(false, true, &[sent, b]), Next::Wait);
        let stopping = cmd(JobStatus::Canceling);
        assert_eq!(next(false, false, &[stopping, b]), Next::Wait);
        assert_eq!(next(false, true, &[]), Next::Wait);
        // The number decides, not the id (another replica's clock may have made it smaller).
        let late = CommandView {
            id: Uuid::nil(),
            number: b.number + 1,
            status: JobStatus::Queued,
        };
        assert_eq!(next(false, false, &[late, b]), Next::Start(b.id));
    }

    #[test]
    fn a_one_shot_sandbox_ends_after_its_first_command() {
        let queued = cmd(JobStatus::Queued);
        assert!(matches!(next(true, true, &[queued]), Next::Delete(_)));
        assert_eq!(next(true, false, &[queued]), Next::Start(queued.id));
    }

    #[test]
    fn statuses_read_as_the_sandbox_lifecycle() {
        use SandboxStatus as S;
        let cases = [
            (JobStatus::Queued, false, S::Pending),
            (JobStatus::Assigned, false, S::Creating),
            (JobStatus::Assigned, true, S::Starting),
            (JobStatus::Running, true, S::Running),
            (JobStatus::Canceling, true, S::Deleting),
            (JobStatus::Canceled, true, S::Deleted),
            (JobStatus::Succeeded, true, S::Deleted),
            (JobStatus::TimedOut, true, S::Deleted),
            (JobStatus::Failed, true, S::Failed),
        ];
        for (job, starting, want) in cases {
            assert_eq!(sandbox_status(job, starting), want, "{job:?}");
            assert!(job_statuses(want).contains(&job));
        }
        assert_eq!(
            sandbox_failure(JobStatus::Canceled, FailureKind::Canceled),
            FailureKind::Unspecified
        );
        assert_eq!(
            sandbox_failure(JobStatus::TimedOut, FailureKind::Timeout),
            FailureKind::Timeout
        );
        assert_eq!(command_status(JobStatus::Assigned), CommandStatus::Running);
    }
}
