//! The algorithms. Each one is a pure meter over a small state value:
//! given the state as of `now`, when could `cost` be admitted, and what does the
//! state become if it is admitted at that instant. Stores keep the state;
//! `crate::decide` combines the meters of one request.

pub mod concurrency;
pub mod fixed_window;
pub mod gcra;
pub mod sliding_window;
pub mod tiered;

use crate::units::Nanos;

/// When a cost could be admitted, if nothing else arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earliest {
    /// At this instant (>= the `from` asked about).
    At(Nanos),
    /// Only when something in flight is released: no instant can be promised.
    OnRelease,
    /// The cost is larger than the limit could ever admit; `capacity` is the most it can.
    Never {
        /// The most the limit admits at once.
        capacity: u64,
    },
}

/// What a client may see of a limit for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Units left that could be admitted now.
    pub remaining: u64,
    /// Nanoseconds until the pool next grows (0 if it is full).
    pub reset: Nanos,
}

/// One algorithm's parameters bound to one key's state.
pub trait Meter: std::fmt::Debug {
    /// Earliest instant >= `from` at which `cost` fits, with the state as it is.
    fn earliest(&self, now: Nanos, cost: u64, from: Nanos) -> Earliest;
    /// Whether the state can record an admission at `at` (reservations reach
    /// only as far ahead as the state keeps; GCRA reaches any distance).
    fn reservable(&self, now: Nanos, at: Nanos) -> bool;
    /// Record an admission of `cost` at `at` (>= now).
    fn commit(&mut self, now: Nanos, cost: u64, at: Nanos);
    /// Charge `amount` after the fact (latency cost at completion).
    fn debit(&mut self, now: Nanos, amount: u64);
    /// Give back `amount` (concurrency release). A no-op for rate meters.
    fn release(&mut self, _amount: u64) {}
    /// What is left for this key at `now`, and when it next grows.
    fn usage(&self, now: Nanos) -> Usage;
    /// True when the state is indistinguishable from a fresh one at `now`:
    /// evicting it cannot change any decision.
    fn at_rest(&self, now: Nanos) -> bool;
}

/// A borrowed meter (`&mut dyn Meter` in a `Slot`) meters as what it borrows.
impl<M: Meter + ?Sized> Meter for &mut M {
    fn earliest(&self, now: Nanos, cost: u64, from: Nanos) -> Earliest {
        (**self).earliest(now, cost, from)
    }
    fn reservable(&self, now: Nanos, at: Nanos) -> bool {
        (**self).reservable(now, at)
    }
    fn commit(&mut self, now: Nanos, cost: u64, at: Nanos) {
        (**self).commit(now, cost, at)
    }
    fn debit(&mut self, now: Nanos, amount: u64) {
        (**self).debit(now, amount)
    }
    fn release(&mut self, amount: u64) {
        (**self).release(amount)
    }
    fn usage(&self, now: Nanos) -> Usage {
        (**self).usage(now)
    }
    fn at_rest(&self, now: Nanos) -> bool {
        (**self).at_rest(now)
    }
}

/// A counter for one clock-aligned window, keyed by the window's start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCount {
    /// The window's start (ns since the epoch).
    pub start: Nanos,
    /// Units counted in it.
    pub used: u64,
}

/// The current window and, for reservations, the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TwoWindows(pub [WindowCount; 2]);

impl TwoWindows {
    /// Units counted in the window starting at `start` (0 if neither is it).
    pub fn used(&self, start: Nanos) -> u64 {
        self.0
            .iter()
            .find(|w| w.start == start && w.used > 0)
            .map_or(0, |w| w.used)
    }

    /// Add to the window starting at `start`; `current` is the start of the window
    /// that contains now, so anything older is dead and may be overwritten.
    pub fn add(&mut self, start: Nanos, current: Nanos, amount: u64) {
        if let Some(w) = self.0.iter_mut().find(|w| w.start == start) {
            w.used = w.used.saturating_add(amount);
            return;
        }
        let slot = self
            .0
            .iter_mut()
            .min_by_key(|w| {
                if w.start < current || w.used == 0 {
                    0
                } else {
                    1
                }
            })
            .expect("two slots");
        *slot = WindowCount {
            start,
            used: amount,
        };
    }

    /// Whether nothing is counted in the window containing `current` or later.
    pub fn at_rest(&self, current: Nanos) -> bool {
        self.0.iter().all(|w| w.used == 0 || w.start < current)
    }
}
