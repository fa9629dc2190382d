//! Fleet mode: N `tollgate run` processes (on one machine or many) work one
//! job set from Redis and share each upstream's quota through the Redis
//! store, so together they never exceed the profile.
//!
//! - `scripts`: the queue's Lua scripts, with their KEYS and ARGV.
//! - `queue`: the queue in Redis (import, lease, renew, finish, dead
//!   letters), a thin adapter over the scripts.
//! - `run`: the driver: leases jobs, hands them to the same schedulers as
//!   a runner on its own, and records outcomes through a writer task that
//!   keeps them in memory while Redis is unreachable.

pub mod queue;
mod run;
mod scripts;

pub use queue::{Lease, Leased, Queue, QueueError, Recorded, Write};
pub use run::{run, FleetOptions};
