//! tollgate-comply: the engine of compliance that `tollgate run` and
//! `tollgate proxy` share. One scheduler per upstream decides which call
//! goes next and when (the fastest pace the vendor's limits allow), and
//! what a response means (done, retry when, dead letter). It never does
//! HTTP itself: its callers send and report.
//!
//! - `settings`: the `[[upstream]]` tables of a config.
//! - `lanes`: lanes and priorities (FIFO per priority within a lane).
//! - `retry`: what a status means, and the backoff before the next attempt.
//! - `breaker`: the circuit breaker.
//! - `corrections`: the vendor's rate-limit headers lower the local view.
//! - `pace`: 429s the profile did not predict lower an effective rate.
//! - `scheduler`: one upstream's scheduler, without I/O (one driver).
//! - `shared`: the same scheduler for many callers at once (async).
//! - `sendable`: what a call may not carry (methods, framing headers).

mod breaker;
mod corrections;
pub mod lanes;
pub mod metrics;
pub mod pace;
pub mod retry;
pub mod schedule;
pub mod scheduler;
pub mod sendable;
pub mod settings;
pub mod shared;

/// The header through which a call's workflow reaches the policy (a job's
/// `workflow`, a live request's `Tollgate-Workflow`); never sent upstream.
pub const WORKFLOW_HEADER: &str = "tollgate-workflow";

pub use breaker::BreakerSettings;
pub use lanes::Priority;
pub use scheduler::{Counters, Event, Next, Reply, Scheduler, Settled, Waiting};
pub use settings::{parse as parse_config, Upstream, UpstreamsConfig};
pub use shared::{human, Ask, Refused, SharedScheduler, Ticket, WeakScheduler};
