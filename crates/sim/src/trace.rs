//! One line of a trace: the request attributes of docs/config.md ("Trace format"),
//! borrowed from the line where possible so replay allocates little.

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::fmt;
use tollgate_core::request::query_param;
use tollgate_core::Request;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceLine<'a> {
    /// Seconds after the start of the simulation, as written (echoed back).
    #[serde(borrow)]
    pub t: &'a serde_json::value::RawValue,
    #[serde(borrow, default)]
    pub method: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub path: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub host: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub ip: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub query: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub headers: Headers<'a>,
    #[serde(borrow, default)]
    pub body: Option<&'a serde_json::value::RawValue>,
    /// An Envoy rate limit request's domain and one of its descriptors'
    /// entries (what `tollgate serve`'s RLS listener decides).
    #[serde(borrow, default)]
    pub domain: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub descriptor: Headers<'a>,
    /// Seconds the upstream took; charged (latency limits) and released
    /// (concurrency) at completion.
    #[serde(default)]
    pub latency: Option<f64>,
}

/// A string of the line: borrowed from it unless it has escapes. (serde's own
/// `Cow<str>` is always owned unless it is a field marked `borrow`, so inside
/// an `Option` or a map every string would be copied to the heap.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// Header names as given; looked up case-insensitively. Inline up to two,
/// so a typical line allocates nothing.
#[derive(Debug, Default)]
pub struct Headers<'a>(pub SmallVec<[(Text<'a>, Text<'a>); 2]>);

impl<'de: 'a, 'a> Deserialize<'de> for Headers<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Headers<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of header names to string values")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Headers<'a>, M::Error> {
                let mut out = SmallVec::new();
                while let Some((k, v)) = map.next_entry::<Text<'a>, Text<'a>>()? {
                    out.push((k, v));
                }
                Ok(Headers(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A trace line as the engine sees it, with its body parsed on demand.
#[derive(Debug)]
pub struct TraceRequest<'l, 'a> {
    pub line: &'l TraceLine<'a>,
    pub body: Option<serde_json::Value>,
}

impl Request for TraceRequest<'_, '_> {
    fn method(&self) -> &str {
        self.line.method.as_deref().unwrap_or("GET")
    }
    fn path(&self) -> &str {
        self.line.path.as_deref().unwrap_or("/")
    }
    fn host(&self) -> Option<&str> {
        self.line.host.as_deref()
    }
    fn ip(&self) -> Option<&str> {
        self.line.ip.as_deref()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.line
            .headers
            .0
            .iter()
            // Names are mostly written as the policy spells them: compare
            // the bytes first.
            .find(|(n, _)| **n == *name || n.eq_ignore_ascii_case(name))
            .map(|(_, v)| &**v)
    }
    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        query_param(self.line.query.as_deref()?, name)
    }
    fn json_body(&self) -> Option<&serde_json::Value> {
        self.body.as_ref()
    }
    fn domain(&self) -> Option<&str> {
        self.line.domain.as_deref()
    }
    fn descriptor(&self, key: &str) -> Option<&str> {
        (self.line.descriptor.0.iter())
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }
}
