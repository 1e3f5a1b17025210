//! Real OpenSSL TLS-PSK handshakes between the AEF's server side and the invoker's client side:
//! TLS 1.3 (psk_dhe_ke) and TLS 1.2 (ECDHE-PSK) succeed with the right key; a wrong key, a stale
//! key id and an unknown identity are refused, each counted by reason on the listener's
//! `capif_tls_handshakes_total`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use aef_stub::keys::{HeldKey, InvokerRef, KeyStore};
use aef_stub::psk::{psk_incoming, server_context};
use capif_2e::identity::PskIdentity;
use capif_2e::psk::{TlsProfile, connect};
use ccf_core::ids::{ApiInvokerId, CcfId};
use ccf_core::kdf::AefPsk;
use ccf_core::limits::ConnGate;
use ccf_core::metrics::{ListenerMetrics, Registry, encode_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

fn identity(key_id: &str) -> PskIdentity {
    PskIdentity {
        home_ccf_id: CcfId::new("operator-b.test").unwrap(),
        api_invoker_id: ApiInvokerId::new("inv-1").unwrap(),
        key_id: key_id.into(),
    }
}

async fn server(profile: TlsProfile, key: &AefPsk) -> String {
    server_with(profile, key, ConnGate::new("psk", Default::default()))
        .await
        .0
}

/// A PSK endpoint holding `key` for inv-1 of operator-b.test, admitting through `gate`; its
/// address and its key store.
async fn server_with(
    profile: TlsProfile,
    key: &AefPsk,
    gate: Arc<ConnGate>,
) -> (String, Arc<KeyStore>) {
    let store = Arc::new(KeyStore::default());
    assert!(store.put(
        InvokerRef::new(
            CcfId::new("operator-b.test").unwrap(),
            ApiInvokerId::new("inv-1").unwrap(),
        ),
        HeldKey {
            psk: key.clone(),
            key_id: key.key_id(),
            expires_at: Instant::now() + Duration::from_secs(60),
            fetched_at: Instant::now(),
            last_refresh: None,
            allowed_apis: vec![],
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut incoming = psk_incoming(
        listener,
        server_context(store.clone(), profile).unwrap(),
        Arc::new(KeyStore::default()),
        gate,
    );
    tokio::spawn(async move {
        // Echo one message per accepted connection.
        while let Some(Ok(mut conn)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 5];
                if conn.read_exact(&mut buf).await.is_ok() {
                    let _ = conn.write_all(&buf).await;
                }
            });
        }
    });
    (addr, store)
}

async fn roundtrip(addr: &str, id: &PskIdentity, key: &AefPsk, p: TlsProfile) -> bool {
    match connect(addr, id, key, p).await {
        Ok(mut s) => {
            let _ = s.write_all(b"hello").await;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.is_ok() && &buf == b"hello"
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn right_key_works_and_everything_else_is_refused() {
    let key = AefPsk::from_slice(&[7u8; 32]).unwrap();
    let wrong = AefPsk::from_slice(&[8u8; 32]).unwrap();
    for p in [TlsProfile::Tls13, TlsProfile::Tls12] {
        let addr = server(p, &key).await;
        assert!(
            roundtrip(&addr, &identity(&key.key_id()), &key, p).await,
            "{p:?}: right key"
        );
        assert!(
            !roundtrip(&addr, &identity(&key.key_id()), &wrong, p).await,
            "{p:?}: wrong key accepted"
        );
        assert!(
            !roundtrip(&addr, &identity(&wrong.key_id()), &wrong, p).await,
            "{p:?}: stale key id accepted"
        );
        let mut stranger = identity(&key.key_id());
        stranger.api_invoker_id = ApiInvokerId::new("inv-2").unwrap();
        assert!(
            !roundtrip(&addr, &stranger, &key, p).await,
            "{p:?}: unknown identity accepted"
        );
        // The same invoker id and key id, but another home domain: another invoker.
        let mut other_home = identity(&key.key_id());
        other_home.home_ccf_id = CcfId::new("operator-c.test").unwrap();
        assert!(
            !roundtrip(&addr, &other_home, &key, p).await,
            "{p:?}: identity of another home accepted with this home's key"
        );
    }
}

/// Every handshake is counted once on the listener, a refusal with its reason.
#[tokio::test]
async fn handshakes_are_counted_by_reason() {
    let mut registry = Registry::default();
    let listeners = ListenerMetrics::register(&mut registry);
    let key = AefPsk::from_slice(&[7u8; 32]).unwrap();
    let wrong = AefPsk::from_slice(&[8u8; 32]).unwrap();
    let gate = ConnGate::observed("psk", Default::default(), &listeners);
    let (addr, store) = server_with(TlsProfile::Tls13, &key, gate).await;
    let p = TlsProfile::Tls13;
    assert!(roundtrip(&addr, &identity(&key.key_id()), &key, p).await);
    assert!(!roundtrip(&addr, &identity(&key.key_id()), &wrong, p).await);
    assert!(!roundtrip(&addr, &identity(&wrong.key_id()), &wrong, p).await);
    let mut stranger = identity(&key.key_id());
    stranger.api_invoker_id = ApiInvokerId::new("inv-2").unwrap();
    assert!(!roundtrip(&addr, &stranger, &key, p).await);
    store.revoke(&InvokerRef::new(
        CcfId::new("operator-b.test").unwrap(),
        ApiInvokerId::new("inv-1").unwrap(),
    ));
    assert!(!roundtrip(&addr, &identity(&key.key_id()), &key, p).await);
    let expected: Vec<String> = [
        "ok",
        "bad_psk",
        "stale_key_id",
        "unknown_psk_identity",
        "revoked",
    ]
    .iter()
    .map(|r| format!(r#"capif_tls_handshakes_total{{listener="psk",result="{r}"}} 1"#))
    .collect();
    // The server counts when its side of the handshake ends, which may be after the client's.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = encode_text(&registry);
        if expected.iter().all(|l| text.lines().any(|t| t == l)) {
            break;
        }
        assert!(Instant::now() < deadline, "{expected:?} not all in\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_binary_explains_itself() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aef-stub"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("TLS-PSK"));
}
