//! The dashboard of each face as people see it: headless Chromium (Debian's
//! `chromium`; scripts/test.sh installs it) loads `/` of a running `serve`,
//! `proxy` and `run --admin` with real traffic, behind the admin token. What
//! the charts draw (their data attributes) must equal what `/metrics`
//! counted; the page must fetch nothing from anywhere; a restart must keep
//! the history.

mod common;

use common::{http, write, Running, Upstream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_testkit::free_port;

const TOKEN: &str = "dashboard-test-token";

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tollgate-dashboard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn start(args: &[&str], admin: &str) -> Running {
    let running = Running(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tollgate"),
    );
    common::ready(admin);
    running
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// `/metrics`: the sum of the samples named `name` whose labels include
/// every one of `labels` (`key="value"`).
fn metric(admin: &str, name: &str, labels: &[&str]) -> f64 {
    let (status, text) = http(admin, "GET", "/metrics", &[("Authorization", &bearer())]);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!("headless Chromium is needed for the dashboard tests: scripts/test.sh installs Debian's chromium");
}

/// Chromium's DOM of `admin`'s dashboard at `query`, the token sent as a
/// browser sends it (the password of Basic auth), after checking that every
/// request the page made went to the admin listener; a screenshot is saved
/// at `screenshot`.
fn browse(admin: &str, query: &str, screenshot: &Path) -> String {
    load(&format!("http://{admin}/{query}"), screenshot)
}

/// Chromium's DOM of the page at `url`, after checking that it fetched
/// nothing else; a screenshot at `screenshot`.
fn load(url: &str, screenshot: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browse.py");
    let out = Command::new("python3")
        .arg(script)
        .args([chromium(), url, TOKEN])
        .arg(screenshot)
        .output()
        .expect("run tests/browse.py");
    assert!(
        out.status.success(),
        "browse.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).expect("browse.py's JSON");
    let requests: Vec<&str> = page["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert_eq!(requests, vec![url], "the page fetched only itself");
    assert!(
        std::fs::metadata(screenshot).is_ok_and(|m| m.len() > 1000),
        "no screenshot at {}",
        screenshot.display()
    );
    page["dom"].as_str().expect("dom").to_string()
}

/// The `data-total` of series `series` in chart `chart` of a page's DOM.
fn total(dom: &str, chart: &str, series: &str) -> f64 {
    let start = dom
        .find(&format!("data-chart=\"{chart}\""))
        .unwrap_or_else(|| panic!("no chart {chart} in the page"));
    let end = dom[start..].find("</svg>").map_or(dom.len(), |e| start + e);
    let part = &dom[start..end];
    let at = format!("data-series=\"{series}\" data-total=\"");
    part.find(&at)
        .and_then(|i| part[i + at.len()..].split('"').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn assert_protected(admin: &str) {
    let (status, text) = http(admin, "GET", "/", &[]);
    assert_eq!(status, 401, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "a browser is asked for the token: {text}"
    );
    let (status, _) = http(admin, "GET", "/", &[("Authorization", "Bearer wrong")]);
    assert_eq!(status, 401);
    let (status, _) = http(admin, "GET", "/v1/alerts", &[]);
    assert_eq!(status, 401);
}

#[test]
fn the_proxy_dashboard_draws_what_its_metrics_count_and_keeps_it_across_a_restart() {
    let dir = temp_dir("proxy");
    let vendor = Upstream::start();
    let (listen, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let config = write(
        &dir,
        "proxy.toml",
        &format!(
            "[proxy]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\naccess_log = \"off\"\nstate = \"{}\"\n\
             [history]\nevery = \"1s\"\n\
             [[upstream]]\nname = \"crm\"\nbase_url = \"http://{}\"\nmax_attempts = 1\n\
             [[upstream.limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nquota = 1000\nevery = \"1d\"\n",
            dir.join("state").display(),
            vendor.addr
        ),
    );
    let args = ["proxy", "--config", config.as_str()];
    let running = start(&args, &admin);
    assert_protected(&admin);
    for i in 0..12 {
        let path = if i % 4 == 0 {
            format!("/crm/bad/{i}")
        } else {
            format!("/crm/v1/contacts/{i}")
        };
        http(&listen, "GET", &path, &[]);
    }
    let calls = metric(
        &admin,
        "tollgate_upstream_calls_total",
        &["upstream=\"crm\""],
    );
    let bad = metric(
        &admin,
        "tollgate_upstream_calls_total",
        &["upstream=\"crm\"", "outcome=\"4xx\""],
    );
    assert_eq!((calls, bad), (12.0, 3.0));

    let dom = browse(&admin, "?range=1h", &dir.join("proxy.png"));
    assert_eq!(total(&dom, "calls", "crm"), calls, "calls per upstream");
    assert_eq!(total(&dom, "errors", "crm 4xx"), bad, "errors by type");
    let quota = metric(
        &admin,
        "tollgate_upstream_limit_quota",
        &["limit=\"daily\""],
    );
    let remaining = metric(
        &admin,
        "tollgate_upstream_limit_remaining",
        &["limit=\"daily\""],
    );
    assert!(
        quota >= 900.0 && quota - remaining == 12.0,
        "{quota} {remaining}"
    );
    assert!(
        dom.contains(&format!(
            "data-series=\"crm daily\" data-used=\"{}\" data-of=\"{quota}\"",
            quota - remaining
        )),
        "quota used of the daily limit"
    );
    assert!(!dom.contains("<script"), "a page without script");

    // A restart: the counters start again from 0, the charts do not.
    drop(running);
    let _running = start(&args, &admin);
    assert_eq!(
        metric(
            &admin,
            "tollgate_upstream_calls_total",
            &["upstream=\"crm\""]
        ),
        0.0
    );
    let dom = browse(&admin, "?range=1h", &dir.join("proxy-restarted.png"));
    assert_eq!(
        total(&dom, "calls", "crm"),
        calls,
        "history kept across the restart"
    );
    let dom48 = browse(&admin, "", &dir.join("proxy-48h.png"));
    assert_eq!(total(&dom48, "calls", "crm"), calls, "and by the hour");
}

#[test]
fn the_gateway_dashboard_draws_its_denials_and_its_busiest_keys() {
    let dir = temp_dir("serve");
    let config = write(
        &dir,
        "serve.toml",
        &format!(
            "[history]\npath = \"{}\"\nevery = \"1s\"\n\
             [[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = \"1/min\"\n\
             [[limit]]\nname = \"per-token\"\nkey = [\"header:authorization\"]\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"1/min\"\n",
            dir.join("history.sqlite").display()
        ),
    );
    let mut child = common::serve_command(Path::new(&config))
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .spawn()
        .expect("spawn serve");
    let (proxy, admin) = common::wait_serving(&mut child);
    let _running = Running(child);
    assert_protected(&admin);
    for _ in 0..8 {
        let acme = [
            ("x-tenant", "acme"),
            ("authorization", "Bearer secret-acme"),
        ];
        http(&proxy, "GET", "/v1/jobs", &acme);
    }
    for _ in 0..2 {
        let globex = [
            ("x-tenant", "globex"),
            ("authorization", "Bearer secret-globex"),
        ];
        http(&proxy, "GET", "/v1/jobs", &globex);
    }
    let denied = metric(&admin, "tollgate_responses_total", &["code=\"429\""]);
    let ok = metric(&admin, "tollgate_responses_total", &["code=\"200\""]);
    assert_eq!((ok, denied), (7.0, 3.0));
    let denials = metric(
        &admin,
        "tollgate_decisions_total",
        &["limit=\"tenant\"", "outcome=\"denied\""],
    );

    let dom = browse(&admin, "?range=1h&key=acme", &dir.join("serve.png"));
    assert_eq!(total(&dom, "requests", "429"), denied);
    assert_eq!(total(&dom, "requests", "2xx"), ok);
    assert_eq!(total(&dom, "denials", "tenant"), denials);
    assert!(
        dom.contains("data-limit=\"tenant\" data-key=\"acme\" data-used=\"5\" data-of=\"5\""),
        "acme is the busiest key"
    );
    let acme = dom.find("data-key=\"acme\"").expect("acme listed");
    let globex = dom.find("data-key=\"globex\"").expect("globex listed");
    assert!(acme < globex, "most used first");
    assert!(
        dom.contains("data-series=\"tenant (0 requests left)\""),
        "the key searched"
    );
    // A key taken from a credential header is shown as a digest, never as it is.
    assert!(
        dom.contains("data-limit=\"per-token\" data-key=\"sha256:"),
        "the token's key listed"
    );
    assert!(
        !dom.contains("secret-acme") && !dom.contains("secret-globex"),
        "a client token on the page"
    );
}

#[test]
fn the_run_dashboard_shows_the_run_while_it_runs() {
    let dir = temp_dir("run");
    let vendor = Upstream::start();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = write(
        &dir,
        "run.toml",
        &format!(
            "[history]\nevery = \"1s\"\n\
             [[upstream]]\nname = \"erp\"\nbase_url = \"http://{}\"\nmax_attempts = 1\n\
             [[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 4\nrefill = \"1/min\"\n",
            vendor.addr
        ),
    );
    let jobs: String = (0..10)
        .map(|n| format!("{{\"id\":\"j{n}\",\"method\":\"POST\",\"url\":\"http://{}/v1/orders/{n}\",\"body\":{{}}}}\n", vendor.addr))
        .collect();
    let jobs = write(&dir, "jobs.jsonl", &jobs);
    let state = dir.join("state");
    let _running = start(
        &[
            "run",
            "--config",
            config.as_str(),
            "--jobs",
            jobs.as_str(),
            "--state",
            state.to_str().expect("utf8"),
            "--admin",
            admin.as_str(),
            "--progress",
            "quiet",
        ],
        &admin,
    );
    assert_protected(&admin);
    // The bucket's first calls go at once (the runner keeps a margin below
    // the published 4); the next is a minute away.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &admin,
        "tollgate_upstream_calls_total",
        &["upstream=\"erp\""],
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the run did not send its first calls: {}",
            http(&admin, "GET", "/metrics", &[("Authorization", &bearer())]).1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let calls = metric(
        &admin,
        "tollgate_upstream_calls_total",
        &["upstream=\"erp\""],
    );
    let pending = metric(&admin, "tollgate_jobs_pending", &["upstream=\"erp\""]);
    assert!((1.0..=4.0).contains(&calls), "{calls}");
    assert_eq!(pending, 10.0 - calls);
    let dom = browse(&admin, "?range=1h", &dir.join("run.png"));
    assert_eq!(total(&dom, "calls", "erp"), calls);
    assert!(
        dom.contains(&format!("id=\"tile-pending\"><b>{pending}</b>")),
        "jobs pending now"
    );
    assert!(
        state.join(tollgate_watch::HISTORY_FILE).exists(),
        "history kept in the run's state"
    );
}

/// `promtool` (Debian's prometheus; scripts/test.sh installs it).
fn promtool() -> &'static str {
    assert!(
        Command::new("promtool")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "promtool is needed: scripts/test.sh installs Debian's prometheus"
    );
    "promtool"
}

#[test]
fn the_alerts_as_prometheus_rules_pass_promtool_for_every_example_and_a_custom_alert() {
    let dir = temp_dir("rules");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&examples)
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    configs.push(PathBuf::from(write(
        &dir,
        "custom.toml",
        "[[upstream]]\nname = \"crm\"\nbase_url = \"https://api.example.com\"\n\
         [[upstream.limit]]\nname = \"day\"\nalgorithm = \"fixed_window\"\nquota = 250000\nevery = \"1d\"\n\
         [[alert]]\nname = \"queue_depth\"\nwarning = 50\ncritical = 500\n\
         [[alert]]\nname = \"live_waiting\"\nmetric = \"tollgate_proxy_waiting\"\nby = \"upstream\"\nwarning = 20\n",
    )));
    for config in &configs {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["alerts", "rules", "--config"])
            .arg(config)
            .output()
            .expect("run tollgate alerts rules");
        assert!(
            out.status.success(),
            "{}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let rules = dir.join("rules.yml");
        std::fs::write(&rules, &out.stdout).expect("write rules");
        let check = Command::new(promtool())
            .args(["check", "rules"])
            .arg(&rules)
            .output()
            .expect("run promtool");
        assert!(
            check.status.success(),
            "{}: promtool: {}{}",
            config.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if config.ends_with("custom.toml") {
            assert!(
                text.contains("expr: \"(sum by (upstream) (tollgate_jobs_pending)) > 50\""),
                "{text}"
            );
            assert!(
                text.contains("limit=\\\"day\\\""),
                "the daily limit's quota alert: {text}"
            );
            assert!(text.contains("alert: TollgateLiveWaiting"), "{text}");
        }
    }
}

#[test]
fn the_grafana_dashboard_is_a_dashboard_model_over_tollgate_metrics() {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["dashboard", "grafana"])
        .output()
        .expect("run tollgate dashboard grafana");
    assert!(out.status.success());
    let model: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let panels = model["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    for p in panels {
        assert!(p["title"].is_string() && p["gridPos"]["w"].is_number());
        let expr = p["targets"][0]["expr"].as_str().expect("a query");
        assert!(expr.contains("tollgate_"), "{expr}");
    }
}

#[test]
fn simulate_and_plan_reports_draw_what_they_count() {
    let dir = temp_dir("reports");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let report = dir.join("replay.html");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["simulate", "--config"])
        .arg(examples.join("quickstart.toml"))
        .arg("--trace")
        .arg(examples.join("quickstart.jsonl"))
        .arg("--summary")
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run simulate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --summary's line for the first limit: "tenant (all keys) A H D".
    let text = String::from_utf8_lossy(&out.stdout);
    let tenant: Vec<f64> = text
        .lines()
        .find(|l| l.starts_with("tenant ") && l.contains("(all keys)"))
        .expect("the tenant line")
        .split_whitespace()
        .rev()
        .take(3)
        .map(|n| n.parse().expect("a count"))
        .collect();
    let dom = load(
        &format!("file://{}", report.display()),
        &dir.join("replay.png"),
    );
    assert_eq!(total(&dom, "limit-0", "denied"), tenant[0]);
    assert_eq!(total(&dom, "limit-0", "held"), tenant[1]);
    assert_eq!(total(&dom, "limit-0", "admitted"), tenant[2]);
    assert!(
        dom.contains("data-limit=\"tenant\" data-key=\"acme\""),
        "acme among the busiest"
    );
    assert!(
        dom.contains("data-limit=\"daily\" data-ran-out=\"\""),
        "the daily quota never ran out"
    );

    let config = write(
        &dir,
        "plan.toml",
        "[[upstream]]\nname = \"crm\"\nbase_url = \"https://api.example.com\"\n\
         [[upstream.limit]]\nname = \"burst\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n\
         [[workflow]]\nname = \"nightly\"\n",
    );
    let jobs: String = (0..300)
        .map(|n| {
            let workflow = if n % 3 == 0 { ",\"workflow\":\"nightly\"" } else { "" };
            format!("{{\"id\":\"j{n}\",\"method\":\"GET\",\"url\":\"https://api.example.com/v1/items/{n}\"{workflow}}}\n")
        })
        .collect();
    let jobs = write(&dir, "jobs.jsonl", &jobs);
    let report = dir.join("plan.html");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "plan",
            "--config",
            config.as_str(),
            "--jobs",
            jobs.as_str(),
            "--report",
        ])
        .arg(&report)
        .output()
        .expect("run plan");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = load(
        &format!("file://{}", report.display()),
        &dir.join("plan.png"),
    );
    assert!(dom.contains("data-upstream=\"crm\" data-calls=\"300\""));
    assert_eq!(total(&dom, "upstream-0", "nightly"), 100.0);
    assert_eq!(total(&dom, "upstream-0", "(no workflow)"), 200.0);
}

#[test]
fn check_names_a_bad_alert_by_line_and_field_and_notes_an_unset_webhook_url() {
    let dir = temp_dir("check");
    let base = "[[upstream]]\nname = \"crm\"\nbase_url = \"https://api.example.com\"\n\
                [[upstream.limit]]\nname = \"day\"\nalgorithm = \"fixed_window\"\nquota = 10\nevery = \"1d\"\n\
                [[alerts.webhook]]\nurl_env = \"TOLLGATE_TEST_UNSET_WEBHOOK\"\nformat = \"slack\"\n";
    let check = |text: &str| {
        let config = write(&dir, "check.toml", text);
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check", config.as_str()])
            .env_remove("TOLLGATE_TEST_UNSET_WEBHOOK")
            .output()
            .expect("run tollgate check")
    };
    let ok = check(base);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shown = String::from_utf8_lossy(&ok.stdout);
    assert!(
        shown.contains(
            "alerts: quota_used, rate_429, queue_depth, dead_letters, latency; 1 webhook(s)"
        ),
        "{shown}"
    );
    assert!(
        shown.contains("TOLLGATE_TEST_UNSET_WEBHOOK is not set"),
        "{shown}"
    );
    let bad = check(&format!(
        "{base}[[alert]]\nname = \"queue_depth\"\nwarning = -1\n"
    ));
    assert!(!bad.status.success());
    let error = String::from_utf8_lossy(&bad.stderr);
    assert!(
        error.contains(
            "line 12: [[alert]] 'queue_depth' warning: must be a number 0 or above, not -1"
        ),
        "{error}"
    );
}
