//! Onboarding with a good credential yields a working client certificate; a bad or
//! reused credential is refused and leaves the store unchanged.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use capif_testkit::ccf::*;
use tonic::Code;

#[tokio::test]
async fn good_credential_yields_a_working_client_certificate() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0])
        .await
        .expect("onboarding succeeds");
    assert!(inv.id.starts_with("inv-"));
    let der = rustls_pki_types::CertificateDer::from(
        ccf_core::tls::certs_from_pem("cert", &inv.cert_pem).unwrap()[0].to_vec(),
    );
    let named = ccf_core::identity::PeerIdentity::from_certificate(&der).unwrap();
    assert_eq!(named.uri(), format!("capif://{CCF}/invoker/{}", inv.id));

    // The certificate opens CAPIF-1e: a security-method call succeeds over mutual TLS.
    let mut s = capif1e(&t, &inv).await;
    let rsp = s
        .obtain(&inv, &["aef-weather"])
        .await
        .expect("CAPIF-1e works");
    assert_eq!(rsp.security_info.len(), 1);
    assert_eq!(t.ccf.state.store.invoker_count().await.unwrap(), 1);
}

#[tokio::test]
async fn bad_and_reused_credentials_store_nothing() {
    let t = start(3600).await;
    let store = &t.ccf.state.store;

    let bad = onboard(&t, "not-a-credential")
        .await
        .err()
        .expect("refused");
    assert_eq!(bad.code(), Code::Unauthenticated);
    assert_eq!(reason(&bad), "ONBOARDING_CREDENTIAL_INVALID");
    assert_eq!(
        store.invoker_count().await.unwrap(),
        0,
        "a refused onboarding stored an invoker"
    );

    onboard(&t, CREDENTIALS[1])
        .await
        .expect("first use succeeds");
    let reused = onboard(&t, CREDENTIALS[1])
        .await
        .err()
        .expect("reuse refused");
    assert_eq!(reused.code(), Code::Unauthenticated);
    assert_eq!(reason(&reused), "ONBOARDING_CREDENTIAL_INVALID");
    assert_eq!(
        store.invoker_count().await.unwrap(),
        1,
        "a reused credential stored an invoker"
    );
    assert!(
        !reused.message().contains(CREDENTIALS[1]),
        "the error echoes the secret"
    );
}

#[tokio::test]
async fn a_malformed_public_key_is_invalid_argument_and_burns_no_credential() {
    let t = start(3600).await;
    let (ch, _) = channel(t.ccf.onboarding_addr, &t.ca_pem(), None)
        .await
        .unwrap();
    let err = capif_proto::v1::invoker_management_client::InvokerManagementClient::new(ch)
        .onboard(capif_proto::v1::OnboardRequest {
            onboarding_information: Some(capif_proto::v1::OnboardingInformation {
                api_invoker_public_key:
                    "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into(),
                onboarding_credential: CREDENTIALS[2].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "INVALID_FIELD");
    assert_eq!(t.ccf.state.store.invoker_count().await.unwrap(), 0);
    // The credential was not consumed by the failed attempt.
    onboard(&t, CREDENTIALS[2])
        .await
        .expect("credential still usable");
}

#[tokio::test]
async fn offboarding_removes_the_invoker_and_its_contexts() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let mut s = capif1e(&t, &inv).await;
    s.obtain(&inv, &["aef-weather", "aef-location"])
        .await
        .unwrap();
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 2);

    let (ch, _) = channel(
        t.ccf.capif_addr,
        &t.ca_pem(),
        Some((&inv.cert_pem, &inv.key_pem)),
    )
    .await
    .unwrap();
    let mut im = capif_proto::v1::invoker_management_client::InvokerManagementClient::new(ch);
    let rsp = im
        .offboard(capif_proto::v1::OffboardRequest {
            api_invoker_id: inv.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rsp.security_contexts_removed, 2);
    assert_eq!(t.ccf.state.store.invoker_count().await.unwrap(), 0);
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 0);

    // The AEF can no longer get the key, and the old certificate no longer opens CAPIF-1e calls.
    let mut aef = aef_client(&t, "aef-weather").await;
    let e = get_info(&mut aef, &inv.id, "aef-weather")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "INVOKER_NOT_FOUND");
    let e = s.obtain(&inv, &["aef-weather"]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}
