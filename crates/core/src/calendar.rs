//! Clock-aligned windows: `every` long, starting on boundaries of the wall
//! clock in a time zone. A day starts at local midnight, so a DST day is 23 or
//! 25 hours long; an hour starts when the local clock shows :00.

use crate::units::{Nanos, NANOS_PER_SEC};
use jiff::tz::TimeZone;
use jiff::{civil, Timestamp, ToSpan};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use crate::units::DAY;

/// A half-open window `[start, end)` in nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Its first instant.
    pub start: Nanos,
    /// The first instant after it.
    pub end: Nanos,
}

/// Where a fixed window's boundaries fall: every so long, aligned to a time
/// zone's wall clock (DST-correct).
#[derive(Debug, Clone)]
pub struct Calendar {
    every: Nanos,
    zone: Zone,
    /// The last windows computed: asking jiff is ~100x slower than reading
    /// this (a division for fixed zones, ~5x), and nearly every decision falls
    /// in the same window.
    cache: Arc<[LastWindow; 2]>,
}

/// A seqlock over one `Window`, so readers on many threads never block and
/// never see a torn pair: a writer makes `seq` odd while it writes.
#[derive(Debug, Default)]
struct LastWindow {
    seq: AtomicU64,
    start: AtomicU64,
    end: AtomicU64,
}

impl LastWindow {
    fn get(&self, t: Nanos) -> Option<Window> {
        let before = self.seq.load(Ordering::Acquire);
        if !before.is_multiple_of(2) {
            return None;
        }
        let w = Window {
            start: self.start.load(Ordering::Relaxed),
            end: self.end.load(Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        let stable = self.seq.load(Ordering::Relaxed) == before;
        (stable && w.start <= t && t < w.end).then_some(w)
    }

    fn put(&self, w: Window) {
        let seq = self.seq.load(Ordering::Relaxed);
        if !seq.is_multiple_of(2)
            || self
                .seq
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return; // another thread is writing; caching is optional
        }
        fence(Ordering::Release);
        self.start.store(w.start, Ordering::Relaxed);
        self.end.store(w.end, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }
}

#[derive(Debug, Clone)]
enum Zone {
    /// UTC or a zone that never changes offset: pure arithmetic.
    Fixed { offset: i64 },
    /// A zone with transitions: ask jiff.
    Named(TimeZone),
}

impl Calendar {
    /// `every` must be a whole number of days, or divide a day evenly when shorter.
    pub fn new(every: Nanos, tz_name: &str) -> Result<Calendar, String> {
        if every == 0 {
            return Err("window length must be positive".into());
        }
        if every < DAY && !DAY.is_multiple_of(every) {
            return Err(format!(
                "window of {}s does not divide a day; windows align to clock boundaries",
                every / NANOS_PER_SEC
            ));
        }
        if every > DAY && !every.is_multiple_of(DAY) {
            return Err("windows longer than a day must be whole days".into());
        }
        let tz = TimeZone::get(tz_name).map_err(|_| {
            format!("'{tz_name}' is not an IANA time zone (e.g. UTC, Europe/Amsterdam)")
        })?;
        let zone = match tz.to_fixed_offset() {
            Ok(offset) => Zone::Fixed {
                offset: i64::from(offset.seconds()) * NANOS_PER_SEC as i64,
            },
            Err(_) => Zone::Named(tz),
        };
        Ok(Calendar {
            every,
            zone,
            cache: Arc::default(),
        })
    }

    /// Windows of `every`, aligned to UTC.
    pub fn utc(every: Nanos) -> Calendar {
        Calendar {
            every,
            zone: Zone::Fixed { offset: 0 },
            cache: Arc::default(),
        }
    }

    /// The windows' length.
    pub fn every(&self) -> Nanos {
        self.every
    }

    /// What draws its boundaries, as text ("3600s@+0", "86400s@Europe/Amsterdam"):
    /// two calendars with the same identity draw the same windows, so a count
    /// kept under one means the same under the other.
    pub fn identity(&self) -> String {
        let every = self.every / NANOS_PER_SEC;
        match &self.zone {
            Zone::Fixed { offset } => format!("{every}s@{:+}", offset / NANOS_PER_SEC as i64),
            Zone::Named(tz) => format!("{every}s@{}", tz.iana_name().unwrap_or("?")),
        }
    }

    /// The zone's offset from UTC in ns if it never changes (UTC, fixed
    /// offsets), so windows are pure arithmetic; `None` for zones with DST.
    pub fn fixed_offset(&self) -> Option<i64> {
        match self.zone {
            Zone::Fixed { offset } => Some(offset),
            Zone::Named(_) => None,
        }
    }

    /// The window that contains `t`.
    pub fn window(&self, t: Nanos) -> Window {
        // Two cached entries (the current window and the next, asked for by
        // holds): reading them is cheaper than a division, let alone jiff.
        if let Some(w) = self.cache.iter().find_map(|c| c.get(t)) {
            return w;
        }
        let w = match &self.zone {
            Zone::Fixed { offset } => {
                // i128: instants past 2262 do not fit i64 (this runs only on a cache miss).
                let local = (t as i128 + *offset as i128).rem_euclid(self.every as i128) as u64;
                let start = t - local.min(t);
                Window {
                    start,
                    end: start + self.every,
                }
            }
            Zone::Named(tz) => self.named_window(tz, t),
        };
        self.cache[((w.start / self.every) % 2) as usize].put(w);
        w
    }

    /// The window right after `w`.
    pub fn next(&self, w: Window) -> Window {
        self.window(w.end)
    }

    fn named_window(&self, tz: &TimeZone, t: Nanos) -> Window {
        if self.every >= DAY {
            let days = (self.every / DAY) as i64;
            let date = to_ts(t).to_zoned(tz.clone()).date();
            let since_epoch = date
                .since(civil::date(1970, 1, 1))
                .map(|s| s.get_days() as i64)
                .unwrap_or(0);
            let start_date = date
                .checked_sub((since_epoch.rem_euclid(days)).days())
                .unwrap_or(date);
            let end_date = start_date.checked_add(days.days()).unwrap_or(start_date);
            return Window {
                start: day_start(tz, start_date),
                end: day_start(tz, end_date),
            };
        }
        Window {
            start: self.last_boundary(tz, t, 4),
            end: self.next_boundary(tz, t, 4),
        }
    }

    // Sub-day windows in a zone with transitions. A boundary is an instant at
    // which the local clock reaches a multiple of `every` (counted from local
    // midnight), jumps past one (spring forward), or shows one again (fall
    // back: each occurrence of a repeated hour is its own window). Between
    // transitions the wall clock runs linearly, so boundaries are arithmetic;
    // a transition is checked on its own. `depth` bounds the recursion
    // (transitions are months apart; two suffice).

    /// The last boundary at or before `t`.
    fn last_boundary(&self, tz: &TimeZone, t: Nanos, depth: u8) -> Nanos {
        let linear = t.saturating_sub(wall_of_day(tz, t) % self.every);
        match tz
            .preceding(to_ts(t + 1))
            .next()
            .map(|tr| nanos(tr.timestamp()))
        {
            Some(p) if p > linear && p <= t && depth > 0 => {
                if self.is_boundary(tz, p) {
                    p
                } else {
                    self.last_boundary(tz, p - 1, depth - 1)
                }
            }
            _ => linear,
        }
    }

    /// The first boundary after `t`.
    fn next_boundary(&self, tz: &TimeZone, t: Nanos, depth: u8) -> Nanos {
        let linear = t.saturating_add(self.every - wall_of_day(tz, t) % self.every);
        match tz
            .following(to_ts(t))
            .next()
            .map(|tr| nanos(tr.timestamp()))
        {
            Some(n) if n > t && n <= linear && depth > 0 => {
                if self.is_boundary(tz, n) {
                    n
                } else {
                    self.next_boundary(tz, n, depth - 1)
                }
            }
            _ => linear,
        }
    }

    /// Whether the transition at `p` is a boundary.
    fn is_boundary(&self, tz: &TimeZone, p: Nanos) -> bool {
        let before = to_ts(p - 1).to_zoned(tz.clone()).datetime();
        let after = to_ts(p).to_zoned(tz.clone()).datetime();
        if after < before {
            // Fell back: a boundary if the clock now shows a multiple.
            wall(after).is_multiple_of(self.every)
        } else {
            // Sprang forward: a boundary if the jump crossed into another window.
            after.date() != before.date() || wall(after) / self.every != wall(before) / self.every
        }
    }
}

fn nanos(ts: Timestamp) -> Nanos {
    ts.as_nanosecond().max(0) as Nanos
}

/// Nanoseconds since local midnight on the local clock at `t`.
fn wall_of_day(tz: &TimeZone, t: Nanos) -> Nanos {
    wall(to_ts(t).to_zoned(tz.clone()).datetime())
}

fn wall(dt: civil::DateTime) -> Nanos {
    let tm = dt.time();
    (tm.hour() as u64 * 3_600 + tm.minute() as u64 * 60 + tm.second() as u64) * NANOS_PER_SEC
        + tm.subsec_nanosecond() as u64
}

fn to_ts(t: Nanos) -> Timestamp {
    Timestamp::from_nanosecond(t as i128).unwrap_or(Timestamp::MAX)
}

fn day_start(tz: &TimeZone, date: civil::Date) -> Nanos {
    date.to_zoned(tz.clone())
        .and_then(|z| z.start_of_day())
        .map(|z| z.timestamp().as_nanosecond().max(0) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Nanos {
        s.parse::<Timestamp>().unwrap().as_nanosecond() as u64
    }

    #[test]
    fn windows_after_2262_still_align() {
        // Past 2^63 ns an i64 wraps; a day must still start at UTC midnight.
        let c = Calendar::new(DAY, "UTC").unwrap();
        let w = c.window(at("2300-01-01T23:00:00Z"));
        assert_eq!(
            (w.start, w.end),
            (at("2300-01-01T00:00:00Z"), at("2300-01-02T00:00:00Z"))
        );
        let fixed = Calendar::new(DAY, "Etc/GMT-3").unwrap(); // UTC+3, a fixed offset
        assert_eq!(
            fixed.window(at("2300-01-01T12:00:00Z")).start,
            at("2299-12-31T21:00:00Z")
        );
    }

    #[test]
    fn utc_minute_and_day() {
        let c = Calendar::utc(60 * NANOS_PER_SEC);
        let w = c.window(at("2026-03-01T10:15:42Z"));
        assert_eq!(w.start, at("2026-03-01T10:15:00Z"));
        assert_eq!(w.end, at("2026-03-01T10:16:00Z"));
        let d = Calendar::new(DAY, "UTC")
            .unwrap()
            .window(at("2026-03-01T23:59:59Z"));
        assert_eq!(
            (d.start, d.end),
            (at("2026-03-01T00:00:00Z"), at("2026-03-02T00:00:00Z"))
        );
    }

    #[test]
    fn amsterdam_day_is_23h_on_spring_forward() {
        let c = Calendar::new(DAY, "Europe/Amsterdam").unwrap();
        // 2026-03-29: clocks go 02:00 -> 03:00 local.
        let w = c.window(at("2026-03-29T12:00:00Z"));
        assert_eq!(w.start, at("2026-03-28T23:00:00Z"));
        assert_eq!(w.end, at("2026-03-29T22:00:00Z"));
        assert_eq!(w.end - w.start, 23 * 3_600 * NANOS_PER_SEC);
    }

    #[test]
    fn amsterdam_day_is_25h_on_fall_back() {
        let c = Calendar::new(DAY, "Europe/Amsterdam").unwrap();
        // 2026-10-25: clocks go 03:00 -> 02:00 local.
        let w = c.window(at("2026-10-25T12:00:00Z"));
        assert_eq!(w.start, at("2026-10-24T22:00:00Z"));
        assert_eq!(w.end, at("2026-10-25T23:00:00Z"));
        assert_eq!(w.end - w.start, 25 * 3_600 * NANOS_PER_SEC);
    }

    #[test]
    fn hours_follow_the_local_clock() {
        let c = Calendar::new(3_600 * NANOS_PER_SEC, "Asia/Kolkata").unwrap();
        let w = c.window(at("2026-01-01T10:45:00Z")); // 16:15 local
        assert_eq!(w.start, at("2026-01-01T10:30:00Z"));
        let c = Calendar::new(3_600 * NANOS_PER_SEC, "Europe/Amsterdam").unwrap();
        // Fall back: 02:00-03:00 local happens twice; each is its own hour.
        let first = c.window(at("2026-10-25T00:30:00Z"));
        let second = c.window(at("2026-10-25T01:30:00Z"));
        assert_eq!(first.end, second.start);
        assert_eq!(second.end - second.start, 3_600 * NANOS_PER_SEC);
    }

    #[test]
    fn four_hour_windows_across_spring_forward() {
        let c = Calendar::new(4 * 3_600 * NANOS_PER_SEC, "Europe/Amsterdam").unwrap();
        let w = c.window(at("2026-03-29T00:30:00Z")); // 01:30 local (CET)
        assert_eq!(w.start, at("2026-03-28T23:00:00Z")); // local midnight
        assert_eq!(w.end, at("2026-03-29T02:00:00Z")); // 04:00 CEST, three real hours later
    }

    #[test]
    fn rejects_bad_windows_and_zones() {
        assert!(Calendar::new(7 * NANOS_PER_SEC, "UTC").is_err());
        assert!(Calendar::new(DAY, "Mars/Olympus").is_err());
        assert!(Calendar::new(36 * 3_600 * NANOS_PER_SEC, "UTC").is_err());
    }
}
