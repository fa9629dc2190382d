//! tollgate-egress: the comply face. `tollgate run` pushes jobs (HTTP
//! requests) through other people's rate limits at the fastest pace their
//! published limits allow, keeps every job in durable state, retries what
//! the upstream says to retry, and dead-letters what truly fails.
//!
//! The scheduler, the `[[upstream]]` settings and what a response means are
//! the comply engine's (`tollgate-comply`), shared with `tollgate proxy`.
//!
//! - `job`: jobs from a JSONL file or cut from records by a bulk template.
//! - `state`: SQLite state, results.jsonl, dead letters.
//! - `plan`: the least time the limits allow, on a virtual clock.
//! - `run`: the tokio driver.
//! - `fleet`: fleet mode: N runners, one job queue and one quota in Redis.

pub mod fleet;
pub mod job;
pub mod plan;
pub mod run;
pub mod state;

pub use job::{read_bulk, read_jobs, Job, JobsError, Routed};
pub use run::{run, FleetTotals, Options, ProgressMode, RunError, Summary};
pub use state::State;
pub use tollgate_comply::settings::{self, parse as parse_config, Upstream, UpstreamsConfig};
pub use tollgate_comply::{human, Priority};
