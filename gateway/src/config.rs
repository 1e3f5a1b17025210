//! The gateway's configuration (TOML, like the CCF's): its own domain and certificate, its CCF,
//! DNS, the cache and outbound policy, and the federation — each partner's CCF id and CA bundle
//! (trust is configured), optionally a static address (location is otherwise discovered by DNS).

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use ccf_core::config_file::ConfigError;

/// `[listen]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// CAPIF-6: the own CCF (Gateway service) and the operator (GatewayAdmin). Mutual TLS, own CA.
    pub capif6: String,
    /// CAPIF-6e: partner gateways (Interconnect service). Mutual TLS, partner CAs.
    pub capif6e: String,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            capif6: "127.0.0.1:7101".into(),
            capif6e: "127.0.0.1:7102".into(),
        }
    }
}

/// `[tls]`: the gateway's own identity (role gateway, issued by the own domain CA).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The own domain's CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The gateway's certificate (PEM), URI SAN capif://<ccf-id>/gateway.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The certificate presented to partner gateways (CAPIF-6e listener and partner links),
    /// URI SAN capif://<ccf-id>/gateway, possibly from a CA other than the domain CA: partners
    /// can then be moved to a new CA for this gateway without touching the internal PKI. The
    /// file may hold the intermediates after the certificate. Unset: `cert`.
    #[serde(default)]
    pub interconnect_cert: Option<PathBuf>,
    /// Its private key (PEM). Set with `interconnect_cert`, or neither.
    #[serde(default)]
    pub interconnect_key: Option<PathBuf>,
}

/// `[ccf]`: the own domain's CCF (CAPIF-6 listener).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CcfLink {
    /// host:port of the CCF's capif listener.
    #[serde(default)]
    pub address: String,
    /// host:port of each replica of the CCF, instead of `address`: requests are balanced over
    /// them and go to the others when one is gone (`ccf_core::balance`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Name in the CCF's certificate.
    #[serde(default = "localhost")]
    pub server_name: String,
}

fn localhost() -> String {
    "localhost".into()
}

/// `[dns]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `ip:port` of the DNS server to ask (a testbed's own). Unset: the system resolver.
    pub nameserver: Option<String>,
    /// Per-query timeout, milliseconds.
    pub timeout_ms: Option<u64>,
}

/// `[cache]` (docs/PROTOCOL.md 6.7 and section 8).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Upper bound on any entry's lifetime, seconds.
    pub max_ttl_secs: u64,
    /// Subtracted from the remaining validity a partner returns, milliseconds.
    pub safety_margin_ms: u64,
    /// Lifetime of negative entries (definite refusals), milliseconds.
    pub negative_ttl_ms: u64,
    /// Capacity in weight units (approximately bytes).
    pub max_weight: u64,
    /// A presented key id that differs from the cached one refreshes an entry: the first time
    /// at once, then at most once in this interval (counted from the last refresh),
    /// milliseconds; within it the cached answer is served. Keeps random key ids from turning
    /// into partner fetches.
    pub refresh_interval_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_ttl_secs: 300,
            safety_margin_ms: 1000,
            negative_ttl_ms: 5000,
            max_weight: 64 * 1024 * 1024,
            refresh_interval_ms: 1000,
        }
    }
}

/// `[outbound]` (docs/PROTOCOL.md 6.6 and section 8).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Budget of a request when the caller sets no deadline, milliseconds.
    pub default_timeout_ms: u64,
    /// Upper bound on any request's budget, milliseconds.
    pub max_timeout_ms: u64,
    /// TCP + TLS connect timeout per target, milliseconds.
    pub connect_timeout_ms: u64,
    /// Retries of a call that failed with a retryable code.
    pub max_retries: u32,
    /// Retries allowed per request made (token bucket refill), e.g. 0.2.
    pub retry_budget_ratio: f64,
    /// Outbound fetches (security information, token key sets) per partner per second: the
    /// refill of a token bucket. Beyond it a fetch is refused with `RESOURCE_EXHAUSTED` /
    /// `OUTBOUND_BUDGET_EXHAUSTED`; cache hits and revocation pushes are not counted.
    pub fetch_rate_per_sec: u32,
    /// Size of that bucket: fetches allowed at once after a quiet period.
    pub fetch_burst: u32,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            default_timeout_ms: 3000,
            max_timeout_ms: 10_000,
            connect_timeout_ms: 1000,
            max_retries: 2,
            retry_budget_ratio: 0.2,
            fetch_rate_per_sec: 100,
            fetch_burst: 1000,
        }
    }
}

/// `[revocation]`: how the outbox retries and how long notices are kept (docs/PROTOCOL.md 6.8
/// and section 8).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    /// Upper bound of the first retry's wait, milliseconds; doubles per failure.
    pub initial_backoff_ms: u64,
    /// Upper bound of every retry's wait, milliseconds: a destination that comes back is
    /// served within about this much.
    pub max_backoff_ms: u64,
    /// The longest validity a key of the own CCF may have, seconds. A fetch record is written
    /// for this long before the key leaves (then lowered to the key's real expiry), and a
    /// notice without `not_after_unix_ms` is kept this long.
    pub max_key_validity_secs: u64,
    /// Most notices remembered for idempotency; beyond it the oldest are forgotten.
    pub max_seen_notices: u64,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 100,
            max_backoff_ms: 1500,
            max_key_validity_secs: 86_400,
            max_seen_notices: 100_000,
        }
    }
}

/// One `[[partner]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// The partner's CCF id (domain).
    pub ccf_id: String,
    /// The partner's CA bundle (PEM). Its gateway's certificate must chain to it.
    pub ca_cert: PathBuf,
    /// Static `host:port` of the partner's gateway; unset: DNS SRV `_capif-6e._tcp.<ccf_id>`.
    #[serde(default)]
    pub address: Option<String>,
    /// The CAs that may issue this partner's invokers' certificates (method 2, PEM bundle): a
    /// partner's CCF may name only these for its invokers. Unset: `ca_cert`.
    #[serde(default)]
    pub invoker_ca_cert: Option<PathBuf>,
}

/// `[reload]`: live reconfiguration (docs/OPERATIONS.md, "Reloading the configuration").
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// How often the configuration file and every PEM file it names are compared with what was
    /// last read (by hash), milliseconds; a change reloads. 0: only GatewayAdmin.Reload and
    /// SIGHUP reload.
    pub poll_interval_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 2000,
        }
    }
}

/// The whole gateway configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The own domain.
    pub ccf_id: String,
    /// Where the gateway keeps fetch records, its revocation outbox and the notices it saw
    /// (created 0700). Unset: in memory, lost at a restart (a warning at start says so).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Where that state lives (`[store]`): redb in `state_dir` (the default) or a PostgreSQL
    /// database the domain's gateway replicas share (`backend = "postgres"`, `url`,
    /// `pool_size`; docs/OPERATIONS.md).
    #[serde(default)]
    pub store: ccf_core::pg::StoreConfig,
    /// Revocation delivery.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Own identity.
    pub tls: TlsConfig,
    /// Own CCF.
    pub ccf: CcfLink,
    /// DNS.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Cache policy.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Outbound policy.
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// The federation.
    #[serde(default, rename = "partner")]
    pub partners: Vec<PartnerConfig>,
    /// Connection caps, timeouts and message limits of both listeners.
    #[serde(default)]
    pub limits: ccf_core::limits::ListenerLimits,
    /// Live reconfiguration.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// The `/metrics` listener (off unless set).
    #[serde(default)]
    pub metrics: ccf_core::metrics::MetricsConfig,
    /// Span export and the trace boundary with partners.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]` (docs/OPERATIONS.md, "Traces").
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint spans are exported to (`http://host:4317`). Unset: nothing leaves.
    pub otlp_endpoint: Option<String>,
    /// `continue` (default): one trace across the partner boundary, our `traceparent` sent to
    /// partners and theirs continued. `restart`: nothing of our traces is sent to partners, and
    /// what a partner asks starts a new trace here, linked to the partner's.
    pub partner_traces: ccf_core::telemetry::PartnerTraces,
}

impl GatewayConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        ccf_core::config_file::parse(text, origin)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        ccf_core::config_file::load(path)
    }
}
