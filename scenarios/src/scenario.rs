//! Scenario files (`scenarios/*.toml`, documented in docs/SCENARIOS.md): the domains and their
//! AEFs, the invokers and their home domains, the federation, and an ordered list of steps with
//! the outcome each expects. Parsing refuses unknown fields with file, line and field (toml's
//! messages); [`Scenario::validate`] refuses steps naming unknown domains, AEFs, invokers or
//! components before anything starts, pointing at the line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use serde::Deserialize;
use toml::Spanned;

/// One AEF of a domain.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AefSpec {
    /// Its id (unique in the federation).
    pub id: String,
    /// APIs it serves.
    pub apis: Vec<String>,
    /// PSK TLS profile of its endpoint: "tls13" (default) or "tls12".
    #[serde(default)]
    pub psk_tls: Option<String>,
}

/// One operator domain.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    /// The CCF id, e.g. "operator-a.test".
    pub id: String,
    /// AEFPSK validity at this CCF, seconds (default 3600).
    #[serde(default)]
    pub aef_psk_validity_secs: Option<u64>,
    /// The domain's CAPIF-1e profile: "tls13-exporter" (default) or "tls12-annex-a" (the CCF
    /// gets a TLS 1.2 CAPIF-1e listener, and the domain's invokers use it).
    #[serde(default)]
    pub capif1e: ccf_core::kdf::Capif1eProfile,
    /// The gateway's outbound fetch budget per partner, fetches per second (default: the
    /// gateway's, `[outbound] fetch_rate_per_sec`).
    #[serde(default)]
    pub gateway_fetch_rate_per_sec: Option<u32>,
    /// The same budget's burst (default: the gateway's, `[outbound] fetch_burst`).
    #[serde(default)]
    pub gateway_fetch_burst: Option<u32>,
    /// Where the domain's CCF keeps its state: "redb" (default: a file in its state directory)
    /// or "postgres" (a database of the PostgreSQL server the launcher starts for the run).
    #[serde(default)]
    pub store: ccf_core::pg::StoreBackend,
    /// How many CCF and gateway processes the domain runs (default 1, at most
    /// [`MAX_REPLICAS`]); more than one needs `store = "postgres"`, which they share.
    #[serde(default)]
    pub replicas: Option<Spanned<u32>>,
    /// The domain's AEFs.
    #[serde(default, rename = "aef")]
    pub aefs: Vec<AefSpec>,
}

/// The most replicas a domain may run in the testbed.
pub const MAX_REPLICAS: u32 = 4;

impl DomainSpec {
    /// How many CCF and gateway replicas the domain runs.
    pub fn replica_count(&self) -> u32 {
        self.replicas.as_ref().map_or(1, |r| *r.get_ref())
    }
}

/// A component name split into kind, domain or AEF id, and replica (1 when the name has no
/// `#<n>`): `ccf:operator-b.test#2` -> ("ccf", "operator-b.test", 2). `None` when the replica
/// is not a number from 1.
pub fn split_component(c: &str) -> Option<(&str, &str, u32)> {
    let (kind, rest) = c.split_once(':')?;
    match rest.split_once('#') {
        None => Some((kind, rest, 1)),
        Some((name, n)) => {
            let n: u32 = n.parse().ok().filter(|n| *n >= 1)?;
            Some((kind, name, n))
        }
    }
}

/// The name the testbed knows a component by: replica 1 of a CCF or gateway is `ccf:<domain>`,
/// the others `ccf:<domain>#<n>`.
pub fn canonical_component(c: &str) -> String {
    match split_component(c) {
        Some((kind, name, 1)) => format!("{kind}:{name}"),
        _ => c.to_string(),
    }
}

/// One invoker, or a group of `count` invokers named `<name>-1` .. `<name>-<count>`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokerSpec {
    /// Name used in steps.
    pub name: String,
    /// Home domain.
    pub home: Spanned<String>,
    /// Group size (default 1: a single invoker named `name`).
    #[serde(default)]
    pub count: Option<u32>,
}

/// `[federation]`: who trusts whom. Default: every domain trusts every other.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSpec {
    /// Pairs of domains that trust each other. Empty: full mesh.
    #[serde(default)]
    pub pairs: Vec<[Spanned<String>; 2]>,
    /// Find partners by DNS SRV (default) or by static addresses.
    #[serde(default)]
    pub discovery: Option<String>,
}

/// A step's action.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Onboard invoker(s) at their home CCF.
    Onboard,
    /// CAPIF-1e: obtain PSK for the AEF(s).
    Security,
    /// Authentication Initiation at the AEF(s).
    Auth,
    /// TLS-PSK handshake + demo API call.
    Call,
    /// security + auth + call.
    Run,
    /// The home CCF's operator revokes the invoker's authorization (for `aef`, or all). With
    /// `domain` naming another domain: THAT domain's operator revokes the invoker's access to
    /// its own AEFs (`aef`, or all of them); nothing changes at the invoker's home.
    Revoke,
    /// The invoker offboards itself.
    Offboard,
    /// Stop a component gracefully (SIGTERM).
    Stop,
    /// Kill a component (SIGKILL).
    Kill,
    /// Start a stopped component.
    Start,
    /// Kill a component (SIGKILL) and start it again: nothing it held in memory survives.
    Restart,
    /// Reload a domain's gateway (`domain`) through `GatewayAdmin.Reload`, after setting its
    /// partner list (`partners`) or breaking its files on purpose (`broken`: "toml" or
    /// "partner_ca"; the good files are put back after the reload was refused).
    Reload,
    /// Rotate the CA the partners of `domain` trust for its gateway, with an overlap of `ms`
    /// milliseconds (default 0): partners trust old + new and reload, the gateway takes a
    /// certificate of the new CA and reloads, partners drop the old CA and reload.
    RotatePartnerCa,
    /// Sleep `ms` milliseconds.
    Wait,
    /// Restart a domain's CCF with a new AEFPSK validity (`domain`, `secs`).
    SetValidity,
    /// Check a gateway's admin counters (`domain`, `counters`).
    Counters,
    /// The domain's operator rotates its CCF's access-token signing key (`domain`).
    RotateTokenKey,
    /// Start a steady background load: cross-domain flows (security at the home CCF, auth at
    /// the AEF, a TLS-PSK call) of every member of `invoker` at the `aef`/`aefs`, `concurrency`
    /// at a time, running while the later steps run.
    LoadStart,
    /// Stop the background load and judge it: ok when every flow that started after the most
    /// recent `kill` or `restart` succeeded (a flow whose component went away is retried and
    /// counts by its retry).
    LoadStop,
}

/// One step.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What to do.
    pub action: Action,
    /// Invoker (or invoker group) name.
    #[serde(default)]
    pub invoker: Option<Spanned<String>>,
    /// One AEF.
    #[serde(default)]
    pub aef: Option<Spanned<String>>,
    /// Several AEFs (every invoker × every AEF).
    #[serde(default)]
    pub aefs: Option<Vec<Spanned<String>>>,
    /// API to call (default: the AEF's first API).
    #[serde(default)]
    pub api: Option<String>,
    /// Security method of security/auth/call/run: "psk" (default), "pki" or "oauth".
    #[serde(default)]
    pub method: Option<Spanned<String>>,
    /// Component: "ccf:<domain>", "gateway:<domain>" or "aef:<aef-id>"; "ccf:<domain>#<n>" and
    /// "gateway:<domain>#<n>" name replica n of a domain with `replicas` (no `#`: replica 1).
    #[serde(default)]
    pub component: Option<Spanned<String>>,
    /// Domain (set_validity, counters, reload, rotate_partner_ca; revoke: the revoking domain).
    #[serde(default)]
    pub domain: Option<Spanned<String>>,
    /// The domain's new partner list (reload).
    #[serde(default)]
    pub partners: Option<Vec<Spanned<String>>>,
    /// Break the gateway's files before reloading (reload): "toml" or "partner_ca".
    #[serde(default)]
    pub broken: Option<Spanned<String>>,
    /// Milliseconds (wait).
    #[serde(default)]
    pub ms: Option<u64>,
    /// Seconds (set_validity).
    #[serde(default)]
    pub secs: Option<u64>,
    /// Minimum values of gateway counters (counters): cache_hits, cache_misses, coalesced,
    /// negative_hits, revocations_received, partner_requests_served, cache_entries.
    #[serde(default)]
    pub counters: Option<BTreeMap<String, u64>>,
    /// Which replica of the CCF the step talks to (onboard, security, run, revoke, offboard, and
    /// call with oauth): the home CCF's, or with `revoke` and `domain` that domain's. Without
    /// it: replica 1, failing over to the next live replica.
    #[serde(default)]
    pub replica: Option<Spanned<u32>>,
    /// Repeat the step (every ~100 ms) until its outcome is `expect` or this many milliseconds
    /// have passed (security, auth, call, run, counters).
    #[serde(default)]
    pub within_ms: Option<u64>,
    /// Concurrent operations for group steps (default 16).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Expected outcome: "ok" (default), a gRPC code ("PERMISSION_DENIED", "UNAVAILABLE", ...),
    /// an error reason ("KEY_EXPIRED", ...), or "HANDSHAKE_REFUSED".
    #[serde(default)]
    pub expect: Option<String>,
    /// Free text shown in the report.
    #[serde(default)]
    pub note: Option<String>,
}

impl Action {
    /// The name used in scenario files.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

impl Step {
    /// The expectation, normalised.
    pub fn expected(&self) -> String {
        self.expect.clone().unwrap_or_else(|| "ok".into())
    }
}

/// A whole scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Title.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Domains.
    #[serde(rename = "domain")]
    pub domains: Vec<DomainSpec>,
    /// Invokers.
    #[serde(default, rename = "invoker")]
    pub invokers: Vec<InvokerSpec>,
    /// Trust.
    #[serde(default)]
    pub federation: FederationSpec,
    /// Steps, in order.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    /// The file's text (for line numbers).
    #[serde(skip)]
    pub source: String,
    /// The file's name.
    #[serde(skip)]
    pub origin: String,
}

impl Scenario {
    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates scenario text.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|sp| format!(":{}", line_of(text, sp.start)))
                .unwrap_or_default();
            anyhow!("{origin}{line}: {}", e.message())
        })?;
        s.source = text.to_string();
        s.origin = origin.to_string();
        s.validate()?;
        Ok(s)
    }

    fn at(&self, span: std::ops::Range<usize>) -> String {
        format!("{}:{}", self.origin, line_of(&self.source, span.start))
    }

    /// Every AEF id with its domain.
    pub fn aef_domains(&self) -> BTreeMap<String, String> {
        self.domains
            .iter()
            .flat_map(|d| d.aefs.iter().map(move |a| (a.id.clone(), d.id.clone())))
            .collect()
    }

    /// The AEF spec of an id.
    pub fn aef(&self, id: &str) -> Option<&AefSpec> {
        self.domains
            .iter()
            .flat_map(|d| d.aefs.iter())
            .find(|a| a.id == id)
    }

    /// Expands invoker groups: name -> members (name, home).
    pub fn invoker_members(&self) -> BTreeMap<String, Vec<(String, String)>> {
        self.invokers
            .iter()
            .map(|i| {
                let members = match i.count {
                    None | Some(0) | Some(1) if i.count.is_none() => {
                        vec![(i.name.clone(), i.home.get_ref().clone())]
                    }
                    Some(n) => (1..=n)
                        .map(|k| (format!("{}-{k}", i.name), i.home.get_ref().clone()))
                        .collect(),
                    None => Vec::new(),
                };
                (i.name.clone(), members)
            })
            .collect()
    }

    /// Whether two domains trust each other.
    pub fn trusts(&self, a: &str, b: &str) -> bool {
        a != b
            && (self.federation.pairs.is_empty()
                || self.federation.pairs.iter().any(|[x, y]| {
                    (x.get_ref() == a && y.get_ref() == b) || (x.get_ref() == b && y.get_ref() == a)
                }))
    }

    /// Refuses references to unknown things, before anything starts.
    pub fn validate(&self) -> Result<()> {
        let domains: BTreeSet<&str> = self.domains.iter().map(|d| d.id.as_str()).collect();
        if domains.len() != self.domains.len() {
            bail!("{}: a domain id is listed twice", self.origin);
        }
        self.validate_ids()?;
        self.validate_replicas()?;
        let aefs = self.aef_domains();
        if aefs.len() != self.domains.iter().map(|d| d.aefs.len()).sum::<usize>() {
            bail!("{}: an AEF id is used twice", self.origin);
        }
        self.validate_homes_and_federation(&domains)?;
        let invokers: BTreeSet<String> = self.invokers.iter().map(|i| i.name.clone()).collect();
        for (n, step) in self.steps.iter().enumerate() {
            let what = format!("step {} ({:?})", n + 1, step.action);
            self.validate_step_references(step, &what, &domains, &aefs, &invokers)?;
            self.validate_step_fields(step, &what)?;
            self.validate_step_replica(step, &what)?;
        }
        self.validate_load_pairs()
    }

    /// How many replicas `domain` runs (1 for an unknown domain).
    pub fn replicas_of(&self, domain: &str) -> u32 {
        self.domains
            .iter()
            .find(|d| d.id == domain)
            .map_or(1, DomainSpec::replica_count)
    }

    /// `replicas` is 1 to [`MAX_REPLICAS`], and more than one needs the shared PostgreSQL
    /// store: replicas of a CCF must see one state.
    fn validate_replicas(&self) -> Result<()> {
        for d in &self.domains {
            let Some(r) = &d.replicas else { continue };
            let n = *r.get_ref();
            if n == 0 || n > MAX_REPLICAS {
                bail!(
                    "{}: domain {:?}: replicas = {n}: use 1 to {MAX_REPLICAS}",
                    self.at(r.span()),
                    d.id
                );
            }
            if n > 1 && d.store != ccf_core::pg::StoreBackend::Postgres {
                bail!(
                    "{}: domain {:?}: replicas = {n} needs store = \"postgres\" (the replicas \
                     share one database)",
                    self.at(r.span()),
                    d.id
                );
            }
        }
        Ok(())
    }

    /// `replica` only on steps that talk to a CCF, and within the domain's replicas;
    /// `within_ms` only on steps that may be repeated.
    fn validate_step_replica(&self, step: &Step, what: &str) -> Result<()> {
        use Action::*;
        if let Some(r) = &step.replica {
            let oauth = step
                .method
                .as_ref()
                .is_some_and(|m| m.get_ref().eq_ignore_ascii_case("oauth"));
            let talks_to_ccf = match step.action {
                Onboard | Security | Run | Revoke | Offboard => true,
                Call => oauth,
                _ => false,
            };
            if !talks_to_ccf {
                bail!(
                    "{}: {what}: `replica` is for steps that talk to a CCF (onboard, security, \
                     run, revoke, offboard, call with method = \"oauth\")",
                    self.at(r.span())
                );
            }
            let domain = match (&step.domain, step.action) {
                (Some(d), Revoke) => Some(d.get_ref().clone()),
                _ => step.invoker.as_ref().and_then(|i| {
                    self.invokers
                        .iter()
                        .find(|x| x.name == *i.get_ref())
                        .map(|x| x.home.get_ref().clone())
                }),
            }
            .unwrap_or_default();
            let n = *r.get_ref();
            let have = self.replicas_of(&domain);
            if n == 0 || n > have {
                bail!(
                    "{}: {what}: replica = {n}, but {domain} runs {have} replica{}",
                    self.at(r.span()),
                    if have == 1 { "" } else { "s" }
                );
            }
        }
        if step.within_ms.is_some()
            && !matches!(step.action, Security | Auth | Call | Run | Counters)
        {
            bail!(
                "{}: {what}: `within_ms` repeats a step until it gives its expectation: only \
                 security, auth, call, run and counters may be repeated",
                self.origin
            );
        }
        Ok(())
    }

    /// A background load is started once at a time and stopped (judged) by a later step.
    fn validate_load_pairs(&self) -> Result<()> {
        let mut running = None;
        for (n, step) in self.steps.iter().enumerate() {
            match (step.action, running) {
                (Action::LoadStart, Some(at)) => bail!(
                    "{}: step {} (LoadStart): the load of step {at} is still running (load_stop it first)",
                    self.origin,
                    n + 1
                ),
                (Action::LoadStart, None) => running = Some(n + 1),
                (Action::LoadStop, None) => bail!(
                    "{}: step {} (LoadStop): no load is running (load_start one first)",
                    self.origin,
                    n + 1
                ),
                (Action::LoadStop, Some(_)) => running = None,
                _ => {}
            }
        }
        if let Some(at) = running {
            bail!(
                "{}: the load of step {at} is never stopped: end it with a load_stop step, \
                 which judges it",
                self.origin
            );
        }
        Ok(())
    }

    /// Domain and AEF ids must be valid ids; every AEF serves at least one API.
    fn validate_ids(&self) -> Result<()> {
        for d in &self.domains {
            ccf_core::ids::CcfId::new(d.id.clone())
                .map_err(|e| anyhow!("{}: domain {:?}: {e}", self.origin, d.id))?;
            for a in &d.aefs {
                ccf_core::ids::AefId::new(a.id.clone())
                    .map_err(|e| anyhow!("{}: aef {:?}: {e}", self.origin, a.id))?;
                if a.apis.is_empty() {
                    bail!("{}: aef {:?} needs at least one API", self.origin, a.id);
                }
            }
        }
        Ok(())
    }

    /// Invokers' home domains and the federation's pairs must be listed domains.
    fn validate_homes_and_federation(&self, domains: &BTreeSet<&str>) -> Result<()> {
        for i in &self.invokers {
            if !domains.contains(i.home.get_ref().as_str()) {
                bail!(
                    "{}: invoker {:?}: unknown home domain {:?}",
                    self.at(i.home.span()),
                    i.name,
                    i.home.get_ref()
                );
            }
        }
        for [x, y] in &self.federation.pairs {
            for v in [x, y] {
                if !domains.contains(v.get_ref().as_str()) {
                    bail!(
                        "{}: federation: unknown domain {:?}",
                        self.at(v.span()),
                        v.get_ref()
                    );
                }
            }
        }
        Ok(())
    }

    /// What a step names (invoker, AEFs, domain, component, method) must exist; the error
    /// points at the line.
    fn validate_step_references(
        &self,
        step: &Step,
        what: &str,
        domains: &BTreeSet<&str>,
        aefs: &BTreeMap<String, String>,
        invokers: &BTreeSet<String>,
    ) -> Result<()> {
        if let Some(i) = &step.invoker
            && !invokers.contains(i.get_ref())
        {
            bail!(
                "{}: {what}: unknown invoker {:?}",
                self.at(i.span()),
                i.get_ref()
            );
        }
        for a in step.aef.iter().chain(step.aefs.iter().flatten()) {
            if !aefs.contains_key(a.get_ref()) {
                bail!(
                    "{}: {what}: unknown AEF {:?}",
                    self.at(a.span()),
                    a.get_ref()
                );
            }
        }
        for d in step.domain.iter().chain(step.partners.iter().flatten()) {
            if !domains.contains(d.get_ref().as_str()) {
                bail!(
                    "{}: {what}: unknown domain {:?}",
                    self.at(d.span()),
                    d.get_ref()
                );
            }
        }
        if let Some(c) = &step.component {
            let ok = match split_component(c.get_ref()) {
                Some(("ccf" | "gateway", d, n)) => domains.contains(d) && n <= self.replicas_of(d),
                Some(("aef", a, 1)) => aefs.contains_key(a) && !c.get_ref().contains('#'),
                _ => false,
            };
            if !ok {
                bail!(
                    "{}: {what}: unknown component {:?} (use ccf:<domain>, gateway:<domain>, \
                     ccf:<domain>#<n> or gateway:<domain>#<n> up to the domain's replicas, or \
                     aef:<aef-id>)",
                    self.at(c.span()),
                    c.get_ref()
                );
            }
        }
        if let Some(m) = &step.method
            && let Err(e) = crate::invoker::parse_method(m.get_ref())
        {
            bail!("{}: {what}: {e}", self.at(m.span()));
        }
        Ok(())
    }

    /// The fields the step's action needs.
    fn validate_step_fields(&self, step: &Step, what: &str) -> Result<()> {
        let need = |field: &str| anyhow!("{}: {what} needs `{field}`", self.origin);
        use Action::*;
        match step.action {
            Onboard | Offboard | Revoke => {
                step.invoker.as_ref().ok_or_else(|| need("invoker"))?;
            }
            Security | Auth | Call | Run | LoadStart => {
                step.invoker.as_ref().ok_or_else(|| need("invoker"))?;
                if step.aef.is_none() && step.aefs.is_none() {
                    return Err(need("aef"));
                }
            }
            Stop | Kill | Start | Restart => {
                step.component.as_ref().ok_or_else(|| need("component"))?;
            }
            Reload => {
                step.domain.as_ref().ok_or_else(|| need("domain"))?;
                if step.partners.is_some() && step.broken.is_some() {
                    bail!(
                        "{}: {what}: set `partners` or `broken`, not both",
                        self.origin
                    );
                }
                if let Some(b) = &step.broken
                    && let Err(e) = b.get_ref().parse::<crate::live::Breakage>()
                {
                    bail!("{}: {what}: {e}", self.at(b.span()));
                }
            }
            RotatePartnerCa => {
                step.domain.as_ref().ok_or_else(|| need("domain"))?;
            }
            Wait => {
                step.ms.ok_or_else(|| need("ms"))?;
            }
            RotateTokenKey => {
                step.domain.as_ref().ok_or_else(|| need("domain"))?;
            }
            LoadStop => {}
            SetValidity => {
                step.domain.as_ref().ok_or_else(|| need("domain"))?;
                step.secs.ok_or_else(|| need("secs"))?;
            }
            Counters => {
                step.domain.as_ref().ok_or_else(|| need("domain"))?;
                step.counters.as_ref().ok_or_else(|| need("counters"))?;
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
[[domain]]
id = "operator-a.test"
[[domain.aef]]
id = "aef-a1"
apis = ["x"]
[[domain]]
id = "operator-b.test"
[[invoker]]
name = "alice"
home = "operator-b.test"
[[step]]
action = "run"
invoker = "alice"
aef = "aef-a1"
"#;

    #[test]
    fn a_good_file_parses() {
        let s = Scenario::parse(OK, "ok.toml").unwrap();
        assert_eq!(s.steps.len(), 1);
        assert!(s.trusts("operator-a.test", "operator-b.test"));
    }

    #[test]
    fn unknown_aef_in_a_step_names_the_line() {
        let bad = OK.replace("aef = \"aef-a1\"", "aef = \"aef-zz\"");
        let e = Scenario::parse(&bad, "bad.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("bad.toml:16:") && e.contains("unknown AEF \"aef-zz\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let bad = OK.replace("action = \"run\"", "action = \"run\"\nspeed = 3");
        let e = Scenario::parse(&bad, "bad.toml").unwrap_err().to_string();
        assert!(e.starts_with("bad.toml:15:") && e.contains("speed"), "{e}");
    }

    #[test]
    fn a_domain_names_its_store_or_is_refused_at_the_line() {
        use ccf_core::pg::StoreBackend;
        let with = |b: &str| {
            OK.replace(
                "id = \"operator-b.test\"",
                &format!("id = \"operator-b.test\"\nstore = \"{b}\""),
            )
        };
        let s = Scenario::parse(&with("postgres"), "ok.toml").unwrap();
        assert_eq!(s.domains[1].store, StoreBackend::Postgres);
        assert_eq!(s.domains[0].store, StoreBackend::Redb, "the default");
        let e = Scenario::parse(&with("mongodb"), "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("bad.toml:10:") && e.contains("postgres"),
            "{e}"
        );
    }

    #[test]
    fn a_domain_names_its_capif1e_profile_or_is_refused_at_the_line() {
        let with = |p: &str| {
            OK.replace(
                "id = \"operator-b.test\"",
                &format!("id = \"operator-b.test\"\ncapif1e = \"{p}\""),
            )
        };
        let s = Scenario::parse(&with("tls12-annex-a"), "ok.toml").unwrap();
        assert_eq!(
            s.domains[1].capif1e,
            ccf_core::kdf::Capif1eProfile::Tls12AnnexA
        );
        assert_eq!(
            s.domains[0].capif1e,
            ccf_core::kdf::Capif1eProfile::Tls13Exporter
        );
        let e = Scenario::parse(&with("tls12"), "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("bad.toml:10:") && e.contains("tls12-annex-a"),
            "{e}"
        );
    }

    /// OK with B on PostgreSQL with `replicas` replicas and `steps` appended.
    fn with_replicas(replicas: &str, steps: &str) -> String {
        OK.replace(
            "id = \"operator-b.test\"",
            &format!("id = \"operator-b.test\"\nstore = \"postgres\"\nreplicas = {replicas}"),
        ) + steps
    }

    fn refused(text: &str) -> String {
        Scenario::parse(text, "bad.toml").unwrap_err().to_string()
    }

    #[test]
    fn replicas_are_counted_and_need_postgres() {
        let s = Scenario::parse(&with_replicas("2", ""), "ok.toml").unwrap();
        assert_eq!(s.replicas_of("operator-b.test"), 2);
        assert_eq!(s.replicas_of("operator-a.test"), 1, "the default");
        let redb = OK.replace(
            "id = \"operator-b.test\"",
            "id = \"operator-b.test\"\nreplicas = 2",
        );
        let e = refused(&redb);
        assert!(
            e.starts_with("bad.toml:10:") && e.contains("needs store = \"postgres\""),
            "{e}"
        );
        for n in ["0", "5"] {
            let e = refused(&with_replicas(n, ""));
            assert!(e.starts_with("bad.toml:11:") && e.contains("1 to 4"), "{e}");
        }
    }

    #[test]
    fn replica_components_are_checked_against_the_domain() {
        let step = |c: &str| format!("[[step]]\naction = \"kill\"\ncomponent = \"{c}\"\n");
        for ok in [
            "ccf:operator-b.test#2",
            "gateway:operator-b.test#1",
            "ccf:operator-b.test",
        ] {
            Scenario::parse(&with_replicas("2", &step(ok)), "ok.toml").unwrap();
        }
        for bad in [
            "ccf:operator-b.test#3",
            "gateway:operator-a.test#2",
            "ccf:operator-b.test#0",
            "ccf:operator-b.test#x",
            "aef:aef-a1#1",
        ] {
            let e = refused(&with_replicas("2", &step(bad)));
            assert!(
                e.starts_with("bad.toml:21:") && e.contains("unknown component"),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            canonical_component("ccf:operator-b.test#1"),
            "ccf:operator-b.test"
        );
        assert_eq!(
            canonical_component("gateway:operator-b.test#2"),
            "gateway:operator-b.test#2"
        );
    }

    #[test]
    fn a_step_names_a_replica_only_when_it_talks_to_a_ccf() {
        let step = |action: &str, extra: &str, n: u32| {
            format!(
                "[[step]]\naction = \"{action}\"\ninvoker = \"alice\"\naef = \"aef-a1\"\n{extra}replica = {n}\n"
            )
        };
        for (action, extra) in [
            ("security", ""),
            ("run", ""),
            ("revoke", ""),
            ("call", "method = \"oauth\"\n"),
        ] {
            Scenario::parse(&with_replicas("2", &step(action, extra, 2)), "ok.toml").unwrap();
        }
        let e = refused(&with_replicas("2", &step("security", "", 3)));
        assert!(
            e.starts_with("bad.toml:23:")
                && e.contains("replica = 3, but operator-b.test runs 2 replicas"),
            "{e}"
        );
        for (action, extra) in [("auth", ""), ("call", "")] {
            let e = refused(&with_replicas("2", &step(action, extra, 1)));
            assert!(
                e.starts_with("bad.toml:23:") && e.contains("steps that talk to a CCF"),
                "{action}: {e}"
            );
        }
        // revoke with `domain`: that domain's replicas (A runs 1).
        let e = refused(&with_replicas(
            "2",
            &step("revoke", "domain = \"operator-a.test\"\n", 2),
        ));
        assert!(e.contains("operator-a.test runs 1 replica"), "{e}");
    }

    #[test]
    fn within_ms_and_the_load_steps_are_checked() {
        let load_start =
            "[[step]]\naction = \"load_start\"\ninvoker = \"alice\"\naef = \"aef-a1\"\n";
        let load_stop = "[[step]]\naction = \"load_stop\"\n";
        Scenario::parse(&format!("{OK}{load_start}{load_stop}"), "ok.toml").unwrap();
        assert!(refused(&format!("{OK}{load_start}")).contains("never stopped"));
        assert!(refused(&format!("{OK}{load_stop}")).contains("no load is running"));
        assert!(
            refused(&format!("{OK}{load_start}{load_start}{load_stop}")).contains("still running")
        );
        let e = refused(&format!(
            "{OK}[[step]]\naction = \"onboard\"\ninvoker = \"alice\"\nwithin_ms = 2000\n"
        ));
        assert!(e.contains("`within_ms`"), "{e}");
        Scenario::parse(
            &format!(
                "{OK}[[step]]\naction = \"auth\"\ninvoker = \"alice\"\naef = \"aef-a1\"\nwithin_ms = 2000\n"
            ),
            "ok.toml",
        )
        .unwrap();
    }

    #[test]
    fn unknown_home_domain_is_refused() {
        let bad = OK.replace("home = \"operator-b.test\"", "home = \"operator-x.test\"");
        let e = Scenario::parse(&bad, "bad.toml").unwrap_err().to_string();
        assert!(
            e.contains("bad.toml:12:") && e.contains("operator-x.test"),
            "{e}"
        );
    }
}
