//! The partner boundary set to `restart` (`[telemetry] partner_traces`), with real CCFs and
//! gateways in one process: gateway-A sends gateway-B nothing of its trace, so B's side of a
//! cross-domain fetch is a trace of its own (no parent, no link: no `traceparent` arrived), while
//! each domain's side stays one trace.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capif_testkit::federation::*;
use opentelemetry::trace::{SpanId, SpanKind, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

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

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_sends_the_partner_nothing_of_our_trace() {
    let exported = Exported::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();
    let t = Testbed::start(Options {
        gateway_extra: "[telemetry]\npartner_traces = \"restart\"\n".into(),
        ..Options::default()
    })
    .await;
    let mut inv = onboard(t.d(B), "c0").await;
    inv.obtain_psk("aef-a1").await;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    ask(&mut aef_a, "aef-a1", &inv.id, B, "", Duration::from_secs(3))
        .await
        .expect("key through the gateways");

    let spans = exported.0.lock().unwrap().clone();
    let one = |name: &str, kind: SpanKind| -> SpanData {
        let found: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.name == name && s.span_kind == kind)
            .collect();
        assert_eq!(found.len(), 1, "{name} {kind:?}: {found:#?}");
        found[0].clone()
    };
    let ccf_a = one("capif.v1.Security/GetSecurityInformation", SpanKind::Server);
    let gw_a_in = one(
        "capif.v1.Gateway/FetchSecurityInformation",
        SpanKind::Server,
    );
    let gw_a_out = one(
        "capif.v1.Interconnect/FetchSecurityInformation",
        SpanKind::Client,
    );
    let gw_b_in = one(
        "capif.v1.Interconnect/FetchSecurityInformation",
        SpanKind::Server,
    );
    let ccf_b = one(
        "capif.v1.Federation/GetSecurityInformationForPartner",
        SpanKind::Server,
    );
    // A's side is one trace, up to its call to the partner (named by its domain).
    let trace_a = ccf_a.span_context.trace_id();
    assert_eq!(gw_a_in.span_context.trace_id(), trace_a);
    assert_eq!(gw_a_out.span_context.trace_id(), trace_a);
    assert_eq!(attr(&gw_a_out, "server.address").as_deref(), Some(B));
    // B's side starts anew: no parent, and no link, because no traceparent arrived.
    let trace_b = gw_b_in.span_context.trace_id();
    assert_ne!(trace_b, trace_a);
    assert_eq!(gw_b_in.parent_span_id, SpanId::INVALID);
    assert!(gw_b_in.links.is_empty(), "{:?}", gw_b_in.links);
    assert!(
        spans
            .iter()
            .filter(|s| s.span_context.trace_id() == trace_b)
            .all(|s| s.links.is_empty())
    );
    // Within B, the trace continues to its CCF.
    assert_eq!(ccf_b.span_context.trace_id(), trace_b);
    assert_eq!(attr(&gw_b_in, "rpc.grpc.status_code").as_deref(), Some("0"));
}
