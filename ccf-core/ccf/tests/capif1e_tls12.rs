//! CAPIF-1e under the `tls12-annex-a` profile (docs/PROTOCOL.md 4.3.2): the invoker side and the
//! CCF hold the same Annex A key; a domain derives only by its own profile and says which in
//! every PSK answer; and `openssl s_client`, a client no one here wrote, completes the TLS 1.2
//! handshake with the CCF's listener, where no session is ever resumed or renegotiated and the
//! CCF's `SSLKEYLOGFILE` holds the same master secrets as the client's.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use capif_proto::v1::{self as pb, AefPskDerivation};
use capif_testkit::ccf::*;
use ccf_core::identity::Role;
use ccf_core::ids::ApiInvokerId;
use ccf_core::kdf::Capif1eProfile;
use tonic::Code;

#[tokio::test]
async fn invoker_and_ccf_hold_the_same_annex_a_key_per_tls12_session() {
    let t = start_profile(3600, Capif1eProfile::Tls12AnnexA).await;
    assert_ne!(t.ccf.capif1e_addr, t.ccf.capif_addr);
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    let mut s = capif1e_tls12(&t, &inv).await;
    let rsp = s.obtain(&inv, &["aef-weather"]).await.unwrap();
    let info = &rsp.security_info[0];
    assert_eq!(
        info.aef_psk_derivation,
        AefPskDerivation::Tls12AnnexA as i32
    );
    let binding = s.binding();
    assert_eq!(binding.profile(), Capif1eProfile::Tls12AnnexA);
    assert_eq!(
        binding.session_id().len(),
        32,
        "the full handshake's session ID"
    );
    let mine = binding.aefpsk(&info.interface_canonical).unwrap();
    assert_eq!(mine.key_id(), info.aef_psk_key_id);

    // The CCF's copy, as its AEF receives it over CAPIF-3 on the TLS 1.3 capif listener.
    let mut aef = aef_client(&t, "aef-weather").await;
    let theirs = get_info(&mut aef, &inv.id, "aef-weather").await.unwrap();
    assert_eq!(theirs.aef_psk.as_slice(), mine.expose().as_slice());

    // Another TLS 1.2 session: another session ID, another key.
    let mut s2 = capif1e_tls12(&t, &inv).await;
    let rsp2 = s2.obtain(&inv, &["aef-weather"]).await.unwrap();
    assert_ne!(s2.binding().session_id(), binding.session_id());
    assert_ne!(rsp2.security_info[0].aef_psk_key_id, info.aef_psk_key_id);
}

#[tokio::test]
async fn a_domain_derives_only_by_its_own_profile_and_names_it() {
    let t = start_profile(3600, Capif1eProfile::Tls12AnnexA).await;
    let inv = onboard(&t, CREDENTIALS[0]).await.unwrap();
    // A TLS 1.3 session on the capif listener: no key, and the refusal says where to go.
    let mut s = capif1e(&t, &inv).await;
    let e = s.obtain(&inv, &["aef-weather"]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "CAPIF1E_PROFILE_MISMATCH");
    assert!(
        e.message().contains(
            "operator-a.test derives AEFPSKs by CAPIF-1e profile tls12-annex-a, but this TLS \
             session is of profile tls13-exporter: obtain PSK on the CCF's CAPIF-1e listener"
        ),
        "{}",
        e.message()
    );
    assert_eq!(t.ccf.state.store.context_count().await.unwrap(), 0);
    // A method without a key needs no binding: it is served on either listener.
    let pki = s
        .security
        .obtain_security_method(pb::ObtainSecurityMethodRequest {
            api_invoker_id: inv.id.clone(),
            service_security: Some(pb::ServiceSecurity {
                security_info: vec![pb::SecurityInformation {
                    aef_id: "aef-weather".into(),
                    pref_security_methods: vec![pb::SecurityMethod::Pki as i32],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pki.security_info[0].aef_psk_derivation, 0);

    // The default domain names its own profile, and has no TLS 1.2 listener at all.
    let t13 = start(3600).await;
    assert_eq!(t13.ccf.capif1e_addr, t13.ccf.capif_addr);
    let inv13 = onboard(&t13, CREDENTIALS[0]).await.unwrap();
    let rsp = capif1e(&t13, &inv13)
        .await
        .obtain(&inv13, &["aef-weather"])
        .await
        .unwrap();
    assert_eq!(
        rsp.security_info[0].aef_psk_derivation,
        AefPskDerivation::Tls13Exporter as i32
    );
    let client = ccf_core::tls12::client_context(
        &t13.ca_pem(),
        &inv13.cert_pem,
        &inv13.key_pem,
        "capif://operator-a.test/ccf".parse().unwrap(),
    )
    .unwrap();
    let e = ccf_core::tls12::connect(
        &t13.ccf.capif_addr.to_string(),
        "localhost",
        &client,
        Duration::from_secs(5),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("TLS 1.2 handshake failed"), "{e}");
}

#[tokio::test]
async fn the_profile_and_its_listener_are_configured_together() {
    for (profile, capif1e, refusal) in [
        (
            "tls12-annex-a",
            "",
            "security.capif1e = \"tls12-annex-a\" needs listen.capif1e",
        ),
        (
            "tls13-exporter",
            "capif1e = \"127.0.0.1:0\"",
            "listen.capif1e is only used with security.capif1e = \"tls12-annex-a\"",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "ccf_id = \"operator-a.test\"\nstate_dir = \"{}\"\n[listen]\nonboarding = \
             \"127.0.0.1:0\"\ncapif = \"127.0.0.1:0\"\n{capif1e}\n[security]\ncapif1e = \
             \"{profile}\"\n",
            dir.path().display()
        );
        let cfg = capif_ccf::config::CcfConfig::parse(&text, "t.toml").unwrap();
        let e = capif_ccf::server::start(cfg)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(refusal), "{e}");
    }
    let e = capif_ccf::config::CcfConfig::parse(
        "ccf_id = \"a.test\"\nstate_dir = \"x\"\n[security]\ncapif1e = \"tls12\"\n",
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tls13-exporter") && e.contains("line 4"), "{e}");
}

/// The `openssl` CLI, or `None` (with a note) where it is not installed.
fn openssl_cli() -> Option<Command> {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() => Some(Command::new("openssl")),
        _ => {
            eprintln!("openssl CLI not found: the s_client interop test did not run");
            None
        }
    }
}

/// `CLIENT_RANDOM` lines of an NSS key log, as (client random, master secret).
fn client_random_lines(path: &Path) -> BTreeSet<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("CLIENT_RANDOM "))
        .map(|l| {
            let (r, s) = l.split_once(' ').unwrap();
            (r.to_string(), s.to_string())
        })
        .collect()
}

/// The values s_client printed after `label` (e.g. "Session-ID:"), one per session.
fn printed(out: &str, label: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect()
}

#[test]
fn openssl_s_client_completes_capif1e_and_nothing_resumes_or_renegotiates() {
    let Some(_) = openssl_cli() else { return };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("ccf.toml");
    std::fs::write(
        &cfg,
        config_text_profile(&state, 600, Capif1eProfile::Tls12AnnexA),
    )
    .unwrap();
    let ccf_keylog = dir.path().join("ccf.keylog");
    let p = CcfProcess::spawn_with_env(
        Path::new(env!("CARGO_BIN_EXE_ccf")),
        &cfg,
        &[("SSLKEYLOGFILE", ccf_keylog.as_os_str())],
    );
    let v = process_view(&p, &state);
    let inv = v.issue(Role::Invoker(ApiInvokerId::new("inv-sclient").unwrap()));
    let (cert, key, ca) = (
        dir.path().join("invoker.pem"),
        dir.path().join("invoker.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, &inv.cert_pem).unwrap();
    std::fs::write(&key, &inv.key_pem).unwrap();
    std::fs::write(&ca, v.ca_pem()).unwrap();
    let s_client = |extra: &[&str]| {
        let mut c = openssl_cli().unwrap();
        c.args(["s_client", "-connect", &p.capif1e.to_string()])
            .args(["-servername", "localhost", "-verify_return_error"])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .arg("-CAfile")
            .arg(&ca)
            .args(extra);
        c
    };

    // Six handshakes, the last five offering the first session's ID: all six are full
    // handshakes with their own session ID, and the CCF logged the same master secrets.
    let client_keylog = dir.path().join("client.keylog");
    let out = s_client(&["-tls1_2", "-reconnect", "-keylogfile"])
        .arg(&client_keylog)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("Verification: OK").count(), 6, "{text}");
    assert_eq!(
        text.matches("New, TLSv1.2, Cipher is ECDHE-ECDSA-AES")
            .count(),
        6,
        "{text}"
    );
    assert!(!text.contains("Reused"), "a session was resumed:\n{text}");
    assert_eq!(
        text.matches("Extended master secret: yes").count(),
        6,
        "{text}"
    );
    let ids: BTreeSet<String> = printed(&text, "Session-ID:").into_iter().collect();
    assert_eq!(ids.len(), 6, "session IDs repeat: {ids:?}");
    assert!(ids.iter().all(|id| id.len() == 64), "{ids:?}");
    let ccf_lines = client_random_lines(&ccf_keylog);
    assert_eq!(ccf_lines.len(), 6);
    assert_eq!(ccf_lines, client_random_lines(&client_keylog));
    let masters: BTreeSet<String> = printed(&text, "Master-Key:").into_iter().collect();
    assert_eq!(
        masters,
        ccf_lines
            .iter()
            .map(|(_, m)| m.clone())
            .collect::<BTreeSet<_>>()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&ccf_keylog).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Renegotiation ("R" once the handshake is done) is refused; the connection ends.
    let mut child = s_client(&["-tls1_2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("Extended master secret") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "s_client ended early"
        );
    }
    child.stdin.as_mut().unwrap().write_all(b"R\n").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut rest);
        let _ = std::io::Read::read_to_end(&mut stderr, &mut rest);
        let _ = tx.send(rest);
    });
    let rest = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => String::from_utf8_lossy(&r).into_owned(),
        Err(_) => {
            let _ = child.kill();
            panic!("s_client did not end after the renegotiation request");
        }
    };
    let status = child.wait().unwrap();
    // The CCF answers the new ClientHello with a no_renegotiation alert; when its HTTP/2
    // preface crosses the ClientHello, the client gives up on that record first.
    assert!(
        rest.contains("RENEGOTIATING")
            && (rest.contains("no renegotiation") || rest.contains("unexpected record")),
        "{rest}"
    );
    assert!(!status.success());
    assert_eq!(
        client_random_lines(&ccf_keylog).len(),
        7,
        "a second handshake ran"
    );

    // TLS 1.3, and TLS 1.2 without a client certificate, are refused before any key exists.
    for (args, cert_less) in [(&["-tls1_3"][..], false), (&["-tls1_2"][..], true)] {
        let mut c = if cert_less {
            let mut c = openssl_cli().unwrap();
            c.args(["s_client", "-connect", &p.capif1e.to_string()])
                .args(["-servername", "localhost", "-CAfile"])
                .arg(&ca)
                .args(args);
            c
        } else {
            s_client(args)
        };
        let out = c.stdin(Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains("alert"), "{args:?}: {text}");
    }
    assert_eq!(client_random_lines(&ccf_keylog).len(), 7);
}

/// The TLS 1.3 profile's key log: the CCF writes rustls's NSS lines for its capif listener
/// when `SSLKEYLOGFILE` is set, and they are the client's own (s_client with TLS 1.3).
#[test]
fn the_tls13_profile_logs_the_session_secrets_too() {
    let Some(_) = openssl_cli() else { return };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("ccf.toml");
    std::fs::write(&cfg, config_text(&state, 600)).unwrap();
    let ccf_keylog = dir.path().join("ccf.keylog");
    let p = CcfProcess::spawn_with_env(
        Path::new(env!("CARGO_BIN_EXE_ccf")),
        &cfg,
        &[("SSLKEYLOGFILE", ccf_keylog.as_os_str())],
    );
    let v = process_view(&p, &state);
    let inv = v.issue(Role::Invoker(ApiInvokerId::new("inv-sclient").unwrap()));
    for (name, text) in [
        ("invoker.pem", inv.cert_pem.as_str()),
        ("invoker.key", inv.key_pem.as_str()),
        ("ca.pem", &v.ca_pem()),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let client_keylog = dir.path().join("client.keylog");
    let out = openssl_cli()
        .unwrap()
        .args(["s_client", "-tls1_3", "-connect", &p.capif.to_string()])
        .args(["-servername", "localhost", "-verify_return_error"])
        .arg("-cert")
        .arg(dir.path().join("invoker.pem"))
        .arg("-key")
        .arg(dir.path().join("invoker.key"))
        .arg("-CAfile")
        .arg(dir.path().join("ca.pem"))
        .arg("-keylogfile")
        .arg(&client_keylog)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines = |p: &Path| -> BTreeSet<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| l.contains("HANDSHAKE_TRAFFIC_SECRET"))
            .map(str::to_string)
            .collect()
    };
    let ccf = lines(&ccf_keylog);
    assert_eq!(ccf.len(), 2, "client and server handshake secrets: {ccf:?}");
    assert_eq!(ccf, lines(&client_keylog));
    drop(p);
}
