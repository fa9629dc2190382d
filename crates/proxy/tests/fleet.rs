//! Fleet mode: proxies on one redis-server share each upstream's quota and
//! each 429 pause. Real time (the pause travels through Redis), real sockets.

mod common;

use common::{client, start_at, upstream};
use std::time::{Duration, Instant};
use tollgate_store::TokioClock;
use tollgate_testkit::upstream::{ok, scripted, scripted_seen, Answer};
use tollgate_testkit::{redis_url, unique_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_one_proxy_gets_pauses_the_upstream_in_every_proxy() {
    let up = scripted(|path, n| match (path, n) {
        ("/a", 1) => Answer::Status(429, vec![("retry-after", "2")], "slow down"),
        _ => ok(),
    })
    .await;
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\n{}",
        redis_url(),
        unique_prefix("proxy-pause"),
        upstream(
            "crm",
            up.addr,
            "[[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"100/s\"\n"
        )
    );
    let one = start_at(&config, TokioClock::system()).await;
    let two = start_at(&config, TokioClock::system()).await;
    one.proxy.connect().await.expect("redis");
    two.proxy.connect().await.expect("redis");
    // (both subscribed to the fleet's pauses before the 429 comes)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let a = {
        let url = one.url("crm", "/a");
        tokio::spawn(async move { client().get(url).send().await.expect("a") })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = client().get(two.url("crm", "/b")).send().await.expect("b");
    let b_took = started.elapsed().as_secs_f64();
    let a = a.await.expect("a");
    assert_eq!(a.status(), 200);
    assert_eq!(a.headers()["tollgate-attempts"], "2");
    assert_eq!(b.status(), 200);
    assert!(
        (1.9..3.0).contains(&b_took),
        "the other proxy waited out the pause: {b_took:.2} s"
    );
    let first_a = up.seen("/a")[0].at;
    let gap = up.seen("/b")[0].at.duration_since(first_a).as_secs_f64();
    assert!(
        gap >= 1.95,
        "nothing reached the upstream during the pause: {gap:.2} s"
    );
}

/// Fleet mode with `cache_store = "redis"`: an upstream `api` at `addr`
/// whose reads under /v1 are kept an hour in the Redis at `url`.
fn shared_cache(url: &str, prefix: &str, addr: std::net::SocketAddr, limit: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\n{}",
        upstream(
            "api",
            addr,
            &format!("cache_store = \"redis\"\n{limit}\n[[upstream.cache]]\npath_prefix = \"/v1\"\nttl = \"1h\"\n")
        )
    )
}

/// A GET through `proxy` as `tenant` (its Authorization): the body and
/// `Tollgate-Cache`.
async fn read_as(proxy: &common::Running, path: &str, tenant: &str) -> (String, String) {
    let r = client()
        .get(proxy.url("api", path))
        .header("authorization", format!("Bearer {tenant}"))
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200, "{path}");
    let state = r.headers()["tollgate-cache"]
        .to_str()
        .expect("ascii")
        .to_string();
    (r.text().await.expect("body"), state)
}

async fn patch_as(proxy: &common::Running, path: &str, tenant: &str) {
    let r = client()
        .patch(proxy.url("api", path))
        .header("authorization", format!("Bearer {tenant}"))
        .body("{}")
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200, "{path}");
}

const PLENTY: &str = "[[upstream.limit]]\nname = \"plenty\"\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"1000/s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_proxy_fetched_another_serves_and_a_write_through_either_evicts_it() {
    let up = scripted_seen(|seen, n| {
        Answer::Text(200, vec![], format!("{} {} #{n}", seen.method, seen.path))
    })
    .await;
    let prefix = unique_prefix("proxy-shared-cache");
    let config = shared_cache(&redis_url(), &prefix, up.addr, PLENTY);
    let one = start_at(&config, TokioClock::system()).await;
    let two = start_at(&config, TokioClock::system()).await;
    let first = read_as(&one, "/v1/sites/5", "tenant-a").await;
    assert_eq!(first, ("GET /v1/sites/5 #1".into(), "miss".into()));
    // The other proxy serves what the first kept, without a call ...
    assert_eq!(
        read_as(&two, "/v1/sites/5", "tenant-a").await,
        ("GET /v1/sites/5 #1".into(), "hit".into())
    );
    // ... but never to another tenant.
    assert_eq!(
        read_as(&two, "/v1/sites/5", "tenant-b").await,
        ("GET /v1/sites/5 #2".into(), "miss".into())
    );
    assert_eq!(read_as(&one, "/v1/sites", "tenant-a").await.1, "miss");
    assert_eq!(read_as(&one, "/v1/job-types", "tenant-a").await.1, "miss");
    // A write through the second proxy evicts the record and the list
    // above it from the first's view too; other paths stay.
    patch_as(&two, "/v1/sites/5", "tenant-a").await;
    assert_eq!(
        read_as(&one, "/v1/sites/5", "tenant-a").await,
        ("GET /v1/sites/5 #4".into(), "miss".into())
    );
    assert_eq!(read_as(&one, "/v1/sites", "tenant-a").await.1, "miss");
    assert_eq!(read_as(&two, "/v1/job-types", "tenant-a").await.1, "hit");
    assert_eq!(up.seen("/v1/job-types").len(), 1);
    // A purge on one admin listener empties the prefix for the fleet.
    let purged = client()
        .post(one.admin_url("/v1/cache/purge"))
        .json(&serde_json::json!({"upstream": "api", "prefix": "/v1/job-types"}))
        .send()
        .await
        .expect("purge");
    assert_eq!(purged.status(), 200);
    assert_eq!(read_as(&two, "/v1/job-types", "tenant-a").await.1, "miss");
    assert_eq!(read_as(&one, "/v1/job-types", "tenant-a").await.1, "hit");
    // Nothing of a credential names a key in Redis.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(
            &mut redis::Client::open(redis_url())
                .expect("client")
                .get_connection()
                .expect("conn"),
        )
        .expect("keys");
    assert!(
        keys.iter().any(|k| k.contains(":cache:upstream:api:e:")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .all(|k| !k.contains("tenant") && !k.contains("sites")),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_still_go_through_when_the_shared_cache_cannot_be_reached() {
    let up =
        scripted_seen(|seen, n| Answer::Text(200, vec![], format!("{} #{n}", seen.path))).await;
    let gone = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let limit = format!("{PLENTY}fail = \"open\"\n");
    let config = shared_cache(
        &format!("redis://127.0.0.1:{gone}"),
        "gone",
        up.addr,
        &limit,
    );
    let proxy = start_at(&config, TokioClock::system()).await;
    for n in 1..=3 {
        let (body, state) = read_as(&proxy, "/v1/sites", "tenant-a").await;
        assert_eq!(
            (body, state),
            (format!("/v1/sites #{n}"), "miss".to_string())
        );
    }
    patch_as(&proxy, "/v1/sites", "tenant-a").await;
}

/// Two proxies on one Redis: jobs pushed to one go into the fleet's queue,
/// both lease and send them, each is sent once, either tells a job's
/// status, and every job's callback is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_pushed_to_one_proxy_of_a_fleet_are_worked_by_all() {
    let up = scripted(|_, _| ok()).await;
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\n{}",
        redis_url(),
        unique_prefix("proxy-jobs"),
        upstream(
            "crm",
            up.addr,
            "[[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 50\nrefill = \"500/s\"\n"
        )
    );
    let one = start_at(&config, TokioClock::system()).await;
    let two = start_at(&config, TokioClock::system()).await;
    one.proxy.connect().await.expect("redis");
    two.proxy.connect().await.expect("redis");
    let receiver = scripted(|_, _| Answer::Status(204, vec![], "")).await;
    let jobs = 400;
    let lines: String = (0..jobs)
        .map(|i| {
            format!(
                "{{\"id\":\"f{i}\",\"method\":\"GET\",\"url\":\"http://{}/v1/{i}\"}}\n",
                up.addr
            )
        })
        .collect();
    let pushed = client()
        .post(format!("http://{}/_tollgate/jobs", one.addr))
        .header("content-type", "application/x-ndjson")
        .header(
            "tollgate-callback",
            format!("http://{}/hooks", receiver.addr),
        )
        .body(lines)
        .send()
        .await
        .expect("intake");
    assert_eq!(pushed.status(), 202);
    // Every job done, asked of the other proxy (one client: building one
    // reads the system's roots).
    let asking = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..jobs {
        loop {
            let status: serde_json::Value = asking
                .get(format!("http://{}/_tollgate/jobs/f{i}", two.addr))
                .send()
                .await
                .expect("status")
                .json()
                .await
                .expect("json");
            if status["status"] == "done" {
                assert_eq!(status["result"]["status"], 200);
                break;
            }
            assert!(Instant::now() < deadline, "job f{i}: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Each sent once, by one proxy or the other (both took some).
    assert_eq!(up.seen.lock().expect("lock").len(), jobs);
    let (a, b) = (
        common::text(&one.admin_url("/metrics")).await,
        common::text(&two.admin_url("/metrics")).await,
    );
    let done = |t: &str| {
        t.lines()
            .find_map(|l| {
                l.strip_prefix("tollgate_jobs_finished_total{upstream=\"crm\",outcome=\"done\"} ")
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(done(&a) + done(&b), jobs as f64);
    assert!(
        done(&a) > 0.0 && done(&b) > 0.0,
        "both proxies worked the queue: {} and {}",
        done(&a),
        done(&b)
    );
    // Their callbacks were kept with their results, and delivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let delivered = loop {
        let ids: std::collections::BTreeSet<String> = receiver
            .seen("/hooks")
            .iter()
            .filter_map(|s| {
                s.headers
                    .iter()
                    .find(|(n, _)| n == "tollgate-job-id")
                    .map(|(_, v)| v.clone())
            })
            .collect();
        if ids.len() == jobs || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(delivered.len(), jobs, "every job's callback, with its id");
}

/// An upstream a reload adds is leased for too: its pushed jobs get done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_proxy_leases_for_an_upstream_a_reload_adds() {
    let first = scripted(|_, _| ok()).await;
    let added = scripted(|_, _| ok()).await;
    let limit = "[[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 50\nrefill = \"500/s\"\n";
    let store = format!(
        "[proxy]\naccess_log = \"off\"\n[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\n",
        redis_url(),
        unique_prefix("proxy-jobs-reload")
    );
    let dir = std::env::temp_dir().join(unique_prefix("proxy-jobs-reload"));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!("{store}{}", upstream("one", first.addr, limit)),
    )
    .expect("config");
    let proxy = common::start_from(
        tollgate_proxy::Source::File(path.clone()),
        TokioClock::system(),
    )
    .await;
    proxy.proxy.connect().await.expect("redis");
    std::fs::write(
        &path,
        format!(
            "{store}{}{}",
            upstream("one", first.addr, limit),
            upstream("two", added.addr, limit)
        ),
    )
    .expect("config");
    proxy.proxy.reload().await.expect("reload");
    let lines: String = (0..20)
        .map(|i| {
            format!(
                "{{\"id\":\"r{i}\",\"method\":\"GET\",\"url\":\"http://{}/v1/{i}\"}}\n",
                added.addr
            )
        })
        .collect();
    let pushed = client()
        .post(format!("http://{}/_tollgate/jobs", proxy.addr))
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .expect("intake");
    assert_eq!(pushed.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    while added.seen.lock().expect("lock").len() < 20 {
        assert!(
            Instant::now() < deadline,
            "the added upstream's jobs were not leased"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
