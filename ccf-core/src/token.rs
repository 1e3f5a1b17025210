//! Method 3 (OAuth 2.0 client credentials, TS 33.122 6.5.2.3 and Annex C): the access-token
//! claims, the scope syntax, the CCF's signing keys and their publication as JWKs, and the one
//! verification routine that AEFs (and tests) use. JWS signing and checking are done by the
//! `jsonwebtoken` crate; this module only chooses keys and claims.
//!
//! Tokens are ES256 JWS with the signing key's RFC 7638 thumbprint as `kid`. A CCF keeps its
//! signing keys in `token-signing-keys.json` in its state directory (mode 0600, written whole and
//! renamed, so a crash leaves either the old or the new set). A rotated-out key stays published
//! until every token it signed has expired, plus the largest clock-skew leeway.

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
    /// The key file could not be read or written.
    #[error("token signing keys at {path}: {why}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A key could not be generated or used.
    #[error("token signing key: {0}")]
    Key(String),
    /// A published key cannot be used to verify.
    #[error("published key {kid:?} is unusable: {why}")]
    BadJwk {
        /// Its key id.
        kid: String,
        /// Why.
        why: String,
    },
    /// The token failed verification; the text says which check.
    #[error("{0}")]
    Invalid(String),
}

/// The claims of our access tokens: TS 29.222 `AccessTokenClaims` (`iss`, `scope`, `exp`) plus
/// TS 33.122 Table C.2.2-1 `client_id`, and `sub`/`iat`/`jti` of RFC 7519.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessTokenClaims {
    /// The issuing CCF's id (its domain).
    pub iss: String,
    /// The API invoker the token was issued to.
    pub sub: String,
    /// The same invoker, as TS 33.122 names it.
    pub client_id: String,
    /// What the invoker may call, `3gpp#<aefId>:<apiName>[,...][;<aefId>:...]`.
    pub scope: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    pub iat: u64,
    /// A unique token id.
    pub jti: String,
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

/// One signing key as stored.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    pkcs8_pem: Zeroizing<String>,
    created_unix_ms: u64,
    #[serde(default)]
    retired_unix_ms: Option<u64>,
}

struct SigningKey {
    stored: StoredKey,
    encoding: EncodingKey,
    jwk: pb::JsonWebKey,
}

impl SigningKey {
    fn generate(now_ms: u64) -> Result<Self, TokenError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        let pem = Zeroizing::new(pair.serialize_pem());
        Self::from_stored(StoredKey {
            kid: String::new(),
            pkcs8_pem: pem,
            created_unix_ms: now_ms,
            retired_unix_ms: None,
        })
    }

    fn from_stored(mut stored: StoredKey) -> Result<Self, TokenError> {
        let pair = rcgen::KeyPair::from_pem(&stored.pkcs8_pem)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        let raw = pair.public_key_raw();
        // An uncompressed P-256 point: 0x04 || x || y.
        if raw.len() != 65 || raw[0] != 4 {
            return Err(TokenError::Key(
                "not an uncompressed P-256 public key".into(),
            ));
        }
        let x = URL_SAFE_NO_PAD.encode(&raw[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&raw[33..65]);
        // RFC 7638 thumbprint: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        if !stored.kid.is_empty() && stored.kid != kid {
            return Err(TokenError::Key(format!(
                "stored key id {} does not match its key",
                stored.kid
            )));
        }
        stored.kid = kid.clone();
        let encoding = EncodingKey::from_ec_pem(stored.pkcs8_pem.as_bytes())
            .map_err(|e| TokenError::Key(e.to_string()))?;
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
    path: PathBuf,
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
        let retention_ms = (token_lifetime_secs + MAX_LEEWAY_SECS) * 1000;
        let file_err = |why: String| TokenError::KeyFile {
            path: path.clone(),
            why,
        };
        let keys = match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let stored: Vec<StoredKey> =
                    serde_json::from_slice(&bytes).map_err(|e| file_err(e.to_string()))?;
                let keys = stored
                    .into_iter()
                    .map(SigningKey::from_stored)
                    .collect::<Result<Vec<_>, _>>()?;
                if keys.is_empty() {
                    return Err(file_err("holds no key".into()));
                }
                keys
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                vec![SigningKey::generate(now_ms)?]
            }
            Err(e) => return Err(file_err(e.to_string())),
        };
        let this = Self {
            path,
            keys: RwLock::new(keys),
            retention_ms,
        };
        this.save()?;
        Ok(this)
    }

    fn save(&self) -> Result<(), TokenError> {
        let keys = self
            .keys
            .read()
            .map_err(|_| TokenError::Key("lock".into()))?;
        let stored: Vec<&StoredKey> = keys.iter().map(|k| &k.stored).collect();
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(&stored).map_err(|e| TokenError::Key(e.to_string()))?,
        );
        let tmp = self.path.with_extension("json.tmp");
        let err = |why: String| TokenError::KeyFile {
            path: self.path.clone(),
            why,
        };
        crate::pki::write_private_file(&tmp, &json).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| err(e.to_string()))
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
        let keys = self
            .keys
            .read()
            .map_err(|_| TokenError::Key("lock".into()))?;
        let key = keys
            .last()
            .ok_or_else(|| TokenError::Key("no signing key".into()))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.stored.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| TokenError::Key(e.to_string()))
    }

    /// Makes a new key current; the previous one is retired (still published for a while). Keys
    /// retired longer ago than the retention are dropped. Stored before it returns.
    pub fn rotate(&self, now_ms: u64) -> Result<String, TokenError> {
        let fresh = SigningKey::generate(now_ms)?;
        let kid = fresh.stored.kid.clone();
        {
            let mut keys = self
                .keys
                .write()
                .map_err(|_| TokenError::Key("lock".into()))?;
            for k in keys.iter_mut() {
                k.stored.retired_unix_ms.get_or_insert(now_ms);
            }
            keys.retain(|k| {
                k.stored
                    .retired_unix_ms
                    .is_none_or(|r| r + self.retention_ms > now_ms)
            });
            keys.push(fresh);
        }
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
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| TokenError::Invalid(format!("malformed token: {e}")))?;
    let kid = header
        .kid
        .ok_or_else(|| TokenError::Invalid("the token names no key id (kid)".into()))?;
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
        .map_err(|e| TokenError::Invalid(format!("malformed token: {e}")))?;
    Ok((kid, header.alg, data.claims.iss))
}

/// The verification key of a published JWK, with its algorithm.
pub fn decoding_key(jwk: &pb::JsonWebKey) -> Result<(DecodingKey, Algorithm), TokenError> {
    let bad = |why: &str| TokenError::BadJwk {
        kid: jwk.kid.clone(),
        why: why.to_string(),
    };
    match (jwk.kty.as_str(), jwk.alg.as_str()) {
        ("EC", "ES256") if jwk.crv == "P-256" => Ok((
            DecodingKey::from_ec_components(&jwk.x, &jwk.y).map_err(|e| bad(&e.to_string()))?,
            Algorithm::ES256,
        )),
        ("RSA", "RS256") => Ok((
            DecodingKey::from_rsa_components(&jwk.n, &jwk.e).map_err(|e| bad(&e.to_string()))?,
            Algorithm::RS256,
        )),
        _ => Err(bad("only ES256 (P-256) and RS256 keys are supported")),
    }
}

/// Checks signature, algorithm, issuer and expiry (with `leeway_secs`, at most
/// [`MAX_LEEWAY_SECS`]). Scope is the caller's to check.
pub fn verify(
    token: &str,
    jwk: &pb::JsonWebKey,
    issuer: &str,
    leeway_secs: u64,
) -> Result<AccessTokenClaims, TokenError> {
    let (key, alg) = decoding_key(jwk)?;
    let mut v = Validation::new(alg);
    v.leeway = leeway_secs.min(MAX_LEEWAY_SECS);
    v.set_issuer(&[issuer]);
    v.set_required_spec_claims(&["exp", "iss", "sub"]);
    v.validate_aud = false;
    jsonwebtoken::decode::<AccessTokenClaims>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            TokenError::Invalid(match e.kind() {
                K::InvalidSignature => "bad signature (the token was altered or forged)".into(),
                K::ExpiredSignature => "the token has expired".into(),
                K::InvalidIssuer => format!("the token was not issued by {issuer}"),
                K::InvalidAlgorithm => "the token's algorithm does not match its key".into(),
                K::MissingRequiredClaim(c) => format!("the token lacks the {c:?} claim"),
                _ => format!("malformed token: {e}"),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(iss: &str, exp: u64) -> AccessTokenClaims {
        AccessTokenClaims {
            iss: iss.into(),
            sub: "inv-1".into(),
            client_id: "inv-1".into(),
            scope: "3gpp#aef-a:weather-v1".into(),
            exp,
            iat: exp - 60,
            jti: "j1".into(),
        }
    }

    fn now_s() -> u64 {
        crate::server::now_ms() / 1000
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
        let keys = TokenKeys::load_or_generate(dir.path(), 600, crate::server::now_ms()).unwrap();
        let old = keys.sign(&claims("b.test", now_s() + 60)).unwrap();
        let old_kid = keys.current_kid();
        let new_kid = keys.rotate(crate::server::now_ms()).unwrap();
        assert_ne!(old_kid, new_kid);
        let new = keys.sign(&claims("b.test", now_s() + 60)).unwrap();
        let set = keys.key_set("b.test", 60, crate::server::now_ms());
        assert_eq!(set.keys.len(), 2);
        for t in [&old, &new] {
            let (kid, _, iss) = peek(t).unwrap();
            assert_eq!(iss, "b.test");
            let jwk = set.keys.iter().find(|k| k.kid == kid).unwrap();
            verify(t, jwk, "b.test", 0).unwrap();
        }
        // The file holds both keys; reloading publishes the same set.
        let again = TokenKeys::load_or_generate(dir.path(), 600, crate::server::now_ms()).unwrap();
        assert_eq!(again.current_kid(), new_kid);
        assert_eq!(
            again.key_set("b.test", 60, crate::server::now_ms()).keys,
            set.keys
        );
        // Past the retention the old key is no longer published.
        let later = crate::server::now_ms() + (600 + MAX_LEEWAY_SECS + 1) * 1000;
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
        let keys = TokenKeys::load_or_generate(dir.path(), 600, crate::server::now_ms()).unwrap();
        let set = keys.key_set("b.test", 60, crate::server::now_ms());
        let jwk = &set.keys[0];
        let good = keys.sign(&claims("b.test", now_s() + 60)).unwrap();
        verify(&good, jwk, "b.test", 0).unwrap();
        // Altering the payload breaks the signature.
        let parts: Vec<&str> = good.split('.').collect();
        let mut c = claims("b.test", now_s() + 60);
        c.scope = "3gpp#aef-a:weather-v1,admin".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        let e = verify(&tampered, jwk, "b.test", 0).unwrap_err().to_string();
        assert!(e.contains("signature"), "{e}");
        // Expired beyond the leeway.
        let old = keys.sign(&claims("b.test", now_s() - 40)).unwrap();
        let e = verify(&old, jwk, "b.test", 30).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
        // Within the leeway it is still accepted; the leeway is capped at 30 s.
        let recent = keys.sign(&claims("b.test", now_s() - 5)).unwrap();
        verify(&recent, jwk, "b.test", 30).unwrap();
        assert!(verify(&old, jwk, "b.test", 3600).is_err());
        // Another issuer.
        let e = verify(&good, jwk, "c.test", 0).unwrap_err().to_string();
        assert!(e.contains("c.test"), "{e}");
    }
}
