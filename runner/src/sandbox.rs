//! Sandboxes: workspaces the runner keeps for the server, running commands one at a time.
//!
//! An assignment with `sandbox` set is a sandbox, not a job (see `Assignment.sandbox` and
//! `ExecCommand` in runner.proto): `job_id` is the sandbox id, and its lease is held like a
//! job's — one slot, listed in `held`, fenced, stopped through the same stop request the
//! agent sets for a job (a cancel, the drain grace, a lost lease). Its task here ([`run`])
//! owns the workspace and the queue of its commands:
//!
//! 1. It makes the workspace through the executor its spec names ([`Workspace`]: a
//!    container kept running, or a directory), reporting phases CREATING and STARTING
//!    (docker: PULLING first when it pulls), then RUNNING with the container id or the
//!    directory.
//! 2. It runs the commands the agent hands it ([`Order::Exec`]) one at a time, in the order
//!    received (the server sends the next only once the previous one ended: the queue is a
//!    defence, as is the command number that keeps a command delivered twice from running
//!    twice). Each command is an attempt of its own: its reports name the command's id and
//!    lease, with sequences and log offsets of their own (an outbox queue the agent opened
//!    *within* the sandbox's lease: not listed in `held`, dropped with it). Its status
//!    follows the jobs' rules ([`job::final_status`]): SUCCEEDED, FAILED EXIT_NONZERO,
//!    FAILED EXECUTOR_ERROR when it could not start, CANCELED after a cancel of its lease,
//!    TIMED_OUT past its deadline. Its env is the command's (the server merged the
//!    sandbox's into it) plus `GANTRY_SANDBOX_ID`, `GANTRY_COMMAND_ID`, `GANTRY_RUNNER_ID`,
//!    and the sandbox's identity as a job's work has its own: `GANTRY_JOB_ID` (the sandbox
//!    id, so that `gantry job …` in a command acts on the sandbox), `GANTRY_ATTEMPT`,
//!    `GANTRY_WORK_TOKEN` and `GANTRY_ENDPOINT` (the sandbox's endpoint, served for its
//!    whole life: see [`crate::relay`]).
//! 3. It ends ([`End`]) by its stop request: a cancel of the sandbox's lease (a delete, the
//!    idle timeout, one-shot) reports CANCELED; its lifetime (`deadline_unix_ms`) TIMED_OUT;
//!    the runner's drain grace running out SUCCEEDED; a lost lease nothing at all. Or by the
//!    runner's drain, once the running command has finished: SUCCEEDED. Ending stops the
//!    running command (graceful signal, then kill after the grace; a deleted sandbox's
//!    command ends CANCELED "the sandbox is being deleted"), refuses the commands still
//!    waiting and any that still come, stores the sandbox's artifacts (unless its lease was
//!    lost), reports REMOVING, removes the workspace, and reports the sandbox's final status.
//!
//! The sandbox's inputs are placed when its workspace is made, before it reports RUNNING.
//!
//! A command the agent cannot hand to a sandbox it holds (the runner restarted since, or the
//! sandbox is ending) ends at once with FAILED EXECUTOR_ERROR on its own lease ([`refuse`]).
use std::{
    collections::VecDeque,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use gantry_proto as pb;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use crate::{
    executor::{Exec, Io, NEVER, Outcome, Stop, StopReason, StopSignal, Work, Workspace},
    job::{self, Context},
    outbox::Outbox,
};

/// Orders one sandbox's task may have waiting (the server sends one command at a time; a
/// cancel or two may come with it).
const ORDERS: usize = 64;

/// Why a command is refused once the runner drains.
pub const DRAINING: &str = "runner draining";

/// What the agent keeps of a sandbox besides what it keeps of any job: how to reach its task.
pub struct Handle {
    /// Commands, and cancels and losses of commands, for the task. Bounded, and never
    /// waited on: the agent's loop does not block on a sandbox.
    orders: mpsc::Sender<Order>,
    /// Set, with why, once the runner drains: the sandbox takes no new command, lets the
    /// running one finish (the drain grace stops it through the stop request), then ends.
    draining: watch::Sender<Option<String>>,
}

/// The task's side of a [`Handle`].
pub struct Inbox {
    orders: mpsc::Receiver<Order>,
    draining: watch::Receiver<Option<String>>,
}

/// What the agent hands a sandbox's task.
#[derive(Debug)]
pub enum Order {
    /// Run this command after those before it (its outbox queue is open).
    Exec(Box<pb::ExecCommand>),
    /// Cancel the command of this lease, running or waiting.
    Cancel(pb::CancelCommand),
    /// The server no longer honours this command's lease: stop it, report nothing more.
    Lost(String),
}

/// A sandbox's handle and inbox; `draining`: the runner drains already, for this reason.
pub fn channel(draining: Option<String>) -> (Handle, Inbox) {
    let (orders_tx, orders) = mpsc::channel(ORDERS);
    let (draining_tx, draining) = watch::channel(draining);
    (
        Handle {
            orders: orders_tx,
            draining: draining_tx,
        },
        Inbox { orders, draining },
    )
}

impl Handle {
    /// Hands a command to the sandbox, or gives it back with why it cannot take it.
    pub fn exec(
        &self,
        exec: Box<pb::ExecCommand>,
    ) -> Result<(), (Box<pb::ExecCommand>, &'static str)> {
        match self.orders.try_reserve() {
            Ok(permit) => {
                permit.send(Order::Exec(exec));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(())) => Err((exec, "the sandbox is ending")),
            Err(mpsc::error::TrySendError::Full(())) => Err((
                exec,
                "the sandbox has too many orders waiting (the server sends one command at a time)",
            )),
        }
    }

    /// Cancels one of the sandbox's commands.
    pub fn cancel(&self, cancel: pb::CancelCommand) {
        self.send(Order::Cancel(cancel));
    }

    /// One of the sandbox's commands lost its lease.
    pub fn lost(&self, lease_id: &str) {
        self.send(Order::Lost(lease_id.to_string()));
    }

    /// The runner drains (once; later calls change nothing).
    pub fn drain(&self, reason: &str) {
        self.draining.send_if_modified(|d| match d {
            Some(_) => false,
            None => {
                *d = Some(reason.to_string());
                true
            }
        });
    }

    fn send(&self, order: Order) {
        if let Err(e) = self.orders.try_send(order) {
            // Closed: the sandbox is ending and stops its command anyway. Full: cannot happen
            // with the server's one command at a time; the server ends the command itself.
            tracing::warn!(error = %e, "a sandbox cannot take an order");
        }
    }
}

/// Ends a command that will not run here with FAILED EXECUTOR_ERROR `message` on its own
/// lease (its outbox queue is open). Does not wait.
pub fn refuse(outbox: Arc<Outbox>, exec: pb::ExecCommand, message: String) {
    tracing::warn!(command = %exec.command_id, sandbox = %exec.sandbox_id, %message, "command refused");
    tokio::spawn(async move {
        let end = Ending {
            status: pb::JobStatus::Failed,
            kind: pb::FailureKind::ExecutorError,
            message,
        };
        end.report(&outbox, &exec.lease_id).await;
    });
}

/// Runs a sandbox to its end and queues its final status. Returns that status, or `None`
/// when its lease was lost (nothing is reported then).
pub async fn run(
    ctx: Arc<Context>,
    assignment: pb::Assignment,
    stop: watch::Sender<Option<Stop>>,
    inbox: Inbox,
) -> Option<pb::JobStatus> {
    let spec = assignment.spec.unwrap_or_default();
    let expires = instant_at(assignment.deadline_unix_ms).or_else(|| {
        (spec.timeout_seconds > 0)
            .then(|| Instant::now() + Duration::from_secs(u64::from(spec.timeout_seconds)))
    });
    let relay = ctx.relays.open().await;
    let work = Work {
        job_id: assignment.job_id,
        attempt: assignment.attempt,
        lease_id: assignment.lease_id,
        runner_id: ctx.runner_id.clone(),
        spec,
        access: ctx
            .relays
            .access(assignment.work_token, relay.as_ref().ok()),
    };
    let mut io = Io::new(ctx.outbox.clone(), &work.lease_id, stop.subscribe());
    let mut sandbox = Sandbox {
        grace: job::grace(&work.spec),
        stop_rx: stop.subscribe(),
        stop,
        orders: Some(inbox.orders),
        draining: inbox.draining,
        draining_open: true,
        queue: VecDeque::new(),
        current: None,
        last_number: 0,
        expires,
        expired: false,
        ctx,
        work,
    };
    let end = match relay {
        Ok(relay) => {
            let end = sandbox.live(&mut io).await;
            relay.close().await;
            end
        }
        Err(e) => {
            let failed = Outcome::failed(
                pb::FailureKind::ExecutorError,
                format!("cannot serve the sandbox's endpoint: {e}"),
            );
            sandbox.end(&mut io, None, End::Failed(failed)).await
        }
    };
    let status = end.status()?;
    let reported = pb::JobStatus::try_from(status.status).unwrap_or_default();
    tracing::info!(
        sandbox = %sandbox.work.job_id,
        status = reported.as_str_name(),
        message = %status.message,
        "sandbox ended"
    );
    io.finish(status).await;
    Some(reported)
}

/// One sandbox's task.
struct Sandbox {
    ctx: Arc<Context>,
    /// The sandbox as an attempt: its id, lease and spec.
    work: Work,
    /// Its stop request (the agent's, or its own at the end of its lifetime).
    stop: watch::Sender<Option<Stop>>,
    /// To hear that request change.
    stop_rx: StopSignal,
    /// The grace its spec asks for.
    grace: Duration,
    /// Orders from the agent; `None` once the agent let go.
    orders: Option<mpsc::Receiver<Order>>,
    /// The runner's drain, once it drains.
    draining: watch::Receiver<Option<String>>,
    /// False once the agent let go of the drain's sender.
    draining_open: bool,
    /// Commands received and not started, in order.
    queue: VecDeque<pb::ExecCommand>,
    /// The command running.
    current: Option<Current>,
    /// The highest command number received: one delivered again is not run twice.
    last_number: u32,
    /// The end of its lifetime.
    expires: Option<Instant>,
    /// The lifetime ran out (the stop is requested).
    expired: bool,
}

/// The command running in a sandbox.
struct Current {
    /// Its lease.
    lease: String,
    /// Its stop request.
    stop: watch::Sender<Option<Stop>>,
    /// Its grace between the graceful signal and the kill.
    grace: Duration,
    /// When it times out.
    deadline: Option<Instant>,
    /// It did (the stop is requested).
    timed_out: bool,
}

/// What woke a sandbox's task.
enum Wake {
    Order(Option<Order>),
    Stopped,
    Draining(bool),
    Expired,
    CommandDue,
}

/// How a sandbox ended.
#[derive(Debug)]
enum End {
    /// Its stop request: a delete, its lifetime, the drain grace over, a lost lease.
    Stopped(Stop),
    /// The runner drains, for this reason: the sandbox ended after its running command.
    Drained(String),
    /// Its workspace could not be made.
    Failed(Outcome),
}

/// How a command that does not run (any more) ends.
struct Ending {
    status: pb::JobStatus,
    kind: pb::FailureKind,
    message: String,
}

impl Ending {
    /// Queues this final status on the command's lease.
    async fn report(self, outbox: &Arc<Outbox>, lease_id: &str) {
        let (_stop, stop_rx) = watch::channel(None);
        let mut io = Io::command(outbox.clone(), lease_id, stop_rx);
        io.finish(pb::StatusReport {
            status: self.status as i32,
            failure_kind: self.kind as i32,
            message: self.message,
            ..Default::default()
        })
        .await;
    }
}

impl End {
    /// The sandbox's final status (`None`: its lease was lost, nothing is reported).
    fn status(&self) -> Option<pb::StatusReport> {
        let status = |status: pb::JobStatus, kind: pb::FailureKind, message: String| {
            Some(pb::StatusReport {
                status: status as i32,
                failure_kind: kind as i32,
                message,
                ..Default::default()
            })
        };
        match self {
            End::Stopped(stop) => match stop.reason {
                StopReason::Cancel => status(
                    pb::JobStatus::Canceled,
                    pb::FailureKind::Canceled,
                    stop.message.clone(),
                ),
                StopReason::Timeout => status(
                    pb::JobStatus::TimedOut,
                    pb::FailureKind::Timeout,
                    stop.message.clone(),
                ),
                StopReason::Drain => status(
                    pb::JobStatus::Succeeded,
                    pb::FailureKind::Unspecified,
                    format!("removed: {}", stop.message),
                ),
                StopReason::LeaseLost => None,
            },
            End::Drained(reason) => status(
                pb::JobStatus::Succeeded,
                pb::FailureKind::Unspecified,
                format!("removed: the runner is leaving ({reason})"),
            ),
            End::Failed(Outcome::Failed { kind, message }) => {
                status(pb::JobStatus::Failed, *kind, message.clone())
            }
            End::Failed(Outcome::Exited { code, .. }) => status(
                pb::JobStatus::Failed,
                pb::FailureKind::ExecutorError,
                format!("the workspace exited with code {code}"),
            ),
        }
    }

    /// How a command that was waiting ends when the sandbox does (`None`: nothing is
    /// reported, the lease was lost).
    fn refusal(&self) -> Option<Ending> {
        let (status, kind, message) = match self {
            End::Stopped(stop) => match stop.reason {
                StopReason::Cancel | StopReason::Timeout => (
                    pb::JobStatus::Canceled,
                    pb::FailureKind::Canceled,
                    deleting(stop),
                ),
                StopReason::Drain => (
                    pb::JobStatus::Failed,
                    pb::FailureKind::ExecutorError,
                    DRAINING.to_string(),
                ),
                StopReason::LeaseLost => return None,
            },
            End::Drained(_) => (
                pb::JobStatus::Failed,
                pb::FailureKind::ExecutorError,
                DRAINING.to_string(),
            ),
            End::Failed(outcome) => (
                pb::JobStatus::Failed,
                pb::FailureKind::ExecutorError,
                match outcome {
                    Outcome::Failed { message, .. } => {
                        format!("the sandbox could not be created: {message}")
                    }
                    Outcome::Exited { .. } => "the sandbox could not be created".to_string(),
                },
            ),
        };
        Some(Ending {
            status,
            kind,
            message,
        })
    }
}

/// The message of a command ended by its sandbox's deletion.
fn deleting(stop: &Stop) -> String {
    format!("the sandbox is being deleted ({})", stop.message)
}

/// How the sandbox's stop reaches its running command: a delete or the end of its lifetime
/// cancels it; the drain grace and a lost lease reach it as they are.
fn command_stop(sandbox: &Stop) -> Stop {
    match sandbox.reason {
        StopReason::Cancel | StopReason::Timeout => Stop {
            reason: StopReason::Cancel,
            grace: sandbox.grace,
            message: deleting(sandbox),
        },
        StopReason::Drain | StopReason::LeaseLost => sandbox.clone(),
    }
}

/// The command to run, from what the server sent, in `sandbox` (whose commands see its
/// endpoint as `endpoint`).
fn exec_of(command: &pb::ExecCommand, sandbox: &Work, endpoint: Option<String>) -> Exec {
    let mut ours: Vec<(&str, String)> = vec![
        ("GANTRY_SANDBOX_ID", command.sandbox_id.clone()),
        ("GANTRY_COMMAND_ID", command.command_id.clone()),
    ];
    ours.extend(sandbox.gantry_env(endpoint));
    // Set by the runner alone, even when it has no value to give.
    const RESERVED: [&str; 2] = ["GANTRY_WORK_TOKEN", "GANTRY_ENDPOINT"];
    let mut env: Vec<(String, String)> = command
        .env
        .iter()
        .filter(|(k, _)| !ours.iter().any(|(o, _)| o == k) && !RESERVED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.sort();
    env.extend(ours.into_iter().map(|(k, v)| (k.to_string(), v)));
    Exec {
        argv: command.argv.clone(),
        env,
        working_dir: (!command.working_dir.is_empty()).then(|| command.working_dir.clone()),
        stdin: command.stdin.clone(),
    }
}

/// The instant of a Unix time in milliseconds (`None` for 0: none); a time past is now.
fn instant_at(unix_ms: i64) -> Option<Instant> {
    if unix_ms <= 0 {
        return None;
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let left = u64::try_from(unix_ms.saturating_sub(now_ms)).unwrap_or(0);
    Some(Instant::now() + Duration::from_millis(left).min(NEVER))
}

/// The next order, or never once the agent let go.
async fn recv(orders: &mut Option<mpsc::Receiver<Order>>) -> Option<Order> {
    match orders {
        Some(orders) => orders.recv().await,
        None => futures::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

impl Sandbox {
    /// Makes the workspace, runs commands until the sandbox ends, and removes it.
    async fn live(&mut self, io: &mut Io) -> End {
        let kind = pb::ExecutorKind::try_from(self.work.spec.executor).unwrap_or_default();
        let Some(executor) = self
            .ctx
            .executors
            .iter()
            .find(|e| e.kind() == kind)
            .cloned()
        else {
            let failed = Outcome::failed(
                pb::FailureKind::InvalidSpec,
                format!(
                    "this runner does not offer the {} executor",
                    kind.as_str_name()
                ),
            );
            return self.end(io, None, End::Failed(failed)).await;
        };
        let draining = self.draining.borrow().clone();
        if let Some(reason) = draining {
            // Assigned while the runner was already leaving: nothing is made.
            return self.end(io, None, End::Drained(reason)).await;
        }
        let work = self.work.clone();
        let created = self
            .attend(executor.create_workspace(&work, io, self.stop.subscribe()))
            .await;
        let workspace = match created {
            Ok(workspace) => workspace,
            Err(failed) => return self.end(io, None, End::Failed(failed)).await,
        };
        let id = workspace.id();
        io.started(&id).await;
        tracing::info!(sandbox = %self.work.job_id, workspace = %id, "sandbox running");
        let end = loop {
            if let Some(stop) = self.stop.borrow().clone() {
                break End::Stopped(stop);
            }
            if let Some(reason) = self.draining.borrow().clone() {
                break End::Drained(reason);
            }
            match self.queue.pop_front() {
                Some(command) => self.run_command(workspace.as_ref(), command).await,
                None => {
                    let wake = self.next().await;
                    self.handle(wake).await;
                }
            }
        };
        self.end(io, Some(workspace), end).await
    }

    /// Ends the sandbox: refuses every command still waiting or still coming, removes the
    /// workspace. Returns how it ended (a lost lease, or a stop that interrupted the
    /// workspace's making, overrides).
    async fn end(&mut self, io: &mut Io, workspace: Option<Box<dyn Workspace>>, end: End) -> End {
        let end = match (self.stop.borrow().clone(), end) {
            (Some(stop), End::Failed(_)) => End::Stopped(stop),
            (Some(stop), _) if stop.reason == StopReason::LeaseLost => End::Stopped(stop),
            (_, end) => end,
        };
        // Orders already sent are still received; new ones are refused by the agent.
        if let Some(orders) = &mut self.orders {
            orders.close();
        }
        let waiting: Vec<pb::ExecCommand> = self.queue.drain(..).collect();
        for command in waiting {
            self.end_waiting(&command.lease_id, end.refusal()).await;
        }
        while let Some(order) = recv_closed(&mut self.orders).await {
            if let Order::Exec(command) = order {
                let ending = if self.is_new(&command) {
                    end.refusal()
                } else {
                    // Delivered again after it ran: its reports were acknowledged.
                    None
                };
                self.end_waiting(&command.lease_id, ending).await;
            }
        }
        if let Some(workspace) = workspace {
            if !matches!(&end, End::Stopped(stop) if stop.reason == StopReason::LeaseLost) {
                workspace
                    .store_artifacts(&self.work, io, self.stop.subscribe())
                    .await;
            }
            io.phase(pb::ExecutorPhase::Removing, workspace.id()).await;
            if let Err(e) = workspace.remove().await {
                tracing::warn!(sandbox = %self.work.job_id, "{e}");
            }
        }
        end
    }

    /// Runs one command to its end and queues its final status.
    async fn run_command(&mut self, workspace: &dyn Workspace, command: pb::ExecCommand) {
        let (stop, stop_rx) = watch::channel(None);
        let grace = match command.grace_seconds {
            0 => self.grace,
            s => Duration::from_secs(u64::from(s)),
        };
        let deadline = instant_at(command.deadline_unix_ms);
        self.current = Some(Current {
            lease: command.lease_id.clone(),
            stop: stop.clone(),
            grace,
            deadline,
            timed_out: false,
        });
        let mut io = Io::command(self.ctx.outbox.clone(), &command.lease_id, stop_rx.clone());
        let exec = exec_of(&command, &self.work, workspace.endpoint());
        tracing::info!(
            sandbox = %self.work.job_id,
            command = %command.command_id,
            number = command.number,
            "command started"
        );
        let outcome = if exec.argv.first().is_none_or(String::is_empty) {
            Outcome::failed(
                pb::FailureKind::ExecutorError,
                "the command is empty (argv needs a program)",
            )
        } else if deadline.is_some_and(|d| d <= Instant::now()) {
            let message = "its deadline passed before it could start";
            job::request_stop(
                &stop,
                Stop {
                    reason: StopReason::Timeout,
                    grace,
                    message: message.to_string(),
                },
            );
            Outcome::failed(pb::FailureKind::Timeout, message)
        } else {
            self.attend(workspace.exec(&exec, &mut io, stop_rx)).await
        };
        self.current = None;
        let stopped = stop.borrow().clone();
        match job::final_status(outcome, stopped.as_ref()) {
            Some(status) => {
                tracing::info!(
                    sandbox = %self.work.job_id,
                    command = %command.command_id,
                    status = pb::JobStatus::try_from(status.status).unwrap_or_default().as_str_name(),
                    message = %status.message,
                    "command ended"
                );
                io.finish(status).await;
            }
            None => {
                self.ctx.outbox.drop_attempt(&command.lease_id);
            }
        }
    }

    /// Awaits `work` (making the workspace, a command) while taking orders, passing stops
    /// on and keeping the deadlines.
    async fn attend<T>(&mut self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                wake = self.next() => self.handle(wake).await,
            }
        }
    }

    /// Waits for the next thing to react to.
    async fn next(&mut self) -> Wake {
        let expires = self.expires.filter(|_| !self.expired);
        let due = self
            .current
            .as_ref()
            .filter(|c| !c.timed_out)
            .and_then(|c| c.deadline);
        tokio::select! {
            order = recv(&mut self.orders) => Wake::Order(order),
            // The task holds the sender: this never ends.
            Ok(()) = self.stop_rx.changed() => Wake::Stopped,
            changed = self.draining.changed(), if self.draining_open => Wake::Draining(changed.is_ok()),
            () = sleep_until(expires) => Wake::Expired,
            () = sleep_until(due) => Wake::CommandDue,
        }
    }

    async fn handle(&mut self, wake: Wake) {
        match wake {
            Wake::Order(None) => self.orders = None,
            Wake::Order(Some(Order::Exec(command))) => self.take(*command).await,
            Wake::Order(Some(Order::Cancel(cancel))) => self.cancel(&cancel).await,
            Wake::Order(Some(Order::Lost(lease))) => self.lost(&lease),
            Wake::Stopped => {
                let stop = self.stop.borrow().clone();
                if let (Some(current), Some(stop)) = (&self.current, stop) {
                    job::request_stop(&current.stop, command_stop(&stop));
                }
            }
            Wake::Draining(true) => {
                let waiting: Vec<pb::ExecCommand> = self.queue.drain(..).collect();
                for command in waiting {
                    self.end_waiting(&command.lease_id, Some(draining())).await;
                }
            }
            Wake::Draining(false) => self.draining_open = false,
            Wake::Expired => {
                self.expired = true;
                job::request_stop(
                    &self.stop,
                    Stop {
                        reason: StopReason::Timeout,
                        grace: self.grace,
                        message: "reached the end of its lifetime".to_string(),
                    },
                );
            }
            Wake::CommandDue => {
                if let Some(current) = &mut self.current {
                    current.timed_out = true;
                    job::request_stop(
                        &current.stop,
                        Stop {
                            reason: StopReason::Timeout,
                            grace: current.grace,
                            message: "ran past its timeout".to_string(),
                        },
                    );
                }
            }
        }
    }

    /// Whether the command of this lease is running or waiting here.
    fn holds(&self, lease: &str) -> bool {
        self.current.as_ref().is_some_and(|c| c.lease == lease)
            || self.queue.iter().any(|q| q.lease_id == lease)
    }

    /// Whether a command is new to this sandbox (not running, waiting, or run before).
    fn is_new(&self, command: &pb::ExecCommand) -> bool {
        !self.holds(&command.lease_id) && (command.number == 0 || command.number > self.last_number)
    }

    /// A command came: it waits its turn (refused while the runner drains).
    async fn take(&mut self, command: pb::ExecCommand) {
        if !self.is_new(&command) {
            tracing::warn!(
                sandbox = %self.work.job_id,
                command = %command.command_id,
                number = command.number,
                "a command this sandbox already took came again: it does not run twice"
            );
            if !self.holds(&command.lease_id) {
                // Its queue was opened again for nothing: its reports were acknowledged.
                self.ctx.outbox.drop_attempt(&command.lease_id);
            }
            return;
        }
        self.last_number = self.last_number.max(command.number);
        if self.draining.borrow().is_some() {
            self.end_waiting(&command.lease_id, Some(draining())).await;
            return;
        }
        self.queue.push_back(command);
    }

    /// A cancel of one of the sandbox's commands.
    async fn cancel(&mut self, cancel: &pb::CancelCommand) {
        let message = job::cancel_message(cancel);
        if let Some(current) = &self.current
            && current.lease == cancel.lease_id
        {
            let grace = match cancel.grace_seconds {
                0 => current.grace,
                s => Duration::from_secs(u64::from(s)),
            };
            tracing::info!(sandbox = %self.work.job_id, command = %cancel.job_id, reason = %cancel.reason, "cancel");
            job::request_stop(
                &current.stop,
                Stop {
                    reason: StopReason::Cancel,
                    grace,
                    message,
                },
            );
        } else if let Some(at) = self
            .queue
            .iter()
            .position(|q| q.lease_id == cancel.lease_id)
            && let Some(command) = self.queue.remove(at)
        {
            let ending = Ending {
                status: pb::JobStatus::Canceled,
                kind: pb::FailureKind::Canceled,
                message,
            };
            self.end_waiting(&command.lease_id, Some(ending)).await;
        }
    }

    /// A command's lease is lost: it stops, and reports nothing more.
    fn lost(&mut self, lease: &str) {
        if let Some(current) = &self.current
            && current.lease == lease
        {
            job::request_stop(
                &current.stop,
                Stop {
                    reason: StopReason::LeaseLost,
                    grace: current.grace,
                    message: "the server no longer honours the command's lease".to_string(),
                },
            );
        } else {
            self.queue.retain(|q| q.lease_id != lease);
        }
    }

    /// Ends a command that did not run (`None`: silently, its queue dropped).
    async fn end_waiting(&self, lease: &str, ending: Option<Ending>) {
        match ending {
            Some(ending) => ending.report(&self.ctx.outbox, lease).await,
            None => {
                self.ctx.outbox.drop_attempt(lease);
            }
        }
    }
}

/// How a command is refused while the runner drains.
fn draining() -> Ending {
    Ending {
        status: pb::JobStatus::Failed,
        kind: pb::FailureKind::ExecutorError,
        message: DRAINING.to_string(),
    }
}

/// The orders left in a closed channel (then `None`).
async fn recv_closed(orders: &mut Option<mpsc::Receiver<Order>>) -> Option<Order> {
    orders.as_mut()?.recv().await
}

#[cfg(test)]
mod tests {
    //! Sandboxes as the server sees them: an assignment, commands, cancels and a drain go in;
    //! reports come out of the outbox (acknowledged as a server would), and the workspace is
    //! checked on the machine. The process executor runs everywhere; the docker executor's
    //! scenarios need an engine and a static busybox (`--ignored`).
    use std::{collections::HashMap, path::PathBuf};

    use super::*;
    use crate::{
        executor::{Executors, process::ProcessExecutor},
        outbox::Budget,
        testing::busybox_image,
    };

    const RUNNER: &str = "runner-1";
    const WAIT: Duration = Duration::from_secs(30);

    fn uuid() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    fn unix_ms_in(d: Duration) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        i64::try_from(now + d.as_millis()).unwrap_or(i64::MAX)
    }

    /// Where a sandbox's WorkService calls go, and as whom.
    struct Served {
        channel: tonic::transport::Channel,
        sandbox_id: String,
        token: String,
    }

    /// A sandbox task, and the server's side of it.
    struct Harness {
        outbox: Arc<Outbox>,
        handle: Handle,
        stop: watch::Sender<Option<Stop>>,
        task: tokio::task::JoinHandle<Option<pb::JobStatus>>,
        sandbox_id: String,
        lease: String,
        /// Every report so far, acknowledged.
        reports: Vec<pb::Report>,
        commands: u32,
    }

    fn process_executors(root: &std::path::Path) -> Executors {
        vec![Arc::new(ProcessExecutor::new(root.to_path_buf()))]
    }

    impl Harness {
        fn start(executors: Executors, spec: pb::JobSpec, deadline_unix_ms: i64) -> Harness {
            Self::start_draining(executors, spec, deadline_unix_ms, None)
        }

        fn start_draining(
            executors: Executors,
            spec: pb::JobSpec,
            deadline_unix_ms: i64,
            draining: Option<String>,
        ) -> Harness {
            let served = Served {
                channel: offline_channel(),
                sandbox_id: uuid(),
                token: String::new(),
            };
            Self::start_full(executors, spec, deadline_unix_ms, draining, served)
        }

        /// A sandbox whose server's WorkService is behind `served`.
        fn start_served(executors: Executors, spec: pb::JobSpec, served: Served) -> Harness {
            Self::start_full(executors, spec, 0, None, served)
        }

        fn start_full(
            executors: Executors,
            spec: pb::JobSpec,
            deadline_unix_ms: i64,
            draining: Option<String>,
            served: Served,
        ) -> Harness {
            let outbox = Arc::new(Outbox::new(1 << 24));
            let ctx = Arc::new(Context {
                outbox: outbox.clone(),
                executors,
                runner_id: RUNNER.to_string(),
                relays: crate::relay::Relays::new(served.channel, std::env::temp_dir()),
            });
            let (sandbox_id, lease) = (served.sandbox_id, uuid());
            assert!(outbox.open(&sandbox_id, &lease));
            let assignment = pb::Assignment {
                job_id: sandbox_id.clone(),
                lease_id: lease.clone(),
                attempt: 1,
                spec: Some(spec),
                deadline_unix_ms,
                sandbox: true,
                work_token: served.token,
                ..Default::default()
            };
            let (stop, _) = watch::channel(None);
            let (handle, inbox) = channel(draining);
            let task = tokio::spawn(run(ctx, assignment, stop.clone(), inbox));
            Harness {
                outbox,
                handle,
                stop,
                task,
                sandbox_id,
                lease,
                reports: Vec::new(),
                commands: 0,
            }
        }

        /// Sends a command as the server would (its queue opened by the agent); returns its
        /// lease.
        fn exec(&mut self, argv: &[&str], customize: impl FnOnce(&mut pb::ExecCommand)) -> String {
            self.commands += 1;
            let mut command = pb::ExecCommand {
                sandbox_id: self.sandbox_id.clone(),
                sandbox_lease_id: self.lease.clone(),
                command_id: uuid(),
                lease_id: uuid(),
                number: self.commands,
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: HashMap::from([("FOO".to_string(), "bar".to_string())]),
                grace_seconds: 1,
                ..Default::default()
            };
            customize(&mut command);
            self.send(command)
        }

        fn send(&mut self, command: pb::ExecCommand) -> String {
            let lease = command.lease_id.clone();
            self.outbox
                .open_within(&self.lease, &command.command_id, &lease);
            if let Err((_, why)) = self.handle.exec(Box::new(command)) {
                panic!("the sandbox did not take the command: {why}");
            }
            lease
        }

        fn stop(&self, reason: StopReason, message: &str) {
            job::request_stop(
                &self.stop,
                Stop {
                    reason,
                    grace: Duration::from_secs(1),
                    message: message.to_string(),
                },
            );
        }

        /// Takes and acknowledges what the outbox holds.
        fn collect(&mut self) {
            for r in self.outbox.take_unsent(Budget::UNLIMITED) {
                self.outbox.ack(&r.lease_id, r.sequence);
                self.reports.push(r);
            }
        }

        /// The reports of one lease, in order.
        fn of(&self, lease: &str) -> Vec<&pb::Report> {
            self.reports
                .iter()
                .filter(|r| r.lease_id == lease)
                .collect()
        }

        /// Waits for the final status of a lease.
        async fn end_of(&mut self, lease: &str) -> pb::StatusReport {
            let until = Instant::now() + WAIT;
            loop {
                self.collect();
                if let Some(s) = self.of(lease).iter().find_map(|r| match &r.body {
                    Some(pb::report::Body::Status(s))
                        if s.status != pb::JobStatus::Running as i32 =>
                    {
                        Some(s.clone())
                    }
                    _ => None,
                }) {
                    return s;
                }
                assert!(
                    Instant::now() < until,
                    "no final status for {lease}: {:#?}",
                    self.of(lease)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// Waits until a lease reported RUNNING; returns its container id.
        async fn running(&mut self, lease: &str) -> String {
            let until = Instant::now() + WAIT;
            loop {
                self.collect();
                if let Some(id) = self.of(lease).iter().find_map(|r| match &r.body {
                    Some(pb::report::Body::Status(s))
                        if s.status == pb::JobStatus::Running as i32 =>
                    {
                        Some(s.container_id.clone())
                    }
                    _ => None,
                }) {
                    return id;
                }
                assert!(
                    Instant::now() < until,
                    "{lease} never ran: {:#?}",
                    self.of(lease)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// What a lease wrote on a stream.
        fn output(&self, lease: &str, stream: pb::LogStream) -> String {
            let mut out = Vec::new();
            for r in self.of(lease) {
                if let Some(pb::report::Body::Log(l)) = &r.body
                    && l.stream == stream as i32
                {
                    assert_eq!(l.offset, out.len() as u64, "contiguous from 0");
                    out.extend_from_slice(&l.data);
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        }

        fn phases(&self, lease: &str) -> Vec<pb::ExecutorPhase> {
            self.of(lease)
                .iter()
                .filter_map(|r| match &r.body {
                    Some(pb::report::Body::Phase(p)) => pb::ExecutorPhase::try_from(p.phase).ok(),
                    _ => None,
                })
                .collect()
        }

        async fn ended(self) -> (Option<pb::JobStatus>, Harness) {
            let mut h = self;
            let task = std::mem::replace(&mut h.task, tokio::spawn(async { None }));
            let status = tokio::time::timeout(WAIT, task)
                .await
                .expect("the sandbox ends")
                .expect("the sandbox's task");
            h.collect();
            (status, h)
        }
    }

    fn process_spec() -> pb::JobSpec {
        pb::JobSpec {
            executor: pb::ExecutorKind::Process as i32,
            cancel_grace_seconds: 1,
            ..Default::default()
        }
    }

    fn status_of(s: &pb::StatusReport) -> (pb::JobStatus, pb::FailureKind) {
        (
            pb::JobStatus::try_from(s.status).unwrap_or_default(),
            pb::FailureKind::try_from(s.failure_kind).unwrap_or_default(),
        )
    }

    #[tokio::test]
    async fn a_process_sandbox_runs_its_commands_one_after_another_in_one_workspace() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        let dir = h.running(&h.lease.clone()).await;
        assert_eq!(
            h.phases(&h.lease),
            [
                pb::ExecutorPhase::Creating,
                pb::ExecutorPhase::Starting,
                pb::ExecutorPhase::Running
            ]
        );
        assert!(PathBuf::from(&dir).is_dir(), "{dir}");
        assert!(dir.contains(&h.sandbox_id), "{dir}");

        // Queued back to back: they still run one at a time, in order.
        let first = h.exec(
            &[
                "sh",
                "-c",
                "echo hello > f; echo ::progress 50 half::; pwd; echo err >&2; echo a >> order; sleep 0.2; echo b >> order",
            ],
            |_| {},
        );
        let second = h.exec(&["sh", "-c", "cat f; echo c >> order"], |_| {});
        let env = h.exec(
            &[
                "sh",
                "-c",
                "echo $GANTRY_SANDBOX_ID $GANTRY_COMMAND_ID $GANTRY_RUNNER_ID $FOO $GANTRY_JOB_ID",
            ],
            |c| c.command_id = "cmd-7".to_string(),
        );
        let input = h.exec(&["cat"], |c| c.stdin = b"line one\nline two".to_vec());
        let elsewhere = h.exec(&["pwd"], |c| c.working_dir = "/".to_string());
        let exits = h.exec(&["sh", "-c", "exit 3"], |_| {});
        let missing = h.exec(&["no-such-program-here"], |_| {});

        let s = h.end_of(&first).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Succeeded, "{s:?}");
        assert_eq!(h.output(&first, pb::LogStream::Stdout), format!("{dir}\n"));
        assert_eq!(h.output(&first, pb::LogStream::Stderr), "err\n");
        let reports = h.of(&first);
        // Its own sequences from 1, RUNNING with its pid, its progress, no phases.
        assert_eq!(reports.first().map(|r| r.sequence), Some(1));
        assert!(reports.iter().all(|r| r.job_id != h.sandbox_id));
        assert!(matches!(&reports[0].body, Some(pb::report::Body::Status(s))
            if s.status == pb::JobStatus::Running as i32 && s.container_id.parse::<u32>().is_ok()));
        assert!(reports.iter().any(|r| matches!(&r.body,
            Some(pb::report::Body::Progress(p)) if p.percent == 50 && p.stage == "half")));
        assert!(h.phases(&first).is_empty());

        assert_eq!(
            status_of(&h.end_of(&second).await).0,
            pb::JobStatus::Succeeded
        );
        assert_eq!(h.output(&second, pb::LogStream::Stdout), "hello\n");
        h.end_of(&env).await;
        assert_eq!(
            h.output(&env, pb::LogStream::Stdout),
            format!("{0} cmd-7 {RUNNER} bar {0}\n", h.sandbox_id)
        );
        h.end_of(&input).await;
        assert_eq!(
            h.output(&input, pb::LogStream::Stdout),
            "line one\nline two"
        );
        h.end_of(&elsewhere).await;
        assert_eq!(h.output(&elsewhere, pb::LogStream::Stdout), "/\n");
        let s = h.end_of(&exits).await;
        assert_eq!(
            (status_of(&s), s.exit_code),
            (
                (pb::JobStatus::Failed, pb::FailureKind::ExitNonzero),
                Some(3)
            )
        );
        let s = h.end_of(&missing).await;
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::Failed, pb::FailureKind::ExecutorError)
        );
        assert!(s.message.contains("no-such-program-here"), "{}", s.message);

        // Each command ran after the one before had ended.
        let order = h.exec(&["cat", "order"], |_| {});
        h.end_of(&order).await;
        assert_eq!(h.output(&order, pb::LogStream::Stdout), "a\nb\nc\n");

        // A delete: REMOVING, CANCELED, the directory gone.
        h.stop(StopReason::Cancel, "canceled: deleted by the user");
        let (status, h) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::Canceled));
        let s = h.end_of_now(&h.lease);
        assert_eq!(s.message, "canceled: deleted by the user");
        assert_eq!(
            h.phases(&h.lease).last(),
            Some(&pb::ExecutorPhase::Removing)
        );
        assert!(!PathBuf::from(&dir).exists());
        // Everything settled: nothing is held any more.
        assert!(h.outbox.is_empty());
    }

    impl Harness {
        /// The final status of a lease, already collected.
        fn end_of_now(&self, lease: &str) -> pb::StatusReport {
            self.of(lease)
                .iter()
                .rev()
                .find_map(|r| match &r.body {
                    Some(pb::report::Body::Status(s)) => Some(s.clone()),
                    _ => None,
                })
                .expect("a status")
        }
    }

    /// Whether a process is gone (or a zombie nobody reaped yet).
    fn gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let until = Instant::now() + WAIT;
        while !check() {
            assert!(Instant::now() < until, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_canceled_command_takes_its_process_group_with_it_and_the_sandbox_lives_on() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        let dir = h.running(&h.lease.clone()).await;
        // A child in the background, and a shell that ignores SIGTERM: the kill after the
        // grace ends it.
        let busy = h.exec(
            &[
                "sh",
                "-c",
                "trap '' TERM; sleep 100 & echo $! > child; wait; wait",
            ],
            |_| {},
        );
        h.running(&busy).await;
        let child = PathBuf::from(&dir).join("child");
        eventually("the child's pid is written", || {
            std::fs::read_to_string(&child).is_ok_and(|s| s.ends_with('\n'))
        })
        .await;
        let pid = std::fs::read_to_string(&child)
            .expect("pid")
            .trim()
            .to_string();
        assert!(!gone(&pid));
        h.handle.cancel(pb::CancelCommand {
            job_id: String::new(),
            lease_id: busy.clone(),
            grace_seconds: 1,
            reason: "enough".to_string(),
        });
        let s = h.end_of(&busy).await;
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::Canceled, pb::FailureKind::Canceled)
        );
        assert_eq!(s.message, "canceled: enough");
        eventually("the background child is killed", || gone(&pid)).await;
        // The workspace, and the sandbox, carry on.
        let next = h.exec(&["cat", "child"], |_| {});
        assert_eq!(
            status_of(&h.end_of(&next).await).0,
            pb::JobStatus::Succeeded
        );
        assert_eq!(h.output(&next, pb::LogStream::Stdout), format!("{pid}\n"));
        h.stop(StopReason::Cancel, "canceled");
        assert_eq!(h.ended().await.0, Some(pb::JobStatus::Canceled));
    }

    #[tokio::test]
    async fn a_command_past_its_deadline_times_out_and_a_queued_one_can_be_canceled() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        h.running(&h.lease.clone()).await;
        let slow = h.exec(&["sleep", "100"], |c| {
            c.deadline_unix_ms = unix_ms_in(Duration::from_millis(300));
        });
        let waiting = h.exec(&["echo", "never"], |_| {});
        h.running(&slow).await;
        h.handle.cancel(pb::CancelCommand {
            lease_id: waiting.clone(),
            ..Default::default()
        });
        let s = h.end_of(&waiting).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Canceled);
        assert!(h.output(&waiting, pb::LogStream::Stdout).is_empty());
        let s = h.end_of(&slow).await;
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::TimedOut, pb::FailureKind::Timeout)
        );
        // One already past its deadline does not start.
        let late = h.exec(&["echo", "late"], |c| {
            c.deadline_unix_ms = unix_ms_in(Duration::ZERO) - 1000
        });
        let s = h.end_of(&late).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::TimedOut);
        assert!(h.output(&late, pb::LogStream::Stdout).is_empty());
        h.stop(StopReason::Cancel, "canceled");
        h.ended().await;
    }

    #[tokio::test]
    async fn input_a_command_does_not_read_does_not_hold_it_up() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        h.running(&h.lease.clone()).await;
        let ignores = h.exec(&["true"], |c| c.stdin = vec![b'x'; 1 << 20]);
        assert_eq!(
            status_of(&h.end_of(&ignores).await).0,
            pb::JobStatus::Succeeded
        );
        let counts = h.exec(&["wc", "-c"], |c| c.stdin = vec![b'x'; 1 << 20]);
        h.end_of(&counts).await;
        assert_eq!(h.output(&counts, pb::LogStream::Stdout).trim(), "1048576");
        h.stop(StopReason::Cancel, "canceled");
        h.ended().await;
    }

    #[tokio::test]
    async fn deleting_a_sandbox_stops_its_running_command_then_removes_the_workspace() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        let dir = h.running(&h.lease.clone()).await;
        let busy = h.exec(&["sleep", "100"], |_| {});
        h.running(&busy).await;
        h.stop(StopReason::Cancel, "canceled: idle for 600 s");
        let s = h.end_of(&busy).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Canceled);
        assert!(
            s.message.contains("the sandbox is being deleted"),
            "{}",
            s.message
        );
        let (status, h) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::Canceled));
        assert_eq!(
            h.phases(&h.lease).last(),
            Some(&pb::ExecutorPhase::Removing)
        );
        assert!(!PathBuf::from(&dir).exists());
        // A command that comes now is refused by the agent: the sandbox is gone.
        assert!(h.handle.exec(Box::default()).is_err());
    }

    #[tokio::test]
    async fn a_sandbox_past_its_lifetime_ends_timed_out() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(
            process_executors(root.path()),
            process_spec(),
            unix_ms_in(Duration::from_millis(500)),
        );
        let dir = h.running(&h.lease.clone()).await;
        let busy = h.exec(&["sleep", "100"], |_| {});
        let s = h.end_of(&busy).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Canceled);
        let (status, h) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::TimedOut));
        let s = h.end_of_now(&h.lease);
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::TimedOut, pb::FailureKind::Timeout)
        );
        assert!(!PathBuf::from(&dir).exists());
    }

    #[tokio::test]
    async fn a_draining_runners_sandbox_finishes_its_command_refuses_new_ones_and_succeeds() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        let dir = h.running(&h.lease.clone()).await;
        let running = h.exec(&["sh", "-c", "sleep 0.5; echo finished"], |_| {});
        h.running(&running).await;
        h.handle.drain("SIGTERM received");
        let late = h.exec(&["echo", "late"], |_| {});
        let s = h.end_of(&late).await;
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::Failed, pb::FailureKind::ExecutorError)
        );
        assert_eq!(s.message, DRAINING);
        let s = h.end_of(&running).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Succeeded);
        assert_eq!(h.output(&running, pb::LogStream::Stdout), "finished\n");
        let (status, h) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::Succeeded));
        assert!(h.end_of_now(&h.lease).message.contains("SIGTERM received"));
        assert!(!PathBuf::from(&dir).exists());

        // The drain grace over: the running command is stopped.
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        h.running(&h.lease.clone()).await;
        let busy = h.exec(&["sleep", "100"], |_| {});
        h.running(&busy).await;
        h.handle.drain("SIGTERM received");
        h.stop(
            StopReason::Drain,
            "the runner is leaving (SIGTERM received)",
        );
        let s = h.end_of(&busy).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Failed);
        let (status, _) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::Succeeded));

        // Assigned while the runner drains: nothing is made.
        let h = Harness::start_draining(
            process_executors(root.path()),
            process_spec(),
            0,
            Some("drain requested".to_string()),
        );
        let (status, h) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::Succeeded));
        assert!(h.phases(&h.lease).is_empty());
    }

    #[tokio::test]
    async fn a_lost_sandbox_lease_stops_everything_and_reports_nothing_more() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        let dir = h.running(&h.lease.clone()).await;
        let busy = h.exec(&["sleep", "100"], |_| {});
        let waiting = h.exec(&["echo", "never"], |_| {});
        h.running(&busy).await;
        // As the agent does: forget the reports, then stop.
        h.outbox.drop_attempt(&h.lease);
        assert!(!h.outbox.holds(&busy) && !h.outbox.holds(&waiting));
        h.stop(StopReason::LeaseLost, "revoked");
        let before = h.reports.len();
        let (status, h) = h.ended().await;
        assert_eq!(status, None);
        assert_eq!(h.reports.len(), before, "{:#?}", &h.reports[before..]);
        assert!(!PathBuf::from(&dir).exists());
        assert!(h.outbox.is_empty());
    }

    #[tokio::test]
    async fn a_command_delivered_again_does_not_run_twice() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::start(process_executors(root.path()), process_spec(), 0);
        h.running(&h.lease.clone()).await;
        let mut command = pb::ExecCommand::default();
        let first = h.exec(&["sh", "-c", "echo x >> count"], |c| command = c.clone());
        h.end_of(&first).await;
        // Its reports were acknowledged (the queue settled); the command comes again.
        assert!(!h.outbox.holds(&first));
        h.send(command);
        let check = h.exec(&["cat", "count"], |_| {});
        h.end_of(&check).await;
        assert_eq!(h.output(&check, pb::LogStream::Stdout), "x\n");
        assert!(!h.outbox.holds(&first));
        h.stop(StopReason::Cancel, "canceled");
        h.ended().await;
    }

    #[tokio::test]
    async fn a_command_for_a_sandbox_not_held_fails_at_once() {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let command = pb::ExecCommand {
            command_id: uuid(),
            lease_id: uuid(),
            sandbox_lease_id: uuid(),
            ..Default::default()
        };
        assert!(outbox.open_within(
            &command.sandbox_lease_id,
            &command.command_id,
            &command.lease_id
        ));
        assert!(outbox.held().is_empty(), "a command's lease is not listed");
        let lease = command.lease_id.clone();
        refuse(outbox.clone(), command, "not held here".to_string());
        let until = Instant::now() + WAIT;
        let reports = loop {
            let r = outbox.take_unsent(Budget::UNLIMITED);
            if !r.is_empty() {
                break r;
            }
            assert!(Instant::now() < until);
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(
            matches!(&reports[..], [pb::Report { lease_id, sequence: 1, body: Some(pb::report::Body::Status(s)), .. }]
            if *lease_id == lease && s.status == pb::JobStatus::Failed as i32
                && s.failure_kind == pb::FailureKind::ExecutorError as i32 && s.message == "not held here")
        );
    }

    #[test]
    fn how_a_sandbox_ends_decides_what_it_and_its_waiting_commands_report() {
        let stop = |reason| Stop {
            reason,
            grace: Duration::from_secs(1),
            message: "why".to_string(),
        };
        let s = End::Stopped(stop(StopReason::Cancel))
            .status()
            .expect("reported");
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::Canceled, pb::FailureKind::Canceled)
        );
        let s = End::Stopped(stop(StopReason::Timeout))
            .status()
            .expect("reported");
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::TimedOut, pb::FailureKind::Timeout)
        );
        let s = End::Stopped(stop(StopReason::Drain))
            .status()
            .expect("reported");
        assert_eq!(status_of(&s).0, pb::JobStatus::Succeeded);
        let s = End::Drained("SIGTERM".into()).status().expect("reported");
        assert_eq!(status_of(&s).0, pb::JobStatus::Succeeded);
        assert!(End::Stopped(stop(StopReason::LeaseLost)).status().is_none());
        assert!(
            End::Stopped(stop(StopReason::LeaseLost))
                .refusal()
                .is_none()
        );
        let s = End::Failed(Outcome::failed(
            pb::FailureKind::ImageUnavailable,
            "no image",
        ))
        .status()
        .expect("reported");
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::Failed, pb::FailureKind::ImageUnavailable)
        );
        let r = End::Drained("x".into()).refusal().expect("reported");
        assert_eq!(
            (r.status, r.message.as_str()),
            (pb::JobStatus::Failed, DRAINING)
        );
        // A delete cancels the running command; the drain and a lost lease reach it as such.
        let c = command_stop(&stop(StopReason::Timeout));
        assert_eq!(c.reason, StopReason::Cancel);
        assert!(c.message.starts_with("the sandbox is being deleted"));
        assert_eq!(
            command_stop(&stop(StopReason::Drain)).reason,
            StopReason::Drain
        );
        assert_eq!(
            command_stop(&stop(StopReason::LeaseLost)).reason,
            StopReason::LeaseLost
        );
    }

    /// A channel to nowhere, for work that makes no call.
    fn offline_channel() -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy()
    }

    #[tokio::test]
    async fn a_commands_environment_ends_with_the_runners_variables() {
        let command = pb::ExecCommand {
            sandbox_id: "s".into(),
            command_id: "c".into(),
            env: HashMap::from([
                ("B".to_string(), "2".to_string()),
                ("A".to_string(), "1".to_string()),
                ("GANTRY_RUNNER_ID".to_string(), "forged".to_string()),
                ("GANTRY_ENDPOINT".to_string(), "forged".to_string()),
            ]),
            argv: vec!["true".into()],
            ..Default::default()
        };
        let sandbox = Work {
            job_id: "s".into(),
            attempt: 1,
            lease_id: "l".into(),
            runner_id: "r".into(),
            spec: pb::JobSpec::default(),
            access: crate::relay::Access::offline("gwt_t"),
        };
        let exec = exec_of(
            &command,
            &sandbox,
            Some("unix:///run/gantry/gantry.sock".into()),
        );
        let env: Vec<(&str, &str)> = exec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("A", "1"),
                ("B", "2"),
                ("GANTRY_SANDBOX_ID", "s"),
                ("GANTRY_COMMAND_ID", "c"),
                ("GANTRY_JOB_ID", "s"),
                ("GANTRY_ATTEMPT", "1"),
                ("GANTRY_RUNNER_ID", "r"),
                ("GANTRY_WORK_TOKEN", "gwt_t"),
                ("GANTRY_ENDPOINT", "unix:///run/gantry/gantry.sock"),
            ]
        );
        assert_eq!(exec.working_dir, None);
        assert!(!format!("{exec:?}").contains("gwt_t"));
    }

    #[tokio::test]
    async fn workspaces_left_behind_are_removed_at_start() {
        let root = tempfile::tempdir().expect("tempdir");
        let left = root.path().join(format!("sandbox-{}", uuid()));
        std::fs::create_dir_all(left.join("deep")).expect("mkdir");
        let job_scratch = root.path().join(uuid());
        std::fs::create_dir_all(&job_scratch).expect("mkdir");
        let executor = ProcessExecutor::new(root.path().to_path_buf());
        assert_eq!(executor.remove_orphan_workspaces().await, 1);
        assert!(!left.exists());
        assert!(job_scratch.exists());
    }

    /// A sandbox with inputs and artifacts, on `executors`, its server the fake WorkService:
    /// the inputs are there for its first command, the artifacts stored when it ends.
    async fn sandbox_files(executors: Executors, mut spec: pb::JobSpec) {
        use crate::testing::{FakeInput, FakeServer, TOKEN, blob_of};
        let sandbox_id = uuid();
        let server =
            FakeServer::start(&sandbox_id, vec![FakeInput::Bytes(b"input bytes".to_vec())]).await;
        spec.inputs = vec![pb::Input {
            path: "in/data.txt".into(),
            source: Some(pb::input::Source::BlobDigest(
                blob_of(b"input bytes").digest,
            )),
        }];
        spec.artifacts = vec!["out.txt".into(), "none".into()];
        let served = Served {
            channel: server.channel.clone(),
            sandbox_id: sandbox_id.clone(),
            token: TOKEN.to_string(),
        };
        let mut h = Harness::start_served(executors, spec, served);
        h.running(&h.lease.clone()).await;
        let command = h.exec(
            &[
                "sh",
                "-c",
                "cat in/data.txt; cp in/data.txt out.txt; echo \" $GANTRY_JOB_ID $GANTRY_WORK_TOKEN\"; \
                 test -S \"${GANTRY_ENDPOINT#unix://}\" && echo socket",
            ],
            |_| {},
        );
        let s = h.end_of(&command).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Succeeded, "{s:?}");
        assert_eq!(
            h.output(&command, pb::LogStream::Stdout),
            format!("input bytes {sandbox_id} {TOKEN}\nsocket\n")
        );
        assert!(server.seen().artifacts.is_empty(), "stored when it ends");
        h.stop(StopReason::Cancel, "canceled: deleted");
        let (status, h) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::Canceled));
        assert_eq!(
            server.seen().artifacts.get("out.txt").map(Vec::as_slice),
            Some(&b"input bytes"[..])
        );
        assert_eq!(
            h.output(&h.lease, pb::LogStream::Stderr),
            "gantry: artifact path \"none\" matched nothing\n"
        );
    }

    #[tokio::test]
    async fn a_process_sandbox_has_its_inputs_and_stores_its_artifacts() {
        let root = tempfile::tempdir().expect("tempdir");
        sandbox_files(process_executors(root.path()), process_spec()).await;
    }

    /// Needs the Docker engine and a static busybox (GANTRY_TEST_BUSYBOX).
    #[tokio::test]
    async fn a_docker_sandbox_has_its_inputs_and_stores_its_artifacts() {
        use crate::executor::docker::DockerExecutor;
        let image = busybox_image().await;
        let transit = tempfile::tempdir().expect("tempdir");
        let docker = DockerExecutor::connect(Duration::from_secs(60))
            .await
            .expect("a Docker engine")
            .with_files(None, transit.path().to_path_buf());
        let spec = pb::JobSpec {
            executor: pb::ExecutorKind::Docker as i32,
            image,
            pull_policy: pb::PullPolicy::Never as i32,
            working_dir: "/work".to_string(),
            cancel_grace_seconds: 1,
            ..Default::default()
        };
        sandbox_files(vec![Arc::new(docker)], spec).await;
    }

    /// Needs the Docker engine and a static busybox (GANTRY_TEST_BUSYBOX; scripts/test.sh
    /// sets it): without them it fails saying so.
    #[tokio::test]
    async fn a_docker_sandbox_is_one_labelled_container_whose_commands_are_execs() {
        use crate::executor::docker::{DockerExecutor, sandbox::LABEL_SANDBOX};
        let image = busybox_image().await;
        let docker = Arc::new(
            DockerExecutor::connect(Duration::from_secs(60))
                .await
                .expect("a Docker engine"),
        );
        let engine = bollard::Docker::connect_with_local_defaults().expect("engine");
        let spec = pb::JobSpec {
            executor: pb::ExecutorKind::Docker as i32,
            image: image.clone(),
            pull_policy: pb::PullPolicy::Never as i32,
            working_dir: "/work".to_string(),
            env: HashMap::from([("SBX".to_string(), "sandbox-env".to_string())]),
            cancel_grace_seconds: 1,
            ..Default::default()
        };
        let mut h = Harness::start(vec![docker.clone()], spec.clone(), 0);
        let short_id = h.running(&h.lease.clone()).await;
        assert_eq!(
            h.phases(&h.lease),
            [
                pb::ExecutorPhase::Creating,
                pb::ExecutorPhase::Starting,
                pb::ExecutorPhase::Running
            ]
        );
        let container = engine
            .inspect_container(&short_id, None)
            .await
            .expect("the container");
        let labels = container.config.and_then(|c| c.labels).unwrap_or_default();
        assert_eq!(labels.get(LABEL_SANDBOX), Some(&h.sandbox_id));
        assert_eq!(
            labels.get("gantry.runner-id").map(String::as_str),
            Some(RUNNER)
        );
        assert_eq!(labels.get("gantry.lease-id"), Some(&h.lease));
        assert_eq!(container.host_config.and_then(|c| c.init), Some(true));

        let write = h.exec(
            &["sh", "-c", "echo hello > f; pwd; echo $SBX $FOO $GANTRY_SANDBOX_ID $GANTRY_RUNNER_ID; echo err >&2"],
            |_| {},
        );
        let s = h.end_of(&write).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Succeeded, "{s:?}");
        assert_eq!(
            h.output(&write, pb::LogStream::Stdout),
            format!("/work\nsandbox-env bar {} {RUNNER}\n", h.sandbox_id)
        );
        assert_eq!(h.output(&write, pb::LogStream::Stderr), "err\n");
        let read = h.exec(&["cat", "f"], |_| {});
        h.end_of(&read).await;
        assert_eq!(h.output(&read, pb::LogStream::Stdout), "hello\n");
        let input = h.exec(&["cat"], |c| c.stdin = b"in\nput".to_vec());
        assert_eq!(
            status_of(&h.end_of(&input).await).0,
            pb::JobStatus::Succeeded
        );
        assert_eq!(h.output(&input, pb::LogStream::Stdout), "in\nput");
        let exits = h.exec(&["sh", "-c", "exit 3"], |_| {});
        let s = h.end_of(&exits).await;
        assert_eq!(
            (status_of(&s).1, s.exit_code),
            (pb::FailureKind::ExitNonzero, Some(3))
        );
        let missing = h.exec(&["no-such-program"], |_| {});
        let s = h.end_of(&missing).await;
        assert_eq!(
            status_of(&s),
            (pb::JobStatus::Failed, pb::FailureKind::ExecutorError)
        );
        assert!(
            s.message.contains("no-such-program: command not found"),
            "{}",
            s.message
        );

        // A cancel ends the command and what it started (past a trapped SIGTERM), and only
        // them: the container runs on.
        let busy = h.exec(
            &[
                "sh",
                "-c",
                "trap '' TERM; sleep 100 & echo $! > child; echo ready; wait; wait",
            ],
            |_| {},
        );
        h.running(&busy).await;
        // The trap is set and the child started once "ready" is out.
        let until = Instant::now() + WAIT;
        loop {
            h.collect();
            if h.output(&busy, pb::LogStream::Stdout) == "ready\n" {
                break;
            }
            assert!(Instant::now() < until, "the command never got ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h.handle.cancel(pb::CancelCommand {
            lease_id: busy.clone(),
            grace_seconds: 1,
            reason: "enough".to_string(),
            ..Default::default()
        });
        let s = h.end_of(&busy).await;
        assert_eq!(status_of(&s).0, pb::JobStatus::Canceled, "{s:?}");
        let check = h.exec(
            &[
                "sh",
                "-c",
                "kill -0 $(cat child) 2>/dev/null && echo alive || echo gone",
            ],
            |_| {},
        );
        h.end_of(&check).await;
        assert_eq!(h.output(&check, pb::LogStream::Stdout), "gone\n");

        // What a command leaves running in its group goes when it ends.
        let started = Instant::now();
        let leaves = h.exec(&["sh", "-c", "sleep 100 & echo left"], |_| {});
        assert_eq!(
            status_of(&h.end_of(&leaves).await).0,
            pb::JobStatus::Succeeded
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(h.output(&leaves, pb::LogStream::Stdout), "left\n");

        let slow = h.exec(&["sleep", "100"], |c| {
            c.deadline_unix_ms = unix_ms_in(Duration::from_millis(500));
        });
        assert_eq!(status_of(&h.end_of(&slow).await).0, pb::JobStatus::TimedOut);

        // A delete stops the running command and removes the container.
        let running = h.exec(&["sleep", "100"], |_| {});
        h.running(&running).await;
        h.stop(StopReason::Cancel, "canceled: deleted");
        assert_eq!(
            status_of(&h.end_of(&running).await).0,
            pb::JobStatus::Canceled
        );
        let (status, _) = h.ended().await;
        assert_eq!(status, Some(pb::JobStatus::Canceled));
        assert!(engine.inspect_container(&short_id, None).await.is_err());

        // A sandbox container a crashed runner left is removed by the orphan cleanup.
        let mut h = Harness::start(vec![docker.clone()], spec, 0);
        let short_id = h.running(&h.lease.clone()).await;
        h.task.abort();
        assert!(engine.inspect_container(&short_id, None).await.is_ok());
        assert!(
            docker
                .remove_orphans(&[RUNNER.to_string()])
                .await
                .expect("cleanup")
                >= 1
        );
        assert!(engine.inspect_container(&short_id, None).await.is_err());
    }
}
