//! `Interconnect` (CAPIF-6e): what partner gateways may ask. The partner is the one its
//! certificate names AND whose CA issued it (`trust::Federation::authenticate`); the own CCF
//! decides, on that partner's behalf, whether the key may leave (invariant 1). Answers reveal no
//! internal address (invariant 5): failures of the own CCF become a plain UNAVAILABLE.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use capif_proto::v1::{
    ErrorReason, InvokerSecurityInformation, PartnerSecurityInformationRequest, RevocationAck,
    RevocationNotice, SecurityInformationQuery, TokenKeySet, TokenKeySetRequest,
    interconnect_server::Interconnect,
};
use ccf_core::grpc::{budget, conn_info, error_reason, error_status, inner_budget};
use ccf_core::ids::{ApiInvokerId, CcfId, KeyId};
use tonic::{Code, Request, Response, Status};

use super::{ids, invalid};
use crate::state::GatewayState;

/// The Interconnect service.
#[derive(Clone, Debug)]
pub struct InterconnectService {
    state: Arc<GatewayState>,
}

impl InterconnectService {
    /// Over the gateway's state.
    pub fn new(state: Arc<GatewayState>) -> Self {
        Self { state }
    }

    fn partner<T>(&self, req: &Request<T>) -> Result<CcfId, Status> {
        let info = conn_info(req)?;
        let peer = info.peer.as_ref().ok_or_else(|| {
            error_status(
                Code::Unauthenticated,
                ErrorReason::UnknownPartner,
                "a client certificate is required",
            )
        })?;
        self.state
            .federation
            .authenticate(&peer.cert_der)
            .map_err(|e| {
                tracing::warn!(remote = ?info.remote_addr, error = %e, "partner refused");
                error_status(
                    Code::PermissionDenied,
                    ErrorReason::UnknownPartner,
                    e.to_string(),
                )
            })
    }
}

#[tonic::async_trait]
impl Interconnect for InterconnectService {
    async fn fetch_security_information(
        &self,
        request: Request<SecurityInformationQuery>,
    ) -> Result<Response<InvokerSecurityInformation>, Status> {
        let partner = self.partner(&request)?;
        let deadline = Instant::now()
            + inner_budget(budget(
                &request,
                self.state.default_budget,
                self.state.max_budget,
            ));
        let q = request.into_inner();
        let (invoker, home, _aef) = ids(&q.api_invoker_id, &q.home_ccf_id, &q.aef_id)?;
        KeyId::optional(&q.presented_key_id).map_err(|e| invalid("presented_key_id", e))?;
        if home != self.state.ccf_id {
            return Err(invalid(
                "home_ccf_id",
                format!("this gateway serves {} only", self.state.ccf_id),
            ));
        }
        let mut r = Request::new(PartnerSecurityInformationRequest {
            partner_ccf_id: partner.to_string(),
            query: Some(q),
        });
        let remaining = deadline.saturating_duration_since(Instant::now());
        r.set_timeout(remaining);
        let mut ccf = self.state.ccf.clone();
        let answer = match tokio::time::timeout(
            remaining,
            ccf.get_security_information_for_partner(r),
        )
        .await
        {
            Ok(Ok(rsp)) => rsp.into_inner(),
            // A definite answer of the CCF (it carries a reason) goes back as is.
            Ok(Err(s)) if error_reason(&s).is_some() => return Err(s),
            Ok(Err(s)) => {
                tracing::error!(error = %s.message(), "own CCF unreachable");
                return Err(error_status(
                    Code::Unavailable,
                    ErrorReason::PartnerUnavailable,
                    format!("the CCF of {} is unavailable", self.state.ccf_id),
                ));
            }
            Err(_) => {
                return Err(error_status(
                    Code::DeadlineExceeded,
                    ErrorReason::PartnerTimeout,
                    format!(
                        "the CCF of {} did not answer within the deadline",
                        self.state.ccf_id
                    ),
                ));
            }
        };
        self.state.record_fetch(&invoker, &partner);
        self.state
            .partner_requests_served
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%partner, api_invoker_id = %invoker, key_id = %answer.key_id, "key handed to partner");
        Ok(Response::new(answer))
    }

    async fn notify_revocation(
        &self,
        request: Request<RevocationNotice>,
    ) -> Result<Response<RevocationAck>, Status> {
        let partner = self.partner(&request)?;
        let notice = request.into_inner();
        if notice.home_ccf_id != partner.as_str() {
            return Err(error_status(
                Code::PermissionDenied,
                ErrorReason::IdentityMismatch,
                format!("{partner} may revoke only its own invokers"),
            ));
        }
        let invoker = ApiInvokerId::new(notice.api_invoker_id.clone())
            .map_err(|e| invalid("api_invoker_id", e))?;
        let removed = self
            .state
            .cache
            .evict_where(|k| {
                k.home == partner
                    && k.invoker == invoker
                    && (notice.aef_ids.is_empty()
                        || notice.aef_ids.iter().any(|a| a == k.aef.as_str()))
            })
            .await;
        self.state
            .revocations_received
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%partner, api_invoker_id = %invoker, removed, kind = ?notice.kind(), "revocation received");
        // Tell the own CCF (which tells its AEFs); a slow CCF must not hold up the partner.
        let mut ccf = self.state.ccf.clone();
        let forward = notice.clone();
        tokio::spawn(async move {
            let mut r = Request::new(forward);
            r.set_timeout(std::time::Duration::from_secs(2));
            if let Err(e) = ccf.notify_revocation(r).await {
                tracing::warn!(error = %e.message(), "could not pass the revocation to the CCF");
            }
        });
        Ok(Response::new(RevocationAck {
            entries_removed: removed as u32,
            forwarded: 1,
        }))
    }

    async fn get_token_key_set(
        &self,
        request: Request<TokenKeySetRequest>,
    ) -> Result<Response<TokenKeySet>, Status> {
        let partner = self.partner(&request)?;
        let remaining = inner_budget(budget(
            &request,
            self.state.default_budget,
            self.state.max_budget,
        ));
        let req = request.into_inner();
        if !req.issuer_ccf_id.is_empty() && req.issuer_ccf_id != self.state.ccf_id.as_str() {
            return Err(invalid(
                "issuer_ccf_id",
                format!("this gateway serves {} only", self.state.ccf_id),
            ));
        }
        let mut r = Request::new(TokenKeySetRequest {
            issuer_ccf_id: self.state.ccf_id.to_string(),
            unknown_kid: String::new(),
        });
        r.set_timeout(remaining);
        let mut ccf = self.state.ccf.clone();
        match tokio::time::timeout(remaining, ccf.get_token_key_set(r)).await {
            Ok(Ok(rsp)) => {
                tracing::info!(%partner, "token keys handed to partner");
                Ok(rsp)
            }
            Ok(Err(s)) if error_reason(&s).is_some() => Err(s),
            Ok(Err(s)) => {
                tracing::error!(error = %s.message(), "own CCF unreachable");
                Err(error_status(
                    Code::Unavailable,
                    ErrorReason::PartnerUnavailable,
                    format!("the CCF of {} is unavailable", self.state.ccf_id),
                ))
            }
            Err(_) => Err(error_status(
                Code::DeadlineExceeded,
                ErrorReason::PartnerTimeout,
                format!(
                    "the CCF of {} did not answer within the deadline",
                    self.state.ccf_id
                ),
            )),
        }
    }
}
