//! `gantry-runner`: executes Gantry jobs.
//!
//! A runner registers with the server once (its identity is kept in its state directory),
//! then holds one bidirectional `Session` stream: it grants credits for its free slots,
//! receives assignments and pushed commands (cancel, drain), heartbeats, and reports each
//! attempt's status, executor phases, progress and output with per-attempt sequence
//! numbers, resending whatever the server has not acknowledged after a reconnect.
//!
//! Modules: [`agent`] (the session and the work it holds: the I/O, and the reactions to what
//! the server says), [`phase`] (the runner's phases and the rules for leaving, as pure
//! transitions), [`connection`] (endpoint, TLS, credentials, registration, backoff, opening a
//! session), [`batching`] (report batch sizes from the server's limits and refusals),
//! [`job`] (one attempt: executor, timeout, final status), [`executor`] (docker, process,
//! and a work's inputs and artifacts), [`sandbox`] (a sandbox's workspace and its commands,
//! one at a time), [`relay`] (the WorkService endpoint each work gets, relayed to the
//! server; the work's token),
//! [`output`] (log chunks and the progress syntax), [`outbox`] (unacknowledged reports),
//! [`stop`] (why and how work is stopped), [`identity`] (the state file), [`config`].
pub mod agent;
pub mod batching;
pub mod config;
pub mod connection;
pub mod executor;
pub mod identity;
pub mod job;
#[cfg(test)]
mod job_scenarios;
pub mod outbox;
pub mod output;
pub mod phase;
pub mod relay;
pub mod sandbox;
pub mod stop;
#[cfg(test)]
mod testing;

pub use agent::{Exit, Runner, Signal};
pub use config::Config;
