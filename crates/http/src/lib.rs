//! tollgate-http: the HTTP plumbing both faces share, so the gateway and
//! the proxy (and the runner, for what it reads of responses) behave alike.
//!
//! - `listen`: listeners, worker sockets, HTTP/1.1 and HTTP/2 connections,
//!   graceful drain.
//! - `tls`: certificates for a listener, reloaded when their files change.
//! - `forward`: hop-by-hop headers, path normalization, X-Forwarded-For.
//! - `ratelimit`: the RateLimit headers, written from a decision and parsed
//!   from a vendor's response (with `Retry-After`).
//! - `refusal`: every answer tollgate makes itself, as problem+json (or
//!   Celigo's `errors` shape), its status decided in one place.
//! - `access`: the access log, written off the request path.
//! - `admin`: admin replies and the bearer-token check.
//! - `body`: a response body that settles its request when it ends.
//! - `conn`: one upstream connection, used again request after request.
//! - `client`: the comply face's client to one upstream.
//! - `request_id`: the ids both faces give requests.

pub mod access;
pub mod admin;
pub mod body;
pub mod cache;
pub mod client;
pub mod conn;
pub mod dedup;
pub mod forward;
pub mod listen;
pub mod ratelimit;
pub mod refusal;
pub mod request_id;
pub mod tls;
pub mod webhook;

pub use access::{AccessLog, AccessLogger};
pub use forward::{normalize_path, strip_hop_by_hop, HttpRequest, Peer};
pub use refusal::{ErrorFormat, Refusal, ResponseSettings, X_REQUEST_ID};
pub use request_id::RequestIds;
