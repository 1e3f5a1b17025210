//! The real grpcurl against a running `ccf`: `list` shows the services, `describe`
//! shows documented messages, health reports SERVING. grpcurl is installed by the project's own
//! `scripts/install-grpcurl.sh` when it is not on hand; a missing grpcurl fails the test.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;

use capif_testkit::ccf::*;
use ccf_core::identity::Role;

fn run(args: &[&str]) -> String {
    capif_testkit::grpcurl::grpcurl_ok(args)
}

#[tokio::test]
async fn grpcurl_lists_describes_and_checks_health() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("ccf.toml");
    std::fs::write(&cfg, config_text(&state, 600)).unwrap();
    let p = CcfProcess::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_ccf")), &cfg);
    let v = process_view(&p, &state);
    let op = v.issue(Role::Operator);
    let files = dir.path();
    std::fs::write(files.join("ca.pem"), v.ca_pem()).unwrap();
    std::fs::write(files.join("op.pem"), &op.cert_pem).unwrap();
    std::fs::write(files.join("op.key"), op.key_pem.as_bytes()).unwrap();
    let ca = files.join("ca.pem");
    let cert = files.join("op.pem");
    let key = files.join("op.key");
    let capif = v.capif.to_string();
    let tls = [
        "-cacert",
        ca.to_str().unwrap(),
        "-cert",
        cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        tls.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let call = |extra: &[&str]| {
        let a = with(extra);
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let list = call(&[&capif, "list"]);
    for svc in [
        "capif.v1.Security",
        "capif.v1.InvokerManagement",
        "capif.v1.Federation",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.lines().any(|l| l == svc),
            "{svc} missing from:\n{list}"
        );
    }

    let described = call(&[&capif, "describe", "capif.v1.InvokerSecurityInformation"]);
    assert!(described.contains("bytes aef_psk"), "{described}");
    assert!(
        described.contains("Remaining validity of the key"),
        "field comments missing:\n{described}"
    );
    let svc = call(&[&capif, "describe", "capif.v1.Security"]);
    assert!(
        svc.contains("rpc GetSecurityInformation") && svc.contains("Obtain_API_Invoker_Info"),
        "{svc}"
    );

    let health = call(&[
        "-d",
        r#"{"service":"capif.v1.Security"}"#,
        &capif,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");

    // The onboarding listener needs no client certificate.
    let onboarding = v.onboarding.to_string();
    let list = run(&["-cacert", ca.to_str().unwrap(), &onboarding, "list"]);
    assert!(
        list.lines().any(|l| l == "capif.v1.InvokerManagement"),
        "{list}"
    );

    // A stable reason reaches grpcurl users too.
    let out = Command::new(capif_testkit::grpcurl::grpcurl())
        .args(with(&[
            "-d",
            r#"{"api_invoker_id":"inv-x","aef_id":"aef-weather"}"#,
            &capif,
            "capif.v1.Security/GetSecurityInformation",
        ]))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("PermissionDenied") && text.contains("may not"),
        "{text}"
    );
}
