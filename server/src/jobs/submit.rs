//! Submissions are group-committed, like reports: one task takes every submission waiting
//! (from every SubmitJob and RetryJob call at that moment), inserts them in one transaction
//! and answers each caller. A burst of submits costs one commit, not one each. Idempotency
//! keys are honoured across the batch: a key already stored, or seen earlier in the same
//! batch, answers with that job. If a batch fails as a whole (say another replica stored the
//! same idempotency key in between), its submissions are retried one at a time, so that one
//! bad submission never fails the others.
use std::collections::HashMap;

use gantry_proto as pb;
use sea_orm::{ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter};
use uuid::Uuid;

use crate::{
    batch::{GroupCommit, Queue},
    error::{Error, Result},
    jobs::lifecycle::{Env, new_job},
    store::entity::{job, job_input, job_label},
};

/// Submissions taken into one transaction at most.
const MAX_PER_COMMIT: usize = 512;

/// One validated submission.
#[derive(Clone, Debug)]
pub struct Submission {
    pub spec: pb::JobSpec,
    /// RetryJob: the job whose spec this is.
    pub retried_from: Option<Uuid>,
    /// WorkService.SubmitChild: the job whose work submitted it.
    pub parent_job: Option<Uuid>,
}

impl Submission {
    /// A plain submission of `spec`.
    pub fn of(spec: pb::JobSpec) -> Submission {
        Submission {
            spec,
            retried_from: None,
            parent_job: None,
        }
    }
}

/// Handle to the submitter: validated submissions are group-committed (see
/// [`crate::batch`]).
pub type Submitter = GroupCommit<Submission, pb::SubmitJobResponse>;

/// Starts the submitter on `queue`.
pub fn start(env: Env, queue: Queue<Submission, pb::SubmitJobResponse>) {
    GroupCommit::spawn(queue, "submit", MAX_PER_COMMIT, 1, move |batch| {
        let env = env.clone();
        async move {
            match commit(&env, &batch).await {
                Ok(responses) => Ok(responses),
                Err(e) => {
                    tracing::debug!(error = %e, size = batch.len(), "submission batch failed; one at a time");
                    let mut answers = Vec::with_capacity(batch.len());
                    for submission in batch {
                        answers.push(alone(&env, submission).await);
                    }
                    Ok(answers)
                }
            }
        }
    });
}

/// One submission on its own. When its idempotency key was stored meanwhile (by another
/// replica: the unique index refused the insert), it answers with that job.
async fn alone(env: &Env, submission: Submission) -> Result<pb::SubmitJobResponse> {
    let key = submission.spec.idempotency_key.clone();
    match commit(env, &[submission]).await {
        Ok(mut r) => r
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("no answer".into()))),
        Err(e) => {
            if !key.is_empty()
                && let Some(existing) = job::Entity::find()
                    .filter(job::Column::IdempotencyKey.eq(key))
                    .one(env.store.db())
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

/// Where each submission's answer comes from.
enum Answer {
    /// A job stored before this batch, with the same idempotency key.
    Existing(Box<job::Model>),
    /// A job inserted by this batch.
    Inserted(Uuid, bool),
}

/// Inserts a batch in one transaction; answers in the batch's order. An error is returned
/// only when nothing was stored; once the batch is committed, each submission has its own
/// answer.
async fn commit(env: &Env, batch: &[Submission]) -> Result<Vec<Result<pb::SubmitJobResponse>>> {
    let keys: Vec<String> = batch
        .iter()
        .filter(|s| !s.spec.idempotency_key.is_empty())
        .map(|s| s.spec.idempotency_key.clone())
        .collect();
    let mut stored: HashMap<String, job::Model> = HashMap::new();
    if !keys.is_empty() {
        for m in job::Entity::find()
            .filter(job::Column::IdempotencyKey.is_in(keys))
            .all(env.store.db())
            .await?
        {
            if let Some(k) = m.idempotency_key.clone() {
                stored.insert(k, m);
            }
        }
    }
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let mut answers = Vec::with_capacity(batch.len());
    let mut fresh: HashMap<String, Uuid> = HashMap::new();
    let mut labels = Vec::new();
    let mut inputs = Vec::new();
    for submission in batch {
        let spec = &submission.spec;
        let key = &spec.idempotency_key;
        if let Some(m) = stored.get(key).filter(|_| !key.is_empty()) {
            answers.push(Answer::Existing(Box::new(m.clone())));
            continue;
        }
        if let Some(id) = fresh.get(key).filter(|_| !key.is_empty()) {
            answers.push(Answer::Inserted(*id, true));
            continue;
        }
        let mut model = new_job(spec, submission.retried_from, lc.now);
        model.parent_job = submission.parent_job;
        let id = model.id;
        labels.extend(spec.labels.iter().map(|(k, v)| {
            job_label::Model {
                job_id: id,
                key: k.clone(),
                value: v.clone(),
            }
            .into_active_model()
        }));
        inputs.extend(super::spec::input_rows(id, spec));
        lc.insert_job(model);
        if !key.is_empty() {
            fresh.insert(key.clone(), id);
        }
        answers.push(Answer::Inserted(id, false));
    }
    for chunk in labels.chunks(500) {
        job_label::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(lc.txn())
            .await?;
    }
    for chunk in inputs.chunks(500) {
        job_input::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(lc.txn())
            .await?;
    }
    // The rows as they are stored (with their first event), taken before the commit: a
    // read after it could fail, and a failure after the commit must never send the batch
    // round again (its jobs would be stored twice).
    let rows: HashMap<Uuid, job::Model> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Inserted(id, false) => lc.job(id).map(|m| (*id, m.clone())),
            _ => None,
        })
        .collect();
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    Ok(answers
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
        .collect())
}
