//! The CCF's gRPC services, one file each: `InvokerManagement` (onboarding, offboarding),
//! `Security` (CAPIF-1e and CAPIF-3), `Federation` (CAPIF-6, called by the domain's gateway) and
//! `CcfAdmin` (the operator).
//! Shared here: turning library errors and bad input into statuses with stable reasons.

mod admin;
mod federation;
mod invoker_management;
mod security;

pub use admin::CcfAdminService;
pub use federation::FederationService;
pub use invoker_management::InvokerManagementService;
pub use security::SecurityService;

use capif_proto::v1::{self as pb, ErrorReason};
use tonic::{Code, Status};

use crate::server::{CcfState, now_ms};
use crate::store::{SecurityContext, StoreError};
use ccf_core::grpc::error_status;
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, IdError};
use ccf_core::kdf::AefPsk;

pub(crate) fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    error_status(
        Code::InvalidArgument,
        ErrorReason::InvalidField,
        format!("{field}: {e}"),
    )
}

pub(crate) fn parse_id<T>(
    field: &str,
    s: &str,
    f: impl FnOnce(&str) -> Result<T, IdError>,
) -> Result<T, Status> {
    f(s).map_err(|e| invalid(field, e))
}

pub(crate) fn invoker_id(field: &str, s: &str) -> Result<ApiInvokerId, Status> {
    parse_id(field, s, |v| ApiInvokerId::new(v))
}

pub(crate) fn aef_id(field: &str, s: &str) -> Result<AefId, Status> {
    parse_id(field, s, |v| AefId::new(v))
}

/// A key id a request may leave empty (`presented_key_id`): checked when present.
pub(crate) fn optional_key_id(field: &str, s: &str) -> Result<(), Status> {
    ccf_core::ids::KeyId::optional(s)
        .map(|_| ())
        .map_err(|e| invalid(field, e))
}

pub(crate) fn ccf_id(field: &str, s: &str) -> Result<CcfId, Status> {
    parse_id(field, s, |v| CcfId::new(v))
}

pub(crate) fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::InvokerGone => error_status(
            Code::NotFound,
            ErrorReason::InvokerNotFound,
            "the API invoker is not onboarded at this CCF",
        ),
        StoreError::CredentialUsed => error_status(
            Code::Unauthenticated,
            ErrorReason::OnboardingCredentialInvalid,
            "the onboarding credential is unknown to this domain or was already used",
        ),
        other => {
            tracing::error!(error = %other, "state store failure");
            error_status(
                Code::Internal,
                ErrorReason::StoreFailure,
                "the CCF could not access its state store; nothing was changed",
            )
        }
    }
}

pub(crate) fn role_not_allowed(who: &PeerIdentity, what: &str) -> Status {
    error_status(
        Code::PermissionDenied,
        ErrorReason::RoleNotAllowed,
        format!("{who} may not {what}"),
    )
}

/// The caller must belong to this domain.
pub(crate) fn own_domain(state: &CcfState, who: &PeerIdentity) -> Result<(), Status> {
    if who.ccf_id != state.ccf_id {
        return Err(error_status(
            Code::PermissionDenied,
            ErrorReason::IdentityMismatch,
            format!("{who} belongs to another domain than {}", state.ccf_id),
        ));
    }
    Ok(())
}

/// The calling invoker, which must be onboarded here.
pub(crate) fn calling_invoker(
    state: &CcfState,
    who: &PeerIdentity,
    what: &str,
) -> Result<ApiInvokerId, Status> {
    own_domain(state, who)?;
    let Role::Invoker(id) = &who.role else {
        return Err(role_not_allowed(who, what));
    };
    if state.store.invoker(id).map_err(store_status)?.is_none() {
        return Err(error_status(
            Code::Unauthenticated,
            ErrorReason::InvokerNotFound,
            format!(
                "API invoker {id} is no longer onboarded at {}",
                state.ccf_id
            ),
        ));
    }
    Ok(id.clone())
}

/// The answer an AEF (or a partner) gets for a stored context.
pub(crate) fn security_information(
    state: &CcfState,
    ctx: &SecurityContext,
) -> pb::InvokerSecurityInformation {
    pb::InvokerSecurityInformation {
        api_invoker_id: ctx.api_invoker_id.to_string(),
        home_ccf_id: state.ccf_id.to_string(),
        aef_id: ctx.aef_id.to_string(),
        sel_security_method: ctx.method.to_proto() as i32,
        aef_psk: ctx
            .aef_psk
            .as_ref()
            .map(|k: &AefPsk| k.expose().to_vec())
            .unwrap_or_default(),
        key_id: ctx.key_id.clone(),
        remaining_validity_ms: ctx.expires_at_ms.saturating_sub(now_ms()),
        allowed_api_names: ctx.allowed_apis.iter().map(|a| a.to_string()).collect(),
        invoker_ca_certificates: if ctx.method == ccf_core::registry::SecurityMethod::Pki {
            vec![state.ca.cert_pem().to_string()]
        } else {
            Vec::new()
        },
        interface_canonical: ctx.interface_canonical.clone(),
    }
}

/// Looks up the context of `invoker` for `aef` and checks it can be handed out now.
pub(crate) fn valid_context(
    state: &CcfState,
    invoker: &ApiInvokerId,
    aef: &AefId,
) -> Result<SecurityContext, Status> {
    if state
        .store
        .invoker(invoker)
        .map_err(store_status)?
        .is_none()
    {
        return Err(error_status(
            Code::NotFound,
            ErrorReason::InvokerNotFound,
            format!("API invoker {invoker} is not onboarded at {}", state.ccf_id),
        ));
    }
    let Some(ctx) = state.store.context(invoker, aef).map_err(store_status)? else {
        let others = state.store.contexts_of(invoker).map_err(store_status)?;
        return Err(if others.is_empty() {
            error_status(
                Code::NotFound,
                ErrorReason::NoSecurityContext,
                format!("API invoker {invoker} has not obtained a security method for any AEF"),
            )
        } else {
            error_status(
                Code::PermissionDenied,
                ErrorReason::KeyBoundToOtherAef,
                format!(
                    "API invoker {invoker} holds no key for AEF {aef}; its keys are bound to other AEFs"
                ),
            )
        });
    };
    if ctx.expires_at_ms <= now_ms() {
        return Err(error_status(
            Code::FailedPrecondition,
            ErrorReason::KeyExpired,
            format!(
                "the key of API invoker {invoker} for AEF {aef} has expired; the invoker must obtain a new one"
            ),
        ));
    }
    Ok(ctx)
}
