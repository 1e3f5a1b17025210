//! Method 3 (OAuth 2.0 access tokens) at the AEF: verifying a bearer token before a call.
//!
//! The token's `iss` (read unverified, only to choose a key set) names the issuing CCF. Its key
//! set comes from the AEF's own CCF (`Security.GetTokenKeySet`), which answers for itself or
//! fetches a partner's set through the gateways; never from a URL in the token. Sets are held
//! for the refresh interval their issuer advertises; a token naming a key id the held set lacks
//! causes one refetch (at most once a second per issuer), so a key rotated in at the issuer is
//! learned at its first token: the rule of `ccf_core::keysets`, which the gateway follows too. Then `ccf_core::token::verify` checks signature, issuer, `exp`,
//! `nbf` and `iat` (with at most 30 s leeway), that `aud` names this AEF, and that `sub` is the
//! token's `client_id` and every identity the AEF otherwise knows of the caller; the caller
//! checks the scope. Each refusal names the failed check (`TokenRefusal::check`).

use std::time::Duration;

use capif_proto::v1::{
    ErrorReason, TokenKeySet, TokenKeySetRequest, security_client::SecurityClient,
};
use ccf_core::grpc::{Refusal, reason_of};
use ccf_core::ids::{ApiInvokerId, CcfId, IdError};
use ccf_core::keysets::KeySetCache;
use ccf_core::telemetry::TracedChannel;
use ccf_core::token::{
    AccessTokenClaims, Expected, KnownCaller, TokenError, peek, refusal_status, verify,
};
use tonic::{Code, Request, Status};

/// Why a token was refused (never quoting the token itself): a check of the token, a reason its
/// issuer's keys could not be had, or a check the AEF makes of the verified claims. Each variant
/// names its check ([`TokenRefusal::check`]); [`Refusal`] maps it to its code, reason
/// `INVALID_TOKEN`, and the check in the ErrorInfo metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    /// The call carries neither a client certificate nor a bearer token.
    #[error(
        "present a client certificate (PKI) or an \"authorization: Bearer <token>\" header (OAUTH)"
    )]
    Missing,
    /// A check of `ccf_core::token` failed (signature, issuer, times, audience, subject, ...).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// `iss` is not even a CCF id, so no key set can be asked for.
    #[error("the token names no valid issuer ({iss:?}): {why}")]
    BadIssuerName {
        /// What the token claims.
        iss: String,
        /// Why it is not a CCF id.
        #[source]
        why: IdError,
    },
    /// The issuer is not a partner of this domain.
    #[error("the token was issued by {0}, which is not a partner of this domain")]
    NotAPartner(CcfId),
    /// The issuer is another domain, and this one has no gateway to ask through.
    #[error("the token was issued by {0}, and this domain has no interconnect gateway")]
    NoInterconnect(CcfId),
    /// The issuer's keys could not be fetched now; the token may be fine.
    #[error("the keys of {issuer} are unavailable: {}", .source.message())]
    KeysUnavailable {
        /// The issuer.
        issuer: CcfId,
        /// What the own CCF answered.
        #[source]
        source: Status,
    },
    /// The verified token's subject is not an API invoker id.
    #[error("the token's subject is not an API invoker id: {0}")]
    SubjectNotAnInvoker(#[source] IdError),
    /// The verified token's scope does not parse.
    #[error("the token's scope is malformed: {0}")]
    BadScope(#[source] TokenError),
    /// The CCF revoked the invoker the token was issued to.
    #[error("API invoker {0}'s authorization was revoked by the CCF")]
    Revoked(ApiInvokerId),
}

impl TokenRefusal {
    /// The stable name of what failed, sent in the refusal's ErrorInfo metadata.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Missing => "MISSING_TOKEN",
            Self::Token(e) => e.check(),
            Self::BadIssuerName { .. } | Self::SubjectNotAnInvoker(_) | Self::BadScope(_) => {
                "MALFORMED"
            }
            Self::NotAPartner(_) => "ISSUER_NOT_PARTNER",
            Self::NoInterconnect(_) => "NO_INTERCONNECT",
            Self::KeysUnavailable { .. } => "KEYS_UNAVAILABLE",
            Self::Revoked(_) => "REVOKED",
        }
    }

    /// What the own CCF's refusal to hand over `issuer`'s key set means for the token.
    fn keys_refused(issuer: &CcfId, s: Status) -> Self {
        match reason_of(&s) {
            Some(ErrorReason::UnknownPartner) => Self::NotAPartner(issuer.clone()),
            Some(ErrorReason::NoInterconnect) => Self::NoInterconnect(issuer.clone()),
            _ => Self::KeysUnavailable {
                issuer: issuer.clone(),
                source: s,
            },
        }
    }
}

impl Refusal for TokenRefusal {
    /// UNAVAILABLE when the keys could not be had (worth a retry), else UNAUTHENTICATED.
    fn code(&self) -> Code {
        match self {
            Self::KeysUnavailable { .. } => Code::Unavailable,
            _ => Code::Unauthenticated,
        }
    }

    fn reason(&self) -> ErrorReason {
        ErrorReason::InvalidToken
    }

    /// Reason INVALID_TOKEN, the check in the metadata, this sentence.
    fn status(&self) -> Status {
        refusal_status(self.code(), self.check(), self.to_string())
    }
}

impl From<TokenRefusal> for Status {
    fn from(e: TokenRefusal) -> Self {
        e.status()
    }
}

/// Verifies bearer tokens for one AEF.
pub struct TokenVerifier {
    ccf: SecurityClient<TracedChannel>,
    leeway_secs: u64,
    sets: KeySetCache,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenVerifier(leeway {} s)", self.leeway_secs)
    }
}

impl TokenVerifier {
    /// Asking `ccf` for key sets, allowing `leeway_secs` (at most 30) of clock skew.
    pub fn new(ccf: SecurityClient<TracedChannel>, leeway_secs: u64) -> Self {
        Self {
            ccf,
            leeway_secs: leeway_secs.min(ccf_core::token::MAX_LEEWAY_SECS),
            sets: KeySetCache::default(),
        }
    }

    /// Asks the own CCF for `issuer`'s set (naming the key id it lacks, if any).
    async fn fetch(&self, issuer: &CcfId, unknown_kid: &str) -> Result<TokenKeySet, Status> {
        let mut r = Request::new(TokenKeySetRequest {
            issuer_ccf_id: issuer.to_string(),
            unknown_kid: unknown_kid.to_string(),
        });
        r.set_timeout(Duration::from_secs(5));
        let set = self.ccf.clone().get_token_key_set(r).await?.into_inner();
        if set.issuer_ccf_id != issuer.as_str() {
            return Err(Status::unavailable(format!(
                "the answer holds the keys of {:?}",
                set.issuer_ccf_id
            )));
        }
        Ok(set)
    }

    /// Checks `token` for the AEF `audience`, used by a caller otherwise known as each of
    /// `callers` (may be empty); the claims when it is genuine, issued by the CCF it names, valid
    /// now, meant for `audience`, and issued to that caller.
    pub async fn verify(
        &self,
        token: &str,
        audience: &str,
        callers: &[KnownCaller<'_>],
    ) -> Result<AccessTokenClaims, TokenRefusal> {
        let (kid, _alg, iss) = peek(token)?;
        let issuer =
            CcfId::new(iss.clone()).map_err(|why| TokenRefusal::BadIssuerName { iss, why })?;
        let set = self
            .sets
            .get_or_fetch(&issuer, &kid, self.fetch(&issuer, &kid))
            .await
            .map_err(|s| TokenRefusal::keys_refused(&issuer, s))?;
        let jwk =
            set.keys
                .iter()
                .find(|k| k.kid == kid)
                .ok_or_else(|| TokenError::UnknownKeyId {
                    kid: kid.clone(),
                    issuer: issuer.to_string(),
                })?;
        let expected = Expected {
            issuer: issuer.as_str(),
            audience,
            callers,
            leeway_secs: self.leeway_secs,
        };
        Ok(verify(token, jwk, &expected)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccf_core::grpc::error_status;
    use ccf_core::token::refusal_check;

    /// The own CCF's refusal to hand over an issuer's keys is read by its reason value, and
    /// each outcome is answered with its code and check.
    #[test]
    fn key_set_refusals_are_read_by_reason() {
        let b = CcfId::new("operator-b.test").unwrap();
        let r = TokenRefusal::keys_refused(
            &b,
            error_status(Code::NotFound, ErrorReason::UnknownPartner, "no"),
        );
        assert!(
            matches!(&r, TokenRefusal::NotAPartner(i) if i == &b),
            "{r:?}"
        );
        let r = TokenRefusal::keys_refused(
            &b,
            error_status(Code::FailedPrecondition, ErrorReason::NoInterconnect, "no"),
        );
        assert!(matches!(r, TokenRefusal::NoInterconnect(_)), "{r:?}");
        let r = TokenRefusal::keys_refused(&b, Status::unavailable("connection refused"));
        assert!(matches!(r, TokenRefusal::KeysUnavailable { .. }), "{r:?}");
        let s = Status::from(r);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(reason_of(&s), Some(ErrorReason::InvalidToken));
        assert_eq!(refusal_check(&s).as_deref(), Some("KEYS_UNAVAILABLE"));
        let s = Status::from(TokenRefusal::Missing);
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(refusal_check(&s).as_deref(), Some("MISSING_TOKEN"));
    }
}
