//! The gateway's Prometheus families (every one is listed in docs/OPERATIONS.md, "Metrics").
//!
//! Per-partner series are written at scrape time from the federation current at that moment
//! ([`GatewayCollector`]): each partner's own counters live with its link ([`PartnerMetrics`],
//! handed on to the successor link by a reload like its budgets), so a reload that changes a
//! partner keeps its history, and one that removes a partner leaves none of its series behind.
//! What the gateway already counts for `GatewayAdmin.GetStatus` (the cache's counters, the
//! partners' state, reloads, outbox depths) is read there, not counted twice.
//!
//! Label values are bounded: partner names come from the configuration, `rpc` and `direction`
//! are compile-time strings, outcomes are gRPC code and `ErrorReason` names
//! ([`ccf_core::metrics::OutcomeLabels`]). No invoker id, key id or key ever becomes a label.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ccf_core::metrics::{
    CertLabels, CounterSet, Histogram, ListenerMetrics, NO_LABELS, OutcomeLabels, PartnerLabel,
    Registry, Scrape, latency_histogram, not_after_unix,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use tonic::Status;

use crate::cache::Served;
use crate::credentials::CertSlot;
use crate::state::GatewayState;
use crate::store::Destination;

/// Which side of a request about a partner this gateway is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The own CCF asked about a partner's invoker or keys: this gateway asks the partner
    /// (or answers from its cache).
    Outbound,
    /// The partner's gateway asked this one.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Labels of `capif_gateway_requests_total` (with the partner's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RequestLabels {
    /// [`Direction`].
    pub direction: &'static str,
    /// The RPC, as the contract names it (`FetchSecurityInformation`).
    pub rpc: &'static str,
    /// How it ended.
    #[prometheus(flatten)]
    pub outcome: OutcomeLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabel {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Debug)]
struct PartnerInner {
    requests: CounterSet<RequestLabels>,
    fetch_hit: Histogram,
    fetch_miss: Histogram,
    upstream_time: Histogram,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    revocations_sent: AtomicU64,
    revocations_applied: AtomicU64,
    revocations_duplicate: AtomicU64,
}

/// What this gateway counts about one partner. Cloning shares the counters.
#[derive(Clone, Debug)]
pub struct PartnerMetrics(Arc<PartnerInner>);

impl Default for PartnerMetrics {
    fn default() -> Self {
        Self(Arc::new(PartnerInner {
            requests: CounterSet::default(),
            fetch_hit: latency_histogram(),
            fetch_miss: latency_histogram(),
            upstream_time: latency_histogram(),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            revocations_sent: AtomicU64::new(0),
            revocations_applied: AtomicU64::new(0),
            revocations_duplicate: AtomicU64::new(0),
        }))
    }
}

impl PartnerMetrics {
    /// Counts one request about this partner and how it ended.
    pub fn request<T>(&self, direction: Direction, rpc: &'static str, result: &Result<T, Status>) {
        self.0.requests.inc(RequestLabels {
            direction: direction.as_str(),
            rpc,
            outcome: OutcomeLabels::of(result),
        });
    }

    /// Requests counted with these labels (tests).
    pub fn requests(&self, direction: Direction, rpc: &'static str, outcome: OutcomeLabels) -> u64 {
        self.0.requests.get(&RequestLabels {
            direction: direction.as_str(),
            rpc,
            outcome,
        })
    }

    /// The time the own CCF's `FetchSecurityInformation` about this partner's invoker took.
    pub fn fetch_served(&self, served: Served, took: Duration) {
        let h = if served.from_cache() {
            &self.0.fetch_hit
        } else {
            &self.0.fetch_miss
        };
        h.observe(took.as_secs_f64());
    }

    /// One call on the partner's link (retries included) took `took`.
    pub(crate) fn upstream_call(&self, took: Duration) {
        self.0.upstream_time.observe(took.as_secs_f64());
    }

    /// A connection to one of the partner's gateway targets was made.
    pub(crate) fn connected(&self) {
        self.0.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection attempt to one of the partner's gateway targets failed (TCP, TLS or time).
    pub(crate) fn connect_failed(&self) {
        self.0.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The partner acknowledged a revocation notice from the outbox.
    pub fn revocation_sent(&self) {
        self.0.revocations_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A revocation notice from the partner was acknowledged: acted on, or a repeat.
    pub fn revocation_received(&self, duplicate: bool) {
        let n = if duplicate {
            &self.0.revocations_duplicate
        } else {
            &self.0.revocations_applied
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes every gateway family from the gateway's state at scrape time.
#[derive(Debug)]
pub struct GatewayCollector {
    state: Arc<GatewayState>,
    own: Arc<CertSlot>,
    interconnect: Arc<CertSlot>,
}

/// The gateway's registry: the listener families (returned, for the listeners' gates) and
/// [`GatewayCollector`] over `state` and the two identities.
pub fn registry(
    state: Arc<GatewayState>,
    own: Arc<CertSlot>,
    interconnect: Arc<CertSlot>,
) -> (Registry, ListenerMetrics) {
    let mut registry = Registry::default();
    let listeners = ListenerMetrics::register(&mut registry);
    registry.register_collector(Box::new(GatewayCollector {
        state,
        own,
        interconnect,
    }));
    (registry, listeners)
}

fn end_entity_expiry(slot: &CertSlot) -> Option<i64> {
    not_after_unix(slot.current().cert.first()?.as_ref())
}

impl Collector for GatewayCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.state;
        let federation = s.partners();
        let links: Vec<_> = federation
            .ids()
            .filter_map(|id| {
                let label = PartnerLabel {
                    partner: id.to_string(),
                };
                Some((label, id.clone(), federation.link(id)?.clone()))
            })
            .collect();
        let mut w = Scrape::new(encoder);
        let per = |f: &dyn Fn(&PartnerMetrics) -> u64| {
            links
                .iter()
                .map(|(p, _, l)| (p.clone(), f(l.metrics())))
                .collect::<Vec<_>>()
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        w.counters(
            "capif_gateway_requests",
            "Requests about a partner, by direction (outbound: the own CCF asked about the \
             partner's invoker; inbound: the partner asked), RPC, gRPC code and ErrorReason",
            links.iter().flat_map(|(p, _, l)| {
                l.metrics()
                    .0
                    .requests
                    .snapshot()
                    .into_iter()
                    .map(move |(r, v)| ((p.clone(), r), v))
            }),
        )?;
        w.histograms(
            "capif_gateway_fetch_duration_seconds",
            "Time to answer the own CCF's FetchSecurityInformation about a partner's invoker, \
             by cache (hit: from the cache; miss: fetched from the partner or waited for)",
            links.iter().flat_map(|(p, _, l)| {
                let m = &l.metrics().0;
                [
                    ((p.clone(), CacheLabel { cache: "hit" }), &m.fetch_hit),
                    ((p.clone(), CacheLabel { cache: "miss" }), &m.fetch_miss),
                ]
            }),
        )?;
        w.histograms(
            "capif_gateway_upstream_rq_time_seconds",
            "Time of each call to a partner's gateway, retries included",
            links
                .iter()
                .map(|(p, _, l)| (p.clone(), &l.metrics().0.upstream_time)),
        )?;
        let states: Vec<_> = links
            .iter()
            .map(|(p, _, l)| (p.clone(), l.state()))
            .collect();
        w.counters(
            "capif_gateway_upstream_rq",
            "Calls to a partner's gateway (each with its retries)",
            states.iter().map(|(p, st)| (p.clone(), st.requests)),
        )?;
        w.counters(
            "capif_gateway_upstream_rq_failed",
            "Calls to a partner's gateway that did not reach it (unreachable or timed out); a \
             refusal from the partner is an answer, not a failure",
            states.iter().map(|(p, st)| (p.clone(), st.failures)),
        )?;
        w.counters(
            "capif_gateway_upstream_cx",
            "Connections made to a partner's gateway",
            per(&|m| load(&m.0.connects)),
        )?;
        w.counters(
            "capif_gateway_upstream_cx_connect_fail",
            "Connection attempts to a partner's gateway target that failed (TCP, TLS or timeout)",
            per(&|m| load(&m.0.connect_failures)),
        )?;
        w.gauges(
            "capif_gateway_partner_alive",
            "1 when the latest call to the partner's gateway reached it, 0 when it failed or \
             before the first call",
            states.iter().map(|(p, st)| {
                let alive =
                    st.last_success_unix_ms > 0 && st.last_success_unix_ms >= st.last_error_unix_ms;
                (p.clone(), i64::from(alive))
            }),
        )?;
        w.gauges(
            "capif_gateway_partner_last_success_timestamp_seconds",
            "When a call to the partner's gateway last reached it, unix time (absent before \
             the first)",
            states
                .iter()
                .filter(|(_, st)| st.last_success_unix_ms > 0)
                .map(|(p, st)| (p.clone(), st.last_success_unix_ms as f64 / 1000.0)),
        )?;
        w.counters(
            "capif_gateway_outbound_budget_refused",
            "Fetches from a partner refused by its outbound budget (OUTBOUND_BUDGET_EXHAUSTED)",
            links
                .iter()
                .map(|(p, _, l)| (p.clone(), l.fetches_refused())),
        )?;
        w.counters(
            "capif_gateway_revocations_sent",
            "Revocation notices a partner acknowledged (from the outbox)",
            per(&|m| load(&m.0.revocations_sent)),
        )?;
        w.counters(
            "capif_gateway_revocations_received",
            "Revocation notices received from a partner and acknowledged, by result (applied, \
             or duplicate: seen before)",
            links.iter().flat_map(|(p, _, l)| {
                let m = &l.metrics().0;
                [
                    (
                        (p.clone(), ResultLabel { result: "applied" }),
                        load(&m.revocations_applied),
                    ),
                    (
                        (
                            p.clone(),
                            ResultLabel {
                                result: "duplicate",
                            },
                        ),
                        load(&m.revocations_duplicate),
                    ),
                ]
            }),
        )?;
        w.gauges(
            "capif_gateway_revocations_pending",
            "Revocation notices waiting in the outbox for a partner",
            links.iter().map(|(p, id, _)| {
                let depth = s.store.depth_now(&Destination::Partner(id.clone()));
                (p.clone(), depth)
            }),
        )?;

        let c = &s.cache.counters;
        let ev = s.cache.evictions();
        w.gauges(
            "capif_gateway_cache_entries",
            "Entries in the cache (keys and refusals; approximate)",
            [(NO_LABELS, s.cache.entry_count())],
        )?;
        w.counters(
            "capif_gateway_cache_hits",
            "Answers served from a key entry",
            [(NO_LABELS, load(&c.hits))],
        )?;
        w.counters(
            "capif_gateway_cache_misses",
            "Requests that went to a partner (refreshes included)",
            [(NO_LABELS, load(&c.misses))],
        )?;
        w.counters(
            "capif_gateway_cache_coalesced",
            "Requests that waited for another request's fetch of the same key",
            [(NO_LABELS, load(&c.coalesced))],
        )?;
        w.counters(
            "capif_gateway_cache_negative_hits",
            "Refusals served from a refusal entry",
            [(NO_LABELS, load(&c.negative_hits))],
        )?;
        w.counters(
            "capif_gateway_cache_evictions",
            "Entries that left the cache, by cause (size, expired, invalidated)",
            [
                (CauseLabel { cause: "size" }, load(&ev.size)),
                (CauseLabel { cause: "expired" }, load(&ev.expired)),
                (
                    CauseLabel {
                        cause: "invalidated",
                    },
                    load(&ev.invalidated),
                ),
            ],
        )?;
        w.counters(
            "capif_gateway_revocations_published",
            "Revocation notices of its own invokers the own CCF published (repeats not counted)",
            [(NO_LABELS, load(&s.revocations_published))],
        )?;
        w.gauges(
            "capif_gateway_ccf_revocations_pending",
            "Revocation notices from partners waiting in the outbox for the own CCF",
            [(NO_LABELS, s.store.depth_now(&Destination::OwnCcf))],
        )?;
        w.counters(
            "capif_gateway_revocations_given_up",
            "Outbox notices dropped undelivered: the keys they concern expired, or the \
             destination refused them",
            [(NO_LABELS, load(&s.outbox.given_up))],
        )?;
        w.counters(
            "capif_gateway_audit_records_dropped",
            "Audit log lines (keys handed to partners) dropped because the audit writer fell \
             behind",
            [(NO_LABELS, s.audit.dropped())],
        )?;
        w.counters(
            "capif_gateway_reloads",
            "Configuration reloads, by result (ok, refused)",
            [
                (ResultLabel { result: "ok" }, load(&s.reload.reloads)),
                (ResultLabel { result: "refused" }, load(&s.reload.refused)),
            ],
        )?;

        let own = self.own.current();
        let mut certs: Vec<(CertLabels, i64)> = Vec::new();
        let mine = |cert: &'static str, t: Option<i64>| {
            t.map(|t| {
                (
                    CertLabels {
                        cert,
                        partner: String::new(),
                    },
                    t,
                )
            })
        };
        certs.extend(mine("own", end_entity_expiry(&self.own)));
        // The own slot's chain is the certificate then the domain CA, as the config names them.
        if own.cert.len() > 1 {
            certs.extend(mine(
                "domain_ca",
                own.cert.last().and_then(|c| not_after_unix(c.as_ref())),
            ));
        }
        certs.extend(mine("interconnect", end_entity_expiry(&self.interconnect)));
        for (p, id, _) in &links {
            // The bundle's first anchor to expire: the day trust in this partner may break.
            let first = federation
                .trust(id)
                .and_then(|t| t.ca_certs.iter().filter_map(|c| not_after_unix(c)).min());
            if let Some(t) = first {
                let labels = CertLabels {
                    cert: "partner_ca",
                    partner: p.partner.clone(),
                };
                certs.push((labels, t));
            }
        }
        w.gauges(
            "capif_certificate_expiry_timestamp_seconds",
            "notAfter of a certificate this gateway presents (own, interconnect) or trusts \
             (domain_ca; partner_ca: the first of the partner's bundle to expire), unix time",
            certs,
        )
    }
}
