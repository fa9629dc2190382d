//! Connections to the upstreams. A client's connection keeps the upstream
//! connection its last request used and sends its next request on it: on
//! HTTP/1.1 a client's requests come one after another, so that connection
//! is free again by the time the next request arrives, and no pool is
//! consulted per request (a shared pool locks, looks up, and hands each
//! connection back when its response body ends). When the client's
//! connection closes, its upstream connection goes to its worker's idle list,
//! where the next client connection finds it.
//!
//! Requests that find the kept connection busy (concurrent HTTP/2 streams of
//! one client) take an idle one or open another; the spare goes to the idle
//! list when they are done. A connection itself (opened, sent on, a request
//! tried once more on a new one) is `tollgate_http::conn`'s, as the comply
//! face's client's are.

use crate::proxy::ProxyBody;
use crate::settings::Upstream;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use tokio::time::Instant;
pub use tollgate_http::conn::UpstreamError;
use tollgate_http::conn::{self, Conn};
use tollgate_http::Peer;

/// Most idle connections a worker keeps; past it, a returned one is closed.
const MAX_IDLE: usize = 1024;

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// One worker's way to its upstreams: the connector, and the open
/// connections no client connection holds.
pub struct WorkerUpstreams {
    connector: Connector,
    idle: Mutex<Vec<Kept>>,
    /// Connections opened (shared by every worker: a metric).
    opened: Counter,
}

impl std::fmt::Debug for WorkerUpstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerUpstreams")
            .field("idle", &self.idle())
            .finish_non_exhaustive()
    }
}

/// An open connection, and the upstream it goes to.
#[derive(Debug)]
struct Kept {
    scheme: Scheme,
    authority: Authority,
    conn: Conn<ProxyBody>,
}

impl Kept {
    fn serves(&self, upstream: &Upstream) -> bool {
        // (bytes, not `Authority`'s case-insensitive compare: both come from the config)
        self.authority.as_str() == upstream.authority.as_str() && self.scheme == upstream.scheme
    }
}

impl WorkerUpstreams {
    pub fn new(connector: Connector, opened: Counter) -> WorkerUpstreams {
        WorkerUpstreams {
            connector,
            idle: Mutex::default(),
            opened,
        }
    }

    /// How many connections wait in the idle list.
    pub fn idle(&self) -> usize {
        self.idle.lock().len()
    }

    /// An idle connection to `upstream` still open, the most recently used.
    fn take_idle(&self, upstream: &Upstream) -> Option<Kept> {
        let mut idle = self.idle.lock();
        let now = Instant::now();
        while let Some(i) = idle.iter().rposition(|k| k.serves(upstream)) {
            let kept = idle.swap_remove(i);
            if kept.conn.usable(now) {
                return Some(kept);
            }
        }
        None
    }

    fn give_back(&self, mut kept: Kept) {
        if kept.conn.is_closed() {
            return;
        }
        kept.conn.idle_from_now();
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(kept);
        }
    }

    /// Close the connections idle too long or closed by the upstream.
    pub fn prune(&self) {
        let now = Instant::now();
        self.idle.lock().retain(|k| k.conn.usable(now));
    }

    /// A new connection to `upstream`.
    async fn connect(&self, upstream: &Upstream) -> Result<Kept, UpstreamError> {
        let connector = self.connector.clone();
        let conn = Conn::connect(connector, &upstream.scheme, &upstream.authority).await?;
        self.opened.inc();
        Ok(Kept {
            scheme: upstream.scheme.clone(),
            authority: upstream.authority.clone(),
            conn,
        })
    }
}

/// A client's connection as the proxy sees it: who it is, and the upstream
/// connection it keeps between its requests.
#[derive(Debug)]
pub struct ClientConnection {
    pub peer: Peer,
    worker: Arc<WorkerUpstreams>,
    kept: Mutex<Option<Kept>>,
    /// The timer of its requests' `upstream_timeout`.
    pub deadline: tollgate_http::conn::Deadline,
}

impl ClientConnection {
    pub fn new(peer: Peer, worker: Arc<WorkerUpstreams>) -> ClientConnection {
        ClientConnection {
            peer,
            worker,
            kept: Mutex::new(None),
            deadline: Default::default(),
        }
    }

    /// Send `request` (its target in origin form) to `upstream` and wait for
    /// the response head. A request that a reused connection could not send
    /// at all is sent once more on a new connection.
    pub async fn send(
        &self,
        upstream: &Upstream,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if !request.headers().contains_key(HOST) {
            // (an HTTP/2 client names the host in :authority, not Host)
            if let Ok(host) = HeaderValue::from_str(upstream.authority.as_str()) {
                request.headers_mut().insert(HOST, host);
            }
        }
        let mine = match self.kept.lock().take() {
            Some(kept) if kept.serves(upstream) => Some(kept),
            Some(other) => {
                self.worker.give_back(other);
                None
            }
            None => None,
        };
        let kept = match mine.or_else(|| self.worker.take_idle(upstream)) {
            Some(kept) => kept,
            // (boxed: a large future, rarely made)
            None => Box::pin(self.worker.connect(upstream)).await?,
        };
        let (scheme, authority) = (kept.scheme, kept.authority);
        let connect = || async {
            let kept = self.worker.connect(upstream).await?;
            Ok(kept.conn)
        };
        let (conn, response) = conn::send(kept.conn, request, connect).await?;
        // (a switched connection is the tunnel's now)
        if response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            self.keep(Kept {
                scheme,
                authority,
                conn,
            });
        }
        Ok(response)
    }

    /// Keep `kept` for this client's next request; a spare goes to the idle list.
    fn keep(&self, kept: Kept) {
        let spare = self.kept.lock().replace(kept);
        if let Some(spare) = spare {
            self.worker.give_back(spare);
        }
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        if let Some(kept) = self.kept.get_mut().take() {
            self.worker.give_back(kept);
        }
    }
}
