//! Fleet mode: N `tollgate run` processes (on one machine or many) work one
//! job set from Redis and share each upstream's quota through the Redis
//! store, so together they never exceed the profile.
//!
//! - `queue`: the queue in Redis (import, lease, renew, finish, dead
//!   letters), shared with the proxy (`tollgate-jobs`).
//! - `run`: the driver: leases jobs, hands them to the same schedulers as
//!   a runner on its own, and records outcomes through a writer task that
//!   keeps them in memory while Redis is unreachable.

mod run;

pub use run::{run, FleetOptions};
pub use tollgate_jobs::fleet::queue;
pub use tollgate_jobs::fleet::{Lease, Leased, Queue, QueueError, Recorded, Write};
