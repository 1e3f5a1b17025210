//! The one configuration of every property test of the workspace (dev-only: compiled for this
//! crate's tests and, through the `proptest` feature, for the other crates' tests).
//!
//! The number of cases comes from one place, `CAPIF_PROPTEST_CASES` (default [`DEFAULT_CASES`]),
//! so CI runs a few thousand cases per property and `scripts/fuzz-long.sh` runs a million with
//! the same code. Properties that are slow per case (certificates, signatures) take a fixed
//! fraction of it through [`config_scaled`] and say so in their names' documentation.

use proptest::test_runner::Config;

/// Cases per property when `CAPIF_PROPTEST_CASES` is unset: a few thousand, so the whole suite
/// stays well inside CI's budget.
pub const DEFAULT_CASES: u32 = 2048;

/// The environment variable that sets the cases per property.
pub const CASES_ENV: &str = "CAPIF_PROPTEST_CASES";

/// Cases per property: `CAPIF_PROPTEST_CASES`, or [`DEFAULT_CASES`] when unset or not a number.
pub fn cases() -> u32 {
    std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_CASES)
}

/// The configuration of a property: [`cases`] cases. Rejections are allowed up to the number of
/// cases, so that a long run does not stop at proptest's fixed default.
pub fn config() -> Config {
    config_scaled(1)
}

/// The configuration of a slow property: `cases() / divisor` cases (at least 1).
pub fn config_scaled(divisor: u32) -> Config {
    let cases = (cases() / divisor.max(1)).max(1);
    Config {
        cases,
        max_global_rejects: cases.max(1024),
        max_local_rejects: cases.saturating_mul(4).max(65_536),
        // A failure found in a long run is printed with its minimal input; the persisted seed
        // files would land next to the sources of whichever crate ran.
        failure_persistence: None,
        ..Config::default()
    }
}

/// `s` as a TOML basic string (quoted, with every control character escaped), for property
/// tests that write generated values into config and scenario files.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
