//! Runners: registration, their commands (issued, polled, acknowledged), and what
//! operators see and steer (list, get, drain, stats).
use std::{collections::HashMap, time::Duration};

use gantry_proto as pb;
use prost::Message;
use sea_orm::{
    ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder, QuerySelect,
    sea_query::Expr,
};
use uuid::Uuid;

use crate::{
    App,
    auth::Auth,
    error::{Error, Result},
    jobs::spec,
    lifecycle::{Lifecycle, decode, now_ms},
    store::entity::{attempt, command, job, runner},
};

/// Registers a runner; returns its id and (once) its credential.
pub async fn register(app: &App, mut req: pb::RegisterRequest) -> Result<pb::RegisterResponse> {
    if req.name.is_empty() || req.name.len() > 128 {
        return Err(Error::invalid("name", "must be 1..=128 bytes"));
    }
    spec::check_labels("labels", &req.labels)?;
    if req.capacity == 0 || req.capacity > 1024 {
        return Err(Error::invalid("capacity", "must be within 1..=1024"));
    }
    if req.executors.is_empty() {
        return Err(Error::invalid(
            "executors",
            "at least one executor is required",
        ));
    }
    for e in &req.executors {
        if *e == 0 || pb::ExecutorKind::try_from(*e).is_err() {
            return Err(Error::invalid("executors", format!("unknown executor {e}")));
        }
    }
    for (i, q) in req.queues.iter().enumerate() {
        if q.is_empty() {
            return Err(Error::invalid(format!("queues[{i}]"), "must not be empty"));
        }
        spec::check_label_value(&format!("queues[{i}]"), q, 63)?;
    }
    if req.version.len() > 128 {
        return Err(Error::invalid("version", "must be at most 128 bytes"));
    }
    if req.hostname.len() > 255 {
        return Err(Error::invalid("hostname", "must be at most 255 bytes"));
    }
    if req.queues.is_empty() {
        // Stored explicitly, so readers never need to know the default.
        req.queues = vec![spec::DEFAULT_QUEUE.to_string()];
    }
    let id = Uuid::now_v7();
    let (credential, credential_hash) = Auth::issue_credential(id);
    let now = now_ms();
    let wtx = app.store.write().await?;
    runner::Entity::insert(
        runner::Model {
            id,
            name: req.name.clone(),
            info: req.encode_to_vec(),
            capacity: i32::try_from(req.capacity).unwrap_or(1),
            credential_hash,
            state: pb::RunnerState::Online as i32,
            last_heartbeat: now,
            registered_at: now,
            command_seq: 0,
            acked_command_seq: 0,
        }
        .into_active_model(),
    )
    .exec_without_returning(&wtx.txn)
    .await?;
    wtx.commit().await?;
    tracing::info!(runner = %id, name = %req.name, "runner registered");
    Ok(pb::RegisterResponse {
        runner_id: id.to_string(),
        credential,
        lease_seconds: app.config.lease_seconds,
        heartbeat_interval_seconds: (app.config.lease_seconds / 3).max(1),
    })
}

/// Commands for `runner_id` with a sequence above `after`, oldest first.
pub async fn pending_commands(app: &App, runner_id: Uuid, after: i64) -> Result<Vec<pb::Command>> {
    command::Entity::find()
        .filter(command::Column::RunnerId.eq(runner_id))
        .filter(command::Column::Seq.gt(after))
        .order_by_asc(command::Column::Seq)
        .limit(256)
        .all(app.store.db())
        .await?
        .iter()
        .map(|c| decode(&c.body))
        .collect()
}

/// Long-poll for commands above `after` (and above what was acknowledged).
pub async fn poll_commands(
    app: &App,
    runner_id: Uuid,
    after: u64,
    wait: Duration,
) -> Result<Vec<pb::Command>> {
    let mut rx = app.hub.subscribe_runner(runner_id);
    let deadline = tokio::time::Instant::now() + wait;
    let mut shutdown = app.shutdown.clone();
    loop {
        rx.borrow_and_update();
        let acked = runner::Entity::find_by_id(runner_id)
            .one(app.store.db())
            .await?
            .map_or(0, |r| r.acked_command_seq);
        let after = acked.max(i64::try_from(after).unwrap_or(i64::MAX));
        let commands = pending_commands(app, runner_id, after).await?;
        if !commands.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(commands);
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = crate::events::stopped(&mut shutdown) => return Ok(Vec::new()),
        }
    }
}

/// Acknowledges every command up to `seq`; acknowledged commands are deleted.
pub async fn ack_commands(app: &App, runner_id: Uuid, seq: u64) -> Result<()> {
    let seq = i64::try_from(seq).map_err(|_| Error::invalid("sequence", "must fit in 63 bits"))?;
    let wtx = app.store.write().await?;
    let row = runner::Entity::find_by_id(runner_id)
        .one(&wtx.txn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
    if seq > row.command_seq {
        return Err(Error::invalid(
            "sequence",
            format!(
                "{seq} is above the last command issued ({})",
                row.command_seq
            ),
        ));
    }
    if seq > row.acked_command_seq {
        runner::Entity::update_many()
            .col_expr(runner::Column::AckedCommandSeq, Expr::value(seq))
            .filter(runner::Column::Id.eq(runner_id))
            // Concurrent acks on PostgreSQL: the acknowledged sequence never goes back.
            .filter(runner::Column::AckedCommandSeq.lt(seq))
            .exec(&wtx.txn)
            .await?;
        command::Entity::delete_many()
            .filter(command::Column::RunnerId.eq(runner_id))
            .filter(command::Column::Seq.lte(seq))
            .exec(&wtx.txn)
            .await?;
    }
    wtx.commit().await?;
    Ok(())
}

/// A stored runner as the protocol shows it.
pub fn to_proto(row: &runner::Model, active_jobs: u32) -> Result<pb::Runner> {
    let info: pb::RegisterRequest = decode(&row.info)?;
    Ok(pb::Runner {
        id: row.id.to_string(),
        name: row.name.clone(),
        labels: info.labels,
        capacity: info.capacity,
        executors: info.executors,
        queues: info.queues,
        version: info.version,
        hostname: info.hostname,
        state: row.state,
        last_heartbeat_unix_ms: row.last_heartbeat,
        registered_at_unix_ms: row.registered_at,
        active_jobs,
    })
}

/// Unfinished attempts per runner, for the given runners, in one query.
async fn active_jobs(app: &App, runner_ids: Vec<Uuid>) -> Result<HashMap<Uuid, u32>> {
    let counts: Vec<(Uuid, i64)> = attempt::Entity::find()
        .select_only()
        .column(attempt::Column::RunnerId)
        .column_as(attempt::Column::LeaseId.count(), "n")
        .filter(attempt::Column::RunnerId.is_in(runner_ids))
        .filter(attempt::Column::FinishedAt.is_null())
        .group_by(attempt::Column::RunnerId)
        .into_tuple()
        .all(app.store.db())
        .await?;
    Ok(counts
        .into_iter()
        .map(|(id, n)| (id, u32::try_from(n).unwrap_or(u32::MAX)))
        .collect())
}

/// One runner.
pub async fn get(app: &App, runner_id: Uuid) -> Result<pb::Runner> {
    let row = runner::Entity::find_by_id(runner_id)
        .one(app.store.db())
        .await?
        .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
    let active = active_jobs(app, vec![runner_id]).await?;
    to_proto(&row, active.get(&runner_id).copied().unwrap_or(0))
}

/// A page of runners, newest registration first.
pub async fn list(app: &App, req: pb::ListRunnersRequest) -> Result<pb::ListRunnersResponse> {
    let page_size = match req.page_size {
        0 => 100,
        n @ 1..=1000 => n,
        _ => return Err(Error::invalid("page_size", "must be within 0..=1000")),
    };
    let mut q = runner::Entity::find();
    if !req.states.is_empty() {
        for s in &req.states {
            if *s == 0 || pb::RunnerState::try_from(*s).is_err() {
                return Err(Error::invalid(
                    "states",
                    format!("unknown runner state {s}"),
                ));
            }
        }
        q = q.filter(runner::Column::State.is_in(req.states.clone()));
    }
    if !req.page_token.is_empty() {
        let after = Uuid::try_parse(&req.page_token)
            .map_err(|_| Error::invalid("page_token", "is not a token this server issued"))?;
        q = q.filter(runner::Column::Id.lt(after));
    }
    let mut rows = q
        .order_by_desc(runner::Column::Id)
        .limit(u64::from(page_size) + 1)
        .all(app.store.db())
        .await?;
    let more = rows.len() > page_size as usize;
    rows.truncate(page_size as usize);
    let active = active_jobs(app, rows.iter().map(|r| r.id).collect()).await?;
    let runners = rows
        .iter()
        .map(|row| to_proto(row, active.get(&row.id).copied().unwrap_or(0)))
        .collect::<Result<Vec<_>>>()?;
    Ok(pb::ListRunnersResponse {
        next_page_token: if more {
            rows.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        },
        runners,
    })
}

/// Puts a runner in DRAINING and pushes it a drain command.
pub async fn drain(app: &App, runner_id: Uuid, reason: &str) -> Result<pb::Runner> {
    if reason.len() > 1024 {
        return Err(Error::invalid("reason", "must be at most 1024 bytes"));
    }
    let wtx = app.store.write().await?;
    let mut lc = Lifecycle::new(&wtx.txn, app.rules());
    lc.issue_command(
        runner_id,
        pb::command::Kind::Drain(pb::DrainCommand {
            reason: reason.to_string(),
        }),
    )
    .await?;
    runner::Entity::update_many()
        .col_expr(
            runner::Column::State,
            Expr::value(pb::RunnerState::Draining as i32),
        )
        .filter(runner::Column::Id.eq(runner_id))
        .exec(lc.txn())
        .await?;
    let signals = lc.flush().await?;
    wtx.commit().await?;
    app.hub.publish(signals);
    get(app, runner_id).await
}

/// Sets a runner's state (a session's hello, its own drain, or its deregistration).
async fn set_state(app: &App, runner_id: Uuid, state: pb::RunnerState) -> Result<()> {
    let wtx = app.store.write().await?;
    let found = runner::Entity::update_many()
        .col_expr(runner::Column::State, Expr::value(state as i32))
        .filter(runner::Column::Id.eq(runner_id))
        .exec(&wtx.txn)
        .await?
        .rows_affected;
    if found == 0 {
        return Err(Error::NotFound(format!("runner {runner_id}")));
    }
    wtx.commit().await?;
    Ok(())
}

/// A session opened: the runner is ready for work and goes ONLINE, unless an operator's
/// drain is still waiting to be delivered to it (it will drain as soon as it gets it).
pub async fn session_opened(app: &App, runner_id: Uuid) -> Result<()> {
    let row = runner::Entity::find_by_id(runner_id)
        .one(app.store.db())
        .await?
        .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
    if row.state == pb::RunnerState::Online as i32 {
        return Ok(());
    }
    let drain_pending = pending_commands(app, runner_id, row.acked_command_seq)
        .await?
        .iter()
        .any(|c| matches!(c.kind, Some(pb::command::Kind::Drain(_))));
    if drain_pending {
        return Ok(());
    }
    set_state(app, runner_id, pb::RunnerState::Online).await
}

/// The runner drains itself (SIGTERM, a drain command, `--once`): DRAINING, no new work.
pub async fn drain_self(app: &App, runner_id: Uuid, reason: &str) -> Result<()> {
    if reason.len() > 1024 {
        return Err(Error::invalid("drain.reason", "must be at most 1024 bytes"));
    }
    tracing::info!(runner = %runner_id, reason, "runner draining");
    set_state(app, runner_id, pb::RunnerState::Draining).await
}

/// The runner leaves: OFFLINE, and whatever it still holds is lost (and retried).
pub async fn deregister(
    app: &App,
    runner_id: Uuid,
    reason: &str,
) -> Result<pb::DeregisterResponse> {
    if reason.len() > 1024 {
        return Err(Error::invalid("reason", "must be at most 1024 bytes"));
    }
    let released_attempts = crate::leases::release_all(app, runner_id, reason).await?;
    set_state(app, runner_id, pb::RunnerState::Offline).await?;
    tracing::info!(runner = %runner_id, reason, released_attempts, "runner deregistered");
    Ok(pb::DeregisterResponse { released_attempts })
}

/// Job counts by status and per queue, runner counts by state.
pub async fn stats(app: &App) -> Result<pb::GetStatsResponse> {
    let by_status: Vec<(i32, i64)> = job::Entity::find()
        .select_only()
        .column(job::Column::Status)
        .column_as(job::Column::Id.count(), "n")
        .group_by(job::Column::Status)
        .into_tuple()
        .all(app.store.db())
        .await?;
    let by_queue: Vec<(String, i32, i64)> = job::Entity::find()
        .select_only()
        .column(job::Column::Queue)
        .column(job::Column::Status)
        .column_as(job::Column::Id.count(), "n")
        .filter(job::Column::Status.is_in([
            pb::JobStatus::Queued as i32,
            pb::JobStatus::Assigned as i32,
            pb::JobStatus::Running as i32,
            pb::JobStatus::Canceling as i32,
        ]))
        .group_by(job::Column::Queue)
        .group_by(job::Column::Status)
        .into_tuple()
        .all(app.store.db())
        .await?;
    let runners: Vec<(i32, i64)> = runner::Entity::find()
        .select_only()
        .column(runner::Column::State)
        .column_as(runner::Column::Id.count(), "n")
        .group_by(runner::Column::State)
        .into_tuple()
        .all(app.store.db())
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
