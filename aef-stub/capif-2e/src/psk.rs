//! TLS with an external PSK on CAPIF-2e, as both ends run it (OpenSSL through
//! `openssl`/`tokio-openssl`: rustls has no external-PSK support): the profiles, and the invoker's
//! side of the handshake. TLS 1.3 with psk_dhe_ke and TLS_AES_128_GCM_SHA256 by default (the
//! OpenSSL PSK callbacks cannot do SHA-384 suites); TLS 1.2 ECDHE-PSK-CHACHA20-POLY1305 as an
//! option (OpenSSL 3 has no ECDHE-PSK-AES-GCM suite). The AEF's server side is in `aef-stub`,
//! and sets its contexts up with the same [`profile`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ccf_core::kdf::AefPsk;
use openssl::ssl::{Ssl, SslContextBuilder, SslMethod, SslVerifyMode, SslVersion};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;
use tracing::Instrument as _;
use zeroize::Zeroizing;

use crate::identity::PskIdentity;

/// TLS version and suite of the PSK endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Default)]
pub enum TlsProfile {
    /// TLS 1.3, TLS_AES_128_GCM_SHA256, psk_dhe_ke (X25519).
    #[default]
    #[serde(rename = "tls13")]
    Tls13,
    /// TLS 1.2, ECDHE-PSK-CHACHA20-POLY1305.
    #[serde(rename = "tls12")]
    Tls12,
}

impl std::str::FromStr for TlsProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tls13" => Ok(Self::Tls13),
            "tls12" => Ok(Self::Tls12),
            _ => Err(format!("{s:?} is not tls13 or tls12")),
        }
    }
}

/// How long the client side of a PSK handshake may take (a server has its own `limits`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn profile(b: &mut SslContextBuilder, p: TlsProfile) -> Result<(), openssl::error::ErrorStack> {
    match p {
        TlsProfile::Tls13 => {
            b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
            b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
            b.set_ciphersuites("TLS_AES_128_GCM_SHA256")?;
        }
        TlsProfile::Tls12 => {
            b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
            b.set_max_proto_version(Some(SslVersion::TLS1_2))?;
            b.set_cipher_list("ECDHE-PSK-CHACHA20-POLY1305")?;
        }
    }
    b.set_verify(SslVerifyMode::NONE);
    Ok(())
}

/// Why a client handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP.
    #[error("cannot reach the AEF's PSK endpoint {addr}: {source}")]
    Tcp {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// OpenSSL setup or handshake.
    #[error("TLS-PSK handshake with {addr} failed: {why}")]
    Handshake {
        /// Where.
        addr: String,
        /// Why.
        why: String,
    },
}

/// Client side: a PSK TLS connection to `addr` with `identity` and `psk`, in a client span
/// `capif.psk_handshake` of the current trace (its `capif.outcome`: `accepted` or `refused`).
pub async fn connect(
    addr: &str,
    identity: &PskIdentity,
    psk: &AefPsk,
    p: TlsProfile,
) -> Result<SslStream<TcpStream>, ConnectError> {
    let span = tracing::info_span!(
        "capif.psk_handshake",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        server.address = addr,
        tls.profile = ?p,
        capif.outcome = tracing::field::Empty,
    );
    let r = handshake(addr, identity, psk, p)
        .instrument(span.clone())
        .await;
    span.record(
        "capif.outcome",
        if r.is_ok() { "accepted" } else { "refused" },
    );
    if r.is_err() {
        span.record("otel.status_code", "error");
    }
    r
}

async fn handshake(
    addr: &str,
    identity: &PskIdentity,
    psk: &AefPsk,
    p: TlsProfile,
) -> Result<SslStream<TcpStream>, ConnectError> {
    let hs = |why: String| ConnectError::Handshake {
        addr: addr.to_string(),
        why,
    };
    let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(|e| hs(e.to_string()))?;
    profile(&mut b, p).map_err(|e| hs(e.to_string()))?;
    let id = identity.to_string().into_bytes();
    let key = Zeroizing::new(*psk.expose());
    b.set_psk_client_callback(move |_ssl, _hint, id_out, psk_out| {
        if id.len() + 1 > id_out.len() || key.len() > psk_out.len() {
            return Ok(0);
        }
        id_out[..id.len()].copy_from_slice(&id);
        id_out[id.len()] = 0;
        psk_out[..key.len()].copy_from_slice(&key[..]);
        Ok(key.len())
    });
    let ctx = b.build();
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnectError::Tcp {
            addr: addr.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let ssl = Ssl::new(&ctx).map_err(|e| hs(e.to_string()))?;
    let mut stream = SslStream::new(ssl, tcp).map_err(|e| hs(e.to_string()))?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, Pin::new(&mut stream).connect())
        .await
        .map_err(|_| hs("timed out".into()))?
        .map_err(|e| hs(e.to_string()))?;
    Ok(stream)
}

/// A gRPC channel to the AEF's demo API over one PSK TLS connection.
pub async fn demo_channel(
    addr: &str,
    identity: &PskIdentity,
    psk: &AefPsk,
    p: TlsProfile,
) -> Result<tonic::transport::Channel, ConnectError> {
    let stream = connect(addr, identity, psk, p).await?;
    let slot = Arc::new(std::sync::Mutex::new(Some(stream)));
    tonic::transport::Endpoint::from_static("http://aef.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().ok().and_then(|mut s| s.take());
            async move {
                s.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the PSK connection was closed; authenticate again",
                    )
                })
            }
        }))
        .await
        .map_err(|e| ConnectError::Handshake {
            addr: addr.to_string(),
            why: ccf_core::grpc::error_chain(&e),
        })
}
