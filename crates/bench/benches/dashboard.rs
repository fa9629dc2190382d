//! The dashboard's server time with a full history: 30 days by the hour and
//! 48 hours by the minute of every series a busy face has, and (the
//! gateway's page) 10,000 keys in the store to rank for the busiest. Target:
//! <= 100 ms per page.
//!
//! Run: `cargo bench -p tollgate-bench --bench dashboard`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use tollgate_core::{parse, Attrs, NoProfiles};
use tollgate_store::Engine;
use tollgate_watch::alerts::{Alerts, Rule};
use tollgate_watch::dashboard::{page, BusyKey, Extras, Face, Range};
use tollgate_watch::history::{History, Resolution, Row};
use tollgate_watch::sample::Kind;

/// 2027-01-15T08:00:00Z.
const NOW: i64 = 1_800_000_000;
const KEYS: usize = 10_000;

/// Every bucket kept, for `keys` (`name{labels}`, kind).
fn full_history(keys: &[(String, Kind)]) -> History {
    let mut rows = Vec::new();
    for (key, kind) in keys {
        for resolution in Resolution::ALL {
            let step = resolution.seconds();
            let last = resolution.bucket(NOW);
            for i in 0..resolution.kept() {
                rows.push(Row {
                    key: key.clone(),
                    kind: *kind,
                    resolution,
                    bucket: last - i * step,
                    value: (i % 97) as f64,
                });
            }
        }
    }
    let mut history = History::default();
    history.restore(rows, NOW);
    history
}

/// A comply face with 10 upstreams: calls by 6 outcomes, jobs, latency,
/// 3 limits each.
fn comply_series() -> Vec<(String, Kind)> {
    let mut out = Vec::new();
    for u in 0..10 {
        for o in ["2xx", "3xx", "4xx", "429", "5xx", "network_error"] {
            out.push((
                format!("tollgate_upstream_calls_total{{upstream=\"u{u}\",outcome=\"{o}\"}}"),
                Kind::Counter,
            ));
        }
        for o in ["done", "dead"] {
            out.push((
                format!("tollgate_jobs_finished_total{{upstream=\"u{u}\",outcome=\"{o}\"}}"),
                Kind::Counter,
            ));
        }
        out.push((
            format!("tollgate_jobs_pending{{upstream=\"u{u}\"}}"),
            Kind::Gauge,
        ));
        out.push((
            format!("tollgate_job_seconds_sum{{upstream=\"u{u}\"}}"),
            Kind::Counter,
        ));
        out.push((
            format!("tollgate_job_seconds_count{{upstream=\"u{u}\"}}"),
            Kind::Counter,
        ));
        for l in ["second", "minute", "daily"] {
            out.push((
                format!("tollgate_upstream_limit_remaining{{upstream=\"u{u}\",limit=\"{l}\"}}"),
                Kind::Gauge,
            ));
            out.push((
                format!("tollgate_upstream_limit_quota{{upstream=\"u{u}\",limit=\"{l}\"}}"),
                Kind::Gauge,
            ));
        }
    }
    out
}

/// A gateway with 10 limits: decisions by 4 outcomes, responses by 6 codes.
fn gateway_series() -> Vec<(String, Kind)> {
    let mut out = Vec::new();
    for l in 0..10 {
        for o in ["admitted", "held", "denied", "shadow_denied"] {
            out.push((
                format!("tollgate_decisions_total{{limit=\"l{l}\",outcome=\"{o}\"}}"),
                Kind::Counter,
            ));
        }
    }
    for c in [200, 201, 404, 429, 500, 503] {
        out.push((
            format!("tollgate_responses_total{{code=\"{c}\"}}"),
            Kind::Counter,
        ));
    }
    out.push(("tollgate_held".into(), Kind::Gauge));
    out.push(("tollgate_keys".into(), Kind::Gauge));
    out
}

fn bench(c: &mut Criterion) {
    let comply = full_history(&comply_series());
    let gateway = full_history(&gateway_series());
    let alerts = Alerts::new(Rule::defaults(), Default::default());
    let engine = Engine::new(
        parse(
            "[store]\nmax_keys = 100000\n[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 100\nrefill = \"1/s\"\n",
            &NoProfiles,
        )
        .expect("policy"),
    );
    let t0 = 1_767_225_600 * 1_000_000_000u64;
    for k in 0..KEYS {
        let req = Attrs {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("x-tenant".into(), format!("tenant-{k:05}"))],
            ..Attrs::default()
        };
        for _ in 0..=(k % 50) {
            engine.check(&req, t0).expect("decide");
        }
    }
    let mut group = c.benchmark_group("dashboard");
    for range in ["1h", "48h", "30d"] {
        group.bench_function(format!("comply page, {range}"), |b| {
            b.iter(|| {
                black_box(page(
                    Face::Proxy,
                    &comply,
                    &alerts,
                    &Extras::default(),
                    Range::named(Some(range)),
                    NOW,
                ))
            })
        });
    }
    group.bench_function("gateway page, 30d, busiest of 10,000 keys", |b| {
        b.iter(|| {
            let policy = engine.policy();
            let busiest = engine
                .store()
                .busiest(policy, t0, 10)
                .into_iter()
                .map(|(l, key, remaining, quota)| BusyKey {
                    limit: policy.limits[l].name.clone(),
                    key: key.to_string(),
                    used: (quota - remaining) as f64,
                    quota: quota as f64,
                })
                .collect();
            let extras = Extras {
                busiest,
                ..Extras::default()
            };
            black_box(page(
                Face::Gateway,
                &gateway,
                &alerts,
                &extras,
                Range::named(Some("30d")),
                NOW,
            ))
        })
    });
    // One scrape as a face records it every `[history] every`: a gateway's
    // /metrics text (10 limits), parsed, recorded, the alerts evaluated,
    // the changed buckets written to the SQLite file.
    let dir = std::env::temp_dir().join(format!("tollgate-bench-tick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let settings = tollgate_watch::settings::WatchSettings {
        history_path: Some(Some(dir.join("history.sqlite"))),
        ..Default::default()
    };
    let watch =
        tollgate_watch::Watch::open(Face::Gateway, &settings, None, Default::default(), NOW)
            .expect("watch");
    let mut n = 0u64;
    let mut at = NOW;
    group.bench_function(
        "one scrape of a gateway's /metrics, recorded and written",
        |b| {
            b.iter(|| {
                n += 1;
                at += 1;
                let text = gateway_metrics(n);
                black_box(watch.tick(at, || text))
            })
        },
    );
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway's `/metrics` as its encoder writes it, its counters at `n`
/// and growing (so each scrape changes every bucket).
fn gateway_metrics(n: u64) -> String {
    let mut out = String::from("# TYPE tollgate_decisions counter\n");
    for l in 0..10 {
        for o in ["admitted", "held", "denied", "shadow_denied"] {
            out.push_str(&format!(
                "tollgate_decisions_total{{limit=\"l{l}\",outcome=\"{o}\"}} {}\n",
                n * 7
            ));
        }
    }
    out.push_str("# TYPE tollgate_responses counter\n");
    for c in [200, 201, 404, 429, 500, 503] {
        out.push_str(&format!(
            "tollgate_responses_total{{code=\"{c}\"}} {}\n",
            n * 11
        ));
    }
    out.push_str("# TYPE tollgate_hold_seconds histogram\n");
    for le in [
        "0.0001", "0.0004", "0.0016", "0.0064", "0.0256", "0.1024", "+Inf",
    ] {
        out.push_str(&format!(
            "tollgate_hold_seconds_bucket{{le=\"{le}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "tollgate_hold_seconds_sum {}\ntollgate_hold_seconds_count {n}\n",
        n as f64 * 0.01
    ));
    out.push_str(&format!("# TYPE tollgate_held gauge\ntollgate_held {}\n# TYPE tollgate_keys gauge\ntollgate_keys 10000\n# EOF\n", n % 5));
    out
}

criterion_group!(benches, bench);
criterion_main!(benches);
