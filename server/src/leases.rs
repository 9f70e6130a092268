//! Leases: how long a runner holds an attempt, and what a runner's account of its work does.
//!
//! A claim gives the attempt a lease of `--lease-seconds`. The runner keeps it by heart-
//! beating (on its session, or the unary `Heartbeat`); any report of the attempt counts too.
//! A heartbeat, like a session's hello, carries `held`: the runner's complete account of the
//! leases it holds. So a heartbeat
//! - extends the leases listed that the runner does hold;
//! - answers, as `revoked`, the leases listed that the server no longer honours (ended, or
//!   another runner's): the runner stops that work;
//! - ends as lost the runner's attempts it does not list, when they were given to it before
//!   its previous heartbeat — a runner that restarted, or never received a claim's answer,
//!   gives them up at once instead of keeping them alive until their deadline. Attempts given
//!   after the previous heartbeat are left alone (their assignment may still be on its way).
//!   A lost attempt the runner never reported on is taken back without counting (see
//!   [`crate::jobs::state::end`]).
//!
//! A session's hello does the same with "given before this session" as the bound. An attempt
//! whose lease expires is ended as lost by the reaper ([`crate::reaper`]).
//!
//! The heartbeat writer ([`crate::runners::heartbeats`]) settles the accounts of many
//! runners in one transaction.
use std::collections::{HashMap, HashSet};

use gantry_proto as pb;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, sea_query::Expr};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    jobs::{lifecycle::Lifecycle, state::AttemptEnd},
    store::entity::attempt,
};

/// Most lease references one heartbeat or hello may carry.
pub const MAX_HELD: usize = 4096;
/// Runners or leases per statement.
pub(crate) const CHUNK: usize = 500;

/// Checks a runner's list of held leases: bounded, and every id a UUID.
pub fn parse_held(field: &str, held: &[pb::LeaseRef]) -> Result<Vec<(Uuid, Uuid)>> {
    if held.len() > MAX_HELD {
        return Err(Error::invalid(field, format!("at most {MAX_HELD} entries")));
    }
    held.iter()
        .enumerate()
        .map(|(i, h)| {
            let job = Uuid::try_parse(&h.job_id).map_err(|_| {
                Error::invalid(
                    format!("{field}[{i}].job_id"),
                    format!("{:?} is not a UUID", h.job_id),
                )
            })?;
            let lease = Uuid::try_parse(&h.lease_id).map_err(|_| {
                Error::invalid(
                    format!("{field}[{i}].lease_id"),
                    format!("{:?} is not a UUID", h.lease_id),
                )
            })?;
            Ok((job, lease))
        })
        .collect()
}

/// A runner's account of its work: what it holds, and the time before which attempts it
/// does not list are given up.
pub struct Account {
    pub runner: Uuid,
    pub held: Vec<(Uuid, Uuid)>,
    pub dropped_before: i64,
}

/// Settles runners' accounts in `lc`'s transaction (see the module comment): extends the
/// leases they hold to `until`, ends the attempts they dropped, and returns, per account, the
/// leases listed that are not theirs to hold.
pub async fn settle(
    lc: &mut Lifecycle<'_>,
    accounts: &[Account],
    until: i64,
) -> Result<Vec<Vec<pb::LeaseRef>>> {
    let runners: Vec<Uuid> = accounts.iter().map(|a| a.runner).collect();
    // Every unfinished attempt of these runners: (lease, job, runner, assigned at).
    let mut open: HashMap<Uuid, Vec<(Uuid, Uuid, i64)>> = HashMap::new();
    for chunk in runners.chunks(CHUNK) {
        let rows: Vec<(Uuid, Uuid, Uuid, i64)> = attempt::Entity::find()
            .select_only()
            .column(attempt::Column::LeaseId)
            .column(attempt::Column::JobId)
            .column(attempt::Column::RunnerId)
            .column(attempt::Column::AssignedAt)
            .filter(attempt::Column::RunnerId.is_in(chunk.iter().copied()))
            .filter(attempt::Column::FinishedAt.is_null())
            // A sandbox command's attempt is not in the runner's account: it lives and
            // dies with its sandbox's lease.
            .filter(attempt::Column::ParentLease.is_null())
            .into_tuple()
            .all(lc.txn())
            .await?;
        for (lease, job, runner, assigned_at) in rows {
            open.entry(runner)
                .or_default()
                .push((lease, job, assigned_at));
        }
    }
    let mut extend = Vec::new();
    let mut dropped = Vec::new();
    let mut revoked = Vec::with_capacity(accounts.len());
    for account in accounts {
        let theirs: &[(Uuid, Uuid, i64)] = open.get(&account.runner).map_or(&[], Vec::as_slice);
        let live: HashSet<(Uuid, Uuid)> = theirs.iter().map(|(l, j, _)| (*j, *l)).collect();
        let listed: HashSet<Uuid> = account.held.iter().map(|(_, lease)| *lease).collect();
        revoked.push(
            account
                .held
                .iter()
                .filter(|key| !live.contains(key))
                .map(|(job, lease)| pb::LeaseRef {
                    job_id: job.to_string(),
                    lease_id: lease.to_string(),
                })
                .collect(),
        );
        for (lease, job, assigned_at) in theirs {
            if listed.contains(lease) && live.contains(&(*job, *lease)) {
                extend.push(*lease);
            } else if !listed.contains(lease) && *assigned_at < account.dropped_before {
                dropped.push((*lease, account.runner));
            }
        }
    }
    for chunk in extend.chunks(CHUNK) {
        attempt::Entity::update_many()
            .col_expr(attempt::Column::LeaseExpiresAt, Expr::value(until))
            .filter(attempt::Column::LeaseId.is_in(chunk.iter().copied()))
            .filter(attempt::Column::LeaseExpiresAt.lt(until))
            .exec(lc.txn())
            .await?;
    }
    lc.load_attempts(dropped.iter().map(|(lease, _)| *lease))
        .await?;
    for (lease, runner) in dropped {
        let end = AttemptEnd::Lost {
            message: format!(
                "runner {runner} no longer holds this attempt (its account left it out)"
            ),
        };
        // Each attempt on its own: one that cannot be ended is left to its lease.
        if let Err(e) = lc.end_attempt(lease, end) {
            tracing::warn!(%lease, error = %e, "could not end an attempt its runner dropped");
        }
    }
    Ok(revoked)
}

/// Ends every attempt `runner` still holds as lost (it deregisters); returns how many.
pub async fn release_all(lc: &mut Lifecycle<'_>, runner: Uuid, reason: &str) -> Result<u32> {
    let held: Vec<Uuid> = attempt::Entity::find()
        .select_only()
        .column(attempt::Column::LeaseId)
        .filter(attempt::Column::RunnerId.eq(runner))
        .filter(attempt::Column::FinishedAt.is_null())
        .into_tuple()
        .all(lc.txn())
        .await?;
    lc.load_attempts(held.iter().copied()).await?;
    let mut released = 0u32;
    for lease in held {
        let end = AttemptEnd::Lost {
            message: format!("runner {runner} deregistered ({reason}) holding this attempt"),
        };
        match lc.end_attempt(lease, end) {
            Ok(()) => released += 1,
            Err(e) => tracing::warn!(%lease, error = %e, "could not release an attempt"),
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        jobs::lifecycle::{Rules, new_job},
        jobs::state,
        store::{Store, entity::job},
    };
    use gantry_proto::JobStatus;
    use sea_orm::TransactionTrait;

    /// Two jobs claimed by one runner at `at`, each retried once.
    async fn two_claims(store: &Store, runner: Uuid, at: i64) -> Vec<(Uuid, Uuid)> {
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, Rules::with_lease(3_000), at);
        let mut out = Vec::new();
        for _ in 0..2 {
            let spec = pb::JobSpec {
                command: vec!["true".into()],
                executor: pb::ExecutorKind::Process as i32,
                retry: Some(pb::RetryPolicy {
                    max_attempts: 2,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let model = new_job(&spec, None, at);
            let job = model.id;
            lc.insert_job(model);
            let lease = Uuid::now_v7();
            let view = lc.job_view(&job).expect("view");
            lc.apply(state::claim(&view, runner, lease, at, 3_000).expect("claim"))
                .expect("apply");
            out.push((job, lease));
        }
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        out
    }

    #[tokio::test]
    async fn an_account_extends_what_is_held_and_ends_what_was_dropped() {
        let store = Store::memory().await.expect("store");
        let (runner, other) = (Uuid::now_v7(), Uuid::now_v7());
        let claims = two_claims(&store, runner, 1_000).await;
        let (kept, dropped) = (claims[0], claims[1]);
        let foreign = (Uuid::now_v7(), Uuid::now_v7());
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, Rules::with_lease(3_000), 5_000);
        let revoked = settle(
            &mut lc,
            &[
                Account {
                    runner,
                    held: vec![kept, foreign],
                    dropped_before: 2_000,
                },
                Account {
                    runner: other,
                    held: vec![kept],
                    dropped_before: 2_000,
                },
            ],
            8_000,
        )
        .await
        .expect("settled");
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        // Listed but not its own: revoked.
        assert_eq!(revoked[0].len(), 1);
        assert_eq!(revoked[0][0].lease_id, foreign.1.to_string());
        assert_eq!(
            revoked[1].len(),
            1,
            "another runner's lease is not honoured"
        );
        let kept_row = attempt::Entity::find_by_id(kept.1)
            .one(store.db())
            .await
            .expect("read")
            .expect("row");
        assert_eq!(kept_row.lease_expires_at, 8_000);
        assert_eq!(kept_row.finished_at, None);
        // Dropped and never reported on: taken back, the job queued again, uncounted.
        let job = job::Entity::find_by_id(dropped.0)
            .one(store.db())
            .await
            .expect("read")
            .expect("row");
        assert_eq!(job.status, JobStatus::Queued as i32);
        assert_eq!(job.attempt_count, 0);
    }

    #[tokio::test]
    async fn attempts_given_after_the_previous_heartbeat_are_left_alone() {
        let store = Store::memory().await.expect("store");
        let runner = Uuid::now_v7();
        let claims = two_claims(&store, runner, 3_000).await;
        let txn = store.db().begin().await.expect("txn");
        let mut lc = Lifecycle::new(&txn, Rules::with_lease(3_000), 5_000);
        settle(
            &mut lc,
            &[Account {
                runner,
                held: vec![],
                dropped_before: 2_000,
            }],
            8_000,
        )
        .await
        .expect("settled");
        lc.flush().await.expect("flush");
        txn.commit().await.expect("commit");
        for (job, _) in claims {
            let row = job::Entity::find_by_id(job)
                .one(store.db())
                .await
                .expect("read")
                .expect("row");
            assert_eq!(row.status, JobStatus::Assigned as i32);
        }
    }
}
