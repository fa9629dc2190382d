//! The page every admin listener serves at `/`: server-rendered HTML with
//! inline SVG charts, no script and no asset from anywhere (it works
//! offline), refreshed by the browser every 30 seconds, one column on a
//! phone. The comply face (proxy, run) draws a guide to API rate limits'
//! four charts: calls per upstream, errors by upstream and type, queue
//! depth, quota used; the gateway draws its requests, denials and holds,
//! its busiest keys and what a key you search has left.

use crate::alerts::{Active, Alerts, Level};
use crate::history::{History, Resolution};
use crate::svg::{escape, number, quota_bars, time_chart, Bar, Line, Style};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Which face a page is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    Gateway,
    Proxy,
    Run,
}

impl Face {
    pub fn name(self) -> &'static str {
        match self {
            Face::Gateway => "tollgate serve",
            Face::Proxy => "tollgate proxy",
            Face::Run => "tollgate run",
        }
    }
}

/// The period a page shows, and how finely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub name: &'static str,
    pub seconds: i64,
    pub resolution: Resolution,
}

pub const RANGES: [Range; 4] = [
    Range {
        name: "1h",
        seconds: 3600,
        resolution: Resolution::Minute,
    },
    Range {
        name: "6h",
        seconds: 6 * 3600,
        resolution: Resolution::Minute,
    },
    Range {
        name: "48h",
        seconds: 48 * 3600,
        resolution: Resolution::Hour,
    },
    Range {
        name: "30d",
        seconds: 30 * 86_400,
        resolution: Resolution::Hour,
    },
];

impl Range {
    /// `?range=NAME`; 48 hours by the hour when absent or unknown.
    pub fn named(name: Option<&str>) -> Range {
        RANGES
            .iter()
            .copied()
            .find(|r| Some(r.name) == name)
            .unwrap_or(RANGES[2])
    }

    /// The buckets of this range ending with the one `now` is in.
    pub fn buckets(&self, now: i64) -> Vec<i64> {
        let step = self.resolution.seconds();
        let last = self.resolution.bucket(now);
        let n = self.seconds / step;
        (0..n).map(|i| last - (n - 1 - i) * step).collect()
    }
}

/// A key of the gateway's, and how much of each of its limits it has used.
#[derive(Debug, Clone)]
pub struct BusyKey {
    pub limit: String,
    pub key: String,
    pub used: f64,
    pub quota: f64,
}

/// What a face adds to its page beyond its history.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Where this listener is, for the title.
    pub listen: String,
    /// The gateway's keys nearest their limits.
    pub busiest: Vec<BusyKey>,
    /// The key searched (`?key=`), and each of its limits.
    pub lookup: Option<(String, Vec<KeyLimit>)>,
}

/// What a key has left of one limit.
#[derive(Debug, Clone)]
pub struct KeyLimit {
    pub limit: String,
    pub remaining: f64,
    pub quota: f64,
    /// "requests", or "microseconds" for a latency budget.
    pub unit: String,
}

/// Sum the series named `name` into one line per `group(series)` over
/// `buckets`; series `group` returns None for are left out.
fn lines(
    history: &History,
    name: &str,
    range: &Range,
    buckets: &[i64],
    group: &dyn Fn(&crate::history::Series) -> Option<String>,
) -> Vec<Line> {
    let first = buckets.first().copied().unwrap_or(0);
    let step = range.resolution.seconds();
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in history.named(name) {
        let Some(g) = group(s) else { continue };
        let values = out.entry(g).or_insert_with(|| vec![0.0; buckets.len()]);
        for (bucket, v) in s.points(range.resolution, first) {
            let i = ((bucket - first) / step) as usize;
            if let Some(slot) = values.get_mut(i) {
                *slot += v;
            }
        }
    }
    out.into_iter()
        .map(|(name, values)| Line { name, values })
        .collect()
}

fn label(range: &Range) -> impl Fn(i64) -> String {
    let format = if range.resolution == Resolution::Hour {
        "%m-%d %H:00 UTC"
    } else {
        "%H:%M UTC"
    };
    move |t: i64| utc(t, format)
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}\
header{background:#1d2b36;color:#fff;padding:10px 14px;display:flex;flex-wrap:wrap;gap:8px 16px;align-items:baseline}\
header h1{font-size:17px;margin:0}header a{color:#9cd3ff;margin-right:8px}header a.on{color:#fff;font-weight:bold}\
main{padding:10px;display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:10px}\
section,figure{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:8px}\
figcaption,h2{font-weight:600;font-size:14px;margin:0 0 4px}svg{width:100%;height:auto;display:block}\
.grid{stroke:#eee}.axis{font-size:12px;fill:#666}.label{font-size:14px;fill:#333}.track{fill:#eee}\
.legend{list-style:none;padding:0;margin:4px 0 0;display:flex;flex-wrap:wrap;gap:2px 12px;font-size:12px}\
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}\
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,1fr));gap:6px}\
.tile{border:1px solid #eee;border-radius:4px;padding:6px}.tile b{display:block;font-size:20px}\
.alert{padding:4px 8px;border-radius:4px;margin:3px 0}.critical{background:#fde0d6}.warning{background:#fff1cc}\
.ok{color:#2a7}.empty{color:#888;font-size:12px}table{border-collapse:collapse;width:100%;font-size:12px}\
td,th{text-align:left;padding:3px 4px;border-bottom:1px solid #eee}form{display:flex;gap:6px}input{flex:1;padding:4px}\
.wide{grid-column:1/-1}";

/// The whole page.
pub fn page(
    face: Face,
    history: &History,
    alerts: &Alerts,
    extras: &Extras,
    range: Range,
    now: i64,
) -> String {
    let buckets = range.buckets(now);
    let label = label(&range);
    let mut html = String::with_capacity(64 * 1024);
    let title = format!("{} · {}", face.name(), extras.listen);
    html.push_str(&head(&title, &utc(now, "%Y-%m-%d %H:%M UTC"), true));
    html.push_str("<nav>");
    let key_query = extras
        .lookup
        .as_ref()
        .map(|(k, _)| format!("&key={}", query_escape(k)))
        .unwrap_or_default();
    for r in RANGES {
        let _ = write!(
            html,
            "<a href=\"?range={}{}\"{}>{}</a>",
            r.name,
            escape(&key_query),
            if r == range { " class=\"on\"" } else { "" },
            r.name
        );
    }
    html.push_str("</nav></header><main>");
    html.push_str(&alerts_section(&alerts.active()));
    match face {
        Face::Gateway => gateway(&mut html, history, extras, &range, &buckets, &label),
        Face::Proxy | Face::Run => comply(&mut html, face, history, &range, &buckets, &label, now),
    }
    html.push_str("</main></body></html>\n");
    html
}

/// The page's head and the top of its header (title, then `subtitle`);
/// `refresh`: the browser reloads it every 30 seconds. Reports share it.
pub fn head(title: &str, subtitle: &str, refresh: bool) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">{}\
<title>{}</title><style>{STYLE}</style></head><body><header><h1>{}</h1><span>{}</span>",
        if refresh {
            "<meta http-equiv=\"refresh\" content=\"30\">"
        } else {
            ""
        },
        escape(title),
        escape(title),
        escape(subtitle)
    )
}

/// Unix seconds as `format` writes them in UTC.
pub fn utc(at: i64, format: &str) -> String {
    jiff::Timestamp::from_second(at)
        .map(|t| t.strftime(format).to_string())
        .unwrap_or_else(|_| at.to_string())
}

fn alerts_section(active: &[Active]) -> String {
    let mut out = String::from("<section class=\"wide\" id=\"alerts\"><h2>Alerts</h2>");
    if active.is_empty() {
        out.push_str("<p class=\"ok\" data-alerts=\"0\">none firing</p>");
    }
    for a in active {
        let level = match a.severity {
            Level::Critical => "critical",
            _ => "warning",
        };
        let since = utc(a.since, "%Y-%m-%d %H:%M UTC");
        let _ = write!(
            out,
            "<div class=\"alert {level}\" data-alert=\"{}\" data-subject=\"{}\" data-severity=\"{level}\"><b>{level}</b> {} · {}: {} (since {since})</div>",
            escape(&a.alert),
            escape(&a.subject),
            escape(&a.alert),
            escape(&a.subject),
            number(a.value)
        );
    }
    out.push_str("</section>");
    out
}

/// `part` of `total` as a percentage ("–" of nothing).
fn share(part: f64, total: f64) -> String {
    if total > 0.0 {
        format!("{:.2}%", 100.0 * part / total)
    } else {
        "–".into()
    }
}

/// A figure and what it is, in the row of tiles above the charts.
pub(crate) fn tile(html: &mut String, id: &str, name: &str, value: String) {
    let id = if id.is_empty() {
        String::new()
    } else {
        format!(" id=\"{id}\"")
    };
    let _ = write!(
        html,
        "<div class=\"tile\"{id}><b>{}</b>{}</div>",
        escape(&value),
        escape(name)
    );
}

fn comply(
    html: &mut String,
    face: Face,
    history: &History,
    range: &Range,
    buckets: &[i64],
    label: &dyn Fn(i64) -> String,
    now: i64,
) {
    let by_upstream = |s: &crate::history::Series| s.label("upstream").map(str::to_string);
    let calls = lines(
        history,
        "tollgate_upstream_calls_total",
        range,
        buckets,
        &by_upstream,
    );
    let errors = lines(
        history,
        "tollgate_upstream_calls_total",
        range,
        buckets,
        &|s| {
            let outcome = s.label("outcome")?;
            matches!(outcome, "4xx" | "429" | "5xx" | "network_error")
                .then(|| format!("{} {outcome}", s.label("upstream").unwrap_or("")))
        },
    );
    let mut queue = lines(
        history,
        "tollgate_jobs_pending",
        range,
        buckets,
        &by_upstream,
    );
    if face == Face::Proxy {
        queue.extend(
            lines(
                history,
                "tollgate_proxy_waiting",
                range,
                buckets,
                &by_upstream,
            )
            .into_iter()
            .map(|l| Line {
                name: format!("{} (live)", l.name),
                values: l.values,
            }),
        );
    }
    // Tiles: the period's calls and 429s, what is pending, dead letters
    // of the last 24 hours, average latency of the last 15 minutes.
    let total: f64 = calls.iter().map(Line::total).sum();
    let throttled: f64 = errors
        .iter()
        .filter(|l| l.name.ends_with(" 429"))
        .map(Line::total)
        .sum();
    let pending: f64 = history
        .named("tollgate_jobs_pending")
        .filter_map(|s| s.latest())
        .sum();
    // (by the hour: the last 24 hours and the current one)
    let day_ago = Resolution::Hour.bucket(now - 86_400);
    let dead: f64 = history
        .named("tollgate_jobs_finished_total")
        .filter(|s| s.label("outcome") == Some("dead"))
        .map(|s| {
            s.points(Resolution::Hour, day_ago + 3600)
                .map(|(_, v)| v)
                .sum::<f64>()
        })
        .sum();
    let sum: f64 = history
        .named("tollgate_job_seconds_sum")
        .map(|s| s.increase_since(now - 899))
        .sum();
    let count: f64 = history
        .named("tollgate_job_seconds_count")
        .map(|s| s.increase_since(now - 899))
        .sum();
    html.push_str("<section class=\"wide\"><div class=\"tiles\">");
    tile(
        html,
        "tile-calls",
        &format!("calls in {}", range.name),
        number(total),
    );
    tile(html, "tile-429", "answered 429", share(throttled, total));
    tile(html, "tile-pending", "jobs pending now", number(pending));
    tile(html, "tile-dead", "dead letters (24 h)", number(dead));
    tile(
        html,
        "tile-latency",
        "avg queued→done (15 min)",
        if count > 0.0 {
            crate::format_duration((sum / count).round() as i64)
        } else {
            "–".into()
        },
    );
    if face == Face::Proxy {
        // Answered without a call: a cache hit, a coalesced read, a
        // repeated Idempotency-Key or an unchanged write.
        let saved: f64 = lines(
            history,
            "tollgate_proxy_calls_saved_total",
            range,
            buckets,
            &|_| Some(String::new()),
        )
        .iter()
        .map(Line::total)
        .sum();
        tile(
            html,
            "tile-saved",
            &format!("calls saved in {}", range.name),
            number(saved),
        );
    }
    html.push_str("</div></section>");
    let per = if range.resolution == Resolution::Hour {
        "hour"
    } else {
        "minute"
    };
    html.push_str(&time_chart(
        "calls",
        &format!("Calls per upstream per {per}"),
        Style::Lines,
        buckets,
        &calls,
        label,
    ));
    html.push_str(&time_chart(
        "errors",
        &format!("Errors by upstream and type per {per}"),
        Style::StackedBars,
        buckets,
        &errors,
        label,
    ));
    html.push_str(&time_chart(
        "queue",
        "Queue depth (jobs not yet final)",
        Style::StackedArea,
        buckets,
        &queue,
        label,
    ));
    let quotas: BTreeMap<String, f64> = history
        .named("tollgate_upstream_limit_quota")
        .filter_map(|s| Some((limit_name(s)?, s.latest()?)))
        .collect();
    let mut bars: Vec<Bar> = history
        .named("tollgate_upstream_limit_remaining")
        .filter_map(|s| {
            let name = limit_name(s)?;
            let of = *quotas.get(&name)?;
            Some(Bar {
                used: (of - s.latest()?).max(0.0),
                of,
                name,
            })
        })
        .collect();
    // A key pool's limits, key by key.
    let key_name =
        |s: &crate::history::Series| Some(format!("{} key {}", limit_name(s)?, s.label("key")?));
    let key_quotas: BTreeMap<String, f64> = history
        .named("tollgate_upstream_key_limit_quota")
        .filter_map(|s| Some((key_name(s)?, s.latest()?)))
        .collect();
    bars.extend(
        history
            .named("tollgate_upstream_key_limit_remaining")
            .filter_map(|s| {
                let name = key_name(s)?;
                let of = *key_quotas.get(&name)?;
                Some(Bar {
                    used: (of - s.latest()?).max(0.0),
                    of,
                    name,
                })
            }),
    );
    html.push_str(&quota_bars(
        "quota",
        "Quota used now, by upstream, limit and workflow (a budget is LIMIT/WORKFLOW)",
        &bars,
    ));
}

fn limit_name(s: &crate::history::Series) -> Option<String> {
    Some(format!("{} {}", s.label("upstream")?, s.label("limit")?))
}

fn gateway(
    html: &mut String,
    history: &History,
    extras: &Extras,
    range: &Range,
    buckets: &[i64],
    label: &dyn Fn(i64) -> String,
) {
    let per = if range.resolution == Resolution::Hour {
        "hour"
    } else {
        "minute"
    };
    let requests = lines(history, "tollgate_responses_total", range, buckets, &|s| {
        let code: u16 = s.label("code")?.parse().ok()?;
        Some(match code {
            429 => "429".to_string(),
            c => format!("{}xx", c / 100),
        })
    });
    let decisions = |outcome: &'static str| {
        lines(
            history,
            "tollgate_decisions_total",
            range,
            buckets,
            &move |s| {
                (s.label("outcome") == Some(outcome))
                    .then(|| s.label("limit").unwrap_or("").to_string())
            },
        )
    };
    let total: f64 = requests.iter().map(Line::total).sum();
    let denied: f64 = requests
        .iter()
        .filter(|l| l.name == "429")
        .map(Line::total)
        .sum();
    let held_now: f64 = history
        .named("tollgate_held")
        .filter_map(|s| s.latest())
        .sum();
    let keys: f64 = history
        .named("tollgate_keys")
        .filter_map(|s| s.latest())
        .sum();
    html.push_str("<section class=\"wide\"><div class=\"tiles\">");
    tile(
        html,
        "tile-requests",
        &format!("responses in {}", range.name),
        number(total),
    );
    tile(html, "tile-429", "answered 429", share(denied, total));
    tile(html, "tile-held", "held now", number(held_now));
    tile(html, "tile-keys", "keys tracked", number(keys));
    html.push_str("</div></section>");
    html.push_str(&time_chart(
        "requests",
        &format!("Responses by status per {per}"),
        Style::Lines,
        buckets,
        &requests,
        label,
    ));
    html.push_str(&time_chart(
        "denials",
        &format!("Denials by limit per {per}"),
        Style::StackedBars,
        buckets,
        &decisions("denied"),
        label,
    ));
    html.push_str(&time_chart(
        "holds",
        &format!("Holds by limit per {per}"),
        Style::StackedBars,
        buckets,
        &decisions("held"),
        label,
    ));
    let held = lines(history, "tollgate_held", range, buckets, &|_| {
        Some("held".into())
    });
    html.push_str(&time_chart(
        "held",
        "Requests held (waiting for their slot)",
        Style::StackedArea,
        buckets,
        &held,
        label,
    ));
    // Busiest keys.
    html.push_str("<section id=\"busiest\"><h2>Busiest keys now</h2>");
    if extras.busiest.is_empty() {
        html.push_str("<p class=\"empty\">no key has used any of its limits</p>");
    } else {
        html.push_str("<table><tr><th>limit</th><th>key</th><th>used</th><th>of</th></tr>");
        for k in &extras.busiest {
            let _ = write!(
                html,
                "<tr data-limit=\"{}\" data-key=\"{}\" data-used=\"{}\" data-of=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&k.limit),
                escape(&k.key),
                k.used,
                k.quota,
                escape(&k.limit),
                escape(&k.key),
                number(k.used),
                number(k.quota)
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</section>");
    // A key's remaining.
    html.push_str("<section id=\"lookup\"><h2>What a key has left</h2><form method=\"get\">");
    let searched = extras
        .lookup
        .as_ref()
        .map(|(k, _)| k.as_str())
        .unwrap_or("");
    let _ = write!(
        html,
        "<input name=\"key\" value=\"{}\" placeholder=\"key (parts separated by |)\" aria-label=\"key\"><input type=\"hidden\" name=\"range\" value=\"{}\"><button>look up</button></form>",
        escape(searched),
        range.name
    );
    match &extras.lookup {
        None => {}
        Some((key, limits)) if limits.is_empty() => {
            let _ = write!(
                html,
                "<p class=\"empty\">no limit is keyed by {} part(s)</p>",
                key.split('|').count()
            );
        }
        Some((_, limits)) => {
            let bars: Vec<Bar> = limits
                .iter()
                .map(|l| Bar {
                    name: format!("{} ({} {} left)", l.limit, number(l.remaining), l.unit),
                    used: (l.quota - l.remaining).max(0.0),
                    of: l.quota,
                })
                .collect();
            html.push_str(&quota_bars("key-limits", "Used of each limit", &bars));
        }
    }
    html.push_str("</section>");
}

/// A query value as a URL carries it.
fn query_escape(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Rule;
    use crate::sample::parse;

    #[test]
    fn the_comply_page_draws_what_history_holds_for_the_period() {
        let now = 1_800_000_000;
        let mut h = History::default();
        h.record(now - 7200, parse("tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"} 40\ntollgate_upstream_calls_total{upstream=\"crm\",outcome=\"429\"} 2\n"));
        h.record(now, parse("tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"} 50\ntollgate_upstream_calls_total{upstream=\"crm\",outcome=\"429\"} 3\n"));
        let alerts = Alerts::new(Rule::defaults(), Default::default());
        let html = page(
            Face::Run,
            &h,
            &alerts,
            &Extras::default(),
            Range::named(None),
            now,
        );
        assert!(
            html.contains("data-series=\"crm\" data-total=\"53\""),
            "{html}"
        );
        assert!(html.contains("data-series=\"crm 429\" data-total=\"3\""));
        let html = page(
            Face::Run,
            &h,
            &alerts,
            &Extras::default(),
            Range::named(Some("1h")),
            now,
        );
        assert!(html.contains("data-series=\"crm\" data-total=\"11\""));
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("<script")
        );
    }

    #[test]
    fn ranges_end_with_the_current_bucket() {
        let r = Range::named(Some("1h"));
        let b = r.buckets(3600 * 10 + 59);
        assert_eq!(b.len(), 60);
        assert_eq!(b.last(), Some(&(3600 * 10)));
        assert_eq!(Range::named(Some("nope")).name, "48h");
    }
}
