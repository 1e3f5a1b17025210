//! The AEF's TLS-PSK endpoint on CAPIF-2e (OpenSSL; the profiles and the invoker's side are in
//! `capif_2e::psk`).
//!
//! Server side: [`psk_incoming`] accepts connections, looks the identity up in the
//! [`KeyStore`] from the PSK callback, and yields streams that carry the authenticated peer to
//! tonic. In TLS 1.3 OpenSSL does not report the identity after the handshake, so the callback
//! keeps it in the connection's ex_data; the same note says, when a handshake fails, whether the
//! identity was unknown, stale, expired, or the key itself was wrong.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_openssl::SslStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::keys::{ConnTicket, HeldKey, KeyStore, Refusal};
pub use capif_2e::identity::PskIdentity;
pub use capif_2e::psk::{TlsProfile, profile};
use ccf_core::limits::{Activity, ConnGate, ConnPermit, IdleTimer};
use ccf_core::metrics::HandshakeOutcome;
use ccf_core::telemetry::HandshakeTrace;
use tracing::Instrument as _;
use tracing::field::Empty;

/// What the server callback noted about a connection's PSK.
#[derive(Clone, Debug)]
enum Note {
    /// A key was offered for this identity; a failed handshake then means a wrong key.
    Offered(PskIdentity),
    /// The identity was refused, and why.
    Refused(HandshakeRefusal),
}

/// Why a PSK handshake was refused (what the log says; never key bytes).
#[derive(Clone, Debug, thiserror::Error)]
pub enum HandshakeRefusal {
    /// The client offered no PSK identity.
    #[error("no PSK identity offered")]
    NoIdentity,
    /// The identity is not of the PSK identity format.
    #[error(transparent)]
    Malformed(#[from] capif_2e::identity::IdentityError),
    /// The key store refused the identity.
    #[error("{why}: {identity}")]
    Refused {
        /// The identity offered.
        identity: PskIdentity,
        /// Why.
        why: Refusal,
    },
    /// OpenSSL's PSK buffer cannot hold the key.
    #[error("PSK buffer too small: {0}")]
    BufferTooSmall(PskIdentity),
    /// The client's key differs from the one held for its identity.
    #[error("wrong key for {identity} (the PSK did not verify: {tls})")]
    WrongKey {
        /// The identity offered.
        identity: PskIdentity,
        /// OpenSSL's words.
        tls: String,
    },
    /// The handshake took longer than the listener allows.
    #[error("handshake timed out")]
    TimedOut,
    /// The handshake ended without a PSK (the client insisted on something else).
    #[error("handshake finished without a PSK (refused)")]
    NoPsk,
    /// The handshake failed before a PSK was chosen (and how, for the metrics).
    #[error("handshake failed before a PSK was chosen: {0}")]
    Tls(String, HandshakeOutcome),
    /// OpenSSL could not set the connection up.
    #[error("cannot set up TLS: {0}")]
    Setup(#[from] openssl::error::ErrorStack),
}

impl HandshakeRefusal {
    /// The refusal as a `capif_tls_handshakes_total` result.
    pub fn outcome(&self) -> HandshakeOutcome {
        use crate::keys::Refusal as R;
        match self {
            Self::NoIdentity | Self::Malformed(_) => HandshakeOutcome::UnknownPskIdentity,
            Self::Refused { why, .. } => match why {
                R::UnknownIdentity | R::NoCertificateInfo => HandshakeOutcome::UnknownPskIdentity,
                R::StaleKeyId => HandshakeOutcome::StalePskKey,
                R::Expired => HandshakeOutcome::ExpiredPskKey,
                R::Revoked => HandshakeOutcome::RevokedInvoker,
            },
            Self::WrongKey { .. } => HandshakeOutcome::BadPsk,
            Self::TimedOut => HandshakeOutcome::Timeout,
            Self::BufferTooSmall(_) | Self::NoPsk => HandshakeOutcome::Protocol,
            Self::Tls(_, kind) => *kind,
            Self::Setup(_) => HandshakeOutcome::Io,
        }
    }

    /// The refusal's stable name (the handshake span's `capif.reason`; docs/OPERATIONS.md).
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeRefusal::NoIdentity => "NO_IDENTITY",
            HandshakeRefusal::Malformed(_) => "MALFORMED_IDENTITY",
            HandshakeRefusal::Refused { why, .. } => match why {
                Refusal::UnknownIdentity | Refusal::NoCertificateInfo => "UNKNOWN_IDENTITY",
                Refusal::StaleKeyId => "STALE_KEY_ID",
                Refusal::Expired => "KEY_EXPIRED",
                Refusal::Revoked => "REVOKED",
            },
            HandshakeRefusal::BufferTooSmall(_) | HandshakeRefusal::Setup(_) => "INTERNAL_FAULT",
            HandshakeRefusal::WrongKey { .. } => "WRONG_KEY",
            HandshakeRefusal::TimedOut => "HANDSHAKE_TIMEOUT",
            HandshakeRefusal::NoPsk => "NO_PSK",
            HandshakeRefusal::Tls(..) => "TLS_FAILURE",
        }
    }
}

/// How an OpenSSL handshake failed, before any PSK was chosen: the connection went away, the
/// client sent an alert, or the messages did not fit (versions, ciphers, malformed).
fn tls_failure(e: &openssl::ssl::Error) -> HandshakeOutcome {
    use openssl::ssl::ErrorCode;
    if e.io_error().is_some() || matches!(e.code(), ErrorCode::SYSCALL | ErrorCode::ZERO_RETURN) {
        return HandshakeOutcome::Io;
    }
    let alert = e.ssl_error().is_some_and(|stack| {
        stack
            .errors()
            .iter()
            .any(|x| x.reason().is_some_and(|r| r.contains("alert")))
    });
    if alert {
        HandshakeOutcome::PeerAlert
    } else {
        HandshakeOutcome::Protocol
    }
}

fn note_index() -> Index<Ssl, Note> {
    static IDX: OnceLock<Index<Ssl, Note>> = OnceLock::new();
    *IDX.get_or_init(|| {
        Ssl::new_ex_index().unwrap_or_else(|e| panic!("OpenSSL ex_data index: {e}"))
    })
}

/// The server context: looks identities up in `store`.
pub fn server_context(
    store: Arc<KeyStore>,
    p: TlsProfile,
) -> Result<SslContext, openssl::error::ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server())?;
    profile(&mut b, p)?;
    let idx = note_index();
    b.set_psk_server_callback(move |ssl, identity, psk_out| {
        let note = match psk_for_identity(&store, identity, psk_out.len()) {
            Ok((id, key)) => {
                let k = key.psk.expose();
                psk_out[..k.len()].copy_from_slice(k);
                ssl.set_ex_data(idx, Note::Offered(id));
                return Ok(k.len());
            }
            Err(why) => Note::Refused(why),
        };
        ssl.set_ex_data(idx, note);
        Ok(0)
    });
    Ok(b.build())
}

/// The PSK server callback's decision, apart from OpenSSL: the identity bytes a client offered
/// (`None`: none) and the room OpenSSL gives for the key, to the key to use or why there is
/// none. It only reads the store: a refusal changes nothing (the property tests hold it to that).
pub(crate) fn psk_for_identity(
    store: &KeyStore,
    identity: Option<&[u8]>,
    room: usize,
) -> Result<(PskIdentity, HeldKey), HandshakeRefusal> {
    let id = PskIdentity::parse(identity.ok_or(HandshakeRefusal::NoIdentity)?)?;
    match store.for_handshake(&id.invoker_ref(), &id.key_id) {
        Ok(key) if room >= key.psk.expose().len() => Ok((id, key)),
        Ok(_) => Err(HandshakeRefusal::BufferTooSmall(id)),
        Err(why) => Err(HandshakeRefusal::Refused { identity: id, why }),
    }
}

/// The authenticated peer of a PSK connection, attached to every request on it.
#[derive(Clone, Debug)]
pub struct PskPeer {
    /// The identity the client used (its key was accepted).
    pub identity: PskIdentity,
    /// Where it connected from.
    pub remote: SocketAddr,
    /// Request activity on the connection (for its idle timeout).
    pub activity: Activity,
    /// The handshake's span, which the connection's calls link to.
    pub handshake: HandshakeTrace,
}

impl PskPeer {
    /// Finds a request's connection activity (for [`ccf_core::limits::serve_builder`]).
    pub fn activity_of(ext: &tonic::codegen::http::Extensions) -> Option<Activity> {
        ext.get::<PskPeer>().map(|p| p.activity.clone())
    }
}

/// A server-side PSK TLS stream carrying its [`PskPeer`]. It owns the one file descriptor of the
/// connection; its place at the listener and in the key store are released when it is dropped.
pub struct PskConn {
    inner: SslStream<TcpStream>,
    peer: PskPeer,
    idle: IdleTimer,
    ticket: ConnTicket,
    _permit: ConnPermit,
}

impl PskConn {
    fn revoked_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the invoker's authorization was revoked",
        )
    }
}

impl Connected for PskConn {
    type ConnectInfo = PskPeer;
    fn connect_info(&self) -> PskPeer {
        self.peer.clone()
    }
}

impl AsyncRead for PskConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ticket.control.poll_closed(cx).is_ready() {
            return Poll::Ready(Err(Self::revoked_error()));
        }
        if self.idle.poll_expired(cx) {
            return Poll::Ready(Err(self.idle.error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PskConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.ticket.control.poll_closed(cx).is_ready() {
            return Poll::Ready(Err(Self::revoked_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn accept_one(
    tcp: TcpStream,
    ctx: &SslContext,
    store: &Arc<KeyStore>,
    handshake_timeout: Duration,
) -> Result<(SslStream<TcpStream>, PskIdentity, ConnTicket), HandshakeRefusal> {
    let ssl = Ssl::new(ctx)?;
    let mut stream = SslStream::new(ssl, tcp)?;
    let result = tokio::time::timeout(handshake_timeout, Pin::new(&mut stream).accept()).await;
    let note = stream.ssl().ex_data(note_index()).cloned();
    let failure = match result {
        Err(_) => Some(HandshakeRefusal::TimedOut),
        Ok(Err(e)) => Some(HandshakeRefusal::Tls(e.to_string(), tls_failure(&e))),
        Ok(Ok(())) => None,
    };
    match (failure, note) {
        (None, Some(Note::Offered(identity))) => {
            // Registered only once the key was accepted: a revocation closes it from now on.
            let ticket = store.track(&identity.invoker_ref());
            Ok((stream, identity, ticket))
        }
        (None, _) => Err(HandshakeRefusal::NoPsk),
        (Some(HandshakeRefusal::Tls(tls, _)), Some(Note::Offered(identity))) => {
            Err(HandshakeRefusal::WrongKey { identity, tls })
        }
        (Some(_), Some(Note::Refused(why))) => Err(why),
        (Some(e), _) => Err(e),
    }
}

/// Accepts PSK TLS connections that `gate` admits; yields those whose handshake succeeded within
/// the gate's handshake timeout. Each pending handshake holds one file descriptor and its place at
/// the gate; an accepted connection closes after the gate's idle timeout, when its invoker is
/// revoked, or when tonic drops it. Refusals are logged with their reason (never key bytes). Ends
/// when the consumer is dropped.
pub fn psk_incoming(
    listener: TcpListener,
    ctx: SslContext,
    store: Arc<KeyStore>,
    gate: Arc<ConnGate>,
) -> ReceiverStream<Result<PskConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshake_timeout = gate.limits().handshake_timeout();
    let idle_timeout = gate.limits().idle_timeout();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Some(permit) = gate.admit(remote.ip()) else {
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (ctx, store, tx, gate) = (ctx.clone(), store.clone(), tx.clone(), gate.clone());
            // No request has arrived yet, so no caller's trace: the handshake is a trace of its
            // own, which the connection's calls link to.
            let span = tracing::info_span!(
                parent: None,
                "capif.psk_handshake",
                otel.kind = "server",
                otel.status_code = Empty,
                client.address = %remote.ip(),
                capif.outcome = Empty,
                capif.reason = Empty,
            );
            let handshake = HandshakeTrace::of(&span);
            tokio::spawn(
                async move {
                    match accept_one(tcp, &ctx, &store, handshake_timeout).await {
                        Ok((inner, identity, ticket)) => {
                            gate.handshake(HandshakeOutcome::Ok);
                            tracing::Span::current().record("capif.outcome", "accepted");
                            tracing::info!(%remote, %identity, "PSK handshake accepted");
                            let activity = Activity::default();
                            let conn = PskConn {
                                inner,
                                peer: PskPeer {
                                    identity,
                                    remote,
                                    activity: activity.clone(),
                                    handshake,
                                },
                                idle: IdleTimer::new(activity, idle_timeout),
                                ticket,
                                _permit: permit,
                            };
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Err(why) => {
                            gate.handshake(why.outcome());
                            let span = tracing::Span::current();
                            span.record("capif.outcome", "refused");
                            span.record("capif.reason", why.reason());
                            span.record("otel.status_code", "error");
                            tracing::warn!(%remote, reason = %why, "PSK handshake refused");
                        }
                    }
                }
                .instrument(span),
            );
        }
    });
    ReceiverStream::new(rx)
}
