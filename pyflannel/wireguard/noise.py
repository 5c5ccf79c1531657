"""Noise_IKpsk2 as WireGuard uses it: initiation, response, mac1/mac2 and cookie replies.

These are pure functions over bytes and small state objects: no clock, no sockets, no peer
table. The caller (``device.py``) decides which peer a message belongs to, whether its
timestamp is new, whether we are under load, and what to do with the keys.

Message flow (whitepaper section 5.4)::

    initiator                                   responder
    create_initiation  --- type 1, 148 B --->   consume_initiation -> remote static key
                                                (caller checks the key holds a lease,
                                                 the timestamp is new, the rate is sane)
    consume_response   <--- type 2, 92 B ----   create_response
    both: TransportKeys(send, recv)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .constants import (
    CONSTRUCTION,
    COOKIE_ENCRYPTED,
    COOKIE_LEN,
    COOKIE_NONCE,
    COOKIE_RECEIVER,
    COOKIE_REPLY_LEN,
    HEADER_COOKIE_REPLY,
    HEADER_INITIATION,
    HEADER_RESPONSE,
    IDENTIFIER,
    INDEX_LEN,
    INIT_EPHEMERAL,
    INIT_LEN,
    INIT_MAC1,
    INIT_MAC2,
    INIT_SENDER,
    INIT_STATIC,
    INIT_TIMESTAMP,
    KEY_LEN,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_LEN,
    RESP_EMPTY,
    RESP_EPHEMERAL,
    RESP_LEN,
    RESP_MAC1,
    RESP_MAC2,
    RESP_RECEIVER,
    RESP_SENDER,
    XNONCE_LEN,
)
from .crypto import (
    InvalidTag,
    aead_decrypt,
    aead_encrypt,
    blake2s_hash,
    constant_time_equal,
    dh,
    kdf1,
    kdf2,
    kdf3,
    keyed_mac,
    xaead_decrypt,
    xaead_encrypt,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from .keys import PrivateKey

INITIAL_CHAINING_KEY = blake2s_hash(CONSTRUCTION)
INITIAL_HASH = blake2s_hash(INITIAL_CHAINING_KEY, IDENTIFIER)
ZERO_PSK = bytes(KEY_LEN)
_EMPTY = b""


class HandshakeError(Exception):
    """A handshake message was refused; ``reason`` is the drop counter's name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True, repr=False)
class LocalIdentity:
    """Our static key and what every incoming handshake needs precomputed from it."""

    private: PrivateKey
    public: bytes = field(init=False)
    mac1_key: bytes = field(init=False)  # checks mac1 of messages sent to us
    cookie_key: bytes = field(init=False)  # encrypts the cookie replies we send
    initial_hash: bytes = field(init=False)  # H after mixing in our public key (responder)

    def __post_init__(self) -> None:
        self.public = self.private.public
        self.mac1_key = blake2s_hash(LABEL_MAC1, self.public)
        self.cookie_key = blake2s_hash(LABEL_COOKIE, self.public)
        self.initial_hash = blake2s_hash(INITIAL_HASH, self.public)

    def __repr__(self) -> str:
        return f"LocalIdentity({self.private!r})"


@dataclass(slots=True, repr=False)
class PeerIdentity:
    """A remote static key with its pre-shared key and the values derived from the pair."""

    public: bytes
    psk: bytes
    static_static: bytes  # DH(our static, their static): the same for every handshake
    mac1_key: bytes  # mac1 of messages we send to them
    cookie_key: bytes  # decrypts cookie replies they send us
    initial_hash: bytes  # H after mixing in their public key (initiator)

    @classmethod
    def derive(cls, local: LocalIdentity, public: bytes, psk: bytes | None = None) -> PeerIdentity:
        """Precompute everything about a peer that does not change between handshakes."""
        if len(public) != KEY_LEN:
            raise ValueError("peer public key must be 32 bytes")
        if psk is not None and len(psk) != KEY_LEN:
            raise ValueError("pre-shared key must be 32 bytes")
        try:
            ss = dh(local.private.x25519, public)
        except ValueError:
            raise ValueError("peer public key is a low-order point") from None
        if ss == bytes(KEY_LEN):
            raise ValueError("peer public key is a low-order point")
        return cls(
            public=public,
            psk=psk or ZERO_PSK,
            static_static=ss,
            mac1_key=blake2s_hash(LABEL_MAC1, public),
            cookie_key=blake2s_hash(LABEL_COOKIE, public),
            initial_hash=blake2s_hash(INITIAL_HASH, public),
        )

    def __repr__(self) -> str:
        from .keys import short_key

        return f"PeerIdentity({short_key(self.public)})"


@dataclass(slots=True, repr=False)
class InitiatorState:
    """What the initiator keeps between sending an initiation and reading the response."""

    sender_index: int
    ephemeral: X25519PrivateKey
    chaining_key: bytes
    hash: bytes


@dataclass(slots=True, repr=False)
class ConsumedInitiation:
    """A valid initiation: who sent it, when, and the state the response continues from."""

    peer: PeerIdentity
    sender_index: int
    timestamp: bytes
    remote_ephemeral: bytes
    chaining_key: bytes
    hash: bytes


@dataclass(slots=True, repr=False)
class TransportKeys:
    """The two symmetric keys a completed handshake yields, from this side's point of view."""

    send: bytes
    recv: bytes
    local_index: int  # the index the peer puts in messages to us
    remote_index: int  # the index we put in messages to the peer
    initiator: bool


def _ephemeral() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        shared = dh(private, public)
    except ValueError:
        raise HandshakeError("bad_auth") from None
    if shared == bytes(KEY_LEN):
        raise HandshakeError("bad_auth")
    return shared


def create_initiation(
    local: LocalIdentity, peer: PeerIdentity, sender_index: int, timestamp: bytes,
    ephemeral: tuple[X25519PrivateKey, bytes] | None = None,
) -> tuple[bytearray, InitiatorState]:
    """Build a type-1 message (mac1/mac2 left zero: see :func:`seal_macs`) and our state."""
    e_priv, e_pub = ephemeral or _ephemeral()
    ck = INITIAL_CHAINING_KEY
    h = peer.initial_hash
    ck = kdf1(ck, e_pub)
    h = blake2s_hash(h, e_pub)
    ck, k = kdf2(ck, _dh(e_priv, peer.public))
    enc_static = aead_encrypt(k, 0, local.public, h)
    h = blake2s_hash(h, enc_static)
    ck, k = kdf2(ck, peer.static_static)
    enc_time = aead_encrypt(k, 0, timestamp, h)
    h = blake2s_hash(h, enc_time)
    msg = bytearray(INIT_LEN)
    msg[0:INIT_SENDER] = HEADER_INITIATION
    msg[INIT_SENDER:INIT_EPHEMERAL] = sender_index.to_bytes(INDEX_LEN, "little")
    msg[INIT_EPHEMERAL:INIT_STATIC] = e_pub
    msg[INIT_STATIC:INIT_TIMESTAMP] = enc_static
    msg[INIT_TIMESTAMP:INIT_MAC1] = enc_time
    return msg, InitiatorState(sender_index, e_priv, ck, h)


def consume_initiation(
    local: LocalIdentity, msg: bytes, lookup: Callable[[bytes], PeerIdentity | None],
) -> ConsumedInitiation:
    """Open a type-1 message whose mac1 was already checked.

    ``lookup`` maps the decrypted static key to a peer; None refuses the handshake with
    reason ``unknown_peer`` before the second DH is spent on it.
    """
    if len(msg) != INIT_LEN:
        raise HandshakeError("malformed")
    e_pub = bytes(msg[INIT_EPHEMERAL:INIT_STATIC])
    ck = kdf1(INITIAL_CHAINING_KEY, e_pub)
    h = blake2s_hash(local.initial_hash, e_pub)
    ck, k = kdf2(ck, _dh(local.private.x25519, e_pub))
    enc_static = bytes(msg[INIT_STATIC:INIT_TIMESTAMP])
    try:
        remote_static = aead_decrypt(k, 0, enc_static, h)
    except InvalidTag:
        raise HandshakeError("bad_auth") from None
    h = blake2s_hash(h, enc_static)
    peer = lookup(remote_static)
    if peer is None:
        raise HandshakeError("unknown_peer")
    ck, k = kdf2(ck, peer.static_static)
    enc_time = bytes(msg[INIT_TIMESTAMP:INIT_MAC1])
    try:
        timestamp = aead_decrypt(k, 0, enc_time, h)
    except InvalidTag:
        raise HandshakeError("bad_auth") from None
    h = blake2s_hash(h, enc_time)
    sender = int.from_bytes(msg[INIT_SENDER:INIT_EPHEMERAL], "little")
    return ConsumedInitiation(peer, sender, timestamp, e_pub, ck, h)


def create_response(
    local: LocalIdentity, init: ConsumedInitiation, sender_index: int,
    ephemeral: tuple[X25519PrivateKey, bytes] | None = None,
) -> tuple[bytearray, TransportKeys]:
    """Build a type-2 message answering ``init`` (macs left zero) and derive our keys."""
    e_priv, e_pub = ephemeral or _ephemeral()
    ck = kdf1(init.chaining_key, e_pub)
    h = blake2s_hash(init.hash, e_pub)
    ck = kdf1(ck, _dh(e_priv, init.remote_ephemeral))
    ck = kdf1(ck, _dh(e_priv, init.peer.public))
    ck, tau, k = kdf3(ck, init.peer.psk)
    h = blake2s_hash(h, tau)
    enc_empty = aead_encrypt(k, 0, _EMPTY, h)
    msg = bytearray(RESP_LEN)
    msg[0:RESP_SENDER] = HEADER_RESPONSE
    msg[RESP_SENDER:RESP_RECEIVER] = sender_index.to_bytes(INDEX_LEN, "little")
    msg[RESP_RECEIVER:RESP_EPHEMERAL] = init.sender_index.to_bytes(INDEX_LEN, "little")
    msg[RESP_EPHEMERAL:RESP_EMPTY] = e_pub
    msg[RESP_EMPTY:RESP_MAC1] = enc_empty
    recv, send = kdf2(ck, _EMPTY)  # the initiator's send key is our receive key
    return msg, TransportKeys(send, recv, sender_index, init.sender_index, initiator=False)


def consume_response(
    local: LocalIdentity, peer: PeerIdentity, state: InitiatorState, msg: bytes,
) -> TransportKeys:
    """Open a type-2 message (mac1 already checked) for our pending initiation."""
    if len(msg) != RESP_LEN:
        raise HandshakeError("malformed")
    e_pub = bytes(msg[RESP_EPHEMERAL:RESP_EMPTY])
    ck = kdf1(state.chaining_key, e_pub)
    h = blake2s_hash(state.hash, e_pub)
    ck = kdf1(ck, _dh(state.ephemeral, e_pub))
    ck = kdf1(ck, _dh(local.private.x25519, e_pub))
    ck, tau, k = kdf3(ck, peer.psk)
    h = blake2s_hash(h, tau)
    try:
        aead_decrypt(k, 0, bytes(msg[RESP_EMPTY:RESP_MAC1]), h)
    except InvalidTag:
        raise HandshakeError("bad_auth") from None
    send, recv = kdf2(ck, _EMPTY)
    remote = int.from_bytes(msg[RESP_SENDER:RESP_RECEIVER], "little")
    return TransportKeys(send, recv, state.sender_index, remote, initiator=True)


# --- mac1 / mac2 --------------------------------------------------------------------------


def mac_offsets(msg_len: int) -> tuple[int, int]:
    """(mac1 offset, mac2 offset) of a handshake message of this length."""
    if msg_len == INIT_LEN:
        return INIT_MAC1, INIT_MAC2
    if msg_len == RESP_LEN:
        return RESP_MAC1, RESP_MAC2
    raise HandshakeError("malformed")


def seal_macs(msg: bytearray, mac1_key: bytes, cookie: bytes | None) -> bytes:
    """Fill in mac1 (always) and mac2 (with a fresh cookie, else zeros); return mac1."""
    m1, m2 = mac_offsets(len(msg))
    mac1 = keyed_mac(mac1_key, bytes(msg[:m1]))
    msg[m1:m2] = mac1
    msg[m2 : m2 + MAC_LEN] = keyed_mac(cookie, bytes(msg[:m2])) if cookie else bytes(MAC_LEN)
    return mac1


def check_mac1(msg: bytes, mac1_key: bytes) -> bool:
    """Is mac1 right for us? Checked before any DH, so junk costs one BLAKE2s."""
    m1, m2 = mac_offsets(len(msg))
    return constant_time_equal(keyed_mac(mac1_key, bytes(msg[:m1])), bytes(msg[m1:m2]))


def check_mac2(msg: bytes, cookie: bytes) -> bool:
    """Is mac2 right for the cookie this source address would get from us now?"""
    m1, m2 = mac_offsets(len(msg))
    return constant_time_equal(keyed_mac(cookie, bytes(msg[:m2])), bytes(msg[m2 : m2 + MAC_LEN]))


def address_bytes(host: str, port: int) -> bytes:
    """The source a cookie is bound to: packed IP address, then the port (network order)."""
    import ipaddress

    return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")


class CookieChecker:
    """The responder's side of cookies: a secret that changes every two minutes."""

    __slots__ = ("_secret", "_born", "_refresh", "_local")

    def __init__(self, local: LocalIdentity, refresh: float) -> None:
        self._local = local
        self._refresh = refresh
        self._secret = b""
        self._born = float("-inf")

    def cookie_for(self, source: bytes, now: float) -> bytes:
        """tau = MAC(R_m, source address and port), R_m renewed when older than 120 s."""
        if now - self._born >= self._refresh:
            self._secret = os.urandom(KEY_LEN)
            self._born = now
        return keyed_mac(self._secret, source)

    def make_reply(self, msg: bytes, receiver_index: int, source: bytes, now: float) -> bytes:
        """A type-3 message: the cookie, XAEAD-encrypted with the mac1 it answers as AD."""
        m1, m2 = mac_offsets(len(msg))
        cookie = self.cookie_for(source, now)
        nonce = os.urandom(XNONCE_LEN)
        enc = xaead_encrypt(self._local.cookie_key, nonce, cookie, bytes(msg[m1:m2]))
        return (HEADER_COOKIE_REPLY + receiver_index.to_bytes(INDEX_LEN, "little")
                + nonce + enc)


def open_cookie_reply(msg: bytes, cookie_key: bytes, last_mac1: bytes) -> bytes:
    """The initiator's side: decrypt a type-3 message into the cookie for mac2."""
    if len(msg) != COOKIE_REPLY_LEN:
        raise HandshakeError("malformed")
    nonce = bytes(msg[COOKIE_NONCE:COOKIE_ENCRYPTED])
    try:
        cookie = xaead_decrypt(cookie_key, nonce, bytes(msg[COOKIE_ENCRYPTED:]), last_mac1)
    except InvalidTag:
        raise HandshakeError("bad_cookie") from None
    if len(cookie) != COOKIE_LEN:
        raise HandshakeError("bad_cookie")
    return cookie


def cookie_reply_receiver(msg: bytes) -> int:
    """The index a cookie reply is addressed to (our sender index of the message it answers)."""
    return int.from_bytes(msg[COOKIE_RECEIVER:COOKIE_NONCE], "little")


