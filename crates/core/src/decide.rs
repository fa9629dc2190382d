//! One decision over every limit that applies to a request.
//!
//! All limits are checked and committed together: a request denied by one
//! limit consumes nothing from the others. The instant a request can run is the
//! smallest `t >= now` at which every enforcing limit admits it (a fixpoint over
//! the meters' `earliest`). If `t == now` it runs now; if every limit that makes
//! it wait allows a hold that long, the slot at `t` is reserved and the request
//! waits `t - now`; otherwise it is denied with `retry_after`, the earliest
//! arrival that would be admitted (at once, or held): exact, so arriving one
//! nanosecond earlier is still denied.

use crate::algo::{Earliest, Meter};
use crate::units::Nanos;
use smallvec::SmallVec;

/// One limit's part in a decision. `M` is the algorithm bound to the key's
/// state: a store's own meter type (decided without a virtual call), or
/// `&mut dyn Meter`.
#[derive(Debug)]
pub struct Slot<M> {
    /// The algorithm bound to the key's state.
    pub meter: M,
    /// Units that must fit to admit (1 for latency limits: "some time left").
    pub cost: u64,
    /// Units recorded at admission (0 for latency limits, debited at completion).
    pub charge: u64,
    /// How long this limit lets a request wait for capacity.
    pub hold: Nanos,
    /// Decide and report, never deny.
    pub shadow: bool,
}

/// What a decision says of the request as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Run after `delay` nanoseconds (0: at once).
    Admit {
        /// How long the request is held first.
        delay: Nanos,
    },
    /// Denied by the slot at index `limit`; `retry_after` is None when only a
    /// release (concurrency) can make room.
    Deny {
        /// The slot (the request's item) that denied it.
        limit: usize,
        /// How long until that limit alone would admit it.
        retry_after: Option<Nanos>,
    },
    /// The cost can never fit the slot at index `limit`: not a 429.
    Never {
        /// The slot (the request's item) it can never fit.
        limit: usize,
        /// What the request costs.
        cost: u64,
        /// The most that limit admits at once.
        capacity: u64,
    },
}

/// What one limit says of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Whether this limit admits it.
    pub allowed: bool,
    /// Units left after this request.
    pub remaining: u64,
    /// Nanoseconds until the limit is whole again.
    pub reset: Nanos,
    /// For a limit that would deny on its own: how long until it alone admits.
    pub retry_after: Option<Nanos>,
    /// The limit only reports (`mode = "shadow"`).
    pub shadow: bool,
}

impl Outcome {
    /// `s`'s outcome: whether it admits, and what it has left at `now`.
    #[inline]
    fn of<M: Meter>(s: &Slot<M>, now: Nanos, allowed: bool, retry_after: Option<Nanos>) -> Outcome {
        let usage = s.meter.usage(now);
        Outcome {
            allowed,
            remaining: usage.remaining,
            reset: usage.reset,
            retry_after,
            shadow: s.shadow,
        }
    }
}

/// A request's decision: the verdict, and each limit's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Admitted or not, and why.
    pub verdict: Verdict,
    /// One per slot, in slot order.
    pub outcomes: SmallVec<[Outcome; 4]>,
}

impl Decision {
    /// Whether the request is admitted.
    pub fn allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Admit { .. })
    }
}

const MAX_ROUNDS: usize = 64;

/// Decide the limits of one request at `now`, all or nothing: admitted
/// only if every enforcing limit admits it (after a hold, when one allows
/// it), and then charged to all of them.
pub fn decide<M: Meter>(now: Nanos, slots: &mut [Slot<M>]) -> Decision {
    match slots {
        [slot] => decide_one(now, slot),
        _ => decide_several(now, slots),
    }
}

/// `decide` for a request under one limit.
#[inline]
pub fn decide_one<M: Meter>(now: Nanos, s: &mut Slot<M>) -> Decision {
    // The usual request, enforced and with room now, needs none of the
    // combination. (One decision, returned from one place: the usual one,
    // admitted now, is built in its caller's place, not aside and copied
    // there, as the decision's 208 bytes were when each path returned its
    // own; a combined one is still moved in.)
    let mut decision = Decision {
        verdict: Verdict::Admit { delay: 0 },
        outcomes: SmallVec::new(),
    };
    let earliest = (!s.shadow).then(|| s.meter.earliest(now, s.cost, now));
    if earliest == Some(Earliest::At(now)) {
        s.meter.commit(now, s.charge, now);
        let usage = s.meter.usage(now);
        // (not `Outcome::of`: written out, the one-limit path keeps its inlining)
        decision.outcomes.push(Outcome {
            allowed: true,
            remaining: usage.remaining,
            reset: usage.reset,
            retry_after: None,
            shadow: false,
        });
    } else {
        decision = combine(now, std::slice::from_mut(s), earliest.into_iter().collect());
    }
    decision
}

/// `decide` for a request under several limits.
fn decide_several<M: Meter>(now: Nanos, slots: &mut [Slot<M>]) -> Decision {
    // The usual request, every limit enforcing with room now, needs none of
    // the combination. The limits are asked in order up to the first that
    // does not admit now (a hold may still let it wait) or that only
    // reports (a shadow, left unasked); `combine` is given the answers.
    let mut admitting = 0;
    let mut first_not_now = None;
    for s in slots.iter() {
        if s.shadow {
            break;
        }
        let earliest = s.meter.earliest(now, s.cost, now);
        if earliest != Earliest::At(now) {
            first_not_now = Some(earliest);
            break;
        }
        admitting += 1;
    }
    if admitting == slots.len() {
        return admit_all_now(now, slots);
    }
    let mut asked = SmallVec::new();
    asked.resize(admitting, Earliest::At(now));
    asked.extend(first_not_now);
    combine(now, slots, asked)
}

/// The decision over every limit, given what the first few were asked
/// already (`asked`: their earliest instants from `now`, in slot order).
fn combine<M: Meter>(
    now: Nanos,
    slots: &mut [Slot<M>],
    asked: SmallVec<[Earliest; 4]>,
) -> Decision {
    let mut own = asked;
    for s in &slots[own.len()..] {
        own.push(s.meter.earliest(now, s.cost, now));
    }

    if let Some((i, capacity)) = own.iter().enumerate().find_map(|(i, e)| match e {
        Earliest::Never { capacity } if !slots[i].shadow => Some((i, *capacity)),
        _ => None,
    }) {
        let verdict = Verdict::Never {
            limit: i,
            cost: slots[i].cost,
            capacity,
        };
        return report(now, slots, &own, verdict);
    }

    let (start, blocked) = fixpoint(now, slots, &own);
    let wait = start.saturating_sub(now);
    // (the hold in force matters only to a request that would wait)
    let hold = || {
        slots
            .iter()
            .zip(&own)
            .filter(|(s, e)| !s.shadow && **e != Earliest::At(now))
            .map(|(s, _)| s.hold)
            .min()
            .unwrap_or(0)
    };
    let fits = !blocked
        && (wait == 0
            || (wait <= hold()
                && slots
                    .iter()
                    .all(|s| s.shadow || s.meter.reservable(now, start))));

    if !fits {
        let limit = binding_slot(now, slots, &own);
        let retry_after = (!blocked).then(|| retry_instant(now, start, slots) - now);
        return report(now, slots, &own, Verdict::Deny { limit, retry_after });
    }

    // (built in place: a vector of outcomes moved into it is a copy of its 160 bytes)
    let mut decision = Decision {
        verdict: Verdict::Admit { delay: wait },
        outcomes: SmallVec::new(),
    };
    for s in slots.iter_mut() {
        let mut allowed = true;
        let mut retry_after = None;
        if s.shadow {
            match s.meter.earliest(now, s.cost, start) {
                Earliest::At(t) if t == start && s.meter.reservable(now, start) => {
                    s.meter.commit(now, s.charge, start)
                }
                Earliest::At(t) => (allowed, retry_after) = (false, Some(t - now)),
                _ => allowed = false,
            }
        } else {
            s.meter.commit(now, s.charge, start);
        }
        decision
            .outcomes
            .push(Outcome::of(s, now, allowed, retry_after));
    }
    decision
}

/// Every slot enforcing and admitting at `now`, the usual request under
/// several limits: commit each and report (what `combine` would, without
/// its bookkeeping).
fn admit_all_now<M: Meter>(now: Nanos, slots: &mut [Slot<M>]) -> Decision {
    let mut decision = Decision {
        verdict: Verdict::Admit { delay: 0 },
        outcomes: SmallVec::new(),
    };
    for s in slots.iter_mut() {
        s.meter.commit(now, s.charge, now);
        decision.outcomes.push(Outcome::of(s, now, true, None));
    }
    decision
}

/// The smallest instant at which every enforcing slot admits, and whether
/// some slot can only admit after a release.
fn fixpoint<M: Meter>(now: Nanos, slots: &[Slot<M>], own: &[Earliest]) -> (Nanos, bool) {
    let mut t = now;
    for (s, e) in slots.iter().zip(own) {
        match e {
            _ if s.shadow => {}
            Earliest::At(x) => t = t.max(*x),
            _ => return (now, true),
        }
    }
    // One limit, or every limit admits now (t is the largest own earliest): settled.
    if slots.len() == 1 || t == now {
        return (t, false);
    }
    // Each meter moves `t` only a bounded number of times (to its next window
    // or refill), so this settles quickly; if it ever did not, deny rather
    // than commit at an instant some limit has not agreed to.
    for _ in 0..MAX_ROUNDS {
        let mut moved = false;
        for s in slots.iter().filter(|s| !s.shadow) {
            match s.meter.earliest(now, s.cost, t) {
                Earliest::At(x) if x > t => (t, moved) = (x, true),
                Earliest::At(_) => {}
                _ => return (now, true),
            }
        }
        if !moved {
            return (t, false);
        }
    }
    (now, true)
}

/// The earliest arrival instant at which this request would be admitted,
/// at once or after a hold, if nothing else arrived. From any arrival `x` in
/// `[now, start]` it runs at `start` (no earlier instant suits every limit),
/// so arriving at `x` it waits `start - x`: admitted if every limit that does
/// not admit at `x` on its own holds that long, and every limit can reserve
/// `start` from `x`. Walk `x` forward from `now` through the instants where
/// that can become true: a limit starts admitting on its own, the wait falls
/// to the hold in force, or `start` comes within reach of a reservation.
fn retry_instant<M: Meter>(now: Nanos, start: Nanos, slots: &[Slot<M>]) -> Nanos {
    let reservable = |x: Nanos| {
        slots
            .iter()
            .all(|s| s.shadow || s.meter.reservable(x, start))
    };
    let mut x = now;
    for _ in 0..64 {
        if x >= start {
            break;
        }
        let mut hold = Nanos::MAX;
        let mut next = start;
        for s in slots.iter().filter(|s| !s.shadow) {
            match s.meter.earliest(x, s.cost, x) {
                Earliest::At(t) if t == x => {}
                Earliest::At(t) => {
                    hold = hold.min(s.hold);
                    next = next.min(t);
                }
                _ => hold = hold.min(s.hold),
            }
        }
        let within_hold = start - x <= hold;
        if within_hold && reservable(x) {
            return x;
        }
        if !within_hold {
            next = next.min(start - hold);
        } else {
            // Reach only grows with the arrival instant: find where it covers `start`.
            let (mut lo, mut hi) = (x, next);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if reservable(mid) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            next = hi;
        }
        x = next.max(x + 1);
    }
    start
}

/// The enforcing slot that alone would make the request wait longest.
fn binding_slot<M: Meter>(now: Nanos, slots: &[Slot<M>], own: &[Earliest]) -> usize {
    let rank = |e: &Earliest| match e {
        Earliest::At(t) => t.saturating_sub(now),
        _ => Nanos::MAX,
    };
    (0..slots.len())
        .filter(|&i| !slots[i].shadow)
        .max_by_key(|&i| (rank(&own[i]), std::cmp::Reverse(i)))
        .unwrap_or(0)
}

/// Outcomes for a request that is not admitted: nothing is committed.
fn report<M: Meter>(now: Nanos, slots: &[Slot<M>], own: &[Earliest], verdict: Verdict) -> Decision {
    // (pushed one by one, in place: collecting into a SmallVec, or moving
    // one in, costs more)
    let mut decision = Decision {
        verdict,
        outcomes: SmallVec::new(),
    };
    for (s, e) in slots.iter().zip(own) {
        let (allowed, retry_after) = match e {
            Earliest::At(t) if *t == now => (true, None),
            Earliest::At(t) => (false, Some(t - now)),
            _ => (false, None),
        };
        decision
            .outcomes
            .push(Outcome::of(s, now, allowed, retry_after));
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::concurrency::{Concurrency, ConcurrencyParams};
    use crate::algo::fixed_window::{FixedWindow, FixedWindowParams, FixedWindowState};
    use crate::algo::gcra::{Gcra, GcraParams, GcraState};
    use crate::calendar::Calendar;
    use crate::units::NANOS_PER_SEC;
    const S: Nanos = NANOS_PER_SEC;

    fn slot(meter: &mut dyn Meter, hold: Nanos) -> Slot<&mut dyn Meter> {
        Slot {
            meter,
            cost: 1,
            charge: 1,
            hold,
            shadow: false,
        }
    }

    #[test]
    fn denied_by_one_limit_consumes_nothing_from_the_other() {
        let (pa, pb) = (GcraParams::new(10, S), GcraParams::new(1, 10 * S));
        let (mut a, mut b) = (GcraState::default(), GcraState::default());
        let now = 1_000 * S;
        let d = decide(
            now,
            &mut [
                slot(
                    &mut Gcra {
                        params: &pa,
                        tat: &mut a,
                    },
                    0,
                ),
                slot(
                    &mut Gcra {
                        params: &pb,
                        tat: &mut b,
                    },
                    0,
                ),
            ],
        );
        assert!(d.allowed());
        let before = a;
        let d = decide(
            now,
            &mut [
                slot(
                    &mut Gcra {
                        params: &pa,
                        tat: &mut a,
                    },
                    0,
                ),
                slot(
                    &mut Gcra {
                        params: &pb,
                        tat: &mut b,
                    },
                    0,
                ),
            ],
        );
        assert_eq!(
            d.verdict,
            Verdict::Deny {
                limit: 1,
                retry_after: Some(10 * S)
            }
        );
        assert_eq!(a, before, "the admitting limit must not be charged");
        assert!(d.outcomes[0].allowed && !d.outcomes[1].allowed);
    }

    #[test]
    fn hold_reserves_the_future_slot() {
        let p = GcraParams::new(1, S);
        let mut tat = GcraState::default();
        let now = 50 * S;
        let mut at = |t: Nanos| {
            decide(
                t,
                &mut [slot(
                    &mut Gcra {
                        params: &p,
                        tat: &mut tat,
                    },
                    2 * S,
                )],
            )
            .verdict
        };
        assert_eq!(at(now), Verdict::Admit { delay: 0 });
        assert_eq!(at(now), Verdict::Admit { delay: S });
        assert_eq!(at(now), Verdict::Admit { delay: 2 * S });
        // It would run at +3 s; arriving at +1 s it would be held 2 s: that is the retry instant.
        assert_eq!(
            at(now),
            Verdict::Deny {
                limit: 0,
                retry_after: Some(S)
            }
        );
        assert!(matches!(at(now + S - 1), Verdict::Deny { .. }));
        assert_eq!(at(now + S), Verdict::Admit { delay: 2 * S });
    }

    #[test]
    fn fixpoint_crosses_limits() {
        // Bucket frees at +1.5s, but the window is then full until the next minute.
        let pg = GcraParams::new(1, 1_500_000_000);
        let pw = FixedWindowParams {
            quota: 1,
            calendar: Calendar::utc(60 * S),
        };
        let (mut tat, mut win) = (GcraState::default(), FixedWindowState::default());
        let now = 600 * S + 59 * S;
        let mk = |tat: &mut GcraState, win: &mut FixedWindowState| {
            decide(
                now,
                &mut [
                    slot(&mut Gcra { params: &pg, tat }, 0),
                    slot(&mut FixedWindow::new(&pw, win), 0),
                ],
            )
        };
        assert!(mk(&mut tat, &mut win).allowed());
        // Now the window is spent (free at 660s) and the bucket frees at 660.5s.
        let d = mk(&mut tat, &mut win);
        assert_eq!(
            d.verdict,
            Verdict::Deny {
                limit: 0,
                retry_after: Some(1_500_000_000)
            }
        );
    }

    #[test]
    fn shadow_reports_but_never_denies() {
        let p = GcraParams::new(1, S);
        let mut tat = GcraState::default();
        let now = 10 * S;
        let shadow = |tat: &mut GcraState| {
            decide(
                now,
                &mut [Slot {
                    meter: &mut Gcra { params: &p, tat },
                    cost: 1,
                    charge: 1,
                    hold: 0,
                    shadow: true,
                }],
            )
        };
        assert!(shadow(&mut tat).outcomes[0].allowed);
        let d = shadow(&mut tat);
        assert!(d.allowed());
        assert!(!d.outcomes[0].allowed);
        assert_eq!(d.outcomes[0].retry_after, Some(S));
    }

    #[test]
    fn never_fits_is_not_a_denial() {
        let p = GcraParams::new(5, S);
        let mut tat = GcraState::default();
        let d = decide(
            0,
            &mut [Slot {
                meter: &mut Gcra {
                    params: &p,
                    tat: &mut tat,
                },
                cost: 6,
                charge: 6,
                hold: 0,
                shadow: false,
            }],
        );
        assert_eq!(
            d.verdict,
            Verdict::Never {
                limit: 0,
                cost: 6,
                capacity: 5
            }
        );
        assert_eq!(tat, GcraState::default());
    }

    proptest::proptest! {
        /// The shortcuts (one limit; several, each asked once) decide as
        /// the general path asked afresh, and leave the same states:
        /// buckets and concurrency limits (which only a release makes room
        /// in), shadows, holds, costs that never fit, and a charge that is
        /// not the cost (a latency limit's is 0).
        #[test]
        fn the_shortcuts_decide_as_the_general_path(
            limits in proptest::collection::vec(
                // (a concurrency limit, capacity, seconds per unit, shadow,
                // hold in seconds, cost, charge as a share of the cost)
                (
                    proptest::bool::weighted(0.3),
                    1u64..=4,
                    1u64..=5,
                    proptest::bool::weighted(0.2),
                    0u64..=3,
                    1u64..=5,
                    0u64..=2,
                ),
                1..=4,
            ),
            steps in proptest::collection::vec((0u64..=3, proptest::bool::ANY), 1..30),
        ) {
            let buckets: Vec<GcraParams> = (limits.iter())
                .map(|&(_, capacity, per, ..)| GcraParams::new(capacity, per * S))
                .collect();
            let most: Vec<ConcurrencyParams> = (limits.iter())
                .map(|&(_, capacity, ..)| ConcurrencyParams { max: capacity })
                .collect();
            // (each limit's bucket and count; a limit uses one of them)
            let fresh = vec![(GcraState::default(), 0u64); limits.len()];
            let (mut shortcut, mut general) = (fresh.clone(), fresh);
            let mut now = 100 * S;
            for (dt, release) in steps {
                now += dt * S / 2;
                let decide_on = |states: &mut [(GcraState, u64)], general_path: bool| {
                    let mut meters: Vec<Box<dyn Meter + '_>> = Vec::new();
                    for (i, (tat, in_flight)) in states.iter_mut().enumerate() {
                        if limits[i].0 {
                            if release {
                                *in_flight = in_flight.saturating_sub(1);
                            }
                            meters.push(Box::new(Concurrency { params: &most[i], in_flight }));
                        } else {
                            meters.push(Box::new(Gcra { params: &buckets[i], tat }));
                        }
                    }
                    let mut slots: Vec<Slot<&mut dyn Meter>> = (meters.iter_mut().zip(&limits))
                        .map(|(meter, &(_, _, _, shadow, hold, cost, share))| Slot {
                            meter: meter.as_mut(),
                            cost,
                            charge: cost * share / 2,
                            hold: hold * S,
                            shadow,
                        })
                        .collect();
                    if general_path {
                        combine(now, &mut slots, SmallVec::new())
                    } else {
                        decide(now, &mut slots)
                    }
                };
                let by_shortcut = decide_on(&mut shortcut, false);
                let by_general_path = decide_on(&mut general, true);
                proptest::prop_assert_eq!(by_shortcut, by_general_path);
                proptest::prop_assert_eq!(&shortcut, &general);
            }
        }
    }
}
