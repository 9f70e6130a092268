//! One attempt on this runner: serves the work's endpoint ([`crate::relay`]), picks the
//! executor, enforces the timeout, and turns how the work ended (and why it was stopped, if
//! it was) into the attempt's final status. (The executor places the inputs and stores the
//! artifacts, before it returns: the final status is queued only once they are stored.)
use std::{sync::Arc, time::Duration};

use gantry_proto as pb;
use tokio::sync::watch;

use crate::{
    executor::{Executors, Io, Outcome, Stop, StopReason, Work},
    outbox::Outbox,
    relay::Relays,
};

/// What a job task needs from the runner.
pub struct Context {
    /// Where reports go.
    pub outbox: Arc<Outbox>,
    /// Executors the runner offers.
    pub executors: Executors,
    /// This runner's id.
    pub runner_id: String,
    /// Where each work's endpoint is served, relayed over the runner's channel.
    pub relays: Relays,
}

/// Grace between the stop signal and the kill when the spec names none.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// The grace period a job's spec asks for.
pub fn grace(spec: &pb::JobSpec) -> Duration {
    match spec.cancel_grace_seconds {
        0 => DEFAULT_GRACE,
        s => Duration::from_secs(u64::from(s)),
    }
}

/// The final message of work stopped by a `CancelCommand`.
pub fn cancel_message(cancel: &pb::CancelCommand) -> String {
    if cancel.reason.is_empty() {
        "canceled".to_string()
    } else {
        format!("canceled: {}", cancel.reason)
    }
}

/// Asks the attempt to stop, unless it is already stopping (a lost lease overrides: nothing
/// more will be reported either way).
pub fn request_stop(stop: &watch::Sender<Option<Stop>>, request: Stop) {
    stop.send_if_modified(|current| match current {
        Some(c) if c.reason == StopReason::LeaseLost || request.reason != StopReason::LeaseLost => {
            false
        }
        _ => {
            *current = Some(request);
            true
        }
    });
}

/// Runs one assignment to its end and queues its final status. Returns that status, or
/// `None` when the lease was lost (nothing is reported then).
pub async fn run(
    ctx: Arc<Context>,
    assignment: pb::Assignment,
    stop_tx: watch::Sender<Option<Stop>>,
) -> Option<pb::JobStatus> {
    let spec = assignment.spec.unwrap_or_default();
    let relay = ctx.relays.open().await;
    let work = Work {
        job_id: assignment.job_id,
        attempt: assignment.attempt,
        lease_id: assignment.lease_id,
        runner_id: ctx.runner_id.clone(),
        spec,
        access: ctx
            .relays
            .access(assignment.work_token, relay.as_ref().ok()),
    };
    let mut io = Io::new(ctx.outbox.clone(), &work.lease_id, stop_tx.subscribe());
    let outcome = match &relay {
        Ok(_) => execute(&ctx, &work, &mut io, &stop_tx).await,
        Err(e) => Outcome::failed(
            pb::FailureKind::ExecutorError,
            format!("cannot serve the work's endpoint: {e}"),
        ),
    };
    if let Ok(relay) = relay {
        relay.close().await;
    }
    let stop = stop_tx.borrow().clone();
    let status = final_status(outcome, stop.as_ref())?;
    let reported = pb::JobStatus::try_from(status.status).unwrap_or_default();
    tracing::info!(
        job = %work.job_id,
        attempt = work.attempt,
        status = reported.as_str_name(),
        message = %status.message,
        "attempt ended"
    );
    io.finish(status).await;
    Some(reported)
}

/// Runs the work on the executor its spec names, within its timeout.
async fn execute(
    ctx: &Context,
    work: &Work,
    io: &mut Io,
    stop_tx: &watch::Sender<Option<Stop>>,
) -> Outcome {
    let kind = pb::ExecutorKind::try_from(work.spec.executor).unwrap_or_default();
    let executor = ctx.executors.iter().find(|e| e.kind() == kind).cloned();
    let timeout = Duration::from_secs(u64::from(work.spec.timeout_seconds));
    match executor {
        None => Outcome::failed(
            pb::FailureKind::InvalidSpec,
            format!(
                "this runner does not offer the {} executor",
                kind.as_str_name()
            ),
        ),
        Some(executor) => {
            let run = executor.run(work, io, stop_tx.subscribe());
            tokio::pin!(run);
            let deadline = tokio::time::sleep(if timeout.is_zero() {
                crate::executor::NEVER
            } else {
                timeout
            });
            tokio::pin!(deadline);
            let mut timed_out = false;
            loop {
                tokio::select! {
                    outcome = &mut run => break outcome,
                    _ = &mut deadline, if !timed_out => {
                        timed_out = true;
                        request_stop(stop_tx, Stop {
                            reason: StopReason::Timeout,
                            grace: grace(&work.spec),
                            message: format!("ran past its timeout of {} s", timeout.as_secs()),
                        });
                    }
                }
            }
        }
    }
}

/// The final status of an attempt from how its work ended and why it was stopped.
pub fn final_status(outcome: Outcome, stop: Option<&Stop>) -> Option<pb::StatusReport> {
    let exit_code = match &outcome {
        Outcome::Exited { code, .. } => Some(*code),
        Outcome::Failed { .. } => None,
    };
    let status = |status: pb::JobStatus, kind: pb::FailureKind, message: String| {
        Some(pb::StatusReport {
            status: status as i32,
            exit_code,
            failure_kind: kind as i32,
            message,
            container_id: String::new(),
        })
    };
    // A lost lease reports nothing. Any other stop decides the status when it is what ended
    // the work: the executor signalled the work, or the executor gave up (an interrupted
    // pull). Work that exited on its own before the stop reached it keeps its own outcome.
    let acted_on_stop = match &outcome {
        Outcome::Exited { stopped, .. } => *stopped,
        Outcome::Failed { .. } => true,
    };
    if let Some(stop) = stop
        && (stop.reason == StopReason::LeaseLost || acted_on_stop)
    {
        return match stop.reason {
            StopReason::LeaseLost => None,
            StopReason::Cancel => status(
                pb::JobStatus::Canceled,
                pb::FailureKind::Canceled,
                stop.message.clone(),
            ),
            StopReason::Timeout => status(
                pb::JobStatus::TimedOut,
                pb::FailureKind::Timeout,
                stop.message.clone(),
            ),
            StopReason::Drain => status(
                pb::JobStatus::Failed,
                pb::FailureKind::RunnerLost,
                stop.message.clone(),
            ),
        };
    }
    match outcome {
        Outcome::Exited {
            oom_killed: true,
            code,
            ..
        } => status(
            pb::JobStatus::Failed,
            pb::FailureKind::OomKilled,
            format!("killed for exceeding its memory limit (exit code {code})"),
        ),
        Outcome::Exited { code: 0, .. } => status(
            pb::JobStatus::Succeeded,
            pb::FailureKind::Unspecified,
            String::new(),
        ),
        Outcome::Exited { code, .. } => status(
            pb::JobStatus::Failed,
            pb::FailureKind::ExitNonzero,
            format!("exited with code {code}"),
        ),
        Outcome::Failed { kind, message } => status(pb::JobStatus::Failed, kind, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(reason: StopReason) -> Stop {
        Stop {
            reason,
            grace: Duration::from_secs(1),
            message: "why".into(),
        }
    }

    fn exited(code: i32) -> Outcome {
        Outcome::Exited {
            code,
            oom_killed: false,
            stopped: false,
        }
    }

    fn stopped(code: i32) -> Outcome {
        Outcome::Exited {
            code,
            oom_killed: false,
            stopped: true,
        }
    }

    #[test]
    fn outcomes_map_to_statuses() {
        let s = final_status(exited(0), None).expect("reported");
        assert_eq!(s.status, pb::JobStatus::Succeeded as i32);
        let s = final_status(exited(3), None).expect("reported");
        assert_eq!(
            (s.status, s.failure_kind, s.exit_code),
            (
                pb::JobStatus::Failed as i32,
                pb::FailureKind::ExitNonzero as i32,
                Some(3)
            )
        );
        let s = final_status(
            Outcome::Exited {
                code: 137,
                oom_killed: true,
                stopped: false,
            },
            None,
        )
        .expect("reported");
        assert_eq!(s.failure_kind, pb::FailureKind::OomKilled as i32);
        let s = final_status(
            Outcome::failed(pb::FailureKind::ImageUnavailable, "no image"),
            None,
        )
        .expect("reported");
        assert_eq!(
            (s.status, s.failure_kind),
            (
                pb::JobStatus::Failed as i32,
                pb::FailureKind::ImageUnavailable as i32
            )
        );
    }

    #[test]
    fn a_stop_the_executor_acted_on_decides_the_status_whatever_the_exit() {
        for (reason, want) in [
            (StopReason::Cancel, pb::JobStatus::Canceled),
            (StopReason::Timeout, pb::JobStatus::TimedOut),
            (StopReason::Drain, pb::JobStatus::Failed),
        ] {
            let s = final_status(stopped(0), Some(&stop(reason))).expect("reported");
            assert_eq!(s.status, want as i32, "{reason:?}");
            assert_eq!(s.exit_code, Some(0));
            // Work that had already exited on its own keeps its outcome.
            let s = final_status(exited(0), Some(&stop(reason))).expect("reported");
            assert_eq!(s.status, pb::JobStatus::Succeeded as i32, "{reason:?}");
        }
        let lost = stop(StopReason::LeaseLost);
        assert_eq!(final_status(exited(0), Some(&lost)), None);
        assert_eq!(final_status(stopped(1), Some(&lost)), None);
    }

    #[test]
    fn the_first_stop_wins_but_a_lost_lease_overrides() {
        let (tx, _rx) = watch::channel(None);
        request_stop(&tx, stop(StopReason::Cancel));
        request_stop(&tx, stop(StopReason::Timeout));
        assert_eq!(
            tx.borrow().as_ref().map(|s| s.reason),
            Some(StopReason::Cancel)
        );
        request_stop(&tx, stop(StopReason::LeaseLost));
        assert_eq!(
            tx.borrow().as_ref().map(|s| s.reason),
            Some(StopReason::LeaseLost)
        );
        request_stop(&tx, stop(StopReason::Cancel));
        assert_eq!(
            tx.borrow().as_ref().map(|s| s.reason),
            Some(StopReason::LeaseLost)
        );
    }
}
