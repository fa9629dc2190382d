//! token_bucket and leaky_bucket: the generic cell rate algorithm.
//!
//! The state is one instant, the theoretical arrival time (TAT). A full bucket
//! admits `capacity` at once; it refills `amount` units every `period` ns,
//! continuously. TAT is kept exactly: whole nanoseconds plus a remainder in
//! 1/`amount` ns, so 300/s admits exactly 300 in every second after a drain
//! (the k-th unit arrives at exactly k·period/amount), never 299 or 301.
//! A reservation for a future instant is exact too: it just moves TAT further.

use super::{Earliest, Meter, Usage};
use crate::units::{Nanos, Rate};

/// A token or leaky bucket's parameters (GCRA), kept exact in integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraParams {
    /// Burst size in units.
    pub capacity: u64,
    /// `amount` units refill every `period` ns.
    pub amount: u64,
    /// See `amount`.
    pub period: Nanos,
    /// The interval per unit as `whole + rem / amount` ns.
    whole: Nanos,
    rem: u64,
    /// The burst tolerance `capacity * interval`, the same way.
    tau: Exact,
}

/// An instant or span as `ns + frac / amount` nanoseconds, `frac < amount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Exact {
    /// Whole nanoseconds.
    pub ns: Nanos,
    /// The fraction of a nanosecond, in `amount`ths.
    pub frac: u64,
}

impl GcraParams {
    /// One unit every `interval` ns.
    pub fn new(capacity: u64, interval: Nanos) -> Self {
        Self::with_rate(
            capacity,
            Rate {
                amount: 1,
                per: interval.max(1),
            },
        )
    }

    /// `rate.amount` units every `rate.per` ns, bursts of `capacity`.
    pub fn with_rate(capacity: u64, rate: Rate) -> Self {
        let capacity = capacity.max(1);
        let amount = rate.amount.max(1);
        let period = rate.per.max(1);
        let mut p = GcraParams {
            capacity,
            amount,
            period,
            whole: period / amount,
            rem: period % amount,
            tau: Exact::default(),
        };
        p.tau = p.span(capacity);
        p
    }

    /// `cost` intervals, exactly.
    #[inline]
    fn span(&self, cost: u64) -> Exact {
        if cost == 1 {
            return Exact {
                ns: self.whole,
                frac: self.rem,
            };
        }
        let rem = u128::from(cost) * u128::from(self.rem);
        let amount = u128::from(self.amount);
        Exact {
            ns: cost
                .saturating_mul(self.whole)
                .saturating_add((rem / amount) as u64),
            frac: (rem % amount) as u64,
        }
    }

    #[inline]
    fn add(&self, a: Exact, b: Exact) -> Exact {
        let frac = a.frac + b.frac;
        if frac >= self.amount {
            Exact {
                ns: a.ns.saturating_add(b.ns).saturating_add(1),
                frac: frac - self.amount,
            }
        } else {
            Exact {
                ns: a.ns.saturating_add(b.ns),
                frac,
            }
        }
    }

    /// `a - b` rounded up to a whole nanosecond, or 0 if negative.
    #[inline]
    fn sub_ceil(&self, a: Exact, b: Exact) -> Nanos {
        if a <= b {
            return 0;
        }
        let (ns, frac) = if a.frac >= b.frac {
            (a.ns - b.ns, a.frac - b.frac)
        } else {
            (a.ns - b.ns - 1, a.frac + self.amount - b.frac)
        };
        ns + u64::from(frac > 0)
    }

    /// The burst tolerance rounded up to whole nanoseconds: the time a drained bucket takes to refill.
    pub fn tau(&self) -> Nanos {
        self.tau.ns + u64::from(self.tau.frac > 0)
    }

    /// The interval per unit as (whole ns, remainder in 1/`amount` ns), and
    /// the burst tolerance the same way: for stores that run this algorithm
    /// elsewhere (the Redis store's script).
    pub fn exact_parts(&self) -> (Nanos, u64, Exact) {
        (self.whole, self.rem, self.tau)
    }

    /// The interval per unit rounded up to whole nanoseconds.
    pub fn interval(&self) -> Nanos {
        self.whole + u64::from(self.rem > 0)
    }
}

/// The theoretical arrival time; the default is a fresh, full bucket.
pub type GcraState = Exact;

fn at(ns: Nanos) -> Exact {
    Exact { ns, frac: 0 }
}

/// A bucket bound to one key's state, as the decision reads it.
#[derive(Debug)]
pub struct Gcra<'a> {
    /// The limit's parameters.
    pub params: &'a GcraParams,
    /// The key's theoretical arrival time.
    pub tat: &'a mut GcraState,
}

impl Meter for Gcra<'_> {
    #[inline]
    fn earliest(&self, _now: Nanos, cost: u64, from: Nanos) -> Earliest {
        let p = self.params;
        if cost > p.capacity {
            return Earliest::Never {
                capacity: p.capacity,
            };
        }
        // Admissible at x iff max(tat, x) + need - x <= tau, i.e. x >= tat + need - tau.
        let due = p.add(*self.tat, p.span(cost));
        Earliest::At(from.max(p.sub_ceil(due, p.tau)))
    }

    fn reservable(&self, _now: Nanos, _at: Nanos) -> bool {
        true
    }

    #[inline]
    fn commit(&mut self, _now: Nanos, cost: u64, at_ns: Nanos) {
        let p = self.params;
        *self.tat = p.add((*self.tat).max(at(at_ns)), p.span(cost));
    }

    fn debit(&mut self, now: Nanos, amount: u64) {
        let p = self.params;
        *self.tat = p.add((*self.tat).max(at(now)), p.span(amount));
    }

    #[inline]
    fn usage(&self, now: Nanos) -> Usage {
        let p = self.params;
        let tat = *self.tat;
        if tat <= at(now) {
            return Usage {
                remaining: p.capacity,
                reset: 0,
            };
        }
        let full = p.add(at(now), p.tau);
        if tat >= full {
            // Overdrawn (latency debits) or exactly empty: the next unit comes one interval after `full`.
            let next = p.add(tat, p.span(1));
            return Usage {
                remaining: 0,
                reset: p.sub_ceil(next, full),
            };
        }
        // A whole-nanosecond interval (most rates: 1000/s, 2/s, 100/min):
        // every instant is whole, and one 64-bit division does.
        if p.rem == 0 && tat.frac == 0 {
            let slack = full.ns - tat.ns;
            let remaining = slack / p.whole;
            if let Some(next) = (remaining + 1).checked_mul(p.whole) {
                return Usage {
                    remaining,
                    reset: next - slack,
                };
            }
        }
        // slack = full - tat in units of 1/amount ns; one unit is `period` of them.
        let amount = u128::from(p.amount);
        let scaled = |e: Exact| u128::from(e.ns) * amount + u128::from(e.frac);
        let slack = scaled(full) - scaled(tat);
        // The usual case fits 64 bits, where division is several times cheaper.
        if let (Ok(slack), Ok(amount)) = (u64::try_from(slack), u64::try_from(amount)) {
            let remaining = slack / p.period;
            if let Some(next) = (remaining + 1).checked_mul(p.period) {
                return Usage {
                    remaining,
                    reset: (next - slack).div_ceil(amount),
                };
            }
        }
        let period = u128::from(p.period);
        let remaining = slack / period;
        let reset = ((remaining + 1) * period - slack).div_ceil(amount);
        Usage {
            remaining: remaining as u64,
            reset: reset as u64,
        }
    }

    #[inline]
    fn at_rest(&self, now: Nanos) -> bool {
        *self.tat <= at(now)
    }
}

/// A key's bucket after a reload changed its limit from `old` to `new`, at
/// `now`: the units it owes (its TAT ahead of now, in old intervals) are
/// owed at the new rate, whatever the new capacity (use is never forgiven:
/// a bucket owing more than its new capacity stays empty until its debt is
/// back under it, as a window's count above a lowered quota does). In
/// doubles, rounded up to a whole nanosecond: the Redis store's script
/// computes the same, operation for operation, so both stores carry a
/// bucket alike.
pub fn carried(old: &GcraParams, new: &GcraParams, tat: GcraState, now: Nanos) -> GcraState {
    if (old.amount, old.period) == (new.amount, new.period) {
        return tat; // the same interval: a TAT means the same under any capacity
    }
    if tat <= at(now) {
        return GcraState::default(); // a full bucket stays full
    }
    let debt = (tat.ns - now) as f64 * old.amount as f64 + tat.frac as f64;
    let ns = (debt / old.period as f64 * new.period as f64 / new.amount as f64).ceil();
    at(now.saturating_add(ns as u64))
}

/// The single-key, single-limit path over a whole-nanosecond TAT, for the
/// lock-free `DirectLimiter` (one atomic word). Its interval is rounded up to
/// a whole nanosecond, so it never runs faster than configured (300/s is one
/// unit per 3,333,334 ns). Returns the new TAT, or the instant it would admit.
#[inline]
pub fn check(p: &GcraParams, tat: Nanos, now: Nanos, cost: u64) -> Result<Nanos, Nanos> {
    let interval = p.interval();
    let tau = p.capacity.saturating_mul(interval);
    let new_tat = tat.max(now).saturating_add(cost.saturating_mul(interval));
    if new_tat - now <= tau {
        Ok(new_tat)
    } else {
        Err(new_tat - tau)
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
        let mut tat = GcraState::default();
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
    fn exactly_300_per_second_after_a_drain() {
        let p = GcraParams::with_rate(
            1000,
            Rate {
                amount: 300,
                per: S,
            },
        );
        let mut tat = GcraState::default();
        let t0 = 5_000 * S;
        let mut m = Gcra {
            params: &p,
            tat: &mut tat,
        };
        m.commit(t0, 1000, t0);
        // The first unit is due 1/300 s later, rounded up to a whole nanosecond.
        assert_eq!(m.earliest(t0, 1, t0), Earliest::At(t0 + 3_333_334));
        for second in 1..=3600u64 {
            let now = t0 + second * S;
            let mut admitted = 0;
            while m.earliest(now, 1, now) == Earliest::At(now) {
                m.commit(now, 1, now);
                admitted += 1;
            }
            assert_eq!(admitted, 300, "second {second}");
        }
    }

    fn used(p: &GcraParams, tat: &mut GcraState, now: Nanos, n: u64) {
        let mut m = Gcra { params: p, tat };
        for _ in 0..n {
            assert_eq!(m.earliest(now, 1, now), Earliest::At(now));
            m.commit(now, 1, now);
        }
    }

    #[test]
    fn a_reload_carries_the_debt_into_the_new_bucket() {
        let now = 1_000 * S;
        let ten = GcraParams::with_rate(10, Rate { amount: 10, per: S });
        let mut tat = GcraState::default();
        used(&ten, &mut tat, now, 8);
        // Raised capacity, same rate: the 8 used stay used.
        let twenty = GcraParams::with_rate(20, Rate { amount: 10, per: S });
        let mut bigger = carried(&ten, &twenty, tat, now);
        let m = Gcra {
            params: &twenty,
            tat: &mut bigger,
        };
        assert_eq!(m.usage(now).remaining, 12);
        // Lowered capacity and rate: the 8 units are owed at 1/s; with room
        // for 5, the next unit comes once 4 are paid, in 4 s.
        let five = GcraParams::with_rate(5, Rate { amount: 1, per: S });
        let mut smaller = carried(&ten, &five, tat, now);
        let m = Gcra {
            params: &five,
            tat: &mut smaller,
        };
        assert_eq!(
            m.usage(now),
            Usage {
                remaining: 0,
                reset: 4 * S
            }
        );
        assert_eq!(m.earliest(now, 1, now), Earliest::At(now + 4 * S));
        // A rate raised tenfold: the 8 units owed refill in 80 ms.
        let fast = GcraParams::with_rate(
            10,
            Rate {
                amount: 100,
                per: S,
            },
        );
        let mut quick = carried(&ten, &fast, tat, now);
        let m = Gcra {
            params: &fast,
            tat: &mut quick,
        };
        assert_eq!(m.usage(now).remaining, 2);
        assert!(m.at_rest(now + 80 * S / 1000));
        // The same rate under any capacity changes nothing; a full bucket stays full.
        assert_eq!(carried(&ten, &ten, tat, now), tat);
        assert_eq!(
            carried(&ten, &five, GcraState::default(), now),
            GcraState::default()
        );
    }

    #[test]
    fn check_matches_meter() {
        let p = GcraParams::new(2, 10);
        assert_eq!(check(&p, 0, 100, 1), Ok(110));
        assert_eq!(check(&p, 110, 100, 1), Ok(120));
        assert_eq!(check(&p, 120, 100, 1), Err(110));
    }
}
