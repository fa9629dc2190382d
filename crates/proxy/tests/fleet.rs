//! Fleet mode: proxies on one redis-server share each upstream's quota and
//! each 429 pause. Real time (the pause travels through Redis), real sockets.

mod common;

use common::{client, start_at, upstream};
use std::time::{Duration, Instant};
use tollgate_store::TokioClock;
use tollgate_testkit::upstream::{ok, scripted, Answer};
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
