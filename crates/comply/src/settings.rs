//! The comply face's part of a config (read by `tollgate run` and `tollgate
//! proxy` alike): `[[upstream]]` entries with their base URL,
//! policy (profile and `[[upstream.limit]]`), request settings, circuit
//! breaker and `[[upstream.bulk]]` templates. Every error names its line.

use crate::breaker::BreakerSettings;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate_core::config::{line_of, ConfigError, ProfileSource};
use tollgate_core::units::parse_duration;
use tollgate_core::Policy;
use toml::Spanned;
use url::Url;

/// What a bulk template's body holds where the chunk of records goes.
pub const RECORDS_PLACEHOLDER: &str = "{{records}}";

/// Every upstream of a runner's config, in file order.
#[derive(Debug, Clone)]
pub struct UpstreamsConfig {
    pub upstreams: Vec<Upstream>,
    /// `[[workflow]]`: schedules and callbacks by workflow name.
    pub workflows: Vec<Workflow>,
}

/// `[[workflow]] name, start, end, timezone, days, callback`.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    /// When its queued work may go (None: any time).
    pub schedule: Option<crate::schedule::Schedule>,
    /// Where its jobs' results are POSTed unless a job names its own.
    pub callback: Option<String>,
}

impl UpstreamsConfig {
    /// The schedules of the workflows that have one.
    pub fn schedules(&self) -> Vec<crate::schedule::Schedule> {
        self.workflows
            .iter()
            .filter_map(|w| w.schedule.clone())
            .collect()
    }

    pub fn workflow(&self, name: &str) -> Option<&Workflow> {
        self.workflows.iter().find(|w| w.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// Jobs whose URL starts with this (scheme, host, port and path prefix)
    /// go to this upstream.
    pub base_url: Url,
    pub policy: Policy,
    /// Per attempt, from sending until the whole response body is read.
    pub timeout: Duration,
    /// Attempts per job before it is dead-lettered.
    pub max_attempts: u32,
    /// Requests in flight at once, whatever the limits allow.
    pub concurrency: usize,
    /// Sent with every request (a job's own header of the same name wins).
    pub headers: Headers,
    /// `headers` as the limits see them: each value by its `stand_in`, so
    /// a vendor key never becomes a counter's key (in Redis, a key name).
    pub limit_headers: Vec<(String, String)>,
    pub breaker: BreakerSettings,
    pub bulk: Vec<Bulk>,
    /// Extra roots (PEM) trusted for this upstream's TLS, besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// `tollgate proxy`: answer a CONNECT to this (https) upstream's host
    /// with a certificate from the local CA, to see and pace each request
    /// inside the tunnel.
    pub intercept: bool,
    /// A pool of vendor keys (`keys`, `key_header`, `key_format`): the
    /// limits apply per key and each call takes one. Empty: no pool.
    pub keys: Vec<PooledKey>,
    /// The header a pooled key goes in (lower case).
    pub key_header: String,
    /// `[[upstream.cache]]`: reads kept for a while (docs/cache.md).
    pub cache: Vec<tollgate_http::cache::CacheRoute>,
    /// `cache_store`: in this process, or the fleet's Redis.
    pub cache_store: tollgate_http::cache::CacheStore,
    /// `dedup`, `skip_unchanged`: writes done once (docs/cache.md).
    pub dedup: tollgate_http::dedup::DedupSettings,
    /// `reserve`: per limit (policy order), the share of its capacity kept
    /// for live requests; queued work only uses what is above it (0: none).
    pub reserve: Vec<f64>,
    /// `[[upstream.budget]]`: a workflow's share of a limit, each a limit of
    /// the policy (after the configured ones).
    pub budgets: Vec<Budget>,
}

/// `[[upstream.budget]] workflow, share, of, borrow`: the calls of one
/// workflow may use at most `share` of limit `of`, as a limit of their own
/// (named `OF/WORKFLOW`: the same algorithm, key and windows, every number
/// scaled by the share, matched on the workflow). A spent budget holds back
/// only its workflow. With `borrow`, a workflow whose budget is spent may
/// still go when every other call waiting is held back too (by its own
/// budget or the limits) and `of` has quota left: it uses what the other
/// budgets leave idle at that moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub workflow: String,
    pub share: f64,
    /// The limit it is a share of.
    pub of: String,
    /// Its own limit's index in the policy.
    pub limit: usize,
    pub borrow: bool,
}

impl Upstream {
    /// Its HTTP client (`run`'s and the proxy's): to its `base_url`, with its
    /// `ca_file`, reached as `proxies` say. Errors name the upstream.
    pub fn client<B>(
        &self,
        connect_timeout: Duration,
        proxies: &tollgate_http::client::Proxies,
    ) -> Result<tollgate_http::client::UpstreamClient<B>, String>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let base = self.base_url.as_str().parse::<http::Uri>();
        base.map_err(|e| e.to_string())
            .and_then(|base| {
                let ca_file = self.ca_file.as_deref();
                tollgate_http::client::UpstreamClient::new(&base, ca_file, connect_timeout, proxies)
            })
            .map_err(|e| format!("upstream '{}': {e}", self.name))
    }

    /// The key a limit counts this upstream's own calls under: its parts
    /// from the upstream's configured headers (or the pooled key's
    /// stand-in) and constants; None when a part depends on the request.
    pub fn own_key(
        &self,
        limit: &tollgate_core::policy::Limit,
        pooled: Option<&str>,
    ) -> Option<compact_str::CompactString> {
        use tollgate_core::policy::KeyPart;
        let values: Option<Vec<&str>> = limit
            .key
            .iter()
            .map(|part| match part {
                KeyPart::Header(name) if pooled.is_some() && *name == self.key_header => pooled,
                KeyPart::Header(name) => self
                    .limit_headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str()),
                KeyPart::Const(text) => Some(text.as_str()),
                _ => None,
            })
            .collect();
        values.map(|v| tollgate_core::request::encode_key(&v))
    }

    /// What each limit (budgets included) has left for this upstream's own
    /// calls in `engine`, where that needs no request to know: (limit,
    /// remaining, quota). Concurrency limits are left out.
    pub fn limits_remaining(
        &self,
        engine: &tollgate_store::Engine,
        now: tollgate_core::Nanos,
    ) -> Vec<(String, u64, u64)> {
        engine
            .policy()
            .limits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.algorithm != tollgate_core::policy::AlgorithmKind::Concurrency)
            .filter_map(|(i, limit)| {
                let key = self.own_key(limit, None)?;
                let usage = usage_of(engine, i, key, now);
                Some((
                    limit.name.clone(),
                    usage.remaining,
                    limit.params(0).policy().0,
                ))
            })
            .collect()
    }

    /// With a key pool: what each limit keyed by the pooled key has left
    /// for each key, (key's label, limit, remaining, quota). The label is
    /// how the config names the key (`${HS_KEY_1}`), never its value.
    pub fn key_limits_remaining(
        &self,
        engine: &tollgate_store::Engine,
        now: tollgate_core::Nanos,
    ) -> Vec<(String, String, u64, u64)> {
        use tollgate_core::policy::{AlgorithmKind, KeyPart};
        let mut out = Vec::new();
        for (i, limit) in engine.policy().limits.iter().enumerate() {
            let per_key = limit
                .key
                .iter()
                .any(|p| matches!(p, KeyPart::Header(name) if *name == self.key_header));
            if !per_key || limit.algorithm == AlgorithmKind::Concurrency {
                continue;
            }
            for k in &self.keys {
                let Some(key) = self.own_key(limit, Some(&k.stand_in)) else {
                    continue;
                };
                let usage = usage_of(engine, i, key, now);
                out.push((
                    k.label.clone(),
                    limit.name.clone(),
                    usage.remaining,
                    limit.params(0).policy().0,
                ));
            }
        }
        out
    }

    /// `upstream/limit` of each of its limits whose quota is per day or
    /// longer: what the daily-quota alert watches.
    pub fn daily_limits(&self) -> Vec<String> {
        self.policy
            .limits
            .iter()
            .filter(|l| l.algorithm != tollgate_core::policy::AlgorithmKind::Concurrency)
            .filter(|l| l.params(0).policy().1 >= 86_400)
            .map(|l| format!("{}/{}", self.name, l.name))
            .collect()
    }

    /// Per limit of the policy: whether it is a budget that may borrow.
    pub fn borrowing(&self) -> Vec<bool> {
        let mut flags = vec![false; self.policy.limits.len()];
        for b in &self.budgets {
            flags[b.limit] = b.borrow;
        }
        flags
    }
}

/// Request headers that say who is calling, besides an upstream's own
/// configured headers and its key header: part of a cache entry's
/// partition (every line of each).
const CREDENTIALS: [&str; 7] = [
    "authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-access-token",
    "x-api-token",
];

impl Upstream {
    /// Who a call is for, as the cache and the memory of writes partition
    /// them (docs/cache.md): the proxy client's name, if any, and the
    /// credentials `sent` carries (the headers as they go to the vendor).
    /// A key pool's keys are one tenant's: they share a partition.
    pub fn partition(
        &self,
        client: Option<&str>,
        sent: &http::HeaderMap,
    ) -> tollgate_http::cache::Partition {
        let mut names: Vec<&str> = CREDENTIALS.to_vec();
        names.push(&self.key_header);
        names.extend(self.headers.iter().map(|(n, _)| n.as_str()));
        names.sort_unstable();
        names.dedup();
        let mut pieces: Vec<&[u8]> = vec![client.unwrap_or_default().as_bytes()];
        for name in names {
            for value in sent.get_all(name) {
                pieces.push(name.as_bytes());
                pieces.push(value.as_bytes());
            }
        }
        tollgate_http::cache::Partition::of(pieces)
    }
}

/// The headers sent with every request (lower-case names): they carry
/// vendor keys, so they print as names and a digest, never values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl std::ops::Deref for Headers {
    type Target = Vec<(String, String)>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        let values: String = self.0.iter().map(|(_, v)| v.as_str()).collect();
        write!(f, "Headers({names:?}, #{:016x})", digest(&values))
    }
}

/// What a limit keyed by a secret header sees instead of the secret: a
/// digest, the same in every process (runners and proxies share buckets).
pub use tollgate_http::admin::stand_in;

/// FNV-1a: tells secrets apart (a reload notices a changed key) without
/// showing them.
fn digest(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    hash
}

/// One key of an upstream's pool.
#[derive(Clone, PartialEq, Eq)]
pub struct PooledKey {
    /// How the config names it (`${HS_KEY_1}`): safe to show.
    pub label: String,
    /// The header value sent (`key_format` applied): a secret.
    pub value: String,
    /// What the limits see of it (`stand_in`).
    pub stand_in: String,
}

impl std::fmt::Debug for PooledKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value is a vendor's secret: never printed.
        write!(
            f,
            "PooledKey({}, #{:016x})",
            self.label,
            digest(&self.value)
        )
    }
}

/// A bulk call: `max_items` records per call, placed in `body` where the
/// string `"{{records}}"` stands.
#[derive(Debug, Clone)]
pub struct Bulk {
    pub name: String,
    pub method: String,
    pub path: String,
    pub body: serde_json::Value,
    pub max_items: usize,
    pub priority: Option<String>,
    pub workflow: Option<String>,
    pub line: usize,
}

impl UpstreamsConfig {
    /// The upstream a URL belongs to: the longest matching base URL.
    pub fn upstream_for(&self, url: &Url) -> Option<usize> {
        self.upstream_for_parts(&UrlParts::of(url))
    }

    /// `upstream_for`, given what routing reads of the URL.
    pub fn upstream_for_parts(&self, url: &UrlParts<'_>) -> Option<usize> {
        self.upstreams
            .iter()
            .enumerate()
            .filter(|(_, u)| under_parts(url, &u.base_url))
            .max_by_key(|(_, u)| u.base_url.path().len())
            .map(|(i, _)| i)
    }

    /// Fleet mode: the config's `[store] kind = "redis"` (every upstream
    /// carries the same `[store]`).
    pub fn redis(&self) -> Option<&tollgate_core::policy::RedisSettings> {
        self.upstreams.first()?.policy.store.redis.as_ref()
    }

    pub fn bulk(&self, name: &str) -> Option<(usize, &Bulk)> {
        self.upstreams
            .iter()
            .enumerate()
            .find_map(|(i, u)| u.bulk.iter().find(|b| b.name == name).map(|b| (i, b)))
    }
}

/// What routing reads of a URL: its origin (scheme, host, port, the
/// scheme's default when none is written) and its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlParts<'a> {
    pub scheme: &'a str,
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    pub path: &'a str,
}

impl<'a> UrlParts<'a> {
    pub fn of(url: &'a Url) -> Self {
        UrlParts {
            scheme: url.scheme(),
            host: url.host_str(),
            port: url.port_or_known_default(),
            path: url.path(),
        }
    }

    /// The parts of a URL `url::Url` normalized (lower-case scheme and
    /// host, no default port, dot segments resolved), as `http::Uri`
    /// splits its text.
    pub fn of_normalized(uri: &'a http::Uri) -> Self {
        let scheme = uri.scheme_str().unwrap_or("");
        UrlParts {
            scheme,
            host: uri.host(),
            port: uri
                .port_u16()
                .or(tollgate_http::client::default_port(scheme)),
            path: uri.path(),
        }
    }
}

/// Whether `url` is `base` or below it: same origin, and the path continues
/// base's path at a segment boundary.
pub fn under(url: &Url, base: &Url) -> bool {
    under_parts(&UrlParts::of(url), base)
}

fn under_parts(url: &UrlParts<'_>, base: &Url) -> bool {
    if url.scheme != base.scheme()
        || url.host != base.host_str()
        || url.port != base.port_or_known_default()
    {
        return false;
    }
    let prefix = base.path().trim_end_matches('/');
    url.path
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Parse the upstreams of a config. `env` resolves `${NAME}` in header values
/// (tokens stay out of the file).
pub fn parse(
    text: &str,
    profiles: &dyn ProfileSource,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamsConfig, ConfigError> {
    // The top level is checked by the policy parser (unknown tables, [store]).
    tollgate_core::parse(text, profiles)?;
    let policies = tollgate_core::parse_upstreams(text, profiles)?;
    let raw: RawRunner = tollgate_core::config::read_tables(text)?;
    if raw.upstream.is_empty() {
        return Err(ConfigError {
            line: None,
            message: "the config has no [[upstream]] entries; `tollgate run` sends jobs only to upstreams it knows".into(),
        });
    }
    let mut upstreams = Vec::with_capacity(raw.upstream.len());
    let mut bulk_names = BTreeMap::new();
    for (raw, policy) in raw.upstream.iter().zip(policies) {
        let upstream = upstream(text, raw, policy.policy, env)?;
        for bulk in &upstream.bulk {
            if let Some(first) = bulk_names.insert(bulk.name.clone(), bulk.line) {
                return Err(ConfigError {
                    line: Some(bulk.line),
                    message: format!(
                        "bulk '{}' is defined twice (first on line {first}); names must be unique",
                        bulk.name
                    ),
                });
            }
        }
        upstreams.push(upstream);
    }
    let workflows = workflows(text, &raw.workflow)?;
    Ok(UpstreamsConfig {
        upstreams,
        workflows,
    })
}

fn upstream(
    text: &str,
    raw: &Spanned<RawUpstream>,
    mut policy: Policy,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Upstream, ConfigError> {
    let u = raw.get_ref();
    let name = u.name.get_ref().clone();
    let err = |offset: usize, msg: String| ConfigError {
        line: Some(line_of(text, offset)),
        message: format!("upstream '{name}': {msg}"),
    };
    let base_url = Url::parse(u.base_url.get_ref())
        .ok()
        .filter(|b| matches!(b.scheme(), "http" | "https") && b.host_str().is_some())
        .ok_or_else(|| {
            // (not echoed when it may hold a credential)
            let shown = match u.base_url.get_ref() {
                raw if raw.contains('@') => String::new(),
                raw => format!(" '{raw}'"),
            };
            err(
                u.base_url.span().start,
                format!("base_url{shown} is not an http(s) URL with a host"),
            )
        })?;
    // A credential or a query in the base URL would be dropped from every
    // request, and shown by `check` and /v1/config: refused, not echoed.
    if !base_url.username().is_empty() || base_url.password().is_some() {
        return Err(err(
            u.base_url.span().start,
            "base_url carries a user name or password, which requests do not send and the \
             admin listener would show: put the credential in `headers` \
             (e.g. authorization = \"Basic ${VENDOR_BASIC}\")"
                .into(),
        ));
    }
    if base_url.query().is_some() || base_url.fragment().is_some() {
        return Err(err(
            u.base_url.span().start,
            "base_url has a query string or fragment, which requests do not carry: \
             a key goes in `headers`, other parameters in each request's URL"
                .into(),
        ));
    }
    let duration = |raw: &Option<Spanned<String>>, field: &str, default: Duration| match raw {
        None => Ok(default),
        Some(v) => match parse_duration(v.get_ref()) {
            Ok(n) if n > 0 => Ok(Duration::from_nanos(n)),
            Ok(_) => Err(err(v.span().start, format!("{field} must be above zero"))),
            Err(e) => Err(err(v.span().start, format!("{field}: {e}"))),
        },
    };
    let positive = |raw: &Option<Spanned<u64>>, field: &str, default: u64, max: u64| match raw {
        None => Ok(default),
        Some(v) if (1..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
        Some(v) => Err(err(
            v.span().start,
            format!("{field} must be from 1 to {max}, got {}", v.get_ref()),
        )),
    };
    let mut breaker = BreakerSettings::default();
    if let Some(b) = &u.breaker {
        breaker.failures = positive(&b.failures, "breaker failures", 5, 1000)? as u32;
        breaker.cooldown = duration(&b.cooldown, "breaker cooldown", breaker.cooldown)?;
    }
    let mut headers = Vec::new();
    for (header, value) in &u.headers {
        let value_text = expand_env(value.get_ref(), env).map_err(|var| {
            err(
                value.span().start,
                format!("header {header}: environment variable {var} is not set"),
            )
        })?;
        http::header::HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            err(
                value.span().start,
                format!("'{header}' is not a valid header name"),
            )
        })?;
        http::header::HeaderValue::from_str(&value_text).map_err(|_| {
            err(
                value.span().start,
                format!("header {header}: the value is not a valid header value"),
            )
        })?;
        headers.push((header.to_ascii_lowercase(), value_text));
    }
    let key_header = match &u.key_header {
        Some(h) => {
            http::header::HeaderName::from_bytes(h.get_ref().as_bytes()).map_err(|_| {
                err(
                    h.span().start,
                    format!("key_header '{}' is not a valid header name", h.get_ref()),
                )
            })?;
            h.get_ref().to_ascii_lowercase()
        }
        None => "authorization".to_string(),
    };
    let key_format = match &u.key_format {
        Some(f) if f.get_ref().matches("{key}").count() == 1 => f.get_ref().clone(),
        Some(f) => {
            return Err(err(
                f.span().start,
                format!("key_format '{}' must hold {{key}} exactly once (where the key goes), e.g. \"Bearer {{key}}\"", f.get_ref()),
            ))
        }
        None if key_header == "authorization" => "Bearer {key}".to_string(),
        None => "{key}".to_string(),
    };
    let mut keys: Vec<PooledKey> = Vec::new();
    for (i, raw) in u.keys.iter().enumerate() {
        // Named by its variable (`${HS_KEY_1}`) or its place, never by a
        // key written in the file.
        let text = raw.get_ref();
        let by_variable =
            text.starts_with("${") && text.ends_with('}') && text.matches("${").count() == 1;
        let at = raw.span().start;
        // Keys stay out of the file (which /v1/config shows as written).
        if !by_variable {
            return Err(err(
                at,
                format!("keys: key {} is written in the file; give it as \"${{VARIABLE}}\" and set the variable", i + 1),
            ));
        }
        let label = text.clone();
        let key = expand_env(text, env)
            .map_err(|var| err(at, format!("keys: environment variable {var} is not set")))?;
        if key.is_empty() {
            return Err(err(at, format!("keys: {label} is empty")));
        }
        let value = key_format.replace("{key}", &key);
        if http::header::HeaderValue::from_str(&value).is_err() {
            return Err(err(
                at,
                format!("keys: {label} does not make a valid header value"),
            ));
        }
        if let Some(same) = keys.iter().find(|k| k.value == value) {
            return Err(err(
                at,
                format!("keys: {label} is the same key as {}", same.label),
            ));
        }
        keys.push(PooledKey {
            label,
            stand_in: stand_in(&value),
            value,
        });
    }
    if !keys.is_empty() && headers.iter().any(|(h, _)| *h == key_header) {
        return Err(err(
            raw.span().start,
            format!("both headers.{key_header} and keys are set: the pool's key goes in {key_header}; drop one"),
        ));
    }
    let intercept = match &u.intercept {
        Some(i) if *i.get_ref() && base_url.scheme() != "https" => {
            return Err(err(
                i.span().start,
                format!("intercept = true is for https upstreams; {base_url} is reached over http, which the proxy sees without it"),
            ))
        }
        Some(i) => *i.get_ref(),
        None => false,
    };
    let mut bulk = Vec::new();
    for raw_bulk in &u.bulk {
        bulk.push(bulk_template(text, raw_bulk, &name)?);
    }
    let mut cache = Vec::new();
    for raw_cache in &u.cache {
        cache.push(cache_route(text, raw_cache, &name)?);
    }
    let cache_store = match &u.cache_store {
        None => tollgate_http::cache::CacheStore::Memory,
        Some(store) => {
            let at = store.span().start;
            let named = match store.get_ref().as_str() {
                "memory" => tollgate_http::cache::CacheStore::Memory,
                "redis" => tollgate_http::cache::CacheStore::Redis,
                other => {
                    return Err(err(
                        at,
                        format!("cache_store '{other}': expected \"memory\" or \"redis\""),
                    ))
                }
            };
            if named == tollgate_http::cache::CacheStore::Redis {
                if policy.store.redis.is_none() {
                    return Err(err(at, "cache_store = \"redis\" keeps the cache in the fleet's Redis: add [store] kind = \"redis\" (or drop cache_store)".into()));
                }
                if cache.is_empty() {
                    return Err(err(at, "cache_store = \"redis\" has nothing to share: the upstream has no [[upstream.cache]] routes".into()));
                }
            }
            named
        }
    };
    for prefix in &u.skip_unchanged {
        if !prefix.get_ref().starts_with('/') {
            return Err(err(
                prefix.span().start,
                format!("skip_unchanged: '{}' must start with '/'", prefix.get_ref()),
            ));
        }
    }
    let dedup = tollgate_http::dedup::DedupSettings {
        idempotency: u.dedup.is_some(),
        skip_unchanged: u
            .skip_unchanged
            .iter()
            .map(|p| p.get_ref().clone())
            .collect(),
        window: match &u.dedup {
            Some(d) => duration(&Some(d.clone()), "dedup", DEDUP_WINDOW)?,
            None => DEDUP_WINDOW,
        },
        max_bytes: match &u.dedup_max_bytes {
            None => CACHE_BYTES,
            Some(b) if *b.get_ref() >= 4096 => *b.get_ref(),
            Some(b) => {
                return Err(err(
                    b.span().start,
                    format!("dedup_max_bytes must be at least 4096, got {}", b.get_ref()),
                ))
            }
        },
    };
    // (the reserve is of the configured limits; a budget's calls count
    // against its limit `of`, which keeps the reserve)
    let mut reserve = reserve_of(u.reserve.as_ref(), &policy, &err)?;
    let budgets = budgets_of(text, &u.budget, &mut policy, &err)?;
    reserve.resize(policy.limits.len(), 0.0);
    Ok(Upstream {
        reserve,
        budgets,
        base_url,
        policy,
        timeout: duration(&u.timeout, "timeout", Duration::from_secs(30))?,
        max_attempts: positive(&u.max_attempts, "max_attempts", 5, 100)? as u32,
        concurrency: positive(&u.concurrency, "concurrency", 16, 4096)? as usize,
        limit_headers: headers
            .iter()
            .map(|(name, value)| (name.clone(), stand_in(value)))
            .collect(),
        headers: Headers(headers),
        breaker,
        bulk,
        ca_file: u.ca_file.as_ref().map(|f| f.get_ref().into()),
        keys,
        key_header,
        intercept,
        cache,
        cache_store,
        dedup,
        name,
    })
}

/// `[[workflow]]` entries: each name once; a window needs both ends.
fn workflows(text: &str, raw: &[Spanned<RawWorkflow>]) -> Result<Vec<Workflow>, ConfigError> {
    let mut out: Vec<Workflow> = Vec::new();
    for w in raw {
        let r = w.get_ref();
        let name = r.name.get_ref().clone();
        let err = |offset: usize, msg: String| ConfigError {
            line: Some(line_of(text, offset)),
            message: format!("workflow '{name}': {msg}"),
        };
        if out.iter().any(|o| o.name == name) {
            return Err(err(r.name.span().start, "is defined twice".into()));
        }
        let time = |v: &Spanned<String>, field: &str| {
            crate::schedule::parse_time(v.get_ref())
                .map_err(|m| err(v.span().start, format!("{field}: {m}")))
        };
        let schedule = match (&r.start, &r.end) {
            (None, None) => {
                if let Some(v) = r
                    .timezone
                    .as_ref()
                    .map(|v| v.span().start)
                    .or(r.days.as_ref().map(|v| v.span().start))
                {
                    return Err(err(
                        v,
                        "timezone and days go with a window: give start and end".into(),
                    ));
                }
                None
            }
            (Some(start), Some(end)) => {
                let (s, e) = (time(start, "start")?, time(end, "end")?);
                if s == e {
                    return Err(err(
                        end.span().start,
                        "start and end are the same time: the window would be empty".into(),
                    ));
                }
                let tz_name = r.timezone.as_ref().map_or("UTC", |v| v.get_ref().as_str());
                let timezone = jiff::tz::TimeZone::get(tz_name).map_err(|_| {
                    err(
                        r.timezone.as_ref().map_or(w.span().start, |v| v.span().start),
                        format!("timezone '{tz_name}' is not a known IANA time zone (e.g. Europe/Paris, America/New_York)"),
                    )
                })?;
                let days = match &r.days {
                    Some(d) => crate::schedule::parse_days(d.get_ref())
                        .map_err(|m| err(d.span().start, m))?,
                    None => [true; 7],
                };
                Some(crate::schedule::Schedule {
                    workflow: name.clone(),
                    start: s,
                    end: e,
                    timezone,
                    days,
                })
            }
            (Some(v), None) | (None, Some(v)) => {
                return Err(err(
                    v.span().start,
                    "a window needs both start and end".into(),
                ))
            }
        };
        let callback = match &r.callback {
            Some(c) => Some(
                callback_url(c.get_ref())
                    .map_err(|m| err(c.span().start, format!("callback {m}")))?,
            ),
            None => None,
        };
        out.push(Workflow {
            name,
            schedule,
            callback,
        });
    }
    Ok(out)
}

/// A callback URL as given (a workflow's or a job's `callback`, the
/// `Tollgate-Callback` header): an http(s) URL with a host, or why not.
pub fn callback_url(text: &str) -> Result<String, String> {
    match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
            Ok(url.to_string())
        }
        Ok(_) => Err(format!("'{text}' is not an http(s) URL with a host")),
        Err(e) => Err(format!("'{text}' is not a URL: {e}")),
    }
}

/// A share written `"40%"`: above 0, at most 100% (`below_all`: under 100%).
fn percent(text: &str, below_all: bool) -> Option<f64> {
    let n: f64 = text.trim().strip_suffix('%')?.trim().parse().ok()?;
    let fits = n > 0.0 && (n < 100.0 || (!below_all && n == 100.0));
    fits.then_some(n / 100.0)
}

/// `[[upstream.budget]]`: each one a limit added to the policy.
fn budgets_of(
    text: &str,
    raw: &[Spanned<RawBudget>],
    policy: &mut Policy,
    err: &dyn Fn(usize, String) -> ConfigError,
) -> Result<Vec<Budget>, ConfigError> {
    let mut budgets: Vec<Budget> = Vec::new();
    for b in raw {
        let r = b.get_ref();
        let workflow = r.workflow.get_ref().trim().to_string();
        if workflow.is_empty() || workflow.len() > 128 {
            return Err(err(
                r.workflow.span().start,
                "budget workflow must be a name of 1 to 128 characters".into(),
            ));
        }
        let of = r.of.get_ref().clone();
        let share = percent(r.share.get_ref(), false).ok_or_else(|| {
            err(
                r.share.span().start,
                format!(
                    "budget share must be a share like \"40%\" (above 0%, at most 100%), got \"{}\"",
                    r.share.get_ref()
                ),
            )
        })?;
        let Some(parent) = policy.limits.iter().position(|l| l.name == of) else {
            let known: Vec<&str> = policy.limits.iter().map(|l| l.name.as_str()).collect();
            return Err(err(
                r.of.span().start,
                format!(
                    "budget of = \"{of}\": this upstream has no such limit (its limits: {})",
                    known.join(", ")
                ),
            ));
        };
        if policy.limits[parent].cost == tollgate_core::policy::Cost::Latency {
            return Err(err(
                r.of.span().start,
                format!("budget of = \"{of}\": a latency budget cannot be shared out by workflow"),
            ));
        }
        if budgets.iter().any(|o| o.of == of && o.workflow == workflow) {
            return Err(err(
                r.workflow.span().start,
                format!("workflow '{workflow}' has two budgets of limit '{of}'"),
            ));
        }
        let mut limit = policy.limits[parent].clone();
        limit.name = format!("{of}/{workflow}");
        limit.variants = limit.variants.iter().map(|v| v.scaled(share)).collect();
        limit
            .matcher
            .headers
            .push((crate::WORKFLOW_HEADER.to_string(), workflow.clone()));
        limit.lease = None;
        limit.line = line_of(text, b.span().start);
        limit.fingerprint = format!("{}|budget {workflow} {share}", limit.fingerprint);
        policy.limits.push(limit);
        budgets.push(Budget {
            workflow,
            share,
            of,
            limit: policy.limits.len() - 1,
            borrow: r.borrow,
        });
    }
    let mut parents: Vec<&str> = budgets.iter().map(|b| b.of.as_str()).collect();
    parents.dedup();
    for of in parents {
        let shares: Vec<&Budget> = budgets.iter().filter(|b| b.of == of).collect();
        let total: f64 = shares.iter().map(|b| b.share).sum();
        // (shares are whole hundredths in practice: compare in basis points)
        if (total * 10_000.0).round() > 10_000.0 {
            let parts: Vec<String> = shares
                .iter()
                .map(|b| format!("{} {}%", b.workflow, b.share * 100.0))
                .collect();
            let at = raw
                .iter()
                .rfind(|b| b.get_ref().of.get_ref() == of)
                .map_or(0, |b| b.span().start);
            return Err(err(
                at,
                format!(
                    "the budgets of limit '{of}' add up to {}% ({}); they may share at most 100% of it",
                    (total * 1000.0).round() / 10.0,
                    parts.join(", ")
                ),
            ));
        }
    }
    Ok(budgets)
}

/// Limit `limit`'s usage under `key` now (its default class).
pub fn usage_of(
    engine: &tollgate_store::Engine,
    limit: usize,
    key: compact_str::CompactString,
    now: tollgate_core::Nanos,
) -> tollgate_core::algo::Usage {
    let item = tollgate_core::Item {
        limit,
        class: 0,
        key,
        cost: 1,
        charge: 1,
    };
    engine.usage(&item, now)
}

/// `reserve`: one share for every limit, or a share per limit named.
fn reserve_of(
    raw: Option<&Spanned<toml::Value>>,
    policy: &Policy,
    err: &dyn Fn(usize, String) -> ConfigError,
) -> Result<Vec<f64>, ConfigError> {
    let mut shares = vec![0.0; policy.limits.len()];
    let Some(raw) = raw else {
        return Ok(shares);
    };
    let at = raw.span().start;
    let share = |value: &toml::Value, what: &str| -> Result<f64, ConfigError> {
        value
            .as_str()
            .and_then(|t| t.trim().strip_suffix('%'))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|n| *n > 0.0 && *n < 100.0)
            .map(|n| n / 100.0)
            .ok_or_else(|| {
                err(
                    at,
                    format!(
                        "{what} must be a share like \"20%\" (above 0%, below 100%), got {}",
                        match value {
                            toml::Value::String(t) => format!("\"{t}\""),
                            toml::Value::Integer(n) => n.to_string(),
                            toml::Value::Float(n) => n.to_string(),
                            other => format!("a {}", other.type_str()),
                        }
                    ),
                )
            })
    };
    match raw.get_ref() {
        toml::Value::Table(per_limit) => {
            for (name, value) in per_limit {
                let Some(i) = policy.limits.iter().position(|l| &l.name == name) else {
                    let known: Vec<&str> = policy.limits.iter().map(|l| l.name.as_str()).collect();
                    return Err(err(
                        at,
                        format!("reserve names limit '{name}', which this upstream does not have (its limits: {})", known.join(", ")),
                    ));
                };
                shares[i] = share(value, &format!("reserve {name}"))?;
            }
        }
        value => shares.fill(share(value, "reserve")?),
    }
    Ok(shares)
}

/// How long a write's answer is remembered when `dedup` does not say:
/// 10 minutes.
const DEDUP_WINDOW: Duration = Duration::from_secs(600);
/// A cache route's bytes when `max_bytes` is not given (and the writes'
/// when `dedup_max_bytes` is not): 64 MiB.
const CACHE_BYTES: u64 = 64 << 20;
/// The largest body kept by default: a sixteenth of the route's bytes (so
/// one large response does not empty the route), at most 8 MiB.
const CACHE_ENTRY_SHARE: u64 = 16;
const CACHE_ENTRY_BYTES: u64 = 8 << 20;

fn cache_route(
    text: &str,
    raw: &Spanned<RawCache>,
    upstream: &str,
) -> Result<tollgate_http::cache::CacheRoute, ConfigError> {
    let c = raw.get_ref();
    let prefix = c.path_prefix.get_ref().clone();
    let err = |offset: usize, msg: String| ConfigError {
        line: Some(line_of(text, offset)),
        message: format!("upstream '{upstream}', cache '{prefix}': {msg}"),
    };
    if !prefix.starts_with('/') {
        return Err(err(
            c.path_prefix.span().start,
            format!("path_prefix '{prefix}' must start with '/'"),
        ));
    }
    let methods = match &c.methods {
        None => vec!["GET".to_string(), "HEAD".to_string()],
        Some(m) => {
            let methods: Vec<String> = m.get_ref().iter().map(|m| m.to_ascii_uppercase()).collect();
            if methods.is_empty() || methods.iter().any(|m| m != "GET" && m != "HEAD") {
                return Err(err(
                    m.span().start,
                    format!(
                        "methods {:?}: only GET and HEAD are cached (writes evict instead)",
                        m.get_ref()
                    ),
                ));
            }
            methods
        }
    };
    let duration = |raw: &Spanned<String>, field: &str| match parse_duration(raw.get_ref()) {
        Ok(n) => Ok(Duration::from_nanos(n)),
        Err(e) => Err(err(raw.span().start, format!("{field}: {e}"))),
    };
    let ttl = duration(&c.ttl, "ttl")?;
    if ttl.is_zero() {
        return Err(err(c.ttl.span().start, "ttl must be above zero".into()));
    }
    let max_bytes = match &c.max_bytes {
        None => CACHE_BYTES,
        Some(b) if *b.get_ref() >= 4096 => *b.get_ref(),
        Some(b) => {
            return Err(err(
                b.span().start,
                format!("max_bytes must be at least 4096, got {}", b.get_ref()),
            ))
        }
    };
    let max_entry_bytes = match &c.max_entry_bytes {
        None => (max_bytes / CACHE_ENTRY_SHARE).min(CACHE_ENTRY_BYTES),
        Some(b) if (1..=max_bytes).contains(b.get_ref()) => *b.get_ref(),
        Some(b) => {
            return Err(err(
                b.span().start,
                format!(
                    "max_entry_bytes must be from 1 to max_bytes ({max_bytes}), got {}",
                    b.get_ref()
                ),
            ))
        }
    };
    let stale_if_error = match &c.stale_if_error {
        None => Duration::ZERO,
        Some(s) => duration(s, "stale_if_error")?,
    };
    Ok(tollgate_http::cache::CacheRoute {
        path_prefix: prefix,
        methods,
        ttl,
        max_bytes,
        max_entry_bytes,
        override_headers: c.override_headers.unwrap_or(false),
        stale_if_error,
    })
}

fn bulk_template(text: &str, raw: &Spanned<RawBulk>, upstream: &str) -> Result<Bulk, ConfigError> {
    let b = raw.get_ref();
    let line = line_of(text, raw.span().start);
    let name = b.name.get_ref().clone();
    let err = |offset: usize, msg: String| ConfigError {
        line: Some(line_of(text, offset)),
        message: format!("upstream '{upstream}', bulk '{name}': {msg}"),
    };
    let method = b.method.get_ref().to_ascii_uppercase();
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        return Err(err(
            b.method.span().start,
            format!("'{}' is not an HTTP method", b.method.get_ref()),
        ));
    }
    if let Some(why) = crate::sendable::unsent_method(&method) {
        return Err(err(
            b.method.span().start,
            format!("method {method}: {why}"),
        ));
    }
    if !b.path.get_ref().starts_with('/') {
        return Err(err(
            b.path.span().start,
            format!("path '{}' must start with '/'", b.path.get_ref()),
        ));
    }
    if http::uri::PathAndQuery::try_from(b.path.get_ref().as_str()).is_err() {
        return Err(err(
            b.path.span().start,
            format!(
                "path '{}' is not a URL path: write a space or another such character percent-encoded (a space is %20)",
                b.path.get_ref()
            ),
        ));
    }
    let body = serde_json::to_value(b.body.get_ref())
        .map_err(|e| err(b.body.span().start, format!("body: {e}")))?;
    let places = count_placeholders(&body);
    if places != 1 {
        return Err(err(
            b.body.span().start,
            format!("body must hold the string \"{RECORDS_PLACEHOLDER}\" exactly once (where each chunk of records goes), found it {places} times"),
        ));
    }
    let max_items = *b.max_items.get_ref();
    if !(1..=1_000_000).contains(&max_items) {
        return Err(err(
            b.max_items.span().start,
            format!("max_items must be from 1 to 1000000, got {max_items}"),
        ));
    }
    if let Some(p) = &b.priority {
        crate::lanes::Priority::parse(p.get_ref()).map_err(|m| err(p.span().start, m))?;
    }
    Ok(Bulk {
        name,
        method,
        path: b.path.get_ref().clone(),
        body,
        max_items: max_items as usize,
        priority: b.priority.as_ref().map(|p| p.get_ref().clone()),
        workflow: b.workflow.clone(),
        line,
    })
}

fn count_placeholders(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::String(s) => usize::from(s == RECORDS_PLACEHOLDER),
        serde_json::Value::Array(items) => items.iter().map(count_placeholders).sum(),
        serde_json::Value::Object(map) => map.values().map(count_placeholders).sum(),
        _ => 0,
    }
}

/// `${NAME}` replaced by the variable's value; Err(NAME) when it is not set.
fn expand_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let var = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(&env(var).ok_or_else(|| var.to_string())?);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Deserialize)]
struct RawRunner {
    #[serde(default)]
    upstream: Vec<Spanned<RawUpstream>>,
    #[serde(default)]
    workflow: Vec<Spanned<RawWorkflow>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: Spanned<String>,
    start: Option<Spanned<String>>,
    end: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    days: Option<Spanned<Vec<String>>>,
    callback: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    base_url: Spanned<String>,
    timeout: Option<Spanned<String>>,
    max_attempts: Option<Spanned<u64>>,
    concurrency: Option<Spanned<u64>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    breaker: Option<RawBreaker>,
    #[serde(default)]
    bulk: Vec<Spanned<RawBulk>>,
    ca_file: Option<Spanned<String>>,
    intercept: Option<Spanned<bool>>,
    #[serde(default)]
    keys: Vec<Spanned<String>>,
    key_header: Option<Spanned<String>>,
    key_format: Option<Spanned<String>>,
    #[serde(default)]
    cache: Vec<Spanned<RawCache>>,
    cache_store: Option<Spanned<String>>,
    dedup: Option<Spanned<String>>,
    #[serde(default)]
    skip_unchanged: Vec<Spanned<String>>,
    dedup_max_bytes: Option<Spanned<u64>>,
    /// `"20%"` for every limit, or `{ LIMIT = "20%", ... }`.
    reserve: Option<Spanned<toml::Value>>,
    #[serde(default)]
    budget: Vec<Spanned<RawBudget>>,
    /// Read by the policy parser.
    #[serde(rename = "profile")]
    _profile: Option<toml::Value>,
    #[serde(rename = "limit")]
    _limit: Option<toml::Value>,
    #[serde(rename = "class")]
    _class: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    workflow: Spanned<String>,
    share: Spanned<String>,
    of: Spanned<String>,
    #[serde(default)]
    borrow: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    path_prefix: Spanned<String>,
    methods: Option<Spanned<Vec<String>>>,
    ttl: Spanned<String>,
    max_bytes: Option<Spanned<u64>>,
    max_entry_bytes: Option<Spanned<u64>>,
    #[serde(rename = "override")]
    override_headers: Option<bool>,
    stale_if_error: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failures: Option<Spanned<u64>>,
    cooldown: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBulk {
    name: Spanned<String>,
    method: Spanned<String>,
    path: Spanned<String>,
    body: Spanned<toml::Value>,
    max_items: Spanned<u64>,
    priority: Option<Spanned<String>>,
    workflow: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::NoProfiles;

    const BASE: &str = "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9/api\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n";

    fn err(text: &str) -> String {
        parse(text, &NoProfiles, &|_| None).unwrap_err().to_string()
    }

    #[test]
    fn upstream_fields_and_defaults() {
        let c = parse(BASE, &NoProfiles, &|_| None).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.name, "crm");
        assert_eq!(u.max_attempts, 5);
        assert_eq!(u.timeout, Duration::from_secs(30));
        assert_eq!(u.policy.limits[0].name, "api");
        let url = |s: &str| Url::parse(s).unwrap();
        assert_eq!(c.upstream_for(&url("http://127.0.0.1:9/api/x")), Some(0));
        assert_eq!(c.upstream_for(&url("http://127.0.0.1:9/api")), Some(0));
        assert_eq!(c.upstream_for(&url("http://127.0.0.1:9/apix")), None);
        assert_eq!(c.upstream_for(&url("http://127.0.0.1:10/api/x")), None);
        assert_eq!(c.upstream_for(&url("https://127.0.0.1:9/api/x")), None);
    }

    #[test]
    fn headers_take_environment_variables() {
        let text = BASE.replace(
            "[[upstream.limit]]",
            "headers = { authorization = \"Bearer ${TOKEN}\" }\n[[upstream.limit]]",
        );
        let env = |name: &str| (name == "TOKEN").then(|| "s3cret".to_string());
        let c = parse(&text, &NoProfiles, &env).unwrap();
        assert_eq!(
            c.upstreams[0].headers.0,
            vec![("authorization".to_string(), "Bearer s3cret".to_string())]
        );
        let e = parse(&text, &NoProfiles, &|_| None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "line 4: upstream 'crm': header authorization: environment variable TOKEN is not set"
        );
    }

    #[test]
    fn a_key_pool_takes_its_keys_from_the_environment_and_never_prints_them() {
        let with =
            |keys: &str| BASE.replace("[[upstream.limit]]", &format!("{keys}\n[[upstream.limit]]"));
        let env = |name: &str| match name {
            "K1" => Some("s3cret-1".to_string()),
            "K2" => Some("s3cret-2".to_string()),
            "K3" => Some("s3cret-1".to_string()),
            _ => None,
        };
        let c = parse(&with("keys = [\"${K1}\", \"${K2}\"]"), &NoProfiles, &env).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.key_header, "authorization");
        assert_eq!(u.keys[0].value, "Bearer s3cret-1");
        assert_eq!(u.keys[1].label, "${K2}");
        let shown = format!("{u:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        let with_header = with("headers = { x-api-key = \"${K1}\" }");
        let c = parse(&with_header, &NoProfiles, &env).unwrap();
        let shown = format!("{:?}", c.upstreams[0]);
        assert!(
            shown.contains("x-api-key") && !shown.contains("s3cret"),
            "{shown}"
        );
        let c = parse(
            &with("keys = [\"${K1}\"]\nkey_header = \"X-Api-Key\""),
            &NoProfiles,
            &env,
        )
        .unwrap();
        assert_eq!(
            (
                c.upstreams[0].key_header.as_str(),
                c.upstreams[0].keys[0].value.as_str()
            ),
            ("x-api-key", "s3cret-1")
        );
        let err = |keys: &str| {
            parse(&with(keys), &NoProfiles, &env)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("keys = [\"${K4}\"]"),
            "line 4: upstream 'crm': keys: environment variable K4 is not set"
        );
        assert_eq!(
            err("keys = [\"${K1}\", \"${K3}\"]"),
            "line 4: upstream 'crm': keys: ${K3} is the same key as ${K1}"
        );
        assert_eq!(
            err("keys = [\"${K1}\", \"s3cret-9\"]"),
            "line 4: upstream 'crm': keys: key 2 is written in the file; give it as \"${VARIABLE}\" and set the variable"
        );
        assert!(err("keys = [\"${K1}\"]\nkey_format = \"Token\"")
            .contains("key_format 'Token' must hold {key} exactly once"));
        assert!(
            err("keys = [\"${K1}\"]\nheaders = { authorization = \"x\" }")
                .contains("both headers.authorization and keys are set")
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        assert_eq!(
            err(&BASE.replace("http://127.0.0.1:9/api", "ftp://x")),
            "line 3: upstream 'crm': base_url 'ftp://x' is not an http(s) URL with a host"
        );
        // A credential or query in the base URL is refused and never echoed.
        for (url, says) in [
            (
                "http://user:s3cretpw@127.0.0.1:9/api",
                "user name or password",
            ),
            ("http://s3cretpw@127.0.0.1:9/api", "user name or password"),
            ("http://127.0.0.1:9/api?api_key=s3cretpw", "query string"),
            ("ftp://user:s3cretpw@x", "is not an http(s) URL"),
        ] {
            let e = err(&BASE.replace("http://127.0.0.1:9/api", url));
            assert!(e.starts_with("line 3: upstream 'crm': base_url"), "{e}");
            assert!(e.contains(says) && !e.contains("s3cretpw"), "{e}");
        }
        assert!(
            err(&BASE.replace("base_url", "base_ur")).contains("line 3"),
            "{}",
            err(&BASE.replace("base_url", "base_ur"))
        );
        assert_eq!(
            err(&format!("{BASE}[[upstream.bulk]]\nname = \"b\"\nmethod = \"POST\"\npath = \"/graphql\"\nmax_items = 200\nbody = {{ ids = \"records\" }}\n")),
            "line 14: upstream 'crm', bulk 'b': body must hold the string \"{{records}}\" exactly once (where each chunk of records goes), found it 0 times"
        );
        assert_eq!(
            err(&format!("{BASE}[[upstream.bulk]]\nname = \"b\"\nmethod = \"POST\"\npath = \"/bulk import\"\nmax_items = 200\nbody = {{ ids = \"{{{{records}}}}\" }}\n")),
            "line 12: upstream 'crm', bulk 'b': path '/bulk import' is not a URL path: write a space or another such character percent-encoded (a space is %20)"
        );
        assert!(err(&BASE.replace("quota = 100", "quota = 0"))
            .starts_with("line 8: upstream 'crm': limit 'api': quota must be at least 1"));
        assert_eq!(err("[[limit]]\nname = \"a\"\nalgorithm = \"concurrency\"\nmax = 1\n"), "the config has no [[upstream]] entries; `tollgate run` sends jobs only to upstreams it knows");
    }

    #[test]
    fn cache_routes_take_defaults_and_refuse_what_cannot_work() {
        let with = |table: &str| format!("{BASE}[[upstream.cache]]\n{table}\n");
        let c = parse(
            &with("path_prefix = \"/v1/sites\"\nttl = \"10m\""),
            &NoProfiles,
            &|_| None,
        )
        .unwrap();
        let route = &c.upstreams[0].cache[0];
        assert_eq!(route.path_prefix, "/v1/sites");
        assert_eq!(route.methods, ["GET", "HEAD"]);
        assert_eq!(route.ttl, Duration::from_secs(600));
        assert_eq!(
            (route.max_bytes, route.max_entry_bytes),
            (64 << 20, 4 << 20)
        );
        assert!(!route.override_headers);
        assert_eq!(route.stale_if_error, Duration::ZERO);
        for (table, message) in [
            ("path_prefix = \"v1\"\nttl = \"1m\"", "line 10: upstream 'crm', cache 'v1': path_prefix 'v1' must start with '/'"),
            ("path_prefix = \"/v1\"\nttl = \"0s\"", "line 11: upstream 'crm', cache '/v1': ttl must be above zero"),
            ("path_prefix = \"/v1\"\nttl = \"1m\"\nmethods = [\"POST\"]", "line 12: upstream 'crm', cache '/v1': methods [\"POST\"]: only GET and HEAD are cached (writes evict instead)"),
            ("path_prefix = \"/v1\"\nttl = \"1m\"\nmax_bytes = 10", "line 12: upstream 'crm', cache '/v1': max_bytes must be at least 4096, got 10"),
            ("path_prefix = \"/v1\"\nttl = \"1m\"\nmax_bytes = 4096\nmax_entry_bytes = 8192", "line 13: upstream 'crm', cache '/v1': max_entry_bytes must be from 1 to max_bytes (4096), got 8192"),
        ] {
            assert_eq!(err(&with(table)), message);
        }
        assert!(
            err(&with("path_prefix = \"/v1\"")).contains("ttl"),
            "{}",
            err(&with("path_prefix = \"/v1\""))
        );
        assert!(err(&with("path_prefix = \"/v1\"\nttl = \"1m\"\nttl_max = 1")).contains("ttl_max"));
    }

    #[test]
    fn cache_store_is_memory_or_the_fleets_redis() {
        let with = |store: &str, line: &str| {
            format!(
                "{store}{}",
                BASE.replace("[[upstream.limit]]", &format!("{line}\n[[upstream.limit]]"))
            ) + "[[upstream.cache]]\npath_prefix = \"/v1\"\nttl = \"1m\"\n"
        };
        let redis = "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n";
        let store =
            |text: &str| parse(text, &NoProfiles, &|_| None).unwrap().upstreams[0].cache_store;
        use tollgate_http::cache::CacheStore;
        assert_eq!(store(&with("", "")), CacheStore::Memory);
        assert_eq!(
            store(&with(redis, "cache_store = \"redis\"")),
            CacheStore::Redis
        );
        assert_eq!(
            store(&with(redis, "cache_store = \"memory\"")),
            CacheStore::Memory
        );
        assert_eq!(
            err(&with("", "cache_store = \"redis\"")),
            "line 4: upstream 'crm': cache_store = \"redis\" keeps the cache in the fleet's Redis: add [store] kind = \"redis\" (or drop cache_store)"
        );
        assert_eq!(
            err(&with(redis, "cache_store = \"disk\"")),
            "line 7: upstream 'crm': cache_store 'disk': expected \"memory\" or \"redis\""
        );
        let without_routes = format!(
            "{redis}{}",
            BASE.replace(
                "[[upstream.limit]]",
                "cache_store = \"redis\"\n[[upstream.limit]]"
            )
        );
        assert!(
            err(&without_routes).contains("has nothing to share"),
            "{}",
            err(&without_routes)
        );
    }

    #[test]
    fn dedup_and_skip_unchanged_take_a_window_and_paths() {
        let with = |lines: &str| {
            BASE.replace(
                "[[upstream.limit]]",
                &format!("{lines}\n[[upstream.limit]]"),
            )
        };
        let c = parse(
            &with("dedup = \"5m\"\nskip_unchanged = [\"/v1/contacts\"]"),
            &NoProfiles,
            &|_| None,
        )
        .unwrap();
        let d = &c.upstreams[0].dedup;
        assert!(d.idempotency);
        assert_eq!(d.window, Duration::from_secs(300));
        assert_eq!(d.skip_unchanged, ["/v1/contacts"]);
        let c = parse(
            &with("skip_unchanged = [\"/v1/contacts\"]"),
            &NoProfiles,
            &|_| None,
        )
        .unwrap();
        let d = &c.upstreams[0].dedup;
        assert!(!d.idempotency, "repeated keys go through without dedup");
        assert_eq!(d.window, Duration::from_secs(600));
        assert!(parse(BASE, &NoProfiles, &|_| None).unwrap().upstreams[0]
            .dedup
            .is_off());
        assert_eq!(
            err(&with("skip_unchanged = [\"v1\"]")),
            "line 4: upstream 'crm': skip_unchanged: 'v1' must start with '/'"
        );
        assert_eq!(
            err(&with("dedup = \"0s\"")),
            "line 4: upstream 'crm': dedup must be above zero"
        );
        assert_eq!(
            err(&with("dedup = \"10m\"\ndedup_max_bytes = 1")),
            "line 5: upstream 'crm': dedup_max_bytes must be at least 4096, got 1"
        );
    }

    #[test]
    fn a_reserve_is_a_share_of_every_limit_or_of_the_limits_named() {
        let with = |line: &str| {
            BASE.replace(
                "[[upstream.limit]]",
                &format!("{line}\n[[upstream.limit]]"),
            ) + "[[upstream.limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 1000\n"
        };
        let shares = |line: &str| {
            parse(&with(line), &NoProfiles, &|_| None)
                .unwrap()
                .upstreams[0]
                .reserve
                .clone()
        };
        assert_eq!(shares(""), vec![0.0, 0.0]);
        assert_eq!(shares("reserve = \"20%\""), vec![0.2, 0.2]);
        assert_eq!(shares("reserve = { daily = \"30%\" }"), vec![0.0, 0.3]);
        assert_eq!(
            err(&with("reserve = { weekly = \"30%\" }")),
            "line 4: upstream 'crm': reserve names limit 'weekly', which this upstream does not have (its limits: api, daily)"
        );
        assert_eq!(
            err(&with("reserve = \"100%\"")),
            "line 4: upstream 'crm': reserve must be a share like \"20%\" (above 0%, below 100%), got \"100%\""
        );
        assert_eq!(
            err(&with("reserve = { api = 0.2 }")),
            "line 4: upstream 'crm': reserve api must be a share like \"20%\" (above 0%, below 100%), got 0.2"
        );
    }

    #[test]
    fn budgets_are_shares_of_a_limit_that_add_up_to_at_most_all_of_it() {
        let with = |budgets: &str| format!("{BASE}{budgets}");
        let budget = |workflow: &str, share: &str| {
            format!("[[upstream.budget]]\nworkflow = \"{workflow}\"\nshare = \"{share}\"\nof = \"api\"\n")
        };
        let c = parse(&with(&budget("sync", "40%")), &NoProfiles, &|_| None).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.budgets[0].limit, 1);
        let own = &u.policy.limits[1];
        assert_eq!(own.name, "api/sync");
        assert_eq!(own.variants[0].policy().0, 40);
        assert_eq!(
            own.matcher.headers,
            vec![("tollgate-workflow".to_string(), "sync".to_string())]
        );
        assert_ne!(own.fingerprint, u.policy.limits[0].fingerprint);
        assert_eq!(
            err(&with(&(budget("sync", "60%") + &budget("enrich", "50%")))),
            "line 13: upstream 'crm': the budgets of limit 'api' add up to 110% (sync 60%, enrich 50%); they may share at most 100% of it"
        );
        assert_eq!(
            err(&with(&(budget("sync", "10%") + &budget("sync", "20%")))),
            "line 14: upstream 'crm': workflow 'sync' has two budgets of limit 'api'"
        );
        assert_eq!(
            err(&with(&budget("sync", "0.4"))),
            "line 11: upstream 'crm': budget share must be a share like \"40%\" (above 0%, at most 100%), got \"0.4\""
        );
        assert_eq!(
            err(&with("[[upstream.budget]]\nworkflow = \"sync\"\nshare = \"40%\"\nof = \"daily\"\n")),
            "line 12: upstream 'crm': budget of = \"daily\": this upstream has no such limit (its limits: api)"
        );
    }

    #[test]
    fn workflows_have_a_window_in_a_time_zone_and_a_callback() {
        let c = parse(
            &format!("{BASE}[[workflow]]\nname = \"enrichment\"\nstart = \"06:00\"\nend = \"08:00\"\ntimezone = \"America/New_York\"\ndays = [\"mon\", \"fri\"]\ncallback = \"https://hooks.example/done\"\n[[workflow]]\nname = \"sync\"\n"),
            &NoProfiles,
            &|_| None,
        )
        .unwrap();
        let w = c.workflow("enrichment").unwrap();
        let s = w.schedule.as_ref().unwrap();
        assert_eq!((s.start, s.end), (360, 480));
        assert_eq!(s.days, [true, false, false, false, true, false, false]);
        assert_eq!(w.callback.as_deref(), Some("https://hooks.example/done"));
        assert!(c.workflow("sync").unwrap().schedule.is_none());
        assert_eq!(c.schedules().len(), 1);
        let bad = |lines: &str| err(&format!("{BASE}[[workflow]]\nname = \"w\"\n{lines}\n"));
        assert_eq!(
            bad("start = \"06:00\""),
            "line 11: workflow 'w': a window needs both start and end"
        );
        assert_eq!(
            bad("start = \"6\"\nend = \"08:00\""),
            "line 11: workflow 'w': start: '6' is not a time of day like \"06:00\""
        );
        assert_eq!(
            bad("start = \"06:00\"\nend = \"08:00\"\ntimezone = \"Mars/Olympus\""),
            "line 13: workflow 'w': timezone 'Mars/Olympus' is not a known IANA time zone (e.g. Europe/Paris, America/New_York)"
        );
        assert_eq!(
            bad("callback = \"mailto:a@b.example\""),
            "line 11: workflow 'w': callback 'mailto:a@b.example' is not an http(s) URL with a host"
        );
        assert_eq!(
            bad("timezone = \"UTC\""),
            "line 11: workflow 'w': timezone and days go with a window: give start and end"
        );
    }
}
