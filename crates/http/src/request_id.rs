//! Request ids, as both faces give them: `req_` and 16 hex digits, unique
//! per process and across restarts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use tollgate_core::hex::hex_after;

/// The ids of one process: the high 32 bits come from its start time and
/// process id, the low 32 count its requests.
#[derive(Debug)]
pub struct RequestIds {
    count: AtomicU64,
    prefix: u64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        RequestIds::with_prefix(started ^ u64::from(std::process::id()).rotate_left(32))
    }
}

impl RequestIds {
    /// Ids whose high 32 bits are `prefix`'s low 32.
    pub fn with_prefix(prefix: u64) -> Self {
        RequestIds {
            count: AtomicU64::new(0),
            prefix: prefix & 0xffff_ffff,
        }
    }

    /// The next id.
    pub fn next(&self) -> String {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        let v = (self.prefix << 32) | (n & 0xffff_ffff);
        hex_after("req_", &v.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::RequestIds;

    #[test]
    fn ids_are_the_prefix_and_a_count_in_sixteen_hex_digits() {
        let ids = RequestIds::with_prefix(0x1_dead_beef);
        assert_eq!(ids.next(), "req_deadbeef00000000");
        assert_eq!(ids.next(), "req_deadbeef00000001");
        for _ in 0..14 {
            ids.next();
        }
        assert_eq!(ids.next(), "req_deadbeef00000010");
        assert_eq!(
            ids.next(),
            format!("req_{:016x}", 0xdead_beef_0000_0011_u64)
        );
    }

    #[test]
    fn every_digit_is_written_as_format_writes_it() {
        for prefix in [0, 0x0123_4567, 0x89ab_cdef, 0xffff_ffff] {
            let ids = RequestIds::with_prefix(prefix);
            for n in 0..600u64 {
                assert_eq!(ids.next(), format!("req_{:08x}{n:08x}", prefix));
            }
        }
    }

    #[test]
    fn two_processes_started_apart_give_different_ids() {
        let (a, b) = (RequestIds::with_prefix(1), RequestIds::with_prefix(2));
        assert_ne!(a.next(), b.next());
    }
}
