//! Counts for operators (`GetStats`): jobs by status and per queue (sandboxes and their
//! commands are not counted), runners by state.
use gantry_proto as pb;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QuerySelect};

use crate::{
    error::Result,
    jobs::state::Kind,
    store::entity::{job, runner},
};

/// Job counts by status and per queue, runner counts by state.
pub async fn stats(db: &DatabaseConnection) -> Result<pb::GetStatsResponse> {
    let by_status: Vec<(i32, i64)> = job::Entity::find()
        .select_only()
        .column(job::Column::Status)
        .column_as(job::Column::Id.count(), "n")
        .filter(job::Column::Kind.eq(Kind::Job.as_i32()))
        .group_by(job::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let by_queue: Vec<(String, i32, i64)> = job::Entity::find()
        .select_only()
        .column(job::Column::Queue)
        .column(job::Column::Status)
        .column_as(job::Column::Id.count(), "n")
        .filter(job::Column::Kind.eq(Kind::Job.as_i32()))
        .filter(job::Column::Status.is_in([
            pb::JobStatus::Queued as i32,
            pb::JobStatus::Assigned as i32,
            pb::JobStatus::Running as i32,
            pb::JobStatus::Canceling as i32,
        ]))
        .group_by(job::Column::Queue)
        .group_by(job::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let runners: Vec<(i32, i64)> = runner::Entity::find()
        .select_only()
        .column(runner::Column::State)
        .column_as(runner::Column::Id.count(), "n")
        .group_by(runner::Column::State)
        .into_tuple()
        .all(db)
        .await?;
    let mut queues: std::collections::BTreeMap<String, pb::QueueStats> = Default::default();
    for (queue, status, n) in by_queue {
        let entry = queues
            .entry(queue.clone())
            .or_insert_with(|| pb::QueueStats {
                queue,
                ..Default::default()
            });
        let n = u64::try_from(n).unwrap_or_default();
        if status == pb::JobStatus::Queued as i32 {
            entry.queued += n;
        } else {
            entry.active += n;
        }
    }
    let mut jobs_by_status: Vec<pb::StatusCount> = by_status
        .into_iter()
        .map(|(status, n)| pb::StatusCount {
            status,
            count: u64::try_from(n).unwrap_or_default(),
        })
        .collect();
    jobs_by_status.sort_by_key(|s| s.status);
    let mut runners_by_state: Vec<pb::RunnerStateCount> = runners
        .into_iter()
        .map(|(state, n)| pb::RunnerStateCount {
            state,
            count: u64::try_from(n).unwrap_or_default(),
        })
        .collect();
    runners_by_state.sort_by_key(|s| s.state);
    Ok(pb::GetStatsResponse {
        jobs_by_status,
        queues: queues.into_values().collect(),
        runners_by_state,
    })
}
