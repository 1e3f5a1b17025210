//! The gateway's cache of partner answers (invariant 3 in docs/ARCHITECTURE.md; rules in docs/PROTOCOL.md 6.7), on moka.
//!
//! Key `(home CCF id, apiInvokerId, aefId)`. A key entry lives for the remaining validity the
//! partner returned minus a safety margin, capped by config. The key's own end is reckoned from
//! when the request was SENT (network delay can only shorten it) and rechecked on every hit;
//! what is served carries the validity remaining at serve time. Concurrent misses for one key share one upstream call. Definite refusals get short
//! negative entries; transport failures are never cached. A caller presenting a key id other
//! than the cached one (the invoker re-authenticated at its home CCF) refreshes the entry, so a
//! stale entry cannot lock the invoker out; so does a caller announcing another security method
//! than the cached answer's (the invoker negotiated anew at home). The first such refresh of an entry
//! happens at once; later ones at most once per `refresh_interval_ms`. A refusal entry is
//! bypassed the same way only when it is about the key or the context (`KEY_EXPIRED`,
//! `NO_SECURITY_CONTEXT`: the invoker may have negotiated since), never when it is about the
//! invoker, so what a caller presents cannot multiply partner fetches.
//!
//! A revocation wins over a fetch in flight (no resurrection, invariant 10): every fetch takes
//! the current value of a sequence before it asks and its entry carries it; a revocation of
//! (home, invoker[, AEF]) takes the next value as its mark BEFORE it evicts. An entry or a fetch
//! older than a mark is never served nor cached (`REVOKED_DURING_FETCH`), and a fetch checks
//! again after moka inserted its entry, so no check-then-insert window remains. Marks are kept
//! for the longest an older entry or fetch can exist (`max_ttl` + the largest request budget),
//! and at most [`MAX_MARKS`]: beyond it every older entry counts as revoked.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capif_proto::v1::{ErrorReason, InvokerSecurityInformation};
use ccf_core::grpc::{error_reason, error_status, status_with_reason};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::kdf::AefPsk;
use moka::Expiry;
use moka::future::Cache;
use tonic::{Code, Status};

use crate::config::CacheConfig;

/// What an entry is cached under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The invoker's home domain (the partner).
    pub home: CcfId,
    /// The invoker.
    pub invoker: ApiInvokerId,
    /// The AEF the key is bound to.
    pub aef: AefId,
}

/// When what a caller presented last forced a refresh of an entry; unset for an entry that came
/// from a plain miss, whose first refresh may happen at once (the invoker just re-authenticated
/// at home), while later ones wait for the interval.
struct RefreshMark(parking_lot::Mutex<Option<Instant>>);

impl RefreshMark {
    fn new(at: Option<Instant>) -> Self {
        Self(parking_lot::Mutex::new(at))
    }

    /// Claims the one refresh allowed per `interval`: true for the first caller after it.
    fn claim(&self, interval: Duration) -> bool {
        let mut last = self.0.lock();
        if last.is_none_or(|t| t.elapsed() >= interval) {
            *last = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

/// A cached key. The AEFPSK is held in [`AefPsk`] (zeroized on drop), not in the message.
pub struct CachedKey {
    info: InvokerSecurityInformation,
    psk: Option<AefPsk>,
    key_expires_at: Instant,
    last_refresh: RefreshMark,
    ttl: Duration,
    /// The revocation sequence when its fetch started.
    seq: u64,
}

impl CachedKey {
    /// The answer with the validity remaining now; `None` once the key has expired.
    pub fn answer(&self) -> Option<InvokerSecurityInformation> {
        let remaining = self
            .key_expires_at
            .saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return None;
        }
        let mut info = self.info.clone();
        info.aef_psk = self
            .psk
            .as_ref()
            .map(|p| p.expose().to_vec())
            .unwrap_or_default();
        info.remaining_validity_ms = remaining.as_millis() as u64;
        Some(info)
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.info.key_id
    }
}

/// A cached definite refusal.
pub struct Refusal {
    code: Code,
    reason: String,
    message: String,
    last_refresh: RefreshMark,
}

impl Refusal {
    fn new(s: &Status, refreshed: bool) -> Self {
        Self {
            code: s.code(),
            reason: error_reason(s).unwrap_or_default(),
            message: s.message().to_string(),
            last_refresh: RefreshMark::new(refreshed.then(Instant::now)),
        }
    }

    fn status(&self) -> Status {
        status_with_reason(self.code, &self.reason, self.message.clone())
    }

    /// Whether a presented key id may ask again: only refusals about the key or the context
    /// (the invoker may have negotiated anew at home since), never about the invoker itself
    /// (an unknown invoker stays unknown whatever key id a stranger presents).
    fn renewable(&self) -> bool {
        matches!(
            ErrorReason::from_str_name(&self.reason),
            Some(ErrorReason::KeyExpired | ErrorReason::NoSecurityContext)
        )
    }
}

/// A cache entry.
#[derive(Clone)]
pub enum Entry {
    /// A key.
    Key(Arc<CachedKey>),
    /// A refusal, with its lifetime.
    Refusal(Arc<Refusal>, Duration),
}

impl Entry {
    fn ttl(&self) -> Duration {
        match self {
            Entry::Key(k) => k.ttl,
            Entry::Refusal(_, ttl) => *ttl,
        }
    }
}

struct EntryExpiry;

impl Expiry<CacheKey, Entry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        v: &Entry,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl())
    }
    fn expire_after_update(
        &self,
        _: &CacheKey,
        v: &Entry,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl())
    }
}

/// Hit/miss counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Served from a key entry.
    pub hits: AtomicU64,
    /// Went upstream.
    pub misses: AtomicU64,
    /// Waited for another caller's upstream call.
    pub coalesced: AtomicU64,
    /// Served from a refusal entry.
    pub negative_hits: AtomicU64,
}

/// How one request was served, for the latency histograms (`capif_gateway_fetch_duration_seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// From a key entry.
    Hit,
    /// From a refusal entry.
    NegativeHit,
    /// This request's own upstream fetch.
    Miss,
    /// It waited for another request's upstream fetch of the same key.
    Coalesced,
    /// A live entry refreshed because of what the caller presented.
    Refresh,
}

impl Served {
    /// Whether the answer came from the cache without waiting for the partner.
    pub fn from_cache(self) -> bool {
        matches!(self, Self::Hit | Self::NegativeHit)
    }
}

/// Entries that left the cache other than by being replaced, by cause.
#[derive(Debug, Default)]
pub struct Evictions {
    /// Pushed out by the capacity (`max_weight`).
    pub size: AtomicU64,
    /// Their lifetime ended (the key's validity, a refusal's short life).
    pub expired: AtomicU64,
    /// Removed on purpose: revocations, purges, a removed partner, a stale entry dropped.
    pub invalidated: AtomicU64,
}

/// Most revocation marks held; beyond it every entry fetched before counts as revoked.
pub const MAX_MARKS: usize = 100_000;

/// What a revocation marks: an invoker of a home domain, at one AEF or (`None`) at all, and
/// only its key with that key id (a replaced key) or (`None`) any.
type MarkKey = (CcfId, ApiInvokerId, Option<AefId>, Option<String>);

/// The revocation sequence and its marks.
#[derive(Default)]
struct Revocations {
    seq: AtomicU64,
    /// Every entry and fetch older than this counts as revoked (the marks overflowed).
    floor: AtomicU64,
    marks: parking_lot::Mutex<HashMap<MarkKey, (u64, Instant)>>,
}

/// The refusal of a fetch that a revocation overtook.
fn revoked_during_fetch() -> Status {
    error_status(
        Code::PermissionDenied,
        ErrorReason::RevokedDuringFetch,
        "the invoker's authorization was revoked while its key was being fetched",
    )
}

/// The cache.
pub struct KeyCache {
    cache: Cache<CacheKey, Entry>,
    max_ttl: Duration,
    margin: Duration,
    negative_ttl: Duration,
    refresh_interval: Duration,
    revocations: Revocations,
    mark_retention: Duration,
    /// Counters for the admin RPC.
    pub counters: Counters,
    evictions: Arc<Evictions>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyCache({} entries)", self.cache.entry_count())
    }
}

fn weigh(k: &CacheKey, v: &Entry) -> u32 {
    let key = k.home.as_str().len() + k.invoker.as_str().len() + k.aef.as_str().len();
    let val = match v {
        Entry::Key(c) => {
            64 + c.info.key_id.len()
                + c.info.interface_canonical.len()
                + c.info
                    .allowed_api_names
                    .iter()
                    .map(|a| a.len() + 24)
                    .sum::<usize>()
                + c.info
                    .invoker_ca_certificates
                    .iter()
                    .map(String::len)
                    .sum::<usize>()
                + 200
        }
        Entry::Refusal(r, _) => r.message.len() + r.reason.len() + 64,
    };
    u32::try_from(key + val).unwrap_or(u32::MAX)
}

/// Codes whose answers are definite (the partner looked and said no) and may be cached briefly.
fn definite(status: &Status) -> bool {
    error_reason(status).is_some()
        && matches!(
            status.code(),
            Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition
        )
}

impl KeyCache {
    /// A cache with the configured policy.
    pub fn new(cfg: &CacheConfig) -> Self {
        let evictions = Arc::new(Evictions::default());
        let counted = evictions.clone();
        Self {
            cache: Cache::builder()
                .max_capacity(cfg.max_weight)
                .weigher(weigh)
                .expire_after(EntryExpiry)
                .eviction_listener(move |_, _, cause| {
                    use moka::notification::RemovalCause as C;
                    let n = match cause {
                        C::Size => &counted.size,
                        C::Expired => &counted.expired,
                        C::Explicit => &counted.invalidated,
                        C::Replaced => return,
                    };
                    n.fetch_add(1, Ordering::Relaxed);
                })
                .build(),
            max_ttl: Duration::from_secs(cfg.max_ttl_secs),
            margin: Duration::from_millis(cfg.safety_margin_ms),
            negative_ttl: Duration::from_millis(cfg.negative_ttl_ms),
            refresh_interval: Duration::from_millis(cfg.refresh_interval_ms),
            revocations: Revocations::default(),
            mark_retention: Duration::from_secs(cfg.max_ttl_secs) + Duration::from_secs(60),
            counters: Counters::default(),
            evictions,
        }
    }

    /// Entries that left, by cause (counted when moka runs its maintenance).
    pub fn evictions(&self) -> &Evictions {
        &self.evictions
    }

    /// Keeps revocation marks for `max_ttl` plus `max_budget` (the largest request budget: the
    /// longest a fetch may be in flight), instead of the default of one minute.
    pub fn with_max_budget(mut self, max_budget: Duration) -> Self {
        self.mark_retention = self.max_ttl + max_budget;
        self
    }

    /// Whether a revocation of `key` (its key `key_id`) came after `seq` was taken.
    fn revoked_since(&self, key: &CacheKey, seq: u64, key_id: &str) -> bool {
        let r = &self.revocations;
        if r.floor.load(Ordering::SeqCst) > seq {
            return true;
        }
        let marks = r.marks.lock();
        let after = |aef: Option<AefId>, kid: Option<String>| {
            marks
                .get(&(key.home.clone(), key.invoker.clone(), aef, kid))
                .is_some_and(|(m, _)| *m > seq)
        };
        let (aef, kid) = (Some(key.aef.clone()), Some(key_id.to_string()));
        after(None, None) || after(aef.clone(), None) || after(None, kid.clone()) || after(aef, kid)
    }

    /// A revocation of `invoker` of `home` (at `aefs`, or at every AEF when empty): marks it,
    /// then evicts its entries. No entry fetched before, and no fetch in flight now, is served
    /// or cached afterwards. Returns the entries evicted.
    pub async fn revoke(&self, home: &CcfId, invoker: &ApiInvokerId, aefs: &[AefId]) -> u64 {
        self.revoke_scoped(home, invoker, aefs, None).await
    }

    /// [`Self::revoke`] for a replaced key (`KEY_REPLACED_BY_NEWER`): the entries are evicted
    /// alike, but the mark holds that key id only, so a fetch in flight that brings the newer
    /// key is cached as usual.
    pub async fn revoke_key(
        &self,
        home: &CcfId,
        invoker: &ApiInvokerId,
        aefs: &[AefId],
        key_id: &str,
    ) -> u64 {
        self.revoke_scoped(home, invoker, aefs, Some(key_id)).await
    }

    async fn revoke_scoped(
        &self,
        home: &CcfId,
        invoker: &ApiInvokerId,
        aefs: &[AefId],
        key_id: Option<&str>,
    ) -> u64 {
        let r = &self.revocations;
        // The mark comes first: a fetch that checks after it sees it, one that inserted before
        // it is evicted below.
        let seq = r.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let overflow = {
            let mut marks = r.marks.lock();
            let now = Instant::now();
            if marks.len() >= MAX_MARKS / 2 {
                marks.retain(|_, (_, at)| now.duration_since(*at) < self.mark_retention);
            }
            if marks.len() + aefs.len().max(1) > MAX_MARKS {
                marks.clear();
                r.floor.store(seq, Ordering::SeqCst);
                true
            } else {
                let targets: Vec<Option<AefId>> = if aefs.is_empty() {
                    vec![None]
                } else {
                    aefs.iter().cloned().map(Some).collect()
                };
                for aef in targets {
                    let kid = key_id.map(str::to_string);
                    marks.insert((home.clone(), invoker.clone(), aef, kid), (seq, now));
                }
                false
            }
        };
        if overflow {
            tracing::warn!(
                marks = MAX_MARKS,
                "too many revocations within the mark retention: every cached answer is evicted"
            );
            let n = self.cache.entry_count();
            self.cache.invalidate_all();
            return n;
        }
        // Every entry of those AEFs goes, also for a replaced key (as before marks existed): the
        // next request fetches the current answer.
        self.evict_where(|k| {
            &k.home == home && &k.invoker == invoker && (aefs.is_empty() || aefs.contains(&k.aef))
        })
        .await
    }

    fn key_entry(
        &self,
        mut info: InvokerSecurityInformation,
        sent_at: Instant,
        refreshed: bool,
        seq: u64,
    ) -> Entry {
        let psk = AefPsk::from_slice(&info.aef_psk);
        // The bytes now live in `psk` only.
        zeroize::Zeroize::zeroize(&mut info.aef_psk);
        let remaining = Duration::from_millis(info.remaining_validity_ms);
        let ttl = remaining.saturating_sub(self.margin).min(self.max_ttl);
        Entry::Key(Arc::new(CachedKey {
            info,
            psk,
            key_expires_at: sent_at + remaining,
            last_refresh: RefreshMark::new(refreshed.then_some(sent_at)),
            ttl,
            seq,
        }))
    }

    /// Serves `key` from the cache or from `fetch` (run once for concurrent callers).
    pub async fn get_or_fetch<F>(
        &self,
        key: CacheKey,
        presented_key_id: &str,
        method: i32,
        fetch: F,
    ) -> Result<InvokerSecurityInformation, Status>
    where
        F: Future<Output = Result<InvokerSecurityInformation, Status>>,
    {
        self.get_or_fetch_served(key, presented_key_id, method, fetch)
            .await
            .0
    }

    /// [`Self::get_or_fetch`], and how the answer was served.
    pub async fn get_or_fetch_served<F>(
        &self,
        key: CacheKey,
        presented_key_id: &str,
        method: i32,
        fetch: F,
    ) -> (Result<InvokerSecurityInformation, Status>, Served)
    where
        F: Future<Output = Result<InvokerSecurityInformation, Status>>,
    {
        let mut served = Served::Miss;
        let result = self
            .lookup(key, presented_key_id, method, fetch, &mut served)
            .await;
        (result, served)
    }

    async fn lookup<F>(
        &self,
        key: CacheKey,
        presented_key_id: &str,
        method: i32,
        fetch: F,
        served: &mut Served,
    ) -> Result<InvokerSecurityInformation, Status>
    where
        F: Future<Output = Result<InvokerSecurityInformation, Status>>,
    {
        // Whether this fetch was forced by what the caller presented (it then counts as a
        // refresh of the entry it replaces).
        let mut refreshed = false;
        if let Some(e) = self.cache.get(&key).await {
            match &e {
                // Revoked since it was fetched: absent, and invalidated below.
                Entry::Key(k) if self.revoked_since(&key, k.seq, k.key_id()) => {}
                Entry::Key(k) => {
                    let same = (presented_key_id.is_empty() || presented_key_id == k.key_id())
                        && (method == 0 || method == k.info.sel_security_method);
                    // What a caller presents may force at most one refresh per interval: random
                    // key ids from a stranger must not become partner fetches.
                    if !same && k.last_refresh.claim(self.refresh_interval) {
                        tracing::info!(
                            partner = %key.home,
                            api_invoker_id = %key.invoker,
                            "presented key id or method differs from the cached answer; refreshing"
                        );
                        *served = Served::Refresh;
                        return self.refresh(key, k, fetch).await;
                    }
                    if let Some(a) = k.answer() {
                        *served = Served::Hit;
                        self.counters.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(a);
                    }
                }
                // A refusal stands for its short lifetime whatever the caller presents.
                Entry::Refusal(r, _) => {
                    let renew = !presented_key_id.is_empty()
                        && r.renewable()
                        && r.last_refresh.claim(self.refresh_interval);
                    if !renew {
                        *served = Served::NegativeHit;
                        self.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
                        return Err(r.status());
                    }
                    refreshed = true;
                }
            }
            self.cache.invalidate(&key).await;
        }
        let ran = AtomicBool::new(false);
        let asked = key.clone();
        let result = self
            .cache
            .try_get_with(key, async {
                ran.store(true, Ordering::Relaxed);
                let sent_at = Instant::now();
                let seq = self.revocations.seq.load(Ordering::SeqCst);
                match fetch.await {
                    // Not cached: an error is not kept by moka.
                    Ok(info) if self.revoked_since(&asked, seq, &info.key_id) => {
                        Err(revoked_during_fetch())
                    }
                    Ok(info) => Ok(self.key_entry(info, sent_at, refreshed, seq)),
                    Err(s) if definite(&s) => Ok(Entry::Refusal(
                        Arc::new(Refusal::new(&s, refreshed)),
                        self.negative_ttl,
                    )),
                    Err(s) => Err(s),
                }
            })
            .await;
        if ran.load(Ordering::Relaxed) {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
        } else {
            *served = Served::Coalesced;
            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            // A revocation that came between the check above and moka's insert.
            Ok(Entry::Key(k)) if self.revoked_since(&asked, k.seq, k.key_id()) => {
                self.cache.invalidate(&asked).await;
                Err(revoked_during_fetch())
            }
            Ok(Entry::Key(k)) => k.answer().ok_or_else(|| {
                error_status(
                    Code::FailedPrecondition,
                    ErrorReason::KeyExpired,
                    "the key expired before it could be handed on",
                )
            }),
            Ok(Entry::Refusal(r, _)) => Err(r.status()),
            Err(shared) => Err(copy_status(&shared)),
        }
    }

    /// Replaces a live entry with a fresh answer. The entry stays until the answer is in: a
    /// refresh that fails for want of budget or of the partner serves the still-valid answer
    /// (nothing a caller presents can evict a valid key), while a definite refusal replaces it.
    async fn refresh<F>(
        &self,
        key: CacheKey,
        old: &CachedKey,
        fetch: F,
    ) -> Result<InvokerSecurityInformation, Status>
    where
        F: Future<Output = Result<InvokerSecurityInformation, Status>>,
    {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let sent_at = Instant::now();
        let seq = self.revocations.seq.load(Ordering::SeqCst);
        match fetch.await {
            Ok(info) if self.revoked_since(&key, seq, &info.key_id) => {
                if self.revoked_since(&key, old.seq, old.key_id()) {
                    self.cache.invalidate(&key).await;
                }
                Err(revoked_during_fetch())
            }
            Ok(info) => {
                let key_id = info.key_id.clone();
                let entry = self.key_entry(info, sent_at, true, seq);
                let answer = match &entry {
                    Entry::Key(k) => k.answer(),
                    Entry::Refusal(..) => None,
                };
                self.cache.insert(key.clone(), entry).await;
                if self.revoked_since(&key, seq, &key_id) {
                    self.cache.invalidate(&key).await;
                    return Err(revoked_during_fetch());
                }
                answer.ok_or_else(|| {
                    error_status(
                        Code::FailedPrecondition,
                        ErrorReason::KeyExpired,
                        "the key expired before it could be handed on",
                    )
                })
            }
            Err(s) if definite(&s) => {
                let refusal = Refusal::new(&s, true);
                self.cache
                    .insert(key, Entry::Refusal(Arc::new(refusal), self.negative_ttl))
                    .await;
                Err(s)
            }
            Err(s) => {
                if self.revoked_since(&key, old.seq, old.key_id()) {
                    return Err(revoked_during_fetch());
                }
                tracing::info!(error = %s.message(), "refresh failed; the cached answer stands");
                old.answer().ok_or(s)
            }
        }
    }

    /// Evicts every entry matching `pred`; returns how many.
    pub async fn evict_where(&self, pred: impl Fn(&CacheKey) -> bool) -> u64 {
        let keys: Vec<CacheKey> = self
            .cache
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in &keys {
            self.cache.invalidate(k).await;
        }
        keys.len() as u64
    }

    /// Approximate number of entries.
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Runs moka's pending maintenance (tests and the admin RPC want fresh counts).
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Number of key entries currently held (not refusals), for inspection and tests.
    pub fn key_entries(&self) -> usize {
        self.cache
            .iter()
            .filter(|(_, v)| matches!(v, Entry::Key(_)))
            .count()
    }
}

/// Re-creates a shared error (moka hands one `Arc` to every waiting caller), keeping its reason.
fn copy_status(from: &Status) -> Status {
    match error_reason(from) {
        Some(reason) => status_with_reason(from.code(), &reason, from.message()),
        None => Status::new(from.code(), from.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccf_core::grpc::reason_of;
    use tokio::sync::oneshot;

    fn key(aef: &str) -> CacheKey {
        CacheKey {
            home: CcfId::new("operator-b.test").unwrap(),
            invoker: ApiInvokerId::new("inv-1").unwrap(),
            aef: AefId::new(aef).unwrap(),
        }
    }

    fn answer(key_id: &str) -> InvokerSecurityInformation {
        InvokerSecurityInformation {
            api_invoker_id: "inv-1".into(),
            home_ccf_id: "operator-b.test".into(),
            aef_id: "aef-a1".into(),
            aef_psk: vec![7; 32],
            key_id: key_id.into(),
            remaining_validity_ms: 60_000,
            ..Default::default()
        }
    }

    /// A fetch that tells the test it started, then waits for the test's go.
    fn gated(
        key_id: &'static str,
    ) -> (
        impl Future<Output = Result<InvokerSecurityInformation, Status>>,
        oneshot::Receiver<()>,
        oneshot::Sender<()>,
    ) {
        let (started_tx, started) = oneshot::channel();
        let (go, go_rx) = oneshot::channel::<()>();
        let fetch = async move {
            let _ = started_tx.send(());
            let _ = go_rx.await;
            Ok(answer(key_id))
        };
        (fetch, started, go)
    }

    /// A revocation that arrives while a miss is being fetched wins: the fetch ends in
    /// REVOKED_DURING_FETCH and nothing is cached; a fetch that starts after it is served.
    #[tokio::test]
    async fn a_fetch_in_flight_never_caches_a_revoked_key() {
        let cache = Arc::new(KeyCache::new(&CacheConfig::default()));
        let (fetch, started, go) = gated("0123456789abcdef");
        let c = cache.clone();
        let miss = tokio::spawn(async move { c.get_or_fetch(key("aef-a1"), "", 0, fetch).await });
        started.await.unwrap();
        let k = key("aef-a1");
        cache.revoke(&k.home, &k.invoker, &[]).await;
        go.send(()).unwrap();
        let e = miss.await.unwrap().unwrap_err();
        assert_eq!(
            (e.code(), reason_of(&e)),
            (
                Code::PermissionDenied,
                Some(ErrorReason::RevokedDuringFetch)
            )
        );
        cache.sync().await;
        assert_eq!(cache.key_entries(), 0, "the revoked key was cached");

        // A fetch begun after the revocation (the invoker negotiated anew) is cached.
        let got = cache
            .get_or_fetch(key("aef-a1"), "", 0, async {
                Ok(answer("fedcba9876543210"))
            })
            .await
            .unwrap();
        assert_eq!(got.key_id, "fedcba9876543210");
        cache.sync().await;
        assert_eq!(cache.key_entries(), 1);
    }

    /// The same for a refresh forced by a presented key id: the old entry goes and the fresh
    /// answer is not cached.
    #[tokio::test]
    async fn a_refresh_in_flight_never_caches_a_revoked_key() {
        let cache = Arc::new(KeyCache::new(&CacheConfig::default()));
        cache
            .get_or_fetch(key("aef-a1"), "", 0, async {
                Ok(answer("0123456789abcdef"))
            })
            .await
            .unwrap();
        let (fetch, started, go) = gated("fedcba9876543210");
        let c = cache.clone();
        let refresh = tokio::spawn(async move {
            c.get_or_fetch(key("aef-a1"), "fedcba9876543210", 0, fetch)
                .await
        });
        started.await.unwrap();
        let k = key("aef-a1");
        cache
            .revoke(&k.home, &k.invoker, std::slice::from_ref(&k.aef))
            .await;
        go.send(()).unwrap();
        let e = refresh.await.unwrap().unwrap_err();
        assert_eq!(reason_of(&e), Some(ErrorReason::RevokedDuringFetch));
        cache.sync().await;
        assert_eq!(cache.key_entries(), 0);
    }

    /// A replaced key's mark revokes that key only: a fetch in flight that brings the newer
    /// key is cached, one that brings the replaced key is not.
    #[tokio::test]
    async fn a_replaced_key_mark_spares_the_newer_key() {
        let cache = Arc::new(KeyCache::new(&CacheConfig::default()));
        let k = key("aef-a1");
        for (fetched, cached) in [("fedcba9876543210", 1), ("0123456789abcdef", 0)] {
            cache.evict_where(|_| true).await;
            let (fetch, started, go) = gated(fetched);
            let c = cache.clone();
            let miss =
                tokio::spawn(async move { c.get_or_fetch(key("aef-a1"), "", 0, fetch).await });
            started.await.unwrap();
            cache
                .revoke_key(&k.home, &k.invoker, &[], "0123456789abcdef")
                .await;
            go.send(()).unwrap();
            let r = miss.await.unwrap();
            assert_eq!(r.is_ok(), cached == 1, "{fetched}: {r:?}");
            cache.sync().await;
            assert_eq!(cache.key_entries(), cached, "{fetched}");
        }
    }

    /// An entry older than a mark is never served, even if it was inserted after the eviction
    /// ran (the check-then-insert window); a mark for one AEF leaves the others.
    #[tokio::test]
    async fn entries_older_than_a_mark_are_not_served() {
        let cache = KeyCache::new(&CacheConfig::default());
        let k = key("aef-a1");
        let seq = cache.revocations.seq.load(Ordering::SeqCst);
        cache.revoke(&k.home, &k.invoker, &[]).await;
        // As if moka inserted a fetch begun before the mark after the eviction ran.
        cache
            .cache
            .insert(
                k.clone(),
                cache.key_entry(answer("0123456789abcdef"), Instant::now(), false, seq),
            )
            .await;
        let fetched = AtomicBool::new(false);
        let got = cache
            .get_or_fetch(k.clone(), "", 0, async {
                fetched.store(true, Ordering::SeqCst);
                Ok(answer("fedcba9876543210"))
            })
            .await
            .unwrap();
        assert!(fetched.load(Ordering::SeqCst), "the stale entry was served");
        assert_eq!(got.key_id, "fedcba9876543210");

        let other = key("aef-c1");
        cache
            .get_or_fetch(other.clone(), "", 0, async {
                Ok(answer("0123456789abcdef"))
            })
            .await
            .unwrap();
        cache
            .revoke(&k.home, &k.invoker, std::slice::from_ref(&k.aef))
            .await;
        cache.sync().await;
        assert_eq!(cache.key_entries(), 1, "only aef-a1's entry goes");
        let kept = cache
            .get_or_fetch(other, "", 0, async { Err(Status::internal("not fetched")) })
            .await;
        assert!(kept.is_ok(), "{kept:?}");
    }
}
