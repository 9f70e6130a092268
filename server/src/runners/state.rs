//! The runner state machine: the one place that decides whether a runner is ONLINE (taking
//! work), DRAINING (taking none, finishing what it holds) or OFFLINE (silent or gone), and
//! what makes a runner's credential stop working. Pure functions; [`super`] writes their
//! answers.
//!
//! The rules:
//! - A session opens in the state the runner announces: DRAINING when its hello says it is
//!   draining, or when an operator's drain is still waiting to be delivered to it; ONLINE
//!   otherwise — whatever it was before (a runner its operator restarts after a drain is
//!   ready for work again).
//! - A heartbeat brings back an OFFLINE runner (it had gone silent) as ONLINE, and leaves
//!   DRAINING as it is: coming back never makes a draining runner take work again.
//! - A drain, from an operator or from the runner itself, makes it DRAINING.
//! - Silence for a lease period makes an ONLINE runner OFFLINE (a draining one stays
//!   DRAINING, for the same reason).
//! - Deregistering makes it OFFLINE and revokes its credential: every later call with it is
//!   UNAUTHENTICATED ([`crate::error::Error::revoked_runner`]), and the runner must register
//!   again. So is every call of a runner that retention has deleted
//!   ([`crate::error::Error::unknown_runner`]).
use gantry_proto::RunnerState;

/// What happens to a runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// It opened a session; `draining`: its hello says it drains; `drain_pending`: an
    /// operator's drain has not been acknowledged yet.
    SessionOpened { draining: bool, drain_pending: bool },
    /// It heartbeated (unary or on its session).
    Heartbeat,
    /// An operator drained it (`DrainRunner`).
    OperatorDrain,
    /// It drains itself (SIGTERM, a drain command, `--once`).
    SelfDrain,
    /// It has not been heard from for a lease period.
    Silent,
    /// It deregistered.
    Deregistered,
}

/// The state after `event` in state `from`.
pub fn next(from: RunnerState, event: Event) -> RunnerState {
    use RunnerState::*;
    match event {
        Event::SessionOpened {
            draining: true,
            drain_pending: _,
        }
        | Event::SessionOpened {
            draining: _,
            drain_pending: true,
        } => Draining,
        Event::SessionOpened { .. } => Online,
        Event::Heartbeat => match from {
            Offline | Unspecified => Online,
            other => other,
        },
        Event::OperatorDrain | Event::SelfDrain => Draining,
        Event::Silent => match from {
            Online | Unspecified => Offline,
            other => other,
        },
        Event::Deregistered => Offline,
    }
}

/// A stored state number as the enum.
pub fn state_of(raw: i32) -> RunnerState {
    RunnerState::try_from(raw).unwrap_or(RunnerState::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunnerState::*;

    const ALL: [RunnerState; 3] = [Online, Draining, Offline];

    #[test]
    fn a_session_opens_in_the_state_the_runner_announces() {
        for from in ALL {
            let open = |draining, drain_pending| {
                next(
                    from,
                    Event::SessionOpened {
                        draining,
                        drain_pending,
                    },
                )
            };
            assert_eq!(open(false, false), Online, "from {from:?}");
            assert_eq!(open(true, false), Draining, "from {from:?}");
            assert_eq!(open(false, true), Draining, "from {from:?}");
        }
    }

    #[test]
    fn coming_back_never_undoes_a_drain() {
        assert_eq!(next(Offline, Event::Heartbeat), Online);
        assert_eq!(next(Draining, Event::Heartbeat), Draining);
        assert_eq!(next(Online, Event::Heartbeat), Online);
        assert_eq!(next(Draining, Event::Silent), Draining);
        assert_eq!(next(Online, Event::Silent), Offline);
    }

    #[test]
    fn drains_and_deregistration() {
        for from in ALL {
            assert_eq!(next(from, Event::OperatorDrain), Draining);
            assert_eq!(next(from, Event::SelfDrain), Draining);
            assert_eq!(next(from, Event::Deregistered), Offline);
        }
    }
}
