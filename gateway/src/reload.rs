//! Live reconfiguration. [`load`] reads and checks everything a configuration names (the one
//! path for start and reload: a file that would not start a gateway is never applied to a
//! running one); [`diff`] says what changed; [`reload`] applies a change atomically — partners
//! added, removed (cache entries evicted), changed (new trust and link, state and budgets kept),
//! the own certificates swapped in their resolvers — or refuses it as a whole and keeps the
//! running configuration. GatewayAdmin.Reload, SIGHUP (`RunningGateway::reload`) and the file
//! poll ([`spawn_poll`]) all go through [`reload`], one at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::CcfId;
use ccf_core::tls::TlsError;
use rustls::sign::CertifiedKey;
use sha2::Digest as _;

use crate::config::{ConfigError, GatewayConfig};
use crate::credentials::{CertSlot, CredentialError, certified_key};
use crate::partners::{LinkFactory, Partners};
use crate::state::GatewayState;
use crate::trust::PartnerTrust;

/// A SHA-256 of file contents.
pub type Digest = [u8; 32];

/// Adjusts a configuration read from the file (the binary's command-line overrides), before
/// it is checked, at start and at every reload.
pub type Adjust = Arc<dyn Fn(&mut GatewayConfig) + Send + Sync>;

/// Where the running configuration came from.
#[derive(Clone)]
pub struct ConfigSource {
    /// The TOML file.
    pub path: PathBuf,
    /// Overrides applied after every read.
    pub adjust: Option<Adjust>,
}

impl ConfigSource {
    /// Reads, parses and adjusts the file.
    pub fn read(&self) -> Result<GatewayConfig, LoadError> {
        let mut c = GatewayConfig::load(&self.path)?;
        if let Some(a) = &self.adjust {
            a(&mut c);
        }
        Ok(c)
    }

    /// The hash of the file and of every file it names (each with its path): what the poll
    /// compares. A file that does not parse is hashed alone.
    pub fn fingerprint(&self) -> Digest {
        let mut h = sha2::Sha256::new();
        hash_file(&mut h, &self.path);
        if let Ok(c) = self.read() {
            for p in referenced_files(&c) {
                hash_file(&mut h, p);
            }
        }
        h.finalize().into()
    }
}

fn hash_file(h: &mut sha2::Sha256, p: &Path) {
    h.update(p.as_os_str().as_encoded_bytes());
    h.update([0]);
    match std::fs::read(p) {
        Ok(bytes) => {
            h.update([1]);
            h.update(sha2::Sha256::digest(&bytes));
        }
        Err(_) => h.update([2]),
    }
}

fn referenced_files(c: &GatewayConfig) -> Vec<&Path> {
    let mut v = vec![c.tls.ca_cert.as_path(), &c.tls.cert, &c.tls.key];
    v.extend(c.tls.interconnect_cert.as_deref());
    v.extend(c.tls.interconnect_key.as_deref());
    for p in &c.partners {
        v.push(&p.ca_cert);
        v.extend(p.invoker_ca_cert.as_deref());
    }
    v
}

/// Why a configuration cannot be used (start) or applied (reload).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read or does not parse.
    #[error(transparent)]
    File(#[from] ConfigError),
    /// A value is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A file it names cannot be read.
    #[error("{what}: cannot read {path}: {source}")]
    Read {
        /// Which setting names it.
        what: String,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file it names does not hold what it should.
    #[error("{what} ({path}): {source}")]
    Pem {
        /// Which setting names it.
        what: String,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: TlsError,
    },
    /// The gateway's own certificate and key cannot serve.
    #[error("{what}: {source}")]
    Credential {
        /// Which setting names them.
        what: &'static str,
        /// The cause.
        #[source]
        source: CredentialError,
    },
    /// There is no file to re-read.
    #[error(
        "this gateway was started without a configuration file; restart it to change its configuration"
    )]
    NoFile,
}

/// One partner as a configuration names it, its files read.
pub struct LoadedPartner {
    /// Its trust (CA bundle, invoker CAs).
    pub trust: PartnerTrust,
    /// Its static address.
    pub address: Option<String>,
}

/// Hashes of what a configuration's files hold, for [`diff`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// The own domain's CA file.
    pub own_ca: Digest,
    /// The own and interconnect certificates and keys.
    pub own: Digest,
    /// Per partner: CA bundle, invoker CA bundle and address.
    pub partners: BTreeMap<CcfId, Digest>,
}

/// A configuration with everything it names read and checked.
pub struct Loaded {
    /// The configuration.
    pub config: GatewayConfig,
    /// Its domain.
    pub ccf_id: CcfId,
    /// The own domain's CA (PEM).
    pub own_ca_pem: String,
    /// The own identity: certificate + own CA, and key.
    pub own: Arc<CertifiedKey>,
    /// The identity presented to partners (the own one by default).
    pub interconnect: Arc<CertifiedKey>,
    /// The partners, in file order.
    pub partners: Vec<LoadedPartner>,
    /// What the files held.
    pub digests: Digests,
}

fn read(what: impl Into<String>, path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        what: what.into(),
        path: path.display().to_string(),
        source,
    })
}

fn sha(parts: &[&[u8]]) -> Digest {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Checks what the config's types cannot; the own domain.
pub fn check(config: &GatewayConfig) -> Result<CcfId, LoadError> {
    let invalid = LoadError::Invalid;
    let ccf_id = CcfId::new(config.ccf_id.clone()).map_err(|e| invalid(format!("ccf_id: {e}")))?;
    config.limits.validate().map_err(invalid)?;
    if config.outbound.fetch_rate_per_sec == 0 || config.outbound.fetch_burst == 0 {
        return Err(invalid(
            "outbound.fetch_rate_per_sec and outbound.fetch_burst must be at least 1".into(),
        ));
    }
    let rv = &config.revocation;
    if rv.initial_backoff_ms == 0 || rv.max_backoff_ms < rv.initial_backoff_ms {
        return Err(invalid(
            "revocation.initial_backoff_ms must be at least 1 and at most revocation.max_backoff_ms"
                .into(),
        ));
    }
    if rv.max_key_validity_secs == 0 {
        return Err(invalid(
            "revocation.max_key_validity_secs must be at least 1".into(),
        ));
    }
    if config.partners.is_empty() {
        return Err(invalid("configure at least one [[partner]]".into()));
    }
    if config.tls.interconnect_cert.is_some() != config.tls.interconnect_key.is_some() {
        return Err(invalid(
            "tls.interconnect_cert and tls.interconnect_key are set together or not at all".into(),
        ));
    }
    Ok(ccf_id)
}

/// An identity of the gateway: the certificate must name `capif://<own>/gateway`.
fn identity(
    what: &'static str,
    own: &CcfId,
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, LoadError> {
    let ck = certified_key(chain_pem, key_pem)
        .map_err(|source| LoadError::Credential { what, source })?;
    let named = ck
        .end_entity_cert()
        .ok()
        .and_then(|c| PeerIdentity::from_certificate(c).ok());
    let expected = PeerIdentity::new(own.clone(), Role::Gateway);
    if named.as_ref() != Some(&expected) {
        return Err(LoadError::Invalid(format!(
            "{what}: the certificate must name {expected}, it names {}",
            named.map_or_else(|| "no capif:// identity".to_string(), |n| n.to_string())
        )));
    }
    Ok(ck)
}

/// Reads and checks every file `config` names. Nothing is applied: the caller decides.
pub fn load(config: GatewayConfig) -> Result<Loaded, LoadError> {
    let ccf_id = check(&config)?;
    let t = &config.tls;
    let own_ca_pem = read("tls.ca_cert", &t.ca_cert)?;
    let cert_pem = read("tls.cert", &t.cert)?;
    let key_pem = zeroize::Zeroizing::new(read("tls.key", &t.key)?);
    let own = identity(
        "tls.cert/tls.key",
        &ccf_id,
        &format!("{cert_pem}{own_ca_pem}"),
        &key_pem,
    )?;
    let (interconnect, ic_digest) = match (&t.interconnect_cert, &t.interconnect_key) {
        (Some(c), Some(k)) => {
            let ic_cert = read("tls.interconnect_cert", c)?;
            let ic_key = zeroize::Zeroizing::new(read("tls.interconnect_key", k)?);
            let ck = identity(
                "tls.interconnect_cert/tls.interconnect_key",
                &ccf_id,
                &ic_cert,
                &ic_key,
            )?;
            (ck, sha(&[ic_cert.as_bytes(), ic_key.as_bytes()]))
        }
        _ => (own.clone(), Digest::default()),
    };
    let mut digests = Digests {
        own_ca: sha(&[own_ca_pem.as_bytes()]),
        own: sha(&[cert_pem.as_bytes(), key_pem.as_bytes(), &ic_digest]),
        partners: BTreeMap::new(),
    };
    let mut partners = Vec::new();
    for p in &config.partners {
        let id = CcfId::new(p.ccf_id.clone())
            .map_err(|e| LoadError::Invalid(format!("partner {:?}: {e}", p.ccf_id)))?;
        if id == ccf_id {
            return Err(LoadError::Invalid(format!(
                "{id} cannot be its own partner"
            )));
        }
        let what = format!("partner {id}: ca_cert");
        let ca = read(&what, &p.ca_cert)?;
        let pem_error = |what: String, path: &Path| {
            let path = path.display().to_string();
            move |source| LoadError::Pem { what, path, source }
        };
        let mut trust = PartnerTrust::new(id.clone(), &ca).map_err(pem_error(what, &p.ca_cert))?;
        let mut invoker_ca = String::new();
        if let Some(path) = &p.invoker_ca_cert {
            let what = format!("partner {id}: invoker_ca_cert");
            invoker_ca = read(&what, path)?;
            trust = trust
                .with_invoker_cas(&invoker_ca)
                .map_err(pem_error(what, path))?;
        }
        let address = p.address.clone().unwrap_or_default();
        let d = sha(&[ca.as_bytes(), invoker_ca.as_bytes(), address.as_bytes()]);
        if digests.partners.insert(id.clone(), d).is_some() {
            return Err(LoadError::Invalid(format!(
                "partner {id} is configured twice"
            )));
        }
        partners.push(LoadedPartner {
            trust,
            address: p.address.clone(),
        });
    }
    Ok(Loaded {
        config,
        ccf_id,
        own_ca_pem,
        own,
        interconnect,
        partners,
        digests,
    })
}

/// What a reload changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Partners added.
    pub added: Vec<CcfId>,
    /// Partners removed.
    pub removed: Vec<CcfId>,
    /// Partners whose CA bundle, invoker CA bundle or address changed.
    pub changed: Vec<CcfId>,
    /// Partners kept as they are (trust, link, connection).
    pub unchanged: Vec<CcfId>,
    /// The own certificate or key (or the interconnect one) changed.
    pub own_certificate_renewed: bool,
    /// Settings that changed but take effect only at the next start.
    pub needs_restart: Vec<&'static str>,
}

impl ReloadPlan {
    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && !self.own_certificate_renewed
            && self.needs_restart.is_empty()
    }
}

/// What changes from the running configuration (`old`, whose files held `old_d`) to `new`.
pub fn diff(
    old: &GatewayConfig,
    old_d: &Digests,
    new: &GatewayConfig,
    new_d: &Digests,
) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    for (id, d) in &new_d.partners {
        match old_d.partners.get(id) {
            None => plan.added.push(id.clone()),
            Some(o) if o == d => plan.unchanged.push(id.clone()),
            Some(_) => plan.changed.push(id.clone()),
        }
    }
    plan.removed = old_d
        .partners
        .keys()
        .filter(|id| !new_d.partners.contains_key(*id))
        .cloned()
        .collect();
    let fixed: [(&'static str, bool); 12] = [
        ("ccf_id", old.ccf_id != new.ccf_id),
        ("listen", old.listen != new.listen),
        (
            "tls.ca_cert",
            old.tls.ca_cert != new.tls.ca_cert || old_d.own_ca != new_d.own_ca,
        ),
        ("ccf", old.ccf != new.ccf),
        ("dns", old.dns != new.dns),
        ("cache", old.cache != new.cache),
        ("outbound", old.outbound != new.outbound),
        ("limits", old.limits != new.limits),
        ("reload", old.reload != new.reload),
        ("metrics", old.metrics != new.metrics),
        ("telemetry", old.telemetry != new.telemetry),
        ("store", old.store != new.store),
    ];
    plan.needs_restart = fixed.iter().filter(|(_, c)| *c).map(|(n, _)| *n).collect();
    let renewed = old_d.own != new_d.own;
    if renewed && old.ccf_id != new.ccf_id {
        // A certificate of another domain cannot serve this running one.
        plan.needs_restart.push("tls.cert");
    } else {
        plan.own_certificate_renewed = renewed;
    }
    plan
}

/// The configuration a gateway runs with, and how it reloads.
pub struct ReloadControl {
    source: Option<ConfigSource>,
    running: tokio::sync::Mutex<(GatewayConfig, Digests)>,
    seen: parking_lot::Mutex<Digest>,
    own: Arc<CertSlot>,
    interconnect: Arc<CertSlot>,
    links: LinkFactory,
    /// Reloads applied since start.
    pub reloads: AtomicU64,
    /// Reloads refused since start.
    pub refused: AtomicU64,
    last_error: parking_lot::Mutex<String>,
}

impl std::fmt::Debug for ReloadControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ReloadControl({:?})",
            self.source.as_ref().map(|s| &s.path)
        )
    }
}

impl ReloadControl {
    /// For a gateway started with `loaded` (its files were read from `source`, when one), its
    /// identities in `own` and `interconnect`, building partner links with `links`.
    pub fn new(
        source: Option<ConfigSource>,
        loaded: &Loaded,
        own: Arc<CertSlot>,
        interconnect: Arc<CertSlot>,
        links: LinkFactory,
    ) -> Self {
        let seen = source.as_ref().map(|s| s.fingerprint()).unwrap_or_default();
        Self {
            source,
            running: tokio::sync::Mutex::new((loaded.config.clone(), loaded.digests.clone())),
            seen: parking_lot::Mutex::new(seen),
            own,
            interconnect,
            links,
            reloads: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            last_error: Default::default(),
        }
    }

    /// Why the last reload was refused; empty once one is applied.
    pub fn last_error(&self) -> String {
        self.last_error.lock().clone()
    }

    /// The poll interval of the running configuration, if it polls and has a file.
    fn poll_interval(&self, config: &GatewayConfig) -> Option<Duration> {
        let ms = config.reload.poll_interval_ms;
        (self.source.is_some() && ms > 0).then(|| Duration::from_millis(ms))
    }

    /// The links and trust of `loaded` against the `old` snapshot: unchanged partners keep
    /// theirs. Fallible, so nothing is swapped before everything is built.
    fn partners(
        &self,
        old: &Partners,
        loaded: Vec<LoadedPartner>,
        plan: &ReloadPlan,
    ) -> Result<Partners, LoadError> {
        let mut entries = Vec::with_capacity(loaded.len());
        for p in loaded {
            let id = p.trust.ccf_id.clone();
            if plan.unchanged.contains(&id)
                && let (Some(t), Some(l)) = (old.trust(&id), old.link(&id))
            {
                entries.push((t.clone(), l.clone()));
                continue;
            }
            let link = self
                .links
                .link(&p.trust, p.address, old.link(&id).map(|l| &**l))
                .map_err(|source| LoadError::Pem {
                    what: format!("partner {id}: TLS client"),
                    path: String::new(),
                    source,
                })?;
            entries.push((Arc::new(p.trust), Arc::new(link)));
        }
        Ok(Partners::new(entries))
    }
}

/// Re-reads the configuration file and applies it, or refuses it as a whole (the running
/// configuration stays; the refusal is logged and counted). `trigger` names the caller in logs.
/// One reload at a time.
pub async fn reload(state: &GatewayState, trigger: &'static str) -> Result<ReloadPlan, LoadError> {
    let ctl = &state.reload;
    let mut running = ctl.running.lock().await;
    let result = match &ctl.source {
        None => Err(LoadError::NoFile),
        Some(source) => {
            *ctl.seen.lock() = source.fingerprint();
            source.read().and_then(load)
        }
    };
    let applied = match result {
        Ok(loaded) => apply(state, &mut running, loaded).await,
        Err(e) => Err(e),
    };
    match &applied {
        Ok(plan) => {
            ctl.reloads.fetch_add(1, Ordering::Relaxed);
            ctl.last_error.lock().clear();
            tracing::info!(
                trigger,
                added = ?plan.added, removed = ?plan.removed, changed = ?plan.changed,
                own_certificate_renewed = plan.own_certificate_renewed,
                "configuration reloaded"
            );
            if !plan.needs_restart.is_empty() {
                tracing::warn!(trigger, settings = ?plan.needs_restart, "changed settings take effect only at the next start");
            }
        }
        Err(e) => {
            ctl.refused.fetch_add(1, Ordering::Relaxed);
            let why = ccf_core::grpc::error_chain(e);
            tracing::error!(trigger, error = %why, "configuration reload refused; the running configuration stays");
            *ctl.last_error.lock() = why;
        }
    }
    applied
}

async fn apply(
    state: &GatewayState,
    running: &mut (GatewayConfig, Digests),
    loaded: Loaded,
) -> Result<ReloadPlan, LoadError> {
    let ctl = &state.reload;
    let plan = diff(&running.0, &running.1, &loaded.config, &loaded.digests);
    let old = state.partners();
    let partners = ctl.partners(&old, loaded.partners, &plan)?;
    // Everything is built: from here on nothing fails. Certificates first, so that a new link
    // already presents the renewed interconnect certificate.
    if plan.own_certificate_renewed {
        ctl.own.replace(loaded.own);
        ctl.interconnect.replace(loaded.interconnect);
    }
    state.live.replace(partners);
    drop(old);
    for id in &plan.removed {
        let evicted = state.cache.evict_where(|k| k.home() == id).await;
        let dropped = state.outbox.remove_partner(&state.store, id).await;
        tracing::info!(partner = %id, evicted, dropped, "partner removed; its cache entries evicted");
    }
    for id in &plan.added {
        state.outbox.add_partner(id);
    }
    let keep_digests = if plan.needs_restart.contains(&"tls.cert") {
        // Not applied: compare the next reload with what runs.
        Digests {
            own: running.1.own,
            ..loaded.digests
        }
    } else {
        loaded.digests
    };
    *running = (loaded.config, keep_digests);
    Ok(plan)
}

/// Polls the configuration's files every `[reload] poll_interval_ms` and reloads when their
/// hash changed since the last reload (of any trigger). A refused change is not retried until
/// the files change again.
pub fn spawn_poll(
    state: Arc<GatewayState>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let interval = {
        let running = state.reload.running.try_lock().ok()?;
        state.reload.poll_interval(&running.0)?
    };
    Some(tokio::spawn(async move {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => return Ok(()),
                _ = tokio::time::sleep(interval) => {}
            }
            let Some(source) = state.reload.source.clone() else {
                return Ok(());
            };
            let now = tokio::task::spawn_blocking(move || source.fingerprint())
                .await
                .unwrap_or_default();
            if now != *state.reload.seen.lock() {
                let _ = reload(&state, "file change").await;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(partners: &[(&str, &str)]) -> GatewayConfig {
        let mut t = String::from(
            "ccf_id = \"operator-a.test\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"gw.pem\"\nkey = \"gw.key\"\n[ccf]\naddress = \"127.0.0.1:1\"\n",
        );
        for (id, ca) in partners {
            t += &format!("[[partner]]\nccf_id = \"{id}\"\nca_cert = \"{ca}\"\n");
        }
        GatewayConfig::parse(&t, "test").unwrap()
    }

    fn digests(partners: &[(&str, u8)], own: u8) -> Digests {
        Digests {
            own_ca: [9; 32],
            own: [own; 32],
            partners: partners
                .iter()
                .map(|(id, d)| (CcfId::new(*id).unwrap(), [*d; 32]))
                .collect(),
        }
    }

    fn ids(v: &[&str]) -> Vec<CcfId> {
        v.iter().map(|i| CcfId::new(*i).unwrap()).collect()
    }

    #[test]
    fn diff_sorts_partners_and_lists_what_needs_a_restart() {
        let (b, c, d, e) = (
            "operator-b.test",
            "operator-c.test",
            "operator-d.test",
            "operator-e.test",
        );
        let old = config(&[(b, "b.pem"), (c, "c.pem"), (d, "d.pem")]);
        let old_d = digests(&[(b, 1), (c, 2), (d, 3)], 7);
        // b unchanged, c's bundle changed, d removed, e added; own certificate renewed.
        let new = config(&[(b, "b.pem"), (c, "c.pem"), (e, "e.pem")]);
        let new_d = digests(&[(b, 1), (c, 20), (e, 4)], 8);
        let plan = diff(&old, &old_d, &new, &new_d);
        assert_eq!(plan.unchanged, ids(&[b]));
        assert_eq!(plan.changed, ids(&[c]));
        assert_eq!(plan.removed, ids(&[d]));
        assert_eq!(plan.added, ids(&[e]));
        assert!(plan.own_certificate_renewed);
        assert!(plan.needs_restart.is_empty(), "{:?}", plan.needs_restart);

        // The same files: nothing to do.
        assert!(diff(&old, &old_d, &old, &old_d).is_empty());

        // Settings that cannot change live are listed, and partners still apply.
        let mut fixed = config(&[(b, "b.pem")]);
        fixed.listen.capif6 = "127.0.0.1:1".into();
        fixed.cache.max_ttl_secs = 1;
        fixed.outbound.max_retries = 0;
        fixed.ccf.address = "127.0.0.1:2".into();
        fixed.reload.poll_interval_ms = 0;
        let mut fixed_d = digests(&[(b, 1)], 7);
        fixed_d.own_ca = [10; 32];
        let plan = diff(&old, &old_d, &fixed, &fixed_d);
        assert_eq!(
            plan.needs_restart,
            vec![
                "listen",
                "tls.ca_cert",
                "ccf",
                "cache",
                "outbound",
                "reload"
            ]
        );
        assert_eq!(plan.removed, ids(&[c, d]));
        assert!(!plan.own_certificate_renewed);

        // Another domain: its certificate is not applied to this running one.
        let mut other = config(&[(b, "b.pem")]);
        other.ccf_id = "operator-z.test".into();
        let plan = diff(&old, &old_d, &other, &digests(&[(b, 1)], 8));
        assert_eq!(plan.needs_restart, vec!["ccf_id", "tls.cert"]);
        assert!(!plan.own_certificate_renewed);
    }

    #[test]
    fn a_partner_without_its_ca_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&[("operator-b.test", "missing.pem")]);
        c.partners[0].ca_cert = dir.path().join("missing.pem");
        // The own files are checked first; point them at a real identity.
        let a = CcfId::new("operator-a.test").unwrap();
        let ca = ccf_core::pki::DomainCa::generate(&a).unwrap();
        let cred = ca
            .issue_with_new_key(&PeerIdentity::new(a, Role::Gateway), &[], 1)
            .unwrap();
        for (name, text) in [
            ("ca.pem", ca.cert_pem()),
            ("gw.pem", cred.cert_pem.as_str()),
            ("gw.key", cred.key_pem.as_str()),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        c.tls.ca_cert = dir.path().join("ca.pem");
        c.tls.cert = dir.path().join("gw.pem");
        c.tls.key = dir.path().join("gw.key");
        let e = load(c.clone()).err().unwrap().to_string();
        assert!(
            e.contains("partner operator-b.test: ca_cert") && e.contains("missing.pem"),
            "{e}"
        );
        // A file that is not PEM names the setting and the file too.
        std::fs::write(dir.path().join("missing.pem"), "not a certificate").unwrap();
        let e = load(c.clone()).err().unwrap().to_string();
        assert!(
            e.contains("partner operator-b.test: ca_cert") && e.contains("missing.pem"),
            "{e}"
        );
        // A key that is not the certificate's is refused.
        let other = ca
            .issue_with_new_key(
                &PeerIdentity::new(CcfId::new("operator-a.test").unwrap(), Role::Gateway),
                &[],
                1,
            )
            .unwrap();
        std::fs::write(dir.path().join("gw.key"), other.key_pem.as_str()).unwrap();
        std::fs::write(dir.path().join("missing.pem"), ca.cert_pem()).unwrap();
        let e = load(c).err().unwrap().to_string();
        assert!(e.contains("does not match"), "{e}");
    }
}
