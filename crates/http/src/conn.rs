//! One HTTP/1.1 connection to an upstream, as both faces keep them: opened
//! on a connector's stream and driven by a task of its own, and used again
//! for request after request. The gateway keeps one per client connection
//! (`tollgate serve`), the comply face's client a few per upstream
//! (`client::UpstreamClient`); both send through `send`, which gives a
//! request that a reused connection could not send at all one more try on
//! a new connection (the upstream may have closed it while it was idle).

use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, Uri};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection unused this long is not used again (the upstream has
/// likely closed it, or will while a request is on its way).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request got no response from its upstream.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be opened (refused, timed out, TLS failed).
    Connect(BoxError),
    /// The connection failed before the response head came.
    Failed(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(cause) => write!(f, "cannot connect: {cause}"),
            UpstreamError::Failed(e) => match std::error::Error::source(e) {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Connect(cause) => Some(cause.as_ref()),
            UpstreamError::Failed(e) => Some(e),
        }
    }
}

/// An open HTTP/1.1 connection to one upstream.
#[derive(Debug)]
pub struct Conn<B> {
    sender: SendRequest<B>,
    /// When it was last handed back (idle since).
    since: Instant,
    /// It served a request before: a request it fails to send can be
    /// retried on a new connection.
    reused: bool,
}

impl<B: Body + 'static> Conn<B> {
    /// A connection over `io` (a connector's stream), driven by a task of
    /// its own on this runtime (upgrades allowed: a WebSocket takes it over).
    pub async fn open<IO>(io: IO) -> Result<Conn<B>, UpstreamError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        B: Send,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("an upstream connection ended: {e}");
            }
        });
        Ok(Conn {
            sender,
            since: Instant::now(),
            reused: false,
        })
    }

    /// A new connection to `scheme://authority` over what `connector`
    /// opens (TCP, TLS, a proxy's tunnel).
    pub async fn connect<S>(
        mut connector: S,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Conn<B>, UpstreamError>
    where
        S: Service<Uri>,
        S::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S::Error: Into<BoxError>,
        B: Send,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        let io = connector
            .call(origin)
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        Conn::open(io).await
    }

    /// Still open, and not idle too long.
    pub fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.since) < IDLE_TIMEOUT
    }

    /// Free for a request now (its last response has been read to the end).
    pub fn is_ready(&self) -> bool {
        self.sender.is_ready()
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Mark it idle from now (when it is handed back).
    pub fn idle_from_now(&mut self) {
        self.since = Instant::now();
    }
}

/// Send `request` on `conn` and wait for the response head, returning the
/// connection with it (for the next request: on HTTP/1.1 it is free once
/// this response's body has been read). A request that a reused connection
/// could not send at all goes once more on a connection from `connect`; one
/// that was sent is never repeated. (Connecting is boxed: it is rare, and
/// its future is large, so this one stays small to move.)
pub async fn send<B, C, F>(
    mut conn: Conn<B>,
    mut request: Request<B>,
    mut connect: C,
) -> Result<(Conn<B>, Response<Incoming>), UpstreamError>
where
    B: Body + 'static,
    C: FnMut() -> F,
    F: Future<Output = Result<Conn<B>, UpstreamError>>,
{
    loop {
        let sent = match conn.sender.ready().await {
            Ok(()) => conn.sender.try_send_request(request).await,
            Err(e) if conn.reused => {
                tracing::debug!("an idle upstream connection was closed: {e}");
                conn = Box::pin(connect()).await?;
                continue;
            }
            Err(e) => return Err(UpstreamError::Failed(e)),
        };
        match sent {
            Ok(response) => {
                conn.reused = true;
                return Ok((conn, response));
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if conn.reused => {
                    tracing::debug!(
                        "a request was not sent on a reused upstream connection: {}",
                        e.error()
                    );
                    request = unsent;
                    conn = Box::pin(connect()).await?;
                }
                _ => return Err(UpstreamError::Failed(e.into_error())),
            },
        }
    }
}

/// A timer a client connection keeps for its requests' deadlines (the
/// upstream's answer within `upstream_timeout`). `tokio::time::timeout`
/// puts a new timer into tokio's wheel per request and takes it out again
/// (~500 instructions); this one is taken by a request, moved to its
/// deadline (a later deadline only updates the timer the wheel already
/// holds) and given back. A request made while another holds it (HTTP/2)
/// makes its own.
#[derive(Debug, Default)]
pub struct Deadline(parking_lot::Mutex<Option<std::pin::Pin<Box<tokio::time::Sleep>>>>);

impl Deadline {
    /// `future`'s output, or None if it takes longer than `limit`. (Pinned
    /// by the caller: a send's future is large, and moving it in would copy it.)
    pub async fn within<F: Future>(
        &self,
        limit: Duration,
        future: std::pin::Pin<&mut F>,
    ) -> Option<F::Output> {
        let at = Instant::now() + limit;
        let kept = self.0.lock().take();
        let mut sleep = match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        let output = tokio::select! {
            biased;
            output = future => Some(output),
            () = sleep.as_mut() => None,
        };
        *self.0.lock() = Some(sleep);
        output
    }
}

#[cfg(test)]
mod tests {
    use super::Deadline;
    use std::time::Duration;

    /// On tokio's paused clock: an answer in time is given, one that is late
    /// is not, and the kept timer serves the next request with its own
    /// deadline (moved later, and earlier again after one has passed).
    #[tokio::test(start_paused = true)]
    async fn a_kept_deadline_times_each_request_on_its_own() {
        let deadline = Deadline::default();
        let answer = |after: u64| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(after)).await;
                after
            })
        };
        let limit = Duration::from_millis(100);
        assert_eq!(deadline.within(limit, answer(99).as_mut()).await, Some(99));
        assert_eq!(
            deadline.within(limit, answer(99).as_mut()).await,
            Some(99),
            "moved later"
        );
        assert_eq!(deadline.within(limit, answer(101).as_mut()).await, None);
        assert_eq!(
            deadline.within(limit, answer(50).as_mut()).await,
            Some(50),
            "after one passed"
        );
        assert_eq!(
            deadline
                .within(Duration::from_millis(10), answer(20).as_mut())
                .await,
            None,
            "earlier"
        );
    }
}
