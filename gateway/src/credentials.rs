//! The gateway's own certificates, swappable: a [`CertSlot`] is the `ResolvesServerCert` of a
//! listener and the `ResolvesClientCert` of an outbound link, so a reload that renews the
//! certificate changes what the next handshake presents without a new listener or channel.
//! There are two slots: the own identity (CAPIF-6 listener, the link to the own CCF; issued by
//! the domain CA) and the interconnect identity (CAPIF-6e listener, partner links), which is the
//! own identity unless `[tls] interconnect_cert` names another.

use std::sync::Arc;

use ccf_core::tls::{TlsError, certs_from_pem, key_from_pem, provider};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate and key cannot serve as the gateway's identity.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Unreadable PEM.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The key cannot sign (unsupported type) — the key itself is never shown.
    #[error("the private key cannot be used: {0}")]
    Key(rustls::Error),
    /// The key does not belong to the certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
}

/// A certificate chain (end entity first) and its key, checked to belong together.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, CredentialError> {
    let chain = certs_from_pem("gateway certificate", chain_pem)?;
    let key = key_from_pem(key_pem)?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(CredentialError::Key)?;
    let ck = CertifiedKey::new(chain, signer);
    // A renewal whose key file was not replaced with the certificate would fail every handshake:
    // refuse it here, while the running certificate still serves.
    ck.keys_match().map_err(|_| CredentialError::KeyMismatch)?;
    Ok(Arc::new(ck))
}

/// One identity of the gateway, as a resolver that a reload may swap.
pub struct CertSlot {
    name: &'static str,
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertSlot {
    // The key never reaches Debug output: only the slot's name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertSlot({})", self.name)
    }
}

impl CertSlot {
    /// A slot named `name` (for logs) holding `key`.
    pub fn new(name: &'static str, key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            name,
            current: parking_lot::RwLock::new(key),
        })
    }

    /// What the next handshake presents.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().clone()
    }

    /// Replaces it; open connections keep the certificate they were made with.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write() = key;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
