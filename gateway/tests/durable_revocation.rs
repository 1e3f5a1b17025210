//! Invariant 10: a revocation is delivered at least once, and a revoked key is never cached
//! again. Two domains (real CCFs, gateways with state directories, AEF stubs, DNS): a gateway
//! that crashed or was stopped, or a CCF whose gateway was down, still gets the notice to the
//! AEF that holds the key; a fetch in flight when the notice arrives does not cache the key; a
//! notice delivered twice is acted on once.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use capif_2e::identity::PskIdentity;
use capif_proto::v1::{
    self as pb, aef_security_client::AefSecurityClient, demo_api_client::DemoApiClient,
    gateway_admin_client::GatewayAdminClient, gateway_client::GatewayClient,
    interconnect_client::InterconnectClient, security_client::SecurityClient,
};
use capif_testkit::federation::*;
use ccf_core::ids::ApiInvokerId;
use ccf_core::kdf::AefPsk;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";
const T: Duration = Duration::from_secs(8);

fn options() -> Options {
    Options {
        with_aefs: true,
        ..Default::default()
    }
}

/// B's invoker with a PSK for aef-a1, which AEF-A fetched through both gateways.
struct Held {
    inv: Invoker,
    psk: Vec<u8>,
    identity: PskIdentity,
    psk_addr: String,
}

async fn fetch_at_a(t: &Testbed, credential: &str) -> Held {
    let mut inv = onboard(t.d(B), credential).await;
    let (psk, key_id) = inv.obtain_psk("aef-a1").await;
    let addr = t.d(A).aefs["aef-a1"].security_addr;
    let mut aef = AefSecurityClient::new(
        channel(addr, &t.d(A).ca_pem(), None, t.d(A).aef_peer("aef-a1")).await,
    );
    let rsp = aef
        .check_authentication(pb::CheckAuthenticationReq {
            api_invoker_id: inv.id.clone(),
            home_ccf_id: B.into(),
            key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let identity = PskIdentity {
        home_ccf_id: CcfId::new(B).unwrap(),
        api_invoker_id: ApiInvokerId::new(inv.id.clone()).unwrap(),
        key_id,
    };
    let held = Held {
        psk_addr: rsp.tls_endpoint,
        inv,
        psk,
        identity,
    };
    assert!(
        psk_works(&held).await,
        "the fetched key works before the revocation"
    );
    held
}

/// Whether AEF-A accepts a TLS-PSK handshake (and an API call) with the held key.
async fn psk_works(h: &Held) -> bool {
    let psk = AefPsk::from_slice(&h.psk).unwrap();
    let Ok(ch) =
        capif_2e::psk::demo_channel(&h.psk_addr, &h.identity, &psk, Default::default()).await
    else {
        return false;
    };
    DemoApiClient::new(ch)
        .invoke(pb::InvokeRequest {
            api_name: "api-aef-a1".into(),
            payload: String::new(),
        })
        .await
        .is_ok()
}

/// Polls until AEF-A refuses the held key; returns how long that took. Panics after `limit`.
async fn until_refused(h: &Held, limit: Duration) -> Duration {
    let start = Instant::now();
    while psk_works(h).await {
        assert!(
            start.elapsed() < limit,
            "AEF-A still accepts the revoked key after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

/// The operator of B revokes the invoker's authorization at every AEF (CAPIF-3 at CCF-B).
async fn revoke_at_b(t: &Testbed, inv: &str) {
    let op = t.d(B).issue(Role::Operator);
    let mut c = SecurityClient::new(
        channel(
            t.d(B).ccf().capif_addr,
            &t.d(B).ca_pem(),
            Some((&op.cert_pem, &op.key_pem)),
            t.d(B).ccf_peer(),
        )
        .await,
    );
    let rsp = c
        .revoke_authorization(pb::RevokeAuthorizationRequest {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: inv.into(),
                cause: pb::Cause::UnexpectedReason as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rsp.security_contexts_removed, 1);
}

async fn status(t: &Testbed, d: &str) -> pb::GatewayStatus {
    let op = t.d(d).issue(Role::Operator);
    let mut c = GatewayAdminClient::new(
        channel(
            t.d(d).gw().capif6_addr,
            &t.d(d).ca_pem(),
            Some((&op.cert_pem, &op.key_pem)),
            t.d(d).gw_peer(),
        )
        .await,
    );
    c.get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// A's cache holds nothing of `inv` (counted by evicting: the last check of a test).
async fn a_holds_no_entry(t: &Testbed, inv: &str) {
    let cache = &t.d(A).gw().state.cache;
    cache.sync().await;
    assert_eq!(
        cache.evict_where(|k| k.invoker().as_str() == inv).await,
        0,
        "A's cache still holds the revoked invoker's key"
    );
}

/// (a) The fetch record is on disk: gateway-B crashes after the fetch and starts again; the
/// revocation at B still reaches A's AEF, within 2 s, and A's cache holds nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_home_gateway_still_knows_who_fetched() {
    let mut t = Testbed::start(options()).await;
    let held = fetch_at_a(&t, "c0").await;
    assert_eq!(t.d(A).gw().state.cache.key_entries(), 1);
    t.d_mut(B).crash_gateway();
    t.d_mut(B).start_gateway().await;
    revoke_at_b(&t, &held.inv.id).await;
    let took = until_refused(&held, Duration::from_secs(2)).await;
    eprintln!("refused at AEF-A {took:?} after the revocation at B");
    a_holds_no_entry(&t, &held.inv.id).await;
}

/// (b) The partner is down when B revokes: the notice waits in B's outbox and reaches A's AEF
/// within 2 s of gateway-A being up again; B's outbox empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_waits_for_a_partner_that_is_down() {
    let mut t = Testbed::start(options()).await;
    let held = fetch_at_a(&t, "c0").await;
    t.d_mut(A).stop_gateway().await;
    revoke_at_b(&t, &held.inv.id).await;
    let start = Instant::now();
    loop {
        let s = status(&t, B).await;
        if s.partners
            .iter()
            .any(|p| p.ccf_id == A && p.outbox_depth == 1)
        {
            assert_eq!(s.outbox_depth, 1);
            break;
        }
        assert!(
            start.elapsed() < T,
            "B never queued the notice for A: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // B keeps trying meanwhile (its backoff grows to its cap).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        psk_works(&held).await,
        "A's AEF cannot have heard of it yet"
    );
    t.d_mut(A).start_gateway().await;
    let took = until_refused(&held, Duration::from_secs(2)).await;
    eprintln!("refused at AEF-A {took:?} after gateway-A was up");
    a_holds_no_entry(&t, &held.inv.id).await;
    let start = Instant::now();
    while status(&t, B).await.outbox_depth != 0 {
        assert!(start.elapsed() < T, "B's outbox does not empty");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let s = status(&t, B).await;
    assert!(s.partners.iter().all(|p| p.outbox_depth == 0), "{s:?}");
}

/// A TCP proxy in front of CCF-B whose answers to gateway-B can be held: the test decides when
/// a partner fetch answered by CCF-B reaches gateway-B.
struct Gate {
    addr: std::net::SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    /// Chunks from CCF-B waiting at the closed gate.
    held: Arc<AtomicUsize>,
}

async fn gate(to: std::net::SocketAddr) -> Gate {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (open, rx) = tokio::sync::watch::channel(true);
    let held = Arc::new(AtomicUsize::new(0));
    let waiting = held.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut uw).await });
            let mut rx = rx.clone();
            let waiting = waiting.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match ur.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if !*rx.borrow() {
                        waiting.fetch_add(1, Ordering::SeqCst);
                    }
                    if rx.wait_for(|o| *o).await.is_err() || cw.write_all(&buf[..n]).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Gate { addr, open, held }
}

/// (c) A fetch in flight when the revocation arrives never ends in a cached revoked key: CCF-B
/// has answered, its answer is held before gateway-B, B revokes (the fetch record, durable
/// before any key leaves, makes B notify A), A acts on the notice, then the answer goes on.
/// Gateway-B saw a revocation queued while its fetch record was being written, so it asks CCF-B
/// again rather than hand on the answer it holds: the key never leaves B, A is refused with
/// CCF-B's reason (the contexts are gone: NO_SECURITY_CONTEXT), and that refusal is all it keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_in_flight_does_not_resurrect_a_revoked_key() {
    let mut t = Testbed::start(options()).await;
    let gate = gate(t.d(B).ccf().capif_addr).await;
    t.d_mut(B).stop_gateway().await;
    t.d_mut(B).gw_config.ccf.address = gate.addr.to_string();
    t.d_mut(B).start_gateway().await;
    // Warm gateway-B's connection to CCF-B (through the gate) with another invoker.
    fetch_at_a(&t, "c1").await;

    let mut inv = onboard(t.d(B), "c0").await;
    let (_, key_id) = inv.obtain_psk("aef-a1").await;
    gate.open.send_replace(false);
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    let id = inv.id.clone();
    let presented = key_id.clone();
    let asked = tokio::spawn(async move { ask(&mut aef_a, "aef-a1", &id, B, &key_id, T).await });
    // The partner fetch reached CCF-B, which answered: the answer waits at the gate.
    let start = Instant::now();
    while t.d(B).ccf().state.partner_requests.load(Ordering::Relaxed) < 2
        || gate.held.load(Ordering::SeqCst) == 0
    {
        assert!(start.elapsed() < T, "the fetch never reached CCF-B");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = || {
        t.d(A)
            .gw()
            .state
            .revocations_received
            .load(Ordering::Relaxed)
    };
    assert_eq!(received(), 0);
    revoke_at_b(&t, &inv.id).await;
    let start = Instant::now();
    while received() == 0 {
        assert!(start.elapsed() < T, "the notice never reached A");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.open.send_replace(true);
    let e = asked.await.unwrap().unwrap_err();
    // The revocation removed the invoker's contexts at CCF-B.
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert_eq!(reason(&e), "NO_SECURITY_CONTEXT", "{e:?}");
    // Asked again after the revocation: the answer held at the gate never left B.
    assert_eq!(
        t.d(B).ccf().state.partner_requests.load(Ordering::Relaxed),
        3,
        "gateway-B did not ask CCF-B again"
    );
    // What A keeps is that refusal (briefly), never the key.
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    let again = ask(&mut aef_a, "aef-a1", &inv.id, B, &presented, T)
        .await
        .unwrap_err();
    assert_eq!(reason(&again), "NO_SECURITY_CONTEXT", "{again:?}");
}

fn notice(inv: &str, id: &str) -> pb::RevocationNotice {
    pb::RevocationNotice {
        home_ccf_id: B.into(),
        api_invoker_id: inv.into(),
        kind: pb::RevocationKind::AuthorizationRevoked as i32,
        notice_id: id.into(),
        not_after_unix_ms: ccf_core::clock::now_ms() + 60_000,
        ..Default::default()
    }
}

/// (d) The same notice delivered twice is acted on once: the repeat is acknowledged with
/// `duplicate` and evicts nothing; so is a CCF publishing the same notice twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_delivered_twice_is_acted_on_once() {
    let t = Testbed::start(options()).await;
    let held = fetch_at_a(&t, "c0").await;
    let gw_b = t.d(B).issue(Role::Gateway);
    let mut as_b = InterconnectClient::new(
        channel(
            t.d(A).gw().capif6e_addr,
            &t.d(A).ca_pem(),
            Some((&gw_b.cert_pem, &gw_b.key_pem)),
            t.d(A).gw_peer(),
        )
        .await,
    );
    let e = as_b
        .notify_revocation(notice(&held.inv.id, "not-hex"))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "INVALID_FIELD");
    assert!(psk_works(&held).await, "a refused notice changed something");
    let id = ccf_core::delivery::NoticeId::random().to_string();
    let first = as_b
        .notify_revocation(notice(&held.inv.id, &id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.duplicate, first.entries_removed), (false, 1));
    until_refused(&held, T).await;
    let again = as_b
        .notify_revocation(notice(&held.inv.id, &id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.duplicate, again.entries_removed), (true, 0));
    let s = status(&t, A).await;
    assert_eq!((s.revocations_received, s.duplicate_revocations), (1, 1));

    // The CCF side: a CCF publishing the same notice twice.
    let ccf_b = t.d(B).issue(Role::Ccf);
    let mut as_ccf = GatewayClient::new(
        channel(
            t.d(B).gw().capif6_addr,
            &t.d(B).ca_pem(),
            Some((&ccf_b.cert_pem, &ccf_b.key_pem)),
            t.d(B).gw_peer(),
        )
        .await,
    );
    let id = ccf_core::delivery::NoticeId::random().to_string();
    let n = notice(&held.inv.id, &id);
    let first = as_ccf
        .publish_revocation(n.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.duplicate, first.forwarded), (false, 1));
    let again = as_ccf.publish_revocation(n).await.unwrap().into_inner();
    assert_eq!((again.duplicate, again.forwarded), (true, 0));
}

/// (e) The CCF's outbox: gateway-B is down when CCF-B revokes; the notice waits in CCF-B's
/// store and, once gateway-B is started, reaches A's AEF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ccf_outbox_waits_for_its_gateway() {
    let mut t = Testbed::start(options()).await;
    let held = fetch_at_a(&t, "c0").await;
    t.d_mut(B).stop_gateway().await;
    revoke_at_b(&t, &held.inv.id).await;
    let queued = t.d(B).ccf().state.store.revocation_outbox().await.unwrap();
    assert_eq!(queued.len(), 1, "CCF-B queued the notice");
    assert_eq!(queued[0].notice.notice_id.len(), 32);
    assert!(queued[0].notice.not_after_unix_ms > ccf_core::clock::now_ms());
    // CCF-B retries meanwhile; A's AEF has not heard of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(psk_works(&held).await);
    t.d_mut(B).start_gateway().await;
    let took = until_refused(&held, T).await;
    eprintln!("refused at AEF-A {took:?} after gateway-B was up");
    assert!(
        t.d(B)
            .ccf()
            .state
            .store
            .revocation_outbox()
            .await
            .unwrap()
            .is_empty(),
        "CCF-B's outbox empties once acknowledged"
    );
    a_holds_no_entry(&t, &held.inv.id).await;
}

/// EvictPartnerInvoker: only the own CCF may ask, only about a configured partner's invoker;
/// it evicts A's cached answers of that invoker and sends nothing to the partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_own_ccf_evicts_a_partners_invoker() {
    let t = Testbed::start(options()).await;
    let held = fetch_at_a(&t, "c0").await;
    let client = async |role: Role| {
        let cred = t.d(A).issue(role);
        GatewayClient::new(
            channel(
                t.d(A).gw().capif6_addr,
                &t.d(A).ca_pem(),
                Some((&cred.cert_pem, &cred.key_pem)),
                t.d(A).gw_peer(),
            )
            .await,
        )
    };
    let evict = |home: &str| pb::RevocationNotice {
        home_ccf_id: home.into(),
        api_invoker_id: held.inv.id.clone(),
        ..Default::default()
    };
    let e = client(Role::Operator)
        .await
        .evict_partner_invoker(evict(B))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "ROLE_NOT_ALLOWED");
    let mut ccf = client(Role::Ccf).await;
    let e = ccf.evict_partner_invoker(evict(A)).await.unwrap_err();
    assert_eq!(reason(&e), "INVALID_FIELD");
    let e = ccf
        .evict_partner_invoker(evict("operator-z.test"))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "UNKNOWN_PARTNER");
    let sent_before = status(&t, A).await.partners[0].requests;
    let ack = ccf
        .evict_partner_invoker(evict(B))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.entries_removed, ack.forwarded), (1, 0));
    a_holds_no_entry(&t, &held.inv.id).await;
    assert_eq!(
        status(&t, A).await.partners[0].requests,
        sent_before,
        "nothing was sent to B"
    );
}
