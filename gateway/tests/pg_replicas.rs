//! Gateway replicas of one domain sharing one PostgreSQL database (`[store] backend =
//! "postgres"`, issue 17): real CCFs and gateways in one process (`capif_testkit::federation`),
//! the domain's first gateway restarted on a fresh database of this binary's PostgreSQL server
//! and a second gateway started beside it with the same configuration on other ports.
//! (1) A fetch record written through replica 1 is found by a revocation queued through replica
//! 2, and the notice reaches the partner. (2) A partner's notice accepted at replica 1 evicts
//! replica 2's cached key within 1 s: replica 2 then refuses instead of serving the old key.
//! `EvictPartnerInvoker` at replica 1 evicts at replica 2 too. (3) Rows a replica queued but
//! never delivered (it stopped) are delivered by another.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use capif_gateway::server::RunningGateway;
use capif_proto::v1::{self as pb, gateway_client::GatewayClient};
use capif_testkit::federation::*;
use ccf_core::pg::{DatabaseUrl, StoreBackend, StoreConfig};
use tonic::transport::Channel;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";
const T: Duration = Duration::from_secs(10);

/// `d`'s gateway restarted on a fresh database; its URL.
async fn on_fresh_database(t: &mut Testbed, d: &str) -> DatabaseUrl {
    let url = DatabaseUrl::new(capif_testkit::postgres::fresh_database());
    let dom = t.d_mut(d);
    dom.gw_config.store = StoreConfig {
        backend: StoreBackend::Postgres,
        url: Some(url.clone()),
        pool_size: 4,
    };
    dom.stop_gateway().await;
    dom.start_gateway().await;
    url
}

/// `d`'s gateway restarted on a fresh database, and a second replica of it on that database.
async fn two_replicas(t: &mut Testbed, d: &str) -> RunningGateway {
    on_fresh_database(t, d).await;
    let mut second = t.d(d).gw_config.clone();
    second.listen.capif6 = "127.0.0.1:0".into();
    second.listen.capif6e = "127.0.0.1:0".into();
    capif_gateway::server::start(second).await.unwrap()
}

/// `d`'s CCF talking CAPIF-6 to the gateway listening at `addr`.
async fn as_ccf(t: &Testbed, d: &str, addr: std::net::SocketAddr) -> GatewayClient<Channel> {
    let cred = t.d(d).issue(Role::Ccf);
    GatewayClient::new(
        channel(
            addr,
            &t.d(d).ca_pem(),
            Some((&cred.cert_pem, &cred.key_pem)),
            t.d(d).gw_peer(),
        )
        .await,
    )
}

/// What A's CCF asks its gateway for when one of its AEFs meets B's invoker `inv`.
fn query(inv: &str) -> pb::SecurityInformationQuery {
    pb::SecurityInformationQuery {
        api_invoker_id: inv.into(),
        home_ccf_id: B.into(),
        aef_id: "aef-a1".into(),
        ..Default::default()
    }
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (1) B's replicas share fetch records: A fetches B's invoker's key through replica 1 (the one
/// B's SRV record names); B's CCF publishes the revocation to replica 2, which finds A's record,
/// queues the notice for A and delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_written_at_one_replica_is_found_by_a_revocation_at_the_other() {
    let mut t = Testbed::start(Options::default()).await;
    let b2 = two_replicas(&mut t, B).await;
    let mut inv = onboard(t.d(B), "c0").await;
    let (_psk, key_id) = inv.obtain_psk("aef-a1").await;
    let mut ccf_a = as_ccf(&t, A, t.d(A).gw().capif6_addr).await;
    let info = ccf_a
        .fetch_security_information(query(&inv.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.key_id, key_id);
    assert_eq!(
        t.d(B)
            .gw()
            .state
            .partner_requests_served
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "replica 1 served it"
    );

    let mut ccf_b = as_ccf(&t, B, b2.capif6_addr).await;
    let ack = ccf_b
        .publish_revocation(pb::RevocationNotice {
            home_ccf_id: B.into(),
            api_invoker_id: inv.id.clone(),
            kind: pb::RevocationKind::AuthorizationRevoked as i32,
            notice_id: ccf_core::delivery::NoticeId::random().to_string(),
            not_after_unix_ms: ccf_core::clock::now_ms() + 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ack.duplicate, ack.forwarded),
        (false, 1),
        "replica 2 found A's fetch record"
    );
    let a = &t.d(A).gw().state;
    until("the notice reaches A's gateway", T, async || {
        a.revocations_received
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    b2.shutdown().await;
}

/// (2) A's replicas evict together: replica 2 caches B's invoker's key; B revokes the invoker,
/// and B's gateway notifies A's replica 1 (the one A's SRV record names); within 1 s of replica
/// 1 accepting it, replica 2 no longer serves the key: it asks B again and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_accepted_at_one_replica_evicts_at_the_other_within_a_second() {
    let mut t = Testbed::start(Options::default()).await;
    let a2 = two_replicas(&mut t, A).await;
    let mut inv = onboard(t.d(B), "c0").await;
    let (_psk, key_id) = inv.obtain_psk("aef-a1").await;
    let mut at_a2 = as_ccf(&t, A, a2.capif6_addr).await;
    for _ in 0..2 {
        let info = at_a2
            .fetch_security_information(query(&inv.id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.key_id, key_id);
    }
    let hits = a2
        .state
        .cache
        .counters
        .hits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(hits, 1, "replica 2 serves the key from its cache");

    // A's CCF evicts B's invoker at replica 1 (EvictPartnerInvoker, nothing durable): replica 2
    // drops it too, within 1 s, and its next answer comes from B again (a miss).
    let misses = || {
        a2.state
            .cache
            .counters
            .misses
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(misses(), 1);
    let mut at_a1 = as_ccf(&t, A, t.d(A).gw().capif6_addr).await;
    at_a1
        .evict_partner_invoker(pb::RevocationNotice {
            home_ccf_id: B.into(),
            api_invoker_id: inv.id.clone(),
            kind: pb::RevocationKind::AuthorizationRevoked as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    until(
        "replica 2 asks B again after an eviction at replica 1",
        Duration::from_secs(1),
        async || {
            at_a2
                .clone()
                .fetch_security_information(query(&inv.id))
                .await
                .unwrap();
            misses() == 2
        },
    )
    .await;

    // B revokes its invoker: B's gateway tells A's replica 1.
    let op = t.d(B).issue(Role::Operator);
    let mut b_ccf = pb::security_client::SecurityClient::new(
        channel(
            t.d(B).ccf().capif_addr,
            &t.d(B).ca_pem(),
            Some((&op.cert_pem, &op.key_pem)),
            t.d(B).ccf_peer(),
        )
        .await,
    );
    b_ccf
        .revoke_authorization(pb::RevokeAuthorizationRequest {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: inv.id.clone(),
                cause: pb::Cause::UnexpectedReason as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let a1 = &t.d(A).gw().state;
    until("replica 1 accepts B's notice", T, async || {
        a1.revocations_received
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    assert_eq!(
        a2.state
            .revocations_received
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the notice went to replica 1 only"
    );
    until(
        "replica 2 refuses instead of serving the revoked key",
        Duration::from_secs(1),
        async || {
            at_a2
                .clone()
                .fetch_security_information(query(&inv.id))
                .await
                .is_err()
        },
    )
    .await;
    a2.shutdown().await;
}

/// (3) A replica acknowledges a revocation (its rows committed) and stops before its outbox
/// delivers them; no request wakes the other replica's worker, which still finds the rows at its
/// next look at the shared outbox and delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_stopped_replica_queued_are_delivered_by_another() {
    let mut t = Testbed::start(Options::default()).await;
    let url = on_fresh_database(&mut t, B).await;
    let mut inv = onboard(t.d(B), "c0").await;
    inv.obtain_psk("aef-a1").await;
    let mut ccf_a = as_ccf(&t, A, t.d(A).gw().capif6_addr).await;
    ccf_a
        .fetch_security_information(query(&inv.id))
        .await
        .unwrap();
    // The replica that stops: its store alone, which queues and is gone.
    let gone = capif_gateway::store::RevocationStore::connect(&url, 1, 100)
        .await
        .unwrap();
    let id = ccf_core::delivery::NoticeId::random();
    let queued = gone
        .queue_for_fetchers(
            &pb::RevocationNotice {
                home_ccf_id: B.into(),
                api_invoker_id: inv.id.clone(),
                kind: pb::RevocationKind::AuthorizationRevoked as i32,
                notice_id: id.to_string(),
                not_after_unix_ms: ccf_core::clock::now_ms() + 60_000,
                ..Default::default()
            },
            &id,
            &inv.id.parse().unwrap(),
            ccf_core::clock::now_ms(),
            ccf_core::clock::now_ms() + 60_000,
            |_| true,
        )
        .await
        .unwrap();
    assert_eq!(queued, Some(vec![A.parse().unwrap()]));
    gone.close();
    let a = &t.d(A).gw().state;
    until("the other replica delivers the row", T, async || {
        a.revocations_received
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
}
