//! tollgate-egress: the comply face. `tollgate run` pushes jobs (HTTP
//! requests) through other people's rate limits at the fastest pace their
//! published limits allow, keeps every job in durable state, retries what
//! the upstream says to retry, and dead-letters what truly fails.
//!
//! The scheduler, the `[[upstream]]` settings and what a response means are
//! the comply engine's (`tollgate-comply`), shared with `tollgate proxy`.
//!
//! - `job`, `state`: the job format and the durable state, shared with the
//!   proxy's job intake (`tollgate-jobs`).
//! - `plan`: the least time the limits allow, on a virtual clock.
//! - `run`: the tokio driver.
//! - `fleet`: fleet mode: N runners, one job queue and one quota in Redis.

pub mod fleet;
pub mod metrics;
pub mod plan;
pub mod run;

pub use run::{run, run_pending, FleetTotals, Options, ProgressMode, RunError, Summary};
pub use state::State;
pub use tollgate_comply::settings::{self, parse as parse_config, Upstream, UpstreamsConfig};
pub use tollgate_comply::{human, Priority};
pub use tollgate_http::client::Proxies;
pub use tollgate_jobs::{job, state};
pub use tollgate_jobs::{read_bulk, read_jobs, Job, JobsError, Routed};
