//! Alerts: rules read from the history, each subject (an upstream, a limit,
//! the gateway) in one of three levels, with hysteresis so an alert fires
//! once and resolves once. The defaults are the alerting thresholds of a
//! guide to API rate limits for outbound workflows (warning / critical):
//! daily quota consumed 70 / 90 %, 429 rate above 1 / 5 % of calls over
//! 15 minutes, queue depth above 1,000 / 10,000 pending tasks, dead letters
//! above 50 / 200, average processing latency above 5 / 30 minutes.

use crate::history::History;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What an alert watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// Per daily limit (`upstream/limit`): percent of its quota used, from
    /// `tollgate_upstream_limit_remaining` and `_quota`.
    QuotaUsed,
    /// Per upstream: percent of calls answered 429 over the window
    /// (`tollgate_upstream_calls_total`; the gateway's own 429s from
    /// `tollgate_responses_total`), once at least `min_calls` were made.
    Rate429,
    /// Per upstream: jobs not yet final (`tollgate_jobs_pending`).
    QueueDepth,
    /// Per upstream: jobs that became dead letters over the window
    /// (`tollgate_jobs_finished_total{outcome="dead"}`).
    DeadLetters,
    /// Per upstream: average seconds from queued to final over the window
    /// (`tollgate_job_seconds_sum` / `_count`).
    Latency,
    /// Any series of `/metrics`: a gauge's value or a counter's increase
    /// over the window, summed per value of the label `by` (or in all).
    Metric { name: String, by: Option<String> },
}

/// One alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub signal: Signal,
    pub warning: f64,
    pub critical: f64,
    /// Seconds a counter's increase is taken over.
    pub window: i64,
    /// Rate429: fewer calls than this in the window decide nothing.
    pub min_calls: f64,
    /// How the value reads in messages ("%", " pending", " s").
    pub unit: &'static str,
}

/// A level drops only once its value is this far below its threshold, so
/// a value hovering at a threshold fires once, not on every scrape.
pub const HYSTERESIS: f64 = 0.9;

impl Rule {
    fn new(
        name: &str,
        signal: Signal,
        warning: f64,
        critical: f64,
        window: i64,
        unit: &'static str,
    ) -> Rule {
        Rule {
            name: name.into(),
            signal,
            warning,
            critical,
            window,
            min_calls: 100.0,
            unit,
        }
    }

    /// The defaults (see the module's comment).
    pub fn defaults() -> Vec<Rule> {
        vec![
            Rule::new("quota_used", Signal::QuotaUsed, 70.0, 90.0, 0, "%"),
            Rule::new("rate_429", Signal::Rate429, 1.0, 5.0, 15 * 60, "%"),
            Rule::new(
                "queue_depth",
                Signal::QueueDepth,
                1000.0,
                10_000.0,
                0,
                " pending",
            ),
            Rule::new(
                "dead_letters",
                Signal::DeadLetters,
                50.0,
                200.0,
                24 * 3600,
                " dead letters",
            ),
            Rule::new("latency", Signal::Latency, 300.0, 1800.0, 15 * 60, " s"),
        ]
    }

    fn describe(&self) -> &'static str {
        match self.signal {
            Signal::QuotaUsed => "of its daily quota used",
            Signal::Rate429 => "of calls answered 429",
            Signal::QueueDepth => "jobs not yet final",
            Signal::DeadLetters => "jobs dead",
            Signal::Latency => "average from queued to final",
            Signal::Metric { .. } => "",
        }
    }

    /// The value of each subject now.
    pub fn values(
        &self,
        history: &History,
        daily: &BTreeSet<String>,
        now: i64,
    ) -> BTreeMap<String, f64> {
        let from = now - self.window + 1;
        let mut out = BTreeMap::new();
        match &self.signal {
            Signal::QuotaUsed => {
                let quotas: BTreeMap<String, f64> = history
                    .named("tollgate_upstream_limit_quota")
                    .filter_map(|s| Some((limit_subject(s)?, s.latest()?)))
                    .collect();
                for s in history.named("tollgate_upstream_limit_remaining") {
                    let Some(subject) = limit_subject(s) else {
                        continue;
                    };
                    if !daily.contains(&subject) {
                        continue;
                    }
                    let (Some(remaining), Some(&quota)) = (s.latest(), quotas.get(&subject)) else {
                        continue;
                    };
                    if quota > 0.0 {
                        out.insert(subject, 100.0 * (quota - remaining).max(0.0) / quota);
                    }
                }
            }
            Signal::Rate429 => {
                let mut calls: BTreeMap<String, (f64, f64)> = BTreeMap::new();
                for s in history.named("tollgate_upstream_calls_total") {
                    let subject = s.label("upstream").unwrap_or("").to_string();
                    let n = s.increase_since(from);
                    let e = calls.entry(subject).or_default();
                    e.1 += n;
                    if s.label("outcome") == Some("429") {
                        e.0 += n;
                    }
                }
                for s in history.named("tollgate_responses_total") {
                    let n = s.increase_since(from);
                    let e = calls.entry("gateway".into()).or_default();
                    e.1 += n;
                    if s.label("code") == Some("429") {
                        e.0 += n;
                    }
                }
                for (subject, (throttled, all)) in calls {
                    if all >= self.min_calls && all > 0.0 {
                        out.insert(subject, 100.0 * throttled / all);
                    }
                }
            }
            Signal::QueueDepth => {
                for s in history.named("tollgate_jobs_pending") {
                    let subject = s.label("upstream").unwrap_or("").to_string();
                    *out.entry(subject).or_insert(0.0) += s.latest().unwrap_or(0.0);
                }
            }
            Signal::DeadLetters => {
                for s in history.named("tollgate_jobs_finished_total") {
                    let subject = s.label("upstream").unwrap_or("").to_string();
                    let dead = if s.label("outcome") == Some("dead") {
                        s.increase_since(from)
                    } else {
                        0.0
                    };
                    *out.entry(subject).or_insert(0.0) += dead;
                }
            }
            Signal::Latency => {
                let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
                for s in history.named("tollgate_job_seconds_sum") {
                    let subject = s.label("upstream").unwrap_or("").to_string();
                    sums.entry(subject).or_default().0 += s.increase_since(from);
                }
                for s in history.named("tollgate_job_seconds_count") {
                    let subject = s.label("upstream").unwrap_or("").to_string();
                    sums.entry(subject).or_default().1 += s.increase_since(from);
                }
                for (subject, (seconds, jobs)) in sums {
                    if jobs > 0.0 {
                        out.insert(subject, seconds / jobs);
                    }
                }
            }
            Signal::Metric { name, by } => {
                for s in history.named(name) {
                    let subject = match by {
                        Some(by) => s.label(by).unwrap_or("").to_string(),
                        None => "all".to_string(),
                    };
                    let v = match s.kind {
                        crate::sample::Kind::Counter => s.increase_since(from),
                        crate::sample::Kind::Gauge => s.latest().unwrap_or(0.0),
                    };
                    *out.entry(subject).or_insert(0.0) += v;
                }
            }
        }
        out
    }

    /// The level `value` calls for when the subject is at `now`.
    fn level(&self, now: Level, value: f64) -> Level {
        let raised = if value > self.critical {
            Level::Critical
        } else if value > self.warning {
            Level::Warning
        } else {
            Level::Ok
        };
        if raised >= now {
            return raised;
        }
        // Going down: only past the hysteresis band of each level left.
        if now == Level::Critical && value > self.critical * HYSTERESIS {
            Level::Critical
        } else if now >= Level::Warning && value > self.warning * HYSTERESIS {
            Level::Warning
        } else {
            Level::Ok
        }
    }
}

/// `upstream/limit` of a limit's series.
fn limit_subject(s: &crate::history::Series) -> Option<String> {
    Some(format!("{}/{}", s.label("upstream")?, s.label("limit")?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Critical,
}

/// An alert that fired or resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub alert: String,
    pub subject: String,
    /// "firing" or "resolved".
    pub status: &'static str,
    /// The level it fired at (for a resolved alert: the last level it had).
    pub severity: Level,
    pub value: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// Unix seconds.
    pub at: i64,
    pub summary: String,
}

/// An alert firing now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Active {
    pub alert: String,
    pub subject: String,
    pub severity: Level,
    pub value: f64,
    pub since: i64,
}

/// Events kept for `GET /v1/alerts`.
const RECENT: usize = 200;

/// Every rule, and where each subject of each rule stands.
#[derive(Debug)]
pub struct Alerts {
    pub rules: Vec<Rule>,
    /// `upstream/limit` of the limits whose quota is per day or longer.
    pub daily: BTreeSet<String>,
    /// (rule, subject) -> (level, since, last value).
    state: BTreeMap<(String, String), (Level, i64, f64)>,
    recent: VecDeque<Event>,
}

impl Alerts {
    pub fn new(rules: Vec<Rule>, daily: BTreeSet<String>) -> Alerts {
        Alerts {
            rules,
            daily,
            state: BTreeMap::new(),
            recent: VecDeque::new(),
        }
    }

    /// Evaluate every rule at `now`: the events of alerts that fired or
    /// resolved since the last evaluation.
    pub fn evaluate(&mut self, history: &History, now: i64) -> Vec<Event> {
        let mut events = Vec::new();
        for rule in &self.rules {
            let values = rule.values(history, &self.daily, now);
            // Subjects that have gone quiet read as 0 (and so resolve).
            let known: Vec<String> = self
                .state
                .keys()
                .filter(|(r, s)| *r == rule.name && !values.contains_key(s))
                .map(|(_, s)| s.clone())
                .collect();
            let quiet = known.into_iter().map(|s| (s, 0.0));
            let values: Vec<(String, f64)> = values.into_iter().chain(quiet).collect();
            for (subject, value) in values {
                let key = (rule.name.clone(), subject.clone());
                let (was, since, _) =
                    self.state
                        .get(&key)
                        .copied()
                        .unwrap_or((Level::Ok, now, 0.0));
                let level = rule.level(was, value);
                let threshold = match level.max(was) {
                    Level::Critical => rule.critical,
                    _ => rule.warning,
                };
                let event = |status: &'static str, severity: Level| Event {
                    alert: rule.name.clone(),
                    subject: subject.clone(),
                    status,
                    severity,
                    value,
                    threshold,
                    at: now,
                    summary: summary(rule, &subject, status, severity, value, threshold),
                };
                if level > was {
                    events.push(event("firing", level));
                } else if level == Level::Ok && was > Level::Ok {
                    events.push(event("resolved", was));
                }
                if level == Level::Ok {
                    self.state.remove(&key);
                } else {
                    let since = if was == Level::Ok { now } else { since };
                    self.state.insert(key, (level, since, value));
                }
            }
        }
        for e in &events {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(e.clone());
        }
        events
    }

    /// The alerts firing now.
    pub fn active(&self) -> Vec<Active> {
        self.state
            .iter()
            .map(|((alert, subject), (severity, since, value))| Active {
                alert: alert.clone(),
                subject: subject.clone(),
                severity: *severity,
                value: *value,
                since: *since,
            })
            .collect()
    }

    /// The last events, newest last.
    pub fn recent(&self) -> impl Iterator<Item = &Event> {
        self.recent.iter()
    }
}

fn summary(
    rule: &Rule,
    subject: &str,
    status: &str,
    severity: Level,
    value: f64,
    threshold: f64,
) -> String {
    let what = rule.describe();
    let value = round(value);
    let threshold = round(threshold);
    let unit = rule.unit;
    let window =
        if rule.window > 0 && !matches!(rule.signal, Signal::QueueDepth | Signal::QuotaUsed) {
            format!(" over {}", crate::format_duration(rule.window))
        } else {
            String::new()
        };
    let level = match severity {
        Level::Critical => "critical",
        Level::Warning => "warning",
        Level::Ok => "ok",
    };
    match status {
        "resolved" => format!(
            "resolved: {} {subject}: {value}{unit} {what}{window}",
            rule.name
        ),
        _ => format!(
            "[{level}] {} {subject}: {value}{unit} {what}{window} (above {threshold}{unit})",
            rule.name
        ),
    }
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::parse;

    /// 2027-01-15T08:00:00Z, the start of an hour.
    const T0: i64 = 1_800_000_000;

    fn scrape(h: &mut History, at: i64, text: &str) {
        h.record(at, parse(text));
    }

    fn statuses(events: &[Event]) -> Vec<(String, &'static str, Level)> {
        events
            .iter()
            .map(|e| (format!("{} {}", e.alert, e.subject), e.status, e.severity))
            .collect()
    }

    #[test]
    fn queue_depth_fires_once_escalates_once_and_resolves_once_without_flapping() {
        let mut h = History::default();
        let mut alerts = Alerts::new(Rule::defaults(), BTreeSet::new());
        let mut seen = Vec::new();
        // Hovering around each threshold, scrape after scrape.
        let depths = [
            10, 1001, 995, 1002, 950, 999, 10_001, 9_950, 10_020, 9_500, 950, 1_005, 899, 1000, 5,
        ];
        for (i, depth) in depths.iter().enumerate() {
            let at = T0 + 10 * i as i64;
            scrape(&mut h, at, &format!("# TYPE tollgate_jobs_pending gauge\ntollgate_jobs_pending{{upstream=\"crm\"}} {depth}\n"));
            seen.extend(alerts.evaluate(&h, at));
        }
        assert_eq!(
            statuses(&seen),
            vec![
                ("queue_depth crm".into(), "firing", Level::Warning),
                ("queue_depth crm".into(), "firing", Level::Critical),
                ("queue_depth crm".into(), "resolved", Level::Warning),
            ]
        );
        assert_eq!(seen[0].at, T0 + 10);
        assert_eq!(seen[1].at, T0 + 60);
        assert_eq!(seen[2].at, T0 + 120);
        assert!(alerts.active().is_empty());
        assert_eq!(alerts.recent().count(), 3);
    }

    #[test]
    fn every_default_fires_at_its_threshold_and_resolves() {
        let daily: BTreeSet<String> = ["crm/daily".to_string()].into();
        let mut h = History::default();
        let mut alerts = Alerts::new(Rule::defaults(), daily);
        // Quota: 75 % of the day's 1000 used; the 10-second limit is not daily.
        let at = T0;
        scrape(
            &mut h,
            at,
            "# TYPE tollgate_upstream_limit_remaining gauge\n\
tollgate_upstream_limit_remaining{upstream=\"crm\",limit=\"daily\"} 250\n\
tollgate_upstream_limit_remaining{upstream=\"crm\",limit=\"burst\"} 0\n\
# TYPE tollgate_upstream_limit_quota gauge\n\
tollgate_upstream_limit_quota{upstream=\"crm\",limit=\"daily\"} 1000\n\
tollgate_upstream_limit_quota{upstream=\"crm\",limit=\"burst\"} 100\n\
# TYPE tollgate_upstream_calls counter\n\
tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"} 970\n\
tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"429\"} 30\n\
# TYPE tollgate_jobs_finished counter\n\
tollgate_jobs_finished_total{upstream=\"crm\",outcome=\"dead\"} 201\n\
# TYPE tollgate_job_seconds histogram\n\
tollgate_job_seconds_sum{upstream=\"crm\"} 3100\n\
tollgate_job_seconds_count{upstream=\"crm\"} 10\n",
        );
        let fired = alerts.evaluate(&h, at);
        let mut got = statuses(&fired);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("dead_letters crm".into(), "firing", Level::Critical),
                ("latency crm".into(), "firing", Level::Warning),
                ("quota_used crm/daily".into(), "firing", Level::Warning),
                ("rate_429 crm".into(), "firing", Level::Warning),
            ]
        );
        let rate = fired.iter().find(|e| e.alert == "rate_429").expect("rate");
        assert_eq!(rate.value, 3.0);
        assert_eq!(
            rate.summary,
            "[warning] rate_429 crm: 3% of calls answered 429 over 15m (above 1%)"
        );
        // 16 minutes on, 1000 more calls without a 429: the window has moved past.
        let later = T0 + 16 * 60;
        scrape(
            &mut h,
            later,
            "# TYPE tollgate_upstream_calls counter\n\
tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"} 1970\n\
tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"429\"} 30\n\
# TYPE tollgate_upstream_limit_remaining gauge\n\
tollgate_upstream_limit_remaining{upstream=\"crm\",limit=\"daily\"} 900\n",
        );
        let mut got = statuses(&alerts.evaluate(&h, later));
        got.sort();
        assert_eq!(
            got,
            vec![
                ("latency crm".into(), "resolved", Level::Warning),
                ("quota_used crm/daily".into(), "resolved", Level::Warning),
                ("rate_429 crm".into(), "resolved", Level::Warning),
            ]
        );
        // Dead letters count over 24 hours: resolved a day later.
        let day = T0 + 86_400 + 60;
        scrape(&mut h, day, "# TYPE tollgate_jobs_finished counter\ntollgate_jobs_finished_total{upstream=\"crm\",outcome=\"dead\"} 201\n");
        assert_eq!(
            statuses(&alerts.evaluate(&h, day)),
            vec![("dead_letters crm".into(), "resolved", Level::Critical)]
        );
    }

    #[test]
    fn a_few_calls_decide_no_429_rate() {
        let mut h = History::default();
        let mut alerts = Alerts::new(Rule::defaults(), BTreeSet::new());
        scrape(&mut h, T0, "# TYPE tollgate_upstream_calls counter\ntollgate_upstream_calls_total{upstream=\"crm\",outcome=\"429\"} 5\n");
        assert!(alerts.evaluate(&h, T0).is_empty());
    }
}
