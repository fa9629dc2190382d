//! Parse and validate the policy language (TOML) into a `Policy`.
//! Every error names the line and, where there is one, the limit and field.

use crate::algo::concurrency::ConcurrencyParams;
use crate::algo::fixed_window::FixedWindowParams;
use crate::algo::gcra::GcraParams;
use crate::algo::sliding_window::SlidingWindowParams;
use crate::algo::tiered::{Tier, TieredParams};
use crate::calendar::Calendar;
use crate::policy::*;
use crate::units::{parse_duration, Nanos, Rate, NANOS_PER_MICRO, NANOS_PER_SEC};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use toml::Spanned;

/// A config error: the line it is on (1-based) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The 1-based line the error is on, when it is known.
    pub line: Option<usize>,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A config file that could not be loaded: its error with the file's name
/// (`FILE:LINE: message`, as compilers write it), or what could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file was read, and its config is not valid.
    #[error("{path}{}: {}", error.line.map_or(String::new(), |l| format!(":{l}")), error.message)]
    Config {
        /// The file.
        path: String,
        /// What is wrong, and on which line.
        error: ConfigError,
    },
    /// The file could not be read.
    #[error("{0}")]
    Io(String),
}

/// Where `profile = "NAME"` looks up a profile's text.
pub trait ProfileSource {
    /// The text of the profile `name`, if there is one.
    fn profile_text(&self, name: &str) -> Option<&str>;
    /// Every profile's name, for messages.
    fn profile_names(&self) -> Vec<String>;
}

/// No profiles: a config that includes one is an error.
#[derive(Debug)]
pub struct NoProfiles;

impl ProfileSource for NoProfiles {
    fn profile_text(&self, _name: &str) -> Option<&str> {
        None
    }
    fn profile_names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Default sub-windows per sliding window: worst-case under-admission is one
/// sub-window's events, i.e. 1/60 of the window.
pub const DEFAULT_SEGMENTS: u32 = 60;
/// Each sub-window costs 8 bytes per tracked key.
pub const MAX_SEGMENTS: u32 = 1000;
/// Largest class scale: keeps scaled quotas far from overflow.
pub const MAX_SCALE: f64 = 1e6;

/// Parse a config. Limits of an included profile come first; a config limit
/// with the same name replaces the profile's. A config may hold no top-level
/// limit when it has `[[upstream]]` entries (a runner's config); see
/// [`parse_upstreams`] for theirs.
pub fn parse(text: &str, profiles: &dyn ProfileSource) -> Result<Policy, ConfigError> {
    let raw: RawConfig = from_toml(text)?;
    // Parsed once more as plain values: the fingerprints of limits and classes.
    let values: toml::Table = toml::from_str(text).unwrap_or_default();
    let ctx = Ctx { text };
    let mut policy = ctx.assemble(
        raw.profile.as_ref(),
        &raw.class,
        &raw.limit,
        |table, i| fingerprint(values.get(table), i),
        profiles,
    )?;
    if policy.limits.is_empty() && raw.upstream.is_empty() {
        return Err(ConfigError {
            line: None,
            message: "the config has no [[limit]] entries (and no profile)".into(),
        });
    }
    policy.store = ctx.store(raw.store.as_ref())?;
    if let Some(limit) = policy.limits.iter().find(|l| l.lease.is_some()) {
        if policy.store.redis.is_none() {
            return Err(ConfigError {
                line: Some(limit.line),
                message: format!("limit '{}': lease needs [store] kind = \"redis\" (it lends a slice of a quota a fleet shares; in memory every decision is already local)", limit.name),
            });
        }
    }
    Ok(policy)
}

/// One `[[upstream]]` of a runner's config: its name, the line it starts
/// on, and its policy (its `profile` and its own `[[upstream.limit]]`
/// entries, with the config's `[store]`).
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    /// The upstream's name.
    pub name: String,
    /// The line its table starts on.
    pub line: usize,
    /// Its limits.
    pub policy: Policy,
}

/// The policies of a config's `[[upstream]]` entries, in file order. Their
/// other fields (base_url, timeouts, bulk templates) belong to the runner.
pub fn parse_upstreams(
    text: &str,
    profiles: &dyn ProfileSource,
) -> Result<Vec<UpstreamPolicy>, ConfigError> {
    let raw: RawConfig = from_toml(text)?;
    let values: toml::Table = toml::from_str(text).unwrap_or_default();
    let ctx = Ctx { text };
    let store = ctx.store(raw.store.as_ref())?;
    let mut seen = BTreeMap::new();
    let mut upstreams = Vec::with_capacity(raw.upstream.len());
    for (u, raw_upstream) in raw.upstream.iter().enumerate() {
        let up = raw_upstream.get_ref();
        let name = up.name.get_ref().clone();
        let line = line_of(text, raw_upstream.span().start);
        if let Some(first) = seen.insert(name.clone(), line) {
            return Err(ConfigError {
                line: Some(line),
                message: format!(
                    "upstream '{name}' is defined twice (first on line {first}); names must be unique"
                ),
            });
        }
        let own = values
            .get("upstream")
            .and_then(|v| v.get(u))
            .cloned()
            .unwrap_or(toml::Value::Table(Default::default()));
        let mut policy = ctx
            .assemble(
                up.profile.as_ref(),
                &up.class,
                &up.limit,
                |table, i| fingerprint(own.get(table), i),
                profiles,
            )
            .map_err(|e| ConfigError {
                line: e.line,
                message: format!("upstream '{name}': {}", e.message),
            })?;
        if let Some(limit) = policy.limits.iter().find(|l| l.lease.is_some()) {
            return Err(ConfigError {
                line: Some(limit.line),
                message: format!("upstream '{name}': limit '{}': lease applies to `tollgate serve`'s limits; the comply side decides each call on the shared quota", limit.name),
            });
        }
        if policy.limits.is_empty() {
            return Err(ctx.err(
                raw_upstream.span().start,
                format!("upstream '{name}' has no limits: give it a profile or [[upstream.limit]] entries"),
            ));
        }
        policy.store = store.clone();
        upstreams.push(UpstreamPolicy { name, line, policy });
    }
    Ok(upstreams)
}

fn from_toml(text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| s.start);
        let message = match at.and_then(|at| enclosing_limit(text, at)) {
            Some(name) => format!("limit '{name}': {}", e.message()),
            None => e.message().to_string(),
        };
        ConfigError {
            line: at.map(|at| line_of(text, at)),
            message,
        }
    })
}

/// The `i`th entry of an array of tables, as parsed: two limits with the same
/// fingerprint count alike.
fn fingerprint(array: Option<&toml::Value>, i: usize) -> String {
    // A lease changes who decides, not how a key counts: adding or editing
    // one keeps the counters.
    let mut entry = array.and_then(|v| v.get(i)).cloned();
    if let Some(toml::Value::Table(t)) = entry.as_mut() {
        t.remove("lease");
    }
    entry.map_or_else(String::new, |v| format!("{v:?}"))
}

impl Ctx<'_> {
    /// A policy from an optional profile, classes and limits (without the
    /// store settings, which are the config's).
    fn assemble(
        &self,
        profile_name: Option<&Spanned<String>>,
        raw_classes: &[Spanned<RawClass>],
        raw_limits: &[Spanned<RawLimit>],
        fingerprint_of: impl Fn(&str, usize) -> String,
        profiles: &dyn ProfileSource,
    ) -> Result<Policy, ConfigError> {
        let text = self.text;
        let mut limits: Vec<Limit> = Vec::new();
        let mut classes: Vec<Class> = Vec::new();
        let profile = profile_name.map(|p| p.get_ref().clone());
        if let Some(name) = profile_name {
            let Some(profile_text) = profiles.profile_text(name.get_ref()) else {
                return Err(self.err(
                    name.span().start,
                    format!(
                        "profile '{}' is not known; known profiles: {}",
                        name.get_ref(),
                        profiles.profile_names().join(", ")
                    ),
                ));
            };
            let included = parse(profile_text, &NoProfiles).map_err(|e| ConfigError {
                line: Some(line_of(text, name.span().start)),
                message: format!("in profile '{}': {e}", name.get_ref()),
            })?;
            limits = included.limits;
            classes = included.classes;
        }

        let mut seen = BTreeMap::new();
        for raw_class in raw_classes {
            let line = line_of(text, raw_class.span().start);
            add_named(
                &mut classes,
                &mut seen,
                "class",
                self.class(raw_class)?,
                line,
                |c| &c.name,
            )?;
        }
        let mut seen = BTreeMap::new();
        for (i, raw_limit) in raw_limits.iter().enumerate() {
            let mut limit = self.limit(raw_limit)?;
            limit.fingerprint = fingerprint_of("limit", i);
            let line = limit.line;
            add_named(&mut limits, &mut seen, "limit", limit, line, |l| &l.name)?;
        }
        // Profile limits were built before this config's classes: give them every
        // class, then each override. A limit's counters depend on the classes too.
        let classes_fingerprint: String = (0..raw_classes.len())
            .map(|i| fingerprint_of("class", i))
            .chain(classes.iter().map(|c| format!("{}={}", c.name, c.scale)))
            .collect();
        for limit in &mut limits {
            let base = limit.variants[0].clone();
            limit.variants = std::iter::once(base.clone())
                .chain(classes.iter().map(|c| base.scaled(c.scale)))
                .chain(limit.overrides.iter().map(|o| base.scaled(o.scale)))
                .collect();
            limit.fingerprint.push_str(&classes_fingerprint);
        }
        Ok(Policy {
            limits,
            classes,
            store: StoreSettings::default(),
            profile,
        })
    }

    fn store(&self, raw: Option<&RawStore>) -> Result<StoreSettings, ConfigError> {
        let mut store = StoreSettings::default();
        if let Some(s) = raw {
            let redis = match s.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
                None | Some(("memory", _)) => false,
                Some(("redis", _)) => true,
                Some((other, span)) => {
                    return Err(self.err(
                        span.start,
                        format!("store kind '{other}' is not known; use \"memory\" or \"redis\""),
                    ))
                }
            };
            let redis_only = [
                ("url", s.url.as_ref().map(|v| v.span())),
                ("prefix", s.prefix.as_ref().map(|v| v.span())),
                ("timeout", s.timeout.as_ref().map(|v| v.span())),
                ("pool", s.pool.as_ref().map(|v| v.span())),
                ("local_share", s.local_share.as_ref().map(|v| v.span())),
                (
                    "remember_denials",
                    s.remember_denials.as_ref().map(|v| v.span()),
                ),
            ];
            if !redis {
                if let Some((field, Some(span))) = redis_only.iter().find(|(_, sp)| sp.is_some()) {
                    return Err(self.err(
                        span.start,
                        format!("store {field} applies to kind = \"redis\" only"),
                    ));
                }
            } else {
                store.redis = Some(self.redis(s)?);
            }
            if let Some(max) = &s.max_keys {
                if *max.get_ref() == 0 {
                    return Err(
                        self.err(max.span().start, "store max_keys must be at least 1".into())
                    );
                }
                store.max_keys = *max.get_ref() as usize;
            }
        }
        Ok(store)
    }

    fn redis(&self, s: &RawStore) -> Result<RedisSettings, ConfigError> {
        let Some(url) = &s.url else {
            return Err(self.err(
                s.kind.as_ref().map_or(0, |k| k.span().start),
                "store kind = \"redis\" needs url = \"redis://host:port\"".into(),
            ));
        };
        let schemes = ["redis://", "rediss://", "redis+unix://", "unix://"];
        if !schemes.iter().any(|p| url.get_ref().starts_with(p)) {
            return Err(self.err(
                url.span().start,
                format!(
                    "store url '{}' is not a Redis URL; use redis://host:port[/db], rediss://... or redis+unix:///path",
                    url.get_ref()
                ),
            ));
        }
        let defaults = RedisSettings::new(url.get_ref().clone());
        let prefix = match &s.prefix {
            None => defaults.prefix.clone(),
            Some(p) if p.get_ref().is_empty() || p.get_ref().contains(char::is_whitespace) => {
                return Err(self.err(
                    p.span().start,
                    "store prefix must be a non-empty word without spaces".into(),
                ))
            }
            Some(p) => p.get_ref().clone(),
        };
        let timeout = match &s.timeout {
            None => defaults.timeout,
            Some(t) => match parse_duration(t.get_ref()) {
                Ok(0) => {
                    return Err(self.err(t.span().start, "store timeout must be above 0".into()))
                }
                Ok(n) => n,
                Err(m) => return Err(self.err(t.span().start, format!("store timeout: {m}"))),
            },
        };
        let pool = match &s.pool {
            None => defaults.pool,
            Some(p) if (1..=64).contains(p.get_ref()) => *p.get_ref() as usize,
            Some(p) => {
                return Err(self.err(
                    p.span().start,
                    "store pool must be 1 to 64 connections".into(),
                ))
            }
        };
        let local_share = match &s.local_share {
            None => defaults.local_share,
            Some(f) if *f.get_ref() > 0.0 && *f.get_ref() <= 1.0 => *f.get_ref(),
            Some(f) => {
                return Err(self.err(
                    f.span().start,
                    format!(
                        "store local_share must be above 0 and at most 1, got {}",
                        f.get_ref()
                    ),
                ))
            }
        };
        Ok(RedisSettings {
            prefix,
            timeout,
            pool,
            local_share,
            remember_denials: s
                .remember_denials
                .as_ref()
                .map_or(defaults.remember_denials, |r| *r.get_ref()),
            ..defaults
        })
    }
}

/// Add a limit or class defined on `line`. Names are unique within a file;
/// one named like an entry of the included profile replaces it in place (so
/// order, e.g. which class matches first, does not change).
fn add_named<T>(
    list: &mut Vec<T>,
    seen: &mut BTreeMap<String, usize>,
    kind: &str,
    entry: T,
    line: usize,
    name_of: impl Fn(&T) -> &String,
) -> Result<(), ConfigError> {
    let name = name_of(&entry).clone();
    if let Some(first) = seen.insert(name.clone(), line) {
        return Err(ConfigError {
            line: Some(line),
            message: format!(
                "{kind} '{name}' is defined twice (first on line {first}); names must be unique"
            ),
        });
    }
    match list.iter_mut().find(|e| *name_of(e) == name) {
        Some(existing) => *existing = entry,
        None => list.push(entry),
    }
    Ok(())
}

/// The name of the `[[limit]]` whose text contains `offset`, if any.
fn enclosing_limit(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    let start = before.rfind("[[limit]]")?;
    if before[start + 9..].contains("\n[") {
        return None; // another table began after it
    }
    let end = text[start + 9..]
        .find("\n[")
        .map_or(text.len(), |i| start + 9 + i);
    text[start..end].lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "name").then(|| value.trim().trim_matches('"').to_string())
    })
}

/// Read a face's own tables (`[gateway]`, `[proxy]`, `[[upstream]]`) from
/// a config's text; a TOML error names its line.
pub fn read_tables<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let field = e.span().and_then(|s| field_at(text, s.start));
        let message = plain_types(e.message());
        ConfigError {
            line: e.span().map(|s| line_of(text, s.start)),
            message: match field {
                // (serde's message names the value, not where it is; an
                // unknown field's names the field already)
                Some((field, key)) if !message.contains(&format!("`{key}`")) => {
                    format!("{field}: {message}")
                }
                _ => message,
            },
        }
    })
}

/// The field written at byte `offset` of a TOML text, with its table (e.g.
/// `[gateway] max_held`), and its key alone, for an error about its value.
fn field_at(text: &str, offset: usize) -> Option<(String, String)> {
    let before = text.get(..offset.min(text.len()))?;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .trim()
        });
    let field = match table {
        Some(table) if !table.is_empty() => format!("[{table}] {key}"),
        _ => key.to_string(),
    };
    Some((field, key.to_string()))
}

/// serde's type names as a config's reader knows them.
fn plain_types(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected f64", "expected a number"),
    ] {
        m = m.replace(rust, plain);
    }
    m
}

/// A `host:port` field (`what` names it, e.g. "proxy listen"), or an error
/// on its line with an example of one.
pub fn socket_address(
    text: &str,
    value: &Spanned<String>,
    what: &str,
    example: &str,
) -> Result<std::net::SocketAddr, ConfigError> {
    value.get_ref().parse().map_err(|_| ConfigError {
        line: Some(line_of(text, value.span().start)),
        message: format!(
            "{what} '{}' is not an address; write e.g. \"{example}\"",
            value.get_ref()
        ),
    })
}

/// The 1-based line of byte `offset` in `text` (for errors naming a line).
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    profile: Option<Spanned<String>>,
    #[serde(default)]
    limit: Vec<Spanned<RawLimit>>,
    #[serde(default)]
    class: Vec<Spanned<RawClass>>,
    store: Option<RawStore>,
    /// Profile metadata (name, source, notes): documentation only.
    #[serde(rename = "about")]
    _about: Option<toml::Table>,
    /// The faces' own tables, read and checked by the gateway and runner.
    #[serde(rename = "gateway")]
    _gateway: Option<toml::Value>,
    #[serde(rename = "response")]
    _response: Option<toml::Value>,
    #[serde(rename = "proxy")]
    _proxy: Option<toml::Value>,
    #[serde(rename = "rls")]
    _rls: Option<toml::Value>,
    #[serde(rename = "workflow")]
    _workflow: Option<toml::Value>,
    /// History and alerts, read by every face (tollgate-watch).
    #[serde(rename = "history")]
    _history: Option<toml::Value>,
    #[serde(rename = "alerts")]
    _alerts: Option<toml::Value>,
    #[serde(rename = "alert")]
    _alert: Option<toml::Value>,
    /// A runner's upstreams: their limits are read here, their other
    /// fields by the runner.
    #[serde(default)]
    upstream: Vec<Spanned<RawUpstream>>,
}

/// The policy part of an `[[upstream]]`; other fields are ignored here.
#[derive(Deserialize)]
struct RawUpstream {
    name: Spanned<String>,
    profile: Option<Spanned<String>>,
    #[serde(default)]
    limit: Vec<Spanned<RawLimit>>,
    #[serde(default)]
    class: Vec<Spanned<RawClass>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<Spanned<String>>,
    max_keys: Option<Spanned<u64>>,
    url: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    pool: Option<Spanned<u64>>,
    local_share: Option<Spanned<f64>>,
    remember_denials: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: Spanned<String>,
    #[serde(rename = "match")]
    matcher: Option<Spanned<RawMatch>>,
    scale: Spanned<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    methods: Vec<String>,
    path_prefix: Option<String>,
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    domain: Option<String>,
    #[serde(default)]
    descriptor_keys: Vec<String>,
    #[serde(default)]
    descriptors: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    name: Spanned<String>,
    key: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(rename = "match")]
    matcher: Option<Spanned<RawMatch>>,
    algorithm: Spanned<String>,
    capacity: Option<Spanned<u64>>,
    refill: Option<Spanned<String>>,
    hold: Option<Spanned<String>>,
    cost: Option<Spanned<RawCost>>,
    mode: Option<Spanned<String>>,
    every: Option<Spanned<String>>,
    quota: Option<Spanned<RawAmount>>,
    timezone: Option<Spanned<String>>,
    segments: Option<Spanned<u32>>,
    tiers: Option<Spanned<Vec<Spanned<RawTier>>>>,
    max: Option<Spanned<u64>>,
    missing_key: Option<Spanned<String>>,
    fail: Option<Spanned<String>>,
    lease: Option<Spanned<RawLease>>,
    overrides: Option<Vec<Spanned<RawOverride>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLease {
    max: Spanned<u64>,
    ttl: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    key: Spanned<RawKey>,
    scale: Spanned<f64>,
}

enum RawKey {
    One(String),
    Parts(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    every: Spanned<String>,
    quota: Spanned<RawAmount>,
}

enum RawAmount {
    Count(u64),
    Text(String),
}

enum RawCost {
    Name(String),
    Table(BTreeMap<String, String>),
}

// The values that take one of several shapes say which shapes, and name
// their field, when given another (serde's untagged enums only say that
// "data did not match any variant").
use serde::de::{self, value::MapAccessDeserializer, value::SeqAccessDeserializer, Visitor};

const AMOUNT_SHAPES: &str =
    "quota: a whole number of at least 1, or a duration such as \"30s\" when cost = \"latency\"";

impl<'de> Deserialize<'de> for RawAmount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Amount;
        impl Visitor<'_> for Amount {
            type Value = RawAmount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(AMOUNT_SHAPES)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawAmount, E> {
                Ok(RawAmount::Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawAmount, E> {
                u64::try_from(v)
                    .map(RawAmount::Count)
                    .map_err(|_| E::custom(format!("{v} is negative; expected {AMOUNT_SHAPES}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawAmount, E> {
                Ok(RawAmount::Text(v.to_string()))
            }
        }
        d.deserialize_any(Amount)
    }
}

impl<'de> Deserialize<'de> for RawCost {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CostShape;
        impl<'de> Visitor<'de> for CostShape {
            type Value = RawCost;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("cost: \"requests\", \"latency\", { header = \"NAME\" } or { json_array = \"/pointer\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawCost, E> {
                Ok(RawCost::Name(v.to_string()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawCost, A::Error> {
                BTreeMap::deserialize(MapAccessDeserializer::new(map)).map(RawCost::Table)
            }
        }
        d.deserialize_any(CostShape)
    }
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyShape;
        impl<'de> Visitor<'de> for KeyShape {
            type Value = RawKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "override key: a text, or a list of texts (one per part of the limit's key)",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawKey, E> {
                Ok(RawKey::One(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<RawKey, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq)).map(RawKey::Parts)
            }
        }
        d.deserialize_any(KeyShape)
    }
}

struct Ctx<'a> {
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, offset: usize, message: String) -> ConfigError {
        ConfigError {
            line: Some(line_of(self.text, offset)),
            message,
        }
    }

    fn class(&self, raw: &Spanned<RawClass>) -> Result<Class, ConfigError> {
        let c = raw.get_ref();
        let name = c.name.get_ref().clone();
        let scale = *c.scale.get_ref();
        if !(scale > 0.0 && scale <= MAX_SCALE) {
            return Err(self.err(
                c.scale.span().start,
                format!(
                    "class '{name}': scale must be above 0 and at most {MAX_SCALE}, got {scale}"
                ),
            ));
        }
        Ok(Class {
            matcher: match &c.matcher {
                Some(m) => matcher(m.get_ref())
                    .map_err(|e| self.err(m.span().start, format!("class '{name}': {e}")))?,
                None => Matcher::default(),
            },
            name,
            scale,
        })
    }

    fn limit(&self, raw: &Spanned<RawLimit>) -> Result<Limit, ConfigError> {
        let l = raw.get_ref();
        let name = l.name.get_ref().clone();
        let line = line_of(self.text, raw.span().start);
        let fail = |span: std::ops::Range<usize>, msg: String| {
            self.err(span.start, format!("limit '{name}': {msg}"))
        };
        // Names go into structured-field headers and logs: keep them plain.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"\"\\;,=".contains(&b))
        {
            return Err(fail(
                l.name.span(),
                "name must be non-empty printable ASCII without spaces, quotes, '\\', ';', ',' or '='".into(),
            ));
        }
        let algorithm = AlgorithmKind::parse(l.algorithm.get_ref()).ok_or_else(|| {
            fail(
                l.algorithm.span(),
                format!(
                    "algorithm '{}' is not known; use one of {}",
                    l.algorithm.get_ref(),
                    AlgorithmKind::NAMES
                ),
            )
        })?;

        let mut key = Vec::new();
        if let Some(parts) = &l.key {
            for part in parts.get_ref() {
                key.push(KeyPart::parse(part.get_ref()).map_err(|m| fail(part.span(), m))?);
            }
        }
        let cost = match &l.cost {
            None => Cost::Requests,
            Some(c) => match c.get_ref() {
                RawCost::Name(n) if n == "requests" => Cost::Requests,
                RawCost::Name(n) if n == "latency" => Cost::Latency,
                RawCost::Table(t) if t.len() == 1 && t.contains_key("header") => {
                    if !is_token(&t["header"]) {
                        return Err(fail(c.span(), format!("cost header '{}' is not a header name", t["header"])));
                    }
                    Cost::Header(t["header"].to_ascii_lowercase())
                }
                RawCost::Table(t) if t.len() == 1 && t.contains_key("json_array") => {
                    let pointer = t["json_array"].clone();
                    if !(pointer.is_empty() || pointer.starts_with('/')) {
                        return Err(fail(c.span(), format!("cost json_array '{pointer}' is not a JSON pointer; write e.g. \"/variables/ids\"")));
                    }
                    Cost::JsonArray(pointer)
                }
                _ => return Err(fail(c.span(), "cost must be \"requests\", \"latency\", { header = \"NAME\" } or { json_array = \"/pointer\" }".into())),
            },
        };
        let latency = cost == Cost::Latency;
        let amount = |raw: &Spanned<RawAmount>, what: &str| -> Result<u64, ConfigError> {
            match (raw.get_ref(), latency) {
                (RawAmount::Count(n), false) if *n > 0 => Ok(*n),
                (RawAmount::Count(_), false) => Err(fail(raw.span(), format!("{what} must be at least 1"))),
                (RawAmount::Text(t), true) => match parse_duration(t) {
                    Ok(ns) if ns >= NANOS_PER_MICRO => Ok(ns / NANOS_PER_MICRO),
                    Ok(_) => Err(fail(raw.span(), format!("{what} '{t}' must be at least 1us"))),
                    Err(m) => Err(fail(raw.span(), format!("{what}: {m}"))),
                },
                (RawAmount::Text(t), false) => Err(fail(raw.span(), format!("{what} '{t}' is a duration, but cost is not \"latency\"; give a count"))),
                (RawAmount::Count(n), true) => Err(fail(raw.span(), format!("{what} {n} is a count, but cost is \"latency\"; give a duration like \"30s\""))),
            }
        };
        let timezone = l.timezone.as_ref().map_or("UTC", |t| t.get_ref().as_str());
        let calendar = |every: &Spanned<String>| -> Result<Calendar, ConfigError> {
            let ns = parse_duration(every.get_ref())
                .map_err(|m| fail(every.span(), format!("every: {m}")))?;
            Calendar::new(ns, timezone).map_err(|m| {
                let span = if m.contains("time zone") {
                    l.timezone.as_ref().map_or(every.span(), |t| t.span())
                } else {
                    every.span()
                };
                fail(span, m)
            })
        };
        let require = |field: &str| {
            fail(
                raw.span(),
                format!("algorithm '{}' needs `{field}`", algorithm.name()),
            )
        };
        let allowed: &[&str] = match algorithm {
            AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket => &["capacity", "refill"],
            AlgorithmKind::FixedWindow => &["every", "quota", "timezone"],
            AlgorithmKind::SlidingWindow => &["every", "quota", "segments"],
            AlgorithmKind::Tiered => &["tiers", "timezone"],
            AlgorithmKind::Concurrency => &["max"],
        };
        let present = [
            ("capacity", l.capacity.as_ref().map(|s| s.span())),
            ("refill", l.refill.as_ref().map(|s| s.span())),
            ("every", l.every.as_ref().map(|s| s.span())),
            ("quota", l.quota.as_ref().map(|s| s.span())),
            ("timezone", l.timezone.as_ref().map(|s| s.span())),
            ("segments", l.segments.as_ref().map(|s| s.span())),
            ("tiers", l.tiers.as_ref().map(|s| s.span())),
            ("max", l.max.as_ref().map(|s| s.span())),
        ];
        for (field, span) in present {
            if let Some(span) = span {
                if !allowed.contains(&field) {
                    return Err(fail(
                        span,
                        format!(
                            "`{field}` does not apply to algorithm '{}' (it takes {})",
                            algorithm.name(),
                            allowed.join(", ")
                        ),
                    ));
                }
            }
        }
        if latency
            && !matches!(
                algorithm,
                AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow | AlgorithmKind::Tiered
            )
        {
            return Err(fail(l.cost.as_ref().map_or(raw.span(), |c| c.span()), format!("cost \"latency\" needs a windowed algorithm (fixed_window, sliding_window or tiered), not '{}'", algorithm.name())));
        }

        let params = match algorithm {
            AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket => {
                let capacity = l.capacity.as_ref().ok_or_else(|| require("capacity"))?;
                if *capacity.get_ref() == 0 {
                    return Err(fail(capacity.span(), "capacity must be at least 1".into()));
                }
                let refill = l.refill.as_ref().ok_or_else(|| require("refill"))?;
                let rate = Rate::parse(refill.get_ref())
                    .map_err(|m| fail(refill.span(), format!("refill {m}")))?;
                Params::Gcra(GcraParams::with_rate(*capacity.get_ref(), rate))
            }
            AlgorithmKind::FixedWindow => {
                let every = l.every.as_ref().ok_or_else(|| require("every"))?;
                let quota = l.quota.as_ref().ok_or_else(|| require("quota"))?;
                Params::FixedWindow(FixedWindowParams {
                    quota: amount(quota, "quota")?,
                    calendar: calendar(every)?,
                })
            }
            AlgorithmKind::SlidingWindow => {
                let every = l.every.as_ref().ok_or_else(|| require("every"))?;
                let quota = l.quota.as_ref().ok_or_else(|| require("quota"))?;
                let span = parse_duration(every.get_ref())
                    .map_err(|m| fail(every.span(), format!("every: {m}")))?;
                let segments = l
                    .segments
                    .as_ref()
                    .map_or(DEFAULT_SEGMENTS, |s| *s.get_ref());
                if !(1..=MAX_SEGMENTS).contains(&segments) {
                    return Err(fail(
                        l.segments.as_ref().map_or(raw.span(), |s| s.span()),
                        format!("segments must be between 1 and {MAX_SEGMENTS}"),
                    ));
                }
                if span < u64::from(segments) {
                    return Err(fail(
                        every.span(),
                        "every is shorter than its segments".into(),
                    ));
                }
                Params::SlidingWindow(SlidingWindowParams::new(
                    amount(quota, "quota")?,
                    span,
                    segments,
                ))
            }
            AlgorithmKind::Tiered => {
                let tiers_raw = l.tiers.as_ref().ok_or_else(|| require("tiers"))?;
                if tiers_raw.get_ref().is_empty() {
                    return Err(fail(
                        tiers_raw.span(),
                        "tiers must list at least one { every, quota }".into(),
                    ));
                }
                let mut tiers = Vec::new();
                for t in tiers_raw.get_ref() {
                    let t = t.get_ref();
                    tiers.push(Tier {
                        quota: amount(&t.quota, "tier quota")?,
                        calendar: calendar(&t.every)?,
                    });
                }
                tiers.sort_by_key(|t| t.calendar.every());
                if tiers
                    .windows(2)
                    .any(|w| w[0].calendar.every() == w[1].calendar.every())
                {
                    return Err(fail(
                        tiers_raw.span(),
                        "two tiers have the same `every`; each tier needs its own window".into(),
                    ));
                }
                Params::Tiered(TieredParams { tiers })
            }
            AlgorithmKind::Concurrency => {
                let max = l.max.as_ref().ok_or_else(|| require("max"))?;
                if *max.get_ref() == 0 {
                    return Err(fail(max.span(), "max must be at least 1".into()));
                }
                Params::Concurrency(ConcurrencyParams {
                    max: *max.get_ref(),
                })
            }
        };
        let hold = match &l.hold {
            None => 0,
            Some(h) => {
                parse_duration(h.get_ref()).map_err(|m| fail(h.span(), format!("hold: {m}")))?
            }
        };
        let mode = match l.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("enforce", _)) => Mode::Enforce,
            Some(("shadow", _)) => Mode::Shadow,
            Some((other, span)) => {
                return Err(fail(
                    span,
                    format!("mode '{other}' is not known; use \"enforce\" or \"shadow\""),
                ))
            }
        };
        let missing_key = match l
            .missing_key
            .as_ref()
            .map(|m| (m.get_ref().as_str(), m.span()))
        {
            None | Some(("anonymous", _)) => MissingKey::Anonymous,
            Some(("reject", _)) => MissingKey::Reject,
            Some(("skip", _)) => MissingKey::Skip,
            Some((other, span)) => {
                return Err(fail(
                    span,
                    format!(
                    "missing_key '{other}' is not known; use \"anonymous\", \"reject\" or \"skip\""
                ),
                ))
            }
        };
        let fail_mode = match l.fail.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("closed", _)) => FailMode::Closed,
            Some(("open", _)) => FailMode::Open,
            Some(("local", _)) => FailMode::Local,
            Some((other, span)) => {
                return Err(fail(
                    span,
                    format!("fail '{other}' is not known; use \"open\", \"closed\" or \"local\""),
                ))
            }
        };
        let lease = l
            .lease
            .as_ref()
            .map(|raw| lease(raw, algorithm, latency, &fail))
            .transpose()?;
        let mut overrides: Vec<Override> = Vec::new();
        for o in l.overrides.iter().flatten() {
            let o = o.get_ref();
            let parts: Vec<&str> = match o.key.get_ref() {
                RawKey::One(k) => vec![k.as_str()],
                RawKey::Parts(p) => p.iter().map(String::as_str).collect(),
            };
            if parts.len() != key.len() {
                return Err(fail(
                    o.key.span(),
                    format!(
                        "override key has {} part(s) but the limit's key has {}; give one value per part of `key`",
                        parts.len(),
                        key.len()
                    ),
                ));
            }
            let scale = *o.scale.get_ref();
            if !(scale > 0.0 && scale <= MAX_SCALE) {
                return Err(fail(
                    o.scale.span(),
                    format!("override scale must be above 0 and at most {MAX_SCALE}, got {scale}"),
                ));
            }
            let encoded = crate::request::encode_key(&parts);
            if overrides.iter().any(|x| x.key == encoded) {
                return Err(fail(
                    o.key.span(),
                    format!("override key {parts:?} is given twice"),
                ));
            }
            overrides.push(Override {
                key: encoded,
                scale,
            });
        }
        overrides.sort_by(|a, b| a.key.cmp(&b.key));
        let limit_matcher = match &l.matcher {
            Some(m) => matcher(m.get_ref()).map_err(|e| fail(m.span(), e))?,
            None => Matcher::default(),
        };
        Ok(Limit {
            name,
            key,
            matcher: limit_matcher,
            algorithm,
            // The default class; `parse` adds one variant per class once all are known.
            variants: vec![params],
            hold,
            cost,
            mode,
            missing_key,
            fail: fail_mode,
            lease,
            overrides,
            line,
            fingerprint: String::new(),
        })
    }
}

/// The longest `ttl` a lease may have: a slice is a short loan, not a quota.
const MOST_LEASE_TTL: Nanos = 3600 * NANOS_PER_SEC;

/// A limit's `lease`, checked: only the algorithms whose unused units can be
/// given back exactly (buckets and windows counted per request), and not for
/// latency budgets, which are debited after the fact.
fn lease(
    raw: &Spanned<RawLease>,
    algorithm: AlgorithmKind,
    latency: bool,
    fail: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<Lease, ConfigError> {
    let l = raw.get_ref();
    match algorithm {
        AlgorithmKind::Tiered | AlgorithmKind::Concurrency => {
            return Err(fail(raw.span(), format!("lease is not available for '{}': leases apply to token_bucket, leaky_bucket, fixed_window and sliding_window limits", algorithm.name())))
        }
        _ if latency => {
            return Err(fail(raw.span(), "lease is not available with cost = \"latency\" (a latency budget is debited after the request, not at admission)".into()))
        }
        _ => {}
    }
    if *l.max.get_ref() == 0 {
        return Err(fail(l.max.span(), "lease max must be at least 1".into()));
    }
    let ttl = parse_duration(l.ttl.get_ref())
        .map_err(|m| fail(l.ttl.span(), format!("lease ttl: {m}")))?;
    if ttl == 0 || ttl > MOST_LEASE_TTL {
        return Err(fail(
            l.ttl.span(),
            format!(
                "lease ttl '{}' must be above 0 and at most 1h",
                l.ttl.get_ref()
            ),
        ));
    }
    Ok(Lease {
        max: *l.max.get_ref(),
        ttl,
    })
}

/// Whether `name` is an HTTP token (RFC 9110 5.6.2): what a header name or
/// a method may be.
pub(crate) fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why a `path_prefix` can never match a request, if it cannot: requests
/// are matched on their normalized path (no `//`, no dot segments, no
/// escaped letters or digits), so a prefix must be written that way.
fn path_prefix_problem(prefix: &str) -> Option<String> {
    if !prefix.starts_with('/') {
        return Some(format!("path_prefix '{prefix}' must start with '/'"));
    }
    let dot = |s: &str| s == "." || s == "..";
    let segments: Vec<&str> = prefix[1..].split('/').collect();
    let inner = &segments[..segments.len().saturating_sub(1)];
    if inner.iter().any(|s| s.is_empty() || dot(s)) || segments.last().is_some_and(|s| dot(s)) {
        return Some(format!(
            "path_prefix '{prefix}' can never match: requests are matched on their normalized path, which has no '//', '.' or '..' segments"
        ));
    }
    let bytes = prefix.as_bytes();
    let escaped_unreserved = bytes.windows(3).any(|w| {
        w[0] == b'%'
            && std::str::from_utf8(&w[1..])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .is_some_and(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c))
    });
    if escaped_unreserved {
        return Some(format!(
            "path_prefix '{prefix}' can never match: requests are matched with escaped letters, digits and '-._~' decoded; write them plainly"
        ));
    }
    None
}

fn matcher(raw: &RawMatch) -> Result<Matcher, String> {
    if let Some(m) = raw.methods.iter().find(|m| !is_token(m)) {
        return Err(format!("match: '{m}' is not a method name"));
    }
    if let Some(problem) = raw.path_prefix.as_deref().and_then(path_prefix_problem) {
        return Err(format!("match: {problem}"));
    }
    if let Some(host) = &raw.host {
        if host.is_empty() || host.contains(['/', ':', '@', ' ']) && !host.starts_with('[') {
            return Err(format!(
                "match: host '{host}' must be a host name alone (no scheme, port or path): requests are matched on their host without the port"
            ));
        }
    }
    if let Some(name) = raw.headers.keys().find(|n| !is_token(n)) {
        return Err(format!("match: '{name}' is not a header name"));
    }
    Ok(Matcher {
        methods: raw.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        path_prefix: raw.path_prefix.clone(),
        host: raw.host.as_ref().map(|h| h.to_ascii_lowercase()),
        headers: raw
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        domain: raw.domain.clone(),
        descriptor_keys: raw.descriptor_keys.clone(),
        descriptors: raw
            .descriptors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, &NoProfiles).unwrap_err().to_string()
    }

    #[test]
    fn the_design_example_parses() {
        let policy = parse(include_str!("../../../examples/design.toml"), &NoProfiles).unwrap();
        assert_eq!(policy.limits.len(), 6);
        assert_eq!(policy.limits[0].hold, 2_000_000_000);
        let Params::Tiered(t) = policy.limits[4].params(0) else {
            panic!("tiered")
        };
        assert_eq!(t.tiers[2].quota, 172_500_000);
    }

    #[test]
    fn a_match_or_key_that_could_never_apply_is_refused() {
        let limit = |extra: &str| {
            err(&format!("[[limit]]\nname = \"t\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 5\n{extra}\n"))
        };
        for (extra, says) in [
            (
                "match = { path_prefix = \"v1/\" }",
                "line 7: limit 't': match: path_prefix 'v1/' must start with '/'",
            ),
            (
                "match = { path_prefix = \"/v1//x\" }",
                "line 7: limit 't': match: path_prefix '/v1//x' can never match",
            ),
            (
                "match = { path_prefix = \"/v1/../x\" }",
                "line 7: limit 't': match: path_prefix '/v1/../x' can never match",
            ),
            (
                "match = { path_prefix = \"/v1/%7e\" }",
                "line 7: limit 't': match: path_prefix '/v1/%7e' can never match",
            ),
            (
                "match = { methods = [\"G E T\"] }",
                "line 7: limit 't': match: 'G E T' is not a method name",
            ),
            (
                "match = { host = \"api.example.com:443\" }",
                "line 7: limit 't': match: host 'api.example.com:443' must be a host name alone",
            ),
            (
                "match = { headers = { \"bad name\" = \"x\" } }",
                "line 7: limit 't': match: 'bad name' is not a header name",
            ),
            (
                "cost = { header = \"x cost\" }",
                "line 7: limit 't': cost header 'x cost' is not a header name",
            ),
        ] {
            let e = limit(extra);
            assert!(e.starts_with(says), "{extra}: {e}");
        }
        let e = err("[[limit]]\nname = \"t\"\nkey = [\"header:bad name\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 5\n");
        assert!(e.contains("'header:bad name' names no header"), "{e}");
        // What is fine stays fine: a trailing '/', an encoded separator, a host with a trailing dot.
        for extra in [
            "match = { path_prefix = \"/v1/\" }",
            "match = { path_prefix = \"/\" }",
            "match = { path_prefix = \"/projects/a%2Fb\" }",
            "match = { host = \"api.example.com.\", methods = [\"get\"] }",
        ] {
            let text = format!("[[limit]]\nname = \"t\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 5\n{extra}\n");
            assert!(parse(&text, &NoProfiles).is_ok(), "{extra}");
        }
    }

    #[test]
    fn errors_name_line_limit_and_field() {
        let e = err("[[limit]]\nname = \"tenant\"\nalgorithm = \"token_bucket\"\ncapacity = 60\nrefill = \"10/sec\"\n");
        assert_eq!(e, "line 5: limit 'tenant': refill '10/sec' is not a rate; use N/s, N/min, N/h, N/d (or N/30s)");
        let e = err("[[limit]]\nname = \"t\"\nalgorithm = \"token_bukket\"\n");
        assert!(
            e.starts_with("line 3: limit 't': algorithm 'token_bukket' is not known"),
            "{e}"
        );
        let e = err("[[limit]]\nname = \"t\"\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 5\ntimezone = \"Mars/Base\"\n");
        assert!(
            e.starts_with("line 6: limit 't': 'Mars/Base' is not an IANA time zone"),
            "{e}"
        );
        let e =
            err("[[limit]]\nname = \"t\"\nalgorithm = \"concurrency\"\nmax = 3\ncapacity = 4\n");
        assert!(
            e.starts_with("line 5: limit 't': `capacity` does not apply"),
            "{e}"
        );
        let e = err("[[limit]]\nname = \"t\"\nalgorithm = \"concurrency\"\nmaxx = 3\n");
        assert!(
            e.starts_with("line 4: limit 't': unknown field `maxx`"),
            "{e}"
        );
        let e = err("[[limit]]\nname = \"t\"\nalgorithm = \"token_bucket\"\ncapacity = \"60\"\nrefill = \"1/s\"\n");
        assert!(
            e.starts_with("line 4: limit 't': invalid type: string"),
            "{e}"
        );
        let e = err("[[limit]]\nname = \"t v\"\nalgorithm = \"concurrency\"\nmax = 1\n");
        assert!(e.starts_with("line 2: limit 't v': name must be"), "{e}");
        let e = err("[[limit]]\nname = \"t\"\nalgorithm = \"fixed_window\"\ncost = \"latency\"\nevery = \"1m\"\nquota = \"500ns\"\n");
        assert!(e.contains("quota '500ns' must be at least 1us"), "{e}");
        let e = err("[[class]]\nname = \"s\"\nscale = 0.5\n[[class]]\nname = \"s\"\nscale = 0.5\n[[limit]]\nname = \"t\"\nalgorithm = \"concurrency\"\nmax = 1\n");
        assert!(
            e.starts_with("line 4: class 's' is defined twice (first on line 1)"),
            "{e}"
        );
        let e = err("[[limit]]\nname = \"t\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = \"30s\"\n");
        assert!(
            e.contains("is a duration, but cost is not \"latency\""),
            "{e}"
        );
        let e = err("[[limit]]\nname = \"a\"\nalgorithm = \"concurrency\"\nmax = 1\n[[limit]]\nname = \"a\"\nalgorithm = \"concurrency\"\nmax = 1\n");
        assert!(
            e.starts_with("line 5: limit 'a' is defined twice (first on line 1)"),
            "{e}"
        );
        assert!(err("x = ").starts_with("line 1:"));
        assert_eq!(
            err(""),
            "the config has no [[limit]] entries (and no profile)"
        );
    }

    #[test]
    fn scaling_a_slow_refill_stays_exact() {
        // 1000/d at half is 500/d, not (as an overflowing scale once gave) ~2,300/d.
        let p = parse("[[class]]\nname = \"half\"\nscale = 0.5\n[[limit]]\nname = \"t\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"1000/d\"\n", &NoProfiles).unwrap();
        let Params::Gcra(g) = p.limits[0].params(1) else {
            panic!("gcra")
        };
        assert_eq!(g.interval(), 86_400_000_000_000 / 500);
    }

    #[test]
    fn classes_scale_every_limit() {
        let p = parse("[[class]]\nname = \"sandbox\"\nmatch = { headers = { x-env = \"sandbox\" } }\nscale = 0.5\n[[limit]]\nname = \"t\"\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"300/s\"\n", &NoProfiles).unwrap();
        let Params::Gcra(g) = p.limits[0].params(1) else {
            panic!("gcra")
        };
        assert_eq!(g.capacity, 500);
        assert_eq!(g.interval(), 6_666_667);
    }
}

#[cfg(test)]
mod override_tests {
    use super::*;
    use crate::request::Attrs;

    const PREMIUM: &str = "[[limit]]\nname = \"t\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"1/s\"\noverrides = [{ key = \"acme\", scale = 10 }, { key = \"tiny\", scale = 0.5 }]\n";

    #[test]
    fn a_premium_key_gets_its_own_scaled_variant() {
        let p = parse(PREMIUM, &NoProfiles).unwrap();
        let mut items = Vec::new();
        let capacity = |items: &Vec<crate::Item>| match p.limits[0].params(items[0].class) {
            Params::Gcra(g) => g.capacity,
            _ => panic!("gcra"),
        };
        p.plan(
            &Attrs::new("GET", "/", &[("x-tenant-id", "acme")]),
            &mut items,
        )
        .unwrap();
        assert_eq!(capacity(&items), 100);
        p.plan(
            &Attrs::new("GET", "/", &[("x-tenant-id", "tiny")]),
            &mut items,
        )
        .unwrap();
        assert_eq!(capacity(&items), 5);
        p.plan(
            &Attrs::new("GET", "/", &[("x-tenant-id", "other")]),
            &mut items,
        )
        .unwrap();
        assert_eq!((items[0].class, capacity(&items)), (0, 10));
    }

    #[test]
    fn override_errors_name_the_line() {
        let e = parse(
            &PREMIUM.replace("key = \"tiny\"", "key = [\"a\", \"b\"]"),
            &NoProfiles,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "line 7: limit 't': override key has 2 part(s) but the limit's key has 1"
            ),
            "{e}"
        );
        let e = parse(&PREMIUM.replace("scale = 0.5", "scale = 0"), &NoProfiles)
            .unwrap_err()
            .to_string();
        assert!(e.contains("override scale must be above 0"), "{e}");
    }

    #[test]
    fn fingerprints_change_with_the_definition_only() {
        let a = parse(PREMIUM, &NoProfiles).unwrap();
        let b = parse(&format!("# a comment\n{PREMIUM}"), &NoProfiles).unwrap();
        let c = parse(
            &PREMIUM.replace("capacity = 10", "capacity = 11"),
            &NoProfiles,
        )
        .unwrap();
        assert_eq!(a.limits[0].fingerprint, b.limits[0].fingerprint);
        assert_ne!(a.limits[0].fingerprint, c.limits[0].fingerprint);
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    const STORE: &str = "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n\n";
    const HOT: &str = "[[limit]]\nname = \"hot\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"100/s\"\nlease = { max = 10, ttl = \"500ms\" }\n";

    fn err(text: &str) -> String {
        parse(text, &NoProfiles).unwrap_err().to_string()
    }

    #[test]
    fn a_lease_is_parsed_and_leaves_the_counters_alone() {
        let leased = parse(&format!("{STORE}{HOT}"), &NoProfiles).unwrap();
        assert_eq!(
            leased.limits[0].lease,
            Some(Lease {
                max: 10,
                ttl: 500_000_000
            })
        );
        let plain = parse(
            &format!(
                "{STORE}{}",
                HOT.replace("lease = { max = 10, ttl = \"500ms\" }\n", "")
            ),
            &NoProfiles,
        )
        .unwrap();
        assert_eq!(plain.limits[0].lease, None);
        // Adding a lease (or editing it) keeps the key's counters.
        assert_eq!(leased.limits[0].fingerprint, plain.limits[0].fingerprint);
    }

    #[test]
    fn bad_leases_are_refused_naming_the_line() {
        let e = err(HOT);
        assert!(
            e.starts_with("line 1: limit 'hot': lease needs [store] kind = \"redis\""),
            "{e}"
        );
        let e = err(&format!("{STORE}{}", HOT.replace("max = 10", "max = 0")));
        assert!(
            e.starts_with("line 11: limit 'hot': lease max must be at least 1"),
            "{e}"
        );
        let e = err(&format!("{STORE}{}", HOT.replace("500ms", "0s")));
        assert!(
            e.contains("lease ttl '0s' must be above 0 and at most 1h"),
            "{e}"
        );
        let e = err(&format!("{STORE}{}", HOT.replace("500ms", "soon")));
        assert!(e.contains("limit 'hot': lease ttl:"), "{e}");
        let e = err(&format!("{STORE}{}", HOT.replace("max = 10", "most = 10")));
        assert!(e.contains("most"), "{e}");
        let e = err(&format!(
            "{STORE}[[limit]]\nname = \"c\"\nalgorithm = \"concurrency\"\nmax = 5\nlease = {{ max = 1, ttl = \"1s\" }}\n"
        ));
        assert!(
            e.starts_with("line 9: limit 'c': lease is not available for 'concurrency'"),
            "{e}"
        );
        let e = err(&format!(
            "{STORE}[[limit]]\nname = \"slow\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = \"10s\"\ncost = \"latency\"\nlease = {{ max = 1, ttl = \"1s\" }}\n"
        ));
        assert!(
            e.contains("lease is not available with cost = \"latency\""),
            "{e}"
        );
    }

    #[test]
    fn the_comply_side_refuses_leases() {
        let e = parse_upstreams(
            &format!(
                "{STORE}[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:1\"\n\n[[upstream.limit]]\nname = \"hot\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 10\nlease = {{ max = 1, ttl = \"1s\" }}\n"
            ),
            &NoProfiles,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("upstream 'crm': limit 'hot': lease applies to `tollgate serve`"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod shape_tests {
    use super::*;

    fn err(line: &str) -> String {
        let text = format!(
            "[[limit]]\nname = \"x\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\n{line}\n"
        );
        let text = if line.starts_with("quota") {
            text
        } else {
            format!("{text}quota = 5\n")
        };
        parse(&text, &NoProfiles).unwrap_err().to_string()
    }

    #[test]
    fn a_value_of_another_shape_names_its_field_and_the_shapes_it_takes() {
        let e = err("quota = -5");
        assert_eq!(e, "line 5: limit 'x': -5 is negative; expected quota: a whole number of at least 1, or a duration such as \"30s\" when cost = \"latency\"");
        assert!(err("quota = 1.5").contains("floating point `1.5`, expected quota: a whole number"));
        assert!(err("cost = 5").contains("expected cost: \"requests\", \"latency\""));
        assert!(err("overrides = [{ key = 5, scale = 2 }]")
            .contains("expected override key: a text, or a list of texts"));
        for e in [err("quota = true"), err("cost = [\"a\"]")] {
            assert!(!e.contains("untagged"), "{e}");
        }
    }
}
