//! Stopping work: why an attempt is stopped and how the request reaches it. A job's task,
//! its executor and the outbox all read the same stop request (the first one wins; a lost
//! lease overrides): executors signal the work, the outbox stops holding output back.
use std::time::Duration;

use tokio::sync::watch;

/// Why work is being stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A user canceled the job.
    Cancel,
    /// The job ran past its timeout.
    Timeout,
    /// The runner is draining and the drain grace ran out.
    Drain,
    /// The server no longer honours the lease: nothing more is reported.
    LeaseLost,
}

/// A request to stop work.
#[derive(Clone, Debug)]
pub struct Stop {
    /// Why.
    pub reason: StopReason,
    /// Time between the graceful signal and the kill.
    pub grace: Duration,
    /// Detail for the final status message.
    pub message: String,
}

/// The stop request of one attempt, if any (first request wins, a lost lease overrides).
pub type StopSignal = watch::Receiver<Option<Stop>>;

/// Waits until a stop is requested and returns it.
pub async fn stop_requested(stop: &mut StopSignal) -> Stop {
    loop {
        if let Some(s) = stop.borrow_and_update().clone() {
            return s;
        }
        if stop.changed().await.is_err() {
            // The sender is gone: nobody can ask any more; wait forever.
            futures::future::pending::<()>().await;
        }
    }
}
