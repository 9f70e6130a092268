//! Group commit: one task takes every request waiting at a moment and answers them all with
//! one piece of work (one transaction), instead of one transaction each. Submits, claims,
//! heartbeats and report batches each go through one of these.
use std::{future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

/// A request waiting for its group, and where its answer goes.
pub struct Waiting<Q, A> {
    request: Q,
    reply: oneshot::Sender<Result<A>>,
}

/// Receiving end, handed to [`GroupCommit::spawn`] once what the work needs exists.
pub type Queue<Q, A> = mpsc::Receiver<Waiting<Q, A>>;

/// Handle to a group-committing task: requests of type `Q`, answers of type `A`.
pub struct GroupCommit<Q, A> {
    tx: mpsc::Sender<Waiting<Q, A>>,
}

impl<Q, A> Clone for GroupCommit<Q, A> {
    fn clone(&self) -> Self {
        GroupCommit {
            tx: self.tx.clone(),
        }
    }
}

impl<Q: Send + 'static, A: Send + 'static> GroupCommit<Q, A> {
    /// A handle and its queue, holding at most `capacity` waiting requests (callers beyond
    /// that wait to enqueue: backpressure, not an unbounded buffer).
    pub fn channel(capacity: usize) -> (Self, Queue<Q, A>) {
        let (tx, rx) = mpsc::channel(capacity);
        (GroupCommit { tx }, rx)
    }

    /// Starts the task: it takes up to `max_group` waiting requests at a time and gives them
    /// to `work`, with at most `parallel` groups in flight. `work` answers each request, in
    /// order; when it fails as a whole, every caller of the group gets the error.
    pub fn spawn<F, Fut>(
        mut queue: Queue<Q, A>,
        what: &'static str,
        max_group: usize,
        parallel: usize,
        work: F,
    ) where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<A>>>> + Send + 'static,
    {
        let work = Arc::new(work);
        let in_flight = Arc::new(Semaphore::new(parallel.max(1)));
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                // Requests that arrived while earlier groups ran join this one.
                let mut group = vec![first];
                while group.len() < max_group {
                    match queue.try_recv() {
                        Ok(w) => group.push(w),
                        Err(_) => break,
                    }
                }
                let work = work.clone();
                tokio::spawn(async move {
                    let (requests, replies): (Vec<Q>, Vec<_>) =
                        group.into_iter().map(|w| (w.request, w.reply)).unzip();
                    let size = replies.len();
                    match work(requests).await {
                        Ok(answers) if answers.len() == size => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(answer);
                            }
                        }
                        Ok(answers) => {
                            let e = Error::Internal(format!(
                                "{what}: {} answers for {size} requests",
                                answers.len()
                            ));
                            for reply in replies {
                                let _ = reply.send(Err(e.duplicate()));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, size, "{what} failed");
                            for reply in replies {
                                let _ = reply.send(Err(e.duplicate()));
                            }
                        }
                    }
                    drop(permit);
                });
            }
        });
    }

    /// Queues `request` and waits for its answer.
    pub async fn call(&self, request: Q) -> Result<A> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Waiting { request, reply })
            .await
            .map_err(|_| Error::Unavailable("server is shutting down".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("server is shutting down".into()))?
    }
}
