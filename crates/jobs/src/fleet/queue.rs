//! The fleet's job queue in Redis: a thin adapter over the scripts in
//! `scripts`. It holds no state of its own beyond a connection and this
//! runner's token; what a job is and what becomes of it is decided by the
//! scheduler and the run, as with the SQLite state.

use super::scripts::Scripts;
use crate::job::{Job, Routed};
use crate::state::{Counts, DeadLetter};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, FromRedisValue, ToRedisArgs};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tollgate_comply::settings::UpstreamsConfig;
use tollgate_core::policy::RedisSettings;
use tollgate_store::redis::redacted;

/// Jobs per script call when importing: a batch is all-or-none, and
/// small enough that Redis is never blocked for long.
const IMPORT_BATCH: usize = 500;
/// Most ids per call: leases renewed or given back per script call, fields
/// read per HMGET.
pub const IDS_PER_CALL: usize = 1000;
/// Most writes a runner makes in one call (`Queue::write`).
pub const WRITES_PER_CALL: usize = 100;
/// How much of a stored job that cannot be read a dead letter quotes.
const QUOTE: usize = 200;
/// How long one queue command may take before Redis counts as unreachable.
/// (Decisions have `[store] timeout`; these are off the hot path.)
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis cannot be reached, refused the password, or did not answer.
    #[error("store {url}: {reason}")]
    Unavailable { url: String, reason: String },
    /// The same id is already queued for a different request.
    #[error("queue '{queue}' at {url}: job id '{id}' is already queued for a different request; {queued}give the new job another id, or use another --queue")]
    Conflict {
        queue: String,
        url: String,
        id: String,
        /// What was queued before the conflict was seen ("" when nothing).
        queued: String,
    },
    /// Something in Redis is not what tollgate wrote.
    #[error("queue '{queue}' at {url}: {message}")]
    Invalid {
        queue: String,
        url: String,
        message: String,
    },
    /// Redis answered a command with an error that asking again will not
    /// change (a key of another type than tollgate wrote, a script error).
    #[error("queue '{queue}' at {url}: Redis refused the command: {reason}")]
    Refused {
        queue: String,
        url: String,
        /// Redis's own message.
        reason: String,
    },
}

/// The key names of one queue (docs/runner.md, "Fleet mode", lists them).
#[derive(Debug, Clone)]
struct Keys {
    base: String,
}

impl Keys {
    fn new(prefix: &str, queue: &str) -> Keys {
        Keys {
            base: format!("{prefix}:queue:{queue}"),
        }
    }
    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.base)
    }
    fn pending(&self, upstream: &str) -> String {
        format!("{}:pending:{upstream}", self.base)
    }
    fn leases(&self, upstream: &str) -> String {
        format!("{}:leases:{upstream}", self.base)
    }
}

/// A job leased to this runner.
#[derive(Debug, Clone)]
pub struct Leased {
    pub id: String,
    /// Its place in the queue (priority, then arrival): the scheduler's seq
    /// (`u64::MAX` when it cannot be read; `job` then says so).
    pub seq: u64,
    pub attempts: u32,
    /// The job, or why it cannot run as stored (its JSON does not parse, or
    /// its place is not a whole number): such a job is dead-lettered with
    /// this reason, and the rest of the lease goes on.
    pub job: Result<Job, String>,
}

/// What a lease call returned, with the upstream's figures after it.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    pub jobs: Vec<Leased>,
    /// Jobs of the upstream still waiting for a runner.
    pub pending: u64,
    /// Jobs of the upstream leased to some runner (this one included).
    pub leased: u64,
    /// Expired leases this call returned to pending.
    pub reaped: u64,
}

/// How recording a final result went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// This result is the job's final result.
    New,
    /// This same result was already recorded (a write retried after its
    /// reply was lost).
    Again,
    /// Another result was recorded first (another runner took the job over
    /// after this runner's lease expired): this one is dropped.
    Other,
}

/// A change a runner makes to the queue as it works. The run's writer task
/// makes them in order, several per call (`Queue::write`).
#[derive(Debug, Clone)]
pub enum Write {
    /// Note the attempts made on a job this runner holds.
    Attempts { id: String, attempts: u32 },
    /// Record a job's final result (as `Queue::finish`).
    Finish {
        upstream: String,
        id: String,
        line: String,
        attempts: u32,
        dead: Option<Box<DeadLetter>>,
    },
    /// Give leases back (as `Queue::release`; at most `IDS_PER_CALL` ids).
    Release { upstream: String, ids: Vec<String> },
}

impl Write {
    /// The jobs it is about.
    pub fn ids(&self) -> &[String] {
        match self {
            Write::Attempts { id, .. } | Write::Finish { id, .. } => std::slice::from_ref(id),
            Write::Release { ids, .. } => ids,
        }
    }

    /// What it writes, for messages.
    pub fn describe(&self) -> String {
        match self {
            Write::Attempts { id, attempts } => {
                format!("the attempt count ({attempts}) of job '{id}'")
            }
            Write::Finish { id, .. } => format!("the final result of job '{id}'"),
            Write::Release { upstream, ids } => {
                format!(
                    "giving back {} lease(s) of upstream '{upstream}'",
                    ids.len()
                )
            }
        }
    }
}

/// One queue in one Redis, as one runner (its token) sees it.
#[derive(Clone)]
pub struct Queue {
    conn: ConnectionManager,
    keys: Keys,
    name: String,
    /// The URL without its password, for messages.
    url: String,
    /// Who holds a lease: unique per process.
    token: String,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("token", &self.token)
            .finish()
    }
}

impl Queue {
    /// Connect to the queue `name` of the Redis in `settings`: a bad
    /// address or password is an error now, naming the store's URL.
    pub async fn connect(settings: &RedisSettings, name: &str) -> Result<Queue, QueueError> {
        let url = redacted(&settings.url);
        let unavailable = |reason: String| QueueError::Unavailable {
            url: url.clone(),
            reason,
        };
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| unavailable(format!("not a usable Redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            // A lost connection is retried a few times in the background,
            // then again at the next command: recovery needs no restart.
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        // One plain connection first: its error says what is wrong, at once
        // (the manager would retry a refused password with backoff).
        let mut probe =
            tokio::time::timeout(COMMAND_TIMEOUT, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| {
                    unavailable(format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()))
                })?
                .map_err(|e| unavailable(describe(&e)))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut probe)
            .await
            .map_err(|e| unavailable(describe(&e)))?;
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| unavailable(describe(&e)))?;
        Ok(Queue {
            conn,
            keys: Keys::new(&settings.prefix, name),
            name: name.to_string(),
            url,
            token: format!("{}-{:016x}", std::process::id(), fastrand::u64(..)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store's URL, without a password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Queue jobs. A job whose id is already queued with the same request
    /// is left as it is (every runner of a fleet imports the same file, and
    /// a re-run resumes); an id queued for a different request is an error,
    /// and then nothing is queued. Returns (added, already there).
    pub async fn import(
        &self,
        jobs: &[Routed],
        config: &UpstreamsConfig,
    ) -> Result<(u64, u64), QueueError> {
        let specs: Vec<String> = jobs
            .iter()
            .map(|r| serde_json::to_string(&r.job).unwrap_or_default())
            .collect();
        // First a read-only pass over everything, so a conflict anywhere
        // queues nothing. Each batch's script checks again before writing:
        // this pass only gives the all-or-nothing answer for the whole file.
        for (chunk, spec_chunk) in jobs.chunks(IMPORT_BATCH).zip(specs.chunks(IMPORT_BATCH)) {
            let mut invocation = Scripts::get().check.prepare_invoke();
            invocation.key(self.keys.key("jobs"));
            for (routed, spec) in chunk.iter().zip(spec_chunk) {
                invocation.arg(&routed.job.id).arg(spec.as_str());
            }
            let conflict: Option<String> = self.invoke(&invocation).await?;
            if let Some(id) = conflict {
                return Err(self.conflict(&id, 0));
            }
        }
        let (mut added, mut already) = (0u64, 0u64);
        let mut by_upstream: Vec<Vec<(&Routed, &String)>> =
            vec![Vec::new(); config.upstreams.len()];
        for (routed, spec) in jobs.iter().zip(&specs) {
            by_upstream[routed.upstream].push((routed, spec));
        }
        for (u, group) in by_upstream.iter().enumerate() {
            let upstream = &config.upstreams[u].name;
            for chunk in group.chunks(IMPORT_BATCH) {
                let mut invocation = Scripts::get().import.prepare_invoke();
                invocation
                    .key(self.keys.key("jobs"))
                    .key(self.keys.key("upstream"))
                    .key(self.keys.key("arrival"))
                    .key(self.keys.key("seq"))
                    .key(self.keys.key("upstreams"))
                    .key(self.keys.pending(upstream))
                    .arg(upstream);
                for (routed, spec) in chunk {
                    invocation
                        .arg(&routed.job.id)
                        .arg(routed.job.priority.rank())
                        .arg(spec.as_str());
                }
                let reply: Vec<redis::Value> = self.invoke(&invocation).await?;
                match reply.as_slice() {
                    [redis::Value::Int(-1), id] => {
                        let id: String = redis::from_redis_value_ref(id).unwrap_or_default();
                        return Err(self.conflict(&id, added));
                    }
                    [redis::Value::Int(a), redis::Value::Int(b)] => {
                        added += *a as u64;
                        already += *b as u64;
                    }
                    other => return Err(self.invalid(format!("import answered {other:?}"))),
                }
            }
        }
        Ok((added, already))
    }

    /// Lease up to `n` jobs of `upstream` for `lease` (best priority, then
    /// oldest, across the whole queue), after returning expired leases to
    /// pending. `n = 0` only reaps and counts. A job that cannot be read as
    /// stored is leased all the same, with `job` saying why.
    pub async fn lease(
        &self,
        upstream: &str,
        n: usize,
        lease: Duration,
    ) -> Result<Lease, QueueError> {
        let mut invocation = Scripts::get().lease.prepare_invoke();
        invocation
            .key(self.keys.pending(upstream))
            .key(self.keys.leases(upstream))
            .key(self.keys.key("owner"))
            .key(self.keys.key("arrival"))
            .key(self.keys.key("jobs"))
            .key(self.keys.key("attempts"))
            .arg(&self.token)
            .arg(n)
            .arg(millis(lease));
        let reply: Vec<redis::Value> = self.invoke(&invocation).await?;
        let int = |v: &redis::Value| -> u64 { redis::from_redis_value_ref(v).unwrap_or(0) };
        let text =
            |v: &redis::Value| -> String { redis::from_redis_value_ref(v).unwrap_or_default() };
        if reply.len() < 3 || !(reply.len() - 3).is_multiple_of(4) {
            return Err(self.invalid(format!("lease answered {} values", reply.len())));
        }
        let mut out = Lease {
            jobs: Vec::with_capacity((reply.len() - 3) / 4),
            pending: int(&reply[0]),
            leased: int(&reply[1]),
            reaped: int(&reply[2]),
        };
        for leased in reply[3..].chunks(4) {
            let (id, place, stored) = (text(&leased[0]), text(&leased[1]), text(&leased[3]));
            let seq = place.parse::<u64>();
            let job = match (&seq, serde_json::from_str::<Job>(&stored)) {
                (Ok(_), Ok(job)) => Ok(job),
                (_, Err(e)) => Err(format!(
                    "the job as stored in queue '{}' cannot be read ({e}); it starts: {}",
                    self.name,
                    quote(&stored)
                )),
                (Err(_), Ok(_)) => Err(format!(
                    "its place in queue '{}' is {place:?}, not a whole number, so it cannot be ordered",
                    self.name
                )),
            };
            out.jobs.push(Leased {
                id,
                seq: seq.unwrap_or(u64::MAX),
                attempts: text(&leased[2]).parse().unwrap_or(0),
                job,
            });
        }
        Ok(out)
    }

    /// Extend this runner's leases on `ids` (jobs of `upstream`); returns
    /// the ids it no longer holds.
    pub async fn renew(
        &self,
        upstream: &str,
        ids: &[String],
        lease: Duration,
    ) -> Result<Vec<String>, QueueError> {
        let mut lost = Vec::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            let mut invocation = Scripts::get().renew.prepare_invoke();
            invocation
                .key(self.keys.pending(upstream))
                .key(self.keys.leases(upstream))
                .key(self.keys.key("owner"))
                .arg(&self.token)
                .arg(millis(lease))
                .arg(chunk);
            let part: Vec<String> = self.invoke(&invocation).await?;
            lost.extend(part);
        }
        Ok(lost)
    }

    /// Give back this runner's leases on `ids` (jobs of `upstream`).
    pub async fn release(&self, upstream: &str, ids: &[String]) -> Result<u64, QueueError> {
        let mut released = 0;
        for chunk in ids.chunks(IDS_PER_CALL) {
            let n: u64 = self.invoke(&self.release_call(upstream, chunk)).await?;
            released += n;
        }
        Ok(released)
    }

    /// Note the attempts made on a job this runner holds.
    pub async fn record_attempts(&self, id: &str, attempts: u32) -> Result<(), QueueError> {
        let _: i64 = self.invoke(&self.attempts_call(id, attempts)).await?;
        Ok(())
    }

    /// Record a job's final result (`line`, as in results.jsonl), when it
    /// is a dead letter the dead letter, and a callback to deliver (JSON,
    /// kept until `callback_settled`). The first result recorded for
    /// a job is its only one.
    pub async fn finish(
        &self,
        upstream: &str,
        id: &str,
        line: &str,
        attempts: u32,
        dead: Option<&DeadLetter>,
        callback: Option<&str>,
    ) -> Result<Recorded, QueueError> {
        let n: i64 = self
            .invoke(&self.finish_call(upstream, id, line, attempts, dead, callback))
            .await?;
        Ok(recorded(n))
    }

    /// Make `writes` in order, in one call (at most `WRITES_PER_CALL`).
    /// Err: the call failed as a whole (Redis unreachable), and then none
    /// or some of them were made (each write is safe to make again, in
    /// order). Ok: one result per write, with a final result's `Recorded`;
    /// a write Redis refused is `Err(QueueError::Refused)`, one it turned
    /// down for now (busy, out of memory) `Err(QueueError::Unavailable)`,
    /// and the ones after either were made all the same: a caller that
    /// makes a write again later keeps two writes of one job out of one
    /// call, so that none overtakes the other.
    pub async fn write(
        &self,
        writes: &[Write],
    ) -> Result<Vec<Result<Option<Recorded>, QueueError>>, QueueError> {
        let calls: Vec<(&'static redis::Script, redis::ScriptInvocation<'static>)> =
            writes.iter().map(|w| self.write_call(w)).collect();
        let replies: Vec<Result<i64, QueueError>> = match calls.as_slice() {
            // One write: EVALSHA, loading the script if Redis lacks it.
            [(_, call)] => match self.invoke(call).await {
                Ok(n) => vec![Ok(n)],
                Err(e @ QueueError::Refused { .. }) => vec![Err(e)],
                Err(e) => return Err(e),
            },
            // Several: one pipeline. Pipelined EVALSHAs are not loaded on
            // NOSCRIPT (a restarted Redis has no scripts), so the scripts
            // it uses are loaded first, in the same pipeline.
            _ => {
                let mut pipe = redis::pipe();
                let mut loaded: Vec<&str> = Vec::new();
                for (script, _) in &calls {
                    if !loaded.contains(&script.get_hash()) {
                        loaded.push(script.get_hash());
                        pipe.load_script(script).ignore();
                    }
                }
                for (_, call) in &calls {
                    pipe.invoke_script(call);
                }
                pipe.ignore_errors();
                let replies: Vec<redis::RedisResult<i64>> =
                    self.timed(pipe.query_async(&mut self.conn())).await?;
                if replies.len() != writes.len() {
                    return Err(self.invalid(format!(
                        "{} writes answered {} values",
                        writes.len(),
                        replies.len()
                    )));
                }
                replies
                    .into_iter()
                    .map(|r| r.map_err(|e| self.error(&e)))
                    .collect()
            }
        };
        Ok(writes
            .iter()
            .zip(replies)
            .map(|(w, reply)| reply.map(|n| matches!(w, Write::Finish { .. }).then(|| recorded(n))))
            .collect())
    }

    /// The upstreams that have jobs in this queue.
    pub async fn upstreams(&self) -> Result<Vec<String>, QueueError> {
        let mut names: Vec<String> = self
            .timed(self.conn().smembers(self.keys.key("upstreams")))
            .await?;
        names.sort();
        Ok(names)
    }

    /// Jobs of `upstream` not finished: (pending, leased).
    pub async fn unfinished(&self, upstream: &str) -> Result<(u64, u64), QueueError> {
        let mut pipe = redis::pipe();
        pipe.zcard(self.keys.pending(upstream))
            .zcard(self.keys.leases(upstream));
        self.timed(pipe.query_async(&mut self.conn())).await
    }

    /// Jobs in the queue: not finished (pending or leased), done, dead.
    pub async fn counts(&self) -> Result<Counts, QueueError> {
        let mut counts = Counts::default();
        for upstream in self.upstreams().await? {
            let (pending, leased) = self.unfinished(&upstream).await?;
            counts.pending += pending + leased;
        }
        let mut pipe = redis::pipe();
        pipe.hlen(self.keys.key("results"))
            .hlen(self.keys.key("dead"));
        let (finished, dead): (u64, u64) = self.timed(pipe.query_async(&mut self.conn())).await?;
        counts.done = finished.saturating_sub(dead);
        counts.dead = dead;
        Ok(counts)
    }

    /// Every dead letter, in queue order.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let all: HashMap<String, String> = self
            .timed(self.conn().hgetall(self.keys.key("dead")))
            .await?;
        let ids: Vec<String> = all.keys().cloned().collect();
        let order = self.arrivals(&ids).await?;
        let mut letters = Vec::with_capacity(all.len());
        for (id, text) in all {
            let letter: DeadLetter = serde_json::from_str(&text)
                .map_err(|e| self.invalid(format!("dead letter '{id}' cannot be read: {e}")))?;
            letters.push((order.get(&id).copied().unwrap_or(u64::MAX), letter));
        }
        letters.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        Ok(letters.into_iter().map(|(_, l)| l).collect())
    }

    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, QueueError> {
        let text: Option<String> = self
            .timed(self.conn().hget(self.keys.key("dead"), id))
            .await?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| self.invalid(format!("dead letter '{id}' cannot be read: {e}")))
        })
        .transpose()
    }

    /// A job's state (pending, leased, done or dead), if the id is queued.
    pub async fn job_state(&self, id: &str) -> Result<Option<String>, QueueError> {
        let mut pipe = redis::pipe();
        for name in ["jobs", "results", "dead", "owner"] {
            pipe.hexists(self.keys.key(name), id);
        }
        let (job, result, dead, owner): (bool, bool, bool, bool) =
            self.timed(pipe.query_async(&mut self.conn())).await?;
        Ok(match (job, result, dead, owner) {
            (false, ..) => None,
            (_, _, true, _) => Some("dead".into()),
            (_, true, _, _) => Some("done".into()),
            (_, _, _, true) => Some("leased by a runner".into()),
            _ => Some("pending".into()),
        })
    }

    /// The callbacks kept and not yet delivered: (job id, their JSON).
    pub async fn pending_callbacks(&self) -> Result<Vec<(String, String)>, QueueError> {
        self.timed(self.conn().hgetall(self.keys.key("callbacks")))
            .await
    }

    /// A kept callback was delivered, or given up on (`error`: why, kept
    /// in `Q:callbacks:undelivered`).
    pub async fn callback_settled(&self, id: &str, error: Option<&str>) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.hdel(self.keys.key("callbacks"), id).ignore();
        if let Some(error) = error {
            pipe.hset(self.keys.key("callbacks:undelivered"), id, error)
                .ignore();
        }
        self.timed(pipe.query_async::<()>(&mut self.conn())).await
    }

    /// Where one job is, as `job_state` says, with its final result line
    /// (once it has one) and the job as stored.
    pub async fn status(
        &self,
        id: &str,
    ) -> Result<Option<(String, Option<String>, Option<Job>)>, QueueError> {
        let Some(state) = self.job_state(id).await? else {
            return Ok(None);
        };
        let (result, stored): (Option<String>, Option<String>) = self
            .timed(
                redis::pipe()
                    .hget(self.keys.key("results"), id)
                    .hget(self.keys.key("jobs"), id)
                    .query_async(&mut self.conn()),
            )
            .await?;
        let job = stored.and_then(|s| serde_json::from_str(&s).ok());
        Ok(Some((state, result, job)))
    }

    /// Queue dead letters again with a fresh attempt count: the ones named,
    /// or all when `ids` is empty. Returns the ids requeued, and the ids
    /// named that are not dead letters.
    pub async fn requeue_dead(
        &self,
        ids: &[String],
    ) -> Result<(Vec<String>, Vec<String>), QueueError> {
        let targets: Vec<String> = if ids.is_empty() {
            self.dead_letters()
                .await?
                .into_iter()
                .map(|d| d.id)
                .collect()
        } else {
            ids.to_vec()
        };
        if targets.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let upstreams: Vec<Option<String>> =
            self.hmget(&self.keys.key("upstream"), &targets).await?;
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        let mut unknown = Vec::new();
        for (id, upstream) in targets.iter().zip(upstreams) {
            match upstream {
                Some(u) => groups.entry(u).or_default().push(id.clone()),
                None => unknown.push(id.clone()),
            }
        }
        let mut requeued = Vec::new();
        for (upstream, ids) in groups {
            for chunk in ids.chunks(IDS_PER_CALL) {
                let mut invocation = Scripts::get().requeue.prepare_invoke();
                invocation
                    .key(self.keys.key("dead"))
                    .key(self.keys.key("results"))
                    .key(self.keys.key("attempts"))
                    .key(self.keys.pending(&upstream))
                    .key(self.keys.key("arrival"))
                    .key(self.keys.key("upstream"))
                    .arg(&upstream)
                    .arg(chunk);
                let done: Vec<String> = self.invoke(&invocation).await?;
                unknown.extend(chunk.iter().filter(|id| !done.contains(id)).cloned());
                requeued.extend(done);
            }
        }
        // In the order asked (or queue order for all).
        let rank: HashMap<&String, usize> =
            targets.iter().enumerate().map(|(i, id)| (id, i)).collect();
        requeued.sort_by_key(|id| rank.get(id).copied());
        unknown.sort_by_key(|id| rank.get(id).copied());
        Ok((requeued, unknown))
    }

    /// The current final result of every finished job, as results.jsonl
    /// lines, in the order they were recorded.
    pub async fn results(&self) -> Result<Vec<String>, QueueError> {
        let order: Vec<String> = self
            .timed(self.conn().lrange(self.keys.key("log"), 0, -1))
            .await?;
        // A job retried from the dead letters is in the log twice: its
        // result is at its last place.
        let last: HashMap<&String, usize> =
            order.iter().enumerate().map(|(i, id)| (id, i)).collect();
        let ids: Vec<&String> = order
            .iter()
            .enumerate()
            .filter(|(i, id)| last[id] == *i)
            .map(|(_, id)| id)
            .collect();
        let lines: Vec<Option<String>> = self.hmget(&self.keys.key("results"), &ids).await?;
        Ok(lines.into_iter().flatten().collect())
    }

    /// Each id's place in the queue (priority, then arrival).
    async fn arrivals(&self, ids: &[String]) -> Result<HashMap<String, u64>, QueueError> {
        let scores: Vec<Option<u64>> = self.hmget(&self.keys.key("arrival"), ids).await?;
        Ok(ids
            .iter()
            .zip(scores)
            .filter_map(|(id, s)| s.map(|s| (id.clone(), s)))
            .collect())
    }

    /// HMGET of `fields` of the hash `key`, at most `IDS_PER_CALL` per call.
    async fn hmget<F: ToRedisArgs + Sync, T: FromRedisValue>(
        &self,
        key: &str,
        fields: &[F],
    ) -> Result<Vec<Option<T>>, QueueError> {
        let mut values = Vec::with_capacity(fields.len());
        for chunk in fields.chunks(IDS_PER_CALL) {
            let part: Vec<Option<T>> = self
                .timed(
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg(chunk)
                        .query_async(&mut self.conn()),
                )
                .await?;
            values.extend(part);
        }
        Ok(values)
    }

    /// The script call that makes `write`, with its script.
    fn write_call(
        &self,
        write: &Write,
    ) -> (&'static redis::Script, redis::ScriptInvocation<'static>) {
        let scripts = Scripts::get();
        match write {
            Write::Attempts { id, attempts } => {
                (&scripts.attempts, self.attempts_call(id, *attempts))
            }
            Write::Finish {
                upstream,
                id,
                line,
                attempts,
                dead,
            } => (
                &scripts.finish,
                self.finish_call(upstream, id, line, *attempts, dead.as_deref(), None),
            ),
            Write::Release { upstream, ids } => {
                (&scripts.release, self.release_call(upstream, ids))
            }
        }
    }

    fn attempts_call(&self, id: &str, attempts: u32) -> redis::ScriptInvocation<'static> {
        let mut invocation = Scripts::get().attempts.prepare_invoke();
        invocation
            .key(self.keys.key("owner"))
            .key(self.keys.key("attempts"))
            .arg(&self.token)
            .arg(id)
            .arg(attempts);
        invocation
    }

    fn finish_call(
        &self,
        upstream: &str,
        id: &str,
        line: &str,
        attempts: u32,
        dead: Option<&DeadLetter>,
        callback: Option<&str>,
    ) -> redis::ScriptInvocation<'static> {
        let dead = dead
            .map(|d| serde_json::to_string(d).unwrap_or_default())
            .unwrap_or_default();
        let mut invocation = Scripts::get().finish.prepare_invoke();
        invocation
            .key(self.keys.key("results"))
            .key(self.keys.key("log"))
            .key(self.keys.key("dead"))
            .key(self.keys.key("attempts"))
            .key(self.keys.leases(upstream))
            .key(self.keys.pending(upstream))
            .key(self.keys.key("owner"))
            .key(self.keys.key("callbacks"))
            .arg(id)
            .arg(line)
            .arg(attempts)
            .arg(dead)
            .arg(callback.unwrap_or(""));
        invocation
    }

    fn release_call(&self, upstream: &str, ids: &[String]) -> redis::ScriptInvocation<'static> {
        let mut invocation = Scripts::get().release.prepare_invoke();
        invocation
            .key(self.keys.pending(upstream))
            .key(self.keys.leases(upstream))
            .key(self.keys.key("owner"))
            .key(self.keys.key("arrival"))
            .arg(&self.token)
            .arg(ids);
        invocation
    }

    /// A clone of the connection (they share one multiplexed connection).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A script call (EVALSHA, loading the script if Redis lacks it).
    async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, QueueError> {
        self.timed(invocation.invoke_async(&mut self.conn())).await
    }

    /// Any command, pipeline or script call, within the command timeout,
    /// its error in the queue's terms.
    async fn timed<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(&e)),
            Err(_) => Err(QueueError::Unavailable {
                url: self.url.clone(),
                reason: format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
            }),
        }
    }

    /// A Redis error: refused (asking again will not help) or unavailable.
    fn error(&self, e: &redis::RedisError) -> QueueError {
        if refused(e) {
            QueueError::Refused {
                queue: self.name.clone(),
                url: self.url.clone(),
                reason: e.to_string(),
            }
        } else {
            QueueError::Unavailable {
                url: self.url.clone(),
                reason: describe(e),
            }
        }
    }

    fn conflict(&self, id: &str, added: u64) -> QueueError {
        QueueError::Conflict {
            queue: self.name.clone(),
            url: self.url.clone(),
            id: id.to_string(),
            queued: if added == 0 {
                "nothing was queued; ".into()
            } else {
                // Only when another process queued the id between this
                // import's check and its write.
                format!("{added} job(s) of this file were queued before it was seen; ")
            },
        }
    }

    fn invalid(&self, message: String) -> QueueError {
        QueueError::Invalid {
            queue: self.name.clone(),
            url: self.url.clone(),
            message,
        }
    }
}

fn recorded(n: i64) -> Recorded {
    match n {
        1 => Recorded::New,
        2 => Recorded::Again,
        _ => Recorded::Other,
    }
}

/// Whether Redis answered with an error that asking again will not change:
/// a key of another type (WRONGTYPE), a script error, a reply of an
/// unexpected shape. Not: no connection, no answer in time, or a server
/// that is busy for now (loading its data, a long script, out of memory,
/// failing over, too many clients).
fn refused(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(kind) => match kind {
            ServerErrorKind::ResponseError => !e
                .detail()
                .is_some_and(|d| d.starts_with("max number of clients")),
            ServerErrorKind::ExecAbort
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NoPerm
            | ServerErrorKind::NotBusy
            | ServerErrorKind::NoSub => true,
            _ => false,
        },
        ErrorKind::Extension => !matches!(
            e.code(),
            Some("BUSY" | "OOM" | "MISCONF" | "NOREPLICAS" | "NOAUTH" | "WRONGPASS")
        ),
        ErrorKind::UnexpectedReturnType => true,
        _ => false,
    }
}

/// What went wrong talking to Redis, in words a user can act on.
fn describe(e: &redis::RedisError) -> String {
    let auth = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"));
    if auth {
        format!("authentication failed (check the user and password in [store] url): {e}")
    } else if e.is_connection_refusal() {
        format!("cannot connect ({e}); is redis-server running there?")
    } else if e.is_timeout() {
        format!("no answer in time ({e})")
    } else {
        e.to_string()
    }
}

/// The start of a stored text, for a message.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE) {
        Some((end, _)) => format!("{:?}...", &text[..end]),
        None => format!("{text:?}"),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
