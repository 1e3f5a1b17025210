//! Locating the real grpcurl (installed by the project's own `scripts/install-grpcurl.sh` when
//! missing), for tests that inspect servers the way users do.

use std::path::PathBuf;
use std::process::Command;

/// Path of a working grpcurl: `$GRPCURL`, else the one `scripts/install-grpcurl.sh` installs
/// (running it if needed). Panics with the script's error when none can be had: tests that need
/// grpcurl must fail, not skip.
pub fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("scripts/install-grpcurl.sh"))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "grpcurl is needed and scripts/install-grpcurl.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs grpcurl with `args`; returns stdout, panicking with both streams on failure.
pub fn grpcurl_ok(args: &[&str]) -> String {
    let out = Command::new(grpcurl())
        .args(args)
        .output()
        .expect("grpcurl runs");
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
