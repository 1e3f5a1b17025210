//! The gateway's gRPC services: `Gateway` (CAPIF-6, called by the own CCF), `Interconnect`
//! (CAPIF-6e, called by partner gateways) and `GatewayAdmin` (the operator).
//! Shared here: the gateway's refusals ([`Refused`], each variant mapped to its code and reason
//! in one place), the role check and id parsing.

mod admin;
mod gateway;
pub(crate) mod interconnect;

pub use admin::AdminService;
pub use gateway::{AnswerMismatch, GatewayService};
pub use interconnect::{InterconnectService, KeyHandedToPartner};

use capif_proto::v1::ErrorReason;
use ccf_core::grpc::{Refusal, invalid_field};
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId, IdError, KeyId};
use tonic::{Code, Status};

use crate::reload::LoadError;
use crate::state::GatewayState;
use crate::trust::{InvokerCaError, TrustError};

/// Why the gateway refuses a request or a partner's answer. [`Refusal`] maps each variant to its
/// gRPC code and `ErrorReason`; the message is the `Display`.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The caller's certificate names another domain or role than the RPC allows.
    #[error("{who} may not {what}")]
    RoleNotAllowed {
        /// The caller.
        who: PeerIdentity,
        /// What it tried.
        what: &'static str,
    },
    /// The domain asked about is not a configured partner.
    #[error("{partner} is not a partner of {own}")]
    NotAPartner {
        /// The domain named.
        partner: CcfId,
        /// This gateway's domain.
        own: CcfId,
    },
    /// A caller of the CAPIF-6e listener presented no client certificate.
    #[error("a client certificate is required")]
    NoCertificate,
    /// A partner gateway's certificate is refused (invariant 2).
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    /// A partner's revocation notice names another domain's invokers.
    #[error("{partner} may revoke only its own invokers")]
    RevokesOthers {
        /// The partner.
        partner: CcfId,
    },
    /// A partner's answer is not about what was asked (or is malformed).
    #[error("partner {partner} answered about something else: {why}")]
    AnswerMismatch {
        /// The partner.
        partner: CcfId,
        /// What differs.
        #[source]
        why: AnswerMismatch,
    },
    /// A partner's gateway sent another issuer's token key set.
    #[error("{issuer}'s gateway sent the key set of {sent:?}")]
    KeySetMismatch {
        /// The issuer asked for.
        issuer: CcfId,
        /// The issuer the set names.
        sent: String,
    },
    /// Method 2: the CA a partner named for its invoker is not the one the federation trusts
    /// for that partner (invariant 8).
    #[error(transparent)]
    CaNotFederated(#[from] InvokerCaError),
    /// A configuration reload was refused as a whole; the running configuration stays.
    #[error("the configuration was not reloaded, the running one stays: {}", ccf_core::grpc::error_chain(.0))]
    ConfigRefused(#[source] LoadError),
    /// The revocation store failed (logged with its cause): nothing was acknowledged.
    #[error("the gateway could not record the revocation; send it again")]
    StoreFailed,
}

impl Refusal for Refused {
    fn code(&self) -> Code {
        match self {
            Self::NotAPartner { .. } => Code::NotFound,
            Self::ConfigRefused(_) => Code::InvalidArgument,
            Self::NoCertificate => Code::Unauthenticated,
            Self::StoreFailed => Code::Unavailable,
            Self::RoleNotAllowed { .. }
            | Self::Untrusted(_)
            | Self::RevokesOthers { .. }
            | Self::AnswerMismatch { .. }
            | Self::KeySetMismatch { .. }
            | Self::CaNotFederated(_) => Code::PermissionDenied,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            Self::RoleNotAllowed { .. } => ErrorReason::RoleNotAllowed,
            Self::NotAPartner { .. } | Self::NoCertificate | Self::Untrusted(_) => {
                ErrorReason::UnknownPartner
            }
            Self::RevokesOthers { .. }
            | Self::AnswerMismatch { .. }
            | Self::KeySetMismatch { .. } => ErrorReason::IdentityMismatch,
            Self::CaNotFederated(_) => ErrorReason::CaNotFederated,
            Self::ConfigRefused(_) => ErrorReason::ConfigRefused,
            Self::StoreFailed => ErrorReason::StoreFailure,
        }
    }
}

impl From<Refused> for Status {
    fn from(e: Refused) -> Self {
        e.status()
    }
}

pub(crate) fn parse<T>(
    field: &str,
    v: &str,
    f: impl FnOnce(&str) -> Result<T, IdError>,
) -> Result<T, Status> {
    f(v).map_err(|e| invalid_field(field, e))
}

pub(crate) fn ids(
    invoker: &str,
    home: &str,
    aef: &str,
) -> Result<(ApiInvokerId, CcfId, AefId), Status> {
    Ok((
        parse("api_invoker_id", invoker, |v| ApiInvokerId::new(v))?,
        parse("home_ccf_id", home, |v| CcfId::new(v))?,
        parse("aef_id", aef, |v| AefId::new(v))?,
    ))
}

/// The ids of a security-information query (CAPIF-6 and CAPIF-6e alike), each checked where it
/// enters, in field order: `api_invoker_id`, `home_ccf_id`, `aef_id`, then `presented_key_id`
/// (empty, or a key id). A refusal is `INVALID_FIELD` naming the first bad field.
pub(crate) fn query_ids(
    q: &capif_proto::v1::SecurityInformationQuery,
) -> Result<(ApiInvokerId, CcfId, AefId), Status> {
    let ids = ids(&q.api_invoker_id, &q.home_ccf_id, &q.aef_id)?;
    KeyId::optional(&q.presented_key_id).map_err(|e| invalid_field("presented_key_id", e))?;
    Ok(ids)
}

/// A revocation notice's `aef_ids`, each an AEF id (`INVALID_FIELD` "aef_ids" otherwise).
pub(crate) fn notice_aef_ids(aef_ids: &[String]) -> Result<Vec<AefId>, Status> {
    aef_ids
        .iter()
        .map(|a| AefId::new(a.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_field("aef_ids", e))
}

/// The caller must be `role` of the own domain.
pub(crate) fn require(
    state: &GatewayState,
    who: &PeerIdentity,
    role: Role,
    what: &'static str,
) -> Result<(), Refused> {
    if who.ccf_id != state.ccf_id || who.role != role {
        return Err(Refused::RoleNotAllowed {
            who: who.clone(),
            what,
        });
    }
    Ok(())
}

/// Until when (Unix ms) a notice matters: its `not_after_unix_ms`, or without one the longest
/// validity a key may have; never beyond that from `now`.
pub(crate) fn horizon(state: &GatewayState, not_after_unix_ms: u64, now: u64) -> u64 {
    let cap =
        now.saturating_add(u64::try_from(state.max_key_validity.as_millis()).unwrap_or(u64::MAX));
    if not_after_unix_ms == 0 {
        cap
    } else {
        not_after_unix_ms.min(cap)
    }
}

/// A failure of the revocation store: nothing was acknowledged, the sender tries again.
pub(crate) fn store_status(e: crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "revocation store failed");
    Refused::StoreFailed.into()
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use ccf_core::grpc::reason_of;

    /// The one mapping: each refusal's code and reason, as the contract has them.
    #[test]
    fn each_refusal_has_its_code_and_reason() {
        let b = CcfId::new("operator-b.test").unwrap();
        let a = CcfId::new("operator-a.test").unwrap();
        let cases = [
            (
                Refused::RoleNotAllowed {
                    who: PeerIdentity::new(a.clone(), Role::Operator),
                    what: "ask",
                },
                Code::PermissionDenied,
                ErrorReason::RoleNotAllowed,
            ),
            (
                Refused::NotAPartner {
                    partner: b.clone(),
                    own: a.clone(),
                },
                Code::NotFound,
                ErrorReason::UnknownPartner,
            ),
            (
                Refused::NoCertificate,
                Code::Unauthenticated,
                ErrorReason::UnknownPartner,
            ),
            (
                Refused::Untrusted(TrustError::UnknownPartner(b.clone())),
                Code::PermissionDenied,
                ErrorReason::UnknownPartner,
            ),
            (
                Refused::RevokesOthers { partner: b.clone() },
                Code::PermissionDenied,
                ErrorReason::IdentityMismatch,
            ),
            (
                Refused::AnswerMismatch {
                    partner: b.clone(),
                    why: AnswerMismatch::PskLength,
                },
                Code::PermissionDenied,
                ErrorReason::IdentityMismatch,
            ),
            (
                Refused::KeySetMismatch {
                    issuer: b.clone(),
                    sent: "x".into(),
                },
                Code::PermissionDenied,
                ErrorReason::IdentityMismatch,
            ),
            (
                Refused::CaNotFederated(InvokerCaError::NoneNamed { partner: b }),
                Code::PermissionDenied,
                ErrorReason::CaNotFederated,
            ),
            (
                Refused::ConfigRefused(LoadError::NoFile),
                Code::InvalidArgument,
                ErrorReason::ConfigRefused,
            ),
            (
                Refused::StoreFailed,
                Code::Unavailable,
                ErrorReason::StoreFailure,
            ),
        ];
        for (e, code, reason) in cases {
            let s = Status::from(e);
            assert_eq!((s.code(), reason_of(&s)), (code, Some(reason)), "{s:?}");
        }
    }
}
