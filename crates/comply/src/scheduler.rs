//! The scheduler of one upstream, without I/O: which job goes next and when,
//! and what a reply means (done, retry when, dead letter). The runner drives
//! it on the real clock, `plan` on a virtual one, and `shared::Gate` lets
//! many callers (the proxy's requests) use one at once.
//!
//! The head of each lane (`lanes`) is asked of the engine: the first one
//! admitted now (high before normal before low, then oldest) is sent;
//! otherwise the scheduler waits until the earliest instant some head is
//! admitted (the engine's exact `retry_after`), never a fixed sleep. Budgets
//! are limits like any other (matched on the workflow), so a workflow out of
//! budget holds back only its own lane. What a reply means is `retry`'s;
//! the breaker is `breaker`'s; what the reply's headers say of the quota
//! left is applied by `corrections`.

use crate::breaker::{Breaker, BreakerSettings, Gate};
use crate::lanes::{Entry, Lanes, Priority};
use crate::retry::{classify, nanos, Backoff, Class};
use crate::schedule::Schedule;
use compact_str::CompactString;
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;
use tollgate_core::decide::Verdict;
use tollgate_core::{Item, Nanos};
use tollgate_http::ratelimit::{Correction, Target};
use tollgate_store::Engine;

/// Calls by their seq (looked up a few times a call: foldhash, not SipHash;
/// seqs are the scheduler's own numbers, not an attacker's).
pub(crate) type BySeq<V> = HashMap<u64, V, foldhash::fast::RandomState>;

/// When only a release could admit a job yet nothing is in flight (which
/// the engine should never answer), look again after this long rather than
/// wait for a reply that cannot come.
const IDLE_RECHECK: Nanos = 1_000_000_000;
/// When the shared store (Redis) cannot answer for a limit with
/// `fail = "closed"`, ask again after this long: the job waits, it is not
/// a dead letter.
const UNAVAILABLE_RECHECK: Nanos = 250_000_000;

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this job now; `attempt` counts from 1.
    Send { seq: u64, attempt: u32 },
    /// This job can never be sent (its cost exceeds a limit, or the policy
    /// rejects it): dead-letter it.
    Reject { seq: u64, reason: String },
    /// Nothing can go before this instant (a reply may change that).
    Wait(Nanos),
    /// Nothing can go until a reply comes back.
    Blocked,
    /// No job is queued, waiting or in flight.
    Idle,
}

/// How a sent job came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status {
        status: u16,
        retry_after: Option<Duration>,
        corrections: Vec<Correction>,
    },
    /// No response: connection refused or dropped, or the timeout passed.
    Failed { error: String },
}

/// What became of a job after its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Done,
    /// It is queued again and may go at `at`.
    Retry {
        at: Nanos,
    },
    Dead {
        reason: String,
    },
}

/// Something worth a log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The whole upstream waits (a 429 said so).
    Paused {
        until: Nanos,
        status: u16,
    },
    BreakerOpened {
        failures: u32,
        until: Nanos,
    },
    BreakerHalfOpen,
    BreakerClosed,
    /// The shared store cannot decide (Redis down, a limit fails closed):
    /// nothing is sent until it answers again.
    StoreUnavailable {
        error: String,
    },
    StoreBack,
    /// A 429 the local count did not predict: sends go at `rate` per
    /// second, below the limits' fastest sustained rate `profile`.
    /// `keyed`: the pace is one vendor key's (the others keep theirs).
    Slowed {
        rate: f64,
        profile: f64,
        keyed: bool,
    },
    /// The vendor's rate-limit headers show another client spending
    /// `others` per second of the same quota: sends go at `left` per second.
    Shared {
        others: f64,
        left: f64,
        keyed: bool,
    },
    /// Calls that succeeded raised the pace back to what the limits allow.
    Restored {
        profile: f64,
        keyed: bool,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub sent: u64,
    pub done: u64,
    pub dead: u64,
    pub retried: u64,
    pub throttled: u64,
    pub failures: u64,
    /// Live calls admitted from the reserve: with less left after them
    /// than queued work may leave.
    pub reserve_used: u64,
    /// Calls admitted past their workflow's spent budget (`borrow`).
    pub borrowed: u64,
}

/// What the scheduler last waited for: the instant, and the limit a lane
/// head waited for (None when it was a pause, the breaker or a backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub until: Nanos,
    pub limit: Option<usize>,
}

#[derive(Debug)]
pub struct Scheduler {
    /// Shared, so a caller can reach the store (connect, in fleet mode)
    /// without holding a shared line's lock.
    engine: std::sync::Arc<Engine>,
    max_attempts: u32,
    concurrency: usize,
    breaker: Breaker,
    lanes: Lanes,
    backoff: BinaryHeap<Reverse<(Nanos, u64)>>,
    backing_off: BySeq<Entry>,
    in_flight: BySeq<Entry>,
    paused_until: Nanos,
    retry: Backoff,
    /// The effective pace per key, when 429s showed the profile too fast
    /// or another client shares the quota.
    paces: crate::pace::Paces,
    events: Vec<Event>,
    counters: Counters,
    sends: u64,
    /// Per limit: how often it was the one a lane head waited for.
    waits: Vec<u64>,
    /// The shared store last said it cannot decide (logged once per outage).
    store_down: bool,
    waiting: Option<Waiting>,
    /// Per limit, the share of its capacity kept for live requests
    /// (`reserve`): queued work is admitted only while more is left.
    reserve: Vec<f64>,
    /// Per limit: a workflow's budget that may borrow (`borrow = true`).
    borrowing: Vec<bool>,
    /// Workflows whose queued work goes only inside their windows.
    schedules: HashMap<String, Schedule>,
}

impl Scheduler {
    pub fn new(
        engine: Engine,
        max_attempts: u32,
        concurrency: usize,
        breaker: BreakerSettings,
        seed: u64,
    ) -> Self {
        let limits = engine.policy().limits.len();
        let paces = crate::pace::Paces::new(engine.policy());
        Scheduler {
            engine: std::sync::Arc::new(engine),
            max_attempts,
            concurrency,
            breaker: Breaker::new(breaker),
            lanes: Lanes::default(),
            backoff: BinaryHeap::new(),
            backing_off: BySeq::default(),
            in_flight: BySeq::default(),
            paused_until: 0,
            retry: Backoff::new(seed),
            paces,
            events: Vec::new(),
            counters: Counters::default(),
            sends: 0,
            waits: vec![0; limits],
            store_down: false,
            waiting: None,
            reserve: vec![0.0; limits],
            borrowing: vec![false; limits],
            schedules: HashMap::new(),
        }
    }

    /// Release queued work of these workflows only inside their windows.
    pub fn with_schedules(mut self, schedules: &[Schedule]) -> Self {
        self.schedules = schedules
            .iter()
            .map(|s| (s.workflow.clone(), s.clone()))
            .collect();
        self
    }

    /// Per limit, whether it is a workflow's budget that may borrow: when
    /// every call waiting is held back, a call held back only by such
    /// budgets goes if the other limits it touches have quota left.
    pub fn with_borrowing(mut self, flags: Vec<bool>) -> Self {
        self.borrowing = flags;
        self
    }

    /// The scheduler of upstream `u` of `config`, as the runner and the
    /// proxy run it: its attempts, concurrency and breaker, its reserve and
    /// budgets, and the workflows' schedules.
    pub fn for_upstream(
        engine: Engine,
        u: &crate::Upstream,
        config: &crate::UpstreamsConfig,
        seed: u64,
    ) -> Self {
        Scheduler::new(engine, u.max_attempts, u.concurrency, u.breaker, seed)
            .with_reserve(u.reserve.clone())
            .with_borrowing(u.borrowing())
            .with_schedules(&config.schedules())
    }

    /// Keep these shares (per limit, 0 to below 1) of each limit for live
    /// requests: queued work is admitted only while a limit has more than
    /// its share left, and live requests may use all of it.
    pub fn with_reserve(mut self, shares: Vec<f64>) -> Self {
        self.reserve = shares;
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, to use outside of the scheduler (e.g. across an await).
    pub fn shared_engine(&self) -> std::sync::Arc<Engine> {
        self.engine.clone()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The limit lane heads waited for most, if any waited.
    pub fn binding_limit(&self) -> Option<&str> {
        let (i, &n) = self.waits.iter().enumerate().max_by_key(|(_, n)| **n)?;
        (n > 0).then(|| self.engine.policy().limits[i].name.as_str())
    }

    /// What the last `next` that answered `Wait` waited for.
    pub fn waiting(&self) -> Option<Waiting> {
        self.waiting
    }

    /// The rate sends are paced at, per second, while 429s the local count
    /// did not predict keep it below what the limits allow (None: the
    /// limits alone).
    pub fn effective_rate(&self) -> Option<f64> {
        self.paces.learnt()
    }

    /// The rate sends go at `now`, per second, when below what the limits
    /// allow: the learnt pace, or what another client on the same quota
    /// leaves if that is less.
    pub fn pacing_rate(&self, now: Nanos) -> Option<f64> {
        self.paces.pacing(now)
    }

    /// The fastest sustained rate the limits allow, per second.
    pub fn limits_rate(&self) -> Option<f64> {
        self.paces.ceiling()
    }

    /// Start from a rate learnt before (kept in a run's state): it rises
    /// while calls succeed, as if it had just been learnt.
    pub fn resume_pace(&mut self, rate: f64) {
        self.paces.resume(rate, true);
    }

    /// Pace at a rate learnt before and keep it there (`tollgate plan`).
    pub fn hold_pace(&mut self, rate: f64) {
        self.paces.resume(rate, false);
    }

    /// Until when a 429 paused the whole upstream (0 if it never did).
    pub fn paused_until(&self) -> Nanos {
        self.paused_until
    }

    /// Pause the whole upstream until `until` (another process of the fleet
    /// got a 429); false if it was already paused that long.
    pub fn pause(&mut self, until: Nanos) -> bool {
        let longer = until > self.paused_until;
        if longer {
            self.paused_until = until;
        }
        longer
    }

    /// The instant an open breaker lets its probe through.
    pub fn breaker_open_until(&self) -> Option<Nanos> {
        self.breaker.open_until()
    }

    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Queue a job (queued work, as `tollgate run`'s and `plan`'s are):
    /// `items` from `Policy::plan`, `attempts` already made (a resumed job
    /// keeps its count).
    pub fn push(&mut self, seq: u64, priority: Priority, attempts: u32, items: Vec<Item>) {
        self.push_job(seq, priority, attempts, None, items);
    }

    /// `push`, for a job of `workflow` (its schedule applies).
    pub fn push_job(
        &mut self,
        seq: u64,
        priority: Priority,
        attempts: u32,
        workflow: Option<&str>,
        items: Vec<Item>,
    ) {
        let max = self.max_attempts;
        self.push_capped(seq, priority, attempts, max, true, workflow, items);
    }

    /// `push`, allowing this call at most `max_attempts` (1 for a request
    /// that is not safe to send twice); `queued`: queued work (a job of
    /// `workflow`) rather than a live request.
    #[allow(clippy::too_many_arguments)]
    pub fn push_capped(
        &mut self,
        seq: u64,
        priority: Priority,
        attempts: u32,
        max_attempts: u32,
        queued: bool,
        workflow: Option<&str>,
        items: Vec<Item>,
    ) {
        let workflow = workflow
            .filter(|w| queued && self.schedules.contains_key(*w))
            .map(CompactString::from);
        let lane = self.lanes.lane_for(&items, queued, workflow.as_ref());
        self.lanes.enqueue(Entry {
            seq,
            priority,
            attempts,
            max_attempts: max_attempts.clamp(1, self.max_attempts.max(1)),
            queued,
            workflow,
            items,
            committed: Vec::new(),
            lane,
            local: false,
            sent_order: 0,
            sent_at: 0,
        });
    }

    pub fn next(&mut self, now: Nanos) -> Next {
        let next = self.next_inner(now);
        if let Next::Wait(until) = next {
            if self.waiting.is_none_or(|w| w.until != until) {
                self.waiting = Some(Waiting { until, limit: None });
            }
        }
        next
    }

    fn next_inner(&mut self, now: Nanos) -> Next {
        if self.in_flight.len() >= self.concurrency {
            return Next::Blocked;
        }
        while let Some(&Reverse((at, seq))) = self.backoff.peek() {
            if at > now {
                break;
            }
            self.backoff.pop();
            if let Some(entry) = self.backing_off.remove(&seq) {
                self.lanes.enqueue(entry);
            }
        }
        let later = self.backoff.peek().map(|Reverse((at, _))| *at);
        if self.lanes.queued() == 0 {
            return match later {
                Some(at) => Next::Wait(at),
                None if self.in_flight.is_empty() => Next::Idle,
                None => Next::Blocked,
            };
        }
        if now < self.paused_until {
            return Next::Wait(self.paused_until);
        }
        match self.breaker.gate(now, &mut self.events) {
            Gate::OpenUntil(until) => return Next::Wait(until),
            Gate::Probing => return Next::Blocked,
            Gate::Pass => {}
        }

        let mut wake = later.map(|until| Waiting { until, limit: None });
        let mut waits_for_release = false;
        // Heads held back by a budget that may borrow, in serving order.
        let mut borrowers: SmallVec<[usize; 4]> = SmallVec::new();
        // Queued work leaves the reserve's share of the upstream's
        // concurrency to live requests too (counted once: a pass sends one
        // call at most).
        let queued_full = match self.slots_for_queued() {
            slots if slots >= self.concurrency => false,
            slots => self.queued_in_flight() >= slots,
        };
        // A limit and key an earlier head (by priority, then age) waits
        // for: later heads must not take it first, or a big bulk call
        // would starve behind a stream of small ones.
        let mut claimed: Vec<(usize, usize, &compact_str::CompactString)> = Vec::new();
        for lane in self.lanes.heads_in_order() {
            let Some(head) = self.lanes.head(lane) else {
                continue;
            };
            if head
                .items
                .iter()
                .any(|i| claimed.contains(&(i.limit, i.class, &i.key)))
            {
                continue;
            }
            if head.queued && queued_full {
                waits_for_release = true;
                continue;
            }
            // Its workflow's window, for queued work.
            if let Some(schedule) = head
                .workflow
                .as_ref()
                .and_then(|w| self.schedules.get(w.as_str()))
            {
                if let Err(opens) = schedule.opens(now) {
                    if wake.is_none_or(|w| opens < w.until) {
                        wake = Some(Waiting {
                            until: opens,
                            limit: None,
                        });
                    }
                    continue;
                }
            }
            // Its key's pace, learnt from the vendor, on top of the limits.
            if let Some(at) = self.paces.gate(self.paces.key_of(&head.items), now) {
                if wake.is_none_or(|w| at < w.until) {
                    wake = Some(Waiting {
                        until: at,
                        limit: None,
                    });
                }
                continue;
            }
            let above_reserve = match head.queued {
                true => self.above_reserve(&head.items),
                false => None,
            };
            let asked = above_reserve.as_deref().unwrap_or(&head.items);
            let (decision, local) = match self.engine.decide_where(asked, now, false) {
                Ok(d) => d,
                Err(e) if store_unavailable(&e) => {
                    // Not the job's fault: wait for the store, lose nothing.
                    if !self.store_down {
                        self.store_down = true;
                        self.events.push(Event::StoreUnavailable {
                            error: e.to_string(),
                        });
                    }
                    return Next::Wait(now + UNAVAILABLE_RECHECK);
                }
                Err(e) => return self.reject(lane, e.to_string()),
            };
            if self.store_down {
                self.store_down = false;
                self.events.push(Event::StoreBack);
            }
            match decision.verdict {
                Verdict::Admit { .. } => {
                    if !head.queued && self.took_reserve(&head.items, &decision) {
                        self.counters.reserve_used += 1;
                    }
                    let committed = committed_with_remaining(&head.items, &decision);
                    return self.send(lane, committed, local, now);
                }
                Verdict::Deny { limit, retry_after } => {
                    let item = &head.items[limit];
                    if self.borrowing.get(item.limit) == Some(&true) {
                        borrowers.push(lane);
                    }
                    self.waits[item.limit] += 1;
                    claimed.push((item.limit, item.class, &item.key));
                    match retry_after {
                        Some(after) => {
                            if wake.is_none_or(|w| now + after < w.until) {
                                wake = Some(Waiting {
                                    until: now + after,
                                    limit: Some(item.limit),
                                });
                            }
                        }
                        None => waits_for_release = true,
                    }
                }
                Verdict::Never {
                    limit,
                    cost,
                    capacity,
                } => {
                    let name = &self.engine.policy().limits[head.items[limit].limit].name;
                    let reason = format!(
                        "its cost ({cost}) can never fit limit '{name}' (capacity {capacity})"
                    );
                    return self.reject(lane, reason);
                }
            }
        }
        // Every head is held back: a budget that may borrow lends its
        // workflow what the limits have left (what other budgets leave idle).
        for lane in borrowers {
            if let Some(sent) = self.borrow(lane, now) {
                return sent;
            }
        }
        match wake {
            Some(w) => {
                self.waiting = Some(w);
                Next::Wait(w.until)
            }
            None if waits_for_release && !self.in_flight.is_empty() => Next::Blocked,
            None => Next::Wait(now + IDLE_RECHECK),
        }
    }

    /// Send lane's head without its borrowing budgets, if the limits it
    /// touches besides them admit it now.
    fn borrow(&mut self, lane: usize, now: Nanos) -> Option<Next> {
        let head = self.lanes.head(lane)?;
        let without: Vec<Item> = head
            .items
            .iter()
            .filter(|i| self.borrowing.get(i.limit) != Some(&true))
            .cloned()
            .collect();
        let asked = match head.queued {
            true => self
                .above_reserve(&without)
                .unwrap_or_else(|| without.clone()),
            false => without.clone(),
        };
        let (decision, local) = self.engine.decide_where(&asked, now, false).ok()?;
        if !decision.allowed() {
            return None;
        }
        let committed = committed_with_remaining(&without, &decision);
        self.counters.borrowed += 1;
        Some(self.send(lane, committed, local, now))
    }

    /// Calls of queued work in flight now.
    fn queued_in_flight(&self) -> usize {
        self.in_flight.values().filter(|e| e.queued).count()
    }

    /// How many calls queued work may have in flight: the upstream's
    /// concurrency less its largest reserve share of it (at least one).
    fn slots_for_queued(&self) -> usize {
        let share = self.reserve.iter().copied().fold(0.0, f64::max);
        if share <= 0.0 {
            return self.concurrency;
        }
        let kept = (self.concurrency as f64 * share).ceil() as usize;
        self.concurrency.saturating_sub(kept).max(1)
    }

    /// Queued work's items as asked of the engine when a reserve is kept:
    /// each must fit with its limit's reserve still left after it (what is
    /// charged is unchanged). None when no limit it touches keeps one.
    fn above_reserve(&self, items: &[Item]) -> Option<Vec<Item>> {
        let policy = self.engine.policy();
        let mut raised = None;
        for (i, item) in items.iter().enumerate() {
            let share = self.reserve.get(item.limit).copied().unwrap_or(0.0);
            // (a latency budget charges nothing at admission: no reserve)
            if share <= 0.0 || item.charge == 0 {
                continue;
            }
            let limit = &policy.limits[item.limit];
            let Some(params) = limit.variants.get(item.class) else {
                continue;
            };
            let capacity = params.policy().0;
            let kept =
                ((capacity as f64 * share).ceil() as u64).min(capacity.saturating_sub(item.charge));
            if kept > 0 {
                let items = raised.get_or_insert_with(|| items.to_vec());
                items[i].cost = item.cost.max(item.charge) + kept;
            }
        }
        raised
    }

    /// Whether an admitted live call left some limit with less than its
    /// reserve (so it used quota queued work may not).
    fn took_reserve(&self, items: &[Item], decision: &tollgate_core::Decision) -> bool {
        let Some(raised) = self.above_reserve(items) else {
            return false;
        };
        // (one outcome per item; a shadow limit that would deny charged nothing)
        items
            .iter()
            .zip(&raised)
            .zip(&decision.outcomes)
            .any(|((item, r), outcome)| {
                outcome.allowed
                    && outcome.remaining < r.cost.saturating_sub(item.cost.max(item.charge))
            })
    }

    fn send(&mut self, lane: usize, committed: Vec<(Item, u64)>, local: bool, now: Nanos) -> Next {
        let Some(mut entry) = self.lanes.pop(lane) else {
            return Next::Blocked;
        };
        entry.attempts += 1;
        entry.committed = committed;
        entry.local = local;
        entry.sent_at = now;
        let key = self.paces.key_of(&entry.items);
        self.paces.sent(key, now);
        self.sends += 1;
        entry.sent_order = self.sends;
        self.breaker.sent();
        self.counters.sent += 1;
        let next = Next::Send {
            seq: entry.seq,
            attempt: entry.attempts,
        };
        self.in_flight.insert(entry.seq, entry);
        next
    }

    fn reject(&mut self, lane: usize, reason: String) -> Next {
        let Some(entry) = self.lanes.pop(lane) else {
            return Next::Blocked;
        };
        self.counters.dead += 1;
        Next::Reject {
            seq: entry.seq,
            reason,
        }
    }

    /// Settle the limits a sent job's admission charged: latency debits and
    /// concurrency releases, where it was decided.
    fn settle(&self, entry: &mut Entry, latency: Duration, now: Nanos) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let items: smallvec::SmallVec<[Item; 4]> = entry
            .committed
            .iter()
            .map(|(item, _)| item.clone())
            .collect();
        self.engine
            .finish_where(&items, now, latency_us, entry.local);
    }

    /// When the local view of the limits a reply's call was charged with
    /// next frees quota, if one of them has none left: the latest such
    /// reset. None on a shared (Redis) engine, whose view no reply corrects.
    fn local_reset(&self, committed: &[(Item, u64)], now: Nanos) -> Option<Duration> {
        if self.engine.is_shared() {
            return None;
        }
        let policy = self.engine.policy();
        committed
            .iter()
            .filter(|(item, _)| {
                policy.limits[item.limit].algorithm
                    != tollgate_core::policy::AlgorithmKind::Concurrency
            })
            .map(|(item, _)| self.engine.store().usage(policy, item, now))
            .filter(|usage| usage.remaining == 0)
            .map(|usage| Duration::from_nanos(usage.reset))
            .max()
    }

    /// A sent job's reply, `latency` after it was sent.
    pub fn complete(&mut self, seq: u64, reply: &Reply, latency: Duration, now: Nanos) -> Settled {
        let Some(mut entry) = self.in_flight.remove(&seq) else {
            return Settled::Dead {
                reason: format!("job {seq} was not in flight"),
            };
        };
        self.settle(&mut entry, latency, now);
        let committed = std::mem::take(&mut entry.committed);
        let (wait, reason) = match reply {
            Reply::Status {
                status,
                retry_after,
                corrections,
            } => {
                // A 429 that says nothing of what is left: nothing is.
                let bare_429 = [Correction {
                    target: Target::Binding,
                    remaining: 0,
                }];
                let bare = *status == 429 && corrections.is_empty();
                let corrections = if bare {
                    &bare_429[..]
                } else {
                    &corrections[..]
                };
                let by_others = crate::corrections::apply(
                    &self.engine,
                    &committed,
                    entry.sent_order,
                    corrections,
                    &self.in_flight,
                    now,
                );
                let reset = if *status == 429 && retry_after.is_some() {
                    self.local_reset(&committed, now)
                } else {
                    None
                };
                let key = self.paces.key_of(&entry.items);
                let keyed = !key.is_empty();
                let pace = self.paces.of(key);
                // (A bare 429's "nothing left" is this scheduler's guess,
                // not a count of another client's calls.)
                if !bare {
                    let shared_before = pace.shared(now).is_some();
                    pace.spent_by_others(by_others, now);
                    if let (false, Some((others, left))) = (shared_before, pace.shared(now)) {
                        self.events.push(Event::Shared {
                            others,
                            left,
                            keyed,
                        });
                    }
                }
                let class = classify(*status);
                if class == Class::Transient {
                    self.breaker.failed(now, &mut self.events);
                } else {
                    // Any other answer says the upstream is alive (a 429 is
                    // no breaker failure).
                    self.breaker.succeeded(&mut self.events);
                }
                match class {
                    Class::Success => {
                        let was_paced = pace.effective().is_some();
                        pace.succeeded(now);
                        if let (true, None, Some(profile)) =
                            (was_paced, pace.effective(), pace.ceiling())
                        {
                            self.events.push(Event::Restored { profile, keyed });
                            self.paces.restored();
                        }
                        self.counters.done += 1;
                        return Settled::Done;
                    }
                    Class::Throttled => {
                        self.counters.throttled += 1;
                        // Every 429 is evidence the vendor allows less than
                        // was sent (a wrong profile, or another client on
                        // the same quota): the pace goes below the rate it
                        // came at, so sends resume evenly instead of in a
                        // burst. Without Retry-After it waits one interval
                        // of that pace; only 429s that keep coming back off.
                        pace.refused_early(entry.sent_at);
                        let before = pace.effective();
                        let paced = pace.throttled(entry.sent_at, now);
                        if let (Some(rate), Some(profile)) = (pace.effective(), pace.ceiling()) {
                            if before != Some(rate) {
                                self.events.push(Event::Slowed {
                                    rate,
                                    profile,
                                    keyed,
                                });
                            }
                        }
                        // A whole-second Retry-After whose last second
                        // holds the local view's reset (the profile's
                        // window, lowered to the vendor's count by this
                        // reply) is waited out only to that reset, until a
                        // call sent early by it is refused.
                        let to_reset = match (retry_after, reset) {
                            (Some(after), Some(reset)) if pace.resets_line_up() => {
                                self.retry.until_reset(*after, reset)
                            }
                            _ => None,
                        };
                        let wait = match (retry_after, paced, to_reset) {
                            (Some(after), _, Some(wait)) => {
                                pace.cut_short(now + nanos(wait), now + nanos(*after));
                                wait
                            }
                            (None, Some(wait), _) => Duration::from_nanos(wait),
                            _ => self.retry.after_throttle(*retry_after, entry.attempts),
                        };
                        self.paces.lowered(key);
                        // The vendor's Retry-After, or 429s that keep coming,
                        // pause the whole upstream; one interval of a lowered
                        // pace holds only that pace's key (its gate does).
                        let until = now + nanos(wait);
                        if (retry_after.is_some() || paced.is_none()) && until > self.paused_until {
                            self.paused_until = until;
                            self.events.push(Event::Paused { until, status: 429 });
                        }
                        (wait, format!("HTTP 429 after {} attempts", entry.attempts))
                    }
                    Class::Transient => (
                        // A 503 that says when to come back (a maintenance
                        // window, RFC 9110 10.2.3) is waited out at least
                        // that long, not retried on the usual backoff.
                        self.retry
                            .after_failure(entry.attempts)
                            .max(retry_after.unwrap_or_default()),
                        format!("HTTP {status} after {} attempts", entry.attempts),
                    ),
                    Class::Redirect => {
                        // Not followed: a job redirected did not happen.
                        self.counters.dead += 1;
                        return Settled::Dead {
                            reason: format!("HTTP {status} (a redirect; tollgate does not follow them: fix the job's url)"),
                        };
                    }
                    Class::Rejected => {
                        self.counters.dead += 1;
                        return Settled::Dead {
                            reason: format!("HTTP {status} (not retried)"),
                        };
                    }
                }
            }
            Reply::Failed { error } => {
                self.breaker.failed(now, &mut self.events);
                (
                    self.retry.after_failure(entry.attempts),
                    format!("{error} after {} attempts", entry.attempts),
                )
            }
        };
        if entry.attempts >= entry.max_attempts {
            self.counters.dead += 1;
            return Settled::Dead { reason };
        }
        self.counters.retried += 1;
        let at = now + nanos(wait);
        self.backoff.push(Reverse((at, entry.seq)));
        self.backing_off.insert(entry.seq, entry);
        Settled::Retry { at }
    }

    /// A sent job whose caller went away before its reply (a proxy client
    /// that disconnected): its limits are settled, and it counts neither as
    /// an answer nor as a failure. False if it was not in flight.
    pub fn abandon(&mut self, seq: u64, now: Nanos) -> bool {
        let Some(mut entry) = self.in_flight.remove(&seq) else {
            return false;
        };
        let latency = Duration::from_nanos(now.saturating_sub(entry.sent_at));
        self.settle(&mut entry, latency, now);
        self.breaker.probe_abandoned();
        true
    }

    /// Drop a job that is queued or waiting out a backoff (fleet mode: its
    /// lease went to another runner; the proxy: its client left or its
    /// deadline passed). False if it is not here, or in flight.
    pub fn forget(&mut self, seq: u64) -> bool {
        // A backing-off job's heap entry finds nothing when it comes due.
        self.backing_off.remove(&seq).is_some() || self.lanes.remove(seq).is_some()
    }

    /// Jobs queued or waiting out a backoff (not in flight).
    pub fn queued(&self) -> usize {
        self.lanes.queued() + self.backing_off.len()
    }

    /// Jobs sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The items an admitting decision charged, each with what its limit had
/// left just after.
fn committed_with_remaining(
    items: &[Item],
    decision: &tollgate_core::Decision,
) -> Vec<(Item, u64)> {
    tollgate_store::committed(items, decision)
        .cloned()
        .zip(
            decision
                .outcomes
                .iter()
                .filter(|o| o.allowed)
                .map(|o| o.remaining),
        )
        .collect()
}

/// The store could not answer (Redis down, and a limit of the request fails
/// closed): wait and ask again.
fn store_unavailable(e: &tollgate_store::EngineError) -> bool {
    matches!(e, tollgate_store::EngineError::Unavailable { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::{Attrs, NoProfiles, Policy};

    const SEC: Nanos = 1_000_000_000;

    fn scheduler(limits: &str, concurrency: usize) -> Scheduler {
        let policy: Policy = tollgate_core::parse(limits, &NoProfiles).unwrap();
        let breaker = BreakerSettings {
            failures: 3,
            cooldown: Duration::from_secs(30),
        };
        Scheduler::new(Engine::new(policy), 5, concurrency, breaker, 7)
    }

    fn push(s: &mut Scheduler, seq: u64, priority: Priority, workflow: &str) {
        let req = Attrs::new("POST", "/x", &[("tollgate-workflow", workflow)]);
        let mut items = Vec::new();
        s.engine().policy().plan(&req, &mut items).unwrap();
        s.push(seq, priority, 0, items);
    }

    fn status(status: u16, retry_after: Option<u64>) -> Reply {
        Reply::Status {
            status,
            retry_after: retry_after.map(Duration::from_secs),
            corrections: Vec::new(),
        }
    }

    fn sent(next: Next) -> u64 {
        match next {
            Next::Send { seq, .. } => seq,
            other => panic!("expected a send, got {other:?}"),
        }
    }

    fn push_live(s: &mut Scheduler, seq: u64) {
        let req = Attrs::new("GET", "/x", &[]);
        let mut items = Vec::new();
        s.engine().policy().plan(&req, &mut items).unwrap();
        s.push_capped(seq, Priority::Normal, 0, 1, false, None, items);
    }

    const WINDOW: &str =
        "[[limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 10\n";

    #[test]
    fn queued_work_stops_at_the_reserve_and_live_requests_use_it() {
        let mut s = scheduler(WINDOW, 100).with_reserve(vec![0.2]);
        for seq in 0..20 {
            push(&mut s, seq, Priority::High, "batch");
        }
        // 10 a minute, 20% kept: the batch gets 8 now.
        for want in 0..8 {
            assert_eq!(sent(s.next(0)), want);
        }
        // The 9th waits for the next window (when it fits above the reserve).
        assert_eq!(s.next(0), Next::Wait(60 * SEC));
        // A live request takes the reserve, even behind older, higher jobs.
        push_live(&mut s, 100);
        assert_eq!(sent(s.next(0)), 100);
        push_live(&mut s, 101);
        assert_eq!(sent(s.next(0)), 101);
        push_live(&mut s, 102);
        assert!(matches!(s.next(0), Next::Wait(_)), "the window is spent");
        // Next window: live first, then the batch up to the reserve again.
        let mut next_window = Vec::new();
        while let Next::Send { seq, .. } = s.next(60 * SEC) {
            next_window.push(seq);
        }
        assert_eq!(next_window, vec![102, 8, 9, 10, 11, 12, 13, 14]);
    }

    #[test]
    fn without_live_traffic_the_batch_gets_everything_above_the_reserve() {
        // A bucket of 10 refilled at 10/s, 20% kept: after its burst down to
        // the reserve, the batch goes at the full refill rate.
        let limits = "[[limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n";
        let mut s = scheduler(limits, 100).with_reserve(vec![0.2]);
        for seq in 0..100 {
            push(&mut s, seq, Priority::Normal, "batch");
        }
        let mut now = 0;
        let mut sent_at = Vec::new();
        while sent_at.len() < 100 {
            match s.next(now) {
                Next::Send { seq, .. } => {
                    sent_at.push(now);
                    s.complete(seq, &status(200, None), Duration::ZERO, now);
                }
                Next::Wait(at) => now = at,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sent_at.iter().filter(|&&t| t == 0).count(), 8);
        // 92 more at 10/s: 9.2 s.
        assert_eq!(sent_at[99], 9_200_000_000);
    }

    #[test]
    fn queued_work_leaves_the_reserve_s_share_of_the_concurrency_to_live_calls() {
        let limits = "[[limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"1000/s\"\n";
        let mut s = scheduler(limits, 10).with_reserve(vec![0.2]);
        for seq in 0..20 {
            push(&mut s, seq, Priority::High, "batch");
        }
        // 10 at once, 20% of them kept: the batch has 8 in flight at most.
        for want in 0..8 {
            assert_eq!(sent(s.next(0)), want);
        }
        assert_eq!(s.next(0), Next::Blocked);
        // A live call still finds a slot.
        push_live(&mut s, 100);
        assert_eq!(sent(s.next(0)), 100);
        // A reply frees a slot for the batch again.
        s.complete(0, &status(200, None), Duration::ZERO, 1);
        assert_eq!(sent(s.next(1)), 8);
    }

    #[test]
    fn a_reserve_never_makes_a_call_impossible() {
        // Cost 9 of a quota of 10 with 20% kept: it waits for a full window
        // (the reserve shrinks to what fits), it is not rejected.
        let limits = "[[limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 10\ncost = { header = \"x-cost\" }\n";
        let mut s = scheduler(limits, 100).with_reserve(vec![0.2]);
        let req = Attrs::new("POST", "/x", &[("x-cost", "9")]);
        let mut items = Vec::new();
        s.engine().policy().plan(&req, &mut items).unwrap();
        s.push(0, Priority::Normal, 0, items.clone());
        assert_eq!(sent(s.next(0)), 0);
        s.push(1, Priority::Normal, 0, items);
        assert_eq!(s.next(0), Next::Wait(60 * SEC));
        assert_eq!(sent(s.next(60 * SEC)), 1);
    }

    const BUCKET: &str = "[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/s\"\n";

    /// A vendor that is not tollgate's engine: a token bucket counting
    /// arrivals to the nanosecond, answering 429 with no Retry-After.
    struct VendorBucket {
        capacity: f64,
        per_sec: f64,
        tokens: f64,
        at: Nanos,
    }

    impl VendorBucket {
        fn admits(&mut self, now: Nanos) -> bool {
            let refill = (now - self.at) as f64 / SEC as f64 * self.per_sec;
            self.tokens = (self.tokens + refill).min(self.capacity);
            self.at = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                true
            } else {
                false
            }
        }
    }

    /// `seconds` of a runner whose profile says `profile_rate`/s (burst
    /// 20) against a vendor allowing 100/s (burst 20), replies 1 ms after
    /// each send: (calls, 429s, 2xx per second from second 10 on).
    fn against_a_vendor_of_100_per_s(profile_rate: u64, seconds: u64) -> (u64, u64, f64) {
        let limits = format!("[[limit]]\nname = \"profile\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"{profile_rate}/s\"\n");
        let mut s = scheduler(&limits, 32);
        let jobs = profile_rate * seconds + 100;
        for seq in 1..=jobs {
            push(&mut s, seq, Priority::Normal, "");
        }
        let mut vendor = VendorBucket {
            capacity: 20.0,
            per_sec: 100.0,
            tokens: 20.0,
            at: 0,
        };
        let mut replies: std::collections::BTreeMap<(Nanos, u64), bool> = Default::default();
        let (mut now, end) = (0, seconds * SEC);
        let (mut calls, mut throttled, mut late_ok) = (0, 0, 0);
        while now < end {
            while let Some((&(at, seq), &ok)) = replies.iter().next() {
                if at > now {
                    break;
                }
                replies.remove(&(at, seq));
                let reply = status(if ok { 200 } else { 429 }, None);
                s.complete(seq, &reply, Duration::from_millis(1), at);
            }
            match s.next(now) {
                Next::Send { seq, .. } => {
                    calls += 1;
                    let ok = vendor.admits(now);
                    throttled += u64::from(!ok);
                    late_ok += u64::from(ok && now >= 10 * SEC);
                    replies.insert((now + 1_000_000, seq), ok);
                    continue;
                }
                Next::Wait(at) => {
                    let reply_at = replies.keys().next().map_or(at, |(r, _)| *r);
                    now = at.min(reply_at).max(now + 1);
                }
                Next::Blocked | Next::Idle => match replies.keys().next() {
                    Some((at, _)) => now = (*at).max(now + 1),
                    None => break,
                },
                Next::Reject { .. } => {}
            }
        }
        (calls, throttled, late_ok as f64 / (seconds - 10) as f64)
    }

    #[test]
    fn a_429_on_one_key_slows_that_key_only() {
        // A limit per key (as a vendor counts per API key): 10/s each.
        let mut s = scheduler("[[limit]]\nname = \"per-key\"\nkey = [\"header:tollgate-workflow\"]\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"10/s\"\n", 10);
        for (seq, key) in [(1, "a"), (2, "b"), (3, "a"), (4, "b")] {
            push(&mut s, seq, Priority::Normal, key);
        }
        assert_eq!(sent(s.next(0)), 1);
        assert_eq!(sent(s.next(0)), 2);
        // Key a's vendor allows less: a lone 429 lowers a's pace to 0.95
        // of the 10/s it came at; key b goes on at once.
        let Settled::Retry { .. } = s.complete(1, &status(429, None), Duration::ZERO, 0) else {
            panic!("expected a retry")
        };
        assert_eq!(
            s.drain_events(),
            vec![Event::Slowed {
                rate: 9.5,
                profile: 10.0,
                keyed: true
            }]
        );
        assert_eq!(
            s.complete(2, &status(200, None), Duration::ZERO, 0),
            Settled::Done
        );
        assert_eq!(sent(s.next(0)), 4, "b is not held by a's pace");
        let interval = 105_263_157;
        assert_eq!(s.next(0), Next::Wait(interval));
        assert_eq!(sent(s.next(interval)), 1, "a, at its own pace");
        assert_eq!(s.effective_rate(), Some(9.5), "the slowest key's");
    }

    #[test]
    fn a_profile_too_fast_is_paced_down_to_what_the_vendor_allows() {
        // The right profile: no 429 at all.
        let (calls, throttled, rate) = against_a_vendor_of_100_per_s(100, 30);
        assert_eq!(throttled, 0, "{calls} calls");
        assert!(rate >= 99.0, "{rate}/s");
        // 1.6x too fast: within 10 s at >= 85% of the real rate, <= 2% 429s.
        let (calls, throttled, rate) = against_a_vendor_of_100_per_s(160, 30);
        assert!(
            throttled as f64 <= 0.02 * calls as f64,
            "1.6x: {throttled} of {calls} calls answered 429"
        );
        assert!(rate >= 85.0, "1.6x: {rate}/s of 100/s after 10 s");
        // 3x too fast: >= 80%, <= 3%.
        let (calls, throttled, rate) = against_a_vendor_of_100_per_s(300, 30);
        assert!(
            throttled as f64 <= 0.03 * calls as f64,
            "3x: {throttled} of {calls} calls answered 429"
        );
        assert!(rate >= 80.0, "3x: {rate}/s of 100/s after 10 s");
    }

    #[test]
    fn jobs_go_at_the_earliest_admissible_instant_high_priority_first() {
        let mut s = scheduler(BUCKET, 10);
        push(&mut s, 1, Priority::Low, "");
        push(&mut s, 2, Priority::Normal, "");
        push(&mut s, 3, Priority::High, "");
        push(&mut s, 4, Priority::Normal, "");
        assert_eq!(sent(s.next(0)), 3);
        assert_eq!(sent(s.next(0)), 2);
        // The burst is spent: the next token comes exactly 1 s later.
        assert_eq!(s.next(0), Next::Wait(SEC));
        assert_eq!(s.next(SEC - 1), Next::Wait(SEC));
        assert_eq!(sent(s.next(SEC)), 4);
        assert_eq!(s.next(SEC), Next::Wait(2 * SEC));
        assert_eq!(sent(s.next(2 * SEC)), 1);
        assert_eq!(s.next(2 * SEC), Next::Blocked, "replies outstanding");
        for seq in [3, 2, 4, 1] {
            assert_eq!(
                s.complete(seq, &status(200, None), Duration::ZERO, 2 * SEC),
                Settled::Done
            );
        }
        assert_eq!(s.next(2 * SEC), Next::Idle);
        assert_eq!(s.binding_limit(), Some("account"));
    }

    #[test]
    fn a_workflow_budget_holds_back_only_its_own_lane() {
        let limits = "[[limit]]\nname = \"backfill\"\nkey = [\"header:tollgate-workflow\"]\nmatch = { headers = { tollgate-workflow = \"backfill\" } }\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1\n[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"1/s\"\n";
        let mut s = scheduler(limits, 10);
        push(&mut s, 1, Priority::High, "backfill");
        push(&mut s, 2, Priority::High, "backfill");
        push(&mut s, 3, Priority::Low, "live");
        assert_eq!(sent(s.next(0)), 1);
        // Job 2 waits an hour for its budget; job 3 is not stuck behind it.
        assert_eq!(sent(s.next(0)), 3);
        assert_eq!(s.next(0), Next::Wait(3600 * SEC));
    }

    #[test]
    fn concurrency_caps_what_is_in_flight() {
        let mut s = scheduler(BUCKET.replace("capacity = 2", "capacity = 100").as_str(), 2);
        for seq in 1..=3 {
            push(&mut s, seq, Priority::Normal, "");
        }
        sent(s.next(0));
        sent(s.next(0));
        assert_eq!(s.next(0), Next::Blocked);
        s.complete(1, &status(200, None), Duration::ZERO, 0);
        assert_eq!(sent(s.next(0)), 3);
    }

    #[test]
    fn a_429_with_retry_after_pauses_the_whole_upstream_plus_at_most_250ms() {
        for seed in 0..20 {
            let mut s = scheduler(&BUCKET.replace("capacity = 2", "capacity = 100"), 10);
            s.retry = Backoff::new(seed);
            push(&mut s, 1, Priority::Normal, "");
            push(&mut s, 2, Priority::Normal, "");
            sent(s.next(0));
            let Settled::Retry { at } = s.complete(1, &status(429, Some(2)), Duration::ZERO, 0)
            else {
                panic!("expected a retry")
            };
            assert!((2 * SEC..=2 * SEC + 250_000_000).contains(&at), "{at}");
            // Job 2 has its token, yet waits with the rest of the upstream.
            assert_eq!(s.next(SEC), Next::Wait(at));
            assert_eq!(
                s.drain_events(),
                vec![
                    Event::Slowed {
                        rate: 0.95,
                        profile: 1.0,
                        keyed: false
                    },
                    Event::Paused {
                        until: at,
                        status: 429
                    }
                ]
            );
            assert_eq!(sent(s.next(at)), 1, "the older job first");
            // Then the pace the 429 set: a lone one, 0.95 of the 1/s it
            // came at.
            let paced = at + 1_052_631_578;
            assert_eq!(s.next(at), Next::Wait(paced));
            assert_eq!(sent(s.next(paced)), 2);
            assert_eq!(s.counters().throttled, 1);
        }
    }

    const WINDOW_OF_A_SECOND: &str =
        "[[limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1s\"\nquota = 100\n";

    #[test]
    fn a_retry_after_that_rounds_up_a_windows_end_waits_to_that_end_only() {
        // A 429 at 0.8 s with `Retry-After: 1` (0.2 s to the window's end,
        // rounded up): the next window is not skipped.
        for seed in 0..20 {
            let mut s = scheduler(WINDOW_OF_A_SECOND, 10);
            s.retry = Backoff::new(seed);
            push(&mut s, 1, Priority::Normal, "");
            let at_08 = 800_000_000;
            sent(s.next(at_08));
            let Settled::Retry { at } = s.complete(1, &status(429, Some(1)), Duration::ZERO, at_08)
            else {
                panic!("expected a retry")
            };
            assert!((SEC..=SEC + 25_000_000).contains(&at), "{at}");
            assert!(s.drain_events().contains(&Event::Paused {
                until: at,
                status: 429
            }));
            assert_eq!(sent(s.next(at)), 1);
        }
        // At 0.2 s the end is 0.8 s away: inside the last second of
        // `Retry-After: 2` it is not (the vendor's window is not the
        // profile's), so the whole Retry-After is waited out.
        let mut s = scheduler(WINDOW_OF_A_SECOND, 10);
        push(&mut s, 1, Priority::Normal, "");
        sent(s.next(200_000_000));
        let Settled::Retry { at } =
            s.complete(1, &status(429, Some(2)), Duration::ZERO, 200_000_000)
        else {
            panic!("expected a retry")
        };
        assert!(at >= 2_200_000_000, "{at}");
    }

    #[test]
    fn a_call_refused_after_a_cut_short_retry_after_makes_every_later_one_whole() {
        // The vendor's windows are not at whole seconds: the call sent at
        // the profile's reset is refused too; from then on its Retry-After
        // is waited out in full.
        let mut s = scheduler(WINDOW_OF_A_SECOND, 10);
        push(&mut s, 1, Priority::Normal, "");
        sent(s.next(800_000_000));
        let Settled::Retry { at } =
            s.complete(1, &status(429, Some(1)), Duration::ZERO, 800_000_000)
        else {
            panic!("expected a retry")
        };
        assert!(at < 1_100_000_000, "cut short to the window's end: {at}");
        assert_eq!(sent(s.next(at)), 1);
        let refused = at + 1_000_000;
        let Settled::Retry { at } = s.complete(1, &status(429, Some(1)), Duration::ZERO, refused)
        else {
            panic!("expected a retry")
        };
        assert!(at >= refused + SEC, "waited out in full: {at}");
        // And so is the next one, though it too could be cut short.
        let later = 5 * SEC + 800_000_000;
        assert_eq!(sent(s.next(later)), 1);
        let Settled::Retry { at } = s.complete(1, &status(429, Some(1)), Duration::ZERO, later)
        else {
            panic!("expected a retry")
        };
        assert!(at >= later + SEC, "{at}");
    }

    #[test]
    fn without_retry_after_a_429_waits_at_a_lowered_pace_then_backs_off_4_8_s_then_dead() {
        // The profile: 1/s. The first two rounds of 429s lower the pace
        // (0.95 for a lone one, then 0.8 of that) and wait one interval of
        // it; a third 429
        // in a row, with nothing succeeding between, backs off as for an
        // exhausted quota (4 s, then 8 s, plus up to 1 s of jitter).
        let mut s = scheduler(&BUCKET.replace("capacity = 2", "capacity = 100"), 10);
        push(&mut s, 1, Priority::Normal, "");
        let mut now = 0;
        let waits = [
            (1_052_631_578, 1_052_631_578),
            (1_315_789_473, 1_315_789_473),
            (4 * SEC, 5 * SEC),
            (8 * SEC, 9 * SEC),
        ];
        for (attempt, (least, most)) in waits.into_iter().enumerate() {
            assert_eq!(
                s.next(now),
                Next::Send {
                    seq: 1,
                    attempt: attempt as u32 + 1
                }
            );
            let Settled::Retry { at } = s.complete(1, &status(429, None), Duration::ZERO, now)
            else {
                panic!("expected a retry")
            };
            let wait = at - now;
            assert!(
                (least - 1..=most).contains(&wait),
                "attempt {}: {wait}",
                attempt + 1
            );
            now = at;
        }
        assert_eq!(s.next(now), Next::Send { seq: 1, attempt: 5 });
        assert_eq!(
            s.complete(1, &status(429, None), Duration::ZERO, now),
            Settled::Dead {
                reason: "HTTP 429 after 5 attempts".into()
            }
        );
        assert_eq!(s.next(now), Next::Idle);
    }

    #[test]
    fn other_4xx_is_dead_at_once_and_5xx_is_retried() {
        let mut s = scheduler(&BUCKET.replace("capacity = 2", "capacity = 100"), 10);
        push(&mut s, 1, Priority::Normal, "");
        push(&mut s, 2, Priority::Normal, "");
        sent(s.next(0));
        sent(s.next(0));
        assert_eq!(
            s.complete(1, &status(400, None), Duration::ZERO, 0),
            Settled::Dead {
                reason: "HTTP 400 (not retried)".into()
            }
        );
        assert!(matches!(
            s.complete(2, &status(503, None), Duration::ZERO, 0),
            Settled::Retry { .. }
        ));
        assert_eq!(s.counters().dead, 1);
        assert_eq!(s.counters().retried, 1);
        // A 503 that says when to come back is waited out that long.
        push(&mut s, 3, Priority::Normal, "");
        sent(s.next(0));
        let Settled::Retry { at } = s.complete(3, &status(503, Some(30)), Duration::ZERO, 0) else {
            panic!("expected a retry")
        };
        assert!(at >= 30 * SEC, "{at}");
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_probes_once_and_closes() {
        let mut s = scheduler(&BUCKET.replace("capacity = 2", "capacity = 100"), 10);
        for seq in 1..=5 {
            push(&mut s, seq, Priority::Normal, "");
        }
        for _ in 0..3 {
            sent(s.next(0));
        }
        let failed = Reply::Failed {
            error: "connection failed".into(),
        };
        for seq in 1..=3 {
            s.complete(seq, &failed, Duration::ZERO, 0);
        }
        let until = 30 * SEC;
        assert_eq!(
            s.drain_events(),
            vec![Event::BreakerOpened { failures: 3, until }]
        );
        assert_eq!(s.next(0), Next::Wait(until));
        // Half-open: one probe, nothing else until it answers.
        let probe = sent(s.next(until));
        assert_eq!(s.next(until), Next::Blocked);
        s.complete(probe, &status(200, None), Duration::ZERO, until);
        assert_eq!(
            s.drain_events(),
            vec![Event::BreakerHalfOpen, Event::BreakerClosed]
        );
        sent(s.next(until));
    }

    #[test]
    fn a_cost_that_can_never_fit_is_rejected() {
        let limits = "[[limit]]\nname = \"ids\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\ncost = { json_array = \"/ids\" }\n";
        let mut s = scheduler(limits, 10);
        let item = Item {
            limit: 0,
            class: 0,
            key: "".into(),
            cost: 11,
            charge: 11,
        };
        s.push(1, Priority::Normal, 0, vec![item]);
        assert_eq!(
            s.next(0),
            Next::Reject {
                seq: 1,
                reason: "its cost (11) can never fit limit 'ids' (capacity 10)".into()
            }
        );
    }

    #[test]
    fn rate_limit_headers_lower_the_local_view_only() {
        let limits = "[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"1/s\"\n[[limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 1000\n";
        let mut s = scheduler(limits, 10);
        for seq in 1..=3 {
            push(&mut s, seq, Priority::Normal, "");
        }
        sent(s.next(0));
        let reply = |target: Target, remaining| Reply::Status {
            status: 200,
            retry_after: None,
            corrections: vec![Correction { target, remaining }],
        };
        // Another client used 89 of the account's 100: 10 left after ours.
        s.complete(
            1,
            &reply(Target::Named("account".into()), 10),
            Duration::ZERO,
            0,
        );
        let usage = |s: &Scheduler, limit: usize| {
            let item = Item {
                limit,
                class: 0,
                key: "".into(),
                cost: 1,
                charge: 1,
            };
            s.engine()
                .store()
                .usage(s.engine().policy(), &item, 0)
                .remaining
        };
        assert_eq!(usage(&s, 0), 10);
        assert_eq!(usage(&s, 1), 999, "the daily count is not touched");
        // A higher count never raises it; the longest window is the daily one.
        sent(s.next(0));
        s.complete(2, &reply(Target::Binding, 50), Duration::ZERO, 0);
        assert_eq!(usage(&s, 0), 9);
        sent(s.next(0));
        s.complete(3, &reply(Target::Longest, 500), Duration::ZERO, 0);
        assert_eq!(usage(&s, 1), 500);
    }
}

#[cfg(test)]
mod review_tests {
    use super::*;
    use tollgate_core::{NoProfiles, Policy};

    const SEC: Nanos = 1_000_000_000;

    fn scheduler(limits: &str) -> Scheduler {
        let policy: Policy = tollgate_core::parse(limits, &NoProfiles).unwrap();
        Scheduler::new(Engine::new(policy), 5, 100, BreakerSettings::default(), 3)
    }

    fn item(limit: usize, cost: u64) -> Item {
        Item {
            limit,
            class: 0,
            key: "".into(),
            cost,
            charge: cost,
        }
    }

    fn reply(status: u16) -> Reply {
        Reply::Status {
            status,
            retry_after: Some(Duration::ZERO),
            corrections: Vec::new(),
        }
    }

    #[test]
    fn a_big_high_priority_call_is_not_starved_by_small_low_priority_ones() {
        let mut s = scheduler("[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n");
        s.push(1, Priority::Low, 0, vec![item(0, 1)]);
        assert_eq!(s.next(0), Next::Send { seq: 1, attempt: 1 });
        // 9 tokens left; a bulk call of 10 waits 0.1 s for the tenth.
        s.push(2, Priority::High, 0, vec![item(0, 10)]);
        s.push(3, Priority::Low, 0, vec![item(0, 1)]);
        assert_eq!(s.next(0), Next::Wait(SEC / 10));
        assert_eq!(s.next(SEC / 10), Next::Send { seq: 2, attempt: 1 });
    }

    #[test]
    fn a_redirect_is_a_dead_letter_and_a_bare_429_empties_the_local_view() {
        let mut s = scheduler("[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"1/s\"\n");
        s.push(1, Priority::Normal, 0, vec![item(0, 1)]);
        s.push(2, Priority::Normal, 0, vec![item(0, 1)]);
        s.next(0);
        s.next(0);
        assert!(
            matches!(s.complete(1, &reply(301), Duration::ZERO, 0), Settled::Dead { reason } if reason.contains("redirect"))
        );
        // The runner believed in 98 more; the upstream says none.
        assert!(matches!(
            s.complete(2, &reply(429), Duration::ZERO, 0),
            Settled::Retry { .. }
        ));
        let usage = s
            .engine()
            .store()
            .usage(s.engine().policy(), &item(0, 1), 0);
        assert_eq!(usage.remaining, 0);
    }

    #[test]
    fn a_forgotten_job_leaves_its_lane_and_its_backoff() {
        let mut s = scheduler("[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"1/s\"\n");
        for seq in 1..=3 {
            s.push(seq, Priority::Normal, 0, vec![item(0, 1)]);
        }
        assert_eq!(s.next(0), Next::Send { seq: 1, attempt: 1 });
        let failed = Reply::Failed {
            error: "connection failed".into(),
        };
        assert!(matches!(
            s.complete(1, &failed, Duration::ZERO, 0),
            Settled::Retry { .. }
        ));
        // Taken over by another runner: one backing off, one queued.
        assert!(s.forget(1));
        assert!(s.forget(3));
        assert!(!s.forget(3));
        assert_eq!(s.queued(), 1);
        assert_eq!(s.next(0), Next::Send { seq: 2, attempt: 1 });
        s.complete(2, &reply(200), Duration::ZERO, 0);
        assert_eq!(s.next(60 * SEC), Next::Idle);
    }

    #[test]
    fn a_shared_store_that_cannot_answer_makes_jobs_wait_not_dead_letters() {
        // Redis on a port nothing listens on: the limit fails closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let policy: Policy = tollgate_core::parse(
            &format!("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\n[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"1/s\"\n"),
            &NoProfiles,
        )
        .unwrap();
        let engine = Engine::open(policy, "upstream:test").unwrap();
        assert!(engine.is_shared());
        let mut s = Scheduler::new(engine, 5, 10, BreakerSettings::default(), 3);
        s.push(1, Priority::Normal, 0, vec![item(0, 1)]);
        assert_eq!(s.next(0), Next::Wait(UNAVAILABLE_RECHECK));
        assert_eq!(s.next(SEC), Next::Wait(SEC + UNAVAILABLE_RECHECK));
        let events = s.drain_events();
        assert_eq!(events.len(), 1, "logged once: {events:?}");
        assert!(
            matches!(&events[0], Event::StoreUnavailable { error } if error.contains("'account' fails closed")),
            "{events:?}"
        );
        assert_eq!(s.queued(), 1, "still queued");
    }

    #[test]
    fn a_count_for_a_limit_that_rolled_over_never_lands_on_another() {
        // The vendor's per-second count arrives after that window rolled
        // over: it says nothing of the daily limit (it once lowered the
        // daily count to the per-second one, and the line stopped for the
        // day).
        let mut s = scheduler("[[limit]]\nname = \"per-second\"\nalgorithm = \"fixed_window\"\nevery = \"1s\"\nquota = 200\n[[limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 500000\n");
        s.push(1, Priority::Normal, 0, vec![item(0, 1), item(1, 1)]);
        s.next(SEC - 1_000_000);
        let per_second = Reply::Status {
            status: 200,
            retry_after: None,
            corrections: vec![Correction {
                target: Target::Named("per-second".into()),
                remaining: 150,
            }],
        };
        s.complete(1, &per_second, Duration::from_millis(5), SEC + 4_000_000);
        let daily = s
            .engine()
            .store()
            .usage(s.engine().policy(), &item(1, 1), SEC + 4_000_000);
        assert_eq!(daily.remaining, 499_999);
    }

    #[test]
    fn a_count_from_before_a_window_rolled_over_is_ignored() {
        let mut s = scheduler("[[limit]]\nname = \"minute\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n");
        s.push(1, Priority::Normal, 0, vec![item(0, 1)]);
        s.next(59 * SEC);
        // Sent in the old minute, answered in the new one with the old count.
        let old_count = Reply::Status {
            status: 200,
            retry_after: None,
            corrections: vec![Correction {
                target: Target::Named("minute".into()),
                remaining: 3,
            }],
        };
        s.complete(1, &old_count, Duration::from_secs(2), 61 * SEC);
        let usage = s
            .engine()
            .store()
            .usage(s.engine().policy(), &item(0, 1), 61 * SEC);
        assert_eq!(usage.remaining, 100);
    }
}
