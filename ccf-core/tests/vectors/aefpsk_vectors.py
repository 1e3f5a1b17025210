#!/usr/bin/env python3
"""AEFPSK test vectors, computed independently of the Rust code.

TS 33.220 B.2.0 KDF with the TS 33.122 A.1 inputs:
  AEFPSK = HMAC-SHA-256(Key, FC || P0 || L0 || P1 || L1), FC = 0x7A,
  P0 = canonical interface string (NFKC, UTF-8), P1 = session id, Li = 2-octet big-endian length.
Key id = first 8 octets of SHA-256(b"CAPIF-AEFPSK-KEY-ID" || AEFPSK), lowercase hex.

Run:  python3 ccf-core/tests/vectors/aefpsk_vectors.py > ccf-core/tests/vectors/aefpsk_vectors.json
"""
import hashlib
import hmac
import json
import unicodedata


def kdf(key: bytes, fc: int, params: list[bytes]) -> bytes:
    s = bytes([fc])
    for p in params:
        s += p + len(p).to_bytes(2, "big")
    return hmac.new(key, s, hashlib.sha256).digest()


def aefpsk(key: bytes, session_id: bytes, interface: str) -> bytes:
    p0 = unicodedata.normalize("NFKC", interface).encode("utf-8")
    return kdf(key, 0x7A, [p0, session_id])


def key_id(psk: bytes) -> str:
    return hashlib.sha256(b"CAPIF-AEFPSK-KEY-ID" + psk).digest()[:8].hex()


CASES = [
    ("tls13-profile", bytes(range(32)), bytes(range(32, 64)), "aef-weather.operator-a.test:8443/weather"),
    ("tls12-master-secret-48", bytes([0x0B] * 48), bytes.fromhex("aa" * 32), "aef1.operator-b.test:443/api"),
    ("ipv4-interface", b"\x01" * 32, b"\x02" * 32, "127.0.0.1:9443"),
    ("ipv6-interface", b"\x03" * 32, b"\x04" * 16, "[2001:db8::1]:8443/v1"),
    ("empty-session-id", b"\x05" * 32, b"", "aef.example:1/"),
    ("nfkc-normalised", b"\x06" * 32, b"\x07" * 32, "ｆｕｌｌwidth.example:443/ﬁ"),
    ("long-interface-300", b"\x08" * 32, b"\x09" * 32, "a" * 300),
]

out = []
for name, key, sid, iface in CASES:
    psk = aefpsk(key, sid, iface)
    out.append({
        "name": name,
        "key_hex": key.hex(),
        "session_id_hex": sid.hex(),
        "interface": iface,
        "aefpsk_hex": psk.hex(),
        "key_id": key_id(psk),
    })
print(json.dumps(out, indent=2, ensure_ascii=False))
