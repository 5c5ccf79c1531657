"""Against computations that do not come from pyflannel's own code.

1. A captured exchange with Debian's wireguard-go (no wireguard-go needed to run).
   Captured once in the interop lab with test-only static keys (``a8``*32 for
   wireguard-go, ``b0``*32 for us) and, on our side, a fixed ephemeral key and timestamp
   so our messages are reproducible: wireguard-go's own initiation (from a ping on its
   side), our initiation, its response, and the transport message it sent back.
2. A handshake and transport messages computed step by step from the WireGuard paper
   (section 5.4) with only `cryptography`, hashlib and hmac: :class:`SpecInitiator` below
   shares no code with ``pyflannel.wireguard``, and a ``Device`` must answer it, accept
   its data and send data it can open.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pyflannel.wireguard.constants import (
    INIT_MAC2,
    RESP_MAC2,
    RESP_RECEIVER,
    RESP_SENDER,
    TAI64_BASE,
)
from pyflannel.wireguard.device import Device
from pyflannel.wireguard.keys import PrivateKey
from pyflannel.wireguard.noise import (
    LocalIdentity,
    PeerIdentity,
    check_mac1,
    consume_initiation,
    consume_response,
    create_initiation,
    seal_macs,
)
from pyflannel.wireguard.peer import PeerConfig
from pyflannel.wireguard.transport import Keypair

GO_INITIATION = bytes.fromhex(
    "010000001be17ec8c7f90356f890e80f75a88e81138bdd99b4c95652297f7fed22d2c32dbeddde5b"
    "ef3700fde1b178bdbd99ecc6de3e540b1743673ebe829143c79a46cda64ed55d888ed90aac3caccc"
    "19ad2e6fbdc953a1b819c49b0c8d82787c44f5def30b04a208b498ab4bafa0046c7f306ec731e3e5"
    "c4414e8764a848ea64a2eee500000000000000000000000000000000"
)
OUR_INITIATION = bytes.fromhex(
    "010000000d0c0b0a0d2ba27811c06aae55d7dc9207051388b061f4f9ddbaad4af607166b15ea3157"
    "c34c3cfade15250eee02af932760859d8ddda83ce102a247aaeaf4bc39a9b208b8594899344b1d12"
    "42d458544118dccc8490acfee48a411347e1a112aebd93cd85ec54891ba3e645badbae6e9f1ccdb4"
    "d8b5813af4941c8a5d3261c600000000000000000000000000000000"
)
GO_RESPONSE = bytes.fromhex(
    "02000000de148a520d0c0b0a6eba937bfe3f0dd80676a2630c35540630fc14b485162eae6d23f37a"
    "241cef36d2cecf4ff7630e95be0b17b46edb4ff4d12835441eb87ecddd670d1d7852957100000000"
    "000000000000000000000000"
)
GO_TRANSPORT = bytes.fromhex(
    "040000000d0c0b0a0000000000000000157ecfe99aab1f924d95249969816bf2e45031a865cb6a29"
    "20fe643569910a0eea2b09a87c22ccf06af0c4de5e23d76e53ae680352c3f54aee15d77d51735a80"
    "8c35233eef04788ceae55d0828d5ca1b9bac0686728149385d1d3c2d830f36b44eda809f4c5cbd89"
    "ffe23332a7acdc09"
)
GO_PLAIN = bytes.fromhex(
    "45000054070a400040011c9d0a0102000a0101010800984d3464000181380a6b00000000d2d60e00"
    "00000000101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f30313233"
    "34353637000000000000000000000000"
)
GO_PRIVATE = "qKioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKg="
PY_PRIVATE = "sLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLA="
OUR_EPHEMERAL = bytes.fromhex("c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8c8")
OUR_TIMESTAMP = bytes.fromhex("400000006b49d20a00000000")
OUR_INDEX = 0x0A0B0C0D


def _sides() -> tuple[LocalIdentity, PeerIdentity, PrivateKey]:
    go = PrivateKey.from_base64(GO_PRIVATE)
    local = LocalIdentity(PrivateKey.from_base64(PY_PRIVATE))
    return local, PeerIdentity.derive(local, go.public), go


def _our_initiation(local: LocalIdentity, peer: PeerIdentity):
    eph = X25519PrivateKey.from_private_bytes(OUR_EPHEMERAL)
    eph_pub = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    msg, state = create_initiation(local, peer, OUR_INDEX, OUR_TIMESTAMP, (eph, eph_pub))
    seal_macs(msg, peer.mac1_key, None)
    return bytes(msg), state


def test_wireguard_go_initiation_decodes() -> None:
    local, peer, go = _sides()
    assert check_mac1(GO_INITIATION, local.mac1_key)
    assert GO_INITIATION[INIT_MAC2:] == bytes(16)  # not under load: no mac2
    got = consume_initiation(local, GO_INITIATION, lambda k: peer if k == go.public else None)
    assert got.peer is peer  # the static key inside is wireguard-go's
    label = int.from_bytes(got.timestamp[:8], "big")
    assert label > TAI64_BASE + 1_600_000_000  # a TAI64N timestamp of a recent wall clock


def test_our_initiation_is_reproducible_and_was_answered() -> None:
    local, peer, _ = _sides()
    msg, state = _our_initiation(local, peer)
    assert msg == OUR_INITIATION  # the bytes wireguard-go accepted
    assert check_mac1(GO_RESPONSE, local.mac1_key)
    assert GO_RESPONSE[RESP_MAC2:] == bytes(16)
    keys = consume_response(local, peer, state, GO_RESPONSE)
    assert keys.local_index == OUR_INDEX
    assert keys.remote_index == int.from_bytes(GO_RESPONSE[RESP_SENDER:RESP_RECEIVER], "little")


def test_wireguard_go_s_transport_message_opens_with_the_captured_session() -> None:
    local, peer, _ = _sides()
    _, state = _our_initiation(local, peer)
    keys = consume_response(local, peer, state, GO_RESPONSE)
    ours = Keypair(keys.send, keys.recv, keys.local_index, keys.remote_index, True, 0.0)
    plain = ours.open(GO_TRANSPORT)
    assert plain == GO_PLAIN
    # an ICMP echo request from wireguard-go's device address to ours, padded to 16
    assert plain[9] == 1 and plain[20] == 8
    assert bytes(plain[12:16]) == bytes([10, 1, 2, 0]) and bytes(plain[16:20]) == bytes(
        [10, 1, 1, 1])
    assert len(plain) % 16 == 0 and int.from_bytes(plain[2:4], "big") == 84
    assert ours.open(GO_TRANSPORT) is None  # and a replay of it is refused


# --- the protocol from the paper, with primitives only ------------------------------------


def _hash(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _kdf(key: bytes, data: bytes, n: int) -> list[bytes]:
    """KDF_n: HKDF with HMAC-BLAKE2s, as the paper's section 5.4 writes it out."""
    t0 = _hmac(key, data)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = _hmac(t0, prev + bytes([i]))
        out.append(prev)
    return out


def _aead(key: bytes, counter: int, data: bytes, ad: bytes, *, open_: bool = False) -> bytes:
    nonce = bytes(4) + counter.to_bytes(8, "little")
    box = ChaCha20Poly1305(key)
    return box.decrypt(nonce, data, ad) if open_ else box.encrypt(nonce, data, ad)


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(public))


class SpecInitiator:
    """The initiator of Noise_IKpsk2 as WireGuard runs it (no pre-shared key, no cookie)."""

    def __init__(self, responder_public: bytes) -> None:
        self.static = X25519PrivateKey.generate()
        self.responder = responder_public
        self.index = 0x1234ABCD
        self.counter = 0

    def initiation(self, timestamp: bytes) -> bytes:
        c = _hash(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
        h = _hash(c, b"WireGuard v1 zx2c4 Jason@zx2c4.com")
        h = _hash(h, self.responder)
        self.ephemeral = X25519PrivateKey.generate()
        e_pub = _raw(self.ephemeral)
        (c,) = _kdf(c, e_pub, 1)
        h = _hash(h, e_pub)
        c, k = _kdf(c, _dh(self.ephemeral, self.responder), 2)
        enc_static = _aead(k, 0, _raw(self.static), h)
        h = _hash(h, enc_static)
        c, k = _kdf(c, _dh(self.static, self.responder), 2)
        enc_time = _aead(k, 0, timestamp, h)
        h = _hash(h, enc_time)
        self.c, self.h = c, h
        body = (b"\x01\0\0\0" + struct.pack("<I", self.index) + e_pub + enc_static
                + enc_time)
        mac1 = hashlib.blake2s(body, digest_size=16,
                               key=_hash(b"mac1----", self.responder)).digest()
        return body + mac1 + bytes(16)

    def consume_response(self, msg: bytes) -> None:
        assert len(msg) == 92 and msg[:4] == b"\x02\0\0\0"
        sender, receiver = struct.unpack_from("<II", msg, 4)
        assert receiver == self.index
        mac1 = hashlib.blake2s(msg[:60], digest_size=16,
                               key=_hash(b"mac1----", _raw(self.static))).digest()
        assert msg[60:76] == mac1
        e_r = msg[12:44]
        (c,) = _kdf(self.c, e_r, 1)
        h = _hash(self.h, e_r)
        (c,) = _kdf(c, _dh(self.ephemeral, e_r), 1)
        (c,) = _kdf(c, _dh(self.static, e_r), 1)
        c, tau, k = _kdf(c, bytes(32), 3)  # the pre-shared key: zeros when none
        h = _hash(h, tau)
        assert _aead(k, 0, msg[44:60], h, open_=True) == b""
        self.send_key, self.recv_key = _kdf(c, b"", 2)
        self.remote = sender

    def transport(self, packet: bytes) -> bytes:
        padded = packet + bytes(-len(packet) % 16)
        msg = (b"\x04\0\0\0" + struct.pack("<IQ", self.remote, self.counter)
               + _aead(self.send_key, self.counter, padded, b""))
        self.counter += 1
        return msg

    def open(self, msg: bytes) -> bytes:
        assert msg[:4] == b"\x04\0\0\0"
        receiver, counter = struct.unpack_from("<IQ", msg, 4)
        assert receiver == self.index
        return _aead(self.recv_key, counter, msg[16:], b"", open_=True)


def _ipv4(src: str, dst: str, payload: bytes) -> bytes:
    return (struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0)
            + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + payload)


def test_a_handshake_computed_from_the_paper_is_answered_and_carries_data_both_ways() -> None:
    key = PrivateKey.generate()
    dev = Device(key)
    spec = SpecInitiator(key.public)
    spec_ep = ("198.18.0.9", 51820)
    dev.set_peers({_raw(spec.static): PeerConfig(("10.1.9.0/24",), spec_ep)})
    # TAI64N: 2^62 + seconds, then nanoseconds
    dev.receive(spec.initiation(struct.pack(">QI", 2**62 + 1_700_000_000, 5)), spec_ep)
    (response, to), = dev.drain()[1]
    assert to == spec_ep
    spec.consume_response(bytes(response))
    inner = _ipv4("10.1.9.7", "10.1.1.1", os.urandom(37))
    dev.receive(spec.transport(inner), spec_ep)  # the first data confirms the session
    dev.receive_many([(spec.transport(inner), spec_ep)])
    assert [bytes(p) for p, _ in dev.drain()[0]] == [inner, inner]
    reply = _ipv4("10.1.1.1", "10.1.9.7", b"pong")
    dev.send(reply)
    (msg, to), = dev.drain()[1]
    assert to == spec_ep
    assert spec.open(bytes(msg)) == reply + bytes(-len(reply) % 16)
    assert not dev.drops
