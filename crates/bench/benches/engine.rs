//! tollgate side by side with governor 0.10, in one binary, same quotas.
//!
//! Every timed call reads a real clock: governor its default `QuantaClock`,
//! tollgate `SystemClock::now()` (also quanta's TSC), so both pay for time.
//!
//! Groups (criterion ids are `group/function`):
//! - `a_direct`: one key, one thread. governor's direct limiter vs
//!   `DirectLimiter::check`, plus `MemoryStore::decide` and the full
//!   `Engine::check_into` path for one key.
//! - `b_keyed_10k`: 10,000 keys, one thread. governor `check_key` (DashMap)
//!   vs `MemoryStore::decide` with one token bucket.
//! - `c_keyed_10k_2threads`: the same over 2 threads sharing one limiter; the
//!   time is wall time per decision over both threads (1e9 / it = decisions/s).
//! - `d_algorithms_10k`: every algorithm keyed over 10,000 keys, and a request
//!   carrying 3 limits (token bucket + fixed window + sliding window).
//!
//! Quotas are large so nearly every call is admitted: both sides do the same
//! work (a denial is a different, usually cheaper, path).
//!
//! `bench/engine.sh` runs this and prints the ratios.

use criterion::{criterion_group, criterion_main, Criterion};
use governor::{Quota, RateLimiter};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};
use tollgate_core::algo::gcra::GcraParams;
use tollgate_core::{parse, Attrs, Clock, Item, NoProfiles, Policy};
use tollgate_store::{DirectLimiter, Engine, MemoryStore, SystemClock};

const KEYS: usize = 10_000;
/// Keyed quota: 1,000,000/s per key with a burst of 1,000. A key is revisited
/// every 10,000 calls (hundreds of microseconds), so it is never short.
const KEYED_RATE: u32 = 1_000_000;
const BURST: u32 = 1_000;
/// One-key quota: 1e9/s (a 1 ns interval), so even back-to-back calls pass.
const DIRECT_RATE: u32 = 1_000_000_000;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

fn key_name(i: usize) -> String {
    format!("tenant-{i:06}")
}

fn policy(limits: &str) -> Policy {
    let text = format!("[store]\nmax_keys = 10000000\n\n{limits}");
    parse(&text, &NoProfiles).expect("bench policy parses")
}

const TOKEN_BUCKET: &str = r#"
[[limit]]
name = "tb"
key = ["header:x-tenant-id"]
algorithm = "token_bucket"
capacity = 1000
refill = "1000000/s"
"#;

const LEAKY_BUCKET: &str = r#"
[[limit]]
name = "lb"
key = ["header:x-tenant-id"]
algorithm = "leaky_bucket"
capacity = 1000
refill = "1000000/s"
"#;

const FIXED_WINDOW: &str = r#"
[[limit]]
name = "fw"
key = ["header:x-tenant-id"]
algorithm = "fixed_window"
every = "1m"
quota = 1000000000
"#;

const FIXED_WINDOW_NAMED_TZ: &str = r#"
[[limit]]
name = "fw"
key = ["header:x-tenant-id"]
algorithm = "fixed_window"
every = "1m"
quota = 1000000000
timezone = "Europe/Amsterdam"
"#;

const SLIDING_WINDOW: &str = r#"
[[limit]]
name = "sw"
key = ["header:x-tenant-id"]
algorithm = "sliding_window"
every = "1m"
quota = 1000000000
"#;

const TIERED: &str = r#"
[[limit]]
name = "tiers"
key = ["header:x-tenant-id"]
algorithm = "tiered"
tiers = [ { every = "1m", quota = 1000000000 }, { every = "1h", quota = 1000000000 }, { every = "1d", quota = 1000000000 } ]
"#;

const CONCURRENCY: &str = r#"
[[limit]]
name = "inflight"
key = ["header:x-tenant-id"]
algorithm = "concurrency"
max = 1000
"#;

/// Items for `KEYS` keys of a policy whose every limit is keyed by tenant:
/// `items[k]` holds one `Item` per limit.
fn items_for(policy: &Policy) -> Vec<Vec<Item>> {
    (0..KEYS)
        .map(|k| {
            let mut items = Vec::new();
            policy.plan(&attrs(&key_name(k)), &mut items).expect("plan");
            assert_eq!(items.len(), policy.limits.len());
            items
        })
        .collect()
}

fn attrs(tenant: &str) -> Attrs {
    Attrs {
        method: "GET".into(),
        path: "/v1/things".into(),
        headers: vec![("x-tenant-id".into(), tenant.into())],
        ..Attrs::default()
    }
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
}

fn direct(c: &mut Criterion) {
    let mut g = c.benchmark_group("a_direct");

    let gov = RateLimiter::direct(Quota::per_second(nz(DIRECT_RATE)).allow_burst(nz(BURST)));
    g.bench_function("governor", |b| b.iter(|| black_box(gov.check().is_ok())));

    let clock = SystemClock::new();
    let tg = DirectLimiter::new(GcraParams::new(
        u64::from(BURST),
        1_000_000_000 / u64::from(DIRECT_RATE),
    ));
    g.bench_function("tollgate", |b| {
        b.iter(|| black_box(tg.check(clock.now()).is_ok()))
    });

    // The keyed store for one hot key: decide over a prebuilt item.
    let tb_one = policy(&TOKEN_BUCKET.replace("1000000/s", "1000000000/s"));
    let store = MemoryStore::new(&tb_one);
    let one = Item {
        limit: 0,
        class: 0,
        key: "tenant-000001".into(),
        cost: 1,
        charge: 1,
    };
    g.bench_function("tollgate_store", |b| {
        b.iter(|| {
            let d = store
                .decide(&tb_one, std::slice::from_ref(&one), clock.now())
                .expect("tracked");
            black_box(d.allowed())
        })
    });

    // The whole engine for one key: plan (match, build the key, cost) + decide.
    let engine = Engine::new(policy(&TOKEN_BUCKET.replace("1000000/s", "1000000000/s")));
    let req = attrs("tenant-000001");
    let mut items = Vec::with_capacity(1);
    g.bench_function("tollgate_engine", |b| {
        b.iter(|| {
            let d = engine
                .check_into(&req, clock.now(), &mut items)
                .expect("tracked");
            black_box(d.allowed())
        })
    });

    // Denial path, for reference: 1/s with a burst of 1, exhausted first.
    let gov_deny = RateLimiter::direct(Quota::per_second(nz(1)));
    let _ = gov_deny.check();
    g.bench_function("governor_deny", |b| {
        b.iter(|| black_box(gov_deny.check().is_ok()))
    });
    let tg_deny = DirectLimiter::new(GcraParams::new(1, 1_000_000_000));
    let _ = tg_deny.check(clock.now());
    g.bench_function("tollgate_deny", |b| {
        b.iter(|| black_box(tg_deny.check(clock.now()).is_ok()))
    });
    g.finish();
}

fn keyed(c: &mut Criterion) {
    let mut g = c.benchmark_group("b_keyed_10k");
    let keys: Vec<String> = (0..KEYS).map(key_name).collect();

    let gov = RateLimiter::keyed(Quota::per_second(nz(KEYED_RATE)).allow_burst(nz(BURST)));
    for k in &keys {
        let _ = gov.check_key(k);
    }
    let mut i = 0;
    g.bench_function("governor", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(gov.check_key(&keys[i]).is_ok())
        })
    });

    let clock = SystemClock::new();
    let policy = policy(TOKEN_BUCKET);
    let store = MemoryStore::new(&policy);
    let items = items_for(&policy);
    for it in &items {
        let _ = store.decide(&policy, it, clock.now());
    }
    let mut i = 0;
    g.bench_function("tollgate", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let d = store
                .decide(&policy, &items[i], clock.now())
                .expect("tracked");
            black_box(d.allowed())
        })
    });

    // The full engine keyed: plan builds the key from the header each call.
    let engine = Engine::new(policy.clone());
    let reqs: Vec<Attrs> = keys.iter().map(|k| attrs(k)).collect();
    let mut buf = Vec::with_capacity(1);
    let mut i = 0;
    g.bench_function("tollgate_engine", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let d = engine
                .check_into(&reqs[i], clock.now(), &mut buf)
                .expect("tracked");
            black_box(d.allowed())
        })
    });
    g.finish();
}

/// Run `iters` calls of `f(thread, i)` split over 2 threads; wall time.
fn two_threads(iters: u64, f: impl Fn(usize, usize) + Sync) -> Duration {
    let per = iters.div_ceil(2);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            let f = &f;
            s.spawn(move || {
                // The threads start half the key space apart.
                let mut i = t * KEYS / 2;
                for _ in 0..per {
                    i += 1;
                    if i == KEYS {
                        i = 0;
                    }
                    f(t, i);
                }
            });
        }
    });
    start.elapsed().mul_f64(iters as f64 / (2 * per) as f64)
}

fn keyed_two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("c_keyed_10k_2threads");
    let keys: Vec<String> = (0..KEYS).map(key_name).collect();

    let gov = RateLimiter::keyed(Quota::per_second(nz(KEYED_RATE)).allow_burst(nz(BURST)));
    for k in &keys {
        let _ = gov.check_key(k);
    }
    g.bench_function("governor", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_, i| {
                black_box(gov.check_key(&keys[i]).is_ok());
            })
        })
    });

    let clock = SystemClock::new();
    let policy = policy(TOKEN_BUCKET);
    let store = MemoryStore::new(&policy);
    let items = items_for(&policy);
    for it in &items {
        let _ = store.decide(&policy, it, clock.now());
    }
    g.bench_function("tollgate", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_, i| {
                let d = store
                    .decide(&policy, &items[i], clock.now())
                    .expect("tracked");
                black_box(d.allowed());
            })
        })
    });
    g.finish();
}

fn algorithms(c: &mut Criterion) {
    let mut g = c.benchmark_group("d_algorithms_10k");
    let clock = SystemClock::new();

    let cases: [(&str, String); 8] = [
        ("token_bucket", TOKEN_BUCKET.to_string()),
        ("leaky_bucket", LEAKY_BUCKET.to_string()),
        ("fixed_window", FIXED_WINDOW.to_string()),
        ("fixed_window_amsterdam", FIXED_WINDOW_NAMED_TZ.to_string()),
        ("sliding_window", SLIDING_WINDOW.to_string()),
        ("tiered", TIERED.to_string()),
        ("concurrency", CONCURRENCY.to_string()),
        (
            "three_limits",
            format!("{TOKEN_BUCKET}{FIXED_WINDOW}{SLIDING_WINDOW}"),
        ),
    ];
    for (name, limits) in cases {
        let policy = policy(&limits);
        let store = MemoryStore::new(&policy);
        let items = items_for(&policy);
        let concurrency = name == "concurrency";
        for it in &items {
            let _ = store.decide(&policy, it, clock.now());
            if concurrency {
                store.finish(&policy, it, clock.now(), 0);
            }
        }
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % KEYS;
                let now = clock.now();
                let d = store.decide(&policy, &items[i], now).expect("tracked");
                if concurrency {
                    // acquire + release: one request's whole life.
                    store.finish(&policy, &items[i], now, 0);
                }
                black_box(d.allowed())
            })
        });
        // Same work, nothing denied: the comparison is only fair if so.
        let sample = store
            .decide(&policy, &items[0], clock.now())
            .expect("tracked");
        assert!(sample.allowed(), "{name}: bench quota too small");
        if concurrency {
            store.finish(&policy, &items[0], clock.now(), 0);
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = direct, keyed, keyed_two_threads, algorithms
}
criterion_main!(benches);
