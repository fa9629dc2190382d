//! `tollgate run --admin ADDR`: a run's own admin listener, open for the
//! length of the run, with Prometheus text at `/metrics` (behind the admin
//! token when one is set). Real time and real sockets on 127.0.0.1.

use std::time::Duration;
use tollgate_egress::state::State;
use tollgate_egress::Options;
use tollgate_store::TokioClock;
use tollgate_testkit::free_port;
use tollgate_testkit::upstream::{ok, scripted, Answer};

/// The value of the series named exactly so, if it is there.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_shows_its_calls_queue_and_outcomes_while_it_lasts() {
    let up = scripted(|path, _| match path.starts_with("/v1/bad/") {
        true => Answer::Status(404, vec![], "{\"error\":\"no such item\"}"),
        false => ok(),
    })
    .await;
    let config = tollgate_egress::parse_config(
        &format!(
            "[[upstream]]\nname = \"crm\"\nbase_url = \"http://{}\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 1\nrefill = \"20/s\"\n",
            up.addr
        ),
        &tollgate_core::NoProfiles,
        &|_| None,
    )
    .expect("config");
    let lines: String = (0..30)
        .map(|i| {
            let kind = if i % 10 == 9 { "bad" } else { "ok" };
            format!(
                "{{\"method\":\"GET\",\"url\":\"http://{}/v1/{kind}/{i}\"}}\n",
                up.addr
            )
        })
        .collect();
    let routed = tollgate_egress::read_jobs(lines.as_bytes(), &config).expect("jobs");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut state = State::open(dir.path()).expect("state");
    state.import(&routed, &config).expect("import");
    let admin = format!("127.0.0.1:{}", free_port());
    let options = Options {
        progress: tollgate_egress::ProgressMode::Quiet,
        admin: Some(admin.parse().expect("addr")),
        admin_token: Some("adm1n".into()),
        ..Options::default()
    };
    let running = tollgate_egress::run(
        &config,
        &state,
        TokioClock::system(),
        options,
        std::future::pending(),
    );
    // (scraped beside the run, in the same task: a run's state is its own)
    let scrape = async {
        // Mid-run: 30 calls at 20 a second take 1.5 s.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let healthz = client
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .expect("healthz");
        let refused = client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .expect("metrics");
        let text = client
            .get(format!("http://{admin}/metrics"))
            .bearer_auth("adm1n")
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        (healthz.status().as_u16(), refused.status().as_u16(), text)
    };
    let (summary, (healthz, refused, text)) = tokio::join!(running, scrape);
    let summary = summary.expect("run");
    assert_eq!(healthz, 200, "no token needed for /healthz");
    assert_eq!(refused, 401, "/metrics needs the admin token");
    let pending = metric(&text, "tollgate_jobs_pending{upstream=\"crm\"}").expect("pending");
    assert!((1.0..30.0).contains(&pending), "{pending}\n{text}");
    let age = metric(&text, "tollgate_jobs_oldest_age_seconds{upstream=\"crm\"}").expect("age");
    assert!(age >= 0.5, "{age}");
    let ok_calls = metric(
        &text,
        "tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"}",
    )
    .expect("2xx calls");
    assert!(ok_calls >= 1.0, "{text}");
    assert_eq!(
        metric(&text, "tollgate_upstream_breaker_open{upstream=\"crm\"}"),
        Some(0.0)
    );
    let done = metric(
        &text,
        "tollgate_jobs_finished_total{upstream=\"crm\",outcome=\"done\"}",
    )
    .expect("done");
    let timed = metric(&text, "tollgate_job_seconds_count{upstream=\"crm\"}").expect("latency");
    assert!(done >= 1.0 && timed >= done, "{text}");
    assert!(
        metric(&text, "tollgate_upstream_limits_rate{upstream=\"crm\"}").is_some_and(|r| r > 19.0),
        "{text}"
    );
    // Quota used against the limit: the bucket is spent while the run goes.
    assert_eq!(
        metric(
            &text,
            "tollgate_upstream_limit_quota{upstream=\"crm\",limit=\"api\"}"
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &text,
            "tollgate_upstream_limit_remaining{upstream=\"crm\",limit=\"api\"}"
        )
        .is_some_and(|r| r <= 1.0),
        "{text}"
    );

    assert_eq!((summary.done(), summary.dead()), (27, 3));
    // The listener lives as long as the run.
    assert!(
        std::net::TcpStream::connect(&admin).is_err(),
        "the admin listener closes with the run"
    );
}
