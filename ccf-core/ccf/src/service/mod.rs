//! The CCF's gRPC services, one file each: `InvokerManagement` (onboarding, offboarding),
//! `Security` (CAPIF-1e and CAPIF-3), `Federation` (CAPIF-6, called by the domain's gateway) and
//! `CcfAdmin` (the operator).
//! Shared here: turning library errors and bad input into statuses with stable reasons.

mod admin;
mod federation;
mod invoker_management;
mod security;

pub use admin::CcfAdminService;
pub use federation::{FederationService, HandedToPartner};
pub use invoker_management::InvokerManagementService;
pub use security::SecurityService;

use capif_proto::v1::{self as pb, ErrorReason};
use tonic::{Code, Status};

use crate::server::{CcfState, now_ms};
use crate::store::{ContextLookup, SecurityContext, StoreError};
use ccf_core::grpc::{Refusal, error_status, invalid_field};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, ApiName, CcfId, IdError};
use ccf_core::kdf::{AefPsk, Capif1eProfile};
use ccf_core::registry::SecurityMethod;
use ccf_core::token::TokenError;

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
    /// Onboarding: the credential is malformed, unknown to this domain, or already used.
    #[error("the onboarding credential is unknown to this domain or was already used")]
    BadOnboardingCredential,
    /// CAPIF-1e: a `security_info` entry names no AEF registered here.
    #[error("{field}: no such AEF is registered at {own}")]
    AefNotRegistered {
        /// The entry (`service_security.security_info[i]`).
        field: String,
        /// This CCF's domain.
        own: CcfId,
    },
    /// CAPIF-1e Update: the invoker has no context for the AEF to update.
    #[error("no security context for AEF {aef} to update")]
    NothingToUpdate {
        /// The AEF.
        aef: AefId,
    },
    /// CAPIF-1e: the AEF supports none of the invoker's preferred methods.
    #[error("AEF {aef} supports none of the preferred methods (it supports {supported:?})")]
    NoCommonMethod {
        /// The AEF.
        aef: AefId,
        /// The methods it supports.
        supported: Vec<SecurityMethod>,
    },
    /// CAPIF-1e: the AEF does not expose the API asked for.
    #[error("AEF {aef} does not expose API {api}")]
    ApiNotExposed {
        /// The AEF.
        aef: AefId,
        /// The API asked for.
        api: ApiName,
    },
    /// CAPIF-1e over PSK: the request's TLS session has no binding to derive the AEFPSK from.
    #[error("the CAPIF-1e TLS session binding is missing")]
    SessionBindingMissing,
    /// CAPIF-1e over PSK on a TLS session of another CAPIF-1e profile than the domain's: the key
    /// would be derived in a way the domain does not use (docs/PROTOCOL.md section 4).
    #[error(
        "{own} derives AEFPSKs by CAPIF-1e profile {domain}, but this TLS session is of profile \
         {session}{}",
        if *.domain == Capif1eProfile::Tls12AnnexA {
            ": obtain PSK on the CCF's CAPIF-1e listener (TLS 1.2)"
        } else {
            ""
        }
    )]
    Capif1eProfileMismatch {
        /// This CCF's domain.
        own: CcfId,
        /// The domain's profile.
        domain: Capif1eProfile,
        /// The profile of the request's TLS session.
        session: Capif1eProfile,
    },
    /// CAPIF-3: a foreign invoker's security information, with no gateway to ask its home.
    #[error(
        "API invoker {invoker} belongs to {home}, and {own} has no interconnect gateway configured"
    )]
    NoInterconnectForInvoker {
        /// The invoker.
        invoker: ApiInvokerId,
        /// Its home domain.
        home: CcfId,
        /// This CCF's domain.
        own: CcfId,
    },
    /// A foreign issuer's token keys, with no gateway to ask the issuer.
    #[error("tokens of {issuer} cannot be verified: {own} has no interconnect gateway configured")]
    NoInterconnectForIssuer {
        /// The issuing domain.
        issuer: CcfId,
        /// This CCF's domain.
        own: CcfId,
    },
    /// CAPIF-6: the invoker negotiated a method whose keys do not leave the domain (OAUTH).
    #[error(
        "API invoker {invoker} negotiated {method:?} for AEF {aef}; its tokens carry what the AEF needs"
    )]
    MethodHandsOutNoKey {
        /// The invoker.
        invoker: ApiInvokerId,
        /// The AEF.
        aef: AefId,
        /// The method negotiated.
        method: SecurityMethod,
    },
    /// OAuth: a grant type other than `client_credentials`.
    #[error("grant_type {grant_type:?} is not supported; use \"client_credentials\"")]
    UnsupportedGrantType {
        /// The grant type asked for.
        grant_type: String,
    },
    /// OAuth: `client_id` names another invoker than the caller's certificate.
    #[error("client_id must be the caller's own API invoker id ({invoker})")]
    ClientIdNotTheCaller {
        /// The invoker the certificate names.
        invoker: ApiInvokerId,
    },
    /// OAuth: the requested scope does not parse.
    #[error("{0}")]
    ScopeUnparsable(TokenError),
    /// OAuth: the invoker holds no valid OAUTH context.
    #[error(
        "API invoker {invoker} holds no valid security context with method OAUTH; obtain one first"
    )]
    NoOauthContext {
        /// The invoker.
        invoker: ApiInvokerId,
    },
    /// OAuth: the scope names an AEF the invoker holds no OAUTH context for.
    #[error("API invoker {invoker} holds no OAUTH security context for AEF {aef}")]
    ScopeAefNotAuthorized {
        /// The invoker.
        invoker: ApiInvokerId,
        /// The AEF.
        aef: AefId,
    },
    /// OAuth: the scope names an API the invoker's context for the AEF does not allow.
    #[error("API invoker {invoker} is not authorized for API {api} at AEF {aef}")]
    ScopeApiNotAuthorized {
        /// The invoker.
        invoker: ApiInvokerId,
        /// The API.
        api: ApiName,
        /// The AEF.
        aef: AefId,
    },
    /// OAuth: every context the token would rest on expires within a second.
    #[error("API invoker {invoker}'s security contexts expire within a second; obtain new ones")]
    ContextsExpiring {
        /// The invoker.
        invoker: ApiInvokerId,
    },
    /// OAuth: the token could not be signed (the cause is logged where it happened).
    #[error("the CCF could not sign the access token")]
    TokenSigningFailed,
    /// Admin: the rotated signing key could not be stored (the cause is logged where it happened).
    #[error("the new signing key could not be stored; the current key stays in use")]
    KeyRotationFailed,
    /// This domain's operator revoked the foreign invoker's access to this AEF.
    #[error(
        "API invoker {invoker} of {home} is refused at AEF {aef}: {own}'s operator revoked its access here"
    )]
    RevokedAtThisDomain {
        /// The invoker.
        invoker: ApiInvokerId,
        /// Its home domain.
        home: CcfId,
        /// The AEF asking.
        aef: AefId,
        /// This CCF's domain.
        own: CcfId,
    },
    /// Revocation of a foreign invoker: the AEF named is not one of this domain's.
    #[error(
        "AEF {aef} is not an AEF of {own}; only access to this domain's AEFs can be revoked here"
    )]
    NotOwnAef {
        /// The AEF named.
        aef: AefId,
        /// This CCF's domain.
        own: CcfId,
    },
    /// The state store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Refusal for Refused {
    fn code(&self) -> Code {
        match self {
            Self::CallerOffboarded { .. } | Self::BadOnboardingCredential => Code::Unauthenticated,
            Self::InvokerNotFound { .. }
            | Self::NoSecurityContext { .. }
            | Self::AefNotRegistered { .. }
            | Self::NothingToUpdate { .. }
            | Self::ApiNotExposed { .. }
            | Self::NotOwnAef { .. } => Code::NotFound,
            Self::OtherDomain { .. }
            | Self::NotTheCaller { .. }
            | Self::RevokesForAnotherAef
            | Self::RoleNotAllowed { .. }
            | Self::KeyBoundToOtherAef { .. }
            | Self::PartnerNotAuthorized { .. }
            | Self::ClientIdNotTheCaller { .. }
            | Self::ScopeAefNotAuthorized { .. }
            | Self::ScopeApiNotAuthorized { .. }
            | Self::RevokedAtThisDomain { .. } => Code::PermissionDenied,
            Self::KeyExpired { .. }
            | Self::NoCommonMethod { .. }
            | Self::NoInterconnectForInvoker { .. }
            | Self::NoInterconnectForIssuer { .. }
            | Self::MethodHandsOutNoKey { .. }
            | Self::NoOauthContext { .. }
            | Self::ContextsExpiring { .. }
            | Self::Capif1eProfileMismatch { .. } => Code::FailedPrecondition,
            Self::UnsupportedGrantType { .. } | Self::ScopeUnparsable(_) => Code::InvalidArgument,
            Self::SessionBindingMissing | Self::TokenSigningFailed | Self::KeyRotationFailed => {
                Code::Internal
            }
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
            Self::NoSecurityContext { .. } | Self::NothingToUpdate { .. } => {
                ErrorReason::NoSecurityContext
            }
            Self::KeyBoundToOtherAef { .. } => ErrorReason::KeyBoundToOtherAef,
            Self::KeyExpired { .. } => ErrorReason::KeyExpired,
            Self::PartnerNotAuthorized { .. } => ErrorReason::PartnerNotAuthorized,
            Self::BadOnboardingCredential => ErrorReason::OnboardingCredentialInvalid,
            Self::AefNotRegistered { .. } | Self::ApiNotExposed { .. } | Self::NotOwnAef { .. } => {
                ErrorReason::AefNotFound
            }
            Self::RevokedAtThisDomain { .. } => ErrorReason::RevokedAtThisDomain,
            Self::NoCommonMethod { .. } => ErrorReason::NoCommonSecurityMethod,
            Self::NoInterconnectForInvoker { .. } | Self::NoInterconnectForIssuer { .. } => {
                ErrorReason::NoInterconnect
            }
            Self::MethodHandsOutNoKey { .. } => ErrorReason::MethodMismatch,
            Self::UnsupportedGrantType { .. } => ErrorReason::UnsupportedGrantType,
            Self::ClientIdNotTheCaller { .. } => ErrorReason::InvalidClient,
            Self::ScopeUnparsable(_)
            | Self::ScopeAefNotAuthorized { .. }
            | Self::ScopeApiNotAuthorized { .. } => ErrorReason::InvalidScope,
            Self::NoOauthContext { .. } => ErrorReason::UnauthorizedClient,
            Self::ContextsExpiring { .. } => ErrorReason::InvalidGrant,
            Self::SessionBindingMissing | Self::TokenSigningFailed => ErrorReason::InternalFault,
            Self::Capif1eProfileMismatch { .. } => ErrorReason::Capif1eProfileMismatch,
            Self::KeyRotationFailed => ErrorReason::StoreFailure,
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
            // The database may be failing over or restarting: worth a retry, unlike a broken
            // file.
            StoreError::Postgres(_) => Code::Unavailable,
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
    of_domain(&state.ccf_id, who)
}

/// The caller must belong to domain `own`.
pub(crate) fn of_domain(own: &CcfId, who: &PeerIdentity) -> Result<(), Refused> {
    if &who.ccf_id != own {
        return Err(Refused::OtherDomain {
            who: who.clone(),
            own: own.clone(),
        });
    }
    Ok(())
}

/// The calling invoker, which must be onboarded here.
pub(crate) async fn calling_invoker(
    state: &CcfState,
    who: &PeerIdentity,
    what: &'static str,
) -> Result<ApiInvokerId, Refused> {
    own_domain(state, who)?;
    let Role::Invoker(id) = &who.role else {
        return Err(role_not_allowed(who, what));
    };
    if state.store.invoker(id).await?.is_none() {
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
pub(crate) async fn valid_context(
    state: &CcfState,
    invoker: &ApiInvokerId,
    aef: &AefId,
) -> Result<SecurityContext, Refused> {
    let ctx = match state.store.context_lookup(invoker, aef).await? {
        ContextLookup::Found(ctx) => ctx,
        ContextLookup::NoInvoker => {
            return Err(Refused::InvokerNotFound {
                invoker: invoker.clone(),
                own: state.ccf_id.clone(),
            });
        }
        ContextLookup::NoContext => {
            return Err(Refused::NoSecurityContext {
                invoker: invoker.clone(),
            });
        }
        ContextLookup::OtherAefsOnly => {
            return Err(Refused::KeyBoundToOtherAef {
                invoker: invoker.clone(),
                aef: aef.clone(),
            });
        }
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
mod props;

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
        let b = CcfId::new("operator-b.test").unwrap();
        let aef = AefId::new("aef-a1").unwrap();
        let api = ApiName::new("weather").unwrap();
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
                    invoker: inv.clone(),
                    aef: aef.clone(),
                },
                Code::FailedPrecondition,
                ErrorReason::KeyExpired,
            ),
            (
                Refused::PartnerNotAuthorized {
                    partner: a.clone(),
                    aef: aef.clone(),
                },
                Code::PermissionDenied,
                ErrorReason::PartnerNotAuthorized,
            ),
            (
                Refused::BadOnboardingCredential,
                Code::Unauthenticated,
                ErrorReason::OnboardingCredentialInvalid,
            ),
            (
                Refused::AefNotRegistered {
                    field: "service_security.security_info[0]".into(),
                    own: a.clone(),
                },
                Code::NotFound,
                ErrorReason::AefNotFound,
            ),
            (
                Refused::NothingToUpdate { aef: aef.clone() },
                Code::NotFound,
                ErrorReason::NoSecurityContext,
            ),
            (
                Refused::NoCommonMethod {
                    aef: aef.clone(),
                    supported: vec![SecurityMethod::Pki],
                },
                Code::FailedPrecondition,
                ErrorReason::NoCommonSecurityMethod,
            ),
            (
                Refused::ApiNotExposed {
                    aef: aef.clone(),
                    api: api.clone(),
                },
                Code::NotFound,
                ErrorReason::AefNotFound,
            ),
            (
                Refused::SessionBindingMissing,
                Code::Internal,
                ErrorReason::InternalFault,
            ),
            (
                Refused::Capif1eProfileMismatch {
                    own: a.clone(),
                    domain: Capif1eProfile::Tls12AnnexA,
                    session: Capif1eProfile::Tls13Exporter,
                },
                Code::FailedPrecondition,
                ErrorReason::Capif1eProfileMismatch,
            ),
            (
                Refused::NoInterconnectForInvoker {
                    invoker: inv.clone(),
                    home: b.clone(),
                    own: a.clone(),
                },
                Code::FailedPrecondition,
                ErrorReason::NoInterconnect,
            ),
            (
                Refused::NoInterconnectForIssuer {
                    issuer: b.clone(),
                    own: a.clone(),
                },
                Code::FailedPrecondition,
                ErrorReason::NoInterconnect,
            ),
            (
                Refused::MethodHandsOutNoKey {
                    invoker: inv.clone(),
                    aef: aef.clone(),
                    method: SecurityMethod::Oauth,
                },
                Code::FailedPrecondition,
                ErrorReason::MethodMismatch,
            ),
            (
                Refused::UnsupportedGrantType {
                    grant_type: "password".into(),
                },
                Code::InvalidArgument,
                ErrorReason::UnsupportedGrantType,
            ),
            (
                Refused::ClientIdNotTheCaller {
                    invoker: inv.clone(),
                },
                Code::PermissionDenied,
                ErrorReason::InvalidClient,
            ),
            (
                Refused::ScopeUnparsable(TokenError::Scope("is malformed".into())),
                Code::InvalidArgument,
                ErrorReason::InvalidScope,
            ),
            (
                Refused::NoOauthContext {
                    invoker: inv.clone(),
                },
                Code::FailedPrecondition,
                ErrorReason::UnauthorizedClient,
            ),
            (
                Refused::ScopeAefNotAuthorized {
                    invoker: inv.clone(),
                    aef: aef.clone(),
                },
                Code::PermissionDenied,
                ErrorReason::InvalidScope,
            ),
            (
                Refused::ScopeApiNotAuthorized {
                    invoker: inv.clone(),
                    api,
                    aef: aef.clone(),
                },
                Code::PermissionDenied,
                ErrorReason::InvalidScope,
            ),
            (
                Refused::ContextsExpiring {
                    invoker: inv.clone(),
                },
                Code::FailedPrecondition,
                ErrorReason::InvalidGrant,
            ),
            (
                Refused::TokenSigningFailed,
                Code::Internal,
                ErrorReason::InternalFault,
            ),
            (
                Refused::KeyRotationFailed,
                Code::Internal,
                ErrorReason::StoreFailure,
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
            (
                Refused::RevokedAtThisDomain {
                    invoker: inv.clone(),
                    home: b.clone(),
                    aef: aef.clone(),
                    own: a.clone(),
                },
                Code::PermissionDenied,
                ErrorReason::RevokedAtThisDomain,
            ),
            (
                Refused::NotOwnAef {
                    aef: aef.clone(),
                    own: a.clone(),
                },
                Code::NotFound,
                ErrorReason::AefNotFound,
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

    /// The messages users and tests match on, word for word.
    #[test]
    fn refusal_messages_are_stable() {
        let a = CcfId::new("operator-a.test").unwrap();
        let b = CcfId::new("operator-b.test").unwrap();
        let inv = ApiInvokerId::new("inv-1").unwrap();
        let aef = AefId::new("aef-a1").unwrap();
        let api = ApiName::new("weather").unwrap();
        let cases = [
            (
                Refused::BadOnboardingCredential,
                "the onboarding credential is unknown to this domain or was already used",
            ),
            (
                Refused::AefNotRegistered {
                    field: "service_security.security_info[0]".into(),
                    own: a.clone(),
                },
                "service_security.security_info[0]: no such AEF is registered at operator-a.test",
            ),
            (
                Refused::NothingToUpdate { aef: aef.clone() },
                "no security context for AEF aef-a1 to update",
            ),
            (
                Refused::NoCommonMethod {
                    aef: aef.clone(),
                    supported: vec![SecurityMethod::Pki, SecurityMethod::Oauth],
                },
                &format!(
                    "AEF aef-a1 supports none of the preferred methods (it supports {:?})",
                    vec![SecurityMethod::Pki, SecurityMethod::Oauth]
                ),
            ),
            (
                Refused::ApiNotExposed {
                    aef: aef.clone(),
                    api: api.clone(),
                },
                "AEF aef-a1 does not expose API weather",
            ),
            (
                Refused::SessionBindingMissing,
                "the CAPIF-1e TLS session binding is missing",
            ),
            (
                Refused::Capif1eProfileMismatch {
                    own: a.clone(),
                    domain: Capif1eProfile::Tls12AnnexA,
                    session: Capif1eProfile::Tls13Exporter,
                },
                "operator-a.test derives AEFPSKs by CAPIF-1e profile tls12-annex-a, but this TLS \
                 session is of profile tls13-exporter: obtain PSK on the CCF's CAPIF-1e listener \
                 (TLS 1.2)",
            ),
            (
                Refused::NoInterconnectForInvoker {
                    invoker: inv.clone(),
                    home: b.clone(),
                    own: a.clone(),
                },
                "API invoker inv-1 belongs to operator-b.test, and operator-a.test has no interconnect gateway configured",
            ),
            (
                Refused::NoInterconnectForIssuer { issuer: b, own: a },
                "tokens of operator-b.test cannot be verified: operator-a.test has no interconnect gateway configured",
            ),
            (
                Refused::MethodHandsOutNoKey {
                    invoker: inv.clone(),
                    aef: aef.clone(),
                    method: SecurityMethod::Oauth,
                },
                &format!(
                    "API invoker inv-1 negotiated {:?} for AEF aef-a1; its tokens carry what the AEF needs",
                    SecurityMethod::Oauth
                ),
            ),
            (
                Refused::UnsupportedGrantType {
                    grant_type: "password".into(),
                },
                "grant_type \"password\" is not supported; use \"client_credentials\"",
            ),
            (
                Refused::ClientIdNotTheCaller {
                    invoker: inv.clone(),
                },
                "client_id must be the caller's own API invoker id (inv-1)",
            ),
            (
                Refused::ScopeUnparsable(TokenError::Scope("is malformed".into())),
                &TokenError::Scope("is malformed".into()).to_string(),
            ),
            (
                Refused::NoOauthContext {
                    invoker: inv.clone(),
                },
                "API invoker inv-1 holds no valid security context with method OAUTH; obtain one first",
            ),
            (
                Refused::ScopeAefNotAuthorized {
                    invoker: inv.clone(),
                    aef: aef.clone(),
                },
                "API invoker inv-1 holds no OAUTH security context for AEF aef-a1",
            ),
            (
                Refused::ScopeApiNotAuthorized {
                    invoker: inv.clone(),
                    api,
                    aef,
                },
                "API invoker inv-1 is not authorized for API weather at AEF aef-a1",
            ),
            (
                Refused::ContextsExpiring { invoker: inv },
                "API invoker inv-1's security contexts expire within a second; obtain new ones",
            ),
            (
                Refused::TokenSigningFailed,
                "the CCF could not sign the access token",
            ),
            (
                Refused::KeyRotationFailed,
                "the new signing key could not be stored; the current key stays in use",
            ),
        ];
        for (e, message) in cases {
            assert_eq!(Status::from(e).message(), message);
        }
    }
}
