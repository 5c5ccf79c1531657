"""The primitives against published values: Noise/WireGuard constants, BLAKE2s, HMAC, KDF,
X25519 (RFC 7748), HChaCha20 and XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha), TAI64N."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from pyflannel.wireguard import constants as c
from pyflannel.wireguard.crypto import (
    InvalidTag,
    aead_decrypt,
    aead_encrypt,
    blake2s_hash,
    dh,
    hchacha20,
    hmac_blake2s,
    kdf1,
    kdf2,
    kdf3,
    keyed_mac,
    tai64n,
    xaead_decrypt,
    xaead_encrypt,
)
from pyflannel.wireguard.keys import PrivateKey
from pyflannel.wireguard.noise import INITIAL_CHAINING_KEY, INITIAL_HASH

# Published by wireguard-go / boringtun / the kernel-derived implementations: C0 and H0.
KNOWN_CK = "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
KNOWN_H = "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


def test_protocol_strings() -> None:
    assert c.CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert len(c.CONSTRUCTION) == 37
    assert c.IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert len(c.IDENTIFIER) == 34
    assert c.LABEL_MAC1 == b"mac1----" and c.LABEL_COOKIE == b"cookie--"


def test_initial_chaining_key_and_hash_match_the_published_values() -> None:
    assert blake2s_hash(c.CONSTRUCTION).hex() == KNOWN_CK
    assert blake2s_hash(bytes.fromhex(KNOWN_CK), c.IDENTIFIER).hex() == KNOWN_H
    assert INITIAL_CHAINING_KEY.hex() == KNOWN_CK
    assert INITIAL_HASH.hex() == KNOWN_H


def test_message_layouts() -> None:
    assert (c.INIT_SENDER, c.INIT_EPHEMERAL, c.INIT_STATIC, c.INIT_TIMESTAMP) == (4, 8, 40, 88)
    assert (c.INIT_MAC1, c.INIT_MAC2, c.INIT_LEN) == (116, 132, 148)
    assert (c.RESP_SENDER, c.RESP_RECEIVER, c.RESP_EPHEMERAL, c.RESP_EMPTY) == (4, 8, 12, 44)
    assert (c.RESP_MAC1, c.RESP_MAC2, c.RESP_LEN) == (60, 76, 92)
    assert (c.COOKIE_RECEIVER, c.COOKIE_NONCE, c.COOKIE_ENCRYPTED) == (4, 8, 32)
    assert c.COOKIE_REPLY_LEN == 64
    assert (c.DATA_RECEIVER, c.DATA_COUNTER, c.DATA_PAYLOAD, c.DATA_MIN_LEN) == (4, 8, 16, 32)


def test_limits() -> None:
    assert c.REKEY_AFTER_MESSAGES == 2**60
    assert c.REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    assert (c.REKEY_AFTER_TIME, c.REJECT_AFTER_TIME, c.REKEY_ATTEMPT_TIME) == (120, 180, 90)
    assert (c.REKEY_TIMEOUT, c.KEEPALIVE_TIMEOUT, c.COOKIE_REFRESH_TIME) == (5, 10, 120)
    limits = c.Limits()
    assert limits.max_handshake_attempts == 18
    assert limits.receive_rekey_age == 165
    assert limits.new_handshake_after == 15


def test_blake2s_rfc7693_vector() -> None:
    assert blake2s_hash(b"abc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
    assert blake2s_hash(b"a", b"bc") == blake2s_hash(b"abc")


@pytest.mark.parametrize("key_len", [0, 16, 32, 64, 65, 100])
def test_hmac_is_rfc2104_over_blake2s(key_len: int) -> None:
    key = bytes(range(key_len))
    data = b"wireguard hmac"
    assert hmac_blake2s(key, data) == hmac.new(key, data, hashlib.blake2s).digest()
    # and not BLAKE2s's own keyed mode
    if 0 < key_len <= 32:
        assert hmac_blake2s(key, data) != hashlib.blake2s(data, key=key).digest()


def test_kdf_chain() -> None:
    key, data = b"k" * 32, b"input"
    prk = hmac.new(key, data, hashlib.blake2s).digest()
    t1 = hmac.new(prk, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(prk, t1 + b"\x02", hashlib.blake2s).digest()
    t3 = hmac.new(prk, t2 + b"\x03", hashlib.blake2s).digest()
    assert kdf1(key, data) == t1
    assert kdf2(key, data) == (t1, t2)
    assert kdf3(key, data) == (t1, t2, t3)


def test_mac_is_keyed_blake2s_128() -> None:
    key = b"m" * 32
    assert keyed_mac(key, b"x") == hashlib.blake2s(b"x", key=key, digest_size=16).digest()
    assert len(keyed_mac(key, b"x")) == 16


def test_aead_nonce_is_zero_padded_little_endian_counter() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key = bytes(range(32))
    ct = aead_encrypt(key, 0x0102, b"payload", b"ad")
    nonce = bytes(4) + (0x0102).to_bytes(8, "little")
    assert ChaCha20Poly1305(key).decrypt(nonce, ct, b"ad") == b"payload"
    assert aead_decrypt(key, 0x0102, ct, b"ad") == b"payload"
    with pytest.raises(InvalidTag):
        aead_decrypt(key, 0x0103, ct, b"ad")


def test_x25519_rfc7748_vector() -> None:
    alice = PrivateKey.from_bytes(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    bob = PrivateKey.from_bytes(bytes.fromhex(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    assert alice.public.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert bob.public.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert dh(alice.x25519, bob.public).hex() == shared
    assert dh(bob.x25519, alice.public).hex() == shared


def test_hchacha20_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
    with pytest.raises(ValueError):
        hchacha20(key, nonce[:15])


def test_xchacha20_poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha appendix A.3.1
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
                 b"for the future, sunscreen would be it.")
    expected = bytes.fromhex(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49")
    assert xaead_encrypt(key, nonce, plaintext, aad) == expected
    assert xaead_decrypt(key, nonce, expected, aad) == plaintext
    tampered = bytearray(expected)
    tampered[-1] ^= 1
    with pytest.raises(InvalidTag):
        xaead_decrypt(key, nonce, bytes(tampered), aad)
    with pytest.raises(InvalidTag):
        xaead_decrypt(key, nonce, expected, aad + b"x")


def test_tai64n_layout_and_whitening() -> None:
    stamp = tai64n(1_700_000_000.123456789)
    assert len(stamp) == c.TAI64N_LEN
    assert int.from_bytes(stamp[:8], "big") == (1 << 62) + 10 + 1_700_000_000
    nanos = int.from_bytes(stamp[8:], "big")
    assert nanos % (1 << 24) == 0 and nanos <= 123456789
    # later wall clock, greater timestamp, compared as bytes
    assert tai64n(1_700_000_001.0) > stamp
    assert tai64n(1_700_000_000.2) > stamp
