//! CAPIF-1e under the `tls12-annex-a` profile: TLS 1.2 over OpenSSL, so that the AEFPSK is
//! derived exactly as TS 33.122 A.1 writes it, from the master secret and the session ID of the
//! full handshake (rustls exposes neither; OpenSSL's `SSL_SESSION_get_master_key` and
//! `SSL_SESSION_get_id` do). docs/PROTOCOL.md 4.3.2 is the profile; this module is both its ends.
//!
//! The server side mirrors `tls::tls_incoming`: admitted by a [`ConnGate`], the handshake bounded
//! by the gate's timeout, idle connections closed, and the same [`ConnInfo`] (the verified
//! `capif://` identity, the [`Capif1eBinding`], request activity) on every request, so the
//! services cannot tell which profile ran. The client side ([`connect`]) is the invoker's, with
//! the server's identity checked inside the handshake as `tls::PeerServerVerifier` does.
//!
//! What makes the key the one A.1 means: TLS 1.2 only, mutual authentication against the domain
//! CA, ECDHE with AES-GCM, no tickets, no renegotiation, and no resumption (the server keeps no
//! session to resume). A session that was resumed anyway, or has an empty session ID, yields no
//! key and is refused ([`annex_a_binding`]).

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use openssl::ssl::SslContext;

use openssl::error::ErrorStack;
use openssl::pkey::PKey;
use openssl::ssl::{
    AlpnError, ErrorCode, Ssl, SslContextBuilder, SslMethod, SslOptions, SslRef,
    SslSessionCacheMode, SslVerifyMode, SslVersion, select_next_proto,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509CheckFlags;
use openssl::x509::{X509, X509VerifyResult};
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio_openssl::SslStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use crate::identity::PeerIdentity;
use crate::kdf::Capif1eBinding;
use crate::limits::{Activity, ConnGate, IdleTimer, serve_builder};
use crate::metrics::HandshakeOutcome;
use crate::tls::{ClientSession, ConnInfo, ExpectedPeer, PeerInfo, SessionSlot};

/// The cipher suites: ECDHE key exchange with AES-GCM (RFC 5289), ECDSA certificates first (the
/// domain CAs issue P-256 keys), RSA for certificates of other CAs.
pub const CIPHER_LIST: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
                               ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384";

/// The session ID context of the CAPIF-1e listener. OpenSSL insists on one when it verifies
/// client certificates and may cache sessions; nothing is ever resumed under it.
const SESSION_ID_CONTEXT: &[u8] = b"capif-1e-tls12-annex-a";

/// ALPN: gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"\x02h2";

/// Why the TLS 1.2 CAPIF-1e material or connection could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Tls12Error {
    /// OpenSSL refused a setting or a PEM input.
    #[error("{what}: {source}")]
    OpenSsl {
        /// What was being set up.
        what: &'static str,
        /// OpenSSL's errors.
        #[source]
        source: ErrorStack,
    },
    /// A PEM text holds no certificate.
    #[error("{what}: no CERTIFICATE block")]
    NoCertificate {
        /// Which input.
        what: &'static str,
    },
    /// The connection could not be made (TCP, the TLS 1.2 handshake, or the session's key).
    #[error("cannot connect to {addr} (CAPIF-1e, TLS 1.2): {}", crate::status::error_chain(.source))]
    Connect {
        /// Where.
        addr: String,
        /// The transport's error (its own sources say what failed).
        #[source]
        source: tonic::transport::Error,
    },
}

fn ossl(what: &'static str) -> impl FnOnce(ErrorStack) -> Tls12Error {
    move |source| Tls12Error::OpenSsl { what, source }
}

/// Why a finished TLS session yields no Annex A key. Each is a refusal of the connection, not a
/// fallback to another key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnexARefusal {
    /// The session was resumed: its master secret and session ID belong to an earlier handshake.
    #[error("the TLS session was resumed; TS 33.122 A.1 keys only the session of a full handshake")]
    Resumed,
    /// Another protocol version than TLS 1.2 was negotiated.
    #[error("the TLS session is {0}, not TLS 1.2")]
    NotTls12(String),
    /// The server sent an empty session ID (it did so for a ticket, or keeps no sessions).
    #[error("the full handshake has an empty session ID, which cannot be P1")]
    EmptySessionId,
    /// No session, or no master secret in it.
    #[error("the TLS session has no master secret")]
    NoMasterSecret,
}

/// The `tls12-annex-a` binding of a finished handshake, on either side: the master secret and
/// the session ID of the session, as OpenSSL holds them (with RFC 7627 the master secret is the
/// extended one; both ends hold the same). Refuses what A.1 cannot key ([`AnnexARefusal`]).
pub fn annex_a_binding(ssl: &SslRef) -> Result<Capif1eBinding, AnnexARefusal> {
    if ssl.session_reused() {
        return Err(AnnexARefusal::Resumed);
    }
    if ssl.version2() != Some(SslVersion::TLS1_2) {
        return Err(AnnexARefusal::NotTls12(ssl.version_str().to_string()));
    }
    let session = ssl.session().ok_or(AnnexARefusal::NoMasterSecret)?;
    if session.id().is_empty() {
        return Err(AnnexARefusal::EmptySessionId);
    }
    // 48 octets in TLS 1.2 (RFC 5246 8.1); OpenSSL's buffer is as large as any it holds.
    let mut master = Zeroizing::new([0u8; 256]);
    let len = session.master_key(&mut master[..]);
    if len == 0 || len > master.len() {
        return Err(AnnexARefusal::NoMasterSecret);
    }
    Ok(Capif1eBinding::annex_a(&master[..len], session.id()))
}

/// The settings both ends share: TLS 1.2 only, ECDHE with AES-GCM, no tickets, no
/// renegotiation, no compression, key logging when `SSLKEYLOGFILE` is set.
fn profile(b: &mut SslContextBuilder) -> Result<(), Tls12Error> {
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .and_then(|()| b.set_max_proto_version(Some(SslVersion::TLS1_2)))
        .map_err(ossl("TLS 1.2 only"))?;
    b.set_cipher_list(CIPHER_LIST)
        .map_err(ossl("ECDHE AES-GCM cipher suites"))?;
    b.set_options(
        SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION | SslOptions::NO_COMPRESSION,
    );
    crate::keylog::openssl(b);
    Ok(())
}

/// Loads a certificate chain (leaf first) and its private key into `b`, and trusts `ca_pem` (and
/// nothing else) for the peer's certificate.
fn credentials(
    b: &mut SslContextBuilder,
    chain_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Vec<X509>, Tls12Error> {
    let mut chain = X509::stack_from_pem(chain_pem.as_bytes())
        .map_err(ossl("certificate chain"))?
        .into_iter();
    let leaf = chain.next().ok_or(Tls12Error::NoCertificate {
        what: "certificate chain",
    })?;
    b.set_certificate(&leaf).map_err(ossl("certificate"))?;
    for c in chain {
        b.add_extra_chain_cert(c)
            .map_err(ossl("certificate chain"))?;
    }
    let key = PKey::private_key_from_pem(key_pem.as_bytes()).map_err(ossl("private key"))?;
    b.set_private_key(&key).map_err(ossl("private key"))?;
    b.check_private_key()
        .map_err(ossl("the private key does not match the certificate"))?;
    let cas = X509::stack_from_pem(ca_pem.as_bytes()).map_err(ossl("CA certificate"))?;
    if cas.is_empty() {
        return Err(Tls12Error::NoCertificate {
            what: "CA certificate",
        });
    }
    let mut store = X509StoreBuilder::new().map_err(ossl("trust store"))?;
    for ca in &cas {
        store.add_cert(ca.clone()).map_err(ossl("CA certificate"))?;
    }
    b.set_cert_store(store.build());
    Ok(cas)
}

/// The CCF's CAPIF-1e listener context: its certificate chain and key, client certificates
/// required and verified against the domain CA `ca_pem`, a session ID in every ServerHello and
/// no session ever resumed.
pub fn server_context(
    chain_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<SslContext, Tls12Error> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ossl("TLS context"))?;
    profile(&mut b)?;
    for ca in credentials(&mut b, chain_pem, key_pem, ca_pem)? {
        b.add_client_ca(&ca).map_err(ossl("client CA list"))?;
    }
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    b.set_session_id_context(SESSION_ID_CONTEXT)
        .map_err(ossl("session ID context"))?;
    // OpenSSL sends an empty session ID unless the server-side cache is on (statem_srvr.c), and
    // A.1 needs one: the cache is on, but nothing is stored in it or looked up, so every
    // ClientHello that offers an earlier session gets a full handshake and a new ID.
    b.set_session_cache_mode(SslSessionCacheMode::SERVER | SslSessionCacheMode::NO_INTERNAL);
    b.set_alpn_select_callback(|_, offered| {
        select_next_proto(ALPN_H2, offered).ok_or(AlpnError::NOACK)
    });
    Ok(b.build())
}

/// A CAPIF-1e connection accepted by [`incoming`], carrying its [`ConnInfo`].
pub type Tls12Conn = crate::tls::TlsConn<SslStream<TcpStream>>;

/// How a failed OpenSSL server handshake counts in the listener's metrics.
fn outcome_of(ssl: &SslRef, e: &openssl::ssl::Error) -> HandshakeOutcome {
    if matches!(e.code(), ErrorCode::SYSCALL | ErrorCode::ZERO_RETURN) {
        return HandshakeOutcome::Io;
    }
    if ssl.verify_result() != X509VerifyResult::OK {
        return HandshakeOutcome::BadCertificate;
    }
    let text = e.to_string();
    if text.contains("did not return a certificate") {
        HandshakeOutcome::NoCertificate
    } else if text.contains("alert") {
        HandshakeOutcome::PeerAlert
    } else {
        HandshakeOutcome::Protocol
    }
}

/// One handshake: the stream and its `ConnInfo` parts, or why it was refused.
async fn accept_one(
    tcp: TcpStream,
    ctx: &SslContext,
    timeout: Duration,
) -> Result<(SslStream<TcpStream>, Option<Arc<PeerInfo>>, Capif1eBinding), (HandshakeOutcome, String)>
{
    let setup = |e: ErrorStack| (HandshakeOutcome::Protocol, e.to_string());
    let ssl = Ssl::new(ctx).map_err(setup)?;
    let mut stream = SslStream::new(ssl, tcp).map_err(setup)?;
    match tokio::time::timeout(timeout, Pin::new(&mut stream).accept()).await {
        Err(_) => return Err((HandshakeOutcome::Timeout, "handshake timed out".into())),
        Ok(Err(e)) => return Err((outcome_of(stream.ssl(), &e), e.to_string())),
        Ok(Ok(())) => {}
    }
    let binding = annex_a_binding(stream.ssl())
        .map_err(|why| (HandshakeOutcome::Protocol, why.to_string()))?;
    let peer = stream
        .ssl()
        .peer_certificate()
        .and_then(|c| c.to_der().ok())
        .map(|der| {
            Arc::new(PeerInfo {
                identity: PeerIdentity::from_certificate(&der),
                cert_der: CertificateDer::from(der),
            })
        });
    Ok((stream, peer, binding))
}

/// Accepts TCP connections that `gate` admits, runs each TLS 1.2 handshake in its own task within
/// the gate's handshake timeout, refuses sessions that yield no Annex A key, and yields finished
/// streams, which close after the gate's idle timeout. Ends when the consumer is dropped.
pub fn incoming(
    listener: TcpListener,
    ctx: SslContext,
    gate: Arc<ConnGate>,
) -> ReceiverStream<Result<Tls12Conn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshake_timeout = gate.limits().handshake_timeout();
    let idle_timeout = gate.limits().idle_timeout();
    tokio::spawn(async move {
        while let Some((tcp, remote, permit)) =
            crate::tls::next_admitted(&listener, &gate, &tx).await
        {
            let (ctx, tx, gate) = (ctx.clone(), tx.clone(), gate.clone());
            tokio::spawn(async move {
                let (inner, peer, binding) = match accept_one(tcp, &ctx, handshake_timeout).await {
                    Ok(done) => done,
                    Err((outcome, why)) => {
                        gate.handshake(outcome);
                        tracing::info!(%remote, error = %why, "CAPIF-1e TLS 1.2 handshake refused");
                        return;
                    }
                };
                gate.handshake(HandshakeOutcome::Ok);
                let activity = Activity::default();
                let conn = Tls12Conn {
                    inner,
                    info: ConnInfo {
                        remote_addr: Some(remote),
                        peer,
                        binding: Some(Arc::new(binding)),
                        activity: activity.clone(),
                        verified: Default::default(),
                    },
                    idle: IdleTimer::new(activity, idle_timeout),
                    _permit: permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves `routes` on `listener` over the TLS 1.2 CAPIF-1e profile until `shutdown` completes,
/// within the limits of `gate`: `grpc::spawn_server` for this listener.
pub fn spawn_server(
    listener: TcpListener,
    ctx: SslContext,
    routes: Routes,
    gate: Arc<ConnGate>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let mut builder = serve_builder(gate.limits(), ConnInfo::activity_of);
    let incoming = incoming(listener, ctx, gate);
    tokio::spawn(
        builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown),
    )
}

/// The invoker's side: a context presenting the invoker's certificate, trusting its home CA
/// only, and accepting only a server whose certificate names `expected`.
pub struct ClientContext {
    ctx: SslContext,
    // Why the verify callback refused the server's identity, for the connection's error.
    refusal: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for ClientContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientContext(tls12-annex-a)")
    }
}

/// The client context of the `tls12-annex-a` profile (see [`ClientContext`]).
pub fn client_context(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    expected: ExpectedPeer,
) -> Result<ClientContext, Tls12Error> {
    let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(ossl("TLS context"))?;
    profile(&mut b)?;
    credentials(&mut b, cert_pem, key_pem, ca_pem)?;
    b.set_alpn_protos(ALPN_H2).map_err(ossl("ALPN"))?;
    let refusal: Arc<Mutex<Option<String>>> = Arc::default();
    let noted = refusal.clone();
    // After OpenSSL's own checks of each certificate (chain, validity, name), the leaf's
    // `capif://` identity: refused inside the handshake, before the client sends its certificate.
    b.set_verify_callback(SslVerifyMode::PEER, move |preverified, chain| {
        if !preverified || chain.error_depth() != 0 {
            return preverified;
        }
        let identity = chain
            .current_cert()
            .and_then(|c| c.to_der().ok())
            .map(|der| PeerIdentity::from_certificate(&der));
        let why = match identity {
            Some(Ok(id)) if expected.accepts(&id) => return true,
            Some(Ok(id)) => format!(
                "the server's certificate names {id}, expected {expected} (identity mismatch)"
            ),
            Some(Err(e)) => {
                format!("the server's certificate names no identity (expected {expected}): {e}")
            }
            None => format!("the server presented no certificate (expected {expected})"),
        };
        if let Ok(mut r) = noted.lock() {
            *r = Some(why);
        }
        false
    });
    Ok(ClientContext {
        ctx: b.build(),
        refusal,
    })
}

/// One client handshake on a new TCP connection; the session's binding and server identity go
/// into `slot`. Every connection is a full handshake: the context keeps no session to offer.
async fn connect_one(
    target: &str,
    server_name: &str,
    ctx: &SslContext,
    refusal: &Mutex<Option<String>>,
    slot: &SessionSlot,
) -> io::Result<SslStream<TcpStream>> {
    let tcp = TcpStream::connect(target).await?;
    let _ = tcp.set_nodelay(true);
    let mut ssl = Ssl::new(ctx).map_err(io::Error::other)?;
    let param = ssl.param_mut();
    param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
    match server_name.parse::<IpAddr>() {
        Ok(ip) => param.set_ip(ip).map_err(io::Error::other)?,
        Err(_) => {
            param.set_host(server_name).map_err(io::Error::other)?;
            ssl.set_hostname(server_name).map_err(io::Error::other)?;
        }
    }
    let mut stream = SslStream::new(ssl, tcp).map_err(io::Error::other)?;
    if let Err(e) = Pin::new(&mut stream).connect().await {
        let identity = refusal.lock().ok().and_then(|mut r| r.take());
        return Err(io::Error::other(match identity {
            Some(why) => why,
            None => format!("TLS 1.2 handshake failed: {e}"),
        }));
    }
    let binding = annex_a_binding(stream.ssl()).map_err(io::Error::other)?;
    let server_identity = stream
        .ssl()
        .peer_certificate()
        .and_then(|c| c.to_der().ok())
        .and_then(|der| PeerIdentity::from_certificate(&der).ok());
    if let Ok(mut s) = slot.lock() {
        *s = ClientSession {
            binding: Some(Arc::new(binding)),
            server_identity,
        };
    }
    Ok(stream)
}

/// Connects a gRPC channel to the CAPIF-1e listener at `addr` over TLS 1.2, verifying the
/// server's certificate against `server_name` (DNS name or IP address) and the identity the
/// context expects. The returned slot holds the session's Annex A binding and server identity
/// (as `tls::connect`'s does for TLS 1.3).
pub async fn connect(
    addr: &str,
    server_name: &str,
    client: &ClientContext,
    connect_timeout: Duration,
) -> Result<(Channel, SessionSlot), Tls12Error> {
    let slot: SessionSlot = Arc::default();
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).map_err(|source| Tls12Error::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let (ctx, refusal, slot2) = (client.ctx.clone(), client.refusal.clone(), slot.clone());
    let (target, name) = (addr.to_string(), server_name.to_string());
    let svc = tower::service_fn(move |_uri| {
        let (ctx, refusal, slot) = (ctx.clone(), refusal.clone(), slot2.clone());
        let (target, name) = (target.clone(), name.clone());
        async move {
            let stream = connect_one(&target, &name, &ctx, &refusal, &slot).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = endpoint
        .connect_timeout(connect_timeout)
        .connect_with_connector(svc)
        .await
        .map_err(|source| Tls12Error::Connect {
            addr: addr.to_string(),
            source,
        })?;
    Ok((channel, slot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;
    use crate::ids::{ApiInvokerId, CcfId};
    use crate::pki::{DomainCa, IssuedCredential};
    use tokio::io::DuplexStream;

    const A: &str = "operator-a.test";

    struct Pki {
        ca: DomainCa,
        ccf: IssuedCredential,
        invoker: IssuedCredential,
    }

    fn pki() -> Pki {
        let a = CcfId::new(A).unwrap();
        let ca = DomainCa::generate(&a).unwrap();
        let issue = |role| {
            ca.issue_with_new_key(
                &PeerIdentity::new(a.clone(), role),
                &["localhost".into()],
                1,
            )
            .unwrap()
        };
        let ccf = issue(Role::Ccf);
        let invoker = issue(Role::Invoker(ApiInvokerId::new("inv-1").unwrap()));
        Pki { ca, ccf, invoker }
    }

    fn server(p: &Pki) -> SslContext {
        server_context(&p.ccf.cert_pem, &p.ccf.key_pem, p.ca.cert_pem()).unwrap()
    }

    fn client(p: &Pki, expected: ExpectedPeer) -> ClientContext {
        client_context(
            p.ca.cert_pem(),
            &p.invoker.cert_pem,
            &p.invoker.key_pem,
            expected,
        )
        .unwrap()
    }

    fn ccf_of_a() -> ExpectedPeer {
        ExpectedPeer::ccf(&CcfId::new(A).unwrap())
    }

    type Ends = (
        Result<SslStream<DuplexStream>, String>,
        Result<SslStream<DuplexStream>, String>,
    );

    /// One handshake over an in-memory pipe; `offer` is a session the client offers to resume.
    async fn handshake(
        server: &SslContext,
        client: &SslContext,
        offer: Option<&openssl::ssl::SslSessionRef>,
    ) -> Ends {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let mut ssl = Ssl::new(client).unwrap();
        if let Some(session) = offer {
            // SAFETY: every offered session comes from an earlier connection of this same
            // client context, as SSL_set_session requires.
            #[allow(unsafe_code)]
            unsafe {
                ssl.set_session(session).unwrap();
            }
        }
        let mut c = SslStream::new(ssl, c).unwrap();
        let mut s = SslStream::new(Ssl::new(server).unwrap(), s).unwrap();
        let (cr, sr) = tokio::join!(Pin::new(&mut c).connect(), Pin::new(&mut s).accept());
        (
            cr.map(|()| c).map_err(|e| e.to_string()),
            sr.map(|()| s).map_err(|e| e.to_string()),
        )
    }

    const P0: &str = "aef-weather.operator-a.test:8443/weather";

    #[tokio::test]
    async fn both_ends_key_the_same_aefpsk_from_a_full_handshake() {
        let p = pki();
        let (c, s) = handshake(&server(&p), &client(&p, ccf_of_a()).ctx, None).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(s.ssl().version_str(), "TLSv1.2");
        let cipher = s.ssl().current_cipher().unwrap().name();
        assert!(
            cipher.starts_with("ECDHE-ECDSA-AES") && cipher.ends_with("GCM-SHA256")
                || cipher.ends_with("GCM-SHA384"),
            "{cipher}"
        );
        assert_eq!(
            s.ssl().extms_support(),
            Some(true),
            "OpenSSL negotiates RFC 7627 by default"
        );
        let (cb, sb) = (
            annex_a_binding(c.ssl()).unwrap(),
            annex_a_binding(s.ssl()).unwrap(),
        );
        assert_eq!(sb.profile(), crate::kdf::Capif1eProfile::Tls12AnnexA);
        assert_eq!(
            sb.session_id().len(),
            32,
            "OpenSSL's TLS 1.2 session IDs are 32 octets"
        );
        assert_eq!(cb.session_id(), sb.session_id());
        assert_eq!(
            cb.aefpsk(P0).unwrap().expose(),
            sb.aefpsk(P0).unwrap().expose()
        );
        // The server saw the invoker's certificate, and its identity.
        let der = s.ssl().peer_certificate().unwrap().to_der().unwrap();
        assert_eq!(
            PeerIdentity::from_certificate(&der).unwrap().to_string(),
            "capif://operator-a.test/invoker/inv-1"
        );
    }

    /// A client offering its earlier session gets a full handshake: a new session ID and another
    /// key. The same client against a server that issues tickets (the profile without
    /// `NO_TICKET`) does resume, so the test would see a ticket doing it; and such a resumed
    /// session yields no key on either end.
    #[tokio::test]
    async fn an_offered_session_or_ticket_is_never_resumed_and_a_resumed_one_is_not_keyed() {
        let p = pki();
        // A client that would resume if it could: it keeps sessions and accepts tickets.
        let mut b = SslContextBuilder::new(SslMethod::tls_client()).unwrap();
        b.set_min_proto_version(Some(SslVersion::TLS1_2)).unwrap();
        b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
        b.set_cipher_list(CIPHER_LIST).unwrap();
        credentials(
            &mut b,
            &p.invoker.cert_pem,
            &p.invoker.key_pem,
            p.ca.cert_pem(),
        )
        .unwrap();
        b.set_verify(SslVerifyMode::PEER);
        let eager = b.build();

        let real = server(&p);
        let (c1, s1) = handshake(&real, &eager, None).await;
        let (c1, s1) = (c1.unwrap(), s1.unwrap());
        let first = c1.ssl().session().unwrap().to_owned();
        let (c2, s2) = handshake(&real, &eager, Some(&first)).await;
        let (c2, s2) = (c2.unwrap(), s2.unwrap());
        assert!(!c2.ssl().session_reused() && !s2.ssl().session_reused());
        let (k1, k2) = (
            annex_a_binding(s1.ssl()).unwrap(),
            annex_a_binding(s2.ssl()).unwrap(),
        );
        assert_ne!(k1.session_id(), k2.session_id());
        assert_ne!(k1.aefpsk(P0).unwrap(), k2.aefpsk(P0).unwrap());

        // The same settings but tickets allowed: the ticket resumes, and is refused a key.
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).unwrap();
        profile(&mut b).unwrap();
        credentials(&mut b, &p.ccf.cert_pem, &p.ccf.key_pem, p.ca.cert_pem()).unwrap();
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        b.set_session_id_context(SESSION_ID_CONTEXT).unwrap();
        b.clear_options(SslOptions::NO_TICKET);
        let ticketing = b.build();
        // Each first connection stays open: OpenSSL marks a session not resumable when its
        // connection is freed without a close_notify, and the client would not offer it.
        let (c3, _s3) = handshake(&ticketing, &eager, None).await;
        let c3 = c3.unwrap();
        let ticketed = c3.ssl().session().unwrap().to_owned();
        let (c4, s4) = handshake(&ticketing, &eager, Some(&ticketed)).await;
        let (c4, s4) = (c4.unwrap(), s4.unwrap());
        assert!(
            s4.ssl().session_reused(),
            "the control server did not resume"
        );
        assert_eq!(
            annex_a_binding(s4.ssl()).unwrap_err(),
            AnnexARefusal::Resumed
        );
        assert_eq!(
            annex_a_binding(c4.ssl()).unwrap_err(),
            AnnexARefusal::Resumed
        );
    }

    #[tokio::test]
    async fn a_server_naming_another_identity_fails_the_handshake_with_both_names() {
        let p = pki();
        let other = ExpectedPeer::ccf(&CcfId::new("operator-b.test").unwrap());
        let c = client(&p, other);
        let (cr, sr) = handshake(&server(&p), &c.ctx, None).await;
        assert!(cr.is_err() && sr.is_err(), "the handshake completed");
        let why = c.refusal.lock().unwrap().take().unwrap();
        assert_eq!(
            why,
            "the server's certificate names capif://operator-a.test/ccf, expected \
             capif://operator-b.test/ccf (identity mismatch)"
        );
    }

    #[tokio::test]
    async fn tls13_and_certificate_less_clients_are_refused() {
        let p = pki();
        let mut b = SslContextBuilder::new(SslMethod::tls_client()).unwrap();
        b.set_min_proto_version(Some(SslVersion::TLS1_3)).unwrap();
        credentials(
            &mut b,
            &p.invoker.cert_pem,
            &p.invoker.key_pem,
            p.ca.cert_pem(),
        )
        .unwrap();
        let (cr, sr) = handshake(&server(&p), &b.build(), None).await;
        assert!(cr.is_err(), "a TLS 1.3 client completed the handshake");
        assert!(sr.unwrap_err().contains("unsupported protocol"));

        let mut b = SslContextBuilder::new(SslMethod::tls_client()).unwrap();
        b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
        let (_, sr) = handshake(&server(&p), &b.build(), None).await;
        let e = sr.unwrap_err();
        assert!(e.contains("did not return a certificate"), "{e}");
    }
}
