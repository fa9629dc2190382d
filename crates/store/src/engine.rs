//! A policy and its store: what adapters call with a request and a `now`.

use crate::memory::{MemoryStore, StoreError};
use std::sync::Arc;
use tollgate_core::{Decision, Item, Nanos, Policy, Request, RequestError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request itself is malformed for this policy (a 400).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The store cannot track the request's key (a 503).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The limits a request touched and what was decided. Keep it until the
/// request completes and pass it to `Engine::finish`.
#[derive(Debug, Clone)]
pub struct Checked {
    pub items: Vec<Item>,
    pub decision: Decision,
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

#[derive(Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    store: MemoryStore,
}

impl Engine {
    pub fn new(policy: Policy) -> Self {
        let store = MemoryStore::new(&policy);
        Engine {
            policy: Arc::new(policy),
            store,
        }
    }

    /// The engine for a reloaded `policy`: limits whose definition did not
    /// change keep their counters (their tables are shared with this engine,
    /// so requests still finishing here settle on the same state).
    pub fn reloaded(&self, policy: Policy) -> Self {
        let store = MemoryStore::carry_over(&policy, &self.store, &self.policy);
        Engine {
            policy: Arc::new(policy),
            store,
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    pub fn check(&self, req: &impl Request, now: Nanos) -> Result<Checked, EngineError> {
        let mut items = Vec::with_capacity(self.policy.limits.len());
        let decision = self.check_into(req, now, &mut items)?;
        Ok(Checked { items, decision })
    }

    /// Like `check`, reusing the caller's buffer for the items.
    pub fn check_into(
        &self,
        req: &impl Request,
        now: Nanos,
        items: &mut Vec<Item>,
    ) -> Result<Decision, EngineError> {
        self.policy.plan(req, items)?;
        Ok(self.store.decide(&self.policy, items, now)?)
    }

    /// Decide items already planned (by `Policy::plan` on this engine's
    /// policy); with `hold` false no request is held.
    pub fn decide(&self, items: &[Item], now: Nanos, hold: bool) -> Result<Decision, EngineError> {
        Ok(self.store.decide_with(&self.policy, items, now, hold)?)
    }

    /// The request completed at `now` after `latency_us` of upstream time:
    /// debit its latency limits and release its concurrency slots, for the
    /// limits its decision committed.
    pub fn finish(&self, checked: &Checked, now: Nanos, latency_us: u64) {
        let committed: Vec<Item> = checked.committed().cloned().collect();
        self.finish_committed(&committed, now, latency_us);
    }

    /// Like `finish`, for a caller that kept only `Checked::committed()`.
    pub fn finish_committed(&self, committed: &[Item], now: Nanos, latency_us: u64) {
        self.store.finish(&self.policy, committed, now, latency_us);
    }

    pub fn sweep(&self, now: Nanos) -> usize {
        self.store.sweep(&self.policy, now)
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
    fn a_reload_keeps_the_counters_of_unchanged_limits_only() {
        let engine = Engine::new(policy(100));
        let req = Attrs::new("GET", "/", &[("k", "a")]);
        for _ in 0..3 {
            assert!(engine.check(&req, 0).unwrap().decision.allowed());
        }
        assert_eq!(engine.store().stats().keys, 2);
        let next = engine.reloaded(policy(50));
        let checked = next.check(&req, 0).unwrap();
        // burst kept its counter (empty); daily started over.
        assert!(!checked.decision.allowed());
        assert_eq!(checked.decision.outcomes[1].remaining, 50);
        drop(engine);
        // The old daily table is gone with the old engine; burst's is shared.
        assert_eq!(next.store().stats().keys, 1);
    }

    #[test]
    fn engines_of_a_reload_that_reorders_limits_do_not_deadlock() {
        let a = "[[limit]]\nname = \"a\"\nkey = [\"header:k\"]\nalgorithm = \"token_bucket\"\ncapacity = 1000000\nrefill = \"1/s\"\n";
        let b = "[[limit]]\nname = \"b\"\nkey = [\"header:k\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1000000\n";
        let first = Engine::new(tollgate_core::parse(&format!("{a}{b}"), &NoProfiles).unwrap());
        let second = first.reloaded(tollgate_core::parse(&format!("{b}{a}"), &NoProfiles).unwrap());
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
        let text = |quota: u64| {
            format!("[store]\nmax_keys = 3\n[[limit]]\nname = \"w\"\nkey = [\"header:k\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = {quota}\n")
        };
        let old = Engine::new(tollgate_core::parse(&text(5), &NoProfiles).unwrap());
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
        let new = old.reloaded(tollgate_core::parse(&text(6), &NoProfiles).unwrap());
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
}
