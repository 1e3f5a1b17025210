//! Property tests of what the AEF decodes from strangers and from its operator: the PSK server
//! callback's decision (`psk::psk_for_identity`, the bytes any client can offer before it is
//! authenticated) against a key store holding valid, expired and revoked invokers, and the TOML
//! configuration (`config::AefConfig::parse`).
//!
//! The callback must give the key only for an identity naming a held, valid key with its key id,
//! refuse everything else with the reason the store's state predicts, and change nothing in the
//! store either way. Cases: `CAPIF_PROPTEST_CASES` (`ccf_core::testing`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use capif_2e::identity::PskIdentity;
use ccf_core::ids::{ApiInvokerId, CcfId, InvokerRef};
use ccf_core::kdf::AefPsk;
use ccf_core::testing::{config, toml_string};
use proptest::prelude::*;

use crate::config::AefConfig;
use crate::keys::{HeldKey, KeyStore, Refusal};
use crate::psk::{HandshakeRefusal, psk_for_identity};

const HOMES: [&str; 2] = ["operator-b.test", "operator-c.test"];
const INVOKERS: [&str; 3] = ["inv-1", "inv-2", "x"];

/// What the store holds for one invoker, as the test set it up.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Held {
    Valid(u8),
    Expired(u8),
    Revoked,
}

fn who(home: usize, invoker: usize) -> InvokerRef {
    InvokerRef::new(
        CcfId::new(HOMES[home]).unwrap(),
        ApiInvokerId::new(INVOKERS[invoker]).unwrap(),
    )
}

fn key(byte: u8, expires_at: Instant) -> HeldKey {
    let psk = AefPsk::from_slice(&[byte; 32]).unwrap();
    HeldKey {
        key_id: psk.key_id(),
        psk,
        expires_at,
        fetched_at: Instant::now(),
        last_refresh: None,
        allowed_apis: vec!["weather-v1".into()],
    }
}

/// A store with these invokers in these states, and the same as a map for the model.
fn stock(plan: &[(usize, usize, Held)]) -> (KeyStore, HashMap<InvokerRef, Held>) {
    let store = KeyStore::default();
    let mut model = HashMap::new();
    for &(h, i, held) in plan {
        let w = who(h, i);
        // A key whose fetch is not newer than a revocation does not lift it (`KeyStore::put`).
        let stored = match held {
            Held::Valid(b) => {
                store.put(w.clone(), key(b, Instant::now() + Duration::from_secs(600)))
            }
            Held::Expired(b) => store.put(w.clone(), key(b, Instant::now())),
            Held::Revoked => {
                store.revoke(&w);
                true
            }
        };
        model.insert(w, if stored { held } else { Held::Revoked });
    }
    (store, model)
}

fn plan() -> impl Strategy<Value = Vec<(usize, usize, Held)>> {
    let held = prop_oneof![
        3 => (0..4u8).prop_map(Held::Valid),
        1 => (0..4u8).prop_map(Held::Expired),
        1 => Just(Held::Revoked),
    ];
    prop::collection::vec((0..HOMES.len(), 0..INVOKERS.len(), held), 0..6)
}

/// Identity bytes a client may offer: the identity of a known invoker with its key id (of some
/// byte), or with a byte of the text changed, or arbitrary bytes.
fn offered() -> impl Strategy<Value = Option<Vec<u8>>> {
    // Key bytes from a small set, so that offers often name the key held.
    let named = (0..HOMES.len(), 0..INVOKERS.len(), 0..4u8).prop_map(|(h, i, b)| {
        let w = who(h, i);
        PskIdentity {
            home_ccf_id: w.home,
            api_invoker_id: w.invoker,
            key_id: AefPsk::from_slice(&[b; 32]).unwrap().key_id(),
        }
        .to_string()
        .into_bytes()
    });
    prop_oneof![
        4 => named.clone().prop_map(Some),
        2 => (named, any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut v, at, b)| {
            let i = at.index(v.len());
            v[i] = b;
            Some(v)
        }),
        2 => prop::collection::vec(any::<u8>(), 0..100).prop_map(Some),
        1 => Just(None),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// The callback hands out the key only for a held, unexpired, unrevoked invoker named with
    /// its key id and enough room; every other offer is refused with the reason the store's
    /// state predicts (no identity, malformed, revoked, unknown, stale key id, expired, buffer),
    /// and the store's keys, marks and connections are the same afterwards.
    #[test]
    fn props_psk_callback_decides_by_the_store_and_changes_nothing(
        plan in plan(),
        offer in offered(),
        room in prop_oneof![4 => Just(256usize), 1 => 0..64usize],
    ) {
        let (store, model) = stock(&plan);
        let before = store.snapshot();
        let got = psk_for_identity(&store, offer.as_deref(), room);
        prop_assert_eq!(store.snapshot(), before);
        let Some(bytes) = offer else {
            prop_assert!(matches!(got, Err(HandshakeRefusal::NoIdentity)), "{:?}", got);
            return Ok(());
        };
        let id = match PskIdentity::parse(&bytes) {
            Ok(id) => id,
            Err(e) => {
                prop_assert!(matches!(&got, Err(HandshakeRefusal::Malformed(m)) if *m == e), "{:?}", got);
                return Ok(());
            }
        };
        let key_id_of = |b: u8| AefPsk::from_slice(&[b; 32]).unwrap().key_id();
        let expected: Result<u8, Refusal> = match model.get(&id.invoker_ref()) {
            Some(Held::Revoked) => Err(Refusal::Revoked),
            None => Err(Refusal::UnknownIdentity),
            Some(Held::Valid(b) | Held::Expired(b)) if key_id_of(*b) != id.key_id => {
                Err(Refusal::StaleKeyId)
            }
            Some(Held::Expired(_)) => Err(Refusal::Expired),
            Some(Held::Valid(b)) => Ok(*b),
        };
        match (got, expected) {
            (Ok((named, k)), Ok(b)) => {
                prop_assert!(room >= 32);
                prop_assert_eq!(named, id);
                prop_assert_eq!(k.psk.expose(), &[b; 32][..]);
            }
            (Err(HandshakeRefusal::BufferTooSmall(named)), Ok(_)) => {
                prop_assert!(room < 32);
                prop_assert_eq!(named, id);
            }
            (Err(HandshakeRefusal::Refused { identity, why }), Err(want)) => {
                prop_assert_eq!(identity, id);
                prop_assert_eq!(why, want);
            }
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got.map(|(i, _)| i), want),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration file.

#[derive(Debug, Clone)]
struct Values {
    aef_id: String,
    ccf_id: String,
    paths: [String; 3],
    address: String,
    security: String,
    psk: String,
    apis: Vec<String>,
    tls12: Option<bool>,
    leeway: Option<u64>,
    rate: Option<u32>,
}

fn values() -> impl Strategy<Value = Values> {
    (
        (".{0,20}", ".{0,20}", [".{1,20}", ".{1,20}", ".{1,20}"]),
        (".{0,20}", ".{0,20}", ".{0,20}"),
        prop::collection::vec(".{0,10}", 0..4),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |((aef_id, ccf_id, paths), (address, security, psk), apis, tls12, leeway, rate)| {
                Values {
                    aef_id,
                    ccf_id,
                    paths,
                    address,
                    security,
                    psk,
                    apis,
                    tls12,
                    leeway,
                    rate,
                }
            },
        )
}

fn render(v: &Values) -> String {
    let q = |s: &str| toml_string(s);
    let apis: Vec<String> = v.apis.iter().map(|a| q(a)).collect();
    let mut t = format!(
        "aef_id = {}\nccf_id = {}\napis = [{}]\n",
        q(&v.aef_id),
        q(&v.ccf_id),
        apis.join(", ")
    );
    if let Some(tls12) = v.tls12 {
        t += &format!("psk_tls = {}\n", q(if tls12 { "tls12" } else { "tls13" }));
    }
    if let Some(l) = v.leeway.filter(|l| i64::try_from(*l).is_ok()) {
        t += &format!("token_leeway_secs = {l}\n");
    }
    t += &format!(
        "[tls]\nca_cert = {}\ncert = {}\nkey = {}\n[ccf]\naddress = {}\n[listen]\nsecurity = {}\npsk = {}\n",
        q(&v.paths[0]),
        q(&v.paths[1]),
        q(&v.paths[2]),
        q(&v.address),
        q(&v.security),
        q(&v.psk)
    );
    if let Some(r) = v.rate {
        t += &format!("[budgets]\ninitiation_rate_per_sec = {r}\n");
    }
    t
}

proptest! {
    #![proptest_config(config())]

    /// A generated config file parses and keeps every value written, with the defaults for
    /// what it leaves out.
    #[test]
    fn props_aef_config_keeps_its_values(v in values()) {
        let c = AefConfig::parse(&render(&v), "gen.toml").unwrap();
        prop_assert_eq!(&c.aef_id, &v.aef_id);
        prop_assert_eq!(&c.ccf_id, &v.ccf_id);
        prop_assert_eq!(&c.apis, &v.apis);
        prop_assert_eq!(c.tls.ca_cert.to_str(), Some(v.paths[0].as_str()));
        prop_assert_eq!(c.tls.key.to_str(), Some(v.paths[2].as_str()));
        prop_assert_eq!(&c.ccf.address, &v.address);
        prop_assert_eq!(&c.ccf.server_name, "localhost");
        prop_assert_eq!(&c.listen.psk, &v.psk);
        let profile = match v.tls12 {
            Some(true) => crate::psk::TlsProfile::Tls12,
            _ => crate::psk::TlsProfile::Tls13,
        };
        prop_assert_eq!(c.psk_tls, profile);
        let leeway = v.leeway.filter(|l| i64::try_from(*l).is_ok());
        prop_assert_eq!(c.token_leeway_secs, leeway.unwrap_or(ccf_core::token::MAX_LEEWAY_SECS));
        prop_assert_eq!(c.budgets.initiation_rate_per_sec, v.rate.unwrap_or(100));
        // `validate` refuses exactly a zero rate and a leeway above the cap, naming the key.
        let refused = c.validate().err().map(|e| e.to_string());
        let zero_rate = v.rate == Some(0);
        let big_leeway = c.token_leeway_secs > ccf_core::token::MAX_LEEWAY_SECS;
        match refused {
            None => prop_assert!(!zero_rate && !big_leeway),
            Some(e) if zero_rate => prop_assert!(e.starts_with("budgets: "), "{}", e),
            Some(e) => {
                prop_assert!(big_leeway);
                prop_assert!(e.starts_with("token_leeway_secs: "), "{}", e);
            }
        }
    }

    /// Arbitrary text, and a generated file with a line dropped, duplicated or cut short, is
    /// parsed or refused with a message that starts with the file's name.
    #[test]
    fn props_aef_config_arbitrary_text(
        v in values(),
        junk in any::<String>(),
        at in any::<prop::sample::Index>(),
        op in 0..3u8,
    ) {
        let broken = ccf_core::testing::break_a_line(&render(&v), at, op);
        for text in [broken, junk] {
            if let Err(e) = AefConfig::parse(&text, "any.toml") {
                prop_assert!(e.to_string().starts_with("any.toml: "), "{}", e);
            }
        }
    }
}
