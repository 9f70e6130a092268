//! Time. Every rule that compares times (lease expiry, deadlines, backoff, cancel graces,
//! retention) takes "now" from one [`Clock`], passed to it, never read from the system in the
//! rule itself — so the rules are tested with a clock the test sets.
//!
//! Several replicas on one PostgreSQL database must agree on who holds a lease, whatever their
//! hosts' clocks say. So the server's clock follows the database server's: [`follow_database`]
//! measures the offset between this host's clock and the database's (the midpoint of a round
//! trip, every [`RESYNC`]) and the clock adds it to local time. Every replica then writes and
//! compares lease times on the database's time line, within a round trip of each other. With
//! SQLite the database lives on this host and the offset stays 0.
use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::store::Store;

/// How often the offset to the database's clock is measured again.
pub const RESYNC: Duration = Duration::from_secs(10);

/// The server's notion of now, Unix milliseconds. Cheap to clone (shared state).
#[derive(Clone, Debug)]
pub struct Clock {
    source: Source,
    /// Added to the source: the database's clock minus this host's, measured.
    offset_ms: Arc<AtomicI64>,
}

#[derive(Clone, Debug)]
enum Source {
    /// This host's clock, plus a skew (non-zero only to stand in for a host whose clock is
    /// wrong, in tests: a fault no test can cause on the real clock).
    System { skew_ms: i64 },
    /// A time the owner sets (unit tests).
    Manual(Arc<AtomicI64>),
}

/// This host's wall clock, Unix ms.
pub fn system_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Clock {
    /// This host's clock.
    pub fn system() -> Clock {
        Clock::skewed(0)
    }

    /// This host's clock, `skew_ms` off: a stand-in for a host whose clock is wrong.
    pub fn skewed(skew_ms: i64) -> Clock {
        Clock {
            source: Source::System { skew_ms },
            offset_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A clock that shows `at_ms` until [`Clock::set`] moves it.
    pub fn manual(at_ms: i64) -> Clock {
        Clock {
            source: Source::Manual(Arc::new(AtomicI64::new(at_ms))),
            offset_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Sets a manual clock (no effect on a system clock).
    pub fn set(&self, at_ms: i64) {
        if let Source::Manual(t) = &self.source {
            t.store(at_ms, Ordering::Relaxed);
        }
    }

    /// The local reading, before the offset to the database.
    fn local_ms(&self) -> i64 {
        match &self.source {
            Source::System { skew_ms } => system_ms().saturating_add(*skew_ms),
            Source::Manual(t) => t.load(Ordering::Relaxed),
        }
    }

    /// Now, Unix ms, on the database's time line.
    pub fn now_ms(&self) -> i64 {
        self.local_ms()
            .saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// The offset currently added to local time.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Measures the offset to the database's clock once: the database's reading against the
    /// midpoint of the local readings around it.
    pub async fn sync_with(&self, store: &Store) -> crate::error::Result<i64> {
        let before = self.local_ms();
        let db = store.database_time_ms().await?;
        let after = self.local_ms();
        let offset = db - (before + (after - before) / 2);
        self.offset_ms.store(offset, Ordering::Relaxed);
        Ok(offset)
    }
}

/// Keeps `clock` on the database's time line until shutdown (PostgreSQL only; the caller
/// has already synced once before serving).
pub async fn follow_database(clock: Clock, store: Store, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RESYNC) => {}
            _ = crate::signals::stopped(&mut shutdown) => return,
        }
        match clock.sync_with(&store).await {
            Ok(offset) => tracing::trace!(offset_ms = offset, "clock synced with the database"),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the database's clock; keeping the last offset")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_shows_what_it_is_set_to() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.set(2_500);
        assert_eq!(c.now_ms(), 2_500);
    }

    #[test]
    fn a_skewed_clock_is_off_by_its_skew() {
        let c = Clock::skewed(3_600_000);
        let diff = c.now_ms() - system_ms();
        assert!((3_599_000..=3_601_000).contains(&diff), "{diff}");
    }

    #[tokio::test]
    async fn syncing_with_sqlite_keeps_a_correct_clock_where_it_is() {
        let store = Store::memory().await.expect("store");
        let c = Clock::skewed(3_600_000);
        let offset = c.sync_with(&store).await.expect("sync");
        // The database (this host) is an hour behind the skewed clock: the offset corrects it.
        assert!((-3_601_000..=-3_599_000).contains(&offset), "{offset}");
        assert!((c.now_ms() - system_ms()).abs() < 1_000);
    }
}
