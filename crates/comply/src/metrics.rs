//! The series both comply commands (`tollgate run --admin`, `tollgate
//! proxy`'s admin listener) show per upstream under the same names: the
//! pace calls go at, and what each limit has left.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    upstream: String,
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLimitLabels {
    upstream: String,
    /// How the config names a pooled key (`${HS_KEY_1}`), never its value.
    key: String,
    limit: String,
}

/// `tollgate_upstream_effective_rate`, `_limits_rate`, `_limit_remaining`
/// and `_limit_quota`, and with a key pool `_key_limit_remaining` and
/// `_key_limit_quota`.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSeries {
    effective_rate: Family<UpstreamLabels, Gauge<f64, AtomicU64>>,
    limits_rate: Family<UpstreamLabels, Gauge<f64, AtomicU64>>,
    limit_remaining: Family<LimitLabels, Gauge>,
    limit_quota: Family<LimitLabels, Gauge>,
    key_limit_remaining: Family<KeyLimitLabels, Gauge>,
    key_limit_quota: Family<KeyLimitLabels, Gauge>,
}

impl UpstreamSeries {
    /// The series, registered in `registry` (prefixed `tollgate`).
    pub fn register(registry: &mut Registry) -> UpstreamSeries {
        let s = UpstreamSeries::default();
        registry.register(
            "upstream_effective_rate",
            "Calls per second sent to an upstream right now: below its limits' rate while 429s the limits did not predict, or another client's calls counted in its rate-limit headers, keep the pace lower",
            s.effective_rate.clone(),
        );
        registry.register(
            "upstream_limits_rate",
            "The fastest sustained calls per second an upstream's limits allow",
            s.limits_rate.clone(),
        );
        registry.register(
            "upstream_limit_remaining",
            "What a limit of an upstream has left for its calls right now (a workflow's budget is the limit OF/WORKFLOW); only limits whose key needs no request",
            s.limit_remaining.clone(),
        );
        registry.register(
            "upstream_limit_quota",
            "A limit's quota (a bucket's capacity, a window's quota)",
            s.limit_quota.clone(),
        );
        registry.register(
            "upstream_key_limit_remaining",
            "With a key pool: what a limit keyed by the pooled key has left for each key (named as the config names it, never by its value)",
            s.key_limit_remaining.clone(),
        );
        registry.register(
            "upstream_key_limit_quota",
            "With a key pool: a per-key limit's quota",
            s.key_limit_quota.clone(),
        );
        s
    }

    /// Each pooled key's limits now: (key's label, limit, remaining,
    /// quota), as `Upstream::key_limits_remaining` gives them.
    pub fn set_keys(&self, upstream: &str, keys: &[(String, String, u64, u64)]) {
        for (key, limit, remaining, quota) in keys {
            let l = KeyLimitLabels {
                upstream: upstream.to_string(),
                key: key.clone(),
                limit: limit.clone(),
            };
            left_of(
                &self.key_limit_remaining,
                &self.key_limit_quota,
                &l,
                *remaining,
                *quota,
            );
        }
    }

    /// Upstream `upstream` now: its pace (per second; the effective rate is
    /// the limits' when nothing holds it lower) and each limit's (name,
    /// remaining, quota), as `Upstream::limits_remaining` gives them.
    pub fn set(
        &self,
        upstream: &str,
        effective_rate: Option<f64>,
        limits_rate: Option<f64>,
        limits: &[(String, u64, u64)],
    ) {
        let labels = UpstreamLabels {
            upstream: upstream.to_string(),
        };
        if let Some(limits) = limits_rate {
            self.limits_rate.get_or_create(&labels).set(limits);
            let effective = effective_rate.unwrap_or(limits);
            self.effective_rate.get_or_create(&labels).set(effective);
        }
        for (limit, remaining, quota) in limits {
            let l = LimitLabels {
                upstream: upstream.to_string(),
                limit: limit.clone(),
            };
            left_of(
                &self.limit_remaining,
                &self.limit_quota,
                &l,
                *remaining,
                *quota,
            );
        }
    }
}

/// Set a limit's remaining and quota gauges (saturated at i64's range).
fn left_of<
    L: Clone + std::hash::Hash + Eq + prometheus_client::encoding::EncodeLabelSet + std::fmt::Debug,
>(
    remaining_of: &Family<L, Gauge>,
    quota_of: &Family<L, Gauge>,
    labels: &L,
    remaining: u64,
    quota: u64,
) {
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    remaining_of.get_or_create(labels).set(gauge(remaining));
    quota_of.get_or_create(labels).set(gauge(quota));
}
