//! The embedded store: one sharded hash table per (limit, class).
//!
//! Atomicity: a request's limits live in different tables; their shards are
//! locked in table order (the policy order, so no deadlock), the core decides
//! over all of them, and the locks are released together.
//!
//! Memory: an entry is the key (`CompactString`, 24 bytes, inline up to 24
//! bytes of key) and an `AnyState` (16 bytes; a token bucket's state is inline,
//! windowed states are boxed). Measured per token-bucket key including the
//! table's slack: see `bench/RESULTS.md`.
//!
//! Bounded keys: at most `max_keys` entries over all tables. A new key that
//! finds the store full first evicts keys at rest (a state equal to a fresh
//! one, so eviction never changes a decision); if none are, the request gets
//! `StoreError::Full` rather than an untracked admission.

use crate::state::AnyState;
use compact_str::CompactString;
use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tollgate_core::algo::{Meter, Usage};
use tollgate_core::policy::{AlgorithmKind, Policy};
use tollgate_core::{decide, Decision, Item, Nanos, Slot};

const SHARDS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("limit '{limit}': the store tracks max_keys = {max_keys} keys and none is idle; new keys are refused until some are")]
    Full { limit: String, max_keys: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub keys: usize,
    pub evictions: u64,
    pub refused: u64,
}

#[derive(Debug)]
struct Entry {
    key: CompactString,
    state: AnyState,
}

type Shard = HashTable<Entry>;

#[derive(Debug)]
struct Table {
    limit: usize,
    class: usize,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug)]
pub struct MemoryStore {
    tables: Vec<Table>,
    classes: usize,
    hasher: foldhash::fast::RandomState,
    keys: AtomicUsize,
    max_keys: usize,
    evictions: AtomicU64,
    refused: AtomicU64,
}

impl MemoryStore {
    pub fn new(policy: &Policy) -> Self {
        let classes = policy.classes.len() + 1;
        let tables = (0..policy.limits.len())
            .flat_map(|limit| (0..classes).map(move |class| (limit, class)))
            .map(|(limit, class)| Table {
                limit,
                class,
                shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            })
            .collect();
        MemoryStore {
            tables,
            classes,
            hasher: foldhash::fast::RandomState::default(),
            keys: AtomicUsize::new(0),
            max_keys: policy.store.max_keys,
            evictions: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            keys: self.keys.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn table(&self, item: &Item) -> &Table {
        &self.tables[item.limit * self.classes + item.class]
    }

    fn lock(&self, item: &Item) -> (MutexGuard<'_, Shard>, u64) {
        let hash = self.hasher.hash_one(item.key.as_str());
        // Middle bits: hashbrown uses the top 7 as its tag, the bottom for the bucket.
        let shard = (hash >> 32) as usize % SHARDS;
        (self.table(item).shards[shard].lock(), hash)
    }

    /// Decide and commit all of a request's limits at `now`, atomically.
    /// `policy` must be the policy this store was built for.
    /// `items` must name each limit at most once, in policy order (as
    /// `Policy::plan` gives them): shards are locked in that order.
    pub fn decide(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
    ) -> Result<Decision, StoreError> {
        let mut guards: SmallVec<[(MutexGuard<'_, Shard>, u64); 4]> =
            items.iter().map(|i| self.lock(i)).collect();
        let mut inserted: SmallVec<[bool; 4]> = SmallVec::new();
        for ((shard, hash), item) in guards.iter_mut().zip(items) {
            let key = item.key.as_str();
            let found = shard.find(*hash, |e| e.key == key).is_some();
            if !found {
                let params = policy.limits[item.limit].params(item.class);
                self.make_room(policy, shard, item, now)?;
                let hasher = &self.hasher;
                shard.insert_unique(
                    *hash,
                    Entry {
                        key: item.key.clone(),
                        state: AnyState::fresh(params),
                    },
                    |e| hasher.hash_one(e.key.as_str()),
                );
            }
            inserted.push(!found);
        }
        let mut meters: SmallVec<[_; 4]> = guards
            .iter_mut()
            .zip(items)
            .map(|((shard, hash), item)| {
                let key = item.key.as_str();
                let entry = shard
                    .find_mut(*hash, |e| e.key == key)
                    .expect("present: found or just inserted");
                entry
                    .state
                    .meter(policy.limits[item.limit].params(item.class))
            })
            .collect();
        let mut slots: SmallVec<[Slot<'_>; 4]> = meters
            .iter_mut()
            .zip(items)
            .map(|(meter, item)| {
                let limit = &policy.limits[item.limit];
                Slot {
                    meter,
                    cost: item.cost,
                    charge: item.charge,
                    hold: limit.hold,
                    shadow: limit.mode == tollgate_core::policy::Mode::Shadow,
                }
            })
            .collect();
        let decision = decide(now, &mut slots);
        let rested: SmallVec<[bool; 4]> = slots.iter().map(|s| s.meter.at_rest(now)).collect();
        drop(slots);
        drop(meters);
        // A key added for this request that it left untouched is not kept.
        for (((shard, hash), item), (added, rest)) in guards
            .iter_mut()
            .zip(items)
            .zip(inserted.iter().zip(&rested))
        {
            if *added && *rest {
                let key = item.key.as_str();
                if let Ok(entry) = shard.find_entry(*hash, |e| e.key == key) {
                    entry.remove();
                    self.keys.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        Ok(decision)
    }

    /// After a request completes: debit latency limits by `latency_us` and
    /// release concurrency slots.
    pub fn finish(&self, policy: &Policy, items: &[Item], now: Nanos, latency_us: u64) {
        for item in items {
            let limit = &policy.limits[item.limit];
            let concurrency = limit.algorithm == AlgorithmKind::Concurrency;
            if !concurrency && !limit.is_latency() {
                continue;
            }
            let params = limit.params(item.class);
            let (mut shard, hash) = self.lock(item);
            let key = item.key.as_str();
            if shard.find(hash, |e| e.key == key).is_none() {
                if concurrency || latency_us == 0 {
                    continue; // a released slot or a zero debit changes nothing
                }
                // A debit is owed for work already done: it is never dropped.
                // If the store is full it goes in over the bound, which is then
                // exceeded by at most the requests in flight.
                if self.make_room(policy, &mut shard, item, now).is_err() {
                    self.keys.fetch_add(1, Ordering::Relaxed);
                }
                let hasher = &self.hasher;
                shard.insert_unique(
                    hash,
                    Entry {
                        key: item.key.clone(),
                        state: AnyState::fresh(params),
                    },
                    |e| hasher.hash_one(e.key.as_str()),
                );
            }
            let Some(entry) = shard.find_mut(hash, |e| e.key == key) else {
                continue;
            };
            let mut meter = entry.state.meter(params);
            if concurrency {
                meter.release(item.charge);
            } else {
                meter.debit(now, latency_us);
            }
        }
    }

    /// What one key has left of one limit, without changing anything.
    pub fn usage(&self, policy: &Policy, item: &Item, now: Nanos) -> Usage {
        let params = policy.limits[item.limit].params(item.class);
        let (mut shard, hash) = self.lock(item);
        let key = item.key.as_str();
        match shard.find_mut(hash, |e| e.key == key) {
            Some(entry) => entry.state.meter(params).usage(now),
            None => AnyState::fresh(params).meter(params).usage(now),
        }
    }

    /// Evict every key at rest. Adapters call this periodically; it also runs
    /// when the store is full.
    pub fn sweep(&self, policy: &Policy, now: Nanos) -> usize {
        self.tables
            .iter()
            .map(|t| {
                t.shards
                    .iter()
                    .map(|s| self.sweep_shard(policy, t, &mut s.lock(), now))
                    .sum::<usize>()
            })
            .sum()
    }

    fn sweep_shard(&self, policy: &Policy, table: &Table, shard: &mut Shard, now: Nanos) -> usize {
        let params = policy.limits[table.limit].params(table.class);
        let before = shard.len();
        shard.retain(|e| !e.state.meter(params).at_rest(now));
        let evicted = before - shard.len();
        if evicted > 0 {
            self.keys.fetch_sub(evicted, Ordering::Relaxed);
            self.evictions.fetch_add(evicted as u64, Ordering::Relaxed);
        }
        evicted
    }

    /// Claim one of the `max_keys` places for a new key (the caller then
    /// inserts it). Claiming is one atomic step, so racing threads cannot
    /// overshoot the bound.
    fn claim_key(&self) -> bool {
        self.keys
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
                (k < self.max_keys).then_some(k + 1)
            })
            .is_ok()
    }

    /// Claim a place for a new key; if the store is full, first evict at-rest
    /// keys from this shard, then from every shard not locked right now.
    fn make_room(
        &self,
        policy: &Policy,
        shard: &mut Shard,
        item: &Item,
        now: Nanos,
    ) -> Result<(), StoreError> {
        if self.claim_key() {
            return Ok(());
        }
        let table = self.table(item);
        if self.sweep_shard(policy, table, shard, now) == 0 {
            for t in &self.tables {
                for s in t.shards.iter() {
                    if let Some(mut other) = s.try_lock() {
                        self.sweep_shard(policy, t, &mut other, now);
                    }
                }
            }
        }
        if self.claim_key() {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(StoreError::Full {
            limit: policy.limits[item.limit].name.clone(),
            max_keys: self.max_keys,
        })
    }
}
