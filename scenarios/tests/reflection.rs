//! What grpcurl users see on every listener of a federation: `list` names exactly the services
//! that listener serves (plus health and reflection), never the rest of the contract that would
//! answer `Unimplemented` there; health says SERVING for each served service and NOT_FOUND for
//! one served elsewhere. CCF (both listeners), gateway (CAPIF-6 and CAPIF-6e) and AEF.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::process::Command;

use capif_testkit::federation::*;
use capif_testkit::grpcurl::{grpcurl, grpcurl_ok};
use ccf_core::identity::Role;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";

/// The services `grpcurl list` shows, without the reflection services themselves.
fn listed(tls: &[&str], addr: &str) -> BTreeSet<String> {
    grpcurl_ok(&[tls, &[addr, "list"]].concat())
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("grpc.reflection."))
        .map(str::to_owned)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// `grpc.health.v1.Health/Check` of `service`: the status word, or grpcurl's error code.
fn health(tls: &[&str], addr: &str, service: &str) -> String {
    let body = format!(r#"{{"service":"{service}"}}"#);
    let out = Command::new(grpcurl())
        .args(tls)
        .args(["-d", &body, addr, "grpc.health.v1.Health/Check"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_lists_only_what_it_serves() {
    let t = Testbed::start(Options {
        with_aefs: true,
        ..Default::default()
    })
    .await;
    let (a, b) = (t.d(A), t.d(B));
    let dir = t.tmp.path();
    let write = |name: &str, c: &ccf_core::pki::IssuedCredential| {
        std::fs::write(dir.join(format!("{name}.pem")), &c.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), c.key_pem.as_bytes()).unwrap();
        (
            path(&dir.join(format!("{name}.pem"))),
            path(&dir.join(format!("{name}.key"))),
        )
    };
    let ca = path(&a.dir.join("ca.pem"));
    let (op_cert, op_key) = write("op", &a.issue(Role::Operator));
    let operator = [
        "-cacert",
        ca.as_str(),
        "-cert",
        op_cert.as_str(),
        "-key",
        op_key.as_str(),
    ];

    let ccf = a.ccf().capif_addr.to_string();
    assert_eq!(
        listed(&operator, &ccf),
        set(&[
            "capif.v1.CcfAdmin",
            "capif.v1.Federation",
            "capif.v1.InvokerManagement",
            "capif.v1.Security",
            "grpc.health.v1.Health",
        ])
    );
    assert!(health(&operator, &ccf, "capif.v1.Security").contains("SERVING"));
    let elsewhere = health(&operator, &ccf, "capif.v1.Interconnect");
    assert!(elsewhere.contains("NotFound"), "{elsewhere}");

    let onboarding = a.ccf().onboarding_addr.to_string();
    assert_eq!(
        listed(&["-cacert", ca.as_str()], &onboarding),
        set(&["capif.v1.InvokerManagement", "grpc.health.v1.Health"])
    );

    let gw6 = a.gw().capif6_addr.to_string();
    assert_eq!(
        listed(&operator, &gw6),
        set(&[
            "capif.v1.Gateway",
            "capif.v1.GatewayAdmin",
            "grpc.health.v1.Health"
        ])
    );
    let elsewhere = health(&operator, &gw6, "capif.v1.Security");
    assert!(elsewhere.contains("NotFound"), "{elsewhere}");

    // CAPIF-6e answers a partner's gateway only.
    let (pg_cert, pg_key) = write("gwb", &b.issue(Role::Gateway));
    let partner = [
        "-cacert",
        ca.as_str(),
        "-cert",
        pg_cert.as_str(),
        "-key",
        pg_key.as_str(),
    ];
    assert_eq!(
        listed(&partner, &a.gw().capif6e_addr.to_string()),
        set(&["capif.v1.Interconnect", "grpc.health.v1.Health"])
    );

    let aef = a.aefs["aef-a1"].security_addr.to_string();
    assert_eq!(
        listed(&["-cacert", ca.as_str()], &aef),
        set(&["capif.v1.AefSecurity", "grpc.health.v1.Health"])
    );
    let elsewhere = health(&["-cacert", ca.as_str()], &aef, "capif.v1.DemoApi");
    assert!(elsewhere.contains("NotFound"), "{elsewhere}");
}
