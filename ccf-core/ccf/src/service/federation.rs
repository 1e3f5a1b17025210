//! `Federation`: what this CCF answers its own gateway on behalf of partner domains (CAPIF-6).
//!
//! Invariant 1 (docs/ARCHITECTURE.md) is enforced here: a key (or, for method 2, the invoker's CA) leaves the
//! domain only towards the domain that owns the AEF it is bound to, and only if the invoker
//! negotiated PSK or PKI for that AEF. The CCF's token verification keys are public and go to
//! any partner the gateway authenticated. The
//! partner is the one the gateway read from the partner's verified certificate.

use std::sync::Arc;

use capif_proto::v1::{
    InvokerSecurityInformation, PartnerSecurityInformationRequest, RevocationAck, RevocationNotice,
    TokenKeySet, TokenKeySetRequest, federation_server::Federation,
};
use tonic::{Request, Response, Status};

use super::{
    Refused, aef_id, ccf_id, invoker_id, optional_key_id, own_domain, role_not_allowed,
    security_information, valid_context,
};
use crate::server::CcfState;
use ccf_core::grpc::{caller, invalid_field};
use ccf_core::identity::Role;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::registry::SecurityMethod;

/// The audit record of security information handed to a partner (through the gateway), written
/// by the audit writer (`ccf_core::audit`) in the trace context of the request.
#[derive(Debug)]
pub struct HandedToPartner {
    partner: CcfId,
    invoker: ApiInvokerId,
    aef: AefId,
    key_id: String,
}

impl ccf_core::audit::AuditRecord for HandedToPartner {
    fn write(self) {
        let Self {
            partner,
            invoker,
            aef,
            key_id,
        } = self;
        tracing::info!(%partner, api_invoker_id = %invoker, aef_id = %aef, key_id = %key_id, "security information handed to partner");
    }
}

/// The Federation service.
#[derive(Clone, Debug)]
pub struct FederationService {
    state: Arc<CcfState>,
}

impl FederationService {
    /// A service over the CCF's state.
    pub fn new(state: Arc<CcfState>) -> Self {
        Self { state }
    }
}

/// The partner and the query of a `GetSecurityInformationForPartner`, each field checked where
/// it enters, in order; the query's home, when set, must be this domain `own`.
pub(super) fn partner_query(
    own: &CcfId,
    req: &PartnerSecurityInformationRequest,
) -> Result<(CcfId, ApiInvokerId, AefId), Status> {
    let partner = ccf_id("partner_ccf_id", &req.partner_ccf_id)?;
    let q = req
        .query
        .as_ref()
        .ok_or_else(|| invalid_field("query", "is required"))?;
    let invoker = invoker_id("query.api_invoker_id", &q.api_invoker_id)?;
    let aef = aef_id("query.aef_id", &q.aef_id)?;
    optional_key_id("query.presented_key_id", &q.presented_key_id)?;
    if !q.home_ccf_id.is_empty() && q.home_ccf_id != own.as_str() {
        return Err(invalid_field(
            "query.home_ccf_id",
            format!("names {}, not this domain {own}", q.home_ccf_id),
        ));
    }
    Ok((partner, invoker, aef))
}

impl FederationService {
    /// CAPIF-6: what a partner may have of an invoker's security information (invariant 1).
    async fn answer_partner(
        &self,
        request: Request<PartnerSecurityInformationRequest>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let who = caller(&request)?;
        own_domain(&self.state, &who)?;
        if who.role != Role::Gateway {
            return Err(role_not_allowed(&who, "ask for keys on behalf of partner domains").into());
        }
        self.state
            .partner_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (partner, invoker, aef) = partner_query(&self.state.ccf_id, &request.into_inner())?;
        // Ownership first: a partner learns nothing about invokers whose keys it may not have.
        match self.state.registry.get(&aef) {
            Some(entry) if entry.ccf_id == partner && partner != self.state.ccf_id => {}
            _ => {
                tracing::warn!(%partner, api_invoker_id = %invoker, aef_id = %aef, "partner asked for a key of an AEF it does not own");
                return Err(Refused::PartnerNotAuthorized { partner, aef }.into());
            }
        }
        let ctx = valid_context(&self.state, &invoker, &aef).await?;
        // PSK hands out the key, PKI the CA that issues the invoker's certificates. OAUTH needs
        // neither: the AEF verifies the token with the issuer's published keys.
        if !matches!(ctx.method, SecurityMethod::Psk | SecurityMethod::Pki) {
            return Err(Refused::MethodHandsOutNoKey {
                invoker,
                aef,
                method: ctx.method,
            }
            .into());
        }
        let answer = security_information(&self.state, &ctx);
        self.state.audit.record(HandedToPartner {
            partner,
            invoker,
            aef,
            key_id: ctx.key_id,
        });
        Ok(Response::new(answer))
    }
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn get_security_information_for_partner(
        &self,
        request: Request<PartnerSecurityInformationRequest>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let partner = request.get_ref().partner_ccf_id.clone();
        let result = self.answer_partner(request).await;
        self.state.metrics.partner_request(&partner, &result);
        result
    }

    async fn notify_revocation(
        &self,
        request: Request<RevocationNotice>,
    ) -> Result<Response<RevocationAck>, Status> {
        let who = caller(&request)?;
        own_domain(&self.state, &who)?;
        if who.role != Role::Gateway {
            return Err(role_not_allowed(&who, "pass on partner revocations").into());
        }
        let n = request.into_inner();
        // The gateway has evicted its cache; the AEFs drop the key and close the connections.
        let affected: Vec<ccf_core::ids::AefId> = n
            .aef_ids
            .iter()
            .filter_map(|a| ccf_core::ids::AefId::new(a.clone()).ok())
            .collect();
        // An empty list in a notice means every AEF.
        self.state
            .revoke_at_aefs(&n, (!n.aef_ids.is_empty()).then_some(affected.as_slice()));
        tracing::info!(
            partner = %n.home_ccf_id,
            api_invoker_id = %n.api_invoker_id,
            aefs = ?n.aef_ids,
            kind = ?n.kind(),
            "partner revoked one of its invokers"
        );
        Ok(Response::new(RevocationAck {
            entries_removed: 0,
            forwarded: self.state.aefs.len() as u32,
            duplicate: false,
        }))
    }

    async fn get_token_key_set(
        &self,
        request: Request<TokenKeySetRequest>,
    ) -> Result<Response<TokenKeySet>, Status> {
        let who = caller(&request)?;
        own_domain(&self.state, &who)?;
        if who.role != Role::Gateway {
            return Err(role_not_allowed(&who, "read token verification keys for partners").into());
        }
        let req = request.into_inner();
        if !req.issuer_ccf_id.is_empty() && req.issuer_ccf_id != self.state.ccf_id.as_str() {
            return Err(invalid_field(
                "issuer_ccf_id",
                format!(
                    "names {}, not this domain {}",
                    req.issuer_ccf_id, self.state.ccf_id
                ),
            ));
        }
        Ok(Response::new(self.state.own_key_set().await))
    }
}
