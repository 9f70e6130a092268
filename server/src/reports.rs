//! Report ingestion: status, progress, executor phases and log bytes from runners.
//!
//! Every report names (job, lease) and carries a per-attempt sequence number. A report is
//! fenced first ([`crate::jobs::state::fence`]: the lease must be its job's current one and
//! belong to the caller); one with a sequence at or below the attempt's acknowledged one is
//! a duplicate, acknowledged again without effect. Then its body is checked ([`check_body`]),
//! and its change decided and applied through the lifecycle — all of it, or (refused) none of
//! it. Sequences must increase but may skip numbers: a runner may coalesce unacknowledged
//! reports into one carrying the highest sequence it replaces (log bytes already stored are
//! trimmed by offset). Acknowledgements are cumulative per attempt.
//!
//! After a refused report, the later reports of the same attempt in the same batch are not
//! applied (ABORTED: "send it again"), so an acknowledgement never jumps over a report the
//! runner was told was refused. A unary `ReportEvents` call stops at its first refusal
//! altogether ([`Batch::stop_at_first`]).
//!
//! Writes are group-committed: a single ingester task takes every pending batch from every
//! session and unary call, applies them in one transaction, and answers each caller.
use std::collections::BTreeMap;

use gantry_proto as pb;
use uuid::Uuid;

use crate::{
    batch::{GroupCommit, Queue},
    error::{Error, Result, check_text},
    jobs::lifecycle::{Env, Lifecycle},
    jobs::state::{self, AttemptEnd, Fenced},
};

/// Batches the ingester takes into one transaction at most.
const MAX_BATCHES_PER_COMMIT: usize = 128;
/// Longest progress stage and message.
const MAX_STAGE: usize = 128;
const MAX_PROGRESS_MESSAGE: usize = 1024;
/// Longest phase message, status message and container id.
const MAX_PHASE_MESSAGE: usize = 1024;
const MAX_STATUS_MESSAGE: usize = 4096;
const MAX_CONTAINER_ID: usize = 255;

/// Reports of one runner, applied in order.
pub struct Batch {
    pub runner: Uuid,
    pub reports: Vec<pb::Report>,
    /// Stop at the first refusal: every later report of the batch, whatever its attempt, is
    /// not applied (a unary `ReportEvents` call, which fails as a whole).
    pub stop_at_first: bool,
}

/// A refused report.
#[derive(Debug)]
pub struct Rejection {
    pub job_id: String,
    pub lease_id: String,
    pub sequence: u64,
    pub error: Error,
}

/// What became of one batch.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Acknowledged sequence of each attempt reported on (fenced ones excluded).
    pub acks: Vec<pb::ReportAck>,
    /// Refused reports, in order.
    pub rejected: Vec<Rejection>,
}

/// Handle to the ingester (group-committed, see the module comment).
pub type Ingester = GroupCommit<Batch, Outcome>;

/// Starts the ingester on `queue` (one commit at a time: reports apply in order).
pub fn start(env: Env, queue: Queue<Batch, Outcome>) {
    GroupCommit::spawn(
        queue,
        "report ingest",
        MAX_BATCHES_PER_COMMIT,
        1,
        move |batches| {
            let env = env.clone();
            async move { Ok(apply(&env, batches).await?.into_iter().map(Ok).collect()) }
        },
    );
}

async fn apply(env: &Env, batches: Vec<Batch>) -> Result<Vec<Outcome>> {
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let leases = batches
        .iter()
        .flat_map(|b| b.reports.iter())
        .filter_map(|r| Uuid::try_parse(&r.lease_id).ok());
    lc.load_attempts(leases).await?;
    let outcomes = batches
        .iter()
        .map(|batch| apply_batch(&mut lc, batch))
        .collect();
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    Ok(outcomes)
}

/// Applies one runner's batch in `lc`.
fn apply_batch(lc: &mut Lifecycle<'_>, batch: &Batch) -> Outcome {
    let mut acks: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut rejected: Vec<Rejection> = Vec::new();
    for report in &batch.reports {
        let earlier = rejected.iter().find(|r| {
            batch.stop_at_first || (r.job_id == report.job_id && r.lease_id == report.lease_id)
        });
        if let Some(first) = earlier {
            let message = format!(
                "report {} of job {} lease {} was not applied: report {} (job {}) was refused before it in the same batch; send it again",
                report.sequence, report.job_id, report.lease_id, first.sequence, first.job_id
            );
            rejected.push(Rejection {
                job_id: report.job_id.clone(),
                lease_id: report.lease_id.clone(),
                sequence: report.sequence,
                error: Error::Aborted(message),
            });
            continue;
        }
        match apply_one(lc, batch.runner, report) {
            Ok(acked) => {
                acks.insert((report.job_id.clone(), report.lease_id.clone()), acked);
            }
            Err(error) => rejected.push(Rejection {
                job_id: report.job_id.clone(),
                lease_id: report.lease_id.clone(),
                sequence: report.sequence,
                error,
            }),
        }
    }
    Outcome {
        acks: acks
            .into_iter()
            .map(|((job_id, lease_id), acked_sequence)| pb::ReportAck {
                job_id,
                lease_id,
                acked_sequence,
            })
            .collect(),
        rejected,
    }
}

/// Fences, checks and applies one report; returns the attempt's acknowledged sequence.
fn apply_one(lc: &mut Lifecycle<'_>, runner: Uuid, report: &pb::Report) -> Result<u64> {
    let job_id = Uuid::try_parse(&report.job_id)
        .map_err(|_| Error::invalid("job_id", format!("{:?} is not a UUID", report.job_id)))?;
    let lease = Uuid::try_parse(&report.lease_id)
        .map_err(|_| Error::invalid("lease_id", format!("{:?} is not a UUID", report.lease_id)))?;
    if report.sequence == 0 {
        return Err(Error::invalid("sequence", "must start at 1"));
    }
    let seq = i64::try_from(report.sequence)
        .map_err(|_| Error::invalid("sequence", "must fit in 63 bits"))?;
    let attempt = lc.attempt_view(&lease);
    let current = lc.job(&job_id).and_then(|j| j.current_lease);
    match state::fence(job_id, attempt.as_ref(), current, runner, seq)? {
        Fenced::Duplicate(acked) => return Ok(acked),
        Fenced::Current => {}
    }
    let body = report
        .body
        .clone()
        .ok_or_else(|| Error::invalid("body", "is required"))?;
    check_body(&body, lc.rules.max_log_data_bytes)?;
    let job = lc.job_view(&job_id)?;
    let attempt = attempt.ok_or_else(|| Error::Internal(format!("attempt {lease} vanished")))?;
    match body {
        pb::report::Body::Status(s) => match reported_status(&s)? {
            Reported::Running => lc.apply(state::started(&job, &attempt, &s.container_id)?)?,
            Reported::Ended(end) => lc.apply(state::end(&job, &attempt, end, lc.now)?)?,
        },
        pb::report::Body::Progress(p) => lc.record_progress(lease, p)?,
        pb::report::Body::Phase(p) => lc.record_phase(lease, p)?,
        pb::report::Body::Log(l) => {
            let stream = pb::LogStream::try_from(l.stream).unwrap_or(pb::LogStream::Stdout);
            lc.record_log(lease, stream, l.offset, l.data)?;
        }
    }
    lc.acknowledge(lease, seq);
    Ok(report.sequence)
}

/// What a status report says.
enum Reported {
    Running,
    Ended(AttemptEnd),
}

fn reported_status(s: &pb::StatusReport) -> Result<Reported> {
    let status = pb::JobStatus::try_from(s.status)
        .map_err(|_| Error::invalid("status.status", format!("unknown status {}", s.status)))?;
    let (message, exit_code) = (s.message.clone(), s.exit_code);
    Ok(Reported::Ended(match status {
        pb::JobStatus::Running => return Ok(Reported::Running),
        pb::JobStatus::Succeeded => AttemptEnd::Succeeded { exit_code },
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
                message,
                exit_code,
            }
        }
        pb::JobStatus::Canceled => AttemptEnd::Canceled { message, exit_code },
        pb::JobStatus::TimedOut => AttemptEnd::TimedOut { message, exit_code },
        other => {
            return Err(Error::invalid(
                "status.status",
                format!(
                    "{} cannot be reported; use RUNNING, SUCCEEDED, FAILED, CANCELED or TIMED_OUT",
                    other.as_str_name()
                ),
            ));
        }
    }))
}

/// Every rule a report's body must keep (see `Report` in the proto); log data of at most
/// `max_log_data` bytes.
pub fn check_body(body: &pb::report::Body, max_log_data: usize) -> Result<()> {
    match body {
        pb::report::Body::Status(s) => {
            check_text("status.message", &s.message, MAX_STATUS_MESSAGE)?;
            check_text("status.container_id", &s.container_id, MAX_CONTAINER_ID)?;
            reported_status(s).map(|_| ())
        }
        pb::report::Body::Progress(p) => {
            if p.percent > 100 {
                return Err(Error::invalid("progress.percent", "must be within 0..=100"));
            }
            check_text("progress.stage", &p.stage, MAX_STAGE)?;
            check_text("progress.message", &p.message, MAX_PROGRESS_MESSAGE)
        }
        pb::report::Body::Phase(p) => {
            if p.phase == 0 || pb::ExecutorPhase::try_from(p.phase).is_err() {
                return Err(Error::invalid(
                    "phase.phase",
                    format!("unknown phase {}", p.phase),
                ));
            }
            check_text("phase.message", &p.message, MAX_PHASE_MESSAGE)
        }
        pb::report::Body::Log(l) => {
            if l.stream != pb::LogStream::Stdout as i32 && l.stream != pb::LogStream::Stderr as i32
            {
                return Err(Error::invalid("log.stream", "must be STDOUT or STDERR"));
            }
            if l.data.len() > max_log_data {
                return Err(Error::invalid(
                    "log.data",
                    format!("must be at most {max_log_data} bytes"),
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::Clock,
        jobs::lifecycle::{Rules, new_job},
        signals::Hub,
        store::{
            Store,
            entity::{attempt, job},
        },
    };
    use sea_orm::{EntityTrait, TransactionTrait};

    async fn env() -> Env {
        Env {
            store: Store::memory().await.expect("store"),
            hub: std::sync::Arc::new(Hub::default()),
            clock: Clock::manual(1_000),
            rules: Rules::with_lease(3_000),
        }
    }

    /// A job claimed by `runner`; returns (job, lease).
    async fn claimed(env: &Env, runner: Uuid) -> (Uuid, Uuid) {
        let spec = pb::JobSpec {
            command: vec!["true".into()],
            executor: pb::ExecutorKind::Process as i32,
            ..Default::default()
        };
        let model = new_job(&spec, None, 1_000);
        let (job, lease) = (model.id, Uuid::now_v7());
        let txn = env.store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, env.rules, 1_000);
        lc.insert_job(model);
        let view = lc.job_view(&job).expect("view");
        lc.apply(state::claim(&view, runner, lease, 1_000, 3_000).expect("claim"))
            .expect("apply");
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        (job, lease)
    }

    fn report(job: Uuid, lease: Uuid, sequence: u64, body: pb::report::Body) -> pb::Report {
        pb::Report {
            job_id: job.to_string(),
            lease_id: lease.to_string(),
            sequence,
            body: Some(body),
        }
    }

    fn running() -> pb::report::Body {
        pb::report::Body::Status(pb::StatusReport {
            status: pb::JobStatus::Running as i32,
            container_id: "pid 1".into(),
            ..Default::default()
        })
    }

    fn log(offset: u64, data: &[u8]) -> pb::report::Body {
        pb::report::Body::Log(pb::LogData {
            stream: pb::LogStream::Stdout as i32,
            offset,
            data: data.to_vec(),
        })
    }

    #[tokio::test]
    async fn a_refused_report_stops_its_attempt_and_the_rest_goes_on() {
        let env = env().await;
        let runner = Uuid::now_v7();
        let (j1, l1) = claimed(&env, runner).await;
        let (j2, l2) = claimed(&env, runner).await;
        let out = apply(
            &env,
            vec![Batch {
                runner,
                reports: vec![
                    report(j1, l1, 1, running()),
                    report(j1, l1, 2, log(5, b"gap")),
                    report(j1, l1, 3, log(0, b"ok")),
                    report(j2, l2, 1, log(0, b"other")),
                ],
                stop_at_first: false,
            }],
        )
        .await
        .expect("applied");
        let o = &out[0];
        assert_eq!(o.rejected.len(), 2);
        assert!(matches!(o.rejected[0].error, Error::Invalid { .. }));
        assert!(matches!(o.rejected[1].error, Error::Aborted(_)));
        let acked: Vec<(String, u64)> = o
            .acks
            .iter()
            .map(|a| (a.lease_id.clone(), a.acked_sequence))
            .collect();
        assert!(acked.contains(&(l1.to_string(), 1)));
        assert!(acked.contains(&(l2.to_string(), 1)));
        let a1 = attempt::Entity::find_by_id(l1)
            .one(env.store.db())
            .await
            .expect("read")
            .expect("row");
        assert_eq!((a1.acked_seq, a1.stdout_len), (1, 0));
        assert!(a1.started_at.is_some());
    }

    #[tokio::test]
    async fn a_unary_call_stops_at_its_first_refusal() {
        let env = env().await;
        let runner = Uuid::now_v7();
        let (j1, l1) = claimed(&env, runner).await;
        let (j2, l2) = claimed(&env, runner).await;
        let out = apply(
            &env,
            vec![Batch {
                runner,
                reports: vec![
                    report(j1, l1, 1, log(1, b"gap")),
                    report(j2, l2, 1, running()),
                ],
                stop_at_first: true,
            }],
        )
        .await
        .expect("applied");
        assert_eq!(out[0].rejected.len(), 2);
        assert!(out[0].acks.is_empty());
        let j = job::Entity::find_by_id(j2)
            .one(env.store.db())
            .await
            .expect("read")
            .expect("row");
        assert_eq!(
            j.status,
            pb::JobStatus::Assigned as i32,
            "nothing after the refusal applied"
        );
    }

    #[tokio::test]
    async fn duplicates_are_acknowledged_and_foreign_attempts_refused() {
        let env = env().await;
        let (runner, other) = (Uuid::now_v7(), Uuid::now_v7());
        let (j, l) = claimed(&env, runner).await;
        let batch = |runner, reports| Batch {
            runner,
            reports,
            stop_at_first: false,
        };
        let first = apply(
            &env,
            vec![batch(runner, vec![report(j, l, 1, log(0, b"ab"))])],
        )
        .await
        .expect("applied");
        assert!(first[0].rejected.is_empty());
        let again = apply(
            &env,
            vec![
                batch(runner, vec![report(j, l, 1, log(0, b"ab"))]),
                batch(other, vec![report(j, l, 2, log(2, b"cd"))]),
            ],
        )
        .await
        .expect("applied");
        assert_eq!(again[0].acks[0].acked_sequence, 1);
        assert!(matches!(
            again[1].rejected[0].error,
            Error::PermissionDenied(_)
        ));
        let a = attempt::Entity::find_by_id(l)
            .one(env.store.db())
            .await
            .expect("read")
            .expect("row");
        assert_eq!(a.stdout_len, 2, "stored once");
    }

    #[test]
    fn bodies_are_checked_field_by_field() {
        let long = "x".repeat(5000);
        let cases = [
            (
                pb::report::Body::Progress(pb::Progress {
                    percent: 101,
                    ..Default::default()
                }),
                "progress.percent",
            ),
            (
                pb::report::Body::Phase(pb::PhaseChange {
                    phase: 99,
                    message: String::new(),
                }),
                "phase.phase",
            ),
            (
                pb::report::Body::Status(pb::StatusReport {
                    status: pb::JobStatus::Failed as i32,
                    ..Default::default()
                }),
                "status.failure_kind",
            ),
            (
                pb::report::Body::Status(pb::StatusReport {
                    status: pb::JobStatus::Succeeded as i32,
                    message: long,
                    ..Default::default()
                }),
                "status.message",
            ),
            (
                pb::report::Body::Status(pb::StatusReport {
                    status: pb::JobStatus::Running as i32,
                    container_id: "c\0".into(),
                    ..Default::default()
                }),
                "status.container_id",
            ),
            (
                pb::report::Body::Progress(pb::Progress {
                    percent: 1,
                    stage: "a\0b".into(),
                    ..Default::default()
                }),
                "progress.stage",
            ),
            (
                pb::report::Body::Log(pb::LogData {
                    stream: 0,
                    offset: 0,
                    data: vec![],
                }),
                "log.stream",
            ),
        ];
        for (body, field) in cases {
            match check_body(&body, 1024) {
                Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected a refusal, got {other:?}"),
            }
        }
    }
}
