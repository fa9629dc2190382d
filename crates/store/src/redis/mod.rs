//! The Redis store: counters shared by every process pointed at one Redis.
//!
//! A decision is made by one `FCALL` of `decide.lua`, loaded once as a Redis
//! Function library (`FUNCTION LOAD`, again when Redis answers that the
//! function is gone, e.g. after a restart without persistence; on a server
//! without functions, Redis < 7, the same source runs by `EVALSHA`): all
//! limits of the request are read, decided all-or-nothing and written in one
//! atomic step on the server, in one round trip, at Redis's clock. Decisions
//! that queue while the pool's connections wait for Redis go together in
//! their next call (a group commit: an idle store sends each decision at
//! once), so a busy Redis runs one call for many decisions instead of one
//! each.
//!
//! Key layout (one string per tracked key, expiring once at rest; a fixed
//! window keeps a counter per window under that name plus `|START`):
//! `{prefix}:{namespace}:{limit}:{shape}:{variant}:{key}`, where
//! `namespace` separates the faces and upstreams sharing one Redis
//! ("gateway", "upstream:NAME"), `shape` (8 hex digits) changes with what
//! the limit's counts mean (`tollgate_core::carry::state_shape`: its
//! algorithm, key, unit of cost and windows, and the script's state format),
//! so a limit whose quota, rate or tiers a reload changed keeps its keys and
//! carries their use over (the script reshapes a state written for other
//! parameters when it reads it), while one whose counts would mean something
//! else starts fresh, as a reload does in memory; `variant` is `0`, or
//! `c.NAME` for a `[[class]]`. An override's key shares its default
//! variant's name (the key tells it apart), so a key given an override, or
//! losing one, keeps its use.
//!
//! Precision: the script computes in Lua's doubles, exact below 2^53; every
//! instant in it is relative to now, so limits must keep their state within
//! about 52 days of now (`check_policy` refuses the rest, naming the limit).

mod denials;
mod history;
mod pauses;
mod shelf;

pub use history::{FleetHistory, HistoryRow};
pub use pauses::Pauses;
pub use shelf::{SharedCache, Stamp, MAX_DEPTH};

use crate::lease::{Ask, Grant, Mark};
use denials::Denials;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OnceCell};
use tollgate_core::algo::Usage;
use tollgate_core::calendar::Calendar;
use tollgate_core::carry::{self, Variant};
use tollgate_core::policy::{AlgorithmKind, Limit, Mode, Params, Policy, RedisSettings};
use tollgate_core::units::NANOS_PER_SEC;
use tollgate_core::{Decision, Item, Nanos, Outcome, Verdict};

const SOURCE: &str = include_str!("decide.lua");
/// The placeholder in `decide.lua` for the name it registers its function under.
const FUNCTION_PLACEHOLDER: &str = "TOLLGATE_FUNCTION";
/// The version of the states `decide.lua` writes, part of every key's
/// shape: a version that stores them differently uses other keys.
const STATE_FORMAT: &str = "state 3;";
/// Doubles are exact below 2^53; instants relative to now stay below 2^52.
const EXACT: u64 = 1 << 52;

/// Why the Redis store (or the shared cache, or the pauses) could not be
/// used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// The config cannot work on Redis (bad URL, a limit beyond the script's precision).
    #[error("store: {0}")]
    Config(String),
    /// Redis did not answer in time, refused, or is down.
    #[error("redis at {url}: {reason}")]
    Unavailable {
        /// The server's URL, its password hidden.
        url: String,
        /// What the client said.
        reason: String,
    },
    /// Redis answered, but the decision script failed (a tollgate bug, or a
    /// key that something else wrote).
    #[error("redis at {url}: the decision script failed: {reason}")]
    Script {
        /// The server's URL, its password hidden.
        url: String,
        /// The script's error, as Redis reported it.
        reason: String,
    },
}

/// Where the instant of a decision comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// Redis `TIME`: one clock for the whole fleet (the default).
    Server,
    /// The `now` the caller passes (tests with a fake clock).
    Caller,
}

/// A policy's view of one Redis: its key names, over connections that the
/// stores of successive reloads share.
#[derive(Debug)]
pub struct RedisStore {
    conns: Arc<Conns>,
    namespace: String,
    /// `{prefix}:{namespace}:{limit}:{shape}:{variant}:` per limit and variant.
    key_prefixes: Vec<Vec<String>>,
    /// Per limit, per variant: its spec as the script reads it, or None
    /// when it depends on now (a calendar with DST) and is built per call.
    specs: Vec<Vec<Option<Box<[u8]>>>>,
    /// Per limit: when a reload here carried its counts into its current
    /// definition (the script carries a bucket written for an older rate as
    /// of then, as the memory store does at the reload).
    since: Vec<Option<Nanos>>,
    time: TimeSource,
    /// Denials that hold until a known instant (the async path's).
    denials: Denials,
}

struct Conns {
    client: redis::Client,
    url: String,
    settings: RedisSettings,
    /// The script, for servers without functions.
    script: redis::Script,
    /// The function library's name, and its function's: one per version of
    /// `decide.lua`, so processes of two versions sharing a Redis each call
    /// their own.
    function: String,
    /// Set once the server has refused `FUNCTION` (Redis < 7): EVALSHA then.
    eval_only: AtomicBool,
    /// Per tokio runtime (the gateway runs one per core), the queue of
    /// decisions its pool's connections take their calls from, set once that
    /// pool is connected: a decision is sent and answered on its own thread,
    /// never waking another.
    queues: parking_lot::Mutex<HashMap<tokio::runtime::Id, Arc<OnceCell<Sender>>>>,
    blocking: parking_lot::Mutex<Option<redis::Connection>>,
    /// Script calls sent, however many decisions each carried.
    calls: AtomicU64,
}

/// Most decisions in one script call: Redis runs a call as one step, so a
/// call stays well under a millisecond.
const MOST_PER_CALL: usize = 32;

/// One decision's share of a script call: its keys, and its arguments (see
/// decide.lua's header) back to back in one buffer.
#[derive(Debug, Default)]
struct Part {
    keys: Vec<String>,
    args: Vec<u8>,
    /// Where each argument in `args` ends.
    ends: Vec<usize>,
    /// What the script answers this part with.
    reply: Reply,
}

/// The shape of a part's reply (decide.lua's header).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// A decision.
    #[default]
    Decision,
    /// A decision, then four values per slot (what was lent).
    DecisionAndGrants,
    /// Four values per slot alone (a refill ahead of need).
    Grants,
    /// One value (a settlement or a give-back).
    Done,
}

impl Part {
    fn push(&mut self, arg: &[u8]) {
        self.args.extend_from_slice(arg);
        self.ends.push(self.args.len());
    }

    fn push_number(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    /// "cost", or "cost/charge" when they differ.
    fn push_amounts(&mut self, cost: u64, charge: u64) {
        let mut digits = itoa::Buffer::new();
        self.args.extend_from_slice(digits.format(cost).as_bytes());
        if charge != cost {
            self.args.push(b'/');
            self.args
                .extend_from_slice(digits.format(charge).as_bytes());
        }
        self.ends.push(self.args.len());
    }

    /// How many values of a call's reply, from `rest` on, are this part's.
    fn share(&self, rest: &[i64]) -> usize {
        let slots = self.keys.len();
        let decision = || reply_len(rest.first().copied(), slots);
        match self.reply {
            Reply::Decision => decision(),
            Reply::DecisionAndGrants => decision() + 4 * slots,
            Reply::Grants => 4 * slots,
            Reply::Done => 1,
        }
    }

    fn args(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(from, to)| &self.args[from..to])
    }
}

type Sender = mpsc::UnboundedSender<Queued>;

/// A decision waiting for a connection, and where its reply goes.
struct Queued {
    part: Part,
    reply: oneshot::Sender<Result<Vec<i64>, RedisError>>,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for `policy` under `namespace`. Checks the URL and the
    /// policy; connects on first use (`connect` to do it now).
    pub fn new(
        settings: &RedisSettings,
        policy: &Policy,
        namespace: &str,
        time: TimeSource,
    ) -> Result<RedisStore, RedisError> {
        let url = redacted(&settings.url);
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| RedisError::Config(format!("url '{url}' is not usable: {e}")))?;
        let script = redis::Script::new(SOURCE);
        let function = format!("tollgate_{}", &script.get_hash()[..16]);
        let conns = Arc::new(Conns {
            client,
            url,
            settings: settings.clone(),
            script,
            function,
            eval_only: AtomicBool::new(false),
            queues: parking_lot::Mutex::default(),
            calls: AtomicU64::new(0),
            blocking: parking_lot::Mutex::new(None),
        });
        let since = vec![None; policy.limits.len()];
        Self::over(conns, policy, namespace, time, since)
    }

    /// The store for `policy`, reloaded at `now` from `old` (this store's
    /// policy): the same connections; limits whose counts mean the same keep
    /// their keys, so an unchanged limit keeps its counters and a changed
    /// one carries them over (see `tollgate_core::carry`).
    pub fn reloaded(
        &self,
        old: &Policy,
        policy: &Policy,
        now: Nanos,
    ) -> Result<RedisStore, RedisError> {
        let since = policy
            .limits
            .iter()
            .map(|limit| match carry::carry(old, limit) {
                (carry::Carry::Carried, _) => Some(now),
                (carry::Carry::Unchanged, Some(i)) => self.since.get(i).copied().flatten(),
                _ => None,
            })
            .collect();
        let conns = match policy.store.redis.as_ref() {
            Some(settings) if *settings == self.conns.settings => self.conns.clone(),
            Some(settings) => return Self::new(settings, policy, &self.namespace, self.time),
            None => {
                return Err(RedisError::Config(
                    "a reload cannot leave Redis for memory; restart instead".into(),
                ))
            }
        };
        Self::over(conns, policy, &self.namespace, self.time, since)
    }

    fn over(
        conns: Arc<Conns>,
        policy: &Policy,
        namespace: &str,
        time: TimeSource,
        since: Vec<Option<Nanos>>,
    ) -> Result<RedisStore, RedisError> {
        check_policy(policy)?;
        let key_prefixes = policy
            .limits
            .iter()
            .map(|l| {
                let shape = fnv32(&format!("{STATE_FORMAT}{}", carry::state_shape(l)));
                (0..l.variants.len())
                    .map(|v| {
                        let variant = match carry::variant(policy, l, v) {
                            Variant::Class(name) => format!("c.{name}"),
                            Variant::Default | Variant::Override(_) => "0".into(),
                        };
                        format!(
                            "{}:{namespace}:{}:{shape:08x}:{variant}:",
                            conns.settings.prefix, l.name
                        )
                    })
                    .collect()
            })
            .collect();
        let specs = policy
            .limits
            .iter()
            .zip(&since)
            .map(|(limit, since)| {
                (limit.variants.iter())
                    .map(|params| {
                        (!params_need_now(params)).then(|| {
                            let mut spec = Vec::new();
                            write_spec(limit, params, *since, 0, &mut spec);
                            spec.into_boxed_slice()
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(RedisStore {
            conns,
            namespace: namespace.to_string(),
            key_prefixes,
            specs,
            since,
            time,
            denials: Denials::default(),
        })
    }

    /// Script calls sent so far over these connections (a call carries one
    /// decision, or several that queued together).
    pub fn calls(&self) -> u64 {
        self.conns.calls.load(Ordering::Relaxed)
    }

    /// Give back the unused units of slices (`asks`' refunds) in one call,
    /// taking nothing.
    pub(crate) async fn give_back(
        &self,
        policy: &Policy,
        items: &[Item],
        asks: &[Option<Ask>],
        now: Nanos,
    ) -> Result<(), RedisError> {
        self.run(self.part(policy, items, now, Op::GiveBack { asks }))
            .await
            .map(|_| ())
    }

    /// Take slices for `items` ahead of need (their current ones run low),
    /// giving back `asks`' refunds: per item, what was lent (nothing when
    /// the keys cannot lend all of them at least one unit).
    pub(crate) async fn prefetch(
        &self,
        policy: &Policy,
        items: &[Item],
        asks: &[Option<Ask>],
        now: Nanos,
    ) -> Result<Vec<Grant>, RedisError> {
        let reply = self
            .run(self.part(policy, items, now, Op::Prefetch { asks }))
            .await?;
        Ok(grants(&reply))
    }

    /// `[store] timeout`: the longest a call may take.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_nanos(self.conns.settings.timeout)
    }

    /// The URL without its password, for messages.
    pub fn url(&self) -> &str {
        &self.conns.url
    }

    /// Open the connection pool now: an unreachable server or a refused
    /// password is an error here rather than at the first request.
    pub async fn connect(&self) -> Result<(), RedisError> {
        self.queue().await.map(|_| ())
    }

    /// This runtime's decision queue, connecting its pool on first use: one
    /// task per connection takes whatever decisions are queued (up to
    /// `MOST_PER_CALL`) and makes them in one call, so concurrent decisions
    /// neither wait for one another's replies nor cost a call each.
    async fn queue(&self) -> Result<Sender, RedisError> {
        let c = &self.conns;
        let runtime = tokio::runtime::Handle::current().id();
        let cell = c.queues.lock().entry(runtime).or_default().clone();
        let timeout = Duration::from_nanos(c.settings.timeout);
        cell.get_or_try_init(|| async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            let mut pool = Vec::with_capacity(c.settings.pool);
            for _ in 0..c.settings.pool {
                let conn = ConnectionManager::new_with_config(c.client.clone(), config.clone())
                    .await
                    .map_err(|e| c.unavailable(&e))?;
                pool.push(conn);
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for conn in pool {
                tokio::spawn(serve_queue(c.clone(), conn, rx.clone()));
            }
            Ok(tx)
        })
        .await
        .cloned()
    }

    /// Decide `items` (planned by `policy`) in one round trip. With
    /// `[store] remember_denials` (the default), a denial with a retry
    /// instant is remembered: the same request is denied again without a
    /// round trip until then (denials.rs says why that is exact).
    pub async fn decide(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, RedisError> {
        if let Some(denied) = self.remembered(items, hold, now) {
            return Ok(denied);
        }
        let reply = self.run(self.decide_call(policy, items, now, hold)).await?;
        let decision = self.decoded(policy, items, &reply)?;
        self.remember(policy, items, now, hold, &decision);
        Ok(decision)
    }

    /// A denial of this request still standing (with `remember_denials`).
    fn remembered(&self, items: &[Item], hold: bool, now: Nanos) -> Option<Decision> {
        self.conns
            .settings
            .remember_denials
            .then(|| self.denials.get(items, hold, now))
            .flatten()
    }

    /// Note a denial (with `remember_denials`) to answer it again locally.
    fn remember(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
        decision: &Decision,
    ) {
        if self.conns.settings.remember_denials && matches!(decision.verdict, Verdict::Deny { .. })
        {
            let releases = items
                .iter()
                .any(|i| policy.limits[i.limit].algorithm == AlgorithmKind::Concurrency);
            self.denials.note(items, hold, now, decision, releases);
        }
    }

    /// `decide` over a blocking connection, for synchronous callers (the
    /// runner's scheduler): one round trip, at most `timeout` long.
    pub fn decide_blocking(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
        hold: bool,
    ) -> Result<Decision, RedisError> {
        let reply = self.run_blocking(self.decide_call(policy, items, now, hold))?;
        self.decoded(policy, items, &reply)
    }

    /// What a client may see of each item's limit, without changing
    /// anything (blocking: the admin API asks for it).
    pub fn usage_blocking(
        &self,
        policy: &Policy,
        items: &[Item],
        now: Nanos,
    ) -> Result<Vec<Usage>, RedisError> {
        let reply = self.run_blocking(self.part(policy, items, now, Op::Usage))?;
        let decision = self.decoded(policy, items, &reply)?;
        Ok(decision
            .outcomes
            .iter()
            .map(|o| Usage {
                remaining: o.remaining,
                reset: o.reset,
            })
            .collect())
    }

    /// Settle a completed request: debit latency limits, release concurrency.
    pub async fn finish(
        &self,
        policy: &Policy,
        committed: &[Item],
        now: Nanos,
        latency_us: u64,
    ) -> Result<(), RedisError> {
        if let Some(call) = self.finish_call(policy, committed, now, latency_us) {
            self.run(call).await?;
        }
        Ok(())
    }

    /// `finish` over the blocking connection.
    pub fn finish_blocking(
        &self,
        policy: &Policy,
        committed: &[Item],
        now: Nanos,
        latency_us: u64,
    ) -> Result<(), RedisError> {
        if let Some(call) = self.finish_call(policy, committed, now, latency_us) {
            self.run_blocking(call)?;
        }
        Ok(())
    }

    fn decide_call(&self, policy: &Policy, items: &[Item], now: Nanos, hold: bool) -> Part {
        self.part(policy, items, now, Op::Decide { hold })
    }

    /// `decide`, taking slices of leased limits as `asks` says (one per
    /// item; decide.lua's `lease`): the decision, and per item what was lent.
    pub(crate) async fn lease(
        &self,
        policy: &Policy,
        items: &[Item],
        asks: &[Option<Ask>],
        now: Nanos,
        hold: bool,
    ) -> Result<(Decision, Vec<Grant>), RedisError> {
        // (Units to give back are sent whatever was remembered.)
        let refunds = asks.iter().flatten().any(|a| !a.refunds.is_empty());
        if let Some(denied) = (!refunds)
            .then(|| self.remembered(items, hold, now))
            .flatten()
        {
            return Ok((denied, Vec::new()));
        }
        let reply = self
            .run(self.part(policy, items, now, Op::Lease { hold, asks }))
            .await?;
        let (head, lent) = reply.split_at(reply.len().saturating_sub(4 * items.len()));
        let decision = self.decoded(policy, items, head)?;
        let grants = grants(lent);
        self.remember(policy, items, now, hold, &decision);
        Ok((decision, grants))
    }

    /// The settlement of `committed`, or None if none of its limits settles
    /// at completion (nothing to send).
    fn finish_call(
        &self,
        policy: &Policy,
        committed: &[Item],
        now: Nanos,
        latency_us: u64,
    ) -> Option<Part> {
        let settling: Vec<Item> = committed
            .iter()
            .filter(|i| policy.limits[i.limit].settles_at_completion())
            .cloned()
            .collect();
        (!settling.is_empty()).then(|| self.part(policy, &settling, now, Op::Finish { latency_us }))
    }

    fn decoded(
        &self,
        policy: &Policy,
        items: &[Item],
        reply: &[i64],
    ) -> Result<Decision, RedisError> {
        decode(policy, items, reply).map_err(|reason| RedisError::Unavailable {
            url: self.conns.url.clone(),
            reason: format!("unexpected reply from the decision script: {reason}"),
        })
    }

    /// Queue `part` for the pool and wait, at most `[store] timeout`, for
    /// its reply.
    /// (Connecting this runtime's pool counts against the timeout too: a
    /// worker whose first decision meets Redis down falls back at once
    /// rather than waiting for a connection attempt.)
    async fn run(&self, part: Part) -> Result<Vec<i64>, RedisError> {
        let ask = async {
            let queue = self.queue().await?;
            let (reply, answer) = oneshot::channel();
            queue
                .send(Queued { part, reply })
                .map_err(|_| self.conns.stopped())?;
            answer.await.map_err(|_| self.conns.stopped())?
        };
        let timeout = Duration::from_nanos(self.conns.settings.timeout);
        tokio::time::timeout(timeout, ask)
            .await
            .unwrap_or_else(|_| Err(self.conns.timed_out()))
    }

    fn run_blocking(&self, part: Part) -> Result<Vec<i64>, RedisError> {
        let mut slot = self.conns.blocking.lock();
        if slot.is_none() {
            let timeout =
                Duration::from_nanos(self.conns.settings.timeout).max(Duration::from_millis(1));
            let conn = self
                .conns
                .client
                .get_connection_with_timeout(timeout.max(Duration::from_secs(1)))
                .map_err(|e| self.conns.unavailable(&e))?;
            conn.set_read_timeout(Some(timeout))
                .and_then(|()| conn.set_write_timeout(Some(timeout)))
                .map_err(|e| self.conns.unavailable(&e))?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            unreachable!("connected above")
        };
        let mut result = self.conns.call(&[&part]).query::<Vec<i64>>(conn);
        for _ in 0..2 {
            let Some(load) = result.as_ref().err().and_then(|e| self.conns.lacking(e)) else {
                break;
            };
            result = self
                .conns
                .loaded(load.query(conn))
                .and_then(|()| self.conns.call(&[&part]).query(conn));
        }
        result.map_err(|e| {
            // A broken or timed-out connection may hold a late reply: start over.
            *slot = None;
            self.conns.unavailable(&e)
        })
    }

    /// One decision's keys and arguments (decide.lua's header has the layout).
    fn part(&self, policy: &Policy, items: &[Item], now: Nanos, op: Op) -> Part {
        let mut part = Part {
            keys: Vec::with_capacity(items.len()),
            args: Vec::with_capacity(16 + 64 * items.len()),
            ends: Vec::with_capacity(2 + 3 * items.len()),
            reply: match op {
                Op::Decide { .. } | Op::Usage => Reply::Decision,
                Op::Lease { .. } => Reply::DecisionAndGrants,
                Op::Prefetch { .. } => Reply::Grants,
                Op::Finish { .. } | Op::GiveBack { .. } => Reply::Done,
            },
        };
        let mut head = format!("{}{}", op.code(), items.len());
        if self.time == TimeSource::Caller {
            head = format!("{head}@{}:{}", now / NANOS_PER_SEC, now % NANOS_PER_SEC);
        }
        part.push(head.as_bytes());
        if let Op::Finish { latency_us } = op {
            part.push_number(latency_us);
        }
        let mut spec = Vec::new();
        for item in items {
            let limit = &policy.limits[item.limit];
            let variant = item.class.min(limit.variants.len() - 1);
            part.keys.push(format!(
                "{}{}",
                self.key_prefixes[item.limit][variant], item.key
            ));
            match &self.specs[item.limit][variant] {
                Some(fixed) => part.push(fixed),
                None => {
                    spec.clear();
                    let since = self.since[item.limit];
                    write_spec(limit, limit.params(item.class), since, now, &mut spec);
                    part.push(&spec);
                }
            }
            part.push_amounts(item.cost, item.charge);
            if let Op::Lease { asks, .. } | Op::GiveBack { asks } | Op::Prefetch { asks } = op {
                let ask = asks.get(part.keys.len() - 1).and_then(Option::as_ref);
                part.push(Ask::argument(ask).as_bytes());
            }
        }
        part
    }
}

impl Conns {
    fn unavailable(&self, e: &redis::RedisError) -> RedisError {
        if e.is_timeout() {
            return self.timed_out();
        }
        // An error raised inside the script, or a key of another type that
        // something else wrote under tollgate's prefix: Redis itself is fine.
        let detail = e.detail().unwrap_or("");
        let in_script = e.code() == Some("ERR")
            && ["user_function", "user_script", "tollgate:"]
                .iter()
                .any(|m| detail.contains(m));
        if in_script || e.code() == Some("WRONGTYPE") {
            return RedisError::Script {
                url: self.url.clone(),
                reason: e.to_string(),
            };
        }
        let reason = match e.kind() {
            redis::ErrorKind::AuthenticationFailed => {
                format!("authentication failed (check the user and password in [store] url): {e}")
            }
            _ => e.to_string(),
        };
        RedisError::Unavailable {
            url: self.url.clone(),
            reason,
        }
    }

    fn timed_out(&self) -> RedisError {
        RedisError::Unavailable {
            url: self.url.clone(),
            reason: format!(
                "no answer within {} ms ([store] timeout)",
                self.settings.timeout / 1_000_000
            ),
        }
    }

    fn stopped(&self) -> RedisError {
        RedisError::Unavailable {
            url: self.url.clone(),
            reason: "the store's connection tasks have stopped (their runtime is gone)".into(),
        }
    }

    /// One call over `parts`: every part's keys, then every part's
    /// arguments, to the function (or the script, on a server without
    /// functions).
    fn call(&self, parts: &[&Part]) -> redis::Cmd {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let keys: usize = parts.iter().map(|p| p.keys.len()).sum();
        let mut cmd = if self.eval_only.load(Ordering::Relaxed) {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.script.get_hash());
            cmd
        } else {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg(&self.function);
            cmd
        };
        cmd.arg(keys);
        for part in parts {
            cmd.arg(&part.keys);
        }
        for part in parts {
            for arg in part.args() {
                cmd.arg(arg);
            }
        }
        cmd
    }

    /// When a call failed because the server lacks our code, the command
    /// that loads it: the function library, or the script on a server that
    /// has no functions (Redis < 7, which this switches to EVALSHA for good).
    fn lacking(&self, e: &redis::RedisError) -> Option<redis::Cmd> {
        let detail = e.detail().unwrap_or("");
        let mut cmd;
        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
            || detail.starts_with("unknown command")
        {
            self.eval_only.store(true, Ordering::Relaxed);
            cmd = redis::cmd("SCRIPT");
            cmd.arg("LOAD").arg(SOURCE);
        } else if detail.starts_with("Function not found") {
            let library = format!(
                "#!lua name={}\n{}",
                self.function,
                SOURCE.replace(FUNCTION_PLACEHOLDER, &self.function)
            );
            cmd = redis::cmd("FUNCTION");
            cmd.arg("LOAD").arg(library);
        } else {
            return None;
        }
        Some(cmd)
    }

    /// The outcome of a `lacking` load: another process may have loaded the
    /// same library first, which is as good.
    fn loaded(&self, result: redis::RedisResult<redis::Value>) -> redis::RedisResult<()> {
        match result {
            Err(e) if !e.detail().is_some_and(|d| d.contains("already exists")) => Err(e),
            _ => Ok(()),
        }
    }

    /// Make `batch` in one call (loading the code first if Redis lacks it)
    /// and hand each decision its share of the reply.
    async fn make(&self, conn: &mut ConnectionManager, batch: Vec<Queued>) {
        let parts: Vec<&Part> = batch.iter().map(|q| &q.part).collect();
        let mut result = self.call(&parts).query_async::<Vec<i64>>(conn).await;
        for _ in 0..2 {
            let Some(load) = result.as_ref().err().and_then(|e| self.lacking(e)) else {
                break;
            };
            result = match self.loaded(load.query_async(conn).await) {
                Ok(()) => self.call(&parts).query_async(conn).await,
                Err(e) => Err(e),
            };
        }
        let failed = |reason: String| RedisError::Unavailable {
            url: self.url.clone(),
            reason,
        };
        match result {
            Ok(reply) => {
                // Each part's share, in order; None if the reply falls short.
                let mut rest = reply.as_slice();
                let shares: Option<Vec<Vec<i64>>> = (parts.iter())
                    .map(|part| {
                        let (mine, others) = rest.split_at_checked(part.share(rest))?;
                        rest = others;
                        Some(mine.to_vec())
                    })
                    .collect();
                match shares {
                    Some(shares) if rest.is_empty() => {
                        let mut shares = shares.into_iter();
                        answer_all(batch, |_| Ok(shares.next().unwrap_or_default()));
                    }
                    _ => {
                        let reason = format!(
                            "unexpected reply from the decision script: {} values for {} decisions",
                            reply.len(),
                            batch.len()
                        );
                        answer_all(batch, |_| Err(failed(reason.clone())));
                    }
                }
            }
            Err(e) => answer_all(batch, |_| Err(self.unavailable(&e))),
        }
    }
}

fn answer_all(batch: Vec<Queued>, mut answer: impl FnMut(&Part) -> Result<Vec<i64>, RedisError>) {
    for q in batch {
        // A caller that gave up (timed out) no longer listens.
        let _ = q.reply.send(answer(&q.part));
    }
}

/// One connection's task: take the queued decisions and make them in one
/// call, again and again, until the store is gone.
async fn serve_queue(
    conns: Arc<Conns>,
    mut conn: ConnectionManager,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>>,
) {
    loop {
        let mut batch = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < MOST_PER_CALL {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        // A decision whose caller has given up is not made: it would count
        // a request that was answered without it.
        batch.retain(|q| !q.reply.is_closed());
        if !batch.is_empty() {
            conns.make(&mut conn, batch).await;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    Decide {
        hold: bool,
    },
    Lease {
        hold: bool,
        asks: &'a [Option<Ask>],
    },
    /// Give back the unused units of slices (the asks' refunds), nothing else.
    GiveBack {
        asks: &'a [Option<Ask>],
    },
    /// Take slices ahead of need, with no request of their own.
    Prefetch {
        asks: &'a [Option<Ask>],
    },
    Usage,
    Finish {
        latency_us: u64,
    },
}

impl Op<'_> {
    fn code(self) -> &'static str {
        match self {
            Op::Decide { hold: false } => "d",
            Op::Decide { hold: true } => "h",
            Op::Lease { hold: false, .. } => "l",
            Op::Lease { hold: true, .. } => "m",
            Op::GiveBack { .. } => "r",
            Op::Prefetch { .. } => "p",
            Op::Usage => "u",
            Op::Finish { .. } => "f",
        }
    }
}

/// The four values per slot of a lease reply: what each item was lent.
fn grants(reply: &[i64]) -> Vec<Grant> {
    reply
        .chunks_exact(4)
        .map(|g| Grant {
            units: u64::try_from(g[0]).unwrap_or(0),
            mark: Mark {
                secs: u64::try_from(g[1]).unwrap_or(0),
                nanos: u64::try_from(g[2]).unwrap_or(0),
            },
            usable: u64::try_from(g[3]).ok(),
        })
        .collect()
}

/// Whether a limit's spec depends on now: a calendar with DST carries the
/// window boundaries around now.
fn params_need_now(params: &Params) -> bool {
    match params {
        Params::FixedWindow(p) => p.calendar.fixed_offset().is_none(),
        Params::Tiered(p) => p.tiers.iter().any(|t| t.calendar.fixed_offset().is_none()),
        Params::Gcra(_) | Params::SlidingWindow(_) | Params::Concurrency(_) => false,
    }
}

/// A limit's spec as the script reads it (see its header): algorithm, hold,
/// shadow, latency, then the algorithm's parameters, comma-separated.
fn write_spec(limit: &Limit, params: &Params, since: Option<Nanos>, now: Nanos, out: &mut Vec<u8>) {
    let code = match params {
        Params::Gcra(_) => "g",
        Params::FixedWindow(_) => "f",
        Params::SlidingWindow(_) => "s",
        Params::Tiered(_) => "t",
        Params::Concurrency(_) => "c",
    };
    let mut fields = vec![
        code.to_string(),
        limit.hold.to_string(),
        u8::from(limit.mode == Mode::Shadow).to_string(),
        u8::from(limit.is_latency()).to_string(),
    ];
    match params {
        Params::Gcra(p) => {
            let (whole, rem, tau) = p.exact_parts();
            fields.extend(
                [p.capacity, p.amount, p.period, whole, rem, tau.ns, tau.frac]
                    .map(|n| n.to_string()),
            );
            fields.push(since.map_or("-".into(), |t| {
                format!("{}:{}", t / NANOS_PER_SEC, t % NANOS_PER_SEC)
            }));
        }
        Params::FixedWindow(p) => {
            fields.push(p.quota.to_string());
            push_calendar(&p.calendar, now, &mut fields);
        }
        Params::SlidingWindow(p) => {
            fields.extend(
                [p.quota, p.every, p.segment, u64::from(p.segments)].map(|n| n.to_string()),
            );
        }
        Params::Tiered(p) => {
            fields.push(p.tiers.len().to_string());
            for tier in &p.tiers {
                fields.push(tier.quota.to_string());
                push_calendar(&tier.calendar, now, &mut fields);
            }
        }
        Params::Concurrency(p) => fields.push(p.max.to_string()),
    }
    out.extend_from_slice(fields.join(",").as_bytes());
}

/// "F every offset" for fixed zones; "N every count boundaries.." for zones
/// with DST: the boundaries of the windows around `now` (the script
/// extrapolates beyond them by `every`, which is exact unless a DST change
/// falls outside them, i.e. unless the clocks disagree by days).
fn push_calendar(calendar: &Calendar, now: Nanos, fields: &mut Vec<String>) {
    let every = calendar.every();
    match calendar.fixed_offset() {
        Some(offset) => fields.extend([
            "F".to_string(),
            every.to_string(),
            (i128::from(offset).rem_euclid(i128::from(every))).to_string(),
        ]),
        None => {
            let mut w = calendar.window(now);
            for _ in 0..2 {
                w = calendar.window(w.start.saturating_sub(1));
            }
            let mut bounds = vec![w.start];
            for _ in 0..7 {
                w = calendar.next(w);
                bounds.push(w.start);
            }
            fields.extend(["N".to_string(), every.to_string(), bounds.len().to_string()]);
            fields.extend(
                bounds
                    .iter()
                    .map(|b| format!("{}:{}", b / NANOS_PER_SEC, b % NANOS_PER_SEC)),
            );
        }
    }
}

/// The reply's kind for an admission at once by every limit, in its short
/// form: then per limit only remaining and reset.
const SHORT_ADMIT: i64 = 3;

/// How many values a decision's reply over `limits` has, by its kind.
fn reply_len(kind: Option<i64>, limits: usize) -> usize {
    if kind == Some(SHORT_ADMIT) {
        1 + 2 * limits
    } else {
        4 + 4 * limits
    }
}

fn decode(policy: &Policy, items: &[Item], reply: &[i64]) -> Result<Decision, String> {
    let ns = |v: i64| u64::try_from(v).unwrap_or(0);
    if reply.len() != reply_len(reply.first().copied(), items.len()) {
        return Err(format!("{} values for {} limits", reply.len(), items.len()));
    }
    if reply.first() == Some(&SHORT_ADMIT) {
        let outcomes = items
            .iter()
            .zip(reply[1..].chunks_exact(2))
            .map(|(item, o)| Outcome {
                allowed: true,
                remaining: ns(o[0]),
                reset: ns(o[1]),
                retry_after: None,
                shadow: policy.limits[item.limit].mode == Mode::Shadow,
            })
            .collect();
        return Ok(Decision {
            verdict: Verdict::Admit { delay: 0 },
            outcomes,
        });
    }
    let slot = |v: i64| usize::try_from(v).ok().filter(|&i| i < items.len());
    let verdict = match reply[0] {
        0 => Verdict::Admit {
            delay: ns(reply[1]),
        },
        1 => Verdict::Deny {
            limit: slot(reply[1]).ok_or("bad slot")?,
            retry_after: (reply[2] >= 0).then(|| ns(reply[2])),
        },
        2 => Verdict::Never {
            limit: slot(reply[1]).ok_or("bad slot")?,
            cost: ns(reply[2]),
            capacity: ns(reply[3]),
        },
        other => return Err(format!("verdict {other}")),
    };
    let outcomes = items
        .iter()
        .zip(reply[4..].chunks_exact(4))
        .map(|(item, o)| Outcome {
            allowed: o[0] == 1,
            remaining: ns(o[1]),
            reset: ns(o[2]),
            retry_after: (o[3] >= 0).then(|| ns(o[3])),
            shadow: policy.limits[item.limit].mode == Mode::Shadow,
        })
        .collect();
    Ok(Decision { verdict, outcomes })
}

/// Refuse limits the script cannot decide exactly, naming them.
pub fn check_policy(policy: &Policy) -> Result<(), RedisError> {
    let too_long = |limit: &str, what: &str| {
        RedisError::Config(format!(
            "limit '{limit}': {what} is too long for the Redis store (its state must stay within 52 days of now)"
        ))
    };
    for limit in &policy.limits {
        let name = limit.name.as_str();
        if limit.hold >= EXACT / 2 {
            return Err(too_long(name, "hold"));
        }
        for params in &limit.variants {
            let calendar_ok = |c: &Calendar| {
                let every = c.every();
                every < EXACT / 8
                    && (every.is_multiple_of(NANOS_PER_SEC) || every < 900_000_000_000_000)
            };
            match params {
                Params::Gcra(p) => {
                    let tau = p.tau();
                    if tau.saturating_add(limit.hold) >= EXACT {
                        return Err(too_long(
                            name,
                            "capacity / refill (the time to refill a drained bucket)",
                        ));
                    }
                    if u128::from(tau) * u128::from(p.amount) >= u128::from(EXACT)
                        || u128::from(p.capacity) * u128::from(p.amount) >= u128::from(EXACT)
                    {
                        return Err(RedisError::Config(format!(
                            "limit '{name}': capacity {} with refill {}/{}ns needs more precision than the Redis store keeps; use a smaller refill amount per period",
                            p.capacity, p.amount, p.period
                        )));
                    }
                }
                Params::FixedWindow(p) if !calendar_ok(&p.calendar) => {
                    return Err(too_long(name, "every"))
                }
                Params::Tiered(p) if !p.tiers.iter().all(|t| calendar_ok(&t.calendar)) => {
                    return Err(too_long(name, "a tier's every"))
                }
                Params::SlidingWindow(p)
                    if p.every >= EXACT / 8
                        || !(p.segment.is_multiple_of(NANOS_PER_SEC)
                            || p.segment < 900_000_000_000_000) =>
                {
                    return Err(too_long(name, "every"))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The URL with any password replaced, for messages and logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".into()
            };
            format!("{}{shown}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// FNV-1a: a short, stable hash of a limit's definition for its key names
/// (stable across processes and versions, unlike the std hasher).
fn fnv32(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redacted("redis://:s3cret@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redacted("redis://bob:s3cret@h:6379"),
            "redis://bob:***@h:6379"
        );
        assert_eq!(redacted("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn limits_beyond_the_scripts_precision_are_refused_by_name() {
        let policy = tollgate_core::parse(
            "[[limit]]\nname = \"yearly\"\nalgorithm = \"token_bucket\"\ncapacity = 1000000\nrefill = \"1/min\"\n",
            &tollgate_core::NoProfiles,
        )
        .unwrap();
        let err = check_policy(&policy).unwrap_err().to_string();
        assert!(err.contains("limit 'yearly'"), "{err}");
    }
}
