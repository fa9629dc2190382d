//! One state value per tracked key, whatever its algorithm. Large states are
//! boxed so a token-bucket key stays small (see `MemoryStore` for the figures).

use tollgate_core::algo::concurrency::{Concurrency, ConcurrencyState};
use tollgate_core::algo::fixed_window::{FixedWindow, FixedWindowState};
use tollgate_core::algo::gcra::{self, Gcra, GcraState};
use tollgate_core::algo::sliding_window::{SlidingWindow, SlidingWindowState};
use tollgate_core::algo::tiered::{self, Tiered, TieredState};
use tollgate_core::algo::{Earliest, Meter, Usage};
use tollgate_core::policy::Params;
use tollgate_core::Nanos;

/// One key's state, whichever algorithm its limit runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyState {
    /// Token or leaky bucket: the theoretical arrival time.
    Gcra(GcraState),
    /// The current window's start and count.
    FixedWindow(Box<FixedWindowState>),
    /// The sub-windows' counts.
    SlidingWindow(Box<SlidingWindowState>),
    // Already a boxed slice (16 bytes): no second box.
    /// Each tier's pool.
    Tiered(TieredState),
    /// Requests in flight.
    Concurrency(ConcurrencyState),
}

impl AnyState {
    /// The state of a key never seen, for `params`.
    pub fn fresh(params: &Params) -> AnyState {
        match params {
            Params::Gcra(_) => AnyState::Gcra(GcraState::default()),
            Params::FixedWindow(_) => AnyState::FixedWindow(Box::default()),
            Params::SlidingWindow(_) => AnyState::SlidingWindow(Box::default()),
            Params::Tiered(_) => AnyState::Tiered(TieredState::default()),
            Params::Concurrency(_) => AnyState::Concurrency(0),
        }
    }

    /// This key's state after a reload changed its limit from `old` to
    /// `new` at `now` (same algorithm; see `tollgate_core::carry`): a
    /// bucket's debt and tiered pools are reshaped; a window's count and the
    /// requests in flight mean the same under any quota.
    pub fn carry(&mut self, old: &Params, new: &Params, now: Nanos) {
        match (old, new, self) {
            (Params::Gcra(old), Params::Gcra(new), AnyState::Gcra(tat)) => {
                *tat = gcra::carried(old, new, *tat, now);
            }
            (Params::Tiered(old), Params::Tiered(new), AnyState::Tiered(pools)) => {
                *pools = tiered::carried(old, new, pools);
            }
            _ => {}
        }
    }

    /// This state under its limit's parameters, as a meter.
    pub fn meter<'a>(&'a mut self, params: &'a Params) -> AnyMeter<'a> {
        match (params, self) {
            (Params::Gcra(params), AnyState::Gcra(tat)) => AnyMeter::Gcra(Gcra { params, tat }),
            (Params::FixedWindow(params), AnyState::FixedWindow(state)) => {
                AnyMeter::FixedWindow(FixedWindow { params, state })
            }
            (Params::SlidingWindow(params), AnyState::SlidingWindow(state)) => {
                AnyMeter::SlidingWindow(SlidingWindow { params, state })
            }
            (Params::Tiered(params), AnyState::Tiered(state)) => {
                AnyMeter::Tiered(Tiered { params, state })
            }
            (Params::Concurrency(params), AnyState::Concurrency(in_flight)) => {
                AnyMeter::Concurrency(Concurrency { params, in_flight })
            }
            (params, state) => {
                // A table is built for one algorithm, so this cannot happen.
                debug_assert!(false, "state {state:?} under params {params:?}");
                *state = AnyState::fresh(params);
                state.meter(params)
            }
        }
    }
}

#[derive(Debug)]
pub enum AnyMeter<'a> {
    Gcra(Gcra<'a>),
    FixedWindow(FixedWindow<'a>),
    SlidingWindow(SlidingWindow<'a>),
    Tiered(Tiered<'a>),
    Concurrency(Concurrency<'a>),
}

macro_rules! each {
    ($self:ident, $m:ident => $e:expr) => {
        match $self {
            AnyMeter::Gcra($m) => $e,
            AnyMeter::FixedWindow($m) => $e,
            AnyMeter::SlidingWindow($m) => $e,
            AnyMeter::Tiered($m) => $e,
            AnyMeter::Concurrency($m) => $e,
        }
    };
}

impl Meter for AnyMeter<'_> {
    #[inline]
    fn earliest(&self, now: Nanos, cost: u64, from: Nanos) -> Earliest {
        each!(self, m => m.earliest(now, cost, from))
    }
    fn reservable(&self, now: Nanos, at: Nanos) -> bool {
        each!(self, m => m.reservable(now, at))
    }
    #[inline]
    fn commit(&mut self, now: Nanos, cost: u64, at: Nanos) {
        each!(self, m => m.commit(now, cost, at))
    }
    fn debit(&mut self, now: Nanos, amount: u64) {
        each!(self, m => m.debit(now, amount))
    }
    fn release(&mut self, amount: u64) {
        each!(self, m => m.release(amount))
    }
    #[inline]
    fn usage(&self, now: Nanos) -> Usage {
        each!(self, m => m.usage(now))
    }
    #[inline]
    fn at_rest(&self, now: Nanos) -> bool {
        each!(self, m => m.at_rest(now))
    }
}

#[cfg(test)]
mod tests {
    use super::AnyState;

    /// Every tracked key pays for this (see bench/RESULTS.md, memory per key).
    #[test]
    fn a_tracked_state_stays_at_24_bytes() {
        assert_eq!(std::mem::size_of::<AnyState>(), 24);
    }
}
