//! The chaos run's invariant checker: judges every [`Flow`] against the [`Ledger`] of what was
//! acknowledged (revocations and offboardings with the time of their acknowledgement,
//! restarts) and against what the flow itself used (the key id and the expiry the home CCF
//! gave). Errors that faults cause are expected; only these count as violations:
//!
//! - `revoked-accepted`: a call served with a key of a revoked invoker, negotiated before the
//!   revocation, later than the grace after the acknowledgement and after the invoker's and the
//!   AEF's domains were last (re)started;
//! - `offboarded-accepted`: any call of an offboarded invoker served after the grace;
//! - `expired-key-accepted`: a stored key served after its expiry (plus a clock slack);
//! - `onboarding-lost`: `INVOKER_NOT_FOUND` for an invoker that was never offboarded;
//! - `negotiation-lost`: `NO_SECURITY_CONTEXT` for a key its home CCF acknowledged, unexpired,
//!   of an invoker not revoked, and not replaced by a later negotiation;
//! - `wrong-answer`: the AEF's answer names another invoker, home, AEF or key id;
//! - `flow-hung`: no outcome by the flow's deadline.
//!
//! `component-not-back` (no ready line after a restart) and `component-panicked` (a panic in a
//! component's log) are added by the chaos run itself.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::load::{Flow, FlowKind};

/// What was acknowledged during the run.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Revoked invokers (by name) and when the revocation was acknowledged, Unix ms.
    pub revoked: BTreeMap<String, u64>,
    /// Offboarded invokers and when the offboarding was acknowledged, Unix ms.
    pub offboarded: BTreeMap<String, u64>,
    /// (domain, when a component of it was back), Unix ms.
    pub restarts: Vec<(String, u64)>,
}

/// One violation.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    /// Its kind (see the module's list).
    pub kind: String,
    /// When the flow started, Unix ms.
    pub at_ms: u64,
    /// What happened, in words.
    pub detail: String,
}

fn violation(kind: &str, f: &Flow, why: String) -> Violation {
    Violation {
        kind: kind.into(),
        at_ms: f.start_ms,
        detail: format!(
            "{} -> {} ({}, {:?}, key {}): {why}",
            f.invoker,
            f.aef,
            f.method,
            f.kind,
            if f.key_id.is_empty() { "-" } else { &f.key_id }
        ),
    }
}

/// Checks `flows` (sorted by start) against `ledger`.
pub fn check(flows: &[Flow], ledger: &Ledger, grace_ms: u64, slack_ms: u64) -> Vec<Violation> {
    let mut out = Vec::new();
    // The last negotiation of each (invoker, AEF): method and, for PSK, the acknowledged key id
    // (empty when it was not acknowledged, so the CCF's state is unknown).
    let mut last_fresh: HashMap<(&str, &str), (&str, &str)> = HashMap::new();
    for f in flows {
        let pair = (f.invoker.as_str(), f.aef.as_str());
        if f.hung {
            out.push(violation("flow-hung", f, f.detail.clone()));
        }
        if f.ok {
            if let Some(a) = &f.answer {
                let wrong_key = f.method == "psk" && !f.key_id.is_empty() && a.key_id != f.key_id;
                if (!f.invoker_id.is_empty() && a.api_invoker_id != f.invoker_id)
                    || a.aef_id != f.aef
                    || a.home_ccf_id != f.home
                    || wrong_key
                {
                    out.push(violation(
                        "wrong-answer",
                        f,
                        format!(
                            "answered as {} of {} at {} with key {}",
                            a.api_invoker_id, a.home_ccf_id, a.aef_id, a.key_id
                        ),
                    ));
                }
            }
            if let Some(ack) = ledger.offboarded.get(&f.invoker)
                && f.start_ms > ack + grace_ms
            {
                out.push(violation(
                    "offboarded-accepted",
                    f,
                    format!(
                        "served {} ms after the offboarding was acknowledged",
                        f.start_ms - ack
                    ),
                ));
            }
            if let Some(ack) = ledger.revoked.get(&f.invoker)
                && f.kind != FlowKind::Fresh
            {
                // Counted from when the invoker's home and the AEF's domain were both up again.
                let reachable = ledger
                    .restarts
                    .iter()
                    .filter(|(d, t)| (d == &f.home || d == &f.aef_domain) && *t <= f.start_ms)
                    .map(|(_, t)| *t)
                    .fold(*ack, u64::max);
                if f.start_ms > reachable + grace_ms {
                    out.push(violation(
                        "revoked-accepted",
                        f,
                        format!(
                            "served {} ms after the revocation was acknowledged",
                            f.start_ms - ack
                        ),
                    ));
                }
            }
            if f.method == "psk"
                && f.kind != FlowKind::Fresh
                && f.key_expires_at_ms > 0
                && f.start_ms > f.key_expires_at_ms + slack_ms
            {
                out.push(violation(
                    "expired-key-accepted",
                    f,
                    format!(
                        "served {} ms after the key expired",
                        f.start_ms - f.key_expires_at_ms
                    ),
                ));
            }
        } else {
            let gone = ledger.offboarded.contains_key(&f.invoker);
            if f.reason == "INVOKER_NOT_FOUND" && !gone {
                out.push(violation("onboarding-lost", f, f.detail.clone()));
            }
            let acknowledged = last_fresh
                .get(&pair)
                .is_some_and(|(m, k)| *m == "psk" && !k.is_empty() && *k == f.key_id);
            if f.reason == "NO_SECURITY_CONTEXT"
                && f.kind == FlowKind::Reuse
                && acknowledged
                && !gone
                && !ledger.revoked.contains_key(&f.invoker)
                && f.key_expires_at_ms > f.start_ms + 2000
            {
                out.push(violation("negotiation-lost", f, f.detail.clone()));
            }
        }
        if f.kind == FlowKind::Fresh {
            last_fresh.insert(pair, (f.method.as_str(), f.key_id.as_str()));
        }
    }
    out
}

/// Components whose log (in `logs`) holds a panic, with the number of such lines.
pub fn panics_in_logs(logs: &Path) -> Vec<(String, usize)> {
    let Ok(dir) = std::fs::read_dir(logs) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let n = text.lines().filter(|l| l.contains("panicked at")).count();
        if n > 0 {
            out.push((e.file_name().to_string_lossy().into_owned(), n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Answer;

    fn flow(kind: FlowKind, start: u64, ok: bool) -> Flow {
        Flow {
            invoker: "inv-a-1".into(),
            invoker_id: "inv-1".into(),
            home: "operator-a.test".into(),
            aef: "aef-b".into(),
            aef_domain: "operator-b.test".into(),
            method: "psk".into(),
            kind,
            start_ms: start,
            end_ms: start + 10,
            key_id: "k1".into(),
            key_expires_at_ms: 100_000,
            ok,
            code: String::new(),
            reason: String::new(),
            detail: String::new(),
            answer: ok.then(|| Answer {
                aef_id: "aef-b".into(),
                api_invoker_id: "inv-1".into(),
                home_ccf_id: "operator-a.test".into(),
                key_id: "k1".into(),
            }),
            hung: false,
        }
    }

    fn kinds(v: &[Violation]) -> Vec<&str> {
        v.iter().map(|v| v.kind.as_str()).collect()
    }

    #[test]
    fn a_revoked_key_served_after_the_grace_is_a_violation_and_before_it_is_not() {
        let mut l = Ledger::default();
        l.revoked.insert("inv-a-1".into(), 10_000);
        let flows = [
            flow(FlowKind::Probe, 11_000, true),
            flow(FlowKind::Probe, 12_500, true),
        ];
        assert_eq!(kinds(&check(&flows, &l, 2000, 1000)), ["revoked-accepted"]);
        // A restart of the AEF's domain after the revocation restarts the grace.
        l.restarts.push(("operator-b.test".into(), 11_500));
        assert!(check(&flows, &l, 2000, 1000).is_empty());
        // Refusals are what is expected.
        let refused = [flow(FlowKind::Probe, 20_000, false)];
        assert!(check(&refused, &l, 2000, 1000).is_empty());
    }

    #[test]
    fn expired_keys_wrong_answers_lost_state_and_hangs_are_violations() {
        let l = Ledger::default();
        let mut late = flow(FlowKind::Expired, 101_500, true);
        assert_eq!(
            kinds(&check(&[late.clone()], &l, 2000, 1000)),
            ["expired-key-accepted"]
        );
        late.start_ms = 100_500; // within the slack
        assert!(check(&[late], &l, 2000, 1000).is_empty());

        let mut wrong = flow(FlowKind::Reuse, 1000, true);
        wrong.answer.as_mut().unwrap().api_invoker_id = "inv-2".into();
        assert_eq!(kinds(&check(&[wrong], &l, 2000, 1000)), ["wrong-answer"]);

        let mut lost = flow(FlowKind::Reuse, 2000, false);
        lost.reason = "INVOKER_NOT_FOUND".into();
        assert_eq!(kinds(&check(&[lost], &l, 2000, 1000)), ["onboarding-lost"]);

        let fresh = flow(FlowKind::Fresh, 1000, true);
        let mut ctx = flow(FlowKind::Reuse, 2000, false);
        ctx.reason = "NO_SECURITY_CONTEXT".into();
        assert_eq!(
            kinds(&check(&[fresh.clone(), ctx.clone()], &l, 2000, 1000)),
            ["negotiation-lost"]
        );
        // Not when the last negotiation was not acknowledged (its outcome is unknown).
        let mut unacked = fresh.clone();
        unacked.start_ms = 1500;
        unacked.key_id = String::new();
        unacked.ok = false;
        assert!(check(&[fresh, unacked, ctx], &l, 2000, 1000).is_empty());

        let mut hung = flow(FlowKind::Fresh, 1000, false);
        hung.hung = true;
        assert_eq!(kinds(&check(&[hung], &l, 2000, 1000)), ["flow-hung"]);
    }

    #[test]
    fn an_offboarded_invoker_may_be_refused_but_not_served() {
        let mut l = Ledger::default();
        l.offboarded.insert("inv-a-1".into(), 10_000);
        let mut gone = flow(FlowKind::Fresh, 13_000, false);
        gone.reason = "INVOKER_NOT_FOUND".into();
        assert!(check(&[gone], &l, 2000, 1000).is_empty());
        let served = flow(FlowKind::Fresh, 13_000, true);
        assert_eq!(
            kinds(&check(&[served], &l, 2000, 1000)),
            ["offboarded-accepted"]
        );
    }
}
