//! The config tables every face reads the same way: `[history]`,
//! `[alerts]` (where alerts go) and `[[alert]]` (a default's thresholds
//! changed, or an alert added on any series of `/metrics`).

use crate::alerts::{Rule, Signal};
use crate::notify::{Format, Webhook};
use serde::Deserialize;
use std::path::PathBuf;
use tollgate_core::config::line_of;
use toml::Spanned;

/// What `[history]`, `[alerts]` and `[[alert]]` say.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchSettings {
    /// Where history is kept: None for the face's default, `Some(None)` for
    /// in memory only (`path = "off"`).
    pub history_path: Option<Option<PathBuf>>,
    /// Seconds between two scrapes of the face's own metrics; 0: none in
    /// the background (`every = "off"`: the page still records when it is
    /// viewed, and alerts are only evaluated then).
    pub every: u64,
    pub rules: Vec<Rule>,
    pub webhooks: Vec<Webhook>,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            history_path: None,
            every: 10,
            rules: Rule::defaults(),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
struct RawFile {
    history: Option<RawHistory>,
    alerts: Option<RawAlerts>,
    #[serde(default)]
    alert: Vec<Spanned<RawAlert>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    path: Option<String>,
    every: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    #[serde(default)]
    webhook: Vec<Spanned<RawWebhook>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Option<String>,
    url_env: Option<String>,
    format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    name: String,
    metric: Option<String>,
    by: Option<String>,
    warning: Option<f64>,
    critical: Option<f64>,
    window: Option<String>,
    min_calls: Option<f64>,
    enabled: Option<bool>,
}

impl WatchSettings {
    /// Read the tables from a config's text; `env` resolves `url_env`.
    /// Errors name the line and the field.
    pub fn parse(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<WatchSettings, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            format!("line {line}: {}", e.message())
        })?;
        let mut s = WatchSettings::default();
        if let Some(h) = raw.history {
            if let Some(path) = h.path {
                s.history_path = Some(match path.as_str() {
                    "off" | "" => None,
                    _ => Some(PathBuf::from(path)),
                });
            }
            match h.every {
                Some(every) if every.get_ref() == "off" => s.every = 0,
                Some(every) => {
                    let line = line_of(text, every.span().start);
                    let nanos = tollgate_core::units::parse_duration(every.get_ref())
                        .map_err(|e| format!("line {line}: [history] every: {e}"))?;
                    let secs = nanos / 1_000_000_000;
                    if !(1..=3600).contains(&secs) {
                        return Err(format!(
                            "line {line}: [history] every must be between 1s and 1h (or \"off\")"
                        ));
                    }
                    s.every = secs;
                }
                None => {}
            }
        }
        for hook in raw.alerts.map(|a| a.webhook).unwrap_or_default() {
            let line = line_of(text, hook.span().start);
            let hook = hook.into_inner();
            let url = match (hook.url, hook.url_env) {
                (Some(url), None) => url,
                (None, Some(var)) => env(&var).ok_or_else(|| {
                    format!("line {line}: [[alerts.webhook]] url_env: environment variable {var} is not set")
                })?,
                _ => {
                    return Err(format!(
                        "line {line}: [[alerts.webhook]] needs url or url_env (one of them)"
                    ))
                }
            };
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.parse::<hyper::Uri>().is_err()
            {
                return Err(format!(
                    "line {line}: [[alerts.webhook]] url must be an http:// or https:// URL"
                ));
            }
            let format = match hook.format.as_deref() {
                None | Some("json") => Format::Json,
                Some("slack") => Format::Slack,
                Some(other) => {
                    return Err(format!(
                        "line {line}: [[alerts.webhook]] format '{other}' is not one of json, slack"
                    ))
                }
            };
            s.webhooks.push(Webhook { url, format });
        }
        for alert in raw.alert {
            let line = line_of(text, alert.span().start);
            let a = alert.into_inner();
            let at = |field: &str, m: String| {
                format!("line {line}: [[alert]] '{}' {field}: {m}", a.name)
            };
            let existing = s.rules.iter().position(|r| r.name == a.name);
            if a.enabled == Some(false) {
                match existing {
                    Some(i) => {
                        s.rules.remove(i);
                        continue;
                    }
                    None => return Err(at("enabled", "only a default alert can be turned off (quota_used, rate_429, queue_depth, dead_letters, latency)".into())),
                }
            }
            let mut rule = match (existing, &a.metric) {
                (Some(_), Some(_)) => {
                    return Err(at("metric", "a default alert's metric cannot change; give a new alert another name".into()))
                }
                (Some(i), None) => s.rules[i].clone(),
                (None, Some(metric)) => {
                    if metric.is_empty() || !metric.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                        return Err(at("metric", format!("'{metric}' is not a metric name (as /metrics writes it, e.g. tollgate_proxy_waiting)")));
                    }
                    Rule {
                        name: a.name.clone(),
                        signal: Signal::Metric { name: metric.clone(), by: a.by.clone() },
                        warning: f64::INFINITY,
                        critical: f64::INFINITY,
                        window: 15 * 60,
                        min_calls: 0.0,
                        unit: "",
                    }
                }
                (None, None) => {
                    return Err(at("name", "is not a default alert (quota_used, rate_429, queue_depth, dead_letters, latency); a new alert needs metric".into()))
                }
            };
            if a.by.is_some() && existing.is_some() {
                return Err(at(
                    "by",
                    "only an alert with its own metric takes by".into(),
                ));
            }
            for (field, value) in [
                ("warning", a.warning),
                ("critical", a.critical),
                ("min_calls", a.min_calls),
            ] {
                if let Some(v) = value {
                    if !v.is_finite() || v < 0.0 {
                        return Err(at(field, format!("must be a number 0 or above, not {v}")));
                    }
                }
            }
            if let Some(v) = a.warning {
                rule.warning = v;
            }
            if let Some(v) = a.critical {
                rule.critical = v;
            }
            if let Some(v) = a.min_calls {
                rule.min_calls = v;
            }
            if let Some(w) = &a.window {
                let nanos = tollgate_core::units::parse_duration(w).map_err(|e| at("window", e))?;
                let secs = (nanos / 1_000_000_000) as i64;
                if !(60..=48 * 3600).contains(&secs) {
                    return Err(at(
                        "window",
                        "must be between 1m and 48h (history keeps minutes for 48 hours)".into(),
                    ));
                }
                rule.window = secs;
            }
            if rule.warning.is_infinite() && rule.critical.is_infinite() {
                return Err(at(
                    "warning",
                    "a new alert needs warning or critical (or both)".into(),
                ));
            }
            if rule.critical < rule.warning && rule.warning.is_finite() && rule.critical.is_finite()
            {
                return Err(at(
                    "critical",
                    format!("({}) is below warning ({})", rule.critical, rule.warning),
                ));
            }
            match existing {
                Some(i) => s.rules[i] = rule,
                None => s.rules.push(rule),
            }
        }
        Ok(s)
    }
}

/// Hide what a config's text holds that `/v1/config` must not show: each
/// webhook's URL (Slack's are secrets) down to its scheme and host, and the
/// password in `[store] url`.
pub fn hide_secrets(doc: &mut toml_edit::DocumentMut) {
    let host_only = |url: &mut toml_edit::Value| {
        if let Some(text) = url.as_str() {
            let hidden = crate::notify::Webhook {
                url: text.to_string(),
                format: crate::notify::Format::Json,
            }
            .scheme_and_host();
            *url = toml_edit::Value::from(hidden);
        }
    };
    if let Some(alerts) = doc.get_mut("alerts").and_then(|a| a.as_table_like_mut()) {
        match alerts.get_mut("webhook") {
            Some(toml_edit::Item::ArrayOfTables(hooks)) => {
                for hook in hooks.iter_mut() {
                    if let Some(url) = hook.get_mut("url").and_then(|u| u.as_value_mut()) {
                        host_only(url);
                    }
                }
            }
            Some(toml_edit::Item::Value(toml_edit::Value::Array(hooks))) => {
                for hook in hooks.iter_mut() {
                    if let Some(url) = hook.as_inline_table_mut().and_then(|h| h.get_mut("url")) {
                        host_only(url);
                    }
                }
            }
            _ => {}
        }
    }
    let url = doc
        .get_mut("store")
        .and_then(|s| s.as_table_like_mut())
        .and_then(|s| s.get_mut("url"));
    if let Some(url) = url {
        if let Some(written) = url.as_str().map(tollgate_store::redis::redacted) {
            *url = toml_edit::value(written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WatchSettings, String> {
        WatchSettings::parse(text, &|v| {
            (v == "HOOK").then(|| "https://hooks.slack.com/services/X".to_string())
        })
    }

    #[test]
    fn defaults_are_changed_turned_off_and_added_to() {
        let s = parse(
            "[history]\npath = \"off\"\nevery = \"5s\"\n\
[[alerts.webhook]]\nurl_env = \"HOOK\"\nformat = \"slack\"\n\
[[alerts.webhook]]\nurl = \"http://127.0.0.1:9/alerts\"\n\
[[alert]]\nname = \"queue_depth\"\nwarning = 10\ncritical = 20\n\
[[alert]]\nname = \"latency\"\nenabled = false\n\
[[alert]]\nname = \"waiting\"\nmetric = \"tollgate_proxy_waiting\"\nby = \"upstream\"\ncritical = 100\n",
        )
        .expect("parses");
        assert_eq!(s.history_path, Some(None));
        assert_eq!(s.every, 5);
        assert_eq!(s.webhooks.len(), 2);
        assert_eq!(s.webhooks[0].format, Format::Slack);
        let names: Vec<&str> = s.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "quota_used",
                "rate_429",
                "queue_depth",
                "dead_letters",
                "waiting"
            ]
        );
        assert_eq!((s.rules[2].warning, s.rules[2].critical), (10.0, 20.0));
        assert!(s.rules[4].warning.is_infinite());
    }

    #[test]
    fn shown_configs_hide_webhook_urls_and_the_store_password() {
        let text = "[store]\nkind = \"redis\"\nurl = \"redis://:hunter2@10.0.0.5:6379/0\"\n\
[[alerts.webhook]]\nurl = \"https://hooks.slack.com/services/T0/B0/SECRET\"\nformat = \"slack\"\n";
        let mut doc: toml_edit::DocumentMut = text.parse().expect("toml");
        hide_secrets(&mut doc);
        let shown = doc.to_string();
        assert!(
            !shown.contains("SECRET") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("https://hooks.slack.com/…"), "{shown}");
        let mut inline: toml_edit::DocumentMut =
            "[alerts]\nwebhook = [{ url = \"http://u:p@10.1.1.1:9000/hook?t=x\" }]\n"
                .parse()
                .expect("toml");
        hide_secrets(&mut inline);
        assert!(
            inline.to_string().contains("\"http://10.1.1.1:9000/…\""),
            "{inline}"
        );
    }

    #[test]
    fn bad_tables_are_refused_naming_the_line_and_field() {
        for (text, error) in [
            (
                "[[alert]]\nname = \"nope\"\nwarning = 1\n",
                "line 1: [[alert]] 'nope' name: is not a default alert",
            ),
            (
                "\n[[alert]]\nname = \"queue_depth\"\nwarning = -5\n",
                "line 2: [[alert]] 'queue_depth' warning: must be a number 0 or above, not -5",
            ),
            (
                "[[alert]]\nname = \"queue_depth\"\nwarning = 50\ncritical = 10\n",
                "critical: (10) is below warning (50)",
            ),
            (
                "[[alert]]\nname = \"x\"\nmetric = \"a b\"\nwarning = 1\n",
                "metric: 'a b' is not a metric name",
            ),
            (
                "[[alert]]\nname = \"rate_429\"\nwindow = \"3d\"\n",
                "window: must be between 1m and 48h",
            ),
            (
                "[[alerts.webhook]]\nurl_env = \"UNSET\"\n",
                "url_env: environment variable UNSET is not set",
            ),
            (
                "[[alerts.webhook]]\nurl = \"ftp://x\"\n",
                "url must be an http:// or https:// URL",
            ),
            (
                "[[alerts.webhook]]\nurl = \"http://x\"\nformat = \"teams\"\n",
                "format 'teams' is not one of json, slack",
            ),
            (
                "[history]\nevery = \"0s\"\n",
                "line 2: [history] every must be between 1s and 1h",
            ),
            (
                "[[alert]]\nname = \"queue_depth\"\nwarnin = 5\n",
                "unknown field `warnin`",
            ),
        ] {
            let got = parse(text).expect_err(text);
            assert!(got.contains(error), "{text:?}: {got}");
        }
    }
}
