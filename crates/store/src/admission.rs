//! What every adapter that lets a request through owes its limits, in one
//! place: the hold rule (wait briefly for capacity, in a bounded queue) and
//! the settlement at completion (latency debit, concurrency release), which
//! runs when the `Admission` is dropped, so a request that ends any way at
//! all (finished, failed, client gone) settles exactly once.

use crate::engine::{Engine, EngineError};
use crate::holds::{HoldPlace, Holds};
use crate::TokioClock;
use std::sync::Arc;
use tollgate_core::units::NANOS_PER_MICRO;
use tollgate_core::{Clock, Decision, Item, Nanos, Verdict};

/// Most requests held at once: in total, and per key of each holding limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldBounds {
    /// Requests held at once, all keys together.
    pub total: usize,
    /// Requests held at once on one key of one limit.
    pub per_key: usize,
}

/// A decision made under the hold rule. An admission with a delay keeps its
/// hold places until `hold` has waited it out.
#[derive(Debug)]
pub struct Decided {
    /// What the limits decided (with the delay to hold for, if any).
    pub decision: Decision,
    /// Decided in process (the shared store was unavailable).
    pub local: bool,
    /// The instant it was decided at.
    pub at: Nanos,
    places: Vec<HoldPlace>,
}

impl Decided {
    /// How long the request is held before it goes (0: at once).
    pub fn delay(&self) -> Nanos {
        match self.decision.verdict {
            Verdict::Admit { delay } => delay,
            _ => 0,
        }
    }

    /// Wait out the hold, then give the hold places back.
    pub async fn hold(&mut self, clock: &TokioClock) {
        let delay = self.delay();
        if delay > 0 {
            tokio::time::sleep_until(clock.instant_at(self.at + delay)).await;
        }
        self.places.clear();
    }
}

/// Decide `items` under the hold rule. First without holding: most requests
/// are admitted (or denied for longer than any hold) here, and a denial
/// consumes nothing. Only a request that a hold could save claims places in
/// the bounded queue (one per holding limit's key) and is decided again,
/// holding; without places it is denied.
pub async fn decide_holding(
    engine: &Engine,
    items: &[Item],
    clock: &TokioClock,
    holds: &Arc<Holds>,
    bounds: HoldBounds,
) -> Result<Decided, EngineError> {
    let mut at = clock.now();
    let (mut decision, mut local) = engine.decide_async(items, at, false).await?;
    let mut places = Vec::new();
    if let Verdict::Deny {
        retry_after: Some(wait),
        ..
    } = decision.verdict
    {
        // The limits that make it wait (enforcing, denying on their own):
        // as in `decide`, the shortest of their holds bounds the wait, and
        // only their keys' queues take a place.
        let policy = engine.policy();
        let blocking: Vec<&Item> = items
            .iter()
            .zip(&decision.outcomes)
            .filter(|(_, o)| !o.shadow && !o.allowed)
            .map(|(i, _)| i)
            .collect();
        let hold = blocking.iter().map(|i| policy.limits[i.limit].hold).min();
        if let Some(hold) = hold.filter(|hold| wait > *hold && *hold > 0) {
            // Too long to hold now, but one that comes `hold` before its
            // slot is held into it: that arrival is what Retry-After says
            // (as `decide` with holds says it; exact for one limit, and
            // for several the shortest hold, never too early).
            if let Verdict::Deny { retry_after, .. } = &mut decision.verdict {
                *retry_after = Some(wait - hold);
            }
        }
        if hold.is_some_and(|hold| wait <= hold) {
            places = blocking
                .iter()
                .map_while(|i| holds.claim(i.limit, &i.key, bounds.total, bounds.per_key))
                .collect();
            if places.len() == blocking.len() {
                at = clock.now();
                (decision, local) = engine.decide_async(items, at, true).await?;
            }
        }
    }
    if !decision.allowed() {
        places.clear();
    }
    Ok(Decided {
        decision,
        local,
        at,
        places,
    })
}

/// What an admitted request owes its limits when it completes: the latency
/// debit and the concurrency release, settled where it was decided. Runs
/// on drop.
#[derive(Debug)]
pub struct Admission {
    engine: Arc<Engine>,
    items: Vec<Item>,
    clock: TokioClock,
    /// When the request went to the upstream; None if it never did (the
    /// client left while held): nothing to debit, only slots to release.
    started: Option<Nanos>,
    local: bool,
}

impl Admission {
    /// For the committed items of an admitting decision that settle at
    /// completion; None if none do (nothing is owed).
    pub fn new(
        engine: &Arc<Engine>,
        items: &[Item],
        decided: &Decided,
        clock: &TokioClock,
    ) -> Option<Admission> {
        let policy = engine.policy();
        let owed: Vec<Item> = crate::committed(items, &decided.decision)
            .filter(|i| policy.limits[i.limit].settles_at_completion())
            .cloned()
            .collect();
        (!owed.is_empty()).then(|| Admission {
            engine: engine.clone(),
            items: owed,
            clock: clock.clone(),
            started: None,
            local: decided.local,
        })
    }

    /// Latency is counted from here (the request goes to the upstream).
    pub fn start(&mut self) {
        self.started = Some(self.clock.now());
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let now = self.clock.now();
        let latency_us = self
            .started
            .map_or(0, |started| now.saturating_sub(started) / NANOS_PER_MICRO);
        if self.local || !self.engine.is_shared() {
            self.engine
                .finish_where(&self.items, now, latency_us, self.local);
            return;
        }
        // Settling in Redis is a round trip: not on this (dropping) thread.
        let engine = self.engine.clone();
        let items = std::mem::take(&mut self.items);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                engine.finish_async(&items, now, latency_us).await;
            });
        }
    }
}
