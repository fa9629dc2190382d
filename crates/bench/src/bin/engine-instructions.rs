//! bench/instructions.sh's subject: one limiter, 10,000 keys (`tenant-000000`…)
//! tracked first, then N keyed decisions cycling through them, each reading a
//! real clock (governor: its quanta clock; tollgate: `SystemClock`, also
//! quanta). Run under cachegrind at N = 0 and N > 0, the difference is the
//! instructions N decisions take: a count that, unlike time on a shared VM,
//! moves little from run to run (the clock's calibration at start-up varies
//! by about a million instructions, so N is best a million or more).
//!
//! usage: engine-instructions governor|tollgate|tollgate-three|tollgate-three-buckets|tollgate-tiered|tollgate-fixed|tollgate-sliding N
//! (three buckets: what combining three limits costs over the algorithms' own work;
//! fixed and sliding: the three limits' windows alone)
//! (tiered: one limit of minute, hour and day pools)

use governor::{Quota, RateLimiter};
use std::hint::black_box;
use std::num::NonZeroU32;
use tollgate_core::request::Attrs;
use tollgate_core::{parse, Clock, NoProfiles};
use tollgate_store::{MemoryStore, SystemClock};

const KEYS: usize = 10_000;

// The quotas of `crates/bench/benches/engine.rs`: large enough that every
// call is admitted, so both sides do the same work.

/// A token bucket named `name`.
fn token_bucket(name: &str) -> String {
    format!("[[limit]]\nname = \"{name}\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"1000000/s\"\n")
}
const FIXED_WINDOW: &str = "[[limit]]\nname = \"fw\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 1000000000\n";
const SLIDING_WINDOW: &str = "[[limit]]\nname = \"sw\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"sliding_window\"\nevery = \"1m\"\nquota = 1000000000\n";
const TIERED: &str = "[[limit]]\nname = \"tiers\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"tiered\"\ntiers = [ { every = \"1m\", quota = 1000000000 }, { every = \"1h\", quota = 1000000000 }, { every = \"1d\", quota = 1000000000 } ]\n";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(which), Some(Ok(n))) = (args.get(1), args.get(2).map(|n| n.parse::<usize>())) else {
        eprintln!(
            "usage: engine-instructions governor|tollgate|tollgate-three|tollgate-three-buckets|tollgate-tiered N"
        );
        std::process::exit(2);
    };
    let keys: Vec<String> = (0..KEYS).map(|k| format!("tenant-{k:06}")).collect();
    let admitted = match which.as_str() {
        "governor" => {
            let rate = NonZeroU32::new(1_000_000).expect("nonzero");
            let burst = NonZeroU32::new(1_000).expect("nonzero");
            let gov = RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst));
            for k in &keys {
                let _ = gov.check_key(k);
            }
            (0..n)
                .filter(|i| black_box(gov.check_key(&keys[i % KEYS]).is_ok()))
                .count()
        }
        "tollgate"
        | "tollgate-three"
        | "tollgate-three-buckets"
        | "tollgate-tiered"
        | "tollgate-fixed"
        | "tollgate-sliding" => {
            let limits = match which.as_str() {
                "tollgate" => token_bucket("tb"),
                "tollgate-three" => format!("{}{FIXED_WINDOW}{SLIDING_WINDOW}", token_bucket("tb")),
                "tollgate-tiered" => TIERED.to_string(),
                "tollgate-fixed" => FIXED_WINDOW.to_string(),
                "tollgate-sliding" => SLIDING_WINDOW.to_string(),
                _ => ["tb", "tb2", "tb3"].map(token_bucket).concat(),
            };
            let text = format!("[store]\nmax_keys = 10000000\n{limits}");
            let policy = parse(&text, &NoProfiles).expect("policy");
            let store = MemoryStore::new(&policy);
            let clock = SystemClock::new();
            let items: Vec<_> = (keys.iter())
                .map(|k| {
                    let mut items = Vec::new();
                    let req = Attrs::new("GET", "/v1/things", &[("x-tenant-id", k.as_str())]);
                    policy.plan(&req, &mut items).expect("plan");
                    items
                })
                .collect();
            for it in &items {
                let _ = store.decide(&policy, it, clock.now());
            }
            (0..n)
                .filter(|i| {
                    let decision = store.decide(&policy, &items[i % KEYS], clock.now());
                    black_box(decision.is_ok_and(|d| d.allowed()))
                })
                .count()
        }
        other => {
            eprintln!("unknown limiter {other}: governor, tollgate, tollgate-three, tollgate-three-buckets, tollgate-tiered, tollgate-fixed or tollgate-sliding");
            std::process::exit(2);
        }
    };
    // Every call admitted: otherwise the two sides did different work.
    if admitted != n {
        eprintln!("{which}: {admitted} of {n} admitted; the quota is too small");
        std::process::exit(1);
    }
}
