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
/// sub-windows `head + 1 - ring ..= head`; `total` is their sum and `oldest`
/// the oldest one holding anything (or `head`), so the usual decision costs
/// O(1), not O(segments).
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
        s.counts[(segment % self.params.ring()) as usize]
    }

    /// The oldest sub-window from `first` on that holds anything.
    fn oldest_counted(&self, first: u64) -> Option<u64> {
        let s = &self.state;
        let ring = self.params.ring();
        if s.counts.is_empty() || first > s.head {
            return None;
        }
        let first = first.max(s.oldest).max((s.head + 1).saturating_sub(ring));
        // Walk the ring without a division per step.
        let mut slot = (first % ring) as usize;
        for segment in first..=s.head {
            if s.counts[slot] > 0 {
                return Some(segment);
            }
            slot += 1;
            if slot == s.counts.len() {
                slot = 0;
            }
        }
        None
    }

    /// Units counted by a decision at `t`: sub-windows `first(t) ..= head`.
    fn counted(&self, t: Nanos) -> u64 {
        let s = &self.state;
        if s.counts.is_empty() {
            return 0;
        }
        let first = self.params.first(t);
        if first > s.head {
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
            s.oldest = segment;
        }
        if segment > s.head {
            let gap = (segment - s.head).min(ring);
            for i in 1..=gap {
                let slot = &mut s.counts[((s.head + i) % ring) as usize];
                s.total = s.total.saturating_sub(*slot);
                *slot = 0;
            }
            s.head = segment;
        }
        if s.head - segment >= ring {
            return; // older than any window that is still counted
        }
        let slot = &mut s.counts[(segment % ring) as usize];
        *slot = slot.saturating_add(amount);
        s.total = s.total.saturating_add(amount);
        // Keep `oldest` on the oldest sub-window holding anything (it only
        // moves forward, so this is O(1) amortised).
        s.oldest = s.oldest.max((s.head + 1).saturating_sub(ring));
        if amount > 0 && segment < s.oldest {
            s.oldest = segment;
        }
        while s.oldest < s.head && s.counts[(s.oldest % ring) as usize] == 0 {
            s.oldest += 1;
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
        let counted = self.counted(now);
        let reset = match counted {
            0 => 0,
            _ => self.oldest_counted(p.first(now)).map_or(0, |i| {
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
}
