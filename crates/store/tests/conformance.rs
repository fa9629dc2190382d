//! The store conformance suite, written once for every store.
//!
//! Each test is a generic function over `Backend`: a policy goes in, requests
//! are checked at fake instants, and the decisions must be exactly what the
//! policy language promises (docs/config.md, "Exact semantics"). A store joins
//! the suite by implementing `Backend` and adding one line to the bottom of this
//! file:
//!
//! ```text
//! conformance!(redis: RedisEngine);
//! ```
//!
//! The Redis store runs it against a real redis-server (`TOLLGATE_TEST_REDIS`,
//! started by scripts/test.sh, or one this test binary starts).

use serde_json::json;
use tollgate_core::policy::RedisSettings;
use tollgate_core::{parse, Attrs, Decision, Nanos, NoProfiles, Policy, RequestError, Verdict};
use tollgate_store::redis::TimeSource;
use tollgate_store::{Checked, Engine, EngineError, StoreError};

use tollgate_core::units::{DAY, HOUR, MILLISECOND as MS, MINUTE, SECOND as SEC};
/// 2026-01-01T00:00:00Z, a UTC midnight.
const T0: Nanos = 1_767_225_600 * SEC;

/// What the suite needs of a store, behind the engine that drives it.
pub trait Backend: Sized {
    fn open(policy: Policy) -> Self;
    fn check(&self, req: &Attrs, now: Nanos) -> Result<Checked, EngineError>;
    fn finish(&self, checked: &Checked, now: Nanos, latency_us: u64);
    /// Keys tracked right now, over all limits.
    fn keys(&self) -> usize;
    fn sweep(&self, now: Nanos) -> usize;
    /// This store's counters under a reloaded `policy`, at `now` (this one
    /// stays usable for requests still finishing on it).
    fn reload(&self, policy: Policy, now: Nanos) -> Self;
}

impl Backend for Engine {
    fn open(policy: Policy) -> Self {
        Engine::new(policy)
    }
    fn check(&self, req: &Attrs, now: Nanos) -> Result<Checked, EngineError> {
        Engine::check(self, req, now)
    }
    fn finish(&self, checked: &Checked, now: Nanos, latency_us: u64) {
        Engine::finish(self, checked, now, latency_us);
    }
    fn keys(&self) -> usize {
        self.store().stats().keys
    }
    fn sweep(&self, now: Nanos) -> usize {
        Engine::sweep(self, now)
    }
    fn reload(&self, policy: Policy, now: Nanos) -> Self {
        self.reloaded(policy, now).expect("a reload")
    }
}

/// Instantiate every test of the suite for one store.
macro_rules! conformance {
    ($store:ident: $backend:ty) => {
        conformance!(@each $store: $backend;
            token_bucket_burst_then_refill,
            leaky_bucket_is_token_bucket,
            fixed_window_resets_at_the_boundary,
            fixed_window_day_starts_at_local_midnight,
            sliding_window_rolls_segment_by_segment,
            tiered_falls_through_and_a_day_is_the_sum_of_refills,
            concurrency_acquires_and_releases_via_finish,
            latency_is_debited_at_completion,
            hold_delays_and_reserves,
            sliding_window_hold_reservation_is_counted,
            shadow_never_denies_but_reports,
            shadow_settles_only_what_it_charged,
            several_limits_are_all_or_nothing,
            missing_key_anonymous,
            missing_key_reject,
            missing_key_skip,
            cost_from_header,
            cost_from_json_array,
            class_scales_limits,
            a_reload_carries_a_windows_count_into_a_changed_quota,
            a_reload_carries_a_buckets_debt_into_its_new_capacity_and_rate,
            a_reload_that_adds_a_tier_keeps_each_pools_use,
            a_reload_keeps_requests_in_flight,
            a_reload_moves_a_keys_use_into_and_out_of_its_override,
            a_reload_that_adds_an_override_and_a_rate_carries_the_keys_units,
            a_reload_that_changes_what_counts_mean_starts_fresh,
            a_reload_that_puts_a_new_limit_before_a_kept_one_decides_both,
        );
    };
    (@each $store:ident: $backend:ty; $($test:ident),* $(,)?) => {
        mod $store {
            $(
                #[test]
                fn $test() {
                    super::$test::<$backend>();
                }
            )*
        }
    };
}

conformance!(memory: tollgate_store::Engine);
conformance!(redis_store: crate::RedisEngine);

/// Bounding keys by count is the memory store's; Redis bounds them by
/// expiry (see `redis_keys_at_rest_are_deleted_and_busy_ones_expire`).
#[test]
fn memory_max_keys_bounds_memory_and_never_changes_a_decision() {
    max_keys_bounds_memory_and_never_changes_a_decision::<Engine>();
}

/// The engine on a real redis-server, deciding at the suite's fake instants
/// (`TimeSource::Caller`); each store has its own key prefix.
#[derive(Debug)]
pub struct RedisEngine {
    engine: Engine,
    prefix: String,
    url: String,
}

/// The test server, one connection, a generous timeout, keys under `prefix`.
fn redis_settings(prefix: String) -> RedisSettings {
    redis_settings_at(prefix, tollgate_testkit::redis_url())
}

fn redis_settings_at(prefix: String, url: String) -> RedisSettings {
    RedisSettings {
        prefix,
        timeout: 5 * SEC,
        pool: 1,
        ..RedisSettings::new(url)
    }
}

fn redis_conn() -> redis::Connection {
    redis::Client::open(tollgate_testkit::redis_url())
        .and_then(|c| c.get_connection())
        .expect("the test redis-server answers")
}

impl RedisEngine {
    /// The engine on the Redis server at `url`.
    fn open_at(mut policy: Policy, url: &str) -> Self {
        let prefix = tollgate_testkit::unique_prefix("conformance");
        policy.store.redis = Some(redis_settings_at(prefix.clone(), url.to_string()));
        let engine = Engine::open_with(policy, "conformance", TimeSource::Caller)
            .expect("a policy the Redis store can run");
        RedisEngine {
            engine,
            prefix,
            url: url.to_string(),
        }
    }
}

impl Backend for RedisEngine {
    fn open(policy: Policy) -> Self {
        Self::open_at(policy, &tollgate_testkit::redis_url())
    }
    fn check(&self, req: &Attrs, now: Nanos) -> Result<Checked, EngineError> {
        let checked = self.engine.check(req, now)?;
        assert!(!checked.local, "decided in Redis, not in process");
        Ok(checked)
    }
    fn finish(&self, checked: &Checked, now: Nanos, latency_us: u64) {
        self.engine.finish(checked, now, latency_us);
    }
    fn keys(&self) -> usize {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut redis_conn())
            .expect("KEYS");
        keys.len()
    }
    fn sweep(&self, _now: Nanos) -> usize {
        0 // keys at rest are deleted by the script, the rest expire
    }
    fn reload(&self, mut policy: Policy, now: Nanos) -> Self {
        policy.store.redis = Some(redis_settings_at(self.prefix.clone(), self.url.clone()));
        RedisEngine {
            engine: self.engine.reloaded(policy, now).expect("a reload"),
            prefix: self.prefix.clone(),
            url: self.url.clone(),
        }
    }
}

#[test]
fn redis_keys_at_rest_are_deleted_and_busy_ones_expire() {
    let b: RedisEngine = open(&bucket("token_bucket", ""));
    let a = tenant("a");
    assert_eq!(decide(&b, &a, T0).verdict, NOW);
    assert_eq!(b.keys(), 1);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", b.prefix))
        .query(&mut redis_conn())
        .expect("KEYS");
    // One unit of 3 at 1/s: the bucket is full again 1 s on; the key lives
    // that long plus a second of margin.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut redis_conn())
        .expect("PTTL");
    assert!((1_000..=2_000).contains(&ttl), "ttl {ttl} ms");
    // Denied by a concurrency limit of one: nothing is written.
    let c: RedisEngine = open(
        "[[limit]]\nname = \"c\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"concurrency\"\nmax = 1\n",
    );
    let first = check(&c, &a, T0);
    assert_eq!(c.keys(), 1);
    assert!(!admitted(&decide(&c, &a, T0)));
    // Released: the in-flight count is back to zero, so the key is gone.
    c.finish(&first, T0, 0);
    assert_eq!(c.keys(), 0);
}

/// A reload that slows a bucket carries its debt at the new rate: the key,
/// once read, lives as long as that debt does, not the old rate's second
/// (kept with KEEPTTL, it expired with its debt, and another node then
/// admitted a fresh bucket).
#[test]
fn redis_a_carried_buckets_key_lives_as_long_as_its_new_debt() {
    let bucket = |refill: &str| {
        format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"{refill}\"\n")
    };
    let b: RedisEngine = open(&bucket("10/s"));
    let a = tenant("a");
    for _ in 0..10 {
        assert!(admitted(&decide(&b, &a, T0)));
    }
    let slower = b.reload(parse(&bucket("1/min"), &NoProfiles).expect("policy"), T0);
    assert!(!admitted(&decide(&slower, &a, T0)), "10 owed at 1/min");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", slower.prefix))
        .query(&mut redis_conn())
        .expect("KEYS");
    assert_eq!(keys.len(), 1);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut redis_conn())
        .expect("PTTL");
    // The first unit comes back in a minute (9 of 10 still owed after it).
    assert!(ttl > 60_000, "ttl {ttl} ms");
}

/// Two nodes half-way through a change of a tiered limit's tiers share its
/// keys: each decides by its own tiers against the same use, and a pool only
/// one of them knows is kept for it by the other's writes, never reset.
#[test]
fn redis_nodes_on_two_definitions_keep_each_others_pools() {
    let tiered = |tiers: &str| {
        format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"tiered\"\ntiers = [{tiers}]\n")
    };
    let (minute, hour, day) = (
        "{ every = \"1m\", quota = 2 }",
        "{ every = \"1h\", quota = 3 }",
        "{ every = \"1d\", quota = 5 }",
    );
    let a = tenant("a");
    let old: RedisEngine = open(&tiered(&format!("{minute}, {day}")));
    let new = reload(&old, &tiered(&format!("{minute}, {hour}, {day}")), T0);
    assert_eq!(admits(&new, &a, T0), 2 + 3 + 5);
    assert_eq!(admits(&old, &a, T0 + MINUTE), 2, "the minute refilled");
    // The old node wrote the key without knowing the hour pool: still used.
    assert_eq!(admits(&new, &a, T0 + 2 * MINUTE), 2);
    // Once the hour pool's window is long over, the old node stops keeping
    // it: its writes hold its own two pools only (1 + 5 numbers each).
    let pools = || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", old.prefix))
            .query(&mut redis_conn())
            .expect("KEYS");
        let value: String = redis::cmd("GET")
            .arg(&keys[0])
            .query(&mut redis_conn())
            .expect("GET");
        (value.split('|').count() - 1) / 5
    };
    assert_eq!(admits(&old, &a, T0 + 3 * MINUTE), 2, "the minute refilled");
    assert_eq!(pools(), 3);
    assert_eq!(admits(&old, &a, T0 + 3 * HOUR), 2, "the minute refilled");
    assert_eq!(pools(), 2);
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn open<B: Backend>(toml: &str) -> B {
    B::open(parse(toml, &NoProfiles).expect("a valid policy"))
}

fn req(headers: &[(&str, &str)]) -> Attrs {
    Attrs {
        ip: Some("10.0.0.1".into()),
        ..Attrs::new("GET", "/v1/jobs", headers)
    }
}

fn tenant(name: &str) -> Attrs {
    req(&[("x-tenant", name)])
}

fn check<B: Backend>(b: &B, r: &Attrs, now: Nanos) -> Checked {
    b.check(r, now).expect("the request is well-formed")
}

fn decide<B: Backend>(b: &B, r: &Attrs, now: Nanos) -> Decision {
    check(b, r, now).decision
}

fn admitted(d: &Decision) -> bool {
    d.verdict == Verdict::Admit { delay: 0 }
}

fn denied(limit: usize, retry_after: Nanos) -> Verdict {
    Verdict::Deny {
        limit,
        retry_after: Some(retry_after),
    }
}

const NOW: Verdict = Verdict::Admit { delay: 0 };

fn bucket(algorithm: &str, extra: &str) -> String {
    format!(
        "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"{algorithm}\"\ncapacity = 3\nrefill = \"1/s\"\n{extra}"
    )
}

// ---------------------------------------------------------------------------
// token_bucket / leaky_bucket
// ---------------------------------------------------------------------------

fn token_bucket_burst_then_refill<B: Backend>() {
    let b: B = open(&bucket("token_bucket", ""));
    let t = T0 + 10 * SEC;
    for left in [2, 1, 0] {
        let d = decide(&b, &tenant("acme"), t);
        assert_eq!(d.verdict, NOW);
        assert_eq!(d.outcomes[0].remaining, left);
    }
    let d = decide(&b, &tenant("acme"), t);
    assert_eq!(d.verdict, denied(0, SEC));
    let o = d.outcomes[0];
    assert_eq!(
        (o.allowed, o.remaining, o.reset, o.retry_after),
        (false, 0, SEC, Some(SEC))
    );
    // Another tenant has its own bucket.
    assert_eq!(decide(&b, &tenant("other"), t).verdict, NOW);
    // Exactly one unit back after one second, not a nanosecond earlier.
    assert_eq!(
        decide(&b, &tenant("acme"), t + SEC - 1).verdict,
        denied(0, 1)
    );
    let d = decide(&b, &tenant("acme"), t + SEC);
    assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, 0));
    // Full again three seconds after that: a burst of 3.
    let later = t + 4 * SEC;
    for left in [2, 1, 0] {
        assert_eq!(
            decide(&b, &tenant("acme"), later).outcomes[0].remaining,
            left
        );
    }
    assert_eq!(decide(&b, &tenant("acme"), later).verdict, denied(0, SEC));
}

fn leaky_bucket_is_token_bucket<B: Backend>() {
    let cost = "cost = { header = \"x-n\" }\n";
    let token: B = open(&bucket("token_bucket", cost));
    let leaky: B = open(&bucket("leaky_bucket", cost));
    let (mut admitted_units, mut denials) = (0, 0);
    let mut t = T0;
    for i in 0..200u64 {
        t += (i * 7_919 % 13) * 100 * MS; // 0 to 1.2 s, irregular
        let cost = 1 + i % 3;
        let r = req(&[("x-tenant", "acme"), ("x-n", &cost.to_string())]);
        let d = decide(&token, &r, t);
        assert_eq!(d, decide(&leaky, &r, t), "request {i} at {t}");
        if admitted(&d) {
            admitted_units += cost;
        } else {
            denials += 1;
        }
    }
    // Both outcomes occur, and the units admitted stay within burst + refill.
    assert!(denials > 0 && admitted_units > 0);
    assert!(admitted_units <= 3 + (t - T0) / SEC);
}

// ---------------------------------------------------------------------------
// fixed_window / sliding_window
// ---------------------------------------------------------------------------

fn fixed_window_resets_at_the_boundary<B: Backend>() {
    let b: B = open(
        "[[limit]]\nname = \"minute\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 2\n",
    );
    let t = T0 + 59 * SEC + 500 * MS; // half a second before a minute boundary
    assert_eq!(decide(&b, &tenant("a"), t).outcomes[0].remaining, 1);
    let d = decide(&b, &tenant("a"), t);
    assert_eq!(
        (d.verdict, d.outcomes[0].remaining, d.outcomes[0].reset),
        (NOW, 0, 500 * MS)
    );
    assert_eq!(decide(&b, &tenant("a"), t).verdict, denied(0, 500 * MS));
    assert_eq!(
        decide(&b, &tenant("a"), T0 + MINUTE - 1).verdict,
        denied(0, 1)
    );
    let d = decide(&b, &tenant("a"), T0 + MINUTE);
    assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, 1));
    assert_eq!(decide(&b, &tenant("a"), T0 + MINUTE).verdict, NOW);
    assert_eq!(
        decide(&b, &tenant("a"), T0 + MINUTE + 30 * SEC).verdict,
        denied(0, 30 * SEC)
    );
}

fn fixed_window_day_starts_at_local_midnight<B: Backend>() {
    let b: B = open(
        "[[limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 1\ntimezone = \"Europe/Amsterdam\"\n",
    );
    // 2026-01-01T22:59:59Z is 23:59:59 in Amsterdam (CET, UTC+1).
    let t = T0 + 22 * HOUR + 59 * MINUTE + 59 * SEC;
    assert_eq!(decide(&b, &req(&[]), t).verdict, NOW);
    assert_eq!(decide(&b, &req(&[]), t).verdict, denied(0, SEC));
    assert_eq!(decide(&b, &req(&[]), T0 + 23 * HOUR).verdict, NOW);
    assert_eq!(
        decide(&b, &req(&[]), T0 + 23 * HOUR).verdict,
        denied(0, DAY)
    );
}

fn sliding_window_rolls_segment_by_segment<B: Backend>() {
    // 2 in any 10 s, counted in 1 s segments. A decision at t counts every
    // segment overlapping (t - 10 s, t], the oldest whole (sliding_window.rs):
    // a unit admitted at T0 is counted until (t - 10 s, t] stops overlapping
    // [T0, T0 + 1 s), at T0 + 11 s - 1 ns.
    let b: B = open(
        "[[limit]]\nname = \"rolling\"\nalgorithm = \"sliding_window\"\nevery = \"10s\"\nquota = 2\nsegments = 10\n",
    );
    assert_eq!(decide(&b, &req(&[]), T0).verdict, NOW);
    assert_eq!(decide(&b, &req(&[]), T0 + 5 * SEC).verdict, NOW);
    let d = decide(&b, &req(&[]), T0 + 9 * SEC);
    assert_eq!(d.verdict, denied(0, 2 * SEC - 1));
    assert_eq!(
        (d.outcomes[0].remaining, d.outcomes[0].reset),
        (0, 2 * SEC - 1)
    );
    assert_eq!(
        decide(&b, &req(&[]), T0 + 11 * SEC - 2).verdict,
        denied(0, 1)
    );
    assert_eq!(decide(&b, &req(&[]), T0 + 11 * SEC - 1).verdict, NOW);
    // Now T0+5 s and T0+11 s-1 ns are counted: full until T0+5 s's segment leaves, at T0+16 s-1 ns.
    assert_eq!(
        decide(&b, &req(&[]), T0 + 12 * SEC).verdict,
        denied(0, 4 * SEC - 1)
    );
    assert_eq!(decide(&b, &req(&[]), T0 + 16 * SEC - 1).verdict, NOW);
}

// ---------------------------------------------------------------------------
// tiered
// ---------------------------------------------------------------------------

fn tiered_falls_through_and_a_day_is_the_sum_of_refills<B: Backend>() {
    let b: B = open(
        "[[limit]]\nname = \"count\"\nalgorithm = \"tiered\"\ntiers = [ { every = \"1m\", quota = 2 }, { every = \"1h\", quota = 3 }, { every = \"1d\", quota = 1 } ]\n",
    );
    let r = req(&[]);
    // Minute pool, then hour pool, then day pool.
    for left in [5, 4, 3, 2, 1, 0] {
        let d = decide(&b, &r, T0);
        assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, left));
    }
    let d = decide(&b, &r, T0);
    assert_eq!(d.verdict, denied(0, MINUTE));
    assert_eq!(d.outcomes[0].reset, MINUTE);
    // A minute later only the minute pool is back.
    assert_eq!(decide(&b, &r, T0 + MINUTE).outcomes[0].remaining, 1);
    assert_eq!(decide(&b, &r, T0 + MINUTE).outcomes[0].remaining, 0);
    assert_eq!(decide(&b, &r, T0 + MINUTE).verdict, denied(0, MINUTE));
    // Hammer the rest of the day: every minute until denied.
    let mut total = 8;
    for minute in 2..24 * 60 {
        let t = T0 + minute * MINUTE;
        while admitted(&decide(&b, &r, t)) {
            total += 1;
        }
    }
    assert_eq!(total, 2 * 24 * 60 + 3 * 24 + 1);
    // The next day starts over with all three pools.
    assert_eq!(decide(&b, &r, T0 + DAY).outcomes[0].remaining, 5);
}

// ---------------------------------------------------------------------------
// concurrency and latency: through finish
// ---------------------------------------------------------------------------

fn concurrency_acquires_and_releases_via_finish<B: Backend>() {
    let b: B = open(
        "[[limit]]\nname = \"in-flight\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"concurrency\"\nmax = 2\n",
    );
    let t = T0;
    let first = check(&b, &tenant("a"), t);
    let second = check(&b, &tenant("a"), t);
    assert_eq!(
        (first.decision.verdict, second.decision.verdict),
        (NOW, NOW)
    );
    assert_eq!(second.decision.outcomes[0].remaining, 0);
    // Full: only a release can make room, so no retry_after is promised.
    let d = decide(&b, &tenant("a"), t + HOUR);
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            limit: 0,
            retry_after: None
        }
    );
    assert_eq!(
        decide(&b, &tenant("b"), t).verdict,
        NOW,
        "another key is separate"
    );
    b.finish(&first, t + HOUR, 0);
    let third = check(&b, &tenant("a"), t + HOUR);
    assert_eq!(
        (third.decision.verdict, third.decision.outcomes[0].remaining),
        (NOW, 0)
    );
    b.finish(&second, t + HOUR, 0);
    b.finish(&third, t + HOUR, 0);
    let d = decide(&b, &tenant("a"), t + HOUR);
    assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, 1));
}

fn latency_is_debited_at_completion<B: Backend>() {
    // Seconds of upstream time: 2 s a minute, then 3 s an hour.
    let b: B = open(
        "[[limit]]\nname = \"duration\"\nalgorithm = \"tiered\"\ncost = \"latency\"\ntiers = [ { every = \"1m\", quota = \"2s\" }, { every = \"1h\", quota = \"3s\" } ]\n",
    );
    let us = 1_000_000; // microseconds in a second
    let r = req(&[]);
    let t = T0 + 10 * SEC;
    let a = check(&b, &r, t);
    assert_eq!(
        (a.decision.verdict, a.decision.outcomes[0].remaining),
        (NOW, 5 * us)
    );
    // Admission charges nothing; completion debits 2.5 s, minute pool first.
    let c = check(&b, &r, t);
    assert_eq!(c.decision.outcomes[0].remaining, 5 * us);
    b.finish(&a, t + SEC, 2_500_000);
    let d = check(&b, &r, t + SEC);
    assert_eq!(
        (d.decision.verdict, d.decision.outcomes[0].remaining),
        (NOW, 2_500_000)
    );
    // 3 s more: the hour pool empties (a pool never goes below empty).
    b.finish(&d, t + 2 * SEC, 3 * us);
    b.finish(&c, t + 2 * SEC, us);
    let e = decide(&b, &r, t + 2 * SEC);
    assert_eq!(e.verdict, denied(0, MINUTE - 12 * SEC));
    assert_eq!(e.outcomes[0].remaining, 0);
    // The next minute brings the minute pool back: 2 s.
    let f = check(&b, &r, T0 + MINUTE);
    assert_eq!(
        (f.decision.verdict, f.decision.outcomes[0].remaining),
        (NOW, 2 * us)
    );
}

// ---------------------------------------------------------------------------
// hold, shadow, several limits
// ---------------------------------------------------------------------------

fn hold_delays_and_reserves<B: Backend>() {
    let b: B = open(
        "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/s\"\nhold = \"2s\"\n",
    );
    let t = T0;
    assert_eq!(decide(&b, &tenant("a"), t).verdict, NOW);
    assert_eq!(
        decide(&b, &tenant("a"), t).verdict,
        Verdict::Admit { delay: SEC }
    );
    assert_eq!(
        decide(&b, &tenant("a"), t).verdict,
        Verdict::Admit { delay: 2 * SEC }
    );
    // The next slot is 3 s away, beyond the hold: denied. retry_after is the
    // earliest arrival that would be admitted: at +1 s, held the 2 s allowed.
    assert_eq!(decide(&b, &tenant("a"), t).verdict, denied(0, SEC));
    assert_eq!(decide(&b, &tenant("a"), t + SEC - 1).verdict, denied(0, 1));
    // Later requests queue behind the reservations.
    assert_eq!(
        decide(&b, &tenant("a"), t + 1500 * MS).verdict,
        Verdict::Admit { delay: 1500 * MS }
    );
    assert_eq!(decide(&b, &tenant("a"), t + 4 * SEC).verdict, NOW);
}

fn sliding_window_hold_reservation_is_counted<B: Backend>() {
    // 3 in any 10 s, in 5 s segments; requests may wait up to 5 s.
    let b: B = open(
        "[[limit]]\nname = \"rolling\"\nalgorithm = \"sliding_window\"\nevery = \"10s\"\nquota = 3\nsegments = 2\nhold = \"5s\"\ncost = { header = \"x-n\" }\n",
    );
    let n = |units: &str| req(&[("x-n", units)]);
    assert_eq!(decide(&b, &n("1"), T0).verdict, NOW);
    // At T0+10 s three units fit only once (t - 10 s, t] stops overlapping
    // T0's segment [T0, T0+5 s), at T0+15 s-1 ns.
    assert_eq!(
        decide(&b, &n("3"), T0 + 10 * SEC).verdict,
        Verdict::Admit { delay: 5 * SEC - 1 }
    );
    // One more unit now would put 4 in (T0+5 s, T0+15 s].
    let d = decide(&b, &n("1"), T0 + 10 * SEC);
    assert!(
        d.verdict != NOW,
        "admitted at once although 3 units are reserved at T0+15 s: 4 in 10 s, quota 3"
    );
}

fn shadow_settles_only_what_it_charged<B: Backend>() {
    // A shadow concurrency limit of 1: the second request would have been
    // denied, so it took no slot and its completion must not free the first's.
    let b: B =
        open("[[limit]]\nname = \"c\"\nalgorithm = \"concurrency\"\nmax = 1\nmode = \"shadow\"\n");
    let first = b.check(&req(&[]), T0).expect("first");
    let second = b.check(&req(&[]), T0).expect("second");
    assert!(first.decision.outcomes[0].allowed);
    assert!(second.decision.allowed() && !second.decision.outcomes[0].allowed);
    b.finish(&second, T0 + SEC, 0);
    let third = decide(&b, &req(&[]), T0 + SEC);
    assert!(
        !third.outcomes[0].allowed,
        "the first request is still in flight"
    );
    b.finish(&first, T0 + 2 * SEC, 0);
    assert!(decide(&b, &req(&[]), T0 + 2 * SEC).outcomes[0].allowed);
}

fn shadow_never_denies_but_reports<B: Backend>() {
    let b: B = open(&bucket("token_bucket", "mode = \"shadow\"\n"));
    let t = T0;
    for i in 0..10u64 {
        let d = decide(&b, &tenant("a"), t);
        assert_eq!(d.verdict, NOW, "shadow denied request {i}");
        let o = d.outcomes[0];
        assert!(o.shadow);
        if i < 3 {
            assert!(o.allowed && o.retry_after.is_none());
        } else {
            assert!(!o.allowed, "request {i} would have been denied");
            assert_eq!(o.retry_after, Some(SEC));
        }
    }
    // Only what it would have admitted was counted: a second refills one unit.
    let o = decide(&b, &tenant("a"), t + SEC).outcomes[0];
    assert!(o.allowed);
    assert!(!decide(&b, &tenant("a"), t + SEC).outcomes[0].allowed);
}

fn several_limits_are_all_or_nothing<B: Backend>() {
    // A per-tenant bucket of 3 and one shared window of 4 a minute.
    let b: B = open(&format!(
        "{}\n[[limit]]\nname = \"global\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 4\n",
        bucket("token_bucket", "")
    ));
    let t = T0 + 30 * SEC;
    for _ in 0..3 {
        assert_eq!(decide(&b, &tenant("a"), t).verdict, NOW);
    }
    // Tenant a's bucket is empty: denied by it, the window is not charged.
    let d = decide(&b, &tenant("a"), t);
    assert_eq!(d.verdict, denied(0, SEC));
    assert!(!d.outcomes[0].allowed && d.outcomes[1].allowed);
    assert_eq!(d.outcomes[1].remaining, 1);
    assert_eq!(decide(&b, &tenant("b"), t).verdict, NOW);
    // The window is full: denied by it, tenant c's bucket is not charged.
    let d = decide(&b, &tenant("c"), t);
    assert_eq!(d.verdict, denied(1, 30 * SEC));
    assert!(d.outcomes[0].allowed && !d.outcomes[1].allowed);
    assert_eq!(d.outcomes[0].remaining, 3);
    // Both must allow: a's bucket refills at t+1s but the window only at t+30s.
    assert_eq!(decide(&b, &tenant("a"), t).verdict, denied(1, 30 * SEC));
    let d = decide(&b, &tenant("c"), T0 + MINUTE);
    assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, 2));
}

// ---------------------------------------------------------------------------
// Keys and costs from the request
// ---------------------------------------------------------------------------

fn missing_key_anonymous<B: Backend>() {
    let b: B = open(&bucket("token_bucket", "missing_key = \"anonymous\"\n"));
    let t = T0;
    for _ in 0..3 {
        assert_eq!(decide(&b, &req(&[]), t).verdict, NOW);
    }
    // Every request without the header shares one anonymous bucket.
    assert_eq!(
        decide(&b, &req(&[("x-other", "1")]), t).verdict,
        denied(0, SEC)
    );
    assert_eq!(decide(&b, &tenant("acme"), t).verdict, NOW);
}

fn missing_key_reject<B: Backend>() {
    let b: B = open(&bucket("token_bucket", "missing_key = \"reject\"\n"));
    match b.check(&req(&[]), T0) {
        Err(EngineError::Request(RequestError::MissingKey { limit, part })) => {
            assert_eq!(
                (limit.as_str(), part.as_str()),
                ("tenant", "header:x-tenant")
            );
        }
        other => panic!("expected a missing-key error, got {other:?}"),
    }
    assert_eq!(b.keys(), 0, "a rejected request is not tracked");
    assert_eq!(decide(&b, &tenant("acme"), T0).verdict, NOW);
}

fn missing_key_skip<B: Backend>() {
    let b: B = open(&bucket("token_bucket", "missing_key = \"skip\"\n"));
    for _ in 0..10 {
        let c = check(&b, &req(&[]), T0);
        assert_eq!(c.decision.verdict, NOW);
        assert!(c.items.is_empty() && c.decision.outcomes.is_empty());
    }
    assert_eq!(b.keys(), 0);
    for _ in 0..3 {
        assert_eq!(decide(&b, &tenant("acme"), T0).verdict, NOW);
    }
    assert_eq!(decide(&b, &tenant("acme"), T0).verdict, denied(0, SEC));
}

fn cost_from_header<B: Backend>() {
    let b: B = open(
        "[[limit]]\nname = \"weighted\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 10\ncost = { header = \"X-Cost\" }\n",
    );
    let t = T0 + 45 * SEC;
    let d = decide(&b, &req(&[("x-cost", "7")]), t);
    assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, 3));
    assert_eq!(
        decide(&b, &req(&[("x-cost", "4")]), t).verdict,
        denied(0, 15 * SEC)
    );
    assert_eq!(
        decide(&b, &req(&[("x-cost", "3")]), t).outcomes[0].remaining,
        0
    );
    // Absent: one unit.
    assert_eq!(decide(&b, &req(&[]), t).verdict, denied(0, 15 * SEC));
    // More than the quota can ever hold is not a 429.
    assert_eq!(
        decide(&b, &req(&[("x-cost", "11")]), T0 + MINUTE).verdict,
        Verdict::Never {
            limit: 0,
            cost: 11,
            capacity: 10
        }
    );
    match b.check(&req(&[("x-cost", "lots")]), t) {
        Err(EngineError::Request(RequestError::BadCostHeader { header, value, .. })) => {
            assert_eq!((header.as_str(), value.as_str()), ("x-cost", "lots"));
        }
        other => panic!("expected a bad cost header error, got {other:?}"),
    }
    let d = decide(&b, &req(&[("x-cost", "10")]), T0 + MINUTE);
    assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, 0));
}

fn cost_from_json_array<B: Backend>() {
    let b: B = open(
        "[[limit]]\nname = \"bulk\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 5\ncost = { json_array = \"/variables/ids\" }\n",
    );
    let with = |body: serde_json::Value| Attrs {
        body: Some(body),
        ..req(&[])
    };
    let t = T0;
    let d = decide(&b, &with(json!({"variables": {"ids": [1, 2, 3]}})), t);
    assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, 2));
    assert_eq!(
        decide(&b, &with(json!({"variables": {"ids": [1, 2, 3]}})), t).verdict,
        denied(0, MINUTE)
    );
    // No array at the pointer (or no body): one unit.
    assert_eq!(
        decide(&b, &with(json!({"query": "{}"})), t).outcomes[0].remaining,
        1
    );
    assert_eq!(decide(&b, &req(&[]), t).outcomes[0].remaining, 0);
    match b.check(&with(json!({"variables": {"ids": "1,2"}})), t) {
        Err(EngineError::Request(RequestError::BadCostBody { pointer, .. })) => {
            assert_eq!(pointer, "/variables/ids");
        }
        other => panic!("expected a bad cost body error, got {other:?}"),
    }
    // An empty bulk call is still a call: it costs one, so it cannot slip
    // past an exhausted limit.
    let d = decide(&b, &with(json!({"variables": {"ids": []}})), t);
    assert_eq!(
        (d.allowed(), d.outcomes[0].remaining),
        (false, 0),
        "an empty array costs one"
    );
}

fn class_scales_limits<B: Backend>() {
    let b: B = open(
        "[[class]]\nname = \"sandbox\"\nmatch = { headers = { x-env = \"sandbox\" } }\nscale = 0.5\n\n[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n",
    );
    let sandbox = req(&[("x-tenant", "acme"), ("x-env", "sandbox")]);
    let t = T0;
    for left in (0..5).rev() {
        let d = decide(&b, &sandbox, t);
        assert_eq!((d.verdict, d.outcomes[0].remaining), (NOW, left));
    }
    // Half the burst, half the rate: one unit every 200 ms.
    assert_eq!(decide(&b, &sandbox, t).verdict, denied(0, 200 * MS));
    // The same tenant outside the sandbox has its own, full-size bucket.
    for left in (0..10).rev() {
        assert_eq!(decide(&b, &tenant("acme"), t).outcomes[0].remaining, left);
    }
    assert_eq!(decide(&b, &tenant("acme"), t).verdict, denied(0, 100 * MS));
}

// ---------------------------------------------------------------------------
// Reloads: a changed limit keeps what each key used (docs/config.md, "Reload")
// ---------------------------------------------------------------------------

fn reload<B: Backend>(b: &B, toml: &str, now: Nanos) -> B {
    b.reload(parse(toml, &NoProfiles).expect("a valid policy"), now)
}

/// Admissions of `r` at `now` until the first denial.
fn admits<B: Backend>(b: &B, r: &Attrs, now: Nanos) -> u64 {
    let mut n = 0;
    while admitted(&decide(b, r, now)) {
        n += 1;
        assert!(n < 1_000, "never denied");
    }
    n
}

fn hourly(quota: u64, extra: &str) -> String {
    format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nquota = {quota}\nevery = \"1h\"\n{extra}")
}

fn a_reload_carries_a_windows_count_into_a_changed_quota<B: Backend>() {
    let a = tenant("a");
    let b: B = open(&hourly(3, ""));
    assert_eq!(admits(&b, &a, T0 + 10 * MINUTE), 3);
    // Raised mid-window: 2 more, not 5 more.
    let raised = reload(&b, &hourly(5, ""), T0 + 20 * MINUTE);
    assert_eq!(admits(&raised, &a, T0 + 20 * MINUTE), 2);
    // Lowered below what was used: nothing until the next window, then 2.
    let lowered = reload(&raised, &hourly(2, ""), T0 + 30 * MINUTE);
    assert_eq!(admits(&lowered, &a, T0 + 30 * MINUTE), 0);
    assert_eq!(admits(&lowered, &a, T0 + HOUR), 2);
    // A sliding window's count carries the same way.
    let sliding = |quota: u64| {
        format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"sliding_window\"\nquota = {quota}\nevery = \"1m\"\n")
    };
    let s: B = open(&sliding(4));
    assert_eq!(admits(&s, &a, T0 + 10 * SEC), 4);
    let s = reload(&s, &sliding(6), T0 + 20 * SEC);
    assert_eq!(admits(&s, &a, T0 + 20 * SEC), 2);
}

fn a_reload_carries_a_buckets_debt_into_its_new_capacity_and_rate<B: Backend>() {
    let a = tenant("a");
    let bucket = |capacity: u64, refill: &str| {
        format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = {capacity}\nrefill = \"{refill}\"\n")
    };
    let b: B = open(&bucket(10, "10/s"));
    for _ in 0..8 {
        assert!(admitted(&decide(&b, &a, T0)));
    }
    // Capacity raised, same rate: the 8 used stay used.
    let bigger = reload(&b, &bucket(20, "10/s"), T0);
    assert_eq!(
        decide(&bigger, &tenant("other"), T0).outcomes[0].remaining,
        19
    );
    assert_eq!(admits(&bigger, &a, T0), 12);
    // Capacity and rate lowered: the 20 units owed are owed at 1/s, and
    // with room for 5 the next one comes once 16 are paid.
    let smaller = reload(&bigger, &bucket(5, "1/s"), T0);
    assert_eq!(decide(&smaller, &a, T0).verdict, denied(0, 16 * SEC));
    assert_eq!(admits(&smaller, &a, T0 + 15 * SEC), 0);
    assert_eq!(admits(&smaller, &a, T0 + 16 * SEC), 1);
    assert_eq!(admits(&smaller, &a, T0 + 18 * SEC), 2);
}

fn a_reload_that_adds_a_tier_keeps_each_pools_use<B: Backend>() {
    let a = tenant("a");
    let tiered = |tiers: &str| {
        format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"tiered\"\ntiers = [{tiers}]\n")
    };
    let minute = "{ every = \"1m\", quota = 2 }";
    let hour = "{ every = \"1h\", quota = 3 }";
    let day = "{ every = \"1d\", quota = 5 }";
    let b: B = open(&tiered(&format!("{minute}, {day}")));
    for _ in 0..4 {
        assert!(admitted(&decide(&b, &a, T0)));
    }
    // The hour pool added starts full; the minute's and the day's use stays.
    let added = reload(&b, &tiered(&format!("{minute}, {hour}, {day}")), T0);
    assert_eq!(admits(&added, &a, T0), 3 + 3);
    // Removed again: the day pool's use (5 of 5) stays, the minute refills.
    let removed = reload(&added, &tiered(&format!("{minute}, {day}")), T0);
    assert_eq!(admits(&removed, &a, T0), 0);
    assert_eq!(admits(&removed, &a, T0 + MINUTE), 2);
}

fn a_reload_that_puts_a_new_limit_before_a_kept_one_decides_both<B: Backend>() {
    let a = tenant("a");
    let b: B = open(&hourly(3, ""));
    assert_eq!(admits(&b, &a, T0), 3);
    let b = reload(&b, &hourly(5, ""), T0 + HOUR);
    assert!(admitted(&decide(&b, &a, T0 + HOUR)));
    // A new limit placed first, the hourly one kept as it is: a request is
    // decided by both, all or nothing (in the memory store the new limit's
    // table comes after the kept one's in locking order).
    let burst = "[[limit]]\nname = \"burst\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/h\"\n\n";
    let both = reload(&b, &format!("{burst}{}", hourly(5, "")), T0 + HOUR);
    assert_eq!(
        admits(&both, &a, T0 + HOUR),
        2,
        "the new bucket binds first"
    );
    let d = decide(&both, &a, T0 + HOUR);
    assert!(!admitted(&d));
    assert_eq!(d.outcomes.len(), 2);
    assert_eq!(
        d.outcomes[1].remaining, 2,
        "the hour kept its 1 and took 2 more"
    );
    // In the next hour the hourly window is whole, the bucket has 1 token.
    assert_eq!(admits(&both, &a, T0 + 2 * HOUR), 1);
}

fn a_reload_keeps_requests_in_flight<B: Backend>() {
    let a = tenant("a");
    let limit = |max: u64| {
        format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"concurrency\"\nmax = {max}\n")
    };
    let old: B = open(&limit(2));
    let first = check(&old, &a, T0);
    let _second = check(&old, &a, T0);
    let new = reload(&old, &limit(3), T0);
    assert!(admitted(&decide(&new, &a, T0)), "one more of 3");
    assert!(!admitted(&decide(&new, &a, T0)), "3 in flight");
    // A request admitted before the reload finishes on the old engine: its
    // slot is free for the new one.
    old.finish(&first, T0 + SEC, 0);
    assert!(admitted(&decide(&new, &a, T0 + SEC)));
}

fn a_reload_moves_a_keys_use_into_and_out_of_its_override<B: Backend>() {
    let acme = tenant("acme");
    let b: B = open(&hourly(3, ""));
    assert_eq!(admits(&b, &acme, T0), 3);
    // acme's own quota, twice the default: 3 more.
    let premium = reload(
        &b,
        &hourly(3, "overrides = [{ key = \"acme\", scale = 2 }]\n"),
        T0,
    );
    assert_eq!(admits(&premium, &acme, T0), 3);
    assert_eq!(admits(&premium, &tenant("other"), T0), 3);
    // The override taken away: 6 used of the default 3.
    let plain = reload(&premium, &hourly(3, ""), T0);
    assert_eq!(admits(&plain, &acme, T0), 0);
    assert_eq!(admits(&plain, &acme, T0 + HOUR), 3);
}

fn a_reload_that_adds_an_override_and_a_rate_carries_the_keys_units<B: Backend>() {
    let acme = tenant("acme");
    let bucket = |refill: &str, extra: &str| {
        format!("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"{refill}\"\n{extra}")
    };
    let b: B = open(&bucket("10/s", ""));
    for _ in 0..8 {
        assert!(admitted(&decide(&b, &acme, T0)));
    }
    // The default rate lowered and acme given twice it (20 at 2/s): its 8
    // units are owed at acme's own rate, whatever happened to the default.
    let next = reload(
        &b,
        &bucket("1/s", "overrides = [{ key = \"acme\", scale = 2 }]\n"),
        T0,
    );
    assert_eq!(admits(&next, &acme, T0), 12);
    assert_eq!(admits(&next, &tenant("other"), T0), 10);
}

fn a_reload_that_changes_what_counts_mean_starts_fresh<B: Backend>() {
    let a = tenant("a");
    let b: B = open(&hourly(3, ""));
    assert_eq!(admits(&b, &a, T0), 3);
    let longer = reload(&b, &hourly(3, "").replace("\"1h\"", "\"2h\""), T0);
    assert_eq!(admits(&longer, &a, T0), 3, "another window: fresh");
    let by_ip = reload(&longer, &hourly(3, "").replace("header:x-tenant", "ip"), T0);
    assert_eq!(admits(&by_ip, &a, T0), 3, "another key: fresh");
}

// ---------------------------------------------------------------------------
// Bounded keys
// ---------------------------------------------------------------------------

fn max_keys_bounds_memory_and_never_changes_a_decision<B: Backend>() {
    const N: usize = 8;
    let policy = format!(
        "[store]\nmax_keys = {N}\n\n[[limit]]\nname = \"per-key\"\nkey = [\"header:x-key\"]\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/m\"\n"
    );
    let flooded: B = open(&policy);
    let quiet: B = open(&policy);
    let victim = req(&[("x-key", "victim")]);
    let key = |i: usize| req(&[("x-key", &format!("flood-{i}"))]);
    // The victim's decisions must be the same with and without the flood.
    let same = |now: Nanos| {
        let a = decide(&flooded, &victim, now);
        let b = decide(&quiet, &victim, now);
        assert_eq!(
            a, b,
            "the victim's decision at {now} changed under the flood"
        );
        a
    };
    assert_eq!(same(T0).verdict, NOW);
    assert_eq!(same(T0).verdict, NOW);

    // Phase 1: a new key every minute; each is idle (full again) by the next.
    // The victim takes one unit a minute, so it is never at rest.
    for i in 0..N * 10 {
        let t = T0 + (i as Nanos + 1) * MINUTE;
        assert_eq!(same(t).verdict, NOW);
        assert_eq!(same(t).verdict, denied(0, MINUTE));
        assert_eq!(
            decide(&flooded, &key(i), t + 1).verdict,
            NOW,
            "flood key {i}"
        );
        assert!(flooded.keys() <= N, "{} keys tracked", flooded.keys());
    }

    // Phase 2: N * 10 new keys at one instant. Only the victim is busy, so
    // N - 1 of them fit; the rest are refused rather than tracked.
    let t = T0 + (N as Nanos * 10 + 1) * MINUTE + 1;
    let (mut ok, mut full) = (0, 0);
    for i in N * 10..N * 20 {
        match flooded.check(&key(i), t) {
            Ok(c) => {
                assert_eq!(c.decision.verdict, NOW);
                ok += 1;
            }
            Err(EngineError::Store(StoreError::Full { max_keys, .. })) => {
                assert_eq!(max_keys, N);
                full += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        assert!(flooded.keys() <= N, "{} keys tracked", flooded.keys());
    }
    assert_eq!((ok, full), (N - 1, N * 10 - (N - 1)));
    // The victim was never evicted: same decisions as without any flood.
    assert_eq!(same(t).verdict, NOW);
    assert_eq!(same(t).verdict, denied(0, MINUTE - 1));
    assert_eq!(same(t + MINUTE - 1).verdict, NOW);
    assert_eq!(same(t + 5 * MINUTE).verdict, NOW);
    // Once everything is idle a sweep forgets every key.
    flooded.sweep(t + HOUR);
    assert_eq!(flooded.keys(), 0);
    assert_eq!(same(t + HOUR).verdict, NOW);
}

/// Differential: the same random traffic (keys, costs, holds, completions,
/// instants from nanoseconds to days apart) through the memory store and the
/// Redis store must get the same decisions, outcome for outcome.
#[test]
fn redis_decides_exactly_as_memory_under_random_traffic() {
    differential(&tollgate_testkit::redis_url());
}

/// The same on a server without Redis Functions (as Redis 6): the store
/// falls back to running decide.lua by EVALSHA, and decides the same.
#[test]
fn redis_without_functions_decides_by_script_exactly_as_memory() {
    let server = tollgate_testkit::RedisServer::start_without_functions();
    differential(&server.url());
    let loaded: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(redis::Script::new(DECIDE_LUA).get_hash())
        .query(
            &mut redis::Client::open(server.url())
                .and_then(|c| c.get_connection())
                .expect("the scripts-only server answers"),
        )
        .expect("SCRIPT EXISTS");
    assert_eq!(loaded, [1], "decide.lua was loaded as a script");
}

const DECIDE_LUA: &str = include_str!("../src/redis/decide.lua");

fn differential(url: &str) {
    let policies = [
        bucket("token_bucket", "hold = \"2s\"\ncost = { header = \"x-cost\" }"),
        "[[limit]]\nname = \"odd\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 7\nrefill = \"3/10s\"\ncost = { header = \"x-cost\" }\n".to_string(),
        "[[limit]]\nname = \"w\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 5\nhold = \"30s\"\ncost = { header = \"x-cost\" }\n[[limit]]\nname = \"day\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"1d\"\ntimezone = \"America/New_York\"\nquota = 40\n".to_string(),
        "[[limit]]\nname = \"s\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"sliding_window\"\nevery = \"10s\"\nsegments = 7\nquota = 6\nhold = \"3s\"\ncost = { header = \"x-cost\" }\n".to_string(),
        "[[limit]]\nname = \"t\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"tiered\"\ntiers = [{ every = \"1m\", quota = 3 }, { every = \"1h\", quota = 2 }, { every = \"1d\", quota = 2 }]\nhold = \"40s\"\ncost = { header = \"x-cost\" }\n[[limit]]\nname = \"c\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"concurrency\"\nmax = 2\n".to_string(),
        "[[limit]]\nname = \"lat\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"sliding_window\"\nevery = \"10s\"\nquota = \"4s\"\ncost = \"latency\"\n[[limit]]\nname = \"shadow\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"10s\"\nquota = 2\nmode = \"shadow\"\n".to_string(),
    ];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for text in &policies {
        let memory: Engine = open(text);
        let shared = RedisEngine::open_at(parse(text, &NoProfiles).expect("a valid policy"), url);
        let mut now = T0 + 3 * HOUR + 17;
        let mut open_requests: Vec<(Checked, Checked)> = Vec::new();
        let (mut held, mut refused) = (0, 0);
        for step in 0..300 {
            now += match next(10) {
                0 => next(1_000),
                1..=5 => next(2 * SEC),
                6..=8 => next(40 * SEC),
                _ => next(DAY),
            };
            if !open_requests.is_empty() && next(3) == 0 {
                let (m, r) = open_requests.swap_remove(next(open_requests.len() as u64) as usize);
                let latency = next(3_000_000);
                Backend::finish(&memory, &m, now, latency);
                shared.finish(&r, now, latency);
                continue;
            }
            let cost = (1 + next(3)).to_string();
            let name = ["a", "b"][next(2) as usize];
            let r = req(&[("x-tenant", name), ("x-cost", &cost)]);
            let (m, d) = match (Backend::check(&memory, &r, now), shared.check(&r, now)) {
                (Ok(m), Ok(d)) => (m, d),
                (m, d) => {
                    assert_eq!(m.map(|c| c.decision), d.map(|c| c.decision));
                    continue;
                }
            };
            assert_eq!(
                m.decision,
                d.decision,
                "step {step} at T0+{}ns, policy:\n{text}",
                now - T0
            );
            match m.decision.verdict {
                Verdict::Admit { delay: 0 } => {}
                Verdict::Admit { .. } => held += 1,
                _ => refused += 1,
            }
            if m.decision.allowed() {
                open_requests.push((m, d));
            }
        }
        // The traffic reached the interesting paths, not only "admit now".
        assert!(refused > 0, "nothing refused under:\n{text}");
        if text.contains("hold") {
            assert!(held > 0, "nothing held under:\n{text}");
        }
    }
}

/// Decisions sent together (queued while the connection was busy) are made
/// in one script call, in the order they were queued, each exactly as if it
/// had been a call of its own: a memory engine deciding the same requests
/// one by one agrees with every decision.
#[test]
fn redis_decisions_queued_together_share_a_call_and_decide_as_one_by_one() {
    use std::sync::Arc;
    use tollgate_store::redis::RedisStore;
    let text = "[[limit]]\nname = \"b\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = \"2/s\"\nhold = \"1s\"\ncost = { header = \"x-cost\" }\n[[limit]]\nname = \"w\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"10s\"\nquota = 12\n";
    let mut policy = parse(text, &NoProfiles).expect("a valid policy");
    policy.store.redis = Some(RedisSettings {
        // Every decision from Redis (remembered denials are tested below).
        remember_denials: false,
        ..redis_settings(tollgate_testkit::unique_prefix("batched"))
    });
    let memory = Engine::new(policy.clone());
    let policy = Arc::new(policy);
    let store = Arc::new(
        RedisStore::new(
            policy.store.redis.as_ref().expect("redis settings"),
            &policy,
            "batched",
            TimeSource::Caller,
        )
        .expect("a policy the Redis store can run"),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    runtime.block_on(store.connect()).expect("redis answers");
    let (mut decisions, mut refused, mut held) = (0u64, 0, 0);
    let mut now = T0 + 5 * HOUR;
    for round in 0..12 {
        now += next(4 * SEC);
        // 40 requests at once: more than one call carries (32).
        let batch: Vec<Vec<tollgate_core::Item>> = (0..40)
            .map(|_| {
                let cost = (1 + next(2)).to_string();
                let name = ["a", "b", "c"][next(3) as usize];
                let mut items = Vec::new();
                policy
                    .plan(&req(&[("x-tenant", name), ("x-cost", &cost)]), &mut items)
                    .expect("planned");
                items
            })
            .collect();
        let shared: Vec<Decision> = runtime.block_on(async {
            let tasks: Vec<_> = batch
                .iter()
                .map(|items| {
                    let (store, policy, items) = (store.clone(), policy.clone(), items.clone());
                    tokio::spawn(async move { store.decide(&policy, &items, now, true).await })
                })
                .collect();
            let mut out = Vec::new();
            for task in tasks {
                out.push(task.await.expect("task").expect("redis decides"));
            }
            out
        });
        for (i, (items, d)) in batch.iter().zip(&shared).enumerate() {
            let m = memory.decide(items, now, true).expect("memory decides");
            assert_eq!(m, *d, "round {round}, request {i}");
            match m.verdict {
                Verdict::Admit { delay: 0 } => {}
                Verdict::Admit { .. } => held += 1,
                _ => refused += 1,
            }
            decisions += 1;
        }
    }
    assert!(refused > 0 && held > 0, "refused {refused}, held {held}");
    let calls = store.calls();
    assert!(
        calls < decisions / 4,
        "{decisions} decisions took {calls} calls"
    );
}

/// A denial with a retry instant is remembered: the same request is denied
/// again without a call until then, with the wait that is left; at that
/// instant Redis decides again. A request with a concurrency limit is never
/// answered from memory (a release frees room at any moment).
#[test]
fn redis_remembers_a_denial_until_its_retry_instant() {
    use std::sync::Arc;
    use tollgate_store::redis::RedisStore;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let store = |text: &str| {
        let mut policy = parse(text, &NoProfiles).expect("a valid policy");
        policy.store.redis = Some(redis_settings(tollgate_testkit::unique_prefix("denials")));
        let store = RedisStore::new(
            policy.store.redis.as_ref().expect("redis settings"),
            &policy,
            "denials",
            TimeSource::Caller,
        )
        .expect("a policy the Redis store can run");
        (Arc::new(policy), store)
    };
    let items = |policy: &Policy, tenant: &str| {
        let mut items = Vec::new();
        policy
            .plan(&req(&[("x-tenant", tenant)]), &mut items)
            .expect("planned");
        items
    };
    runtime.block_on(async {
        // 3 tokens, one more each second.
        let (policy, s) = store(&bucket("token_bucket", ""));
        let memory = Engine::new((*policy).clone());
        let a = items(&policy, "a");
        let t = T0 + HOUR;
        let decide = |now: Nanos| s.decide(&policy, &a, now, false);
        for _ in 0..3 {
            assert_eq!(decide(t).await.expect("decided").verdict, NOW);
            memory.decide(&a, t, false).expect("memory");
        }
        let calls = s.calls();
        assert_eq!(decide(t).await.expect("decided").verdict, denied(0, SEC));
        assert_eq!(s.calls(), calls + 1, "the first denial asks Redis");
        for later in [0, 300 * MS, SEC - 1] {
            let remembered = decide(t + later).await.expect("decided");
            let m = memory.decide(&a, t + later, false).expect("memory");
            assert_eq!(remembered, m, "{later} ns after the denial");
            assert_eq!(remembered.verdict, denied(0, SEC - later));
        }
        assert_eq!(s.calls(), calls + 1, "denied again without a call");
        // Another tenant is its own request: Redis decides it.
        assert_eq!(decide_for(&s, &policy, &items(&policy, "b"), t).await, NOW);
        assert_eq!(s.calls(), calls + 2);
        // At the retry instant Redis decides again, and admits.
        assert_eq!(decide(t + SEC).await.expect("decided").verdict, NOW);
        assert_eq!(s.calls(), calls + 3);

        // Concurrency: every denial asks Redis.
        let (policy, s) = store(
            "[[limit]]\nname = \"c\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"concurrency\"\nmax = 1\n[[limit]]\nname = \"w\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 1\n",
        );
        let a = items(&policy, "a");
        assert_eq!(decide_for(&s, &policy, &a, t).await, NOW);
        let calls = s.calls();
        for _ in 0..3 {
            assert!(matches!(
                decide_for(&s, &policy, &a, t).await,
                Verdict::Deny { .. }
            ));
        }
        assert_eq!(s.calls(), calls + 3);
    });
}

async fn decide_for(
    store: &tollgate_store::redis::RedisStore,
    policy: &Policy,
    items: &[tollgate_core::Item],
    now: Nanos,
) -> Verdict {
    store
        .decide(policy, items, now, false)
        .await
        .expect("decided")
        .verdict
}

/// A key that something else overwrote makes the decision script fail on
/// Redis: the limit follows its fail mode (closed: an error naming the
/// script, not an outage), and the store is not marked down.
#[test]
fn a_script_error_is_named_and_does_not_mark_the_store_down() {
    let shared =
        RedisEngine::open(parse(&bucket("token_bucket", ""), &NoProfiles).expect("policy"));
    let r = tenant("a");
    assert!(admitted(&decide(&shared, &r, T0)));
    let mut conn = redis_conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", shared.prefix))
        .query(&mut conn)
        .expect("KEYS");
    assert!(!keys.is_empty());
    for key in &keys {
        let () = redis::cmd("SET")
            .arg(key)
            .arg("not|a|state")
            .query(&mut conn)
            .expect("SET");
    }
    let err = shared.engine.check(&r, T0 + SEC).expect_err("fails closed");
    assert!(
        err.to_string().contains("the decision script failed"),
        "{err}"
    );
    let health = shared.engine.health().expect("fleet mode");
    assert!(health.up(), "Redis answered: not down");
    assert!(health.errors() >= 1);
    assert_eq!(health.fail_closed(), 1);
    // A key of another type there (a list): Redis says WRONGTYPE, which is
    // no outage either.
    for key in &keys {
        let () = redis::cmd("DEL").arg(key).query(&mut conn).expect("DEL");
        let _: i64 = redis::cmd("RPUSH")
            .arg(key)
            .arg("x")
            .query(&mut conn)
            .expect("RPUSH");
    }
    let err = shared
        .engine
        .check(&r, T0 + 2 * SEC)
        .expect_err("fails closed");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert!(health.up(), "Redis answered: not down");
    assert_eq!(health.fail_closed(), 2);
}
