//! `GatewayAdmin`: what an operator inspects, purges and reloads with grpcurl (operator
//! certificate of the own domain).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use capif_proto::v1::{
    GatewayStatus, GetStatusRequest, PartnerState, PurgeRequest, PurgeResponse, ReloadRequest,
    ReloadResponse, gateway_admin_server::GatewayAdmin,
};
use ccf_core::grpc::{caller, invalid_field};
use ccf_core::identity::Role;
use ccf_core::ids::{ApiInvokerId, CcfId};
use tonic::{Request, Response, Status};

use super::{Refused, require};
use crate::state::GatewayState;
use crate::store::Destination;

/// The GatewayAdmin service.
#[derive(Clone, Debug)]
pub struct AdminService {
    state: Arc<GatewayState>,
}

impl AdminService {
    /// Over the gateway's state.
    pub fn new(state: Arc<GatewayState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl GatewayAdmin for AdminService {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GatewayStatus>, Status> {
        let who = caller(&request)?;
        require(
            &self.state,
            &who,
            Role::Operator,
            "read the gateway's status",
        )?;
        let s = &self.state;
        s.cache.sync().await;
        let c = &s.cache.counters;
        let mut partners = Vec::new();
        for p in s.partners().states() {
            let outbox_depth = match CcfId::new(p.ccf_id.clone()) {
                Ok(id) => s
                    .store
                    .depth(&Destination::Partner(id))
                    .await
                    .unwrap_or_default(),
                Err(_) => 0,
            };
            partners.push(PartnerState { outbox_depth, ..p });
        }
        Ok(Response::new(GatewayStatus {
            ccf_id: s.ccf_id.to_string(),
            cache_entries: s.cache.entry_count(),
            cache_hits: c.hits.load(Ordering::Relaxed),
            cache_misses: c.misses.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            negative_hits: c.negative_hits.load(Ordering::Relaxed),
            revocations_received: s.revocations_received.load(Ordering::Relaxed),
            partner_requests_served: s.partner_requests_served.load(Ordering::Relaxed),
            partners,
            reloads: s.reload.reloads.load(Ordering::Relaxed),
            reloads_refused: s.reload.refused.load(Ordering::Relaxed),
            last_reload_error: s.reload.last_error(),
            outbox_depth: s.store.total_depth().await.unwrap_or_default(),
            duplicate_revocations: s.duplicate_revocations.load(Ordering::Relaxed),
        }))
    }

    async fn reload(
        &self,
        request: Request<ReloadRequest>,
    ) -> Result<Response<ReloadResponse>, Status> {
        let who = caller(&request)?;
        require(
            &self.state,
            &who,
            Role::Operator,
            "reload the gateway's configuration",
        )?;
        let plan = crate::reload::reload(&self.state, "GatewayAdmin.Reload")
            .await
            .map_err(Refused::ConfigRefused)?;
        let names = |v: Vec<CcfId>| v.into_iter().map(|i| i.to_string()).collect();
        Ok(Response::new(ReloadResponse {
            added: names(plan.added),
            removed: names(plan.removed),
            changed: names(plan.changed),
            own_certificate_renewed: plan.own_certificate_renewed,
            needs_restart: plan.needs_restart.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn purge(
        &self,
        request: Request<PurgeRequest>,
    ) -> Result<Response<PurgeResponse>, Status> {
        let who = caller(&request)?;
        require(
            &self.state,
            &who,
            Role::Operator,
            "purge the gateway's cache",
        )?;
        let r = request.into_inner();
        let purged = match (r.api_invoker_id.is_empty(), r.partner_ccf_id.is_empty()) {
            (false, true) => {
                let id = ApiInvokerId::new(r.api_invoker_id)
                    .map_err(|e| invalid_field("api_invoker_id", e))?;
                self.state.cache.evict_where(|k| k.invoker() == &id).await
            }
            (true, false) => {
                let id =
                    CcfId::new(r.partner_ccf_id).map_err(|e| invalid_field("partner_ccf_id", e))?;
                self.state.cache.evict_where(|k| k.home() == &id).await
            }
            _ => {
                return Err(invalid_field(
                    "purge",
                    "set exactly one of api_invoker_id and partner_ccf_id",
                ));
            }
        };
        tracing::info!(purged, "cache purged by operator");
        Ok(Response::new(PurgeResponse { purged }))
    }
}
