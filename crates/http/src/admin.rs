//! What every admin listener (the gateway's, the proxy's) answers with:
//! plain replies, JSON, problem+json errors, and the bearer-token check.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
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

/// The admin paths a browser opens (the dashboard, its alerts): only they
/// take the token as a Basic password.
pub const BROWSER_PATHS: [&str; 2] = ["/", "/v1/alerts"];

/// Whether a request to an admin listener carries this token: as
/// `Authorization: Bearer TOKEN`, or, for a GET or HEAD of `BROWSER_PATHS`,
/// as the password of `Authorization: Basic` (what a browser sends for the
/// dashboard; any user name). A browser resends Basic credentials on its
/// own, so they never authorize a change (a reload, a retry, a purge): no
/// other site can make a visitor's browser do one. Always true when no
/// token is configured.
pub fn admin_allowed<B>(req: &hyper::Request<B>, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(given) = value.strip_prefix("Bearer ") {
        return same_secret(given, token);
    }
    let browsing = matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD)
        && BROWSER_PATHS.contains(&req.uri().path());
    let Some(encoded) = value.strip_prefix("Basic ").filter(|_| browsing) else {
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

/// What is shown of a secret (a vendor key, a client token): the first 8
/// bytes of its SHA-256, `sha256:0123456789abcdef`. Tells secrets apart
/// without showing any.
pub fn stand_in(secret: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(secret.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
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
    fn the_token_is_taken_as_a_bearer_or_for_the_pages_as_a_basic_password() {
        let with = |method: &str, path: &str, value: &str| {
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(AUTHORIZATION, value)
                .body(())
                .expect("request");
            admin_allowed(&req, Some("s3cret"))
        };
        assert!(with("POST", "/v1/reload", "Bearer s3cret"));
        assert!(!with("GET", "/", "Bearer s3cre"));
        // "admin:s3cret", "anyone:s3cret", "admin:wrong"
        assert!(with("GET", "/", "Basic YWRtaW46czNjcmV0"));
        assert!(with("GET", "/v1/alerts", "Basic YW55b25lOnMzY3JldA=="));
        assert!(!with("GET", "/", "Basic YWRtaW46d3Jvbmc="));
        assert!(!with("GET", "/", "Basic !!!"));
        // A browser resends Basic on its own: never for a change, nor for
        // the other paths.
        assert!(!with("POST", "/v1/dlq/retry", "Basic YWRtaW46czNjcmV0"));
        assert!(!with("POST", "/", "Basic YWRtaW46czNjcmV0"));
        assert!(!with("GET", "/v1/config", "Basic YWRtaW46czNjcmV0"));
        let bare = hyper::Request::builder()
            .uri("/")
            .body(())
            .expect("request");
        assert!(!admin_allowed(&bare, Some("s3cret")));
        assert!(admin_allowed(&bare, None));
    }
}
