//! Prometheus metrics of the gateway (text format on the admin listener's
//! `/metrics`). Per-limit counters are resolved once per config, so the hot
//! path only bumps an atomic.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use tollgate_core::Policy;
use tollgate_store::StoreStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    limit: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

/// How one limit took part in one decision.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Admitted = 0,
    Held = 1,
    Denied = 2,
    /// A shadow limit that would have denied.
    ShadowDenied = 3,
}

const OUTCOMES: [&str; 4] = ["admitted", "held", "denied", "shadow_denied"];

/// The counters of one limit, by outcome.
#[derive(Debug, Clone)]
pub struct LimitCounters([Counter; 4]);

impl LimitCounters {
    pub fn count(&self, outcome: Outcome) {
        self.0[outcome as usize].inc();
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    responses: Family<StatusLabels, Counter>,
    /// `responses` by status code, resolved once: the hot path only bumps.
    by_status: Box<[std::sync::OnceLock<Counter>]>,
    reloads: Family<ResultLabels, Counter>,
    pub hold_seconds: Histogram,
    pub upstream_seconds: Histogram,
    pub held_now: Gauge,
    /// Connections opened to upstreams (a client connection reuses its own).
    pub upstream_opened: Counter,
    /// Upstream connections open and waiting for the next client connection.
    pub upstream_idle: Gauge,
    keys: Gauge,
    evictions: Counter,
    refused: Counter,
    /// Store totals already added to the counters above.
    seen_evictions: AtomicU64,
    seen_refused: AtomicU64,
    pub access_log_dropped: Counter,
    /// Fleet mode: 1 while Redis answers.
    store_up: Gauge,
    store_errors: Counter,
    /// Requests decided by a limit's `fail` mode while Redis was down.
    store_fallbacks: Family<ModeLabels, Counter>,
    /// Requests admitted from leased slices without a round trip.
    store_leased: Counter,
    /// Health totals already added: errors, then open, local, closed, leased.
    seen_store: [AtomicU64; 5],
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        let responses = Family::<StatusLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        // 100 us .. ~100 s
        let hold_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 11));
        let upstream_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 11));
        let held_now = Gauge::default();
        let keys = Gauge::default();
        let evictions = Counter::default();
        let refused = Counter::default();
        let access_log_dropped = Counter::default();
        registry.register(
            "decisions",
            "Rate-limit decisions by limit and outcome",
            decisions.clone(),
        );
        registry.register("responses", "Responses by status code", responses.clone());
        registry.register("reloads", "Config reloads by result", reloads.clone());
        registry.register(
            "hold_seconds",
            "Time admitted requests were held",
            hold_seconds.clone(),
        );
        registry.register(
            "upstream_seconds",
            "Upstream time until the response head",
            upstream_seconds.clone(),
        );
        registry.register("held", "Requests held right now", held_now.clone());
        let upstream_opened = Counter::default();
        let upstream_idle = Gauge::default();
        registry.register(
            "upstream_connections_opened",
            "Connections opened to upstreams",
            upstream_opened.clone(),
        );
        registry.register(
            "upstream_connections_idle",
            "Upstream connections open and kept for the next client connection",
            upstream_idle.clone(),
        );
        registry.register("keys", "Keys tracked by the store", keys.clone());
        registry.register(
            "evictions",
            "Idle keys evicted from the store",
            evictions.clone(),
        );
        registry.register(
            "keys_refused",
            "New keys refused because the store was full",
            refused.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let store_up = Gauge::default();
        let store_errors = Counter::default();
        let store_fallbacks = Family::<ModeLabels, Counter>::default();
        registry.register(
            "store_up",
            "Fleet mode: 1 while the shared store (Redis) answers, 0 after a failed round trip",
            store_up.clone(),
        );
        registry.register(
            "store_errors",
            "Fleet mode: round trips to the shared store that failed or timed out",
            store_errors.clone(),
        );
        registry.register(
            "store_fail",
            "Fleet mode: requests decided by a limit's fail mode while the shared store was down",
            store_fallbacks.clone(),
        );
        let store_leased = Counter::default();
        registry.register(
            "store_leased",
            "Fleet mode: requests admitted from this process's slices of leased limits, without a round trip",
            store_leased.clone(),
        );
        Metrics {
            store_leased,
            store_up,
            store_errors,
            store_fallbacks,
            seen_store: Default::default(),
            registry,
            decisions,
            responses,
            by_status: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
            reloads,
            hold_seconds,
            upstream_seconds,
            held_now,
            upstream_opened,
            upstream_idle,
            keys,
            evictions,
            refused,
            seen_evictions: AtomicU64::new(0),
            seen_refused: AtomicU64::new(0),
            access_log_dropped,
        }
    }
}

impl Metrics {
    /// The counters of each limit of `policy`, in policy order.
    pub fn limit_counters(&self, policy: &Policy) -> Vec<LimitCounters> {
        policy
            .limits
            .iter()
            .map(|l| {
                LimitCounters(OUTCOMES.map(|outcome| {
                    self.decisions
                        .get_or_create(&DecisionLabels {
                            limit: l.name.clone(),
                            outcome,
                        })
                        .clone()
                }))
            })
            .collect()
    }

    pub fn response(&self, code: u16) {
        let family = || self.responses.get_or_create(&StatusLabels { code }).clone();
        match self.by_status.get(usize::from(code)) {
            Some(cell) => cell.get_or_init(family).inc(),
            None => family().inc(),
        };
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Fleet mode: whether Redis answers, and what limits did while it did not.
    pub fn shared_store(&self, health: &tollgate_store::StoreHealth) {
        let add = |seen: &AtomicU64, now: u64, counter: &Counter| {
            let before = seen.swap(now, Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(before));
        };
        self.store_up.set(i64::from(health.up()));
        add(&self.seen_store[0], health.errors(), &self.store_errors);
        add(&self.seen_store[4], health.leased(), &self.store_leased);
        for (i, (mode, n)) in [
            ("open", health.fail_open()),
            ("local", health.fail_local()),
            ("closed", health.fail_closed()),
        ]
        .into_iter()
        .enumerate()
        {
            let counter = self
                .store_fallbacks
                .get_or_create(&ModeLabels { mode })
                .clone();
            add(&self.seen_store[i + 1], n, &counter);
        }
    }

    /// The text exposition, with the store's figures read now.
    pub fn render(&self, store: StoreStats) -> String {
        self.keys.set(store.keys as i64);
        let add = |seen: &AtomicU64, now: u64, counter: &Counter| {
            let before = seen.swap(now, Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(before));
        };
        add(&self.seen_evictions, store.evictions, &self.evictions);
        add(&self.seen_refused, store.refused, &self.refused);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out = "# metrics could not be encoded\n".into();
        }
        out
    }
}
