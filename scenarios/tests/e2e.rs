//! CAPIF-2e end to end (the AEF issue's acceptance): the invoker client onboards, obtains PSK,
//! authenticates at a real AEF stub and calls its demo API over a real TLS-PSK handshake — in its
//! own domain and across domains through the gateways. Refusals are checked at the handshake,
//! with the AEF's log reason.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::Ordering;
use std::time::Duration;

use capif_2e::psk::TlsProfile;
use capif_scenarios::invoker::{self, Profile};
use capif_testkit::federation::*;
use capif_testkit::logs;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

fn aef_addr(t: &Testbed, aef: &str) -> (String, String) {
    let owner = AEFS.iter().find(|(a, _)| *a == aef).unwrap().1;
    let d = t.d(owner);
    (d.aefs[aef].security_addr.to_string(), d.ca_pem())
}

/// The identity `aef`'s certificate names, as the invoker expects it.
fn aef_peer(t: &Testbed, aef: &str) -> ccf_core::tls::ExpectedPeer {
    let owner = AEFS.iter().find(|(a, _)| *a == aef).unwrap().1;
    t.d(owner).aef_peer(aef)
}

/// Authentication Initiation at aef-a1 with a stored key.
async fn auth_a1(
    t: &Testbed,
    p: &Profile,
    k: &invoker::ObtainedKey,
) -> capif_proto::v1::CheckAuthenticationRsp {
    let (addr, ca) = aef_addr(t, "aef-a1");
    invoker::auth(p, Some(k), &addr, &ca, "localhost", &aef_peer(t, "aef-a1"))
        .await
        .unwrap()
}

/// security -> auth -> PSK handshake -> API call; returns the call's result.
async fn flow(
    t: &Testbed,
    p: &Profile,
    aef: &str,
    api: &str,
) -> anyhow::Result<capif_proto::v1::InvokeResponse> {
    let k = invoker::security(p, aef, None).await?;
    let (addr, ca) = aef_addr(t, aef);
    let a = invoker::auth(p, Some(&k), &addr, &ca, "localhost", &aef_peer(t, aef)).await?;
    invoker::call(p, &k, &a.tls_endpoint, api, TlsProfile::Tls13).await
}

fn opts() -> Options {
    Options {
        with_aefs: true,
        ..Default::default()
    }
}

/// Single domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_domain_flow_succeeds() {
    let t = Testbed::start(opts()).await;
    let p = profile(&t, A, "c0").await;
    let r = flow(&t, &p, "aef-a1", "api-aef-a1")
        .await
        .expect("the API call succeeds");
    assert_eq!(r.api_invoker_id, p.id());
    assert_eq!(r.home_ccf_id, A);
    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["invoker.key", "keys/aef-a1.toml"] {
        let mode = std::fs::metadata(p.dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
}

/// Across two domains; the AEF's key came from CCF-B through the gateways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_domain_flow_succeeds_through_the_gateways() {
    let t = Testbed::start(opts()).await;
    let p = profile(&t, B, "c0").await;
    let r = flow(&t, &p, "aef-a1", "api-aef-a1")
        .await
        .expect("the cross-domain call succeeds");
    assert_eq!(r.home_ccf_id, B);
    assert_eq!(
        t.d(A)
            .gw()
            .state
            .cache
            .counters
            .misses
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        t.d(B).ccf().state.partner_requests.load(Ordering::Relaxed),
        1
    );
    // TLS 1.2 ECDHE-PSK works as an option too (the AEF stub is configured for 1.3 here, so a
    // 1.2-only client is refused: the profile is enforced).
    let k = p.key("aef-a1").unwrap();
    let a = auth_a1(&t, &p, &k).await;
    assert!(
        invoker::call(&p, &k, &a.tls_endpoint, "api-aef-a1", TlsProfile::Tls12)
            .await
            .is_err()
    );
}

/// Wrong key, unknown identity, expired key, revoked invoker, unauthorized API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_each_have_their_reason() {
    let logs = logs::capture().await;
    let t = Testbed::start(Options {
        validity_secs: 3,
        margin_ms: 200,
        ..opts()
    })
    .await;

    // Wrong key: right identity, a different key.
    let p = profile(&t, A, "c0").await;
    let k = invoker::security(&p, "aef-a1", None).await.unwrap();
    let a = auth_a1(&t, &p, &k).await;
    let mut bad = invoker::ObtainedKey {
        aef_id: k.aef_id.clone(),
        aef_psk_hex: "00".repeat(32),
        key_id: k.key_id.clone(),
        interface: k.interface.clone(),
        expires_at_ms: k.expires_at_ms,
    };
    assert!(
        invoker::call(&p, &bad, &a.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
            .await
            .is_err()
    );
    logs.wait_for(&["PSK handshake refused", "wrong key", p.id()])
        .await;

    // Unknown identity: a key the AEF was never told about (no Authentication Initiation).
    let q = profile(&t, A, "c1").await;
    let kq = invoker::security(&q, "aef-a1", None).await.unwrap();
    assert!(
        invoker::call(&q, &kq, &a.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
            .await
            .is_err()
    );
    logs.wait_for(&["PSK handshake refused", "unknown identity", q.id()])
        .await;

    // Unauthorized API: authorized for api-aef-a1 only, calls admin-aef-a1.
    let r = profile(&t, A, "c2").await;
    let kr = invoker::security(&r, "aef-a1", Some("api-aef-a1"))
        .await
        .unwrap();
    let ar = auth_a1(&t, &r, &kr).await;
    invoker::call(&r, &kr, &ar.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
        .await
        .expect("authorized API");
    let e = invoker::call(&r, &kr, &ar.tls_endpoint, "admin-aef-a1", TlsProfile::Tls13)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("PermissionDenied") && e.to_string().contains("API_NOT_AUTHORIZED"),
        "{e}"
    );

    // Revoked invoker: the CCF revokes (operator), the AEF drops the key and refuses it.
    let v = profile(&t, A, "c3").await;
    let kv = invoker::security(&v, "aef-a1", None).await.unwrap();
    let av = auth_a1(&t, &v, &kv).await;
    invoker::call(&v, &kv, &av.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
        .await
        .expect("before revocation");
    let op = t.d(A).issue(ccf_core::identity::Role::Operator);
    let ch = channel(
        t.d(A).ccf().capif_addr,
        &t.d(A).ca_pem(),
        Some((&op.cert_pem, &op.key_pem)),
        t.d(A).ccf_peer(),
    )
    .await;
    capif_proto::v1::security_client::SecurityClient::new(ch)
        .revoke_authorization(capif_proto::v1::RevokeAuthorizationRequest {
            revoke_info: Some(capif_proto::v1::SecurityNotification {
                api_invoker_id: v.id().into(),
                cause: capif_proto::v1::Cause::AuthorizationIssue as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    logs.wait_for(&["authorization revoked by the CCF", v.id()])
        .await;
    assert!(
        invoker::call(&v, &kv, &av.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
            .await
            .is_err()
    );
    logs.wait_for(&["PSK handshake refused", "revoked invoker", v.id()])
        .await;

    // Expired key: validity 3 s; the AEF's own timer runs out.
    let x = profile(&t, A, "c4").await;
    let kx = invoker::security(&x, "aef-a1", None).await.unwrap();
    let ax = auth_a1(&t, &x, &kx).await;
    tokio::time::sleep(Duration::from_millis(ax.remaining_validity_ms + 100)).await;
    assert!(
        invoker::call(&x, &kx, &ax.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
            .await
            .is_err()
    );
    logs.wait_for(&["PSK handshake refused", "expired key", x.id()])
        .await;
    bad.aef_psk_hex.clear();
}

/// The invoker re-authenticates at CCF-B (new TLS session, new AEFPSK) while A still
/// caches the old key: its next attempt succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauthentication_at_home_does_not_lock_the_invoker_out() {
    let t = Testbed::start(opts()).await;
    let p = profile(&t, B, "c0").await;
    let first = flow(&t, &p, "aef-a1", "api-aef-a1").await.unwrap();
    // New CAPIF-1e session: new key. A's gateway and AEF still hold the old one.
    let second = flow(&t, &p, "aef-a1", "api-aef-a1")
        .await
        .expect("the re-keyed invoker gets in");
    assert_ne!(first.key_id, second.key_id);
}
