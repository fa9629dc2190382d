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
//!
//! The same holds for a request that arrives while an identical one is on
//! its way to Redis: it waits for that one's answer (`Ask::Join`), and if it
//! was a denial that still holds, it is denied too, without a call of its
//! own; otherwise it asks Redis itself. A client hammering a spent limit
//! then costs about one call per retry instant, not one per request.

use super::RedisError;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use tokio::sync::oneshot;
use tollgate_core::{Decision, Item, Nanos, Verdict};

/// At most this many denials are remembered (about 200 bytes each).
const MOST: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct Denials {
    /// By a hash of the request (`fingerprint`); the entry holds the
    /// request itself, so a collision is a miss, never a wrong answer.
    remembered: Mutex<HashMap<u64, Denied>>,
    /// Requests on their way to Redis, by the same hash, with whoever waits
    /// for their answer.
    in_flight: Mutex<HashMap<u64, Flying>>,
}

#[derive(Debug)]
struct Flying {
    items: Vec<Item>,
    hold: bool,
    waiting: Vec<oneshot::Sender<Result<(), RedisError>>>,
}

/// What to do with a request (`Denials::ask`).
#[derive(Debug)]
pub(super) enum Ask<'a> {
    /// A remembered denial holds: this is the answer.
    Denied(Decision),
    /// An identical request is on its way: wait for it, then ask again
    /// (`Denials::get`), or take its error.
    Join(oneshot::Receiver<Result<(), RedisError>>),
    /// Ask Redis, and tell `Flight::land` what it said.
    Lead(Flight<'a>),
}

/// A request on its way to Redis that others may be waiting for; dropped
/// without `land` (its caller gave up), it lets them ask for themselves.
#[derive(Debug)]
pub(super) struct Flight<'a> {
    denials: &'a Denials,
    key: Option<u64>,
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
    /// The remembered denial of this request, or else whether to wait for an
    /// identical one on its way to Redis, or to ask Redis (as the one others
    /// will wait for, unless `releases`: see `note`).
    pub(super) fn ask(&self, items: &[Item], hold: bool, now: Nanos, releases: bool) -> Ask<'_> {
        let key = fingerprint(items, hold);
        if let Some(denied) = self.remembered(key, items, hold, now) {
            return Ask::Denied(denied);
        }
        let mut flight = Flight {
            denials: self,
            key: None,
        };
        if releases {
            return Ask::Lead(flight);
        }
        let mut in_flight = self.in_flight.lock();
        match in_flight.get_mut(&key) {
            Some(f) if f.items == items && f.hold == hold => {
                let (tx, rx) = oneshot::channel();
                f.waiting.push(tx);
                Ask::Join(rx)
            }
            Some(_) => Ask::Lead(flight), // another request with the same hash
            None => {
                in_flight.insert(
                    key,
                    Flying {
                        items: items.to_vec(),
                        hold,
                        waiting: Vec::new(),
                    },
                );
                flight.key = Some(key);
                Ask::Lead(flight)
            }
        }
    }

    /// The denial of this request if one is remembered and still holds at
    /// `now`, its waits shortened by the time since.
    pub(super) fn get(&self, items: &[Item], hold: bool, now: Nanos) -> Option<Decision> {
        self.remembered(fingerprint(items, hold), items, hold, now)
    }

    fn remembered(&self, key: u64, items: &[Item], hold: bool, now: Nanos) -> Option<Decision> {
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

impl Flight<'_> {
    /// Redis answered (`Ok`: its denial, if any, is noted already) or did
    /// not (`Err`): wake whoever waits, with the same error.
    pub(super) fn land(mut self, answer: Result<(), &RedisError>) {
        self.wake(answer.map_err(Clone::clone));
    }

    fn wake(&mut self, answer: Result<(), RedisError>) {
        let Some(key) = self.key.take() else {
            return;
        };
        let flying = self.denials.in_flight.lock().remove(&key);
        for waiting in flying.into_iter().flat_map(|f| f.waiting) {
            let _ = waiting.send(answer.clone());
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.wake(Ok(()));
    }
}

fn fingerprint(items: &[Item], hold: bool) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    items.hash(&mut h);
    hold.hash(&mut h);
    h.finish()
}
