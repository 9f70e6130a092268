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
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, sea_query::Query,
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
        result: None,
        parent_job_id: model.parent_job.map(|p| p.to_string()).unwrap_or_default(),
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
    let mut job = to_proto(&model, &attempts)?;
    job.result = result_of(db, id).await?;
    Ok(job)
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
    if !req.parent_job_id.is_empty() {
        q = q.filter(job::Column::ParentJob.eq(parse_id("parent_job_id", &req.parent_job_id)?));
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

/// The result of `job_id`, if its work set one.
pub async fn result_of(db: &impl ConnectionTrait, job_id: Uuid) -> Result<Option<pb::JobResult>> {
    Ok(crate::store::entity::job_result::Entity::find_by_id(job_id)
        .one(db)
        .await?
        .map(|r| pb::JobResult {
            data: r.data,
            content_type: r.content_type,
            set_at_unix_ms: r.set_at,
            attempt: u32::try_from(r.attempt).unwrap_or_default(),
        }))
}

/// The unfinished descendants of `id` (children, their children …), read without locks,
/// with their current leases: what a cancel of `id` cancels too. At most `MAX_DESCENDANTS`.
pub async fn unfinished_descendants(
    db: &impl ConnectionTrait,
    id: Uuid,
) -> Result<Vec<(Uuid, Option<Uuid>)>> {
    const MAX_DESCENDANTS: usize = 10_000;
    /// Parents asked about per query (bound parameters).
    const PER_QUERY: usize = 500;
    let mut found = Vec::new();
    let mut frontier = vec![id];
    let mut seen = 0usize;
    while !frontier.is_empty() && seen < MAX_DESCENDANTS {
        let parents = std::mem::take(&mut frontier);
        for chunk in parents.chunks(PER_QUERY) {
            let rows: Vec<(Uuid, Option<Uuid>, Option<i64>)> = job::Entity::find()
                .select_only()
                .column(job::Column::Id)
                .column(job::Column::CurrentLease)
                .column(job::Column::FinishedAt)
                .filter(job::Column::ParentJob.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(db)
                .await?;
            for (child, lease, finished) in rows {
                seen += 1;
                frontier.push(child);
                if finished.is_none() {
                    found.push((child, lease));
                }
            }
        }
    }
    if seen >= MAX_DESCENDANTS {
        tracing::warn!(
            job = %id,
            "the job has more than {MAX_DESCENDANTS} descendants; canceling the first {} unfinished ones",
            found.len().min(MAX_DESCENDANTS)
        );
    }
    found.truncate(MAX_DESCENDANTS);
    Ok(found)
}

/// Cancels a job (see [`state::cancel`]), and with it every unfinished job its work
/// submitted (and theirs), in the same transaction.
pub async fn cancel(env: &Env, id: Uuid, reason: &str) -> Result<pb::Job> {
    check_text("reason", reason, 1024)?;
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    // Every attempt (the job's and its descendants') is locked before any job row, in one
    // call: the one lock order (attempts by lease, then jobs by id).
    let descendants = unfinished_descendants(lc.txn(), id).await?;
    let current: Option<Option<Uuid>> = job::Entity::find_by_id(id)
        .select_only()
        .column(job::Column::CurrentLease)
        .into_tuple()
        .one(lc.txn())
        .await?;
    lc.load_attempts(
        descendants
            .iter()
            .filter_map(|(_, lease)| *lease)
            .chain(current.flatten()),
    )
    .await?;
    let view = lc
        .load_for_change(id)
        .await?
        .filter(|v| v.kind == state::Kind::Job)
        .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
    let decision = state::cancel(&view, reason, lc.now, env.rules.lease_ms)?;
    lc.apply(decision)?;
    lc.load_jobs(descendants.iter().map(|(child, _)| *child))
        .await?;
    let why = format!("its parent job {id} was canceled");
    for (child, _) in &descendants {
        let Ok(view) = lc.job_view(child) else {
            continue;
        };
        if let Some(lease) = view.current_lease
            && lc.attempt(&lease).is_none()
        {
            // Claimed between the read above and the lock (rare).
            lc.load_attempts([lease]).await?;
        }
        let view = lc.job_view(child)?;
        // A child that ended or is canceling already is left as it is.
        if let Ok(decision) = state::cancel(&view, &why, lc.now, env.rules.lease_ms) {
            lc.apply(decision)?;
        }
    }
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    get(env.store.db(), id).await
}

/// Submits a validated spec through the group-committing submitter. Blob inputs must be
/// stored already.
pub async fn submit(
    db: &DatabaseConnection,
    submitter: &submit::Submitter,
    default_timeout_seconds: u32,
    spec: Option<pb::JobSpec>,
) -> Result<pb::SubmitJobResponse> {
    let spec = spec::validate(spec, default_timeout_seconds)?;
    spec::check_inputs_exist(db, &spec.inputs, "spec.inputs").await?;
    submitter.call(submit::Submission::of(spec)).await
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
    let response = submitter
        .call(submit::Submission {
            retried_from: Some(id),
            ..submit::Submission::of(spec)
        })
        .await?;
    response
        .job
        .ok_or_else(|| Error::Internal("submit returned no job".into()))
}
