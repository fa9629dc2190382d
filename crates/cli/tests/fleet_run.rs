//! Fleet mode as users run it: several `tollgate run` processes (the built
//! binary) against one redis-server and one HTTP upstream on 127.0.0.1.
//! The upstream records when each request arrived; the queue's result log
//! (one entry per final result recorded) is read from Redis.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
mod common;
use common::{text, write, Upstream};
use tollgate_testkit::{redis_url, unique_prefix, RedisServer};

/// The fleet's shared limit: a burst of 10, then 40 a second.
const CAPACITY: f64 = 10.0;
const RATE: f64 = 40.0;
/// How much later than its decision a request may reach the upstream
/// (send latency and scheduling on a busy two-core machine). Arrivals are
/// checked against the limit widened by this much.
const ARRIVAL_SLACK: f64 = 0.1;

/// A fleet's files: the config (Redis at `url`, keys under a fresh prefix)
/// and `n` jobs, `bad` of them to paths the upstream refuses.
struct Fleet {
    dir: PathBuf,
    config: String,
    jobs: String,
    prefix: String,
    url: String,
    n: usize,
}

impl Fleet {
    fn new(name: &str, url: &str, up: &Upstream, n: usize, bad: impl Fn(usize) -> bool) -> Fleet {
        let dir =
            std::env::temp_dir().join(format!("tollgate-fleet-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let prefix = unique_prefix(name);
        let config = format!(
            "[store]\nkind = \"redis\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\n\n[[upstream]]\nname = \"vendor\"\nbase_url = \"http://{}\"\nconcurrency = 8\n[[upstream.limit]]\nname = \"rate\"\nalgorithm = \"token_bucket\"\ncapacity = {CAPACITY}\nrefill = \"{RATE}/s\"\n",
            up.addr
        );
        let jobs: String = (0..n)
            .map(|i| {
                let path = if bad(i) { "bad" } else { "ok" };
                format!("{{\"id\":\"job-{i}\",\"method\":\"POST\",\"url\":\"http://{}/{path}/{i}\",\"body\":{{\"i\":{i}}}}}\n", up.addr)
            })
            .collect();
        Fleet {
            config: write(&dir, "fleet.toml", &config),
            jobs: write(&dir, "jobs.jsonl", &jobs),
            dir,
            prefix,
            url: url.to_string(),
            n,
        }
    }

    /// `tollgate run --config C --jobs J --lease L --progress lines`, spawned.
    fn spawn(&self, lease: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "--config", &self.config, "--jobs", &self.jobs])
            .args(["--lease", lease, "--progress", "lines"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate run")
    }

    fn tollgate(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .output()
            .expect("run tollgate")
    }

    /// The queue's result log: one id per final result recorded.
    fn log(&self) -> Vec<String> {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut conn = client.get_connection().expect("redis");
        redis::cmd("LRANGE")
            .arg(format!("{}:queue:default:log", self.prefix))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .expect("LRANGE")
    }

    /// Wait until `count` results are recorded (the fleet is mid-run).
    fn wait_for_results(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().len() < count {
            assert!(
                Instant::now() < deadline,
                "no progress: {} results",
                self.log().len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every job has exactly one final result, and `tollgate results`
    /// prints one line per job.
    fn assert_one_result_each(&self) {
        let log = self.log();
        let mut per_id: HashMap<&str, usize> = HashMap::new();
        for id in &log {
            *per_id.entry(id.as_str()).or_insert(0) += 1;
        }
        assert_eq!(per_id.len(), self.n, "every job has a result");
        let twice: Vec<_> = per_id.iter().filter(|(_, &c)| c > 1).collect();
        assert!(twice.is_empty(), "recorded more than once: {twice:?}");
        let out = self.tollgate(&["results", "--config", &self.config]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let lines: Vec<serde_json::Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), self.n);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Wait for a runner, failing (and killing it) if it runs for a minute.
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap");
            panic!("a runner did not finish: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn assert_clean_exit(out: &Output) {
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

/// No window of the upstream's arrivals holds more than the bucket allows
/// (a burst of CAPACITY, then RATE a second), widened by ARRIVAL_SLACK.
fn assert_within_the_limit(arrivals: &[Instant]) {
    for i in 0..arrivals.len() {
        for j in i..arrivals.len() {
            let span = arrivals[j].duration_since(arrivals[i]).as_secs_f64();
            let count = (j - i + 1) as f64;
            let allowed = CAPACITY + RATE * (span + ARRIVAL_SLACK);
            assert!(
                count <= allowed,
                "{count} requests arrived within {span:.3} s; the shared limit allows {allowed:.1}"
            );
        }
    }
}

#[test]
fn three_runners_share_one_job_set_and_one_quota() {
    let up = Upstream::start();
    let fleet = Fleet::new("share", &redis_url(), &up, 200, |_| false);
    let runners: Vec<Child> = (0..3).map(|_| fleet.spawn("30s")).collect();
    let outputs: Vec<Output> = runners.into_iter().map(finish).collect();
    for out in &outputs {
        assert_clean_exit(out);
        assert!(
            text(&out.stdout).contains("queue 'default' (all runners): 200 job(s), 200 done"),
            "{}",
            text(&out.stdout)
        );
    }
    fleet.assert_one_result_each();
    assert_within_the_limit(&up.arrivals());
    assert_eq!(up.distinct_keys(), 200, "every job reached the upstream");
    // Each runner took part (the work was shared, not done by the first).
    for out in &outputs {
        let stdout = text(&out.stdout);
        assert!(!stdout.contains("done 0,"), "{stdout}");
    }
}

#[test]
fn a_runner_killed_mid_run_leaves_its_jobs_to_the_others() {
    let up = Upstream::start();
    let fleet = Fleet::new("kill", &redis_url(), &up, 200, |_| false);
    let mut victim = fleet.spawn("1s");
    fleet.wait_for_results(20);
    let others: Vec<Child> = (0..2).map(|_| fleet.spawn("1s")).collect();
    fleet.wait_for_results(60);
    // SIGKILL: no chance to give its leases back.
    victim.kill().expect("SIGKILL");
    victim.wait().expect("reap");
    let outputs: Vec<Output> = others.into_iter().map(finish).collect();
    for out in &outputs {
        assert_clean_exit(out);
    }
    assert!(
        outputs
            .iter()
            .any(|o| text(&o.stderr).contains("expired lease(s) returned to the queue")),
        "the killed runner's leases were taken over"
    );
    fleet.assert_one_result_each();
    assert_within_the_limit(&up.arrivals());
    assert_eq!(up.distinct_keys(), 200);
}

#[test]
fn redis_killed_and_restarted_mid_run_loses_no_job_and_records_none_twice() {
    let mut server = RedisServer::start_persistent();
    let up = Upstream::start();
    let fleet = Fleet::new("restart", &server.url(), &up, 200, |_| false);
    let runners: Vec<Child> = (0..3).map(|_| fleet.spawn("30s")).collect();
    fleet.wait_for_results(50);
    server.kill();
    // Down long enough for every runner to notice.
    std::thread::sleep(Duration::from_millis(1500));
    server.restart();
    let outputs: Vec<Output> = runners.into_iter().map(finish).collect();
    for out in &outputs {
        assert_clean_exit(out);
    }
    assert!(
        outputs
            .iter()
            .any(|o| text(&o.stderr).contains("the job queue is unreachable")),
        "the outage was noticed and logged"
    );
    fleet.assert_one_result_each();
    assert_eq!(up.distinct_keys(), 200);
}

#[test]
fn dead_letters_of_a_fleet_are_listed_shown_exported_and_retried_from_redis() {
    let up = Upstream::start();
    let fleet = Fleet::new("dlq", &redis_url(), &up, 20, |i| i % 10 == 3);
    let out = finish(fleet.spawn("30s"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("done 18, dead-lettered 2"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "tollgate dlq retry --all --config {}",
            fleet.config
        )),
        "{stdout}"
    );
    let list = fleet.tollgate(&["dlq", "list", "--config", &fleet.config]);
    let listed = text(&list.stdout);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [
            "job-3\tvendor\tattempts=1\tstatus=400\tHTTP 400 (not retried)",
            "job-13\tvendor\tattempts=1\tstatus=400\tHTTP 400 (not retried)",
        ]
    );
    let show = fleet.tollgate(&["dlq", "show", "job-13", "--config", &fleet.config]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(shown["excerpt"], "{\"error\":\"invalid stage\"}");
    let not_dead = fleet.tollgate(&["dlq", "show", "job-1", "--config", &fleet.config]);
    assert!(text(&not_dead.stderr).contains("job 'job-1' is not a dead letter (it is done)"));
    let export = fleet.tollgate(&["dlq", "export", "--config", &fleet.config]);
    let exported: Vec<serde_json::Value> = text(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(exported.len(), 2);
    assert_eq!(exported[0]["body"]["i"], 3);
    // A state directory is not a fleet's: said so, not silently ignored.
    let both = fleet.tollgate(&["dlq", "list", "--config", &fleet.config, "--state", "x"]);
    assert!(
        text(&both.stderr).contains("not both"),
        "{}",
        text(&both.stderr)
    );

    up.failing.store(false, Ordering::SeqCst);
    let before = up.requests();
    let retry = fleet.tollgate(&[
        "dlq",
        "retry",
        "--all",
        "--config",
        &fleet.config,
        "--progress",
        "quiet",
    ]);
    assert!(retry.status.success(), "{}", text(&retry.stderr));
    assert_eq!(up.requests() - before, 2, "only the two");
    assert!(text(
        &fleet
            .tollgate(&["dlq", "list", "--config", &fleet.config])
            .stdout
    )
    .is_empty());
    let results = fleet.tollgate(&["results", "--config", &fleet.config]);
    let done = text(&results.stdout)
        .lines()
        .filter(|l| l.contains("\"outcome\":\"done\""))
        .count();
    assert_eq!(
        done, 20,
        "the retried jobs' results replace their dead ones"
    );
}

#[test]
fn a_bad_redis_address_or_password_is_a_clear_error() {
    let up = Upstream::start();
    let free = tollgate_testkit::free_port();
    let fleet = Fleet::new(
        "badurl",
        &format!("redis://127.0.0.1:{free}"),
        &up,
        3,
        |_| false,
    );
    let out = finish(fleet.spawn("30s"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&format!("store redis://127.0.0.1:{free}: cannot connect")),
        "{stderr}"
    );

    let server = RedisServer::start_with(Some("s3cret"));
    let wrong = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let fleet = Fleet::new("badpass", &wrong, &up, 3, |_| false);
    let out = finish(fleet.spawn("30s"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert!(
        !stderr.contains("wrong@"),
        "the password is not shown: {stderr}"
    );
    assert_eq!(up.distinct_keys(), 0, "nothing was sent");
}
