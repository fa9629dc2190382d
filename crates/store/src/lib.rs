//! tollgate-store: where the engine's state lives.
//!
//! A store keeps one state value per (limit, class, key) and applies the core's
//! pure `decide` to the states of one request atomically. `MemoryStore` is the
//! embedded default; `redis::RedisStore` (feature "redis") shares counters
//! across a fleet. `Engine` pairs a policy with a store and is what adapters
//! (simulate, gateway, runner) call.

mod clock;
mod direct;
mod engine;
#[cfg(feature = "redis")]
mod fleet;
mod memory;
#[cfg(feature = "redis")]
pub mod redis;
mod state;
#[cfg(feature = "tokio")]
mod tokio_clock;

pub use clock::SystemClock;
pub use direct::{Denied, DirectLimiter};
pub use engine::{committed, Checked, Engine, EngineError};
#[cfg(feature = "redis")]
pub use fleet::StoreHealth;
pub use memory::{MemoryStore, StoreError, StoreStats};
pub use state::AnyState;
#[cfg(feature = "tokio")]
pub use tokio_clock::TokioClock;
