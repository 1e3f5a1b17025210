//! The gateway's acceptance tests: real CCFs and gateways of several domains with their own CAs,
//! real mutual TLS, and a real DNS server on loopback.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use capif_proto::v1::{self as pb, interconnect_client::InterconnectClient};
use capif_testkit::federation::*;
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::CcfId;
use ccf_core::pki::DomainCa;
use tonic::Code;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";
const C: &str = "operator-c.test";
const T: Duration = Duration::from_secs(3);

fn partner_requests(t: &Testbed, d: &str) -> u64 {
    t.d(d).ccf().state.partner_requests.load(Ordering::Relaxed)
}

/// AEF-A gets, through CCF-A and the gateways, the AEFPSK the invoker of B derived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_domains_aef_gets_the_invokers_key() {
    let t = Testbed::start(Options::default()).await;
    let mut inv = onboard(t.d(B), "c0").await;
    let (psk, key_id) = inv.obtain_psk("aef-a1").await;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    let got = ask(&mut aef_a, "aef-a1", &inv.id, B, "", T)
        .await
        .expect("key through the gateways");
    assert_eq!(got.aef_psk, psk);
    assert_eq!(got.key_id, key_id);
    assert_eq!(got.home_ccf_id, B);
    assert!(got.remaining_validity_ms <= 3_600_000 && got.remaining_validity_ms > 3_500_000);
    let direct = t
        .d(B)
        .ccf()
        .state
        .store
        .context(&inv.id.parse().unwrap(), &"aef-a1".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(got.remaining_validity_ms <= direct.expires_at_ms - ccf_core::clock::now_ms() + 5);
    // The partner located B through DNS and recorded the success.
    let state = t
        .d(A)
        .gw()
        .state
        .link(&CcfId::new(B).unwrap())
        .unwrap()
        .state();
    assert!(
        state.last_success_unix_ms > 0
            && state
                .resolved_targets
                .iter()
                .any(|s| s.contains("gw.operator-b.test")),
        "{state:?}"
    );
    // B's own AEF can never get a key bound to A's AEF, and A's own invokers are unaffected.
    let mut aef_b = aef(t.d(B), "aef-b1").await;
    let e = ask(&mut aef_b, "aef-b1", &inv.id, "", "", T)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "KEY_BOUND_TO_OTHER_AEF");
}

/// 200 concurrent identical requests on a cold cache make one request at CCF-B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_upstream_call() {
    let t = Testbed::start(Options::default()).await;
    let mut inv = onboard(t.d(B), "c0").await;
    let (psk, _) = inv.obtain_psk("aef-a1").await;
    let before = partner_requests(&t, B);
    let aef_a = aef(t.d(A), "aef-a1").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut c = aef_a.clone();
        let id = inv.id.clone();
        tasks
            .spawn(async move { ask(&mut c, "aef-a1", &id, B, "", Duration::from_secs(10)).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().expect("every caller gets the key").aef_psk, psk);
    }
    assert_eq!(
        partner_requests(&t, B) - before,
        1,
        "CCF-B saw more than one request"
    );
    let c = &t.d(A).gw().state.cache.counters;
    assert_eq!(c.misses.load(Ordering::Relaxed), 1);
    assert_eq!(
        c.hits.load(Ordering::Relaxed) + c.coalesced.load(Ordering::Relaxed),
        199
    );
}

/// A short-lived key is never served after its expiry and is refetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_validity_is_never_exceeded_and_refetched() {
    let t = Testbed::start(Options {
        validity_secs: 3,
        margin_ms: 500,
        negative_ttl_ms: 200,
        ..Default::default()
    })
    .await;
    let mut inv = onboard(t.d(B), "c0").await;
    let (psk, _) = inv.obtain_psk("aef-a1").await;
    let expires_at = t
        .d(B)
        .ccf()
        .state
        .store
        .context(&inv.id.parse().unwrap(), &"aef-a1".parse().unwrap())
        .await
        .unwrap()
        .unwrap()
        .expires_at_ms;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    let start = Instant::now();
    let mut served = 0;
    while start.elapsed() < Duration::from_millis(4000) {
        let now = ccf_core::clock::now_ms();
        match ask(&mut aef_a, "aef-a1", &inv.id, B, "", T).await {
            Ok(info) => {
                served += 1;
                assert_eq!(info.aef_psk, psk);
                assert!(
                    now < expires_at,
                    "a key was served {} ms after it expired",
                    now - expires_at
                );
                assert!(
                    now + info.remaining_validity_ms <= expires_at + 50,
                    "validity beyond CCF-B's"
                );
            }
            Err(e) => {
                assert!(
                    now + 20 >= expires_at,
                    "refused {} ms before expiry: {e:?}",
                    expires_at - now
                );
                assert_eq!(reason(&e), "KEY_EXPIRED");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served > 10);
    // The cache entry lived at most validity - margin: at least one refetch reached B.
    assert!(partner_requests(&t, B) >= 2);

    // A fresh key after re-authentication is fetched anew.
    let (psk2, key_id2) = inv.obtain_psk("aef-a1").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // negative entry lifetime
    let got = ask(&mut aef_a, "aef-a1", &inv.id, B, "", T).await.unwrap();
    assert_eq!(got.aef_psk, psk2);
    assert_eq!(got.key_id, key_id2);
}

/// The stale-key rule: the invoker re-authenticated at CCF-B while A still caches the old key;
/// presenting the new key id refreshes A's entry at once; a second refresh waits for the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_key_id_refreshes_the_cache() {
    let t = Testbed::start(Options::default()).await;
    let mut inv = onboard(t.d(B), "c0").await;
    let (_, old_id) = inv.obtain_psk("aef-a1").await;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    assert_eq!(
        ask(&mut aef_a, "aef-a1", &inv.id, B, &old_id, T)
            .await
            .unwrap()
            .key_id,
        old_id
    );
    // Re-authenticate over a new TLS session: new AEFPSK.
    let mut again = inv.new_session(t.d(B)).await;
    let (psk2, new_id) = again.obtain_psk("aef-a1").await;
    assert_ne!(old_id, new_id);
    // The first refresh of an entry happens at once.
    let got = ask(&mut aef_a, "aef-a1", &inv.id, B, &new_id, T)
        .await
        .unwrap();
    assert_eq!(got.key_id, new_id);
    assert_eq!(got.aef_psk, psk2);

    // What a caller presents refreshes an entry at once the first time, then at most once per
    // interval (1 s). Let the revocation notice of the re-negotiation (KEY_REPLACED_BY_NEWER,
    // which evicts A's entry) land first, then start from a plain miss. Awaited, not slept on:
    // on a loaded machine the notice may take longer than any fixed pause.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t
        .d(A)
        .gw()
        .state
        .revocations_received
        .load(Ordering::Relaxed)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-negotiation's notice never reached A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The notice evicts only an entry still holding the replaced key: if it came after the
    // refresh above, the refreshed entry stays, with its refresh spent. Waiting out the refresh
    // interval makes the next refresh due either way.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        ask(&mut aef_a, "aef-a1", &inv.id, B, "", T)
            .await
            .unwrap()
            .key_id,
        new_id
    );
    let random = || format!("{:016x}", rand::random::<u64>());
    let before = partner_requests(&t, B);
    let first = ask(&mut aef_a, "aef-a1", &inv.id, B, &random(), T)
        .await
        .unwrap();
    assert_eq!(first.key_id, new_id);
    assert_eq!(
        partner_requests(&t, B),
        before + 1,
        "the first refresh is at once"
    );
    for _ in 0..20 {
        let again = ask(&mut aef_a, "aef-a1", &inv.id, B, &random(), T)
            .await
            .unwrap();
        assert_eq!(again.key_id, new_id, "the cached answer is served");
    }
    assert_eq!(
        partner_requests(&t, B),
        before + 1,
        "no further fetch within the interval"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ask(&mut aef_a, "aef-a1", &inv.id, B, &random(), T)
        .await
        .unwrap();
    assert_eq!(
        partner_requests(&t, B),
        before + 2,
        "one refresh after the interval"
    );
}

/// C asks B for a key bound to an AEF of A: PERMISSION_DENIED, nothing cached for C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confused_deputy_is_refused() {
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        ..Default::default()
    })
    .await;
    let mut inv = onboard(t.d(B), "c0").await;
    inv.obtain_psk("aef-a1").await;

    // C's gateway (a real partner, with its real certificate) asks B directly for aef-a1's key.
    let cred_c = t.d(C).issue(Role::Gateway);
    let ch = channel(
        t.d(B).gw().capif6e_addr,
        &t.d(B).ca_pem(),
        Some((&cred_c.cert_pem, &cred_c.key_pem)),
        t.d(B).gw_peer(),
    )
    .await;
    let e = InterconnectClient::new(ch)
        .fetch_security_information(pb::SecurityInformationQuery {
            api_invoker_id: inv.id.clone(),
            home_ccf_id: B.into(),
            aef_id: "aef-a1".into(),
            presented_key_id: String::new(),
            security_method: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), "PARTNER_NOT_AUTHORIZED");

    // The legitimate path from C (C's own AEF) gets no key either.
    let mut aef_c = aef(t.d(C), "aef-c1").await;
    let e = ask(&mut aef_c, "aef-c1", &inv.id, B, "", T)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        t.d(C).gw().state.cache.key_entries(),
        0,
        "C's gateway cached a key"
    );
    assert!(
        t.d(B)
            .gw()
            .state
            .store
            .fetchers_of(&inv.id.parse().unwrap(), 0)
            .await
            .unwrap()
            .is_empty(),
        "B recorded C as holding a key"
    );
}

/// A second gateway for A whose DNS server points B's SRV record at `port`; returns the error
/// a fetch for B's invoker gets, and the partner state of B.
async fn fetch_with_b_at(t: &Testbed, port: u16, inv: &str) -> (tonic::Status, pb::PartnerState) {
    let srv: Vec<(String, u16)> = t
        .domains
        .values()
        .map(|d| (d.id.clone(), if d.id == B { port } else { d.gw6e_port }))
        .collect();
    let dns = Dns::start(&srv).await.expect("DNS server");
    let mut cfg = t.d(A).gw_config.clone();
    cfg.dns.nameserver = Some(dns.addr.to_string());
    cfg.listen.capif6 = "127.0.0.1:0".into();
    cfg.listen.capif6e = "127.0.0.1:0".into();
    // A second gateway of A: A's state directory is the first one's.
    cfg.state_dir = None;
    let gw = capif_gateway::server::start(cfg).await.unwrap();
    let query = pb::SecurityInformationQuery {
        api_invoker_id: inv.into(),
        home_ccf_id: B.into(),
        aef_id: "aef-a1".into(),
        presented_key_id: String::new(),
        security_method: 0,
    };
    let ccf_cred = t.d(A).issue(Role::Ccf);
    let ch = channel(
        gw.capif6_addr,
        &t.d(A).ca_pem(),
        Some((&ccf_cred.cert_pem, &ccf_cred.key_pem)),
        t.d(A).gw_peer(),
    )
    .await;
    let e = pb::gateway_client::GatewayClient::new(ch)
        .fetch_security_information(query)
        .await
        .unwrap_err();
    let st = gw.state.link(&CcfId::new(B).unwrap()).unwrap().state();
    gw.shutdown().await;
    (e, st)
}

/// DNS points B's SRV record elsewhere: A refuses, whatever DNS said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_pointing_at_another_party_is_refused() {
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        ..Default::default()
    })
    .await;
    let mut inv = onboard(t.d(B), "c0").await;
    inv.obtain_psk("aef-a1").await;

    // At C's gateway: a real partner, but its certificate is not from B's CA.
    let (e, st) = fetch_with_b_at(&t, t.d(C).gw6e_port, &inv.id).await;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(st.last_error.contains("UnknownIssuer"), "{st:?}");

    // At B's own CCF: B's CA, but the certificate names capif://operator-b.test/ccf, not B's
    // gateway: identity mismatch.
    let (e, st) = fetch_with_b_at(&t, t.d(B).ccf_port, &inv.id).await;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        st.last_error.contains("identity mismatch")
            && st.last_error.contains("capif://operator-b.test/ccf"),
        "{st:?}"
    );
    assert_eq!(partner_requests(&t, B), 0, "a key request reached CCF-B");
}

/// A gateway with a certificate from an unconfigured CA is refused, both when we
/// dial it and when it dials us; a partner CA cannot vouch for another partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_unconfigured_or_wrong_cas_are_refused() {
    let logs = capif_testkit::logs::capture().await;
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        ..Default::default()
    })
    .await;
    let rogue_ca = DomainCa::generate(&CcfId::new(B).unwrap()).unwrap();
    let rogue = rogue_ca
        .issue_with_new_key(
            &PeerIdentity::new(CcfId::new(B).unwrap(), Role::Gateway),
            &["localhost".into()],
            1,
        )
        .unwrap();
    let query = pb::SecurityInformationQuery {
        api_invoker_id: "inv-x".into(),
        home_ccf_id: A.into(),
        aef_id: "aef-b1".into(),
        presented_key_id: String::new(),
        security_method: 0,
    };
    // Inbound: the rogue "operator-b" gateway dials A.
    let cfg = ccf_core::tls::client_config(
        &t.d(A).ca_pem(),
        Some((&rogue.cert_pem, &rogue.key_pem)),
        t.d(A).gw_peer(),
    )
    .unwrap();
    let r = async {
        let (ch, _) =
            ccf_core::tls::connect(&t.d(A).gw().capif6e_addr.to_string(), "localhost", cfg, T)
                .await?;
        InterconnectClient::new(ch)
            .fetch_security_information(query.clone())
            .await
            .map_err(Into::<Box<dyn std::error::Error>>::into)
    }
    .await;
    assert!(
        r.is_err(),
        "a certificate from an unconfigured CA was accepted"
    );

    // Inbound: C's real CA signs a certificate claiming to be B's gateway. The CAPIF-6e
    // listener's verifier asks the federation inside the handshake: refused there, with the
    // reason in A's log.
    let forged = t
        .d(C)
        .ca
        .issue_with_new_key(
            &PeerIdentity::new(CcfId::new(B).unwrap(), Role::Gateway),
            &["localhost".into()],
            1,
        )
        .unwrap();
    let cfg = ccf_core::tls::client_config(
        &t.d(A).ca_pem(),
        Some((&forged.cert_pem, &forged.key_pem)),
        t.d(A).gw_peer(),
    )
    .unwrap();
    let r = async {
        let (ch, _) =
            ccf_core::tls::connect(&t.d(A).gw().capif6e_addr.to_string(), "localhost", cfg, T)
                .await?;
        InterconnectClient::new(ch)
            .fetch_security_information(query.clone())
            .await
            .map_err(Into::<Box<dyn std::error::Error>>::into)
    }
    .await;
    assert!(r.is_err(), "C's CA vouched for operator-b");
    logs.wait_for(&[
        "partner certificate refused",
        "does not chain to operator-b.test's CA",
    ])
    .await;

    // Outbound: A dials a rogue server presenting the rogue certificate where B should be.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = listener.local_addr().unwrap();
    let rogue_tls = ccf_core::tls::server_config(
        &rogue.cert_pem,
        &rogue.key_pem,
        ccf_core::tls::ClientAuth::None,
    )
    .unwrap();
    let routes = tonic::service::Routes::new(tonic_health::server::health_reporter().1);
    let _srv = ccf_core::grpc::spawn_server(
        listener,
        rogue_tls,
        false,
        routes,
        ccf_core::limits::ConnGate::new("rogue", Default::default()),
        std::future::pending(),
    );
    let mut cfg = t.d(A).gw_config.clone();
    cfg.listen.capif6 = "127.0.0.1:0".into();
    cfg.listen.capif6e = "127.0.0.1:0".into();
    // A second gateway of A: A's state directory is the first one's.
    cfg.state_dir = None;
    for p in cfg.partners.iter_mut() {
        if p.ccf_id == B {
            p.address = Some(rogue_addr.to_string());
        }
    }
    let gw = capif_gateway::server::start(cfg).await.unwrap();
    let ccf_cred = t.d(A).issue(Role::Ccf);
    let ch = channel(
        gw.capif6_addr,
        &t.d(A).ca_pem(),
        Some((&ccf_cred.cert_pem, &ccf_cred.key_pem)),
        t.d(A).gw_peer(),
    )
    .await;
    let mut q = query.clone();
    q.home_ccf_id = B.into();
    q.aef_id = "aef-a1".into();
    let e = pb::gateway_client::GatewayClient::new(ch)
        .fetch_security_information(q)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let st = gw.state.link(&CcfId::new(B).unwrap()).unwrap().state();
    assert!(st.last_error.contains("invalid peer certificate"), "{st:?}");
}

/// Partner B stopped: requests for B fail within the deadline while requests for C
/// keep succeeding; B restarted: A recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_outage_is_contained_and_recovers() {
    let mut t = Testbed::start(Options {
        domains: vec![A, B, C],
        ..Default::default()
    })
    .await;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    let mut b_invs = Vec::new();
    for i in 0..3 {
        let mut inv = onboard(t.d(B), &format!("c{i}")).await;
        inv.obtain_psk("aef-a1").await;
        b_invs.push(inv);
    }
    let mut c_invs = Vec::new();
    for i in 0..6 {
        let mut inv = onboard(t.d(C), &format!("c{i}")).await;
        inv.obtain_psk("aef-a1").await;
        c_invs.push(inv);
    }
    ask(&mut aef_a, "aef-a1", &b_invs[0].id, B, "", T)
        .await
        .expect("B works before the outage");

    t.d_mut(B).stop_gateway().await;
    let deadline = Duration::from_millis(1500);
    // Requests for B (not cached) fail within the deadline; C's keep succeeding meanwhile.
    let mut aef_a2 = aef_a.clone();
    let b_id = b_invs[1].id.clone();
    let b_req = tokio::spawn(async move {
        let start = Instant::now();
        let r = ask(&mut aef_a2, "aef-a1", &b_id, B, "", deadline).await;
        (r, start.elapsed())
    });
    for inv in &c_invs[..3] {
        let start = Instant::now();
        ask(&mut aef_a, "aef-a1", &inv.id, C, "", T)
            .await
            .expect("C unaffected by B's outage");
        assert!(
            start.elapsed() < Duration::from_millis(1000),
            "C slowed down: {:?}",
            start.elapsed()
        );
    }
    let (r, took) = b_req.await.unwrap();
    let e = r.expect_err("B is down");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(
        took < deadline + Duration::from_millis(500),
        "took {took:?} for a {deadline:?} deadline"
    );
    let st = t
        .d(A)
        .gw()
        .state
        .link(&CcfId::new(B).unwrap())
        .unwrap()
        .state();
    assert!(st.failures >= 1 && !st.last_error.is_empty(), "{st:?}");

    t.d_mut(B).start_gateway().await;
    let mut ok = false;
    for _ in 0..30 {
        if ask(&mut aef_a, "aef-a1", &b_invs[2].id, B, "", T)
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "A did not recover after B came back");
    for inv in &c_invs[3..] {
        ask(&mut aef_a, "aef-a1", &inv.id, C, "", T)
            .await
            .expect("C still fine");
    }
}

/// B offboards the invoker: within 1 s A's cache no longer serves its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offboarding_at_home_evicts_partner_caches() {
    let t = Testbed::start(Options::default()).await;
    let mut inv = onboard(t.d(B), "c0").await;
    inv.obtain_psk("aef-a1").await;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    ask(&mut aef_a, "aef-a1", &inv.id, B, "", T).await.unwrap();
    assert_eq!(t.d(A).gw().state.cache.key_entries(), 1);

    let ch = channel(
        t.d(B).ccf().capif_addr,
        &t.d(B).ca_pem(),
        Some((&inv.cert_pem, &inv.key_pem)),
        t.d(B).ccf_peer(),
    )
    .await;
    pb::invoker_management_client::InvokerManagementClient::new(ch)
        .offboard(pb::OffboardRequest {
            api_invoker_id: inv.id.clone(),
        })
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        if t.d(A)
            .gw()
            .state
            .revocations_received
            .load(Ordering::Relaxed)
            == 1
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "no revocation reached A within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = ask(&mut aef_a, "aef-a1", &inv.id, B, "", T)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "INVOKER_NOT_FOUND");
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// Invariant 5: what a partner gets back reveals no internal address of the answering domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_answers_hide_internal_addresses() {
    let mut t = Testbed::start(Options::default()).await;
    let mut inv = onboard(t.d(B), "c0").await;
    inv.obtain_psk("aef-a1").await;
    // B's CCF goes away; B's gateway still answers A.
    let ccf_b = t.d_mut(B).ccf.take().unwrap();
    let ccf_addr = ccf_b.capif_addr.to_string();
    ccf_b.shutdown().await;
    let cred_a = t.d(A).issue(Role::Gateway);
    let ch = channel(
        t.d(B).gw().capif6e_addr,
        &t.d(B).ca_pem(),
        Some((&cred_a.cert_pem, &cred_a.key_pem)),
        t.d(B).gw_peer(),
    )
    .await;
    let e = InterconnectClient::new(ch)
        .fetch_security_information(pb::SecurityInformationQuery {
            api_invoker_id: inv.id.clone(),
            home_ccf_id: B.into(),
            aef_id: "aef-a1".into(),
            presented_key_id: String::new(),
            security_method: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let port = ccf_addr.rsplit(':').next().unwrap();
    assert!(
        !e.message().contains(&ccf_addr) && !e.message().contains(port),
        "leaks {ccf_addr}: {}",
        e.message()
    );
    assert!(!format!("{:?}", e.metadata()).contains(port));
}
