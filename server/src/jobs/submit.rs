//! Submissions are group-committed, like reports: one task takes every submission waiting
//! (from every SubmitJob and RetryJob call at that moment), inserts them in one transaction
//! and answers each caller. A burst of submits costs one commit, not one each. Idempotency
//! keys are honoured across the batch: a key already stored, or seen earlier in the same
//! batch, answers with that job. If a batch fails as a whole (say another replica stored the
//! same idempotency key in between), its submissions are retried one at a time, so that one
//! bad submission never fails the others.
use std::collections::HashMap;

use gantry_proto as pb;
use prost::Message;
use sea_orm::{ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter};
use uuid::Uuid;

use crate::{
    App,
    batch::{GroupCommit, Queue},
    error::{Error, Result},
    lifecycle::Lifecycle,
    store::entity::{job, job_label},
};

/// Submissions taken into one transaction at most.
const MAX_PER_COMMIT: usize = 512;

/// Handle to the submitter: validated `(spec, retried_from)` submissions are
/// group-committed (see [`crate::batch`]).
pub type Submitter = GroupCommit<(pb::JobSpec, Option<Uuid>), pb::SubmitJobResponse>;

/// Starts the submitter for `app` on `queue`.
pub fn start(app: App, queue: Queue<(pb::JobSpec, Option<Uuid>), pb::SubmitJobResponse>) {
    GroupCommit::spawn(queue, "submit", MAX_PER_COMMIT, 1, move |batch| {
        let app = app.clone();
        async move {
            match commit(&app, &batch).await {
                Ok(responses) => Ok(responses.into_iter().map(Ok).collect()),
                Err(e) => {
                    tracing::debug!(error = %e, size = batch.len(), "submission batch failed; one at a time");
                    let mut answers = Vec::with_capacity(batch.len());
                    for (spec, retried_from) in batch {
                        answers.push(alone(&app, spec, retried_from).await);
                    }
                    Ok(answers)
                }
            }
        }
    });
}

/// One submission on its own. When its idempotency key was stored meanwhile (by another
/// replica: the unique index refused the insert), it answers with that job.
async fn alone(
    app: &App,
    spec: pb::JobSpec,
    retried_from: Option<Uuid>,
) -> Result<pb::SubmitJobResponse> {
    let key = spec.idempotency_key.clone();
    match commit(app, &[(spec, retried_from)]).await {
        Ok(mut r) => r.pop().ok_or_else(|| Error::Internal("no answer".into())),
        Err(e) => {
            if !key.is_empty()
                && let Some(existing) = job::Entity::find()
                    .filter(job::Column::IdempotencyKey.eq(key))
                    .one(app.store.db())
                    .await?
            {
                return Ok(pb::SubmitJobResponse {
                    job: Some(super::to_proto(&existing, &[])?),
                    deduplicated: true,
                });
            }
            Err(e)
        }
    }
}

/// A new job row for a validated spec.
fn new_job(spec: &pb::JobSpec, retried_from: Option<Uuid>, now: i64) -> job::Model {
    job::Model {
        id: Uuid::now_v7(),
        status: pb::JobStatus::Queued as i32,
        queue: spec.queue.clone(),
        priority: spec.priority,
        executor: spec.executor,
        lock_key: (!spec.lock_key.is_empty()).then(|| spec.lock_key.clone()),
        idempotency_key: (!spec.idempotency_key.is_empty()).then(|| spec.idempotency_key.clone()),
        spec: spec.encode_to_vec(),
        attempt_count: 0,
        max_attempts: i32::try_from(spec.retry.as_ref().map_or(1, |r| r.max_attempts)).unwrap_or(1),
        current_lease: None,
        runner_id: None,
        failure_kind: 0,
        failure_message: String::new(),
        exit_code: None,
        progress: None,
        event_seq: 0,
        not_before: 0,
        created_at: now,
        updated_at: now,
        finished_at: None,
        retried_from,
    }
}

/// Where each submission's answer comes from.
enum Answer {
    /// A job stored before this batch, with the same idempotency key.
    Existing(Box<job::Model>),
    /// A job inserted by this batch.
    Inserted(Uuid, bool),
}

/// Inserts a batch in one transaction; answers in the batch's order.
async fn commit(
    app: &App,
    batch: &[(pb::JobSpec, Option<Uuid>)],
) -> Result<Vec<pb::SubmitJobResponse>> {
    let keys: Vec<String> = batch
        .iter()
        .filter(|(s, _)| !s.idempotency_key.is_empty())
        .map(|(s, _)| s.idempotency_key.clone())
        .collect();
    let mut stored: HashMap<String, job::Model> = HashMap::new();
    if !keys.is_empty() {
        for m in job::Entity::find()
            .filter(job::Column::IdempotencyKey.is_in(keys))
            .all(app.store.db())
            .await?
        {
            if let Some(k) = m.idempotency_key.clone() {
                stored.insert(k, m);
            }
        }
    }
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    let mut answers = Vec::with_capacity(batch.len());
    let mut fresh: HashMap<String, Uuid> = HashMap::new();
    let mut labels = Vec::new();
    for (spec, retried_from) in batch {
        let key = &spec.idempotency_key;
        if let Some(m) = stored.get(key).filter(|_| !key.is_empty()) {
            answers.push(Answer::Existing(Box::new(m.clone())));
            continue;
        }
        if let Some(id) = fresh.get(key).filter(|_| !key.is_empty()) {
            answers.push(Answer::Inserted(*id, true));
            continue;
        }
        let model = new_job(spec, *retried_from, lc.now);
        let id = model.id;
        labels.extend(spec.labels.iter().map(|(k, v)| {
            job_label::Model {
                job_id: id,
                key: k.clone(),
                value: v.clone(),
            }
            .into_active_model()
        }));
        lc.insert_job(model)?;
        if !key.is_empty() {
            fresh.insert(key.clone(), id);
        }
        answers.push(Answer::Inserted(id, false));
    }
    let signals = lc.flush().await?;
    for chunk in labels.chunks(500) {
        job_label::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(&wtx.txn)
            .await?;
    }
    wtx.commit().await?;
    app.hub.publish(signals);
    // The rows as stored (with their first event), in one read.
    let ids: Vec<Uuid> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Inserted(id, false) => Some(*id),
            _ => None,
        })
        .collect();
    let mut rows: HashMap<Uuid, job::Model> = HashMap::new();
    for chunk in ids.chunks(500) {
        for m in job::Entity::find()
            .filter(job::Column::Id.is_in(chunk.to_vec()))
            .all(app.store.db())
            .await?
        {
            rows.insert(m.id, m);
        }
    }
    answers
        .into_iter()
        .map(|a| {
            let (model, deduplicated) = match a {
                Answer::Existing(m) => (*m, true),
                Answer::Inserted(id, dedup) => (
                    rows.get(&id).cloned().ok_or_else(|| {
                        Error::Internal(format!("job {id} vanished after submit"))
                    })?,
                    dedup,
                ),
            };
            Ok(pb::SubmitJobResponse {
                job: Some(super::to_proto(&model, &[])?),
                deduplicated,
            })
        })
        .collect()
}
