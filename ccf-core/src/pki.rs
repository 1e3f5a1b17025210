//! The domain PKI: the root CA of one CCF domain, loaded from PEM files or generated on first
//! start into the state directory, and the certificates it issues (rcgen).
//!
//! Every certificate carries the identity URI SAN of docs/PROTOCOL.md section 2 (see [`crate::identity`]) plus,
//! for servers, DNS/IP SANs. The CA private key never leaves this module except to its own file
//! (mode 0600); key material handed out (`IssuedCredential`) is zeroized on drop.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

use crate::identity::{PeerIdentity, Role};
use crate::ids::CcfId;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM text could not be parsed.
    #[error("{what} is not usable: {source}")]
    BadPem {
        /// What was being read.
        what: &'static str,
        /// The PEM parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A key or certificate parsed, but cannot serve its purpose (not a key rcgen can use, not a
    /// CA certificate it can sign with).
    #[error("{what} is not usable: {source}")]
    Unusable {
        /// What was being read.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
    /// Only one of the CA certificate and key was configured.
    #[error("configure both pki.ca_cert and pki.ca_key, or neither (to generate a CA)")]
    HalfConfigured,
}

/// A certificate with the private key that goes with it (both PEM).
pub struct IssuedCredential {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM. Secret.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuedCredential(<certificate>, <private key redacted>)")
    }
}

/// The root CA of one domain.
pub struct DomainCa {
    ccf_id: CcfId,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DomainCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DomainCa({}, <private key redacted>)", self.ccf_id)
    }
}

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` readable by the owner only.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    // `mode` applies only to a file this call creates; an existing file keeps its own. Tighten
    // that one through the open handle, before the secret goes into it.
    if let Some(mode) = exposed_mode(&f).map_err(io_err(path))? {
        f.set_permissions(fs::Permissions::from_mode(mode & 0o700))
            .map_err(io_err(path))?;
    }
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Opens `path` to read and write without truncating it, creating it owner-only (0600) from the
/// start: a store hands this handle to its database (redb), whose own create would follow the
/// umask (typically 0644), so no moment exists when a new file is readable by others and no
/// chmod races a writer. An existing file keeps its mode; [`exposed_mode`] tells a caller that
/// refuses one.
pub fn open_private_file(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// The permission bits of `file` (`& 0o7777`) if group or others have any, else `None`. Read
/// through the open handle, so nothing can swap the file between this check and its use.
pub fn exposed_mode(file: &fs::File) -> std::io::Result<Option<u32>> {
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Creates the directory `dir` owner-only (0700) from the start; missing parents get the
/// default mode, as they are not the CCF's. An existing directory is left as it is: the CCF
/// checks its mode when it starts.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

/// The extended key usages a certificate of `role` gets: server-auth only if the role serves TLS
/// with it, client-auth only if it calls with it. rustls enforces both (webpki checks server-auth
/// on every client, client-auth on every mutual-TLS listener), so an invoker's or operator's key
/// cannot serve at all. The roles that do both need both; that an AEF cannot pose as its CCF is
/// the clients' identity check (`tls::ExpectedPeer`), not the EKU. No wildcard arm: a new role
/// must be decided here.
pub fn extended_key_usages(role: &Role) -> Vec<ExtendedKeyUsagePurpose> {
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    match role {
        // Serves onboarding and CAPIF-1e/3/6; calls its gateway and its AEFs (revocation).
        Role::Ccf => vec![ServerAuth, ClientAuth],
        // Serves CAPIF-6 and CAPIF-6e; calls its CCF and partner gateways.
        Role::Gateway => vec![ServerAuth, ClientAuth],
        // Serves Authentication Initiation and the method 2/3 TLS endpoint; calls its CCF.
        Role::Aef(_) => vec![ServerAuth, ClientAuth],
        // Calls its CCF (CAPIF-1e) and, with method 2, an AEF's TLS endpoint; serves nothing.
        Role::Invoker(_) => vec![ClientAuth],
        // Calls CcfAdmin and GatewayAdmin; serves nothing.
        Role::Operator => vec![ClientAuth],
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7F; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

impl DomainCa {
    /// Generates a new root CA for `ccf_id` (ECDSA P-256, 10 years).
    pub fn generate(ccf_id: &CcfId) -> Result<Self, PkiError> {
        Self::generate_named(ccf_id, &format!("CAPIF domain CA {ccf_id}"))
    }

    /// Generates a new root CA for `ccf_id` whose subject's common name is `common_name` (a
    /// second CA of the domain, e.g. the one its partners trust for its gateway, must be told
    /// apart from the first by name as well as by key).
    pub fn generate_named(ccf_id: &CcfId, common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, ccf_id.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, 3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            ccf_id: ccf_id.clone(),
            cert_der: cert.der().clone(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from PEM texts.
    pub fn from_pem(ccf_id: &CcfId, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Unusable {
            what: "the CA private key",
            source,
        })?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| {
            PkiError::BadPem {
                what: "the CA certificate",
                source,
            }
        })?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| PkiError::Unusable {
                what: "the CA certificate",
                source,
            })?;
        Ok(Self {
            ccf_id: ccf_id.clone(),
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
        })
    }

    /// Loads the configured CA files, or the CA in `state_dir`, or generates one there.
    pub fn load_or_generate(
        ccf_id: &CcfId,
        state_dir: &Path,
        ca_cert: Option<&Path>,
        ca_key: Option<&Path>,
    ) -> Result<Self, PkiError> {
        let (cert_path, key_path) = match (ca_cert, ca_key) {
            (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
            (None, None) => (state_dir.join(CA_CERT_FILE), state_dir.join(CA_KEY_FILE)),
            _ => return Err(PkiError::HalfConfigured),
        };
        if ca_cert.is_none() && !cert_path.exists() {
            create_private_dir(state_dir).map_err(io_err(state_dir))?;
            let ca = Self::generate(ccf_id)?;
            write_private_file(&key_path, ca.issuer.key().serialize_pem().as_bytes())?;
            fs::write(&cert_path, &ca.cert_pem).map_err(io_err(&cert_path))?;
            tracing::info!(ccf_id = %ccf_id, path = %cert_path.display(), "generated a new domain CA");
            return Ok(ca);
        }
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = Zeroizing::new(fs::read_to_string(&key_path).map_err(io_err(&key_path))?);
        Self::from_pem(ccf_id, &cert_pem, &key_pem)
    }

    /// The domain this CA serves.
    pub fn ccf_id(&self) -> &CcfId {
        &self.ccf_id
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a certificate naming `identity` for a public key the holder keeps.
    /// `hosts` become DNS SANs, or IP SANs when they parse as addresses.
    pub fn issue(
        &self,
        identity: &PeerIdentity,
        hosts: &[String],
        public_key: &impl PublicKeyData,
        days: i64,
    ) -> Result<String, PkiError> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params
            .subject_alt_names
            .push(SanType::URI(identity.uri().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.uri());
        dn.push(DnType::OrganizationName, identity.ccf_id.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = extended_key_usages(&identity.role);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }

    /// Issues a certificate for a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) sent by a peer.
    pub fn issue_for_public_key_pem(
        &self,
        identity: &PeerIdentity,
        public_key_pem: &str,
        days: i64,
    ) -> Result<String, PkiError> {
        let spki = SubjectPublicKeyInfo::from_pem(public_key_pem).map_err(|source| {
            PkiError::Unusable {
                what: "the public key",
                source,
            }
        })?;
        self.issue(identity, &[], &spki, days)
    }

    /// Generates a key pair and issues a certificate for it (servers, AEFs, gateways, operators).
    pub fn issue_with_new_key(
        &self,
        identity: &PeerIdentity,
        hosts: &[String],
        days: i64,
    ) -> Result<IssuedCredential, PkiError> {
        let key = KeyPair::generate()?;
        let cert_pem = self.issue(identity, hosts, &key, days)?;
        Ok(IssuedCredential {
            cert_pem,
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn issued_certificates_name_their_identity() {
        let ccf = CcfId::new("operator-a.test").unwrap();
        let ca = DomainCa::generate(&ccf).unwrap();
        let id = PeerIdentity::new(ccf.clone(), Role::Gateway);
        let cred = ca
            .issue_with_new_key(&id, &["localhost".into(), "127.0.0.1".into()], 1)
            .unwrap();
        let der = CertificateDer::from_pem_slice(cred.cert_pem.as_bytes()).unwrap();
        assert_eq!(PeerIdentity::from_certificate(&der).unwrap(), id);
        assert!(!format!("{cred:?}").contains("PRIVATE"));
    }

    /// (server-auth, client-auth) of an issued certificate, read back with x509-parser; fails if
    /// any other purpose is present.
    fn ekus_of(cert_pem: &str) -> (bool, bool) {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert
            .extended_key_usage()
            .unwrap()
            .expect("every issued certificate names its purposes")
            .value;
        assert!(
            !eku.any
                && !eku.code_signing
                && !eku.email_protection
                && !eku.time_stamping
                && !eku.ocsp_signing
                && eku.other.is_empty(),
            "unexpected purpose in {eku:?}"
        );
        (eku.server_auth, eku.client_auth)
    }

    /// Issue 11 item 5: each role gets the EKUs of what it does, and no more. The table is
    /// written out here rather than taken from `extended_key_usages`, so a change there fails.
    #[test]
    fn each_role_gets_only_the_ekus_it_uses() {
        let ccf = CcfId::new("operator-a.test").unwrap();
        let ca = DomainCa::generate(&ccf).unwrap();
        let cases = [
            (Role::Ccf, (true, true)),
            (Role::Gateway, (true, true)),
            (
                Role::Aef(crate::ids::AefId::new("aef-1").unwrap()),
                (true, true),
            ),
            (Role::Operator, (false, true)),
            (
                Role::Invoker(crate::ids::ApiInvokerId::new("inv-1").unwrap()),
                (false, true),
            ),
        ];
        for (role, want) in cases {
            let id = PeerIdentity::new(ccf.clone(), role);
            let cred = ca
                .issue_with_new_key(&id, &["localhost".into()], 1)
                .unwrap();
            assert_eq!(ekus_of(&cred.cert_pem), want, "{id}");
        }
        // Invokers get theirs through onboarding, for the public key they sent.
        let key = KeyPair::generate().unwrap();
        let id = PeerIdentity::new(
            ccf.clone(),
            Role::Invoker(crate::ids::ApiInvokerId::new("inv-2").unwrap()),
        );
        let pem = ca
            .issue_for_public_key_pem(&id, &key.public_key_pem(), 1)
            .unwrap();
        assert_eq!(ekus_of(&pem), (false, true));
    }

    /// The EKUs only matter if rustls checks them: a client-only certificate cannot serve (the
    /// verifier of every client is webpki's server verifier), and a server-only certificate
    /// cannot call a mutual-TLS listener (webpki's client verifier).
    #[test]
    fn rustls_enforces_the_ekus_on_both_sides() {
        use rustls::CertificateError;
        use rustls::client::WebPkiServerVerifier;
        use rustls::client::danger::ServerCertVerifier;
        use rustls::server::WebPkiClientVerifier;
        use rustls_pki_types::{ServerName, UnixTime};

        let ccf = CcfId::new("operator-a.test").unwrap();
        let ca = DomainCa::generate(&ccf).unwrap();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let roots = Arc::new(roots);
        let wrong_purpose = |e: rustls::Error| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::InvalidPurpose
                        | CertificateError::InvalidPurposeContext { .. }
                )
            )
        };

        let servers = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let serve = |role: Role| {
            let cred = ca
                .issue_with_new_key(
                    &PeerIdentity::new(ccf.clone(), role),
                    &["localhost".into()],
                    1,
                )
                .unwrap();
            servers.verify_server_cert(&der(&cred.cert_pem), &[], &name, &[], UnixTime::now())
        };
        assert!(serve(Role::Ccf).is_ok());
        let e = serve(Role::Operator).unwrap_err();
        assert!(wrong_purpose(e.clone()), "{e}");

        let clients = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .unwrap();
        let operator = ca
            .issue_with_new_key(&PeerIdentity::new(ccf.clone(), Role::Operator), &[], 1)
            .unwrap();
        assert!(
            clients
                .verify_client_cert(&der(&operator.cert_pem), &[], UnixTime::now())
                .is_ok()
        );
        // The CA issues no server-only role, so build one directly with its issuer.
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 1);
        let server_only = params
            .signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
            .unwrap();
        let e = clients
            .verify_client_cert(server_only.der(), &[], UnixTime::now())
            .unwrap_err();
        assert!(wrong_purpose(e.clone()), "{e}");
    }

    #[test]
    fn generated_ca_is_reloaded_from_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let ccf = CcfId::new("operator-a.test").unwrap();
        let a = DomainCa::load_or_generate(&ccf, dir.path(), None, None).unwrap();
        let b = DomainCa::load_or_generate(&ccf, dir.path(), None, None).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap();
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    /// A store's file: created 0600, never truncated when opened again (that would wipe the
    /// database), and an exposed one reported with its mode rather than changed.
    #[test]
    fn a_private_file_is_created_owner_only_kept_and_its_exposure_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut f = open_private_file(&path).unwrap();
        assert_eq!(exposed_mode(&f).unwrap(), None);
        f.write_all(b"rows").unwrap();
        drop(f);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let f = open_private_file(&path).unwrap();
        assert_eq!(exposed_mode(&f).unwrap(), Some(0o640));
        assert_eq!(fs::read(&path).unwrap(), b"rows");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }
}
