//! Job intake: producers push work to the proxy instead of writing files.
//!
//! `POST /_tollgate/jobs` takes jobs in `tollgate run`'s format (JSONL, or
//! one JSON object), records them in the same durable state as `run`
//! (`[proxy] state`) before it answers 202, and the proxy sends them
//! through the same line as its live requests: as queued work, after the
//! live requests waiting and only above an upstream's `reserve`. A live
//! request sent with `Prefer: respond-async` is queued the same way.
//! `GET /_tollgate/jobs/ID` tells where a job is. A restart resumes every
//! job still pending (at least once: one in flight at a crash goes again,
//! with the same `Idempotency-Key`).

use crate::call::{Control, Outcome, Outgoing, ResponseBody};
use crate::callbacks::{callback_header, Courier};
use crate::fleet_jobs::FleetJobs;
use crate::state::{Generation, Proxy};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use hyper::{Method, Response, StatusCode};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tollgate_comply::retry::{classify, Class};
use tollgate_core::{Clock, Nanos};
use tollgate_http::admin::{json, problem};
use tollgate_http::{Peer, Refusal};
use tollgate_jobs::fleet::QueueError;
use tollgate_jobs::state::{Pending, Record, StateError, Writer};
use tollgate_jobs::{Job, JobsError, Routed, State};

/// The intake's path (under the reserved first segment).
pub(crate) const JOBS_PATH: &str = "/_tollgate/jobs";
/// The most bytes one intake request may carry.
const MAX_INTAKE_BYTES: usize = 64 << 20;
/// Jobs in the upstreams' lines at once; the rest wait in the state, in
/// order (memory stays bounded however many are queued).
const IN_LINE: usize = 10_000;
/// How long a job waits in line before it is entered again (it never
/// expires: queued work waits as long as the limits say).
const LINE_WAIT: Duration = Duration::from_secs(86_400);
/// The longest pause before a job that could not be sent now (breaker
/// open, store down, keys parked) tries again.
const MOST_LATER: Duration = Duration::from_secs(30);
/// The most of a job's response body read for its result.
const MAX_RESULT_BODY: usize = 16 << 20;

/// The jobs of one proxy: opened on the first job pushed, or at start when
/// the state already exists (its pending jobs are resumed).
#[derive(Debug)]
pub(crate) struct Desk {
    open: Mutex<Option<Arc<Open>>>,
    /// On a fleet config: the fleet's queue in Redis, instead of `open`.
    fleet: tokio::sync::OnceCell<Arc<FleetJobs>>,
}

/// An open state and the jobs this process is sending.
struct Open {
    dir: PathBuf,
    /// Intake and lookups (the writer thread has its own connection).
    state: Mutex<State>,
    /// Outcomes and attempts (taken at shutdown, to commit what is left).
    writer: Mutex<Option<Writer>>,
    /// Jobs not yet in a line, oldest first.
    waiting: Mutex<VecDeque<Pending>>,
    /// Jobs whose workflow's window is closed, by when it opens.
    aside: Mutex<std::collections::BTreeMap<Nanos, Vec<Pending>>>,
    more: Notify,
    in_line: Arc<Semaphore>,
    /// Every pending job this process knows, by seq.
    tracked: Mutex<HashMap<u64, Tracked>>,
    /// Delivers results to the jobs' callback URLs.
    courier: Courier,
}

impl std::fmt::Debug for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Open")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A pending job as the metrics and `GET /_tollgate/jobs/ID` see it.
#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    pub(crate) upstream: String,
    pub(crate) workflow: Option<String>,
    /// When it was queued here (resumed jobs: when this process took them).
    pub(crate) since: Nanos,
    /// Attempts sent so far by this process (0: still queued).
    pub(crate) attempts: Arc<AtomicU32>,
}

/// How a job's try ended.
enum Tried {
    Final(Record),
    /// It could not be sent now and goes again after this wait.
    Later(Duration),
}

impl Desk {
    pub(crate) fn new() -> Desk {
        Desk {
            open: Mutex::new(None),
            fleet: tokio::sync::OnceCell::new(),
        }
    }

    /// The open state, opening it (and resuming its pending jobs) on first
    /// use. Blocking: SQLite.
    fn ensure(&self, proxy: &Arc<Proxy>, dir: &Path) -> Result<Arc<Open>, StateError> {
        let mut open = self.open.lock();
        if let Some(o) = open.as_ref() {
            return Ok(o.clone());
        }
        let state = State::open(dir)?;
        let writer = state.writer()?;
        let pending = state.pending()?;
        let callbacks = state.pending_callbacks()?;
        let o = Arc::new_cyclic(|weak: &Weak<Open>| {
            let (recorder, metrics) = (weak.clone(), Arc::downgrade(proxy));
            let secret = crate::callbacks::secret(&proxy.current().settings);
            Open {
                dir: dir.to_path_buf(),
                state: Mutex::new(state),
                writer: Mutex::new(Some(writer)),
                waiting: Mutex::new(VecDeque::new()),
                aside: Mutex::new(std::collections::BTreeMap::new()),
                more: Notify::new(),
                in_line: Arc::new(Semaphore::new(IN_LINE)),
                tracked: Mutex::new(HashMap::new()),
                courier: Courier::start(
                    proxy.callback_client.clone(),
                    secret,
                    move |callback, _, outcome| {
                        if let Some(proxy) = metrics.upgrade() {
                            proxy.metrics.callback(outcome.is_ok());
                        }
                        if let Some(open) = recorder.upgrade() {
                            let seq = callback.seq;
                            open.record(match outcome {
                                Ok(()) => Record::Delivered { seq },
                                Err(error) => Record::Undelivered { seq, error },
                            });
                        }
                    },
                ),
            }
        });
        for callback in callbacks {
            let id = callback_job_id(&callback.body);
            o.courier.send(callback, id);
        }
        if !pending.is_empty() {
            tracing::info!(
                "jobs: resuming {} pending job(s) from {}",
                pending.len(),
                dir.display()
            );
        }
        o.queue(pending, proxy.clock.now());
        tokio::spawn(pump(Arc::downgrade(proxy), o.clone()));
        *open = Some(o.clone());
        Ok(o)
    }

    /// The fleet's queue (connected, and leased from, on first use).
    async fn fleet(&self, proxy: &Arc<Proxy>) -> Result<&Arc<FleetJobs>, QueueError> {
        self.fleet.get_or_try_init(|| FleetJobs::start(proxy)).await
    }

    /// At start: on a fleet config, work the fleet's queue; else resume the
    /// state's pending jobs if it exists.
    pub(crate) fn resume(&self, proxy: &Arc<Proxy>) {
        if proxy.current().config.redis().is_some() {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                loop {
                    match proxy.jobs.fleet(&proxy).await {
                        Ok(_) => return,
                        Err(e) => {
                            tracing::warn!("jobs: the fleet's queue cannot be reached yet: {e}");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                }
            });
            return;
        }
        let dir = proxy.current().settings.state.clone();
        if !dir.join("state.sqlite").exists() {
            return;
        }
        let proxy = proxy.clone();
        // (SQLite: off the runtime's threads)
        tokio::task::spawn_blocking(move || {
            if let Err(e) = proxy.jobs.ensure(&proxy, &dir) {
                tracing::error!("jobs: cannot open the state {}: {e}", dir.display());
            }
        });
    }

    /// At shutdown: commit the outcomes recorded so far. Jobs still pending
    /// stay in the state for the next start.
    pub(crate) fn close(&self) {
        let Some(open) = self.open.lock().clone() else {
            return;
        };
        let writer = open.writer.lock().take();
        if let Some(Err(e)) = writer.map(Writer::finish) {
            tracing::error!("jobs: recording outcomes failed: {e}");
        }
    }

    /// The pending jobs this process knows, per upstream and workflow, at
    /// `now` (for the metrics).
    pub(crate) fn now(&self, now: Nanos) -> Vec<crate::metrics::JobsNow> {
        // upstream -> workflow -> (pending, the oldest's queued time); the
        // names are copied once per pair, not per job
        type Per =
            std::collections::BTreeMap<String, std::collections::BTreeMap<String, (usize, Nanos)>>;
        let mut per = Per::new();
        let mut count = |tracked: &HashMap<u64, Tracked>| {
            for t in tracked.values() {
                if !per.contains_key(&t.upstream) {
                    per.insert(t.upstream.clone(), Default::default());
                }
                let workflows = per.get_mut(&t.upstream).expect("inserted above");
                let workflow = t.workflow.as_deref().unwrap_or("");
                if !workflows.contains_key(workflow) {
                    workflows.insert(workflow.to_string(), (0, t.since));
                }
                let entry = workflows.get_mut(workflow).expect("inserted above");
                entry.0 += 1;
                entry.1 = entry.1.min(t.since);
            }
        };
        if let Some(open) = self.open.lock().clone() {
            count(&open.tracked.lock());
        }
        if let Some(fleet) = self.fleet.get() {
            count(&fleet.tracked.lock());
        }
        per.into_iter()
            .flat_map(|(upstream, workflows)| {
                workflows
                    .into_iter()
                    .map(
                        move |(workflow, (pending, since))| crate::metrics::JobsNow {
                            upstream: upstream.clone(),
                            workflow,
                            pending,
                            oldest_seconds: now.saturating_sub(since) as f64 / 1e9,
                        },
                    )
            })
            .collect()
    }
}

impl Open {
    fn queue(&self, jobs: Vec<Pending>, now: Nanos) {
        if jobs.is_empty() {
            return;
        }
        {
            let mut tracked = self.tracked.lock();
            for p in &jobs {
                tracked.insert(p.seq, Tracked::new(p, now, Arc::default()));
            }
        }
        self.waiting.lock().extend(jobs);
        self.more.notify_one();
    }

    fn record(&self, record: Record) {
        if let Some(writer) = self.writer.lock().as_ref() {
            writer.record(record);
        }
    }
}

/// Hands the waiting jobs to the lines, at most `IN_LINE` at once. A job
/// whose workflow's window is closed is set aside until it opens, so it
/// holds no place in line meanwhile.
async fn pump(proxy: Weak<Proxy>, open: Arc<Open>) {
    loop {
        let Ok(slot) = open.in_line.clone().acquire_owned().await else {
            return;
        };
        let (proxy, next) = loop {
            let next = open.waiting.lock().pop_front();
            let Some(p) = next else {
                open.more.notified().await;
                continue;
            };
            let Some(proxy) = proxy.upgrade() else {
                return;
            };
            match closed_until(&proxy, &p.job) {
                Some(opens) => set_aside(&proxy, &open, p, opens),
                None => break (proxy, p),
            }
        };
        let open = open.clone();
        tokio::spawn(async move {
            send_until_final(proxy, &open, next).await;
            drop(slot);
        });
    }
}

/// A job's final outcome in the access log (as `job_done` or `job_dead`,
/// its request id the job's id).
fn log_final(proxy: &Proxy, p: &Pending, record: &Record, first: Nanos) {
    let Record::Final {
        dead,
        attempts,
        status,
        ..
    } = record
    else {
        return;
    };
    if !proxy.access.enabled() {
        return;
    }
    let path = url::Url::parse(&p.job.url).map_or_else(|_| String::new(), |u| u.path().to_string());
    proxy.access.log(&tollgate_http::access::Entry {
        enabled: true,
        request_id: &p.job.id,
        ip: "-",
        method: &p.job.method,
        path: &path,
        status: status.unwrap_or(0),
        decision: if *dead { "job_dead" } else { "job_done" },
        limit: None,
        key: None,
        remaining: Vec::new(),
        // (from this process taking it to its final answer)
        hold_ms: proxy.clock.now().saturating_sub(first) as f64 / 1e6,
        upstream_ms: None,
        upstream: Some(&p.upstream),
        attempts: Some(*attempts),
    });
}

/// When the window of the job's workflow opens, if it is closed now.
fn closed_until(proxy: &Proxy, job: &Job) -> Option<Nanos> {
    let generation = proxy.current();
    let schedule = generation
        .config
        .workflow(job.workflow.as_deref()?)?
        .schedule
        .as_ref()?;
    schedule.opens(proxy.clock.now()).err()
}

/// Keep `p` aside until `opens`, then put it back at the head of the jobs
/// waiting (before the ones queued since).
fn set_aside(proxy: &Arc<Proxy>, open: &Arc<Open>, p: Pending, opens: Nanos) {
    let first = {
        let mut aside = open.aside.lock();
        let first = !aside.contains_key(&opens);
        aside.entry(opens).or_default().push(p);
        first
    };
    if !first {
        return;
    }
    let (open, wait) = (open.clone(), opens.saturating_sub(proxy.clock.now()));
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_nanos(wait)).await;
        let due = open.aside.lock().remove(&opens).unwrap_or_default();
        let mut waiting = open.waiting.lock();
        for p in due.into_iter().rev() {
            waiting.push_front(p);
        }
        drop(waiting);
        open.more.notify_one();
    });
}

/// Send one job until it has a final outcome, and record it.
async fn send_until_final(proxy: Arc<Proxy>, open: &Open, p: Pending) {
    let Some((attempts, since)) = open
        .tracked
        .lock()
        .get(&p.seq)
        .map(|t| (t.attempts.clone(), t.since))
    else {
        return;
    };
    let mut record = proxy.job_until_final(&p, &attempts, since).await;
    let deliver = match &mut record {
        Record::Final {
            dead,
            attempts,
            line,
            callback,
            ..
        } => {
            *callback = crate::callbacks::for_job(&p.job, p.seq, *dead, *attempts, line);
            callback.clone()
        }
        _ => None,
    };
    // (recorded first: the delivery's own record comes after it)
    open.record(record);
    if let Some(callback) = deliver {
        open.courier.send(callback, p.job.id.clone());
    }
    open.tracked.lock().remove(&p.seq);
}

impl Tracked {
    /// A pending job as taken by this process at `now`.
    pub(crate) fn new(p: &Pending, now: Nanos, attempts: Arc<AtomicU32>) -> Tracked {
        Tracked {
            upstream: p.upstream.clone(),
            workflow: p.job.workflow.clone(),
            since: now,
            attempts,
        }
    }
}

impl Proxy {
    /// `/_tollgate/jobs` on the proxy listener (its client already
    /// admitted).
    pub(crate) async fn jobs_endpoint(
        self: &Arc<Self>,
        parts: &hyper::http::request::Parts,
        body: Incoming,
        client: Option<&crate::Client>,
    ) -> Response<ResponseBody> {
        let path = parts.uri.path();
        if path == JOBS_PATH {
            if parts.method != Method::POST {
                return problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Method not allowed",
                    format!("{JOBS_PATH} takes POST (jobs as JSONL or one JSON object); GET {JOBS_PATH}/ID tells where one is"),
                );
            }
            return self.intake(parts, body, client).await;
        }
        match path.strip_prefix(JOBS_PATH).and_then(|r| r.strip_prefix('/')) {
            Some(id) if !id.is_empty() && parts.method == Method::GET => {
                self.job_status(id, client).await
            }
            _ => problem(
                StatusCode::NOT_FOUND,
                "Not found",
                format!("tollgate's own paths on this listener are POST {JOBS_PATH} and GET {JOBS_PATH}/ID"),
            ),
        }
    }

    /// `POST /_tollgate/jobs`: every line good, or nothing queued.
    async fn intake(
        self: &Arc<Self>,
        parts: &hyper::http::request::Parts,
        body: Incoming,
        client: Option<&crate::Client>,
    ) -> Response<ResponseBody> {
        let kind = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let one = match kind.as_deref() {
            Some("application/x-ndjson" | "application/jsonl" | "application/ndjson") => false,
            Some("application/json") => true,
            other => {
                return problem(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Unsupported media type",
                    format!(
                        "Content-Type {}: send jobs as application/x-ndjson (one job per line) or application/json (one job)",
                        other.unwrap_or("(none)")
                    ),
                )
            }
        };
        let bytes = match http_body_util::Limited::new(body, MAX_INTAKE_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Too many jobs at once",
                    format!(
                    "an intake request carries at most {MAX_INTAKE_BYTES} bytes; split the batch"
                ),
                )
            }
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Body not read",
                    format!("the request body could not be read: {e}"),
                )
            }
        };
        let text: Bytes = if one {
            // One object, as one line.
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v @ serde_json::Value::Object(_)) => Bytes::from(v.to_string()),
                Ok(_) => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "Not a job",
                        "application/json takes one job, a JSON object; send several as application/x-ndjson".into(),
                    )
                }
                Err(e) => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "Not a job",
                        format!("the body is not JSON: {e}"),
                    )
                }
            }
        } else {
            bytes
        };
        let generation = self.current();
        let mut routed = match tollgate_jobs::read_jobs(text.as_ref(), &generation.config) {
            Ok(r) => r,
            Err(JobsError::Lines(errors)) => {
                let detail = errors
                    .iter()
                    .map(|e| format!("line {}: {}", e.line, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Jobs refused; nothing was queued",
                    detail,
                );
            }
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Jobs refused; nothing was queued",
                    e.to_string(),
                )
            }
        };
        let callback = match callback_header(&parts.headers) {
            Ok(c) => c,
            Err(refusal) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Jobs refused; nothing was queued",
                    refusal.detail(),
                )
            }
        };
        for r in routed.iter_mut().filter(|r| r.job.callback.is_none()) {
            r.job.callback = callback.clone();
        }
        for r in routed.iter_mut() {
            r.job.client = client.map(|c| c.name.clone());
        }
        if let Some(workflow) = client.and_then(|c| c.workflow.as_ref()) {
            // A client's workflow is its jobs' unless they name one.
            for r in routed.iter_mut().filter(|r| r.job.workflow.is_none()) {
                r.job.workflow = Some(workflow.clone());
            }
        }
        match self.enqueue(&generation, routed).await {
            Ok((ids, added)) => {
                let mut r: Response<ResponseBody> = json(
                    StatusCode::ACCEPTED,
                    serde_json::json!({ "ids": ids, "queued": added, "already": ids.len() as u64 - added }),
                );
                if ids.len() == 1 {
                    if let Ok(v) = HeaderValue::from_str(&format!("{JOBS_PATH}/{}", ids[0])) {
                        r.headers_mut().insert(LOCATION, v);
                    }
                }
                r
            }
            Err(e) => e,
        }
    }

    /// Record jobs in the state and hand them to the lines; their ids, and
    /// how many were new.
    pub(crate) async fn enqueue(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        routed: Vec<Routed>,
    ) -> Result<(Vec<String>, u64), Response<ResponseBody>> {
        let mut routed = routed;
        for r in routed.iter_mut().filter(|r| r.job.callback.is_none()) {
            // A workflow's callback, unless the job names its own.
            let workflow = r
                .job
                .workflow
                .as_deref()
                .and_then(|w| generation.config.workflow(w));
            r.job.callback = workflow.and_then(|w| w.callback.clone());
        }
        if generation.config.redis().is_some() {
            return self.enqueue_in_fleet(generation, routed).await;
        }
        let proxy = self.clone();
        let generation = generation.clone();
        let dir = generation.settings.state.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let open = proxy.jobs.ensure(&proxy, &dir)?;
            let seqs = open.state.lock().enqueue(&routed, &generation.config)?;
            let ids: Vec<String> = routed.iter().map(|r| r.job.id.clone()).collect();
            let fresh: Vec<Pending> = routed
                .into_iter()
                .zip(&seqs)
                .filter_map(|(r, seq)| {
                    Some(Pending {
                        seq: (*seq)?,
                        upstream: generation.config.upstreams[r.upstream].name.clone(),
                        attempts: 0,
                        job: r.job,
                    })
                })
                .collect();
            let added = fresh.len() as u64;
            open.queue(fresh, proxy.clock.now());
            Ok::<_, StateError>((ids, added))
        })
        .await;
        match stored {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e @ StateError::IdInUse { .. })) => Err(problem(
                StatusCode::CONFLICT,
                "Job id in use",
                e.to_string(),
            )),
            Ok(Err(e)) => {
                tracing::error!("jobs: cannot record jobs: {e}");
                Err(not_recorded(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
            }
            Err(e) => Err(not_recorded(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            )),
        }
    }

    /// `enqueue` on a fleet config: into the fleet's queue in Redis.
    async fn enqueue_in_fleet(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        routed: Vec<Routed>,
    ) -> Result<(Vec<String>, u64), Response<ResponseBody>> {
        let fleet = self
            .jobs
            .fleet(self)
            .await
            .map_err(|e| not_recorded(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        match fleet.queue.import(&routed, &generation.config).await {
            Ok((added, _)) => Ok((routed.iter().map(|r| r.job.id.clone()).collect(), added)),
            Err(e @ QueueError::Conflict { .. }) => Err(problem(
                StatusCode::CONFLICT,
                "Job id in use",
                e.to_string(),
            )),
            Err(e) => Err(not_recorded(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        }
    }

    /// `GET /_tollgate/jobs/ID` on a fleet config.
    async fn job_status_in_fleet(
        self: &Arc<Self>,
        id: &str,
        client: Option<&crate::Client>,
    ) -> Response<ResponseBody> {
        let unknown = || {
            problem(
                StatusCode::NOT_FOUND,
                "No such job",
                format!("no job '{id}' is in the fleet's queue"),
            )
        };
        let fleet = match self.jobs.fleet(self).await {
            Ok(f) => f,
            Err(e) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Queue not read",
                    e.to_string(),
                )
            }
        };
        let (state, line, job) = match fleet.queue.status(id).await {
            Ok(Some(found)) => found,
            Ok(None) => return unknown(),
            Err(e) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Queue not read",
                    e.to_string(),
                )
            }
        };
        if job.as_ref().and_then(|j| j.client.as_deref()) != client.map(|c| c.name.as_str()) {
            return unknown();
        }
        let shown = match state.as_str() {
            "done" | "dead" | "pending" => state.as_str(),
            _ => "running",
        };
        status_answer(id, shown, 0, line)
    }

    /// Queue dead letters of the jobs' state again (all when `ids` is
    /// empty): the ids requeued, and those that are not dead letters.
    pub(crate) async fn requeue_dead(
        self: &Arc<Self>,
        ids: Vec<String>,
    ) -> Result<(Vec<String>, Vec<String>), String> {
        if self.current().config.redis().is_some() {
            // (the leases of the proxies of the fleet take them from there)
            let fleet = self.jobs.fleet(self).await.map_err(|e| e.to_string())?;
            return fleet
                .queue
                .requeue_dead(&ids)
                .await
                .map_err(|e| e.to_string());
        }
        let Some(open) = self.jobs.open.lock().clone() else {
            return Err("this proxy has no jobs' state open: no job was pushed to it".into());
        };
        let now = self.clock.now();
        tokio::task::spawn_blocking(move || {
            let mut state = open.state.lock();
            let (requeued, unknown) = state.requeue_dead(&ids).map_err(|e| e.to_string())?;
            let wanted: std::collections::HashSet<&String> = requeued.iter().collect();
            let again: Vec<Pending> = state
                .pending()
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|p| wanted.contains(&p.job.id))
                .collect();
            drop(state);
            open.queue(again, now);
            Ok((requeued, unknown))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// `GET /_tollgate/jobs/ID`.
    /// (Another client's job is answered as unknown: a client sees only
    /// what it pushed.)
    async fn job_status(
        self: &Arc<Self>,
        id: &str,
        client: Option<&crate::Client>,
    ) -> Response<ResponseBody> {
        if self.current().config.redis().is_some() {
            return self.job_status_in_fleet(id, client).await;
        }
        let open = self.jobs.open.lock().clone();
        let unknown = || {
            problem(
                StatusCode::NOT_FOUND,
                "No such job",
                format!("no job '{id}' was pushed to this proxy's state"),
            )
        };
        let Some(open) = open else {
            return unknown();
        };
        let (lookup, wanted) = (open.clone(), id.to_string());
        let found =
            tokio::task::spawn_blocking(move || lookup.state.lock().job_status(&wanted)).await;
        let status = match found {
            Ok(Ok(Some(s))) if s.client.as_deref() == client.map(|c| c.name.as_str()) => s,
            Ok(Ok(_)) => return unknown(),
            Ok(Err(e)) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "State not read",
                    e.to_string(),
                )
            }
            Err(e) => {
                return problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "State not read",
                    e.to_string(),
                )
            }
        };
        let sent_here = open
            .tracked
            .lock()
            .get(&status.seq)
            .map(|t| t.attempts.load(Ordering::Relaxed));
        let (shown, attempts) = match (status.state.as_str(), sent_here) {
            ("pending", Some(n)) if n > 0 => ("running", status.attempts.max(n)),
            (state, _) => (state, status.attempts),
        };
        status_answer(id, shown, attempts, status.result)
    }

    /// Try a job (queued at `since`) until it has a final outcome (logged
    /// and counted): its record. Used alike for jobs in a state and in a
    /// fleet's queue.
    pub(crate) async fn job_until_final(
        &self,
        p: &Pending,
        attempts: &Arc<AtomicU32>,
        since: Nanos,
    ) -> Record {
        let first = self.clock.now();
        let record = loop {
            let generation = self.current();
            match self.try_job(&generation, p, attempts, first).await {
                Tried::Final(record) => break record,
                Tried::Later(wait) => tokio::time::sleep(wait).await,
            }
        };
        log_final(self, p, &record, first);
        if let Record::Final { dead, .. } = &record {
            let seconds = self.clock.now().saturating_sub(since) as f64 / 1e9;
            self.metrics.job_finished(&p.upstream, *dead, seconds);
        }
        record
    }

    /// One try of a job: wait in its upstream's line as queued work, send,
    /// retry as the upstream says; the final outcome, or when to try again.
    async fn try_job(
        &self,
        generation: &Generation,
        p: &Pending,
        attempts: &Arc<AtomicU32>,
        first: Nanos,
    ) -> Tried {
        let job = &p.job;
        let dead = |reason: String, attempts: u32| {
            Tried::Final(
                tollgate_jobs::result::Outcome::dead_before_an_answer(
                    &job.id,
                    &p.upstream,
                    reason,
                    attempts,
                )
                .record(p.seq, None),
            )
        };
        let sent_before = attempts.load(Ordering::Relaxed);
        let Some(upstream) = generation.upstream(&p.upstream) else {
            return dead(
                format!("upstream '{}' is no longer in the config", p.upstream),
                sent_before,
            );
        };
        let url = match url::Url::parse(&job.url) {
            Ok(u) if generation.config.upstream_for(&u) == Some(upstream) => u,
            _ => {
                return dead(
                    format!(
                        "url '{}' is no longer under upstream '{}''s base_url",
                        job.url, p.upstream
                    ),
                    sent_before,
                )
            }
        };
        let (mut parts, body) = match job_request(job) {
            Ok(r) => r,
            Err(e) => return dead(e, sent_before),
        };
        let control = Control::queued(job.priority, job.workflow.clone(), LINE_WAIT, attempts);
        let mut outcome = Outcome::new();
        let answer = match self.body_budget(generation).claim(body.len()) {
            Ok(kept) => {
                self.fetch(
                    generation,
                    upstream,
                    &url,
                    &mut parts,
                    Outgoing::Kept(body),
                    kept,
                    &job_peer(),
                    &control,
                    &mut outcome,
                )
                .await
            }
            Err(refusal) => Err(refusal),
        };
        let sent = attempts.load(Ordering::Relaxed);
        match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let bytes = read_result(response.into_body()).await;
                let now = self.clock.now();
                let reason = match classify(status) {
                    Class::Success => None,
                    Class::Rejected => Some(format!(
                        "status {status}: the upstream refused the request (not retried)"
                    )),
                    Class::Redirect => Some(format!("status {status}: redirects are not followed")),
                    Class::Throttled | Class::Transient => {
                        Some(format!("status {status} after {sent} attempt(s)"))
                    }
                };
                Tried::Final(
                    tollgate_jobs::result::Outcome {
                        id: &job.id,
                        upstream: &p.upstream,
                        dead: reason.is_some(),
                        reason,
                        status: Some(status),
                        attempts: sent,
                        elapsed_ms: Some(now.saturating_sub(first) as f64 / 1e6),
                        latency_ms: outcome.upstream_ms(),
                        body: Some(tollgate_jobs::result::Seen::Whole(&bytes)),
                    }
                    .record(p.seq, Some(wall_nanos())),
                )
            }
            Err(refusal) => match later(&refusal) {
                Some(wait) => Tried::Later(wait),
                None => dead(refusal.detail(), sent),
            },
        }
    }
}

/// Jobs that could not be recorded (the state or queue failed): nothing
/// was queued.
fn not_recorded(status: StatusCode, detail: String) -> Response<ResponseBody> {
    problem(status, "Jobs not recorded; nothing was queued", detail)
}

/// `GET /_tollgate/jobs/ID`'s answer: the job's status, and once it is
/// final its result line (whose attempts are the job's).
fn status_answer(
    id: &str,
    status: &str,
    attempts: u32,
    result: Option<String>,
) -> Response<ResponseBody> {
    let result = result.and_then(|line| serde_json::from_str::<serde_json::Value>(&line).ok());
    let attempts = result
        .as_ref()
        .and_then(|r| r.get("attempts"))
        .and_then(|a| a.as_u64())
        .map_or(attempts, |a| a as u32);
    json(
        StatusCode::OK,
        serde_json::json!({ "id": id, "status": status, "attempts": attempts, "result": result }),
    )
}

/// A job's response body, up to `MAX_RESULT_BODY` (a body that breaks
/// off is what came).
async fn read_result(mut body: ResponseBody) -> Bytes {
    let mut kept = bytes::BytesMut::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            let room = MAX_RESULT_BODY - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
            if kept.len() == MAX_RESULT_BODY {
                break;
            }
        }
    }
    kept.freeze()
}

/// The job id in a stored callback's payload.
fn callback_job_id(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("id")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `Prefer: respond-async` (RFC 7240): queue the request, answer 202.
pub(crate) fn prefers_async(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case("respond-async"))
        })
}

impl Proxy {
    /// A live request sent with `Prefer: respond-async`: kept as a job (its
    /// method, URL, headers and body, as the client sent them), answered
    /// 202 with the job's `Location`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn queue_live(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        upstream: usize,
        url: &url::Url,
        parts: &hyper::http::request::Parts,
        body: Incoming,
        control: Control,
        client: Option<&crate::Client>,
    ) -> Result<Response<ResponseBody>, Refusal> {
        let budget = self.body_budget(generation);
        let max = budget.cap;
        let bytes = match crate::call::read_body(body, &budget).await? {
            (Outgoing::Kept(bytes), _) => bytes,
            (Outgoing::Once(_), _) => return Err(Refusal::BodyTooLarge { max }),
        };
        let body = match bytes.is_empty() {
            true => None,
            false => Some(String::from_utf8(bytes.to_vec()).map_err(|_| {
                Refusal::BadRequest(
                    "a request queued with Prefer: respond-async keeps its body as text: this one is not UTF-8".into(),
                )
            })?),
        };
        let mut kept = parts.headers.clone();
        tollgate_http::strip_hop_by_hop(&mut kept);
        let mut headers = Vec::new();
        for (name, value) in &kept {
            let name = name.as_str();
            // (what belongs to this exchange, not to the job; and no
            // Accept-Encoding: the job's result keeps the body as sent)
            if matches!(
                name,
                "host"
                    | "proxy-authorization"
                    | "prefer"
                    | "content-length"
                    | "expect"
                    | "accept-encoding"
            ) || name.starts_with("tollgate-")
            {
                continue;
            }
            let value = value.to_str().map_err(|_| {
                Refusal::BadRequest(format!("header {name} must be visible ASCII to be queued"))
            })?;
            headers.push((name.to_string(), value.to_string()));
        }
        headers.sort();
        let id = format!("job_{}", &self.next_request_id()["req_".len()..]);
        let idempotency_key = match kept.get("idempotency-key").and_then(|v| v.to_str().ok()) {
            Some(key) if !key.is_empty() => key.to_string(),
            _ => format!("tollgate-{}", &tollgate_jobs::job::digest(&[&id])[..32]),
        };
        let job = Job {
            id,
            method: parts.method.as_str().to_string(),
            url: url.to_string(),
            headers,
            body,
            // (its Content-Type is among its headers, as the client sent it)
            json: false,
            priority: control.priority,
            workflow: control.workflow,
            idempotency_key,
            callback: callback_header(&parts.headers)?,
            client: client.map(|c| c.name.clone()),
        };
        let routed = vec![Routed { upstream, job }];
        match self.enqueue(generation, routed).await {
            Ok((ids, _)) => {
                let mut r: Response<ResponseBody> =
                    json(StatusCode::ACCEPTED, serde_json::json!({ "ids": ids }));
                if let Ok(v) = HeaderValue::from_str(&format!("{JOBS_PATH}/{}", ids[0])) {
                    r.headers_mut().insert(LOCATION, v);
                }
                Ok(r)
            }
            Err(refused) => Ok(refused),
        }
    }
}

/// A refusal that says "not now" rather than "never": how long to wait.
fn later(refusal: &Refusal) -> Option<Duration> {
    match refusal {
        Refusal::WaitExceeded { .. }
        | Refusal::StoreUnavailable(_)
        | Refusal::StoreFull(_)
        | Refusal::BodiesFull { .. }
        | Refusal::KeysParked { .. } => Some(Duration::from_secs(1)),
        Refusal::BreakerOpen { retry_after, .. } => {
            Some(Duration::from_nanos(*retry_after).clamp(Duration::from_millis(10), MOST_LATER))
        }
        _ => None,
    }
}

/// What a job sends: its method, URL and headers (with its idempotency key
/// and JSON type unless it set them), as the runner sends it.
fn job_request(job: &Job) -> Result<(hyper::http::request::Parts, Bytes), String> {
    let mut builder = hyper::Request::builder()
        .method(job.method.as_str())
        .uri(job.url.as_str());
    for (name, value) in &job.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let (mut parts, ()) = builder
        .body(())
        .map_err(|e| format!("the job cannot be sent as stored: {e}"))?
        .into_parts();
    if let Ok(key) = HeaderValue::from_str(&job.idempotency_key) {
        parts.headers.entry("idempotency-key").or_insert(key);
    }
    if job.body.is_some() && job.json {
        parts
            .headers
            .entry(CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/json"));
    }
    let body = Bytes::from(job.body.clone().unwrap_or_default());
    Ok((parts, body))
}

/// Jobs come from the proxy itself, as far as an `ip` key part goes.
fn job_peer() -> Peer {
    Peer::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Now, in ns since the epoch (when a job's last attempt went).
fn wall_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
