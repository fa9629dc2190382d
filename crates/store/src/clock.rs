use quanta::Clock as Tsc;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_core::{Clock, Nanos};

/// Wall-clock time, read cheaply: the wall time at start plus a monotonic
/// (TSC-based) elapsed time, so it never steps backwards under NTP.
#[derive(Debug, Clone)]
pub struct SystemClock {
    tsc: Tsc,
    start_raw: u64,
    start_wall: Nanos,
}

impl SystemClock {
    /// A clock reading the wall time now, then advancing by the CPU's
    /// time-stamp counter (cheap to read, monotonic).
    pub fn new() -> Self {
        let tsc = Tsc::new();
        let start_raw = tsc.raw();
        let start_wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as Nanos);
        SystemClock {
            tsc,
            start_raw,
            start_wall,
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Nanos {
        self.start_wall + self.tsc.delta_as_nanos(self.start_raw, self.tsc.raw())
    }
}
