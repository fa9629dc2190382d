//! What every admin listener (the gateway's, the proxy's) answers with:
//! plain replies, JSON, problem+json errors, and the bearer-token check.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Response, StatusCode};

pub fn reply<B: From<Full<Bytes>>>(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<B> {
    let mut r = Response::new(B::from(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn json<B: From<Full<Bytes>>>(status: StatusCode, value: serde_json::Value) -> Response<B> {
    reply(status, "application/json", value.to_string() + "\n")
}

/// An admin error as problem+json.
pub fn problem<B: From<Full<Bytes>>>(
    status: StatusCode,
    title: &str,
    detail: String,
) -> Response<B> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    reply(status, "application/problem+json", body.to_string() + "\n")
}

/// Prometheus' text format, as `/metrics` serves it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether `headers` carry `Authorization: Bearer TOKEN` for this token
/// (always true when no token is configured).
pub fn bearer_allowed(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same_secret(given, token))
}

/// Compare a secret in constant time in its length: no timing hint of a
/// matching prefix.
pub fn same_secret(given: &str, secret: &str) -> bool {
    given.len() == secret.len()
        && given
            .bytes()
            .zip(secret.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}
