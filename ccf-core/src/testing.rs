//! The one configuration of every property test of the workspace (dev-only: compiled for this
//! crate's tests and, through the `proptest` feature, for the other crates' tests).
//!
//! The number of cases comes from one place, `CAPIF_PROPTEST_CASES` (default [`DEFAULT_CASES`]),
//! so CI runs a few thousand cases per property and `scripts/fuzz-long.sh` runs a million with
//! the same code. Even the slowest properties (a certificate or an ES256 signature per case)
//! take well under a millisecond per case in a debug build, so every property takes the same count.

use proptest::prelude::*;
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
    let cases = cases();
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

// Generators of the ids' text, shared by every crate's properties.

/// One DNS label as a CCF id allows it: 1 to 63 of `a-z0-9-`, no hyphen at either end.
pub fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
        1 => "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
    ]
}

/// A valid CCF id: 1 to 3 labels (at most 3 * 63 + 2 = 191 characters).
pub fn ccf_id_text() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..=3).prop_map(|l| l.join("."))
}

/// A valid API invoker id, AEF id or API name.
pub fn token_id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9._-]{1,16}",
        1 => "[A-Za-z0-9._-]{1,128}",
    ]
}

/// A valid key id (16 lowercase hex digits).
pub fn key_id_text() -> impl Strategy<Value = String> {
    "[0-9a-f]{16}"
}

/// Text near the valid forms: a valid id with one character inserted, replaced or removed (the
/// character drawn from what ids are made of, their separators and the odd outsider), plus
/// short arbitrary strings and oversized ones.
pub fn near_id_text() -> impl Strategy<Value = String> {
    let base = prop_oneof![ccf_id_text(), token_id_text(), key_id_text()];
    let odd = prop_oneof![
        Just('-'),
        Just('.'),
        Just('_'),
        Just('/'),
        Just(' '),
        Just('A'),
        Just('g'),
        Just('é'),
        Just('\0'),
        any::<char>(),
    ];
    prop_oneof![
        3 => (base, any::<prop::sample::Index>(), odd, 0..3u8).prop_map(|(s, at, c, op)| {
            let chars: Vec<char> = s.chars().collect();
            let i = at.index(chars.len() + 1);
            let mut out = chars.clone();
            match op {
                0 => out.insert(i, c),
                1 if i < chars.len() => out[i] = c,
                _ if i < chars.len() => {
                    out.remove(i);
                }
                _ => out.push(c),
            }
            out.into_iter().collect()
        }),
        2 => ".{0,40}",
        1 => "[a-z0-9.-]{120,300}",
        1 => "[0-9a-fA-F]{14,18}",
    ]
}

/// What a peer may put in an id field of a request: any kind of valid id (so that a field of
/// one kind often holds another kind's), empty, or near-valid text.
pub fn field_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => ccf_id_text(),
        2 => token_id_text(),
        1 => key_id_text(),
        1 => Just(String::new()),
        3 => near_id_text(),
    ]
}

/// `good` (a config or scenario file) with the line `at` points to dropped (`op` 0), duplicated
/// (1) or cut in half (anything else): the near-valid files the config properties try.
pub fn break_a_line(good: &str, at: prop::sample::Index, op: u8) -> String {
    let lines: Vec<&str> = good.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let i = at.index(lines.len());
    let mut broken: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    match op {
        0 => {
            broken.remove(i);
        }
        1 => broken.insert(i, lines[i].to_string()),
        _ => {
            broken[i] = lines[i]
                .chars()
                .take(lines[i].chars().count() / 2)
                .collect()
        }
    }
    broken.join("\n")
}
