//! How long the limits make a set of calls take at the least: the scheduler
//! run on a virtual clock, every call answered at once (or after `latency`).
//! `tollgate plan` prints it before anything is sent; `tollgate run` compares
//! it with what it achieved (quota utilisation).

use crate::job::Priority;
use crate::job::Routed;
use crate::settings::{Upstream, UpstreamsConfig};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;
use tollgate_comply::{BreakerSettings, Next, Reply, Scheduler};
use tollgate_core::{Item, Nanos, Policy};
use tollgate_store::Engine;

#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub calls: u64,
    /// From the first call to the last reply.
    pub shortest: Duration,
    /// The limit calls waited for most, if any waited.
    pub binding: Option<String>,
    /// Calls the limits can never admit (cost above a limit's capacity).
    pub impossible: u64,
    /// The learnt pace the estimate held sends to, per second, when it is
    /// below what the limits allow.
    pub paced_at: Option<f64>,
}

/// Schedule `calls` from `start` as the runner would, with fresh counters,
/// `concurrency` in flight at most, each reply `latency` after its call,
/// no faster than `learnt` per second when a run learnt that pace, and
/// (given the upstream) its reserve kept and its budgets' borrowing (the
/// calls are queued work).
pub fn estimate(
    policy: &Policy,
    calls: impl IntoIterator<Item = (Priority, Vec<Item>)>,
    start: Nanos,
    latency: Duration,
    concurrency: usize,
    learnt: Option<f64>,
    upstream: Option<&Upstream>,
) -> Estimate {
    let engine = Engine::new(policy.clone());
    let mut scheduler = Scheduler::new(engine, 1, concurrency, BreakerSettings::default(), 0);
    if let Some(u) = upstream {
        scheduler = scheduler
            .with_reserve(u.reserve.clone())
            .with_borrowing(u.borrowing());
    }
    if let Some(rate) = learnt {
        scheduler.hold_pace(rate);
    }
    let mut count = 0u64;
    for (seq, (priority, items)) in calls.into_iter().enumerate() {
        scheduler.push(seq as u64, priority, 0, items);
        count += 1;
    }
    let ok = Reply::Status {
        status: 200,
        retry_after: None,
        corrections: Vec::new(),
    };
    let latency_ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    let mut replies: BinaryHeap<Reverse<(Nanos, u64)>> = BinaryHeap::new();
    let (mut now, mut last, mut impossible) = (start, start, 0);
    loop {
        while let Some(&Reverse((at, seq))) = replies.peek() {
            if at > now {
                break;
            }
            replies.pop();
            scheduler.complete(seq, &ok, latency, at);
            last = last.max(at);
        }
        let next_reply = replies.peek().map(|Reverse((at, _))| *at);
        match scheduler.next(now) {
            Next::Send { seq, .. } => replies.push(Reverse((now + latency_ns, seq))),
            Next::Reject { .. } => impossible += 1,
            Next::Wait(at) => now = next_reply.map_or(at, |r| r.min(at)).max(now),
            Next::Blocked => match next_reply {
                Some(at) => now = now.max(at),
                None => break, // waits for a release nothing will bring
            },
            Next::Idle => break,
        }
    }
    Estimate {
        calls: count,
        shortest: Duration::from_nanos(last - start),
        binding: scheduler.binding_limit().map(str::to_owned),
        impossible,
        paced_at: scheduler.effective_rate(),
    }
}

/// One upstream's share of a job set and its estimate.
#[derive(Debug, Clone)]
pub struct UpstreamPlan {
    pub upstream: String,
    pub estimate: Estimate,
    /// Jobs the policy rejects outright (e.g. a missing key it requires).
    pub invalid: Vec<(String, String)>,
    /// The fastest sustained rate the profile's limits allow, per second.
    pub profile_rate: Option<f64>,
}

/// `tollgate plan`: the calls of `jobs` per upstream, and the least time
/// the limits allow for them from `start`, no faster than the paces runs
/// learnt (`paces`, per upstream, from a state).
pub fn plan_jobs(
    config: &UpstreamsConfig,
    jobs: &[Routed],
    start: Nanos,
    latency: Duration,
    paces: &HashMap<String, f64>,
) -> Vec<UpstreamPlan> {
    config
        .upstreams
        .iter()
        .enumerate()
        .filter(|(i, _)| jobs.iter().any(|r| r.upstream == *i))
        .map(|(i, u)| {
            let mut invalid = Vec::new();
            let calls: Vec<(Priority, Vec<Item>)> = jobs
                .iter()
                .filter(|r| r.upstream == i)
                .filter_map(|r| match crate::job::items(u, &r.job) {
                    Ok(items) => Some((r.job.priority, items)),
                    Err(e) => {
                        invalid.push((r.job.id.clone(), e));
                        None
                    }
                })
                .collect();
            UpstreamPlan {
                upstream: u.name.clone(),
                estimate: estimate(
                    &u.policy,
                    calls,
                    start,
                    latency,
                    u.concurrency,
                    paces.get(&u.name).copied(),
                    Some(u),
                ),
                invalid,
                profile_rate: tollgate_comply::pace::sustained_rate(&u.policy),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::NoProfiles;

    fn policy(text: &str) -> Policy {
        tollgate_core::parse(text, &NoProfiles).unwrap()
    }

    fn calls(policy: &Policy, n: usize) -> Vec<(Priority, Vec<Item>)> {
        let req = tollgate_core::Attrs::new("POST", "/graphql", &[("authorization", "k")]);
        (0..n)
            .map(|_| {
                let mut items = Vec::new();
                policy.plan(&req, &mut items).unwrap();
                (Priority::Normal, items)
            })
            .collect()
    }

    #[test]
    fn crm_fifty_calls_fit_one_window() {
        let p = policy("[[limit]]\nname = \"api\"\nkey = [\"header:authorization\"]\nalgorithm = \"sliding_window\"\nevery = \"60s\"\nquota = 100\nsegments = 60\n");
        let e = estimate(&p, calls(&p, 50), 0, Duration::ZERO, 16, None, None);
        assert_eq!(e.shortest, Duration::ZERO);
        assert_eq!(e.binding, None);
        // 250 calls: 100 now, 100 a window later, 50 two windows later;
        // each window is up to one 1 s sub-window longer (the stated precision).
        let e = estimate(&p, calls(&p, 250), 0, Duration::ZERO, 16, None, None);
        assert!(
            e.shortest >= Duration::from_secs(120) && e.shortest <= Duration::from_secs(122),
            "{:?}",
            e.shortest
        );
        assert_eq!(e.binding.as_deref(), Some("api"));
    }

    #[test]
    fn celigo_burst_then_the_refill_rate() {
        let p = policy("[[limit]]\nname = \"account\"\nalgorithm = \"leaky_bucket\"\ncapacity = 1000\nrefill = \"300/s\"\n");
        // 1,000 at once, then 3,000 more at 300/s: 10 s.
        let e = estimate(&p, calls(&p, 4000), 0, Duration::ZERO, 16, None, None);
        assert_eq!(e.shortest, Duration::from_secs(10));
    }

    #[test]
    fn a_learnt_pace_slows_the_plan_below_the_profile() {
        let p = policy("[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n");
        // The profile: 20 at once, then 100/s: 1,020 calls in 10 s.
        let e = estimate(&p, calls(&p, 1020), 0, Duration::ZERO, 32, None, None);
        assert_eq!(e.shortest, Duration::from_secs(10));
        assert_eq!(e.paced_at, None);
        // A run learnt 50/s: the plan holds to it (the first call goes at once).
        let e = estimate(&p, calls(&p, 1020), 0, Duration::ZERO, 32, Some(50.0), None);
        assert_eq!(e.paced_at, Some(50.0));
        let secs = e.shortest.as_secs_f64();
        assert!((20.3..20.4).contains(&secs), "{secs} s");
        // A learnt rate at or above the limits' is no pace at all.
        let e = estimate(
            &p,
            calls(&p, 1020),
            0,
            Duration::ZERO,
            32,
            Some(150.0),
            None,
        );
        assert_eq!((e.shortest, e.paced_at), (Duration::from_secs(10), None));
    }

    #[test]
    fn concurrency_and_latency_bound_the_pace() {
        let p = policy("[[limit]]\nname = \"in-flight\"\nalgorithm = \"concurrency\"\nmax = 25\n");
        // 100 calls, 25 at a time, 2 s each: 4 rounds.
        let e = estimate(
            &p,
            calls(&p, 100),
            0,
            Duration::from_secs(2),
            100,
            None,
            None,
        );
        assert_eq!(e.shortest, Duration::from_secs(8));
        // The runner's own concurrency binds first when lower.
        let e = estimate(
            &p,
            calls(&p, 100),
            0,
            Duration::from_secs(2),
            10,
            None,
            None,
        );
        assert_eq!(e.shortest, Duration::from_secs(20));
    }
}
