//! The scenario runner: runs a scenario's steps against a running [`Testbed`], compares each
//! outcome with its expectation, prints a table (step, expected, got, time) and writes a JSON
//! report. Group steps run every member × AEF with bounded concurrency; a group step's outcome is
//! "ok" only when every operation succeeded, otherwise the first failure's code.
//!
//! Each step runs under a root span of its own (`capif.scenario.step`, attribute `capif.step` =
//! the step's number), the group's tasks included: every span the invoker client starts in the
//! step, and every span the components continue from the `traceparent` it sends, shares that
//! trace id, which the step's row keeps (with its time window and domains) for
//! [`crate::report`]. The spans leave the process when `capif`'s telemetry exports them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use capif_2e::psk::TlsProfile;
use capif_proto::v1::{
    self as pb, invoker_management_client::InvokerManagementClient, security_client::SecurityClient,
};
use ccf_core::ids::CcfId;
use ccf_core::kdf::Capif1eProfile;
use ccf_core::tls::{ExpectedPeer, client_config, connect};
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::invoker::{self, Profile, StatusError};
use crate::scenario::{Action, Scenario, Step};
use crate::testbed::Testbed;

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// 1-based step number.
    pub step: usize,
    /// The action.
    pub action: String,
    /// What it acted on.
    pub target: String,
    /// Expected outcome.
    pub expected: String,
    /// Outcome.
    pub got: String,
    /// Whether they agree.
    pub passed: bool,
    /// Wall time, milliseconds.
    pub millis: u64,
    /// Detail of a failure (first error), or counts.
    pub detail: String,
    /// The W3C trace id of the step (its root span `capif.scenario.step`), whose spans every
    /// component exports when the testbed has an OTLP endpoint.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    /// When the step started and ended, Unix nanoseconds.
    #[serde(skip)]
    pub window_unix_ns: (u64, u64),
    /// For an invoker at an AEF: (the AEF's domain, the invoker's home domain).
    #[serde(skip)]
    pub domains: Option<(String, String)>,
}

impl StepReport {
    /// (A, B) = (the AEF's domain, the invoker's home domain) when they differ.
    pub fn cross_domain(&self) -> Option<(&str, &str)> {
        self.domains
            .as_ref()
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (a.as_str(), b.as_str()))
    }
}

/// Now, in Unix nanoseconds (the unit of span times).
fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Scenario file.
    pub file: String,
    /// Whether every step passed.
    pub passed: bool,
    /// Rows.
    pub steps: Vec<StepReport>,
}

/// An outcome: "ok", or a code plus reason and message.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    pub(crate) code: String,
    pub(crate) reason: String,
    pub(crate) detail: String,
}

impl Outcome {
    fn ok() -> Self {
        Self {
            code: "ok".into(),
            reason: String::new(),
            detail: String::new(),
        }
    }

    fn matches(&self, expected: &str) -> bool {
        let e = expected.to_ascii_uppercase();
        if expected.eq_ignore_ascii_case("ok") {
            return self.code == "ok";
        }
        self.code == e || (!self.reason.is_empty() && self.reason == e)
    }

    fn shown(&self) -> String {
        if self.reason.is_empty() || self.reason == self.code {
            self.code.clone()
        } else {
            format!("{} ({})", self.code, self.reason)
        }
    }
}

/// SCREAMING_SNAKE name of a gRPC code.
pub fn code_name(c: tonic::Code) -> String {
    let camel = format!("{c:?}");
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

pub(crate) fn classify(e: &anyhow::Error) -> Outcome {
    let detail = format!("{e:#}");
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<StatusError>() {
            return Outcome {
                code: code_name(s.code),
                reason: s.reason.clone(),
                detail,
            };
        }
        if let Some(c) = cause.downcast_ref::<capif_2e::psk::ConnectError>() {
            let code = match c {
                capif_2e::psk::ConnectError::Handshake { .. } => "HANDSHAKE_REFUSED",
                capif_2e::psk::ConnectError::Tcp { .. } => "UNAVAILABLE",
            };
            return Outcome {
                code: code.into(),
                reason: String::new(),
                detail,
            };
        }
        if cause.downcast_ref::<invoker::HandshakeRefused>().is_some() {
            return Outcome {
                code: "HANDSHAKE_REFUSED".into(),
                reason: String::new(),
                detail,
            };
        }
        if cause.downcast_ref::<ccf_core::tls::TlsError>().is_some() {
            return Outcome {
                code: "UNAVAILABLE".into(),
                reason: String::new(),
                detail,
            };
        }
    }
    Outcome {
        code: "ERROR".into(),
        reason: String::new(),
        detail,
    }
}

/// A background flow's deadline: it covers one flow, its retries are timed apart.
const BACKGROUND_FLOW_DEADLINE: Duration = Duration::from_secs(8);

/// The step's `domain`, or "" (validation made sure the actions that need one have it).
fn domain_of(step: &Step) -> String {
    step.domain
        .as_ref()
        .map(|d| d.get_ref().clone())
        .unwrap_or_default()
}

/// The operations of a group step: (member, home, AEF) for every member, times every AEF when
/// the step names any.
fn group_ops(
    members: &[(String, String)],
    aefs: &[String],
) -> Vec<(String, String, Option<String>)> {
    if aefs.is_empty() {
        members
            .iter()
            .map(|(m, h)| (m.clone(), h.clone(), None))
            .collect()
    } else {
        members
            .iter()
            .flat_map(|(m, h)| {
                aefs.iter()
                    .map(move |a| (m.clone(), h.clone(), Some(a.clone())))
            })
            .collect()
    }
}

/// Runs the steps and builds the report.
pub struct Runner<'a> {
    scenario: &'a Scenario,
    tb: &'a mut Testbed,
    members: BTreeMap<String, Vec<(String, String)>>,
    /// The background load between `load_start` and `load_stop`.
    background: Option<crate::background::Running>,
    /// When the most recent `kill` or `restart` step killed its component, Unix ms.
    last_kill_ms: Option<u64>,
}

impl<'a> Runner<'a> {
    /// A runner for `scenario` on `tb`.
    pub fn new(scenario: &'a Scenario, tb: &'a mut Testbed) -> Self {
        Self {
            members: scenario.invoker_members(),
            scenario,
            tb,
            background: None,
            last_kill_ms: None,
        }
    }

    /// (the AEF's domain, the invoker's home domain) of an invoker step that names an AEF: of
    /// its first operation across domains, else of its first.
    fn domains_of(&self, step: &Step) -> Option<(String, String)> {
        let group = step.invoker.as_ref()?.get_ref();
        let pairs: Vec<(String, String)> = self
            .members
            .get(group)?
            .iter()
            .flat_map(|(_, home)| {
                Self::aefs_of(step)
                    .into_iter()
                    .filter_map(|a| Some((self.tb.aefs.get(&a)?.domain.clone(), home.clone())))
            })
            .collect();
        pairs
            .iter()
            .find(|(a, b)| a != b)
            .or(pairs.first())
            .cloned()
    }

    fn profile_dir(&self, member: &str) -> PathBuf {
        self.tb.run_dir.join("invokers").join(member)
    }

    /// Runs every step in order; `progress` is told before each.
    pub async fn run(&mut self, progress: impl Fn(usize, &Step)) -> Report {
        let mut rows = Vec::new();
        for (i, step) in self.scenario.steps.iter().enumerate() {
            progress(i, step);
            let start = Instant::now();
            let started_ns = now_unix_ns();
            // One trace per step: every call an operation of the step makes is in it.
            let span = tracing::info_span!(
                parent: None,
                "capif.scenario.step",
                capif.step = i + 1,
                capif.action = step.action.name(),
                capif.scenario = self.scenario.name.as_str(),
            );
            let trace_id = ccf_core::telemetry::trace_id_of(&span).unwrap_or_default();
            let expected = step.expected();
            let (target, outcome, extra) = match step.within_ms {
                None => self.step(step).instrument(span.clone()).await,
                Some(ms) => self.step_within(step, ms).instrument(span.clone()).await,
            };
            let passed = outcome.matches(&expected);
            span.in_scope(|| {
                tracing::info!(step = i + 1, action = step.action.name(), subject = %target, got = %outcome.shown(), passed, "step done")
            });
            rows.push(StepReport {
                step: i + 1,
                action: step.action.name(),
                target,
                expected,
                got: outcome.shown(),
                passed,
                millis: start.elapsed().as_millis() as u64,
                detail: if outcome.detail.is_empty() {
                    extra
                } else {
                    outcome.detail.clone()
                },
                trace_id,
                window_unix_ns: (started_ns, now_unix_ns()),
                domains: self.domains_of(step),
            });
        }
        Report {
            scenario: self.scenario.name.clone(),
            file: self.scenario.origin.clone(),
            passed: rows.iter().all(|r| r.passed),
            steps: rows,
        }
    }

    /// A step with `within_ms`: repeated every ~100 ms until its outcome is the expected one or
    /// the time is up; the detail says how long it took.
    async fn step_within(&mut self, step: &Step, within_ms: u64) -> (String, Outcome, String) {
        let expected = step.expected();
        let start = Instant::now();
        let within = Duration::from_millis(within_ms);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let (target, mut outcome, extra) = self.step(step).await;
            let took = start.elapsed().as_millis();
            if outcome.matches(&expected) {
                let said = format!("{expected} after {took} ms ({tries} tries)");
                // The row shows the outcome's detail when it has one, else `extra`.
                if !outcome.detail.is_empty() {
                    outcome.detail = format!("{said}; {}", outcome.detail);
                }
                let extra = if extra.is_empty() {
                    said
                } else {
                    format!("{said}; {extra}")
                };
                return (target, outcome, extra);
            }
            if start.elapsed() >= within {
                outcome.detail = format!(
                    "not {expected} within {within_ms} ms ({tries} tries); last: {}",
                    if outcome.detail.is_empty() {
                        outcome.shown()
                    } else {
                        outcome.detail.clone()
                    }
                );
                return (target, outcome, extra);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn aefs_of(step: &Step) -> Vec<String> {
        step.aef
            .iter()
            .map(|a| a.get_ref().clone())
            .chain(step.aefs.iter().flatten().map(|a| a.get_ref().clone()))
            .collect()
    }

    async fn step(&mut self, step: &Step) -> (String, Outcome, String) {
        match step.action {
            Action::Wait => {
                let ms = step.ms.unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (format!("{ms} ms"), Outcome::ok(), String::new())
            }
            Action::Stop | Action::Kill | Action::Start | Action::Restart => {
                self.component_step(step).await
            }
            Action::Reload => self.reload_step(step).await,
            Action::RotatePartnerCa => {
                let d = domain_of(step);
                let overlap = Duration::from_millis(step.ms.unwrap_or(0));
                match self.tb.rotate_partner_ca(&d, overlap).await {
                    Ok(fp) => (d, Outcome::ok(), format!("new CA sha256 {}…", &fp[..16])),
                    Err(e) => (d, classify(&e), String::new()),
                }
            }
            Action::SetValidity => self.set_validity_step(step).await,
            Action::RotateTokenKey => {
                let d = domain_of(step);
                match self.rotate_token_key(&d).await {
                    Ok(kid) => (d, Outcome::ok(), format!("new key id {kid}")),
                    Err(e) => (d, classify(&e), String::new()),
                }
            }
            Action::Counters => self.counters_step(step).await,
            Action::LoadStart => self.load_start(step),
            Action::LoadStop => self.load_stop().await,
            _ => self.group_step(step).await,
        }
    }

    /// Stop, kill or start one component.
    async fn component_step(&mut self, step: &Step) -> (String, Outcome, String) {
        let c = step
            .component
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_default();
        let r = match step.action {
            Action::Start => self.tb.start(&c).await,
            Action::Kill => {
                let r = self.tb.stop(&c, true).await;
                self.last_kill_ms = Some(ccf_core::clock::now_ms());
                r
            }
            Action::Restart => match self.tb.stop(&c, true).await {
                Ok(()) => {
                    self.last_kill_ms = Some(ccf_core::clock::now_ms());
                    self.tb.start(&c).await
                }
                Err(e) => Err(e),
            },
            _ => self.tb.stop(&c, false).await,
        };
        (
            c,
            r.map(|_| Outcome::ok()).unwrap_or_else(|e| classify(&e)),
            String::new(),
        )
    }

    /// A gateway reload: after a new partner list, after breaking its files (then refused), or
    /// of the files as they are. Shows what the gateway says it changed.
    async fn reload_step(&mut self, step: &Step) -> (String, Outcome, String) {
        let d = domain_of(step);
        let r = async {
            if let Some(b) = &step.broken {
                return self.tb.reload_broken(&d, b.get_ref().parse()?).await;
            }
            if let Some(p) = &step.partners {
                let p: Vec<String> = p.iter().map(|x| x.get_ref().clone()).collect();
                self.tb.set_partners(&d, &p)?;
            }
            self.tb.reload_gateway(&d).await
        }
        .await;
        match r {
            Ok(rsp) => {
                let mut said = Vec::new();
                for (what, list) in [
                    ("added", &rsp.added),
                    ("removed", &rsp.removed),
                    ("changed", &rsp.changed),
                ] {
                    if !list.is_empty() {
                        said.push(format!("{what} {}", list.join(",")));
                    }
                }
                if rsp.own_certificate_renewed {
                    said.push("own certificate renewed".into());
                }
                (d, Outcome::ok(), said.join("; "))
            }
            Err(e) => (d, classify(&e), String::new()),
        }
    }

    /// A new AEFPSK validity for a domain's CCF, which restarts to apply it.
    async fn set_validity_step(&mut self, step: &Step) -> (String, Outcome, String) {
        let d = domain_of(step);
        let secs = step.secs.unwrap_or(0);
        let r = async {
            self.tb.set_validity(&d, secs)?;
            let replicas = self.tb.domains.get(&d).map_or(1, |x| x.replica_count());
            for n in 1..=replicas {
                let comp = crate::scenario::canonical_component(&format!("ccf:{d}#{n}"));
                self.tb.stop(&comp, false).await?;
                self.tb.start(&comp).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        (
            format!("{d} = {secs} s"),
            r.map(|_| Outcome::ok()).unwrap_or_else(|e| classify(&e)),
            String::new(),
        )
    }

    /// The domain's gateway counters against the minimums the step expects; the values are
    /// shown either way.
    async fn counters_step(&mut self, step: &Step) -> (String, Outcome, String) {
        let d = domain_of(step);
        let want = step.counters.clone().unwrap_or_default();
        let have = match self.counters(&d).await {
            Ok(have) => have,
            Err(e) => return (d, classify(&e), String::new()),
        };
        let short: Vec<String> = want
            .iter()
            .filter(|(k, v)| have.get(*k).copied().unwrap_or(0) < **v)
            .map(|(k, v)| format!("{k}={} < {v}", have.get(k).copied().unwrap_or(0)))
            .collect();
        let shown = want
            .keys()
            .map(|k| format!("{k}={}", have.get(k).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(" ");
        if short.is_empty() {
            (d, Outcome::ok(), shown)
        } else {
            (
                d,
                Outcome {
                    code: "COUNTERS_MISMATCH".into(),
                    reason: String::new(),
                    detail: short.join(", "),
                },
                shown,
            )
        }
    }

    /// An invoker action: every member of the group, times every AEF of the step, with bounded
    /// concurrency. "ok" only when every operation succeeded, otherwise the first failure.
    async fn group_step(&mut self, step: &Step) -> (String, Outcome, String) {
        let group = step
            .invoker
            .as_ref()
            .map(|i| i.get_ref().clone())
            .unwrap_or_default();
        let members = self.members.get(&group).cloned().unwrap_or_default();
        let aefs = Self::aefs_of(step);
        let target = if aefs.is_empty() {
            format!("{group} ({})", members.len())
        } else {
            format!("{group} ({}) -> {}", members.len(), aefs.join(","))
        };
        let ops = group_ops(&members, &aefs);
        let total = ops.len();
        let sem = Arc::new(Semaphore::new(step.concurrency.unwrap_or(16).max(1)));
        let mut set = tokio::task::JoinSet::new();
        for (member, home, aef) in ops {
            let ctx = OpContext::new(self, self.scenario, step, &member, &home, aef.as_deref());
            let sem = sem.clone();
            let span = tracing::info_span!(
                "capif.invoker.op",
                capif.invoker = member.as_str(),
                capif.home = home.as_str(),
                capif.aef = aef.as_deref().unwrap_or_default(),
                capif.method = ctx.method.as_str_name(),
            );
            set.spawn(
                async move {
                    let _permit = sem.acquire_owned().await;
                    let r = ctx.run().await;
                    match &r {
                        Ok(()) => tracing::info!(invoker = %member, "invoker operation done"),
                        Err(e) => {
                            let o = classify(e);
                            tracing::info!(invoker = %member, code = %o.code, reason = %o.reason, "invoker operation refused")
                        }
                    }
                    r
                }
                .instrument(span),
            );
        }
        let mut failures = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(classify(&e)),
                Err(e) => failures.push(Outcome {
                    code: "ERROR".into(),
                    reason: String::new(),
                    detail: e.to_string(),
                }),
            }
        }
        let detail = format!("{}/{} succeeded", total - failures.len(), total);
        match failures.into_iter().next() {
            None => (target, Outcome::ok(), detail),
            Some(mut first) => {
                first.detail = format!("{detail}; first failure: {}", first.detail);
                (target, first, String::new())
            }
        }
    }

    /// Starts the background load: the step's invoker group at its AEFs, PSK flows.
    fn load_start(&mut self, step: &Step) -> (String, Outcome, String) {
        let group = step
            .invoker
            .as_ref()
            .map(|i| i.get_ref().clone())
            .unwrap_or_default();
        let members: Vec<String> = self
            .members
            .get(&group)
            .map(|m| m.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let aefs = Self::aefs_of(step);
        let concurrency = step.concurrency.unwrap_or(4).max(1);
        let target = format!(
            "{group} ({}) -> {}, {concurrency} at a time",
            members.len(),
            aefs.join(",")
        );
        let load = crate::load::Load::new(
            self.tb,
            self.scenario,
            concurrency,
            BACKGROUND_FLOW_DEADLINE,
            0,
        );
        match load {
            Ok(mut load) => {
                load.members.retain(|m| members.contains(&m.name));
                load.aefs.retain(|a| aefs.contains(&a.id));
                self.background = Some(crate::background::Running::start(
                    load,
                    concurrency,
                    target.clone(),
                ));
                (target, Outcome::ok(), String::new())
            }
            Err(e) => (target, classify(&e), String::new()),
        }
    }

    /// Stops the background load and judges it: ok when every flow that started after the most
    /// recent kill succeeded (after its retries), and at least one did start.
    async fn load_stop(&mut self) -> (String, Outcome, String) {
        let Some(running) = self.background.take() else {
            return (
                String::new(),
                Outcome {
                    code: "ERROR".into(),
                    reason: String::new(),
                    detail: "no load is running".into(),
                },
                String::new(),
            );
        };
        let target = running.target.clone();
        let flows = running.stop().await;
        let s = crate::background::Summary::of(&flows, self.last_kill_ms);
        let detail = s.detail();
        if s.after_kill == 0 {
            let o = Outcome {
                code: "NO_FLOWS".into(),
                reason: String::new(),
                detail: format!("{detail}: no flow started after the last kill"),
            };
            return (target, o, String::new());
        }
        match &s.first_failure {
            None => (target, Outcome::ok(), detail),
            Some(first) => (
                target,
                Outcome {
                    code: "FLOWS_FAILED".into(),
                    reason: String::new(),
                    detail: format!("{detail}; first failure: {first}"),
                },
                String::new(),
            ),
        }
    }

    async fn counters(&self, domain: &str) -> Result<BTreeMap<String, u64>> {
        let st = self
            .tb
            .gateway_admin(domain)
            .await?
            .get_status(pb::GetStatusRequest {})
            .await
            .map_err(invoker::status_error)?
            .into_inner();
        Ok(BTreeMap::from([
            ("cache_entries".to_string(), st.cache_entries),
            ("cache_hits".to_string(), st.cache_hits),
            ("cache_misses".to_string(), st.cache_misses),
            ("coalesced".to_string(), st.coalesced),
            ("negative_hits".to_string(), st.negative_hits),
            ("revocations_received".to_string(), st.revocations_received),
            (
                "partner_requests_served".to_string(),
                st.partner_requests_served,
            ),
            ("reloads".to_string(), st.reloads),
            ("reloads_refused".to_string(), st.reloads_refused),
            (
                "duplicate_revocations".to_string(),
                st.duplicate_revocations,
            ),
        ]))
    }
}

impl Runner<'_> {
    /// The domain's operator rotates its CCF's token signing key (CcfAdmin, mutual TLS).
    async fn rotate_token_key(&self, domain: &str) -> Result<String> {
        let d = self
            .tb
            .domains
            .get(domain)
            .ok_or_else(|| anyhow::anyhow!("unknown domain {domain}"))?;
        let (cert, key) = d.operator();
        let ca = std::fs::read_to_string(d.ca_pem())?;
        let (cert, key) = (
            std::fs::read_to_string(cert)?,
            zeroize::Zeroizing::new(std::fs::read_to_string(key)?),
        );
        let (ch, _) = connect(
            &format!("127.0.0.1:{}", d.capif_port),
            "localhost",
            client_config(
                &ca,
                Some((&cert, &key)),
                ExpectedPeer::ccf(&CcfId::new(domain)?),
            )?,
            Duration::from_secs(5),
        )
        .await?;
        let ch = ccf_core::telemetry::TracedChannel::new(ch, format!("127.0.0.1:{}", d.capif_port));
        let set = pb::ccf_admin_client::CcfAdminClient::new(ch)
            .rotate_token_signing_key(pb::RotateTokenSigningKeyRequest {})
            .await
            .map_err(invoker::status_error)?
            .into_inner();
        Ok(set.keys.last().map(|k| k.kid.clone()).unwrap_or_default())
    }
}

/// Everything one operation of a group step needs, owned (it runs in its own task).
struct OpContext {
    action: Action,
    profile_dir: PathBuf,
    credential: String,
    /// The home CCF's onboarding addresses: the step's `replica`, else every replica in order
    /// (the next is tried when one cannot be reached).
    onboarding: Vec<String>,
    /// Where the home domain runs CAPIF-1e, and by which profile (replica 1's address).
    capif1e: (String, Capif1eProfile),
    /// Every replica's CAPIF-1e address, replica 1 first (what a profile keeps).
    capif1e_all: Vec<String>,
    /// The CAPIF-1e addresses this step uses, in order: the step's `replica`, else every
    /// replica. Empty when the home CCF has one replica (the profile's own address serves).
    capif1e_use: Vec<String>,
    /// The revoking CCF's CAPIF addresses (the step's `replica`, else every replica in order).
    revoke_at: Vec<String>,
    home_ca: PathBuf,
    operator: (PathBuf, PathBuf),
    aef: Option<String>,
    api: Option<String>,
    aef_addr: String,
    aef_ca: PathBuf,
    /// The domain that owns the AEF (its certificate must name it).
    aef_domain: String,
    psk_endpoint: String,
    tls_endpoint: String,
    psk_tls: TlsProfile,
    method: pb::SecurityMethod,
    /// Revoke: the domain whose operator revokes, when not the invoker's home (its CA file,
    /// operator files, id).
    revoker: Option<(PathBuf, (PathBuf, PathBuf), String)>,
}

/// The addresses a step uses: replica `pin` only, else all of them in order.
fn pinned(all: Vec<String>, pin: Option<u32>) -> Vec<String> {
    match pin {
        Some(n) => all.into_iter().skip(n as usize - 1).take(1).collect(),
        None => all,
    }
}

/// Whether an error means the server could not be reached (worth trying another replica).
fn unreachable(e: &anyhow::Error) -> bool {
    classify(e).code == "UNAVAILABLE"
}

impl OpContext {
    fn new(
        r: &Runner<'_>,
        s: &Scenario,
        step: &Step,
        member: &str,
        home: &str,
        aef: Option<&str>,
    ) -> Self {
        let d = &r.tb.domains[home];
        let a = aef.and_then(|a| r.tb.aefs.get(a));
        let pin = step.replica.as_ref().map(|n| *n.get_ref());
        let revoking = step
            .domain
            .as_ref()
            .filter(|x| step.action == Action::Revoke && x.get_ref() != home)
            .and_then(|x| r.tb.domains.get(x.get_ref()));
        let revoker = revoking.map(|x| (x.ca_pem(), x.operator(), x.id.clone()));
        let revoke_at = pinned(revoking.unwrap_or(d).capif_addrs(), pin);
        let api = step.api.clone().or_else(|| {
            aef.and_then(|a| s.aef(a))
                .and_then(|a| a.apis.first().cloned())
        });
        Self {
            action: step.action,
            profile_dir: r.profile_dir(member),
            credential: d.credentials.get(member).cloned().unwrap_or_default(),
            onboarding: pinned(d.onboarding_addrs(), pin),
            capif1e: (d.capif1e_addr(), d.capif1e),
            capif1e_all: d.capif1e_addrs(),
            capif1e_use: if d.replica_count() > 1 {
                pinned(d.capif1e_addrs(), pin)
            } else {
                Vec::new()
            },
            revoke_at,
            home_ca: d.ca_pem(),
            operator: d.operator(),
            aef: aef.map(str::to_string),
            api,
            aef_addr: a
                .map(|a| format!("127.0.0.1:{}", a.security_port))
                .unwrap_or_default(),
            aef_ca: a
                .map(|a| r.tb.domains[&a.domain].ca_pem())
                .unwrap_or_default(),
            aef_domain: a.map(|a| a.domain.clone()).unwrap_or_default(),
            psk_endpoint: a
                .map(|a| format!("127.0.0.1:{}", a.psk_port))
                .unwrap_or_default(),
            tls_endpoint: a
                .map(|a| format!("127.0.0.1:{}", a.tls_port))
                .unwrap_or_default(),
            psk_tls: a.and_then(|a| a.psk_tls.parse().ok()).unwrap_or_default(),
            method: step
                .method
                .as_ref()
                .and_then(|m| invoker::parse_method(m.get_ref()).ok())
                .unwrap_or(pb::SecurityMethod::Psk),
            revoker,
        }
    }

    /// The invoker's profile, aimed at the CCF replicas this step uses.
    fn profile(&self) -> Result<Profile> {
        let mut p = Profile::load(&self.profile_dir)?;
        if let Some((first, rest)) = self.capif1e_use.split_first() {
            p.file.capif_addr = first.clone();
            p.file.capif_alternates = rest.to_vec();
        }
        Ok(p)
    }

    /// Onboarding at the first replica of `onboarding` that can be reached. The profile keeps
    /// every replica, replica 1 first, whichever one onboarded the invoker.
    async fn onboard(&self) -> Result<()> {
        let ca = std::fs::read_to_string(&self.home_ca)?;
        let mut last = None;
        for addr in &self.onboarding {
            match invoker::onboard_profile(
                addr,
                &self.capif1e.0,
                &ca,
                "localhost",
                &self.credential,
                &self.profile_dir,
                self.capif1e.1,
            )
            .await
            {
                Ok(p) => {
                    if let Some((_, rest)) = self.capif1e_all.split_first()
                        && !rest.is_empty()
                    {
                        let mut file = p.file.clone();
                        file.capif_alternates = rest.to_vec();
                        invoker::write_profile_file(&self.profile_dir, &file)?;
                    }
                    return Ok(());
                }
                Err(e) if unreachable(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no onboarding address")))
    }

    async fn run(self) -> Result<()> {
        let aef = self.aef.clone().unwrap_or_default();
        let api = self.api.clone().unwrap_or_default();
        match self.action {
            Action::Onboard => self.onboard().await?,
            Action::Security if self.method != pb::SecurityMethod::Psk => {
                let p = self.profile()?;
                invoker::negotiate(&p, &aef, None, self.method).await?;
            }
            Action::Security => {
                invoker::security(&self.profile()?, &aef, None).await?;
            }
            Action::Auth => self.auth(&aef).await?,
            Action::Call => self.call(&aef, &api).await?,
            Action::Run => {
                let p = self.profile()?;
                let ca = std::fs::read_to_string(&self.aef_ca)?;
                let target = invoker::AefTarget {
                    addr: &self.aef_addr,
                    ca_pem: &ca,
                    server_name: "localhost",
                };
                invoker::run_flow(&p, self.method, &aef, &api, &target, self.psk_tls).await?;
            }
            Action::Revoke => self.revoke(aef).await?,
            Action::Offboard => {
                let p = self.profile()?;
                let ch = p.capif1e_channel().await?;
                InvokerManagementClient::new(ch)
                    .offboard(pb::OffboardRequest {
                        api_invoker_id: p.id().to_string(),
                    })
                    .await
                    .map_err(invoker::status_error)?;
            }
            other => return Err(anyhow!("{other:?} is not an invoker action")),
        }
        Ok(())
    }

    /// Authentication Initiation at the AEF with the step's method.
    async fn auth(&self, aef: &str) -> Result<()> {
        let p = self.profile()?;
        let ca = std::fs::read_to_string(&self.aef_ca)?;
        if self.method != pb::SecurityMethod::Psk {
            invoker::auth_method(
                &p,
                self.method,
                "",
                &self.aef_addr,
                &ca,
                "localhost",
                &invoker::expected_aef(&self.aef_domain, aef)?,
            )
            .await?;
            return Ok(());
        }
        // Without a key for this AEF the invoker still asks (and is told why not).
        let k = p.key(aef).ok();
        invoker::auth(
            &p,
            k.as_ref(),
            &self.aef_addr,
            &ca,
            "localhost",
            &invoker::expected_aef(&self.aef_domain, aef)?,
        )
        .await?;
        Ok(())
    }

    /// One API call at the AEF: mutual TLS with the invoker's certificate (PKI), TLS with a
    /// fresh bearer token (OAUTH), or TLS-PSK.
    async fn call(&self, aef: &str, api: &str) -> Result<()> {
        let p = self.profile()?;
        let ca = std::fs::read_to_string(&self.aef_ca)?;
        let expected = invoker::expected_aef(&self.aef_domain, aef);
        match self.method {
            pb::SecurityMethod::Pki => {
                invoker::call_pki(
                    &p,
                    p.id(),
                    &self.tls_endpoint,
                    &ca,
                    "localhost",
                    api,
                    &expected?,
                )
                .await?;
            }
            pb::SecurityMethod::Oauth => {
                // A fresh token for this AEF and API from the home CCF, then the call.
                let scope = format!("{}{aef}:{api}", ccf_core::token::SCOPE_PREFIX);
                let t = invoker::token(&p, &scope).await?;
                invoker::call_oauth(
                    &t.access_token,
                    &self.tls_endpoint,
                    &ca,
                    "localhost",
                    api,
                    &expected?,
                )
                .await?;
            }
            _ => {
                invoker::call(&p, &p.key(aef)?, &self.psk_endpoint, api, self.psk_tls).await?;
            }
        }
        Ok(())
    }

    /// The home domain's operator revokes the invoker's authorization at the AEF (CAPIF-1e,
    /// mutual TLS).
    ///
    /// With a revoking domain other than the home: that domain's operator revokes the invoker's
    /// access to its own AEFs, naming the invoker's home.
    async fn revoke(&self, aef: String) -> Result<()> {
        let p = self.profile()?;
        let (ca_file, operator, expected, home_ccf_id) = match &self.revoker {
            Some((ca, op, id)) => (
                ca,
                op,
                ExpectedPeer::ccf(&CcfId::new(id.clone())?),
                p.file.ccf_id.clone(),
            ),
            None => (&self.home_ca, &self.operator, p.home_ccf()?, String::new()),
        };
        let ca = std::fs::read_to_string(ca_file)?;
        let (cert, key) = (
            std::fs::read_to_string(&operator.0)?,
            zeroize::Zeroizing::new(std::fs::read_to_string(&operator.1)?),
        );
        // The first replica of the revoking CCF that can be reached.
        let mut reached = None;
        let mut last = None;
        for capif in &self.revoke_at {
            match connect(
                capif,
                "localhost",
                client_config(&ca, Some((&cert, &key)), expected.clone())?,
                Duration::from_secs(5),
            )
            .await
            {
                Ok((ch, _)) => {
                    reached = Some((ch, capif));
                    break;
                }
                Err(e) => last = Some(anyhow::Error::from(e)),
            }
        }
        let Some((ch, capif)) = reached else {
            return Err(last.unwrap_or_else(|| anyhow!("no CCF address to revoke at")));
        };
        SecurityClient::new(ccf_core::telemetry::TracedChannel::new(ch, capif.as_str()))
            .revoke_authorization(pb::RevokeAuthorizationRequest {
                revoke_info: Some(pb::SecurityNotification {
                    api_invoker_id: p.id().to_string(),
                    aef_id: aef,
                    cause: pb::Cause::AuthorizationIssue as i32,
                    home_ccf_id,
                    ..Default::default()
                }),
            })
            .await
            .map_err(invoker::status_error)?;
        Ok(())
    }
}

/// The report as a table for a terminal.
pub fn table(r: &Report) -> String {
    let mut out = format!("\nscenario: {} ({})\n", r.scenario, r.file);
    out += &format!(
        "{:>3}  {:<12} {:<44} {:<20} {:<28} {:>8}  {}\n",
        "#", "action", "target", "expected", "got", "ms", ""
    );
    for s in &r.steps {
        let mark = if s.passed { "ok" } else { "FAIL" };
        out += &format!(
            "{:>3}  {:<12} {:<44} {:<20} {:<28} {:>8}  {}\n",
            s.step,
            s.action,
            truncate(&s.target, 44),
            truncate(&s.expected, 20),
            truncate(&s.got, 28),
            s.millis,
            mark
        );
        if !s.passed && !s.detail.is_empty() {
            out += &format!("       -> {}\n", s.detail);
        }
    }
    let failed = r.steps.iter().filter(|s| !s.passed).count();
    out += &format!(
        "\n{}: {} steps, {} failed\n",
        if r.passed { "PASSED" } else { "FAILED" },
        r.steps.len(),
        failed
    );
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_style() {
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }

    #[test]
    fn expectations_match_code_or_reason() {
        let o = Outcome {
            code: "FAILED_PRECONDITION".into(),
            reason: "KEY_EXPIRED".into(),
            detail: String::new(),
        };
        assert!(o.matches("KEY_EXPIRED") && o.matches("FAILED_PRECONDITION") && !o.matches("ok"));
        assert!(Outcome::ok().matches("ok") && !Outcome::ok().matches("UNAVAILABLE"));
    }
}
