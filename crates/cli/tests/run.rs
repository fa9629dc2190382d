//! `tollgate run`, `plan` and `dlq` as a user runs them: the built binary
//! against an HTTP upstream on 127.0.0.1, killed and resumed.

mod common;
use common::{text, write, Upstream};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-run-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn config(addr: SocketAddr, limit: &str) -> String {
    format!("[[upstream]]\nname = \"vendor\"\nbase_url = \"http://{addr}\"\nconcurrency = 8\n[[upstream.limit]]\nname = \"rate\"\nalgorithm = \"token_bucket\"\n{limit}\n")
}

fn jobs(addr: SocketAddr, n: usize, path: impl Fn(usize) -> String) -> String {
    (0..n)
        .map(|i| format!("{{\"id\":\"job-{i}\",\"method\":\"POST\",\"url\":\"http://{addr}{}\",\"body\":{{\"i\":{i}}}}}\n", path(i)))
        .collect()
}

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run tollgate")
}

/// `run --config C [--jobs J] --state S --progress quiet`.
fn run_args<'a>(config: &'a str, jobs: Option<&'a str>, state: &'a str) -> Vec<&'a str> {
    let mut args = vec!["run", "--config", config];
    if let Some(jobs) = jobs {
        args.extend(["--jobs", jobs]);
    }
    args.extend(["--state", state, "--progress", "quiet"]);
    args
}

fn results(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("results.jsonl"))
        .expect("results")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect()
}

#[test]
fn a_run_killed_at_random_points_resumes_and_every_job_has_exactly_one_result() {
    let up = Upstream::start();
    let dir = temp_dir("crash");
    let n = 2000;
    // 2,000 jobs at 2,000/s after a burst of 50: about a second of work per run.
    let config = write(
        &dir,
        "c.toml",
        &config(up.addr, "capacity = 50\nrefill = \"2000/s\""),
    );
    let jobs = write(
        &dir,
        "jobs.jsonl",
        &jobs(up.addr, n, |i| format!("/records/{i}")),
    );
    let state = dir.join("state");
    let state_arg = state.to_str().expect("utf8");
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    for _ in 0..6 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(run_args(&config, Some(&jobs), state_arg))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(rng.u64(30..400)));
        if child.try_wait().expect("wait").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        child.wait().expect("reap");
    }
    let out = tollgate(&run_args(&config, Some(&jobs), state_arg));
    assert!(out.status.success(), "seed {seed}: {}", text(&out.stderr));
    let results = results(&state);
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &results {
        assert_eq!(r["outcome"], "done", "seed {seed}: {r}");
        *per_id
            .entry(r["id"].as_str().expect("id").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        per_id.len(),
        n,
        "seed {seed}: every job has a result ({kills} kills)"
    );
    assert!(
        per_id.values().all(|&c| c == 1),
        "seed {seed}: exactly one each"
    );
    // Nothing lost on the wire either; a job in flight at a kill is sent again.
    assert_eq!(up.distinct_keys(), n, "seed {seed}");
    assert!(up.requests() >= n);
    eprintln!(
        "seed {seed}: {kills} kills, {} requests for {n} jobs",
        up.requests()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dead_letters_are_listed_exported_and_retried_alone() {
    let up = Upstream::start();
    let dir = temp_dir("dlq");
    let config = write(
        &dir,
        "c.toml",
        &config(up.addr, "capacity = 100\nrefill = \"100/s\""),
    );
    let jobs = write(
        &dir,
        "jobs.jsonl",
        &jobs(up.addr, 20, |i| {
            if i % 10 == 3 {
                format!("/bad/{i}")
            } else {
                format!("/ok/{i}")
            }
        }),
    );
    let state = dir.join("state");
    let state_arg = state.to_str().expect("utf8");
    let out = tollgate(&run_args(&config, Some(&jobs), state_arg));
    assert_eq!(
        out.status.code(),
        Some(2),
        "dead letters exit 2: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("done 18, dead-lettered 2"), "{stdout}");
    assert!(stdout.contains("tollgate dlq retry --all"), "{stdout}");

    let list = tollgate(&["dlq", "list", "--state", state_arg]);
    let listed = text(&list.stdout);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed.contains("job-3\tvendor\tattempts=1\tstatus=400\tHTTP 400 (not retried)"),
        "{listed}"
    );
    let show = tollgate(&["dlq", "show", "job-13", "--state", state_arg]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(shown["excerpt"], "{\"error\":\"invalid stage\"}");
    assert_eq!(shown["job"]["url"], format!("http://{}/bad/13", up.addr));
    let not_dead = tollgate(&["dlq", "show", "job-1", "--state", state_arg]);
    assert!(text(&not_dead.stderr).contains("job 'job-1' is not a dead letter (it is done)"));
    let export = tollgate(&["dlq", "export", "--state", state_arg]);
    let exported: Vec<serde_json::Value> = text(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(exported.len(), 2);
    assert_eq!(exported[0]["dead_letter"]["status"], 400);
    assert_eq!(exported[0]["body"]["i"], 3);

    // The upstream is fixed: only the two failures are sent again.
    up.failing.store(false, Ordering::SeqCst);
    let before = up.requests();
    let retry = tollgate(&[
        "dlq",
        "retry",
        "--all",
        "--config",
        &config,
        "--state",
        state_arg,
        "--progress",
        "quiet",
    ]);
    assert!(retry.status.success(), "{}", text(&retry.stderr));
    assert_eq!(up.requests() - before, 2);
    assert!(text(&tollgate(&["dlq", "list", "--state", state_arg]).stdout).is_empty());
    // The export reads back as a jobs file.
    let again = write(&dir, "again.jsonl", &text(&export.stdout));
    let planned = tollgate(&["plan", "--config", &config, "--jobs", &again]);
    assert!(
        text(&planned.stdout).contains("vendor: 2 call(s)"),
        "{}",
        text(&planned.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_stops_cleanly_and_says_how_to_resume() {
    let up = Upstream::start();
    let dir = temp_dir("sigint");
    // 100 jobs at 20/s: five seconds; interrupted after one.
    let config = write(
        &dir,
        "c.toml",
        &config(up.addr, "capacity = 1\nrefill = \"20/s\""),
    );
    let jobs = write(
        &dir,
        "jobs.jsonl",
        &jobs(up.addr, 100, |i| format!("/r/{i}")),
    );
    let state = dir.join("state");
    let state_arg = state.to_str().expect("utf8");
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(run_args(&config, Some(&jobs), state_arg))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(1));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill")
        .success());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("job(s) pending; resume with: tollgate run --config"),
        "{stdout}"
    );
    let done_first = results(&state).len();
    assert!(
        done_first > 0 && done_first < 100,
        "{done_first} done before Ctrl-C"
    );
    // Resuming needs no jobs file: the state has them.
    let out = tollgate(&run_args(&config, None, state_arg));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(results(&state).len(), 100);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plan_counts_crm_bulk_calls_and_bad_input_is_named_without_queueing_anything() {
    let dir = temp_dir("plan");
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let bulk = "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9\"\nprofile = \"crm\"\n[[upstream.bulk]]\nname = \"probability\"\nmethod = \"POST\"\npath = \"/graphql\"\nmax_items = 200\nbody = { query = \"mutation\", variables = { ids = \"{{records}}\" } }\n";
    let config = write(&dir, "crm.toml", bulk);
    let records: String = (0..10_000).map(|i| format!("\"opp-{i}\"\n")).collect();
    let records = write(&dir, "ids.jsonl", &records);
    let out = tollgate(&[
        "plan",
        "--config",
        &config,
        "--records",
        &records,
        "--bulk",
        "probability",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(
            "crm: 50 call(s); the limits allow them in 0.0s at the least (within the burst"
        ),
        "{}",
        text(&out.stdout)
    );
    // 250 PATCHes: 100 per rolling 60 s, so a little over two minutes.
    let patches = write(
        &dir,
        "p.jsonl",
        &jobs(addr, 250, |i| format!("/rest/opportunities/{i}")),
    );
    let out = tollgate(&["plan", "--config", &config, "--jobs", &patches]);
    assert!(
        text(&out.stdout).starts_with("crm: 250 call(s); the limits allow them in 2m 0"),
        "{}",
        text(&out.stdout)
    );

    let bad = write(
        &dir,
        "bad.jsonl",
        "{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/a\"}\n{\"method\":\"GET\",\"url\":\"http://example.com/a\"}\n",
    );
    let state = dir.join("state");
    let out = tollgate(&[
        "run",
        "--config",
        &config,
        "--jobs",
        &bad,
        "--state",
        state.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("1 bad line(s), nothing was queued:\n  line 2: url 'http://example.com/a' is under no [[upstream]] base_url"), "{err}");
    assert!(!state.join("state.sqlite").exists(), "nothing queued");
    let bad_template = write(&dir, "t.toml", &bulk.replace("{{records}}", "{{record}}"));
    let out = tollgate(&["check", &bad_template]);
    assert!(text(&out.stderr).contains("line 10: upstream 'crm', bulk 'probability': body must hold the string \"{{records}}\" exactly once"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plan_with_a_state_paces_at_the_rate_a_run_learnt_and_says_so() {
    let dir = temp_dir("plan-state");
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    // The profile: 20 at once, then 100/s. A run learnt that the vendor
    // allows 50/s, and kept it in its state.
    let config = write(
        &dir,
        "vendor.toml",
        &config(addr, "capacity = 20\nrefill = \"100/s\""),
    );
    let state = dir.join("state");
    let writer = tollgate_egress::State::open(&state)
        .expect("state")
        .writer()
        .expect("writer");
    writer.record(tollgate_egress::state::Record::Pace {
        upstream: "vendor".into(),
        rate: Some(50.0),
    });
    writer.finish().expect("written");
    let jobs = write(&dir, "jobs.jsonl", &jobs(addr, 1020, |i| format!("/x/{i}")));
    let plain = tollgate(&["plan", "--config", &config, "--jobs", &jobs]);
    assert!(
        text(&plain.stdout).starts_with("vendor: 1020 call(s); the limits allow them in 10.0s"),
        "{}",
        text(&plain.stdout)
    );
    let state_arg = state.to_str().expect("utf-8");
    let out = tollgate(&[
        "plan", "--config", &config, "--jobs", &jobs, "--state", state_arg,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("vendor: 1020 call(s); the limits allow them in 20.4s"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "paced at 50.0/s, learnt by an earlier run and kept in {state_arg} (the profile allows 100.0/s)"
        )),
        "{stdout}"
    );
    // A state that does not exist is named, not created.
    let missing = dir.join("nowhere");
    let out = tollgate(&[
        "plan",
        "--config",
        &config,
        "--jobs",
        &jobs,
        "--state",
        missing.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no tollgate state in"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
