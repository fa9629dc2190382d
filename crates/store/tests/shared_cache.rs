//! The fleet's shared cache on a real redis-server: what one process keeps
//! another finds, a write evicts its path, the paths under it and above it
//! and no other, an answer whose read started before a write is not kept,
//! and a dead Redis is an error, not a hang.

use std::time::Duration;
use tollgate_core::policy::RedisSettings;
use tollgate_store::redis::{SharedCache, MAX_DEPTH};

fn settings(prefix: &str) -> RedisSettings {
    RedisSettings {
        prefix: prefix.to_string(),
        ..RedisSettings::new(tollgate_testkit::redis_url())
    }
}

/// Two processes' views of one upstream's shared cache.
fn two(test: &str) -> (SharedCache, SharedCache) {
    let settings = settings(&tollgate_testkit::unique_prefix(test));
    let open =
        || SharedCache::new(&settings, "upstream:crm", Duration::from_secs(60)).expect("open");
    (open(), open())
}

fn id(n: u8) -> [u8; 32] {
    [n; 32]
}

const LIFE: Duration = Duration::from_secs(60);

/// Keep `body` as entry `n` at `path` (looked at just before).
async fn keep(cache: &SharedCache, n: u8, path: &str, body: &str) -> bool {
    let (_, stamp) = cache.look(&id(n), path).await.expect("look").expect("kept");
    cache
        .keep(&id(n), path, stamp, body.as_bytes().to_vec(), LIFE)
        .await
        .expect("keep")
}

async fn found(cache: &SharedCache, n: u8, path: &str) -> Option<String> {
    let (value, _) = cache.look(&id(n), path).await.expect("look")?;
    value.map(|v| String::from_utf8(v).expect("utf-8"))
}

#[tokio::test]
async fn what_one_process_keeps_another_finds() {
    let (one, two) = two("shared-find");
    assert_eq!(found(&two, 1, "/v1/sites").await, None);
    assert!(keep(&one, 1, "/v1/sites", "sites").await);
    assert_eq!(found(&two, 1, "/v1/sites").await.as_deref(), Some("sites"));
    assert_eq!(found(&two, 2, "/v1/sites").await, None, "another id");
}

#[tokio::test]
async fn a_write_evicts_its_path_the_paths_under_and_above_it_only() {
    let (one, two) = two("shared-write");
    let paths = [
        (1, "/v1/sites"),
        (2, "/v1/sites/7"),
        (3, "/v1/sites/7/rooms"),
        (4, "/v1/sites/8"),
        (5, "/v1/job-types"),
        (6, "/"),
    ];
    for (n, path) in paths {
        assert!(keep(&one, n, path, path).await, "{path}");
    }
    two.written("/v1/sites/7").await.expect("written");
    let left: Vec<&str> = {
        let mut left = Vec::new();
        for (n, path) in paths {
            if found(&one, n, path).await.is_some() {
                left.push(path);
            }
        }
        left
    };
    // "/" is above every path: a write anywhere evicts it.
    assert_eq!(left, ["/v1/sites/8", "/v1/job-types"]);
    // Kept again after the write, it is valid again.
    assert!(keep(&one, 2, "/v1/sites/7", "again").await);
    assert_eq!(
        found(&two, 2, "/v1/sites/7").await.as_deref(),
        Some("again")
    );
}

#[tokio::test]
async fn a_purge_evicts_its_prefix_and_under_it_not_above() {
    let (one, two) = two("shared-purge");
    for (n, path) in [
        (1, "/v1"),
        (2, "/v1/sites"),
        (3, "/v1/sites/7"),
        (4, "/v2/x"),
    ] {
        assert!(keep(&one, n, path, path).await);
    }
    two.purged("/v1/sites/").await.expect("purge");
    assert!(
        found(&one, 1, "/v1").await.is_some(),
        "above the prefix stays"
    );
    assert_eq!(found(&one, 2, "/v1/sites").await, None);
    assert_eq!(found(&one, 3, "/v1/sites/7").await, None);
    assert!(found(&one, 4, "/v2/x").await.is_some());
    two.purged("/").await.expect("purge all");
    assert_eq!(found(&one, 1, "/v1").await, None);
    assert_eq!(found(&one, 4, "/v2/x").await, None);
}

#[tokio::test]
async fn an_answer_fetched_across_a_write_is_not_kept() {
    let (one, two) = two("shared-race");
    let (_, looked) = one
        .look(&id(1), "/v1/sites/7")
        .await
        .expect("look")
        .expect("kept");
    // Another process writes while this one's call is out.
    two.written("/v1/sites").await.expect("written");
    let kept = one
        .keep(&id(1), "/v1/sites/7", looked, b"old".to_vec(), LIFE)
        .await
        .expect("keep");
    assert!(!kept, "fetched before the write: may predate it");
    assert_eq!(found(&two, 1, "/v1/sites/7").await, None);
    // A write elsewhere does not stop it.
    let (_, looked) = one
        .look(&id(1), "/v1/sites/7")
        .await
        .expect("look")
        .expect("kept");
    two.written("/v1/job-types").await.expect("written");
    assert!(one
        .keep(&id(1), "/v1/sites/7", looked, b"new".to_vec(), LIFE)
        .await
        .expect("keep"));
}

#[tokio::test]
async fn entries_expire_after_their_life() {
    let (one, _) = two("shared-life");
    let (_, stamp) = one.look(&id(1), "/a").await.expect("look").expect("kept");
    one.keep(
        &id(1),
        "/a",
        stamp,
        b"x".to_vec(),
        Duration::from_millis(50),
    )
    .await
    .expect("keep");
    assert!(found(&one, 1, "/a").await.is_some());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(found(&one, 1, "/a").await, None);
}

#[tokio::test]
async fn paths_deeper_than_the_cap_are_not_kept() {
    let (one, _) = two("shared-deep");
    let deep = "/x".repeat(MAX_DEPTH + 1);
    assert!(one.look(&id(1), &deep).await.expect("look").is_none());
    let shallow = "/x".repeat(MAX_DEPTH);
    assert!(keep(&one, 1, &shallow, "ok").await);
    // A write far below the cap still evicts the paths above it.
    one.written(&"/x".repeat(500)).await.expect("written");
    assert_eq!(found(&one, 1, &shallow).await, None);
}

#[tokio::test]
async fn a_redis_that_is_not_there_is_an_error_within_the_timeout() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let settings = RedisSettings {
        url: format!("redis://:secret-pass@127.0.0.1:{port}"),
        timeout: 2_000_000_000,
        ..settings("gone")
    };
    let cache = SharedCache::new(&settings, "upstream:crm", LIFE).expect("open");
    let started = std::time::Instant::now();
    let e = cache.look(&id(1), "/a").await.expect_err("no redis");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let message = e.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("secret-pass"), "{message}");
    // Right after a failed connection, calls fail at once (well within
    // the 2 s they would each wait for a connection).
    let again = std::time::Instant::now();
    cache.written("/a").await.expect_err("no redis");
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "{:?}",
        again.elapsed()
    );
}
