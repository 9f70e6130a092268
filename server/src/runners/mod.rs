//! Runners: registration, sessions opening and being replaced, drains, deregistration, and
//! what operators see (list, get). Which state a runner is in is decided by [`state`]; this
//! module reads and writes the rows.
pub mod heartbeats;
pub mod sessions;
pub mod state;

use std::collections::HashMap;

use gantry_proto as pb;
use prost::Message;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, IntoActiveModel, QueryFilter,
    QueryOrder, QuerySelect, sea_query::Expr,
};
use uuid::Uuid;

use crate::{
    capacity, commands,
    error::{Error, Result, check_text},
    jobs::lifecycle::Env,
    jobs::spec,
    leases,
    signals::Signals,
    store::{
        Store,
        entity::{attempt, runner},
    },
};
use state::{Event, state_of};

/// Longest reason a runner or an operator may give.
const MAX_REASON: usize = 1024;

fn check_reason(field: &str, reason: &str) -> Result<()> {
    check_text(field, reason, MAX_REASON)
}

/// Registers runner `id`, whose credential hashes to `credential_hash` (see
/// [`crate::auth::Auth::issue_credential`]).
pub async fn register(
    store: &Store,
    now: i64,
    id: Uuid,
    credential_hash: String,
    mut req: pb::RegisterRequest,
) -> Result<()> {
    if req.name.is_empty() {
        return Err(Error::invalid("name", "must not be empty"));
    }
    check_text("name", &req.name, 128)?;
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
    check_text("version", &req.version, 128)?;
    check_text("hostname", &req.hostname, 255)?;
    if req.queues.is_empty() {
        // Stored explicitly, so readers never need to know the default.
        req.queues = vec![spec::DEFAULT_QUEUE.to_string()];
    }
    let wtx = store.write().await?;
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
            session_epoch: 0,
            revoked_at: None,
        }
        .into_active_model(),
    )
    .exec_without_returning(&wtx.txn)
    .await?;
    wtx.commit().await?;
    tracing::info!(runner = %id, name = %req.name, "runner registered");
    Ok(())
}

/// A runner's row, read for a change (locked on PostgreSQL); refused when it is unknown or
/// its credential was revoked.
async fn live_row(txn: &impl ConnectionTrait, id: Uuid) -> Result<runner::Model> {
    let mut q = runner::Entity::find_by_id(id);
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        q = q.lock_exclusive();
    }
    let row = q.one(txn).await?.ok_or_else(|| Error::unknown_runner(id))?;
    if row.revoked_at.is_some() {
        return Err(Error::revoked_runner(id));
    }
    Ok(row)
}

/// What a heartbeat or a session opening needs of a runner's row: never the whole row
/// (its registration blob, for thousands of runners at once, costs time and memory).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts {
    pub state: i32,
    pub last_heartbeat: i64,
    pub acked_command_seq: i64,
    pub revoked: bool,
    pub session_epoch: i64,
    pub capacity: i32,
}

/// The columns [`facts`] reads: id, state, last heartbeat, acknowledged command sequence,
/// revoked at, session epoch, capacity.
type FactsRow = (Uuid, i32, i64, i64, Option<i64>, i64, i32);

/// The [`Facts`] of runners `ids` that exist, locked (in id order) when `lock` is set.
pub(crate) async fn facts(
    txn: &impl ConnectionTrait,
    ids: &[Uuid],
    lock: bool,
) -> Result<HashMap<Uuid, Facts>> {
    let mut rows = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(leases::CHUNK) {
        let mut q = runner::Entity::find()
            .select_only()
            .columns([
                runner::Column::Id,
                runner::Column::State,
                runner::Column::LastHeartbeat,
                runner::Column::AckedCommandSeq,
                runner::Column::RevokedAt,
                runner::Column::SessionEpoch,
                runner::Column::Capacity,
            ])
            .filter(runner::Column::Id.is_in(chunk.iter().copied()));
        if lock {
            q = q.order_by_asc(runner::Column::Id).lock_exclusive();
        }
        let found: Vec<FactsRow> = q.into_tuple().all(txn).await?;
        rows.extend(found.into_iter().map(
            |(
                id,
                state,
                last_heartbeat,
                acked_command_seq,
                revoked_at,
                session_epoch,
                capacity,
            )| {
                let facts = Facts {
                    state,
                    last_heartbeat,
                    acked_command_seq,
                    revoked: revoked_at.is_some(),
                    session_epoch,
                    capacity,
                };
                (id, facts)
            },
        ));
    }
    Ok(rows)
}

/// Writes the state `event` leads to, when it differs.
async fn transition(
    txn: &impl ConnectionTrait,
    row: &runner::Model,
    event: Event,
) -> Result<pb::RunnerState> {
    let from = state_of(row.state);
    let to = state::next(from, event);
    if to != from {
        runner::Entity::update_many()
            .col_expr(runner::Column::State, Expr::value(to as i32))
            .filter(runner::Column::Id.eq(row.id))
            .exec(txn)
            .await?;
    }
    Ok(to)
}

/// What a session learns when it looks at its runner: the commands acknowledged so far.
/// Refused when the runner is gone or revoked (UNAUTHENTICATED), or when a newer session
/// replaced this one (ABORTED).
pub async fn session_check(db: &DatabaseConnection, runner_id: Uuid, epoch: i64) -> Result<i64> {
    let row: Option<(i64, i64, Option<i64>)> = runner::Entity::find_by_id(runner_id)
        .select_only()
        .column(runner::Column::AckedCommandSeq)
        .column(runner::Column::SessionEpoch)
        .column(runner::Column::RevokedAt)
        .into_tuple()
        .one(db)
        .await?;
    match row {
        None => Err(Error::unknown_runner(runner_id)),
        Some((_, _, Some(_))) => Err(Error::revoked_runner(runner_id)),
        Some((_, current, None)) if current != epoch => Err(Error::Aborted(format!(
            "this session was replaced by a newer session of runner {runner_id} (session {current}; this one is {epoch})"
        ))),
        Some((acked, _, None)) => Ok(acked),
    }
}

/// A stored runner as the protocol shows it.
pub fn to_proto(row: &runner::Model, active_jobs: u32) -> Result<pb::Runner> {
    let info = pb::RegisterRequest::decode(row.info.as_slice())?;
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

/// One runner.
pub async fn get(db: &DatabaseConnection, runner_id: Uuid) -> Result<pb::Runner> {
    let row = runner::Entity::find_by_id(runner_id)
        .one(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
    let active = capacity::held(db, &[runner_id]).await?;
    to_proto(&row, active.get(&runner_id).copied().unwrap_or(0))
}

/// A page of runners, newest registration first.
pub async fn list(
    db: &DatabaseConnection,
    req: pb::ListRunnersRequest,
) -> Result<pb::ListRunnersResponse> {
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
        .all(db)
        .await?;
    let more = rows.len() > page_size as usize;
    rows.truncate(page_size as usize);
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let active: HashMap<Uuid, u32> = capacity::held(db, &ids).await?;
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

/// An operator drains a runner: DRAINING, and a drain command pushed to it.
pub async fn drain(env: &Env, runner_id: Uuid, reason: &str) -> Result<pb::Runner> {
    check_reason("reason", reason)?;
    let wtx = env.store.write().await?;
    let mut q = runner::Entity::find_by_id(runner_id);
    if env.store.is_postgres() {
        q = q.lock_exclusive();
    }
    let row = q
        .one(&wtx.txn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
    transition(&wtx.txn, &row, Event::OperatorDrain).await?;
    commands::issue(
        &wtx.txn,
        runner_id,
        vec![pb::command::Kind::Drain(pb::DrainCommand {
            reason: reason.to_string(),
        })],
        env.clock.now_ms(),
    )
    .await?;
    wtx.commit().await?;
    let mut signals = Signals::default();
    signals.runners.insert(runner_id);
    env.hub.publish(signals);
    get(env.store.db(), runner_id).await
}

/// The runner drains itself (SIGTERM, a drain command, `--once`): DRAINING, no new work.
pub async fn drain_self(store: &Store, runner_id: Uuid, reason: &str) -> Result<()> {
    check_reason("drain.reason", reason)?;
    let wtx = store.write().await?;
    let row = live_row(&wtx.txn, runner_id).await?;
    transition(&wtx.txn, &row, Event::SelfDrain).await?;
    wtx.commit().await?;
    tracing::info!(runner = %runner_id, reason, "runner draining");
    Ok(())
}

/// The runner leaves, in one transaction: whatever it still holds ends as lost (and is
/// retried), it goes OFFLINE, and its credential is revoked.
pub async fn deregister(env: &Env, runner_id: Uuid, reason: &str) -> Result<u32> {
    check_reason("reason", reason)?;
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let row = live_row(lc.txn(), runner_id).await?;
    let released = leases::release_all(&mut lc, runner_id, reason).await?;
    transition(lc.txn(), &row, Event::Deregistered).await?;
    runner::Entity::update_many()
        .col_expr(runner::Column::RevokedAt, Expr::value(lc.now))
        .filter(runner::Column::Id.eq(runner_id))
        .exec(lc.txn())
        .await?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    // Its sessions, on any replica, look again and end.
    let mut signals = Signals::default();
    signals.runners.insert(runner_id);
    env.hub.publish(signals);
    tracing::info!(runner = %runner_id, reason, released, "runner deregistered");
    Ok(released)
}

/// ONLINE runners silent since before `horizon` go OFFLINE (see [`state`]).
pub async fn mark_silent(store: &Store, horizon: i64) -> Result<u64> {
    let silent: Vec<(Uuid, i32)> = runner::Entity::find()
        .select_only()
        .column(runner::Column::Id)
        .column(runner::Column::State)
        .filter(runner::Column::State.ne(pb::RunnerState::Offline as i32))
        .filter(runner::Column::LastHeartbeat.lt(horizon))
        .into_tuple()
        .all(store.db())
        .await?;
    let mut moves: HashMap<(i32, i32), Vec<Uuid>> = HashMap::new();
    for (id, from) in silent {
        let to = state::next(state_of(from), Event::Silent) as i32;
        if to != from {
            moves.entry((from, to)).or_default().push(id);
        }
    }
    if moves.is_empty() {
        return Ok(0); // the usual case: no write transaction at all
    }
    // Through the write gate like every write: on SQLite an ungated commit between another
    // transaction's read and its write fails that transaction (SQLITE_BUSY_SNAPSHOT).
    let wtx = store.write().await?;
    let mut changed = 0;
    for ((from, to), ids) in moves {
        changed += runner::Entity::update_many()
            .col_expr(runner::Column::State, Expr::value(to))
            .filter(runner::Column::Id.is_in(ids))
            .filter(runner::Column::State.eq(from))
            .filter(runner::Column::LastHeartbeat.lt(horizon))
            .exec(&wtx.txn)
            .await?
            .rows_affected;
    }
    wtx.commit().await?;
    Ok(changed)
}

/// Runners OFFLINE since before `horizon` and holding nothing (retention candidates).
pub async fn gone_before(
    txn: &impl ConnectionTrait,
    horizon: i64,
    limit: u64,
) -> Result<Vec<Uuid>> {
    Ok(runner::Entity::find()
        .select_only()
        .column(runner::Column::Id)
        .filter(runner::Column::State.eq(pb::RunnerState::Offline as i32))
        .filter(runner::Column::LastHeartbeat.lt(horizon))
        .filter(
            runner::Column::Id.not_in_subquery(
                sea_orm::sea_query::Query::select()
                    .column(attempt::Column::RunnerId)
                    .from(attempt::Entity)
                    .and_where(attempt::Column::FinishedAt.is_null())
                    .to_owned(),
            ),
        )
        .limit(limit)
        .into_tuple()
        .all(txn)
        .await?)
}
