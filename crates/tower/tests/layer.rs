//! The tower layer in an axum app: over real sockets on 127.0.0.1 with
//! reqwest as the client (what it admits under concurrent load, against
//! `tollgate simulate` on the same arrivals; the 429 it answers; fleet
//! mode on a real redis-server), and as a bare service on tokio's paused
//! clock (holds, and what a dropped future or body gives back).

use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tollgate_tower::{LayerError, RateLimitLayer, TokioClock};
use tower::ServiceExt;

/// 2026-01-01T00:00:00Z.
const EPOCH: u64 = 1_767_225_600_000_000_000;

/// Serve `app` on a free loopback port.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    addr
}

fn app(layer: RateLimitLayer) -> Router {
    Router::new()
        .route("/v1/items", get(|| async { "items" }))
        .layer(layer)
}

/// Three limits, all decided at once: a bucket per tenant that does not
/// refill within a test, and an hourly window for everyone.
const THREE_LIMITS: &str = r#"
[[limit]]
name = "per-tenant"
key = ["header:x-tenant-id"]
algorithm = "token_bucket"
capacity = 30
refill = "1/h"

[[limit]]
name = "everyone"
algorithm = "fixed_window"
every = "1h"
quota = 100

[[limit]]
name = "reads"
key = ["method"]
algorithm = "sliding_window"
every = "1h"
quota = 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrent_load_it_admits_what_simulate_admits() {
    let addr = serve(app(RateLimitLayer::from_toml(THREE_LIMITS).expect("layer"))).await;
    let client = reqwest::Client::new();
    let tenants = ["a", "b", "c", "d"];
    let sent: Vec<_> = (0..240)
        .map(|i| {
            let (client, tenant) = (client.clone(), tenants[i % 4]);
            tokio::spawn(async move {
                let r = client
                    .get(format!("http://{addr}/v1/items"))
                    .header("x-tenant-id", tenant)
                    .send()
                    .await
                    .expect("response");
                (tenant, r.status().as_u16())
            })
        })
        .collect();
    let mut admitted: HashMap<&str, u64> = HashMap::new();
    let mut refused = 0;
    for answer in sent {
        match answer.await.expect("request") {
            (tenant, 200) => *admitted.entry(tenant).or_default() += 1,
            (_, 429) => refused += 1,
            (_, other) => panic!("status {other}"),
        }
    }
    // The same 240 arrivals through the engine on a virtual clock.
    let trace: String = (0..240)
        .map(|i| {
            format!(
                "{{\"t\":0,\"method\":\"GET\",\"path\":\"/v1/items\",\"headers\":{{\"x-tenant-id\":\"{}\"}}}}\n",
                tenants[i % 4]
            )
        })
        .collect();
    let engine = tollgate_store::Engine::new(
        tollgate_core::parse(THREE_LIMITS, &tollgate_core::NoProfiles).expect("policy"),
    );
    let options = tollgate_sim::Options {
        start: EPOCH,
        decisions: false,
        per_key: false,
        timeline: false,
    };
    let simulated = tollgate_sim::simulate(&engine, options, trace.as_bytes(), std::io::sink())
        .expect("simulate");
    let total: u64 = admitted.values().sum();
    assert_eq!(total, simulated.admitted);
    assert_eq!(total, 100, "the hourly window binds");
    assert_eq!(refused, 140);
    assert!(admitted.values().all(|&n| n <= 30), "{admitted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_the_gateway_s_429_with_its_headers() {
    let layer = RateLimitLayer::from_toml(
        "[[limit]]\nname = \"per-tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/s\"\nmissing_key = \"reject\"\n",
    )
    .expect("layer");
    let addr = serve(app(layer)).await;
    let get = |tenant: Option<&'static str>| async move {
        let mut r = reqwest::Client::new().get(format!("http://{addr}/v1/items"));
        if let Some(tenant) = tenant {
            r = r.header("x-tenant-id", tenant);
        }
        r.send().await.expect("response")
    };
    let first = get(Some("acme")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["ratelimit-policy"],
        "\"per-tenant\";q=2;w=2"
    );
    assert_eq!(first.headers()["ratelimit"], "\"per-tenant\";r=1;t=1");
    assert_eq!(first.text().await.expect("body"), "items");
    assert_eq!(get(Some("acme")).await.status(), 200);
    let refused = get(Some("acme")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(refused.headers()["ratelimit"], "\"per-tenant\";r=0;t=1");
    let problem: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(problem["status"], 429);
    assert!(
        problem["title"]
            .as_str()
            .expect("title")
            .contains("'per-tenant'"),
        "{problem}"
    );
    // Another tenant has its own bucket; none at all is refused, named.
    assert_eq!(get(Some("other")).await.status(), 200);
    let anonymous = get(None).await;
    assert_eq!(anonymous.status(), 400);
    let text = anonymous.text().await.expect("body");
    assert!(
        text.contains("per-tenant") && text.contains("x-tenant-id"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_fits_within_the_hold_waits_for_its_token() {
    let layer = RateLimitLayer::from_toml(
        "[[limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"10/s\"\nhold = \"250ms\"\n",
    )
    .expect("layer")
    .with_clock(TokioClock::starting_at(EPOCH));
    let app = app(layer);
    let request = || {
        http::Request::get("/v1/items")
            .body(axum::body::Body::empty())
            .expect("request")
    };
    let started = tokio::time::Instant::now();
    let waits = futures_wait(&app, 4, request).await;
    // One at once, then one per 100 ms token; the fourth would wait 300 ms,
    // past the 250 ms hold: refused at once.
    assert_eq!(
        waits,
        [(200, 0), (200, 100), (200, 200), (429, 0)],
        "(status, ms waited) in order"
    );
    assert!(started.elapsed() <= Duration::from_millis(200));
}

/// Send `n` requests at once through `app`; each one's status and how long
/// it took (ms of tokio's clock).
async fn futures_wait(
    app: &Router,
    n: usize,
    request: impl Fn() -> http::Request<axum::body::Body>,
) -> Vec<(u16, u64)> {
    let started = tokio::time::Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (app, request) = (app.clone(), request());
            tokio::spawn(async move {
                let r = app.oneshot(request).await.expect("infallible");
                (r.status().as_u16(), started.elapsed().as_millis() as u64)
            })
        })
        .collect();
    let mut out = Vec::new();
    for call in calls {
        out.push(call.await.expect("call"));
        tokio::task::yield_now().await;
    }
    out
}

/// One request at a time (`max = 1`), and a handler told when to answer.
fn gated() -> (Router, tokio::sync::watch::Sender<bool>) {
    let layer = RateLimitLayer::from_toml(
        "[[limit]]\nname = \"one-at-a-time\"\nalgorithm = \"concurrency\"\nmax = 1\n",
    )
    .expect("layer")
    .with_clock(TokioClock::starting_at(EPOCH));
    let (open, gate) = tokio::sync::watch::channel(false);
    let app = Router::new()
        .route(
            "/slow",
            get(move || {
                let mut gate = gate.clone();
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    "done"
                }
            }),
        )
        .layer(layer);
    (app, open)
}

fn slow() -> http::Request<axum::body::Body> {
    http::Request::get("/slow")
        .body(axum::body::Body::empty())
        .expect("request")
}

#[tokio::test(start_paused = true)]
async fn a_dropped_response_future_gives_its_concurrency_slot_back() {
    let (app, open) = gated();
    let first = tokio::spawn(app.clone().oneshot(slow()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The slot is taken: a second request is refused ...
    let second = app.clone().oneshot(slow()).await.expect("infallible");
    assert_eq!(second.status(), 429);
    // ... until the first request's future is dropped (its client left).
    first.abort();
    let _ = first.await;
    open.send_replace(true);
    let third = app.clone().oneshot(slow()).await.expect("infallible");
    assert_eq!(third.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn the_slot_is_held_until_the_body_ends_or_is_dropped() {
    let (app, open) = gated();
    open.send_replace(true);
    let answered = app.clone().oneshot(slow()).await.expect("infallible");
    assert_eq!(answered.status(), 200);
    // The handler is done but its body is not read yet: still in flight.
    assert_eq!(app.clone().oneshot(slow()).await.expect("ok").status(), 429);
    let body = answered.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes(), "done");
    let again = app.clone().oneshot(slow()).await.expect("infallible");
    assert_eq!(again.status(), 200);
    // A body dropped unread settles too.
    drop(again);
    assert_eq!(app.clone().oneshot(slow()).await.expect("ok").status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_on_one_redis_share_one_quota() {
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\ntimeout = \"2s\"\n[[limit]]\nname = \"fleet\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 50\n",
        tollgate_testkit::redis_url(),
        tollgate_testkit::unique_prefix("tower-fleet")
    );
    // Two services, as two processes of a fleet would run them. (A timeout
    // of 2 s: on a loaded CI machine a first connection can take longer
    // than the default 100 ms, and this test is about the shared quota.)
    let one = serve(app(RateLimitLayer::from_toml(&config).expect("layer"))).await;
    let two = serve(app(RateLimitLayer::from_toml(&config).expect("layer"))).await;
    let client = reqwest::Client::new();
    let sent: Vec<_> = (0..120)
        .map(|i| {
            let (client, addr) = (client.clone(), if i % 2 == 0 { one } else { two });
            tokio::spawn(async move {
                let r = client.get(format!("http://{addr}/v1/items")).send().await;
                r.expect("response").status().as_u16()
            })
        })
        .collect();
    let mut admitted = 0;
    for status in sent {
        match status.await.expect("request") {
            200 => admitted += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(admitted, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_comes_from_where_the_app_says() {
    let layer = RateLimitLayer::from_toml(
        "[[limit]]\nname = \"per-ip\"\nkey = [\"ip\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/h\"\n",
    )
    .expect("layer")
    .with_client_ip(|parts| {
        let info = parts
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()?;
        Some(info.0.ip().to_string())
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = app(layer).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await.expect("serve") });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/items");
    assert_eq!(client.get(&url).send().await.expect("r").status(), 200);
    let refused = client.get(&url).send().await.expect("r");
    assert_eq!(refused.status(), 429, "the same address, one token");
}

#[test]
fn a_policy_the_layer_cannot_enforce_is_refused_naming_what() {
    let reads_body = RateLimitLayer::from_toml(
        "[[limit]]\nname = \"rows\"\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"10/s\"\ncost = { json_array = \"/rows\" }\n",
    );
    match reads_body {
        Err(e @ LayerError::ReadsBody(_)) => assert!(e.to_string().contains("'rows'"), "{e}"),
        other => panic!("{other:?}"),
    }
    let bad = RateLimitLayer::from_toml(
        "[[limit]]\nname = \"x\"\nalgorithm = \"token_bucket\"\ncapacity = 0\nrefill = \"1/s\"\n",
    )
    .expect_err("capacity 0");
    assert!(bad.to_string().contains("line"), "{bad}");
}
