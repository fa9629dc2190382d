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

/// Whether `headers` carry this token as `Authorization: Bearer TOKEN`, or
/// as the password of `Authorization: Basic` (what a browser sends for the
/// dashboard; any user name). Always true when no token is configured.
pub fn admin_allowed(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    if let Some(given) = value.strip_prefix("Bearer ") {
        return same_secret(given, token);
    }
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return false;
    };
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| pair.split_once(':').map(|(_, pw)| same_secret(pw, token)))
        .unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_taken_as_a_bearer_or_as_a_basic_password() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("ascii"));
            admin_allowed(&h, Some("s3cret"))
        };
        assert!(with("Bearer s3cret"));
        assert!(!with("Bearer s3cre"));
        // "admin:s3cret", "anyone:s3cret", "admin:wrong"
        assert!(with("Basic YWRtaW46czNjcmV0"));
        assert!(with("Basic YW55b25lOnMzY3JldA=="));
        assert!(!with("Basic YWRtaW46d3Jvbmc="));
        assert!(!with("Basic !!!"));
        assert!(!admin_allowed(&HeaderMap::new(), Some("s3cret")));
        assert!(admin_allowed(&HeaderMap::new(), None));
    }
}
