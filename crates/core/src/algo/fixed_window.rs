//! fixed_window: `quota` per clock-aligned window (see `crate::calendar`).
//! The state keeps the current window's count and, for held requests, the next one's.

use super::{Earliest, Meter, TwoWindows, Usage};
use crate::calendar::{Calendar, Window};
use crate::units::Nanos;
use std::cell::Cell;

/// A `fixed_window` limit's parameters.
#[derive(Debug, Clone)]
pub struct FixedWindowParams {
    /// Units per window.
    pub quota: u64,
    /// Where windows start and end (length and time zone).
    pub calendar: Calendar,
}

/// A key's count in the current window (and the next, for reservations).
pub type FixedWindowState = TwoWindows;

/// A fixed window bound to one key's state, as the decision reads it.
#[derive(Debug)]
pub struct FixedWindow<'a> {
    /// The limit's parameters.
    pub params: &'a FixedWindowParams,
    /// The key's counts.
    pub state: &'a mut FixedWindowState,
    /// The window last looked up: one decision asks for its instant's
    /// window several times (earliest, commit, usage), and a window holds
    /// every instant between its bounds.
    last: Cell<Option<Window>>,
}

impl<'a> FixedWindow<'a> {
    /// `state` under `params`.
    pub fn new(params: &'a FixedWindowParams, state: &'a mut FixedWindowState) -> Self {
        FixedWindow {
            params,
            state,
            last: Cell::new(None),
        }
    }

    /// The window that holds `t`.
    #[inline]
    fn window(&self, t: Nanos) -> Window {
        match self.last.get() {
            Some(w) if w.start <= t && t < w.end => w,
            _ => {
                let w = self.params.calendar.window(t);
                self.last.set(Some(w));
                w
            }
        }
    }
}

impl Meter for FixedWindow<'_> {
    fn earliest(&self, _now: Nanos, cost: u64, from: Nanos) -> Earliest {
        if cost > self.params.quota {
            return Earliest::Never {
                capacity: self.params.quota,
            };
        }
        let mut w = self.window(from);
        // At most the current and the next window hold counts; the third is empty.
        for _ in 0..3 {
            if self.state.used(w.start).saturating_add(cost) <= self.params.quota {
                return Earliest::At(from.max(w.start));
            }
            w = self.params.calendar.next(w);
        }
        Earliest::At(w.start)
    }

    fn reservable(&self, now: Nanos, at: Nanos) -> bool {
        let next = self.params.calendar.next(self.window(now));
        at < next.end
    }

    fn commit(&mut self, now: Nanos, cost: u64, at: Nanos) {
        let current = self.window(now).start;
        let target = self.window(at).start;
        self.state.add(target, current, cost);
    }

    fn debit(&mut self, now: Nanos, amount: u64) {
        let current = self.window(now).start;
        self.state.add(current, current, amount);
    }

    fn usage(&self, now: Nanos) -> Usage {
        let w = self.window(now);
        let used = self.state.used(w.start);
        Usage {
            remaining: self.params.quota.saturating_sub(used),
            reset: if used == 0 { 0 } else { w.end - now },
        }
    }

    fn at_rest(&self, now: Nanos) -> bool {
        self.state.at_rest(self.window(now).start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::NANOS_PER_SEC;
    const S: Nanos = NANOS_PER_SEC;

    #[test]
    fn boundary_resets_and_reservation_lands_in_next_window() {
        let p = FixedWindowParams {
            quota: 2,
            calendar: Calendar::utc(60 * S),
        };
        let mut st = FixedWindowState::default();
        let t0 = 600 * S + 58 * S; // two seconds before a minute boundary
        let mut m = FixedWindow::new(&p, &mut st);
        m.commit(t0, 1, t0);
        m.commit(t0, 1, t0);
        assert_eq!(m.earliest(t0, 1, t0), Earliest::At(660 * S));
        assert_eq!(
            m.usage(t0),
            Usage {
                remaining: 0,
                reset: 2 * S
            }
        );
        assert!(m.reservable(t0, 660 * S));
        assert!(!m.reservable(t0, 720 * S));
        m.commit(t0, 1, 660 * S); // held request reserved in the next window
        assert_eq!(m.usage(t0).remaining, 0);
        assert_eq!(m.usage(660 * S).remaining, 1);
        assert_eq!(m.earliest(t0, 2, t0), Earliest::At(720 * S));
        assert!(!m.at_rest(660 * S));
        assert!(m.at_rest(720 * S));
        assert_eq!(m.earliest(t0, 3, t0), Earliest::Never { capacity: 2 });
    }
}
