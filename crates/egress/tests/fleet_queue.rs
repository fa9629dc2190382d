//! The fleet's job queue against a real redis-server (the test script's, or
//! one started for this binary): leases, their expiry and takeover, priority
//! order across runners, idempotent import, and exactly one final result.
//! Each test works in a key prefix of its own.

use std::time::Duration;
use tollgate_core::policy::RedisSettings;
use tollgate_egress::fleet::{Queue, QueueError, Recorded};
use tollgate_egress::{read_jobs, Priority, Routed, RunnerConfig};
use tollgate_testkit::{redis_url, unique_prefix, RedisServer};

const LONG: Duration = Duration::from_secs(60);

fn settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_string(),
        prefix: prefix.to_string(),
        timeout: 100_000_000,
        pool: 1,
        local_share: 1.0,
    }
}

fn config() -> RunnerConfig {
    tollgate_egress::parse_config(
        "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9/\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n[[upstream]]\nname = \"mail\"\nbase_url = \"http://127.0.0.1:10/\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n",
        &tollgate_core::NoProfiles,
        &|_| None,
    )
    .expect("config")
}

/// Jobs `(id, priority, port)`: port 9 is upstream crm, 10 is mail.
fn jobs(specs: &[(&str, &str, u16)]) -> Vec<Routed> {
    let text: String = specs
        .iter()
        .map(|(id, priority, port)| {
            format!("{{\"id\":\"{id}\",\"method\":\"POST\",\"url\":\"http://127.0.0.1:{port}/x/{id}\",\"priority\":\"{priority}\"}}\n")
        })
        .collect();
    read_jobs(text.as_bytes(), &config()).expect("jobs")
}

async fn queue(prefix: &str) -> Queue {
    Queue::connect(&settings(&redis_url(), prefix), "default")
        .await
        .expect("connect")
}

fn ids(lease: &tollgate_egress::fleet::Lease) -> Vec<&str> {
    lease.jobs.iter().map(|j| j.job.id.as_str()).collect()
}

#[tokio::test]
async fn two_runners_lease_the_best_priority_first_and_never_the_same_job() {
    let prefix = unique_prefix("priority");
    let (a, b) = (queue(&prefix).await, queue(&prefix).await);
    let set = jobs(&[
        ("n1", "normal", 9),
        ("l1", "low", 9),
        ("h1", "high", 9),
        ("n2", "normal", 9),
        ("h2", "high", 9),
        ("m1", "high", 10),
    ]);
    assert_eq!(a.import(&set, &config()).await.unwrap(), (6, 0));
    let first = a.lease("crm", 2, LONG).await.unwrap();
    assert_eq!(ids(&first), ["h1", "h2"], "high first, then oldest");
    assert_eq!(first.jobs[0].job.priority, Priority::High);
    let second = b.lease("crm", 2, LONG).await.unwrap();
    assert_eq!(ids(&second), ["n1", "n2"]);
    assert_eq!((second.pending, second.leased), (1, 4));
    let third = b.lease("crm", 5, LONG).await.unwrap();
    assert_eq!(ids(&third), ["l1"]);
    assert!(a.lease("crm", 5, LONG).await.unwrap().jobs.is_empty());
    // Another upstream's jobs are its own set.
    assert_eq!(ids(&a.lease("mail", 5, LONG).await.unwrap()), ["m1"]);
    // The scheduler orders by seq within a priority: queue order.
    assert!(first.jobs[0].seq < first.jobs[1].seq);
    assert!(first.jobs[1].seq < second.jobs[0].seq);
}

#[tokio::test]
async fn an_expired_lease_goes_to_another_runner_and_the_first_learns_it_lost_it() {
    let prefix = unique_prefix("expiry");
    let (a, b) = (queue(&prefix).await, queue(&prefix).await);
    a.import(
        &jobs(&[("j1", "normal", 9), ("j2", "normal", 9)]),
        &config(),
    )
    .await
    .unwrap();
    let short = Duration::from_millis(50);
    let held = a.lease("crm", 2, short).await.unwrap();
    assert_eq!(ids(&held), ["j1", "j2"]);
    // j1 is renewed for long; j2's lease runs out (the runner "died").
    assert!(a
        .renew("crm", &["j1".into()], LONG)
        .await
        .unwrap()
        .is_empty());
    a.record_attempts("j2", 3).await.unwrap();
    // Waiting out a lease in Redis's clock: the only way to see one expire.
    tokio::time::sleep(short * 3).await;
    let taken = b.lease("crm", 5, LONG).await.unwrap();
    assert_eq!(ids(&taken), ["j2"]);
    assert_eq!(taken.reaped, 1);
    assert_eq!(
        taken.jobs[0].attempts, 3,
        "the attempts made go with the job"
    );
    // a's renewal now says j2 is lost; j1 is still a's.
    assert_eq!(
        a.renew("crm", &["j1".into(), "j2".into()], LONG)
            .await
            .unwrap(),
        ["j2"]
    );
    assert!(b.lease("crm", 5, LONG).await.unwrap().jobs.is_empty());
}

#[tokio::test]
async fn a_lease_expired_but_not_taken_is_renewed_and_a_released_job_is_pending_at_once() {
    let prefix = unique_prefix("reclaim");
    let (a, b) = (queue(&prefix).await, queue(&prefix).await);
    a.import(
        &jobs(&[("j1", "normal", 9), ("j2", "normal", 9)]),
        &config(),
    )
    .await
    .unwrap();
    a.lease("crm", 2, Duration::from_millis(20)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    // Reaped by a count-only call, not yet taken: a's renewal takes it back.
    let counted = b.lease("crm", 0, LONG).await.unwrap();
    assert_eq!((counted.reaped, counted.pending), (2, 2));
    assert!(a
        .renew("crm", &["j1".into(), "j2".into()], LONG)
        .await
        .unwrap()
        .is_empty());
    assert!(b.lease("crm", 5, LONG).await.unwrap().jobs.is_empty());
    // Given back (a runner that stops): pending again, in queue order.
    assert_eq!(a.release("crm", &["j2".into()]).await.unwrap(), 1);
    assert_eq!(ids(&b.lease("crm", 5, LONG).await.unwrap()), ["j2"]);
}

#[tokio::test]
async fn import_is_idempotent_and_a_reused_id_for_another_request_queues_nothing() {
    let prefix = unique_prefix("import");
    let (a, b) = (queue(&prefix).await, queue(&prefix).await);
    let set = jobs(&[("j1", "normal", 9), ("j2", "low", 9), ("j3", "high", 10)]);
    // Every runner of a fleet imports the same file.
    assert_eq!(a.import(&set, &config()).await.unwrap(), (3, 0));
    assert_eq!(b.import(&set, &config()).await.unwrap(), (0, 3));
    let changed = jobs(&[("j4", "normal", 9), ("j1", "high", 9)]);
    let err = b.import(&changed, &config()).await.unwrap_err();
    assert!(matches!(err, QueueError::Conflict { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("job id 'j1' is already queued for a different request; nothing was queued"),
        "{text}"
    );
    let counts = a.counts().await.unwrap();
    assert_eq!(counts.pending, 3, "j4 was not queued");
    // A finished job imported again stays finished.
    let leased = a.lease("crm", 5, LONG).await.unwrap();
    assert_eq!(ids(&leased), ["j1", "j2"]);
    a.finish("crm", "j1", "{\"id\":\"j1\"}", 1, None)
        .await
        .unwrap();
    assert_eq!(a.import(&set, &config()).await.unwrap(), (0, 3));
    assert_eq!(a.job_state("j1").await.unwrap().as_deref(), Some("done"));
    assert_eq!(a.counts().await.unwrap().done, 1);
}

#[tokio::test]
async fn every_job_gets_exactly_one_final_result_whoever_sends_it() {
    let prefix = unique_prefix("results");
    let (a, b) = (queue(&prefix).await, queue(&prefix).await);
    a.import(
        &jobs(&[("j1", "normal", 9), ("j2", "normal", 9)]),
        &config(),
    )
    .await
    .unwrap();
    a.lease("crm", 2, LONG).await.unwrap();
    let line = "{\"id\":\"j1\",\"outcome\":\"done\"}";
    assert_eq!(
        a.finish("crm", "j1", line, 1, None).await.unwrap(),
        Recorded::New
    );
    // The same write again (its reply was lost): still one result.
    assert_eq!(
        a.finish("crm", "j1", line, 1, None).await.unwrap(),
        Recorded::Again
    );
    // Another runner that also sent it (after a takeover): dropped.
    let other = "{\"id\":\"j1\",\"outcome\":\"done\",\"attempts\":2}";
    assert_eq!(
        b.finish("crm", "j1", other, 2, None).await.unwrap(),
        Recorded::Other
    );
    assert_eq!(a.results().await.unwrap(), [line]);
    // Finished: no longer leased or pending; a's renewal says it is gone.
    assert_eq!(a.unfinished("crm").await.unwrap(), (0, 1));
    assert_eq!(a.renew("crm", &["j1".into()], LONG).await.unwrap(), ["j1"]);
}

#[tokio::test]
async fn dead_letters_are_listed_and_requeued_with_a_fresh_count() {
    let prefix = unique_prefix("dead");
    let a = queue(&prefix).await;
    let set = jobs(&[("j1", "normal", 9), ("j2", "normal", 9)]);
    a.import(&set, &config()).await.unwrap();
    let leased = a.lease("crm", 2, LONG).await.unwrap();
    let letter = tollgate_egress::state::DeadLetter {
        id: "j2".into(),
        upstream: "crm".into(),
        attempts: 5,
        status: Some(503),
        reason: "HTTP 503 after 5 attempts".into(),
        excerpt: Some("busy".into()),
        finished: None,
        job: leased.jobs[1].job.clone(),
    };
    a.finish(
        "crm",
        "j2",
        "{\"id\":\"j2\",\"outcome\":\"dead\"}",
        5,
        Some(&letter),
    )
    .await
    .unwrap();
    let letters = a.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "HTTP 503 after 5 attempts");
    assert_eq!(a.job_state("j2").await.unwrap().as_deref(), Some("dead"));
    assert_eq!(
        a.job_state("j1").await.unwrap().as_deref(),
        Some("leased by a runner")
    );
    assert_eq!(a.job_state("nope").await.unwrap(), None);
    let (requeued, unknown) = a
        .requeue_dead(&["j2".into(), "j1".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(requeued, ["j2"]);
    assert_eq!(unknown, ["j1", "nope"]);
    let again = a.lease("crm", 5, LONG).await.unwrap();
    assert_eq!(ids(&again), ["j2"]);
    assert_eq!(again.jobs[0].attempts, 0, "fresh attempts");
    assert!(a.dead_letters().await.unwrap().is_empty());
    assert!(
        a.results().await.unwrap().is_empty(),
        "its old result is gone"
    );
}

#[tokio::test]
async fn a_wrong_address_or_password_is_a_clear_error_naming_the_store() {
    let server = RedisServer::start_with(Some("s3cret"));
    let port = server.port();
    let wrong = settings(&format!("redis://:nope@127.0.0.1:{port}"), "t");
    let err = Queue::connect(&wrong, "default")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("store redis://:***@127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("nope"), "the password is not shown: {err}");
    let none = settings(&server.url(), "t");
    let err = Queue::connect(&none, "default")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("authentication failed"), "{err}");
    let right = settings(&format!("redis://:s3cret@127.0.0.1:{port}"), "t");
    assert!(Queue::connect(&right, "default").await.is_ok());
    drop(server);
    let free = tollgate_testkit::free_port();
    let closed = settings(&format!("redis://127.0.0.1:{free}"), "t");
    let err = Queue::connect(&closed, "default")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("store redis://127.0.0.1:{free}: cannot connect")),
        "{err}"
    );
}
