//! Job intake on the proxy: producers push jobs over HTTP; they are kept in
//! the durable state, sent through the same line as live requests (after
//! them, above the reserve), and their results can be asked for.

mod common;

use common::*;
use std::time::Duration;
use tokio::time::Instant;
use tollgate_testkit::upstream::{scripted, scripted_seen, Answer};

thread_local! {
    /// One client per test (each test has its own thread and runtime):
    /// building one reads the system's roots, too slow to do per poll.
    static CLIENT: reqwest::Client = client();
}

fn http() -> reqwest::Client {
    CLIENT.with(|c| c.clone())
}

/// A proxy whose jobs live in `dir`, with one upstream `crm` at `up` (a
/// bucket of 100 refilling 100/s).
async fn crm_proxy(dir: &std::path::Path, up: &tollgate_testkit::upstream::Scripted) -> Running {
    start(&with_state(
        dir,
        &upstream("crm", up.addr, &bucket("api", 100, "100/s")),
    ))
    .await
}

/// A proxy config whose jobs live in `dir`.
fn with_state(dir: &std::path::Path, rest: &str) -> String {
    format!(
        "[proxy]\naccess_log = \"off\"\nstate = \"{}\"\n{rest}",
        dir.display()
    )
}

async fn push(proxy: &Running, content_type: &str, body: String) -> reqwest::Response {
    http()
        .post(format!("http://{}/_tollgate/jobs", proxy.addr))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("intake answers")
}

async fn status_of(proxy: &Running, id: &str) -> serde_json::Value {
    http()
        .get(format!("http://{}/_tollgate/jobs/{id}", proxy.addr))
        .send()
        .await
        .expect("status answers")
        .json()
        .await
        .expect("json")
}

/// Let real time pass (the state's outcomes are committed by a thread of
/// its own, which the test's paused clock does not wait for).
async fn real_pause() {
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5)))
        .await
        .expect("pause");
}

/// Wait (on the test's clock, up to 10 minutes of it) until job `id` is
/// done or dead.
async fn settled(proxy: &Running, id: &str) -> serde_json::Value {
    for _ in 0..3000 {
        let s = status_of(proxy, id).await;
        if s["status"] == "done" || s["status"] == "dead" {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("job {id} never settled");
}

#[tokio::test(start_paused = true)]
async fn jobs_pushed_as_jsonl_are_sent_once_and_their_results_kept() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted_seen(|seen, _| match seen.path.as_str() {
        "/v1/missing" => Answer::Status(404, vec![], "{\"error\":\"no such contact\"}"),
        _ => Answer::Text(200, vec![], format!("{{\"echo\":{}}}", seen.body.len())),
    })
    .await;
    let proxy = start(&with_state(
        dir.path(),
        &upstream("crm", up.addr, &bucket("api", 10, "10/s")),
    ))
    .await;
    let base = format!("http://{}", up.addr);
    let lines = format!(
        "{{\"id\":\"c1\",\"method\":\"POST\",\"url\":\"{base}/v1/contacts\",\"body\":{{\"name\":\"Ada\"}},\"workflow\":\"sync\"}}\n\
         {{\"id\":\"c2\",\"method\":\"GET\",\"url\":\"{base}/v1/missing\"}}\n\
         {{\"method\":\"GET\",\"url\":\"{base}/v1/contacts?page=2\"}}\n"
    );
    let answer = push(&proxy, "application/x-ndjson", lines.clone()).await;
    assert_eq!(answer.status(), 202);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["queued"], 3);
    let ids: Vec<String> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(&ids[..2], ["c1", "c2"]);

    let done = settled(&proxy, "c1").await;
    assert_eq!(done["status"], "done");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["result"]["status"], 200);
    assert_eq!(done["result"]["body"]["echo"], 14);
    let dead = settled(&proxy, "c2").await;
    assert_eq!(dead["status"], "dead");
    assert_eq!(dead["result"]["status"], 404);
    assert!(dead["result"]["error"]
        .as_str()
        .unwrap()
        .contains("not retried"));
    assert_eq!(settled(&proxy, &ids[2]).await["status"], "done");

    // Sent as the runner sends: the job's body as JSON, its idempotency key.
    let sent = up.seen("/v1/contacts");
    assert_eq!(sent.len(), 2);
    let post = sent.iter().find(|s| s.method == "POST").unwrap();
    assert_eq!(&post.body[..], b"{\"name\":\"Ada\"}");
    assert!(post.idempotency_key.starts_with("tollgate-"));
    assert!(post
        .headers
        .iter()
        .all(|(name, _)| !name.starts_with("tollgate-")));

    // The same batch again: nothing new is queued or sent.
    let again: serde_json::Value = push(&proxy, "application/x-ndjson", lines)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (again["queued"].clone(), again["already"].clone()),
        (0.into(), 3.into())
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(up.seen("/v1/contacts").len(), 2);

    // Results land in the state's results.jsonl, one line per job.
    for _ in 0..1000 {
        real_pause().await;
        let text = std::fs::read_to_string(dir.path().join("results.jsonl")).unwrap_or_default();
        if text.lines().count() == 3 {
            let ids_seen: std::collections::BTreeSet<String> = text
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect();
            assert_eq!(ids_seen.len(), 3);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("results.jsonl never had its three lines");
}

#[tokio::test(start_paused = true)]
async fn one_job_as_json_answers_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| tollgate_testkit::upstream::ok()).await;
    let proxy = crm_proxy(dir.path(), &up).await;
    let job = format!(
        "{{\"id\":\"one\",\"method\":\"DELETE\",\"url\":\"http://{}/v1/deals/7\"}}",
        up.addr
    );
    let answer = push(&proxy, "application/json", job).await;
    assert_eq!(answer.status(), 202);
    assert_eq!(answer.headers()["location"], "/_tollgate/jobs/one");
    assert_eq!(settled(&proxy, "one").await["status"], "done");
    assert_eq!(up.seen("/v1/deals/7")[0].method, "DELETE");
    // The same id for another request is refused, and nothing is queued.
    let other = format!(
        "{{\"id\":\"one\",\"method\":\"GET\",\"url\":\"http://{}/v1/deals/8\"}}",
        up.addr
    );
    let conflict = push(&proxy, "application/json", other).await;
    assert_eq!(conflict.status(), 409);
    let problem: serde_json::Value = conflict.json().await.unwrap();
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("job id 'one' is already in this state for a different request"));
}

#[tokio::test(start_paused = true)]
async fn a_bad_batch_is_refused_whole_naming_each_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| tollgate_testkit::upstream::ok()).await;
    let proxy = crm_proxy(dir.path(), &up).await;
    let base = format!("http://{}", up.addr);
    let lines = format!(
        "{{\"method\":\"GET\",\"url\":\"{base}/v1/a\"}}\n\
         {{\"method\":\"GET\",\"url\":\n\
         {{\"method\":\"GET\",\"url\":\"http://elsewhere.example/v1/b\"}}\n"
    );
    let answer = push(&proxy, "application/x-ndjson", lines).await;
    assert_eq!(answer.status(), 400);
    assert_eq!(answer.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = answer.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("line 2: not a job"), "{detail}");
    assert!(
        detail.contains(
            "line 3: url 'http://elsewhere.example/v1/b' is under no [[upstream]] base_url"
        ),
        "{detail}"
    );
    assert_eq!(problem["title"], "Jobs refused; nothing was queued");
    // Nothing was queued, nothing sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(up.seen("/v1/a").is_empty());
    assert_eq!(status_of(&proxy, "anything").await["title"], "No such job");

    let wrong_type = push(&proxy, "text/csv", "a,b\n".into()).await;
    assert_eq!(wrong_type.status(), 415);
    let not_an_object = push(&proxy, "application/json", "[1,2]".into()).await;
    assert_eq!(not_an_object.status(), 400);
    let elsewhere = get(&format!("http://{}/_tollgate/other", proxy.addr), &[]).await;
    assert_eq!(elsewhere.status(), 404);
}

#[tokio::test(start_paused = true)]
async fn a_live_request_preferring_async_is_queued_as_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| Answer::Status(201, vec![], "{\"id\":42}")).await;
    let proxy = crm_proxy(dir.path(), &up).await;
    let answer = client()
        .post(proxy.url("crm", "/v1/contacts"))
        .header("prefer", "respond-async")
        .header("content-type", "application/json")
        .header("tollgate-workflow", "enrichment")
        .body("{\"name\":\"Grace\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let location = answer.headers()["location"].to_str().unwrap().to_string();
    let id = location
        .strip_prefix("/_tollgate/jobs/")
        .unwrap()
        .to_string();
    let done = settled(&proxy, &id).await;
    assert_eq!(done["result"]["status"], 201);
    assert_eq!(done["result"]["body"]["id"], 42);
    let sent = up.seen("/v1/contacts");
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0].body[..], b"{\"name\":\"Grace\"}");
    assert!(sent[0].headers.iter().all(|(n, _)| n != "prefer"));
}

#[tokio::test(start_paused = true)]
async fn live_requests_go_ahead_of_queued_jobs_and_use_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| tollgate_testkit::upstream::ok()).await;
    // 10 a minute, 20% of it kept for live requests.
    let limits = "reserve = \"20%\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 10\n";
    let proxy = start(&with_state(dir.path(), &upstream("crm", up.addr, limits))).await;
    let base = format!("http://{}", up.addr);
    let lines: String = (0..30)
        .map(|i| {
            format!("{{\"id\":\"j{i}\",\"method\":\"GET\",\"url\":\"{base}/v1/batch/{i}\"}}\n")
        })
        .collect();
    assert_eq!(
        push(&proxy, "application/x-ndjson", lines).await.status(),
        202
    );
    // The batch takes what is above the reserve, and no more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let batch = || up.seen_under("/v1/batch/");
    // (the proxy keeps its limits a little inside the profile: 9 a window)
    let first_window = batch();
    assert!((6..=8).contains(&first_window), "{first_window}");
    // Live requests take the reserve at once, ahead of 20-odd queued jobs.
    let started = Instant::now();
    for path in ["/v1/live/1", "/v1/live/2"] {
        let r = get(&proxy.url("crm", path), &[]).await;
        assert_eq!(r.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "live requests did not wait: {:?}",
        started.elapsed()
    );
    assert_eq!(batch(), first_window, "the reserve is not the batch's");
    // Visible: the reserve's calls, the queue and its oldest job's age.
    let metrics = scrape(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_proxy_reserve_calls_total{upstream=\"crm\"}"
        ),
        2.0
    );
    let queued = "{upstream=\"crm\",workflow=\"\"}";
    assert_eq!(
        metric(&metrics, &format!("tollgate_jobs_pending{queued}")),
        (30 - first_window) as f64
    );
    let age = metric(
        &metrics,
        &format!("tollgate_jobs_oldest_age_seconds{queued}"),
    );
    assert!((1.0..2.0).contains(&age), "{age}");
    let usage: serde_json::Value =
        serde_json::from_str(&text(&proxy.admin_url("/v1/usage")).await).expect("usage JSON");
    let crm = &usage["upstreams"][0];
    assert_eq!(crm["jobs"][0]["pending"], 30 - first_window);
    assert_eq!(crm["reserve_calls"], 2);
    // Every job is done in the end, none lost.
    assert_eq!(settled(&proxy, "j29").await["status"], "done");
    assert_eq!(batch(), 30);
    let metrics = scrape(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_jobs_finished_total{upstream=\"crm\",outcome=\"done\"}"
        ),
        30.0
    );
    assert!(
        !metrics.contains("tollgate_jobs_pending{"),
        "an empty queue shows no series"
    );
}

/// The proxy's /metrics (with this test's client: `common::text` builds
/// one per call, too slow to poll with).
async fn scrape(proxy: &Running) -> String {
    http()
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The value of the series named exactly so (name and labels).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(start_paused = true)]
async fn results_are_posted_to_the_callback_signed_and_retried_until_taken() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| Answer::Status(200, vec![], "{\"ok\":true}")).await;
    // The producer's receiver: down twice, then takes it; another never does.
    let receiver = scripted(|path, n| match (path, n) {
        ("/hooks/flaky", 1 | 2) => Answer::Status(503, vec![], ""),
        ("/hooks/down", _) => Answer::Status(500, vec![], ""),
        _ => Answer::Status(204, vec![], ""),
    })
    .await;
    std::env::set_var("JOBS_TEST_CALLBACK_SECRET", "s3cret");
    let config = with_state(
        dir.path(),
        &format!(
            "callback_secret_env = \"JOBS_TEST_CALLBACK_SECRET\"\n{}",
            upstream("crm", up.addr, &bucket("api", 100, "100/s"))
        ),
    );
    let proxy = start(&config).await;
    let base = format!("http://{}", up.addr);
    let hooks = format!("http://{}/hooks", receiver.addr);
    let lines = format!(
        "{{\"id\":\"a\",\"method\":\"GET\",\"url\":\"{base}/v1/a\"}}\n\
         {{\"id\":\"b\",\"method\":\"GET\",\"url\":\"{base}/v1/b\",\"callback\":\"{hooks}/down\"}}\n"
    );
    let answer = http()
        .post(format!("http://{}/_tollgate/jobs", proxy.addr))
        .header("content-type", "application/x-ndjson")
        .header("tollgate-callback", format!("{hooks}/flaky"))
        .body(lines)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    settled(&proxy, "a").await;
    settled(&proxy, "b").await;
    // 1 + 2 + 4 + 8 + 16 s of retries, and some.
    tokio::time::sleep(Duration::from_secs(40)).await;

    let flaky = receiver.seen("/hooks/flaky");
    assert_eq!(flaky.len(), 3, "taken at the third attempt");
    let last = &flaky[2];
    let header = |name: &str| {
        last.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(header("tollgate-job-id"), "a");
    assert_eq!(header("tollgate-delivery-attempt"), "3");
    let body: serde_json::Value = serde_json::from_slice(&last.body).unwrap();
    assert_eq!(body["id"], "a");
    assert_eq!(body["status"], "done");
    assert_eq!(body["result"]["status"], 200);
    assert_eq!(
        header("tollgate-signature"),
        tollgate_proxy::callback_signature(b"s3cret", &last.body)
    );
    // The other receiver never takes it: retried, then recorded, not lost.
    assert_eq!(receiver.seen("/hooks/down").len(), 6);
    let metrics = scrape(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_proxy_callbacks_total{outcome=\"delivered\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tollgate_proxy_callbacks_total{outcome=\"undelivered\"}"
        ),
        1.0
    );
    let mut counts = None;
    for _ in 0..1000 {
        real_pause().await;
        let Some(state) = tollgate_jobs::State::open_read_only(dir.path()).ok() else {
            continue;
        };
        let Ok(now) = state.callback_counts() else {
            continue;
        };
        if now.get("undelivered") == Some(&1) && now.get("delivered") == Some(&1) {
            counts = Some(now);
            break;
        }
    }
    assert!(counts.is_some(), "both outcomes are in the state");

    // A callback that is not http(s) is refused, naming the line.
    let bad = format!(
        "{{\"method\":\"GET\",\"url\":\"{base}/v1/c\",\"callback\":\"ftp://files.example/x\"}}\n"
    );
    let refused = push(&proxy, "application/x-ndjson", bad).await;
    assert_eq!(refused.status(), 400);
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(
        problem["detail"],
        "line 1: callback 'ftp://files.example/x' is not an http(s) URL with a host"
    );
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_holds_back_only_its_workflows_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| tollgate_testkit::upstream::ok()).await;
    let limits = "[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n\
                  [[upstream.budget]]\nworkflow = \"backfill\"\nshare = \"10%\"\nof = \"api\"\n";
    let proxy = start(&with_state(dir.path(), &upstream("crm", up.addr, limits))).await;
    let base = format!("http://{}", up.addr);
    let lines: String = (0..40)
        .map(|i| {
            let workflow = if i % 2 == 0 { "backfill" } else { "sync" };
            format!("{{\"id\":\"j{i}\",\"method\":\"GET\",\"url\":\"{base}/v1/{workflow}/{i}\",\"workflow\":\"{workflow}\"}}\n")
        })
        .collect();
    assert_eq!(
        push(&proxy, "application/x-ndjson", lines).await.status(),
        202
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = |prefix: &str| up.seen_under(prefix);
    // The backfill's 10% of the minute (a little less: the proxy keeps
    // inside the profile), while every sync job went.
    let backfill = sent("/v1/backfill/");
    assert!((8..=10).contains(&backfill), "{backfill}");
    assert_eq!(sent("/v1/sync/"), 20);
    let metrics = scrape(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_upstream_limit_remaining{upstream=\"crm\",limit=\"api/backfill\"}"
        ),
        0.0
    );
    let usage: serde_json::Value =
        serde_json::from_str(&text(&proxy.admin_url("/v1/usage")).await).expect("usage JSON");
    let budget = usage["upstreams"][0]["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["limit"] == "api/backfill")
        .cloned()
        .unwrap();
    assert_eq!(budget["remaining"], 0);
    // The rest go in the next minutes.
    assert_eq!(settled(&proxy, "j38").await["status"], "done");
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_workflows_jobs_wait_for_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| tollgate_testkit::upstream::ok()).await;
    let receiver = scripted(|_, _| Answer::Status(204, vec![], "")).await;
    // The test clock starts at 2026-01-01T00:00:00Z (a Thursday): the
    // enrichment window is 01:10-01:20 in Paris (UTC+1 in winter).
    let workflows = format!(
        "[[workflow]]\nname = \"enrichment\"\nstart = \"01:10\"\nend = \"01:20\"\ntimezone = \"Europe/Paris\"\ndays = [\"thu\"]\ncallback = \"http://{}/hooks\"\n",
        receiver.addr
    );
    let config = with_state(
        dir.path(),
        &format!(
            "{}{workflows}",
            upstream("crm", up.addr, &bucket("api", 100, "100/s"))
        ),
    );
    let began = Instant::now();
    let proxy = start(&config).await;
    let base = format!("http://{}", up.addr);
    let lines: String = (0..10)
        .map(|i| {
            let workflow = if i < 5 { "enrichment" } else { "sync" };
            format!("{{\"id\":\"j{i}\",\"method\":\"GET\",\"url\":\"{base}/v1/{workflow}/{i}\",\"workflow\":\"{workflow}\"}}\n")
        })
        .collect();
    assert_eq!(
        push(&proxy, "application/x-ndjson", lines).await.status(),
        202
    );
    let sent = |prefix: &str| up.seen_under(prefix);
    // The unscheduled workflow goes at once; the other waits for 00:10 UTC.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!((sent("/v1/sync/"), sent("/v1/enrichment/")), (5, 0));
    tokio::time::sleep(Duration::from_secs(597)).await;
    assert_eq!(sent("/v1/enrichment/"), 0, "not before its window");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sent("/v1/enrichment/"), 5, "all of them once it opens");
    let first = up.seen("/v1/enrichment/0")[0].at;
    assert!(
        first >= began + Duration::from_secs(600),
        "sent at the window's start"
    );
    // The workflow's callback gets their results (and not the other's).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.seen("/hooks").len(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_client_sees_only_the_jobs_it_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| Answer::Status(200, vec![], "{\"secret\":\"a's data\"}")).await;
    std::env::set_var("JOBS_TEST_TOKEN_A", "token-a");
    std::env::set_var("JOBS_TEST_TOKEN_B", "token-b");
    let config = with_state(
        dir.path(),
        &format!(
            "[[proxy.client]]\nname = \"a\"\ntoken_env = \"JOBS_TEST_TOKEN_A\"\nworkflow = \"sync\"\n\
             [[proxy.client]]\nname = \"b\"\ntoken_env = \"JOBS_TEST_TOKEN_B\"\n{}",
            upstream("crm", up.addr, &bucket("api", 100, "100/s"))
        ),
    );
    let proxy = start(&config).await;
    let job = format!(
        "{{\"id\":\"mine\",\"method\":\"GET\",\"url\":\"http://{}/v1/a\"}}",
        up.addr
    );
    let intake = format!("http://{}/_tollgate/jobs", proxy.addr);
    let without = http()
        .post(&intake)
        .header("content-type", "application/json")
        .body(job.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 401, "the intake needs a client token");
    let pushed = http()
        .post(&intake)
        .header("content-type", "application/json")
        .header("tollgate-token", "token-a")
        .body(job)
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 202);
    let ask = |token: &'static str| {
        http()
            .get(format!("{intake}/mine"))
            .header("tollgate-token", token)
            .send()
    };
    // (the outcome is committed by the state's own thread: poll for it)
    let mut a = serde_json::Value::Null;
    for _ in 0..1000 {
        a = ask("token-a").await.unwrap().json().await.unwrap();
        if a["status"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a["status"], "done");
    assert_eq!(a["result"]["body"]["secret"], "a's data");
    let b = ask("token-b").await.unwrap();
    assert_eq!(b.status(), 404, "another client's job is not shown");
    assert!(!b.text().await.unwrap().contains("a's data"));
    // Sent with client a's workflow.
    let metrics = scrape(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_jobs_finished_total{upstream=\"crm\",outcome=\"done\"}"
        ),
        1.0
    );
}

/// A live client at `rate` a second for `calls` calls through `proxy`: how
/// long each waited (on the test's clock), and its status.
async fn live_client(proxy: &Running, rate: u64, calls: u64) -> Vec<(Duration, u16)> {
    let began = Instant::now();
    let mut out = Vec::new();
    for i in 0..calls {
        tokio::time::sleep_until(began + Duration::from_millis(i * 1000 / rate)).await;
        let sent = Instant::now();
        let r = http()
            .get(proxy.url("vendor", &format!("/live/{i}")))
            .send()
            .await
            .expect("live answer");
        out.push((sent.elapsed(), r.status().as_u16()));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_live_client_beside_a_batch_waits_no_longer_and_the_batch_fills_the_rest() {
    // The vendor: a bucket of 20 refilling 200/s, enforced by a gateway the
    // proxy does not share (429 past it). The proxy: the same limit, 20% of
    // it kept for live calls.
    let limit = "[[limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"200/s\"\n";
    let clock = tollgate_store::TokioClock::starting_at(EPOCH);
    let (vendor, _gateway) = tollgate_testkit::vendor::gateway_enforcing(limit, clock).await;
    let dir = tempfile::tempdir().unwrap();
    let config = with_state(
        dir.path(),
        &upstream(
            "vendor",
            vendor,
            &format!(
                "reserve = \"20%\"\nconcurrency = 32\n{}",
                limit.replace("[[limit]]", "[[upstream.limit]]")
            ),
        ),
    );
    let proxy = start(&config).await;

    // Live alone: 20 a second for 5 s.
    let alone = live_client(&proxy, 20, 100).await;
    assert!(alone.iter().all(|(_, s)| *s == 200));
    let worst_alone = alone.iter().map(|(w, _)| *w).max().unwrap();

    // The same live client while 4,000 jobs drain.
    let jobs = 4000;
    let lines: String = (0..jobs)
        .map(|i| {
            format!(
                "{{\"id\":\"b{i}\",\"method\":\"POST\",\"url\":\"http://{vendor}/batch/{i}\"}}\n"
            )
        })
        .collect();
    let pushed = Instant::now();
    assert_eq!(
        push(&proxy, "application/x-ndjson", lines).await.status(),
        202
    );
    let live = live_client(&proxy, 20, 100).await;
    assert!(live.iter().all(|(_, s)| *s == 200));
    let worst = live.iter().map(|(w, _)| *w).max().unwrap();
    // Within one token interval (5 ms) of the live-only run.
    assert!(
        worst <= worst_alone + Duration::from_millis(5),
        "live calls waited up to {worst:?} beside the batch, {worst_alone:?} alone"
    );
    // The batch drains, with no 429 from the vendor.
    let finished = "tollgate_jobs_finished_total{upstream=\"vendor\",outcome=\"done\"}";
    let mut metrics = scrape(&proxy).await;
    while !metrics.contains(&format!("{finished} {jobs}")) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = scrape(&proxy).await;
    }
    let elapsed = pushed.elapsed().as_secs_f64();
    let calls = |outcome: &str| {
        metric(
            &metrics,
            &format!("tollgate_upstream_calls_total{{upstream=\"vendor\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(calls("429"), 0.0, "the vendor answered no 429");
    // Utilisation: the calls sent since the push (the batch and 100 live
    // ones) against what the bucket allowed (its burst, less what the
    // first live run left spent, and 200 a second).
    let sent = jobs as f64 + 100.0;
    let allowed = 20.0 + 200.0 * elapsed;
    let used = sent / allowed;
    assert!(
        used >= 0.98,
        "{sent} calls in {elapsed:.2} s: {:.1}% of what the vendor allowed",
        used * 100.0
    );
}

#[tokio::test(start_paused = true)]
async fn dead_letters_are_retried_through_the_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    // The upstream refuses the first call, then takes it.
    let up = scripted(|_, n| match n {
        1 => Answer::Status(422, vec![], "{\"error\":\"stage not ready\"}"),
        _ => Answer::Status(200, vec![], "{\"ok\":true}"),
    })
    .await;
    let proxy = crm_proxy(dir.path(), &up).await;
    let job = format!("{{\"id\":\"d1\",\"method\":\"PATCH\",\"url\":\"http://{}/v1/deals/1\",\"body\":{{\"stage\":\"won\"}}}}", up.addr);
    assert_eq!(push(&proxy, "application/json", job).await.status(), 202);
    assert_eq!(settled(&proxy, "d1").await["status"], "dead");
    let retry = |body: &'static str| {
        http()
            .post(proxy.admin_url("/v1/dlq/retry"))
            .body(body)
            .send()
    };
    let answer: serde_json::Value = retry("{\"ids\":[\"d1\",\"nope\"]}")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["requeued"], serde_json::json!(["d1"]));
    assert_eq!(answer["not_dead_letters"], serde_json::json!(["nope"]));
    // (the requeued job goes again; wait for its new outcome)
    let mut status = serde_json::Value::Null;
    for _ in 0..1000 {
        real_pause().await;
        status = status_of(&proxy, "d1").await;
        if status["status"] == "done" {
            break;
        }
    }
    assert_eq!(status["result"]["status"], 200);
    assert_eq!(up.seen("/v1/deals/1").len(), 2);
    let bad = retry("{\"id\":\"d1\"}").await.unwrap();
    assert_eq!(bad.status(), 400);
}

/// Hostile bodies at the intake: a valid batch damaged byte by byte
/// (`TOLLGATE_FUZZ_CASES` cases, 256 by default). Every answer is a 202 or
/// a refusal that says why (never a 5xx), nothing queued goes anywhere but
/// the configured upstream, and the proxy keeps serving.
#[tokio::test(start_paused = true)]
async fn hostile_batches_are_queued_or_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let up = scripted(|_, _| tollgate_testkit::upstream::ok()).await;
    let proxy = start(&with_state(
        dir.path(),
        &upstream("crm", up.addr, &bucket("api", 1000, "1000/s")),
    ))
    .await;
    let base = format!("http://{}", up.addr);
    let valid = format!(
        "{{\"id\":\"a\",\"method\":\"POST\",\"url\":\"{base}/v1/a\",\"body\":{{\"n\":1}},\"workflow\":\"w\"}}\n\
         {{\"method\":\"GET\",\"url\":\"{base}/v1/b?x=%20\",\"headers\":{{\"x-t\":\"1\"}},\"callback\":\"http://127.0.0.1:9/h\"}}\n"
    );
    let cases: u64 = std::env::var("TOLLGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    // (a small xorshift: the same damage on every run)
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    const PIECES: &[&[u8]] = &[
        b"\"",
        b"{",
        b"}",
        b":",
        b"\n",
        b"\\",
        b"\xff",
        b"\0",
        b"http://elsewhere.example/",
        b"%",
    ];
    for case in 0..cases {
        let mut body = valid.clone().into_bytes();
        for _ in 0..(1 + next() % 4) {
            let at = (next() as usize) % body.len();
            match next() % 3 {
                0 => {
                    body.remove(at);
                }
                1 => body
                    .splice(
                        at..at,
                        PIECES[(next() as usize) % PIECES.len()].iter().copied(),
                    )
                    .for_each(drop),
                _ => body[at] = PIECES[(next() as usize) % PIECES.len()][0],
            }
        }
        let answer = http()
            .post(format!("http://{}/_tollgate/jobs", proxy.addr))
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
            .expect("an answer");
        let status = answer.status().as_u16();
        let text = answer.text().await.expect("text");
        assert!(
            matches!(status, 202 | 400 | 409),
            "case {case}: {status} {text} for {:?}",
            String::from_utf8_lossy(&body)
        );
        if status != 202 {
            let problem: serde_json::Value = serde_json::from_str(&text).expect("problem+json");
            assert!(
                !problem["detail"].as_str().unwrap_or("").is_empty(),
                "{text}"
            );
        }
    }
    // The proxy still serves (and sends what it accepted).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get(&proxy.url("crm", "/v1/alive"), &[]).await.status(), 200);
}
