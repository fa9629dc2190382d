//! Metrics over time: every series of `/metrics` per minute for 48 hours and
//! per hour for 30 days, bounded in series. A counter's bucket holds its
//! increase in that minute or hour (a counter that went down was reset, by a
//! restart: its new value is the increase); a gauge's holds its last value.
//! Times are Unix seconds, so buckets line up across restarts.

use crate::sample::{Kind, Sample};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How finely a series is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 2] = [Resolution::Minute, Resolution::Hour];

    /// Seconds in one bucket.
    pub fn seconds(self) -> i64 {
        match self {
            Resolution::Minute => 60,
            Resolution::Hour => 3600,
        }
    }

    /// Buckets kept: 48 hours of minutes, 30 days of hours.
    pub fn kept(self) -> i64 {
        match self {
            Resolution::Minute => 48 * 60,
            Resolution::Hour => 30 * 24,
        }
    }

    /// The bucket (its start, in Unix seconds) that time `at` falls in.
    pub fn bucket(self, at: i64) -> i64 {
        at.div_euclid(self.seconds()) * self.seconds()
    }

    pub fn code(self) -> i64 {
        match self {
            Resolution::Minute => 0,
            Resolution::Hour => 1,
        }
    }

    pub fn from_code(code: i64) -> Option<Resolution> {
        match code {
            0 => Some(Resolution::Minute),
            1 => Some(Resolution::Hour),
            _ => None,
        }
    }
}

/// The most series one process keeps (each is at most ~58 KiB); more are
/// counted in `History::dropped` and not kept.
pub const MAX_SERIES: usize = 4096;

/// One series: its name, labels and kind, and its buckets, oldest first.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub kind: Kind,
    /// The counter's value at the last scrape of this process.
    last_raw: Option<f64>,
    minutes: VecDeque<(i64, f64)>,
    hours: VecDeque<(i64, f64)>,
}

impl Series {
    fn new(name: String, labels: Vec<(String, String)>, kind: Kind) -> Series {
        Series {
            name,
            labels,
            kind,
            last_raw: None,
            minutes: VecDeque::new(),
            hours: VecDeque::new(),
        }
    }

    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn ring(&self, resolution: Resolution) -> &VecDeque<(i64, f64)> {
        match resolution {
            Resolution::Minute => &self.minutes,
            Resolution::Hour => &self.hours,
        }
    }

    fn ring_mut(&mut self, resolution: Resolution) -> &mut VecDeque<(i64, f64)> {
        match resolution {
            Resolution::Minute => &mut self.minutes,
            Resolution::Hour => &mut self.hours,
        }
    }

    /// The buckets from `from` (a bucket start, inclusive), oldest first.
    pub fn points(
        &self,
        resolution: Resolution,
        from: i64,
    ) -> impl Iterator<Item = (i64, f64)> + '_ {
        let ring = self.ring(resolution);
        let start = ring.partition_point(|(b, _)| *b < from);
        ring.range(start..).copied()
    }

    /// A counter's increase since `from` (Unix seconds), from its minute
    /// buckets (the one `from` falls in counted whole).
    pub fn increase_since(&self, from: i64) -> f64 {
        self.points(Resolution::Minute, Resolution::Minute.bucket(from))
            .map(|(_, v)| v)
            .sum()
    }

    /// A gauge's last recorded value.
    pub fn latest(&self) -> Option<f64> {
        self.minutes.back().or(self.hours.back()).map(|(_, v)| *v)
    }

    /// Put `amount` in the bucket of `at`: added for a counter, set for a
    /// gauge. Returns the bucket.
    fn put(&mut self, resolution: Resolution, at: i64, amount: f64) -> i64 {
        let bucket = resolution.bucket(at);
        let counter = self.kind == Kind::Counter;
        let ring = self.ring_mut(resolution);
        match ring.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) => {
                if counter {
                    ring[i].1 += amount;
                } else {
                    ring[i].1 = amount;
                }
            }
            Err(i) => ring.insert(i, (bucket, amount)),
        }
        bucket
    }

    fn set_bucket(&mut self, resolution: Resolution, bucket: i64, value: f64) {
        let ring = self.ring_mut(resolution);
        match ring.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) => ring[i].1 = value,
            Err(i) => ring.insert(i, (bucket, value)),
        }
    }

    fn value_at(&self, resolution: Resolution, bucket: i64) -> Option<f64> {
        let ring = self.ring(resolution);
        ring.binary_search_by_key(&bucket, |(b, _)| *b)
            .ok()
            .map(|i| ring[i].1)
    }

    fn prune(&mut self, now: i64) {
        for resolution in Resolution::ALL {
            let oldest = resolution.bucket(now) - (resolution.kept() - 1) * resolution.seconds();
            let ring = self.ring_mut(resolution);
            while ring.front().is_some_and(|(b, _)| *b < oldest) {
                ring.pop_front();
            }
        }
    }
}

/// Every series of one process, by key (`name{labels}`).
#[derive(Debug, Default)]
pub struct History {
    series: BTreeMap<String, Series>,
    /// Buckets changed since the last `take_changed`: (key, resolution, bucket).
    changed: BTreeSet<(String, Resolution, i64)>,
    /// Series not kept because `MAX_SERIES` were.
    pub dropped: usize,
}

/// One bucket as the state keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub kind: Kind,
    pub resolution: Resolution,
    pub bucket: i64,
    pub value: f64,
}

impl History {
    /// Record a scrape taken at `now`. A gauge that the scrape no longer
    /// has (a queue that emptied, a limit a reload removed) reads 0 from
    /// then on, rather than its last value forever.
    pub fn record(&mut self, now: i64, samples: Vec<Sample>) {
        let mut seen = std::collections::HashSet::with_capacity(samples.len());
        for sample in samples {
            let key = sample.key();
            if !self.series.contains_key(&key) {
                if self.series.len() >= MAX_SERIES {
                    if self.dropped == 0 {
                        tracing::warn!(
                            "history keeps {MAX_SERIES} series at most: new ones (first: {key}) are not kept until old ones age out"
                        );
                    }
                    self.dropped += 1;
                    continue;
                }
                self.series.insert(
                    key.clone(),
                    Series::new(sample.name, sample.labels, sample.kind),
                );
            }
            seen.insert(key.clone());
            let Some(series) = self.series.get_mut(&key) else {
                continue;
            };
            let amount = match series.kind {
                Kind::Counter => {
                    let before = series.last_raw.replace(sample.value);
                    match before {
                        Some(before) if sample.value >= before => sample.value - before,
                        // First scrape of this process (its counters started
                        // at 0), or a reset.
                        _ => sample.value,
                    }
                }
                Kind::Gauge => sample.value,
            };
            if series.kind == Kind::Counter && amount == 0.0 && series.latest().is_some() {
                continue;
            }
            for resolution in Resolution::ALL {
                let bucket = series.put(resolution, now, amount);
                self.changed.insert((key.clone(), resolution, bucket));
            }
        }
        for (key, series) in self.series.iter_mut() {
            if series.kind == Kind::Gauge
                && !seen.contains(key)
                && series.latest().is_some_and(|v| v != 0.0)
            {
                for resolution in Resolution::ALL {
                    let bucket = series.put(resolution, now, 0.0);
                    self.changed.insert((key.clone(), resolution, bucket));
                }
            }
        }
        self.prune(now);
    }

    /// Drop buckets no longer kept, and series left without any (so the
    /// bound on series counts what is alive).
    fn prune(&mut self, now: i64) {
        for series in self.series.values_mut() {
            series.prune(now);
        }
        self.series
            .retain(|_, s| !(s.minutes.is_empty() && s.hours.is_empty()));
    }

    /// The buckets changed since the last call, to be written to the state.
    pub fn take_changed(&mut self) -> Vec<Row> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .filter_map(|(key, resolution, bucket)| {
                let series = self.series.get(&key)?;
                Some(Row {
                    kind: series.kind,
                    value: series.value_at(resolution, bucket)?,
                    key,
                    resolution,
                    bucket,
                })
            })
            .collect()
    }

    /// Put back what the state kept (at startup, before any scrape).
    pub fn restore(&mut self, rows: impl IntoIterator<Item = Row>, now: i64) {
        for row in rows {
            if !self.series.contains_key(&row.key) {
                if self.series.len() >= MAX_SERIES {
                    self.dropped += 1;
                    continue;
                }
                let Some((name, labels)) = crate::sample::parse_key(&row.key) else {
                    continue;
                };
                self.series
                    .insert(row.key.clone(), Series::new(name, labels, row.kind));
            }
            if let Some(series) = self.series.get_mut(&row.key) {
                series.set_bucket(row.resolution, row.bucket, row.value);
            }
        }
        self.prune(now);
    }

    /// Every bucket kept, as the state keeps them.
    pub fn rows(&self) -> Vec<Row> {
        let mut out = Vec::new();
        for (key, series) in &self.series {
            for resolution in Resolution::ALL {
                out.extend(series.ring(resolution).iter().map(|(bucket, value)| Row {
                    key: key.clone(),
                    kind: series.kind,
                    resolution,
                    bucket: *bucket,
                    value: *value,
                }));
            }
        }
        out
    }

    /// The series named `name`, whatever their labels.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Series> + 'a {
        let prefix_end = format!("{name}{{");
        self.series
            .range(name.to_string()..)
            .take_while(move |(k, _)| k.starts_with(name))
            .filter(move |(k, _)| k.as_str() == name || k.starts_with(&prefix_end))
            .map(|(_, s)| s)
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::parse;

    /// 2027-01-15T08:00:00Z, the start of an hour.
    const T0: i64 = 1_800_000_000;

    fn calls(n: u64) -> Vec<Sample> {
        parse(&format!(
            "# TYPE tollgate_upstream_calls counter\ntollgate_upstream_calls_total{{upstream=\"crm\",outcome=\"2xx\"}} {n}\n# TYPE tollgate_jobs_pending gauge\ntollgate_jobs_pending{{upstream=\"crm\"}} {}\n",
            n * 2
        ))
    }

    fn minutes(h: &History, name: &str) -> Vec<(i64, f64)> {
        h.named(name)
            .flat_map(|s| s.points(Resolution::Minute, 0).collect::<Vec<_>>())
            .map(|(b, v)| ((b - T0) / 60, v))
            .collect()
    }

    #[test]
    fn counters_keep_their_increase_and_gauges_their_last_value_per_bucket() {
        let mut h = History::default();
        h.record(T0 + 5, calls(3));
        h.record(T0 + 30, calls(7));
        h.record(T0 + 65, calls(10));
        assert_eq!(
            minutes(&h, "tollgate_upstream_calls_total"),
            vec![(0, 7.0), (1, 3.0)]
        );
        assert_eq!(
            minutes(&h, "tollgate_jobs_pending"),
            vec![(0, 14.0), (1, 20.0)]
        );
        let hours: Vec<f64> = h
            .named("tollgate_upstream_calls_total")
            .flat_map(|s| {
                s.points(Resolution::Hour, 0)
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(hours, vec![10.0]);
        // A restart: the counter starts again from 0.
        h.record(T0 + 130, calls(4));
        assert_eq!(
            minutes(&h, "tollgate_upstream_calls_total"),
            vec![(0, 7.0), (1, 3.0), (2, 4.0)]
        );
        let total: f64 = h
            .named("tollgate_upstream_calls_total")
            .map(|s| s.increase_since(T0))
            .sum();
        assert_eq!(total, 14.0);
    }

    #[test]
    fn minutes_are_kept_48_hours_and_hours_30_days() {
        let mut h = History::default();
        h.record(T0, calls(1));
        h.record(T0 + 48 * 3600 - 60, calls(2));
        assert_eq!(minutes(&h, "tollgate_upstream_calls_total").len(), 2);
        h.record(T0 + 48 * 3600, calls(3));
        assert_eq!(
            minutes(&h, "tollgate_upstream_calls_total")
                .first()
                .map(|p| p.0),
            Some(48 * 60 - 1)
        );
        h.record(T0 + 30 * 86_400, calls(4));
        let hours: Vec<i64> = h
            .named("tollgate_upstream_calls_total")
            .flat_map(|s| {
                s.points(Resolution::Hour, 0)
                    .map(|(b, _)| (b - T0) / 3600)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(hours, vec![47, 48, 720]);
    }

    #[test]
    fn what_changed_restores_into_an_equal_history() {
        let mut h = History::default();
        h.record(T0 + 5, calls(3));
        h.record(T0 + 70, calls(9));
        let rows = h.take_changed();
        assert_eq!(rows.len(), 2 * 3);
        assert!(h.take_changed().is_empty());
        let mut back = History::default();
        back.restore(rows, T0 + 70);
        for name in ["tollgate_upstream_calls_total", "tollgate_jobs_pending"] {
            assert_eq!(minutes(&back, name), minutes(&h, name));
        }
        // The restored counter's next scrape is a new process's: from 0.
        back.record(T0 + 130, calls(2));
        assert_eq!(
            minutes(&back, "tollgate_upstream_calls_total"),
            vec![(0, 3.0), (1, 6.0), (2, 2.0)]
        );
    }

    #[test]
    fn a_gauge_the_scrape_no_longer_has_reads_zero() {
        let mut h = History::default();
        h.record(T0, calls(3));
        h.record(T0 + 70, parse("# TYPE tollgate_upstream_calls counter\ntollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"} 3\n"));
        let pending: Vec<f64> = h
            .named("tollgate_jobs_pending")
            .filter_map(|s| s.latest())
            .collect();
        assert_eq!(pending, vec![0.0]);
        assert_eq!(
            minutes(&h, "tollgate_jobs_pending"),
            vec![(0, 6.0), (1, 0.0)]
        );
    }

    #[test]
    fn named_takes_only_that_name() {
        let mut h = History::default();
        h.record(
            T0,
            parse("a_total 1\na_total_x 2\na_total{x=\"1\"} 3\nab 4\n"),
        );
        let keys: Vec<String> = h
            .named("a_total")
            .map(|s| crate::sample::series_key(&s.name, &s.labels))
            .collect();
        assert_eq!(keys, vec!["a_total", "a_total{x=\"1\"}"]);
    }

    #[test]
    fn series_beyond_the_bound_are_counted_not_kept() {
        let mut h = History::default();
        let text: String = (0..MAX_SERIES + 5)
            .map(|i| format!("g{{i=\"{i}\"}} 1\n"))
            .collect();
        h.record(T0, parse(&text));
        assert_eq!(h.len(), MAX_SERIES);
        assert_eq!(h.dropped, 5);
    }
}
