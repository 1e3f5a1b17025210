//! `report.html` in a real headless browser (Debian's `chromium --headless --dump-dom`): the
//! page a user opens must show the six lanes, the steps, an arrow per hop with its duration and
//! a refusal's reason, and no markup smuggled in through a name.
//!
//! The spans come through the real receiver (`capif_scenarios::otlp`) over OTLP/gRPC, exported
//! by the OpenTelemetry SDK as six processes would (one tracer provider per service, the W3C
//! `traceparent` injected and extracted at every hop). A real `capif scenario run` of the
//! two-operator scenario writes the page too; what its diagrams can show depends on whether the
//! components export spans (the tracing work of issue 15), so that test checks the runner's side
//! always and the diagram whenever component spans arrived.
//!
//! The browser is found on PATH (`$CHROMIUM`, `chromium`, `chromium-browser`), else installed
//! by `scripts/install-chromium.sh`; a test skips, saying why, only when neither works.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use capif_scenarios::otlp::{OtlpReceiver, ReceiverLimits, STEP_ATTRIBUTE, runner_tracer};
use capif_scenarios::report::render;
use capif_scenarios::runner::{Report, StepReport};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The browser, installed by the project's script when missing; `None` (and the reason on
/// stderr) only when it is neither there nor installable.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let found = || on_path("chromium").or_else(|| on_path("chromium-browser"));
    if let Some(p) = found() {
        return Some(p);
    }
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/install-chromium.sh"))
        .output()
        .unwrap();
    if out.status.success()
        && let Some(p) = found()
    {
        return Some(p);
    }
    eprintln!(
        "SKIPPED: no chromium on PATH and scripts/install-chromium.sh could not install it:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    None
}

/// The DOM headless Chromium builds from `page` (bounded: a browser that hangs fails the test).
async fn dump_dom(browser: &Path, page: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--disable-background-networking", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("chromium did not finish within 90 s")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The part of the DOM of step `n`'s diagram section.
fn section(dom: &str, n: usize) -> &str {
    let start = dom
        .find(&format!("id=\"step-{n}\""))
        .unwrap_or_else(|| panic!("no section for step {n}"));
    let end = dom[start..].find("</section>").unwrap() + start;
    &dom[start..end]
}

/// (from, to, refused) of each hop group of a section, in document order.
fn hops_of(section: &str) -> Vec<(String, String, bool)> {
    let attr = |s: &str, name: &str| {
        let i = s.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        s[i..i + s[i..].find('"').unwrap()].to_string()
    };
    section
        .match_indices("<g class=\"hop")
        .map(|(i, _)| {
            let tag = &section[i..i + section[i..].find('>').unwrap()];
            (
                attr(tag, "data-from"),
                attr(tag, "data-to"),
                tag.contains("hop refused"),
            )
        })
        .collect()
}

/// One process of the simulated federation: its own tracer provider and resource.
struct Proc {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

fn process(endpoint: &str, service: &str, domain: &str, instance: &str) -> Proc {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .unwrap();
    let mut attrs = vec![KeyValue::new("service.namespace", domain.to_string())];
    if !instance.is_empty() {
        attrs.push(KeyValue::new("service.instance.id", instance.to_string()));
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service.to_string())
                .with_attributes(attrs)
                .build(),
        )
        .build();
    let tracer = provider.tracer("report-test");
    Proc { provider, tracer }
}

/// A refusal as the components record it: gRPC code and stable reason.
#[derive(Clone, Copy)]
struct Refusal {
    code: i64,
    reason: &'static str,
}

fn at(base: SystemTime, us: u64) -> SystemTime {
    base + Duration::from_micros(us)
}

/// A chain of calls as the components make them: `caller` calls `path[0]`, which calls
/// `path[1]`, ...; each hop is a CLIENT span at the caller and a SERVER span at the callee whose
/// parent arrives through a `traceparent` header. Times in µs from `base`; every span of the
/// chain carries `refusal` (a reason passes back through every hop unchanged).
fn chain(
    caller: &Proc,
    caller_cx: &Context,
    path: &[(&Proc, &str)],
    base: SystemTime,
    (start, end): (u64, u64),
    refusal: Option<Refusal>,
) {
    let Some(((callee, method), rest)) = path.split_first() else {
        return;
    };
    let (service, rpc_method) = method.split_once('/').unwrap();
    let attrs = |status: i64| {
        let mut v = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_string()),
            KeyValue::new("rpc.method", rpc_method.to_string()),
            KeyValue::new("rpc.grpc.status_code", status),
        ];
        if let Some(r) = refusal {
            v.push(KeyValue::new("capif.reason", r.reason));
        }
        v
    };
    let status = refusal.map_or(0, |r| r.code);
    let client = caller
        .tracer
        .span_builder(method.to_string())
        .with_kind(SpanKind::Client)
        .with_start_time(at(base, start))
        .with_attributes(attrs(status))
        .start_with_context(&caller.tracer, caller_cx);
    let client_cx = caller_cx.with_span(client);
    // Across the process boundary: only the W3C header travels.
    let mut headers: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&client_cx, &mut headers);
    assert!(headers.contains_key("traceparent"));
    let remote = TraceContextPropagator::new().extract(&headers);
    let server = callee
        .tracer
        .span_builder(method.to_string())
        .with_kind(SpanKind::Server)
        .with_start_time(at(base, start + 40))
        .with_attributes(attrs(status))
        .start_with_context(&callee.tracer, &remote);
    let server_cx = remote.with_span(server);
    chain(
        callee,
        &server_cx,
        rest,
        base,
        (start + 120, end - 120),
        refusal,
    );
    server_cx.span().end_with_timestamp(at(base, end - 40));
    client_cx.span().end_with_timestamp(at(base, end));
}

fn row(
    step: usize,
    action: &str,
    target: &str,
    got: &str,
    domains: Option<(&str, &str)>,
) -> StepReport {
    StepReport {
        step,
        action: action.into(),
        target: target.into(),
        expected: got.into(),
        got: got.into(),
        passed: true,
        millis: 12,
        detail: "1/1 succeeded".into(),
        trace_id: String::new(),
        window_unix_ns: (0, 0),
        domains: domains.map(|(a, b)| (a.to_string(), b.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_through_the_receiver_draw_every_lane_hop_and_refusal_in_chromium() {
    let Some(browser) = chromium() else { return };
    let receiver = OtlpReceiver::start(ReceiverLimits::default())
        .await
        .unwrap();
    let ep = receiver.endpoint();
    let runner = runner_tracer(&ep).unwrap();
    let runner_tracer = runner.tracer("report-test");
    let invoker = Proc {
        tracer: runner_tracer.clone(),
        provider: runner.clone(),
    };
    let aef = process(&ep, "aef-stub", A, "aef-weather");
    let ccf_a = process(&ep, "ccf", A, "");
    let gw_a = process(&ep, "capif-gateway", A, "");
    let gw_b = process(&ep, "capif-gateway", B, "");
    let ccf_b = process(&ep, "ccf", B, "");

    let base = SystemTime::now();
    let fetch: [(&Proc, &str); 5] = [
        (&aef, "capif.v1.AefSecurity/CheckAuthentication"),
        (&ccf_a, "capif.v1.Security/GetSecurityInformation"),
        (&gw_a, "capif.v1.Gateway/FetchSecurityInformation"),
        (&gw_b, "capif.v1.Interconnect/FetchSecurityInformation"),
        (
            &ccf_b,
            "capif.v1.Federation/GetSecurityInformationForPartner",
        ),
    ];
    // Steps 3 and 4 are cross-domain: the key's whole path, then a refusal from CCF-B that
    // comes back through every hop. Step 5 is cross-domain with no spans at all.
    let mut rows = vec![
        row(1, "onboard", "bob (1)", "ok", None),
        row(2, "onboard", "alice (1)", "ok", None),
        row(3, "run", "bob (1) -> aef-weather", "ok", Some((A, B))),
        row(
            4,
            "auth",
            "mallory <b>x</b> (1) -> aef-weather",
            "NOT_FOUND (UNKNOWN_INVOKER)",
            Some((A, B)),
        ),
        row(5, "run", "carol (1) -> aef-weather", "ok", Some((A, B))),
    ];
    for (n, refusal, t) in [
        (3, None, 0),
        (
            4,
            Some(Refusal {
                code: 5,
                reason: "UNKNOWN_INVOKER",
            }),
            100_000,
        ),
    ] {
        let root = runner_tracer
            .span_builder(format!("scenario step {n}"))
            .with_start_time(at(base, t))
            .with_attributes([KeyValue::new(STEP_ATTRIBUTE, n as i64)])
            .start_with_context(&runner_tracer, &Context::new());
        rows[n - 1].trace_id = root.span_context().trace_id().to_string();
        let cx = Context::new().with_span(root);
        chain(
            &invoker,
            &cx,
            &fetch,
            base,
            (t + 1_000, t + 41_000),
            refusal,
        );
        if refusal.is_none() {
            // The API call over TLS-PSK once the key is there.
            chain(
                &invoker,
                &cx,
                &[(&aef, "capif.v1.DemoApi/Invoke")],
                base,
                (t + 45_000, t + 48_000),
                None,
            );
        }
        cx.span().end_with_timestamp(at(base, t + 50_000));
    }
    for p in [&invoker, &aef, &ccf_a, &gw_a, &gw_b, &ccf_b] {
        let provider = p.provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .unwrap()
            .unwrap();
    }
    // 1 root + 12 (step 3), 1 root + 10 (step 4).
    assert!(
        receiver
            .wait_for(Duration::from_secs(20), |s| s.len() >= 24)
            .await,
        "the receiver got {} spans of 24",
        receiver.spans().len()
    );

    let report = Report {
        scenario: "two operators <script>alert('x')</script> & \"quotes\"".into(),
        file: "scenarios/scenarios/two-operators.toml".into(),
        passed: true,
        steps: rows,
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(
        &page,
        render(&report, &receiver.spans(), receiver.dropped()),
    )
    .unwrap();
    // How docs/report-example.png is made (docs/SCENARIOS.md): keep the page, then screenshot it.
    if let Some(keep) = std::env::var_os("REPORT_HTML_KEEP") {
        std::fs::copy(&page, keep).unwrap();
    }
    let dom = dump_dom(&browser, &page).await;

    // The title is text: no script element made it into the DOM.
    assert!(!dom.contains("<script"), "markup smuggled in:\n{dom}");
    assert!(dom.contains("two operators &lt;script&gt;alert('x')&lt;/script&gt; &amp; \"quotes\""));
    assert!(dom.contains("mallory &lt;b&gt;x&lt;/b&gt;") && !dom.contains("<b>x</b>"));
    // The steps table: every step, in order.
    let rows: Vec<usize> = (1..=5)
        .filter_map(|n| dom.find(&format!("<tr class=\"step-row pass\" data-step=\"{n}\"")))
        .collect();
    assert_eq!(rows.len(), 5, "steps table:\n{dom}");
    assert!(rows.windows(2).all(|w| w[0] < w[1]));
    // Only the cross-domain steps have a diagram.
    assert!(!dom.contains("id=\"step-1\"") && !dom.contains("id=\"step-2\""));

    let s3 = section(&dom, 3);
    for (lane, title) in [
        ("invoker", "invoker"),
        ("aef", "AEF"),
        ("ccf-a", "CCF-A"),
        ("gateway-a", "gateway-A"),
        ("gateway-b", "gateway-B"),
        ("ccf-b", "CCF-B"),
    ] {
        let i = s3
            .find(&format!("data-lane=\"{lane}\""))
            .unwrap_or_else(|| panic!("no lane {lane}:\n{s3}"));
        assert!(s3[i..].contains(&format!(">{title}</text>")), "lane {lane}");
    }
    let hop = |f: &str, t: &str, refused| (f.to_string(), t.to_string(), refused);
    assert_eq!(
        hops_of(s3),
        [
            hop("invoker", "aef", false),
            hop("aef", "ccf-a", false),
            hop("ccf-a", "gateway-a", false),
            hop("gateway-a", "gateway-b", false),
            hop("gateway-b", "ccf-b", false),
            hop("invoker", "aef", false),
        ]
    );
    // Each hop's duration as its caller saw it: 40 ms for the first, 3 ms for the API call.
    assert!(
        s3.contains(">40.0 ms</text>") && s3.contains(">3.0 ms</text>"),
        "{s3}"
    );
    assert!(s3.contains("Interconnect/FetchSecurityInformation"));

    let s4 = section(&dom, 4);
    let h4 = hops_of(s4);
    assert_eq!(h4.len(), 5, "{s4}");
    assert!(h4.iter().all(|(_, _, refused)| *refused));
    assert_eq!(
        s4.matches("class=\"refusal\"").count(),
        5,
        "a red reason on every return:\n{s4}"
    );
    assert!(s4.contains("✗ UNKNOWN_INVOKER"));

    let s5 = section(&dom, 5);
    assert!(s5.contains("No spans arrived for this step."));
    assert!(hops_of(s5).is_empty());
}

#[test]
fn a_scenario_run_writes_a_report_that_renders() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capif"))
        .args(["scenario", "run"])
        .arg(root().join("scenarios/scenarios/two-operators.toml"))
        .arg("--run-dir")
        .arg(dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let page = dir.path().join("report.html");
    assert!(
        text.contains(&format!("report: {}", page.display())),
        "{text}"
    );
    let dom = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(dump_dom(&browser, &page));
    assert!(dom.contains("two operators, happy path"));
    for n in 1..=8 {
        let at = dom
            .find(&format!("<tr class=\"step-row pass\" data-step=\"{n}\""))
            .unwrap_or_else(|| panic!("no row for step {n}:\n{dom}"));
        // The runner's root span of every step arrived: the spans column is at least 1.
        let tr = &dom[at..at + dom[at..].find("</tr>").unwrap()];
        let spans: Vec<&str> = tr.split("<td class=\"num\">").skip(3).collect();
        let count: usize = spans[0].split('<').next().unwrap().parse().unwrap();
        assert!(count >= 1, "no span for step {n}: {tr}");
    }
    // Every component exports its spans to the run's receiver: no banner.
    assert!(!dom.contains("class=\"banner\""), "components sent no span");
    // Steps 3 (B's invoker at A's AEF), 5 (A's invoker at B's AEF) and 6 are cross-domain.
    for n in [3, 5, 6] {
        let s = section(&dom, n);
        for lane in ["invoker", "aef", "ccf-a", "gateway-a", "gateway-b", "ccf-b"] {
            assert!(s.contains(&format!("data-lane=\"{lane}\"")), "{s}");
        }
        assert!(!hops_of(s).is_empty(), "{s}");
    }
    // Steps 3 and 5 fetch the key across the border: the whole chain is drawn, hop by hop, and
    // nothing was refused.
    for n in [3, 5] {
        let hops = hops_of(section(&dom, n));
        for (from, to) in [
            ("invoker", "aef"),
            ("aef", "ccf-a"),
            ("ccf-a", "gateway-a"),
            ("gateway-a", "gateway-b"),
            ("gateway-b", "ccf-b"),
        ] {
            assert!(
                hops.iter().any(|(f, t, _)| f == from && t == to),
                "step {n}: no hop {from} -> {to} in {hops:?}"
            );
        }
        assert!(hops.iter().all(|(_, _, refused)| !refused), "{hops:?}");
    }
    assert!(!dom.contains("id=\"step-1\"") && !dom.contains("id=\"step-4\""));
}
