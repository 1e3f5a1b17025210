//! docs/ARCHITECTURE.md's code map names every crate of the workspace and every module of every
//! library (`pub mod` in each `lib.rs`), so a newcomer's map cannot silently fall behind a move.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn members() -> Vec<String> {
    let toml = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let line = toml
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .unwrap()
        .to_string();
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn package_name(member: &str) -> String {
    let toml = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
    toml.lines()
        .find_map(|l| l.strip_prefix("name = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string()
}

#[test]
fn every_crate_and_module_is_on_the_map() {
    let map = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let mut missing = Vec::new();
    for m in members() {
        let name = package_name(&m);
        if !map.contains(&format!("`{name}`")) {
            missing.push(format!("crate {name} ({m})"));
        }
        let lib = root().join(&m).join("src/lib.rs");
        let Ok(text) = std::fs::read_to_string(&lib) else {
            continue;
        };
        for module in text
            .lines()
            .filter_map(|l| l.strip_prefix("pub mod "))
            .map(|l| l.trim_end_matches(';').trim_end_matches(" {"))
        {
            if !map.contains(&format!("`{module}`")) && !map.contains(&format!("`{module}/`")) {
                missing.push(format!("module {name}::{module}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md does not name: {missing:?}"
    );
    assert!(members().len() >= 8, "the members line was not read");
}
