//! Starting a gateway: load its identity and the federation's trust ([`crate::reload::load`],
//! the same reading a reload does), build one link per partner and the cache, and serve the
//! CAPIF-6 listener (own CCF and operator; own CA) and the CAPIF-6e listener (partner gateways,
//! each against its own CA in the current federation), each with health and reflection. Both
//! listeners and every outbound link take the gateway's certificate from a resolver that a
//! reload swaps; [`RunningGateway::reload`] is what SIGHUP calls.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use capif_proto::v1::{
    federation_client::FederationClient, gateway_admin_server::GatewayAdminServer,
    gateway_server::GatewayServer, interconnect_server::InterconnectServer,
};
use ccf_core::grpc::{
    ServerTasks, service_name, spawn_server, spawn_server_traced, with_standard_services,
};
use ccf_core::limits::ConnGate;
use ccf_core::metrics::ListenerMetrics;
use ccf_core::telemetry::TracedChannel;
use ccf_core::tls::{ExpectedPeer, PeerServerVerifier, TlsError, certs_from_pem, provider, roots};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::cache::KeyCache;
use crate::config::GatewayConfig;
use crate::credentials::CertSlot;
use crate::discovery::Discovery;
use crate::outbox::Outbox;
use crate::partner::LinkPolicy;
use crate::partners::{FederationCheck, FederationVerifier, LinkFactory, LivePartners, Partners};
use crate::reload::{self, Adjust, ConfigSource, LoadError, ReloadControl, ReloadPlan};
use crate::service::{AdminService, GatewayService, InterconnectService};
use crate::state::GatewayState;
use crate::store::RevocationStore;
use ccf_core::delivery::Backoff;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The configuration or a file it names cannot be used.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Unreadable file.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] ccf_core::tls::TlsError),
    /// DNS.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// The revocation store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct RunningGateway {
    /// Shared state (tests read counters through it).
    pub state: Arc<GatewayState>,
    /// Bound CAPIF-6 address.
    pub capif6_addr: SocketAddr,
    /// Bound CAPIF-6e address.
    pub capif6e_addr: SocketAddr,
    /// Bound `/metrics` address, when `[metrics] listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// What `/metrics` serves (tests read it without the listener).
    pub metrics: Arc<ccf_core::metrics::Registry>,
    tasks: ServerTasks,
}

impl RunningGateway {
    /// Re-reads the configuration file and applies it, or refuses it as a whole
    /// ([`reload::reload`]); what SIGHUP does.
    pub async fn reload(&self) -> Result<ReloadPlan, LoadError> {
        reload::reload(&self.state, "SIGHUP").await
    }

    /// Stops both listeners and the outbox and waits for them; closes the store.
    pub async fn shutdown(self) {
        self.tasks.shutdown().await;
        self.state.store.close();
    }

    /// Stops as a crash would: every task aborted at once, nothing finished or flushed beyond
    /// what was committed, the store closed (its file may be opened again). For tests.
    pub fn crash(self) {
        self.tasks.abort();
        self.state.store.close();
    }
}

/// Starts a gateway from its configuration. It cannot reload: there is no file to re-read
/// ([`start_from_file`] can).
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, StartError> {
    launch(config, None).await
}

/// Starts a gateway from its configuration file; `adjust` (command-line overrides) is applied
/// after every read, at start and at every reload.
pub async fn start_from_file(
    path: PathBuf,
    adjust: Option<Adjust>,
) -> Result<RunningGateway, StartError> {
    let source = ConfigSource { path, adjust };
    let config = source.read()?;
    launch(config, Some(source)).await
}

async fn launch(
    config: GatewayConfig,
    source: Option<ConfigSource>,
) -> Result<RunningGateway, StartError> {
    // The same reading and checks as a reload: a file a reload would refuse does not start.
    let loaded = reload::load(config)?;
    let ccf_id = loaded.ccf_id.clone();
    let config = &loaded.config;
    let own = CertSlot::new("own", loaded.own.clone());
    let interconnect = CertSlot::new("interconnect", loaded.interconnect.clone());
    let factory = LinkFactory {
        discovery: Discovery::new(
            config.dns.nameserver.as_deref(),
            Duration::from_millis(config.dns.timeout_ms.unwrap_or(1000)),
        )?,
        policy: LinkPolicy {
            connect_timeout: Duration::from_millis(config.outbound.connect_timeout_ms),
            max_retries: config.outbound.max_retries,
            retry_budget_ratio: config.outbound.retry_budget_ratio,
            fetch_rate_per_sec: config.outbound.fetch_rate_per_sec,
            fetch_burst: config.outbound.fetch_burst,
            max_message_bytes: config.limits.max_message_bytes,
            partner_traces: config.telemetry.partner_traces,
        },
        identity: interconnect.clone(),
    };
    // Links are lazy: nothing is dialled here, so a gateway starts while its partners are down.
    let mut entries = Vec::new();
    for p in &loaded.partners {
        let link = factory.link(&p.trust, p.address.clone(), None)?;
        entries.push((p.trust.ccf_id.clone(), link));
    }
    let reload_control =
        ReloadControl::new(source, &loaded, own.clone(), interconnect.clone(), factory);
    let own_roots = certs_from_pem("own CA certificate", &loaded.own_ca_pem)?;
    let mut trusts = BTreeMap::new();
    for p in loaded.partners {
        trusts.insert(p.trust.ccf_id.clone(), Arc::new(p.trust));
    }
    let partners = Partners::new(
        entries
            .into_iter()
            .filter_map(|(id, link)| Some((trusts.remove(&id)?, Arc::new(link))))
            .collect(),
    );
    let live = LivePartners::new(partners);

    // Only the own domain's CCF: an AEF's certificate from the same CA also serves and names
    // `localhost`, and must not receive partner queries and revocations.
    let ccf_verifier = PeerServerVerifier::new(roots(&own_roots)?, ExpectedPeer::ccf(&ccf_id))?;
    let mut ccf_tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::from)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ccf_verifier))
        .with_client_cert_resolver(own.clone());
    ccf_tls.alpn_protocols = vec![b"h2".to_vec()];
    let ccf_replicas =
        ccf_core::tls::replica_addresses(&config.ccf.address, &config.ccf.addresses)?;
    let ccf_channel = ccf_core::tls::connect_replicas(
        &ccf_replicas,
        &config.ccf.server_name,
        Arc::new(ccf_tls),
        Duration::from_millis(config.outbound.connect_timeout_ms),
    )?;
    let seen_cap = config.revocation.max_seen_notices;
    let store = match &config.state_dir {
        _ if config.store.backend == ccf_core::pg::StoreBackend::Postgres => {
            let store = RevocationStore::from_config(&config.store, None, seen_cap).await?;
            tracing::info!(url = %config.store.url.as_ref().map(|u| u.redacted()).unwrap_or_default(), "revocation store in PostgreSQL, shared with the domain's other gateway replicas");
            store
        }
        Some(dir) => RevocationStore::open(Some(dir), seen_cap)?,
        None => {
            tracing::warn!(
                "no state_dir configured: fetch records and the revocation outbox are kept in \
                 memory and do not survive a restart"
            );
            RevocationStore::open(None, seen_cap)?
        }
    };
    let backoff = Backoff {
        initial: Duration::from_millis(config.revocation.initial_backoff_ms),
        max: Duration::from_millis(config.revocation.max_backoff_ms),
    };
    let outbox = Outbox::new(live.current().ids(), backoff);
    let max_budget = Duration::from_millis(config.outbound.max_timeout_ms);
    let state = Arc::new(GatewayState {
        ccf_id: ccf_id.clone(),
        live: live.clone(),
        reload: reload_control,
        cache: KeyCache::new(&config.cache).with_max_budget(max_budget),
        key_sets: Default::default(),
        ccf: FederationClient::new(TracedChannel::new(ccf_channel, ccf_replicas.join(",")))
            .max_decoding_message_size(config.limits.max_message_bytes),
        store,
        outbox,
        max_key_validity: Duration::from_secs(config.revocation.max_key_validity_secs),
        default_budget: Duration::from_millis(config.outbound.default_timeout_ms),
        max_budget,
        revocations_received: Default::default(),
        partner_requests_served: Default::default(),
        duplicate_revocations: Default::default(),
        revocations_published: Default::default(),
        audit: ccf_core::audit::AuditLog::spawn(ccf_core::audit::DEFAULT_CAPACITY),
    });
    let (registry, listeners) =
        crate::metrics::registry(state.clone(), own.clone(), interconnect.clone());
    spawn_evictions(&state);

    let capif6_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&own_roots)?), provider())
            .build()
            .map_err(TlsError::Verifier)?;
    let capif6_tls = dynamic_server_config(capif6_verifier, own)?;
    let capif6e_verifier = Arc::new(FederationVerifier::mandatory(FederationCheck::new(live)));
    let capif6e_tls = dynamic_server_config(capif6e_verifier, interconnect)?;
    serve(
        config,
        state,
        capif6_tls,
        capif6e_tls,
        (Arc::new(registry), listeners),
    )
    .await
}

/// Applies the evictions the domain's other replicas accepted (PostgreSQL store only) to this
/// replica's cache, as `service::interconnect` does for its own. Ends with the store's listener
/// (at close); holds the state weakly, so a dropped gateway is not kept alive by it.
fn spawn_evictions(state: &Arc<GatewayState>) {
    let Some(mut heard) = state.store.evictions() else {
        return;
    };
    let state = Arc::downgrade(state);
    tokio::spawn(async move {
        while let Some(e) = heard.recv().await {
            let Some(state) = state.upgrade() else {
                return;
            };
            let removed = match &e.key_id {
                Some(k) => {
                    state
                        .cache
                        .revoke_key(&e.home, &e.invoker, &e.aefs, k)
                        .await
                }
                None => state.cache.revoke(&e.home, &e.invoker, &e.aefs).await,
            };
            tracing::info!(partner = %e.home, api_invoker_id = %e.invoker, removed, "partner's invoker evicted: another replica of this gateway accepted its revocation");
        }
    });
}

/// A TLS 1.3 server config (ALPN h2) whose certificate comes from `identity`, swapped by a
/// reload, and whose clients `verifier` checks.
fn dynamic_server_config(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    identity: Arc<CertSlot>,
) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::from)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Binds both listeners and serves them: capif6 (own CA: `Gateway`, `GatewayAdmin`) and capif6e
/// (partner CAs: `Interconnect`).
async fn serve(
    config: &GatewayConfig,
    state: Arc<GatewayState>,
    capif6_tls: Arc<rustls::ServerConfig>,
    capif6e_tls: Arc<rustls::ServerConfig>,
    (registry, listeners): (Arc<ccf_core::metrics::Registry>, ListenerMetrics),
) -> Result<RunningGateway, StartError> {
    let bind = |addr: String| async move {
        let l = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Listen {
                addr: addr.clone(),
                source,
            })?;
        let bound = l
            .local_addr()
            .map_err(|source| StartError::Listen { addr, source })?;
        Ok::<_, StartError>((l, bound))
    };
    let (l6, capif6_addr) = bind(config.listen.capif6.clone()).await?;
    let (l6e, capif6e_addr) = bind(config.listen.capif6e.clone()).await?;

    let max_msg = config.limits.max_message_bytes;
    let gw = GatewayServer::new(GatewayService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let admin = GatewayAdminServer::new(AdminService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let names6 = [service_name(&gw), service_name(&admin)];
    let routes6 = with_standard_services(Routes::new(gw).add_service(admin), &names6)
        .await
        .map_err(|e| StartError::Config(e.message().to_string()))?;
    let ic = InterconnectServer::new(InterconnectService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let names6e = [service_name(&ic)];
    let routes6e = with_standard_services(Routes::new(ic), &names6e)
        .await
        .map_err(|e| StartError::Config(e.message().to_string()))?;

    let mut tasks = ServerTasks::default();
    tasks.push(spawn_server(
        l6,
        capif6_tls,
        false,
        routes6,
        ConnGate::observed("capif6", config.limits.clone(), &listeners),
        tasks.stopped(),
    ));
    // Partners' trace context is continued or only linked, as `[telemetry]` says.
    tasks.push(spawn_server_traced(
        l6e,
        capif6e_tls,
        false,
        routes6e,
        ConnGate::observed("capif6e", config.limits.clone(), &listeners),
        config.telemetry.partner_traces,
        tasks.stopped(),
    ));
    if let Some(poll) = reload::spawn_poll(state.clone(), tasks.stopped()) {
        tasks.push(poll);
    }
    // Rows left by a previous run are delivered from the start.
    for t in crate::outbox::spawn(state.clone(), tasks.stopped()) {
        tasks.push(t);
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
    tracing::info!(ccf_id = %state.ccf_id, %capif6_addr, %capif6e_addr, metrics = ?metrics_addr, partners = state.partners().len(), "gateway listening");
    Ok(RunningGateway {
        state,
        capif6_addr,
        capif6e_addr,
        metrics_addr,
        metrics: registry,
        tasks,
    })
}
