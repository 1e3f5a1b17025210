//! The keys an AEF holds (and, for method 2, the CAs it trusts per invoker): one per invoker, each with its own validity timer started from the
//! remaining validity its CCF returned (seed 000 step 5), the APIs the invoker may call, and the
//! invoker's open connections (closed when the invoker is revoked). Keys are zeroized on drop.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ccf_core::ids::ApiInvokerId;
use ccf_core::kdf::AefPsk;

/// A key the AEF holds for one invoker.
#[derive(Clone, Debug)]
pub struct HeldKey {
    /// The AEFPSK.
    pub psk: AefPsk,
    /// Its key id.
    pub key_id: String,
    /// The invoker's home CCF.
    pub home_ccf_id: String,
    /// When the AEF stops accepting it.
    pub expires_at: Instant,
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
    /// The invoker's home CCF.
    pub home_ccf_id: String,
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

/// Why the PSK endpoint refused a key (what the log says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key is held for this invoker (never fetched, or revoked).
    UnknownIdentity,
    /// The identity names another key id than the one held.
    StaleKeyId,
    /// The held key's validity has ended.
    Expired,
    /// The invoker's authorization was revoked by the CCF.
    Revoked,
    /// Method 2: no CA is held for the invoker the certificate names.
    NoCertificateInfo,
    /// Method 2: the certificate's domain is not the home CCF the CA was fetched for.
    OtherHome,
}

impl Refusal {
    /// The log's words.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownIdentity => "unknown identity (no key held for this invoker)",
            Refusal::StaleKeyId => "key id does not match the key held",
            Refusal::Expired => "expired key",
            Refusal::Revoked => "revoked invoker (its authorization was withdrawn by the CCF)",
            Refusal::NoCertificateInfo => {
                "the certificate names an invoker that initiated no authentication here (no CA held for it)"
            }
            Refusal::OtherHome => {
                "the certificate names another home domain than the invoker's authentication initiation"
            }
        }
    }
}

/// The AEF's key store.
#[derive(Debug, Default)]
pub struct KeyStore {
    keys: RwLock<HashMap<ApiInvokerId, HeldKey>>,
    cas: RwLock<HashMap<ApiInvokerId, HeldCa>>,
    revoked: RwLock<std::collections::HashSet<ApiInvokerId>>,
    conns: Mutex<HashMap<ApiInvokerId, Vec<std::net::TcpStream>>>,
}

impl KeyStore {
    /// The key for `invoker` when it is still valid.
    pub fn valid(&self, invoker: &ApiInvokerId) -> Option<HeldKey> {
        let k = self.keys.read().ok()?.get(invoker).cloned()?;
        (!k.remaining().is_zero()).then_some(k)
    }

    /// Stores a key fetched from the CCF (a fresh key lifts an earlier revocation: the CCF
    /// would not have handed it out otherwise).
    pub fn put(&self, invoker: ApiInvokerId, key: HeldKey) {
        if let Ok(mut r) = self.revoked.write() {
            r.remove(&invoker);
        }
        if let Ok(mut m) = self.keys.write() {
            m.insert(invoker, key);
        }
    }

    /// The CA held for `invoker` when it is still valid.
    pub fn valid_ca(&self, invoker: &ApiInvokerId) -> Option<HeldCa> {
        let c = self.cas.read().ok()?.get(invoker).cloned()?;
        (!c.remaining().is_zero()).then_some(c)
    }

    /// Stores what method 2 needs for `invoker` (lifts an earlier revocation, as [`Self::put`]).
    pub fn put_ca(&self, invoker: ApiInvokerId, ca: HeldCa) {
        if let Ok(mut r) = self.revoked.write() {
            r.remove(&invoker);
        }
        if let Ok(mut m) = self.cas.write() {
            m.insert(invoker, ca);
        }
    }

    /// What a method-2 handshake of `invoker` of `home` is checked against, or why nothing.
    pub fn for_certificate(&self, invoker: &ApiInvokerId, home: &str) -> Result<HeldCa, Refusal> {
        if self.is_revoked(invoker) {
            return Err(Refusal::Revoked);
        }
        let m = self.cas.read().map_err(|_| Refusal::NoCertificateInfo)?;
        let c = m.get(invoker).ok_or(Refusal::NoCertificateInfo)?;
        if c.home_ccf_id != home {
            return Err(Refusal::OtherHome);
        }
        if c.remaining().is_zero() {
            return Err(Refusal::Expired);
        }
        Ok(c.clone())
    }

    /// Whether the CCF revoked `invoker` (and nothing newer was fetched since).
    pub fn is_revoked(&self, invoker: &ApiInvokerId) -> bool {
        self.revoked.read().is_ok_and(|r| r.contains(invoker))
    }

    /// The key for a PSK handshake, or why there is none.
    pub fn for_handshake(&self, invoker: &ApiInvokerId, key_id: &str) -> Result<HeldKey, Refusal> {
        if self.revoked.read().is_ok_and(|r| r.contains(invoker)) {
            return Err(Refusal::Revoked);
        }
        let m = self.keys.read().map_err(|_| Refusal::UnknownIdentity)?;
        let k = m.get(invoker).ok_or(Refusal::UnknownIdentity)?;
        if k.key_id != key_id {
            return Err(Refusal::StaleKeyId);
        }
        if k.remaining().is_zero() {
            return Err(Refusal::Expired);
        }
        Ok(k.clone())
    }

    /// Remembers an open connection of `invoker` (a clone of its socket, to shut it down).
    pub fn track(&self, invoker: &ApiInvokerId, socket: std::net::TcpStream) {
        if let Ok(mut c) = self.conns.lock() {
            let list = c.entry(invoker.clone()).or_default();
            // Forget sockets of connections that ended.
            list.retain(|s| s.peer_addr().is_ok());
            list.push(socket);
        }
    }

    /// Drops the invoker's key and closes its open connections; returns how many were closed.
    pub fn revoke(&self, invoker: &ApiInvokerId) -> u32 {
        if let Ok(mut m) = self.keys.write() {
            m.remove(invoker);
        }
        if let Ok(mut m) = self.cas.write() {
            m.remove(invoker);
        }
        if let Ok(mut r) = self.revoked.write() {
            r.insert(invoker.clone());
        }
        let socks = self
            .conns
            .lock()
            .ok()
            .and_then(|mut c| c.remove(invoker))
            .unwrap_or_default();
        let mut closed = 0;
        for s in socks {
            if s.shutdown(Shutdown::Both).is_ok() {
                closed += 1;
            }
        }
        closed
    }
}
