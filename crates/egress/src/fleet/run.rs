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

use super::queue::{Queue, QueueError, Recorded, Write, IDS_PER_CALL, WRITES_PER_CALL};
use crate::human;
use crate::job::Job;
use crate::run::{sleep_until, Active, Driver, FleetTotals, Progress, RunError, Sink};
use crate::settings::UpstreamsConfig;
use crate::state::Record;
use crate::{Options, Summary};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tollgate_comply::Scheduler;
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
/// loop logs each change once. A command Redis refused (asking again would
/// not change its answer) stops the run.
#[derive(Debug, Default)]
struct Health {
    down: AtomicBool,
    error: Mutex<String>,
    /// The first command refused: what it was, and Redis's answer.
    refused: Mutex<Option<String>>,
}

impl Health {
    /// How a call went (`what` it was, for a refusal).
    fn note<T>(&self, what: impl FnOnce() -> String, result: &Result<T, QueueError>) {
        match result {
            Ok(_) => self.down.store(false, Ordering::Relaxed),
            Err(e @ QueueError::Refused { .. }) => self.refuse(&what(), e),
            Err(e) => {
                if let Ok(mut error) = self.error.lock() {
                    *error = e.to_string();
                }
                self.down.store(true, Ordering::Relaxed);
            }
        }
    }

    fn refuse(&self, what: &str, e: &QueueError) {
        // It answered.
        self.down.store(false, Ordering::Relaxed);
        if let Ok(mut refused) = self.refused.lock() {
            refused.get_or_insert_with(|| format!("{what} ({e})"));
        }
    }

    fn refused(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

/// What the loop, the sink and the writer task share about writes.
#[derive(Debug, Default)]
struct Ledger {
    /// Outcomes (attempt counts, final results) sent to the writer and not
    /// yet taken by Redis.
    outstanding: AtomicU64,
    /// Final results another runner had recorded first.
    duplicates: AtomicU64,
    /// Writes Redis refused: dropped, not tried again.
    refused: AtomicU64,
    /// Per upstream, the jobs whose final result waits in the writer (and
    /// how many of their results wait). This runner still holds their
    /// leases: it renews them with the rest, gives them back after the
    /// result when it stops, and does not take such a job up again.
    unwritten: Mutex<HashMap<String, HashMap<String, u32>>>,
}

impl Ledger {
    /// `write` is on its way to the writer.
    fn queued(&self, write: &Write) {
        match write {
            Write::Attempts { .. } => {}
            Write::Finish { upstream, id, .. } => {
                if let Ok(mut unwritten) = self.unwritten.lock() {
                    *unwritten
                        .entry(upstream.clone())
                        .or_default()
                        .entry(id.clone())
                        .or_default() += 1;
                }
            }
            Write::Release { .. } => return,
        }
        self.outstanding.fetch_add(1, Ordering::SeqCst);
    }

    /// `write` is done with: made, refused, or never sent.
    fn written(&self, write: &Write) {
        match write {
            Write::Attempts { .. } => {}
            Write::Finish { upstream, id, .. } => {
                if let Ok(mut unwritten) = self.unwritten.lock() {
                    if let Some(ids) = unwritten.get_mut(upstream) {
                        if let Some(n) = ids.get_mut(id) {
                            *n -= 1;
                            if *n == 0 {
                                ids.remove(id);
                            }
                        }
                    }
                }
            }
            Write::Release { .. } => return,
        }
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
    }

    fn is_unwritten(&self, upstream: &str, id: &str) -> bool {
        self.unwritten
            .lock()
            .is_ok_and(|u| u.get(upstream).is_some_and(|ids| ids.contains_key(id)))
    }

    fn unwritten_ids(&self, upstream: &str) -> Vec<String> {
        self.unwritten
            .lock()
            .ok()
            .and_then(|u| u.get(upstream).map(|ids| ids.keys().cloned().collect()))
            .unwrap_or_default()
    }
}

/// The run's sink: records go to the writer task, which writes them to
/// Redis in order and keeps them while Redis is unreachable.
struct Recorder {
    tx: mpsc::UnboundedSender<Write>,
    upstreams: Vec<String>,
    ledger: Arc<Ledger>,
}

impl Recorder {
    fn send(&self, write: Write) {
        self.ledger.queued(&write);
        if let Err(mpsc::error::SendError(write)) = self.tx.send(write) {
            self.ledger.written(&write);
        }
    }
}

impl Sink for Recorder {
    fn record(&self, a: &Active, record: Record) {
        self.send(match record {
            // Not kept in a fleet: each runner learns its own pace (and a
            // runner delivers no callbacks).
            Record::Pace { .. } | Record::Delivered { .. } | Record::Undelivered { .. } => return,
            Record::Retry { attempts, .. } => Write::Attempts {
                id: a.job.id.clone(),
                attempts,
            },
            record @ Record::Final { .. } => {
                let upstream = self.upstreams[a.upstream].clone();
                let dead = record.dead_letter(&upstream, &a.job).map(Box::new);
                let Record::Final { attempts, line, .. } = record else {
                    return;
                };
                Write::Finish {
                    upstream,
                    id: a.job.id.clone(),
                    line,
                    attempts,
                    dead,
                }
            }
        });
    }
}

/// The writer task: the writes in order, several per call, each tried
/// again until Redis takes it, or dropped when Redis refuses it.
async fn write_all(
    queue: Queue,
    mut rx: mpsc::UnboundedReceiver<Write>,
    ledger: Arc<Ledger>,
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
        let n = batch(&backlog);
        let replies = queue.write(&backlog.make_contiguous()[..n]).await;
        let mut failed = false;
        match replies {
            Err(e) => {
                health.note(|| "writing".into(), &Err::<(), _>(e));
                failed = true;
            }
            Ok(replies) => {
                for reply in replies {
                    let Some(write) = backlog.pop_front() else {
                        break;
                    };
                    match reply {
                        Ok(recorded) => {
                            health.note(|| "writing".into(), &Ok(()));
                            if recorded == Some(Recorded::Other) {
                                ledger.duplicates.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(e @ QueueError::Refused { .. }) => {
                            ledger.refused.fetch_add(1, Ordering::SeqCst);
                            health.refuse(&write.describe(), &e);
                        }
                        Err(e) => {
                            // Busy for now: this one and the rest again later.
                            health.note(|| "writing".into(), &Err::<(), _>(e));
                            backlog.push_front(write);
                            failed = true;
                            break;
                        }
                    }
                    ledger.written(&write);
                }
            }
        }
        if failed {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        } else {
            delay = WRITE_RETRY;
        }
    }
}

/// How many writes from the front of `backlog` go in one call: at most
/// `WRITES_PER_CALL`, and no job in two of them. Redis makes the writes of
/// a call that come after one it turns down for now; the writer makes that
/// one again later, and it must not then land after a later write of its
/// own job (a lease given back before its attempt count: the count would
/// be ignored).
fn batch(backlog: &VecDeque<Write>) -> usize {
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, write) in backlog.iter().take(WRITES_PER_CALL).enumerate() {
        if !write.ids().iter().all(|id| seen.insert(id)) {
            return i.max(1);
        }
    }
    backlog.len().min(WRITES_PER_CALL)
}

/// Run jobs leased from `queue` until no job of this config's upstreams is
/// pending or leased anywhere in the fleet, or `shutdown` resolves.
pub async fn run(
    config: &UpstreamsConfig,
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
        let engine = Engine::open(
            tollgate_comply::pace::with_margin(&u.policy),
            &format!("upstream:{}", u.name),
        )
        .map_err(engine_error)?;
        engine.connect().await.map_err(engine_error)?;
        let seed = options.seed.wrapping_add(i as u64);
        schedulers.push(Scheduler::for_upstream(engine, u, config, seed));
    }

    let health = Arc::new(Health::default());
    let ledger = Arc::new(Ledger::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let recorder = Recorder {
        tx,
        upstreams: names.clone(),
        ledger: ledger.clone(),
    };
    let writer = tokio::spawn(write_all(queue.clone(), rx, ledger.clone(), health.clone()));
    let progress = Progress::new(options.progress, unfinished_at_start);
    let mut driver = Driver::new(config, schedulers, clock, progress, &options.proxies)?;
    let admin = driver.open_admin(&options).await?;
    // A 429 any process of the fleet gets pauses the upstream here too.
    let (pause_tx, mut pause_rx) = mpsc::unbounded_channel::<(usize, tollgate_core::Nanos)>();
    let mut listeners = Vec::new();
    if let Some(settings) = config.redis() {
        for (u, upstream) in config.upstreams.iter().enumerate() {
            let pauses = tollgate_store::redis::Pauses::new(
                settings,
                &format!("upstream:{}", upstream.name),
            )
            .map_err(|e| RunError::Engine {
                upstream: upstream.name.clone(),
                source: tollgate_store::EngineError::Config(e.to_string()),
            })?;
            let tx = pause_tx.clone();
            let listening = pauses.clone();
            listeners.push(tokio::spawn(async move {
                listening.listen(|until| tx.send((u, until)).is_ok()).await;
            }));
            driver.pauses.push(Some(pauses));
        }
    }
    drop(pause_tx);

    let n = config.upstreams.len();
    let poll = (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let renew_every = lease / 3;
    let mut next_renew = Instant::now() + renew_every;
    // Per upstream: when to ask for jobs next, and whether the last answer
    // said nothing is left of it in the whole queue (none pending or
    // leased).
    let mut lease_at = vec![Instant::now(); n];
    let mut drained = vec![false; n];
    let hold: Vec<usize> = config
        .upstreams
        .iter()
        .map(|u| u.concurrency + u.concurrency.min(HOLD_EXTRA_MAX))
        .collect();
    let holding =
        |driver: &Driver<'_>, u: usize| driver.active.values().filter(|a| a.upstream == u).count();
    let mut said_down = false;
    let mut stopping = false;
    let mut deadline: Option<Instant> = None;
    // The first command Redis refused: the run stops, and fails with it.
    let mut refusal: Option<String> = None;
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
        if refusal.is_none() {
            if let Some(refused) = health.refused() {
                driver.progress.log(&format!(
                    "the job queue refused {refused}; asking again will not change that, so this runner stops: no new leases or sends, up to {} for {} request(s) in flight",
                    human(options.grace),
                    driver.in_flight.len()
                ));
                refusal = Some(refused);
                if !stopping {
                    stopping = true;
                    deadline = Some(Instant::now() + options.grace);
                }
            }
        }
        if !stopping {
            for u in 0..n {
                let held = holding(&driver, u);
                if held >= hold[u] || Instant::now() < lease_at[u] {
                    continue;
                }
                let got = queue.lease(&names[u], hold[u] - held, lease).await;
                health.note(|| format!("leasing jobs of upstream '{}'", names[u]), &got);
                let Ok(got) = got else {
                    lease_at[u] = Instant::now() + poll;
                    continue;
                };
                drained[u] = (got.pending, got.leased) == (0, 0);
                // Next: once the runner holds no more than its concurrency
                // (see the replies below), or after a poll, whichever
                // comes first (if there was less than asked for, a lease
                // may expire meanwhile).
                lease_at[u] = Instant::now() + poll;
                if got.reaped > 0 {
                    driver.progress.log(&format!(
                        "{}: {} expired lease(s) returned to the queue (a runner stopped without finishing them)",
                        names[u], got.reaped
                    ));
                }
                for leased in got.jobs {
                    // Already this runner's (its lease ran out while Redis
                    // was away): being worked on, or its result is on its
                    // way to Redis. Either way, not twice.
                    if driver.active.contains_key(&leased.seq)
                        || ledger.is_unwritten(&names[u], &leased.id)
                    {
                        continue;
                    }
                    // A job that cannot run as stored, or not here, is
                    // dead-lettered with why.
                    let (job, refused) = match leased.job {
                        Err(reason) => (Job::unreadable(&leased.id), Some(reason)),
                        Ok(job) => {
                            // (parsed in full, not split as `JobUrl` does:
                            // the shared queue is checked as any input is)
                            let routed = url::Url::parse(&job.url)
                                .ok()
                                .and_then(|url| config.upstream_for(&url));
                            let refused = (routed != Some(u)).then(|| format!(
                                "its url {} is not under upstream '{}''s base_url in this runner's config; tollgate only sends to configured upstreams (fix the config, then tollgate dlq retry)",
                                job.url, names[u]
                            ));
                            (job, refused)
                        }
                    };
                    match refused {
                        None => driver.admit(leased.seq, u, job, leased.attempts, &recorder),
                        Some(reason) => driver.dead_on_arrival(
                            leased.seq,
                            u,
                            job,
                            leased.attempts,
                            reason,
                            &recorder,
                        ),
                    }
                }
            }
        }
        if Instant::now() >= next_renew {
            next_renew = Instant::now()
                + if renew(queue, &mut driver, &ledger, &names, lease, &health).await {
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
        driver.show_lines();
        if stopping && driver.in_flight.is_empty() {
            break;
        }
        if driver.idle()
            && driver.active.is_empty()
            && ledger.outstanding.load(Ordering::SeqCst) == 0
            && drained.iter().all(|d| *d)
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
                let mut settled = vec![false; n];
                blocking(|| {
                    let mut next = Some(done);
                    while let Some(c) = next {
                        if let Some(a) = driver.active.get(&c.seq) {
                            settled[a.upstream] = true;
                        }
                        driver.settle(c, now, &recorder);
                        next = driver.rx.try_recv().ok();
                    }
                });
                for u in (0..n).filter(|&u| settled[u]) {
                    // Its jobs finished: the drained check must look again,
                    // and once the runner holds no more than it can send at
                    // once, it leases more (not on every reply: the extra
                    // it holds keeps it sending meanwhile).
                    drained[u] = false;
                    if holding(&driver, u) <= config.upstreams[u].concurrency {
                        lease_at[u] = lease_at[u].min(Instant::now());
                    }
                }
            }
            Some((u, until)) = pause_rx.recv() => {
                if driver.schedulers[u].pause(until) {
                    driver.progress.log(&format!(
                        "{}: another process of the fleet got a 429; pausing here too",
                        config.upstreams[u].name
                    ));
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

    driver.evicted().await;
    driver.last_figures(admin.as_ref());
    // Jobs still held (stopped early) go back to the queue at once, rather
    // than when their leases expire: through the writer, after the writes
    // queued before (a release first would clear the owner, and Redis
    // would then ignore their attempt counts).
    if stopping {
        for (u, ids) in held_ids(&driver, &ledger, &names).iter().enumerate() {
            for chunk in ids.chunks(IDS_PER_CALL) {
                recorder.send(Write::Release {
                    upstream: names[u].clone(),
                    ids: chunk.to_vec(),
                });
            }
        }
    }
    for listener in &listeners {
        listener.abort();
    }
    // Every outcome written (a normal end waits for that already); after
    // Ctrl-C, at most until the grace period is over.
    drop(recorder);
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
    let unwritten = ledger.outstanding.load(Ordering::SeqCst);
    // Refused after the loop's last look (the last write, or a release).
    if let Some(refused) = refusal.or_else(|| health.refused()) {
        driver.progress.done();
        return Err(RunError::QueueRefused {
            refused,
            writes: ledger.refused.load(Ordering::SeqCst),
            unwritten,
        });
    }
    let counts = queue.counts().await.unwrap_or_default();
    let mut summary = driver.summary(stopping, counts.pending);
    summary.fleet = Some(FleetTotals {
        queue: queue.name().to_string(),
        jobs: counts.pending + counts.done + counts.dead,
        done: counts.done,
        dead: counts.dead,
        pending: counts.pending,
        duplicates: ledger.duplicates.load(Ordering::SeqCst),
        unwritten,
    });
    Ok(summary)
}

/// The ids of every job this runner holds a lease on, per upstream: the
/// ones it works on, and the ones whose final result waits in the writer.
fn held_ids(driver: &Driver<'_>, ledger: &Ledger, names: &[String]) -> Vec<Vec<String>> {
    let mut held: Vec<Vec<String>> = names.iter().map(|n| ledger.unwritten_ids(n)).collect();
    for a in driver.active.values() {
        held[a.upstream].push(a.job.id.clone());
    }
    held
}

/// Renew the leases of every job this runner holds; drop the ones lost to
/// another runner (unless in flight: their reply is recorded if it comes
/// first). False when Redis did not answer.
async fn renew(
    queue: &Queue,
    driver: &mut Driver<'_>,
    ledger: &Ledger,
    names: &[String],
    lease: Duration,
    health: &Health,
) -> bool {
    let held = held_ids(driver, ledger, names);
    let seq_of: HashMap<String, u64> = driver
        .active
        .iter()
        .map(|(&seq, a)| (a.job.id.clone(), seq))
        .collect();
    let mut ok = true;
    for (u, ids) in held.iter().enumerate() {
        if ids.is_empty() {
            continue;
        }
        let result = queue.renew(&names[u], ids, lease).await;
        health.note(
            || format!("renewing leases of upstream '{}'", names[u]),
            &result,
        );
        let Ok(lost) = result else {
            ok = false;
            continue;
        };
        let mut dropped = 0;
        for id in lost {
            // A job whose result waits in the writer is not dropped: its
            // result is recorded if it is the first.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attempts(id: &str) -> Write {
        Write::Attempts {
            id: id.into(),
            attempts: 1,
        }
    }

    #[test]
    fn a_batch_of_writes_holds_no_job_twice_and_at_most_writes_per_call() {
        let release = Write::Release {
            upstream: "u".into(),
            ids: vec!["j3".into(), "j1".into()],
        };
        let backlog: VecDeque<Write> =
            [attempts("j1"), attempts("j2"), release, attempts("j4")].into();
        assert_eq!(batch(&backlog), 2, "the release waits for j1's count");
        let backlog: VecDeque<Write> = [attempts("j1"), attempts("j1")].into();
        assert_eq!(batch(&backlog), 1);
        let many: VecDeque<Write> = (0..WRITES_PER_CALL + 5)
            .map(|i| attempts(&format!("j{i}")))
            .collect();
        assert_eq!(batch(&many), WRITES_PER_CALL);
        assert_eq!(batch(&VecDeque::new()), 0);
    }
}
