//! `tollgate run` in fleet mode. The loop is the runner's (one task
//! decides; requests run in their own tasks), with jobs leased from Redis
//! instead of read from SQLite, and outcomes written to Redis by a writer
//! task. What it guarantees, and why:
//!
//! - Every job gets exactly one final result: the queue records the first
//!   result for a job and drops later ones (a job taken over after its
//!   lease expired may be sent twice; its result is recorded once).
//! - No job is lost: a job leaves the queue only with its final result. A
//!   runner that dies leaves leases that expire; another runner takes the
//!   jobs over. Outcomes that cannot be written (Redis down) stay in
//!   memory and are written when Redis answers again.
//! - The quota is shared: each upstream's engine keeps its counters in
//!   Redis under `upstream:NAME`, so every runner asks the same counters.

use super::queue::{Queue, QueueError, Recorded};
use crate::run::{human, sleep_until, Active, Driver, FleetTotals, Progress, RunError, Sink};
use crate::schedule::Scheduler;
use crate::settings::RunnerConfig;
use crate::state::{DeadLetter, Record};
use crate::{Options, Summary};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tollgate_store::{Engine, TokioClock};

/// Most jobs a runner holds per upstream beyond its concurrency: enough to
/// keep sending while the next lease is fetched, few enough that
/// priorities hold across runners (a job is leased only when no better one
/// of its upstream is pending).
const HOLD_EXTRA_MAX: usize = 64;
/// A write that failed is tried again after this long, doubling to a second.
const WRITE_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// How long a lease lasts without renewal: a runner that dies holds
    /// its jobs this long before another takes them over.
    pub lease: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            lease: Duration::from_secs(30),
        }
    }
}

/// Whether the queue answers, seen by the loop and the writer task; the
/// loop logs each change once.
#[derive(Debug, Default)]
struct Health {
    down: AtomicBool,
    error: Mutex<String>,
}

impl Health {
    fn note<T>(&self, result: &Result<T, QueueError>) {
        match result {
            Ok(_) => self.down.store(false, Ordering::Relaxed),
            Err(e) => {
                if let Ok(mut error) = self.error.lock() {
                    *error = e.to_string();
                }
                self.down.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// A write for the queue, made by the writer task in order.
#[derive(Debug)]
enum Write {
    Attempts {
        id: String,
        attempts: u32,
    },
    Finish {
        upstream: String,
        id: String,
        line: String,
        attempts: u32,
        dead: Option<Box<DeadLetter>>,
    },
}

/// The run's sink: records go to the writer task, which writes them to
/// Redis in order and keeps them while Redis is unreachable.
struct Recorder {
    tx: mpsc::UnboundedSender<Write>,
    upstreams: Vec<String>,
    /// Writes sent and not yet acknowledged by Redis.
    outstanding: Arc<AtomicU64>,
    duplicates: Arc<AtomicU64>,
}

impl Sink for Recorder {
    fn record(&self, a: &Active, record: Record) {
        let write = match record {
            Record::Retry { attempts, .. } => Write::Attempts {
                id: a.job.id.clone(),
                attempts,
            },
            Record::Final {
                dead,
                attempts,
                status,
                reason,
                excerpt,
                line,
                ..
            } => Write::Finish {
                upstream: self.upstreams[a.upstream].clone(),
                id: a.job.id.clone(),
                line,
                attempts,
                dead: dead.then(|| {
                    Box::new(DeadLetter {
                        id: a.job.id.clone(),
                        upstream: self.upstreams[a.upstream].clone(),
                        attempts,
                        status,
                        reason: reason.unwrap_or_default(),
                        excerpt,
                        finished: Some(jiff::Timestamp::now().to_string()),
                        job: (*a.job).clone(),
                    })
                }),
            },
        };
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(write).is_err() {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The writer task: each write in order, retried until Redis takes it.
async fn write_all(
    queue: Queue,
    mut rx: mpsc::UnboundedReceiver<Write>,
    outstanding: Arc<AtomicU64>,
    duplicates: Arc<AtomicU64>,
    health: Arc<Health>,
) {
    let mut backlog: VecDeque<Write> = VecDeque::new();
    let mut delay = WRITE_RETRY;
    loop {
        if backlog.is_empty() {
            match rx.recv().await {
                Some(w) => backlog.push_back(w),
                None => return,
            }
        }
        while let Ok(w) = rx.try_recv() {
            backlog.push_back(w);
        }
        let Some(write) = backlog.front() else {
            continue;
        };
        let result = match write {
            Write::Attempts { id, attempts } => {
                queue.record_attempts(id, *attempts).await.map(|()| None)
            }
            Write::Finish {
                upstream,
                id,
                line,
                attempts,
                dead,
            } => queue
                .finish(upstream, id, line, *attempts, dead.as_deref())
                .await
                .map(Some),
        };
        health.note(&result);
        match result {
            Ok(recorded) => {
                if recorded == Some(Recorded::Other) {
                    duplicates.fetch_add(1, Ordering::SeqCst);
                }
                backlog.pop_front();
                outstanding.fetch_sub(1, Ordering::SeqCst);
                delay = WRITE_RETRY;
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Run jobs leased from `queue` until no job of this config's upstreams is
/// pending or leased anywhere in the fleet, or `shutdown` resolves.
pub async fn run(
    config: &RunnerConfig,
    queue: &Queue,
    clock: TokioClock,
    options: Options,
    fleet: FleetOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, RunError> {
    let lease = fleet.lease.max(Duration::from_millis(100));
    // Jobs this config cannot send would wait forever: say so now.
    let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    let mut unfinished_at_start = 0;
    for upstream in queue.upstreams().await? {
        let (pending, leased) = queue.unfinished(&upstream).await?;
        if !names.contains(&upstream) && pending + leased > 0 {
            return Err(RunError::FleetUnknownUpstream {
                queue: queue.name().to_string(),
                upstream,
                jobs: pending + leased,
            });
        }
        unfinished_at_start += pending + leased;
    }
    let mut schedulers = Vec::with_capacity(config.upstreams.len());
    for (i, u) in config.upstreams.iter().enumerate() {
        let engine_error = |source| RunError::Engine {
            upstream: u.name.clone(),
            source,
        };
        // One quota per upstream for the whole fleet.
        let engine = Engine::open(u.policy.clone(), &format!("upstream:{}", u.name))
            .map_err(engine_error)?;
        engine.connect().await.map_err(engine_error)?;
        schedulers.push(Scheduler::new(
            engine,
            u.max_attempts,
            u.concurrency,
            u.breaker,
            options.seed.wrapping_add(i as u64),
        ));
    }

    let health = Arc::new(Health::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let recorder = Recorder {
        tx,
        upstreams: names.clone(),
        outstanding: Arc::default(),
        duplicates: Arc::default(),
    };
    let writer = tokio::spawn(write_all(
        queue.clone(),
        rx,
        recorder.outstanding.clone(),
        recorder.duplicates.clone(),
        health.clone(),
    ));
    let progress = Progress::new(options.progress, unfinished_at_start);
    let mut driver = Driver::new(config, schedulers, clock, progress)?;

    let n = config.upstreams.len();
    let poll = (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let renew_every = lease / 3;
    let mut next_renew = Instant::now() + renew_every;
    // Per upstream: when to ask for jobs next, and what the last answer
    // said is left in the whole queue (pending, leased).
    let mut lease_at = vec![Instant::now(); n];
    let mut left: Vec<Option<(u64, u64)>> = vec![None; n];
    let hold: Vec<usize> = config
        .upstreams
        .iter()
        .map(|u| u.concurrency + u.concurrency.min(HOLD_EXTRA_MAX))
        .collect();
    let mut said_down = false;
    let mut stopping = false;
    let mut deadline: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let down = health.down.load(Ordering::Relaxed);
        if down != said_down {
            said_down = down;
            if down {
                let error = health.error.lock().map(|e| e.clone()).unwrap_or_default();
                driver.progress.log(&format!(
                    "the job queue is unreachable ({error}); no new leases, and outcomes are kept in memory until it answers"
                ));
            } else {
                driver.progress.log("the job queue answers again");
            }
        }
        if !stopping {
            for u in 0..n {
                let held = driver.active.values().filter(|a| a.upstream == u).count();
                if held >= hold[u] || Instant::now() < lease_at[u] {
                    continue;
                }
                let got = queue.lease(&names[u], hold[u] - held, lease).await;
                health.note(&got);
                let Ok(got) = got else {
                    lease_at[u] = Instant::now() + poll;
                    continue;
                };
                left[u] = Some((got.pending, got.leased));
                // Asked for more than there was: the queue is drained for
                // now; look again after a poll (a lease may expire).
                lease_at[u] = if got.jobs.len() < hold[u] - held {
                    Instant::now() + poll
                } else {
                    Instant::now()
                };
                if got.reaped > 0 {
                    driver.progress.log(&format!(
                        "{}: {} expired lease(s) returned to the queue (a runner stopped without finishing them)",
                        names[u], got.reaped
                    ));
                }
                for leased in got.jobs {
                    if driver.active.contains_key(&leased.seq) {
                        continue;
                    }
                    let routed = url::Url::parse(&leased.job.url)
                        .ok()
                        .and_then(|url| config.upstream_for(&url));
                    if routed == Some(u) {
                        driver.admit(leased.seq, u, leased.job, leased.attempts, &recorder);
                    } else {
                        let reason = format!(
                            "its url {} is not under upstream '{}''s base_url in this runner's config; tollgate only sends to configured upstreams (fix the config, then tollgate dlq retry)",
                            leased.job.url, names[u]
                        );
                        driver.dead_on_arrival(
                            leased.seq,
                            u,
                            leased.job,
                            leased.attempts,
                            reason,
                            &recorder,
                        );
                    }
                }
            }
        }
        if Instant::now() >= next_renew {
            next_renew = Instant::now()
                + if renew(queue, &mut driver, &names, lease, &health).await {
                    renew_every
                } else {
                    poll
                };
        }
        let now = driver.now();
        let wake = if stopping {
            None
        } else {
            blocking(|| driver.dispatch(now, &recorder))
        };
        if stopping && driver.in_flight.is_empty() {
            break;
        }
        let finished = left.iter().all(|l| *l == Some((0, 0)));
        if driver.idle()
            && driver.active.is_empty()
            && recorder.outstanding.load(Ordering::SeqCst) == 0
            && finished
        {
            break;
        }
        // Wake for the next lease or renewal due.
        let mut tick = next_renew;
        if !stopping {
            let soonest = Instant::now() + poll.min(Duration::from_millis(100));
            for at in &lease_at {
                tick = tick.min((*at).max(soonest));
            }
        }
        tokio::select! {
            Some(done) = driver.rx.recv() => {
                let now = driver.now();
                blocking(|| {
                    let mut next = Some(done);
                    while let Some(c) = next {
                        driver.settle(c, now, &recorder);
                        next = driver.rx.try_recv().ok();
                    }
                });
                // Jobs finished: the drained check must look again.
                left.fill(None);
                for at in &mut lease_at {
                    *at = (*at).min(Instant::now());
                }
            }
            _ = sleep_until(&driver.clock, wake), if wake.is_some() => {}
            _ = tokio::time::sleep_until(tick) => {}
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                deadline = Some(Instant::now() + options.grace);
                driver.progress.log(&format!("stopping: waiting up to {} for {} request(s) in flight", human(options.grace), driver.in_flight.len()));
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                blocking(|| driver.abort_in_flight(&recorder));
                break;
            }
        }
    }

    // Jobs still held (stopped early) go back to the queue at once, rather
    // than when their leases expire.
    if stopping {
        let mut held: Vec<Vec<String>> = vec![Vec::new(); n];
        for a in driver.active.values() {
            held[a.upstream].push(a.job.id.clone());
        }
        for (u, ids) in held.iter().enumerate() {
            if !ids.is_empty() {
                let _ = queue.release(&names[u], ids).await;
            }
        }
    }
    // Every outcome written (a normal end waits for that already); after
    // Ctrl-C, at most until the grace period is over.
    let Recorder {
        tx,
        outstanding,
        duplicates,
        ..
    } = recorder;
    drop(tx);
    match deadline {
        // A normal end comes only once everything is written.
        None => {
            let _ = writer.await;
        }
        Some(deadline) => {
            let abort = writer.abort_handle();
            let limit = deadline.max(Instant::now() + Duration::from_secs(1));
            if tokio::time::timeout_at(limit, writer).await.is_err() {
                abort.abort();
            }
        }
    }
    let unwritten = outstanding.load(Ordering::SeqCst);
    let counts = queue.counts().await.unwrap_or_default();
    let mut summary = driver.summary(stopping, counts.pending);
    summary.fleet = Some(FleetTotals {
        queue: queue.name().to_string(),
        jobs: counts.pending + counts.done + counts.dead,
        done: counts.done,
        dead: counts.dead,
        pending: counts.pending,
        duplicates: duplicates.load(Ordering::SeqCst),
        unwritten,
    });
    Ok(summary)
}

/// Renew the leases of every job this runner holds; drop the ones lost to
/// another runner (unless in flight: their reply is recorded if it comes
/// first). False when Redis did not answer.
async fn renew(
    queue: &Queue,
    driver: &mut Driver<'_>,
    names: &[String],
    lease: Duration,
    health: &Health,
) -> bool {
    let mut held: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut seq_of: HashMap<String, u64> = HashMap::new();
    for (&seq, a) in &driver.active {
        held[a.upstream].push(a.job.id.clone());
        seq_of.insert(a.job.id.clone(), seq);
    }
    let mut ok = true;
    for (u, ids) in held.iter().enumerate() {
        if ids.is_empty() {
            continue;
        }
        let result = queue.renew(&names[u], ids, lease).await;
        health.note(&result);
        let Ok(lost) = result else {
            ok = false;
            continue;
        };
        let mut dropped = 0;
        for id in lost {
            let Some(&seq) = seq_of.get(&id) else {
                continue;
            };
            if driver.schedulers[u].forget(seq) {
                driver.active.remove(&seq);
                dropped += 1;
            }
        }
        if dropped > 0 {
            driver.progress.log(&format!(
                "{}: {dropped} job(s) were taken over by another runner after their leases expired; dropped here",
                names[u]
            ));
        }
    }
    ok
}

/// Run `f`, which may block for a Redis round trip (the engine's decisions
/// and settlements), without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
