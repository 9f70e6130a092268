//! Capacity: a runner holds at most its registered number of unfinished attempts. Checked
//! inside the claim's transaction, whatever a session's credits or a Claim's `max_jobs` ask
//! for, so no path can hand a runner more than it registered for.
use std::collections::HashMap;

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

use crate::{error::Result, store::entity::attempt};

/// Unfinished attempts held by each of `runners` (absent: none).
pub async fn held(txn: &impl ConnectionTrait, runners: &[Uuid]) -> Result<HashMap<Uuid, u32>> {
    let mut out = HashMap::new();
    for chunk in runners.chunks(500) {
        let counts: Vec<(Uuid, i64)> = attempt::Entity::find()
            .select_only()
            .column(attempt::Column::RunnerId)
            .column_as(attempt::Column::LeaseId.count(), "n")
            .filter(attempt::Column::RunnerId.is_in(chunk.iter().copied()))
            .filter(attempt::Column::FinishedAt.is_null())
            // A sandbox's commands run in the sandbox's slot.
            .filter(attempt::Column::ParentLease.is_null())
            .group_by(attempt::Column::RunnerId)
            .into_tuple()
            .all(txn)
            .await?;
        out.extend(
            counts
                .into_iter()
                .map(|(id, n)| (id, u32::try_from(n).unwrap_or(u32::MAX))),
        );
    }
    Ok(out)
}

/// How many more jobs a runner with `capacity` slots, holding `held`, may take when it asks
/// for `asked`.
pub fn room(capacity: u32, held: u32, asked: usize) -> usize {
    asked.min(usize::try_from(capacity.saturating_sub(held)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_never_exceeds_the_free_slots() {
        assert_eq!(room(4, 1, 10), 3);
        assert_eq!(room(4, 1, 2), 2);
        assert_eq!(room(4, 4, 1), 0);
        assert_eq!(room(4, 9, 1), 0);
    }
}
