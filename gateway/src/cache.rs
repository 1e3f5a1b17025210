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

/// The partner and AEF of an entry: the same for many entries, so held once ([`KeyCache::key`]).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Route {
    home: CcfId,
    aef: AefId,
}

/// What an entry is cached under: `(home CCF id, apiInvokerId, aefId)`. Keys made by
/// [`KeyCache::key`] share their (home, AEF) part with every other key of that pair.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    route: Arc<Route>,
    invoker: ApiInvokerId,
}

impl CacheKey {
    /// A key of its own (tests; the service asks [`KeyCache::key`], which shares).
    pub fn new(home: CcfId, invoker: ApiInvokerId, aef: AefId) -> Self {
        Self {
            route: Arc::new(Route { home, aef }),
            invoker,
        }
    }

    /// The invoker's home domain (the partner).
    pub fn home(&self) -> &CcfId {
        &self.route.home
    }

    /// The invoker.
    pub fn invoker(&self) -> &ApiInvokerId {
        &self.invoker
    }

    /// The AEF the key is bound to.
    pub fn aef(&self) -> &AefId {
        &self.route.aef
    }
}

/// Values many entries hold alike, each held once: an entry takes the one already held when it
/// carries the same. Values no entry holds any more are dropped when the table has doubled since
/// it was last pruned, so it never holds much more than twice what the live entries need.
struct Interner<T> {
    table: parking_lot::Mutex<(std::collections::HashSet<Arc<T>>, usize)>,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            table: parking_lot::Mutex::new((std::collections::HashSet::new(), 0)),
        }
    }
}

impl<T: Eq + std::hash::Hash> Interner<T> {
    /// [`Self::intern`] of a value already in an `Arc`: the one held if there is one, else this.
    fn intern_arc(&self, value: Arc<T>) -> Arc<T> {
        let mut guard = self.table.lock();
        if let Some(held) = guard.0.get(&value) {
            return held.clone();
        }
        guard.0.insert(value.clone());
        value
    }

    fn intern(&self, value: T) -> Arc<T> {
        let mut guard = self.table.lock();
        let (table, pruned_at) = &mut *guard;
        if let Some(held) = table.get(&value) {
            return held.clone();
        }
        if table.len() >= 2 * *pruned_at + 64 {
            table.retain(|p| Arc::strong_count(p) > 1);
            *pruned_at = table.len();
        }
        let value = Arc::new(value);
        table.insert(value.clone());
        value
    }

    /// The values held that `pred` accepts (every value a live entry carries is held).
    fn matching(&self, pred: impl Fn(&T) -> bool) -> Vec<Arc<T>> {
        self.table
            .lock()
            .0
            .iter()
            .filter(|v| pred(v))
            .cloned()
            .collect()
    }
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

/// What the answers of many entries share (for one AEF of one partner: the API names, the
/// interface, the CA certificates of method 2), held once and shared by every entry that carries
/// the same, rather than copied into each of a million entries.
#[derive(PartialEq, Eq, Hash)]
struct AnswerParts {
    allowed_api_names: Vec<String>,
    invoker_ca_certificates: Vec<String>,
    interface_canonical: String,
}

/// A key id as the partner sent it: its usual form (16 hex digits) inline, anything else boxed.
enum KeyIdText {
    Hex16([u8; 16]),
    Other(Box<str>),
}

impl KeyIdText {
    fn new(text: String) -> Self {
        match <[u8; 16]>::try_from(text.as_bytes()) {
            Ok(b) if text.is_ascii() => Self::Hex16(b),
            _ => Self::Other(text.into_boxed_str()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // ASCII by construction.
            Self::Hex16(b) => std::str::from_utf8(b).unwrap_or_default(),
            Self::Other(s) => s,
        }
    }
}

/// A cached key, compact (docs/BENCHMARKS.md, case f): the invoker, home and AEF are the entry's
/// key and are not stored again (unless the answer named others, which the gateway's checks
/// refuse before anything is cached), the key id is inline, what many entries share is
/// [`AnswerParts`], and the AEFPSK is held in [`AefPsk`] (inline, zeroized on drop).
pub struct CachedKey {
    psk: Option<AefPsk>,
    key_id: KeyIdText,
    method: i32,
    parts: Arc<AnswerParts>,
    /// The ids the answer named, when they are not those of the entry's key.
    other_ids: Option<Box<[String; 3]>>,
    key_expires_at: Instant,
    last_refresh: RefreshMark,
    ttl: Duration,
    /// The revocation sequence when its fetch started.
    seq: u64,
}

impl CachedKey {
    /// The answer cached under `key`, with the validity remaining now; `None` once the key has
    /// expired.
    pub fn answer(&self, key: &CacheKey) -> Option<InvokerSecurityInformation> {
        let remaining = self
            .key_expires_at
            .saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return None;
        }
        let [api_invoker_id, home_ccf_id, aef_id] = match &self.other_ids {
            Some(ids) => (**ids).clone(),
            None => [
                key.invoker().to_string(),
                key.home().to_string(),
                key.aef().to_string(),
            ],
        };
        Some(InvokerSecurityInformation {
            api_invoker_id,
            home_ccf_id,
            aef_id,
            sel_security_method: self.method,
            aef_psk: self
                .psk
                .as_ref()
                .map(|p| p.expose().to_vec())
                .unwrap_or_default(),
            key_id: self.key_id.as_str().to_owned(),
            remaining_validity_ms: remaining.as_millis() as u64,
            allowed_api_names: self.parts.allowed_api_names.clone(),
            invoker_ca_certificates: self.parts.invoker_ca_certificates.clone(),
            interface_canonical: self.parts.interface_canonical.clone(),
        })
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        self.key_id.as_str()
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

/// What a revocation marks of one invoker of a home domain: at one AEF or (`None`) at all, only
/// its key with that key id (a replaced key) or (`None`) any; with the revocation's sequence
/// number and when it was marked.
struct Mark {
    aef: Option<AefId>,
    key_id: Option<String>,
    seq: u64,
    at: Instant,
}

/// The marks, by home domain and invoker: a cache hit looks its invoker up by reference, with no
/// allocation (the hit path runs this on every answer).
#[derive(Default)]
struct Marks {
    by_invoker: HashMap<CcfId, HashMap<ApiInvokerId, Vec<Mark>>>,
    len: usize,
}

impl Marks {
    fn of(&self, home: &CcfId, invoker: &ApiInvokerId) -> &[Mark] {
        self.by_invoker
            .get(home)
            .and_then(|m| m.get(invoker))
            .map_or(&[], Vec::as_slice)
    }

    /// Adds a mark, replacing one of the same scope.
    fn insert(&mut self, home: &CcfId, invoker: &ApiInvokerId, mark: Mark) {
        let list = self
            .by_invoker
            .entry(home.clone())
            .or_default()
            .entry(invoker.clone())
            .or_default();
        if let Some(m) = list
            .iter_mut()
            .find(|m| m.aef == mark.aef && m.key_id == mark.key_id)
        {
            *m = mark;
        } else {
            list.push(mark);
            self.len += 1;
        }
    }

    /// Keeps the marks made within `retention` of `now`.
    fn retain_recent(&mut self, now: Instant, retention: Duration) {
        let mut len = 0;
        self.by_invoker.retain(|_, invokers| {
            invokers.retain(|_, list| {
                list.retain(|m| now.duration_since(m.at) < retention);
                len += list.len();
                !list.is_empty()
            });
            !invokers.is_empty()
        });
        self.len = len;
    }

    fn clear(&mut self) {
        self.by_invoker.clear();
        self.len = 0;
    }
}

/// The revocation sequence and its marks.
#[derive(Default)]
struct Revocations {
    seq: AtomicU64,
    /// Every entry and fetch older than this counts as revoked (the marks overflowed).
    floor: AtomicU64,
    marks: parking_lot::Mutex<Marks>,
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
    parts: Interner<AnswerParts>,
    routes: Interner<Route>,
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
    let key = k.home().as_str().len() + k.invoker().as_str().len() + k.aef().as_str().len();
    let val = match v {
        // The shared parts are weighed with every entry that holds them: the bound stays a bound
        // of what the cache could hold if no two entries shared anything.
        Entry::Key(c) => {
            64 + c.key_id().len()
                + c.parts.interface_canonical.len()
                + c.parts
                    .allowed_api_names
                    .iter()
                    .map(|a| a.len() + 24)
                    .sum::<usize>()
                + c.parts
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
    /// The key of `invoker` of `home` at `aef`, sharing its (home, AEF) part with the other
    /// entries of that pair.
    pub fn key(&self, home: &CcfId, invoker: ApiInvokerId, aef: &AefId) -> CacheKey {
        CacheKey {
            route: self.routes.intern(Route {
                home: home.clone(),
                aef: aef.clone(),
            }),
            invoker,
        }
    }

    /// `key` with its route held by the interner, which is how a revocation finds its entries:
    /// every key that enters the cache goes through here (a key made by [`Self::key`] already
    /// is; one made by [`CacheKey::new`] is not).
    fn interned(&self, key: CacheKey) -> CacheKey {
        CacheKey {
            route: self.routes.intern_arc(key.route),
            invoker: key.invoker,
        }
    }

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
            parts: Interner::default(),
            routes: Interner::default(),
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
        marks.of(key.home(), key.invoker()).iter().any(|m| {
            m.seq > seq
                && m.aef.as_ref().is_none_or(|a| a == key.aef())
                && m.key_id.as_deref().is_none_or(|k| k == key_id)
        })
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
            if marks.len >= MAX_MARKS / 2 {
                marks.retain_recent(now, self.mark_retention);
            }
            if marks.len + aefs.len().max(1) > MAX_MARKS {
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
                    let mark = Mark {
                        aef,
                        key_id: key_id.map(str::to_string),
                        seq,
                        at: now,
                    };
                    marks.insert(home, invoker, mark);
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
        // next request fetches the current answer. The entries are found through the interned
        // routes (partner, AEF), a few hundred at most, not by a scan of the whole cache: a
        // partner's revocations must not cost time in proportion to everything cached.
        let routes = self
            .routes
            .matching(|r| r.home == *home && (aefs.is_empty() || aefs.contains(&r.aef)));
        let mut evicted = 0;
        for route in routes {
            let key = CacheKey {
                route,
                invoker: invoker.clone(),
            };
            if self.cache.remove(&key).await.is_some() {
                evicted += 1;
            }
        }
        evicted
    }

    fn key_entry(
        &self,
        asked: &CacheKey,
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
        let same_ids = info.api_invoker_id == asked.invoker().as_str()
            && info.home_ccf_id == asked.home().as_str()
            && info.aef_id == asked.aef().as_str();
        let other_ids = (!same_ids).then(|| {
            Box::new([
                std::mem::take(&mut info.api_invoker_id),
                std::mem::take(&mut info.home_ccf_id),
                std::mem::take(&mut info.aef_id),
            ])
        });
        Entry::Key(Arc::new(CachedKey {
            psk,
            key_id: KeyIdText::new(info.key_id),
            method: info.sel_security_method,
            parts: self.parts.intern(AnswerParts {
                allowed_api_names: info.allowed_api_names,
                invoker_ca_certificates: info.invoker_ca_certificates,
                interface_canonical: info.interface_canonical,
            }),
            other_ids,
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
                        && (method == 0 || method == k.method);
                    // What a caller presents may force at most one refresh per interval: random
                    // key ids from a stranger must not become partner fetches.
                    if !same && k.last_refresh.claim(self.refresh_interval) {
                        tracing::info!(
                            partner = %key.home(),
                            api_invoker_id = %key.invoker(),
                            "presented key id or method differs from the cached answer; refreshing"
                        );
                        *served = Served::Refresh;
                        // Boxed, like the miss below: the hit path's future stays small.
                        return Box::pin(self.refresh(key, k, fetch)).await;
                    }
                    if let Some(a) = k.answer(&key) {
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
        // The miss path's state (moka's insert, the fetch) lives on the heap, allocated on a
        // miss only: held inline, it would make every hit's future kilobytes large, and a hit
        // would spend its time copying it.
        Box::pin(self.miss(key, fetch, refreshed, served)).await
    }

    /// A fetch of `key` through moka's coalescing insert (`refreshed`: forced by what the
    /// caller presented).
    async fn miss<F>(
        &self,
        key: CacheKey,
        fetch: F,
        refreshed: bool,
        served: &mut Served,
    ) -> Result<InvokerSecurityInformation, Status>
    where
        F: Future<Output = Result<InvokerSecurityInformation, Status>>,
    {
        let key = self.interned(key);
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
                    Ok(info) => Ok(self.key_entry(&asked, info, sent_at, refreshed, seq)),
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
            Ok(Entry::Key(k)) => k.answer(&asked).ok_or_else(|| {
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
        let key = self.interned(key);
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
                let entry = self.key_entry(&key, info, sent_at, true, seq);
                let answer = match &entry {
                    Entry::Key(k) => k.answer(&key),
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
                old.answer(&key).ok_or(s)
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
        CacheKey::new(
            CcfId::new("operator-b.test").unwrap(),
            ApiInvokerId::new("inv-1").unwrap(),
            AefId::new(aef).unwrap(),
        )
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
        cache.revoke(k.home(), k.invoker(), &[]).await;
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
            .revoke(k.home(), k.invoker(), std::slice::from_ref(k.aef()))
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
                .revoke_key(k.home(), k.invoker(), &[], "0123456789abcdef")
                .await;
            go.send(()).unwrap();
            let r = miss.await.unwrap();
            assert_eq!(r.is_ok(), cached == 1, "{fetched}: {r:?}");
            cache.sync().await;
            assert_eq!(cache.key_entries(), cached, "{fetched}");
        }
    }

    /// An entry hands back exactly the answer it was made from (but the validity, which runs
    /// down), whether or not its ids are the key's, whatever the key id's form; entries with the
    /// same shared parts hold them once, and parts no entry holds are dropped as the table grows.
    #[tokio::test]
    async fn compact_entries_rebuild_the_answer_exactly_and_share_their_parts() {
        let cache = KeyCache::new(&CacheConfig::default());
        let k = cache.key(
            &CcfId::new("operator-b.test").unwrap(),
            ApiInvokerId::new("inv-1").unwrap(),
            &AefId::new("aef-a1").unwrap(),
        );
        let mut odd = answer("not-hex!");
        odd.api_invoker_id = "inv-other".into();
        odd.invoker_ca_certificates = vec!["-----BEGIN CERTIFICATE-----".into()];
        for sent in [answer("0123456789abcdef"), odd] {
            let Entry::Key(e) = cache.key_entry(&k, sent.clone(), Instant::now(), false, 0) else {
                panic!("a key entry");
            };
            let mut got = e.answer(&k).unwrap();
            assert!(got.remaining_validity_ms <= sent.remaining_validity_ms);
            got.remaining_validity_ms = sent.remaining_validity_ms;
            assert_eq!(got, sent);
        }
        let entry = |inv: &str| {
            let mut a = answer("0123456789abcdef");
            a.api_invoker_id = inv.into();
            match cache.key_entry(&k, a, Instant::now(), false, 0) {
                Entry::Key(e) => e,
                Entry::Refusal(..) => unreachable!(),
            }
        };
        let (x, y) = (entry("inv-x"), entry("inv-y"));
        assert!(Arc::ptr_eq(&x.parts, &y.parts), "equal parts are held once");
        let k2 = cache.key(k.home(), ApiInvokerId::new("inv-2").unwrap(), k.aef());
        assert!(Arc::ptr_eq(&k.route, &k2.route), "keys share their route");
        drop((x, y));
        for i in 0..1000 {
            let mut a = answer("0123456789abcdef");
            a.interface_canonical = format!("aef-{i}");
            drop(cache.key_entry(&k, a, Instant::now(), false, 0));
        }
        assert!(
            cache.parts.table.lock().0.len() <= 200,
            "unheld parts are pruned"
        );
    }

    /// An entry older than a mark is never served, even if it was inserted after the eviction
    /// ran (the check-then-insert window); a mark for one AEF leaves the others.
    #[tokio::test]
    async fn entries_older_than_a_mark_are_not_served() {
        let cache = KeyCache::new(&CacheConfig::default());
        let k = key("aef-a1");
        let seq = cache.revocations.seq.load(Ordering::SeqCst);
        cache.revoke(k.home(), k.invoker(), &[]).await;
        // As if moka inserted a fetch begun before the mark after the eviction ran.
        cache
            .cache
            .insert(
                cache.interned(k.clone()),
                cache.key_entry(&k, answer("0123456789abcdef"), Instant::now(), false, seq),
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
            .revoke(k.home(), k.invoker(), std::slice::from_ref(k.aef()))
            .await;
        cache.sync().await;
        assert_eq!(cache.key_entries(), 1, "only aef-a1's entry goes");
        let kept = cache
            .get_or_fetch(other, "", 0, async { Err(Status::internal("not fetched")) })
            .await;
        assert!(kept.is_ok(), "{kept:?}");
    }
}
