//! Method 3 (OAuth 2.0 client credentials, TS 33.122 6.5.2.3 and Annex C): the access-token
//! claims, the scope syntax, the CCF's signing keys and their publication as JWKs, and the one
//! verification routine that AEFs (and tests) use. JWS signing and checking are done by the
//! `jsonwebtoken` crate; this module only chooses keys and claims.
//!
//! Tokens are ES256 JWS with the signing key's RFC 7638 thumbprint as `kid`. A CCF on the redb
//! store keeps its signing keys in `token-signing-keys.json` in its state directory (mode 0600,
//! written whole and renamed, so a crash leaves either the old or the new set); CCF replicas on
//! PostgreSQL keep them in the database, and this module then holds only the set in memory
//! ([`TokenKeys::from_stored`], [`TokenKeys::replace`], [`rotated`]). A rotated-out key stays
//! published until every token it signed has expired, plus the largest clock-skew leeway.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capif_proto::v1 as pb;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::ids::{AefId, ApiName, IdError};

/// The largest clock-skew leeway an AEF may allow when checking `exp` (TS 33.122 Table C.2.2-1).
pub const MAX_LEEWAY_SECS: u64 = 30;

/// The prefix of every scope group (`3gpp#<aefId>:<apiName>[,<apiName>]`).
pub const SCOPE_PREFIX: &str = "3gpp#";

const KEY_FILE: &str = "token-signing-keys.json";

/// Why a token could not be issued, verified or a key set used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The scope string is malformed.
    #[error("scope {0}")]
    Scope(String),
    /// The key file could not be read.
    #[error("token signing keys at {}: {source}", .path.display())]
    KeyFileRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not a list of signing keys.
    #[error("token signing keys at {}: {source}", .path.display())]
    KeyFileFormat {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The key file lists no key.
    #[error("token signing keys at {}: holds no key", .path.display())]
    KeyFileEmpty {
        /// The file.
        path: PathBuf,
    },
    /// The key file could not be written (serialized, written owner-only, or renamed in place).
    #[error("token signing keys at {}: {source}", .path.display())]
    KeyFileWrite {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A signing key could not be generated, or a stored one read back.
    #[error("token signing key: {0}")]
    Key(#[source] rcgen::Error),
    /// A stored signing key is not a P-256 key.
    #[error("token signing key: not an uncompressed P-256 public key")]
    NotP256,
    /// A stored signing key is not the key its stored key id names.
    #[error("token signing key: stored key id {stored} does not match its key")]
    KidMismatch {
        /// The stored key id.
        stored: String,
    },
    /// A token could not be signed (or the key loaded for signing).
    #[error("token signing key: {0}")]
    Signing(#[source] jsonwebtoken::errors::Error),
    /// The key set's lock is poisoned (a panic while it was held).
    #[error("token signing key: lock poisoned")]
    LockPoisoned,
    /// There is no current signing key.
    #[error("token signing key: no signing key")]
    NoSigningKey,
    /// A published key is of a type or algorithm this verifier does not support.
    #[error("published key {kid:?} is unusable: only ES256 (P-256) and RS256 keys are supported")]
    UnsupportedJwk {
        /// Its key id.
        kid: String,
    },
    /// A published key's parameters are not a key.
    #[error("published key {kid:?} is unusable: {source}")]
    BadJwk {
        /// Its key id.
        kid: String,
        /// jsonwebtoken's error.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    // The verification failures below each name one check, so that an AEF can tell the caller
    // (and its log) exactly why a token was refused; `check` gives each a stable name.
    /// The token is not a JWS of our access-token claims (shape, encoding, JSON, no `kid`).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The token lacks a claim the verifier requires.
    #[error("the token lacks the {0:?} claim")]
    MissingClaim(String),
    /// The issuer does not publish the key id the token names.
    #[error("the token is signed with key id {kid:?}, which {issuer} does not publish")]
    UnknownKeyId {
        /// The key id the token names (not secret: it is a public key's thumbprint).
        kid: String,
        /// The issuer whose published set lacks it.
        issuer: String,
    },
    /// The signature does not verify with the issuer's key.
    #[error("bad signature (the token was altered or forged)")]
    BadSignature,
    /// The token's algorithm is not the one of the key it names.
    #[error("the token's algorithm does not match its key")]
    WrongAlgorithm,
    /// `iss` is not the issuer whose key verified the token.
    #[error("the token was not issued by {expected}")]
    WrongIssuer {
        /// The issuer expected.
        expected: String,
    },
    /// `exp` is past, beyond the leeway.
    #[error("the token has expired (beyond the {leeway_secs} s leeway)")]
    Expired {
        /// The leeway allowed.
        leeway_secs: u64,
    },
    /// `nbf` is in the future, beyond the leeway.
    #[error("the token is not valid yet (its nbf is more than {leeway_secs} s ahead)")]
    NotYetValid {
        /// The leeway allowed.
        leeway_secs: u64,
    },
    /// `iat` is in the future, beyond the leeway: a clock fault at the issuer, or a forgery.
    #[error("the token claims to be issued {ahead_secs} s in the future (leeway {leeway_secs} s)")]
    IssuedInFuture {
        /// How far ahead of the verifier's clock `iat` is.
        ahead_secs: u64,
        /// The leeway allowed.
        leeway_secs: u64,
    },
    /// `aud` does not name the verifying AEF.
    #[error("the token's audience does not include {expected}")]
    WrongAudience {
        /// The verifying AEF.
        expected: String,
    },
    /// `sub` is not the client the token is used by (or not its own `client_id`).
    #[error("the token was issued to {subject:?}, but {source_name} names {other:?}")]
    SubjectMismatch {
        /// The token's `sub`.
        subject: String,
        /// Where the other identity comes from ("its client_id claim", "the client certificate").
        source_name: &'static str,
        /// The other identity.
        other: String,
    },
}

impl TokenError {
    /// A stable, machine-readable name of the check that failed (SCREAMING_SNAKE_CASE), sent
    /// with a refusal so that clients and tests need not parse sentences.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Scope(_) => "SCOPE",
            Self::KeyFileRead { .. }
            | Self::KeyFileFormat { .. }
            | Self::KeyFileEmpty { .. }
            | Self::KeyFileWrite { .. }
            | Self::Key(_)
            | Self::NotP256
            | Self::KidMismatch { .. }
            | Self::Signing(_)
            | Self::LockPoisoned
            | Self::NoSigningKey => "SIGNING_KEY",
            Self::UnsupportedJwk { .. } | Self::BadJwk { .. } => "UNUSABLE_KEY",
            Self::Malformed(_) => "MALFORMED",
            Self::MissingClaim(_) => "MISSING_CLAIM",
            Self::UnknownKeyId { .. } => "UNKNOWN_KEY_ID",
            Self::BadSignature => "BAD_SIGNATURE",
            Self::WrongAlgorithm => "WRONG_ALGORITHM",
            Self::WrongIssuer { .. } => "WRONG_ISSUER",
            Self::Expired { .. } => "EXPIRED",
            Self::NotYetValid { .. } => "NOT_YET_VALID",
            Self::IssuedInFuture { .. } => "ISSUED_IN_FUTURE",
            Self::WrongAudience { .. } => "WRONG_AUDIENCE",
            Self::SubjectMismatch { .. } => "SUBJECT_MISMATCH",
        }
    }
}

/// The ErrorInfo metadata key under which a token refusal names its check.
pub const CHECK_METADATA_KEY: &str = "check";

/// The status of a refused token: reason `INVALID_TOKEN` (one reason for every token failure,
/// as the contract has it) plus the failed check under [`CHECK_METADATA_KEY`] in the ErrorInfo
/// metadata. `message` must never contain the token.
pub fn refusal_status(code: tonic::Code, check: &str, message: impl Into<String>) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    tonic::Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(
            pb::ErrorReason::InvalidToken.as_str_name(),
            capif_proto::ERROR_DOMAIN,
            std::collections::HashMap::from([(CHECK_METADATA_KEY.to_string(), check.to_string())]),
        ),
    )
}

/// The failed check a token refusal names, if the status carries one.
pub fn refusal_check(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .and_then(|mut i| i.metadata.remove(CHECK_METADATA_KEY))
}

/// The claims of our access tokens: TS 29.222 `AccessTokenClaims` (`iss`, `scope`, `exp`) plus
/// TS 33.122 Table C.2.2-1 `client_id`, and `sub`/`aud`/`nbf`/`iat`/`jti` of RFC 7519.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessTokenClaims {
    /// The issuing CCF's id (its domain).
    pub iss: String,
    /// The API invoker the token was issued to.
    pub sub: String,
    /// The AEFs the token is meant for: those its scope names. Always sent as an array; a single
    /// string (RFC 7519 4.1.3 allows either) is accepted. A missing `aud` is refused by
    /// [`verify`], so the default only lets that refusal name the claim.
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// The same invoker, as TS 33.122 names it.
    pub client_id: String,
    /// What the invoker may call, `3gpp#<aefId>:<apiName>[,...][;<aefId>:...]`.
    pub scope: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not valid before, seconds since the Unix epoch (optional in RFC 7519; ours set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issue time, seconds since the Unix epoch.
    pub iat: u64,
    /// A unique token id.
    pub jti: String,
}

/// `aud` as RFC 7519 allows it: one string or an array of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Aud::deserialize(d)? {
        Aud::One(s) => vec![s],
        Aud::Many(v) => v,
    })
}

/// A parsed scope: for each AEF, the APIs granted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope(pub Vec<(AefId, Vec<ApiName>)>);

impl Scope {
    /// Parses `3gpp#aef1:api1,api2;aef2:api3`. Several space-separated `3gpp#` groups are also
    /// accepted (OAuth scopes are space-delimited).
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let mut out: Vec<(AefId, Vec<ApiName>)> = Vec::new();
        let bad = |why: String| TokenError::Scope(why);
        if s.len() > 4096 {
            return Err(bad("is longer than 4096 bytes".into()));
        }
        for word in s.split_whitespace() {
            let rest = word
                .strip_prefix(SCOPE_PREFIX)
                .ok_or_else(|| bad(format!("{word:?} does not start with {SCOPE_PREFIX:?}")))?;
            for group in rest.split(';') {
                let (aef, apis) = group
                    .split_once(':')
                    .ok_or_else(|| bad(format!("group {group:?} is not <aefId>:<apiName>")))?;
                let aef = AefId::new(aef.to_string())
                    .map_err(|e: IdError| bad(format!("group {group:?}: {e}")))?;
                let mut names = Vec::new();
                for api in apis.split(',') {
                    names.push(
                        ApiName::new(api.to_string())
                            .map_err(|e: IdError| bad(format!("group {group:?}: {e}")))?,
                    );
                }
                match out.iter_mut().find(|(a, _)| *a == aef) {
                    Some((_, list)) => list.extend(names),
                    None => out.push((aef, names)),
                }
            }
        }
        Ok(Self(out))
    }

    /// Whether the scope grants `api` at `aef`.
    pub fn covers(&self, aef: &AefId, api: &str) -> bool {
        self.0
            .iter()
            .any(|(a, apis)| a == aef && apis.iter().any(|x| x.as_str() == api))
    }

    /// The AEFs the scope names, in order: a token's audience (`aud`).
    pub fn aef_ids(&self) -> Vec<String> {
        self.0.iter().map(|(a, _)| a.to_string()).collect()
    }

    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<String> = self
            .0
            .iter()
            .map(|(a, apis)| {
                let names: Vec<&str> = apis.iter().map(|x| x.as_str()).collect();
                format!("{a}:{}", names.join(","))
            })
            .collect();
        if groups.is_empty() {
            Ok(())
        } else {
            write!(f, "{SCOPE_PREFIX}{}", groups.join(";"))
        }
    }
}

/// One signing key as stored (in the key file, or a row of the CCF's database).
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredKey {
    /// Its RFC 7638 thumbprint; empty before [`TokenKeys::generate_key`] computed it.
    pub kid: String,
    /// The PKCS#8 private key, PEM.
    pub pkcs8_pem: Zeroizing<String>,
    /// When it was made.
    pub created_unix_ms: u64,
    /// When it stopped being current; `None` for the current key.
    #[serde(default)]
    pub retired_unix_ms: Option<u64>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("pkcs8_pem", &"<redacted>")
            .field("created_unix_ms", &self.created_unix_ms)
            .field("retired_unix_ms", &self.retired_unix_ms)
            .finish()
    }
}

/// The key set after a rotation at `now_ms` that makes `fresh` current: every key retired (those
/// retired already keep their time), those retired for longer than `retention_ms` dropped, then
/// `fresh`. One rule for the key file and for the database.
pub fn rotated(
    mut keys: Vec<StoredKey>,
    fresh: StoredKey,
    now_ms: u64,
    retention_ms: u64,
) -> Vec<StoredKey> {
    for k in keys.iter_mut() {
        k.retired_unix_ms.get_or_insert(now_ms);
    }
    keys.retain(|k| k.retired_unix_ms.is_none_or(|r| r + retention_ms > now_ms));
    keys.push(fresh);
    keys
}

struct SigningKey {
    stored: StoredKey,
    encoding: EncodingKey,
    jwk: pb::JsonWebKey,
}

impl SigningKey {
    fn generate(now_ms: u64) -> Result<Self, TokenError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(TokenError::Key)?;
        let pem = Zeroizing::new(pair.serialize_pem());
        Self::from_stored(StoredKey {
            kid: String::new(),
            pkcs8_pem: pem,
            created_unix_ms: now_ms,
            retired_unix_ms: None,
        })
    }

    fn from_stored(mut stored: StoredKey) -> Result<Self, TokenError> {
        let pair = rcgen::KeyPair::from_pem(&stored.pkcs8_pem).map_err(TokenError::Key)?;
        let raw = pair.public_key_raw();
        // An uncompressed P-256 point: 0x04 || x || y.
        if raw.len() != 65 || raw[0] != 4 {
            return Err(TokenError::NotP256);
        }
        let x = URL_SAFE_NO_PAD.encode(&raw[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&raw[33..65]);
        // RFC 7638 thumbprint: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        if !stored.kid.is_empty() && stored.kid != kid {
            return Err(TokenError::KidMismatch {
                stored: stored.kid.clone(),
            });
        }
        stored.kid = kid.clone();
        let encoding =
            EncodingKey::from_ec_pem(stored.pkcs8_pem.as_bytes()).map_err(TokenError::Signing)?;
        Ok(Self {
            stored,
            encoding,
            jwk: pb::JsonWebKey {
                kid,
                kty: "EC".into(),
                alg: "ES256".into(),
                crv: "P-256".into(),
                x,
                y,
                n: String::new(),
                e: String::new(),
            },
        })
    }
}

/// A CCF's token signing keys: the current one signs, the previous ones are still published.
pub struct TokenKeys {
    /// The key file; `None` when the set is kept elsewhere (the CCF's database).
    path: Option<PathBuf>,
    keys: RwLock<Vec<SigningKey>>,
    /// How long a retired key stays published: the longest token lifetime plus the leeway.
    retention_ms: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self
            .keys
            .read()
            .map(|k| k.iter().map(|k| k.stored.kid.clone()).collect())
            .unwrap_or_default();
        write!(f, "TokenKeys({kids:?})")
    }
}

impl TokenKeys {
    /// Loads the keys from `state_dir`, or generates and stores a first one.
    pub fn load_or_generate(
        state_dir: &Path,
        token_lifetime_secs: u64,
        now_ms: u64,
    ) -> Result<Self, TokenError> {
        let path = state_dir.join(KEY_FILE);
        let retention_ms = Self::retention_ms(token_lifetime_secs);
        let keys = match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let stored: Vec<StoredKey> =
                    serde_json::from_slice(&bytes).map_err(|source| TokenError::KeyFileFormat {
                        path: path.clone(),
                        source,
                    })?;
                let keys = stored
                    .into_iter()
                    .map(SigningKey::from_stored)
                    .collect::<Result<Vec<_>, _>>()?;
                if keys.is_empty() {
                    return Err(TokenError::KeyFileEmpty { path });
                }
                keys
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                vec![SigningKey::generate(now_ms)?]
            }
            Err(source) => return Err(TokenError::KeyFileRead { path, source }),
        };
        let this = Self {
            path: Some(path),
            keys: RwLock::new(keys),
            retention_ms,
        };
        this.save()?;
        Ok(this)
    }

    /// A set held in memory only, from keys stored elsewhere (oldest first, the current last).
    pub fn from_stored(
        stored: Vec<StoredKey>,
        token_lifetime_secs: u64,
    ) -> Result<Self, TokenError> {
        let keys = stored
            .into_iter()
            .map(SigningKey::from_stored)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(TokenError::NoSigningKey);
        }
        Ok(Self {
            path: None,
            keys: RwLock::new(keys),
            retention_ms: Self::retention_ms(token_lifetime_secs),
        })
    }

    /// How long a retired key stays published for tokens of `token_lifetime_secs`.
    pub fn retention_ms(token_lifetime_secs: u64) -> u64 {
        (token_lifetime_secs + MAX_LEEWAY_SECS) * 1000
    }

    /// A new P-256 signing key, its key id computed, not yet part of any set.
    pub fn generate_key(now_ms: u64) -> Result<StoredKey, TokenError> {
        Ok(SigningKey::generate(now_ms)?.stored)
    }

    /// The keys as stored, oldest first (the current last).
    pub fn stored(&self) -> Vec<StoredKey> {
        self.keys
            .read()
            .map(|k| k.iter().map(|k| k.stored.clone()).collect())
            .unwrap_or_default()
    }

    /// Replaces the set held in memory by `stored` (what another replica may have rotated).
    /// Keys already held are not parsed again; a set that did not change changes nothing.
    pub fn replace(&self, stored: Vec<StoredKey>) -> Result<(), TokenError> {
        if stored.is_empty() {
            return Err(TokenError::NoSigningKey);
        }
        let same = |held: &[SigningKey]| {
            held.len() == stored.len()
                && held.iter().zip(&stored).all(|(h, s)| {
                    h.stored.kid == s.kid && h.stored.retired_unix_ms == s.retired_unix_ms
                })
        };
        if self.keys.read().map(|k| same(&k)).unwrap_or(false) {
            return Ok(());
        }
        let fresh = stored
            .into_iter()
            .map(SigningKey::from_stored)
            .collect::<Result<Vec<_>, _>>()?;
        *self.keys.write().map_err(|_| TokenError::LockPoisoned)? = fresh;
        Ok(())
    }

    fn save(&self) -> Result<(), TokenError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let keys = self.keys.read().map_err(|_| TokenError::LockPoisoned)?;
        let stored: Vec<&StoredKey> = keys.iter().map(|k| &k.stored).collect();
        let err = |source: Box<dyn std::error::Error + Send + Sync>| TokenError::KeyFileWrite {
            path: path.clone(),
            source,
        };
        let json =
            Zeroizing::new(serde_json::to_vec_pretty(&stored).map_err(|e| err(Box::new(e)))?);
        let tmp = path.with_extension("json.tmp");
        crate::pki::write_private_file(&tmp, &json).map_err(|e| err(Box::new(e)))?;
        std::fs::rename(&tmp, path).map_err(|e| err(Box::new(e)))
    }

    /// The key id of the current signing key.
    pub fn current_kid(&self) -> String {
        self.keys
            .read()
            .ok()
            .and_then(|k| k.last().map(|k| k.stored.kid.clone()))
            .unwrap_or_default()
    }

    /// Signs `claims` with the current key (ES256, `kid` in the header).
    pub fn sign(&self, claims: &AccessTokenClaims) -> Result<String, TokenError> {
        let keys = self.keys.read().map_err(|_| TokenError::LockPoisoned)?;
        let key = keys.last().ok_or(TokenError::NoSigningKey)?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.stored.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(TokenError::Signing)
    }

    /// Makes a new key current; the previous one is retired (still published for a while). Keys
    /// retired longer ago than the retention are dropped. Stored before it returns.
    pub fn rotate(&self, now_ms: u64) -> Result<String, TokenError> {
        let fresh = Self::generate_key(now_ms)?;
        let kid = fresh.kid.clone();
        let next = rotated(self.stored(), fresh, now_ms, self.retention_ms);
        self.replace(next)?;
        self.save()?;
        Ok(kid)
    }

    /// The published keys: the current one and those retired within the retention.
    pub fn key_set(&self, issuer: &str, refresh_secs: u64, now_ms: u64) -> pb::TokenKeySet {
        let keys = self
            .keys
            .read()
            .map(|keys| {
                keys.iter()
                    .filter(|k| {
                        k.stored
                            .retired_unix_ms
                            .is_none_or(|r| r + self.retention_ms > now_ms)
                    })
                    .map(|k| k.jwk.clone())
                    .collect()
            })
            .unwrap_or_default();
        pb::TokenKeySet {
            issuer_ccf_id: issuer.to_string(),
            keys,
            refresh_interval_secs: refresh_secs,
        }
    }
}

/// The header and the claimed issuer of a token, read WITHOUT checking anything: only to choose
/// which issuer's key set to look at. Nothing read here is trusted.
pub fn peek(token: &str) -> Result<(String, Algorithm, String), TokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| malformed(&e))?;
    let kid = header
        .kid
        .ok_or_else(|| TokenError::Malformed("the token names no key id (kid)".into()))?;
    // Peer-chosen and about to travel (AEF -> CCF -> gateways): only a plausible key id goes on.
    if !crate::keysets::plausible_kid(&kid) {
        return Err(TokenError::Malformed(
            "the token's key id (kid) is not a short base64url name".into(),
        ));
    }
    let mut v = Validation::new(header.alg);
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    #[derive(Deserialize)]
    struct Iss {
        #[serde(default)]
        iss: String,
    }
    let data = jsonwebtoken::decode::<Iss>(token, &DecodingKey::from_secret(&[]), &v)
        .map_err(|e| malformed(&e))?;
    Ok((kid, header.alg, data.claims.iss))
}

/// A decoding failure as text that never quotes the token: jsonwebtoken's own messages for
/// shape, base64 and UTF-8 name no input; serde's may quote one claim value, which is not secret
/// (the payload is readable by anyone who holds the token, and the signature is never quoted).
fn malformed(e: &jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    TokenError::Malformed(match e.kind() {
        K::InvalidToken => "not three dot-separated parts".into(),
        K::Base64(_) => "a part is not base64url".into(),
        K::Utf8(_) => "a part is not UTF-8".into(),
        K::Json(j) => format!("not an access token's header or claims ({j})"),
        _ => e.to_string(),
    })
}

/// What a verifier expects of a token besides a genuine signature.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// The issuer whose key is used: `iss` must name it.
    pub issuer: &'a str,
    /// The verifying AEF's id: `aud` must contain it.
    pub audience: &'a str,
    /// What the verifier otherwise knows of the caller (its certificate, the invoker it names
    /// in metadata): `sub` must be each of them. Empty when the token is all it knows.
    pub callers: &'a [KnownCaller<'a>],
    /// Clock-skew leeway for `exp`, `nbf` and `iat`, capped at [`MAX_LEEWAY_SECS`].
    pub leeway_secs: u64,
}

/// An identity of the caller the verifier learned other than from the token.
#[derive(Clone, Copy, Debug)]
pub struct KnownCaller<'a> {
    /// The API invoker id.
    pub invoker: &'a str,
    /// Its home CCF, when the source names one (a certificate does, a bare id does not). An
    /// invoker id is unique only within its home, and a token's home is its issuer, so then
    /// `iss` must be this too.
    pub home: Option<&'a str>,
    /// Where it was learned, for the refusal's sentence ("the client certificate").
    pub source: &'static str,
}

/// `sub` (and, when `other` names a home, `iss`) must be `other`.
fn same_subject(claims: &AccessTokenClaims, other: &KnownCaller<'_>) -> Result<(), TokenError> {
    if claims.sub == other.invoker && other.home.is_none_or(|h| h == claims.iss) {
        return Ok(());
    }
    let (subject, other_id) = match other.home {
        Some(h) => (
            format!("{} of {}", claims.sub, claims.iss),
            format!("{} of {h}", other.invoker),
        ),
        None => (claims.sub.clone(), other.invoker.to_string()),
    };
    Err(TokenError::SubjectMismatch {
        subject,
        source_name: other.source,
        other: other_id,
    })
}

/// The verification key of a published JWK, with its algorithm.
pub fn decoding_key(jwk: &pb::JsonWebKey) -> Result<(DecodingKey, Algorithm), TokenError> {
    let bad = |source| TokenError::BadJwk {
        kid: jwk.kid.clone(),
        source,
    };
    match (jwk.kty.as_str(), jwk.alg.as_str()) {
        ("EC", "ES256") if jwk.crv == "P-256" => Ok((
            DecodingKey::from_ec_components(&jwk.x, &jwk.y).map_err(bad)?,
            Algorithm::ES256,
        )),
        ("RSA", "RS256") => Ok((
            DecodingKey::from_rsa_components(&jwk.n, &jwk.e).map_err(bad)?,
            Algorithm::RS256,
        )),
        _ => Err(TokenError::UnsupportedJwk {
            kid: jwk.kid.clone(),
        }),
    }
}

/// Checks, in this order, the signature and algorithm, the presence of `exp`/`iss`/`sub`/`aud`,
/// `exp` and `nbf` (with the leeway), `iss`, `aud` (must contain the verifying AEF), `iat` (not
/// in the future beyond the leeway), and `sub` (equal to `client_id` and to every known caller).
/// The first failure is returned, naming its check. Scope is the caller's to check.
pub fn verify(
    token: &str,
    jwk: &pb::JsonWebKey,
    expected: &Expected<'_>,
) -> Result<AccessTokenClaims, TokenError> {
    let leeway_secs = expected.leeway_secs.min(MAX_LEEWAY_SECS);
    let (key, alg) = decoding_key(jwk)?;
    let mut v = Validation::new(alg);
    v.leeway = leeway_secs;
    v.set_issuer(&[expected.issuer]);
    // Without "aud" here jsonwebtoken would accept a token that has no `aud` at all.
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    v.set_audience(&[expected.audience]);
    v.validate_nbf = true;
    let claims = jsonwebtoken::decode::<AccessTokenClaims>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => TokenError::BadSignature,
                K::InvalidAlgorithm => TokenError::WrongAlgorithm,
                K::ExpiredSignature => TokenError::Expired { leeway_secs },
                K::ImmatureSignature => TokenError::NotYetValid { leeway_secs },
                K::InvalidIssuer => TokenError::WrongIssuer {
                    expected: expected.issuer.to_string(),
                },
                K::InvalidAudience => TokenError::WrongAudience {
                    expected: expected.audience.to_string(),
                },
                K::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                _ => malformed(&e),
            }
        })?;
    // jsonwebtoken does not look at `iat`. One issued "in the future" comes from a CCF whose
    // clock is off or from a forger hoping to outlive `exp` checks elsewhere; refuse it like an
    // early `nbf`, with the same leeway, and with the same clock jsonwebtoken used for `exp`.
    let now = jsonwebtoken::get_current_timestamp();
    if claims.iat > now.saturating_add(leeway_secs) {
        return Err(TokenError::IssuedInFuture {
            ahead_secs: claims.iat - now,
            leeway_secs,
        });
    }
    // TS 33.122 names the client `client_id`, RFC 7519 names it `sub`: a token where the two
    // differ cannot say whom it was issued to.
    let client = KnownCaller {
        invoker: &claims.client_id,
        home: None,
        source: "its client_id claim",
    };
    same_subject(&claims, &client)?;
    for c in expected.callers {
        same_subject(&claims, c)?;
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(iss: &str, exp: u64) -> AccessTokenClaims {
        AccessTokenClaims {
            iss: iss.into(),
            sub: "inv-1".into(),
            aud: vec!["aef-a".into()],
            client_id: "inv-1".into(),
            scope: "3gpp#aef-a:weather-v1".into(),
            exp,
            nbf: None,
            iat: exp - 60,
            jti: "j1".into(),
        }
    }

    /// What AEF "aef-a" expects of tokens issued by `iss`, knowing nothing else of the caller.
    fn expect(iss: &'static str, leeway_secs: u64) -> Expected<'static> {
        Expected {
            issuer: iss,
            audience: "aef-a",
            callers: &[],
            leeway_secs,
        }
    }

    fn now_s() -> u64 {
        crate::clock::now_ms() / 1000
    }

    #[test]
    fn scope_parses_groups_and_refuses_garbage() {
        let s = Scope::parse("3gpp#aef-a:api-1,api-2;aef-b:api-3").unwrap();
        let a = AefId::new("aef-a").unwrap();
        let b = AefId::new("aef-b").unwrap();
        assert!(s.covers(&a, "api-2") && s.covers(&b, "api-3"));
        assert!(!s.covers(&a, "api-3") && !s.covers(&b, "api-1"));
        assert_eq!(s.to_string(), "3gpp#aef-a:api-1,api-2;aef-b:api-3");
        assert!(Scope::parse("").unwrap().is_empty());
        for bad in ["aef-a:api", "3gpp#aef-a", "3gpp#:api", "3gpp#aef a:x"] {
            assert!(Scope::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rotated_key_still_verifies_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TokenKeys::load_or_generate(dir.path(), 600, crate::clock::now_ms()).unwrap();
        let old = keys.sign(&claims("b.test", now_s() + 60)).unwrap();
        let old_kid = keys.current_kid();
        let new_kid = keys.rotate(crate::clock::now_ms()).unwrap();
        assert_ne!(old_kid, new_kid);
        let new = keys.sign(&claims("b.test", now_s() + 60)).unwrap();
        let set = keys.key_set("b.test", 60, crate::clock::now_ms());
        assert_eq!(set.keys.len(), 2);
        for t in [&old, &new] {
            let (kid, _, iss) = peek(t).unwrap();
            assert_eq!(iss, "b.test");
            let jwk = set.keys.iter().find(|k| k.kid == kid).unwrap();
            verify(t, jwk, &expect("b.test", 0)).unwrap();
        }
        // The file holds both keys; reloading publishes the same set.
        let again = TokenKeys::load_or_generate(dir.path(), 600, crate::clock::now_ms()).unwrap();
        assert_eq!(again.current_kid(), new_kid);
        assert_eq!(
            again.key_set("b.test", 60, crate::clock::now_ms()).keys,
            set.keys
        );
        // Past the retention the old key is no longer published.
        let later = crate::clock::now_ms() + (600 + MAX_LEEWAY_SECS + 1) * 1000;
        let kids: Vec<String> = keys
            .key_set("b.test", 60, later)
            .keys
            .into_iter()
            .map(|k| k.kid)
            .collect();
        assert_eq!(kids, vec![new_kid]);
        assert!(!format!("{keys:?}").contains("PRIVATE"));
    }

    #[test]
    fn tampered_expired_and_foreign_tokens_fail() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TokenKeys::load_or_generate(dir.path(), 600, crate::clock::now_ms()).unwrap();
        let set = keys.key_set("b.test", 60, crate::clock::now_ms());
        let jwk = &set.keys[0];
        let good = keys.sign(&claims("b.test", now_s() + 60)).unwrap();
        verify(&good, jwk, &expect("b.test", 0)).unwrap();
        // Altering the payload breaks the signature.
        let parts: Vec<&str> = good.split('.').collect();
        let mut c = claims("b.test", now_s() + 60);
        c.scope = "3gpp#aef-a:weather-v1,admin".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        let e = verify(&tampered, jwk, &expect("b.test", 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("signature"), "{e}");
        // Expired beyond the leeway.
        let old = keys.sign(&claims("b.test", now_s() - 40)).unwrap();
        let e = verify(&old, jwk, &expect("b.test", 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expired"), "{e}");
        // Within the leeway it is still accepted; the leeway is capped at 30 s.
        let recent = keys.sign(&claims("b.test", now_s() - 5)).unwrap();
        verify(&recent, jwk, &expect("b.test", 30)).unwrap();
        assert!(verify(&old, jwk, &expect("b.test", 3600)).is_err());
        // Another issuer.
        let e = verify(&good, jwk, &expect("c.test", 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.test"), "{e}");
    }

    /// Real keys, real signatures: `(keys, jwk)` for issuer "b.test".
    fn issuer() -> (tempfile::TempDir, TokenKeys, pb::JsonWebKey) {
        let dir = tempfile::tempdir().unwrap();
        let keys = TokenKeys::load_or_generate(dir.path(), 600, crate::clock::now_ms()).unwrap();
        let jwk = keys.key_set("b.test", 60, crate::clock::now_ms()).keys[0].clone();
        (dir, keys, jwk)
    }

    /// The refusal of `c` (signed with the real key), checking that it never quotes the
    /// token's signature.
    fn refusal(keys: &TokenKeys, jwk: &pb::JsonWebKey, c: &AccessTokenClaims) -> TokenError {
        refusal_with(keys, jwk, c, &expect("b.test", 30))
    }

    fn refusal_with(
        keys: &TokenKeys,
        jwk: &pb::JsonWebKey,
        c: &AccessTokenClaims,
        x: &Expected<'_>,
    ) -> TokenError {
        let t = keys.sign(c).unwrap();
        let e = verify(&t, jwk, x).unwrap_err();
        let sig = t.rsplit('.').next().unwrap();
        assert!(!e.to_string().contains(sig) && !format!("{e:?}").contains(sig));
        e
    }

    #[test]
    fn audience_must_name_the_verifying_aef() {
        let (_d, keys, jwk) = issuer();
        let mut c = claims("b.test", now_s() + 60);
        c.aud = vec!["aef-b".into()];
        let e = refusal(&keys, &jwk, &c);
        assert!(
            matches!(&e, TokenError::WrongAudience { expected } if expected == "aef-a"),
            "{e:?}"
        );
        assert_eq!(e.check(), "WRONG_AUDIENCE");
        // An empty audience names nobody.
        c.aud = vec![];
        let e = refusal(&keys, &jwk, &c);
        assert!(matches!(e, TokenError::WrongAudience { .. }), "{e:?}");
        // Several AEFs, this one among them: accepted.
        c.aud = vec!["aef-b".into(), "aef-a".into()];
        verify(&keys.sign(&c).unwrap(), &jwk, &expect("b.test", 30)).unwrap();
        // RFC 7519 allows a single string; signed as such by the real key, it is checked too.
        let mut v = serde_json::to_value(&c).unwrap();
        v["aud"] = serde_json::json!("aef-a");
        verify(&sign_json(&keys, &v), &jwk, &expect("b.test", 30)).unwrap();
        v["aud"] = serde_json::json!("aef-b");
        let e = verify(&sign_json(&keys, &v), &jwk, &expect("b.test", 30)).unwrap_err();
        assert!(matches!(e, TokenError::WrongAudience { .. }), "{e:?}");
        // No `aud` at all is refused, not taken as "meant for everyone".
        v.as_object_mut().unwrap().remove("aud");
        let e = verify(&sign_json(&keys, &v), &jwk, &expect("b.test", 30)).unwrap_err();
        assert!(
            matches!(&e, TokenError::MissingClaim(c) if c == "aud"),
            "{e:?}"
        );
        assert_eq!(e.check(), "MISSING_CLAIM");
    }

    /// Any JSON claims, signed by the current key exactly as [`TokenKeys::sign`] signs.
    fn sign_json(keys: &TokenKeys, claims: &serde_json::Value) -> String {
        let held = keys.keys.read().unwrap();
        let key = held.last().unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.stored.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
    }

    #[test]
    fn future_nbf_beyond_the_leeway_is_refused() {
        let (_d, keys, jwk) = issuer();
        let mut c = claims("b.test", now_s() + 600);
        c.iat = now_s();
        c.nbf = Some(now_s() + 120);
        let e = refusal(&keys, &jwk, &c);
        assert!(
            matches!(e, TokenError::NotYetValid { leeway_secs: 30 }),
            "{e:?}"
        );
        assert_eq!(e.check(), "NOT_YET_VALID");
        // The leeway is capped at 30 s for nbf as for exp.
        let e = refusal_with(&keys, &jwk, &c, &expect("b.test", 3600));
        assert!(matches!(e, TokenError::NotYetValid { .. }), "{e:?}");
        // Within the leeway: accepted; without leeway the same token is refused.
        c.nbf = Some(now_s() + 10);
        verify(&keys.sign(&c).unwrap(), &jwk, &expect("b.test", 30)).unwrap();
        let e = refusal_with(&keys, &jwk, &c, &expect("b.test", 0));
        assert!(matches!(e, TokenError::NotYetValid { .. }), "{e:?}");
    }

    #[test]
    fn future_iat_beyond_the_leeway_is_refused() {
        let (_d, keys, jwk) = issuer();
        let mut c = claims("b.test", now_s() + 600);
        c.iat = now_s() + 120;
        let e = refusal(&keys, &jwk, &c);
        assert!(
            matches!(e, TokenError::IssuedInFuture { ahead_secs, leeway_secs: 30 } if ahead_secs >= 119),
            "{e:?}"
        );
        assert_eq!(e.check(), "ISSUED_IN_FUTURE");
        let e = refusal_with(&keys, &jwk, &c, &expect("b.test", 3600));
        assert!(matches!(e, TokenError::IssuedInFuture { .. }), "{e:?}");
        c.iat = now_s() + 10;
        verify(&keys.sign(&c).unwrap(), &jwk, &expect("b.test", 30)).unwrap();
        let e = refusal_with(&keys, &jwk, &c, &expect("b.test", 0));
        assert!(matches!(e, TokenError::IssuedInFuture { .. }), "{e:?}");
    }

    #[test]
    fn subject_must_be_the_client_and_the_known_caller() {
        let (_d, keys, jwk) = issuer();
        // A token whose client_id and sub disagree says nothing about whom it was issued to.
        let mut c = claims("b.test", now_s() + 60);
        c.client_id = "inv-2".into();
        let e = refusal(&keys, &jwk, &c);
        assert!(
            matches!(&e, TokenError::SubjectMismatch { subject, source_name: "its client_id claim", other } if subject == "inv-1" && other == "inv-2"),
            "{e:?}"
        );
        assert_eq!(e.check(), "SUBJECT_MISMATCH");
        // Issued to inv-1, used by a caller the AEF knows as inv-2.
        let c = claims("b.test", now_s() + 60);
        let cert = |invoker, home| KnownCaller {
            invoker,
            home: Some(home),
            source: "the client certificate",
        };
        let header = |invoker| KnownCaller {
            invoker,
            home: None,
            source: "the invoker id header",
        };
        let with = |callers: &[KnownCaller<'static>]| {
            let x = Expected {
                callers,
                ..expect("b.test", 30)
            };
            verify(&keys.sign(&c).unwrap(), &jwk, &x)
        };
        let e = refusal_with(
            &keys,
            &jwk,
            &c,
            &Expected {
                callers: &[header("inv-2")],
                ..expect("b.test", 30)
            },
        );
        assert!(
            matches!(&e, TokenError::SubjectMismatch { other, source_name: "the invoker id header", .. } if other == "inv-2"),
            "{e:?}"
        );
        // Every known identity must match, not just one of them.
        let e = with(&[cert("inv-1", "b.test"), header("inv-2")]).unwrap_err();
        assert!(matches!(e, TokenError::SubjectMismatch { .. }), "{e:?}");
        // The same invoker id at another home is another invoker.
        let e = with(&[cert("inv-1", "c.test")]).unwrap_err();
        assert!(
            matches!(&e, TokenError::SubjectMismatch { subject, other, source_name: "the client certificate" } if subject == "inv-1 of b.test" && other == "inv-1 of c.test"),
            "{e:?}"
        );
        // The right caller is accepted, by certificate, by header, or both.
        with(&[cert("inv-1", "b.test")]).unwrap();
        with(&[header("inv-1")]).unwrap();
        with(&[cert("inv-1", "b.test"), header("inv-1")]).unwrap();
    }

    #[test]
    fn each_failure_names_its_check_in_a_typed_error() {
        let (_d, keys, jwk) = issuer();
        let good = keys.sign(&claims("b.test", now_s() + 60)).unwrap();
        let e = verify(&good, &jwk, &expect("c.test", 0)).unwrap_err();
        assert!(matches!(e, TokenError::WrongIssuer { .. }), "{e:?}");
        assert_eq!(e.check(), "WRONG_ISSUER");
        let e = refusal(&keys, &jwk, &claims("b.test", now_s() - 60));
        assert!(matches!(e, TokenError::Expired { .. }), "{e:?}");
        assert_eq!(e.check(), "EXPIRED");
        let (head, rest) = good.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let other = URL_SAFE_NO_PAD.encode(br#"{"iss":"b.test"}"#);
        let e = verify(&format!("{head}.{other}.{sig}"), &jwk, &expect("b.test", 0)).unwrap_err();
        assert!(matches!(e, TokenError::BadSignature), "{e:?}");
        assert_eq!(e.check(), "BAD_SIGNATURE");
        for garbage in ["", "a.b", "not.a.token", &format!("!!.{rest}")] {
            let e = verify(garbage, &jwk, &expect("b.test", 0)).unwrap_err();
            assert!(matches!(e, TokenError::Malformed(_)), "{garbage}: {e:?}");
            assert_eq!(e.check(), "MALFORMED");
        }
        assert!(matches!(peek("a.b"), Err(TokenError::Malformed(_))));
        // At the gRPC edge: one stable reason, the check in the ErrorInfo metadata.
        let e = TokenError::WrongAudience {
            expected: "aef-a".into(),
        };
        let s = refusal_status(tonic::Code::Unauthenticated, e.check(), e.to_string());
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            crate::grpc::error_reason(&s).as_deref(),
            Some("INVALID_TOKEN")
        );
        assert_eq!(refusal_check(&s).as_deref(), Some("WRONG_AUDIENCE"));
        assert!(s.message().contains("aef-a"));
    }
}
