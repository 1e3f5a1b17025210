//! A revocation notice's trace across the durable outboxes. A notice is queued while a request
//! is handled (an operator's revocation at CCF-B, a notice arriving at a gateway) and delivered
//! later by an outbox worker, in a task of its own: without help each hop's delivery would start
//! a new trace. [`NoticeTraces`] remembers, per component and notice id, the span context in
//! which the notice was queued, and the worker's delivery span continues it, so the push
//! CCF-B -> gateway-B -> gateway-A -> CCF-A -> AEF is one trace.
//!
//! Best effort and in memory: a restarted component delivers what it queued before in new
//! traces. Bounded: the oldest entries go first.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Entries kept at most (a few dozen bytes each).
const CAPACITY: usize = 1024;

/// See the module comment.
#[derive(Debug, Default)]
pub struct NoticeTraces {
    entries: Mutex<VecDeque<(String, SpanContext)>>,
}

impl NoticeTraces {
    /// The process's memory of notice traces.
    pub fn global() -> &'static NoticeTraces {
        static GLOBAL: OnceLock<NoticeTraces> = OnceLock::new();
        GLOBAL.get_or_init(NoticeTraces::default)
    }

    fn key(component: &str, notice_id: &str) -> String {
        format!("{component}/{notice_id}")
    }

    /// Remembers the current span's context for `notice_id` queued by `component` (its domain
    /// and role: several components share a process in tests).
    pub fn remember(&self, component: &str, notice_id: &str) {
        let sc = tracing::Span::current()
            .context()
            .span()
            .span_context()
            .clone();
        if !sc.is_valid() {
            return;
        }
        let key = Self::key(component, notice_id);
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = e.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = sc;
            return;
        }
        if e.len() >= CAPACITY {
            e.pop_front();
        }
        e.push_back((key, sc));
    }

    /// Makes `span` (a delivery of `notice_id` by `component`, not yet entered) continue the
    /// trace the notice was queued in, when it is remembered.
    pub fn continue_in(&self, span: &tracing::Span, component: &str, notice_id: &str) {
        let key = Self::key(component, notice_id);
        let sc = {
            let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            e.iter().find(|(k, _)| *k == key).map(|(_, sc)| sc.clone())
        };
        if let Some(sc) = sc {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
        }
    }

    /// Entries held (tests).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
