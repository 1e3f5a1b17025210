//! The CCF's configuration: one TOML file (see `demo/ccf.toml`), overridable by flags and
//! environment variables in `main.rs`. Plain data, validated when the CCF starts.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use ccf_core::registry::AefConfig;

/// The demo configuration shipped in the binary (`ccf serve --demo`).
pub const DEMO_CONFIG: &str = include_str!("../demo/ccf.toml");

pub use ccf_core::config_file::ConfigError;

/// A pre-provisioned onboarding credential (TS 33.122 6.1). Never printed.
#[derive(Clone)]
pub struct OnboardingCredential(Zeroizing<String>);

impl<'de> Deserialize<'de> for OnboardingCredential {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(Zeroizing::new(s)))
    }
}

impl OnboardingCredential {
    /// The credential text. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for OnboardingCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[listen]`: where the CCF listens.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Onboarding (TLS, server authentication only).
    pub onboarding: String,
    /// CAPIF-1e, CAPIF-3 and CAPIF-6 (mutual TLS 1.3, rustls).
    pub capif: String,
    /// CAPIF-1e alone, TLS 1.2 (OpenSSL): set exactly when `security.capif1e` is
    /// `tls12-annex-a`. The `capif` listener then still serves AEFs, the gateway and the
    /// operator, and refuses to derive AEFPSKs.
    pub capif1e: Option<String>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            onboarding: "127.0.0.1:7001".into(),
            capif: "127.0.0.1:7002".into(),
            capif1e: None,
        }
    }
}

/// `[pki]`: the domain CA and the CCF's own certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PkiConfig {
    /// CA certificate PEM file; with `ca_key`. Unset: the CA in the state directory (generated on
    /// first start).
    pub ca_cert: Option<PathBuf>,
    /// CA private key PEM file.
    pub ca_key: Option<PathBuf>,
    /// DNS names / IP addresses the CCF's server certificate carries.
    pub server_names: Vec<String>,
    /// Validity of issued certificates, days.
    pub cert_validity_days: i64,
}

impl Default for PkiConfig {
    fn default() -> Self {
        Self {
            ca_cert: None,
            ca_key: None,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            cert_validity_days: 365,
        }
    }
}

/// `[security]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Validity of an AEFPSK (and of other security contexts), seconds. Default one hour.
    pub aef_psk_validity_secs: u64,
    /// How often expired security contexts (with their AEFPSKs) are deleted from the store,
    /// seconds; also how long a context stays after its expiry, so that AEFs asking just after
    /// it get `KEY_EXPIRED` rather than `NO_SECURITY_CONTEXT`. Default 60, 1 to 86400.
    pub context_purge_interval_secs: u64,
    /// How long an invoker of another domain stays refused at this domain's AEFs after this
    /// domain's operator revoked it here (`RevokeAuthorization` naming its home domain),
    /// seconds. Nothing is revoked at its home, where it may obtain new keys meanwhile, so the
    /// refusal is held for a fixed time rather than for one key. Default one hour.
    pub foreign_revocation_secs: u64,
    /// The domain's CAPIF-1e profile, where AEFPSKs are derived from (docs/PROTOCOL.md section
    /// 4): `tls13-exporter` (default; on the `capif` listener) or `tls12-annex-a` (TS 33.122
    /// A.1 as written; on the TLS 1.2 `listen.capif1e` listener).
    pub capif1e: ccf_core::kdf::Capif1eProfile,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            aef_psk_validity_secs: 3600,
            context_purge_interval_secs: 60,
            foreign_revocation_secs: 3600,
            capif1e: Default::default(),
        }
    }
}

/// `[onboarding]`.
/// `[token]`: method 3 access tokens.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Lifetime of issued access tokens, seconds (never beyond the security context's validity).
    pub lifetime_secs: u64,
    /// How often holders of this CCF's key set should refresh it, seconds.
    pub key_set_refresh_secs: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            lifetime_secs: 600,
            key_set_refresh_secs: 300,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnboardingConfig {
    /// Pre-provisioned credentials; each may onboard one invoker.
    pub credentials: Vec<OnboardingCredential>,
}

/// `[gateway]`: this domain's interconnect gateway (CAPIF-6), for invokers of other domains.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayLinkConfig {
    /// host:port of the gateway's CAPIF-6 listener.
    #[serde(default)]
    pub address: String,
    /// host:port of each replica of the gateway, instead of `address`: requests are balanced
    /// over them and go to the others when one is gone (`ccf_core::balance`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Name the gateway's certificate carries (DNS or IP SAN).
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "localhost".into()
}

/// The whole CCF configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CcfConfig {
    /// This CCF's identity, which names the domain (e.g. "operator-a.test").
    pub ccf_id: String,
    /// Where the CA (if generated), the store and the CCF's certificate live.
    pub state_dir: PathBuf,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// PKI.
    #[serde(default)]
    pub pki: PkiConfig,
    /// Key validity.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Onboarding credentials.
    #[serde(default)]
    pub onboarding: OnboardingConfig,
    #[serde(default)]
    pub token: TokenConfig,
    /// The AEF registry (`[[aef]]` tables).
    #[serde(default, rename = "aef")]
    pub aefs: Vec<AefConfig>,
    /// The domain's gateway.
    #[serde(default)]
    pub gateway: Option<GatewayLinkConfig>,
    /// Connection caps, timeouts and message limits of both listeners.
    #[serde(default)]
    pub limits: ccf_core::limits::ListenerLimits,
    /// The `/metrics` listener (off unless set).
    #[serde(default)]
    pub metrics: ccf_core::metrics::MetricsConfig,
    /// Span export (`[telemetry] otlp_endpoint`).
    #[serde(default)]
    pub telemetry: ccf_core::telemetry::TelemetryConfig,
    /// Where the acknowledged state lives (`[store]`): the redb file in `state_dir` (default) or
    /// a PostgreSQL database. Token signing keys and the CA stay in `state_dir` either way.
    #[serde(default)]
    pub store: ccf_core::pg::StoreConfig,
}

impl CcfConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        ccf_core::config_file::parse(text, origin)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        ccf_core::config_file::load(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_parses_and_hides_credentials() {
        let c = CcfConfig::parse(DEMO_CONFIG, "demo").unwrap();
        assert!(!c.onboarding.credentials.is_empty());
        let shown = format!("{c:?}");
        for cred in &c.onboarding.credentials {
            assert!(!shown.contains(cred.expose()));
        }
    }

    #[test]
    fn store_defaults_to_redb_and_hides_the_database_password() {
        let c = CcfConfig::parse("ccf_id = \"a.test\"\nstate_dir = \"x\"\n", "f").unwrap();
        assert_eq!(c.store.backend, ccf_core::pg::StoreBackend::Redb);
        let c = CcfConfig::parse(
            "ccf_id = \"a.test\"\nstate_dir = \"x\"\n[store]\nbackend = \"postgres\"\n\
             url = \"postgres://capif:pw-hidden@db:5432/ccf\"\npool_size = 3\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            (c.store.backend, c.store.pool_size),
            (ccf_core::pg::StoreBackend::Postgres, 3)
        );
        assert!(!format!("{c:?}").contains("pw-hidden"));
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let e = CcfConfig::parse(
            "ccf_id = \"a.test\"\nstate_dir = \"x\"\nbogus = 1\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("f.toml") && e.contains("bogus") && e.contains("line 3"),
            "{e}"
        );
    }
}
