//! What the gateway's services share: the own domain, the federation's trust, one link per
//! partner, the cache, the link to the own CCF, and the revocation store (who fetched which
//! invoker's keys, the outbox, the notices seen) with the outbox's workers' wake-up calls.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use capif_proto::v1::federation_client::FederationClient;
use ccf_core::ids::CcfId;
use tonic::transport::Channel;

use crate::cache::KeyCache;
use crate::outbox::Outbox;
use crate::partner::PartnerLink;
use crate::store::RevocationStore;
use crate::trust::Federation;

/// Shared gateway state.
#[derive(Debug)]
pub struct GatewayState {
    /// The own domain.
    pub ccf_id: CcfId,
    /// Trust of every partner.
    pub federation: Federation,
    /// Outbound link per partner.
    pub links: BTreeMap<CcfId, PartnerLink>,
    /// The cache.
    pub cache: KeyCache,
    /// Partner CCFs' token verification keys.
    pub key_sets: ccf_core::keysets::KeySetCache,
    /// CAPIF-6 client of the own CCF.
    pub ccf: FederationClient<Channel>,
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
}
