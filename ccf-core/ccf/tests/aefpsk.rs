//! An invoker client (tokio-rustls) and the CCF derive the same AEFPSK from one
//! CAPIF-1e session; it differs for another AEF and for another TLS session.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use capif_testkit::ccf::*;
use ccf_core::registry::Interface;

#[tokio::test]
async fn invoker_and_ccf_derive_the_same_aefpsk() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let mut s = capif1e(&t, &inv).await;
    let rsp = s.obtain(&inv, &["aef-weather"]).await.unwrap();
    let info = &rsp.security_info[0];
    assert_eq!(
        info.sel_security_method,
        capif_proto::v1::SecurityMethod::Psk as i32
    );
    assert_eq!(info.aef_psk_validity_secs, 3600);

    // The invoker computes P0 from the interface the CCF returned, with the same public code.
    let p0 = Interface::from_proto(info.interface_details.as_ref().unwrap())
        .canonical()
        .unwrap();
    assert_eq!(p0, "aef-weather.operator-a.test:8443/weather");
    assert_eq!(p0, info.interface_canonical);
    let mine = s.binding().aefpsk(&p0).unwrap();
    assert_eq!(mine.key_id(), info.aef_psk_key_id);

    // The CCF's copy, as the AEF receives it over CAPIF-3.
    let mut aef = aef_client(&t, "aef-weather").await;
    let theirs = get_info(&mut aef, &inv.id, "aef-weather").await.unwrap();
    assert_eq!(theirs.aef_psk.as_slice(), mine.expose().as_slice());
    assert_eq!(theirs.key_id, mine.key_id());
}

#[tokio::test]
async fn key_differs_per_aef_and_per_tls_session() {
    let t = start(3600).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let mut s1 = capif1e(&t, &inv).await;
    let r1 = s1
        .obtain(&inv, &["aef-weather", "aef-location"])
        .await
        .unwrap();
    let mut weather = aef_client(&t, "aef-weather").await;
    let mut location = aef_client(&t, "aef-location").await;
    let w1 = get_info(&mut weather, &inv.id, "aef-weather")
        .await
        .unwrap();
    let l1 = get_info(&mut location, &inv.id, "aef-location")
        .await
        .unwrap();
    assert_ne!(w1.aef_psk, l1.aef_psk, "two AEFs got the same key");
    assert_eq!(r1.security_info[1].aef_psk_key_id, l1.key_id);

    // A new TLS session: the invoker re-authenticates and gets a fresh key for the same AEF.
    let mut s2 = capif1e(&t, &inv).await;
    assert_ne!(s1.binding().session_id(), s2.binding().session_id());
    s2.obtain(&inv, &["aef-weather"]).await.unwrap();
    let w2 = get_info(&mut weather, &inv.id, "aef-weather")
        .await
        .unwrap();
    assert_ne!(w1.aef_psk, w2.aef_psk, "a new TLS session kept the old key");
    assert_ne!(
        w1.key_id, w2.key_id,
        "the key id did not change with the key"
    );
    let p0 = w2.interface_canonical.clone();
    assert_eq!(
        w2.aef_psk.as_slice(),
        s2.binding().aefpsk(&p0).unwrap().expose().as_slice()
    );
}

#[test]
fn cli_kdf_matches_the_python_vectors() {
    let text = include_str!("../../tests/vectors/aefpsk_vectors.json");
    let vectors: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
    for v in vectors.iter().take(3) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ccf"))
            .args(["kdf", "aefpsk", "--with-key-id"])
            .args(["--key", v["key_hex"].as_str().unwrap()])
            .args(["--session-id", v["session_id_hex"].as_str().unwrap()])
            .args(["--interface", v["interface"].as_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines,
            [
                v["aefpsk_hex"].as_str().unwrap(),
                v["key_id"].as_str().unwrap()
            ]
        );
    }
}

#[test]
fn python_script_reproduces_the_committed_vectors() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors");
    let out = std::process::Command::new("python3")
        .arg(format!("{dir}/aefpsk_vectors.py"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/vectors/aefpsk_vectors.json")).unwrap();
    assert_eq!(
        fresh, committed,
        "regenerate the vectors: the script and its output disagree"
    );
}
