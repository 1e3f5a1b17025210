//! Two CCF replicas of one domain on one PostgreSQL database and one state directory (the
//! domain CA shared as files): any replica answers any request. An invoker onboarded at replica
//! 1 negotiates at replica 2 and its key is served by replica 1; a revocation at replica 2 is
//! seen at replica 1; a token signing key rotated at replica 2 is published by replica 1 at
//! once and signs there within the refresh interval; and an onboarding acknowledged by a
//! replica that then stops is usable at the other.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use capif_proto::v1 as pb;
use capif_testkit::ccf::*;
use ccf_core::pg::{DatabaseUrl, StoreBackend, StoreConfig};

/// A replica's config: the shared state directory and database, its own ports.
fn replica_config(dir: &std::path::Path, url: &str) -> capif_ccf::config::CcfConfig {
    let mut c = config(dir, 600);
    c.store = StoreConfig {
        backend: StoreBackend::Postgres,
        url: Some(DatabaseUrl::new(url)),
        pool_size: 3,
    };
    c
}

async fn replica(dir: &std::path::Path, url: &str) -> TestCcf {
    let ccf = capif_ccf::server::start(replica_config(dir, url))
        .await
        .unwrap();
    // `TestCcf` owns a directory; a replica's is the shared one, held by the test.
    TestCcf {
        ccf,
        dir: tempfile::tempdir().unwrap(),
    }
}

/// aef-weather revokes `inv`'s authorization through replica `at` (CAPIF-3).
async fn revoke_weather(at: &TestCcf, inv: &Invoker) {
    aef_client(at, "aef-weather")
        .await
        .revoke_authorization(pb::RevokeAuthorizationRequest {
            revoke_info: Some(pb::SecurityNotification {
                api_invoker_id: inv.id.clone(),
                aef_id: "aef-weather".into(),
                cause: pb::Cause::UnexpectedReason as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_answers_any_request() {
    let url = capif_testkit::postgres::fresh_database();
    let shared = tempfile::tempdir().unwrap();
    // Replica 1 first: it creates the domain CA in the shared directory.
    let one = replica(shared.path(), &url).await;
    let two = replica(shared.path(), &url).await;
    assert_eq!(one.ca_pem(), two.ca_pem(), "one domain CA");

    // Onboarded at 1, CAPIF-1e at 2, the key served by 1.
    let inv = onboard(&one, CREDENTIALS[0]).await.unwrap();
    let mut s = capif1e(&two, &inv).await;
    let sec = s.obtain(&inv, &["aef-weather"]).await.unwrap();
    let key_id = sec.security_info[0].aef_psk_key_id.clone();
    assert!(!key_id.is_empty());
    let mut at_one = aef_client(&one, "aef-weather").await;
    let info = get_info(&mut at_one, &inv.id, "aef-weather").await.unwrap();
    assert_eq!(info.key_id, key_id, "replica 1 serves replica 2's key");
    // The credential is used at both.
    let e = onboard(&two, CREDENTIALS[0]).await.err().unwrap();
    assert_eq!(reason(&e), "ONBOARDING_CREDENTIAL_INVALID");

    // Revoked through replica 2 (the AEF's own call), gone at replica 1.
    revoke_weather(&two, &inv).await;
    let e = get_info(&mut at_one, &inv.id, "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "NO_SECURITY_CONTEXT");

    // A token signing key rotated at replica 2: published by replica 1 at once (it reads the
    // set before publishing), current there within the refresh interval.
    let old = one.ccf.state.token_keys.current_kid();
    let two_state = &two.ccf.state;
    let new = two_state
        .store
        .rotate_token_key(&two_state.token_keys, 600, ccf_core::clock::now_ms())
        .await
        .unwrap();
    let published: Vec<String> = one
        .ccf
        .state
        .own_key_set()
        .await
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(published, [old, new.clone()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while one.ccf.state.token_keys.current_kid() != new {
        assert!(
            Instant::now() < deadline,
            "replica 1 never signed with the new key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An onboarding acknowledged by replica 1, which then stops: usable at replica 2.
    let late = onboard(&one, CREDENTIALS[1]).await.unwrap();
    one.ccf.shutdown().await;
    let mut s = capif1e(&two, &late).await;
    let sec = s.obtain(&late, &["aef-location"]).await.unwrap();
    assert!(!sec.security_info[0].aef_psk_key_id.is_empty());
}

/// The database goes away under a running CCF (every connection cut, new ones refused, as in a
/// failover): onboarding is answered `UNAVAILABLE` / `STORE_FAILURE` and changes nothing; once
/// the database is back, the same CCF (not restarted) onboards with the same credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_and_the_ccf_recovers_by_itself() {
    let url = capif_testkit::postgres::fresh_database();
    let db = url.rsplit('/').next().unwrap().to_string();
    let shared = tempfile::tempdir().unwrap();
    let one = replica(shared.path(), &url).await;
    onboard(&one, CREDENTIALS[0]).await.unwrap();

    let admin_url = capif_testkit::postgres::shared().url();
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
        ))
        .await
        .unwrap();
    let e = onboard(&one, CREDENTIALS[1]).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(reason(&e), "STORE_FAILURE");

    admin
        .batch_execute(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let back = onboard(&one, CREDENTIALS[1]).await.unwrap();
    let mut s = capif1e(&one, &back).await;
    s.obtain(&back, &["aef-weather"]).await.unwrap();
}

/// A fake gateway that records the revocation notices published to it.
struct RecordingGateway(tokio::sync::mpsc::UnboundedSender<pb::RevocationNotice>);

fn not_here() -> tonic::Status {
    tonic::Status::unimplemented("not part of this test")
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for RecordingGateway {
    async fn fetch_security_information(
        &self,
        _: tonic::Request<pb::SecurityInformationQuery>,
    ) -> Result<tonic::Response<pb::InvokerSecurityInformation>, tonic::Status> {
        Err(not_here())
    }
    async fn publish_revocation(
        &self,
        request: tonic::Request<pb::RevocationNotice>,
    ) -> Result<tonic::Response<pb::RevocationAck>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(pb::RevocationAck::default()))
    }
    async fn evict_partner_invoker(
        &self,
        _: tonic::Request<pb::RevocationNotice>,
    ) -> Result<tonic::Response<pb::RevocationAck>, tonic::Status> {
        Err(not_here())
    }
    async fn fetch_token_key_set(
        &self,
        _: tonic::Request<pb::TokenKeySetRequest>,
    ) -> Result<tonic::Response<pb::TokenKeySet>, tonic::Status> {
        Err(not_here())
    }
}

/// A revocation notice queued by a replica that could not deliver it and then stopped is
/// delivered by the other replica, which was idle (it had nothing of its own to send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_a_stopped_replica_queued_is_delivered_by_the_other() {
    use ccf_core::identity::{PeerIdentity, Role};
    let url = capif_testkit::postgres::fresh_database();
    let shared = tempfile::tempdir().unwrap();
    let gateway_at = |addr: String| capif_ccf::config::GatewayLinkConfig {
        address: addr,
        addresses: Vec::new(),
        server_name: "localhost".into(),
    };
    // Replica 1's gateway is a port where nothing listens: it queues and cannot deliver.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let mut c1 = replica_config(shared.path(), &url);
    c1.gateway = Some(gateway_at(dead_addr));
    let one = TestCcf {
        ccf: capif_ccf::server::start(c1).await.unwrap(),
        dir: tempfile::tempdir().unwrap(),
    };

    // Replica 2's gateway records what it is given.
    let ca = &one.ccf.state.ca;
    let gw = ca
        .issue_with_new_key(
            &PeerIdentity::new(one.ccf.state.ccf_id.clone(), Role::Gateway),
            &["localhost".to_string()],
            1,
        )
        .unwrap();
    let roots = ccf_core::tls::certs_from_pem("CA", ca.cert_pem()).unwrap();
    let tls = ccf_core::tls::server_config(
        &format!("{}{}", gw.cert_pem, ca.cert_pem()),
        &gw.key_pem,
        ccf_core::tls::ClientAuth::Required(&roots),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_addr = listener.local_addr().unwrap().to_string();
    let (tx, mut published) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    ccf_core::grpc::spawn_server(
        listener,
        tls,
        false,
        tonic::service::Routes::new(pb::gateway_server::GatewayServer::new(RecordingGateway(tx))),
        ccf_core::limits::ConnGate::new("recording-gateway", Default::default()),
        async {
            let _ = stop_rx.await;
        },
    );
    let mut c2 = replica_config(shared.path(), &url);
    c2.gateway = Some(gateway_at(gw_addr));
    let two = capif_ccf::server::start(c2).await.unwrap();

    // Negotiated and revoked at replica 1, which then stops with the notice undelivered.
    let inv = onboard(&one, CREDENTIALS[0]).await.unwrap();
    capif1e(&one, &inv)
        .await
        .obtain(&inv, &["aef-weather"])
        .await
        .unwrap();
    revoke_weather(&one, &inv).await;
    one.ccf.shutdown().await;

    let notice = tokio::time::timeout(Duration::from_secs(10), published.recv())
        .await
        .expect("replica 2 never delivered the notice replica 1 queued")
        .unwrap();
    assert_eq!(notice.api_invoker_id, inv.id);
    assert_eq!(notice.aef_ids, ["aef-weather"]);
    two.shutdown().await;
    let _ = stop_tx.send(());
}
