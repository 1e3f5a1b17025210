//! Identifiers in the spec's words: `CcfId` (a domain), `ApiInvokerId`, `AefId`, `ApiName`, and
//! the AEFPSK's `KeyId`.
//!
//! Each is a newtype that validates on construction, so a malformed or oversized id from a peer is
//! refused at the edge and cannot travel further into stores, caches or logs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("{kind} is empty")]
    Empty {
        /// Which identifier.
        kind: &'static str,
    },
    /// The string is longer than allowed.
    #[error("{kind} is {len} characters long; at most {max} are allowed")]
    TooLong {
        /// Which identifier.
        kind: &'static str,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The string holds a character that is not allowed.
    #[error("{kind} may only contain {allowed}")]
    BadCharacter {
        /// Which identifier.
        kind: &'static str,
        /// What is allowed, for the message.
        allowed: &'static str,
    },
}

fn check(
    kind: &'static str,
    s: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: s.len(),
            max,
        });
    }
    if !s.chars().all(ok) {
        return Err(IdError::BadCharacter { kind, allowed });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal, $allowed:literal, $ok:expr, $extra:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s: String = s.into();
                check($kind, &s, $max, $allowed, $ok)?;
                #[allow(clippy::redundant_closure_call)]
                ($extra)(&s)?;
                Ok(Self(s))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn no_extra(_: &str) -> Result<(), IdError> {
    Ok(())
}

fn dns_labels(s: &str) -> Result<(), IdError> {
    let bad = IdError::BadCharacter {
        kind: "CCF id",
        allowed: "lowercase DNS labels (a-z, 0-9, '-') separated by dots",
    };
    if s.split('.')
        .any(|l| l.is_empty() || l.len() > 63 || l.starts_with('-') || l.ends_with('-'))
    {
        return Err(bad);
    }
    Ok(())
}

id_type!(
    /// A CAPIF core function's identity, which names its whole domain: a lowercase DNS-style name
    /// such as `operator-b.test` (the "CCF-B information" of TR 33.700-22 solution #13).
    CcfId,
    "CCF id",
    253,
    "lowercase DNS labels (a-z, 0-9, '-') separated by dots",
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.',
    dns_labels
);

id_type!(
    /// TS 29.222 `apiInvokerId`, assigned by the invoker's home CCF at onboarding.
    ApiInvokerId,
    "API invoker id",
    128,
    "letters, digits, '-', '_' and '.'",
    token_char,
    no_extra
);

id_type!(
    /// TS 29.222 `aefId`: an API exposing function, unique across the federation.
    AefId,
    "AEF id",
    128,
    "letters, digits, '-', '_' and '.'",
    token_char,
    no_extra
);

id_type!(
    /// A service API name (what authorization information lists), e.g. `weather-v1`.
    ApiName,
    "API name",
    128,
    "letters, digits, '-', '_' and '.'",
    token_char,
    no_extra
);

fn exactly_16(s: &str) -> Result<(), IdError> {
    if s.len() != 16 {
        return Err(IdError::BadCharacter {
            kind: "key id",
            allowed: "exactly 16 lowercase hex digits",
        });
    }
    Ok(())
}

id_type!(
    /// The key id of an AEFPSK: 16 lowercase hex digits (`kdf::key_id`, PROTOCOL.md 4.4). It
    /// names a key without revealing it, so an AEF can tell a stale key from a fresh one.
    KeyId,
    "key id",
    16,
    "exactly 16 lowercase hex digits",
    |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c),
    exactly_16
);

impl KeyId {
    /// A key id a request may leave empty ("none presented"): `None` when empty, else checked.
    pub fn optional(s: &str) -> Result<Option<Self>, IdError> {
        if s.is_empty() {
            Ok(None)
        } else {
            Self::new(s).map(Some)
        }
    }
}

/// An invoker across the federation: its home domain and its id there (ids are assigned by each
/// home CCF, so two domains may use the same one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InvokerRef {
    /// The invoker's home CCF.
    pub home: CcfId,
    /// Its id at home.
    pub invoker: ApiInvokerId,
}

impl InvokerRef {
    /// `invoker` of `home`.
    pub fn new(home: CcfId, invoker: ApiInvokerId) -> Self {
        Self { home, invoker }
    }
}

impl std::fmt::Display for InvokerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {}", self.invoker, self.home)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_16_lowercase_hex() {
        assert!(KeyId::new("0123456789abcdef").is_ok());
        assert!(KeyId::new("0123456789ABCDEF").is_err());
        assert!(KeyId::new("0123456789abcde").is_err());
        assert!(KeyId::new("0123456789abcdefa").is_err());
        assert!(KeyId::new("x".repeat(3 * 1024 * 1024)).is_err());
        assert_eq!(KeyId::optional("").unwrap(), None);
        assert!(KeyId::optional("zz").is_err());
    }

    #[test]
    fn ccf_ids_are_dns_names() {
        assert!(CcfId::new("operator-b.test").is_ok());
        assert!(CcfId::new("Operator-B.test").is_err());
        assert!(CcfId::new("a..b").is_err());
        assert!(CcfId::new("-a.b").is_err());
        assert!(CcfId::new("").is_err());
        assert!(CcfId::new("a".repeat(254)).is_err());
    }

    #[test]
    fn invoker_ids_refuse_separators_and_oversize() {
        assert!(ApiInvokerId::new("inv-0123abcd").is_ok());
        assert!(ApiInvokerId::new("inv/1").is_err());
        assert!(ApiInvokerId::new("inv 1").is_err());
        assert!(ApiInvokerId::new("x".repeat(129)).is_err());
        assert_eq!(
            ApiInvokerId::new("").unwrap_err().to_string(),
            "API invoker id is empty"
        );
    }
}
