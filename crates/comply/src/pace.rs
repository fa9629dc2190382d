//! Pacing by what the vendor does, not only by what its profile says.
//!
//! A published limit can be wrong or shared with another client. When the
//! vendor answers a 429 the local count did not predict, the line was
//! sending faster than the vendor allows: an effective rate is set below
//! the rate the 429 came at (multiplicatively, once per round of calls),
//! and calls that succeed raise it back until the limits alone bind again,
//! along a cubic curve: quickly at first, flat near the rate the 429 came
//! at, then faster and faster (a vendor that restores its limit is followed
//! within seconds).
//! Sends are spaced at the effective rate on top of the limits: the limits
//! still say what the profile allows, the pace what the vendor was seen to
//! allow. (The rate a 429 came at is the one observed over the last sends,
//! so a profile with a short window and a daily one is slowed from its
//! short window's pace, not down to its daily average.)
//!
//! A 429 without `Retry-After` now costs one interval of the effective
//! rate, not the backoff meant for an exhausted quota; only 429s that keep
//! coming while the pace is already lowered back off as before. (A
//! `Retry-After` is still waited out as the vendor says.)
//!
//! When the vendor's rate-limit headers count calls this scheduler did not
//! send, another client spends the same quota: sends are paced at a little
//! less than what it leaves (the limits' rate minus its rate over the last
//! seconds), so the two share the quota without a 429 instead of one
//! bursting into the other's calls.

use compact_str::CompactString;
use std::collections::{HashMap, VecDeque};
use tollgate_core::algo::gcra::GcraParams;
use tollgate_core::algo::sliding_window::SlidingWindowParams;
use tollgate_core::policy::{Cost, Params};
use tollgate_core::units::Rate;
use tollgate_core::{Item, Nanos, Policy};

/// Each round of 429s keeps this share of the rate the 429 came at ...
const DECREASE: f64 = 0.8;
/// ... except a lone one (no other 429 in the `LONE_AFTER` before it),
/// which tightens the pace only a little: one call that raced a window's
/// edge, or another client's burst, says little about the rate.
const LONE_DECREASE: f64 = 0.95;
const LONE_AFTER: Nanos = 10_000_000_000;
/// The rate never goes below this share of the limits' fastest one.
const FLOOR: f64 = 0.05;
/// While calls succeed, the rate rises back along a cubic curve (as TCP's
/// CUBIC does): quickly at first, flat near the rate the last 429 came at,
/// then faster and faster above it. It is back at that rate this long
/// after the first success, and twice it about 2.7 times as long after.
const RISE: f64 = 4.0;
/// A third 429 in a row (no call succeeded between, each of a call sent
/// after the pace was lowered) backs off as an exhausted quota does.
const ROUNDS_BEFORE_BACKOFF: u32 = 2;
/// Sends remembered to know the rate a 429 came at.
const RECENT_SENDS: usize = 32;
/// Another client's spending is measured over at least this long, and over
/// at least `SHARE_INTERVALS` intervals of the limits' rate.
const SHARE_SPAN: Nanos = 2_000_000_000;
const SHARE_INTERVALS: f64 = 20.0;
/// Another client spending less than this share of the limits' rate is
/// noise (a reply that raced a window's end), not a client to make room for.
const SHARE_NOTICED: f64 = 0.02;
/// What another client leaves is paced a little inside, so its own bursts
/// do not make the next call of this one a 429.
const SHARE_KEPT: f64 = 0.97;
/// Paces kept before those at rest are forgotten (per-key paces).
const KEPT_AT_REST: usize = 1024;

const NANOS_PER_SEC: f64 = 1e9;

#[derive(Debug, Clone)]
pub(crate) struct Pace {
    /// The limits' fastest sustained rate, per second: pacing at or above
    /// it is left to the limits. None when no limit has a rate
    /// (concurrency only): nothing to pace.
    ceiling: Option<f64>,
    /// The effective rate, per second, while it is below what the limits
    /// allow (None: the limits alone).
    rate: Option<f64>,
    /// The rate the last 429 came at: the curve the rate rises along is
    /// flat there.
    came_at: f64,
    /// When the rise began (the first success after the rate went down);
    /// None while it has not.
    rising_since: Option<Nanos>,
    /// Whether successes raise the rate (a plan holds a learnt one).
    rises: bool,
    /// The share of `came_at` the rate last went down to.
    decreased_to: f64,
    /// When the last 429 came.
    last_throttled: Option<Nanos>,
    /// The last sends, to know the rate a 429 came at.
    recent: VecDeque<Nanos>,
    /// No send before this, while pacing.
    next_send: Nanos,
    /// When the rate last went down: a 429 for a call sent before then is
    /// of the same round (a burst's calls in flight), not a new one.
    lowered_at: Option<Nanos>,
    /// Rounds of 429s since the last call that succeeded.
    rounds: u32,
    /// Calls the vendor's rate-limit headers counted that were not this
    /// scheduler's (another client on the same quota), and when.
    others: VecDeque<(Nanos, u64)>,
    /// A `Retry-After` cut short at the local window's reset: sends from
    /// the first instant to the second (the vendor's own figure) were
    /// early if the vendor's window is not where the profile puts it.
    early: Option<(Nanos, Nanos)>,
    /// False once a call sent early by that rule got a 429: this vendor's
    /// resets are not the profile's, and its `Retry-After` is waited out.
    resets_line_up: bool,
}

/// How far inside the profile's rates the runner and the proxy pace: 1 %.
/// An enforcer that times arrivals to the millisecond refuses a call that
/// arrives even 1 ms early after one that was delayed (connection set-up,
/// scheduler jitter). Two margins give its bucket the slack to absorb
/// that: one call of every burst is kept in reserve (so a call may arrive
/// a whole interval early, from the first burst on), and the bucket is
/// refilled 1 % slower (after a second at full pace, another 1 % of a
/// second of slack, up to the burst).
const MARGIN_PER_MILLE: u64 = 10;
/// A sliding window of fewer sub-windows gets no margin: one sub-window
/// more would cost more than 5 % of its rate.
const MARGIN_MIN_SEGMENTS: u32 = 20;

/// `policy` with every rate-based limit a little inside the profile: token
/// and leaky buckets refill `MARGIN_PER_MILLE` slower and keep one call of
/// their burst in reserve; sliding windows are one sub-window longer (1/60
/// of the rate for a minute of seconds). Fixed windows and tiers are
/// unchanged: their counts reset at calendar boundaries, so the spacing of
/// sends within a window cannot make a call early; a 429 at a boundary (a
/// clock apart from the vendor's) lowers the pace like any other.
pub fn with_margin(policy: &Policy) -> Policy {
    let slower = |period: Nanos| period.saturating_add(period / 1000 * MARGIN_PER_MILLE);
    let mut paced = policy.clone();
    for limit in &mut paced.limits {
        // A call may cost more than one unit (a header, an array's length):
        // then a unit less could leave a call that fills the bucket never
        // fitting, so only the rate gets the margin.
        let per_call = matches!(limit.cost, Cost::Requests);
        for params in &mut limit.variants {
            match params {
                Params::Gcra(p) => {
                    let reserve = u64::from(per_call && p.capacity > 1);
                    *p = GcraParams::with_rate(
                        p.capacity - reserve,
                        Rate {
                            amount: p.amount,
                            per: slower(p.period),
                        },
                    );
                }
                Params::SlidingWindow(p) if p.segments >= MARGIN_MIN_SEGMENTS => {
                    // One sub-window longer, on the same boundaries: the
                    // vendor's sub-windows are counted whole, so a window
                    // stretched by a fraction of one would end mid-way
                    // through its and let a call through early.
                    *p = SlidingWindowParams::new(p.quota, p.every + p.segment, p.segments + 1);
                }
                Params::SlidingWindow(_) => {}
                Params::FixedWindow(_) | Params::Tiered(_) | Params::Concurrency(_) => {}
            }
        }
    }
    paced
}

/// Each limit with a rate, and that rate per second (its default class).
fn limit_rates(policy: &Policy) -> impl Iterator<Item = (usize, f64)> + '_ {
    let per_second = |amount: u64, period: Nanos| {
        (period > 0).then(|| amount as f64 * NANOS_PER_SEC / period as f64)
    };
    policy
        .limits
        .iter()
        .enumerate()
        // (Only limits that count calls: a latency budget or a count of
        // records says nothing of how many calls a second go.)
        .filter(|(_, limit)| matches!(limit.cost, Cost::Requests))
        .filter_map(move |(i, limit)| {
            let rate = match limit.variants.first()? {
                Params::Gcra(p) => per_second(p.amount, p.period),
                Params::FixedWindow(p) => per_second(p.quota, p.calendar.every()),
                Params::SlidingWindow(p) => per_second(p.quota, p.every),
                Params::Tiered(p) => {
                    let tier = p.tiers.first()?;
                    per_second(tier.quota, tier.calendar.every())
                }
                Params::Concurrency(_) => None,
            }?;
            Some((i, rate))
        })
}

/// The fastest sustained rate a policy's limits allow, per second (None
/// when no limit has a rate: concurrency only).
pub fn sustained_rate(policy: &Policy) -> Option<f64> {
    limit_rates(policy)
        .map(|(_, rate)| rate)
        .max_by(f64::total_cmp)
}

/// One pace per key of the limit that sets the pace (the one with the
/// fastest sustained rate): a vendor that counts per API key is learnt per
/// key, so a key it holds to less does not slow the others, while an
/// upstream-wide limit gives the whole upstream one pace.
#[derive(Debug)]
pub(crate) struct Paces {
    /// The limit whose key tells paces apart (None: it has no key, or no
    /// limit has a rate; the upstream has one pace).
    by_limit: Option<usize>,
    /// A pace at rest, the start of every key's.
    fresh: Pace,
    paces: HashMap<CompactString, Pace, foldhash::fast::RandomState>,
    /// A rate learnt before, that every key starts from, and whether it
    /// rises (a plan holds it).
    resumed: Option<(f64, bool)>,
    /// No key's pace holds a send past this: until a pace is lowered, the
    /// scheduler asks no key's (the common case costs one comparison).
    latest_gate: Nanos,
}

impl Paces {
    pub(crate) fn new(policy: &Policy) -> Paces {
        let by_limit = limit_rates(policy)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
            .filter(|&i| !policy.limits[i].key.is_empty());
        Paces {
            by_limit,
            fresh: Pace::new(policy),
            paces: HashMap::default(),
            resumed: None,
            latest_gate: 0,
        }
    }

    /// The key of the pace a call with these items goes by ("" for a call
    /// the pacing limit does not count, or an upstream-wide one).
    pub(crate) fn key_of<'i>(&self, items: &'i [Item]) -> &'i str {
        self.by_limit
            .and_then(|limit| items.iter().find(|i| i.limit == limit))
            .map_or("", |i| i.key.as_str())
    }

    /// The pace of `key`, started if it was not.
    pub(crate) fn of(&mut self, key: &str) -> &mut Pace {
        // (A key is short: held inline, no allocation to look it up.)
        self.paces.entry(key.into()).or_insert_with(|| {
            let mut pace = self.fresh.clone();
            if let Some((rate, rising)) = self.resumed {
                pace.resume(rate, rising);
            }
            pace
        })
    }

    /// A call of `key` was sent at `now`.
    pub(crate) fn sent(&mut self, key: &str, now: Nanos) {
        if self.paces.len() >= KEPT_AT_REST && !self.paces.contains_key(key) {
            // Many keys (a limit per tenant): forget the paces that hold
            // nothing, as the store forgets idle keys.
            self.paces.retain(|_, pace| !pace.at_rest(now));
        }
        let pace = self.of(key);
        pace.sent(now);
        let gate = pace.next_send;
        self.latest_gate = self.latest_gate.max(gate);
    }

    /// `key`'s pace may hold sends later than before (a 429 lowered it).
    pub(crate) fn lowered(&mut self, key: &str) {
        if let Some(pace) = self.paces.get(key) {
            self.latest_gate = self.latest_gate.max(pace.next_send);
        }
    }

    /// When a call of `key` may go next, if not now.
    pub(crate) fn gate(&self, key: &str, now: Nanos) -> Option<Nanos> {
        if now >= self.latest_gate {
            return None;
        }
        self.paces.get(key)?.gate(now)
    }

    /// A key's pace is back at the limits': keys seen from now on start
    /// there too, not at the rate an earlier run learnt.
    pub(crate) fn restored(&mut self) {
        self.resumed = None;
    }

    /// Every key, and those to come, start from `rate`.
    pub(crate) fn resume(&mut self, rate: f64, rising: bool) {
        self.resumed = Some((rate, rising));
        for pace in self.paces.values_mut() {
            pace.resume(rate, rising);
        }
    }

    /// The slowest key's learnt rate (None: every key at the limits').
    pub(crate) fn learnt(&self) -> Option<f64> {
        if self.paces.is_empty() {
            // Before the first call: what every key will start from.
            let (rate, rising) = self.resumed?;
            let mut pace = self.fresh.clone();
            pace.resume(rate, rising);
            return pace.effective();
        }
        self.paces
            .values()
            .filter_map(Pace::effective)
            .min_by(f64::total_cmp)
    }

    /// The slowest key's pace at `now` (None: every key at the limits').
    pub(crate) fn pacing(&self, now: Nanos) -> Option<f64> {
        self.paces
            .values()
            .filter_map(|p| p.pacing(now))
            .min_by(f64::total_cmp)
    }

    /// The limits' fastest sustained rate, per second.
    pub(crate) fn ceiling(&self) -> Option<f64> {
        self.fresh.ceiling()
    }
}

impl Pace {
    pub(crate) fn new(policy: &Policy) -> Pace {
        Pace {
            ceiling: sustained_rate(policy),
            rate: None,
            came_at: 0.0,
            rising_since: None,
            rises: true,
            decreased_to: DECREASE,
            last_throttled: None,
            recent: VecDeque::with_capacity(RECENT_SENDS),
            next_send: 0,
            lowered_at: None,
            rounds: 0,
            others: VecDeque::new(),
            early: None,
            resets_line_up: true,
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

    /// Start from a rate learnt before (a resumed run, or a plan), if it is
    /// below what the limits allow. `rising`: whether calls that succeed
    /// raise it (a plan holds it where it was learnt).
    pub(crate) fn resume(&mut self, rate: f64, rising: bool) {
        let Some(ceiling) = self.ceiling else {
            return;
        };
        if rate.is_finite() && rate > 0.0 && rate < ceiling {
            let rate = rate.max(FLOOR * ceiling);
            self.rate = Some(rate);
            // The curve is flat here first: probing above it comes later.
            self.came_at = rate;
            self.decreased_to = DECREASE;
            self.rising_since = None;
            self.rises = rising;
        }
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

    /// How long another client's spending is measured over.
    fn share_span(&self) -> Nanos {
        let intervals = self
            .ceiling
            .map_or(0, |c| (SHARE_INTERVALS * NANOS_PER_SEC / c) as Nanos);
        SHARE_SPAN.max(intervals)
    }

    /// The vendor's rate-limit headers counted `calls` this scheduler did
    /// not send: another client spends the same quota.
    pub(crate) fn spent_by_others(&mut self, calls: u64, now: Nanos) {
        let span = self.share_span();
        while self
            .others
            .front()
            .is_some_and(|(at, _)| at.saturating_add(span) < now)
        {
            self.others.pop_front();
        }
        if calls > 0 {
            self.others.push_back((now, calls));
        }
    }

    /// The rate another client is seen to spend, when it is enough to make
    /// room for, and the rate that leaves this scheduler.
    pub(crate) fn shared(&self, now: Nanos) -> Option<(f64, f64)> {
        let ceiling = self.ceiling?;
        let span = self.share_span();
        let recent = || {
            self.others
                .iter()
                .filter(|(at, _)| at.saturating_add(span) >= now)
        };
        let (first, last) = (recent().next()?.0, recent().next_back()?.0);
        let spent: u64 = recent().map(|(_, calls)| calls).sum();
        let others = spent as f64 * NANOS_PER_SEC / span as f64;
        // A client that spends steadily shows in many replies across the
        // span. One that took a burst (or a rate above the limits') shows
        // as a lump: the corrections already took it off the local view,
        // and pacing for it would slow this scheduler for nothing.
        let steady = last.saturating_sub(first) >= span / 2 && others < ceiling;
        (steady && others > SHARE_NOTICED * ceiling).then(|| {
            let left = ((ceiling - others) * SHARE_KEPT).max(FLOOR * ceiling);
            (others, left)
        })
    }

    /// The rate sends go at now: the learnt rate, or what another client
    /// leaves if that is less (None: the limits alone).
    pub(crate) fn pacing(&self, now: Nanos) -> Option<f64> {
        let left = self.shared(now).map(|(_, left)| left);
        match (self.rate, left) {
            (Some(rate), Some(left)) => Some(rate.min(left)),
            (rate, left) => rate.or(left),
        }
    }

    /// Nothing learnt, nobody else seen, nothing held: forgetting this pace
    /// loses only its last sends.
    fn at_rest(&self, now: Nanos) -> bool {
        let span = self.share_span();
        self.rate.is_none()
            && now >= self.next_send
            && self
                .others
                .back()
                .is_none_or(|(at, _)| at.saturating_add(span) < now)
    }

    /// When the next send may go, if not now.
    pub(crate) fn gate(&self, now: Nanos) -> Option<Nanos> {
        (now < self.next_send).then_some(self.next_send)
    }

    /// A call was sent at `now`.
    pub(crate) fn sent(&mut self, now: Nanos) {
        if self.recent.len() == RECENT_SENDS {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if let Some(rate) = self.pacing(now) {
            // From when this send was due, not when it went: a timer that
            // fires late (tokio's tick is a millisecond) must not slow the
            // whole pace by its lateness. Up to half an interval is made up.
            let interval = Self::interval(rate);
            let due = if now.saturating_sub(self.next_send) <= interval / 2 {
                self.next_send
            } else {
                now
            };
            self.next_send = due.saturating_add(interval);
        }
    }

    /// A call succeeded at `now`: the rate rises, and pacing ends when it
    /// reaches what the limits allow.
    pub(crate) fn succeeded(&mut self, now: Nanos) {
        self.rounds = 0;
        let Some(rate) = self.rate.filter(|_| self.rises) else {
            return;
        };
        let since = *self.rising_since.get_or_insert(now);
        // came_at · (1 + c·(t − RISE)³), through the rate it went down to
        // at t = 0.
        // (Replies may be reported a little out of order: never negative.)
        let t = now.saturating_sub(since) as f64 / NANOS_PER_SEC;
        let c = (1.0 - self.decreased_to) / RISE.powi(3);
        let curve = self.came_at * (1.0 + c * (t - RISE).powi(3));
        let raised = rate.max(curve);
        self.rate = self.ceiling.filter(|c| raised < *c).map(|_| raised);
    }

    /// Whether a `Retry-After` may be cut short at the reset the local view
    /// holds (the scheduler's rule, `Scheduler::vendor_reset`).
    pub(crate) fn resets_line_up(&self) -> bool {
        self.resets_line_up
    }

    /// A `Retry-After` that ran to `vendor_until` was cut short to `until`.
    pub(crate) fn cut_short(&mut self, until: Nanos, vendor_until: Nanos) {
        self.early = Some((until, vendor_until));
    }

    /// A 429 for a call sent at `sent_at`, before the pace is lowered: if it
    /// was sent in a `Retry-After` that was cut short, the vendor's window
    /// did not reset where the profile's did.
    pub(crate) fn refused_early(&mut self, sent_at: Nanos) {
        if self
            .early
            .is_some_and(|(from, to)| (from..to).contains(&sent_at))
        {
            self.resets_line_up = false;
        }
    }

    /// A 429 for a call sent at `sent_at`: how long to wait without a
    /// `Retry-After` (one interval at the lowered pace), or None when 429s
    /// keep coming although the pace was lowered (back off as for an
    /// exhausted quota).
    pub(crate) fn throttled(&mut self, sent_at: Nanos, now: Nanos) -> Option<Nanos> {
        let ceiling = self.ceiling?;
        let lone = self
            .last_throttled
            .is_none_or(|at| now.saturating_sub(at) > LONE_AFTER);
        self.last_throttled = Some(now);
        if self.lowered_at.is_some_and(|at| sent_at < at) {
            // Sent before the pace went down: the same round.
            return Some(Self::interval(self.rate.unwrap_or(ceiling)));
        }
        self.rounds += 1;
        if self.rounds > ROUNDS_BEFORE_BACKOFF {
            return None;
        }
        let came_at = match self.pacing(now) {
            Some(rate) => rate,
            None => self.observed().unwrap_or(ceiling).min(ceiling),
        };
        self.decreased_to = if lone { LONE_DECREASE } else { DECREASE };
        let rate = (came_at * self.decreased_to).max(FLOOR * ceiling);
        self.rate = Some(rate);
        self.came_at = came_at;
        self.rising_since = None;
        self.lowered_at = Some(now);
        self.next_send = now.saturating_add(Self::interval(rate));
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
        // A lone 429: the pace tightens a little, to 0.95 of the 10/s.
        let wait = pace.throttled(1900 * MS, 2000 * MS);
        let rate = pace.effective().unwrap();
        assert!((9.4..9.6).contains(&rate), "{rate}/s");
        assert_eq!(wait, Some(105_263_157));
        // A call of the same round: no second decrease.
        assert_eq!(pace.throttled(1950 * MS, 2001 * MS), Some(105_263_157));
        assert_eq!(pace.effective(), Some(rate));
        // Successes raise it along the curve: flat near the 10/s the 429
        // came at, 4 s after the first success, and past it the limits bind.
        pace.succeeded(2100 * MS);
        assert_eq!(pace.effective(), Some(rate));
        pace.succeeded(4100 * MS);
        let raised = pace.effective().unwrap();
        assert!((9.9..9.95).contains(&raised), "{raised}/s");
        pace.succeeded(6100 * MS);
        assert_eq!(pace.effective(), None, "back to the limits alone");
    }

    fn policy(text: &str) -> Policy {
        tollgate_core::parse(text, &NoProfiles).unwrap()
    }

    #[test]
    fn a_halved_limit_is_followed_down_and_back_up_within_seconds() {
        let mut pace = Pace::new(&policy("[[limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n"));
        // Paced down to about 50/s (a vendor that halved its limit) ...
        pace.resume(50.0, true);
        let mut now = 0;
        let mut at = |secs: u64| {
            // calls succeed every 10 ms until `secs`
            while now < secs * 1000 * MS {
                now += 10 * MS;
                pace.succeeded(now);
            }
            pace.effective()
        };
        // ... it holds there while the vendor may still be at 50/s ...
        let held = at(4).unwrap();
        assert!((50.0..50.5).contains(&held), "{held}/s");
        // ... then probes faster and faster: twice as fast by about 11 s.
        let probing = at(8).unwrap();
        assert!((55.0..65.0).contains(&probing), "{probing}/s");
        assert_eq!(at(12), None, "back at the limits' 100/s");
    }

    #[test]
    fn a_plan_holds_a_learnt_rate_and_one_at_or_above_the_limits_is_none() {
        let bucket = policy("[[limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n");
        let mut pace = Pace::new(&bucket);
        pace.resume(40.0, false);
        pace.succeeded(0);
        pace.succeeded(60_000 * MS);
        assert_eq!(pace.effective(), Some(40.0));
        let mut pace = Pace::new(&bucket);
        pace.resume(100.0, true);
        assert_eq!(pace.effective(), None);
    }

    #[test]
    fn another_client_on_the_quota_leaves_a_pace_a_little_inside_what_it_leaves() {
        let mut pace = Pace::new(&policy("[[limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nquota = 200\nevery = \"1s\"\n"));
        // Headers counted 19 calls not sent from here every 200 ms: 95/s.
        for i in 1..=10 {
            pace.spent_by_others(19, i * 200 * MS);
        }
        let (others, left) = pace.shared(2000 * MS).unwrap();
        assert!((94.9..95.1).contains(&others), "{others}/s");
        assert!((101.8..101.9).contains(&left), "{left}/s");
        assert_eq!(pace.pacing(2000 * MS), Some(left));
        pace.sent(2000 * MS);
        assert_eq!(pace.gate(2000 * MS), Some(2000 * MS + 9_818_360));
        // A stray call or two is noise; and when the other client stops,
        // the limits alone pace again.
        assert_eq!(pace.shared(4100 * MS), None);
        pace.spent_by_others(2, 4100 * MS);
        assert_eq!(pace.pacing(4100 * MS), None);
    }

    #[test]
    fn a_reply_reported_out_of_order_does_not_end_a_pace() {
        let mut pace = Pace::new(&policy("[[limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n"));
        pace.resume(50.0, true);
        pace.succeeded(2000 * MS);
        // A success stamped a little earlier, counted after it.
        pace.succeeded(1999 * MS);
        assert_eq!(pace.effective(), Some(50.0));
    }

    #[test]
    fn many_keys_keep_only_the_paces_that_hold_something() {
        let mut paces = Paces::new(&policy("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n"));
        // One key slowed by a 429, then thousands of keys at rest.
        paces.sent("slow", 0);
        paces.of("slow").throttled(0, MS);
        for i in 0..5000 {
            paces.sent(&format!("tenant-{i}"), 10_000 * MS + i);
        }
        assert!(paces.paces.len() <= KEPT_AT_REST, "{}", paces.paces.len());
        assert!(
            paces.paces.contains_key("slow"),
            "the slowed key's pace is kept"
        );
        assert_eq!(paces.learnt(), Some(95.0));
    }

    #[test]
    fn the_margin_keeps_no_reserve_where_a_call_may_cost_more_than_one_unit() {
        let paced = with_margin(&policy("[[limit]]\nname = \"records\"\nalgorithm = \"token_bucket\"\ncapacity = 200\nrefill = \"200/s\"\ncost = { header = \"x-records\" }\n[[limit]]\nname = \"coarse\"\nalgorithm = \"sliding_window\"\nquota = 100\nevery = \"60s\"\nsegments = 6\n"));
        let Params::Gcra(records) = &paced.limits[0].variants[0] else {
            panic!("a bucket")
        };
        assert_eq!(records.capacity, 200, "a 200-record call still fits");
        assert_eq!(records.period, 1_010 * MS);
        let Params::SlidingWindow(coarse) = &paced.limits[1].variants[0] else {
            panic!("a sliding window")
        };
        assert_eq!(
            (coarse.every, coarse.segments),
            (60_000 * MS, 6),
            "a sub-window more would cost 1/6"
        );
    }

    #[test]
    fn the_margin_slows_buckets_by_one_percent_and_sliding_windows_by_a_sub_window() {
        let paced = with_margin(&policy("[[limit]]\nname = \"bucket\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n[[limit]]\nname = \"rolling\"\nalgorithm = \"sliding_window\"\nquota = 100\nevery = \"60s\"\nsegments = 60\n[[limit]]\nname = \"window\"\nalgorithm = \"fixed_window\"\nquota = 200\nevery = \"1s\"\n"));
        let Params::Gcra(bucket) = &paced.limits[0].variants[0] else {
            panic!("a bucket")
        };
        assert_eq!((bucket.capacity, bucket.amount), (19, 100));
        assert_eq!(bucket.period, 1_010 * MS);
        let Params::SlidingWindow(rolling) = &paced.limits[1].variants[0] else {
            panic!("a sliding window")
        };
        assert_eq!((rolling.quota, rolling.segments), (100, 61));
        assert_eq!((rolling.every, rolling.segment), (61_000 * MS, 1_000 * MS));
        let Params::FixedWindow(window) = &paced.limits[2].variants[0] else {
            panic!("a fixed window")
        };
        assert_eq!(window.quota, 200);
        assert_eq!(window.calendar.every(), 1_000 * MS);
    }
}
