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
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    App,
    error::{Error, Result},
    lifecycle::Lifecycle,
    store::entity::{job, job_label},
};

/// Submissions taken into one transaction at most.
const MAX_PER_COMMIT: usize = 512;

/// A validated submission waiting for the submitter.
pub struct Submission {
    spec: pb::JobSpec,
    retried_from: Option<Uuid>,
    reply: oneshot::Sender<Result<pb::SubmitJobResponse>>,
}

/// Handle to the submitter task.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<Submission>,
}

impl Submitter {
    /// A channel pair: the handle and the receiver the task consumes.
    pub fn channel() -> (Submitter, mpsc::Receiver<Submission>) {
        let (tx, rx) = mpsc::channel(4096);
        (Submitter { tx }, rx)
    }

    /// Starts the submitter task for `app`.
    pub fn start(app: App, rx: mpsc::Receiver<Submission>) {
        tokio::spawn(run(app, rx));
    }

    /// Stores a validated spec as a new job (or finds the one with its idempotency key).
    pub async fn submit(
        &self,
        spec: pb::JobSpec,
        retried_from: Option<Uuid>,
    ) -> Result<pb::SubmitJobResponse> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission {
                spec,
                retried_from,
                reply,
            })
            .await
            .map_err(|_| Error::Unavailable("server is shutting down".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("server is shutting down".into()))?
    }
}

async fn run(app: App, mut rx: mpsc::Receiver<Submission>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_PER_COMMIT {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let specs: Vec<(pb::JobSpec, Option<Uuid>)> = batch
            .iter()
            .map(|s| (s.spec.clone(), s.retried_from))
            .collect();
        match commit(&app, &specs).await {
            Ok(responses) => {
                for (s, r) in batch.into_iter().zip(responses) {
                    let _ = s.reply.send(Ok(r));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, size = batch.len(), "submission batch failed; one at a time");
                for s in batch {
                    let r = alone(&app, s.spec, s.retried_from).await;
                    let _ = s.reply.send(r);
                }
            }
        }
    }
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
