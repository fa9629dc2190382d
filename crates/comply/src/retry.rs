//! The retry and backoff policy: what a status means for the call, and how
//! long to wait before the next attempt.

use std::time::Duration;
use tollgate_core::Nanos;

/// Exponential backoff stops doubling here (the GTM rate-limiting guide:
/// "a maximum wait time (30-60 seconds)").
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Jitter added to a Retry-After wait (Celigo's rate-limit page: "a small
/// jitter (≤ 250 ms)").
const RETRY_AFTER_JITTER_MS: u64 = 250;
/// Jitter added to a wait cut short at a window's reset: a little, as every
/// caller of the window resumes there anyway.
const RESET_JITTER_MS: u64 = 25;
/// Jitter added to an exponential backoff (a CRM's rate-limit page and the
/// GTM rate-limiting guide: 0 to 1 s).
const BACKOFF_JITTER_MS: u64 = 1000;

/// What an upstream's status says about the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx, 304: done.
    Success,
    /// 429: out of quota; wait (Retry-After, or backoff) and try again.
    Throttled,
    /// 408, 5xx: the upstream failed; back off and try again.
    Transient,
    /// 3xx: not followed.
    Redirect,
    /// Any other 4xx: the request itself is wrong; retrying only spends quota.
    Rejected,
}

pub fn classify(status: u16) -> Class {
    match status {
        200..=299 | 304 => Class::Success,
        429 => Class::Throttled,
        408 | 500..=599 => Class::Transient,
        300..=399 => Class::Redirect,
        _ => Class::Rejected,
    }
}

/// Backoff waits, with jitter from a seeded generator (tests pick the seed).
#[derive(Debug)]
pub(crate) struct Backoff {
    rng: fastrand::Rng,
}

impl Backoff {
    pub(crate) fn new(seed: u64) -> Self {
        Backoff {
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// After a 429: its Retry-After plus up to 250 ms, or the exponential
    /// backoff when it gave none.
    pub(crate) fn after_throttle(
        &mut self,
        retry_after: Option<Duration>,
        attempts: u32,
    ) -> Duration {
        match retry_after {
            Some(after) => after + self.jitter(RETRY_AFTER_JITTER_MS),
            None => self.after_failure(attempts),
        }
    }

    /// After a 429 whose `Retry-After` is `retry_after`: the local view's
    /// `reset` (plus a little jitter) when it falls in that Retry-After's
    /// last second, else None. A `Retry-After` in whole seconds is the
    /// vendor's time to its reset rounded up; with a window of a second or
    /// so, waiting it out whole skips the next window for a reset that came
    /// a fraction of a second later.
    pub(crate) fn until_reset(
        &mut self,
        retry_after: Duration,
        reset: Duration,
    ) -> Option<Duration> {
        let last_second = retry_after.saturating_sub(Duration::from_secs(1));
        (!reset.is_zero() && reset > last_second && reset <= retry_after)
            .then(|| (reset + self.jitter(RESET_JITTER_MS)).min(retry_after))
    }

    /// Exponential backoff after `attempts` failed attempts: 1, 2, 4, 8,
    /// 16 s ... up to a minute, plus up to 1 s of jitter.
    pub(crate) fn after_failure(&mut self, attempts: u32) -> Duration {
        let base = Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6)).min(MAX_BACKOFF);
        base + self.jitter(BACKOFF_JITTER_MS)
    }

    fn jitter(&mut self, max_ms: u64) -> Duration {
        Duration::from_micros(self.rng.u64(0..=max_ms * 1000))
    }
}

pub(crate) fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
