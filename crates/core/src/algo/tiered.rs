//! tiered (from the data API's rate-limit article): separate pools, each
//! refilled completely at its own clock boundary. A request takes from the most
//! frequently refreshing pool first and spills into the next; it is denied only
//! when all pools together cannot cover it.
//! Latency costs are admitted while any pool has time left and debited at
//! completion with the same spill; a pool never goes below empty.

use super::{Earliest, Meter, TwoWindows, Usage};
use crate::calendar::{Calendar, Window};
use crate::units::Nanos;

/// One pool of a `tiered` limit.
#[derive(Debug, Clone)]
pub struct Tier {
    /// Units the pool holds when full.
    pub quota: u64,
    /// When it refills completely (its window's boundaries).
    pub calendar: Calendar,
}

/// Tiers sorted most frequent (shortest window) first.
#[derive(Debug, Clone)]
pub struct TieredParams {
    /// The pools, the most frequently refreshing first.
    pub tiers: Vec<Tier>,
}

impl TieredParams {
    /// What all pools hold when full.
    pub fn total(&self) -> u64 {
        self.tiers
            .iter()
            .fold(0, |sum, t| sum.saturating_add(t.quota))
    }
}

/// Each pool's count, in `tiers` order.
pub type TieredState = Box<[TwoWindows]>;

/// A tiered limit bound to one key's pools, as the decision reads it.
#[derive(Debug)]
pub struct Tiered<'a> {
    /// The limit's parameters.
    pub params: &'a TieredParams,
    /// The key's pools.
    pub state: &'a mut TieredState,
}

impl Tiered<'_> {
    fn used(&self, tier: usize, w: Window) -> u64 {
        self.state.get(tier).map_or(0, |s| s.used(w.start))
    }

    fn available_at(&self, t: Nanos) -> u64 {
        self.params
            .tiers
            .iter()
            .enumerate()
            .map(|(i, tier)| {
                tier.quota
                    .saturating_sub(self.used(i, tier.calendar.window(t)))
            })
            .fold(0, u64::saturating_add)
    }

    /// Take `amount` from the pools at instant `at`, most frequent first.
    fn spill(&mut self, now: Nanos, at: Nanos, mut amount: u64) {
        if self.state.len() != self.params.tiers.len() {
            // A fresh key, or (for a request decided on the old definition
            // as a reload converts the key) pools of another shape.
            let mut pools = std::mem::take(self.state).into_vec();
            pools.resize(self.params.tiers.len(), TwoWindows::default());
            *self.state = pools.into_boxed_slice();
        }
        for (i, tier) in self.params.tiers.iter().enumerate() {
            if amount == 0 {
                break;
            }
            let w = tier.calendar.window(at);
            let room = tier.quota.saturating_sub(self.state[i].used(w.start));
            let take = room.min(amount);
            if take > 0 {
                let current = if at == now {
                    w.start
                } else {
                    tier.calendar.window(now).start
                };
                self.state[i].add(w.start, current, take);
                amount -= take;
            }
        }
    }
}

/// A key's pools after a reload changed its limit from `old` to `new`:
/// each new pool keeps the use of the old pool refilling at the same
/// interval (its quota may have changed: a pool used beyond a lowered quota
/// is empty until it refills); a pool that is new starts full. A pool whose
/// boundaries moved (another zone) finds no count for its window, so it
/// starts full too.
pub fn carried(old: &TieredParams, new: &TieredParams, state: &TieredState) -> TieredState {
    if state.is_empty() {
        return TieredState::default();
    }
    new.tiers
        .iter()
        .map(|tier| {
            old.tiers
                .iter()
                .position(|o| o.calendar.every() == tier.calendar.every())
                .and_then(|i| state.get(i).copied())
                .unwrap_or_default()
        })
        .collect()
}

impl Meter for Tiered<'_> {
    fn earliest(&self, _now: Nanos, cost: u64, from: Nanos) -> Earliest {
        let total = self.params.total();
        if cost > total {
            return Earliest::Never { capacity: total };
        }
        if self.available_at(from) >= cost {
            return Earliest::At(from);
        }
        // Availability changes only when a pool refreshes, and past each pool's
        // second refresh (beyond any reservation) that pool is full: so the
        // answer is one of those refresh instants.
        let mut candidates: Vec<Nanos> = vec![from];
        for tier in &self.params.tiers {
            let w = tier.calendar.window(from);
            candidates.push(w.end);
            candidates.push(tier.calendar.next(w).end);
        }
        candidates.sort_unstable();
        candidates
            .into_iter()
            .find(|&t| self.available_at(t) >= cost)
            .map_or(Earliest::Never { capacity: total }, Earliest::At)
    }

    fn reservable(&self, now: Nanos, at: Nanos) -> bool {
        self.params.tiers.iter().all(|tier| {
            let next = tier.calendar.next(tier.calendar.window(now));
            at < next.end
        })
    }

    fn commit(&mut self, now: Nanos, cost: u64, at: Nanos) {
        self.spill(now, at, cost);
    }

    fn debit(&mut self, now: Nanos, amount: u64) {
        self.spill(now, now, amount);
    }

    fn usage(&self, now: Nanos) -> Usage {
        // One window per pool: what is left, and when the first used pool refreshes.
        let (mut remaining, mut reset) = (0u64, 0);
        for (i, tier) in self.params.tiers.iter().enumerate() {
            let w = tier.calendar.window(now);
            let used = self.used(i, w);
            remaining = remaining.saturating_add(tier.quota.saturating_sub(used));
            if used > 0 {
                let until = w.end - now;
                reset = if reset == 0 { until } else { reset.min(until) };
            }
        }
        Usage { remaining, reset }
    }
    fn at_rest(&self, now: Nanos) -> bool {
        self.state
            .iter()
            .zip(&self.params.tiers)
            .all(|(s, tier)| s.at_rest(tier.calendar.window(now).start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::NANOS_PER_SEC;
    const S: Nanos = NANOS_PER_SEC;

    fn data_api_count() -> TieredParams {
        TieredParams {
            tiers: vec![
                Tier {
                    quota: 100,
                    calendar: Calendar::utc(60 * S),
                },
                Tier {
                    quota: 2600,
                    calendar: Calendar::utc(3_600 * S),
                },
                Tier {
                    quota: 1150,
                    calendar: Calendar::utc(86_400 * S),
                },
            ],
        }
    }

    #[test]
    fn a_reload_keeps_each_pools_use_and_an_added_pool_starts_full() {
        let full = data_api_count();
        let mut minute_and_day = data_api_count();
        minute_and_day.tiers.remove(1);
        let t0 = 86_400 * S * 100;
        let mut st = TieredState::default();
        let mut m = Tiered {
            params: &minute_and_day,
            state: &mut st,
        };
        m.commit(t0, 100 + 150, t0); // the minute pool and 150 of the day's
                                     // The hour pool added: the minute and day pools keep their use.
        let mut carried_state = carried(&minute_and_day, &full, &st);
        let m = Tiered {
            params: &full,
            state: &mut carried_state,
        };
        assert_eq!(m.usage(t0).remaining, 2600 + 1000);
        // And removed again: what the day pool used is still used.
        let mut back = carried(&full, &minute_and_day, &carried_state);
        let m = Tiered {
            params: &minute_and_day,
            state: &mut back,
        };
        assert_eq!(m.usage(t0).remaining, 1000);
        // A request decided on the old shape meanwhile finds pools of
        // another length: it is counted, never a panic.
        let mut m = Tiered {
            params: &full,
            state: &mut back,
        };
        m.commit(t0, 1, t0);
    }

    #[test]
    fn falls_through_minute_then_hour_then_day() {
        let p = data_api_count();
        let mut st = TieredState::default();
        let t0 = 86_400 * S * 100; // midnight UTC
        let mut m = Tiered {
            params: &p,
            state: &mut st,
        };
        m.commit(t0, 100, t0);
        assert_eq!(m.usage(t0).remaining, 2600 + 1150);
        m.commit(t0, 2600 + 1150, t0);
        assert_eq!(m.earliest(t0, 1, t0), Earliest::At(t0 + 60 * S));
        assert_eq!(m.usage(t0).reset, 60 * S);
        // A minute later only the minute pool is back.
        assert_eq!(m.usage(t0 + 60 * S).remaining, 100);
        assert_eq!(m.earliest(t0, 101, t0), Earliest::At(t0 + 3_600 * S));
        assert_eq!(m.earliest(t0, 3851, t0), Earliest::Never { capacity: 3850 });
    }

    #[test]
    fn latency_debits_spill_and_stop_at_empty() {
        let us = 1_000_000; // one second in microseconds
        let p = TieredParams {
            tiers: vec![
                Tier {
                    quota: 30 * us,
                    calendar: Calendar::utc(60 * S),
                },
                Tier {
                    quota: 390 * us,
                    calendar: Calendar::utc(3_600 * S),
                },
            ],
        };
        let mut st = TieredState::default();
        let mut m = Tiered {
            params: &p,
            state: &mut st,
        };
        let t0 = 3_600 * S * 10;
        m.debit(t0, 45 * us);
        assert_eq!(m.usage(t0).remaining, 375 * us);
        m.debit(t0, 1_000 * us);
        assert_eq!(m.usage(t0).remaining, 0);
        assert_eq!(m.earliest(t0, 1, t0), Earliest::At(t0 + 60 * S));
    }
}
