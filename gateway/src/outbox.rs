//! The revocation outbox's delivery: one worker per destination (each partner, and the own CCF)
//! sends the rows `store` holds for it until the destination acknowledges (row deleted) or the
//! row's give-up time passes (row deleted, warned, counted). Failures wait per
//! `ccf_core::delivery::Backoff`, per destination, so a dead partner delays nobody else. A
//! worker reads its rows from the store, so it resumes after a restart; it is woken at once when
//! a row is queued for it, and, for a partner, when that partner calls us (it is back). The set
//! of destinations follows the federation: a partner added by a reload gets a worker then
//! ([`Outbox::add_partner`]); a removed one loses its worker and the notices waiting for it
//! ([`Outbox::remove_partner`]): without its trust nothing can be delivered to it. Each delivery
//! continues the trace the notice was queued in (`ccf_core::telemetry::NoticeTraces`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capif_proto::v1::RevocationNotice;
use ccf_core::clock::now_ms;
use ccf_core::delivery::Backoff;
use ccf_core::ids::CcfId;
use ccf_core::telemetry::NoticeTraces;
use tokio::sync::Notify;
use tonic::{Code, Request, Status};
use tracing::Instrument as _;

use crate::service::interconnect::call_own_ccf;
use crate::state::GatewayState;
use crate::store::{Destination, OutboxRow};

/// How long one delivery attempt may take.
const ATTEMPT_DEADLINE: Duration = Duration::from_secs(2);
/// How often expired fetch records and seen marks are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// One destination's wake-up call.
#[derive(Debug, Default)]
struct Waker {
    notify: Notify,
    /// Try every row now, whatever its next attempt time says.
    now: AtomicBool,
    /// The destination is gone (a partner removed): the worker stops.
    gone: AtomicBool,
}

/// The workers' shared part: their wake-up calls, the schedule, the counters.
#[derive(Debug)]
pub struct Outbox {
    wakers: parking_lot::Mutex<BTreeMap<Destination, Arc<Waker>>>,
    /// Where workers for destinations added later are started (set by [`spawn`]).
    starter: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Destination>>>,
    backoff: Backoff,
    /// Rows acknowledged by their destination.
    pub delivered: AtomicU64,
    /// Rows dropped unacknowledged at their give-up time (or refused as malformed).
    pub given_up: AtomicU64,
}

impl Outbox {
    /// For the own CCF and `partners`.
    pub fn new<'a>(partners: impl IntoIterator<Item = &'a CcfId>, backoff: Backoff) -> Self {
        let mut wakers: BTreeMap<Destination, Arc<Waker>> = partners
            .into_iter()
            .map(|p| (Destination::Partner(p.clone()), Arc::default()))
            .collect();
        wakers.insert(Destination::OwnCcf, Arc::default());
        Self {
            wakers: parking_lot::Mutex::new(wakers),
            starter: parking_lot::Mutex::new(None),
            backoff,
            delivered: AtomicU64::new(0),
            given_up: AtomicU64::new(0),
        }
    }

    /// Has `destination`'s worker try its rows now.
    pub fn wake(&self, destination: &Destination) {
        if let Some(w) = self.wakers.lock().get(destination) {
            w.now.store(true, Ordering::SeqCst);
            // A permit is stored when the worker is busy: the wake-up is not lost.
            w.notify.notify_one();
        }
    }

    /// Has `partner`'s worker try its rows now, if it has any waiting.
    pub fn wake_partner(&self, partner: &CcfId) {
        self.wake(&Destination::Partner(partner.clone()));
    }

    /// A partner added by a reload: its worker starts (and delivers what may already wait).
    pub fn add_partner(&self, partner: &CcfId) {
        let d = Destination::Partner(partner.clone());
        let mut wakers = self.wakers.lock();
        if wakers.contains_key(&d) {
            return;
        }
        wakers.insert(d.clone(), Arc::default());
        if let Some(tx) = self.starter.lock().as_ref() {
            let _ = tx.send(d);
        }
    }

    /// A partner removed by a reload: its worker stops, and the notices waiting for it are
    /// dropped (logged with their count): without its trust none can be delivered, and a row
    /// nobody delivers would stay for good. Returns how many were dropped.
    pub async fn remove_partner(
        &self,
        store: &crate::store::RevocationStore,
        partner: &CcfId,
    ) -> usize {
        let d = Destination::Partner(partner.clone());
        if let Some(w) = self.wakers.lock().remove(&d) {
            w.gone.store(true, Ordering::SeqCst);
            w.notify.notify_one();
        }
        let rows = store.rows(&d).await.unwrap_or_default();
        let mut dropped = 0;
        for row in &rows {
            if store.remove(row).await.is_ok() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!(%partner, dropped, "partner removed: the revocation notices waiting for it are dropped");
        }
        dropped
    }
}

/// Starts one worker per destination and the purge, until `stop`.
pub fn spawn(
    state: Arc<GatewayState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let (tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut handles = Vec::new();
    let present: Vec<Destination> = state.outbox.wakers.lock().keys().cloned().collect();
    for d in present {
        handles.push(start_worker(state.clone(), &tx, d));
    }
    // Workers of destinations added later (a reload), until the stop.
    let (add_tx, mut add_rx) = tokio::sync::mpsc::unbounded_channel::<Destination>();
    *state.outbox.starter.lock() = Some(add_tx);
    let mut rx = tx.subscribe();
    let mut later = Vec::new();
    let starter = {
        let (state, tx) = (state.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = rx.recv() => break,
                    d = add_rx.recv() => match d {
                        Some(d) => later.push(start_worker(state.clone(), &tx, d)),
                        None => break,
                    },
                }
            }
            for h in later {
                let _ = h.await;
            }
            Ok(())
        })
    };
    handles.push(starter);
    let mut rx = tx.subscribe();
    handles.push(tokio::spawn(async move {
        tokio::select! {
            _ = rx.recv() => {}
            _ = purge(&state) => {}
        }
        Ok(())
    }));
    handles.push(tokio::spawn(async move {
        stop.await;
        let _ = tx.send(());
        Ok(())
    }));
    handles
}

/// One destination's worker, until the stop is broadcast on `stop`.
fn start_worker(
    state: Arc<GatewayState>,
    stop: &tokio::sync::broadcast::Sender<()>,
    d: Destination,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let mut rx = stop.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            _ = rx.recv() => {}
            _ = worker(&state, &d) => {}
        }
        Ok(())
    })
}

async fn purge(state: &GatewayState) {
    loop {
        match state.store.purge(now_ms()).await {
            Ok((fetches, seen)) if fetches + seen > 0 => {
                tracing::info!(
                    fetches,
                    seen,
                    "purged expired fetch records and seen notices"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging the revocation store failed"),
        }
        tokio::time::sleep(PURGE_EVERY).await;
    }
}

/// Why a delivery attempt failed.
enum Failed {
    /// Worth another attempt later.
    Retry(Status),
    /// The destination refused the notice itself: another attempt would be refused too.
    Refused(Status),
}

/// The name under which this gateway remembers the traces of the notices it queues.
fn trace_component(state: &GatewayState) -> String {
    format!("{}/gateway", state.ccf_id)
}

/// Remembers the current trace for `notice_id`, so that its delivery continues it (call before
/// waking the workers).
pub fn remember_trace(state: &GatewayState, notice_id: &str) {
    NoticeTraces::global().remember(&trace_component(state), notice_id);
}

async fn deliver(
    state: &GatewayState,
    d: &Destination,
    notice: &RevocationNotice,
) -> Result<(), Failed> {
    let span = tracing::info_span!(parent: None, "capif.revocation.deliver", destination = %d, notice_id = %notice.notice_id);
    NoticeTraces::global().continue_in(&span, &trace_component(state), &notice.notice_id);
    deliver_once(state, d, notice).instrument(span).await
}

async fn deliver_once(
    state: &GatewayState,
    d: &Destination,
    notice: &RevocationNotice,
) -> Result<(), Failed> {
    let result = match d {
        Destination::Partner(p) => {
            let Some(link) = state.link(p) else {
                return Err(Failed::Retry(Status::unavailable(format!(
                    "{p} is not a configured partner"
                ))));
            };
            let notice = notice.clone();
            let sent = link
                .call(
                    Instant::now() + ATTEMPT_DEADLINE,
                    move |mut c, remaining| {
                        let mut r = Request::new(notice.clone());
                        r.set_timeout(remaining);
                        async move { c.notify_revocation(r).await }
                    },
                )
                .await;
            if sent.is_ok() {
                link.metrics().revocation_sent();
            }
            sent.map(|_| ())
        }
        Destination::OwnCcf => call_own_ccf(
            &state.ccf,
            &state.ccf_id,
            ATTEMPT_DEADLINE,
            notice.clone(),
            |mut ccf, r| async move { ccf.notify_revocation(r).await },
        )
        .await
        .map(|_| ())
        .map_err(Status::from),
    };
    result.map_err(|s| {
        if s.code() == Code::InvalidArgument {
            Failed::Refused(s)
        } else {
            Failed::Retry(s)
        }
    })
}

async fn drop_row(state: &GatewayState, row: &OutboxRow) {
    if let Err(e) = state.store.remove(row).await {
        tracing::warn!(error = %e, "could not delete an outbox row; it will be sent again");
    }
}

async fn worker(state: &GatewayState, d: &Destination) {
    let Some(waker) = state.outbox.wakers.lock().get(d).cloned() else {
        return;
    };
    let backoff = state.outbox.backoff;
    // Consecutive failed attempts at this destination: its backoff.
    let mut failures = 0u32;
    loop {
        if waker.gone.load(Ordering::SeqCst) {
            return;
        }
        let woken = waker.now.swap(false, Ordering::SeqCst);
        let rows = match state.store.rows(d).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(destination = %d, error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        let mut next: Option<u64> = None;
        // Once a delivery failed, the destination is down: the rest wait for the same retry.
        let mut blocked: Option<u64> = None;
        for mut row in rows {
            let now = now_ms();
            if row.give_up_at_ms <= now {
                drop_row(state, &row).await;
                state.outbox.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(destination = %d, notice_id = %row.notice.notice_id, api_invoker_id = %row.notice.api_invoker_id, attempts = row.attempts, "revocation notice given up: the keys it concerns have expired");
                continue;
            }
            if let Some(until) = blocked {
                next = Some(next.map_or(until, |n| n.min(until)));
                continue;
            }
            if !woken && row.next_attempt_at_ms > now {
                next = Some(next.map_or(row.next_attempt_at_ms, |n| n.min(row.next_attempt_at_ms)));
                continue;
            }
            match deliver(state, d, &row.notice).await {
                Ok(()) => {
                    failures = 0;
                    drop_row(state, &row).await;
                    state.outbox.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(destination = %d, notice_id = %row.notice.notice_id, api_invoker_id = %row.notice.api_invoker_id, attempts = row.attempts, "revocation notice delivered");
                }
                Err(Failed::Refused(s)) => {
                    drop_row(state, &row).await;
                    state.outbox.given_up.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(destination = %d, notice_id = %row.notice.notice_id, error = %s.message(), "revocation notice refused by its destination; dropped");
                }
                Err(Failed::Retry(s)) => {
                    failures = failures.saturating_add(1);
                    row.attempts = row.attempts.saturating_add(1);
                    let wait = u64::try_from(backoff.delay(failures).as_millis()).unwrap_or(0);
                    row.next_attempt_at_ms = now_ms() + wait;
                    if let Err(e) = state.store.reschedule(&row).await {
                        tracing::warn!(error = %e, "could not reschedule an outbox row");
                    }
                    tracing::info!(destination = %d, notice_id = %row.notice.notice_id, attempts = row.attempts, wait_ms = wait, error = %s.message(), "revocation notice not delivered; will retry");
                    next = Some(
                        next.map_or(row.next_attempt_at_ms, |n| n.min(row.next_attempt_at_ms)),
                    );
                    blocked = Some(row.next_attempt_at_ms);
                }
            }
        }
        let mut wait = match next {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => Duration::from_secs(3600),
        };
        // Rows another replica queued wake only that replica's worker: should it stop before
        // delivering them, this one finds them at its next look.
        if let Some(every) = state.store.shared_poll() {
            wait = wait.min(every);
        }
        tokio::select! {
            _ = waker.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
