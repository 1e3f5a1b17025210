//! What the gateway's services share: the own domain, the partners (trust and link of each),
//! the cache, the link to the own CCF, and the revocation store (who fetched which invoker's
//! keys, the outbox, the notices seen) with the outbox's workers' wake-up calls. The partners sit
//! behind a handle a reload swaps ([`crate::partners`]): services reach them only through
//! [`GatewayState::link`], [`GatewayState::trust`] and [`GatewayState::partners`].

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use capif_proto::v1::federation_client::FederationClient;
use ccf_core::ids::CcfId;
use ccf_core::telemetry::TracedChannel;

use crate::cache::KeyCache;
use crate::outbox::Outbox;
use crate::partner::PartnerLink;
use crate::partners::{LivePartners, Partners};
use crate::reload::ReloadControl;
use crate::store::RevocationStore;
use crate::trust::PartnerTrust;

/// Shared gateway state.
#[derive(Debug)]
pub struct GatewayState {
    /// The own domain.
    pub ccf_id: CcfId,
    /// Every partner's trust and link, as configured now.
    pub live: Arc<LivePartners>,
    /// Reloading the configuration (one at a time) and its counters.
    pub reload: ReloadControl,
    /// The cache.
    pub cache: KeyCache,
    /// Partner CCFs' token verification keys.
    pub key_sets: ccf_core::keysets::KeySetCache,
    /// CAPIF-6 client of the own CCF.
    pub ccf: FederationClient<TracedChannel>,
    /// Fetch records, the revocation outbox and the notices seen (survives a restart when
    /// `state_dir` is set).
    pub store: RevocationStore,
    /// The outbox's workers.
    pub outbox: Outbox,
    /// The longest validity a key of the own CCF may have (`[revocation]`).
    pub max_key_validity: Duration,
    /// Budget when the caller gives none.
    pub default_budget: Duration,
    /// Largest budget honoured.
    pub max_budget: Duration,
    /// Revocation notices received from partners.
    pub revocations_received: AtomicU64,
    /// CAPIF-6e requests answered for partners.
    pub partner_requests_served: AtomicU64,
    /// Revocation notices received again and acknowledged without acting.
    pub duplicate_revocations: AtomicU64,
    /// Revocation notices of its own invokers the own CCF published (repeats not counted).
    pub revocations_published: AtomicU64,
    /// Audit lines of keys handed to partners, written off the request path.
    pub audit: ccf_core::audit::AuditLog<crate::service::KeyHandedToPartner>,
}

impl GatewayState {
    /// The current federation; keep it for the whole request.
    pub fn partners(&self) -> Arc<Partners> {
        self.live.current()
    }

    /// A partner's outbound link, as configured now.
    pub fn link(&self, id: &CcfId) -> Option<Arc<PartnerLink>> {
        self.live.current().link(id).cloned()
    }

    /// A partner's trust, as configured now.
    pub fn trust(&self, id: &CcfId) -> Option<Arc<PartnerTrust>> {
        self.live.current().trust(id).cloned()
    }
}
