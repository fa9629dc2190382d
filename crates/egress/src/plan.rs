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
use tollgate_comply::schedule::Schedule;
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
    /// Per workflow of the calls (by name; calls of none are not listed).
    pub workflows: Vec<WorkflowEstimate>,
    /// Per limit, the most of its quota in use at once (0 to 1): for a
    /// daily window, the day's peak.
    pub peaks: Vec<(String, f64)>,
    /// When each call would go, per workflow ("" for calls of none), in
    /// order: what `plan --report` draws.
    pub sends: Vec<(String, Vec<Nanos>)>,
}

/// When one workflow's calls would go.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowEstimate {
    pub name: String,
    pub calls: u64,
    /// Its first and last sends (ns since the epoch, on the plan's clock).
    pub first: Nanos,
    pub last: Nanos,
}

/// One call to plan: its priority, workflow (its schedule applies) and
/// limits.
#[derive(Debug, Clone)]
pub struct Call {
    pub priority: Priority,
    pub workflow: Option<String>,
    pub items: Vec<Item>,
}

impl From<(Priority, Vec<Item>)> for Call {
    fn from((priority, items): (Priority, Vec<Item>)) -> Call {
        Call {
            priority,
            workflow: None,
            items,
        }
    }
}

/// Schedule `calls` from `start` as the runner would, with fresh counters,
/// `concurrency` in flight at most, each reply `latency` after its call,
/// no faster than `learnt` per second when a run learnt that pace, and
/// (given the upstream) its reserve kept, its budgets' borrowing and the
/// workflows' `schedules` (the calls are queued work).
#[allow(clippy::too_many_arguments)]
pub fn estimate<C: Into<Call>>(
    policy: &Policy,
    calls: impl IntoIterator<Item = C>,
    start: Nanos,
    latency: Duration,
    concurrency: usize,
    learnt: Option<f64>,
    upstream: Option<&Upstream>,
    schedules: &[Schedule],
) -> Estimate {
    let engine = Engine::new(policy.clone());
    let mut scheduler = Scheduler::new(engine, 1, concurrency, BreakerSettings::default(), 0)
        .with_schedules(schedules);
    if let Some(u) = upstream {
        scheduler = scheduler
            .with_reserve(u.reserve.clone())
            .with_borrowing(u.borrowing());
    }
    if let Some(rate) = learnt {
        scheduler.hold_pace(rate);
    }
    let mut count = 0u64;
    let mut planned: Vec<Call> = Vec::new();
    for (seq, call) in calls.into_iter().enumerate() {
        let call: Call = call.into();
        scheduler.push_job(
            seq as u64,
            call.priority,
            0,
            call.workflow.as_deref(),
            call.items.clone(),
        );
        planned.push(call);
        count += 1;
    }
    let mut workflows: Vec<WorkflowEstimate> = Vec::new();
    let mut sends: Vec<(String, Vec<Nanos>)> = Vec::new();
    let mut peaks: Vec<f64> = vec![0.0; policy.limits.len()];
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
            Next::Send { seq, .. } => {
                replies.push(Reverse((now + latency_ns, seq)));
                let call = &planned[seq as usize];
                sent(&mut workflows, call, now);
                let workflow = call.workflow.as_deref().unwrap_or("");
                match sends.iter_mut().find(|(w, _)| w == workflow) {
                    Some((_, at)) => at.push(now),
                    None => sends.push((workflow.to_string(), vec![now])),
                }
                for item in &call.items {
                    let limit = &policy.limits[item.limit];
                    let quota = limit.params(item.class).policy().0;
                    if quota > 0
                        && limit.algorithm != tollgate_core::policy::AlgorithmKind::Concurrency
                    {
                        let left = scheduler.engine().usage(item, now).remaining;
                        let used = quota.saturating_sub(left) as f64 / quota as f64;
                        peaks[item.limit] = peaks[item.limit].max(used);
                    }
                }
            }
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
        workflows,
        peaks: policy
            .limits
            .iter()
            .zip(peaks)
            .filter(|(_, peak)| *peak > 0.0)
            .map(|(l, peak)| (l.name.clone(), peak))
            .collect(),
        sends,
    }
}

/// Count a send of `call` at `now` for its workflow.
fn sent(workflows: &mut Vec<WorkflowEstimate>, call: &Call, now: Nanos) {
    let Some(name) = &call.workflow else {
        return;
    };
    match workflows.iter_mut().find(|w| &w.name == name) {
        Some(w) => {
            w.calls += 1;
            w.last = now;
        }
        None => workflows.push(WorkflowEstimate {
            name: name.clone(),
            calls: 1,
            first: now,
            last: now,
        }),
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
            let calls: Vec<Call> = jobs
                .iter()
                .filter(|r| r.upstream == i)
                .filter_map(|r| match crate::job::items(u, &r.job) {
                    Ok(items) => Some(Call {
                        priority: r.job.priority,
                        workflow: r.job.workflow.clone(),
                        items,
                    }),
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
                    &config.schedules(),
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
        let e = estimate(&p, calls(&p, 50), 0, Duration::ZERO, 16, None, None, &[]);
        assert_eq!(e.shortest, Duration::ZERO);
        assert_eq!(e.binding, None);
        // 250 calls: 100 now, 100 a window later, 50 two windows later;
        // each window is up to one 1 s sub-window longer (the stated precision).
        let e = estimate(&p, calls(&p, 250), 0, Duration::ZERO, 16, None, None, &[]);
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
        let e = estimate(&p, calls(&p, 4000), 0, Duration::ZERO, 16, None, None, &[]);
        assert_eq!(e.shortest, Duration::from_secs(10));
    }

    #[test]
    fn a_learnt_pace_slows_the_plan_below_the_profile() {
        let p = policy("[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n");
        // The profile: 20 at once, then 100/s: 1,020 calls in 10 s.
        let e = estimate(&p, calls(&p, 1020), 0, Duration::ZERO, 32, None, None, &[]);
        assert_eq!(e.shortest, Duration::from_secs(10));
        assert_eq!(e.paced_at, None);
        // A run learnt 50/s: the plan holds to it (the first call goes at once).
        let e = estimate(
            &p,
            calls(&p, 1020),
            0,
            Duration::ZERO,
            32,
            Some(50.0),
            None,
            &[],
        );
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
            &[],
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
            &[],
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
            &[],
        );
        assert_eq!(e.shortest, Duration::from_secs(20));
    }

    #[test]
    fn workflows_are_planned_in_their_windows_with_the_day_s_peak() {
        let config = tollgate_comply::settings::parse(
            "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9\"\n\
             [[upstream.limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 1000\n\
             [[upstream.limit]]\nname = \"rate\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n\
             [[workflow]]\nname = \"enrichment\"\nstart = \"06:00\"\nend = \"08:00\"\n",
            &NoProfiles,
            &|_| None,
        )
        .unwrap();
        let job = |i: usize, workflow: &str| crate::job::Job {
            id: format!("j{i}"),
            method: "GET".into(),
            url: "http://127.0.0.1:9/x".into(),
            headers: Vec::new(),
            body: None,
            json: false,
            priority: Priority::Normal,
            workflow: Some(workflow.into()),
            idempotency_key: format!("k{i}"),
            callback: None,
            client: None,
        };
        let jobs: Vec<Routed> = (0..400)
            .map(|i| Routed {
                upstream: 0,
                job: job(i, if i < 300 { "enrichment" } else { "sync" }),
            })
            .collect();
        // Planned from midnight UTC: sync goes at once, enrichment at 06:00.
        let midnight: u64 = 1_767_225_600_000_000_000;
        let plans = plan_jobs(&config, &jobs, midnight, Duration::ZERO, &HashMap::new());
        let e = &plans[0].estimate;
        let of = |name: &str| e.workflows.iter().find(|w| w.name == name).unwrap().clone();
        let (enrichment, sync) = (of("enrichment"), of("sync"));
        assert_eq!((enrichment.calls, sync.calls), (300, 100));
        assert_eq!(sync.first, midnight);
        let six = midnight + 6 * 3600 * 1_000_000_000;
        assert_eq!(enrichment.first, six);
        // 300 calls at 10/s after a burst of 10 (with the margin): about 29 s.
        let took = (enrichment.last - six) as f64 / 1e9;
        assert!((28.0..31.0).contains(&took), "{took}");
        let schedule = config
            .workflow("enrichment")
            .unwrap()
            .schedule
            .as_ref()
            .unwrap();
        assert!(
            schedule.window_end(enrichment.last).is_some(),
            "inside its window"
        );
        // The day's peak: 400 of 1,000.
        let daily = e.peaks.iter().find(|(n, _)| n == "daily").unwrap().1;
        assert!((daily - 0.4).abs() < 1e-9, "{daily}");
    }
}
