//! `InvokerManagement`: onboarding (server-auth TLS listener) and offboarding (CAPIF-1e).
//!
//! Onboarding checks the pre-provisioned credential, issues a client certificate for the
//! invoker's public key and stores the invoker and the used credential in one transaction: a bad
//! or reused credential stores nothing.

use std::sync::Arc;

use capif_proto::v1::{
    OffboardRequest, OffboardResponse, OnboardRequest, OnboardResponse, RevocationKind,
    RevocationNotice, invoker_management_server::InvokerManagement,
};
use tonic::{Request, Response, Status};

use super::{Refused, calling_invoker, store_status};
use crate::server::{CcfState, credential_digest, now_ms};
use crate::store::InvokerRecord;
use ccf_core::grpc::{caller, invalid_field};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::ApiInvokerId;

/// The InvokerManagement service.
#[derive(Clone, Debug)]
pub struct InvokerManagementService {
    state: Arc<CcfState>,
}

impl InvokerManagementService {
    /// A service over the CCF's state.
    pub fn new(state: Arc<CcfState>) -> Self {
        Self { state }
    }
}

fn bad_credential() -> Status {
    Refused::BadOnboardingCredential.into()
}

fn new_invoker_id() -> ApiInvokerId {
    let bytes: [u8; 8] = rand::random();
    // "inv-" + 16 hex digits always passes validation.
    ApiInvokerId::new(format!("inv-{}", hex::encode(bytes))).unwrap_or_else(|_| unreachable!())
}

impl InvokerManagementService {
    /// Onboarding: the credential checked, the certificate issued, both stored at once.
    async fn onboard_checked(
        &self,
        request: Request<OnboardRequest>,
    ) -> Result<Response<OnboardResponse>, Status> {
        let req = request.into_inner();
        let info = req
            .onboarding_information
            .ok_or_else(|| invalid_field("onboarding_information", "is required"))?;
        if info.onboarding_credential.is_empty() || info.onboarding_credential.len() > 4096 {
            return Err(bad_credential());
        }
        if info.api_invoker_public_key.is_empty() || info.api_invoker_public_key.len() > 8192 {
            return Err(invalid_field(
                "onboarding_information.api_invoker_public_key",
                "must be a PEM PUBLIC KEY of at most 8192 characters",
            ));
        }
        if req.api_invoker_information.len() > 1024 || req.notification_destination.len() > 2048 {
            return Err(invalid_field(
                "api_invoker_information / notification_destination",
                "too long (1024 / 2048 characters at most)",
            ));
        }
        let digest = credential_digest(&info.onboarding_credential);
        let state = &self.state;
        if !state.credential_configured(&digest)
            || state
                .store
                .credential_used(&digest)
                .await
                .map_err(store_status)?
        {
            tracing::info!("onboarding refused: unknown or reused credential");
            return Err(bad_credential());
        }
        let id = new_invoker_id();
        let identity = PeerIdentity::new(state.ccf_id.clone(), Role::Invoker(id.clone()));
        let certificate = state
            .ca
            .issue_for_public_key_pem(
                &identity,
                &info.api_invoker_public_key,
                state.cert_validity_days,
            )
            .map_err(|e| invalid_field("onboarding_information.api_invoker_public_key", e))?;
        let record = InvokerRecord {
            api_invoker_id: id.clone(),
            certificate_pem: certificate.clone(),
            public_key_pem: info.api_invoker_public_key,
            onboarded_at_ms: now_ms(),
            information: req.api_invoker_information,
            notification_destination: req.notification_destination,
        };
        // The store re-checks the credential inside the transaction: two concurrent onboardings
        // with one credential cannot both succeed.
        state
            .store
            .onboard(&digest, &record)
            .await
            .map_err(store_status)?;
        tracing::info!(api_invoker_id = %id, "invoker onboarded");
        Ok(Response::new(OnboardResponse {
            api_invoker_id: id.to_string(),
            api_invoker_certificate: certificate,
            ca_certificates: vec![state.ca.cert_pem().to_string()],
            ccf_id: state.ccf_id.to_string(),
        }))
    }
}

#[tonic::async_trait]
impl InvokerManagement for InvokerManagementService {
    async fn onboard(
        &self,
        request: Request<OnboardRequest>,
    ) -> Result<Response<OnboardResponse>, Status> {
        let result = self.onboard_checked(request).await;
        self.state.metrics.onboarded(&result);
        result
    }

    async fn offboard(
        &self,
        request: Request<OffboardRequest>,
    ) -> Result<Response<OffboardResponse>, Status> {
        let who = caller(&request)?;
        let id = calling_invoker(&self.state, &who, "offboard an invoker").await?;
        if request.get_ref().api_invoker_id != id.as_str() {
            return Err(Refused::NotTheCaller {
                field: "api_invoker_id",
                caller: id.to_string(),
            }
            .into());
        }
        // The notice is queued for the gateway in the transaction that offboards.
        let mut notice = RevocationNotice::default();
        let removed = self
            .state
            .store
            .offboard_queueing(&id, |removed| {
                notice = self.state.revocation_notice(
                    RevocationNotice {
                        home_ccf_id: self.state.ccf_id.to_string(),
                        api_invoker_id: id.to_string(),
                        aef_ids: Vec::new(),
                        kind: RevocationKind::Offboarded as i32,
                        cause: capif_proto::v1::Cause::InvokerOffboarded as i32,
                        key_id: String::new(),
                        ..Default::default()
                    },
                    removed,
                );
                self.state.to_queue(&notice)
            })
            .await
            .map_err(store_status)?;
        tracing::info!(api_invoker_id = %id, contexts = removed.len(), "invoker offboarded");
        self.state.metrics.offboarded();
        self.state.publish_revocation(
            notice,
            &removed.iter().map(|c| c.aef_id.clone()).collect::<Vec<_>>(),
        );
        Ok(Response::new(OffboardResponse {
            security_contexts_removed: removed.len() as u32,
        }))
    }
}
