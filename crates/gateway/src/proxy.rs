//! The proxy path: a request in, a decision, then either a refusal or the
//! upstream's response streamed back with the rate-limit headers.
//!
//! Phases, in order: route → read the body (only if a limit's cost needs it)
//! → plan (keys, costs) → decide (with a hold place if the limit holds) →
//! hold → forward → stream the response; the limits' completion (latency
//! debit, concurrency release) runs when the response body ends or is
//! dropped (the client went away).

use crate::gateway::{Gateway, Generation};
use crate::metrics::Outcome;
use crate::settings::Upstream;
use crate::upstream::{ClientConnection, UpstreamError};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONNECTION, UPGRADE};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tollgate_core::policy::Cost;
use tollgate_core::{Decision, Item, Verdict};
use tollgate_http::access::Entry;
use tollgate_http::body::{EitherBody, GuardedBody};
use tollgate_http::forward::X_FORWARDED_FOR;
use tollgate_http::ratelimit::add_rate_headers;
use tollgate_http::{normalize_path, strip_hop_by_hop, HttpRequest, Peer, Refusal, X_REQUEST_ID};
use tollgate_store::{decide_holding, Admission, HoldBounds};

/// What goes to the upstream: the client's body streamed, or the bytes read
/// for a JSON cost.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The response body: the upstream's, streamed, or one the gateway made. It
/// carries the request's admission, settled when the body ends or is dropped.
pub type ResponseBody = GuardedBody<EitherBody, Admission>;

/// The client's address: the peer's, or, behind a trusted proxy, the last
/// `X-Forwarded-For` entry. That proxy appends the address it saw at the
/// end; everything before it is the client's own writing, so a limit keyed
/// on it could be dodged by varying it. An entry that is not an address (an
/// IPv4 one may carry a port) leaves the peer's. Written in its canonical
/// form, so `2001:DB8::1` and `2001:db8:0::1` share one key.
fn client_ip<'p>(gen: &Generation, headers: &HeaderMap, peer: &'p Peer) -> Cow<'p, str> {
    if gen.settings.trust_forwarded_for {
        let last = (headers.get_all(&X_FORWARDED_FOR).iter().next_back())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim)
            .and_then(|v| {
                (v.parse::<IpAddr>().ok()).or_else(|| v.parse::<SocketAddr>().ok().map(|a| a.ip()))
            });
        if let Some(ip) = last {
            return Cow::Owned(ip.to_string());
        }
    }
    Cow::Borrowed(&peer.ip)
}

/// The request's first key, readable: parts separated by '|'.
fn key_text(items: &[Item]) -> Option<String> {
    items.first().map(|i| {
        i.key
            .chars()
            .map(|c| match c {
                '\u{1f}' => '|',
                '\u{1e}' => '-',
                c => c,
            })
            .filter(|c| *c != '\u{1d}')
            .collect()
    })
}

impl Gateway {
    /// Serve one request on the proxy listener.
    pub async fn proxy(
        self: Arc<Self>,
        req: Request<Incoming>,
        connection: Arc<ClientConnection>,
    ) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let generation = self.current();
        let request_id = self.next_request_id();
        let (mut parts, body) = req.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        // A WebSocket handshake: the connection is taken over once the upstream agrees.
        let upgrade = websocket_upgrade(&headers)
            .and_then(|protocol| Some((protocol, parts.extensions.remove::<OnUpgrade>()?)));
        let peer = &connection.peer;
        let ip = client_ip(&generation, &headers, peer);
        let path = normalize_path(parts.uri.path());
        let mut log = Entry {
            enabled: self.access.enabled()
                && generation.settings.access_log != crate::settings::AccessLog::Off,
            request_id: &request_id,
            ip: &ip,
            method: parts.method.as_str(),
            path: &path,
            decision: "error",
            ..Entry::default()
        };
        // If the client goes away before the answer, this logs it (as 499).
        let mut abandoned = Abandoned {
            gateway: &self,
            entry: Some(Entry {
                status: 499,
                decision: "abandoned",
                ..log.clone()
            }),
        };
        let request = Incoming_ {
            parts: &parts,
            headers,
            path: &path,
            ip: &ip,
            peer,
            upgrade,
        };
        let response = self
            .proxy_inner(
                &generation,
                &request_id,
                request,
                body,
                &connection,
                &mut log,
            )
            .await;
        abandoned.entry = None;
        let response = response.unwrap_or_else(|refusal| {
            refusal
                .response(&generation.settings.response, &request_id)
                .map(Into::into)
        });
        log.status = response.status().as_u16();
        self.metrics.response(log.status);
        if log.enabled && !self.access.log(&log) {
            self.metrics.access_log_dropped.inc();
        }
        Ok(response)
    }

    async fn proxy_inner<'a>(
        &self,
        generation: &'a Arc<Generation>,
        request_id: &str,
        mut request: Incoming_<'a>,
        body: Incoming,
        connection: &ClientConnection,
        log: &mut Entry<'a>,
    ) -> Result<Response<ResponseBody>, Refusal> {
        let settings = &generation.settings;
        let policy = generation.engine.policy();
        let parts = request.parts;
        if parts.method == hyper::Method::CONNECT {
            return Err(Refusal::MethodNotAllowed("CONNECT".into()));
        }
        // (RFC 9112 3.2: the limits would read one, the upstream maybe the other)
        if request
            .headers
            .get_all(hyper::header::HOST)
            .iter()
            .nth(1)
            .is_some()
        {
            return Err(Refusal::BadRequest(
                "the request has more than one Host header".into(),
            ));
        }
        let mut view = HttpRequest {
            parts,
            headers: &request.headers,
            path: request.path,
            ip: Some(request.ip),
            body: None,
        };
        let upstream = settings
            .upstream_for(&view)
            .cloned()
            .ok_or(Refusal::NoRoute)?;
        tollgate_http::listen::check_head_size(view.headers)?;
        for name in &generation.read_headers {
            let mut values = view.headers.get_all(name).iter();
            if let Some(v) = values.next() {
                if v.to_str().is_err() {
                    return Err(Refusal::BadRequest(format!(
                        "header {name} must be visible ASCII; its value has other bytes"
                    )));
                }
                // (the limits read the first; an upstream may read the last, or both)
                if values.any(|other| other != v) {
                    return Err(Refusal::BadRequest(format!(
                        "header {name} is given more than once with different values; the limits read it, give it once"
                    )));
                }
            }
        }

        // The body is read only when a limit that applies counts its JSON.
        let needs_body = generation.reads_body
            && policy
                .limits
                .iter()
                .any(|l| matches!(l.cost, Cost::JsonArray(_)) && l.matcher.matches(&view));
        let json;
        let body: ProxyBody = if needs_body {
            let max = settings.max_body_bytes;
            let bytes = match Limited::new(body, max).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(Refusal::BodyTooLarge { max })
                }
                Err(e) => {
                    return Err(Refusal::BadRequest(format!(
                        "the request body could not be read: {e}"
                    )))
                }
            };
            json = tollgate_http::forward::body_json(&bytes)?;
            view.body = json.as_ref();
            Either::Right(Full::new(bytes))
        } else {
            Either::Left(body)
        };

        let mut items = Vec::with_capacity(policy.limits.len());
        policy
            .plan(&view, &mut items)
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        let logging = log.enabled;
        if logging {
            log.key = key_text(&items);
        }

        let bounds = HoldBounds {
            total: settings.max_held,
            per_key: settings.max_held_per_key,
        };
        let mut decided =
            decide_holding(&generation.engine, &items, &self.clock, &self.holds, bounds)
                .await
                .map_err(Refusal::from)?;
        let decision = &decided.decision;
        if logging {
            log.remaining = items
                .iter()
                .zip(&decision.outcomes)
                .filter(|(_, o)| !o.shadow)
                .map(|(i, o)| (policy.limits[i.limit].name.as_str(), o.remaining))
                .collect();
        }
        for (item, outcome) in items.iter().zip(&decision.outcomes) {
            if outcome.shadow && !outcome.allowed {
                generation.counters[item.limit].count(Outcome::ShadowDenied);
            }
        }
        let delay = match decision.verdict {
            Verdict::Admit { delay } => delay,
            Verdict::Deny { limit, retry_after } => {
                let limit = items[limit].limit;
                generation.counters[limit].count(Outcome::Denied);
                log.decision = "denied";
                log.limit = Some(&policy.limits[limit].name);
                let answer = generation
                    .rate_limited
                    .response(limit, retry_after, request_id);
                return Ok(generation.with_rate_headers(answer, &items, decision));
            }
            Verdict::Never {
                limit,
                cost,
                capacity,
            } => {
                let name = &policy.limits[items[limit].limit].name;
                log.limit = Some(name);
                return Err(Refusal::CostTooLarge {
                    limit: name.clone(),
                    cost,
                    capacity,
                });
            }
        };
        let outcome = if delay > 0 {
            Outcome::Held
        } else {
            Outcome::Admitted
        };
        for (item, o) in items.iter().zip(&decision.outcomes) {
            if !o.shadow {
                generation.counters[item.limit].count(outcome);
            }
        }
        log.decision = if delay > 0 { "held" } else { "admitted" };
        // Created before the hold: a client that leaves while held still releases.
        let mut completion = Admission::new(&generation.engine, &items, &decided, &self.clock);
        decided.hold(&self.clock).await;
        if delay > 0 {
            log.hold_ms = delay as f64 / 1e6;
            self.metrics.hold_seconds.observe(delay as f64 / 1e9);
        }
        let decision = &decided.decision;

        if let Some(c) = completion.as_mut() {
            c.start();
        }
        let sent = tokio::time::Instant::now();
        // Validated once, shared by the upstream request and the response.
        let id_header = HeaderValue::from_str(request_id).ok();
        let upgrade = request.upgrade.take();
        let mut outgoing = upstream_request(request, &upstream, body, id_header.clone())?;
        if let Some((protocol, _)) = &upgrade {
            // Hop-by-hop, so stripped above; asked of the upstream again.
            outgoing
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            outgoing.headers_mut().insert(UPGRADE, protocol.clone());
        }
        let answer = std::pin::pin!(connection.send(&upstream, outgoing));
        let refusal = match connection
            .deadline
            .within(settings.upstream_timeout, answer)
            .await
        {
            None => Refusal::UpstreamTimeout,
            Some(Err(e)) => {
                // The detail goes to clients: the upstream's address stays in the log.
                tracing::warn!(upstream = %upstream.authority, "upstream request failed: {e}");
                Refusal::UpstreamFailed(if matches!(e, UpstreamError::Connect(_)) {
                    "The upstream could not be reached.".into()
                } else {
                    "The upstream connection failed before a response (or the request body was cut short).".into()
                })
            }
            Some(Ok(mut response)) => {
                let upstream_time = sent.elapsed().as_secs_f64();
                self.metrics.upstream_seconds.observe(upstream_time);
                log.upstream_ms = Some(upstream_time * 1e3);
                if let Some((_, client)) = upgrade {
                    if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                        let upstream = hyper::upgrade::on(&mut response);
                        let (mut head, _) = response.into_parts();
                        generation.add_rate_headers(&mut head.headers, &items, decision);
                        if let Some(id) = id_header {
                            head.headers.insert(X_REQUEST_ID.clone(), id);
                        }
                        tokio::spawn(tunnel(client, upstream, completion));
                        return Ok(Response::from_parts(head, Full::new(Bytes::new()).into()));
                    }
                }
                return Ok(self.relay(
                    generation, id_header, &items, decision, response, completion,
                ));
            }
        };
        // Admitted, so it used quota: the answer still says what is left.
        let answer = refusal.response(&settings.response, request_id);
        Ok(generation.with_rate_headers(answer, &items, decision))
    }

    /// The upstream's response, with the rate-limit headers, streamed back;
    /// the request's completion runs when its body ends.
    fn relay(
        &self,
        generation: &Generation,
        id_header: Option<HeaderValue>,
        items: &[Item],
        decision: &Decision,
        response: Response<Incoming>,
        completion: Option<Admission>,
    ) -> Response<ResponseBody> {
        let (mut head, body) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        generation.add_rate_headers(&mut head.headers, items, decision);
        if let Some(id) = id_header {
            head.headers.insert(X_REQUEST_ID.clone(), id);
        }
        Response::from_parts(head, GuardedBody::new(Either::Left(body), completion))
    }
}

impl Generation {
    /// The rate-limit headers of this config for a decision.
    fn add_rate_headers(&self, headers: &mut HeaderMap, items: &[Item], decision: &Decision) {
        add_rate_headers(
            headers,
            &self.settings.response,
            self.engine.policy(),
            &self.policy_items,
            items,
            decision,
        );
    }

    /// The gateway's own answer to a decided request, with its rate-limit headers.
    fn with_rate_headers(
        &self,
        answer: Response<Full<Bytes>>,
        items: &[Item],
        decision: &Decision,
    ) -> Response<ResponseBody> {
        let mut response = answer.map(Into::into);
        self.add_rate_headers(response.headers_mut(), items, decision);
        response
    }
}

/// The protocol a WebSocket handshake asks to switch to (`Upgrade:
/// websocket` with `Connection: upgrade`), or None for any other request.
fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(UPGRADE)?;
    let upgrading = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    (upgrading && protocol.as_bytes().eq_ignore_ascii_case(b"websocket")).then(|| protocol.clone())
}

/// Carry a switched connection both ways until either side closes it. The
/// request's admission is held for as long: a concurrency slot stays taken
/// while the WebSocket is open, and is released when it closes.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, admission: Option<Admission>) {
    let _admission = admission;
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            let e = c
                .err()
                .or(u.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            tracing::debug!("a WebSocket could not be taken over: {e}");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!("a WebSocket ended: {e}");
    }
}

/// What `proxy` hands its phases: the request head and who sent it.
struct Incoming_<'a> {
    /// Everything of the request head but its headers.
    parts: &'a Parts,
    headers: HeaderMap,
    path: &'a str,
    /// The client address the limits see (maybe from X-Forwarded-For).
    ip: &'a str,
    /// The connection's peer: the hop appended to X-Forwarded-For.
    peer: &'a Peer,
    /// A WebSocket handshake: the protocol asked for, and the client's side
    /// of the connection once it is switched.
    upgrade: Option<(HeaderValue, OnUpgrade)>,
}

/// Logs a request whose client went away before it was answered (held, or
/// waiting for the upstream's head), as nginx does, with status 499.
struct Abandoned<'a> {
    gateway: &'a Gateway,
    entry: Option<Entry<'a>>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.gateway.metrics.response(entry.status);
            if entry.enabled && !self.gateway.access.log(&entry) {
                self.gateway.metrics.access_log_dropped.inc();
            }
        }
    }
}

fn upstream_request(
    request: Incoming_<'_>,
    upstream: &Upstream,
    body: ProxyBody,
    id_header: Option<HeaderValue>,
) -> Result<Request<ProxyBody>, Refusal> {
    let parts = request.parts;
    let unchanged = upstream.base_path.is_empty() && request.path == parts.uri.path();
    let target = match parts.uri.path_and_query() {
        // The common case: the target as received (a cheap clone of its bytes).
        Some(pq) if unchanged => pq.clone(),
        _ => {
            let text = if parts.uri.path() == "*" && parts.method == hyper::Method::OPTIONS {
                // OPTIONS * asks about the server: ask the upstream's base.
                if upstream.base_path.is_empty() {
                    "*".to_string()
                } else {
                    upstream.base_path.clone()
                }
            } else {
                match parts.uri.query() {
                    Some(q) => format!("{}{}?{q}", upstream.base_path, request.path),
                    None => format!("{}{}", upstream.base_path, request.path),
                }
            };
            hyper::http::uri::PathAndQuery::try_from(text).map_err(|e| {
                Refusal::BadRequest(format!("the request target cannot be forwarded: {e}"))
            })?
        }
    };
    let mut outgoing = Request::new(body);
    *outgoing.method_mut() = parts.method.clone();
    // Origin form: the connection is the upstream's own.
    *outgoing.uri_mut() = Uri::from(target);
    *outgoing.headers_mut() = request.headers;
    let headers = outgoing.headers_mut();
    strip_hop_by_hop(headers);
    // The host the limits saw is the host the upstream is told: a target in
    // absolute form, or HTTP/2's :authority, names it rather than a Host
    // header (RFC 9112 3.2.2), and the origin form sent on loses it.
    if let Some(authority) = parts.uri.authority() {
        let host = authority.as_str().rsplit('@').next().unwrap_or_default();
        if let Ok(host) = HeaderValue::from_str(host) {
            headers.insert(hyper::header::HOST, host);
        }
    }
    request.peer.append_forwarded_for(headers);
    if let Some(id) = id_header {
        headers.insert(X_REQUEST_ID.clone(), id);
    }
    Ok(outgoing)
}
