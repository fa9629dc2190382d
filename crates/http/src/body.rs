//! A response body that carries what its request still owes (a store
//! `Admission`, a comply ticket's report): the guard is dropped when the
//! body ends, fails, or is dropped because the client went away, so the
//! request settles exactly once, at the end of its response.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct GuardedBody<B, G> {
    inner: B,
    guard: Option<G>,
}

impl<B, G> GuardedBody<B, G> {
    pub fn new(inner: B, guard: Option<G>) -> Self {
        GuardedBody { inner, guard }
    }
}

impl<B, G> std::fmt::Debug for GuardedBody<B, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedBody")
            .field("guarded", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}

impl<B, G> Body for GuardedBody<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None; // the response ended: settle now
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The gateway's: the upstream's body streamed, or one it made.
pub type EitherBody = http_body_util::Either<hyper::body::Incoming, Full<Bytes>>;
/// The proxy's: any body, boxed.
pub type AnyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body tollgate made owes nothing.
impl<G> From<Full<Bytes>> for GuardedBody<EitherBody, G> {
    fn from(full: Full<Bytes>) -> Self {
        GuardedBody::new(http_body_util::Either::Right(full), None)
    }
}

impl<G> From<Full<Bytes>> for GuardedBody<AnyBody, G> {
    fn from(full: Full<Bytes>) -> Self {
        GuardedBody::new(full.map_err(|never| match never {}).boxed_unsync(), None)
    }
}
