//! Envoy's rate limit service (`envoy.service.ratelimit.v3`, gRPC) on
//! `[rls] listen`: Envoy, Istio, Gloo, Contour and Emissary ask it whether
//! a request may go, and tollgate's engine answers. The gateway's config
//! and reloads apply, and so do its counters and its store (fleet mode
//! included).
//!
//! One `ShouldRateLimit` is one decision. Each descriptor is a request as
//! the limits see it: `match.domain` and `match.descriptors` /
//! `match.descriptor_keys` pick the limits that apply to it, and the key
//! part `descriptor:NAME` reads an entry's value. Its `hits_addend` (or the
//! request's; 0 means 1) is the cost. The limits of all descriptors are
//! decided together, all or nothing, as one HTTP request's limits are.
//! Limits that settle when a request completes (latency, concurrency) do
//! not apply here: Envoy reports no completion.

use crate::gateway::Gateway;
use crate::metrics::Outcome;
use compact_str::CompactString;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate_core::policy::Cost;
use tollgate_core::units::NANOS_PER_SEC;
use tollgate_core::{Clock, Descriptor, Item, Verdict};
use tonic::{Request, Response, Status};

/// The gRPC service, over the gateway's current generation.
#[derive(Debug, Clone)]
pub struct Rls {
    gateway: Arc<Gateway>,
}

impl Rls {
    pub fn server(gateway: Arc<Gateway>) -> RateLimitServiceServer<Rls> {
        RateLimitServiceServer::new(Rls { gateway })
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        let generation = self.gateway.current();
        let policy = generation.engine.policy();
        // (0 means 1 at the request's level, which cannot say "unset"; a
        // descriptor's own 0, which can, checks without counting, as
        // Envoy's reference service does)
        let request_hits = u64::from(request.hits_addend.max(1));
        // One item per (limit, class, key): two descriptors that meet the
        // same counter charge it once, with both costs.
        let mut items: Vec<Item> = Vec::new();
        let mut item_at: HashMap<(usize, usize, CompactString), usize> = HashMap::new();
        let mut of_descriptor: Vec<Vec<usize>> = vec![Vec::new(); request.descriptors.len()];
        let mut planned = Vec::new();
        for (index, descriptor) in request.descriptors.iter().enumerate() {
            let (cost, charge) = match descriptor.hits_addend.as_ref().map(|h| h.value) {
                Some(0) => (1, 0),
                Some(hits) => (hits, hits),
                None => (request_hits, request_hits),
            };
            let view = Descriptor {
                domain: &request.domain,
                entries: (descriptor.entries.iter())
                    .map(|e| (e.key.as_str(), e.value.as_str()))
                    .collect(),
            };
            policy
                .plan(&view, &mut planned)
                .map_err(|e| Status::invalid_argument(format!("descriptor {index}: {e}")))?;
            for mut item in planned.drain(..) {
                let limit = &policy.limits[item.limit];
                if limit.settles_at_completion() {
                    continue;
                }
                if limit.cost == Cost::Requests {
                    (item.cost, item.charge) = (cost, charge);
                }
                // (found by a map: thousands of descriptors cost no more than linear)
                let at = match item_at.entry((item.limit, item.class, item.key.clone())) {
                    Entry::Occupied(at) => {
                        let at = *at.get();
                        items[at].cost = items[at].cost.saturating_add(item.cost);
                        items[at].charge = items[at].charge.saturating_add(item.charge);
                        at
                    }
                    Entry::Vacant(place) => {
                        place.insert(items.len());
                        items.push(item);
                        items.len() - 1
                    }
                };
                if !of_descriptor[index].contains(&at) {
                    of_descriptor[index].push(at);
                }
            }
        }
        let now = self.gateway.clock.now();
        let (decision, _local) = generation
            .engine
            .decide_async(&items, now, false)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let denied = !decision.allowed();
        for (item, outcome) in items.iter().zip(&decision.outcomes) {
            let counted = match (outcome.shadow, outcome.allowed, denied) {
                (true, false, _) => Outcome::ShadowDenied,
                (true, true, _) => continue,
                (false, _, true) if !outcome.allowed => Outcome::Denied,
                (false, _, true) => continue,
                (false, _, false) => Outcome::Admitted,
            };
            generation.counters[item.limit].count(counted);
        }
        if let Verdict::Never {
            limit,
            cost,
            capacity,
        } = decision.verdict
        {
            // A cost the limit can never admit: OVER_LIMIT, and the
            // answer has no field for why, so the log says it.
            let name = &policy.limits[items[limit].limit].name;
            tracing::debug!("rls: limit '{name}': cost {cost} over capacity {capacity}");
        }
        let statuses = (0..request.descriptors.len())
            .map(|index| {
                let mine = || {
                    (of_descriptor[index].iter())
                        .map(|&at| (&items[at], &decision.outcomes[at]))
                        .filter(|(_, outcome)| !outcome.shadow)
                };
                let over = denied && mine().any(|(_, o)| !o.allowed);
                // The limit nearest to refusing speaks for the descriptor.
                let tightest = mine().min_by_key(|(_, o)| o.remaining);
                DescriptorStatus {
                    code: if over { Code::OverLimit } else { Code::Ok } as i32,
                    current_limit: tightest.map(|(item, _)| current_limit(policy, item)),
                    limit_remaining: tightest
                        .map_or(0, |(_, o)| u32::try_from(o.remaining).unwrap_or(u32::MAX)),
                    // (`reset` is how long until the limit is whole again)
                    duration_until_reset: tightest.map(|(_, o)| duration(o.reset)),
                    ..Default::default()
                }
            })
            .collect();
        let mut headers = hyper::HeaderMap::new();
        tollgate_http::ratelimit::add_rate_headers(
            &mut headers,
            &generation.settings.response,
            policy,
            &generation.policy_items,
            &items,
            &decision,
        );
        if let (
            Verdict::Deny {
                retry_after: Some(wait),
                ..
            },
            true,
        ) = (&decision.verdict, generation.settings.response.retry_after)
        {
            headers.insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(wait.div_ceil(NANOS_PER_SEC).max(1)),
            );
        }
        let response_headers_to_add = headers
            .iter()
            .map(|(name, value)| HeaderValue {
                key: name.as_str().to_string(),
                value: value.to_str().unwrap_or_default().to_string(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: if denied { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add,
            ..Default::default()
        }))
    }
}

/// A limit as Envoy states one: so many requests per second, minute, hour
/// or day (the nearest unit not longer than its window, the quota scaled).
fn current_limit(policy: &tollgate_core::Policy, item: &Item) -> RateLimit {
    let limit = &policy.limits[item.limit];
    let (quota, window) = limit.variants[item.class].policy();
    let window = window.max(1);
    let (unit, seconds) = match window {
        w if w < 60 => (Unit::Second, 1),
        w if w < 3_600 => (Unit::Minute, 60),
        w if w < 86_400 => (Unit::Hour, 3_600),
        _ => (Unit::Day, 86_400),
    };
    let per_unit = (quota as f64 * seconds as f64 / window as f64).round();
    RateLimit {
        name: limit.name.clone(),
        requests_per_unit: per_unit.clamp(0.0, f64::from(u32::MAX)) as u32,
        unit: unit as i32,
    }
}

fn duration(nanos: u64) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: (nanos / NANOS_PER_SEC) as i64,
        nanos: (nanos % NANOS_PER_SEC) as i32,
    }
}
