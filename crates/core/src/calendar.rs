//! Clock-aligned windows: `every` long, starting on boundaries of the wall
//! clock in a time zone. A day starts at local midnight, so a DST day is 23 or
//! 25 hours long; an hour starts when the local clock shows :00.

use crate::units::{Nanos, NANOS_PER_SEC};
use jiff::tz::TimeZone;
use jiff::{civil, Timestamp, ToSpan};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

const DAY: Nanos = 86_400 * NANOS_PER_SEC;

/// A half-open window `[start, end)` in nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Nanos,
    pub end: Nanos,
}

#[derive(Debug, Clone)]
pub struct Calendar {
    every: Nanos,
    zone: Zone,
    /// The last window computed for a named zone: asking jiff is ~100x slower
    /// than reading this, and nearly every decision falls in the same window.
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
        if before % 2 == 1 {
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
        if seq % 2 == 1
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
        if every < DAY && DAY % every != 0 {
            return Err(format!(
                "window of {}s does not divide a day; windows align to clock boundaries",
                every / NANOS_PER_SEC
            ));
        }
        if every > DAY && every % DAY != 0 {
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

    pub fn utc(every: Nanos) -> Calendar {
        Calendar {
            every,
            zone: Zone::Fixed { offset: 0 },
            cache: Arc::default(),
        }
    }

    pub fn every(&self) -> Nanos {
        self.every
    }

    /// The window that contains `t`.
    pub fn window(&self, t: Nanos) -> Window {
        match &self.zone {
            Zone::Fixed { offset } => {
                let local = (t as i128 + *offset as i128).rem_euclid(self.every as i128) as u64;
                let start = t - local.min(t);
                Window {
                    start,
                    end: start + self.every,
                }
            }
            // Two entries: the current window and the next (asked for by holds).
            Zone::Named(tz) => self.cache.iter().find_map(|c| c.get(t)).unwrap_or_else(|| {
                let w = self.named_window(tz, t);
                self.cache[((w.start / self.every) % 2) as usize].put(w);
                w
            }),
        }
    }

    /// The window right after `w`.
    pub fn next(&self, w: Window) -> Window {
        self.window(w.end)
    }

    fn named_window(&self, tz: &TimeZone, t: Nanos) -> Window {
        let ts = to_ts(t);
        let zdt = ts.to_zoned(tz.clone());
        if self.every >= DAY {
            let days = (self.every / DAY) as i64;
            let date = zdt.date();
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
        // Sub-day: step back by the wall-clock remainder, so the start shows a
        // multiple of `every` on the local clock (both occurrences of a repeated hour count).
        let start = t - wall_remainder(&zdt, self.every).min(t);
        let candidate = start + self.every;
        let mut end =
            candidate - wall_remainder(&to_ts(candidate).to_zoned(tz.clone()), self.every);
        if end <= start {
            // The clock fell back inside this window: the boundary is the next wall multiple.
            end = candidate - wall_remainder(&to_ts(candidate).to_zoned(tz.clone()), self.every)
                + self.every;
        }
        Window { start, end }
    }
}

fn to_ts(t: Nanos) -> Timestamp {
    Timestamp::from_nanosecond(t as i128).unwrap_or(Timestamp::MAX)
}

fn wall_remainder(zdt: &jiff::Zoned, every: Nanos) -> Nanos {
    let time = zdt.time();
    let wall = (time.hour() as u64 * 3_600 + time.minute() as u64 * 60 + time.second() as u64)
        * NANOS_PER_SEC
        + time.subsec_nanosecond() as u64;
    wall % every
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
