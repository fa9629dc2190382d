//! `tollgate run`: drive every pending job of a state to a final outcome, at
//! the pace the schedulers allow, on tokio, each upstream through its
//! `tollgate_http::client::UpstreamClient` (hyper). One task decides
//! (the schedulers are not shared); each request runs in its own task and
//! reports back on a channel. Outcomes go to the state's writer thread.

use crate::job::{Job, Priority};
use crate::plan;
use crate::settings::{Upstream, UpstreamsConfig};
use crate::state::{Pending, Record, State, StateError, Writer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tollgate_comply::{human, Event, Next, Reply, Scheduler, Settled};
use tollgate_core::{Clock, Item, Nanos};
use tollgate_http::cache::{freshness, shared_store, Cache, CacheStore, Key, Stored};
use tollgate_http::client::{failure, Proxies, UpstreamClient};
use tollgate_http::ratelimit as signals;
use tollgate_jobs::result::Seen;
use tollgate_store::redis::SharedCache;
use tollgate_store::{Engine, TokioClock};

/// Without a terminal, a progress line every this many finished jobs (as a
/// CRM's rate-limit page suggests).
const LOG_EVERY: u64 = 500;

#[derive(Debug, Clone)]
pub struct Options {
    pub progress: ProgressMode,
    /// After Ctrl-C, how long requests in flight may take to finish.
    pub grace: Duration,
    /// Seeds the retry jitter.
    pub seed: u64,
    /// An admin listener for the length of the run (`/healthz`,
    /// `/metrics`), and the bearer token `/metrics` needs.
    pub admin: Option<std::net::SocketAddr>,
    pub admin_token: Option<String>,
    /// The config's `[history]`, `[alerts]` and `[[alert]]`, for the admin
    /// listener's dashboard and alerts; history is kept in the state
    /// directory `state_dir` unless `[history] path` says otherwise.
    pub watch: tollgate_watch::settings::WatchSettings,
    pub state_dir: Option<std::path::PathBuf>,
    /// Which upstreams are reached through a proxy: by default the
    /// environment's `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`.
    pub proxies: Arc<Proxies>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            progress: ProgressMode::Auto,
            grace: Duration::from_secs(10),
            seed: fastrand::u64(..),
            admin: None,
            admin_token: None,
            watch: Default::default(),
            state_dir: None,
            proxies: Arc::new(Proxies::from_env()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    Lines,
    Quiet,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] StateError),
    /// The admin listener could not be opened.
    #[error("{0}")]
    Admin(String),
    #[error("the state has {jobs} pending job(s) for upstream '{upstream}', which the config no longer has")]
    UnknownUpstream { upstream: String, jobs: usize },
    #[error("pending job '{id}' of upstream '{upstream}' has url {url}, which is no longer under that upstream's base_url; tollgate only sends to configured upstreams (restore the base_url, or use another --state)")]
    Moved {
        id: String,
        upstream: String,
        url: String,
    },
    #[error("the state could not be written, so the run stopped (jobs in flight will be sent again): {0}")]
    Writer(StateError),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("upstream '{0}': cache_store: {1}")]
    SharedCache(String, tollgate_store::redis::RedisError),
    #[error(transparent)]
    Queue(#[from] crate::fleet::QueueError),
    #[error("queue '{queue}' has {jobs} unfinished job(s) for upstream '{upstream}', which this config does not have; run them with a config that has it (or use another --queue)")]
    FleetUnknownUpstream {
        queue: String,
        upstream: String,
        jobs: u64,
    },
    #[error("the job queue refused {refused}, and asking again will not change that (its keys are not as tollgate wrote them, or a script failed): this runner stopped. {writes} write(s) were refused and {unwritten} not made: those results and attempt counts are not recorded, and their jobs will be sent again")]
    QueueRefused {
        /// The first command refused, with Redis's answer.
        refused: String,
        /// Writes (results, attempt counts, leases given back) refused.
        writes: u64,
        /// Outcomes still unwritten when the runner stopped.
        unwritten: u64,
    },
    #[error("upstream '{upstream}': {source}")]
    Engine {
        upstream: String,
        source: tollgate_store::EngineError,
    },
}

#[derive(Debug, Clone, Default)]
pub struct UpstreamSummary {
    pub name: String,
    pub calls: u64,
    pub done: u64,
    pub dead: u64,
    pub retried: u64,
    pub throttled: u64,
    /// The least time the limits allow for these calls (from the plan).
    pub shortest: Duration,
    pub binding: Option<String>,
    /// The pace learnt from 429s the limits did not predict, per second,
    /// when the run ended below what the profile allows.
    pub learnt: Option<f64>,
    /// The fastest sustained rate the profile's limits allow, per second.
    pub profile_rate: Option<f64>,
    /// Jobs answered without a call: from the cache, or from a job alike
    /// whose call was in flight (`[[upstream.cache]]`).
    pub saved: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub upstreams: Vec<UpstreamSummary>,
    pub elapsed: Duration,
    /// Stopped by Ctrl-C: `pending` jobs are left for the next run.
    pub interrupted: bool,
    pub pending: u64,
    /// Fleet mode: the whole queue's figures (this summary's upstreams are
    /// this runner's share).
    pub fleet: Option<FleetTotals>,
}

/// A fleet queue at the end of one runner's run.
#[derive(Debug, Clone, Default)]
pub struct FleetTotals {
    pub queue: String,
    pub jobs: u64,
    pub done: u64,
    pub dead: u64,
    /// Not finished: pending, or leased by a runner.
    pub pending: u64,
    /// Results this runner had but another runner had recorded first
    /// (a job taken over after its lease expired): not recorded twice.
    pub duplicates: u64,
    /// Outcomes still in memory when the run stopped (Redis unreachable):
    /// their jobs' leases expire and they are sent again.
    pub unwritten: u64,
}

impl Summary {
    fn total(&self, f: impl Fn(&UpstreamSummary) -> u64) -> u64 {
        self.upstreams.iter().map(f).sum()
    }
    pub fn done(&self) -> u64 {
        self.total(|u| u.done)
    }
    pub fn dead(&self) -> u64 {
        self.total(|u| u.dead)
    }
    pub fn calls(&self) -> u64 {
        self.total(|u| u.calls)
    }
    pub fn retried(&self) -> u64 {
        self.total(|u| u.retried)
    }
    pub fn throttled(&self) -> u64 {
        self.total(|u| u.throttled)
    }

    /// Achieved rate over allowed rate: the least time the limits allow for
    /// the calls made, over the time they took. None when the limits never
    /// made a call wait (a job within the burst has no rate to compare).
    pub fn utilisation(&self) -> Option<f64> {
        // In a fleet the quota is shared: one runner's calls say nothing
        // of how well the quota was used.
        if self.fleet.is_some() {
            return None;
        }
        let shortest = self.upstreams.iter().map(|u| u.shortest).max()?;
        (shortest >= Duration::from_millis(100) && !self.elapsed.is_zero())
            .then(|| (shortest.as_secs_f64() / self.elapsed.as_secs_f64()).min(1.0))
    }

    /// The summary block printed at the end.
    pub fn describe(&self) -> String {
        let minutes = self.elapsed.as_secs_f64() / 60.0;
        let per_minute = if minutes > 0.0 {
            self.calls() as f64 / minutes
        } else {
            0.0
        };
        let mut text = format!(
            "done {}, dead-lettered {}, retried {}, 429s received {}, calls {}, elapsed {}, {:.1} calls/min",
            self.done(),
            self.dead(),
            self.retried(),
            self.throttled(),
            self.calls(),
            human(self.elapsed),
            per_minute,
        );
        match (self.utilisation(), &self.fleet) {
            (Some(u), _) => text.push_str(&format!(", quota utilisation {:.1}%", u * 100.0)),
            (None, Some(_)) => {
                text.push_str(", quota utilisation n/a (fleet mode: the quota is shared)")
            }
            (None, None) => {
                text.push_str(", quota utilisation n/a (the limits never made a call wait)")
            }
        }
        for u in &self.upstreams {
            text.push_str(&format!(
                "\n  {}: {} calls, {} done, {} dead, {} retried, {} 429s; the limits allow it in {}{}",
                u.name,
                u.calls,
                u.done,
                u.dead,
                u.retried,
                u.throttled,
                human(u.shortest),
                u.binding.as_deref().map(|b| format!(" (binding: {b})")).unwrap_or_default()
            ));
            if let (Some(learnt), Some(profile)) = (u.learnt, u.profile_rate) {
                text.push_str(&format!(
                    "; learnt {learnt:.1}/s of the profile's {profile:.1}/s"
                ));
            }
            if u.saved > 0 {
                text.push_str(&format!(
                    "; {} job(s) answered without a call (the cache, or a job alike in flight)",
                    u.saved
                ));
            }
        }
        if let Some(f) = &self.fleet {
            text.push_str(&format!(
                "\nqueue '{}' (all runners): {} job(s), {} done, {} dead-lettered, {} not finished",
                f.queue, f.jobs, f.done, f.dead, f.pending
            ));
            if f.duplicates > 0 {
                text.push_str(&format!(
                    "; {} result(s) of this runner were already recorded by another (a lease taken over) and were not recorded twice",
                    f.duplicates
                ));
            }
            if f.unwritten > 0 {
                text.push_str(&format!(
                    "; {} outcome(s) could not be written to Redis: their jobs will be sent again",
                    f.unwritten
                ));
            }
        }
        text
    }
}

/// A job being worked on.
#[derive(Debug)]
pub(crate) struct Active {
    pub(crate) upstream: usize,
    pub(crate) job: Arc<Job>,
    /// The job's limits, noted at each send for the utilisation estimate.
    pub(crate) items: Arc<Vec<Item>>,
    pub(crate) first_sent: Option<Nanos>,
    pub(crate) sent: Nanos,
    /// Attempts made, this run and before.
    pub(crate) attempts: u32,
    /// A read under a cache route: what its answer is kept by.
    read: Option<Read>,
    /// When this run took it.
    pub(crate) taken: Nanos,
}

impl Active {
    pub(crate) fn new(
        upstream: usize,
        job: Job,
        items: Vec<Item>,
        attempts: u32,
        taken: Nanos,
    ) -> Self {
        Active {
            upstream,
            job: Arc::new(job),
            items: Arc::new(items),
            first_sent: None,
            sent: 0,
            attempts,
            read: None,
            taken,
        }
    }
}

/// A GET or HEAD job without a body under one of its upstream's cache
/// routes.
#[derive(Debug, Clone)]
struct Read {
    route: usize,
    key: Key,
    /// The headers it is sent with (what a kept answer varies on).
    sent: http::HeaderMap,
    /// The route's epoch when it was admitted: a write since, and its
    /// answer is not kept.
    epoch: u64,
}

pub(crate) struct Completion {
    pub(crate) seq: u64,
    reply: Reply,
    headers: Option<http::HeaderMap>,
    body: Option<Received>,
}

/// A response body as read: whole when it fits what is kept of one (what a
/// cache route keeps, or a result line shows), else digested as it comes
/// and only its start kept, so a 200 MB export is hashed, not held.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// The body whole, or (when `digest` is set) its start.
    kept: Bytes,
    /// The SHA-256 in hex of a body longer than was kept.
    digest: Option<String>,
    len: usize,
}

impl Received {
    /// Read `body`, keeping up to `keep` bytes of it.
    async fn read(mut body: hyper::body::Incoming, keep: usize) -> Result<Received, String> {
        use sha2::Digest;
        let mut kept = bytes::BytesMut::new();
        let mut digest: Option<sha2::Sha256> = None;
        let mut len = 0;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|e| failure(&e))?.into_data() else {
                continue; // trailers are not kept
            };
            len += data.len();
            match &mut digest {
                Some(d) => d.update(&data),
                None if kept.len() + data.len() <= keep => kept.extend_from_slice(&data),
                None => {
                    // Past what is kept: from here on only digested (the
                    // start is kept for a dead letter's excerpt).
                    let mut d = sha2::Sha256::new();
                    d.update(&kept);
                    d.update(&data);
                    digest = Some(d);
                    let excerpt = tollgate_jobs::result::EXCERPT;
                    kept.truncate(excerpt);
                    let room = excerpt.saturating_sub(kept.len()).min(data.len());
                    kept.extend_from_slice(&data[..room]);
                }
            }
        }
        Ok(Received {
            digest: digest.map(|d| tollgate_core::hex::hex_after("", &d.finalize())),
            kept: kept.freeze(),
            len,
        })
    }

    /// The whole body, if it was kept whole.
    fn whole(&self) -> Option<&Bytes> {
        self.digest.is_none().then_some(&self.kept)
    }

    /// As a result line takes it.
    fn seen(&self) -> Seen<'_> {
        match &self.digest {
            None => Seen::Whole(&self.kept),
            Some(sha256) => Seen::Digest {
                sha256,
                bytes: self.len,
                start: &self.kept,
            },
        }
    }
}

/// Where a run's records go: the SQLite writer, or the fleet's Redis queue.
pub(crate) trait Sink {
    /// `a` is the job the record is about (still known to the driver).
    fn record(&self, a: &Active, record: Record);
    /// The pace learnt for `upstream` changed (None: back to its limits).
    /// Kept where a resumed run finds it; a fleet's runners each learn
    /// their own.
    fn learnt(&self, _upstream: &str, _rate: Option<f64>) {}
}

impl Sink for Writer {
    fn record(&self, _: &Active, record: Record) {
        Writer::record(self, record);
    }
    fn learnt(&self, upstream: &str, rate: Option<f64>) {
        Writer::record(
            self,
            Record::Pace {
                upstream: upstream.to_owned(),
                rate,
            },
        );
    }
}

/// What both runs share: the schedulers, the jobs being worked on, the
/// requests in flight and their replies. The run around it decides where
/// jobs come from and where outcomes go.
pub(crate) struct Driver<'a> {
    pub(crate) config: &'a UpstreamsConfig,
    pub(crate) clock: TokioClock,
    pub(crate) schedulers: Vec<Scheduler>,
    pub(crate) active: HashMap<u64, Active>,
    sent_calls: Vec<Vec<(Priority, Arc<Vec<Item>>)>>,
    pub(crate) in_flight: HashMap<u64, tokio::task::JoinHandle<()>>,
    /// Per upstream, its HTTP client.
    clients: Vec<UpstreamClient>,
    tx: mpsc::UnboundedSender<Completion>,
    pub(crate) rx: mpsc::UnboundedReceiver<Completion>,
    pub(crate) progress: Progress,
    /// Jobs dead-lettered before they reached a scheduler, per upstream.
    early_dead: Vec<u64>,
    pub(crate) start: Nanos,
    pub(crate) last_reply: Nanos,
    /// Fleet mode: per upstream, where a 429's pause is told to the fleet.
    pub(crate) pauses: Vec<Option<tollgate_store::redis::Pauses>>,
    /// Per upstream, its reads kept (`[[upstream.cache]]`), in this process.
    caches: Vec<Cache>,
    /// Per upstream with `cache_store = "redis"`, the fleet's shared cache,
    /// which this run's writes evict from (its own reads are kept above).
    shared: Vec<Option<Arc<SharedCache>>>,
    /// Those evictions under way (a run waits for them before it ends).
    evicting: tokio::task::JoinSet<()>,
    /// Reads queued or in flight, by upstream, route and key: the job that
    /// makes the call ...
    reading: HashMap<(usize, usize, Key), u64>,
    /// ... and the jobs alike that wait for its answer.
    followers: HashMap<u64, Vec<u64>>,
    /// Per upstream, jobs answered without a call: done, dead.
    saved: Vec<(u64, u64)>,
    /// What the admin listener of `run --admin` shows.
    pub(crate) metrics: Option<Arc<crate::metrics::RunMetrics>>,
}

impl<'a> Driver<'a> {
    pub(crate) fn new(
        config: &'a UpstreamsConfig,
        schedulers: Vec<Scheduler>,
        clock: TokioClock,
        progress: Progress,
        proxies: &Proxies,
    ) -> Result<Self, RunError> {
        let clients = (config.upstreams.iter())
            .map(|u| u.client(u.timeout, proxies).map_err(RunError::Client))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let start = clock.now();
        Ok(Driver {
            config,
            clock,
            schedulers,
            active: HashMap::new(),
            sent_calls: vec![Vec::new(); config.upstreams.len()],
            in_flight: HashMap::new(),
            clients,
            tx,
            rx,
            progress,
            early_dead: vec![0; config.upstreams.len()],
            start,
            last_reply: start,
            pauses: Vec::new(),
            caches: config
                .upstreams
                .iter()
                .map(|u| Cache::new(&u.cache))
                .collect(),
            shared: config
                .upstreams
                .iter()
                .map(|u| match (u.cache_store, &u.policy.store.redis) {
                    (CacheStore::Redis, Some(settings)) => {
                        shared_store(&u.cache, settings, &u.name)
                            .map(|store| Some(Arc::new(store)))
                            .map_err(|e| RunError::SharedCache(u.name.clone(), e))
                    }
                    _ => Ok(None),
                })
                .collect::<Result<_, _>>()?,
            evicting: tokio::task::JoinSet::new(),
            reading: HashMap::new(),
            followers: HashMap::new(),
            saved: vec![(0, 0); config.upstreams.len()],
            metrics: None,
        })
    }

    pub(crate) fn now(&self) -> Nanos {
        self.clock.now()
    }

    /// Hand a job to its upstream's scheduler, or dead-letter it at once
    /// when its limits cannot be planned.
    pub(crate) fn admit(
        &mut self,
        seq: u64,
        upstream: usize,
        job: Job,
        attempts: u32,
        sink: &impl Sink,
    ) {
        match crate::job::items(&self.config.upstreams[upstream], &job) {
            Ok(items) => {
                let read = self.read_of(upstream, &job);
                let taken = self.now();
                if let Some(m) = &self.metrics {
                    m.taken(upstream, seq, taken);
                }
                let mut active = Active::new(upstream, job, items.clone(), attempts, taken);
                if let Some(read) = &read {
                    let now = self.now();
                    let kept = self.caches[upstream].fresh(read.route, &read.key, &read.sent, now);
                    if let Some(kept) = kept {
                        // Answered from the cache: no call, no quota.
                        let settled = Settled::Done;
                        finish(
                            sink,
                            seq,
                            &active,
                            self.config,
                            &settled,
                            Some(kept.status.as_u16()),
                            Some(Seen::Whole(&kept.body)),
                            now,
                            self.metrics.as_deref(),
                        );
                        self.saved[upstream].0 += 1;
                        self.progress.finished(false);
                        return;
                    }
                    let id = (upstream, read.route, read.key.clone());
                    if let Some(leader) = self.reading.get(&id) {
                        // A job alike is queued or in flight: its answer
                        // is this one's too.
                        self.followers.entry(*leader).or_default().push(seq);
                        self.active.insert(seq, active);
                        return;
                    }
                    self.reading.insert(id, seq);
                }
                active.read = read;
                let (priority, workflow) = (active.job.priority, active.job.workflow.as_deref());
                self.schedulers[upstream].push_job(seq, priority, attempts, workflow, items);
                self.active.insert(seq, active);
            }
            Err(reason) => self.dead_on_arrival(seq, upstream, job, attempts, reason, sink),
        }
    }

    /// The read `job` is, if a cache route of its upstream covers it.
    fn read_of(&self, upstream: usize, job: &Job) -> Option<Read> {
        let cache = &self.caches[upstream];
        if cache.is_empty() || job.body.is_some() {
            return None;
        }
        let url = tollgate_jobs::JobUrl::new(&job.url).ok()?;
        let (route, _) = cache.route_for(&job.method, url.path())?;
        let u = &self.config.upstreams[upstream];
        let sent = sent_headers(u, job);
        Some(Read {
            route,
            key: Key {
                method: job.method.clone(),
                url: job.url.clone(),
                partition: u.partition(None, &sent),
            },
            sent,
            epoch: cache.epoch(route),
        })
    }

    /// Dead-letter a job that never reached a scheduler.
    pub(crate) fn dead_on_arrival(
        &mut self,
        seq: u64,
        upstream: usize,
        job: Job,
        attempts: u32,
        reason: String,
        sink: &impl Sink,
    ) {
        let now = self.now();
        if let Some(m) = &self.metrics {
            m.taken(upstream, seq, now);
        }
        let dead = Active::new(upstream, job, Vec::new(), attempts, now);
        finish(
            sink,
            seq,
            &dead,
            self.config,
            &Settled::Dead { reason },
            None,
            None,
            now,
            self.metrics.as_deref(),
        );
        self.early_dead[upstream] += 1;
        self.progress.finished(true);
    }

    /// Send what the schedulers allow now; the earliest instant something
    /// may go next, if they are waiting for one.
    pub(crate) fn dispatch(&mut self, now: Nanos, sink: &impl Sink) -> Option<Nanos> {
        let mut wake: Option<Nanos> = None;
        for u in 0..self.schedulers.len() {
            loop {
                match self.schedulers[u].next(now) {
                    Next::Send { seq, attempt } => {
                        let Some(a) = self.active.get_mut(&seq) else {
                            continue;
                        };
                        a.first_sent.get_or_insert(now);
                        a.sent = now;
                        a.attempts = attempt;
                        self.sent_calls[u].push((a.job.priority, a.items.clone()));
                        let task = send(
                            &self.clients[u],
                            &self.config.upstreams[u],
                            &a.job,
                            seq,
                            self.clock.clone(),
                            self.tx.clone(),
                        );
                        self.in_flight.insert(seq, tokio::spawn(task));
                    }
                    Next::Reject { seq, reason } => {
                        if let Some(a) = self.active.remove(&seq) {
                            finish(
                                sink,
                                seq,
                                &a,
                                self.config,
                                &Settled::Dead { reason },
                                None,
                                None,
                                now,
                                self.metrics.as_deref(),
                            );
                            self.progress.finished(true);
                        }
                    }
                    Next::Wait(at) => {
                        wake = Some(wake.map_or(at, |w: Nanos| w.min(at)));
                        break;
                    }
                    Next::Blocked | Next::Idle => break,
                }
            }
            for event in self.schedulers[u].drain_events() {
                let name = &self.config.upstreams[u].name;
                self.progress.log(&event.describe(name, now));
                // (Kept per upstream: the slowest key's pace.)
                if matches!(event, Event::Slowed { .. } | Event::Restored { .. }) {
                    sink.learnt(name, self.schedulers[u].effective_rate());
                }
                if let (Event::Paused { until, .. }, Some(Some(pauses))) =
                    (&event, self.pauses.get(u))
                {
                    let (pauses, until) = (pauses.clone(), *until);
                    tokio::spawn(async move { pauses.publish(until).await });
                }
            }
        }
        wake
    }

    /// Wait until what this run's writes changed is evicted from the
    /// fleet's shared cache (each within `[store] timeout`).
    pub(crate) async fn evicted(&mut self) {
        while self.evicting.join_next().await.is_some() {}
    }

    /// Start each upstream at the pace earlier runs learnt for it.
    pub(crate) fn resume_paces(&mut self, paces: &HashMap<String, f64>) {
        for (u, s) in self.config.upstreams.iter().zip(&mut self.schedulers) {
            let Some(&rate) = paces.get(&u.name) else {
                continue;
            };
            s.resume_pace(rate);
            if let (Some(rate), Some(limits)) = (s.effective_rate(), s.limits_rate()) {
                self.progress.log(&format!(
                    "{}: starting at the {rate:.1}/s an earlier run learnt (the limits allow {limits:.1}/s), rising while calls succeed",
                    u.name
                ));
            }
        }
    }

    /// `run --admin`: the admin listener for the length of the run (it
    /// stops when what this returns is dropped), and the metrics it shows.
    pub(crate) async fn open_admin(
        &mut self,
        options: &Options,
    ) -> Result<Option<Admin>, RunError> {
        let Some(addr) = options.admin else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RunError::Admin(format!("--admin {addr}: {e}")))?;
        let engines = self
            .config
            .upstreams
            .iter()
            .cloned()
            .zip(self.schedulers.iter().map(|s| s.shared_engine()))
            .collect();
        let metrics = Arc::new(crate::metrics::RunMetrics::new(engines));
        self.metrics = Some(metrics.clone());
        let daily = self
            .config
            .upstreams
            .iter()
            .flat_map(|u| u.daily_limits())
            .collect();
        let watch = tollgate_watch::Watch::open(
            tollgate_watch::dashboard::Face::Run,
            &options.watch,
            options.state_dir.as_deref(),
            daily,
            tollgate_watch::unix_now(),
        )
        .and_then(|w| match self.config.redis() {
            Some(store) => w.with_fleet(store),
            None => Ok(w),
        })
        .map(Arc::new)
        .map_err(RunError::Admin)?;
        let scraping = {
            let (metrics, clock) = (metrics.clone(), self.clock.clone());
            tokio::spawn(watch.clone().run(move || {
                use tollgate_core::Clock;
                metrics.render(clock.now())
            }))
        };
        let serving = crate::metrics::serve_admin(
            listener,
            metrics,
            watch.clone(),
            self.clock.clone(),
            options.admin_token.clone(),
        );
        Ok(Some(Admin {
            watch,
            _tasks: [AbortOnDrop(tokio::spawn(serving)), AbortOnDrop(scraping)],
        }))
    }

    /// The run's last figures into the history, before its admin listener
    /// goes.
    pub(crate) fn last_figures(&self, admin: Option<&Admin>) {
        if let (Some(admin), Some(metrics)) = (admin, &self.metrics) {
            self.show_lines();
            admin
                .watch
                .tick(tollgate_watch::unix_now(), || metrics.render(self.now()));
        }
    }

    /// Each upstream's line into the metrics, when an admin listener shows them.
    pub(crate) fn show_lines(&self) {
        let Some(m) = &self.metrics else {
            return;
        };
        let now = self.now();
        m.lines(self.schedulers.iter().enumerate().map(|(i, s)| {
            let line = crate::metrics::UpstreamNow {
                pending: s.queued() + s.in_flight(),
                breaker_open: s.breaker_open_until().is_some_and(|t| t > now),
                effective_rate: s.pacing_rate(now),
                limits_rate: s.limits_rate(),
            };
            (i, line)
        }));
    }

    /// Nothing queued, waiting out a backoff or in flight.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.schedulers.iter().all(|s| s.queued() == 0)
    }

    /// A reply: the scheduler decides what it means, and a final outcome is
    /// recorded.
    pub(crate) fn settle(&mut self, c: Completion, now: Nanos, sink: &impl Sink) {
        self.in_flight.remove(&c.seq);
        self.last_reply = now;
        let Some(a) = self.active.get(&c.seq) else {
            return;
        };
        let latency = Duration::from_nanos(now.saturating_sub(a.sent));
        if let Some(m) = &self.metrics {
            m.call(
                a.upstream,
                match &c.reply {
                    Reply::Status { status, .. } => Some(*status),
                    Reply::Failed { .. } => None,
                },
            );
        }
        let settled = self.schedulers[a.upstream].complete(c.seq, &c.reply, latency, now);
        if let Settled::Retry { .. } = settled {
            sink.record(
                a,
                Record::Retry {
                    seq: c.seq,
                    attempts: a.attempts,
                    sent_at: a.sent,
                },
            );
            return;
        }
        let status = match c.reply {
            Reply::Status { status, .. } => Some(status),
            Reply::Failed { .. } => None,
        };
        let dead = matches!(settled, Settled::Dead { .. });
        finish(
            sink,
            c.seq,
            a,
            self.config,
            &settled,
            status,
            c.body.as_ref().map(Received::seen),
            now,
            self.metrics.as_deref(),
        );
        self.progress.finished(dead);
        let Some(a) = self.active.remove(&c.seq) else {
            return;
        };
        let cache = &self.caches[a.upstream];
        if !cache.is_empty() && !matches!(a.job.method.as_str(), "GET" | "HEAD") {
            // What a write changed is not answered from the cache again.
            if let Ok(url) = tollgate_jobs::JobUrl::new(&a.job.url) {
                let touched = cache.written(url.path());
                if let (Some(shared), true) = (&self.shared[a.upstream], touched > 0) {
                    let (shared, path) = (shared.clone(), url.path().to_string());
                    self.evicting.spawn(async move {
                        let _ = shared.written(&path).await;
                    });
                }
            }
        }
        if let Some(read) = a.read {
            self.landed(
                a.upstream, c.seq, read, &settled, status, c.headers, c.body, now, sink,
            );
        }
    }

    /// A read's final answer: kept if the rules allow it, and given to the
    /// jobs alike that waited for it (when there was an answer; else they
    /// go on their own).
    #[allow(clippy::too_many_arguments)]
    fn landed(
        &mut self,
        upstream: usize,
        seq: u64,
        read: Read,
        settled: &Settled,
        status: Option<u16>,
        headers: Option<http::HeaderMap>,
        body: Option<Received>,
        now: Nanos,
        sink: &impl Sink,
    ) {
        self.reading
            .remove(&(upstream, read.route, read.key.clone()));
        let followers = self.followers.remove(&seq).unwrap_or_default();
        let answered = status
            .and_then(|s| http::StatusCode::from_u16(s).ok())
            .zip(headers);
        let Some((status, headers)) = answered else {
            for follower in followers {
                if let Some(f) = self.active.get_mut(&follower) {
                    let items = f.items.to_vec();
                    let (priority, workflow) = (f.job.priority, f.job.workflow.as_deref());
                    self.schedulers[upstream]
                        .push_job(follower, priority, f.attempts, workflow, items);
                }
            }
            return;
        };
        let cache = &self.caches[upstream];
        let route = cache.route(read.route);
        let ttl = freshness(route, status, &read.sent, &headers, wall(now));
        let body = body.unwrap_or_default();
        // (a body longer than any route keeps is not kept: it was only digested)
        if let (Some(ttl), Settled::Done, Some(whole)) = (ttl, settled, body.whole()) {
            let stored = Stored::new(status, headers, whole.clone(), &read.sent, ttl, now);
            cache.put(read.route, read.key, Arc::new(stored), read.epoch);
        }
        let dead = matches!(settled, Settled::Dead { .. });
        for follower in followers {
            if let Some(f) = self.active.remove(&follower) {
                finish(
                    sink,
                    follower,
                    &f,
                    self.config,
                    settled,
                    Some(status.as_u16()),
                    Some(body.seen()),
                    now,
                    self.metrics.as_deref(),
                );
                let saved = &mut self.saved[upstream];
                if dead {
                    saved.1 += 1
                } else {
                    saved.0 += 1
                }
                self.progress.finished(dead);
            }
        }
    }

    /// Abort what is still in flight (after the grace period); replies that
    /// made it before count.
    pub(crate) fn abort_in_flight(&mut self, sink: &impl Sink) {
        for (_, task) in self.in_flight.drain() {
            task.abort();
        }
        let now = self.now();
        while let Ok(c) = self.rx.try_recv() {
            self.settle(c, now, sink);
        }
    }

    /// Per upstream: calls, outcomes and the least time the limits allow
    /// for the calls made.
    pub(crate) fn summary(self, interrupted: bool, pending: u64) -> Summary {
        self.progress.done();
        let elapsed = Duration::from_nanos(self.last_reply.saturating_sub(self.start));
        let start = self.start;
        let upstreams = self
            .config
            .upstreams
            .iter()
            .zip(&self.schedulers)
            .zip(self.sent_calls)
            .zip(self.early_dead)
            .zip(self.saved)
            .map(
                |((((u, s), calls), early_dead), (saved_done, saved_dead))| {
                    let c = s.counters();
                    let calls = calls.into_iter().map(|(p, items)| (p, items.to_vec()));
                    let estimate = plan::estimate(
                        &u.policy,
                        calls,
                        start,
                        Duration::ZERO,
                        u.concurrency,
                        None,
                        Some(u),
                        &self.config.schedules(),
                    );
                    UpstreamSummary {
                        name: u.name.clone(),
                        calls: c.sent,
                        done: c.done + saved_done,
                        dead: c.dead + early_dead + saved_dead,
                        retried: c.retried,
                        throttled: c.throttled,
                        shortest: estimate.shortest,
                        binding: s.binding_limit().map(str::to_owned),
                        learnt: s.effective_rate(),
                        profile_rate: tollgate_comply::pace::sustained_rate(&u.policy),
                        saved: saved_done + saved_dead,
                    }
                },
            )
            .collect();
        Summary {
            upstreams,
            elapsed,
            interrupted,
            pending,
            fleet: None,
        }
    }
}

/// Run every pending job of `state` until each has a final outcome, or
/// `shutdown` resolves (then requests in flight get `options.grace`).
pub async fn run(
    config: &UpstreamsConfig,
    state: &State,
    clock: TokioClock,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, RunError> {
    let pending = state.pending()?;
    run_pending(config, state, pending, clock, options, shutdown).await
}

/// `run`, given `state`'s pending jobs (from `State::import_pending`, which
/// hands over the jobs it has just added instead of reading them back).
pub async fn run_pending(
    config: &UpstreamsConfig,
    state: &State,
    pending: Vec<Pending>,
    clock: TokioClock,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, RunError> {
    let index: HashMap<&str, usize> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();
    // A pending job goes only where the current config would send it.
    for p in &pending {
        let Some(&upstream) = index.get(p.upstream.as_str()) else {
            return Err(RunError::UnknownUpstream {
                jobs: pending.iter().filter(|q| q.upstream == p.upstream).count(),
                upstream: p.upstream.clone(),
            });
        };
        let routed = tollgate_jobs::JobUrl::new(&p.job.url)
            .ok()
            .and_then(|url| url.upstream(config));
        if routed != Some(upstream) {
            return Err(RunError::Moved {
                id: p.job.id.clone(),
                upstream: p.upstream.clone(),
                url: p.job.url.clone(),
            });
        }
    }
    let schedulers: Vec<Scheduler> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let engine = Engine::new(tollgate_comply::pace::with_margin(&u.policy));
            Scheduler::for_upstream(engine, u, config, options.seed.wrapping_add(i as u64))
        })
        .collect();
    let writer = state.writer()?;
    let progress = Progress::new(options.progress, pending.len() as u64);
    let mut driver = Driver::new(config, schedulers, clock, progress, &options.proxies)?;
    let admin = driver.open_admin(&options).await?;
    driver.resume_paces(&state.paces()?);
    replay_sends(config, state, &driver.schedulers, &index, driver.start)?;
    for p in pending {
        let upstream = index[p.upstream.as_str()];
        driver.admit(p.seq, upstream, p.job, p.attempts, &writer);
    }

    let mut stopping = false;
    let mut deadline = None;
    tokio::pin!(shutdown);
    let mut writer_failed = false;
    loop {
        let now = driver.now();
        let mut wake: Option<Nanos> = None;
        if !stopping && !writer.alive() {
            writer_failed = true;
            stopping = true;
            deadline = Some(tokio::time::Instant::now() + options.grace);
            driver
                .progress
                .log("the state writer stopped; sending no more");
        }
        if !stopping {
            wake = driver.dispatch(now, &writer);
        }
        driver.show_lines();
        if driver.in_flight.is_empty() && (stopping || (wake.is_none() && driver.idle())) {
            break;
        }
        tokio::select! {
            Some(done) = driver.rx.recv() => {
                let now = driver.now();
                let mut next = Some(done);
                while let Some(c) = next {
                    driver.settle(c, now, &writer);
                    next = driver.rx.try_recv().ok();
                }
            }
            _ = sleep_until(&driver.clock, wake), if wake.is_some() => {}
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                deadline = Some(tokio::time::Instant::now() + options.grace);
                driver.progress.log(&format!("stopping: waiting up to {} for {} request(s) in flight", human(options.grace), driver.in_flight.len()));
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                driver.abort_in_flight(&writer);
                break;
            }
        }
    }
    driver.evicted().await;
    driver.last_figures(admin.as_ref());
    drop(admin);
    for (u, s) in config.upstreams.iter().zip(&driver.schedulers) {
        writer.learnt(&u.name, s.effective_rate());
    }
    let summary = driver.summary(stopping, 0);
    match writer.finish() {
        Err(e) if writer_failed => return Err(RunError::Writer(e)),
        other => other?,
    }
    Ok(Summary {
        pending: state.counts()?.pending,
        ..summary
    })
}

/// The admin listener of `run --admin` and its watch, stopped when dropped.
pub(crate) struct Admin {
    watch: Arc<tollgate_watch::Watch>,
    _tasks: [AbortOnDrop; 2],
}

/// A task stopped when this is dropped (the run's admin listener).
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Longest any window looks back (a day's quota, a rolling 24 h); sends
/// older than this are forgotten.
const REPLAY_HORIZON: Nanos = 2 * 86_400 * 1_000_000_000;

/// Charge the sends of earlier runs still inside their windows, so a
/// resumed run starts from the quota the last one left (not a full burst).
fn replay_sends(
    config: &UpstreamsConfig,
    state: &State,
    schedulers: &[Scheduler],
    index: &HashMap<&str, usize>,
    now: Nanos,
) -> Result<(), StateError> {
    let since = now.saturating_sub(REPLAY_HORIZON);
    for (at, upstream, job) in state.sends_since(since)? {
        let Some(&u) = index.get(upstream.as_str()) else {
            continue;
        };
        let Ok(items) = crate::job::items(&config.upstreams[u], &job) else {
            continue;
        };
        let engine = schedulers[u].engine();
        if let Ok(decision) = engine.decide(&items, at.min(now), false) {
            // Long finished: release concurrency slots at once.
            let committed: Vec<Item> = tollgate_store::committed(&items, &decision)
                .cloned()
                .collect();
            engine.finish_committed(&committed, at.min(now), 0);
        }
    }
    Ok(())
}

pub(crate) async fn sleep_until(clock: &TokioClock, at: Option<Nanos>) {
    if let Some(at) = at {
        tokio::time::sleep_until(clock.instant_at(at)).await;
    }
}

/// A job's headers as sent, one value per name: the upstream's, then the
/// job's (which win).
fn sent_headers(upstream: &Upstream, job: &Job) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for (name, value) in upstream.headers.iter().chain(&job.headers) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers
}

/// One attempt of a job: a future that sends it and reports how it came back.
/// `timeout` bounds the whole attempt, its response body included.
fn send(
    client: &UpstreamClient,
    upstream: &Upstream,
    job: &Job,
    seq: u64,
    clock: TokioClock,
    tx: mpsc::UnboundedSender<Completion>,
) -> impl Future<Output = ()> + Send + 'static {
    let request = attempt(upstream, job);
    let (client, timeout) = (client.clone(), upstream.timeout);
    // What is kept of a body: what a cache route of the upstream keeps of
    // one, or what a result line shows.
    let keep = (upstream.cache.iter())
        .map(|r| usize::try_from(r.max_entry_bytes).unwrap_or(usize::MAX))
        .max()
        .unwrap_or(0)
        .max(tollgate_jobs::result::BODY_INLINE);
    async move {
        let exchange = async {
            let response = client.request(request?).await.map_err(|e| failure(&e))?;
            let (head, body) = response.into_parts();
            let body = Received::read(body, keep).await?;
            Ok::<_, String>((head, body))
        };
        let (reply, headers, body) = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((head, body))) => {
                let get = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
                let retry_after = signals::retry_after(get("retry-after"), wall(clock.now()));
                let corrections = signals::corrections_in(&head.headers);
                let reply = Reply::Status {
                    status: head.status.as_u16(),
                    retry_after,
                    corrections,
                };
                (reply, Some(head.headers), Some(body))
            }
            Ok(Err(error)) => (Reply::Failed { error }, None, None),
            Err(_) => (
                Reply::Failed {
                    error: "timed out".into(),
                },
                None,
                None,
            ),
        };
        let _ = tx.send(Completion {
            seq,
            reply,
            headers,
            body,
        });
    }
}

/// A job's request as sent: the upstream's and the job's headers, what the
/// runner adds unless the job set it, and its body.
fn attempt(upstream: &Upstream, job: &Job) -> Result<http::Request<Full<Bytes>>, String> {
    let method = http::Method::from_bytes(job.method.as_bytes()).unwrap_or(http::Method::GET);
    let url = tollgate_jobs::JobUrl::new(&job.url).map_err(|e| format!("request failed ({e})"))?;
    let mut headers = sent_headers(upstream, job);
    if let Ok(key) = http::HeaderValue::from_str(&job.idempotency_key) {
        headers.entry("idempotency-key").or_insert(key);
    }
    if job.body.is_some() && job.json {
        headers
            .entry(http::header::CONTENT_TYPE)
            .or_insert(http::HeaderValue::from_static("application/json"));
    }
    // (what the runner's requests have always carried)
    headers
        .entry(http::header::ACCEPT)
        .or_insert(http::HeaderValue::from_static("*/*"));
    let body = job.body.clone().map(Bytes::from).unwrap_or_default();
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = url.into_uri();
    *request.headers_mut() = headers;
    Ok(request)
}

/// Record a final outcome with its `results.jsonl` line.
#[allow(clippy::too_many_arguments)]
fn finish(
    sink: &impl Sink,
    seq: u64,
    a: &Active,
    config: &UpstreamsConfig,
    settled: &Settled,
    status: Option<u16>,
    body: Option<Seen<'_>>,
    now: Nanos,
    metrics: Option<&crate::metrics::RunMetrics>,
) {
    if let Some(m) = metrics {
        m.finished(
            a.upstream,
            seq,
            a.taken,
            !matches!(settled, Settled::Done),
            now,
        );
    }
    let outcome = tollgate_jobs::result::Outcome {
        id: &a.job.id,
        upstream: &config.upstreams[a.upstream].name,
        dead: !matches!(settled, Settled::Done),
        reason: match settled {
            Settled::Dead { reason } => Some(reason.clone()),
            _ => None,
        },
        status,
        attempts: a.attempts,
        elapsed_ms: a.first_sent.map(|f| now.saturating_sub(f) as f64 / 1e6),
        latency_ms: (a.sent > 0).then(|| now.saturating_sub(a.sent) as f64 / 1e6),
        body,
    };
    sink.record(a, outcome.record(seq, (a.sent > 0).then_some(a.sent)));
}

/// Progress: a bar on a terminal, a line every 500 jobs otherwise.
pub(crate) struct Progress {
    mode: ProgressMode,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    finished: std::cell::Cell<u64>,
    dead: std::cell::Cell<u64>,
    started: std::time::Instant,
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode, total: u64) -> Self {
        let bar = (mode == ProgressMode::Auto && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} jobs  {per_sec}  eta {eta}  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            mode,
            bar,
            total,
            finished: Default::default(),
            dead: Default::default(),
            started: std::time::Instant::now(),
        }
    }

    pub(crate) fn finished(&self, dead: bool) {
        let n = self.finished.get() + 1;
        self.finished.set(n);
        if dead {
            self.dead.set(self.dead.get() + 1);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(n);
            if dead {
                bar.set_message(format!("{} dead", self.dead.get()));
            }
        } else if self.mode != ProgressMode::Quiet && n.is_multiple_of(LOG_EVERY) {
            let elapsed = self.started.elapsed().as_secs_f64();
            let rate = n as f64 / elapsed.max(1e-9);
            let eta =
                Duration::from_secs_f64((self.total.saturating_sub(n)) as f64 / rate.max(1e-9));
            eprintln!(
                "tollgate run: {n}/{} jobs finished ({} dead), {rate:.1} jobs/s, eta {}",
                self.total,
                self.dead.get(),
                human(eta)
            );
        }
    }

    pub(crate) fn log(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("tollgate run: {line}")),
            None if self.mode != ProgressMode::Quiet => eprintln!("tollgate run: {line}"),
            None => {}
        }
    }

    pub(crate) fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The start of a body, as text, kept with a dead letter.
/// The wall time a clock reading stands for (for `Retry-After` dates).
fn wall(now: Nanos) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(now)
}
