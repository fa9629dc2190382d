//! Leased quota on a real redis-server: processes ("nodes") that share one
//! Redis take slices of a hot key's quota and decide on them locally. Time
//! is the caller's (`TimeSource::Caller`), so every count is exact.

use tollgate_core::policy::RedisSettings;
use tollgate_core::{parse, Attrs, Nanos, NoProfiles, Policy, Verdict};
use tollgate_store::redis::TimeSource;
use tollgate_store::Engine;

const SEC: Nanos = 1_000_000_000;
/// 2026-01-01T00:10:00Z: ten minutes into an hour.
const T0: Nanos = 1_767_226_200 * SEC;

fn policy(limit: &str, prefix: &str) -> Policy {
    let mut policy = parse(
        &format!(
            "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[[limit]]\nname = \"hot\"\nkey = [\"header:x-tenant\"]\n{limit}",
            tollgate_testkit::redis_url()
        ),
        &NoProfiles,
    )
    .expect("a valid policy");
    policy.store.redis = Some(RedisSettings {
        prefix: prefix.to_string(),
        timeout: 5 * SEC,
        pool: 1,
        remember_denials: false,
        ..RedisSettings::new(tollgate_testkit::redis_url())
    });
    policy
}

/// `nodes` engines on one Redis and one key prefix, as a fleet's processes.
fn fleet(limit: &str, nodes: usize) -> Vec<Engine> {
    let prefix = tollgate_testkit::unique_prefix("leases");
    (0..nodes)
        .map(|_| {
            Engine::open_with(policy(limit, &prefix), "gateway", TimeSource::Caller)
                .expect("a policy the Redis store can run")
        })
        .collect()
}

fn hot() -> Attrs {
    Attrs {
        method: "GET".into(),
        path: "/v1/jobs".into(),
        headers: vec![("x-tenant".into(), "acme".into())],
        ..Attrs::default()
    }
}

async fn admitted(node: &Engine, now: Nanos) -> bool {
    let checked = node.check_async(&hot(), now).await.expect("decided");
    assert!(!checked.local, "decided with Redis, not by a fail mode");
    match checked.decision.verdict {
        Verdict::Admit { delay: 0 } => true,
        Verdict::Deny { .. } => false,
        other => panic!("unexpected verdict {other:?}"),
    }
}

/// Requests at `now` until one is denied; how many were admitted.
async fn until_denied(node: &Engine, now: Nanos) -> u64 {
    let mut n = 0;
    while admitted(node, now).await {
        n += 1;
        assert!(n < 1000, "never denied");
    }
    n
}

const LIMITS: [(&str, &str); 3] = [
    (
        "token bucket",
        "algorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"1/h\"\nlease = { max = 10, ttl = \"1s\" }\n",
    ),
    (
        "fixed window",
        "algorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 20\nlease = { max = 10, ttl = \"1s\" }\n",
    ),
    (
        "sliding window",
        "algorithm = \"sliding_window\"\nevery = \"1h\"\nquota = 20\nlease = { max = 10, ttl = \"1s\" }\n",
    ),
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Node A takes a slice of 10 and uses 1; node B gets the other 10 and no
/// more; once A's slice has expired, A's next call gives its 9 unused units
/// back and takes them again: 20 in all, exactly the quota.
#[test]
fn unused_units_of_a_slice_go_back_to_the_key() {
    runtime().block_on(async {
        for (name, limit) in LIMITS {
            let nodes = fleet(limit, 2);
            let (a, b) = (&nodes[0], &nodes[1]);
            assert!(admitted(a, T0).await, "{name}: A's first request");
            assert_eq!(
                until_denied(b, T0).await,
                10,
                "{name}: B gets what A did not take"
            );
            let later = T0 + 2 * SEC;
            assert_eq!(
                until_denied(a, later).await,
                9,
                "{name}: A's unused units, given back and taken again"
            );
            assert_eq!(until_denied(b, later).await, 0, "{name}: nothing is left");
            let leased =
                a.health().map_or(0, |h| h.leased()) + b.health().map_or(0, |h| h.leased());
            assert!(
                leased >= 15,
                "{name}: most requests were decided on slices ({leased})"
            );
        }
    });
}

/// A node's unused units go back without another request of the key: at
/// shutdown (all of them) and once a slice is no longer usable (the
/// gateway's periodic upkeep), so another node can use them.
#[test]
fn slices_go_back_at_shutdown_and_once_unusable() {
    runtime().block_on(async {
        for (name, limit) in LIMITS {
            let nodes = fleet(limit, 2);
            let (a, b) = (&nodes[0], &nodes[1]);
            assert!(
                admitted(a, T0).await,
                "{name}: A takes a slice of 10 and uses 1"
            );
            assert_eq!(
                a.give_back_leases(T0, false).await,
                0,
                "{name}: still usable, kept"
            );
            assert_eq!(
                a.give_back_leases(T0, true).await,
                1,
                "{name}: shutting down"
            );
            assert_eq!(
                a.give_back_leases(T0, true).await,
                0,
                "{name}: nothing left"
            );
            assert_eq!(until_denied(b, T0).await, 19, "{name}: all but A's one");

            let nodes = fleet(limit, 2);
            let (a, b) = (&nodes[0], &nodes[1]);
            assert!(admitted(a, T0).await);
            let later = T0 + 2 * SEC;
            assert_eq!(
                a.give_back_leases(later, false).await,
                1,
                "{name}: past its ttl"
            );
            assert_eq!(until_denied(b, later).await, 19, "{name}: all but A's one");
        }
    });
}

/// A slice replaced by one taken ahead of need is given back too: node A
/// uses 8 of its first 10, which takes the next 10 ahead; the 2 left of the
/// first and the 10 of the second go back in one call; B then gets all but
/// A's 8.
#[test]
fn a_slice_replaced_ahead_of_need_is_given_back_too() {
    runtime().block_on(async {
        for (name, limit) in LIMITS {
            let nodes = fleet(limit, 2);
            let (a, b) = (&nodes[0], &nodes[1]);
            for _ in 0..8 {
                assert!(admitted(a, T0).await, "{name}");
            }
            assert_eq!(until_denied(b, T0).await, 0, "{name}: A holds the rest");
            assert_eq!(
                a.give_back_leases(T0, true).await,
                1,
                "{name}: one key, two slices"
            );
            assert_eq!(until_denied(b, T0).await, 12, "{name}: all but A's 8");
        }
    });
}

/// Three nodes take turns on one hot key, many requests per instant, over
/// several windows: per window, admissions never exceed the quota plus the
/// slices outstanding at once (3 nodes x 1.25 x max 10), and a fixed window
/// admits exactly its quota (a slice never outlives its window).
#[test]
fn three_nodes_stay_within_the_quota_plus_the_outstanding_slices() {
    runtime().block_on(async {
        for (name, limit) in [
            (
                "fixed window",
                "algorithm = \"fixed_window\"\nevery = \"1s\"\nquota = 100\nlease = { max = 10, ttl = \"300ms\" }\n",
            ),
            (
                "token bucket",
                "algorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"100/s\"\nlease = { max = 10, ttl = \"300ms\" }\n",
            ),
            (
                "sliding window",
                "algorithm = \"sliding_window\"\nevery = \"1s\"\nquota = 100\nlease = { max = 10, ttl = \"300ms\" }\n",
            ),
        ] {
            let nodes = fleet(limit, 3);
            let start = T0 - T0 % SEC;
            let mut per_second = vec![0u64; 5];
            let mut leased = 0;
            // 5 s, a step every 10 ms, 4 requests per node per step: 1,200
            // requests a second against a quota of 100 a second.
            for step in 0..500u64 {
                let now = start + step * 10_000_000;
                for node in &nodes {
                    for _ in 0..4 {
                        if admitted(node, now).await {
                            per_second[(step / 100) as usize] += 1;
                        }
                    }
                }
            }
            for node in &nodes {
                leased += node.health().map_or(0, |h| h.leased());
            }
            // Per node, a slice of 10 and the last quarter of the one it replaced.
            let slack = 3 * (10 + 10 / 4);
            let bound = 100 + slack;
            for (s, &n) in per_second.iter().enumerate() {
                // A bucket admits its capacity and then its refill: 100 + 100 in the first second.
                let allowed = if name == "token bucket" && s == 0 { 200 } else { 100 };
                assert!(n <= allowed + slack, "{name}: second {s}: {n} admitted, bound {bound}");
                if name == "fixed window" {
                    assert_eq!(n, 100, "{name}: second {s}: a window admits exactly its quota");
                } else {
                    assert!(n >= allowed - slack, "{name}: second {s}: only {n} admitted");
                }
            }
            // (At saturation a bucket has only its refill to lend: slices
            // of one unit, most decisions on Redis. Leases pay under the limit.)
            println!("{name}: admitted per second {per_second:?}, {leased} of them from slices");
        }
    });
}

/// A hot key under its limit: after each node's first call every request is
/// decided on a slice, the next slice taken ahead of need.
#[test]
fn a_hot_key_under_its_limit_is_decided_on_slices() {
    runtime().block_on(async {
        for (name, limit) in [
            (
                "fixed window",
                "algorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100000\n",
            ),
            (
                "token bucket",
                "algorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"1000/s\"\n",
            ),
            (
                "sliding window",
                "algorithm = \"sliding_window\"\nevery = \"1h\"\nquota = 100000\n",
            ),
        ] {
            let nodes = fleet(&format!("{limit}lease = {{ max = 10, ttl = \"1s\" }}\n"), 3);
            for step in 0..100u64 {
                for node in &nodes {
                    for _ in 0..3 {
                        assert!(admitted(node, T0 + step * 10_000_000).await, "{name}");
                    }
                }
            }
            let leased: u64 = nodes
                .iter()
                .map(|n| n.health().map_or(0, |h| h.leased()))
                .sum();
            // Each node's first request takes its first slice; from then on
            // the request that leaves a slice at a quarter takes the next.
            assert_eq!(leased, 900 - 3, "{name}: every later request on a slice");
        }
    });
}

/// A request that also meets a limit without `lease` is decided on Redis,
/// all of it: no slice is taken, the leased limit counts each request once.
#[test]
fn a_request_that_also_meets_an_unleased_limit_takes_no_slice() {
    runtime().block_on(async {
        let nodes = fleet(
            "algorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\nlease = { max = 10, ttl = \"1s\" }\n\n[[limit]]\nname = \"cap\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 5\n",
            1,
        );
        let node = &nodes[0];
        assert_eq!(until_denied(node, T0).await, 5, "the unleased limit's quota");
        let mut items = Vec::new();
        node.policy().plan(&hot(), &mut items).expect("planned");
        assert_eq!(node.usage(&items[0], T0).remaining, 95, "five counted, no slice");
        assert_eq!(node.health().map(|h| h.leased()), Some(0));
    });
}

/// The same traffic without `lease`: exactly the quota per window, every
/// decision a round trip.
#[test]
fn without_a_lease_every_decision_is_made_on_redis() {
    runtime().block_on(async {
        let nodes = fleet(
            "algorithm = \"fixed_window\"\nevery = \"1s\"\nquota = 100\n",
            3,
        );
        let start = T0 - T0 % SEC;
        let mut per_second = [0u64; 2];
        for step in 0..200u64 {
            let now = start + step * 10_000_000;
            for node in &nodes {
                for _ in 0..4 {
                    if admitted(node, now).await {
                        per_second[(step / 100) as usize] += 1;
                    }
                }
            }
        }
        assert_eq!(per_second, [100, 100]);
        assert!(nodes
            .iter()
            .all(|n| n.health().is_some_and(|h| h.leased() == 0)));
    });
}
