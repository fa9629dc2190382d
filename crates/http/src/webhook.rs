//! POSTing JSON to a receiver that may be down: each attempt bounded in
//! time, failed ones retried with doubling waits. The proxy's job callbacks
//! and the alerts' webhooks both deliver so.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request};
use std::time::Duration;

/// An HTTP client for receivers: HTTP, or TLS with the system's roots.
pub type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// How a receiver is retried.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Attempts before giving up.
    pub attempts: u32,
    /// The wait after the first failed attempt; doubled after each.
    pub first_wait: Duration,
    /// How long a receiver has to answer one attempt.
    pub timeout: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 6,
            first_wait: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A client for receivers (built once and shared).
pub fn client(connect_timeout: Duration) -> Result<Client, String> {
    let tls = crate::tls::client_config(None, None)?;
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(crate::tls::https_connector(tls, connect_timeout)),
    )
}

/// POST `body` as JSON to `url` until the receiver answers 2xx, with
/// `headers` and `Tollgate-Delivery-Attempt` on each attempt; the last
/// error if it never did. Errors never repeat the URL (it may hold a
/// secret, as Slack's webhook URLs do).
pub async fn post_json(
    client: &Client,
    url: &str,
    body: Bytes,
    headers: &[(HeaderName, HeaderValue)],
    retries: Retries,
) -> Result<(), String> {
    let mut wait = retries.first_wait;
    let mut error = String::new();
    for attempt in 1..=retries.attempts {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(CONTENT_TYPE, "application/json")
            .header("tollgate-delivery-attempt", attempt);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = match request.body(Full::new(body.clone())) {
            Ok(r) => r,
            Err(e) => return Err(format!("cannot be sent: {e}")),
        };
        error = match tokio::time::timeout(retries.timeout, client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => return Ok(()),
            Ok(Ok(response)) => format!("the receiver answered {}", response.status()),
            Ok(Err(e)) => format!("the receiver could not be reached: {}", without_url(&e)),
            Err(_) => format!(
                "the receiver did not answer within {}s",
                retries.timeout.as_secs()
            ),
        };
        if attempt < retries.attempts {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    Err(error)
}

/// A client error's cause without the URL it was for.
fn without_url(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    match e.source() {
        Some(cause) => cause.to_string(),
        None => e.to_string(),
    }
}
