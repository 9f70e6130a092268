//! Jobs: the state machine that decides every change ([`state`]) and the sandbox rules over
//! it ([`sandbox_state`]: a sandbox and its commands are jobs), the unit of work that
//! applies them ([`lifecycle`]), and jobs as users see them — submit with idempotency
//! ([`submit`]), validation ([`spec`]), read, list, cancel, retry (here), following a job's
//! events ([`watch`]) and output ([`output`]).
pub mod lifecycle;
pub mod output;
pub mod sandbox_state;
pub mod spec;
pub mod state;
pub mod submit;
pub mod watch;

use gantry_proto as pb;
use prost::Message;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::Query,
};
use uuid::Uuid;

use crate::{
    error::{Error, Result, check_text},
    jobs::lifecycle::Env,
    store::entity::{attempt, job, job_label},
};
use state::status_of;

/// Parses a UUID from a request field.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Uuid::try_parse(value).map_err(|_| Error::invalid(field, format!("{value:?} is not a UUID")))
}

/// A stored job as the protocol shows it; `attempts` only when asked for.
pub fn to_proto(model: &job::Model, attempts: &[attempt::Model]) -> Result<pb::Job> {
    Ok(pb::Job {
        id: model.id.to_string(),
        spec: Some(pb::JobSpec::decode(model.spec.as_slice())?),
        status: model.status,
        failure_kind: model.failure_kind,
        failure_message: model.failure_message.clone(),
        exit_code: model.exit_code,
        attempt_count: u32::try_from(model.attempt_count).unwrap_or_default(),
        attempts: attempts.iter().map(attempt_to_proto).collect(),
        created_at_unix_ms: model.created_at,
        updated_at_unix_ms: model.updated_at,
        finished_at_unix_ms: model.finished_at.unwrap_or_default(),
        not_before_unix_ms: model.not_before,
        progress: model
            .progress
            .as_deref()
            .map(pb::Progress::decode)
            .transpose()?,
        runner_id: model.runner_id.map(|r| r.to_string()).unwrap_or_default(),
        retried_from_job_id: model
            .retried_from
            .map(|r| r.to_string())
            .unwrap_or_default(),
        last_event_sequence: u64::try_from(model.event_seq).unwrap_or_default(),
    })
}

fn attempt_to_proto(a: &attempt::Model) -> pb::Attempt {
    pb::Attempt {
        number: u32::try_from(a.number).unwrap_or_default(),
        runner_id: a.runner_id.to_string(),
        lease_id: a.lease_id.to_string(),
        lease_expires_at_unix_ms: a.lease_expires_at,
        container_id: a.container_id.clone(),
        assigned_at_unix_ms: a.assigned_at,
        started_at_unix_ms: a.started_at.unwrap_or_default(),
        finished_at_unix_ms: a.finished_at.unwrap_or_default(),
        exit_code: a.exit_code,
        failure_kind: a.failure_kind,
        failure_message: a.failure_message.clone(),
        status: a.status,
    }
}

/// One job with its attempts.
pub async fn get(db: &DatabaseConnection, id: Uuid) -> Result<pb::Job> {
    let model = job::Entity::find_by_id(id)
        .one(db)
        .await?
        .filter(|m| state::Kind::of(m.kind) == state::Kind::Job)
        .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
    let attempts = attempt::Entity::find()
        .filter(attempt::Column::JobId.eq(id))
        .order_by_asc(attempt::Column::Number)
        .all(db)
        .await?;
    to_proto(&model, &attempts)
}

/// A page of jobs, newest first.
pub async fn list(
    db: &DatabaseConnection,
    req: pb::ListJobsRequest,
) -> Result<pb::ListJobsResponse> {
    let page_size = match req.page_size {
        0 => 50,
        n @ 1..=1000 => n,
        _ => return Err(Error::invalid("page_size", "must be within 0..=1000")),
    };
    let mut q = job::Entity::find().filter(job::Column::Kind.eq(state::Kind::Job.as_i32()));
    if !req.statuses.is_empty() {
        for s in &req.statuses {
            if pb::JobStatus::try_from(*s).is_err() || *s == 0 {
                return Err(Error::invalid(
                    "statuses",
                    format!("unknown job status {s}"),
                ));
            }
        }
        q = q.filter(job::Column::Status.is_in(req.statuses.clone()));
    }
    if !req.queue.is_empty() {
        q = q.filter(job::Column::Queue.eq(req.queue.clone()));
    }
    if !req.runner_id.is_empty() {
        q = q.filter(job::Column::RunnerId.eq(parse_id("runner_id", &req.runner_id)?));
    }
    spec::check_labels("labels", &req.labels)?;
    for (k, v) in &req.labels {
        q = q.filter(
            job::Column::Id.in_subquery(
                Query::select()
                    .column(job_label::Column::JobId)
                    .from(job_label::Entity)
                    .and_where(job_label::Column::Key.eq(k.clone()))
                    .and_where(job_label::Column::Value.eq(v.clone()))
                    .to_owned(),
            ),
        );
    }
    if !req.page_token.is_empty() {
        let after = Uuid::try_parse(&req.page_token)
            .map_err(|_| Error::invalid("page_token", "is not a token this server issued"))?;
        q = q.filter(job::Column::Id.lt(after));
    }
    let mut rows = q
        .order_by_desc(job::Column::Id)
        .limit(u64::from(page_size) + 1)
        .all(db)
        .await?;
    let more = rows.len() > page_size as usize;
    rows.truncate(page_size as usize);
    let next_page_token = if more {
        rows.last().map(|r| r.id.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(pb::ListJobsResponse {
        jobs: rows
            .iter()
            .map(|r| to_proto(r, &[]))
            .collect::<Result<_>>()?,
        next_page_token,
    })
}

/// Cancels a job (see [`state::cancel`]).
pub async fn cancel(env: &Env, id: Uuid, reason: &str) -> Result<pb::Job> {
    check_text("reason", reason, 1024)?;
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let view = lc
        .load_for_change(id)
        .await?
        .filter(|v| v.kind == state::Kind::Job)
        .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
    let decision = state::cancel(&view, reason, lc.now, env.rules.lease_ms)?;
    lc.apply(decision)?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    get(env.store.db(), id).await
}

/// Submits a validated spec through the group-committing submitter.
pub async fn submit(
    submitter: &submit::Submitter,
    default_timeout_seconds: u32,
    spec: Option<pb::JobSpec>,
) -> Result<pb::SubmitJobResponse> {
    let spec = spec::validate(spec, default_timeout_seconds)?;
    submitter.call((spec, None)).await
}

/// Submits the spec of a terminal job again, as a new job.
pub async fn retry(
    db: &DatabaseConnection,
    submitter: &submit::Submitter,
    default_timeout_seconds: u32,
    id: Uuid,
) -> Result<pb::Job> {
    let original = job::Entity::find_by_id(id)
        .one(db)
        .await?
        .filter(|m| state::Kind::of(m.kind) == state::Kind::Job)
        .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
    if !state::is_terminal(status_of(original.status)) {
        return Err(Error::FailedPrecondition(format!(
            "job {id} is {}; only a terminal job can be retried",
            status_of(original.status).as_str_name()
        )));
    }
    let mut spec = pb::JobSpec::decode(original.spec.as_slice())?;
    spec.idempotency_key.clear();
    let spec = spec::validate(Some(spec), default_timeout_seconds)?;
    let response = submitter.call((spec, Some(id))).await?;
    response
        .job
        .ok_or_else(|| Error::Internal("submit returned no job".into()))
}
