//! The scenario runner as users run it: the real `capif` binary launching the real component
//! binaries. Every shipped scenario must pass; a wrong expectation must fail loudly; SIGINT must
//! leave nothing running; malformed files are refused before anything starts; `testbed up`
//! prints grpcurl commands that work as printed.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Testbeds of this binary run one at a time (2 CI cores; timing-sensitive scenarios).
static SERIAL: Mutex<()> = Mutex::new(());

fn capif() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capif"));
    c.env("RUST_BACKTRACE", "0");
    c
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name)
}

/// Processes whose command line mentions `needle` (the run directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("scenario run") && !cmd.contains("testbed up")
            {
                found.push(cmd);
            }
        }
    }
    found
}

fn run_scenario(file: &Path) -> (bool, String, PathBuf) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap().keep();
    let out = capif()
        .args(["scenario", "run"])
        .arg(file)
        .arg("--run-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        processes_mentioning(dir.to_str().unwrap()).is_empty(),
        "components left running"
    );
    (out.status.success(), text, dir)
}

fn assert_passes(name: &str) {
    let (ok, text, dir) = run_scenario(&shipped(name));
    assert!(ok, "{name} failed:\n{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    assert_logs_are_plain(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// The components' log files hold text a person or a log shipper reads as it is: no ANSI
/// escape (ESC) bytes, since their stderr is a file, not a terminal.
fn assert_logs_are_plain(run_dir: &Path) {
    let logs: Vec<PathBuf> = std::fs::read_dir(run_dir.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    assert!(
        logs.len() >= 4,
        "expected a log per component, found {logs:?}"
    );
    for log in logs {
        let bytes = std::fs::read(&log).unwrap();
        assert!(!bytes.is_empty(), "{} is empty", log.display());
        if let Some(at) = bytes.iter().position(|b| *b == 0x1b) {
            let from = at.saturating_sub(40);
            panic!(
                "{} holds an ESC byte at {at}: {:?}",
                log.display(),
                String::from_utf8_lossy(&bytes[from..(at + 20).min(bytes.len())])
            );
        }
    }
}

#[test]
fn shipped_two_operators() {
    assert_passes("two-operators.toml");
}

#[test]
fn shipped_three_operators_confused_deputy() {
    assert_passes("three-operators-confused-deputy.toml");
}

#[test]
fn shipped_partner_outage() {
    assert_passes("partner-outage.toml");
}

#[test]
fn shipped_revocation() {
    assert_passes("revocation.toml");
}

#[test]
fn shipped_revocation_survives_restarts() {
    assert_passes("revocation-survives-restarts.toml");
}

/// Needs PostgreSQL (scripts/install-postgres.sh; CI installs it): the launcher starts a real
/// server for the run, and CCF-B's state lives there across a kill -9.
#[test]
fn shipped_postgres_store() {
    assert_passes("postgres-store.toml");
}

/// Needs PostgreSQL, like `shipped_postgres_store`. Both domains run two CCF and two gateway
/// replicas; one of each per domain is killed (-9) under a background load and started again.
/// Every step passes, and the load's row says flows ran after the last kill and none failed.
#[test]
fn shipped_replicas_postgres() {
    let (ok, text, dir) = run_scenario(&shipped("replicas-postgres.toml"));
    assert!(ok, "replicas-postgres.toml failed:\n{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    let steps = report["steps"].as_array().unwrap();
    let load = steps
        .iter()
        .find(|s| s["action"] == "load_stop")
        .expect("a load_stop row");
    let detail = load["detail"].as_str().unwrap();
    let after: Vec<u64> = detail
        .split_once("after the last kill: ")
        .map(|(_, t)| {
            t.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        after.len() == 2 && after[0] > 0 && after[1] == 0,
        "flows must have run after the last kill, none failed: {detail}"
    );
    // Every replica got its own log.
    for log in ["ccf-operator-b.test-2.log", "gateway-operator-a.test-2.log"] {
        assert!(dir.join("logs").join(log).exists(), "{log}");
    }
    assert_logs_are_plain(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn shipped_partner_ca_rotation() {
    assert_passes("partner-ca-rotation.toml");
}

#[test]
fn shipped_key_expiry() {
    assert_passes("key-expiry.toml");
}

#[test]
fn shipped_load() {
    assert_passes("load.toml");
}

#[test]
fn shipped_pki() {
    assert_passes("pki.toml");
}

#[test]
fn shipped_oauth() {
    assert_passes("oauth.toml");
}

#[test]
fn shipped_mixed_capif1e() {
    assert_passes("mixed-capif1e.toml");
}

#[test]
fn a_wrong_expectation_fails_with_a_clear_row() {
    let text = std::fs::read_to_string(shipped("two-operators.toml")).unwrap();
    let wrong = text.replacen(
        "note = \"local invoker\"",
        "note = \"local invoker\"\nexpect = \"PERMISSION_DENIED\"",
        1,
    );
    assert_ne!(wrong, text);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrong.toml");
    std::fs::write(&file, wrong).unwrap();
    let (ok, out, run_dir) = run_scenario(&file);
    assert!(!ok, "a failed expectation must exit non-zero:\n{out}");
    let row = out
        .lines()
        .find(|l| l.contains("PERMISSION_DENIED") && l.trim_end().ends_with("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL row naming the expectation:\n{out}"));
    assert!(row.contains("run") && row.contains(" ok "), "{row}");
    assert!(out.contains("FAILED: 8 steps, 1 failed"), "{out}");
    let _ = std::fs::remove_dir_all(run_dir);
}

#[test]
fn sigint_leaves_no_component_running() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.toml");
    let text = std::fs::read_to_string(shipped("two-operators.toml")).unwrap()
        + "\n[[step]]\naction = \"wait\"\nms = 60000\n";
    std::fs::write(&file, text).unwrap();
    let run_dir = dir.path().join("run");
    let mut child = capif()
        .args(["scenario", "run"])
        .arg(&file)
        .arg("--run-dir")
        .arg(&run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let needle = run_dir.to_str().unwrap().to_string();
    let start = Instant::now();
    while processes_mentioning(&needle).len() < 6 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the testbed did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "an interrupted run must not report success"
    );
    let start = Instant::now();
    loop {
        let left = processes_mentioning(&needle);
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still running after SIGINT: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn malformed_scenarios_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(shipped("two-operators.toml")).unwrap();

    let bad_field = dir.path().join("bad-field.toml");
    std::fs::write(
        &bad_field,
        good.replacen(
            "action = \"onboard\"",
            "action = \"onboard\"\ncolour = \"red\"",
            1,
        ),
    )
    .unwrap();
    let out = capif()
        .args(["scenario", "check"])
        .arg(&bad_field)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = good
        .lines()
        .position(|l| l == "action = \"onboard\"")
        .unwrap()
        + 2;
    assert!(
        err.contains(&format!("bad-field.toml:{line}")) && err.contains("colour"),
        "{err}"
    );

    let bad_aef = dir.path().join("bad-aef.toml");
    std::fs::write(
        &bad_aef,
        good.replacen("aef = \"aef-weather\"", "aef = \"aef-nowhere\"", 1),
    )
    .unwrap();
    let run_dir = dir.path().join("run");
    let out = capif()
        .args(["scenario", "run"])
        .arg(&bad_aef)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad-aef.toml:") && err.contains("unknown AEF \"aef-nowhere\""),
        "{err}"
    );
    assert!(
        !run_dir.exists(),
        "something was started for an invalid scenario"
    );

    let bad_domain = dir.path().join("bad-domain.toml");
    std::fs::write(
        &bad_domain,
        good.replacen(
            "home = \"operator-b.test\"",
            "home = \"operator-z.test\"",
            1,
        ),
    )
    .unwrap();
    let out = capif()
        .args(["scenario", "check"])
        .arg(&bad_domain)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown home domain \"operator-z.test\"")
    );
}

#[test]
fn testbed_up_prints_grpcurl_commands_that_work() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let grpcurl = capif_testkit::grpcurl::grpcurl();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut child = capif()
        .args(["testbed", "up"])
        .arg(shipped("two-operators.toml"))
        .arg("--run-dir")
        .arg(&run_dir)
        .env("GRPCURL", &grpcurl)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut commands = Vec::new();
    let reader = BufReader::new(child.stdout.take().unwrap());
    for line in reader.lines() {
        let line = line.unwrap();
        if line.contains("Ctrl-C") {
            break;
        }
        if line.trim_start().starts_with(grpcurl.to_str().unwrap()) {
            commands.push(line.trim().to_string());
        }
    }
    assert!(
        commands.len() >= 5,
        "too few grpcurl commands printed: {commands:?}"
    );
    for cmd in &commands {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "printed command failed: {cmd}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The invoker CLI runs the whole flow with each method, as
    // a user would against this testbed: an invoker of B at A's AEF.
    let read_toml = |p: PathBuf| -> toml::Value {
        toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    };
    let (a, b) = (
        run_dir.join("operator-a.test"),
        run_dir.join("operator-b.test"),
    );
    let ccf_b = read_toml(b.join("ccf.toml"));
    let aef = read_toml(a.join("aef-weather.toml"));
    let profile = dir.path().join("cli-invoker");
    let onboard = capif()
        .args(["invoker", "onboard", "--profile"])
        .arg(&profile)
        .args([
            "--onboarding",
            ccf_b["listen"]["onboarding"].as_str().unwrap(),
        ])
        .args(["--capif", ccf_b["listen"]["capif"].as_str().unwrap()])
        .arg("--ca")
        .arg(b.join("ca.pem"))
        .args([
            "--credential",
            ccf_b["onboarding"]["credentials"][0].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        onboard.status.success(),
        "{}",
        String::from_utf8_lossy(&onboard.stderr)
    );
    for method in ["psk", "pki", "oauth"] {
        let out = capif()
            .args(["invoker", "run", "--profile"])
            .arg(&profile)
            .args([
                "--aef",
                "aef-weather",
                "--api",
                "weather-v1",
                "--method",
                method,
            ])
            .args(["--aef-addr", aef["listen"]["security"].as_str().unwrap()])
            .arg("--aef-ca")
            .arg(a.join("ca.pem"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains("aef-weather answered weather-v1")
                && text.contains("of operator-b.test")
                && text.contains(&method.to_uppercase()),
            "capif invoker run --method {method}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // `testbed down` from another shell stops it.
    let out = capif()
        .args(["testbed", "down", "--run-dir"])
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "testbed did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let needle = run_dir.to_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    assert!(processes_mentioning(&needle).is_empty());
}

/// The benchmark's smoke mode runs end to end, so the benchmark cannot rot. No timing is
/// asserted; the coalescing storm's upstream count is a correctness property and is.
#[test]
fn bench_smoke_runs() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("bench.txt");
    let out = capif()
        .args(["bench", "--smoke", "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&out_file).unwrap();
    for case in [
        "(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(h)", "(i)",
    ] {
        assert!(report.contains(case), "case {case} missing:\n{report}");
    }
    assert!(report.contains("upstream calls: 1 "), "{report}");
    // (a) in three repetitions with the median judged; (h) ends in its growth table; both CDF
    // plots are drawn.
    assert!(report.contains("ratio (a, median of 3)"), "{report}");
    assert!(report.contains("| 32 partners, 100 entries |"), "{report}");
    // (i) measured all three testbeds, and the balanced client reached both of A's gateway
    // replicas (each served some of the lookups).
    for row in [
        "| redb, 1 replica |",
        "| PostgreSQL, 1 replica |",
        "| PostgreSQL, 2 replicas |",
        "PostgreSQL vs redb, miss path",
        "2 vs 1 gateway replicas (PostgreSQL), hit",
    ] {
        assert!(report.contains(row), "{row} missing:\n{report}");
    }
    let spread = report
        .lines()
        .filter_map(|l| l.split("requests served per gateway replica: A [").nth(1))
        .next_back()
        .and_then(|l| l.split(']').next())
        .unwrap();
    assert!(
        spread.split(", ").all(|n| n.parse::<u64>().unwrap() > 0) && spread.contains(", "),
        "both of A's replicas serve: {spread}"
    );
    for plot in ["cdf-a.svg", "cdf-b.svg"] {
        let svg = std::fs::read_to_string(dir.path().join("run").join(plot)).unwrap();
        assert!(svg.starts_with("<svg"), "{plot}");
    }
    assert!(processes_mentioning(dir.path().to_str().unwrap()).is_empty());
}
