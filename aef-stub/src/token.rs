//! Method 3 (OAuth 2.0 access tokens) at the AEF: verifying a bearer token before a call.
//!
//! The token's `iss` (read unverified, only to choose a key set) names the issuing CCF. Its key
//! set comes from the AEF's own CCF (`Security.GetTokenKeySet`), which answers for itself or
//! fetches a partner's set through the gateways; never from a URL in the token. Sets are held
//! for the refresh interval their issuer advertises; a token naming a key id the held set lacks
//! causes one refetch (at most once a second per issuer), so a key rotated in at the issuer is
//! learned at its first token. Then `ccf_core::token::verify` checks signature, issuer, `exp`,
//! `nbf` and `iat` (with at most 30 s leeway), that `aud` names this AEF, and that `sub` is the
//! token's `client_id` and every identity the AEF otherwise knows of the caller; the caller
//! checks the scope. Each refusal names the failed check (`TokenRefusal::check`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capif_proto::v1::{TokenKeySet, TokenKeySetRequest, security_client::SecurityClient};
use ccf_core::grpc::error_reason;
use ccf_core::ids::{CcfId, IdError};
use ccf_core::token::{
    AccessTokenClaims, Expected, KnownCaller, TokenError, peek, refusal_status, verify,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Least time between two refetches of one issuer's set caused by unknown key ids.
const MIN_FORCED_REFRESH: Duration = Duration::from_secs(1);

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

struct HeldSet {
    set: Arc<TokenKeySet>,
    fetched_at: Instant,
}

/// Verifies bearer tokens for one AEF.
pub struct TokenVerifier {
    ccf: SecurityClient<Channel>,
    leeway_secs: u64,
    sets: Mutex<HashMap<CcfId, HeldSet>>,
    forced: Mutex<HashMap<CcfId, Instant>>,
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
            sets: Mutex::default(),
            forced: Mutex::default(),
        }
    }

    fn held(&self, issuer: &CcfId) -> Option<Arc<TokenKeySet>> {
        let sets = self.sets.lock().ok()?;
        let h = sets.get(issuer)?;
        let ttl = Duration::from_secs(h.set.refresh_interval_secs.clamp(1, 3600));
        (h.fetched_at.elapsed() < ttl).then(|| h.set.clone())
    }

    fn may_force(&self, issuer: &CcfId) -> bool {
        let Ok(mut f) = self.forced.lock() else {
            return false;
        };
        match f.get(issuer) {
            Some(t) if t.elapsed() < MIN_FORCED_REFRESH => false,
            _ => {
                f.insert(issuer.clone(), Instant::now());
                true
            }
        }
    }

    async fn fetch(
        &self,
        issuer: &CcfId,
        unknown_kid: &str,
    ) -> Result<Arc<TokenKeySet>, TokenRefusal> {
        let mut r = Request::new(TokenKeySetRequest {
            issuer_ccf_id: issuer.to_string(),
            unknown_kid: unknown_kid.to_string(),
        });
        r.set_timeout(Duration::from_secs(5));
        let set = self.ccf.clone().get_token_key_set(r).await.map_err(|s| {
            match error_reason(&s).as_deref() {
                Some("UNKNOWN_PARTNER") => TokenRefusal::NotAPartner(issuer.clone()),
                Some("NO_INTERCONNECT") => TokenRefusal::NoInterconnect(issuer.clone()),
                _ => TokenRefusal::KeysUnavailable {
                    issuer: issuer.clone(),
                    why: s.message().to_string(),
                },
            }
        })?;
        let set = Arc::new(set.into_inner());
        if set.issuer_ccf_id != issuer.as_str() {
            return Err(TokenRefusal::KeysUnavailable {
                issuer: issuer.clone(),
                why: format!("the answer holds the keys of {:?}", set.issuer_ccf_id),
            });
        }
        if let Ok(mut sets) = self.sets.lock() {
            sets.insert(
                issuer.clone(),
                HeldSet {
                    set: set.clone(),
                    fetched_at: Instant::now(),
                },
            );
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
        let mut set = match self.held(&issuer) {
            Some(s) => s,
            None => self.fetch(&issuer, "").await?,
        };
        if !set.keys.iter().any(|k| k.kid == kid) && self.may_force(&issuer) {
            set = self.fetch(&issuer, &kid).await?;
        }
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
