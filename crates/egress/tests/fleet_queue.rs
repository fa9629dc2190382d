//! The fleet's job queue against a real redis-server (the test script's, or
//! one started for this binary): leases, their expiry and takeover, priority
//! order across runners, idempotent import, exactly one final result, a
//! stored job that cannot be read, and commands Redis refuses.
//! Each test works in a key prefix of its own.

use std::collections::HashSet;
use std::time::Duration;
use tollgate_core::policy::RedisSettings;
use tollgate_egress::fleet::{Queue, QueueError, Recorded, Write};
use tollgate_egress::state::DeadLetter;
use tollgate_egress::{read_jobs, Job, Priority, Routed, UpstreamsConfig};
use tollgate_testkit::{redis_url, unique_prefix, RedisServer};

const LONG: Duration = Duration::from_secs(60);

fn settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        prefix: prefix.to_string(),
        pool: 1,
        ..RedisSettings::new(url)
    }
}

fn config() -> UpstreamsConfig {
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

/// Two runners' views of a queue under `prefix`, with the jobs `specs`
/// imported.
async fn queued(prefix: &str, specs: &[(&str, &str, u16)]) -> (Queue, Queue) {
    let (a, b) = (queue(prefix).await, queue(prefix).await);
    a.import(&jobs(specs), &config()).await.expect("import");
    (a, b)
}

/// The name of a key of the default queue under `prefix`.
fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}:queue:default:{name}")
}

fn ids(lease: &tollgate_egress::fleet::Lease) -> Vec<&str> {
    lease.jobs.iter().map(|j| j.id.as_str()).collect()
}

fn job(lease: &tollgate_egress::fleet::Lease, i: usize) -> Job {
    lease.jobs[i].job.clone().expect("a readable job")
}

/// A plain connection to the test Redis, to change keys behind the queue.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

fn letter(id: &str, job: Job) -> DeadLetter {
    DeadLetter {
        id: id.into(),
        upstream: "crm".into(),
        attempts: 5,
        status: Some(503),
        reason: "HTTP 503 after 5 attempts".into(),
        excerpt: Some("busy".into()),
        finished: None,
        job,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
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
    assert_eq!(job(&first, 0).priority, Priority::High);
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

    // Eight runners at once on 100 jobs: each job goes to exactly one.
    let prefix = unique_prefix("concurrent");
    let mut runners = Vec::new();
    for _ in 0..8 {
        runners.push(queue(&prefix).await);
    }
    let names: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    let specs: Vec<(&str, &str, u16)> = names.iter().map(|n| (n.as_str(), "normal", 9)).collect();
    runners[0].import(&jobs(&specs), &config()).await.unwrap();
    let tasks: Vec<_> = runners
        .into_iter()
        .map(|q| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let lease = q.lease("crm", 3, LONG).await.expect("lease");
                    if lease.jobs.is_empty() {
                        return got;
                    }
                    got.extend(lease.jobs.into_iter().map(|j| j.id));
                }
            })
        })
        .collect();
    let mut leased = Vec::new();
    for task in tasks {
        leased.push(task.await.unwrap());
    }
    let all: Vec<&String> = leased.iter().flatten().collect();
    let distinct: HashSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), 100, "no job leased twice");
    assert_eq!(distinct, names.iter().collect(), "every job leased");
    assert!(
        leased.iter().filter(|l| !l.is_empty()).count() > 1,
        "the runners really competed"
    );
}

#[tokio::test]
async fn an_expired_lease_goes_to_another_runner_and_the_first_learns_it_lost_it() {
    let (a, b) = queued(
        &unique_prefix("expiry"),
        &[("j1", "normal", 9), ("j2", "normal", 9)],
    )
    .await;
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
    let (a, b) = queued(
        &unique_prefix("reclaim"),
        &[("j1", "normal", 9), ("j2", "normal", 9)],
    )
    .await;
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
    a.finish("crm", "j1", "{\"id\":\"j1\"}", 1, None, None)
        .await
        .unwrap();
    assert_eq!(a.import(&set, &config()).await.unwrap(), (0, 3));
    assert_eq!(a.job_state("j1").await.unwrap().as_deref(), Some("done"));
    assert_eq!(a.counts().await.unwrap().done, 1);
}

#[tokio::test]
async fn every_job_gets_exactly_one_final_result_whoever_sends_it() {
    let (a, b) = queued(
        &unique_prefix("results"),
        &[("j1", "normal", 9), ("j2", "normal", 9)],
    )
    .await;
    let leased = a.lease("crm", 2, LONG).await.unwrap();
    let line = "{\"id\":\"j1\",\"outcome\":\"done\"}";
    assert_eq!(
        a.finish("crm", "j1", line, 1, None, None).await.unwrap(),
        Recorded::New
    );
    // The same write again (its reply was lost): still one result.
    assert_eq!(
        a.finish("crm", "j1", line, 1, None, None).await.unwrap(),
        Recorded::Again
    );
    // Another runner that also sent it (after a takeover) and made it a
    // dead letter: dropped, dead letter and all.
    let other = "{\"id\":\"j1\",\"outcome\":\"dead\",\"attempts\":2}";
    let dead = letter("j1", job(&leased, 0));
    assert_eq!(
        b.finish("crm", "j1", other, 2, Some(&dead), None)
            .await
            .unwrap(),
        Recorded::Other
    );
    assert_eq!(a.results().await.unwrap(), [line]);
    assert!(a.dead_letters().await.unwrap().is_empty());
    assert_eq!(a.dead_letter("j1").await.unwrap().map(|d| d.id), None);
    assert_eq!(a.job_state("j1").await.unwrap().as_deref(), Some("done"));
    assert_eq!(a.counts().await.unwrap().dead, 0);
    // Finished: no longer leased or pending; a's renewal says it is gone.
    assert_eq!(a.unfinished("crm").await.unwrap(), (0, 1));
    assert_eq!(a.renew("crm", &["j1".into()], LONG).await.unwrap(), ["j1"]);
}

#[tokio::test]
async fn dead_letters_are_listed_and_requeued_with_a_fresh_count() {
    let (a, _) = queued(
        &unique_prefix("dead"),
        &[("j1", "normal", 9), ("j2", "normal", 9)],
    )
    .await;
    let leased = a.lease("crm", 2, LONG).await.unwrap();
    let letter = letter("j2", job(&leased, 1));
    a.finish(
        "crm",
        "j2",
        "{\"id\":\"j2\",\"outcome\":\"dead\"}",
        5,
        Some(&letter),
        None,
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

#[tokio::test]
async fn a_stored_job_that_cannot_be_read_is_leased_with_the_reason_and_holds_up_no_other() {
    let prefix = unique_prefix("unreadable");
    let (a, _) = queued(
        &prefix,
        &[
            ("j1", "normal", 9),
            ("j2", "normal", 9),
            ("j3", "normal", 9),
        ],
    )
    .await;
    // Someone edited the queue by hand: j2's JSON, j3's place.
    let mut conn = raw().await;
    let _: () = redis::cmd("HSET")
        .arg(key(&prefix, "jobs"))
        .arg("j2")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(key(&prefix, "pending:crm"))
        .arg("XX")
        .arg("1000000000003.5")
        .arg("j3")
        .query_async(&mut conn)
        .await
        .unwrap();
    let leased = a.lease("crm", 5, LONG).await.unwrap();
    assert_eq!(ids(&leased), ["j1", "j2", "j3"]);
    assert_eq!(job(&leased, 0).id, "j1");
    let reason = leased.jobs[1].job.as_ref().unwrap_err();
    assert!(
        reason.contains("the job as stored in queue 'default' cannot be read")
            && reason.contains("{not json"),
        "{reason}"
    );
    let reason = leased.jobs[2].job.as_ref().unwrap_err();
    assert!(
        reason.contains("\"1000000000003.5\", not a whole number"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_command_redis_refuses_is_refused_with_its_message_and_the_writes_after_it_are_made() {
    let prefix = unique_prefix("refused");
    let (a, b) = queued(&prefix, &[("j1", "normal", 9), ("j2", "normal", 9)]).await;
    a.lease("crm", 2, LONG).await.unwrap();
    // The results hash is not a hash: every final result is refused.
    let _: () = redis::cmd("SET")
        .arg(key(&prefix, "results"))
        .arg("x")
        .query_async(&mut raw().await)
        .await
        .unwrap();
    let err = a
        .finish("crm", "j1", "{}", 1, None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Refused { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("queue 'default' at redis://") && text.contains("WRONGTYPE"),
        "{text}"
    );
    // In a batch, only that write is refused.
    let writes = [
        Write::Attempts {
            id: "j1".into(),
            attempts: 3,
        },
        Write::Finish {
            upstream: "crm".into(),
            id: "j2".into(),
            line: "{}".into(),
            attempts: 1,
            dead: None,
        },
        Write::Release {
            upstream: "crm".into(),
            ids: vec!["j1".into()],
        },
    ];
    let replies = a.write(&writes).await.unwrap();
    assert!(matches!(replies[0], Ok(None)), "{:?}", replies[0]);
    assert!(
        matches!(&replies[1], Err(QueueError::Refused { reason, .. }) if reason.contains("WRONGTYPE")),
        "{:?}",
        replies[1]
    );
    assert!(matches!(replies[2], Ok(None)), "{:?}", replies[2]);
    let again = b.lease("crm", 5, LONG).await.unwrap();
    assert_eq!(ids(&again), ["j1"], "given back");
    assert_eq!(again.jobs[0].attempts, 3, "with its attempts");
}

#[tokio::test]
async fn writes_go_several_per_call_in_order_even_to_a_redis_without_the_scripts() {
    let server = RedisServer::start();
    let a = Queue::connect(&settings(&server.url(), "w"), "default")
        .await
        .unwrap();
    a.import(
        &jobs(&[
            ("j1", "normal", 9),
            ("j2", "normal", 9),
            ("j3", "normal", 9),
        ]),
        &config(),
    )
    .await
    .unwrap();
    a.lease("crm", 3, LONG).await.unwrap();
    // As after a restart: pipelined EVALSHAs do not load their scripts.
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let line = "{\"id\":\"j2\",\"outcome\":\"done\"}";
    let finish = Write::Finish {
        upstream: "crm".into(),
        id: "j2".into(),
        line: line.into(),
        attempts: 1,
        dead: None,
    };
    let writes = [
        Write::Attempts {
            id: "j1".into(),
            attempts: 2,
        },
        finish.clone(),
        finish,
        Write::Release {
            upstream: "crm".into(),
            ids: vec!["j1".into(), "j3".into()],
        },
    ];
    let replies: Vec<Option<Recorded>> = a
        .write(&writes)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        replies,
        [None, Some(Recorded::New), Some(Recorded::Again), None]
    );
    assert_eq!(a.results().await.unwrap(), [line]);
    let again = a.lease("crm", 5, LONG).await.unwrap();
    assert_eq!(ids(&again), ["j1", "j3"]);
    assert_eq!(again.jobs[0].attempts, 2);
}
