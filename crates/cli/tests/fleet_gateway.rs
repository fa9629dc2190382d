//! Fleet mode for the gateway: several `tollgate serve` processes sharing one
//! real redis-server, on loopback, with Redis killed and restarted mid-run.

use std::time::Duration;
use tollgate_testkit::RedisServer;

mod common;

fn http(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    common::http(addr, "GET", path, headers)
}

fn metric(admin: &str, name: &str) -> f64 {
    let (_, text) = http(admin, "/metrics", &[]);
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

fn store(url: &str, extra: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{url}\"\nprefix = \"{}\"\ntimeout = \"300ms\"\n{extra}\n",
        tollgate_testkit::unique_prefix("gw")
    )
}

/// Three gateways, one quota: together they admit exactly what one would,
/// under concurrent load on all three; with Redis killed a `fail = "closed"`
/// limit answers 503, and once Redis is back decisions are shared again.
#[test]
fn three_gateways_admit_exactly_one_quota_and_fail_closed_while_redis_is_down() {
    let mut redis = RedisServer::start();
    // 150 per tenant and a refill of one an hour: the count is exact for the
    // test's duration. The second limit makes every decision two-limit.
    let config = common::config_file(
        "three.toml",
        &format!(
            "{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 150\nrefill = \"1/h\"\n\n[[limit]]\nname = \"all\"\nkey = [\"const:all\"]\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 100000\n",
            store(&redis.url(), "")
        ),
    );
    let gateways: Vec<common::Serve> = (0..3).map(|_| common::serve(&config)).collect();
    let admitted = std::sync::atomic::AtomicUsize::new(0);
    let limited = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for g in &gateways {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        match http(&g.proxy, "/v1/jobs", &[("x-tenant-id", "acme")]).0 {
                            200 => admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                            429 => limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                            other => panic!("unexpected status {other}"),
                        };
                    }
                });
            }
        }
    });
    // 600 requests over 3 processes and 12 connections at once: 150 admitted.
    assert_eq!(
        admitted.into_inner(),
        150,
        "zero over-admission across the fleet"
    );
    assert_eq!(limited.into_inner(), 450);

    // Redis goes away: the limits fail closed (the default) with a 503.
    redis.kill();
    let (status, text) = http(&gateways[0].proxy, "/v1/jobs", &[("x-tenant-id", "other")]);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("store_unavailable"), "{text}");
    assert!(text.contains("fails closed"), "{text}");
    assert_eq!(metric(&gateways[0].admin, "tollgate_store_up "), 0.0);

    // Back (empty: nothing was persisted): decisions are shared again, with
    // no restart of the gateways.
    redis.restart();
    let mut status = 0;
    for _ in 0..100 {
        status = http(&gateways[0].proxy, "/v1/jobs", &[("x-tenant-id", "other")]).0;
        if status == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status, 200, "recovered once Redis answered again");
    assert_eq!(metric(&gateways[0].admin, "tollgate_store_up "), 1.0);
    assert!(metric(&gateways[0].admin, "tollgate_store_errors_total ") >= 1.0);
    assert!(
        metric(
            &gateways[0].admin,
            "tollgate_store_fail_total{mode=\"closed\"} "
        ) >= 1.0
    );
}

/// A hot key leased by three gateways: each takes slices of 20 and decides
/// most requests without Redis, and the fleet's admissions stay within the
/// stated bound, the quota plus the slices outstanding at once (3 x 1.25 x 20); with
/// `lease` off, exactly the quota. The same load both ways: 12 connections
/// on 3 processes, 720 requests, against a bucket of 300 refilled 1 an hour.
#[test]
fn leased_hot_key_on_three_gateways_stays_within_the_stated_bound() {
    let redis = RedisServer::start();
    for lease in ["", "lease = { max = 20, ttl = \"10s\" }\n"] {
        let config = common::config_file(
            if lease.is_empty() { "unleased.toml" } else { "leased.toml" },
            &format!(
                "{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 300\nrefill = \"1/h\"\n{lease}",
                store(&redis.url(), "")
            ),
        );
        let gateways: Vec<common::Serve> = (0..3).map(|_| common::serve(&config)).collect();
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for g in &gateways {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..60 {
                            match http(&g.proxy, "/v1/jobs", &[("x-tenant-id", "hot")]).0 {
                                200 => {
                                    admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                429 => {}
                                other => panic!("unexpected status {other}"),
                            }
                        }
                    });
                }
            }
        });
        let admitted = admitted.into_inner();
        let leased: f64 = gateways
            .iter()
            .map(|g| metric(&g.admin, "tollgate_store_leased_total "))
            .sum();
        eprintln!(
            "lease {:?}: {admitted} admitted of a quota of 300 (over-admission {}), {leased} decided on slices",
            lease.trim(),
            admitted as i64 - 300
        );
        if lease.is_empty() {
            assert_eq!(admitted, 300, "exactly the quota without a lease");
            assert_eq!(leased, 0.0);
        } else {
            assert!(
                admitted <= 300 + 3 * (20 + 20 / 4),
                "{admitted} admitted: beyond the bound"
            );
            assert!(
                admitted >= 300 - 3 * (20 + 20 / 4),
                "{admitted} admitted: slices left unused"
            );
            assert!(
                leased >= 200.0,
                "most admissions decided on slices: {leased}"
            );
        }
    }
}

/// A gateway stopped gracefully (SIGTERM) gives its slices back: a fixed
/// window of 100, a gateway that used 1 of its slice of 50 and stops, and
/// another gateway then admits the other 99.
#[test]
fn a_gateway_that_stops_gives_its_slices_back() {
    let redis = RedisServer::start();
    let config = common::config_file(
        "stopping.toml",
        &format!(
            "{}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 100\nlease = {{ max = 50, ttl = \"1h\" }}\n",
            store(&redis.url(), "")
        ),
    );
    let mut first = common::serve(&config);
    assert_eq!(
        http(&first.proxy, "/v1/jobs", &[("x-tenant-id", "acme")]).0,
        200
    );
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &first.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    let exit = first.child.wait().expect("the gateway exits");
    assert!(exit.success(), "a graceful stop: {exit:?}");

    let second = common::serve(&config);
    let admitted = (0..120)
        .filter(|_| http(&second.proxy, "/v1/jobs", &[("x-tenant-id", "acme")]).0 == 200)
        .count();
    assert_eq!(admitted, 99, "all but the stopped gateway's one request");
}

/// While Redis is down, `fail = "open"` admits (and counts it) and
/// `fail = "local"` enforces this node's share in process; a shadow limit,
/// which never denies, does not deny then either (though it fails closed).
#[test]
fn open_and_local_limits_keep_serving_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let config = common::config_file(
        "modes.toml",
        &format!(
            "{}[[limit]]\nname = \"per-tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 30\nrefill = \"1/h\"\nfail = \"local\"\n\n[[limit]]\nname = \"global\"\nkey = [\"const:all\"]\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/d\"\nfail = \"open\"\n\n[[limit]]\nname = \"observe\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 1\nmode = \"shadow\"\n",
            // The third request below is denied for a day: not remembered,
            // so that once Redis is down it meets the fail modes.
            store(&redis.url(), "local_share = 0.34\nremember_denials = false")
        ),
    );
    let gateway = common::serve(&config);
    let tenant = [("x-tenant-id", "acme")];
    // Redis up: the global limit of 2 binds.
    let up: Vec<u16> = (0..3)
        .map(|_| http(&gateway.proxy, "/v1/jobs", &tenant).0)
        .collect();
    assert_eq!(up, [200, 200, 429]);

    redis.kill();
    // Down: global fails open; per-tenant is enforced here at 0.34 of 30 = 10.
    let down: Vec<u16> = (0..14)
        .map(|_| http(&gateway.proxy, "/v1/jobs", &tenant).0)
        .collect();
    assert_eq!(down.iter().filter(|&&s| s == 200).count(), 10, "{down:?}");
    assert!(down[10..].iter().all(|&s| s == 429), "{down:?}");
    assert_eq!(
        metric(&gateway.admin, "tollgate_store_fail_total{mode=\"open\"} "),
        14.0
    );
    assert_eq!(
        metric(&gateway.admin, "tollgate_store_fail_total{mode=\"local\"} "),
        14.0
    );

    // Back: requests admitted in the meantime are 200s either way, so
    // watch the store come up, then see the shared limit bind again. Each
    // pooled connection (per worker) fails its first call after the
    // restart, and that decision follows `fail`: wait until eight requests
    // in a row were decided in Redis (the fallback counter stands still).
    redis.restart();
    let fallbacks = || metric(&gateway.admin, "tollgate_store_fail_total{mode=\"open\"} ");
    let mut in_redis = 0;
    for _ in 0..200 {
        let before = fallbacks();
        http(&gateway.proxy, "/v1/jobs", &[("x-tenant-id", "new")]);
        let up = metric(&gateway.admin, "tollgate_store_up ") == 1.0;
        in_redis = if up && fallbacks() == before {
            in_redis + 1
        } else {
            0
        };
        if in_redis == 8 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(in_redis, 8, "the gateway decides in Redis again");
    // Redis restarted empty; global (2) binds again in Redis.
    let after: Vec<u16> = (0..3)
        .map(|_| http(&gateway.proxy, "/v1/jobs", &[("x-tenant-id", "later")]).0)
        .collect();
    assert_eq!(
        after[2], 429,
        "the shared global limit binds again: {after:?}"
    );
}

/// Wrong passwords, unreachable servers and malformed URLs stop `serve` at
/// start with a message naming the store, never a panic.
#[test]
fn bad_redis_urls_and_passwords_are_clear_errors() {
    let redis = RedisServer::start_with(Some("right-password"));
    let limit =
        "[[limit]]\nname = \"t\"\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"1/s\"\n";
    let cases = [
        (
            format!("redis://:wrong-password@127.0.0.1:{}", redis.port()),
            "authentication failed",
        ),
        (
            format!("redis://127.0.0.1:{}", tollgate_testkit::free_port()),
            "[store]",
        ),
        ("redis://127.0.0.1:notaport".to_string(), "is not usable"),
        ("http://127.0.0.1:6379".to_string(), "is not a Redis URL"),
    ];
    for (url, expected) in cases {
        let config = common::config_file("bad.toml", &format!("{}{limit}", store(&url, "")));
        let out = common::serve_command(&config).output().expect("run serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: serve must not start");
        assert!(stderr.contains(expected), "{url}: {stderr}");
        assert!(!stderr.contains("panicked"), "{url}: {stderr}");
        assert!(
            !stderr.contains("wrong-password"),
            "the password is never shown: {stderr}"
        );
    }
}

/// Every node's dashboard shows the fleet: two gateways on one Redis, each
/// page draws both nodes' responses.
#[test]
fn every_gateway_dashboard_shows_the_whole_fleet() {
    let redis = RedisServer::start();
    let config = common::config_file(
        "fleet-dashboard.toml",
        &format!(
            "{}[history]\npath = \"off\"\nevery = \"1s\"\n\
             [[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"1/h\"\n",
            store(&redis.url(), "")
        ),
    );
    let (a, b) = (common::serve(&config), common::serve(&config));
    for _ in 0..5 {
        assert_eq!(
            http(&a.proxy, "/v1/jobs", &[("x-tenant-id", "acme")]).0,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            http(&b.proxy, "/v1/jobs", &[("x-tenant-id", "globex")]).0,
            200
        );
    }
    // The page's 2xx total: both nodes' once each has written its buckets
    // (every second).
    let drawn = |admin: &str| -> f64 {
        let (status, page) = http(admin, "/?range=1h", &[]);
        assert_eq!(status, 200);
        assert!(page.contains("· the fleet"), "a fleet page");
        let at = "data-series=\"2xx\" data-total=\"";
        page.find(at)
            .and_then(|i| page[i + at.len()..].split('"').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for admin in [&a.admin, &b.admin] {
        while drawn(admin) < 8.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the fleet's total never reached 8"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            drawn(admin),
            8.0,
            "5 on one node and 3 on the other, counted once each"
        );
    }
}
