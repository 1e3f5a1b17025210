//! Issue 11 item 5, roles on every internal link: inside one domain every CCF, gateway and AEF
//! certificate chains to the same CA, names `localhost` and carries the server-auth EKU, so only
//! the `capif://` identity tells them apart. Each client checks it in the handshake. Here a
//! valid certificate of the right CA, but of the wrong role, sits where a client expects its
//! CCF, its gateway or an AEF, and the real client refuses it.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;

use capif_proto::v1 as pb;
use capif_testkit::federation::*;
use ccf_core::identity::Role;
use ccf_core::ids::AefId;
use ccf_core::pki::IssuedCredential;
use ccf_core::tls::{ClientAuth, ExpectedPeer, server_config};
use tokio::net::TcpListener;
use tonic::Code;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

/// Serves `cred` on `listener` with mutual TLS against `ca_pem`, as a CCF, gateway or AEF of
/// that domain would, but only the health service: a client that got through the handshake
/// would get `UNIMPLEMENTED` for anything else, not a transport error.
fn serve_as(
    ca_pem: &str,
    cred: &IssuedCredential,
    listener: TcpListener,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let roots = ccf_core::tls::certs_from_pem("CA", ca_pem).unwrap();
    let tls = server_config(&cred.cert_pem, &cred.key_pem, ClientAuth::Required(&roots)).unwrap();
    let routes = tonic::service::Routes::new(tonic_health::server::health_reporter().1);
    ccf_core::grpc::spawn_server(
        listener,
        tls,
        false,
        routes,
        ccf_core::limits::ConnGate::new("impostor", Default::default()),
        std::future::pending(),
    )
}

/// Binds `addr`, waiting for a stopped server to release it.
async fn bind(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{addr} was not released");
}

/// The control: a client of domain `d` that expects what the impostor's certificate really
/// names gets through (chain, validity, DNS name and EKU are fine), so a refusal elsewhere is
/// the identity check and nothing else.
async fn reachable_as(d: &Domain, addr: SocketAddr, names: ExpectedPeer) {
    let op = d.issue(Role::Operator);
    let ch = channel(addr, &d.ca_pem(), Some((&op.cert_pem, &op.key_pem)), names).await;
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the impostor's certificate is valid for its own identity");
}

/// The refusal of a client's call: a transport failure (the handshake), not an answer, whose
/// text says what was presented and what was expected.
fn assert_refused(r: Result<impl std::fmt::Debug, tonic::Status>, presented: &str, expected: &str) {
    let s = r.expect_err("the impostor was accepted");
    let text = ccf_core::grpc::error_chain(&s);
    assert_eq!(s.code(), Code::Unavailable, "{text}");
    assert!(
        text.contains(&format!(
            "the server's certificate names {presented}, expected {expected}"
        )),
        "{text}"
    );
}

fn partner_query(aef: &str) -> pb::PartnerSecurityInformationRequest {
    pb::PartnerSecurityInformationRequest {
        partner_ccf_id: B.into(),
        query: Some(pb::SecurityInformationQuery {
            api_invoker_id: "inv-x".into(),
            home_ccf_id: A.into(),
            aef_id: aef.into(),
            presented_key_id: String::new(),
            security_method: 0,
        }),
    }
}

/// An AEF's certificate (same CA, valid, `localhost`) where the gateway expects
/// its CCF. Without the identity check the gateway would send partner queries (and pass on
/// revocations) to an AEF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aef_posing_as_the_ccf_is_refused_by_the_gateway() {
    let t = Testbed::start(Options::default()).await;
    let aef = t.d(A).issue(Role::Aef(AefId::new("aef-a1").unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap();
    let _srv = serve_as(&t.d(A).ca_pem(), &aef, listener);
    reachable_as(t.d(A), impostor, t.d(A).aef_peer("aef-a1")).await;

    let mut cfg = t.d(A).gw_config.clone();
    cfg.listen.capif6 = "127.0.0.1:0".into();
    cfg.listen.capif6e = "127.0.0.1:0".into();
    cfg.ccf.address = impostor.to_string();
    // A second gateway of A: A's state directory is the first one's.
    cfg.state_dir = None;
    let gw = capif_gateway::server::start(cfg).await.unwrap();

    // The gateway's own client of its CCF.
    let r = gw
        .state
        .ccf
        .clone()
        .get_security_information_for_partner(partner_query("aef-b1"))
        .await;
    assert_refused(
        r,
        "capif://operator-a.test/aef/aef-a1",
        "capif://operator-a.test/ccf",
    );

    // Through the front door: partner B asks; the gateway cannot reach a CCF and says so.
    let b_gw = t.d(B).issue(Role::Gateway);
    let ch = channel(
        gw.capif6e_addr,
        &t.d(A).ca_pem(),
        Some((&b_gw.cert_pem, &b_gw.key_pem)),
        t.d(A).gw_peer(),
    )
    .await;
    let e = pb::interconnect_client::InterconnectClient::new(ch)
        .fetch_security_information(partner_query("aef-b1").query.unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unavailable, "PARTNER_UNAVAILABLE")
    );
    gw.shutdown().await;
}

/// The domain's gateway certificate where an AEF expects its CCF. Without the
/// identity check the AEF would take invokers' keys and token keys from the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_posing_as_the_ccf_is_refused_by_the_aef() {
    let t = Testbed::start(Options::default()).await;
    let gw_cred = t.d(A).issue(Role::Gateway);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap();
    let _srv = serve_as(&t.d(A).ca_pem(), &gw_cred, listener);
    reachable_as(t.d(A), impostor, t.d(A).gw_peer()).await;

    let d = t.d(A);
    let cred = d.issue(Role::Aef(AefId::new("aef-a1").unwrap()));
    let (cert, key) = (d.dir.join("roles-aef.pem"), d.dir.join("roles-aef.key"));
    std::fs::write(&cert, &cred.cert_pem).unwrap();
    std::fs::write(&key, cred.key_pem.as_bytes()).unwrap();
    let text = format!(
        "aef_id = \"aef-a1\"\nccf_id = \"{A}\"\napis = [\"api-aef-a1\"]\n\
         [tls]\nca_cert = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [ccf]\naddress = \"{impostor}\"\n\
         [listen]\nsecurity = \"127.0.0.1:0\"\npsk = \"127.0.0.1:0\"\n",
        ca = d.dir.join("ca.pem").display(),
        cert = cert.display(),
        key = key.display(),
    );
    let cfg = aef_stub::config::AefConfig::parse(&text, "roles test aef").unwrap();
    let aef = aef_stub::server::start(cfg).await.unwrap();

    // The AEF's own client of its CCF.
    let r = aef
        .state
        .ccf
        .clone()
        .get_security_information(pb::GetSecurityInformationRequest {
            api_invoker_id: "inv-x".into(),
            aef_id: "aef-a1".into(),
            home_ccf_id: A.into(),
            ..Default::default()
        })
        .await;
    assert_refused(
        r,
        "capif://operator-a.test/gateway",
        "capif://operator-a.test/ccf",
    );

    // Through the front door: an invoker's Authentication Initiation gets no key.
    let ch = channel(aef.security_addr, &d.ca_pem(), None, d.aef_peer("aef-a1")).await;
    let e = pb::aef_security_client::AefSecurityClient::new(ch)
        .check_authentication(pb::CheckAuthenticationReq {
            api_invoker_id: "inv-x".into(),
            home_ccf_id: A.into(),
            security_method: pb::SecurityMethod::Psk as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    aef.shutdown().await;
}

/// The CCF's side: an AEF's certificate where the CCF expects its gateway, and another AEF's
/// where it expects aef-a1 (revocation push). Each impostor takes the real one's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ccf_refuses_impostors_of_its_gateway_and_of_an_aef() {
    let mut t = Testbed::start(Options {
        with_aefs: true,
        ..Default::default()
    })
    .await;
    let gw_addr: SocketAddr = format!("127.0.0.1:{}", t.d(A).gw6_port).parse().unwrap();
    t.d_mut(A).stop_gateway().await;
    let aef = t.d(A).issue(Role::Aef(AefId::new("aef-a1").unwrap()));
    let _gw_impostor = serve_as(&t.d(A).ca_pem(), &aef, bind(gw_addr).await);
    reachable_as(t.d(A), gw_addr, t.d(A).aef_peer("aef-a1")).await;
    let r = t
        .d(A)
        .ccf()
        .state
        .gateway
        .clone()
        .expect("the CCF has a gateway")
        .fetch_security_information(partner_query("aef-a1").query.unwrap())
        .await;
    assert_refused(
        r,
        "capif://operator-a.test/aef/aef-a1",
        "capif://operator-a.test/gateway",
    );

    let aef_addr = t.d(A).aefs["aef-a1"].security_addr;
    if let Some(real) = t.d_mut(A).aefs.remove("aef-a1") {
        real.shutdown().await;
    }
    let other = t.d(A).issue(Role::Aef(AefId::new("aef-a9").unwrap()));
    let _aef_impostor = serve_as(&t.d(A).ca_pem(), &other, bind(aef_addr).await);
    reachable_as(t.d(A), aef_addr, t.d(A).aef_peer("aef-a9")).await;
    let r = t.d(A).ccf().state.aefs[&AefId::new("aef-a1").unwrap()]
        .clone()
        .revoke_authorization(pb::RevokeAuthorizationReq {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: "inv-x".into(),
                aef_id: "aef-a1".into(),
                cause: pb::Cause::AuthorizationIssue as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_refused(
        r,
        "capif://operator-a.test/aef/aef-a9",
        "capif://operator-a.test/aef/aef-a1",
    );
}
