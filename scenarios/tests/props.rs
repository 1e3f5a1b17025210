//! Property tests of scenario files (`capif_scenarios::scenario::Scenario::parse`), which users
//! write by hand: arbitrary text never panics and every refusal starts with the file's name;
//! generated valid scenarios (domains, AEFs, invoker groups with any names, every kind of step)
//! parse, validate and keep what they say; and one reference to an unknown invoker, AEF, domain
//! or component is refused naming the file, the line of that reference and the name. Cases:
//! `CAPIF_PROPTEST_CASES` (`ccf_core::testing`).
#![allow(clippy::unwrap_used)]

use capif_scenarios::scenario::{Action, Scenario};
use ccf_core::testing::{config, toml_string};
use proptest::prelude::*;
use proptest::sample::Index;

/// What to generate, as choices; [`build`] turns it into a file.
#[derive(Clone, Debug)]
struct Blueprint {
    prefix: String,
    domains: usize,
    aefs: Vec<(Index, String)>,
    invokers: Vec<(String, Index, Option<u32>)>,
    steps: Vec<(u8, Index, Index, Option<&'static str>)>,
}

fn blueprint() -> impl Strategy<Value = Blueprint> {
    (
        "[a-z]{1,8}",
        1..4usize,
        prop::collection::vec((any::<Index>(), "[A-Za-z0-9_]{1,10}"), 0..5),
        prop::collection::vec(
            (".{0,8}", any::<Index>(), proptest::option::of(0..5u32)),
            0..4,
        ),
        prop::collection::vec(
            (
                0..14u8,
                any::<Index>(),
                any::<Index>(),
                proptest::option::of(prop::sample::select(vec!["psk", "pki", "oauth", "PSK"])),
            ),
            0..10,
        ),
    )
        .prop_map(|(prefix, domains, aefs, invokers, steps)| Blueprint {
            prefix,
            domains,
            aefs,
            invokers,
            steps,
        })
}

/// A reference in the file: its line (1-based), the line's key, and the name it holds.
#[derive(Clone, Debug)]
struct Reference {
    line: usize,
    key: &'static str,
    value: String,
}

struct Built {
    lines: Vec<String>,
    references: Vec<Reference>,
    domains: Vec<String>,
    aefs: Vec<(String, String)>,
    invokers: Vec<String>,
    actions: Vec<Action>,
}

fn build(b: &Blueprint) -> Built {
    let q = |s: &str| toml_string(s);
    let mut lines = vec!["name = \"generated\"".to_string()];
    let mut references = Vec::new();
    let domains: Vec<String> = (0..b.domains)
        .map(|i| format!("{}{i}.test", b.prefix))
        .collect();
    let mut aefs: Vec<(String, String)> = Vec::new();
    for (d, domain) in domains.iter().enumerate() {
        lines.push("[[domain]]".into());
        lines.push(format!("id = {}", q(domain)));
        for (k, (at, name)) in b.aefs.iter().enumerate() {
            if at.index(domains.len()) == d {
                let id = format!("{name}-{k}");
                lines.push("[[domain.aef]]".into());
                lines.push(format!("id = {}", q(&id)));
                lines.push("apis = [\"weather-v1\"]".into());
                aefs.push((id, domain.clone()));
            }
        }
    }
    let mut invokers = Vec::new();
    for (j, (name, home, count)) in b.invokers.iter().enumerate() {
        let name = format!("{name}{j}");
        lines.push("[[invoker]]".into());
        lines.push(format!("name = {}", q(&name)));
        let home = domains[home.index(domains.len())].clone();
        references.push(Reference {
            line: lines.len() + 1,
            key: "home",
            value: home.clone(),
        });
        lines.push(format!("home = {}", q(&home)));
        if let Some(c) = count {
            lines.push(format!("count = {c}"));
        }
        invokers.push(name);
    }
    let mut actions = Vec::new();
    for (kind, x, y, method) in &b.steps {
        let mut refer = |lines: &mut Vec<String>, key: &'static str, value: String| {
            references.push(Reference {
                line: lines.len() + 1,
                key,
                value: value.clone(),
            });
            lines.push(format!("{key} = {}", q(&value)));
        };
        lines.push("[[step]]".into());
        let pick_domain = domains[x.index(domains.len())].clone();
        let action = match kind {
            0..=3 if !invokers.is_empty() && !aefs.is_empty() => {
                let action =
                    [Action::Security, Action::Auth, Action::Call, Action::Run][usize::from(*kind)];
                lines.push(format!("action = {}", q(&action.name())));
                refer(
                    &mut lines,
                    "invoker",
                    invokers[x.index(invokers.len())].clone(),
                );
                refer(&mut lines, "aef", aefs[y.index(aefs.len())].0.clone());
                if let Some(m) = method {
                    lines.push(format!("method = {}", q(m)));
                }
                action
            }
            4..=6 if !invokers.is_empty() => {
                let action =
                    [Action::Onboard, Action::Offboard, Action::Revoke][usize::from(*kind - 4)];
                lines.push(format!("action = {}", q(&action.name())));
                refer(
                    &mut lines,
                    "invoker",
                    invokers[x.index(invokers.len())].clone(),
                );
                action
            }
            7 => {
                lines.push("action = \"restart\"".into());
                let c = match y.index(3) {
                    0 => format!("ccf:{pick_domain}"),
                    1 => format!("gateway:{pick_domain}"),
                    _ if !aefs.is_empty() => format!("aef:{}", aefs[y.index(aefs.len())].0),
                    _ => format!("ccf:{pick_domain}"),
                };
                refer(&mut lines, "component", c);
                Action::Restart
            }
            8 => {
                lines.push("action = \"set_validity\"".into());
                refer(&mut lines, "domain", pick_domain);
                lines.push(format!("secs = {}", y.index(10_000)));
                Action::SetValidity
            }
            9 => {
                lines.push("action = \"counters\"".into());
                refer(&mut lines, "domain", pick_domain);
                lines.push("counters = { cache_hits = 1 }".into());
                Action::Counters
            }
            10 => {
                lines.push("action = \"rotate_token_key\"".into());
                refer(&mut lines, "domain", pick_domain);
                Action::RotateTokenKey
            }
            11 => {
                lines.push("action = \"reload\"".into());
                refer(&mut lines, "domain", pick_domain);
                let partners: Vec<String> = domains
                    .iter()
                    .take(y.index(domains.len() + 1))
                    .map(|d| q(d))
                    .collect();
                lines.push(format!("partners = [{}]", partners.join(", ")));
                Action::Reload
            }
            _ => {
                lines.push("action = \"wait\"".into());
                lines.push(format!("ms = {}", y.index(1000)));
                Action::Wait
            }
        };
        actions.push(action);
    }
    Built {
        lines,
        references,
        domains,
        aefs,
        invokers,
        actions,
    }
}

proptest! {
    #![proptest_config(config())]

    /// A generated scenario parses and validates, and keeps its domains, AEFs (with their
    /// domain), invokers, groups and steps.
    #[test]
    fn props_scenario_generated_is_valid(b in blueprint()) {
        let built = build(&b);
        let text = built.lines.join("\n");
        let s = Scenario::parse(&text, "gen.toml").map_err(|e| TestCaseError::fail(format!("{e:#}\n{text}")))?;
        prop_assert_eq!(s.domains.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), built.domains);
        let aefs: std::collections::BTreeMap<String, String> = built.aefs.into_iter().collect();
        prop_assert_eq!(s.aef_domains(), aefs);
        prop_assert_eq!(s.invokers.iter().map(|i| i.name.clone()).collect::<Vec<_>>(), built.invokers);
        for i in &s.invokers {
            let members = &s.invoker_members()[&i.name];
            match i.count {
                None => prop_assert_eq!(members.len(), 1),
                Some(n) => prop_assert_eq!(members.len(), n as usize),
            }
        }
        prop_assert_eq!(s.steps.iter().map(|st| st.action).collect::<Vec<_>>(), built.actions);
    }

    /// One reference to a name that does not exist (an invoker's home, a step's invoker, AEF,
    /// domain or component) is refused before anything starts, naming the file, that line and
    /// the name.
    #[test]
    fn props_scenario_unknown_reference_names_the_line(b in blueprint(), which in any::<Index>()) {
        let built = build(&b);
        prop_assume!(!built.references.is_empty());
        let r = built.references[which.index(built.references.len())].clone();
        let unknown = match r.key {
            "component" => format!("{}:nowhere-zz.test", r.value.split(':').next().unwrap()),
            "home" | "domain" => "nowhere-zz.test".to_string(),
            _ => "¿nobody?".to_string(),
        };
        let mut lines = built.lines.clone();
        lines[r.line - 1] = format!("{} = {}", r.key, toml_string(&unknown));
        let e = Scenario::parse(&lines.join("\n"), "bad.toml").unwrap_err().to_string();
        prop_assert!(e.starts_with(&format!("bad.toml:{}: ", r.line)), "{}: {}", r.line, e);
        prop_assert!(e.contains(&format!("{unknown:?}")), "{}", e);
    }

    /// Arbitrary text, and a generated file with a line dropped, duplicated or cut short, is
    /// parsed or refused with a message that starts with the file's name.
    #[test]
    fn props_scenario_arbitrary_text(
        b in blueprint(),
        junk in any::<String>(),
        at in any::<Index>(),
        op in 0..3u8,
    ) {
        let lines = build(&b).lines;
        let i = at.index(lines.len());
        let mut broken = lines.clone();
        match op {
            0 => {
                broken.remove(i);
            }
            1 => broken.insert(i, lines[i].clone()),
            _ => broken[i] = lines[i].chars().take(lines[i].chars().count() / 2).collect(),
        }
        for text in [broken.join("\n"), junk] {
            if let Err(e) = Scenario::parse(&text, "any.toml") {
                prop_assert!(e.to_string().starts_with("any.toml"), "{}", e);
            }
        }
    }
}
