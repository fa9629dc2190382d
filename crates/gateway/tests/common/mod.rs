//! A real upstream and a real gateway on 127.0.0.1 with ephemeral ports.

#![allow(dead_code)] // each test binary uses its own part of the harness

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_core::NoProfiles;
use tollgate_gateway::{Gateway, Overrides, Source, TokioClock};

/// 2026-01-01T00:00:00Z: windows in tests start on known boundaries.
pub const EPOCH: u64 = 1_767_225_600_000_000_000;

/// A body that sends one byte every 50 ms, 1000 times: a response that is
/// still streaming while the test looks at the gateway.
struct Trickle {
    tick: tokio::time::Interval,
    left: u32,
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.tick.poll_tick(cx) {
            Poll::Ready(_) => {
                self.left -= 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The test upstream: `/slow/MS` answers after MS ms (tokio time),
/// `/trickle` streams slowly, `/status/CODE` answers CODE, `/close` answers
/// 200 and closes the connection, anything else 200 with `ok <path>`. It
/// counts the requests it received and the connections they came on.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub received: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

pub async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let received = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (counter, accepted) = (received.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    answer(req)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        received,
        connections,
    }
}

type UpBody = Either<Full<Bytes>, Trickle>;

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_string();
    let seen_host = (req.headers().get(hyper::header::HOST))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let seen_forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body_len = req
        .into_body()
        .collect()
        .await
        .map_or(0, |b| b.to_bytes().len());
    let full = |status: u16, text: String| {
        let mut r = Response::new(Either::Left(Full::new(Bytes::from(text))));
        *r.status_mut() = StatusCode::from_u16(status).expect("status");
        Ok(r)
    };
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return full(200, format!("slept {ms}"));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return full(code.parse().unwrap_or(500), format!("status {code}"));
    }
    if path == "/host" {
        return full(200, format!("host {seen_host}"));
    }
    if path == "/close" {
        let mut r = full(200, "closing".into())?;
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return Ok(r);
    }
    if path == "/trickle" {
        let tick = tokio::time::interval(Duration::from_millis(50));
        return Ok(Response::new(Either::Right(Trickle { tick, left: 1000 })));
    }
    full(
        200,
        format!("ok {path} body={body_len} xff={seen_forwarded}"),
    )
}

/// A gateway serving until dropped (or `shutdown`).
pub struct Running {
    pub gateway: Arc<Gateway>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The Envoy rate limit service, when the config has `[rls]`.
    pub rls: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
    /// Stop accepting and wait for requests in flight (the shutdown grace).
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("serve task");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The gateway section every test config starts with.
pub fn gateway_section(upstream: SocketAddr) -> String {
    format!("[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nupstream = \"http://{upstream}\"\naccess_log = \"off\"\n")
}

pub async fn start(config: &str) -> Running {
    start_with(Source::Text(config.to_string()), Box::new(NoProfiles), 1).await
}

pub async fn start_file(path: PathBuf) -> Running {
    start_with(Source::File(path), Box::new(NoProfiles), 1).await
}

/// With the bundled profiles available to `profile = "NAME"`.
pub async fn start_with_profiles(config: &str) -> Running {
    let profiles = Box::new(tollgate_profiles::Bundled);
    start_with(Source::Text(config.to_string()), profiles, 1).await
}

/// On `workers` threads, as `tollgate serve` runs (1: on the test's runtime alone).
pub async fn start_workers(config: &str, workers: usize) -> Running {
    start_with(
        Source::Text(config.to_string()),
        Box::new(NoProfiles),
        workers,
    )
    .await
}

async fn start_with(
    source: Source,
    profiles: Box<dyn tollgate_core::ProfileSource + Send + Sync>,
    workers: usize,
) -> Running {
    let gateway = Gateway::new(
        source,
        Overrides::default(),
        profiles,
        TokioClock::starting_at(EPOCH),
    )
    .expect("config loads");
    let gateway = Arc::new(gateway);
    let listeners = gateway.listeners().await.expect("bind");
    let proxy = listeners.proxy.local_addr().expect("addr");
    let admin = listeners
        .admin
        .as_ref()
        .expect("admin listener")
        .local_addr()
        .expect("addr");
    let rls = listeners
        .rls
        .as_ref()
        .map(|l| l.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tollgate_gateway::serve_workers(gateway.clone(), listeners, workers, async {
        let _ = rx.await;
    });
    let task = tokio::spawn(async move {
        serving.await.expect("workers start");
    });
    Running {
        gateway,
        proxy,
        admin,
        rls,
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// Send a request; the response (any status).
pub async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    request.send().await.expect("request")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

pub async fn get(client: &reqwest::Client, url: &str, tenant: &str) -> reqwest::Response {
    send(client.get(url).header("x-tenant-id", tenant)).await
}

pub fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii").to_string())
}

/// A temporary directory for config files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-gw-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
