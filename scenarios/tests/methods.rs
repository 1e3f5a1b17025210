//! Security methods 2 (TLS with certificates) and 3 (OAuth 2.0 access tokens), end to end with
//! the real CCF, gateways and AEF stub, in one domain and across two: the invoker's call
//! succeeds, and each forbidden case is refused with its own reason in the AEF's log.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use capif_2e::psk::TlsProfile;
use capif_proto::v1::{self as pb, SecurityMethod};
use capif_scenarios::invoker::{self, AefTarget, Profile};
use capif_testkit::federation::*;
use capif_testkit::logs;
use ccf_core::clock::now_ms;
use ccf_core::identity::Role;
use ccf_core::ids::{ApiInvokerId, CcfId};
use ccf_core::pki::DomainCa;
use ccf_core::token::{AccessTokenClaims, Expected, KnownCaller, TokenKeys, refusal_check, verify};

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

fn aef_a1(t: &Testbed) -> (String, String) {
    (
        t.d(A).aefs["aef-a1"].security_addr.to_string(),
        t.d(A).ca_pem(),
    )
}

/// A method-2 call of `api-aef-a1` at aef-a1's TLS endpoint with `p`'s certificate, presenting
/// `as_invoker`.
async fn pki_call(
    t: &Testbed,
    p: &Profile,
    as_invoker: &str,
    endpoint: &str,
) -> anyhow::Result<pb::InvokeResponse> {
    let (_, ca) = aef_a1(t);
    let peer = t.d(A).aef_peer("aef-a1");
    invoker::call_pki(
        p,
        as_invoker,
        endpoint,
        &ca,
        "localhost",
        "api-aef-a1",
        &peer,
    )
    .await
}

/// Authentication Initiation for PKI at aef-a1: the TLS endpoint to dial.
async fn pki_endpoint(t: &Testbed, p: &Profile) -> String {
    let (addr, ca) = aef_a1(t);
    let peer = t.d(A).aef_peer("aef-a1");
    invoker::auth_method(p, SecurityMethod::Pki, "", &addr, &ca, "localhost", &peer)
        .await
        .unwrap()
        .tls_endpoint
}

async fn run(
    t: &Testbed,
    p: &Profile,
    method: SecurityMethod,
) -> anyhow::Result<pb::InvokeResponse> {
    let (addr, ca) = aef_a1(t);
    let target = AefTarget {
        addr: &addr,
        ca_pem: &ca,
        server_name: "localhost",
    };
    invoker::run_flow(
        p,
        method,
        "aef-a1",
        "api-aef-a1",
        &target,
        TlsProfile::Tls13,
    )
    .await
}

/// A channel to `domain`'s CCF with that domain's operator certificate.
async fn operator_channel(t: &Testbed, domain: &str) -> tonic::transport::Channel {
    let op = t.d(domain).issue(Role::Operator);
    channel(
        t.d(domain).ccf().capif_addr,
        &t.d(domain).ca_pem(),
        Some((&op.cert_pem, &op.key_pem)),
        t.d(domain).ccf_peer(),
    )
    .await
}

fn opts() -> Options {
    Options {
        with_aefs: true,
        ..Default::default()
    }
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

/// The whole flow for both methods, in one domain and across two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_methods_work_in_one_domain_and_across_two() {
    let logs = logs::capture().await;
    let t = Testbed::start(opts()).await;
    for (home, cred) in [(A, "c0"), (B, "c0")] {
        let p = profile(&t, home, cred).await;
        for method in [SecurityMethod::Pki, SecurityMethod::Oauth] {
            let r = run(&t, &p, method)
                .await
                .unwrap_or_else(|e| panic!("{method:?} for an invoker of {home}: {e:#}"));
            assert_eq!(r.api_invoker_id, p.id());
            assert_eq!(r.home_ccf_id, home);
            assert_eq!(r.aef_id, "aef-a1");
        }
    }
    // Across domains, the PKI answer went through A's gateway, which checked B's CA.
    let a_gw = &t.d(A).gw().state;
    assert!(
        a_gw.cache
            .counters
            .misses
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // And B's key set reached A's gateway (method 3 across domains).
    logs.wait_for(&["partner token keys fetched", B]).await;
}

/// PKI refusals, each with its own reason in the AEF's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_refuses_unfederated_ca_other_invoker_and_revoked_invoker() {
    let logs = logs::capture().await;
    let t = Testbed::start(opts()).await;
    let x = profile(&t, B, "c1").await;
    run(&t, &x, SecurityMethod::Pki).await.expect("X gets in");
    let endpoint = pki_endpoint(&t, &x).await;

    // A certificate for X from a CA nobody federated ("operator-b.test" forged by a rogue CA).
    let rogue = DomainCa::generate(&CcfId::new(B).unwrap()).unwrap();
    let forged = rogue
        .issue_with_new_key(
            &ccf_core::identity::PeerIdentity::new(
                CcfId::new(B).unwrap(),
                Role::Invoker(ApiInvokerId::new(x.id()).unwrap()),
            ),
            &[],
            1,
        )
        .unwrap();
    let fake_dir = t.tmp.path().join("forged-x");
    std::fs::create_dir_all(&fake_dir).unwrap();
    for f in ["profile.toml", "ca.pem"] {
        std::fs::copy(x.dir.join(f), fake_dir.join(f)).unwrap();
    }
    std::fs::write(fake_dir.join("invoker.pem"), &forged.cert_pem).unwrap();
    std::fs::write(fake_dir.join("invoker.key"), forged.key_pem.as_bytes()).unwrap();
    let fake = Profile::load(&fake_dir).unwrap();
    let e = pki_call(&t, &fake, x.id(), &endpoint)
        .await
        .expect_err("a certificate from an unfederated CA is refused");
    let _ = err_text(e);
    logs.wait_for(&["certificate refused", x.id(), "unfederated CA"])
        .await;

    // Y's genuine certificate, presenting X.
    let y = profile(&t, B, "c2").await;
    run(&t, &y, SecurityMethod::Pki)
        .await
        .expect("Y gets in as Y");
    let e = pki_call(&t, &y, x.id(), &endpoint)
        .await
        .expect_err("a certificate naming another invoker is refused");
    let e = err_text(e);
    assert!(e.contains("CERTIFICATE_REFUSED"), "{e}");
    logs.wait_for(&[
        "certificate refused",
        &format!("names API invoker {}", y.id()),
        x.id(),
    ])
    .await;
    // A certificate of an invoker that never initiated authentication here is refused at the
    // handshake.
    let z = profile(&t, B, "c3").await;
    invoker::negotiate(&z, "aef-a1", None, SecurityMethod::Pki)
        .await
        .unwrap();
    assert!(pki_call(&t, &z, z.id(), &endpoint).await.is_err());
    logs.wait_for(&["certificate refused", z.id(), "initiated no authentication"])
        .await;

    // X revoked at home (B's operator): the revocation reaches A's AEF through the gateways.
    let ch = operator_channel(&t, B).await;
    pb::security_client::SecurityClient::new(ch)
        .revoke_authorization(pb::RevokeAuthorizationRequest {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: x.id().into(),
                cause: pb::Cause::AuthorizationIssue as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    logs.wait_for(&["authorization revoked by the CCF", x.id()])
        .await;
    assert!(pki_call(&t, &x, x.id(), &endpoint).await.is_err());
    logs.wait_for(&["certificate refused", x.id(), "revoked invoker"])
        .await;
    // Y is untouched.
    pki_call(&t, &y, y.id(), &endpoint)
        .await
        .expect("Y still gets in");
}

fn claims(iss: &str, sub: &str, scope: &str, exp: u64) -> AccessTokenClaims {
    AccessTokenClaims {
        iss: iss.into(),
        sub: sub.into(),
        // Always the AEF under test, whatever the scope: the scope checks below must reach the
        // scope check, not stop at the audience check.
        aud: vec!["aef-a1".into()],
        client_id: sub.into(),
        scope: scope.into(),
        exp,
        nbf: None,
        iat: now_ms() / 1000,
        jti: "test".into(),
    }
}

/// OAuth refusals, each with its own reason, and a key rotation at CCF-B survived
/// by domain A without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_refuses_bad_tokens_and_survives_key_rotation() {
    let logs = logs::capture().await;
    let t = Testbed::start(opts()).await;
    let (addr, ca) = aef_a1(&t);
    let p = profile(&t, B, "c4").await;
    invoker::negotiate(&p, "aef-a1", None, SecurityMethod::Oauth)
        .await
        .unwrap();
    let endpoint = invoker::auth_method(
        &p,
        SecurityMethod::Oauth,
        "",
        &addr,
        &ca,
        "localhost",
        &t.d(A).aef_peer("aef-a1"),
    )
    .await
    .unwrap()
    .tls_endpoint;
    let a1 = t.d(A).aef_peer("aef-a1");
    let call = |token: String| {
        let endpoint = endpoint.clone();
        let ca = ca.clone();
        let a1 = a1.clone();
        async move { invoker::call_oauth(&token, &endpoint, &ca, "localhost", "api-aef-a1", &a1).await }
    };
    let good = invoker::token(&p, "3gpp#aef-a1:api-aef-a1").await.unwrap();
    assert_eq!(good.token_type, "Bearer");
    call(good.access_token.clone())
        .await
        .expect("a good token works");

    // The CCF refuses a scope beyond the invoker's authorization.
    let e = err_text(
        invoker::token(&p, "3gpp#aef-a1:no-such-api")
            .await
            .unwrap_err(),
    );
    assert!(e.contains("INVALID_SCOPE"), "{e}");

    // Tampered: B's genuine signature over other claims.
    let parts: Vec<&str> = good.access_token.split('.').collect();
    let other = t
        .d(B)
        .ccf()
        .state
        .token_keys
        .sign(&claims(
            B,
            p.id(),
            "3gpp#aef-a1:api-aef-a1,admin-aef-a1",
            now_ms() / 1000 + 60,
        ))
        .unwrap();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    let e = err_text(call(tampered).await.unwrap_err());
    assert!(e.contains("INVALID_TOKEN"), "{e}");
    logs.wait_for(&["access token refused", "bad signature"])
        .await;

    // Expired beyond the 30 s leeway, signed by B's real key.
    let expired = t
        .d(B)
        .ccf()
        .state
        .token_keys
        .sign(&claims(
            B,
            p.id(),
            "3gpp#aef-a1:api-aef-a1",
            now_ms() / 1000 - 45,
        ))
        .unwrap();
    let e = err_text(call(expired).await.unwrap_err());
    assert!(e.contains("INVALID_TOKEN"), "{e}");
    logs.wait_for(&["access token refused", "expired"]).await;

    // Scope naming another AEF, and one naming another API of this AEF.
    for scope in ["3gpp#aef-b1:api-aef-b1", "3gpp#aef-a1:admin-aef-a1"] {
        let t2 = t
            .d(B)
            .ccf()
            .state
            .token_keys
            .sign(&claims(B, p.id(), scope, now_ms() / 1000 + 60))
            .unwrap();
        let e = err_text(call(t2).await.unwrap_err());
        assert!(e.contains("INSUFFICIENT_SCOPE"), "{scope}: {e}");
    }
    logs.wait_for(&["API call refused: not authorized", "OAUTH"])
        .await;

    // A domain that is not a partner: its own key, its own issuer name.
    let dir = tempfile::tempdir().unwrap();
    let stranger = TokenKeys::load_or_generate(dir.path(), 600, now_ms()).unwrap();
    let foreign = stranger
        .sign(&claims(
            "operator-x.test",
            "someone",
            "3gpp#aef-a1:api-aef-a1",
            now_ms() / 1000 + 60,
        ))
        .unwrap();
    let e = err_text(call(foreign).await.unwrap_err());
    assert!(e.contains("INVALID_TOKEN"), "{e}");
    logs.wait_for(&["access token refused", "operator-x.test", "not a partner"])
        .await;

    // B's name, a key B does not publish.
    let unknown = stranger
        .sign(&claims(
            B,
            p.id(),
            "3gpp#aef-a1:api-aef-a1",
            now_ms() / 1000 + 60,
        ))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = err_text(call(unknown).await.unwrap_err());
    assert!(e.contains("INVALID_TOKEN"), "{e}");
    logs.wait_for(&[
        "access token refused",
        &stranger.current_kid(),
        "does not publish",
    ])
    .await;

    // Rotation at B, by B's operator; nothing in A restarts.
    let old_kid = t.d(B).ccf().state.token_keys.current_kid();
    let ch = operator_channel(&t, B).await;
    let set = pb::ccf_admin_client::CcfAdminClient::new(ch)
        .rotate_token_signing_key(pb::RotateTokenSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let new_kid = t.d(B).ccf().state.token_keys.current_kid();
    assert_ne!(old_kid, new_kid);
    assert_eq!(set.keys.len(), 2, "the previous key is still published");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = invoker::token(&p, "3gpp#aef-a1:api-aef-a1").await.unwrap();
    call(fresh.access_token)
        .await
        .expect("a token signed with the new key works at once");
    call(good.access_token)
        .await
        .expect("a token signed with the previous key works until it expires");
}

/// One demo call to aef-a1's TLS endpoint with `token`, naming `as_invoker` in the
/// `capif-api-invoker-id` header and presenting `cert` (PEM certificate and key), each if given;
/// the raw status when refused, so that its reason and check can be read.
async fn call_a1(
    t: &Testbed,
    token: &str,
    as_invoker: Option<&str>,
    cert: Option<(&str, &str)>,
) -> Result<pb::InvokeResponse, tonic::Status> {
    let addr = t.d(A).aefs["aef-a1"].tls_addr.expect("aef-a1 serves TLS");
    let ch = channel(addr, &t.d(A).ca_pem(), cert, t.d(A).aef_peer("aef-a1")).await;
    let mut r = tonic::Request::new(pb::InvokeRequest {
        api_name: "api-aef-a1".into(),
        payload: "hello".into(),
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(id) = as_invoker {
        r.metadata_mut()
            .insert(capif_2e::headers::INVOKER_ID_HEADER, id.parse().unwrap());
    }
    pb::demo_api_client::DemoApiClient::new(ch)
        .invoke(r)
        .await
        .map(|r| r.into_inner())
}

/// The call was refused as an invalid token (UNAUTHENTICATED, INVALID_TOKEN), by `check`.
fn assert_token_refused(r: Result<pb::InvokeResponse, tonic::Status>, check: &str) -> String {
    let s = r.expect_err(check);
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{check}: {s:?}");
    assert_eq!(
        ccf_core::grpc::error_reason(&s).as_deref(),
        Some("INVALID_TOKEN"),
        "{check}: {s:?}"
    );
    assert_eq!(refusal_check(&s).as_deref(), Some(check), "{s:?}");
    s.message().to_string()
}

/// Issue 11 item 7: the CCF issues tokens with `aud` = the scope's AEFs and `sub` = the calling
/// invoker; the AEF refuses, each with its own check, a token meant for another AEF, one not
/// valid yet, one issued in the future, and one of invoker X used by invoker Y (named in the
/// header, or by Y's own client certificate). Across domains: X and its token are B's, the AEF
/// is A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_refuses_other_audience_future_times_and_another_invokers_token() {
    let logs = logs::capture().await;
    let t = Testbed::start(opts()).await;
    let (addr, ca) = aef_a1(&t);
    let x = profile(&t, B, "c5").await;
    invoker::negotiate(&x, "aef-a1", None, SecurityMethod::Oauth)
        .await
        .unwrap();
    invoker::auth_method(
        &x,
        SecurityMethod::Oauth,
        "",
        &addr,
        &ca,
        "localhost",
        &t.d(A).aef_peer("aef-a1"),
    )
    .await
    .unwrap();
    let token = invoker::token(&x, "3gpp#aef-a1:api-aef-a1")
        .await
        .unwrap()
        .access_token;

    // What B's CCF issued: audience aef-a1, subject and client_id X, nbf and iat now.
    let set = t.d(B).ccf().state.token_keys.key_set(B, 60, now_ms());
    let expected = Expected {
        issuer: B,
        audience: "aef-a1",
        callers: &[KnownCaller {
            invoker: x.id(),
            home: Some(B),
            source: "test",
        }],
        leeway_secs: 0,
    };
    let issued = verify(&token, &set.keys[0], &expected).expect("B's token verifies");
    assert_eq!(issued.aud, vec!["aef-a1".to_string()]);
    assert_eq!(
        (issued.sub.as_str(), issued.client_id.as_str()),
        (x.id(), x.id())
    );
    let now_s = now_ms() / 1000;
    assert!(issued.nbf.is_some_and(|n| n <= now_s) && issued.iat <= now_s);

    // X's token works for X, named or not.
    for named in [None, Some(x.id())] {
        let r = call_a1(&t, &token, named, None).await.expect("X gets in");
        assert_eq!(r.api_invoker_id, x.id());
    }

    // Y (of domain A) calls with X's token, named in the header: refused.
    let y = profile(&t, A, "c1").await;
    let msg = assert_token_refused(
        call_a1(&t, &token, Some(y.id()), None).await,
        "SUBJECT_MISMATCH",
    );
    assert!(msg.contains(x.id()) && msg.contains(y.id()), "{msg}");
    logs.wait_for(&["access token refused", "SUBJECT_MISMATCH", y.id()])
        .await;

    // Y presents its own certificate (method 2 negotiated, so the handshake passes) and X's
    // token, naming nobody: the certificate names the caller, and it is not X.
    invoker::negotiate(&y, "aef-a1", None, SecurityMethod::Pki)
        .await
        .unwrap();
    let endpoint = pki_endpoint(&t, &y).await;
    let y_cert = std::fs::read_to_string(y.dir.join("invoker.pem")).unwrap();
    let y_key = std::fs::read_to_string(y.dir.join("invoker.key")).unwrap();
    let msg = assert_token_refused(
        call_a1(&t, &token, None, Some((&y_cert, &y_key))).await,
        "SUBJECT_MISMATCH",
    );
    assert!(msg.contains("client certificate"), "{msg}");
    // Without a token, Y's certificate is a method-2 call as Y, as before.
    let r = pki_call(&t, &y, y.id(), &endpoint)
        .await
        .expect("Y's own certificate still works for method 2");
    assert_eq!(r.api_invoker_id, y.id());

    // Crafted with B's real key, everything else right.
    let keys = &t.d(B).ccf().state.token_keys;
    let sign = |f: &dyn Fn(&mut AccessTokenClaims)| {
        let mut c = claims(B, x.id(), "3gpp#aef-a1:api-aef-a1", now_ms() / 1000 + 300);
        f(&mut c);
        keys.sign(&c).unwrap()
    };
    let other_aef = sign(&|c| c.aud = vec!["aef-b1".into()]);
    let msg = assert_token_refused(
        call_a1(&t, &other_aef, Some(x.id()), None).await,
        "WRONG_AUDIENCE",
    );
    assert!(msg.contains("aef-a1"), "{msg}");
    let early = sign(&|c| c.nbf = Some(now_ms() / 1000 + 120));
    assert_token_refused(
        call_a1(&t, &early, Some(x.id()), None).await,
        "NOT_YET_VALID",
    );
    let future = sign(&|c| c.iat = now_ms() / 1000 + 120);
    assert_token_refused(
        call_a1(&t, &future, Some(x.id()), None).await,
        "ISSUED_IN_FUTURE",
    );
    // Within the AEF's leeway (the testbed's default) the same times are accepted.
    let near = sign(&|c| {
        c.nbf = Some(now_ms() / 1000 + 5);
        c.iat = now_ms() / 1000 + 5;
    });
    call_a1(&t, &near, Some(x.id()), None)
        .await
        .expect("nbf and iat within the leeway");
    logs.wait_for(&["access token refused", "ISSUED_IN_FUTURE"])
        .await;
}
