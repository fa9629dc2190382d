//! Bounds on held requests: at most `max_held` in total and `max_held_per_key`
//! per key of each holding limit. A place is claimed before the decision that
//! may hold (so the bound holds under concurrency) and given back when the
//! hold ends or the request is dropped.

use compact_str::CompactString;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The bounded queue of requests held for a slot: a count in all and per
/// (limit, key), so a hot key cannot take every place.
#[derive(Debug, Default)]
pub struct Holds {
    total: AtomicUsize,
    /// Requests held per (limit, key); only keys with some held are present.
    per_key: Mutex<HashMap<(usize, CompactString), usize>>,
}

/// A claimed place; dropping it gives the place back.
#[derive(Debug)]
pub struct HoldPlace {
    holds: Arc<Holds>,
    key: (usize, CompactString),
}

impl Holds {
    /// Requests held now, all keys together.
    pub fn held(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// A place for one request held by `limit` under `key`, if both bounds allow.
    pub fn claim(
        self: &Arc<Self>,
        limit: usize,
        key: &str,
        max_total: usize,
        max_per_key: usize,
    ) -> Option<HoldPlace> {
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_total).then_some(n + 1)
            })
            .ok()?;
        let key = (limit, CompactString::from(key));
        let mut per_key = self.per_key.lock();
        // Checked before inserting: a full (or zero) bound leaves no entry behind.
        if per_key.get(&key).copied().unwrap_or(0) >= max_per_key {
            drop(per_key);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *per_key.entry(key.clone()).or_insert(0) += 1;
        Some(HoldPlace {
            holds: self.clone(),
            key,
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
        let a1 = holds.claim(0, "a", 3, 2).unwrap();
        let _a2 = holds.claim(0, "a", 3, 2).unwrap();
        assert!(holds.claim(0, "a", 3, 2).is_none(), "per key");
        let _b1 = holds.claim(1, "a", 3, 2).unwrap();
        assert!(holds.claim(0, "c", 3, 2).is_none(), "total");
        assert_eq!(holds.held(), 3);
        drop(a1);
        assert_eq!(holds.held(), 2);
        assert!(holds.claim(0, "a", 3, 2).is_some());
    }

    #[test]
    fn a_zero_bound_holds_nothing_and_keeps_no_entries() {
        let holds = Arc::new(Holds::default());
        for k in 0..100 {
            assert!(holds.claim(0, &k.to_string(), 10, 0).is_none());
        }
        assert_eq!(holds.held(), 0);
        assert!(holds.per_key.lock().is_empty());
    }
}
