//! A run's metrics, and the admin listener `tollgate run --admin ADDR` opens
//! for the length of a run: `/healthz`, and Prometheus text at `/metrics`
//! (behind the admin token, read as `serve` and `proxy` read it).
//!
//! The names are those of the comply face, shared with the proxy where they
//! mean the same: `tollgate_upstream_calls_total{upstream,outcome}`,
//! `tollgate_upstream_effective_rate`, `tollgate_upstream_limits_rate`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tollgate_core::Nanos;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    upstream: String,
    outcome: &'static str,
}

/// One upstream's line, as the run's loop sees it now.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamNow {
    /// Jobs queued or backing off, and calls in flight.
    pub(crate) pending: usize,
    pub(crate) breaker_open: bool,
    pub(crate) effective_rate: Option<f64>,
    pub(crate) limits_rate: Option<f64>,
}

/// What a run counts, shared by its loop and its admin listener.
#[derive(Debug)]
pub struct RunMetrics {
    registry: Registry,
    upstreams: Vec<String>,
    calls: Family<OutcomeLabels, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    pending: Family<UpstreamLabels, Gauge>,
    oldest: Family<UpstreamLabels, Gauge<f64, AtomicU64>>,
    job_seconds: Family<UpstreamLabels, Histogram>,
    breaker_open: Family<UpstreamLabels, Gauge>,
    /// The pace and each limit's remaining, as the proxy shows them.
    upstream: tollgate_comply::metrics::UpstreamSeries,
    /// Per upstream, the jobs not yet final: (queued at, seq).
    waiting: Mutex<Vec<BTreeSet<(Nanos, u64)>>>,
    /// Each upstream and its engine: what its limits have left is read at
    /// each scrape.
    engines: Vec<(tollgate_comply::Upstream, Arc<tollgate_store::Engine>)>,
}

impl RunMetrics {
    /// The metrics of a run over `engines` (each upstream and the engine
    /// its scheduler decides in).
    pub fn new(
        engines: Vec<(tollgate_comply::Upstream, Arc<tollgate_store::Engine>)>,
    ) -> RunMetrics {
        let upstreams: Vec<String> = engines.iter().map(|(u, _)| u.name.clone()).collect();
        let mut registry = Registry::with_prefix("tollgate");
        let calls = Family::<OutcomeLabels, Counter>::default();
        let finished = Family::<OutcomeLabels, Counter>::default();
        let pending = Family::<UpstreamLabels, Gauge>::default();
        let oldest = Family::<UpstreamLabels, Gauge<f64, AtomicU64>>::default();
        // 10 ms .. ~11 days
        let job_seconds = Family::<UpstreamLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 4.0, 14))
        });
        let breaker_open = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_calls",
            "Calls sent to an upstream, by what came back (2xx, 3xx, 4xx, 429, 5xx; network_error: no response), retries included",
            calls.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs that reached their final outcome (done, or dead: a dead letter)",
            finished.clone(),
        );
        registry.register(
            "jobs_pending",
            "Jobs of an upstream not yet final: queued, backing off or in flight",
            pending.clone(),
        );
        registry.register_with_unit(
            "jobs_oldest_age",
            "How long the oldest job not yet final has waited since this run took it",
            Unit::Seconds,
            oldest.clone(),
        );
        registry.register_with_unit(
            "job",
            "From when this run took a job to its final outcome (end to end: queued to done)",
            Unit::Seconds,
            job_seconds.clone(),
        );
        registry.register(
            "upstream_breaker_open",
            "1 while an upstream's circuit breaker is open (calls wait for its probe)",
            breaker_open.clone(),
        );
        let upstream = tollgate_comply::metrics::UpstreamSeries::register(&mut registry);
        let waiting = Mutex::new(vec![BTreeSet::new(); upstreams.len()]);
        RunMetrics {
            registry,
            upstreams,
            calls,
            finished,
            pending,
            oldest,
            job_seconds,
            breaker_open,
            upstream,
            waiting,
            engines,
        }
    }

    fn labels(&self, upstream: usize) -> UpstreamLabels {
        UpstreamLabels {
            upstream: self.upstreams.get(upstream).cloned().unwrap_or_default(),
        }
    }

    /// A call to `upstream` came back so (`None`: no response).
    pub(crate) fn call(&self, upstream: usize, status: Option<u16>) {
        let outcome = match status {
            None => "network_error",
            Some(429) => "429",
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(_) => "5xx",
        };
        let upstream = self.labels(upstream).upstream;
        self.calls
            .get_or_create(&OutcomeLabels { upstream, outcome })
            .inc();
    }

    /// The run took job `seq` of `upstream` at `at`.
    pub(crate) fn taken(&self, upstream: usize, seq: u64, at: Nanos) {
        if let Some(set) = self.waiting.lock().get_mut(upstream) {
            set.insert((at, seq));
        }
    }

    /// Job `seq` of `upstream`, taken at `at`, is final at `now`.
    pub(crate) fn finished(&self, upstream: usize, seq: u64, at: Nanos, dead: bool, now: Nanos) {
        if let Some(set) = self.waiting.lock().get_mut(upstream) {
            set.remove(&(at, seq));
        }
        let labels = self.labels(upstream);
        self.job_seconds
            .get_or_create(&labels)
            .observe(now.saturating_sub(at) as f64 / 1e9);
        let outcome = if dead { "dead" } else { "done" };
        self.finished
            .get_or_create(&OutcomeLabels {
                upstream: labels.upstream,
                outcome,
            })
            .inc();
    }

    /// Each upstream's line as the loop sees it now.
    pub(crate) fn lines(&self, lines: impl Iterator<Item = (usize, UpstreamNow)>) {
        for (i, line) in lines {
            let labels = self.labels(i);
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.pending.get_or_create(&labels).set(gauge(line.pending));
            self.breaker_open
                .get_or_create(&labels)
                .set(i64::from(line.breaker_open));
            self.upstream
                .set(&labels.upstream, line.effective_rate, line.limits_rate, &[]);
        }
    }

    /// The text exposition at `now`.
    pub fn render(&self, now: Nanos) -> String {
        {
            let waiting = self.waiting.lock();
            for (i, set) in waiting.iter().enumerate() {
                let age = set
                    .first()
                    .map_or(0.0, |(at, _)| now.saturating_sub(*at) as f64 / 1e9);
                self.oldest.get_or_create(&self.labels(i)).set(age);
            }
        }
        for (u, engine) in &self.engines {
            let limits = u.limits_remaining(engine, now);
            self.upstream.set(&u.name, None, None, &limits);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out = "# metrics could not be encoded\n".into();
        }
        out
    }
}

/// What the run's admin listener answers from.
struct Admin {
    metrics: Arc<RunMetrics>,
    watch: Arc<tollgate_watch::Watch>,
    clock: tollgate_store::TokioClock,
    token: Option<String>,
    listen: String,
}

/// Serve `/`, `/healthz`, `/metrics` and `/v1/alerts` on `listener` until
/// the task is dropped; all but `/healthz` need `token` when one is set.
pub(crate) async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<RunMetrics>,
    watch: Arc<tollgate_watch::Watch>,
    clock: tollgate_store::TokioClock,
    token: Option<String>,
) {
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin = Arc::new(Admin {
        metrics,
        watch,
        clock,
        token,
        listen,
    });
    while let Ok((stream, _)) = listener.accept().await {
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.answer(&req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Admin {
    async fn answer(
        self: Arc<Self>,
        req: &Request<hyper::body::Incoming>,
    ) -> Response<Full<Bytes>> {
        use tollgate_core::Clock;
        use tollgate_http::admin::{admin_allowed, problem, reply, OPENMETRICS};
        let path = req.uri().path();
        if path != "/healthz" && !admin_allowed(req, self.token.as_deref()) {
            return tollgate_http::Refusal::Unauthorized
                .response(&tollgate_http::ResponseSettings::default(), "admin");
        }
        let query = req.uri().query().unwrap_or("");
        let (scraped, titled) = (self.clone(), self.clone());
        if let Some(r) = tollgate_watch::admin::route(
            &self.watch,
            req.method(),
            path,
            query,
            Arc::new(move || scraped.metrics.render(scraped.clock.now())),
            Arc::new(move |_| tollgate_watch::dashboard::Extras {
                listen: titled.listen.clone(),
                ..Default::default()
            }),
        )
        .await
        {
            return r;
        }
        match path {
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/metrics" => reply(
                StatusCode::OK,
                OPENMETRICS,
                self.metrics.render(self.clock.now()),
            ),
            other => problem(
                StatusCode::NOT_FOUND,
                "Not found",
                format!("{other} is not an admin path; see /, /healthz, /metrics, /v1/alerts"),
            ),
        }
    }
}
