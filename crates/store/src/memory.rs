//! The embedded store: one sharded hash table per (limit, class).
//!
//! Atomicity: a request's limits live in different tables; their shards are
//! locked in table order (a process-wide id, so even stores of successive
//! reloads, which share tables in any order, cannot deadlock), the core
//! decides over all of them, and the locks are released together.
//!
//! Reload: a store built by `carry_over` shares the tables of limits whose
//! definition did not change, and of those whose counts carry over into a
//! changed definition (`tollgate_core::carry`); the old store's other tables
//! are retired (their keys stop counting against `max_keys`) and freed with
//! the old store.
//!
//! Memory: an entry is the key (`CompactString`, 24 bytes, inline up to 24
//! bytes of key) and an `AnyState` (16 bytes; a token bucket's exact state is
//! inline, larger states are behind one thin pointer). Measured per token-bucket key including the
//! table's slack: see `bench/RESULTS.md`.
//!
//! New keys: a request decides a key it finds absent on a state of its own,
//! and stores it only if the request used it (a state at rest is what a new
//! key starts with), so requests refused elsewhere leave no keys behind.
//!
//! Bounded keys: at most `max_keys` entries over all tables. A new key that
//! finds the store full first evicts keys at rest (a state equal to a fresh
//! one, so eviction never changes a decision); if none are, the request gets
//! `StoreError::Full` rather than an untracked admission.

use crate::state::{AnyMeter, AnyState, WithMeter};
use compact_str::CompactString;
use hashbrown::{hash_table, HashTable};
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tollgate_core::algo::{Meter, Usage};
use tollgate_core::carry::{self, Carry};
use tollgate_core::policy::{AlgorithmKind, Limit, Params, Policy};
use tollgate_core::{decide, decide_one, Decision, Item, Nanos, Slot};

const SHARDS: usize = 64;

/// Why the in-process store could not take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Every tracked key is busy and `max_keys` is reached.
    #[error("limit '{limit}': the store tracks max_keys = {max_keys} keys and none is idle; new keys are refused until some are")]
    Full {
        /// The limit whose new key was refused.
        limit: String,
        /// `[store] max_keys`.
        max_keys: usize,
    },
}

/// What the in-process store holds and has done, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Keys tracked now.
    pub keys: usize,
    /// Idle keys forgotten to make room.
    pub evictions: u64,
    /// New keys refused because none could be forgotten.
    pub refused: u64,
}

#[derive(Debug)]
struct Entry {
    key: CompactString,
    state: AnyState,
}

/// One shard's keys, and which of its table's shapes their states are in
/// (see `Table::reshaped`).
#[derive(Debug, Default)]
struct Shard {
    keys: HashTable<Entry>,
    shape: u32,
}

impl std::ops::Deref for Shard {
    type Target = HashTable<Entry>;
    fn deref(&self) -> &HashTable<Entry> {
        &self.keys
    }
}

impl std::ops::DerefMut for Shard {
    fn deref_mut(&mut self) -> &mut HashTable<Entry> {
        &mut self.keys
    }
}

impl Shard {
    /// `key`'s entry (its hash `hash`), if the key is tracked here.
    #[inline]
    fn tracked(&mut self, hash: u64, key: &str) -> Option<&mut Entry> {
        self.keys.find_mut(hash, |e| e.is(key))
    }
}

impl Entry {
    /// Whether this is `key`'s entry. Keys are short (a tenant id, an
    /// address): one of 8 to 16 bytes is compared as two overlapping words
    /// in place, not through a call to `memcmp`, which took ~20
    /// instructions of a ~570-instruction decision (other lengths still
    /// compare with `==`).
    #[inline]
    fn is(&self, key: &str) -> bool {
        let (a, b) = (self.key.as_bytes(), key.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let word =
            |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
        match a.len() {
            n @ 8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
            _ => a == b,
        }
    }
}

/// A locked shard and the key's hash.
type Locked<'a> = (MutexGuard<'a, Shard>, u64);

/// A request's key in its locked shard: tracked already, or new (decided on
/// a fresh state, which is stored only if the request used it).
enum Found<'a> {
    Kept(&'a mut Entry),
    New(hash_table::VacantEntry<'a, Entry>, AnyState),
}

impl Found<'_> {
    fn state(&mut self) -> &mut AnyState {
        match self {
            Found::Kept(entry) => &mut entry.state,
            Found::New(_, state) => state,
        }
    }
}

/// One shard per cache line pair (128 bytes, what x86 prefetches together),
/// so threads locking neighbouring shards do not contend on the line.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

/// One (limit, variant)'s keys. Shared by the stores of successive policies
/// while the limit's definition does not change, so a reload keeps counters.
#[derive(Debug)]
struct Table {
    /// Unique over the process: shards of several tables are locked in id
    /// order, so stores of successive policies, which share tables in any
    /// order, never deadlock.
    id: u64,
    shards: Box<[Padded<Mutex<Shard>>]>,
    counters: Arc<Counters>,
    /// A table a reload dropped: it lives on only for requests still
    /// finishing on the old policy, and its keys no longer count against
    /// `max_keys`. Changed only with every shard locked, and read under one.
    retired: AtomicBool,
    /// The parameters of each reload that carried this table's counts into
    /// a changed limit: shape n (n >= 1) is `reshaped[n - 1]`. A store
    /// decides with its own policy's parameters on shards in its own shape;
    /// on a shard a later reload reshaped (the old store, finishing up) it
    /// decides with the reshaped ones, so no state is ever read in another
    /// shape than it is in.
    reshaped: Mutex<Vec<Params>>,
}

static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(0);

impl Table {
    fn new(counters: &Arc<Counters>) -> Self {
        Table {
            id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            shards: (0..SHARDS)
                .map(|_| Padded(Mutex::new(Shard::default())))
                .collect(),
            counters: counters.clone(),
            retired: AtomicBool::new(false),
            reshaped: Mutex::default(),
        }
    }

    /// The shape its shards are in once every reload so far is done.
    fn shape(&self) -> u32 {
        self.reshaped.lock().len() as u32
    }

    /// The parameters of shape `shape`, if a reload made it.
    fn params_at(&self, shape: u32) -> Option<Params> {
        let i = (shape as usize).checked_sub(1)?;
        self.reshaped.lock().get(i).cloned()
    }

    /// Count one new key (the caller holds its shard's lock): false if the
    /// store already tracks `max` keys. Claiming is one atomic step, so
    /// racing threads cannot overshoot the bound.
    fn claim(&self, max: usize) -> bool {
        self.retired.load(Ordering::Relaxed)
            || self
                .counters
                .keys
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
                    (k < max).then_some(k + 1)
                })
                .is_ok()
    }

    /// Count a key past the bound (a debit owed for work already done).
    fn claim_over(&self) {
        if !self.retired.load(Ordering::Relaxed) {
            self.counters.keys.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `n` keys left (the caller holds their shard's lock).
    fn forget(&self, n: usize) {
        if n > 0 && !self.retired.load(Ordering::Relaxed) {
            self.counters.keys.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// The shard that holds keys of this hash.
    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        // Middle bits: hashbrown uses the top 7 as its tag, the bottom for the bucket.
        &self.shards[(hash >> 32) as usize % SHARDS].0
    }

    /// Stop counting this table's keys (a reload dropped it).
    fn retire(&self) {
        let mut guards: Vec<_> = self.shards.iter().map(|s| s.0.lock()).collect();
        if !self.retired.swap(true, Ordering::Relaxed) {
            let keys: usize = guards.iter_mut().map(|g| g.len()).sum();
            self.counters.keys.fetch_sub(keys, Ordering::Relaxed);
        }
    }
}

impl Drop for Table {
    /// The last store using this table is gone: its keys no longer count.
    fn drop(&mut self) {
        if !*self.retired.get_mut() {
            let keys: usize = self.shards.iter_mut().map(|s| s.0.get_mut().len()).sum();
            self.counters.keys.fetch_sub(keys, Ordering::Relaxed);
        }
    }
}

/// The parameters each item of a request is decided with: its limit's, or
/// those a later reload reshaped its shard to (`reshaped[i]`; empty when
/// none was, the usual case).
#[derive(Clone, Copy)]
struct ParamsOf<'a> {
    policy: &'a Policy,
    reshaped: &'a [Option<Params>],
}

impl<'a> ParamsOf<'a> {
    #[inline]
    fn of(&self, i: usize, item: &Item) -> &'a Params {
        match self.reshaped.get(i) {
            Some(Some(reshaped)) => reshaped,
            _ => self.policy.limits[item.limit].params(item.class),
        }
    }
}

/// `item`'s part in a decision, its key's state read by `meter`.
#[inline]
fn slot<M: Meter>(meter: M, item: &Item, limit: &Limit, hold: bool) -> Slot<M> {
    Slot {
        meter,
        cost: item.cost,
        charge: item.charge,
        hold: if hold { limit.hold } else { 0 },
        shadow: limit.mode == tollgate_core::policy::Mode::Shadow,
    }
}

/// One limit's decision on its key's meter, whichever type that is.
struct DecideOne<'a> {
    now: Nanos,
    item: &'a Item,
    limit: &'a Limit,
    hold: bool,
}

impl WithMeter for DecideOne<'_> {
    // (the store's result, not the decision: wrapped where it is built, the
    // decision is not copied into a result of 208 bytes more)
    type Out = Result<Decision, StoreError>;
    #[inline]
    fn run<M: Meter>(self, meter: M) -> Self::Out {
        let mut slot = slot(meter, self.item, self.limit, self.hold);
        Ok(decide_one(self.now, &mut slot))
    }
}

/// Counts shared by every store that shares tables (successive reloads).
#[derive(Debug, Default)]
struct Counters {
    keys: AtomicUsize,
    evictions: AtomicU64,
    refused: AtomicU64,
    /// When a full store last swept every shard for room (ns, the engine's clock).
    last_full_sweep: AtomicU64,
}

/// A full store sweeps every shard for room at most this often: a flood of
/// new keys is then refused at the cost of one shard's sweep each, instead of
/// the whole store's (which took seconds per request with a million keys).
const FULL_SWEEP_EVERY: Nanos = 1_000_000_000;

#[derive(Debug)]
struct Placed {
    limit: usize,
    class: usize,
    table: Arc<Table>,
    /// The table's shape this store's parameters are for.
    shape: u32,
}

/// The embedded store: one sharded table per limit and class, each key's
/// state updated in place under its shard's lock, bounded by
/// `[store] max_keys`.
#[derive(Debug)]
pub struct MemoryStore {
    /// Every limit's variants, limit by limit; `first[l]` is limit l's first.
    tables: Vec<Placed>,
    first: Vec<usize>,
    hasher: foldhash::fast::RandomState,
    counters: Arc<Counters>,
    max_keys: usize,
    /// Whether the tables' ids rise with their place in `tables`, so that
    /// items in limit order (as `plan` gives them) come in table order.
    /// Not when some table has a lower id than one before it, as after a
    /// reload that put a new limit (or a new class's table) before a kept
    /// one, or reordered kept limits: such a store sorts every time.
    ids_in_place_order: bool,
}

impl MemoryStore {
    /// Empty tables for `policy`'s limits.
    pub fn new(policy: &Policy) -> Self {
        Self::build(
            policy,
            Arc::default(),
            foldhash::fast::RandomState::default(),
            |_, _| None,
        )
    }

    /// A store for `policy` after a reload from `old` (built for
    /// `old_policy`), at `now`: each limit keeps or carries its counters as
    /// `tollgate_core::carry` says. A carried limit's tables are shared, so
    /// requests still finishing on the old policy settle on the same state;
    /// its keys are reshaped in place, shard by shard (the old store reads
    /// each shard in the shape it is in); a key given an override, or losing
    /// one, takes its state along. Tables no limit keeps are retired.
    pub fn carry_over(policy: &Policy, old: &MemoryStore, old_policy: &Policy, now: Nanos) -> Self {
        let plans: Vec<(Carry, Option<usize>)> = (policy.limits.iter())
            .map(|limit| carry::carry(old_policy, limit))
            .collect();
        // Per new (limit, variant): the old (limit, variant) it continues.
        let from: Vec<Vec<Option<(usize, usize)>>> = (policy.limits.iter().zip(&plans))
            .map(|(limit, plan)| {
                (0..limit.variants.len())
                    .map(|v| match *plan {
                        (Carry::Unchanged, Some(o)) => Some((o, v)),
                        (Carry::Carried, Some(o)) => {
                            let was = &old_policy.limits[o];
                            carry::find_variant(old_policy, was, carry::variant(policy, limit, v))
                                .map(|ov| (o, ov))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let mut store = Self::build(
            policy,
            old.counters.clone(),
            old.hasher.clone(),
            |limit, v| from[limit][v].map(|(o, ov)| old.tables[old.first[o] + ov].table.clone()),
        );
        // Unchanged limits share their tables as they are, fresh ones have
        // new tables: only carried ones have work to do.
        for (limit, plan) in plans.iter().enumerate() {
            let (Carry::Carried, Some(o)) = *plan else {
                continue;
            };
            let (was, new) = (&old_policy.limits[o], &policy.limits[limit]);
            for (v, continues) in from[limit].iter().enumerate() {
                match *continues {
                    Some((_, ov)) => {
                        let placed = store.first[limit] + v;
                        store.carry_table(placed, was.params(ov), new.params(v), now);
                    }
                    // A new override: its key's state comes from the old
                    // default variant.
                    None => {
                        if let carry::Variant::Override(key) = carry::variant(policy, new, v) {
                            let at = (old.first[o], was.params(0));
                            store.move_key(
                                old,
                                at,
                                (store.first[limit] + v, new.params(v)),
                                key,
                                now,
                            );
                        }
                    }
                }
            }
            // Overrides this reload removed: each key's state goes back to
            // the default variant.
            for ov in 0..was.variants.len() {
                if let carry::Variant::Override(key) = carry::variant(old_policy, was, ov) {
                    if carry::find_variant(policy, new, carry::Variant::Override(key)).is_none() {
                        let at = (old.first[o] + ov, was.params(ov));
                        store.move_key(old, at, (store.first[limit], new.params(0)), key, now);
                    }
                }
            }
        }
        for old_table in &old.tables {
            if !store
                .tables
                .iter()
                .any(|t| Arc::ptr_eq(&t.table, &old_table.table))
            {
                old_table.table.retire();
            }
        }
        store
    }

    /// A shared table whose limit changed: from now on every decision on it,
    /// this store's or the old one's, uses the new parameters, and each key's
    /// state is carried into them (a bucket's debt to a new rate, tiered
    /// pools to new tiers), shard by shard under its lock.
    fn carry_table(&mut self, placed: usize, old: &Params, new: &Params, now: Nanos) {
        let table = self.tables[placed].table.clone();
        let shape = {
            let mut reshaped = table.reshaped.lock();
            reshaped.push(new.clone());
            reshaped.len() as u32
        };
        self.tables[placed].shape = shape;
        let reshape = match (old, new) {
            (Params::Gcra(a), Params::Gcra(b)) => (a.amount, a.period) != (b.amount, b.period),
            (Params::Tiered(_), Params::Tiered(_)) => true,
            // Windows and in-flight counts mean the same under any quota.
            _ => false,
        };
        for shard in table.shards.iter() {
            let mut shard = shard.0.lock();
            if reshape {
                for entry in shard.iter_mut() {
                    entry.state.carry(old, new, now);
                }
            }
            shard.shape = shape;
        }
    }

    /// Copy `key`'s state from `old`'s table `from` into this store's table
    /// `to`, reshaped from the one's parameters to the other's.
    fn move_key(
        &self,
        old: &MemoryStore,
        (from, old_params): (usize, &Params),
        (to, new_params): (usize, &Params),
        key: &str,
        now: Nanos,
    ) {
        let hash = self.hasher.hash_one(key);
        let placed = &old.tables[from];
        let (mut state, old_params) = {
            let shard = placed.table.shard(hash).lock();
            let Some(entry) = shard.find(hash, |e| e.is(key)) else {
                return;
            };
            // A table this reload shares has been reshaped already.
            let params = old.params(placed, shard.shape, old_params).into_owned();
            (entry.state.clone(), params)
        };
        state.carry(&old_params, new_params, now);
        if std::mem::discriminant(&state) != std::mem::discriminant(&AnyState::fresh(new_params)) {
            return; // not a state of this limit's algorithm: nothing to carry
        }
        let table = &self.tables[to].table;
        let mut shard = table.shard(hash).lock();
        match shard.tracked(hash, key) {
            Some(entry) => entry.state = state,
            None => {
                table.claim_over(); // use already counted: never refused
                let hasher = &self.hasher;
                shard.insert_unique(
                    hash,
                    Entry {
                        key: key.into(),
                        state,
                    },
                    |e| hasher.hash_one(e.key.as_str()),
                );
            }
        }
    }

    fn build(
        policy: &Policy,
        counters: Arc<Counters>,
        hasher: foldhash::fast::RandomState,
        reuse: impl Fn(usize, usize) -> Option<Arc<Table>>,
    ) -> Self {
        let mut tables = Vec::new();
        let mut first = Vec::new();
        for (limit, l) in policy.limits.iter().enumerate() {
            first.push(tables.len());
            for class in 0..l.variants.len() {
                let table = reuse(limit, class).unwrap_or_else(|| Arc::new(Table::new(&counters)));
                tables.push(Placed {
                    limit,
                    class,
                    shape: table.shape(),
                    table,
                });
            }
        }
        let ids_in_place_order = tables.windows(2).all(|w| w[0].table.id < w[1].table.id);
        MemoryStore {
            tables,
            first,
            hasher,
            counters,
            max_keys: policy.store.max_keys,
            ids_in_place_order,
        }
    }

    /// Keys, evictions and refusals so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            keys: self.counters.keys.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
        }
    }

    fn placed(&self, item: &Item) -> &Placed {
        &self.tables[self.first[item.limit] + item.class]
    }

    fn table(&self, item: &Item) -> &Table {
        &self.placed(item).table
    }

    /// The parameters a key of `placed` in a shard in `shape` is decided
    /// with: this store's (`ours`), unless a later reload reshaped the shard
    /// (this is the old store, finishing up): then the reshaped ones.
    fn params<'p>(&self, placed: &Placed, shape: u32, ours: &'p Params) -> Cow<'p, Params> {
        Self::reshaped(placed, shape).map_or(Cow::Borrowed(ours), Cow::Owned)
    }

    /// The parameters a later reload reshaped a shard of `placed` to, if its
    /// `shape` says it did (usually not).
    #[inline]
    fn reshaped(placed: &Placed, shape: u32) -> Option<Params> {
        if shape == placed.shape {
            return None;
        }
        placed.table.params_at(shape)
    }

    fn lock(&self, item: &Item) -> Locked<'_> {
        self.lock_in(self.table(item), item)
    }

    /// `item`'s shard of `table` (its own), locked, and its key's hash.
    #[inline]
    fn lock_in<'t>(&self, table: &'t Table, item: &Item) -> Locked<'t> {
        let hash = self.hasher.hash_one(item.key.as_str());
        (table.shard(hash).lock(), hash)
    }

    /// Decide and commit all of a request's limits at `now`, atomically.
    /// `policy` must be the policy this store was built for.
    /// `items` must name each limit at most once (as `Policy::plan` gives
    /// them); their shards are locked in table order.
    pub fn decide(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
    ) -> Result<Decision, StoreError> {
        self.decide_with(policy, items, now, true)
    }

    /// Like `decide`; with `hold` false no request is held (the gateway
    /// decides so first, and holds only once its bounded queue has room).
    pub fn decide_with(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, StoreError> {
        match items {
            [item] => self.decide_one(policy, item, now, hold),
            _ => self.decide_many(policy, items, now, hold),
        }
    }

    /// One limit: one lock and one probe of the table.
    fn decide_one(
        &self,
        policy: &Policy,
        item: &Item,
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, StoreError> {
        let limit = &policy.limits[item.limit];
        let (mut shard, hash) = self.lock(item);
        let params = self.params(self.placed(item), shard.shape, limit.params(item.class));
        let params = &*params;
        let decide_on = |state: &mut AnyState| {
            state.with_meter(
                params,
                DecideOne {
                    now,
                    item,
                    limit,
                    hold,
                },
            )
        };
        let key = item.key.as_str();
        let hasher = &self.hasher;
        match shard.entry(hash, |e| e.is(key), |e| hasher.hash_one(e.key.as_str())) {
            hash_table::Entry::Occupied(found) => decide_on(&mut found.into_mut().state),
            hash_table::Entry::Vacant(place) if self.table(item).claim(self.max_keys) => {
                let mut state = AnyState::fresh(params);
                let decision = decide_on(&mut state);
                self.keep(Found::New(place, state), item, params, now);
                decision
            }
            // Full: the general path evicts what it can, or refuses.
            hash_table::Entry::Vacant(_) => {
                drop(shard);
                self.decide_many(policy, std::slice::from_ref(item), now, hold)
            }
        }
    }

    /// Several limits: their shards are locked in table order, each key is
    /// found with one probe, and the core decides over all of them. A
    /// request with a new key looks its keys up again (those found before
    /// it too), to place it, room made for it if the store is full.
    fn decide_many(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, StoreError> {
        let Some(mut guards) = self.lock_all(items) else {
            return self.decide_sharing(policy, items, now, hold);
        };
        // The usual request, every key tracked already and no shard
        // reshaped by a later reload: decided on the stored states, with
        // nothing to place or give back, in one pass over the items.
        // (written here, not in a function of its own: each move of the
        // decision out of an `Option` is a copy of its 208 bytes)
        let mut slots: SmallVec<[Slot<AnyMeter<'_>>; 4]> = SmallVec::new();
        for ((shard, hash), item) in guards.iter_mut().zip(items) {
            if shard.shape != self.placed(item).shape {
                break;
            }
            let Some(entry) = shard.tracked(*hash, &item.key) else {
                break;
            };
            let limit = &policy.limits[item.limit];
            slots.push(slot(
                entry.state.meter(limit.params(item.class)),
                item,
                limit,
                hold,
            ));
        }
        if slots.len() == items.len() {
            return Ok(decide(now, &mut slots));
        }
        drop(slots);
        // Shards a later reload reshaped (this is the old store, finishing
        // up) are decided with the reshaped parameters; usually none is.
        let reshaped: Vec<Option<Params>> = if (guards.iter().zip(items))
            .all(|((shard, _), item)| shard.shape == self.placed(item).shape)
        {
            Vec::new()
        } else {
            (guards.iter().zip(items))
                .map(|((shard, _), item)| Self::reshaped(self.placed(item), shard.shape))
                .collect()
        };
        let params = ParamsOf {
            policy,
            reshaped: &reshaped,
        };
        let mut found: SmallVec<[Found<'_>; 4]> = SmallVec::new();
        for (i, ((shard, hash), item)) in guards.iter_mut().zip(items).enumerate() {
            match self.find(policy, shard, *hash, item, params.of(i, item), now) {
                Ok(f) => found.push(f),
                Err(error) => {
                    // Give back the places counted for the new keys before it.
                    for (f, item) in found.into_iter().zip(items) {
                        if matches!(f, Found::New(..)) {
                            self.table(item).forget(1);
                        }
                    }
                    return Err(error);
                }
            }
        }
        let decision = {
            let mut slots: SmallVec<[Slot<AnyMeter<'_>>; 4]> = SmallVec::new();
            for (i, (f, item)) in found.iter_mut().zip(items).enumerate() {
                let limit = &policy.limits[item.limit];
                slots.push(slot(f.state().meter(params.of(i, item)), item, limit, hold));
            }
            decide(now, &mut slots)
        }; // (the meters, which borrow `found`, end here)
        if found.iter().any(|f| matches!(f, Found::New(..))) {
            // A request not admitted commits nothing: its new keys are as
            // fresh as they came, so each gives its place back unlooked at.
            let admitted = decision.allowed();
            for (i, (f, item)) in found.into_iter().zip(items).enumerate() {
                match f {
                    Found::New(_, mut state) if !admitted => {
                        debug_assert!(state.meter(params.of(i, item)).at_rest(now));
                        self.table(item).forget(1);
                    }
                    f => self.keep(f, item, params.of(i, item), now),
                }
            }
        }
        Ok(decision)
    }

    /// The shards of `items`, locked in table-id order, in item order; None
    /// (nothing locked) if two items are of one table: one shard may hold
    /// both keys, and a lock is taken once (see `decide_sharing`).
    fn lock_all(&self, items: &[Item]) -> Option<SmallVec<[Locked<'_>; 4]>> {
        // Items usually come in table order: lock as they come, and only if
        // one does not, let go and lock them again in order. (A store whose
        // tables are out of order, after some reloads, sorts them at once.)
        // (pushed, not collected: `collect` builds the vector aside and copies it)
        if !self.ids_in_place_order {
            return self.lock_in_table_order(items);
        }
        let mut locked = SmallVec::new();
        let mut last = None;
        for item in items {
            let table = self.table(item);
            if last.is_some_and(|last| last >= table.id) {
                drop(locked);
                return self.lock_in_table_order(items);
            }
            last = Some(table.id);
            locked.push(self.lock_in(table, item));
        }
        Some(locked)
    }

    /// `lock_all` for items out of table order.
    fn lock_in_table_order(&self, items: &[Item]) -> Option<SmallVec<[Locked<'_>; 4]>> {
        let mut order: SmallVec<[usize; 4]> = (0..items.len()).collect();
        order.sort_unstable_by_key(|&i| self.table(&items[i]).id);
        let id = |i: &usize| self.table(&items[*i]).id;
        if order.windows(2).any(|w| id(&w[0]) == id(&w[1])) {
            return None;
        }
        let mut locked: SmallVec<[Option<Locked<'_>>; 4]> = items.iter().map(|_| None).collect();
        for i in order {
            locked[i] = Some(self.lock(&items[i]));
        }
        Some(locked.into_iter().flatten().collect())
    }

    /// `decide_many` for items of which two or more are of one table (an
    /// Envoy rate limit request whose descriptors give one limit two keys):
    /// each shard is locked once, in (table id, shard) order, and the
    /// request is decided on copies of its keys' states, written back after.
    /// Rare, so plain rather than fast.
    fn decide_sharing(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, StoreError> {
        let hashes: Vec<u64> = (items.iter())
            .map(|item| self.hasher.hash_one(item.key.as_str()))
            .collect();
        let shard_of = |i: usize| self.table(&items[i]).shard(hashes[i]) as *const Mutex<Shard>;
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| (self.table(&items[i]).id, shard_of(i) as usize));
        // (each distinct shard once; `at[i]` is item i's guard)
        let mut guards: Vec<MutexGuard<'_, Shard>> = Vec::new();
        let mut at = vec![0; items.len()];
        let mut last = None;
        for &i in &order {
            if last != Some(shard_of(i)) {
                guards.push(self.table(&items[i]).shard(hashes[i]).lock());
                last = Some(shard_of(i));
            }
            at[i] = guards.len() - 1;
        }
        // Copies of the states (a new key's fresh, its place claimed first).
        let mut copies: Vec<(AnyState, Cow<'_, Params>, bool)> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let shard = &mut guards[at[i]];
            let limit = &policy.limits[item.limit];
            let params = self.params(self.placed(item), shard.shape, limit.params(item.class));
            let copy = match shard.tracked(hashes[i], &item.key) {
                Some(entry) => (entry.state.clone(), params, false),
                None => {
                    let shape = shard.shape;
                    if let Err(full) = self.make_room(policy, &mut shard.keys, shape, item, now) {
                        for ((_, _, new), item) in copies.iter().zip(items) {
                            if *new {
                                self.table(item).forget(1);
                            }
                        }
                        return Err(full);
                    }
                    (AnyState::fresh(&params), params, true)
                }
            };
            copies.push(copy);
        }
        let decision = {
            let mut slots: Vec<Slot<AnyMeter<'_>>> = (copies.iter_mut().zip(items))
                .map(|((state, params, _), item)| {
                    let limit = &policy.limits[item.limit];
                    slot(state.meter(params), item, limit, hold)
                })
                .collect();
            decide(now, &mut slots)
        };
        for (i, ((mut state, params, new), item)) in copies.into_iter().zip(items).enumerate() {
            let shard = &mut guards[at[i]];
            let at_rest = state.meter(&params).at_rest(now);
            if let (false, Some(entry)) = (new, shard.tracked(hashes[i], &item.key)) {
                entry.state = state;
            } else if at_rest {
                if new {
                    self.table(item).forget(1);
                }
            } else {
                // (a tracked key that making room for another let go is
                // kept again, over the bound if need be: its use happened)
                if !new {
                    self.table(item).claim_over();
                }
                let hasher = &self.hasher;
                shard.keys.insert_unique(
                    hashes[i],
                    Entry {
                        key: item.key.clone(),
                        state,
                    },
                    |e| hasher.hash_one(e.key.as_str()),
                );
            }
        }
        Ok(decision)
    }

    /// `item`'s key in its locked shard, or a fresh state and the place for
    /// it if the key is new (room made for it if the store is full: the
    /// error if none can be).
    #[inline]
    fn find<'s>(
        &self,
        policy: &Policy,
        shard: &'s mut Shard,
        hash: u64,
        item: &Item,
        params: &Params,
        now: Nanos,
    ) -> Result<Found<'s>, StoreError> {
        let key = item.key.as_str();
        let hasher = &self.hasher;
        let shape = shard.shape;
        let entry = |keys: &'s mut HashTable<Entry>| {
            keys.entry(hash, |e| e.is(key), |e| hasher.hash_one(e.key.as_str()))
        };
        let place = match entry(&mut shard.keys) {
            hash_table::Entry::Occupied(entry) => return Ok(Found::Kept(entry.into_mut())),
            hash_table::Entry::Vacant(place) if self.table(item).claim(self.max_keys) => place,
            hash_table::Entry::Vacant(place) => {
                let keys = place.into_table();
                self.make_room(policy, keys, shape, item, now)?;
                match entry(keys) {
                    hash_table::Entry::Vacant(place) => place,
                    // (cannot be: making room only takes keys out)
                    hash_table::Entry::Occupied(entry) => {
                        debug_assert!(false, "making room put a key in");
                        self.table(item).forget(1);
                        return Ok(Found::Kept(entry.into_mut()));
                    }
                }
            }
        };
        Ok(Found::New(place, AnyState::fresh(params)))
    }

    /// Store a new key's state if the request used it (a state at rest is
    /// what a new key starts with: keeping it would only take room), else
    /// give its place back.
    #[inline]
    fn keep(&self, found: Found<'_>, item: &Item, params: &Params, now: Nanos) {
        if let Found::New(place, mut state) = found {
            if state.meter(params).at_rest(now) {
                self.table(item).forget(1);
            } else {
                place.insert(Entry {
                    key: item.key.clone(),
                    state,
                });
            }
        }
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
            let (mut shard, hash) = self.lock(item);
            let params = self.params(self.placed(item), shard.shape, limit.params(item.class));
            let settle = |state: &mut AnyState| {
                let mut meter = state.meter(&params);
                if concurrency {
                    meter.release(item.charge);
                } else {
                    meter.debit(now, latency_us);
                }
            };
            if let Some(entry) = shard.tracked(hash, &item.key) {
                settle(&mut entry.state);
                continue;
            }
            if concurrency || latency_us == 0 {
                continue; // a released slot or a zero debit changes nothing
            }
            // A debit is owed for work already done: it is never dropped.
            // If the store is full it goes in over the bound, which is then
            // exceeded by at most the requests in flight.
            let shape = shard.shape;
            if self
                .make_room(policy, &mut shard.keys, shape, item, now)
                .is_err()
            {
                self.table(item).claim_over();
            }
            let mut state = AnyState::fresh(&params);
            settle(&mut state);
            let hasher = &self.hasher;
            shard.insert_unique(
                hash,
                Entry {
                    key: item.key.clone(),
                    state,
                },
                |e| hasher.hash_one(e.key.as_str()),
            );
        }
    }

    /// What one key has left of one limit, without changing anything.
    pub fn usage(&self, policy: &Policy, item: &Item, now: Nanos) -> Usage {
        let (mut shard, hash) = self.lock(item);
        let ours = policy.limits[item.limit].params(item.class);
        let params = self.params(self.placed(item), shard.shape, ours);
        match shard.tracked(hash, &item.key) {
            Some(entry) => entry.state.meter(&params).usage(now),
            None => AnyState::fresh(&params).meter(&params).usage(now),
        }
    }

    /// The `n` keys that have used the largest share of a limit right now,
    /// most used first: (limit, key, remaining, quota). Concurrency limits
    /// count too (slots in use of their maximum). Each shard is locked only
    /// while it is read.
    pub fn busiest(
        &self,
        policy: &Policy,
        now: Nanos,
        n: usize,
    ) -> Vec<(usize, CompactString, u64, u64)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        // A min-heap on the used share keeps the n largest.
        // (share of the quota used, limit, key, remaining, quota)
        type Ranked = (u64, usize, CompactString, u64, u64);
        let mut top: BinaryHeap<Reverse<Ranked>> = BinaryHeap::new();
        for t in &self.tables {
            let ours = policy.limits[t.limit].params(t.class);
            for shard in t.table.shards.iter() {
                let mut shard = shard.0.lock();
                let params = self.params(t, shard.shape, ours);
                let quota = params.policy().0;
                if quota == 0 {
                    continue;
                }
                for entry in shard.iter_mut() {
                    let remaining = entry.state.meter(&params).usage(now).remaining.min(quota);
                    let used = quota - remaining;
                    if used == 0 {
                        continue;
                    }
                    // Parts per million of the quota: comparable across limits.
                    let share = used.saturating_mul(1_000_000) / quota;
                    if top.len() >= n {
                        if n == 0 || top.peek().is_some_and(|Reverse(least)| share <= least.0) {
                            continue;
                        }
                        top.pop();
                    }
                    top.push(Reverse((
                        share,
                        t.limit,
                        entry.key.clone(),
                        remaining,
                        quota,
                    )));
                }
            }
        }
        let mut out: Vec<_> = top.into_iter().map(|Reverse(k)| k).collect();
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.2.cmp(&b.2)));
        out.into_iter()
            .map(|(_, limit, key, remaining, quota)| (limit, key, remaining, quota))
            .collect()
    }

    /// Evict every key at rest. Adapters call this periodically; it also runs
    /// when the store is full.
    pub fn sweep(&self, policy: &Policy, now: Nanos) -> usize {
        self.tables
            .iter()
            .map(|t| {
                t.table
                    .shards
                    .iter()
                    .map(|s| {
                        let mut shard = s.0.lock();
                        let shape = shard.shape;
                        self.sweep_shard(policy, t, &mut shard.keys, shape, now)
                    })
                    .sum::<usize>()
            })
            .sum()
    }

    /// Evict the keys at rest of one shard (its `keys`, in `shape`).
    fn sweep_shard(
        &self,
        policy: &Policy,
        at: &Placed,
        keys: &mut HashTable<Entry>,
        shape: u32,
        now: Nanos,
    ) -> usize {
        let ours = policy.limits[at.limit].params(at.class);
        let params = self.params(at, shape, ours);
        let before = keys.len();
        keys.retain(|e| !e.state.meter(&params).at_rest(now));
        let evicted = before - keys.len();
        if evicted > 0 {
            at.table.forget(evicted);
            self.counters
                .evictions
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
        evicted
    }

    /// True for one caller per `FULL_SWEEP_EVERY`.
    fn full_sweep_due(&self, now: Nanos) -> bool {
        let last = &self.counters.last_full_sweep;
        let before = last.load(Ordering::Relaxed);
        (before == 0 || now.saturating_sub(before) >= FULL_SWEEP_EVERY)
            && last
                .compare_exchange(before, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Claim a place for a new key in a shard (its `keys`, in `shape`); if
    /// the store is full, first evict at-rest keys from this shard, then (at
    /// most once a second) from every shard not locked right now. (A caller
    /// whose own claim failed comes here: the claim is tried once more
    /// first, as another request may have given a place back since.)
    fn make_room(
        &self,
        policy: &Policy,
        keys: &mut HashTable<Entry>,
        shape: u32,
        item: &Item,
        now: Nanos,
    ) -> Result<(), StoreError> {
        let at = self.placed(item);
        if at.table.claim(self.max_keys) {
            return Ok(());
        }
        if self.sweep_shard(policy, at, keys, shape, now) == 0 && self.full_sweep_due(now) {
            for t in &self.tables {
                for s in t.table.shards.iter() {
                    if let Some(mut other) = s.0.try_lock() {
                        let shape = other.shape;
                        self.sweep_shard(policy, t, &mut other.keys, shape, now);
                    }
                }
            }
        }
        if at.table.claim(self.max_keys) {
            return Ok(());
        }
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        Err(StoreError::Full {
            limit: policy.limits[item.limit].name.clone(),
            max_keys: self.max_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Entry;
    use crate::state::AnyState;

    /// `Entry::is` compares short keys word by word: it must say what `==`
    /// says for every length around the words' edges and a difference in
    /// any byte.
    #[test]
    fn a_key_is_matched_exactly_whatever_its_length() {
        for len in 0..=40 {
            let key: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let entry = Entry {
                key: key.as_str().into(),
                state: AnyState::Concurrency(0),
            };
            assert!(entry.is(&key), "len {len}");
            for at in 0..len {
                let mut other = key.clone().into_bytes();
                other[at] = b'#';
                let other = String::from_utf8(other).expect("ascii");
                assert!(!entry.is(&other), "len {len}, byte {at} differs");
            }
            assert!(!entry.is(&format!("{key}a")), "len {len}, one longer");
            if len > 0 {
                assert!(!entry.is(&key[..len - 1]), "len {len}, one shorter");
            }
        }
    }
}
