//! The fleet's job queue in Redis: a thin adapter over the scripts in
//! `scripts`. It holds no state of its own beyond a connection and this
//! runner's token; what a job is and what becomes of it is decided by the
//! scheduler and the run, as with the SQLite state.

use super::scripts::Scripts;
use crate::job::{Job, Routed};
use crate::settings::RunnerConfig;
use crate::state::{Counts, DeadLetter};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::Duration;
use tollgate_core::policy::RedisSettings;

/// Jobs per script call when importing: a batch is all-or-none, and
/// small enough that Redis is never blocked for long.
const IMPORT_BATCH: usize = 500;
/// Most leases renewed or given back per script call.
const IDS_PER_CALL: usize = 1000;
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
    /// Its place in the queue (priority, then arrival): the scheduler's seq.
    pub seq: u64,
    pub attempts: u32,
    pub job: Job,
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
        let url = redact(&settings.url);
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

    /// This runner's lease token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Queue jobs. A job whose id is already queued with the same request
    /// is left as it is (every runner of a fleet imports the same file, and
    /// a re-run resumes); an id queued for a different request is an error,
    /// and then nothing is queued. Returns (added, already there).
    pub async fn import(
        &self,
        jobs: &[Routed],
        config: &RunnerConfig,
    ) -> Result<(u64, u64), QueueError> {
        let specs: Vec<String> = jobs
            .iter()
            .map(|r| serde_json::to_string(&r.job).unwrap_or_default())
            .collect();
        // First a read-only pass over everything, so a conflict anywhere
        // queues nothing. Each batch's script checks again before writing:
        // this pass only gives the all-or-nothing answer for the whole file.
        let jobs_key = self.keys.key("jobs");
        for (chunk, spec_chunk) in jobs.chunks(IMPORT_BATCH).zip(specs.chunks(IMPORT_BATCH)) {
            let ids: Vec<&str> = chunk.iter().map(|r| r.job.id.as_str()).collect();
            let before: Vec<Option<String>> = self
                .command(|mut c| {
                    let ids = ids.clone();
                    let key = jobs_key.clone();
                    async move {
                        redis::cmd("HMGET")
                            .arg(key)
                            .arg(ids)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            for ((routed, spec), before) in chunk.iter().zip(spec_chunk).zip(before) {
                if before.is_some_and(|b| b != *spec) {
                    return Err(self.conflict(&routed.job.id, 0));
                }
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
    /// pending. `n = 0` only reaps and counts.
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
            let id = text(&leased[0]);
            let job: Job = serde_json::from_str(&text(&leased[3]))
                .map_err(|e| self.invalid(format!("job '{id}' as stored cannot be read: {e}")))?;
            out.jobs.push(Leased {
                seq: text(&leased[1]).parse().unwrap_or(u64::MAX),
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
                .key(self.keys.key("results"))
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
            let mut invocation = Scripts::get().release.prepare_invoke();
            invocation
                .key(self.keys.pending(upstream))
                .key(self.keys.leases(upstream))
                .key(self.keys.key("owner"))
                .key(self.keys.key("arrival"))
                .arg(&self.token)
                .arg(chunk);
            let n: u64 = self.invoke(&invocation).await?;
            released += n;
        }
        Ok(released)
    }

    /// Note the attempts made on a job this runner holds.
    pub async fn record_attempts(&self, id: &str, attempts: u32) -> Result<(), QueueError> {
        let mut invocation = Scripts::get().attempts.prepare_invoke();
        invocation
            .key(self.keys.key("owner"))
            .key(self.keys.key("attempts"))
            .arg(&self.token)
            .arg(id)
            .arg(attempts);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    /// Record a job's final result (`line`, as in results.jsonl) and, when
    /// it is a dead letter, the dead letter. The first result recorded for
    /// a job is its only one.
    pub async fn finish(
        &self,
        upstream: &str,
        id: &str,
        line: &str,
        attempts: u32,
        dead: Option<&DeadLetter>,
    ) -> Result<Recorded, QueueError> {
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
            .arg(id)
            .arg(line)
            .arg(attempts)
            .arg(dead);
        let n: i64 = self.invoke(&invocation).await?;
        Ok(match n {
            1 => Recorded::New,
            2 => Recorded::Again,
            _ => Recorded::Other,
        })
    }

    /// The upstreams that have jobs in this queue.
    pub async fn upstreams(&self) -> Result<Vec<String>, QueueError> {
        let key = self.keys.key("upstreams");
        let mut names: Vec<String> = self
            .command(|mut c| {
                let key = key.clone();
                async move { c.smembers(key).await }
            })
            .await?;
        names.sort();
        Ok(names)
    }

    /// Jobs of `upstream` not finished: (pending, leased).
    pub async fn unfinished(&self, upstream: &str) -> Result<(u64, u64), QueueError> {
        let (pending, leases) = (self.keys.pending(upstream), self.keys.leases(upstream));
        self.command(|mut c| {
            let (pending, leases) = (pending.clone(), leases.clone());
            async move {
                redis::pipe()
                    .zcard(pending)
                    .zcard(leases)
                    .query_async(&mut c)
                    .await
            }
        })
        .await
    }

    /// Jobs in the queue: not finished (pending or leased), done, dead.
    pub async fn counts(&self) -> Result<Counts, QueueError> {
        let mut counts = Counts::default();
        for upstream in self.upstreams().await? {
            let (pending, leased) = self.unfinished(&upstream).await?;
            counts.pending += pending + leased;
        }
        let (results, dead) = (self.keys.key("results"), self.keys.key("dead"));
        let (finished, dead): (u64, u64) = self
            .command(|mut c| {
                let (results, dead) = (results.clone(), dead.clone());
                async move {
                    redis::pipe()
                        .hlen(results)
                        .hlen(dead)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        counts.done = finished.saturating_sub(dead);
        counts.dead = dead;
        Ok(counts)
    }

    /// Every dead letter, in queue order.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let key = self.keys.key("dead");
        let all: HashMap<String, String> = self
            .command(|mut c| {
                let key = key.clone();
                async move { c.hgetall(key).await }
            })
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
        let key = self.keys.key("dead");
        let text: Option<String> = self
            .command(|mut c| {
                let key = key.clone();
                let id = id.to_string();
                async move { c.hget(key, id).await }
            })
            .await?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| self.invalid(format!("dead letter '{id}' cannot be read: {e}")))
        })
        .transpose()
    }

    /// A job's state (pending, leased, done or dead), if the id is queued.
    pub async fn job_state(&self, id: &str) -> Result<Option<String>, QueueError> {
        let keys = [
            self.keys.key("jobs"),
            self.keys.key("results"),
            self.keys.key("dead"),
            self.keys.key("owner"),
        ];
        let (job, result, dead, owner): (bool, bool, bool, bool) = self
            .command(|mut c| {
                let keys = keys.clone();
                let id = id.to_string();
                async move {
                    let mut pipe = redis::pipe();
                    for key in keys {
                        pipe.hexists(key, &id);
                    }
                    pipe.query_async(&mut c).await
                }
            })
            .await?;
        Ok(match (job, result, dead, owner) {
            (false, ..) => None,
            (_, _, true, _) => Some("dead".into()),
            (_, true, _, _) => Some("done".into()),
            (_, _, _, true) => Some("leased by a runner".into()),
            _ => Some("pending".into()),
        })
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
        let key = self.keys.key("upstream");
        let upstreams: Vec<Option<String>> = self
            .command(|mut c| {
                let key = key.clone();
                let targets = targets.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg(targets)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
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
        let (log, results) = (self.keys.key("log"), self.keys.key("results"));
        let order: Vec<String> = self
            .command(|mut c| {
                let log = log.clone();
                async move { c.lrange(log, 0, -1).await }
            })
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
        let mut lines = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_CALL) {
            let got: Vec<Option<String>> = self
                .command(|mut c| {
                    let results = results.clone();
                    let chunk: Vec<String> = chunk.iter().map(|s| s.to_string()).collect();
                    async move {
                        redis::cmd("HMGET")
                            .arg(results)
                            .arg(chunk)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            lines.extend(got.into_iter().flatten());
        }
        Ok(lines)
    }

    /// Each id's place in the queue (priority, then arrival).
    async fn arrivals(&self, ids: &[String]) -> Result<HashMap<String, u64>, QueueError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let key = self.keys.key("arrival");
        let scores: Vec<Option<u64>> = self
            .command(|mut c| {
                let key = key.clone();
                let ids = ids.to_vec();
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg(ids)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(ids
            .iter()
            .zip(scores)
            .filter_map(|(id, s)| s.map(|s| (id.clone(), s)))
            .collect())
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, QueueError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(COMMAND_TIMEOUT, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// One command (or pipeline) on a clone of the connection, within the
    /// command timeout.
    async fn command<T, F, Fut>(&self, f: F) -> Result<T, QueueError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(COMMAND_TIMEOUT, f(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn unavailable(&self, e: &redis::RedisError) -> QueueError {
        QueueError::Unavailable {
            url: self.url.clone(),
            reason: describe(e),
        }
    }

    fn timed_out(&self) -> QueueError {
        QueueError::Unavailable {
            url: self.url.clone(),
            reason: format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
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

/// `redis://user:secret@host` as `redis://user:***@host`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
