//! tollgate-proxy: `tollgate proxy`, the comply face for live calls. Every
//! script, worker and low-code tool calls its vendors through one local (or
//! shared) proxy that knows each vendor's published limits: a request waits
//! for its slot in its upstream's line instead of failing, is retried when
//! that is safe, and shares one quota with every other request, proxy and
//! `tollgate run` (through Redis in fleet mode).
//!
//! An adapter over the comply engine (`tollgate-comply`): it turns HTTP
//! requests into tickets in an upstream's line and the line's answers into
//! HTTP behaviour.
//!
//! - `settings`: `[proxy]` and `[[proxy.client]]`.
//! - `state`: the config in force, one line (scheduler and client) per upstream.
//! - `intercept`: `HTTPS_PROXY` tunnels seen through a local CA.
//! - `keys`: an upstream's pool of vendor keys.
//! - `route`: which upstream a request is for (alias or forward proxy).
//! - `call`: one request: wait in line, send, retry, relay.
//! - `jobs`: job intake (`/_tollgate/jobs`): queued work in the same lines.
//! - `callbacks`: jobs' results POSTed (signed) to their callback URLs.
//! - `fleet_jobs`: on a fleet config, jobs in the fleet's queue in Redis.
//! - `admin`: health, metrics, usage, config, reload.
//! - `server`: listeners and lifecycle.

mod admin;
mod cached;
pub mod call;
mod callbacks;
mod deduped;
mod fleet_jobs;
pub mod intercept;
mod jobs;
mod keys;
mod metrics;
pub mod route;
mod server;
pub mod settings;
mod state;

pub use callbacks::signature as callback_signature;
pub use server::serve;
pub use settings::{Client, ProxySettings};
pub use state::{load, Generation, Overrides, Proxy, Reloaded, Source};
pub use tollgate_core::config::LoadError;
pub use tollgate_http::listen::Listeners;

/// The first path segment tollgate keeps for its own endpoints: no
/// upstream may take this name.
pub const RESERVED: &str = "_tollgate";
