//! The proxy's cache over real sockets on 127.0.0.1, against a scripted
//! upstream that counts its calls: what is kept and for how long (RFC
//! 9111's shared-cache rules), the tenant partition, coalescing, eviction
//! on write, purge, and stale entries served while the upstream fails.

mod common;

use common::{attempts, bucket, client, get, start, upstream};
use std::collections::HashMap;
use std::time::Duration;
use tollgate_testkit::upstream::{scripted_seen, Answer, Seen};

/// An `[[upstream.cache]]` table under `prefix`, kept an hour.
fn cache(prefix: &str, extra: &str) -> String {
    format!("[[upstream.cache]]\npath_prefix = \"{prefix}\"\nttl = \"1h\"\n{extra}\n")
}

/// An upstream with limits that never bind and a cache under `prefix`.
fn cached(name: &str, addr: std::net::SocketAddr, prefix: &str, extra: &str) -> String {
    let limit = bucket("plenty", 1000, "1000/s");
    upstream(
        name,
        addr,
        &format!("{extra}\n{limit}{}", cache(prefix, "")),
    )
}

/// `Tollgate-Cache` of an answer.
fn state(r: &reqwest::Response) -> String {
    r.headers()["tollgate-cache"]
        .to_str()
        .expect("ascii")
        .to_string()
}

fn header<'s>(seen: &'s Seen, name: &str) -> Option<&'s str> {
    seen.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn text(status: u16, headers: &[(&str, &str)], body: String) -> Answer {
    let headers = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    Answer::Text(status, headers, body)
}

async fn body_and_state(url: &str, headers: &[(&str, &str)]) -> (String, String) {
    read(&client(), url, headers).await
}

/// `body_and_state` with a client made once (making one takes long
/// enough to miss a call in flight).
async fn read(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut r = c.get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.expect("response");
    assert_eq!(r.status(), 200, "{url}");
    let state = state(&r);
    (r.text().await.expect("body"), state)
}

#[tokio::test(start_paused = true)]
async fn a_naive_nightly_import_makes_503_calls_instead_of_2000() {
    // The API gateway's rate-limit page: "Importing 500 jobs nightly: cache
    // /v1/sites, /v1/job-types, and /v1/custom-fields once at the start of
    // the run (3 requests)". Done naively: three lookups before each create.
    let up = scripted_seen(|seen, n| match seen.method.as_str() {
        "GET" => text(
            200,
            &[],
            format!("{{\"of\":\"{}\",\"call\":{n}}}", seen.path),
        ),
        _ => text(201, &[], format!("{{\"created\":{n}}}")),
    })
    .await;
    let routes = ["/v1/sites", "/v1/job-types", "/v1/custom-fields"];
    // Paced by the page's own limits (60 + 1/s for everything, 40 + 1 per
    // 1.5 s for writes), for one tenant.
    let config = upstream(
        "gateway",
        up.addr,
        &format!(
            "profile = \"gateway\"\nheaders = {{ x-tenant-id = \"acme\" }}\n{}",
            routes.iter().map(|r| cache(r, "")).collect::<String>()
        ),
    );
    let proxy = start(&config).await;
    let started = tokio::time::Instant::now();
    let c = client();
    let mut states: HashMap<String, usize> = HashMap::new();
    for i in 1..=500 {
        for path in routes {
            let r = c
                .get(proxy.url("gateway", path))
                .send()
                .await
                .expect("response");
            assert_eq!(r.status(), 200);
            *states.entry(state(&r)).or_default() += 1;
            // What the upstream said the one time it was asked.
            let body = r.text().await.expect("body");
            assert_eq!(body, format!("{{\"of\":\"{path}\",\"call\":1}}"));
        }
        let r = c
            .post(proxy.url("gateway", "/v1/jobs"))
            .body(format!("{{\"job\":{i}}}"))
            .send()
            .await
            .expect("response");
        assert_eq!(r.status(), 201);
        assert!(
            !r.headers().contains_key("tollgate-cache"),
            "not a cached route"
        );
        assert_eq!(
            r.text().await.expect("body"),
            format!("{{\"created\":{i}}}")
        );
    }
    assert_eq!(up.seen.lock().expect("lock").len(), 503);
    assert_eq!((states["miss"], states["hit"]), (3, 1497), "{states:?}");
    // The writes bucket binds: 40 at once, then one per 1.5 s (and the 1 %
    // the proxy keeps inside a profile), about 11.6 minutes in all, "under
    // 20 minutes" as the page says. Uncached, the lookups alone would take
    // the tenant bucket's 1,500 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(12 * 60), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn what_the_upstream_says_of_caching_is_honoured() {
    let up = scripted_seen(|seen, n| {
        let cache_control = match seen.path.as_str() {
            "/v1/no-store" => "no-store",
            "/v1/private" => "private, max-age=60",
            "/v1/max-age" => "max-age=5",
            "/v1/shared" => "max-age=60, s-maxage=2",
            _ => "",
        };
        let lang = header(seen, "accept-language").unwrap_or("-");
        let mut headers = vec![("cache-control", cache_control)];
        if seen.path == "/v1/vary" {
            headers.push(("vary", "Accept-Language"));
        }
        text(200, &headers, format!("{} {lang} #{n}", seen.path))
    })
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = |path: &str| proxy.url("api", path);
    for path in ["/v1/no-store", "/v1/private"] {
        for n in 1..=3 {
            let (body, state) = body_and_state(&url(path), &[]).await;
            assert_eq!((body, state.as_str()), (format!("{path} - #{n}"), "miss"));
        }
    }
    // max-age: kept 5 s, then asked again.
    assert_eq!(body_and_state(&url("/v1/max-age"), &[]).await.1, "miss");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = get(&url("/v1/max-age"), &[]).await;
    assert_eq!((state(&r).as_str(), attempts(&r)), ("hit", 0));
    assert_eq!(r.headers()["age"], "4");
    assert_eq!(r.text().await.expect("body"), "/v1/max-age - #1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        body_and_state(&url("/v1/max-age"), &[]).await,
        ("/v1/max-age - #2".to_string(), "miss".to_string())
    );
    // s-maxage is a shared cache's, over max-age.
    assert_eq!(body_and_state(&url("/v1/shared"), &[]).await.1, "miss");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(body_and_state(&url("/v1/shared"), &[]).await.1, "hit");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(body_and_state(&url("/v1/shared"), &[]).await.1, "miss");
    // Vary: a request that differs in Accept-Language is never served
    // another's variant.
    let fr = [("accept-language", "fr")];
    let de = [("accept-language", "de")];
    assert_eq!(
        body_and_state(&url("/v1/vary"), &fr).await,
        ("/v1/vary fr #1".into(), "miss".into())
    );
    assert_eq!(
        body_and_state(&url("/v1/vary"), &fr).await,
        ("/v1/vary fr #1".into(), "hit".into())
    );
    assert_eq!(
        body_and_state(&url("/v1/vary"), &de).await,
        ("/v1/vary de #2".into(), "miss".into())
    );
    // The client's no-cache goes past the cache (and refreshes it).
    let (body, state) = body_and_state(&url("/v1/shared"), &[("cache-control", "no-cache")]).await;
    assert_eq!(
        (body.as_str(), state.as_str()),
        ("/v1/shared - #3", "bypass")
    );
    assert_eq!(
        body_and_state(&url("/v1/shared"), &[]).await,
        ("/v1/shared - #3".into(), "hit".into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_is_revalidated_with_its_etag_and_a_304_refreshes_it() {
    // The 304 says nothing of caching: the entry is fresh again for its own
    // max-age=10, not for the route's hour.
    let up = scripted_seen(|seen, _| match header(seen, "if-none-match") {
        Some("\"v1\"") => text(304, &[("etag", "\"v1\"")], String::new()),
        _ => text(
            200,
            &[("etag", "\"v1\""), ("cache-control", "max-age=10")],
            "the record".into(),
        ),
    })
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = proxy.url("api", "/v1/record");
    assert_eq!(
        body_and_state(&url, &[]).await,
        ("the record".into(), "miss".into())
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    let r = get(&url, &[]).await;
    assert_eq!(
        (r.status().as_u16(), state(&r).as_str(), attempts(&r)),
        (200, "revalidated", 1)
    );
    assert_eq!(r.text().await.expect("body"), "the record");
    let seen = up.seen("/v1/record");
    assert_eq!(seen.len(), 2);
    assert_eq!(header(&seen[1], "if-none-match"), Some("\"v1\""));
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(body_and_state(&url, &[]).await.1, "hit");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(body_and_state(&url, &[]).await.1, "revalidated");
    assert_eq!(up.seen("/v1/record").len(), 3);
}

#[tokio::test]
async fn one_tenants_cached_body_is_never_served_to_another_even_in_flight() {
    // The upstream answers with the credential it was sent, slowly, so
    // reads of both tenants are in flight at once.
    let up = scripted_seen(|seen, _| {
        let who = header(seen, "authorization")
            .unwrap_or("nobody")
            .to_string();
        Answer::After(Duration::from_millis(300), Box::new(text(200, &[], who)))
    })
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = proxy.url("api", "/v1/contacts");
    let c = client();
    let mut reads = Vec::new();
    for i in 0..20 {
        let (url, c) = (url.clone(), c.clone());
        let tenant = if i % 2 == 0 {
            "Bearer tenant-a"
        } else {
            "Bearer tenant-b"
        };
        reads.push(tokio::spawn(async move {
            let (body, state) = read(&c, &url, &[("authorization", tenant)]).await;
            (tenant, body, state)
        }));
    }
    let mut states = Vec::new();
    for done in reads {
        let (tenant, body, state) = done.await.expect("read");
        assert_eq!(body, tenant, "{state}");
        states.push(state);
    }
    assert_eq!(
        states.iter().filter(|s| *s == "coalesced").count(),
        18,
        "{states:?}"
    );
    assert_eq!(up.seen("/v1/contacts").len(), 2, "one call per tenant");
    for tenant in ["Bearer tenant-a", "Bearer tenant-b"] {
        let (body, state) = body_and_state(&url, &[("authorization", tenant)]).await;
        assert_eq!((body.as_str(), state.as_str()), (tenant, "hit"));
    }
    // No credential at all is a partition of its own, too.
    assert_eq!(body_and_state(&url, &[]).await.0, "nobody");
}

#[tokio::test]
async fn fifty_identical_reads_make_one_call_even_if_the_first_client_goes_away() {
    let up = scripted_seen(|_, n| {
        Answer::After(
            Duration::from_millis(400),
            Box::new(text(200, &[], format!("call {n}"))),
        )
    })
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = proxy.url("api", "/v1/companies/7");
    let c = client();
    let leader = {
        let (url, c) = (url.clone(), c.clone());
        tokio::spawn(async move { read(&c, &url, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let followers: Vec<_> = (0..49)
        .map(|_| {
            let (url, c) = (url.clone(), c.clone());
            tokio::spawn(async move { read(&c, &url, &[]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    for follower in followers {
        let (body, state) = follower.await.expect("follower");
        assert_eq!((body.as_str(), state.as_str()), ("call 1", "coalesced"));
    }
    assert_eq!(up.seen("/v1/companies/7").len(), 1);
    // The call the first client left completed and was kept.
    assert_eq!(
        body_and_state(&url, &[]).await,
        ("call 1".into(), "hit".into())
    );
}

#[tokio::test]
async fn when_the_shared_call_fails_each_waiting_read_gets_a_call_of_its_own() {
    let up = scripted_seen(|_, n| match n {
        1 => Answer::After(Duration::from_millis(300), Box::new(Answer::Drop)),
        _ => text(200, &[], format!("call {n}")),
    })
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "max_attempts = 1")).await;
    let url = proxy.url("api", "/v1/companies/8");
    let c = client();
    let leader = {
        let (url, c) = (url.clone(), c.clone());
        tokio::spawn(async move {
            c.get(&url)
                .send()
                .await
                .expect("response")
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let followers: Vec<_> = (0..10)
        .map(|_| {
            let (url, c) = (url.clone(), c.clone());
            tokio::spawn(async move { read(&c, &url, &[]).await })
        })
        .collect();
    assert_eq!(leader.await.expect("leader"), 502);
    for follower in followers {
        let (body, state) = follower.await.expect("follower");
        assert!(body.starts_with("call ") && body != "call 1", "{body}");
        assert_eq!(state, "miss");
    }
    assert_eq!(up.seen("/v1/companies/8").len(), 11);
}

#[tokio::test]
async fn a_write_evicts_what_it_changed_and_purge_empties_a_prefix() {
    let up = scripted_seen(|seen, n| text(200, &[], format!("{} {} #{n}", seen.method, seen.path)))
        .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = |path: &str| proxy.url("api", path);
    for path in ["/v1/sites", "/v1/sites/5", "/v1/job-types"] {
        assert_eq!(body_and_state(&url(path), &[]).await.1, "miss");
        assert_eq!(body_and_state(&url(path), &[]).await.1, "hit");
    }
    let r = client()
        .patch(url("/v1/sites/5"))
        .body("{}")
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200);
    // The record, and the list above it, are asked again; the rest is kept.
    // (the upstream counts calls per path: the PATCH was #2)
    assert_eq!(
        body_and_state(&url("/v1/sites/5"), &[]).await,
        ("GET /v1/sites/5 #3".into(), "miss".into())
    );
    assert_eq!(
        body_and_state(&url("/v1/sites"), &[]).await,
        ("GET /v1/sites #2".into(), "miss".into())
    );
    assert_eq!(body_and_state(&url("/v1/job-types"), &[]).await.1, "hit");
    let purge = |body: serde_json::Value| {
        let admin = proxy.admin_url("/v1/cache/purge");
        async move {
            client()
                .post(admin)
                .json(&body)
                .send()
                .await
                .expect("response")
        }
    };
    let r = purge(serde_json::json!({"upstream": "api", "prefix": "/v1/job-types"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body_and_state(&url("/v1/job-types"), &[]).await.1, "miss");
    assert_eq!(body_and_state(&url("/v1/sites"), &[]).await.1, "hit");
    // Bad input names what was wrong.
    let r = purge(serde_json::json!({"upstream": "nope", "prefix": "/v1"})).await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.expect("body").contains("nope"));
    let r = purge(serde_json::json!({"upstream": "api"})).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("body").contains("prefix"));
}

#[tokio::test(start_paused = true)]
async fn while_the_upstream_fails_a_stale_entry_is_served_for_stale_if_error() {
    let up = scripted_seen(|seen, n| match (seen.path.as_str(), n) {
        ("/v1/strict", 1) => text(
            200,
            &[("cache-control", "max-age=1, must-revalidate")],
            "strict".into(),
        ),
        (_, 1) => text(200, &[("cache-control", "max-age=1")], "kept".into()),
        _ => text(503, &[], "down".into()),
    })
    .await;
    let config = upstream(
        "api",
        up.addr,
        &format!(
            "max_attempts = 1\nbreaker = {{ failures = 2, cooldown = \"30s\" }}\n{}{}",
            bucket("plenty", 1000, "1000/s"),
            cache("/v1", "stale_if_error = \"1m\"")
        ),
    );
    let proxy = start(&config).await;
    let url = proxy.url("api", "/v1/account");
    assert_eq!(
        body_and_state(&url, &[]).await,
        ("kept".into(), "miss".into())
    );
    let strict = proxy.url("api", "/v1/strict");
    assert_eq!(
        body_and_state(&strict, &[]).await,
        ("strict".into(), "miss".into())
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // must-revalidate: never served stale; the failure is the answer (and
    // the breaker's first failure).
    assert_eq!(get(&strict, &[]).await.status(), 503);
    // A 503 (the breaker opens on this second failure), then the breaker:
    // the entry each time, the upstream not asked while the breaker is open.
    for _ in 0..4 {
        assert_eq!(
            body_and_state(&url, &[]).await,
            ("kept".into(), "stale".into())
        );
    }
    assert_eq!(up.seen("/v1/account").len(), 2);
    // Past stale_if_error the failure is the answer.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let r = get(&url, &[]).await;
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn calls_saved_and_the_cache_size_are_in_the_metrics() {
    let up = scripted_seen(|_, n| text(200, &[], format!("#{n}"))).await;
    let proxy = start(&upstream(
        "api",
        up.addr,
        &format!(
            "{}{}",
            bucket("plenty", 1000, "1000/s"),
            cache("/v1", "max_bytes = 65536")
        ),
    ))
    .await;
    for _ in 0..3 {
        get(&proxy.url("api", "/v1/a"), &[]).await;
    }
    let metrics = common::text(&proxy.admin_url("/metrics")).await;
    for line in [
        "tollgate_proxy_calls_saved_total{upstream=\"api\",reason=\"hit\"} 2",
        "tollgate_proxy_cache_entries{upstream=\"api\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    let bytes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_proxy_cache_bytes{upstream=\"api\"} "))
        .expect("cache bytes")
        .parse()
        .expect("number");
    assert!((256..1024).contains(&bytes), "{bytes}");
}

/// An upstream with limits that never bind and `extra` (dedup settings).
fn writes(name: &str, addr: std::net::SocketAddr, extra: &str) -> String {
    upstream(
        name,
        addr,
        &format!("{extra}\n{}", bucket("plenty", 1000, "1000/s")),
    )
}

async fn post(
    c: &reqwest::Client,
    url: &str,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = c
        .post(url)
        .header("idempotency-key", key)
        .body(body.to_string());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("response")
}

fn dedup_state(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("tollgate-dedup")
        .map(|v| v.to_str().expect("ascii").to_string())
}

#[tokio::test(start_paused = true)]
async fn a_repeated_idempotency_key_gets_the_first_answer_and_another_request_with_it_a_422() {
    let up =
        scripted_seen(|_, n| text(201, &[("location", "/v1/jobs/9")], format!("created #{n}")))
            .await;
    let proxy = start(&writes("api", up.addr, "dedup = \"10m\"")).await;
    let url = proxy.url("api", "/v1/jobs");
    let c = client();
    let r = post(&c, &url, "k1", "{\"a\":1}", &[]).await;
    assert_eq!(
        (r.status().as_u16(), dedup_state(&r), attempts(&r)),
        (201, None, 1)
    );
    assert_eq!(r.text().await.expect("body"), "created #1");
    let r = post(&c, &url, "k1", "{\"a\":1}", &[]).await;
    assert_eq!(
        (
            r.status().as_u16(),
            dedup_state(&r).as_deref(),
            attempts(&r)
        ),
        (201, Some("hit"), 0)
    );
    assert_eq!(r.headers()["location"], "/v1/jobs/9");
    assert_eq!(r.text().await.expect("body"), "created #1");
    // The same key for another request: refused, and nothing is sent.
    let r = post(&c, &url, "k1", "{\"a\":2}", &[]).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let detail = r.text().await.expect("body");
    assert!(
        detail.contains("Idempotency-Key 'k1'") && detail.contains("differ"),
        "{detail}"
    );
    // Another key, another tenant: calls of their own.
    assert_eq!(
        post(&c, &url, "k2", "{\"a\":1}", &[])
            .await
            .text()
            .await
            .expect("body"),
        "created #2"
    );
    let other = post(
        &c,
        &url,
        "k1",
        "{\"a\":1}",
        &[("authorization", "Bearer tenant-b")],
    )
    .await;
    assert_eq!(other.text().await.expect("body"), "created #3");
    assert_eq!(up.seen("/v1/jobs").len(), 3);
    // Past the window, the key is forgotten.
    tokio::time::sleep(Duration::from_secs(601)).await;
    assert_eq!(
        post(&c, &url, "k1", "{\"a\":1}", &[])
            .await
            .text()
            .await
            .expect("body"),
        "created #4"
    );
}

#[tokio::test]
async fn a_repeat_while_the_first_is_in_flight_waits_and_the_first_completes_without_its_client() {
    let up = scripted_seen(|_, n| {
        Answer::After(
            Duration::from_millis(400),
            Box::new(text(201, &[], format!("created #{n}"))),
        )
    })
    .await;
    let proxy = start(&writes("api", up.addr, "dedup = \"10m\"")).await;
    let url = proxy.url("api", "/v1/jobs");
    let c = client();
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, "k1", "{}", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Its client goes away; a retry with the same key comes.
    first.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retry = post(&c, &url, "k1", "{}", &[]).await;
    assert_eq!(
        (retry.status().as_u16(), dedup_state(&retry).as_deref()),
        (201, Some("hit"))
    );
    assert_eq!(retry.text().await.expect("body"), "created #1");
    assert_eq!(up.seen("/v1/jobs").len(), 1, "the vendor created it once");
}

#[tokio::test]
async fn a_failed_write_is_not_remembered_and_a_restart_forgets_but_the_vendor_sees_the_key() {
    let up = scripted_seen(|_, n| match n {
        1 => text(503, &[], "down".into()),
        _ => text(201, &[], format!("created #{n}")),
    })
    .await;
    let config = writes("api", up.addr, "dedup = \"10m\"\nmax_attempts = 1");
    let proxy = start(&config).await;
    let c = client();
    let url = proxy.url("api", "/v1/jobs");
    assert_eq!(post(&c, &url, "k1", "{}", &[]).await.status(), 503);
    assert_eq!(
        post(&c, &url, "k1", "{}", &[])
            .await
            .text()
            .await
            .expect("body"),
        "created #2"
    );
    assert_eq!(
        dedup_state(&post(&c, &url, "k1", "{}", &[]).await).as_deref(),
        Some("hit")
    );
    // A new proxy (a restart) remembers nothing: the repeat is sent again,
    // with its Idempotency-Key, for a vendor that honours it.
    let restarted = start(&config).await;
    let r = post(&c, &restarted.url("api", "/v1/jobs"), "k1", "{}", &[]).await;
    assert_eq!((r.status().as_u16(), dedup_state(&r)), (201, None));
    let seen = up.seen("/v1/jobs");
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.idempotency_key == "k1"));
}

#[tokio::test]
async fn a_patch_that_changes_nothing_is_answered_from_memory() {
    let up = scripted_seen(|seen, n| text(200, &[], format!("{} #{n}", seen.method))).await;
    let proxy = start(&writes(
        "api",
        up.addr,
        "skip_unchanged = [\"/v1/contacts\"]",
    ))
    .await;
    let c = client();
    let url = proxy.url("api", "/v1/contacts/5");
    let patch = |body: &'static str| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let r = c.patch(&url).body(body).send().await.expect("response");
            let state = dedup_state(&r);
            (r.text().await.expect("body"), state)
        }
    };
    assert_eq!(patch("{\"name\":\"Ada\"}").await, ("PATCH #1".into(), None));
    assert_eq!(
        patch("{\"name\":\"Ada\"}").await,
        ("PATCH #1".into(), Some("unchanged".into()))
    );
    assert_eq!(
        patch("{\"name\":\"Grace\"}").await,
        ("PATCH #2".into(), None)
    );
    assert_eq!(patch("{\"name\":\"Ada\"}").await, ("PATCH #3".into(), None));
    // Another write to the record: its state is no longer known.
    let r = c.delete(&url).send().await.expect("response");
    assert_eq!(r.text().await.expect("body"), "DELETE #4");
    assert_eq!(patch("{\"name\":\"Ada\"}").await, ("PATCH #5".into(), None));
    // Outside the prefix, every PATCH goes.
    let other = proxy.url("api", "/v1/deals/1");
    for n in 1..=2 {
        let r = c.patch(&other).body("{}").send().await.expect("response");
        assert_eq!(r.text().await.expect("body"), format!("PATCH #{n}"));
    }
}

#[tokio::test(start_paused = true)]
async fn heads_ranges_and_cookies_are_kept_apart() {
    let up = scripted_seen(
        |seen, n| match (seen.path.as_str(), header(seen, "range")) {
            ("/v1/login", _) => text(
                200,
                &[("set-cookie", "session=s3cret")],
                format!("welcome #{n}"),
            ),
            (_, Some(_)) => text(206, &[("content-range", "bytes 0-2/14")], "GET".into()),
            _ => text(200, &[], format!("{} {} #{n}", seen.method, seen.path)),
        },
    )
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = |path: &str| proxy.url("api", path);
    let c = client();
    // HEAD has entries of its own, with the upstream's Content-Length.
    for state in ["miss", "hit"] {
        let r = c.head(url("/v1/doc")).send().await.expect("response");
        assert_eq!(r.headers()["tollgate-cache"], state);
        assert_eq!(
            r.headers()["content-length"],
            "15",
            "the length of \"HEAD /v1/doc #1\""
        );
    }
    // A range asks for part of the resource: fetched alone, the full
    // entry neither served nor replaced.
    assert_eq!(
        body_and_state(&url("/v1/doc"), &[]).await,
        ("GET /v1/doc #2".into(), "miss".into())
    );
    let r = c
        .get(url("/v1/doc"))
        .header("range", "bytes=0-2")
        .send()
        .await
        .expect("response");
    assert_eq!((r.status().as_u16(), state(&r).as_str()), (206, "bypass"));
    assert_eq!(r.text().await.expect("body"), "GET");
    assert_eq!(
        body_and_state(&url("/v1/doc"), &[]).await,
        ("GET /v1/doc #2".into(), "hit".into())
    );
    // A response that sets a cookie is never kept.
    for n in 1..=2 {
        let (body, state) = body_and_state(&url("/v1/login"), &[]).await;
        assert_eq!((body, state.as_str()), (format!("welcome #{n}"), "miss"));
    }
}

#[tokio::test]
async fn a_read_in_flight_when_a_write_lands_does_not_keep_what_it_fetched() {
    // GETs answer slowly, with the version the PATCH sets.
    let version = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
    let v = version.clone();
    let up = scripted_seen(move |seen, _| match seen.method.as_str() {
        "GET" => {
            let then = v.load(std::sync::atomic::Ordering::SeqCst);
            Answer::After(
                Duration::from_millis(400),
                Box::new(text(200, &[], format!("v{then}"))),
            )
        }
        _ => {
            v.store(2, std::sync::atomic::Ordering::SeqCst);
            text(200, &[], "patched".into())
        }
    })
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = proxy.url("api", "/v1/sites/5");
    let c = client();
    let before = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { read(&c, &url, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = c.patch(&url).body("{}").send().await.expect("response");
    assert_eq!(r.status(), 200);
    // A read after the write does not join the flight from before it.
    let after = read(&c, &url, &[]).await;
    assert_eq!(after, ("v2".into(), "miss".into()));
    assert_eq!(before.await.expect("read").0, "v1");
    // And what the read from before fetched was not kept over it.
    assert_eq!(read(&c, &url, &[]).await, ("v2".into(), "hit".into()));
}

#[tokio::test]
async fn every_line_of_a_credential_header_partitions() {
    let up = scripted_seen(|seen, _| {
        let cookies: Vec<&str> = seen
            .headers
            .iter()
            .filter(|(n, _)| n == "cookie")
            .map(|(_, v)| v.as_str())
            .collect();
        text(200, &[], cookies.join("; "))
    })
    .await;
    let proxy = start(&cached("api", up.addr, "/v1", "")).await;
    let url = proxy.url("api", "/v1/me");
    let c = client();
    let send = |session: &'static str| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let r = c
                .get(&url)
                .header("cookie", "theme=dark")
                .header("cookie", session)
                .send()
                .await
                .expect("response");
            let state = state(&r);
            (r.text().await.expect("body"), state)
        }
    };
    assert_eq!(
        send("session=a").await,
        ("theme=dark; session=a".into(), "miss".into())
    );
    assert_eq!(
        send("session=b").await,
        ("theme=dark; session=b".into(), "miss".into())
    );
    assert_eq!(
        send("session=a").await,
        ("theme=dark; session=a".into(), "hit".into())
    );
}
