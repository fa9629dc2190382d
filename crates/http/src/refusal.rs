//! Every answer tollgate makes itself (a 429 and the other errors), with its
//! status decided in one place, as RFC 9457 problem+json or Celigo's
//! `errors` shape, per `[response]`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    HeaderName, HeaderValue, CONTENT_TYPE, PROXY_AUTHENTICATE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Response, StatusCode};
use std::time::Duration;
use tollgate_core::units::NANOS_PER_SEC;
use tollgate_core::Nanos;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How refusals look: `[response]` of a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFormat {
    /// RFC 9457 `application/problem+json` (an API gateway's rate-limit page).
    Problem,
    /// `{"errors":[{"code":"rate_limited","message":...}]}` (Celigo's rate-limit page).
    Errors,
}

#[derive(Debug, Clone)]
pub struct ResponseSettings {
    pub format: ErrorFormat,
    /// `Retry-After` in whole seconds on 429s.
    pub retry_after: bool,
    /// IETF `RateLimit-Policy` / `RateLimit` on every response.
    pub ratelimit_headers: bool,
    /// `X-RateLimit-Limit/Remaining/Reset` for the tightest limit.
    pub legacy_headers: bool,
    /// The problem `type` URI.
    pub problem_type: String,
}

impl Default for ResponseSettings {
    fn default() -> Self {
        ResponseSettings {
            format: ErrorFormat::Problem,
            retry_after: true,
            ratelimit_headers: true,
            legacy_headers: false,
            problem_type: "https://tollgate.dev/errors/rate-limited".into(),
        }
    }
}

/// Why tollgate answers a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 429: `limit` is out of quota; `retry_after` is None when only a
    /// release (concurrency) can make room.
    RateLimited {
        limit: String,
        retry_after: Option<Nanos>,
    },
    /// 413: the request's cost is more than the limit can ever admit.
    CostTooLarge {
        limit: String,
        cost: u64,
        capacity: u64,
    },
    /// 413: a body read for a JSON cost is larger than `max_body_bytes`.
    BodyTooLarge { max: usize },
    /// 408: the client stopped sending its body for `idle` (a body read
    /// whole is bounded, so a stalled one cannot hold its bytes for good).
    BodyStalled { idle: Duration },
    /// 400: the request cannot be keyed or costed (names the header or field).
    BadRequest(String),
    /// 431: the request's headers add up to more than `max` bytes.
    HeadersTooLarge { max: usize },
    /// 404: no route and no default upstream.
    NoRoute,
    /// 405: a method tollgate does not relay (the gateway: CONNECT; the
    /// proxy: TRACE, and CONNECT inside a tunnel).
    MethodNotAllowed(String),
    /// 503: the store tracks `max_keys` keys and none is idle.
    StoreFull(String),
    /// 503: the shared store (Redis) did not answer and a limit of the
    /// request fails closed.
    StoreUnavailable(String),
    /// 502: the upstream refused or broke the connection.
    UpstreamFailed(String),
    /// 504: the upstream did not answer within `upstream_timeout`.
    UpstreamTimeout,
    /// 401 on the admin listener.
    Unauthorized,
    /// 429 from the proxy: the request waited `waited` for its slot and
    /// none came before its deadline; nothing was sent to the upstream.
    WaitExceeded {
        upstream: String,
        /// The limit the line was waiting for, if it was one.
        limit: Option<String>,
        waited: Nanos,
        retry_after: Nanos,
    },
    /// 503 from the proxy: the upstream's circuit breaker is open.
    BreakerOpen {
        upstream: String,
        retry_after: Nanos,
    },
    /// 403 from the proxy: no upstream names this host.
    HostNotConfigured { host: String },
    /// 403 from the proxy: a CONNECT to an upstream that does not intercept.
    NotIntercepted { host: String, upstream: String },
    /// 404 from the proxy: the first path segment names no upstream.
    UnknownUpstream { name: String, known: Vec<String> },
    /// 407 (forward proxy) or 401 (alias): no client token, or an unknown one.
    ClientToken { proxy: bool, reason: String },
    /// 503 from the proxy: the vendor refused every key of the upstream's
    /// pool (each key's reason, in pool order).
    KeysParked {
        upstream: String,
        reasons: Vec<String>,
    },
    /// 503 from the proxy: the request bodies it keeps for waiting and
    /// in-flight requests already add up to `max` bytes.
    BodiesFull { max: usize },
    /// 422 from the proxy: an `Idempotency-Key` it remembers was first sent
    /// with another request (method, URL or body).
    KeyReused { key: String },
}

/// As the enforce face answers when the engine cannot decide: a 400 for a
/// request the policy cannot read, a 503 for a store that is down or full.
impl From<tollgate_store::EngineError> for Refusal {
    fn from(e: tollgate_store::EngineError) -> Refusal {
        match e {
            tollgate_store::EngineError::Request(e) => Refusal::BadRequest(e.to_string()),
            tollgate_store::EngineError::Unavailable { .. } => {
                Refusal::StoreUnavailable(e.to_string())
            }
            e => Refusal::StoreFull(e.to_string()),
        }
    }
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::CostTooLarge { .. } | Refusal::BodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::BodyStalled { .. } => StatusCode::REQUEST_TIMEOUT,
            Refusal::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::StoreFull(_) | Refusal::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::WaitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::BreakerOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::HostNotConfigured { .. } | Refusal::NotIntercepted { .. } => {
                StatusCode::FORBIDDEN
            }
            Refusal::UnknownUpstream { .. } => StatusCode::NOT_FOUND,
            Refusal::ClientToken { proxy: true, .. } => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Refusal::ClientToken { proxy: false, .. } => StatusCode::UNAUTHORIZED,
            Refusal::KeysParked { .. } | Refusal::BodiesFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::KeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// A stable code for machines (the `errors` format's `code`, the problem type's last part).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::CostTooLarge { .. } => "cost_too_large",
            Refusal::BodyTooLarge { .. } => "body_too_large",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::BodyStalled { .. } => "body_stalled",
            Refusal::HeadersTooLarge { .. } => "headers_too_large",
            Refusal::NoRoute => "no_route",
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::StoreFull(_) => "store_full",
            Refusal::StoreUnavailable(_) => "store_unavailable",
            Refusal::UpstreamFailed(_) => "upstream_failed",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::Unauthorized => "unauthorized",
            Refusal::WaitExceeded { .. } => "wait_exceeded",
            Refusal::BreakerOpen { .. } => "breaker_open",
            Refusal::HostNotConfigured { .. } => "host_not_configured",
            Refusal::NotIntercepted { .. } => "not_intercepted",
            Refusal::UnknownUpstream { .. } => "unknown_upstream",
            Refusal::ClientToken { .. } => "client_token",
            Refusal::KeysParked { .. } => "keys_parked",
            Refusal::BodiesFull { .. } => "bodies_full",
            Refusal::KeyReused { .. } => "idempotency_key_reused",
        }
    }

    pub fn title(&self) -> String {
        match self {
            // (joined, not formatted: every 429 says it)
            Refusal::RateLimited { limit, .. } => {
                ["Rate-limit budget for purpose '", limit, "' exhausted"].concat()
            }
            Refusal::CostTooLarge { limit, .. } => {
                format!("Request costs more than limit '{limit}' can ever admit")
            }
            Refusal::BodyTooLarge { .. } => "Request body too large".into(),
            Refusal::BadRequest(_) => "Bad request".into(),
            Refusal::BodyStalled { .. } => "Request body stalled".into(),
            Refusal::HeadersTooLarge { .. } => "Request headers too large".into(),
            Refusal::NoRoute => "No upstream for this request".into(),
            Refusal::MethodNotAllowed(_) => "Method not allowed".into(),
            Refusal::StoreFull(_) => "Rate-limit store full".into(),
            Refusal::StoreUnavailable(_) => "Rate-limit store unavailable".into(),
            Refusal::UpstreamFailed(_) => "Upstream unavailable".into(),
            Refusal::UpstreamTimeout => "Upstream timed out".into(),
            Refusal::Unauthorized => "Unauthorized".into(),
            Refusal::WaitExceeded { upstream, .. } => {
                format!("No slot of upstream '{upstream}' within the wait allowed")
            }
            Refusal::BreakerOpen { upstream, .. } => {
                format!("Upstream '{upstream}' is failing (circuit breaker open)")
            }
            Refusal::HostNotConfigured { .. } => "Host not configured".into(),
            Refusal::NotIntercepted { .. } => "Tunnel not intercepted".into(),
            Refusal::UnknownUpstream { .. } => "No such upstream".into(),
            Refusal::ClientToken { proxy: true, .. } => "Proxy authentication required".into(),
            Refusal::ClientToken { proxy: false, .. } => "Unauthorized".into(),
            Refusal::KeysParked { upstream, .. } => {
                format!("Every key of upstream '{upstream}' is parked")
            }
            Refusal::BodiesFull { .. } => "The proxy keeps too many request bodies".into(),
            Refusal::KeyReused { .. } => "Idempotency-Key reused for another request".into(),
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Refusal::RateLimited { retry_after, .. } => match retry_after {
                Some(r) => [
                    RETRY_AFTER_DETAIL[0],
                    itoa::Buffer::new().format(whole_seconds(*r)),
                    RETRY_AFTER_DETAIL[1],
                ]
                .concat(),
                None => IN_FLIGHT_DETAIL.into(),
            },
            Refusal::CostTooLarge { cost, capacity, .. } => {
                format!("The request costs {cost} units; the most this limit admits is {capacity}. Split it.")
            }
            Refusal::HeadersTooLarge { max } => {
                format!("The request's headers may add up to at most {max} bytes.")
            }
            Refusal::BodyTooLarge { max } => {
                format!("A body read to count its cost may be at most {max} bytes.")
            }
            Refusal::BodyStalled { idle } => format!(
                "No part of the request body came for {} s; send the whole body, or a Content-Length that matches it.",
                idle.as_secs()
            ),
            Refusal::BadRequest(m)
            | Refusal::StoreFull(m)
            | Refusal::StoreUnavailable(m)
            | Refusal::UpstreamFailed(m) => m.clone(),
            Refusal::MethodNotAllowed(m) => format!("tollgate does not relay {m} requests."),
            Refusal::NoRoute => {
                "No route matches this request and no default upstream is set.".into()
            }
            Refusal::UpstreamTimeout => "The upstream did not answer in time.".into(),
            Refusal::Unauthorized => {
                "Send the admin token as 'Authorization: Bearer TOKEN' (a browser: as the password, any user name).".into()
            }
            Refusal::WaitExceeded {
                upstream,
                limit,
                waited,
                retry_after,
            } => {
                let of = limit
                    .as_deref()
                    .map_or_else(String::new, |l| format!(" (limit '{l}')"));
                format!(
                    "Waited {:.1} s for a slot of upstream '{upstream}'{of}; the next is about {} s away. Nothing was sent to the upstream. Raise Tollgate-Max-Wait to wait longer.",
                    *waited as f64 / NANOS_PER_SEC as f64,
                    whole_seconds(*retry_after)
                )
            }
            Refusal::BreakerOpen {
                upstream,
                retry_after,
            } => format!(
                "Upstream '{upstream}' failed repeatedly; tollgate sends it nothing for {} s more, then one probe.",
                whole_seconds(*retry_after)
            ),
            Refusal::HostNotConfigured { host } => format!(
                "No upstream's base URL holds this URL (host '{host}'); tollgate relays only to URLs under the base URLs of its config."
            ),
            Refusal::NotIntercepted { host, upstream } => format!(
                "CONNECT to {host}: upstream '{upstream}' does not intercept its tunnels, and tollgate paces only the requests it sees; call http://PROXY/{upstream}/<path>, or set intercept = true on the upstream and trust the proxy's CA (tollgate proxy ca init)."
            ),
            Refusal::UnknownUpstream { name, known } => format!(
                "No upstream is named '{name}'; call http://PROXY/<upstream>/<path> with one of: {}.",
                known.join(", ")
            ),
            Refusal::ClientToken { reason, .. } => reason.clone(),
            Refusal::KeysParked { upstream, reasons } => format!(
                "The vendor refused every key of upstream '{upstream}' ({}); fix the keys and reload the config.",
                reasons
                    .iter()
                    .enumerate()
                    .map(|(i, r)| format!("key {}: {r}", i + 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Refusal::BodiesFull { max } => format!(
                "The bodies of the requests waiting here or in flight add up to the {max} bytes this proxy keeps for them ([proxy] max_kept_bytes); retry in a moment."
            ),
            Refusal::KeyReused { key } => format!(
                "Idempotency-Key '{key}' was first sent with another request (its method, URL or body differ); nothing was sent to the upstream. Send a new request with a new key."
            ),
        }
    }

    /// The response: body in the configured format, `Retry-After` on a 429
    /// when configured (whole seconds, rounded up).
    pub fn response(&self, settings: &ResponseSettings, request_id: &str) -> Response<Full<Bytes>> {
        let status = self.status();
        let (title, detail) = (self.title(), self.detail());
        let (content_type, body) = match settings.format {
            ErrorFormat::Problem => {
                let generic;
                let kind = if matches!(self, Refusal::RateLimited { .. }) {
                    settings.problem_type.as_str()
                } else {
                    generic = format!("https://tollgate.dev/errors/{}", self.code());
                    generic.as_str()
                };
                let problem = Problem {
                    kind,
                    title: &title,
                    status: status.as_u16(),
                    detail: &detail,
                    instance: request_id,
                };
                ("application/problem+json", Ok(problem.to_json()))
            }
            ErrorFormat::Errors => {
                let errors = Errors {
                    errors: [ErrorItem {
                        code: self.code(),
                        message: &detail,
                    }],
                };
                ("application/json", serde_json::to_vec(&errors))
            }
        };
        // Serializing plain strings and numbers cannot fail.
        let body = body.unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        match self {
            Refusal::RateLimited {
                retry_after: Some(r),
                ..
            } if settings.retry_after => {
                headers.insert(RETRY_AFTER, HeaderValue::from(whole_seconds(*r)));
            }
            Refusal::WaitExceeded { retry_after, .. }
            | Refusal::BreakerOpen { retry_after, .. } => {
                // The proxy's clients retry by it: always sent, at least 1 s.
                headers.insert(
                    RETRY_AFTER,
                    HeaderValue::from(whole_seconds(*retry_after).max(1)),
                );
            }
            Refusal::BodiesFull { .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(1));
            }
            Refusal::ClientToken { proxy: true, .. } => {
                headers.insert(
                    PROXY_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"tollgate\""),
                );
            }
            Refusal::ClientToken { proxy: false, .. } => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tollgate\""),
                );
            }
            // Basic too, so a browser opening the dashboard asks for it.
            Refusal::Unauthorized => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"tollgate admin\", charset=\"UTF-8\""),
                );
            }
            _ => {}
        }
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(X_REQUEST_ID.clone(), id);
        }
        response
    }
}

/// A 429's detail, around the whole seconds to wait.
const RETRY_AFTER_DETAIL: [&str; 2] = ["Too many requests. Retry after ", " seconds."];
/// A 429's detail when no wait is known (a concurrency limit).
const IN_FLIGHT_DETAIL: &str = "Too many requests in flight. Retry when one completes.";

/// Every limit's 429 made once per config up to what differs from one
/// 429 to the next (the seconds to wait and the request id): a refusal
/// then costs one copy and a number, not its title, detail and four JSON
/// strings written again. Its answers are `Refusal::RateLimited`'s, byte
/// for byte.
#[derive(Debug)]
pub struct RateLimitedAnswers {
    /// Per limit of the policy: the body before its detail (problem+json)
    /// or message (`errors`) string.
    heads: Vec<Box<[u8]>>,
    format: ErrorFormat,
    retry_after: bool,
}

impl RateLimitedAnswers {
    pub fn new(policy: &tollgate_core::Policy, settings: &ResponseSettings) -> Self {
        let heads = (policy.limits.iter())
            .map(|limit| {
                let mut head = Vec::new();
                match settings.format {
                    ErrorFormat::Problem => {
                        let title = Refusal::RateLimited {
                            limit: limit.name.clone(),
                            retry_after: None,
                        }
                        .title();
                        head.extend_from_slice(b"{\"type\":");
                        json_string(&mut head, &settings.problem_type);
                        head.extend_from_slice(b",\"title\":");
                        json_string(&mut head, &title);
                        head.extend_from_slice(b",\"status\":429,\"detail\":");
                    }
                    ErrorFormat::Errors => head
                        .extend_from_slice(b"{\"errors\":[{\"code\":\"rate_limited\",\"message\":"),
                }
                head.into_boxed_slice()
            })
            .collect();
        RateLimitedAnswers {
            heads,
            format: settings.format,
            retry_after: settings.retry_after,
        }
    }

    /// The 429 of `Refusal::RateLimited` for the policy's limit `limit`.
    pub fn response(
        &self,
        limit: usize,
        retry_after: Option<Nanos>,
        request_id: &str,
    ) -> Response<Full<Bytes>> {
        let head = &self.heads[limit];
        let mut body = Vec::with_capacity(head.len() + 80 + request_id.len());
        body.extend_from_slice(head);
        // The detail needs no escaping: fixed words and digits.
        body.push(b'"');
        match retry_after {
            Some(r) => {
                body.extend_from_slice(RETRY_AFTER_DETAIL[0].as_bytes());
                body.extend_from_slice(itoa::Buffer::new().format(whole_seconds(r)).as_bytes());
                body.extend_from_slice(RETRY_AFTER_DETAIL[1].as_bytes());
            }
            None => body.extend_from_slice(IN_FLIGHT_DETAIL.as_bytes()),
        }
        body.push(b'"');
        let content_type = match self.format {
            ErrorFormat::Problem => {
                body.extend_from_slice(b",\"instance\":");
                json_string(&mut body, request_id);
                body.push(b'}');
                "application/problem+json"
            }
            ErrorFormat::Errors => {
                body.extend_from_slice(b"}]}");
                "application/json"
            }
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let (Some(r), true) = (retry_after, self.retry_after) {
            headers.insert(RETRY_AFTER, HeaderValue::from(whole_seconds(r)));
        }
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(X_REQUEST_ID.clone(), id);
        }
        response
    }
}

/// RFC 9457 problem details, in the RFC's field order.
#[derive(serde::Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    instance: &'a str,
}

impl Problem<'_> {
    /// The JSON of `serde_json::to_vec(self)`, written without its
    /// serializer: a 429's body is on the hot path, and its strings rarely
    /// need escaping (those that do go through serde_json).
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            80 + self.kind.len() + self.title.len() + self.detail.len() + self.instance.len(),
        );
        out.extend_from_slice(b"{\"type\":");
        json_string(&mut out, self.kind);
        out.extend_from_slice(b",\"title\":");
        json_string(&mut out, self.title);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        out.extend_from_slice(b",\"detail\":");
        json_string(&mut out, self.detail);
        out.extend_from_slice(b",\"instance\":");
        json_string(&mut out, self.instance);
        out.push(b'}');
        out
    }
}

/// `text` as a JSON string: copied between quotes when nothing in it needs
/// escaping, else written by serde_json.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // (no early exit: the loop is vectorized)
    let plain = text.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

/// Celigo's error body.
#[derive(serde::Serialize)]
struct Errors<'a> {
    errors: [ErrorItem<'a>; 1],
}

#[derive(serde::Serialize)]
struct ErrorItem<'a> {
    code: &'a str,
    message: &'a str,
}

/// Seconds rounded up: waiting that long is always enough.
pub fn whole_seconds(ns: Nanos) -> u64 {
    ns.div_ceil(NANOS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::{ErrorFormat, Problem, RateLimitedAnswers, Refusal, ResponseSettings};
    use http_body_util::BodyExt;
    use proptest::prelude::*;

    fn parts(
        response: hyper::Response<http_body_util::Full<bytes::Bytes>>,
    ) -> (hyper::StatusCode, hyper::HeaderMap, bytes::Bytes) {
        let (head, body) = response.into_parts();
        let body = ready_bytes(body);
        (head.status, head.headers, body)
    }

    /// A `Full` body's bytes (it is ready at once).
    fn ready_bytes(body: http_body_util::Full<bytes::Bytes>) -> bytes::Bytes {
        use std::future::Future;
        let mut collect = std::pin::pin!(body.collect());
        let waker = std::task::Waker::noop();
        match collect
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
        {
            std::task::Poll::Ready(Ok(c)) => c.to_bytes(),
            _ => panic!("a full body is ready at once"),
        }
    }

    proptest! {
        #[test]
        fn a_429_made_ahead_is_the_refusals_own(
            names in proptest::collection::vec("[a-zA-Z0-9_.:/-]{1,12}", 1..4),
            which in 0usize..4,
            problem_type in "[ -~]{0,40}|.{0,20}",
            errors in any::<bool>(),
            retry_after_header in any::<bool>(),
            retry_after in proptest::option::of(0u64..10_000_000_000_000),
            request_id in "req_[0-9a-f]{16}|[ -~]{0,12}|.{0,8}",
        ) {
            let mut names = names;
            names.sort();
            names.dedup();
            let limit = which % names.len();
            let config: String = names
                .iter()
                .map(|n| format!("[[limit]]\nname = \"{n}\"\nkey = [\"ip\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/s\"\n"))
                .collect();
            let policy = tollgate_core::parse(&config, &tollgate_core::NoProfiles).expect("policy");
            let settings = ResponseSettings {
                format: if errors { ErrorFormat::Errors } else { ErrorFormat::Problem },
                retry_after: retry_after_header,
                problem_type,
                ..ResponseSettings::default()
            };
            let ahead = RateLimitedAnswers::new(&policy, &settings).response(limit, retry_after, &request_id);
            let refusal = Refusal::RateLimited { limit: names[limit].clone(), retry_after };
            let (status, headers, body) = parts(ahead);
            let (want_status, want_headers, want_body) = parts(refusal.response(&settings, &request_id));
            prop_assert_eq!(status, want_status);
            prop_assert_eq!(headers, want_headers);
            prop_assert_eq!(body, want_body);
        }

        #[test]
        fn a_problem_is_written_as_serde_json_writes_it(
            kind in ".{0,40}",
            title in "[ -~]{0,40}|.{0,40}",
            status in any::<u16>(),
            detail in "[ -~]{0,60}|.{0,60}|[\"\\\\\u{0}-\u{1f}]{0,8}",
            instance in "[0-9a-f_]{0,20}|.{0,20}",
        ) {
            let problem = Problem { kind: &kind, title: &title, status, detail: &detail, instance: &instance };
            let ours = problem.to_json();
            prop_assert_eq!(
                String::from_utf8(ours).expect("UTF-8"),
                serde_json::to_string(&problem).expect("serializable")
            );
        }
    }
}
