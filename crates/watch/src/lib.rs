//! What tollgate shows and warns about, the same way on every face (`serve`,
//! `proxy`, `run --admin`): each face's own `/metrics` scraped every few
//! seconds into a history that survives a restart, alerts evaluated on
//! that history, and the dashboard drawn from it at `/` of the admin
//! listener.
//!
//! A face only gives its metrics' text (and, for the gateway, its busiest
//! keys); everything else is here, so a chart, an alert and `/metrics`
//! always agree.

pub mod admin;
pub mod alerts;
pub mod dashboard;
pub mod history;
pub mod notify;
pub mod persist;
pub mod report;
pub mod rules;
pub mod sample;
pub mod settings;
pub mod svg;

use alerts::{Alerts, Event};
use dashboard::{Extras, Face, Range};
use history::History;
use parking_lot::Mutex;
use persist::HistoryFile;
use settings::WatchSettings;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The history file's name inside a state directory.
pub const HISTORY_FILE: &str = "history.sqlite";

/// One face's history, alerts and dashboard.
#[derive(Debug)]
pub struct Watch {
    face: Face,
    history: Mutex<History>,
    alerts: Mutex<Alerts>,
    file: Option<Mutex<HistoryFile>>,
    notifier: notify::Notifier,
    every: Duration,
}

impl Watch {
    /// A face's watch: history kept in `settings`' `[history] path`, or in
    /// `HISTORY_FILE` under `state_dir` when it names none (memory only when
    /// neither does); what it held is read back. `daily` names the limits
    /// (`upstream/limit`) whose quota is per day or longer.
    pub fn open(
        face: Face,
        settings: &WatchSettings,
        state_dir: Option<&Path>,
        daily: BTreeSet<String>,
        now: i64,
    ) -> Result<Watch, String> {
        let path: Option<PathBuf> = match &settings.history_path {
            Some(explicit) => explicit.clone(),
            None => state_dir.map(|d| d.join(HISTORY_FILE)),
        };
        let mut history = History::default();
        let file = match path {
            None => None,
            Some(path) => {
                let file = HistoryFile::open(&path).map_err(|e| e.to_string())?;
                history.restore(file.load(now).map_err(|e| e.to_string())?, now);
                Some(Mutex::new(file))
            }
        };
        let notifier = notify::Notifier::new(settings.webhooks.clone(), Default::default())?;
        Ok(Watch {
            face,
            history: Mutex::new(history),
            alerts: Mutex::new(Alerts::new(settings.rules.clone(), daily)),
            file,
            notifier,
            every: Duration::from_secs(settings.every),
        })
    }

    /// The same watch, its webhooks retried so (tests: short waits).
    pub fn with_retries(
        mut self,
        retries: tollgate_http::webhook::Retries,
    ) -> Result<Watch, String> {
        self.notifier = self.notifier.with_retries(retries)?;
        Ok(self)
    }

    pub fn face(&self) -> Face {
        self.face
    }

    /// Record the scrape `metrics` (the face's `/metrics` text) taken at
    /// `now` (Unix seconds), evaluate the alerts, send what fired or
    /// resolved, and write what changed to the history file.
    pub fn tick(&self, now: i64, metrics: &str) -> Vec<Event> {
        let samples = sample::parse(metrics);
        let (events, changed) = {
            let mut history = self.history.lock();
            history.record(now, samples);
            let events = self.alerts.lock().evaluate(&history, now);
            (events, history.take_changed())
        };
        self.notifier.send(&events);
        if let Some(file) = &self.file {
            if let Err(e) = file.lock().save(&changed, now) {
                tracing::warn!("history not written: {e}");
            }
        }
        events
    }

    /// Scrape `metrics()` every `[history] every` until the task is
    /// dropped (at once when it is "off").
    pub async fn run(self: Arc<Self>, metrics: impl Fn() -> String + Send + 'static) {
        if self.every.is_zero() {
            return;
        }
        let mut every = tokio::time::interval(self.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.tick(unix_now(), &metrics());
        }
    }

    /// Limits whose quota is per day or longer, after a reload.
    pub fn set_daily(&self, daily: BTreeSet<String>) {
        self.alerts.lock().daily = daily;
    }

    /// The dashboard page for `?range=`.
    pub fn page(&self, now: i64, range: Option<&str>, extras: &Extras) -> String {
        let history = self.history.lock();
        let alerts = self.alerts.lock();
        dashboard::page(
            self.face,
            &history,
            &alerts,
            extras,
            Range::named(range),
            now,
        )
    }

    /// `GET /v1/alerts`: what fires now, the last events, and the rules.
    pub fn alerts_json(&self) -> serde_json::Value {
        let alerts = self.alerts.lock();
        let rules: Vec<serde_json::Value> = alerts
            .rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "warning": finite(r.warning),
                    "critical": finite(r.critical),
                    "window_seconds": r.window,
                })
            })
            .collect();
        serde_json::json!({
            "active": alerts.active(),
            "recent": alerts.recent().collect::<Vec<_>>(),
            "rules": rules,
        })
    }

    /// Series kept, and series not kept because too many were.
    pub fn series(&self) -> (usize, usize) {
        let h = self.history.lock();
        (h.len(), h.dropped)
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `90` as "1m30s", `900` as "15m", `86400` as "24h".
pub fn format_duration(seconds: i64) -> String {
    let (h, m, s) = (seconds / 3600, (seconds % 3600) / 60, seconds % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}
