//! tollgate-gateway: `tollgate serve`, the enforcing face.
//!
//! An adapter over the engine: it turns HTTP requests into engine calls and
//! decisions into HTTP behaviour (hold, 429, headers), proxies admitted
//! requests to the upstream, and serves an admin listener (health, metrics,
//! usage, config, reload, and the check API), and Envoy's rate limit
//! service over gRPC (`[rls]`).

mod admin;
pub mod demo;
mod gateway;
mod metrics;
mod proxy;
mod rls;
mod server;
pub mod settings;
mod upstream;

pub use gateway::{load, Gateway, Overrides, Reloaded, Source, MAX_WORKERS};
pub use server::serve_workers;
pub use settings::{Settings, Upstream};
pub use tollgate_core::config::LoadError;
pub use tollgate_http::listen::Listeners;
pub use tollgate_http::{AccessLog, ErrorFormat};
pub use tollgate_store::TokioClock;
