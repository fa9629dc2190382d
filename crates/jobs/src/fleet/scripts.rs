//! The fleet queue's Lua scripts. Every change that touches more than one
//! key, or reads before it writes, is one script: Redis runs a script
//! alone, so two runners can never both lease a job, both record its final
//! result, or see a half-imported batch. (A client that read, then wrote,
//! would race: the lease or result it checked could change in between.)
//!
//! Keys are declared in KEYS (never built inside a script); `Q` below is
//! `{prefix}:queue:{name}` and `U` an upstream's name. Instants are Redis
//! server time in milliseconds (`TIME`), so runners with skewed clocks
//! agree on when a lease expires.
//!
//! Scores in the pending sets are `rank * 1e12 + arrival`: rank 0 (high),
//! 1 (normal), 2 (low), then the order of import. The lowest score is the
//! next job to lease.

/// Shared by the scripts that look at leases: `now_ms()` from the server's
/// clock, and `reap(pending, leases, owner, arrival, now)`, which returns
/// every expired lease's job to the pending set under its original score.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reap(pending, leases, owner, arrival, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, id in ipairs(expired) do
    redis.call('ZREM', leases, id)
    redis.call('HDEL', owner, id)
    local score = redis.call('HGET', arrival, id)
    if score then
      redis.call('ZADD', pending, score, id)
    end
  end
  return #expired
end
"#;

/// Shared by the scripts that compare jobs about to be queued with what is
/// queued: `first_conflict(jobs, from, stride)` walks ARGV from `from` in
/// steps of `stride`, where each step starts with an id and ends with its
/// job JSON, and returns the first id queued (in `jobs`) with another JSON.
const CONFLICT: &str = r#"
local function first_conflict(jobs, from, stride)
  for i = from, #ARGV, stride do
    local before = redis.call('HGET', jobs, ARGV[i])
    if before and before ~= ARGV[i + stride - 1] then
      return ARGV[i]
    end
  end
  return nil
end
"#;

/// Find the first id already queued for a different request, writing
/// nothing: an import checks its whole file with it before queuing any of
/// it. (The jobs go up, rather than every stored job coming down.)
///
/// KEYS: 1 `Q:jobs`
/// ARGV: per job two values: id, job JSON
/// Returns that id, or nil when there is none.
const CHECK: &str = r#"
return first_conflict(KEYS[1], 1, 2)
"#;

/// Queue jobs of one upstream, all or none of this batch.
///
/// KEYS: 1 `Q:jobs`, 2 `Q:upstream`, 3 `Q:arrival`, 4 `Q:seq`,
///       5 `Q:upstreams`, 6 `Q:pending:U`
/// ARGV: 1 U, then per job three values: id, priority rank (0..2), job JSON
/// Returns `{added, already}`, or `{-1, id}` when an id is already queued
/// for a different request (then nothing of this batch is written).
const IMPORT: &str = r#"
local conflict = first_conflict(KEYS[1], 2, 3)
if conflict then
  return {-1, conflict}
end
local n = (#ARGV - 1) / 3
local added = 0
for i = 0, n - 1 do
  local id = ARGV[2 + i * 3]
  if redis.call('HSETNX', KEYS[1], id, ARGV[4 + i * 3]) == 1 then
    local seq = redis.call('INCR', KEYS[4])
    local score = string.format('%.0f', tonumber(ARGV[3 + i * 3]) * 1e12 + seq)
    redis.call('HSET', KEYS[2], id, ARGV[1])
    redis.call('HSET', KEYS[3], id, score)
    redis.call('ZADD', KEYS[6], score, id)
    added = added + 1
  end
end
if added > 0 then
  redis.call('SADD', KEYS[5], ARGV[1])
end
return {added, n - added}
"#;

/// Lease up to N of an upstream's pending jobs, best score first, after
/// returning expired leases to pending.
///
/// KEYS: 1 `Q:pending:U`, 2 `Q:leases:U`, 3 `Q:owner`, 4 `Q:arrival`,
///       5 `Q:jobs`, 6 `Q:attempts`
/// ARGV: 1 the runner's token, 2 N (0: only reap and count), 3 lease length (ms)
/// Returns `{pending left, leased in all, reaped, id, score, attempts, job
/// JSON, id, ...}`.
const LEASE: &str = r#"
local now = now_ms()
local reaped = reap(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now)
local want = tonumber(ARGV[2])
local out = {0, 0, reaped}
if want > 0 then
  local ids = redis.call('ZRANGE', KEYS[1], 0, want - 1, 'WITHSCORES')
  local expiry = now + tonumber(ARGV[3])
  for i = 1, #ids, 2 do
    local id = ids[i]
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], expiry, id)
    redis.call('HSET', KEYS[3], id, ARGV[1])
    table.insert(out, id)
    table.insert(out, ids[i + 1])
    table.insert(out, redis.call('HGET', KEYS[6], id) or '0')
    table.insert(out, redis.call('HGET', KEYS[5], id) or '')
  end
end
out[1] = redis.call('ZCARD', KEYS[1])
out[2] = redis.call('ZCARD', KEYS[2])
return out
"#;

/// Extend this runner's leases. A job whose lease expired but that no one
/// took yet (still pending) is taken back; one that another runner holds,
/// or that has its final result (finish takes it out of pending and
/// leases), is lost to this runner.
///
/// KEYS: 1 `Q:pending:U`, 2 `Q:leases:U`, 3 `Q:owner`
/// ARGV: 1 the runner's token, 2 lease length (ms), 3.. ids
/// Returns the ids lost.
const RENEW: &str = r#"
local now = now_ms()
local expiry = now + tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local owner = redis.call('HGET', KEYS[3], id)
  if owner == ARGV[1] then
    redis.call('ZADD', KEYS[2], expiry, id)
  elseif (not owner) and redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], expiry, id)
    redis.call('HSET', KEYS[3], id, ARGV[1])
  else
    table.insert(lost, id)
  end
end
return lost
"#;

/// Give leased jobs back (a runner that stops before finishing them), so
/// another runner need not wait for the leases to expire.
///
/// KEYS: 1 `Q:pending:U`, 2 `Q:leases:U`, 3 `Q:owner`, 4 `Q:arrival`
/// ARGV: 1 the runner's token, 2.. ids
/// Returns how many were given back.
const RELEASE: &str = r#"
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[1] then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    local score = redis.call('HGET', KEYS[4], id)
    if score then
      redis.call('ZADD', KEYS[1], score, id)
    end
    n = n + 1
  end
end
return n
"#;

/// Note the attempts made on a job this runner holds (a runner that takes
/// it over goes on counting from there).
///
/// KEYS: 1 `Q:owner`, 2 `Q:attempts`
/// ARGV: 1 the runner's token, 2 id, 3 attempts
/// Returns 1, or 0 when the job is no longer this runner's.
const ATTEMPTS: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[2]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"#;

/// Record a job's final result: the first one recorded wins, whichever
/// runner sends it, so every job has exactly one.
///
/// KEYS: 1 `Q:results`, 2 `Q:log`, 3 `Q:dead`, 4 `Q:attempts`,
///       5 `Q:leases:U`, 6 `Q:pending:U`, 7 `Q:owner`, 8 `Q:callbacks`
/// ARGV: 1 id, 2 the results.jsonl line, 3 attempts, 4 the dead letter's
///       JSON ("" when done), 5 its callback to deliver, as JSON ("" for
///       none): kept with the result, until delivered
/// Returns 1 recorded; 2 this very line was already recorded (a retried
/// write whose first reply was lost); 0 another result was recorded first.
const FINISH: &str = r#"
local before = redis.call('HGET', KEYS[1], ARGV[1])
if before then
  if before == ARGV[2] then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
end
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
if ARGV[5] and ARGV[5] ~= '' then
  redis.call('HSET', KEYS[8], ARGV[1], ARGV[5])
end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
return 1
"#;

/// Queue dead letters of one upstream again, with a fresh attempt count.
///
/// KEYS: 1 `Q:dead`, 2 `Q:results`, 3 `Q:attempts`, 4 `Q:pending:U`,
///       5 `Q:arrival`, 6 `Q:upstream`
/// ARGV: 1 U, 2.. ids
/// Returns the ids queued again (the others are not dead letters of U).
const REQUEUE: &str = r#"
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], id) == 1 and redis.call('HGET', KEYS[6], id) == ARGV[1] then
    redis.call('HDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[5], id), id)
    table.insert(out, id)
  end
end
return out
"#;

/// The scripts, loaded once per process (EVALSHA; the redis crate loads a
/// script again when a restarted server answers NOSCRIPT).
#[derive(Debug)]
pub struct Scripts {
    pub check: redis::Script,
    pub import: redis::Script,
    pub lease: redis::Script,
    pub renew: redis::Script,
    pub release: redis::Script,
    pub attempts: redis::Script,
    pub finish: redis::Script,
    pub requeue: redis::Script,
}

impl Scripts {
    pub fn get() -> &'static Scripts {
        static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
        SCRIPTS.get_or_init(|| Scripts {
            check: redis::Script::new(&format!("{CONFLICT}{CHECK}")),
            import: redis::Script::new(&format!("{CONFLICT}{IMPORT}")),
            lease: redis::Script::new(&format!("{PRELUDE}{LEASE}")),
            renew: redis::Script::new(&format!("{PRELUDE}{RENEW}")),
            release: redis::Script::new(RELEASE),
            attempts: redis::Script::new(ATTEMPTS),
            finish: redis::Script::new(FINISH),
            requeue: redis::Script::new(REQUEUE),
        })
    }
}
