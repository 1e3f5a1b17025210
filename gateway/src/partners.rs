//! The federation as it is configured NOW: one immutable [`Partners`] snapshot (every partner's
//! trust and link), behind a handle a reload swaps in one step ([`LivePartners`]). Every service
//! reads the current snapshot per request, and the CAPIF-6e listener's client verifier
//! ([`FederationVerifier`]) per handshake, so adding a partner or rotating its CA needs no new
//! listener, and a removed partner is refused at its next request (invariant 2 across reloads:
//! a snapshot holds each partner's own bundle only, and a certificate is judged against the
//! bundle of the partner it names in the snapshot current at that moment). Each snapshot has its
//! own [`Partners::generation`], so a connection can keep the result of verifying its partner's
//! certificate for as long as the snapshot it was checked against is the current one
//! (`ccf_core::tls::VerifiedPeer`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use capif_proto::v1::PartnerState;
use ccf_core::ids::CcfId;
use ccf_core::tls::{CheckedClientVerifier, ClientCheck, TlsError};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::credentials::CertSlot;
use crate::discovery::Discovery;
use crate::partner::{LinkPolicy, PartnerLink};
use crate::trust::{Federation, PartnerTrust, partner_client_config_with};

/// One consistent federation: the trust and the link of every partner.
#[derive(Debug, Default)]
pub struct Partners {
    federation: Federation,
    links: BTreeMap<CcfId, Arc<PartnerLink>>,
    generation: u64,
}

/// The generation of the next snapshot: process-wide, so no two snapshots ever share one (an
/// empty default snapshot has 0 and authenticates nobody).
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

impl Partners {
    /// From each partner's trust and link (same partners in both).
    pub fn new(entries: Vec<(Arc<PartnerTrust>, Arc<PartnerLink>)>) -> Self {
        let mut trusts = Vec::with_capacity(entries.len());
        let mut links = BTreeMap::new();
        for (trust, link) in entries {
            links.insert(trust.ccf_id.clone(), link);
            trusts.push(trust);
        }
        Self {
            federation: Federation::from_shared(trusts),
            links,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// This snapshot's number, unique in the process: a verification done against it holds
    /// exactly as long as it is the current snapshot.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The trust rules of this snapshot.
    pub fn federation(&self) -> &Federation {
        &self.federation
    }

    /// A partner's link.
    pub fn link(&self, id: &CcfId) -> Option<&Arc<PartnerLink>> {
        self.links.get(id)
    }

    /// A partner's trust.
    pub fn trust(&self, id: &CcfId) -> Option<&Arc<PartnerTrust>> {
        self.federation.get_shared(id)
    }

    /// The partners, in order.
    pub fn ids(&self) -> impl Iterator<Item = &CcfId> {
        self.links.keys()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// None at all.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// What GatewayAdmin.GetStatus shows of each partner.
    pub fn states(&self) -> Vec<PartnerState> {
        self.links
            .iter()
            .map(|(id, link)| {
                let mut st = link.state();
                if let Some(t) = self.federation.get(id) {
                    st.trust_anchors = t.anchors();
                }
                st
            })
            .collect()
    }
}

/// The swappable handle of the current [`Partners`].
#[derive(Debug, Default)]
pub struct LivePartners {
    current: parking_lot::RwLock<Arc<Partners>>,
}

impl LivePartners {
    /// Starting with `partners`.
    pub fn new(partners: Partners) -> Arc<Self> {
        Arc::new(Self {
            current: parking_lot::RwLock::new(Arc::new(partners)),
        })
    }

    /// The current snapshot: a caller keeps it for the whole request, so one request never
    /// sees two federations.
    pub fn current(&self) -> Arc<Partners> {
        self.current.read().clone()
    }

    /// Swaps in `partners`; requests in flight finish with the snapshot they hold.
    pub fn replace(&self, partners: Partners) {
        *self.current.write() = Arc::new(partners);
    }
}

/// What building a partner's link takes besides its trust: shared by start and reload.
#[derive(Clone, Debug)]
pub struct LinkFactory {
    /// DNS discovery (the one resolver of the gateway).
    pub discovery: Discovery,
    /// `[outbound]` and the message limit.
    pub policy: LinkPolicy,
    /// The interconnect identity presented to partners.
    pub identity: Arc<CertSlot>,
}

impl LinkFactory {
    /// A new link to `trust`'s partner; with `previous`, its successor (state and budgets kept).
    pub fn link(
        &self,
        trust: &PartnerTrust,
        address: Option<String>,
        previous: Option<&PartnerLink>,
    ) -> Result<PartnerLink, TlsError> {
        let tls = partner_client_config_with(trust, self.identity.clone())?;
        Ok(PartnerLink::new(
            trust,
            tls,
            self.discovery.clone(),
            address,
            &self.policy,
            previous,
        ))
    }
}

/// The CAPIF-6e listener's client-certificate verifier: `Federation::authenticate` against the
/// current snapshot, inside the handshake ([`FederationCheck`]). A certificate is accepted only
/// if it names a configured partner's gateway and chains to that partner's current bundle; no
/// union of partner CAs is ever trusted, not even as a first filter. Client authentication is
/// mandatory, and no CA names are hinted: the set changes with reloads, and a partner's gateway
/// has one interconnect certificate to present anyway.
pub type FederationVerifier = CheckedClientVerifier<FederationCheck>;

/// What [`FederationVerifier`] checks: the chain against the live federation.
#[derive(Debug)]
pub struct FederationCheck {
    partners: Arc<LivePartners>,
}

impl FederationCheck {
    /// Over the live federation.
    pub fn new(partners: Arc<LivePartners>) -> Self {
        Self { partners }
    }
}

impl ClientCheck for FederationCheck {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        self.partners
            .current()
            .federation()
            .authenticate_chain(end_entity, intermediates, now)
            .map(|_| ())
            .map_err(|e| {
                tracing::info!(error = %ccf_core::grpc::error_chain(&e), "partner certificate refused in the handshake");
                rustls::Error::Other(rustls::OtherError(Arc::new(e)))
            })
    }
}
