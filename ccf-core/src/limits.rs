//! Limits on what a peer or a stranger can make a listener hold: connections (in total and per
//! source address, counted from accept, so pending handshakes count too), idle connections
//! (closed once no request has been in flight for the idle timeout), handshake time, and gRPC
//! message and header sizes. Every listener of every component (CCF, gateway, AEF) goes through
//! [`ConnGate`] at accept and wraps its stream's reads with an [`IdleTimer`]; the tonic server is
//! built by [`serve_builder`] with [`EdgeLayer`], which marks request activity on the connection
//! and turns tonic's "message too large" into `INVALID_ARGUMENT` with a reason.
//!
//! Why idle is measured in requests and not bytes: HTTP/2 PINGs (ours or the peer's) move bytes
//! forever, so a byte-based timer would never close a client that only keeps the connection
//! warm.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use capif_proto::v1::ErrorReason;
use serde::Deserialize;
use tonic::Code;
use tonic::codegen::http;

use crate::telemetry::{PartnerTraces, ServerTraceLayer};

/// `[limits]` of every component: applied to each of its listeners separately.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerLimits {
    /// Connections one listener holds at once (pending handshakes included).
    pub max_connections: usize,
    /// Connections one source IP address may hold at once on one listener.
    pub max_connections_per_source: usize,
    /// A connection with no request in flight for this long is closed, seconds.
    pub idle_timeout_secs: u64,
    /// A TLS handshake (or TLS-PSK handshake) that takes longer is dropped, seconds.
    pub handshake_timeout_secs: u64,
    /// Largest gRPC message accepted or sent, bytes.
    pub max_message_bytes: usize,
    /// Largest HTTP/2 header list accepted, bytes.
    pub max_header_list_bytes: u32,
    /// Concurrent requests (HTTP/2 streams) on one connection.
    pub max_concurrent_streams: u32,
    /// A request not answered within this long is cancelled, seconds (above every budget the
    /// services honour). It also ends a request whose body a client stalls, which would
    /// otherwise count as activity and hold the connection past its idle timeout.
    pub request_timeout_secs: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 1024,
            idle_timeout_secs: 60,
            handshake_timeout_secs: 10,
            max_message_bytes: 64 * 1024,
            max_header_list_bytes: 16 * 1024,
            max_concurrent_streams: 128,
            request_timeout_secs: 30,
        }
    }
}

impl ListenerLimits {
    /// Checks the values make sense; says which does not.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, bool); 8] = [
            ("max_connections", self.max_connections > 0),
            (
                "max_connections_per_source",
                self.max_connections_per_source > 0
                    && self.max_connections_per_source <= self.max_connections,
            ),
            ("idle_timeout_secs", self.idle_timeout_secs > 0),
            (
                "handshake_timeout_secs",
                (1..=120).contains(&self.handshake_timeout_secs),
            ),
            (
                "max_message_bytes",
                (4096..=16 * 1024 * 1024).contains(&self.max_message_bytes),
            ),
            (
                "max_header_list_bytes",
                (1024..=1024 * 1024).contains(&self.max_header_list_bytes),
            ),
            ("max_concurrent_streams", self.max_concurrent_streams > 0),
            (
                "request_timeout_secs",
                (16..=600).contains(&self.request_timeout_secs),
            ),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            None => Ok(()),
            Some((key, _)) => Err(format!(
                "limits.{key} is out of range (max_connections > 0, 0 < \
                 max_connections_per_source <= max_connections, idle_timeout_secs > 0, \
                 handshake_timeout_secs 1..=120, max_message_bytes 4096..=16777216, \
                 max_header_list_bytes 1024..=1048576, max_concurrent_streams > 0, \
                 request_timeout_secs 16..=600)"
            )),
        }
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
}

/// How often a listener says that it refuses connections over its caps.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What one listener admits: counts connections from accept until the stream is dropped.
#[derive(Debug)]
pub struct ConnGate {
    listener: &'static str,
    limits: ListenerLimits,
    total: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    refused: AtomicU64,
    refused_since_log: AtomicU64,
    last_log: Mutex<Option<Instant>>,
    metrics: Option<crate::metrics::ListenerMetrics>,
}

/// A connection admitted by a [`ConnGate`]; releases its place when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    gate: Arc<ConnGate>,
    source: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.gate.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(m) = &self.gate.metrics {
            m.closed(self.gate.listener);
        }
        // A poisoned map only happens after a panic elsewhere; its counts are still right.
        let mut m = self
            .gate
            .per_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

impl ConnGate {
    /// A gate for the listener named `listener` (for logs).
    pub fn new(listener: &'static str, limits: ListenerLimits) -> Arc<Self> {
        Self::build(listener, limits, None)
    }

    /// A gate that also feeds `metrics` (open connections, overflows, TLS handshakes).
    pub fn observed(
        listener: &'static str,
        limits: ListenerLimits,
        metrics: &crate::metrics::ListenerMetrics,
    ) -> Arc<Self> {
        Self::build(listener, limits, Some(metrics.clone()))
    }

    fn build(
        listener: &'static str,
        limits: ListenerLimits,
        metrics: Option<crate::metrics::ListenerMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            listener,
            limits,
            total: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            refused_since_log: AtomicU64::new(0),
            last_log: Mutex::new(None),
        })
    }

    /// The limits this gate applies.
    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// Admits a connection from `source`, or refuses it (counted; logged once per interval).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<ConnPermit> {
        let mut m = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = m.get(&source).copied().unwrap_or(0);
        let total = self.total.load(Ordering::Acquire);
        if total >= self.limits.max_connections
            || from_source >= self.limits.max_connections_per_source
        {
            drop(m);
            self.refuse(source, total >= self.limits.max_connections);
            return None;
        }
        m.insert(source, from_source + 1);
        self.total.fetch_add(1, Ordering::AcqRel);
        if let Some(metrics) = &self.metrics {
            metrics.opened(self.listener);
        }
        Some(ConnPermit {
            gate: self.clone(),
            source,
        })
    }

    fn refuse(&self, source: IpAddr, total_cap: bool) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.overflow(self.listener);
        }
        let n = self.refused_since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
            *last = Some(Instant::now());
            self.refused_since_log.store(0, Ordering::Relaxed);
            let cap = if total_cap {
                format!("max_connections = {}", self.limits.max_connections)
            } else {
                format!(
                    "max_connections_per_source = {}",
                    self.limits.max_connections_per_source
                )
            };
            tracing::warn!(listener = self.listener, %source, refused = n, %cap,
                "connections refused at accept: over the listener's cap (logged once per 10 s)");
        }
    }

    /// Counts how a TLS handshake on this listener ended (when the gate is observed).
    pub fn handshake(&self, outcome: crate::metrics::HandshakeOutcome) {
        if let Some(m) = &self.metrics {
            m.handshake(self.listener, outcome);
        }
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Connections refused at accept since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

fn now_tick() -> u64 {
    // tokio's clock, so that tests with paused time drive it.
    static EPOCH: OnceLock<tokio::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    tokio::time::Instant::now()
        .saturating_duration_since(epoch)
        .as_millis() as u64
}

/// Request activity on one connection: when the last request started, how many are in flight.
#[derive(Clone, Debug)]
pub struct Activity(Arc<ActivityInner>);

#[derive(Debug)]
struct ActivityInner {
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(ActivityInner {
            last_ms: AtomicU64::new(now_tick()),
            in_flight: AtomicUsize::new(0),
        }))
    }
}

/// Marks a request in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.last_ms.store(now_tick(), Ordering::Relaxed);
        self.0.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// A request starts.
    pub fn begin(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        self.0.last_ms.store(now_tick(), Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// How long the connection has been idle (zero while a request is in flight).
    pub fn idle_for(&self) -> Duration {
        if self.0.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(now_tick().saturating_sub(self.0.last_ms.load(Ordering::Relaxed)))
    }
}

/// Closes a connection that stayed idle: polled from the stream's `poll_read`, which the HTTP/2
/// server always has pending, so the timer's wake-up reaches the connection's task.
#[derive(Debug)]
pub struct IdleTimer {
    activity: Activity,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    /// A timer closing after `timeout` without requests on `activity`.
    pub fn new(activity: Activity, timeout: Duration) -> Self {
        Self {
            activity,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// True once the connection has been idle for the timeout.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let idle = self.activity.idle_for();
            if idle >= self.timeout {
                return true;
            }
            let next = tokio::time::Instant::now() + (self.timeout - idle);
            self.sleep.as_mut().reset(next);
        }
    }

    /// The error a stream returns when the timer closed it.
    pub fn error(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("closed after {} s without requests", self.timeout.as_secs()),
        )
    }
}

/// The tonic server every listener uses (built by [`serve_builder`]).
pub type EdgeServer = tonic::transport::Server<
    tower::layer::util::Stack<
        EdgeLayer,
        tower::layer::util::Stack<ServerTraceLayer, tower::layer::util::Identity>,
    >,
>;

/// The tonic server every listener uses: h2 keepalive to find dead peers, stream and header
/// limits, a server span per request continuing the caller's trace ([`ServerTraceLayer`]), and
/// [`EdgeLayer`] with `activity` (how to find a request's connection activity).
pub fn serve_builder(
    limits: &ListenerLimits,
    activity: fn(&http::Extensions) -> Option<Activity>,
) -> EdgeServer {
    serve_builder_traced(limits, activity, PartnerTraces::Continue)
}

/// [`serve_builder`] for a listener that faces partner domains, whose traces `partner` says to
/// continue or restart.
pub fn serve_builder_traced(
    limits: &ListenerLimits,
    activity: fn(&http::Extensions) -> Option<Activity>,
    partner: PartnerTraces,
) -> EdgeServer {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .timeout(Duration::from_secs(limits.request_timeout_secs))
        // First, so that its span sees the answer as the caller gets it (after EdgeLayer).
        .layer(ServerTraceLayer::new(partner))
        .layer(EdgeLayer {
            activity,
            max_message_bytes: limits.max_message_bytes,
        })
}

/// Marks each request on its connection's [`Activity`], and answers a request over the message
/// limit with `INVALID_ARGUMENT` / `MESSAGE_TOO_LARGE` instead of tonic's bare `OUT_OF_RANGE`.
#[derive(Clone, Debug)]
pub struct EdgeLayer {
    activity: fn(&http::Extensions) -> Option<Activity>,
    max_message_bytes: usize,
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        EdgeService {
            inner,
            activity: self.activity,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// See [`EdgeLayer`].
#[derive(Clone, Debug)]
pub struct EdgeService<S> {
    inner: S,
    activity: fn(&http::Extensions) -> Option<Activity>,
    max_message_bytes: usize,
}

impl<S, B, R> tower::Service<http::Request<B>> for EdgeService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let in_flight = (self.activity)(req.extensions()).map(|a| a.begin());
        let limit = self.max_message_bytes;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let rsp = fut.await;
            drop(in_flight);
            rsp.map(|r| {
                if is_message_too_large(&r) {
                    crate::status::error_status(
                        Code::InvalidArgument,
                        ErrorReason::MessageTooLarge,
                        format!(
                            "the request is larger than this service accepts ({limit} bytes; \
                             ids are short, see PROTOCOL.md \"Limits\")"
                        ),
                    )
                    .into_http()
                } else {
                    r
                }
            })
        })
    }
}

/// tonic refuses an over-long message with a trailers-only `OUT_OF_RANGE` and no details; our
/// services never answer `OUT_OF_RANGE` themselves.
fn is_message_too_large<R>(r: &http::Response<R>) -> bool {
    let h = r.headers();
    h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"11")
        && h.get("grpc-status-details-bin").is_none()
        && h.get("grpc-message")
            .is_some_and(|m| m.as_bytes().windows(7).any(|w| w == b"decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn gate_caps_per_source_and_total_and_frees_on_drop() {
        let limits = ListenerLimits {
            max_connections: 3,
            max_connections_per_source: 2,
            ..Default::default()
        };
        let gate = ConnGate::new("test", limits);
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let p1 = gate.admit(a).expect("first");
        let p2 = gate.admit(a).expect("second");
        assert!(gate.admit(a).is_none(), "per-source cap");
        let p3 = gate.admit(b).expect("other source");
        assert!(gate.admit(b).is_none(), "total cap");
        assert_eq!(gate.open(), 3);
        assert_eq!(gate.refused(), 2);
        drop(p1);
        let _p4 = gate.admit(a).expect("a place was freed");
        drop((p2, p3));
        assert_eq!(gate.open(), 1);
    }

    #[test]
    fn limits_validate_names_the_key() {
        let bad = ListenerLimits {
            max_connections_per_source: 10_000,
            max_connections: 10,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err();
        assert!(e.contains("max_connections_per_source"), "{e}");
        assert!(ListenerLimits::default().validate().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timer_waits_for_requests_to_end() {
        let activity = Activity::default();
        let mut timer = IdleTimer::new(activity.clone(), Duration::from_secs(5));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(!timer.poll_expired(&mut cx));
        let req = activity.begin();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!timer.poll_expired(&mut cx), "a request is in flight");
        drop(req);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!timer.poll_expired(&mut cx), "idle 3 s of 5");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(timer.poll_expired(&mut cx), "idle 6 s of 5");
    }
}
