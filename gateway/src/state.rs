//! What the gateway's services share: the own domain, the federation's trust, one link per
//! partner, the cache, the link to the own CCF, and who fetched which invoker's keys (for
//! revocation push). The partners sit behind a handle a reload swaps ([`crate::partners`]):
//! services reach them only through [`GatewayState::link`], [`GatewayState::trust`] and
//! [`GatewayState::partners`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use capif_proto::v1::federation_client::FederationClient;
use ccf_core::ids::{ApiInvokerId, CcfId};
use tonic::transport::Channel;

use crate::cache::KeyCache;
use crate::partner::PartnerLink;
use crate::partners::{LivePartners, Partners};
use crate::reload::ReloadControl;
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
    pub ccf: FederationClient<Channel>,
    /// Partners that fetched keys of each of our invokers.
    pub fetchers: parking_lot::Mutex<HashMap<ApiInvokerId, BTreeSet<CcfId>>>,
    /// Budget when the caller gives none.
    pub default_budget: Duration,
    /// Largest budget honoured.
    pub max_budget: Duration,
    /// Revocation notices received from partners.
    pub revocations_received: AtomicU64,
    /// CAPIF-6e requests answered for partners.
    pub partner_requests_served: AtomicU64,
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

    /// Remembers that `partner` holds keys of `invoker`.
    pub fn record_fetch(&self, invoker: &ApiInvokerId, partner: &CcfId) {
        self.fetchers
            .lock()
            .entry(invoker.clone())
            .or_default()
            .insert(partner.clone());
    }

    /// The partners holding keys of `invoker`; forgets them when `forget` (the invoker is gone).
    pub fn fetchers_of(&self, invoker: &ApiInvokerId, forget: bool) -> Vec<CcfId> {
        // parking_lot's lock does not poison: a panic elsewhere cannot make this list empty.
        let mut f = self.fetchers.lock();
        let set = if forget {
            f.remove(invoker)
        } else {
            f.get(invoker).cloned()
        };
        set.map(|s| s.into_iter().collect()).unwrap_or_default()
    }
}
