#!/usr/bin/env python3
"""Recomputes a CAPIF-1e AEFPSK from an NSS key log (SSLKEYLOGFILE), without the project's KDF
code: Python's hmac and hashlib only (docs/PROTOCOL.md 4.1, 4.3 and 4.6).

  AEFPSK = HMAC-SHA-256(Key, 0x7A || P0 || L0 || P1 || L1), P0 = the canonical interface string
  (NFKC, UTF-8), Li = 2-octet big-endian length; key id = SHA-256("CAPIF-AEFPSK-KEY-ID" || AEFPSK)[:8].

  tls12-annex-a (TS 33.122 A.1 as written): Key = the master secret, the third field of a
    CLIENT_RANDOM line; P1 = the TLS session ID.
  tls13-exporter: Key and P1 are the RFC 8446 7.5 exporter values for the labels
    EXPERIMENTAL-CAPIF-AEFPSK-KEY and EXPERIMENTAL-CAPIF-AEFPSK-SESSION-ID (no context, 32
    octets), computed from an EXPORTER_SECRET line; only the session whose P1 is SESSION_ID_HEX
    is printed.

Usage:  aefpsk_from_keylog.py KEYLOG SESSION_ID_HEX P0
Prints one line per matching session of the key log:
  profile=<profile> client_random=<hex> aefpsk=<hex> key_id=<hex>
`capif invoker security` prints SESSION_ID_HEX (session_id=), P0 (p0=) and the key id to expect.
"""
import hashlib
import hmac
import sys
import unicodedata


def aefpsk(key: bytes, session_id: bytes, p0: str) -> bytes:
    p0_octets = unicodedata.normalize("NFKC", p0).encode("utf-8")
    s = b"\x7a"
    for p in (p0_octets, session_id):
        s += p + len(p).to_bytes(2, "big")
    return hmac.new(key, s, hashlib.sha256).digest()


def key_id(psk: bytes) -> str:
    return hashlib.sha256(b"CAPIF-AEFPSK-KEY-ID" + psk).digest()[:8].hex()


def hkdf_expand_label(h, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """RFC 8446 7.1 HKDF-Expand-Label (RFC 5869 HKDF-Expand)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([i]), h).digest()
        out += block
        i += 1
    return out[:length]


def exporter(exporter_secret: bytes, label: bytes, length: int = 32) -> bytes:
    """RFC 8446 7.5 TLS-Exporter(label, no context, length); the hash is the suite's, told by the
    secret's length (32: SHA-256, 48: SHA-384)."""
    h = {32: hashlib.sha256, 48: hashlib.sha384}[len(exporter_secret)]
    empty = h(b"").digest()
    derived = hkdf_expand_label(h, exporter_secret, label, empty, h().digest_size)
    return hkdf_expand_label(h, derived, b"exporter", empty, length)


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    keylog, session_id_hex, p0 = sys.argv[1:]
    session_id = bytes.fromhex(session_id_hex)
    found = 0
    with open(keylog, encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if len(fields) != 3:
                continue
            label, client_random, secret = fields[0], fields[1], bytes.fromhex(fields[2])
            if label == "CLIENT_RANDOM":
                profile, psk = "tls12-annex-a", aefpsk(secret, session_id, p0)
            elif label == "EXPORTER_SECRET":
                p1 = exporter(secret, b"EXPERIMENTAL-CAPIF-AEFPSK-SESSION-ID")
                if p1 != session_id:
                    continue
                key = exporter(secret, b"EXPERIMENTAL-CAPIF-AEFPSK-KEY")
                profile, psk = "tls13-exporter", aefpsk(key, p1, p0)
            else:
                continue
            print(f"profile={profile} client_random={client_random} aefpsk={psk.hex()} key_id={key_id(psk)}")
            found += 1
    if not found:
        print(f"{keylog}: no CLIENT_RANDOM line, and no EXPORTER_SECRET of that session", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
