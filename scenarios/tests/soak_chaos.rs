//! `capif soak` and `capif chaos` as CI runs them: the real `capif` binary on a testbed of real
//! component processes. The soak smoke run must hold its bounds; the chaos smoke run must inject
//! every fault kind and count no violation; and with the AEFs told to ignore revocations (a
//! test-only fault of the `aef-stub` this test build carries) the checker must report the
//! revoked-invoker violation and exit non-zero, which shows it is not blind; without that build,
//! `--break` is refused before anything starts.
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

fn chaos_report(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("chaos.json")).unwrap()).unwrap()
}

#[test]
fn chaos_smoke_injects_every_fault_kind_and_counts_no_violation() {
    let (ok, text, dir) = run(&["chaos", "--smoke", "--seed", "11"]);
    assert!(ok, "capif chaos --smoke failed:\n{text}");
    assert!(text.contains("seed 11"), "the seed is printed:\n{text}");
    let r = chaos_report(&dir);
    assert_eq!(r["passed"], true, "{text}");
    assert_eq!(r["violations"].as_array().unwrap().len(), 0, "{text}");
    for kind in [
        "kill-ccf",
        "kill-gateway",
        "kill-aef",
        "partner-stop",
        "revoke",
        "offboard",
    ] {
        assert!(
            r["fault_kinds"][kind].as_u64().unwrap_or(0) >= 1,
            "{kind}:\n{text}"
        );
    }
    // Every fault came back and the load recovered after each restart or outage; the
    // revocation and the offboarding took effect (a probe was refused).
    for f in r["faults"].as_array().unwrap() {
        assert_eq!(f["problem"], "", "{f}");
        match f["kind"].as_str().unwrap() {
            "revoke" | "offboard" => assert!(f["effect_ms"].is_u64(), "{f}"),
            _ => assert!(f["recovery_ms"].is_u64(), "{f}"),
        }
    }
    // Keys of the short-validity domain ran out during the run and were refused.
    assert!(r["expired_key_calls"].as_u64().unwrap() >= 1, "{text}");
    assert!(r["flows_ok"].as_u64().unwrap() > 100, "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn chaos_catches_an_aef_that_ignores_revocations() {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_capif"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        capif_scenarios::chaos::aef_has_test_faults(&bin_dir),
        "{}/aef-stub lacks the test-faults feature: `cargo test --workspace` builds it with the \
         feature (dev-dependency of capif-scenarios); alone, run \
         `cargo build -p aef-stub --features test-faults` first",
        bin_dir.display()
    );
    let (ok, text, dir) = run(&[
        "chaos",
        "--smoke",
        "--seed",
        "11",
        "--break",
        "ignore-revocations",
    ]);
    assert!(!ok, "the checker did not see the broken AEFs:\n{text}");
    assert!(text.contains("revoked-accepted"), "{text}");
    let r = chaos_report(&dir);
    assert_eq!(r["passed"], false);
    assert!(
        r["violation_counts"]["revoked-accepted"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn break_is_refused_without_the_test_faults_build() {
    // Stand-in binaries: an aef-stub that refuses the flag, as a release build does.
    let bins = tempfile::tempdir().unwrap();
    for b in ["ccf", "capif-gateway", "aef-stub"] {
        std::fs::copy("/bin/false", bins.path().join(b)).unwrap();
    }
    let out = capif()
        .args([
            "chaos",
            "--smoke",
            "--break",
            "ignore-revocations",
            "--bin-dir",
        ])
        .arg(bins.path())
        .arg("--run-dir")
        .arg(bins.path().join("run"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("test-faults"), "{text}");
    assert!(!bins.path().join("run").exists(), "nothing was started");
}
