//! token_bucket and leaky_bucket: the generic cell rate algorithm.
//!
//! The whole state is one instant, the theoretical arrival time (TAT). A full
//! bucket admits `capacity` at once; it refills one unit every `interval`.
//! A reservation for a future instant is exact: it just moves TAT further.

use super::{Earliest, Meter, Usage};
use crate::units::Nanos;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraParams {
    /// Nanoseconds per unit of refill.
    pub interval: Nanos,
    /// Burst size in units.
    pub capacity: u64,
}

impl GcraParams {
    pub fn new(capacity: u64, interval: Nanos) -> Self {
        GcraParams {
            interval: interval.max(1),
            capacity: capacity.max(1),
        }
    }
    /// The burst tolerance: how far TAT may run ahead of now.
    pub fn tau(&self) -> Nanos {
        self.capacity.saturating_mul(self.interval)
    }
}

/// The theoretical arrival time; 0 is a fresh, full bucket.
pub type GcraState = Nanos;

#[derive(Debug)]
pub struct Gcra<'a> {
    pub params: &'a GcraParams,
    pub tat: &'a mut GcraState,
}

impl Meter for Gcra<'_> {
    fn earliest(&self, _now: Nanos, cost: u64, from: Nanos) -> Earliest {
        if cost > self.params.capacity {
            return Earliest::Never {
                capacity: self.params.capacity,
            };
        }
        let need = cost * self.params.interval;
        Earliest::At(from.max((*self.tat + need).saturating_sub(self.params.tau())))
    }

    fn reservable(&self, _now: Nanos, _at: Nanos) -> bool {
        true
    }

    fn commit(&mut self, _now: Nanos, cost: u64, at: Nanos) {
        *self.tat = (*self.tat).max(at) + cost * self.params.interval;
    }

    fn debit(&mut self, now: Nanos, amount: u64) {
        *self.tat = (*self.tat)
            .max(now)
            .saturating_add(amount.saturating_mul(self.params.interval));
    }

    fn usage(&self, now: Nanos) -> Usage {
        gcra_usage(self.params, *self.tat, now)
    }

    fn at_rest(&self, now: Nanos) -> bool {
        *self.tat <= now
    }
}

pub fn gcra_usage(p: &GcraParams, tat: Nanos, now: Nanos) -> Usage {
    if tat <= now {
        return Usage {
            remaining: p.capacity,
            reset: 0,
        };
    }
    let slack = (now + p.tau()).saturating_sub(tat);
    let remaining = slack / p.interval;
    // The next unit becomes available when the slack reaches (remaining + 1) intervals.
    let reset = (remaining + 1) * p.interval - slack;
    Usage { remaining, reset }
}

/// The single-key, single-limit path: decide and commit in one step.
/// Returns `Ok(())` or `Err(earliest admission instant)`. Used by the lock-free
/// cell in the store and by benchmarks against governor's direct limiter.
#[inline]
pub fn check(p: &GcraParams, tat: GcraState, now: Nanos, cost: u64) -> Result<GcraState, Nanos> {
    let new_tat = tat.max(now) + cost * p.interval;
    if new_tat - now <= p.tau() {
        Ok(new_tat)
    } else {
        Err(new_tat - p.tau())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::NANOS_PER_SEC;

    const S: Nanos = NANOS_PER_SEC;

    #[test]
    fn burst_then_refill() {
        let p = GcraParams::new(3, S); // 3 at once, then 1/s
        let mut tat = 0;
        let now = 1_000 * S;
        for _ in 0..3 {
            let mut m = Gcra {
                params: &p,
                tat: &mut tat,
            };
            assert_eq!(m.earliest(now, 1, now), Earliest::At(now));
            m.commit(now, 1, now);
        }
        let m = Gcra {
            params: &p,
            tat: &mut tat,
        };
        assert_eq!(m.earliest(now, 1, now), Earliest::At(now + S));
        assert_eq!(
            m.usage(now),
            Usage {
                remaining: 0,
                reset: S
            }
        );
        assert_eq!(m.earliest(now, 4, now), Earliest::Never { capacity: 3 });
        assert_eq!(m.usage(now + S / 2).reset, S / 2);
        assert_eq!(
            m.usage(now + 3 * S),
            Usage {
                remaining: 3,
                reset: 0
            }
        );
        assert!(m.at_rest(now + 3 * S));
        assert!(!m.at_rest(now + 3 * S - 1));
    }

    #[test]
    fn check_matches_meter() {
        let p = GcraParams::new(2, 10);
        assert_eq!(check(&p, 0, 100, 1), Ok(110));
        assert_eq!(check(&p, 110, 100, 1), Ok(120));
        assert_eq!(check(&p, 120, 100, 1), Err(110));
    }
}
