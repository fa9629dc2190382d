//! The comply face's client to one upstream (`tollgate run`'s and `tollgate
//! proxy`'s): HTTP/1.1 over TCP or TLS (the system's roots plus the
//! upstream's `ca_file`), with a pool of idle connections, reached directly
//! or through a proxy. `run` follows the environment's (`HTTPS_PROXY`,
//! `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, read as curl and reqwest read
//! them): an `https` upstream through a `CONNECT` tunnel (TLS end to end),
//! an `http` one by sending the proxy each request in absolute form.

use crate::tls::{tcp_connector, tls_over};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, PROXY_AUTHORIZATION};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::{Request, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::{Client, ResponseFuture};
pub use hyper_util::client::proxy::matcher::Matcher as Proxies;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One upstream's client, sending bodies of type `B` (cheap to clone: the
/// pool is shared). `tollgate run` sends whole bodies; `tollgate proxy`
/// streams its clients'.
pub struct UpstreamClient<B = Full<Bytes>> {
    client: Client<Route, B>,
    /// `Proxy-Authorization` for a proxy that gets each request (an `http`
    /// upstream behind one with credentials).
    forward_auth: Option<HeaderValue>,
}

impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        UpstreamClient {
            client: self.client.clone(),
            forward_auth: self.forward_auth.clone(),
        }
    }
}

impl<B> std::fmt::Debug for UpstreamClient<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("proxy_credentials", &self.forward_auth.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> UpstreamClient<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The client for the upstream at `base_url`: `proxies` decides whether it
    /// is reached through a proxy (`Proxies::from_env()` reads the
    /// environment, `Proxies::builder().build()` names none). Errors name
    /// what was wrong (the `ca_file`, the proxy).
    pub fn new(
        base_url: &Uri,
        ca_file: Option<&Path>,
        connect_timeout: Duration,
        proxies: &Proxies,
    ) -> Result<Self, String> {
        let tls = crate::tls::client_config(ca_file, None)?;
        let http = tcp_connector(connect_timeout);
        let mut forward_auth = None;
        let route = match proxies.intercept(base_url) {
            None => Route::Direct(tls_over(&tls, http)),
            Some(proxy) if proxy.uri().scheme_str() != Some("http") => {
                return Err(format!(
                    "the proxy the environment names for {base_url} ({}) is not an http:// proxy; tollgate reaches upstreams directly or through an http:// proxy",
                    redacted(proxy.uri())
                ))
            }
            Some(proxy) if base_url.scheme_str() == Some("https") => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), http);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Route::Tunnel(tls_over(&tls, tunnel))
            }
            Some(proxy) => {
                forward_auth = proxy.basic_auth().cloned().map(|mut auth| {
                    auth.set_sensitive(true);
                    auth
                });
                Route::Forward {
                    proxy: proxy.uri().clone(),
                    http,
                }
            }
        };
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(route);
        Ok(UpstreamClient {
            client,
            forward_auth,
        })
    }

    /// Send `request` (its URI absolute) and wait for the response head.
    pub fn request(&self, mut request: Request<B>) -> ResponseFuture {
        if let Some(auth) = &self.forward_auth {
            request
                .headers_mut()
                .insert(PROXY_AUTHORIZATION, auth.clone());
        }
        self.client.request(request)
    }
}

/// Why a call got no answer, for a record or a log line: "connection failed"
/// (no connection could be opened) or "request failed", with the innermost
/// cause (e.g. "Connection refused (os error 111)").
pub fn failure(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let connect =
        (e.downcast_ref::<hyper_util::client::legacy::Error>()).is_some_and(|e| e.is_connect());
    match connect {
        true => format!("connection failed ({cause})"),
        false => format!("request failed ({cause})"),
    }
}

/// A proxy's address without its credentials, for messages.
fn redacted(uri: &Uri) -> String {
    let host = uri.host().unwrap_or("");
    match uri.port_u16() {
        Some(port) => format!("{}://{host}:{port}", uri.scheme_str().unwrap_or("")),
        None => format!("{}://{host}", uri.scheme_str().unwrap_or("")),
    }
}

/// How connections to the upstream are opened.
#[derive(Clone, Debug)]
enum Route {
    Direct(HttpsConnector<HttpConnector>),
    /// `CONNECT` through the proxy, then TLS with the upstream.
    Tunnel(HttpsConnector<Tunnel<HttpConnector>>),
    /// To the proxy, which gets each request in absolute form.
    Forward {
        proxy: Uri,
        http: HttpConnector,
    },
}

type Connecting = Pin<Box<dyn Future<Output = Result<Io, BoxError>> + Send>>;

impl Service<Uri> for Route {
    type Response = Io;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Route::Direct(c) => c.poll_ready(cx),
            Route::Tunnel(c) => c.poll_ready(cx),
            Route::Forward { http, .. } => http.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        match self {
            Route::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { Ok(Io::new(connecting.await?, false)) })
            }
            Route::Tunnel(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { Ok(Io::new(connecting.await?, false)) })
            }
            Route::Forward { proxy, http } => {
                let connecting = http.call(proxy.clone());
                Box::pin(async move {
                    let stream = connecting.await?;
                    Ok(Io::new(MaybeHttpsStream::Http(stream), true))
                })
            }
        }
    }
}

/// A connection to the upstream, or to the proxy that forwards to it (then
/// the client writes each request's target in absolute form).
#[derive(Debug)]
pub struct Io {
    stream: MaybeHttpsStream<TokioIo<TcpStream>>,
    through_proxy: bool,
}

impl Io {
    fn new(stream: MaybeHttpsStream<TokioIo<TcpStream>>, through_proxy: bool) -> Io {
        Io {
            stream,
            through_proxy,
        }
    }
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        self.stream.connected().proxy(self.through_proxy)
    }
}

impl Read for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl Write for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::{failure, Proxies, UpstreamClient};
    use bytes::Bytes;
    use http_body_util::Full;

    type Client = UpstreamClient<Full<Bytes>>;
    use std::time::Duration;

    #[test]
    fn a_proxy_that_is_not_http_is_refused_by_name_without_its_credentials() {
        let base = hyper::Uri::from_static("https://api.example.com/v3/");
        let proxies = Proxies::builder()
            .all("socks5://alice:s3cret@proxy.internal:1080")
            .build();
        let e = Client::new(&base, None, Duration::from_secs(1), &proxies).expect_err("socks5");
        assert!(e.contains("socks5://proxy.internal:1080"), "{e}");
        assert!(e.contains("not an http:// proxy"), "{e}");
        assert!(!e.contains("s3cret") && !e.contains("alice"), "{e}");
        // NO_PROXY for the host: no proxy is asked for at all.
        let proxies = Proxies::builder()
            .all("socks5://proxy.internal:1080")
            .no("api.example.com")
            .build();
        assert!(Client::new(&base, None, Duration::from_secs(1), &proxies).is_ok());
    }

    #[tokio::test]
    async fn a_call_that_got_no_answer_says_whether_it_could_connect_and_why() {
        // A port nothing listens on (bound, then let go).
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let base: hyper::Uri = format!("http://127.0.0.1:{port}/").parse().expect("uri");
        let client = Client::new(
            &base,
            None,
            Duration::from_secs(1),
            &Proxies::builder().build(),
        )
        .expect("client");
        let request = hyper::Request::get(base)
            .body(Full::default())
            .expect("request");
        let e = client.request(request).await.expect_err("nothing listens");
        let said = failure(&e);
        assert!(
            said.starts_with("connection failed (") && said.contains("refused"),
            "{said}"
        );
        // Any other error: the request failed, with its innermost cause.
        let other = std::io::Error::other("the body was cut short");
        assert_eq!(failure(&other), "request failed (the body was cut short)");
    }
}
