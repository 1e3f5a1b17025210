//! After an acknowledged onboarding and security-method call, SIGKILL the `ccf`
//! process and restart it: the invoker and its key are still there with the right remaining
//! validity. Run on both store backends: the redb file, and PostgreSQL (`CCF_STORE_URL`, a
//! fresh database of this binary's `capif_testkit::postgres` server).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use capif_proto::v1::{
    self as pb, invoker_management_client::InvokerManagementClient, security_client::SecurityClient,
};
use capif_testkit::ccf::*;
use ccf_core::identity::Role;
use ccf_core::ids::AefId;

#[tokio::test]
async fn acknowledged_state_survives_sigkill() {
    survives_sigkill(&[]).await;
}

#[tokio::test]
async fn acknowledged_state_survives_sigkill_on_postgres() {
    let url = capif_testkit::postgres::fresh_database();
    let dir = survives_sigkill(&[("CCF_STORE_URL", std::ffi::OsStr::new(&url))]).await;
    assert!(
        !dir.path()
            .join("state")
            .join(capif_ccf::server::STORE_FILE)
            .exists(),
        "the state went to the database, not to a redb file"
    );
}

/// The crash and restart, with `env` set for both `ccf` processes. Returns the directory that
/// holds the config and `state/`.
async fn survives_sigkill(env: &[(&str, &std::ffi::OsStr)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("ccf.toml");
    std::fs::write(&cfg, config_text(&state, 600)).unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_ccf"));

    let mut p = CcfProcess::spawn_with_env(bin, &cfg, env);
    let v = process_view(&p, &state);
    let key = rcgen::KeyPair::generate().unwrap();
    let (ch, _) = channel(v.onboarding, &v.ca_pem(), None).await.unwrap();
    let onboarded = InvokerManagementClient::new(ch)
        .onboard(pb::OnboardRequest {
            onboarding_information: Some(pb::OnboardingInformation {
                api_invoker_public_key: key.public_key_pem(),
                onboarding_credential: CREDENTIALS[0].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key_pem = key.serialize_pem();
    let (ch, slot) = channel(
        v.capif,
        &v.ca_pem(),
        Some((&onboarded.api_invoker_certificate, &key_pem)),
    )
    .await
    .unwrap();
    let answer = SecurityClient::new(ch)
        .obtain_security_method(pb::ObtainSecurityMethodRequest {
            api_invoker_id: onboarded.api_invoker_id.clone(),
            service_security: Some(pb::ServiceSecurity {
                security_info: vec![pb::SecurityInformation {
                    aef_id: "aef-weather".into(),
                    pref_security_methods: vec![pb::SecurityMethod::Psk as i32],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let binding = slot.lock().unwrap().binding.clone().unwrap();
    let expected = binding
        .aefpsk(&answer.security_info[0].interface_canonical)
        .unwrap();

    // Acknowledged: now crash without any chance to flush.
    p.sigkill();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let p = CcfProcess::spawn_with_env(bin, &cfg, env);
    let v = process_view(&p, &state);

    let aef = v.issue(Role::Aef(AefId::new("aef-weather").unwrap()));
    let (ch, _) = channel(v.capif, &v.ca_pem(), Some((&aef.cert_pem, &aef.key_pem)))
        .await
        .unwrap();
    let mut c = SecurityClient::new(ch);
    let info = get_info(&mut c, &onboarded.api_invoker_id, "aef-weather")
        .await
        .expect("the invoker and its key survived the crash");
    assert_eq!(info.aef_psk.as_slice(), expected.expose().as_slice());
    assert!(
        info.remaining_validity_ms < 600_000 - 1000 && info.remaining_validity_ms > 500_000,
        "remaining validity must keep counting across the restart: {}",
        info.remaining_validity_ms
    );
    // The invoker's certificate still opens CAPIF-1e after the restart.
    let (ch, _) = channel(
        v.capif,
        &v.ca_pem(),
        Some((&onboarded.api_invoker_certificate, &key_pem)),
    )
    .await
    .unwrap();
    let again = SecurityClient::new(ch)
        .update_security_method(pb::ObtainSecurityMethodRequest {
            api_invoker_id: onboarded.api_invoker_id.clone(),
            service_security: Some(pb::ServiceSecurity {
                security_info: vec![pb::SecurityInformation {
                    aef_id: "aef-weather".into(),
                    pref_security_methods: vec![pb::SecurityMethod::Psk as i32],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await;
    assert!(again.is_ok(), "{again:?}");
    drop(p);
    dir
}
