//! Issuers' access-token verification keys (method 3), cached per issuer: the one rule both the
//! gateway (partner CCFs' sets, for its own CCF) and the AEF (any issuer's set, from its CCF)
//! follow.
//!
//! A set lives for the refresh interval its issuer advertises (between 1 s and 1 h). A request
//! naming a key id the cached set lacks refetches the set, at most once a second per issuer, so a
//! key rotated in at the partner is learned at its first token and a stream of made-up key ids
//! cannot turn into a stream of partner calls. Concurrent misses share one upstream call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ids::CcfId;
use crate::status::{error_reason, status_with_reason};
use capif_proto::v1::TokenKeySet;
use moka::Expiry;
use moka::future::Cache;
use tonic::Status;

/// Least time between two refetches of one issuer's set caused by unknown key ids.
pub const MIN_FORCED_REFRESH: Duration = Duration::from_secs(1);

struct SetExpiry;

fn lifetime(set: &TokenKeySet) -> Duration {
    Duration::from_secs(set.refresh_interval_secs.clamp(1, 3600))
}

impl Expiry<CcfId, Arc<TokenKeySet>> for SetExpiry {
    fn expire_after_create(&self, _: &CcfId, v: &Arc<TokenKeySet>, _: Instant) -> Option<Duration> {
        Some(lifetime(v))
    }
    fn expire_after_update(
        &self,
        _: &CcfId,
        v: &Arc<TokenKeySet>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(lifetime(v))
    }
}

/// The cache of partner key sets.
pub struct KeySetCache {
    cache: Cache<CcfId, Arc<TokenKeySet>>,
    forced: Mutex<HashMap<CcfId, Instant>>,
}

impl std::fmt::Debug for KeySetCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySetCache({} issuers)", self.cache.entry_count())
    }
}

impl Default for KeySetCache {
    fn default() -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(1024)
                .expire_after(SetExpiry)
                .build(),
            forced: Mutex::default(),
        }
    }
}

impl KeySetCache {
    /// The set of `issuer`, from the cache or from `fetch`; refetched when `unknown_kid` is not
    /// in the cached set (rate-limited).
    pub async fn get_or_fetch<F>(
        &self,
        issuer: &CcfId,
        unknown_kid: &str,
        fetch: F,
    ) -> Result<Arc<TokenKeySet>, Status>
    where
        F: Future<Output = Result<TokenKeySet, Status>>,
    {
        if let Some(set) = self.cache.get(issuer).await {
            // A key id that cannot be a thumbprint never forces a refetch.
            let knows = unknown_kid.is_empty()
                || !plausible_kid(unknown_kid)
                || set.keys.iter().any(|k| k.kid == unknown_kid);
            if knows || !self.may_force(issuer) {
                return Ok(set);
            }
            tracing::info!(%issuer, kid = %unknown_kid, "unknown key id; refreshing the issuer's key set");
            self.cache.invalidate(issuer).await;
        }
        self.cache
            .try_get_with(issuer.clone(), async { fetch.await.map(Arc::new) })
            .await
            .map_err(|shared| match error_reason(&shared) {
                Some(r) => status_with_reason(shared.code(), &r, shared.message()),
                None => Status::new(shared.code(), shared.message()),
            })
    }

    fn may_force(&self, issuer: &CcfId) -> bool {
        // A poisoned map means a panic elsewhere; refusing to refetch is the safe side.
        let Ok(mut f) = self.forced.lock() else {
            return false;
        };
        let now = Instant::now();
        match f.get(issuer) {
            Some(t) if now.duration_since(*t) < MIN_FORCED_REFRESH => false,
            _ => {
                f.insert(issuer.clone(), now);
                true
            }
        }
    }
}

/// Whether `kid` could be a key id of ours (an RFC 7638 thumbprint, base64url, or any short
/// base64url name): anything else is refused without asking anyone.
pub fn plausible_kid(kid: &str) -> bool {
    (1..=128).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use capif_proto::v1::JsonWebKey;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn set(kids: &[&str]) -> TokenKeySet {
        TokenKeySet {
            issuer_ccf_id: "b.test".into(),
            keys: kids
                .iter()
                .map(|k| JsonWebKey {
                    kid: k.to_string(),
                    ..Default::default()
                })
                .collect(),
            refresh_interval_secs: 300,
        }
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_once_per_second() {
        let cache = KeySetCache::default();
        let issuer = CcfId::new("b.test").unwrap();
        let calls = AtomicU32::new(0);
        let fetch = |kids: &'static [&'static str]| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(set(kids)) }
        };
        let s = cache
            .get_or_fetch(&issuer, "", fetch(&["k1"]))
            .await
            .unwrap();
        assert_eq!(s.keys[0].kid, "k1");
        // A known kid is served from the cache.
        let fetched = calls.load(Ordering::SeqCst);
        cache
            .get_or_fetch(&issuer, "k1", async { Ok(set(&["zz"])) })
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), fetched);
        // An unknown kid refetches: the rotated key appears.
        let s = cache
            .get_or_fetch(&issuer, "k2", fetch(&["k1", "k2"]))
            .await
            .unwrap();
        assert!(s.keys.iter().any(|k| k.kid == "k2"));
        // Another unknown kid right after is answered from the cache (rate limit).
        let s = cache
            .get_or_fetch(&issuer, "k9", async { Ok(set(&["k9"])) })
            .await
            .unwrap();
        assert!(!s.keys.iter().any(|k| k.kid == "k9"));
        tokio::time::sleep(MIN_FORCED_REFRESH + Duration::from_millis(50)).await;
        let s = cache
            .get_or_fetch(&issuer, "k9", async { Ok(set(&["k9"])) })
            .await
            .unwrap();
        assert!(s.keys.iter().any(|k| k.kid == "k9"));
    }
}
