//! Property tests of the decoders in this crate that see peer or user data: the ids
//! ([`crate::ids`]), `capif://` identities from text and from certificates ([`crate::identity`]),
//! access tokens and scopes ([`crate::token`]), the canonical interface string
//! ([`crate::registry::Interface::canonical`]) and revocation notice ids ([`crate::delivery`]).
//!
//! Each property states what must hold, not only "no panic": round trips where a format has two
//! directions, and refusals with the error an independent model of the rules predicts. Case
//! counts come from [`crate::testing`] (`CAPIF_PROPTEST_CASES`); `scripts/fuzz-long.sh` runs
//! them by the million. Every test here has `props` in its path, which is how the script finds it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use proptest::prelude::*;

use crate::delivery::NoticeId;
use crate::identity::{IdentityError, PeerIdentity, Role};
use crate::ids::{AefId, ApiInvokerId, ApiName, CcfId, IdError, KeyId};
use crate::registry::{Interface, InterfaceError};
use crate::testing::{ccf_id_text, config, key_id_text, near_id_text, token_id_text};
use crate::token::{AccessTokenClaims, Expected, Scope, TokenError, TokenKeys};

// Generators of ids live in `crate::testing`, shared with the other crates' properties.

// ---------------------------------------------------------------------------------------------
// Independent models of the id rules (written from docs/PROTOCOL.md, not from `ids`), each
// returning the refusal the real type must give.

fn model(
    kind: &'static str,
    s: &str,
    max: usize,
    allowed: &'static str,
    ok: fn(char) -> bool,
) -> Result<(), IdError> {
    if s.is_empty() {
        Err(IdError::Empty { kind })
    } else if s.len() > max {
        Err(IdError::TooLong {
            kind,
            len: s.len(),
            max,
        })
    } else if !s.chars().all(ok) {
        Err(IdError::BadCharacter { kind, allowed })
    } else {
        Ok(())
    }
}

fn model_ccf_id(s: &str) -> Result<(), IdError> {
    const ALLOWED: &str = "lowercase DNS labels (a-z, 0-9, '-') separated by dots";
    model(
        "CCF id",
        s,
        253,
        ALLOWED,
        |c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '.'),
    )?;
    let label_ok =
        |l: &str| (1..=63).contains(&l.len()) && !l.starts_with('-') && !l.ends_with('-');
    if s.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(IdError::BadCharacter {
            kind: "CCF id",
            allowed: ALLOWED,
        })
    }
}

fn model_token_id(kind: &'static str, s: &str) -> Result<(), IdError> {
    model(kind, s, 128, "letters, digits, '-', '_' and '.'", |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
    })
}

fn model_key_id(s: &str) -> Result<(), IdError> {
    const ALLOWED: &str = "exactly 16 lowercase hex digits";
    model(
        "key id",
        s,
        16,
        ALLOWED,
        |c| matches!(c, '0'..='9' | 'a'..='f'),
    )?;
    if s.len() == 16 {
        Ok(())
    } else {
        Err(IdError::BadCharacter {
            kind: "key id",
            allowed: ALLOWED,
        })
    }
}

/// Checks one id type against its model on `s`: accepted exactly when the model accepts, then
/// re-displayed identically through every path (Display, `as_str`, `String`, FromStr, serde);
/// refused with the model's error otherwise, by `new`, `FromStr` and serde alike.
macro_rules! check_id {
    ($ty:ty, $s:expr, $model:expr) => {{
        let s: &str = $s;
        let expected: Result<(), IdError> = $model;
        let got = <$ty>::new(s);
        let json = serde_json::to_string(s).unwrap();
        let via_serde = serde_json::from_str::<$ty>(&json);
        match (&got, expected) {
            (Ok(id), Ok(())) => {
                prop_assert_eq!(id.to_string(), s);
                prop_assert_eq!(id.as_str(), s);
                prop_assert_eq!(s.parse::<$ty>().ok(), Some(id.clone()));
                prop_assert_eq!(String::from(id.clone()), s);
                prop_assert_eq!(serde_json::to_string(id).unwrap(), json.clone());
                prop_assert_eq!(via_serde.as_ref().ok(), Some(id));
            }
            (Err(e), Err(want)) => {
                prop_assert_eq!(e, &want);
                prop_assert_eq!(s.parse::<$ty>().err(), Some(want.clone()));
                let serde_err = via_serde.err().map(|e| e.to_string()).unwrap_or_default();
                prop_assert!(serde_err.contains(&want.to_string()), "{}", serde_err);
                // The message names the kind of id and never echoes a long input.
                prop_assert!(e.to_string().len() < 120, "{}", e);
            }
            (got, want) => prop_assert!(false, "{:?}: got {:?}, model says {:?}", s, got, want),
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// ids

proptest! {
    #![proptest_config(config())]

    /// Generated valid ids of every kind are accepted and round-trip through every path.
    #[test]
    fn props_ids_valid_round_trip(
        ccf in ccf_id_text(),
        tok in token_id_text(),
        key in key_id_text(),
    ) {
        check_id!(CcfId, &ccf, Ok(()));
        check_id!(ApiInvokerId, &tok, Ok(()));
        check_id!(AefId, &tok, Ok(()));
        check_id!(ApiName, &tok, Ok(()));
        check_id!(KeyId, &key, Ok(()));
        prop_assert_eq!(KeyId::optional(&key).unwrap().map(String::from), Some(key.clone()));
    }

    /// Any text, and text near the valid forms, is accepted exactly when the model of the rules
    /// accepts it (then it re-displays identically) and otherwise refused with the model's
    /// `IdError`, by every id type; `KeyId::optional` maps "" to none and is `KeyId` otherwise.
    #[test]
    fn props_ids_arbitrary_text_matches_the_model(s in prop_oneof![near_id_text(), any::<String>()]) {
        check_id!(CcfId, &s, model_ccf_id(&s));
        check_id!(ApiInvokerId, &s, model_token_id("API invoker id", &s));
        check_id!(AefId, &s, model_token_id("AEF id", &s));
        check_id!(ApiName, &s, model_token_id("API name", &s));
        check_id!(KeyId, &s, model_key_id(&s));
        match KeyId::optional(&s) {
            Ok(None) => prop_assert!(s.is_empty()),
            Ok(Some(k)) => prop_assert_eq!(k.as_str(), s.as_str()),
            Err(e) => {
                prop_assert!(!s.is_empty());
                prop_assert_eq!(Err(e), model_key_id(&s));
            }
        }
        // Notice ids: exactly 32 lowercase hex digits, refusals give the length only.
        let notice_ok = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match NoticeId::new(&s) {
            Ok(n) => {
                prop_assert!(notice_ok);
                prop_assert_eq!(n.as_str(), s.as_str());
                prop_assert_eq!(NoticeId::new(&n.to_string()), Ok(n));
            }
            Err(e) => {
                prop_assert!(!notice_ok);
                prop_assert_eq!(e.len, s.len());
            }
        }
    }

    /// Serde refuses a non-string JSON value for an id instead of coercing it.
    #[test]
    fn props_ids_serde_refuses_non_strings(n in any::<i64>(), b in any::<bool>()) {
        for v in [serde_json::json!(n), serde_json::json!(b), serde_json::json!(null), serde_json::json!([])] {
            prop_assert!(serde_json::from_value::<CcfId>(v.clone()).is_err());
            prop_assert!(serde_json::from_value::<KeyId>(v).is_err());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// identity: capif:// URIs

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Ccf),
        Just(Role::Gateway),
        Just(Role::Operator),
        token_id_text().prop_map(|s| Role::Aef(AefId::new(s).unwrap())),
        token_id_text().prop_map(|s| Role::Invoker(ApiInvokerId::new(s).unwrap())),
    ]
}

fn peer_identity() -> impl Strategy<Value = PeerIdentity> {
    (ccf_id_text(), role()).prop_map(|(c, r)| PeerIdentity::new(CcfId::new(c).unwrap(), r))
}

/// A URI near the valid ones: a valid URI with a character inserted, replaced or removed, a
/// segment added, dropped or renamed, or arbitrary text after the scheme.
fn near_uri() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("ccf".to_string()),
        Just("gateway".to_string()),
        Just("operator".to_string()),
        Just("aef".to_string()),
        Just("invoker".to_string()),
        Just(String::new()),
        token_id_text(),
        ".{0,8}",
    ];
    prop_oneof![
        (
            peer_identity(),
            any::<prop::sample::Index>(),
            any::<char>(),
            0..3u8
        )
            .prop_map(|(id, at, c, op)| {
                let mut chars: Vec<char> = id.uri().chars().collect();
                let i = at.index(chars.len());
                match op {
                    0 => chars.insert(i, c),
                    1 => chars[i] = c,
                    _ => {
                        chars.remove(i);
                    }
                }
                chars.into_iter().collect()
            }),
        (ccf_id_text(), prop::collection::vec(seg, 0..4)).prop_map(|(c, segs)| {
            let mut s = format!("capif://{c}");
            for p in segs {
                s.push('/');
                s.push_str(&p);
            }
            s
        }),
        ".{0,60}".prop_map(|s| format!("capif://{s}")),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every identity's URI parses back to that identity, and Display is the URI.
    #[test]
    fn props_identity_uri_round_trip(id in peer_identity()) {
        let uri = id.uri();
        prop_assert_eq!(id.to_string(), uri.clone());
        prop_assert_eq!(PeerIdentity::parse_uri(&uri), Ok(id));
    }

    /// Any text is either an identity whose URI is that very text (no normalisation: one
    /// identity, one spelling), or refused as `BadUri` quoting at most 200 characters of it.
    #[test]
    fn props_identity_arbitrary_uri(uri in near_uri()) {
        match PeerIdentity::parse_uri(&uri) {
            Ok(id) => {
                prop_assert_eq!(id.uri(), uri.clone());
                prop_assert_eq!(PeerIdentity::parse_uri(&id.uri()), Ok(id));
            }
            Err(IdentityError::BadUri { uri: quoted, why }) => {
                prop_assert_eq!(quoted, uri.chars().take(200).collect::<String>());
                if !uri.starts_with("capif://") {
                    prop_assert_eq!(why, "wrong scheme");
                }
            }
            Err(e) => prop_assert!(false, "{:?}: unexpected {:?}", uri, e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// identity: certificates (each case signs a certificate)

fn signing_key() -> &'static rcgen::KeyPair {
    static KEY: OnceLock<rcgen::KeyPair> = OnceLock::new();
    KEY.get_or_init(|| rcgen::KeyPair::generate().unwrap())
}

fn domain_ca() -> &'static crate::pki::DomainCa {
    static CA: OnceLock<crate::pki::DomainCa> = OnceLock::new();
    CA.get_or_init(|| crate::pki::DomainCa::generate(&CcfId::new("props.test").unwrap()).unwrap())
}

/// A self-signed certificate with exactly these URI SANs (and a DNS one).
fn cert_with_uris(uris: &[String]) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    for u in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(u.clone().try_into().unwrap()));
    }
    params.self_signed(signing_key()).unwrap().der().to_vec()
}

/// URI SAN text: valid identities, near-valid capif URIs and other schemes, all ASCII (what an
/// IA5String SAN can hold).
fn san_uri() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => peer_identity().prop_map(|i| i.uri()),
        2 => near_uri().prop_map(|u| u.chars().filter(char::is_ascii).collect::<String>()),
        1 => "(https|capif|urn|CAPIF)://[ -~]{0,30}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// A certificate the domain CA issues names exactly the identity it was issued for.
    #[test]
    fn props_identity_from_issued_certificate(id in peer_identity()) {
        let pem = domain_ca().issue(&id, &[], signing_key(), 1).unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
        prop_assert_eq!(PeerIdentity::from_certificate(&der), Ok(id));
    }

    /// With any list of URI SANs, a certificate is read exactly as its capif:// SANs say: none
    /// is `Missing`, two or more are `Ambiguous` (unless the first is already refused), and one
    /// is what `parse_uri` makes of it.
    #[test]
    fn props_identity_from_certificate_sans(uris in prop::collection::vec(san_uri(), 0..4)) {
        let got = PeerIdentity::from_certificate(&cert_with_uris(&uris));
        let capif: Vec<&String> = uris.iter().filter(|u| u.starts_with("capif://")).collect();
        match capif.as_slice() {
            [] => prop_assert_eq!(got, Err(IdentityError::Missing)),
            [one] => prop_assert_eq!(got, PeerIdentity::parse_uri(one)),
            [first, ..] => match PeerIdentity::parse_uri(first) {
                Ok(_) => prop_assert_eq!(got, Err(IdentityError::Ambiguous)),
                Err(e) => prop_assert_eq!(got, Err(e)),
            },
        }
    }

    /// Arbitrary bytes, and a real certificate with one byte changed or cut short, never make
    /// the reader panic; whatever it accepts is a well-formed identity.
    #[test]
    fn props_identity_from_corrupted_der(
        id in peer_identity(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
        junk in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut der = cert_with_uris(&[id.uri()]);
        let i = at.index(der.len());
        if cut {
            der.truncate(i);
        } else {
            der[i] = byte;
        }
        for input in [der, junk] {
            if let Ok(found) = PeerIdentity::from_certificate(&input) {
                prop_assert_eq!(PeerIdentity::parse_uri(&found.uri()), Ok(found));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// token: scopes

/// A scope with distinct AEFs, each granting 1 to 3 APIs.
fn scope() -> impl Strategy<Value = Scope> {
    prop::collection::btree_map(
        token_id_text(),
        prop::collection::vec(token_id_text(), 1..4),
        0..4,
    )
    .prop_map(|m| {
        Scope(
            m.into_iter()
                .map(|(a, apis)| {
                    (
                        AefId::new(a).unwrap(),
                        apis.into_iter().map(|x| ApiName::new(x).unwrap()).collect(),
                    )
                })
                .collect(),
        )
    })
}

fn near_scope() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("3gpp#".to_string()),
        Just(":".to_string()),
        Just(",".to_string()),
        Just(";".to_string()),
        Just(" ".to_string()),
        token_id_text(),
        ".{0,3}",
    ];
    prop_oneof![
        scope().prop_map(|s| s.to_string()),
        prop::collection::vec(piece, 0..12).prop_map(|p| p.concat()),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// A scope prints as `3gpp#aef:api,...;...` and parses back to itself; what it covers is
    /// exactly what it lists.
    #[test]
    fn props_scope_round_trip(s in scope()) {
        let text = s.to_string();
        let back = Scope::parse(&text).unwrap();
        prop_assert_eq!(&back, &s);
        for (aef, apis) in &s.0 {
            for api in apis {
                prop_assert!(back.covers(aef, api.as_str()));
            }
        }
        prop_assert_eq!(back.aef_ids(), s.0.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>());
    }

    /// Any text is a scope whose printed form parses to the same scope, or a `Scope` refusal.
    #[test]
    fn props_scope_arbitrary_text(text in near_scope()) {
        match Scope::parse(&text) {
            Ok(s) => prop_assert_eq!(Scope::parse(&s.to_string()).unwrap(), s),
            Err(TokenError::Scope(_)) => {}
            Err(e) => prop_assert!(false, "{:?}: unexpected {:?}", text, e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// token: compact JWS strings

struct Issuer {
    _dir: tempfile::TempDir,
    keys: TokenKeys,
    jwk: capif_proto::v1::JsonWebKey,
}

fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let keys = TokenKeys::load_or_generate(dir.path(), 600, crate::clock::now_ms()).unwrap();
        let jwk = keys.key_set("b.test", 60, crate::clock::now_ms()).keys[0].clone();
        Issuer {
            _dir: dir,
            keys,
            jwk,
        }
    })
}

fn expect_aef_a() -> Expected<'static> {
    Expected {
        issuer: "b.test",
        audience: "aef-a",
        callers: &[],
        leeway_secs: 30,
    }
}

fn now_s() -> u64 {
    crate::clock::now_ms() / 1000
}

/// Claims that `verify` accepts for AEF `aef-a` of issuer `b.test`.
fn good_claims() -> impl Strategy<Value = AccessTokenClaims> {
    (
        token_id_text(),
        prop::collection::vec(token_id_text(), 0..3),
        scope(),
        60..100_000u64,
        ".{0,20}",
        any::<bool>(),
    )
        .prop_map(|(sub, mut aud, scope, life, jti, nbf)| {
            aud.push("aef-a".into());
            let now = now_s();
            AccessTokenClaims {
                iss: "b.test".into(),
                client_id: sub.clone(),
                sub,
                aud,
                scope: scope.to_string(),
                exp: now + life,
                nbf: nbf.then_some(now),
                iat: now,
                jti,
            }
        })
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// JOSE-header-like JSON: a real or bogus `alg`, a `kid` or none, sometimes not JSON at all.
fn header_json() -> impl Strategy<Value = Vec<u8>> {
    let alg = prop_oneof![
        Just("ES256"),
        Just("RS256"),
        Just("HS256"),
        Just("none"),
        Just("EdDSA"),
        Just("es256"),
    ];
    let kid = prop_oneof![
        Just(None),
        Just(Some(issuer().jwk.kid.clone())),
        "[A-Za-z0-9_-]{1,130}".prop_map(Some),
        ".{0,10}".prop_map(Some),
    ];
    prop_oneof![
        4 => (alg, kid).prop_map(|(alg, kid)| {
            let mut h = serde_json::json!({ "alg": alg, "typ": "JWT" });
            if let Some(k) = kid {
                h["kid"] = serde_json::json!(k);
            }
            serde_json::to_vec(&h).unwrap()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..40),
    ]
}

/// Compact-serialisation-like strings: three (or some other number of) parts, base64url or not.
fn compact_token() -> impl Strategy<Value = String> {
    let payload = prop_oneof![
        good_claims().prop_map(|c| serde_json::to_vec(&c).unwrap()),
        Just(br#"{"iss":"b.test"}"#.to_vec()),
        prop::collection::vec(any::<u8>(), 0..60),
    ];
    let sig = prop_oneof![
        prop::collection::vec(any::<u8>(), 64..=64),
        prop::collection::vec(any::<u8>(), 0..80),
    ];
    prop_oneof![
        6 => (header_json(), payload, sig).prop_map(|(h, p, s)| format!("{}.{}.{}", b64(&h), b64(&p), b64(&s))),
        1 => "[A-Za-z0-9_.=+/-]{0,80}",
        1 => any::<String>(),
    ]
}

fn is_pre_claims_refusal(e: &TokenError) -> bool {
    matches!(
        e,
        TokenError::Malformed(_) | TokenError::BadSignature | TokenError::WrongAlgorithm
    )
}

proptest! {
    #![proptest_config(config())]

    /// A token signed by the issuer verifies and gives back exactly the claims it was signed
    /// with; `peek` reads its key id and issuer.
    #[test]
    fn props_token_signed_claims_round_trip(c in good_claims()) {
        let iss = issuer();
        let t = iss.keys.sign(&c).unwrap();
        prop_assert_eq!(crate::token::verify(&t, &iss.jwk, &expect_aef_a()).unwrap(), c);
        let (kid, alg, claimed) = crate::token::peek(&t).unwrap();
        prop_assert_eq!(kid, iss.jwk.kid.clone());
        prop_assert_eq!(alg, jsonwebtoken::Algorithm::ES256);
        prop_assert_eq!(claimed, "b.test");
    }

    /// Changing any one character of a valid token, or cutting it short, or adding to it, is
    /// refused, before its claims are looked at (shape, algorithm or signature), and the
    /// refusal never quotes the signature.
    #[test]
    fn props_token_tampering_is_refused(
        c in good_claims(),
        at in any::<prop::sample::Index>(),
        with in prop_oneof![4 => "[A-Za-z0-9_-]", 1 => any::<char>().prop_map(String::from)],
        how in 0..3u8,
    ) {
        let iss = issuer();
        let good = iss.keys.sign(&c).unwrap();
        let mut chars: Vec<char> = good.chars().collect();
        let i = at.index(chars.len());
        let new: Vec<char> = with.chars().collect();
        match how {
            0 if new != [chars[i]] => {
                chars.splice(i..=i, new);
            }
            1 => chars.truncate(i),
            _ => {
                chars.splice(i..i, new);
            }
        }
        let bad: String = chars.into_iter().collect();
        if bad == good {
            return Ok(());
        }
        let e = crate::token::verify(&bad, &iss.jwk, &expect_aef_a()).unwrap_err();
        prop_assert!(is_pre_claims_refusal(&e), "{:?} -> {:?}", bad, e);
        let sig = good.rsplit('.').next().unwrap();
        prop_assert!(!e.to_string().contains(sig));
    }

    /// Arbitrary compact strings never make `peek` or `verify` panic; `peek` refuses them as
    /// `Malformed` (or reads a plausible key id), and `verify`, which does not hold their key,
    /// refuses them before their claims: shape, algorithm or signature.
    #[test]
    fn props_token_arbitrary_compact_strings(t in compact_token()) {
        match crate::token::peek(&t) {
            Ok((kid, _, _)) => prop_assert!(crate::keysets::plausible_kid(&kid)),
            Err(e) => prop_assert!(matches!(e, TokenError::Malformed(_)), "{:?}", e),
        }
        let e = crate::token::verify(&t, &issuer().jwk, &expect_aef_a()).unwrap_err();
        prop_assert!(is_pre_claims_refusal(&e), "{:?} -> {:?}", t, e);
    }
}

// ---------------------------------------------------------------------------------------------
// registry: the canonical interface string (P0)

fn fqdn() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", 1..4)
        .prop_map(|l| l.join("."))
}

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "/[!-~]{0,30}"]
}

fn model_canonical(i: &Interface) -> Result<String, InterfaceError> {
    let host = match (&i.ipv4_addr, &i.ipv6_addr, &i.fqdn) {
        (Some(a), None, None) => a
            .parse::<Ipv4Addr>()
            .map(|a| a.to_string())
            .map_err(|_| InterfaceError::BadAddress(a.clone()))?,
        (None, Some(a), None) => a
            .parse::<Ipv6Addr>()
            .map(|a| format!("[{a}]"))
            .map_err(|_| InterfaceError::BadAddress(a.clone()))?,
        (None, None, Some(f)) => {
            let f = f.trim_end_matches('.').to_ascii_lowercase();
            let ok = !f.is_empty()
                && f.len() <= 253
                && f.split('.').all(|l| {
                    (1..=63).contains(&l.len())
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !ok {
                return Err(InterfaceError::BadFqdn(f));
            }
            f
        }
        _ => return Err(InterfaceError::HostCount),
    };
    if !(1..=65535).contains(&i.port) {
        return Err(InterfaceError::BadPort(i.port));
    }
    let p = &i.api_prefix;
    if (!p.is_empty() && !p.starts_with('/'))
        || p.len() > 1024
        || p.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(InterfaceError::BadPrefix(p.clone()));
    }
    Ok(format!("{host}:{}{p}", i.port))
}

fn host_text() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        2 => Just(None),
        1 => any::<[u8; 4]>().prop_map(|a| Some(Ipv4Addr::from(a).to_string())),
        1 => any::<[u16; 8]>().prop_map(|a| Some(Ipv6Addr::from(a).to_string())),
        1 => fqdn().prop_map(Some),
        1 => ".{0,20}".prop_map(Some),
    ]
}

fn interface() -> impl Strategy<Value = Interface> {
    (
        host_text(),
        host_text(),
        host_text(),
        prop_oneof![1..=65535u32, any::<u32>()],
        prop_oneof![prefix(), ".{0,20}"],
    )
        .prop_map(|(ipv4_addr, ipv6_addr, fqdn, port, api_prefix)| Interface {
            ipv4_addr,
            ipv6_addr,
            fqdn,
            port,
            api_prefix,
        })
}

fn only(host: u8, text: String, port: u32, api_prefix: String) -> Interface {
    Interface {
        ipv4_addr: (host == 0).then(|| text.clone()),
        ipv6_addr: (host == 1).then(|| text.clone()),
        fqdn: (host == 2).then_some(text),
        port,
        api_prefix,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any interface description gets the canonical string or the refusal the model predicts
    /// (host count, address, FQDN, port, prefix, in that order).
    #[test]
    fn props_interface_canonical_matches_the_model(i in interface()) {
        prop_assert_eq!(i.canonical(), model_canonical(&i));
    }

    /// One address, one P0: every spelling of an IPv6 address (full, uppercase, compressed) and
    /// of an FQDN (any case, trailing dot) gives the same canonical string, and a canonical
    /// host read back gives itself (idempotence); the wire form round-trips.
    #[test]
    fn props_interface_canonical_is_one_spelling(
        v6 in any::<[u16; 8]>(),
        name in fqdn(),
        upper in any::<bool>(),
        dot in any::<bool>(),
        port in 1..=65535u32,
        p in prefix(),
    ) {
        let addr = Ipv6Addr::from(v6);
        let full = addr.segments().iter().map(|s| format!("{s:04x}")).collect::<Vec<_>>().join(":");
        let want = format!("[{addr}]:{port}{p}");
        for text in [addr.to_string(), full.clone(), full.to_uppercase()] {
            prop_assert_eq!(only(1, text, port, p.clone()).canonical(), Ok(want.clone()));
        }
        let lower = name.to_ascii_lowercase();
        let mut spelled = if upper { name.to_ascii_uppercase() } else { name.clone() };
        if dot {
            spelled.push('.');
        }
        let c = only(2, spelled, port, p.clone()).canonical().unwrap();
        prop_assert_eq!(&c, &format!("{lower}:{port}{p}"));
        prop_assert_eq!(only(2, lower, port, p.clone()).canonical().unwrap(), c);
        let i = only(1, addr.to_string(), port, p);
        prop_assert_eq!(Interface::from_proto(&i.to_proto(&[])), i);
    }
}
