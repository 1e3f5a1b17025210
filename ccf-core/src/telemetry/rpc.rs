//! Trace context on gRPC: W3C `traceparent` / `tracestate` as metadata (opentelemetry's
//! `TraceContextPropagator`, never parsed by hand), the server side ([`ServerTraceLayer`]: one
//! server span per request, continuing the caller's trace) and the client side
//! ([`TracedChannel`]: one client span per call, its context injected). Span names and
//! attributes follow OpenTelemetry's RPC conventions; they are what docs/OPERATIONS.md
//! ("Traces") promises to whoever reads the spans.
//!
//! A malformed `traceparent` is no error: the propagator yields no context, and the server span
//! starts a new trace.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::{self, HeaderMap, HeaderName, HeaderValue};
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::PartnerTraces;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The trace context a peer sent in `headers` (gRPC metadata); empty when it sent none or a
/// malformed one.
pub fn extract(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Puts `cx`'s span context into `headers` (gRPC metadata) as `traceparent` (and `tracestate`
/// when it has one); nothing when `cx` holds no valid span.
pub fn inject(cx: &opentelemetry::Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The trace id of the current span (32 lowercase hex), when there is one.
pub fn current_trace_id() -> Option<String> {
    trace_id_of(&tracing::Span::current())
}

/// The trace id of `span` (32 lowercase hex), when it has one.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let id = span.context().span().span_context().trace_id();
    (id != TraceId::INVALID).then(|| id.to_string())
}

/// `/capif.v1.Gateway/FetchSecurityInformation` as (`capif.v1.Gateway`, `FetchSecurityInformation`).
fn rpc_of(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix('/')?.split_once('/')
}

/// Health checks and reflection are not part of any flow: no spans for them.
fn untraced(service: &str) -> bool {
    service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.")
}

/// Records the outcome of a call on its span: `rpc.grpc.status_code`, and `capif.reason` (the
/// stable `ErrorReason`) when refused. A unary answer without `grpc-status` in its headers is
/// OK: tonic sends refusals trailers-only, so their status is in the headers.
fn record_outcome(span: &tracing::Span, headers: &HeaderMap, server: bool) {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    span.record("rpc.grpc.status_code", code);
    if code == 0 {
        return;
    }
    if let Some(reason) = tonic::Status::from_header_map(headers)
        .as_ref()
        .and_then(crate::status::error_reason)
    {
        span.record("capif.reason", reason.as_str());
    }
    // OpenTelemetry's rule: a server fails only on its own faults; a client on any non-OK.
    let failed = !server || matches!(code, 2 | 4 | 12 | 13 | 14 | 15);
    if failed {
        span.record("otel.status_code", "error");
    }
}

/// The tower layer every gRPC server of the project runs first (see
/// [`crate::limits::serve_builder`]): a server span `<service>/<method>` per request, in the
/// caller's trace or, with [`PartnerTraces::Restart`], in a new trace linked to the caller's.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTraceLayer {
    partner: PartnerTraces,
}

impl ServerTraceLayer {
    /// Continues or restarts incoming traces as `partner` says (listeners that face no partner:
    /// [`PartnerTraces::Continue`]).
    pub fn new(partner: PartnerTraces) -> Self {
        Self { partner }
    }
}

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerTraceService {
            inner,
            partner: self.partner,
        }
    }
}

/// See [`ServerTraceLayer`].
#[derive(Clone, Debug)]
pub struct ServerTraceService<S> {
    inner: S,
    partner: PartnerTraces,
}

impl<S, B, R> tower::Service<http::Request<B>> for ServerTraceService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let span = match rpc_of(req.uri().path()) {
            Some((service, method)) if !untraced(service) => tracing::info_span!(
                parent: None,
                "grpc.server",
                otel.name = &req.uri().path()[1..],
                otel.kind = "server",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                capif.reason = Empty,
            ),
            _ => return Box::pin(self.inner.call(req)),
        };
        let remote = extract(req.headers());
        match self.partner {
            PartnerTraces::Continue => {
                // Fails only without an OTel layer (tests with their own subscriber): no trace.
                let _ = span.set_parent(remote);
            }
            PartnerTraces::Restart => {
                let sc = remote.span().span_context().clone();
                if sc.is_valid() {
                    span.add_link(sc);
                }
            }
        }
        let fut = span.in_scope(|| self.inner.call(req));
        let outcome = span.clone();
        Box::pin(
            async move {
                let rsp = fut.await;
                if let Ok(r) = &rsp {
                    record_outcome(&outcome, r.headers(), true);
                }
                rsp
            }
            .instrument(span),
        )
    }
}

/// A gRPC channel that opens a client span `<service>/<method>` for every call and, unless made
/// [`TracedChannel::without_propagation`], sends the span's context as `traceparent`. Every
/// client of a product is built on one.
#[derive(Clone, Debug)]
pub struct TracedChannel {
    inner: ClientChannel,
    server: Arc<str>,
    propagate: bool,
}

/// What a client calls: one server's channel, or one balanced over a service's replicas
/// ([`crate::tls::connect_replicas`]).
#[derive(Clone)]
pub enum ClientChannel {
    /// One address.
    One(tonic::transport::Channel),
    /// Several replicas ([`crate::balance`]).
    Replicas(crate::balance::Balanced),
}

impl std::fmt::Debug for ClientChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::One(c) => c.fmt(f),
            Self::Replicas(_) => f.write_str("ClientChannel::Replicas"),
        }
    }
}

impl From<tonic::transport::Channel> for ClientChannel {
    fn from(c: tonic::transport::Channel) -> Self {
        Self::One(c)
    }
}

impl From<crate::balance::Balanced> for ClientChannel {
    fn from(b: crate::balance::Balanced) -> Self {
        Self::Replicas(b)
    }
}

impl TracedChannel {
    /// Traces calls on `inner` to `server` (its address or name, the spans' `server.address`).
    pub fn new(inner: impl Into<ClientChannel>, server: impl Into<Arc<str>>) -> Self {
        Self {
            inner: inner.into(),
            server: server.into(),
            propagate: true,
        }
    }

    /// Calls are still traced here, but nothing of the trace is sent (a partner boundary set to
    /// [`PartnerTraces::Restart`]).
    pub fn without_propagation(mut self) -> Self {
        self.propagate = false;
        self
    }

    /// Propagates as `partner` says.
    pub fn at_partner_boundary(self, partner: PartnerTraces) -> Self {
        match partner {
            PartnerTraces::Continue => self,
            PartnerTraces::Restart => self.without_propagation(),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for TracedChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = crate::balance::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.inner {
            ClientChannel::One(c) => c.poll_ready(cx).map_err(Into::into),
            ClientChannel::Replicas(b) => b.poll_ready(cx),
        }
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path();
        let (service, method) = rpc_of(path).unwrap_or(("", ""));
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = path.strip_prefix('/').unwrap_or(path),
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            server.address = &*self.server,
            rpc.grpc.status_code = Empty,
            capif.reason = Empty,
        );
        if self.propagate {
            inject(&span.context(), req.headers_mut());
        }
        type Answer = Result<http::Response<tonic::body::Body>, crate::balance::BoxError>;
        let fut = span.in_scope(|| -> Pin<Box<dyn Future<Output = Answer> + Send>> {
            match &mut self.inner {
                ClientChannel::One(c) => {
                    let f = c.call(req);
                    Box::pin(async move { f.await.map_err(Into::into) })
                }
                ClientChannel::Replicas(b) => Box::pin(b.call(req)),
            }
        });
        let outcome = span.clone();
        Box::pin(
            async move {
                let rsp = fut.await;
                match &rsp {
                    Ok(r) => record_outcome(&outcome, r.headers(), false),
                    // No answer at all: the transport failed (UNAVAILABLE).
                    Err(_) => {
                        outcome.record("rpc.grpc.status_code", 14);
                        outcome.record("otel.status_code", "error");
                    }
                }
                rsp
            }
            .instrument(span),
        )
    }
}

/// A TLS handshake's span context, kept with its connection so the requests on it can link to
/// the handshake (which ran before any request, so in a trace of its own).
#[derive(Clone, Debug, Default)]
pub struct HandshakeTrace(Option<SpanContext>);

impl HandshakeTrace {
    /// The handshake `span` (its context, if it has one).
    pub fn of(span: &tracing::Span) -> Self {
        let sc = span.context().span().span_context().clone();
        Self(sc.is_valid().then_some(sc))
    }

    /// Links the current span (a request on the connection) to the handshake.
    pub fn link_current(&self) {
        if let Some(sc) = &self.0 {
            tracing::Span::current().add_link(sc.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceState};

    fn remote(trace: u128, span: u64) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        ))
    }

    #[test]
    fn traceparent_round_trips_through_metadata() {
        let mut headers = HeaderMap::new();
        inject(&remote(0xabc, 0x12), &mut headers);
        assert_eq!(
            headers["traceparent"],
            "00-00000000000000000000000000000abc-0000000000000012-01"
        );
        assert_eq!(headers["tracestate"], "vendor=x");
        // What a tonic server sees: the same bytes as metadata.
        let md = tonic::metadata::MetadataMap::from_headers(headers);
        let back = extract(&md.into_headers());
        let sc = back.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_id(), TraceId::from(0xabc));
        assert_eq!(sc.span_id(), SpanId::from(0x12));
        assert_eq!(sc.trace_state().header(), "vendor=x");
    }

    #[test]
    fn malformed_traceparent_yields_no_context() {
        for bad in [
            "",
            "garbage",
            "00-zz000000000000000000000000000abc-0000000000000012-01",
            "00-00000000000000000000000000000000-0000000000000012-01",
            "00-00000000000000000000000000000abc-0000000000000000-01",
            "ff-00000000000000000000000000000abc-0000000000000012-01",
            "00-00000000000000000000000000000abc-0000000000000012",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", HeaderValue::from_str(bad).unwrap());
            let cx = extract(&headers);
            assert!(!cx.span().span_context().is_valid(), "{bad:?}");
        }
        // Bytes that are not even text.
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        assert!(!extract(&headers).span().span_context().is_valid());
    }

    #[test]
    fn rpc_names_split_service_and_method() {
        assert_eq!(
            rpc_of("/capif.v1.Interconnect/FetchSecurityInformation"),
            Some(("capif.v1.Interconnect", "FetchSecurityInformation"))
        );
        assert_eq!(rpc_of("/nothing"), None);
        assert!(untraced("grpc.health.v1.Health"));
        assert!(!untraced("capif.v1.Gateway"));
    }
}
