//! sliding_window: at most `quota` in any window of length `every`.
//!
//! Precision: the window is split into `segments` sub-windows of length
//! g = ceil(every / segments). A decision at t counts every sub-window that
//! overlaps (t - every, t], the oldest one whole, plus any reservation already
//! made in the next sub-window. So it never admits more than `quota` in any
//! window of length `every` (zero over-admission), and it denies only if the
//! exact log holds more than `quota - cost` events in (t - every - g, t] or
//! reserved ahead: the worst-case under-admission is the events of one
//! sub-window. `retry_after` is exact for this model.

use super::{Earliest, Meter, Usage};
use crate::units::Nanos;

/// A `sliding_window` limit's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindowParams {
    /// Units per window.
    pub quota: u64,
    /// The window's length.
    pub every: Nanos,
    /// Length of one sub-window.
    pub segment: Nanos,
    /// Sub-windows per window.
    pub segments: u32,
}

impl SlidingWindowParams {
    /// `quota` per `every`, counted in `segments` sub-windows.
    pub fn new(quota: u64, every: Nanos, segments: u32) -> Self {
        let segments = segments.max(1);
        let every = every.max(1);
        SlidingWindowParams {
            quota,
            every,
            segment: every.div_ceil(u64::from(segments)).max(1),
            segments,
        }
    }
    /// Sub-windows kept: all that can overlap a window, and one reserved ahead.
    fn ring(&self) -> u64 {
        u64::from(self.segments) + 2
    }
    /// The oldest sub-window a decision at `t` counts.
    fn first(&self, t: Nanos) -> u64 {
        (t + 1).saturating_sub(self.every) / self.segment
    }
}

/// `head` is the newest sub-window written; `counts` is a ring over
/// sub-windows `head + 1 - ring ..= head`, the head's at `head_slot` and each
/// older one a place behind; `total` is their sum and `oldest` the oldest one
/// holding anything (or `head`), so the usual decision costs O(1), not
/// O(segments), and no division by the ring's length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingWindowState {
    /// The newest sub-window written.
    pub head: u64,
    /// A ring of sub-window counts.
    pub counts: Box<[u64]>,
    /// Their sum.
    pub total: u64,
    /// The oldest sub-window holding anything.
    pub oldest: u64,
    /// Where in `counts` the head's count is (below `counts.len()`, at
    /// most 1000 segments; a state built by hand with a ring starts at 0).
    pub head_slot: u32,
}

impl SlidingWindowState {
    /// Where in `counts` sub-window `segment` is kept: it must be one of
    /// the ring's (`head - segment < counts.len()`).
    #[inline]
    fn slot(&self, segment: u64) -> usize {
        let back = (self.head - segment) as usize;
        let head = self.head_slot as usize;
        if back <= head {
            head - back
        } else {
            head + self.counts.len() - back
        }
    }

    /// The slot after `slot`, around the ring.
    #[inline]
    fn next(&self, slot: usize) -> usize {
        if slot + 1 == self.counts.len() {
            0
        } else {
            slot + 1
        }
    }
}

/// A sliding window bound to one key's state, as the decision reads it.
#[derive(Debug)]
pub struct SlidingWindow<'a> {
    /// The limit's parameters.
    pub params: &'a SlidingWindowParams,
    /// The key's sub-window counts.
    pub state: &'a mut SlidingWindowState,
}

impl SlidingWindow<'_> {
    fn count_in(&self, segment: u64) -> u64 {
        let s = &self.state;
        if s.counts.is_empty() || segment > s.head || s.head - segment >= self.params.ring() {
            return 0;
        }
        s.counts[s.slot(segment)]
    }

    /// The oldest sub-window from `first` on that holds anything.
    fn oldest_counted(&self, first: u64) -> Option<u64> {
        let s = &self.state;
        let ring = self.params.ring();
        if s.counts.is_empty() || first > s.head {
            return None;
        }
        let first = first.max(s.oldest).max((s.head + 1).saturating_sub(ring));
        let mut slot = s.slot(first);
        for segment in first..=s.head {
            if s.counts[slot] > 0 {
                return Some(segment);
            }
            slot = s.next(slot);
        }
        None
    }

    /// Units counted by a decision at `t`: sub-windows `first(t) ..= head`.
    fn counted(&self, t: Nanos) -> u64 {
        self.counted_from(self.params.first(t))
    }

    /// Units in sub-windows `first ..= head`.
    fn counted_from(&self, first: u64) -> u64 {
        let s = &self.state;
        if s.counts.is_empty() || first > s.head {
            return 0;
        }
        let oldest = (s.head + 1).saturating_sub(self.params.ring());
        s.total
            .saturating_sub((oldest..first).map(|i| self.count_in(i)).sum::<u64>())
    }

    fn add(&mut self, segment: u64, amount: u64) {
        let ring = self.params.ring();
        let s = &mut *self.state;
        if s.counts.is_empty() {
            s.counts = vec![0; ring as usize].into_boxed_slice();
            s.head = segment;
            s.head_slot = 0;
            s.oldest = segment;
        }
        if segment > s.head {
            // The sub-windows from the head's on to `segment` start empty.
            if segment - s.head >= ring {
                // Every sub-window is empty: any slot can hold the head, so
                // the head's stays where it is.
                s.counts.fill(0);
                s.total = 0;
            } else {
                let mut slot = s.head_slot as usize;
                for _ in s.head..segment {
                    slot = s.next(slot);
                    s.total = s.total.saturating_sub(s.counts[slot]);
                    s.counts[slot] = 0;
                }
                s.head_slot = slot as u32;
            }
            s.head = segment;
        }
        if s.head - segment >= ring {
            return; // older than any window that is still counted
        }
        let slot = s.slot(segment);
        s.counts[slot] = s.counts[slot].saturating_add(amount);
        s.total = s.total.saturating_add(amount);
        // Keep `oldest` on the oldest sub-window holding anything (it only
        // moves forward, so this is O(1) amortised).
        s.oldest = s.oldest.max((s.head + 1).saturating_sub(ring));
        if amount > 0 && segment < s.oldest {
            s.oldest = segment;
        }
        if s.oldest < s.head {
            let mut slot = s.slot(s.oldest);
            while s.oldest < s.head && s.counts[slot] == 0 {
                s.oldest += 1;
                slot = s.next(slot);
            }
        }
    }
}

impl Meter for SlidingWindow<'_> {
    fn earliest(&self, _now: Nanos, cost: u64, from: Nanos) -> Earliest {
        let p = self.params;
        if cost > p.quota {
            return Earliest::Never { capacity: p.quota };
        }
        // The count only falls when the oldest counted sub-window leaves the
        // window: at t with first(t) one higher, i.e. t = k * g + every - 1.
        let mut t = from;
        let mut counted = self.counted(t);
        for _ in 0..=p.ring() + 1 {
            if counted.saturating_add(cost) <= p.quota {
                return Earliest::At(t);
            }
            let first = p.first(t);
            counted = counted.saturating_sub(self.count_in(first));
            t = (first + 1) * p.segment + p.every - 1;
        }
        Earliest::At(t)
    }

    fn reservable(&self, now: Nanos, at: Nanos) -> bool {
        at / self.params.segment <= now / self.params.segment + 1
    }

    fn commit(&mut self, _now: Nanos, cost: u64, at: Nanos) {
        self.add(at / self.params.segment, cost);
    }

    fn debit(&mut self, now: Nanos, amount: u64) {
        self.add(now / self.params.segment, amount);
    }

    fn usage(&self, now: Nanos) -> Usage {
        let p = self.params;
        let first = p.first(now);
        let counted = self.counted_from(first);
        let reset = match counted {
            0 => 0,
            _ => self.oldest_counted(first).map_or(0, |i| {
                ((i + 1) * p.segment + p.every - 1).saturating_sub(now)
            }),
        };
        Usage {
            remaining: p.quota.saturating_sub(counted),
            reset,
        }
    }
    fn at_rest(&self, now: Nanos) -> bool {
        self.state.counts.is_empty() || self.params.first(now) > self.state.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_roll_off_one_segment_at_a_time() {
        // quota 3 in any 10 ns, sub-windows of 1 ns: exact.
        let p = SlidingWindowParams::new(3, 10, 10);
        let mut st = SlidingWindowState::default();
        let mut m = SlidingWindow {
            params: &p,
            state: &mut st,
        };
        m.commit(100, 1, 100);
        m.commit(103, 2, 103);
        // (100, 110] no longer holds the event at 100.
        assert_eq!(m.earliest(105, 1, 105), Earliest::At(110));
        assert_eq!(m.earliest(105, 3, 105), Earliest::At(113));
        assert_eq!(
            m.usage(105),
            Usage {
                remaining: 0,
                reset: 5
            }
        );
        assert!(!m.at_rest(112));
        assert!(m.at_rest(113));
        assert_eq!(m.earliest(105, 4, 105), Earliest::Never { capacity: 3 });
    }

    #[test]
    fn reservation_in_next_segment_counts_from_now() {
        let p = SlidingWindowParams::new(2, 100, 10);
        let mut st = SlidingWindowState::default();
        let mut m = SlidingWindow {
            params: &p,
            state: &mut st,
        };
        m.commit(5, 2, 5);
        // Sub-window 0 leaves the count once (t - 100, t] starts past 10.
        assert_eq!(m.earliest(50, 1, 50), Earliest::At(109));
        assert!(!m.reservable(50, 109));
        assert!(m.reservable(105, 110));
        m.commit(105, 1, 110);
        // A reservation ahead counts for decisions made now, too.
        assert_eq!(m.usage(105).remaining, 0);
        assert_eq!(m.usage(110).remaining, 1);
    }

    #[test]
    fn uneven_segments_count_only_what_overlaps_the_window() {
        // every 14 in 3 sub-windows of 5: at 15 the window (1, 15] skips [0, 1].
        let p = SlidingWindowParams::new(1, 14, 3);
        let mut st = SlidingWindowState::default();
        let mut m = SlidingWindow {
            params: &p,
            state: &mut st,
        };
        m.commit(0, 1, 0);
        assert_eq!(m.earliest(0, 1, 0), Earliest::At(18));
    }

    /// The sub-windows as a plain map, for the ring to be held to.
    #[derive(Default)]
    struct Model {
        counts: std::collections::BTreeMap<u64, u64>,
        head: Option<u64>,
    }

    impl Model {
        fn add(&mut self, p: &SlidingWindowParams, segment: u64, amount: u64) {
            let head = self.head.map_or(segment, |head| head.max(segment));
            self.head = Some(head);
            self.counts.retain(|&s, _| s + p.ring() > head);
            if segment + p.ring() > head {
                *self.counts.entry(segment).or_default() += amount;
            }
        }
        /// Units a decision at `t` counts.
        fn counted(&self, p: &SlidingWindowParams, t: Nanos) -> u64 {
            self.counts.range(p.first(t)..).map(|(_, c)| c).sum()
        }
        /// The first instant from `from` on that admits `cost`, found by
        /// trying every nanosecond.
        fn earliest(&self, p: &SlidingWindowParams, cost: u64, from: Nanos) -> Earliest {
            if cost > p.quota {
                return Earliest::Never { capacity: p.quota };
            }
            let within = from + p.every + 3 * p.segment;
            let t = (from..=within).find(|&t| self.counted(p, t) + cost <= p.quota);
            Earliest::At(t.expect("a window empties within every + a sub-window"))
        }
        /// What is left at `now`, and how long until some of what is
        /// counted rolls off, found by trying every nanosecond.
        fn usage(&self, p: &SlidingWindowParams, now: Nanos) -> Usage {
            let counted = self.counted(p, now);
            let reset = match counted {
                0 => 0,
                _ => {
                    let within = now + p.every + 3 * p.segment;
                    let t = (now + 1..=within).find(|&t| self.counted(p, t) < counted);
                    t.expect("a sub-window rolls off within every + a sub-window") - now
                }
            };
            Usage {
                remaining: p.quota.saturating_sub(counted),
                reset,
            }
        }
        fn at_rest(&self, p: &SlidingWindowParams, now: Nanos) -> bool {
            self.head.is_none_or(|head| p.first(now) > head)
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Commit `cost` now.
        Now(u64),
        /// Commit `cost` at the start of the next sub-window, if reservable.
        Ahead(u64),
        /// Debit `amount` now (a latency limit's completion).
        Debit(u64),
    }

    fn any_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..=4).prop_map(Step::Now),
            (1u64..=3).prop_map(Step::Ahead),
            (0u64..=3).prop_map(Step::Debit),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// The ring, its head's place and its running sums say what the
        /// plain map says, at every step, however far time jumps.
        #[test]
        fn the_ring_reads_as_a_plain_map_of_sub_windows(
            quota in 1u64..=6,
            every in 2u64..=60,
            segments in 1u32..=12,
            steps in proptest::collection::vec((0u64..=90, any_step()), 1..60),
        ) {
            let p = SlidingWindowParams::new(quota, every.max(u64::from(segments)), segments);
            let mut st = SlidingWindowState::default();
            let mut model = Model::default();
            let mut now = 0;
            for (dt, step) in steps {
                now += dt;
                let mut m = SlidingWindow { params: &p, state: &mut st };
                match step {
                    Step::Now(cost) => {
                        m.commit(now, cost, now);
                        model.add(&p, now / p.segment, cost);
                    }
                    Step::Ahead(cost) => {
                        let at = (now / p.segment + 1) * p.segment;
                        if m.reservable(now, at) {
                            m.commit(now, cost, at);
                            model.add(&p, at / p.segment, cost);
                        }
                    }
                    Step::Debit(amount) => {
                        m.debit(now, amount);
                        model.add(&p, now / p.segment, amount);
                    }
                }
                for cost in 1..=quota + 1 {
                    prop_assert_eq!(m.earliest(now, cost, now), model.earliest(&p, cost, now), "cost {} at {}", cost, now);
                }
                prop_assert_eq!(m.usage(now), model.usage(&p, now), "usage at {}", now);
                prop_assert_eq!(m.at_rest(now), model.at_rest(&p, now), "at rest at {}", now);
                let later = now + p.every / 2;
                prop_assert_eq!(m.usage(later), model.usage(&p, later), "usage at {}", later);
            }
        }
    }
}
