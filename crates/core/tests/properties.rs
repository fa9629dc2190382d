//! Property tests of every algorithm against naive reference models.
//!
//! Each reference keeps the full log of admitted events and answers by
//! counting over it; none of them shares code with `tollgate_core::algo`.
//! Traces are random (time delta, cost) sequences with small parameters, so
//! times are mostly plain nanoseconds; the DST properties use real instants
//! around Amsterdam's 2026 clock changes.
//!
//! What is held to what:
//! - token/leaky bucket (GCRA): decisions, `remaining` and `reset` equal an
//!   ideal continuously refilled bucket's, exactly (see `Ideal`);
//! - fixed_window: a request is admitted iff its clock window has room (UTC
//!   and Europe/Amsterdam across both 2026 DST changes);
//! - sliding_window: never more than `quota` in any window of length `every`,
//!   and a denial only when the exact log holds more than `quota - cost` in
//!   `(t - every - segment, t]`, the precision `sliding_window.rs` documents;
//! - tiered: decisions and per-pool accounting equal a replay that spills each
//!   admitted request over the pools, most frequent first; a day never admits
//!   more than the sum of its pools' refills;
//! - concurrency: in flight never above `max`, with random releases;
//! - every denial's `retry_after` r: one nanosecond before `now + r` the same
//!   request is still denied, at `now + r` it is admitted;
//! - several limits on one request: all or nothing, and hold reservations
//!   that are exact and seen by later requests.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tollgate_core::algo::concurrency::{Concurrency, ConcurrencyParams, ConcurrencyState};
use tollgate_core::algo::fixed_window::{FixedWindow, FixedWindowParams, FixedWindowState};
use tollgate_core::algo::gcra::{Gcra, GcraParams, GcraState};
use tollgate_core::algo::sliding_window::{SlidingWindow, SlidingWindowParams, SlidingWindowState};
use tollgate_core::algo::tiered::{Tier, Tiered, TieredParams, TieredState};
use tollgate_core::algo::{Meter, Usage};
use tollgate_core::calendar::Calendar;
use tollgate_core::policy::Params;
use tollgate_core::units::Rate;
use tollgate_core::{decide, Decision, Nanos, NoProfiles, Slot, Verdict};

const CASES: u32 = 256;
use tollgate_core::units::{DAY, HOUR, MINUTE, SECOND as SEC};
/// 2026-03-29T01:00:00Z: Amsterdam goes from CET (UTC+1) to CEST (UTC+2).
const SPRING_2026: Nanos = 1_774_746_000 * SEC;
/// 2026-10-25T01:00:00Z: Amsterdam goes back from CEST to CET.
const FALL_2026: Nanos = 1_792_890_000 * SEC;
const YEAR_2026: (Nanos, Nanos) = (1_767_225_600 * SEC, 1_798_761_600 * SEC);

// ---------------------------------------------------------------------------
// Reference calendars: window boundaries computed from first principles.
// ---------------------------------------------------------------------------

/// Clock-aligned windows of `every` ns, independent of `tollgate_core::calendar`.
#[derive(Debug, Clone, Copy)]
enum RefCal {
    /// Windows start at multiples of `every` since the epoch.
    Utc(Nanos),
    /// Europe/Amsterdam in 2026 (CET, CEST from SPRING_2026 to FALL_2026).
    /// A boundary is an instant at which the local wall clock shows a multiple
    /// of `every` (time of day), or jumps forward past one into the next
    /// window (at 2026-03-29 01:00Z the clock goes 02:00 -> 03:00, crossing
    /// 02:00: a boundary for 2 h windows, not for 4 h ones); `every` divides an
    /// hour or is whole hours.
    Amsterdam(Nanos),
}

impl RefCal {
    /// Local time of day at `t`, in ns since local midnight.
    fn wall(t: Nanos) -> Nanos {
        assert!(
            (YEAR_2026.0..YEAR_2026.1).contains(&t),
            "the Amsterdam reference only knows 2026"
        );
        let offset = if (SPRING_2026..FALL_2026).contains(&t) {
            2 * HOUR
        } else {
            HOUR
        };
        (t + offset) % DAY
    }

    /// Boundaries lie on this UTC grid (offsets are whole hours).
    fn grid(every: Nanos) -> Nanos {
        assert!(HOUR.is_multiple_of(every) || every.is_multiple_of(HOUR));
        every.min(HOUR)
    }

    fn is_boundary(every: Nanos, t: Nanos) -> bool {
        let jumped_into_next =
            t == SPRING_2026 && Self::wall(t) / every != Self::wall(t - 1) / every;
        t.is_multiple_of(Self::grid(every)) && Self::wall(t).is_multiple_of(every)
            || jumped_into_next
    }

    /// Start of the window that contains `t`.
    fn start(&self, t: Nanos) -> Nanos {
        match *self {
            RefCal::Utc(e) => t - t % e,
            RefCal::Amsterdam(e) => {
                let g = Self::grid(e);
                let mut b = t - t % g;
                while !Self::is_boundary(e, b) {
                    b -= g;
                }
                b
            }
        }
    }

    /// End (exclusive) of the window that contains `t`.
    fn end(&self, t: Nanos) -> Nanos {
        match *self {
            RefCal::Utc(e) => t - t % e + e,
            RefCal::Amsterdam(e) => {
                let g = Self::grid(e);
                let mut b = t - t % g + g;
                while !Self::is_boundary(e, b) {
                    b += g;
                }
                b
            }
        }
    }

    fn calendar(&self) -> Calendar {
        match *self {
            RefCal::Utc(e) => Calendar::utc(e),
            RefCal::Amsterdam(e) => {
                Calendar::new(e, "Europe/Amsterdam").expect("a valid Amsterdam calendar")
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The limits under test, their states, and one decision over several of them.
// ---------------------------------------------------------------------------

/// A limit's parameters plus what its reference needs, derived independently.
#[derive(Debug, Clone)]
enum Lim {
    Gcra(GcraParams),
    Fixed {
        params: FixedWindowParams,
        cal: RefCal,
    },
    Sliding {
        params: SlidingWindowParams,
        every: Nanos,
    },
    Tiered {
        params: TieredParams,
        tiers: Vec<(RefCal, u64)>,
    },
    Conc(ConcurrencyParams),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum St {
    Gcra(GcraState),
    Fixed(FixedWindowState),
    Sliding(SlidingWindowState),
    Tiered(TieredState),
    Conc(ConcurrencyState),
}

impl Lim {
    fn gcra(capacity: u64, amount: u64, period: Nanos) -> Lim {
        Lim::Gcra(GcraParams::with_rate(
            capacity,
            Rate {
                amount,
                per: period,
            },
        ))
    }
    fn fixed(quota: u64, cal: RefCal) -> Lim {
        Lim::Fixed {
            params: FixedWindowParams {
                quota,
                calendar: cal.calendar(),
            },
            cal,
        }
    }
    fn sliding(quota: u64, every: Nanos, segments: u32) -> Lim {
        Lim::Sliding {
            params: SlidingWindowParams::new(quota, every, segments),
            every,
        }
    }
    /// `tiers` most frequent first.
    fn tiered(tiers: Vec<(RefCal, u64)>) -> Lim {
        Lim::Tiered {
            params: TieredParams {
                tiers: tiers
                    .iter()
                    .map(|(cal, quota)| Tier {
                        quota: *quota,
                        calendar: cal.calendar(),
                    })
                    .collect(),
            },
            tiers,
        }
    }
    fn conc(max: u64) -> Lim {
        Lim::Conc(ConcurrencyParams { max })
    }

    fn fresh(&self) -> St {
        match self {
            Lim::Gcra(_) => St::Gcra(GcraState::default()),
            Lim::Fixed { .. } => St::Fixed(FixedWindowState::default()),
            Lim::Sliding { .. } => St::Sliding(SlidingWindowState::default()),
            Lim::Tiered { .. } => St::Tiered(TieredState::default()),
            Lim::Conc(_) => St::Conc(0),
        }
    }

    /// The most this limit can ever admit at once.
    fn capacity(&self) -> u64 {
        match self {
            Lim::Gcra(p) => p.capacity,
            Lim::Fixed { params, .. } => params.quota,
            Lim::Sliding { params, .. } => params.quota,
            Lim::Tiered { tiers, .. } => tiers.iter().map(|t| t.1).sum(),
            Lim::Conc(p) => p.max,
        }
    }
}

fn meter<'a>(lim: &'a Lim, st: &'a mut St) -> Box<dyn Meter + 'a> {
    match (lim, st) {
        (Lim::Gcra(params), St::Gcra(tat)) => Box::new(Gcra { params, tat }),
        (Lim::Fixed { params, .. }, St::Fixed(state)) => Box::new(FixedWindow::new(params, state)),
        (Lim::Sliding { params, .. }, St::Sliding(state)) => {
            Box::new(SlidingWindow { params, state })
        }
        (Lim::Tiered { params, .. }, St::Tiered(state)) => Box::new(Tiered { params, state }),
        (Lim::Conc(params), St::Conc(in_flight)) => Box::new(Concurrency { params, in_flight }),
        (lim, st) => panic!("state {st:?} does not belong to {lim:?}"),
    }
}

/// One limit's part of a request.
#[derive(Debug, Clone, Copy)]
struct Part {
    cost: u64,
    charge: u64,
    hold: Nanos,
}

fn part(cost: u64) -> Part {
    Part {
        cost,
        charge: cost,
        hold: 0,
    }
}

fn run(now: Nanos, lims: &[Lim], states: &mut [St], parts: &[Part]) -> Decision {
    assert_eq!(lims.len(), states.len());
    assert_eq!(lims.len(), parts.len());
    let mut meters: Vec<Box<dyn Meter + '_>> = lims
        .iter()
        .zip(states.iter_mut())
        .map(|(l, s)| meter(l, s))
        .collect();
    let mut slots: Vec<Slot<&mut dyn Meter>> = meters
        .iter_mut()
        .zip(parts)
        .map(|(m, p)| Slot {
            meter: m.as_mut(),
            cost: p.cost,
            charge: p.charge,
            hold: p.hold,
            shadow: false,
        })
        .collect();
    decide(now, &mut slots)
}

fn run1(now: Nanos, lim: &Lim, st: &mut St, cost: u64) -> Decision {
    run(
        now,
        std::slice::from_ref(lim),
        std::slice::from_mut(st),
        &[part(cost)],
    )
}

fn usage(lim: &Lim, st: &St, now: Nanos) -> Usage {
    let mut st = st.clone();
    let u = meter(lim, &mut st).usage(now);
    u
}

const NOW: Verdict = Verdict::Admit { delay: 0 };

/// `retry_after` is exact: the same request (same holds) arriving one
/// nanosecond before `now + r` is still denied, and arriving at `now + r` it
/// is admitted: at once when nothing may hold, else possibly held.
fn assert_retry_exact(
    now: Nanos,
    lims: &[Lim],
    states: &[St],
    parts: &[Part],
    r: Nanos,
) -> Result<(), TestCaseError> {
    prop_assert!(r > 0, "a denial with retry_after 0");
    let mut early = states.to_vec();
    let d = run(now + r - 1, lims, &mut early, parts);
    prop_assert!(
        matches!(
            d.verdict,
            Verdict::Deny {
                retry_after: Some(1),
                ..
            }
        ),
        "retry_after {} at {}: at {} (1 ns earlier) expected a denial with retry_after 1, got {:?}",
        r,
        now,
        now + r - 1,
        d.verdict
    );
    prop_assert_eq!(&early, states, "a denial changed the state");
    let mut late = states.to_vec();
    let d = run(now + r, lims, &mut late, parts);
    if parts.iter().all(|p| p.hold == 0) {
        prop_assert_eq!(
            d.verdict,
            NOW,
            "retry_after {} at {}: not admitted at {}",
            r,
            now,
            now + r
        );
    } else {
        prop_assert!(
            d.allowed(),
            "retry_after {} at {}: not admitted (even held) at {}: {:?}",
            r,
            now,
            now + r,
            d.verdict
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reference models.
// ---------------------------------------------------------------------------

/// The admitted log of one limit: (instant, units), in decision order.
type Log = Vec<(Nanos, u64)>;

/// Ideal token bucket: `capacity` units, refilled continuously at `amount`
/// units per `period` ns, starting full.
///
/// With the level recursion `L_j = min(C, L_{j-1} - n_{j-1} + (t_j - t_{j-1}) * A/P)`
/// unrolled, the level at `t` is `min(C, min_i (C + (t - t_i) * A/P - S_i))`,
/// where `S_i` is the units admitted from logged event i on. So `n` more
/// units fit at `t` iff `n <= C` and, for every logged event i,
/// `(S_i + n) * P <= C * P + (t - t_i) * A`: the pairwise "no stretch of time
/// admits more than C plus its refill" rule, in integers.
#[derive(Debug, Clone, Copy)]
struct Ideal {
    capacity: u64,
    amount: u64,
    period: Nanos,
}

impl Ideal {
    fn of(p: &GcraParams) -> Ideal {
        Ideal {
            capacity: p.capacity,
            amount: p.amount,
            period: p.period,
        }
    }

    /// The log must hold only events at or before `t`.
    fn admits(&self, log: &[(Nanos, u64)], t: Nanos, n: u64) -> bool {
        if n > self.capacity {
            return false;
        }
        let (c, a, p) = (
            self.capacity as u128,
            self.amount as u128,
            self.period as u128,
        );
        let mut suffix = n as u128;
        for &(ti, ni) in log.iter().rev() {
            assert!(ti <= t);
            suffix += ni as u128;
            if suffix * p > c * p + (t - ti) as u128 * a {
                return false;
            }
        }
        true
    }

    /// Whole units held at `t` and ns until one more (0 when full). In
    /// 1/A-ns units the slack is `min_i (C*P + (t - t_i)*A - S_i*P)`; all terms
    /// grow at A per ns, so the next unit comes when the minimum reaches the
    /// next multiple of P.
    fn usage(&self, log: &[(Nanos, u64)], t: Nanos) -> Usage {
        let (c, a, p) = (
            self.capacity as i128,
            self.amount as i128,
            self.period as i128,
        );
        let mut suffix = 0i128;
        let mut slack = c * p;
        for &(ti, ni) in log.iter().rev() {
            suffix += ni as i128;
            slack = slack.min(c * p + (t - ti) as i128 * a - suffix * p);
        }
        if slack >= c * p {
            return Usage {
                remaining: self.capacity,
                reset: 0,
            };
        }
        assert!(slack >= 0, "the log itself over-admits");
        let remaining = slack / p;
        let reset = ((remaining + 1) * p - slack + a - 1) / a;
        Usage {
            remaining: remaining as u64,
            reset: reset as u64,
        }
    }

    /// Over the log sorted by time, every pair i <= j admits at most
    /// `C + (t_j - t_i) * A/P` units (exactly, in integers).
    fn conforms(&self, log: &[(Nanos, u64)]) -> Result<(), String> {
        let (c, a, p) = (
            self.capacity as u128,
            self.amount as u128,
            self.period as u128,
        );
        let mut log = log.to_vec();
        log.sort_by_key(|e| e.0);
        for i in 0..log.len() {
            let mut sum = 0u128;
            for j in i..log.len() {
                sum += log[j].1 as u128;
                if sum * p > c * p + (log[j].0 - log[i].0) as u128 * a {
                    return Err(format!(
                        "bucket over-admission: {sum} units in [{}, {}] by {self:?}: {log:?}",
                        log[i].0, log[j].0
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Units in the log at instants in `(lo, hi]` (lo may be "before 0").
fn sum_in(log: &[(Nanos, u64)], lo: i128, hi: Nanos) -> u64 {
    log.iter()
        .filter(|(t, _)| i128::from(*t) > lo && *t <= hi)
        .map(|e| e.1)
        .sum()
}

/// Units in the log inside the clock window that contains `t`.
fn in_window(cal: RefCal, log: &[(Nanos, u64)], t: Nanos) -> u64 {
    let start = cal.start(t);
    log.iter()
        .filter(|(ti, _)| cal.start(*ti) == start)
        .map(|e| e.1)
        .sum()
}

/// Tiered pools replayed from the log: each admitted request (or latency
/// debit) takes from the most frequent pool with room, spilling over.
#[derive(Debug, Clone)]
struct RefTiered {
    tiers: Vec<(RefCal, u64)>,
    /// (instant, units taken from each pool).
    log: Vec<(Nanos, Vec<u64>)>,
}

impl RefTiered {
    fn new(tiers: Vec<(RefCal, u64)>) -> Self {
        RefTiered { tiers, log: vec![] }
    }
    fn used(&self, tier: usize, t: Nanos) -> u64 {
        let cal = self.tiers[tier].0;
        self.log
            .iter()
            .filter(|(ti, _)| cal.start(*ti) == cal.start(t))
            .map(|(_, takes)| takes[tier])
            .sum()
    }
    fn available(&self, t: Nanos) -> u64 {
        (0..self.tiers.len())
            .map(|i| self.tiers[i].1 - self.used(i, t))
            .sum()
    }
    /// Take up to `amount` at `t`, first pool first; what does not fit is dropped.
    fn take(&mut self, t: Nanos, mut amount: u64) {
        let takes = (0..self.tiers.len())
            .map(|i| {
                let room = self.tiers[i].1 - self.used(i, t);
                let take = room.min(amount);
                amount -= take;
                take
            })
            .collect();
        self.log.push((t, takes));
    }
    fn total(&self) -> Log {
        self.log
            .iter()
            .map(|(t, takes)| (*t, takes.iter().sum()))
            .collect()
    }
}

/// Whether a log obeys `lim` (zero over-admission), whatever order the events
/// were decided in. Used where the log holds reservations (held requests).
fn conforms(lim: &Lim, log: &[(Nanos, u64)]) -> Result<(), String> {
    match lim {
        Lim::Gcra(p) => Ideal::of(p).conforms(log),
        Lim::Fixed { params, cal } => {
            for &(t, _) in log {
                let used = in_window(*cal, log, t);
                if used > params.quota {
                    return Err(format!(
                        "fixed window over-admission: {used} > {} in the window of {t}: {log:?}",
                        params.quota
                    ));
                }
            }
            Ok(())
        }
        Lim::Sliding { params, every, .. } => {
            for &(t, _) in log {
                let used = sum_in(log, i128::from(t) - i128::from(*every), t);
                if used > params.quota {
                    return Err(format!(
                        "sliding window over-admission: {used} > {} in ({}, {t}]: {log:?}",
                        params.quota,
                        i128::from(t) - i128::from(*every)
                    ));
                }
            }
            Ok(())
        }
        Lim::Tiered { tiers, .. } => {
            // The longest window holds at most the sum of every pool's refills in it.
            let (long, _) = *tiers.last().expect("a tier");
            for &(t, _) in log {
                let (start, end) = (long.start(t), long.end(t));
                let bound: u64 = tiers
                    .iter()
                    .map(|(cal, quota)| {
                        let mut windows = 0;
                        let mut w = start;
                        while w < end {
                            windows += 1;
                            w = cal.end(w);
                        }
                        quota * windows
                    })
                    .sum();
                let used = in_window(long, log, t);
                if used > bound {
                    return Err(format!(
                        "tiered over-admission: {used} > {bound} in [{start}, {end}): {log:?}"
                    ));
                }
            }
            Ok(())
        }
        Lim::Conc(p) => {
            // Used only for traces without releases.
            let total: u64 = log.iter().map(|e| e.1).sum();
            if total > p.max {
                return Err(format!("{total} in flight > max {}", p.max));
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------

/// A time step: often 0 (a burst at one instant), often 1 ns, else up to `max`.
fn step(max: Nanos) -> impl Strategy<Value = Nanos> {
    prop_oneof![3 => Just(0), 1 => Just(1), 5 => 0..=max]
}

fn any_gcra() -> impl Strategy<Value = Lim> {
    (1u64..=5, 1u64..=3, 1u64..=20).prop_map(|(c, a, p)| Lim::gcra(c, a, p))
}
fn any_fixed() -> impl Strategy<Value = Lim> {
    (1u64..=5, 1u64..=30).prop_map(|(q, e)| Lim::fixed(q, RefCal::Utc(e)))
}
fn any_sliding() -> impl Strategy<Value = Lim> {
    (1u64..=6, 2u64..=40, 1u32..=5).prop_map(|(q, e, s)| Lim::sliding(q, e.max(u64::from(s)), s))
}
/// Up to three nested UTC tiers, e.g. every 3, 9, 27 ns.
fn any_tiered() -> impl Strategy<Value = Lim> {
    (1u64..=6, 2u64..=4, 2u64..=3, vec(1u64..=3, 1..=3)).prop_map(|(e0, k1, k2, quotas)| {
        let every = [e0, e0 * k1, e0 * k1 * k2];
        Lim::tiered(
            quotas
                .iter()
                .zip(every)
                .map(|(q, e)| (RefCal::Utc(e), *q))
                .collect(),
        )
    })
}
fn any_conc() -> impl Strategy<Value = Lim> {
    (1u64..=4).prop_map(Lim::conc)
}
fn any_rate_limit() -> impl Strategy<Value = Lim> {
    prop_oneof![any_gcra(), any_fixed(), any_sliding(), any_tiered()]
}
fn any_limit() -> impl Strategy<Value = Lim> {
    prop_oneof![
        any_gcra(),
        any_fixed(),
        any_sliding(),
        any_tiered(),
        any_conc()
    ]
}

// ---------------------------------------------------------------------------
// token_bucket / leaky_bucket
// ---------------------------------------------------------------------------

/// Run a single-limit GCRA trace against the ideal bucket; returns the log.
fn gcra_trace(lim: &Lim, start: Nanos, trace: &[(Nanos, u64)]) -> Result<Log, TestCaseError> {
    let Lim::Gcra(p) = lim else {
        unreachable!("a bucket")
    };
    let (capacity, ideal_bucket) = (p.capacity, Ideal::of(p));
    let mut st = lim.fresh();
    let mut log: Log = vec![];
    let mut now = start;
    for &(dt, cost) in trace {
        now += dt;
        let before = st.clone();
        let d = run1(now, lim, &mut st, cost);
        if cost > capacity {
            prop_assert_eq!(
                d.verdict,
                Verdict::Never {
                    limit: 0,
                    cost,
                    capacity
                }
            );
            prop_assert_eq!(&st, &before);
            continue;
        }
        let ideal = ideal_bucket.admits(&log, now, cost);
        match d.verdict {
            Verdict::Admit { delay: 0 } => {
                prop_assert!(
                    ideal,
                    "over-admission: cost {} at {} after {:?}",
                    cost,
                    now,
                    log
                );
                log.push((now, cost));
            }
            Verdict::Deny {
                limit: 0,
                retry_after: Some(r),
            } => {
                prop_assert!(
                    !ideal,
                    "under-admission: cost {} at {} after {:?}",
                    cost,
                    now,
                    log
                );
                prop_assert_eq!(&st, &before);
                prop_assert_eq!(d.outcomes[0].retry_after, Some(r));
                assert_retry_exact(now, std::slice::from_ref(lim), &[before], &[part(cost)], r)?;
                prop_assert!(ideal_bucket.admits(&log, now + r, cost));
                prop_assert!(!ideal_bucket.admits(&log, now + r - 1, cost));
            }
            other => prop_assert!(false, "unexpected verdict {:?}", other),
        }
        let u = usage(lim, &st, now);
        prop_assert_eq!(u, ideal_bucket.usage(&log, now));
        prop_assert_eq!(d.outcomes[0].remaining, u.remaining);
        prop_assert_eq!(d.outcomes[0].reset, u.reset);
        prop_assert_eq!(
            meter(lim, &mut st.clone()).at_rest(now),
            u.remaining == capacity,
            "at rest exactly when full"
        );
    }
    ideal_bucket.conforms(&log).map_err(TestCaseError::fail)?;
    Ok(log)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// GCRA is exactly the ideal bucket: same decisions, same remaining and reset.
    #[test]
    fn gcra_is_the_ideal_bucket(
        lim in any_gcra(),
        start in 0u64..50,
        trace in vec((step(25), 1u64..=6), 1..60),
    ) {
        gcra_trace(&lim, start, &trace)?;
    }

    /// token_bucket and leaky_bucket parse to the same meter, which is
    /// exactly the ideal bucket of the configured refill (`amount` per `per` ns,
    /// not a rounded interval).
    #[test]
    fn token_and_leaky_bucket_from_toml(
        capacity in 1u64..=5,
        amount in 1u64..=4,
        per in 1u64..=30,
        trace in vec((step(25), 1u64..=6), 1..60),
    ) {
        let mut logs = vec![];
        for algorithm in ["token_bucket", "leaky_bucket"] {
            let text = format!(
                "[[limit]]\nname = \"b\"\nalgorithm = \"{algorithm}\"\ncapacity = {capacity}\nrefill = \"{amount}/{per}ns\"\n"
            );
            let policy = tollgate_core::parse(&text, &NoProfiles).expect("a valid policy");
            let Params::Gcra(p) = policy.limits[0].params(0) else {
                return Err(TestCaseError::fail(format!("{algorithm} is not GCRA")));
            };
            prop_assert_eq!(p.capacity, capacity);
            prop_assert_eq!(p.amount * per, amount * p.period, "the rate is not {}/{}", amount, per);
            logs.push(gcra_trace(&Lim::Gcra(*p), 0, &trace)?);
        }
        prop_assert_eq!(&logs[0], &logs[1], "token_bucket and leaky_bucket differ");
    }
}

// ---------------------------------------------------------------------------
// fixed_window
// ---------------------------------------------------------------------------

fn fixed_trace(lim: &Lim, start: Nanos, trace: &[(Nanos, u64)]) -> Result<(), TestCaseError> {
    let Lim::Fixed { params, cal } = lim else {
        unreachable!("a fixed window")
    };
    let (quota, cal) = (params.quota, *cal);
    let mut st = lim.fresh();
    let mut log: Log = vec![];
    let mut now = start;
    for &(dt, cost) in trace {
        now += dt;
        let before = st.clone();
        let d = run1(now, lim, &mut st, cost);
        if cost > quota {
            prop_assert_eq!(
                d.verdict,
                Verdict::Never {
                    limit: 0,
                    cost,
                    capacity: quota
                }
            );
            continue;
        }
        let used = in_window(cal, &log, now);
        match d.verdict {
            Verdict::Admit { delay: 0 } => {
                prop_assert!(
                    used + cost <= quota,
                    "over-admission at {}: {} used of {} in [{}, {})",
                    now,
                    used,
                    quota,
                    cal.start(now),
                    cal.end(now)
                );
                log.push((now, cost));
            }
            Verdict::Deny {
                limit: 0,
                retry_after: Some(r),
            } => {
                prop_assert!(
                    used + cost > quota,
                    "under-admission at {}: {} used of {} in [{}, {}), cost {}",
                    now,
                    used,
                    quota,
                    cal.start(now),
                    cal.end(now),
                    cost
                );
                prop_assert_eq!(&st, &before);
                // The window is full for this cost: the next window is empty.
                prop_assert_eq!(now + r, cal.end(now));
                assert_retry_exact(now, std::slice::from_ref(lim), &[before], &[part(cost)], r)?;
            }
            other => prop_assert!(false, "unexpected verdict {:?}", other),
        }
        let used = in_window(cal, &log, now);
        let u = usage(lim, &st, now);
        prop_assert_eq!(
            u,
            Usage {
                remaining: quota - used,
                reset: if used == 0 { 0 } else { cal.end(now) - now },
            }
        );
    }
    for &(t, _) in &log {
        prop_assert!(in_window(cal, &log, t) <= quota);
    }
    Ok(())
}

fn amsterdam_every() -> impl Strategy<Value = Nanos> {
    prop_oneof![
        Just(15 * MINUTE),
        Just(HOUR),
        Just(2 * HOUR),
        Just(3 * HOUR),
        Just(4 * HOUR),
        Just(6 * HOUR),
        Just(DAY),
    ]
}

/// Steps on a real clock: bursts, 1 ns, quarter hours (to land on
/// boundaries exactly) and arbitrary spans up to three hours.
fn real_step() -> impl Strategy<Value = Nanos> {
    prop_oneof![
        2 => Just(0u64),
        1 => Just(1u64),
        2 => (1u64..=12).prop_map(|k| k * 15 * MINUTE),
        2 => (1u64..=12).prop_map(|k| k * 15 * MINUTE - 1),
        3 => 0..=3 * HOUR,
    ]
}

/// Somewhere in the 30 hours before one of the 2026 DST changes, on an hour
/// or just off one.
fn dst_start() -> impl Strategy<Value = Nanos> {
    (prop::bool::ANY, 0u64..=30, 0u64..=2).prop_map(|(spring, hours, off)| {
        let change = if spring { SPRING_2026 } else { FALL_2026 };
        change - hours * HOUR - off
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// UTC windows: admitted iff the window has room, denied until it ends.
    #[test]
    fn fixed_window_counts_each_window(
        lim in any_fixed(),
        start in 0u64..50,
        trace in vec((step(20), 1u64..=6), 1..60),
    ) {
        fixed_trace(&lim, start, &trace)?;
    }

    /// Europe/Amsterdam windows across 23- and 25-hour days.
    #[test]
    fn fixed_window_follows_amsterdam_across_dst(
        every in amsterdam_every(),
        quota in 1u64..=4,
        start in dst_start(),
        trace in vec((real_step(), 1u64..=3), 1..50),
    ) {
        fixed_trace(&Lim::fixed(quota, RefCal::Amsterdam(every)), start, &trace)?;
    }
}

/// The calendar's windows are the reference's on a grid of instants (every
/// quarter hour, and one ns either side) across both 2026 DST changes.
#[test]
fn calendar_windows_match_the_reference_across_dst() {
    let mut wrong = vec![];
    for every in [
        15 * MINUTE,
        HOUR,
        2 * HOUR,
        3 * HOUR,
        4 * HOUR,
        6 * HOUR,
        8 * HOUR,
        12 * HOUR,
        DAY,
    ] {
        let cal = RefCal::Amsterdam(every);
        let real = cal.calendar();
        for change in [SPRING_2026, FALL_2026] {
            let mut t = change - 30 * HOUR;
            while t < change + 30 * HOUR {
                for t in [t - 1, t, t + 1] {
                    let w = real.window(t);
                    if (w.start, w.end) != (cal.start(t), cal.end(t)) {
                        wrong.push(format!(
                            "every {}h at {t}: got [{}, {}), expected [{}, {})",
                            every as f64 / HOUR as f64,
                            w.start,
                            w.end,
                            cal.start(t),
                            cal.end(t)
                        ));
                    }
                }
                t += 15 * MINUTE;
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong windows, e.g.:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(12)].join("\n")
    );
}

/// Minimal over-admission behind `calendar_windows_match_the_reference_across_dst`:
/// 4-hour windows in Amsterdam on the spring-forward day. Local 00:00-04:00
/// is one window, 23:00Z to 02:00Z (02:00-03:00 local never happens). One
/// unit at 23:00Z (local 00:00) fills it. At 01:00Z (local 03:00 CEST) the
/// window is still full, but a calendar that has not cached 23:00Z's window
/// (another process on the same store, a restart, or an evicted cache entry)
/// computes a window starting at 22:00Z, a fresh counter, and admits again.
#[test]
fn fixed_window_four_hours_across_spring_forward_admits_one_quota() {
    let first = Lim::fixed(1, RefCal::Amsterdam(4 * HOUR));
    let second = Lim::fixed(1, RefCal::Amsterdam(4 * HOUR)); // its own, cold cache
    let mut st = first.fresh();
    assert_eq!(
        run1(SPRING_2026 - 2 * HOUR, &first, &mut st, 1).verdict,
        NOW
    );
    let d = run1(SPRING_2026, &second, &mut st, 1);
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            limit: 0,
            retry_after: Some(HOUR)
        },
        "local 03:00 is in the 00:00-04:00 window that already holds its quota"
    );
}

/// Minimal case of `fixed_window_follows_amsterdam_across_dst`: 6-hour windows
/// on the fall-back day. At 00:59:59.999999999Z (local 02:59:59 CEST) the
/// window is local 00:00-06:00 CET, 22:00Z to 05:00Z; the calendar returns
/// one that ends at 23:00Z, before `now`, and `FixedWindow::usage` computes
/// `w.end - now` and panics (subtract with overflow; a huge `reset` in release).
#[test]
fn fixed_window_six_hours_across_fall_back_contains_now() {
    let lim = Lim::fixed(2, RefCal::Amsterdam(6 * HOUR));
    let mut st = lim.fresh();
    let now = FALL_2026 - 1;
    let d = std::panic::catch_unwind(move || run1(now, &lim, &mut st, 1));
    let d = d.expect("decide panicked: the window of `now` does not contain it");
    assert_eq!(d.verdict, NOW);
    assert_eq!(d.outcomes[0].reset, FALL_2026 + 4 * HOUR - now);
}

/// The reference calendar agrees with the hand-checked DST facts it models.
#[test]
fn reference_calendar_knows_the_2026_dst_days() {
    let day = RefCal::Amsterdam(DAY);
    let t = SPRING_2026 + 11 * HOUR;
    assert_eq!(day.end(t) - day.start(t), 23 * HOUR);
    assert_eq!(day.start(t), SPRING_2026 - 2 * HOUR); // local midnight, 23:00Z
    let t = FALL_2026 + 11 * HOUR;
    assert_eq!(day.end(t) - day.start(t), 25 * HOUR);
    let four = RefCal::Amsterdam(4 * HOUR);
    // 00:00-04:00 local on the spring day is three real hours.
    assert_eq!(four.end(SPRING_2026) - four.start(SPRING_2026), 3 * HOUR);
}

// ---------------------------------------------------------------------------
// sliding_window
// ---------------------------------------------------------------------------

fn sliding_trace(
    quota: u64,
    every: Nanos,
    segments: u32,
    start: Nanos,
    trace: &[(Nanos, u64)],
) -> Result<(), TestCaseError> {
    let lim = Lim::sliding(quota, every, segments);
    // The documented sub-window length, derived independently.
    let g = every.div_ceil(u64::from(segments));
    let mut st = lim.fresh();
    let mut log: Log = vec![];
    let mut now = start;
    let exact = |log: &Log, t: Nanos| sum_in(log, i128::from(t) - i128::from(every), t);
    let wide = |log: &Log, t: Nanos| sum_in(log, i128::from(t) - i128::from(every + g), t);
    for &(dt, cost) in trace {
        now += dt;
        let before = st.clone();
        let d = run1(now, &lim, &mut st, cost);
        if cost > quota {
            prop_assert_eq!(
                d.verdict,
                Verdict::Never {
                    limit: 0,
                    cost,
                    capacity: quota
                }
            );
            continue;
        }
        match d.verdict {
            Verdict::Admit { delay: 0 } => {
                prop_assert!(
                    exact(&log, now) + cost <= quota,
                    "over-admission: cost {} at {} with {:?}",
                    cost,
                    now,
                    log
                );
                log.push((now, cost));
            }
            Verdict::Deny {
                limit: 0,
                retry_after: Some(r),
            } => {
                prop_assert!(
                    wide(&log, now) + cost > quota,
                    "under-admission beyond the documented precision: cost {} denied at {} \
                     (quota {}, every {}, segments {}, segment {}) with only {} in ({}, {}]: {:?}",
                    cost,
                    now,
                    quota,
                    every,
                    segments,
                    g,
                    wide(&log, now),
                    i128::from(now) - i128::from(every + g),
                    now,
                    log
                );
                prop_assert_eq!(&st, &before);
                assert_retry_exact(now, std::slice::from_ref(&lim), &[before], &[part(cost)], r)?;
                // And the reference agrees: at now + r it fits the exact window,
                // one ns earlier the documented window is too full.
                prop_assert!(exact(&log, now + r) + cost <= quota);
                prop_assert!(wide(&log, now + r - 1) + cost > quota);
            }
            other => prop_assert!(false, "unexpected verdict {:?}", other),
        }
    }
    for &(t, _) in &log {
        prop_assert!(
            exact(&log, t) <= quota,
            "over-admission in ({}, {}]",
            i128::from(t) - i128::from(every),
            t
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Windows that split evenly into segments.
    #[test]
    fn sliding_window_within_documented_precision(
        quota in 1u64..=6,
        segments in 1u32..=5,
        per_segment in 1u64..=8,
        start in 0u64..50,
        trace in vec((step(30), 1u64..=7), 1..60),
    ) {
        sliding_trace(quota, per_segment * u64::from(segments), segments, start, &trace)?;
    }

    /// Any window length, including ones the segments do not divide.
    #[test]
    fn sliding_window_within_documented_precision_uneven(
        quota in 1u64..=6,
        segments in 1u32..=5,
        every in 2u64..=40,
        start in 0u64..50,
        trace in vec((step(30), 1u64..=7), 1..60),
    ) {
        sliding_trace(quota, every.max(u64::from(segments)), segments, start, &trace)?;
    }
}

/// Minimal case of `sliding_window_within_documented_precision_uneven`:
/// quota 1, every 10 ns, 3 segments (so a segment is 4 ns and the counted
/// sub-windows span 12 ns). One unit at t=0; at t=15 the exact log holds
/// nothing in the documented window (15 - 10 - 4, 15] = (1, 15], so a
/// denial there is beyond the documented precision.
#[test]
fn sliding_window_precision_when_segments_do_not_divide_every() {
    let lim = Lim::sliding(1, 10, 3);
    let mut st = lim.fresh();
    assert_eq!(run1(0, &lim, &mut st, 1).verdict, NOW);
    assert_eq!(
        run1(15, &lim, &mut st, 1).verdict,
        NOW,
        "denied at 15 although (1, 15] is empty"
    );
}

/// Minimal case of `holds_reserve_exact_slots`: quota 3 in any 10 ns, two
/// 5 ns segments. One unit at 0; at 10 a request of 3 is held until 14 (when
/// (t - 10, t] no longer overlaps the segment holding 0; its reservation lands
/// in the next segment). A request of 1 at 10 must then be denied: admitting
/// it would put 1 + 3 = 4 > 3 in (4, 14]. (It once was admitted, because a
/// decision did not count reservations in the next segment.)
#[test]
fn sliding_window_immediate_admission_sees_reservations() {
    let lim = Lim::sliding(3, 10, 2);
    let lims = std::slice::from_ref(&lim);
    let mut st = vec![lim.fresh()];
    assert_eq!(run(0, lims, &mut st, &[part(1)]).verdict, NOW);
    let held = Part {
        cost: 3,
        charge: 3,
        hold: 5,
    };
    assert_eq!(
        run(10, lims, &mut st, &[held]).verdict,
        Verdict::Admit { delay: 4 }
    );
    let d = run(10, lims, &mut st, &[part(1)]);
    assert!(
        !d.allowed(),
        "admitted 1 at 10 with 3 reserved at 15: 4 units in (5, 15], quota 3 ({:?})",
        d.verdict
    );
}

// ---------------------------------------------------------------------------
// tiered
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum TierOp {
    /// A request of this many units.
    Req(u64),
    /// A latency request: admitted while some pool has a unit left (cost 1,
    /// charge 0), then this much debited at completion.
    Latency(u64),
}

fn tiered_trace(lim: &Lim, start: Nanos, trace: &[(Nanos, TierOp)]) -> Result<(), TestCaseError> {
    let Lim::Tiered { tiers, .. } = lim else {
        unreachable!("tiered")
    };
    let total: u64 = tiers.iter().map(|t| t.1).sum();
    let mut reference = RefTiered::new(tiers.clone());
    let mut st = lim.fresh();
    let mut now = start;
    for (dt, op) in trace {
        now += dt;
        let before = st.clone();
        let (cost, charge, debit) = match *op {
            TierOp::Req(n) => (n, n, 0),
            TierOp::Latency(d) => (1, 0, d),
        };
        let parts = [Part {
            cost,
            charge,
            hold: 0,
        }];
        let d = run(
            now,
            std::slice::from_ref(lim),
            std::slice::from_mut(&mut st),
            &parts,
        );
        if cost > total {
            prop_assert_eq!(
                d.verdict,
                Verdict::Never {
                    limit: 0,
                    cost,
                    capacity: total
                }
            );
            continue;
        }
        let available = reference.available(now);
        match d.verdict {
            Verdict::Admit { delay: 0 } => {
                prop_assert!(
                    available >= cost,
                    "over-admission: {} at {} with {} left",
                    cost,
                    now,
                    available
                );
                reference.take(now, charge);
                if debit > 0 {
                    meter(lim, &mut st).debit(now, debit);
                    reference.take(now, debit);
                }
            }
            Verdict::Deny {
                limit: 0,
                retry_after: Some(r),
            } => {
                prop_assert!(
                    available < cost,
                    "under-admission: {} at {} with {} left",
                    cost,
                    now,
                    available
                );
                prop_assert_eq!(&st, &before);
                assert_retry_exact(now, std::slice::from_ref(lim), &[before], &parts, r)?;
                prop_assert!(reference.available(now + r) >= cost);
                prop_assert!(reference.available(now + r - 1) < cost);
            }
            other => prop_assert!(false, "unexpected verdict {:?}", other),
        }
        // Per-pool accounting, read from the state itself.
        let St::Tiered(pools) = &st else {
            unreachable!("tiered state")
        };
        for (i, (cal, _)) in tiers.iter().enumerate() {
            let used = pools.get(i).map_or(0, |w| w.used(cal.start(now)));
            prop_assert_eq!(used, reference.used(i, now), "pool {} at {}", i, now);
        }
        prop_assert_eq!(usage(lim, &st, now).remaining, reference.available(now));
    }
    conforms(lim, &reference.total()).map_err(TestCaseError::fail)?;
    Ok(())
}

fn tier_op() -> impl Strategy<Value = TierOp> {
    prop_oneof![
        3 => (1u64..=8).prop_map(TierOp::Req),
        1 => (0u64..=6).prop_map(TierOp::Latency),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Pools and fall-through equal the replayed spill, request by request.
    #[test]
    fn tiered_spills_like_the_replay(
        lim in any_tiered(),
        start in 0u64..50,
        trace in vec((step(20), tier_op()), 1..60),
    ) {
        tiered_trace(&lim, start, &trace)?;
    }

    /// An hour pool and a day pool in Europe/Amsterdam across the DST days.
    #[test]
    fn tiered_follows_amsterdam_across_dst(
        hourly in 1u64..=2,
        daily in 1u64..=4,
        start in dst_start(),
        trace in vec((real_step(), tier_op()), 1..50),
    ) {
        let lim = Lim::tiered(vec![
            (RefCal::Amsterdam(HOUR), hourly),
            (RefCal::Amsterdam(DAY), daily),
        ]);
        tiered_trace(&lim, start, &trace)?;
    }
}

/// Hammering all day long, a local day admits exactly every pool's refills:
/// 23, 24 or 25 hour pools plus one day pool.
#[test]
fn tiered_day_total_is_the_sum_of_refills() {
    for (midnight, hours) in [
        (SPRING_2026 - 2 * HOUR, 23),
        (SPRING_2026 + 21 * HOUR, 24),
        (FALL_2026 - 3 * HOUR, 25),
    ] {
        let lim = Lim::tiered(vec![
            (RefCal::Amsterdam(HOUR), 2),
            (RefCal::Amsterdam(DAY), 5),
        ]);
        let mut st = lim.fresh();
        let mut admitted = 0;
        let mut t = midnight - 10 * MINUTE;
        while t < midnight + 26 * HOUR {
            if run1(t, &lim, &mut st, 1).allowed()
                && (midnight..midnight + hours * HOUR).contains(&t)
            {
                admitted += 1;
            }
            t += 10 * MINUTE;
        }
        assert_eq!(admitted, 2 * hours + 5, "day starting {midnight}");
    }
}

// ---------------------------------------------------------------------------
// concurrency
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum ConcOp {
    Acquire(u64),
    /// Release the in-flight request at this index (modulo their number).
    Release(usize),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// In flight never exceeds max; admitted iff it fits; denials wait for a release.
    #[test]
    fn concurrency_never_exceeds_max(
        max in 1u64..=4,
        ops in vec(prop_oneof![
            (1u64..=5).prop_map(ConcOp::Acquire),
            (0usize..8).prop_map(ConcOp::Release),
        ], 1..80),
    ) {
        let lim = Lim::conc(max);
        let mut st = lim.fresh();
        let mut in_flight: Vec<u64> = vec![];
        let now = 1_000;
        for op in ops {
            match op {
                ConcOp::Release(i) => {
                    if !in_flight.is_empty() {
                        let n = in_flight.remove(i % in_flight.len());
                        meter(&lim, &mut st).release(n);
                    }
                }
                ConcOp::Acquire(cost) => {
                    let before = st.clone();
                    let d = run1(now, &lim, &mut st, cost);
                    let sum: u64 = in_flight.iter().sum();
                    if cost > max {
                        prop_assert_eq!(d.verdict, Verdict::Never { limit: 0, cost, capacity: max });
                    } else if sum + cost <= max {
                        prop_assert_eq!(d.verdict, NOW);
                        in_flight.push(cost);
                    } else {
                        prop_assert_eq!(d.verdict, Verdict::Deny { limit: 0, retry_after: None });
                        prop_assert_eq!(&st, &before);
                    }
                }
            }
            let sum: u64 = in_flight.iter().sum();
            prop_assert!(sum <= max);
            prop_assert_eq!(&st, &St::Conc(sum));
            prop_assert_eq!(usage(&lim, &st, now).remaining, max - sum);
        }
    }
}

// ---------------------------------------------------------------------------
// Several limits on one request
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Step {
    dt: Nanos,
    costs: [u64; 3],
    /// Release the oldest admitted request first (concurrency limits).
    release: bool,
}

fn multi_step() -> impl Strategy<Value = Step> {
    (
        step(25),
        [1u64..=5, 1u64..=5, 1u64..=5],
        prop::bool::weighted(0.3),
    )
        .prop_map(|(dt, costs, release)| Step { dt, costs, release })
}

/// Minimal case of `holds_reserve_exact_slots`: quota 1 in any 4 ns, two
/// 2 ns segments, hold 10 ns. After one unit at 0, the same request runs at 5
/// at the earliest (when (t - 4, t] stops overlapping segment [0, 2)). The hold
/// is long enough from 0 on, but a reservation reaches only one segment
/// ahead: 5 is in segment 2, reservable from an arrival in segment 1, i.e.
/// from 2. So arriving at 1 is denied, at 2 it is held 3 ns, and a denial at 0
/// must say retry_after 2: the earliest arrival that would be admitted.
#[test]
fn retry_after_with_hold_is_the_earliest_admitted_arrival() {
    let lim = Lim::sliding(1, 4, 2);
    let lims = std::slice::from_ref(&lim);
    let held = [Part {
        cost: 1,
        charge: 1,
        hold: 10,
    }];
    let mut st = vec![lim.fresh()];
    assert_eq!(run(0, lims, &mut st, &[part(1)]).verdict, NOW);
    assert_eq!(
        run(2, lims, &mut st.clone(), &held).verdict,
        Verdict::Admit { delay: 3 }
    );
    assert!(!run(1, lims, &mut st.clone(), &held).allowed());
    assert_eq!(
        run(0, lims, &mut st, &held).verdict,
        Verdict::Deny {
            limit: 0,
            retry_after: Some(2)
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// All or nothing: admitted iff every limit alone admits, committing
    /// exactly what each would alone; a denial changes no state; retry_after
    /// is exact for the combination.
    #[test]
    fn several_limits_are_all_or_nothing(
        lims in vec(any_limit(), 2..=3),
        start in 0u64..50,
        trace in vec(multi_step(), 1..50),
    ) {
        let mut st: Vec<St> = lims.iter().map(Lim::fresh).collect();
        let mut now = start;
        let mut running: std::collections::VecDeque<Vec<u64>> = Default::default();
        for s in trace {
            now += s.dt;
            if s.release {
                if let Some(charges) = running.pop_front() {
                    for (i, lim) in lims.iter().enumerate() {
                        if matches!(lim, Lim::Conc(_)) {
                            meter(lim, &mut st[i]).release(charges[i]);
                        }
                    }
                }
            }
            let parts: Vec<Part> = s.costs[..lims.len()].iter().map(|&c| part(c)).collect();
            let before = st.clone();
            // Each limit alone, on a copy.
            let alone: Vec<(Decision, St)> = lims
                .iter()
                .zip(&before)
                .zip(&parts)
                .map(|((lim, s0), p)| {
                    let mut s1 = s0.clone();
                    (run1(now, lim, &mut s1, p.cost), s1)
                })
                .collect();
            let d = run(now, &lims, &mut st, &parts);
            if let Some(i) = alone.iter().position(|(a, _)| matches!(a.verdict, Verdict::Never { .. })) {
                prop_assert_eq!(
                    d.verdict,
                    Verdict::Never { limit: i, cost: parts[i].cost, capacity: lims[i].capacity() }
                );
                prop_assert_eq!(&st, &before);
                continue;
            }
            let all = alone.iter().all(|(a, _)| a.verdict == NOW);
            prop_assert_eq!(d.allowed(), all, "combined {:?} vs alone {:?}", d.verdict, alone);
            for (i, (a, _)) in alone.iter().enumerate() {
                prop_assert_eq!(d.outcomes[i].allowed, a.verdict == NOW || d.allowed());
            }
            match d.verdict {
                Verdict::Admit { delay } => {
                    prop_assert_eq!(delay, 0);
                    for (i, (_, after)) in alone.iter().enumerate() {
                        prop_assert_eq!(&st[i], after, "limit {} committed differently", i);
                    }
                    running.push_back(parts.iter().map(|p| p.charge).collect());
                }
                Verdict::Deny { limit, retry_after } => {
                    prop_assert_eq!(&st, &before, "a denial changed some state");
                    prop_assert!(alone[limit].0.verdict != NOW, "named limit {} admits alone", limit);
                    match retry_after {
                        Some(r) => {
                            for (a, _) in &alone {
                                if let Verdict::Deny { retry_after: Some(own), .. } = a.verdict {
                                    prop_assert!(own <= r);
                                }
                            }
                            assert_retry_exact(now, &lims, &before, &parts, r)?;
                        }
                        None => prop_assert!(alone.iter().any(|(a, _)| matches!(
                            a.verdict,
                            Verdict::Deny { retry_after: None, .. }
                        )), "no instant promised, yet no limit waits for a release"),
                    }
                }
                Verdict::Never { .. } => prop_assert!(false, "Never without a limit that never fits"),
            }
        }
    }

    /// Holds: a held request waits exactly until it fits, within every
    /// waiting limit's hold, and its reservation is seen by a later request
    /// at the same instant; the logs (with reservations at their run times)
    /// never over-admit.
    #[test]
    fn holds_reserve_exact_slots(
        lims in vec(any_rate_limit(), 1..=3),
        holds in vec(0u64..=30, 3),
        start in 0u64..50,
        trace in vec((step(20), [1u64..=5, 1u64..=5, 1u64..=5]), 1..50),
    ) {
        let mut st: Vec<St> = lims.iter().map(Lim::fresh).collect();
        let mut logs: Vec<Log> = vec![vec![]; lims.len()];
        let mut now = start;
        for (dt, costs) in trace {
            now += dt;
            let parts: Vec<Part> = (0..lims.len())
                .map(|i| Part { cost: costs[i], charge: costs[i], hold: holds[i] })
                .collect();
            if parts.iter().zip(&lims).any(|(p, l)| p.cost > l.capacity()) {
                continue;
            }
            let before = st.clone();
            // The exact earliest instant, with no hold.
            let no_hold: Vec<Part> = parts.iter().map(|p| Part { hold: 0, ..*p }).collect();
            let exact = run(now, &lims, &mut before.clone(), &no_hold).verdict;
            let wait = match exact {
                Verdict::Admit { delay: 0 } => 0,
                Verdict::Deny { retry_after: Some(r), .. } => r,
                other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
            };
            // Holds of the limits that would make it wait on their own.
            let waiting_hold = (0..lims.len())
                .filter(|&i| run1(now, &lims[i], &mut before[i].clone(), parts[i].cost).verdict != NOW)
                .map(|i| parts[i].hold)
                .min()
                .unwrap_or(0);
            let reservable = lims.iter().zip(&before).all(|(l, s)| {
                meter(l, &mut s.clone()).reservable(now, now + wait)
            });
            let d = run(now, &lims, &mut st, &parts);
            match d.verdict {
                Verdict::Admit { delay } => {
                    prop_assert_eq!(delay, wait, "held for {} but fits at +{}", delay, wait);
                    prop_assert!(delay <= waiting_hold);
                    for (i, log) in logs.iter_mut().enumerate() {
                        log.push((now + delay, parts[i].charge));
                    }
                    if delay > 0 {
                        // The same request again, now: it must see the reservation.
                        let again = run(now, &lims, &mut st.clone(), &no_hold).verdict;
                        prop_assert!(
                            matches!(again, Verdict::Deny { retry_after: Some(r), .. } if r >= delay),
                            "after a reservation at +{}, the same request at the same instant got {:?}",
                            delay,
                            again
                        );
                    }
                }
                Verdict::Deny { retry_after, .. } => {
                    prop_assert_eq!(&st, &before);
                    // Arriving at now + wait it runs at once, so it is no later than that;
                    // with holds it may be earlier (admitted held).
                    let r = retry_after.expect("a rate limit can always promise an instant");
                    prop_assert!(r <= wait, "retry_after {} beyond the instant {} it fits", r, wait);
                    assert_retry_exact(now, &lims, &before, &parts, r)?;
                    prop_assert!(
                        wait > waiting_hold || !reservable,
                        "denied although it fits at +{} within hold {} and is reservable",
                        wait,
                        waiting_hold
                    );
                }
                Verdict::Never { .. } => prop_assert!(false, "unexpected Never"),
            }
        }
        for (lim, log) in lims.iter().zip(&logs) {
            conforms(lim, log).map_err(TestCaseError::fail)?;
        }
    }
}
