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

use ccf_core::identity::{PeerIdentity, Role};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::keys::{InvokerRef, KeyStore};

/// The verifier of the AEF's TLS endpoint.
#[derive(Debug)]
pub struct InvokerCertVerifier {
    keys: Arc<KeyStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl InvokerCertVerifier {
    /// Over the AEF's key store.
    pub fn new(keys: Arc<KeyStore>) -> Self {
        Self {
            keys,
            provider: ccf_core::tls::provider(),
        }
    }
}

fn refuse(subject: &str, reason: &str) -> rustls::Error {
    tracing::info!(%subject, %reason, "certificate refused");
    rustls::Error::General(format!("certificate refused: {reason}"))
}

impl ClientCertVerifier for InvokerCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = PeerIdentity::from_certificate(end_entity).map_err(|e| {
            refuse(
                "?",
                &format!("the certificate names no CAPIF identity: {e}"),
            )
        })?;
        let subject = id.uri();
        let Role::Invoker(invoker) = &id.role else {
            return Err(refuse(
                &subject,
                "the certificate does not name an API invoker",
            ));
        };
        let held = self
            .keys
            .for_certificate(&InvokerRef::new(id.ccf_id.clone(), invoker.clone()))
            .map_err(|r| refuse(&subject, r.as_str()))?;
        held.verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| {
                refuse(
                    &subject,
                    &format!(
                        "the certificate does not chain to a CA that {} named for its invokers (unfederated CA: {e})",
                        id.ccf_id
                    ),
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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
    .map_err(|e| ccf_core::tls::TlsError::Verifier(e.to_string()))
}
