//! Log storage: how a job's output is stored ([`plan`], pure; applied by
//! [`crate::jobs::lifecycle::Lifecycle::record_log`]). Reading it back is
//! [`crate::jobs::output`].
//!
//! Output is addressed by (job, attempt, stream, byte offset). A
//! chunk must start at or before the stream's stored end — a chunk starting past it would
//! leave a hole and is refused with INVALID_ARGUMENT naming the stored length; bytes already
//! stored are dropped (a resent report). A job stores at most `--max-log-bytes-per-job`
//! bytes, every attempt together: the chunk that reaches the limit is cut there and followed
//! by a marker line, the attempt is marked capped (with a `LimitReached` event), and later
//! output of the job is acknowledged and dropped.
use crate::error::{Error, Result};

/// Largest log chunk one report may carry.
pub const MAX_LOG_DATA_BYTES: usize = 1024 * 1024;

/// What to do with a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to store: every byte is already stored, or the job's log limit was reached.
    Drop,
    /// Store `take` bytes of the chunk from `skip`, at offset `at` of the stream; with
    /// `marker`, the limit is reached: the marker line follows them and the attempt is capped.
    Store {
        at: u64,
        skip: usize,
        take: usize,
        marker: bool,
    },
}

/// Decides how a chunk of `len` bytes at `offset` is stored, for a stream with `stored` bytes,
/// a job with `job_bytes` stored, a limit of `limit` bytes per job (0: none), and an attempt
/// already `capped`.
pub fn plan(
    stored: u64,
    offset: u64,
    len: usize,
    job_bytes: u64,
    limit: u64,
    capped: bool,
) -> Result<Plan> {
    if capped {
        return Ok(Plan::Drop);
    }
    if offset > stored {
        return Err(Error::invalid(
            "log.offset",
            format!(
                "{offset} is past the {stored} bytes stored for this stream: chunks must be contiguous"
            ),
        ));
    }
    let end = offset + len as u64;
    let skip = stored - offset;
    let fresh = end.saturating_sub(stored);
    let room = if limit == 0 {
        u64::MAX
    } else {
        limit.saturating_sub(job_bytes)
    };
    if fresh == 0 {
        return Ok(Plan::Drop); // already stored
    }
    let take = fresh.min(room);
    Ok(Plan::Store {
        at: stored,
        skip: usize::try_from(skip).unwrap_or(usize::MAX),
        take: usize::try_from(take).unwrap_or(usize::MAX),
        marker: take < fresh,
    })
}

/// The line that ends a log cut at the limit.
pub fn marker(limit: u64) -> Vec<u8> {
    format!(
        "\n[gantry: this job's output reached the limit of {limit} bytes; further output is not stored]\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_chunks_are_stored_and_repeats_dropped() {
        assert_eq!(
            plan(0, 0, 10, 0, 0, false).expect("ok"),
            Plan::Store {
                at: 0,
                skip: 0,
                take: 10,
                marker: false
            }
        );
        // Overlapping a stored part: only the new bytes.
        assert_eq!(
            plan(10, 5, 10, 10, 0, false).expect("ok"),
            Plan::Store {
                at: 10,
                skip: 5,
                take: 5,
                marker: false
            }
        );
        assert_eq!(plan(10, 0, 10, 10, 0, false).expect("ok"), Plan::Drop);
    }

    #[test]
    fn a_gap_is_refused_naming_the_stored_length() {
        match plan(10, 11, 1, 10, 0, false) {
            Err(Error::Invalid { field, rule }) => {
                assert_eq!(field, "log.offset");
                assert!(rule.contains("10 bytes stored"), "{rule}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_job_limit_cuts_the_chunk_that_reaches_it_and_drops_the_rest() {
        assert_eq!(
            plan(90, 90, 20, 90, 100, false).expect("ok"),
            Plan::Store {
                at: 90,
                skip: 0,
                take: 10,
                marker: true
            }
        );
        // Another stream of the same job, once the job is full: cut to nothing, marker only.
        assert_eq!(
            plan(0, 0, 5, 100, 100, false).expect("ok"),
            Plan::Store {
                at: 0,
                skip: 0,
                take: 0,
                marker: true
            }
        );
        assert_eq!(plan(0, 99, 5, 100, 100, true).expect("ok"), Plan::Drop);
    }
}
