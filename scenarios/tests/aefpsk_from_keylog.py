#!/usr/bin/env python3
"""Recomputes a CAPIF-1e AEFPSK of the tls12-annex-a profile from an NSS key log, without the
project's KDF code: TS 33.122 A.1 as written, with Python's hmac and hashlib.

  AEFPSK = HMAC-SHA-256(master secret, 0x7A || P0 || L0 || P1 || L1)
  master secret = the third field of a CLIENT_RANDOM line of the key log (SSLKEYLOGFILE),
  P0 = the canonical interface string (NFKC, UTF-8), P1 = the TLS session ID,
  Li = 2-octet big-endian length; key id = SHA-256("CAPIF-AEFPSK-KEY-ID" || AEFPSK)[:8].

Usage:  aefpsk_from_keylog.py KEYLOG SESSION_ID_HEX P0
Prints one line per CLIENT_RANDOM line of the key log (one per TLS 1.2 session):
  client_random=<hex> aefpsk=<hex> key_id=<hex>
The session whose key id `capif invoker security` printed is the one it used.
"""
import hashlib
import hmac
import sys
import unicodedata


def aefpsk(master_secret: bytes, session_id: bytes, p0: str) -> bytes:
    p0_octets = unicodedata.normalize("NFKC", p0).encode("utf-8")
    s = b"\x7a"
    for p in (p0_octets, session_id):
        s += p + len(p).to_bytes(2, "big")
    return hmac.new(master_secret, s, hashlib.sha256).digest()


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
            if len(fields) != 3 or fields[0] != "CLIENT_RANDOM":
                continue
            psk = aefpsk(bytes.fromhex(fields[2]), session_id, p0)
            key_id = hashlib.sha256(b"CAPIF-AEFPSK-KEY-ID" + psk).digest()[:8].hex()
            print(f"client_random={fields[1]} aefpsk={psk.hex()} key_id={key_id}")
            found += 1
    if not found:
        print(f"{keylog}: no CLIENT_RANDOM line (is it a TLS 1.2 key log?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
