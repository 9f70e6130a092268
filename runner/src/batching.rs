//! How many reports go into one `ReportBatch`, and what the runner learns from a session the
//! server ended because of what it sent.
//!
//! A batch is sized by the server's [`pb::Limits`] (from the welcome): its encoded size stays
//! below `max_message_bytes`, with headroom for the `SessionRequest` around it (1 MiB, as
//! before, when the server says nothing or allows more). The server ends a session whose
//! message it cannot take: RESOURCE_EXHAUSTED (too large) or INVALID_ARGUMENT (it could not
//! decode it, e.g. invalid UTF-8 in a string). Resending the same batch would end the next
//! session the same way, forever; so after such an end the runner shrinks its batches
//! (halving the byte budget for RESOURCE_EXHAUSTED, one report per batch at once for
//! INVALID_ARGUMENT). In one-report mode the runner sends the next report only once the
//! previous one is answered, so when a session ends again it knows the one report at fault:
//! it drops that report (the agent logs it) and carries on. After a while of sessions that
//! went well, batching returns to normal.
//!
//! Pure bookkeeping: the caller passes the time and says what is still unanswered.
use std::time::Duration;

use gantry_proto as pb;
use tokio::time::Instant;

use crate::outbox::Budget;

/// Report bytes in one batch when the server allows at least that much (today's size).
pub const BATCH_BYTES: usize = 1024 * 1024;
/// Room left under the server's message limit for the `SessionRequest` and `ReportBatch`
/// envelope (a few bytes) and anything the server counts besides.
const ENVELOPE_HEADROOM: usize = 1024;
/// Below this byte budget, halving stops and batches carry one report each.
const MIN_BATCH_BYTES: usize = 4 * 1024;
/// A reduced batch size returns to normal after this long on a session that the server
/// did not end for what was sent.
pub const RECOVER_AFTER: Duration = Duration::from_secs(60);

/// A report named by its attempt and sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportRef {
    /// Job id (for the log).
    pub job_id: String,
    /// Lease id of the attempt.
    pub lease_id: String,
    /// The report's sequence.
    pub sequence: u64,
}

/// Why the server ended a session because of a message the runner sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// RESOURCE_EXHAUSTED: a message was larger than the server takes.
    TooLarge,
    /// INVALID_ARGUMENT: the server could not decode a message.
    Undecodable,
}

/// The batch size the runner uses now.
#[derive(Debug)]
pub struct Batching {
    /// The byte budget the server's limits allow (or the default).
    normal_bytes: usize,
    /// Most reports per batch the server allows.
    max_reports: usize,
    /// How often the byte budget was halved since batching was last normal (the server
    /// refused a batch as too large).
    halvings: u32,
    /// One report per batch, each answered before the next is sent: the next refusal then
    /// names the report at fault.
    single: bool,
    /// The report sent in one-report mode and not yet answered.
    in_flight: Option<ReportRef>,
    /// When a reduced size returns to normal (set when a session opens while reduced).
    recover_at: Option<Instant>,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            normal_bytes: BATCH_BYTES,
            max_reports: usize::MAX,
            halvings: 0,
            single: false,
            in_flight: None,
            recover_at: None,
        }
    }
}

impl Batching {
    /// Sizes batches by the server's limits (absent or zero fields: the defaults).
    pub fn set_limits(&mut self, limits: Option<&pb::Limits>) {
        let (bytes, reports) = limits.map_or((0, 0), |l| {
            (
                l.max_message_bytes as usize,
                l.max_reports_per_call as usize,
            )
        });
        self.normal_bytes = match bytes {
            0 => BATCH_BYTES,
            b => BATCH_BYTES.min(b.saturating_sub(ENVELOPE_HEADROOM).max(1)),
        };
        self.max_reports = if reports == 0 { usize::MAX } else { reports };
    }

    /// The byte budget now.
    fn bytes(&self) -> usize {
        self.normal_bytes
            .checked_shr(self.halvings)
            .unwrap_or(0)
            .max(1)
    }

    /// Whether batching is reduced (after a refusal).
    pub fn reduced(&self) -> bool {
        self.single || self.halvings > 0
    }

    /// Whether batches carry one report each, answered one at a time.
    pub fn single(&self) -> bool {
        self.single
    }

    /// A session opened: a reduced size counts its recovery from now.
    pub fn session_opened(&mut self, now: Instant) {
        self.in_flight = None;
        self.recover_at = self.reduced().then(|| now + RECOVER_AFTER);
    }

    /// The budget of the next batch, or `None` while a one-report batch awaits its answer
    /// (`awaited`: whether the server has not answered that report yet). Returns to normal
    /// batching once the recovery time has passed.
    pub fn budget(&mut self, now: Instant, awaited: impl Fn(&ReportRef) -> bool) -> Option<Budget> {
        if self.recover_at.is_some_and(|at| now >= at) {
            tracing::info!("back to normal report batches");
            self.recover();
        }
        if let Some(r) = &self.in_flight {
            if awaited(r) {
                return None;
            }
            self.in_flight = None;
        }
        Some(Budget {
            max_bytes: self.bytes(),
            max_reports: if self.single { 1 } else { self.max_reports },
        })
    }

    /// A batch was sent (in one-report mode, its report is awaited before the next).
    pub fn sent(&mut self, reports: &[pb::Report]) {
        if self.single
            && let [r] = reports
        {
            self.in_flight = Some(ReportRef {
                job_id: r.job_id.clone(),
                lease_id: r.lease_id.clone(),
                sequence: r.sequence,
            });
        }
    }

    /// The server ended the session for what the runner sent. Returns the report at fault
    /// when it is known (a one-report batch still unanswered): the caller drops it. Otherwise
    /// batches shrink for what follows.
    pub fn refused(
        &mut self,
        why: Refusal,
        awaited: impl Fn(&ReportRef) -> bool,
    ) -> Option<ReportRef> {
        self.recover_at = None;
        if let Some(culprit) = self.in_flight.take().filter(|r| self.single && awaited(r)) {
            return Some(culprit);
        }
        match why {
            Refusal::TooLarge => {
                self.halvings = self.halvings.saturating_add(1);
                if self.bytes() < MIN_BATCH_BYTES {
                    self.single = true;
                }
            }
            Refusal::Undecodable => self.single = true,
        }
        None
    }

    fn recover(&mut self) {
        self.halvings = 0;
        self.single = false;
        self.in_flight = None;
        self.recover_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;

    fn report(lease: &str, sequence: u64) -> pb::Report {
        pb::Report {
            job_id: "j".into(),
            lease_id: lease.into(),
            sequence,
            body: None,
        }
    }

    fn nothing_awaited(_: &ReportRef) -> bool {
        false
    }

    #[test]
    fn batches_are_sized_by_the_servers_limits_or_the_defaults() {
        let mut b = Batching::default();
        let now = Instant::now();
        assert_eq!(
            b.budget(now, nothing_awaited).map(|b| b.max_bytes),
            Some(BATCH_BYTES)
        );
        b.set_limits(Some(&pb::Limits {
            max_message_bytes: 64 * 1024,
            max_reports_per_call: 10,
            ..Default::default()
        }));
        let budget = b.budget(now, nothing_awaited).expect("a budget");
        assert!(budget.max_bytes < 64 * 1024);
        assert_eq!(budget.max_reports, 10);
        // A server that allows more still gets today's batches.
        b.set_limits(Some(&pb::Limits {
            max_message_bytes: 64 * 1024 * 1024,
            ..Default::default()
        }));
        assert_eq!(
            b.budget(now, nothing_awaited).map(|b| b.max_bytes),
            Some(BATCH_BYTES)
        );
        b.set_limits(None);
        assert_eq!(
            b.budget(now, nothing_awaited).map(|b| b.max_reports),
            Some(usize::MAX)
        );
    }

    #[test]
    fn an_encoded_batch_stays_below_the_servers_message_limit() {
        let outbox = Outbox::new(usize::MAX);
        outbox.open("j", "l");
        for i in 0..200u64 {
            // Not contiguous, so never coalesced: 200 reports of 1000 bytes.
            outbox.push_now(
                "l",
                pb::report::Body::Log(pb::LogData {
                    stream: pb::LogStream::Stdout as i32,
                    offset: i * 10_000,
                    data: vec![b'x'; 1000],
                }),
            );
        }
        let limit = 20_000;
        let mut b = Batching::default();
        b.set_limits(Some(&pb::Limits {
            max_message_bytes: limit,
            ..Default::default()
        }));
        let mut batches = 0;
        loop {
            let budget = b.budget(Instant::now(), nothing_awaited).expect("a budget");
            let reports = outbox.take_unsent(budget);
            if reports.is_empty() {
                break;
            }
            batches += 1;
            let message = pb::SessionRequest {
                kind: Some(pb::session_request::Kind::Reports(pb::ReportBatch {
                    reports,
                })),
            };
            assert!(
                prost::Message::encoded_len(&message) < limit as usize,
                "{}",
                prost::Message::encoded_len(&message)
            );
        }
        assert!(batches > 5, "{batches}");
    }

    #[test]
    fn too_large_halves_the_budget_down_to_one_report_then_drops_the_report_at_fault() {
        let mut b = Batching::default();
        let now = Instant::now();
        assert_eq!(b.refused(Refusal::TooLarge, nothing_awaited), None);
        assert_eq!(
            b.budget(now, nothing_awaited).map(|b| b.max_bytes),
            Some(BATCH_BYTES / 2)
        );
        let mut rounds = 1;
        while !b.single() {
            assert_eq!(b.refused(Refusal::TooLarge, nothing_awaited), None);
            rounds += 1;
        }
        assert!(rounds <= 10, "{rounds}");
        let budget = b.budget(now, nothing_awaited).expect("a budget");
        assert_eq!(budget.max_reports, 1);
        // The one report sent is awaited before the next goes.
        b.sent(&[report("l", 7)]);
        assert_eq!(b.budget(now, |_| true), None);
        // The session ends again while it is unanswered: that report is at fault.
        let culprit = b
            .refused(Refusal::TooLarge, |_| true)
            .expect("the report at fault");
        assert_eq!((culprit.lease_id.as_str(), culprit.sequence), ("l", 7));
        assert!(
            b.budget(now, |_| true).is_some(),
            "nothing in flight any more"
        );
    }

    #[test]
    fn undecodable_switches_to_one_report_then_drops_the_report_at_fault() {
        let mut b = Batching::default();
        let now = Instant::now();
        b.sent(&[report("l", 1), report("l", 2)]);
        assert_eq!(b.refused(Refusal::Undecodable, |_| true), None);
        b.session_opened(now);
        assert_eq!(
            b.budget(now, nothing_awaited).map(|b| b.max_reports),
            Some(1)
        );
        b.sent(&[report("l", 2)]);
        // Answered: the next goes.
        assert!(b.budget(now, nothing_awaited).is_some());
        b.sent(&[report("m", 3)]);
        assert_eq!(
            b.refused(Refusal::Undecodable, |_| true)
                .map(|r| r.sequence),
            Some(3)
        );
        // An answered report is not blamed.
        b.sent(&[report("m", 4)]);
        assert_eq!(b.refused(Refusal::Undecodable, nothing_awaited), None);
    }

    #[test]
    fn normal_batching_returns_after_a_while_of_success() {
        let mut b = Batching::default();
        let t0 = Instant::now();
        b.refused(Refusal::Undecodable, nothing_awaited);
        b.refused(Refusal::TooLarge, nothing_awaited);
        b.session_opened(t0);
        assert!(b.reduced());
        assert_eq!(
            b.budget(t0 + RECOVER_AFTER / 2, nothing_awaited)
                .map(|b| b.max_reports),
            Some(1)
        );
        // A session that ends for what was sent restarts the count at the next session.
        b.refused(Refusal::Undecodable, nothing_awaited);
        assert_eq!(
            b.budget(t0 + RECOVER_AFTER, nothing_awaited)
                .map(|b| b.max_reports),
            Some(1)
        );
        let t1 = t0 + RECOVER_AFTER;
        b.session_opened(t1);
        let budget = b
            .budget(t1 + RECOVER_AFTER, nothing_awaited)
            .expect("a budget");
        assert_eq!(
            (budget.max_bytes, budget.max_reports),
            (BATCH_BYTES, usize::MAX)
        );
        assert!(!b.reduced());
    }
}
