//! The AEF's Prometheus families (every one is listed in docs/OPERATIONS.md, "Metrics"):
//! Authentication Initiations per method and outcome, demo API calls per endpoint and outcome,
//! revocations applied, and, read at scrape time from the key store, the open PSK connections a
//! revocation would close and the revocation marks held. Handshakes (TLS and TLS-PSK, failures
//! by reason) and open connections per listener are the shared `capif_tls_handshakes_total` and
//! `capif_downstream_cx_active`, fed by each listener's gate.
//!
//! Label values are bounded: methods are the contract's enum, endpoints compile-time strings,
//! outcomes gRPC code and `ErrorReason` names. No invoker id, PSK identity or key ever becomes a
//! label.

use std::sync::Arc;

use capif_proto::v1 as pb;
use ccf_core::metrics::{
    CertExpiry, ListenerMetrics, MethodOutcome, NO_LABELS, OutcomeLabels, Registry, Scrape,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::Status;

use crate::keys::KeyStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointOutcome {
    endpoint: &'static str,
    #[prometheus(flatten)]
    outcome: OutcomeLabels,
}

/// The endpoint a demo API call came in on.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    /// The TLS-PSK endpoint (method 1).
    Psk,
    /// The TLS endpoint (methods 2 and 3).
    Tls,
}

/// The AEF's event counters. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct AefMetrics {
    initiations: Family<MethodOutcome, Counter>,
    api_calls: Family<EndpointOutcome, Counter>,
    revocations: Counter,
}

impl AefMetrics {
    /// An Authentication Initiation asking for `method` (the request's field), and how it ended.
    pub fn initiation<T>(&self, method: i32, result: &Result<T, Status>) {
        let method = pb::SecurityMethod::try_from(method)
            .map(|m| m.as_str_name())
            .unwrap_or("SECURITY_METHOD_UNSPECIFIED");
        self.initiations
            .get_or_create(&MethodOutcome {
                method,
                outcome: OutcomeLabels::of(result),
            })
            .inc();
    }

    /// A demo API call and how it ended.
    pub fn api_call<T>(&self, endpoint: Endpoint, result: &Result<T, Status>) {
        let endpoint = match endpoint {
            Endpoint::Psk => "psk",
            Endpoint::Tls => "tls",
        };
        self.api_calls
            .get_or_create(&EndpointOutcome {
                endpoint,
                outcome: OutcomeLabels::of(result),
            })
            .inc();
    }

    /// A revocation from the CCF applied.
    pub fn revoked(&self) {
        self.revocations.inc();
    }
}

/// What the AEF serves on `/metrics`: its listeners' families (returned, for their gates), its
/// certificates' expiry (returned, to be set at start), `metrics`, and [`KeyStoreCollector`].
pub fn registry(
    metrics: &AefMetrics,
    keys: Arc<KeyStore>,
) -> (Registry, ListenerMetrics, CertExpiry) {
    let mut r = Registry::default();
    let listeners = ListenerMetrics::register(&mut r);
    let certs = CertExpiry::register(&mut r);
    r.register(
        "capif_aef_authentication_initiations",
        "Authentication Initiations (CheckAuthentication), by the method asked for, gRPC code \
         and ErrorReason",
        metrics.initiations.clone(),
    );
    r.register(
        "capif_aef_api_calls",
        "Demo API calls, by endpoint (psk, tls), gRPC code and ErrorReason",
        metrics.api_calls.clone(),
    );
    r.register(
        "capif_aef_revocations",
        "Revocations (RevokeAuthorization from the own CCF) applied",
        metrics.revocations.clone(),
    );
    r.register_collector(Box::new(KeyStoreCollector(keys)));
    (r, listeners, certs)
}

/// Reads the key store at scrape time.
#[derive(Debug)]
pub struct KeyStoreCollector(Arc<KeyStore>);

impl Collector for KeyStoreCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut w = Scrape::new(encoder);
        w.gauges(
            "capif_aef_psk_connections",
            "Open PSK connections, each registered for its invoker's revocation",
            [(NO_LABELS, self.0.open_connections())],
        )?;
        w.gauges(
            "capif_aef_revocation_marks",
            "Revoked invokers whose new handshakes and initiations are refused for now",
            [(NO_LABELS, self.0.revoked_marks())],
        )
    }
}
