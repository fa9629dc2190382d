//! Envoy's rate limit service (`[rls]`) driven by a client others generated
//! from Envoy's API: Python grpcio with the xds-protos package
//! (`rls_client.py`), over a real gRPC connection on 127.0.0.1.

mod common;

use common::start;
use serde_json::{json, Value};

/// Send `requests` to the service at `addr` over `streams` threads; the
/// answers in order.
async fn ask(addr: std::net::SocketAddr, streams: usize, requests: &[Value]) -> Vec<Value> {
    use tokio::io::AsyncWriteExt;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rls_client.py");
    let mut child = tokio::process::Command::new("python3")
        .args([script, &addr.to_string(), &streams.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test.sh installs grpcio and xds-protos)");
    let lines: String = requests.iter().map(|r| format!("{r}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(lines.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("client");
    assert!(
        out.status.success(),
        "rls_client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn descriptor(entries: &[(&str, &str)]) -> Value {
    json!({ "entries": entries.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>() })
}

fn request(domain: &str, descriptors: &[Value]) -> Value {
    json!({ "domain": domain, "descriptors": descriptors })
}

const GATEWAY: &str = "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = \"off\"\n[rls]\nlisten = \"127.0.0.1:0\"\n";

const LIMITS: &str = r#"
[[limit]]
name = "per-tenant"
key = ["descriptor:tenant"]
match = { domain = "edge", descriptor_keys = ["tenant"] }
algorithm = "fixed_window"
every = "1h"
quota = 5

[[limit]]
name = "per-path"
key = ["descriptor:path"]
match = { domain = "edge", descriptor_keys = ["path"] }
algorithm = "token_bucket"
capacity = 3
refill = "1/h"

[[limit]]
name = "free-plan"
key = ["descriptor:tenant"]
match = { domain = "edge", descriptors = { plan = "free" } }
algorithm = "sliding_window"
every = "1m"
quota = 2

[[limit]]
name = "pooled"
match = { domain = "batch" }
algorithm = "tiered"
tiers = [{ every = "1m", quota = 4 }, { every = "1h", quota = 100 }]

[[limit]]
name = "shared"
match = { domain = "shared" }
algorithm = "fixed_window"
every = "1h"
quota = 3

[[limit]]
name = "drip"
match = { domain = "drip" }
algorithm = "leaky_bucket"
capacity = 2
refill = "1/h"
"#;

fn codes(answer: &Value) -> Vec<&str> {
    answer["statuses"]
        .as_array()
        .expect("statuses")
        .iter()
        .map(|s| s["code"].as_str().expect("code"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_are_decided_all_or_nothing_with_statuses_in_order() {
    let gateway = start(&format!("{GATEWAY}{LIMITS}")).await;
    let addr = gateway.rls.expect("rls listener");
    let both = request(
        "edge",
        &[
            descriptor(&[("tenant", "acme")]),
            descriptor(&[("path", "/a")]),
        ],
    );
    let tenant_only = request("edge", &[descriptor(&[("tenant", "acme")])]);
    let answers = ask(
        addr,
        1,
        &[both.clone(), both.clone(), both.clone(), both, tenant_only],
    )
    .await;
    let first = &answers[0];
    assert_eq!(first["overall"], "OK");
    assert_eq!(codes(first), ["OK", "OK"]);
    assert_eq!(
        first["statuses"][0]["limit"],
        json!({"name": "per-tenant", "per_unit": 5, "unit": "HOUR"})
    );
    assert_eq!(first["statuses"][0]["remaining"], 4);
    // The hourly window started at the clock's start: it resets within the hour.
    let reset_ms = first["statuses"][0]["reset_ms"].as_u64().expect("reset");
    assert!((3_590_000..=3_600_000).contains(&reset_ms), "{reset_ms}");
    assert_eq!(first["statuses"][1]["limit"]["name"], "per-path");
    assert_eq!(first["statuses"][1]["remaining"], 2);
    assert!(
        first["headers"]["ratelimit"]
            .as_str()
            .expect("ratelimit")
            .contains("\"per-tenant\";r=4"),
        "{first}"
    );
    // The path's bucket is empty at the fourth: the request is refused
    // whole, and only the path's descriptor is over its limit ...
    let fourth = &answers[3];
    assert_eq!(fourth["overall"], "OVER_LIMIT");
    assert_eq!(codes(fourth), ["OK", "OVER_LIMIT"]);
    assert!(
        fourth["headers"]["retry-after"].as_str().is_some(),
        "{fourth}"
    );
    // ... and the tenant's window was not charged for it: 5 - 3 - 1 left.
    assert_eq!(answers[4]["statuses"][0]["remaining"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_in_one_request_and_a_descriptor_that_only_checks() {
    let gateway = start(&format!("{GATEWAY}{LIMITS}")).await;
    let addr = gateway.rls.expect("rls listener");
    // Two descriptors naming two tenants of one limit: two keys of one
    // table, some pairs in one shard (which once locked it twice, and hung).
    let pairs: Vec<_> = (0..100)
        .map(|n| {
            request(
                "edge",
                &[
                    descriptor(&[("tenant", &format!("t{n}"))]),
                    descriptor(&[("tenant", &format!("u{n}"))]),
                ],
            )
        })
        .collect();
    let answers = ask(addr, 1, &pairs).await;
    assert!(answers.iter().all(|a| a["overall"] == "OK"));
    assert!(answers.iter().all(|a| codes(a) == ["OK", "OK"]));
    assert!(answers.iter().all(|a| a["statuses"][1]["remaining"] == 4));
    // A descriptor's own hits_addend of 0 asks without counting.
    let mut check = descriptor(&[("tenant", "zeta")]);
    check["hits_addend"] = json!(0);
    let answers = ask(
        addr,
        1,
        &[
            request("edge", &[check.clone()]),
            request("edge", &[check]),
            request("edge", &[descriptor(&[("tenant", "zeta")])]),
        ],
    )
    .await;
    let left: Vec<_> = answers
        .iter()
        .map(|a| a["statuses"][0]["remaining"].clone())
        .collect();
    assert_eq!(left, [json!(5), json!(5), json!(4)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_is_the_cost_and_domains_and_values_pick_the_limits() {
    let gateway = start(&format!("{GATEWAY}{LIMITS}")).await;
    let addr = gateway.rls.expect("rls listener");
    let mut heavy = descriptor(&[("tenant", "beta")]);
    heavy["hits_addend"] = json!(4);
    let mut two = descriptor(&[("tenant", "beta")]);
    two["hits_addend"] = json!(2);
    let mut at_request_level = request("edge", &[descriptor(&[("tenant", "beta")])]);
    at_request_level["hits_addend"] = json!(1);
    let free = request(
        "edge",
        &[descriptor(&[("tenant", "gamma"), ("plan", "free")])],
    );
    let answers = ask(
        addr,
        1,
        &[
            request("edge", &[heavy]),
            request("edge", &[two]),
            at_request_level,
            request("other", &[descriptor(&[("tenant", "beta")])]),
            free.clone(),
            free.clone(),
            free,
            request("batch", &[descriptor(&[("job", "x")])]),
        ],
    )
    .await;
    assert_eq!(answers[0]["statuses"][0]["remaining"], 1, "4 of 5");
    assert_eq!(answers[1]["overall"], "OVER_LIMIT", "2 more do not fit");
    assert_eq!(answers[2]["overall"], "OK", "1 does");
    assert_eq!(answers[2]["statuses"][0]["remaining"], 0);
    // No limit matches another domain: allowed, no limit to show.
    assert_eq!(answers[3]["overall"], "OK");
    assert!(
        answers[3]["statuses"][0].get("limit").is_none(),
        "{}",
        answers[3]
    );
    // `plan = free` brings the sliding window in: it is the tighter one.
    assert_eq!(answers[4]["statuses"][0]["limit"]["name"], "free-plan");
    assert_eq!(answers[5]["overall"], "OK");
    assert_eq!(answers[6]["overall"], "OVER_LIMIT");
    // A tiered limit states its pools together (a request spills from the
    // minute's into the hour's), so what is left never exceeds it.
    assert_eq!(
        answers[7]["statuses"][0]["limit"],
        json!({"name": "pooled", "per_unit": 104, "unit": "MINUTE"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_that_meet_one_counter_charge_it_with_both_costs() {
    let gateway = start(&format!("{GATEWAY}{LIMITS}")).await;
    let addr = gateway.rls.expect("rls listener");
    let two = request(
        "shared",
        &[descriptor(&[("a", "1")]), descriptor(&[("b", "2")])],
    );
    let answers = ask(addr, 1, &[two.clone(), two]).await;
    // Both descriptors meet the one domain-wide window: 2 of its 3.
    assert_eq!(answers[0]["overall"], "OK");
    assert_eq!(answers[0]["statuses"][0]["remaining"], 1);
    assert_eq!(answers[0]["statuses"][1]["remaining"], 1);
    // Two more do not fit in the 1 left, and both descriptors say so.
    assert_eq!(answers[1]["overall"], "OVER_LIMIT");
    assert_eq!(codes(&answers[1]), ["OVER_LIMIT", "OVER_LIMIT"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_streams_get_exactly_what_the_limits_allow() {
    let gateway = start(&format!("{GATEWAY}{LIMITS}")).await;
    let addr = gateway.rls.expect("rls listener");
    let requests: Vec<Value> = (0..320)
        .map(|i| match i % 2 {
            0 => request("batch", &[descriptor(&[("job", "x")])]),
            _ => request("drip", &[descriptor(&[("job", "y")])]),
        })
        .collect();
    let answers = ask(addr, 32, &requests).await;
    let ok = |domain_parity: usize| {
        (answers.iter().enumerate())
            .filter(|(i, a)| i % 2 == domain_parity && a["overall"] == "OK")
            .count()
    };
    // The tiered pools (4 for the minute, spilling into the hour's 100)
    // and the leaky bucket's 2 ...
    assert_eq!((ok(0), ok(1)), (104, 2));
    // ... as `tollgate simulate` decides the same arrivals.
    let trace: String = (0..320)
        .map(|i| match i % 2 {
            0 => "{\"t\":0,\"domain\":\"batch\",\"descriptor\":{\"job\":\"x\"}}\n",
            _ => "{\"t\":0,\"domain\":\"drip\",\"descriptor\":{\"job\":\"y\"}}\n",
        })
        .collect();
    let policy = tollgate_core::parse(&format!("{GATEWAY}{LIMITS}"), &tollgate_core::NoProfiles)
        .expect("policy");
    let options = tollgate_sim::Options {
        start: common::EPOCH,
        decisions: false,
        per_key: false,
        timeline: false,
    };
    let simulated = tollgate_sim::simulate(
        &tollgate_store::Engine::new(policy),
        options,
        trace.as_bytes(),
        std::io::sink(),
    )
    .expect("simulate");
    assert_eq!(simulated.admitted, (ok(0) + ok(1)) as u64);
    assert!(answers.iter().all(|a| a.get("error").is_none()));
    // The gateway's counters saw them.
    let metrics = reqwest::get(format!("http://{}/metrics", gateway.admin))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let admitted = metrics
        .lines()
        .find(|l| {
            l.starts_with("tollgate_decisions_total")
                && l.contains("limit=\"pooled\"")
                && l.contains("outcome=\"admitted\"")
        })
        .unwrap_or_else(|| panic!("no admitted count for 'pooled' in:\n{metrics}"));
    assert!(admitted.ends_with(" 104"), "{admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_answers_as_each_limit_s_fail_says() {
    let gone = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let config = format!(
        "{GATEWAY}[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{gone}\"\ntimeout = \"50ms\"\n\
         [[limit]]\nname = \"strict\"\nmatch = {{ domain = \"strict\" }}\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 10\nfail = \"closed\"\n\
         [[limit]]\nname = \"lenient\"\nmatch = {{ domain = \"lenient\" }}\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 10\nfail = \"open\"\n\
         [[limit]]\nname = \"on-its-own\"\nmatch = {{ domain = \"local\" }}\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 2\nfail = \"local\"\n"
    );
    let gateway = start(&config).await;
    let addr = gateway.rls.expect("rls listener");
    let answers = ask(
        addr,
        1,
        &[
            request("strict", &[descriptor(&[("k", "v")])]),
            request("lenient", &[descriptor(&[("k", "v")])]),
            request("local", &[descriptor(&[("k", "v")])]),
            request("local", &[descriptor(&[("k", "v")])]),
            request("local", &[descriptor(&[("k", "v")])]),
        ],
    )
    .await;
    // Envoy's failure_mode_deny decides what an UNAVAILABLE means.
    assert_eq!(answers[0]["error"], "UNAVAILABLE", "{}", answers[0]);
    assert!(!answers[0]["details"].as_str().expect("details").is_empty());
    assert_eq!(answers[1]["overall"], "OK", "{}", answers[1]);
    // `fail = "local"`: decided in this process, with its share of the quota.
    let local: Vec<&Value> = answers[2..].iter().map(|a| &a["overall"]).collect();
    assert_eq!(local, ["OK", "OK", "OVER_LIMIT"], "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_to_the_next_rls_request() {
    let dir = common::TempDir::new("rls-reload");
    let path = dir.0.join("gateway.toml");
    let limit = |quota: u32| {
        format!("{GATEWAY}[[limit]]\nname = \"edge\"\nkey = [\"descriptor:tenant\"]\nmatch = {{ domain = \"edge\" }}\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = {quota}\n")
    };
    std::fs::write(&path, limit(2)).expect("write");
    let gateway = common::start_file(path.clone()).await;
    let addr = gateway.rls.expect("rls listener");
    let acme = request("edge", &[descriptor(&[("tenant", "acme")])]);
    let before = ask(addr, 1, &[acme.clone(), acme.clone(), acme.clone()]).await;
    assert_eq!(before[2]["overall"], "OVER_LIMIT");
    // A new quota: the 2 already used carry over into it.
    std::fs::write(&path, limit(10)).expect("write");
    let reloaded = reqwest::Client::new()
        .post(format!("http://{}/v1/reload", gateway.admin))
        .send()
        .await
        .expect("reload");
    assert_eq!(reloaded.status(), 200);
    let after = ask(addr, 1, &[acme]).await;
    assert_eq!(after[0]["overall"], "OK");
    assert_eq!(after[0]["statuses"][0]["limit"]["per_unit"], 10);
    assert_eq!(after[0]["statuses"][0]["remaining"], 7);
}
