//! Trace context on real gRPC calls (tonic over loopback): [`TracedChannel`] and the server
//! layer of `serve_builder_traced` continue one trace across a call, record the outcome and the
//! refusal's reason on both spans, start a new trace for a malformed `traceparent` (never an
//! error), and, at a partner boundary set to `restart`, send nothing of the trace and link
//! instead of continuing.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};

use capif_proto::v1::demo_api_client::DemoApiClient;
use capif_proto::v1::demo_api_server::{DemoApi, DemoApiServer};
use capif_proto::v1::{ErrorReason, InvokeRequest, InvokeResponse};
use ccf_core::limits::{ListenerLimits, serve_builder_traced};
use ccf_core::telemetry::{PartnerTraces, TracedChannel, current_trace_id};
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// What the server saw of one call.
#[derive(Clone, Debug, Default)]
struct Seen {
    traceparent: Option<String>,
    trace_id: Option<String>,
}

#[derive(Clone, Default)]
struct Api(Arc<Mutex<Vec<Seen>>>);

#[tonic::async_trait]
impl DemoApi for Api {
    async fn invoke(&self, r: Request<InvokeRequest>) -> Result<Response<InvokeResponse>, Status> {
        let seen = Seen {
            traceparent: r
                .metadata()
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_string()),
            trace_id: current_trace_id(),
        };
        self.0.lock().unwrap().push(seen);
        if r.get_ref().api_name == "refuse" {
            return Err(ccf_core::grpc::error_status(
                Code::PermissionDenied,
                ErrorReason::ApiNotAuthorized,
                "not this one",
            ));
        }
        Ok(Response::new(InvokeResponse::default()))
    }
}

#[derive(Clone, Debug, Default)]
struct Exported(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Exported {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

impl Exported {
    fn named(&self, name: &str, kind: SpanKind) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name && s.span_kind == kind)
            .cloned()
            .collect()
    }
}

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// A server on loopback facing callers as `partner` says, and a client channel to it.
async fn server(partner: PartnerTraces) -> (Api, tonic::transport::Channel) {
    let api = Api::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = serve_builder_traced(&ListenerLimits::default(), |_| None, partner)
        .add_service(DemoApiServer::new(api.clone()));
    tokio::spawn(router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    (api, ch)
}

/// A subscriber for the calling thread whose spans go to the returned exporter (the test
/// runtime is current-thread, so the server's tasks see the same subscriber).
fn subscriber() -> (
    tracing::subscriber::DefaultGuard,
    Exported,
    SdkTracerProvider,
) {
    let exported = Exported::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    let sub = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    (tracing::subscriber::set_default(sub), exported, provider)
}

async fn invoke(ch: TracedChannel, api: &str) -> Result<InvokeResponse, Status> {
    DemoApiClient::new(ch)
        .invoke(InvokeRequest {
            api_name: api.into(),
            payload: String::new(),
        })
        .await
        .map(Response::into_inner)
}

#[tokio::test]
async fn one_trace_across_a_call_with_outcome_and_reason_on_both_spans() {
    let (_g, exported, _p) = subscriber();
    let (api, ch) = server(PartnerTraces::Continue).await;
    let root = tracing::info_span!("test.flow");
    let root_trace = ccf_core::telemetry::trace_id_of(&root).unwrap();
    let ch = TracedChannel::new(ch, "the-aef");
    async {
        invoke(ch.clone(), "ok").await.unwrap();
        let e = invoke(ch, "refuse").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    .instrument(root)
    .await;

    let seen = api.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert!(
            s.traceparent.as_deref().unwrap().contains(&root_trace),
            "{s:?}"
        );
        assert_eq!(s.trace_id.as_deref(), Some(root_trace.as_str()), "{s:?}");
    }
    let servers = exported.named("capif.v1.DemoApi/Invoke", SpanKind::Server);
    let clients = exported.named("capif.v1.DemoApi/Invoke", SpanKind::Client);
    assert_eq!((servers.len(), clients.len()), (2, 2));
    for (s, c) in servers.iter().zip(&clients) {
        // The server span's parent is the client span: the context crossed the wire.
        assert_eq!(s.span_context.trace_id().to_string(), root_trace);
        assert_eq!(s.parent_span_id, c.span_context.span_id());
        assert!(s.parent_span_is_remote);
        assert_eq!(attr(s, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(attr(s, "rpc.service").as_deref(), Some("capif.v1.DemoApi"));
        assert_eq!(attr(s, "rpc.method").as_deref(), Some("Invoke"));
        assert_eq!(attr(c, "server.address").as_deref(), Some("the-aef"));
    }
    assert_eq!(
        attr(&servers[0], "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    for s in [&servers[1], &clients[1]] {
        assert_eq!(attr(s, "rpc.grpc.status_code").as_deref(), Some("7"));
        assert_eq!(
            attr(s, "capif.reason").as_deref(),
            Some("API_NOT_AUTHORIZED")
        );
    }
}

#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace() {
    let (_g, exported, _p) = subscriber();
    let (api, ch) = server(PartnerTraces::Continue).await;
    for bad in [
        "garbage",
        "00-00000000000000000000000000000000-0000000000000001-01",
    ] {
        let mut r = Request::new(InvokeRequest::default());
        r.metadata_mut().insert("traceparent", bad.parse().unwrap());
        // A plain client: the peer, not our channel, sends the bad header.
        DemoApiClient::new(ch.clone()).invoke(r).await.unwrap();
    }
    let seen = api.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let servers = exported.named("capif.v1.DemoApi/Invoke", SpanKind::Server);
    assert_eq!(servers.len(), 2);
    for (s, span) in seen.iter().zip(&servers) {
        let id = s.trace_id.clone().expect("a new trace");
        assert_eq!(id.len(), 32);
        assert_eq!(span.span_context.trace_id().to_string(), id);
        assert_eq!(span.parent_span_id, opentelemetry::trace::SpanId::INVALID);
    }
    assert_ne!(seen[0].trace_id, seen[1].trace_id);
}

#[tokio::test]
async fn restart_sends_nothing_of_our_trace_and_links_what_a_partner_sends() {
    let (_g, exported, _p) = subscriber();
    let (api, ch) = server(PartnerTraces::Restart).await;
    let root = tracing::info_span!("test.flow");
    let root_trace = ccf_core::telemetry::trace_id_of(&root).unwrap();
    async {
        // Outgoing at a boundary set to restart: no traceparent at all.
        let quiet =
            TracedChannel::new(ch.clone(), "partner").at_partner_boundary(PartnerTraces::Restart);
        invoke(quiet, "ok").await.unwrap();
        // A partner that does send one: continued nowhere, linked.
        invoke(TracedChannel::new(ch, "partner"), "ok")
            .await
            .unwrap();
    }
    .instrument(root)
    .await;
    let seen = api.0.lock().unwrap().clone();
    assert_eq!(seen[0].traceparent, None);
    assert!(
        seen[1]
            .traceparent
            .as_deref()
            .unwrap()
            .contains(&root_trace)
    );
    for s in &seen {
        assert_ne!(s.trace_id.as_deref(), Some(root_trace.as_str()), "{s:?}");
    }
    let servers = exported.named("capif.v1.DemoApi/Invoke", SpanKind::Server);
    let clients = exported.named("capif.v1.DemoApi/Invoke", SpanKind::Client);
    // The client side is still traced locally, in our trace.
    assert!(
        clients
            .iter()
            .all(|c| c.span_context.trace_id().to_string() == root_trace)
    );
    assert!(servers[0].links.is_empty());
    let link = &servers[1].links[0];
    assert_eq!(link.span_context.trace_id().to_string(), root_trace);
    assert_eq!(
        link.span_context.span_id(),
        clients[1].span_context.span_id()
    );
}
