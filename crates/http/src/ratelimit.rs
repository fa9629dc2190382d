//! The IETF RateLimit headers: written on the gateway's answers (from a
//! decision) and read from a vendor's answers (`parse`: what is left, and
//! `Retry-After`), so both faces speak the same fields.

mod parse;

pub use parse::{corrections, corrections_in, retry_after, Correction, Target};

use crate::refusal::{whole_seconds, ResponseSettings};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use std::fmt::Write;
use tollgate_core::{Decision, Item, Policy};

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// `"name";q=Q;w=W` for every (limit, variant) of a policy, built once per
/// config: the `RateLimit-Policy` items a response is assembled from.
#[derive(Debug)]
pub struct PolicyItems(Vec<Vec<String>>);

impl PolicyItems {
    pub fn new(policy: &Policy) -> Self {
        PolicyItems(
            policy
                .limits
                .iter()
                .map(|limit| {
                    limit
                        .variants
                        .iter()
                        .map(|params| {
                            let (q, w) = params.policy();
                            let mut item = format!("\"{}\";q={q}", limit.name);
                            if w > 0 {
                                let _ = write!(item, ";w={w}");
                            }
                            item
                        })
                        .collect()
                })
                .collect(),
        )
    }
}

/// Add `RateLimit-Policy`, `RateLimit` (and the legacy `X-RateLimit-*` for the
/// limit with the least left) for the enforcing limits of a decision.
pub fn add_rate_headers(
    headers: &mut HeaderMap,
    settings: &ResponseSettings,
    policy: &Policy,
    items_text: &PolicyItems,
    items: &[Item],
    decision: &Decision,
) {
    if !settings.ratelimit_headers && !settings.legacy_headers {
        return;
    }
    let mut policy_field = String::new();
    let mut state_field = String::new();
    // (remaining, quota, reset) of the limit with the least left.
    let mut tightest: Option<(u64, u64, u64)> = None;
    for (item, outcome) in items.iter().zip(&decision.outcomes) {
        if outcome.shadow {
            continue;
        }
        let limit = &policy.limits[item.limit];
        if !policy_field.is_empty() {
            policy_field.push_str(", ");
            state_field.push_str(", ");
        }
        policy_field.push_str(&items_text.0[item.limit][item.class]);
        let reset = whole_seconds(outcome.reset);
        let _ = write!(
            state_field,
            "\"{}\";r={};t={reset}",
            limit.name, outcome.remaining
        );
        if tightest.is_none_or(|(r, _, _)| outcome.remaining < r) {
            tightest = Some((
                outcome.remaining,
                limit.params(item.class).policy().0,
                reset,
            ));
        }
    }
    if policy_field.is_empty() {
        return;
    }
    if settings.ratelimit_headers {
        if let (Ok(p), Ok(s)) = (
            HeaderValue::from_str(&policy_field),
            HeaderValue::from_str(&state_field),
        ) {
            headers.insert(RATELIMIT_POLICY.clone(), p);
            headers.insert(RATELIMIT.clone(), s);
        }
    }
    if let (true, Some((remaining, quota, reset))) = (settings.legacy_headers, tightest) {
        headers.insert(X_LIMIT.clone(), HeaderValue::from(quota));
        headers.insert(X_REMAINING.clone(), HeaderValue::from(remaining));
        headers.insert(X_RESET.clone(), HeaderValue::from(reset));
    }
}
