//! Fleet pauses on a real redis-server: a process that starts listening
//! during a pause another published pauses too, with the later of two.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tollgate_core::policy::RedisSettings;
use tollgate_core::Nanos;
use tollgate_store::redis::Pauses;

fn pauses(prefix: &str) -> Pauses {
    let settings = RedisSettings {
        prefix: prefix.to_string(),
        ..RedisSettings::new(tollgate_testkit::redis_url())
    };
    Pauses::new(&settings, "upstream:crm").expect("pauses")
}

fn unix_now() -> Nanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as Nanos
}

/// The first pause a new listener hears of.
async fn first_heard(pauses: &Pauses) -> Nanos {
    let (tx, rx) = std::sync::mpsc::channel();
    tokio::time::timeout(
        Duration::from_secs(10),
        pauses.listen(|until| {
            let _ = tx.send(until);
            false
        }),
    )
    .await
    .expect("the listener heard of a pause");
    rx.recv().expect("a pause")
}

#[tokio::test]
async fn a_process_that_starts_during_a_pause_pauses_until_its_end() {
    let prefix = tollgate_testkit::unique_prefix("pauses");
    let now = unix_now();
    let (later, earlier) = (now + 60 * 1_000_000_000, now + 30 * 1_000_000_000);
    let first = pauses(&prefix);
    first.publish(later).await;
    // A shorter pause from another 429 does not cut the longer one short.
    first.publish(earlier).await;

    let late_joiner = pauses(&prefix);
    assert_eq!(first_heard(&late_joiner).await, later);
}

#[tokio::test]
async fn a_pause_that_is_over_is_not_kept() {
    let prefix = tollgate_testkit::unique_prefix("pauses");
    let over = unix_now() - 1_000_000_000;
    pauses(&prefix).publish(over).await;
    let stored: Option<u64> = redis::Client::open(tollgate_testkit::redis_url())
        .and_then(|c| c.get_connection())
        .and_then(|mut c| {
            redis::cmd("GET")
                .arg(format!("{prefix}:pause:upstream:crm:until"))
                .query(&mut c)
        })
        .expect("redis answers");
    assert_eq!(stored, None, "a pause in the past expires at once");
}
