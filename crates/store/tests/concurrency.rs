//! Many threads, one engine: contention must never admit more than the policy
//! allows. Time is fixed per phase, so every total is exact.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Barrier;
use tollgate_core::{parse, Attrs, Nanos, NoProfiles, Verdict};
use tollgate_store::Engine;

const THREADS: usize = 8;
const SEC: Nanos = 1_000_000_000;
const MINUTE: Nanos = 60 * SEC;
const HOUR: Nanos = 60 * MINUTE;
/// 2026-01-01T00:00:00Z.
const T0: Nanos = 1_767_225_600 * SEC;

fn engine(toml: &str) -> Engine {
    Engine::new(parse(toml, &NoProfiles).expect("a valid policy"))
}

fn tenant(name: &str) -> Attrs {
    Attrs {
        method: "GET".into(),
        path: "/v1/jobs".into(),
        headers: vec![("x-tenant".into(), name.into())],
        ..Attrs::default()
    }
}

fn admitted(engine: &Engine, req: &Attrs, now: Nanos) -> bool {
    let d = engine.check(req, now).expect("well-formed").decision;
    match d.verdict {
        Verdict::Admit { delay: 0 } => true,
        Verdict::Deny { .. } => false,
        other => panic!("unexpected verdict {other:?}"),
    }
}

/// Run `per_thread` on THREADS threads that start together; sum their results.
fn hammer(per_thread: impl Fn(usize) -> u64 + Sync) -> u64 {
    let start = Barrier::new(THREADS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (start, per_thread) = (&start, &per_thread);
                s.spawn(move || {
                    start.wait();
                    per_thread(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker panicked"))
            .sum()
    })
}

fn bucket(capacity: u64, refill: &str) -> String {
    format!(
        "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = {capacity}\nrefill = \"{refill}\"\n"
    )
}

#[test]
fn one_key_one_instant_admits_exactly_the_burst() {
    let e = engine(&bucket(1000, "1/h"));
    let r = tenant("acme");
    let total = hammer(|_| (0..400).filter(|_| admitted(&e, &r, T0)).count() as u64);
    assert_eq!(total, 1000);
    let d = e.check(&r, T0).expect("well-formed").decision;
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            limit: 0,
            retry_after: Some(HOUR)
        }
    );
}

#[test]
fn a_few_keys_one_instant_admit_exactly_each_burst() {
    let e = engine(&bucket(100, "1/h"));
    let keys: Vec<Attrs> = (0..4).map(|k| tenant(&format!("t{k}"))).collect();
    let per_key: Vec<AtomicU64> = (0..keys.len()).map(|_| AtomicU64::new(0)).collect();
    let total = hammer(|thread| {
        let mut n = 0;
        for round in 0..100 {
            for k in 0..keys.len() {
                let k = (k + thread + round) % keys.len();
                if admitted(&e, &keys[k], T0) {
                    per_key[k].fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            }
        }
        n
    });
    assert_eq!(total, 400);
    for (k, n) in per_key.iter().enumerate() {
        assert_eq!(n.load(Ordering::Relaxed), 100, "key t{k}");
    }
}

#[test]
fn advancing_instants_admit_exactly_burst_then_refill() {
    // 100 at once, then 10 a second.
    let e = engine(&bucket(100, "10/s"));
    let r = tenant("acme");
    for phase in 0..6u64 {
        let now = T0 + phase * SEC;
        let total = hammer(|_| (0..50).filter(|_| admitted(&e, &r, now)).count() as u64);
        let expected = if phase == 0 { 100 } else { 10 };
        assert_eq!(total, expected, "phase {phase}");
    }
    // A fraction of a second later: exactly the fraction's refill (2.5 -> 2).
    let now = T0 + 5 * SEC + 250_000_000;
    let total = hammer(|_| (0..50).filter(|_| admitted(&e, &r, now)).count() as u64);
    assert_eq!(total, 2);
}

#[test]
fn several_limits_under_contention_never_over_admit_either() {
    // Per tenant 50 (no refill within the test), all tenants together 120 a minute.
    let policy = format!(
        "{}\n[[limit]]\nname = \"global\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 120\n",
        bucket(50, "1/h")
    );
    let e = engine(&policy);
    let keys: Vec<Attrs> = (0..4).map(|k| tenant(&format!("t{k}"))).collect();
    let per_key: Vec<AtomicU64> = (0..keys.len()).map(|_| AtomicU64::new(0)).collect();
    let total = hammer(|thread| {
        let mut n = 0;
        for round in 0..60 {
            for k in 0..keys.len() {
                let k = (k + thread * 3 + round) % keys.len();
                if admitted(&e, &keys[k], T0) {
                    per_key[k].fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            }
        }
        n
    });
    // The shared window is the binding limit: exactly its quota.
    assert_eq!(total, 120);
    // No tenant beyond its bucket, and denials charged no bucket: in the next
    // window each bucket has exactly 50 minus what it admitted.
    let next = T0 + MINUTE;
    for (k, n) in per_key.iter().enumerate() {
        let n = n.load(Ordering::Relaxed);
        assert!(n <= 50, "tenant t{k} admitted {n}");
        let d = e.check(&keys[k], next).expect("well-formed").decision;
        if n < 50 {
            assert_eq!(d.verdict, Verdict::Admit { delay: 0 });
            assert_eq!(d.outcomes[0].remaining, 50 - n - 1, "tenant t{k}");
        } else {
            assert!(!d.allowed(), "tenant t{k} has an empty bucket");
        }
    }
}

#[test]
fn many_tenants_on_one_shared_window_admit_exactly_its_quota() {
    // Every thread its own tenants (each bucket far from empty); the
    // shared window is the only thing that binds, at one instant.
    let policy = format!(
        "{}\n[[limit]]\nname = \"global\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 500\n",
        bucket(1000, "1/h")
    );
    let e = engine(&policy);
    let total = hammer(|thread| {
        (0..300)
            .filter(|i| admitted(&e, &tenant(&format!("t{thread}-{}", i % 7)), T0 + 5 * SEC))
            .count() as u64
    });
    assert_eq!(total, 500);
}

#[test]
fn concurrency_limit_never_has_more_than_max_in_flight() {
    let e = engine(
        "[[limit]]\nname = \"in-flight\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"concurrency\"\nmax = 5\n",
    );
    let r = tenant("acme");
    let in_flight = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let total = hammer(|_| {
        let mut n = 0;
        for _ in 0..2_000 {
            let c = e.check(&r, T0).expect("well-formed");
            if c.decision.allowed() {
                // Counted after admission, uncounted before release: never
                // more than the engine itself holds.
                let now_in = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now_in, Ordering::SeqCst);
                assert!(now_in <= 5, "{now_in} in flight");
                std::thread::yield_now();
                in_flight.fetch_sub(1, Ordering::SeqCst);
                e.finish(&c, T0, 0);
                n += 1;
            } else {
                assert_eq!(
                    c.decision.verdict,
                    Verdict::Deny {
                        limit: 0,
                        retry_after: None
                    }
                );
            }
        }
        n
    });
    assert!(total > 0);
    assert!(peak.load(Ordering::SeqCst) <= 5);
    // Everything was released: the slots are all free again.
    for left in (0..5).rev() {
        let d = e.check(&r, T0).expect("well-formed").decision;
        assert_eq!(
            (d.verdict, d.outcomes[0].remaining),
            (Verdict::Admit { delay: 0 }, left)
        );
    }
    assert!(!e.check(&r, T0).expect("well-formed").decision.allowed());
}

#[test]
fn max_keys_holds_under_contention() {
    // Every new key stays busy (not at rest), so exactly max_keys of them can
    // be tracked and the rest must be refused, however threads interleave.
    // Flood from all threads at once...
    const MAX: usize = 64;
    let e = engine(&format!(
        "[store]\nmax_keys = {MAX}\n\n{}",
        bucket(5, "1/h")
    ));
    let total = hammer(|thread| {
        (0..500)
            .filter(|i| match e.check(&tenant(&format!("k{thread}-{i}")), T0) {
                Ok(c) => c.decision.allowed(),
                Err(tollgate_store::EngineError::Store(_)) => false,
                Err(other) => panic!("unexpected error {other}"),
            })
            .count() as u64
    });
    assert_eq!((e.store().stats().keys, total), (MAX, MAX as u64));
    // ...and, many times over, race every thread for the last free slot.
    for round in 0..200 {
        let e = engine(&format!("[store]\nmax_keys = 4\n\n{}", bucket(5, "1/h")));
        for k in 0..3 {
            assert!(admitted(&e, &tenant(&format!("pre-{k}")), T0));
        }
        let won = hammer(
            |thread| match e.check(&tenant(&format!("new-{thread}")), T0) {
                Ok(c) => u64::from(c.decision.allowed()),
                Err(_) => 0,
            },
        );
        assert_eq!(
            (e.store().stats().keys, won),
            (4, 1),
            "round {round}: max_keys = 4 but {} keys tracked after {won} threads won the last slot",
            e.store().stats().keys
        );
    }
}

#[test]
fn the_busiest_keys_are_those_with_the_largest_share_of_a_limit_used() {
    let engine = engine(&bucket(10, "10/s"));
    for (name, calls) in [("a", 2), ("b", 9), ("c", 5), ("d", 0)] {
        for _ in 0..calls {
            assert!(admitted(&engine, &tenant(name), T0));
        }
    }
    let busiest = engine.store().busiest(engine.policy(), T0, 2);
    let shown: Vec<(usize, &str, u64, u64)> = busiest
        .iter()
        .map(|(l, k, r, q)| (*l, k.as_str(), *r, *q))
        .collect();
    assert_eq!(shown, vec![(0, "b", 1, 10), (0, "c", 5, 10)]);
    assert_eq!(engine.store().busiest(engine.policy(), T0, 10).len(), 3);
}

#[test]
fn stores_that_share_tables_in_another_order_lock_them_alike_and_admit_exactly_the_quota() {
    // A reload that swaps two kept limits: the new store shares both tables
    // with the old one, in the other order. Requests on both at once must
    // neither deadlock (each store locks the shared shards in one order) nor
    // count twice: together they admit the window's quota exactly.
    let window = "[[limit]]\nname = \"hourly\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 3000\n";
    let burst = bucket(100_000, "1/h");
    let old = engine(&format!("{burst}{window}"));
    let new = old
        .reloaded(
            parse(&format!("{window}{burst}"), &NoProfiles).expect("valid"),
            T0,
        )
        .expect("a reload");
    let req = tenant("acme");
    let admitted_total = hammer(|i| {
        let engine = if i % 2 == 0 { &old } else { &new };
        (0..1_000).filter(|_| admitted(engine, &req, T0)).count() as u64
    });
    assert_eq!(admitted_total, 3000);
    let burst_left = |e: &Engine, slot: usize| {
        e.check(&req, T0).expect("well-formed").decision.outcomes[slot].remaining
    };
    assert_eq!(burst_left(&old, 0), 100_000 - 3000);
    assert_eq!(burst_left(&new, 1), 100_000 - 3000);
}

#[test]
fn a_store_whose_table_a_reload_reshaped_decides_several_limits_with_the_new_parameters() {
    // The bucket's rate lowered by a reload: its table is shared and its
    // keys' debt carried to the new rate. The old store, still deciding
    // requests under both limits, must read that state with the new rate
    // (its own would see the carried debt as ten times larger). Both
    // orders: the reshaped table first, and after a key already found.
    let window = "[[limit]]\nname = \"hourly\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\n";
    for bucket_first in [true, false] {
        let policy = |refill: &str| {
            let bucket = bucket(10, refill);
            if bucket_first {
                format!("{bucket}{window}")
            } else {
                format!("{window}{bucket}")
            }
        };
        let old = engine(&policy("10/s"));
        let req = tenant("acme");
        for _ in 0..10 {
            assert!(admitted(&old, &req, T0));
        }
        let new = old
            .reloaded(parse(&policy("1/s"), &NoProfiles).expect("valid"), T0)
            .expect("a reload");
        // The 10 used are owed at 1/s: 2 s later, 2 are paid back.
        let at = T0 + 2 * SEC;
        let order = if bucket_first {
            "bucket first"
        } else {
            "window first"
        };
        assert!(admitted(&old, &req, at), "{order}: the old store, 1 of 2");
        assert!(admitted(&old, &req, at), "{order}: the old store, 2 of 2");
        assert!(
            !admitted(&old, &req, at),
            "{order}: the old store, none left"
        );
        assert!(
            !admitted(&new, &req, at),
            "{order}: the new store, none left"
        );
        let denied = new.check(&req, at).expect("well-formed").decision;
        let window_at = usize::from(bucket_first);
        assert_eq!(
            denied.outcomes[window_at].remaining,
            100 - 12,
            "{order}: the new store reads the window the old one counted in"
        );
    }
}

/// One request with two keys of one limit (an Envoy rate limit request whose
/// two descriptors name two tenants): one shard may hold both, and its lock
/// is taken once. Decided all or nothing, on whichever shards they land.
#[test]
fn two_keys_of_one_limit_in_one_request_are_decided_together() {
    use tollgate_core::request::encode_key;
    use tollgate_core::Item;
    use tollgate_store::MemoryStore;
    let policy = parse(&bucket(2, "1/h"), &NoProfiles).expect("policy");
    let item = |key: &str| Item {
        limit: 0,
        class: 0,
        key: encode_key(&[key]),
        cost: 1,
        charge: 1,
    };
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let store = MemoryStore::new(&policy);
        // 200 pairs: with 64 shards a table, some pairs share one.
        for n in 0..200 {
            let (a, b) = (format!("a{n}"), format!("b{n}"));
            let both = [item(&a), item(&b)];
            // b's bucket emptied alone first: the pair is refused and a
            // is charged nothing.
            for _ in 0..2 {
                let d = store.decide(&policy, &both[1..], 0).expect("decide");
                assert!(d.allowed());
            }
            let d = store.decide(&policy, &both, 0).expect("decide");
            assert!(!d.allowed(), "pair {n}");
            assert_eq!(store.usage(&policy, &both[0], 0).remaining, 2, "pair {n}");
            // A fresh pair is admitted, both charged.
            let (c, e) = (format!("c{n}"), format!("e{n}"));
            let fresh = [item(&c), item(&e)];
            assert!(store.decide(&policy, &fresh, 0).expect("decide").allowed());
            assert_eq!(store.usage(&policy, &fresh[0], 0).remaining, 1);
            assert_eq!(store.usage(&policy, &fresh[1], 0).remaining, 1);
        }
        done.send(()).expect("send");
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the decisions finish (a shard locked twice would hang them)");
}
