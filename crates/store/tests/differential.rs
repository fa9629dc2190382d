//! The Redis store held to the memory store by property: random policies
//! (every algorithm, one to three limits a request, holds, shadow limits,
//! costs from a header, latency budgets, a zone with DST) and random traffic
//! (keys, costs, instants nanoseconds to days apart, completions with their
//! latency, and reloads that change the limits' numbers: quotas, capacities,
//! rates, tiers' quotas, so each store carries its counts over) get the same
//! decisions from both, outcome for outcome. A failure shrinks to a small
//! policy and a short trace.
//!
//! `TOLLGATE_DIFF_CASES` sets the number of cases (24 by default, for CI;
//! `bench/fuzz.sh`-style longer runs set more).

use proptest::prelude::*;
use tollgate_core::policy::RedisSettings;
use tollgate_core::{parse, Attrs, Nanos, NoProfiles, Verdict};
use tollgate_store::redis::TimeSource;
use tollgate_store::{Checked, Engine};

const SEC: Nanos = 1_000_000_000;
/// 2026-03-08T05:00:00Z: an hour before New York's clocks spring forward.
const T0: Nanos = 1_772_946_000 * SEC;

fn cases() -> u32 {
    std::env::var("TOLLGATE_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

/// One `[[limit]]` entry's text, without its name.
fn limit() -> impl Strategy<Value = String> {
    let hold = prop_oneof![Just(""), Just("hold = \"2s\"\n"), Just("hold = \"40s\"\n")];
    let cost = prop_oneof![Just(""), Just("cost = { header = \"x-cost\" }\n")];
    let key = prop_oneof![Just("key = [\"header:x-tenant\"]\n"), Just("")];
    let mode = prop_oneof![9 => Just(""), 1 => Just("mode = \"shadow\"\n")];
    let algorithm = prop_oneof![
        (1u64..10, 1u64..6, prop_oneof![Just("s"), Just("10s"), Just("1m")]).prop_map(
            |(capacity, n, per)| {
                format!("algorithm = \"token_bucket\"\ncapacity = {capacity}\nrefill = \"{n}/{per}\"\n")
            }
        ),
        (1u64..10, 1u64..6).prop_map(|(capacity, n)| format!(
            "algorithm = \"leaky_bucket\"\ncapacity = {capacity}\nrefill = \"{n}/10s\"\n"
        )),
        (
            1u64..9,
            prop_oneof![Just("10s"), Just("1m"), Just("1h"), Just("1d")],
            prop_oneof![3 => Just(""), 1 => Just("timezone = \"America/New_York\"\n")]
        )
            .prop_map(|(quota, every, zone)| format!(
                "algorithm = \"fixed_window\"\nevery = \"{every}\"\nquota = {quota}\n{zone}"
            )),
        (1u64..9, prop_oneof![Just("10s"), Just("1m")], 1u32..9).prop_map(
            |(quota, every, segments)| format!(
                "algorithm = \"sliding_window\"\nevery = \"{every}\"\nsegments = {segments}\nquota = {quota}\n"
            )
        ),
        (1u64..5, 1u64..5, 1u64..5, 1usize..4).prop_map(|(a, b, c, n)| {
            let tiers = [("1m", a), ("1h", b), ("1d", c)][..n]
                .iter()
                .map(|(every, quota)| format!("{{ every = \"{every}\", quota = {quota} }}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("algorithm = \"tiered\"\ntiers = [{tiers}]\n")
        }),
        (1u64..4).prop_map(|max| format!("algorithm = \"concurrency\"\nmax = {max}\n")),
        (1u64..6, prop_oneof![Just("fixed_window"), Just("sliding_window")]).prop_map(
            |(secs, algorithm)| format!(
                "algorithm = \"{algorithm}\"\nevery = \"10s\"\nquota = \"{secs}s\"\ncost = \"latency\"\n"
            )
        ),
    ];
    (algorithm, hold, cost, key, mode).prop_map(|(algorithm, hold, cost, key, mode)| {
        // A latency budget has its own cost.
        let cost = if algorithm.contains("latency") {
            ""
        } else {
            cost
        };
        format!("{key}{algorithm}{hold}{cost}{mode}")
    })
}

fn policy_text() -> impl Strategy<Value = String> {
    prop::collection::vec(limit(), 1..4).prop_map(|limits| {
        limits
            .iter()
            .enumerate()
            .map(|(i, l)| format!("[[limit]]\nname = \"l{i}\"\n{l}\n"))
            .collect()
    })
}

/// `text` with every quota, capacity, rate and maximum changed by `by`
/// (1 to 8 each): what a reload that re-quotas every limit reads.
fn requota(text: &str, by: u64) -> String {
    let mut out = text.to_string();
    for field in ["quota = ", "capacity = ", "refill = \"", "max = "] {
        let (mut done, mut rest) = (String::new(), out.as_str());
        while let Some(at) = rest.find(field) {
            let (head, tail) = rest.split_at(at + field.len());
            done.push_str(head);
            let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if let Ok(n) = tail[..digits].parse::<u64>() {
                done.push_str(&((n + by) % 8 + 1).to_string());
            }
            rest = &tail[digits..];
        }
        done.push_str(rest);
        out = done;
    }
    out
}

/// One step of traffic: time passes, then a request, a completion, or a
/// reload that re-quotas every limit (and the next one back).
#[derive(Debug, Clone)]
enum Step {
    Request {
        after: Nanos,
        tenant: u8,
        cost: u8,
    },
    Complete {
        after: Nanos,
        which: usize,
        latency_us: u64,
    },
    Reload {
        after: Nanos,
    },
}

fn after() -> impl Strategy<Value = Nanos> {
    prop_oneof![
        1 => 0..1_000u64,
        5 => 0..2 * SEC,
        3 => 0..40 * SEC,
        1 => 0..86_400 * SEC,
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => (after(), 0u8..2, 1u8..4).prop_map(|(after, tenant, cost)| Step::Request { after, tenant, cost }),
        1 => (after(), any::<usize>(), 0..3_000_000u64)
            .prop_map(|(after, which, latency_us)| Step::Complete { after, which, latency_us }),
        1 => after().prop_map(|after| Step::Reload { after }),
    ];
    prop::collection::vec(step, 1..60)
}

fn engines(text: &str) -> (Engine, Engine) {
    let memory = Engine::new(parse(text, &NoProfiles).expect("a valid policy"));
    let mut policy = parse(text, &NoProfiles).expect("a valid policy");
    policy.store.redis = Some(RedisSettings {
        prefix: tollgate_testkit::unique_prefix("differential"),
        timeout: 5 * SEC,
        pool: 1,
        // Every decision from Redis, so each is compared.
        remember_denials: false,
        ..RedisSettings::new(tollgate_testkit::redis_url())
    });
    let shared = Engine::open_with(policy, "differential", TimeSource::Caller)
        .expect("a policy the Redis store can run");
    (memory, shared)
}

/// A request of `tenant` decided by both stores at `now`: the same decision;
/// an admitted one is kept open for a later completion.
fn compare(
    (memory, shared): (&Engine, &Engine),
    tenant: u8,
    cost: u8,
    now: Nanos,
    open: &mut Vec<(Checked, Checked)>,
    step: usize,
) -> Result<(), TestCaseError> {
    let r = Attrs {
        method: "GET".into(),
        path: "/v1/x".into(),
        headers: vec![
            ("x-tenant".into(), ["a", "b"][usize::from(tenant)].into()),
            ("x-cost".into(), cost.to_string()),
        ],
        ..Attrs::default()
    };
    match (memory.check(&r, now), shared.check(&r, now)) {
        (Ok(m), Ok(d)) => {
            prop_assert!(!d.local, "decided in Redis");
            prop_assert_eq!(
                &m.decision,
                &d.decision,
                "step {} at T0+{}ns",
                step,
                now - T0
            );
            if m.decision.allowed() && !matches!(m.decision.verdict, Verdict::Never { .. }) {
                open.push((m, d));
            }
        }
        (m, d) => prop_assert_eq!(m.map(|c| c.decision), d.map(|c| c.decision)),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn redis_decides_as_memory_for_random_policies_and_traffic(
        text in policy_text(),
        by in 1u64..8,
        steps in steps(),
    ) {
        let (mut memory, mut shared) = engines(&text);
        let texts = [text.clone(), requota(&text, by)];
        let mut now = T0;
        let mut open: Vec<(Checked, Checked)> = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Request { after, tenant, cost } => {
                    now += after;
                    compare((&memory, &shared), *tenant, *cost, now, &mut open, i)?;
                }
                Step::Complete { after, which, latency_us } => {
                    now += after;
                    if !open.is_empty() {
                        let (m, d) = open.swap_remove(which % open.len());
                        memory.finish(&m, now, *latency_us);
                        shared.finish(&d, now, *latency_us);
                    }
                }
                Step::Reload { after } => {
                    now += after;
                    let text = if memory.policy().limits[0].fingerprint
                        == parse(&texts[0], &NoProfiles).expect("valid").limits[0].fingerprint
                    {
                        &texts[1]
                    } else {
                        &texts[0]
                    };
                    let policy = parse(text, &NoProfiles).expect("a valid policy");
                    let mut on_redis = policy.clone();
                    on_redis.store.redis = shared.policy().store.redis.clone();
                    // Requests still open finish on the engines they started on.
                    memory = memory.reloaded(policy, now).expect("a reload");
                    shared = shared.reloaded(on_redis, now).expect("a reload");
                    // The memory store carries every key at the reload, Redis
                    // each key when it next reads it: a bucket untouched
                    // across two reloads is carried once there, twice here,
                    // and the two may differ by a rounding (a nanosecond of
                    // debt). A request of each tenant now carries every key
                    // on both.
                    for tenant in 0..2 {
                        compare((&memory, &shared), tenant, 1, now, &mut open, i)?;
                    }
                }
            }
        }
    }
}

#[test]
fn requota_changes_the_numbers_and_nothing_else() {
    let text = "[[limit]]\nname = \"l0\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 3\nrefill = \"2/10s\"\nhold = \"2s\"\n[[limit]]\nname = \"l1\"\nalgorithm = \"tiered\"\ntiers = [{ every = \"1m\", quota = 1 }, { every = \"1h\", quota = 4 }]\n";
    assert_eq!(
        requota(text, 2),
        text.replace("capacity = 3", "capacity = 6")
            .replace("refill = \"2/", "refill = \"5/")
            .replace("quota = 4 }", "quota = 7 }")
            .replace("quota = 1 ", "quota = 4 ")
    );
}
