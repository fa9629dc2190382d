mod common;
use common::{client, start, upstream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_testkit::upstream::{scripted_seen, Answer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_three_workflows() {
    let up =
        scripted_seen(|seen, _| Answer::Text(200, vec![], format!("{{\"p\":\"{}\"}}", seen.path)))
            .await;
    let config = upstream("hubspot", up.addr, "profile = \"hubspot\"\nconcurrency = 64\n[[upstream.cache]]\npath_prefix = \"/crm\"\nttl = \"5m\"\n");
    let proxy = start(&config).await;
    let started = Instant::now();
    let c = client();
    let ids = 300u32;
    let mut handles = Vec::new();
    for w in 0..3u64 {
        let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
        for _ in 0..16 {
            let (c, next, base) = (c.clone(), next.clone(), proxy.url("hubspot", "/crm/c/"));
            handles.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(w * 1000)).await;
                let mut states = std::collections::HashMap::<String, u32>::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= ids {
                        break;
                    }
                    let r = c.get(format!("{base}{i}")).send().await.expect("resp");
                    let st = r
                        .headers()
                        .get("tollgate-cache")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    *states.entry(format!("{} {st}", r.status())).or_default() += 1;
                    let _ = r.bytes().await;
                }
                states
            }));
        }
    }
    let mut all = std::collections::HashMap::<String, u32>::new();
    for h in handles {
        for (k, v) in h.await.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    eprintln!(
        "elapsed {:?} calls {} states {all:?}",
        started.elapsed(),
        up.seen.lock().unwrap().len()
    );
    let metrics = common::text(&proxy.admin_url("/metrics")).await;
    for l in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("hubspot") && !l.ends_with(" 0"))
    {
        eprintln!("{l}");
    }
}
