//! The runner against real HTTP servers on 127.0.0.1: a scripted upstream
//! (429 with and without Retry-After, 5xx, dropped connections, slow
//! answers, 400s) and the tollgate gateway enforcing the runner's own
//! profile. Time is tokio's paused clock: waits are exact and instant.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tollgate_egress::state::State;
use tollgate_egress::{Options, ProgressMode, Summary};
use tollgate_store::TokioClock;
use tollgate_testkit::upstream::{ok, scripted, Answer};
use tollgate_testkit::vendor::{admitted_rate, admitted_since, refused_share, token_bucket};

const EPOCH: u64 = 1_767_225_600_000_000_000;

struct Ran {
    summary: Summary,
    results: Vec<serde_json::Value>,
    state: State,
    _dir: tempfile::TempDir,
}

impl Ran {
    fn result(&self, id: &str) -> &serde_json::Value {
        self.results
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no result for {id}"))
    }
}

/// `text` as a config (with `${TOKEN}` set).
fn parsed(text: &str) -> tollgate_egress::UpstreamsConfig {
    tollgate_egress::parse_config(text, &tollgate_profiles::Bundled, &|name| {
        (name == "TOKEN").then(|| "t0ken".to_string())
    })
    .expect("config")
}

/// Queue `jobs` (JSONL lines) under `config` and run them to the end.
async fn run(config: &str, jobs: &str) -> Ran {
    let config = parsed(config);
    let routed = tollgate_egress::read_jobs(jobs.as_bytes(), &config).expect("jobs");
    run_routed(&config, &routed).await
}

async fn run_routed(
    config: &tollgate_egress::UpstreamsConfig,
    routed: &[tollgate_egress::Routed],
) -> Ran {
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, summary) =
        import_and_run(dir.path(), config, routed, TokioClock::starting_at(EPOCH)).await;
    let results = std::fs::read_to_string(state.results_path())
        .expect("results")
        .lines()
        .map(|l| serde_json::from_str(l).expect("result line"))
        .collect();
    Ran {
        summary,
        results,
        state,
        _dir: dir,
    }
}

/// Queue `routed` in the state at `dir` and run it to the end on `clock`.
async fn import_and_run(
    dir: &std::path::Path,
    config: &tollgate_egress::UpstreamsConfig,
    routed: &[tollgate_egress::Routed],
    clock: TokioClock,
) -> (State, Summary) {
    let mut state = State::open(dir).expect("state");
    state.import(routed, config).expect("import");
    let options = Options {
        progress: ProgressMode::Quiet,
        grace: Duration::from_secs(1),
        seed: 1,
        ..Options::default()
    };
    let summary = tollgate_egress::run(config, &state, clock, options, std::future::pending())
        .await
        .expect("run");
    (state, summary)
}

fn upstream(addr: SocketAddr, extra: &str) -> String {
    format!("[[upstream]]\nname = \"vendor\"\nbase_url = \"http://{addr}\"\n{extra}\n[[upstream.limit]]\nname = \"rate\"\nalgorithm = \"token_bucket\"\ncapacity = 1000\nrefill = \"1000/s\"\n")
}

fn job(id: &str, addr: SocketAddr, path: &str) -> String {
    format!("{{\"id\":\"{id}\",\"method\":\"POST\",\"url\":\"http://{addr}{path}\",\"body\":{{\"n\":1}}}}\n")
}

fn secs(from: Instant, to: Instant) -> f64 {
    (to - from).as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_pauses_the_whole_upstream_for_that_long() {
    let up = scripted(|path, n| match (path, n) {
        ("/a", 1) => Answer::Status(429, vec![("retry-after", "2")], "slow down"),
        _ => ok(),
    })
    .await;
    let jobs = [job("a", up.addr, "/a"), job("b", up.addr, "/b")].concat();
    let ran = run(&upstream(up.addr, "concurrency = 1"), &jobs).await;
    let a = up.seen("/a");
    let b = up.seen("/b");
    assert_eq!(a.len(), 2);
    let wait = secs(a[0].at, a[1].at);
    assert!((2.0..=2.25).contains(&wait), "retried after {wait} s");
    // b was free to go by its own limits, yet waited with the upstream.
    assert!(b[0].at >= a[1].at, "b went during the pause");
    assert_eq!(a[0].idempotency_key, a[1].idempotency_key);
    assert!(a[0].idempotency_key.starts_with("tollgate-"));
    assert_eq!(ran.result("a")["attempts"], 2);
    assert_eq!(ran.result("a")["outcome"], "done");
    assert_eq!(ran.summary.throttled(), 1);
    assert_eq!(ran.summary.retried(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_retry_after_the_pace_drops_then_backoff_doubles_and_five_attempts_end_in_a_dead_letter(
) {
    let up = scripted(|_, _| Answer::Status(429, vec![], "{\"error\":\"quota\"}")).await;
    let ran = run(&upstream(up.addr, ""), &job("x", up.addr, "/x")).await;
    let seen = up.seen("/x");
    assert_eq!(seen.len(), 5);
    // The first two 429s lower the pace (of the profile's 1,000/s) and
    // wait one interval of it; 429s that keep coming back off 4 s, 8 s.
    for (i, (least, most)) in [(0.001, 0.01), (0.001, 0.01), (4.0, 5.0), (8.0, 9.0)]
        .iter()
        .enumerate()
    {
        let gap = secs(seen[i].at, seen[i + 1].at);
        assert!(gap >= *least && gap <= *most, "gap {i}: {gap} s");
    }
    let result = ran.result("x");
    assert_eq!(result["outcome"], "dead");
    assert_eq!(result["status"], 429);
    assert_eq!(result["error"], "HTTP 429 after 5 attempts");
    let dead = ran.state.dead_letters().expect("dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "x");
    assert_eq!(dead[0].status, Some(429));
    assert_eq!(dead[0].excerpt.as_deref(), Some("{\"error\":\"quota\"}"));
}

#[tokio::test(start_paused = true)]
async fn server_errors_dropped_connections_and_timeouts_are_retried_a_400_is_not() {
    let up = scripted(|path, n| match (path, n) {
        ("/flaky", 1 | 2) => Answer::Status(503, vec![], "down"),
        ("/drop", 1) => Answer::Drop,
        ("/slow", 1) => Answer::Slow(Duration::from_secs(5)),
        ("/bad", _) => Answer::Status(400, vec![], "{\"error\":\"field x is required\"}"),
        _ => ok(),
    })
    .await;
    let jobs = [
        job("flaky", up.addr, "/flaky"),
        job("drop", up.addr, "/drop"),
        job("slow", up.addr, "/slow"),
        job("bad", up.addr, "/bad"),
    ]
    .concat();
    let ran = run(&upstream(up.addr, "timeout = \"1s\""), &jobs).await;
    assert_eq!(ran.result("flaky")["attempts"], 3);
    assert_eq!(ran.result("flaky")["outcome"], "done");
    assert_eq!(ran.result("drop")["attempts"], 2);
    assert_eq!(ran.result("drop")["outcome"], "done");
    assert_eq!(ran.result("slow")["attempts"], 2);
    assert_eq!(
        ran.result("slow")["body"]["ok"],
        true,
        "the second attempt answered"
    );
    let bad = ran.result("bad");
    assert_eq!(bad["outcome"], "dead");
    assert_eq!(bad["attempts"], 1);
    assert_eq!(bad["error"], "HTTP 400 (not retried)");
    assert_eq!(up.seen("/bad").len(), 1);
    assert_eq!(ran.summary.done(), 3);
    assert_eq!(ran.summary.dead(), 1);
    assert_eq!(ran.results.len(), 4, "one final result per job");
}

#[tokio::test(start_paused = true)]
async fn a_5xx_storm_opens_the_breaker_until_a_probe_succeeds() {
    let up = scripted(|path, n| match (path, n) {
        ("/x", 1..=3) => Answer::Status(500, vec![], "storm"),
        _ => ok(),
    })
    .await;
    let jobs: String = (0..6)
        .map(|i| job(&format!("j{i}"), up.addr, "/x"))
        .collect();
    let config = upstream(
        up.addr,
        "concurrency = 1\nbreaker = { failures = 3, cooldown = \"10s\" }",
    );
    let ran = run(&config, &jobs).await;
    let seen = up.seen("/x");
    // Three failures in a row (other jobs go while the first backs off),
    // then nothing for the cooldown, then one probe, then the rest.
    assert!(secs(seen[0].at, seen[2].at) < 1.0);
    let quiet = secs(seen[2].at, seen[3].at);
    assert!((10.0..10.5).contains(&quiet), "probe after {quiet} s");
    assert_eq!(ran.summary.done(), 6);
    assert_eq!(ran.summary.dead(), 0);
}

/// The tollgate gateway enforcing `profile` in front of an echo upstream.
async fn gateway(profile: &str) -> (SocketAddr, Arc<tollgate_gateway::Gateway>) {
    tollgate_testkit::vendor::gateway(profile, TokioClock::starting_at(EPOCH)).await
}

fn profiled(addr: SocketAddr, profile: &str, concurrency: usize, extra: &str) -> String {
    format!("[[upstream]]\nname = \"{profile}\"\nbase_url = \"http://{addr}\"\nprofile = \"{profile}\"\nheaders = {{ authorization = \"Bearer ${{TOKEN}}\" }}\nconcurrency = {concurrency}\n{extra}\n")
}

#[tokio::test(start_paused = true)]
async fn celigo_a_full_job_through_the_gateway_gets_no_429_at_the_full_rate() {
    let (addr, _gateway) = gateway("celigo").await;
    let jobs: String = (0..1600)
        .map(|i| job(&format!("j{i}"), addr, "/v1/imports"))
        .collect();
    let ran = run(&profiled(addr, "celigo", 32, ""), &jobs).await;
    assert_eq!(ran.summary.done(), 1600);
    assert_eq!(ran.summary.throttled(), 0);
    assert!(ran.results.iter().all(|r| r["status"] == 200));
    // 1,000 at once, then 600 at 300/s: 2 s, and the runner takes that long.
    let elapsed = ran.summary.elapsed.as_secs_f64();
    assert!((1.99..2.05).contains(&elapsed), "elapsed {elapsed} s");
    let utilisation = ran
        .summary
        .utilisation()
        .expect("the limits made calls wait");
    assert!(utilisation >= 0.98, "utilisation {utilisation}");
}

#[tokio::test(start_paused = true)]
async fn crm_ten_thousand_records_become_fifty_bulk_calls_under_the_crm_quota() {
    let (addr, _gateway) = gateway("crm").await;
    let bulk = "[[upstream.bulk]]\nname = \"probability\"\nmethod = \"POST\"\npath = \"/graphql\"\nmax_items = 200\nbody = { query = \"mutation($ids: [UUID!]!) { updateOpportunities(data: {probability: 75}, filter: {id: {in: $ids}}) { affectedCount } }\", variables = { ids = \"{{records}}\" } }\n";
    let config = tollgate_egress::parse_config(
        &profiled(addr, "crm", 32, bulk),
        &tollgate_profiles::Bundled,
        &|_| Some("t0ken".into()),
    )
    .expect("config");
    let records: String = (0..10_000).map(|i| format!("\"opp-{i}\"\n")).collect();
    let mut routed =
        tollgate_egress::read_bulk(records.as_bytes(), &config, "probability").expect("records");
    // And 150 single PATCHes sharing the quota: 200 calls, 100 per 60 s.
    let singles: String = (0..150).map(|i| format!("{{\"method\":\"PATCH\",\"url\":\"http://{addr}/rest/opportunities/{i}\",\"body\":{{\"probability\":75}}}}\n")).collect();
    routed.extend(tollgate_egress::read_jobs(singles.as_bytes(), &config).expect("jobs"));
    let ran = run_routed(&config, &routed).await;
    assert_eq!(ran.summary.calls(), 200);
    assert_eq!(ran.summary.throttled(), 0);
    assert_eq!(ran.summary.done(), 200);
    // Two full windows of the rolling quota (and its 1 s sub-window), the
    // runner's a sub-window longer (its margin against skew).
    let elapsed = ran.summary.elapsed.as_secs_f64();
    assert!((61.0..63.0).contains(&elapsed), "elapsed {elapsed} s");
}

#[tokio::test(start_paused = true)]
async fn a_quota_shared_with_another_client_is_corrected_from_the_rate_limit_headers() {
    let (addr, _gateway) = gateway("celigo").await;
    // Another client of the same account takes 900 of the 1,000 burst.
    let other = reqwest::Client::new();
    for _ in 0..900 {
        let r = other
            .post(format!("http://{addr}/v1/other"))
            .header("authorization", "Bearer t0ken")
            .send()
            .await
            .expect("other client");
        assert_eq!(r.status(), 200);
    }
    let jobs: String = (0..400)
        .map(|i| job(&format!("j{i}"), addr, "/v1/imports"))
        .collect();
    let ran = run(&profiled(addr, "celigo", 16, ""), &jobs).await;
    assert_eq!(ran.summary.done(), 400);
    // Without corrections the runner believes in 1,000 and sends into
    // 429s each time a pause ends (12 here, a full window in flight each
    // time); the RateLimit header of the first replies brings its view down.
    let throttled = ran.summary.throttled();
    assert!(throttled <= 2, "{throttled} 429s");
}

#[tokio::test(start_paused = true)]
async fn a_long_answer_is_digested_as_it_comes_not_held() {
    use sha2::Digest;
    // 3 MB: past what the runner keeps of a body with no cache route.
    let big: String = (0..3_000_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let expected = format!("{:x}", sha2::Sha256::digest(big.as_bytes()));
    let answer = big.clone();
    let up = scripted(move |path, _| match path {
        "/big" => Answer::Text(200, vec![], answer.clone()),
        _ => Answer::Text(
            400,
            vec![],
            format!("{{\"refused\":\"{}\"}}", "x".repeat(3_000)),
        ),
    })
    .await;
    let jobs = format!(
        "{{\"id\":\"big\",\"method\":\"GET\",\"url\":\"http://{0}/big\"}}\n{{\"id\":\"refused\",\"method\":\"GET\",\"url\":\"http://{0}/no\"}}\n",
        up.addr
    );
    let ran = run(&upstream(up.addr, ""), &jobs).await;
    let big = ran.result("big");
    assert_eq!(big["body_sha256"], expected.as_str());
    assert_eq!(big["body_bytes"], 3_000_000);
    // A dead letter still keeps the start of a body too long to hold.
    let refused = ran.result("refused");
    assert_eq!(refused["outcome"], "dead");
    assert_eq!(refused["body_bytes"], 3_014);
    let letters = ran.state.dead_letters().expect("dead letters");
    assert!(
        letters[0]
            .excerpt
            .as_deref()
            .is_some_and(|e| e.starts_with("{\"refused\":\"xxx")),
        "{letters:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn upstream_headers_and_the_job_s_own_headers_are_sent() {
    let up = scripted(|_, _| ok()).await;
    let jobs = format!(
        "{{\"id\":\"own\",\"method\":\"GET\",\"url\":\"http://{0}/a\",\"headers\":{{\"authorization\":\"Bearer mine\"}},\"idempotency_key\":\"k-1\"}}\n{{\"id\":\"default\",\"method\":\"GET\",\"url\":\"http://{0}/b\"}}\n",
        up.addr
    );
    let config = upstream(up.addr, "headers = { authorization = \"Bearer ${TOKEN}\" }");
    run(&config, &jobs).await;
    assert_eq!(
        up.seen("/a")[0].authorization.as_deref(),
        Some("Bearer mine")
    );
    assert_eq!(up.seen("/a")[0].idempotency_key, "k-1");
    assert_eq!(
        up.seen("/b")[0].authorization.as_deref(),
        Some("Bearer t0ken")
    );
}

#[tokio::test(start_paused = true)]
async fn a_resumed_run_starts_from_the_quota_the_last_run_left() {
    let (addr, _gateway) = gateway("celigo").await;
    let clock = TokioClock::starting_at(EPOCH);
    let config = tollgate_egress::parse_config(
        &profiled(addr, "celigo", 32, ""),
        &tollgate_profiles::Bundled,
        &|_| Some("t0ken".into()),
    )
    .expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = |from: usize, n: usize| {
        let lines: String = (from..from + n)
            .map(|i| job(&format!("j{i}"), addr, "/v1/imports"))
            .collect();
        tollgate_egress::read_jobs(lines.as_bytes(), &config).expect("jobs")
    };
    // The first run spends the whole burst of 1,000 ...
    let (first_state, first) =
        import_and_run(dir.path(), &config, &batch(0, 1000), clock.clone()).await;
    assert_eq!(first.done(), 1000);
    drop(first_state);
    // ... so the next one, on the same state, paces at 300/s from the start.
    let (_, second) = import_and_run(dir.path(), &config, &batch(1000, 300), clock.clone()).await;
    assert_eq!(second.done(), 300);
    assert_eq!(second.throttled(), 0);
    let elapsed = second.elapsed.as_secs_f64();
    assert!((0.95..1.05).contains(&elapsed), "elapsed {elapsed} s");
}

#[tokio::test(start_paused = true)]
async fn one_process_owns_a_state_and_a_reused_id_for_another_request_is_refused() {
    let up = scripted(|_, _| ok()).await;
    let config = parsed(&upstream(up.addr, ""));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut state = State::open(dir.path()).expect("state");
    let second = State::open(dir.path()).expect_err("locked");
    assert!(
        second
            .to_string()
            .contains("another tollgate process is using this state"),
        "{second}"
    );
    assert!(State::open_read_only(dir.path()).is_ok(), "reading is fine");
    let a = tollgate_egress::read_jobs(job("x", up.addr, "/a").as_bytes(), &config).expect("jobs");
    assert_eq!(state.import(&a, &config).expect("import"), (1, 0));
    assert_eq!(state.import(&a, &config).expect("same job again"), (0, 1));
    let b = tollgate_egress::read_jobs(job("x", up.addr, "/b").as_bytes(), &config).expect("jobs");
    let e = state
        .import(&b, &config)
        .expect_err("same id, other request");
    assert!(
        e.to_string()
            .contains("job id 'x' is already in this state for a different request"),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn calls_go_on_few_connections_kept_open_and_past_ones_the_upstream_closed() {
    use std::sync::atomic::Ordering::SeqCst;
    let up = scripted(|path, _| match path.starts_with("/close/") {
        true => Answer::Status(200, vec![("connection", "close")], "bye"),
        false => ok(),
    })
    .await;
    let jobs = |prefix: &str, n: usize| -> String {
        (0..n)
            .map(|i| job(&format!("{prefix}{i}"), up.addr, &format!("/{prefix}/{i}")))
            .collect()
    };
    // One call at a time: every call on the one connection.
    let ran = run(&upstream(up.addr, "concurrency = 1"), &jobs("a", 20)).await;
    assert_eq!(ran.summary.upstreams[0].done, 20);
    assert_eq!((up.seen_under("/a/"), up.connections.load(SeqCst)), (20, 1));
    // Four at a time: never more connections than calls in flight.
    let ran = run(&upstream(up.addr, "concurrency = 4"), &jobs("b", 40)).await;
    assert_eq!(ran.summary.upstreams[0].done, 40);
    let opened = up.connections.load(SeqCst) - 1;
    assert!(
        (1..=4).contains(&opened),
        "{opened} connections for 4 in flight"
    );
    // An upstream that closes each connection after its answer: every call
    // still gets through, each on a connection of its own.
    let before = up.connections.load(SeqCst);
    let ran = run(&upstream(up.addr, "concurrency = 1"), &jobs("close", 5)).await;
    assert_eq!(ran.summary.upstreams[0].done, 5);
    assert_eq!(ran.summary.retried(), 0);
    assert_eq!(up.seen_under("/close/"), 5);
    assert_eq!(up.connections.load(SeqCst) - before, 5);
}

#[tokio::test(start_paused = true)]
async fn importing_hands_over_the_pending_jobs_as_reading_them_back_would() {
    let up = scripted(|_, _| ok()).await;
    let config = parsed(&upstream(up.addr, ""));
    let read = |lines: String| tollgate_egress::read_jobs(lines.as_bytes(), &config).expect("jobs");
    let dir = tempfile::tempdir().expect("tempdir");
    // An earlier run finished "done" and left "a" and "b" pending.
    import_and_run(
        dir.path(),
        &config,
        &read(job("done", up.addr, "/d")),
        TokioClock::starting_at(EPOCH),
    )
    .await;
    let mut state = State::open(dir.path()).expect("state");
    state
        .import(
            &read(job("a", up.addr, "/a") + &job("b", up.addr, "/b")),
            &config,
        )
        .expect("import");
    // Given again with two new jobs (one with headers, a priority and a
    // workflow, so every stored field goes through the round trip).
    let rich = r#"{"id":"d","method":"PUT","url":"http://ADDR/x?q=1","headers":{"x-a":"1"},"body":"text","priority":"high","workflow":"nightly"}"#
        .replace("ADDR", &up.addr.to_string());
    let again = read(job("b", up.addr, "/b") + &job("c", up.addr, "/c") + &rich + "\n");
    let (added, already, pending) = state.import_pending(again, &config).expect("import");
    assert_eq!((added, already), (2, 1));
    let ids: Vec<&str> = pending.iter().map(|p| p.job.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "d"]);
    assert_eq!(pending, state.pending().expect("pending"), "as read back");
    // Nothing new: every pending job is read back.
    let (added, already, again) = state
        .import_pending(read(job("a", up.addr, "/a")), &config)
        .expect("import");
    assert_eq!((added, already), (0, 1));
    assert_eq!(again, pending);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_run_sends_a_pending_job_only_where_its_config_still_would() {
    let up = scripted(|_, _| ok()).await;
    let config_at = |base: &str| {
        let text = upstream(up.addr, "").replace(
            &format!("base_url = \"http://{}\"", up.addr),
            &format!("base_url = \"http://{}{base}\"", up.addr),
        );
        tollgate_egress::parse_config(&text, &tollgate_profiles::Bundled, &|_| None)
            .expect("config")
    };
    let (before, moved, kept) = (config_at("/v1"), config_at("/v2"), config_at("/V1/../v1/"));
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut state = State::open(dir.path()).expect("state");
        let lines = job("a", up.addr, "/v1/items?x=1") + &job("b", up.addr, "/v1");
        let routed = tollgate_egress::read_jobs(lines.as_bytes(), &before).expect("jobs");
        state.import(&routed, &before).expect("import");
    }
    let state = State::open(dir.path()).expect("state");
    let options = || Options {
        progress: ProgressMode::Quiet,
        seed: 1,
        ..Options::default()
    };
    let clock = TokioClock::starting_at(EPOCH);
    // The upstream's base_url moved: its pending jobs are not sent there.
    let e = tollgate_egress::run(
        &moved,
        &state,
        clock.clone(),
        options(),
        std::future::pending(),
    )
    .await
    .expect_err("moved");
    assert!(
        e.to_string()
            .contains("which is no longer under that upstream's base_url"),
        "{e}"
    );
    assert_eq!(up.seen_under("/"), 0);
    // The same base_url written another way: both go.
    let summary = tollgate_egress::run(&kept, &state, clock, options(), std::future::pending())
        .await
        .expect("run");
    assert_eq!(summary.upstreams[0].done, 2);
    assert_eq!(up.seen_under("/v1"), 2);
}

/// Run `jobs` (one per path) to `up` under `config`, reaching upstreams as `proxies` says.
async fn run_through(
    config: &str,
    scheme: &str,
    up: SocketAddr,
    paths: &[&str],
    proxies: tollgate_egress::Proxies,
) -> Summary {
    let config = tollgate_egress::parse_config(config, &tollgate_profiles::Bundled, &|_| None)
        .expect("config");
    let lines: String = (paths.iter().enumerate())
        .map(|(i, path)| {
            job(&format!("j{i}"), up, path).replace("http://", &format!("{scheme}://"))
        })
        .collect();
    let routed = tollgate_egress::read_jobs(lines.as_bytes(), &config).expect("jobs");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut state = State::open(dir.path()).expect("state");
    state.import(&routed, &config).expect("import");
    let options = Options {
        progress: ProgressMode::Quiet,
        seed: 1,
        proxies: Arc::new(proxies),
        ..Options::default()
    };
    let clock = TokioClock::starting_at(EPOCH);
    tollgate_egress::run(&config, &state, clock, options, std::future::pending())
        .await
        .expect("run")
}

#[tokio::test]
async fn jobs_reach_an_https_upstream_through_a_proxy_s_tunnel_trusting_its_ca_file() {
    let (up, ca) = tollgate_testkit::upstream::scripted_tls(|_, _| ok()).await;
    let proxy = tollgate_testkit::proxy::proxy().await;
    let config = upstream(up.addr, &format!("ca_file = \"{}\"", ca.path.display()))
        .replace("http://", "https://");
    let proxies = tollgate_egress::Proxies::builder()
        .https(format!("http://runner:s3cret@{}", proxy.addr))
        .build();
    let summary = run_through(&config, "https", up.addr, &["/a", "/b", "/c"], proxies).await;
    assert_eq!(summary.upstreams[0].done, 3);
    assert_eq!(up.seen_under("/"), 3);
    let opened = proxy.opened();
    assert!(!opened.is_empty());
    for o in &opened {
        assert_eq!(o.line, format!("CONNECT {} HTTP/1.1", up.addr));
        // base64("runner:s3cret")
        assert_eq!(
            o.authorization.as_deref(),
            Some("Basic cnVubmVyOnMzY3JldA==")
        );
    }
}

#[tokio::test]
async fn jobs_reach_an_http_upstream_through_a_forwarding_proxy_or_directly_when_no_proxy_names_it()
{
    let up = scripted(|_, _| ok()).await;
    let proxy = tollgate_testkit::proxy::proxy().await;
    let config = upstream(up.addr, "");
    let proxies = tollgate_egress::Proxies::builder()
        .http(format!("http://runner:s3cret@{}", proxy.addr))
        .build();
    let summary = run_through(&config, "http", up.addr, &["/a", "/b"], proxies).await;
    assert_eq!(summary.upstreams[0].done, 2);
    assert_eq!(up.seen_under("/"), 2);
    let opened = proxy.opened();
    assert!(!opened.is_empty());
    assert!(
        opened[0]
            .line
            .starts_with(&format!("POST http://{}/", up.addr)),
        "{opened:?}"
    );
    assert_eq!(
        opened[0].authorization.as_deref(),
        Some("Basic cnVubmVyOnMzY3JldA==")
    );

    // NO_PROXY names the upstream's host: straight to it.
    let proxies = tollgate_egress::Proxies::builder()
        .all(proxy.url())
        .no("127.0.0.1")
        .build();
    let summary = run_through(&config, "http", up.addr, &["/c"], proxies).await;
    assert_eq!(summary.upstreams[0].done, 1);
    assert_eq!(up.seen_under("/c"), 1);
    assert_eq!(proxy.opened().len(), opened.len());
}

/// A config for the vendor at `addr` whose profile is a token bucket of 20
/// refilling at `per_second`.
fn bucket_profile(addr: SocketAddr, per_second: u32) -> tollgate_egress::UpstreamsConfig {
    let text = format!("[[upstream]]\nname = \"vendor\"\nbase_url = \"http://{addr}\"\nconcurrency = 32\n[[upstream.limit]]\nname = \"rate\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"{per_second}/s\"\n");
    tollgate_egress::parse_config(&text, &tollgate_profiles::Bundled, &|_| None).expect("config")
}

fn jobs_to(
    config: &tollgate_egress::UpstreamsConfig,
    addr: SocketAddr,
    from: usize,
    n: usize,
) -> Vec<tollgate_egress::Routed> {
    let lines: String = (from..from + n)
        .map(|i| job(&format!("j{i}"), addr, "/x"))
        .collect();
    tollgate_egress::read_jobs(lines.as_bytes(), config).expect("jobs")
}

#[tokio::test(start_paused = true)]
async fn the_right_profile_meets_no_429_from_a_vendor_timing_arrivals_exactly() {
    // The vendor's own bucket, the profile's numbers: the runner (inside
    // them by its margin) never sends ahead of it, and loses little pace.
    let (up, verdicts) = token_bucket(20, |_| 100.0).await;
    let config = bucket_profile(up.addr, 100);
    let ran = run_routed(&config, &jobs_to(&config, up.addr, 0, 1000)).await;
    assert_eq!(ran.summary.done(), 1000);
    let seen = verdicts.lock().expect("lock").clone();
    assert_eq!(refused_share(&seen), 0.0, "a 429 from the right profile");
    // 19 at once, then 99/s: 9.9 s (10.0 s at the profile's own pace).
    let end = seen.last().expect("calls").0.as_secs_f64();
    assert!((9.8..10.0).contains(&end), "1,000 calls took {end} s");
}

#[tokio::test(start_paused = true)]
async fn a_profile_too_fast_for_the_vendor_is_paced_to_it_and_the_next_run_starts_there() {
    // The vendor allows 100/s (burst 20); the profile says 160/s.
    let (up, verdicts) = token_bucket(20, |_| 100.0).await;
    let config = bucket_profile(up.addr, 160);
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, summary) = import_and_run(
        dir.path(),
        &config,
        &jobs_to(&config, up.addr, 0, 1500),
        TokioClock::starting_at(EPOCH),
    )
    .await;
    assert_eq!(summary.done(), 1500);
    let seen = verdicts.lock().expect("lock").clone();
    let refused = refused_share(&seen);
    assert!(
        refused <= 0.02,
        "{:.2}% of calls got a 429",
        refused * 100.0
    );
    let pace = admitted_since(&seen, 2.0);
    assert!(pace >= 85.0, "{pace:.1}/s of the vendor's 100/s");
    // The summary says what was learnt, and the state keeps it.
    let vendor = &summary.upstreams[0];
    let learnt = vendor.learnt.expect("a learnt pace");
    assert!((60.0..110.0).contains(&learnt), "learnt {learnt}/s");
    assert_eq!(vendor.profile_rate, Some(160.0));
    assert!(
        summary
            .describe()
            .contains(&format!("learnt {learnt:.1}/s of the profile's 160.0/s")),
        "{}",
        summary.describe()
    );
    assert_eq!(state.paces().expect("paces").get("vendor"), Some(&learnt));
    drop(state);

    // A resumed run (an hour later, a vendor with its burst full again)
    // starts at the learnt pace: no burst at the profile's 160/s.
    let (again, verdicts) = token_bucket(20, |_| 100.0).await;
    let config = bucket_profile(again.addr, 160);
    let (_, summary) = import_and_run(
        dir.path(),
        &config,
        &jobs_to(&config, again.addr, 1500, 200),
        TokioClock::starting_at(EPOCH + 3_600_000_000_000),
    )
    .await;
    assert_eq!(summary.done(), 200);
    let seen = verdicts.lock().expect("lock").clone();
    let first_twenty = (seen[19].0 - seen[0].0).as_secs_f64();
    assert!(
        first_twenty >= 19.0 / learnt * 0.99,
        "the first 20 calls took {first_twenty} s (at {learnt}/s: {} s)",
        19.0 / learnt
    );
    assert!(refused_share(&seen) <= 0.02);
}

#[tokio::test(start_paused = true)]
async fn a_profile_three_times_too_fast_still_gets_most_of_the_vendor_s_rate() {
    let (up, verdicts) = token_bucket(20, |_| 100.0).await;
    let config = bucket_profile(up.addr, 300);
    let ran = run_routed(&config, &jobs_to(&config, up.addr, 0, 1500)).await;
    assert_eq!(ran.summary.done(), 1500);
    let seen = verdicts.lock().expect("lock").clone();
    let refused = refused_share(&seen);
    assert!(
        refused <= 0.03,
        "{:.2}% of calls got a 429",
        refused * 100.0
    );
    let pace = admitted_since(&seen, 2.0);
    assert!(pace >= 80.0, "{pace:.1}/s of the vendor's 100/s");
}

#[tokio::test(start_paused = true)]
async fn a_vendor_that_halves_its_limit_and_restores_it_is_followed_both_ways() {
    // The profile is right (100/s) until the vendor halves it from 10 s to
    // 25 s; then it is right again.
    let halved = |at: Duration| {
        if (10..25).contains(&at.as_secs()) {
            50.0
        } else {
            100.0
        }
    };
    let (up, verdicts) = token_bucket(20, halved).await;
    let config = bucket_profile(up.addr, 100);
    let ran = run_routed(&config, &jobs_to(&config, up.addr, 0, 4000)).await;
    assert_eq!(ran.summary.done(), 4000);
    let seen = verdicts.lock().expect("lock").clone();
    let refused = refused_share(&seen);
    assert!(
        refused <= 0.03,
        "{:.2}% of calls got a 429",
        refused * 100.0
    );
    let before = admitted_rate(&seen, 0.0, 10.0);
    let down = admitted_rate(&seen, 13.0, 25.0);
    let back = admitted_rate(&seen, 35.0, 40.0);
    assert!(before >= 95.0, "before: {before:.1}/s");
    assert!(down >= 40.0, "halved: {down:.1}/s of 50/s");
    assert!(back >= 85.0, "restored: {back:.1}/s of 100/s, 10 s after");
}

#[tokio::test(start_paused = true)]
async fn another_client_spending_the_same_quota_steadily_is_left_its_share() {
    // The gateway enforces Celigo's page (a burst of 1,000, then 300/s);
    // another client of the same account spends 150/s all along.
    let (addr, _gateway) = gateway("celigo").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_micros(6_667));
            let (mut ok, mut refused) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let r = client
                    .post(format!("http://{addr}/v1/other"))
                    .header("authorization", "Bearer t0ken")
                    .send()
                    .await
                    .expect("other client");
                match r.status().as_u16() {
                    200 => ok += 1,
                    _ => refused += 1,
                }
            }
            (ok, refused)
        })
    };
    let jobs: String = (0..3000)
        .map(|i| job(&format!("j{i}"), addr, "/v1/imports"))
        .collect();
    let started = Instant::now();
    let ran = run(&profiled(addr, "celigo", 32, ""), &jobs).await;
    let took = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, refused) = other.await.expect("other client");
    assert_eq!(ran.summary.done(), 3000);
    // Paced at what the other client leaves, the runner meets at most a
    // 429 at the burst's end; bursting into the other's calls whenever its
    // own count allowed, it met 5 here.
    let throttled = ran.summary.throttled();
    assert!(throttled <= 2, "{throttled} 429s of 3,000 calls");
    // Past the burst the runner gets what the other leaves (150/s), less
    // the 3 % it keeps clear: 2,000 calls at about 145/s.
    assert!(took <= 2000.0 / (150.0 * 0.85), "{took} s");
    // And the other client is not starved by bursts into its calls.
    assert!(
        f64::from(refused) <= 0.02 * f64::from(ok + refused),
        "the other client got {refused} 429s of {}",
        ok + refused
    );
}

#[tokio::test(start_paused = true)]
async fn the_nightly_import_done_naively_makes_503_calls_with_cache_routes() {
    // The API gateway's rate-limit page: "Importing 500 jobs nightly: cache
    // /v1/sites, /v1/job-types, and /v1/custom-fields once at the start of
    // the run (3 requests)". Here the jobs file looks them up before every
    // create, and the config's cache routes make it the page's 503 calls.
    let up = tollgate_testkit::upstream::scripted_seen(|seen, n| {
        let body = match seen.method.as_str() {
            "GET" => format!("{{\"of\":\"{}\",\"call\":{n}}}", seen.path),
            _ => format!("{{\"created\":{n}}}"),
        };
        Answer::Text(201 - u16::from(seen.method == "GET"), vec![], body)
    })
    .await;
    let lookups = ["/v1/sites", "/v1/job-types", "/v1/custom-fields"];
    let mut jobs = String::new();
    for i in 0..500 {
        for path in lookups {
            jobs.push_str(&format!(
                "{{\"id\":\"{i}{path}\",\"method\":\"GET\",\"url\":\"http://{}{path}\"}}\n",
                up.addr
            ));
        }
        jobs.push_str(&job(&format!("create-{i}"), up.addr, "/v1/jobs"));
    }
    let routes: String = lookups
        .iter()
        .map(|p| format!("[[upstream.cache]]\npath_prefix = \"{p}\"\nttl = \"1h\"\n"))
        .collect();
    let config = format!(
        "[[upstream]]\nname = \"vendor\"\nbase_url = \"http://{}\"\nprofile = \"gateway\"\nheaders = {{ x-tenant-id = \"acme\" }}\n{routes}",
        up.addr
    );
    let ran = run(&config, &jobs).await;
    assert_eq!(up.seen.lock().expect("lock").len(), 503);
    let vendor = &ran.summary.upstreams[0];
    assert_eq!(
        (vendor.calls, vendor.done, vendor.dead, vendor.saved),
        (503, 2000, 0, 1497)
    );
    assert!(ran
        .summary
        .describe()
        .contains("1497 job(s) answered without a call"));
    // Every lookup's result is the one answer the vendor gave.
    for i in [0, 1, 250, 499] {
        for path in lookups {
            let result = ran.result(&format!("{i}{path}"));
            assert_eq!(
                (result["outcome"].as_str(), result["status"].as_u64()),
                (Some("done"), Some(200))
            );
            assert_eq!(result["body"], serde_json::json!({"of": path, "call": 1}));
        }
    }
    assert_eq!(ran.results.len(), 2000);
}

#[tokio::test(start_paused = true)]
async fn reads_alike_wait_for_one_call_and_get_its_answer_after_a_retry() {
    let up = tollgate_testkit::upstream::scripted_seen(|seen, n| match n {
        1 => Answer::Drop,
        _ => Answer::Text(200, vec![], format!("{} {} #{n}", seen.method, seen.path)),
    })
    .await;
    let config = format!(
        "{}[[upstream.cache]]\npath_prefix = \"/v1\"\nttl = \"1h\"\n",
        upstream(up.addr, "max_attempts = 2")
    );
    let jobs: String = ["a", "b", "c"]
        .iter()
        .map(|id| {
            format!(
                "{{\"id\":\"{id}\",\"method\":\"GET\",\"url\":\"http://{}/v1/flaky\"}}\n",
                up.addr
            )
        })
        .collect();
    let ran = run(&config, &jobs).await;
    // The first call broke off and was retried; the jobs alike waited for
    // it and got its answer.
    for id in ["a", "b", "c"] {
        assert_eq!(ran.result(id)["body"], "GET /v1/flaky #2", "{id}");
    }
    assert_eq!(up.seen("/v1/flaky").len(), 2);
    assert_eq!(ran.summary.upstreams[0].saved, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_s_writes_evict_the_fleet_s_shared_cache() {
    use tollgate_http::cache::{shared_store, Cache, Key, Stored};
    let up = scripted(|_, _| ok()).await;
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\n{}[[upstream.cache]]\npath_prefix = \"/v1\"\nttl = \"1h\"\n",
        tollgate_testkit::redis_url(),
        tollgate_testkit::unique_prefix("runner-shared-cache"),
        upstream(up.addr, "cache_store = \"redis\"")
    );
    // What a proxy of the fleet keeps (parsed from the same config).
    let parsed = tollgate_egress::parse_config(&config, &tollgate_profiles::Bundled, &|_| None)
        .expect("config");
    let u = &parsed.upstreams[0];
    let settings = u.policy.store.redis.as_ref().expect("redis");
    let proxy_cache = Cache::shared(
        &u.cache,
        shared_store(&u.cache, settings, &u.name).expect("store"),
    );
    let key = |path: &str| Key {
        method: "GET".into(),
        url: format!("http://{}{path}", up.addr),
        partition: u.partition(None, &hyper::HeaderMap::new()),
    };
    let now = tollgate_store::TokioClock::system();
    for path in ["/v1/sites/5", "/v1/job-types"] {
        let look = proxy_cache.look(0, &key(path)).await;
        let stored = Stored::new(
            hyper::StatusCode::OK,
            hyper::HeaderMap::new(),
            bytes::Bytes::from_static(b"kept"),
            &hyper::HeaderMap::new(),
            Duration::from_secs(3600),
            tollgate_core::Clock::now(&now),
        );
        proxy_cache
            .keep(0, key(path), Arc::new(stored), look.epoch)
            .await;
        assert!(
            proxy_cache.look(0, &key(path)).await.kept.is_some(),
            "{path}"
        );
    }
    let jobs = format!(
        "{{\"id\":\"edit\",\"method\":\"PATCH\",\"url\":\"http://{}/v1/sites/5\",\"body\":{{\"name\":\"b\"}}}}\n",
        up.addr
    );
    let ran = run(&config, &jobs).await;
    assert_eq!(ran.summary.done(), 1);
    // When the run has ended, the record it changed is gone for the fleet.
    assert!(proxy_cache
        .look(0, &key("/v1/sites/5"))
        .await
        .kept
        .is_none());
    assert!(proxy_cache
        .look(0, &key("/v1/job-types"))
        .await
        .kept
        .is_some());
}
