//! tollgate-egress: the comply face. `tollgate run` pushes jobs (HTTP
//! requests) through other people's rate limits at the fastest pace their
//! published limits allow, keeps every job in durable state, retries what
//! the upstream says to retry, and dead-letters what truly fails.
//!
//! - `settings`: the `[[upstream]]` tables of a config.
//! - `job`: jobs from a JSONL file or cut from records by a bulk template.
//! - `schedule`: one upstream's scheduler, without I/O (the product's core).
//! - `signals`: what responses say (Retry-After, remaining quota).
//! - `state`: SQLite state, results.jsonl, dead letters.
//! - `plan`: the least time the limits allow, on a virtual clock.
//! - `run`: the tokio driver.
//! - `fleet`: fleet mode: N runners, one job queue and one quota in Redis.

pub mod fleet;
pub mod job;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod signals;
pub mod state;

pub use job::{read_bulk, read_jobs, Job, JobsError, Priority, Routed};
pub use run::{run, FleetTotals, Options, ProgressMode, RunError, Summary};
pub use settings::{parse as parse_config, RunnerConfig, Upstream};
pub use state::State;
