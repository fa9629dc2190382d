//! Time is injected. The engine never reads a clock itself; callers pass `now`.
//! Adapters hold a `Clock`; tests hold a `FakeClock` and advance it by hand.

use crate::units::Nanos;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A source of "now" in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    /// Nanoseconds since the Unix epoch.
    fn now(&self) -> Nanos;
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct FakeClock {
    now: Arc<AtomicU64>,
}

impl FakeClock {
    /// A clock that reads `now` until moved.
    pub fn at(now: Nanos) -> Self {
        FakeClock {
            now: Arc::new(AtomicU64::new(now)),
        }
    }
    /// Move it forward by `by`.
    pub fn advance(&self, by: Nanos) {
        self.now.fetch_add(by, Ordering::SeqCst);
    }
    /// Set it to `to`.
    pub fn set(&self, to: Nanos) {
        self.now.store(to, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Nanos {
        self.now.load(Ordering::SeqCst)
    }
}
