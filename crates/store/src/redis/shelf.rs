//! A fleet's shared cache (`cache_store = "redis"`): the entries one
//! process keeps, every process on the same Redis serves, and a write
//! through any of them evicts what it changed in all of them.
//!
//! Entries are opaque bytes found by a 32-byte id the caller derives (the
//! method, URL and credential partition, hashed: no URL or credential is a
//! key name). Eviction cannot scan a fleet's entries, so it works by
//! guards instead: a write to path W takes the next value of the fleet's
//! write clock and sets it in `at:W` ("W and everything under it changed")
//! and in `sub:A` for W and each path A above it ("something at or under A
//! changed"). An entry at path P keeps the write clock of the moment its
//! read looked, and it is valid while `sub:P` and `at:A` of every path A
//! above P are no later. The same check refuses to keep an answer whose
//! call started before a write (its data may predate it).
//!
//! Guards expire no sooner than any entry kept so far (`life`, the longest
//! ttl + stale_if_error seen): an entry cannot outlive a guard it predates.

use super::{redacted, RedisError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tollgate_core::hex::hex_after;
use tollgate_core::policy::RedisSettings;

/// Paths deeper than this many segments are not kept (each level is a
/// guard a read checks; a hostile path must not make that unbounded).
pub const MAX_DEPTH: usize = 32;
/// After a failed connection, calls fail at once for this long instead
/// of each waiting for a connection of its own.
const RETRY_CONNECT_AFTER: Duration = Duration::from_secs(1);
/// At most one warning per this long while Redis fails.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// KEYS: the entry, the write clock, then its guards. Returns the entry's
/// bytes (or false) and the write clock now.
const LOOK: &str = r#"
local now = tonumber(redis.call('GET', KEYS[2]) or '0')
local kept = redis.call('HMGET', KEYS[1], 's', 'v')
if not kept[1] then return {false, now} end
local stamp = tonumber(kept[1])
if #KEYS > 2 then
  for _, w in ipairs(redis.call('MGET', unpack(KEYS, 3))) do
    if w and tonumber(w) > stamp then
      redis.call('DEL', KEYS[1])
      return {false, now}
    end
  end
end
return {kept[2], now}
"#;

/// KEYS: the entry, the longest life, then its guards. ARGV: the write
/// clock when its read looked, the bytes, the life in ms. Keeps nothing
/// (0) if a write came since.
const KEEP: &str = r#"
local stamp = tonumber(ARGV[1])
if #KEYS > 2 then
  for _, w in ipairs(redis.call('MGET', unpack(KEYS, 3))) do
    if w and tonumber(w) > stamp then return 0 end
  end
end
redis.call('HSET', KEYS[1], 's', ARGV[1], 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if tonumber(ARGV[3]) > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[3])
end
return 1
"#;

/// KEYS: the write clock, the longest life, then the guards to set. ARGV:
/// the shortest time to keep them, in ms (the caller's own longest life).
const WRITTEN: &str = r#"
local v = redis.call('INCR', KEYS[1])
local life = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[1]))
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], v, 'PX', life)
end
return v
"#;

/// The fleet's write clock when a read looked: what it fetches is kept
/// only if no write to its path came after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64);

#[derive(Debug)]
struct Scripts {
    look: redis::Script,
    keep: redis::Script,
    written: redis::Script,
}

/// One upstream's shared entries on Redis.
#[derive(Debug)]
pub struct SharedCache {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    scripts: Scripts,
    /// `{prefix}:cache:{namespace}:`
    keys: String,
    url: String,
    timeout: Duration,
    /// The caller's longest ttl + stale_if_error: guards last at least that.
    own_life: Duration,
    /// When a connection last failed, in ms since `started`.
    failed_at: AtomicU64,
    warned_at: AtomicU64,
    failures: AtomicU64,
    started: Instant,
}

impl SharedCache {
    /// The shared entries of `namespace` ("upstream:NAME") under `[store]`;
    /// connects on first use. `own_life`: the longest an entry of this
    /// process lives (ttl + stale_if_error).
    pub fn new(
        settings: &RedisSettings,
        namespace: &str,
        own_life: Duration,
    ) -> Result<SharedCache, RedisError> {
        let url = redacted(&settings.url);
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| RedisError::Config(format!("url '{url}' is not usable: {e}")))?;
        Ok(SharedCache {
            client,
            conn: OnceCell::new(),
            scripts: Scripts {
                look: redis::Script::new(LOOK),
                keep: redis::Script::new(KEEP),
                written: redis::Script::new(WRITTEN),
            },
            keys: format!("{}:cache:{namespace}:", settings.prefix),
            url,
            timeout: Duration::from_nanos(settings.timeout),
            own_life,
            failed_at: AtomicU64::new(u64::MAX),
            warned_at: AtomicU64::new(u64::MAX),
            failures: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// The entry `id` at `path` if it is kept and no write since evicted
    /// it, and the write clock now (for `keep`). `None` for a path deeper
    /// than `MAX_DEPTH`.
    pub async fn look(
        &self,
        id: &[u8; 32],
        path: &str,
    ) -> Result<Option<(Option<Vec<u8>>, Stamp)>, RedisError> {
        let Some(guards) = self.guards(path) else {
            return Ok(None);
        };
        let mut script = self.scripts.look.prepare_invoke();
        script.key(self.entry(id)).key(self.name("clock"));
        for guard in guards {
            script.key(guard);
        }
        let (value, now): (Option<Vec<u8>>, u64) = self
            .run(|mut conn| async move { script.invoke_async(&mut conn).await })
            .await?;
        Ok(Some((value, Stamp(now))))
    }

    /// Keep `value` as entry `id` at `path` for `life`, unless a write to
    /// the path came after `looked`. Whether it was kept.
    pub async fn keep(
        &self,
        id: &[u8; 32],
        path: &str,
        looked: Stamp,
        value: Vec<u8>,
        life: Duration,
    ) -> Result<bool, RedisError> {
        let Some(guards) = self.guards(path) else {
            return Ok(false);
        };
        let mut script = self.scripts.keep.prepare_invoke();
        script.key(self.entry(id)).key(self.name("life"));
        for guard in guards {
            script.key(guard);
        }
        script
            .arg(looked.0)
            .arg(value)
            .arg(life.as_millis().max(1) as u64);
        let kept: i64 = self
            .run(|mut conn| async move { script.invoke_async(&mut conn).await })
            .await?;
        Ok(kept == 1)
    }

    /// Drop entry `id` (a revalidation found it may no longer be kept).
    pub async fn forget(&self, id: &[u8; 32]) -> Result<(), RedisError> {
        let key = self.entry(id);
        self.run(|mut conn| async move {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|_| ())
    }

    /// A write to `path`: the entries at it, under it and above it go.
    pub async fn written(&self, path: &str) -> Result<(), RedisError> {
        let path = trimmed(path);
        let levels = levels(path);
        let mut guards: Vec<String> = levels
            .iter()
            .take(MAX_DEPTH + 1)
            .map(|level| self.guard("sub", level))
            .collect();
        if levels.len() <= MAX_DEPTH + 1 {
            guards.push(self.guard("at", path));
        }
        self.set_guards(guards).await
    }

    /// `POST /v1/cache/purge`: the entries at or under `prefix` go.
    pub async fn purged(&self, prefix: &str) -> Result<(), RedisError> {
        let prefix = trimmed(prefix);
        self.set_guards(vec![self.guard("sub", prefix), self.guard("at", prefix)])
            .await
    }

    async fn set_guards(&self, guards: Vec<String>) -> Result<(), RedisError> {
        let mut script = self.scripts.written.prepare_invoke();
        script.key(self.name("clock")).key(self.name("life"));
        for guard in guards {
            script.key(guard);
        }
        script.arg(self.own_life.as_millis().max(1) as u64);
        self.run(|mut conn| async move { script.invoke_async::<u64>(&mut conn).await })
            .await
            .map(|_| ())
    }

    /// What an entry at `path` is checked against: `at:` of every path
    /// above it and its own `sub:`.
    fn guards(&self, path: &str) -> Option<Vec<String>> {
        let path = trimmed(path);
        let levels = levels(path);
        if levels.len() > MAX_DEPTH + 1 {
            return None;
        }
        let (own, above) = levels.split_last()?;
        let mut guards: Vec<String> = above.iter().map(|a| self.guard("at", a)).collect();
        guards.push(self.guard("sub", own));
        Some(guards)
    }

    fn entry(&self, id: &[u8; 32]) -> String {
        hex_after(&format!("{}e:", self.keys), id)
    }

    fn guard(&self, kind: &str, path: &str) -> String {
        let hash: [u8; 32] = Sha256::digest(path.as_bytes()).into();
        hex_after(&format!("{}{kind}:", self.keys), &hash[..16])
    }

    fn name(&self, what: &str) -> String {
        format!("{}{what}", self.keys)
    }

    /// One call on the connection, within `[store] timeout`.
    async fn run<T, F>(&self, call: impl FnOnce(ConnectionManager) -> F) -> Result<T, RedisError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let done = tokio::time::timeout(self.timeout, async {
            let conn = self.connection().await?;
            call(conn)
                .await
                .map_err(|e| self.unavailable(e.to_string()))
        })
        .await;
        let result = done.unwrap_or_else(|_| {
            Err(self.unavailable(format!("no answer within {} ms", self.timeout.as_millis())))
        });
        if let Err(e) = &result {
            if self.conn.get().is_none() {
                self.failed_at.store(self.millis(), Ordering::Relaxed);
            }
            self.warn(e);
        }
        result
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        let failed = self.failed_at.load(Ordering::Relaxed);
        let now = self.millis();
        if failed != u64::MAX && now.saturating_sub(failed) < RETRY_CONNECT_AFTER.as_millis() as u64
        {
            return Err(self.unavailable("not connected (the last attempt failed)".into()));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_secs(1))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let connected = self
            .conn
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await;
        connected
            .cloned()
            .map_err(|e| self.unavailable(e.to_string()))
    }

    fn unavailable(&self, reason: String) -> RedisError {
        RedisError::Unavailable {
            url: self.url.clone(),
            reason,
        }
    }

    /// The cache goes on without the shared store (reads are called for,
    /// answers not kept); say so now and then, not per request.
    fn warn(&self, e: &RedisError) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.millis();
        let last = self.warned_at.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < WARN_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .warned_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                "shared cache: {e} ({failures} failed call(s) so far); reads go to the upstream meanwhile"
            );
        }
    }

    fn millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// A path without its trailing `/` (the root is "").
fn trimmed(path: &str) -> &str {
    path.trim_end_matches('/')
}

/// The root, each path above `path`, and `path` itself: "/a/b" gives
/// "", "/a", "/a/b".
fn levels(path: &str) -> Vec<&str> {
    let mut levels = vec![""];
    for (at, _) in path.match_indices('/').skip(1) {
        levels.push(&path[..at]);
    }
    if !path.is_empty() {
        levels.push(path);
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_run_from_the_root_to_the_path() {
        assert_eq!(levels(""), [""]);
        assert_eq!(levels("/a"), ["", "/a"]);
        assert_eq!(levels("/a/b/c"), ["", "/a", "/a/b", "/a/b/c"]);
    }
}
