//! Listeners and connections, the same for every face: a proxy port bound
//! with SO_REUSEPORT (one socket per worker thread), HTTP/1.1 (and for the
//! gateway HTTP/2, over TLS or by prior knowledge) with bounded heads and an
//! idle timeout, an accept loop that survives accept errors,
//! and a graceful drain when told to stop.

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown, Watcher};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Largest request head (line and headers) read; past it the client gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// 431 when a request's headers add up to more than `MAX_HEAD_BYTES`
/// (hyper bounds the head it buffers only loosely, by read chunks).
pub fn check_head_size(headers: &hyper::HeaderMap) -> Result<(), crate::Refusal> {
    let bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if bytes > MAX_HEAD_BYTES {
        return Err(crate::Refusal::HeadersTooLarge {
            max: MAX_HEAD_BYTES,
        });
    }
    Ok(())
}

/// What the listeners serve a connection with: a hyper service whose
/// futures can move between threads (the bounds every `serve_*` needs).
pub trait ConnectionService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
    + 'static
{
}

impl<S, B> ConnectionService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Send
        + 'static
{
}

/// A response body the listeners can send from any thread.
pub trait ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> ResponseBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// How long a connection may go without a request: one that has had no
/// request in flight and begun none for a whole `IDLE_TIMEOUT` is cut off
/// (see `Activity`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A listening socket with SO_REUSEPORT, so that each worker thread can
/// accept on its own socket of the same address (the kernel spreads
/// connections over them).
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The first socket of a worker group on `addr`. SO_REUSEPORT would let a
/// second tollgate share the address and split the traffic (and the quotas):
/// first make sure it is free. Errors name the address.
pub fn bind_workers(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr).map_err(named(addr))?);
    }
    reuseport_listener(addr)
        .and_then(TcpListener::from_std)
        .map_err(named(addr))
}

/// A plain listener (admin ports); errors name the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(named(addr))
}

fn named(addr: SocketAddr) -> impl Fn(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
}

/// The listeners a face serves on: its main port (the proxy or gateway
/// port) and its admin port.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
    /// The gateway's Envoy rate limit service (gRPC), when `[rls]` asks.
    pub rls: Option<TcpListener>,
}

impl Listeners {
    /// Bind `main` (for worker threads of their own with `workers`, see
    /// `bind_workers`) and `admin`; errors name the address.
    pub async fn bind(
        main: SocketAddr,
        admin: Option<SocketAddr>,
        workers: bool,
    ) -> std::io::Result<Listeners> {
        let proxy = if workers {
            bind_workers(main)?
        } else {
            bind(main).await?
        };
        let admin = match admin {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        Ok(Listeners {
            proxy,
            admin,
            rls: None,
        })
    }
}

/// A connection accepted by `accept_loop`.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Accepted on the admin listener.
    pub admin: bool,
}

/// An HTTP/1.1 server connection builder with the shared bound on the
/// head size. Served with `spawn_bounded`, which bounds the time a client
/// may take to send a head: hyper's own header read timeout is off, as it
/// costs a timer set and removed per request (8% of a refused request's
/// instructions, 4% of a proxied one's).
fn http1_server() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(MAX_HEAD_BYTES)
        .header_read_timeout(None);
    builder
}

/// A connection's requests, for `spawn_bounded`: how many began, and how
/// many are in flight (from the service's call until the response body
/// ends or is dropped).
#[derive(Debug, Default)]
struct Activity {
    began: AtomicU64,
    in_flight: AtomicUsize,
    /// The connection's task ended.
    ended: tokio::sync::Notify,
}

impl Activity {
    /// `service`, counting its requests here.
    fn count<S>(self: &Arc<Self>, service: S) -> Counted<S> {
        Counted {
            inner: service,
            activity: self.clone(),
        }
    }
}

/// A request in flight, until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A service whose requests an `Activity` counts.
#[derive(Debug, Clone)]
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<InFlightBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.began.fetch_add(1, Ordering::Relaxed);
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        CountedFuture {
            inner: self.inner.call(request),
            in_flight: Some(InFlight(self.activity.clone())),
        }
    }
}

pin_project_lite::pin_project! {
    /// A counted request's answer: its body keeps the request in flight.
    struct CountedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<InFlightBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        let in_flight = this.in_flight.take();
        Poll::Ready(answer.map(|r| r.map(|inner| InFlightBody { inner, in_flight })))
    }
}

pin_project_lite::pin_project! {
    /// A response body; its request is in flight until it ends or is dropped.
    struct InFlightBody<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            *this.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve `connection` (whose service `activity` counts) on a task of its
/// own, watched by `watcher` so a shutdown lets its requests finish, and cut
/// it off once it has been idle for `idle`: no request in flight and none
/// begun over a whole `idle`, checked every `idle`. So a client that sends
/// nothing, or sends a head slower than that (slowloris), loses the
/// connection one to two `idle`s after its last request ended. One timer per
/// connection, not per request.
fn spawn_bounded<C>(
    connection: C,
    activity: Arc<Activity>,
    watcher: Option<Watcher>,
    idle: Duration,
) where
    C: GracefulConnection + Send + 'static,
    C::Error: Send,
{
    let ended = Ended(activity.clone());
    let task = tokio::spawn(async move {
        let _ended = ended;
        let _ = match watcher {
            Some(watcher) => watcher.watch(connection).await,
            None => connection.await,
        };
    });
    tokio::spawn(cut_when_idle(activity, task.abort_handle(), idle));
}

/// Tells the watchdog that its connection's task ended (or was aborted).
struct Ended(Arc<Activity>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended.notify_one();
    }
}

async fn cut_when_idle(activity: Arc<Activity>, connection: AbortHandle, idle: Duration) {
    let mut seen = activity.began.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            () = tokio::time::sleep(idle) => {}
            () = activity.ended.notified() => return,
        }
        let began = activity.began.load(Ordering::Relaxed);
        if began == seen && activity.in_flight.load(Ordering::Relaxed) == 0 {
            connection.abort();
            return;
        }
        seen = began;
    }
}

/// Serve one connection with HTTP/1.1 under the shared bounds, watched by
/// `graceful` so a shutdown lets its request finish.
pub fn serve_http1<S, B>(stream: TcpStream, service: S, graceful: &GracefulShutdown)
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let _ = stream.set_nodelay(true);
    serve_http1_io(TokioIo::new(stream), service, Some(graceful.watcher()));
}

/// `serve_http1` over a stream accepted elsewhere (a tunnel's inside),
/// watched by `watcher` if there is one.
pub fn serve_http1_io<I, S, B>(io: I, service: S, watcher: Option<Watcher>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let activity = Arc::<Activity>::default();
    let connection = http1_server().serve_connection(io, activity.count(service));
    spawn_bounded(connection, activity, watcher, IDLE_TIMEOUT);
}

/// `serve_http1` for a connection that may ask for an upgrade (a forward
/// proxy's `CONNECT`): the service answers it, then takes the connection
/// over with `hyper::upgrade::on`.
pub fn serve_http1_with_upgrades<S, B>(stream: TcpStream, service: S, graceful: &GracefulShutdown)
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let _ = stream.set_nodelay(true);
    let activity = Arc::<Activity>::default();
    let connection = any_version_server()
        .http1_only()
        .serve_connection_with_upgrades(TokioIo::new(stream), activity.count(service))
        .into_owned();
    spawn_bounded(connection, activity, Some(graceful.watcher()), IDLE_TIMEOUT);
}

/// Longest a client may take to complete a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection builder for HTTP/1.1 and HTTP/2 under the shared bounds: the
/// head size (HTTP/2's header list too); served with `spawn_bounded` (see
/// `http1_server`).
fn any_version_server() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD_BYTES)
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    builder
}

/// Serve one cleartext connection with HTTP/1.1, or HTTP/2 when the client
/// opens with HTTP/2's preface (h2c by prior knowledge), watched by
/// `graceful`. An HTTP/1.1 request may switch protocols (a WebSocket): the
/// service answers 101 and takes the connection over with
/// `hyper::upgrade::on`.
pub fn serve_any_version<S, B>(stream: TcpStream, service: S, graceful: &GracefulShutdown)
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let _ = stream.set_nodelay(true);
    let activity = Arc::<Activity>::default();
    let connection = any_version_server()
        .serve_connection_with_upgrades(TokioIo::new(stream), activity.count(service))
        .into_owned();
    spawn_bounded(connection, activity, Some(graceful.watcher()), IDLE_TIMEOUT);
}

/// Serve one connection over TLS: the handshake (at most
/// `HANDSHAKE_TIMEOUT`), then the protocol ALPN chose (HTTP/2 or HTTP/1.1;
/// without ALPN, as `serve_any_version`), watched by `graceful`.
pub fn serve_tls<S, B>(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    service: S,
    graceful: &GracefulShutdown,
) where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let _ = stream.set_nodelay(true);
    let watcher = graceful.watcher();
    tokio::spawn(async move {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!("TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake not completed within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        let builder = any_version_server();
        let builder = match tls.get_ref().1.alpn_protocol() {
            Some(b"h2") => builder.http2_only(),
            Some(_) => builder.http1_only(),
            None => builder,
        };
        let activity = Arc::<Activity>::default();
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tls), activity.count(service))
            .into_owned();
        spawn_bounded(connection, activity, Some(watcher), IDLE_TIMEOUT);
    });
}

/// Accept on `main` (and `admin`) until `stopped` turns true, handing each
/// connection to `serve`; then stop accepting and wait up to `grace` for
/// the connections to finish. `announce` logs the drain (one worker does).
pub async fn accept_loop(
    main: TcpListener,
    admin: Option<TcpListener>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
    announce: bool,
    mut serve: impl FnMut(Accepted, &GracefulShutdown),
) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            a = main.accept() => a.map(|(s, p)| (s, p, false)),
            a = accept_admin(admin.as_ref()) => a.map(|(s, p)| (s, p, true)),
        };
        match accepted {
            Ok((stream, peer, admin)) => serve(
                Accepted {
                    stream,
                    peer,
                    admin,
                },
                &graceful,
            ),
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(main);
    drop(admin);
    if announce {
        tracing::info!(
            "shutting down: no new connections; waiting up to {grace:?} for requests in flight"
        );
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {grace:?}; closing them");
    }
}

async fn accept_admin(admin: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match admin {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::{http1_server, spawn_bounded, Activity};
    use bytes::Bytes;
    use http_body_util::{Either, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const IDLE: Duration = Duration::from_millis(200);

    /// One connection on 127.0.0.1, served as the listeners serve theirs but
    /// with a short idle bound. `/slow` streams its body over 3 × IDLE.
    async fn server() -> tokio::net::TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = if req.uri().path() == "/slow" {
                    let (mut tx, body) = http_body_util::channel::Channel::<Bytes>::new(1);
                    tokio::spawn(async move {
                        let _ = tx.send_data(Bytes::from_static(b"a")).await;
                        tokio::time::sleep(3 * IDLE).await;
                        let _ = tx.send_data(Bytes::from_static(b"b")).await;
                    });
                    Either::Left(body)
                } else {
                    Either::Right(Full::new(Bytes::from_static(b"ok")))
                };
                Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
            });
            let activity = Arc::<Activity>::default();
            let connection =
                http1_server().serve_connection(TokioIo::new(stream), activity.count(service));
            spawn_bounded(connection, activity, None, IDLE);
        });
        tokio::net::TcpStream::connect(addr).await.expect("connect")
    }

    /// Reads until the connection closes (or 5 s pass): what came, and when it closed.
    async fn read_to_close(client: &mut tokio::net::TcpStream) -> (String, Instant) {
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the connection was still open after 5 s");
        (String::from_utf8_lossy(&got).into_owned(), Instant::now())
    }

    /// A head sent in full is answered on a kept-alive connection; one left
    /// unfinished (a slowloris client) gets the connection cut within two
    /// idle periods, not held open.
    #[tokio::test]
    async fn an_unfinished_head_loses_its_connection() {
        let mut client = server().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut answer = [0u8; 256];
        let n = client.read(&mut answer).await.expect("read");
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200 OK"),
            "{:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        let sent = Instant::now();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost:")
            .await
            .expect("write");
        let (rest, closed) = read_to_close(&mut client).await;
        assert!(rest.is_empty(), "an unfinished head was answered: {rest}");
        let after = closed - sent;
        assert!(
            after >= IDLE && after <= 2 * IDLE + Duration::from_millis(500),
            "{after:?}"
        );
    }

    /// A response still streaming keeps its connection, however long it
    /// takes; the connection is cut once it has been idle.
    #[tokio::test]
    async fn a_response_in_flight_keeps_its_connection() {
        let mut client = server().await;
        client
            .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let (got, _) = read_to_close(&mut client).await;
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        // Chunked: "1\r\na\r\n", then "1\r\nb\r\n" three idle periods later.
        assert!(
            got.contains("\r\na\r\n") && got.contains("\r\nb\r\n"),
            "cut while streaming: {got}"
        );
    }
}
