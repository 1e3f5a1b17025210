//! The real grpcurl lists the gateway's services and reads the admin counters, with
//! an operator certificate of the domain, as an operator would.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use capif_testkit::federation::*;
use capif_testkit::grpcurl::grpcurl_ok;
use ccf_core::identity::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_and_reads_counters() {
    let t = Testbed::start(Options::default()).await;
    let (a, b) = (t.d("operator-a.test"), t.d("operator-b.test"));
    let mut inv = onboard(b, "c0").await;
    inv.obtain_psk("aef-a1").await;
    let mut aef_a = aef(a, "aef-a1").await;
    for _ in 0..3 {
        ask(
            &mut aef_a,
            "aef-a1",
            &inv.id,
            "operator-b.test",
            "",
            Duration::from_secs(3),
        )
        .await
        .unwrap();
    }
    let op = a.issue(Role::Operator);
    let dir = t.tmp.path();
    std::fs::write(dir.join("op.pem"), &op.cert_pem).unwrap();
    std::fs::write(dir.join("op.key"), op.key_pem.as_bytes()).unwrap();
    let (ca, cert, key) = (
        path(&a.dir.join("ca.pem")),
        path(&dir.join("op.pem")),
        path(&dir.join("op.key")),
    );
    let addr = a.gw().capif6_addr.to_string();
    let tls = [
        "-cacert",
        ca.as_str(),
        "-cert",
        cert.as_str(),
        "-key",
        key.as_str(),
    ];
    let run = |extra: &[&str]| grpcurl_ok(&[&tls[..], extra].concat());

    let list = run(&[&addr, "list"]);
    for svc in [
        "capif.v1.Gateway",
        "capif.v1.GatewayAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(list.lines().any(|l| l == svc), "{svc} missing:\n{list}");
    }
    let status = run(&[&addr, "capif.v1.GatewayAdmin/GetStatus"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["ccfId"], "operator-a.test");
    assert_eq!(v["cacheMisses"], "1", "{status}");
    assert_eq!(v["cacheHits"], "2", "{status}");
    assert_eq!(v["partners"][0]["ccfId"], "operator-b.test");
    assert!(
        v["partners"][0]["resolvedTargets"][0]
            .as_str()
            .unwrap()
            .contains("gw.operator-b.test")
    );

    let purged = run(&[
        "-d",
        &format!(r#"{{"api_invoker_id":"{}"}}"#, inv.id),
        &addr,
        "capif.v1.GatewayAdmin/Purge",
    ]);
    assert!(purged.contains(r#""purged": "1""#), "{purged}");

    // The CAPIF-6e listener answers grpcurl too (with a partner's certificate).
    let gw_b = b.issue(Role::Gateway);
    std::fs::write(dir.join("gwb.pem"), &gw_b.cert_pem).unwrap();
    std::fs::write(dir.join("gwb.key"), gw_b.key_pem.as_bytes()).unwrap();
    let list = grpcurl_ok(&[
        "-cacert",
        &ca,
        "-cert",
        &path(&dir.join("gwb.pem")),
        "-key",
        &path(&dir.join("gwb.key")),
        &a.gw().capif6e_addr.to_string(),
        "list",
    ]);
    assert!(list.lines().any(|l| l == "capif.v1.Interconnect"), "{list}");
}
