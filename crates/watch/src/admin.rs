//! What every admin listener answers for the watch: the dashboard at `/`
//! and `GET /v1/alerts`. The face checks the admin token first, as for its
//! other paths.

use crate::dashboard::Extras;
use crate::Watch;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY};
use hyper::{Method, Response, StatusCode};
use tollgate_http::admin::{json, reply};

/// The admin paths answered here.
pub const PATHS: [&str; 2] = ["/", "/v1/alerts"];

/// The page's policy: nothing is fetched from anywhere, not even the
/// listener itself (styles are inline, there is no script or image).
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Answer `path` if it is one of `PATHS` (None otherwise). `metrics`
/// gives the face's `/metrics` text: the page records it first, so what it
/// draws includes this moment; `extras` gives what the face adds for the
/// `?key=` searched.
pub async fn route<B: From<Full<Bytes>>>(
    watch: &Watch,
    method: &Method,
    path: &str,
    query: &str,
    metrics: &(dyn Fn() -> String + Sync),
    extras: &(dyn Fn(Option<&str>) -> Extras + Sync),
) -> Option<Response<B>> {
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/") => {
            let now = crate::unix_now();
            watch.tick(now, &metrics());
            let range = tollgate_core::request::query_param(query, "range");
            let key =
                tollgate_core::request::query_param(query, "key").filter(|k| !k.trim().is_empty());
            let extras = extras(key.as_deref());
            let mut r: Response<B> = reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                watch.page(now, range.as_deref(), &extras).await,
            );
            let h = r.headers_mut();
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
            h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
            h.insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            Some(r)
        }
        (&Method::GET, "/v1/alerts") => Some(json(StatusCode::OK, watch.alerts_json())),
        _ => None,
    }
}
