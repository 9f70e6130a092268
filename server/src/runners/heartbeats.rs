//! Heartbeats: a runner's sign of life and its account of what it holds. Each is settled
//! by the lease rules ([`crate::leases::settle`]), moves the runner's state as
//! [`super::state`] says (an OFFLINE runner comes back), and is answered with the new lease
//! expiry, the runner's state and the leases it no longer holds.
//!
//! Heartbeats are group-committed (see [`crate::batch`]): 10,000 runners beating every 10 s
//! would otherwise be 1,000 write transactions a second. Every heartbeat waiting when the
//! writer is free is settled by one transaction.
use std::collections::HashMap;

use gantry_proto as pb;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, sea_query::Expr};
use uuid::Uuid;

use super::state::{self, Event, state_of};
use crate::{
    batch::{GroupCommit, Queue},
    error::{Error, Result},
    jobs::lifecycle::Env,
    leases::{Account, CHUNK, settle},
    store::entity::runner,
};

/// Heartbeats answered by one transaction at most.
const MAX_BEATS_AT_ONCE: usize = 512;

/// A heartbeat: the runner, and its account of what it holds.
pub struct Beat {
    pub runner: Uuid,
    pub held: Vec<(Uuid, Uuid)>,
}

/// What a heartbeat is answered with.
#[derive(Clone, Debug)]
pub struct Beaten {
    /// The new lease expiry (Unix ms).
    pub until: i64,
    /// `RunnerState` number after the heartbeat.
    pub state: i32,
    /// The last command sequence the runner acknowledged.
    pub acked_command_seq: i64,
    /// Leases listed that the server no longer honours.
    pub revoked: Vec<pb::LeaseRef>,
}

/// Handle to the heartbeat writer (group-committed, see the module comment).
pub type Heartbeats = GroupCommit<Beat, Beaten>;

/// Starts the heartbeat writer on `queue`.
pub fn start(env: Env, queue: Queue<Beat, Beaten>) {
    GroupCommit::spawn(queue, "heartbeats", MAX_BEATS_AT_ONCE, 1, move |beats| {
        let env = env.clone();
        async move { write_beats(&env, beats).await }
    });
}

/// One transaction for a group of heartbeats. Answers in order.
async fn write_beats(env: &Env, beats: Vec<Beat>) -> Result<Vec<Result<Beaten>>> {
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let (now, until) = (lc.now, lc.now + env.rules.lease_ms);
    let mut ids: Vec<Uuid> = beats.iter().map(|b| b.runner).collect();
    ids.sort();
    ids.dedup();
    let rows = super::facts(lc.txn(), &ids, false).await?;
    let mut accounts = Vec::new();
    let mut valid = Vec::new();
    for (i, beat) in beats.iter().enumerate() {
        if let Some(row) = rows.get(&beat.runner).filter(|r| !r.revoked) {
            accounts.push(Account {
                runner: beat.runner,
                held: beat.held.clone(),
                dropped_before: row.last_heartbeat,
            });
            valid.push(i);
        }
    }
    let revoked = settle(&mut lc, &accounts, until).await?;
    let live: Vec<Uuid> = accounts.iter().map(|a| a.runner).collect();
    for chunk in live.chunks(CHUNK) {
        runner::Entity::update_many()
            .col_expr(runner::Column::LastHeartbeat, Expr::value(now))
            .filter(runner::Column::Id.is_in(chunk.iter().copied()))
            .exec(lc.txn())
            .await?;
    }
    // State changes a heartbeat makes, grouped by (from, to); conditional on `from`, so a
    // concurrent drain is never overwritten.
    let mut moves: HashMap<(i32, i32), Vec<Uuid>> = HashMap::new();
    let mut after: HashMap<Uuid, i32> = HashMap::new();
    for id in &live {
        if let Some(row) = rows.get(id) {
            let to = state::next(state_of(row.state), Event::Heartbeat) as i32;
            after.insert(*id, to);
            if to != row.state {
                moves.entry((row.state, to)).or_default().push(*id);
            }
        }
    }
    for ((from, to), ids) in moves {
        runner::Entity::update_many()
            .col_expr(runner::Column::State, Expr::value(to))
            .filter(runner::Column::Id.is_in(ids))
            .filter(runner::Column::State.eq(from))
            .exec(lc.txn())
            .await?;
    }
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    let mut revoked = revoked.into_iter();
    let mut answers: Vec<Result<Beaten>> = beats
        .iter()
        .map(|b| match rows.get(&b.runner) {
            None => Err(Error::unknown_runner(b.runner)),
            Some(r) if r.revoked => Err(Error::revoked_runner(b.runner)),
            Some(_) => Err(Error::Internal("heartbeat not answered".into())),
        })
        .collect();
    for i in valid {
        let runner = beats[i].runner;
        let Some(row) = rows.get(&runner) else {
            continue;
        };
        answers[i] = Ok(Beaten {
            until,
            state: after.get(&runner).copied().unwrap_or(row.state),
            acked_command_seq: row.acked_command_seq,
            revoked: revoked.next().unwrap_or_default(),
        });
    }
    Ok(answers)
}
