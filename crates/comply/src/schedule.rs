//! Schedules: `[[workflow]] name, start, end, timezone, days`. Queued work
//! of a scheduled workflow is released only inside its window, on the
//! local wall clock of its time zone (so a 06:00 start stays 06:00 across
//! a DST change), as the GTM rate-limiting guide staggers enrichment at
//! 6:00, CRM sync at 8:00 and sequence enrolment at 10:00.

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use tollgate_core::Nanos;

/// When one workflow's queued work may go.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub workflow: String,
    /// Minutes after local midnight: the window opens at `start` and closes
    /// at `end` (on the next day when `end` is not after `start`).
    pub start: u16,
    pub end: u16,
    pub timezone: TimeZone,
    /// The days a window opens on (Monday first); all seven by default.
    pub days: [bool; 7],
}

impl Schedule {
    /// Whether the window is open at `now` (ns since the epoch); if not,
    /// when it next opens.
    pub fn opens(&self, now: Nanos) -> Result<(), Nanos> {
        let Some(today) = self.local_date(now) else {
            return Ok(());
        };
        if self.window_end(now).is_some() {
            return Ok(());
        }
        // The next opening, within the next eight days.
        (0i64..=8)
            .filter_map(|ahead| today.checked_add(jiff::Span::new().days(ahead)).ok())
            .filter_map(|date| self.opening(date))
            .find(|&open| open > now)
            .map_or(Ok(()), Err)
    }

    /// When the window open at `at` closes (None: no window is open then).
    pub fn window_end(&self, at: Nanos) -> Option<Nanos> {
        let today = self.local_date(at)?;
        // The window that opened today, or yesterday (one that runs past
        // midnight).
        [0i64, 1].into_iter().find_map(|back| {
            let date = today.checked_sub(jiff::Span::new().days(back)).ok()?;
            let (open, close) = (self.opening(date)?, self.closing(date)?);
            (open <= at && at < close).then_some(close)
        })
    }

    /// The local date at `at`.
    fn local_date(&self, at: Nanos) -> Option<Date> {
        let t = Timestamp::from_nanosecond(i128::from(at)).ok()?;
        Some(t.to_zoned(self.timezone.clone()).date())
    }

    /// When the window of `date` opens (None: no window that day).
    fn opening(&self, date: Date) -> Option<Nanos> {
        if !self.days[weekday_index(date.weekday())] {
            return None;
        }
        self.instant(date, self.start)
    }

    /// When the window that opens on `date` closes.
    fn closing(&self, date: Date) -> Option<Nanos> {
        let day = match self.end > self.start {
            true => date,
            false => date.tomorrow().ok()?,
        };
        self.instant(day, self.end)
    }

    /// Local `minutes` after midnight of `date`, as an instant (a time a DST
    /// gap skips is taken as the instant after the gap).
    fn instant(&self, date: Date, minutes: u16) -> Option<Nanos> {
        let time = Time::new((minutes / 60) as i8, (minutes % 60) as i8, 0, 0).ok()?;
        let zoned = date
            .to_datetime(time)
            .to_zoned(self.timezone.clone())
            .ok()?;
        u64::try_from(zoned.timestamp().as_nanosecond()).ok()
    }
}

fn weekday_index(day: Weekday) -> usize {
    day.to_monday_zero_offset() as usize
}

/// `"06:00"` as minutes after midnight (`"24:00"` is the end of the day).
pub fn parse_time(text: &str) -> Result<u16, String> {
    let (h, m) = text
        .split_once(':')
        .ok_or_else(|| format!("'{text}' is not a time of day like \"06:00\""))?;
    let (h, m): (u16, u16) = match (h.parse(), m.parse()) {
        (Ok(h), Ok(m)) if m < 60 && (h < 24 || (h == 24 && m == 0)) => (h, m),
        _ => return Err(format!("'{text}' is not a time of day like \"06:00\"")),
    };
    Ok(h * 60 + m)
}

/// `["mon", "tue", ...]` (or full names) as the days a window opens on.
pub fn parse_days(days: &[String]) -> Result<[bool; 7], String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let mut set = [false; 7];
    for day in days {
        let lower = day.to_ascii_lowercase();
        let i = NAMES
            .iter()
            .position(|n| lower.len() >= 3 && lower.starts_with(n) && is_day_name(&lower))
            .ok_or_else(|| {
                format!("day '{day}' is not a day of the week (mon, tue, wed, thu, fri, sat, sun)")
            })?;
        set[i] = true;
    }
    Ok(set)
}

fn is_day_name(lower: &str) -> bool {
    [
        "mon",
        "monday",
        "tue",
        "tues",
        "tuesday",
        "wed",
        "wednesday",
        "thu",
        "thur",
        "thurs",
        "thursday",
        "fri",
        "friday",
        "sat",
        "saturday",
        "sun",
        "sunday",
    ]
    .contains(&lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Nanos {
        let t: Timestamp = text.parse().expect("a timestamp");
        t.as_nanosecond() as Nanos
    }

    fn schedule(start: &str, end: &str, tz: &str, days: &[&str]) -> Schedule {
        Schedule {
            workflow: "enrichment".into(),
            start: parse_time(start).unwrap(),
            end: parse_time(end).unwrap(),
            timezone: TimeZone::get(tz).unwrap(),
            days: match days.is_empty() {
                true => [true; 7],
                false => {
                    parse_days(&days.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap()
                }
            },
        }
    }

    #[test]
    fn open_inside_the_window_and_told_the_next_opening_outside_it() {
        let s = schedule("06:00", "08:00", "Europe/Paris", &[]);
        // 2026-06-10: Paris is UTC+2.
        assert_eq!(s.opens(at("2026-06-10T04:30:00Z")), Ok(()));
        assert_eq!(
            s.opens(at("2026-06-10T03:59:00Z")),
            Err(at("2026-06-10T04:00:00Z"))
        );
        assert_eq!(
            s.opens(at("2026-06-10T06:00:00Z")),
            Err(at("2026-06-11T04:00:00Z")),
            "closed at 08:00 sharp"
        );
    }

    #[test]
    fn a_window_keeps_its_wall_clock_across_dst_changes() {
        let s = schedule("06:00", "08:00", "America/New_York", &[]);
        // 2026-03-08: clocks spring forward at 02:00 (EST UTC-5 -> EDT UTC-4).
        assert_eq!(
            s.opens(at("2026-03-08T05:00:00Z")),
            Err(at("2026-03-08T10:00:00Z")),
            "06:00 EDT on the day of the change"
        );
        assert_eq!(
            s.opens(at("2026-03-07T14:00:00Z")),
            Err(at("2026-03-08T10:00:00Z"))
        );
        // 2026-11-01: clocks fall back at 02:00 (EDT -> EST).
        assert_eq!(
            s.opens(at("2026-11-01T05:00:00Z")),
            Err(at("2026-11-01T11:00:00Z")),
            "06:00 EST on the day of the change"
        );
        assert_eq!(s.opens(at("2026-11-01T12:59:00Z")), Ok(()));
        assert!(s.opens(at("2026-11-01T13:00:00Z")).is_err());
    }

    #[test]
    fn a_start_a_dst_gap_skips_opens_when_the_gap_ends() {
        let s = schedule("02:30", "04:00", "America/New_York", &[]);
        // 02:30 does not exist on 2026-03-08: it opens at 03:00 EDT.
        assert_eq!(
            s.opens(at("2026-03-08T06:00:00Z")),
            Err(at("2026-03-08T07:30:00Z"))
        );
    }

    #[test]
    fn days_and_windows_past_midnight() {
        // Weeknights from 22:00 to 02:00 UTC.
        let s = schedule(
            "22:00",
            "02:00",
            "UTC",
            &["mon", "tue", "wed", "thu", "fri"],
        );
        // Friday 2026-12-11 23:00: open; Saturday 01:00: still Friday's.
        assert_eq!(s.opens(at("2026-12-11T23:00:00Z")), Ok(()));
        assert_eq!(s.opens(at("2026-12-12T01:00:00Z")), Ok(()));
        // Saturday 23:00: closed until Monday 22:00.
        assert_eq!(
            s.opens(at("2026-12-12T23:00:00Z")),
            Err(at("2026-12-14T22:00:00Z"))
        );
    }

    #[test]
    fn bad_times_and_days_are_named() {
        assert_eq!(
            parse_time("6am").unwrap_err(),
            "'6am' is not a time of day like \"06:00\""
        );
        assert!(parse_time("24:30").is_err());
        assert_eq!(parse_time("24:00"), Ok(1440));
        assert_eq!(
            parse_days(&["mon".into(), "funday".into()]).unwrap_err(),
            "day 'funday' is not a day of the week (mon, tue, wed, thu, fri, sat, sun)"
        );
        assert_eq!(
            parse_days(&["Monday".into(), "sun".into()]),
            Ok([true, false, false, false, false, false, true])
        );
    }
}
