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

/// `"name";q=Q;w=W` for every (limit, variant) of a policy, and each
/// limit's `"name";r=`, built once per config: a response's `RateLimit-Policy`
/// is one of them (or several joined), and its `RateLimit` starts from them.
#[derive(Debug)]
pub struct PolicyItems {
    policy: Vec<Vec<HeaderValue>>,
    state_prefix: Vec<Box<[u8]>>,
}

impl PolicyItems {
    pub fn new(policy: &Policy) -> Self {
        PolicyItems {
            policy: policy
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
                            // (a limit's name is printable ASCII: the config says so)
                            HeaderValue::from_str(&item)
                                .unwrap_or(HeaderValue::from_static("\"?\""))
                        })
                        .collect()
                })
                .collect(),
            state_prefix: policy
                .limits
                .iter()
                .map(|limit| format!("\"{}\";r=", limit.name).into_bytes().into())
                .collect(),
        }
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
    // One enforcing limit (the usual case) takes its prebuilt policy value.
    let mut policy_value: Option<&HeaderValue> = None;
    let mut policy_field: Vec<u8> = Vec::new();
    let mut state_field: Vec<u8> = Vec::with_capacity(48);
    let mut digits = itoa::Buffer::new();
    // (remaining, quota, reset) of the limit with the least left.
    let mut tightest: Option<(u64, u64, u64)> = None;
    for (item, outcome) in items.iter().zip(&decision.outcomes) {
        if outcome.shadow {
            continue;
        }
        let limit = &policy.limits[item.limit];
        let this_policy = &items_text.policy[item.limit][item.class];
        if state_field.is_empty() {
            policy_value = Some(this_policy);
        } else {
            if let Some(first) = policy_value.take() {
                policy_field.extend_from_slice(first.as_bytes());
            }
            policy_field.extend_from_slice(b", ");
            policy_field.extend_from_slice(this_policy.as_bytes());
            state_field.extend_from_slice(b", ");
        }
        let reset = whole_seconds(outcome.reset);
        state_field.extend_from_slice(&items_text.state_prefix[item.limit]);
        state_field.extend_from_slice(digits.format(outcome.remaining).as_bytes());
        state_field.extend_from_slice(b";t=");
        state_field.extend_from_slice(digits.format(reset).as_bytes());
        if tightest.is_none_or(|(r, _, _)| outcome.remaining < r) {
            tightest = Some((
                outcome.remaining,
                limit.params(item.class).policy().0,
                reset,
            ));
        }
    }
    if state_field.is_empty() {
        return;
    }
    if settings.ratelimit_headers {
        let policy_value = match policy_value {
            Some(one) => Ok(one.clone()),
            None => HeaderValue::from_maybe_shared(bytes::Bytes::from(policy_field)),
        };
        let state_value = HeaderValue::from_maybe_shared(bytes::Bytes::from(state_field));
        if let (Ok(p), Ok(s)) = (policy_value, state_value) {
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
