//! An in-process OTLP/gRPC trace receiver: what `capif scenario run` points the testbed's
//! components at (`OTEL_EXPORTER_OTLP_ENDPOINT`) so that [`crate::report`] can draw each step's
//! hops from the spans they export.
//!
//! It listens on a loopback port with plain HTTP/2, the way an OpenTelemetry collector's 4317
//! listener does, and keeps each span as a small owned [`ReceivedSpan`]: only what the report
//! reads (ids, name, kind, the resource's service attributes, times, status, the `rpc.*` and
//! `capif.*` attributes). It is bounded: at most [`ReceiverLimits::max_spans`] are kept (later
//! ones are refused in the answer's `partial_success` and counted), a request may be at most
//! [`ReceiverLimits::max_message_bytes`], and every kept string is cut to
//! [`MAX_TEXT_CHARS`]. Nothing here can carry a key: the components' spans hold ids, method
//! names, codes and reasons, never secrets.
//!
//! [`runner_tracer`] builds the tracer the runner uses for its own per-step root spans, exported
//! to the same receiver.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

/// The attribute the runner puts on each step's root span: the step's number as the table shows
/// it (1-based).
pub const STEP_ATTRIBUTE: &str = "capif.step";
/// The attribute a refused call's spans carry: the stable `ErrorReason` name.
pub const REASON_ATTRIBUTE: &str = "capif.reason";
/// The `service.name` of the `capif` process: its invoker client is the report's invoker lane.
pub const RUNNER_SERVICE: &str = "capif";
/// Links kept per span.
pub const MAX_LINKS: usize = 4;
/// The longest string kept from a span (names, attribute values), in characters.
pub const MAX_TEXT_CHARS: usize = 200;

/// What the receiver may be made to hold.
#[derive(Clone, Copy, Debug)]
pub struct ReceiverLimits {
    /// Spans kept; later ones are refused (and counted in [`OtlpReceiver::dropped`]).
    pub max_spans: usize,
    /// Largest export request accepted, bytes (decoded protobuf).
    pub max_message_bytes: usize,
}

impl Default for ReceiverLimits {
    fn default() -> Self {
        // A scenario's run makes a few hundred spans per group step of a hundred flows; the
        // load scenario (600 flows) stays well below this, and 100k small spans are ~40 MB.
        Self {
            max_spans: 100_000,
            max_message_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// No loopback port.
    #[error("cannot listen for OTLP spans on loopback: {0}")]
    Bind(#[from] std::io::Error),
}

/// OTLP's span kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// Not said.
    Unspecified,
    /// Work inside one process.
    Internal,
    /// The handling of a remote call.
    Server,
    /// A remote call as its caller sees it.
    Client,
    /// A message sent.
    Producer,
    /// A message received.
    Consumer,
}

impl SpanKind {
    fn from_otlp(kind: i32) -> Self {
        match kind {
            1 => Self::Internal,
            2 => Self::Server,
            3 => Self::Client,
            4 => Self::Producer,
            5 => Self::Consumer,
            _ => Self::Unspecified,
        }
    }
}

/// One span as the report needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// W3C trace id.
    pub trace_id: [u8; 16],
    /// Span id.
    pub span_id: [u8; 8],
    /// Parent span id; `None` for a root.
    pub parent_span_id: Option<[u8; 8]>,
    /// Name (`capif.v1.Interconnect/FetchSecurityInformation` for RPC spans).
    pub name: String,
    /// Kind.
    pub kind: SpanKind,
    /// Resource `service.name` (`ccf`, `capif-gateway`, `aef-stub`, `capif`).
    pub service_name: String,
    /// Resource `service.namespace`: the component's domain.
    pub service_namespace: String,
    /// Resource `service.instance.id` (the AEF id for AEFs).
    pub service_instance_id: String,
    /// Start, Unix nanoseconds.
    pub start_unix_ns: u64,
    /// End, Unix nanoseconds.
    pub end_unix_ns: u64,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// OTLP status message.
    pub status_message: String,
    /// `rpc.grpc.status_code`, when present.
    pub grpc_status_code: Option<i64>,
    /// `capif.reason`, when present.
    pub reason: Option<String>,
    /// `capif.step`, when present (the runner's root span of a step).
    pub step: Option<i64>,
    /// `rpc.service`, when present.
    pub rpc_service: Option<String>,
    /// `rpc.method`, when present.
    pub rpc_method: Option<String>,
    /// The spans this one links to (trace id, span id), at most [`MAX_LINKS`]: a component that
    /// starts a new trace at a partner boundary links it to the partner's span.
    pub links: Vec<([u8; 16], [u8; 8])>,
}

impl ReceivedSpan {
    /// Lowercase hex of the trace id.
    pub fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// Duration in nanoseconds (0 when the clock went backwards).
    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }

    /// Whether the span records a failure: a non-zero gRPC status, or OTLP status error.
    pub fn failed(&self) -> bool {
        self.grpc_status_code.is_some_and(|c| c != 0) || self.status_code == 2
    }
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_TEXT_CHARS {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX_TEXT_CHARS - 1).collect();
        out.push('…');
        out
    }
}

fn value_text(v: &AnyValue) -> Option<String> {
    Some(match v.value.as_ref()? {
        any_value::Value::StringValue(s) => cut(s),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        _ => return None,
    })
}

fn value_int(v: &AnyValue) -> Option<i64> {
    match v.value.as_ref()? {
        any_value::Value::IntValue(i) => Some(*i),
        any_value::Value::StringValue(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn find<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

/// The spans of one export request, as owned [`ReceivedSpan`]s. Spans whose ids have the wrong
/// length are skipped: they cannot be placed in a trace.
pub fn spans_of(req: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let res: &[KeyValue] = rs.resource.as_ref().map_or(&[], |r| &r.attributes);
        let text = |k: &str| find(res, k).and_then(value_text).unwrap_or_default();
        let (service_name, service_namespace, service_instance_id) = (
            text("service.name"),
            text("service.namespace"),
            text("service.instance.id"),
        );
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                let (Ok(trace_id), Ok(span_id)) = (
                    <[u8; 16]>::try_from(s.trace_id.as_slice()),
                    <[u8; 8]>::try_from(s.span_id.as_slice()),
                ) else {
                    continue;
                };
                let parent_span_id = <[u8; 8]>::try_from(s.parent_span_id.as_slice())
                    .ok()
                    .filter(|p| *p != [0; 8]);
                let attr = |k: &str| find(&s.attributes, k);
                out.push(ReceivedSpan {
                    trace_id,
                    span_id,
                    parent_span_id,
                    name: cut(&s.name),
                    kind: SpanKind::from_otlp(s.kind),
                    service_name: service_name.clone(),
                    service_namespace: service_namespace.clone(),
                    service_instance_id: service_instance_id.clone(),
                    start_unix_ns: s.start_time_unix_nano,
                    end_unix_ns: s.end_time_unix_nano,
                    status_code: s.status.as_ref().map_or(0, |st| st.code),
                    status_message: s
                        .status
                        .as_ref()
                        .map(|st| cut(&st.message))
                        .unwrap_or_default(),
                    grpc_status_code: attr("rpc.grpc.status_code").and_then(value_int),
                    reason: attr(REASON_ATTRIBUTE)
                        .and_then(value_text)
                        .filter(|r| !r.is_empty()),
                    step: attr(STEP_ATTRIBUTE).and_then(value_int),
                    rpc_service: attr("rpc.service").and_then(value_text),
                    rpc_method: attr("rpc.method").and_then(value_text),
                    links: s
                        .links
                        .iter()
                        .filter_map(|l| {
                            Some((
                                <[u8; 16]>::try_from(l.trace_id.as_slice()).ok()?,
                                <[u8; 8]>::try_from(l.span_id.as_slice()).ok()?,
                            ))
                        })
                        .take(MAX_LINKS)
                        .collect(),
                });
            }
        }
    }
    out
}

/// What the receiver holds.
#[derive(Default)]
struct Store {
    spans: Vec<ReceivedSpan>,
    dropped: u64,
}

/// The `TraceService` itself: keeps spans up to the limit, says how many it refused.
struct Collector {
    store: Arc<Mutex<Store>>,
    max_spans: usize,
    /// Bumped on every export, so waiters can watch for arrivals.
    arrivals: watch::Sender<u64>,
}

impl Collector {
    fn accept(&self, req: &ExportTraceServiceRequest) -> ExportTraceServiceResponse {
        let spans = spans_of(req);
        let refused = {
            let mut st = self.store.lock();
            let room = self.max_spans.saturating_sub(st.spans.len());
            let refused = spans.len().saturating_sub(room);
            st.spans.extend(spans.into_iter().take(room));
            st.dropped += refused as u64;
            refused
        };
        self.arrivals.send_modify(|n| *n += 1);
        ExportTraceServiceResponse {
            partial_success: (refused > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: refused as i64,
                error_message: format!(
                    "the report's receiver keeps at most {} spans",
                    self.max_spans
                ),
            }),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.accept(request.get_ref())))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    arrivals: watch::Receiver<u64>,
    stop: Option<oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Starts a receiver on a free loopback port.
    pub async fn start(limits: ReceiverLimits) -> Result<Self, ReceiverError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Mutex::new(Store::default()));
        let (arrivals_tx, arrivals) = watch::channel(0);
        let svc = TraceServiceServer::new(Collector {
            store: store.clone(),
            max_spans: limits.max_spans,
            arrivals: arrivals_tx,
        })
        .max_decoding_message_size(limits.max_message_bytes);
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .concurrency_limit_per_connection(32)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!("the report's OTLP receiver stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            store,
            arrivals,
            stop: Some(stop),
        })
    }

    /// Where exporters send: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of every span kept so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store.lock().spans.clone()
    }

    /// Spans refused because the receiver was full.
    pub fn dropped(&self) -> u64 {
        self.store.lock().dropped
    }

    /// Waits until `done` holds for the spans kept, or `timeout` passes; whether it held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> bool {
        let mut arrivals = self.arrivals.clone();
        let wait = async {
            loop {
                if done(&self.store.lock().spans) {
                    return;
                }
                if arrivals.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        done(&self.store.lock().spans)
    }

    /// Waits until no export has arrived for `quiet`, at most `max` in all: exporters send in
    /// batches on their own schedule, and a component flushes its last batch as it stops.
    pub async fn settle(&self, quiet: Duration, max: Duration) {
        let mut arrivals = self.arrivals.clone();
        let _ = tokio::time::timeout(max, async {
            while let Ok(Ok(())) = tokio::time::timeout(quiet, arrivals.changed()).await {}
        })
        .await;
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The runner's own tracer provider: `service.name` = `capif`, exporting in batches over
/// OTLP/gRPC to `endpoint`. Must be called inside a Tokio runtime (the tonic channel lives on
/// it). Flush it (`force_flush`) before reading the receiver.
pub fn runner_tracer(
    endpoint: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(RUNNER_SERVICE)
                .build(),
        )
        .build())
}

/// The spans of each trace, by trace id.
pub fn by_trace(spans: &[ReceivedSpan]) -> BTreeMap<[u8; 16], Vec<&ReceivedSpan>> {
    let mut m: BTreeMap<[u8; 16], Vec<&ReceivedSpan>> = BTreeMap::new();
    for s in spans {
        m.entry(s.trace_id).or_default().push(s);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};

    fn kv(k: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn request(n: usize) -> ExportTraceServiceRequest {
        let s = |i: usize| Span {
            trace_id: vec![7; 16],
            span_id: vec![i as u8 + 1; 8],
            parent_span_id: if i == 0 { vec![] } else { vec![1; 8] },
            name: "capif.v1.Interconnect/FetchSecurityInformation".into(),
            kind: 2,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 5_000,
            attributes: vec![
                kv("rpc.grpc.status_code", any_value::Value::IntValue(5)),
                kv(
                    REASON_ATTRIBUTE,
                    any_value::Value::StringValue("UNKNOWN_INVOKER".into()),
                ),
                kv(STEP_ATTRIBUTE, any_value::Value::IntValue(3)),
                kv(
                    "rpc.service",
                    any_value::Value::StringValue("x".repeat(999)),
                ),
            ],
            status: Some(Status {
                code: 2,
                message: "refused".into(),
            }),
            links: vec![
                span::Link {
                    trace_id: vec![8; 16],
                    span_id: vec![3; 8],
                    ..Default::default()
                };
                9
            ],
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv(
                            "service.name",
                            any_value::Value::StringValue("capif-gateway".into()),
                        ),
                        kv(
                            "service.namespace",
                            any_value::Value::StringValue("operator-b.test".into()),
                        ),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: (0..n).map(s).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn spans_keep_resource_rpc_and_capif_attributes_with_strings_cut() {
        let spans = spans_of(&request(2));
        assert_eq!(spans.len(), 2);
        let (root, child) = (&spans[0], &spans[1]);
        assert_eq!(root.parent_span_id, None);
        assert_eq!(child.parent_span_id, Some([1; 8]));
        assert_eq!(child.service_name, "capif-gateway");
        assert_eq!(child.service_namespace, "operator-b.test");
        assert_eq!(child.kind, SpanKind::Server);
        assert_eq!(child.grpc_status_code, Some(5));
        assert_eq!(child.reason.as_deref(), Some("UNKNOWN_INVOKER"));
        assert_eq!(child.step, Some(3));
        assert_eq!(child.duration_ns(), 4_000);
        assert_eq!(child.links, vec![([8; 16], [3; 8]); MAX_LINKS]);
        assert!(child.failed());
        assert_eq!(
            child.rpc_service.as_ref().unwrap().chars().count(),
            MAX_TEXT_CHARS
        );
    }

    #[test]
    fn spans_with_malformed_ids_are_skipped() {
        let mut req = request(1);
        req.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![1, 2, 3];
        assert!(spans_of(&req).is_empty());
    }

    #[tokio::test]
    async fn a_full_receiver_refuses_the_rest_and_counts_them() {
        let r = OtlpReceiver::start(ReceiverLimits {
            max_spans: 3,
            max_message_bytes: 1 << 20,
        })
        .await
        .unwrap();
        let collector = Collector {
            store: r.store.clone(),
            max_spans: 3,
            arrivals: watch::channel(0).0,
        };
        assert!(collector.accept(&request(2)).partial_success.is_none());
        let rsp = collector.accept(&request(2));
        assert_eq!(rsp.partial_success.unwrap().rejected_spans, 1);
        assert_eq!(r.spans().len(), 3);
        assert_eq!(r.dropped(), 1);
    }
}
