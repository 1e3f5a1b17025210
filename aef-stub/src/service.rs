//! The AEF's two gRPC services: `AefSecurity` (Authentication Initiation for invokers, revocation
//! from the CCF) on the security listener, and `DemoApi` behind the TLS-PSK endpoint, where the
//! invoker is the one its PSK handshake authenticated and may call only the APIs its
//! authorization information lists (seed 000 step 6).

use std::sync::Arc;
use std::time::{Duration, Instant};

use capif_proto::v1::{
    self as pb, CheckAuthenticationReq, CheckAuthenticationRsp, ErrorReason, InvokeRequest,
    InvokeResponse, RevokeAuthorizationReq, RevokeAuthorizationRsp,
    aef_security_server::AefSecurity, demo_api_server::DemoApi, security_client::SecurityClient,
};
use ccf_core::grpc::{caller, error_reason, error_status};
use ccf_core::identity::Role;
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::kdf::AefPsk;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::identity::PskIdentity;
use crate::keys::{HeldKey, KeyStore};
use crate::psk::PskPeer;

/// What both services share.
#[derive(Debug)]
pub struct AefState {
    /// This AEF.
    pub aef_id: AefId,
    /// Its domain.
    pub ccf_id: CcfId,
    /// Keys held.
    pub keys: Arc<KeyStore>,
    /// CAPIF-3 client of the own CCF.
    pub ccf: SecurityClient<Channel>,
    /// What invokers are told to dial for the PSK endpoint.
    pub psk_endpoint: String,
    /// APIs served.
    pub apis: Vec<String>,
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    error_status(
        Code::InvalidArgument,
        ErrorReason::InvalidField,
        format!("{field}: {e}"),
    )
}

/// The AefSecurity service.
#[derive(Clone, Debug)]
pub struct AefSecurityService {
    state: Arc<AefState>,
}

impl AefSecurityService {
    /// Over the AEF's state.
    pub fn new(state: Arc<AefState>) -> Self {
        Self { state }
    }

    async fn fetch(
        &self,
        invoker: &ApiInvokerId,
        home: &CcfId,
        presented: &str,
    ) -> Result<HeldKey, Status> {
        let mut r = Request::new(pb::GetSecurityInformationRequest {
            api_invoker_id: invoker.to_string(),
            aef_id: self.state.aef_id.to_string(),
            home_ccf_id: home.to_string(),
            authentication_info: true,
            authorization_info: true,
            presented_key_id: presented.to_string(),
        });
        r.set_timeout(Duration::from_secs(5));
        let sent_at = Instant::now();
        let mut info = self
            .state
            .ccf
            .clone()
            .get_security_information(r)
            .await
            .map_err(|s| {
                if error_reason(&s).is_some() {
                    s
                } else {
                    error_status(
                        Code::Unavailable,
                        ErrorReason::PartnerUnavailable,
                        format!("the CCF of {} is unreachable", self.state.ccf_id),
                    )
                }
            })?
            .into_inner();
        let psk = AefPsk::from_slice(&info.aef_psk);
        zeroize::Zeroize::zeroize(&mut info.aef_psk);
        let psk = psk.ok_or_else(|| {
            error_status(
                Code::FailedPrecondition,
                ErrorReason::MethodMismatch,
                format!("the CCF holds no PSK for API invoker {invoker} at this AEF"),
            )
        })?;
        Ok(HeldKey {
            key_id: info.key_id.clone(),
            psk,
            home_ccf_id: home.to_string(),
            // The AEF's own timer starts from the remaining validity it was given.
            expires_at: sent_at + Duration::from_millis(info.remaining_validity_ms),
            allowed_apis: info.allowed_api_names.clone(),
        })
    }
}

#[tonic::async_trait]
impl AefSecurity for AefSecurityService {
    async fn check_authentication(
        &self,
        request: Request<CheckAuthenticationReq>,
    ) -> Result<Response<CheckAuthenticationRsp>, Status> {
        let req = request.into_inner();
        let invoker = ApiInvokerId::new(req.api_invoker_id.clone())
            .map_err(|e| invalid("api_invoker_id", e))?;
        let home = if req.home_ccf_id.is_empty() {
            self.state.ccf_id.clone()
        } else {
            CcfId::new(req.home_ccf_id.clone()).map_err(|e| invalid("home_ccf_id", e))?
        };
        let method = pb::SecurityMethod::try_from(req.security_method)
            .unwrap_or(pb::SecurityMethod::Unspecified);
        if !matches!(
            method,
            pb::SecurityMethod::Psk | pb::SecurityMethod::Unspecified
        ) {
            return Err(error_status(
                Code::FailedPrecondition,
                ErrorReason::MethodMismatch,
                format!("AEF {} serves only PSK in this release", self.state.aef_id),
            ));
        }
        let held = self.state.keys.valid(&invoker).filter(|k| {
            k.home_ccf_id == home.as_str() && (req.key_id.is_empty() || req.key_id == k.key_id)
        });
        let key = match held {
            Some(k) => k,
            None => {
                let k = self.fetch(&invoker, &home, &req.key_id).await?;
                self.state.keys.put(invoker.clone(), k.clone());
                tracing::info!(api_invoker_id = %invoker, %home, key_id = %k.key_id, remaining_ms = k.remaining().as_millis() as u64, "key fetched from CCF");
                k
            }
        };
        let identity = PskIdentity {
            home_ccf_id: home,
            api_invoker_id: invoker,
            key_id: key.key_id.clone(),
        };
        Ok(Response::new(CheckAuthenticationRsp {
            supported_features: req.supported_features,
            tls_endpoint: self.state.psk_endpoint.clone(),
            psk_identity: identity.to_string(),
            key_id: key.key_id.clone(),
            remaining_validity_ms: key.remaining().as_millis() as u64,
        }))
    }

    async fn revoke_authorization(
        &self,
        request: Request<RevokeAuthorizationReq>,
    ) -> Result<Response<RevokeAuthorizationRsp>, Status> {
        let who = caller(&request)?;
        if who.ccf_id != self.state.ccf_id || who.role != Role::Ccf {
            return Err(error_status(
                Code::PermissionDenied,
                ErrorReason::RoleNotAllowed,
                format!("{who} may not revoke authorizations at this AEF"),
            ));
        }
        let req = request.into_inner();
        let info = req
            .revoke_info
            .ok_or_else(|| invalid("revoke_info", "is required"))?;
        let invoker = ApiInvokerId::new(info.api_invoker_id)
            .map_err(|e| invalid("revoke_info.api_invoker_id", e))?;
        let closed = self.state.keys.revoke(&invoker);
        tracing::info!(api_invoker_id = %invoker, connections_closed = closed, "authorization revoked by the CCF");
        Ok(Response::new(RevokeAuthorizationRsp {
            supported_features: req.supported_features,
            connections_closed: closed,
        }))
    }
}

/// The demo API.
#[derive(Clone, Debug)]
pub struct DemoApiService {
    state: Arc<AefState>,
}

impl DemoApiService {
    /// Over the AEF's state.
    pub fn new(state: Arc<AefState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl DemoApi for DemoApiService {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeResponse>, Status> {
        let peer = request
            .extensions()
            .get::<PskPeer>()
            .cloned()
            .ok_or_else(|| {
                error_status(
                    Code::Unauthenticated,
                    ErrorReason::InternalFault,
                    "no PSK peer on this connection",
                )
            })?;
        let req = request.into_inner();
        let id = &peer.identity;
        let key = self
            .state
            .keys
            .for_handshake(&id.api_invoker_id, &id.key_id)
            .map_err(|r| {
                error_status(
                    Code::Unauthenticated,
                    ErrorReason::KeyExpired,
                    format!(
                        "the key of this connection is no longer valid: {}",
                        r.as_str()
                    ),
                )
            })?;
        if !self.state.apis.contains(&req.api_name) || !key.allowed_apis.contains(&req.api_name) {
            tracing::info!(api_invoker_id = %id.api_invoker_id, api = %req.api_name, "API call refused: not authorized");
            return Err(error_status(
                Code::PermissionDenied,
                ErrorReason::ApiNotAuthorized,
                format!(
                    "API invoker {} is not authorized for API {:?} at {}",
                    id.api_invoker_id, req.api_name, self.state.aef_id
                ),
            ));
        }
        tracing::info!(api_invoker_id = %id.api_invoker_id, api = %req.api_name, "API call served");
        Ok(Response::new(InvokeResponse {
            aef_id: self.state.aef_id.to_string(),
            api_name: req.api_name,
            api_invoker_id: id.api_invoker_id.to_string(),
            home_ccf_id: id.home_ccf_id.to_string(),
            key_id: id.key_id.clone(),
            result: req.payload,
        }))
    }
}
