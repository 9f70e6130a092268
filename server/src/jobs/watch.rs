//! Following a job's events (`WatchJob`): the stored events after a sequence, then, when
//! following, new ones as they are appended, until the job is terminal and every event has
//! been sent. Reads go in pages; what waits for the client is bounded.
use gantry_proto as pb;
use prost::Message;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    signals::Follow,
    store::entity::{event, job},
};

use super::state::{is_terminal, status_of};

/// Events per database read.
const EVENT_PAGE: u64 = 500;
/// Events waiting for a reader.
pub const OUT_BUFFER: usize = 64;

/// Streams a job's events (see `WatchJob` in the proto). The receiver gets the events; an
/// error ends the stream.
pub fn follow(
    src: Follow,
    req: pb::WatchJobRequest,
    id: Uuid,
) -> mpsc::Receiver<Result<pb::JobEvent>> {
    src.spawn(OUT_BUFFER, move |src, tx| async move {
        send_events(&src, &req, id, &tx).await
    })
}

async fn send_events(
    src: &Follow,
    req: &pb::WatchJobRequest,
    id: Uuid,
    tx: &mpsc::Sender<Result<pb::JobEvent>>,
) -> Result<()> {
    // Subscribed before the first read, so no change between read and wait is missed.
    let mut rx = src.hub.subscribe_jobs();
    let mut after = i64::try_from(req.after_sequence).unwrap_or(i64::MAX);
    loop {
        let rows = event::Entity::find()
            .filter(event::Column::JobId.eq(id))
            .filter(event::Column::Seq.gt(after))
            .order_by_asc(event::Column::Seq)
            .limit(EVENT_PAGE)
            .all(&src.db)
            .await?;
        let full_page = rows.len() as u64 == EVENT_PAGE;
        for row in rows {
            after = row.seq;
            if tx
                .send(Ok(pb::JobEvent::decode(row.body.as_slice())?))
                .await
                .is_err()
            {
                return Ok(()); // the client left
            }
        }
        if full_page {
            continue;
        }
        if !req.follow {
            return Ok(());
        }
        let job = job::Entity::find_by_id(id)
            .one(&src.db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
        if is_terminal(status_of(job.status)) && after >= job.event_seq {
            return Ok(());
        }
        if !src.wait_for_job(&mut rx, id, tx).await {
            return Ok(());
        }
    }
}
