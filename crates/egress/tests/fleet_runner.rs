//! A fleet runner (`fleet::run`) against a real redis-server and an HTTP
//! upstream on 127.0.0.1: what it does with a job it cannot read, with a
//! write Redis refuses, and with outcomes that wait in its writer while
//! Redis turns writes down (a server over its `maxmemory` answers every
//! write with OOM until it is raised: an outage the test controls to the
//! millisecond, without restarting anything).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tollgate_core::policy::RedisSettings;
use tollgate_egress::fleet::{FleetOptions, Queue};
use tollgate_egress::{Options, ProgressMode, RunError, Summary, UpstreamsConfig};
use tollgate_store::TokioClock;
use tollgate_testkit::{redis_url, unique_prefix, RedisServer};

/// Longer than any of these runs takes when it works.
const PATIENCE: Duration = Duration::from_secs(30);

/// An upstream that answers `answer(path)` once its gate is open, and
/// counts the requests to each path.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    gate: watch::Sender<bool>,
}

impl Upstream {
    async fn start(open: bool, answer: fn(&str) -> (u16, &'static str)) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (gate, _) = watch::channel(open);
        let (log, gates) = (hits.clone(), gate.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, gates) = (log.clone(), gates.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (log, mut gate) = (log.clone(), gates.subscribe());
                        async move {
                            let path = req.uri().path().to_string();
                            *log.lock().expect("lock").entry(path.clone()).or_default() += 1;
                            let _ = req.into_body().collect().await;
                            let _ = gate.wait_for(|open| *open).await;
                            let (status, retry_after) = answer(&path);
                            let mut response = Response::builder().status(status);
                            if !retry_after.is_empty() {
                                response = response.header("retry-after", retry_after);
                            }
                            response.body(Full::new(Bytes::from_static(b"{}")))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, hits, gate }
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn hits(&self) -> HashMap<String, usize> {
        self.hits.lock().expect("lock").clone()
    }

    fn requests(&self) -> usize {
        self.hits().values().sum()
    }

    /// Until `n` requests have arrived (polled: they come from the runner).
    async fn wait_for(&self, n: usize) {
        tokio::time::timeout(PATIENCE, async {
            while self.requests() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the requests arrive");
    }
}

fn ok(_: &str) -> (u16, &'static str) {
    (200, "")
}

fn config(up: &Upstream, concurrency: usize) -> UpstreamsConfig {
    tollgate_egress::parse_config(
        &format!(
            "[[upstream]]\nname = \"vendor\"\nbase_url = \"http://{}/\"\nconcurrency = {concurrency}\n[[upstream.limit]]\nname = \"rate\"\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"1000/s\"\n",
            up.addr
        ),
        &tollgate_core::NoProfiles,
        &|_| None,
    )
    .expect("config")
}

fn settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        prefix: prefix.to_string(),
        pool: 1,
        ..RedisSettings::new(url)
    }
}

/// A queue under a fresh prefix of the Redis at `url`, holding `n` jobs
/// `j0..` for `up`; and that prefix.
async fn queued(url: &str, up: &Upstream, n: usize, concurrency: usize) -> (Queue, String) {
    let prefix = unique_prefix("runner");
    let queue = Queue::connect(&settings(url, &prefix), "default")
        .await
        .expect("connect");
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{{\"id\":\"j{i}\",\"method\":\"POST\",\"url\":\"http://{}/j{i}\"}}\n",
                up.addr
            )
        })
        .collect();
    let config = config(up, concurrency);
    let jobs = tollgate_egress::read_jobs(text.as_bytes(), &config).expect("jobs");
    queue.import(&jobs, &config).await.expect("import");
    (queue, prefix)
}

/// Run one runner on `queue` until it ends (or `stop` fires).
async fn run(
    queue: &Queue,
    config: &UpstreamsConfig,
    lease: Duration,
    stop: oneshot::Receiver<()>,
) -> Result<Summary, RunError> {
    let options = Options {
        progress: ProgressMode::Quiet,
        grace: Duration::from_secs(5),
        seed: 7,
        ..Options::default()
    };
    let run = tollgate_egress::fleet::run(
        config,
        queue,
        TokioClock::system(),
        options,
        FleetOptions { lease },
        async {
            let _ = stop.await;
        },
    );
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the run ends")
}

async fn redis(url: &str, args: &[&str]) {
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: redis::Value = redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(&mut conn)
        .await
        .expect("command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stored_unreadable_is_dead_lettered_with_its_reason_and_the_others_run() {
    let up = Upstream::start(true, ok).await;
    let (queue, prefix) = queued(&redis_url(), &up, 3, 4).await;
    redis(
        &redis_url(),
        &[
            "HSET",
            &format!("{prefix}:queue:default:jobs"),
            "j1",
            "{oops",
        ],
    )
    .await;
    let (_stop, stop) = oneshot::channel();
    let summary = run(&queue, &config(&up, 4), Duration::from_secs(30), stop)
        .await
        .expect("the run goes on");
    let fleet = summary.fleet.expect("fleet totals");
    assert_eq!((fleet.done, fleet.dead, fleet.pending), (2, 1, 0));
    let letters = queue.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, "j1");
    assert!(
        letters[0].reason.contains("cannot be read") && letters[0].reason.contains("{oops"),
        "{}",
        letters[0].reason
    );
    assert_eq!(queue.results().await.unwrap().len(), 3);
    let hits = up.hits();
    assert_eq!(
        (hits.get("/j0"), hits.get("/j1"), hits.get("/j2")),
        (Some(&1), None, Some(&1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_redis_refuses_stops_the_run_with_redis_s_message() {
    let up = Upstream::start(true, ok).await;
    let (queue, prefix) = queued(&redis_url(), &up, 3, 4).await;
    redis(
        &redis_url(),
        &[
            "SET",
            &format!("{prefix}:queue:default:results"),
            "not a hash",
        ],
    )
    .await;
    let (_stop, stop) = oneshot::channel();
    let err = run(&queue, &config(&up, 4), Duration::from_secs(30), stop)
        .await
        .expect_err("the run fails");
    assert!(matches!(err, RunError::QueueRefused { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("the job queue refused the final result of job 'j")
            && text.contains("WRONGTYPE")
            && text.contains("3 write(s) were refused"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_whose_result_waits_keeps_its_lease_and_is_not_sent_again() {
    let server = RedisServer::start();
    let up = Upstream::start(false, ok).await;
    let (queue, _) = queued(&server.url(), &up, 8, 4).await;
    let config = config(&up, 4);
    let lease = Duration::from_millis(300);
    let (_stop, stop) = oneshot::channel();
    let runner = tokio::spawn({
        let queue = queue.clone();
        async move { run(&queue, &config, lease, stop).await }
    });
    // Four in flight, four more held; then Redis turns every write down
    // while all eight finish, for longer than a lease.
    up.wait_for(4).await;
    redis(&server.url(), &["CONFIG", "SET", "maxmemory", "1"]).await;
    up.open();
    up.wait_for(8).await;
    tokio::time::sleep(lease * 3).await;
    redis(&server.url(), &["CONFIG", "SET", "maxmemory", "0"]).await;
    let summary = runner.await.unwrap().expect("the run ends well");
    let fleet = summary.fleet.expect("fleet totals");
    assert_eq!((fleet.done, fleet.pending, fleet.duplicates), (8, 0, 0));
    let hits = up.hits();
    assert_eq!(hits.len(), 8);
    assert!(
        hits.values().all(|n| *n == 1),
        "each job sent once: {hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_runner_gives_its_leases_back_after_the_attempt_counts_before_them() {
    let server = RedisServer::start();
    // A 429 with a minute to wait: one attempt made, then the job waits.
    let up = Upstream::start(false, |_| (429, "60")).await;
    let (queue, prefix) = queued(&server.url(), &up, 1, 1).await;
    let config = config(&up, 1);
    let (stop_now, stop) = oneshot::channel();
    let runner = tokio::spawn({
        let queue = queue.clone();
        async move { run(&queue, &config, Duration::from_secs(30), stop).await }
    });
    up.wait_for(1).await;
    // The attempt's count cannot be written for now, and the runner is
    // stopped meanwhile. Redis would take a lease given back even now (the
    // release script deletes before it adds), so only the order of the
    // writes keeps the count.
    redis(&server.url(), &["CONFIG", "SET", "maxmemory", "1"]).await;
    up.open();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_now.send(());
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis(&server.url(), &["CONFIG", "SET", "maxmemory", "0"]).await;
    let summary = runner.await.unwrap().expect("the run stops well");
    assert!(summary.interrupted);
    assert_eq!(summary.fleet.expect("fleet totals").unwritten, 0);
    // The next runner takes the job up where this one left it.
    let next = Queue::connect(&settings(&server.url(), &prefix), "default")
        .await
        .unwrap();
    let again = next
        .lease("vendor", 5, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(again.jobs.len(), 1, "given back");
    assert_eq!(again.jobs[0].attempts, 1, "with the attempt made");
}
