//! Method 2 (TLS with certificates, TS 33.122 6.5.2.2) at the AEF: the rustls client-certificate
//! verifier of the AEF's TLS endpoint.
//!
//! Which CAs may have issued an invoker's certificate depends on the invoker: its home CCF named
//! them when the AEF asked at Authentication Initiation (across domains through the gateways,
//! which checked them against the federation's trust). So the verifier reads the invoker and its
//! home domain from the certificate's identity URI, looks up what the [`KeyStore`] holds for that
//! invoker, and checks the chain against those CAs only. A client without a certificate is let
//! through the handshake: that is method 3, and its calls must carry a token.
//! Each refusal is logged with its reason.

use std::sync::Arc;

use capif_proto::v1::ErrorReason;
use ccf_core::grpc::Refusal;
use ccf_core::identity::{IdentityError, PeerIdentity, Role};
use ccf_core::ids::{ApiInvokerId, CcfId};
use ccf_core::tls::{CheckedClientVerifier, ClientCheck};
use rustls::OtherError;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::Code;

use crate::keys::{self, InvokerRef, KeyStore};

/// Why an invoker's certificate is refused (method 2), in the handshake or on a call. Answered
/// `CERTIFICATE_REFUSED` ([`Refusal`]); the log's words are the `Display`.
#[derive(Debug, thiserror::Error)]
pub enum CertRefusal {
    /// The certificate names no `capif://` identity.
    #[error("the certificate names no CAPIF identity: {0}")]
    NoIdentity(#[source] IdentityError),
    /// It names an identity that is not an API invoker's.
    #[error("the certificate does not name an API invoker")]
    NotAnInvoker,
    /// The key store holds nothing that accepts the invoker it names (handshake).
    #[error("{}", .0.as_str())]
    NotHeld(keys::Refusal),
    /// It does not chain to a CA the invoker's home CCF named.
    #[error(
        "the certificate does not chain to a CA that {home} named for its invokers (unfederated CA: {source})"
    )]
    Unfederated {
        /// The home domain the certificate names.
        home: CcfId,
        /// What the verification against those CAs said.
        #[source]
        source: rustls::Error,
    },
    /// The call presents another invoker than the certificate names.
    #[error(
        "the certificate names API invoker {invoker}, but the call presents {presented:?} (header {})",
        capif_2e::headers::INVOKER_ID_HEADER
    )]
    OtherInvoker {
        /// The invoker of the certificate.
        invoker: ApiInvokerId,
        /// The invoker the call's header names.
        presented: String,
    },
    /// The invoker was accepted at the handshake but no longer is (revoked or expired since).
    #[error("this connection's invoker is no longer accepted: {}", .0.as_str())]
    NoLongerAccepted(keys::Refusal),
}

impl Refusal for CertRefusal {
    fn code(&self) -> Code {
        match self {
            Self::NoLongerAccepted(_) => Code::Unauthenticated,
            _ => Code::PermissionDenied,
        }
    }

    fn reason(&self) -> ErrorReason {
        ErrorReason::CertificateRefused
    }
}

impl From<CertRefusal> for tonic::Status {
    fn from(e: CertRefusal) -> Self {
        e.status()
    }
}

/// The verifier of the AEF's TLS endpoint: optional client authentication (no certificate is
/// method 3), a presented certificate checked by [`InvokerCertCheck`].
pub type InvokerCertVerifier = CheckedClientVerifier<InvokerCertCheck>;

/// What [`InvokerCertVerifier`] checks: the chain against the CAs held for the invoker it names.
#[derive(Debug)]
pub struct InvokerCertCheck {
    keys: Arc<KeyStore>,
}

impl InvokerCertCheck {
    /// Over the AEF's key store.
    pub fn new(keys: Arc<KeyStore>) -> Self {
        Self { keys }
    }
}

/// Logs the refusal and fails the handshake with it (kept as the error's source).
fn refuse(subject: &str, refusal: CertRefusal) -> rustls::Error {
    tracing::info!(%subject, reason = %refusal, "certificate refused");
    rustls::Error::Other(OtherError(Arc::new(refusal)))
}

impl ClientCheck for InvokerCertCheck {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let id = PeerIdentity::from_certificate(end_entity)
            .map_err(|e| refuse("?", CertRefusal::NoIdentity(e)))?;
        let subject = id.uri();
        let Role::Invoker(invoker) = &id.role else {
            return Err(refuse(&subject, CertRefusal::NotAnInvoker));
        };
        let held = self
            .keys
            .for_certificate(&InvokerRef::new(id.ccf_id.clone(), invoker.clone()))
            .map_err(|r| refuse(&subject, CertRefusal::NotHeld(r)))?;
        held.verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ())
            .map_err(|source| {
                refuse(
                    &subject,
                    CertRefusal::Unfederated {
                        home: id.ccf_id.clone(),
                        source,
                    },
                )
            })
    }
}

/// A verifier trusting exactly `ca_pems` (what the CCF named for one invoker).
pub fn verifier_for(
    ca_pems: &[String],
) -> Result<Arc<dyn ClientCertVerifier>, ccf_core::tls::TlsError> {
    let mut certs = Vec::new();
    for pem in ca_pems {
        certs.extend(ccf_core::tls::certs_from_pem(
            "invoker CA certificate",
            pem,
        )?);
    }
    let roots = ccf_core::tls::roots(&certs)?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        ccf_core::tls::provider(),
    )
    .build()
    .map_err(ccf_core::tls::TlsError::Verifier)
}
