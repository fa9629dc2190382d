//! Jobs on a fleet config (`[store] kind = "redis"`): pushed jobs go into
//! the fleet's job queue in Redis (the one `tollgate run --queue` works,
//! `[proxy] queue`, default "default"), and every proxy of the fleet leases
//! jobs of its upstreams from it and sends them through its lines, as queued
//! work beside its live calls. A proxy that dies leaves its leased jobs to
//! the others when their leases end (at least once, with the same
//! `Idempotency-Key`); fleet runners may drain the same queue.

use crate::callbacks::Courier;
use crate::jobs::Tracked;
use crate::state::Proxy;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tollgate_core::Clock;
use tollgate_jobs::fleet::{Leased, Queue, QueueError, Recorded};
use tollgate_jobs::state::{Callback, Pending, Record};

/// How long a lease lasts unless renewed (renewed at a third of it).
const LEASE: Duration = Duration::from_secs(30);
/// Jobs of one upstream this process holds at once.
const LEASED_AT_ONCE: usize = 256;
/// Most jobs taken in one lease call.
const LEASE_BATCH: usize = 100;
/// How often an empty queue is asked again.
const POLL: Duration = Duration::from_millis(200);

/// The fleet's queue as this proxy works it.
pub(crate) struct FleetJobs {
    pub(crate) queue: Queue,
    /// The jobs this process holds, by their place in the queue.
    pub(crate) tracked: Mutex<HashMap<u64, Tracked>>,
    /// Delivers the callbacks of the jobs this process finishes (and, at
    /// start, the ones the queue still keeps).
    courier: Courier,
}

/// A callback as the queue keeps it (with the job's result, until
/// delivered).
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    url: String,
    body: String,
}

impl std::fmt::Debug for FleetJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetJobs")
            .field("queue", &self.queue.name())
            .finish_non_exhaustive()
    }
}

impl FleetJobs {
    /// Connect to the fleet's queue and start leasing jobs of every upstream.
    pub(crate) async fn start(proxy: &Arc<Proxy>) -> Result<Arc<FleetJobs>, QueueError> {
        let generation = proxy.current();
        let Some(settings) = generation.config.redis() else {
            return Err(QueueError::Unavailable {
                url: String::new(),
                reason: "the config has no [store] kind = \"redis\"".into(),
            });
        };
        let queue = Queue::connect(settings, &generation.settings.queue).await?;
        let (settling, metrics) = (queue.clone(), Arc::downgrade(proxy));
        let courier = Courier::start(
            proxy.callback_client.clone(),
            crate::callbacks::secret(&generation.settings),
            move |_, id, outcome| {
                if let Some(proxy) = metrics.upgrade() {
                    proxy.metrics.callback(outcome.is_ok());
                }
                let (queue, id) = (settling.clone(), id.to_string());
                tokio::spawn(async move {
                    let error = outcome.err();
                    if let Err(e) = queue.callback_settled(&id, error.as_deref()).await {
                        tracing::warn!(job = %id, "jobs: a callback's delivery was not recorded (it may be delivered again): {e}");
                    }
                });
            },
        );
        let fleet = Arc::new(FleetJobs {
            queue,
            tracked: Mutex::new(HashMap::new()),
            courier,
        });
        // Callbacks kept and not delivered (their proxy stopped): again,
        // at least once.
        for (id, kept) in fleet.queue.pending_callbacks().await? {
            if let Ok(kept) = serde_json::from_str::<Kept>(&kept) {
                let callback = Callback {
                    seq: 0,
                    url: kept.url,
                    body: kept.body,
                };
                fleet.courier.send(callback, id);
            }
        }
        tokio::spawn(lease_every_upstream(Arc::downgrade(proxy), fleet.clone()));
        Ok(fleet)
    }
}

/// How often the upstreams of the config in force are looked at (one a
/// reload adds is leased for within this long).
const UPSTREAMS_CHECK: Duration = Duration::from_secs(5);

/// A lease loop for every upstream of the config in force, as reloads add
/// them; a loop ends when a reload removes its upstream.
async fn lease_every_upstream(proxy: Weak<Proxy>, fleet: Arc<FleetJobs>) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        let Some(strong) = proxy.upgrade() else {
            return;
        };
        for u in &strong.current().config.upstreams {
            if running.lock().insert(u.name.clone()) {
                let (proxy, fleet, running, name) = (
                    proxy.clone(),
                    fleet.clone(),
                    running.clone(),
                    u.name.clone(),
                );
                tokio::spawn(async move {
                    lease_loop(proxy, fleet, name.clone()).await;
                    running.lock().remove(&name);
                });
            }
        }
        drop(strong);
        tokio::time::sleep(UPSTREAMS_CHECK).await;
    }
}

/// Lease jobs of `upstream` while this process has room for them, renew the
/// leases it holds, and hand each job to its line.
async fn lease_loop(proxy: Weak<Proxy>, fleet: Arc<FleetJobs>, upstream: String) {
    let held: Arc<Mutex<HashSet<String>>> = Arc::default();
    let freed = Arc::new(Notify::new());
    let mut renewed = tokio::time::Instant::now();
    let mut told_down = false;
    loop {
        if renewed.elapsed() >= LEASE / 3 {
            let ids: Vec<String> = held.lock().iter().cloned().collect();
            if !ids.is_empty() {
                if let Err(e) = fleet.queue.renew(&upstream, &ids, LEASE).await {
                    tracing::warn!(upstream = %upstream, "jobs: leases not renewed: {e}");
                }
            }
            renewed = tokio::time::Instant::now();
        }
        let room = LEASED_AT_ONCE.saturating_sub(held.lock().len());
        if room == 0 {
            tokio::select! {
                () = freed.notified() => {}
                () = tokio::time::sleep(LEASE / 3) => {}
            }
            continue;
        }
        let Some(gone) = proxy
            .upgrade()
            .map(|p| p.current().upstream(&upstream).is_none())
        else {
            return;
        };
        if gone {
            // (a reload removed it; its jobs wait for a process that has it)
            return;
        }
        let leased = fleet
            .queue
            .lease(&upstream, room.min(LEASE_BATCH), LEASE)
            .await;
        let Some(proxy) = proxy.upgrade() else {
            return;
        };
        match leased {
            Ok(lease) if lease.jobs.is_empty() => {
                told_down = false;
                drop(proxy);
                tokio::time::sleep(POLL).await;
            }
            Ok(lease) => {
                told_down = false;
                for job in lease.jobs {
                    held.lock().insert(job.id.clone());
                    let (proxy, fleet, upstream) = (proxy.clone(), fleet.clone(), upstream.clone());
                    let (held, freed) = (held.clone(), freed.clone());
                    tokio::spawn(async move {
                        let id = job.id.clone();
                        send_leased(&proxy, &fleet, &upstream, job).await;
                        held.lock().remove(&id);
                        freed.notify_one();
                    });
                }
            }
            Err(e) => {
                if !told_down {
                    tracing::warn!(upstream = %upstream, "jobs: the fleet's queue cannot be read: {e}");
                    told_down = true;
                }
                drop(proxy);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Send one leased job until it has a final outcome, and record it in the
/// queue.
async fn send_leased(proxy: &Arc<Proxy>, fleet: &FleetJobs, upstream: &str, leased: Leased) {
    let record = match leased.job {
        Err(reason) => dead_as_stored(&leased.id, upstream, leased.attempts, reason),
        Ok(job) => {
            let p = Pending {
                seq: leased.seq,
                upstream: upstream.to_string(),
                attempts: leased.attempts,
                job,
            };
            let attempts = Arc::new(AtomicU32::new(0));
            let since = proxy.clock.now();
            let tracked = Tracked::new(&p, since, attempts.clone());
            fleet.tracked.lock().insert(p.seq, tracked);
            let record = proxy.job_until_final(&p, &attempts, since).await;
            fleet.tracked.lock().remove(&p.seq);
            // (its callback, if any, goes once the result is recorded)
            return finish(fleet, upstream, &leased.id, record, Some(p.job)).await;
        }
    };
    finish(fleet, upstream, &leased.id, record, None).await;
}

/// A job the queue holds but cannot be read: dead, with why.
fn dead_as_stored(id: &str, upstream: &str, attempts: u32, reason: String) -> Record {
    tollgate_jobs::result::Outcome::dead_before_an_answer(id, upstream, reason, attempts)
        .record(u64::MAX, None)
}

/// Record a final outcome in the queue, with its callback (tried again
/// while Redis cannot be reached, for as long as the lease lasts; after that
/// another process takes the job over), then deliver the callback.
async fn finish(
    fleet: &FleetJobs,
    upstream: &str,
    id: &str,
    record: Record,
    job: Option<tollgate_jobs::Job>,
) {
    let job = job.unwrap_or_else(|| tollgate_jobs::Job::unreadable(id));
    let letter = record.dead_letter(upstream, &job);
    let Record::Final {
        dead,
        attempts,
        line,
        ..
    } = record
    else {
        return;
    };
    let callback = crate::callbacks::for_job(&job, 0, dead, attempts, &line);
    let kept = callback.as_ref().and_then(|c| {
        serde_json::to_string(&Kept {
            url: c.url.clone(),
            body: c.body.clone(),
        })
        .ok()
    });
    let deadline = tokio::time::Instant::now() + LEASE;
    loop {
        let recorded = fleet
            .queue
            .finish(
                upstream,
                id,
                &line,
                attempts,
                letter.as_ref(),
                kept.as_deref(),
            )
            .await;
        match recorded {
            Ok(Recorded::New) => {
                if let Some(callback) = callback {
                    fleet.courier.send(callback, id.to_string());
                }
                return;
            }
            // (recorded before, by this process or another: its callback
            // is theirs)
            Ok(_) => return,
            Err(QueueError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::error!(job = %id, "jobs: the final result was not recorded in the fleet's queue: {e}");
                return;
            }
        }
    }
}
