//! `CcfAdmin`: what the domain's operator does to a running CCF (operator role, mutual TLS).
//! Today: rotating the access-token signing key without a restart.

use std::sync::Arc;

use capif_proto::v1::{RotateTokenSigningKeyRequest, TokenKeySet, ccf_admin_server::CcfAdmin};
use tonic::{Request, Response, Status};

use super::{Refused, own_domain, role_not_allowed};
use crate::server::{CcfState, now_ms};
use ccf_core::grpc::caller;
use ccf_core::identity::Role;

/// The CcfAdmin service.
#[derive(Clone, Debug)]
pub struct CcfAdminService {
    state: Arc<CcfState>,
}

impl CcfAdminService {
    /// A service over the CCF's state.
    pub fn new(state: Arc<CcfState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl CcfAdmin for CcfAdminService {
    async fn rotate_token_signing_key(
        &self,
        request: Request<RotateTokenSigningKeyRequest>,
    ) -> Result<Response<TokenKeySet>, Status> {
        let who = caller(&request)?;
        own_domain(&self.state, &who)?;
        if who.role != Role::Operator {
            return Err(role_not_allowed(&who, "rotate the token signing key").into());
        }
        let previous = self.state.token_keys.current_kid();
        let lifetime = self.state.token_lifetime.as_secs();
        let kid = self
            .state
            .store
            .rotate_token_key(&self.state.token_keys, lifetime, now_ms())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "token signing key rotation failed");
                Refused::KeyRotationFailed
            })?;
        tracing::info!(%previous, current = %kid, "token signing key rotated");
        Ok(Response::new(self.state.own_key_set().await))
    }
}
