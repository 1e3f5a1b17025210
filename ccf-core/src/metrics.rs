//! Prometheus metrics every component shares: the `/metrics` HTTP listener (OpenMetrics text by
//! `prometheus-client`), the per-listener connection and TLS-handshake families that
//! [`crate::limits::ConnGate`] and [`crate::tls::tls_incoming`] feed, and certificate-expiry
//! gauges. Each component builds one [`Registry`] at start, registers its own families (the
//! gateway's, the CCF's, the AEF's) next to these, and serves it with [`serve`] when its
//! `[metrics] listen` ([`MetricsConfig`]) or `--metrics-listen` names an address.
//!
//! Shared by the components' own families: [`OutcomeLabels`] (how a request ended: gRPC code and
//! `ErrorReason` name), and for state read at scrape time by a collector, [`CounterSet`] and
//! [`Scrape`]: the gateway writes every per-partner series from the federation current at that
//! moment, so a partner removed by a reload leaves no series behind.
//!
//! Labels are bounded by construction: listener names are compile-time strings, handshake
//! outcomes a fixed set ([`HandshakeOutcome`]), partner names come from configuration. Nothing a
//! peer chooses (an invoker id, a key, a token) ever becomes a label.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Scrapes served at once; more wait for a place (a scraper opens one or two).
const MAX_SCRAPE_CONNECTIONS: usize = 16;
/// A scrape connection lives at most this long, whatever the client does.
const SCRAPE_CONNECTION_LIMIT: Duration = Duration::from_secs(30);

/// The content type of the OpenMetrics text exposition (what a Prometheus server asks for).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic Prometheus text format (curl, `promtool check metrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry's exposition in OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoding error would be a bug in a metric type.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The registry's exposition in the classic Prometheus text format (0.0.4), for clients that
/// do not ask for OpenMetrics. The two differ only in framing: a counter family is named with its
/// `_total` suffix in `# HELP`/`# TYPE`, and there is no `# UNIT` or `# EOF`.
pub fn encode_text(registry: &Registry) -> String {
    let open = encode(registry);
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` from `registry` on `listener` (plain HTTP/1.1, as Prometheus scrapes)
/// until `shutdown` completes. Anything else gets 404 (another path) or 405 (another method).
pub fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let (tcp, _) = tokio::select! {
                _ = &mut shutdown => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Over the cap: close at once rather than queue a stranger's connections.
                drop(tcp);
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let io = hyper_util::rt::TokioIo::new(tcp);
                let svc = hyper::service::service_fn(move |req| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &registry)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .max_buf_size(16 * 1024)
                    .serve_connection(io, svc);
                let _ = tokio::time::timeout(SCRAPE_CONNECTION_LIMIT, conn).await;
            });
        }
    })
}

/// Binds `addr` and serves `registry` there; logs where.
pub async fn bind_and_serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "metrics listener ready (GET /metrics)");
    Ok((local, serve(listener, registry, shutdown)))
}

fn answer<B>(req: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, content_type) = if openmetrics {
        (encode(registry), OPENMETRICS_CONTENT_TYPE)
    } else {
        (encode_text(registry), TEXT_CONTENT_TYPE)
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// The listener a connection or handshake metric is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// The listener's name, as its [`crate::limits::ConnGate`] was given (`capif-1e`,
    /// `interconnect`, ...).
    pub listener: &'static str,
}

/// How a TLS handshake on a listener ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// Completed.
    Ok,
    /// The client presented no certificate where one is required.
    NoCertificate,
    /// The client's certificate failed chain validation (unknown issuer, expired, revoked...).
    BadCertificate,
    /// The certificate validated but names an identity this listener refuses.
    IdentityRefused,
    /// No common protocol version, cipher suite or other parameter; or a malformed message.
    Protocol,
    /// The client sent an alert (it refused our certificate, typically).
    PeerAlert,
    /// The handshake did not finish within the listener's handshake timeout.
    Timeout,
    /// The connection closed or failed under the handshake.
    Io,
    /// TLS-PSK: no key is held for the PSK identity offered (or none, or a malformed one, was
    /// offered).
    UnknownPskIdentity,
    /// TLS-PSK: the identity names another key id than the one held.
    StalePskKey,
    /// TLS-PSK: the key held for the identity has expired.
    ExpiredPskKey,
    /// TLS-PSK: the invoker's authorization was revoked.
    RevokedInvoker,
    /// TLS-PSK: the identity is known but the client's key is not the one held.
    BadPsk,
}

impl HandshakeOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoCertificate => "no_certificate",
            Self::BadCertificate => "bad_certificate",
            Self::IdentityRefused => "identity_refused",
            Self::Protocol => "protocol",
            Self::PeerAlert => "peer_alert",
            Self::Timeout => "timeout",
            Self::Io => "io",
            Self::UnknownPskIdentity => "unknown_psk_identity",
            Self::StalePskKey => "stale_key_id",
            Self::ExpiredPskKey => "expired_key",
            Self::RevokedInvoker => "revoked",
            Self::BadPsk => "bad_psk",
        }
    }

    /// Classifies a failed rustls handshake (the error tokio-rustls returns).
    pub fn of_io_error(e: &std::io::Error) -> Self {
        use rustls::Error as E;
        match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
            Some(E::NoCertificatesPresented) => Self::NoCertificate,
            Some(E::InvalidCertificate(rustls::CertificateError::Other(_))) => {
                Self::IdentityRefused
            }
            Some(E::InvalidCertificate(_)) => Self::BadCertificate,
            Some(E::AlertReceived(_)) => Self::PeerAlert,
            Some(_) => Self::Protocol,
            None => Self::Io,
        }
    }
}

/// Labels of a handshake outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// The listener.
    pub listener: &'static str,
    /// [`HandshakeOutcome::as_str`].
    pub result: &'static str,
}

/// Per-listener connection and handshake families (Envoy's `downstream_cx_*` and
/// `ssl.handshake` / `ssl.fail_verify_*` in Prometheus form). Cloning shares the families.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    handshakes: Family<HandshakeLabels, Counter>,
    open: Family<ListenerLabel, Gauge>,
    refused: Family<ListenerLabel, Counter>,
}

impl ListenerMetrics {
    /// Registers the families in `registry` (names prefixed `capif_`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "capif_tls_handshakes",
            "TLS handshakes on a listener, by result (ok or the failure's kind)",
            m.handshakes.clone(),
        );
        registry.register(
            "capif_downstream_cx_active",
            "Connections a listener holds now",
            m.open.clone(),
        );
        registry.register(
            "capif_downstream_cx_overflow",
            "Connections a listener closed at accept because a connection cap was reached",
            m.refused.clone(),
        );
        m
    }

    /// Counts one handshake on `listener`.
    pub fn handshake(&self, listener: &'static str, outcome: HandshakeOutcome) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                listener,
                result: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) fn opened(&self, listener: &'static str) {
        self.open.get_or_create(&ListenerLabel { listener }).inc();
    }

    pub(crate) fn closed(&self, listener: &'static str) {
        self.open.get_or_create(&ListenerLabel { listener }).dec();
    }

    pub(crate) fn overflow(&self, listener: &'static str) {
        self.refused
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }
}

/// Labels of a certificate-expiry gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// What the certificate is: `own` (a listener's or client's identity), `domain_ca`,
    /// `partner_ca`, `interconnect`.
    pub cert: &'static str,
    /// The partner whose trust anchor it is; empty for our own certificates.
    pub partner: String,
}

/// `capif_certificate_expiry_timestamp_seconds`: each certificate's `notAfter` as unix time
/// (alert on `- time() < 14 * 86400`).
#[derive(Clone, Debug, Default)]
pub struct CertExpiry(Family<CertLabels, Gauge>);

impl CertExpiry {
    /// Registers the family in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "capif_certificate_expiry_timestamp_seconds",
            "notAfter of a certificate this component presents or trusts, as unix time",
            m.0.clone(),
        );
        m
    }

    /// Sets the gauge of `cert` (`partner` empty for our own) from a DER certificate; a
    /// certificate that does not parse leaves the gauge alone.
    pub fn set_from_der(&self, cert: &'static str, partner: &str, der: &[u8]) {
        if let Ok((_, c)) = x509_parser::parse_x509_certificate(der) {
            self.set(cert, partner, c.validity().not_after.timestamp());
        }
    }

    /// Sets the gauge of `cert` to `not_after_unix`.
    pub fn set(&self, cert: &'static str, partner: &str, not_after_unix: i64) {
        self.0
            .get_or_create(&CertLabels {
                cert,
                partner: partner.to_owned(),
            })
            .set(not_after_unix);
    }

    /// Drops every gauge of `partner` (a partner removed by a reload).
    pub fn forget_partner(&self, partner: &str) {
        let keys: Vec<CertLabels> = ["partner_ca", "interconnect"]
            .into_iter()
            .map(|cert| CertLabels {
                cert,
                partner: partner.to_owned(),
            })
            .collect();
        for k in keys {
            self.0.remove(&k);
        }
    }
}

/// Buckets in seconds (Prometheus' base unit: `promtool` refuses `_ms` names) for request
/// latencies, from a cache hit (well under a millisecond) to a slow partner (seconds).
pub fn latency_buckets_seconds() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ]
    .into_iter()
}

/// `[metrics]` of every component: where its `/metrics` listener is, if anywhere.
#[derive(Clone, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ip:port` of the `/metrics` listener (plain HTTP). Unset: no listener (the default);
    /// the command line's `--metrics-listen` wins over it.
    pub listen: Option<SocketAddr>,
}

/// `notAfter` of a DER certificate as unix time; `None` if it does not parse.
pub fn not_after_unix(der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

/// The name of a gRPC code as the gRPC specification spells it (`NOT_FOUND`), for labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How a request ended, as two bounded labels: `code` (the gRPC code's name, `OK` on success)
/// and `reason` (the `ErrorReason` name the status carries, `none` without one). A reason that is
/// not one of the contract's (a peer may send anything) counts as `none`: only the enum's names
/// ever become label values.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// [`code_name`].
    pub code: &'static str,
    /// `ErrorReason::as_str_name`, or `none`.
    pub reason: &'static str,
}

/// Labels of an event per security method and outcome (the CCF's negotiations, the AEF's
/// authentication initiations).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodOutcome {
    /// The security method's name (`PSK`, `PKI`, `OAUTH`, ...).
    pub method: &'static str,
    /// How it ended.
    #[prometheus(flatten)]
    pub outcome: OutcomeLabels,
}

impl OutcomeLabels {
    /// A success.
    pub const OK: Self = Self {
        code: "OK",
        reason: "none",
    };

    /// The outcome of a failed request.
    pub fn of_status(status: &tonic::Status) -> Self {
        Self {
            code: code_name(status.code()),
            reason: crate::status::reason_of(status).map_or("none", |r| r.as_str_name()),
        }
    }

    /// The outcome of a request's result.
    pub fn of<T>(result: &Result<T, tonic::Status>) -> Self {
        match result {
            Ok(_) => Self::OK,
            Err(s) => Self::of_status(s),
        }
    }
}

/// The `partner` label: a partner domain as the configuration names it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PartnerLabel {
    /// The partner's CCF id.
    pub partner: String,
}

/// Counters keyed by a bounded label set `L`, kept apart from any registry so that a
/// [`prometheus_client::collector::Collector`] can write them under outer labels of its own
/// (a partner's counters disappear with the partner; a pair `(outer, own)` of label sets is one
/// label set). Cloning shares the counters.
#[derive(Debug)]
pub struct CounterSet<L>(Arc<std::sync::Mutex<std::collections::BTreeMap<L, u64>>>);

impl<L> Clone for CounterSet<L> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<L> Default for CounterSet<L> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<L: Ord + Clone> CounterSet<L> {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<L, u64>> {
        // A poisoned map only follows a panic elsewhere; its counts are still right.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one to the counter of `labels`.
    pub fn inc(&self, labels: L) {
        *self.map().entry(labels).or_insert(0) += 1;
    }

    /// The counter of `labels`.
    pub fn get(&self, labels: &L) -> u64 {
        self.map().get(labels).copied().unwrap_or(0)
    }

    /// Every counter, in label order.
    pub fn snapshot(&self) -> Vec<(L, u64)> {
        self.map().iter().map(|(l, v)| (l.clone(), *v)).collect()
    }
}

/// No labels: a series that is the whole family.
pub const NO_LABELS: [(&str, &str); 0] = [];

/// What a [`prometheus_client::collector::Collector`] writes at scrape time: one family per
/// call, each series with its labels.
pub struct Scrape<'a>(prometheus_client::encoding::DescriptorEncoder<'a>);

impl<'a> Scrape<'a> {
    /// Over the collector's encoder.
    pub fn new(encoder: prometheus_client::encoding::DescriptorEncoder<'a>) -> Self {
        Self(encoder)
    }

    /// A counter family `name` (without `_total`, which the exposition adds).
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, u64)>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in series {
            family
                .encode_family(&labels)?
                .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&v, None)?;
        }
        Ok(())
    }

    /// A gauge family `name`.
    pub fn gauges<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in series {
            family.encode_family(&labels)?.encode_gauge(&v)?;
        }
        Ok(())
    }

    /// A histogram family `name`.
    pub fn histograms<'h, L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, &'h Histogram)>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in series {
            h.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A latency histogram with [`latency_buckets_seconds`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets_seconds())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_and_expiry_families_encode_with_their_labels() {
        let mut reg = Registry::default();
        let l = ListenerMetrics::register(&mut reg);
        let c = CertExpiry::register(&mut reg);
        l.handshake("interconnect", HandshakeOutcome::BadCertificate);
        l.handshake("interconnect", HandshakeOutcome::Ok);
        l.handshake("interconnect", HandshakeOutcome::Ok);
        l.opened("interconnect");
        c.set("partner_ca", "operator-b.test", 1_900_000_000);
        let text = encode(&reg);
        assert!(
            text.contains(r#"capif_tls_handshakes_total{listener="interconnect",result="ok"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"result="bad_certificate"} 1"#), "{text}");
        assert!(text.contains(r#"capif_downstream_cx_active{listener="interconnect"} 1"#));
        assert!(text.contains(
            r#"capif_certificate_expiry_timestamp_seconds{cert="partner_ca",partner="operator-b.test"} 1900000000"#
        ));
        c.forget_partner("operator-b.test");
        assert!(!encode(&reg).contains("operator-b.test"));
        assert!(text.ends_with("# EOF\n"));
        let classic = encode_text(&reg);
        assert!(classic.contains("# HELP capif_tls_handshakes_total TLS handshakes"));
        assert!(classic.contains("# TYPE capif_tls_handshakes_total counter"));
        assert!(classic.contains("# TYPE capif_downstream_cx_active gauge"));
        assert!(!classic.contains("# EOF"));
    }

    /// A collector's families come out with the outer label first, counters with `_total`,
    /// histograms with their buckets, and an unlabelled gauge without braces.
    #[test]
    fn a_collector_writes_its_families_under_outer_labels() {
        #[derive(Debug)]
        struct C(CounterSet<OutcomeLabels>, Histogram);
        impl prometheus_client::collector::Collector for C {
            fn encode(
                &self,
                encoder: prometheus_client::encoding::DescriptorEncoder,
            ) -> Result<(), std::fmt::Error> {
                let p = PartnerLabel {
                    partner: "operator-b.test".into(),
                };
                let mut s = Scrape::new(encoder);
                s.counters(
                    "t_requests",
                    "requests",
                    self.0
                        .snapshot()
                        .into_iter()
                        .map(|(l, v)| ((p.clone(), l), v)),
                )?;
                s.gauges("t_up", "up", [(NO_LABELS, 1i64)])?;
                s.histograms("t_seconds", "latency", [(p.clone(), &self.1)])
            }
        }
        let set = CounterSet::default();
        set.inc(OutcomeLabels::OK);
        set.inc(OutcomeLabels::OK);
        let refused =
            crate::status::status_with_reason(tonic::Code::NotFound, "INVOKER_NOT_FOUND", "no");
        set.inc(OutcomeLabels::of_status(&refused));
        // A reason outside the contract is not a label value.
        let odd = crate::status::status_with_reason(tonic::Code::Internal, "MADE_UP", "x");
        assert_eq!(OutcomeLabels::of_status(&odd).reason, "none");
        assert_eq!(set.get(&OutcomeLabels::OK), 2);
        let h = latency_histogram();
        h.observe(0.002);
        let mut reg = Registry::default();
        reg.register_collector(Box::new(C(set, h)));
        let text = encode_text(&reg);
        for line in [
            r#"t_requests_total{partner="operator-b.test",code="OK",reason="none"} 2"#,
            r#"t_requests_total{partner="operator-b.test",code="NOT_FOUND",reason="INVOKER_NOT_FOUND"} 1"#,
            "# TYPE t_requests_total counter",
            "t_up 1",
            r#"t_seconds_bucket{le="0.0025",partner="operator-b.test"} 1"#,
            r#"t_seconds_count{partner="operator-b.test"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[tokio::test]
    async fn the_listener_serves_metrics_and_nothing_else() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut reg = Registry::default();
        let l = ListenerMetrics::register(&mut reg);
        l.handshake("capif-1e", HandshakeOutcome::Ok);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, task) =
            bind_and_serve("127.0.0.1:0".parse().unwrap(), Arc::new(reg), async move {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(
            ok.contains("# TYPE capif_tls_handshakes_total counter"),
            "{ok}"
        );
        assert!(!ok.contains("# EOF"), "{ok}");
        assert!(ok.contains(r#"capif_tls_handshakes_total{listener="capif-1e",result="ok"} 1"#));
        let other = get("/debug").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let _ = stop_tx.send(());
        task.await.unwrap();
    }
}
