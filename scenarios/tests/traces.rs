//! One trace across domains, with the real binaries: the `capif` binary runs a two-operator
//! scenario (B's invoker at A's AEF) on a testbed of real `ccf`, `capif-gateway` and `aef-stub`
//! processes. Without an OTLP endpoint, the logs of all six hops (capif, AEF, CCF-A, gateway-A,
//! gateway-B, CCF-B) hold lines with the flow's trace id, every component log line is a JSON
//! object with the documented fields and no file holds an ESC byte; with an endpoint (an OTLP
//! receiver this test runs), the flow's spans arrive from all six services in one trace, each
//! hop's server span the child of the previous hop's client span, and a revocation's push
//! through the durable outboxes (CCF-B -> gateway-B -> gateway-A -> CCF-A -> AEF) is the trace
//! of the step that revoked.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// Testbeds of this binary run one at a time (2 CI cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

/// Bob of B onboards at home, then runs the whole PSK flow at A's AEF: step 2 is the one
/// cross-domain flow.
const SCENARIO: &str = r#"
name = "one cross-domain flow"
[[domain]]
id = "operator-a.test"
[[domain.aef]]
id = "aef-weather"
apis = ["weather-v1"]
[[domain]]
id = "operator-b.test"
[[invoker]]
name = "bob"
home = "operator-b.test"
[[step]]
action = "onboard"
invoker = "bob"
[[step]]
action = "run"
invoker = "bob"
aef = "aef-weather"
api = "weather-v1"
"#;

/// Then B's operator revokes bob (step 3): the notice goes CCF-B -> gateway-B -> gateway-A ->
/// CCF-A -> AEF through the outboxes; A's AEF refuses bob's next handshake (step 5).
const REVOCATION: &str = r#"
[[step]]
action = "revoke"
invoker = "bob"
[[step]]
action = "wait"
ms = 1000
[[step]]
action = "call"
invoker = "bob"
aef = "aef-weather"
api = "weather-v1"
expect = "HANDSHAKE_REFUSED"
"#;

/// Runs `scenario` with the real `capif` (JSON logs, info level), exporting to `otlp` when
/// given; returns the run directory, capif's stderr and the trace ids of the steps.
async fn run_scenario(scenario: &str, otlp: Option<&str>) -> (PathBuf, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap().keep();
    let file = dir.join("flow.toml");
    std::fs::write(&file, scenario).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_capif"));
    cmd.env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .args(["--log-format", "json"]);
    if let Some(e) = otlp {
        cmd.args(["--otlp-endpoint", e]);
    }
    let out = cmd
        .args(["scenario", "run"])
        .arg(&file)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["steps"][1]["action"], "run");
    let traces: Vec<String> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["trace_id"].as_str().unwrap().to_string())
        .collect();
    for t in &traces {
        assert!(
            t.len() == 32
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{t:?}"
        );
    }
    (dir, stderr, traces)
}

/// The JSON lines of a log that carry `trace`.
fn lines_with_trace(text: &str, trace: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["trace_id"] == trace)
        .collect()
}

fn log(run: &Path, name: &str) -> String {
    std::fs::read_to_string(run.join("logs").join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flow_has_its_trace_id_in_the_logs_of_all_six_hops() {
    let _g = SERIAL.lock().await;
    let (dir, stderr, traces) = run_scenario(SCENARIO, None).await;
    let trace = traces[1].clone();
    let run = dir.join("run");
    let hops = [
        ("capif", stderr.clone(), "invoker operation done"),
        (
            "aef",
            log(&run, "aef-aef-weather.log"),
            "key fetched from CCF",
        ),
        (
            "ccf-a",
            log(&run, &format!("ccf-{A}.log")),
            "foreign security information handed to AEF",
        ),
        (
            "gateway-a",
            log(&run, &format!("gateway-{A}.log")),
            "security information fetched from partner",
        ),
        (
            "gateway-b",
            log(&run, &format!("gateway-{B}.log")),
            "key handed to partner",
        ),
        (
            "ccf-b",
            log(&run, &format!("ccf-{B}.log")),
            "security information handed to partner",
        ),
    ];
    for (hop, text, message) in &hops {
        let lines = lines_with_trace(text, &trace);
        assert!(
            lines.iter().any(|l| l["message"] == *message),
            "{hop}: no line {message:?} with trace {trace}:\n{text}"
        );
        for l in &lines {
            let span = l["span_id"].as_str().unwrap();
            assert_eq!(span.len(), 16, "{l}");
        }
    }
    // The demo API call after the TLS-PSK handshake is in the same trace.
    assert!(
        lines_with_trace(&hops[1].1, &trace)
            .iter()
            .any(|l| l["message"] == "API call served")
    );
    // Every component line is one JSON object with the documented fields; no file holds ESC.
    for e in std::fs::read_dir(run.join("logs")).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.contains(&0x1b), "ESC in {}", path.display());
        for line in String::from_utf8(bytes).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", path.display()));
            for field in ["timestamp", "level", "target", "message"] {
                assert!(
                    v[field].is_string(),
                    "{}: no {field}: {line}",
                    path.display()
                );
            }
        }
    }
    assert!(!stderr.as_bytes().contains(&0x1b));
    let _ = std::fs::remove_dir_all(dir);
}

/// One span as received, with its resource.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    namespace: String,
    instance: String,
    name: String,
    kind: i32,
    trace: String,
    span: String,
    parent: String,
    attrs: BTreeMap<String, String>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// An OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            let get = |k: &str| res.get(k).cloned().unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Received {
                    service: get("service.name"),
                    namespace: get("service.namespace"),
                    instance: get("service.instance.id"),
                    name: span.name.clone(),
                    kind: span.kind,
                    trace: hex(&span.trace_id),
                    span: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attrs: attrs(&span.attributes),
                });
            }
        }
        self.0.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spans_of_one_flow_reach_an_otlp_receiver_in_one_trace() {
    let _g = SERIAL.lock().await;
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    // Every process flushes its spans as it stops, before `capif` returns.
    let (dir, _, traces) = run_scenario(&format!("{SCENARIO}{REVOCATION}"), Some(&endpoint)).await;
    let trace = traces[1].clone();
    server.abort();
    let all = receiver.0.lock().unwrap().clone();
    let flow: Vec<&Received> = all.iter().filter(|s| s.trace == trace).collect();
    let services: BTreeSet<(String, String)> = flow
        .iter()
        .map(|s| (s.service.clone(), s.namespace.clone()))
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("capif", ""),
        ("aef-stub", A),
        ("ccf", A),
        ("capif-gateway", A),
        ("capif-gateway", B),
        ("ccf", B),
    ]
    .iter()
    .map(|(s, n)| (s.to_string(), n.to_string()))
    .collect();
    assert_eq!(services, want, "services in trace {trace}");
    assert!(
        flow.iter()
            .filter(|s| s.service == "aef-stub")
            .all(|s| s.instance == "aef-weather")
    );

    let find = |service: &str, ns: &str, name: &str, kind: SpanKind| -> &Received {
        flow.iter()
            .find(|s| {
                s.service == service && s.namespace == ns && s.name == name && s.kind == kind as i32
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {kind:?} span {name} of {service} {ns} in trace {trace}: {:#?}",
                    flow.iter()
                        .map(|s| (&s.service, &s.namespace, &s.name, s.kind))
                        .collect::<Vec<_>>()
                )
            })
    };
    use SpanKind::{Client, Server};
    // Each hop: the caller's client span is the parent of the callee's server span.
    let hops = [
        (
            ("capif", ""),
            ("aef-stub", A),
            "capif.v1.AefSecurity/CheckAuthentication",
        ),
        (
            ("aef-stub", A),
            ("ccf", A),
            "capif.v1.Security/GetSecurityInformation",
        ),
        (
            ("ccf", A),
            ("capif-gateway", A),
            "capif.v1.Gateway/FetchSecurityInformation",
        ),
        (
            ("capif-gateway", A),
            ("capif-gateway", B),
            "capif.v1.Interconnect/FetchSecurityInformation",
        ),
        (
            ("capif-gateway", B),
            ("ccf", B),
            "capif.v1.Federation/GetSecurityInformationForPartner",
        ),
        (
            ("capif", ""),
            ("ccf", B),
            "capif.v1.Security/ObtainSecurityMethod",
        ),
        (("capif", ""), ("aef-stub", A), "capif.v1.DemoApi/Invoke"),
    ];
    for ((cs, cn), (ss, sn), name) in hops {
        let client = find(cs, cn, name, Client);
        let server = find(ss, sn, name, Server);
        assert_eq!(
            server.parent, client.span,
            "{name}: {server:?} / {client:?}"
        );
        let (service, method) = name.split_once('/').unwrap();
        assert_eq!(server.attrs["rpc.system"], "grpc");
        assert_eq!(server.attrs["rpc.service"], service);
        assert_eq!(server.attrs["rpc.method"], method);
        assert_eq!(server.attrs["rpc.grpc.status_code"], "0", "{server:?}");
        assert!(client.attrs.contains_key("server.address"), "{client:?}");
    }
    // The handshakes, and the step at the root.
    let psk = find("capif", "", "capif.psk_handshake", Client);
    assert_eq!(psk.attrs["capif.outcome"], "accepted");
    find("capif", "", "capif.capif1e_handshake", Client);
    let root = find("capif", "", "capif.scenario.step", SpanKind::Internal);
    assert!(root.parent.is_empty(), "{root:?}");
    assert_eq!(root.attrs["capif.step"], "2");
    // The AEF's side of the PSK handshake ran before any request: a trace of its own.
    assert!(all.iter().any(|s| s.service == "aef-stub"
        && s.name == "capif.psk_handshake"
        && s.kind == Server as i32
        && s.attrs.get("capif.outcome").map(String::as_str) == Some("accepted")));

    // The revocation push, through both outboxes, is the revoke step's trace too.
    let revoke: Vec<&Received> = all.iter().filter(|s| s.trace == traces[2]).collect();
    let has = |service: &str, ns: &str, name: &str, kind: SpanKind| {
        revoke.iter().any(|s| {
            s.service == service && s.namespace == ns && s.name == name && s.kind == kind as i32
        })
    };
    for (service, ns, name, kind) in [
        ("ccf", B, "capif.v1.Security/RevokeAuthorization", Server),
        ("ccf", B, "capif.v1.Gateway/PublishRevocation", Client),
        (
            "capif-gateway",
            B,
            "capif.v1.Gateway/PublishRevocation",
            Server,
        ),
        (
            "capif-gateway",
            B,
            "capif.v1.Interconnect/NotifyRevocation",
            Client,
        ),
        (
            "capif-gateway",
            A,
            "capif.v1.Interconnect/NotifyRevocation",
            Server,
        ),
        (
            "capif-gateway",
            A,
            "capif.v1.Federation/NotifyRevocation",
            Client,
        ),
        ("ccf", A, "capif.v1.Federation/NotifyRevocation", Server),
        ("ccf", A, "capif.v1.AefSecurity/RevokeAuthorization", Client),
        (
            "aef-stub",
            A,
            "capif.v1.AefSecurity/RevokeAuthorization",
            Server,
        ),
    ] {
        assert!(
            has(service, ns, name, kind),
            "no {kind:?} span {name} of {service} {ns} in the revocation's trace: {:#?}",
            revoke
                .iter()
                .map(|s| (&s.service, &s.namespace, &s.name, s.kind))
                .collect::<Vec<_>>()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
