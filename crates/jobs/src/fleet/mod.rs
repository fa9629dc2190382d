//! The fleet's job queue in Redis, shared by `tollgate run`'s fleet mode
//! and `tollgate proxy` on a fleet config.
//!
//! - `scripts`: the queue's Lua scripts, with their KEYS and ARGV.
//! - `queue`: the queue in Redis (import, lease, renew, finish, dead
//!   letters), a thin adapter over the scripts.

pub mod queue;
mod scripts;

pub use queue::{Lease, Leased, Queue, QueueError, Recorded, Write};
