//! Writes done once. A repeated `Idempotency-Key` gets the answer the
//! first request with it got, without a call (`dedup`); a PATCH or PUT
//! that sends what the last successful one sent to the same URL is answered
//! from memory (`skip_unchanged`). Both are kept in memory, bounded in
//! bytes, for the upstream's `dedup` window.

use crate::cache::{related, url_path, Flight, Flights, Key, Partition, Stored};
use hyper::header::HeaderName;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::Nanos;

/// On answers from this memory: `hit` (a repeated Idempotency-Key) or
/// `unchanged` (a PATCH or PUT that changes nothing).
pub static TOLLGATE_DEDUP: HeaderName = HeaderName::from_static("tollgate-dedup");

/// `dedup` and `skip_unchanged` of an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct DedupSettings {
    /// Whether a repeated `Idempotency-Key` is answered from memory.
    pub idempotency: bool,
    /// Paths whose PATCH and PUT are skipped when they change nothing
    /// (at or under each prefix, at segment boundaries).
    pub skip_unchanged: Vec<String>,
    /// How long a write's answer is remembered (`dedup`, else 10 min).
    pub window: Duration,
    /// What the remembered answers hold in all (bodies, headers, 256 bytes
    /// each).
    pub max_bytes: u64,
}

impl DedupSettings {
    pub fn is_off(&self) -> bool {
        !self.idempotency && self.skip_unchanged.is_empty()
    }

    /// The largest answer body remembered: a sixteenth of `max_bytes`, at
    /// most 8 MiB (a larger one is relayed, not remembered).
    pub fn max_entry_bytes(&self) -> u64 {
        (self.max_bytes / 16).min(8 << 20)
    }
}

/// A write's request, as compared: a digest of its method, URL and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asked([u8; 32]);

impl Asked {
    pub fn of(method: &str, url: &str, body: &[u8]) -> Asked {
        let parts: [&[u8]; 3] = [method.as_bytes(), url.as_bytes(), body];
        let Partition(digest) = Partition::of(parts);
        Asked(digest)
    }
}

/// A write answered, and what it asked.
#[derive(Debug)]
pub struct Done {
    pub asked: Asked,
    pub answer: Arc<Stored>,
}

/// An upstream's remembered writes.
pub struct Writes {
    settings: DedupSettings,
    /// By partition and Idempotency-Key.
    by_key: moka::sync::Cache<(Partition, String), Arc<Done>>,
    /// The last successful PATCH or PUT of a URL, by method, URL and
    /// partition.
    last: moka::sync::Cache<Key, Arc<Done>>,
    flights: Flights,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn store<K>(max_bytes: u64) -> moka::sync::Cache<K, Arc<Done>>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_: &K, done: &Arc<Done>| done.answer.weight())
        .support_invalidation_closures()
        .build()
}

impl Writes {
    pub fn new(settings: &DedupSettings) -> Writes {
        // Each store may take the whole bound; only a config with both uses
        // both.
        Writes {
            by_key: store(settings.max_bytes),
            last: store(settings.max_bytes),
            settings: settings.clone(),
            flights: Flights::default(),
        }
    }

    pub fn settings(&self) -> &DedupSettings {
        &self.settings
    }

    pub fn is_off(&self) -> bool {
        self.settings.is_off()
    }

    /// The answer the first request with Idempotency-Key `key` got, while
    /// it is remembered.
    pub fn answered(&self, partition: Partition, key: &str, now: Nanos) -> Option<Arc<Done>> {
        self.by_key
            .get(&(partition, key.to_string()))
            .filter(|done| done.answer.is_fresh(now))
    }

    pub fn remember(&self, partition: Partition, key: &str, done: Arc<Done>) {
        self.by_key.insert((partition, key.to_string()), done);
    }

    /// Join the request in flight with Idempotency-Key `key`, or lead.
    pub fn flight(&self, partition: Partition, key: &str) -> Flight {
        let id = Key {
            method: "Idempotency-Key".into(),
            url: key.into(),
            partition,
        };
        self.flights.join(0, 0, &id)
    }

    /// Whether a `method` to `path` is skipped when unchanged.
    pub fn watches(&self, method: &str, path: &str) -> bool {
        matches!(method, "PATCH" | "PUT")
            && self.settings.skip_unchanged.iter().any(|prefix| {
                let prefix = prefix.trim_end_matches('/');
                path.strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }

    /// The answer of the last successful write `key` that asked just
    /// this, while it is remembered.
    pub fn unchanged(&self, key: &Key, asked: Asked, now: Nanos) -> Option<Arc<Stored>> {
        self.last
            .get(key)
            .filter(|done| done.asked == asked && done.answer.is_fresh(now))
            .map(|done| done.answer.clone())
    }

    /// A watched write succeeded: what it sent is the URL's state now.
    pub fn succeeded(&self, key: Key, done: Arc<Done>) {
        self.last.insert(key, done);
    }

    /// A write to `path` happened: what was remembered of it, and of the
    /// paths under and above it, no longer says what they hold.
    pub fn written(&self, path: &str) {
        if self.settings.skip_unchanged.is_empty() {
            return;
        }
        let written = path.trim_end_matches('/').to_string();
        let _ = self
            .last
            .invalidate_entries_if(move |key, _| related(&url_path(&key.url), &written));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hyper::{HeaderMap, StatusCode};

    fn settings() -> DedupSettings {
        DedupSettings {
            idempotency: true,
            skip_unchanged: vec!["/v1/contacts".into()],
            window: Duration::from_secs(600),
            max_bytes: 1 << 20,
        }
    }

    fn done(asked: Asked, now: Nanos) -> Arc<Done> {
        Arc::new(Done {
            asked,
            answer: Arc::new(Stored::new(
                StatusCode::CREATED,
                HeaderMap::new(),
                Bytes::from_static(b"{\"id\":1}"),
                &HeaderMap::new(),
                Duration::from_secs(600),
                now,
            )),
        })
    }

    #[test]
    fn an_answer_is_remembered_per_partition_and_key_for_the_window() {
        let writes = Writes::new(&settings());
        let a = Partition::of([b"a".as_slice()]);
        let b = Partition::of([b"b".as_slice()]);
        let asked = Asked::of("POST", "http://h/v1/jobs", b"{}");
        writes.remember(a, "k1", done(asked, 0));
        assert_eq!(writes.answered(a, "k1", 1).map(|d| d.asked), Some(asked));
        assert!(
            writes.answered(b, "k1", 1).is_none(),
            "another tenant's key"
        );
        assert!(writes.answered(a, "k2", 1).is_none());
        assert!(
            writes.answered(a, "k1", 600_000_000_000).is_none(),
            "past the window"
        );
        assert_ne!(asked, Asked::of("POST", "http://h/v1/jobs", b"{ }"));
        assert_ne!(asked, Asked::of("PUT", "http://h/v1/jobs", b"{}"));
    }

    #[test]
    fn an_unchanged_write_is_known_until_another_write_touches_its_path() {
        let writes = Writes::new(&settings());
        assert!(writes.watches("PATCH", "/v1/contacts/5"));
        assert!(writes.watches("PUT", "/v1/contacts"));
        assert!(!writes.watches("POST", "/v1/contacts"));
        assert!(!writes.watches("PATCH", "/v1/contactsx"));
        let partition = Partition::of([b"a".as_slice()]);
        let key = Key {
            method: "PATCH".into(),
            url: "http://h/v1/contacts/5".into(),
            partition,
        };
        let asked = Asked::of("PATCH", &key.url, b"{\"name\":\"Ada\"}");
        writes.succeeded(key.clone(), done(asked, 0));
        assert!(writes.unchanged(&key, asked, 1).is_some());
        let other = Asked::of("PATCH", &key.url, b"{\"name\":\"Grace\"}");
        assert!(writes.unchanged(&key, other, 1).is_none());
        writes.written("/v1/contacts/6");
        assert!(writes.unchanged(&key, asked, 1).is_some(), "a sibling");
        writes.written("/v1/contacts/5");
        assert!(writes.unchanged(&key, asked, 1).is_none());
    }
}
