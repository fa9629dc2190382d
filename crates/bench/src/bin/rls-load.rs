//! bench/rls.sh's load tool: Envoy's `ShouldRateLimit` as fast as answers
//! come, from `concurrency` callers over `connections` HTTP/2 connections,
//! for a fixed time. The same tool drives tollgate and limitador.
//!
//!   rls-load ADDR DOMAIN SECONDS CONCURRENCY CONNECTIONS TENANTS
//!
//! Each request carries one descriptor, `tenant = tN` (N cycling over
//! TENANTS). Prints one JSON line: requests per second, OK / OVER_LIMIT /
//! error counts, p50 / p99 latency in microseconds.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tally {
    ok: u64,
    over: u64,
    errors: u64,
    /// Microseconds, one per answer.
    latencies: Vec<u32>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, domain, seconds, concurrency, connections, tenants] = args.as_slice() else {
        return Err("usage: rls-load ADDR DOMAIN SECONDS CONCURRENCY CONNECTIONS TENANTS".into());
    };
    let (seconds, concurrency, connections, tenants): (f64, usize, usize, usize) = (
        seconds.parse()?,
        concurrency.parse()?,
        connections.parse()?,
        tenants.parse()?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?;
            clients.push(RateLimitServiceClient::new(channel));
        }
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        let callers: Vec<_> = (0..concurrency)
            .map(|caller| {
                let mut client = clients[caller % clients.len()].clone();
                let domain = domain.clone();
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let mut n = caller;
                    while Instant::now() < deadline {
                        let request = RateLimitRequest {
                            domain: domain.clone(),
                            descriptors: vec![RateLimitDescriptor {
                                entries: vec![Entry {
                                    key: "tenant".into(),
                                    value: format!("t{}", n % tenants.max(1)),
                                }],
                                ..Default::default()
                            }],
                            hits_addend: 1,
                        };
                        n += concurrency;
                        let sent = Instant::now();
                        match client.should_rate_limit(request).await {
                            Ok(answer) => match answer.into_inner().overall_code() {
                                Code::Ok => tally.ok += 1,
                                Code::OverLimit => tally.over += 1,
                                Code::Unknown => tally.errors += 1,
                            },
                            Err(_) => tally.errors += 1,
                        }
                        tally.latencies.push(sent.elapsed().as_micros() as u32);
                    }
                    tally
                })
            })
            .collect();
        let mut all = Tally::default();
        for caller in callers {
            let tally = caller.await?;
            all.ok += tally.ok;
            all.over += tally.over;
            all.errors += tally.errors;
            all.latencies.extend(tally.latencies);
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((all.latencies.len() as f64 - 1.0) * q).round() as usize;
            all.latencies.get(i).copied().unwrap_or(0)
        };
        println!(
            "{{\"rps\":{:.0},\"ok\":{},\"over\":{},\"errors\":{},\"p50_us\":{},\"p99_us\":{}}}",
            all.latencies.len() as f64 / elapsed,
            all.ok,
            all.over,
            all.errors,
            at(0.5),
            at(0.99)
        );
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
