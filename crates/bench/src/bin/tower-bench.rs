//! bench/tower.sh's app: one axum route (`GET /` answering "ok") behind
//! tollgate's tower layer, behind tower_governor, or behind nothing, with
//! the same quota on one key for everyone:
//!
//!   tower-bench LISTEN tollgate|governor|none open|deny
//!
//! - `open`: a quota no load reaches (10^9 per second, bursts of 10^9):
//!   what the layer costs a request it lets through.
//! - `deny`: bursts of 100, then 1,000 per second: under load nearly
//!   every request is refused (429), so this is what a refusal costs.
//!
//! Both layers write rate-limit headers on every answer (tollgate its
//! IETF RateLimit headers, tower_governor its x-ratelimit-* with
//! `use_headers`), and both answer a refusal with 429.

use axum::routing::get;
use axum::Router;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::GlobalKeyExtractor;
use tower_governor::GovernorLayer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, layer, mode] = args.as_slice() else {
        return Err("usage: tower-bench LISTEN tollgate|governor|none open|deny".into());
    };
    let open = match mode.as_str() {
        "open" => true,
        "deny" => false,
        other => return Err(format!("mode '{other}': expected open or deny").into()),
    };
    let app = Router::new().route("/", get(|| async { "ok" }));
    let app = match layer.as_str() {
        "none" => app,
        "tollgate" => {
            let (capacity, refill) = match open {
                true => (1_000_000_000, "1000000000/s"),
                false => (100, "1000/s"),
            };
            let policy = format!(
                "[[limit]]\nname = \"everyone\"\nalgorithm = \"token_bucket\"\ncapacity = {capacity}\nrefill = \"{refill}\"\n"
            );
            app.layer(tollgate_tower::RateLimitLayer::from_toml(&policy)?)
        }
        "governor" => {
            let mut config = GovernorConfigBuilder::default();
            match open {
                true => config.per_nanosecond(1).burst_size(1_000_000_000),
                false => config.per_millisecond(1).burst_size(100),
            };
            let config = config
                .key_extractor(GlobalKeyExtractor)
                .use_headers()
                .finish()
                .ok_or("governor config")?;
            app.layer(GovernorLayer::new(config))
        }
        other => {
            return Err(format!("layer '{other}': expected tollgate, governor or none").into())
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen.as_str()).await?;
        axum::serve(listener, app).await
    })?;
    Ok(())
}
