//! One partner domain as seen from this gateway: a single reused gRPC channel whose connector
//! discovers the partner's gateway (DNS or static), fails over between targets and verifies each
//! with the partner's trust; per-partner state for inspection; deadlines and a retry budget on
//! every call (docs/PROTOCOL.md 6.6). A dead partner costs only its own callers their deadline.

use std::future::Future;
use std::io;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capif_proto::v1::{ErrorReason, PartnerState, interconnect_client::InterconnectClient};
use ccf_core::clock::now_ms;
use ccf_core::grpc::{error_reason, error_status};
use ccf_core::ids::CcfId;
use ccf_core::telemetry::TracedChannel;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

use crate::discovery::Discovery;
use crate::metrics::PartnerMetrics;
use crate::trust::PartnerTrust;

/// What the admin RPC shows of a partner.
#[derive(Debug, Default, Clone)]
pub struct PartnerStats {
    last_success_ms: u64,
    last_error: String,
    last_error_reason: String,
    last_error_ms: u64,
    resolved: Vec<String>,
    requests: u64,
    failures: u64,
}

/// Retries allowed in proportion to requests made (a token bucket), so a failing partner is not
/// hammered by retries of every request.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: Mutex<f64>,
    ratio: f64,
}

impl RetryBudget {
    const MAX_TOKENS: f64 = 10.0;

    /// A budget granting `ratio` retries per request, starting full.
    pub fn new(ratio: f64) -> Self {
        Self {
            tokens: Mutex::new(Self::MAX_TOKENS),
            ratio: ratio.max(0.0),
        }
    }

    fn deposit(&self) {
        if let Ok(mut t) = self.tokens.lock() {
            *t = (*t + self.ratio).min(Self::MAX_TOKENS);
        }
    }

    fn withdraw(&self) -> bool {
        match self.tokens.lock() {
            Ok(mut t) if *t >= 1.0 => {
                *t -= 1.0;
                true
            }
            _ => false,
        }
    }
}

/// The outbound link to one partner.
pub struct PartnerLink {
    /// The partner.
    pub ccf_id: CcfId,
    /// Its configured static address (else DNS SRV locates it).
    pub static_address: Option<String>,
    channel: TracedChannel,
    kept: Kept,
    max_retries: u32,
    max_message_bytes: usize,
}

/// What a link hands on to its successor when a reload replaces it (new CA bundle or address):
/// the operator's view and the budgets, so that a reload neither resets a partner's history nor
/// refills its budgets.
#[derive(Clone)]
struct Kept {
    stats: Arc<Mutex<PartnerStats>>,
    budget: Arc<RetryBudget>,
    fetch_budget: Arc<governor::DefaultDirectRateLimiter>,
    fetches_refused: Arc<std::sync::atomic::AtomicU64>,
    metrics: PartnerMetrics,
}

impl std::fmt::Debug for PartnerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartnerLink({})", self.ccf_id)
    }
}

/// Outbound policy for a link.
#[derive(Clone, Debug)]
pub struct LinkPolicy {
    /// Per-target TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Retries per call.
    pub max_retries: u32,
    /// Retry budget ratio.
    pub retry_budget_ratio: f64,
    /// Outbound fetches per second (bucket refill).
    pub fetch_rate_per_sec: u32,
    /// Outbound fetch bucket size.
    pub fetch_burst: u32,
    /// Largest answer accepted from the partner, bytes.
    pub max_message_bytes: usize,
    /// Whether our trace context is sent to partners (`[telemetry] partner_traces`).
    pub partner_traces: ccf_core::telemetry::PartnerTraces,
}

impl LinkPolicy {
    fn fetch_quota(&self) -> governor::Quota {
        let rate =
            std::num::NonZeroU32::new(self.fetch_rate_per_sec.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.fetch_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        governor::Quota::per_second(rate).allow_burst(burst)
    }
}

impl PartnerLink {
    /// A lazily connecting link; nothing is dialled until the first call. With `previous`, its
    /// successor (new channel, new trust or address) that keeps `previous`'s state and budgets;
    /// calls in flight on `previous` finish on its channel.
    pub fn new(
        trust: &PartnerTrust,
        tls: Arc<rustls::ClientConfig>,
        discovery: Discovery,
        static_address: Option<String>,
        policy: &LinkPolicy,
        previous: Option<&PartnerLink>,
    ) -> Self {
        let kept = match previous {
            Some(p) => p.kept.clone(),
            None => Kept {
                stats: Arc::default(),
                budget: Arc::new(RetryBudget::new(policy.retry_budget_ratio)),
                fetch_budget: Arc::new(governor::RateLimiter::direct(policy.fetch_quota())),
                fetches_refused: Arc::default(),
                metrics: PartnerMetrics::default(),
            },
        };
        let stats = kept.stats.clone();
        let connector = TlsConnector::from(tls);
        let partner = trust.ccf_id.clone();
        let stats2 = stats.clone();
        let metrics = kept.metrics.clone();
        let connect_timeout = policy.connect_timeout;
        let address = static_address.clone();
        let channel = Endpoint::from_static("http://partner.invalid")
            .connect_timeout(connect_timeout * 4)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_uri| {
                let connector = connector.clone();
                let discovery = discovery.clone();
                let partner = partner.clone();
                let static_address = address.clone();
                let stats = stats2.clone();
                let metrics = metrics.clone();
                async move {
                    let targets = discovery
                        .targets(&partner, static_address.as_deref())
                        .await
                        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
                    if let Ok(mut s) = stats.lock() {
                        s.resolved = targets
                            .iter()
                            .map(|t| format!("{} ({})", t.addr, t.host))
                            .collect();
                    }
                    let mut errors = Vec::new();
                    for t in targets {
                        let name = ServerName::try_from(t.host.clone())
                            .unwrap_or_else(|_| ServerName::from(t.addr.ip()));
                        let attempt = async {
                            let tcp = TcpStream::connect(t.addr).await?;
                            let _ = tcp.set_nodelay(true);
                            connector.connect(name, tcp).await
                        };
                        match tokio::time::timeout(connect_timeout, attempt).await {
                            Ok(Ok(tls)) => {
                                metrics.connected();
                                return Ok(hyper_util::rt::TokioIo::new(tls));
                            }
                            Ok(Err(e)) => errors.push(format!("{}: {e}", t.addr)),
                            Err(_) => errors.push(format!("{}: connect timed out", t.addr)),
                        }
                        metrics.connect_failed();
                    }
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("no gateway of {partner} answered ({})", errors.join("; ")),
                    ))
                }
            }));
        // Its spans name the partner's domain: its address is whatever DNS said this time.
        let channel = TracedChannel::new(channel, trust.ccf_id.as_str())
            .at_partner_boundary(policy.partner_traces);
        Self {
            ccf_id: trust.ccf_id.clone(),
            static_address,
            channel,
            kept,
            max_retries: policy.max_retries,
            max_message_bytes: policy.max_message_bytes,
        }
    }

    /// Takes one outbound fetch from this partner's budget, or refuses with
    /// `RESOURCE_EXHAUSTED` / `OUTBOUND_BUDGET_EXHAUSTED`. Only this partner's callers wait.
    pub fn take_fetch(&self) -> Result<(), Status> {
        if self.kept.fetch_budget.check().is_ok() {
            return Ok(());
        }
        let n = self
            .kept
            .fetches_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n.is_power_of_two() {
            tracing::warn!(partner = %self.ccf_id, refused = n, "outbound fetch budget spent; fetches refused");
        }
        Err(error_status(
            Code::ResourceExhausted,
            ErrorReason::OutboundBudgetExhausted,
            format!(
                "the budget of fetches to partner {} is spent for now; retry in a second",
                self.ccf_id
            ),
        ))
    }

    /// This partner's metrics (kept by a successor link, like the budgets).
    pub fn metrics(&self) -> &PartnerMetrics {
        &self.kept.metrics
    }

    /// Fetches refused by the budget since start.
    pub fn fetches_refused(&self) -> u64 {
        self.kept
            .fetches_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls the partner with `f` until `deadline`, retrying retryable failures within budget.
    pub async fn call<T, F, Fut>(&self, deadline: Instant, f: F) -> Result<T, Status>
    where
        F: Fn(InterconnectClient<TracedChannel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let result = self.call_within(deadline, f).await;
        self.kept.metrics.upstream_call(started.elapsed());
        result
    }

    async fn call_within<T, F, Fut>(&self, deadline: Instant, f: F) -> Result<T, Status>
    where
        F: Fn(InterconnectClient<TracedChannel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.kept.budget.deposit();
        let mut attempt = 0u32;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.failed(self.timeout_status()));
            }
            // A partner's answers are held to the same size as our own requests.
            let client = InterconnectClient::new(self.channel.clone())
                .max_decoding_message_size(self.max_message_bytes);
            match tokio::time::timeout(remaining, f(client, remaining)).await {
                Err(_) => return Err(self.failed(self.timeout_status())),
                Ok(Ok(rsp)) => {
                    self.succeeded();
                    return Ok(rsp.into_inner());
                }
                Ok(Err(status)) => {
                    let transport = error_reason(&status).is_none();
                    if status.code() == Code::Unavailable
                        && attempt < self.max_retries
                        && self.kept.budget.withdraw()
                    {
                        attempt += 1;
                        let backoff = Duration::from_millis(25 << attempt).min(remaining / 4);
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    if status.code() == Code::DeadlineExceeded {
                        return Err(self.failed(self.timeout_status()));
                    }
                    if transport
                        && matches!(
                            status.code(),
                            Code::Unavailable | Code::Unknown | Code::Internal
                        )
                    {
                        let msg = format!(
                            "partner {} is unreachable: {}",
                            self.ccf_id,
                            status.message()
                        );
                        return Err(self.failed(error_status(
                            Code::Unavailable,
                            ErrorReason::PartnerUnavailable,
                            msg,
                        )));
                    }
                    // A definite answer from the partner is not a failure of the link.
                    self.succeeded();
                    return Err(status);
                }
            }
        }
    }

    fn timeout_status(&self) -> Status {
        error_status(
            Code::DeadlineExceeded,
            ErrorReason::PartnerTimeout,
            format!("partner {} did not answer within the deadline", self.ccf_id),
        )
    }

    fn succeeded(&self) {
        if let Ok(mut s) = self.kept.stats.lock() {
            s.requests += 1;
            s.last_success_ms = now_ms();
            s.last_error.clear();
            s.last_error_reason.clear();
        }
    }

    fn failed(&self, status: Status) -> Status {
        if let Ok(mut s) = self.kept.stats.lock() {
            s.requests += 1;
            s.failures += 1;
            s.last_error = status.message().to_string();
            s.last_error_reason = error_reason(&status).unwrap_or_default();
            s.last_error_ms = now_ms();
        }
        tracing::warn!(partner = %self.ccf_id, code = ?status.code(), error = %status.message(), "partner call failed");
        status
    }

    /// The admin view of this partner.
    pub fn state(&self) -> PartnerState {
        let s = self
            .kept
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        PartnerState {
            ccf_id: self.ccf_id.to_string(),
            last_success_unix_ms: s.last_success_ms,
            last_error: s.last_error,
            last_error_unix_ms: s.last_error_ms,
            resolved_targets: s.resolved,
            requests: s.requests,
            failures: s.failures,
            last_error_reason: s.last_error_reason,
            static_address: self.static_address.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}
