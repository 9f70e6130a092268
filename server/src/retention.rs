//! Retention: terminal jobs older than `--retention-seconds` are deleted with everything they
//! own (attempts, events, log chunks, labels, artifacts, results, a lock row left behind),
//! and runners OFFLINE for that long and holding nothing are deleted with their commands. A
//! deleted runner's credential is refused (UNAUTHENTICATED), so it registers again. Blobs go
//! once nothing names them (`work::artifacts::purge_unreferenced`).
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

use crate::{
    error::Result,
    locks, runners,
    store::{
        Store,
        entity::{
            artifact, attempt, command, event, job, job_input, job_label, job_result, log_chunk,
            runner, sandbox, sandbox_command,
        },
    },
};

/// Rows deleted per transaction.
const BATCH: u64 = 500;

/// Deletes terminal jobs that finished before `horizon`, with everything they own; returns
/// how many.
pub async fn purge_finished_before(store: &Store, horizon: i64) -> Result<u64> {
    let ids: Vec<Uuid> = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::FinishedAt.is_not_null())
        .filter(job::Column::FinishedAt.lt(horizon))
        .limit(BATCH)
        .into_tuple()
        .all(store.db())
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let wtx = store.write().await?;
    let txn = &wtx.txn;
    log_chunk::Entity::delete_many()
        .filter(log_chunk::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    event::Entity::delete_many()
        .filter(event::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    attempt::Entity::delete_many()
        .filter(attempt::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    job_label::Entity::delete_many()
        .filter(job_label::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    // Their artifacts' blobs go later, once nothing names them (see `work::artifacts`).
    artifact::Entity::delete_many()
        .filter(artifact::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    job_result::Entity::delete_many()
        .filter(job_result::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    job_input::Entity::delete_many()
        .filter(job_input::Column::JobId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    sandbox_command::Entity::delete_many()
        .filter(sandbox_command::Column::Id.is_in(ids.clone()))
        .exec(txn)
        .await?;
    sandbox::Entity::delete_many()
        .filter(sandbox::Column::Id.is_in(ids.clone()))
        .exec(txn)
        .await?;
    locks::purge_jobs(txn, &ids).await?;
    let deleted = job::Entity::delete_many()
        .filter(
            Condition::all()
                .add(job::Column::Id.is_in(ids))
                .add(job::Column::FinishedAt.is_not_null()),
        )
        .exec(txn)
        .await?
        .rows_affected;
    wtx.commit().await?;
    tracing::info!(deleted, "retention: deleted finished jobs");
    Ok(deleted)
}

/// Deletes runners OFFLINE since before `horizon` and holding nothing, with their commands;
/// returns how many.
pub async fn purge_runners_gone_before(store: &Store, horizon: i64) -> Result<u64> {
    let wtx = store.write().await?;
    let gone = runners::gone_before(&wtx.txn, horizon, BATCH).await?;
    if gone.is_empty() {
        return Ok(0);
    }
    command::Entity::delete_many()
        .filter(command::Column::RunnerId.is_in(gone.clone()))
        .exec(&wtx.txn)
        .await?;
    let deleted = runner::Entity::delete_many()
        .filter(runner::Column::Id.is_in(gone))
        .exec(&wtx.txn)
        .await?
        .rows_affected;
    wtx.commit().await?;
    tracing::info!(deleted, "retention: deleted runners gone offline");
    Ok(deleted)
}
