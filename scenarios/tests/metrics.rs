//! Metrics as an operator meets them, on a real two-operator testbed (the real `ccf`,
//! `capif-gateway` and `aef-stub` binaries, each with its `/metrics` listener on, as the
//! launcher starts them): every component's exposition passes `promtool check metrics` with no
//! lint complaint; a cross-domain flow and an offboarding move the gateways' per-partner counters
//! and histograms (and the CCFs' and the AEF's), compared scrape to scrape with a real parser;
//! no invoker id or key id appears anywhere in any exposition; every metric the Grafana dashboard
//! queries exists in a real gateway's exposition; and a real Prometheus server (Debian's binary)
//! finds every component `up` through the launcher's `prometheus-targets.json`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capif_scenarios::runner::Runner;
use capif_scenarios::scenario::Scenario;
use capif_scenarios::testbed::{PROMETHEUS_TARGETS, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

const SCENARIO: &str = r#"
name = "metrics"

[[domain]]
id = "operator-a.test"
[[domain.aef]]
id = "aef-weather"
apis = ["weather-v1"]

[[domain]]
id = "operator-b.test"
[[domain.aef]]
id = "aef-maps"
apis = ["maps-v1"]

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
note = "cross-domain: B's invoker at A's AEF, its key through both gateways"
"#;

/// One sample: its name and labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
}

/// An exposition in the classic text format, parsed: every sample with its value, and the
/// families `# TYPE` declares.
#[derive(Debug, Default)]
struct Exposition {
    samples: BTreeMap<Series, f64>,
    families: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for (n, line) in text.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                e.families
                    .insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) =
                parse_sample(line).unwrap_or_else(|why| panic!("line {}: {why}: {line}", n + 1));
            assert!(
                e.samples.insert(series, value).is_none(),
                "line {}: a series twice: {line}",
                n + 1
            );
        }
        e
    }

    /// The sum of the samples of `name` whose labels include `with` (0 when there is none).
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every label value of every sample.
    fn label_values(&self) -> impl Iterator<Item = &str> {
        self.samples
            .keys()
            .flat_map(|s| s.labels.values().map(String::as_str))
    }
}

/// `name{k="v",...} value [timestamp]`, with the text format's escapes in label values.
fn parse_sample(line: &str) -> Result<(Series, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = line[..name_end].to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        loop {
            let mut key = String::new();
            let mut end = None;
            for (i, c) in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' if key.is_empty() => {
                        end = Some(i);
                        break;
                    }
                    c => key.push(c),
                }
            }
            if let Some(i) = end {
                rest = &body[i + 1..];
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key:?}: no opening quote"));
            }
            let mut value = String::new();
            let mut escaped = false;
            let mut closed = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => value.push('\n'),
                    (true, c) => value.push(c),
                    (false, '\\') => {
                        escaped = true;
                        continue;
                    }
                    (false, '"') => {
                        closed = true;
                        break;
                    }
                    (false, c) => value.push(c),
                }
                escaped = false;
            }
            if !closed {
                return Err(format!("label {key:?}: no closing quote"));
            }
            if labels.insert(key.trim().to_string(), value).is_some() {
                return Err("a label twice".into());
            }
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    rest = &body[i + 1..];
                    break;
                }
                other => return Err(format!("after a label value: {other:?}")),
            }
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value after the labels")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok((Series { name, labels }, value))
}

#[test]
fn the_parser_reads_labels_escapes_and_special_values() {
    let e = Exposition::parse(
        "# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"uo,te}\"} 3\nup 1\nh_bucket{le=\"+Inf\"} +Inf\n",
    );
    assert_eq!(e.sum("x_total", &[("b", "q\"uo,te}")]), 3.0);
    assert_eq!(e.sum("up", &[]), 1.0);
    assert_eq!(e.sum("h_bucket", &[("le", "+Inf")]), f64::INFINITY);
    assert!(e.families.contains("x_total"));
    assert!(parse_sample("x{a=\"1\" 2").is_err());
}

/// GET `path` from `addr` over HTTP/1.0 (the body ends with the connection; no chunking).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

async fn scrape_all(tb: &Testbed) -> BTreeMap<String, (String, Exposition)> {
    let mut out = BTreeMap::new();
    for (component, addr) in tb.metrics_addrs() {
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{component}: {text}");
        let parsed = Exposition::parse(&text);
        out.insert(component, (text, parsed));
    }
    out
}

/// `name` on PATH, else after `scripts/install-prometheus.sh` (what CI runs); `None` when it
/// cannot be had here.
fn tool(name: &str) -> Option<PathBuf> {
    let find = || {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
    };
    if let Some(t) = find() {
        return Some(t);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-prometheus.sh");
    let _ = Command::new("bash")
        .arg(script)
        .stdout(Stdio::null())
        .status();
    find()
}

fn promtool_check(promtool: &Path, component: &str, text: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {component}: {:?}\n{said}",
        out.status
    );
}

/// Every `capif_*` metric name the dashboard's queries use.
fn dashboard_metric_names() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-gateway.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard has its queries: {exprs:?}");
    let mut names = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("capif_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs Debian's `prometheus` against the testbed's targets file for as long as it takes to
/// scrape every component once, and returns what it says of `up` and of the gateways' requests.
async fn prometheus_scrapes(prometheus: &Path, tb: &Testbed) -> (serde_json::Value, usize) {
    let dir = tempfile::tempdir().unwrap();
    let targets = tb.run_dir.join(PROMETHEUS_TARGETS);
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: capif\n    file_sd_configs:\n      - files: [\"{}\"]\n",
            targets.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut server = tokio::process::Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = server.id().unwrap();
    let api: SocketAddr = ([127, 0, 0, 1], port).into();
    let expected = tb.metrics_addrs().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let ok = loop {
        if Instant::now() > deadline {
            break false;
        }
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(api)).await
        {
            drop(s.shutdown().await);
            let (status, body) = get(api, "/api/v1/targets?state=active").await;
            if status == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let active = v["data"]["activeTargets"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if active.len() == expected && active.iter().all(|t| t["health"] == "up") {
                    break true;
                }
                last = body;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        ok,
        "prometheus (pid {pid}) did not see all {expected} targets up within 60 s: {last}\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    let (_, up) = get(api, "/api/v1/query?query=up").await;
    let up: serde_json::Value = serde_json::from_str(&up).unwrap();
    let (_, requests) = get(
        api,
        "/api/v1/query?query=capif_gateway_requests_total%7Bdirection%3D%22outbound%22%7D",
    )
    .await;
    let requests: serde_json::Value = serde_json::from_str(&requests).unwrap();
    let series = requests["data"]["result"].as_array().map_or(0, Vec::len);
    // Stopped by its pid, and waited for.
    server.kill().await.unwrap();
    (up, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_domain_flow_moves_the_partner_series_and_prometheus_scrapes_every_component() {
    let (Some(promtool), Some(prometheus)) = (tool("promtool"), tool("prometheus")) else {
        eprintln!(
            "SKIPPED: promtool or prometheus is missing and scripts/install-prometheus.sh could \
             not install them here (CI runs it before the tests)"
        );
        return;
    };
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_capif"))
        .parent()
        .unwrap()
        .to_path_buf();
    let run_dir = tempfile::tempdir().unwrap();
    let s = Scenario::parse(SCENARIO, "metrics scenario").unwrap();
    let mut tb = Testbed::up(&s, run_dir.path(), &bin_dir, true)
        .await
        .unwrap();
    // A failure below drops the testbed, whose processes are killed with it.
    check(&s, &mut tb, &promtool, &prometheus).await;
    tb.down().await;
}

async fn check(s: &Scenario, tb: &mut Testbed, promtool: &Path, prometheus: &Path) {
    let gw = |d: &str| format!("gateway:{d}");
    let ccf = |d: &str| format!("ccf:{d}");
    let before = scrape_all(tb).await;
    assert_eq!(before.len(), 6, "two CCFs, two gateways, two AEFs");

    let report = Runner::new(s, tb).run(|_, _| {}).await;
    assert!(report.passed, "{report:?}");
    let after = scrape_all(tb).await;
    let delta = |component: &str, name: &str, with: &[(&str, &str)]| {
        after[component].1.sum(name, with) - before[component].1.sum(name, with)
    };

    // Gateway-A asked B for B's invoker (the asking side), and B answered A (the answering side).
    let out = [
        ("partner", B),
        ("direction", "outbound"),
        ("rpc", "FetchSecurityInformation"),
        ("code", "OK"),
        ("reason", "none"),
    ];
    assert!(delta(&gw(A), "capif_gateway_requests_total", &out) >= 1.0);
    let miss = [("partner", B), ("cache", "miss")];
    assert!(delta(&gw(A), "capif_gateway_fetch_duration_seconds_count", &miss) >= 1.0);
    let inf = [("partner", B), ("cache", "miss"), ("le", "+Inf")];
    assert!(delta(&gw(A), "capif_gateway_fetch_duration_seconds_bucket", &inf) >= 1.0);
    assert!(delta(&gw(A), "capif_gateway_fetch_duration_seconds_sum", &miss) > 0.0);
    let to_b = [("partner", B)];
    assert!(
        delta(
            &gw(A),
            "capif_gateway_upstream_rq_time_seconds_count",
            &to_b
        ) >= 1.0
    );
    assert!(delta(&gw(A), "capif_gateway_upstream_rq_total", &to_b) >= 1.0);
    assert!(delta(&gw(A), "capif_gateway_upstream_cx_total", &to_b) >= 1.0);
    assert_eq!(
        after[&gw(A)].1.sum("capif_gateway_partner_alive", &to_b),
        1.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = after[&gw(A)].1.sum(
        "capif_gateway_partner_last_success_timestamp_seconds",
        &to_b,
    );
    assert!((now - 120.0..now + 5.0).contains(&last), "{last} vs {now}");
    let b_ca = [("cert", "partner_ca"), ("partner", B)];
    assert!(
        after[&gw(A)]
            .1
            .sum("capif_certificate_expiry_timestamp_seconds", &b_ca)
            > now
    );
    let inbound = [
        ("partner", A),
        ("direction", "inbound"),
        ("rpc", "FetchSecurityInformation"),
        ("code", "OK"),
    ];
    assert!(delta(&gw(B), "capif_gateway_requests_total", &inbound) >= 1.0);
    let capif6e_ok = [("listener", "capif6e"), ("result", "ok")];
    assert!(delta(&gw(B), "capif_tls_handshakes_total", &capif6e_ok) >= 1.0);

    // The CCFs: B handed A's gateway the key; A answered its AEF with a foreign invoker's key.
    let handed = [("partner", A), ("method", "PSK")];
    assert_eq!(
        delta(&ccf(B), "capif_ccf_partner_keys_handed_total", &handed),
        1.0
    );
    let foreign = [("scope", "foreign"), ("code", "OK")];
    assert!(delta(&ccf(A), "capif_ccf_security_info_answers_total", &foreign) >= 1.0);
    let psk = [("method", "PSK"), ("code", "OK")];
    assert!(delta(&ccf(B), "capif_ccf_negotiations_total", &psk) >= 1.0);
    assert!(delta(&ccf(B), "capif_ccf_onboardings_total", &[("code", "OK")]) >= 1.0);
    let onboard = [("operation", "onboard")];
    assert!(delta(&ccf(B), "capif_ccf_store_duration_seconds_count", &onboard) >= 1.0);

    // The AEF: an initiation, a TLS-PSK handshake and a call, each ok.
    let aef = "aef:aef-weather";
    assert!(delta(aef, "capif_aef_authentication_initiations_total", &psk) >= 1.0);
    let call = [("endpoint", "psk"), ("code", "OK")];
    assert!(delta(aef, "capif_aef_api_calls_total", &call) >= 1.0);
    let psk_ok = [("listener", "psk"), ("result", "ok")];
    assert!(delta(aef, "capif_tls_handshakes_total", &psk_ok) >= 1.0);

    // B offboards its invoker: B's gateway sends the notice to A, which applies it.
    let profile = tb.run_dir.join("invokers").join("bob");
    let invoker = toml::from_str::<toml::Value>(
        &std::fs::read_to_string(profile.join("profile.toml")).unwrap(),
    )
    .unwrap()["api_invoker_id"]
        .as_str()
        .unwrap()
        .to_string();
    let key_id = toml::from_str::<toml::Value>(
        &std::fs::read_to_string(profile.join("keys").join("aef-weather.toml")).unwrap(),
    )
    .unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let offboard = Scenario::parse(
        &SCENARIO
            .split("[[step]]")
            .next()
            .map(|head| format!("{head}[[step]]\naction = \"offboard\"\ninvoker = \"bob\"\n"))
            .unwrap(),
        "offboard",
    )
    .unwrap();
    let report = Runner::new(&offboard, tb).run(|_, _| {}).await;
    assert!(report.passed, "{report:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let last = loop {
        let now = scrape_all(tb).await;
        let applied = [("partner", B), ("result", "applied")];
        let received = now[&gw(A)]
            .1
            .sum("capif_gateway_revocations_received_total", &applied);
        let sent = now[&gw(B)]
            .1
            .sum("capif_gateway_revocations_sent_total", &[("partner", A)]);
        if received >= 1.0 && sent >= 1.0 || Instant::now() > deadline {
            assert!(
                received >= 1.0 && sent >= 1.0,
                "sent {sent}, received {received}"
            );
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let published = [("kind", "OFFBOARDED")];
    assert_eq!(
        last[&ccf(B)]
            .1
            .sum("capif_ccf_revocations_published_total", &published),
        1.0
    );
    assert_eq!(
        last[&gw(B)]
            .1
            .sum("capif_gateway_revocations_pending", &[("partner", A)]),
        0.0
    );

    // Every exposition: promtool has nothing to say, and no invoker id or key id is in it.
    for (component, (text, parsed)) in &last {
        promtool_check(promtool, component, text);
        assert!(
            !text.contains(&invoker) && !text.contains(&key_id),
            "{component} exposes the invoker {invoker} or its key id {key_id}:\n{text}"
        );
        if let Some(v) = parsed.label_values().find(|v| v.starts_with("inv-")) {
            panic!("{component}: label value {v:?} looks like an invoker id");
        }
    }

    // Every metric the gateway dashboard queries exists in a real gateway's exposition.
    let gateway = &last[&gw(A)].1;
    let known: BTreeSet<&str> = gateway
        .samples
        .keys()
        .map(|s| s.name.as_str())
        .chain(gateway.families.iter().map(String::as_str))
        .collect();
    for name in dashboard_metric_names() {
        assert!(
            known.contains(name.as_str()),
            "the dashboard queries {name}, which the gateway does not expose"
        );
    }

    // A real Prometheus server finds every component up, and stores the gateways' series.
    let (up, series) = prometheus_scrapes(prometheus, tb).await;
    let result = up["data"]["result"].as_array().unwrap();
    assert_eq!(result.len(), tb.metrics_addrs().len(), "{up}");
    for r in result {
        assert_eq!(r["value"][1], "1", "{r}");
    }
    assert!(series >= 1, "no capif_gateway_requests_total in prometheus");
}
