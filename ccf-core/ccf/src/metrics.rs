//! The CCF's Prometheus families (every one is listed in docs/OPERATIONS.md, "Metrics"):
//! onboardings, security-method negotiations per method, security-information answers to AEFs
//! and to partners (through the gateway), keys handed to partners per partner, revocations
//! published, the store's latency per operation, and, read at scrape time, what the store and
//! the revocation outbox hold.
//!
//! Label values are bounded: methods and revocation kinds are the contract's enums, outcomes are
//! gRPC code and `ErrorReason` names, and a partner is named only once the registry showed it
//! owns the AEF a key was handed for. No invoker id, key id or key ever becomes a label.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use capif_proto::v1::{self as pb, InvokerSecurityInformation, ServiceSecurity};
use ccf_core::metrics::{
    CertExpiry, ListenerMetrics, MethodOutcome, NO_LABELS, OutcomeLabels, Registry, Scrape,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::Status;

use crate::server::CcfState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeOutcome {
    scope: &'static str,
    #[prometheus(flatten)]
    outcome: OutcomeLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartnerMethod {
    partner: String,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The label value of a security method (`PSK`, `PKI`, `OAUTH`).
fn method_name(method: i32) -> &'static str {
    pb::SecurityMethod::try_from(method)
        .map(|m| m.as_str_name())
        .unwrap_or("SECURITY_METHOD_UNSPECIFIED")
}

/// Where an AEF's security-information request was answered from.
#[derive(Clone, Copy, Debug)]
pub enum InvokerHome {
    /// An invoker of this domain: from the store.
    Own,
    /// An invoker of a partner domain: through the gateway.
    Foreign,
}

/// The CCF's event counters. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct CcfMetrics {
    onboardings: Family<OutcomeLabels, Counter>,
    offboardings: Counter,
    negotiations: Family<MethodOutcome, Counter>,
    security_info: Family<ScopeOutcome, Counter>,
    partner_requests: Family<OutcomeLabels, Counter>,
    keys_to_partners: Family<PartnerMethod, Counter>,
    revocations: Family<KindLabel, Counter>,
}

impl CcfMetrics {
    /// An onboarding and how it ended.
    pub fn onboarded<T>(&self, result: &Result<T, Status>) {
        self.onboardings
            .get_or_create(&OutcomeLabels::of(result))
            .inc();
    }

    /// An offboarding done.
    pub fn offboarded(&self) {
        self.offboardings.inc();
    }

    /// A negotiation (Obtain or Update): one count per AEF with the method selected, or one
    /// refusal with the method `none`.
    pub fn negotiated(&self, result: &Result<ServiceSecurity, Status>) {
        match result {
            Ok(ss) => {
                for info in &ss.security_info {
                    self.negotiations
                        .get_or_create(&MethodOutcome {
                            method: method_name(info.sel_security_method),
                            outcome: OutcomeLabels::OK,
                        })
                        .inc();
                }
            }
            Err(s) => {
                self.negotiations
                    .get_or_create(&MethodOutcome {
                        method: "none",
                        outcome: OutcomeLabels::of_status(s),
                    })
                    .inc();
            }
        }
    }

    /// An AEF's `GetSecurityInformation` and how it ended.
    pub fn security_info<T>(&self, scope: InvokerHome, result: &Result<T, Status>) {
        let scope = match scope {
            InvokerHome::Own => "own",
            InvokerHome::Foreign => "foreign",
        };
        self.security_info
            .get_or_create(&ScopeOutcome {
                scope,
                outcome: OutcomeLabels::of(result),
            })
            .inc();
    }

    /// The gateway's `GetSecurityInformationForPartner` and how it ended; `partner` (the one
    /// the request names) labels the key handed out, which only a partner that owns the AEF
    /// gets.
    pub fn partner_request(
        &self,
        partner: &str,
        result: &Result<tonic::Response<InvokerSecurityInformation>, Status>,
    ) {
        self.partner_requests
            .get_or_create(&OutcomeLabels::of(result))
            .inc();
        if let Ok(answer) = result {
            self.keys_to_partners
                .get_or_create(&PartnerMethod {
                    partner: partner.to_string(),
                    method: method_name(answer.get_ref().sel_security_method),
                })
                .inc();
        }
    }

    /// A revocation of this domain's invokers committed and published.
    pub fn revocation_published(&self, kind: i32) {
        let kind = pb::RevocationKind::try_from(kind)
            .map(|k| k.as_str_name())
            .unwrap_or("REVOCATION_KIND_UNSPECIFIED");
        self.revocations.get_or_create(&KindLabel { kind }).inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "capif_ccf_onboardings",
            "Onboarding requests, by gRPC code and ErrorReason",
            self.onboardings.clone(),
        );
        r.register(
            "capif_ccf_offboardings",
            "Invokers offboarded",
            self.offboardings.clone(),
        );
        r.register(
            "capif_ccf_negotiations",
            "Security methods negotiated (CAPIF-1e Obtain or Update): one per AEF with the \
             method selected, or one refusal with method none, by gRPC code and ErrorReason",
            self.negotiations.clone(),
        );
        r.register(
            "capif_ccf_security_info_answers",
            "AEFs' GetSecurityInformation (CAPIF-3), by scope (own: this domain's invoker; \
             foreign: a partner's, through the gateway), gRPC code and ErrorReason",
            self.security_info.clone(),
        );
        r.register(
            "capif_ccf_partner_requests",
            "The gateway's GetSecurityInformationForPartner (CAPIF-6), by gRPC code and \
             ErrorReason",
            self.partner_requests.clone(),
        );
        r.register(
            "capif_ccf_partner_keys_handed",
            "Security information handed to a partner through the gateway (PSK: an AEFPSK; \
             PKI: the invoker's CA), by partner and method",
            self.keys_to_partners.clone(),
        );
        r.register(
            "capif_ccf_revocations_published",
            "Revocations of this domain's invokers committed and published, by kind",
            self.revocations.clone(),
        );
    }
}

/// What the CCF serves on `/metrics`: its listeners' families (returned, for their gates), its
/// certificates' expiry (returned, to be set at start), the event counters of `state`, the
/// store's latency, and [`CcfCollector`] over `state`.
pub fn registry(state: &Arc<CcfState>) -> (Registry, ListenerMetrics, CertExpiry) {
    let mut r = Registry::default();
    let listeners = ListenerMetrics::register(&mut r);
    let certs = CertExpiry::register(&mut r);
    state.metrics.register(&mut r);
    r.register(
        "capif_ccf_store_duration_seconds",
        "Time of a store operation (its durable commit included), by operation",
        state.store.timings().clone(),
    );
    r.register_collector(Box::new(CcfCollector(state.clone())));
    (r, listeners, certs)
}

/// Reads what the CCF already keeps at scrape time: the store's sizes, the revocation outbox.
#[derive(Debug)]
pub struct CcfCollector(Arc<CcfState>);

impl Collector for CcfCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let mut w = Scrape::new(encoder);
        // A store that cannot be read now leaves the gauges out rather than report zero.
        if let Some(sizes) = s.store.sizes() {
            w.gauges(
                "capif_ccf_invokers",
                "Invokers onboarded",
                [(NO_LABELS, sizes.invokers)],
            )?;
            w.gauges(
                "capif_ccf_security_contexts",
                "Security contexts held (expired ones until the purge)",
                [(NO_LABELS, sizes.contexts)],
            )?;
            w.gauges(
                "capif_ccf_revocations_pending",
                "Revocation notices waiting in the outbox for the gateway",
                [(NO_LABELS, sizes.revocations_pending)],
            )?;
        }
        w.counters(
            "capif_ccf_revocations_delivered",
            "Revocation notices the gateway acknowledged",
            [(NO_LABELS, s.revocations_delivered.load(Ordering::Relaxed))],
        )?;
        w.counters(
            "capif_ccf_audit_records_dropped",
            "Audit log lines (security information handed to partners) dropped because the \
             audit writer fell behind",
            [(NO_LABELS, s.audit.dropped())],
        )
    }
}
