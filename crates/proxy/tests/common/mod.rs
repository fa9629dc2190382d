//! What the proxy's tests share: a proxy started in process on free
//! loopback ports, and a client that does not itself use any proxy.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use tollgate_proxy::{Overrides, Proxy, Source};
use tollgate_store::TokioClock;

/// 2026-01-01T00:00:00Z.
pub const EPOCH: u64 = 1_767_225_600_000_000_000;

#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub proxy: Arc<Proxy>,
}

impl Running {
    /// `http://ADDR/<upstream><path>`: the alias URL.
    pub fn url(&self, upstream: &str, path: &str) -> String {
        format!("http://{}/{upstream}{path}", self.addr)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// A proxy serving `config` on free loopback ports, on tokio's clock.
pub async fn start(config: &str) -> Running {
    start_at(config, TokioClock::starting_at(EPOCH)).await
}

pub async fn start_at(config: &str, clock: TokioClock) -> Running {
    // Quiet unless the test's own [proxy] table says otherwise.
    let text = if config.contains("[proxy]") {
        format!("{config}\n")
    } else {
        format!("[proxy]\naccess_log = \"off\"\n{config}\n")
    };
    start_from(Source::Text(text), clock).await
}

/// A proxy serving the config `source` gives (a file, to reload a change).
pub async fn start_from(source: Source, clock: TokioClock) -> Running {
    start_until(source, clock, std::future::pending()).await.0
}

/// `start_from`, serving until `shutdown` completes; the handle ends when
/// the proxy has drained.
pub async fn start_until(
    source: Source,
    clock: TokioClock,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Running, tokio::task::JoinHandle<()>) {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        admin_listen: Some("127.0.0.1:0".parse().expect("addr")),
    };
    let proxy = Arc::new(
        Proxy::new(
            source,
            overrides,
            Box::new(tollgate_profiles::Bundled),
            clock,
        )
        .expect("proxy config"),
    );
    let listeners = proxy.listeners().await.expect("bind");
    let addr = listeners.proxy.local_addr().expect("addr");
    let admin = listeners
        .admin
        .as_ref()
        .and_then(|a| a.local_addr().ok())
        .expect("admin addr");
    let serving = tollgate_proxy::serve(proxy.clone(), listeners, shutdown);
    let served = tokio::spawn(async move {
        let _ = serving.await;
    });
    (Running { addr, admin, proxy }, served)
}

/// An `[[upstream]]` named `name` at `addr` with `extra` lines (limits...).
pub fn upstream(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!("[[upstream]]\nname = \"{name}\"\nbase_url = \"http://{addr}\"\n{extra}\n")
}

/// A client that ignores HTTP_PROXY and friends.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

/// A token bucket for an upstream: `capacity` at once, `refill` after.
pub fn bucket(name: &str, capacity: u64, refill: &str) -> String {
    format!("[[upstream.limit]]\nname = \"{name}\"\nalgorithm = \"token_bucket\"\ncapacity = {capacity}\nrefill = \"{refill}\"\n")
}

/// GET `url` with `headers`.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = client().get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("response")
}

/// `Tollgate-Attempts`: the calls to the upstream an answer took.
pub fn attempts(r: &reqwest::Response) -> u32 {
    r.headers()["tollgate-attempts"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number")
}

/// GET `url`; its body as JSON.
pub async fn json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .expect("response")
        .json()
        .await
        .expect("json")
}

/// GET `url`; its body as text.
pub async fn text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .expect("response")
        .text()
        .await
        .expect("text")
}
