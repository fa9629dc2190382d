//! The gateway's shared state: the config in force (a `Generation`, swapped
//! whole on reload), the clock, the upstream connections, metrics and bounds.

use crate::metrics::{LimitCounters, Metrics};
use crate::settings::{Settings, Upstream};
use crate::upstream::WorkerUpstreams;
use arc_swap::ArcSwap;
use hyper::header::HeaderName;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;
use tollgate_core::carry::{Carry, FreshLimit};
use tollgate_core::config::{ConfigError, LoadError};
use tollgate_core::policy::{Cost, KeyPart};
use tollgate_core::{Item, ProfileSource};
use tollgate_http::ratelimit::PolicyItems;
use tollgate_http::refusal::RateLimitedAnswers;
use tollgate_http::{AccessLogger, RequestIds};
use tollgate_store::Engine;
use tollgate_store::Holds;
use tollgate_store::TokioClock;

/// Where the config comes from; read again on every reload.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// `--profile NAME`: the bundled profile alone.
    Profile(String),
    /// Text given directly (tests, embedding).
    Text(String),
}

/// Settings given on the command line; they win over the file's on every load.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub upstream: Option<Upstream>,
    pub access_log: Option<crate::settings::AccessLog>,
    /// Where the dashboard's history is kept when `[history] path` names
    /// no file (`tollgate serve`: `.tollgate`); None: in memory only.
    pub history_dir: Option<std::path::PathBuf>,
}

/// Everything read from one version of the config.
#[derive(Debug)]
pub struct Generation {
    /// Shared with the admissions of requests still finishing on it.
    pub engine: Arc<Engine>,
    pub settings: Settings,
    pub text: String,
    pub loaded_at: jiff::Timestamp,
    pub policy_items: PolicyItems,
    /// Each limit's 429, made ahead.
    pub rate_limited: RateLimitedAnswers,
    pub counters: Vec<LimitCounters>,
    /// Some limit's cost reads the JSON body.
    pub reads_body: bool,
    /// Headers read for keys and costs: their values must be visible ASCII.
    pub read_headers: Vec<HeaderName>,
}

/// A `/v1/check` decision waiting for its `/v1/report`.
#[derive(Debug)]
pub struct PendingCheck {
    pub generation: Arc<Generation>,
    pub items: Vec<Item>,
    pub created: tokio::time::Instant,
    /// Decided in process (Redis was down): settled in process.
    pub local: bool,
}

/// Most checks waiting for a report; past it `/v1/check` of latency or
/// concurrency limits answers 503.
pub const MAX_PENDING_CHECKS: usize = 100_000;

/// Most worker threads (`serve_workers`); more share upstreams round robin.
pub const MAX_WORKERS: usize = 64;

pub struct Gateway {
    current: ArcSwap<Generation>,
    source: Source,
    overrides: Overrides,
    profiles: Box<dyn ProfileSource + Send + Sync>,
    pub clock: TokioClock,
    /// The upstream connections of each worker thread, so a worker's
    /// requests use connections driven on its own runtime.
    upstreams: Box<[Arc<WorkerUpstreams>]>,
    pub metrics: Metrics,
    pub holds: Arc<Holds>,
    pub access: AccessLogger,
    pub admin_token: Option<String>,
    ids: RequestIds,
    pub pending: Mutex<HashMap<String, PendingCheck>>,
    reload_lock: tokio::sync::Mutex<Option<SystemTime>>,
    /// `[gateway] tls`: the certificate the listener presents (a restart
    /// turns TLS on or off; a reload or a change of the files replaces it).
    pub tls: Option<Arc<tollgate_http::tls::Certificates>>,
    /// History, alerts and the dashboard of the admin listener.
    pub watch: Arc<tollgate_watch::Watch>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub limits: Vec<String>,
    /// Limits whose definition did not change: their counters were kept.
    pub kept: Vec<String>,
    /// Limits whose definition changed and whose counted use was carried
    /// into the new one (see `tollgate_core::carry`).
    pub carried: Vec<String>,
    /// Limits that start from fresh counters, and why.
    pub fresh: Vec<FreshLimit>,
}

impl Gateway {
    /// Load the config and build the gateway. `clock` is the engine's time.
    pub fn new(
        source: Source,
        overrides: Overrides,
        profiles: Box<dyn ProfileSource + Send + Sync>,
        clock: TokioClock,
    ) -> Result<Gateway, LoadError> {
        let metrics = Metrics::default();
        let modified = modified_time(&source);
        let (text, policy, settings) = load(&source, &overrides, profiles.as_ref())?;
        let engine = Engine::open(policy, "gateway").map_err(|e| LoadError::Io(e.to_string()))?;
        let tls = match &settings.tls {
            Some(files) => Some(
                tollgate_http::tls::Certificates::load(files.clone())
                    .map_err(|e| LoadError::Io(format!("[gateway] {e}")))?,
            ),
            None => None,
        };
        let generation = Generation::new(engine, settings, text, &metrics);
        // https upstreams: the system's roots plus upstream_ca_file (read
        // once: a change takes a restart).
        let upstream_tls = tollgate_http::tls::client_config(
            generation.settings.upstream_ca_file.as_deref(),
            generation.settings.upstream_client_cert.as_ref(),
        )
        .map_err(|e| LoadError::Io(format!("[gateway] upstream {e}")))?;
        let upstreams = (0..MAX_WORKERS)
            .map(|_| {
                let connector = tollgate_http::tls::https_connector(
                    upstream_tls.clone(),
                    generation.settings.connect_timeout,
                );
                Arc::new(WorkerUpstreams::new(
                    connector,
                    metrics.upstream_opened.clone(),
                ))
            })
            .collect();
        let admin_token = std::env::var(&generation.settings.admin_token_env)
            .ok()
            .filter(|t| !t.is_empty());
        let access = AccessLogger::start(generation.settings.access_log);
        let watch = tollgate_watch::Watch::open(
            tollgate_watch::dashboard::Face::Gateway,
            &generation.settings.watch,
            overrides.history_dir.as_deref(),
            Default::default(),
            tollgate_watch::unix_now(),
        )
        .and_then(|w| match &generation.engine.policy().store.redis {
            Some(store) => w.with_fleet(store),
            None => Ok(w),
        })
        .map(Arc::new)
        .map_err(LoadError::Io)?;
        Ok(Gateway {
            current: ArcSwap::from_pointee(generation),
            source,
            overrides,
            profiles,
            clock,
            upstreams,
            metrics,
            holds: Arc::default(),
            access,
            admin_token,
            ids: RequestIds::default(),
            pending: Mutex::default(),
            reload_lock: tokio::sync::Mutex::new(modified),
            tls,
            watch,
        })
    }

    /// The upstream connections of a worker thread.
    pub fn upstreams(&self, worker: usize) -> &Arc<WorkerUpstreams> {
        &self.upstreams[worker % self.upstreams.len()]
    }

    /// Close the upstream connections idle too long or closed by the upstream.
    pub fn prune_idle_upstreams(&self) {
        for worker in self.upstreams.iter() {
            worker.prune();
        }
    }

    /// Upstream connections open and kept for the next client connection.
    pub fn idle_upstream_connections(&self) -> usize {
        self.upstreams.iter().map(|w| w.idle()).sum()
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// `req_` and 16 hex digits: unique per process, and across restarts.
    pub fn next_request_id(&self) -> String {
        self.ids.next()
    }

    /// Read the config again and swap it in. An invalid config is rejected
    /// and the old one keeps serving. Counters of unchanged limits are kept,
    /// changed limits carry their use over where it means the same;
    /// requests in flight finish on the generation they started in.
    pub async fn reload(&self) -> Result<Reloaded, LoadError> {
        let mut last_modified = self.reload_lock.lock().await;
        // Read before the text: an edit landing after this is seen next time.
        // Kept even when the config is rejected, so a broken file is
        // reported once, not at every poll.
        *last_modified = modified_time(&self.source);
        let previous = self.current();
        let result = self.load_next();
        if result.is_ok() {
            // The new generation starts without slices of leased limits:
            // the old one's unused units go back to the fleet's quota.
            previous
                .engine
                .give_back_leases(tollgate_core::Clock::now(&self.clock), true)
                .await;
        }
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(r) => tracing::info!(
                limits = ?r.limits,
                kept = ?r.kept,
                carried = ?r.carried,
                fresh = %r
                    .fresh
                    .iter()
                    .map(FreshLimit::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                "config reloaded; unchanged limits kept their counters, changed ones carried their use over where it means the same"
            ),
            Err(e) => {
                tracing::error!("config reload rejected, the previous config keeps serving: {e}")
            }
        }
        result
    }

    /// Read the TLS certificate's files again if they changed since they
    /// were loaded (the file watcher's poll); a pair that does not load is
    /// logged and the current one keeps serving.
    pub fn reload_certificate_if_changed(&self) {
        match self.tls.as_ref().and_then(|c| c.reload_if_changed()) {
            Some(Ok(())) => tracing::info!("TLS certificate reloaded (its files changed)"),
            Some(Err(e)) => {
                tracing::error!("TLS certificate not reloaded, the previous one keeps serving: {e}")
            }
            None => {}
        }
    }

    /// Reload if the config file changed since it was last read (the file
    /// watcher's poll).
    pub async fn reload_if_changed(&self) -> Option<Result<Reloaded, LoadError>> {
        let modified = modified_time(&self.source);
        if modified.is_none() || *self.reload_lock.lock().await == modified {
            return None; // not a file, or unchanged
        }
        Some(self.reload().await)
    }

    fn load_next(&self) -> Result<Reloaded, LoadError> {
        let (text, policy, settings) = load(&self.source, &self.overrides, self.profiles.as_ref())?;
        let old = self.current.load_full();
        if settings.listen != old.settings.listen
            || settings.admin_listen != old.settings.admin_listen
        {
            tracing::warn!("listen addresses changed in the config; they take effect on restart");
        }
        match (&self.tls, &settings.tls) {
            (Some(certs), Some(files)) => certs
                .reload(Some(files.clone()))
                .map_err(|e| LoadError::Io(format!("[gateway] {e}")))?,
            (None, None) => {}
            _ => tracing::warn!("[gateway] tls was turned on or off; that takes effect on restart"),
        }
        let engine = old
            .engine
            .reloaded(policy, tollgate_core::Clock::now(&self.clock))
            .map_err(|e| LoadError::Io(e.to_string()))?;
        let mut reloaded = Reloaded {
            limits: Vec::new(),
            kept: Vec::new(),
            carried: Vec::new(),
            fresh: Vec::new(),
        };
        for (limit, carry) in tollgate_core::carry::plan(old.engine.policy(), engine.policy()) {
            match carry {
                Carry::Unchanged => reloaded.kept.push(limit.clone()),
                Carry::Carried => reloaded.carried.push(limit.clone()),
                Carry::Fresh(why) => reloaded.fresh.push(FreshLimit {
                    limit: limit.clone(),
                    why,
                }),
            }
            reloaded.limits.push(limit);
        }
        let next = Generation::new(engine, settings, text, &self.metrics);
        self.current.store(Arc::new(next));
        Ok(reloaded)
    }
}

impl Generation {
    fn new(engine: Engine, settings: Settings, text: String, metrics: &Metrics) -> Generation {
        let policy = engine.policy().clone();
        let mut read_headers: Vec<HeaderName> = policy
            .limits
            .iter()
            .flat_map(|l| {
                let cost = match &l.cost {
                    Cost::Header(h) => Some(h.clone()),
                    _ => None,
                };
                l.key
                    .iter()
                    .filter_map(|k| match k {
                        KeyPart::Header(h) => Some(h.clone()),
                        _ => None,
                    })
                    .chain(cost)
            })
            .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .collect();
        read_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        read_headers.dedup();
        Generation {
            policy_items: PolicyItems::new(&policy),
            rate_limited: RateLimitedAnswers::new(&policy, &settings.response),
            counters: metrics.limit_counters(&policy),
            reads_body: policy
                .limits
                .iter()
                .any(|l| matches!(l.cost, Cost::JsonArray(_))),
            read_headers,
            engine: Arc::new(engine),
            settings,
            text,
            loaded_at: jiff::Timestamp::now(),
        }
    }
}

/// Read and check a config as `serve` loads it (limits, `[gateway]`,
/// `[response]` over its profile's, then the command line's overrides):
/// its text, policy and settings. `tollgate check` runs exactly this.
pub fn load(
    source: &Source,
    overrides: &Overrides,
    profiles: &dyn ProfileSource,
) -> Result<(String, tollgate_core::Policy, Settings), LoadError> {
    let text = match source {
        Source::File(path) => std::fs::read_to_string(path)
            .map_err(|e| LoadError::Io(format!("cannot read config {}: {e}", path.display())))?,
        Source::Profile(name) => format!("profile = {name:?}\n"),
        Source::Text(text) => text.clone(),
    };
    let (policy, settings) = parse_all(source, &text, overrides, profiles)?;
    Ok((text, policy, settings))
}

/// The config file's modification time (None for other sources).
fn modified_time(source: &Source) -> Option<SystemTime> {
    match source {
        Source::File(path) => std::fs::metadata(path).and_then(|m| m.modified()).ok(),
        _ => None,
    }
}

fn parse_all(
    source: &Source,
    text: &str,
    overrides: &Overrides,
    profiles: &dyn ProfileSource,
) -> Result<(tollgate_core::Policy, Settings), LoadError> {
    let name = match source {
        Source::File(p) => p.display().to_string(),
        Source::Profile(n) => format!("profile {n}"),
        Source::Text(_) => "config".into(),
    };
    let fail = |mut error: ConfigError| {
        if let Source::Profile(_) = source {
            error.line = None; // the one-line text is ours, not the user's
        }
        LoadError::Config {
            path: name.clone(),
            error,
        }
    };
    let policy = tollgate_core::parse(text, profiles).map_err(fail)?;
    if policy.limits.is_empty() {
        return Err(fail(ConfigError {
            line: None,
            message: "the config has no [[limit]] entries (and no profile) for the gateway; [[upstream]] entries are for `tollgate run`".into(),
        }));
    }
    // A profile may bring its vendor's response shape; the config's own tables win.
    let base = match policy
        .profile
        .as_deref()
        .and_then(|p| profiles.profile_text(p))
    {
        Some(profile_text) => {
            Settings::default()
                .parse_onto(profile_text)
                .map_err(|e| LoadError::Config {
                    path: format!("profile {}", policy.profile.as_deref().unwrap_or_default()),
                    error: e,
                })?
        }
        None => Settings::default(),
    };
    let mut settings = base.parse_onto(text).map_err(fail)?;
    settings.watch =
        tollgate_watch::settings::WatchSettings::parse(text, &|v| std::env::var(v).ok()).map_err(
            |message| {
                fail(ConfigError {
                    line: None,
                    message,
                })
            },
        )?;
    if let Some(a) = overrides.listen {
        settings.listen = a;
    }
    if let Some(a) = overrides.admin_listen {
        settings.admin_listen = Some(a);
    }
    if let Some(u) = &overrides.upstream {
        settings.upstream = Some(u.clone());
    }
    if let Some(l) = overrides.access_log {
        settings.access_log = l;
    }
    // Files are relative to the config file, wherever serve was started.
    let dir = match source {
        Source::File(path) => path.parent().unwrap_or(std::path::Path::new("")),
        _ => std::path::Path::new(""),
    };
    let checked = |what: &str, result: Result<(), String>| {
        result.map_err(|message| {
            fail(ConfigError {
                line: None,
                message: format!("[gateway] {what}{message}"),
            })
        })
    };
    // Checked here, as `tollgate check` checks them (the system's roots are
    // read once, when the upstream connectors are built).
    if let Some(files) = &mut settings.tls {
        *files = files.under(dir);
        checked("", tollgate_http::tls::load(files).map(|_| ()))?;
    }
    if let Some(path) = &mut settings.upstream_ca_file {
        *path = dir.join(&*path);
        let certs = tollgate_http::tls::read_ca_file(path);
        checked("upstream_", certs.map(|_| ()))?;
    }
    if let Some(files) = &mut settings.upstream_client_cert {
        *files = files.under(dir);
        let pair = tollgate_http::tls::load(files);
        checked("upstream_client_cert: ", pair.map(|_| ()))?;
    }
    Ok((policy, settings))
}
