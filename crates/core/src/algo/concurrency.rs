//! concurrency: at most `max` in flight per key. Admission takes a slot; the
//! adapter releases it when the response ends or the client goes away.

use super::{Earliest, Meter, Usage};
use crate::units::Nanos;

/// A `concurrency` limit's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyParams {
    /// Requests in flight at once, per key.
    pub max: u64,
}

/// Units in flight.
pub type ConcurrencyState = u64;

/// A concurrency limit bound to one key's count, as the decision reads it.
#[derive(Debug)]
pub struct Concurrency<'a> {
    /// The limit's parameters.
    pub params: &'a ConcurrencyParams,
    /// The key's requests in flight.
    pub in_flight: &'a mut ConcurrencyState,
}

impl Meter for Concurrency<'_> {
    fn earliest(&self, _now: Nanos, cost: u64, from: Nanos) -> Earliest {
        if cost > self.params.max {
            Earliest::Never {
                capacity: self.params.max,
            }
        } else if *self.in_flight + cost <= self.params.max {
            Earliest::At(from)
        } else {
            Earliest::OnRelease
        }
    }

    fn reservable(&self, _now: Nanos, _at: Nanos) -> bool {
        // A held request takes its slot at once and keeps it while it waits:
        // it is in flight from the moment it is admitted.
        true
    }

    /// Takes the slot now, whatever `at`: see `reservable`.
    fn commit(&mut self, _now: Nanos, cost: u64, _at: Nanos) {
        *self.in_flight += cost;
    }

    fn debit(&mut self, _now: Nanos, _amount: u64) {}

    fn release(&mut self, amount: u64) {
        *self.in_flight = self.in_flight.saturating_sub(amount);
    }

    fn usage(&self, _now: Nanos) -> Usage {
        Usage {
            remaining: self.params.max.saturating_sub(*self.in_flight),
            reset: 0,
        }
    }

    fn at_rest(&self, _now: Nanos) -> bool {
        *self.in_flight == 0
    }
}
