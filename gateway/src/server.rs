//! Starting a gateway: load its identity and the federation's trust, build one link per partner
//! and the cache, and serve the CAPIF-6 listener (own CCF and operator; own CA) and the CAPIF-6e
//! listener (partner gateways; partner CAs), each with health and reflection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capif_proto::v1::{
    federation_client::FederationClient, gateway_admin_server::GatewayAdminServer,
    gateway_server::GatewayServer, interconnect_server::InterconnectServer,
};
use ccf_core::grpc::{ServerTasks, service_name, spawn_server, with_standard_services};
use ccf_core::ids::CcfId;
use ccf_core::limits::ConnGate;
use ccf_core::tls::{
    ClientAuth, ExpectedPeer, certs_from_pem, client_config, connect_lazy, server_config,
};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::cache::KeyCache;
use crate::config::GatewayConfig;
use crate::discovery::Discovery;
use crate::outbox::Outbox;
use crate::partner::{LinkPolicy, PartnerLink};
use crate::service::{AdminService, GatewayService, InterconnectService};
use crate::state::GatewayState;
use crate::store::RevocationStore;
use crate::trust::{Federation, PartnerTrust, partner_client_config};
use ccf_core::delivery::Backoff;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
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
    tasks: ServerTasks,
}

impl RunningGateway {
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

fn read(path: &std::path::Path) -> Result<String, StartError> {
    std::fs::read_to_string(path).map_err(|source| StartError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Starts a gateway from its configuration.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, StartError> {
    let ccf_id = validate(&config)?;
    let ca_pem = read(&config.tls.ca_cert)?;
    let cert_pem = read(&config.tls.cert)?;
    let key_pem = zeroize::Zeroizing::new(read(&config.tls.key)?);
    let chain = format!("{cert_pem}{ca_pem}");
    let (federation, links) = federation(&config, &ccf_id, &cert_pem, &key_pem)?;

    // Only the own domain's CCF: an AEF's certificate from the same CA also serves and names
    // `localhost`, and must not receive partner queries and revocations.
    let ccf_tls = client_config(
        &ca_pem,
        Some((&cert_pem, &key_pem)),
        ExpectedPeer::ccf(&ccf_id),
    )?;
    let ccf_channel = connect_lazy(
        &config.ccf.address,
        &config.ccf.server_name,
        ccf_tls,
        Duration::from_millis(config.outbound.connect_timeout_ms),
    )?;
    let store = match &config.state_dir {
        Some(dir) => RevocationStore::open(Some(dir), config.revocation.max_seen_notices)?,
        None => {
            tracing::warn!(
                "no state_dir configured: fetch records and the revocation outbox are kept in \
                 memory and do not survive a restart"
            );
            RevocationStore::open(None, config.revocation.max_seen_notices)?
        }
    };
    let backoff = Backoff {
        initial: Duration::from_millis(config.revocation.initial_backoff_ms),
        max: Duration::from_millis(config.revocation.max_backoff_ms),
    };
    let outbox = Outbox::new(links.keys(), backoff);
    let max_budget = Duration::from_millis(config.outbound.max_timeout_ms);
    let state = Arc::new(GatewayState {
        ccf_id: ccf_id.clone(),
        federation,
        links,
        cache: KeyCache::new(&config.cache).with_max_budget(max_budget),
        key_sets: Default::default(),
        ccf: FederationClient::new(ccf_channel)
            .max_decoding_message_size(config.limits.max_message_bytes),
        store,
        outbox,
        max_key_validity: Duration::from_secs(config.revocation.max_key_validity_secs),
        default_budget: Duration::from_millis(config.outbound.default_timeout_ms),
        max_budget,
        revocations_received: Default::default(),
        partner_requests_served: Default::default(),
        duplicate_revocations: Default::default(),
    });

    let own_roots = certs_from_pem("own CA certificate", &ca_pem)?;
    let capif6_tls = server_config(&chain, &key_pem, ClientAuth::Required(&own_roots))?;
    let partner_roots = state.federation.all_roots();
    let capif6e_tls = server_config(&chain, &key_pem, ClientAuth::Required(&partner_roots))?;
    serve(&config, state, capif6_tls, capif6e_tls).await
}

/// Checks what the config's types cannot; the own domain.
fn validate(config: &GatewayConfig) -> Result<CcfId, StartError> {
    let ccf_id = CcfId::new(config.ccf_id.clone())
        .map_err(|e| StartError::Config(format!("ccf_id: {e}")))?;
    config.limits.validate().map_err(StartError::Config)?;
    if config.outbound.fetch_rate_per_sec == 0 || config.outbound.fetch_burst == 0 {
        return Err(StartError::Config(
            "outbound.fetch_rate_per_sec and outbound.fetch_burst must be at least 1".into(),
        ));
    }
    let r = &config.revocation;
    if r.initial_backoff_ms == 0 || r.max_backoff_ms < r.initial_backoff_ms {
        return Err(StartError::Config(
            "revocation.initial_backoff_ms must be at least 1 and at most revocation.max_backoff_ms"
                .into(),
        ));
    }
    if r.max_key_validity_secs == 0 {
        return Err(StartError::Config(
            "revocation.max_key_validity_secs must be at least 1".into(),
        ));
    }
    if config.partners.is_empty() {
        return Err(StartError::Config(
            "configure at least one [[partner]]".into(),
        ));
    }
    Ok(ccf_id)
}

/// Every partner's trust and outbound link, from `[[partner]]`.
fn federation(
    config: &GatewayConfig,
    ccf_id: &CcfId,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Federation, BTreeMap<CcfId, PartnerLink>), StartError> {
    let discovery = Discovery::new(
        config.dns.nameserver.as_deref(),
        Duration::from_millis(config.dns.timeout_ms.unwrap_or(1000)),
    )?;
    let policy = LinkPolicy {
        connect_timeout: Duration::from_millis(config.outbound.connect_timeout_ms),
        max_retries: config.outbound.max_retries,
        retry_budget_ratio: config.outbound.retry_budget_ratio,
        fetch_rate_per_sec: config.outbound.fetch_rate_per_sec,
        fetch_burst: config.outbound.fetch_burst,
        max_message_bytes: config.limits.max_message_bytes,
    };
    let mut trusts = Vec::new();
    let mut links = BTreeMap::new();
    for p in &config.partners {
        let id = CcfId::new(p.ccf_id.clone())
            .map_err(|e| StartError::Config(format!("partner {:?}: {e}", p.ccf_id)))?;
        if &id == ccf_id {
            return Err(StartError::Config(format!(
                "{id} cannot be its own partner"
            )));
        }
        let trust = PartnerTrust::new(id.clone(), &read(&p.ca_cert)?)?;
        let tls = partner_client_config(&trust, cert_pem, key_pem)?;
        let link = PartnerLink::new(&trust, tls, discovery.clone(), p.address.clone(), &policy);
        if links.insert(id.clone(), link).is_some() {
            return Err(StartError::Config(format!(
                "partner {id} is configured twice"
            )));
        }
        trusts.push(trust);
    }
    Ok((Federation::new(trusts), links))
}

/// Binds both listeners and serves them: capif6 (own CA: `Gateway`, `GatewayAdmin`) and capif6e
/// (partner CAs: `Interconnect`).
async fn serve(
    config: &GatewayConfig,
    state: Arc<GatewayState>,
    capif6_tls: Arc<rustls::ServerConfig>,
    capif6e_tls: Arc<rustls::ServerConfig>,
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
        ConnGate::new("capif6", config.limits.clone()),
        tasks.stopped(),
    ));
    tasks.push(spawn_server(
        l6e,
        capif6e_tls,
        false,
        routes6e,
        ConnGate::new("capif6e", config.limits.clone()),
        tasks.stopped(),
    ));
    // Rows left by a previous run are delivered from the start.
    for t in crate::outbox::spawn(state.clone(), tasks.stopped()) {
        tasks.push(t);
    }
    tracing::info!(ccf_id = %state.ccf_id, %capif6_addr, %capif6e_addr, partners = state.links.len(), "gateway listening");
    Ok(RunningGateway {
        state,
        capif6_addr,
        capif6e_addr,
        tasks,
    })
}
