//! Report ingestion: status, progress, executor phases and log bytes from runners.
//!
//! Every report names (job, lease) and carries a per-attempt sequence number. A report is
//! fenced first (the lease must be the job's current one and belong to the caller), then
//! applied only if its sequence is above the attempt's acknowledged one; anything at or
//! below is a duplicate and is acknowledged again without effect. Sequences must increase
//! but may skip numbers: a runner may coalesce unacknowledged reports into one carrying the
//! highest sequence it replaces (log bytes already stored are trimmed by offset).
//! Acknowledgements are cumulative per attempt: everything up to `acked_sequence` is stored
//! or was answered as refused.
//!
//! Writes are group-committed: a single ingester task takes every pending batch from every
//! session and unary call, applies them in one transaction, and answers each caller. Many
//! reports cost one commit, not one each.
use std::collections::BTreeMap;

use gantry_proto as pb;
use tonic::Code;
use uuid::Uuid;

use crate::{
    App,
    batch::{GroupCommit, Queue},
    error::{Error, Result},
    jobs::state::AttemptEnd,
    lifecycle::Lifecycle,
};

/// Largest log chunk one report may carry.
pub const MAX_LOG_BYTES: usize = 1024 * 1024;
/// Batches the ingester takes into one transaction at most.
const MAX_BATCHES_PER_COMMIT: usize = 128;

/// A refused report.
#[derive(Clone, Debug)]
pub struct Rejection {
    pub job_id: String,
    pub lease_id: String,
    pub code: Code,
    pub message: String,
}

impl Rejection {
    /// As the protocol sends it on a session.
    pub fn to_proto(&self) -> pb::ReportRejected {
        pb::ReportRejected {
            job_id: self.job_id.clone(),
            lease_id: self.lease_id.clone(),
            code: self.code as i32,
            message: self.message.clone(),
        }
    }
}

/// What became of one batch.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Acknowledged sequence of each attempt reported on (fenced ones excluded).
    pub acks: Vec<pb::ReportAck>,
    /// Refused reports, in order.
    pub rejected: Vec<Rejection>,
}

/// Handle to the ingester: report batches, each `(runner, reports)`, are group-committed
/// (see [`crate::batch`]); a caller's answer comes once its reports are committed.
pub type Ingester = GroupCommit<(Uuid, Vec<pb::Report>), Outcome>;

/// Starts the ingester for `app` on `queue` (one commit at a time: reports apply in order).
pub fn start(app: App, queue: Queue<(Uuid, Vec<pb::Report>), Outcome>) {
    GroupCommit::spawn(
        queue,
        "report ingest",
        MAX_BATCHES_PER_COMMIT,
        1,
        move |batches| {
            let app = app.clone();
            async move { Ok(apply(&app, &batches).await?.into_iter().map(Ok).collect()) }
        },
    );
}

async fn apply(app: &App, batches: &[(Uuid, Vec<pb::Report>)]) -> Result<Vec<Outcome>> {
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    let leases = batches
        .iter()
        .flat_map(|(_, reports)| reports.iter())
        .filter_map(|r| Uuid::try_parse(&r.lease_id).ok());
    lc.load_attempts(leases).await?;
    let mut outcomes = Vec::with_capacity(batches.len());
    for (runner_id, reports) in batches {
        let mut acks: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut rejected: Vec<Rejection> = Vec::new();
        for report in reports {
            // After a refused report, later ones of the same attempt in this batch are not
            // applied either: an acknowledgement never jumps over a report the runner was
            // told was refused within the same batch.
            if rejected
                .iter()
                .any(|r| r.job_id == report.job_id && r.lease_id == report.lease_id)
            {
                rejected.push(Rejection {
                    job_id: report.job_id.clone(),
                    lease_id: report.lease_id.clone(),
                    code: Code::FailedPrecondition,
                    message: format!(
                        "report {} not applied: an earlier report of this attempt in the same batch was refused",
                        report.sequence
                    ),
                });
                continue;
            }
            match apply_one(&mut lc, *runner_id, report).await {
                Ok(acked) => {
                    acks.insert((report.job_id.clone(), report.lease_id.clone()), acked);
                }
                Err((code, message)) => {
                    // The ack (if any) stays at the last report applied before this one.
                    rejected.push(Rejection {
                        job_id: report.job_id.clone(),
                        lease_id: report.lease_id.clone(),
                        code,
                        message,
                    });
                }
            }
        }
        outcomes.push(Outcome {
            acks: acks
                .into_iter()
                .map(|((job_id, lease_id), acked_sequence)| pb::ReportAck {
                    job_id,
                    lease_id,
                    acked_sequence,
                })
                .collect(),
            rejected,
        });
    }
    let signals = lc.flush().await?;
    wtx.commit().await?;
    app.hub.publish(signals);
    Ok(outcomes)
}

/// Fences and applies one report; returns the attempt's acknowledged sequence.
async fn apply_one(
    lc: &mut Lifecycle<'_>,
    runner_id: Uuid,
    report: &pb::Report,
) -> std::result::Result<u64, (Code, String)> {
    let invalid =
        |field: &str, rule: String| (Code::InvalidArgument, format!("invalid {field}: {rule}"));
    let job_id = Uuid::try_parse(&report.job_id)
        .map_err(|_| invalid("job_id", format!("{:?} is not a UUID", report.job_id)))?;
    let lease = Uuid::try_parse(&report.lease_id)
        .map_err(|_| invalid("lease_id", format!("{:?} is not a UUID", report.lease_id)))?;
    if report.sequence == 0 {
        return Err(invalid("sequence", "must start at 1".into()));
    }
    let seq = i64::try_from(report.sequence)
        .map_err(|_| invalid("sequence", "must fit in 63 bits".into()))?;
    let attempt = lc.attempt(&lease).cloned().ok_or_else(|| {
        (
            Code::FailedPrecondition,
            format!("lease {lease} is not a lease of job {job_id}: stop this work"),
        )
    })?;
    if attempt.job_id != job_id {
        return Err((
            Code::FailedPrecondition,
            format!("lease {lease} is not a lease of job {job_id}: stop this work"),
        ));
    }
    if attempt.runner_id != runner_id {
        return Err((
            Code::PermissionDenied,
            format!(
                "attempt {} of job {job_id} belongs to another runner",
                attempt.number
            ),
        ));
    }
    let acked = u64::try_from(attempt.acked_seq).unwrap_or_default();
    if seq <= attempt.acked_seq {
        return Ok(acked); // duplicate: already stored
    }
    let current = lc.job(&job_id).and_then(|j| j.current_lease) == Some(lease);
    if attempt.finished_at.is_some() || !current {
        return Err((
            Code::FailedPrecondition,
            format!(
                "lease {lease} of job {job_id} is no longer current (attempt {} ended): stop this work",
                attempt.number
            ),
        ));
    }
    let body = report
        .body
        .clone()
        .ok_or_else(|| invalid("body", "is required".into()))?;
    let to_status = |e: Error| match e {
        Error::Invalid { field, rule } => {
            (Code::InvalidArgument, format!("invalid {field}: {rule}"))
        }
        other => (other.code(), other.to_string()),
    };
    match body {
        pb::report::Body::Status(s) => apply_status(lc, lease, s).await.map_err(to_status)?,
        pb::report::Body::Progress(p) => {
            if p.percent > 100 {
                return Err(invalid("progress.percent", "must be within 0..=100".into()));
            }
            if p.stage.len() > 128 || p.message.len() > 1024 {
                return Err(invalid(
                    "progress",
                    "stage must be at most 128 bytes and message at most 1024".into(),
                ));
            }
            lc.record_progress(lease, p).map_err(to_status)?;
        }
        pb::report::Body::Phase(p) => {
            if pb::ExecutorPhase::try_from(p.phase).is_err() || p.phase == 0 {
                return Err(invalid("phase.phase", format!("unknown phase {}", p.phase)));
            }
            if p.message.len() > 1024 {
                return Err(invalid(
                    "phase.message",
                    "must be at most 1024 bytes".into(),
                ));
            }
            lc.record_phase(lease, p).map_err(to_status)?;
        }
        pb::report::Body::Log(l) => {
            if l.stream != pb::LogStream::Stdout as i32 && l.stream != pb::LogStream::Stderr as i32
            {
                return Err(invalid("log.stream", "must be STDOUT or STDERR".into()));
            }
            if l.data.len() > MAX_LOG_BYTES {
                return Err(invalid(
                    "log.data",
                    format!("must be at most {MAX_LOG_BYTES} bytes"),
                ));
            }
            lc.record_log(lease, l.stream, l.offset, l.data)
                .map_err(to_status)?;
        }
    }
    lc.touch_lease(lease).map_err(to_status)?;
    lc.ack(lease, seq).map_err(to_status)?;
    Ok(report.sequence)
}

async fn apply_status(lc: &mut Lifecycle<'_>, lease: Uuid, s: pb::StatusReport) -> Result<()> {
    if s.message.len() > 4096 {
        return Err(Error::invalid(
            "status.message",
            "must be at most 4096 bytes",
        ));
    }
    let status = pb::JobStatus::try_from(s.status)
        .map_err(|_| Error::invalid("status.status", format!("unknown status {}", s.status)))?;
    let end = match status {
        pb::JobStatus::Running => {
            if s.container_id.len() > 255 {
                return Err(Error::invalid(
                    "status.container_id",
                    "must be at most 255 bytes",
                ));
            }
            return lc.mark_running(lease, s.container_id);
        }
        pb::JobStatus::Succeeded => AttemptEnd::Succeeded {
            exit_code: s.exit_code,
        },
        pb::JobStatus::Failed => {
            let kind = pb::FailureKind::try_from(s.failure_kind).map_err(|_| {
                Error::invalid(
                    "status.failure_kind",
                    format!("unknown failure kind {}", s.failure_kind),
                )
            })?;
            if kind == pb::FailureKind::Unspecified {
                return Err(Error::invalid(
                    "status.failure_kind",
                    "is required with FAILED",
                ));
            }
            AttemptEnd::Failed {
                kind,
                message: s.message,
                exit_code: s.exit_code,
            }
        }
        pb::JobStatus::Canceled => AttemptEnd::Canceled {
            message: s.message,
            exit_code: s.exit_code,
        },
        pb::JobStatus::TimedOut => AttemptEnd::TimedOut {
            message: s.message,
            exit_code: s.exit_code,
        },
        other => {
            return Err(Error::invalid(
                "status.status",
                format!(
                    "{} cannot be reported; use RUNNING, SUCCEEDED, FAILED, CANCELED or TIMED_OUT",
                    other.as_str_name()
                ),
            ));
        }
    };
    lc.end_attempt(lease, end).await
}
