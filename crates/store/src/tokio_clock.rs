//! The adapters' clock: wall time at start plus tokio's monotonic time since.
//! Under a paused tokio runtime (tests) it moves only when tokio's time
//! does, so holds, windows and backoffs are exact without sleeping.

use tokio::time::Instant;
use tollgate_core::{Clock, Nanos};

/// Wall time at its start, then tokio's monotonic time since (see the
/// module's note on paused time).
#[derive(Debug, Clone)]
pub struct TokioClock {
    epoch: Nanos,
    start: Instant,
}

impl TokioClock {
    /// A clock that reads `epoch` now.
    pub fn starting_at(epoch: Nanos) -> Self {
        TokioClock {
            epoch,
            start: Instant::now(),
        }
    }

    /// A clock on the system's wall time.
    pub fn system() -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as Nanos);
        Self::starting_at(epoch)
    }

    /// The tokio instant at which this clock reads `at`.
    pub fn instant_at(&self, at: Nanos) -> Instant {
        self.start + std::time::Duration::from_nanos(at.saturating_sub(self.epoch))
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Nanos {
        self.epoch + self.start.elapsed().as_nanos() as Nanos
    }
}
