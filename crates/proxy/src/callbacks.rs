//! Results pushed to producers: a job with a callback URL (its `callback`,
//! or the intake's `Tollgate-Callback` header) has its final result POSTed
//! there, signed with HMAC-SHA256 over the body when `[proxy]
//! callback_secret_env` names a set secret, the job id in the payload and
//! in `Tollgate-Job-Id` so receivers can deduplicate. A callback is kept
//! in the state with the job's result (one transaction) until its receiver
//! answers 2xx; a receiver that never does is retried, then recorded as
//! undelivered (`tollgate_proxy_callbacks_total{outcome="undelivered"}`),
//! never dropped silently. A restart delivers what was pending: at least
//! once.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::header::{HeaderName, HeaderValue};
use hyper::HeaderMap;
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tollgate_http::webhook::Retries;
use tollgate_http::Refusal;
use tollgate_jobs::state::Callback;

/// The header a producer names a batch's callback URL in.
static CALLBACK: HeaderName = HeaderName::from_static("tollgate-callback");
/// Attempts per callback before it is recorded as undelivered (6), the
/// wait after the first failed one (1 s, doubled after each), and how long
/// a receiver has to answer one attempt (10 s).
const RETRIES: Retries = Retries {
    attempts: 6,
    first_wait: Duration::from_secs(1),
    timeout: Duration::from_secs(10),
};
/// Deliveries in flight at once.
const AT_ONCE: usize = 64;

pub(crate) use tollgate_http::webhook::Client;

/// `Tollgate-Callback` on an intake or a request queued with `Prefer:
/// respond-async`: checked, None when absent.
pub(crate) fn callback_header(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    let Some(value) = headers.get(&CALLBACK) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        Refusal::BadRequest("header Tollgate-Callback must be visible ASCII".into())
    })?;
    tollgate_jobs::job::callback_url(text.trim())
        .map(Some)
        .map_err(|m| Refusal::BadRequest(format!("header Tollgate-Callback: {m}")))
}

/// The payload POSTed for a job: what `GET /_tollgate/jobs/ID` shows once
/// it is final.
fn payload(id: &str, dead: bool, attempts: u32, line: &str) -> String {
    let result = serde_json::from_str::<serde_json::Value>(line).unwrap_or_default();
    serde_json::json!({
        "id": id,
        "status": if dead { "dead" } else { "done" },
        "attempts": attempts,
        "result": result,
    })
    .to_string()
}

/// The secret callbacks are signed with (`[proxy] callback_secret_env`),
/// if it is set.
pub(crate) fn secret(settings: &crate::ProxySettings) -> Option<String> {
    let name = &settings.callback_secret_env;
    let secret = std::env::var(name).ok().filter(|s| !s.is_empty());
    if secret.is_none() {
        tracing::info!("jobs: callbacks go unsigned ({name} is not set)");
    }
    secret
}

/// The callback of `job` (row or place `seq`) once it is final, if it has
/// a callback URL.
pub(crate) fn for_job(
    job: &tollgate_jobs::Job,
    seq: u64,
    dead: bool,
    attempts: u32,
    line: &str,
) -> Option<Callback> {
    let url = job.callback.clone()?;
    Some(Callback {
        seq,
        url,
        body: payload(&job.id, dead, attempts, line),
    })
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Delivers callbacks, each on a task of its own, and records how each
/// ended through `record`.
pub(crate) struct Courier {
    tx: mpsc::UnboundedSender<(Callback, String)>,
}

impl std::fmt::Debug for Courier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Courier").finish_non_exhaustive()
    }
}

impl Courier {
    /// Start delivering; `secret` signs each body (None: unsigned).
    /// `settled` is told how each delivery ended (the callback, its job's
    /// id, and the last error if the receiver never took it).
    pub(crate) fn start(
        client: Client,
        secret: Option<String>,
        settled: impl Fn(&Callback, &str, Result<(), String>) + Send + Sync + 'static,
    ) -> Courier {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Callback, String)>();
        let settled = Arc::new(settled);
        let secret = secret.map(|s| Arc::new(s.into_bytes()));
        tokio::spawn(async move {
            let at_once = Arc::new(Semaphore::new(AT_ONCE));
            while let Some((callback, id)) = rx.recv().await {
                let Ok(slot) = at_once.clone().acquire_owned().await else {
                    return;
                };
                let (client, settled, secret) = (client.clone(), settled.clone(), secret.clone());
                tokio::spawn(async move {
                    let secret = secret.as_ref().map(|s| s.as_slice());
                    let outcome = deliver(&client, &callback, &id, secret).await;
                    if let Err(error) = &outcome {
                        tracing::warn!(job = %id, url = %callback.url, "callback undelivered after {} attempts: {error}", RETRIES.attempts);
                    }
                    settled(&callback, &id, outcome);
                    drop(slot);
                });
            }
        });
        Courier { tx }
    }

    /// Deliver `callback` of job `id`.
    pub(crate) fn send(&self, callback: Callback, id: String) {
        let _ = self.tx.send((callback, id));
    }
}

/// Every attempt of one callback; the last error if none was taken.
async fn deliver(
    client: &Client,
    callback: &Callback,
    id: &str,
    secret: Option<&[u8]>,
) -> Result<(), String> {
    let body = Bytes::from(callback.body.clone());
    let mut headers = Vec::new();
    if let Ok(id) = HeaderValue::from_str(id) {
        headers.push((HeaderName::from_static("tollgate-job-id"), id));
    }
    if let Some(signed) = secret.and_then(|s| HeaderValue::from_str(&signature(s, &body)).ok()) {
        headers.push((HeaderName::from_static("tollgate-signature"), signed));
    }
    tollgate_http::webhook::post_json(client, &callback.url, body, &headers, RETRIES).await
}

/// The client callbacks are delivered with: HTTP, or TLS with the
/// system's roots (built once, with the proxy's upstream clients).
pub(crate) fn client() -> Result<Client, String> {
    tollgate_http::webhook::client(RETRIES.timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
