//! Who a TLS peer is: its domain (`CcfId`) and role, read from the URI SAN of its verified
//! certificate (docs/PROTOCOL.md section 2): `capif://<ccf-id>/<role>[/<id>]`.
//!
//! Every server of the project calls [`PeerIdentity::from_certificate`] on the verified client
//! certificate and never takes an identity from a request field.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ids::{AefId, ApiInvokerId, CcfId, IdError};

/// URI scheme of identity SANs.
pub const URI_SCHEME: &str = "capif://";

/// What a certificate holder is allowed to be.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Role {
    /// The domain's CAPIF core function.
    Ccf,
    /// The domain's interconnect federation gateway.
    Gateway,
    /// The domain's operator (inspection and administration with grpcurl).
    Operator,
    /// An API exposing function.
    Aef(AefId),
    /// An onboarded API invoker.
    Invoker(ApiInvokerId),
}

impl Role {
    /// The role's name as it appears in the URI.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Ccf => "ccf",
            Role::Gateway => "gateway",
            Role::Operator => "operator",
            Role::Aef(_) => "aef",
            Role::Invoker(_) => "invoker",
        }
    }
}

/// A verified peer: domain plus role.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PeerIdentity {
    /// The domain that issued the certificate.
    pub ccf_id: CcfId,
    /// The role within that domain.
    pub role: Role,
}

/// Why a certificate does not name a usable identity.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate is not valid DER.
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// Its subject alternative names cannot be read.
    #[error("the certificate's subject alternative names cannot be read: {0}")]
    BadSan(#[source] x509_parser::error::X509Error),
    /// No `capif://` URI SAN.
    #[error("the certificate carries no capif:// URI SAN naming its domain and role")]
    Missing,
    /// More than one `capif://` URI SAN.
    #[error("the certificate carries more than one capif:// URI SAN")]
    Ambiguous,
    /// The URI does not have the form `capif://<ccf-id>/<role>[/<id>]`.
    #[error("identity URI {uri:?} is not of the form capif://<ccf-id>/<role>[/<id>]: {why}")]
    BadUri {
        /// The URI found.
        uri: String,
        /// What is wrong.
        why: String,
    },
}

impl PeerIdentity {
    /// A new identity.
    pub fn new(ccf_id: CcfId, role: Role) -> Self {
        Self { ccf_id, role }
    }

    /// The URI SAN naming this identity.
    pub fn uri(&self) -> String {
        match &self.role {
            Role::Aef(id) => format!("{URI_SCHEME}{}/aef/{id}", self.ccf_id),
            Role::Invoker(id) => format!("{URI_SCHEME}{}/invoker/{id}", self.ccf_id),
            r => format!("{URI_SCHEME}{}/{}", self.ccf_id, r.name()),
        }
    }

    /// Parses an identity URI.
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = |why: String| IdentityError::BadUri {
            uri: uri.chars().take(200).collect(),
            why,
        };
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .ok_or_else(|| bad("wrong scheme".into()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let id_err = |e: IdError| bad(e.to_string());
        let ccf_id = CcfId::new(parts[0]).map_err(id_err)?;
        let role = match parts.as_slice() {
            [_, "ccf"] => Role::Ccf,
            [_, "gateway"] => Role::Gateway,
            [_, "operator"] => Role::Operator,
            [_, "aef", id] => Role::Aef(AefId::new(*id).map_err(id_err)?),
            [_, "invoker", id] => Role::Invoker(ApiInvokerId::new(*id).map_err(id_err)?),
            _ => return Err(bad("unknown role or wrong number of path segments".into())),
        };
        Ok(Self { ccf_id, role })
    }

    /// Reads the identity from a DER certificate. Call only on a certificate the TLS layer has
    /// already verified against the right CA: this checks naming, not trust.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(IdentityError::Malformed)?;
        let san = cert
            .subject_alternative_name()
            .map_err(IdentityError::BadSan)?
            .ok_or(IdentityError::Missing)?;
        let mut found = None;
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name
                && u.starts_with(URI_SCHEME)
            {
                if found.is_some() {
                    return Err(IdentityError::Ambiguous);
                }
                found = Some(Self::parse_uri(u)?);
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips() {
        for uri in [
            "capif://operator-b.test/gateway",
            "capif://operator-a.test/aef/aef-weather",
            "capif://operator-a.test/invoker/inv-1",
            "capif://operator-a.test/ccf",
            "capif://operator-a.test/operator",
        ] {
            assert_eq!(PeerIdentity::parse_uri(uri).unwrap().uri(), uri);
        }
    }

    #[test]
    fn malformed_uris_are_refused() {
        for uri in [
            "https://operator-b.test/gateway",
            "capif://operator-b.test/king",
            "capif://operator-b.test/aef",
            "capif://operator-b.test/aef/a/b",
            "capif://Operator-B/gateway",
            "capif://operator-b.test/invoker/in valid",
        ] {
            assert!(PeerIdentity::parse_uri(uri).is_err(), "{uri}");
        }
    }
}
