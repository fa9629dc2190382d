//! Fleet mode: an engine's counters in Redis, with its health and failure
//! counters (what `/metrics` shows) and transitions logged once each way.

use crate::engine::EngineError;
use crate::lease::{Asked, Leases};

/// Refills by other requests one request waits for before deciding without
/// its slices.
const MOST_REFILL_WAITS: usize = 3;
use crate::redis::{RedisError, RedisStore, TimeSource};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tollgate_core::{Decision, Item, Nanos, Policy};

#[derive(Debug)]
pub(crate) struct Shared {
    redis: RedisStore,
    /// The policy at `local_share`, for limits with `fail = "local"`.
    local_policy: Policy,
    health: Arc<StoreHealth>,
    /// Slices of leased limits' quotas (None: no limit has `lease`). A
    /// reload starts with none (the gateway gives the old ones back).
    leases: Option<Leases>,
}

impl Shared {
    pub(crate) fn new(
        policy: &Policy,
        namespace: &str,
        time: TimeSource,
    ) -> Result<Self, EngineError> {
        let settings = policy
            .store
            .redis
            .as_ref()
            .ok_or_else(|| EngineError::Config("[store] is not kind = \"redis\"".into()))?;
        let redis = RedisStore::new(settings, policy, namespace, time).map_err(config)?;
        let health = Arc::new(StoreHealth::new(redis.url()));
        Ok(Shared {
            local_policy: scaled(policy, settings.local_share),
            redis,
            health,
            leases: leases_for(policy),
        })
    }

    pub(crate) fn reloaded(
        &self,
        old: &Policy,
        policy: &Policy,
        now: Nanos,
    ) -> Result<Self, EngineError> {
        let redis = self.redis.reloaded(old, policy, now).map_err(config)?;
        let share = policy.store.redis.as_ref().map_or(1.0, |s| s.local_share);
        Ok(Shared {
            local_policy: scaled(policy, share),
            redis,
            health: self.health.clone(),
            leases: leases_for(policy),
        })
    }

    pub(crate) fn local_policy(&self) -> &Policy {
        &self.local_policy
    }

    pub(crate) fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    pub(crate) async fn connect(&self) -> Result<(), EngineError> {
        self.redis.connect().await.map_err(config)
    }

    /// A decision, or why Redis could not make it (the caller falls back).
    /// Leased limits are decided on this process's slices when they cover
    /// the request, and otherwise take a new slice in the same round trip.
    pub(crate) async fn decide(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, String> {
        if let Some(leases) = &self.leases {
            // A request waits for at most a few refills by others (each a
            // round trip it would otherwise make itself) before deciding
            // on Redis as without a lease.
            for _ in 0..MOST_REFILL_WAITS {
                if let Some((decision, ahead)) = leases.take(policy, items, now) {
                    self.health.leased.fetch_add(1, Ordering::Relaxed);
                    if let Some(refill) = ahead {
                        // This request's answer waits one round trip (as
                        // without a lease); the key's others go on meanwhile.
                        let lent = self.redis.prefetch(policy, items, refill.asks(), now).await;
                        if let Ok(grants) = self.health.note(lent) {
                            refill.settle_ahead(&grants, now);
                        }
                    }
                    return Ok(decision);
                }
                match leases.ask(policy, items, now) {
                    Asked::Wait(mut refill) => {
                        let _ = tokio::time::timeout(self.redis.timeout(), refill.changed()).await;
                    }
                    Asked::Refill(refill) if refill.any() => {
                        let result = self
                            .redis
                            .lease(policy, items, refill.asks(), now, hold)
                            .await;
                        let result = result.map(|(mut decision, grants)| {
                            refill.settle(items, &mut decision, &grants, now);
                            decision
                        });
                        return self.health.note(result);
                    }
                    Asked::Refill(_) | Asked::Nothing => break,
                }
            }
        }
        let result = self.redis.decide(policy, items, now, hold).await;
        self.health.note(result)
    }

    /// Give back the unused units of this process's slices: all of them
    /// (`all`, at shutdown), or those of keys that went quiet. How many
    /// slices went back (0 if Redis did not take them: the units are then
    /// lost to the quota until its window or bucket moves on, never added).
    pub(crate) async fn give_back(&self, policy: &Policy, now: Nanos, all: bool) -> usize {
        let Some(leases) = &self.leases else {
            return 0;
        };
        let (items, asks) = leases.take_back(now, all);
        if items.is_empty() {
            return 0;
        }
        let result = self.redis.give_back(policy, &items, &asks, now).await;
        match self.health.note(result) {
            Ok(()) => items.len(),
            Err(_) => 0,
        }
    }

    /// Forget slices whose keys went quiet.
    pub(crate) fn sweep(&self, now: Nanos) {
        if let Some(leases) = &self.leases {
            leases.sweep(now);
        }
    }

    pub(crate) fn decide_blocking(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, String> {
        let result = self.redis.decide_blocking(policy, items, now, hold);
        self.health.note(result)
    }

    pub(crate) fn usage_blocking(
        &self,
        policy: &Policy,
        item: &Item,
        now: Nanos,
    ) -> Result<tollgate_core::algo::Usage, String> {
        let result = self
            .redis
            .usage_blocking(policy, std::slice::from_ref(item), now)
            .map(|u| u.first().copied().unwrap_or_default());
        self.health.note(result)
    }

    pub(crate) async fn finish(
        &self,
        policy: &Policy,
        committed: &[Item],
        now: Nanos,
        latency_us: u64,
    ) {
        let result = self.redis.finish(policy, committed, now, latency_us).await;
        let _ = self.health.note(result);
    }

    pub(crate) fn finish_blocking(
        &self,
        policy: &Policy,
        committed: &[Item],
        now: Nanos,
        latency_us: u64,
    ) {
        let result = self
            .redis
            .finish_blocking(policy, committed, now, latency_us);
        let _ = self.health.note(result);
    }
}

fn leases_for(policy: &Policy) -> Option<Leases> {
    policy
        .limits
        .iter()
        .any(|l| l.lease.is_some())
        .then(Leases::default)
}

fn config(e: RedisError) -> EngineError {
    EngineError::Config(e.to_string())
}

/// `policy` with every limit at `share` of its quota (at least 1 unit).
fn scaled(policy: &Policy, share: f64) -> Policy {
    let mut local = policy.clone();
    if share < 1.0 {
        for limit in &mut local.limits {
            for params in &mut limit.variants {
                *params = params.scaled(share);
            }
        }
    }
    local
}

/// Whether the shared store answers, and what the limits did while it did not.
#[derive(Debug)]
pub struct StoreHealth {
    url: String,
    up: AtomicBool,
    errors: AtomicU64,
    fail_open: AtomicU64,
    fail_local: AtomicU64,
    fail_closed: AtomicU64,
    leased: AtomicU64,
    /// A script error was logged (once: it would repeat per request).
    script_failed: AtomicBool,
}

impl StoreHealth {
    fn new(url: &str) -> Self {
        StoreHealth {
            url: url.to_string(),
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            fail_open: AtomicU64::new(0),
            fail_local: AtomicU64::new(0),
            fail_closed: AtomicU64::new(0),
            leased: AtomicU64::new(0),
            script_failed: AtomicBool::new(false),
        }
    }

    /// Record how a round trip went; log the first failure and the recovery.
    fn note<T>(&self, result: Result<T, RedisError>) -> Result<T, String> {
        match result {
            Ok(v) => {
                // A load first: the usual answer writes nothing shared.
                if !self.up.load(Ordering::Acquire) && !self.up.swap(true, Ordering::AcqRel) {
                    tracing::info!(store = %self.url, "redis answers again: decisions are shared again");
                }
                Ok(v)
            }
            Err(e @ RedisError::Script { .. }) => {
                // Redis answers: it is not down, but this decision could not
                // be made there (the limits' fail modes decide it).
                self.errors.fetch_add(1, Ordering::Relaxed);
                let reason = e.to_string();
                if !self.script_failed.swap(true, Ordering::Relaxed) {
                    tracing::error!(store = %self.url, error = %reason, "a decision failed on Redis (logged once); its limits followed their fail mode");
                }
                Err(reason)
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let reason = e.to_string();
                if self.up.swap(false, Ordering::AcqRel) {
                    tracing::warn!(store = %self.url, error = %reason, "redis is unavailable: limits follow their fail mode (open, closed, local) until it answers");
                }
                Err(reason)
            }
        }
    }

    pub(crate) fn count_closed(&self) {
        self.fail_closed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_fallback(&self, open: usize, local: usize) {
        if open > 0 {
            self.fail_open.fetch_add(1, Ordering::Relaxed);
        }
        if local > 0 {
            self.fail_local.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The URL (password hidden).
    pub fn url(&self) -> &str {
        &self.url
    }
    /// False from the first failed round trip until one succeeds.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
    /// Round trips that failed (timeouts, refused connections, errors).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    /// Requests admitted unchecked by a `fail = "open"` limit.
    pub fn fail_open(&self) -> u64 {
        self.fail_open.load(Ordering::Relaxed)
    }
    /// Requests decided in process by `fail = "local"` limits.
    pub fn fail_local(&self) -> u64 {
        self.fail_local.load(Ordering::Relaxed)
    }
    /// Requests refused by a `fail = "closed"` limit.
    pub fn fail_closed(&self) -> u64 {
        self.fail_closed.load(Ordering::Relaxed)
    }
    /// Requests admitted from this process's slices of leased limits,
    /// without a round trip.
    pub fn leased(&self) -> u64 {
        self.leased.load(Ordering::Relaxed)
    }
}
