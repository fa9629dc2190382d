//! Alerts reach their receivers: a webhook receiver on loopback (one that
//! takes JSON, one that takes Slack's shape) gets each alert once when it
//! fires and once when it resolves, and a receiver that fails is retried.
//! Time is the scrape time given to `tick` (no sleeping for thresholds);
//! only the retry waits are real, and short.

use std::time::Duration;
use tollgate_http::webhook::Retries;
use tollgate_testkit::upstream::{scripted_seen, Answer};
use tollgate_watch::dashboard::Face;
use tollgate_watch::settings::WatchSettings;
use tollgate_watch::Watch;

const T0: i64 = 1_800_000_000;

fn queue(depth: u64) -> String {
    format!(
        "# TYPE tollgate_jobs_pending gauge\ntollgate_jobs_pending{{upstream=\"crm\"}} {depth}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_alert_reaches_every_receiver_once_fired_once_resolved_through_failures() {
    // Every first attempt of a payload fails: the receiver is down.
    let receiver = scripted_seen(|seen, _| {
        let attempt = seen
            .headers
            .iter()
            .find(|(k, _)| k == "tollgate-delivery-attempt")
            .map(|(_, v)| v.as_str());
        if attempt == Some("1") {
            Answer::Status(503, vec![], "down")
        } else {
            Answer::Status(200, vec![], "ok")
        }
    })
    .await;
    let settings = WatchSettings::parse(
        &format!(
            "[[alerts.webhook]]\nurl = \"http://{0}/json\"\n\
             [[alerts.webhook]]\nurl = \"http://{0}/slack\"\nformat = \"slack\"\n",
            receiver.addr
        ),
        &|_| None,
    )
    .expect("settings");
    let watch = Watch::open(Face::Run, &settings, None, Default::default(), T0)
        .expect("watch")
        .with_retries(Retries {
            attempts: 3,
            first_wait: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        })
        .expect("retries");

    let mut events = Vec::new();
    for (i, depth) in [10, 1_500, 1_200, 950, 1_010, 500].into_iter().enumerate() {
        events.extend(watch.tick(T0 + 10 * i as i64, || queue(depth)));
    }
    let shown: Vec<(&str, i64)> = events.iter().map(|e| (e.status, e.at)).collect();
    assert_eq!(shown, vec![("firing", T0 + 10), ("resolved", T0 + 50)]);

    // Each payload: a failed attempt, then a taken one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while receiver.seen_under("/") < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "payloads did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        receiver.seen_under("/"),
        8,
        "no payload sent more than it needed"
    );
    let taken = |path: &str| -> Vec<serde_json::Value> {
        receiver
            .seen(path)
            .iter()
            .filter(|s| {
                s.headers
                    .iter()
                    .any(|(k, v)| k == "tollgate-delivery-attempt" && v == "2")
            })
            .map(|s| serde_json::from_slice(&s.body).expect("JSON"))
            .collect()
    };
    let mut json = taken("/json");
    json.sort_by_key(|v| v["at"].as_i64());
    assert_eq!(json.len(), 2);
    assert_eq!(json[0]["alert"], "queue_depth");
    assert_eq!(json[0]["subject"], "crm");
    assert_eq!(json[0]["status"], "firing");
    assert_eq!(json[0]["severity"], "warning");
    assert_eq!(json[0]["value"], 1500.0);
    assert_eq!(json[0]["threshold"], 1000.0);
    assert_eq!(json[1]["status"], "resolved");
    let slack: Vec<String> = taken("/slack")
        .iter()
        .map(|v| v["text"].as_str().expect("text").to_string())
        .collect();
    assert_eq!(slack.len(), 2);
    assert!(
        slack.iter().any(|t| t.contains(
            "[warning] queue_depth crm: 1500 pending jobs not yet final (above 1000 pending)"
        )),
        "{slack:?}"
    );
    assert!(
        slack
            .iter()
            .any(|t| t.starts_with(":white_check_mark: tollgate: resolved: queue_depth crm")),
        "{slack:?}"
    );

    let alerts = watch.alerts_json();
    assert_eq!(alerts["active"].as_array().map(Vec::len), Some(0));
    assert_eq!(alerts["recent"].as_array().map(Vec::len), Some(2));
}
