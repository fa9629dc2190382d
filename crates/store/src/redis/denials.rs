//! Denials remembered until their retry instant, so that a client hammering
//! a limit it is over costs this process a map lookup instead of a Redis
//! call (envoy's ratelimit keeps such a local cache of over-limit keys).
//!
//! Why the verdict is exact: the decision script's retry_after is the
//! earliest instant at which the same request (same limits, keys and costs,
//! same hold) would be admitted given the state it saw. Other processes can
//! only add to that state (admissions, latency debits), never take from it,
//! so no request like it is admitted before then: Redis would deny it too.
//! What may lag is the advice: admissions since (a cheaper request on the
//! same key, another process) can push the true retry instant later, as
//! they could just after any denial; the client then waits again. Not
//! remembered: requests with a `concurrency` limit (a release frees room at
//! any moment) and denials without a retry instant. A reload builds a new
//! store, and so forgets them.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use tollgate_core::{Decision, Item, Nanos, Verdict};

/// At most this many denials are remembered (about 200 bytes each).
const MOST: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct Denials {
    /// By a hash of the request (`fingerprint`); the entry holds the
    /// request itself, so a collision is a miss, never a wrong answer.
    remembered: Mutex<HashMap<u64, Denied>>,
}

#[derive(Debug)]
struct Denied {
    items: Vec<Item>,
    hold: bool,
    /// When Redis denied (the caller's clock).
    at: Nanos,
    /// Until when the same request is denied.
    until: Nanos,
    decision: Decision,
}

impl Denials {
    /// The denial of this request if one is remembered and still holds at
    /// `now`, its waits shortened by the time since.
    pub(super) fn get(&self, items: &[Item], hold: bool, now: Nanos) -> Option<Decision> {
        let key = fingerprint(items, hold);
        let mut remembered = self.remembered.lock();
        let denied = remembered.get(&key)?;
        if denied.items != items || denied.hold != hold {
            return None;
        }
        // A clock that went back cannot say how long is left: ask Redis.
        if now >= denied.until || now < denied.at {
            remembered.remove(&key);
            return None;
        }
        let elapsed = now - denied.at;
        let mut decision = denied.decision.clone();
        if let Verdict::Deny { retry_after, .. } = &mut decision.verdict {
            *retry_after = Some(denied.until - now);
        }
        for o in &mut decision.outcomes {
            o.reset = o.reset.saturating_sub(elapsed);
            o.retry_after = o.retry_after.map(|r| r.saturating_sub(elapsed));
        }
        Some(decision)
    }

    /// Remember `decision` for this request if it is a denial that holds
    /// until a known instant (`releases`: some limit of it frees room on
    /// release, so it does not).
    pub(super) fn note(
        &self,
        items: &[Item],
        hold: bool,
        now: Nanos,
        decision: &Decision,
        releases: bool,
    ) {
        let Verdict::Deny {
            retry_after: Some(wait),
            ..
        } = decision.verdict
        else {
            return;
        };
        if releases || wait == 0 {
            return;
        }
        let mut remembered = self.remembered.lock();
        if remembered.len() >= MOST {
            remembered.retain(|_, d| d.until > now);
            if remembered.len() >= MOST {
                remembered.clear();
            }
        }
        remembered.insert(
            fingerprint(items, hold),
            Denied {
                items: items.to_vec(),
                hold,
                at: now,
                until: now.saturating_add(wait),
                decision: decision.clone(),
            },
        );
    }
}

fn fingerprint(items: &[Item], hold: bool) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    items.hash(&mut h);
    hold.hash(&mut h);
    h.finish()
}
