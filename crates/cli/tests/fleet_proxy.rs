//! One quota across processes, as users run it: two `tollgate proxy`
//! processes and one `tollgate run` (the built binary) on one redis-server,
//! against one vendor (`tollgate serve` enforcing the quota, with a short
//! hold for arrival jitter). Clients send through both proxies while the
//! runner works its jobs; the vendor must never deny one.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;
mod common;
use common::{http, ready, text, write, Running};
use tollgate_testkit::{free_port, redis_url, unique_prefix};

/// The vendor's quota: a burst of 10, then 40 a second, for everyone.
const LIMIT: &str =
    "name = \"rate\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"40/s\"\n";

fn tollgate(args: &[&str], env: &[(&str, &str)]) -> Running {
    Running(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tollgate"),
    )
}

/// A counter of the vendor's Prometheus text, 0 when absent.
fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn two_proxies_and_a_runner_on_one_redis_never_exceed_the_vendors_quota() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("tollgate-fleet-proxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let addr = |port: u16| format!("127.0.0.1:{port}");

    // The vendor: the same quota, enforced by an engine the fleet does not share.
    let (vendor, vendor_admin) = (addr(free_port()), addr(free_port()));
    let vendor_config = write(
        &dir,
        "vendor.toml",
        &format!("[gateway]\naccess_log = \"off\"\n[[limit]]\n{LIMIT}hold = \"250ms\"\n"),
    );
    let _vendor = tollgate(
        &[
            "serve",
            "--config",
            &vendor_config,
            "--demo-upstream",
            "--listen",
            &vendor,
            "--admin",
            &vendor_admin,
        ],
        &[],
    );
    ready(&vendor_admin);

    // The fleet: one config, one Redis, the quota as published.
    let config = write(
        &dir,
        "fleet.toml",
        &format!(
            "[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\n[proxy]\naccess_log = \"off\"\n[[upstream]]\nname = \"vendor\"\nbase_url = \"http://{vendor}\"\nconcurrency = 16\n[[upstream.limit]]\n{LIMIT}",
            redis_url(),
            unique_prefix("fleet-proxy")
        ),
    );
    let proxies: Vec<(String, Running)> = (0..2)
        .map(|_| {
            let (listen, admin) = (addr(free_port()), addr(free_port()));
            let p = tollgate(
                &[
                    "proxy", "--config", &config, "--listen", &listen, "--admin", &admin,
                ],
                &[],
            );
            ready(&admin);
            (listen, p)
        })
        .collect();
    let jobs: String = (0..40)
        .map(|i| format!("{{\"id\":\"job-{i}\",\"method\":\"POST\",\"url\":\"http://{vendor}/v1/jobs/{i}\",\"body\":{{\"i\":{i}}}}}\n"))
        .collect();
    let jobs = write(&dir, "jobs.jsonl", &jobs);
    let started = Instant::now();
    let runner = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "run",
            "--config",
            &config,
            "--jobs",
            &jobs,
            "--progress",
            "quiet",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate run");

    // Four clients per proxy, 20 requests each, no retry logic of their own.
    let clients: Vec<_> = proxies
        .iter()
        .flat_map(|(listen, _)| std::iter::repeat_n(listen.clone(), 4))
        .map(|listen| {
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| http(&listen, "GET", &format!("/vendor/v1/items/{i}"), &[]).0)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let codes: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    let out = runner.wait_with_output().expect("runner");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "runner: {}", text(&out.stderr));
    assert_eq!(codes.len(), 160);
    assert!(
        codes.iter().all(|c| *c == 200),
        "every client got 200: {codes:?}"
    );
    let summary = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(summary.contains("done 40, dead-lettered 0"), "{summary}");

    let metrics = http(&vendor_admin, "GET", "/metrics", &[]).1;
    let denied = counter(
        &metrics,
        "tollgate_decisions_total{limit=\"rate\",outcome=\"denied\"}",
    );
    let admitted = counter(
        &metrics,
        "tollgate_decisions_total{limit=\"rate\",outcome=\"admitted\"}",
    ) + counter(
        &metrics,
        "tollgate_decisions_total{limit=\"rate\",outcome=\"held\"}",
    );
    assert_eq!(denied, 0, "the vendor denied none:\n{metrics}");
    assert_eq!(admitted, 200, "the vendor admitted every call:\n{metrics}");
    // 200 calls under one quota of 10 + 40/s take at least 4.75 s: they
    // were paced as one, not once per process (which would take ~1.6 s).
    assert!(elapsed >= 4.5, "the fleet shared one quota: {elapsed:.2} s");
    let _ = std::fs::remove_dir_all(&dir);
}
