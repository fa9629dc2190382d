//! A cache for the reads the comply face relays: what RFC 9111 lets a
//! shared cache store and for how long, entries partitioned by the
//! credential that fetched them and bounded in bytes, and the calls in
//! flight that identical reads share (coalescing).
//!
//! Time is the caller's clock (`Nanos`), so tests move it instead of
//! sleeping; the store only bounds memory.

use bytes::Bytes;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AGE, CACHE_CONTROL, DATE, ETAG, EXPIRES, LAST_MODIFIED,
    VARY,
};
use hyper::StatusCode;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tollgate_core::Nanos;
use tollgate_store::redis::{SharedCache, Stamp};

/// On every answer of a cached route: where it came from.
pub static TOLLGATE_CACHE: HeaderName = HeaderName::from_static("tollgate-cache");

/// What an entry costs beyond its body and headers (the key, the map's
/// slot, the bookkeeping): counted against `max_bytes`, so the bound holds
/// for many small entries too.
const ENTRY_OVERHEAD: usize = 256;
/// The largest `Age` taken (RFC 9111 1.2.2: 2^31 seconds).
const MAX_AGE_SECONDS: u64 = 1 << 31;

/// `[[upstream.cache]]`: reads under a path prefix, kept for a while.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheRoute {
    /// Paths at or under this (at a segment boundary; one ending in `/`
    /// covers everything after it).
    pub path_prefix: String,
    /// `GET`, `HEAD`, or both (upper case).
    pub methods: Vec<String>,
    /// The longest an entry is served fresh.
    pub ttl: Duration,
    /// What the route's entries hold in all: bodies, headers, and 256
    /// bytes each (so it bounds how many there are, too).
    pub max_bytes: u64,
    /// The largest body kept (a larger one is relayed, not kept).
    pub max_entry_bytes: u64,
    /// Keep for `ttl` whatever the response's caching headers say.
    pub override_headers: bool,
    /// How long past its freshness an entry may still be served when the
    /// upstream fails (5xx, no answer) or its breaker is open.
    pub stale_if_error: Duration,
}

impl CacheRoute {
    /// How long an entry may be used at all: fresh, then stale for
    /// `stale_if_error`.
    pub fn life(&self) -> Duration {
        self.ttl.saturating_add(self.stale_if_error)
    }

    /// Whether a request with this method and (upstream) path is one of
    /// this route's reads.
    pub fn reads(&self, method: &str, path: &str) -> bool {
        self.methods.iter().any(|m| m == method) && self.covers(path)
    }

    /// Whether `path` is at or under the route's prefix.
    pub fn covers(&self, path: &str) -> bool {
        let prefix = self.path_prefix.as_str();
        if prefix.ends_with('/') {
            return path.starts_with(prefix);
        }
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// The `Cache-Control` directives that decide storing and freshness.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    /// `must-revalidate` or `proxy-revalidate`: never served stale.
    pub must_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
}

/// The directives of every `Cache-Control` line. Names are case-blind; a
/// qualified `private="..."` or `no-cache="..."` counts as the plain one
/// (the safer reading); a malformed `max-age` is ignored.
pub fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split(',') {
            let (name, arg) = match part.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (part.trim(), None),
            };
            let seconds = || arg.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "max-age" => d.max_age = seconds().or(d.max_age),
                "s-maxage" => d.s_maxage = seconds().or(d.s_maxage),
                _ => {}
            }
        }
    }
    d
}

/// Statuses a cache may store without being told (RFC 9110's heuristically
/// cacheable ones); a 429 or a 5xx never is.
fn cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// How long a response may be served fresh, or None when it may not be
/// kept: RFC 9111's rules for a shared cache (`no-store` on either side,
/// `private`, `Vary: *`; `s-maxage`, then `max-age`, then `Expires` less
/// `Age`, never past the route's `ttl`; `no-cache` keeps it only to
/// revalidate), or the route's `ttl` alone when it overrides them. A
/// response that sets a cookie is never kept: the cookie is its caller's.
pub fn freshness(
    route: &CacheRoute,
    status: StatusCode,
    request: &HeaderMap,
    response: &HeaderMap,
    now: SystemTime,
) -> Option<Duration> {
    if !cacheable_status(status)
        || directives(request).no_store
        || response.contains_key(hyper::header::SET_COOKIE)
    {
        return None;
    }
    if route.override_headers {
        return Some(route.ttl);
    }
    let d = directives(response);
    if d.no_store || d.private || varies_on_everything(response) {
        return None;
    }
    let lifetime = match d.s_maxage.or(d.max_age) {
        Some(seconds) => Some(Duration::from_secs(seconds)),
        None => response.get(EXPIRES).map(|expires| {
            // An Expires that cannot be read is in the past (RFC 9111 5.3).
            let expires = date(expires).unwrap_or(SystemTime::UNIX_EPOCH);
            let date = response.get(DATE).and_then(date).unwrap_or(now);
            expires.duration_since(date).unwrap_or_default()
        }),
    };
    let age = Duration::from_secs(age_of(response));
    let ttl = match lifetime {
        Some(lifetime) => lifetime.saturating_sub(age).min(route.ttl),
        None => route.ttl,
    };
    let ttl = if d.no_cache { Duration::ZERO } else { ttl };
    let revalidates = response.contains_key(ETAG) || response.contains_key(LAST_MODIFIED);
    (!ttl.is_zero() || revalidates).then_some(ttl)
}

/// `Vary: *`, or a name that is no header name (which no request could
/// be matched on).
fn varies_on_everything(response: &HeaderMap) -> bool {
    vary_names(response).any(|n| n == "*" || HeaderName::from_bytes(n.as_bytes()).is_err())
}

/// The `Age` a response came with, in seconds (at most 2^31).
fn age_of(headers: &HeaderMap) -> u64 {
    headers
        .get(AGE)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map_or(0, |age| age.min(MAX_AGE_SECONDS))
}

/// A response's headers less those that tell of the quota when it was
/// made (`RateLimit`, `RateLimit-Policy`, `X-RateLimit-*`, a vendor's own
/// such as `X-HubSpot-RateLimit-Daily-Remaining`, `Retry-After`):
/// an answer served again spent none, and what they said is stale.
fn without_quota_headers(mut headers: HeaderMap) -> HeaderMap {
    let quota: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let n = n.as_str();
            n.contains("ratelimit") || n.contains("rate-limit")
        })
        .cloned()
        .collect();
    for name in quota {
        headers.remove(name);
    }
    headers.remove(hyper::header::RETRY_AFTER);
    headers
}

/// Every value of `name` in `headers`, in order.
fn values(headers: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    headers.get_all(name).iter().cloned().collect()
}

fn vary_names(response: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    response
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

fn date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

/// Who fetched an entry: a digest of the proxy client's name and the
/// credentials its call carried. An entry is served only within its
/// partition, so one tenant's response never reaches another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition(pub(crate) [u8; 32]);

impl Partition {
    /// Each part is length-prefixed, so ("ab", "c") and ("a", "bc") differ.
    pub fn of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Partition {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for part in parts {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        Partition(hash.finalize().into())
    }
}

/// What an entry is found by: the method, the whole URL sent upstream, and
/// the partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub method: String,
    pub url: String,
    pub partition: Partition,
}

impl Key {
    /// Its name in the fleet's shared cache: a hash, so neither the URL
    /// nor anything of the credential is a Redis key.
    pub fn id(&self) -> [u8; 32] {
        let parts: [&[u8]; 3] = [
            self.method.as_bytes(),
            self.url.as_bytes(),
            &self.partition.0,
        ];
        Partition::of(parts).0
    }
}

/// A response kept whole.
#[derive(Debug, Clone)]
pub struct Stored {
    pub status: StatusCode,
    /// The upstream's end-to-end headers.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request headers the response varies on, and their values then
    /// (every line of each).
    pub vary: Vec<(HeaderName, Vec<HeaderValue>)>,
    /// When it was received, and until when it is fresh (caller's clock).
    pub stored_at: Nanos,
    pub fresh_until: Nanos,
    /// The `Age` it came with, in seconds.
    pub age_then: u64,
}

impl Stored {
    /// A response as received for `request` at `now`, fresh for `ttl`.
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        request: &HeaderMap,
        ttl: Duration,
        now: Nanos,
    ) -> Stored {
        let headers = without_quota_headers(headers);
        let vary = vary_names(&headers)
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .map(|n| {
                let value = values(request, &n);
                (n, value)
            })
            .collect();
        let age_then = age_of(&headers);
        Stored {
            status,
            headers,
            body,
            vary,
            stored_at: now,
            fresh_until: now.saturating_add(ttl.as_nanos() as Nanos),
            age_then,
        }
    }

    /// Whether it answers `request`: the headers it varies on are the same.
    pub fn matches(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, then)| request.get_all(name).iter().eq(then.iter()))
    }

    /// Whether it answers `request` at `now` without a call: fresh, and
    /// alike in what it varies on.
    pub fn answers(&self, request: &HeaderMap, now: Nanos) -> bool {
        self.is_fresh(now) && self.matches(request)
    }

    pub fn is_fresh(&self, now: Nanos) -> bool {
        now < self.fresh_until
    }

    /// Whether it may be served stale at `now`, `stale_if_error` past
    /// its freshness.
    pub fn within_stale(&self, now: Nanos, stale_if_error: Duration) -> bool {
        now < self
            .fresh_until
            .saturating_add(stale_if_error.as_nanos() as Nanos)
    }

    /// The validators a conditional request sends: `If-None-Match` from
    /// the `ETag`, `If-Modified-Since` from `Last-Modified`.
    pub fn conditions(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        if let Some(etag) = self.headers.get(ETAG) {
            out.push((hyper::header::IF_NONE_MATCH, etag.clone()));
        }
        if let Some(modified) = self.headers.get(LAST_MODIFIED) {
            out.push((hyper::header::IF_MODIFIED_SINCE, modified.clone()));
        }
        out
    }

    pub fn revalidates(&self) -> bool {
        !self.conditions().is_empty()
    }

    /// After a 304: the stored response with the 304's headers in place of
    /// its own (RFC 9111 4.3.4), fresh again for `ttl`.
    pub fn refreshed(&self, not_modified: &HeaderMap, ttl: Duration, now: Nanos) -> Stored {
        let mut headers = self.headers.clone();
        for name in not_modified.keys() {
            if name == hyper::header::CONTENT_LENGTH {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        // Just validated: its age is the 304's (none: the origin's own).
        if !not_modified.contains_key(AGE) {
            headers.remove(AGE);
        }
        let age_then = age_of(not_modified);
        Stored {
            headers,
            stored_at: now,
            fresh_until: now.saturating_add(ttl.as_nanos() as Nanos),
            age_then,
            ..self.clone()
        }
    }

    /// The same, fresh for `ttl` from `now`.
    pub fn fresh_for(&self, ttl: Duration, now: Nanos) -> Stored {
        Stored {
            fresh_until: now.saturating_add(ttl.as_nanos() as Nanos),
            ..self.clone()
        }
    }

    /// Its `Age` at `now`, in seconds.
    pub fn age(&self, now: Nanos) -> u64 {
        self.age_then
            .saturating_add(now.saturating_sub(self.stored_at) / 1_000_000_000)
    }

    /// What it costs the route's `max_bytes`.
    pub fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.iter().map(HeaderValue::len).sum::<usize>())
            .sum();
        u32::try_from(self.body.len() + headers + vary + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
    }

    /// As kept in the fleet's shared cache: a version tag, the status, the
    /// three instants, the headers and the varied request headers (each a
    /// length-prefixed name and values), then the body, length-prefixed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight() as usize);
        out.extend_from_slice(SHARED_FORMAT);
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        for instant in [self.stored_at, self.fresh_until, self.age_then] {
            out.extend_from_slice(&instant.to_be_bytes());
        }
        let lines: Vec<_> = (self.headers.keys())
            .map(|n| (n, self.headers.get_all(n).iter().collect::<Vec<_>>()))
            .collect();
        put_lines(&mut out, &lines);
        let vary: Vec<_> = (self.vary.iter())
            .map(|(n, values)| (n, values.iter().collect::<Vec<_>>()))
            .collect();
        put_lines(&mut out, &vary);
        put_u32(&mut out, self.body.len());
        out.extend_from_slice(&self.body);
        out
    }

    /// What `encode` wrote; `None` for anything else (another version's
    /// format, a damaged value): the read then calls instead.
    pub fn decode(bytes: &[u8]) -> Option<Stored> {
        let mut r = Reader(bytes.strip_prefix(SHARED_FORMAT)?);
        let status = StatusCode::from_u16(u16::from_be_bytes(r.take(2)?.try_into().ok()?)).ok()?;
        let mut instant = || Some(u64::from_be_bytes(r.take(8)?.try_into().ok()?));
        let (stored_at, fresh_until, age_then) = (instant()?, instant()?, instant()?);
        let mut groups = [Vec::new(), Vec::new()];
        for group in &mut groups {
            for _ in 0..r.u32()? {
                let len = r.u32()?;
                let name = HeaderName::from_bytes(r.take(len)?).ok()?;
                let mut values = Vec::new();
                for _ in 0..r.u32()? {
                    let len = r.u32()?;
                    values.push(HeaderValue::from_bytes(r.take(len)?).ok()?);
                }
                group.push((name, values));
            }
        }
        let [lines, vary] = groups;
        let mut headers = HeaderMap::new();
        for (name, values) in lines {
            for value in values {
                headers.append(name.clone(), value);
            }
        }
        let len = r.u32()?;
        let body = r.take(len).filter(|_| r.0.is_empty())?;
        Some(Stored {
            status,
            headers,
            body: Bytes::copy_from_slice(body),
            vary,
            stored_at,
            fresh_until,
            age_then,
        })
    }
}

/// The version of `Stored::encode`'s format.
const SHARED_FORMAT: &[u8] = b"tollgate-cache 1\n";

/// Each header's name and its values, length-prefixed.
fn put_lines(out: &mut Vec<u8>, lines: &[(&HeaderName, Vec<&HeaderValue>)]) {
    put_u32(out, lines.len());
    for (name, values) in lines {
        put_u32(out, name.as_str().len());
        out.extend_from_slice(name.as_str().as_bytes());
        put_u32(out, values.len());
        for value in values {
            put_u32(out, value.len());
            out.extend_from_slice(value.as_bytes());
        }
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

/// Reads `Stored::encode`'s fields in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }

    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
}

/// How a flight of identical reads ended, for those who waited on it.
#[derive(Debug, Clone)]
pub enum Landed {
    /// The leader's response, read whole (kept or not).
    Response(Arc<Stored>),
    /// A stale entry, served for the upstream's failure.
    Stale(Arc<Stored>),
    /// Nothing to share (the body was too large to keep, tollgate refused
    /// the leader, or it went away): each follower calls on its own.
    Alone,
}

/// A read's place in its flight.
#[derive(Debug)]
pub enum Flight {
    /// Nobody is fetching it: this request does, and lands the flight.
    Lead(Leader),
    /// Another request is fetching it: wait for what it lands.
    Follow(watch::Receiver<Option<Landed>>),
}

/// A flight: a route, the route's epoch (a write starts a new one), a key.
type FlightId = (usize, u64, Key);
type Landings = Mutex<HashMap<FlightId, watch::Receiver<Option<Landed>>>>;

/// Requests in flight that others may wait on.
#[derive(Debug, Default)]
pub struct Flights(Arc<Landings>);

impl Flights {
    /// Join the flight fetching `key` (under `route`, in `epoch`), or
    /// lead a new one.
    pub fn join(&self, route: usize, epoch: u64, key: &Key) -> Flight {
        let mut flights = self.0.lock();
        let id = (route, epoch, key.clone());
        if let Some(rx) = flights.get(&id) {
            return Flight::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(id.clone(), rx);
        Flight::Lead(Leader {
            flights: self.0.clone(),
            id: Some(id),
            tx,
        })
    }
}

/// The request that fetches for a flight. Dropped without landing (its
/// task failed), the flight lands `Alone`: followers never hang.
#[derive(Debug)]
pub struct Leader {
    flights: Arc<Landings>,
    id: Option<FlightId>,
    tx: watch::Sender<Option<Landed>>,
}

impl Leader {
    pub fn land(mut self, landed: Landed) {
        self.finish(landed);
    }

    fn finish(&mut self, landed: Landed) {
        if let Some(id) = self.id.take() {
            // Off the map first: a read arriving after this starts anew
            // (or finds the entry kept).
            self.flights.lock().remove(&id);
            let _ = self.tx.send(Some(landed));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.finish(Landed::Alone);
    }
}

/// Counts of one route, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    pub entries: u64,
    pub bytes: u64,
}

impl std::iter::Sum for Size {
    fn sum<I: Iterator<Item = Size>>(sizes: I) -> Size {
        sizes.fold(Size::default(), |a, b| Size {
            entries: a.entries + b.entries,
            bytes: a.bytes + b.bytes,
        })
    }
}

/// `cache_store`: where an upstream's entries are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheStore {
    /// In this process (the default).
    #[default]
    Memory,
    /// In the fleet's Redis (`[store] kind = "redis"`): what one process
    /// keeps, all serve, and a write through any evicts in all.
    Redis,
}

/// The fleet's shared entries of `upstream`'s routes.
pub fn shared_store(
    routes: &[CacheRoute],
    settings: &tollgate_core::policy::RedisSettings,
    upstream: &str,
) -> Result<SharedCache, tollgate_store::redis::RedisError> {
    let longest = routes.iter().map(CacheRoute::life).max();
    SharedCache::new(
        settings,
        &format!("upstream:{upstream}"),
        longest.unwrap_or_default(),
    )
}

/// When a read looked: a write (here, or in the fleet) after it means its
/// answer is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    /// The route's epoch in this process.
    local: u64,
    /// The fleet's write clock (shared store only; `None` when Redis did
    /// not answer: then nothing is kept there).
    fleet: Option<Stamp>,
}

/// What a read found: the entry kept for its key (fresh or not, alike in
/// what it varies on or not), and when it looked.
#[derive(Debug)]
pub struct Look {
    pub kept: Option<Arc<Stored>>,
    pub epoch: Epoch,
}

/// An upstream's cache: a store per route (or the fleet's, shared), and
/// the flights in progress.
pub struct Cache {
    routes: Vec<(CacheRoute, moka::sync::Cache<Key, Arc<Stored>>)>,
    /// Per route, bumped by each write or purge that touches it: a read
    /// that started before keeps nothing (`put`) and shares no flight with
    /// reads after.
    epochs: Vec<AtomicU64>,
    flights: Flights,
    /// `cache_store = "redis"`: entries are kept there instead (the
    /// per-route stores stay empty; flights are still this process's).
    shared: Option<SharedCache>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field(
                "routes",
                &self.routes.iter().map(|(r, _)| r).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Cache {
    pub fn new(routes: &[CacheRoute]) -> Cache {
        let routes = routes
            .iter()
            .map(|route| {
                let store = moka::sync::Cache::builder()
                    .max_capacity(route.max_bytes)
                    .weigher(|key: &Key, stored: &Arc<Stored>| {
                        let key =
                            u32::try_from(key.url.len() + key.method.len()).unwrap_or(u32::MAX);
                        stored.weight().saturating_add(key)
                    })
                    // Past its ttl and stale_if_error an entry can serve
                    // only to revalidate; then it goes (in real time: this
                    // bounds memory, freshness is the caller's clock).
                    .time_to_live(route.life())
                    .support_invalidation_closures()
                    .build();
                (route.clone(), store)
            })
            .collect::<Vec<_>>();
        Cache {
            epochs: routes.iter().map(|_| AtomicU64::new(0)).collect(),
            routes,
            flights: Flights::default(),
            shared: None,
        }
    }

    /// A cache whose entries the fleet shares through Redis.
    pub fn shared(routes: &[CacheRoute], store: SharedCache) -> Cache {
        Cache {
            shared: Some(store),
            ..Cache::new(routes)
        }
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The entry kept for `key` and the epoch now (from Redis for a shared
    /// cache: one round trip; if it fails, nothing is found or kept).
    pub async fn look(&self, route: usize, key: &Key) -> Look {
        let local = self.epoch(route);
        let Some(shared) = &self.shared else {
            return Look {
                kept: self.get(route, key),
                epoch: Epoch { local, fleet: None },
            };
        };
        let (kept, fleet) = match shared.look(&key.id(), &url_path(&key.url)).await {
            Ok(Some((value, stamp))) => (value.and_then(|v| Stored::decode(&v)), Some(stamp)),
            Ok(None) | Err(_) => (None, None),
        };
        Look {
            kept: kept.map(Arc::new),
            epoch: Epoch { local, fleet },
        }
    }

    /// The entry that answers `request` now without a call (`fresh`,
    /// through the shared store when there is one).
    pub async fn fresh_now(
        &self,
        route: usize,
        key: &Key,
        request: &HeaderMap,
        now: Nanos,
    ) -> Option<Arc<Stored>> {
        (self.look(route, key).await.kept).filter(|s| s.answers(request, now))
    }

    /// `put`, into the shared store when there is one (awaited: when the
    /// answer goes out, every process of the fleet can serve it).
    pub async fn keep(&self, route: usize, key: Key, stored: Arc<Stored>, epoch: Epoch) {
        let Some(shared) = &self.shared else {
            return self.put(route, key, stored, epoch.local);
        };
        let (Some(r), Some(looked)) = (self.routes.get(route), epoch.fleet) else {
            return;
        };
        if stored.body.len() as u64 > r.0.max_entry_bytes || self.epoch(route) != epoch.local {
            return;
        }
        let path = url_path(&key.url);
        let _ = (shared.keep(&key.id(), &path, looked, stored.encode(), r.0.life())).await;
    }

    /// `remove`, from the shared store when there is one.
    pub async fn forget(&self, route: usize, key: &Key) {
        match &self.shared {
            Some(shared) => {
                let _ = shared.forget(&key.id()).await;
            }
            None => self.remove(route, key),
        }
    }

    /// `written`, and in the fleet's shared store when there is one (a
    /// failure there is logged: other processes may then serve what this
    /// write changed until their entries' ttl).
    pub async fn written_through(&self, path: &str) -> usize {
        let touched = self.written(path);
        if let (Some(shared), true) = (&self.shared, touched > 0) {
            let _ = shared.written(path).await;
        }
        touched
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route whose reads this is.
    pub fn route_for(&self, method: &str, path: &str) -> Option<(usize, &CacheRoute)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, (r, _))| r.reads(method, path))
            .map(|(i, (r, _))| (i, r))
    }

    /// Route `index` (as `route_for` gave it).
    pub fn route(&self, index: usize) -> &CacheRoute {
        &self.routes[index].0
    }

    pub fn get(&self, route: usize, key: &Key) -> Option<Arc<Stored>> {
        self.routes.get(route)?.1.get(key)
    }

    /// The entry that answers `request` now without a call: kept, fresh,
    /// and alike in what it varies on.
    pub fn fresh(
        &self,
        route: usize,
        key: &Key,
        request: &HeaderMap,
        now: Nanos,
    ) -> Option<Arc<Stored>> {
        self.get(route, key).filter(|s| s.answers(request, now))
    }

    /// The route's epoch now (a read's call records it when it starts).
    pub fn epoch(&self, route: usize) -> u64 {
        self.epochs
            .get(route)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// Keep `stored`, fetched by a call that started in `epoch`, unless a
    /// write or purge touched the route since (it may be older than the
    /// write) or its body is over the route's `max_entry_bytes`.
    pub fn put(&self, route: usize, key: Key, stored: Arc<Stored>, epoch: u64) {
        let Some((r, store)) = self.routes.get(route) else {
            return;
        };
        if stored.body.len() as u64 > r.max_entry_bytes {
            return;
        }
        // Inserted first, then checked: a write bumps the epoch before it
        // evicts, so an entry is either evicted by it or seen here.
        store.insert(key.clone(), stored);
        if self.epoch(route) != epoch {
            store.invalidate(&key);
        }
    }

    pub fn remove(&self, route: usize, key: &Key) {
        if let Some((_, store)) = self.routes.get(route) {
            store.invalidate(key);
        }
    }

    /// Join the flight fetching `key` under `route`, or lead a new one.
    pub fn flight(&self, route: usize, key: &Key) -> Flight {
        self.flights.join(route, self.epoch(route), key)
    }

    /// A write to `path` changes what the reads of its own path, the paths
    /// under it and the paths above it return: their entries go, in every
    /// route whose prefix is at, under or above it. Returns how many routes
    /// were touched.
    pub fn written(&self, path: &str) -> usize {
        let path = path.trim_end_matches('/').to_string();
        let mut touched = 0;
        for (i, (route, store)) in self.routes.iter().enumerate() {
            if !related(route.path_prefix.trim_end_matches('/'), &path) {
                continue;
            }
            touched += 1;
            self.epochs[i].fetch_add(1, Ordering::AcqRel);
            let written = path.clone();
            let _ =
                store.invalidate_entries_if(move |key, _| related(&url_path(&key.url), &written));
        }
        touched
    }

    /// `POST /v1/cache/purge`: every entry whose path is at or under
    /// `prefix` goes (all of them when it is `/`), in the fleet too.
    pub async fn purge(&self, prefix: &str) -> Result<(), tollgate_store::redis::RedisError> {
        self.purge_here(prefix);
        match &self.shared {
            Some(shared) => shared.purged(prefix).await,
            None => Ok(()),
        }
    }

    fn purge_here(&self, prefix: &str) {
        let prefix = prefix.trim_end_matches('/').to_string();
        for (i, (_, store)) in self.routes.iter().enumerate() {
            self.epochs[i].fetch_add(1, Ordering::AcqRel);
            if prefix.is_empty() {
                store.invalidate_all();
                continue;
            }
            let prefix = prefix.clone();
            let _ = store.invalidate_entries_if(move |key, _| under(&url_path(&key.url), &prefix));
        }
    }

    /// Entries and bytes per route (after pending evictions are applied).
    pub fn sizes(&self) -> Vec<Size> {
        self.routes
            .iter()
            .map(|(_, store)| {
                store.run_pending_tasks();
                Size {
                    entries: store.entry_count(),
                    bytes: store.weighted_size(),
                }
            })
            .collect()
    }
}

/// The path of a URL as sent (no query).
pub(crate) fn url_path(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("/", |at| &after_scheme[at..]);
    let path = path.split(['?', '#']).next().unwrap_or("/");
    path.trim_end_matches('/').to_string()
}

fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// One path is at, under or above the other.
pub(crate) fn related(a: &str, b: &str) -> bool {
    under(a, b) || under(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str) -> CacheRoute {
        CacheRoute {
            path_prefix: prefix.into(),
            methods: vec!["GET".into(), "HEAD".into()],
            ttl: Duration::from_secs(300),
            max_bytes: 1 << 20,
            max_entry_bytes: 1 << 16,
            override_headers: false,
            stale_if_error: Duration::ZERO,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn fresh_for(pairs: &[(&str, &str)]) -> Option<Duration> {
        freshness(
            &route("/v1"),
            StatusCode::OK,
            &HeaderMap::new(),
            &headers(pairs),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )
    }

    #[test]
    fn the_shared_cache_rules_decide_what_is_kept_and_for_how_long() {
        assert_eq!(fresh_for(&[]), Some(Duration::from_secs(300)));
        assert_eq!(fresh_for(&[("cache-control", "no-store")]), None);
        assert_eq!(fresh_for(&[("cache-control", "Private, max-age=60")]), None);
        assert_eq!(
            fresh_for(&[("cache-control", "private=\"set-cookie\"")]),
            None
        );
        assert_eq!(fresh_for(&[("vary", "accept, *")]), None);
        assert_eq!(
            fresh_for(&[("cache-control", "max-age=60")]),
            Some(Duration::from_secs(60))
        );
        // s-maxage is the shared cache's, over max-age; never past the ttl.
        assert_eq!(
            fresh_for(&[("cache-control", "max-age=60, s-maxage=30")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            fresh_for(&[("cache-control", "max-age=3600")]),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            fresh_for(&[("cache-control", "max-age=60"), ("age", "45")]),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            fresh_for(&[
                ("date", "Fri, 15 Jan 2027 08:00:00 GMT"),
                ("expires", "Fri, 15 Jan 2027 08:01:40 GMT")
            ]),
            Some(Duration::from_secs(100))
        );
        assert_eq!(
            fresh_for(&[("expires", "0")]),
            None,
            "an unreadable Expires has passed"
        );
        // no-cache (or nothing left of its lifetime) keeps it only to
        // revalidate, which needs a validator.
        assert_eq!(fresh_for(&[("cache-control", "no-cache")]), None);
        assert_eq!(
            fresh_for(&[("cache-control", "no-cache"), ("etag", "\"v1\"")]),
            Some(Duration::ZERO)
        );
        // 429 and 5xx never; a 404 may be.
        let r = route("/v1");
        let now = SystemTime::now();
        let none = HeaderMap::new();
        assert_eq!(
            freshness(&r, StatusCode::TOO_MANY_REQUESTS, &none, &none, now),
            None
        );
        assert_eq!(
            freshness(&r, StatusCode::BAD_GATEWAY, &none, &none, now),
            None
        );
        assert!(freshness(&r, StatusCode::NOT_FOUND, &none, &none, now).is_some());
        // The client's no-store; the route's override.
        let no_store = headers(&[("cache-control", "no-store")]);
        assert_eq!(freshness(&r, StatusCode::OK, &no_store, &none, now), None);
        let over = CacheRoute {
            override_headers: true,
            ..route("/v1")
        };
        let private = headers(&[("cache-control", "private, max-age=1")]);
        assert_eq!(
            freshness(&over, StatusCode::OK, &none, &private, now),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn a_route_covers_its_prefix_at_segment_boundaries() {
        let r = route("/v1/sites");
        assert!(r.reads("GET", "/v1/sites"));
        assert!(r.reads("HEAD", "/v1/sites/7"));
        assert!(!r.reads("GET", "/v1/sitesmap"));
        assert!(!r.reads("POST", "/v1/sites"));
        assert!(route("/v1/").covers("/v1/anything"));
    }

    #[test]
    fn an_entry_answers_only_requests_alike_in_what_it_varies_on() {
        let stored = Stored::new(
            StatusCode::OK,
            headers(&[("vary", "Accept-Language"), ("etag", "\"a\"")]),
            Bytes::from_static(b"hi"),
            &headers(&[("accept-language", "fr")]),
            Duration::from_secs(10),
            0,
        );
        assert!(stored.matches(&headers(&[("accept-language", "fr")])));
        let with_quota = Stored::new(
            StatusCode::OK,
            headers(&[
                ("ratelimit", "\"per-second\";r=199;t=1"),
                ("ratelimit-policy", "\"per-second\";q=200;w=1"),
                ("x-ratelimit-remaining", "9"),
                ("x-hubspot-ratelimit-daily-remaining", "499"),
                ("etag", "\"a\""),
            ]),
            Bytes::new(),
            &HeaderMap::new(),
            Duration::from_secs(10),
            0,
        );
        let kept: Vec<&str> = with_quota.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(kept, ["etag"]);
        assert!(!stored.matches(&headers(&[("accept-language", "de")])));
        assert!(!stored.matches(&HeaderMap::new()));
        assert!(stored.is_fresh(9_999_999_999));
        assert!(!stored.is_fresh(10_000_000_000));
        assert_eq!(stored.age(3_500_000_000), 3);
        let refreshed = stored.refreshed(
            &headers(&[("etag", "\"a\""), ("x-new", "1")]),
            Duration::from_secs(5),
            20_000_000_000,
        );
        assert!(refreshed.is_fresh(24_000_000_000));
        assert_eq!(refreshed.headers["x-new"], "1");
        assert_eq!(refreshed.body, "hi");
    }

    #[test]
    fn partitions_differ_by_any_part_and_by_where_parts_split() {
        let a = Partition::of([b"client-a".as_slice(), b"Bearer 1"]);
        assert_eq!(a, Partition::of([b"client-a".as_slice(), b"Bearer 1"]));
        assert_ne!(a, Partition::of([b"client-b".as_slice(), b"Bearer 1"]));
        assert_ne!(
            Partition::of([b"ab".as_slice(), b"c"]),
            Partition::of([b"a".as_slice(), b"bc"])
        );
    }

    fn key(url: &str) -> Key {
        Key {
            method: "GET".into(),
            url: url.into(),
            partition: Partition::of([b"t".as_slice()]),
        }
    }

    fn stored(body: &'static [u8]) -> Arc<Stored> {
        Arc::new(Stored::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(body),
            &HeaderMap::new(),
            Duration::from_secs(60),
            0,
        ))
    }

    #[test]
    fn a_stored_response_survives_its_shared_encoding_and_damage_is_refused() {
        let mut headers = headers(&[
            ("content-type", "application/json"),
            ("vary", "accept"),
            ("etag", "\"v1\""),
        ]);
        headers.append("link", HeaderValue::from_static("<a>; rel=next"));
        headers.append("link", HeaderValue::from_static("<b>; rel=last"));
        let request = self::headers(&[("accept", "application/json")]);
        let stored = Stored::new(
            StatusCode::NON_AUTHORITATIVE_INFORMATION,
            headers,
            Bytes::from_static(b"{\"id\":7}"),
            &request,
            Duration::from_secs(90),
            1_700_000_000_000_000_000,
        );
        let encoded = stored.encode();
        let back = Stored::decode(&encoded).expect("decoded");
        assert_eq!(back.status, stored.status);
        assert_eq!(back.headers, stored.headers);
        assert_eq!(back.body, stored.body);
        assert_eq!(back.vary, stored.vary);
        assert_eq!(
            (back.stored_at, back.fresh_until, back.age_then),
            (stored.stored_at, stored.fresh_until, stored.age_then)
        );
        for cut in 0..encoded.len() {
            assert!(Stored::decode(&encoded[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = encoded.clone();
        longer.push(b'x');
        assert!(Stored::decode(&longer).is_none());
        assert!(Stored::decode(b"tollgate-cache 9\n...").is_none());
    }

    proptest::proptest! {
        /// What the shared store hands back is read as hostile input: any
        /// bytes decode to a response or to nothing, never a panic; any
        /// response survives its encoding.
        #[test]
        fn shared_entries_decode_or_are_refused(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            status in 200u16..600,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            value in "[ -~]{0,40}",
            age in 0u64..(1 << 40),
        ) {
            let _ = Stored::decode(&bytes);
            let mut tagged = SHARED_FORMAT.to_vec();
            tagged.extend_from_slice(&bytes);
            let _ = Stored::decode(&tagged);
            let headers = headers(&[("x-value", value.as_str()), ("vary", "accept")]);
            let request = self::headers(&[("accept", value.as_str())]);
            let mut stored = Stored::new(
                StatusCode::from_u16(status).expect("status"),
                headers,
                Bytes::from(body),
                &request,
                Duration::from_secs(60),
                7,
            );
            stored.age_then = age;
            let back = Stored::decode(&stored.encode()).expect("decoded");
            proptest::prop_assert_eq!(back.status, stored.status);
            proptest::prop_assert_eq!(&back.headers, &stored.headers);
            proptest::prop_assert_eq!(&back.body, &stored.body);
            proptest::prop_assert_eq!(&back.vary, &stored.vary);
            proptest::prop_assert_eq!(back.age_then, age);
        }
    }

    #[tokio::test]
    async fn a_write_evicts_its_path_the_paths_under_it_and_above_it_only() {
        let cache = Cache::new(&[route("/v1")]);
        let urls = [
            "http://h/v1/sites",
            "http://h/v1/sites?page=2",
            "http://h/v1/sites/5",
            "http://h/v1/sites/5/notes",
            "http://h/v1/sites/6",
            "http://h/v1/job-types",
        ];
        for url in urls {
            cache.put(0, key(url), stored(b"x"), cache.epoch(0));
        }
        assert_eq!(cache.written("/v1/sites/5"), 1);
        let kept: Vec<bool> = urls
            .iter()
            .map(|u| cache.get(0, &key(u)).is_some())
            .collect();
        assert_eq!(kept, [false, false, false, false, true, true]);
        cache.purge("/v1/job-types").await.expect("memory");
        assert!(cache.get(0, &key("http://h/v1/job-types")).is_none());
        assert!(cache.get(0, &key("http://h/v1/sites/6")).is_some());
        assert_eq!(cache.written("/v2/x"), 0);
    }

    #[test]
    fn the_store_keeps_to_its_bytes_and_skips_bodies_over_the_entry_cap() {
        let cache = Cache::new(&[CacheRoute {
            max_bytes: 100 * 300,
            max_entry_bytes: 8,
            ..route("/")
        }]);
        for i in 0..100_000 {
            cache.put(0, key(&format!("http://h/{i}")), stored(b"12345678"), 0);
        }
        let size = cache.sizes()[0];
        // Each weighs its 8 bytes, its key and 256 of bookkeeping.
        assert!(size.bytes <= 100 * 300, "{size:?}");
        assert!((50..=100 * 300 / 264).contains(&size.entries), "{size:?}");
        cache.put(0, key("http://h/big"), stored(b"123456789"), 0);
        assert!(cache.get(0, &key("http://h/big")).is_none());
    }

    #[test]
    fn a_read_that_started_before_a_write_keeps_nothing() {
        let cache = Cache::new(&[route("/v1")]);
        let before = cache.epoch(0);
        cache.written("/v1/sites/5");
        cache.put(0, key("http://h/v1/sites/5"), stored(b"old"), before);
        assert!(cache.get(0, &key("http://h/v1/sites/5")).is_none());
        // A write elsewhere leaves the route's epoch alone.
        let now = cache.epoch(0);
        assert_eq!(cache.written("/v2/other"), 0);
        cache.put(0, key("http://h/v1/sites/5"), stored(b"new"), now);
        assert!(cache.get(0, &key("http://h/v1/sites/5")).is_some());
        // A write above the route's prefix touches it too.
        assert_eq!(cache.written("/v1"), 1);
        assert!(cache.get(0, &key("http://h/v1/sites/5")).is_none());
    }

    #[test]
    fn long_urls_weigh_what_they_take() {
        let cache = Cache::new(&[CacheRoute {
            max_bytes: 64 * 1024,
            ..route("/")
        }]);
        let long = "x".repeat(8 * 1024);
        for i in 0..100 {
            cache.put(0, key(&format!("http://h/{i}?{long}")), stored(b"1"), 0);
        }
        let size = cache.sizes()[0];
        assert!(size.bytes <= 64 * 1024 && size.entries <= 8, "{size:?}");
    }

    #[test]
    fn a_hostile_age_neither_overflows_nor_ages_past_2_to_the_31() {
        let stored = Stored::new(
            StatusCode::OK,
            headers(&[("age", "18446744073709551615")]),
            Bytes::new(),
            &HeaderMap::new(),
            Duration::from_secs(1),
            0,
        );
        assert_eq!(stored.age(u64::MAX), (1 << 31) + u64::MAX / 1_000_000_000);
    }

    #[tokio::test]
    async fn followers_get_what_the_leader_lands_or_go_alone_if_it_is_dropped() {
        let cache = Cache::new(&[route("/")]);
        let Flight::Lead(leader) = cache.flight(0, &key("http://h/a")) else {
            panic!("the first leads")
        };
        let Flight::Follow(mut follower) = cache.flight(0, &key("http://h/a")) else {
            panic!("the second follows")
        };
        leader.land(Landed::Response(stored(b"body")));
        let landed = follower.wait_for(Option::is_some).await.unwrap().clone();
        assert!(matches!(landed, Some(Landed::Response(s)) if s.body == "body"));
        // Landed: the next read leads anew.
        let Flight::Lead(leader) = cache.flight(0, &key("http://h/a")) else {
            panic!("a new flight")
        };
        let Flight::Follow(mut follower) = cache.flight(0, &key("http://h/a")) else {
            panic!("follows")
        };
        drop(leader);
        let landed = follower.wait_for(Option::is_some).await.unwrap().clone();
        assert!(matches!(landed, Some(Landed::Alone)));
    }
}
