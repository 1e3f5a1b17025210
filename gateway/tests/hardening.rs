//! The federation's edges tried as an attacker on one machine would (loopback only, bounded
//! counts): one unauthenticated client cannot turn Authentication Initiations into more partner
//! fetches than the budgets allow, nor starve other partners; oversized or malformed key ids are
//! refused at the AEF; invokers of two domains are kept apart at one AEF.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use capif_2e::identity::PskIdentity;
use capif_proto::v1::{
    self as pb, aef_security_client::AefSecurityClient, demo_api_client::DemoApiClient,
};
use capif_testkit::federation::*;
use ccf_core::identity::Role;
use ccf_core::ids::{ApiInvokerId, CcfId};
use ccf_core::kdf::AefPsk;
use tonic::Code;
use tonic::transport::Channel;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";
const C: &str = "operator-c.test";

/// Partner fetches that reached CCF-`d` (through its gateway), answered or refused.
fn served_for_partners(t: &Testbed, d: &str) -> u64 {
    t.d(d).ccf().state.partner_requests.load(Ordering::Relaxed)
}

/// Requests gateway-`d`'s cache has seen from its own CCF.
fn gateway_lookups(t: &Testbed, d: &str) -> u64 {
    let c = &t.d(d).gw().state.cache.counters;
    [&c.hits, &c.misses, &c.coalesced, &c.negative_hits]
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .sum()
}

async fn initiation_client(t: &Testbed, d: &str, aef: &str) -> AefSecurityClient<Channel> {
    let addr = t.d(d).aefs[aef].security_addr;
    AefSecurityClient::new(channel(addr, &t.d(d).ca_pem(), None, t.d(d).aef_peer(aef)).await)
}

async fn initiate(
    c: &mut AefSecurityClient<Channel>,
    invoker: &str,
    home: &str,
    key_id: &str,
) -> Result<pb::CheckAuthenticationRsp, tonic::Status> {
    c.check_authentication(pb::CheckAuthenticationReq {
        api_invoker_id: invoker.into(),
        home_ccf_id: home.into(),
        key_id: key_id.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

fn random_hex16() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// One unauthenticated client cannot turn Authentication Initiations into partner fetches
/// beyond the budgets, nor starve another partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_amplify_into_partner_fetches() {
    const RATE: u32 = 5;
    const BURST: u32 = 20;
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        with_aefs: true,
        fetch_rate: RATE,
        fetch_burst: BURST,
        // The AEF's own per-source budget is wide here: this test is about the gateway's.
        aef_extra: "[budgets]\ninitiation_rate_per_sec = 10000\ninitiation_burst = 10000\n".into(),
        ..Default::default()
    })
    .await;
    let mut inv_b = onboard(t.d(B), "c0").await;
    let (_, key_b) = inv_b.obtain_psk("aef-a1").await;
    let mut inv_c = onboard(t.d(C), "c0").await;
    inv_c.obtain_psk("aef-a1").await;
    let mut client = initiation_client(&t, A, "aef-a1").await;
    // The real invoker's key is held before the attack.
    assert_eq!(
        initiate(&mut client, &inv_b.id, B, &key_b)
            .await
            .unwrap()
            .key_id,
        key_b
    );

    // 1000 random invoker ids of B.
    let start = Instant::now();
    let before = served_for_partners(&t, B);
    let (mut refused_budget, mut not_found) = (0, 0);
    for i in 0..1000 {
        match initiate(&mut client, &format!("rnd-{i}-{}", random_hex16()), B, "").await {
            Ok(_) => panic!("a random invoker id was answered"),
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert_eq!(reason(&e), "OUTBOUND_BUDGET_EXHAUSTED");
                refused_budget += 1;
            }
            Err(_) => not_found += 1,
        }
    }
    let fetches = served_for_partners(&t, B) - before;
    let allowed =
        u64::from(BURST) + (start.elapsed().as_secs_f64() * f64::from(RATE)).ceil() as u64;
    println!(
        "1000 random ids in {:?}: {fetches} partner fetches (budget allows {allowed}), \
         {refused_budget} refused by the budget, {not_found} refused by B",
        start.elapsed()
    );
    assert!(fetches <= allowed, "{fetches} fetches > budget {allowed}");
    assert!(refused_budget > 0);

    // Another partner's traffic is unaffected while B's budget is spent.
    let ok = initiate(&mut client, &inv_c.id, C, "")
        .await
        .expect("C is served");
    assert!(!ok.key_id.is_empty());

    // 500 with the real invoker id and random key ids.
    let start = Instant::now();
    let before = served_for_partners(&t, B);
    for _ in 0..500 {
        let r = initiate(&mut client, &inv_b.id, B, &random_hex16()).await;
        if let Ok(rsp) = r {
            assert_eq!(rsp.key_id, key_b, "the held key is what is answered");
        }
    }
    let fetches = served_for_partners(&t, B) - before;
    // At most one refresh per second per (home, invoker, AEF), and within the budget.
    let refresh_bound = start.elapsed().as_secs() + 1;
    println!(
        "500 random key ids in {:?}: {fetches} partner fetches (refresh bound {refresh_bound})",
        start.elapsed()
    );
    assert!(fetches <= refresh_bound, "{fetches} > {refresh_bound}");

    // The invoker itself is still served with its key.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rsp = initiate(&mut client, &inv_b.id, B, &key_b).await.unwrap();
    assert_eq!(rsp.key_id, key_b);

    // A 3 MB key id is refused at the AEF, and nothing is forwarded.
    let before = (served_for_partners(&t, B), gateway_lookups(&t, A));
    let e = initiate(&mut client, "inv-x", B, &"a".repeat(3 * 1024 * 1024))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(reason(&e), "MESSAGE_TOO_LARGE");
    // A short malformed one is refused by syntax.
    let e = initiate(&mut client, "inv-x", B, "NOT-HEX")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(reason(&e), "INVALID_FIELD");
    assert_eq!(
        before,
        (served_for_partners(&t, B), gateway_lookups(&t, A)),
        "nothing forwarded"
    );
}

/// The AEF's own per-source budget of Authentication Initiations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiations_are_rate_limited_per_source() {
    let t = Testbed::start(Options {
        with_aefs: true,
        aef_extra: "[budgets]\ninitiation_rate_per_sec = 1\ninitiation_burst = 10\n".into(),
        ..Default::default()
    })
    .await;
    let mut client = initiation_client(&t, A, "aef-a1").await;
    let mut limited = 0;
    for i in 0..30 {
        if let Err(e) = initiate(&mut client, &format!("x{i}"), B, "").await
            && e.code() == Code::ResourceExhausted
        {
            assert_eq!(reason(&e), "RATE_LIMITED");
            limited += 1;
        }
    }
    assert!(limited >= 19, "only {limited} of 30 limited (burst 10)");
}

async fn psk_call(
    addr: &str,
    identity: &PskIdentity,
    psk: &[u8],
) -> Result<pb::InvokeResponse, String> {
    let psk = AefPsk::from_slice(psk).unwrap();
    let ch = capif_2e::psk::demo_channel(addr, identity, &psk, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    DemoApiClient::new(ch)
        .invoke(pb::InvokeRequest {
            api_name: "api-aef-a1".into(),
            payload: String::new(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

/// At one AEF, a notice about B's invoker leaves C's invoker of the same id
/// working, and a PSK identity naming one home with the other's key id is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invokers_are_home_and_id_at_the_aef() {
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        with_aefs: true,
        ..Default::default()
    })
    .await;
    let mut inv_b = onboard(t.d(B), "c0").await;
    let (psk_b, key_b) = inv_b.obtain_psk("aef-a1").await;
    let mut inv_c = onboard(t.d(C), "c0").await;
    let (psk_c, key_c) = inv_c.obtain_psk("aef-a1").await;
    let mut client = initiation_client(&t, A, "aef-a1").await;
    let rb = initiate(&mut client, &inv_b.id, B, &key_b).await.unwrap();
    let rc = initiate(&mut client, &inv_c.id, C, &key_c).await.unwrap();
    let psk_addr = rc.tls_endpoint.clone();
    let id_of = |home: &str, inv: &str, key: &str| PskIdentity {
        home_ccf_id: CcfId::new(home).unwrap(),
        api_invoker_id: ApiInvokerId::new(inv).unwrap(),
        key_id: key.into(),
    };
    assert!(
        psk_call(&psk_addr, &id_of(C, &inv_c.id, &key_c), &psk_c)
            .await
            .is_ok()
    );
    assert!(
        psk_call(&psk_addr, &id_of(B, &inv_b.id, &key_b), &psk_b)
            .await
            .is_ok()
    );
    // C's invoker id with home B, and with B's key: refused.
    assert!(
        psk_call(&psk_addr, &id_of(B, &inv_c.id, &key_b), &psk_b)
            .await
            .is_err()
    );
    // Home C naming C's invoker with B's key id (and key): refused.
    assert!(
        psk_call(&psk_addr, &id_of(C, &inv_c.id, &key_b), &psk_b)
            .await
            .is_err()
    );
    assert_eq!(rb.psk_identity, id_of(B, &inv_b.id, &key_b).to_string());

    // CCF-A tells its AEF that B revoked an invoker whose id is C's invoker's id.
    let ccf_a = t.d(A).issue(Role::Ccf);
    let aef_addr = t.d(A).aefs["aef-a1"].security_addr;
    let mut as_ccf = AefSecurityClient::new(
        channel(
            aef_addr,
            &t.d(A).ca_pem(),
            Some((&ccf_a.cert_pem, &ccf_a.key_pem)),
            t.d(A).aef_peer("aef-a1"),
        )
        .await,
    );
    let rsp = as_ccf
        .revoke_authorization(pb::RevokeAuthorizationReq {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: inv_c.id.clone(),
                home_ccf_id: B.into(),
                aef_id: "aef-a1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rsp.connections_closed, 0);
    assert!(
        psk_call(&psk_addr, &id_of(C, &inv_c.id, &key_c), &psk_c)
            .await
            .is_ok(),
        "C's invoker was touched by a notice about B's"
    );
    // The same notice about B's own invoker takes effect.
    as_ccf
        .revoke_authorization(pb::RevokeAuthorizationReq {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: inv_b.id.clone(),
                home_ccf_id: B.into(),
                aef_id: "aef-a1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        psk_call(&psk_addr, &id_of(B, &inv_b.id, &key_b), &psk_b)
            .await
            .is_err()
    );
    assert!(
        psk_call(&psk_addr, &id_of(C, &inv_c.id, &key_c), &psk_c)
            .await
            .is_ok()
    );
}
