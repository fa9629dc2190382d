//! An upstream's pool of vendor keys (the GTM rate-limiting guide's
//! multi-key distribution): the limits apply per key, each call takes the
//! key whose line is shortest (the soonest slot when the keys' limits are
//! alike), and a key the vendor refuses is parked while the rest carry on.
//! The keys themselves live in the upstream's settings; this is their state.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Debug, Default)]
struct KeyState {
    /// Why the vendor refused it (None: in use).
    parked: Mutex<Option<String>>,
    /// Calls that took it and wait for their slot.
    waiting: AtomicUsize,
    /// Wakes those calls when it is parked, to take another key.
    on_park: tokio::sync::Notify,
}

#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Vec<KeyState>,
    /// Where ties start, so equal keys take turns.
    next: AtomicUsize,
}

/// A key taken for one call; while it waits it counts in its key's line.
#[derive(Debug)]
pub struct KeyLease<'p> {
    pool: &'p KeyPool,
    index: usize,
    sent: AtomicBool,
}

/// One key as `/v1/usage` shows it (by position; never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub waiting: usize,
    pub parked: Option<String>,
}

impl KeyPool {
    pub fn new(keys: usize) -> Self {
        KeyPool {
            keys: (0..keys).map(|_| KeyState::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The key for the next call: None when the upstream has no pool; Err
    /// with each key's reason when every key is parked.
    pub fn choose(&self) -> Result<Option<KeyLease<'_>>, Vec<String>> {
        self.choose_except(None)
    }

    /// `choose`, never taking key `skip` (a key under suspicion).
    pub fn choose_except(&self, skip: Option<usize>) -> Result<Option<KeyLease<'_>>, Vec<String>> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.keys.len();
        let best = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| Some(i) != skip && self.keys[i].parked.lock().is_none())
            .min_by_key(|&i| self.keys[i].waiting.load(Ordering::Relaxed));
        match best {
            Some(index) => {
                self.keys[index].waiting.fetch_add(1, Ordering::Relaxed);
                Ok(Some(KeyLease {
                    pool: self,
                    index,
                    sent: AtomicBool::new(false),
                }))
            }
            None => Err(self
                .keys
                .iter()
                .map(|k| k.parked.lock().clone().unwrap_or_default())
                .collect()),
        }
    }

    /// The vendor refused key `index`: no call takes it any more, and the
    /// calls waiting with it take another.
    pub fn park(&self, index: usize, reason: String) {
        let state = &self.keys[index];
        *state.parked.lock() = Some(reason);
        state.on_park.notify_waiters();
    }

    /// Put every parked key back in use (a reload: the keys may be fixed).
    /// The number that were parked.
    pub fn unpark_all(&self) -> usize {
        self.keys
            .iter()
            .filter(|k| k.parked.lock().take().is_some())
            .count()
    }

    pub fn status(&self) -> Vec<KeyStatus> {
        self.keys
            .iter()
            .map(|k| KeyStatus {
                waiting: k.waiting.load(Ordering::Relaxed),
                parked: k.parked.lock().clone(),
            })
            .collect()
    }
}

impl KeyLease<'_> {
    /// The key's position in the upstream's `keys`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its call got its slot: it no longer counts as waiting.
    pub fn sent(&self) {
        if !self.sent.swap(true, Ordering::Relaxed) {
            self.pool.keys[self.index]
                .waiting
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether the vendor refused this key since it was taken.
    pub fn is_parked(&self) -> bool {
        self.pool.keys[self.index].parked.lock().is_some()
    }

    /// Resolves when this key is parked (at once if it is).
    pub async fn parked(&self) {
        let state = &self.pool.keys[self.index];
        let notified = state.on_park.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_parked() {
            return;
        }
        notified.await;
    }

    /// The vendor refused this key: no call takes it any more, and the
    /// calls waiting with it take another.
    pub fn park(&self, reason: String) {
        self.pool.park(self.index, reason);
    }
}

impl Drop for KeyLease<'_> {
    fn drop(&mut self) {
        self.sent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_take_the_key_with_the_shortest_line_and_skip_parked_ones() {
        let pool = KeyPool::new(3);
        let a = pool.choose().unwrap().unwrap();
        let b = pool.choose().unwrap().unwrap();
        let c = pool.choose().unwrap().unwrap();
        let mut taken = vec![a.index(), b.index(), c.index()];
        taken.sort_unstable();
        assert_eq!(taken, vec![0, 1, 2], "one each");
        a.sent();
        let d = pool.choose().unwrap().unwrap();
        assert_eq!(d.index(), a.index(), "the key with no one waiting");
        b.park("HTTP 401".into());
        let parked = b.index();
        drop((b, c, d));
        for _ in 0..10 {
            let k = pool.choose().unwrap().unwrap();
            assert_ne!(k.index(), parked, "a parked key is never taken");
        }
        assert!(pool.status().iter().all(|k| k.waiting == 0));
        a.park("HTTP 403".into());
        let last = (0..3).find(|&i| i != a.index() && i != parked).unwrap();
        pool.choose().unwrap().unwrap().park("HTTP 402".into());
        let reasons = pool.choose().unwrap_err();
        assert_eq!(reasons.len(), 3);
        assert_eq!(pool.status()[last].parked.as_deref(), Some("HTTP 402"));
    }

    #[test]
    fn a_suspected_key_is_skipped_until_it_is_cleared_or_parked() {
        let pool = KeyPool::new(2);
        for _ in 0..4 {
            assert_eq!(pool.choose_except(Some(0)).unwrap().unwrap().index(), 1);
        }
        pool.park(1, "HTTP 401".into());
        assert!(
            pool.choose_except(Some(0)).is_err(),
            "no key but the suspect"
        );
        assert_eq!(pool.choose().unwrap().unwrap().index(), 0);
    }

    #[test]
    fn no_pool_takes_no_key() {
        assert!(KeyPool::new(0).choose().unwrap().is_none());
    }
}
