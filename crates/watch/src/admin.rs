//! What every admin listener answers for the watch: the dashboard at `/`
//! and `GET /v1/alerts`. The face checks the admin token first, as for its
//! other paths.

use crate::dashboard::Extras;
use crate::Watch;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY};
use hyper::{Method, Response, StatusCode};
use std::sync::Arc;
use tollgate_http::admin::{json, reply};

/// The page's policy: nothing is fetched from anywhere, not even the
/// listener itself (styles are inline, there is no script or image).
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What a face draws its page from: its `/metrics` text, and what it adds
/// for the `?key=` searched. Both run on a blocking thread.
pub type Metrics = Arc<dyn Fn() -> String + Send + Sync>;
pub type AddExtras = Arc<dyn Fn(Option<&str>) -> Extras + Send + Sync>;

/// Answer `path` if it is `/` or `/v1/alerts` (None otherwise). The page first
/// records the face's metrics, so what it draws includes this moment.
pub async fn route<B: From<Full<Bytes>>>(
    watch: &Arc<Watch>,
    method: &Method,
    path: &str,
    query: &str,
    metrics: Metrics,
    extras: AddExtras,
) -> Option<Response<B>> {
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/") => {
            let now = crate::unix_now();
            let range = tollgate_core::request::query_param(query, "range").map(|r| r.into_owned());
            let key = tollgate_core::request::query_param(query, "key")
                .filter(|k| !k.trim().is_empty())
                .map(|k| k.into_owned());
            let recorder = watch.clone();
            let extras = tokio::task::spawn_blocking(move || {
                recorder.tick(now, || metrics());
                extras(key.as_deref())
            })
            .await
            .unwrap_or_default();
            let mut r: Response<B> = reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                watch.page(now, range.as_deref(), extras).await,
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
