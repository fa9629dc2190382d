//! A policy and its store: what adapters call with a request and a `now`.
//!
//! The store is the embedded memory store, or (fleet mode, `[store] kind =
//! "redis"`) Redis, with the memory store kept as the in-process fallback
//! that limits with `fail = "local"` use while Redis cannot answer.

use crate::memory::{MemoryStore, StoreError};
use std::sync::Arc;
use tollgate_core::policy::{FailMode, Mode};
use tollgate_core::{Decision, Item, Nanos, Outcome, Policy, Request, RequestError, Verdict};

/// Why the engine could not decide a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request itself is malformed for this policy (a 400).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The store cannot track the request's key (a 503).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shared store did not answer and this limit fails closed (a 503).
    #[error("limit '{limit}' fails closed while its store is unavailable: {reason}")]
    Unavailable {
        /// The limit that fails closed.
        limit: String,
        /// What the store said (or that it did not answer in time).
        reason: String,
    },
    /// The policy cannot be served by its configured store.
    #[error("{0}")]
    Config(String),
}

/// The limits a request touched and what was decided. Keep it until the
/// request completes and pass it to `Engine::finish`.
#[derive(Debug, Clone)]
pub struct Checked {
    /// One per limit that applies to the request (its key and cost).
    pub items: Vec<Item>,
    /// What the limits decided, one outcome per item.
    pub decision: Decision,
    /// Decided in process because the shared store was unavailable: settle
    /// it in process too.
    pub local: bool,
}

impl Checked {
    /// The items whose limits this decision charged: every limit of an
    /// admitted request, except shadow limits that would have denied it.
    pub fn committed(&self) -> impl Iterator<Item = &Item> {
        committed(&self.items, &self.decision)
    }
}

/// See `Checked::committed`.
pub fn committed<'a>(items: &'a [Item], decision: &'a Decision) -> impl Iterator<Item = &'a Item> {
    let admitted = decision.allowed();
    items
        .iter()
        .zip(&decision.outcomes)
        .filter(move |(_, outcome)| admitted && outcome.allowed)
        .map(|(item, _)| item)
}

/// A policy's limits and the store that keeps their state: in process
/// (the default), or in Redis shared by a fleet (`[store] kind = "redis"`),
/// with an in-process fallback for limits that `fail = "local"`. Every
/// adapter (the gateway, the proxy, the runner, the tower layer, the RLS
/// listener) decides through one.
#[derive(Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    /// The store (memory mode), or the in-process fallback (fleet mode).
    store: MemoryStore,
    shared: Option<crate::fleet::Shared>,
}

impl Engine {
    /// An engine on the embedded memory store, whatever `[store]` says.
    pub fn new(policy: Policy) -> Self {
        let store = MemoryStore::new(&policy);
        Engine {
            policy: Arc::new(policy),
            store,
            shared: None,
        }
    }

    /// The engine `[store]` asks for: memory, or Redis shared by every
    /// process using the same `namespace` ("gateway", "upstream:NAME").
    /// Nothing is sent to Redis yet (see `connect`).
    pub fn open(policy: Policy, namespace: &str) -> Result<Self, EngineError> {
        Self::open_with(policy, namespace, crate::redis::TimeSource::Server)
    }

    /// `open`, taking decisions' instants from `time` (tests with a fake
    /// clock use `TimeSource::Caller`).
    pub fn open_with(
        policy: Policy,
        namespace: &str,
        time: crate::redis::TimeSource,
    ) -> Result<Self, EngineError> {
        if policy.store.redis.is_some() {
            let shared = crate::fleet::Shared::new(&policy, namespace, time)?;
            let store = MemoryStore::new(shared.local_policy());
            return Ok(Engine {
                policy: Arc::new(policy),
                store,
                shared: Some(shared),
            });
        }
        Ok(Self::new(policy))
    }

    /// The engine for a reloaded `policy`, at `now`: limits whose definition
    /// did not change keep their counters, and those changed in quota, rate
    /// or tiers carry what each key used into the new definition (see
    /// `tollgate_core::carry`, which also says what starts fresh and why).
    /// Their tables are shared with this engine, so requests still finishing
    /// here settle on the same state; in Redis their keys are the same.
    pub fn reloaded(&self, policy: Policy, now: Nanos) -> Result<Self, EngineError> {
        if let Some(shared) = &self.shared {
            let next = shared.reloaded(&self.policy, &policy, now)?;
            let store = MemoryStore::carry_over(
                next.local_policy(),
                &self.store,
                shared.local_policy(),
                now,
            );
            return Ok(Engine {
                policy: Arc::new(policy),
                store,
                shared: Some(next),
            });
        }
        let store = MemoryStore::carry_over(&policy, &self.store, &self.policy, now);
        Ok(Engine {
            policy: Arc::new(policy),
            store,
            shared: None,
        })
    }

    /// Whether counters live in a shared store (Redis).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The shared store's health and failure counters, in fleet mode.
    pub fn health(&self) -> Option<&Arc<crate::fleet::StoreHealth>> {
        self.shared.as_ref().map(|s| s.health())
    }

    /// Reach the shared store now (an error names an unreachable server or
    /// a refused password); nothing to do in memory mode.
    pub async fn connect(&self) -> Result<(), EngineError> {
        if let Some(shared) = &self.shared {
            return shared.connect().await;
        }
        Ok(())
    }

    /// The policy the in-process store decides with: the policy itself, or
    /// in fleet mode its `local_share`.
    fn local_policy(&self) -> &Policy {
        if let Some(shared) = &self.shared {
            return shared.local_policy();
        }
        &self.policy
    }

    /// The policy it enforces.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The in-process store (in fleet mode, the fallback's).
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// Plan and decide a request. In fleet mode this blocks for one Redis
    /// round trip: async callers use `check_async`.
    pub fn check(&self, req: &impl Request, now: Nanos) -> Result<Checked, EngineError> {
        let mut items = Vec::with_capacity(self.policy.limits.len());
        self.policy.plan(req, &mut items)?;
        let (decision, local) = self.decide_where(&items, now, true)?;
        Ok(Checked {
            items,
            decision,
            local,
        })
    }

    /// Like `check`, reusing the caller's buffer for the items.
    pub fn check_into(
        &self,
        req: &impl Request,
        now: Nanos,
        items: &mut Vec<Item>,
    ) -> Result<Decision, EngineError> {
        self.policy.plan(req, items)?;
        Ok(self.decide_where(items, now, true)?.0)
    }

    /// Decide items already planned (by `Policy::plan` on this engine's
    /// policy); with `hold` false no request is held. In fleet mode this
    /// blocks for one Redis round trip (the decision is at Redis's clock).
    pub fn decide(&self, items: &[Item], now: Nanos, hold: bool) -> Result<Decision, EngineError> {
        Ok(self.decide_where(items, now, hold)?.0)
    }

    /// `decide`, and whether it was made in process (the shared store was
    /// unavailable): settle such a decision with `finish_local`.
    pub fn decide_where(
        &self,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<(Decision, bool), EngineError> {
        match &self.shared {
            Some(shared) => {
                let answer = shared.decide_blocking(&self.policy, items, now, hold);
                self.shared_or_fallback(answer, items, now, hold)
            }
            None => Ok((
                self.store.decide_with(&self.policy, items, now, hold)?,
                false,
            )),
        }
    }

    /// Plan and decide a request without blocking the caller's thread.
    pub async fn check_async(
        &self,
        req: &impl Request,
        now: Nanos,
    ) -> Result<Checked, EngineError> {
        let mut items = Vec::with_capacity(self.policy.limits.len());
        self.policy.plan(req, &mut items)?;
        let (decision, local) = self.decide_async(&items, now, true).await?;
        Ok(Checked {
            items,
            decision,
            local,
        })
    }

    /// `decide_where` without blocking: one pipelined Redis round trip in
    /// fleet mode, at once in memory.
    pub async fn decide_async(
        &self,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<(Decision, bool), EngineError> {
        match &self.shared {
            Some(shared) => {
                let answer = shared.decide(&self.policy, items, now, hold).await;
                self.shared_or_fallback(answer, items, now, hold)
            }
            None => Ok((
                self.store.decide_with(&self.policy, items, now, hold)?,
                false,
            )),
        }
    }

    /// Redis's decision, or (it did not answer) the fallback's, marked local.
    fn shared_or_fallback(
        &self,
        answer: Result<Decision, String>,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<(Decision, bool), EngineError> {
        match answer {
            Ok(decision) => Ok((decision, false)),
            Err(reason) => Ok((self.fallback(items, now, hold, reason)?, true)),
        }
    }

    /// Redis did not answer: each limit of the request does what its `fail`
    /// says. One that fails closed refuses the request; the others are
    /// admitted (open) or decided in process with `local_share` (local).
    fn fallback(
        &self,
        items: &[Item],
        now: Nanos,
        hold: bool,
        reason: String,
    ) -> Result<Decision, EngineError> {
        let health = self.health().map(Arc::as_ref);
        let fail = |item: &Item| self.policy.limits[item.limit].fail;
        // (a shadow limit never denies, so its store being down does not either)
        let shadow = |item: &Item| self.policy.limits[item.limit].mode == Mode::Shadow;
        if let Some(item) = (items.iter()).find(|i| fail(i) == FailMode::Closed && !shadow(i)) {
            if let Some(h) = health {
                h.count_closed();
            }
            return Err(EngineError::Unavailable {
                limit: self.policy.limits[item.limit].name.clone(),
                reason,
            });
        }
        let local_at: Vec<usize> = (0..items.len())
            .filter(|&i| fail(&items[i]) == FailMode::Local)
            .collect();
        let local_items: Vec<Item> = local_at.iter().map(|&i| items[i].clone()).collect();
        let local = if local_items.is_empty() {
            None
        } else {
            Some(
                self.store
                    .decide_with(self.local_policy(), &local_items, now, hold)?,
            )
        };
        let verdict = match local.as_ref().map(|d| d.verdict) {
            None => Verdict::Admit { delay: 0 },
            Some(Verdict::Deny { limit, retry_after }) => Verdict::Deny {
                limit: local_at[limit],
                retry_after,
            },
            Some(Verdict::Never {
                limit,
                cost,
                capacity,
            }) => Verdict::Never {
                limit: local_at[limit],
                cost,
                capacity,
            },
            Some(admit) => admit,
        };
        let mut local_outcomes = local.iter().flat_map(|d| d.outcomes.iter().copied());
        let outcomes = items
            .iter()
            .map(|item| match fail(item) {
                FailMode::Local => local_outcomes.next().unwrap_or_default(),
                _ => {
                    let limit = &self.policy.limits[item.limit];
                    Outcome {
                        allowed: true,
                        remaining: limit.params(item.class).policy().0,
                        reset: 0,
                        retry_after: None,
                        shadow: limit.mode == Mode::Shadow,
                    }
                }
            })
            .collect();
        if let Some(h) = health {
            h.count_fallback(items.len() - local_at.len(), local_at.len());
        }
        Ok(Decision { verdict, outcomes })
    }

    /// The request completed at `now` after `latency_us` of upstream time:
    /// debit its latency limits and release its concurrency slots, for the
    /// limits its decision committed, where it was decided.
    pub fn finish(&self, checked: &Checked, now: Nanos, latency_us: u64) {
        let committed: Vec<Item> = checked.committed().cloned().collect();
        self.finish_where(&committed, now, latency_us, checked.local);
    }

    /// Like `finish`, for a caller that kept only `Checked::committed()` of
    /// a decision made in the engine's store (in fleet mode, one blocking
    /// round trip; a settlement Redis cannot take is logged and dropped: the
    /// key's counters then heal when it expires).
    pub fn finish_committed(&self, committed: &[Item], now: Nanos, latency_us: u64) {
        if let Some(shared) = &self.shared {
            shared.finish_blocking(&self.policy, committed, now, latency_us);
            return;
        }
        self.store.finish(&self.policy, committed, now, latency_us);
    }

    /// `finish_committed` without blocking.
    pub async fn finish_async(&self, committed: &[Item], now: Nanos, latency_us: u64) {
        if let Some(shared) = &self.shared {
            shared
                .finish(&self.policy, committed, now, latency_us)
                .await;
            return;
        }
        self.store.finish(&self.policy, committed, now, latency_us);
    }

    /// What a client may see of `item`'s limit now (the admin API). In
    /// fleet mode a blocking round trip; the local view if Redis is down.
    pub fn usage(&self, item: &Item, now: Nanos) -> tollgate_core::algo::Usage {
        if let Some(shared) = &self.shared {
            if let Ok(usage) = shared.usage_blocking(&self.policy, item, now) {
                return usage;
            }
        }
        self.store.usage(self.local_policy(), item, now)
    }

    /// Settle a decision where it was made: in process if `local`.
    pub fn finish_where(&self, committed: &[Item], now: Nanos, latency_us: u64, local: bool) {
        if local {
            self.finish_local(committed, now, latency_us);
        } else {
            self.finish_committed(committed, now, latency_us);
        }
    }

    /// `finish_where` without blocking the caller's thread.
    pub async fn settle(&self, committed: &[Item], now: Nanos, latency_us: u64, local: bool) {
        if local {
            self.finish_local(committed, now, latency_us);
        } else {
            self.finish_async(committed, now, latency_us).await;
        }
    }

    /// Settle a decision made in process (`decide_where` said so).
    pub fn finish_local(&self, committed: &[Item], now: Nanos, latency_us: u64) {
        self.store
            .finish(self.local_policy(), committed, now, latency_us);
    }

    /// Fleet mode with leased limits: give back the unused units of this
    /// process's slices to the shared quota, all of them (`all`: before
    /// shutting down) or those of keys that went quiet (periodic upkeep).
    /// How many slices went back.
    pub async fn give_back_leases(&self, now: Nanos, all: bool) -> usize {
        match &self.shared {
            Some(shared) => shared.give_back(&self.policy, now, all).await,
            None => 0,
        }
    }

    /// Forget the keys whose state is at rest at `now` (a fresh state would
    /// decide the same); how many went.
    pub fn sweep(&self, now: Nanos) -> usize {
        if let Some(shared) = &self.shared {
            shared.sweep(now);
        }
        self.store.sweep(self.local_policy(), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::{Attrs, NoProfiles};

    fn policy(daily_quota: u64) -> Policy {
        tollgate_core::parse(
            &format!("[[limit]]\nname = \"burst\"\nkey = [\"header:k\"]\nalgorithm = \"token_bucket\"\ncapacity = 3\nrefill = \"1/h\"\n[[limit]]\nname = \"daily\"\nkey = [\"header:k\"]\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = {daily_quota}\n"),
            &NoProfiles,
        )
        .unwrap()
    }

    #[test]
    fn a_reload_keeps_unchanged_counters_and_carries_changed_ones() {
        let engine = Engine::new(policy(100));
        let req = Attrs::new("GET", "/", &[("k", "a")]);
        for _ in 0..3 {
            assert!(engine.check(&req, 0).unwrap().decision.allowed());
        }
        assert_eq!(engine.store().stats().keys, 2);
        let next = engine.reloaded(policy(50), 0).unwrap();
        let checked = next.check(&req, 0).unwrap();
        // burst kept its counter (empty); daily carried its 3 into the new quota.
        assert!(!checked.decision.allowed());
        assert_eq!(checked.decision.outcomes[1].remaining, 47);
        drop(engine);
        // Both tables are shared.
        assert_eq!(next.store().stats().keys, 2);
    }

    #[test]
    fn the_old_engine_decides_a_reshaped_key_by_the_new_definition() {
        let bucket = |capacity: u64, refill: &str| {
            tollgate_core::parse(
                &format!("[[limit]]\nname = \"b\"\nkey = [\"header:k\"]\nalgorithm = \"token_bucket\"\ncapacity = {capacity}\nrefill = \"{refill}\"\n"),
                &NoProfiles,
            )
            .unwrap()
        };
        let old = Engine::new(bucket(50, "1/d"));
        let req = Attrs::new("GET", "/", &[("k", "a")]);
        for _ in 0..50 {
            assert!(old.check(&req, 0).unwrap().decision.allowed());
        }
        // 50 units owed at 2 a day is 25 days of debt: under the old
        // definition (room for 50 days) that would admit more, so a request
        // still deciding on the old engine reads the key by the new one.
        let new = old.reloaded(bucket(40, "2/d"), 0).unwrap();
        assert!(!old.check(&req, 0).unwrap().decision.allowed());
        assert!(!new.check(&req, 0).unwrap().decision.allowed());
    }

    #[test]
    fn engines_of_a_reload_that_reorders_limits_do_not_deadlock() {
        let a = "[[limit]]\nname = \"a\"\nkey = [\"header:k\"]\nalgorithm = \"token_bucket\"\ncapacity = 1000000\nrefill = \"1/s\"\n";
        let b = "[[limit]]\nname = \"b\"\nkey = [\"header:k\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1000000\n";
        let first = Engine::new(tollgate_core::parse(&format!("{a}{b}"), &NoProfiles).unwrap());
        let second = first
            .reloaded(
                tollgate_core::parse(&format!("{b}{a}"), &NoProfiles).unwrap(),
                0,
            )
            .unwrap();
        assert_eq!(second.store().stats().keys, 0);
        // Both engines share both tables, in opposite policy orders: one
        // busy key on each at once (this hung when locks followed policy order).
        std::thread::scope(|s| {
            for engine in [&first, &second] {
                s.spawn(move || {
                    let req = Attrs::new("GET", "/", &[("k", "t")]);
                    for n in 0..20_000u64 {
                        assert!(engine.check(&req, n).unwrap().decision.allowed());
                    }
                });
            }
        });
        assert_eq!(second.store().stats().keys, 2);
    }

    #[test]
    fn keys_of_a_changed_limit_stop_counting_at_the_reload() {
        // A changed window: the limit starts fresh.
        let text = |every: &str| {
            format!("[store]\nmax_keys = 3\n[[limit]]\nname = \"w\"\nkey = [\"header:k\"]\nalgorithm = \"fixed_window\"\nevery = \"{every}\"\nquota = 5\n")
        };
        let old = Engine::new(tollgate_core::parse(&text("1h"), &NoProfiles).unwrap());
        for k in ["a", "b", "c"] {
            assert!(old
                .check(&Attrs::new("GET", "/", &[("k", k)]), 0)
                .unwrap()
                .decision
                .allowed());
        }
        assert!(
            old.check(&Attrs::new("GET", "/", &[("k", "d")]), 0)
                .is_err(),
            "full"
        );
        // The old engine stays alive (requests still finishing on it), yet
        // the new one has room: the old table's keys no longer count.
        let new = old
            .reloaded(tollgate_core::parse(&text("2h"), &NoProfiles).unwrap(), 0)
            .unwrap();
        assert_eq!(new.store().stats().keys, 0);
        for k in ["d", "e", "f"] {
            assert!(new
                .check(&Attrs::new("GET", "/", &[("k", k)]), 0)
                .unwrap()
                .decision
                .allowed());
        }
        // Old requests keep working on the retired table, uncounted.
        assert!(old
            .check(&Attrs::new("GET", "/", &[("k", "z")]), 0)
            .unwrap()
            .decision
            .allowed());
        assert_eq!(new.store().stats().keys, 3);
        drop(old);
        assert_eq!(new.store().stats().keys, 3);
    }

    #[test]
    fn a_full_store_finds_room_again_once_keys_go_idle() {
        let text = "[store]\nmax_keys = 2\n[[limit]]\nname = \"w\"\nkey = [\"header:k\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 5\n";
        let engine = Engine::new(tollgate_core::parse(text, &NoProfiles).unwrap());
        let req = |k: &str| Attrs::new("GET", "/", &[("k", k)]);
        let hour = 3_600_000_000_000;
        assert!(engine.check(&req("a"), 1).is_ok());
        assert!(engine.check(&req("b"), 1).is_ok());
        // Full of busy keys: refused, again and again (cheaply: the whole
        // store is swept at most once a second).
        for n in 0..100 {
            assert!(engine.check(&req(&format!("new{n}")), 2 + n).is_err());
        }
        // Next window: a and b are at rest, wherever their shards are.
        assert!(engine
            .check(&req("c"), hour + 1)
            .unwrap()
            .decision
            .allowed());
        assert_eq!(engine.store().stats().refused, 100);
    }

    #[test]
    fn a_refused_request_gives_back_the_room_made_for_its_other_keys() {
        // Two limits per key: a new key needs two places. With room for one,
        // a place is made for one of them, the other is refused: the place
        // made must be given back, or the store would count a key it lacks.
        let limit = |name: &str| {
            format!("[[limit]]\nname = \"{name}\"\nkey = [\"header:k\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/h\"\n")
        };
        let text = format!("[store]\nmax_keys = 3\n{}{}", limit("a"), limit("b"));
        let engine = Engine::new(tollgate_core::parse(&text, &NoProfiles).unwrap());
        let req = |k: &str| Attrs::new("GET", "/", &[("k", k)]);
        assert!(engine.check(&req("one"), 1).unwrap().decision.allowed());
        assert_eq!(engine.store().stats().keys, 2);
        for n in 0..5 {
            assert!(engine.check(&req(&format!("new{n}")), 2 + n).is_err());
            assert_eq!(engine.store().stats().keys, 2, "after refusal {n}");
        }
        // A known key is decided as ever, and one new key per limit fits.
        assert!(!engine.check(&req("one"), 10).unwrap().decision.allowed());
        let limit_c = "[[limit]]\nname = \"c\"\nkey = [\"header:j\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/h\"\n";
        let engine =
            Engine::new(tollgate_core::parse(&format!("{text}{limit_c}"), &NoProfiles).unwrap());
        let both = Attrs::new("GET", "/", &[("k", "x"), ("j", "y")]);
        assert!(engine.check(&both, 1).unwrap().decision.allowed());
        assert_eq!(engine.store().stats().keys, 3);
    }
}
