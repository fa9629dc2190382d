//! An axum service behind tollgate's limits, as a tower layer.
//!
//!     cargo run -p tollgate-tower --example axum
//!     curl -i -H 'x-tenant-id: acme' http://127.0.0.1:3000/v1/items
//!
//! Each tenant (the `x-tenant-id` header) gets 10 requests per second with
//! bursts of 20, a request that would wait at most 250 ms for its token
//! waits instead of failing, and at most 4 requests per tenant run at once.
//! Every answer carries the IETF `RateLimit-Policy` and `RateLimit` headers;
//! a refusal is a 429 with `Retry-After` and a problem+json body.

use axum::{routing::get, Router};
use tollgate_tower::RateLimitLayer;

const POLICY: &str = r#"
[[limit]]
name = "per-tenant"
key = ["header:x-tenant-id"]
algorithm = "token_bucket"
capacity = 20
refill = "10/s"
hold = "250ms"

[[limit]]
name = "in-flight"
key = ["header:x-tenant-id"]
algorithm = "concurrency"
max = 4
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = RateLimitLayer::from_toml(POLICY)?;
    let app = Router::new()
        .route("/v1/items", get(|| async { "{\"items\":[]}" }))
        .layer(layer);
    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
