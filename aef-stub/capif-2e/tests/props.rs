//! Property tests of the PSK identity (`capif_2e::identity`), the first thing the AEF's PSK
//! callback decodes from a stranger: generated identities round-trip through Display and
//! `parse`, and arbitrary bytes are refused with the error an independent reading of the format
//! predicts (not UTF-8, shape, key id, home, invoker, in that order). Cases:
//! `CAPIF_PROPTEST_CASES` (`ccf_core::testing`).
#![allow(clippy::unwrap_used)]

use capif_2e::identity::{IdentityError, PREFIX, PskIdentity};
use ccf_core::ids::{ApiInvokerId, CcfId, KeyId};
use ccf_core::testing::config;
use proptest::prelude::*;

fn ccf_id() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", 1..=3).prop_map(|l| l.join("."))
}

fn identity() -> impl Strategy<Value = PskIdentity> {
    (ccf_id(), "[A-Za-z0-9._-]{1,40}", "[0-9a-f]{16}").prop_map(|(h, i, k)| PskIdentity {
        home_ccf_id: CcfId::new(h).unwrap(),
        api_invoker_id: ApiInvokerId::new(i).unwrap(),
        key_id: k,
    })
}

/// Bytes near an identity: a valid one with a byte inserted, replaced or removed, a part
/// swapped for arbitrary text, or arbitrary bytes altogether.
fn near_identity() -> impl Strategy<Value = Vec<u8>> {
    let part = prop_oneof![
        Just(PREFIX.to_string()),
        ccf_id(),
        "[A-Za-z0-9._-]{1,20}",
        "[0-9a-fA-F]{15,17}",
        ".{0,10}",
    ];
    prop_oneof![
        (
            identity(),
            any::<prop::sample::Index>(),
            any::<u8>(),
            0..3u8
        )
            .prop_map(|(id, at, b, op)| {
                let mut v = id.to_string().into_bytes();
                let i = at.index(v.len());
                match op {
                    0 => v.insert(i, b),
                    1 => v[i] = b,
                    _ => {
                        v.remove(i);
                    }
                }
                v
            }),
        prop::collection::vec(part, 0..6).prop_map(|p| p.join("/").into_bytes()),
        prop::collection::vec(any::<u8>(), 0..80),
    ]
}

/// The refusal the format predicts, read straight from PROTOCOL.md section 7.
fn model(bytes: &[u8]) -> Result<(), IdentityError> {
    let s = std::str::from_utf8(bytes).map_err(|_| IdentityError::NotUtf8)?;
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() != 4 || parts[0] != PREFIX {
        return Err(IdentityError::Shape);
    }
    KeyId::new(parts[3]).map_err(IdentityError::KeyId)?;
    CcfId::new(parts[1]).map_err(IdentityError::Home)?;
    ApiInvokerId::new(parts[2]).map_err(IdentityError::Invoker)?;
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// An identity prints as `3GPP-CAPIF-AEFPSK/<home>/<invoker>/<key-id>` and parses back to
    /// itself, naming the same invoker.
    #[test]
    fn props_psk_identity_round_trip(id in identity()) {
        let text = id.to_string();
        prop_assert_eq!(
            text.clone(),
            format!("{PREFIX}/{}/{}/{}", id.home_ccf_id, id.api_invoker_id, id.key_id)
        );
        let back = PskIdentity::parse(text.as_bytes()).unwrap();
        prop_assert_eq!(back.invoker_ref(), id.invoker_ref());
        prop_assert_eq!(back, id);
    }

    /// Arbitrary bytes are an identity that prints as exactly those bytes, or refused with the
    /// error the model predicts.
    #[test]
    fn props_psk_identity_arbitrary_bytes(bytes in near_identity()) {
        match (PskIdentity::parse(&bytes), model(&bytes)) {
            (Ok(id), Ok(())) => prop_assert_eq!(id.to_string().into_bytes(), bytes),
            (Err(e), Err(want)) => prop_assert_eq!(e, want),
            (got, want) => prop_assert!(false, "{:?}: got {:?}, model {:?}", bytes, got, want),
        }
    }
}
