//! Memory per tracked token-bucket key: tollgate's `MemoryStore` vs governor's
//! keyed limiter (default DashMap store), 1,000,000 distinct short keys
//! ("tenant-0000123"), each inserted by one admitted decision; also at 100k and
//! 500k keys (a hash table's slack depends on where it is between resizes) and
//! with 36-byte UUID-like keys.
//!
//! Two figures per store:
//! - heap bytes requested (a counting wrapper around the system allocator:
//!   allocated - freed, reallocations included), net of the key strings the
//!   bench itself keeps;
//! - resident set growth (VmRSS from /proc/self/status), which includes the
//!   allocator's own overhead (glibc rounds a 13-byte string up to a 32-byte chunk).
//!
//! Run: `cargo bench -p tollgate-bench --bench memory` (see bench/engine.sh).

use governor::{Quota, RateLimiter};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::hint::black_box;
use std::num::NonZeroU32;
use tollgate_core::{parse, Clock, Item, NoProfiles};
use tollgate_store::{MemoryStore, SystemClock};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const TOKEN_BUCKET: &str = r#"
[store]
max_keys = 10000000

[[limit]]
name = "tenant"
key = ["header:x-tenant-id"]
algorithm = "token_bucket"
capacity = 60
refill = "1/s"
"#;

/// Short keys ("tenant-0000123", 14 bytes: inline in a `CompactString`) or
/// UUID-like ones (36 bytes: on the heap in both stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    Short,
    Uuid,
}

fn key_name(keys: Keys, i: usize) -> String {
    match keys {
        Keys::Short => format!("tenant-{i:07}"),
        Keys::Uuid => format!("3f2c9a7e-51b0-4d8e-9c1a-{i:012}"),
    }
}

fn net(region: &Region<'_, System>) -> i64 {
    let s = region.change();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}

/// Resident set size in bytes, or 0 where /proc is not available.
fn rss() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    keys: usize,
    heap: i64,
    rss: i64,
}

impl Measure {
    fn per_key(&self) -> (f64, f64) {
        (
            self.heap as f64 / self.keys as f64,
            self.rss as f64 / self.keys as f64,
        )
    }
}

fn tollgate(keys: Keys, n: usize) -> Measure {
    let policy = parse(TOKEN_BUCKET, &NoProfiles).expect("policy");
    let clock = SystemClock::new();
    let items: Vec<Item> = (0..n)
        .map(|i| Item {
            limit: 0,
            class: 0,
            key: key_name(keys, i).into(),
            cost: 1,
            charge: 1,
        })
        .collect();
    let rss0 = rss();
    let region = Region::new(GLOBAL);
    let store = MemoryStore::new(&policy);
    for item in &items {
        let d = store
            .decide(&policy, std::slice::from_ref(item), clock.now())
            .expect("tracked");
        assert!(d.allowed());
    }
    let m = Measure {
        keys: n,
        heap: net(&region),
        rss: rss() - rss0,
    };
    assert_eq!(store.stats().keys, n);
    black_box(&store);
    drop(store);
    m
}

fn governor(keys: Keys, n: usize) -> Measure {
    let quota = Quota::per_second(NonZeroU32::new(1).expect("1"))
        .allow_burst(NonZeroU32::new(60).expect("60"));
    let keys: Vec<String> = (0..n).map(|i| key_name(keys, i)).collect();
    let rss0 = rss();
    let region = Region::new(GLOBAL);
    let limiter = RateLimiter::keyed(quota);
    for k in &keys {
        assert!(limiter.check_key(k).is_ok());
    }
    let m = Measure {
        keys: n,
        heap: net(&region),
        rss: rss() - rss0,
    };
    assert_eq!(limiter.len(), n);
    black_box(&limiter);
    drop(limiter);
    m
}

/// Each (store, size) runs in a fresh child process so that neither RSS figure
/// benefits from memory the other freed.
const CASE_VAR: &str = "TOLLGATE_MEMORY_CASE";

fn main() {
    if let Ok(case) = std::env::var(CASE_VAR) {
        let mut parts = case.split(':');
        let (Some(name), Some(kind), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
            panic!("{CASE_VAR} is store:short|uuid:keys");
        };
        let n: usize = n.parse().expect("keys");
        let keys = if kind == "uuid" {
            Keys::Uuid
        } else {
            Keys::Short
        };
        let m = match name {
            "tollgate" => tollgate(keys, n),
            _ => governor(keys, n),
        };
        let (heap, rss) = m.per_key();
        println!(
            "{name:<10} {kind:<6} {:>9} {heap:>12.1} {rss:>12.1}",
            m.keys
        );
        if n == 1_000_000 && keys == Keys::Short {
            // Machine-readable line for bench/engine.sh.
            println!(
                "RESULT memory/{name} heap_bytes_per_key={heap:.1} rss_bytes_per_key={rss:.1}"
            );
        }
        return;
    }
    // `cargo bench` passes `--bench` and maybe a filter; neither applies here.
    let exe = std::env::current_exe().expect("own path");
    println!("memory per tracked token-bucket key");
    println!("(short: \"tenant-0000123\", 14 bytes; uuid: 36 bytes, too long to keep inline)");
    println!(
        "{:<10} {:<6} {:>9} {:>12} {:>12}",
        "store", "keys", "count", "heap B/key", "rss B/key"
    );
    let cases = [
        ("short", 100_000),
        ("short", 500_000),
        ("short", 1_000_000),
        ("uuid", 1_000_000),
    ];
    for (kind, n) in cases {
        for name in ["tollgate", "governor"] {
            let out = std::process::Command::new(&exe)
                .env(CASE_VAR, format!("{name}:{kind}:{n}"))
                .output()
                .expect("run the measurement");
            assert!(out.status.success(), "{name}:{kind}:{n} failed: {out:?}");
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
}
