//! tollgate-jobs: durable jobs for the comply face, shared by `tollgate run`
//! (jobs from a file) and `tollgate proxy` (jobs pushed over HTTP).
//!
//! - `job`: the job format: JSONL lines, or records cut by a bulk template;
//!   a bad line is an error naming it, and nothing is queued until every
//!   line is good.
//! - `state`: SQLite state (jobs, attempts, outcomes, learnt paces),
//!   `results.jsonl`, dead letters.
//! - `result`: a job's final outcome as its `results.jsonl` line.
//! - `fleet`: the fleet's job queue in Redis.

pub mod fleet;
pub mod job;
pub mod result;
pub mod state;

pub use job::{read_bulk, read_jobs, Job, JobUrl, JobsError, Routed};
pub use state::State;
