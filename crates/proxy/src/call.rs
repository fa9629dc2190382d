//! One request through the proxy, in phases: route → who is calling →
//! control headers → body (kept for a replay up to a cap) → plan (the
//! upstream's limits, keys, costs) → wait in the upstream's line → send →
//! retry what is safe to retry → relay the final response, streamed.
//!
//! A request that waits past its deadline gets tollgate's own 429 and the
//! upstream sees nothing of it. A client that goes away leaves the line
//! (its ticket is dropped), and one whose call is in flight gives its slot
//! back when the response is dropped.

use crate::keys::KeyLease;
use crate::metrics::status_class;
use crate::route::{self, Routed};
use crate::settings::Client;
use crate::state::{Generation, Proxy};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST, PROXY_AUTHORIZATION};
use hyper::{Method, Request, Response};
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tollgate_comply::settings::stand_in;
use tollgate_comply::{Ask, Priority, Refused, Reply, Settled, Ticket, Upstream};
use tollgate_core::policy::Cost;
use tollgate_core::request::query_param;
use tollgate_core::units::{parse_duration, NANOS_PER_SEC};
use tollgate_core::{Clock, Item, Nanos};
use tollgate_http::access::Entry;
use tollgate_http::body::{AnyBody, BoxError, GuardedBody};
use tollgate_http::cache::TOLLGATE_CACHE;
use tollgate_http::dedup::TOLLGATE_DEDUP;
use tollgate_http::{ratelimit, strip_hop_by_hop, Peer, Refusal};

/// The control headers a client may send; every `tollgate-*` header is
/// removed before the request goes on.
static PRIORITY: HeaderName = HeaderName::from_static("tollgate-priority");
static WORKFLOW: HeaderName = HeaderName::from_static("tollgate-workflow");
static MAX_WAIT: HeaderName = HeaderName::from_static("tollgate-max-wait");
static TOKEN: HeaderName = HeaderName::from_static("tollgate-token");
/// On every answer: how many calls to the upstream it took (0: none).
pub static ATTEMPTS: HeaderName = HeaderName::from_static("tollgate-attempts");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The longest `Tollgate-Max-Wait` taken: a day.
const LONGEST_WAIT: Duration = Duration::from_secs(86_400);
/// A failed attempt's body (429, 5xx) kept to relay if it is the last one.
const MAX_FAILURE_BODY: usize = 1 << 20;

/// The response body: the upstream's, streamed, or one tollgate made. A
/// streamed body carries its call's report, made when the body ends or is
/// dropped (the client went away): the call's concurrency slot and latency
/// are settled then.
pub type ResponseBody = GuardedBody<AnyBody, Finish>;

/// A call's report, made on drop.
#[derive(Debug)]
pub struct Finish {
    ticket: Ticket,
    reply: Reply,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.ticket.report(&self.reply);
    }
}

/// What a request asks of its line.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) priority: Priority,
    pub(crate) workflow: Option<String>,
    pub(crate) max_wait: Duration,
    /// Queued work (a job), not a live request: served after the live
    /// requests waiting, and only above the upstream's reserve.
    queued: bool,
    /// Told each attempt's number as it is sent (a job's status shows it).
    sent: Option<Arc<std::sync::atomic::AtomicU32>>,
}

impl Control {
    /// A job's: queued work that waits up to `max_wait` in line.
    pub(crate) fn queued(
        priority: Priority,
        workflow: Option<String>,
        max_wait: Duration,
        sent: &Arc<std::sync::atomic::AtomicU32>,
    ) -> Control {
        Control {
            priority,
            workflow,
            max_wait,
            queued: true,
            sent: Some(sent.clone()),
        }
    }
}

/// The request body, kept whole up to the replay cap, or streamed once.
pub(crate) enum Outgoing {
    Kept(Bytes),
    Once(Option<AnyBody>),
}

impl Outgoing {
    /// No body (a read).
    pub(crate) fn empty() -> Outgoing {
        Outgoing::Kept(Bytes::new())
    }

    fn replayable(&self) -> bool {
        matches!(self, Outgoing::Kept(_))
    }
    /// The body for one attempt; None when a streamed body was sent already.
    fn take(&mut self) -> Option<AnyBody> {
        match self {
            // (an empty body boxes a zero-sized value: no allocation)
            Outgoing::Kept(b) if b.is_empty() => Some(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Outgoing::Kept(b) => Some(
                Full::new(b.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Outgoing::Once(body) => body.take(),
        }
    }
}

/// A request as the upstream's policy reads it: what will be sent.
struct View<'a> {
    method: &'a str,
    url: &'a url::Url,
    headers: &'a HeaderMap,
    upstream: &'a Upstream,
    workflow: Option<&'a str>,
    /// The pool's key this call would carry (in `upstream.key_header`).
    key: Option<&'a str>,
    ip: &'a str,
    body: Option<&'a serde_json::Value>,
}

impl tollgate_core::Request for View<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.url.path()
    }
    fn host(&self) -> Option<&str> {
        self.url.host_str()
    }
    fn ip(&self) -> Option<&str> {
        Some(self.ip)
    }
    fn header(&self, name: &str) -> Option<&str> {
        if name == tollgate_comply::WORKFLOW_HEADER {
            return self.workflow;
        }
        if self.key.is_some() && name == self.upstream.key_header {
            return self.key;
        }
        // The upstream's own headers win, as they do on the wire; the
        // limits see them (vendor keys) by their stand-ins.
        self.upstream
            .limit_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .or_else(|| self.headers.get(name)?.to_str().ok())
    }
    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        query_param(self.url.query()?, name)
    }
    fn query_repeated(&self, name: &str) -> bool {
        (self.url.query()).is_some_and(|q| tollgate_core::request::query_param_repeated(q, name))
    }
    fn json_body(&self) -> Option<&serde_json::Value> {
        self.body
    }
}

/// How a request ended, for the access log and the metrics.
pub(crate) struct Outcome<'a> {
    upstream: Option<&'a str>,
    /// The upstream's series, once the request is routed.
    metrics: Option<&'a crate::metrics::UpstreamMetrics>,
    pub(crate) metric: &'static str,
    pub(crate) decision: &'static str,
    limit: Option<String>,
    attempts: u32,
    waited: Nanos,
    upstream_ms: Option<f64>,
    /// On a cached route's answers: `Tollgate-Cache` (hit, miss, ...).
    pub(crate) cache: Option<&'static str>,
    /// On answers from remembered writes: `Tollgate-Dedup` (hit, unchanged).
    pub(crate) dedup: Option<&'static str>,
}

impl Outcome<'_> {
    pub(crate) fn new() -> Outcome<'static> {
        Outcome {
            upstream: None,
            metrics: None,
            metric: "refused",
            decision: "error",
            limit: None,
            attempts: 0,
            waited: 0,
            upstream_ms: None,
            cache: None,
            dedup: None,
        }
    }

    /// How a fetch made in a task of its own ended, for the request that
    /// waited on it (its upstream and series are the request's).
    pub(crate) fn ended_as(&mut self, fetch: Outcome<'_>) {
        self.metric = fetch.metric;
        self.decision = fetch.decision;
        self.limit = fetch.limit;
        self.attempts = fetch.attempts;
        self.waited = fetch.waited;
        self.upstream_ms = fetch.upstream_ms;
        self.cache = fetch.cache;
        self.dedup = fetch.dedup;
    }

    /// How long its last call to the upstream took to answer.
    pub(crate) fn upstream_ms(&self) -> Option<f64> {
        self.upstream_ms
    }

    /// The same, without the borrows of its generation (to leave a task).
    pub(crate) fn detached(self) -> Outcome<'static> {
        let mut out = Outcome::new();
        out.ended_as(self);
        out
    }
}

/// A client's connection to the proxy listener.
pub(crate) struct Downstream {
    pub(crate) peer: Arc<Peer>,
    /// Watches the tunnel a CONNECT turns this connection into, so a
    /// shutdown drains the requests inside it too (there is one at most).
    pub(crate) tunnel_watcher: parking_lot::Mutex<Option<hyper_util::server::graceful::Watcher>>,
}

impl Proxy {
    /// Serve one request on the proxy listener.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        downstream: Arc<Downstream>,
    ) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        if req.method() == Method::CONNECT {
            return Ok(self.tunnel(req, &downstream));
        }
        Ok(self.serve(req, &downstream.peer, None).await)
    }

    /// A request inside an intercepted tunnel: as if it had been sent to
    /// `https://AUTHORITY/...` through the forward proxy, by the client that
    /// opened the tunnel.
    pub(crate) async fn handle_inside(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<Peer>,
        tunnel: Arc<Tunnel>,
    ) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let (mut parts, body) = req.into_parts();
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match format!("https://{}{target}", tunnel.authority).parse() {
            Ok(uri) => parts.uri = uri,
            Err(e) => {
                let refusal =
                    Refusal::BadRequest(format!("the request target cannot be read: {e}"));
                return Ok(refusal
                    .response(&tollgate_http::ResponseSettings::default(), "tunnel")
                    .map(Into::into));
            }
        }
        let req = Request::from_parts(parts, body);
        Ok(self.serve(req, &peer, Some(&tunnel)).await)
    }

    async fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: &Arc<Peer>,
        via: Option<&Tunnel>,
    ) -> Response<ResponseBody> {
        let generation = self.current();
        let (mut parts, body) = req.into_parts();
        let mut outcome = Outcome::new();
        let result = self
            .call(&generation, &mut parts, body, peer, via, &mut outcome)
            .await;
        // (made only when an answer or a log line shows it)
        let mut request_id = None;
        let mut response = result.unwrap_or_else(|refusal| {
            refusal
                .response(
                    &tollgate_http::ResponseSettings::default(),
                    request_id.insert(self.next_request_id()),
                )
                .map(Into::into)
        });
        response
            .headers_mut()
            .insert(ATTEMPTS.clone(), HeaderValue::from(outcome.attempts));
        if let Some(cache) = outcome.cache {
            response
                .headers_mut()
                .insert(TOLLGATE_CACHE.clone(), HeaderValue::from_static(cache));
        }
        if let Some(dedup) = outcome.dedup {
            response
                .headers_mut()
                .insert(TOLLGATE_DEDUP.clone(), HeaderValue::from_static(dedup));
        }
        let status = response.status().as_u16();
        if let Some(metrics) = outcome.metrics {
            metrics.request(match outcome.metric {
                "response" => status_class(status),
                other => other,
            });
        }
        if self.access.enabled() {
            let path = parts.uri.path();
            let request_id = request_id.unwrap_or_else(|| self.next_request_id());
            let entry = Entry {
                enabled: true,
                request_id: &request_id,
                ip: &peer.ip,
                method: parts.method.as_str(),
                path,
                status,
                decision: outcome.decision,
                limit: outcome.limit.as_deref(),
                // (its rate-limit key may be a vendor's key: never logged)
                key: None,
                remaining: Vec::new(),
                hold_ms: outcome.waited as f64 / 1e6,
                upstream_ms: outcome.upstream_ms,
                upstream: outcome.upstream,
                attempts: Some(outcome.attempts),
            };
            self.access.log(&entry);
        }
        response
    }

    #[allow(clippy::too_many_arguments)]
    async fn call<'g>(
        self: &Arc<Self>,
        generation: &'g Arc<Generation>,
        parts: &mut hyper::http::request::Parts,
        body: Incoming,
        peer: &Arc<Peer>,
        via: Option<&Tunnel>,
        outcome: &mut Outcome<'g>,
    ) -> Result<Response<ResponseBody>, Refusal> {
        tollgate_http::listen::check_head_size(&parts.headers)?;
        let forward = route::is_forward(parts);
        // Who is calling comes first: nothing about the upstreams is told
        // to a caller without a token.
        let client = match via {
            // Inside a tunnel: the client that opened it.
            Some(tunnel) => tunnel.client(generation)?,
            None => client(generation, &parts.headers, forward)?,
        };
        if !forward && via.is_none() && is_own_path(parts.uri.path()) {
            outcome.metric = "jobs";
            outcome.decision = "jobs";
            return Ok(self.jobs_endpoint(parts, body, client).await);
        }
        let Routed { upstream, url } = route::route(generation, parts)?;
        let settings = &generation.config.upstreams[upstream];
        let line = &generation.lines[upstream];
        if via.is_some() && !settings.intercept {
            // A tunnel is opened for an intercepting upstream; another
            // upstream on the same host is not reached through it.
            return Err(Refusal::NotIntercepted {
                host: url.host_str().unwrap_or_default().to_string(),
                upstream: settings.name.clone(),
            });
        }
        outcome.upstream = Some(&settings.name);
        outcome.metrics = Some(&line.metrics);
        let method = parts.method.as_str();
        if tollgate_comply::sendable::unsent_method(method).is_some() {
            return Err(Refusal::MethodNotAllowed(parts.method.to_string()));
        }
        let control = control(&parts.headers, generation, client)?;
        if crate::jobs::prefers_async(&parts.headers) {
            outcome.metric = "queued";
            outcome.decision = "queued";
            return self
                .queue_live(generation, upstream, &url, parts, body, control, client)
                .await;
        }
        let cache = &line.cache;
        if !cache.is_empty() {
            let has_body = !http_body::Body::is_end_stream(&body);
            if let Some(read) =
                crate::cached::Read::of(cache, settings, client, parts, &url, has_body)
            {
                return self
                    .read_through(
                        generation, upstream, &url, read, parts, peer, control, outcome,
                    )
                    .await;
            }
        }
        let write = matches!(
            parts.method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        if write && !line.writes.is_off() {
            return self
                .write_through(
                    generation, upstream, &url, parts, body, peer, client, control, outcome,
                )
                .await;
        }
        let (outgoing, kept) = read_body(body, &self.body_budget(generation)).await?;
        let answer = self
            .fetch(
                generation, upstream, &url, parts, outgoing, kept, peer, &control, outcome,
            )
            .await;
        if write {
            // What the write changed is not served from the cache again.
            cache.written_through(url.path()).await;
        }
        answer
    }

    /// A request past the cache, its body read (`held`: the bytes kept):
    /// wait in the upstream's line, send, retry what is safe to retry,
    /// relay the answer.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fetch<'g>(
        &self,
        generation: &'g Generation,
        upstream: usize,
        url: &url::Url,
        parts: &mut hyper::http::request::Parts,
        outgoing: Outgoing,
        kept: Option<KeptBytes>,
        peer: &Peer,
        control: &Control,
        outcome: &mut Outcome<'g>,
    ) -> Answer {
        let settings = &generation.config.upstreams[upstream];
        let line = &generation.lines[upstream];
        let policy = &settings.policy;
        let needs_json = policy
            .limits
            .iter()
            .any(|l| matches!(l.cost, Cost::JsonArray(_)));
        let json = match (&outgoing, needs_json) {
            (Outgoing::Kept(bytes), true) => tollgate_http::forward::body_json(bytes)?,
            // A limit counts the body's JSON: it must be read whole.
            (Outgoing::Once(_), true) => {
                return Err(Refusal::BodyTooLarge {
                    max: generation.settings.max_replay_bytes,
                })
            }
            _ => None,
        };
        let now = self.clock.now();
        if let Some(until) = line.line.inspect(|s| s.breaker_open_until()) {
            if until > now {
                outcome.metric = "breaker_open";
                return Err(Refusal::BreakerOpen {
                    upstream: settings.name.clone(),
                    retry_after: until - now,
                });
            }
        }
        let safe = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        ) || parts.headers.contains_key(&IDEMPOTENCY_KEY);
        let max_attempts = if safe && outgoing.replayable() {
            settings.max_attempts
        } else {
            1
        };
        let arrived = now;
        let deadline = arrived.saturating_add(control.max_wait.as_nanos() as Nanos);
        let target: hyper::Uri = url.as_str().parse().map_err(|e| {
            Refusal::BadRequest(format!("the request target cannot be forwarded: {e}"))
        })?;
        // What is sent: the client's headers, moved (not copied), made ready
        // once; each attempt sends a copy only if another may follow.
        let headers = outgoing_headers(std::mem::take(&mut parts.headers), settings);
        let key_header = match settings.keys.is_empty() {
            true => None,
            false => HeaderName::from_bytes(settings.key_header.as_bytes()).ok(),
        };
        let mut calls = Calls {
            settings,
            line,
            method: parts.method.clone(),
            target,
            // (another key, after a refusal, is another attempt too)
            sent_again: safe && outgoing.replayable() && (max_attempts > 1 || key_header.is_some()),
            headers,
            body: outgoing,
            arrived,
            deadline,
            last: None,
            failed: None,
            _kept: kept,
            parked_a_key: false,
            suspect: None,
            attempts_before: 0,
            sent: control.sent.clone(),
        };
        // With a key pool, a key the vendor refuses is parked and the
        // request, if it may be sent again, goes with another (judge_key).
        loop {
            let key = match line.keys.choose_except(calls.suspect) {
                Ok(key) => key,
                Err(parked) => {
                    // No other key: the last answer or failure, if one came.
                    if let Some(response) = calls.last.take() {
                        return Ok(response);
                    }
                    if let Some(refusal) = calls.failed.take() {
                        outcome.metric = "network_error";
                        return Err(refusal);
                    }
                    outcome.metric = "keys_parked";
                    return Err(Refusal::KeysParked {
                        upstream: settings.name.clone(),
                        reasons: parked,
                    });
                }
            };
            let pooled = key.as_ref().map(|k| &settings.keys[k.index()]);
            if let (Some(name), Some(value)) = (
                &key_header,
                pooled.and_then(|k| HeaderValue::from_str(&k.value).ok()),
            ) {
                calls.headers.insert(name.clone(), value);
            }
            let view = View {
                method: parts.method.as_str(),
                url,
                headers: &calls.headers,
                upstream: settings,
                workflow: control.workflow.as_deref(),
                key: pooled.map(|k| k.stand_in.as_str()),
                ip: &peer.ip,
                body: json.as_ref(),
            };
            let mut items: Vec<Item> = Vec::with_capacity(policy.limits.len());
            policy
                .plan(&view, &mut items)
                .map_err(|e| Refusal::BadRequest(format!("upstream '{}': {e}", settings.name)))?;
            let ticket = line.line.enter(Ask {
                priority: control.priority,
                items,
                max_attempts,
                queued: control.queued,
                // (only queued work has a schedule: a live request's
                // workflow stays out of the line)
                workflow: control.workflow.clone().filter(|_| control.queued),
            });
            if let Some(answer) = self.with_key(&mut calls, ticket, key, outcome).await {
                return answer;
            }
        }
    }

    /// The attempts of one request with one key of the pool (or with the
    /// upstream's own credentials): wait for the turn, send, retry what is
    /// safe to retry, relay the final answer. None: the key was parked, and
    /// the request goes again with another.
    async fn with_key<'g>(
        &self,
        calls: &mut Calls<'g>,
        mut ticket: Ticket,
        key: Option<KeyLease<'_>>,
        outcome: &mut Outcome<'g>,
    ) -> Option<Answer> {
        let settings = calls.settings;
        loop {
            let turned = match &key {
                Some(k) => tokio::select! {
                    turned = ticket.turn(Some(calls.deadline)) => turned,
                    () = k.parked() => {
                        // Its key was parked while it waited: it leaves that line.
                        calls.attempts_before = outcome.attempts;
                        return None;
                    }
                },
                None => ticket.turn(Some(calls.deadline)).await,
            };
            let attempt = match turned {
                Ok(attempt) => attempt,
                Err(Refused::Expired { waiting }) => {
                    return Some(calls.expired(waiting, self.clock.now(), outcome))
                }
                Err(Refused::Rejected(reason)) => {
                    return Some(Err(Refusal::BadRequest(format!(
                        "upstream '{}': this request {reason}",
                        settings.name
                    ))))
                }
            };
            if let Some(key) = &key {
                key.sent();
                if key.is_parked() {
                    // Refused while this call waited: take another key
                    // (the slot of a dead key is no loss).
                    calls.attempts_before = outcome.attempts;
                    return None;
                }
            }
            let attempt = calls.attempts_before + attempt;
            outcome.attempts = attempt;
            if let Some(sent) = &calls.sent {
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let sent = self.clock.now();
            if attempt == 1 {
                outcome.waited = sent - calls.arrived;
                calls
                    .line
                    .metrics
                    .waited(outcome.waited as f64 / NANOS_PER_SEC as f64);
                // (under a millisecond is the handing over, not a wait)
                outcome.decision = if outcome.waited >= 1_000_000 {
                    "waited"
                } else {
                    "admitted"
                };
            }
            let response = match calls.send().await {
                Ok(response) => response,
                Err((timed_out, error)) => {
                    calls.line.metrics.call("network_error");
                    tracing::warn!(upstream = %settings.name, attempt, "upstream call failed: {error}");
                    let refusal = if timed_out {
                        Refusal::UpstreamTimeout
                    } else {
                        Refusal::UpstreamFailed(format!(
                            "Upstream '{}' could not be reached or broke the connection ({attempt} attempt(s)).",
                            settings.name
                        ))
                    };
                    match ticket.report(&Reply::Failed { error }) {
                        Settled::Retry { at } if at <= calls.deadline => {
                            // (the answer if the wait for the retry runs out)
                            calls.failed = Some(refusal);
                            calls.last = None;
                            continue;
                        }
                        _ => {
                            outcome.metric = "network_error";
                            return Some(Err(refusal));
                        }
                    }
                }
            };
            outcome.upstream_ms = Some((self.clock.now() - sent) as f64 / 1e6);
            outcome.metric = "response";
            let status = response.status().as_u16();
            calls.line.metrics.call(status_class(status));
            let reply = Reply::Status {
                status,
                retry_after: ratelimit::retry_after(
                    response
                        .headers()
                        .get(hyper::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()),
                    std::time::SystemTime::now(),
                ),
                corrections: ratelimit::corrections_in(response.headers()),
            };
            let another_key = match &key {
                Some(key) => calls.judge_key(key.index(), status),
                None => false,
            };
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            // (the upstream's HTTP version and extensions are not relayed)
            head.version = hyper::Version::HTTP_11;
            head.extensions.clear();
            if another_key {
                // The request (which the key did not serve) goes again with
                // another; this answer is kept in case no key is left.
                let bytes = read_capped(body, MAX_FAILURE_BODY, settings.timeout).await;
                head.headers.remove(hyper::header::CONTENT_LENGTH);
                calls.last = Some(Response::from_parts(head, Full::new(bytes).into()));
                calls.failed = None;
                ticket.report(&reply);
                calls.attempts_before = attempt;
                return None;
            }
            if !matches!(status, 429 | 408 | 500..=599) {
                // The final answer: streamed, reported when it ends.
                let body = GuardedBody::new(
                    body.map_err(BoxError::from).boxed_unsync(),
                    Some(Finish { ticket, reply }),
                );
                return Some(Ok(Response::from_parts(head, body)));
            }
            // A failed attempt: its body is kept, in case it is the last.
            let bytes = read_capped(body, MAX_FAILURE_BODY, settings.timeout).await;
            // (what was kept may be shorter than the upstream's length)
            head.headers.remove(hyper::header::CONTENT_LENGTH);
            let kept = Response::from_parts(head, Full::new(bytes).into());
            match ticket.report(&reply) {
                Settled::Retry { at } if at <= calls.deadline => {
                    tracing::info!(upstream = %settings.name, status, attempt, "retrying");
                    calls.last = Some(kept);
                    calls.failed = None;
                }
                _ => return Some(Ok(kept)),
            }
        }
    }
}

/// What a request gets: the upstream's response, or tollgate's refusal.
pub(crate) type Answer = Result<Response<ResponseBody>, Refusal>;

/// What every attempt of one request shares.
struct Calls<'g> {
    settings: &'g Upstream,
    line: &'g crate::state::UpstreamLine,
    method: Method,
    target: hyper::Uri,
    /// Ready to send, the pooled key (if any) in place.
    headers: HeaderMap,
    /// Whether an attempt may follow this one (then each sends a copy).
    sent_again: bool,
    body: Outgoing,
    arrived: Nanos,
    deadline: Nanos,
    /// A failed attempt's response, relayed if no other attempt comes.
    last: Option<Response<ResponseBody>>,
    /// An attempt that got no response, answered if no other attempt comes.
    failed: Option<Refusal>,
    /// A key of the pool was parked for this request.
    parked_a_key: bool,
    /// A key that answered this request 403: parked if another key is
    /// served, cleared if another key gets 403 too.
    suspect: Option<usize>,
    /// The body's bytes, counted against `[proxy] max_kept_bytes` while
    /// the request lasts.
    _kept: Option<KeptBytes>,
    /// Attempts made with keys parked since.
    attempts_before: u32,
    /// Told each attempt's number as it is sent (`Control::sent`).
    sent: Option<Arc<std::sync::atomic::AtomicU32>>,
}

impl<'g> Calls<'g> {
    /// One call to the upstream: the response head, or whether it timed out
    /// and what failed.
    async fn send(&mut self) -> Result<Response<Incoming>, (bool, String)> {
        let Some(body) = self.body.take() else {
            // (such a request has one attempt: a guard, not a path)
            return Err((
                false,
                "the request body was streamed once and cannot be sent again".into(),
            ));
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.target.clone();
        *request.headers_mut() = match self.sent_again {
            true => self.headers.clone(),
            false => std::mem::take(&mut self.headers),
        };
        let call = self.line.client.request(request);
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err((false, tollgate_http::client::failure(&e))),
            Err(_) => Err((true, "timed out".to_string())),
        }
    }

    /// What an answer says of pooled key `index`; true when the request
    /// goes again with another key.
    /// - 401 and 402 say the key itself is refused: it is parked. One
    ///   request parks one key at most: if the next key is refused too, the
    ///   request itself is the likely cause, and its answer is relayed.
    /// - A 403 may be about the key (suspended) or the request (a scope the
    ///   keys lack): the key is suspected, and parked only if another key
    ///   is then served; if that one gets 403 too, nothing is parked.
    ///
    /// Only a request safe to send again goes again.
    fn judge_key(&mut self, index: usize, status: u16) -> bool {
        let park = |calls: &mut Calls<'g>, index: usize, reason: String| {
            calls.line.keys.park(index, reason.clone());
            calls.parked_a_key = true;
            tracing::warn!(
                upstream = %calls.settings.name,
                key = %calls.settings.keys[index].label,
                "the vendor refused a pooled key ({reason}): parked; the other keys carry on"
            );
        };
        match status {
            401 | 402 if !self.parked_a_key && self.suspect.is_none() => {
                park(self, index, format!("HTTP {status}"));
                self.sent_again
            }
            403 if self.suspect.is_none() && !self.parked_a_key && self.sent_again => {
                self.suspect = Some(index);
                true
            }
            200..=299 => {
                if let Some(suspect) = self.suspect.take() {
                    park(self, suspect, "HTTP 403 (another key was served)".into());
                }
                false
            }
            _ => false,
        }
    }

    /// The deadline passed while the request waited: the last failed
    /// attempt's answer if there was one, else tollgate's 429.
    fn expired(
        &mut self,
        waiting: Option<tollgate_comply::Waiting>,
        now: Nanos,
        outcome: &mut Outcome<'g>,
    ) -> Result<Response<ResponseBody>, Refusal> {
        outcome.waited = now - self.arrived;
        if let Some(response) = self.last.take() {
            outcome.metric = "response";
            outcome.decision = "retried";
            return Ok(response);
        }
        if let Some(refusal) = self.failed.take() {
            // Something was sent: not "nothing was sent" (tollgate's 429).
            outcome.metric = "network_error";
            outcome.decision = "retried";
            return Err(refusal);
        }
        let limit = waiting
            .and_then(|w| w.limit)
            .map(|l| self.settings.policy.limits[l].name.clone());
        outcome.metric = "wait_exceeded";
        outcome.decision = "denied";
        outcome.limit = limit.clone();
        Err(Refusal::WaitExceeded {
            upstream: self.settings.name.clone(),
            limit,
            waited: now - self.arrived,
            retry_after: waiting.map_or(NANOS_PER_SEC, |w| w.until.saturating_sub(now)),
        })
    }
}

/// An intercepted `CONNECT` tunnel: where it goes, and who opened it.
#[derive(Debug)]
pub(crate) struct Tunnel {
    authority: String,
    /// The client's name and its token's digest (None: the proxy has no
    /// clients): a token changed by a reload no longer opens this tunnel.
    client: Option<(String, String)>,
}

impl Tunnel {
    /// The client that opened the tunnel, as the config in force knows it.
    fn client<'g>(&self, generation: &'g Generation) -> Result<Option<&'g Client>, Refusal> {
        let clients = &generation.settings.clients;
        if clients.is_empty() {
            return Ok(None);
        }
        self.client
            .as_ref()
            .and_then(|(name, token)| {
                clients
                    .iter()
                    .find(|c| c.name == *name && stand_in(&c.token) == *token)
            })
            .map(Some)
            .ok_or_else(|| Refusal::ClientToken {
                proxy: true,
                reason: "The client that opened this tunnel is no longer known to this proxy, or its token changed; connect again with a client token.".into(),
            })
    }
}

impl Proxy {
    /// `CONNECT host:port`: refused unless an upstream with `intercept =
    /// true` is at that address; then answered 200, and the tunnel's TLS is
    /// ended here with a certificate for the host from the local CA, so
    /// each request inside is served like any other.
    fn tunnel(
        self: Arc<Self>,
        req: Request<Incoming>,
        downstream: &Downstream,
    ) -> Response<ResponseBody> {
        let generation = self.current();
        let request_id = self.next_request_id();
        let refuse = |refusal: Refusal| {
            let mut response = refusal
                .response(&tollgate_http::ResponseSettings::default(), &request_id)
                .map(Into::into);
            response
                .headers_mut()
                .insert(ATTEMPTS.clone(), HeaderValue::from(0));
            response
        };
        let client = match client(&generation, req.headers(), true) {
            Ok(client) => client,
            Err(refusal) => return refuse(refusal),
        };
        let Some(authority) = req.uri().authority().cloned() else {
            return refuse(Refusal::BadRequest(
                "CONNECT needs a host:port target".into(),
            ));
        };
        let host = authority.host().to_ascii_lowercase();
        let (host, port) = (host.as_str(), authority.port_u16().unwrap_or(443));
        let at = |u: &&Upstream| {
            u.base_url.host_str() == Some(host) && u.base_url.port_or_known_default() == Some(port)
        };
        let upstreams = &generation.config.upstreams;
        let upstream = match upstreams.iter().find(|u| at(u) && u.intercept) {
            Some(u) => u,
            None => {
                return refuse(match upstreams.iter().find(at) {
                    Some(u) => Refusal::NotIntercepted {
                        host: authority.to_string(),
                        upstream: u.name.clone(),
                    },
                    None => Refusal::HostNotConfigured {
                        host: authority.to_string(),
                    },
                })
            }
        };
        let tls = match generation.ca.as_ref().map(|ca| ca.server_config(host)) {
            Some(Ok(tls)) => tls,
            Some(Err(e)) => return refuse(Refusal::UpstreamFailed(e)),
            None => {
                return refuse(Refusal::UpstreamFailed(
                    "the proxy has no local CA loaded".into(),
                ))
            }
        };
        tracing::debug!(upstream = %upstream.name, "tunnel opened; its requests are intercepted");
        let tunnel = Arc::new(Tunnel {
            authority: authority.to_string(),
            client: client.map(|c| (c.name.clone(), stand_in(&c.token))),
        });
        let proxy = self.clone();
        let peer = downstream.peer.clone();
        let watcher = downstream.tunnel_watcher.lock().take();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!("a CONNECT was not followed by its tunnel: {e}");
                    return;
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            // (bounded as the listeners' handshakes are: a tunnel opened and
            // left silent would otherwise hold its socket for good)
            let handshake = acceptor.accept(hyper_util::rt::TokioIo::new(upgraded));
            let stream = match tokio::time::timeout(
                tollgate_http::listen::HANDSHAKE_TIMEOUT,
                handshake,
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    // Most often: the client does not trust the local CA.
                    tracing::warn!("a client did not complete TLS in its tunnel (does it trust the proxy's CA?): {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(
                        "a client sent no TLS handshake in its tunnel within {:?}",
                        tollgate_http::listen::HANDSHAKE_TIMEOUT
                    );
                    return;
                }
            };
            let service = hyper::service::service_fn(move |inner| {
                proxy
                    .clone()
                    .handle_inside(inner, peer.clone(), tunnel.clone())
            });
            let inside = hyper_util::rt::TokioIo::new(stream);
            tollgate_http::listen::serve_http1_io(inside, service, watcher);
        });
        Response::new(Full::new(Bytes::new()).into())
    }
}

/// The client a request comes from, by its token; None when the proxy has
/// no clients (loopback only). Tokens are compared in constant time and
/// never echoed.
fn client<'g>(
    generation: &'g Generation,
    headers: &HeaderMap,
    forward: bool,
) -> Result<Option<&'g Client>, Refusal> {
    let clients = &generation.settings.clients;
    if clients.is_empty() {
        return Ok(None);
    }
    let how = if forward {
        "send your client token as Proxy-Authorization (Bearer TOKEN, or Basic with the token as the password: http://NAME:TOKEN@proxy:port in HTTP_PROXY)"
    } else {
        "send your client token as Tollgate-Token: TOKEN (or Proxy-Authorization: Bearer TOKEN)"
    };
    let given = headers
        .get(&PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(token_of)
        .or_else(|| {
            headers
                .get(&TOKEN)
                .and_then(|v| v.to_str().ok())
                .map(|t| t.trim().to_string())
        });
    let Some(given) = given else {
        return Err(Refusal::ClientToken {
            proxy: forward,
            reason: format!("No client token: {how}."),
        });
    };
    clients
        .iter()
        .find(|c| tollgate_http::admin::same_secret(&given, &c.token))
        .map(Some)
        .ok_or_else(|| Refusal::ClientToken {
            proxy: forward,
            reason: format!("The client token is not known to this proxy: {how}."),
        })
}

/// The token of a `Proxy-Authorization` value: `Bearer TOKEN`, or `Basic`
/// with the token as the password (or the user, with no password).
fn token_of(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':').unwrap_or((&text, ""));
        return Some(if password.is_empty() { user } else { password }.to_string());
    }
    None
}

/// The request's control headers, over its client's defaults.
fn control(
    headers: &HeaderMap,
    generation: &Generation,
    client: Option<&Client>,
) -> Result<Control, Refusal> {
    let text = |name: &HeaderName| -> Result<Option<&str>, Refusal> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|t| Some(t.trim()))
                .map_err(|_| Refusal::BadRequest(format!("header {name} must be visible ASCII"))),
        }
    };
    let priority = match text(&PRIORITY)? {
        Some(p) => Priority::parse(&p.to_ascii_lowercase())
            .map_err(|m| Refusal::BadRequest(format!("header Tollgate-Priority: {m}")))?,
        None => client.map_or(Priority::Normal, |c| c.priority),
    };
    let workflow = match text(&WORKFLOW)? {
        Some("") => {
            return Err(Refusal::BadRequest(
                "header Tollgate-Workflow is empty; name the workflow (e.g. crm-sync)".into(),
            ))
        }
        Some(w) if w.len() > 128 => {
            return Err(Refusal::BadRequest(
                "header Tollgate-Workflow is longer than 128 characters".into(),
            ))
        }
        Some(w) => Some(w.to_string()),
        None => client.and_then(|c| c.workflow.clone()),
    };
    let max_wait = match text(&MAX_WAIT)? {
        Some(w) => wait_of(w).ok_or_else(|| {
            Refusal::BadRequest(format!(
                "header Tollgate-Max-Wait: '{w}' is not a wait; write e.g. 5s, 500ms or 2m (at most 1d)"
            ))
        })?,
        None => generation.settings.max_wait,
    };
    Ok(Control {
        priority,
        workflow,
        max_wait,
        queued: false,
        sent: None,
    })
}

/// A path under tollgate's own first segment (`/_tollgate/...`).
fn is_own_path(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(crate::RESERVED))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `5s`, `500ms`, `2m`, or plain seconds (`5`, `0.5`); at most a day.
fn wait_of(text: &str) -> Option<Duration> {
    let wait = match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs.min(1e6)),
        Ok(_) => return None,
        Err(_) => Duration::from_nanos(parse_duration(text).ok()?),
    };
    (wait <= LONGEST_WAIT).then_some(wait)
}

/// What goes to the upstream: the client's headers without hop-by-hop
/// ones, tollgate's own, the proxy credentials and Host (the URL gives it),
/// then the upstream's configured headers, which win.
pub(crate) fn outgoing_headers(client: HeaderMap, upstream: &Upstream) -> HeaderMap {
    let mut headers = client;
    strip_hop_by_hop(&mut headers);
    headers.remove(HOST);
    headers.remove(PROXY_AUTHORIZATION);
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("tollgate-"))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
    for (name, value) in upstream.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers
}

/// Bytes of one request's body counted in the proxy's total until dropped.
pub(crate) struct KeptBytes {
    total: Arc<AtomicUsize>,
    bytes: usize,
}

impl KeptBytes {
    /// Count `more` bytes too, unless the total would pass `max` (503: the
    /// request waits nowhere and nothing of it is sent).
    fn grow(&mut self, more: usize, max: usize) -> Result<(), Refusal> {
        let before = self.total.fetch_add(more, Ordering::Relaxed);
        if before.saturating_add(more) > max {
            self.total.fetch_sub(more, Ordering::Relaxed);
            return Err(Refusal::BodiesFull { max });
        }
        self.bytes += more;
        Ok(())
    }

    /// Itself, if it counts anything.
    fn held(self) -> Option<KeptBytes> {
        (self.bytes > 0).then_some(self)
    }
}

/// How much of a body is kept whole (`cap`, `[proxy] max_replay_bytes`), and
/// the bytes all kept bodies may add up to (`[proxy] max_kept_bytes`).
pub(crate) struct BodyBudget {
    pub(crate) cap: usize,
    pub(crate) total: Arc<AtomicUsize>,
    pub(crate) max: usize,
}

impl BodyBudget {
    /// `bytes` of a body already whole (a queued job's), counted; none for
    /// an empty one.
    pub(crate) fn claim(&self, bytes: usize) -> Result<Option<KeptBytes>, Refusal> {
        let mut counted = self.counter();
        counted.grow(bytes, self.max)?;
        Ok(counted.held())
    }

    /// A count of no bytes yet, in this budget's total.
    fn counter(&self) -> KeptBytes {
        KeptBytes {
            total: self.total.clone(),
            bytes: 0,
        }
    }
}

impl Proxy {
    /// `generation`'s body budget over the proxy's count of kept bytes.
    pub(crate) fn body_budget(&self, generation: &Generation) -> BodyBudget {
        BodyBudget {
            cap: generation.settings.max_replay_bytes,
            total: self.kept_bytes.clone(),
            max: generation.settings.max_kept_bytes,
        }
    }
}

impl Drop for KeptBytes {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Longest a client may pause while sending a body the proxy reads (as
/// nginx's `client_body_timeout`).
pub(crate) const BODY_IDLE: Duration = Duration::from_secs(60);

/// The client's body: kept whole up to `cap` (so it can be sent again), or
/// streamed once when larger; and the bytes held of it.
pub(crate) async fn read_body(
    mut body: Incoming,
    budget: &BodyBudget,
) -> Result<(Outgoing, Option<KeptBytes>), Refusal> {
    let cap = budget.cap;
    // (counted as it comes, not once it is whole: bodies on their way in
    // are bounded by `max_kept_bytes` too)
    let mut counted = budget.counter();
    let mut kept = BytesMut::new();
    loop {
        // (a client that stops sending would otherwise hold what it sent, and
        // its connection, for good: no idle bound applies while a request runs)
        let Ok(next) = tokio::time::timeout(BODY_IDLE, body.frame()).await else {
            return Err(Refusal::BodyStalled { idle: BODY_IDLE });
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| {
            let cause =
                std::error::Error::source(&e).map_or_else(String::new, |c| format!(" ({c})"));
            Refusal::BadRequest(format!("the request body could not be read: {e}{cause}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not relayed
        };
        counted.grow(data.len(), budget.max)?;
        if kept.len() + data.len() > cap {
            kept.extend_from_slice(&data);
            // (counted as read: what a streamed body keeps at most, the cap
            // give or take one read)
            let first = futures_util::stream::once(std::future::ready(Ok::<Bytes, hyper::Error>(
                kept.freeze(),
            )));
            let rest = http_body_util::BodyDataStream::new(body);
            let stream = first
                .chain(rest)
                .map_ok(Frame::data)
                .map_err(BoxError::from);
            let once = Outgoing::Once(Some(StreamBody::new(stream).boxed_unsync()));
            return Ok((once, counted.held()));
        }
        kept.extend_from_slice(&data);
    }
    Ok((Outgoing::Kept(kept.freeze()), counted.held()))
}

/// A response body, up to `cap` bytes (the rest is dropped), read for at
/// most `within`: what came by then is kept.
async fn read_capped(mut body: Incoming, cap: usize, within: Duration) -> Bytes {
    let until = tokio::time::Instant::now() + within;
    let mut kept = BytesMut::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, body.frame()).await {
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let room = cap - kept.len();
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if kept.len() >= cap {
            break;
        }
    }
    kept.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_durations_or_plain_seconds_up_to_a_day() {
        assert_eq!(wait_of("5s"), Some(Duration::from_secs(5)));
        assert_eq!(wait_of("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(wait_of("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(wait_of("0"), Some(Duration::ZERO));
        assert_eq!(wait_of("2d"), None);
        assert_eq!(wait_of("soon"), None);
        assert_eq!(wait_of("-1"), None);
    }

    #[test]
    fn proxy_credentials_carry_the_token_as_bearer_or_basic_password() {
        assert_eq!(token_of("Bearer abc"), Some("abc".into()));
        let basic = base64::engine::general_purpose::STANDARD.encode("sync:abc");
        assert_eq!(token_of(&format!("Basic {basic}")), Some("abc".into()));
        let user_only = base64::engine::general_purpose::STANDARD.encode("abc:");
        assert_eq!(token_of(&format!("basic {user_only}")), Some("abc".into()));
        assert_eq!(token_of("Digest x"), None);
    }
}
