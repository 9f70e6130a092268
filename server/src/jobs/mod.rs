//! Jobs as users see them: submit (with idempotency), read, list, cancel, retry, and the
//! followers of a job's events and logs. The state machine lives in [`state`]; validation
//! in [`spec`]; every change goes through [`crate::lifecycle::Lifecycle`].
pub mod spec;
pub mod state;
pub mod submit;

use std::time::Duration;

use gantry_proto as pb;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, sea_query::Query};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;
use uuid::Uuid;

use crate::{
    App,
    error::{Error, Result},
    lifecycle::{Lifecycle, decode, status_of},
    store::entity::{attempt, event, job, job_label, log_chunk},
};

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
        spec: Some(decode(&model.spec)?),
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
        progress: model.progress.as_deref().map(decode).transpose()?,
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

/// Validates and stores a job; an already used idempotency key returns the first job.
pub async fn submit(app: &App, spec: Option<pb::JobSpec>) -> Result<pb::SubmitJobResponse> {
    let spec = spec::validate(spec, app.config.default_timeout_seconds)?;
    app.submitter.call((spec, None)).await
}

/// One job with its attempts.
pub async fn get(app: &App, id: Uuid) -> Result<pb::Job> {
    let model = job::Entity::find_by_id(id)
        .one(app.store.db())
        .await?
        .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
    let attempts = attempt::Entity::find()
        .filter(attempt::Column::JobId.eq(id))
        .order_by_asc(attempt::Column::Number)
        .all(app.store.db())
        .await?;
    to_proto(&model, &attempts)
}

/// A page of jobs, newest first.
pub async fn list(app: &App, req: pb::ListJobsRequest) -> Result<pb::ListJobsResponse> {
    let page_size = match req.page_size {
        0 => 50,
        n @ 1..=1000 => n,
        _ => return Err(Error::invalid("page_size", "must be within 0..=1000")),
    };
    let mut q = job::Entity::find();
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
        .all(app.store.db())
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

/// Cancels a job (see `CancelJob` in the proto).
pub async fn cancel(app: &App, id: Uuid, reason: &str) -> Result<pb::Job> {
    if reason.len() > 1024 {
        return Err(Error::invalid("reason", "must be at most 1024 bytes"));
    }
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    lc.request_cancel(id, reason).await?;
    let signals = lc.flush().await?;
    wtx.commit().await?;
    app.hub.publish(signals);
    get(app, id).await
}

/// Submits the spec of a terminal job again, as a new job.
pub async fn retry(app: &App, id: Uuid) -> Result<pb::Job> {
    let original = job::Entity::find_by_id(id)
        .one(app.store.db())
        .await?
        .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
    if !state::is_terminal(status_of(original.status)) {
        return Err(Error::FailedPrecondition(format!(
            "job {id} is {}; only a terminal job can be retried",
            status_of(original.status).as_str_name()
        )));
    }
    let mut spec: pb::JobSpec = decode(&original.spec)?;
    spec.idempotency_key.clear();
    let spec = spec::validate(Some(spec), app.config.default_timeout_seconds)?;
    let response = app.submitter.call((spec, Some(id))).await?;
    response
        .job
        .ok_or_else(|| Error::Internal("submit returned no job".into()))
}

/// How long a follower waits for a signal before looking at the database anyway. Signals
/// make followers immediate; this only bounds the cost of a signal lost between replicas.
const FOLLOW_RECHECK: Duration = Duration::from_secs(2);

/// Waits until `job_id` changes (or a re-check is due, or the server stops).
/// Returns false when the follower should end.
async fn wait_for_change(
    app: &App,
    rx: &mut broadcast::Receiver<Uuid>,
    job_id: Uuid,
    out_closed: &mpsc::Sender<std::result::Result<impl Send, Status>>,
) -> bool {
    let mut shutdown = app.shutdown.clone();
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(id) if id == job_id => return true,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            }
        }
    };
    tokio::select! {
        r = wait => r,
        _ = tokio::time::sleep(FOLLOW_RECHECK) => true,
        _ = crate::events::stopped(&mut shutdown) => false,
        _ = out_closed.closed() => false,
    }
}

/// Streams a job's events into `tx` (see `WatchJob`). An error ends the stream with its status.
pub async fn watch(
    app: App,
    req: pb::WatchJobRequest,
    id: Uuid,
    tx: mpsc::Sender<std::result::Result<pb::JobEvent, Status>>,
) {
    if let Err(e) = send_events(&app, &req, id, &tx).await {
        let _ = tx.send(Err(e.into())).await;
    }
}

/// Events per database read.
const EVENT_PAGE: u64 = 500;

async fn send_events(
    app: &App,
    req: &pb::WatchJobRequest,
    id: Uuid,
    tx: &mpsc::Sender<std::result::Result<pb::JobEvent, Status>>,
) -> Result<()> {
    // Subscribed before the first read, so no change between read and wait is missed.
    let mut rx = app.hub.subscribe_jobs();
    let mut after = i64::try_from(req.after_sequence).unwrap_or(i64::MAX);
    loop {
        let rows = event::Entity::find()
            .filter(event::Column::JobId.eq(id))
            .filter(event::Column::Seq.gt(after))
            .order_by_asc(event::Column::Seq)
            .limit(EVENT_PAGE)
            .all(app.store.db())
            .await?;
        let full_page = rows.len() as u64 == EVENT_PAGE;
        for row in rows {
            after = row.seq;
            if tx.send(Ok(decode(&row.body)?)).await.is_err() {
                return Ok(()); // the client left
            }
        }
        if full_page {
            continue;
        }
        if !req.follow {
            return Ok(());
        }
        let job = job::Entity::find_by_id(id)
            .one(app.store.db())
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
        if state::is_terminal(status_of(job.status)) && after >= job.event_seq {
            return Ok(());
        }
        if !wait_for_change(app, &mut rx, id, tx).await {
            return Ok(());
        }
    }
}

/// Streams a job's output into `tx` (see `GetLogs`). An error ends the stream with its status.
pub async fn logs(
    app: App,
    req: pb::GetLogsRequest,
    id: Uuid,
    tx: mpsc::Sender<std::result::Result<pb::LogChunk, Status>>,
) {
    if let Err(e) = send_logs(&app, &req, id, &tx).await {
        let _ = tx.send(Err(e.into())).await;
    }
}

/// Log chunks per database read.
const LOG_PAGE: u64 = 256;

async fn send_logs(
    app: &App,
    req: &pb::GetLogsRequest,
    id: Uuid,
    tx: &mpsc::Sender<std::result::Result<pb::LogChunk, Status>>,
) -> Result<()> {
    let mut rx = app.hub.subscribe_jobs();
    // Attempt 0 asks for the latest attempt and, when following, for every later one too:
    // the stream then ends only when the job is terminal.
    let follow_retries = req.attempt == 0;
    let mut number = i32::try_from(req.attempt).unwrap_or(i32::MAX);
    let mut last_id: i64 = 0;
    // Offsets apply to the first attempt streamed; a later attempt starts at 0.
    let (mut stdout_from, mut stderr_from) = (req.stdout_offset, req.stderr_offset);
    // Set once the followed attempt has ended and all it wrote has been sent.
    let mut drained = false;
    loop {
        let job = job::Entity::find_by_id(id)
            .one(app.store.db())
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
        let terminal = state::is_terminal(status_of(job.status));
        if number == 0 {
            number = job.attempt_count;
        } else if drained && job.attempt_count > number {
            // Every byte of this attempt was sent and a retry started: follow it.
            number += 1;
            (stdout_from, stderr_from, last_id, drained) = (0, 0, 0, false);
        }
        if number == 0 {
            // No attempt yet.
            if !req.follow || terminal || !wait_for_change(app, &mut rx, id, tx).await {
                return Ok(());
            }
            continue;
        }
        if number > job.attempt_count {
            return Err(Error::invalid(
                "attempt",
                format!("job {id} has {} attempt(s)", job.attempt_count),
            ));
        }
        // Read whether the attempt ended *before* reading its chunks: if it had, this read
        // sees everything it wrote.
        let ended = attempt::Entity::find()
            .filter(attempt::Column::JobId.eq(id))
            .filter(attempt::Column::Number.eq(number))
            .one(app.store.db())
            .await?
            .is_none_or(|a| a.finished_at.is_some());
        let mut q = log_chunk::Entity::find()
            .filter(log_chunk::Column::JobId.eq(id))
            .filter(log_chunk::Column::Attempt.eq(number))
            .filter(log_chunk::Column::Id.gt(last_id));
        if req.stream != 0 {
            q = q.filter(log_chunk::Column::Stream.eq(req.stream));
        }
        let rows = q
            .order_by_asc(log_chunk::Column::Id)
            .limit(LOG_PAGE)
            .all(app.store.db())
            .await?;
        let full_page = rows.len() as u64 == LOG_PAGE;
        for row in rows {
            last_id = row.id;
            let from = if row.stream == pb::LogStream::Stdout as i32 {
                stdout_from
            } else {
                stderr_from
            };
            let offset = u64::try_from(row.offset).unwrap_or_default();
            let end = offset + row.data.len() as u64;
            if end <= from {
                continue;
            }
            let skip = usize::try_from(from.saturating_sub(offset)).unwrap_or(0);
            let chunk = pb::LogChunk {
                job_id: id.to_string(),
                attempt: u32::try_from(row.attempt).unwrap_or_default(),
                stream: row.stream,
                offset: offset + skip as u64,
                data: row.data[skip..].to_vec(),
                at_unix_ms: row.at,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
        }
        if full_page {
            continue;
        }
        if !req.follow {
            return Ok(());
        }
        // The attempt is over and all it wrote was sent: done, unless following the job
        // into a retry that has not ended it yet.
        if ended && (!follow_retries || terminal) {
            return Ok(());
        }
        if ended {
            drained = true;
            if job.attempt_count > number {
                continue; // the next attempt already exists
            }
        }
        if !wait_for_change(app, &mut rx, id, tx).await {
            return Ok(());
        }
    }
}
