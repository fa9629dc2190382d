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

    /// The request completed at `now` after `latency_us` of upstream time.
    pub fn finish(&self, items: &[Item], now: Nanos, latency_us: u64) {
        self.store.finish(&self.policy, items, now, latency_us);
    }

    pub fn sweep(&self, now: Nanos) -> usize {
        self.store.sweep(&self.policy, now)
    }
}
