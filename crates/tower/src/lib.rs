//! tollgate's rate-limit engine as a [tower] layer, for Rust HTTP services
//! (axum, hyper, tonic) that cannot put a gateway in front of themselves.
//!
//! The layer decides each request against a tollgate policy, the same
//! TOML `tollgate serve` reads. It has the same algorithms (token and leaky
//! buckets, fixed and sliding windows, tiered minute/hour/day pools,
//! concurrency and latency budgets). Every limit that applies is decided at
//! once, all or nothing. A request the limits can admit within a limit's
//! `hold` waits for it instead of failing. With `[store] kind = "redis"`,
//! counters are shared by every process on that Redis (fleet mode).
//!
//! A refused request gets the gateway's answer: `429` with a problem+json
//! body, `Retry-After`, and the IETF `RateLimit-Policy` / `RateLimit`
//! headers. Admitted responses carry the RateLimit headers too. What an
//! admitted request owes its limits (a latency debit, a concurrency slot)
//! is settled when its response body ends or is dropped. A client that goes
//! away while held, or a handler that fails, settles as well.
//!
//! ```
//! use axum::{routing::get, Router};
//! use tollgate_tower::RateLimitLayer;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = RateLimitLayer::from_toml(
//!     r#"
//!     [[limit]]
//!     name = "per-tenant"
//!     key = ["header:x-tenant-id"]
//!     algorithm = "token_bucket"
//!     capacity = 20
//!     refill = "10/s"
//!     hold = "200ms"   # wait up to 200 ms for a token instead of a 429
//!     "#,
//! )?;
//! let app: Router = Router::new()
//!     .route("/v1/items", get(|| async { "items" }))
//!     .layer(layer);
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! What a request is keyed by: `method`, `path` (normalized as the gateway
//! does), `host`, `header:NAME`, `query:NAME`, and `ip` when
//! [`RateLimitLayer::with_client_ip`] says where the client's address is
//! (tower does not know the connection). Limits whose cost reads the JSON
//! body are refused when the layer is built: the layer does not read
//! bodies.
//!
//! [tower]: https://docs.rs/tower

#![warn(missing_docs)]

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::Full;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tollgate_core::policy::Cost;
use tollgate_core::{Policy, Verdict};
use tollgate_http::ratelimit::{add_rate_headers, PolicyItems};
use tollgate_http::{normalize_path, HttpRequest, Refusal};
use tollgate_store::{decide_holding, Admission, Engine, HoldBounds, Holds};

pub use tollgate_http::{ErrorFormat, ResponseSettings};
pub use tollgate_store::TokioClock;

/// Where a request's client address comes from (see
/// [`RateLimitLayer::with_client_ip`]).
type ClientIp = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Why a layer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The policy's TOML is not valid (the message names the line and field).
    #[error(transparent)]
    Config(#[from] tollgate_core::ConfigError),
    /// The store `[store]` asks for cannot be used (a Redis URL, a limit
    /// beyond the Redis store's precision).
    #[error(transparent)]
    Engine(#[from] tollgate_store::EngineError),
    /// A limit counts the request's JSON body, which the layer does not read.
    #[error("limit '{0}' counts the JSON body (cost = {{ json_array = ... }}); the tower layer does not read request bodies: give it a fixed or header cost, or use `tollgate serve`")]
    ReadsBody(String),
}

/// The layer: wraps a service in [`RateLimit`]. Cheap to clone; every
/// clone (and every service it makes) shares one engine and its counters.
#[derive(Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limits", &self.shared.engine.policy().limits.len())
            .finish_non_exhaustive()
    }
}

/// What every service of one layer shares.
#[derive(Clone)]
struct Shared {
    engine: Arc<Engine>,
    clock: TokioClock,
    holds: Arc<Holds>,
    bounds: HoldBounds,
    response: ResponseSettings,
    /// The policy's `RateLimit-Policy` items, written once.
    items_text: Arc<PolicyItems>,
    client_ip: Option<ClientIp>,
    /// For the `instance` of refusals.
    ids: Arc<AtomicU64>,
}

impl RateLimitLayer {
    /// A layer enforcing `policy` (as [`tollgate_core::parse`] reads it): in
    /// process, or on the Redis its `[store]` names (the counters of
    /// `tollgate serve` on the same Redis and prefix are the same counters).
    /// Nothing is sent to Redis until the first request.
    pub fn new(policy: Policy) -> Result<RateLimitLayer, LayerError> {
        if let Some(limit) = (policy.limits.iter()).find(|l| matches!(l.cost, Cost::JsonArray(_))) {
            return Err(LayerError::ReadsBody(limit.name.clone()));
        }
        let items_text = Arc::new(PolicyItems::new(&policy));
        let engine = Arc::new(Engine::open(policy, "gateway")?);
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                engine,
                clock: TokioClock::system(),
                holds: Arc::default(),
                // (the gateway's defaults)
                bounds: HoldBounds {
                    total: 10_000,
                    per_key: 100,
                },
                response: ResponseSettings::default(),
                items_text,
                client_ip: None,
                ids: Arc::default(),
            }),
        })
    }

    /// A layer enforcing the `[[limit]]` entries (and `[store]`) of a
    /// tollgate config's text. The gateway's own tables (`[gateway]`,
    /// `[response]`) are not read here: see [`RateLimitLayer::with_response`].
    pub fn from_toml(text: &str) -> Result<RateLimitLayer, LayerError> {
        RateLimitLayer::new(tollgate_core::parse(text, &tollgate_core::NoProfiles)?)
    }

    /// Decide on `clock` instead of the system's (tests: a clock that
    /// starts at a known instant, with tokio's paused time).
    pub fn with_clock(self, clock: TokioClock) -> RateLimitLayer {
        self.with(|s| s.clock = clock)
    }

    /// Where a request's client address (the `ip` key part) is read from:
    /// e.g. axum's `ConnectInfo<SocketAddr>` extension, or the first
    /// `X-Forwarded-For` hop behind a trusted load balancer. Without it, a
    /// limit keyed by `ip` finds none (its `missing_key` applies).
    pub fn with_client_ip(
        self,
        client_ip: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> RateLimitLayer {
        self.with(|s| s.client_ip = Some(Arc::new(client_ip)))
    }

    /// Most requests held at once, in total and per key of each holding
    /// limit (default 10,000 and 100, as the gateway's `max_held`): past
    /// them a request that a hold would admit is refused instead.
    pub fn with_hold_bounds(self, total: usize, per_key: usize) -> RateLimitLayer {
        self.with(|s| s.bounds = HoldBounds { total, per_key })
    }

    /// What refusals and headers look like (the gateway's `[response]`):
    /// the body format, `Retry-After`, the RateLimit and `X-RateLimit-*`
    /// headers, the problem `type`.
    pub fn with_response(self, settings: ResponseSettings) -> RateLimitLayer {
        self.with(|s| s.response = settings)
    }

    /// The engine: its policy, and in process its store (what is left of a
    /// key's limits, for an endpoint of your own).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    fn with(self, change: impl FnOnce(&mut Shared)) -> RateLimitLayer {
        let mut shared = Arc::unwrap_or_clone(self.shared);
        change(&mut shared);
        RateLimitLayer {
            shared: Arc::new(shared),
        }
    }
}

impl<S> tower_layer::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A service behind the limits: each request is decided first, then held,
/// passed to the inner service, or answered with a refusal.
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for RateLimit<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<Body<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The instance that was made ready goes with the request; this one
        // is a clone for the next (tower's usual pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture {
            future: Box::pin(async move { shared.serve(request, inner).await }),
        }
    }
}

/// The future of a [`RateLimit`] call. Dropped while the request is held
/// or in the inner service, it gives back what the request took.
pub struct ResponseFuture<B, E> {
    #[allow(clippy::type_complexity)]
    future: Pin<Box<dyn Future<Output = Result<Response<Body<B>>, E>> + Send>>,
}

impl<B, E> std::fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<Body<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.future.as_mut().poll(cx)
    }
}

impl Shared {
    async fn serve<S, ReqBody, ResBody>(
        &self,
        request: Request<ReqBody>,
        mut inner: S,
    ) -> Result<Response<Body<ResBody>>, S::Error>
    where
        S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        let (parts, body) = request.into_parts();
        let policy = self.engine.policy();
        let path = normalize_path(parts.uri.path());
        let ip = self.client_ip.as_ref().and_then(|f| f(&parts));
        let view = HttpRequest {
            parts: &parts,
            headers: &parts.headers,
            path: &path,
            ip: ip.as_deref(),
            body: None,
        };
        let mut items = Vec::with_capacity(policy.limits.len());
        if let Err(e) = policy.plan(&view, &mut items) {
            return Ok(self.refused(Refusal::BadRequest(e.to_string()), None));
        }
        let decided =
            decide_holding(&self.engine, &items, &self.clock, &self.holds, self.bounds).await;
        let mut decided = match decided {
            Ok(decided) => decided,
            Err(e) => return Ok(self.refused(Refusal::from(e), None)),
        };
        let limit_name = |index: usize| policy.limits[items[index].limit].name.clone();
        match decided.decision.verdict {
            Verdict::Admit { .. } => {}
            Verdict::Deny { limit, retry_after } => {
                let refusal = Refusal::RateLimited {
                    limit: limit_name(limit),
                    retry_after,
                };
                return Ok(self.refused(refusal, Some((&items, &decided.decision))));
            }
            Verdict::Never {
                limit,
                cost,
                capacity,
            } => {
                let refusal = Refusal::CostTooLarge {
                    limit: limit_name(limit),
                    cost,
                    capacity,
                };
                return Ok(self.refused(refusal, None));
            }
        }
        // Made before the hold: a request dropped while held releases too.
        let mut admission = Admission::new(&self.engine, &items, &decided, &self.clock);
        decided.hold(&self.clock).await;
        if let Some(admission) = admission.as_mut() {
            admission.start();
        }
        let response = inner.call(Request::from_parts(parts, body)).await?;
        let (mut head, body) = response.into_parts();
        self.add_headers(&mut head.headers, &items, &decided.decision);
        Ok(Response::from_parts(
            head,
            Body::Inner {
                body,
                admission: Settles(admission),
            },
        ))
    }

    /// A refusal as the gateway answers it, with the RateLimit headers
    /// when there was a decision.
    fn refused<B>(
        &self,
        refusal: Refusal,
        decided: Option<(&[tollgate_core::Item], &tollgate_core::Decision)>,
    ) -> Response<Body<B>> {
        let id = format!("tower-{}", self.ids.fetch_add(1, Ordering::Relaxed) + 1);
        let (mut head, body) = refusal.response(&self.response, &id).into_parts();
        if let Some((items, decision)) = decided {
            self.add_headers(&mut head.headers, items, decision);
        }
        Response::from_parts(head, Body::Refused { body })
    }

    fn add_headers(
        &self,
        headers: &mut HeaderMap,
        items: &[tollgate_core::Item],
        decision: &tollgate_core::Decision,
    ) {
        let policy = self.engine.policy();
        add_rate_headers(
            headers,
            &self.response,
            policy,
            &self.items_text,
            items,
            decision,
        );
    }
}

/// What an admitted request owes its limits (a latency debit, a
/// concurrency slot), settled once: when its body ends, or when the body
/// is dropped unfinished.
pub struct Settles(Option<Admission>);

impl std::fmt::Debug for Settles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "owed" } else { "settled" })
    }
}

pin_project_lite::pin_project! {
    /// The response body: the inner service's (carrying what the request
    /// owes its limits, settled when it ends or is dropped), or a refusal's.
    #[project = BodyProjection]
    #[derive(Debug)]
    // (the macro takes no doc comments on fields: the variants say them)
    #[allow(missing_docs)]
    pub enum Body<B> {
        /// The inner service's `body`, and what the request owes
        /// (`admission`), settled when it ends.
        Inner { #[pin] body: B, admission: Settles },
        /// A refusal made by the layer: its problem+json (or `errors`)
        /// document.
        Refused { #[pin] body: Full<Bytes> },
    }
}

impl<B> http_body::Body for Body<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            BodyProjection::Inner { body, admission } => {
                let polled = body.poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    admission.0.take();
                }
                polled
            }
            BodyProjection::Refused { body } => body
                .poll_frame(cx)
                .map_err(|never: std::convert::Infallible| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Inner { body, .. } => body.is_end_stream(),
            Body::Refused { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Inner { body, .. } => body.size_hint(),
            Body::Refused { body } => body.size_hint(),
        }
    }
}
