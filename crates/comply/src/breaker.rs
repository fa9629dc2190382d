//! The circuit breaker of one upstream: after `failures` consecutive
//! failures (5xx, timeouts, connection errors) nothing is sent for
//! `cooldown`; then one probe goes, and its answer closes or reopens it.

use crate::scheduler::Event;
use std::time::Duration;
use tollgate_core::Nanos;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures (5xx, timeouts, connection errors) that open it.
    pub failures: u32,
    /// How long it stays open before one probe is let through.
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Nanos },
    HalfOpen { probing: bool },
}

/// What the breaker lets through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Pass,
    /// Open: nothing goes before this instant.
    OpenUntil(Nanos),
    /// Half-open with its probe out: nothing goes until it answers.
    Probing,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    state: State,
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            state: State::Closed { failures: 0 },
        }
    }

    /// Whether a send may go now; an open breaker whose cooldown ended
    /// turns half-open here (and says so in `events`).
    pub(crate) fn gate(&mut self, now: Nanos, events: &mut Vec<Event>) -> Gate {
        match self.state {
            State::Open { until } if now < until => Gate::OpenUntil(until),
            State::Open { .. } => {
                self.state = State::HalfOpen { probing: false };
                events.push(Event::BreakerHalfOpen);
                Gate::Pass
            }
            State::HalfOpen { probing: true } => Gate::Probing,
            _ => Gate::Pass,
        }
    }

    /// The instant an open breaker lets a probe through.
    pub(crate) fn open_until(&self) -> Option<Nanos> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// A send went: in half-open it is the probe.
    pub(crate) fn sent(&mut self) {
        if let State::HalfOpen { probing } = &mut self.state {
            *probing = true;
        }
    }

    /// The upstream answered (any status that says it is alive).
    pub(crate) fn succeeded(&mut self, events: &mut Vec<Event>) {
        match self.state {
            State::HalfOpen { .. } => {
                self.state = State::Closed { failures: 0 };
                events.push(Event::BreakerClosed);
            }
            State::Closed { .. } => self.state = State::Closed { failures: 0 },
            State::Open { .. } => {}
        }
    }

    /// A probe that never got an answer (its caller went away) leaves the
    /// breaker half-open for the next probe.
    pub(crate) fn probe_abandoned(&mut self) {
        if let State::HalfOpen { probing } = &mut self.state {
            *probing = false;
        }
    }

    pub(crate) fn failed(&mut self, now: Nanos, events: &mut Vec<Event>) {
        match self.state {
            State::Closed { failures } if failures + 1 >= self.settings.failures => {
                self.open(now, failures + 1, events);
            }
            State::Closed { failures } => {
                self.state = State::Closed {
                    failures: failures + 1,
                }
            }
            State::HalfOpen { .. } => self.open(now, 1, events),
            State::Open { .. } => {}
        }
    }

    fn open(&mut self, now: Nanos, failures: u32, events: &mut Vec<Event>) {
        let until = now + crate::retry::nanos(self.settings.cooldown);
        self.state = State::Open { until };
        events.push(Event::BreakerOpened { failures, until });
    }
}
