//! Locks: mutual exclusion by `lock_key`. At most one claimed, unfinished job holds a key;
//! others with that key wait queued, and dispatch does not even look at them while the key
//! is held ([`free`] is part of the claim's query), so any number of them never delays an
//! unrelated job.
//!
//! A lock is a row keyed by the lock key (the primary key makes two holders impossible on
//! any database), naming the lease that holds it. It is taken in the claim's transaction
//! ([`try_take`]) and released in the transaction of every decision that ends or takes back
//! that attempt ([`release`]: terminal status, retry, lost lease, timeout, a claim taken back
//! because it never reached its runner); retention removes what belonged to deleted jobs
//! ([`purge_jobs`]). Releasing names the lease, so a stale release never frees a key that a
//! later attempt holds.
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter,
    sea_query::{Expr, ExprTrait, OnConflict, Query},
};
use uuid::Uuid;

use crate::{
    error::Result,
    store::entity::{job, lock},
};

/// Rows per statement.
const CHUNK: usize = 200;

/// The claim query's condition: the job has no lock key, or nobody holds it.
pub fn free() -> Condition {
    Condition::any().add(job::Column::LockKey.is_null()).add(
        Expr::exists(
            Query::select()
                .expr(Expr::val(1))
                .from(lock::Entity)
                .and_where(
                    Expr::col((lock::Entity, lock::Column::LockKey))
                        .equals((job::Entity, job::Column::LockKey)),
                )
                .to_owned(),
        )
        .not(),
    )
}

/// Takes `key` for the attempt of `lease` of `job`. False when someone holds it.
pub async fn try_take(
    txn: &impl ConnectionTrait,
    key: &str,
    job: Uuid,
    lease: Uuid,
) -> Result<bool> {
    let taken = lock::Entity::insert(
        lock::Model {
            lock_key: key.to_string(),
            job_id: job,
            lease_id: lease,
        }
        .into_active_model(),
    )
    .on_conflict(
        OnConflict::column(lock::Column::LockKey)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(txn)
    .await?;
    Ok(taken == 1)
}

/// Releases each (key, lease) still held under that lease.
pub async fn release(txn: &impl ConnectionTrait, held: &[(String, Uuid)]) -> Result<()> {
    for chunk in held.chunks(CHUNK) {
        let mut any = Condition::any();
        for (key, lease) in chunk {
            any = any.add(
                Condition::all()
                    .add(lock::Column::LockKey.eq(key.clone()))
                    .add(lock::Column::LeaseId.eq(*lease)),
            );
        }
        lock::Entity::delete_many().filter(any).exec(txn).await?;
    }
    Ok(())
}

/// Removes the locks of deleted jobs (retention).
pub async fn purge_jobs(txn: &impl ConnectionTrait, jobs: &[Uuid]) -> Result<()> {
    for chunk in jobs.chunks(CHUNK * 2) {
        lock::Entity::delete_many()
            .filter(lock::Column::JobId.is_in(chunk.iter().copied()))
            .exec(txn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use sea_orm::{PaginatorTrait, TransactionTrait};

    #[tokio::test]
    async fn a_key_has_one_holder_and_a_stale_release_frees_nothing() {
        let store = Store::memory().await.expect("store");
        let txn = store.db().begin().await.expect("txn");
        let (j1, l1, j2, l2) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        assert!(try_take(&txn, "k", j1, l1).await.expect("take"));
        assert!(!try_take(&txn, "k", j2, l2).await.expect("take"));
        // A release naming another lease leaves the holder's lock alone.
        release(&txn, &[("k".into(), l2)]).await.expect("release");
        assert_eq!(lock::Entity::find().count(&txn).await.expect("count"), 1);
        release(&txn, &[("k".into(), l1)]).await.expect("release");
        assert!(try_take(&txn, "k", j2, l2).await.expect("take"));
        purge_jobs(&txn, &[j2]).await.expect("purge");
        assert_eq!(lock::Entity::find().count(&txn).await.expect("count"), 0);
    }
}
