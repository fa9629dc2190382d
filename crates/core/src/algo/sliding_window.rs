//! sliding_window: at most `quota` in any window of length `every`.
//!
//! Precision: the window is split into `segments` sub-windows of length
//! g = ceil(every / segments). A decision at t counts every sub-window that
//! overlaps (t - every, t], including the oldest one whole. So it never admits
//! more than `quota` in any window of length `every` (zero over-admission), and
//! it denies only if the exact log holds more than `quota - cost` events in the
//! slightly longer window (t - every - g, t]: the worst-case under-admission is
//! the events of one sub-window. `retry_after` is exact for this model.

use super::{Earliest, Meter, Usage};
use crate::units::Nanos;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindowParams {
    pub quota: u64,
    /// Length of one sub-window.
    pub segment: Nanos,
    /// Sub-windows per window; the window counts `segments + 1` of them.
    pub segments: u32,
}

impl SlidingWindowParams {
    pub fn new(quota: u64, every: Nanos, segments: u32) -> Self {
        let segments = segments.max(1);
        SlidingWindowParams {
            quota,
            segment: every.div_ceil(u64::from(segments)).max(1),
            segments,
        }
    }
    fn ring(&self) -> u64 {
        u64::from(self.segments) + 2
    }
}

/// `head` is the newest sub-window index written; `counts` is a ring over
/// sub-windows `head - segments - 1 ..= head`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingWindowState {
    pub head: u64,
    pub counts: Box<[u64]>,
}

#[derive(Debug)]
pub struct SlidingWindow<'a> {
    pub params: &'a SlidingWindowParams,
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

    /// Events counted by a decision made during sub-window `b`.
    fn counted(&self, b: u64) -> u64 {
        let first = b.saturating_sub(u64::from(self.params.segments));
        (first..=b).map(|i| self.count_in(i)).sum()
    }

    fn add(&mut self, segment: u64, amount: u64) {
        let ring = self.params.ring();
        let s = &mut *self.state;
        if s.counts.is_empty() {
            s.counts = vec![0; ring as usize].into_boxed_slice();
            s.head = segment;
        }
        if segment > s.head {
            let gap = (segment - s.head).min(ring);
            for i in 1..=gap {
                s.counts[((s.head + i) % ring) as usize] = 0;
            }
            s.head = segment;
        }
        let slot = &mut s.counts[(segment % ring) as usize];
        *slot = slot.saturating_add(amount);
    }
}

impl Meter for SlidingWindow<'_> {
    fn earliest(&self, _now: Nanos, cost: u64, from: Nanos) -> Earliest {
        let p = self.params;
        if cost > p.quota {
            return Earliest::Never { capacity: p.quota };
        }
        let mut b = from / p.segment;
        let mut counted = self.counted(b);
        if counted + cost <= p.quota {
            return Earliest::At(from);
        }
        // Step to each later sub-window: the oldest one leaves, a (reserved) new one enters.
        for _ in 0..=p.ring() {
            let leaving = b
                .checked_sub(u64::from(p.segments))
                .map_or(0, |old| self.count_in(old));
            counted = counted - leaving + self.count_in(b + 1);
            b += 1;
            if counted + cost <= p.quota {
                return Earliest::At(b * p.segment);
            }
        }
        Earliest::At((b + 1) * p.segment)
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
        let b = now / p.segment;
        let counted = self.counted(b);
        let first = b.saturating_sub(u64::from(p.segments));
        let reset = (first..=b)
            .find(|&i| self.count_in(i) > 0)
            .map_or(0, |i| (i + u64::from(p.segments) + 1) * p.segment - now);
        Usage {
            remaining: p.quota.saturating_sub(counted),
            reset,
        }
    }

    fn at_rest(&self, now: Nanos) -> bool {
        let b = now / self.params.segment;
        self.state.counts.is_empty()
            || b.saturating_sub(u64::from(self.params.segments)) > self.state.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_roll_off_one_segment_at_a_time() {
        // quota 3 in any 10 ns, segments of 1 ns.
        let p = SlidingWindowParams::new(3, 10, 10);
        let mut st = SlidingWindowState::default();
        let mut m = SlidingWindow {
            params: &p,
            state: &mut st,
        };
        m.commit(100, 1, 100);
        m.commit(103, 2, 103);
        assert_eq!(m.earliest(105, 1, 105), Earliest::At(111));
        assert_eq!(m.earliest(105, 3, 105), Earliest::At(114));
        assert_eq!(
            m.usage(105),
            Usage {
                remaining: 0,
                reset: 6
            }
        );
        assert!(!m.at_rest(113));
        assert!(m.at_rest(114));
        assert_eq!(m.earliest(105, 4, 105), Earliest::Never { capacity: 3 });
    }

    #[test]
    fn reservation_in_next_segment_counts_only_from_there() {
        let p = SlidingWindowParams::new(2, 100, 10);
        let mut st = SlidingWindowState::default();
        let mut m = SlidingWindow {
            params: &p,
            state: &mut st,
        };
        m.commit(5, 2, 5);
        assert_eq!(m.earliest(50, 1, 50), Earliest::At(110));
        assert!(!m.reservable(50, 110));
        assert!(m.reservable(105, 110));
        m.commit(105, 1, 110);
        assert_eq!(m.usage(105).remaining, 0);
        assert_eq!(m.usage(110).remaining, 1);
    }
}
