//! Each bundled profile against the arithmetic of its source, on the real
//! engine with a fake clock: instants are passed in, nothing sleeps. A client
//! that wants to go as fast as allowed sends one request at a time and, when
//! denied, jumps the clock to the retry instant it was given.

use tollgate_core::{parse, Attrs, NoProfiles, Policy, ProfileSource, Verdict};
use tollgate_profiles::{get, list, Bundled};
use tollgate_store::{Checked, Engine};

use tollgate_core::units::{Nanos, DAY, HOUR as H, MILLISECOND as MS, MINUTE as MIN, SECOND as S};
/// 2026-01-01T00:00:00Z: a UTC midnight, so every clock-aligned window starts here.
const T0: Nanos = 1_767_225_600 * S;
/// Microseconds per second (latency amounts are microseconds).
const US: u64 = 1_000_000;

const NAMES: [&str; 10] = [
    "crm",
    "gateway",
    "data-api",
    "celigo",
    "hubspot",
    "salesforce",
    "outreach",
    "salesloft",
    "apollo",
    "linkedin",
];

fn policy(name: &str) -> Policy {
    let text = get(name).unwrap_or_else(|| panic!("profile {name} is bundled"));
    parse(text, &NoProfiles).unwrap_or_else(|e| panic!("profile {name}: {e}"))
}

fn engine(name: &str) -> Engine {
    Engine::new(policy(name))
}

fn limit_index(engine: &Engine, name: &str) -> usize {
    engine
        .policy()
        .limits
        .iter()
        .position(|l| l.name == name)
        .unwrap_or_else(|| panic!("no limit {name}"))
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Attrs {
    Attrs::new(method, path, headers)
}

fn with_host(mut r: Attrs, host: &str) -> Attrs {
    r.host = Some(host.into());
    r
}

fn check(e: &Engine, r: &Attrs, t: Nanos) -> Checked {
    e.check(r, t).expect("a well-formed request")
}

fn verdict(e: &Engine, r: &Attrs, t: Nanos) -> Verdict {
    check(e, r, t).decision.verdict
}

/// Send `r` at `t` until it is not admitted at once; how many were, and the verdict that stopped it.
fn burst(e: &Engine, r: &Attrs, t: Nanos) -> (u64, Verdict) {
    let mut n = 0;
    loop {
        let c = check(e, r, t);
        match c.decision.verdict {
            Verdict::Admit { delay: 0 } => {
                e.finish(&c, t, 0);
                n += 1;
            }
            other => return (n, other),
        }
    }
}

/// The retry_after of a denial (panics on anything else).
fn retry_after(v: Verdict) -> Nanos {
    match v {
        Verdict::Deny {
            retry_after: Some(wait),
            ..
        } => wait,
        other => panic!("expected a denial with retry_after, got {other:?}"),
    }
}

/// The greedy client: one request at a time over `[from, until)`, each at the
/// earliest instant it is allowed. Returns the instants at which admitted
/// requests run. Without holds, every denial's retry_after is checked to be
/// exact: one nanosecond before it the request is still denied.
fn greedy(e: &Engine, r: &Attrs, from: Nanos, until: Nanos) -> Vec<Nanos> {
    // With a hold, a request just before the retry instant is held, not
    // denied, and checking it would reserve a slot: check only without holds.
    let exact = e.policy().limits.iter().all(|l| l.hold == 0);
    let mut t = from;
    let mut runs = Vec::new();
    while t < until {
        let c = check(e, r, t);
        match c.decision.verdict {
            Verdict::Admit { delay } => {
                if t + delay >= until {
                    break;
                }
                runs.push(t + delay);
                e.finish(&c, t + delay, 0);
            }
            other => {
                let wait = retry_after(other);
                assert!(wait > 0, "a denial must point to the future");
                if exact {
                    assert!(
                        !check(e, r, t + wait - 1).decision.allowed(),
                        "retry_after {wait} ns at {t} is late: admitted 1 ns earlier"
                    );
                }
                t += wait;
            }
        }
    }
    runs
}

/// The most of `runs` (sorted) that fall in any half-open span `[s, s + span)`.
fn max_in_any(span: Nanos, runs: &[Nanos]) -> usize {
    let mut end = 0;
    let mut most = 0;
    for (start, &t) in runs.iter().enumerate() {
        while end < runs.len() && runs[end] < t + span {
            end += 1;
        }
        most = most.max(end - start);
    }
    most
}

// ---------------------------------------------------------------- all profiles

#[test]
fn every_profile_parses_alone_and_by_name() {
    let infos = list();
    assert_eq!(
        infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        NAMES
    );
    assert_eq!(Bundled.profile_names(), NAMES);
    for info in &infos {
        let alone = policy(&info.name);
        let config = format!("profile = \"{}\"\n", info.name);
        let included = parse(&config, &Bundled).unwrap_or_else(|e| panic!("{}: {e}", info.name));
        assert_eq!(included.profile.as_deref(), Some(info.name.as_str()));
        let names = |p: &Policy| p.limits.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&alone), names(&included), "{}", info.name);
        assert_eq!(alone.classes.len(), included.classes.len(), "{}", info.name);
        assert!(!alone.limits.is_empty(), "{}", info.name);
    }
    assert_eq!(get("nope"), None);
    let e = parse("profile = \"nope\"\n", &Bundled).expect_err("an unknown profile");
    assert!(
        e.to_string().contains("known profiles: crm, gateway"),
        "{e}"
    );
}

#[test]
fn every_profile_states_title_source_and_assumptions() {
    for info in list() {
        let about: toml::Table = toml::from_str(get(&info.name).expect("bundled")).expect("toml");
        let about = about["about"].as_table().expect("an [about] table");
        assert_eq!(about["name"].as_str(), Some(info.name.as_str()));
        assert!(!info.title.is_empty(), "{}: title", info.name);
        assert!(!info.source.is_empty(), "{}: source", info.name);
        for list in ["notes", "assumptions"] {
            let items = about[list].as_array().expect("an array of sentences");
            assert!(!items.is_empty(), "{}: {list}", info.name);
        }
    }
}

// -------------------------------------------- crm: a CRM's rate-limit page

#[test]
fn crm_100_per_60_s_shared_by_rest_and_graphql() {
    let e = engine("crm");
    let key = [("authorization", "Bearer ws-1")];
    let rest = req("PATCH", "/rest/opportunities/42", &key);
    let graphql = req("POST", "/graphql", &key);
    for _ in 0..50 {
        assert_eq!(verdict(&e, &rest, T0), Verdict::Admit { delay: 0 });
        assert_eq!(verdict(&e, &graphql, T0), Verdict::Admit { delay: 0 });
    }
    // The 101st, by either API, is denied; the quota is back once (t - 60 s, t]
    // no longer overlaps the burst's 1 s sub-window (the documented precision).
    assert_eq!(retry_after(verdict(&e, &graphql, T0)), 61 * S - 1);
    assert_eq!(retry_after(verdict(&e, &rest, T0 + 30 * S)), 31 * S - 1);
    assert!(!check(&e, &rest, T0 + 61 * S - 2).decision.allowed());
    assert_eq!(burst(&e, &rest, T0 + 61 * S - 1).0, 100);
    // Another workspace has its own quota.
    let other = req(
        "GET",
        "/rest/companies",
        &[("authorization", "Bearer ws-2")],
    );
    assert_eq!(burst(&e, &other, T0).0, 100);

    // As fast as allowed for an hour: bursts of 100 every 61 s, never more
    // than 100 in any 60 s.
    let e = engine("crm");
    let runs = greedy(&e, &rest, T0, T0 + H);
    assert_eq!(runs.len(), 6_000); // bursts at 0, 61, ..., 59 * 61 = 3599 s
    assert_eq!(max_in_any(60 * S, &runs), 100);
}

// ------------------------------- gateway: an API gateway's rate-limit page

#[test]
fn gateway_bursts_60_then_1_per_s_and_holds_up_to_2_s() {
    let e = engine("gateway");
    let get = req("GET", "/v1/jobs", &[("x-tenant-id", "acme")]);
    let (n, next) = burst(&e, &get, T0);
    assert_eq!(n, 60);
    // A token frees every second: within the 2 s hold the request waits for it.
    assert_eq!(next, Verdict::Admit { delay: S });
    assert_eq!(verdict(&e, &get, T0), Verdict::Admit { delay: 2 * S });
    assert_eq!(
        verdict(&e, &get, T0),
        // It would run at +3 s; arriving at +1 s it is held the allowed 2 s.
        Verdict::Deny {
            limit: limit_index(&e, "tenant"),
            retry_after: Some(S)
        }
    );
    assert_eq!(verdict(&e, &get, T0 + 3 * S), Verdict::Admit { delay: 0 });
    // Polling at 1 Hz from then on uses exactly the refill: never held, never denied.
    for k in 4..600 {
        assert_eq!(verdict(&e, &get, T0 + k * S), Verdict::Admit { delay: 0 });
    }
    // Outside /v1/* nothing is limited; another tenant has its own buckets.
    assert!(check(&e, &req("GET", "/health", &[]), T0).items.is_empty());
    let other = req("GET", "/v1/jobs", &[("x-tenant-id", "globex")]);
    assert_eq!(burst(&e, &other, T0).0, 60);

    // As fast as allowed (held requests included): 60 at once, then one per second.
    let e = engine("gateway");
    let runs = greedy(&e, &get, T0, T0 + 10 * MIN);
    assert_eq!(runs.len(), 60 + 599);
    assert_eq!(runs.iter().filter(|&&t| t == T0).count(), 60);
    assert!(runs[60..].windows(2).all(|w| w[1] - w[0] == S));
}

#[test]
fn gateway_writes_take_both_buckets_and_refill_every_1_5_s() {
    let e = engine("gateway");
    let (tenant, writes) = (limit_index(&e, "tenant"), limit_index(&e, "writes"));
    let post = req("POST", "/v1/jobs", &[("x-tenant-id", "acme")]);
    let get = req("GET", "/v1/jobs", &[("x-tenant-id", "acme")]);
    let (n, next) = burst(&e, &post, T0);
    assert_eq!(n, 40);
    assert_eq!(next, Verdict::Admit { delay: 1_500 * MS });
    assert_eq!(
        verdict(&e, &post, T0),
        // It would run at +3 s; arriving at +1 s it is held the allowed 2 s.
        Verdict::Deny {
            limit: writes,
            retry_after: Some(S)
        }
    );
    // The 41 writes also took 41 of the tenant's 60; the denied one took nothing.
    let (n, next) = burst(&e, &get, T0);
    assert_eq!(n, 19);
    assert_eq!(next, Verdict::Admit { delay: S });
    assert_eq!(verdict(&e, &get, T0), Verdict::Admit { delay: 2 * S });
    assert_eq!(
        verdict(&e, &get, T0),
        Verdict::Deny {
            limit: tenant,
            retry_after: Some(S)
        }
    );

    // Writes alone, as fast as allowed for 10 minutes: 40 at once, then one
    // per 1.5 s ("one every ~1.5 sec to match refill").
    let e = engine("gateway");
    let runs = greedy(&e, &post, T0, T0 + 10 * MIN);
    assert_eq!(runs.len(), 40 + 399); // 1.5 s, 3 s, ..., 598.5 s
    assert!(runs[40..].windows(2).all(|w| w[1] - w[0] == 1_500 * MS));
    // The gateway page's nightly import at one create every 2 s is never held.
    let e = engine("gateway");
    for k in 0..500 {
        assert_eq!(
            verdict(&e, &post, T0 + 2 * k * S),
            Verdict::Admit { delay: 0 }
        );
    }
}

// ----------------------------- data-api: the data API's rate-limit article

fn data_api(sandbox: bool) -> Attrs {
    let headers: &[(&str, &str)] = if sandbox {
        &[("x-environment", "sandbox")]
    } else {
        &[]
    };
    with_host(req("GET", "/api/data", headers), "shop.example.com")
}

#[test]
fn data_api_largest_day_is_207_550() {
    // The data API's article: "The max requests you can do per day is: (100 *
    // 60 * 24) + (2600 * 24) + 1150", which is 144,000 + 62,400 + 1,150 = 207,550.
    let e = engine("data-api");
    let r = data_api(false);
    let runs = greedy(&e, &r, T0, T0 + DAY);
    assert_eq!(runs.len(), 100 * 60 * 24 + 2_600 * 24 + 1_150);
    assert_eq!(runs.len(), 207_550);
    // All three pools are open at midnight: 100 + 2600 + 1150 at once.
    assert_eq!(runs.iter().filter(|&&t| t == T0).count(), 3_850);
    // The next day starts afresh at midnight UTC.
    assert_eq!(burst(&e, &r, T0 + DAY).0, 3_850);
}

#[test]
fn data_api_sandbox_gets_half_of_each_count_pool() {
    let e = engine("data-api");
    let sandbox = data_api(true);
    let (n, next) = burst(&e, &sandbox, T0);
    assert_eq!(n, 50 + 1_300 + 575);
    assert_eq!(retry_after(next), MIN);
    assert_eq!(burst(&e, &sandbox, T0 + MIN).0, 50);
    // Production under the same host is counted apart, at full size.
    assert_eq!(burst(&e, &data_api(false), T0).0, 3_850);

    let e = engine("data-api");
    let runs = greedy(&e, &sandbox, T0, T0 + DAY);
    assert_eq!(runs.len(), 50 * 60 * 24 + 1_300 * 24 + 575);
}

#[test]
fn data_api_faq_2600_at_13_59_then_2700_at_14_01() {
    // "Suppose I send 2600 requests at 13:59, exhausting the hour-rate limit.
    // Will I be able to send another 2600 at 14:01? Yes, but only within that
    // hour, increased by the amount of queries you are allowed to make in that
    // 1st minute." The day pool is spent first so that only those two count.
    let e = engine("data-api");
    let r = data_api(false);
    assert_eq!(burst(&e, &r, T0).0, 3_850);
    // At 13:59 the minute's 100 and the hour's 2600.
    let (n, next) = burst(&e, &r, T0 + 13 * H + 59 * MIN);
    assert_eq!(n, 100 + 2_600);
    assert_eq!(retry_after(next), MIN);
    let at_14_01 = T0 + 14 * H + MIN;
    let (n, next) = burst(&e, &r, at_14_01);
    assert_eq!(n, 2_600 + 100);
    assert_eq!(retry_after(next), MIN);
}

/// Spend every latency pool with one long request, then fill the next minute
/// with requests of 0.6 s each: how many fit before the denial.
fn latency_minute(sandbox: bool) -> u64 {
    let e = engine("data-api");
    let latency = limit_index(&e, "latency");
    let r = data_api(sandbox);
    let all_pools = if sandbox { 296_250_000 } else { 592_500_000 }; // µs
    let c = check(&e, &r, T0);
    assert!(c.decision.allowed());
    assert_eq!(c.decision.outcomes[latency].remaining, all_pools);
    let done = T0 + all_pools * 1_000;
    e.finish(&c, done, all_pools);
    // Every pool is empty: denied by latency until the minute pool refreshes.
    let next_minute = (done / MIN + 1) * MIN;
    let c = check(&e, &r, done);
    assert_eq!(
        c.decision.verdict,
        Verdict::Deny {
            limit: latency,
            retry_after: Some(next_minute - done)
        }
    );
    assert_eq!(c.decision.outcomes[latency].remaining, 0);
    let mut t = next_minute;
    let mut n = 0;
    loop {
        let c = check(&e, &r, t);
        if !c.decision.allowed() {
            assert_eq!(retry_after(c.decision.verdict), next_minute + MIN - t);
            return n;
        }
        t += 600 * MS;
        e.finish(&c, t, 600_000);
        n += 1;
    }
}

#[test]
fn data_api_latency_pools_debit_at_completion_and_deny_when_spent() {
    // The article's example: "if 25 requests are being sent which in total sum up
    // to 15 seconds, the limit is reached" (the sandbox's 15 s minute pool).
    assert_eq!(latency_minute(true), 25);
    // Production has the table's 30 s per minute.
    assert_eq!(latency_minute(false), 50);

    // Spill: past the minute's 30 s the hour pool pays, then the day pool.
    let e = engine("data-api");
    let latency = limit_index(&e, "latency");
    let r = data_api(false);
    let c = check(&e, &r, T0);
    e.finish(&c, T0 + 45 * S, 45 * US);
    let c = check(&e, &r, T0 + 45 * S);
    assert!(c.decision.allowed());
    assert_eq!(
        c.decision.outcomes[latency].remaining,
        (375 + 172) * US + US / 2
    );
    // "you could perform 99 requests per minute which have a total latency of
    // 14 seconds": all admitted, 14 s debited from a fresh minute pool.
    let e = engine("data-api");
    let mut t = T0;
    for i in 0..99 {
        let c = check(&e, &r, t);
        assert!(c.decision.allowed(), "request {i}");
        let us = if i < 98 {
            141_000
        } else {
            14 * US - 98 * 141_000
        };
        t += us * 1_000;
        e.finish(&c, t, us);
    }
    let c = check(&e, &r, t);
    assert_eq!(
        c.decision.outcomes[latency].remaining,
        (16 + 390) * US + 172 * US + US / 2
    );
}

// ---------------------------------------- celigo: Celigo's rate-limit page

#[test]
fn celigo_bursts_1000_and_denies_for_one_token() {
    let e = engine("celigo");
    let r = req("GET", "/v1/flows", &[("authorization", "Bearer acct-1")]);
    let (n, next) = burst(&e, &r, T0);
    assert_eq!(n, 1_000);
    // One token is 1/300 s, rounded up to whole nanoseconds.
    assert_eq!(
        next,
        Verdict::Deny {
            limit: 0,
            retry_after: Some(3_333_334)
        }
    );
    assert!(!check(&e, &r, T0 + 3_333_333).decision.allowed());
    assert_eq!(burst(&e, &r, T0 + 3_333_334).0, 1);
    // Another account has its own bucket.
    let other = req("GET", "/v1/flows", &[("authorization", "Bearer acct-2")]);
    assert_eq!(burst(&e, &other, T0).0, 1_000);
}

#[test]
fn celigo_refills_exactly_300_per_second() {
    let e = engine("celigo");
    let r = req("GET", "/v1/flows", &[("authorization", "Bearer acct-1")]);
    assert_eq!(burst(&e, &r, T0).0, 1_000);
    for s in 1..=60 {
        let (n, _) = burst(&e, &r, T0 + s * S);
        assert_eq!(n, 300, "second {s} after the burst");
    }
}

// ---------------------------------- the GTM rate-limiting guide's profiles

/// A rolling-window profile: a burst of exactly `quota` at once, the next
/// denied until (t - every, t] stops overlapping the burst's sub-window
/// (`every + sub - 1 ns`), and as fast as allowed over `span`: that second
/// burst lands on the last nanosecond of its sub-window, so from then on a
/// burst every `every`, never more than `quota` in any `every`.
fn rolling(name: &str, quota: u64, every: Nanos, sub: Nanos, span: Nanos) {
    let e = engine(name);
    let r = with_host(
        req("GET", "/", &[("authorization", "Bearer k1")]),
        "org1.example.com",
    );
    let (n, next) = burst(&e, &r, T0);
    assert_eq!(n, quota, "{name}: burst");
    assert_eq!(retry_after(next), every + sub - 1, "{name}: retry_after");

    let e = engine(name);
    let runs = greedy(&e, &r, T0, T0 + span);
    let bursts = 1 + (span - 1 - (every + sub - 1)) / every + 1;
    assert_eq!(runs.len() as u64, quota * bursts, "{name}: over the span");
    assert_eq!(max_in_any(every, &runs) as u64, quota, "{name}: any window");
}

#[test]
fn outreach_10_000_per_rolling_hour() {
    rolling("outreach", 10_000, H, MIN, 6 * H);
}

#[test]
fn salesloft_600_per_rolling_minute() {
    rolling("salesloft", 600, MIN, S, H);
}

#[test]
fn apollo_300_per_rolling_minute() {
    rolling("apollo", 300, MIN, S, H);
}

#[test]
fn linkedin_100_per_rolling_day() {
    rolling("linkedin", 100, DAY, 10 * MIN, 3 * DAY);
}

#[test]
fn hubspot_200_per_second_and_500_000_per_utc_day() {
    let e = engine("hubspot");
    let daily = limit_index(&e, "daily");
    let r = req(
        "GET",
        "/crm/v3/objects/contacts",
        &[("authorization", "Bearer app")],
    );
    let (n, next) = burst(&e, &r, T0);
    assert_eq!(n, 200);
    assert_eq!(retry_after(next), S + 10 * MS - 1); // one 10 ms sub-window of precision

    // As fast as allowed for a whole UTC day: exactly 500,000, never more than
    // 200 in any second, then nothing until midnight.
    let e = engine("hubspot");
    let runs = greedy(&e, &r, T0, T0 + DAY);
    assert_eq!(runs.len(), 500_000);
    assert_eq!(max_in_any(S, &runs), 200);
    let last = *runs.last().expect("admissions");
    assert_eq!(
        verdict(&e, &r, last + H),
        Verdict::Deny {
            limit: daily,
            retry_after: Some(T0 + DAY - last - H)
        }
    );
    assert_eq!(burst(&e, &r, T0 + DAY).0, 200);
}

#[test]
fn salesforce_100_000_per_rolling_24_h() {
    // A client that sends up to 10,000 at the top of every hour for 48 hours.
    let e = engine("salesforce");
    let rolling = limit_index(&e, "rolling");
    let r = with_host(
        req("GET", "/services/data/v60.0/sobjects", &[]),
        "acme.my.salesforce.com",
    );
    let mut runs = Vec::new();
    let mut per_hour = Vec::new();
    for h in 0..48 {
        let t = T0 + h * H;
        let mut n = 0;
        while n < 10_000 {
            let c = check(&e, &r, t);
            match c.decision.verdict {
                Verdict::Admit { delay: 0 } => {
                    e.finish(&c, t, 0);
                    runs.push(t);
                    n += 1;
                }
                Verdict::Deny {
                    limit,
                    retry_after: Some(wait),
                } => {
                    assert_eq!(limit, rolling);
                    // Free when (t - 24 h, t] stops overlapping the oldest burst's 10 min sub-window.
                    let oldest = runs[runs.len() - 100_000];
                    assert_eq!(t + wait, oldest + DAY + 10 * MIN - 1);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        per_hour.push(n);
    }
    // Hours 0-9 fill the 100,000; the next ten come back at 25-34 (24 h and
    // one 10 min sub-window after each, the documented precision).
    let expect: Vec<u64> = (0..48)
        .map(|h| {
            if h < 10 || (25..35).contains(&h) {
                10_000
            } else {
                0
            }
        })
        .collect();
    assert_eq!(per_hour, expect);
    assert_eq!(runs.len(), 200_000);
    assert_eq!(max_in_any(DAY, &runs), 100_000);
}

#[test]
fn salesforce_25_in_flight() {
    let e = engine("salesforce");
    let (rolling, concurrent) = (limit_index(&e, "rolling"), limit_index(&e, "concurrent"));
    let r = with_host(
        req("GET", "/services/data/v60.0/query", &[]),
        "acme.my.salesforce.com",
    );
    let in_flight: Vec<Checked> = (0..25)
        .map(|_| check(&e, &r, T0))
        .inspect(|c| assert_eq!(c.decision.verdict, Verdict::Admit { delay: 0 }))
        .collect();
    let c = check(&e, &r, T0 + S);
    // Only a completion frees a slot: no retry instant can be promised.
    assert_eq!(
        c.decision.verdict,
        Verdict::Deny {
            limit: concurrent,
            retry_after: None
        }
    );
    // The denied call took nothing from the daily quota.
    assert_eq!(c.decision.outcomes[rolling].remaining, 100_000 - 25);
    e.finish(&in_flight[0], T0 + 2 * S, 0);
    let c = check(&e, &r, T0 + 2 * S);
    assert_eq!(c.decision.verdict, Verdict::Admit { delay: 0 });
    assert_eq!(c.decision.outcomes[rolling].remaining, 100_000 - 26);
    assert!(!check(&e, &r, T0 + 2 * S).decision.allowed());
    // Another org has its own 25.
    let other = with_host(r.clone(), "globex.my.salesforce.com");
    for _ in 0..25 {
        assert!(check(&e, &other, T0).decision.allowed());
    }
    assert!(!check(&e, &other, T0).decision.allowed());
}
