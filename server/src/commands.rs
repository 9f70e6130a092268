//! Runner commands: control messages from the server to one runner (cancel a job, drain),
//! persisted with a per-runner sequence number so that a runner that was away gets what it
//! missed, and delivered until the runner acknowledges them (cumulatively; acknowledged
//! commands are deleted). A session pushes a command the moment the transaction that issued
//! it commits (the hub signals the runner); a runner on the unary calls gets them from
//! `Heartbeat` answers or `PollCommands`.
use std::time::Duration;

use gantry_proto as pb;
use prost::Message;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, IntoActiveModel, QueryFilter,
    QueryOrder, QuerySelect, sea_query::Expr,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    signals::Hub,
    store::{
        Store,
        entity::{command, runner},
    },
};

/// Commands one answer carries at most.
const PAGE: u64 = 256;

/// Persists `kinds` for `runner_id`, in order, with its next sequence numbers (the runner row
/// is locked on PostgreSQL). Returns the sequences.
pub async fn issue(
    txn: &impl ConnectionTrait,
    runner_id: Uuid,
    kinds: Vec<pb::command::Kind>,
    now: i64,
) -> Result<Vec<u64>> {
    let mut q = runner::Entity::find_by_id(runner_id)
        .select_only()
        .column(runner::Column::CommandSeq);
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        q = q.lock_exclusive();
    }
    let last: i64 = q
        .into_tuple()
        .one(txn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("runner {runner_id}")))?;
    let mut seq = last;
    let mut rows = Vec::with_capacity(kinds.len());
    let mut issued = Vec::with_capacity(kinds.len());
    for kind in kinds {
        seq += 1;
        let body = pb::Command {
            sequence: u64::try_from(seq).unwrap_or_default(),
            created_at_unix_ms: now,
            kind: Some(kind),
        };
        issued.push(body.sequence);
        rows.push(
            command::Model {
                runner_id,
                seq,
                created_at: now,
                body: body.encode_to_vec(),
            }
            .into_active_model(),
        );
    }
    if rows.is_empty() {
        return Ok(issued);
    }
    runner::Entity::update_many()
        .col_expr(runner::Column::CommandSeq, Expr::value(seq))
        .filter(runner::Column::Id.eq(runner_id))
        .exec(txn)
        .await?;
    command::Entity::insert_many(rows)
        .exec_without_returning(txn)
        .await?;
    Ok(issued)
}

/// Commands for `runner_id` with a sequence above `after`, oldest first.
pub async fn pending(
    db: &impl ConnectionTrait,
    runner_id: Uuid,
    after: i64,
) -> Result<Vec<pb::Command>> {
    command::Entity::find()
        .filter(command::Column::RunnerId.eq(runner_id))
        .filter(command::Column::Seq.gt(after))
        .order_by_asc(command::Column::Seq)
        .limit(PAGE)
        .all(db)
        .await?
        .iter()
        .map(|c| Ok(pb::Command::decode(c.body.as_slice())?))
        .collect()
}

/// Whether an operator's drain waits, unacknowledged, for `runner_id`.
pub async fn drain_pending(db: &impl ConnectionTrait, runner_id: Uuid, acked: i64) -> Result<bool> {
    Ok(pending(db, runner_id, acked)
        .await?
        .iter()
        .any(|c| matches!(c.kind, Some(pb::command::Kind::Drain(_)))))
}

/// What a runner knows of its commands: (acknowledged sequence, revoked or gone).
async fn acked(db: &DatabaseConnection, runner_id: Uuid) -> Result<i64> {
    let row: Option<(i64, Option<i64>)> = runner::Entity::find_by_id(runner_id)
        .select_only()
        .column(runner::Column::AckedCommandSeq)
        .column(runner::Column::RevokedAt)
        .into_tuple()
        .one(db)
        .await?;
    match row {
        Some((acked, None)) => Ok(acked),
        Some((_, Some(_))) => Err(Error::revoked_runner(runner_id)),
        None => Err(Error::unknown_runner(runner_id)),
    }
}

/// Long-poll for commands above `after` (and above what was acknowledged), up to `wait`.
pub async fn poll(
    db: &DatabaseConnection,
    hub: &Hub,
    mut shutdown: watch::Receiver<bool>,
    runner_id: Uuid,
    after: u64,
    wait: Duration,
) -> Result<Vec<pb::Command>> {
    let mut rx = hub.subscribe_runner(runner_id);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        rx.borrow_and_update();
        let acked = acked(db, runner_id).await?;
        let after = acked.max(i64::try_from(after).unwrap_or(i64::MAX));
        let commands = pending(db, runner_id, after).await?;
        if !commands.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(commands);
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = crate::signals::stopped(&mut shutdown) => return Ok(Vec::new()),
        }
    }
}

/// Acknowledges every command up to `seq`; acknowledged commands are deleted.
pub async fn ack(store: &Store, runner_id: Uuid, seq: u64) -> Result<()> {
    let seq = i64::try_from(seq).map_err(|_| Error::invalid("sequence", "must fit in 63 bits"))?;
    let wtx = store.write().await?;
    let row = runner::Entity::find_by_id(runner_id)
        .one(&wtx.txn)
        .await?
        .ok_or_else(|| Error::unknown_runner(runner_id))?;
    if row.revoked_at.is_some() {
        return Err(Error::revoked_runner(runner_id));
    }
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
