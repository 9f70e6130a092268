//! Following a job's output (`GetLogs`): a reader gets the chunks of an attempt in the order
//! they were stored, from given offsets, and (following) new ones as they arrive, into
//! retries when asked. Reads go to the database in pages bounded in bytes ([`PAGE_BYTES`]),
//! and what waits for the client is bounded too ([`OUT_BUFFER`] messages of at most
//! [`OUT_CHUNK_BYTES`]), so the server's memory does not grow with the number of readers
//! times the size of the log. How output is stored is [`crate::logs`].
use gantry_proto as pb;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::Expr,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::state;
use crate::{
    error::{Error, Result},
    signals::Follow,
    store::entity::{attempt, job, log_chunk},
};

/// Log bytes read from the database per page, at most (at least one chunk).
pub const PAGE_BYTES: i64 = 512 * 1024;
/// Chunks listed per page, at most.
const PAGE_ROWS: u64 = 512;
/// Largest `LogChunk` sent to a reader: stored chunks are split to this size.
pub const OUT_CHUNK_BYTES: usize = 64 * 1024;
/// Messages waiting for a reader.
pub const OUT_BUFFER: usize = 8;

/// Streams a job's output (see `GetLogs` in the proto). The receiver gets the chunks; an
/// error ends the stream.
pub fn follow(
    src: Follow,
    req: pb::GetLogsRequest,
    id: Uuid,
) -> mpsc::Receiver<Result<pb::LogChunk>> {
    src.spawn(OUT_BUFFER, move |src, tx| async move {
        send_logs(&src, &req, id, &tx).await
    })
}

/// One listed chunk, before its bytes are read.
struct Listed {
    id: i64,
    attempt: i32,
    stream: i32,
    offset: i64,
}

/// The next page of an attempt's chunks after `last_id`: listed first (no bytes), then the
/// bytes of as many as fit in [`PAGE_BYTES`] (at least one). Returns the chunks read (with
/// their bytes and storage time) and whether more may follow right away.
///
/// The listing reads only the columns stored before the bytes in a chunk's row (and the
/// bytes' length, which SQLite keeps in the row's header): a column stored after them would
/// make SQLite walk every listed chunk's overflow pages (51 ms instead of 1 ms for 512
/// chunks of 256 KiB).
async fn page(
    db: &DatabaseConnection,
    id: Uuid,
    number: i32,
    stream: i32,
    last_id: i64,
) -> Result<(Vec<(Listed, Vec<u8>, i64)>, bool)> {
    let mut q = log_chunk::Entity::find()
        .select_only()
        .column(log_chunk::Column::Id)
        .column(log_chunk::Column::Attempt)
        .column(log_chunk::Column::Stream)
        .column(log_chunk::Column::Offset)
        .column_as(Expr::cust("CAST(LENGTH(data) AS BIGINT)"), "len")
        .filter(log_chunk::Column::JobId.eq(id))
        .filter(log_chunk::Column::Attempt.eq(number))
        .filter(log_chunk::Column::Id.gt(last_id));
    if stream != 0 {
        q = q.filter(log_chunk::Column::Stream.eq(stream));
    }
    let listed: Vec<(i64, i32, i32, i64, i64)> = q
        .order_by_asc(log_chunk::Column::Id)
        .limit(PAGE_ROWS)
        .into_tuple()
        .all(db)
        .await?;
    let listed_count = listed.len();
    let full_list = listed_count as u64 == PAGE_ROWS;
    let mut budget = PAGE_BYTES;
    let mut take = Vec::new();
    for (id, attempt, stream, offset, len) in listed {
        if !take.is_empty() && budget < len {
            break;
        }
        budget -= len;
        take.push(Listed {
            id,
            attempt,
            stream,
            offset,
        });
    }
    // A page cut by the byte budget leaves listed chunks behind: read on at once.
    let more = full_list || take.len() < listed_count;
    if take.is_empty() {
        return Ok((Vec::new(), false));
    }
    let ids: Vec<i64> = take.iter().map(|l| l.id).collect();
    let mut bytes: std::collections::HashMap<i64, (Vec<u8>, i64)> = log_chunk::Entity::find()
        .select_only()
        .column(log_chunk::Column::Id)
        .column(log_chunk::Column::Data)
        .column(log_chunk::Column::At)
        .filter(log_chunk::Column::Id.is_in(ids))
        .into_tuple::<(i64, Vec<u8>, i64)>()
        .all(db)
        .await?
        .into_iter()
        .map(|(id, data, at)| (id, (data, at)))
        .collect();
    let read = take
        .into_iter()
        .map(|l| {
            let (data, at) = bytes.remove(&l.id).unwrap_or_default();
            (l, data, at)
        })
        .collect::<Vec<_>>();
    Ok((read, more))
}

async fn send_logs(
    src: &Follow,
    req: &pb::GetLogsRequest,
    id: Uuid,
    tx: &mpsc::Sender<Result<pb::LogChunk>>,
) -> Result<()> {
    let db = &src.db;
    let mut rx = src.hub.subscribe_jobs();
    // Attempt 0 asks for the latest attempt and, when following, for every later one too:
    // the stream then ends only when the job is terminal.
    let follow_retries = req.attempt == 0;
    let mut number = i32::try_from(req.attempt).unwrap_or(i32::MAX);
    let mut last_id: i64 = 0;
    // Offsets apply to the first attempt streamed; a later attempt starts at 0.
    let (mut stdout_from, mut stderr_from) = (req.stdout_offset, req.stderr_offset);
    // Set once the followed attempt has ended and all it wrote has been sent.
    let mut drained = false;
    loop {
        let job = job::Entity::find_by_id(id)
            .one(db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
        let terminal = state::is_terminal(state::status_of(job.status));
        if number == 0 {
            number = job.attempt_count;
        } else if drained && job.attempt_count > number {
            // Every byte of this attempt was sent and a retry started: follow it.
            number += 1;
            (stdout_from, stderr_from, last_id, drained) = (0, 0, 0, false);
        }
        if number == 0 {
            // No attempt yet.
            if !req.follow || terminal || !src.wait_for_job(&mut rx, id, tx).await {
                return Ok(());
            }
            continue;
        }
        if number > job.attempt_count {
            return Err(Error::invalid(
                "attempt",
                format!("job {id} has {} attempt(s)", job.attempt_count),
            ));
        }
        // Read whether the attempt ended *before* reading its chunks: if it had, the reads
        // that follow see everything it wrote.
        let ended = attempt::Entity::find()
            .filter(attempt::Column::JobId.eq(id))
            .filter(attempt::Column::Number.eq(number))
            .one(db)
            .await?
            .is_none_or(|a| a.finished_at.is_some());
        let (rows, more) = page(db, id, number, req.stream, last_id).await?;
        for (listed, data, at_unix_ms) in rows {
            last_id = listed.id;
            let from = if listed.stream == pb::LogStream::Stdout as i32 {
                stdout_from
            } else {
                stderr_from
            };
            let offset = u64::try_from(listed.offset).unwrap_or_default();
            let end = offset + data.len() as u64;
            if end <= from {
                continue;
            }
            let skip = usize::try_from(from.saturating_sub(offset)).unwrap_or(0);
            let mut at = offset + skip as u64;
            for piece in data[skip.min(data.len())..].chunks(OUT_CHUNK_BYTES) {
                let chunk = pb::LogChunk {
                    job_id: id.to_string(),
                    attempt: u32::try_from(listed.attempt).unwrap_or_default(),
                    stream: listed.stream,
                    offset: at,
                    data: piece.to_vec(),
                    at_unix_ms,
                };
                at += piece.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(()); // the reader left
                }
            }
        }
        if more {
            continue;
        }
        if !req.follow {
            return Ok(());
        }
        // The attempt is over and all it wrote was sent: done, unless following the job
        // into a later attempt — one that exists already (the job may have gone through it
        // to its end while this reader was behind), or one a retry will make.
        if ended && (!follow_retries || (terminal && job.attempt_count <= number)) {
            return Ok(());
        }
        if ended {
            drained = true;
            if job.attempt_count > number {
                continue; // the next attempt already exists
            }
        }
        if !src.wait_for_job(&mut rx, id, tx).await {
            return Ok(());
        }
    }
}
