//! One client channel over several replicas of a service (a domain's CCFs, its gateways): tower's
//! power-of-two-choices balancer (`tower::balance::p2c`, least pending requests) over one lazily
//! connected TLS channel per address, each behind a [`Replica`] that keeps a replica the
//! balancer must not pick out of its choices.
//!
//! Why the wrapper: a tonic channel always says it is ready, even to a dead address (the error
//! comes with the request), so a balancer over bare channels would keep sending a share of the
//! requests to a replica that was killed. A [`Replica`] is ready only while its connection is
//! believed good. It learns that the connection is gone from the connection itself (the TLS
//! stream reports its end of file or error, which a killed peer's kernel sends at once) and
//! from a failed request, and then stays out of the balancer's choices until a TCP connection
//! to it succeeds again (probed with a backoff). Requests started after a replica is gone go to
//! the others; requests in flight on it fail with `UNAVAILABLE`, and callers retry them as they
//! retry any `UNAVAILABLE`. Replicas start out unprobed, so an address that is down at start
//! costs no request either.
//!
//! How it fits: [`crate::tls::connect_replicas`] builds one (or a plain channel for a single
//! address); [`crate::telemetry::TracedChannel`] traces it like any channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tower::Service;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::BoxCloneSyncService;

/// What a replica service fails with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A balanced channel: cloneable, like a tonic channel.
pub type Balanced = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>;

/// Requests a balanced channel holds while no replica is ready (each still bounded by its own
/// deadline).
const QUEUE: usize = 1024;

/// The first wait before a gone replica is probed again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Set when a replica's connection ended or a request on it failed; shared with the
/// connection's stream (see [`crate::tls`]).
#[derive(Debug, Default)]
pub struct ConnectionLost(AtomicBool);

impl ConnectionLost {
    /// The connection ended.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

type Probe = Pin<Box<dyn Future<Output = bool> + Send + Sync>>;

enum State {
    /// Believed reachable: the balancer may pick it.
    Up,
    /// A TCP connect to it is under way; on failure, the wait before the next one.
    Probing(Probe, Duration),
    /// Waiting before the next probe; then the wait after that one, should it fail too.
    Waiting(Pin<Box<tokio::time::Sleep>>, Duration),
}

/// One replica: its channel, ready only while the replica is believed reachable.
pub struct Replica {
    addr: String,
    channel: Channel,
    lost: Arc<ConnectionLost>,
    connect_timeout: Duration,
    state: State,
}

impl Replica {
    /// `channel` (lazily connected to `addr`, its stream setting `lost` when it ends). Probed
    /// before its first request.
    pub fn new(
        addr: String,
        channel: Channel,
        lost: Arc<ConnectionLost>,
        connect_timeout: Duration,
    ) -> Self {
        let state = State::Probing(probe(addr.clone(), connect_timeout), FIRST_BACKOFF);
        Self {
            addr,
            channel,
            lost,
            connect_timeout,
            state,
        }
    }
}

fn probe(addr: String, timeout: Duration) -> Probe {
    Box::pin(async move {
        matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        )
    })
}

impl Service<http::Request<Body>> for Replica {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.state {
                State::Up => {
                    if self.lost.take() {
                        tracing::debug!(replica = %self.addr, "replica connection lost; probing it");
                        let p = probe(self.addr.clone(), self.connect_timeout);
                        self.state = State::Probing(p, FIRST_BACKOFF);
                        continue;
                    }
                    return self.channel.poll_ready(cx).map_err(Into::into);
                }
                State::Probing(p, backoff) => match p.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(true) => {
                        // What the flag said was about the connection that is gone.
                        self.lost.take();
                        self.state = State::Up;
                    }
                    Poll::Ready(false) => {
                        let wait = *backoff;
                        let sleep = Box::pin(tokio::time::sleep(wait));
                        self.state = State::Waiting(sleep, (wait * 2).min(MAX_BACKOFF));
                    }
                },
                State::Waiting(sleep, next) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let p = probe(self.addr.clone(), self.connect_timeout);
                    self.state = State::Probing(p, *next);
                }
            }
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let lost = self.lost.clone();
        let fut = self.channel.call(req);
        Box::pin(async move {
            let rsp = fut.await;
            if rsp.is_err() {
                // No answer at all: the transport failed. Out of the choices until it answers
                // a probe again.
                lost.set();
            }
            rsp.map_err(Into::into)
        })
    }
}

/// Balances over `replicas` (at least one).
pub fn balanced(replicas: Vec<Replica>) -> Balanced {
    let services: Vec<_> = replicas
        .into_iter()
        .map(|r| PendingRequests::new(r, CompleteOnResponse::default()))
        .collect();
    let balance = Balance::new(ServiceList::new(services));
    BoxCloneSyncService::new(Buffer::new(balance, QUEUE))
}

/// A connection's stream that reports its end (end of file, or an error either way) to a
/// [`ConnectionLost`]: how a [`Replica`] learns at once that its peer was killed.
/// Without a [`ConnectionLost`] it is the stream alone (every client connection is one, so that
/// one connector serves both).
pub struct Watched<S> {
    inner: S,
    lost: Option<Arc<ConnectionLost>>,
}

impl<S> Watched<S> {
    /// `inner`, reporting to `lost` when given.
    pub fn new(inner: S, lost: Option<Arc<ConnectionLost>>) -> Self {
        Self { inner, lost }
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn report(&self) {
        if let Some(l) = &self.lost {
            l.set();
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Err(_)) => self.report(),
            Poll::Ready(Ok(())) if wanted && buf.filled().len() == before => self.report(),
            _ => {}
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Err(_)) = &r {
            self.report();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
