//! The AEF stub's configuration (TOML): its identity, its CCF, where it listens and what it
//! advertises, its APIs and the PSK TLS profile.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::psk::TlsProfile;

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    origin: String,
    message: String,
}

/// `[tls]`: the AEF's certificate (role aef/<aef_id>) from its domain CA.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Own domain CA (PEM).
    pub ca_cert: PathBuf,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// `[ccf]`.
#[derive(Clone, Debug, Deserialize)]
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

/// `[listen]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// AefSecurity (Authentication Initiation; revocation from the CCF). TLS with the AEF's cert.
    pub security: String,
    /// The TLS-PSK endpoint with the demo API.
    pub psk: String,
    /// What CheckAuthentication tells invokers to dial for the PSK endpoint (default: the bound
    /// address of `psk`).
    #[serde(default)]
    pub psk_advertised: Option<String>,
    /// The TLS endpoint (rustls, TLS 1.3) for methods 2 (client certificate) and 3 (bearer
    /// token), with the demo API. Unset: the AEF serves PSK only.
    #[serde(default)]
    pub tls: Option<String>,
    /// What CheckAuthentication tells invokers to dial for the TLS endpoint (default: its bound
    /// address).
    #[serde(default)]
    pub tls_advertised: Option<String>,
}

/// The whole AEF configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AefConfig {
    /// The AEF's id (must match its certificate).
    pub aef_id: String,
    /// Its domain.
    pub ccf_id: String,
    /// Its identity.
    pub tls: TlsConfig,
    /// Its CCF.
    pub ccf: CcfLink,
    /// Listeners.
    pub listen: ListenConfig,
    /// APIs it serves (the demo API answers for these names).
    pub apis: Vec<String>,
    /// PSK TLS profile: "tls13" (default) or "tls12".
    #[serde(default)]
    pub psk_tls: TlsProfile,
    /// Method 3: clock-skew leeway when checking a token's `exp`, `nbf` and `iat`, seconds (at
    /// most 30).
    #[serde(default = "default_leeway")]
    pub token_leeway_secs: u64,
    /// Connection caps, timeouts and message limits of every listener.
    #[serde(default)]
    pub limits: ccf_core::limits::ListenerLimits,
    /// Budgets against amplification and bounds on what revocations leave behind.
    #[serde(default)]
    pub budgets: BudgetConfig,
    /// The `/metrics` listener (off unless set).
    #[serde(default)]
    pub metrics: ccf_core::metrics::MetricsConfig,
    /// Span export (`[telemetry] otlp_endpoint`).
    #[serde(default)]
    pub telemetry: ccf_core::telemetry::TelemetryConfig,
    /// Test-only fault (feature `test-faults`): acknowledge RevokeAuthorization and do nothing,
    /// so that `capif chaos --break ignore-revocations` can prove its checker sees it.
    #[cfg(feature = "test-faults")]
    #[serde(default)]
    pub test_ignore_revocations: bool,
}

/// `[budgets]`: what one source may make the AEF do, and what revocations leave behind.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Authentication Initiations per second per source address (token bucket refill).
    pub initiation_rate_per_sec: u32,
    /// Authentication Initiations one source address may make at once (bucket size).
    pub initiation_burst: u32,
    /// A presented key id that differs from the held key refreshes it: the first time at once,
    /// then at most once in this interval (counted from the last refresh), milliseconds.
    pub refresh_interval_ms: u64,
    /// A revocation mark lives at least this long (longer than any token issued before the
    /// revocation), seconds.
    pub revoked_mark_ttl_secs: u64,
    /// Revocation marks held at most (the one closest to its end is dropped beyond).
    pub max_revoked_marks: usize,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            initiation_rate_per_sec: 100,
            initiation_burst: 2000,
            refresh_interval_ms: 1000,
            revoked_mark_ttl_secs: 3600,
            max_revoked_marks: 100_000,
        }
    }
}

fn default_leeway() -> u64 {
    ccf_core::token::MAX_LEEWAY_SECS
}

impl AefConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            origin: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks what TOML cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate().map_err(|message| ConfigError {
            origin: "limits".into(),
            message,
        })?;
        let b = &self.budgets;
        if b.initiation_rate_per_sec == 0 || b.initiation_burst == 0 || b.max_revoked_marks == 0 {
            return Err(ConfigError {
                origin: "budgets".into(),
                message: "initiation_rate_per_sec, initiation_burst and max_revoked_marks must be at least 1".into(),
            });
        }
        if self.token_leeway_secs > ccf_core::token::MAX_LEEWAY_SECS {
            return Err(ConfigError {
                origin: "token_leeway_secs".into(),
                message: format!(
                    "{} s is more than the {} s TS 33.122 allows",
                    self.token_leeway_secs,
                    ccf_core::token::MAX_LEEWAY_SECS
                ),
            });
        }
        Ok(())
    }
}
