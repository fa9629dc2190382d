//! tollgate-store: where the engine's state lives.
//!
//! A store keeps one state value per (limit, class, key) and applies the core's
//! pure `decide` to the states of one request atomically. `MemoryStore` is the
//! embedded default; `redis::RedisStore` shares counters across a fleet.
//! `Engine` pairs a policy with a store and is what adapters call (simulate,
//! gateway, runner, proxy, the tower layer, the RLS listener), and
//! `Admission` is what an admitted request owes its limits until it
//! completes.

#![warn(missing_docs)]

mod admission;
mod clock;
mod direct;
mod engine;
mod fleet;
mod holds;
mod lease;
mod memory;
pub mod redis;
mod state;
mod tokio_clock;

pub use admission::{decide_holding, Admission, Decided, HoldBounds};
pub use clock::SystemClock;
pub use direct::{Denied, DirectLimiter};
pub use engine::{committed, Checked, Engine, EngineError};
pub use fleet::StoreHealth;
pub use holds::{HoldPlace, Holds};
pub use memory::{MemoryStore, StoreError, StoreStats};
pub use state::AnyState;
pub use tokio_clock::TokioClock;
