//! The CAPIF-3 authorization matrix, and the partner-domain rule of invariant 1
//! (docs/ARCHITECTURE.md) on the CAPIF-6 side of the CCF.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use capif_proto::v1::{
    self as pb, federation_client::FederationClient, security_client::SecurityClient,
};
use capif_testkit::ccf::*;
use ccf_core::identity::Role;
use ccf_core::ids::AefId;
use tonic::Code;

#[tokio::test]
async fn right_aef_gets_key_with_a_countdown() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    capif1e(&t, &inv)
        .await
        .obtain(&inv, &["aef-weather"])
        .await
        .unwrap();
    let mut aef = aef_client(&t, "aef-weather").await;
    let first = get_info(&mut aef, &inv.id, "aef-weather").await.unwrap();
    assert_eq!(first.aef_psk.len(), 32);
    assert!(first.remaining_validity_ms <= 3_600_000 && first.remaining_validity_ms > 3_590_000);
    assert_eq!(first.allowed_api_names, ["weather-v1", "forecast-v1"]);
    assert_eq!(first.home_ccf_id, CCF);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = get_info(&mut aef, &inv.id, "aef-weather").await.unwrap();
    assert!(
        second.remaining_validity_ms + 1000 <= first.remaining_validity_ms,
        "validity does not count down: {} then {}",
        first.remaining_validity_ms,
        second.remaining_validity_ms
    );
    assert_eq!(first.aef_psk, second.aef_psk);
}

#[tokio::test]
async fn other_aef_is_denied() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    capif1e(&t, &inv)
        .await
        .obtain(&inv, &["aef-weather"])
        .await
        .unwrap();

    // aef-location asks for the invoker's key, which is bound to aef-weather.
    let mut other = aef_client(&t, "aef-location").await;
    let e = get_info(&mut other, &inv.id, "aef-location")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), "KEY_BOUND_TO_OTHER_AEF");
    // Naming the other AEF in the request does not help: the AEF is read from the certificate.
    let e = get_info(&mut other, &inv.id, "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), "IDENTITY_MISMATCH");
}

#[tokio::test]
async fn unknown_and_expired_invokers_get_distinct_reasons() {
    let t = start(1).await;
    let mut aef = aef_client(&t, "aef-weather").await;
    let e = get_info(&mut aef, "inv-nobody", "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(reason(&e), "INVOKER_NOT_FOUND");

    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let e = get_info(&mut aef, &inv.id, "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(reason(&e), "NO_SECURITY_CONTEXT");

    capif1e(&t, &inv)
        .await
        .obtain(&inv, &["aef-weather"])
        .await
        .unwrap();
    get_info(&mut aef, &inv.id, "aef-weather")
        .await
        .expect("valid for one second");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = get_info(&mut aef, &inv.id, "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "KEY_EXPIRED");

    let e = get_info(&mut aef, "bad/id", "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(reason(&e), "INVALID_FIELD");
}

#[tokio::test]
async fn foreign_invokers_need_an_interconnect() {
    let t = start(3600).await;
    let mut aef = aef_client(&t, "aef-weather").await;
    let e = aef
        .get_security_information(pb::GetSecurityInformationRequest {
            api_invoker_id: "inv-x".into(),
            aef_id: "aef-weather".into(),
            home_ccf_id: "operator-b.test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "NO_INTERCONNECT");
}

async fn federation(t: &TestCcf, role: Role) -> FederationClient<tonic::transport::Channel> {
    let cred = t.issue(role);
    let (ch, _) = channel(
        t.ccf.capif_addr,
        &t.ca_pem(),
        Some((&cred.cert_pem, &cred.key_pem)),
    )
    .await
    .unwrap();
    FederationClient::new(ch)
}

fn partner_query(partner: &str, invoker: &str, aef: &str) -> pb::PartnerSecurityInformationRequest {
    pb::PartnerSecurityInformationRequest {
        partner_ccf_id: partner.into(),
        query: Some(pb::SecurityInformationQuery {
            api_invoker_id: invoker.into(),
            home_ccf_id: CCF.into(),
            aef_id: aef.into(),
            presented_key_id: String::new(),
            security_method: 0,
        }),
    }
}

/// Invariant 1: a key is handed only to the domain that owns the AEF it is bound to.
#[tokio::test]
async fn partner_gets_keys_only_for_aefs_it_owns() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let mut s = capif1e(&t, &inv).await;
    s.obtain(&inv, &["aef-b-maps", "aef-weather"])
        .await
        .unwrap();
    let mut gw = federation(&t, Role::Gateway).await;

    // operator-b owns aef-b-maps: it gets the key, the same one the invoker derived.
    let ok = gw
        .get_security_information_for_partner(partner_query(
            "operator-b.test",
            &inv.id,
            "aef-b-maps",
        ))
        .await
        .expect("the owning partner gets the key")
        .into_inner();
    let p0 = ok.interface_canonical.clone();
    assert_eq!(
        ok.aef_psk.as_slice(),
        s.binding().aefpsk(&p0).unwrap().expose().as_slice()
    );

    // operator-c asks for the key bound to operator-b's AEF: denied.
    let e = gw
        .get_security_information_for_partner(partner_query(
            "operator-c.test",
            &inv.id,
            "aef-b-maps",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), "PARTNER_NOT_AUTHORIZED");

    // operator-b asks for the key bound to our own AEF: denied.
    let e = gw
        .get_security_information_for_partner(partner_query(
            "operator-b.test",
            &inv.id,
            "aef-weather",
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "PARTNER_NOT_AUTHORIZED");

    // The rule answers before the invoker is looked up: an unknown invoker looks the same.
    let e = gw
        .get_security_information_for_partner(partner_query(
            "operator-c.test",
            "inv-unknown",
            "aef-b-maps",
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "PARTNER_NOT_AUTHORIZED");

    // Only the domain's gateway may ask on behalf of partners.
    let mut aef = federation(&t, Role::Aef(AefId::new("aef-weather").unwrap())).await;
    let e = aef
        .get_security_information_for_partner(partner_query(
            "operator-b.test",
            &inv.id,
            "aef-b-maps",
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "ROLE_NOT_ALLOWED");
}

#[tokio::test]
async fn an_aef_may_revoke_only_its_own_authorization() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    capif1e(&t, &inv)
        .await
        .obtain(&inv, &["aef-weather", "aef-location"])
        .await
        .unwrap();
    let mut weather: SecurityClient<_> = aef_client(&t, "aef-weather").await;
    let revoke = |aef: &str| pb::RevokeAuthorizationRequest {
        revoke_info: Some(pb::SecurityNotification {
            api_invoker_id: inv.id.clone(),
            aef_id: aef.into(),
            cause: pb::Cause::UnexpectedReason as i32,
            ..Default::default()
        }),
    };
    let e = weather
        .revoke_authorization(revoke("aef-location"))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "IDENTITY_MISMATCH");
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 2);
    let n = weather
        .revoke_authorization(revoke(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.security_contexts_removed, 1);
    let e = get_info(&mut weather, &inv.id, "aef-weather")
        .await
        .unwrap_err();
    // The invoker still holds a key, but for aef-location only.
    assert_eq!(reason(&e), "KEY_BOUND_TO_OTHER_AEF");
    let mut location = aef_client(&t, "aef-location").await;
    get_info(&mut location, &inv.id, "aef-location")
        .await
        .expect("the other AEF keeps its key");
}
