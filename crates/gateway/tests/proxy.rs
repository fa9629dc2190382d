//! The proxy end to end: a real upstream, the gateway, a real HTTP client.

mod common;

use common::*;
use std::time::Duration;
use tokio::time::Instant;

/// Send `n` requests one after another; the statuses.
async fn statuses(client: &reqwest::Client, url: &str, tenant: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(client, url, tenant).await.status().as_u16());
    }
    out
}

fn count(statuses: &[u16], code: u16) -> usize {
    statuses.iter().filter(|s| **s == code).count()
}

#[tokio::test]
async fn a_token_bucket_answers_429_problem_json_with_headers() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 3\nrefill = \"1/min\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let first = get(&client, &gw.url("/v1/jobs"), "acme").await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        header(&first, "ratelimit-policy").as_deref(),
        Some("\"tenant\";q=3;w=180")
    );
    assert_eq!(
        header(&first, "ratelimit").as_deref(),
        Some("\"tenant\";r=2;t=60")
    );
    assert!(header(&first, "x-request-id").is_some_and(|id| id.starts_with("req_")));
    assert_eq!(
        first.text().await.unwrap(),
        "ok /v1/jobs body=0 xff=127.0.0.1"
    );
    assert_eq!(
        statuses(&client, &gw.url("/v1/jobs"), "acme", 2).await,
        [200, 200]
    );

    let denied = get(&client, &gw.url("/v1/jobs"), "acme").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(
        header(&denied, "content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(header(&denied, "retry-after").as_deref(), Some("60"));
    assert_eq!(
        header(&denied, "ratelimit").as_deref(),
        Some("\"tenant\";r=0;t=60")
    );
    let id = header(&denied, "x-request-id").unwrap();
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(body["type"], "https://tollgate.dev/errors/rate-limited");
    assert_eq!(
        body["title"],
        "Rate-limit budget for purpose 'tenant' exhausted"
    );
    assert_eq!(body["status"], 429);
    assert_eq!(body["instance"], id.as_str());
    // Another tenant has its own bucket; the denied request never reached the upstream.
    assert_eq!(get(&client, &gw.url("/"), "globex").await.status(), 200);
    assert_eq!(up.received(), 4);
}

#[tokio::test(start_paused = true)]
async fn retry_after_names_the_arrival_a_hold_would_admit() {
    let up = upstream().await;
    // A slot every 10 s, held for up to 5 s: a request refused now is
    // admitted (held) if it comes back 5 s before the next slot, and the
    // header says so, as `tollgate simulate` does.
    let config = format!(
        "{}[[limit]]\nname = \"api\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/10s\"\nhold = \"5s\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    assert_eq!(get(&client, &gw.url("/"), "a").await.status(), 200);
    let denied = get(&client, &gw.url("/"), "a").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "retry-after").as_deref(), Some("5"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started = tokio::time::Instant::now();
    let held = get(&client, &gw.url("/"), "a").await;
    assert_eq!(held.status(), 200, "admitted after a hold");
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_secs(4) && waited <= Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test]
async fn the_errors_format_has_retry_after_and_legacy_headers() {
    let up = upstream().await;
    // Celigo's rate-limit page, small: a 1-request bucket refilling 1 per 2 s,
    // `errors` body, Retry-After.
    let config = format!(
        "{}[response]\nformat = \"errors\"\nlegacy_headers = true\n[[limit]]\nname = \"api\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"leaky_bucket\"\ncapacity = 1\nrefill = \"1/2s\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let ok = get(&client, &gw.url("/"), "a").await;
    assert_eq!(header(&ok, "x-ratelimit-limit").as_deref(), Some("1"));
    assert_eq!(header(&ok, "x-ratelimit-remaining").as_deref(), Some("0"));
    let denied = get(&client, &gw.url("/"), "a").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "retry-after").as_deref(), Some("2"));
    assert_eq!(
        header(&denied, "content-type").as_deref(),
        Some("application/json")
    );
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"errors": [{"code": "rate_limited", "message": "Too many requests. Retry after 2 seconds."}]})
    );
}

#[tokio::test]
async fn retry_after_can_be_turned_off_as_the_gateway_profile_does() {
    let up = upstream().await;
    let config = format!(
        "{}[response]\nretry_after = false\nratelimit_headers = false\n[[limit]]\nname = \"tenant\"\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/h\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let ok = get(&client, &gw.url("/"), "a").await;
    assert_eq!(header(&ok, "ratelimit"), None);
    let denied = get(&client, &gw.url("/"), "a").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "retry-after"), None);
}

#[tokio::test]
async fn every_algorithm_admits_exactly_its_quota() {
    let up = upstream().await;
    let cases = [
        ("algorithm = \"token_bucket\"\ncapacity = 5\nrefill = \"1/h\"", 5),
        ("algorithm = \"leaky_bucket\"\ncapacity = 4\nrefill = \"1/h\"", 4),
        ("algorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 6", 6),
        ("algorithm = \"sliding_window\"\nevery = \"1h\"\nquota = 7", 7),
        // The data API's rate-limit article: pools tried most frequent first;
        // 2 + 3 + 1 in all.
        (
            "algorithm = \"tiered\"\ntiers = [{ every = \"1m\", quota = 2 }, { every = \"1h\", quota = 3 }, { every = \"1d\", quota = 1 }]",
            6,
        ),
    ];
    let client = client();
    for (limit, quota) in cases {
        let config = format!(
            "{}[[limit]]\nname = \"l\"\nkey = [\"header:x-tenant-id\"]\n{limit}\n",
            gateway_section(up.addr)
        );
        let gw = start(&config).await;
        let got = statuses(&client, &gw.url("/"), "t", quota + 3).await;
        assert_eq!(count(&got, 200), quota, "{limit}: {got:?}");
        assert_eq!(count(&got, 429), 3, "{limit}: {got:?}");
        assert!(got[..quota].iter().all(|s| *s == 200), "{limit}: {got:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn held_requests_wait_in_fifo_order_then_run() {
    let up = upstream().await;
    // The API gateway's rate-limit page: wait up to 2 s for a token. One token
    // per second.
    let config = format!(
        "{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/s\"\nhold = \"2s\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let t0 = Instant::now();
    let url = gw.url("/");
    let send = |delay_ms: u64| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let r = get(&client, &url, "acme").await;
            (r.status().as_u16(), t0.elapsed())
        }
    };
    // Arrivals 1 ms apart: the first runs, the next two wait 1 s and 2 s
    // (FIFO), the fourth would wait 3 s > hold and is denied at once.
    let (a, b, c, d) = tokio::join!(send(0), send(1), send(2), send(3));
    assert_eq!(a.0, 200);
    assert!(a.1 < Duration::from_millis(100), "{a:?}");
    assert_eq!(b.0, 200);
    assert!(
        b.1 >= Duration::from_secs(1) && b.1 < Duration::from_millis(1100),
        "{b:?}"
    );
    assert_eq!(c.0, 200);
    assert!(
        c.1 >= Duration::from_secs(2) && c.1 < Duration::from_millis(2100),
        "{c:?}"
    );
    assert_eq!(d.0, 429);
    assert!(d.1 < Duration::from_millis(100), "{d:?}");
    assert_eq!(up.received(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_hold_queue_is_bounded_per_key() {
    let up = upstream().await;
    let config = format!(
        "{}max_held_per_key = 1\n[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/s\"\nhold = \"5s\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let url = gw.url("/");
    let send = |delay_ms: u64, tenant: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            get(&client, &url, tenant).await.status().as_u16()
        }
    };
    // acme: one runs, one is held, the third finds the key's queue full.
    // globex has its own place in the queue.
    let got = tokio::join!(
        send(0, "acme"),
        send(1, "acme"),
        send(2, "acme"),
        send(3, "globex"),
        send(4, "globex")
    );
    assert_eq!(got, (200, 200, 429, 200, 200));
}

#[tokio::test(start_paused = true)]
async fn latency_is_debited_when_the_response_completes() {
    let up = upstream().await;
    // The data API article's duration limit, small: 1 s of upstream time per minute.
    let config = format!(
        "{}[[limit]]\nname = \"duration\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"tiered\"\ncost = \"latency\"\ntiers = [{{ every = \"1m\", quota = \"1s\" }}]\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let remaining = |gw: &Running| {
        let url = gw.admin_url("/v1/usage?key=acme");
        let client = client.clone();
        async move {
            let usage: serde_json::Value = send(client.get(url)).await.json().await.unwrap();
            usage["limits"]["duration"]["remaining"].as_u64().unwrap()
        }
    };
    let r = get(&client, &gw.url("/slow/600"), "acme").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "slept 600");
    let left = remaining(&gw).await;
    assert!(
        (399_000..=400_000).contains(&left),
        "{left} us left after 0.6 s"
    );
    // Some time is left, so the next is admitted; it overdraws the pool.
    assert_eq!(
        get(&client, &gw.url("/slow/600"), "acme").await.status(),
        200
    );
    assert_eq!(remaining(&gw).await, 0);
    let denied = get(&client, &gw.url("/slow/600"), "acme").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(up.received(), 2);
}

#[tokio::test]
async fn a_concurrency_slot_is_released_when_the_client_goes_away() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"in-flight\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"concurrency\"\nmax = 1\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let streaming = get(&client, &gw.url("/trickle"), "acme").await;
    assert_eq!(streaming.status(), 200);
    // The first response is still streaming: the slot is taken.
    let denied = get(&client, &gw.url("/"), "acme").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "retry-after"), None);
    drop(streaming); // the client hangs up mid-body
    let mut status = 0;
    for _ in 0..200 {
        status = get(&client, &gw.url("/"), "acme").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status, 200, "the slot came back after the disconnect");
    // A completed response releases too: again and again.
    assert_eq!(
        statuses(&client, &gw.url("/"), "acme", 3).await,
        [200, 200, 200]
    );
}

#[tokio::test]
async fn shadow_limits_decide_but_never_deny() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"trial\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 2\nmode = \"shadow\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    assert_eq!(statuses(&client, &gw.url("/"), "a", 5).await, [200; 5]);
    let metrics = send(client.get(gw.admin_url("/metrics")))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_decisions_total{limit=\"trial\",outcome=\"shadow_denied\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn classes_scale_and_overrides_give_a_key_its_own_quota() {
    let up = upstream().await;
    let config = format!(
        "{}[[class]]\nname = \"sandbox\"\nmatch = {{ headers = {{ x-env = \"sandbox\" }} }}\nscale = 0.5\n[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 4\noverrides = [{{ key = \"premium\", scale = 3 }}]\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    assert_eq!(
        count(&statuses(&client, &gw.url("/"), "plain", 6).await, 200),
        4
    );
    assert_eq!(
        count(&statuses(&client, &gw.url("/"), "premium", 14).await, 200),
        12
    );
    let mut sandbox = 0;
    for _ in 0..5 {
        let r = send(
            client
                .get(gw.url("/"))
                .header("x-tenant-id", "sb")
                .header("x-env", "sandbox"),
        )
        .await;
        sandbox += usize::from(r.status() == 200);
    }
    assert_eq!(sandbox, 2);
}

#[tokio::test]
async fn a_missing_key_gets_an_anonymous_bucket_or_a_400() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"anon\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1\n[[limit]]\nname = \"strict\"\nkey = [\"header:x-api-key\"]\nmatch = {{ path_prefix = \"/strict/\" }}\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\nmissing_key = \"reject\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    // No tenant header: one shared anonymous bucket.
    assert_eq!(send(client.get(gw.url("/"))).await.status(), 200);
    assert_eq!(send(client.get(gw.url("/"))).await.status(), 429);
    let r = get(&client, &gw.url("/strict/x"), "t").await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["detail"],
        "limit 'strict': the request has no header:x-api-key, and the limit rejects requests without it"
    );
}

#[tokio::test]
async fn malformed_requests_get_clear_errors() {
    let up = upstream().await;
    let config = format!(
        "{}max_body_bytes = 64\n[[limit]]\nname = \"ids\"\nkey = [\"header:x-tenant-id\"]\nmatch = {{ path_prefix = \"/bulk\" }}\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"1/h\"\ncost = {{ json_array = \"/ids\" }}\n[[limit]]\nname = \"weighted\"\nkey = [\"header:x-tenant-id\"]\nmatch = {{ path_prefix = \"/weighted\" }}\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"1/h\"\ncost = {{ header = \"x-cost\" }}\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    // A key header with bytes that are not visible ASCII.
    let bad = reqwest::header::HeaderValue::from_bytes(b"acme\xff").unwrap();
    let r = send(client.get(gw.url("/")).header("x-tenant-id", bad)).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("header x-tenant-id"),
        "{body}"
    );
    // A key header given twice with different values: the limits would
    // read one, the upstream maybe the other.
    let r = send(
        client
            .get(gw.url("/"))
            .header("x-tenant-id", "a")
            .header("x-tenant-id", "b"),
    )
    .await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("header x-tenant-id is given more than once"),
        "{body}"
    );
    // A cost header that is not a number.
    let r = send(
        client
            .get(gw.url("/weighted"))
            .header("x-tenant-id", "a")
            .header("x-cost", "lots"),
    )
    .await;
    assert_eq!(r.status(), 400);
    // Huge headers: refused by the HTTP layer, not a crash.
    let r = client
        .get(gw.url("/"))
        .header("x-big", "x".repeat(100_000))
        .send()
        .await;
    let r = r.map(|r| r.status().as_u16());
    assert!(
        r.as_ref().map_or(true, |s| *s == 431),
        "huge headers are refused: {r:?}"
    );
    // A JSON body costs its array's length ...
    let r = send(
        client
            .post(gw.url("/bulk"))
            .header("x-tenant-id", "a")
            .body(r#"{"ids":[1,2,3,4,5,6]}"#),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok /bulk body=21 xff=127.0.0.1");
    let r = send(
        client
            .post(gw.url("/bulk"))
            .header("x-tenant-id", "a")
            .body(r#"{"ids":[1,2,3,4,5]}"#),
    )
    .await;
    assert_eq!(r.status(), 429, "6 + 5 > 10");
    // A body that is not JSON is refused, not charged as one unit.
    for body in ["{\"ids\":[1,2,NaN]}", "{\"ids\":[1e999]}", "not json"] {
        let r = send(
            client
                .post(gw.url("/bulk"))
                .header("x-tenant-id", "b")
                .body(body.to_string()),
        )
        .await;
        assert_eq!(r.status(), 400, "{body}");
        let problem: serde_json::Value = r.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains("not JSON"),
            "{problem}"
        );
    }
    // A BOM before it is skipped: this body costs its 10 ids.
    let r = send(
        client
            .post(gw.url("/bulk"))
            .header("x-tenant-id", "b")
            .body("\u{feff}{\"ids\":[1,2,3,4,5,6,7,8,9,10]}"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = send(
        client
            .post(gw.url("/bulk"))
            .header("x-tenant-id", "b")
            .body(r#"{"ids":[1]}"#),
    )
    .await;
    assert_eq!(r.status(), 429, "10 of 10 taken by the body with a BOM");
    // ... a cost above capacity is not a 429 ...
    let r = send(
        client
            .post(gw.url("/bulk"))
            .header("x-tenant-id", "b")
            .body(r#"{"ids":[1,2,3,4,5,6,7,8,9,10,11]}"#),
    )
    .await;
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["title"],
        "Request costs more than limit 'ids' can ever admit"
    );
    // ... and a body past the cap is refused before it is counted.
    let r = send(
        client
            .post(gw.url("/bulk"))
            .header("x-tenant-id", "c")
            .body(format!("{{\"ids\":[{}1]}}", "1,".repeat(100))),
    )
    .await;
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["title"], "Request body too large");
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_problems() {
    // A port nobody listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let config = format!(
        "{}[[limit]]\nname = \"all\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\n",
        gateway_section(closed_addr)
    );
    let gw = start(&config).await;
    let client = client();
    let r = get(&client, &gw.url("/"), "x").await;
    assert_eq!(r.status(), 502);
    // Admitted, so the answer says what is left, as every answer does.
    assert_eq!(
        header(&r, "ratelimit").as_deref(),
        Some("\"all\";r=99;t=3600")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["type"], "https://tollgate.dev/errors/upstream_failed");
    // The upstream's address stays in the gateway's log, not in the answer.
    assert_eq!(body["detail"], "The upstream could not be reached.");
    // The request was admitted before the upstream failed: it used quota (documented).
    let usage: serde_json::Value = send(client.get(gw.admin_url("/v1/usage?key=x")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["limits"]["all"]["remaining"], 99);

    let up = upstream().await;
    let config = format!(
        "{}upstream_timeout = \"200ms\"\n[[limit]]\nname = \"all\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let r = send(client.get(gw.url("/slow/5000"))).await;
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["title"], "Upstream timed out");
}

/// The gateway's `upstream_connections_*` metrics, read from /metrics.
async fn upstream_connections(client: &reqwest::Client, gw: &Running) -> (u64, u64) {
    let text = send(client.get(gw.admin_url("/metrics")))
        .await
        .text()
        .await
        .expect("the metrics page");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    (
        value("tollgate_upstream_connections_opened_total "),
        value("tollgate_upstream_connections_idle "),
    )
}

#[tokio::test]
async fn a_client_connection_keeps_one_upstream_connection_and_hands_it_on() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"all\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let admin = client();
    // One kept-alive client connection: its requests share one upstream connection.
    let first = client();
    for i in 0..10 {
        let r = send(first.get(gw.url(&format!("/a/{i}")))).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.text().await.unwrap(),
            format!("ok /a/{i} body=0 xff=127.0.0.1")
        );
    }
    assert_eq!((up.received(), up.connections()), (10, 1));
    assert_eq!(upstream_connections(&admin, &gw).await, (1, 0));

    // When it closes, its upstream connection waits for the next client's.
    drop(first);
    let mut idle = 0;
    for _ in 0..200 {
        idle = upstream_connections(&admin, &gw).await.1;
        if idle == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        idle, 1,
        "the closed client's upstream connection was not kept"
    );
    let second = client();
    for _ in 0..5 {
        assert_eq!(send(second.get(gw.url("/b"))).await.status(), 200);
    }
    assert_eq!((up.received(), up.connections()), (15, 1));
    assert_eq!(upstream_connections(&admin, &gw).await, (1, 0));

    // An upstream that closes after each answer: every request still gets
    // through, each on a new connection.
    for _ in 0..5 {
        let r = send(second.get(gw.url("/close"))).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "closing");
    }
    // (the first on the kept connection, then 4 new ones)
    assert_eq!((up.received(), up.connections()), (20, 5));
    assert_eq!(upstream_connections(&admin, &gw).await.0, 5);
}

#[tokio::test]
async fn routes_pick_the_upstream_by_path_prefix() {
    let default = upstream().await;
    let reports = upstream().await;
    let config = format!(
        "{}[[gateway.route]]\npath_prefix = \"/reports/\"\nupstream = \"http://{}\"\n[[limit]]\nname = \"all\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\n",
        gateway_section(default.addr),
        reports.addr
    );
    let gw = start(&config).await;
    let client = client();
    assert_eq!(send(client.get(gw.url("/reports/1"))).await.status(), 200);
    assert_eq!(send(client.get(gw.url("/jobs"))).await.status(), 200);
    assert_eq!((default.received(), reports.received()), (1, 1));
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_refuses_new_ones() {
    let up = upstream().await;
    let config = format!(
        "{}shutdown_grace = \"5s\"\n[[limit]]\nname = \"all\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 100\n",
        gateway_section(up.addr)
    );
    let mut gw = start(&config).await;
    let client = client();
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), gw.url("/slow/300"));
        async move { send(client.get(url)).await.text().await.unwrap() }
    });
    while up.received() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.shutdown().await;
    assert_eq!(slow.await.unwrap(), "slept 300");
    let fresh = reqwest::Client::new().get(gw.url("/")).send().await;
    assert!(fresh.is_err(), "no new connections after shutdown");
}

#[tokio::test]
async fn a_profile_brings_its_vendors_429_shape() {
    let up = upstream().await;
    // Celigo's bucket, shrunk to 2 so the test reaches the limit quickly.
    let config = format!(
        "profile = \"celigo\"\n{}[[limit]]\nname = \"account\"\nkey = [\"header:authorization\"]\nalgorithm = \"leaky_bucket\"\ncapacity = 2\nrefill = \"1/3s\"\n",
        gateway_section(up.addr)
    );
    let gw = start_with_profiles(&config).await;
    let client = client();
    let send = || {
        client
            .get(gw.url("/v1/flows"))
            .bearer_auth("token-1")
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    assert_eq!(send().await.unwrap().status(), 200);
    let denied = send().await.unwrap();
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "retry-after").as_deref(), Some("3"));
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "rate_limited");

    // The API gateway's rate-limit page: problem+json with its own type, and no
    // Retry-After.
    let config = format!(
        "profile = \"gateway\"\n{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/min\"\n",
        gateway_section(up.addr)
    );
    let gw = start_with_profiles(&config).await;
    assert_eq!(
        get(&client, &gw.url("/v1/jobs"), "acme").await.status(),
        200
    );
    let denied = get(&client, &gw.url("/v1/jobs"), "acme").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "retry-after"), None);
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(body["type"], "https://gateway/errors/rate-limited");
    assert_eq!(
        body["title"],
        "Rate-limit budget for purpose 'tenant' exhausted"
    );
}

#[tokio::test]
async fn a_path_prefix_cannot_be_sidestepped_by_spelling_the_path_differently() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"v1\"\nmatch = {{ path_prefix = \"/v1/\" }}\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let first = send(client.get(gw.url("/v1/jobs?x=1"))).await;
    assert_eq!(first.status(), 200);
    for spelling in ["//v1/jobs", "/%76%31/jobs", "/x/../v1/jobs", "/v1/./jobs"] {
        let r = send(client.get(gw.url(spelling))).await;
        assert_eq!(r.status(), 429, "{spelling}");
    }
    // What reaches the upstream is the normalized path the limit saw.
    let other = send(client.get(gw.url("/a//b/../c"))).await;
    assert_eq!(other.text().await.unwrap(), "ok /a/c body=0 xff=127.0.0.1");
    assert_eq!(up.received(), 2);
}

#[tokio::test]
async fn forwarded_for_names_the_real_hop_and_connect_is_refused() {
    let up = upstream().await;
    let config = format!(
        "{}trust_forwarded_for = true\n[[limit]]\nname = \"per-ip\"\nkey = [\"ip\"]\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    let r = send(
        client
            .get(gw.url("/"))
            .header("x-forwarded-for", "203.0.113.7"),
    )
    .await;
    // The limit keys on the trusted client address; the chain gains our peer.
    assert_eq!(
        r.text().await.unwrap(),
        "ok / body=0 xff=203.0.113.7, 127.0.0.1"
    );
    let r = send(
        client
            .get(gw.url("/"))
            .header("x-forwarded-for", "203.0.113.8"),
    )
    .await;
    assert_eq!(r.status(), 200, "another client address has its own quota");
    // The trusted proxy appends what it saw: entries before it are the
    // client's own writing and cannot buy a fresh quota.
    let r = send(
        client
            .get(gw.url("/"))
            .header("x-forwarded-for", "10.9.9.1, 203.0.113.7"),
    )
    .await;
    assert_eq!(r.status(), 429, "keyed on the last entry, 203.0.113.7");
    // An address is keyed in its canonical form, however it is spelled.
    for spelling in ["2001:DB8::1", "2001:db8:0:0::1"] {
        let r = send(client.get(gw.url("/")).header("x-forwarded-for", spelling)).await;
        let expected = if spelling == "2001:DB8::1" { 200 } else { 429 };
        assert_eq!(r.status(), expected, "{spelling}");
    }
    // An entry that is no address leaves the peer's (127.0.0.1, unused so far).
    let r = send(
        client
            .get(gw.url("/"))
            .header("x-forwarded-for", "not-an-ip"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = send(
        client
            .get(gw.url("/"))
            .header("x-forwarded-for", "not-an-ip-2"),
    )
    .await;
    assert_eq!(r.status(), 429, "both keyed on the peer's address");
    let r = send(client.request(reqwest::Method::CONNECT, gw.url("/"))).await;
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn the_host_a_limit_reads_is_the_host_the_upstream_is_told() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"api-host\"\nkey = [\"host\"]\nmatch = {{ host = \"api.example.com\" }}\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let raw = |head: String| async move {
        let mut s = tokio::net::TcpStream::connect(gw.proxy)
            .await
            .expect("connect");
        s.write_all(head.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    };
    // A target in absolute form names the host: the upstream is told that one.
    let answer = raw(
        "GET http://other.example/host HTTP/1.1\r\nhost: api.example.com\r\nconnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("host other.example"), "{answer}");
    // The fully qualified spelling is the same host: one quota.
    for (i, host) in ["api.example.com", "API.example.com."].iter().enumerate() {
        let answer = raw(format!(
            "GET /host HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let expected = if i == 0 {
            "HTTP/1.1 200"
        } else {
            "HTTP/1.1 429"
        };
        assert!(answer.starts_with(expected), "{host}: {answer}");
    }
    // Two Host headers are refused.
    let answer = raw(
        "GET /host HTTP/1.1\r\nhost: a.example\r\nhost: api.example.com\r\nconnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("more than one Host header"), "{answer}");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_while_held_is_not_charged_latency() {
    let up = upstream().await;
    let config = format!(
        "{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/5s\"\nhold = \"6s\"\n[[limit]]\nname = \"duration\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\ncost = \"latency\"\nevery = \"1h\"\nquota = \"10s\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    assert_eq!(get(&client, &gw.url("/"), "acme").await.status(), 200);
    // Held for 5 s; the client gives up after 2 s.
    let gave_up =
        tokio::time::timeout(Duration::from_secs(2), get(&client, &gw.url("/"), "acme")).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let usage: serde_json::Value = send(client.get(gw.admin_url("/v1/usage?key=acme")))
        .await
        .json()
        .await
        .unwrap();
    let left = usage["limits"]["duration"]["remaining"].as_u64().unwrap();
    assert!(
        left >= 9_990_000,
        "only the first request's upstream time: {left}"
    );
    let metrics = send(client.get(gw.admin_url("/metrics")))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_responses_total{code=\"499\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn only_the_limits_that_make_a_request_wait_take_hold_places() {
    let up = upstream().await;
    // A shadow limit with a hold, keyed by ip (every test request shares it),
    // must never turn a hold into a 429 by filling its queue.
    let config = format!(
        "{}max_held_per_key = 1\n[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/s\"\nhold = \"2s\"\n[[limit]]\nname = \"ip-shadow\"\nkey = [\"ip\"]\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"1/s\"\nhold = \"2s\"\nmode = \"shadow\"\n",
        gateway_section(up.addr)
    );
    let gw = start(&config).await;
    let client = client();
    for tenant in ["a", "b"] {
        assert_eq!(get(&client, &gw.url("/"), tenant).await.status(), 200);
    }
    let url = gw.url("/");
    let send = |delay_ms: u64, tenant: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            get(&client, &url, tenant).await.status().as_u16()
        }
    };
    // Each tenant's own queue has room for one: both are held, then run.
    assert_eq!(tokio::join!(send(0, "a"), send(1, "b")), (200, 200));
}

/// An `https` upstream: trusted through `upstream_ca_file` (a test CA the
/// system does not know), the request relayed over TLS with its path and
/// limits as over HTTP; without the CA file the handshake fails and the
/// client gets a 502 naming no secret.
#[tokio::test]
async fn an_https_upstream_is_reached_over_tls_with_its_ca_file() {
    let (up, ca) = tollgate_testkit::upstream::scripted_tls(|_, _| {
        tollgate_testkit::upstream::Answer::Status(200, vec![], "over tls")
    })
    .await;
    let limit = "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/h\"\n";
    let section = |ca_line: &str| {
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nupstream = \"https://localhost:{}/base\"\naccess_log = \"off\"\n{ca_line}\n{limit}",
            up.addr.port()
        )
    };
    let gw = start(&section(&format!("upstream_ca_file = {:?}", ca.path))).await;
    let client = client();
    let first = get(&client, &gw.url("/v1/jobs?x=1"), "acme").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.unwrap(), "over tls");
    assert_eq!(
        up.seen("/base/v1/jobs").len(),
        1,
        "the base path and the target"
    );
    assert_eq!(
        statuses(&client, &gw.url("/v1/jobs"), "acme", 2).await,
        [200, 429]
    );

    // The same upstream without its CA: not trusted, a 502.
    let untrusted = start(&section("")).await;
    let answer = get(&client, &untrusted.url("/v1/jobs"), "acme").await;
    assert_eq!(answer.status(), 502);
    assert_eq!(
        up.seen("/base/v1/jobs").len(),
        2,
        "the untrusted call never arrived"
    );
}

/// A WebSocket through the gateway, Python's `websockets` on both ends (an
/// echo upstream and a client): the handshake is one request, the socket
/// holds its tenant's concurrency slot while open (a second socket gets
/// 429), and closing it gives the slot back.
#[tokio::test]
async fn a_websocket_holds_its_concurrency_slot_while_open() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/websocket.py");
    let mut python = tokio::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = tokio::io::BufReader::new(python.stdout.take().expect("stdout")).lines();
    let port = lines
        .next_line()
        .await
        .expect("read")
        .expect("the echo server's port");
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:{port}\"\naccess_log = \"off\"\n\n[[limit]]\nname = \"sockets\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"concurrency\"\nmax = 1\n"
    );
    let gw = start(&config).await;
    let mut stdin = python.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{}\n", gw.proxy).as_bytes())
        .await
        .expect("write");
    let mut said = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("in time")
    {
        said.push(line);
    }
    assert_eq!(
        said,
        [
            "echo hello",
            "second 429 \"sockets\";r=0;t=0",
            "third again"
        ],
        "what the client saw"
    );
}
