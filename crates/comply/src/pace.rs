//! Pacing by what the vendor does, not only by what its profile says.
//!
//! A published limit can be wrong or shared with another client. When the
//! vendor answers 429 without `Retry-After` while the line keeps to the
//! profile, the profile was too fast: an effective share of the profile's
//! rate goes down (multiplicatively, once per round of calls) and calls
//! that succeed raise it back (additively, toward the profile and never
//! above it). Sends are spaced at the effective rate on top of the limits:
//! the limits still say what the profile allows, the pace what the vendor
//! was seen to allow.
//!
//! A 429 now costs one interval of the effective rate, not the backoff
//! meant for an exhausted quota; only 429s that keep coming while the pace
//! is already lowered back off as before.

use tollgate_core::policy::Params;
use tollgate_core::{Nanos, Policy};

/// Each 429 round keeps this share of the effective rate.
const DECREASE: f64 = 0.8;
/// The effective share never goes below this.
const FLOOR: f64 = 0.05;
/// While calls succeed, the share rises by this much per second.
const INCREASE_PER_SECOND: f64 = 0.02;
/// A third 429 in a row (no call succeeded between, each of a call sent
/// after the pace was lowered) backs off as an exhausted quota does.
const ROUNDS_BEFORE_BACKOFF: u32 = 2;

const NANOS_PER_SEC: f64 = 1e9;

#[derive(Debug)]
pub(crate) struct Pace {
    /// The profile's tightest sustained rate, in units per second; None
    /// when no limit has one (concurrency only): nothing to pace.
    profile: Option<f64>,
    /// The effective share of `profile` (1: the profile's own pace).
    share: f64,
    /// No send before this, while the share is below 1.
    next_send: Nanos,
    /// When the share last went down: a 429 for a call sent before then is
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
        let profile = policy
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
            .min_by(f64::total_cmp);
        Pace {
            profile,
            share: 1.0,
            next_send: 0,
            lowered_at: None,
            rounds: 0,
        }
    }

    /// The rate sends are paced at, per second, when below the profile's.
    pub(crate) fn effective(&self) -> Option<f64> {
        let profile = self.profile?;
        (self.share < 1.0).then_some(self.share * profile)
    }

    /// The profile's tightest sustained rate, per second.
    pub(crate) fn profile(&self) -> Option<f64> {
        self.profile
    }

    /// The spacing of sends at the effective rate.
    fn interval(&self) -> Nanos {
        match self.profile {
            Some(profile) => (NANOS_PER_SEC / (self.share * profile)) as Nanos,
            None => 0,
        }
    }

    /// When the next send may go, if not now.
    pub(crate) fn gate(&self, now: Nanos) -> Option<Nanos> {
        (self.share < 1.0 && now < self.next_send).then_some(self.next_send)
    }

    /// A call was sent at `now`.
    pub(crate) fn sent(&mut self, now: Nanos) {
        if self.share < 1.0 {
            self.next_send = self.next_send.max(now) + self.interval();
        }
    }

    /// A call succeeded: the share rises toward the profile.
    pub(crate) fn succeeded(&mut self) {
        self.rounds = 0;
        if let (Some(profile), true) = (self.profile, self.share < 1.0) {
            // Per call at the effective rate: INCREASE_PER_SECOND a second.
            self.share = (self.share + INCREASE_PER_SECOND / (self.share * profile)).min(1.0);
        }
    }

    /// A 429 without `Retry-After` for a call sent at `sent_at`: how long
    /// to wait (one interval at the lowered pace), or None when 429s keep
    /// coming although the pace was lowered (back off as for an exhausted
    /// quota). True in the second field when the share went down.
    pub(crate) fn throttled(&mut self, sent_at: Nanos, now: Nanos) -> (Option<Nanos>, bool) {
        if self.profile.is_none() {
            return (None, false);
        }
        if self.lowered_at.is_some_and(|at| sent_at < at) {
            // Sent before the pace went down: the same round.
            return (Some(self.interval()), false);
        }
        self.rounds += 1;
        if self.rounds > ROUNDS_BEFORE_BACKOFF {
            return (None, false);
        }
        self.share = (self.share * DECREASE).max(FLOOR);
        self.lowered_at = Some(now);
        self.next_send = now + self.interval();
        (Some(self.interval()), true)
    }
}
