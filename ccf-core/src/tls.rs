//! Mutual TLS for every gRPC link of the project (rustls, ring provider, TLS 1.3).
//!
//! Servers run their own tokio-rustls accept loop and hand finished streams to tonic
//! (`serve_with_incoming`), so that every request carries a [`ConnInfo`]: the peer's verified
//! identity and, for CAPIF-1e, the [`Capif1eBinding`] exported from that very TLS session (tonic's
//! built-in TLS gives handlers neither). Clients use [`connect`], a custom connector that records
//! the same binding on the invoker side. Every [`client_config`] names the server it expects
//! ([`ExpectedPeer`]), checked during the handshake by [`PeerServerVerifier`].
//! A listener whose trusted CAs depend on the client's certificate states only its
//! [`ClientCheck`]; [`CheckedClientVerifier`] is the rest of its verifier.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, server::Connected};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::UnixTime;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use crate::identity::{IdentityError, PeerIdentity, Role, URI_SCHEME};
use crate::ids::{AefId, CcfId};
use crate::kdf::Capif1eBinding;
use crate::limits::{Activity, ConnGate, ConnPermit, IdleTimer};
use crate::metrics::HandshakeOutcome;

/// Why TLS material could not be used. Each cause is its own variant, and the underlying error
/// is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM text could not be parsed.
    #[error("{what}: {source}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A client was given no address to connect to.
    #[error("no address to connect to")]
    NoAddress,
    /// A link names both one address and a list of replicas.
    #[error("give `address` (one server) or `addresses` (its replicas), not both")]
    AddressAndAddresses,
    /// A PEM text holds no certificate.
    #[error("{what}: no CERTIFICATE block")]
    NoCertificate {
        /// Which input.
        what: &'static str,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The server verifier of a client could not be built.
    #[error("server certificate verifier: {0}")]
    ServerVerifier(#[source] rustls::client::VerifierBuilderError),
    /// A server name is not a valid DNS name or IP address.
    #[error("{name:?} is not a valid TLS server name")]
    ServerName {
        /// The name given.
        name: String,
        /// Why it is not one.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The connection could not be made.
    #[error("cannot connect to {addr}: {}", crate::status::error_chain(.source))]
    Connect {
        /// Where.
        addr: String,
        /// The transport's error (its own sources say what failed).
        #[source]
        source: tonic::transport::Error,
    },
}

/// The one crypto provider of the workspace (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM text.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem {
        what: "private key",
        source,
    })
}

/// A root store of `certs`.
pub fn roots(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add(c.clone())?;
    }
    Ok(store)
}

/// Whether a server asks for client certificates.
pub enum ClientAuth<'a> {
    /// Mutual TLS: the client must present a certificate chaining to one of these roots.
    Required(&'a [CertificateDer<'static>]),
    /// A certificate chaining to these roots is verified when presented, but not required (an
    /// AEF's security service: invokers of any domain call it, its CCF calls it with a
    /// certificate).
    Optional(&'a [CertificateDer<'static>]),
    /// Server authentication only (onboarding).
    None,
    /// A verifier of the caller's own (an AEF's method-2 endpoint, whose trusted CAs depend on
    /// the invoker the certificate names).
    Custom(Arc<dyn rustls::server::danger::ClientCertVerifier>),
}

/// A TLS 1.3 server configuration with ALPN h2 for gRPC.
pub fn server_config(
    cert_chain_pem: &str,
    key_pem: &str,
    client_auth: ClientAuth<'_>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_auth {
        ClientAuth::Required(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(TlsError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::Optional(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(TlsError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Custom(v) => builder.with_client_cert_verifier(v),
    };
    let mut cfg = builder.with_single_cert(
        certs_from_pem("server certificate", cert_chain_pem)?,
        key_from_pem(key_pem)?,
    )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The server a client accepts at the other end of a link, by the `capif://` identity its
/// certificate names. A chain to the right CA and the right DNS name only say "some holder of a
/// certificate of that domain": every AEF, gateway and CCF certificate may serve, so the role is
/// what tells the own CCF from an AEF posing as it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedPeer {
    /// Exactly this identity: the own CCF or gateway, an AEF whose id the client knows.
    Exactly(PeerIdentity),
    /// Any AEF of this domain: an invoker that knows the AEF's domain but not its id.
    AnyAefOf(CcfId),
    /// The CCF of whichever domain the trusted CA vouches for. Only for onboarding, where the
    /// invoker learns its home domain from the answer; the caller must then compare the
    /// answer's domain with [`ClientSession::server_identity`].
    AnyCcf,
}

impl ExpectedPeer {
    /// The CCF of `ccf_id`.
    pub fn ccf(ccf_id: &CcfId) -> Self {
        Self::Exactly(PeerIdentity::new(ccf_id.clone(), Role::Ccf))
    }

    /// The gateway of `ccf_id`.
    pub fn gateway(ccf_id: &CcfId) -> Self {
        Self::Exactly(PeerIdentity::new(ccf_id.clone(), Role::Gateway))
    }

    /// The AEF `aef_id` of `ccf_id`.
    pub fn aef(ccf_id: &CcfId, aef_id: &AefId) -> Self {
        Self::Exactly(PeerIdentity::new(ccf_id.clone(), Role::Aef(aef_id.clone())))
    }

    /// Whether a verified certificate naming `presented` is the expected server.
    pub fn accepts(&self, presented: &PeerIdentity) -> bool {
        match self {
            Self::Exactly(id) => id == presented,
            Self::AnyAefOf(ccf_id) => {
                presented.ccf_id == *ccf_id && matches!(presented.role, Role::Aef(_))
            }
            Self::AnyCcf => presented.role == Role::Ccf,
        }
    }
}

/// `*` stands for "any": `capif://<domain>/aef/*`, `capif://*/ccf`.
impl std::fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exactly(id) => write!(f, "{id}"),
            Self::AnyAefOf(ccf_id) => write!(f, "{URI_SCHEME}{ccf_id}/aef/*"),
            Self::AnyCcf => write!(f, "{URI_SCHEME}*/ccf"),
        }
    }
}

/// Parses the [`Display`](std::fmt::Display) form, so that configs, flags and tests can name an
/// expectation as a URI.
impl std::str::FromStr for ExpectedPeer {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        if s == format!("{URI_SCHEME}*/ccf") {
            return Ok(Self::AnyCcf);
        }
        if let Some(domain) = s
            .strip_prefix(URI_SCHEME)
            .and_then(|r| r.strip_suffix("/aef/*"))
        {
            return CcfId::new(domain)
                .map(Self::AnyAefOf)
                .map_err(|e| IdentityError::BadUri {
                    uri: s.chars().take(200).collect(),
                    why: e.to_string(),
                });
        }
        PeerIdentity::parse_uri(s).map(Self::Exactly)
    }
}

/// Why a client refused a server whose chain verified: its certificate names another identity.
/// Says what was expected and what was presented (identities are public; no key material).
#[derive(Debug, thiserror::Error)]
pub enum ServerIdentityError {
    /// The certificate names another domain or role.
    #[error("the server's certificate names {presented}, expected {expected} (identity mismatch)")]
    Mismatch {
        /// What the client expected.
        expected: ExpectedPeer,
        /// What the certificate names.
        presented: PeerIdentity,
    },
    /// The certificate names no usable identity.
    #[error("the server's certificate names no identity (expected {expected}): {why}")]
    NoIdentity {
        /// What the client expected.
        expected: ExpectedPeer,
        /// Why the certificate names none.
        #[source]
        why: IdentityError,
    },
}

/// The server-certificate verifier of every [`client_config`] and of the gateway's partner
/// links: webpki first (chain to the configured CA, validity, the server-auth EKU, the DNS name),
/// then the `capif://` identity against an [`ExpectedPeer`]. Running inside the handshake means a
/// refused identity fails the connection before the client sends its certificate or any request.
#[derive(Debug)]
pub struct PeerServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: ExpectedPeer,
    name_is_locator: bool,
}

impl PeerServerVerifier {
    /// A verifier trusting `roots` and accepting only `expected`. An internal address is
    /// configured, not discovered, so a DNS name mismatch means a misconfiguration: fatal.
    pub fn new(roots: RootCertStore, expected: ExpectedPeer) -> Result<Self, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(TlsError::ServerVerifier)?;
        Ok(Self {
            inner,
            expected,
            name_is_locator: false,
        })
    }

    /// The same for a server found by DNS (a partner's gateway): the DNS name only located it
    /// and is not what is trusted, so a name mismatch alone is not fatal; chain and identity are.
    pub fn locating(roots: RootCertStore, expected: ExpectedPeer) -> Result<Self, TlsError> {
        Ok(Self {
            name_is_locator: true,
            ..Self::new(roots, expected)?
        })
    }

    /// The identity check alone, on a certificate whose chain is already verified.
    pub fn check_identity(&self, end_entity: &[u8]) -> Result<PeerIdentity, ServerIdentityError> {
        match PeerIdentity::from_certificate(end_entity) {
            Ok(id) if self.expected.accepts(&id) => Ok(id),
            Ok(presented) => Err(ServerIdentityError::Mismatch {
                expected: self.expected.clone(),
                presented,
            }),
            Err(why) => Err(ServerIdentityError::NoIdentity {
                expected: self.expected.clone(),
                why,
            }),
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if self.name_is_locator => {}
            Err(e) => return Err(e),
        }
        // `Other` keeps the typed error as the source; the alert is handshake_failure.
        self.check_identity(end_entity)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::Other(OtherError(Arc::new(e))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What a server checks of a presented client certificate chain, inside the handshake: the
/// one part of a client-certificate verifier that differs between listeners whose trusted CAs
/// depend on the certificate (the gateway's CAPIF-6e listener, the AEF's method-2 endpoint).
/// [`CheckedClientVerifier`] supplies the rest.
pub trait ClientCheck: std::fmt::Debug + Send + Sync {
    /// Accepts the chain or says why not. A refusal fails the handshake; `Other` keeps a typed
    /// error as its source.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error>;
}

/// The rustls client-certificate verifier around a [`ClientCheck`]: client authentication is
/// offered (mandatory or not), no CA names are hinted (the trusted set depends on the
/// certificate, and each client has one certificate to present anyway), and handshake
/// signatures are checked with [`provider`]'s algorithms.
#[derive(Debug)]
pub struct CheckedClientVerifier<C> {
    check: C,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl<C: ClientCheck> CheckedClientVerifier<C> {
    /// Every client must present a certificate that passes `check`.
    pub fn mandatory(check: C) -> Self {
        Self::with(check, true)
    }

    /// A client without a certificate passes the handshake (its calls must authenticate in
    /// another way); a presented certificate must pass `check`.
    pub fn optional(check: C) -> Self {
        Self::with(check, false)
    }

    fn with(check: C, mandatory: bool) -> Self {
        Self {
            check,
            mandatory,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl<C: ClientCheck> ClientCertVerifier for CheckedClientVerifier<C> {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
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
        self.check
            .check(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client configuration trusting `ca_pem`, presenting `identity` (cert PEM, key PEM)
/// when given, and accepting only a server whose certificate names `expected`
/// ([`PeerServerVerifier`]). There is no configuration without an expectation: every client
/// says which role it is calling.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    expected: ExpectedPeer,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier =
        PeerServerVerifier::new(roots(&certs_from_pem("CA certificate", ca_pem)?)?, expected)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            certs_from_pem("client certificate", cert)?,
            key_from_pem(key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The verified client certificate of a connection.
#[derive(Debug)]
pub struct PeerInfo {
    /// The identity the certificate names, or why it names none.
    pub identity: Result<PeerIdentity, IdentityError>,
    /// The end-entity certificate (DER).
    pub cert_der: CertificateDer<'static>,
}

/// What tonic attaches to every request of a connection accepted by [`tls_incoming`].
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    /// The TCP peer address.
    pub remote_addr: Option<SocketAddr>,
    /// The client certificate, when the client presented one (it was verified by rustls).
    pub peer: Option<Arc<PeerInfo>>,
    /// The CAPIF-1e binding of this TLS session (only when the server asked for it).
    pub binding: Option<Arc<Capif1eBinding>>,
    /// Request activity on this connection (for its idle timeout).
    pub activity: Activity,
    /// What a service concluded about the peer's certificate, and against which configuration:
    /// shared by every request of the connection (see [`VerifiedPeer`]).
    pub verified: VerifiedPeer,
}

/// A connection's memo of its peer's verification: the partner a service authenticated the
/// certificate as, with the generation of the configuration (e.g. the gateway's federation
/// snapshot) it was checked against and until when the certificate is valid. A service re-checks
/// the certificate only when the generation it sees now differs or the certificate has expired
/// since, so a reload still takes effect on the next request of an old connection while the
/// chain is not re-verified (webpki) on every request.
#[derive(Clone, Debug, Default)]
pub struct VerifiedPeer(Arc<parking_lot::Mutex<Option<Verified>>>);

/// One verification result kept by [`VerifiedPeer`].
#[derive(Clone, Debug)]
struct Verified {
    generation: u64,
    valid_until_unix_secs: u64,
    ccf_id: crate::ids::CcfId,
}

impl VerifiedPeer {
    /// The partner remembered for `generation`, if the memo is of that generation and the
    /// certificate is still within its validity at `now_unix_secs`.
    pub fn get(&self, generation: u64, now_unix_secs: u64) -> Option<crate::ids::CcfId> {
        let memo = self.0.lock();
        memo.as_ref()
            .filter(|v| v.generation == generation && now_unix_secs < v.valid_until_unix_secs)
            .map(|v| v.ccf_id.clone())
    }

    /// Remembers that the certificate authenticated as `ccf_id` under `generation`, valid until
    /// `valid_until_unix_secs` (the certificate's notAfter).
    pub fn set(&self, generation: u64, valid_until_unix_secs: u64, ccf_id: crate::ids::CcfId) {
        *self.0.lock() = Some(Verified {
            generation,
            valid_until_unix_secs,
            ccf_id,
        });
    }

    /// Forgets the result (a re-check refused the certificate).
    pub fn clear(&self) {
        *self.0.lock() = None;
    }
}

impl ConnInfo {
    /// Finds a request's connection activity (for [`crate::limits::serve_builder`]).
    pub fn activity_of(ext: &tonic::codegen::http::Extensions) -> Option<Activity> {
        ext.get::<ConnInfo>().map(|c| c.activity.clone())
    }
}

/// A server-side TLS stream carrying its [`ConnInfo`]: rustls's (the default), or OpenSSL's
/// for the TLS 1.2 CAPIF-1e listener ([`crate::tls12`]). Closes after the gate's idle timeout.
pub struct TlsConn<S = tokio_rustls::server::TlsStream<TcpStream>> {
    pub(crate) inner: S,
    pub(crate) info: ConnInfo,
    pub(crate) idle: IdleTimer,
    // Holds the connection's place at its listener until tonic drops the stream.
    pub(crate) _permit: ConnPermit,
}

impl<S> Connected for TlsConn<S> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsConn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.idle.poll_expired(cx) {
            return Poll::Ready(Err(self.idle.error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsConn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections that `gate` admits (over its caps they are closed at once), runs each
/// TLS handshake in its own task within the gate's handshake timeout (a slow client cannot stall
/// the others) and yields finished streams, which close after the gate's idle timeout. With
/// `export_binding`, the CAPIF-1e binding is exported from every session whose client presented
/// a certificate. Ends when the consumer is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    export_binding: bool,
    gate: Arc<ConnGate>,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshake_timeout = gate.limits().handshake_timeout();
    let idle_timeout = gate.limits().idle_timeout();
    tokio::spawn(async move {
        while let Some((tcp, remote, permit)) = next_admitted(&listener, &gate, &tx).await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => {
                        gate.handshake(HandshakeOutcome::Ok);
                        tls
                    }
                    Ok(Err(e)) => {
                        gate.handshake(HandshakeOutcome::of_io_error(&e));
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        gate.handshake(HandshakeOutcome::Timeout);
                        tracing::info!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let (_, conn) = tls.get_ref();
                let peer = conn.peer_certificates().and_then(|c| c.first()).map(|der| {
                    Arc::new(PeerInfo {
                        identity: PeerIdentity::from_certificate(der),
                        cert_der: der.clone().into_owned(),
                    })
                });
                let binding = if export_binding && peer.is_some() {
                    match Capif1eBinding::from_connection(conn) {
                        Ok(b) => Some(Arc::new(b)),
                        Err(e) => {
                            tracing::warn!(%remote, error = %e, "cannot export the CAPIF-1e binding");
                            None
                        }
                    }
                } else {
                    None
                };
                let activity = Activity::default();
                let info = ConnInfo {
                    remote_addr: Some(remote),
                    peer,
                    binding,
                    activity: activity.clone(),
                    verified: VerifiedPeer::default(),
                };
                let conn = TlsConn {
                    inner: tls,
                    info,
                    idle: IdleTimer::new(activity, idle_timeout),
                    _permit: permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The next connection `gate` admits on `listener` (over its caps, connections are closed at
/// once; accept errors back off), with no delay on its socket; `None` once the consumer of
/// `tx` is gone. Both accept loops (rustls here, OpenSSL in [`crate::tls12`]) start with it.
pub(crate) async fn next_admitted<T>(
    listener: &TcpListener,
    gate: &Arc<ConnGate>,
    tx: &tokio::sync::mpsc::Sender<T>,
) -> Option<(TcpStream, std::net::SocketAddr, ConnPermit)> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tx.closed() => return None,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = gate.admit(remote.ip()) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        return Some((tcp, remote, permit));
    }
}

/// What the client side learned from the latest TLS session of a channel.
#[derive(Clone, Debug, Default)]
pub struct ClientSession {
    /// The CAPIF-1e binding of the session (client side).
    pub binding: Option<Arc<Capif1eBinding>>,
    /// The identity named by the server's certificate, which the config's
    /// [`PeerServerVerifier`] already accepted for this session.
    pub server_identity: Option<PeerIdentity>,
}

/// Shared slot a [`connect`]ed channel updates after every handshake.
pub type SessionSlot = Arc<Mutex<ClientSession>>;

/// The stream a client connector hands to tonic.
type ClientIo =
    hyper_util::rt::TokioIo<crate::balance::Watched<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The endpoint, session slot and connector service shared by [`connect`] and [`connect_lazy`].
type Connector = (
    Endpoint,
    SessionSlot,
    tower::util::BoxCloneSyncService<tonic::transport::Uri, ClientIo, io::Error>,
);

fn tls_connector_service(
    addr: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> Result<Connector, TlsError> {
    tls_connector_watched(addr, server_name, config, None)
}

/// [`tls_connector_service`] whose connections report their end to `lost` (a replica of
/// [`connect_replicas`]).
fn tls_connector_watched(
    addr: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
    lost: Option<Arc<crate::balance::ConnectionLost>>,
) -> Result<Connector, TlsError> {
    let name =
        ServerName::try_from(server_name.to_string()).map_err(|source| TlsError::ServerName {
            name: server_name.to_string(),
            source,
        })?;
    let slot: SessionSlot = Arc::default();
    let connector = TlsConnector::from(config);
    let target = addr.to_string();
    let slot2 = slot.clone();
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).map_err(|source| TlsError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let svc = tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let name = name.clone();
        let target = target.clone();
        let slot = slot2.clone();
        let lost = lost.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let tls = connector.connect(name, tcp).await?;
            let (_, conn) = tls.get_ref();
            let session = ClientSession {
                binding: Capif1eBinding::from_connection(conn).ok().map(Arc::new),
                server_identity: conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| PeerIdentity::from_certificate(der).ok()),
            };
            if let Ok(mut s) = slot.lock() {
                *s = session;
            }
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(crate::balance::Watched::new(
                tls, lost,
            )))
        }
    });
    Ok((endpoint, slot, tower::util::BoxCloneSyncService::new(svc)))
}

/// Connects a gRPC channel over TLS to `addr` (`host:port`), verifying the server certificate
/// against `server_name` and against the identity `config` expects (see [`client_config`]). The
/// returned slot holds the session's binding and server identity.
pub async fn connect(
    addr: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<(Channel, SessionSlot), TlsError> {
    let (endpoint, slot, svc) = tls_connector_service(addr, server_name, config)?;
    let channel = endpoint
        .connect_timeout(connect_timeout)
        .connect_with_connector(svc)
        .await
        .map_err(|source| TlsError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    Ok((channel, slot))
}

/// Like [`connect`], but dials on first use and redials after failures: for long-lived links
/// between components that may start in any order.
pub fn connect_lazy(
    addr: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, _, svc) = tls_connector_service(addr, server_name, config)?;
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .connect_with_connector_lazy(svc))
}

/// The replicas a `[ccf]` / `[gateway]` section names: its `address`, or its `addresses` (one
/// `host:port` per replica of the service); exactly one of the two.
pub fn replica_addresses(address: &str, addresses: &[String]) -> Result<Vec<String>, TlsError> {
    match (address.is_empty(), addresses.is_empty()) {
        (false, true) => Ok(vec![address.to_string()]),
        (true, false) => Ok(addresses.to_vec()),
        (true, true) => Err(TlsError::NoAddress),
        (false, false) => Err(TlsError::AddressAndAddresses),
    }
}

/// A channel to a service that runs as several replicas (`addrs`, each `host:port`; at least
/// one): balanced over them with failover ([`crate::balance`]); a plain lazy channel for one
/// address. Each replica is verified like [`connect_lazy`]'s server.
pub fn connect_replicas(
    addrs: &[String],
    server_name: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<crate::telemetry::ClientChannel, TlsError> {
    if let [one] = addrs {
        return Ok(connect_lazy(one, server_name, config, connect_timeout)?.into());
    }
    if addrs.is_empty() {
        return Err(TlsError::NoAddress);
    }
    let mut replicas = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let lost = Arc::new(crate::balance::ConnectionLost::default());
        let (endpoint, _, svc) =
            tls_connector_watched(addr, server_name, config.clone(), Some(lost.clone()))?;
        let channel = endpoint
            .connect_timeout(connect_timeout)
            .connect_with_connector_lazy(svc);
        replicas.push(crate::balance::Replica::new(
            addr.clone(),
            channel,
            lost,
            connect_timeout,
        ));
    }
    Ok(crate::balance::balanced(replicas).into())
}

/// The client side: [`ExpectedPeer`] and [`PeerServerVerifier`].
#[cfg(test)]
mod client_tests {
    use super::*;
    use crate::pki::{DomainCa, IssuedCredential};

    const A: &str = "operator-a.test";
    const B: &str = "operator-b.test";

    fn id(uri: &str) -> PeerIdentity {
        PeerIdentity::parse_uri(uri).unwrap()
    }

    fn ca() -> DomainCa {
        DomainCa::generate(&CcfId::new(A).unwrap()).unwrap()
    }

    /// A certificate of `ca` for `localhost` naming `uri` (the CA signs any name it is given,
    /// so a wrong domain under the right CA can be tested too).
    fn cert(ca: &DomainCa, uri: &str) -> IssuedCredential {
        ca.issue_with_new_key(&id(uri), &["localhost".into()], 1)
            .unwrap()
    }

    fn der(c: &IssuedCredential) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()
    }

    fn verifier(ca: &DomainCa, expected: &str) -> PeerServerVerifier {
        PeerServerVerifier::new(
            roots(std::slice::from_ref(ca.cert_der())).unwrap(),
            expected.parse().unwrap(),
        )
        .unwrap()
    }

    fn verify(v: &PeerServerVerifier, c: &IssuedCredential, name: &str) -> Result<(), String> {
        v.verify_server_cert(
            &der(c),
            &[],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    #[test]
    fn expectations_print_and_parse_as_uris() {
        for uri in [
            "capif://operator-a.test/ccf",
            "capif://operator-a.test/aef/aef-1",
            "capif://operator-a.test/aef/*",
            "capif://*/ccf",
        ] {
            assert_eq!(uri.parse::<ExpectedPeer>().unwrap().to_string(), uri);
        }
        assert_eq!(
            "capif://operator-a.test/aef/*"
                .parse::<ExpectedPeer>()
                .unwrap(),
            ExpectedPeer::AnyAefOf(CcfId::new(A).unwrap())
        );
        for bad in [
            "capif://*/gateway",
            "capif://Bad/aef/*",
            "capif://a.test/king",
        ] {
            assert!(bad.parse::<ExpectedPeer>().is_err(), "{bad}");
        }
    }

    #[test]
    fn expectations_accept_only_their_role_and_domain() {
        let a = CcfId::new(A).unwrap();
        let exactly = ExpectedPeer::ccf(&a);
        assert!(exactly.accepts(&id("capif://operator-a.test/ccf")));
        for other in [
            "capif://operator-a.test/gateway",
            "capif://operator-a.test/aef/aef-1",
            "capif://operator-b.test/ccf",
        ] {
            assert!(!exactly.accepts(&id(other)), "{other}");
        }
        let aef = ExpectedPeer::aef(&a, &AefId::new("aef-1").unwrap());
        assert!(aef.accepts(&id("capif://operator-a.test/aef/aef-1")));
        assert!(!aef.accepts(&id("capif://operator-a.test/aef/aef-2")));
        let any_aef = ExpectedPeer::AnyAefOf(a.clone());
        assert!(any_aef.accepts(&id("capif://operator-a.test/aef/aef-2")));
        assert!(!any_aef.accepts(&id("capif://operator-b.test/aef/aef-2")));
        assert!(!any_aef.accepts(&id("capif://operator-a.test/gateway")));
        assert!(ExpectedPeer::AnyCcf.accepts(&id("capif://operator-b.test/ccf")));
        assert!(!ExpectedPeer::AnyCcf.accepts(&id("capif://operator-b.test/gateway")));
        assert_eq!(
            ExpectedPeer::gateway(&a),
            ExpectedPeer::Exactly(id("capif://operator-a.test/gateway"))
        );
    }

    /// The verifier accepts the right identity under the right CA and name, and refuses every
    /// other role or domain, although the chain and the DNS name verify. Webpki's own checks
    /// still run first.
    #[test]
    fn verifier_accepts_the_right_identity_and_refuses_wrong_role_or_domain() {
        let ca = ca();
        let ccf = cert(&ca, "capif://operator-a.test/ccf");
        let v = verifier(&ca, "capif://operator-a.test/ccf");
        assert_eq!(verify(&v, &ccf, "localhost"), Ok(()));
        for (uri, names) in [
            (
                "capif://operator-a.test/aef/aef-1",
                "capif://operator-a.test/aef/aef-1",
            ),
            (
                "capif://operator-a.test/gateway",
                "capif://operator-a.test/gateway",
            ),
            ("capif://operator-b.test/ccf", "capif://operator-b.test/ccf"),
        ] {
            let e = verify(&v, &cert(&ca, uri), "localhost").unwrap_err();
            assert!(
                e.contains(&format!(
                    "names {names}, expected capif://operator-a.test/ccf"
                )),
                "{uri}: {e}"
            );
        }

        let any_aef = verifier(&ca, "capif://operator-a.test/aef/*");
        assert_eq!(
            verify(
                &any_aef,
                &cert(&ca, "capif://operator-a.test/aef/aef-2"),
                "localhost"
            ),
            Ok(())
        );
        let e = verify(&any_aef, &ccf, "localhost").unwrap_err();
        assert!(e.contains("expected capif://operator-a.test/aef/*"), "{e}");
        let e = verify(
            &any_aef,
            &cert(&ca, "capif://operator-b.test/aef/aef-2"),
            "localhost",
        )
        .unwrap_err();
        assert!(e.contains("names capif://operator-b.test/aef/aef-2"), "{e}");

        // The right identity, but not the configured name or not the configured CA.
        let e = verify(&v, &ccf, "ccf.elsewhere.test").unwrap_err();
        assert!(e.contains("not valid for name"), "{e}");
        let other_ca = DomainCa::generate(&CcfId::new(B).unwrap()).unwrap();
        let e = verify(
            &v,
            &cert(&other_ca, "capif://operator-a.test/ccf"),
            "localhost",
        )
        .unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
    }

    /// Refused in the handshake, not after it: the server's accept fails too (it got an alert,
    /// no session exists), and the client's error says what was expected and what was presented.
    #[tokio::test]
    async fn a_wrong_identity_fails_the_handshake_on_both_sides() {
        let ca = ca();
        let aef = cert(&ca, "capif://operator-a.test/aef/aef-1");
        let client = cert(&ca, "capif://operator-a.test/gateway");
        let server = server_config(
            &aef.cert_pem,
            &aef.key_pem,
            ClientAuth::Required(std::slice::from_ref(ca.cert_der())),
        )
        .unwrap();
        let handshake = |expected: ExpectedPeer| {
            let cfg = client_config(
                ca.cert_pem(),
                Some((&client.cert_pem, &client.key_pem)),
                expected,
            )
            .unwrap();
            let server = server.clone();
            async move {
                let (c, s) = tokio::io::duplex(64 * 1024);
                let name = ServerName::try_from("localhost").unwrap();
                let (c, s) = tokio::join!(
                    TlsConnector::from(cfg).connect(name, c),
                    TlsAcceptor::from(server).accept(s)
                );
                (c.map(|_| ()), s.map(|_| ()))
            }
        };
        let a = CcfId::new(A).unwrap();
        let (c, s) = handshake(ExpectedPeer::ccf(&a)).await;
        let e = c.unwrap_err().to_string();
        assert!(
            e.contains(
                "the server's certificate names capif://operator-a.test/aef/aef-1, expected capif://operator-a.test/ccf"
            ),
            "{e}"
        );
        assert!(
            s.is_err(),
            "the server completed a handshake the client refused"
        );

        let (c, s) = handshake(ExpectedPeer::aef(&a, &AefId::new("aef-1").unwrap())).await;
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    }
}

/// [`CheckedClientVerifier`]: the flags each constructor sets, and the check's verdict.
#[cfg(test)]
mod checked_client_tests {
    use super::*;
    use crate::pki::DomainCa;

    /// Accepts only a gateway's certificate, as the CAPIF-6e listener's check would.
    #[derive(Debug)]
    struct GatewaysOnly;

    impl ClientCheck for GatewaysOnly {
        fn check(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: UnixTime,
        ) -> Result<(), rustls::Error> {
            match PeerIdentity::from_certificate(end_entity) {
                Ok(id) if id.role == Role::Gateway => Ok(()),
                _ => Err(rustls::Error::General("not a gateway".into())),
            }
        }
    }

    #[test]
    fn the_flags_are_as_built_and_the_check_decides() {
        let mandatory = CheckedClientVerifier::mandatory(GatewaysOnly);
        let optional = CheckedClientVerifier::optional(GatewaysOnly);
        assert!(mandatory.offer_client_auth() && mandatory.client_auth_mandatory());
        assert!(optional.offer_client_auth() && !optional.client_auth_mandatory());
        assert!(mandatory.root_hint_subjects().is_empty());
        assert_eq!(
            mandatory.supported_verify_schemes(),
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        );

        let a = CcfId::new("operator-a.test").unwrap();
        let ca = DomainCa::generate(&a).unwrap();
        let der = |role: Role| {
            let c = ca
                .issue_with_new_key(&PeerIdentity::new(a.clone(), role), &[], 1)
                .unwrap();
            CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()
        };
        let now = UnixTime::now();
        assert!(
            mandatory
                .verify_client_cert(&der(Role::Gateway), &[], now)
                .is_ok()
        );
        let refused = optional
            .verify_client_cert(&der(Role::Ccf), &[], now)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused, rustls::Error::General("not a gateway".into()));
    }
}

#[cfg(test)]
mod verified_peer_tests {
    use super::*;
    use crate::ids::CcfId;

    /// The memo answers only for the generation it was made under and only while the
    /// certificate is valid; every clone of a connection's `ConnInfo` shares it.
    #[test]
    fn the_memo_holds_for_its_generation_and_the_certificate_validity_only() {
        let info = ConnInfo::default();
        let a = CcfId::new("operator-a.test").unwrap();
        assert_eq!(info.verified.get(1, 100), None);
        info.clone().verified.set(1, 200, a.clone());
        assert_eq!(info.verified.get(1, 100), Some(a.clone()));
        // A reload (new generation) and an expired certificate both mean: verify again.
        assert_eq!(info.verified.get(2, 100), None);
        assert_eq!(info.verified.get(1, 200), None);
        info.verified.clear();
        assert_eq!(info.verified.get(1, 100), None);
    }
}
