//! A single-key token bucket without a map or lock: one atomic instant (GCRA's
//! TAT) updated by compare-and-swap. For library users who need one global
//! limit in a hot path, like governor's direct limiter.

use std::sync::atomic::{AtomicU64, Ordering};
use tollgate_core::algo::gcra::{self, GcraParams};
use tollgate_core::Nanos;

/// Why `DirectLimiter::check_n` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Not now; this cost fits at that instant if nothing else arrives.
    NotUntil(Nanos),
    /// The cost is more than the bucket ever holds.
    Never {
        /// What the bucket holds at most.
        capacity: u64,
    },
}

/// One token bucket (GCRA) without keys or a store: a single atomic, for
/// one shared limit decided in process.
#[derive(Debug)]
pub struct DirectLimiter {
    params: GcraParams,
    tat: AtomicU64,
}

impl DirectLimiter {
    /// A full bucket with these parameters.
    pub fn new(params: GcraParams) -> Self {
        DirectLimiter {
            params,
            tat: AtomicU64::new(0),
        }
    }

    /// Admit one unit at `now`, or say when it would be admitted.
    #[inline]
    pub fn check(&self, now: Nanos) -> Result<(), Nanos> {
        match self.check_n(now, 1) {
            Ok(()) => Ok(()),
            Err(Denied::NotUntil(t)) => Err(t),
            // Capacity is at least 1, so one unit always fits eventually.
            Err(Denied::Never { .. }) => Err(Nanos::MAX),
        }
    }

    /// Admit `cost` units at `now`; a cost above the capacity can never fit.
    #[inline]
    pub fn check_n(&self, now: Nanos, cost: u64) -> Result<(), Denied> {
        if cost > self.params.capacity {
            return Err(Denied::Never {
                capacity: self.params.capacity,
            });
        }
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = gcra::check(&self.params, tat, now, cost).map_err(Denied::NotUntil)?;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_never_exceed_the_burst() {
        let limiter = Arc::new(DirectLimiter::new(GcraParams::new(1000, 1_000_000_000)));
        let admitted: u64 = (0..4)
            .map(|_| {
                let l = limiter.clone();
                std::thread::spawn(move || {
                    (0..10_000)
                        .filter(|_| l.check(5_000_000_000).is_ok())
                        .count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .sum();
        assert_eq!(admitted, 1000);
        assert_eq!(limiter.check(5_000_000_000), Err(6_000_000_000));
    }
}
