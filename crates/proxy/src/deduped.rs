//! Writes through an upstream's memory of writes (`dedup`,
//! `skip_unchanged`, docs/cache.md).
//!
//! A write with an `Idempotency-Key` the proxy remembers gets the answer
//! the first request with it got, without a call (another request with the
//! same key is a 422). A repeat that comes while the first is in flight
//! waits for it. The first's call runs in a task of its own, so its answer
//! is remembered even if its client goes away (that client's retry is then
//! answered from memory). A PATCH or PUT under `skip_unchanged` that sends
//! what the last successful one to its URL sent is answered as that one
//! was.

use crate::cached::{copy_of, partition, stored_response, whole, Whole};
use crate::call::{read_body, Answer, Control, Outcome, Outgoing};
use crate::settings::Client;
use crate::state::{Generation, Proxy};
use hyper::body::Incoming;
use hyper::header::HeaderName;
use hyper::http::request::Parts;
use hyper::HeaderMap;
use std::sync::Arc;
use tollgate_core::Clock;
use tollgate_http::cache::{Flight, Key, Landed, Leader, Partition, Stored};
use tollgate_http::dedup::{Asked, Done};
use tollgate_http::{Peer, Refusal};

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The most of an Idempotency-Key shown in a refusal.
const KEY_SHOWN: usize = 64;

/// What a write's answer is remembered under.
struct Memo {
    partition: Partition,
    asked: Asked,
    /// Its Idempotency-Key, when the upstream deduplicates by them.
    key: Option<String>,
    /// Whether it is a PATCH or PUT under `skip_unchanged`.
    watched: bool,
}

impl Proxy {
    /// A write to an upstream with `dedup` or `skip_unchanged`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn write_through<'g>(
        self: &Arc<Self>,
        generation: &'g Arc<Generation>,
        upstream: usize,
        url: &url::Url,
        parts: &mut Parts,
        body: Incoming,
        peer: &Arc<Peer>,
        client: Option<&Client>,
        control: Control,
        outcome: &mut Outcome<'g>,
    ) -> Answer {
        let line = &generation.lines[upstream];
        let writes = &line.writes;
        let key = match parts.headers.get(&IDEMPOTENCY_KEY) {
            Some(value) if writes.settings().idempotency => {
                let key = value.to_str().map(str::trim).map_err(|_| {
                    Refusal::BadRequest("header Idempotency-Key must be visible ASCII".into())
                })?;
                if key.is_empty() {
                    return Err(Refusal::BadRequest(
                        "header Idempotency-Key is empty; send a unique key per request, or none"
                            .into(),
                    ));
                }
                Some(key.to_string())
            }
            _ => None,
        };
        let watched = writes.watches(parts.method.as_str(), url.path());
        let (outgoing, kept) = read_body(body, &self.body_budget(generation)).await?;
        let body = match &outgoing {
            Outgoing::Kept(bytes) if key.is_some() || watched => bytes.clone(),
            // Nothing to remember it by (or a body too large to compare):
            // sent as any write.
            _ => {
                let answer = self
                    .fetch(
                        generation, upstream, url, parts, outgoing, kept, peer, &control, outcome,
                    )
                    .await;
                line.cache.written_through(url.path()).await;
                writes.written(url.path());
                return answer;
            }
        };
        let settings = &generation.config.upstreams[upstream];
        let memo = Memo {
            partition: partition(settings, client, parts),
            asked: Asked::of(parts.method.as_str(), url.as_str(), &body),
            key,
            watched,
        };
        let mut leader = None;
        if let Some(key) = &memo.key {
            if let Some(done) = writes.answered(memo.partition, key, self.clock.now()) {
                return answered_before(&done, &memo, key, outcome, line, self.clock.now());
            }
            match writes.flight(memo.partition, key) {
                Flight::Lead(lead) => leader = Some(lead),
                Flight::Follow(mut landing) => {
                    let _ = landing.wait_for(Option::is_some).await;
                    let now = self.clock.now();
                    if let Some(done) = writes.answered(memo.partition, key, now) {
                        return answered_before(&done, &memo, key, outcome, line, now);
                    }
                    // The first got no answer worth keeping (a 5xx, none at
                    // all): this one goes, with the same key for the vendor.
                }
            }
        }
        if memo.watched {
            let now = self.clock.now();
            let last = Key {
                method: parts.method.to_string(),
                url: url.to_string(),
                partition: memo.partition,
            };
            if let Some(answer) = writes.unchanged(&last, memo.asked, now) {
                return Ok(from_memory(&answer, "unchanged", outcome, line, now));
            }
        }
        let once = self.clone().write_once(
            generation.clone(),
            upstream,
            url.clone(),
            copy_of(parts),
            outgoing,
            kept,
            peer.clone(),
            control,
            memo,
            leader,
        );
        let (answer, ended) = match tokio::spawn(once).await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(upstream = %settings.name, "a write's call failed: {e}");
                (
                    Err(Refusal::UpstreamFailed(
                        "The call for this write failed.".into(),
                    )),
                    Outcome::new(),
                )
            }
        };
        outcome.ended_as(ended);
        answer
    }

    /// A write's call, in a task of its own: its answer is remembered (all
    /// but 429s, 5xx and failures under its Idempotency-Key; a 2xx of a
    /// watched PATCH or PUT as the URL's state), and repeats waiting on it
    /// are let go.
    #[allow(clippy::too_many_arguments)]
    async fn write_once(
        self: Arc<Self>,
        generation: Arc<Generation>,
        upstream: usize,
        url: url::Url,
        mut parts: Parts,
        outgoing: Outgoing,
        kept: Option<crate::call::KeptBytes>,
        peer: Arc<Peer>,
        control: Control,
        memo: Memo,
        leader: Option<Leader>,
    ) -> (Answer, Outcome<'static>) {
        let line = &generation.lines[upstream];
        let settings = &generation.config.upstreams[upstream];
        let writes = &line.writes;
        let mut outcome = Outcome::new();
        let fetched = self
            .fetch(
                &generation,
                upstream,
                &url,
                &mut parts,
                outgoing,
                kept,
                &peer,
                &control,
                &mut outcome,
            )
            .await;
        // What it changed is asked again (before its own state is kept).
        line.cache.written_through(url.path()).await;
        writes.written(url.path());
        let answer = match fetched {
            Ok(response) => {
                let status = response.status();
                let keyed =
                    memo.key.is_some() && !(status.as_u16() == 429 || status.is_server_error());
                let state = memo.watched && status.is_success();
                if keyed || state {
                    let cap = writes.settings().max_entry_bytes();
                    match tokio::time::timeout(settings.timeout, whole(response, cap)).await {
                        Ok(Whole::Read(status, headers, body)) => {
                            let now = self.clock.now();
                            let answer = Arc::new(Stored::new(
                                status,
                                headers,
                                body,
                                &HeaderMap::new(),
                                writes.settings().window,
                                now,
                            ));
                            let done = Arc::new(Done {
                                asked: memo.asked,
                                answer: answer.clone(),
                            });
                            if let (true, Some(key)) = (keyed, &memo.key) {
                                writes.remember(memo.partition, key, done.clone());
                            }
                            if state {
                                let last = Key {
                                    method: parts.method.to_string(),
                                    url: url.to_string(),
                                    partition: memo.partition,
                                };
                                writes.succeeded(last, done);
                            }
                            Ok(stored_response(&answer, now, false, false))
                        }
                        Ok(Whole::Relayed(response)) => Ok(response),
                        Ok(Whole::Broken(refusal)) => Err(refusal),
                        Err(_) => Err(Refusal::UpstreamTimeout),
                    }
                } else {
                    Ok(response)
                }
            }
            Err(refusal) => Err(refusal),
        };
        // Repeats waiting on it look in the memory now.
        if let Some(leader) = leader {
            leader.land(Landed::Alone);
        }
        (answer, outcome.detached())
    }
}

/// A repeat of a remembered Idempotency-Key: the first answer, or a 422
/// when it asks for something else.
fn answered_before(
    done: &Done,
    memo: &Memo,
    key: &str,
    outcome: &mut Outcome<'_>,
    line: &crate::state::UpstreamLine,
    now: tollgate_core::Nanos,
) -> Answer {
    if done.asked != memo.asked {
        let shown: String = key.chars().take(KEY_SHOWN).collect();
        outcome.decision = "denied";
        return Err(Refusal::KeyReused { key: shown });
    }
    Ok(from_memory(&done.answer, "hit", outcome, line, now))
}

/// An answer from the memory of writes, counted as a call saved.
fn from_memory(
    answer: &Stored,
    state: &'static str,
    outcome: &mut Outcome<'_>,
    line: &crate::state::UpstreamLine,
    now: tollgate_core::Nanos,
) -> hyper::Response<crate::call::ResponseBody> {
    let reason = if state == "hit" { "dedup" } else { state };
    outcome.metric = "response";
    outcome.decision = reason;
    outcome.dedup = Some(state);
    line.metrics.saved(reason);
    stored_response(answer, now, false, true)
}
