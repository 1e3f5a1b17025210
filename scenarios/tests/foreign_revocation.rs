//! A domain revoking an invoker of ANOTHER domain at its own AEFs: CCF-A's operator calls
//! `RevokeAuthorization` naming the invoker's home (B). The invoker is refused at A's AEFs — its
//! open key dropped, a new handshake and a new Authentication Initiation refused — gateway-A
//! holds nothing for it, and it still works at B's AEFs: nothing was revoked at its home.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use capif_2e::psk::TlsProfile;
use capif_proto::v1::{self as pb, security_client::SecurityClient};
use capif_scenarios::invoker::{self, Profile};
use capif_testkit::federation::*;
use capif_testkit::logs;
use ccf_core::identity::Role;
use tonic::Code;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

fn aef_addr(t: &Testbed, aef: &str) -> (String, String, ccf_core::tls::ExpectedPeer) {
    let owner = AEFS.iter().find(|(a, _)| *a == aef).unwrap().1;
    let d = t.d(owner);
    (
        d.aefs[aef].security_addr.to_string(),
        d.ca_pem(),
        d.aef_peer(aef),
    )
}

/// security -> auth -> PSK handshake -> API call at `aef`.
async fn flow(t: &Testbed, p: &Profile, aef: &str) -> anyhow::Result<pb::InvokeResponse> {
    let k = invoker::security(p, aef, None).await?;
    let (addr, ca, peer) = aef_addr(t, aef);
    let a = invoker::auth(p, Some(&k), &addr, &ca, "localhost", &peer).await?;
    invoker::call(
        p,
        &k,
        &a.tls_endpoint,
        &format!("api-{aef}"),
        TlsProfile::Tls13,
    )
    .await
}

/// A's operator, on A's CCF.
async fn operator_a(t: &Testbed) -> SecurityClient<tonic::transport::Channel> {
    let op = t.d(A).issue(Role::Operator);
    let ch = channel(
        t.d(A).ccf().capif_addr,
        &t.d(A).ca_pem(),
        Some((&op.cert_pem, &op.key_pem)),
        t.d(A).ccf_peer(),
    )
    .await;
    SecurityClient::new(ch)
}

fn revoke(invoker: &str, home: &str, aef: &str) -> pb::RevokeAuthorizationRequest {
    pb::RevokeAuthorizationRequest {
        revoke_info: Some(pb::SecurityNotification {
            api_invoker_id: invoker.into(),
            aef_id: aef.into(),
            home_ccf_id: home.into(),
            cause: pb::Cause::AuthorizationIssue as i32,
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_revokes_a_foreign_invoker_at_its_own_aefs_only() {
    let logs = logs::capture().await;
    let t = Testbed::start(Options {
        with_aefs: true,
        ..Default::default()
    })
    .await;
    let p = profile(&t, B, "c0").await;
    let k = invoker::security(&p, "aef-a1", None).await.unwrap();
    let (addr, ca, peer) = aef_addr(&t, "aef-a1");
    let a = invoker::auth(&p, Some(&k), &addr, &ca, "localhost", &peer)
        .await
        .unwrap();
    invoker::call(&p, &k, &a.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
        .await
        .expect("B's invoker works at A before the revocation");
    flow(&t, &p, "aef-b1")
        .await
        .expect("and at home before the revocation");
    assert_eq!(t.d(A).gw().state.cache.key_entries(), 1);

    let mut op = operator_a(&t).await;
    // An AEF of another domain cannot be revoked here; nothing is recorded.
    let e = op
        .revoke_authorization(revoke(p.id(), B, "aef-b1"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "AEF_NOT_FOUND"),
        "{e:?}"
    );
    assert!(
        e.message().contains("not an AEF of operator-a.test"),
        "{e:?}"
    );
    invoker::call(&p, &k, &a.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
        .await
        .expect("a refused revocation changes nothing");

    let r = op
        .revoke_authorization(revoke(p.id(), B, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.security_contexts_removed, 0, "nothing is stored at A");
    let own_aefs: Vec<String> = AEFS
        .iter()
        .filter(|(_, owner)| *owner == A)
        .map(|(a, _)| a.to_string())
        .collect();
    assert_eq!(r.aefs_refused, own_aefs);
    // Gateway-A was told before the RPC answered.
    assert_eq!(t.d(A).gw().state.cache.key_entries(), 0);

    // The AEF dropped the key: the next handshake with it is refused.
    logs.wait_for(&["authorization revoked by the CCF", p.id()])
        .await;
    assert!(
        invoker::call(&p, &k, &a.tls_endpoint, "api-aef-a1", TlsProfile::Tls13)
            .await
            .is_err()
    );
    logs.wait_for(&["PSK handshake refused", "revoked invoker", p.id()])
        .await;
    // A fresh key from home does not get it back in at A: CCF-A refuses to look it up.
    let e = flow(&t, &p, "aef-a1").await.unwrap_err();
    assert!(format!("{e:#}").contains("REVOKED_AT_THIS_DOMAIN"), "{e:#}");
    // At home nothing changed.
    let r = flow(&t, &p, "aef-b1")
        .await
        .expect("the invoker still works at its home's AEF");
    assert_eq!(r.home_ccf_id, B);
    // Other invokers of B are not affected at A.
    let q = profile(&t, B, "c1").await;
    flow(&t, &q, "aef-a1")
        .await
        .expect("another invoker of B still works at A");
}
