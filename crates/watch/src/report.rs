//! Pictures of what the engine would do, as files to open in a browser:
//! `tollgate simulate --report FILE.html` (a replay: admitted, held and
//! denied over time per limit, the busiest keys, when each quota ran out)
//! and `tollgate plan --report FILE.html` (a job set's calls over time per
//! upstream and workflow). The same page and charts as the dashboard, drawn
//! once, with no script and nothing fetched.

use crate::dashboard::{head, tile, utc};
use crate::svg::{escape, number, time_chart, Line, Style};
use std::fmt::Write;

/// One limit of a replay: per bucket, what it admitted at once, held and
/// denied.
#[derive(Debug, Clone)]
pub struct ReplayLimit {
    pub name: String,
    pub admitted: Vec<f64>,
    pub held: Vec<f64>,
    pub denied: Vec<f64>,
    /// When it first denied (Unix seconds): its quota ran out.
    pub ran_out: Option<f64>,
}

/// A key of a replay and what its requests got.
#[derive(Debug, Clone)]
pub struct ReplayKey {
    pub limit: String,
    pub key: String,
    pub admitted: u64,
    pub held: u64,
    pub denied: u64,
}

/// A whole replay.
#[derive(Debug, Clone)]
pub struct Replay {
    /// What was replayed (the trace's and the config's names).
    pub title: String,
    /// The first bucket's start (Unix seconds) and each bucket's width.
    pub start: i64,
    pub width: i64,
    pub requests: u64,
    pub admitted: u64,
    pub held: u64,
    pub denied: u64,
    pub errors: u64,
    pub limits: Vec<ReplayLimit>,
    pub busiest: Vec<ReplayKey>,
}

fn time_label(width: i64) -> impl Fn(i64) -> String {
    let format = if width >= 3600 {
        "%m-%d %H:%M UTC"
    } else {
        "%H:%M:%S UTC"
    };
    move |t| utc(t, format)
}

/// The replay's page.
pub fn replay(r: &Replay) -> String {
    let mut html = head(
        &format!("tollgate simulate · {}", r.title),
        &format!(
            "{} requests from {}",
            number(r.requests as f64),
            utc(r.start, "%Y-%m-%d %H:%M:%S UTC")
        ),
        false,
    );
    html.push_str("</header><main><section class=\"wide\"><div class=\"tiles\">");
    tile(
        &mut html,
        "tile-admitted",
        "admitted at once",
        number(r.admitted as f64),
    );
    tile(
        &mut html,
        "tile-held",
        "held, then admitted",
        number(r.held as f64),
    );
    tile(&mut html, "tile-denied", "denied", number(r.denied as f64));
    tile(
        &mut html,
        "tile-errors",
        "not decided (errors)",
        number(r.errors as f64),
    );
    html.push_str("</div></section>");
    let label = time_label(r.width);
    let per = crate::format_duration(r.width);
    for (i, l) in r.limits.iter().enumerate() {
        let n = l.admitted.len().max(l.held.len()).max(l.denied.len());
        let buckets: Vec<i64> = (0..n as i64).map(|b| r.start + b * r.width).collect();
        let pad = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.resize(n, 0.0);
            v
        };
        let lines = [
            ("admitted", &l.admitted),
            ("held", &l.held),
            ("denied", &l.denied),
        ]
        .into_iter()
        .map(|(name, values)| Line {
            name: name.to_string(),
            values: pad(values),
        })
        .collect::<Vec<_>>();
        html.push_str(&time_chart(
            &format!("limit-{i}"),
            &format!("{}: requests per {per}", l.name),
            Style::StackedBars,
            &buckets,
            &lines,
            &label,
        ));
    }
    html.push_str("<section id=\"ran-out\"><h2>When each quota ran out</h2><table><tr><th>limit</th><th>first denial</th></tr>");
    for l in &r.limits {
        let when = match l.ran_out {
            Some(at) => utc(at.floor() as i64, "%Y-%m-%d %H:%M:%S UTC"),
            None => "never".to_string(),
        };
        let _ = write!(
            html,
            "<tr data-limit=\"{}\" data-ran-out=\"{}\"><td>{}</td><td>{}</td></tr>",
            escape(&l.name),
            l.ran_out.map(|t| t.to_string()).unwrap_or_default(),
            escape(&l.name),
            escape(&when)
        );
    }
    html.push_str("</table></section>");
    html.push_str("<section id=\"busiest\"><h2>Busiest keys</h2>");
    if r.busiest.is_empty() {
        html.push_str("<p class=\"empty\">no keyed limit</p>");
    } else {
        html.push_str("<table><tr><th>limit</th><th>key</th><th>admitted</th><th>held</th><th>denied</th></tr>");
        for k in &r.busiest {
            let _ = write!(
                html,
                "<tr data-limit=\"{}\" data-key=\"{}\" data-admitted=\"{}\" data-held=\"{}\" data-denied=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&k.limit),
                escape(&k.key),
                k.admitted,
                k.held,
                k.denied,
                escape(&k.limit),
                escape(&k.key),
                number(k.admitted as f64),
                number(k.held as f64),
                number(k.denied as f64)
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</section></main></body></html>\n");
    html
}

/// One upstream of a plan.
#[derive(Debug, Clone)]
pub struct PlanUpstream {
    pub name: String,
    pub calls: u64,
    /// From the first call to the last reply, seconds.
    pub shortest: f64,
    /// The limit calls waited for most.
    pub binding: Option<String>,
    /// Per limit, the most of its quota in use at once (0 to 1).
    pub peaks: Vec<(String, f64)>,
    /// When each call would go (Unix seconds), per workflow ("" for none).
    pub sends: Vec<(String, Vec<f64>)>,
}

/// Bars per chart at most.
const PLAN_BUCKETS: i64 = 120;

/// The plan's page: per upstream, its calls over time by workflow.
pub fn plan(title: &str, start: i64, upstreams: &[PlanUpstream]) -> String {
    let mut html = head(
        &format!("tollgate plan · {title}"),
        &format!("from {}", utc(start, "%Y-%m-%d %H:%M:%S UTC")),
        false,
    );
    html.push_str("</header><main>");
    for (i, u) in upstreams.iter().enumerate() {
        let last = u
            .sends
            .iter()
            .flat_map(|(_, at)| at.iter().copied())
            .fold(start as f64, f64::max);
        let span = (last - start as f64).max(1.0);
        let width = ((span / PLAN_BUCKETS as f64).ceil() as i64).max(1);
        let n = (span as i64 / width + 1) as usize;
        let buckets: Vec<i64> = (0..n as i64).map(|b| start + b * width).collect();
        let lines: Vec<Line> = u
            .sends
            .iter()
            .map(|(workflow, at)| {
                let mut values = vec![0.0; n];
                for t in at {
                    let b = ((t - start as f64).max(0.0) as i64 / width) as usize;
                    if let Some(v) = values.get_mut(b.min(n - 1)) {
                        *v += 1.0;
                    }
                }
                Line {
                    name: if workflow.is_empty() {
                        "(no workflow)".into()
                    } else {
                        workflow.clone()
                    },
                    values,
                }
            })
            .collect();
        let _ = write!(
            html,
            "<section class=\"wide\" data-upstream=\"{}\" data-calls=\"{}\"><h2>{}</h2><div class=\"tiles\">",
            escape(&u.name),
            u.calls,
            escape(&u.name)
        );
        tile(&mut html, "", "calls", number(u.calls as f64));
        tile(
            &mut html,
            "",
            "the least time the limits allow",
            crate::format_duration(u.shortest.ceil() as i64),
        );
        tile(
            &mut html,
            "",
            "the limit calls wait for",
            u.binding.clone().unwrap_or_else(|| "none".into()),
        );
        for (limit, peak) in &u.peaks {
            tile(
                &mut html,
                "",
                &format!("peak use of {limit}"),
                format!("{:.0}%", peak * 100.0),
            );
        }
        html.push_str("</div></section>");
        html.push_str(&time_chart(
            &format!("upstream-{i}"),
            &format!(
                "{}: calls per {} by workflow",
                u.name,
                crate::format_duration(width)
            ),
            Style::StackedBars,
            &buckets,
            &lines,
            &time_label(width),
        ));
    }
    html.push_str("</main></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_draws_every_call_once_in_its_workflow() {
        let start = 1_800_000_000;
        let sends = vec![
            (
                "nightly".to_string(),
                (0..500).map(|i| start as f64 + i as f64 * 0.5).collect(),
            ),
            (String::new(), vec![start as f64 + 10.0]),
        ];
        let html = plan(
            "jobs.jsonl",
            start,
            &[PlanUpstream {
                name: "crm".into(),
                calls: 501,
                shortest: 250.0,
                binding: Some("burst".into()),
                peaks: vec![("daily".into(), 0.25)],
                sends,
            }],
        );
        assert!(
            html.contains("data-series=\"nightly\" data-total=\"500\""),
            "{html}"
        );
        assert!(html.contains("data-series=\"(no workflow)\" data-total=\"1\""));
        assert!(html.contains("data-upstream=\"crm\" data-calls=\"501\""));
        assert!(!html.contains("<script") && !html.contains("http-equiv=\"refresh\""));
    }
}
