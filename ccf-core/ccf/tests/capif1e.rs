//! CAPIF-1e refuses no certificate, a certificate from another CA, and a
//! certificate whose role is not invoker. Identity comes from the certificate only.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use capif_proto::v1::security_client::SecurityClient;
use capif_testkit::ccf::*;
use ccf_core::identity::{PeerIdentity, Role};
use ccf_core::ids::{AefId, ApiInvokerId, CcfId};
use ccf_core::pki::DomainCa;
use tonic::Code;

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    // TLS 1.3: the client's handshake completes before the server refuses, so the refusal shows
    // on the first call.
    let outcome = async {
        let (ch, _) = channel(t.ccf.capif_addr, &t.ca_pem(), None).await?;
        let mut s = Session {
            security: SecurityClient::new(ch),
            slot: Default::default(),
        };
        s.obtain(&inv, &["aef-weather"]).await.map_err(|e| e.into())
    }
    .await;
    let err: Box<dyn std::error::Error> = outcome.expect_err("no certificate must be refused");
    assert!(!err.to_string().is_empty());
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 0);
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    // Same domain name, same invoker id, but a CA the CCF does not know.
    let rogue = DomainCa::generate(&CcfId::new(CCF).unwrap()).unwrap();
    let forged = rogue
        .issue_with_new_key(
            &PeerIdentity::new(
                CcfId::new(CCF).unwrap(),
                Role::Invoker(ApiInvokerId::new(&inv.id).unwrap()),
            ),
            &[],
            1,
        )
        .unwrap();
    let outcome = async {
        let (ch, _) = channel(
            t.ccf.capif_addr,
            &t.ca_pem(),
            Some((&forged.cert_pem, &forged.key_pem)),
        )
        .await?;
        let mut s = Session {
            security: SecurityClient::new(ch),
            slot: Default::default(),
        };
        s.obtain(&inv, &["aef-weather"])
            .await
            .map_err(Box::<dyn std::error::Error>::from)
    }
    .await;
    assert!(
        outcome.is_err(),
        "a certificate from another CA was accepted"
    );
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 0);
}

#[tokio::test]
async fn certificate_whose_role_is_not_invoker_is_refused() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    for role in [
        Role::Aef(AefId::new("aef-weather").unwrap()),
        Role::Gateway,
        Role::Operator,
    ] {
        let cred = t.issue(role.clone());
        let (ch, _) = channel(
            t.ccf.capif_addr,
            &t.ca_pem(),
            Some((&cred.cert_pem, &cred.key_pem)),
        )
        .await
        .unwrap();
        let mut s = Session {
            security: SecurityClient::new(ch),
            slot: Default::default(),
        };
        // Even naming a real invoker in the request does not make the caller that invoker.
        let e = s.obtain(&inv, &["aef-weather"]).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "role {role:?}");
        assert_eq!(reason(&e), "ROLE_NOT_ALLOWED", "role {role:?}");
    }
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 0);

    // And an invoker may not read security information meant for AEFs.
    let (ch, _) = channel(
        t.ccf.capif_addr,
        &t.ca_pem(),
        Some((&inv.cert_pem, &inv.key_pem)),
    )
    .await
    .unwrap();
    let e = get_info(&mut SecurityClient::new(ch), &inv.id, "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "ROLE_NOT_ALLOWED");
}

#[tokio::test]
async fn request_fields_cannot_override_the_certificate() {
    let t = start(3600).await;
    let a = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let b = onboard(&t, CREDENTIALS[1]).await.unwrap();
    let mut s = capif1e(&t, &a).await;
    // Invoker A asks in B's name.
    let e = s.obtain(&b, &["aef-weather"]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), "IDENTITY_MISMATCH");

    // A certificate for an invoker id the CCF never onboarded is refused too.
    let ghost = t.issue(Role::Invoker(ApiInvokerId::new("inv-ghost").unwrap()));
    let (ch, _) = channel(
        t.ccf.capif_addr,
        &t.ca_pem(),
        Some((&ghost.cert_pem, &ghost.key_pem)),
    )
    .await
    .unwrap();
    let ghost_inv = Invoker {
        id: "inv-ghost".into(),
        cert_pem: String::new(),
        key_pem: String::new(),
    };
    let mut s = Session {
        security: SecurityClient::new(ch),
        slot: Default::default(),
    };
    let e = s.obtain(&ghost_inv, &["aef-weather"]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(reason(&e), "INVOKER_NOT_FOUND");
}
