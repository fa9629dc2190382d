//! The same alerts for teams that run Prometheus and Grafana: alerting
//! rules (`tollgate alerts rules`) and a Grafana dashboard over the metrics
//! (`tollgate dashboard grafana`).

use crate::alerts::{Rule, Signal};
use std::collections::BTreeSet;
use std::fmt::Write;

/// Which faces' metrics a config produces.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faces {
    pub gateway: bool,
    pub comply: bool,
}

/// PromQL of a rule's value, per subject; None when it does not apply.
fn exprs(rule: &Rule, faces: Faces, daily: &BTreeSet<String>) -> Vec<String> {
    let w = promql_duration(rule.window);
    let min = rule.min_calls;
    match &rule.signal {
        Signal::QuotaUsed if faces.comply => daily
            .iter()
            .filter_map(|subject| {
                let (upstream, limit) = subject.split_once('/')?;
                let sel = format!("{{upstream=\"{}\",limit=\"{}\"}}", esc(upstream), esc(limit));
                Some(format!(
                    "100 * (1 - tollgate_upstream_limit_remaining{sel} / tollgate_upstream_limit_quota{sel})"
                ))
            })
            .collect(),
        Signal::Rate429 => {
            let mut out = Vec::new();
            if faces.comply {
                let all = format!("sum by (upstream) (increase(tollgate_upstream_calls_total[{w}]))");
                out.push(format!(
                    "(100 * sum by (upstream) (increase(tollgate_upstream_calls_total{{outcome=\"429\"}}[{w}])) / {all}) and ({all} >= {min})"
                ));
            }
            if faces.gateway {
                let all = format!("sum(increase(tollgate_responses_total[{w}]))");
                out.push(format!(
                    "(100 * sum(increase(tollgate_responses_total{{code=\"429\"}}[{w}])) / {all}) and ({all} >= {min})"
                ));
            }
            out
        }
        Signal::QueueDepth if faces.comply => vec!["sum by (upstream) (tollgate_jobs_pending)".into()],
        Signal::DeadLetters if faces.comply => vec![format!(
            "sum by (upstream) (increase(tollgate_jobs_finished_total{{outcome=\"dead\"}}[{w}]))"
        )],
        Signal::Latency if faces.comply => vec![format!(
            "sum by (upstream) (increase(tollgate_job_seconds_sum[{w}])) / sum by (upstream) (increase(tollgate_job_seconds_count[{w}]))"
        )],
        Signal::Metric { name, by } => {
            let by = by.as_deref().map(|b| format!(" by ({b})")).unwrap_or_default();
            let counter = name.ends_with("_total") || name.ends_with("_sum") || name.ends_with("_count");
            vec![if counter {
                format!("sum{by} (increase({name}[{w}]))")
            } else {
                format!("sum{by} ({name})")
            }]
        }
        _ => Vec::new(),
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Seconds as PromQL writes a duration.
fn promql_duration(seconds: i64) -> String {
    if seconds % 3600 == 0 && seconds > 0 {
        format!("{}h", seconds / 3600)
    } else if seconds % 60 == 0 && seconds > 0 {
        format!("{}m", seconds / 60)
    } else {
        format!("{}s", seconds.max(1))
    }
}

/// `UpperCamel` alert names: `queue_depth` as `TollgateQueueDepth`.
fn alert_name(name: &str) -> String {
    let mut out = String::from("Tollgate");
    for part in name.split(|c: char| !c.is_ascii_alphanumeric()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    out
}

/// A YAML double-quoted string.
fn yaml(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

/// Prometheus alerting rules for `rules` (one group, a warning and a
/// critical rule per alert and subject expression).
pub fn prometheus_rules(rules: &[Rule], faces: Faces, daily: &BTreeSet<String>) -> String {
    let mut out = String::from(
        "# tollgate's alerts as Prometheus alerting rules (tollgate alerts rules).\n\
# Check them with: promtool check rules FILE\ngroups:\n  - name: tollgate\n    rules:\n",
    );
    let mut any = false;
    for rule in rules {
        for expr in exprs(rule, faces, daily) {
            for (severity, threshold) in [("warning", rule.warning), ("critical", rule.critical)] {
                if !threshold.is_finite() {
                    continue;
                }
                any = true;
                let _ = write!(
                    out,
                    "      - alert: {}\n        expr: {}\n        labels:\n          severity: {severity}\n        annotations:\n          summary: {}\n",
                    alert_name(&rule.name),
                    yaml(&format!("({expr}) > {threshold}")),
                    yaml(&format!(
                        "{} {{{{ $labels.upstream }}}}{{{{ $labels.limit }}}}: {{{{ $value | printf \"%.2f\" }}}}{} (above {threshold}{})",
                        rule.name, rule.unit, rule.unit
                    )),
                );
            }
        }
    }
    if !any {
        out.push_str("      []\n");
    }
    out
}

/// A Grafana dashboard (JSON model, Prometheus data source chosen on
/// import) with the dashboard page's charts over the same metrics.
pub fn grafana_dashboard() -> serde_json::Value {
    let panel =
        |id: u32, title: &str, kind: &str, exprs: &[(&str, &str)], stack: bool, x: u32, y: u32| {
            let targets: Vec<serde_json::Value> = exprs
                .iter()
                .enumerate()
                .map(|(i, (expr, legend))| {
                    serde_json::json!({
                        "refId": char::from(b'A' + i as u8).to_string(),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": { "type": "prometheus", "uid": "${datasource}" },
                    })
                })
                .collect();
            let mut custom =
                serde_json::json!({ "drawStyle": if kind == "bars" { "bars" } else { "line" } });
            if stack {
                custom["stacking"] = serde_json::json!({ "mode": "normal" });
                custom["fillOpacity"] = serde_json::json!(50);
            }
            serde_json::json!({
                "id": id,
                "type": if kind == "bargauge" { "bargauge" } else { "timeseries" },
                "title": title,
                "datasource": { "type": "prometheus", "uid": "${datasource}" },
                "gridPos": { "h": 8, "w": 12, "x": x, "y": y },
                "fieldConfig": { "defaults": { "custom": custom }, "overrides": [] },
                "targets": targets,
            })
        };
    let panels = vec![
        panel(1, "Calls per upstream per hour", "line",
            &[("sum by (upstream) (increase(tollgate_upstream_calls_total[1h]))", "{{upstream}}")], false, 0, 0),
        panel(2, "Errors by upstream and type", "bars",
            &[("sum by (upstream, outcome) (increase(tollgate_upstream_calls_total{outcome=~\"4xx|429|5xx|network_error\"}[1h]))", "{{upstream}} {{outcome}}")], true, 12, 0),
        panel(3, "Queue depth (jobs not yet final)", "line",
            &[("sum by (upstream) (tollgate_jobs_pending)", "{{upstream}}"), ("sum by (upstream) (tollgate_proxy_waiting)", "{{upstream}} (live)")], true, 0, 8),
        panel(4, "Quota used now (%)", "bargauge",
            &[("100 * (1 - tollgate_upstream_limit_remaining / tollgate_upstream_limit_quota)", "{{upstream}} {{limit}}"), ("100 * (1 - tollgate_upstream_key_limit_remaining / tollgate_upstream_key_limit_quota)", "{{upstream}} {{limit}} key {{key}}")], false, 12, 8),
        panel(5, "Average queued to done (s), 15 min", "line",
            &[("sum by (upstream) (increase(tollgate_job_seconds_sum[15m])) / sum by (upstream) (increase(tollgate_job_seconds_count[15m]))", "{{upstream}}")], false, 0, 16),
        panel(6, "Gateway: responses by status", "line",
            &[("sum by (code) (rate(tollgate_responses_total[5m]))", "{{code}}")], false, 12, 16),
        panel(7, "Gateway: denials and holds by limit", "bars",
            &[("sum by (limit) (increase(tollgate_decisions_total{outcome=\"denied\"}[1h]))", "{{limit}} denied"), ("sum by (limit) (increase(tollgate_decisions_total{outcome=\"held\"}[1h]))", "{{limit}} held")], true, 0, 24),
        panel(8, "Gateway: requests held now", "line",
            &[("sum(tollgate_held)", "held")], true, 12, 24),
    ];
    serde_json::json!({
        "title": "tollgate",
        "uid": "tollgate",
        "tags": ["tollgate", "rate-limits"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": { "from": "now-48h", "to": "now" },
        "templating": { "list": [{
            "name": "datasource",
            "type": "datasource",
            "query": "prometheus",
            "label": "Prometheus",
        }]},
        "panels": panels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_default_becomes_a_warning_and_a_critical_rule() {
        let daily: BTreeSet<String> = ["crm/daily".to_string()].into();
        let text = prometheus_rules(
            &Rule::defaults(),
            Faces {
                gateway: true,
                comply: true,
            },
            &daily,
        );
        for name in [
            "TollgateQuotaUsed",
            "TollgateRate429",
            "TollgateQueueDepth",
            "TollgateDeadLetters",
            "TollgateLatency",
        ] {
            assert_eq!(
                text.matches(&format!("alert: {name}\n")).count() % 2,
                0,
                "{name}"
            );
            assert!(text.contains(&format!("alert: {name}\n")), "{name}");
        }
        assert!(text.contains("expr: \"(sum by (upstream) (tollgate_jobs_pending)) > 10000\""));
        assert!(text.contains("limit=\\\"daily\\\""));
        let gateway_only = prometheus_rules(
            &Rule::defaults(),
            Faces {
                gateway: true,
                comply: false,
            },
            &daily,
        );
        assert!(!gateway_only.contains("TollgateQueueDepth"));
        assert!(gateway_only.contains("tollgate_responses_total"));
    }

    #[test]
    fn the_grafana_dashboard_queries_the_metrics_the_page_draws() {
        let d = grafana_dashboard();
        let exprs: Vec<String> = d["panels"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t["expr"].as_str().map(str::to_string))
            .collect();
        for metric in [
            "tollgate_upstream_calls_total",
            "tollgate_jobs_pending",
            "tollgate_upstream_limit_remaining",
            "tollgate_decisions_total",
            "tollgate_held",
        ] {
            assert!(exprs.iter().any(|e| e.contains(metric)), "{metric}");
        }
    }
}
