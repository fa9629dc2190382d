//! Leased quota for hot keys (a limit's `lease = { max, ttl }`, fleet mode).
//!
//! A process takes a slice of a key's quota from Redis in the same call as a
//! request of that key, then admits the key's next requests from the slice
//! without a round trip, until the slice is spent or no longer usable. Its
//! next call for the key gives back what the slice did not use (decide.lua's
//! `lease` says how each algorithm takes it back exactly); so do the
//! gateway's upkeep, for slices of keys that went quiet, and its shutdown.
//!
//! The bound: a slice is taken from the key's counter before any of it is
//! used, so over any span admissions exceed what the limit admits by at most
//! the units the slices held at the span's start: per process and key, a
//! slice of at most `max` and what is left (at most a quarter) of the one it
//! replaces. A window's slice is used only while its units
//! still count there (within the fixed window it came from, before a sliding
//! window drops its segment), which makes that excess 0; a bucket's is used
//! for its `ttl`.
//!
//! A process keeps one slice per key and at most one refill in flight. The
//! request that leaves a slice at a quarter or less asks for the next one
//! ahead of need (one round trip, as without a lease), while the key's other
//! requests keep using what is left; the slice it replaces is given back
//! with the key's next call. A request that finds the slice short while a
//! refill is on its way waits for that refill (one round trip, as its own
//! would take) and tries the new slice.

use compact_str::CompactString;
use smallvec::SmallVec;
use std::collections::HashMap;
use tollgate_core::{Decision, Item, Nanos, Outcome, Policy, Verdict};

/// Where a slice's units sit on its key's counter (decide.lua's mark): an
/// absolute instant as a whole second and nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    pub secs: u64,
    pub nanos: u64,
}

/// Unused units of a slice, with the slice's mark: what is given back.
pub(crate) type Refund = (u64, Mark);

/// What one item asks of Redis: a slice of at most `want` units, after
/// giving back `refunds` (earlier slices' unused units).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ask {
    pub want: u64,
    pub refunds: SmallVec<[Refund; 2]>,
}

impl Ask {
    /// decide.lua's lease argument.
    pub(crate) fn argument(ask: Option<&Ask>) -> String {
        let Some(a) = ask else {
            return "-".into();
        };
        let mut text = a.want.to_string();
        for (units, mark) in &a.refunds {
            text.push_str(&format!(":{units}:{}:{}", mark.secs, mark.nanos));
        }
        text
    }
}

/// What Redis lent an item: `units` (0: nothing) including the request's own
/// cost, usable for `usable` ns from the decision at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Grant {
    pub units: u64,
    pub mark: Mark,
    pub usable: Option<Nanos>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SliceKey {
    limit: usize,
    class: usize,
    key: CompactString,
}

impl SliceKey {
    fn of(item: &Item) -> Self {
        SliceKey {
            limit: item.limit,
            class: item.class,
            key: item.key.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Slice {
    /// Units left to admit locally.
    units: u64,
    /// The last instant (this process's clock) they may be used at.
    until: Nanos,
    mark: Mark,
    /// The key's remaining as Redis counted it at the grant (the slice aside).
    remaining: u64,
    /// When the key's limit resets, as of the grant.
    reset_at: Nanos,
    /// A refill for this key is in flight since then; waiters subscribe to
    /// the sender, which is dropped (waking them) when the refill ends.
    asking: Option<(Nanos, std::sync::Arc<tokio::sync::watch::Sender<()>>)>,
    /// Units of slices this one replaced, to give back with the next call.
    stale: SmallVec<[Refund; 2]>,
    ttl: Nanos,
    max: u64,
}

impl Slice {
    fn empty(lease: tollgate_core::policy::Lease) -> Slice {
        Slice {
            units: 0,
            until: 0,
            mark: Mark::default(),
            remaining: 0,
            reset_at: 0,
            asking: None,
            stale: SmallVec::new(),
            ttl: lease.ttl,
            max: lease.max,
        }
    }

    /// Use `units` of what `grant` lent from `now` on.
    fn install(&mut self, units: u64, grant: &Grant, now: Nanos) {
        self.units = units;
        self.mark = grant.mark;
        self.until = now.saturating_add(grant.usable.map_or(self.ttl, |u| u.min(self.ttl)));
    }

    /// Mark a refill in flight.
    fn start_refill(&mut self, now: Nanos) {
        self.asking = Some((now, std::sync::Arc::new(tokio::sync::watch::channel(()).0)));
    }

    /// Everything to give back now: replaced slices' units, and this
    /// slice's when `with_current` (taken out of it).
    fn refunds(&mut self, with_current: bool) -> SmallVec<[Refund; 2]> {
        let mut refunds = std::mem::take(&mut self.stale);
        if with_current && self.units > 0 {
            refunds.push((std::mem::take(&mut self.units), self.mark));
        }
        refunds
    }
}

/// This process's slices, by key.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    slices: parking_lot::Mutex<HashMap<SliceKey, Slice>>,
}

/// Whether an item may be decided on a slice at all.
fn leasable(policy: &Policy, item: &Item) -> Option<tollgate_core::policy::Lease> {
    let lease = policy.limits[item.limit].lease?;
    (item.cost == item.charge && item.cost > 0).then_some(lease)
}

impl Leases {
    /// Admit `items` at `now` from this process's slices, if every item is
    /// leased and its slice covers its cost: the decision, made without
    /// Redis, and, when this leaves a slice at a quarter or less with no
    /// refill in flight, the refill to make ahead of need (the caller makes
    /// it with `RedisStore::prefetch` and `Refill::settle_ahead`).
    pub(crate) fn take<'a>(
        &'a self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
    ) -> Option<(Decision, Option<Refill<'a>>)> {
        if items.is_empty() || !items.iter().all(|i| leasable(policy, i).is_some()) {
            return None;
        }
        let keys: Vec<SliceKey> = items.iter().map(SliceKey::of).collect();
        let mut slices = self.slices.lock();
        let covered = keys.iter().zip(items).all(|(key, item)| {
            slices
                .get(key)
                .is_some_and(|s| now <= s.until && s.units >= item.cost)
        });
        if !covered {
            return None;
        }
        let (mut low, mut idle) = (false, true);
        let mut outcomes = SmallVec::new();
        for (key, item) in keys.iter().zip(items) {
            let slice = slices
                .get_mut(key)
                .expect("checked above under the same lock");
            slice.units -= item.cost;
            low |= slice.units.saturating_mul(4) <= slice.max;
            idle &= slice.asking.is_none();
            outcomes.push(Outcome {
                allowed: true,
                remaining: slice.remaining + slice.units,
                reset: slice.reset_at.saturating_sub(now),
                retry_after: None,
                shadow: policy.limits[item.limit].mode == tollgate_core::policy::Mode::Shadow,
            });
        }
        let decision = Decision {
            verdict: Verdict::Admit { delay: 0 },
            outcomes,
        };
        if !(low && idle) {
            return Some((decision, None));
        }
        let asks = keys
            .iter()
            .map(|key| {
                let slice = slices.get_mut(key)?;
                slice.start_refill(now);
                Some(Ask {
                    want: slice.max,
                    refunds: slice.refunds(false),
                })
            })
            .collect();
        drop(slices);
        let refill = Refill {
            leases: self,
            keys,
            asks,
            settled: false,
        };
        Some((decision, Some(refill)))
    }

    /// What each item asks of Redis with the request: a new slice (giving
    /// back the old one's units) for leased items whose slice is short; or,
    /// when another refill of such a key is in flight, the refill to wait
    /// for before taking from the slices again. Only requests whose
    /// every limit is leased ask (slices are spent only by such requests: a
    /// slice taken by another would sit unused while it is charged again).
    /// The refill ends with `Refill::settle`, or, if the caller gives up,
    /// when it is dropped.
    pub(crate) fn ask<'a>(&'a self, policy: &Policy, items: &[Item], now: Nanos) -> Asked<'a> {
        if !items.iter().all(|i| leasable(policy, i).is_some()) {
            return Asked::Nothing;
        }
        let mut slices = self.slices.lock();
        let busy = items.iter().find_map(|item| {
            let lease = leasable(policy, item)?;
            let (since, refill) = slices.get(&SliceKey::of(item))?.asking.as_ref()?;
            (now <= since + lease.ttl).then(|| refill.subscribe())
        });
        if let Some(refill) = busy {
            return Asked::Wait(refill);
        }
        let asks = items
            .iter()
            .map(|item| {
                let lease = leasable(policy, item)?;
                let slice = slices
                    .entry(SliceKey::of(item))
                    .or_insert_with(|| Slice::empty(lease));
                if now <= slice.until && slice.units >= item.cost {
                    // Enough here: another item of the request is what is short.
                    return None;
                }
                slice.start_refill(now);
                Some(Ask {
                    want: lease.max.max(item.cost),
                    refunds: slice.refunds(true),
                })
            })
            .collect();
        Asked::Refill(Refill {
            leases: self,
            keys: items.iter().map(SliceKey::of).collect(),
            asks,
            settled: false,
        })
    }

    /// The slices to give back now, taken out of this process: every one
    /// with units left (`all`, at shutdown), or those no longer usable
    /// (their keys went quiet). Per slice, its key as an item and the refund.
    pub(crate) fn take_back(&self, now: Nanos, all: bool) -> (Vec<Item>, Vec<Option<Ask>>) {
        let mut slices = self.slices.lock();
        slices
            .iter_mut()
            .filter(|(_, s)| {
                s.asking.is_none() && (!s.stale.is_empty() || s.units > 0 && (all || now > s.until))
            })
            .map(|(key, s)| {
                let item = Item {
                    limit: key.limit,
                    class: key.class,
                    key: key.key.clone(),
                    cost: 0,
                    charge: 0,
                };
                let with_current = all || now > s.until;
                let ask = Ask {
                    want: 0,
                    refunds: s.refunds(with_current),
                };
                (item, Some(ask))
            })
            .unzip()
    }

    /// Forget slices unusable for a while and empty (their keys went quiet;
    /// `take_back` gave their units back).
    pub(crate) fn sweep(&self, now: Nanos) {
        self.slices.lock().retain(|_, s| {
            now <= s.until.saturating_add(s.ttl)
                || !s.stale.is_empty()
                || s.asking.as_ref().is_some_and(|(t, _)| now <= t + s.ttl)
        });
    }
}

/// What a request not covered by its slices does next.
#[derive(Debug)]
pub(crate) enum Asked<'a> {
    /// Ask Redis (some items may ask nothing: see `Refill::any`).
    Refill(Refill<'a>),
    /// Wait for another request's refill of one of its keys, then look again.
    Wait(tokio::sync::watch::Receiver<()>),
    /// Nothing to ask: a limit of the request is not leased.
    Nothing,
}

/// One request's refills in flight.
#[derive(Debug)]
pub(crate) struct Refill<'a> {
    leases: &'a Leases,
    keys: Vec<SliceKey>,
    asks: Vec<Option<Ask>>,
    settled: bool,
}

impl Refill<'_> {
    /// Per item, what it asks (None: decided as without a lease).
    pub(crate) fn asks(&self) -> &[Option<Ask>] {
        &self.asks
    }

    /// Whether anything is asked at all.
    pub(crate) fn any(&self) -> bool {
        self.asks.iter().any(Option::is_some)
    }

    /// Keep what Redis lent with the request (`grants`, per item, with the
    /// request's own cost in it) as the items' slices, and show the client
    /// the key's remaining with them.
    pub(crate) fn settle(
        mut self,
        items: &[Item],
        decision: &mut Decision,
        grants: &[Grant],
        now: Nanos,
    ) {
        self.settled = true;
        let mut slices = self.leases.slices.lock();
        for (i, ask) in self.asks.iter().enumerate() {
            if ask.is_none() {
                continue;
            }
            let Some(slice) = slices.get_mut(&self.keys[i]) else {
                continue;
            };
            slice.asking = None;
            let grant = grants.get(i).copied().unwrap_or_default();
            let Some(outcome) = decision
                .outcomes
                .get_mut(i)
                .filter(|_| grant.units >= items[i].cost && grant.units > 0)
            else {
                slice.units = 0;
                continue;
            };
            slice.install(grant.units - items[i].cost, &grant, now);
            slice.remaining = outcome.remaining;
            slice.reset_at = now.saturating_add(outcome.reset);
            // The client sees the key's remaining with this process's slice in it.
            outcome.remaining += slice.units;
        }
    }

    /// Keep what a refill ahead of need (`RedisStore::prefetch`) lent as
    /// the items' next slices; the slices they replace, still in use until
    /// now, are given back with the keys' next calls.
    pub(crate) fn settle_ahead(mut self, grants: &[Grant], now: Nanos) {
        self.settled = true;
        let mut slices = self.leases.slices.lock();
        for (i, key) in self.keys.iter().enumerate() {
            let Some(slice) = slices.get_mut(key) else {
                continue;
            };
            slice.asking = None;
            let grant = grants.get(i).copied().unwrap_or_default();
            if grant.units == 0 {
                continue;
            }
            if slice.units > 0 {
                let replaced = (std::mem::take(&mut slice.units), slice.mark);
                slice.stale.push(replaced);
            }
            // The key's remaining as last known, less what this slice took
            // (what others took meanwhile shows at the next grant).
            slice.remaining = slice.remaining.saturating_sub(grant.units);
            slice.install(grant.units, &grant, now);
        }
    }
}

impl Drop for Refill<'_> {
    /// A caller that gave up (or a failed call): the refills are over; the
    /// units taken out of the old slices are not given back (the key admits
    /// less, never more).
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut slices = self.leases.slices.lock();
        for (key, ask) in self.keys.iter().zip(&self.asks) {
            if ask.is_some() {
                if let Some(slice) = slices.get_mut(key) {
                    slice.asking = None;
                }
            }
        }
    }
}
