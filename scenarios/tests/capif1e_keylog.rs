//! CAPIF-1e's two profiles from the invoker's end, with the real `capif` binary against a CCF of
//! each: the key recomputed outside the project (Python's `hmac`, in `aefpsk_from_keylog.py`)
//! from the invoker's `SSLKEYLOGFILE` and the session ID and P0 it printed is the key both ends
//! hold (docs/PROTOCOL.md 4.6): for `tls12-annex-a` from the master secret of the `CLIENT_RANDOM`
//! line, for `tls13-exporter` from the `EXPORTER_SECRET` line. An invoker of the other profile gets
//! a clear refusal instead of a key.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use capif_testkit::ccf::*;
use ccf_core::kdf::Capif1eProfile;
use tokio::process::Command;

/// Runs `capif` with `args` (and `SSLKEYLOGFILE` when given) without blocking the runtime that
/// serves the in-process CCF; returns (success, stdout, stderr).
async fn capif(args: &[&str], keylog: Option<&Path>) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capif"));
    c.args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("SSLKEYLOGFILE");
    if let Some(k) = keylog {
        c.env("SSLKEYLOGFILE", k);
    }
    let out = c.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `key=value` from a line of `capif` output.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Onboards an invoker of `profile` at `t` and obtains PSK for aef-weather with the key log set;
/// checks the Python recomputation against the invoker's stored key and the CCF's.
async fn recompute_from_the_key_log(t: &TestCcf, profile: Capif1eProfile) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, t.ca_pem()).unwrap();
    let invoker = dir.path().join("bob");
    let (onboarding, capif1e) = (
        t.ccf.onboarding_addr.to_string(),
        t.ccf.capif1e_addr.to_string(),
    );
    let (ok, out, err) = capif(
        &[
            "invoker",
            "onboard",
            "--profile",
            invoker.to_str().unwrap(),
            "--onboarding",
            &onboarding,
            "--capif",
            &capif1e,
            "--ca",
            ca.to_str().unwrap(),
            "--credential",
            CREDENTIALS[0],
            "--capif1e",
            profile.as_str(),
        ],
        None,
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("capif1e={profile}")), "{out}");

    let keylog = dir.path().join("invoker.keylog");
    let (ok, out, err) = capif(
        &[
            "invoker",
            "security",
            "--profile",
            invoker.to_str().unwrap(),
            "--aef",
            "aef-weather",
        ],
        Some(&keylog),
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(err.contains("SSLKEYLOGFILE is set"), "{err}");
    let mut lines = out.lines();
    let key_id = field(lines.next().unwrap(), "key_id").to_string();
    let session = lines.next().unwrap();
    assert_eq!(field(session, "capif1e"), profile.as_str());
    let (session_id, p0) = (field(session, "session_id"), field(session, "p0"));
    assert_eq!(session_id.len(), 64, "a 32-octet P1: {session}");
    assert_eq!(p0, "aef-weather.operator-a.test:8443/weather");

    // The key log: one TLS session, owner-only.
    let log = std::fs::read_to_string(&keylog).unwrap();
    let label = match profile {
        Capif1eProfile::Tls12AnnexA => "CLIENT_RANDOM ",
        Capif1eProfile::Tls13Exporter => "EXPORTER_SECRET ",
    };
    assert_eq!(log.matches(label).count(), 1, "{log}");
    let mode = std::fs::metadata(&keylog).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Recomputed outside the project's code.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aefpsk_from_keylog.py");
    let py = Command::new("python3")
        .arg(script)
        .arg(&keylog)
        .arg(session_id)
        .arg(p0)
        .output()
        .await
        .expect("python3 runs");
    let py_out = String::from_utf8_lossy(&py.stdout).into_owned();
    assert!(
        py.status.success(),
        "{py_out}{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(py_out.lines().count(), 1, "{py_out}");
    assert_eq!(field(py_out.trim(), "profile"), profile.as_str());
    let recomputed = field(py_out.trim(), "aefpsk").to_string();
    assert_eq!(field(py_out.trim(), "key_id"), key_id);

    // The invoker's stored key, and the CCF's as its AEF receives it.
    let stored = std::fs::read_to_string(invoker.join("keys/aef-weather.toml")).unwrap();
    let stored: toml::Value = toml::from_str(&stored).unwrap();
    assert_eq!(stored["aef_psk_hex"].as_str().unwrap(), recomputed);
    let invoker_id = stored_invoker_id(&invoker);
    let mut aef = aef_client(t, "aef-weather").await;
    let theirs = get_info(&mut aef, &invoker_id, "aef-weather")
        .await
        .unwrap();
    assert_eq!(hex::encode(&theirs.aef_psk), recomputed);
    assert_eq!(theirs.key_id, key_id);
}

/// Acceptance 1 of issue 18: TS 33.122 A.1 recomputed from the master secret OpenSSL logged.
#[tokio::test]
async fn the_annex_a_key_recomputed_from_the_invokers_key_log_is_the_one_both_ends_hold() {
    let t = start_profile(3600, Capif1eProfile::Tls12AnnexA).await;
    recompute_from_the_key_log(&t, Capif1eProfile::Tls12AnnexA).await;
}

/// The TLS 1.3 profile is reproducible the same way, from the exporter secret rustls logged.
#[tokio::test]
async fn the_exporter_key_recomputed_from_the_invokers_key_log_is_the_one_both_ends_hold() {
    let t = start(3600).await;
    recompute_from_the_key_log(&t, Capif1eProfile::Tls13Exporter).await;
}

fn stored_invoker_id(profile: &Path) -> String {
    let text = std::fs::read_to_string(profile.join("profile.toml")).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["api_invoker_id"].as_str().unwrap().to_string()
}

/// An invoker configured for the TLS 1.3 profile at the capif listener of a `tls12-annex-a`
/// domain gets no key, and the error says why and where to go; no key log was asked for, so
/// none is written.
#[tokio::test]
async fn an_invoker_of_the_other_profile_is_told_why_it_gets_no_key() {
    let t = start_profile(3600, Capif1eProfile::Tls12AnnexA).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, t.ca_pem()).unwrap();
    let profile = dir.path().join("carol");
    let (onboarding, capif_listener) = (
        t.ccf.onboarding_addr.to_string(),
        t.ccf.capif_addr.to_string(),
    );
    let p = profile.to_str().unwrap();
    let (ok, out, err) = capif(
        &[
            "invoker",
            "onboard",
            "--profile",
            p,
            "--onboarding",
            &onboarding,
            "--capif",
            &capif_listener,
            "--ca",
            ca.to_str().unwrap(),
            "--credential",
            CREDENTIALS[1],
        ],
        None,
    )
    .await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = capif(
        &[
            "invoker",
            "security",
            "--profile",
            p,
            "--aef",
            "aef-weather",
        ],
        None,
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("CAPIF1E_PROFILE_MISMATCH")
            && err.contains("derives AEFPSKs by CAPIF-1e profile tls12-annex-a"),
        "{err}"
    );
    assert!(!profile.join("keys/aef-weather.toml").exists());
}
