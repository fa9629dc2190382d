//! The proxy as a coordinator, as users run it: `tollgate proxy` (the built
//! binary) takes jobs pushed with curl, is killed with SIGKILL while
//! thousands are queued and their callbacks pending, and is started again
//! on the same state: every job ends with exactly one result, and every
//! callback reaches its receiver at least once.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
mod common;
use common::{write, Running, Upstream};
use tollgate_testkit::free_port;

const JOBS: usize = 10_000;

/// A producer in Python: a live call queued with `Prefer: respond-async`,
/// then its status polled at its Location.
const PYTHON_ASYNC: &str = r#"
import sys, time, requests
base = sys.argv[1]
r = requests.post(base + "/crm/v1/contacts", json={"name": "Ada"}, headers={"Prefer": "respond-async"})
location = r.headers["Location"]
for _ in range(600):
    job = requests.get(base + location).json()
    if job["status"] in ("done", "dead"):
        break
    time.sleep(0.05)
print(r.status_code, job["status"], job["result"]["status"])
"#;
const BATCH: usize = 1_000;

/// `tollgate proxy` on `config`, its access log (stdout) into `log`.
fn proxy(config: &Path, admin: &str, log: &Path) -> Running {
    let log = std::fs::File::create(log).expect("log file");
    let running = Running(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["proxy", "--config"])
            .arg(config)
            .env("TOLLGATE_CALLBACK_SECRET", "coordinator-test")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tollgate proxy"),
    );
    common::ready(admin);
    running
}

fn results(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("state").join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole results line"))
        .collect()
}

#[test]
fn a_killed_coordinator_loses_no_job_and_no_callback() {
    let dir = std::env::temp_dir().join(format!("tollgate-coordinator-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let vendor = Upstream::start();
    let receiver = Upstream::start();
    let (listen, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let config = write(
        &dir,
        "proxy.toml",
        &format!(
            "[proxy]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\naccess_log = \"json\"\nstate = \"{}\"\n\
             [[upstream]]\nname = \"crm\"\nbase_url = \"http://{}\"\n\
             [[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 50\nrefill = \"2500/s\"\n",
            dir.join("state").display(),
            vendor.addr
        ),
    );
    let config = Path::new(&config);
    let mut running = proxy(config, &admin, &dir.join("first.log"));

    // Producers push 9 batches of 1,000 with curl, results to a callback,
    // and `tollgate run --submit` hands over a last file.
    let callback = format!("http://{}/hooks/crm", receiver.addr);
    let last: String = (JOBS - BATCH..JOBS)
        .map(|n| {
            format!(
                "{{\"id\":\"job-{n}\",\"method\":\"POST\",\"url\":\"http://{}/v1/contacts/{n}\",\"body\":{{\"n\":{n}}},\"callback\":\"{callback}\"}}\n",
                vendor.addr
            )
        })
        .collect();
    let last = write(&dir, "last.jsonl", &last);
    let submitted = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config"])
        .arg(config)
        .args(["--jobs", &last, "--submit", &format!("http://{listen}")])
        .output()
        .expect("tollgate run --submit");
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    assert!(
        String::from_utf8_lossy(&submitted.stdout).contains(&format!("{BATCH} job(s) submitted")),
        "{}",
        String::from_utf8_lossy(&submitted.stdout)
    );
    for batch in 0..JOBS / BATCH - 1 {
        let lines: String = (0..BATCH)
            .map(|i| {
                let n = batch * BATCH + i;
                format!(
                    "{{\"id\":\"job-{n}\",\"method\":\"POST\",\"url\":\"http://{}/v1/contacts/{n}\",\"body\":{{\"n\":{n}}}}}\n",
                    vendor.addr
                )
            })
            .collect();
        let file = write(&dir, "batch.jsonl", &lines);
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "content-type: application/x-ndjson",
            ])
            .args(["-H", &format!("tollgate-callback: {callback}")])
            .args(["--data-binary", &format!("@{file}")])
            .arg(format!("http://{listen}/_tollgate/jobs"))
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "202", "batch {batch}");
    }

    // Kill it mid-way: some results recorded, most jobs still queued.
    let deadline = Instant::now() + Duration::from_secs(60);
    while results(&dir).len() < JOBS / 5 {
        assert!(Instant::now() < deadline, "no progress before the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    running.0.kill().expect("SIGKILL");
    let _ = running.0.wait();
    let at_kill = results(&dir).len();
    assert!(
        at_kill < JOBS,
        "killed with jobs still queued ({at_kill} done)"
    );

    // Started again on the same state: it finishes what was pending.
    let _again = proxy(config, &admin, &dir.join("again.log"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while results(&dir).len() < JOBS {
        assert!(
            Instant::now() < deadline,
            "only {} results after the restart",
            results(&dir).len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let lines = results(&dir);
    assert_eq!(lines.len(), JOBS, "exactly one result per job");
    let ids: BTreeSet<String> = lines
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), JOBS, "no job has two results");
    assert!(lines.iter().all(|l| l["outcome"] == "done"));

    // Every callback at least once, each with its job's id.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: BTreeSet<String> = receiver.keys().into_iter().collect();
        if delivered == ids {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {JOBS} callbacks delivered",
            delivered.intersection(&ids).count()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The vendor saw each job's idempotency key (a job in flight at the
    // kill may have gone twice, with the same key).
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for key in vendor.keys() {
        *per_key.entry(key).or_default() += 1;
    }
    assert_eq!(per_key.len(), JOBS);
    // Each job's end is in the access log, under its id.
    let log = std::fs::read_to_string(dir.join("again.log")).expect("access log");
    let ended = log
        .lines()
        .filter(|l| l.contains("\"decision\":\"job_done\"") && l.contains("\"request_id\":\"job-"))
        .count();
    assert!(
        ended > 0 && ended <= JOBS - at_kill,
        "{ended} jobs logged as done after the restart"
    );

    // A Python producer (requests) hands a live call over with
    // `Prefer: respond-async` and follows its Location until it is done.
    let python = Command::new("python3")
        .args(["-c", PYTHON_ASYNC, &format!("http://{listen}")])
        .output()
        .expect("python3 runs");
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&python.stdout).trim(),
        "202 done 200"
    );

    // `tollgate results` and `tollgate dlq` read the coordinator's state
    // while it runs.
    let state = dir.join("state");
    let results = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["results", "--state"])
        .arg(&state)
        .output()
        .expect("tollgate results");
    assert!(results.status.success());
    // (the batches' jobs and the Python producer's one)
    assert_eq!(
        String::from_utf8_lossy(&results.stdout).lines().count(),
        JOBS + 1
    );
    let dlq = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["dlq", "list", "--state"])
        .arg(&state)
        .output()
        .expect("tollgate dlq list");
    assert!(
        dlq.status.success(),
        "{}",
        String::from_utf8_lossy(&dlq.stderr)
    );

    // Run here, jobs with callbacks are refused: only a coordinator delivers.
    let alone = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config"])
        .arg(config)
        .args(["--jobs", &last, "--state"])
        .arg(dir.join("alone"))
        .output()
        .expect("tollgate run");
    assert!(!alone.status.success());
    assert!(String::from_utf8_lossy(&alone.stderr).contains(&format!(
        "job 'job-{}' has a callback, which a coordinator delivers",
        JOBS - BATCH
    )));
    let _ = std::fs::remove_dir_all(&dir);
}
