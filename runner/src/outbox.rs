//! Reports the server has not acknowledged yet, kept across reconnects and server restarts.
//!
//! Every attempt the runner holds has a queue here from its assignment until the server has
//! acknowledged its final status: that queue is also the runner's account of the leases it
//! holds (sent in `hello` and heartbeats). Reports get per-attempt sequence numbers 1, 2, 3 …;
//! a log chunk pushed behind an unsent chunk of the same stream is coalesced into it (the
//! merged report carries the higher sequence, as the protocol allows), up to the server's
//! largest log report.
//!
//! The buffer is bounded, per kind of report:
//! - log output waits for acknowledgements once `limit` bytes are outstanding, which in turn
//!   stops reading the job's output (backpressure all the way to the job's pipe); once the
//!   work is being stopped its output no longer waits, so a stop and the final status are
//!   never held up;
//! - progress is bounded per attempt: at most [`MAX_UNSENT_PROGRESS`] unsent progress reports
//!   wait; past that the oldest unsent one is dropped for the newest (which takes the next
//!   sequence; the dropped one is never sent), so a job printing progress in a loop while
//!   the runner is cut off keeps a few reports, always including its latest, not one per
//!   line. A burst while connected is sent whole;
//! - status and phase reports never wait and are few per attempt by construction: RUNNING
//!   and one final status, and one report per executor phase (pulling … removing).
//!
//! When the server refuses a single report (see the agent) the outbox can drop that one
//! report, or mark it unsent to send it again.
//!
//! A sandbox's commands are attempts of their own (their own sequences and offsets), held
//! *within* the sandbox's lease: their leases are not listed in `held` (the server keeps
//! them alive with the sandbox's), and they are dropped with the sandbox's lease. The
//! agent finds a command's sandbox here ([`Outbox::within`]) to route a cancel to it.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use gantry_proto as pb;
use prost::Message as _;
use tokio::sync::{Notify, watch};

use crate::stop::Stop;

/// Coalesced log reports stay below this size (and below the server's largest log report).
const COALESCE_MAX: usize = 512 * 1024;
/// The server's largest `LogData.data` when its welcome does not say (1 MiB).
pub const DEFAULT_MAX_LOG_REPORT: usize = 1024 * 1024;
/// Unsent progress reports one attempt keeps at most (see the module comment).
pub const MAX_UNSENT_PROGRESS: usize = 16;
/// Bookkeeping bytes counted per report besides its log data.
const ENTRY_OVERHEAD: usize = 64;

/// The unacknowledged reports of every attempt the runner holds.
pub struct Outbox {
    state: Mutex<State>,
    /// Something new to send (or an attempt settled).
    changed: Notify,
    /// Acknowledgements freed space.
    space: Notify,
    /// Unacknowledged log bytes above which log output waits.
    limit: usize,
    /// The server's largest log report, in bytes (from its limits).
    max_log_report: AtomicUsize,
}

/// How much one batch of reports may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Encoded bytes of the reports inside the `ReportBatch` (each with its field tag and
    /// length); at least one report goes whatever its size.
    pub max_bytes: usize,
    /// Most reports.
    pub max_reports: usize,
}

impl Budget {
    /// No limit (tests, and callers that size nothing).
    pub const UNLIMITED: Budget = Budget {
        max_bytes: usize::MAX,
        max_reports: usize::MAX,
    };
}

#[derive(Default)]
struct State {
    attempts: HashMap<String, Queue>,
    bytes: usize,
}

struct Queue {
    job_id: String,
    /// The sandbox lease a command's queue is held within (`None`: a lease of its own).
    within: Option<String>,
    next_sequence: u64,
    entries: VecDeque<Entry>,
    /// The final status is queued: the attempt settles once everything is acknowledged.
    finished: bool,
}

struct Entry {
    report: pb::Report,
    sent: bool,
    bytes: usize,
}

fn size(body: &pb::report::Body) -> usize {
    ENTRY_OVERHEAD
        + match body {
            pb::report::Body::Log(l) => l.data.len(),
            _ => 0,
        }
}

fn is_final(body: &pb::report::Body) -> bool {
    matches!(body, pb::report::Body::Status(s) if s.status != pb::JobStatus::Running as i32)
}

impl Outbox {
    /// An outbox holding at most about `limit` bytes of unacknowledged log output.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            space: Notify::new(),
            limit,
            max_log_report: AtomicUsize::new(DEFAULT_MAX_LOG_REPORT),
        }
    }

    /// The server's largest log report (its `Limits.max_log_data_bytes`; 0: the default).
    pub fn set_max_log_report(&self, bytes: usize) {
        let bytes = if bytes == 0 {
            DEFAULT_MAX_LOG_REPORT
        } else {
            bytes
        };
        self.max_log_report.store(bytes, Ordering::Relaxed);
    }

    /// The largest log report the server takes, in bytes.
    pub fn max_log_report(&self) -> usize {
        self.max_log_report.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking an attempt (its lease is held from now on). Returns false when the
    /// lease is already held (a duplicate assignment), which changes nothing.
    pub fn open(&self, job_id: &str, lease_id: &str) -> bool {
        self.open_queue(job_id, lease_id, None)
    }

    /// Starts tracking a sandbox command's attempt, held within the sandbox's lease (not
    /// listed in [`Outbox::held`]; dropped with it). Returns false when the lease is already
    /// held (a command delivered again), which changes nothing.
    pub fn open_within(&self, sandbox_lease_id: &str, command_id: &str, lease_id: &str) -> bool {
        self.open_queue(command_id, lease_id, Some(sandbox_lease_id.to_string()))
    }

    fn open_queue(&self, job_id: &str, lease_id: &str, within: Option<String>) -> bool {
        let mut state = self.lock();
        if state.attempts.contains_key(lease_id) {
            return false;
        }
        state.attempts.insert(
            lease_id.to_string(),
            Queue {
                job_id: job_id.to_string(),
                within,
                next_sequence: 1,
                entries: VecDeque::new(),
                finished: false,
            },
        );
        true
    }

    /// Queues a report. Log output waits while the buffer is full, unless the work is being
    /// stopped (`stop` holds a request): its last output then goes in regardless, so that a
    /// stop is never held up by a server that does not acknowledge. Returns false when the
    /// attempt is no longer held (fenced by the server): the caller stops the work.
    pub async fn push(
        &self,
        lease_id: &str,
        body: pb::report::Body,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> bool {
        let is_log = matches!(body, pb::report::Body::Log(_));
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut state = self.lock();
                let full = state.bytes >= self.limit;
                let State { attempts, bytes } = &mut *state;
                let Some(queue) = attempts.get_mut(lease_id) else {
                    return false;
                };
                if !(is_log && full) || stop.borrow().is_some() {
                    *bytes += queue.push(lease_id, body, self.coalesce_max());
                    drop(state);
                    self.changed.notify_one();
                    return true;
                }
            }
            tokio::select! {
                _ = space => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        // Nobody can ask for a stop any more: wait for space alone.
                        self.space.notified().await;
                    }
                }
            }
        }
    }

    fn coalesce_max(&self) -> usize {
        COALESCE_MAX.min(self.max_log_report())
    }

    /// Queues a report at once, whatever the buffer holds (tests).
    #[cfg(test)]
    pub(crate) fn push_now(&self, lease_id: &str, body: pb::report::Body) -> bool {
        let max = self.coalesce_max();
        let mut state = self.lock();
        let State { attempts, bytes } = &mut *state;
        match attempts.get_mut(lease_id) {
            Some(queue) => {
                *bytes += queue.push(lease_id, body, max);
                true
            }
            None => false,
        }
    }

    /// Unsent reports, marked sent, within `budget` (at least one when any): each attempt's
    /// in sequence order.
    pub fn take_unsent(&self, budget: Budget) -> Vec<pb::Report> {
        let mut state = self.lock();
        let mut out = Vec::new();
        let mut total = 0;
        for queue in state.attempts.values_mut() {
            for entry in queue.entries.iter_mut().filter(|e| !e.sent) {
                // As a `repeated Report` field of the batch: tag, length, message.
                let len = entry.report.encoded_len();
                let cost = 1 + prost::length_delimiter_len(len) + len;
                if !out.is_empty()
                    && (total + cost > budget.max_bytes || out.len() >= budget.max_reports)
                {
                    return out;
                }
                entry.sent = true;
                total += cost;
                out.push(entry.report.clone());
            }
        }
        out
    }

    /// The sequence of the attempt's oldest report that was sent and is not acknowledged:
    /// the one a refusal of the attempt's reports is about (earlier ones were applied).
    pub fn first_sent(&self, lease_id: &str) -> Option<u64> {
        let state = self.lock();
        let queue = state.attempts.get(lease_id)?;
        queue
            .entries
            .iter()
            .find(|e| e.sent)
            .map(|e| e.report.sequence)
    }

    /// Whether the report was sent and is still waiting for its answer.
    pub fn awaits_ack(&self, lease_id: &str, sequence: u64) -> bool {
        let state = self.lock();
        state.attempts.get(lease_id).is_some_and(|q| {
            q.entries
                .iter()
                .any(|e| e.sent && e.report.sequence == sequence)
        })
    }

    /// Forgets one report the server will never take (it is malformed); the attempt and the
    /// rest of its reports stay. Returns whether it was there.
    pub fn drop_report(&self, lease_id: &str, sequence: u64) -> bool {
        let mut state = self.lock();
        let State { attempts, bytes } = &mut *state;
        let Some(queue) = attempts.get_mut(lease_id) else {
            return false;
        };
        let Some(at) = queue
            .entries
            .iter()
            .position(|e| e.report.sequence == sequence)
        else {
            return false;
        };
        if let Some(e) = queue.entries.remove(at) {
            *bytes -= e.bytes;
        }
        if queue.finished && queue.entries.is_empty() {
            attempts.remove(lease_id);
        }
        drop(state);
        self.space.notify_waiters();
        self.changed.notify_one();
        true
    }

    /// The server did not apply a sent report (through no fault of its own): send it again.
    /// Returns whether it was there.
    pub fn mark_unsent(&self, lease_id: &str, sequence: u64) -> bool {
        let mut state = self.lock();
        let Some(entry) = state
            .attempts
            .get_mut(lease_id)
            .and_then(|q| q.entries.iter_mut().find(|e| e.report.sequence == sequence))
        else {
            return false;
        };
        entry.sent = false;
        drop(state);
        self.changed.notify_one();
        true
    }

    /// After a reconnect: everything unacknowledged is to be sent again.
    pub fn resend_all(&self) {
        let mut state = self.lock();
        for queue in state.attempts.values_mut() {
            for entry in &mut queue.entries {
                entry.sent = false;
            }
        }
        drop(state);
        self.changed.notify_one();
    }

    /// The server stored every report of the attempt up to `sequence`.
    pub fn ack(&self, lease_id: &str, sequence: u64) {
        let mut state = self.lock();
        let State { attempts, bytes } = &mut *state;
        let Some(queue) = attempts.get_mut(lease_id) else {
            return;
        };
        while queue
            .entries
            .front()
            .is_some_and(|e| e.report.sequence <= sequence)
        {
            if let Some(e) = queue.entries.pop_front() {
                *bytes -= e.bytes;
            }
        }
        let settled = queue.finished && queue.entries.is_empty();
        if settled {
            attempts.remove(lease_id);
        }
        drop(state);
        self.space.notify_waiters();
        if settled {
            self.changed.notify_one();
        }
    }

    /// The server no longer honours the attempt's lease: forget its reports, and those of
    /// the commands held within it (even once the sandbox's own reports are settled).
    /// Returns whether anything was held.
    pub fn drop_attempt(&self, lease_id: &str) -> bool {
        let mut state = self.lock();
        let State { attempts, bytes } = &mut *state;
        let held = attempts.remove(lease_id);
        let mut freed: usize = held
            .iter()
            .flat_map(|q| q.entries.iter())
            .map(|e| e.bytes)
            .sum();
        let before = attempts.len();
        attempts.retain(|_, q| {
            let inside = q.within.as_deref() == Some(lease_id);
            if inside {
                freed += q.entries.iter().map(|e| e.bytes).sum::<usize>();
            }
            !inside
        });
        if held.is_none() && attempts.len() == before {
            return false;
        }
        *bytes -= freed;
        drop(state);
        self.space.notify_waiters();
        self.changed.notify_one();
        true
    }

    /// Whether any report of the attempt is still unacknowledged, or its final status is
    /// still to come.
    pub fn holds(&self, lease_id: &str) -> bool {
        self.lock().attempts.contains_key(lease_id)
    }

    /// The sandbox lease a command's lease is held within, while its queue is open.
    pub fn within(&self, lease_id: &str) -> Option<String> {
        self.lock().attempts.get(lease_id)?.within.clone()
    }

    /// Every lease with reports still to come or unacknowledged, commands' included.
    pub fn leases(&self) -> Vec<String> {
        self.lock().attempts.keys().cloned().collect()
    }

    /// The leases the runner holds, for `hello` and heartbeats (commands' leases are held
    /// within their sandbox's, and not listed).
    pub fn held(&self) -> Vec<pb::LeaseRef> {
        self.lock()
            .attempts
            .iter()
            .filter(|(_, q)| q.within.is_none())
            .map(|(lease, q)| pb::LeaseRef {
                job_id: q.job_id.clone(),
                lease_id: lease.clone(),
            })
            .collect()
    }

    /// Whether no attempt is held and nothing is unacknowledged.
    pub fn is_empty(&self) -> bool {
        self.lock().attempts.is_empty()
    }

    /// Waits until something changes (a report is queued, an attempt settles).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

impl Queue {
    /// Appends (or coalesces) a report; returns the bytes it adds to the buffer (negative
    /// changes never happen: a replaced progress report is the same size as its successor).
    /// `coalesce_max`: the largest log report a coalesced chunk may grow to.
    fn push(&mut self, lease_id: &str, body: pb::report::Body, coalesce_max: usize) -> usize {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        if is_final(&body) {
            self.finished = true;
        }
        if let (pb::report::Body::Log(new), Some(last)) = (&body, self.entries.back_mut())
            && !last.sent
            && let Some(pb::report::Body::Log(old)) = &mut last.report.body
            && old.stream == new.stream
            && old.offset + old.data.len() as u64 == new.offset
            && old.data.len() + new.data.len() <= coalesce_max
        {
            old.data.extend_from_slice(&new.data);
            last.report.sequence = sequence;
            last.bytes += new.data.len();
            return new.data.len();
        }
        let mut freed = 0;
        let unsent_progress =
            |e: &Entry| !e.sent && matches!(e.report.body, Some(pb::report::Body::Progress(_)));
        if matches!(body, pb::report::Body::Progress(_))
            && self.entries.iter().filter(|e| unsent_progress(e)).count() >= MAX_UNSENT_PROGRESS
            && let Some(at) = self.entries.iter().position(unsent_progress)
            && let Some(old) = self.entries.remove(at)
        {
            // The newest progress supersedes the oldest waiting one; it goes last, so that
            // sequences stay in order in the queue.
            freed = old.bytes;
        }
        let bytes = size(&body);
        self.entries.push_back(Entry {
            report: pb::Report {
                job_id: self.job_id.clone(),
                lease_id: lease_id.to_string(),
                sequence,
                body: Some(body),
            },
            sent: false,
            bytes,
        });
        bytes - freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(offset: u64, data: &str) -> pb::report::Body {
        pb::report::Body::Log(pb::LogData {
            stream: pb::LogStream::Stdout as i32,
            offset,
            data: data.as_bytes().to_vec(),
        })
    }

    fn done() -> pb::report::Body {
        pb::report::Body::Status(pb::StatusReport {
            status: pb::JobStatus::Succeeded as i32,
            exit_code: Some(0),
            ..Default::default()
        })
    }

    fn no_stop() -> watch::Receiver<Option<Stop>> {
        watch::channel(None).1
    }

    #[tokio::test]
    async fn unsent_log_chunks_coalesce_under_the_highest_sequence() {
        let o = Outbox::new(1 << 20);
        o.open("j", "l");
        assert!(o.push("l", log(0, "ab"), &mut no_stop()).await);
        assert!(o.push("l", log(2, "cd"), &mut no_stop()).await);
        let sent = o.take_unsent(Budget::UNLIMITED);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].sequence, 2);
        assert!(matches!(&sent[0].body, Some(pb::report::Body::Log(l)) if l.data == b"abcd"));
        // Sent reports are never extended: the next chunk is a report of its own.
        assert!(o.push("l", log(4, "ef"), &mut no_stop()).await);
        let sent = o.take_unsent(Budget::UNLIMITED);
        assert_eq!(sent.iter().map(|r| r.sequence).collect::<Vec<_>>(), [3]);
    }

    #[tokio::test]
    async fn acks_settle_a_finished_attempt_and_resend_repeats_the_rest() {
        let o = Outbox::new(1 << 20);
        o.open("j", "l");
        o.push("l", log(0, "ab"), &mut no_stop()).await;
        o.push("l", done(), &mut no_stop()).await;
        assert_eq!(o.take_unsent(Budget::UNLIMITED).len(), 2);
        assert!(o.take_unsent(Budget::UNLIMITED).is_empty());
        o.ack("l", 1);
        o.resend_all();
        let again = o.take_unsent(Budget::UNLIMITED);
        assert_eq!(again.iter().map(|r| r.sequence).collect::<Vec<_>>(), [2]);
        assert_eq!(o.held().len(), 1);
        o.ack("l", 2);
        assert!(o.is_empty());
    }

    #[tokio::test]
    async fn a_full_buffer_holds_log_output_until_acknowledged() {
        let o = std::sync::Arc::new(Outbox::new(100));
        o.open("j", "l");
        assert!(o.push("l", log(0, &"x".repeat(200)), &mut no_stop()).await);
        o.take_unsent(Budget::UNLIMITED);
        let o2 = o.clone();
        let blocked =
            tokio::spawn(async move { o2.push("l", log(200, "y"), &mut no_stop()).await });
        // Status reports still get in while logs wait.
        assert!(o.push("l", done(), &mut no_stop()).await);
        assert!(!blocked.is_finished());
        o.ack("l", 1);
        assert!(blocked.await.expect("push task"));
    }

    #[tokio::test]
    async fn a_stop_lets_log_output_past_a_full_buffer() {
        let o = std::sync::Arc::new(Outbox::new(100));
        o.open("j", "l");
        assert!(o.push("l", log(0, &"x".repeat(200)), &mut no_stop()).await);
        let (stop_tx, mut stop_rx) = watch::channel(None);
        let o2 = o.clone();
        let blocked = tokio::spawn(async move { o2.push("l", log(200, "y"), &mut stop_rx).await });
        stop_tx.send_replace(Some(Stop {
            reason: crate::stop::StopReason::Cancel,
            grace: std::time::Duration::ZERO,
            message: String::new(),
        }));
        // No ack came, yet the output is queued.
        assert!(blocked.await.expect("push task"));
        assert_eq!(o.take_unsent(Budget::UNLIMITED).len(), 1);
    }

    #[test]
    fn a_duplicate_assignment_changes_nothing() {
        let o = Outbox::new(100);
        assert!(o.open("j", "l"));
        assert!(!o.open("j", "l"));
    }

    fn progress(percent: u32) -> pb::report::Body {
        pb::report::Body::Progress(pb::Progress {
            percent,
            ..Default::default()
        })
    }

    fn bodies(reports: &[pb::Report]) -> Vec<(u64, &'static str)> {
        reports
            .iter()
            .map(|r| {
                let kind = match &r.body {
                    Some(pb::report::Body::Progress(_)) => "progress",
                    Some(pb::report::Body::Log(_)) => "log",
                    Some(pb::report::Body::Status(_)) => "status",
                    Some(pb::report::Body::Phase(_)) => "phase",
                    None => "none",
                };
                (r.sequence, kind)
            })
            .collect()
    }

    #[tokio::test]
    async fn progress_while_cut_off_keeps_a_few_unsent_reports_per_attempt_and_the_latest() {
        let o = Outbox::new(1 << 20);
        for lease in ["a", "b"] {
            o.open("j", lease);
            o.push(lease, log(0, "started\n"), &mut no_stop()).await;
        }
        for i in 0..100_000u32 {
            let lease = if i % 2 == 0 { "a" } else { "b" };
            assert!(o.push(lease, progress(i % 101), &mut no_stop()).await);
        }
        let unsent = o.take_unsent(Budget::UNLIMITED);
        for lease in ["a", "b"] {
            let progress: Vec<_> = unsent
                .iter()
                .filter(|r| r.lease_id == lease)
                .filter(|r| matches!(r.body, Some(pb::report::Body::Progress(_))))
                .collect();
            assert_eq!(progress.len(), MAX_UNSENT_PROGRESS, "{lease}");
            // The latest is among them, under the latest sequence.
            assert_eq!(progress.last().map(|r| r.sequence), Some(50_001));
        }
        assert_eq!(unsent.len(), 2 * (1 + MAX_UNSENT_PROGRESS));
    }

    #[tokio::test]
    async fn newer_progress_replaces_only_unsent_progress_and_keeps_sequences_in_order() {
        let o = Outbox::new(1 << 20);
        o.open("j", "l");
        o.push("l", progress(10), &mut no_stop()).await;
        assert_eq!(bodies(&o.take_unsent(Budget::UNLIMITED)), [(1, "progress")]);
        // A burst below the bound is kept whole.
        o.push("l", progress(20), &mut no_stop()).await;
        o.push("l", log(0, "x"), &mut no_stop()).await;
        o.push("l", progress(30), &mut no_stop()).await;
        assert_eq!(
            bodies(&o.take_unsent(Budget::UNLIMITED)),
            [(2, "progress"), (3, "log"), (4, "progress")]
        );
        // Past the bound, the oldest unsent progress goes; sent progress stays (it may be
        // applied already).
        for p in 0..MAX_UNSENT_PROGRESS as u32 + 1 {
            o.push("l", progress(p), &mut no_stop()).await;
        }
        let fresh = o.take_unsent(Budget::UNLIMITED);
        assert_eq!(fresh.len(), MAX_UNSENT_PROGRESS);
        assert_eq!(fresh.first().map(|r| r.sequence), Some(6));
        o.resend_all();
        let again = o.take_unsent(Budget::UNLIMITED);
        assert_eq!(
            &bodies(&again)[..4],
            [
                (1, "progress"),
                (2, "progress"),
                (3, "log"),
                (4, "progress")
            ]
        );
        let last = again.last().map(|r| r.sequence).unwrap_or_default();
        o.ack("l", last);
        assert!(o.take_unsent(Budget::UNLIMITED).is_empty());
    }

    #[tokio::test]
    async fn a_malformed_report_is_dropped_and_an_unapplied_one_is_sent_again() {
        let o = Outbox::new(1 << 20);
        o.open("j", "l");
        o.push("l", log(0, "ab"), &mut no_stop()).await;
        o.push("l", log(10, "cd"), &mut no_stop()).await;
        o.push("l", done(), &mut no_stop()).await;
        assert_eq!(o.take_unsent(Budget::UNLIMITED).len(), 3);
        // The first was refused as malformed, the later ones were not applied.
        assert_eq!(o.first_sent("l"), Some(1));
        assert!(o.drop_report("l", 1));
        assert_eq!(o.first_sent("l"), Some(2));
        assert!(o.mark_unsent("l", 2));
        assert_eq!(o.first_sent("l"), Some(3));
        assert!(o.mark_unsent("l", 3));
        assert_eq!(o.first_sent("l"), None);
        assert!(!o.awaits_ack("l", 2));
        let again = o.take_unsent(Budget::UNLIMITED);
        assert_eq!(bodies(&again), [(2, "log"), (3, "status")]);
        assert!(o.awaits_ack("l", 2));
        o.ack("l", 3);
        assert!(o.is_empty());
        // Dropping the final report of a finished attempt settles it.
        o.open("j", "m");
        o.push("m", done(), &mut no_stop()).await;
        assert!(o.drop_report("m", 1));
        assert!(o.is_empty());
        assert!(!o.drop_report("m", 1));
    }

    #[test]
    fn batches_keep_to_their_budget_but_always_carry_one_report() {
        let o = Outbox::new(usize::MAX);
        o.open("j", "l");
        for i in 0..10u64 {
            o.push_now("l", log(i * 100, &"x".repeat(50)));
        }
        let one = o.take_unsent(Budget {
            max_bytes: 1,
            max_reports: usize::MAX,
        });
        assert_eq!(one.len(), 1);
        let three = o.take_unsent(Budget {
            max_bytes: usize::MAX,
            max_reports: 3,
        });
        assert_eq!(three.len(), 3);
        let size = |r: &pb::Report| {
            let len = r.encoded_len();
            1 + prost::length_delimiter_len(len) + len
        };
        // The next two are the same size as the last one taken (offsets of the same width).
        let budget = 2 * size(&three[2]) + 1;
        assert_eq!(
            o.take_unsent(Budget {
                max_bytes: budget,
                max_reports: usize::MAX
            })
            .len(),
            2
        );
    }

    #[test]
    fn coalesced_log_reports_stay_within_the_servers_largest_log_report() {
        let o = Outbox::new(usize::MAX);
        o.set_max_log_report(100);
        o.open("j", "l");
        for i in 0..10u64 {
            o.push_now("l", log(i * 30, &"x".repeat(30)));
        }
        let sent = o.take_unsent(Budget::UNLIMITED);
        assert!(sent.len() >= 4, "{}", sent.len());
        for r in &sent {
            let Some(pb::report::Body::Log(l)) = &r.body else {
                panic!("not a log report");
            };
            assert!(l.data.len() <= 100, "{}", l.data.len());
        }
        o.set_max_log_report(0);
        assert_eq!(o.max_log_report(), DEFAULT_MAX_LOG_REPORT);
    }

    #[tokio::test]
    async fn a_dropped_attempt_refuses_further_reports() {
        let o = Outbox::new(1 << 20);
        o.open("j", "l");
        o.push("l", log(0, "ab"), &mut no_stop()).await;
        assert!(o.drop_attempt("l"));
        assert!(!o.push("l", log(2, "cd"), &mut no_stop()).await);
        assert!(o.is_empty());
    }

    #[tokio::test]
    async fn a_sandboxs_commands_are_held_within_its_lease_and_dropped_with_it() {
        let o = Outbox::new(1 << 20);
        o.open("sandbox", "s");
        assert!(o.open_within("s", "command-1", "c1"));
        assert!(!o.open_within("s", "command-1", "c1"), "delivered again");
        o.open("job", "j");
        // Only the sandbox's and the job's leases are listed; the command reports on its own.
        let mut held: Vec<String> = o.held().into_iter().map(|l| l.lease_id).collect();
        held.sort();
        assert_eq!(held, ["j", "s"]);
        assert_eq!(o.within("c1").as_deref(), Some("s"));
        assert_eq!(o.within("j"), None);
        assert!(o.push("c1", log(0, "out"), &mut no_stop()).await);
        let sent = o.take_unsent(Budget::UNLIMITED);
        assert!(
            matches!(&sent[..], [r] if r.job_id == "command-1" && r.lease_id == "c1" && r.sequence == 1)
        );
        // The sandbox's own reports settle; the command's are still held, and go with the
        // sandbox's lease.
        o.push("s", done(), &mut no_stop()).await;
        o.ack("s", 1);
        assert!(!o.holds("s"));
        assert!(o.leases().contains(&"c1".to_string()));
        assert!(o.drop_attempt("s"));
        assert!(!o.holds("c1"));
        assert!(o.holds("j"));
        assert!(!o.drop_attempt("s"));
    }
}
