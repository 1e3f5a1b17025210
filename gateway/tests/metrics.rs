//! The gateway's metrics in a running federation (three domains in process, real sockets): each
//! partner's series count what happened with that partner, on the asking and the answering
//! side, with the outcome's code and reason, hits and misses apart; and they follow the
//! federation: a reload that removes a partner removes every series of it at once (its
//! certificate expiry included), while the other partners' counters carry on.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use capif_proto::v1 as pb;
use capif_testkit::federation::*;
use ccf_core::metrics::encode_text;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";
const C: &str = "operator-c.test";
const T: Duration = Duration::from_secs(3);
const NO_POLL: &str = "[reload]\npoll_interval_ms = 0\n";

fn has(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_series_count_both_sides_and_follow_the_federation() {
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        reloadable: true,
        gateway_extra: NO_POLL.into(),
        ..Default::default()
    })
    .await;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    let mut inv_b = onboard(t.d(B), "c0").await;
    let (_, key_id) = inv_b.obtain_psk("aef-a1").await;
    // A miss, then a hit, for B's invoker; a definite refusal from C.
    for _ in 0..2 {
        ask(&mut aef_a, "aef-a1", &inv_b.id, B, "", T)
            .await
            .unwrap();
    }
    let e = ask(&mut aef_a, "aef-a1", "inv-00000000000000aa", C, "", T)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "INVOKER_NOT_FOUND", "{e:?}");

    let a = encode_text(&t.d(A).gw().metrics);
    for line in [
        r#"capif_gateway_requests_total{partner="operator-b.test",direction="outbound",rpc="FetchSecurityInformation",code="OK",reason="none"} 2"#,
        r#"capif_gateway_requests_total{partner="operator-c.test",direction="outbound",rpc="FetchSecurityInformation",code="NOT_FOUND",reason="INVOKER_NOT_FOUND"} 1"#,
        r#"capif_gateway_fetch_duration_seconds_count{partner="operator-b.test",cache="miss"} 1"#,
        r#"capif_gateway_fetch_duration_seconds_count{partner="operator-b.test",cache="hit"} 1"#,
        r#"capif_gateway_upstream_rq_time_seconds_count{partner="operator-b.test"} 1"#,
        r#"capif_gateway_partner_alive{partner="operator-b.test"} 1"#,
        r#"capif_gateway_partner_alive{partner="operator-c.test"} 1"#,
        "capif_gateway_cache_hits_total 1",
        "capif_gateway_cache_misses_total 2",
        r#"capif_tls_handshakes_total{listener="capif6",result="ok"} 1"#,
    ] {
        assert!(has(&a, line), "{line} not in A's exposition:\n{a}");
    }
    let b = encode_text(&t.d(B).gw().metrics);
    let served = r#"capif_gateway_requests_total{partner="operator-a.test",direction="inbound",rpc="FetchSecurityInformation",code="OK",reason="none"} 1"#;
    assert!(has(&b, served), "{b}");
    for text in [&a, &b] {
        assert!(
            !text.contains(&inv_b.id) && !text.contains(&key_id),
            "{text}"
        );
    }
    assert!(a.contains(r#"cert="partner_ca",partner="operator-c.test""#));

    // A removes C: every series of C goes; B's counters carry on.
    let block = Domain::partner_block(C, &t.d(C).dir.join("ca.pem"));
    t.d(A)
        .edit_gateway_toml(|s| s.replace(block.trim_start(), ""));
    let mut admin = t.d(A).gateway_admin().await;
    let r = admin
        .reload(pb::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.removed, [C], "{r:?}");
    let a = encode_text(&t.d(A).gw().metrics);
    assert!(!a.contains(C), "a removed partner's series stay:\n{a}");
    let first = r#"capif_gateway_requests_total{partner="operator-b.test",direction="outbound",rpc="FetchSecurityInformation",code="OK",reason="none"} 2"#;
    assert!(has(&a, first), "{a}");
    assert!(
        has(&a, r#"capif_gateway_reloads_total{result="ok"} 1"#),
        "{a}"
    );
}
