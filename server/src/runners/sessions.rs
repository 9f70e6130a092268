//! Sessions opening: each hello makes the runner take the state it announces (see
//! [`super::state`]), gives the session the runner's next epoch (an older session of the
//! runner, on any replica, then finds itself replaced and ends), and settles the runner's
//! account of its leases with "given before this session" as the bound (see
//! [`crate::leases`]).
//!
//! Openings are group-committed (see [`crate::batch`]): after a server restart every runner
//! reconnects at once, and 10,000 hellos must not cost 10,000 commits.
use std::collections::{HashMap, HashSet};

use gantry_proto as pb;
use prost::Message;
use sea_orm::{
    ColumnTrait, EntityTrait, QueryFilter, QuerySelect,
    sea_query::{Expr, ExprTrait},
};
use uuid::Uuid;

use super::state::{self, Event, state_of};
use crate::{
    batch::{GroupCommit, Queue},
    error::{Error, Result, check_text},
    jobs::lifecycle::Env,
    leases::{self, Account, CHUNK, settle},
    signals::Signals,
    store::entity::{command, runner},
};

/// Hellos answered by one transaction at most.
const MAX_OPENINGS_AT_ONCE: usize = 512;
/// Longest drain reason.
const MAX_REASON: usize = 1024;

/// A session that opened.
#[derive(Clone, Debug)]
pub struct Opened {
    /// The session's epoch: a later session of the runner has a higher one.
    pub epoch: i64,
    /// The runner's registered capacity.
    pub capacity: u32,
    /// Leases of `hello.held` the server no longer honours.
    pub revoked: Vec<pb::LeaseRef>,
}

/// Handle to the session opener (group-committed, see the module comment).
pub type Openings = GroupCommit<(Uuid, pb::Hello), Opened>;

/// Starts the session opener on `queue`.
pub fn start(env: Env, queue: Queue<(Uuid, pb::Hello), Opened>) {
    GroupCommit::spawn(
        queue,
        "session openings",
        MAX_OPENINGS_AT_ONCE,
        1,
        move |hellos| {
            let env = env.clone();
            async move { open(&env, hellos).await }
        },
    );
}

/// Checks a hello: its held leases and its drain reason.
fn check(hello: &pb::Hello) -> Result<Vec<(Uuid, Uuid)>> {
    check_text("hello.drain_reason", &hello.drain_reason, MAX_REASON)?;
    leases::parse_held("hello.held", &hello.held)
}

/// One transaction for a group of hellos. Answers in order.
async fn open(env: &Env, hellos: Vec<(Uuid, pb::Hello)>) -> Result<Vec<Result<Opened>>> {
    let mut answers: Vec<Result<Opened>> = hellos
        .iter()
        .map(|_| Err(Error::Internal("hello not answered".into())))
        .collect();
    // The last hello of each runner opens; an earlier one in the same group is replaced at
    // once, as it would be a moment later.
    let mut last: HashMap<Uuid, usize> = HashMap::new();
    let mut held: HashMap<usize, Vec<(Uuid, Uuid)>> = HashMap::new();
    for (i, (runner, hello)) in hellos.iter().enumerate() {
        match check(hello) {
            Ok(h) => {
                held.insert(i, h);
                if let Some(earlier) = last.insert(*runner, i) {
                    answers[earlier] = Err(replaced(*runner));
                }
            }
            Err(e) => answers[i] = Err(e),
        }
    }
    let mut ids: Vec<Uuid> = last.keys().copied().collect();
    ids.sort();
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let now = lc.now;
    let rows = super::facts(lc.txn(), &ids, env.store.is_postgres()).await?;
    // Operators' drains not yet acknowledged, for every runner at once (acknowledged
    // commands are deleted, so there are few rows to read).
    let mut draining: HashSet<Uuid> = HashSet::new();
    for chunk in ids.chunks(CHUNK) {
        let pending: Vec<(Uuid, i64, Vec<u8>)> = command::Entity::find()
            .select_only()
            .columns([
                command::Column::RunnerId,
                command::Column::Seq,
                command::Column::Body,
            ])
            .filter(command::Column::RunnerId.is_in(chunk.iter().copied()))
            .into_tuple()
            .all(lc.txn())
            .await?;
        for (id, seq, body) in pending {
            let acked = rows.get(&id).map_or(i64::MAX, |r| r.acked_command_seq);
            let is_drain = pb::Command::decode(body.as_slice())
                .is_ok_and(|c| matches!(c.kind, Some(pb::command::Kind::Drain(_))));
            if seq > acked && is_drain {
                draining.insert(id);
            }
        }
    }
    let mut accounts = Vec::new();
    let mut opening = Vec::new();
    let mut moves: HashMap<(i32, i32), Vec<Uuid>> = HashMap::new();
    for id in &ids {
        let i = last[id];
        let row = match rows.get(id) {
            None => {
                answers[i] = Err(Error::unknown_runner(*id));
                continue;
            }
            Some(r) if r.revoked => {
                answers[i] = Err(Error::revoked_runner(*id));
                continue;
            }
            Some(r) => r,
        };
        let to = state::next(
            state_of(row.state),
            Event::SessionOpened {
                draining: hellos[i].1.draining,
                drain_pending: draining.contains(id),
            },
        ) as i32;
        if to != row.state {
            moves.entry((row.state, to)).or_default().push(*id);
        }
        accounts.push(Account {
            runner: *id,
            held: held.remove(&i).unwrap_or_default(),
            dropped_before: now,
        });
        opening.push((i, *id, row.session_epoch + 1, row.capacity));
    }
    for ((from, to), ids) in moves {
        runner::Entity::update_many()
            .col_expr(runner::Column::State, Expr::value(to))
            .filter(runner::Column::Id.is_in(ids))
            .filter(runner::Column::State.eq(from))
            .exec(lc.txn())
            .await?;
    }
    let opened: Vec<Uuid> = opening.iter().map(|(_, id, ..)| *id).collect();
    for chunk in opened.chunks(CHUNK) {
        runner::Entity::update_many()
            .col_expr(
                runner::Column::SessionEpoch,
                Expr::col(runner::Column::SessionEpoch).add(1),
            )
            .col_expr(runner::Column::LastHeartbeat, Expr::value(now))
            .filter(runner::Column::Id.is_in(chunk.iter().copied()))
            .exec(lc.txn())
            .await?;
    }
    let revoked = settle(&mut lc, &accounts, now + env.rules.lease_ms).await?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    // Wakes the older sessions of these runners, which then find themselves replaced.
    env.hub.publish(Signals {
        runners: opened.iter().copied().collect(),
        ..Default::default()
    });
    for ((i, id, epoch, capacity), revoked) in opening.into_iter().zip(revoked) {
        tracing::debug!(runner = %id, epoch, "session opened");
        answers[i] = Ok(Opened {
            epoch,
            capacity: u32::try_from(capacity).unwrap_or(1),
            revoked,
        });
    }
    Ok(answers)
}

/// The answer to a hello that a later hello of the same runner replaced.
fn replaced(runner: Uuid) -> Error {
    Error::Aborted(format!(
        "this session was replaced by a newer session of runner {runner}"
    ))
}
