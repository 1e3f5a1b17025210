//! `capif chaos`: a testbed of three domains under the steady [`load`](crate::load) while faults
//! are injected on a seeded schedule (kill -9 and restart of a CCF, a gateway or an AEF; a
//! partner gateway stopped for some seconds; a revocation and an offboarding in the middle of
//! traffic; one domain with keys valid a few seconds, so they expire during the run). Every
//! outcome is kept with its time; afterwards [`crate::checker`] judges them against the ledger of
//! what was acknowledged, and the report gives per fault the errors while it lasted and the time
//! to recover.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use capif_proto::v1 as pb;
use ccf_core::clock::now_ms;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::checker::{self, Ledger, Violation};
use crate::load::{self, Flow, FlowKind, Load};
use crate::testbed::Testbed;

/// The kinds of fault, in the words of the report.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a CCF, start it again.
    KillCcf,
    /// SIGKILL a gateway, start it again.
    KillGateway,
    /// SIGKILL an AEF, start it again.
    KillAef,
    /// Stop a gateway (SIGTERM) for some seconds, then start it.
    PartnerStop,
    /// The home operator revokes an invoker's authorization.
    Revoke,
    /// An invoker offboards.
    Offboard,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 6] = [
        Self::KillCcf,
        Self::KillGateway,
        Self::KillAef,
        Self::PartnerStop,
        Self::Revoke,
        Self::Offboard,
    ];

    /// The report's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::KillCcf => "kill-ccf",
            Self::KillGateway => "kill-gateway",
            Self::KillAef => "kill-aef",
            Self::PartnerStop => "partner-stop",
            Self::Revoke => "revoke",
            Self::Offboard => "offboard",
        }
    }
}

/// A test-only fault the checker must see (`--break`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breakage {
    /// Every AEF acknowledges RevokeAuthorization and ignores it (aef-stub feature
    /// `test-faults`).
    IgnoreRevocations,
}

impl std::str::FromStr for Breakage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ignore-revocations" => Ok(Self::IgnoreRevocations),
            other => bail!("unknown breakage {other:?}: the one there is is ignore-revocations"),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOpts {
    /// How long the load runs.
    pub duration: Duration,
    /// Seed of the schedule and of the load.
    pub seed: u64,
    /// Smoke: every fault kind once, evenly spaced.
    pub smoke: bool,
    /// Flows at once.
    pub concurrency: usize,
    /// Invokers per domain.
    pub invokers: u32,
    /// AEFPSK validity of the last domain, seconds.
    pub short_validity_secs: u64,
    /// How long a partner gateway stays stopped, seconds.
    pub outage_secs: u64,
    /// Time between faults (full runs), seconds.
    pub fault_every_secs: u64,
    /// A flow's deadline.
    pub flow_deadline: Duration,
    /// How long after the acknowledgement a revoked or offboarded invoker may still be served.
    pub revocation_grace: Duration,
    /// Clock slack when judging a key's expiry.
    pub expiry_slack: Duration,
    /// A test-only fault to inject.
    pub breakage: Option<Breakage>,
}

impl ChaosOpts {
    /// The defaults, for a run of `duration`.
    pub fn new(duration: Duration, seed: u64) -> Self {
        Self {
            duration,
            seed,
            smoke: false,
            concurrency: 4,
            invokers: 4,
            short_validity_secs: 8,
            outage_secs: 4,
            fault_every_secs: 10,
            flow_deadline: Duration::from_secs(20),
            revocation_grace: Duration::from_secs(2),
            expiry_slack: Duration::from_secs(1),
            breakage: None,
        }
    }
}

/// One planned fault.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedFault {
    /// Seconds after the load started.
    pub at_secs: f64,
    /// Its kind.
    pub kind: FaultKind,
    /// The domain it hits (its CCF, gateway, AEF, or an invoker of it).
    pub domain: String,
}

/// The schedule: a pure function of the seed and the options, so a run can be replayed.
pub fn schedule(opts: &ChaosOpts, domains: &[String]) -> Vec<PlannedFault> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let total = opts.duration.as_secs_f64();
    // Revocations and offboardings need a domain whose keys outlive the run.
    let long: Vec<String> = domains
        .iter()
        .take(domains.len().saturating_sub(1).max(1))
        .cloned()
        .collect();
    let mut kinds: Vec<FaultKind> = Vec::new();
    let (first, last) = (total * 0.1, total * 0.78);
    let n = if opts.smoke {
        FaultKind::ALL.len()
    } else {
        (((last - first) / opts.fault_every_secs.max(1) as f64) as usize).max(FaultKind::ALL.len())
    };
    while kinds.len() < n {
        let mut round = FaultKind::ALL.to_vec();
        round.shuffle(&mut rng);
        kinds.extend(round);
    }
    kinds.truncate(n);
    let step = if n > 1 {
        (last - first) / (n - 1) as f64
    } else {
        0.0
    };
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let pool = if matches!(kind, FaultKind::Revoke | FaultKind::Offboard) {
                &long
            } else {
                domains
            };
            PlannedFault {
                at_secs: first + step * i as f64,
                kind,
                domain: pool[rng.random_range(0..pool.len())].clone(),
            }
        })
        .collect()
}

/// Invokers per domain that revocations and offboardings take out of the load, at most, on
/// top of `--invokers`: every revoked or offboarded invoker leaves the load for good, so a long
/// run needs that many more for its load to stay the same and for every such fault to find one.
pub fn victims_needed(opts: &ChaosOpts) -> u32 {
    let domains = load::domain_ids(3);
    let mut per_domain: BTreeMap<String, u32> = BTreeMap::new();
    for f in schedule(opts, &domains) {
        if matches!(f.kind, FaultKind::Revoke | FaultKind::Offboard) {
            *per_domain.entry(f.domain).or_default() += 1;
        }
    }
    per_domain.values().copied().max().unwrap_or(0)
}

/// What happened to one fault.
#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    /// Its kind.
    pub kind: FaultKind,
    /// The component or invoker it hit.
    pub target: String,
    /// The domain it hit.
    pub domain: String,
    /// When it began, seconds after the load started.
    pub at_secs: f64,
    /// How long it lasted (until the component printed its ready line again; for a revocation
    /// or an offboarding, until it was acknowledged), milliseconds.
    pub lasted_ms: u64,
    /// Flows touching the domain that failed from its start until the first success after it.
    pub errors_during: u64,
    /// From the end of the fault to the first successful flow touching the domain, ms (`None`:
    /// no success followed).
    pub recovery_ms: Option<u64>,
    /// Revocation and offboarding: from the acknowledgement to the first refused probe, ms.
    pub effect_ms: Option<u64>,
    /// What went wrong with the fault itself (a component that did not come back ...).
    pub problem: String,
    #[serde(skip)]
    start_ms: u64,
    #[serde(skip)]
    end_ms: u64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    /// No violation.
    pub passed: bool,
    /// The seed (`--seed` replays the schedule).
    pub seed: u64,
    /// The test-only fault injected, if any.
    pub breakage: Option<String>,
    /// When the load started, Unix ms (violations carry Unix ms too).
    pub started_at_ms: u64,
    /// Seconds the load ran.
    pub duration_secs: f64,
    /// Flows run (load and probes).
    pub flows: u64,
    /// Flows the AEF answered.
    pub flows_ok: u64,
    /// Flows refused or failed.
    pub flows_failed: u64,
    /// Calls with an expired key, all of which must be refused.
    pub expired_key_calls: u64,
    /// Probes of revoked or offboarded invokers.
    pub probes: u64,
    /// How many faults of each kind ran.
    pub fault_kinds: BTreeMap<String, u64>,
    /// Per fault.
    pub faults: Vec<FaultReport>,
    /// Violations by kind.
    pub violation_counts: BTreeMap<String, u64>,
    /// Every violation (at most 100 listed).
    pub violations: Vec<Violation>,
    /// Each gateway's counters at the end.
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Whether the `aef-stub` in `bin_dir` carries the test-only faults.
pub fn aef_has_test_faults(bin_dir: &Path) -> bool {
    std::process::Command::new(bin_dir.join("aef-stub"))
        .args(["--has-test-faults", "--config", "/dev/null"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Brings up the testbed in `run_dir`, runs load and faults, stops everything, checks, and
/// returns the report (also written to `run_dir/chaos.json`).
pub async fn run(opts: &ChaosOpts, run_dir: &Path, bin_dir: &Path) -> Result<ChaosReport> {
    if opts.breakage.is_some() && !aef_has_test_faults(bin_dir) {
        bail!(
            "--break needs an aef-stub built with the `test-faults` feature, and {} was not \
             (the binaries `cargo test -p capif-scenarios` builds carry it; release builds do not)",
            bin_dir.join("aef-stub").display()
        );
    }
    let s = load::scenario(
        3,
        opts.invokers + victims_needed(opts),
        Some(opts.short_validity_secs),
    )?;
    let mut tb = Testbed::up(&s, run_dir, bin_dir, false).await?;
    let r = drive(opts, &s, &mut tb).await;
    let counters = match &r {
        Ok(_) => gateway_counters(&tb).await,
        Err(_) => BTreeMap::new(),
    };
    tb.down().await;
    let mut report = r?;
    report.counters = counters;
    for (c, n) in checker::panics_in_logs(&run_dir.join("logs")) {
        report.violations.push(Violation {
            kind: "component-panicked".into(),
            at_ms: 0,
            detail: format!("{c}: {n} panic line(s) in its log"),
        });
        *report
            .violation_counts
            .entry("component-panicked".into())
            .or_default() += 1;
        report.passed = false;
    }
    std::fs::write(
        run_dir.join("chaos.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

async fn gateway_counters(tb: &Testbed) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for d in tb.domains.keys() {
        let Ok(mut admin) = tb.gateway_admin(d).await else {
            continue;
        };
        if let Ok(st) = admin.get_status(pb::GetStatusRequest {}).await {
            let st = st.into_inner();
            out.insert(
                d.clone(),
                BTreeMap::from([
                    ("cache_hits".to_string(), st.cache_hits),
                    ("cache_misses".to_string(), st.cache_misses),
                    ("revocations_received".to_string(), st.revocations_received),
                    (
                        "partner_requests_served".to_string(),
                        st.partner_requests_served,
                    ),
                    (
                        "duplicate_revocations".to_string(),
                        st.duplicate_revocations,
                    ),
                ]),
            );
        }
    }
    out
}

/// Tells every AEF to ignore revocations and restarts it.
async fn break_aefs(tb: &mut Testbed) -> Result<()> {
    let aefs: Vec<(String, String)> = tb
        .aefs
        .values()
        .map(|a| (a.id.clone(), a.domain.clone()))
        .collect();
    for (id, domain) in aefs {
        let file = tb.domains[&domain].dir.join(format!("{id}.toml"));
        let text = std::fs::read_to_string(&file)?;
        std::fs::write(&file, format!("test_ignore_revocations = true\n{text}"))?;
        let c = format!("aef:{id}");
        tb.stop(&c, false).await?;
        tb.start(&c).await?;
    }
    Ok(())
}

async fn drive(
    opts: &ChaosOpts,
    s: &crate::scenario::Scenario,
    tb: &mut Testbed,
) -> Result<ChaosReport> {
    if opts.breakage == Some(Breakage::IgnoreRevocations) {
        break_aefs(tb).await?;
    }
    let load = Arc::new(Load::new(
        tb,
        s,
        opts.concurrency,
        opts.flow_deadline,
        opts.seed,
    )?);
    load.onboard_all(tb).await?;
    let domains: Vec<String> = tb.domains.keys().cloned().collect();
    let plan = schedule(opts, &domains);
    let flows: Arc<Mutex<Vec<Flow>>> = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::unbounded_channel::<Flow>();
    let collector = {
        let flows = flows.clone();
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if let Ok(mut v) = flows.lock() {
                    v.push(f);
                }
            }
        })
    };
    let start_ms = now_ms();
    let driver = tokio::spawn(load.clone().run(opts.seed, stop_rx, tx.clone()));
    let mut ledger = Ledger::default();
    let mut faults = Vec::new();
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(0x5eed));
    for p in &plan {
        let due = start_ms + (p.at_secs * 1000.0) as u64;
        if let Some(wait) = due.checked_sub(now_ms()) {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        eprintln!(
            "chaos: {:>5.1} s  {} ({})",
            (now_ms() - start_ms) as f64 / 1000.0,
            p.kind.name(),
            p.domain
        );
        let mut f = inject(opts, tb, &load, p, &mut ledger, &tx, &mut rng).await;
        f.at_secs = f.start_ms.saturating_sub(start_ms) as f64 / 1000.0;
        faults.push(f);
    }
    let end = start_ms + opts.duration.as_millis() as u64;
    if let Some(wait) = end.checked_sub(now_ms()) {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let _ = stop_tx.send(true);
    let _ = driver.await;
    drop(tx);
    let _ = collector.await;
    let duration_secs = (now_ms() - start_ms) as f64 / 1000.0;
    let mut flows = std::mem::take(&mut *flows.lock().map_err(|_| anyhow!("flows poisoned"))?);
    flows.sort_by_key(|f| f.start_ms);
    let mut violations = checker::check(
        &flows,
        &ledger,
        opts.revocation_grace.as_millis() as u64,
        opts.expiry_slack.as_millis() as u64,
    );
    for f in &mut faults {
        summarize(f, &flows);
        if !f.problem.is_empty() {
            let kind = match f.kind {
                FaultKind::Revoke | FaultKind::Offboard => "fault-not-acknowledged",
                _ => "component-not-back",
            };
            violations.push(Violation {
                kind: kind.into(),
                at_ms: f.start_ms,
                detail: format!("{}: {}", f.target, f.problem),
            });
        }
    }
    let mut violation_counts = BTreeMap::new();
    for v in &violations {
        *violation_counts.entry(v.kind.clone()).or_default() += 1;
    }
    let mut fault_kinds = BTreeMap::new();
    for f in &faults {
        *fault_kinds.entry(f.kind.name().to_string()).or_default() += 1;
    }
    let ok = flows.iter().filter(|f| f.ok).count() as u64;
    Ok(ChaosReport {
        passed: violations.is_empty(),
        seed: opts.seed,
        breakage: opts.breakage.map(|_| "ignore-revocations".to_string()),
        started_at_ms: start_ms,
        duration_secs,
        flows: flows.len() as u64,
        flows_ok: ok,
        flows_failed: flows.len() as u64 - ok,
        expired_key_calls: flows.iter().filter(|f| f.kind == FlowKind::Expired).count() as u64,
        probes: flows.iter().filter(|f| f.kind == FlowKind::Probe).count() as u64,
        fault_kinds,
        faults,
        violation_counts,
        violations: violations.into_iter().take(100).collect(),
        counters: BTreeMap::new(),
    })
}

/// Errors while the fault lasted and the time to recover, from the flows touching its domain.
fn summarize(f: &mut FaultReport, flows: &[Flow]) {
    let touching = |x: &&Flow| x.touches(&f.domain) && x.kind != FlowKind::Probe;
    let recovered = flows
        .iter()
        .filter(touching)
        .filter(|x| x.ok && x.start_ms >= f.end_ms)
        .map(|x| x.end_ms)
        .min();
    if !matches!(f.kind, FaultKind::Revoke | FaultKind::Offboard) {
        f.recovery_ms = recovered.map(|r| r.saturating_sub(f.end_ms));
    }
    let until = recovered.unwrap_or(u64::MAX);
    f.errors_during = flows
        .iter()
        .filter(touching)
        .filter(|x| !x.ok && x.end_ms >= f.start_ms && x.end_ms <= until)
        .count() as u64;
}

/// Runs one fault and records what the checker needs in `ledger`.
async fn inject(
    opts: &ChaosOpts,
    tb: &mut Testbed,
    load: &Arc<Load>,
    p: &PlannedFault,
    ledger: &mut Ledger,
    tx: &mpsc::UnboundedSender<Flow>,
    rng: &mut StdRng,
) -> FaultReport {
    let start_ms = now_ms();
    let mut r = FaultReport {
        kind: p.kind,
        target: String::new(),
        domain: p.domain.clone(),
        at_secs: 0.0,
        lasted_ms: 0,
        errors_during: 0,
        recovery_ms: None,
        effect_ms: None,
        problem: String::new(),
        start_ms,
        end_ms: start_ms,
    };
    let component = match p.kind {
        FaultKind::KillCcf => Some(format!("ccf:{}", p.domain)),
        FaultKind::KillGateway | FaultKind::PartnerStop => Some(format!("gateway:{}", p.domain)),
        FaultKind::KillAef => tb
            .aefs
            .values()
            .find(|a| a.domain == p.domain)
            .map(|a| format!("aef:{}", a.id)),
        _ => None,
    };
    if let Some(c) = component {
        r.target = c.clone();
        let kill = p.kind != FaultKind::PartnerStop;
        if let Err(e) = tb.stop(&c, kill).await {
            r.problem = format!("could not be stopped: {e:#}");
        }
        if !kill {
            tokio::time::sleep(Duration::from_secs(opts.outage_secs)).await;
        }
        if let Err(e) = tb.start(&c).await {
            // One more try: a port still held by the dying process can delay it.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e2) = tb.start(&c).await {
                r.problem = format!("did not come back: {e:#}; again: {e2:#}");
            }
        }
        r.end_ms = now_ms();
        ledger.restarts.push((p.domain.clone(), r.end_ms));
    } else {
        invoker_fault(opts, tb, load, p, ledger, tx, rng, &mut r).await;
    }
    r.lasted_ms = r.end_ms.saturating_sub(r.start_ms);
    r
}

/// Revocation or offboarding of an invoker of `p.domain` in the middle of traffic: takes it out
/// of the load, makes sure an AEF holds a key of it, revokes or offboards, then probes its keys
/// until well past the grace.
#[allow(clippy::too_many_arguments)]
async fn invoker_fault(
    opts: &ChaosOpts,
    tb: &Testbed,
    load: &Arc<Load>,
    p: &PlannedFault,
    ledger: &mut Ledger,
    tx: &mpsc::UnboundedSender<Flow>,
    rng: &mut StdRng,
    r: &mut FaultReport,
) {
    let candidates: Vec<_> = load
        .members
        .iter()
        .filter(|m| m.home == p.domain && !load.is_excluded(&m.name))
        .cloned()
        .collect();
    let Some(m) = candidates
        .get(rng.random_range(0..candidates.len().max(1)))
        .cloned()
    else {
        r.problem = format!("no invoker of {} left to revoke", p.domain);
        return;
    };
    r.target = m.name.clone();
    load.exclude(&m.name);
    let _held = m.lock.lock().await;
    // An AEF must hold a key of the invoker when it is revoked, or the check proves nothing.
    let mut live: Vec<load::AefInfo> = load
        .stored_keys(&m)
        .into_iter()
        .filter(|(_, exp)| *exp > now_ms() + 10_000)
        .map(|(a, _)| a)
        .collect();
    if live.is_empty() {
        let a = load.aefs[rng.random_range(0..load.aefs.len())].clone();
        let f = load
            .flow(&m, &a, pb::SecurityMethod::Psk, FlowKind::Fresh)
            .await;
        let _ = tx.send(f);
        live.push(a);
    } else {
        for a in &live {
            let f = load
                .flow(&m, a, pb::SecurityMethod::Psk, FlowKind::Reuse)
                .await;
            let _ = tx.send(f);
        }
    }
    let acted = if p.kind == FaultKind::Revoke {
        load::revoke(tb, &m).await
    } else {
        load::offboard(&m).await
    };
    let ack = now_ms();
    r.end_ms = ack;
    if let Err(e) = acted {
        r.problem = format!("{} was not acknowledged: {e:#}", p.kind.name());
        return;
    }
    if p.kind == FaultKind::Revoke {
        ledger.revoked.insert(m.name.clone(), ack);
    } else {
        ledger.offboarded.insert(m.name.clone(), ack);
    }
    // Probe until the grace plus a margin has passed: refusals are expected from some point.
    let until = ack + opts.revocation_grace.as_millis() as u64 + 3000;
    while now_ms() < until {
        for a in &live {
            let f = load
                .flow(&m, a, pb::SecurityMethod::Psk, FlowKind::Probe)
                .await;
            if !f.ok && r.effect_ms.is_none() {
                r.effect_ms = Some(f.end_ms.saturating_sub(ack));
            }
            let _ = tx.send(f);
        }
        if p.kind == FaultKind::Offboard {
            let a = &live[0];
            let f = load
                .flow(&m, a, pb::SecurityMethod::Psk, FlowKind::Fresh)
                .await;
            let _ = tx.send(f);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

/// The report as a table for a terminal.
pub fn table(r: &ChaosReport) -> String {
    let mut out = format!(
        "\nchaos: seed {} ({}), {:.0} s; {} flows, {} ok, {} failed; {} expired-key calls, {} probes\n",
        r.seed,
        r.breakage
            .as_deref()
            .map(|b| format!("broken: {b}"))
            .unwrap_or_else(|| "no breakage".into()),
        r.duration_secs,
        r.flows,
        r.flows_ok,
        r.flows_failed,
        r.expired_key_calls,
        r.probes
    );
    out += &format!(
        "{:>7}  {:<13} {:<26} {:>9} {:>7} {:>11} {:>9}  {}\n",
        "at s", "fault", "target", "lasted ms", "errors", "recovery ms", "effect ms", ""
    );
    for f in &r.faults {
        out += &format!(
            "{:>7.1}  {:<13} {:<26} {:>9} {:>7} {:>11} {:>9}  {}\n",
            f.at_secs,
            f.kind.name(),
            f.target,
            f.lasted_ms,
            f.errors_during,
            f.recovery_ms.map(|x| x.to_string()).unwrap_or("-".into()),
            f.effect_ms.map(|x| x.to_string()).unwrap_or("-".into()),
            f.problem
        );
    }
    if r.violations.is_empty() {
        out += "violations: none\n";
    } else {
        out += "violations:\n";
        for (k, n) in &r.violation_counts {
            out += &format!("  {k}: {n}\n");
        }
        for v in r.violations.iter().take(10) {
            out += &format!(
                "  - {} at {:.1} s: {}\n",
                v.kind,
                v.at_ms.saturating_sub(r.started_at_ms) as f64 / 1000.0,
                v.detail
            );
        }
    }
    out += if r.passed { "PASSED\n" } else { "FAILED\n" };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_schedule_has_every_kind_once_and_replays_from_the_seed() {
        let domains = load::domain_ids(3);
        let mut o = ChaosOpts::new(Duration::from_secs(60), 7);
        o.smoke = true;
        let a = schedule(&o, &domains);
        let mut kinds: Vec<FaultKind> = a.iter().map(|p| p.kind).collect();
        kinds.sort();
        assert_eq!(kinds, FaultKind::ALL.to_vec());
        assert!(a.windows(2).all(|w| w[0].at_secs < w[1].at_secs));
        assert!(a.iter().all(|p| p.at_secs > 0.0 && p.at_secs < 60.0));
        // Revocations only hit domains whose keys outlive the run.
        assert!(
            a.iter()
                .filter(|p| matches!(p.kind, FaultKind::Revoke | FaultKind::Offboard))
                .all(|p| p.domain != domains[2])
        );
        let b = schedule(&o, &domains);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        o.seed = 8;
        assert_ne!(format!("{a:?}"), format!("{:?}", schedule(&o, &domains)));
    }

    #[test]
    fn full_schedule_covers_every_kind() {
        let o = ChaosOpts::new(Duration::from_secs(600), 3);
        let a = schedule(&o, &load::domain_ids(3));
        assert!(a.len() >= 40);
        for k in FaultKind::ALL {
            assert!(a.iter().any(|p| p.kind == k), "{k:?}");
        }
    }
}
