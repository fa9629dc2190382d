//! Reads through an upstream's cache (`[[upstream.cache]]`, docs/cache.md).
//!
//! A fresh entry answers without a call. Identical reads in flight share
//! one call: the first leads it in a task of its own, so a leader that goes
//! away does not cut it short for the others, and a leader that fails
//! leaves each follower to call on its own (never a hang). A stale entry
//! is revalidated with a conditional request, or served for
//! `stale_if_error` when the upstream fails or its breaker is open. Writes
//! evict (`call`).

use crate::call::{outgoing_headers, Answer, Control, Outcome, Outgoing, ResponseBody};
use crate::settings::Client;
use crate::state::{Generation, Proxy};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::header::{
    HeaderName, HeaderValue, AGE, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, PRAGMA, RANGE, SET_COOKIE,
};
use hyper::http::request::Parts;
use hyper::{HeaderMap, Method, Response, StatusCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tollgate_comply::Upstream;
use tollgate_core::{Clock, Nanos};
use tollgate_http::body::{BoxError, GuardedBody};
use tollgate_http::cache::{
    directives, freshness, Epoch, Flight, Key, Landed, Leader, Partition, Stored,
};
use tollgate_http::{Peer, Refusal};

/// Request headers that ask for part of a resource, or for an answer only
/// under a condition: such a read is fetched alone (its answer is not what
/// a plain read of the URL gets).
const CONDITIONS: [HeaderName; 6] = [
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_MATCH,
    IF_UNMODIFIED_SINCE,
    IF_RANGE,
    RANGE,
];

/// A read the cache takes: its route, its key, and whether the client
/// asked to go past the cache.
pub(crate) struct Read {
    route: usize,
    key: Key,
    /// `Cache-Control: no-cache` or `no-store`, `Pragma: no-cache`, or a
    /// conditional or range request of the client's own: fetched alone
    /// (no entry served, no flight joined); kept unless `no-store`.
    bypass: bool,
}

impl Read {
    /// The read this request is, if a cache route of its upstream covers
    /// it (GET or HEAD as the route says, no body).
    pub(crate) fn of(
        cache: &tollgate_http::cache::Cache,
        settings: &Upstream,
        client: Option<&Client>,
        parts: &Parts,
        url: &url::Url,
        has_body: bool,
    ) -> Option<Read> {
        let (route, _) = cache.route_for(parts.method.as_str(), url.path())?;
        if has_body {
            return None;
        }
        let asked = directives(&parts.headers);
        let pragma_no_cache = parts
            .headers
            .get(PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"));
        let conditional = CONDITIONS.iter().any(|h| parts.headers.contains_key(h));
        Some(Read {
            route,
            key: Key {
                method: parts.method.to_string(),
                url: url.to_string(),
                partition: partition(settings, client, parts),
            },
            bypass: asked.no_cache || asked.no_store || pragma_no_cache || conditional,
        })
    }
}

/// Who a request is for (`Upstream::partition`), by the headers it is
/// sent with.
pub(crate) fn partition(settings: &Upstream, client: Option<&Client>, parts: &Parts) -> Partition {
    let sent = outgoing_headers(parts.headers.clone(), settings);
    settings.partition(client.map(|c| c.name.as_str()), &sent)
}

impl Proxy {
    /// A read under a cache route: from the cache, from another request's
    /// call, or from a call of its own.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read_through<'g>(
        self: &Arc<Self>,
        generation: &'g Arc<Generation>,
        upstream: usize,
        url: &url::Url,
        read: Read,
        parts: &mut Parts,
        peer: &Arc<Peer>,
        control: Control,
        outcome: &mut Outcome<'g>,
    ) -> Answer {
        let line = &generation.lines[upstream];
        let cache = &line.cache;
        // (a bypass keeps what it fetches, unless a write came meanwhile)
        let look = cache.look(read.route, &read.key).await;
        let epoch = look.epoch;
        let kept = match read.bypass {
            true => None,
            false => look.kept.filter(|s| s.matches(&parts.headers)),
        };
        let now = self.clock.now();
        if let Some(stored) = kept.as_ref().filter(|s| s.is_fresh(now)) {
            return Ok(from_cache(stored, now, "hit", &parts.method, outcome, line));
        }
        let flight = match read.bypass {
            true => None,
            false => Some(cache.flight(read.route, &read.key)),
        };
        let leader = match flight {
            None => None,
            Some(Flight::Lead(leader)) => {
                // The flight before this one may have landed (and kept its
                // answer) between the look above and now: look again.
                let now = self.clock.now();
                let landed = cache
                    .fresh_now(read.route, &read.key, &parts.headers, now)
                    .await;
                if let Some(stored) = landed {
                    leader.land(Landed::Response(stored.clone()));
                    return Ok(from_cache(
                        &stored,
                        now,
                        "hit",
                        &parts.method,
                        outcome,
                        line,
                    ));
                }
                Some(leader)
            }
            Some(Flight::Follow(mut landing)) => {
                // At most as long as this request would wait in line.
                let landed =
                    tokio::time::timeout(control.max_wait, landing.wait_for(Option::is_some))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .and_then(|l| l.clone());
                let (stored, state) = match landed {
                    Some(Landed::Response(stored)) => (Some(stored), "coalesced"),
                    Some(Landed::Stale(stored)) => (Some(stored), "stale"),
                    _ => (None, "miss"),
                };
                if let Some(stored) = stored.filter(|s| s.matches(&parts.headers)) {
                    let now = self.clock.now();
                    return Ok(from_cache(
                        &stored,
                        now,
                        state,
                        &parts.method,
                        outcome,
                        line,
                    ));
                }
                // Nothing to share: a call of its own.
                outcome.cache = Some("miss");
                return self
                    .fetch(
                        generation,
                        upstream,
                        url,
                        parts,
                        Outgoing::empty(),
                        None,
                        peer,
                        &control,
                        outcome,
                    )
                    .await;
            }
        };
        let bypass = read.bypass;
        let lead = self.clone().lead(
            generation.clone(),
            upstream,
            url.clone(),
            read,
            copy_of(parts),
            peer.clone(),
            control,
            (kept, epoch),
            leader,
        );
        let (answer, ended) = match bypass {
            // Nobody waits on it: it is this request's alone.
            true => lead.await,
            // Others may: it goes on if this client goes away.
            false => match tokio::spawn(lead).await {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(upstream = %generation.config.upstreams[upstream].name, "a cached read's call failed: {e}");
                    let mut ended = Outcome::new();
                    ended.cache = Some("miss");
                    (
                        Err(Refusal::UpstreamFailed(
                            "The call for this read failed.".into(),
                        )),
                        ended,
                    )
                }
            },
        };
        outcome.ended_as(ended);
        if bypass {
            outcome.cache = Some("bypass");
        }
        answer
    }

    /// The call of a read (its flight's, when `leader` is set): revalidate
    /// `kept` if it can be, keep what may be kept, land the flight.
    #[allow(clippy::too_many_arguments)]
    async fn lead(
        self: Arc<Self>,
        generation: Arc<Generation>,
        upstream: usize,
        url: url::Url,
        read: Read,
        mut parts: Parts,
        peer: Arc<Peer>,
        control: Control,
        (kept, epoch): (Option<Arc<Stored>>, Epoch),
        leader: Option<Leader>,
    ) -> (Answer, Outcome<'static>) {
        let line = &generation.lines[upstream];
        let settings = &generation.config.upstreams[upstream];
        let route = line.cache.route(read.route).clone();
        let asked = parts.headers.clone();
        let revalidating = kept.as_ref().filter(|s| s.revalidates()).cloned();
        if let Some(stored) = &revalidating {
            for (name, value) in stored.conditions() {
                parts.headers.insert(name, value);
            }
        }
        let mut outcome = Outcome::new();
        let fetched = self
            .fetch(
                &generation,
                upstream,
                &url,
                &mut parts,
                Outgoing::empty(),
                None,
                &peer,
                &control,
                &mut outcome,
            )
            .await;
        let head = parts.method == Method::HEAD;
        let stale = {
            let now = self.clock.now();
            kept.filter(|s| {
                s.within_stale(now, route.stale_if_error) && !directives(&s.headers).must_revalidate
            })
        };
        let failed = match &fetched {
            Ok(response) => response.status().is_server_error(),
            Err(refusal) => matches!(
                refusal,
                Refusal::UpstreamFailed(_) | Refusal::UpstreamTimeout | Refusal::BreakerOpen { .. }
            ),
        };
        let (answer, landed, state) = match (fetched, revalidating, stale) {
            (_, _, Some(stale)) if failed => {
                // The upstream failed: the entry, stale but within
                // stale_if_error, rather than the failure.
                let now = self.clock.now();
                let answer = from_cache(&stale, now, "stale", &parts.method, &mut outcome, line);
                (Ok(answer), Landed::Stale(stale), "stale")
            }
            (Ok(response), Some(stored), _) if response.status() == StatusCode::NOT_MODIFIED => {
                // Fresh again by the stored headers with the 304's in
                // place (a 304 need not repeat Cache-Control).
                let now = self.clock.now();
                let updated = stored.refreshed(response.headers(), Duration::ZERO, now);
                drop(response);
                let ttl = freshness(
                    &route,
                    updated.status,
                    &asked,
                    &updated.headers,
                    SystemTime::now(),
                );
                let fresh = Arc::new(updated.fresh_for(ttl.unwrap_or_default(), now));
                match ttl {
                    Some(_) => {
                        (line.cache)
                            .keep(read.route, read.key.clone(), fresh.clone(), epoch)
                            .await
                    }
                    None => line.cache.forget(read.route, &read.key).await,
                }
                (
                    Ok(stored_response(&fresh, now, head, true)),
                    Landed::Response(fresh),
                    "revalidated",
                )
            }
            (Ok(response), _, _) => {
                match tokio::time::timeout(settings.timeout, whole(response, route.max_entry_bytes))
                    .await
                {
                    Ok(Whole::Read(status, headers, body)) => {
                        let now = self.clock.now();
                        let ttl = freshness(&route, status, &asked, &headers, SystemTime::now());
                        // A cookie it sets is the leader's: not shared.
                        let shared = !headers.contains_key(SET_COOKIE);
                        let stored = Arc::new(Stored::new(
                            status,
                            headers,
                            body,
                            &asked,
                            ttl.unwrap_or_default(),
                            now,
                        ));
                        if ttl.is_some() {
                            (line.cache)
                                .keep(read.route, read.key.clone(), stored.clone(), epoch)
                                .await;
                        }
                        let answer = stored_response(&stored, now, head, false);
                        let landed = match shared {
                            true => Landed::Response(stored),
                            false => Landed::Alone,
                        };
                        (Ok(answer), landed, "miss")
                    }
                    Ok(Whole::Relayed(response)) => (Ok(response), Landed::Alone, "miss"),
                    Ok(Whole::Broken(refusal)) => (Err(refusal), Landed::Alone, "miss"),
                    Err(_) => (Err(Refusal::UpstreamTimeout), Landed::Alone, "miss"),
                }
            }
            (Err(refusal), _, _) => (Err(refusal), Landed::Alone, "miss"),
        };
        if let Some(leader) = leader {
            leader.land(landed);
        }
        outcome.cache = Some(state);
        (answer, outcome.detached())
    }
}

/// An answer from the cache (`hit` and `coalesced` count as calls saved;
/// a `stale` one stands in for a failure).
fn from_cache(
    stored: &Stored,
    now: Nanos,
    state: &'static str,
    method: &Method,
    outcome: &mut Outcome<'_>,
    line: &crate::state::UpstreamLine,
) -> Response<ResponseBody> {
    outcome.metric = "response";
    outcome.decision = state;
    outcome.cache = Some(state);
    line.metrics.saved(state);
    stored_response(stored, now, method == Method::HEAD, true)
}

/// A kept response as sent: its headers, `Age` when it is served from
/// memory (`kept`), and its body (none for a HEAD, whose `Content-Length`
/// is the upstream's).
pub(crate) fn stored_response(
    stored: &Stored,
    now: Nanos,
    head: bool,
    kept: bool,
) -> Response<ResponseBody> {
    let body = match head {
        true => Bytes::new(),
        false => stored.body.clone(),
    };
    let mut response = Response::new(Full::new(body).into());
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    *headers = stored.headers.clone();
    if !head {
        // (the body's own length is sent)
        headers.remove(hyper::header::CONTENT_LENGTH);
    }
    if kept {
        headers.insert(AGE, HeaderValue::from(stored.age(now)));
    }
    response
}

/// A response body read for keeping.
pub(crate) enum Whole {
    /// Whole: its status, headers and body.
    Read(StatusCode, HeaderMap, Bytes),
    /// Over the cap: the response as it comes (the part read first, then
    /// the rest), not kept.
    Relayed(Response<ResponseBody>),
    /// The upstream broke it off.
    Broken(Refusal),
}

/// A response read whole if its body is at most `cap` bytes.
pub(crate) async fn whole(response: Response<ResponseBody>, cap: u64) -> Whole {
    let (head, mut body) = response.into_parts();
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                return Whole::Broken(Refusal::UpstreamFailed(format!(
                    "The upstream broke off the response body: {e}"
                )))
            }
        };
        // (trailers are not kept)
        let Ok(data) = frame.into_data() else {
            continue;
        };
        read.extend_from_slice(&data);
        if read.len() as u64 > cap {
            let first = futures_util::stream::once(std::future::ready(Ok::<_, BoxError>(
                Frame::data(read.freeze()),
            )));
            let rest = http_body_util::BodyStream::new(body);
            let relayed = StreamBody::new(first.chain(rest)).boxed_unsync();
            return Whole::Relayed(Response::from_parts(head, GuardedBody::new(relayed, None)));
        }
    }
    Whole::Read(head.status, head.headers, read.freeze())
}

/// A request head to send again: method, URI, version and headers (not its
/// extensions).
pub(crate) fn copy_of(parts: &Parts) -> Parts {
    let mut copy = hyper::Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}
