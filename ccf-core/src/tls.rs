//! Mutual TLS for every gRPC link of the project (rustls, ring provider, TLS 1.3).
//!
//! Servers run their own tokio-rustls accept loop and hand finished streams to tonic
//! (`serve_with_incoming`), so that every request carries a [`ConnInfo`]: the peer's verified
//! identity and, for CAPIF-1e, the [`Capif1eBinding`] exported from that very TLS session (tonic's
//! built-in TLS gives handlers neither). Clients use [`connect`], a custom connector that records
//! the same binding on the invoker side.

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

use crate::identity::{IdentityError, PeerIdentity};
use crate::kdf::Capif1eBinding;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM text holds no usable certificate or key.
    #[error("{what}: {why}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    /// A server name is not a valid DNS name or IP address.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// The connection could not be made.
    #[error("cannot connect to {addr}: {why}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        why: String,
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
        .map_err(|e| TlsError::Pem {
            what,
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            why: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "private key",
        why: e.to_string(),
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
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::Optional(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
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

/// A TLS 1.3 client configuration trusting `ca_pem`, presenting `identity` (cert PEM, key PEM)
/// when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&certs_from_pem("CA certificate", ca_pem)?)?);
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
}

/// A server-side TLS stream carrying its [`ConnInfo`].
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
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

/// Accepts TCP connections, runs each TLS handshake in its own task (a slow client cannot stall
/// the others) and yields finished streams. With `export_binding`, the CAPIF-1e binding is exported
/// from every session whose client presented a certificate. Ends when the consumer is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    export_binding: bool,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
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
                let info = ConnInfo {
                    remote_addr: Some(remote),
                    peer,
                    binding,
                };
                let _ = tx.send(Ok(TlsConn { inner: tls, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// What the client side learned from the latest TLS session of a channel.
#[derive(Clone, Debug, Default)]
pub struct ClientSession {
    /// The CAPIF-1e binding of the session (client side).
    pub binding: Option<Arc<Capif1eBinding>>,
    /// The identity named by the server's certificate.
    pub server_identity: Option<PeerIdentity>,
}

/// Shared slot a [`connect`]ed channel updates after every handshake.
pub type SessionSlot = Arc<Mutex<ClientSession>>;

/// The stream a client connector hands to tonic.
type ClientIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

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
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let slot: SessionSlot = Arc::default();
    let connector = TlsConnector::from(config);
    let target = addr.to_string();
    let slot2 = slot.clone();
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).map_err(|e| TlsError::Connect {
            addr: addr.to_string(),
            why: e.to_string(),
        })?;
    let svc = tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let name = name.clone();
        let target = target.clone();
        let slot = slot2.clone();
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
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok((endpoint, slot, tower::util::BoxCloneSyncService::new(svc)))
}

/// Connects a gRPC channel over TLS to `addr` (`host:port`), verifying the server certificate
/// against `server_name`. The returned slot holds the session's binding and server identity.
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
        .map_err(|e| TlsError::Connect {
            addr: addr.to_string(),
            why: crate::grpc::error_chain(&e),
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
