//! tollgate-core: the pure rate-limit engine.
//!
//! No I/O, no async: each algorithm is a function of (state, now, cost,
//! params), time is passed in by the caller, and stores decide how state is
//! kept. See `decide` for how the limits of one request combine.

#![warn(missing_docs)]

pub mod algo;
pub mod calendar;
pub mod carry;
pub mod clock;
pub mod config;
pub mod decide;
pub mod hex;
pub mod policy;
pub mod request;
pub mod units;

pub use clock::{Clock, FakeClock};
pub use config::{parse, parse_upstreams, ConfigError, NoProfiles, ProfileSource, UpstreamPolicy};
pub use decide::{decide, decide_one, Decision, Outcome, Slot, Verdict};
pub use policy::Policy;
pub use request::{Attrs, Descriptor, Item, Request, RequestError};
pub use units::Nanos;
