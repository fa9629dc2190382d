//! The proxy's shared state: the config in force (a `Generation`, swapped
//! whole on reload), one line per upstream (its scheduler and HTTP client),
//! the clock, metrics and the access log.

use crate::metrics::Metrics;
use crate::settings::ProxySettings;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tollgate_comply::{Scheduler, SharedScheduler, Upstream, UpstreamsConfig};
use tollgate_core::config::{ConfigError, LoadError};
use tollgate_core::ProfileSource;
use tollgate_http::{AccessLogger, RequestIds};
use tollgate_store::{Engine, TokioClock};

/// Where the config comes from; read again on every reload.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// Text given directly (tests, embedding).
    Text(String),
}

/// An upstream's HTTP client: the connections it keeps, TLS with the
/// system's roots and its `ca_file`, the clients' bodies streamed.
pub type UpstreamClient = tollgate_http::client::UpstreamClient<tollgate_http::body::AnyBody>;

/// One upstream as the proxy serves it: its line (the scheduler every
/// request to it waits in) and its HTTP client.
#[derive(Debug)]
pub struct UpstreamLine {
    pub line: SharedScheduler,
    pub metrics: crate::metrics::UpstreamMetrics,
    pub client: UpstreamClient,
    /// Its pool of vendor keys (empty without `keys`).
    pub keys: crate::keys::KeyPool,
    /// Its reads kept (`[[upstream.cache]]`; empty without).
    pub cache: tollgate_http::cache::Cache,
    /// Its writes remembered (`dedup`, `skip_unchanged`; off without).
    pub writes: tollgate_http::dedup::Writes,
    /// What the upstream was built from: a reload keeps the line (and its
    /// queue and counters) when this is unchanged.
    fingerprint: String,
    /// Fleet mode: the task that applies the pauses other processes publish.
    pause_listener: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for UpstreamLine {
    fn drop(&mut self) {
        if let Some(task) = &self.pause_listener {
            task.abort();
        }
    }
}

/// Everything read from one version of the config.
#[derive(Debug)]
pub struct Generation {
    pub settings: ProxySettings,
    /// The `[[upstream]]` tables, and each one's line (same order).
    pub config: UpstreamsConfig,
    pub lines: Vec<Arc<UpstreamLine>>,
    /// The local CA, when some upstream intercepts `HTTPS_PROXY` tunnels.
    pub ca: Option<Arc<crate::intercept::LocalCa>>,
    pub text: String,
    pub loaded_at: jiff::Timestamp,
}

impl Generation {
    fn new(
        settings: ProxySettings,
        config: UpstreamsConfig,
        lines: Vec<Arc<UpstreamLine>>,
        ca: Option<Arc<crate::intercept::LocalCa>>,
        text: String,
    ) -> Generation {
        Generation {
            settings,
            config,
            lines,
            ca,
            text,
            loaded_at: jiff::Timestamp::now(),
        }
    }

    pub fn upstream(&self, name: &str) -> Option<usize> {
        self.config.upstreams.iter().position(|u| u.name == name)
    }
}

/// Settings given on the command line; they win over the file's on every load.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<std::net::SocketAddr>,
    pub admin_listen: Option<std::net::SocketAddr>,
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub upstreams: Vec<String>,
    /// Upstreams whose definition did not change: their lines (queue,
    /// quota, breaker) were kept.
    pub kept: Vec<String>,
    /// Upstreams whose definition changed: a new line, whose limits carried
    /// what each key used under the old one (see `tollgate_core::carry`), so
    /// a reload never spends a vendor's quota twice.
    pub carried: Vec<String>,
    /// Limits of changed upstreams that start from fresh counters, and why.
    pub fresh: Vec<FreshLimit>,
}

/// A limit of an upstream that a reload started from fresh counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FreshLimit {
    pub upstream: String,
    #[serde(flatten)]
    pub limit: tollgate_core::carry::FreshLimit,
}

pub struct Proxy {
    current: ArcSwap<Generation>,
    source: Source,
    overrides: Overrides,
    profiles: Box<dyn ProfileSource + Send + Sync>,
    pub clock: TokioClock,
    pub metrics: Metrics,
    pub access: AccessLogger,
    pub admin_token: Option<String>,
    ids: RequestIds,
    reload_lock: tokio::sync::Mutex<()>,
    /// Bytes of request bodies kept now, over every request waiting or in
    /// flight (bounded by `[proxy] max_kept_bytes`).
    pub(crate) kept_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// The jobs pushed to `/_tollgate/jobs`, in `[proxy] state`.
    pub(crate) jobs: crate::jobs::Desk,
    /// What jobs' callbacks are delivered with.
    pub(crate) callback_client: crate::callbacks::Client,
    /// History, alerts and the dashboard of the admin listener.
    pub watch: Arc<tollgate_watch::Watch>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Read and check a config as `tollgate proxy` loads it: its text, its
/// `[[upstream]]` tables and its `[proxy]` table. `tollgate check` runs
/// exactly this.
pub fn load(
    source: &Source,
    overrides: &Overrides,
    profiles: &dyn ProfileSource,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, tollgate_comply::UpstreamsConfig, ProxySettings), LoadError> {
    let (name, text) = match source {
        Source::File(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|e| {
                LoadError::Io(format!("cannot read config {}: {e}", path.display()))
            })?,
        ),
        Source::Text(text) => ("config".to_string(), text.clone()),
    };
    let fail = |error: ConfigError| LoadError::Config {
        path: name.clone(),
        error,
    };
    let upstreams = tollgate_comply::parse_config(&text, profiles, env).map_err(fail)?;
    let mut settings = ProxySettings::parse(&text, env).map_err(fail)?;
    settings.watch =
        tollgate_watch::settings::WatchSettings::parse(&text, env).map_err(|message| {
            fail(ConfigError {
                line: None,
                message,
            })
        })?;
    if let Some(a) = overrides.listen {
        settings.listen = a;
    }
    if let Some(a) = overrides.admin_listen {
        settings.admin_listen = Some(a);
    }
    settings.check_exposure(env).map_err(|message| {
        fail(ConfigError {
            line: None,
            message,
        })
    })?;
    for u in &upstreams.upstreams {
        if u.name == crate::RESERVED {
            return Err(fail(ConfigError {
                line: None,
                message: format!(
                    "upstream name '{}' is reserved for tollgate's own paths; choose another",
                    crate::RESERVED
                ),
            }));
        }
        if u.policy.store.redis.is_some() {
            tollgate_store::redis::check_policy(&u.policy).map_err(|e| {
                fail(ConfigError {
                    line: None,
                    message: format!("upstream '{}': {e}", u.name),
                })
            })?;
        }
    }
    Ok((text, upstreams, settings))
}

/// `upstream/limit` of the limits whose quota is per day or longer.
fn daily_limits(config: &tollgate_comply::UpstreamsConfig) -> std::collections::BTreeSet<String> {
    config
        .upstreams
        .iter()
        .flat_map(|u| u.daily_limits())
        .collect()
}

impl Proxy {
    /// Load the config and start a line per upstream (on the current tokio
    /// runtime). `clock` is the engine's time.
    pub fn new(
        source: Source,
        overrides: Overrides,
        profiles: Box<dyn ProfileSource + Send + Sync>,
        clock: TokioClock,
    ) -> Result<Proxy, LoadError> {
        let (text, upstreams, settings) = load(&source, &overrides, profiles.as_ref(), &env)?;
        let ca = local_ca(&upstreams, &settings)?;
        let metrics = Metrics::default();
        let lines = upstreams
            .upstreams
            .iter()
            .map(|u| start_line(u, &upstreams, &clock, &metrics, None).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_token = std::env::var(&settings.admin_token_env)
            .ok()
            .filter(|t| !t.is_empty());
        let callback_client =
            crate::callbacks::client().map_err(|e| LoadError::Io(format!("callbacks: {e}")))?;
        let access = AccessLogger::start(settings.access_log);
        let watch = tollgate_watch::Watch::open(
            tollgate_watch::dashboard::Face::Proxy,
            &settings.watch,
            Some(&settings.state),
            daily_limits(&upstreams),
            tollgate_watch::unix_now(),
        )
        .and_then(|w| match upstreams.redis() {
            Some(store) => w.with_fleet(store),
            None => Ok(w),
        })
        .map(Arc::new)
        .map_err(LoadError::Io)?;
        Ok(Proxy {
            current: ArcSwap::from_pointee(Generation::new(settings, upstreams, lines, ca, text)),
            source,
            overrides,
            profiles,
            clock,
            metrics,
            access,
            admin_token,
            ids: RequestIds::default(),
            kept_bytes: Arc::default(),
            jobs: crate::jobs::Desk::new(),
            callback_client,
            watch,
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Fleet mode: reach every upstream's shared store now, so a wrong URL,
    /// password or an unreachable Redis is an error at start, not a wait.
    pub async fn connect(&self) -> Result<(), LoadError> {
        let generation = self.current();
        for (u, line) in generation.config.upstreams.iter().zip(&generation.lines) {
            // (connecting awaits: the engine is taken out of the line's lock)
            let engine = line.line.inspect(|s| s.shared_engine());
            engine
                .connect()
                .await
                .map_err(|e| LoadError::Io(format!("upstream '{}': [store]: {e}", u.name)))?;
        }
        Ok(())
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// `req_` and 16 hex digits: unique per process, and across restarts.
    pub fn next_request_id(&self) -> String {
        self.ids.next()
    }

    /// Read the config again and swap it in. An invalid config is rejected
    /// and the old one keeps serving. Upstreams whose definition did not
    /// change keep their lines; requests in flight finish on the line they
    /// started in.
    pub async fn reload(&self) -> Result<Reloaded, LoadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let result = self.load_next();
        match &result {
            Ok(r) => tracing::info!(
                upstreams = ?r.upstreams,
                kept = ?r.kept,
                carried = ?r.carried,
                fresh = %r
                    .fresh
                    .iter()
                    .map(|f| format!("{}/{}", f.upstream, f.limit))
                    .collect::<Vec<_>>()
                    .join(", "),
                "config reloaded"
            ),
            Err(e) => {
                tracing::error!("config reload rejected, the previous config keeps serving: {e}")
            }
        }
        result
    }

    fn load_next(&self) -> Result<Reloaded, LoadError> {
        let (text, upstreams, settings) =
            load(&self.source, &self.overrides, self.profiles.as_ref(), &env)?;
        let ca = local_ca(&upstreams, &settings)?;
        let old = self.current();
        if settings.listen != old.settings.listen
            || settings.admin_listen != old.settings.admin_listen
        {
            tracing::warn!("listen addresses changed in the config; they take effect on restart");
            // Until then the sockets bound at start serve: judge the new
            // config's clients and tokens against them.
            let mut bound = settings.clone();
            bound.listen = old.settings.listen;
            bound.admin_listen = old.settings.admin_listen;
            bound
                .check_exposure(&env)
                .map_err(|message| LoadError::Io(format!("config rejected: {message}")))?;
        }
        let mut kept = Vec::new();
        let (mut carried, mut fresh) = (Vec::new(), Vec::new());
        let mut lines = Vec::new();
        for u in &upstreams.upstreams {
            let same = old
                .lines
                .iter()
                .find(|o| o.fingerprint == fingerprint(u, &upstreams));
            // A changed upstream's engine carries the old one's counters.
            let previous = old
                .config
                .upstreams
                .iter()
                .position(|o| o.name == u.name)
                .and_then(|i| old.lines.get(i));
            match same {
                Some(line) => {
                    kept.push(u.name.clone());
                    let unparked = line.keys.unpark_all();
                    if unparked > 0 {
                        tracing::info!(upstream = %u.name, "reload: {unparked} parked key(s) back in use");
                    }
                    lines.push(line.clone());
                }
                None => {
                    let engine = match previous {
                        Some(line) => {
                            let now = tollgate_core::Clock::now(&self.clock);
                            let policy = tollgate_comply::pace::with_margin(&u.policy);
                            let engine = line.line.inspect(|s| {
                                for (limit, carry) in
                                    tollgate_core::carry::plan(s.engine().policy(), &policy)
                                {
                                    if let tollgate_core::carry::Carry::Fresh(why) = carry {
                                        fresh.push(FreshLimit {
                                            upstream: u.name.clone(),
                                            limit: tollgate_core::carry::FreshLimit { limit, why },
                                        });
                                    }
                                }
                                s.engine().reloaded(policy, now)
                            });
                            carried.push(u.name.clone());
                            Some(engine.map_err(|e| {
                                LoadError::Io(format!("upstream '{}': {e}", u.name))
                            })?)
                        }
                        None => None,
                    };
                    lines.push(Arc::new(start_line(
                        u,
                        &upstreams,
                        &self.clock,
                        &self.metrics,
                        engine,
                    )?))
                }
            }
        }
        let names = upstreams.upstreams.iter().map(|u| u.name.clone()).collect();
        self.watch.set_daily(daily_limits(&upstreams));
        self.current.store(Arc::new(Generation::new(
            settings, upstreams, lines, ca, text,
        )));
        Ok(Reloaded {
            upstreams: names,
            kept,
            carried,
            fresh,
        })
    }
}

/// The local CA, loaded when some upstream intercepts.
fn local_ca(
    upstreams: &UpstreamsConfig,
    settings: &ProxySettings,
) -> Result<Option<Arc<crate::intercept::LocalCa>>, LoadError> {
    if !upstreams.upstreams.iter().any(|u| u.intercept) {
        return Ok(None);
    }
    crate::intercept::LocalCa::load(&settings.ca_dir)
        .map(|ca| Some(Arc::new(ca)))
        .map_err(LoadError::Io)
}

/// The process environment: `${NAME}` in header values, client tokens.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// What a line is built from: the upstream, and the workflows' schedules.
fn fingerprint(u: &Upstream, config: &UpstreamsConfig) -> String {
    format!("{u:?} {:?}", config.schedules())
}

/// An upstream's line: its engine (memory, or the fleet's Redis under the
/// same namespace `tollgate run` uses, so proxies and runners share one
/// quota; `engine` when a reload carried the old line's counters into it),
/// its scheduler, and its HTTP client.
fn start_line(
    u: &Upstream,
    config: &UpstreamsConfig,
    clock: &TokioClock,
    metrics: &Metrics,
    engine: Option<Engine>,
) -> Result<UpstreamLine, LoadError> {
    let engine = match engine {
        Some(engine) => engine,
        None => Engine::open(
            tollgate_comply::pace::with_margin(&u.policy),
            &format!("upstream:{}", u.name),
        )
        .map_err(|e| LoadError::Io(format!("upstream '{}': {e}", u.name)))?,
    };
    let core = Scheduler::for_upstream(engine, u, config, fastrand_seed());
    let client = upstream_client(u)?;
    let line = SharedScheduler::start(&u.name, core, clock.clone());
    let pause_listener = match &u.policy.store.redis {
        Some(settings) => Some(share_pauses(u, settings, &line)?),
        None => None,
    };
    Ok(UpstreamLine {
        metrics: metrics.upstream(&u.name),
        pause_listener,
        fingerprint: fingerprint(u, config),
        keys: crate::keys::KeyPool::new(u.keys.len()),
        cache: cache_of(u)?,
        writes: tollgate_http::dedup::Writes::new(&u.dedup),
        line,
        client,
    })
}

/// The upstream's cache: in this process, or shared through the fleet's
/// Redis (`cache_store = "redis"`).
fn cache_of(u: &Upstream) -> Result<tollgate_http::cache::Cache, LoadError> {
    use tollgate_http::cache::{shared_store, Cache, CacheStore};
    match (&u.cache_store, &u.policy.store.redis) {
        (CacheStore::Redis, Some(settings)) => shared_store(&u.cache, settings, &u.name)
            .map(|store| Cache::shared(&u.cache, store))
            .map_err(|e| LoadError::Io(format!("upstream '{}': cache_store: {e}", u.name))),
        _ => Ok(Cache::new(&u.cache)),
    }
}

/// The upstream's client: HTTP/1.1 over TCP or TLS (rustls: the system's
/// roots plus the upstream's `ca_file`), with the connections it keeps.
/// Always direct: the proxy's own clients point `HTTP_PROXY` at it, so
/// following the environment's proxy could send requests back to itself.
fn upstream_client(u: &Upstream) -> Result<UpstreamClient, LoadError> {
    let direct = tollgate_http::client::Proxies::builder().build();
    u.client(u.timeout.min(Duration::from_secs(10)), &direct)
        .map_err(LoadError::Io)
}

/// Fleet mode: a 429 this process gets pauses the upstream in every
/// process on the same Redis, and theirs pause it here.
fn share_pauses(
    u: &Upstream,
    settings: &tollgate_core::policy::RedisSettings,
    line: &SharedScheduler,
) -> Result<tokio::task::JoinHandle<()>, LoadError> {
    let pauses = tollgate_store::redis::Pauses::new(settings, &format!("upstream:{}", u.name))
        .map_err(|e| LoadError::Io(format!("upstream '{}': [store]: {e}", u.name)))?;
    let publisher = pauses.clone();
    line.on_event(move |event| {
        if let tollgate_comply::Event::Paused { until, .. } = event {
            let (publisher, until) = (publisher.clone(), *until);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { publisher.publish(until).await });
            }
        }
    });
    let weak = line.downgrade();
    let name = u.name.clone();
    Ok(tokio::spawn(async move {
        pauses
            .listen(|until| match weak.upgrade() {
                Some(line) => {
                    if line.pause(until) {
                        tracing::info!(
                            "{name}: another process of the fleet got a 429; pausing here too"
                        );
                    }
                    true
                }
                None => false,
            })
            .await;
    }))
}

/// Seeds the retry jitter: different in every process, so a fleet's
/// retries spread out.
fn fastrand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id())
}
