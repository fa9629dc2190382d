//! Bounds on held requests: at most `max_held` in total and `max_held_per_key`
//! per key. A place is claimed before deciding (so the bound holds under
//! concurrency) and given back when the hold ends or the request is dropped.

use compact_str::CompactString;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Holds {
    total: AtomicUsize,
    per_key: Mutex<HashMap<CompactString, usize>>,
}

/// A claimed place; dropping it gives the place back.
#[derive(Debug)]
pub struct HoldPlace {
    holds: Arc<Holds>,
    key: CompactString,
}

impl Holds {
    pub fn held(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn claim(
        self: &Arc<Self>,
        key: &str,
        max_total: usize,
        max_per_key: usize,
    ) -> Option<HoldPlace> {
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_total).then_some(n + 1)
            })
            .ok()?;
        let mut per_key = self.per_key.lock();
        let n = per_key.entry(CompactString::from(key)).or_insert(0);
        if *n >= max_per_key {
            drop(per_key);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *n += 1;
        Some(HoldPlace {
            holds: self.clone(),
            key: key.into(),
        })
    }
}

impl Drop for HoldPlace {
    fn drop(&mut self) {
        let mut per_key = self.holds.per_key.lock();
        if let Some(n) = per_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per_key.remove(&self.key);
            }
        }
        self.holds.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_total_and_per_key_and_gives_places_back() {
        let holds = Arc::new(Holds::default());
        let a1 = holds.claim("a", 3, 2).unwrap();
        let _a2 = holds.claim("a", 3, 2).unwrap();
        assert!(holds.claim("a", 3, 2).is_none(), "per key");
        let _b1 = holds.claim("b", 3, 2).unwrap();
        assert!(holds.claim("c", 3, 2).is_none(), "total");
        assert_eq!(holds.held(), 3);
        drop(a1);
        assert_eq!(holds.held(), 2);
        assert!(holds.claim("a", 3, 2).is_some());
    }
}
