//! What an AEF holds per invoker: the key (method 1) or the CAs (method 2), each with its own
//! validity timer started from the remaining validity its CCF returned (docs/PROTOCOL.md 4.5, step 5) and the
//! APIs the invoker may call; revocation marks; and the invoker's open PSK connections (closed
//! when it is revoked). Keys are zeroized on drop.
//!
//! An invoker is `(home CCF id, apiInvokerId)` everywhere here ([`InvokerRef`]): ids are assigned
//! by each home CCF, so two domains may use the same one, and a notice or identity from one
//! domain must never touch the other's invoker. Revocation marks expire (with the held key, and
//! at least after `revoked_mark_ttl`, which covers the life of a token issued before the
//! revocation) and are capped in number, so a peer cannot grow them without bound. Locks are
//! `parking_lot`'s: they do not poison, so a panic elsewhere cannot turn a check into "not
//! revoked".

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ccf_core::ids::CcfId;
use ccf_core::kdf::AefPsk;
use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, RwLock};

pub use ccf_core::ids::InvokerRef;

/// A key the AEF holds for one invoker.
#[derive(Clone, Debug)]
pub struct HeldKey {
    /// The AEFPSK.
    pub psk: AefPsk,
    /// Its key id.
    pub key_id: String,
    /// When the AEF stops accepting it.
    pub expires_at: Instant,
    /// When it was fetched.
    pub fetched_at: Instant,
    /// When a presented key id last forced a refresh (`None`: fetched on a plain miss; its
    /// first refresh may happen at once, later ones wait for the interval).
    pub last_refresh: Option<Instant>,
    /// APIs the invoker may call.
    pub allowed_apis: Vec<String>,
}

impl HeldKey {
    /// Remaining validity.
    pub fn remaining(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }
}

/// What the AEF holds for an invoker that uses method 2 (TLS with certificates): a verifier
/// trusting exactly the CA certificates its CCF named for that invoker, with the same timer and
/// authorization as a key.
#[derive(Clone, Debug)]
pub struct HeldCa {
    /// Verifies the invoker's certificate chain against the named CAs.
    pub verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// When the request that fetched it was sent.
    pub fetched_at: Instant,
    /// When the AEF stops accepting it (the security context's validity).
    pub expires_at: Instant,
    /// APIs the invoker may call.
    pub allowed_apis: Vec<String>,
}

impl HeldCa {
    /// Remaining validity.
    pub fn remaining(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }
}

/// Why the PSK or TLS endpoint refused an invoker (what the log says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key is held for this invoker of this home (never fetched, or revoked).
    UnknownIdentity,
    /// The identity names another key id than the one held.
    StaleKeyId,
    /// The held key's validity has ended.
    Expired,
    /// The invoker's authorization was revoked by the CCF.
    Revoked,
    /// Method 2: no CA is held for the invoker the certificate names (of that home).
    NoCertificateInfo,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    /// The log's words.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownIdentity => {
                "unknown identity (no key held for this invoker of this home domain)"
            }
            Refusal::StaleKeyId => "key id does not match the key held",
            Refusal::Expired => "expired key",
            Refusal::Revoked => "revoked invoker (its authorization was withdrawn by the CCF)",
            Refusal::NoCertificateInfo => {
                "the certificate names an invoker (of its home domain) that initiated no \
                 authentication here (no CA held for it)"
            }
        }
    }
}

/// Revocation-mark policy.
#[derive(Clone, Copy, Debug)]
pub struct MarkPolicy {
    /// A mark lives at least this long (tokens issued before the revocation live at most this).
    pub ttl: Duration,
    /// At most this many marks are kept; the one closest to its end goes first.
    pub max_marks: usize,
}

impl Default for MarkPolicy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            max_marks: 100_000,
        }
    }
}

/// A revocation mark: when the notice arrived, and until when it stands.
#[derive(Clone, Copy, Debug)]
struct Mark {
    revoked_at: Instant,
    until: Instant,
}

/// The revocation switch of one open PSK connection.
#[derive(Debug, Default)]
pub struct ConnControl {
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl ConnControl {
    /// Ready once the connection's invoker was revoked (registers the task to be woken).
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closed.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.closed.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// An open connection's place in the [`KeyStore`]; it leaves when dropped (with the connection),
/// so nothing of a closed connection stays behind.
#[derive(Debug)]
pub struct ConnTicket {
    store: Arc<KeyStore>,
    who: InvokerRef,
    id: u64,
    /// The connection's revocation switch.
    pub control: Arc<ConnControl>,
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        let mut conns = self.store.conns.lock();
        if let Some(m) = conns.get_mut(&self.who) {
            m.remove(&self.id);
            if m.is_empty() {
                conns.remove(&self.who);
            }
        }
    }
}

/// The AEF's key store.
#[derive(Debug, Default)]
pub struct KeyStore {
    keys: RwLock<HashMap<InvokerRef, HeldKey>>,
    cas: RwLock<HashMap<InvokerRef, HeldCa>>,
    revoked: RwLock<HashMap<InvokerRef, Mark>>,
    conns: Mutex<HashMap<InvokerRef, HashMap<u64, Arc<ConnControl>>>>,
    next_conn: AtomicU64,
    marks: MarkPolicy,
}

impl KeyStore {
    /// A store with the given revocation-mark policy.
    pub fn new(marks: MarkPolicy) -> Self {
        Self {
            marks,
            ..Default::default()
        }
    }

    /// The key for `who` when it is still valid.
    pub fn valid(&self, who: &InvokerRef) -> Option<HeldKey> {
        let k = self.keys.read().get(who).cloned()?;
        (!k.remaining().is_zero()).then_some(k)
    }

    /// Stores a key fetched from the CCF. A key fetched after a revocation lifts it (the CCF
    /// would not have handed it out otherwise); a key whose request was sent before the
    /// revocation arrived is refused (false): it may be the very key that was revoked.
    #[must_use]
    pub fn put(&self, who: InvokerRef, key: HeldKey) -> bool {
        if !self.lift_mark(&who, key.fetched_at) {
            return false;
        }
        let mut keys = self.keys.write();
        // Expired keys of other invokers go while we hold the lock anyway (bounded by use).
        if keys.len() >= 1024 && keys.len().is_power_of_two() {
            keys.retain(|_, k| !k.remaining().is_zero());
        }
        keys.insert(who, key);
        true
    }

    /// Removes `who`'s revocation mark unless the revocation is newer than `fetched_at`.
    fn lift_mark(&self, who: &InvokerRef, fetched_at: Instant) -> bool {
        let mut marks = self.revoked.write();
        match marks.get(who) {
            Some(m) if m.revoked_at >= fetched_at => false,
            Some(_) => {
                marks.remove(who);
                true
            }
            None => true,
        }
    }

    /// Claims the one refresh per `interval` that a presented key id may force for the key held
    /// for `who` (true: go ahead; nothing held: always).
    pub fn claim_refresh(&self, who: &InvokerRef, interval: Duration) -> bool {
        match self.keys.write().get_mut(who) {
            Some(k) if k.last_refresh.is_some_and(|t| t.elapsed() < interval) => false,
            Some(k) => {
                k.last_refresh = Some(Instant::now());
                true
            }
            None => true,
        }
    }

    /// The CA held for `who` when it is still valid.
    pub fn valid_ca(&self, who: &InvokerRef) -> Option<HeldCa> {
        let c = self.cas.read().get(who).cloned()?;
        (!c.remaining().is_zero()).then_some(c)
    }

    /// Stores what method 2 needs for `who` (a revocation rule as [`Self::put`]).
    #[must_use]
    pub fn put_ca(&self, who: InvokerRef, ca: HeldCa) -> bool {
        if !self.lift_mark(&who, ca.fetched_at) {
            return false;
        }
        let mut cas = self.cas.write();
        if cas.len() >= 1024 && cas.len().is_power_of_two() {
            cas.retain(|_, c| !c.remaining().is_zero());
        }
        cas.insert(who, ca);
        true
    }

    /// What a method-2 handshake of `who` is checked against, or why nothing.
    pub fn for_certificate(&self, who: &InvokerRef) -> Result<HeldCa, Refusal> {
        if self.is_revoked(who) {
            return Err(Refusal::Revoked);
        }
        let c = self
            .cas
            .read()
            .get(who)
            .cloned()
            .ok_or(Refusal::NoCertificateInfo)?;
        if c.remaining().is_zero() {
            return Err(Refusal::Expired);
        }
        Ok(c)
    }

    /// Whether the CCF revoked `who` (and nothing newer was fetched since).
    pub fn is_revoked(&self, who: &InvokerRef) -> bool {
        self.revoked
            .read()
            .get(who)
            .is_some_and(|m| m.until > Instant::now())
    }

    /// The key for a PSK handshake, or why there is none: home, invoker and key id must all
    /// match the key held.
    pub fn for_handshake(&self, who: &InvokerRef, key_id: &str) -> Result<HeldKey, Refusal> {
        if self.is_revoked(who) {
            return Err(Refusal::Revoked);
        }
        let k = self
            .keys
            .read()
            .get(who)
            .cloned()
            .ok_or(Refusal::UnknownIdentity)?;
        if k.key_id != key_id {
            return Err(Refusal::StaleKeyId);
        }
        if k.remaining().is_zero() {
            return Err(Refusal::Expired);
        }
        Ok(k)
    }

    /// Registers an open PSK connection of `who`; it stays registered while the ticket lives.
    pub fn track(self: &Arc<Self>, who: &InvokerRef) -> ConnTicket {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(ConnControl::default());
        self.conns
            .lock()
            .entry(who.clone())
            .or_default()
            .insert(id, control.clone());
        // A revocation between the handshake's key check and this registration found nothing
        // to close: close it now.
        if self.is_revoked(who) {
            control.close();
        }
        ConnTicket {
            store: self.clone(),
            who: who.clone(),
            id,
            control,
        }
    }

    /// Everything the store holds, in a form tests compare before and after an operation that
    /// must change nothing (keys with their bytes, CAs, revocation marks, connections).
    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (who, k) in self.keys.read().iter() {
            let bytes: String = k.psk.expose().iter().map(|b| format!("{b:02x}")).collect();
            out.push(format!("key {who}: {bytes} {k:?}"));
        }
        for (who, c) in self.cas.read().iter() {
            out.push(format!(
                "ca {who}: {:?} {:?} {:?}",
                c.fetched_at, c.expires_at, c.allowed_apis
            ));
        }
        for (who, m) in self.revoked.read().iter() {
            out.push(format!("mark {who}: {m:?}"));
        }
        for (who, conns) in self.conns.lock().iter() {
            let mut ids: Vec<&u64> = conns.keys().collect();
            ids.sort();
            out.push(format!("conns {who}: {ids:?}"));
        }
        out.push(format!(
            "next_conn {}",
            self.next_conn.load(Ordering::Relaxed)
        ));
        out.sort();
        out
    }

    /// Open PSK connections held now (all invokers).
    pub fn open_connections(&self) -> usize {
        self.conns.lock().values().map(HashMap::len).sum()
    }

    /// Revocation marks held now.
    pub fn revoked_marks(&self) -> usize {
        self.revoked.read().len()
    }

    /// Drops what is held for `who`, marks it revoked (until its key would have expired, and at
    /// least the mark TTL) and closes its open connections; returns how many were open.
    pub fn revoke(&self, who: &InvokerRef) -> u32 {
        let now = Instant::now();
        let key_end = self.keys.write().remove(who).map(|k| k.expires_at);
        let ca_end = self.cas.write().remove(who).map(|c| c.expires_at);
        let until = [key_end, ca_end]
            .into_iter()
            .flatten()
            .fold(now + self.marks.ttl, Instant::max);
        {
            let mut r = self.revoked.write();
            if r.len() >= self.marks.max_marks && !r.contains_key(who) {
                r.retain(|_, m| m.until > now);
                if r.len() >= self.marks.max_marks {
                    evict_one(&mut r, self.marks.max_marks);
                }
            }
            r.insert(
                who.clone(),
                Mark {
                    revoked_at: now,
                    until,
                },
            );
        }
        let open = self.conns.lock().remove(who).unwrap_or_default();
        for c in open.values() {
            c.close();
        }
        u32::try_from(open.len()).unwrap_or(u32::MAX)
    }
}

/// Makes room for one mark: the one closest to its end among the marks of the home domain that
/// holds the most, so that one domain's notices can only push out that domain's own marks.
fn evict_one(marks: &mut HashMap<InvokerRef, Mark>, max: usize) {
    let mut per_home: HashMap<&CcfId, usize> = HashMap::new();
    for k in marks.keys() {
        *per_home.entry(&k.home).or_default() += 1;
    }
    let Some(home) = per_home
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(h, _)| h.clone())
    else {
        return;
    };
    let first = marks
        .iter()
        .filter(|(k, _)| k.home == home)
        .min_by_key(|(_, m)| m.until)
        .map(|(k, _)| k.clone());
    if let Some(first) = first {
        tracing::warn!(dropped = %first, max, "revocation marks full; the mark closest to its end, of the domain holding most, was dropped");
        marks.remove(&first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(home: &str, id: &str) -> InvokerRef {
        InvokerRef::new(
            CcfId::new(home).unwrap(),
            ccf_core::ids::ApiInvokerId::new(id).unwrap(),
        )
    }

    fn key(byte: u8) -> HeldKey {
        let psk = AefPsk::from_slice(&[byte; 32]).unwrap();
        HeldKey {
            key_id: psk.key_id(),
            psk,
            expires_at: Instant::now() + Duration::from_secs(60),
            fetched_at: Instant::now(),
            last_refresh: None,
            allowed_apis: vec![],
        }
    }

    #[test]
    fn same_id_in_two_domains_are_two_invokers() {
        let s = KeyStore::default();
        let (b, c) = (
            who("operator-b.test", "inv-1"),
            who("operator-c.test", "inv-1"),
        );
        let (kb, kc) = (key(1), key(2));
        assert!(s.put(b.clone(), kb.clone()));
        assert!(s.put(c.clone(), kc.clone()));
        assert_eq!(s.for_handshake(&b, &kb.key_id).unwrap().key_id, kb.key_id);
        assert_eq!(s.for_handshake(&c, &kc.key_id).unwrap().key_id, kc.key_id);
        // Home C with B's key id: refused.
        assert_eq!(
            s.for_handshake(&c, &kb.key_id).unwrap_err(),
            Refusal::StaleKeyId
        );
        s.revoke(&b);
        assert_eq!(
            s.for_handshake(&b, &kb.key_id).unwrap_err(),
            Refusal::Revoked
        );
        assert!(s.for_handshake(&c, &kc.key_id).is_ok(), "C untouched");
        assert!(!s.is_revoked(&c));
    }

    #[test]
    fn closed_connections_leave_nothing_and_revocation_counts_open_ones() {
        let s = Arc::new(KeyStore::default());
        let b = who("operator-b.test", "inv-1");
        let tickets: Vec<_> = (0..5).map(|_| s.track(&b)).collect();
        assert_eq!(s.open_connections(), 5);
        drop(tickets);
        assert_eq!(s.open_connections(), 0);
        let t1 = s.track(&b);
        let _t2 = s.track(&b);
        drop(t1);
        assert_eq!(s.revoke(&b), 1, "only the connection still open");
        let waker = std::task::Waker::noop();
        assert!(
            _t2.control
                .poll_closed(&mut Context::from_waker(waker))
                .is_ready()
        );
    }

    #[test]
    fn a_key_fetched_before_a_revocation_does_not_lift_it() {
        let s = Arc::new(KeyStore::default());
        let b = who("operator-b.test", "inv-1");
        let before = key(1); // its request was sent now
        std::thread::sleep(Duration::from_millis(2));
        s.revoke(&b);
        assert!(
            !s.put(b.clone(), before.clone()),
            "a fetch older than the revocation"
        );
        assert!(s.is_revoked(&b));
        let mut after = key(2);
        after.fetched_at = Instant::now();
        assert!(s.put(b.clone(), after), "a fetch newer than the revocation");
        assert!(!s.is_revoked(&b));
        // A connection registered after its invoker was revoked is closed at once.
        s.revoke(&b);
        let t = s.track(&b);
        let waker = std::task::Waker::noop();
        assert!(
            t.control
                .poll_closed(&mut Context::from_waker(waker))
                .is_ready()
        );
    }

    #[test]
    fn one_domain_cannot_push_out_anothers_marks() {
        let s = KeyStore::new(MarkPolicy {
            ttl: Duration::from_secs(60),
            max_marks: 10,
        });
        for i in 0..3 {
            s.revoke(&who("operator-c.test", &format!("c-{i}")));
        }
        for i in 0..100 {
            s.revoke(&who("operator-b.test", &format!("b-{i}")));
        }
        assert_eq!(s.revoked_marks(), 10);
        for i in 0..3 {
            assert!(s.is_revoked(&who("operator-c.test", &format!("c-{i}"))));
        }
    }

    #[test]
    fn marks_are_bounded_and_expire() {
        let s = KeyStore::new(MarkPolicy {
            ttl: Duration::from_millis(50),
            max_marks: 10,
        });
        for i in 0..100 {
            s.revoke(&who("operator-b.test", &format!("inv-{i}")));
        }
        assert_eq!(s.revoked_marks(), 10);
        assert!(s.is_revoked(&who("operator-b.test", "inv-99")));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!s.is_revoked(&who("operator-b.test", "inv-99")));
    }
}
