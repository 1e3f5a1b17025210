//! Method 3 (OAuth 2.0 access tokens) at the AEF: verifying a bearer token before a call.
//!
//! The token's `iss` (read unverified, only to choose a key set) names the issuing CCF. Its key
//! set comes from the AEF's own CCF (`Security.GetTokenKeySet`), which answers for itself or
//! fetches a partner's set through the gateways; never from a URL in the token. Sets are held
//! for the refresh interval their issuer advertises; a token naming a key id the held set lacks
//! causes one refetch (at most once a second per issuer), so a key rotated in at the issuer is
//! learned at its first token. Then `ccf_core::token::verify` checks signature, issuer and expiry
//! (with at most 30 s leeway); the caller checks the scope.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capif_proto::v1::{TokenKeySet, TokenKeySetRequest, security_client::SecurityClient};
use ccf_core::grpc::error_reason;
use ccf_core::ids::CcfId;
use ccf_core::token::{AccessTokenClaims, peek, verify};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Least time between two refetches of one issuer's set caused by unknown key ids.
const MIN_FORCED_REFRESH: Duration = Duration::from_secs(1);

/// Why a token was refused: a gRPC code and a sentence (never the token itself).
#[derive(Debug, Clone)]
pub struct TokenRefusal {
    /// UNAUTHENTICATED for a bad token, UNAVAILABLE when keys could not be fetched.
    pub code: Code,
    /// What the log and the caller are told.
    pub reason: String,
}

fn refusal(reason: impl Into<String>) -> TokenRefusal {
    TokenRefusal {
        code: Code::Unauthenticated,
        reason: reason.into(),
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
                Some("UNKNOWN_PARTNER") => refusal(format!(
                    "the token was issued by {issuer}, which is not a partner of this domain"
                )),
                Some("NO_INTERCONNECT") => refusal(format!(
                    "the token was issued by {issuer}, and this domain has no interconnect gateway"
                )),
                _ => TokenRefusal {
                    code: Code::Unavailable,
                    reason: format!("the keys of {issuer} are unavailable: {}", s.message()),
                },
            }
        })?;
        let set = Arc::new(set.into_inner());
        if set.issuer_ccf_id != issuer.as_str() {
            return Err(TokenRefusal {
                code: Code::Unavailable,
                reason: format!(
                    "asked for the keys of {issuer}, got those of {:?}",
                    set.issuer_ccf_id
                ),
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

    /// Checks `token`; the claims when it is genuine, unexpired and issued by the CCF it names.
    pub async fn verify(&self, token: &str) -> Result<AccessTokenClaims, TokenRefusal> {
        let (kid, _alg, iss) = peek(token).map_err(|e| refusal(e.to_string()))?;
        let issuer = CcfId::new(iss.clone())
            .map_err(|e| refusal(format!("the token names no valid issuer ({iss:?}): {e}")))?;
        let mut set = match self.held(&issuer) {
            Some(s) => s,
            None => self.fetch(&issuer, "").await?,
        };
        if !set.keys.iter().any(|k| k.kid == kid) && self.may_force(&issuer) {
            set = self.fetch(&issuer, &kid).await?;
        }
        let jwk = set.keys.iter().find(|k| k.kid == kid).ok_or_else(|| {
            refusal(format!(
                "the token is signed with key id {kid:?}, which {issuer} does not publish"
            ))
        })?;
        verify(token, jwk, issuer.as_str(), self.leeway_secs).map_err(|e| refusal(e.to_string()))
    }
}
