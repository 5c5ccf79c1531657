"""The whitepaper's primitives: HASH, MAC, HMAC, KDF, AEAD, XAEAD, DH and TAI64N.

BLAKE2s comes from hashlib, ChaCha20-Poly1305 and X25519 from ``cryptography``. The one
thing ``cryptography`` lacks is XChaCha20-Poly1305 (cookie replies only); it is built the
way libsodium builds it: HChaCha20 (one ChaCha20 block, below) turns the key and the
first 16 bytes of the 24-byte nonce into a subkey, and ChaCha20-Poly1305 runs under that
subkey with a nonce of four zero bytes and the last 8 bytes of the 24-byte nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20

from .constants import (
    KEY_LEN,
    MAC_LEN,
    TAI64_BASE,
    TAI64N_WHITEN_MASK,
    XNONCE_LEN,
)

__all__ = [
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "blake2s_hash",
    "dh",
    "hchacha20",
    "hmac_blake2s",
    "kdf1",
    "kdf2",
    "kdf3",
    "keyed_mac",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

_BLOCK = 64  # BLAKE2s block size, the HMAC block size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
ZERO_NONCE = bytes(12)


def blake2s_hash(*parts: bytes) -> bytes:
    """HASH(a || b || ...): unkeyed BLAKE2s-256."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def keyed_mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC(key, data): RFC 2104 HMAC over BLAKE2s-256, not BLAKE2s's own keyed mode."""
    if len(key) > _BLOCK:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = hashlib.blake2s(key.translate(_IPAD))
    inner.update(data)
    outer = hashlib.blake2s(key.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1: the HKDF-style extract and first expansion the handshake uses to chain keys."""
    prk = hmac_blake2s(key, data)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2: two 32-byte outputs."""
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: three 32-byte outputs (the pre-shared key step)."""
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    t3 = hmac_blake2s(prk, t2 + b"\x03")
    return t1, t2, t3


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD(key, counter, plaintext, ad): ChaCha20-Poly1305, nonce = 4 zero bytes || LE64."""
    nonce = b"\0\0\0\0" + counter.to_bytes(8, "little")
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises InvalidTag when authentication fails."""
    nonce = b"\0\0\0\0" + counter.to_bytes(8, "little")
    return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, ad)


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """DH(private, public): X25519. Raises ValueError for a low-order (all-zero) result."""
    return private.exchange(X25519PublicKey.from_public_bytes(public))


# --- HChaCha20 and XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha) ----------------------

_HNONCE_LEN = 16  # HChaCha20 takes the first 16 bytes of the 24-byte nonce
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_BLOCK_ZEROS = bytes(64)  # one ChaCha20 block of keystream
_M32 = 0xFFFFFFFF
_words = struct.Struct("<16I").unpack
_out = struct.Struct("<8I").pack
_nonce_words = struct.Struct("<4I").unpack


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20: 20 ChaCha rounds without the final addition; words 0-3 and 12-15 out.

    One ChaCha20 block from ``cryptography`` (its 16-byte nonce is counter || nonce, i.e.
    state words 12-15) is the rounds' output plus the input state; subtracting the input
    words 0-3 (the constant) and 12-15 (``nonce16``) leaves HChaCha20, in microseconds
    rather than the 100+ of the rounds in Python (a cookie reply costs one of these).
    """
    if len(key) != KEY_LEN or len(nonce16) != _HNONCE_LEN:
        raise ValueError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    block = Cipher(ChaCha20(key, nonce16), mode=None).encryptor().update(_BLOCK_ZEROS)
    w = _words(block)
    n = _nonce_words(nonce16)
    s0, s1, s2, s3 = _SIGMA
    return _out((w[0] - s0) & _M32, (w[1] - s1) & _M32, (w[2] - s2) & _M32,
                (w[3] - s3) & _M32, (w[12] - n[0]) & _M32, (w[13] - n[1]) & _M32,
                (w[14] - n[2]) & _M32, (w[15] - n[3]) & _M32)


def _xsplit(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce24) != XNONCE_LEN:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
    subkey = hchacha20(key, nonce24[:_HNONCE_LEN])
    return ChaCha20Poly1305(subkey), b"\0\0\0\0" + nonce24[_HNONCE_LEN:]


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XAEAD: XChaCha20-Poly1305 (cookie replies)."""
    aead, nonce = _xsplit(key, nonce24)
    return aead.encrypt(nonce, plaintext, ad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Inverse of :func:`xaead_encrypt`; raises InvalidTag when authentication fails."""
    aead, nonce = _xsplit(key, nonce24)
    return aead.decrypt(nonce, ciphertext, ad)


# --- TAI64N ------------------------------------------------------------------------------


def tai64n(now: float | None = None) -> bytes:
    """TAI64N of the wall clock: 8-byte big-endian label, 4-byte big-endian nanoseconds.

    Nanoseconds are rounded down to 2^24 ns so the timestamp does not leak a precise clock.
    """
    ns = time.time_ns() if now is None else int(now * 1_000_000_000)
    secs, nanos = divmod(ns, 1_000_000_000)
    nanos &= ~TAI64N_WHITEN_MASK
    return (TAI64_BASE + secs).to_bytes(8, "big") + nanos.to_bytes(4, "big")


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare secrets (MACs, keys) without leaking where they differ."""
    return hmac.compare_digest(a, b)


