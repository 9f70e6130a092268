//! The runner's phases, and the one place where it moves from one to the next.
//!
//! A runner serves until something makes it leave: a drain (SIGTERM, a drain command, the
//! idle timeout), or `--once` having taken its job. Leaving is several steps, each with its
//! own rule: take no new work and tell the server (the drain is proven taken in once a
//! heartbeat queued after it is answered, so no assignment is still on its way); let running
//! work finish within the drain grace (`--once`: however long it takes), then stop it; once
//! no work runs, wait until the server has acknowledged every report, or give up after
//! `--report-wait-seconds`; then exit (the agent deregisters). A second signal stops the work
//! at once. A session replaced by another process holding this runner's identity ends
//! everything as lost, and the runner fails.
//!
//! These rules used to hide in an `Option` of flags and four timers inside the agent's loop.
//! Here each phase is a variant of [`Phase`], and [`transition`] is a pure function: from the
//! phase, an [`Event`] and the [`Facts`] it needs (jobs running, outbox empty, connected,
//! now), it returns the next phase and the [`Action`]s the agent carries out (announce the
//! drain, stop the work, exit). Nothing here sleeps or touches the network; the agent asks
//! [`deadline`] when to come back with [`Event::Clock`]. So every rule is unit-tested with
//! made-up instants.
use std::time::Duration;

use gantry_proto as pb;
use tokio::time::Instant;

/// How the runner ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Drained and deregistered.
    Drained,
    /// `--once`: the one job ended with this status (`None`: the lease was taken away; no
    /// job at all came before a drain or the idle timeout gives `Drained`).
    Once(Option<pb::JobStatus>),
}

impl Exit {
    /// The process exit code (see `gantry-runner --help`).
    pub fn code(self) -> u8 {
        match self {
            Exit::Drained | Exit::Once(Some(pb::JobStatus::Succeeded)) => 0,
            Exit::Once(Some(pb::JobStatus::Canceled)) => 3,
            Exit::Once(Some(pb::JobStatus::TimedOut)) => 4,
            Exit::Once(None) => 5,
            Exit::Once(Some(_)) => 1,
        }
    }
}

/// The settings the transitions follow (from the flags).
#[derive(Clone, Debug)]
pub struct Rules {
    /// `--once`: take one job, then leave with its outcome.
    pub once: bool,
    /// How long running work may take to finish once a drain starts.
    pub drain_grace: Duration,
    /// Once the work is done, how long to wait for acknowledgements before leaving anyway.
    pub report_wait: Duration,
    /// Leave after this long without work (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// What a transition needs to know about the rest of the runner, as of the event.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// The time of the event.
    pub now: Instant,
    /// Jobs running on this runner (after the event: a taken job counts, an ended one not).
    pub jobs_running: usize,
    /// No attempt is held and no report is unacknowledged.
    pub outbox_empty: bool,
    /// A session is open (a drain can be announced on it now).
    pub connected: bool,
    /// The number the next heartbeat queued on the current session will carry (heartbeats
    /// count from 1 on each session, and are answered in order).
    pub next_heartbeat: u64,
}

/// What happened.
#[derive(Clone, Debug)]
pub enum Event {
    /// A session opened (the welcome came).
    SessionOpened,
    /// This many heartbeats of the current session are answered.
    HeartbeatsAnswered(u64),
    /// A job was assigned and started.
    JobTaken,
    /// A job ended with this status (`None`: its lease was lost).
    JobEnded(Option<pb::JobStatus>),
    /// Leave: take no new work, let running work finish within the drain grace (a signal,
    /// a drain command).
    Drain(String),
    /// Leave now: stop the running work at once (a second signal).
    StopNow(String),
    /// A newer session with this runner's credential replaced this one.
    Replaced,
    /// Time passed, or something the facts show changed (an acknowledgement emptied the
    /// outbox): deadlines due by `now` fire, and the runner leaves if it may.
    Clock,
}

/// What the agent does for a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Tell the server on the current session that the runner is leaving (with this
    /// reason), then queue the heartbeat numbered `Facts::next_heartbeat` right behind it:
    /// its answer proves the server took the drain in.
    AnnounceDrain(String),
    /// The drain grace is over (or a second signal came): stop all running work; the runner
    /// leaves for this reason.
    StopAllWork(String),
    /// Another process holds this runner's identity: stop all work as lost (reporting
    /// nothing more), and forget every report.
    LoseAllWork(String),
    /// Leave: deregister, and end with this exit. `acknowledged`: the server acknowledged
    /// everything (false: gave up waiting).
    Exit {
        /// How the runner ended.
        exit: Exit,
        /// Whether every report was acknowledged before leaving.
        acknowledged: bool,
    },
    /// End with this error, without deregistering (the identity is someone else's now).
    Fail(String),
}

/// When the running work is stopped while the runner leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopWork {
    /// Never: `--once` lets its job run to its end.
    RunToEnd,
    /// At this time: the end of the drain grace, or now after a second signal.
    At(Instant),
    /// Already asked to stop: the work ends by its own stop grace.
    Asked,
}

/// Whether the server has taken the drain in, on the current session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// Not announced on this session yet (no session is open).
    Unannounced,
    /// Announced; taken in once this many heartbeats are answered.
    Awaiting(u64),
    /// Taken in: no assignment is on its way any more.
    Confirmed,
}

/// What every leaving phase carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leave {
    /// Why the runner leaves (sent in `drain` and `hello`, and logged).
    pub reason: String,
    /// What happens to running work.
    pub stop_work: StopWork,
    /// Whether the server has taken the drain in.
    pub sync: Sync,
    /// `--once`: how the first job that ended ended (the exit status comes from it).
    pub once_outcome: Option<Option<pb::JobStatus>>,
}

/// Where the runner is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Taking work. The idle timeout counts from `idle_since` while no job runs.
    Serving {
        /// When the last job ended (or the runner started).
        idle_since: Instant,
    },
    /// `--once` took its job: no new work; the job runs to its end, however long.
    OnceTaken(Leave),
    /// Draining: no new work; running work is stopped when `stop_work` says.
    Draining(Leave),
    /// No work runs any more: waiting until the server has taken the drain in and
    /// acknowledged every report; leaving anyway at `give_up_at`. (Work that still arrives,
    /// pushed before the server took the drain in, runs first.)
    Settling {
        /// The leave in progress.
        leave: Leave,
        /// When the runner stops waiting for acknowledgements.
        give_up_at: Instant,
    },
    /// A newer session with this runner's credential replaced this one: the work is being
    /// stopped as lost; the runner fails once it has ended. No reconnect.
    Superseded,
    /// Left with this exit.
    Done(Exit),
}

impl Phase {
    /// A runner that starts now.
    pub fn start(now: Instant) -> Phase {
        Phase::Serving { idle_since: now }
    }

    /// Whether the runner takes new work.
    pub fn takes_work(&self) -> bool {
        matches!(self, Phase::Serving { .. })
    }

    /// Whether the runner holds (or reopens) a session.
    pub fn connects(&self) -> bool {
        !matches!(self, Phase::Superseded | Phase::Done(_))
    }

    /// The leave in progress, if any.
    pub fn leave(&self) -> Option<&Leave> {
        match self {
            Phase::OnceTaken(l) | Phase::Draining(l) | Phase::Settling { leave: l, .. } => Some(l),
            _ => None,
        }
    }

    fn leave_mut(&mut self) -> Option<&mut Leave> {
        match self {
            Phase::OnceTaken(l) | Phase::Draining(l) | Phase::Settling { leave: l, .. } => Some(l),
            _ => None,
        }
    }

    /// The phase's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Serving { .. } => "serving",
            Phase::OnceTaken(_) => "once-taken",
            Phase::Draining(_) => "draining",
            Phase::Settling { .. } => "settling",
            Phase::Superseded => "superseded",
            Phase::Done(_) => "done",
        }
    }
}

/// The outcome of a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The phase after the event.
    pub next: Phase,
    /// What the agent does, in order.
    pub actions: Vec<Action>,
}

/// The message a job stopped by the drain ends with.
pub fn stop_message(reason: &str, rules: &Rules) -> String {
    format!(
        "the runner is leaving ({reason}) and the work did not finish within the drain grace of {} s",
        rules.drain_grace.as_secs()
    )
}

/// The next phase after `event`, and what to do. Every event is followed by the deadlines
/// due at `facts.now`, then by the check whether the runner may leave.
pub fn transition(phase: &Phase, rules: &Rules, event: Event, facts: &Facts) -> Step {
    let mut step = Step {
        next: phase.clone(),
        actions: Vec::new(),
    };
    step.on_event(rules, event, facts);
    step.on_deadlines(rules, facts);
    step.settle(rules, facts);
    step
}

/// When the runner must come back with [`Event::Clock`] (`None`: no deadline runs).
pub fn deadline(phase: &Phase, rules: &Rules, facts: &Facts) -> Option<Instant> {
    match phase {
        Phase::Serving { idle_since } if facts.jobs_running == 0 => {
            rules.idle_timeout.map(|t| *idle_since + t)
        }
        Phase::Draining(Leave {
            stop_work: StopWork::At(at),
            ..
        }) if facts.jobs_running > 0 => Some(*at),
        Phase::Settling { give_up_at, .. } => Some(*give_up_at),
        _ => None,
    }
}

fn exit(leave: &Leave, rules: &Rules) -> Exit {
    match leave.once_outcome {
        Some(outcome) if rules.once => Exit::Once(outcome),
        _ => Exit::Drained,
    }
}

impl Step {
    fn on_event(&mut self, rules: &Rules, event: Event, facts: &Facts) {
        match event {
            Event::SessionOpened => {
                if let Some(leave) = self.next.leave_mut() {
                    announce(leave, facts, &mut self.actions);
                }
            }
            Event::HeartbeatsAnswered(answered) => {
                if let Some(leave) = self.next.leave_mut()
                    && matches!(leave.sync, Sync::Awaiting(n) if answered >= n)
                {
                    leave.sync = Sync::Confirmed;
                }
            }
            Event::JobTaken => {
                if rules.once && self.next.takes_work() {
                    let leave = self.announced_leave(
                        "--once: took its one job".to_string(),
                        StopWork::RunToEnd,
                        facts,
                    );
                    self.next = Phase::OnceTaken(leave);
                }
            }
            Event::JobEnded(status) => match &mut self.next {
                Phase::Serving { idle_since } if facts.jobs_running == 0 => *idle_since = facts.now,
                phase => {
                    if let Some(leave) = phase.leave_mut()
                        && rules.once
                        && leave.once_outcome.is_none()
                    {
                        leave.once_outcome = Some(status);
                    }
                }
            },
            Event::Drain(reason) => match &mut self.next {
                Phase::Serving { .. } => {
                    self.begin_leaving(reason, StopWork::At(facts.now + rules.drain_grace), facts);
                }
                // A drain after `--once` took its job starts the drain grace; otherwise the
                // first drain's deadline stands.
                Phase::OnceTaken(leave) => {
                    let mut leave = leave.clone();
                    leave.stop_work = StopWork::At(facts.now + rules.drain_grace);
                    self.next = Phase::Draining(leave);
                }
                Phase::Settling { leave, .. } if leave.stop_work == StopWork::RunToEnd => {
                    leave.stop_work = StopWork::At(facts.now + rules.drain_grace);
                }
                _ => {}
            },
            Event::StopNow(reason) => match &mut self.next {
                Phase::Serving { .. } => self.begin_leaving(reason, StopWork::At(facts.now), facts),
                Phase::OnceTaken(leave) => {
                    let mut leave = leave.clone();
                    leave.stop_work = StopWork::At(facts.now);
                    self.next = Phase::Draining(leave);
                }
                Phase::Draining(leave) | Phase::Settling { leave, .. } => {
                    leave.stop_work = StopWork::At(facts.now);
                }
                Phase::Superseded | Phase::Done(_) => {}
            },
            Event::Replaced => {
                if !matches!(self.next, Phase::Done(_) | Phase::Superseded) {
                    self.next = Phase::Superseded;
                    self.actions.push(Action::LoseAllWork(
                        "a newer session with this runner's credential replaced this one: another process holds this runner's identity"
                            .to_string(),
                    ));
                }
            }
            Event::Clock => {}
        }
    }

    /// From serving to draining, announcing it.
    fn begin_leaving(&mut self, reason: String, stop_work: StopWork, facts: &Facts) {
        let leave = self.announced_leave(reason, stop_work, facts);
        self.next = Phase::Draining(leave);
    }

    /// A new leave, announced to the server when a session is open.
    fn announced_leave(&mut self, reason: String, stop_work: StopWork, facts: &Facts) -> Leave {
        let mut leave = Leave {
            reason,
            stop_work,
            sync: Sync::Unannounced,
            once_outcome: None,
        };
        announce(&mut leave, facts, &mut self.actions);
        leave
    }

    fn on_deadlines(&mut self, rules: &Rules, facts: &Facts) {
        match &mut self.next {
            Phase::Serving { idle_since } => {
                if let Some(timeout) = rules.idle_timeout
                    && facts.jobs_running == 0
                    && facts.now >= *idle_since + timeout
                {
                    self.begin_leaving(
                        format!("idle for {} s", timeout.as_secs()),
                        StopWork::At(facts.now + rules.drain_grace),
                        facts,
                    );
                }
            }
            Phase::Draining(leave) => {
                if let StopWork::At(at) = leave.stop_work
                    && facts.jobs_running > 0
                    && facts.now >= at
                {
                    // Stopped once; the jobs now end by their own grace.
                    leave.stop_work = StopWork::Asked;
                    self.actions
                        .push(Action::StopAllWork(stop_message(&leave.reason, rules)));
                }
            }
            Phase::Settling { leave, give_up_at } => {
                if facts.jobs_running == 0 && facts.now >= *give_up_at {
                    let exit = exit(leave, rules);
                    self.actions.push(Action::Exit {
                        exit,
                        acknowledged: false,
                    });
                    self.next = Phase::Done(exit);
                }
            }
            Phase::OnceTaken(_) | Phase::Superseded | Phase::Done(_) => {}
        }
    }

    /// Whether the runner may leave: it is leaving, the server has taken its drain in (so
    /// no assignment is still on its way), and its work is done and acknowledged.
    fn settle(&mut self, rules: &Rules, facts: &Facts) {
        let working = facts.jobs_running > 0;
        match &self.next {
            Phase::OnceTaken(leave) | Phase::Draining(leave) | Phase::Settling { leave, .. }
                if !working =>
            {
                if leave.sync == Sync::Confirmed && facts.outbox_empty {
                    let exit = exit(leave, rules);
                    self.actions.push(Action::Exit {
                        exit,
                        acknowledged: true,
                    });
                    self.next = Phase::Done(exit);
                } else if !matches!(self.next, Phase::Settling { .. }) {
                    self.next = Phase::Settling {
                        leave: leave.clone(),
                        give_up_at: facts.now + rules.report_wait,
                    };
                }
            }
            // Work came in after the clock started: it runs first.
            Phase::Settling { leave, .. } => {
                let leave = leave.clone();
                self.next = match leave.stop_work {
                    StopWork::RunToEnd => Phase::OnceTaken(leave),
                    _ => Phase::Draining(leave),
                };
            }
            // The agent ends with the error at once.
            Phase::Superseded if !working => self.actions.push(Action::Fail(
                "another process took over this runner's identity (a newer session with its credential replaced this one); its work here was stopped".to_string(),
            )),
            _ => {}
        }
    }
}

/// Announces the drain when a session is open (otherwise the next session's opening does).
fn announce(leave: &mut Leave, facts: &Facts, actions: &mut Vec<Action>) {
    if facts.connected {
        actions.push(Action::AnnounceDrain(leave.reason.clone()));
        leave.sync = Sync::Awaiting(facts.next_heartbeat);
    } else {
        leave.sync = Sync::Unannounced;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);
    const WAIT: Duration = Duration::from_secs(30);

    fn rules() -> Rules {
        Rules {
            once: false,
            drain_grace: GRACE,
            report_wait: WAIT,
            idle_timeout: None,
        }
    }

    /// A runner's surroundings as a scenario goes on.
    struct World {
        t0: Instant,
        facts: Facts,
        phase: Phase,
        rules: Rules,
    }

    impl World {
        fn new(rules: Rules) -> World {
            let t0 = Instant::now();
            World {
                t0,
                facts: Facts {
                    now: t0,
                    jobs_running: 0,
                    outbox_empty: true,
                    connected: true,
                    next_heartbeat: 1,
                },
                phase: Phase::start(t0),
                rules,
            }
        }

        fn at(&mut self, secs: u64) -> &mut Self {
            self.facts.now = self.t0 + Duration::from_secs(secs);
            self
        }

        fn on(&mut self, event: Event) -> Vec<Action> {
            let step = transition(&self.phase, &self.rules, event, &self.facts);
            self.phase = step.next;
            if step
                .actions
                .iter()
                .any(|a| matches!(a, Action::AnnounceDrain(_)))
            {
                // The agent queues the sync heartbeat right behind the drain.
                self.facts.next_heartbeat += 1;
            }
            step.actions
        }

        fn take_job(&mut self) -> Vec<Action> {
            self.facts.jobs_running += 1;
            self.facts.outbox_empty = false;
            self.on(Event::JobTaken)
        }

        fn end_job(&mut self, status: Option<pb::JobStatus>) -> Vec<Action> {
            self.facts.jobs_running -= 1;
            self.on(Event::JobEnded(status))
        }

        fn deadline(&self) -> Option<Instant> {
            deadline(&self.phase, &self.rules, &self.facts)
        }

        fn secs(&self, at: Instant) -> u64 {
            (at - self.t0).as_secs()
        }
    }

    fn stop_all(actions: &[Action]) -> bool {
        actions.iter().any(|a| matches!(a, Action::StopAllWork(_)))
    }

    #[test]
    fn a_drain_lets_work_finish_within_the_grace_then_stops_it() {
        let mut w = World::new(rules());
        w.take_job();
        let actions = w.at(5).on(Event::Drain("SIGTERM received".into()));
        assert_eq!(actions, [Action::AnnounceDrain("SIGTERM received".into())]);
        assert!(!w.phase.takes_work());
        assert_eq!(w.deadline().map(|d| w.secs(d)), Some(65));
        // Before the grace ends nothing happens; a second drain keeps the first deadline.
        assert!(w.at(64).on(Event::Drain("again".into())).is_empty());
        assert_eq!(w.deadline().map(|d| w.secs(d)), Some(65));
        let actions = w.at(65).on(Event::Clock);
        assert!(stop_all(&actions), "{actions:?}");
        // Stopped once: the job ends by its own grace, no further deadline.
        assert_eq!(w.deadline(), None);
        assert!(w.at(70).on(Event::Clock).is_empty());
    }

    #[test]
    fn a_second_signal_stops_the_work_at_once() {
        let mut w = World::new(rules());
        w.take_job();
        w.at(1).on(Event::Drain("SIGTERM received".into()));
        let actions = w.at(2).on(Event::StopNow("SIGTERM received again".into()));
        assert!(stop_all(&actions), "{actions:?}");
        // The message keeps the reason the runner leaves for.
        assert!(
            matches!(&actions[..], [Action::StopAllWork(m)] if m.contains("SIGTERM received)"))
        );
        // A stop-now while serving leaves and stops in one step.
        let mut w = World::new(rules());
        w.take_job();
        let actions = w.on(Event::StopNow("stop".into()));
        assert!(matches!(
            &actions[..],
            [Action::AnnounceDrain(_), Action::StopAllWork(_)]
        ));
    }

    #[test]
    fn leaving_waits_for_the_server_to_take_the_drain_in_and_to_acknowledge_everything() {
        let mut w = World::new(rules());
        w.take_job();
        w.at(1).on(Event::Drain("drain requested".into()));
        assert_eq!(
            w.phase.leave().map(|l| l.sync),
            Some(Sync::Awaiting(1)),
            "the heartbeat queued behind the drain"
        );
        assert!(w.at(2).end_job(Some(pb::JobStatus::Succeeded)).is_empty());
        assert!(matches!(w.phase, Phase::Settling { .. }));
        // Acknowledgements alone are not enough: an assignment may still be on its way.
        w.facts.outbox_empty = true;
        assert!(w.at(3).on(Event::Clock).is_empty());
        let actions = w.at(4).on(Event::HeartbeatsAnswered(1));
        assert_eq!(
            actions,
            [Action::Exit {
                exit: Exit::Drained,
                acknowledged: true
            }]
        );
        assert_eq!(w.phase, Phase::Done(Exit::Drained));
    }

    #[test]
    fn a_runner_gives_up_waiting_for_acknowledgements_after_the_report_wait() {
        let mut w = World::new(rules());
        w.facts.outbox_empty = false;
        w.facts.connected = false;
        w.at(10).on(Event::Drain("SIGTERM received".into()));
        assert_eq!(w.phase.leave().map(|l| l.sync), Some(Sync::Unannounced));
        assert_eq!(w.deadline().map(|d| w.secs(d)), Some(40));
        assert!(w.at(39).on(Event::Clock).is_empty());
        let actions = w.at(40).on(Event::Clock);
        assert_eq!(
            actions,
            [Action::Exit {
                exit: Exit::Drained,
                acknowledged: false
            }]
        );
    }

    #[test]
    fn work_that_arrives_while_settling_runs_first() {
        let mut w = World::new(rules());
        w.facts.outbox_empty = false;
        w.at(0).on(Event::Drain("drain".into()));
        assert!(matches!(w.phase, Phase::Settling { .. }));
        // Pushed before the server took the drain in.
        w.at(1).take_job();
        assert!(matches!(w.phase, Phase::Draining(_)));
        // The give-up clock does not run while it does; the drain deadline does.
        assert!(!stop_all(&w.at(30).on(Event::Clock)));
        assert!(stop_all(&w.at(60).on(Event::Clock)));
        w.at(61).end_job(Some(pb::JobStatus::Failed));
        assert_eq!(w.deadline().map(|d| w.secs(d)), Some(91));
    }

    #[test]
    fn the_drain_is_announced_again_on_every_new_session() {
        let mut w = World::new(rules());
        w.take_job();
        w.on(Event::Drain("drain".into()));
        // The session breaks; the next one starts counting heartbeats from 1 again.
        w.facts.next_heartbeat = 1;
        let actions = w.on(Event::SessionOpened);
        assert_eq!(actions, [Action::AnnounceDrain("drain".into())]);
        assert_eq!(w.phase.leave().map(|l| l.sync), Some(Sync::Awaiting(1)));
        // A serving runner announces nothing.
        let mut w = World::new(rules());
        assert!(w.on(Event::SessionOpened).is_empty());
    }

    #[test]
    fn once_takes_one_job_lets_it_run_to_its_end_and_exits_with_its_outcome() {
        let mut w = World::new(Rules {
            once: true,
            ..rules()
        });
        let actions = w.take_job();
        assert_eq!(
            actions,
            [Action::AnnounceDrain("--once: took its one job".into())]
        );
        assert!(matches!(w.phase, Phase::OnceTaken(_)));
        // No deadline: the job runs however long it takes.
        assert_eq!(w.deadline(), None);
        assert!(w.at(100_000).on(Event::Clock).is_empty());
        w.on(Event::HeartbeatsAnswered(1));
        w.end_job(Some(pb::JobStatus::TimedOut));
        w.facts.outbox_empty = true;
        let actions = w.on(Event::Clock);
        assert_eq!(
            actions,
            [Action::Exit {
                exit: Exit::Once(Some(pb::JobStatus::TimedOut)),
                acknowledged: true
            }]
        );
    }

    #[test]
    fn a_drain_after_once_took_its_job_starts_the_grace() {
        let mut w = World::new(Rules {
            once: true,
            ..rules()
        });
        w.take_job();
        w.at(10).on(Event::Drain("SIGTERM received".into()));
        assert!(matches!(w.phase, Phase::Draining(_)));
        assert_eq!(w.deadline().map(|d| w.secs(d)), Some(70));
        assert!(stop_all(&w.at(70).on(Event::Clock)));
        // The lease was lost meanwhile: exit code 5.
        w.end_job(None);
        w.on(Event::HeartbeatsAnswered(5));
        w.facts.outbox_empty = true;
        let actions = w.on(Event::Clock);
        assert!(matches!(
            &actions[..],
            [Action::Exit {
                exit: Exit::Once(None),
                ..
            }]
        ));
        // --once drained before any job: Drained.
        let mut w = World::new(Rules {
            once: true,
            ..rules()
        });
        w.on(Event::Drain("SIGTERM received".into()));
        let actions = w.on(Event::HeartbeatsAnswered(1));
        assert!(matches!(
            &actions[..],
            [Action::Exit {
                exit: Exit::Drained,
                ..
            }]
        ));
    }

    #[test]
    fn the_idle_timeout_drains_a_runner_without_work() {
        let mut w = World::new(Rules {
            idle_timeout: Some(Duration::from_secs(20)),
            ..rules()
        });
        assert_eq!(w.deadline().map(|d| w.secs(d)), Some(20));
        // Work resets the idle clock.
        w.at(5).take_job();
        assert_eq!(w.deadline(), None);
        w.at(15).end_job(Some(pb::JobStatus::Succeeded));
        assert_eq!(w.deadline().map(|d| w.secs(d)), Some(35));
        assert!(w.at(34).on(Event::Clock).is_empty());
        let actions = w.at(35).on(Event::Clock);
        assert_eq!(actions, [Action::AnnounceDrain("idle for 20 s".into())]);
        assert!(matches!(w.phase, Phase::Settling { .. }));
        w.facts.outbox_empty = true;
        let actions = w.on(Event::HeartbeatsAnswered(1));
        assert!(matches!(&actions[..], [Action::Exit { .. }]));
    }

    #[test]
    fn a_replaced_session_loses_all_work_and_fails_once_it_has_stopped() {
        let mut w = World::new(rules());
        w.take_job();
        let actions = w.on(Event::Replaced);
        assert!(matches!(&actions[..], [Action::LoseAllWork(_)]));
        assert!(!w.phase.connects());
        // Signals change nothing now.
        assert!(w.on(Event::StopNow("SIGTERM".into())).is_empty());
        let actions = w.end_job(None);
        assert!(matches!(&actions[..], [Action::Fail(m)] if m.contains("another process")));
    }

    #[test]
    fn exit_codes_follow_the_outcome() {
        assert_eq!(Exit::Drained.code(), 0);
        assert_eq!(Exit::Once(Some(pb::JobStatus::Succeeded)).code(), 0);
        assert_eq!(Exit::Once(Some(pb::JobStatus::Failed)).code(), 1);
        assert_eq!(Exit::Once(Some(pb::JobStatus::Canceled)).code(), 3);
        assert_eq!(Exit::Once(Some(pb::JobStatus::TimedOut)).code(), 4);
        assert_eq!(Exit::Once(None).code(), 5);
    }
}
