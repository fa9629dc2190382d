//! The comply face's client to one upstream (`tollgate run`'s and `tollgate
//! proxy`'s): HTTP/1.1 over TCP or TLS (the system's roots plus the
//! upstream's `ca_file`), with its own idle connections, reached directly
//! or through a proxy. `run` follows the environment's (`HTTPS_PROXY`,
//! `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, read as curl and reqwest read
//! them): an `https` upstream through a `CONNECT` tunnel (TLS end to end),
//! an `http` one by sending the proxy each request in absolute form.
//!
//! Connections: a client goes to one origin, so its idle connections are
//! one list, not a pool keyed by host (hyper-util's pool hashed the origin
//! with SipHash twice a request and spawned a task per response to hand its
//! connection back). A connection goes back to the list with its response
//! head, and is taken again only once that response has been read to the
//! end; a request that finds none free opens another.

use crate::conn::{self, Conn, UpstreamError};
use crate::tls::{tcp_connector, tls_over};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST, PROXY_AUTHORIZATION};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
pub use hyper_util::client::proxy::matcher::Matcher as Proxies;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most connections a client keeps. It opens one only when none it keeps is
/// free, so it keeps about as many as calls were in flight at once, which an
/// upstream's `concurrency` bounds (4,096 at most): past this, connections
/// would be closed after one call while the upstream is that busy.
const MAX_KEPT: usize = 4096;

/// One upstream's client, sending bodies of type `B` (cheap to clone: the
/// connections are shared). `tollgate run` sends whole bodies; `tollgate
/// proxy` streams its clients'.
pub struct UpstreamClient<B = Full<Bytes>> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    route: Route,
    /// The upstream's origin: every request goes there, and nowhere else.
    scheme: Scheme,
    authority: Authority,
    /// `Host`, for requests that do not name it.
    host: Option<HeaderValue>,
    /// Connections free or still reading a response, oldest first.
    kept: Mutex<VecDeque<Conn<B>>>,
}

impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        UpstreamClient {
            shared: self.shared.clone(),
        }
    }
}

impl<B> std::fmt::Debug for UpstreamClient<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("origin", &self.shared.authority)
            .field(
                "forward",
                &matches!(self.shared.route, Route::Forward { .. }),
            )
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
        let (Some(scheme), Some(authority)) = (base_url.scheme(), base_url.authority()) else {
            return Err(format!("{base_url} is not an absolute http(s) URL"));
        };
        let tls = crate::tls::client_config(ca_file, None)?;
        let http = tcp_connector(connect_timeout);
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
            Some(proxy) => Route::Forward {
                proxy: proxy.uri().clone(),
                http,
                auth: proxy.basic_auth().cloned().map(|mut auth| {
                    auth.set_sensitive(true);
                    auth
                }),
            },
        };
        Ok(UpstreamClient {
            shared: Arc::new(Shared {
                route,
                scheme: scheme.clone(),
                host: HeaderValue::from_str(&host_of(scheme, authority)).ok(),
                authority: authority.clone(),
                kept: Mutex::new(VecDeque::new()),
            }),
        })
    }

    /// Send `request` (its URI absolute, at the upstream's origin) and wait
    /// for the response head.
    pub async fn request(
        &self,
        mut request: Request<B>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let shared = &self.shared;
        if !shared.is_origin_of(request.uri()) {
            // (a guard: callers build targets under the upstream's base_url)
            return Err(UpstreamError::Connect(
                format!("{} is not at this upstream's origin", request.uri().path()).into(),
            ));
        }
        if !request.headers().contains_key(HOST) {
            if let Some(host) = &shared.host {
                request.headers_mut().insert(HOST, host.clone());
            }
        }
        match &shared.route {
            Route::Forward {
                auth: Some(auth), ..
            } => {
                request
                    .headers_mut()
                    .insert(PROXY_AUTHORIZATION, auth.clone());
            }
            Route::Forward { auth: None, .. } => {}
            // Origin form, as a server expects it (absolute form is for proxies).
            _ => {
                let target = request.uri().path_and_query().cloned();
                *request.uri_mut() = target.map_or_else(|| Uri::from_static("/"), Uri::from);
            }
        }
        let conn = match self.take_free() {
            Some(conn) => conn,
            // (boxed: a large future, rarely made)
            None => Box::pin(self.connect()).await?,
        };
        let (conn, response) = conn::send(conn, request, || self.connect()).await?;
        // (a connection switched to another protocol is the caller's now)
        if response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            self.keep(conn);
        }
        Ok(response)
    }

    /// The oldest kept connection that is free, dropping those closed or
    /// idle too long on the way; connections still reading a response stay.
    fn take_free(&self) -> Option<Conn<B>> {
        let mut kept = self.shared.kept.lock();
        let now = Instant::now();
        for _ in 0..kept.len() {
            let conn = kept.pop_front()?;
            if !conn.usable(now) {
                continue;
            }
            if conn.is_ready() {
                return Some(conn);
            }
            kept.push_back(conn);
        }
        None
    }

    fn keep(&self, mut conn: Conn<B>) {
        conn.idle_from_now();
        let mut kept = self.shared.kept.lock();
        if kept.len() < MAX_KEPT {
            kept.push_back(conn);
        }
    }

    /// A new connection to the upstream (or to the proxy in between).
    async fn connect(&self) -> Result<Conn<B>, UpstreamError> {
        let shared = &self.shared;
        Conn::connect(shared.route.clone(), &shared.scheme, &shared.authority).await
    }
}

impl<B> Shared<B> {
    /// `uri` is at this client's origin (hosts compared as DNS compares
    /// them, a default port written or not).
    fn is_origin_of(&self, uri: &Uri) -> bool {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return false;
        };
        // Written alike (the usual case: both come from the config's
        // base_url), or alike once hosts and ports are read out.
        *scheme == self.scheme
            && (authority.as_str() == self.authority.as_str()
                || authority.host().eq_ignore_ascii_case(self.authority.host())
                    && port_of(scheme, authority) == port_of(&self.scheme, &self.authority))
    }
}

/// The port a URL of `scheme` means when it names none (as `url::Url`
/// knows them).
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        "ftp" => Some(21),
        _ => None,
    }
}

/// An origin's port, its scheme's default when it names none.
fn port_of(scheme: &Scheme, authority: &Authority) -> Option<u16> {
    authority.port_u16().or(default_port(scheme.as_str()))
}

/// `Host` for an origin: its host, and its port unless the scheme's default.
fn host_of(scheme: &Scheme, authority: &Authority) -> String {
    match authority.port_u16() {
        Some(port) if Some(port) != default_port(scheme.as_str()) => {
            format!("{}:{port}", authority.host())
        }
        _ => authority.host().to_string(),
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
    let connect = matches!(e.downcast_ref(), Some(UpstreamError::Connect(_)));
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
    /// To the proxy, which gets each request in absolute form (with
    /// `Proxy-Authorization` when the proxy's URL has credentials).
    Forward {
        proxy: Uri,
        http: HttpConnector,
        auth: Option<HeaderValue>,
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
            Route::Direct(c) => Box::pin(c.call(dst)),
            Route::Tunnel(c) => Box::pin(c.call(dst)),
            Route::Forward { proxy, http, .. } => {
                let connecting = http.call(proxy.clone());
                Box::pin(async move { Ok(MaybeHttpsStream::Http(connecting.await?)) })
            }
        }
    }
}

/// A connection to the upstream, or to the proxy that forwards to it.
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

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

    #[test]
    fn a_client_sends_only_to_its_upstreams_origin() {
        let direct = Proxies::builder().build();
        let client = |base: &'static str| {
            let base = hyper::Uri::from_static(base);
            Client::new(&base, None, Duration::from_secs(1), &direct).expect("client")
        };
        let https = client("https://api.example.com/v3/");
        let http = client("http://127.0.0.1:8080/");
        for (client, uri, at) in [
            (&https, "https://api.example.com/v3/x", true),
            (&https, "https://API.Example.com/other", true),
            (&https, "https://api.example.com:443/v3/x", true),
            (&https, "http://api.example.com/v3/x", false),
            (&https, "https://api.example.com:8443/v3/x", false),
            (&https, "https://api.example.com.evil.test/v3/x", false),
            (&https, "https://evil.test/api.example.com/v3", false),
            (&http, "http://127.0.0.1:8080/x", true),
            (&http, "http://127.0.0.1/x", false),
            (&http, "http://127.0.0.2:8080/x", false),
            (&http, "/x", false),
        ] {
            let uri = hyper::Uri::from_static(uri);
            assert_eq!(client.shared.is_origin_of(&uri), at, "{uri}");
        }
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
        // A target at another origin is refused before any connection.
        let elsewhere = hyper::Request::get("http://127.0.0.2:9/x")
            .body(Full::default())
            .expect("request");
        let e = client.request(elsewhere).await.expect_err("another origin");
        assert_eq!(
            failure(&e),
            "connection failed (/x is not at this upstream's origin)"
        );
        // Any other error: the request failed, with its innermost cause.
        let other = std::io::Error::other("the body was cut short");
        assert_eq!(failure(&other), "request failed (the body was cut short)");
    }
}
