//! Audit records written off the request path: a key leaving the domain is logged at `info` on
//! purpose (docs/OPERATIONS.md, "Logs"), but formatting and writing that line on the request's
//! own task cost the miss path more than its store read (docs/BENCHMARKS.md). A request hands
//! its record to an [`AuditLog`] (a bounded channel: no allocation beyond the record, never a
//! wait); one writer task writes the lines, each inside the trace context of the request that
//! made it, so the line carries that request's `trace_id` and `span_id` as before.
//!
//! Never dropped silently: when the channel is full the record is dropped and counted
//! ([`AuditLog::dropped`], exposed by the products' metrics), and the writer logs the count at
//! `warn` at most once per [`DROP_REPORT_INTERVAL`] while it grows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

/// How often the writer reports records dropped since its last report.
pub const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Records the channel holds before new ones are dropped (and counted).
pub const DEFAULT_CAPACITY: usize = 4096;

/// One audit record: what the writer task logs.
pub trait AuditRecord: Send + 'static {
    /// Writes the record's log line (called on the writer task, inside the request's trace
    /// context).
    fn write(self);
}

/// The sending side of the audit writer; cheap to clone.
pub struct AuditLog<R> {
    tx: mpsc::Sender<(R, opentelemetry::Context)>,
    dropped: Arc<AtomicU64>,
}

impl<R> Clone for AuditLog<R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

impl<R> AuditLog<R> {
    /// Records dropped so far because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl<R> std::fmt::Debug for AuditLog<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl<R: AuditRecord> AuditLog<R> {
    /// Starts the writer task on the current tokio runtime, with room for `capacity` records.
    /// The task ends when every [`AuditLog`] handle is dropped, after writing what is queued.
    pub fn spawn(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(writer(rx, dropped.clone()));
        Self { tx, dropped }
    }

    /// Queues `record` with the current trace context; never waits. A full channel drops the
    /// record and counts it.
    pub fn record(&self, record: R) {
        if self
            .tx
            .try_send((record, opentelemetry::Context::current()))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn writer<R: AuditRecord>(
    mut rx: mpsc::Receiver<(R, opentelemetry::Context)>,
    dropped: Arc<AtomicU64>,
) {
    let mut reported = 0;
    let mut tick = tokio::time::interval(DROP_REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some((record, cx)) = next else { break };
                let _attached = cx.attach();
                record.write();
            }
            _ = tick.tick() => {
                reported = report_drops(&dropped, reported);
            }
        }
    }
    report_drops(&dropped, reported);
}

/// Logs the drop count when it grew since `reported`; returns the count now.
fn report_drops(dropped: &AtomicU64, reported: u64) -> u64 {
    let now = dropped.load(Ordering::Relaxed);
    if now > reported {
        tracing::warn!(
            dropped_total = now,
            dropped_since_last_report = now - reported,
            "audit records dropped: the audit writer fell behind"
        );
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sent(Arc<parking_lot::Mutex<Vec<u32>>>, u32);

    impl AuditRecord for Sent {
        fn write(self) {
            self.0.lock().push(self.1);
        }
    }

    #[tokio::test]
    async fn every_record_is_written_in_order_or_counted_as_dropped() {
        let written = Arc::new(parking_lot::Mutex::new(Vec::new()));
        // Current-thread runtime: the writer cannot run until this test yields, so the channel
        // of 4 fills and the rest must be counted.
        let log = AuditLog::spawn(4);
        for i in 0..10 {
            log.record(Sent(written.clone(), i));
        }
        assert_eq!(log.dropped(), 6);
        let dropped = log.dropped.clone();
        drop(log);
        // The writer drains what was queued and ends when the last handle is gone.
        while Arc::strong_count(&written) > 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(*written.lock(), vec![0, 1, 2, 3]);
        assert_eq!(dropped.load(Ordering::Relaxed), 6);
    }
}
