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
use history::{History, Resolution};
use parking_lot::Mutex;
use persist::HistoryFile;
use settings::WatchSettings;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The history file's name inside a state directory (`run` and `proxy`,
/// which never share one state at once).
pub const HISTORY_FILE: &str = "history.sqlite";
/// `serve`'s, so a gateway and a proxy started in one directory keep
/// their own.
pub const GATEWAY_HISTORY_FILE: &str = "history-serve.sqlite";

/// One face's history, alerts and dashboard.
#[derive(Debug)]
pub struct Watch {
    face: Face,
    history: Mutex<History>,
    alerts: Mutex<Alerts>,
    file: Option<Mutex<HistoryFile>>,
    notifier: notify::Notifier,
    every: Duration,
    /// Fleet mode: the fleet's history on Redis, and what this process
    /// changed since it last wrote there.
    fleet: Option<Fleet>,
}

#[derive(Debug)]
struct Fleet {
    store: tollgate_store::redis::FleetHistory,
    /// This process among the fleet's (host, pid, start).
    node: String,
    unsent: Mutex<Vec<history::Row>>,
}

/// Rows kept for Redis while it is down; past this the oldest go (the
/// local history and file keep them).
const MAX_UNSENT: usize = 200_000;

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
        let (path, explicit): (Option<PathBuf>, bool) = match &settings.history_path {
            Some(path) => (path.clone(), true),
            None => {
                let name = match face {
                    Face::Gateway => GATEWAY_HISTORY_FILE,
                    Face::Proxy | Face::Run => HISTORY_FILE,
                };
                (state_dir.map(|d| d.join(name)), false)
            }
        };
        let mut history = History::default();
        let opened = path.map(|path| -> Result<HistoryFile, String> {
            let file = HistoryFile::open(&path).map_err(|e| e.to_string())?;
            history.restore(file.load(now).map_err(|e| e.to_string())?, now);
            Ok(file)
        });
        let file = match opened {
            None => None,
            Some(Ok(file)) => Some(Mutex::new(file)),
            Some(Err(e)) if explicit => return Err(e),
            // The default place is not writable (a read-only directory):
            // the dashboard still works, its history lasts until a restart.
            Some(Err(e)) => {
                tracing::warn!("{e}; history kept in memory only (set [history] path to keep it)");
                None
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
            fleet: None,
        })
    }

    /// Fleet mode: also keep the history in the fleet's Redis (`[store]`),
    /// and draw pages from every node's.
    pub fn with_fleet(
        mut self,
        store: &tollgate_core::policy::RedisSettings,
    ) -> Result<Watch, String> {
        let store = tollgate_store::redis::FleetHistory::new(store).map_err(|e| e.to_string())?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "node".into());
        let fresh = || format!("{host}:{}:{}", std::process::id(), unix_now());
        let node = match &self.file {
            // (kept in the history file: a restart writes over what it restored)
            Some(file) => file.lock().node(fresh).map_err(|e| e.to_string())?,
            None => fresh(),
        };
        self.fleet = Some(Fleet {
            store,
            node,
            unsent: Mutex::new(Vec::new()),
        });
        Ok(self)
    }

    /// The same watch, its webhooks retried so (tests: short waits).
    pub fn with_retries(
        mut self,
        retries: tollgate_http::webhook::Retries,
    ) -> Result<Watch, String> {
        self.notifier = self.notifier.with_retries(retries)?;
        Ok(self)
    }

    /// Record the scrape `metrics()` (the face's `/metrics` text) taken at
    /// `now` (Unix seconds), evaluate the alerts, send what fired or
    /// resolved, and write what changed to the history file. The text is
    /// taken under the history's lock, so two scrapes (the page's and the
    /// background's) are recorded in the order they were taken.
    pub fn tick(&self, now: i64, metrics: impl FnOnce() -> String) -> Vec<Event> {
        let (events, changed, file) = {
            let mut history = self.history.lock();
            history.record(now, sample::parse(&metrics()));
            let events = self.alerts.lock().evaluate(&history, now);
            // (the file's lock before the history's goes: saves keep the order)
            let file = self.file.as_ref().map(|f| f.lock());
            (events, history.take_changed(), file)
        };
        self.notifier.send(&events);
        if let Some(mut file) = file {
            if let Err(e) = file.save(&changed, now) {
                tracing::warn!("history not written: {e}");
            }
        }
        if let Some(fleet) = &self.fleet {
            let mut unsent = fleet.unsent.lock();
            unsent.extend(changed);
            if unsent.len() > MAX_UNSENT {
                let over = unsent.len() - MAX_UNSENT;
                unsent.drain(..over);
            }
        }
        events
    }

    /// Fleet mode: write what changed here to the fleet's Redis.
    pub async fn send_to_fleet(&self) {
        let Some(fleet) = &self.fleet else { return };
        let rows = std::mem::take(&mut *fleet.unsent.lock());
        if rows.is_empty() {
            return;
        }
        let written: Vec<(i64, i64, &str, &str, f64)> = rows
            .iter()
            .map(|r| {
                (
                    r.resolution.code(),
                    r.bucket,
                    r.kind.as_str(),
                    r.key.as_str(),
                    r.value,
                )
            })
            .collect();
        let keep =
            Resolution::ALL.map(|r| Duration::from_secs((r.kept() * r.seconds() + 3600) as u64));
        if let Err(e) = fleet.store.write(&fleet.node, &written, keep).await {
            tracing::warn!("history not written to the fleet's store (kept for the next try): {e}");
            let mut unsent = fleet.unsent.lock();
            let newer = std::mem::replace(&mut *unsent, rows);
            unsent.extend(newer);
        }
    }

    /// Scrape `metrics()` every `[history] every` until the task is
    /// dropped (at once when it is "off").
    /// Each scrape runs on a blocking thread (it writes SQLite), never on
    /// the runtime serving requests.
    pub async fn run(self: Arc<Self>, metrics: impl Fn() -> String + Send + Sync + 'static) {
        if self.every.is_zero() {
            return;
        }
        let metrics = Arc::new(metrics);
        let mut every = tokio::time::interval(self.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let (watch, metrics) = (self.clone(), metrics.clone());
            let _ = tokio::task::spawn_blocking(move || watch.tick(unix_now(), || metrics())).await;
            self.send_to_fleet().await;
        }
    }

    /// Limits whose quota is per day or longer, after a reload.
    pub fn set_daily(&self, daily: BTreeSet<String>) {
        self.alerts.lock().daily = daily;
    }

    /// The dashboard page for `?range=`: this process's history, or in
    /// fleet mode every node's (this one's when the fleet's store does not
    /// answer, and the page says so). Drawn on a blocking thread.
    pub async fn page(self: &Arc<Self>, now: i64, range: Option<&str>, extras: Extras) -> String {
        let range = Range::named(range);
        let watch = self.clone();
        let Some(fleet) = &self.fleet else {
            return tokio::task::spawn_blocking(move || {
                let history = watch.history.lock();
                let alerts = watch.alerts.lock();
                dashboard::page(watch.face, &history, &alerts, &extras, range, now)
            })
            .await
            .unwrap_or_default();
        };
        self.send_to_fleet().await;
        let fleet_wide = fleet_history(&fleet.store, &range, now).await;
        tokio::task::spawn_blocking(move || {
            let (history, listen) = match fleet_wide {
                Ok(history) => (history, format!("{} · the fleet", extras.listen)),
                Err(e) => {
                    tracing::warn!("the dashboard shows this node only: {e}");
                    let mut own = History::default();
                    own.restore(watch.history.lock().rows(), now);
                    (
                        own,
                        format!(
                            "{} · this node only (the fleet's store: {e})",
                            extras.listen
                        ),
                    )
                }
            };
            let extras = Extras { listen, ..extras };
            let alerts = watch.alerts.lock();
            dashboard::page(watch.face, &history, &alerts, &extras, range, now)
        })
        .await
        .unwrap_or_default()
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
}

/// Every node's history for a page of `range`: its buckets and the tiles'
/// (a few dozen hashes besides the range's), each series added up over
/// the nodes, but figures every node reads alike from the shared store (a
/// limit's remaining and quota, a pace) taken once (the largest).
async fn fleet_history(
    store: &tollgate_store::redis::FleetHistory,
    range: &Range,
    now: i64,
) -> Result<History, tollgate_store::redis::RedisError> {
    // The range's buckets, and what the tiles read besides: the last 15
    // minutes by the minute (latency, gauges now), the last day by the
    // hour (dead letters).
    let (other, seconds) = match range.resolution {
        Resolution::Hour => (Resolution::Minute, 15 * 60),
        Resolution::Minute => (Resolution::Hour, 25 * 3600),
    };
    let tiles = Range {
        name: "tiles",
        seconds,
        resolution: other,
    };
    let wanted = [
        (range.resolution, range.buckets(now)),
        (other, tiles.buckets(now)),
    ];
    let mut merged: std::collections::BTreeMap<(Resolution, i64, String), (sample::Kind, f64)> =
        Default::default();
    for (resolution, buckets) in wanted {
        for (bucket, row) in store.read(resolution.code(), &buckets).await? {
            let Some(kind) = sample::Kind::parse(&row.kind) else {
                continue;
            };
            let shared = kind == sample::Kind::Gauge
                && (row.series.starts_with("tollgate_upstream_limit_")
                    || row.series.starts_with("tollgate_upstream_key_limit_")
                    || row.series.starts_with("tollgate_upstream_effective_rate")
                    || row.series.starts_with("tollgate_upstream_limits_rate"));
            let slot = merged
                .entry((resolution, bucket, row.series))
                .or_insert((kind, if shared { f64::MIN } else { 0.0 }));
            slot.1 = if shared {
                slot.1.max(row.value)
            } else {
                slot.1 + row.value
            };
        }
    }
    let mut history = History::default();
    history.restore(
        merged
            .into_iter()
            .map(|((resolution, bucket, key), (kind, value))| history::Row {
                key,
                kind,
                resolution,
                bucket,
                value,
            }),
        now,
    );
    Ok(history)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_default_place_keeps_history_in_memory_but_a_named_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tollgate-watch-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // A file where the state directory would be.
        let blocked = dir.join("state");
        std::fs::write(&blocked, "").expect("file");
        let settings = WatchSettings::default();
        let watch = Watch::open(
            Face::Gateway,
            &settings,
            Some(&blocked),
            Default::default(),
            0,
        )
        .expect("the default place may fail");
        assert!(watch.file.is_none());
        let named = WatchSettings {
            history_path: Some(Some(blocked.join(HISTORY_FILE))),
            ..WatchSettings::default()
        };
        let error = Watch::open(Face::Gateway, &named, None, Default::default(), 0)
            .expect_err("a path the config names must work");
        assert!(error.contains("history file"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
