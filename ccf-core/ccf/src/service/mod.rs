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
use ccf_core::grpc::{Refusal, error_status, invalid_field};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, IdError};
use ccf_core::kdf::AefPsk;

/// Why the CCF refuses: who asks, and what it may have. [`Refusal`] maps each variant to its
/// gRPC code and `ErrorReason`; the message is the `Display`.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The caller's certificate names another domain.
    #[error("{who} belongs to another domain than {own}")]
    OtherDomain {
        /// The caller.
        who: PeerIdentity,
        /// This CCF's domain.
        own: CcfId,
    },
    /// A request field names another identity than the caller's certificate (invariant 6).
    #[error("{field} must be the caller's own id ({caller})")]
    NotTheCaller {
        /// The field.
        field: &'static str,
        /// The id the certificate names.
        caller: String,
    },
    /// An AEF asked to revoke another AEF's authorization.
    #[error("an AEF may revoke authorization only for itself")]
    RevokesForAnotherAef,
    /// The caller's role may not call this RPC.
    #[error("{who} may not {what}")]
    RoleNotAllowed {
        /// The caller.
        who: PeerIdentity,
        /// What it tried.
        what: &'static str,
    },
    /// The calling invoker's certificate names an invoker that is no longer onboarded.
    #[error("API invoker {invoker} is no longer onboarded at {own}")]
    CallerOffboarded {
        /// The invoker.
        invoker: ApiInvokerId,
        /// This CCF's domain.
        own: CcfId,
    },
    /// The invoker asked about is not onboarded here.
    #[error("API invoker {invoker} is not onboarded at {own}")]
    InvokerNotFound {
        /// The invoker.
        invoker: ApiInvokerId,
        /// This CCF's domain.
        own: CcfId,
    },
    /// The invoker has no security context at all.
    #[error("API invoker {invoker} has not obtained a security method for any AEF")]
    NoSecurityContext {
        /// The invoker.
        invoker: ApiInvokerId,
    },
    /// The invoker's contexts are for other AEFs than the one asking.
    #[error("API invoker {invoker} holds no key for AEF {aef}; its keys are bound to other AEFs")]
    KeyBoundToOtherAef {
        /// The invoker.
        invoker: ApiInvokerId,
        /// The AEF asking.
        aef: AefId,
    },
    /// The invoker's key for the AEF has expired.
    #[error(
        "the key of API invoker {invoker} for AEF {aef} has expired; the invoker must obtain a new one"
    )]
    KeyExpired {
        /// The invoker.
        invoker: ApiInvokerId,
        /// The AEF.
        aef: AefId,
    },
    /// Invariant 1: a partner asked for a key bound to an AEF it does not own.
    #[error(
        "domain {partner} does not own AEF {aef}; keys bound to it are not handed to {partner}"
    )]
    PartnerNotAuthorized {
        /// The partner (from its gateway's certificate).
        partner: CcfId,
        /// The AEF named.
        aef: AefId,
    },
    /// The state store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Refusal for Refused {
    fn code(&self) -> Code {
        match self {
            Self::CallerOffboarded { .. } => Code::Unauthenticated,
            Self::InvokerNotFound { .. } | Self::NoSecurityContext { .. } => Code::NotFound,
            Self::OtherDomain { .. }
            | Self::NotTheCaller { .. }
            | Self::RevokesForAnotherAef
            | Self::RoleNotAllowed { .. }
            | Self::KeyBoundToOtherAef { .. }
            | Self::PartnerNotAuthorized { .. } => Code::PermissionDenied,
            Self::KeyExpired { .. } => Code::FailedPrecondition,
            Self::Store(e) => e.code(),
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            Self::OtherDomain { .. } | Self::NotTheCaller { .. } | Self::RevokesForAnotherAef => {
                ErrorReason::IdentityMismatch
            }
            Self::RoleNotAllowed { .. } => ErrorReason::RoleNotAllowed,
            Self::CallerOffboarded { .. } | Self::InvokerNotFound { .. } => {
                ErrorReason::InvokerNotFound
            }
            Self::NoSecurityContext { .. } => ErrorReason::NoSecurityContext,
            Self::KeyBoundToOtherAef { .. } => ErrorReason::KeyBoundToOtherAef,
            Self::KeyExpired { .. } => ErrorReason::KeyExpired,
            Self::PartnerNotAuthorized { .. } => ErrorReason::PartnerNotAuthorized,
            Self::Store(e) => e.reason(),
        }
    }

    fn status(&self) -> Status {
        match self {
            Self::Store(e) => e.status(),
            _ => error_status(self.code(), self.reason(), self.to_string()),
        }
    }
}

impl From<Refused> for Status {
    fn from(e: Refused) -> Self {
        e.status()
    }
}

/// A store failure other than a refusal says nothing about the store to the caller: it is
/// logged here, and answered `STORE_FAILURE` with a fixed sentence.
impl Refusal for StoreError {
    fn code(&self) -> Code {
        match self {
            StoreError::InvokerGone => Code::NotFound,
            StoreError::CredentialUsed => Code::Unauthenticated,
            _ => Code::Internal,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            StoreError::InvokerGone => ErrorReason::InvokerNotFound,
            StoreError::CredentialUsed => ErrorReason::OnboardingCredentialInvalid,
            _ => ErrorReason::StoreFailure,
        }
    }

    fn status(&self) -> Status {
        let message = match self {
            StoreError::InvokerGone => "the API invoker is not onboarded at this CCF",
            StoreError::CredentialUsed => {
                "the onboarding credential is unknown to this domain or was already used"
            }
            other => {
                tracing::error!(error = %ccf_core::grpc::error_chain(other), "state store failure");
                "the CCF could not access its state store; nothing was changed"
            }
        };
        error_status(self.code(), self.reason(), message)
    }
}

pub(crate) fn parse_id<T>(
    field: &str,
    s: &str,
    f: impl FnOnce(&str) -> Result<T, IdError>,
) -> Result<T, Status> {
    f(s).map_err(|e| invalid_field(field, e))
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
        .map_err(|e| invalid_field(field, e))
}

pub(crate) fn ccf_id(field: &str, s: &str) -> Result<CcfId, Status> {
    parse_id(field, s, |v| CcfId::new(v))
}

/// The status of a store error (`map_err(store_status)`).
pub(crate) fn store_status(e: StoreError) -> Status {
    e.status()
}

pub(crate) fn role_not_allowed(who: &PeerIdentity, what: &'static str) -> Refused {
    Refused::RoleNotAllowed {
        who: who.clone(),
        what,
    }
}

/// The caller must belong to this domain.
pub(crate) fn own_domain(state: &CcfState, who: &PeerIdentity) -> Result<(), Refused> {
    if who.ccf_id != state.ccf_id {
        return Err(Refused::OtherDomain {
            who: who.clone(),
            own: state.ccf_id.clone(),
        });
    }
    Ok(())
}

/// The calling invoker, which must be onboarded here.
pub(crate) fn calling_invoker(
    state: &CcfState,
    who: &PeerIdentity,
    what: &'static str,
) -> Result<ApiInvokerId, Refused> {
    own_domain(state, who)?;
    let Role::Invoker(id) = &who.role else {
        return Err(role_not_allowed(who, what));
    };
    if state.store.invoker(id)?.is_none() {
        return Err(Refused::CallerOffboarded {
            invoker: id.clone(),
            own: state.ccf_id.clone(),
        });
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
) -> Result<SecurityContext, Refused> {
    if state.store.invoker(invoker)?.is_none() {
        return Err(Refused::InvokerNotFound {
            invoker: invoker.clone(),
            own: state.ccf_id.clone(),
        });
    }
    let Some(ctx) = state.store.context(invoker, aef)? else {
        let others = state.store.contexts_of(invoker)?;
        return Err(if others.is_empty() {
            Refused::NoSecurityContext {
                invoker: invoker.clone(),
            }
        } else {
            Refused::KeyBoundToOtherAef {
                invoker: invoker.clone(),
                aef: aef.clone(),
            }
        });
    };
    if ctx.expires_at_ms <= now_ms() {
        return Err(Refused::KeyExpired {
            invoker: invoker.clone(),
            aef: aef.clone(),
        });
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccf_core::grpc::reason_of;

    /// The one mapping: each refusal's code and reason, as the contract has them; a store
    /// failure says nothing about the store.
    #[test]
    fn each_refusal_has_its_code_and_reason() {
        let a = CcfId::new("operator-a.test").unwrap();
        let inv = ApiInvokerId::new("inv-1").unwrap();
        let aef = AefId::new("aef-a1").unwrap();
        let who = PeerIdentity::new(a.clone(), Role::Operator);
        let cases = [
            (
                Refused::OtherDomain {
                    who: who.clone(),
                    own: a.clone(),
                },
                Code::PermissionDenied,
                ErrorReason::IdentityMismatch,
            ),
            (
                Refused::NotTheCaller {
                    field: "aef_id",
                    caller: "aef-a1".into(),
                },
                Code::PermissionDenied,
                ErrorReason::IdentityMismatch,
            ),
            (
                role_not_allowed(&who, "ask"),
                Code::PermissionDenied,
                ErrorReason::RoleNotAllowed,
            ),
            (
                Refused::CallerOffboarded {
                    invoker: inv.clone(),
                    own: a.clone(),
                },
                Code::Unauthenticated,
                ErrorReason::InvokerNotFound,
            ),
            (
                Refused::InvokerNotFound {
                    invoker: inv.clone(),
                    own: a.clone(),
                },
                Code::NotFound,
                ErrorReason::InvokerNotFound,
            ),
            (
                Refused::NoSecurityContext {
                    invoker: inv.clone(),
                },
                Code::NotFound,
                ErrorReason::NoSecurityContext,
            ),
            (
                Refused::KeyBoundToOtherAef {
                    invoker: inv.clone(),
                    aef: aef.clone(),
                },
                Code::PermissionDenied,
                ErrorReason::KeyBoundToOtherAef,
            ),
            (
                Refused::KeyExpired {
                    invoker: inv,
                    aef: aef.clone(),
                },
                Code::FailedPrecondition,
                ErrorReason::KeyExpired,
            ),
            (
                Refused::PartnerNotAuthorized { partner: a, aef },
                Code::PermissionDenied,
                ErrorReason::PartnerNotAuthorized,
            ),
            (
                Refused::Store(StoreError::InvokerGone),
                Code::NotFound,
                ErrorReason::InvokerNotFound,
            ),
            (
                Refused::Store(StoreError::CredentialUsed),
                Code::Unauthenticated,
                ErrorReason::OnboardingCredentialInvalid,
            ),
        ];
        for (e, code, reason) in cases {
            let s = Status::from(e);
            assert_eq!((s.code(), reason_of(&s)), (code, Some(reason)), "{s:?}");
        }
        let corrupt = serde_json::from_str::<u8>("x").unwrap_err();
        let s = Status::from(Refused::Store(StoreError::Corrupt(corrupt)));
        assert_eq!(
            (s.code(), reason_of(&s)),
            (Code::Internal, Some(ErrorReason::StoreFailure))
        );
        assert!(!s.message().contains("corrupt"), "{}", s.message());
    }
}
