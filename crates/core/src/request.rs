//! From a request's attributes to the limits it touches: which limits match,
//! under which key, at what cost, in which class. Pure; adapters implement `Request`.

use crate::policy::{Cost, KeyPart, Limit, Matcher, MissingKey, Mode, Policy};
use compact_str::CompactString;
use std::borrow::Cow;

/// What the engine may read of a request. Header names are asked lower-cased.
pub trait Request {
    /// The method (upper case).
    fn method(&self) -> &str;
    /// The path, normalized.
    fn path(&self) -> &str;
    /// The host it is for, without the port.
    fn host(&self) -> Option<&str>;
    /// The client's address.
    fn ip(&self) -> Option<&str>;
    /// A header's value (`name` lower case).
    fn header(&self, name: &str) -> Option<&str>;
    /// A query parameter's first value, percent-decoded.
    fn query(&self, name: &str) -> Option<Cow<'_, str>>;
    /// Whether a query parameter is given twice with different values (the
    /// request is then refused by a limit keyed on it: upstreams differ on
    /// which value counts, so a key on either could be dodged).
    fn query_repeated(&self, _name: &str) -> bool {
        false
    }
    /// The body as JSON, when a limit's cost reads it.
    fn json_body(&self) -> Option<&serde_json::Value>;
    /// The domain of an Envoy rate limit request (none for HTTP requests).
    fn domain(&self) -> Option<&str> {
        None
    }
    /// The value of `key` in the Envoy rate limit descriptor decided (none
    /// for HTTP requests).
    fn descriptor(&self, _key: &str) -> Option<&str> {
        None
    }
}

/// One limit that applies to a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Item {
    /// The limit's index in the policy.
    pub limit: usize,
    /// Its class or override variant (0: the default).
    pub class: usize,
    /// The key its counter is kept under.
    pub key: CompactString,
    /// Units that must fit (1 for latency limits).
    pub cost: u64,
    /// Units recorded at admission (0 for latency limits).
    pub charge: u64,
}

/// Why a request cannot be planned against a policy (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A key part is missing and the limit has `missing_key = "reject"`.
    #[error(
        "limit '{limit}': the request has no {part}, and the limit rejects requests without it"
    )]
    MissingKey {
        /// The limit.
        limit: String,
        /// The part, as written in `key`.
        part: String,
    },
    /// A query parameter a limit keys on is given twice, with different values.
    #[error("limit '{limit}': the query parameter {param} is given more than once with different values; give it once")]
    RepeatedQuery {
        /// The limit.
        limit: String,
        /// The parameter's name.
        param: String,
    },
    /// A `cost = { header = ... }` header is not a whole number.
    #[error("limit '{limit}': header {header} must be a whole number of units, got '{value}'")]
    BadCostHeader {
        /// The limit.
        limit: String,
        /// The header's name.
        header: String,
        /// What it held.
        value: String,
    },
    /// A `cost = { json_array = ... }` pointer does not find an array.
    #[error("limit '{limit}': {pointer} in the body must be an array")]
    BadCostBody {
        /// The limit.
        limit: String,
        /// The JSON pointer.
        pointer: String,
    },
}

/// Separates key parts. A value holding a separator, marker or escape char
/// has it escaped, and a missing part is a marker of its own, so two
/// different requests never build the same key.
const KEY_SEPARATOR: char = '\u{1f}';
const KEY_MISSING: char = '\u{1e}';
const KEY_ESCAPE: char = '\u{1d}';

/// Whether `path` (normalized) starts with `prefix` as the most lenient
/// upstream reads it (`match_view`): a limit on `/v1/` also holds
/// `/v1%2Fx` and `/v1;a=b/x`, which nginx, a WSGI server or Tomcat serve as
/// `/v1/x`.
#[inline]
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if path.starts_with(prefix) {
        return true;
    }
    // The view is the path itself up to its first '%' or ';': if none comes
    // within the prefix's length, the view does not start with it either.
    let near = &path.as_bytes()[..prefix.len().min(path.len())];
    near.iter().any(|&b| b == b'%' || b == b';') && view_has_prefix(path, prefix)
}

/// `path_has_prefix` on the view (apart: rarely needed).
#[cold]
#[inline(never)]
fn view_has_prefix(path: &str, prefix: &str) -> bool {
    match_view(path).starts_with(prefix)
}

/// `path` as the most lenient upstream reads it: an encoded separator
/// (`%2F`, `%5C`) taken as one, `;` parameters dropped from each segment,
/// and the empty segments that leaves merged.
pub fn match_view(path: &str) -> String {
    let mut separated = path.to_string();
    for encoded in ["%2F", "%2f", "%5C", "%5c"] {
        if separated.contains(encoded) {
            separated = separated.replace(encoded, "/");
        }
    }
    let mut view = String::with_capacity(separated.len());
    for segment in separated.split('/') {
        let name = segment.split(';').next().unwrap_or_default();
        if !name.is_empty() {
            view.push('/');
            view.push_str(name);
        }
    }
    if view.is_empty() || separated.ends_with('/') {
        view.push('/');
    }
    view
}

/// Whether two host names are one: case aside, and a trailing dot (the
/// fully qualified `api.example.com.` is `api.example.com`).
#[inline]
fn same_host(a: &str, b: &str) -> bool {
    let bare = |h: &str| h.strip_suffix('.').unwrap_or(h).len();
    let (a, b) = (&a[..bare(a)], &b[..bare(b)]);
    a.eq_ignore_ascii_case(b)
}

impl Matcher {
    /// Whether the request meets every condition given.
    #[inline]
    pub fn matches(&self, req: &impl Request) -> bool {
        (self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(req.method())))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path_has_prefix(req.path(), p))
            && self
                .host
                .as_deref()
                .is_none_or(|h| req.host().is_some_and(|rh| same_host(rh, h)))
            && self
                .headers
                .iter()
                .all(|(name, value)| req.header(name) == Some(value.as_str()))
            && (self.domain.as_deref()).is_none_or(|d| req.domain() == Some(d))
            && (self.descriptor_keys.iter()).all(|k| req.descriptor(k).is_some())
            && (self.descriptors.iter()).all(|(k, v)| req.descriptor(k) == Some(v.as_str()))
    }
}

impl Policy {
    /// The class a request falls in: 0 for none, i + 1 for `classes[i]`.
    pub fn class_of(&self, req: &impl Request) -> usize {
        self.classes
            .iter()
            .position(|c| c.matcher.matches(req))
            .map_or(0, |i| i + 1)
    }

    /// Fill `out` with the limits that apply to `req`, in policy order.
    pub fn plan(&self, req: &impl Request, out: &mut Vec<Item>) -> Result<(), RequestError> {
        out.clear();
        let class = self.class_of(req);
        for (index, limit) in self.limits.iter().enumerate() {
            if !limit.matcher.matches(req) {
                continue;
            }
            // Limits keyed alike (a tenant's bucket and its daily quota) take
            // the key the one before built.
            let key = match out.last() {
                Some(prev) if keyed_alike(&self.limits[prev.limit], limit) => {
                    Ok(Some(prev.key.clone()))
                }
                _ => key_of(limit, req),
            };
            // A shadow limit never fails a request: if it cannot apply, it is skipped.
            let planned = key.and_then(|key| Ok((key, cost_of(limit, req)?)));
            let (key, (cost, charge)) = match planned {
                Ok((Some(key), cost)) => (key, cost),
                Ok((None, _)) => continue,
                Err(_) if limit.mode == Mode::Shadow => continue,
                Err(e) => return Err(e),
            };
            out.push(Item {
                limit: index,
                class: if limit.overrides.is_empty() {
                    class
                } else {
                    limit.variant_for(&key, class)
                },
                key,
                cost,
                charge,
            });
        }
        Ok(())
    }
}

/// Whether two limits build the same key from any request.
fn keyed_alike(a: &Limit, b: &Limit) -> bool {
    a.key == b.key && a.missing_key == b.missing_key
}

fn key_of(limit: &Limit, req: &impl Request) -> Result<Option<CompactString>, RequestError> {
    let mut key = CompactString::default();
    for (i, part) in limit.key.iter().enumerate() {
        if i > 0 {
            key.push(KEY_SEPARATOR);
        }
        let value: Option<Cow<'_, str>> = match part {
            // (an empty value is no value: `missing_key` says what to do;
            // a field value's only whitespace is spaces and tabs)
            KeyPart::Header(name) => (req.header(name))
                .filter(|v| !v.bytes().all(|b| b == b' ' || b == b'\t'))
                .map(Cow::Borrowed),
            KeyPart::Query(name) if req.query_repeated(name) => {
                return Err(RequestError::RepeatedQuery {
                    limit: limit.name.clone(),
                    param: name.clone(),
                })
            }
            KeyPart::Query(name) => req.query(name).filter(|v| !v.trim().is_empty()),
            KeyPart::Ip => req.ip().map(Cow::Borrowed),
            KeyPart::Method => Some(Cow::Borrowed(req.method())),
            KeyPart::Path => Some(Cow::Borrowed(req.path())),
            KeyPart::Host => req.host().map(normalize_host),
            KeyPart::Const(text) => Some(Cow::Borrowed(text.as_str())),
            KeyPart::Descriptor(name) => req.descriptor(name).map(Cow::Borrowed),
        };
        match (value, limit.missing_key) {
            (Some(v), _) => push_escaped(&mut key, &v),
            (None, MissingKey::Anonymous) => key.push(KEY_MISSING),
            (None, MissingKey::Skip) => return Ok(None),
            (None, MissingKey::Reject) => {
                return Err(RequestError::MissingKey {
                    limit: limit.name.clone(),
                    part: part.describe(),
                })
            }
        }
    }
    Ok(Some(bounded(key)))
}

/// Keys longer than this are kept as their SHA-256 digest.
pub const MAX_KEY_BYTES: usize = 256;

/// `key`, or its digest (`sha256:` and 64 hex digits) when it is longer
/// than `MAX_KEY_BYTES`: a tenant id or an address is kept as it is, while a
/// client sending 60 KB header values cannot make each key cost 60 KB
/// (`max_keys` counts keys, not bytes), and a long token used as a key is
/// not written out in logs.
#[inline]
fn bounded(key: CompactString) -> CompactString {
    if key.len() <= MAX_KEY_BYTES {
        key
    } else {
        digest_of(&key)
    }
}

/// A long key's stand-in (apart and cold: the usual key is short).
#[cold]
#[inline(never)]
fn digest_of(key: &str) -> CompactString {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    CompactString::from(crate::hex::hex_after("sha256:", &digest))
}

/// The key a limit builds from these part values (for overrides, the usage
/// API and tests): the same bytes `Policy::plan` builds.
pub fn encode_key(parts: &[&str]) -> CompactString {
    let mut key = CompactString::default();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(KEY_SEPARATOR);
        }
        push_escaped(&mut key, part);
    }
    bounded(key)
}

/// A key's parts as they were given (None: a part the request did not
/// have), the inverse of `encode_key`.
pub fn key_parts(key: &str) -> Vec<Option<String>> {
    let mut parts = vec![Some(String::new())];
    let mut escaped = false;
    for c in key.chars() {
        let last = parts.last_mut().expect("one part at least");
        match c {
            _ if escaped => {
                last.get_or_insert_with(String::new).push(c);
                escaped = false;
            }
            KEY_ESCAPE => escaped = true,
            KEY_SEPARATOR => parts.push(Some(String::new())),
            KEY_MISSING => *last = None,
            c => last.get_or_insert_with(String::new).push(c),
        }
    }
    parts
}

/// A key as people read it (dashboards, reports): its parts separated by
/// `|`, a missing part shown as `-`.
pub fn shown_key(key: &str) -> String {
    key_parts(key)
        .into_iter()
        .map(|p| p.unwrap_or_else(|| "-".into()))
        .collect::<Vec<_>>()
        .join("|")
}

fn push_escaped(key: &mut CompactString, value: &str) {
    // The three reserved chars are the bytes 0x1d..=0x1f.
    if !value.bytes().any(|b| (0x1d..=0x1f).contains(&b)) {
        key.push_str(value);
        return;
    }
    for c in value.chars() {
        if matches!(c, KEY_SEPARATOR | KEY_MISSING | KEY_ESCAPE) {
            key.push(KEY_ESCAPE);
        }
        key.push(c);
    }
}

/// Hosts are case-insensitive and may carry a trailing dot.
fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Units a request costs. Never 0: a request that costs nothing would pass
/// an exhausted limit; an empty bulk call or `x-cost: 0` still costs one.
fn cost_of(limit: &Limit, req: &impl Request) -> Result<(u64, u64), RequestError> {
    let units = match &limit.cost {
        Cost::Requests => 1,
        Cost::Latency => return Ok((1, 0)),
        Cost::Header(name) => match req.header(name) {
            None => 1,
            Some(v) => v.trim().parse::<u64>().map(|n| n.max(1)).map_err(|_| {
                RequestError::BadCostHeader {
                    limit: limit.name.clone(),
                    header: name.clone(),
                    value: v.chars().take(64).collect(),
                }
            })?,
        },
        Cost::JsonArray(pointer) => match req.json_body().and_then(|b| b.pointer(pointer)) {
            None => 1,
            Some(serde_json::Value::Array(items)) => items.len().max(1) as u64,
            Some(_) => {
                return Err(RequestError::BadCostBody {
                    limit: limit.name.clone(),
                    pointer: pointer.clone(),
                })
            }
        },
    };
    Ok((units, units))
}

/// A request given as plain fields: the trace line of `tollgate simulate`,
/// the body of the check API, and tests.
#[derive(Debug, Clone, Default)]
pub struct Attrs {
    /// The method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The host, if known.
    pub host: Option<String>,
    /// The client's address, if known.
    pub ip: Option<String>,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    /// The raw query string.
    pub query: Option<String>,
    /// The body, if it is JSON.
    pub body: Option<serde_json::Value>,
}

impl Attrs {
    /// A request with these headers (names are lower-cased here).
    pub fn new(method: &str, path: &str, headers: &[(&str, &str)]) -> Attrs {
        Attrs {
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_string()))
                .collect(),
            ..Attrs::default()
        }
    }
}

impl Request for Attrs {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }
    fn ip(&self) -> Option<&str> {
        self.ip.as_deref()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        query_param(self.query.as_deref()?, name)
    }
    fn query_repeated(&self, name: &str) -> bool {
        (self.query.as_deref()).is_some_and(|q| query_param_repeated(q, name))
    }
    fn json_body(&self) -> Option<&serde_json::Value> {
        self.body.as_ref()
    }
}

/// One descriptor of an Envoy rate limit request as the limits see it: its
/// request's domain and its entries. It has no method, path, host,
/// address, header, query or body, so limits that match on those never
/// apply to it.
#[derive(Debug, Clone)]
pub struct Descriptor<'a> {
    /// The request's domain.
    pub domain: &'a str,
    /// (key, value), in the order Envoy sent them.
    pub entries: Vec<(&'a str, &'a str)>,
}

impl Request for Descriptor<'_> {
    fn method(&self) -> &str {
        ""
    }
    fn path(&self) -> &str {
        ""
    }
    fn host(&self) -> Option<&str> {
        None
    }
    fn ip(&self) -> Option<&str> {
        None
    }
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
    fn query(&self, _name: &str) -> Option<Cow<'_, str>> {
        None
    }
    fn json_body(&self) -> Option<&serde_json::Value> {
        None
    }
    fn domain(&self) -> Option<&str> {
        Some(self.domain)
    }
    fn descriptor(&self, key: &str) -> Option<&str> {
        (self.entries.iter())
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

/// The first value of `name` in a query string (names and values
/// percent-decoded, `%XX` and `+`: `api%5Fkey` is `api_key`, as upstreams
/// read it).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    pairs(query).find_map(|(k, v)| (k == name).then(|| percent_decode(v)))
}

/// Whether `name` is given more than once in a query string with different
/// values.
pub fn query_param_repeated(query: &str, name: &str) -> bool {
    let mut values = pairs(query).filter_map(|(k, v)| (k == name).then(|| percent_decode(v)));
    let first = values.next();
    first.is_some_and(|first| values.any(|v| v != first))
}

/// A query string's pairs: each name decoded, each value as written.
fn pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, &str)> {
    query.split('&').map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), v)
    })
}

fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                match text.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                    Some(Ok(b)) => {
                        out.push(b);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, NoProfiles};

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Attrs {
        Attrs::new(method, path, headers)
    }

    #[test]
    fn a_path_prefix_reads_an_encoded_separator_as_one() {
        use super::path_has_prefix;
        assert!(path_has_prefix("/v1/x", "/v1/"));
        assert!(path_has_prefix("/v1%2Fx", "/v1/"));
        assert!(path_has_prefix("/v1%2fx", "/v1/"));
        assert!(path_has_prefix("/v1%5Cx", "/v1/"));
        assert!(!path_has_prefix("/v2%2Fx", "/v1/"));
        assert!(!path_has_prefix("/v1x", "/v1/"));
        assert!(path_has_prefix("/%2F/v1/x", "/v1/"));
        assert!(path_has_prefix("/v1;a=b/x", "/v1/"));
        assert!(!path_has_prefix("/v1;a=b", "/v1/"));
        assert!(path_has_prefix("/a;x/../v1/x", "/a/"));
        assert!(!path_has_prefix("/v2/x%2Fy", "/v1/"));
        assert!(path_has_prefix("/v1", "/v1"));
        assert!(!path_has_prefix("/v", "/v1"));
    }

    #[test]
    fn limits_keyed_alike_get_the_same_key_and_others_their_own() {
        let limit = |name: &str, key: &str, missing: &str| {
            format!("[[limit]]\nname = \"{name}\"\nkey = [{key}]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 5\nmissing_key = \"{missing}\"\n")
        };
        let text = [
            limit("a", r#""header:t""#, "anonymous"),
            limit("b", r#""header:t""#, "anonymous"),
            limit("c", r#""header:t", "method""#, "anonymous"),
            limit("d", r#""header:t""#, "skip"),
            limit("e", r#""header:t""#, "anonymous"),
        ]
        .concat();
        let policy = parse(&text, &NoProfiles).unwrap();
        let mut items = Vec::new();
        let keys = |items: &[Item]| -> Vec<(usize, String)> {
            items.iter().map(|i| (i.limit, shown_key(&i.key))).collect()
        };
        policy
            .plan(&req("GET", "/", &[("t", "acme")]), &mut items)
            .unwrap();
        let acme = |l: usize| (l, "acme".to_string());
        assert_eq!(
            keys(&items),
            [acme(0), acme(1), (2, "acme|GET".into()), acme(3), acme(4)]
        );
        // Without the header: "skip" drops d, and e (after it) still gets
        // the anonymous key, as a and b do.
        policy.plan(&req("GET", "/", &[]), &mut items).unwrap();
        let anon = |l: usize| (l, "-".to_string());
        assert_eq!(
            keys(&items),
            [anon(0), anon(1), (2, "-|GET".into()), anon(4)]
        );
    }

    #[test]
    fn a_key_is_shown_with_its_parts_separated_by_a_bar() {
        assert_eq!(
            shown_key(&encode_key(&["acme", "/v1/jobs"])),
            "acme|/v1/jobs"
        );
        assert_eq!(shown_key(&encode_key(&["a\u{1f}b"])), "a\u{1f}b");
        let mut missing = CompactString::default();
        missing.push(KEY_MISSING);
        assert_eq!(shown_key(&missing), "-");
        let parts = ["acme", "a\u{1f}b\u{1d}", ""];
        let back: Vec<Option<String>> = key_parts(&encode_key(&parts));
        assert_eq!(back, parts.map(|p| Some(p.to_string())).to_vec());
    }

    #[test]
    fn descriptors_match_by_domain_keys_and_values_and_key_by_entry() {
        let policy = parse(
            r#"
[[limit]]
name = "tenant"
key = ["descriptor:tenant"]
match = { domain = "edge", descriptor_keys = ["tenant"] }
algorithm = "fixed_window"
every = "1m"
quota = 10

[[limit]]
name = "free"
match = { domain = "edge", descriptors = { plan = "free" } }
algorithm = "fixed_window"
every = "1m"
quota = 1
"#,
            &NoProfiles,
        )
        .unwrap();
        let planned = |d: &Descriptor| {
            let mut items = Vec::new();
            policy.plan(d, &mut items).unwrap();
            items
                .iter()
                .map(|i| (policy.limits[i.limit].name.clone(), i.key.to_string()))
                .collect::<Vec<_>>()
        };
        let d = |domain, entries| Descriptor { domain, entries };
        let acme = d("edge", vec![("tenant", "acme"), ("plan", "free")]);
        assert_eq!(
            planned(&acme),
            [
                ("tenant".to_string(), "acme".to_string()),
                ("free".into(), String::new())
            ]
        );
        assert!(planned(&d("edge", vec![("plan", "pro")])).is_empty());
        assert!(planned(&d("other", vec![("tenant", "acme")])).is_empty());
        // An HTTP request has no domain: RLS limits never apply to one.
        assert!(planned_http(&policy).is_empty());
        assert_eq!(
            KeyPart::parse("descriptor:tenant"),
            Ok(KeyPart::Descriptor("tenant".into()))
        );
        assert!(KeyPart::parse("descriptor:").is_err());
    }

    fn planned_http(policy: &Policy) -> Vec<Item> {
        let mut items = Vec::new();
        policy
            .plan(&req("GET", "/", &[("tenant", "acme")]), &mut items)
            .unwrap();
        items
    }

    #[test]
    fn plan_matches_keys_and_costs() {
        let policy = parse(
            r#"
[[limit]]
name = "tenant"
key = ["header:X-Tenant-Id", "method"]
match = { path_prefix = "/v1/", methods = ["get"] }
algorithm = "token_bucket"
capacity = 10
refill = "1/s"
missing_key = "reject"

[[limit]]
name = "bulk"
algorithm = "fixed_window"
every = "1m"
quota = 1000
cost = { json_array = "/variables/ids" }

[[limit]]
name = "weighted"
algorithm = "fixed_window"
every = "1m"
quota = 1000
cost = { header = "X-Cost" }
"#,
            &NoProfiles,
        )
        .unwrap();
        let mut out = Vec::new();
        let mut r = req(
            "GET",
            "/v1/jobs",
            &[("x-tenant-id", "acme"), ("x-cost", "7")],
        );
        r.body = Some(serde_json::json!({"variables": {"ids": [1, 2, 3]}}));
        policy.plan(&r, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].key, "acme\u{1f}GET");
        assert_eq!(query_param("k=%+1", "k").as_deref(), Some("% 1"));
        assert_eq!((out[1].cost, out[2].cost), (3, 7));

        let r = req("GET", "/v1/jobs", &[]);
        let e = policy.plan(&r, &mut out).unwrap_err();
        assert_eq!(e.to_string(), "limit 'tenant': the request has no header:x-tenant-id, and the limit rejects requests without it");
        let r = req("POST", "/v1/jobs", &[("x-cost", "lots")]);
        let e = policy.plan(&r, &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "limit 'weighted': header x-cost must be a whole number of units, got 'lots'"
        );
    }

    #[test]
    fn distinct_requests_never_share_a_key() {
        let policy = parse(
            "[[limit]]\nname = \"k\"\nkey = [\"query:user\", \"query:org\", \"header:x-a\"]\nalgorithm = \"concurrency\"\nmax = 1\n[[limit]]\nname = \"h\"\nkey = [\"host\"]\nalgorithm = \"concurrency\"\nmax = 1\n",
            &NoProfiles,
        )
        .unwrap();
        let key = |query: &str, header: Option<&str>, host: &str| {
            let mut r = req("GET", "/", &[]);
            r.query = Some(query.into());
            r.host = Some(host.into());
            if let Some(h) = header {
                r.headers.push(("x-a".into(), h.into()));
            }
            let mut out = Vec::new();
            policy.plan(&r, &mut out).unwrap();
            (out[0].key.clone(), out[1].key.clone())
        };
        // A separator smuggled through a value does not shift parts.
        assert_ne!(
            key("user=a%1Fb&org=c", None, "x").0,
            key("user=a&org=b%1Fc", None, "x").0
        );
        // An empty part is a missing one (`missing_key` applies to both:
        // an empty header cannot pass a limit that rejects requests without it).
        assert_eq!(
            key("user=a&org=b", None, "x").0,
            key("user=a&org=b", Some(""), "x").0
        );
        // And neither is the part written out.
        assert_ne!(
            key("user=a&org=b", None, "x").0,
            key("user=a&org=b", Some("-"), "x").0
        );
        // Hosts are case-insensitive.
        assert_eq!(
            key("", None, "API.Example.com.").1,
            key("", None, "api.example.com").1
        );
    }

    #[test]
    fn a_request_never_costs_zero() {
        let policy = parse(
            "[[limit]]\nname = \"h\"\nalgorithm = \"concurrency\"\nmax = 5\ncost = { header = \"x-cost\" }\n[[limit]]\nname = \"j\"\nalgorithm = \"concurrency\"\nmax = 5\ncost = { json_array = \"/ids\" }\n",
            &NoProfiles,
        )
        .unwrap();
        let mut r = req("POST", "/", &[("x-cost", "0")]);
        r.body = Some(serde_json::json!({"ids": []}));
        let mut out = Vec::new();
        policy.plan(&r, &mut out).unwrap();
        assert_eq!((out[0].cost, out[1].cost), (1, 1));
    }

    #[test]
    fn a_shadow_limit_never_fails_a_request() {
        let policy = parse(
            "[[limit]]\nname = \"s\"\nkey = [\"header:x-t\"]\nmode = \"shadow\"\nmissing_key = \"reject\"\nalgorithm = \"concurrency\"\nmax = 1\n[[limit]]\nname = \"e\"\nalgorithm = \"concurrency\"\nmax = 1\n",
            &NoProfiles,
        )
        .unwrap();
        let mut out = Vec::new();
        policy.plan(&req("GET", "/", &[]), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].limit, 1);
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param("a=1&key=a%20b+c", "key").as_deref(),
            Some("a b c")
        );
        assert_eq!(query_param("a=1", "key"), None);
        assert_eq!(query_param("k=%zz%4", "k").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn a_long_key_is_kept_as_its_digest_the_same_way_everywhere() {
        let policy = crate::parse(
            "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 2\n",
            &crate::NoProfiles,
        )
        .expect("policy");
        let plan = |value: &str| {
            let mut items = Vec::new();
            let req = Attrs::new("GET", "/", &[("x-tenant-id", value)]);
            policy.plan(&req, &mut items).expect("plan");
            items.remove(0).key
        };
        let short = "t".repeat(super::MAX_KEY_BYTES);
        assert_eq!(plan(&short).as_str(), short, "kept as it is");
        let long = "t".repeat(60_000);
        let key = plan(&long);
        assert!(key.starts_with("sha256:") && key.len() == 71, "{key}");
        assert_eq!(key, plan(&long), "the same value, the same key");
        assert_ne!(key, plan(&format!("{long}x")));
        // The usage API and overrides build keys with `encode_key`.
        assert_eq!(key, encode_key(&[long.as_str()]));
    }

    #[test]
    fn an_empty_key_value_is_a_missing_one() {
        let policy = crate::parse(
            "[[limit]]\nname = \"t\"\nkey = [\"header:x-tenant-id\"]\nmissing_key = \"reject\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 2\n",
            &crate::NoProfiles,
        )
        .expect("policy");
        for value in ["", "  "] {
            let mut items = Vec::new();
            let req = Attrs::new("GET", "/", &[("x-tenant-id", value)]);
            let e = policy.plan(&req, &mut items).unwrap_err();
            assert!(
                matches!(e, RequestError::MissingKey { .. }),
                "{value:?}: {e}"
            );
        }
    }

    #[test]
    fn a_query_key_cannot_be_spelled_around_or_given_twice() {
        use super::query_param_repeated;
        // A name is read as upstreams decode it.
        assert_eq!(
            query_param("api%5Fkey=real&api_key=junk", "api_key").as_deref(),
            Some("real")
        );
        assert!(query_param_repeated(
            "api%5Fkey=real&api_key=junk",
            "api_key"
        ));
        assert!(query_param_repeated("api_key=real&api_key=junk", "api_key"));
        assert!(!query_param_repeated(
            "api_key=real&api_key=real",
            "api_key"
        ));
        assert!(!query_param_repeated("api_key=real&other=1", "api_key"));
        let policy = crate::parse(
            "[[limit]]\nname = \"per-key\"\nkey = [\"query:api_key\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 2\n",
            &crate::NoProfiles,
        )
        .expect("policy");
        let mut items = Vec::new();
        let mut req = Attrs::new("GET", "/", &[]);
        req.query = Some("api_key=real&api_key=junk1".into());
        let e = policy.plan(&req, &mut items).unwrap_err();
        assert_eq!(
            e.to_string(),
            "limit 'per-key': the query parameter api_key is given more than once with different values; give it once"
        );
        req.query = Some("api%5Fkey=real".into());
        policy.plan(&req, &mut items).expect("one value");
        assert_eq!(items[0].key.as_str(), "real");
    }
}
