//! AEFPSK derivation: the TS 33.220 B.2.0 generic KDF, the TS 33.122 Annex A.1 inputs, and the
//! two CAPIF-1e profiles that say where those inputs come from: this project's TLS 1.3 exporter
//! profile, and Annex A.1 as written over TLS 1.2 (docs/PROTOCOL.md "Key derivation").
//!
//! The CCF and the invoker call the same public functions: the CCF with the server side of the
//! CAPIF-1e TLS session, the invoker with the client side. `ccf kdf aefpsk` exposes
//! [`derive_aefpsk`] on the command line for interop debugging, and the test vectors in
//! `tests/vectors/` were computed with Python's `hmac`, independently of this code.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// FC value of the AEFPSK derivation (TS 33.122 A.1).
pub const FC_AEFPSK: u8 = 0x7A;

/// RFC 8446 exporter label whose 32-octet output stands in for the TLS master secret (the KDF key)
/// in the TLS 1.3 profile. "EXPERIMENTAL" labels need no IANA registration (RFC 5705 §4).
pub const EXPORTER_LABEL_KEY: &[u8] = b"EXPERIMENTAL-CAPIF-AEFPSK-KEY";

/// RFC 8446 exporter label whose 32-octet output stands in for the TLS session id (P1) in the
/// TLS 1.3 profile.
pub const EXPORTER_LABEL_SESSION_ID: &[u8] = b"EXPERIMENTAL-CAPIF-AEFPSK-SESSION-ID";

/// Octets of the AEFPSK: the full HMAC-SHA-256 output (Annex A gives no truncation).
pub const AEFPSK_LEN: usize = 32;

/// Why the KDF refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KdfError {
    /// A parameter is longer than the 2-octet length field can express (TS 33.220 B.2.0).
    #[error("KDF parameter P{index} is {len} octets; at most 65535 fit the 2-octet length")]
    ParameterTooLong {
        /// Which parameter.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// The key is empty.
    #[error("the KDF key is empty")]
    EmptyKey,
}

/// TS 33.220 B.2.0: `HMAC-SHA-256(Key, FC || P0 || L0 || ... || Pn || Ln)`, `Li` the 2-octet
/// big-endian length of `Pi`.
pub fn kdf(key: &[u8], fc: u8, params: &[&[u8]]) -> Result<[u8; 32], KdfError> {
    if key.is_empty() {
        return Err(KdfError::EmptyKey);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| KdfError::EmptyKey)?;
    mac.update(&[fc]);
    for (index, p) in params.iter().enumerate() {
        let len = u16::try_from(p.len()).map_err(|_| KdfError::ParameterTooLong {
            index,
            len: p.len(),
        })?;
        mac.update(p);
        mac.update(&len.to_be_bytes());
    }
    Ok(mac.finalize().into_bytes().into())
}

/// A derived AEFPSK. Its bytes never appear in `Debug` output and are zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct AefPsk([u8; AEFPSK_LEN]);

impl AefPsk {
    /// Wraps key bytes received from a peer; `None` when the length is wrong.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; AEFPSK_LEN]>::try_from(bytes).ok().map(Self)
    }

    /// The key bytes. Callers must not log them.
    pub fn expose(&self) -> &[u8; AEFPSK_LEN] {
        &self.0
    }

    /// The key id of this key (see [`key_id`]).
    pub fn key_id(&self) -> String {
        key_id(self)
    }
}

impl fmt::Debug for AefPsk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AefPsk(key_id={}, <redacted>)", self.key_id())
    }
}

/// Normalises a character-string KDF parameter: Unicode NFKC, then UTF-8 (TS 33.220 B.2.1.2).
pub fn string_parameter(s: &str) -> Vec<u8> {
    s.nfkc().collect::<String>().into_bytes()
}

/// TS 33.122 A.1: AEFPSK from the CAPIF-1e session's master secret and session id, bound to the
/// AEF by its canonical interface string `interface` (P0, docs/PROTOCOL.md).
pub fn derive_aefpsk(
    master_secret: &[u8],
    session_id: &[u8],
    interface: &str,
) -> Result<AefPsk, KdfError> {
    let p0 = string_parameter(interface);
    kdf(master_secret, FC_AEFPSK, &[&p0, session_id]).map(AefPsk)
}

/// The key id of an AEFPSK: the first 8 octets of `SHA-256("CAPIF-AEFPSK-KEY-ID" || AEFPSK)`,
/// in lowercase hex. It changes whenever the key changes, names the key in PSK identities and
/// revocation notices, and reveals nothing usable about the key.
pub fn key_id(psk: &AefPsk) -> String {
    let mut h = Sha256::new();
    h.update(b"CAPIF-AEFPSK-KEY-ID");
    h.update(psk.0);
    hex::encode(&h.finalize()[..8])
}

/// A CAPIF-1e profile: where the two KDF inputs that TS 33.122 A.1 takes from the CAPIF-1e TLS
/// session (the key and P1) come from. Chosen per domain (the CCF's `[security] capif1e`) and per
/// invoker (its profile file); the CCF names the one it used in every PSK answer.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize,
)]
pub enum Capif1eProfile {
    /// This project's TLS 1.3 profile: two RFC 8446 exporter values stand in for the master
    /// secret and the session ID (docs/PROTOCOL.md 4.3.1).
    #[default]
    #[serde(rename = "tls13-exporter")]
    Tls13Exporter,
    /// TS 33.122 A.1 as written: TLS 1.2, the master secret and the session ID of the full
    /// handshake (docs/PROTOCOL.md 4.3.2).
    #[serde(rename = "tls12-annex-a")]
    Tls12AnnexA,
}

impl Capif1eProfile {
    /// The name configs, flags and scenario files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls13Exporter => "tls13-exporter",
            Self::Tls12AnnexA => "tls12-annex-a",
        }
    }

    /// The wire value of `SecurityInformation.aef_psk_derivation`.
    pub fn to_proto(self) -> capif_proto::v1::AefPskDerivation {
        match self {
            Self::Tls13Exporter => capif_proto::v1::AefPskDerivation::Tls13Exporter,
            Self::Tls12AnnexA => capif_proto::v1::AefPskDerivation::Tls12AnnexA,
        }
    }

    /// The profile a wire value names; `None` for an unset or unknown value.
    pub fn from_proto(value: i32) -> Option<Self> {
        match capif_proto::v1::AefPskDerivation::try_from(value).ok()? {
            capif_proto::v1::AefPskDerivation::Tls13Exporter => Some(Self::Tls13Exporter),
            capif_proto::v1::AefPskDerivation::Tls12AnnexA => Some(Self::Tls12AnnexA),
            capif_proto::v1::AefPskDerivation::Unspecified => None,
        }
    }
}

impl fmt::Display for Capif1eProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Capif1eProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tls13-exporter" => Ok(Self::Tls13Exporter),
            "tls12-annex-a" => Ok(Self::Tls12AnnexA),
            _ => Err(format!(
                "{s:?} is not a CAPIF-1e profile: use tls13-exporter or tls12-annex-a"
            )),
        }
    }
}

/// The two KDF inputs one CAPIF-1e TLS session gives, and the profile they were taken by: the
/// exporter values of a TLS 1.3 session, or the master secret and session ID of a TLS 1.2 full
/// handshake. Both ends of the session hold the same values.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Capif1eBinding {
    #[zeroize(skip)]
    profile: Capif1eProfile,
    key: Vec<u8>,
    session_id: Vec<u8>,
}

impl fmt::Debug for Capif1eBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Capif1eBinding({}, session_id={}, key=<redacted>)",
            self.profile,
            hex::encode(&self.session_id)
        )
    }
}

impl Capif1eBinding {
    /// Exports the binding from an established rustls connection (either side): the
    /// `tls13-exporter` profile.
    pub fn from_connection<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Self, rustls::Error> {
        let key =
            conn.export_keying_material(Zeroizing::new([0u8; 32]), EXPORTER_LABEL_KEY, None)?;
        let session_id = conn.export_keying_material([0u8; 32], EXPORTER_LABEL_SESSION_ID, None)?;
        Ok(Self::from_parts(*key, session_id))
    }

    /// A `tls13-exporter` binding from known values (tests and interop tools).
    pub fn from_parts(key: [u8; 32], session_id: [u8; 32]) -> Self {
        Self {
            profile: Capif1eProfile::Tls13Exporter,
            key: key.to_vec(),
            session_id: session_id.to_vec(),
        }
    }

    /// A `tls12-annex-a` binding: the master secret and the session ID of a TLS 1.2 full
    /// handshake (`ccf_core::tls12` reads them from OpenSSL on both ends).
    pub fn annex_a(master_secret: &[u8], session_id: &[u8]) -> Self {
        Self {
            profile: Capif1eProfile::Tls12AnnexA,
            key: master_secret.to_vec(),
            session_id: session_id.to_vec(),
        }
    }

    /// The profile the values were taken by.
    pub fn profile(&self) -> Capif1eProfile {
        self.profile
    }

    /// The value used as P1: the TLS session ID, or the exporter value that stands in for it
    /// (public either way: it names the session and reveals nothing of the key).
    pub fn session_id(&self) -> &[u8] {
        &self.session_id
    }

    /// The AEFPSK of this session for the AEF whose canonical interface string is `interface`.
    pub fn aefpsk(&self, interface: &str) -> Result<AefPsk, KdfError> {
        derive_aefpsk(&self.key, &self.session_id, interface)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Vector {
        name: String,
        key_hex: String,
        session_id_hex: String,
        interface: String,
        aefpsk_hex: String,
        key_id: String,
    }

    /// Vectors computed by tests/vectors/aefpsk_vectors.py with Python's hmac module.
    #[test]
    fn matches_independently_computed_vectors() {
        let text = include_str!("../tests/vectors/aefpsk_vectors.json");
        let vectors: Vec<Vector> = serde_json::from_str(text).expect("vector file parses");
        assert!(vectors.len() >= 5, "vector file lost its entries");
        for v in vectors {
            let key = hex::decode(&v.key_hex).expect("hex");
            let sid = hex::decode(&v.session_id_hex).expect("hex");
            let psk = derive_aefpsk(&key, &sid, &v.interface).expect("derives");
            assert_eq!(hex::encode(psk.expose()), v.aefpsk_hex, "vector {}", v.name);
            assert_eq!(psk.key_id(), v.key_id, "key id of vector {}", v.name);
        }
    }

    #[test]
    fn lengths_are_two_octets_big_endian() {
        // FC || P0 || L0 with a 5-octet P0 must put 0x00 0x05 after it (TS 33.535 A.3 example).
        let key = [7u8; 32];
        let manual = {
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
            mac.update(&[0x7A, b'h', b'e', b'l', b'l', b'o', 0x00, 0x05]);
            <[u8; 32]>::from(mac.finalize().into_bytes())
        };
        assert_eq!(kdf(&key, 0x7A, &[b"hello"]).unwrap(), manual);
    }

    #[test]
    fn refuses_oversized_parameters_and_empty_key() {
        let big = vec![0u8; 65536];
        assert_eq!(
            kdf(&[1], FC_AEFPSK, &[&big]),
            Err(KdfError::ParameterTooLong {
                index: 0,
                len: 65536
            })
        );
        assert_eq!(kdf(&[], FC_AEFPSK, &[b"x"]), Err(KdfError::EmptyKey));
    }

    #[test]
    fn debug_output_hides_key_bytes() {
        let psk = AefPsk([0xAB; 32]);
        let shown = format!("{psk:?}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        let b = Capif1eBinding::from_parts([0xCD; 32], [1; 32]);
        assert!(!format!("{b:?}").to_lowercase().contains("cdcd"));
        let b = Capif1eBinding::annex_a(&[0xEF; 48], &[2; 32]);
        let shown = format!("{b:?}");
        assert!(!shown.to_lowercase().contains("efef"), "{shown}");
        assert!(shown.contains("tls12-annex-a"), "{shown}");
    }

    /// An Annex A binding feeds the 48-octet master secret and the session ID to the one KDF:
    /// the committed vector `tls12-master-secret-48` (computed with Python's hmac) comes out.
    #[test]
    fn annex_a_binding_derives_the_tls12_vector() {
        let text = include_str!("../tests/vectors/aefpsk_vectors.json");
        let vectors: Vec<Vector> = serde_json::from_str(text).expect("vector file parses");
        let v = vectors
            .iter()
            .find(|v| v.name == "tls12-master-secret-48")
            .expect("the TLS 1.2 vector is committed");
        let b = Capif1eBinding::annex_a(
            &hex::decode(&v.key_hex).unwrap(),
            &hex::decode(&v.session_id_hex).unwrap(),
        );
        assert_eq!(b.profile(), Capif1eProfile::Tls12AnnexA);
        let psk = b.aefpsk(&v.interface).unwrap();
        assert_eq!(hex::encode(psk.expose()), v.aefpsk_hex);
    }

    #[test]
    fn profiles_print_parse_and_map_to_the_wire() {
        for p in [Capif1eProfile::Tls13Exporter, Capif1eProfile::Tls12AnnexA] {
            assert_eq!(p.to_string().parse::<Capif1eProfile>(), Ok(p));
            assert_eq!(Capif1eProfile::from_proto(p.to_proto() as i32), Some(p));
        }
        assert_eq!(Capif1eProfile::default(), Capif1eProfile::Tls13Exporter);
        assert_eq!(Capif1eProfile::from_proto(0), None);
        assert_eq!(Capif1eProfile::from_proto(99), None);
        let e = "tls12".parse::<Capif1eProfile>().unwrap_err();
        assert!(e.contains("tls13-exporter or tls12-annex-a"), "{e}");
    }
}
