//! The steady background load of a scenario (`load_start` .. `load_stop`): cross-domain flows
//! (security at the home CCF, Authentication Initiation at the AEF, a TLS-PSK call) of an
//! invoker group at some AEFs keep running, a bounded number at a time, while the later steps
//! kill, start and revoke. Each flow is one of [`crate::load`]'s, so the same code the chaos and
//! soak runs use judges it.
//!
//! A flow whose component went away under it (`UNAVAILABLE`, a deadline, a connection lost) is
//! retried a few times and counts by its retry's outcome: with replicas, another replica serves
//! the retry. `load_stop` is ok when every flow that started after the scenario's most recent
//! kill succeeded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capif_proto::v1 as pb;
use ccf_core::clock::now_ms;
use tokio::sync::watch;

use crate::load::{Flow, FlowKind, Load, RENEGOTIATE_AFTER};

/// Retries of a flow whose component went away.
pub const RETRIES: u32 = 5;

/// Time between a flow and its retry: long enough for a balancer to see the replica gone.
pub const RETRY_AFTER: Duration = Duration::from_millis(300);

/// One flow's outcome, as the load's judgement needs it.
#[derive(Clone, Debug)]
pub struct FlowRecord {
    /// When the flow (its first attempt) started, Unix ms.
    pub start_ms: u64,
    /// Whether it (or its last retry) succeeded.
    pub ok: bool,
    /// How many times it was retried.
    pub retries: u32,
    /// The last failure's code, reason and words ("" on success).
    pub failure: String,
}

/// What `load_stop` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Flows run (a flow and its retries count once).
    pub run: usize,
    /// Flows that failed after their retries.
    pub failed: usize,
    /// Flows that needed a retry.
    pub retried: usize,
    /// Flows that started after the most recent kill.
    pub after_kill: usize,
    /// Of those, the ones that failed after their retries.
    pub failed_after_kill: usize,
    /// The first of those failures.
    pub first_failure: Option<String>,
}

impl Summary {
    /// Judges `flows` against the most recent kill (`None`: every flow counts).
    pub fn of(flows: &[FlowRecord], last_kill_ms: Option<u64>) -> Self {
        let since = last_kill_ms.unwrap_or(0);
        let after: Vec<&FlowRecord> = flows.iter().filter(|f| f.start_ms >= since).collect();
        Self {
            run: flows.len(),
            failed: flows.iter().filter(|f| !f.ok).count(),
            retried: flows.iter().filter(|f| f.retries > 0).count(),
            after_kill: after.len(),
            failed_after_kill: after.iter().filter(|f| !f.ok).count(),
            first_failure: after.iter().find(|f| !f.ok).map(|f| f.failure.clone()),
        }
    }

    /// The report's words.
    pub fn detail(&self) -> String {
        format!(
            "flows {}, failed {}, retried {}; after the last kill: {} run, {} failed",
            self.run, self.failed, self.retried, self.after_kill, self.failed_after_kill
        )
    }
}

/// Whether a failed flow's component went away under it (so another replica may serve a
/// retry), rather than a definite answer: `UNAVAILABLE`, a deadline, a lost connection, with no
/// reason or the reasons the components give for a peer they could not reach.
pub fn went_away(f: &Flow) -> bool {
    let transport = matches!(
        f.code.as_str(),
        "UNAVAILABLE" | "DEADLINE_EXCEEDED" | "DEADLINE" | "CANCELLED" | "UNKNOWN"
    );
    transport
        && (f.reason.is_empty()
            || matches!(f.reason.as_str(), "PARTNER_UNAVAILABLE" | "PARTNER_TIMEOUT"))
}

/// A running background load.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<FlowRecord>>,
    /// What it runs, for the report ("group (n) -> aefs").
    pub target: String,
}

impl Running {
    /// Starts `load` (its members and AEFs already chosen): `concurrency` workers, each with
    /// its own share of the members, so no invoker runs two flows at once.
    pub fn start(load: Load, concurrency: usize, target: String) -> Self {
        let load = Arc::new(load);
        let (stop, rx) = watch::channel(false);
        let workers = concurrency.clamp(1, load.members.len().max(1));
        let task = tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            for w in 0..workers {
                let (load, rx) = (load.clone(), rx.clone());
                set.spawn(worker(load, w, workers, rx));
            }
            let mut all = Vec::new();
            while let Some(r) = set.join_next().await {
                all.extend(r.unwrap_or_default());
            }
            all
        });
        Self { stop, task, target }
    }

    /// Stops it (the flows under way end first) and returns every flow's record.
    pub async fn stop(self) -> Vec<FlowRecord> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// One worker: its members × the AEFs, round robin, each pair negotiating again only after
/// [`RENEGOTIATE_AFTER`] (a key replaced sooner may be refused by the AEF's refresh rule,
/// which is not a fault of the replicas).
async fn worker(
    load: Arc<Load>,
    w: usize,
    workers: usize,
    mut stop: watch::Receiver<bool>,
) -> Vec<FlowRecord> {
    let members: Vec<_> = load
        .members
        .iter()
        .enumerate()
        .filter(|(i, _)| i % workers == w)
        .map(|(_, m)| m.clone())
        .collect();
    let pairs: Vec<(usize, usize)> = (0..members.len())
        .flat_map(|m| (0..load.aefs.len()).map(move |a| (m, a)))
        .collect();
    let mut last: HashMap<(usize, usize), Instant> = HashMap::new();
    let mut out = Vec::new();
    let mut next = 0;
    while !*stop.borrow() && !pairs.is_empty() {
        // The next pair due, in round-robin order; else wait for the earliest (or the end).
        let due = (0..pairs.len())
            .map(|k| pairs[(next + k) % pairs.len()])
            .find(|p| last.get(p).is_none_or(|t| t.elapsed() >= RENEGOTIATE_AFTER));
        let Some((m, a)) = due else {
            let wait = pairs
                .iter()
                .filter_map(|p| last.get(p))
                .map(|t| RENEGOTIATE_AFTER.saturating_sub(t.elapsed()))
                .min()
                .unwrap_or(RENEGOTIATE_AFTER);
            let _ = tokio::time::timeout(wait, stop.changed()).await;
            continue;
        };
        next = (pairs.iter().position(|p| *p == (m, a)).unwrap_or(0) + 1) % pairs.len();
        last.insert((m, a), Instant::now());
        let (member, aef) = (&members[m], &load.aefs[a]);
        let _held = member.lock.lock().await;
        let start_ms = now_ms();
        let mut retries = 0;
        let mut f = load
            .flow(member, aef, pb::SecurityMethod::Psk, FlowKind::Fresh)
            .await;
        while !f.ok && went_away(&f) && retries < RETRIES {
            retries += 1;
            tokio::time::sleep(RETRY_AFTER).await;
            last.insert((m, a), Instant::now());
            f = load
                .flow(member, aef, pb::SecurityMethod::Psk, FlowKind::Fresh)
                .await;
        }
        if !f.ok {
            tracing::info!(invoker = %f.invoker, aef = %f.aef, code = %f.code, reason = %f.reason, retries, "background flow failed");
        }
        out.push(FlowRecord {
            start_ms,
            ok: f.ok,
            retries,
            failure: if f.ok {
                String::new()
            } else {
                format!(
                    "{} at {}: {}{}: {}",
                    f.invoker,
                    f.aef,
                    f.code,
                    if f.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", f.reason)
                    },
                    f.detail
                )
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start_ms: u64, ok: bool, retries: u32) -> FlowRecord {
        FlowRecord {
            start_ms,
            ok,
            retries,
            failure: if ok {
                String::new()
            } else {
                format!("f{start_ms}")
            },
        }
    }

    fn failed(code: &str, reason: &str) -> Flow {
        Flow {
            invoker: "i".into(),
            invoker_id: String::new(),
            home: "b".into(),
            aef: "a1".into(),
            aef_domain: "a".into(),
            method: "psk".into(),
            kind: FlowKind::Fresh,
            start_ms: 0,
            end_ms: 0,
            key_id: String::new(),
            key_expires_at_ms: 0,
            ok: false,
            code: code.into(),
            reason: reason.into(),
            detail: String::new(),
            answer: None,
            hung: false,
        }
    }

    /// A component that went away is retried; a definite answer is not.
    #[test]
    fn only_transport_failures_are_retried() {
        for (code, reason) in [
            ("UNAVAILABLE", ""),
            ("UNAVAILABLE", "PARTNER_UNAVAILABLE"),
            ("DEADLINE_EXCEEDED", "PARTNER_TIMEOUT"),
            ("DEADLINE", ""),
            ("UNKNOWN", ""),
        ] {
            assert!(went_away(&failed(code, reason)), "{code} {reason}");
        }
        for (code, reason) in [
            ("NOT_FOUND", "NO_SECURITY_CONTEXT"),
            ("HANDSHAKE_REFUSED", ""),
            ("PERMISSION_DENIED", "KEY_BOUND_TO_OTHER_AEF"),
            ("RESOURCE_EXHAUSTED", "OUTBOUND_BUDGET_EXHAUSTED"),
            ("ERROR", ""),
        ] {
            assert!(!went_away(&failed(code, reason)), "{code} {reason}");
        }
    }

    /// Failures before the most recent kill do not count; after it, one failure makes the load
    /// fail, and a retried flow counts by its retry.
    #[test]
    fn only_flows_after_the_last_kill_are_judged() {
        let flows = [rec(10, false, 0), rec(20, true, 2), rec(30, true, 0)];
        let s = Summary::of(&flows, Some(15));
        assert_eq!(
            (
                s.run,
                s.failed,
                s.retried,
                s.after_kill,
                s.failed_after_kill
            ),
            (3, 1, 1, 2, 0)
        );
        assert_eq!(s.first_failure, None);
        let s = Summary::of(&[rec(10, true, 0), rec(40, false, 5)], Some(15));
        assert_eq!(s.failed_after_kill, 1);
        assert_eq!(s.first_failure.as_deref(), Some("f40"));
        assert_eq!(Summary::of(&flows, None).failed_after_kill, 1);
    }
}
