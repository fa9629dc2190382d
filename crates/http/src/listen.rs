//! Listeners and connections, the same for every face: a proxy port bound
//! with SO_REUSEPORT (one socket per worker thread), HTTP/1.1 (and for the
//! gateway HTTP/2, over TLS or by prior knowledge) with bounded heads and a
//! header timeout, an accept loop that survives accept errors,
//! and a graceful drain when told to stop.

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

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

/// A client has this long to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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

/// An HTTP/1.1 server connection builder with the shared bounds: the head
/// size and the time a client has to send it.
pub fn http1_server() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(MAX_HEAD_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

/// Serve one connection with HTTP/1.1 under the shared bounds, watched by
/// `graceful` so a shutdown lets its request finish.
pub fn serve_http1<S, B>(stream: TcpStream, service: S, graceful: &GracefulShutdown)
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let _ = stream.set_nodelay(true);
    let connection = http1_server().serve_connection(TokioIo::new(stream), service);
    tokio::spawn(graceful.watch(connection));
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
    let connection = any_version_server()
        .http1_only()
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    tokio::spawn(graceful.watch(connection));
}

/// Longest a client may take to complete a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection builder for HTTP/1.1 and HTTP/2 under the shared bounds: the
/// head size (HTTP/2's header list too) and the time a client has to send an
/// HTTP/1.1 head.
fn any_version_server() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
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
    let connection = any_version_server()
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    tokio::spawn(graceful.watch(connection));
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
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tls), service)
            .into_owned();
        let _ = watcher.watch(connection).await;
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
