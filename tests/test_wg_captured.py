"""Against a captured exchange with Debian's wireguard-go (no wireguard-go needed to run).

Captured once in the interop lab with test-only static keys (``a8``*32 for wireguard-go,
``b0``*32 for us) and, on our side, a fixed ephemeral key and timestamp so our messages
are reproducible: wireguard-go's own initiation (from a ping on its side), our initiation,
its response, our ICMP echo request and the transport message it sent back.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pyflannel.wireguard.constants import (
    INIT_MAC2,
    RESP_MAC2,
    RESP_RECEIVER,
    RESP_SENDER,
    TAI64_BASE,
)
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
OUR_TRANSPORT = bytes.fromhex(
    "04000000de148a5200000000000000006f93082869b0877cb0dbb5a1b7fbe5b7d0ffe9806677ecd7"
    "920b0eda5895004a2939069581e29d349486fa3693054f52d390f1a5c524553d474ccdce14247584"
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


def test_transport_both_ways_with_the_captured_session() -> None:
    local, peer, _ = _sides()
    _, state = _our_initiation(local, peer)
    keys = consume_response(local, peer, state, GO_RESPONSE)
    ours = Keypair(keys.send, keys.recv, keys.local_index, keys.remote_index, True, 0.0)
    assert bytes(ours.seal(_inner_of_our_transport(keys))) == OUR_TRANSPORT
    plain = ours.open(GO_TRANSPORT)
    assert plain == GO_PLAIN
    # an ICMP echo request from wireguard-go's device address to ours, padded to 16
    assert plain[9] == 1 and plain[20] == 8
    assert bytes(plain[12:16]) == bytes([10, 1, 2, 0]) and bytes(plain[16:20]) == bytes(
        [10, 1, 1, 1])
    assert len(plain) % 16 == 0 and int.from_bytes(plain[2:4], "big") == 84
    assert ours.open(GO_TRANSPORT) is None  # and a replay of it is refused


def _inner_of_our_transport(keys) -> bytes:  # noqa: ANN001 - TransportKeys
    """Decrypt our captured message as wireguard-go did (its receive key is our send key)."""
    theirs = Keypair(keys.recv, keys.send, keys.remote_index, keys.local_index, False, 0.0)
    plain = theirs.open(OUR_TRANSPORT)
    assert plain is not None
    return plain[: int.from_bytes(plain[2:4], "big")]
