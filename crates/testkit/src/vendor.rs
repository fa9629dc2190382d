//! The tollgate gateway playing a vendor: it enforces a bundled profile in
//! front of an echo upstream, so a comply-side test meets the vendor's
//! published limits enforced by an engine it does not share.

use crate::upstream::{ok, scripted};
use std::net::SocketAddr;
use std::sync::Arc;
use tollgate_store::TokioClock;

/// The gateway enforcing `profile` in front of an echo upstream; its proxy
/// address and the gateway.
pub async fn gateway(
    profile: &str,
    clock: TokioClock,
) -> (SocketAddr, Arc<tollgate_gateway::Gateway>) {
    gateway_enforcing(&format!("profile = \"{profile}\"\n"), clock).await
}

/// The gateway enforcing `limits` (a profile line or `[[limit]]` tables)
/// in front of an echo upstream.
pub async fn gateway_enforcing(
    limits: &str,
    clock: TokioClock,
) -> (SocketAddr, Arc<tollgate_gateway::Gateway>) {
    let echo = scripted(|_, _| ok()).await;
    let config = format!(
        "{limits}[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = \"off\"\nupstream = \"http://{}\"\n",
        echo.addr
    );
    let gateway = Arc::new(
        tollgate_gateway::Gateway::new(
            tollgate_gateway::Source::Text(config),
            tollgate_gateway::Overrides::default(),
            Box::new(tollgate_profiles::Bundled),
            clock,
        )
        .expect("gateway config"),
    );
    let listeners = gateway.listeners().await.expect("bind");
    let addr = listeners.proxy.local_addr().expect("addr");
    let serving =
        tollgate_gateway::serve_workers(gateway.clone(), listeners, 1, std::future::pending());
    tokio::spawn(async move {
        let _ = serving.await;
    });
    (addr, gateway)
}

/// What a `token_bucket` vendor decided: when (from its first request) and
/// whether the call was admitted.
pub type Verdicts = crate::upstream::Shared<Vec<(std::time::Duration, bool)>>;

/// The share of calls a `token_bucket` vendor refused.
pub fn refused_share(verdicts: &[(std::time::Duration, bool)]) -> f64 {
    verdicts.iter().filter(|(_, ok)| !ok).count() as f64 / verdicts.len() as f64
}

/// Calls a `token_bucket` vendor admitted per second between `from` and
/// `to` seconds after its first request.
pub fn admitted_rate(verdicts: &[(std::time::Duration, bool)], from: f64, to: f64) -> f64 {
    let admitted = verdicts
        .iter()
        .filter(|(at, ok)| *ok && (from..to).contains(&at.as_secs_f64()))
        .count();
    admitted as f64 / (to - from)
}

/// Calls admitted per second from `from` seconds to the last call the
/// vendor saw (that one included).
pub fn admitted_since(verdicts: &[(std::time::Duration, bool)], from: f64) -> f64 {
    let end = verdicts.last().expect("calls").0.as_secs_f64();
    let admitted = verdicts
        .iter()
        .filter(|(at, ok)| *ok && at.as_secs_f64() >= from)
        .count();
    admitted as f64 / (end - from)
}

/// A vendor that is not tollgate's engine: a token bucket of `capacity`
/// over arrival times, refilling at `rate(t)` per second at `t` after its
/// first request (a vendor that changes its limit mid-run), answering 429
/// with no `Retry-After` and no rate-limit headers, as nginx's `limit_req`
/// does. It starts full.
pub async fn token_bucket(
    capacity: u64,
    rate: impl Fn(std::time::Duration) -> f64 + Send + Sync + 'static,
) -> (crate::upstream::Scripted, Verdicts) {
    token_bucket_per_key(capacity, move |_, t| rate(t)).await
}

/// `token_bucket`, with a bucket per `Authorization` header (a vendor that
/// counts per API key), refilling at `rate(authorization, t)`.
pub async fn token_bucket_per_key(
    capacity: u64,
    rate: impl Fn(&str, std::time::Duration) -> f64 + Send + Sync + 'static,
) -> (crate::upstream::Scripted, Verdicts) {
    use crate::upstream::{scripted_seen, Answer};
    /// Tokens, and when they were counted (seconds from the first arrival).
    struct Bucket {
        tokens: f64,
        at: f64,
    }
    let first = std::sync::Mutex::new(None::<tokio::time::Instant>);
    let buckets = std::sync::Mutex::new(std::collections::HashMap::<String, Bucket>::new());
    let verdicts: Verdicts = Default::default();
    let kept = verdicts.clone();
    let upstream = scripted_seen(move |seen, _| {
        let first = *first.lock().expect("lock").get_or_insert(seen.at);
        let t = seen.at - first;
        let now = t.as_secs_f64();
        let key = seen.authorization.clone().unwrap_or_default();
        let mut buckets = buckets.lock().expect("lock");
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: capacity as f64,
            at: now,
        });
        b.tokens = (b.tokens + (now - b.at) * rate(&key, t)).min(capacity as f64);
        b.at = now;
        let admitted = b.tokens >= 1.0;
        if admitted {
            b.tokens -= 1.0;
        }
        kept.lock().expect("lock").push((t, admitted));
        match admitted {
            true => ok(),
            false => Answer::Status(429, vec![], "{\"error\":\"rate limited\"}"),
        }
    })
    .await;
    (upstream, verdicts)
}
