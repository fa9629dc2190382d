//! Pacing by what the vendor does, not only by what its profile says.
//!
//! A published limit can be wrong or shared with another client. When the
//! vendor answers 429 without `Retry-After`, the line was sending faster
//! than the vendor allows: an effective rate is set below the rate the 429
//! came at (multiplicatively, once per round of calls), and calls that
//! succeed raise it back (additively) until the limits alone bind again.
//! Sends are spaced at the effective rate on top of the limits: the limits
//! still say what the profile allows, the pace what the vendor was seen to
//! allow. (The rate a 429 came at is the one observed over the last sends,
//! so a profile with a short window and a daily one is slowed from its
//! short window's pace, not down to its daily average.)
//!
//! A 429 now costs one interval of the effective rate, not the backoff
//! meant for an exhausted quota; only 429s that keep coming while the pace
//! is already lowered back off as before.

use std::collections::VecDeque;
use tollgate_core::policy::Params;
use tollgate_core::{Nanos, Policy};

/// Each 429 round keeps this share of the rate the 429 came at.
const DECREASE: f64 = 0.8;
/// The rate never goes below this share of the limits' fastest one.
const FLOOR: f64 = 0.05;
/// While calls succeed, the rate rises a second by this share of the rate
/// the first 429 came at.
const INCREASE_PER_SECOND: f64 = 0.02;
/// A third 429 in a row (no call succeeded between, each of a call sent
/// after the pace was lowered) backs off as an exhausted quota does.
const ROUNDS_BEFORE_BACKOFF: u32 = 2;
/// Sends remembered to know the rate a 429 came at.
const RECENT_SENDS: usize = 32;

const NANOS_PER_SEC: f64 = 1e9;

#[derive(Debug)]
pub(crate) struct Pace {
    /// The limits' fastest sustained rate, per second: pacing at or above
    /// it is left to the limits. None when no limit has a rate
    /// (concurrency only): nothing to pace.
    ceiling: Option<f64>,
    /// The effective rate, per second, while it is below what the limits
    /// allow (None: the limits alone).
    rate: Option<f64>,
    /// How much the rate rises a second while calls succeed.
    step: f64,
    /// The last sends, to know the rate a 429 came at.
    recent: VecDeque<Nanos>,
    /// No send before this, while pacing.
    next_send: Nanos,
    /// When the rate last went down: a 429 for a call sent before then is
    /// of the same round (a burst's calls in flight), not a new one.
    lowered_at: Option<Nanos>,
    /// Rounds of 429s since the last call that succeeded.
    rounds: u32,
}

impl Pace {
    pub(crate) fn new(policy: &Policy) -> Pace {
        let per_second = |amount: u64, period: Nanos| {
            (period > 0).then(|| amount as f64 * NANOS_PER_SEC / period as f64)
        };
        let ceiling = policy
            .limits
            .iter()
            .filter_map(|limit| match limit.variants.first()? {
                Params::Gcra(p) => per_second(p.amount, p.period),
                Params::FixedWindow(p) => per_second(p.quota, p.calendar.every()),
                Params::SlidingWindow(p) => per_second(p.quota, p.every),
                Params::Tiered(p) => {
                    let tier = p.tiers.first()?;
                    per_second(tier.quota, tier.calendar.every())
                }
                Params::Concurrency(_) => None,
            })
            .max_by(f64::total_cmp);
        Pace {
            ceiling,
            rate: None,
            step: 0.0,
            recent: VecDeque::with_capacity(RECENT_SENDS),
            next_send: 0,
            lowered_at: None,
            rounds: 0,
        }
    }

    /// The rate sends are paced at, per second, while below the limits'.
    pub(crate) fn effective(&self) -> Option<f64> {
        self.rate
    }

    /// The limits' fastest sustained rate, per second.
    pub(crate) fn ceiling(&self) -> Option<f64> {
        self.ceiling
    }

    /// The rate of the last sends, per second.
    fn observed(&self) -> Option<f64> {
        let (first, last) = (self.recent.front()?, self.recent.back()?);
        (last > first)
            .then(|| (self.recent.len() - 1) as f64 * NANOS_PER_SEC / (last - first) as f64)
    }

    fn interval(rate: f64) -> Nanos {
        (NANOS_PER_SEC / rate) as Nanos
    }

    /// When the next send may go, if not now.
    pub(crate) fn gate(&self, now: Nanos) -> Option<Nanos> {
        (self.rate.is_some() && now < self.next_send).then_some(self.next_send)
    }

    /// A call was sent at `now`.
    pub(crate) fn sent(&mut self, now: Nanos) {
        if self.recent.len() == RECENT_SENDS {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if let Some(rate) = self.rate {
            self.next_send = self.next_send.max(now) + Self::interval(rate);
        }
    }

    /// A call succeeded: the rate rises, and pacing ends when it reaches
    /// what the limits allow.
    pub(crate) fn succeeded(&mut self) {
        self.rounds = 0;
        if let Some(rate) = self.rate {
            // Per call at this rate: `step` a second.
            let raised = rate + self.step / rate;
            self.rate = self.ceiling.filter(|c| raised < *c).map(|_| raised);
        }
    }

    /// A 429 without `Retry-After` for a call sent at `sent_at`: how long
    /// to wait (one interval at the lowered pace), or None when 429s keep
    /// coming although the pace was lowered (back off as for an exhausted
    /// quota).
    pub(crate) fn throttled(&mut self, sent_at: Nanos, now: Nanos) -> Option<Nanos> {
        let ceiling = self.ceiling?;
        if self.lowered_at.is_some_and(|at| sent_at < at) {
            // Sent before the pace went down: the same round.
            return Some(Self::interval(self.rate.unwrap_or(ceiling)));
        }
        self.rounds += 1;
        if self.rounds > ROUNDS_BEFORE_BACKOFF {
            return None;
        }
        let came_at = match self.rate {
            Some(rate) => rate,
            None => {
                let came_at = self.observed().unwrap_or(ceiling).min(ceiling);
                self.step = INCREASE_PER_SECOND * came_at;
                came_at
            }
        };
        let rate = (came_at * DECREASE).max(FLOOR * ceiling);
        self.rate = Some(rate);
        self.lowered_at = Some(now);
        self.next_send = now + Self::interval(rate);
        Some(Self::interval(rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::NoProfiles;

    const MS: Nanos = 1_000_000;

    #[test]
    fn a_429_slows_from_the_pace_it_came_at_not_from_a_daily_average() {
        // 10 a second, and 100,000 a day (about 1.2 a second on average).
        let policy: Policy = tollgate_core::parse(
            "[[limit]]\nname = \"second\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n[[limit]]\nname = \"day\"\nalgorithm = \"fixed_window\"\nquota = 100000\nevery = \"1d\"\n",
            &NoProfiles,
        )
        .unwrap();
        let mut pace = Pace::new(&policy);
        assert_eq!(pace.ceiling(), Some(10.0));
        for i in 0..20 {
            pace.sent(i * 100 * MS);
        }
        assert_eq!(pace.gate(2000 * MS), None, "no pacing before a 429");
        let wait = pace.throttled(1900 * MS, 2000 * MS);
        let rate = pace.effective().unwrap();
        assert!((7.9..8.1).contains(&rate), "{rate}/s");
        assert_eq!(wait, Some(125 * MS));
        // A call of the same round: no second decrease.
        assert_eq!(pace.throttled(1950 * MS, 2001 * MS), Some(125 * MS));
        assert_eq!(pace.effective(), Some(rate));
        // Successes raise it (0.2 a second at this pace), until the limits bind.
        for _ in 0..8 {
            pace.succeeded();
        }
        let raised = pace.effective().unwrap();
        assert!((8.1..8.3).contains(&raised), "{raised}/s");
        for _ in 0..2000 {
            pace.succeeded();
        }
        assert_eq!(pace.effective(), None, "back to the limits alone");
    }
}
