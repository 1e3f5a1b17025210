//! The federation's trust rules (docs/PROTOCOL.md 6.3; invariant 2 in docs/ARCHITECTURE.md): trust is configured, location is
//! discovered. A partner's gateway is accepted only if its certificate chains to THAT partner's
//! configured CA and names THAT partner's gateway (`capif://<partner>/gateway`), whatever DNS said
//! and whichever other partner CA might also have signed it.

use std::collections::BTreeMap;
use std::sync::Arc;

use ccf_core::identity::{IdentityError, PeerIdentity, Role};
use ccf_core::ids::CcfId;
use ccf_core::tls::{ExpectedPeer, PeerServerVerifier, TlsError, certs_from_pem, provider};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

/// What this gateway trusts of one partner.
pub struct PartnerTrust {
    /// The partner.
    pub ccf_id: CcfId,
    /// Its CA certificates.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// The CAs that may issue its invokers' certificates (method 2): `invoker_ca_cert`, else
    /// `ca_certs`.
    pub invoker_cas: Vec<CertificateDer<'static>>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<PeerServerVerifier>,
}

impl std::fmt::Debug for PartnerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartnerTrust({})", self.ccf_id)
    }
}

/// Why a partner's certificate is refused (answered `UNKNOWN_PARTNER` by
/// `service::Refused::Untrusted`).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The certificate names no usable `capif://` identity.
    #[error("the certificate does not name a partner gateway: {0}")]
    NoIdentity(#[source] IdentityError),
    /// It names an identity, but not a gateway's.
    #[error("the certificate does not name a partner gateway: {0}")]
    NotAGateway(PeerIdentity),
    /// It names the gateway of a domain that is not a configured partner.
    #[error("{0} is not a partner of this domain")]
    UnknownPartner(CcfId),
    /// It names a partner's gateway but was not issued by that partner's CA.
    #[error(
        "the certificate claims to be {partner}'s gateway but does not chain to {partner}'s CA"
    )]
    WrongCa {
        /// The partner the certificate claims to be.
        partner: CcfId,
        /// What the verification against that partner's CA said.
        #[source]
        source: rustls::Error,
    },
}

/// Why the CA certificates a partner's CCF named for its invoker (method 2) are refused
/// (answered `CA_NOT_FEDERATED` by `service::Refused::CaNotFederated`).
#[derive(Debug, thiserror::Error)]
pub enum InvokerCaError {
    /// The answer names no CA at all.
    #[error("{partner} named no CA for its invoker")]
    NoneNamed {
        /// The partner.
        partner: CcfId,
    },
    /// A CA certificate named is not readable PEM.
    #[error("{partner} named an unreadable CA certificate for its invoker: {source}")]
    Unreadable {
        /// The partner.
        partner: CcfId,
        /// Why it cannot be read.
        #[source]
        source: TlsError,
    },
    /// A CA named is not the CA this federation configures for the partner.
    #[error(
        "{partner} named CA {subject:?} for its invoker, which is not the CA this federation trusts for {partner}"
    )]
    NotFederated {
        /// The partner.
        partner: CcfId,
        /// The subject of the CA certificate named.
        subject: String,
    },
    /// The domain is not a configured partner, so no CA of it is trusted.
    #[error("{partner} has no configured CA")]
    NotAPartner {
        /// The domain.
        partner: CcfId,
    },
}

impl PartnerTrust {
    /// Builds the trust of one partner from its CA bundle (PEM).
    pub fn new(ccf_id: CcfId, ca_pem: &str) -> Result<Self, TlsError> {
        let ca_certs = certs_from_pem("partner CA certificate", ca_pem)?;
        let store = Arc::new(ccf_core::tls::roots(&ca_certs)?);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), provider())
                .build()
                .map_err(TlsError::Verifier)?;
        // Chain to this partner's CA alone, identity `capif://<partner>/gateway`; DNS only
        // located the server, so its name is not what is trusted.
        let server_verifier = Arc::new(PeerServerVerifier::locating(
            (*store).clone(),
            ExpectedPeer::gateway(&ccf_id),
        )?);
        Ok(Self {
            ccf_id,
            invoker_cas: ca_certs.clone(),
            ca_certs,
            client_verifier,
            server_verifier,
        })
    }

    /// The same trust, with `pem` (a bundle) as the CAs of the partner's invokers.
    pub fn with_invoker_cas(mut self, pem: &str) -> Result<Self, TlsError> {
        self.invoker_cas = certs_from_pem("partner invoker CA certificate", pem)?;
        Ok(self)
    }

    /// Verifies a client certificate (and the intermediates it came with) against this
    /// partner's CA bundle alone.
    pub fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), TrustError> {
        self.client_verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ())
            .map_err(|source| TrustError::WrongCa {
                partner: self.ccf_id.clone(),
                source,
            })
    }

    /// The CA certificates trusted for this partner's gateway, for the operator's view.
    pub fn anchors(&self) -> Vec<capif_proto::v1::TrustAnchor> {
        use sha2::Digest;
        self.ca_certs
            .iter()
            .map(|c| {
                let (subject, not_after_unix_ms) = x509_parser::parse_x509_certificate(c)
                    .map(|(_, x)| {
                        let t = x.validity().not_after.timestamp();
                        (
                            x.subject().to_string(),
                            u64::try_from(t).unwrap_or(0).saturating_mul(1000),
                        )
                    })
                    .unwrap_or_else(|_| ("an unparsable certificate".into(), 0));
                capif_proto::v1::TrustAnchor {
                    sha256: hex::encode(sha2::Sha256::digest(c.as_ref())),
                    subject,
                    not_after_unix_ms,
                }
            })
            .collect()
    }

    /// The verifier for outbound connections to this partner.
    pub fn server_verifier(&self) -> Arc<PeerServerVerifier> {
        self.server_verifier.clone()
    }

    /// Method 2 across domains: the CA certificates the partner's CCF names as issuers of its
    /// invoker's certificate must be CAs this federation trusts for that partner. Otherwise a
    /// partner (or whoever answers in its name) could make our AEFs accept certificates of any
    /// CA.
    pub fn check_invoker_cas(&self, pems: &[String]) -> Result<(), InvokerCaError> {
        let partner = || self.ccf_id.clone();
        if pems.is_empty() {
            return Err(InvokerCaError::NoneNamed { partner: partner() });
        }
        for pem in pems {
            // Never empty: a PEM text without a certificate is refused as unreadable.
            let certs = certs_from_pem("invoker CA certificate", pem).map_err(|source| {
                InvokerCaError::Unreadable {
                    partner: partner(),
                    source,
                }
            })?;
            if let Some(c) = certs.iter().find(|c| !self.invoker_cas.contains(c)) {
                let subject = x509_parser::parse_x509_certificate(c)
                    .map(|(_, x)| x.subject().to_string())
                    .unwrap_or_else(|_| "an unparsable certificate".into());
                return Err(InvokerCaError::NotFederated {
                    partner: partner(),
                    subject,
                });
            }
        }
        Ok(())
    }
}

/// All partners.
#[derive(Debug, Default)]
pub struct Federation {
    partners: BTreeMap<CcfId, Arc<PartnerTrust>>,
}

impl Federation {
    /// From the configured partners.
    pub fn new(partners: Vec<PartnerTrust>) -> Self {
        Self::from_shared(partners.into_iter().map(Arc::new).collect())
    }

    /// From partners' trust that another federation may share (a reload keeps the trust of an
    /// unchanged partner).
    pub fn from_shared(partners: Vec<Arc<PartnerTrust>>) -> Self {
        Self {
            partners: partners
                .into_iter()
                .map(|p| (p.ccf_id.clone(), p))
                .collect(),
        }
    }

    /// One partner.
    pub fn get(&self, id: &CcfId) -> Option<&PartnerTrust> {
        self.partners.get(id).map(|p| &**p)
    }

    /// One partner, shared.
    pub fn get_shared(&self, id: &CcfId) -> Option<&Arc<PartnerTrust>> {
        self.partners.get(id)
    }

    /// Every partner's trust.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<PartnerTrust>> {
        self.partners.values()
    }

    /// Which partner an inbound client certificate belongs to: verified against that partner's
    /// CA alone, so partner C's CA cannot vouch for "operator-b".
    pub fn authenticate(&self, cert: &CertificateDer<'_>) -> Result<CcfId, TrustError> {
        self.authenticate_chain(cert, &[], UnixTime::now())
    }

    /// [`Self::authenticate`] inside the handshake, with the intermediates the client sent: the
    /// CAPIF-6e listener's client verifier (`partners::FederationVerifier`).
    pub fn authenticate_chain(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CcfId, TrustError> {
        let id = PeerIdentity::from_certificate(cert).map_err(TrustError::NoIdentity)?;
        if id.role != Role::Gateway {
            return Err(TrustError::NotAGateway(id));
        }
        let Some(partner) = self.partners.get(&id.ccf_id) else {
            return Err(TrustError::UnknownPartner(id.ccf_id));
        };
        partner.verify_client(cert, intermediates, now)?;
        Ok(id.ccf_id)
    }
}

/// A TLS 1.3 client config for one partner: our gateway identity, the partner's verifier.
pub fn partner_client_config(
    trust: &PartnerTrust,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let key = ccf_core::tls::key_from_pem(key_pem)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(trust.server_verifier())
        .with_client_auth_cert(certs_from_pem("gateway certificate", cert_pem)?, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The same with the gateway's interconnect identity from a resolver a reload may swap
/// (`credentials::CertSlot`).
pub fn partner_client_config_with(
    trust: &PartnerTrust,
    identity: Arc<dyn rustls::client::ResolvesClientCert>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(trust.server_verifier())
        .with_client_cert_resolver(identity);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccf_core::pki::DomainCa;

    #[test]
    fn invoker_cas_must_be_the_partners_configured_ca() {
        let b = CcfId::new("operator-b.test").unwrap();
        let real = DomainCa::generate(&b).unwrap();
        let rogue = DomainCa::generate(&b).unwrap();
        let trust = PartnerTrust::new(b, real.cert_pem()).unwrap();
        assert!(
            trust
                .check_invoker_cas(&[real.cert_pem().to_string()])
                .is_ok()
        );
        let e = trust
            .check_invoker_cas(&[rogue.cert_pem().to_string()])
            .unwrap_err();
        assert!(
            matches!(&e, InvokerCaError::NotFederated { partner, .. } if partner == &trust.ccf_id),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("not the CA this federation trusts"),
            "{e}"
        );
        // One bad CA among good ones is enough to refuse; so is naming none.
        assert!(matches!(
            trust.check_invoker_cas(&[real.cert_pem().to_string(), rogue.cert_pem().to_string()]),
            Err(InvokerCaError::NotFederated { .. })
        ));
        assert!(matches!(
            trust.check_invoker_cas(&[]),
            Err(InvokerCaError::NoneNamed { .. })
        ));
        assert!(matches!(
            trust.check_invoker_cas(&["not a pem".into()]),
            Err(InvokerCaError::Unreadable { .. })
        ));
        // With `invoker_ca_cert`, those CAs and only those may be named for invokers, whatever
        // CA the partner's gateway certificate comes from.
        let b = trust.ccf_id.clone();
        let interconnect = DomainCa::generate(&b).unwrap();
        let trust = PartnerTrust::new(b, interconnect.cert_pem())
            .unwrap()
            .with_invoker_cas(real.cert_pem())
            .unwrap();
        assert!(
            trust
                .check_invoker_cas(&[real.cert_pem().to_string()])
                .is_ok()
        );
        assert!(matches!(
            trust.check_invoker_cas(&[interconnect.cert_pem().to_string()]),
            Err(InvokerCaError::NotFederated { .. })
        ));
    }
}
