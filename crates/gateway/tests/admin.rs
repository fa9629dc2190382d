//! The admin listener, live reload, the check API, and exactness under
//! concurrent connections compared with `tollgate simulate`.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

fn limits(up: std::net::SocketAddr, tenant_quota: u64, extra: &str) -> String {
    format!(
        "{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = {tenant_quota}\n{extra}",
        gateway_section(up)
    )
}

async fn post(client: &reqwest::Client, url: &str, body: &str) -> (u16, serde_json::Value) {
    let r = client
        .post(url)
        .body(body.to_string())
        .send()
        .await
        .expect("admin request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON body"))
}

#[tokio::test]
async fn a_reload_keeps_counters_of_unchanged_limits_and_rejects_bad_configs() {
    let up = upstream().await;
    let dir = TempDir::new("reload");
    let path = dir.0.join("gateway.toml");
    let daily = "[[limit]]\nname = \"daily\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 100\n";
    std::fs::write(&path, limits(up.addr, 2, daily)).unwrap();
    let gw = start_file(path.clone()).await;
    let client = client();
    for _ in 0..2 {
        assert_eq!(get(&client, &gw.url("/"), "acme").await.status(), 200);
    }
    assert_eq!(get(&client, &gw.url("/"), "acme").await.status(), 429);

    // Change only the daily quota: tenant keeps its count (still exhausted),
    // daily carries the 2 used into its new quota; a new limit starts fresh.
    let weekly = "[[limit]]\nname = \"weekly\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"7d\"\nquota = 500\n";
    std::fs::write(
        &path,
        limits(
            up.addr,
            2,
            &format!("{}{weekly}", daily.replace("100", "50")),
        ),
    )
    .unwrap();
    let (status, body) = post(&client, &gw.admin_url("/v1/reload"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kept"], serde_json::json!(["tenant"]));
    assert_eq!(body["carried"], serde_json::json!(["daily"]));
    assert_eq!(
        body["fresh"],
        serde_json::json!([{ "limit": "weekly", "why": "a new limit" }])
    );
    let denied = get(&client, &gw.url("/"), "acme").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(
        header(&denied, "ratelimit").as_deref(),
        Some("\"tenant\";r=0;t=3600, \"daily\";r=48;t=86400, \"weekly\";r=500;t=0")
    );
    assert_eq!(
        header(&denied, "ratelimit-policy").as_deref(),
        Some("\"tenant\";q=2;w=3600, \"daily\";q=50;w=86400, \"weekly\";q=500;w=604800")
    );

    // An invalid config is rejected with its line; the old one keeps serving.
    std::fs::write(
        &path,
        limits(
            up.addr,
            2,
            "[[limit]]\nname = \"broken\"\nalgorithm = \"token_bukket\"\n",
        ),
    )
    .unwrap();
    let (status, body) = post(&client, &gw.admin_url("/v1/reload"), "").await;
    assert_eq!(status, 422);
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("gateway.toml:14: limit 'broken': algorithm 'token_bukket' is not known"),
        "{detail}"
    );
    assert_eq!(get(&client, &gw.url("/"), "globex").await.status(), 200);
    let config = send(client.get(gw.admin_url("/v1/config")))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        config.contains("quota = 50") && !config.contains("broken"),
        "{config}"
    );

    // A change of the file is picked up by the watcher too.
    std::fs::write(&path, limits(up.addr, 5, daily)).unwrap();
    let reloaded = gw.gateway.reload_if_changed().await;
    assert!(matches!(reloaded, Some(Ok(_))), "{reloaded:?}");
    assert_eq!(get(&client, &gw.url("/"), "acme").await.status(), 200);
}

/// One limit named "tenant", its definition changed twice while 8 clients
/// keep asking: `phases` are each definition (after `gateway_section` and
/// `store`) and the admissions to reach before the next reload; every
/// admission across both reloads is what the definition in force allows for
/// the use already counted, `total` in all (a reload that handed out a fresh
/// quota would admit the sum of the phases).
async fn reload_under_load(store: &str, phases: [(&str, u64); 3], total: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let up = upstream().await;
    let dir = TempDir::new("reload-load");
    let path = dir.0.join("gateway.toml");
    let config = |limit: &str| {
        format!(
            "{}{store}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\n{limit}",
            gateway_section(up.addr)
        )
    };
    std::fs::write(&path, config(phases[0].0)).expect("config written");
    let gw = start_file(path.clone()).await;
    let admitted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (admitted, stop, url) = (admitted.clone(), stop.clone(), gw.url("/"));
            tokio::spawn(async move {
                let client = client();
                // Bounded: at most 2,000 requests a client.
                for _ in 0..2_000 {
                    if stop.load(Relaxed) {
                        break;
                    }
                    let status = get(&client, &url, "acme").await.status().as_u16();
                    assert!(status == 200 || status == 429, "{status}");
                    if status == 200 {
                        admitted.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    let admin = client();
    for (i, (_, reach)) in phases.iter().enumerate().take(2) {
        for _ in 0..500 {
            if admitted.load(Relaxed) >= *reach {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(admitted.load(Relaxed) >= *reach, "never reached {reach}");
        std::fs::write(&path, config(phases[i + 1].0)).expect("config written");
        let (status, body) = post(&admin, &gw.admin_url("/v1/reload"), "").await;
        assert_eq!(
            (status, &body["carried"]),
            (200, &serde_json::json!(["tenant"]))
        );
    }
    // The clients keep asking a while under the last definition.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(admitted.load(Relaxed), total);
    assert_eq!(up.received() as u64, total);
}

const BUCKET: [(&str, u64); 3] = [
    (
        "algorithm = \"token_bucket\"\ncapacity = 30\nrefill = \"1/d\"\n",
        30,
    ),
    // Capacity raised: 20 more.
    (
        "algorithm = \"token_bucket\"\ncapacity = 50\nrefill = \"1/d\"\n",
        50,
    ),
    // Capacity and rate lowered: 50 units owed at 2 a day, room for 40: none.
    (
        "algorithm = \"token_bucket\"\ncapacity = 40\nrefill = \"2/d\"\n",
        0,
    ),
];
const WINDOW: [(&str, u64); 3] = [
    (
        "algorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 30\n",
        30,
    ),
    // The quota raised mid-window: 20 more.
    (
        "algorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 50\n",
        50,
    ),
    // Lowered below what was used: none until the window ends.
    (
        "algorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 20\n",
        0,
    ),
];
const TIERS: [(&str, u64); 3] = [
    ("algorithm = \"tiered\"\ntiers = [{ every = \"1d\", quota = 30 }]\n", 30),
    // A two-day pool added: it starts full, 10 more.
    ("algorithm = \"tiered\"\ntiers = [{ every = \"1d\", quota = 30 }, { every = \"2d\", quota = 10 }]\n", 40),
    // The two-day pool lowered below its use: none.
    ("algorithm = \"tiered\"\ntiers = [{ every = \"1d\", quota = 30 }, { every = \"2d\", quota = 5 }]\n", 0),
];

/// A real Redis, with a timeout a loaded CI machine never reaches (a
/// timed-out call would be decided locally, which is not what is tested).
fn redis_store() -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\ntimeout = \"2s\"\n",
        tollgate_testkit::redis_url(),
        tollgate_testkit::unique_prefix("reload")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_carries_a_buckets_use_in_memory() {
    reload_under_load("", BUCKET, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_carries_a_buckets_use_on_redis() {
    reload_under_load(&redis_store(), BUCKET, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_carries_a_windows_count_in_memory() {
    reload_under_load("", WINDOW, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_carries_a_windows_count_on_redis() {
    reload_under_load(&redis_store(), WINDOW, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_keeps_each_pools_use_in_memory() {
    reload_under_load("", TIERS, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_keeps_each_pools_use_on_redis() {
    reload_under_load(&redis_store(), TIERS, 40).await;
}

#[tokio::test]
async fn the_admin_token_protects_everything_but_healthz() {
    std::env::set_var("TOLLGATE_TEST_ADMIN_TOKEN", "s3cret");
    let up = upstream().await;
    let config = limits(up.addr, 2, "").replace(
        "access_log = \"off\"\n",
        "access_log = \"off\"\nadmin_token_env = \"TOLLGATE_TEST_ADMIN_TOKEN\"\n",
    );
    let gw = start(&config).await;
    let client = client();
    assert_eq!(
        send(client.get(gw.admin_url("/healthz"))).await.status(),
        200
    );
    for path in ["/metrics", "/v1/config", "/v1/usage?key=a"] {
        let r = send(client.get(gw.admin_url(path))).await;
        assert_eq!(r.status(), 401, "{path}");
        let r = send(client.get(gw.admin_url(path)).bearer_auth("wrong!")).await;
        assert_eq!(r.status(), 401, "{path}");
        let r = send(client.get(gw.admin_url(path)).bearer_auth("s3cret")).await;
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = send(client.post(gw.admin_url("/v1/reload"))).await;
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn metrics_and_usage_report_decisions_and_keys() {
    let up = upstream().await;
    let gw = start(&limits(up.addr, 2, "")).await;
    let client = client();
    for tenant in ["a", "a", "a", "b"] {
        get(&client, &gw.url("/"), tenant).await;
    }
    let metrics = send(client.get(gw.admin_url("/metrics")))
        .await
        .text()
        .await
        .unwrap();
    for line in [
        "tollgate_decisions_total{limit=\"tenant\",outcome=\"admitted\"} 3",
        "tollgate_decisions_total{limit=\"tenant\",outcome=\"denied\"} 1",
        "tollgate_responses_total{code=\"429\"} 1",
        "tollgate_keys 2",
        "tollgate_upstream_seconds_count 3",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let usage: serde_json::Value = send(client.get(gw.admin_url("/v1/usage?key=b")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["limits"]["tenant"]["remaining"], 1);
    assert_eq!(usage["limits"]["tenant"]["quota"], 2);
    let r = send(client.get(gw.admin_url("/v1/usage"))).await;
    assert_eq!(r.status(), 400);
    let r = send(client.get(gw.admin_url("/v2/nothing"))).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test(start_paused = true)]
async fn the_check_api_decides_and_report_debits_latency() {
    let up = upstream().await;
    let extra = "[[limit]]\nname = \"duration\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"tiered\"\ncost = \"latency\"\ntiers = [{ every = \"1m\", quota = \"1s\" }]\n";
    let gw = start(&limits(up.addr, 3, extra)).await;
    let client = client();
    let check = r#"{"method": "GET", "path": "/v1/jobs", "headers": {"X-Tenant-Id": "acme"}}"#;
    let (status, decision) = post(&client, &gw.admin_url("/v1/check"), check).await;
    assert_eq!(status, 200);
    assert_eq!(decision["allowed"], true);
    assert_eq!(decision["remaining"]["tenant"], 2);
    let id = decision["id"]
        .as_str()
        .expect("a latency limit needs a report")
        .to_string();
    let (status, report) = post(
        &client,
        &gw.admin_url("/v1/report"),
        &format!(r#"{{"id": "{id}", "latency": 1.5}}"#),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    // 1.5 s of a 1 s pool: the next check is denied by the duration limit.
    let (_, decision) = post(&client, &gw.admin_url("/v1/check"), check).await;
    assert_eq!(decision["allowed"], false);
    assert_eq!(decision["limit"], "duration");
    assert!(decision["retry_after"].as_f64().unwrap() > 0.0);
    // A report is taken once; bad input names what is wrong.
    let (status, _) = post(
        &client,
        &gw.admin_url("/v1/report"),
        &format!(r#"{{"id": "{id}"}}"#),
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = post(&client, &gw.admin_url("/v1/check"), r#"{"methd": "GET"}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("unknown field `methd`"),
        "{body}"
    );
    // After a minute the pool refills. (A new client: the server closed the
    // idle keep-alive connection meanwhile.)
    tokio::time::advance(Duration::from_secs(60)).await;
    let (_, decision) = post(&common::client(), &gw.admin_url("/v1/check"), check).await;
    assert_eq!(decision["allowed"], true);
}

/// Many connections at once admit exactly what `tollgate simulate` admits for
/// the same arrivals: no over-admission under concurrency, all-or-nothing
/// across limits. On one runtime, and on two worker threads as `serve` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_admit_exactly_what_simulate_admits() {
    let up = upstream().await;
    let gw = start(&format!("{}{EXACT_POLICY}", gateway_section(up.addr))).await;
    admits_exactly_what_simulate_admits(&gw, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_threads_admit_exactly_what_simulate_admits() {
    let up = upstream().await;
    let mut gw = start_workers(&format!("{}{EXACT_POLICY}", gateway_section(up.addr)), 2).await;
    admits_exactly_what_simulate_admits(&gw, &up).await;
    gw.shutdown().await;
}

const EXACT_POLICY: &str = "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 40\nrefill = \"1/h\"\n[[limit]]\nname = \"global\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\n";

async fn admits_exactly_what_simulate_admits(gw: &Running, up: &Upstream) {
    let tenants = ["a", "b", "c", "d"];
    const PER_TENANT: usize = 60;
    const CONNECTIONS: usize = 32;
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let url = gw.url("/");
        tasks.push(tokio::spawn(async move {
            // One client per task: its own keep-alive connection.
            let client = client();
            let mut got: BTreeMap<&str, usize> = BTreeMap::new();
            for n in 0..(tenants.len() * PER_TENANT / CONNECTIONS + 1) {
                let i = c + n * CONNECTIONS;
                if i >= tenants.len() * PER_TENANT {
                    break;
                }
                let tenant = tenants[i % tenants.len()];
                if get(&client, &url, tenant).await.status() == 200 {
                    *got.entry(tenant).or_default() += 1;
                }
            }
            got
        }));
    }
    let mut admitted: BTreeMap<&str, usize> = BTreeMap::new();
    for t in tasks {
        for (tenant, n) in t.await.expect("client task") {
            *admitted.entry(tenant).or_default() += n;
        }
    }
    // The same arrivals, one instant, through the simulator.
    let trace: String = (0..tenants.len() * PER_TENANT)
        .map(|i| {
            format!(
                "{{\"t\": 0, \"headers\": {{\"x-tenant-id\": \"{}\"}}}}\n",
                tenants[i % tenants.len()]
            )
        })
        .collect();
    let policy = tollgate_core::parse(EXACT_POLICY, &tollgate_core::NoProfiles).expect("policy");
    let engine = tollgate_store::Engine::new(policy);
    let options = tollgate_sim::Options {
        start: EPOCH,
        decisions: false,
        per_key: false,
        timeline: false,
    };
    let summary = tollgate_sim::simulate(&engine, options, trace.as_bytes(), std::io::sink())
        .expect("simulate");
    let total: usize = admitted.values().sum();
    assert_eq!(total as u64, summary.admitted, "{admitted:?}");
    assert_eq!(total, 100, "the global window admits 100 in all");
    assert!(admitted.values().all(|n| *n <= 40), "{admitted:?}");
    assert_eq!(up.received(), 100);
}

#[tokio::test]
async fn a_second_gateway_cannot_take_a_listening_address() {
    let up = upstream().await;
    let first = start(&limits(up.addr, 2, "")).await;
    let taken = limits(up.addr, 2, "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", first.proxy),
    );
    let second = tollgate_gateway::Gateway::new(
        tollgate_gateway::Source::Text(taken),
        tollgate_gateway::Overrides::default(),
        Box::new(tollgate_core::NoProfiles),
        tollgate_gateway::TokioClock::starting_at(EPOCH),
    )
    .unwrap();
    let e = second.listeners().await.unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("cannot listen on {}", first.proxy)),
        "{e}"
    );
}
