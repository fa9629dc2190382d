//! Budgets as shares of a limit, over a scaled "day" (a daily quota scaled
//! to a 60 s window) on a virtual clock: each workflow gets at most its
//! share; with `borrow`, a workflow also gets what the others leave idle.

use std::collections::HashMap;
use std::time::Duration;
use tollgate_comply::{BreakerSettings, Next, Priority, Reply, Scheduler};
use tollgate_core::{Attrs, NoProfiles};
use tollgate_store::Engine;

const SEC: u64 = 1_000_000_000;

/// 1,000 calls a "day" (60 s); real time 20%, enrichment 40%, secondary
/// 25%, and 15% left as a buffer.
fn config(borrow: &str) -> tollgate_comply::Upstream {
    let text = format!(
        "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9\"\n\
         [[upstream.limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 1000\n\
         [[upstream.budget]]\nworkflow = \"real-time\"\nshare = \"20%\"\nof = \"daily\"\n\
         [[upstream.budget]]\nworkflow = \"enrichment\"\nshare = \"40%\"\nof = \"daily\"\n{borrow}\n\
         [[upstream.budget]]\nworkflow = \"secondary\"\nshare = \"25%\"\nof = \"daily\"\n"
    );
    let mut config = tollgate_comply::parse_config(&text, &NoProfiles, &|_| None).expect("config");
    config.upstreams.remove(0)
}

/// Calls sent per workflow in the first "day", with `queued` calls of each
/// workflow waiting from the start.
fn one_day(
    upstream: &tollgate_comply::Upstream,
    queued: &[(&str, usize)],
) -> HashMap<String, usize> {
    let mut s = Scheduler::new(
        Engine::new(upstream.policy.clone()),
        5,
        4096,
        BreakerSettings::default(),
        1,
    )
    .with_borrowing(upstream.borrowing());
    let mut workflow_of = HashMap::new();
    let mut seq = 0;
    for &(workflow, n) in queued {
        for _ in 0..n {
            let req = Attrs::new("POST", "/v1/x", &[("tollgate-workflow", workflow)]);
            let mut items = Vec::new();
            upstream.policy.plan(&req, &mut items).expect("plan");
            s.push(seq, Priority::Normal, 0, items);
            workflow_of.insert(seq, workflow.to_string());
            seq += 1;
        }
    }
    let ok = Reply::Status {
        status: 200,
        retry_after: None,
        corrections: Vec::new(),
    };
    let mut sent: HashMap<String, usize> = HashMap::new();
    let mut now = 0;
    loop {
        match s.next(now) {
            Next::Send { seq, .. } => {
                *sent.entry(workflow_of[&seq].clone()).or_default() += 1;
                s.complete(seq, &ok, Duration::ZERO, now);
            }
            Next::Wait(at) if at < 60 * SEC => now = at,
            _ => return sent,
        }
    }
}

fn count(sent: &HashMap<String, usize>, workflow: &str) -> usize {
    sent.get(workflow).copied().unwrap_or(0)
}

#[test]
fn each_workflow_gets_its_share_and_the_buffer_stays_unused() {
    let u = config("");
    assert_eq!(
        u.policy
            .limits
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>(),
        [
            "daily",
            "daily/real-time",
            "daily/enrichment",
            "daily/secondary"
        ]
    );
    let sent = one_day(
        &u,
        &[("real-time", 900), ("enrichment", 900), ("secondary", 900)],
    );
    assert_eq!(count(&sent, "real-time"), 200);
    assert_eq!(count(&sent, "enrichment"), 400);
    assert_eq!(count(&sent, "secondary"), 250);
}

#[test]
fn a_spent_budget_holds_back_only_its_workflow() {
    let u = config("");
    // Enrichment asks for far more than its share; the others still get theirs.
    let sent = one_day(
        &u,
        &[("enrichment", 5000), ("real-time", 100), ("secondary", 100)],
    );
    assert_eq!(count(&sent, "enrichment"), 400);
    assert_eq!(count(&sent, "real-time"), 100);
    assert_eq!(count(&sent, "secondary"), 100);
}

#[test]
fn a_borrowing_workflow_takes_what_the_others_leave_idle() {
    let u = config("borrow = true");
    // Everyone busy: enrichment gets its 40% and the 15% buffer, never
    // another workflow's share.
    let sent = one_day(
        &u,
        &[("real-time", 900), ("enrichment", 900), ("secondary", 900)],
    );
    assert_eq!(count(&sent, "real-time"), 200);
    assert_eq!(count(&sent, "secondary"), 250);
    assert_eq!(count(&sent, "enrichment"), 550);
    // Secondary idle all day: enrichment also takes its 25%.
    let sent = one_day(&u, &[("real-time", 900), ("enrichment", 900)]);
    assert_eq!(count(&sent, "real-time"), 200);
    assert_eq!(count(&sent, "enrichment"), 800);
}
