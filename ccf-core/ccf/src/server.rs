//! Starting a CCF: validate the config, open the store, load or generate the domain CA, issue the
//! CCF's own server certificate, and serve the two listeners (onboarding with server-auth TLS;
//! CAPIF-1e/3/6 with mutual TLS), each with health and reflection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capif_proto::v1::{
    RevocationKind, RevocationNotice, aef_security_client::AefSecurityClient,
    ccf_admin_server::CcfAdminServer, federation_server::FederationServer,
    gateway_client::GatewayClient, invoker_management_server::InvokerManagementServer,
    security_server::SecurityServer,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::config::CcfConfig;
use crate::service::{
    CcfAdminService, FederationService, InvokerManagementService, SecurityService,
};
use crate::store::{SecurityContext, Store, StoreError};
use ccf_core::grpc::{ServerTasks, service_name, spawn_server, with_standard_services};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::CcfId;
use ccf_core::kdf::Capif1eProfile;
use ccf_core::limits::ConnGate;
use ccf_core::metrics::ListenerMetrics;
use ccf_core::pki::DomainCa;
use ccf_core::registry::AefRegistry;
use ccf_core::telemetry::{NoticeTraces, TracedChannel};
use ccf_core::tls::{ClientAuth, ExpectedPeer, certs_from_pem, server_config};
use tracing::Instrument as _;

pub use ccf_core::clock::now_ms;

/// Why a CCF could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The state store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The PKI.
    #[error(transparent)]
    Pki(#[from] ccf_core::pki::PkiError),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] ccf_core::tls::TlsError),
    /// TLS material of the TLS 1.2 CAPIF-1e listener.
    #[error(transparent)]
    Tls12(#[from] ccf_core::tls12::Tls12Error),
    /// A listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The token signing keys.
    #[error(transparent)]
    Token(#[from] ccf_core::token::TokenError),
    /// The state store file can be read or written by users other than the CCF's. It is refused,
    /// not fixed: the AEFPSKs in it may already have been read.
    #[error(
        "refusing to start: the state store {} has mode {mode:04o}, so other users can read the \
         AEFPSKs in it. Find out who could have read it, then fix with `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    StoreExposed {
        /// The store file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The state directory is open to other users and the CCF may not tighten it itself.
    #[error(
        "refusing to start: the state directory {} has mode {mode:04o} and {why}. Check the \
         files in it, then fix with `chmod 700 {}`",
        .path.display(),
        .path.display()
    )]
    StateDirExposed {
        /// The directory.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Why it was not tightened.
        why: String,
    },
    /// The state directory cannot be created or inspected.
    #[error("state directory {}: {source}", .path.display())]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Other I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Everything the CCF's services share.
pub struct CcfState {
    /// This domain.
    pub ccf_id: CcfId,
    /// The domain CA.
    pub ca: DomainCa,
    /// The acknowledged state.
    pub store: Store,
    /// The AEF registry.
    pub registry: AefRegistry,
    /// Validity given to new security contexts.
    pub context_validity: Duration,
    /// How long an invoker of another domain revoked here stays refused at this domain's AEFs.
    pub foreign_revocation: Duration,
    /// Validity of issued certificates, days.
    pub cert_validity_days: i64,
    credential_digests: Vec<String>,
    /// Requests answered for partner domains (through the gateway), for inspection and tests.
    pub partner_requests: std::sync::atomic::AtomicU64,
    /// AefSecurity clients of this domain's AEFs that have a security endpoint.
    pub aefs: std::collections::BTreeMap<ccf_core::ids::AefId, AefSecurityClient<TracedChannel>>,
    /// CAPIF-6 client of this domain's gateway, when one is configured.
    pub gateway: Option<GatewayClient<TracedChannel>>,
    /// Method 3: the access-token signing keys.
    pub token_keys: ccf_core::token::TokenKeys,
    /// Method 3: lifetime of issued tokens.
    pub token_lifetime: Duration,
    /// Method 3: the refresh interval advertised with the key set.
    pub key_set_refresh_secs: u64,
    /// Wakes the revocation outbox's worker (a notice was queued).
    pub revocation_queued: tokio::sync::Notify,
    /// Revocation notices the gateway acknowledged.
    pub revocations_delivered: std::sync::atomic::AtomicU64,
    /// The domain's CAPIF-1e profile: AEFPSKs are derived only from sessions of this profile.
    pub capif1e: Capif1eProfile,
    /// The event counters of `/metrics`.
    pub metrics: crate::metrics::CcfMetrics,
    /// Audit lines of security information handed to partners, written off the request path.
    pub audit: ccf_core::audit::AuditLog<crate::service::HandedToPartner>,
}

impl std::fmt::Debug for CcfState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CcfState({})", self.ccf_id)
    }
}

/// SHA-256 of an onboarding credential, hex: what the store remembers of used credentials.
pub fn credential_digest(credential: &str) -> String {
    hex::encode(Sha256::digest(credential.as_bytes()))
}

impl CcfState {
    /// Whether `digest` belongs to a configured onboarding credential.
    pub fn credential_configured(&self, digest: &str) -> bool {
        self.credential_digests.iter().any(|d| d == digest)
    }

    /// `base` as a notice of its own: a fresh `notice_id`, and `not_after_unix_ms` the latest
    /// expiry among `concerned` (the contexts it revokes), else now plus the context validity.
    pub fn revocation_notice(
        &self,
        base: RevocationNotice,
        concerned: &[SecurityContext],
    ) -> RevocationNotice {
        let not_after = concerned
            .iter()
            .map(|c| c.expires_at_ms)
            .max()
            .unwrap_or_else(|| now_ms() + self.context_validity.as_millis() as u64);
        RevocationNotice {
            notice_id: ccf_core::delivery::NoticeId::random().to_string(),
            not_after_unix_ms: not_after,
            ..base
        }
    }

    /// What of `notice` goes into the revocation outbox: the notice when a gateway is
    /// configured, nothing otherwise (no partner can hold keys then).
    pub fn to_queue(&self, notice: &RevocationNotice) -> Vec<RevocationNotice> {
        if self.gateway.is_some() {
            vec![notice.clone()]
        } else {
            Vec::new()
        }
    }

    /// Hands a committed revocation of one of this domain's invokers on: to the affected AEFs
    /// of this domain (in the background), and to the gateway through the revocation outbox,
    /// where the store put the notice in the transaction that revoked (its worker is woken).
    pub fn publish_revocation(&self, notice: RevocationNotice, affected: &[ccf_core::ids::AefId]) {
        let affected = Some(affected);
        tracing::info!(
            api_invoker_id = %notice.api_invoker_id,
            aefs = ?notice.aef_ids,
            kind = ?notice.kind(),
            key_id = %notice.key_id,
            notice_id = %notice.notice_id,
            "security contexts revoked"
        );
        self.metrics.revocation_published(notice.kind);
        self.revoke_at_aefs(&notice, affected);
        NoticeTraces::global().remember(&self.trace_component(), &notice.notice_id);
        self.revocation_queued.notify_one();
    }

    /// The name under which this CCF remembers the traces of the notices it queues.
    fn trace_component(&self) -> String {
        format!("{}/ccf", self.ccf_id)
    }

    /// Tells this domain's AEFs among `affected` (all of them when `None`) to drop the invoker's
    /// key and close its connections. A replaced key is not pushed: the AEF notices the new key
    /// id at the invoker's next Authentication Initiation.
    pub fn revoke_at_aefs(
        &self,
        notice: &RevocationNotice,
        affected: Option<&[ccf_core::ids::AefId]>,
    ) {
        if notice.kind() == RevocationKind::KeyReplacedByNewer {
            return;
        }
        for (aef, client) in &self.aefs {
            if affected.is_some_and(|a| !a.contains(aef)) {
                continue;
            }
            let mut client = client.clone();
            let aef = aef.clone();
            let req = capif_proto::v1::RevokeAuthorizationReq {
                revoke_info: Some(capif_proto::v1::SecurityNotification {
                    api_invoker_id: notice.api_invoker_id.clone(),
                    aef_id: aef.to_string(),
                    api_ids: Vec::new(),
                    cause: notice.cause,
                    access_token: String::new(),
                    home_ccf_id: notice.home_ccf_id.clone(),
                }),
                supported_features: String::new(),
            };
            // In the trace of the request that revoked, though it ends after the answer.
            tokio::spawn(
                async move {
                    let mut r = tonic::Request::new(req);
                    r.set_timeout(Duration::from_secs(3));
                    if let Err(e) = client.revoke_authorization(r).await {
                        tracing::warn!(%aef, error = %e.message(), "could not tell the AEF of a revocation");
                    }
                }
                .in_current_span(),
            );
        }
    }
}

impl CcfState {
    /// This domain's published token keys. With a shared store the set is read again first, so
    /// a key another replica just rotated in is published here too (a verifier that met its key
    /// id asks at most once a second); if the store cannot be read, the set held is published.
    pub async fn own_key_set(&self) -> capif_proto::v1::TokenKeySet {
        if let Err(e) = self.store.refresh_token_keys(&self.token_keys).await {
            tracing::warn!(error = %e, "could not read the token signing keys again; publishing those held");
        }
        self.token_keys
            .key_set(self.ccf_id.as_str(), self.key_set_refresh_secs, now_ms())
    }
}

/// How often a CCF on a shared store reads the token signing keys again, so that it signs with
/// the key another replica made current. Until then it signs with the previous key, which stays
/// published: its tokens verify either way.
const TOKEN_KEY_REFRESH: Duration = Duration::from_secs(1);

/// Reads the shared token signing keys every [`TOKEN_KEY_REFRESH`] until `stop` (PostgreSQL
/// store only: with redb this process holds the only copy).
fn spawn_token_key_refresh(
    state: Arc<CcfState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    spawn_ticking(Duration::ZERO, TOKEN_KEY_REFRESH, stop, move || {
        let state = state.clone();
        async move {
            if let Err(e) = state.store.refresh_token_keys(&state.token_keys).await {
                tracing::warn!(error = %e, "could not read the token signing keys again");
            }
        }
    })
}

/// Runs `tick` after `first`, then every `every` (a late tick is delayed, not doubled), until
/// `stop`: the CCF's periodic chores.
fn spawn_ticking<F, Fut>(
    first: Duration,
    every: Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    mut tick: F,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = ticks.tick() => {}
            }
            tick().await;
        }
    })
}

/// A running CCF.
pub struct RunningCcf {
    /// Shared state (tests inspect the store through it).
    pub state: Arc<CcfState>,
    /// Bound onboarding address.
    pub onboarding_addr: SocketAddr,
    /// Bound CAPIF-1e/3/6 address.
    pub capif_addr: SocketAddr,
    /// Where invokers run CAPIF-1e: `capif_addr` with `tls13-exporter`, the TLS 1.2 listener
    /// with `tls12-annex-a`.
    pub capif1e_addr: SocketAddr,
    /// Bound `/metrics` address, when `[metrics] listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// What `/metrics` serves (tests read it without the listener).
    pub metrics: Arc<ccf_core::metrics::Registry>,
    tasks: ServerTasks,
}

impl RunningCcf {
    /// The domain CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.state.ca.cert_pem()
    }

    /// Stops both listeners and waits for them.
    pub async fn shutdown(self) {
        self.tasks.shutdown().await;
    }
}

/// The store's file name in the state directory.
pub const STORE_FILE: &str = "ccf.redb";

/// Everything the CCF itself writes into its state directory. A directory that holds nothing
/// else is the CCF's own, so the CCF may tighten its mode.
const STATE_FILES: &[&str] = &[
    "ca.pem",
    "ca.key",
    STORE_FILE,
    "token-signing-keys.json",
    "token-signing-keys.json.tmp",
];

/// Creates the state directory owner-only (0700), or checks an existing one. An existing
/// directory open to group or others is tightened to owner-only when that is safe: nobody else
/// could write in it (else its files may have been replaced: refused), it holds only the CCF's
/// own files (else it is not the CCF's alone: refused), and the CCF may change its mode.
/// Tightening rather than refusing, because `mkdir` and `ccf pki issue` before the first start
/// leave it 0755, and a listable directory exposes no secret while its files are 0600.
fn prepare_state_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| StartError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    ccf_core::pki::create_private_dir(dir).map_err(io)?;
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let refuse = |why: String| StartError::StateDirExposed {
        path: dir.to_path_buf(),
        mode,
        why,
    };
    if mode & 0o022 != 0 {
        return Err(refuse(
            "other users can write in it, so its files may have been replaced".into(),
        ));
    }
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        if !STATE_FILES.iter().any(|f| name == *f) {
            return Err(refuse(format!(
                "it holds {}, which the CCF did not write, so it is not the CCF's to tighten",
                name.to_string_lossy()
            )));
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & !0o077))
        .map_err(|e| refuse(format!("the CCF cannot tighten it ({e})")))?;
    tracing::warn!(
        path = %dir.display(),
        mode = format!("{mode:04o}"),
        "the state directory was open to other users; its mode is now owner-only"
    );
    Ok(())
}

/// Deletes the security contexts that have been expired for at least `grace` (so that an AEF
/// asking shortly after the expiry still gets `KEY_EXPIRED`), in one write transaction, and logs
/// how many. Returns that number.
pub async fn purge_expired(store: &Store, grace: Duration) -> Result<u64, StoreError> {
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let purged = store
        .purge_expired(now_ms().saturating_sub(grace_ms))
        .await?;
    if purged > 0 {
        tracing::info!(purged, "purged expired security contexts from the store");
    } else {
        tracing::debug!("no expired security context to purge");
    }
    Ok(purged)
}

/// Purges expired contexts every `every` until `stop`. The purge at start ran already.
fn spawn_purge(
    state: Arc<CcfState>,
    every: Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    spawn_ticking(every, every, stop, move || {
        let state = state.clone();
        async move {
            // The store keeps a redb purge's durable commit off the runtime's workers.
            if let Err(e) = purge_expired(&state.store, every).await {
                tracing::warn!(error = %e, "purging expired security contexts failed")
            }
        }
    })
}

/// How often an idle outbox worker reads a shared (PostgreSQL) outbox, for notices queued by a
/// replica that stopped before delivering them (the gateway's outbox does the same).
const SHARED_OUTBOX_POLL: Duration = Duration::from_secs(2);

/// Upper bounds of the revocation outbox's first and longest waits (the gateway's defaults).
const OUTBOX_BACKOFF: ccf_core::delivery::Backoff = ccf_core::delivery::Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_millis(1500),
};

/// Delivers the revocation outbox to the gateway until `stop`: each notice until the gateway
/// acknowledges it (it is then queued there durably) or its `not_after_unix_ms` passed. Reads
/// the store, so what a previous run queued goes first.
fn spawn_revocation_outbox(
    state: Arc<CcfState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    tokio::spawn(async move {
        tokio::select! {
            _ = stop => {}
            _ = revocation_outbox(&state) => {}
        }
        Ok(())
    })
}

async fn revocation_outbox(state: &CcfState) {
    use std::sync::atomic::Ordering;
    let Some(gw) = state.gateway.clone() else {
        return;
    };
    let mut failures = 0u32;
    loop {
        let queued = state.store.revocation_outbox().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the revocation outbox");
            Vec::new()
        });
        let mut next: Option<u64> = None;
        // Once a delivery failed, the gateway is down: the rest wait for the same retry.
        let mut blocked: Option<u64> = None;
        for mut q in queued {
            let n = &q.notice;
            let now = now_ms();
            if n.not_after_unix_ms <= now {
                let _ = state.store.revocation_done(&n.notice_id).await;
                tracing::warn!(notice_id = %n.notice_id, api_invoker_id = %n.api_invoker_id, attempts = q.attempts, "revocation notice given up: the keys it concerns have expired");
                continue;
            }
            if let Some(until) = blocked {
                next = Some(next.map_or(until, |t| t.min(until)));
                continue;
            }
            if q.next_attempt_at_ms > now {
                next = Some(next.map_or(q.next_attempt_at_ms, |t| t.min(q.next_attempt_at_ms)));
                continue;
            }
            let mut r = tonic::Request::new(n.clone());
            r.set_timeout(Duration::from_secs(3));
            let span = tracing::info_span!(parent: None, "capif.revocation.deliver", destination = "gateway", notice_id = %n.notice_id);
            NoticeTraces::global().continue_in(&span, &state.trace_component(), &n.notice_id);
            match gw.clone().publish_revocation(r).instrument(span).await {
                Ok(ack) => {
                    failures = 0;
                    if let Err(e) = state.store.revocation_done(&n.notice_id).await {
                        tracing::warn!(error = %e, "could not delete an acknowledged notice; it will be sent again");
                    }
                    state.revocations_delivered.fetch_add(1, Ordering::Relaxed);
                    let ack = ack.into_inner();
                    tracing::info!(notice_id = %n.notice_id, partners = ack.forwarded, duplicate = ack.duplicate, "revocation notice queued at the gateway");
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    let _ = state.store.revocation_done(&n.notice_id).await;
                    tracing::warn!(notice_id = %n.notice_id, error = %s.message(), "the gateway refused a revocation notice; dropped");
                }
                Err(s) => {
                    failures = failures.saturating_add(1);
                    q.attempts = q.attempts.saturating_add(1);
                    let wait = OUTBOX_BACKOFF.delay(failures).as_millis() as u64;
                    q.next_attempt_at_ms = now_ms() + wait;
                    let _ = state.store.revocation_reschedule(&q).await;
                    tracing::info!(notice_id = %q.notice.notice_id, attempts = q.attempts, wait_ms = wait, error = %s.message(), "revocation notice not delivered to the gateway; will retry");
                    next = Some(next.map_or(q.next_attempt_at_ms, |t| t.min(q.next_attempt_at_ms)));
                    blocked = Some(q.next_attempt_at_ms);
                }
            }
        }
        // Idle, a worker sleeps until its own CCF queues a notice. With a shared store, another
        // replica may have queued one and died before delivering it: look again every
        // `SHARED_OUTBOX_POLL` (several replicas may then send one notice; the gateway acts on
        // each `notice_id` once).
        let idle = match state.store.backend() {
            ccf_core::pg::StoreBackend::Postgres => SHARED_OUTBOX_POLL,
            ccf_core::pg::StoreBackend::Redb => Duration::from_secs(3600),
        };
        let wait = next.map_or(idle, |at| {
            Duration::from_millis(at.saturating_sub(now_ms())).min(idle)
        });
        tokio::select! {
            _ = state.revocation_queued.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Starts a CCF from its configuration.
pub async fn start(config: CcfConfig) -> Result<RunningCcf, StartError> {
    let (ccf_id, registry, purge_every) = validate_config(&config)?;
    let (ca, store, token_keys) = open_state(&config, &ccf_id, purge_every).await?;
    // A fresh server certificate at every start: nothing to rotate, nothing stale on disk.
    let own = ca.issue_with_new_key(
        &PeerIdentity::new(ccf_id.clone(), Role::Ccf),
        &config.pki.server_names,
        config.pki.cert_validity_days,
    )?;
    let chain = format!("{}{}", own.cert_pem, ca.cert_pem());
    let roots = certs_from_pem("CA certificate", ca.cert_pem())?;
    let onboarding_tls = server_config(&chain, &own.key_pem, ClientAuth::None)?;
    let mut capif_tls = server_config(&chain, &own.key_pem, ClientAuth::Required(&roots))?;
    // Key logging covers the listener where CAPIF-1e runs, whichever it is.
    let capif1e_tls = match config.security.capif1e {
        Capif1eProfile::Tls13Exporter => {
            capif_tls = ccf_core::keylog::rustls_server(capif_tls);
            None
        }
        Capif1eProfile::Tls12AnnexA => Some(ccf_core::tls12::server_context(
            &chain,
            &own.key_pem,
            ca.cert_pem(),
        )?),
    };
    let own_identity = (chain.as_str(), own.key_pem.as_str());
    let gateway = gateway_client(&config, &ccf_id, &ca, own_identity)?;
    let aefs = aef_clients(&config, &ccf_id, &registry, &ca, own_identity)?;
    let state = Arc::new(CcfState {
        aefs,
        partner_requests: Default::default(),
        gateway,
        ccf_id,
        ca,
        store,
        token_keys,
        revocation_queued: Default::default(),
        revocations_delivered: Default::default(),
        capif1e: config.security.capif1e,
        metrics: Default::default(),
        audit: ccf_core::audit::AuditLog::spawn(ccf_core::audit::DEFAULT_CAPACITY),
        token_lifetime: Duration::from_secs(config.token.lifetime_secs),
        key_set_refresh_secs: config.token.key_set_refresh_secs,
        registry,
        context_validity: Duration::from_secs(config.security.aef_psk_validity_secs),
        foreign_revocation: Duration::from_secs(config.security.foreign_revocation_secs),
        cert_validity_days: config.pki.cert_validity_days,
        credential_digests: config
            .onboarding
            .credentials
            .iter()
            .map(|c| credential_digest(c.expose()))
            .collect(),
    });
    let (registry, listeners, certs) = crate::metrics::registry(&state);
    let own_der = certs_from_pem("CCF certificate", &own.cert_pem)?;
    for (cert, der) in [("own", own_der.first()), ("domain_ca", roots.first())] {
        if let Some(der) = der {
            certs.set_from_der(cert, "", der);
        }
    }
    let metrics = (Arc::new(registry), listeners);
    serve(
        &config,
        state,
        (onboarding_tls, capif_tls),
        capif1e_tls,
        purge_every,
        metrics,
    )
    .await
}

/// The checks of the configuration that need no state: the CCF id, the AEF registry, the
/// limits, the context validity and the purge interval (returned as a duration).
fn validate_config(config: &CcfConfig) -> Result<(CcfId, AefRegistry, Duration), StartError> {
    let ccf_id = CcfId::new(config.ccf_id.clone())
        .map_err(|e| StartError::Config(format!("ccf_id: {e}")))?;
    let registry = AefRegistry::from_config(&ccf_id, &config.aefs)
        .map_err(|e| StartError::Config(e.to_string()))?;
    config.limits.validate().map_err(StartError::Config)?;
    if config.security.aef_psk_validity_secs == 0 {
        return Err(StartError::Config(
            "security.aef_psk_validity_secs must be at least 1".into(),
        ));
    }
    if !(1..=30 * 86_400).contains(&config.security.foreign_revocation_secs) {
        return Err(StartError::Config(
            "security.foreign_revocation_secs must be between 1 and 2592000 (30 days)".into(),
        ));
    }
    match (config.security.capif1e, &config.listen.capif1e) {
        (Capif1eProfile::Tls12AnnexA, None) => {
            return Err(StartError::Config(
                "security.capif1e = \"tls12-annex-a\" needs listen.capif1e, the address of the \
                 TLS 1.2 CAPIF-1e listener (the capif listener stays TLS 1.3 for AEFs, the \
                 gateway and the operator)"
                    .into(),
            ));
        }
        (Capif1eProfile::Tls13Exporter, Some(_)) => {
            return Err(StartError::Config(
                "listen.capif1e is only used with security.capif1e = \"tls12-annex-a\"; with \
                 tls13-exporter invokers run CAPIF-1e on the capif listener"
                    .into(),
            ));
        }
        _ => {}
    }
    let purge_every = Duration::from_secs(config.security.context_purge_interval_secs);
    if !(1..=86_400).contains(&config.security.context_purge_interval_secs) {
        return Err(StartError::Config(
            "security.context_purge_interval_secs must be between 1 and 86400".into(),
        ));
    }
    Ok((ccf_id, registry, purge_every))
}

/// The state directory and what lives in it: the domain CA, the store (purged of contexts that
/// expired while the CCF was down, before anything is served) and the token signing keys.
async fn open_state(
    config: &CcfConfig,
    ccf_id: &CcfId,
    purge_every: Duration,
) -> Result<(DomainCa, Store, ccf_core::token::TokenKeys), StartError> {
    prepare_state_dir(&config.state_dir)?;
    let ca = DomainCa::load_or_generate(
        ccf_id,
        &config.state_dir,
        config.pki.ca_cert.as_deref(),
        config.pki.ca_key.as_deref(),
    )?;
    // The default is the redb file in the state directory; a PostgreSQL store is migrated here.
    let store = Store::from_config(&config.store, &config.state_dir.join(STORE_FILE))
        .await
        .map_err(|e| match e {
            StoreError::Exposed { path, mode } => StartError::StoreExposed { path, mode },
            e => StartError::Store(e),
        })?;
    // Contexts that expired while the CCF was down go before anything is served.
    purge_expired(&store, purge_every).await?;
    if config.token.lifetime_secs == 0 || config.token.key_set_refresh_secs == 0 {
        return Err(StartError::Config(
            "token.lifetime_secs and token.key_set_refresh_secs must be at least 1".into(),
        ));
    }
    let token_keys = store
        .token_keys(&config.state_dir, config.token.lifetime_secs, now_ms())
        .await?;
    Ok((ca, store, token_keys))
}

/// The CAPIF-6 client of the own domain's gateway, when one is configured. `own_identity` is
/// the CCF's certificate chain and key.
fn gateway_client(
    config: &CcfConfig,
    ccf_id: &CcfId,
    ca: &DomainCa,
    own_identity: (&str, &str),
) -> Result<Option<GatewayClient<TracedChannel>>, StartError> {
    let Some(g) = &config.gateway else {
        return Ok(None);
    };
    // Only the own domain's gateway: any other certificate of this CA that may serve
    // (an AEF's) must not receive revocations and partner queries.
    let tls = ccf_core::tls::client_config(
        ca.cert_pem(),
        Some(own_identity),
        ExpectedPeer::gateway(ccf_id),
    )?;
    let replicas = ccf_core::tls::replica_addresses(&g.address, &g.addresses)?;
    let channel =
        ccf_core::tls::connect_replicas(&replicas, &g.server_name, tls, Duration::from_secs(1))?;
    let channel = TracedChannel::new(channel, replicas.join(","));
    Ok(Some(GatewayClient::new(channel).max_decoding_message_size(
        config.limits.max_message_bytes,
    )))
}

/// AefSecurity clients of this domain's AEFs that have a security endpoint.
fn aef_clients(
    config: &CcfConfig,
    ccf_id: &CcfId,
    registry: &AefRegistry,
    ca: &DomainCa,
    own_identity: (&str, &str),
) -> Result<
    std::collections::BTreeMap<ccf_core::ids::AefId, AefSecurityClient<TracedChannel>>,
    StartError,
> {
    let mut aefs = std::collections::BTreeMap::new();
    for e in registry.iter().filter(|e| &e.ccf_id == ccf_id) {
        if let Some((addr, name)) = &e.security_endpoint {
            // Exactly this AEF: a revocation meant for it must not reach another holder.
            let tls = ccf_core::tls::client_config(
                ca.cert_pem(),
                Some(own_identity),
                ExpectedPeer::aef(ccf_id, &e.aef_id),
            )?;
            let channel = ccf_core::tls::connect_lazy(addr, name, tls, Duration::from_secs(1))?;
            let channel = TracedChannel::new(channel, addr.as_str());
            aefs.insert(
                e.aef_id.clone(),
                AefSecurityClient::new(channel)
                    .max_decoding_message_size(config.limits.max_message_bytes),
            );
        }
    }
    Ok(aefs)
}

/// Binds the listeners and serves them, with the purge task, until the CCF is shut down: the
/// TLS 1.2 CAPIF-1e listener too when `capif1e_tls` is given.
async fn serve(
    config: &CcfConfig,
    state: Arc<CcfState>,
    (onboarding_tls, capif_tls): (Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>),
    capif1e_tls: Option<ccf_core::tls12::SslContext>,
    purge_every: Duration,
    (registry, listeners): (Arc<ccf_core::metrics::Registry>, ListenerMetrics),
) -> Result<RunningCcf, StartError> {
    let bind = |addr: String| async move {
        TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })
    };
    let onboarding_listener = bind(config.listen.onboarding.clone()).await?;
    let capif_listener = bind(config.listen.capif.clone()).await?;
    let onboarding_addr = onboarding_listener.local_addr()?;
    let capif_addr = capif_listener.local_addr()?;
    let (onboarding_routes, capif_routes, capif1e_routes) =
        routes(&state, config.limits.max_message_bytes).await?;
    let capif1e_listener = match (&capif1e_tls, &config.listen.capif1e) {
        (Some(_), Some(addr)) => Some(bind(addr.clone()).await?),
        _ => None,
    };
    let capif1e_addr = match &capif1e_listener {
        Some(l) => l.local_addr()?,
        None => capif_addr,
    };

    let mut tasks = ServerTasks::default();
    tasks.push(spawn_server(
        onboarding_listener,
        onboarding_tls,
        false,
        onboarding_routes,
        ConnGate::observed("onboarding", config.limits.clone(), &listeners),
        tasks.stopped(),
    ));
    tasks.push(spawn_server(
        capif_listener,
        capif_tls,
        true,
        capif_routes,
        ConnGate::observed("capif", config.limits.clone(), &listeners),
        tasks.stopped(),
    ));
    if let (Some(listener), Some(ctx)) = (capif1e_listener, capif1e_tls) {
        tasks.push(ccf_core::tls12::spawn_server(
            listener,
            ctx,
            capif1e_routes,
            ConnGate::observed("capif1e", config.limits.clone(), &listeners),
            tasks.stopped(),
        ));
    }
    // Stopping ends the purge task too, and `shutdown` waits for it as for the listeners.
    tasks.push(spawn_purge(state.clone(), purge_every, tasks.stopped()));
    tasks.push(spawn_revocation_outbox(state.clone(), tasks.stopped()));
    if state.store.backend() == ccf_core::pg::StoreBackend::Postgres {
        tasks.push(spawn_token_key_refresh(state.clone(), tasks.stopped()));
    }
    let metrics_addr = tasks
        .serve_metrics(config.metrics.listen, registry.clone())
        .await
        .map_err(|source| StartError::Listen {
            addr: config
                .metrics
                .listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
            source,
        })?;
    tracing::info!(ccf_id = %state.ccf_id, %onboarding_addr, %capif_addr, %capif1e_addr, capif1e = %state.capif1e, metrics = ?metrics_addr, "CCF listening");
    Ok(RunningCcf {
        state,
        onboarding_addr,
        capif_addr,
        capif1e_addr,
        metrics_addr,
        metrics: registry,
        tasks,
    })
}

/// The services of the listeners, each with health and reflection: InvokerManagement on the
/// onboarding listener; it, Security, Federation and CcfAdmin on the CAPIF-1e/3/6 one; what
/// invokers call (InvokerManagement, Security) on the TLS 1.2 CAPIF-1e one.
async fn routes(
    state: &Arc<CcfState>,
    max_msg: usize,
) -> Result<(Routes, Routes, Routes), StartError> {
    let im = InvokerManagementServer::new(InvokerManagementService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let im_name = service_name(&im);
    let onboarding_routes = with_standard_services(Routes::new(im.clone()), &[im_name])
        .await
        .map_err(|e| StartError::Config(e.message().to_string()))?;
    let sec = SecurityServer::new(SecurityService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let fed = FederationServer::new(FederationService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let admin = CcfAdminServer::new(CcfAdminService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let names = [
        im_name,
        service_name(&sec),
        service_name(&fed),
        service_name(&admin),
    ];
    let capif1e_routes = with_standard_services(
        Routes::new(im.clone()).add_service(sec.clone()),
        &names[..2],
    )
    .await
    .map_err(|e| StartError::Config(e.message().to_string()))?;
    let capif_routes = with_standard_services(
        Routes::new(im)
            .add_service(sec)
            .add_service(fed)
            .add_service(admin),
        &names,
    )
    .await
    .map_err(|e| StartError::Config(e.message().to_string()))?;
    Ok((onboarding_routes, capif_routes, capif1e_routes))
}
