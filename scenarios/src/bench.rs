//! `capif bench`: what the gateway costs, as ratios against a floor measured in the same run
//! (docs/BENCHMARKS.md). The subject is a real two-operator testbed (the release binaries as
//! processes, from the launcher); the floor is a chain of bare tonic hops (`capif bench-floor`
//! processes) over the same mutual-TLS accept loop, with the same message types and sizes, so
//! the difference is the gateway's own work.
//!
//! Cases: (a) cache-hit lookup at gateway-A vs one bare hop (three repetitions, median judged); (b) cross-domain misses with unique
//! keys (client → gateway-A → gateway-B → CCF-B) vs three bare hops; (c) the AEF-level request
//! (AEF → CCF-A → gateway-A, cache hit) vs two bare hops; (d) full invoker flows per second;
//! (e) a coalescing storm: N concurrent misses for one key → upstream calls; (f) memory per cached
//! entry (in-process, RSS); (g) what operators would deploy instead, an nginx gRPC proxy chain
//! (`nginx`); (h) how cost grows with partners and cached entries (`growth`). The latency CDF
//! plots of (a) and (b) are drawn by `plot`; (i) replicas and the PostgreSQL store, on three
//! testbeds of their own after the main one is down (`replicas`, also alone: `--only i`).

mod growth;
mod nginx;
mod plot;
mod replicas;

pub use growth::serve_partner;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use capif_proto::v1::{
    self as pb, ErrorReason, gateway_admin_client::GatewayAdminClient,
    gateway_client::GatewayClient, gateway_server::Gateway, security_client::SecurityClient,
};
use ccf_core::grpc::error_status;
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, CcfId};
use ccf_core::pki::DomainCa;
use ccf_core::tls::{
    ClientAuth, ExpectedPeer, client_config, connect, connect_lazy, server_config,
};
use hdrhistogram::Histogram;
use tokio::process::Child;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::invoker::{self, Profile};
use crate::scenario::Scenario;
use crate::testbed::{DomainPlan, Testbed, spawn_ready};

/// Sizes and durations of a run.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    /// Measurement time per latency case.
    pub duration: Duration,
    /// Concurrent streams (closed loop).
    pub concurrency: usize,
    /// Invokers with distinct keys for the miss case (b).
    pub unique_keys: usize,
    /// Concurrent misses for one key (e).
    pub storm: usize,
    /// Entry counts for the memory case (f).
    pub mem_entries: Vec<usize>,
    /// Invoker flows for case d.
    pub flows: usize,
    /// Also write the latency CDF plots here (`--plots`, e.g. docs/bench/); they always go to
    /// the run directory.
    pub plots: Option<PathBuf>,
    /// Partner counts of the growth case (h).
    pub growth_partners: Vec<usize>,
    /// Cached entry counts of the growth case (h): the partner rows run at the first, the
    /// one-partner cache is then grown to the last.
    pub growth_entries: Vec<usize>,
    /// Case (g) may install nginx (scripts/install-nginx.sh) when it is missing; the smoke run
    /// only uses one that is there.
    pub install_nginx: bool,
    /// Invokers with distinct keys for the miss part of case (i), per testbed.
    pub replicas_keys: usize,
    /// Measurement time of the hit part of case (i), per testbed.
    pub replicas_duration: Duration,
    /// Run case (i) alone (`--only i`), without the main testbed.
    pub only_i: bool,
}

impl BenchOpts {
    /// The full run of docs/BENCHMARKS.md.
    pub fn full() -> Self {
        Self {
            duration: Duration::from_secs(10),
            concurrency: 32,
            unique_keys: 3000,
            storm: 1000,
            mem_entries: vec![100_000, 1_000_000],
            flows: 600,
            plots: None,
            growth_partners: vec![1, 8, 32],
            growth_entries: vec![1000, 1_000_000],
            install_nginx: true,
            replicas_keys: 2000,
            replicas_duration: Duration::from_secs(5),
            only_i: false,
        }
    }

    /// A quick run that only shows the benchmark still works (CI).
    pub fn smoke() -> Self {
        Self {
            duration: Duration::from_millis(500),
            concurrency: 4,
            unique_keys: 24,
            storm: 1000,
            mem_entries: vec![10_000],
            flows: 12,
            plots: None,
            growth_partners: vec![1, 8, 32],
            growth_entries: vec![100, 2000],
            install_nginx: false,
            replicas_keys: 16,
            replicas_duration: Duration::from_millis(300),
            only_i: false,
        }
    }
}

/// Latency and throughput of one measurement.
pub struct Measured {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

impl Measured {
    fn q(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    /// Operations per second.
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn line(&self, name: &str) -> String {
        format!(
            "{name:<34} p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms  {:>9.0} ops/s  ({} ops, {} errors)",
            self.q(0.5),
            self.q(0.9),
            self.q(0.99),
            self.hist.max() as f64 / 1000.0,
            self.throughput(),
            self.ops,
            self.errors
        )
    }
}

/// Closed loop: `concurrency` streams each issue the next operation as soon as the previous
/// one answered, until `duration` has passed or `limit` operations were issued.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    duration: Duration,
    limit: Option<u64>,
    op: F,
) -> Measured
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (op, next) = (op.clone(), next.clone());
        set.spawn(async move {
            let mut h =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut ops, mut errors, mut first) = (0u64, 0u64, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if start.elapsed() >= duration || limit.is_some_and(|l| i >= l) {
                    break;
                }
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => {
                        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                        ops += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (h, ops, errors, first)
        });
    }
    let mut m = Measured {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    while let Some(Ok((h, ops, errors, first))) = set.join_next().await {
        let _ = m.hist.add(h);
        m.ops += ops;
        m.errors += errors;
        if m.first_error.is_none() {
            m.first_error = first;
        }
    }
    m.elapsed = start.elapsed();
    m
}

/// Open loop: operations start at a fixed `rate` per second regardless of answers; latency is
/// measured from each operation's scheduled start (no coordinated omission).
pub async fn open_loop<F, Fut>(rate: u64, duration: Duration, op: F) -> Measured
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let total = (duration.as_secs_f64() * rate as f64) as u64;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let op = op.clone();
        set.spawn(async move {
            let r = op(i).await;
            (due.elapsed(), r)
        });
    }
    let mut m = Measured {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    while let Some(Ok((lat, r))) = set.join_next().await {
        match r {
            Ok(()) => {
                let _ = m.hist.record(lat.as_micros().max(1) as u64);
                m.ops += 1;
            }
            Err(e) => {
                m.errors += 1;
                m.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    m.elapsed = start.elapsed();
    m
}

/// A bare hop of the floor: answers `Gateway.FetchSecurityInformation` with a fixed message of
/// the size a real answer has, or forwards the request to the next hop. No cache, no checks.
#[derive(Clone)]
pub struct FloorHop {
    next: Option<GatewayClient<Channel>>,
    answer: pb::InvokerSecurityInformation,
}

/// What a floor hop answers to every RPC but the one it measures.
fn not_a_floor_rpc() -> Status {
    error_status(
        Code::Unimplemented,
        ErrorReason::NotImplemented,
        "floor hop",
    )
}

#[tonic::async_trait]
impl Gateway for FloorHop {
    async fn fetch_security_information(
        &self,
        request: Request<pb::SecurityInformationQuery>,
    ) -> Result<Response<pb::InvokerSecurityInformation>, Status> {
        match &self.next {
            Some(next) => {
                next.clone()
                    .fetch_security_information(request.into_inner())
                    .await
            }
            None => Ok(Response::new(self.answer.clone())),
        }
    }
    async fn publish_revocation(
        &self,
        _: Request<pb::RevocationNotice>,
    ) -> Result<Response<pb::RevocationAck>, Status> {
        Err(not_a_floor_rpc())
    }
    async fn evict_partner_invoker(
        &self,
        _: Request<pb::RevocationNotice>,
    ) -> Result<Response<pb::RevocationAck>, Status> {
        Err(not_a_floor_rpc())
    }
    async fn fetch_token_key_set(
        &self,
        _: Request<pb::TokenKeySetRequest>,
    ) -> Result<Response<pb::TokenKeySet>, Status> {
        Err(not_a_floor_rpc())
    }
}

/// Serves one floor hop until killed (`capif bench-floor`); prints a ready line.
pub async fn serve_floor(
    ca: &Path,
    cert: &Path,
    key: &Path,
    listen: &str,
    next: Option<&str>,
) -> Result<()> {
    let (ca, cert, key) = (
        std::fs::read_to_string(ca)?,
        std::fs::read_to_string(cert)?,
        std::fs::read_to_string(key)?,
    );
    let next = match next {
        Some(addr) => Some(GatewayClient::new(connect_lazy(
            addr,
            "localhost",
            // Every hop of a chain serves the same certificate: the next one must name it.
            client_config(&ca, Some((&cert, &key)), own_identity(&cert)?)?,
            Duration::from_secs(2),
        )?)),
        None => None,
    };
    let routes = tonic::service::Routes::new(pb::gateway_server::GatewayServer::new(FloorHop {
        next,
        answer: capif_proto::example_security_information(),
    }));
    let chain = format!("{cert}{ca}");
    serve_bare("bench-floor", listen, (&chain, &key, &ca), routes).await
}

/// Binds `listen`, prints `<name> ready addr=...` (what the bench waits for) and serves
/// `routes` over mutual TLS until killed: the bench's bare servers (floor hops, partner
/// answerers) on the same accept loop and limits as the products.
pub(crate) async fn serve_bare(
    name: &'static str,
    listen: &str,
    (chain_pem, key_pem, client_ca_pem): (&str, &str, &str),
    routes: tonic::service::Routes,
) -> Result<()> {
    let roots = ccf_core::tls::certs_from_pem("client CA", client_ca_pem)?;
    let tls = server_config(chain_pem, key_pem, ClientAuth::Required(&roots))?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{name} ready addr={}", listener.local_addr()?);
    ccf_core::grpc::spawn_server(
        listener,
        tls,
        false,
        routes,
        ccf_core::limits::ConnGate::new(name, Default::default()),
        std::future::pending(),
    )
    .await?
    .map_err(|e| anyhow!("{name}: {e}"))
}

/// A chain of `n` floor hops (processes); returns the first hop's address and the children.
async fn floor_chain(
    bin: &Path,
    dir: &Path,
    tls: &TlsFiles,
    n: usize,
) -> Result<(String, Vec<Child>)> {
    let mut children = Vec::new();
    let mut next: Option<String> = None;
    for i in (0..n).rev() {
        let mut args: Vec<String> = vec![
            "bench-floor".into(),
            "--ca".into(),
            tls.ca.display().to_string(),
            "--cert".into(),
            tls.server_cert.display().to_string(),
            "--key".into(),
            tls.server_key.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(n) = &next {
            args.extend(["--next".into(), n.clone()]);
        }
        let (child, line) =
            spawn_ready(bin, &args, &dir.join(format!("logs/floor-{n}-{i}.log"))).await?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .ok_or_else(|| anyhow!("floor hop printed no address: {line}"))?
            .to_string();
        children.push(child);
        next = Some(addr);
    }
    Ok((next.unwrap_or_default(), children))
}

struct TlsFiles {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// A client credential of domain A with `role`.
fn credential(tb: &Testbed, domain: &str, role: Role) -> Result<(String, String, String)> {
    let d = &tb.domains[domain];
    let ca = DomainCa::load_or_generate(&CcfId::new(domain)?, &d.dir.join("ccf"), None, None)?;
    let c = ca.issue_with_new_key(&PeerIdentity::new(CcfId::new(domain)?, role), &[], 1)?;
    Ok((ca.cert_pem().to_string(), c.cert_pem, c.key_pem.to_string()))
}

/// The identity a PEM certificate names, as a client's expectation.
fn own_identity(cert_pem: &str) -> Result<ExpectedPeer> {
    let der = ccf_core::tls::certs_from_pem("certificate", cert_pem)?;
    Ok(ExpectedPeer::Exactly(PeerIdentity::from_certificate(
        &der[0],
    )?))
}

async fn channel(
    addr: &str,
    cred: &(String, String, String),
    expected: ExpectedPeer,
) -> Result<Channel> {
    let cfg = client_config(&cred.0, Some((&cred.1, &cred.2)), expected)?;
    Ok(connect(addr, "localhost", cfg, Duration::from_secs(5))
        .await?
        .0)
}

fn query(invoker: &str) -> pb::SecurityInformationQuery {
    pb::SecurityInformationQuery {
        api_invoker_id: invoker.into(),
        home_ccf_id: "operator-b.test".into(),
        aef_id: "aef-weather".into(),
        presented_key_id: String::new(),
        security_method: 0,
    }
}

const SCENARIO: &str = r#"
name = "bench"
[[domain]]
id = "operator-a.test"
# Case (b) measures the miss path itself: thousands of misses a second, far above the default
# budget of fetches to a partner, which is a defence, not a cost.
gateway_fetch_rate_per_sec = 1000000
gateway_fetch_burst = 1000000
[[domain.aef]]
id = "aef-weather"
apis = ["weather-v1", "forecast-v1"]
[[domain]]
id = "operator-b.test"
[[invoker]]
name = "bench"
home = "operator-b.test"
count = COUNT
"#;

/// Runs every case; returns the report text.
pub async fn run(
    opts: &BenchOpts,
    run_dir: &Path,
    bin_dir: &Path,
    capif_bin: &Path,
) -> Result<String> {
    let mut out = String::new();
    let mut say = |s: String| {
        eprintln!("{s}");
        out.push_str(&s);
        out.push('\n');
    };
    if opts.only_i {
        say(machine_line());
        say(format!("settings: {opts:?}"));
        let rows = replicas::case_i(opts, run_dir, bin_dir, &mut say).await?;
        fail_on_errors(rows.iter().flat_map(|r| [&r.miss, &r.hit]))?;
        return Ok(out);
    }
    let keys = opts.unique_keys + opts.flows + 2;
    let s = Scenario::parse(
        &SCENARIO.replace("COUNT", &keys.to_string()),
        "bench scenario",
    )?;
    let mut tb = Testbed::up(&s, run_dir, bin_dir, true).await?;
    let result = cases(opts, &mut tb, run_dir, capif_bin, &mut say).await;
    tb.down().await;
    result?;
    // On its own testbeds, once the main one is down: the cores are the run's only resource.
    let rows = replicas::case_i(opts, run_dir, bin_dir, &mut say).await?;
    fail_on_errors(rows.iter().flat_map(|r| [&r.miss, &r.hit]))?;
    Ok(out)
}

/// Fails the run when a measurement had errors (after its report was printed).
fn fail_on_errors<'a>(all: impl IntoIterator<Item = &'a Measured>) -> Result<()> {
    for m in all {
        if m.errors > 0 {
            bail!(
                "a case had errors: {}",
                m.first_error.clone().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Cases (a) to (f) in order on the running testbed; an error in a latency case or in (d)
/// fails the run after the report is complete.
async fn cases(
    opts: &BenchOpts,
    tb: &mut Testbed,
    run_dir: &Path,
    capif_bin: &Path,
    say: &mut impl FnMut(String),
) -> Result<()> {
    let a = tb.domains["operator-a.test"].clone();
    let b = tb.domains["operator-b.test"].clone();
    say(machine_line());
    say(format!("settings: {opts:?}"));
    let (names, ids) =
        onboard_invokers(opts.unique_keys + opts.flows + 2, &b, run_dir, say).await?;
    let targets = Targets::up(tb, &a, run_dir, capif_bin).await?;

    let ids = Arc::new(ids);
    let (misses_ids, rest) = ids.split_at(opts.unique_keys);
    let (flow_ids, hot) = rest.split_at(opts.flows);
    let misses_ids = Arc::new(misses_ids.to_vec());
    let hot = Arc::new(vec![hot[0].clone()]);
    let storm_id = rest.last().cloned().unwrap_or_default();

    let (floor_a, subj_a) = case_a(opts, &targets, &hot, say).await?;
    let (floor_b, subj_b) = case_b(opts, &targets, &misses_ids, say).await;
    let (floor_c, subj_c) = case_c(opts, tb, &a, &targets, &hot, say).await?;
    let d = case_d(opts, tb, &a, run_dir, &names, flow_ids, say).await?;
    case_e(opts, tb, &a, &targets, storm_id, say).await?;
    case_f(opts, capif_bin, say).await?;
    let g = case_g(
        opts,
        tb,
        &a,
        &targets,
        run_dir,
        capif_bin,
        &misses_ids,
        [&subj_a, &subj_b],
        say,
    )
    .await?;
    let ccf_cred = credential(tb, &a.id, Role::Ccf)?;
    let bin_dir = tb.bin_dir.clone();
    let h = growth::case_h(opts, &a, &ccf_cred, run_dir, capif_bin, &bin_dir, say).await?;
    cdf_plots(
        opts,
        run_dir,
        [(&floor_a, &subj_a), (&floor_b, &subj_b)],
        g.as_ref(),
        say,
    )?;
    let mut all = vec![&floor_a, &subj_a, &floor_b, &subj_b, &floor_c, &subj_c, &d];
    all.extend(g.as_ref());
    all.extend(h.iter().flat_map(|r| [&r.miss, &r.hit]));
    fail_on_errors(all)
}

/// One curve of a CDF plot: its legend and its measurement.
type Curve<'a> = (&'a str, &'a Measured);

/// The latency CDF plots of (a) and (b), floor against gateway, into the run directory and
/// `opts.plots`.
fn cdf_plots(
    opts: &BenchOpts,
    run_dir: &Path,
    [(floor_a, subj_a), (floor_b, subj_b)]: [(&Measured, &Measured); 2],
    nginx: Option<&Measured>,
    say: &mut impl FnMut(String),
) -> Result<()> {
    let mut dirs = vec![run_dir];
    dirs.extend(opts.plots.as_deref());
    say(String::new());
    let charts: [(&str, &str, Vec<Curve<'_>>); 2] = [
        (
            "cdf-a.svg",
            "(a) cache hit: gateway-A vs 1 bare hop (closed loop, median repetition)",
            vec![
                ("floor: 1 bare hop", floor_a),
                ("gateway-A, cache hit", subj_a),
            ],
        ),
        (
            "cdf-b.svg",
            "(b) cross-domain miss: gateway-A -> gateway-B -> CCF-B vs 3 bare hops",
            [("floor: 3 bare hops", floor_b), ("gateway-A miss", subj_b)]
                .into_iter()
                .chain(nginx.map(|n| ("(g) nginx A -> nginx B -> answerer", n)))
                .collect(),
        ),
    ];
    for (file, title, curves) in charts {
        let series: Vec<plot::Series<'_>> = curves
            .iter()
            .map(|(name, m)| plot::Series {
                name,
                hist: &m.hist,
            })
            .collect();
        let svg = plot::render_cdf(title, &series)?;
        for path in plot::write_svg(&svg, file, &dirs)? {
            say(format!("latency CDF plot written to {path}"));
        }
    }
    Ok(())
}

/// The first line of the report: cores and CPU model, without which no number means much.
fn machine_line() -> String {
    format!(
        "machine: {} cores; {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    )
}

/// Invokers of B with a key for A's AEF: onboards the first `count` bench invokers (32 at a
/// time) and has each obtain a security method for aef-weather. Returns the member names and
/// the apiInvokerIds.
async fn onboard_invokers(
    count: usize,
    b: &DomainPlan,
    run_dir: &Path,
    say: &mut impl FnMut(String),
) -> Result<(Vec<String>, Vec<String>)> {
    let setup = Instant::now();
    let names: Vec<String> = (1..=count).map(|i| format!("bench-{i}")).collect();
    let profiles = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for n in &names {
        let (dir, cred) = (run_dir.join("invokers").join(n), b.credentials[n].clone());
        let (on, cap, ca) = (
            format!("127.0.0.1:{}", b.onboarding_port),
            format!("127.0.0.1:{}", b.capif_port),
            std::fs::read_to_string(b.ca_pem())?,
        );
        let (profiles, sem) = (profiles.clone(), sem.clone());
        set.spawn(async move {
            let _p = sem.acquire().await;
            let p = invoker::onboard(&on, &cap, &ca, "localhost", &cred, &dir).await?;
            invoker::security(&p, "aef-weather", None).await?;
            profiles.lock().await.push(p.id().to_string());
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let ids: Vec<String> = profiles.lock().await.clone();
    say(format!(
        "setup: {} invokers of operator-b onboarded with a key for aef-weather in {:.1} s",
        ids.len(),
        setup.elapsed().as_secs_f64()
    ));
    Ok((names, ids))
}

/// What the latency cases measure against: gateway-A's CAPIF-6 listener (as CCF-A) and the
/// first hops of floor chains of 1, 2 and 3 bare hops. The floor processes live as long as
/// this does.
struct Targets {
    a_id: CcfId,
    gw_a: Channel,
    floor1: Channel,
    floor2: Channel,
    floor3: Channel,
    _floor_hops: [Vec<Child>; 3],
}

impl Targets {
    async fn up(tb: &Testbed, a: &DomainPlan, run_dir: &Path, capif_bin: &Path) -> Result<Self> {
        let a_id = CcfId::new("operator-a.test")?;
        let ccf_cred = credential(tb, "operator-a.test", Role::Ccf)?;
        let gw_a = channel(
            &format!("127.0.0.1:{}", a.gw6_port),
            &ccf_cred,
            ExpectedPeer::gateway(&a_id),
        )
        .await?;
        let tls = TlsFiles {
            ca: a.ca_pem(),
            server_cert: a.dir.join("gateway.pem"),
            server_key: a.dir.join("gateway.key"),
        };
        let (f1, c1) = floor_chain(capif_bin, run_dir, &tls, 1).await?;
        let (f2, c2) = floor_chain(capif_bin, run_dir, &tls, 2).await?;
        let (f3, c3) = floor_chain(capif_bin, run_dir, &tls, 3).await?;
        // The floor hops serve A's gateway certificate.
        let floor1 = channel(&f1, &ccf_cred, ExpectedPeer::gateway(&a_id)).await?;
        let floor2 = channel(&f2, &ccf_cred, ExpectedPeer::gateway(&a_id)).await?;
        let floor3 = channel(&f3, &ccf_cred, ExpectedPeer::gateway(&a_id)).await?;
        Ok(Self {
            a_id,
            gw_a,
            floor1,
            floor2,
            floor3,
            _floor_hops: [c1, c2, c3],
        })
    }
}

/// An operation for [`closed_loop`] and [`open_loop`], as a name: a function cannot return
/// `impl Fn(u64) -> impl Future`, but it can return `impl Op`.
trait Op: Fn(u64) -> <Self as Op>::Fut + Clone + Send + Sync + 'static {
    /// The future of one operation.
    type Fut: Future<Output = Result<()>> + Send + 'static;
}

impl<F, Fut> Op for F
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    type Fut = Fut;
}

/// One CAPIF-6 lookup per operation over `ch`, cycling through `ids`.
fn fetch(ch: Channel, ids: Arc<Vec<String>>) -> impl Op {
    move |i: u64| {
        let mut c = GatewayClient::new(ch.clone());
        let id = ids[i as usize % ids.len()].clone();
        async move {
            c.fetch_security_information(query(&id))
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{e}"))
        }
    }
}

/// Closed-loop warm-up before a latency case.
const WARM_UP: Duration = Duration::from_millis(300);

/// Repetitions of the closed-loop part of case (a): the hit path is the noisiest case, so the
/// report shows every repetition and judges the median.
pub const A_REPETITIONS: usize = 3;

/// The median of a few values (the middle one; the upper middle for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// (a) cache hit at gateway-A vs one bare hop: [`A_REPETITIONS`] closed-loop repetitions (floor
/// then subject each time), then open loop at half the floor's closed-loop throughput. Returns
/// the floor and subject of the median repetition (by p50 ratio).
async fn case_a(
    opts: &BenchOpts,
    t: &Targets,
    hot: &Arc<Vec<String>>,
    say: &mut impl FnMut(String),
) -> Result<(Measured, Measured)> {
    GatewayClient::new(t.gw_a.clone())
        .fetch_security_information(query(&hot[0]))
        .await
        .context("warming the cache")?;
    closed_loop(
        opts.concurrency,
        WARM_UP,
        None,
        fetch(t.floor1.clone(), hot.clone()),
    )
    .await;
    closed_loop(
        opts.concurrency,
        WARM_UP,
        None,
        fetch(t.gw_a.clone(), hot.clone()),
    )
    .await;
    say(String::new());
    say(format!(
        "(a) cache-hit lookup at gateway-A (CAPIF-6), closed loop, {A_REPETITIONS} repetitions"
    ));
    let mut reps = Vec::new();
    for r in 1..=A_REPETITIONS {
        let floor = closed_loop(
            opts.concurrency,
            opts.duration,
            None,
            fetch(t.floor1.clone(), hot.clone()),
        )
        .await;
        let subj = closed_loop(
            opts.concurrency,
            opts.duration,
            None,
            fetch(t.gw_a.clone(), hot.clone()),
        )
        .await;
        say(format!("  repetition {r}:"));
        say(floor.line("  floor: 1 bare hop"));
        say(subj.line("  gateway-A, cache hit"));
        say(ratio_line("a", &subj, &floor, 1.2, 0.85));
        reps.push((floor, subj));
    }
    let p50s: Vec<f64> = reps.iter().map(|(f, s)| s.q(0.5) / f.q(0.5)).collect();
    let tputs: Vec<f64> = reps
        .iter()
        .map(|(f, s)| s.throughput() / f.throughput())
        .collect();
    let (p50, tput) = (median(&p50s), median(&tputs));
    let all = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    say(format!(
        "    ratio (a, median of {A_REPETITIONS}): p50 {p50:.2}x [{}] (target <= 1.2: {}), throughput {tput:.2}x [{}] (target >= 0.85: {})",
        all(&p50s),
        met(p50 <= 1.2),
        all(&tputs),
        met(tput >= 0.85)
    ));
    // A repetition with errors is the one returned, so the run fails on it after the report.
    let mid = reps
        .iter()
        .position(|(f, s)| f.errors + s.errors > 0)
        .or_else(|| p50s.iter().position(|x| *x == p50))
        .unwrap_or(0);
    let (floor_a, subj_a) = reps.swap_remove(mid);
    let rate = (floor_a.throughput() * 0.5).max(10.0) as u64;
    let open_floor = open_loop(rate, opts.duration, fetch(t.floor1.clone(), hot.clone())).await;
    let open_subj = open_loop(rate, opts.duration, fetch(t.gw_a.clone(), hot.clone())).await;
    say(format!(
        "    open loop at {rate} ops/s (half the floor's closed-loop throughput):"
    ));
    say(open_floor.line("  floor: 1 bare hop"));
    say(open_subj.line("  gateway-A, cache hit"));
    say(format!(
        "    open-loop p50 ratio {:.2}",
        open_subj.q(0.5) / open_floor.q(0.5)
    ));
    Ok((floor_a, subj_a))
}

/// (g) what operators would deploy instead: nginx A -> nginx B -> a bare answerer, mutual TLS
/// on every hop with the floor's certificates, the same requests as (b). Our miss path (b) and
/// hit path (a) are reported against it. `None` when nginx cannot be had (one line says why).
#[allow(clippy::too_many_arguments)]
async fn case_g(
    opts: &BenchOpts,
    tb: &Testbed,
    a: &DomainPlan,
    t: &Targets,
    run_dir: &Path,
    capif_bin: &Path,
    misses_ids: &Arc<Vec<String>>,
    [subj_a, subj_b]: [&Measured; 2],
    say: &mut impl FnMut(String),
) -> Result<Option<Measured>> {
    say(String::new());
    let bin = match nginx::find_nginx(opts.install_nginx).await {
        Ok(b) => b,
        Err(e) => {
            say(format!("(g) nginx gRPC proxy chain: skipped: {e:#}"));
            return Ok(None);
        }
    };
    let tls_files = TlsFiles {
        ca: a.ca_pem(),
        server_cert: a.dir.join("gateway.pem"),
        server_key: a.dir.join("gateway.key"),
    };
    let (answerer, _answerer_hop) = floor_chain(capif_bin, run_dir, &tls_files, 1).await?;
    let tls = nginx::ProxyTls {
        ca: &tls_files.ca,
        cert: &tls_files.server_cert,
        key: &tls_files.server_key,
    };
    let [mut ng_a, mut ng_b] = match nginx::chain(&bin, run_dir, &answerer, &tls).await {
        Ok(c) => c,
        Err(e) => {
            say(format!("(g) nginx gRPC proxy chain: skipped: {e:#}"));
            return Ok(None);
        }
    };
    let measured = async {
        let ccf_cred = credential(tb, &a.id, Role::Ccf)?;
        let ch = channel(&ng_a.addr, &ccf_cred, ExpectedPeer::gateway(&t.a_id)).await?;
        closed_loop(
            opts.concurrency,
            WARM_UP,
            None,
            fetch(ch.clone(), misses_ids.clone()),
        )
        .await;
        anyhow::Ok(
            closed_loop(
                opts.concurrency,
                Duration::from_secs(3600),
                Some(misses_ids.len() as u64),
                fetch(ch, misses_ids.clone()),
            )
            .await,
        )
    }
    .await;
    let pids = format!(
        "nginx masters pid {} (A), {} (B)",
        ng_a.pid().unwrap_or(0),
        ng_b.pid().unwrap_or(0)
    );
    ng_a.stop().await;
    ng_b.stop().await;
    let g = measured?;
    say(format!(
        "(g) what operators would deploy instead: nginx A -> nginx B -> bare answerer, mutual TLS on every hop ({}; {pids})",
        bin.display()
    ));
    say(g.line("  nginx chain (3 servers)"));
    let vs = |name: &str, subj: &Measured| {
        format!(
            "    {name} vs nginx chain: p50 {:.2}x, p90 {:.2}x, throughput {:.2}x",
            subj.q(0.5) / g.q(0.5),
            subj.q(0.9) / g.q(0.9),
            subj.throughput() / g.throughput()
        )
    };
    say(vs("our miss path (b)", subj_b));
    say(vs("our hit path (a)", subj_a));
    Ok(Some(g))
}

/// "met" or "NOT met", as every verdict of the report reads.
fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// (b) misses with unique keys: client -> gw-A -> gw-B -> CCF-B vs 3 bare hops, each key once.
async fn case_b(
    opts: &BenchOpts,
    t: &Targets,
    misses_ids: &Arc<Vec<String>>,
    say: &mut impl FnMut(String),
) -> (Measured, Measured) {
    let n = misses_ids.len() as u64;
    let floor_b = closed_loop(
        opts.concurrency,
        Duration::from_secs(3600),
        Some(n),
        fetch(t.floor3.clone(), misses_ids.clone()),
    )
    .await;
    let subj_b = closed_loop(
        opts.concurrency,
        Duration::from_secs(3600),
        Some(n),
        fetch(t.gw_a.clone(), misses_ids.clone()),
    )
    .await;
    say(String::new());
    say(format!(
        "(b) cross-domain miss, {n} unique keys: gateway-A -> gateway-B -> CCF-B"
    ));
    say(floor_b.line("  floor: chain of 3 bare hops"));
    say(subj_b.line("  gateway-A miss"));
    say(ratio_line("b", &subj_b, &floor_b, 1.2, 0.0));
    (floor_b, subj_b)
}

/// (c) AEF -> CCF-A -> gateway-A (hit) vs 2 bare hops.
async fn case_c(
    opts: &BenchOpts,
    tb: &Testbed,
    a: &DomainPlan,
    t: &Targets,
    hot: &Arc<Vec<String>>,
    say: &mut impl FnMut(String),
) -> Result<(Measured, Measured)> {
    let aef_cred = credential(tb, "operator-a.test", Role::Aef(AefId::new("aef-weather")?))?;
    let ccf_a = channel(
        &format!("127.0.0.1:{}", a.capif_port),
        &aef_cred,
        ExpectedPeer::ccf(&t.a_id),
    )
    .await?;
    let aef_op = {
        let ch = ccf_a.clone();
        let id = hot[0].clone();
        move |_i: u64| {
            let mut c = SecurityClient::new(ch.clone());
            let id = id.clone();
            async move {
                c.get_security_information(pb::GetSecurityInformationRequest {
                    api_invoker_id: id,
                    aef_id: "aef-weather".into(),
                    home_ccf_id: "operator-b.test".into(),
                    authentication_info: true,
                    authorization_info: true,
                    presented_key_id: String::new(),
                    security_method: 0,
                })
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{e}"))
            }
        }
    };
    closed_loop(opts.concurrency, WARM_UP, None, aef_op.clone()).await;
    closed_loop(
        opts.concurrency,
        WARM_UP,
        None,
        fetch(t.floor2.clone(), hot.clone()),
    )
    .await;
    let floor_c = closed_loop(
        opts.concurrency,
        opts.duration,
        None,
        fetch(t.floor2.clone(), hot.clone()),
    )
    .await;
    let subj_c = closed_loop(opts.concurrency, opts.duration, None, aef_op).await;
    say(String::new());
    say("(c) AEF-level request: AEF -> CCF-A -> gateway-A (cache hit)".into());
    say(floor_c.line("  floor: chain of 2 bare hops"));
    say(subj_c.line("  AEF -> CCF-A -> gateway-A"));
    say(ratio_line("c", &subj_c, &floor_c, 1.2, 0.0));
    Ok((floor_c, subj_c))
}

/// (d) full invoker flows per second: the invokers of `flow_ids`, each flow CAPIF-1e security,
/// Authentication Initiation at A's AEF, TLS-PSK handshake and one API call.
async fn case_d(
    opts: &BenchOpts,
    tb: &Testbed,
    a: &DomainPlan,
    run_dir: &Path,
    names: &[String],
    flow_ids: &[String],
    say: &mut impl FnMut(String),
) -> Result<Measured> {
    let aef_plan = tb.aefs["aef-weather"].clone();
    // Each profile is read once: a search per flow would read thousands of profiles per flow.
    let by_id: HashMap<String, PathBuf> = names
        .iter()
        .map(|n| run_dir.join("invokers").join(n))
        .filter_map(|d| Profile::load(&d).ok().map(|p| (p.id().to_string(), d)))
        .collect();
    // Loaded before the run, as an invoker holds its profile: reading and parsing it per flow
    // would put the load generator's file work on the cores the flows share.
    let flow_profiles: Arc<Vec<Profile>> = Arc::new(
        flow_ids
            .iter()
            .filter_map(|id| by_id.get(id).and_then(|d| Profile::load(d).ok()))
            .collect(),
    );
    if flow_profiles.is_empty() {
        bail!("(d): none of the flow invokers' profiles could be loaded");
    }
    let aef_ca = std::fs::read_to_string(a.ca_pem())?;
    let flow = {
        let (profiles, aef_ca) = (flow_profiles.clone(), aef_ca.clone());
        let addr = format!("127.0.0.1:{}", aef_plan.security_port);
        move |i: u64| {
            let (profiles, aef_ca, addr) = (profiles.clone(), aef_ca.clone(), addr.clone());
            async move {
                let p = &profiles[i as usize % profiles.len()];
                let k = invoker::security(p, "aef-weather", None).await?;
                let r = invoker::auth(
                    p,
                    Some(&k),
                    &addr,
                    &aef_ca,
                    "localhost",
                    &invoker::expected_aef("operator-a.test", "aef-weather")?,
                )
                .await?;
                invoker::call(
                    p,
                    &k,
                    &r.tls_endpoint,
                    "weather-v1",
                    capif_2e::psk::TlsProfile::Tls13,
                )
                .await?;
                Ok(())
            }
        }
    };
    let d = closed_loop(
        opts.concurrency.min(16),
        Duration::from_secs(3600),
        Some(opts.flows as u64),
        flow,
    )
    .await;
    say(String::new());
    say("(d) full invoker flow (CAPIF-1e security + auth init at AEF-A + TLS-PSK handshake + API call), cross-domain".into());
    say(d.line("  invoker of B at A's AEF"));
    say(format!("    {:.0} flows per second", d.throughput()));
    Ok(d)
}

/// (e) coalescing storm: `opts.storm` concurrent misses for one key; gateway-A's counters
/// before and after tell how many went upstream.
async fn case_e(
    opts: &BenchOpts,
    tb: &Testbed,
    a: &DomainPlan,
    t: &Targets,
    storm_id: String,
    say: &mut impl FnMut(String),
) -> Result<()> {
    let admin_cred = credential(tb, "operator-a.test", Role::Operator)?;
    let admin = channel(
        &format!("127.0.0.1:{}", a.gw6_port),
        &admin_cred,
        ExpectedPeer::gateway(&t.a_id),
    )
    .await?;
    let before = GatewayAdminClient::new(admin.clone())
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    let storm_ids = Arc::new(vec![storm_id]);
    let e = closed_loop(
        opts.storm,
        Duration::from_secs(3600),
        Some(opts.storm as u64),
        fetch(t.gw_a.clone(), storm_ids),
    )
    .await;
    let after = GatewayAdminClient::new(admin)
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    let upstream = after.cache_misses - before.cache_misses;
    say(String::new());
    say(format!(
        "(e) coalescing storm: {} concurrent misses for one key",
        opts.storm
    ));
    say(e.line("  gateway-A"));
    say(format!(
        "    upstream calls: {upstream} (coalesced {}, hits {}); target exactly 1: {}",
        after.coalesced - before.coalesced,
        after.cache_hits - before.cache_hits,
        if upstream == 1 { "met" } else { "NOT met" }
    ));
    if e.errors > 0 {
        say(format!(
            "    errors: {} (first: {})",
            e.errors,
            e.first_error.clone().unwrap_or_default()
        ));
    }
    Ok(())
}

/// (f) memory per cached entry, each count in a fresh `capif-gateway-cache-memory` process (the
/// gateway's own measurement of its cache): RSS of this one is already grown by the other cases.
async fn case_f(opts: &BenchOpts, capif_bin: &Path, say: &mut impl FnMut(String)) -> Result<()> {
    say(String::new());
    say("(f) memory per cached entry (gateway cache in a fresh process, RSS delta)".into());
    let bin = capif_bin.with_file_name("capif-gateway-cache-memory");
    // Each count twice: the gateway's cache, then moka alone with the same policy (the floor
    // under any moka-based cache: what is above it is ours).
    let runs = opts
        .mem_entries
        .iter()
        .flat_map(|n| [(n.to_string(), false), (n.to_string(), true)]);
    for (n, floor) in runs {
        let mut args = vec!["--entries", n.as_str()];
        if floor {
            args.push("--moka-floor");
        }
        let out = tokio::process::Command::new(&bin)
            .args(&args)
            .output()
            .await
            .map_err(|e| anyhow!("cannot run {}: {e}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "capif-gateway-cache-memory: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        say(String::from_utf8_lossy(&out.stdout).trim_end().to_string());
    }
    Ok(())
}

fn ratio_line(
    case: &str,
    subj: &Measured,
    floor: &Measured,
    p50_target: f64,
    tput_target: f64,
) -> String {
    let p50 = subj.q(0.5) / floor.q(0.5);
    let p90 = subj.q(0.9) / floor.q(0.9);
    let tput = subj.throughput() / floor.throughput();
    let mut s = format!(
        "    ratio ({case}): p50 {p50:.2}x (target <= {p50_target}: {}), p90 {p90:.2}x, throughput {tput:.2}x",
        if p50 <= p50_target { "met" } else { "NOT met" }
    );
    if tput_target > 0.0 {
        s += &format!(
            " (target >= {tput_target}: {})",
            if tput >= tput_target {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    s
}
