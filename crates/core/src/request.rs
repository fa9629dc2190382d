//! From a request's attributes to the limits it touches: which limits match,
//! under which key, at what cost, in which class. Pure; adapters implement `Request`.

use crate::policy::{Cost, KeyPart, Limit, Matcher, MissingKey, Policy};
use compact_str::CompactString;
use std::borrow::Cow;

/// What the engine may read of a request. Header names are asked lower-cased.
pub trait Request {
    fn method(&self) -> &str;
    fn path(&self) -> &str;
    fn host(&self) -> Option<&str>;
    fn ip(&self) -> Option<&str>;
    fn header(&self, name: &str) -> Option<&str>;
    fn query(&self, name: &str) -> Option<Cow<'_, str>>;
    fn json_body(&self) -> Option<&serde_json::Value>;
}

/// One limit that applies to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub limit: usize,
    pub class: usize,
    pub key: CompactString,
    /// Units that must fit (1 for latency limits).
    pub cost: u64,
    /// Units recorded at admission (0 for latency limits).
    pub charge: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "limit '{limit}': the request has no {part}, and the limit rejects requests without it"
    )]
    MissingKey { limit: String, part: String },
    #[error("limit '{limit}': header {header} must be a whole number of units, got '{value}'")]
    BadCostHeader {
        limit: String,
        header: String,
        value: String,
    },
    #[error("limit '{limit}': {pointer} in the body must be an array")]
    BadCostBody { limit: String, pointer: String },
}

/// Separates key parts; cannot occur in header values.
const KEY_SEPARATOR: char = '\u{1f}';

impl Matcher {
    pub fn matches(&self, req: &impl Request) -> bool {
        (self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(req.method())))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| req.path().starts_with(p))
            && self
                .host
                .as_deref()
                .is_none_or(|h| req.host().is_some_and(|rh| rh.eq_ignore_ascii_case(h)))
            && self
                .headers
                .iter()
                .all(|(name, value)| req.header(name) == Some(value.as_str()))
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
            let Some(key) = key_of(limit, req)? else {
                continue;
            };
            let (cost, charge) = cost_of(limit, req)?;
            out.push(Item {
                limit: index,
                class,
                key,
                cost,
                charge,
            });
        }
        Ok(())
    }
}

fn key_of(limit: &Limit, req: &impl Request) -> Result<Option<CompactString>, RequestError> {
    let mut key = CompactString::default();
    for (i, part) in limit.key.iter().enumerate() {
        if i > 0 {
            key.push(KEY_SEPARATOR);
        }
        let value: Option<Cow<'_, str>> = match part {
            KeyPart::Header(name) => req.header(name).map(Cow::Borrowed),
            KeyPart::Query(name) => req.query(name),
            KeyPart::Ip => req.ip().map(Cow::Borrowed),
            KeyPart::Method => Some(Cow::Borrowed(req.method())),
            KeyPart::Path => Some(Cow::Borrowed(req.path())),
            KeyPart::Host => req.host().map(Cow::Borrowed),
            KeyPart::Const(text) => Some(Cow::Borrowed(text.as_str())),
        };
        match (value, limit.missing_key) {
            (Some(v), _) => key.push_str(&v),
            (None, MissingKey::Anonymous) => {}
            (None, MissingKey::Skip) => return Ok(None),
            (None, MissingKey::Reject) => {
                return Err(RequestError::MissingKey {
                    limit: limit.name.clone(),
                    part: part.describe(),
                })
            }
        }
    }
    Ok(Some(key))
}

fn cost_of(limit: &Limit, req: &impl Request) -> Result<(u64, u64), RequestError> {
    let units = match &limit.cost {
        Cost::Requests => 1,
        Cost::Latency => return Ok((1, 0)),
        Cost::Header(name) => match req.header(name) {
            None => 1,
            Some(v) => v.trim().parse().map_err(|_| RequestError::BadCostHeader {
                limit: limit.name.clone(),
                header: name.clone(),
                value: v.chars().take(64).collect(),
            })?,
        },
        Cost::JsonArray(pointer) => match req.json_body().and_then(|b| b.pointer(pointer)) {
            None => 1,
            Some(serde_json::Value::Array(items)) => items.len() as u64,
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
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub ip: Option<String>,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub query: Option<String>,
    pub body: Option<serde_json::Value>,
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
    fn json_body(&self) -> Option<&serde_json::Value> {
        self.body.as_ref()
    }
}

/// The first value of `name` in a query string (percent-decoding `%XX` and `+`).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
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
            b'%' if i + 2 < bytes.len() => {
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
        Attrs {
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Attrs::default()
        }
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
    fn query_values_are_decoded() {
        assert_eq!(
            query_param("a=1&key=a%20b+c", "key").as_deref(),
            Some("a b c")
        );
        assert_eq!(query_param("a=1", "key"), None);
        assert_eq!(query_param("k=%zz%4", "k").as_deref(), Some("%zz%4"));
    }
}
