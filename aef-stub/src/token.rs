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

use capif_proto::v1::{TokenKeySet, TokenKeySetRequest, security_client::SecurityClient};
use ccf_core::grpc::error_reason;
use ccf_core::ids::{CcfId, IdError};
use ccf_core::keysets::KeySetCache;
use ccf_core::token::{
    AccessTokenClaims, Expected, KnownCaller, TokenError, peek, refusal_status, verify,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Why a token was refused (never quoting the token itself): a check of the token, or a reason
/// its issuer's keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    /// A check of `ccf_core::token` failed (signature, issuer, times, audience, subject, ...).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// `iss` is not even a CCF id, so no key set can be asked for.
    #[error("the token names no valid issuer ({iss:?}): {why}")]
    BadIssuerName {
        /// What the token claims.
        iss: String,
        /// Why it is not a CCF id.
        why: IdError,
    },
    /// The issuer is not a partner of this domain.
    #[error("the token was issued by {0}, which is not a partner of this domain")]
    NotAPartner(CcfId),
    /// The issuer is another domain, and this one has no gateway to ask through.
    #[error("the token was issued by {0}, and this domain has no interconnect gateway")]
    NoInterconnect(CcfId),
    /// The issuer's keys could not be fetched now; the token may be fine.
    #[error("the keys of {issuer} are unavailable: {why}")]
    KeysUnavailable {
        /// The issuer.
        issuer: CcfId,
        /// What the own CCF answered.
        why: String,
    },
}

impl TokenRefusal {
    /// UNAVAILABLE when the keys could not be had (worth a retry), else UNAUTHENTICATED.
    pub fn code(&self) -> Code {
        match self {
            Self::KeysUnavailable { .. } => Code::Unavailable,
            _ => Code::Unauthenticated,
        }
    }

    /// The stable name of what failed, sent in the refusal's ErrorInfo metadata.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Token(e) => e.check(),
            Self::BadIssuerName { .. } => "MALFORMED",
            Self::NotAPartner(_) => "ISSUER_NOT_PARTNER",
            Self::NoInterconnect(_) => "NO_INTERCONNECT",
            Self::KeysUnavailable { .. } => "KEYS_UNAVAILABLE",
        }
    }

    /// The gRPC status: reason INVALID_TOKEN, the check in the metadata, this sentence.
    pub fn status(&self) -> tonic::Status {
        refusal_status(self.code(), self.check(), self.to_string())
    }
}

/// Verifies bearer tokens for one AEF.
pub struct TokenVerifier {
    ccf: SecurityClient<Channel>,
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
    pub fn new(ccf: SecurityClient<Channel>, leeway_secs: u64) -> Self {
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
            .map_err(|s| match error_reason(&s).as_deref() {
                Some("UNKNOWN_PARTNER") => TokenRefusal::NotAPartner(issuer.clone()),
                Some("NO_INTERCONNECT") => TokenRefusal::NoInterconnect(issuer.clone()),
                _ => TokenRefusal::KeysUnavailable {
                    issuer: issuer.clone(),
                    why: s.message().to_string(),
                },
            })?;
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
