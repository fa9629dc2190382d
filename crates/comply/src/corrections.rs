//! Corrections from response headers: when the upstream reports less quota
//! left than the local view holds (another client shares it), the local
//! view is lowered to match. It is never raised: a higher count is old news.

use crate::lanes::Entry;
use tollgate_core::policy::AlgorithmKind;
use tollgate_core::{Item, Nanos};
use tollgate_http::ratelimit::{Correction, Target};
use tollgate_store::Engine;

/// Lower the local view of a limit to what the upstream reports left.
/// `committed` pairs each item the reply's request was charged with what it
/// had left just after; `in_flight` are the requests still out, of which
/// those sent after it (`sent_order`) are not in the reply's count yet.
/// Returns the most calls any one limit's count held beyond all this
/// scheduler sent: another client's, on the same quota.
pub(crate) fn apply(
    engine: &Engine,
    committed: &[(Item, u64)],
    sent_order: u64,
    corrections: &[Correction],
    in_flight: &crate::scheduler::BySeq<Entry>,
    now: Nanos,
) -> u64 {
    // On a shared (Redis) engine the counters are the fleet's, kept exact
    // by every process's decisions; one process's reading of a header is
    // not applied to them (docs/runner.md, Fleet mode).
    if corrections.is_empty() || engine.is_shared() {
        return 0;
    }
    let mut others = 0;
    let policy = engine.policy();
    let store = engine.store();
    let remaining = |item: &Item| store.usage(policy, item, now).remaining;
    let counted: Vec<&Item> = committed
        .iter()
        .filter(|(item, left_then)| {
            let algorithm = policy.limits[item.limit].algorithm;
            let rolled_over = !matches!(
                algorithm,
                AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket
            ) && remaining(item) > *left_then;
            item.charge > 0 && algorithm != AlgorithmKind::Concurrency && !rolled_over
        })
        .map(|(item, _)| item)
        .collect();
    let window = |item: &Item| policy.limits[item.limit].params(item.class).policy().1;
    let quota = |item: &Item| policy.limits[item.limit].params(item.class).policy().0;
    let binding = || counted.iter().copied().min_by_key(|i| remaining(i));
    // A count for a limit the request was charged with but that is not
    // counted (its window rolled over since) is old news for that limit,
    // not a count for another: only a vendor's name the profile does not
    // have falls back to the binding limit.
    let charged = |matches: &dyn Fn(&Item) -> bool| -> Option<Option<&Item>> {
        let (item, _) = committed.iter().find(|(item, _)| matches(item))?;
        Some(counted.contains(&item).then_some(item))
    };
    for correction in corrections {
        let item = match &correction.target {
            Target::Named(name) => {
                match charged(&|i: &Item| policy.limits[i.limit].name == *name) {
                    Some(counted) => counted,
                    None => binding(),
                }
            }
            Target::Quota(q) => match charged(&|i: &Item| quota(i) == *q) {
                Some(counted) => counted,
                None => binding(),
            },
            Target::Shortest => counted.iter().copied().min_by_key(|i| window(i)),
            Target::Longest => counted.iter().copied().max_by_key(|i| window(i)),
            Target::Binding => binding(),
        };
        let Some(item) = item else { continue };
        // Ours sent after this request are charged locally but not yet in a
        // bucket's count. (A window's count is taken as it is: its burst at
        // the window start arrives out of order, and subtracting would count
        // some twice, losing whole windows.)
        let bucket = matches!(
            policy.limits[item.limit].algorithm,
            AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket
        );
        let later: u64 = in_flight
            .values()
            .filter(|e| bucket && e.sent_order > sent_order)
            .flat_map(|e| &e.committed)
            .filter(|(i, _)| i.limit == item.limit && i.class == item.class && i.key == item.key)
            .map(|(i, _)| i.charge)
            .sum();
        let reported = correction.remaining.saturating_sub(later);
        let local = remaining(item);
        // Another client's calls: what the vendor counted beyond all this
        // scheduler sent, those still in flight included (on loopback they
        // have mostly arrived, and counting them as not yet would take a
        // burst of this scheduler's own for someone else's).
        let unexplained = local.saturating_sub(correction.remaining);
        others = others.max(unexplained);
        if reported < local {
            let extra = local - reported;
            let charge = Item {
                cost: extra,
                charge: extra,
                ..item.clone()
            };
            // Denied only if the local view moved meanwhile: then it is
            // already lower.
            let _ = engine.decide(std::slice::from_ref(&charge), now, false);
        }
    }
    others
}
