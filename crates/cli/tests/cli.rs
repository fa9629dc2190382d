//! Runs the built `tollgate` binary on example configs and traces.

mod common;
use common::http;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run tollgate")
}

fn tollgate_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// `tollgate simulate --config CONFIG --trace -` on `trace`: it must succeed;
/// its decisions, one JSON value per line.
fn simulate_stdin(config: &Path, trace: &str) -> Vec<serde_json::Value> {
    let config = config.to_str().expect("utf8 path");
    let out = tollgate_stdin(&["simulate", "--config", config, "--trace", "-"], trace);
    assert!(out.status.success(), "{}", text(&out.stderr));
    json_lines(&text(&out.stdout))
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

/// `--version` names the release and the commit (git's, in a checkout).
#[test]
fn version_names_the_commit() {
    let out = tollgate(&["--version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=10", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    assert_eq!(
        text.trim(),
        format!("tollgate {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

/// `check` says which limits are leased, and how.
#[test]
fn check_names_leased_limits() {
    let config = temp_file(
        "leased.toml",
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n\n[[limit]]\nname = \"hot\"\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"100/s\"\nlease = { max = 10, ttl = \"1s\" }\n",
    );
    let out = tollgate(&["check", config.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hot (token_bucket, leased in slices of 10 for 1000 ms)"),
        "{text}"
    );
}

#[test]
fn check_accepts_the_examples() {
    for config in [
        "examples/quickstart.toml",
        "examples/design.toml",
        "examples/runner.toml",
        "examples/proxy.toml",
    ] {
        // (as a path, or with --config as the other commands take it)
        for args in [vec!["check", config], vec!["check", "--config", config]] {
            let out = tollgate(&args);
            assert!(out.status.success(), "{config}: {}", text(&out.stderr));
            assert!(
                text(&out.stdout).starts_with(&format!("{config}: ok")),
                "{}",
                text(&out.stdout)
            );
        }
    }
}

#[test]
fn check_reads_a_proxy_config_and_names_what_is_wrong() {
    let out = tollgate(&["check", "examples/proxy.toml"]);
    let said = text(&out.stdout);
    assert!(
        said.contains("proxy on 127.0.0.1:7070 (admin 127.0.0.1:9091), requests wait up to 30.0s, 0 client(s)"),
        "{said}"
    );
    let open = temp_file(
        "open-proxy.toml",
        "[proxy]\nlisten = \"0.0.0.0:7070\"\n[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n",
    );
    let out = tollgate(&["check", open.to_str().expect("utf8 path")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("line 1: proxy listen 0.0.0.0:7070 is not a loopback address: add [[proxy.client]] entries"),
        "{}",
        text(&out.stderr)
    );
    let http_intercept = temp_file(
        "intercept.toml",
        "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9\"\nintercept = true\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n",
    );
    let out = tollgate(&["check", http_intercept.to_str().expect("utf8 path")]);
    assert!(
        text(&out.stderr)
            .contains("line 4: upstream 'crm': intercept = true is for https upstreams"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn proxy_ca_init_writes_the_ca_and_keeps_its_key_private() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_str().expect("utf8 path");
    let out = tollgate(&["proxy", "ca", "init", "--dir", dir_text]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ca.pem   give this certificate to your clients to trust"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca-key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = tollgate(&["proxy", "ca", "init", "--dir", dir_text]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already holds a CA"),
        "{}",
        text(&again.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_names_file_line_limit_and_field() {
    let bad = temp_file(
        "bad.toml",
        "[[limit]]\nname = \"tenant\"\nalgorithm = \"token_bucket\"\ncapacity = 60\nrefill = \"10/sec\"\n",
    );
    let out = tollgate(&["check", bad.to_str().expect("utf8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "bad.toml:5: limit 'tenant': refill '10/sec' is not a rate; use N/s, N/min, N/h, N/d"
        ),
        "{err}"
    );
    assert!(!err.contains("panicked"));

    let syntax = temp_file("syntax.toml", "[[limit]]\nname = \"x\"\nalgorithm = \n");
    let out = tollgate(&["check", syntax.to_str().expect("utf8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("syntax.toml:3:"),
        "{}",
        text(&out.stderr)
    );

    let out = tollgate(&["check", "no/such/file.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read config no/such/file.toml"));
}

const EXACT: &str = "[[limit]]\nname = \"t\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/s\"\n";

#[test]
fn simulate_is_exact_and_in_input_order() {
    let config = temp_file("exact.toml", EXACT);
    let trace = "\
{\"t\": 0, \"headers\": {\"x-tenant-id\": \"a\"}}
{\"t\": 0, \"headers\": {\"X-Tenant-Id\": \"a\"}}
{\"t\": 0, \"headers\": {\"x-tenant-id\": \"a\"}}
{\"t\": 0.5, \"headers\": {\"x-tenant-id\": \"a\"}}
{\"t\": 0.5, \"headers\": {\"x-tenant-id\": \"b\"}}
{\"t\": 1.0, \"headers\": {\"x-tenant-id\": \"a\"}}
";
    let lines = simulate_stdin(&config, trace);
    let allowed: Vec<bool> = lines
        .iter()
        .map(|l| l["allowed"].as_bool().expect("allowed"))
        .collect();
    assert_eq!(allowed, [true, true, false, false, true, true]);
    assert_eq!(lines[2]["retry_after"], 1.0);
    assert_eq!(lines[2]["limit"], "t");
    assert_eq!(lines[3]["retry_after"], 0.5);
    assert_eq!(lines[4]["remaining"]["t"], 1);
    assert_eq!(lines[5]["remaining"]["t"], 0);
    assert_eq!(lines[0]["t"], 0.0);
    assert_eq!(lines[0]["delay"], 0.0);
    assert_eq!(lines[0]["limit"], serde_json::Value::Null);
}

#[test]
fn simulate_reports_holds_and_summary() {
    // The summary goes to stdout, the decisions to --out: they must agree.
    let decisions = temp_file("quickstart-out.jsonl", "");
    let out = tollgate(&[
        "simulate",
        "--config",
        "examples/quickstart.toml",
        "--trace",
        "examples/quickstart.jsonl",
        "--summary",
        "--out",
        decisions.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(summary.starts_with("requests 400: admitted "), "{summary}");
    for name in ["tenant", "daily", "in-flight", "acme", "globex"] {
        assert!(summary.contains(name), "summary lacks {name}: {summary}");
    }
    let written = std::fs::read_to_string(&decisions).expect("decisions written");
    let decided = json_lines(&written);
    let held = decided
        .iter()
        .filter(|d| d["allowed"] == true && d["delay"].as_f64() > Some(0.0))
        .count();
    let denied = decided.iter().filter(|d| d["allowed"] == false).count();
    // A held request waits no longer than the 1 s hold of the 'tenant' limit.
    assert!(decided
        .iter()
        .all(|d| d["delay"].as_f64().is_some_and(|x| x <= 1.0)));
    assert_eq!(written.lines().count(), 400);
    assert!(
        held > 0 && denied > 0,
        "the quickstart shows holds ({held}) and denials ({denied})"
    );
    let first = text(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .unwrap_or_default();
    assert!(first.contains(&format!("held {held}")), "{first}");
    assert!(first.contains(&format!("denied {denied}")), "{first}");
}

#[test]
fn malformed_trace_lines_name_the_line() {
    let config = temp_file("exact2.toml", EXACT);
    let config = config.to_str().expect("utf8");
    let cases = [
        (
            "{\"t\": 0}\n{\"t\": \"soon\"}\n",
            "trace line 2: t must be a number of seconds >= 0, got \"soon\"",
        ),
        (
            "{\"t\": 1}\n\n{\"t\": 0.5}\n",
            "trace line 3: t 0.5 is before the previous line's 1; the trace must be sorted by t",
        ),
        (
            "{\"t\": 0, \"headerz\": {}}\n",
            "trace line 1: unknown field `headerz`",
        ),
        (
            "{\"t\": 0, \"latency\": -1}\n",
            "trace line 1: latency must be seconds between 0 and 1000000000, got -1",
        ),
        ("not json\n", "trace line 1: expected ident"),
        (
            "{\"t\": 0, \"headers\": {\"x\": 1}}\n",
            "trace line 1: invalid type: integer `1`, expected a string",
        ),
    ];
    for (trace, expected) in cases {
        let out = tollgate_stdin(&["simulate", "--config", config, "--trace", "-"], trace);
        assert_eq!(out.status.code(), Some(1), "{trace:?}");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "for {trace:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn request_errors_are_reported_per_line_not_fatal() {
    let config = temp_file(
        "reject.toml",
        "[[limit]]\nname = \"t\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = \"1/s\"\nmissing_key = \"reject\"\ncost = { header = \"x-cost\" }\n",
    );
    let trace = "{\"t\": 0}\n{\"t\": 0, \"headers\": {\"x-tenant-id\": \"a\", \"x-cost\": \"9\"}}\n{\"t\": 0, \"headers\": {\"x-tenant-id\": \"a\", \"x-cost\": \"2\"}}\n";
    let lines = simulate_stdin(&config, trace);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["error"], "limit 't': the request has no header:x-tenant-id, and the limit rejects requests without it");
    assert_eq!(
        lines[1]["error"],
        "limit 't': a cost of 9 can never fit (the most it admits is 5)"
    );
    assert_eq!(lines[1]["retry_after"], serde_json::Value::Null);
    assert_eq!(lines[2]["allowed"], true);
    assert_eq!(lines[2]["remaining"]["t"], 3);
}

#[test]
fn start_must_be_an_instant() {
    let out = tollgate(&[
        "simulate",
        "--config",
        "examples/quickstart.toml",
        "--trace",
        "examples/quickstart.jsonl",
        "--start",
        "yesterday",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--start 'yesterday' is not an RFC 3339 instant"));
}

#[test]
fn a_last_line_without_newline_is_decided() {
    let config = temp_file("exact3.toml", EXACT);
    let trace = "{\"t\": 0, \"headers\": {\"x-tenant-id\": \"a\"}}\n{\"t\": 0.25, \"headers\": {\"x-tenant-id\": \"a\"}}";
    let lines = simulate_stdin(&config, trace);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["t"], 0.25);
    assert_eq!(lines[1]["remaining"]["t"], 0);
}

/// `tollgate serve` as the README runs it, on free ports: proxy, admin,
/// SIGHUP reload, JSON access log, and a clean exit on SIGTERM.
#[test]
fn serve_runs_the_readme_gateway_and_reloads_on_sighup() {
    let config = temp_file(
        "serve.toml",
        &std::fs::read_to_string(repo().join("examples/gateway.toml")).expect("example"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "serve",
            "--config",
            config.to_str().expect("utf8"),
            "--demo-upstream",
        ])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--access-log",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let (proxy, admin) = common::wait_serving(&mut child);
    let (proxy, admin) = (proxy.as_str(), admin.as_str());

    let tenant = [("x-tenant-id", "acme")];
    for _ in 0..5 {
        let (status, text) = http(proxy, "GET", "/v1/jobs", &tenant);
        assert_eq!(status, 200, "{text}");
        assert!(
            text.contains("\"tenant\":\"acme\""),
            "the demo upstream answered: {text}"
        );
        assert!(
            text.to_ascii_lowercase()
                .contains("ratelimit-policy: \"tenant\";q=5;w=5"),
            "{text}"
        );
    }
    let (status, config_text) = http(admin, "GET", "/v1/config", &[]);
    assert_eq!(status, 200);
    assert!(config_text.contains("quota = 1000"));

    // Edit the file and send SIGHUP: the new config serves.
    let edited = std::fs::read_to_string(&config)
        .expect("read")
        .replace("quota = 1000", "quota = 2000");
    std::fs::write(&config, edited).expect("write");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    let mut reloaded = false;
    for _ in 0..200 {
        if http(admin, "GET", "/v1/config", &[])
            .1
            .contains("quota = 2000")
        {
            reloaded = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(reloaded, "SIGHUP reloaded the config");
    let (status, response) = http(proxy, "GET", "/v1/jobs", &[("x-tenant-id", "globex")]);
    assert_eq!(status, 200);
    assert!(
        response.contains("\"daily\";r=1999;"),
        "the new daily quota: {response}"
    );

    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "SIGTERM is a clean shutdown");
    let access = json_lines(&text(&out.stdout));
    assert!(access.len() >= 6, "{access:?}");
    assert_eq!(access[0]["key"], "acme");
    assert_eq!(access[0]["decision"], "admitted");
    assert_eq!(access[0]["remaining"]["tenant"], 4);
    assert_eq!(access[4]["remaining"]["tenant"], 0);
}
