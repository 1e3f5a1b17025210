//! Live reconfiguration of running gateways (docs/OPERATIONS.md, "Reloading the configuration"):
//! a partner added, a partner's CA rotated with an overlap, the gateway's own certificate
//! renewed and broken files refused, all under a steady load of cross-domain PSK flows that must
//! not see one failure; a partner removed (cache evicted, calls refused, even on an open
//! connection); the file poll; a start while partners are down.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capif_proto::v1::{self as pb, interconnect_client::InterconnectClient};
use capif_testkit::federation::*;
use ccf_core::pki::DomainCa;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::Digest as _;
use tonic::Code;

const A: &str = "operator-a.test";
const B: &str = "operator-b.test";
const C: &str = "operator-c.test";
const D: &str = "operator-d.test";
const T: Duration = Duration::from_secs(3);

/// Flows of each home domain that must succeed after each change before the next one.
const PHASE: u64 = 8;

/// Every edit is applied by an explicit reload in these tests, unless the test is the poll's.
const NO_POLL: &str = "[reload]\npoll_interval_ms = 0\n";

/// Waits until `cond` holds, polling every 20 ms, for at most `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn id(s: &str) -> CcfId {
    CcfId::new(s).unwrap()
}

/// The `ca_cert = "..."` line that names `path`.
fn ca_line(path: &Path) -> String {
    format!("ca_cert = \"{}\"", path.display())
}

/// Flows of one home domain's invokers: successes, failures and the failures' messages.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

/// Waits until every home's successes grew by `n` since `from` (bounded), so that each change
/// is made and checked while flows are running.
async fn progress(tallies: &BTreeMap<&str, Arc<Tally>>, n: u64) {
    let from: BTreeMap<&str, u64> = tallies
        .iter()
        .map(|(h, t)| (*h, t.ok.load(Ordering::Relaxed)))
        .collect();
    eventually(Duration::from_secs(90), "flows keep succeeding", || {
        tallies
            .iter()
            .all(|(h, t)| t.ok.load(Ordering::Relaxed) >= from[h] + n)
    })
    .await;
}

async fn reload(
    admin: &mut pb::gateway_admin_client::GatewayAdminClient<tonic::transport::Channel>,
) -> pb::ReloadResponse {
    admin
        .reload(pb::ReloadRequest {})
        .await
        .expect("reload applied")
        .into_inner()
}

async fn status(
    admin: &mut pb::gateway_admin_client::GatewayAdminClient<tonic::transport::Channel>,
) -> pb::GatewayStatus {
    admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// A question a partner gateway may ask A about one of A's invokers; "inv-x" does not exist, so
/// an authenticated caller gets CCF-A's definite NOT_FOUND.
fn query_to_a() -> pb::SecurityInformationQuery {
    pb::SecurityInformationQuery {
        api_invoker_id: "inv-x".into(),
        home_ccf_id: A.into(),
        aef_id: "aef-b1".into(),
        presented_key_id: String::new(),
        security_method: 0,
    }
}

/// One CAPIF-6e call at A presenting `cert_pem`/`key_pem` on a new connection.
async fn ask_a_as(t: &Testbed, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    let cfg = ccf_core::tls::client_config(
        &t.d(A).ca_pem(),
        Some((cert_pem, key_pem)),
        t.d(A).gw_peer(),
    )
    .unwrap();
    let (ch, _) =
        ccf_core::tls::connect(&t.d(A).gw().capif6e_addr.to_string(), "localhost", cfg, T)
            .await
            .map_err(|e| format!("connect: {e}"))?;
    match InterconnectClient::new(ch)
        .fetch_security_information(query_to_a())
        .await
    {
        Ok(_) => Ok(()),
        // A reason means A's gateway authenticated the caller and CCF-A answered.
        Err(e) if e.code() == Code::NotFound => Ok(()),
        Err(e) => Err(format!("{:?} {} {}", e.code(), reason(&e), e.message())),
    }
}

/// The certificate a TLS server at `addr` presents (client identity `cert_pem`/`key_pem`).
async fn presented(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: (&str, &str),
    expected: ExpectedPeer,
) -> CertificateDer<'static> {
    let cfg = ccf_core::tls::client_config(ca_pem, Some(identity), expected).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn der(pem: &str) -> CertificateDer<'static> {
    ccf_core::tls::certs_from_pem("test", pem).unwrap()[0].clone()
}

/// Under load from B's and D's invokers at A's AEF: C added, B's CA rotated with an overlap,
/// A's own certificate renewed, two broken files refused. Not one flow of B or D fails, and each
/// change takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_changes_under_load_without_a_failed_flow() {
    let t = Arc::new(
        Testbed::start(Options {
            domains: vec![A, B, C, D],
            with_aefs: true,
            reloadable: true,
            not_partners: vec![(A, C)],
            gateway_extra: NO_POLL.into(),
            ..Default::default()
        })
        .await,
    );
    // The load: three invokers each of B and D run whole flows at A's AEF. Each flow takes a
    // new key at home, so the AEF and gateway-A fetch it again from the home domain through the
    // partner link; the pause keeps each invoker beyond the once-per-second refresh rule of the
    // AEF and the gateway (otherwise they would rightly serve the previous key).
    let stop = Arc::new(AtomicBool::new(false));
    let mut tallies: BTreeMap<&str, Arc<Tally>> = BTreeMap::new();
    let mut workers = tokio::task::JoinSet::new();
    for home in [B, D] {
        let tally = tallies.entry(home).or_default().clone();
        for cred in ["c0", "c1", "c2"] {
            let p = profile(&t, home, cred).await;
            let (t, stop, tally) = (t.clone(), stop.clone(), tally.clone());
            workers.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match psk_flow(&t, &p, "aef-a1", "api-aef-a1").await {
                        Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tally.errors.lock().unwrap().push(e);
                            tally.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                }
            });
        }
    }
    progress(&tallies, 6).await;
    let mut admin_a = t.d(A).gateway_admin().await;
    let mut admin_b = t.d(B).gateway_admin().await;

    // 1. C is added to A's file: C's invoker, refused before, works after the reload.
    let pc = profile(&t, C, "c0").await;
    let e = psk_flow(&t, &pc, "aef-a1", "api-aef-a1").await.unwrap_err();
    assert!(e.contains("UNKNOWN_PARTNER"), "{e}");
    let c_ca = t.d(C).dir.join("ca.pem");
    t.d(A)
        .edit_gateway_toml(|s| s + &Domain::partner_block(C, &c_ca));
    let r = reload(&mut admin_a).await;
    assert_eq!(r.added, [C], "{r:?}");
    assert!(
        r.removed.is_empty()
            && r.changed.is_empty()
            && !r.own_certificate_renewed
            && r.needs_restart.is_empty(),
        "{r:?}"
    );
    psk_flow(&t, &pc, "aef-a1", "api-aef-a1")
        .await
        .expect("C's invoker works at A once C is a partner");
    progress(&tallies, PHASE).await;

    // 2. B's interconnect CA is rotated with an overlap. (a) A trusts old + new for B.
    let new_ca = DomainCa::generate(&id(B)).unwrap();
    let (b_old_ca, both, only_new) = (
        t.d(B).dir.join("ca.pem"),
        t.d(A).dir.join("b-old-and-new.pem"),
        t.d(A).dir.join("b-new.pem"),
    );
    write_atomically(
        &both,
        format!("{}{}", t.d(B).ca_pem(), new_ca.cert_pem()).as_bytes(),
    );
    write_atomically(&only_new, new_ca.cert_pem().as_bytes());
    t.d(A)
        .edit_gateway_toml(|s| s.replace(&ca_line(&b_old_ca), &ca_line(&both)));
    let r = reload(&mut admin_a).await;
    assert_eq!(r.changed, [B], "{r:?}");
    assert!(r.added.is_empty() && r.removed.is_empty(), "{r:?}");
    let anchors = |st: &pb::GatewayStatus, p: &str| {
        st.partners
            .iter()
            .find(|s| s.ccf_id == p)
            .map(|s| s.trust_anchors.clone())
            .unwrap_or_default()
    };
    assert_eq!(anchors(&status(&mut admin_a).await, B).len(), 2);
    progress(&tallies, PHASE).await;
    // (b) B's gateway presents a certificate of the new CA to partners; its CCF still sees the
    // one of the domain CA.
    let (ic_cert, ic_key, ic) = t.d(B).gateway_credential(&new_ca, "interconnect");
    let b_key_line = format!("key = \"{}\"", t.d(B).dir.join("gateway.key").display());
    t.d(B).edit_gateway_toml(|s| {
        s.replace(
            &b_key_line,
            &format!(
                "{b_key_line}\ninterconnect_cert = \"{}\"\ninterconnect_key = \"{}\"",
                ic_cert.display(),
                ic_key.display()
            ),
        )
    });
    let r = reload(&mut admin_b).await;
    assert!(r.own_certificate_renewed && r.changed.is_empty(), "{r:?}");
    progress(&tallies, PHASE).await;
    // (c) A trusts only the new CA for B.
    t.d(A)
        .edit_gateway_toml(|s| s.replace(&ca_line(&both), &ca_line(&only_new)));
    let r = reload(&mut admin_a).await;
    assert_eq!(r.changed, [B], "{r:?}");
    let st = status(&mut admin_a).await;
    let b_anchors = anchors(&st, B);
    assert_eq!(b_anchors.len(), 1);
    assert_eq!(
        b_anchors[0].sha256,
        hex::encode(sha2::Sha256::digest(der(new_ca.cert_pem()).as_ref()))
    );
    progress(&tallies, PHASE).await;
    // A certificate of B's old CA is refused at A's CAPIF-6e now; the new one is admitted.
    let old = t.d(B).issue(Role::Gateway);
    let refused = ask_a_as(&t, &old.cert_pem, &old.key_pem).await;
    assert!(refused.is_err(), "B's old CA is still trusted at A");
    ask_a_as(&t, &ic.cert_pem, &ic.key_pem)
        .await
        .expect("B's new interconnect certificate is admitted at A");

    // 3. A's own certificate is renewed: new files, reload; both listeners present it.
    let (cert, key, renewed) = t.d(A).gateway_credential(&t.d(A).ca, "gateway-renewed");
    let op = t.d(A).issue(Role::Operator);
    let before = presented(
        t.d(A).gw().capif6_addr,
        &t.d(A).ca_pem(),
        (&op.cert_pem, &op.key_pem),
        t.d(A).gw_peer(),
    )
    .await;
    let (a_dir, a_cert_line, a_key_line) = (
        t.d(A).dir.clone(),
        |p: &Path| format!("cert = \"{}\"", p.display()),
        |p: &Path| format!("key = \"{}\"", p.display()),
    );
    t.d(A).edit_gateway_toml(|s| {
        s.replace(
            &a_cert_line(&a_dir.join("gateway.pem")),
            &a_cert_line(&cert),
        )
        .replace(&a_key_line(&a_dir.join("gateway.key")), &a_key_line(&key))
    });
    let r = reload(&mut admin_a).await;
    assert!(
        r.own_certificate_renewed && r.changed.is_empty() && r.added.is_empty(),
        "{r:?}"
    );
    let on6 = presented(
        t.d(A).gw().capif6_addr,
        &t.d(A).ca_pem(),
        (&op.cert_pem, &op.key_pem),
        t.d(A).gw_peer(),
    )
    .await;
    let on6e = presented(
        t.d(A).gw().capif6e_addr,
        &t.d(A).ca_pem(),
        (&ic.cert_pem, &ic.key_pem),
        t.d(A).gw_peer(),
    )
    .await;
    assert_ne!(before, der(&renewed.cert_pem));
    assert_eq!(
        on6,
        der(&renewed.cert_pem),
        "CAPIF-6 presents the renewed certificate"
    );
    assert_eq!(
        on6e,
        der(&renewed.cert_pem),
        "CAPIF-6e presents the renewed certificate"
    );
    progress(&tallies, PHASE).await;

    // 4. Broken files are refused as a whole; the running configuration serves on.
    let file = t.d(A).gw_file.clone().unwrap();
    let saved = std::fs::read_to_string(&file).unwrap();
    t.d(A)
        .edit_gateway_toml(|s| format!("{s}\n[[partner\nccf_id = \n"));
    let e = admin_a.reload(pb::ReloadRequest {}).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "CONFIG_REFUSED")
    );
    assert!(e.message().contains("gateway.toml"), "{}", e.message());
    write_atomically(&file, saved.as_bytes());
    let not_pem = t.d(A).dir.join("not-a-pem.pem");
    write_atomically(&not_pem, b"this is not a certificate\n");
    let d_ca = t.d(D).dir.join("ca.pem");
    t.d(A)
        .edit_gateway_toml(|s| s.replace(&ca_line(&d_ca), &ca_line(&not_pem)));
    let e = admin_a.reload(pb::ReloadRequest {}).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "CONFIG_REFUSED")
    );
    assert!(
        e.message().contains(D) && e.message().contains("not-a-pem.pem"),
        "{}",
        e.message()
    );
    let st = status(&mut admin_a).await;
    assert_eq!((st.reloads, st.reloads_refused), (4, 2), "{st:?}");
    assert!(st.last_reload_error.contains("not-a-pem.pem"), "{st:?}");
    assert_eq!(st.partners.len(), 3, "the running federation stays: {st:?}");
    progress(&tallies, PHASE).await;
    write_atomically(&file, saved.as_bytes());
    let r = reload(&mut admin_a).await;
    assert_eq!(
        r,
        pb::ReloadResponse::default(),
        "the restored file is what runs"
    );
    assert!(status(&mut admin_a).await.last_reload_error.is_empty());

    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}
    for (home, tally) in &tallies {
        let (ok, failed) = (
            tally.ok.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
        );
        let fetched = t
            .d(home)
            .ccf()
            .state
            .partner_requests
            .load(Ordering::Relaxed);
        eprintln!("{home}: {ok} flows succeeded, {failed} failed; CCF answered A {fetched} times");
        // Every flow took a new key at home, which A fetched through the partner link: the
        // load crossed the links that the reloads replaced.
        assert!(fetched >= ok, "{home}: {fetched} fetches for {ok} flows");
        assert_eq!(
            failed,
            0,
            "{home}'s flows failed during reloads: {:?}",
            tally.errors.lock().unwrap()
        );
    }
}

/// A partner removed from the file: its cache entries go, the own CCF's questions about its
/// invokers are refused, and its gateway is refused on its next request, even on a connection
/// opened before, and in the handshake of a new one. Another partner is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_partner_evicts_its_cache_and_refuses_its_calls() {
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        reloadable: true,
        gateway_extra: NO_POLL.into(),
        ..Default::default()
    })
    .await;
    let mut aef_a = aef(t.d(A), "aef-a1").await;
    let mut inv_b = onboard(t.d(B), "c0").await;
    inv_b.obtain_psk("aef-a1").await;
    let mut inv_c = onboard(t.d(C), "c0").await;
    let (psk_c, _) = inv_c.obtain_psk("aef-a1").await;
    ask(&mut aef_a, "aef-a1", &inv_b.id, B, "", T)
        .await
        .unwrap();
    ask(&mut aef_a, "aef-a1", &inv_c.id, C, "", T)
        .await
        .unwrap();
    let gw = t.d(A).gw().state.clone();
    gw.cache.sync().await;
    assert_eq!(gw.cache.entry_count(), 2);
    // B's gateway holds a connection to A's CAPIF-6e, authenticated before the removal.
    let b_gw = t.d(B).issue(Role::Gateway);
    let ch = channel(
        t.d(A).gw().capif6e_addr,
        &t.d(A).ca_pem(),
        Some((&b_gw.cert_pem, &b_gw.key_pem)),
        t.d(A).gw_peer(),
    )
    .await;
    let mut open = InterconnectClient::new(ch);
    let e = open
        .fetch_security_information(query_to_a())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "B is admitted before: {e:?}");

    let block = Domain::partner_block(B, &t.d(B).dir.join("ca.pem"));
    t.d(A)
        .edit_gateway_toml(|s| s.replace(block.trim_start(), ""));
    let mut admin = t.d(A).gateway_admin().await;
    let r = reload(&mut admin).await;
    assert_eq!(r.removed, [B], "{r:?}");
    assert!(r.added.is_empty() && r.changed.is_empty(), "{r:?}");

    gw.cache.sync().await;
    assert_eq!(gw.cache.entry_count(), 1, "B's entry is evicted, C's stays");
    let e = ask(&mut aef_a, "aef-a1", &inv_b.id, B, "", T)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "UNKNOWN_PARTNER", "{e:?}");
    let e = open
        .fetch_security_information(query_to_a())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::PermissionDenied, "UNKNOWN_PARTNER"),
        "the open connection is refused on its next request: {e:?}"
    );
    assert!(
        ask_a_as(&t, &b_gw.cert_pem, &b_gw.key_pem).await.is_err(),
        "a new connection of B is refused"
    );
    let st = status(&mut admin).await;
    assert_eq!(
        st.partners
            .iter()
            .map(|p| p.ccf_id.as_str())
            .collect::<Vec<_>>(),
        [C]
    );
    let got = ask(&mut aef_a, "aef-a1", &inv_c.id, C, "", T)
        .await
        .unwrap();
    assert_eq!(got.aef_psk, psk_c);
}

/// Without an RPC or a signal: the poll notices an edited file (a partner added), then an
/// edited PEM file alone (a CA appended to its bundle), then refuses a broken file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_files_are_picked_up_by_the_poll() {
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        reloadable: true,
        not_partners: vec![(A, C)],
        gateway_extra: "[reload]\npoll_interval_ms = 100\n".into(),
        ..Default::default()
    })
    .await;
    let gw = t.d(A).gw().state.clone();
    let within = Duration::from_secs(10);
    // A bundle of A's own, so that only A's files change.
    let bundle = t.d(A).dir.join("c-bundle.pem");
    write_atomically(&bundle, t.d(C).ca_pem().as_bytes());
    t.d(A)
        .edit_gateway_toml(|s| s + &Domain::partner_block(C, &bundle));
    eventually(within, "the poll adds C", || gw.trust(&id(C)).is_some()).await;
    let mut admin = t.d(A).gateway_admin().await;
    let st = status(&mut admin).await;
    let c = st.partners.iter().find(|p| p.ccf_id == C).unwrap();
    assert_eq!(c.trust_anchors.len(), 1);
    let anchor = &c.trust_anchors[0];
    assert_eq!(
        anchor.sha256,
        hex::encode(sha2::Sha256::digest(der(&t.d(C).ca_pem()).as_ref()))
    );
    assert!(anchor.subject.contains(C), "{anchor:?}");
    assert!(
        anchor.not_after_unix_ms > ccf_core::clock::now_ms(),
        "{anchor:?}"
    );
    assert!(st.reloads >= 1 && st.reloads_refused == 0, "{st:?}");

    let second = DomainCa::generate(&id(C)).unwrap();
    write_atomically(
        &bundle,
        format!("{}{}", t.d(C).ca_pem(), second.cert_pem()).as_bytes(),
    );
    eventually(within, "the poll reads the edited bundle", || {
        gw.trust(&id(C)).is_some_and(|t| t.ca_certs.len() == 2)
    })
    .await;

    let file = t.d(A).gw_file.clone().unwrap();
    let saved = std::fs::read_to_string(&file).unwrap();
    write_atomically(&file, b"ccf_id = [\n");
    eventually(within, "the poll refuses the broken file", || {
        gw.reload.refused.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(gw.trust(&id(C)).is_some() && gw.trust(&id(B)).is_some());
    assert!(
        gw.reload.last_error().contains("gateway.toml"),
        "{}",
        gw.reload.last_error()
    );
    write_atomically(&file, saved.as_bytes());
    eventually(within, "the restored file is read again", || {
        gw.reload.last_error().is_empty()
    })
    .await;
}

/// A gateway starts while its partner is down (links are lazy: nothing is dialled), fails that
/// partner's requests with a reason the status shows, and recovers when the partner is back. A
/// partner whose CA file is missing is a start error that names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_starts_while_its_partner_is_down() {
    let mut t = Testbed::start(Options::default()).await;
    t.d_mut(B).stop_gateway().await;
    let mut cfg = t.d(A).gw_config.clone();
    cfg.listen.capif6 = "127.0.0.1:0".into();
    cfg.listen.capif6e = "127.0.0.1:0".into();
    // The first gateway of A holds its state directory's store.
    cfg.state_dir = None;
    let gw = capif_gateway::server::start(cfg.clone())
        .await
        .expect("starts with its partner down");
    let link = gw.state.link(&id(B)).unwrap().state();
    assert!(
        link.resolved_targets.is_empty() && link.requests == 0,
        "nothing dialled at start: {link:?}"
    );
    let ccf = t.d(A).issue(Role::Ccf);
    let mut client = pb::gateway_client::GatewayClient::new(
        channel(
            gw.capif6_addr,
            &t.d(A).ca_pem(),
            Some((&ccf.cert_pem, &ccf.key_pem)),
            t.d(A).gw_peer(),
        )
        .await,
    );
    let q = pb::SecurityInformationQuery {
        api_invoker_id: "inv-x".into(),
        home_ccf_id: B.into(),
        aef_id: "aef-a1".into(),
        presented_key_id: String::new(),
        security_method: 0,
    };
    let e = client
        .fetch_security_information(q.clone())
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "PARTNER_UNAVAILABLE", "{e:?}");
    let link = gw.state.link(&id(B)).unwrap().state();
    assert_eq!(link.last_error_reason, "PARTNER_UNAVAILABLE", "{link:?}");
    assert!(link.last_error_unix_ms > 0 && !link.last_error.is_empty());

    t.d_mut(B).start_gateway().await;
    let e = client.fetch_security_information(q).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "B answers once it is back: {e:?}");
    let link = gw.state.link(&id(B)).unwrap().state();
    assert!(
        link.last_error_reason.is_empty() && link.last_success_unix_ms > 0,
        "{link:?}"
    );
    gw.shutdown().await;

    cfg.partners[0].ca_cert = t.d(A).dir.join("no-such-ca.pem");
    let e = capif_gateway::server::start(cfg)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(B) && e.contains("no-such-ca.pem"), "{e}");
}

/// The binary reloads on SIGHUP, and its command-line overrides survive the reload (the listen
/// addresses it was started with are not reported as changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary() {
    use tokio::io::AsyncBufReadExt;
    let t = Testbed::start(Options {
        domains: vec![A, B, C],
        reloadable: true,
        not_partners: vec![(A, C)],
        gateway_extra: NO_POLL.into(),
        ..Default::default()
    })
    .await;
    let file = t.d(A).dir.join("gateway-binary.toml");
    std::fs::copy(t.d(A).gw_file.as_ref().unwrap(), &file).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capif-gateway"))
        .args(["--config", &path(&file)])
        .args([
            "--listen-capif6",
            "127.0.0.1:0",
            "--listen-capif6e",
            "127.0.0.1:0",
        ])
        // The in-process gateway of A holds the configured state directory's store.
        .arg("--state-dir")
        .arg(t.tmp.path().join("gateway-binary-state"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("ready line in time")
        .unwrap()
        .expect("a ready line");
    let capif6: std::net::SocketAddr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("capif6="))
        .expect("capif6= in the ready line")
        .parse()
        .unwrap();
    let op = t.d(A).issue(Role::Operator);
    let mut admin = pb::gateway_admin_client::GatewayAdminClient::new(
        channel(
            capif6,
            &t.d(A).ca_pem(),
            Some((&op.cert_pem, &op.key_pem)),
            t.d(A).gw_peer(),
        )
        .await,
    );
    let text = std::fs::read_to_string(&file).unwrap();
    write_atomically(
        &file,
        (text + &Domain::partner_block(C, &t.d(C).dir.join("ca.pem"))).as_bytes(),
    );
    let pid = child.id().unwrap().to_string();
    let hup = tokio::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = status(&mut admin).await;
        if st.reloads >= 1 && st.partners.iter().any(|p| p.ccf_id == C) {
            break st;
        }
        assert!(Instant::now() < deadline, "no reload after SIGHUP: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(st.partners.iter().any(|p| p.ccf_id == C), "{st:?}");
    child.kill().await.unwrap();
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(
        err.lines()
            .any(|l| l.contains("configuration reloaded") && l.contains("SIGHUP") && l.contains(C)),
        "no SIGHUP reload adding {C} logged: {err}"
    );
    assert!(
        !err.contains("take effect only at the next start"),
        "the overrides were reported as changes: {err}"
    );
}
