//! The proxy over real sockets on 127.0.0.1: the tollgate gateway playing a
//! vendor with a bundled profile, or a scripted upstream (429s, 5xx, slow
//! answers). Time is tokio's paused clock: waits are exact and instant.

mod common;

use common::{attempts, bucket, client, get, json, start, text, upstream, EPOCH};
use std::time::Duration;
use tokio::time::Instant;
use tollgate_store::TokioClock;
use tollgate_testkit::upstream::{ok, scripted, Answer};
use tollgate_testkit::vendor::{admitted_since, refused_share};

async fn problem(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "a problem+json body"
    );
    r.json().await.expect("json")
}

/// `clients` clients with no retry logic of their own GET `url` as fast as
/// they can, `requests` in all; the statuses they got.
async fn clients_send(url: &str, clients: usize, requests: usize) -> Vec<u16> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, next) = (url.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut codes = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                let r = c.get(&url).send().await.expect("response");
                codes.push(r.status().as_u16());
            }
            codes
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.extend(t.await.expect("client"));
    }
    codes
}

/// 64 clients with no retry logic of their own, each sending as fast as
/// it can through the proxy to the gateway enforcing `profile`: no 429
/// reaches a client or the upstream, and the quota is used fully.
async fn sixty_four_clients(profile: &str, requests: usize, least: Duration) {
    let key = "headers = { authorization = \"Bearer key-1\" }";
    sixty_four_clients_with(profile, key, requests, least).await;
}

/// `sixty_four_clients`, with `credentials` (one key in `headers`, or a
/// pool of `keys`) in the upstream's table.
async fn sixty_four_clients_with(
    profile: &str,
    credentials: &str,
    requests: usize,
    least: Duration,
) {
    let (vendor, _gateway) =
        tollgate_testkit::vendor::gateway(profile, TokioClock::starting_at(EPOCH)).await;
    let config = upstream(
        profile,
        vendor,
        &format!("profile = \"{profile}\"\n{credentials}\nconcurrency = 64\n"),
    );
    let proxy = start(&config).await;
    let started = Instant::now();
    let codes = clients_send(&proxy.url(profile, "/v1/jobs"), 64, requests).await;
    let elapsed = started.elapsed();
    assert_eq!(codes.len(), requests);
    assert!(codes.iter().all(|c| *c == 200), "every client got 200");
    let metrics = text(&proxy.admin_url("/metrics")).await;
    let calls = |outcome: &str| {
        let series = format!(
            "tollgate_upstream_calls_total{{upstream=\"{profile}\",outcome=\"{outcome}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(
        calls("429"),
        Some(0),
        "the upstream answered no 429:\n{metrics}"
    );
    assert_eq!(
        calls("2xx"),
        Some(requests as u64),
        "one call per request:\n{metrics}"
    );
    assert_eq!(
        calls("wait_exceeded"),
        None,
        "a call to the upstream is counted by what came back, not by tollgate's own answers:\n{metrics}"
    );
    // Quota used at >= 98 %: the requests took at most 1/0.98 of the
    // least time the vendor's limits allow for them.
    let used = least.as_secs_f64() / elapsed.as_secs_f64();
    assert!(
        (0.98..=1.0).contains(&used),
        "{profile}: {requests} requests in {elapsed:?}, the limits allow them in {least:?} ({:.1} %)",
        used * 100.0
    );
}

#[tokio::test(start_paused = true)]
async fn celigo_sixty_four_clients_get_no_429_and_use_the_quota_fully() {
    // 1,000 at once, then 300 a second: 2,200 requests take 4 s.
    sixty_four_clients("celigo", 2200, Duration::from_secs(4)).await;
}

#[tokio::test(start_paused = true)]
async fn hubspot_sixty_four_clients_get_no_429_and_use_the_quota_fully() {
    // At most 200 in any second (rolling; a window's quota comes back 1.01 s
    // after a burst): 1,000 requests take 4 windows.
    sixty_four_clients("hubspot", 1000, Duration::from_millis(4040)).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_for_its_slot_instead_of_failing() {
    let up = scripted(|_, _| ok()).await;
    let proxy = start(&upstream("crm", up.addr, &bucket("api", 1, "1/s"))).await;
    let started = Instant::now();
    let first = get(&proxy.url("crm", "/v1/a"), &[]).await;
    let second = get(&proxy.url("crm", "/v1/b"), &[]).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    // 1 s, and the 1 % the proxy keeps inside a profile's rates.
    let waited = started.elapsed().as_secs_f64();
    assert!(
        (1.01..1.02).contains(&waited),
        "the second waited 1.01 s: {waited}"
    );
    assert_eq!((attempts(&first), attempts(&second)), (1, 1));
    assert_eq!(up.seen("/v1/b").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn past_its_deadline_a_request_gets_tollgates_429_and_the_upstream_sees_nothing() {
    let up = scripted(|_, _| ok()).await;
    let proxy = start(&upstream("crm", up.addr, &bucket("api", 1, "1/min"))).await;
    assert_eq!(get(&proxy.url("crm", "/v1/a"), &[]).await.status(), 200);
    let started = Instant::now();
    let r = get(&proxy.url("crm", "/v1/b"), &[("tollgate-max-wait", "5s")]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(attempts(&r), 0);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert_eq!(
        retry_after, 56,
        "the slot is 60.6 s after the first request (1 % inside the profile)"
    );
    let body = problem(r).await;
    assert_eq!(body["status"], 429);
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("upstream 'crm'") && detail.contains("limit 'api'"),
        "{detail}"
    );
    let waited = started.elapsed().as_secs_f64();
    assert!((5.0..5.01).contains(&waited), "{waited}");
    assert!(
        up.seen("/v1/b").is_empty(),
        "the upstream saw nothing of it"
    );
    // Its slot was never taken: the next request goes at 60.6 s.
    let r = get(&proxy.url("crm", "/v1/c"), &[("tollgate-max-wait", "60s")]).await;
    assert_eq!(r.status(), 200);
    let at = started.elapsed().as_secs_f64();
    assert!((60.6..60.61).contains(&at), "{at}");
}

#[tokio::test(start_paused = true)]
async fn a_high_priority_request_waits_at_most_one_slot_behind_saturating_low_ones() {
    let up = scripted(|_, _| ok()).await;
    let proxy = start(&upstream("crm", up.addr, &bucket("api", 1, "10/s"))).await;
    let mut lows = Vec::new();
    for i in 0..30 {
        let url = proxy.url("crm", &format!("/low/{i}"));
        lows.push(tokio::spawn(async move {
            get(&url, &[("tollgate-priority", "low")]).await.status()
        }));
    }
    // The lows fill the line: one slot every 100 ms.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let started = Instant::now();
    let high = get(&proxy.url("crm", "/high"), &[("tollgate-priority", "high")]).await;
    assert_eq!(high.status(), 200);
    let waited = started.elapsed().as_secs_f64();
    assert!(
        waited <= 0.1 + 1e-3,
        "high waited {waited} s: more than one slot"
    );
    for low in lows {
        assert_eq!(low.await.expect("low"), 200);
    }
    let seen = up.seen.lock().expect("lock").clone();
    let high_at = seen
        .iter()
        .position(|s| s.path == "/high")
        .expect("high sent");
    assert!(high_at <= 4, "high went {high_at}th of 31");
}

#[tokio::test(start_paused = true)]
async fn a_429_is_retried_after_retry_after_and_pauses_every_client() {
    let up = scripted(|path, n| match (path, n) {
        ("/a", 1) => Answer::Status(429, vec![("retry-after", "2")], "slow down"),
        _ => ok(),
    })
    .await;
    let proxy = start(&upstream("crm", up.addr, &bucket("api", 100, "100/s"))).await;
    let started = Instant::now();
    let a = {
        let url = proxy.url("crm", "/a");
        tokio::spawn(async move { get(&url, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another client's request, with tokens left, waits out the pause.
    let b = get(&proxy.url("crm", "/b"), &[]).await;
    let b_at = started.elapsed().as_secs_f64();
    let a = a.await.expect("a");
    assert_eq!((a.status().as_u16(), attempts(&a)), (200, 2));
    assert_eq!((b.status().as_u16(), attempts(&b)), (200, 1));
    // After the pause (2 s plus up to 250 ms), a first, then b one interval
    // of the pace the 429 lowered (0.95 of the limits' 99/s: about 11 ms).
    assert!((2.0..2.265).contains(&b_at), "b went at {b_at} s");
    let seen = up.seen("/a");
    let behind = up.seen("/b")[0].at.duration_since(seen[1].at);
    assert!(
        behind >= Duration::from_millis(10),
        "b went {behind:?} after a's retry: one interval of the lowered pace"
    );
    let gap = seen[1].at.duration_since(seen[0].at).as_secs_f64();
    assert!(
        (2.0..=2.25).contains(&gap),
        "Retry-After plus at most 250 ms: {gap}"
    );
}

#[tokio::test(start_paused = true)]
async fn only_requests_safe_to_repeat_are_retried_after_a_5xx() {
    let up = scripted(|_, n| match n {
        1 => Answer::Status(503, vec![], "down"),
        _ => ok(),
    })
    .await;
    let proxy = start(&upstream("crm", up.addr, &bucket("api", 100, "100/s"))).await;
    let c = client();
    let get = c.get(proxy.url("crm", "/get")).send().await.expect("get");
    assert_eq!((get.status().as_u16(), attempts(&get)), (200, 2));
    let post = c
        .post(proxy.url("crm", "/post"))
        .body("{\"n\":1}")
        .send()
        .await
        .expect("post");
    assert_eq!((post.status().as_u16(), attempts(&post)), (503, 1));
    assert_eq!(
        post.text().await.expect("body"),
        "down",
        "the upstream's own answer"
    );
    let keyed = c
        .post(proxy.url("crm", "/keyed"))
        .header("idempotency-key", "job-7")
        .body("{\"n\":2}")
        .send()
        .await
        .expect("keyed");
    assert_eq!((keyed.status().as_u16(), attempts(&keyed)), (200, 2));
    let sent = up.seen("/keyed");
    assert_eq!(sent.len(), 2);
    assert!(
        sent.iter().all(|s| &s.body[..] == b"{\"n\":2}"),
        "the body replayed"
    );
    assert_eq!(up.seen("/post").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn tollgate_headers_and_proxy_credentials_stay_here_and_the_vendor_key_is_added() {
    let up = scripted(|_, _| ok()).await;
    let config = upstream(
        "crm",
        up.addr,
        &format!(
            "headers = {{ authorization = \"Bearer vendor-key\" }}\n{}",
            bucket("api", 10, "1/s")
        ),
    );
    let proxy = start(&config).await;
    let r = get(
        &proxy.url("crm", "/v1/x?q=1"),
        &[
            ("tollgate-priority", "high"),
            ("tollgate-workflow", "sync"),
            ("tollgate-max-wait", "1s"),
            ("authorization", "Bearer client-guess"),
            ("x-custom", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    let seen = &up.seen("/v1/x")[0];
    assert_eq!(seen.target, "/v1/x?q=1");
    let header = |name: &str| {
        seen.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("authorization"), Some("Bearer vendor-key"));
    assert_eq!(header("x-custom"), Some("kept"));
    assert!(
        seen.headers
            .iter()
            .all(|(n, _)| !n.starts_with("tollgate-")),
        "{:?}",
        seen.headers
    );
    assert_eq!(header("host"), Some(up.addr.to_string().as_str()));
}

#[tokio::test(start_paused = true)]
async fn a_workflow_budget_holds_back_only_its_own_requests() {
    let up = scripted(|_, _| ok()).await;
    let limits = "[[upstream.limit]]\nname = \"backfill\"\nkey = [\"header:tollgate-workflow\"]\nmatch = { headers = { tollgate-workflow = \"backfill\" } }\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = 1\n";
    let proxy = start(&upstream(
        "crm",
        up.addr,
        &format!("{limits}{}", bucket("api", 100, "10/s")),
    ))
    .await;
    let backfill = [
        ("tollgate-workflow", "backfill"),
        ("tollgate-max-wait", "2s"),
    ];
    assert_eq!(get(&proxy.url("crm", "/b1"), &backfill).await.status(), 200);
    let started = Instant::now();
    let r = get(&proxy.url("crm", "/b2"), &backfill).await;
    assert_eq!(r.status(), 429, "out of budget for the hour");
    assert!(problem(r).await["detail"]
        .as_str()
        .expect("detail")
        .contains("limit 'backfill'"));
    let live = get(&proxy.url("crm", "/live"), &[("tollgate-workflow", "live")]).await;
    assert_eq!(live.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(2010));
}

#[tokio::test(start_paused = true)]
async fn bad_input_and_unknown_destinations_are_refused_naming_what_was_wrong() {
    let up = scripted(|_, _| ok()).await;
    let proxy = start(&upstream("crm", up.addr, &bucket("api", 10, "1/s"))).await;
    /// (path, headers, status, what the detail says)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16, &'a str);
    let cases: [Case; 4] = [
        (
            "/crm/x",
            &[("tollgate-max-wait", "soon")],
            400,
            "header Tollgate-Max-Wait: 'soon' is not a wait",
        ),
        (
            "/crm/x",
            &[("tollgate-priority", "urgent")],
            400,
            "header Tollgate-Priority: priority 'urgent' is not known",
        ),
        (
            "/crm/x",
            &[("tollgate-workflow", "")],
            400,
            "header Tollgate-Workflow is empty",
        ),
        ("/billing/x", &[], 404, "No upstream is named 'billing'"),
    ];
    for (path, headers, status, says) in cases {
        let r = get(&format!("http://{}{path}", proxy.addr), headers).await;
        assert_eq!(r.status(), status, "{path} {headers:?}");
        let detail = problem(r).await["detail"]
            .as_str()
            .expect("detail")
            .to_string();
        assert!(detail.contains(says), "{detail}");
    }
    // Forward proxy: a configured http:// upstream is served, any other host refused.
    let via = |target: &str| {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{}", proxy.addr)).expect("proxy"))
            .build()
            .expect("client")
            .get(target.to_string())
            .send()
    };
    let served = via(&format!("http://{}/v1/x", up.addr))
        .await
        .expect("forward");
    assert_eq!((served.status().as_u16(), attempts(&served)), (200, 1));
    assert_eq!(up.seen("/v1/x").len(), 1);
    let other = via("http://example.com/v1/x").await.expect("forward");
    assert_eq!(other.status(), 403);
    assert!(problem(other).await["detail"]
        .as_str()
        .expect("detail")
        .contains("No upstream's base URL holds this URL (host 'example.com')"));
    // A CONNECT is refused: a tunnel would carry requests tollgate cannot pace.
    let mut raw = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
        .await
        .expect("write");
    let mut answer = vec![0; 4096];
    let n = raw.read(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("example.com"), "{answer}");
    // Headers past 64 KiB in all: 431.
    let big = "x".repeat(40_000);
    let r = get(&proxy.url("crm", "/x"), &[("x-a", &big), ("x-b", &big)]).await;
    assert_eq!(r.status(), 431);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_disconnects_while_waiting_leaves_the_line() {
    let up = scripted(|_, _| Answer::Slow(Duration::from_secs(10))).await;
    let limits = "[[upstream.limit]]\nname = \"in-flight\"\nalgorithm = \"concurrency\"\nmax = 1\n";
    let proxy = start(&upstream("crm", up.addr, limits)).await;
    let first = {
        let url = proxy.url("crm", "/first");
        tokio::spawn(async move { get(&url, &[]).await.status() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = {
        let url = proxy.url("crm", "/gone");
        tokio::spawn(async move { get(&url, &[]).await.status() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let line = |proxy: &common::Running| {
        let generation = proxy.proxy.current();
        generation.lines[0]
            .line
            .inspect(|s| (s.queued(), s.in_flight()))
    };
    assert_eq!(line(&proxy), (1, 1), "one waiting, one in flight");
    waiting.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(line(&proxy), (0, 1), "the one that left is out of the line");
    assert_eq!(first.await.expect("first"), 200);
    assert!(up.seen("/gone").is_empty());
    // Its place came back: the next request goes at once.
    let started = Instant::now();
    let next = {
        let url = proxy.url("crm", "/next");
        tokio::spawn(async move { get(&url, &[]).await.status() })
    };
    assert_eq!(next.await.expect("next"), 200);
    assert!(started.elapsed() < Duration::from_millis(10_100));
    assert_eq!(line(&proxy), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn request_bodies_kept_while_waiting_are_bounded_in_bytes() {
    let up = scripted(|_, _| ok()).await;
    let config = format!(
        "[proxy]\naccess_log = \"off\"\nmax_replay_bytes = 1000\nmax_kept_bytes = 1500\n{}",
        upstream("crm", up.addr, &bucket("api", 1, "1/s"))
    );
    let proxy = start(&config).await;
    let post = |path: &str| {
        let url = proxy.url("crm", path);
        async move {
            client()
                .put(url)
                .body(vec![b'x'; 1000])
                .send()
                .await
                .expect("response")
        }
    };
    assert_eq!(get(&proxy.url("crm", "/first"), &[]).await.status(), 200);
    // The bucket is empty: this one waits about a second, its body kept.
    let waiting = tokio::spawn(post("/waiting"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued = proxy.proxy.current().lines[0].line.inspect(|s| s.queued());
    assert_eq!(queued, 1);
    // A second body would pass the 1,500 bytes kept: refused at once.
    let full = post("/full").await;
    assert_eq!(full.status(), 503);
    assert_eq!(full.headers()["retry-after"], "1");
    let problem: serde_json::Value = full.json().await.expect("problem+json");
    assert_eq!(problem["type"], "https://tollgate.dev/errors/bodies_full");
    assert!(up.seen("/full").is_empty(), "nothing of it was sent");
    assert_eq!(waiting.await.expect("waiting").status(), 200);
    // Its bytes came back with its answer.
    assert_eq!(post("/after").await.status(), 200);
    assert_eq!(up.seen("/after").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_answers_503_at_once_with_the_cooldown_left() {
    let up = scripted(|_, _| Answer::Status(500, vec![], "broken")).await;
    let config = upstream(
        "crm",
        up.addr,
        &format!(
            "max_attempts = 1\nbreaker = {{ failures = 2, cooldown = \"30s\" }}\n{}",
            bucket("api", 100, "100/s")
        ),
    );
    let proxy = start(&config).await;
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("crm", "/x"), &[]).await.status(), 500);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r = get(&proxy.url("crm", "/x"), &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "20");
    assert_eq!(attempts(&r), 0);
    assert!(problem(r).await["title"]
        .as_str()
        .expect("title")
        .contains("circuit breaker open"));
    assert_eq!(up.seen("/x").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn client_tokens_gate_the_proxy_and_are_never_echoed() {
    std::env::set_var("TOLLGATE_TEST_SYNC_TOKEN", "sync-secret-1");
    let up = scripted(|_, _| ok()).await;
    let config = format!(
        "[proxy]\naccess_log = \"off\"\n[[proxy.client]]\nname = \"sync\"\ntoken_env = \"TOLLGATE_TEST_SYNC_TOKEN\"\nworkflow = \"crm-sync\"\n{}",
        upstream("crm", up.addr, &bucket("api", 10, "1/s"))
    );
    let proxy = start(&config).await;
    let r = get(&proxy.url("crm", "/x"), &[]).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = get(
        &proxy.url("crm", "/x"),
        &[("tollgate-token", "guess-secret")],
    )
    .await;
    assert_eq!(r.status(), 401);
    let text = r.text().await.expect("body");
    assert!(
        text.contains("not known") && !text.contains("guess-secret"),
        "{text}"
    );
    let r = get(
        &proxy.url("crm", "/x"),
        &[("tollgate-token", "sync-secret-1")],
    )
    .await;
    assert_eq!(r.status(), 200);
    // Through HTTP_PROXY: 407 without credentials, served with them.
    let forward = |user: Option<&str>| {
        let mut p = reqwest::Proxy::http(format!("http://{}", proxy.addr)).expect("proxy");
        if let Some(token) = user {
            p = p.basic_auth("sync", token);
        }
        reqwest::Client::builder()
            .proxy(p)
            .build()
            .expect("client")
            .get(format!("http://{}/y", up.addr))
            .send()
    };
    let r = forward(None).await.expect("forward");
    assert_eq!(r.status(), 407);
    assert!(r.headers().contains_key("proxy-authenticate"));
    assert_eq!(
        forward(Some("sync-secret-1"))
            .await
            .expect("forward")
            .status(),
        200
    );
    let sent = &up.seen("/y")[0];
    assert!(
        sent.headers
            .iter()
            .all(|(n, v)| n != "proxy-authorization" && !v.contains("sync-secret")),
        "the client token went no further: {:?}",
        sent.headers
    );
}

#[tokio::test(start_paused = true)]
async fn the_admin_listener_shows_the_lines_and_reloads() {
    let up = scripted(|_, _| ok()).await;
    let proxy = start(&upstream("crm", up.addr, &bucket("api", 10, "1/s"))).await;
    assert_eq!(get(&proxy.url("crm", "/x"), &[]).await.status(), 200);
    let usage: serde_json::Value = json(&proxy.admin_url("/v1/usage?upstream=crm")).await;
    let crm = &usage["upstreams"][0];
    assert_eq!(crm["upstream"], "crm");
    assert_eq!(crm["sent"], 1);
    assert_eq!(crm["limits"][0]["limit"], "api");
    // 10 less the one sent, less the one the proxy keeps in reserve.
    assert_eq!(crm["limits"][0]["remaining"], 8);
    let metrics = text(&proxy.admin_url("/metrics")).await;
    assert!(
        metrics.contains("tollgate_proxy_requests_total{upstream=\"crm\",outcome=\"2xx\"} 1"),
        "{metrics}"
    );
    // The pace: nothing learnt, so the limits' 1/s (1 % inside it).
    for gauge in ["upstream_limits_rate", "upstream_effective_rate"] {
        assert!(
            metrics.contains(&format!("tollgate_{gauge}{{upstream=\"crm\"}} 0.990099")),
            "{metrics}"
        );
    }
    let reloaded = reload(&proxy).await;
    assert_eq!(
        reloaded["kept"][0], "crm",
        "an unchanged upstream keeps its line"
    );
    let config = text(&proxy.admin_url("/v1/config")).await;
    assert!(config.contains("name = \"crm\""));
}

/// A vendor's quota does not reset because the proxy's config changed: an
/// upstream whose limits a reload changes gets a new line whose limits carry
/// what was already sent (5 of an hourly 5, raised to 8: 3 more, not 8).
#[tokio::test(start_paused = true)]
async fn a_reload_that_changes_an_upstreams_limits_carries_what_was_sent() {
    let up = scripted(|_, _| ok()).await;
    let dir = std::env::temp_dir().join(tollgate_testkit::unique_prefix("tollgate-requota"));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("proxy.toml");
    let config = |quota: u64, burst: &str| {
        format!(
            "[proxy]\naccess_log = \"off\"\n{}[[upstream.limit]]\nname = \"hourly\"\nalgorithm = \"fixed_window\"\nevery = \"1h\"\nquota = {quota}\n[[upstream.limit]]\nname = \"burst\"\nalgorithm = \"{burst}\"\ncapacity = 100\nrefill = \"100/s\"\n",
            upstream("crm", up.addr, "")
        )
    };
    std::fs::write(&path, config(5, "token_bucket")).expect("config");
    let proxy = common::start_from(
        tollgate_proxy::Source::File(path.clone()),
        TokioClock::starting_at(EPOCH),
    )
    .await;
    for i in 0..5 {
        let r = get(&proxy.url("crm", &format!("/a/{i}")), &[]).await;
        assert_eq!(r.status(), 200);
    }
    std::fs::write(&path, config(8, "leaky_bucket")).expect("config");
    let reloaded = reload(&proxy).await;
    assert_eq!(
        reloaded["carried"],
        serde_json::json!(["crm"]),
        "{reloaded}"
    );
    assert_eq!(
        reloaded["fresh"],
        serde_json::json!([{ "upstream": "crm", "limit": "burst", "why": "its algorithm changed from token_bucket to leaky_bucket" }])
    );
    let mut statuses = Vec::new();
    for i in 0..4 {
        let r = get(
            &proxy.url("crm", &format!("/b/{i}")),
            &[("tollgate-max-wait", "2s")],
        )
        .await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "3 more of 8, then a wait past max_wait"
    );
    assert_eq!(up.seen_under("/a/") + up.seen_under("/b/"), 8);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `POST /v1/reload` on the proxy's admin listener: its JSON answer.
async fn reload(proxy: &common::Running) -> serde_json::Value {
    client()
        .post(proxy.admin_url("/v1/reload"))
        .send()
        .await
        .expect("reload")
        .json()
        .await
        .expect("json")
}

/// A pool of three keys, k-1 to k-3, from the environment (as keys must be).
fn pool_keys() -> String {
    for i in 1..=3 {
        std::env::set_var(format!("TOLLGATE_TEST_POOL_K{i}"), format!("k-{i}"));
    }
    "keys = [\"${TOLLGATE_TEST_POOL_K1}\", \"${TOLLGATE_TEST_POOL_K2}\", \"${TOLLGATE_TEST_POOL_K3}\"]".to_string()
}

#[tokio::test(start_paused = true)]
async fn three_keys_give_three_times_the_rate_of_one_with_no_429() {
    // Celigo's limits apply per key: three keys admit 3,000 at once and
    // then 900 a second, so 4,800 requests take 2 s (one key: 6 s).
    let keys = pool_keys();
    sixty_four_clients_with("celigo", &keys, 4800, Duration::from_secs(2)).await;
}

#[tokio::test(start_paused = true)]
async fn each_pooled_key_shows_what_its_limits_have_left_by_its_name_never_its_value() {
    let up = tollgate_testkit::upstream::scripted(|_, _| ok()).await;
    let limits = format!("{}\n[[upstream.limit]]\nname = \"per-key\"\nkey = [\"header:authorization\"]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = \"1/h\"\n", pool_keys());
    let proxy = start(&upstream("crm", up.addr, &limits)).await;
    for i in 0..4 {
        assert_eq!(
            get(&proxy.url("crm", &format!("/r/{i}")), &[])
                .await
                .status(),
            200
        );
    }
    let metrics = text(&proxy.admin_url("/metrics")).await;
    let per_key = |name: &str| -> Vec<f64> {
        (1..=3)
            .map(|i| {
                let series = format!(
                    "{name}{{upstream=\"crm\",key=\"${{TOLLGATE_TEST_POOL_K{i}}}\",limit=\"per-key\"}} "
                );
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(series.as_str()))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no {series} in {metrics}"))
            })
            .collect()
    };
    let remaining = per_key("tollgate_upstream_key_limit_remaining");
    let quota = per_key("tollgate_upstream_key_limit_quota");
    let used: f64 = quota.iter().zip(&remaining).map(|(q, r)| q - r).sum();
    assert_eq!(
        used, 4.0,
        "the 4 calls spread over the keys: {remaining:?} of {quota:?}"
    );
    for i in 1..=3 {
        assert!(
            !metrics.contains(&format!("k-{i}")),
            "a key's value in /metrics"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_the_vendor_revokes_is_parked_and_its_share_moves_to_the_others() {
    let revoked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gone = revoked.clone();
    let up = tollgate_testkit::upstream::scripted_seen(move |seen, _| {
        let k2 = seen.authorization.as_deref() == Some("Bearer k-2");
        if k2 && gone.load(std::sync::atomic::Ordering::SeqCst) {
            Answer::Status(401, vec![], "{\"error\":\"token revoked\"}")
        } else {
            ok()
        }
    })
    .await;
    let limits = format!("{}\n[[upstream.limit]]\nname = \"per-key\"\nkey = [\"header:authorization\"]\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"10/s\"\n", pool_keys());
    let proxy = start(&upstream("crm", up.addr, &limits)).await;
    let burst = |n: usize, from: usize| {
        let urls: Vec<String> = (from..from + n)
            .map(|i| proxy.url("crm", &format!("/r/{i}")))
            .collect();
        async move {
            let mut all = Vec::new();
            for url in urls {
                all.push(tokio::spawn(async move {
                    get(&url, &[]).await.status().as_u16()
                }));
            }
            let mut codes = Vec::new();
            for c in all {
                codes.push(c.await.expect("client"));
            }
            codes
        }
    };
    // Three keys: 30 requests in about a second (10/s each).
    let started = Instant::now();
    assert!(burst(30, 0).await.iter().all(|c| *c == 200));
    let three = started.elapsed().as_secs_f64();
    assert!((0.85..1.0).contains(&three), "three keys: {three} s");
    revoked.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let codes = burst(30, 100).await;
    assert!(
        codes.iter().all(|c| *c == 200),
        "the client never saw the 401: {codes:?}"
    );
    let two = started.elapsed().as_secs_f64();
    assert!(
        (1.35..1.45).contains(&two),
        "two keys carry on at 20/s: {two} s"
    );
    let refused: Vec<_> = up
        .seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| {
            let second = s.path[3..].parse::<usize>().is_ok_and(|i| i >= 100);
            second && s.authorization.as_deref() == Some("Bearer k-2")
        })
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "k-2 is asked once, then parked: {refused:?}"
    );
    let usage: serde_json::Value = json(&proxy.admin_url("/v1/usage?upstream=crm")).await;
    let keys = &usage["upstreams"][0]["keys"];
    assert_eq!(
        keys[1]["key"], "${TOLLGATE_TEST_POOL_K2}",
        "named by its variable"
    );
    assert_eq!(keys[1]["parked"], "HTTP 401");
    // What is left, per key (as the limits see the keys: never their values).
    let limits = usage["upstreams"][0]["limits"].as_array().expect("limits");
    assert_eq!(limits.len(), 3, "{limits:?}");
    assert_eq!(limits[1]["key"], "${TOLLGATE_TEST_POOL_K2}");
    assert_eq!(limits[1]["limit"], "per-key");
    assert!(keys[0]["parked"].is_null());
    let text = usage.to_string();
    assert!(!text.contains("Bearer k-"), "no key value is shown: {text}");
}

#[tokio::test(start_paused = true)]
async fn a_request_parks_one_key_at_most_and_is_sent_again_only_when_safe() {
    // Every key gets 401 on /pay and 403 on /scope: the request is the
    // cause there, not the keys.
    let up = tollgate_testkit::upstream::scripted_seen(|seen, _| match seen.path.as_str() {
        "/pay" => Answer::Status(401, vec![], "{\"error\":\"card declined\"}"),
        "/scope" => Answer::Status(403, vec![], "{\"error\":\"missing scope\"}"),
        _ => ok(),
    })
    .await;
    let limits = format!("{}\n{}", pool_keys(), bucket("api", 100, "100/s"));
    let proxy = start(&upstream("crm", up.addr, &limits)).await;
    let parked = || async {
        let usage: serde_json::Value = json(&proxy.admin_url("/v1/usage?upstream=crm")).await;
        let keys = usage["upstreams"][0]["keys"]
            .as_array()
            .expect("keys")
            .clone();
        keys.iter().filter(|k| !k["parked"].is_null()).count()
    };
    let seen = |path: &str, method: &str| {
        let seen = up.seen.lock().expect("lock");
        seen.iter()
            .filter(|s| s.path == path && s.method == method)
            .count()
    };

    // A 403 that every key gets is about the request: tried with a second
    // key, relayed, nothing parked.
    let scope = get(&proxy.url("crm", "/scope"), &[]).await;
    assert_eq!(scope.status(), 403);
    assert_eq!(scope.headers()["tollgate-attempts"], "2");
    assert_eq!(parked().await, 0, "a 403 every key gets parks nothing");

    // A GET refused with 401: its key is parked, it goes again with
    // another, refused again: that answer is relayed, that key kept.
    let refused = get(&proxy.url("crm", "/pay"), &[]).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["tollgate-attempts"], "2");
    assert_eq!(seen("/pay", "GET"), 2);
    assert_eq!(parked().await, 1, "one request parks one key at most");

    // A POST without Idempotency-Key is sent once, whatever the answer.
    let post = client()
        .post(proxy.url("crm", "/pay"))
        .body("{\"amount\": 10}")
        .send()
        .await
        .expect("response");
    assert_eq!(post.status(), 401);
    assert_eq!(seen("/pay", "POST"), 1, "a POST is never sent twice");
    assert_eq!(parked().await, 2);

    // TRACE would echo the vendor key the proxy adds: refused here.
    let trace = client()
        .request(reqwest::Method::TRACE, proxy.url("crm", "/ok"))
        .send()
        .await
        .expect("response");
    assert_eq!(trace.status(), 405);
    let problem: serde_json::Value = trace.json().await.expect("problem+json");
    assert_eq!(problem["detail"], "tollgate does not relay TRACE requests.");
    for method in ["TRACK", "trace"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let echo = client()
            .request(m, proxy.url("crm", "/ok"))
            .send()
            .await
            .expect("response");
        assert_eq!(echo.status(), 405, "{method}");
    }
    assert_eq!(seen("/ok", "TRACE"), 0, "the upstream saw no TRACE");
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_key_is_suspected_parks_no_other_key() {
    // k-1 answers 403, k-2 401: the first request tries k-1 (suspected),
    // then k-2, whose 401 is relayed without parking it: one request
    // parks one key at most, and a suspect counts as that one.
    let up =
        tollgate_testkit::upstream::scripted_seen(|seen, _| match seen.authorization.as_deref() {
            Some("Bearer k-1") => Answer::Status(403, vec![], "{\"error\":\"forbidden\"}"),
            Some("Bearer k-2") => Answer::Status(401, vec![], "{\"error\":\"unauthorized\"}"),
            _ => ok(),
        })
        .await;
    let limits = format!("{}\n{}", pool_keys(), bucket("api", 100, "100/s"));
    let proxy = start(&upstream("crm", up.addr, &limits)).await;
    let r = get(&proxy.url("crm", "/x"), &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["tollgate-attempts"], "2");
    let usage: serde_json::Value = json(&proxy.admin_url("/v1/usage?upstream=crm")).await;
    let keys = usage["upstreams"][0]["keys"]
        .as_array()
        .expect("keys")
        .clone();
    assert!(keys.iter().all(|k| k["parked"].is_null()), "{keys:?}");
}

#[tokio::test(start_paused = true)]
async fn a_key_the_vendor_suspends_with_403_is_parked_once_another_key_is_served() {
    let up =
        tollgate_testkit::upstream::scripted_seen(|seen, _| match seen.authorization.as_deref() {
            Some("Bearer k-2") => Answer::Status(403, vec![], "{\"error\":\"key suspended\"}"),
            _ => ok(),
        })
        .await;
    let limits = format!("{}\n{}", pool_keys(), bucket("api", 100, "100/s"));
    let proxy = start(&upstream("crm", up.addr, &limits)).await;
    // Round robin: one of these three takes k-2, is refused, and goes
    // again with another key; no client sees the 403.
    for i in 0..3 {
        let r = get(&proxy.url("crm", &format!("/r/{i}")), &[]).await;
        assert_eq!(r.status(), 200);
    }
    let usage: serde_json::Value = json(&proxy.admin_url("/v1/usage?upstream=crm")).await;
    let keys = &usage["upstreams"][0]["keys"];
    assert_eq!(keys[1]["parked"], "HTTP 403 (another key was served)");
    assert!(keys[0]["parked"].is_null() && keys[2]["parked"].is_null());
    let k2 = up
        .seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.authorization.as_deref() == Some("Bearer k-2"))
        .count();
    assert_eq!(k2, 1, "k-2 asked once, then parked");
}

#[tokio::test(start_paused = true)]
async fn an_alias_path_cannot_climb_out_of_its_upstreams_base_path() {
    let up = scripted(|_, _| ok()).await;
    let config = format!(
        "[[upstream]]\nname = \"crm\"\nbase_url = \"http://{}/v3\"\n{}",
        up.addr,
        bucket("api", 10, "1/s")
    );
    let proxy = start(&config).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for target in [
        "/crm/..\\..\\admin",
        "/crm/%2e%2e/admin",
        "/crm/../../admin",
        // Dot segments where nginx (`%2F`), IIS (`%5C`) or Tomcat (`;`) see them.
        "/crm/..%2F..%2Fadmin",
        "/crm/x/..%2f..%2f..%2fadmin",
        "/crm/..%5C..%5Cadmin",
        "/crm/..;/admin",
        "/crm/x/..;/..;/admin",
    ] {
        let mut raw = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        let head = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        raw.write_all(head.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        raw.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8_lossy(&answer);
        let served = answer.starts_with("HTTP/1.1 200");
        let seen = up.seen.lock().expect("lock").clone();
        assert!(
            seen.iter().all(|s| s.path.starts_with("/v3/")
                && !s.path.contains("..")
                && !s.path.contains(";")),
            "{target} reached {:?} ({answer})",
            seen.iter().map(|s| &s.path).collect::<Vec<_>>()
        );
        let refused = answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 404");
        assert!(served || refused, "{target}: {answer}");
    }
}

#[tokio::test]
async fn bodies_on_their_way_in_count_against_the_bytes_kept() {
    let up = scripted(|_, _| ok()).await;
    let config = format!(
        "[proxy]\naccess_log = \"off\"\nmax_replay_bytes = 1000\nmax_kept_bytes = 1500\n{}",
        upstream("crm", up.addr, &bucket("api", 10, "1/s"))
    );
    let proxy = start(&config).await;
    use tokio::io::AsyncWriteExt;
    // 600 of 1,000 bytes sent, the rest still to come.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let head = format!(
        "PUT /crm/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{}",
        "x".repeat(600)
    );
    slow.write_all(head.as_bytes()).await.expect("write");
    // A whole body of 1,000 sent until the answer is `want` (the proxy
    // reads the slow body's bytes when it gets to them).
    let put_until = |path: &'static str, want: u16| {
        let url = proxy.url("crm", path);
        async move {
            let mut status = 0;
            for _ in 0..100 {
                let r = client().put(&url).body(vec![b'y'; 1000]).send().await;
                status = r.expect("response").status().as_u16();
                if status == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            status
        }
    };
    // Once the proxy holds its 600, a whole body of 1,000 would pass 1,500.
    assert_eq!(
        put_until("/whole", 503).await,
        503,
        "refused while the slow body is on its way"
    );
    // Its bytes go when it does.
    drop(slow);
    assert_eq!(put_until("/after", 200).await, 200);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stops_coming_is_answered_408_and_lets_its_bytes_go() {
    let up = scripted(|_, _| ok()).await;
    let config = format!(
        "[proxy]\naccess_log = \"off\"\n{}",
        upstream("crm", up.addr, &bucket("api", 10, "1/s"))
    );
    let proxy = start(&config).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    // 100 bytes announced, 10 sent, then nothing.
    let head = "POST /crm/stall HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789";
    raw.write_all(head.as_bytes()).await.expect("write");
    let mut answer = vec![0; 4096];
    let n = raw.read(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_stalled"), "{answer}");
    assert!(up.seen("/stall").is_empty(), "nothing of it was sent");
}

#[tokio::test]
async fn listening_off_loopback_without_client_tokens_is_refused_even_from_the_command_line() {
    let config = "[proxy]\naccess_log = \"off\"\n[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 1\n";
    let open = tollgate_proxy::Overrides {
        listen: Some("0.0.0.0:0".parse().expect("addr")),
        admin_listen: None,
    };
    let e = tollgate_proxy::Proxy::new(
        tollgate_proxy::Source::Text(config.into()),
        open,
        Box::new(tollgate_profiles::Bundled),
        TokioClock::starting_at(EPOCH),
    )
    .expect_err("an open relay");
    assert!(e.to_string().contains("is not a loopback address"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_profile_too_fast_for_the_vendor_is_paced_to_it_for_every_client() {
    // The vendor allows 100/s (burst 20) and sends no rate-limit headers;
    // the profile says 160/s. 32 clients send 1,500 GETs as fast as they can.
    let (vendor, verdicts) = tollgate_testkit::vendor::token_bucket(20, |_| 100.0).await;
    let config = upstream(
        "crm",
        vendor.addr,
        &format!("concurrency = 32\n{}", bucket("api", 20, "160/s")),
    );
    let proxy = start(&config).await;
    let codes = clients_send(&proxy.url("crm", "/v1/deals"), 32, 1500).await;
    assert_eq!(codes.len(), 1500);
    assert!(
        codes.iter().all(|c| *c == 200),
        "a 429 is retried for the client"
    );
    let seen = verdicts.lock().expect("lock").clone();
    let refused = refused_share(&seen);
    assert!(
        refused <= 0.02,
        "{:.2}% of calls got a 429",
        refused * 100.0
    );
    let admitted = admitted_since(&seen, 2.0);
    assert!(admitted >= 85.0, "{admitted:.1}/s of the vendor's 100/s");
    // /metrics shows the pace below what the limits allow.
    let metrics = text(&proxy.admin_url("/metrics")).await;
    let gauge = |name: &str| {
        let series = format!("tollgate_{name}{{upstream=\"crm\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let (effective, limits) = (
        gauge("upstream_effective_rate"),
        gauge("upstream_limits_rate"),
    );
    assert!((158.0..159.0).contains(&limits), "{limits}");
    assert!(effective < 120.0, "paced at {effective}/s");
}

#[tokio::test(start_paused = true)]
async fn a_key_the_vendor_holds_to_less_is_paced_alone_and_the_pool_sends_the_rest_by_the_others() {
    // Two keys, each 100/s by the profile; the vendor holds k-2 to 25/s.
    let (vendor, verdicts) = tollgate_testkit::vendor::token_bucket_per_key(20, |key, _| {
        if key == "Bearer k-2" {
            25.0
        } else {
            100.0
        }
    })
    .await;
    let keys = "keys = [\"${TOLLGATE_TEST_PACE_K1}\", \"${TOLLGATE_TEST_PACE_K2}\"]";
    std::env::set_var("TOLLGATE_TEST_PACE_K1", "k-1");
    std::env::set_var("TOLLGATE_TEST_PACE_K2", "k-2");
    let limits = format!("{keys}\nconcurrency = 32\n[[upstream.limit]]\nname = \"per-key\"\nkey = [\"header:authorization\"]\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"100/s\"\n");
    let proxy = start(&upstream("crm", vendor.addr, &limits)).await;
    let codes = clients_send(&proxy.url("crm", "/v1/deals"), 32, 1500).await;
    assert!(codes.iter().all(|c| *c == 200), "every client got 200");
    let seen = verdicts.lock().expect("lock").clone();
    let refused = refused_share(&seen);
    assert!(
        refused <= 0.03,
        "{:.2}% of calls got a 429",
        refused * 100.0
    );
    // One pace for both keys would hold both to what k-2 gets (25/s, 50/s
    // in all); a pace per key lets k-1 go on at its 100/s.
    let admitted = admitted_since(&seen, 2.0);
    assert!(admitted >= 100.0, "{admitted:.1}/s of the keys' 125/s");
}
