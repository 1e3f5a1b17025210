//! Starting an AEF: its security listener (TLS with its certificate; client certificates
//! optional, required for the CCF's revocations), its TLS-PSK endpoint with the demo API, and,
//! when configured, its TLS endpoint for methods 2 and 3 with the same demo API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capif_proto::v1::{
    aef_security_server::AefSecurityServer, demo_api_server::DemoApiServer,
    security_client::SecurityClient,
};
use ccf_core::grpc::{ServerTasks, service_name, spawn_server, with_standard_services};
use ccf_core::ids::{AefId, CcfId};
use ccf_core::telemetry::TracedChannel;
use ccf_core::tls::{ClientAuth, ExpectedPeer, certs_from_pem, client_config, server_config};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::certauth::{InvokerCertCheck, InvokerCertVerifier};
use crate::config::AefConfig;
use crate::keys::{KeyStore, MarkPolicy};
use crate::psk::{PskPeer, psk_incoming, server_context};
use crate::service::{AefSecurityService, AefState, DemoApiService};
use ccf_core::limits::{ConnGate, serve_builder};
use ccf_core::metrics::ListenerMetrics;
use std::num::NonZeroU32;

/// A running AEF.
pub struct RunningAef {
    /// Shared state.
    pub state: Arc<AefState>,
    /// Bound security listener.
    pub security_addr: SocketAddr,
    /// Bound PSK endpoint.
    pub psk_addr: SocketAddr,
    /// Bound TLS endpoint (methods 2 and 3), when configured.
    pub tls_addr: Option<SocketAddr>,
    /// Bound `/metrics` address, when `[metrics] listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// What `/metrics` serves (tests read it without the listener).
    pub metrics: Arc<ccf_core::metrics::Registry>,
    tasks: ServerTasks,
}

impl RunningAef {
    /// Stops both listeners.
    pub async fn shutdown(self) {
        self.tasks.shutdown().await;
    }
}

async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let bound = l.local_addr()?;
    Ok((l, bound))
}

/// Authentication Initiations per source address.
fn initiation_quota(config: &AefConfig) -> governor::Quota {
    governor::Quota::per_second(
        NonZeroU32::new(config.budgets.initiation_rate_per_sec).unwrap_or(NonZeroU32::MIN),
    )
    .allow_burst(NonZeroU32::new(config.budgets.initiation_burst).unwrap_or(NonZeroU32::MIN))
}

/// The per-source limiter keeps a small state per address it saw: forget the quiet ones every
/// minute, so a stranger rotating source addresses cannot grow it without bound. Ends with the
/// AEF.
fn spawn_limiter_cleanup(state: &Arc<AefState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            state.initiation_limiter.retain_recent();
            state.initiation_limiter.shrink_to_fit();
        }
    });
}

/// Serves the security listener (`AefSecurity`, client certificates optional), the TLS-PSK
/// endpoint and, when configured, the TLS endpoint for methods 2 and 3 (both `DemoApi`).
async fn serve(
    config: &AefConfig,
    state: &Arc<AefState>,
    keys: Arc<KeyStore>,
    (ca, cert, key): (&str, &str, &str),
    (security_listener, psk_listener, tls_listener): (
        TcpListener,
        TcpListener,
        Option<TcpListener>,
    ),
    listeners: &ListenerMetrics,
) -> anyhow::Result<ServerTasks> {
    let max_msg = config.limits.max_message_bytes;
    let roots = certs_from_pem("CA certificate", ca)?;
    let tls = server_config(&format!("{cert}{ca}"), key, ClientAuth::Optional(&roots))?;
    let sec = AefSecurityServer::new(AefSecurityService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let names = [service_name(&sec)];
    let sec_routes = with_standard_services(Routes::new(sec), &names)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let demo = DemoApiServer::new(DemoApiService::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let psk_ctx = server_context(keys.clone(), config.psk_tls)?;

    let mut tasks = ServerTasks::default();
    let psk_task = {
        let gate = ConnGate::observed("psk", config.limits.clone(), listeners);
        let incoming = psk_incoming(psk_listener, psk_ctx, keys, gate);
        let stop = tasks.stopped();
        tokio::spawn(
            serve_builder(&config.limits, PskPeer::activity_of)
                .add_routes(Routes::new(demo))
                .serve_with_incoming_shutdown(incoming, stop),
        )
    };
    tasks.push(spawn_server(
        security_listener,
        tls,
        false,
        sec_routes,
        ConnGate::observed("security", config.limits.clone(), listeners),
        tasks.stopped(),
    ));
    tasks.push(psk_task);
    if let Some(listener) = tls_listener {
        // Methods 2 and 3: the AEF's own certificate; a client certificate is checked against
        // the CAs held for the invoker it names, a client without one must bring a token.
        let verifier = Arc::new(InvokerCertVerifier::optional(InvokerCertCheck::new(
            state.keys.clone(),
        )));
        let app_tls = server_config(&format!("{cert}{ca}"), key, ClientAuth::Custom(verifier))?;
        let demo = DemoApiServer::new(DemoApiService::new(state.clone()))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(max_msg);
        tasks.push(spawn_server(
            listener,
            app_tls,
            false,
            Routes::new(demo),
            ConnGate::observed("tls", config.limits.clone(), listeners),
            tasks.stopped(),
        ));
    }
    Ok(tasks)
}

/// Starts an AEF.
pub async fn start(config: AefConfig) -> anyhow::Result<RunningAef> {
    config.validate()?;
    let aef_id = AefId::new(config.aef_id.clone())?;
    let ccf_id = CcfId::new(config.ccf_id.clone())?;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
    };
    let ca = read(&config.tls.ca_cert)?;
    let cert = read(&config.tls.cert)?;
    let key = zeroize::Zeroizing::new(read(&config.tls.key)?);
    let ccf_replicas =
        ccf_core::tls::replica_addresses(&config.ccf.address, &config.ccf.addresses)?;
    let ccf = SecurityClient::new(TracedChannel::new(
        ccf_core::tls::connect_replicas(
            &ccf_replicas,
            &config.ccf.server_name,
            // Only the own domain's CCF: it hands this AEF invokers' keys and token keys, and a
            // gateway's or another AEF's certificate from the same CA could serve here too.
            client_config(&ca, Some((&cert, &key)), ExpectedPeer::ccf(&ccf_id))?,
            Duration::from_secs(2),
        )?,
        ccf_replicas.join(","),
    ))
    .max_decoding_message_size(config.limits.max_message_bytes);
    let (security_listener, security_addr) = bind(&config.listen.security).await?;
    let (psk_listener, psk_addr) = bind(&config.listen.psk).await?;
    let tls_listener = match &config.listen.tls {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let tls_addr = tls_listener.as_ref().map(|(_, a)| *a);
    let keys = Arc::new(KeyStore::new(MarkPolicy {
        ttl: Duration::from_secs(config.budgets.revoked_mark_ttl_secs),
        max_marks: config.budgets.max_revoked_marks,
    }));
    let state = Arc::new(AefState {
        aef_id: aef_id.clone(),
        ccf_id,
        keys: keys.clone(),
        psk_endpoint: config
            .listen
            .psk_advertised
            .clone()
            .unwrap_or_else(|| psk_addr.to_string()),
        tls_endpoint: tls_addr.map(|a| {
            config
                .listen
                .tls_advertised
                .clone()
                .unwrap_or_else(|| a.to_string())
        }),
        tokens: crate::token::TokenVerifier::new(ccf.clone(), config.token_leeway_secs),
        ccf,
        apis: config.apis.clone(),
        initiation_limiter: governor::RateLimiter::keyed(initiation_quota(&config)),
        refresh_interval: Duration::from_millis(config.budgets.refresh_interval_ms),
        metrics: Default::default(),
        #[cfg(feature = "test-faults")]
        ignore_revocations: config.test_ignore_revocations,
    });
    spawn_limiter_cleanup(&state);
    let (registry, listeners, certs) = crate::metrics::registry(&state.metrics, keys.clone());
    for (what, pem) in [("own", cert.as_str()), ("domain_ca", ca.as_str())] {
        if let Some(der) = certs_from_pem(what, pem)?.first() {
            certs.set_from_der(what, "", der);
        }
    }
    let mut tasks = serve(
        &config,
        &state,
        keys,
        (ca.as_str(), cert.as_str(), key.as_str()),
        (
            security_listener,
            psk_listener,
            tls_listener.map(|(l, _)| l),
        ),
        &listeners,
    )
    .await?;
    let registry = Arc::new(registry);
    let metrics_addr = tasks
        .serve_metrics(config.metrics.listen, registry.clone())
        .await
        .map_err(|e| {
            let addr = config
                .metrics
                .listen
                .map(|a| a.to_string())
                .unwrap_or_default();
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        })?;
    tracing::info!(%aef_id, %security_addr, %psk_addr, tls_addr = ?tls_addr, metrics = ?metrics_addr, profile = ?config.psk_tls, "AEF listening");
    Ok(RunningAef {
        state,
        security_addr,
        psk_addr,
        tls_addr,
        metrics_addr,
        metrics: registry,
        tasks,
    })
}
