//! Reports the server has not acknowledged yet, kept across reconnects and server restarts.
//!
//! Every attempt the runner holds has a queue here from its assignment until the server has
//! acknowledged its final status: that queue is also the runner's account of the leases it
//! holds (sent in `hello` and heartbeats). Reports get per-attempt sequence numbers 1, 2, 3 …;
//! a log chunk pushed behind an unsent chunk of the same stream is coalesced into it (the
//! merged report carries the higher sequence, as the protocol allows). The buffer is bounded:
//! log output waits for acknowledgements once `limit` bytes are outstanding, which in turn
//! stops reading the job's output (backpressure all the way to the job's pipe). Status,
//! phase and progress reports are small and never wait, and once the work is being stopped
//! its output no longer waits either, so a stop and the final status are never held up.
use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use gantry_proto as pb;
use tokio::sync::{Notify, watch};

use crate::executor::Stop;

/// Coalesced log reports stay below this size (the server takes up to 1 MiB per report).
const COALESCE_MAX: usize = 512 * 1024;
/// Bookkeeping bytes counted per report besides its log data.
const ENTRY_OVERHEAD: usize = 64;

/// The unacknowledged reports of every attempt the runner holds.
pub struct Outbox {
    state: Mutex<State>,
    /// Something new to send (or an attempt settled).
    changed: Notify,
    /// Acknowledgements freed space.
    space: Notify,
    limit: usize,
}

#[derive(Default)]
struct State {
    attempts: HashMap<String, Queue>,
    bytes: usize,
}

struct Queue {
    job_id: String,
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking an attempt (its lease is held from now on). Returns false when the
    /// lease is already held (a duplicate assignment), which changes nothing.
    pub fn open(&self, job_id: &str, lease_id: &str) -> bool {
        let mut state = self.lock();
        if state.attempts.contains_key(lease_id) {
            return false;
        }
        state.attempts.insert(
            lease_id.to_string(),
            Queue {
                job_id: job_id.to_string(),
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
                    *bytes += queue.push(lease_id, body);
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

    /// Unsent reports, marked sent, up to about `max_bytes` (at least one when any).
    pub fn take_unsent(&self, max_bytes: usize) -> Vec<pb::Report> {
        let mut state = self.lock();
        let mut out = Vec::new();
        let mut total = 0;
        for queue in state.attempts.values_mut() {
            for entry in queue.entries.iter_mut().filter(|e| !e.sent) {
                if total > 0 && total + entry.bytes > max_bytes {
                    return out;
                }
                entry.sent = true;
                total += entry.bytes;
                out.push(entry.report.clone());
            }
        }
        out
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

    /// The server no longer honours the attempt's lease: forget its reports. Returns whether
    /// it was held.
    pub fn drop_attempt(&self, lease_id: &str) -> bool {
        let mut state = self.lock();
        let State { attempts, bytes } = &mut *state;
        let Some(queue) = attempts.remove(lease_id) else {
            return false;
        };
        *bytes -= queue.entries.iter().map(|e| e.bytes).sum::<usize>();
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

    /// The leases the runner holds, for `hello` and heartbeats.
    pub fn held(&self) -> Vec<pb::LeaseRef> {
        self.lock()
            .attempts
            .iter()
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
    /// Appends (or coalesces) a report; returns the bytes it adds to the buffer.
    fn push(&mut self, lease_id: &str, body: pb::report::Body) -> usize {
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
            && old.data.len() + new.data.len() <= COALESCE_MAX
        {
            old.data.extend_from_slice(&new.data);
            last.report.sequence = sequence;
            last.bytes += new.data.len();
            return new.data.len();
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
        bytes
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
        let sent = o.take_unsent(usize::MAX);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].sequence, 2);
        assert!(matches!(&sent[0].body, Some(pb::report::Body::Log(l)) if l.data == b"abcd"));
        // Sent reports are never extended: the next chunk is a report of its own.
        assert!(o.push("l", log(4, "ef"), &mut no_stop()).await);
        let sent = o.take_unsent(usize::MAX);
        assert_eq!(sent.iter().map(|r| r.sequence).collect::<Vec<_>>(), [3]);
    }

    #[tokio::test]
    async fn acks_settle_a_finished_attempt_and_resend_repeats_the_rest() {
        let o = Outbox::new(1 << 20);
        o.open("j", "l");
        o.push("l", log(0, "ab"), &mut no_stop()).await;
        o.push("l", done(), &mut no_stop()).await;
        assert_eq!(o.take_unsent(usize::MAX).len(), 2);
        assert!(o.take_unsent(usize::MAX).is_empty());
        o.ack("l", 1);
        o.resend_all();
        let again = o.take_unsent(usize::MAX);
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
        o.take_unsent(usize::MAX);
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
            reason: crate::executor::StopReason::Cancel,
            grace: std::time::Duration::ZERO,
            message: String::new(),
        }));
        // No ack came, yet the output is queued.
        assert!(blocked.await.expect("push task"));
        assert_eq!(o.take_unsent(usize::MAX).len(), 1);
    }

    #[test]
    fn a_duplicate_assignment_changes_nothing() {
        let o = Outbox::new(100);
        assert!(o.open("j", "l"));
        assert!(!o.open("j", "l"));
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
}
