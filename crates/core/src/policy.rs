//! The policy model: what `[[limit]]` and `[[class]]` entries mean once parsed.
//! Parsing and validation of the TOML text is in `crate::config`.

use crate::algo::concurrency::ConcurrencyParams;
use crate::algo::fixed_window::FixedWindowParams;
use crate::algo::gcra::GcraParams;
use crate::algo::sliding_window::SlidingWindowParams;
use crate::algo::tiered::{Tier, TieredParams};
use crate::units::{Nanos, Rate, NANOS_PER_SEC};

/// A parsed config: its limits, its classes and its store.
#[derive(Debug, Clone)]
pub struct Policy {
    /// In config order (a profile's first).
    pub limits: Vec<Limit>,
    /// `[[class]]` entries, in config order.
    pub classes: Vec<Class>,
    /// `[store]`.
    pub store: StoreSettings,
    /// Name of the profile this policy includes, if any.
    pub profile: Option<String>,
}

/// `[store]`: where the limits' state lives.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSettings {
    /// Most keys tracked at once, over all limits; idle keys are evicted first
    /// (the memory store, and the in-process fallback of a Redis store).
    pub max_keys: usize,
    /// `kind = "redis"`: counters live in Redis, shared by every process
    /// pointed at it (fleet mode). `None`: the embedded memory store.
    pub redis: Option<RedisSettings>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            max_keys: 1_000_000,
            redis: None,
        }
    }
}

/// `[store] kind = "redis"`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` or `redis+unix:///path`.
    pub url: String,
    /// Namespace of every key tollgate writes (`PREFIX:...`).
    pub prefix: String,
    /// A decision slower than this counts as Redis being down.
    pub timeout: Nanos,
    /// Connections per async runtime (the gateway runs one per worker
    /// thread); each has one script call in flight, and the decisions
    /// queued meanwhile go together in its next call.
    pub pool: usize,
    /// The fraction of each limit this process enforces on its own while
    /// Redis is down, for limits with `fail = "local"` (e.g. 1/3 in a fleet of 3).
    pub local_share: f64,
    /// Answer a request like one Redis denied, until the instant it gave to
    /// retry, without asking Redis again (`[store] remember_denials`).
    pub remember_denials: bool,
}

impl RedisSettings {
    /// The settings `[store] kind = "redis"` with only `url` gives.
    pub fn new(url: impl Into<String>) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            prefix: "tollgate".into(),
            timeout: 100 * crate::units::NANOS_PER_SEC / 1000,
            pool: 4,
            local_share: 1.0,
            remember_denials: true,
        }
    }
}

/// What a limit does when its store (Redis) cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Admit, and count it (`tollgate_store_fail_open_total`).
    Open,
    /// Refuse: a 503 at the gateway, a wait in the runner.
    #[default]
    Closed,
    /// Decide in process, with `local_share` of the limit.
    Local,
}

impl FailMode {
    /// The name the config uses for it.
    pub fn name(&self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
            FailMode::Local => "local",
        }
    }
}

/// A request class (the data API's sandbox) that scales every limit.
#[derive(Debug, Clone)]
pub struct Class {
    /// Its name.
    pub name: String,
    /// Which requests are in it.
    pub matcher: Matcher,
    /// What its requests' quotas are multiplied by.
    pub scale: f64,
}

/// One `[[limit]]`.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Its name (in headers, metrics and refusals).
    pub name: String,
    /// What its counters are keyed by.
    pub key: Vec<KeyPart>,
    /// Which requests it applies to.
    pub matcher: Matcher,
    /// Its algorithm.
    pub algorithm: AlgorithmKind,
    /// Parameters for the default class (index 0) and each `[[class]]` (index i + 1).
    pub variants: Vec<Params>,
    /// The longest a request is held for it instead of refused (0: never held).
    pub hold: Nanos,
    /// What one request costs it.
    pub cost: Cost,
    /// Enforced, or only reported.
    pub mode: Mode,
    /// What a request without one of its key parts does.
    pub missing_key: MissingKey,
    /// What this limit does while a shared store is down.
    pub fail: FailMode,
    /// `lease = { max, ttl }`: in fleet mode a process takes a slice of a
    /// key's quota from Redis and decides on it locally (see `Lease`).
    pub lease: Option<Lease>,
    /// Keys with their own quota (a premium tenant), sorted by key. Their
    /// parameters are the last variants, in this order.
    pub overrides: Vec<Override>,
    /// Line of the `[[limit]]` entry in its file, for messages.
    pub line: usize,
    /// The limit's definition and the classes it is scaled by, as parsed: two
    /// limits with the same fingerprint count alike, so a reload keeps their
    /// counters.
    pub fingerprint: String,
}

/// A limit's `lease = { max = N, ttl = "..." }`: on Redis, a process takes
/// up to `max` units of a key's quota in one call and admits requests of
/// that key locally until they are spent or `ttl` has passed, returning what
/// it did not use with its next call for the key. Admissions then exceed the
/// limit by at most the units of the slices outstanding at once (per process
/// and key, a slice and the last quarter of the one it replaces: at most
/// `1.25 × max`; 0 for windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Most units in one slice.
    pub max: u64,
    /// Longest a slice is used for.
    pub ttl: Nanos,
}

/// One key's own scale of a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The key as the engine builds it (parts joined, see `request::encode_key`).
    pub key: compact_str::CompactString,
    /// What its quota is multiplied by.
    pub scale: f64,
}

impl Limit {
    /// The parameters that apply to `class` (a class or override variant).
    #[inline]
    pub fn params(&self, class: usize) -> &Params {
        &self.variants[class.min(self.variants.len() - 1)]
    }
    /// The variant for a key: its override's, or `class`.
    pub fn variant_for(&self, key: &str, class: usize) -> usize {
        match self.overrides.binary_search_by(|o| o.key.as_str().cmp(key)) {
            Ok(i) => self.variants.len() - self.overrides.len() + i,
            Err(_) => class,
        }
    }
    /// Whether it counts upstream time (`cost = "latency"`).
    pub fn is_latency(&self) -> bool {
        self.cost == Cost::Latency
    }
    /// Whether a request it admits owes it something when the request
    /// completes: a latency debit or a concurrency release.
    pub fn settles_at_completion(&self) -> bool {
        self.is_latency() || self.algorithm == AlgorithmKind::Concurrency
    }
}

/// A limit's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgorithmKind {
    /// GCRA: bursts up to `capacity`, refilled at `refill`.
    TokenBucket,
    /// GCRA without bursts beyond `capacity`, drained at `refill`.
    LeakyBucket,
    /// A count per clock-aligned window.
    FixedWindow,
    /// A count over a window that slides, in sub-windows.
    SlidingWindow,
    /// Pools refilled at their own boundaries (minute, hour, day, ...).
    Tiered,
    /// Requests in flight at once.
    Concurrency,
}

impl AlgorithmKind {
    /// The names `algorithm` takes, for messages.
    pub const NAMES: &'static str =
        "token_bucket, leaky_bucket, fixed_window, sliding_window, tiered, concurrency";

    /// The algorithm named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "token_bucket" => Self::TokenBucket,
            "leaky_bucket" => Self::LeakyBucket,
            "fixed_window" => Self::FixedWindow,
            "sliding_window" => Self::SlidingWindow,
            "tiered" => Self::Tiered,
            "concurrency" => Self::Concurrency,
            _ => return None,
        })
    }
    /// The name the config uses for it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TokenBucket => "token_bucket",
            Self::LeakyBucket => "leaky_bucket",
            Self::FixedWindow => "fixed_window",
            Self::SlidingWindow => "sliding_window",
            Self::Tiered => "tiered",
            Self::Concurrency => "concurrency",
        }
    }
}

/// A limit's parameters, by algorithm.
#[derive(Debug, Clone)]
pub enum Params {
    /// Token or leaky bucket.
    Gcra(GcraParams),
    /// Fixed window.
    FixedWindow(FixedWindowParams),
    /// Sliding window.
    SlidingWindow(SlidingWindowParams),
    /// Tiered pools.
    Tiered(TieredParams),
    /// Concurrency.
    Concurrency(ConcurrencyParams),
}

impl Params {
    /// The quota and window advertised in `RateLimit-Policy` (`q` and `w`, seconds).
    pub fn policy(&self) -> (u64, u64) {
        let secs = |n: Nanos| n.div_ceil(NANOS_PER_SEC);
        match self {
            Params::Gcra(p) => (p.capacity, secs(p.tau())),
            Params::FixedWindow(p) => (p.quota, secs(p.calendar.every())),
            Params::SlidingWindow(p) => (p.quota, secs(p.segment * u64::from(p.segments))),
            // All pools together, which `remaining` counts too (a request
            // spills from one pool into the next), by the window of the
            // pool that refills first.
            Params::Tiered(p) => p
                .tiers
                .first()
                .map_or((0, 0), |t| (p.total(), secs(t.calendar.every()))),
            Params::Concurrency(p) => (p.max, 0),
        }
    }

    /// The same limit with every quota multiplied by `factor` (at least 1 unit).
    pub fn scaled(&self, factor: f64) -> Params {
        let scale = |n: u64| ((n as f64 * factor).floor() as u64).max(1);
        match self {
            Params::Gcra(p) => Params::Gcra(GcraParams::with_rate(
                scale(p.capacity),
                scaled_rate(p.amount, p.period, factor),
            )),
            Params::FixedWindow(p) => Params::FixedWindow(FixedWindowParams {
                quota: scale(p.quota),
                calendar: p.calendar.clone(),
            }),
            Params::SlidingWindow(p) => Params::SlidingWindow(SlidingWindowParams {
                quota: scale(p.quota),
                ..*p
            }),
            Params::Tiered(p) => Params::Tiered(TieredParams {
                tiers: p
                    .tiers
                    .iter()
                    .map(|t| Tier {
                        quota: scale(t.quota),
                        calendar: t.calendar.clone(),
                    })
                    .collect(),
            }),
            Params::Concurrency(p) => Params::Concurrency(ConcurrencyParams { max: scale(p.max) }),
        }
    }
}

/// `amount * factor` per `period`, kept exact to a millionth of a unit. If
/// the exact fraction does not fit in u64, the interval is rounded up (one
/// unit per that many ns): never faster than configured.
fn scaled_rate(amount: u64, period: Nanos, factor: f64) -> Rate {
    const MICRO: u128 = 1_000_000;
    let scaled = ((amount as f64 * factor * MICRO as f64).round() as u128).max(1);
    let per = u128::from(period) * MICRO;
    let g = gcd(scaled, per);
    let (amount, per) = (scaled / g, per / g);
    match (u64::try_from(amount), u64::try_from(per)) {
        (Ok(amount), Ok(per)) => Rate { amount, per },
        _ => Rate {
            amount: 1,
            per: u64::try_from(per.div_ceil(amount)).unwrap_or(u64::MAX),
        },
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// One part of a limit's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// Lower-cased header name.
    Header(String),
    /// A query parameter's value.
    Query(String),
    /// The client's address.
    Ip,
    /// The request's method.
    Method,
    /// The request's (normalized) path.
    Path,
    /// The host the request is for, lower-cased.
    Host,
    /// A fixed text.
    Const(String),
    /// An entry of an Envoy rate limit descriptor (`tollgate serve`'s RLS
    /// listener): the value of its key NAME.
    Descriptor(String),
}

impl KeyPart {
    /// A part as written in `key`: `header:NAME`, `query:NAME`,
    /// `descriptor:NAME`, `ip`, `method`, `path`, `host` or `const:TEXT`.
    pub fn parse(text: &str) -> Result<KeyPart, String> {
        let bad = || {
            format!("'{text}' is not a key part; use header:NAME, query:NAME, descriptor:NAME, ip, method, path, host or const:TEXT")
        };
        Ok(match text.split_once(':') {
            Some(("header", name)) if !crate::config::is_token(name) => {
                return Err(format!(
                    "'{text}' names no header: a header name is letters, digits and !#$%&'*+-.^_`|~"
                ))
            }
            Some(("header", name)) => KeyPart::Header(name.to_ascii_lowercase()),
            Some(("query", name)) if !name.is_empty() => KeyPart::Query(name.to_string()),
            Some(("const", value)) => KeyPart::Const(value.to_string()),
            Some(("descriptor", name)) if !name.is_empty() => KeyPart::Descriptor(name.to_string()),
            Some(_) => return Err(bad()),
            None => match text {
                "ip" => KeyPart::Ip,
                "method" => KeyPart::Method,
                "path" => KeyPart::Path,
                "host" => KeyPart::Host,
                _ => return Err(bad()),
            },
        })
    }
    /// The part as written in the config.
    pub fn describe(&self) -> String {
        match self {
            KeyPart::Header(n) => format!("header:{n}"),
            KeyPart::Query(n) => format!("query:{n}"),
            KeyPart::Ip => "ip".into(),
            KeyPart::Method => "method".into(),
            KeyPart::Path => "path".into(),
            KeyPart::Host => "host".into(),
            KeyPart::Const(v) => format!("const:{v}"),
            KeyPart::Descriptor(n) => format!("descriptor:{n}"),
        }
    }
}

/// Which requests a limit (or class) applies to. Empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    /// Upper-cased methods.
    pub methods: Vec<String>,
    /// Paths at or under this.
    pub path_prefix: Option<String>,
    /// The host (lower-cased).
    pub host: Option<String>,
    /// Lower-cased header names with the exact value they must have.
    pub headers: Vec<(String, String)>,
    /// Envoy RLS only: the request's domain.
    pub domain: Option<String>,
    /// Envoy RLS only: descriptor keys that must be present ...
    pub descriptor_keys: Vec<String>,
    /// ... and descriptor keys with the exact value they must have.
    pub descriptors: Vec<(String, String)>,
}

/// What one request costs a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    /// One unit per request.
    Requests,
    /// Microseconds of upstream time, debited at completion.
    Latency,
    /// Units given by a request header (lower-cased name); 1 if absent.
    Header(String),
    /// The length of the array at this JSON pointer in the body; 1 if absent.
    JsonArray(String),
}

/// Whether a limit enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuses what it does not admit.
    Enforce,
    /// Decides and reports, never refuses.
    Shadow,
}

/// What to do with a request that lacks a key part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Count it in one shared anonymous bucket.
    Anonymous,
    /// Refuse the request (400).
    Reject,
    /// The limit does not apply to it.
    Skip,
}
