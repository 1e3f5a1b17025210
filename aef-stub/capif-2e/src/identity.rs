//! The PSK identity of CAPIF-2e (docs/PROTOCOL.md "PSK identity"):
//! `3GPP-CAPIF-AEFPSK/<home-ccf-id>/<api-invoker-id>/<key-id>`, following the AKMA/GBA habit of
//! a fixed prefix plus what names the key (TS 24.109 K.3). The key id lets the AEF tell a stale
//! key from a fresh one; no part of the identity is secret.

use std::fmt;

use ccf_core::ids::{ApiInvokerId, CcfId, IdError, InvokerRef, KeyId};

/// The fixed prefix.
pub const PREFIX: &str = "3GPP-CAPIF-AEFPSK";

/// A parsed PSK identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PskIdentity {
    /// The invoker's home CCF.
    pub home_ccf_id: CcfId,
    /// The invoker.
    pub api_invoker_id: ApiInvokerId,
    /// The key id of the AEFPSK (16 lowercase hex digits).
    pub key_id: String,
}

/// Why an identity is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The bytes are not UTF-8.
    #[error("malformed PSK identity: not UTF-8")]
    NotUtf8,
    /// Not `<prefix>/<home>/<invoker>/<key-id>`.
    #[error("malformed PSK identity: expected {PREFIX}/<home-ccf-id>/<api-invoker-id>/<key-id>")]
    Shape,
    /// The home part is not a CCF id.
    #[error("malformed PSK identity: home: {0}")]
    Home(#[source] IdError),
    /// The invoker part is not an API invoker id.
    #[error("malformed PSK identity: invoker: {0}")]
    Invoker(#[source] IdError),
    /// The key id part is not 16 lowercase hex digits.
    #[error("malformed PSK identity: {0}")]
    KeyId(#[source] IdError),
}

impl PskIdentity {
    /// Parses the bytes a client sent.
    pub fn parse(bytes: &[u8]) -> Result<Self, IdentityError> {
        let s = std::str::from_utf8(bytes).map_err(|_| IdentityError::NotUtf8)?;
        let parts: Vec<&str> = s.split('/').collect();
        let [PREFIX, home, invoker, key_id] = parts.as_slice() else {
            return Err(IdentityError::Shape);
        };
        let key_id = KeyId::new(*key_id).map_err(IdentityError::KeyId)?;
        Ok(Self {
            home_ccf_id: CcfId::new(*home).map_err(IdentityError::Home)?,
            api_invoker_id: ApiInvokerId::new(*invoker).map_err(IdentityError::Invoker)?,
            key_id: key_id.as_str().to_string(),
        })
    }
}

impl PskIdentity {
    /// The invoker it names, with its home.
    pub fn invoker_ref(&self) -> InvokerRef {
        InvokerRef::new(self.home_ccf_id.clone(), self.api_invoker_id.clone())
    }
}

impl fmt::Display for PskIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}/{}/{}/{}",
            self.home_ccf_id, self.api_invoker_id, self.key_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let id = PskIdentity {
            home_ccf_id: CcfId::new("operator-b.test").unwrap(),
            api_invoker_id: ApiInvokerId::new("inv-1").unwrap(),
            key_id: "0123456789abcdef".into(),
        };
        let text = id.to_string();
        assert_eq!(
            text,
            "3GPP-CAPIF-AEFPSK/operator-b.test/inv-1/0123456789abcdef"
        );
        assert_eq!(PskIdentity::parse(text.as_bytes()).unwrap(), id);
        for bad in [
            "x/operator-b.test/inv-1/0123456789abcdef",
            "3GPP-CAPIF-AEFPSK/operator-b.test/inv-1/XYZ",
            "3GPP-CAPIF-AEFPSK/a/b",
        ] {
            assert!(PskIdentity::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
