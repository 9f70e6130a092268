//! Data in and out of work: what the code inside a job or sandbox may do as that work
//! (WorkService, authenticated by its work token, [`token`]), and the job's artifacts and
//! the blobs behind them as users see them ([`artifacts`]).
//!
//! A work token is good only while its attempt is the job's current one: every write checks
//! that in the same transaction that makes the change, on rows locked (PostgreSQL) or under
//! the single writer (SQLite), so a stale attempt can never change a job it no longer holds.
pub mod artifacts;
pub mod token;

use gantry_proto as pb;
use prost::Message;
use sea_orm::{ConnectionTrait, EntityTrait, QuerySelect, sea_query::OnConflict};
use uuid::Uuid;

use crate::{
    error::{Error, Result, check_text},
    jobs::{
        self,
        lifecycle::{Env, Lifecycle},
        spec,
        submit::{Submission, Submitter},
    },
    store::entity::{attempt, job, job_result},
};

/// Whose work a valid token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope {
    pub job: Uuid,
    pub lease: Uuid,
    pub attempt: u32,
}

/// Checks `token` against its attempt and the job's current lease, for an action on `job_id`.
/// Unknown or wrong token: UNAUTHENTICATED; another job's work: PERMISSION_DENIED; an attempt
/// that is no longer current: FAILED_PRECONDITION.
pub fn verify(
    token: &str,
    attempt: Option<&attempt::Model>,
    current_lease: Option<Uuid>,
    job_id: Uuid,
    now: i64,
) -> Result<Scope> {
    let unknown = || Error::Unauthenticated("unknown work token".into());
    let a = attempt.ok_or_else(unknown)?;
    let stored = a.work_token_hash.as_deref().ok_or_else(unknown)?;
    if !token::matches(token, stored) {
        return Err(unknown());
    }
    if a.job_id != job_id {
        return Err(Error::PermissionDenied(format!(
            "this work token is the identity of job {}'s work; it cannot act on job {job_id}",
            a.job_id
        )));
    }
    if a.finished_at.is_some() || current_lease != Some(a.lease_id) || a.lease_expires_at < now {
        return Err(Error::FailedPrecondition(format!(
            "the work token of attempt {} of job {job_id} is no longer valid: that attempt has ended",
            a.number
        )));
    }
    Ok(Scope {
        job: job_id,
        lease: a.lease_id,
        attempt: u32::try_from(a.number).unwrap_or_default(),
    })
}

/// [`verify`] on rows read outside a write transaction (reads, and an early check before a
/// long upload; writes check again in their transaction).
pub async fn verify_read(
    db: &impl ConnectionTrait,
    token: &str,
    job_id: Uuid,
    now: i64,
) -> Result<Scope> {
    let lease = token::lease_of(token)?;
    let attempt = attempt::Entity::find_by_id(lease).one(db).await?;
    let current = match &attempt {
        Some(a) => job::Entity::find_by_id(a.job_id)
            .one(db)
            .await?
            .and_then(|j| j.current_lease),
        None => None,
    };
    verify(token, attempt.as_ref(), current, job_id, now)
}

/// [`verify`] in a unit of work: loads (and on PostgreSQL locks) the attempt and its job.
pub async fn verify_in(lc: &mut Lifecycle<'_>, token: &str, job_id: Uuid) -> Result<Scope> {
    let lease = token::lease_of(token)?;
    lc.load_attempts([lease]).await?;
    let attempt = lc.attempt(&lease);
    let current = attempt
        .and_then(|a| lc.job(&a.job_id))
        .and_then(|j| j.current_lease);
    verify(token, attempt, current, job_id, lc.now)
}

/// WorkService.ReportProgress.
pub async fn report_progress(env: &Env, token: &str, req: pb::ReportProgressRequest) -> Result<()> {
    let job_id = jobs::parse_id("job_id", &req.job_id)?;
    let progress = req
        .progress
        .ok_or_else(|| Error::invalid("progress", "is required"))?;
    crate::reports::check_body(&pb::report::Body::Progress(progress.clone()), usize::MAX)?;
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let scope = verify_in(&mut lc, token, job_id).await?;
    lc.record_progress(scope.lease, progress)?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await
}

/// Largest `WorkEvent` parts.
const MAX_EVENT_KIND: usize = 128;
const MAX_EVENT_MESSAGE: usize = 4096;
const MAX_EVENT_FIELDS: usize = 32;
const MAX_FIELD_KEY: usize = 128;
const MAX_FIELD_VALUE: usize = 1024;

fn check_event(e: &pb::WorkEvent) -> Result<()> {
    if e.kind.is_empty()
        || e.kind.len() > MAX_EVENT_KIND
        || !e
            .kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    {
        return Err(Error::invalid(
            "event.kind",
            format!("must be 1..={MAX_EVENT_KIND} bytes of [A-Za-z0-9._/-]"),
        ));
    }
    check_text("event.message", &e.message, MAX_EVENT_MESSAGE)?;
    if e.fields.len() > MAX_EVENT_FIELDS {
        return Err(Error::invalid(
            "event.fields",
            format!("at most {MAX_EVENT_FIELDS} entries"),
        ));
    }
    for (k, v) in &e.fields {
        if k.is_empty() {
            return Err(Error::invalid("event.fields", "keys must not be empty"));
        }
        check_text(&format!("event.fields[{k}]"), k, MAX_FIELD_KEY)?;
        check_text(&format!("event.fields[{k}]"), v, MAX_FIELD_VALUE)?;
    }
    Ok(())
}

/// WorkService.AppendEvent: returns the event's sequence (0: the event limit dropped it).
pub async fn append_event(env: &Env, token: &str, req: pb::AppendEventRequest) -> Result<u64> {
    let job_id = jobs::parse_id("job_id", &req.job_id)?;
    let event = req
        .event
        .ok_or_else(|| Error::invalid("event", "is required"))?;
    check_event(&event)?;
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let scope = verify_in(&mut lc, token, job_id).await?;
    let sequence = lc.record_work(scope.lease, pb::job_event::Kind::Work(event), true)?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    Ok(sequence)
}

/// Largest content type of a result.
const MAX_CONTENT_TYPE: usize = 255;

/// WorkService.SetResult.
pub async fn set_result(
    env: &Env,
    max_result_bytes: u64,
    token: &str,
    req: pb::SetResultRequest,
) -> Result<()> {
    let job_id = jobs::parse_id("job_id", &req.job_id)?;
    let result = req
        .result
        .ok_or_else(|| Error::invalid("result", "is required"))?;
    if result.data.len() as u64 > max_result_bytes {
        return Err(Error::invalid(
            "result.data",
            format!(
                "is {} bytes; a result is at most {max_result_bytes} bytes (the server's --max-result-bytes): publish larger output as an artifact",
                result.data.len()
            ),
        ));
    }
    if result.content_type.len() > MAX_CONTENT_TYPE
        || !result
            .content_type
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(Error::invalid(
            "result.content_type",
            format!("must be at most {MAX_CONTENT_TYPE} bytes of printable ASCII"),
        ));
    }
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let scope = verify_in(&mut lc, token, job_id).await?;
    let size = result.data.len() as u64;
    let content_type = result.content_type.clone();
    let row = job_result::ActiveModel {
        job_id: sea_orm::ActiveValue::Set(job_id),
        attempt: sea_orm::ActiveValue::Set(i32::try_from(scope.attempt).unwrap_or(i32::MAX)),
        content_type: sea_orm::ActiveValue::Set(result.content_type),
        data: sea_orm::ActiveValue::Set(result.data),
        set_at: sea_orm::ActiveValue::Set(lc.now),
    };
    job_result::Entity::insert(row)
        .on_conflict(
            OnConflict::column(job_result::Column::JobId)
                .update_columns([
                    job_result::Column::Attempt,
                    job_result::Column::ContentType,
                    job_result::Column::Data,
                    job_result::Column::SetAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(lc.txn())
        .await?;
    lc.record_work(
        scope.lease,
        pb::job_event::Kind::Result(pb::ResultSet { size, content_type }),
        true,
    )?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await
}

/// WorkService.SubmitChild: the spec is validated as SubmitJob's, and the child records its
/// parent.
pub async fn submit_child(
    env: &Env,
    submitter: &Submitter,
    default_timeout_seconds: u32,
    token: &str,
    req: pb::SubmitChildRequest,
) -> Result<pb::SubmitJobResponse> {
    let job_id = jobs::parse_id("job_id", &req.job_id)?;
    let spec = spec::validate(req.spec, default_timeout_seconds)?;
    spec::check_inputs_exist(env.store.db(), &spec.inputs, "spec.inputs").await?;
    verify_read(env.store.db(), token, job_id, env.clock.now_ms()).await?;
    submitter
        .call(Submission {
            parent_job: Some(job_id),
            ..Submission::of(spec)
        })
        .await
}

/// The stored spec of `job_id` (a job or a sandbox).
pub async fn spec_of(db: &impl ConnectionTrait, job_id: Uuid) -> Result<pb::JobSpec> {
    let row: Option<Vec<u8>> = job::Entity::find_by_id(job_id)
        .select_only()
        .column(job::Column::Spec)
        .into_tuple()
        .one(db)
        .await?;
    let bytes = row.ok_or_else(|| Error::NotFound(format!("job {job_id}")))?;
    Ok(pb::JobSpec::decode(bytes.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(job: Uuid, lease: Uuid, hash: &str) -> attempt::Model {
        attempt::Model {
            lease_id: lease,
            job_id: job,
            number: 1,
            runner_id: Uuid::now_v7(),
            status: pb::JobStatus::Running as i32,
            lease_expires_at: 10_000,
            deadline_at: 20_000,
            assigned_at: 0,
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
            parent_lease: None,
            work_token_hash: Some(hash.to_string()),
        }
    }

    #[test]
    fn a_token_acts_only_on_its_own_current_attempt() {
        let (job, lease) = (Uuid::now_v7(), Uuid::now_v7());
        let (token, hash) = token::issue(lease);
        let a = attempt(job, lease, &hash);
        assert!(verify(&token, Some(&a), Some(lease), job, 5_000).is_ok());
        let other_job = Uuid::now_v7();
        assert!(matches!(
            verify(&token, Some(&a), Some(lease), other_job, 5_000),
            Err(Error::PermissionDenied(m)) if m.contains(&other_job.to_string())
        ));
        let ended = attempt::Model {
            finished_at: Some(4_000),
            ..a.clone()
        };
        assert!(matches!(
            verify(&token, Some(&ended), None, job, 5_000),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            verify(&token, Some(&a), Some(Uuid::now_v7()), job, 5_000),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            verify(&token, Some(&a), Some(lease), job, 10_001),
            Err(Error::FailedPrecondition(_))
        ));
        let (forged, _) = token::issue(lease);
        assert!(matches!(
            verify(&forged, Some(&a), Some(lease), job, 5_000),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            verify(&token, None, None, job, 5_000),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn work_events_are_checked_field_by_field() {
        let ok = pb::WorkEvent {
            kind: "checkpoint".into(),
            message: "epoch 3".into(),
            fields: [("loss".to_string(), "0.1".to_string())].into(),
        };
        assert!(check_event(&ok).is_ok());
        for (bad, field) in [
            (
                pb::WorkEvent {
                    kind: String::new(),
                    ..ok.clone()
                },
                "event.kind",
            ),
            (
                pb::WorkEvent {
                    kind: "a b".into(),
                    ..ok.clone()
                },
                "event.kind",
            ),
            (
                pb::WorkEvent {
                    message: "x".repeat(5000),
                    ..ok.clone()
                },
                "event.message",
            ),
        ] {
            match check_event(&bad) {
                Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected {field} refused, got {other:?}"),
            }
        }
    }
}
