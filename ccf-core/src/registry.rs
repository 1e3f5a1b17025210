//! The AEF registry of a CCF (from config): which AEFs exist, which domain owns each, their
//! interface, security methods and APIs. Also the canonical interface string that is P0 of the
//! AEFPSK KDF (docs/PROTOCOL.md), computed in one place for CCF and invoker alike.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use capif_proto::v1 as pb;
use serde::Deserialize;

use crate::ids::{AefId, ApiName, CcfId, IdError};

/// A security method (TS 29.222 SecurityMethod).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub enum SecurityMethod {
    /// TLS with AEFPSK.
    #[serde(rename = "PSK")]
    Psk,
    /// TLS with certificates.
    #[serde(rename = "PKI")]
    Pki,
    /// TLS plus OAuth 2.0 access token.
    #[serde(rename = "OAUTH")]
    Oauth,
}

impl SecurityMethod {
    /// From the wire enum; `None` for UNSPECIFIED or unknown values.
    pub fn from_proto(v: i32) -> Option<Self> {
        match pb::SecurityMethod::try_from(v).ok()? {
            pb::SecurityMethod::Psk => Some(Self::Psk),
            pb::SecurityMethod::Pki => Some(Self::Pki),
            pb::SecurityMethod::Oauth => Some(Self::Oauth),
            pb::SecurityMethod::Unspecified => None,
        }
    }

    /// To the wire enum.
    pub fn to_proto(self) -> pb::SecurityMethod {
        match self {
            Self::Psk => pb::SecurityMethod::Psk,
            Self::Pki => pb::SecurityMethod::Pki,
            Self::Oauth => pb::SecurityMethod::Oauth,
        }
    }
}

/// Why an interface description is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterfaceError {
    /// Not exactly one of ipv4_addr, ipv6_addr, fqdn.
    #[error("exactly one of ipv4_addr, ipv6_addr and fqdn must be set")]
    HostCount,
    /// An address does not parse.
    #[error("{0:?} is not a valid address")]
    BadAddress(String),
    /// The FQDN is not a DNS name.
    #[error("{0:?} is not a valid FQDN")]
    BadFqdn(String),
    /// Port 0 or above 65535.
    #[error("port {0} is not a valid TCP port")]
    BadPort(u32),
    /// The prefix does not start with '/', is too long or holds spaces.
    #[error(
        "api_prefix {0:?} must be empty or start with '/', without spaces, at most 1024 characters"
    )]
    BadPrefix(String),
}

/// An AEF interface (TS 29.222 InterfaceDescription without the method list).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// IPv4 address.
    #[serde(default)]
    pub ipv4_addr: Option<String>,
    /// IPv6 address.
    #[serde(default)]
    pub ipv6_addr: Option<String>,
    /// DNS name.
    #[serde(default)]
    pub fqdn: Option<String>,
    /// TCP port.
    pub port: u32,
    /// Path prefix.
    #[serde(default)]
    pub api_prefix: String,
}

impl Interface {
    /// From the wire message.
    pub fn from_proto(d: &pb::InterfaceDescription) -> Self {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Self {
            ipv4_addr: opt(&d.ipv4_addr),
            ipv6_addr: opt(&d.ipv6_addr),
            fqdn: opt(&d.fqdn),
            port: d.port,
            api_prefix: d.api_prefix.clone(),
        }
    }

    /// To the wire message.
    pub fn to_proto(&self, methods: &[SecurityMethod]) -> pb::InterfaceDescription {
        pb::InterfaceDescription {
            ipv4_addr: self.ipv4_addr.clone().unwrap_or_default(),
            ipv6_addr: self.ipv6_addr.clone().unwrap_or_default(),
            fqdn: self.fqdn.clone().unwrap_or_default(),
            port: self.port,
            api_prefix: self.api_prefix.clone(),
            security_methods: methods.iter().map(|m| m.to_proto() as i32).collect(),
        }
    }

    /// The canonical form fed to the KDF as P0: `<host>:<port><api_prefix>` where host is the
    /// lowercase FQDN without trailing dot, the dotted IPv4 address, or `[<RFC 5952 IPv6>]`.
    pub fn canonical(&self) -> Result<String, InterfaceError> {
        let host = match (&self.ipv4_addr, &self.ipv6_addr, &self.fqdn) {
            (Some(a), None, None) => a
                .parse::<Ipv4Addr>()
                .map_err(|_| InterfaceError::BadAddress(a.clone()))?
                .to_string(),
            (None, Some(a), None) => format!(
                "[{}]",
                a.parse::<Ipv6Addr>()
                    .map_err(|_| InterfaceError::BadAddress(a.clone()))?
            ),
            (None, None, Some(f)) => {
                let f = f.trim_end_matches('.').to_ascii_lowercase();
                if f.is_empty()
                    || f.len() > 253
                    || f.split('.').any(|l| {
                        l.is_empty()
                            || l.len() > 63
                            || l.starts_with('-')
                            || l.ends_with('-')
                            || !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    })
                {
                    return Err(InterfaceError::BadFqdn(f));
                }
                f
            }
            _ => return Err(InterfaceError::HostCount),
        };
        if self.port == 0 || self.port > 65535 {
            return Err(InterfaceError::BadPort(self.port));
        }
        if (!self.api_prefix.is_empty() && !self.api_prefix.starts_with('/'))
            || self.api_prefix.len() > 1024
            || self
                .api_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(InterfaceError::BadPrefix(self.api_prefix.clone()));
        }
        Ok(format!("{host}:{}{}", self.port, self.api_prefix))
    }
}

/// One AEF as configured (`[[aef]]` in the CCF config).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AefConfig {
    /// The AEF's id.
    pub aef_id: String,
    /// The domain that owns the AEF. Default: this CCF's domain.
    #[serde(default)]
    pub ccf_id: Option<String>,
    /// Where the AEF serves its APIs.
    pub interface: Interface,
    /// Methods it supports, in its order of preference.
    pub security_methods: Vec<SecurityMethod>,
    /// API names it exposes.
    pub apis: Vec<String>,
    /// host:port of the AEF's security service (AefSecurity), for revocation pushes. Only for
    /// AEFs of this domain; unset: the AEF is not told of revocations (its keys still expire).
    #[serde(default)]
    pub security_endpoint: Option<String>,
    /// Name in the AEF's certificate (default "localhost").
    #[serde(default)]
    pub security_server_name: Option<String>,
}

/// A validated registry entry.
#[derive(Clone, Debug)]
pub struct AefEntry {
    /// The AEF.
    pub aef_id: AefId,
    /// Its owning domain.
    pub ccf_id: CcfId,
    /// Its interface.
    pub interface: Interface,
    /// `interface.canonical()`, precomputed.
    pub interface_canonical: String,
    /// Supported methods.
    pub security_methods: Vec<SecurityMethod>,
    /// Exposed APIs.
    pub apis: Vec<ApiName>,
    /// Where its security service listens, and the name its certificate carries.
    pub security_endpoint: Option<(String, String)>,
}

/// Why the registry config is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A bad id.
    #[error("aef {aef:?}: {source}")]
    Id {
        /// The entry.
        aef: String,
        /// The cause.
        source: IdError,
    },
    /// A bad interface.
    #[error("aef {aef:?}: interface: {source}")]
    Interface {
        /// The entry.
        aef: String,
        /// The cause.
        source: InterfaceError,
    },
    /// Two entries with one id.
    #[error("aef {0:?} is configured twice")]
    Duplicate(String),
    /// No methods or no APIs.
    #[error("aef {0:?} needs at least one security method and one API")]
    Empty(String),
}

/// The AEF registry.
#[derive(Clone, Debug, Default)]
pub struct AefRegistry {
    entries: BTreeMap<AefId, AefEntry>,
}

impl AefRegistry {
    /// Validates the configured entries; AEFs without a domain belong to `own`.
    pub fn from_config(own: &CcfId, aefs: &[AefConfig]) -> Result<Self, RegistryError> {
        let mut entries = BTreeMap::new();
        for a in aefs {
            let id_err = |source| RegistryError::Id {
                aef: a.aef_id.clone(),
                source,
            };
            let aef_id = AefId::new(a.aef_id.clone()).map_err(id_err)?;
            let ccf_id = match &a.ccf_id {
                Some(c) => CcfId::new(c.clone()).map_err(id_err)?,
                None => own.clone(),
            };
            let interface_canonical =
                a.interface
                    .canonical()
                    .map_err(|source| RegistryError::Interface {
                        aef: a.aef_id.clone(),
                        source,
                    })?;
            if a.security_methods.is_empty() || a.apis.is_empty() {
                return Err(RegistryError::Empty(a.aef_id.clone()));
            }
            let apis = a
                .apis
                .iter()
                .map(|n| ApiName::new(n.clone()).map_err(id_err))
                .collect::<Result<_, _>>()?;
            let entry = AefEntry {
                aef_id: aef_id.clone(),
                ccf_id,
                interface: a.interface.clone(),
                interface_canonical,
                security_methods: a.security_methods.clone(),
                apis,
                security_endpoint: a.security_endpoint.clone().map(|e| {
                    (
                        e,
                        a.security_server_name
                            .clone()
                            .unwrap_or_else(|| "localhost".into()),
                    )
                }),
            };
            if entries.insert(aef_id, entry).is_some() {
                return Err(RegistryError::Duplicate(a.aef_id.clone()));
            }
        }
        Ok(Self { entries })
    }

    /// The entry of an AEF.
    pub fn get(&self, aef: &AefId) -> Option<&AefEntry> {
        self.entries.get(aef)
    }

    /// The entry whose interface has this canonical form.
    pub fn by_interface(&self, canonical: &str) -> Option<&AefEntry> {
        self.entries
            .values()
            .find(|e| e.interface_canonical == canonical)
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = &AefEntry> {
        self.entries.values()
    }
}

/// The first of the invoker's preferred methods that the AEF supports.
pub fn select_method(
    preferred: &[SecurityMethod],
    supported: &[SecurityMethod],
) -> Option<SecurityMethod> {
    preferred.iter().copied().find(|m| supported.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(
        v4: Option<&str>,
        v6: Option<&str>,
        fqdn: Option<&str>,
        port: u32,
        p: &str,
    ) -> Interface {
        Interface {
            ipv4_addr: v4.map(Into::into),
            ipv6_addr: v6.map(Into::into),
            fqdn: fqdn.map(Into::into),
            port,
            api_prefix: p.into(),
        }
    }

    #[test]
    fn canonical_interface_forms() {
        assert_eq!(
            iface(None, None, Some("AEF1.Operator-A.test."), 8443, "/weather")
                .canonical()
                .unwrap(),
            "aef1.operator-a.test:8443/weather"
        );
        assert_eq!(
            iface(Some("127.0.0.1"), None, None, 1, "")
                .canonical()
                .unwrap(),
            "127.0.0.1:1"
        );
        assert_eq!(
            iface(None, Some("2001:DB8:0:0::1"), None, 443, "/v1")
                .canonical()
                .unwrap(),
            "[2001:db8::1]:443/v1"
        );
        assert!(
            iface(Some("1.2.3.4"), None, Some("x"), 1, "")
                .canonical()
                .is_err()
        );
        assert!(iface(None, None, Some("x"), 0, "").canonical().is_err());
        assert!(iface(None, None, Some("x"), 1, "v1").canonical().is_err());
        assert!(iface(None, None, Some("a..b"), 1, "").canonical().is_err());
        assert!(iface(None, None, Some("-a.b"), 1, "").canonical().is_err());
        assert!(
            iface(None, None, Some("a.b"), 1, "/a b")
                .canonical()
                .is_err()
        );
    }

    #[test]
    fn selection_follows_the_invokers_preference() {
        use SecurityMethod::*;
        assert_eq!(
            select_method(&[Oauth, Psk], &[Psk, Pki, Oauth]),
            Some(Oauth)
        );
        assert_eq!(select_method(&[Pki], &[Psk]), None);
    }
}
