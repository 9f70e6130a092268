//! In-process signals that wake whoever waits on a change: watchers of a job, the session
//! of a runner that has a new command, and runners waiting for work. On PostgreSQL the same
//! signals travel between server replicas through LISTEN/NOTIFY (see [`crate::replicas`]).
//!
//! A signal only says "look again": the database stays the source of truth, so a missed or
//! doubled signal costs a query, never correctness.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use sea_orm::DatabaseConnection;
use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

/// Resolves once `shutdown` turns true (or its sender is gone). Keeps the watch guard out
/// of callers' futures, which must stay `Send`.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// What changed, collected during a transaction and published after it commits.
#[derive(Debug, Default, Clone)]
pub struct Signals {
    /// Jobs whose events, logs or status changed.
    pub jobs: HashSet<Uuid>,
    /// Runners with new commands.
    pub runners: HashSet<Uuid>,
    /// New work may be dispatchable (a submit, a requeue, a released lock).
    pub work: bool,
}

impl Signals {
    /// Whether there is nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.runners.is_empty() && !self.work
    }

    /// Adds another set.
    pub fn merge(&mut self, other: Signals) {
        self.jobs.extend(other.jobs);
        self.runners.extend(other.runners);
        self.work |= other.work;
    }
}

/// The signal hub shared by services, sessions and background tasks.
pub struct Hub {
    /// Job ids that changed; WatchJob and GetLogs followers filter on their own id.
    /// Bounded: a lagging follower just re-reads the database.
    jobs: broadcast::Sender<Uuid>,
    /// Generation counter bumped when new work may be dispatchable.
    work: watch::Sender<u64>,
    /// Per-runner generation counters bumped when the runner has new commands.
    runners: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    /// Where signals go to reach other replicas (PostgreSQL only).
    outbound: Mutex<Option<tokio::sync::mpsc::Sender<Signals>>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            jobs: broadcast::channel(4096).0,
            work: watch::channel(0).0,
            runners: Mutex::new(HashMap::new()),
            outbound: Mutex::new(None),
        }
    }
}

impl Hub {
    /// Publishes locally and, when replicas are connected, to the others.
    pub fn publish(&self, signals: Signals) {
        if signals.is_empty() {
            return;
        }
        let outbound = self
            .outbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(tx) = outbound {
            // Best effort: a full channel only delays other replicas until their own
            // periodic re-check; the local signal below is what matters here.
            let _ = tx.try_send(signals.clone());
        }
        self.publish_local(&signals);
    }

    /// Wakes local waiters only (used for signals that came from other replicas).
    pub fn publish_local(&self, signals: &Signals) {
        for job in &signals.jobs {
            let _ = self.jobs.send(*job);
        }
        if !signals.runners.is_empty() {
            let runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
            for runner in &signals.runners {
                if let Some(tx) = runners.get(runner) {
                    tx.send_modify(|g| *g += 1);
                }
            }
        }
        if signals.work {
            self.work.send_modify(|g| *g += 1);
        }
    }

    /// Sets the channel toward other replicas.
    pub fn set_outbound(&self, tx: tokio::sync::mpsc::Sender<Signals>) {
        *self.outbound.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Follows job changes.
    pub fn subscribe_jobs(&self) -> broadcast::Receiver<Uuid> {
        self.jobs.subscribe()
    }

    /// Follows "work may be available".
    pub fn subscribe_work(&self) -> watch::Receiver<u64> {
        self.work.subscribe()
    }

    /// Follows commands for one runner.
    pub fn subscribe_runner(&self, runner: Uuid) -> watch::Receiver<u64> {
        let mut runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        runners
            .entry(runner)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Forgets runners nobody follows any more.
    pub fn prune_runners(&self) {
        let mut runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        runners.retain(|_, tx| tx.receiver_count() > 0);
    }
}

/// How long a follower waits for a signal before looking at the database anyway. Signals
/// make followers immediate; this only bounds the cost of a signal lost between replicas.
pub const FOLLOW_RECHECK: Duration = Duration::from_secs(2);

/// What a follower of a job (its events, its logs) needs: reads, change signals, and the
/// shutdown signal.
#[derive(Clone)]
pub struct Follow {
    pub db: DatabaseConnection,
    pub hub: Arc<Hub>,
    pub shutdown: watch::Receiver<bool>,
}

impl Follow {
    /// Runs a follower that feeds `buffer` items at most ahead of its reader; an error it
    /// returns ends the stream as its last item.
    pub fn spawn<T, F, Fut>(
        self,
        buffer: usize,
        follower: F,
    ) -> mpsc::Receiver<crate::error::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(Follow, mpsc::Sender<crate::error::Result<T>>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = crate::error::Result<()>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(buffer);
        tokio::spawn(async move {
            if let Err(e) = follower(self, tx.clone()).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    /// Waits until `job_id` changes (or a re-check is due, or the server stops, or the reader
    /// behind `out` left). Returns false when the follower should end.
    pub async fn wait_for_job<T>(
        &self,
        rx: &mut broadcast::Receiver<Uuid>,
        job_id: Uuid,
        out: &mpsc::Sender<T>,
    ) -> bool {
        let mut shutdown = self.shutdown.clone();
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(id) if id == job_id => return true,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        };
        tokio::select! {
            r = wait => r,
            _ = tokio::time::sleep(FOLLOW_RECHECK) => true,
            _ = stopped(&mut shutdown) => false,
            _ = out.closed() => false,
        }
    }
}
