//! Prometheus metrics of the proxy (text format on the admin listener's
//! `/metrics`): what clients got, what the upstreams answered, how long
//! requests waited for their slot, and each line's length right now.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    upstream: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SavedLabels {
    upstream: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkflowLabels {
    upstream: String,
    /// "" for jobs of no workflow.
    workflow: String,
}

/// How a status counts: 2xx, 3xx, 4xx, 429 or 5xx.
pub fn status_class(status: u16) -> &'static str {
    match status {
        429 => "429",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Every outcome a request is counted under; a call to the upstream only
/// under the first `CALL_OUTCOMES` (what came back, or no response).
const OUTCOMES: [&str; 10] = [
    "2xx",
    "3xx",
    "4xx",
    "429",
    "5xx",
    "network_error",
    "wait_exceeded",
    "breaker_open",
    "refused",
    "keys_parked",
];
const CALL_OUTCOMES: usize = 6;

/// Why a request was answered without a call of its own: from a fresh
/// cache entry, from another request's call in flight, from a repeated
/// Idempotency-Key's first answer, or as a write that changes nothing.
const SAVED_REASONS: [&str; 4] = ["hit", "coalesced", "dedup", "unchanged"];

/// One upstream's series, resolved once per line: the request path only
/// bumps atomics (no label strings built, no map looked up).
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    requests: Vec<Counter>,
    calls: Vec<Counter>,
    saved: Vec<Counter>,
    wait_seconds: Histogram,
}

impl UpstreamMetrics {
    fn index(outcome: &str) -> Option<usize> {
        OUTCOMES.iter().position(|o| *o == outcome)
    }

    /// A client request ended so (`status_class`, or tollgate's own answer).
    pub fn request(&self, outcome: &str) {
        if let Some(i) = Self::index(outcome) {
            self.requests[i].inc();
        }
    }

    /// A call to the upstream came back so.
    pub fn call(&self, outcome: &str) {
        if let Some(counter) = Self::index(outcome).and_then(|i| self.calls.get(i)) {
            counter.inc();
        }
    }

    /// A request was answered without a call (`SAVED_REASONS`).
    pub fn saved(&self, reason: &str) {
        if let Some(i) = SAVED_REASONS.iter().position(|r| *r == reason) {
            self.saved[i].inc();
        }
    }

    pub fn waited(&self, seconds: f64) {
        self.wait_seconds.observe(seconds);
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    calls: Family<OutcomeLabels, Counter>,
    saved: Family<SavedLabels, Counter>,
    cache_entries: Family<UpstreamLabels, Gauge>,
    cache_bytes: Family<UpstreamLabels, Gauge>,
    wait_seconds: Family<UpstreamLabels, Histogram>,
    waiting: Family<UpstreamLabels, Gauge>,
    in_flight: Family<UpstreamLabels, Gauge>,
    /// The pace and each limit's remaining, as the runner shows them.
    upstream: tollgate_comply::metrics::UpstreamSeries,
    reserve_calls: Family<UpstreamLabels, Counter>,
    jobs_pending: Family<WorkflowLabels, Gauge>,
    jobs_oldest: Family<WorkflowLabels, Gauge<f64, AtomicU64>>,
    jobs_finished: Family<OutcomeLabels, Counter>,
    job_seconds: Family<UpstreamLabels, Histogram>,
    callbacks: Family<CallbackLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallbackLabels {
    outcome: &'static str,
}

/// The pending jobs of one upstream and workflow right now.
#[derive(Debug, Clone)]
pub struct JobsNow {
    pub upstream: String,
    pub workflow: String,
    pub pending: usize,
    /// How long the oldest has waited, in seconds.
    pub oldest_seconds: f64,
}

/// One upstream's line right now, as `/metrics` shows it.
#[derive(Debug, Clone)]
pub struct LineNow {
    pub upstream: String,
    pub waiting: usize,
    pub in_flight: usize,
    /// Per second: what sends go at, and what the limits allow (None when
    /// no limit has a rate).
    pub effective_rate: Option<f64>,
    pub limits_rate: Option<f64>,
    /// What its cache holds (None without `[[upstream.cache]]`).
    pub cache: Option<tollgate_http::cache::Size>,
    /// Live calls admitted from its reserve so far.
    pub reserve_calls: u64,
    /// Per limit (budgets included) the upstream's own calls count under:
    /// (name, remaining, quota).
    pub remaining: Vec<(String, u64, u64)>,
    /// With a key pool: (key's label, limit, remaining, quota).
    pub key_remaining: Vec<(String, String, u64, u64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        // `tollgate_proxy_*` for what only the proxy has; what both comply
        // faces have (calls, jobs, the pace and limits of each upstream)
        // under the names `tollgate run --admin` uses too.
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<OutcomeLabels, Counter>::default();
        let calls = Family::<OutcomeLabels, Counter>::default();
        let saved = Family::<SavedLabels, Counter>::default();
        let cache_entries = Family::<UpstreamLabels, Gauge>::default();
        let cache_bytes = Family::<UpstreamLabels, Gauge>::default();
        // 1 ms .. ~4 min
        let wait_seconds = Family::<UpstreamLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 10))
        });
        let waiting = Family::<UpstreamLabels, Gauge>::default();
        let in_flight = Family::<UpstreamLabels, Gauge>::default();
        let reserve_calls = Family::<UpstreamLabels, Counter>::default();
        let jobs_pending = Family::<WorkflowLabels, Gauge>::default();
        let jobs_oldest = Family::<WorkflowLabels, Gauge<f64, AtomicU64>>::default();
        let jobs_finished = Family::<OutcomeLabels, Counter>::default();
        let callbacks = Family::<CallbackLabels, Counter>::default();
        // 10 ms .. ~11 days, as the runner's
        let job_seconds = Family::<UpstreamLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 4.0, 14))
        });
        registry.register_with_unit(
            "job",
            "From when a job was queued (or this process resumed it) to its final outcome",
            prometheus_client::registry::Unit::Seconds,
            job_seconds.clone(),
        );
        registry.register(
            "proxy_callbacks",
            "Jobs' results POSTed to their callback URLs, by outcome (delivered: the receiver answered 2xx; undelivered: it never did, after every retry)",
            callbacks.clone(),
        );
        registry.register(
            "jobs_pending",
            "Jobs pushed to /_tollgate/jobs (or queued with Prefer: respond-async) not yet done or dead, by upstream and workflow",
            jobs_pending.clone(),
        );
        registry.register_with_unit(
            "jobs_oldest_age",
            "How long the oldest pending job of an upstream and workflow has waited (since it was queued, or since this process resumed it)",
            prometheus_client::registry::Unit::Seconds,
            jobs_oldest.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs that reached their final outcome, by upstream (done, or dead: see tollgate dlq)",
            jobs_finished.clone(),
        );
        registry.register(
            "proxy_reserve_calls",
            "Live calls admitted from an upstream's reserve (what queued work may not use)",
            reserve_calls.clone(),
        );
        registry.register(
            "proxy_requests",
            "Client requests by upstream and what the client got (2xx, 3xx, 4xx, 429, 5xx; wait_exceeded and breaker_open are tollgate's own answers, network_error a call that never got a response)",
            requests.clone(),
        );
        registry.register(
            "upstream_calls",
            "Calls sent to upstreams, by what the upstream answered (retries included)",
            calls.clone(),
        );
        registry.register(
            "proxy_calls_saved",
            "Client requests answered without a call to the upstream, by reason (hit: a fresh cache entry; coalesced: another request's call in flight; dedup: a repeated Idempotency-Key, answered as the first was; unchanged: a PATCH or PUT that sends what the last one sent)",
            saved.clone(),
        );
        registry.register(
            "proxy_cache_entries",
            "Responses an upstream's cache holds",
            cache_entries.clone(),
        );
        registry.register(
            "proxy_cache_bytes",
            "What an upstream's cache holds, in bytes (bodies, headers and 256 bytes of bookkeeping per entry)",
            cache_bytes.clone(),
        );
        registry.register(
            "proxy_wait_seconds",
            "Time requests waited in line for their slot",
            wait_seconds.clone(),
        );
        registry.register(
            "proxy_waiting",
            "Requests waiting in an upstream's line right now (queued or backing off)",
            waiting.clone(),
        );
        registry.register(
            "proxy_in_flight",
            "Calls sent to an upstream and not yet answered",
            in_flight.clone(),
        );
        let upstream = tollgate_comply::metrics::UpstreamSeries::register(&mut registry);
        Metrics {
            registry,
            requests,
            calls,
            saved,
            cache_entries,
            cache_bytes,
            wait_seconds,
            waiting,
            in_flight,
            upstream,
            reserve_calls,
            jobs_pending,
            jobs_oldest,
            jobs_finished,
            job_seconds,
            callbacks,
        }
    }
}

impl Metrics {
    /// The series of upstream `name`.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let of = |family: &Family<OutcomeLabels, Counter>, outcomes: &[&'static str]| {
            outcomes
                .iter()
                .map(|outcome| {
                    family
                        .get_or_create(&OutcomeLabels {
                            upstream: name.to_string(),
                            outcome,
                        })
                        .clone()
                })
                .collect()
        };
        UpstreamMetrics {
            requests: of(&self.requests, &OUTCOMES),
            calls: of(&self.calls, &OUTCOMES[..CALL_OUTCOMES]),
            saved: SAVED_REASONS
                .iter()
                .map(|reason| {
                    self.saved
                        .get_or_create(&SavedLabels {
                            upstream: name.to_string(),
                            reason,
                        })
                        .clone()
                })
                .collect(),
            wait_seconds: self
                .wait_seconds
                .get_or_create(&UpstreamLabels {
                    upstream: name.to_string(),
                })
                .clone(),
        }
    }

    /// A job of `upstream` reached its final outcome, `seconds` after it
    /// was queued.
    pub fn job_finished(&self, upstream: &str, dead: bool, seconds: f64) {
        self.job_seconds
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .observe(seconds);
        self.jobs_finished
            .get_or_create(&OutcomeLabels {
                upstream: upstream.to_string(),
                outcome: if dead { "dead" } else { "done" },
            })
            .inc();
    }

    /// A callback was delivered, or given up on.
    pub fn callback(&self, delivered: bool) {
        self.callbacks
            .get_or_create(&CallbackLabels {
                outcome: if delivered {
                    "delivered"
                } else {
                    "undelivered"
                },
            })
            .inc();
    }

    /// The text exposition, with each upstream's line and the pending jobs
    /// as they are now.
    pub fn render(&self, lines: impl Iterator<Item = LineNow>, jobs: &[JobsNow]) -> String {
        // (a queue that emptied shows no series, rather than a stale one)
        self.jobs_pending.clear();
        self.jobs_oldest.clear();
        for j in jobs {
            let labels = WorkflowLabels {
                upstream: j.upstream.clone(),
                workflow: j.workflow.clone(),
            };
            self.jobs_pending
                .get_or_create(&labels)
                .set(j.pending as i64);
            self.jobs_oldest
                .get_or_create(&labels)
                .set(j.oldest_seconds);
        }
        for line in lines {
            let labels = UpstreamLabels {
                upstream: line.upstream,
            };
            self.upstream.set(
                &labels.upstream,
                line.effective_rate,
                line.limits_rate,
                &line.remaining,
            );
            self.upstream
                .set_keys(&labels.upstream, &line.key_remaining);
            // (the line counts; the series only ever rises, across reloads)
            let reserve_calls = self.reserve_calls.get_or_create(&labels);
            if line.reserve_calls > reserve_calls.get() {
                reserve_calls.inc_by(line.reserve_calls - reserve_calls.get());
            }
            self.waiting.get_or_create(&labels).set(line.waiting as i64);
            self.in_flight
                .get_or_create(&labels)
                .set(line.in_flight as i64);
            if let Some(size) = line.cache {
                let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                self.cache_entries
                    .get_or_create(&labels)
                    .set(gauge(size.entries));
                self.cache_bytes
                    .get_or_create(&labels)
                    .set(gauge(size.bytes));
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out = "# metrics could not be encoded\n".into();
        }
        out
    }
}
