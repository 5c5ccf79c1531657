"""The device: handshakes, transport, timers and refusals, all on a fake clock.

Two or three ``Device`` objects exchange datagrams through an in-memory network; nothing
here touches a socket, and every protocol timer runs in milliseconds because the clock is
ours and the limits are shortened.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.wireguard.constants import (
    COOKIE_REPLY_LEN,
    DATA_MIN_LEN,
    INIT_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESP_LEN,
    Limits,
)
from pyflannel.wireguard.device import Device, PeerConfig
from pyflannel.wireguard.keys import PrivateKey

A = ("198.18.0.1", 51820)
B = ("198.18.0.2", 51820)
C = ("198.18.0.3", 51820)
NET_A, NET_B, NET_C = "10.1.1.0/24", "10.1.2.0/24", "10.1.3.0/24"
NET6_A, NET6_B = "fd00:1:1::/64", "fd00:1:2::/64"
SHORT = Limits(
    rekey_after_time=2.0, reject_after_time=3.0, rekey_attempt_time=1.0, rekey_timeout=0.2,
    keepalive_timeout=0.5, cookie_refresh_time=4.0, jitter_max=0.033, zero_keys_after=9.0,
)


class Clock:
    """Monotonic and wall clocks that move only when a test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_700_000_000.0 + self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class Net:
    """An in-memory underlay: datagrams go from the sender's address to an endpoint."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.devices: dict[tuple, Device] = {}
        self.tun: dict[tuple, list[tuple[bytes, object]]] = {}
        self.wire: list[tuple[tuple, tuple, bytes]] = []  # (src, dst, datagram), all traffic

    def add(self, addr: tuple, key: PrivateKey, limits: Limits = SHORT, **kw) -> Device:
        dev = Device(key, clock=self.clock, wall_clock=self.clock.wall, limits=limits,
                     rng=random.Random(1), **kw)
        self.devices[addr] = dev
        self.tun[addr] = []
        return dev

    def pump(self, drop: Callable[[tuple, tuple, bytes], bool] | None = None,
             rounds: int = 20) -> int:
        """Deliver until quiet; ``drop(src, dst, msg)`` may lose datagrams on the way."""
        delivered = 0
        for _ in range(rounds):
            moved = False
            for addr, dev in list(self.devices.items()):
                tun, out = dev.drain()
                self.tun[addr].extend(tun)
                for msg, dst in out:
                    msg = bytes(msg)
                    self.wire.append((addr, dst, msg))
                    if drop is not None and drop(addr, dst, msg):
                        continue
                    target = self.devices.get(tuple(dst))
                    if target is not None:
                        target.receive(msg, addr)
                        delivered += 1
                        moved = True
            if not moved:
                break
        return delivered

    def tick(self) -> None:
        for dev in self.devices.values():
            dev.tick()

    def sent(self, src: tuple, kind: int) -> list[bytes]:
        return [m for s, _, m in self.wire if s == src and m[0] == kind]


def ip4(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    h = bytearray(20)
    h[0] = 0x45
    h[2:4] = (20 + len(payload)).to_bytes(2, "big")
    h[9] = 17
    h[12:16] = ipaddress.ip_address(src).packed
    h[16:20] = ipaddress.ip_address(dst).packed
    return bytes(h) + payload


def ip6(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    h = bytearray(40)
    h[0] = 0x60
    h[4:6] = len(payload).to_bytes(2, "big")
    h[6] = 17
    h[8:24] = ipaddress.ip_address(src).packed
    h[24:40] = ipaddress.ip_address(dst).packed
    return bytes(h) + payload


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def net(clock: Clock) -> Net:
    return Net(clock)


def pair(net: Net, *, keepalive_a: float = 0.0, limits: Limits = SHORT, psk: bytes | None = None):
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = net.add(A, ka, limits, psk=psk)
    b = net.add(B, kb, limits, psk=psk)
    a.set_peers({kb.public: PeerConfig((NET_B, NET6_B), B, keepalive_a)})
    b.set_peers({ka.public: PeerConfig((NET_A, NET6_A), A)})
    return a, b, ka, kb


def connect(net: Net) -> tuple[Device, Device, PrivateKey, PrivateKey]:
    a, b, ka, kb = pair(net)
    a.send(ip4("10.1.1.5", "10.1.2.7", b"first"))
    net.pump()
    assert [p[20:] for p, _ in net.tun[B]] == [b"first"]
    net.tun[B].clear()
    return a, b, ka, kb


# --- handshake and transport ---------------------------------------------------------------


def test_handshake_then_transport_both_ways_ipv4_and_ipv6(net: Net) -> None:
    a, b, ka, kb = pair(net)
    a.send(ip4("10.1.1.5", "10.1.2.7", b"a->b"))
    net.pump()
    (pkt, peer), = net.tun[B]
    assert pkt == ip4("10.1.1.5", "10.1.2.7", b"a->b")  # padding stripped
    assert peer.public_key == ka.public
    b.send(ip4("10.1.2.7", "10.1.1.5", b"b->a"))
    b.send(ip6("fd00:1:2::7", "fd00:1:1::5"))
    a.send(ip6("fd00:1:1::5", "fd00:1:2::7", b"x" * 1000))
    net.pump()
    assert [p for p, _ in net.tun[A]] == [ip4("10.1.2.7", "10.1.1.5", b"b->a"),
                                           ip6("fd00:1:2::7", "fd00:1:1::5")]
    assert net.tun[B][1][0] == ip6("fd00:1:1::5", "fd00:1:2::7", b"x" * 1000)
    assert a.stats["handshakes_completed"] == b.stats["handshakes_completed"] == 1
    assert not a.drops and not b.drops
    pa, pb = a.peers[kb.public], b.peers[ka.public]
    assert pa.current.initiator and not pb.current.initiator
    assert pa.tx_bytes > 0 and pb.rx_bytes > 0 and pa.last_handshake == net.clock.wall()
    # every datagram on the wire has the WireGuard sizes
    sizes = {m[0]: len(m) for _, _, m in net.wire if m[0] in (1, 2)}
    assert sizes == {MSG_INITIATION: INIT_LEN, MSG_RESPONSE: RESP_LEN}
    assert all(len(m) % 16 == 0 for _, _, m in net.wire if m[0] == MSG_TRANSPORT)


def test_packets_wait_for_the_handshake_and_are_delivered_in_order(net: Net) -> None:
    a, b, _, _ = pair(net)
    for i in range(5):
        a.send(ip4("10.1.1.5", "10.1.2.7", bytes([i])))
    assert len(net.sent(A, MSG_INITIATION)) == 0 and len(a.peers) == 1
    net.pump()
    assert len(net.sent(A, MSG_INITIATION)) == 1  # one handshake for all of them
    assert [p[20] for p, _ in net.tun[B]] == [0, 1, 2, 3, 4]


def test_psk(net: Net) -> None:
    psk = os.urandom(32)
    a, b, _, _ = pair(net, psk=psk)
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump()
    assert len(net.tun[B]) == 1


def test_psk_mismatch_fails_the_handshake(net: Net) -> None:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = net.add(A, ka, psk=os.urandom(32))
    b = net.add(B, kb)
    a.set_peers({kb.public: PeerConfig((NET_B,), B)})
    b.set_peers({ka.public: PeerConfig((NET_A,), A)})
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump()
    assert a.drops["bad_auth"] == 1 and not net.tun[B]


def test_responder_sends_only_after_the_initiator_confirms(net: Net) -> None:
    a, b, ka, kb = pair(net)
    a.initiate(kb.public)
    # deliver the initiation only; hold the response
    net.pump(drop=lambda s, d, m: m[0] == MSG_RESPONSE)
    pb = b.peers[ka.public]
    assert pb.current is None and pb.next is not None
    b.send(ip4("10.1.2.7", "10.1.1.5"))  # cannot use `next`: held, and b starts its own
    assert not [m for m in net.sent(B, MSG_TRANSPORT)]
    assert pb.staged


# --- refusals ------------------------------------------------------------------------------


def test_replayed_data_is_dropped_and_counted(net: Net) -> None:
    a, b, _, _ = connect(net)
    a.send(ip4("10.1.1.5", "10.1.2.7", b"once"))
    net.pump()
    data = net.sent(A, MSG_TRANSPORT)[-1]
    b.receive(data, A)
    b.receive(data, A)
    assert b.drops["replay"] == 2
    assert [p[20:] for p, _ in net.tun[B]] == [b"once"]


def test_replayed_initiation_is_dropped_and_counted(net: Net) -> None:
    a, b, ka, _ = connect(net)
    init = net.sent(A, MSG_INITIATION)[0]
    before = b.stats["responses_sent"]
    net.clock.advance(1.0)
    b.receive(init, A)
    assert b.drops["handshake_replay"] == 1 and b.stats["responses_sent"] == before
    # and the session it would have replaced is untouched
    a.send(ip4("10.1.1.5", "10.1.2.7", b"still"))
    net.pump()
    assert [p[20:] for p, _ in net.tun[B]] == [b"still"]


def test_initiation_flood_is_rate_limited(net: Net) -> None:
    a, b, ka, kb = pair(net)
    twin = Device(ka, clock=net.clock, wall_clock=net.clock.wall, limits=SHORT)
    twin.set_peers({kb.public: PeerConfig((NET_B,), B)})
    a.initiate(kb.public)
    net.clock.advance(0.017)  # a newer TAI64N, but sooner than 1/50 s after the last
    twin.initiate(kb.public)
    (first, _), = a.drain()[1]
    (second, _), = twin.drain()[1]
    b.receive(first, A)
    b.receive(second, A)
    assert b.drops["handshake_flood"] == 1 and b.stats["responses_sent"] == 1


def test_handshake_from_a_key_not_in_the_table_is_refused(net: Net) -> None:
    a, b, _, kb = pair(net)
    stranger = net.add(C, PrivateKey.generate())
    stranger.set_peers({kb.public: PeerConfig((NET_B,), B)})
    stranger.send(ip4("10.1.3.1", "10.1.2.7"))
    net.pump()
    assert b.drops["unknown_peer"] == 1
    assert not net.tun[B] and not net.sent(B, MSG_RESPONSE)


def test_peer_restart_with_a_new_key(net: Net) -> None:
    a, b, ka, kb = connect(net)
    old_data = net.sent(A, MSG_TRANSPORT)[-1]
    # a restarts with a new key; b's table (the leases) still names the old one
    new_key = PrivateKey.generate()
    del net.devices[A]
    a2 = net.add(A, new_key)
    a2.set_peers({kb.public: PeerConfig((NET_B,), B)})
    a2.send(ip4("10.1.1.5", "10.1.2.7", b"new"))
    net.pump()
    assert b.drops["unknown_peer"] == 1 and not net.tun[B]
    # the lease changes key: the old peer is replaced, its sessions go with it
    b.set_peers({new_key.public: PeerConfig((NET_A,), A)})
    assert ka.public not in b.peers
    b.receive(old_data, A)
    assert b.drops["unknown_index"] == 1
    net.clock.advance(SHORT.rekey_timeout + SHORT.jitter_max)
    net.tick()
    net.pump()
    assert [p[20:] for p, _ in net.tun[B]] == [b"new"]


def test_a_restarted_peer_greets_the_one_still_sending_on_the_lost_session(
        net: Net) -> None:
    """b restarts (a fresh device, the same key and table) while a holds a session with
    it: a's next packet is refused (unknown index), b starts a handshake at once, and the
    keepalive that completes it moves a to the new session. No clock moves: nothing
    waits for a's timers (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, some 15 s by default)."""
    a, b, ka, kb = connect(net)
    b2 = net.add(B, kb)  # replaces b: all of b's state is gone
    b2.set_peers({ka.public: PeerConfig((NET_A, NET6_A), A)})
    a.send(ip4("10.1.1.5", "10.1.2.7", b"lost"))
    net.pump()
    assert b2.drops["unknown_index"] == 1 and b2.stats["greetings_sent"] == 1
    assert b2.peers[ka.public].current is not None and a.stats["keepalives_received"] >= 1
    a.send(ip4("10.1.1.5", "10.1.2.7", b"again"))
    b2.send(ip4("10.1.2.7", "10.1.1.5", b"back"))
    net.pump()
    assert [p[20:] for p, _ in net.tun[B]] == [b"again"]
    assert [p[20:] for p, _ in net.tun[A]][-1] == b"back"
    # more refused messages from a peer we now share a session with: no more handshakes
    b2.receive(net.sent(A, MSG_TRANSPORT)[0], A)
    assert b2.stats["initiations_sent"] == 1


def test_greetings_only_to_peers_and_paced(net: Net, clock: Clock) -> None:
    """A refused transport message greets only a peer in the table, at its endpoint
    there, and only once while that handshake is on its way; a restart among 40 peers
    sends 16 initiations at once, the rest at half the load threshold a second, so that
    their responses do not put the node under load (cookies) or overrun the fast path's
    handshake budget."""
    me = net.add(A, PrivateKey.generate())
    keys = [PrivateKey.generate() for _ in range(40)]
    ends = [(f"198.18.1.{i}", 51820) for i in range(40)]
    me.set_peers({k.public: PeerConfig((f"10.1.{100 + i}.0/24",), e)
                  for i, (k, e) in enumerate(zip(keys, ends, strict=True))})
    stale = bytes([MSG_TRANSPORT, 0, 0, 0]) + os.urandom(DATA_MIN_LEN - 4)
    me.receive(stale, ("198.18.9.9", 51820))  # no peer's address
    me.receive(stale, (ends[0][0], 4000))  # a peer's address, another port
    assert me.stats["greetings_sent"] == 0 and not me.drain()[1]
    for e in ends:
        me.receive(stale, e)
        me.receive(stale, e)  # the same peer again: one greeting
    first = me.drain()[1]
    assert len(first) == 16 and {e for _, e in first} == set(ends[:16])
    assert all(m[0] == MSG_INITIATION for m, _ in first)
    rate = me.load_threshold / 2
    assert me.next_deadline() == pytest.approx(clock.t + 1 / rate)
    clock.advance(1.0)
    me.tick()
    assert len(me.drain()[1]) == int(rate)  # a second's worth, no more
    while me.next_deadline() is not None and me.stats["greetings_sent"] < 40:
        clock.advance(me.next_deadline() - clock.t)
        me.tick()
    assert me.stats["greetings_sent"] == 40
    # a peer that keeps sending on the lost session while our handshake is on its way:
    # nothing more (the handshake's own retransmissions, every REKEY_TIMEOUT, go on)
    me.drain()
    me.receive(stale, ends[0])
    assert not me.drain()[1] and me.stats["greetings_sent"] == 40


def test_simultaneous_initiations_both_complete(net: Net) -> None:
    """Both ends initiate at once (a greeting crossing a rekey): each keeps its own
    handshake and answers the other's, so both have a session after one exchange, where
    dropping one's own on either side would leave neither one until a retransmission."""
    a, b, ka, kb = pair(net)
    a.initiate(kb.public)
    b.initiate(ka.public)
    net.pump()
    assert a.peers[kb.public].current is not None and b.peers[ka.public].current is not None
    a.send(ip4("10.1.1.5", "10.1.2.7", b"a->b"))
    b.send(ip4("10.1.2.7", "10.1.1.5", b"b->a"))
    net.pump()
    assert [p[20:] for p, _ in net.tun[B]] == [b"a->b"]
    assert [p[20:] for p, _ in net.tun[A]] == [b"b->a"]
    assert not a.drops and not b.drops


def test_garbage_on_the_port_is_counted_never_raised(net: Net) -> None:
    a, b, _, _ = connect(net)
    junk = [b"", b"\x01", b"\x04\0\0", b"\x04\0\0\0" + bytes(27), b"\x05\0\0\0" + bytes(60),
            b"\x01\x01\0\0" + bytes(INIT_LEN - 4), bytes(70000), b"\x04\0\0\0" + bytes(70000)]
    junk += [bytes([kind, 0, 0, 0]) + os.urandom(n - 4)
             for kind, n in ((1, INIT_LEN), (2, RESP_LEN), (3, COOKIE_REPLY_LEN),
                             (4, DATA_MIN_LEN), (4, 1500), (1, INIT_LEN + 1), (2, 200))]
    for d in junk:
        b.receive(d, C)
        b.receive(memoryview(d), C)
    assert b.drops["internal_error"] == 0
    assert sum(b.drops.values()) == 2 * len(junk)
    assert b.drops["malformed"] >= 8 and b.drops["bad_mac1"] >= 4
    assert b.drops["unknown_index"] >= 2
    assert not net.tun[B]
    # a transport message for a live session with a forged tag: bad_auth
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    msg = bytearray(a.drain()[1][0][0])
    msg[-1] ^= 1
    b.receive(bytes(msg), A)
    assert b.drops["bad_auth"] == 1
    assert b.peers[a.public_key].endpoint == A  # unauthenticated: no endpoint change


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0, 1, 2, 3, 4]))
def test_fuzzed_datagrams_never_raise(data: bytes, kind: int) -> None:
    clock = Clock()
    dev = Device(PrivateKey.generate(), clock=clock, limits=SHORT)
    dev.set_peers({PrivateKey.generate().public: PeerConfig((NET_B,), B)})
    if kind and data:
        data = bytes([kind, 0, 0, 0]) + data
    dev.receive(data, C)
    assert dev.drops["internal_error"] == 0 and not dev.to_tun


def test_inner_source_must_lie_in_the_peers_subnets(net: Net) -> None:
    a, b, ka, kb = connect(net)
    peer_b = a.peers[kb.public]
    for spoofed in (ip4("10.1.3.9", "10.1.2.7"), ip4("10.1.2.7", "10.1.2.8"),
                    ip6("fd00:1:3::1", "fd00:1:2::7"), ip6("fd00:1:2::1", "fd00:1:2::7")):
        a.send_to(peer_b, spoofed)
    a.send_to(peer_b, ip6("fd00:1:1::99", "fd00:1:2::7", b"ok6"))
    a.send_to(peer_b, b"\x45" + bytes(10))  # not a sane IP header
    net.pump()
    assert b.drops["inner_src"] == 4 and b.drops["inner_malformed"] == 1
    assert [p for p, _ in net.tun[B]] == [ip6("fd00:1:1::99", "fd00:1:2::7", b"ok6")]


def test_no_route_is_counted(net: Net) -> None:
    a, _, _, _ = pair(net)
    assert a.send(ip4("10.1.1.5", "10.9.9.9")) is None
    assert a.drops["no_route"] == 1


def test_routing_is_longest_prefix(net: Net) -> None:
    dev = net.add(C, PrivateKey.generate())
    k1, k2 = PrivateKey.generate(), PrivateKey.generate()
    dev.set_peers({k1.public: PeerConfig(("10.1.0.0/16",), A),
                   k2.public: PeerConfig(("10.1.2.0/24", "fd00::/8"), B)})
    assert dev.route(ip4("10.1.1.1", "10.1.2.9")).public_key == k2.public
    assert dev.route(ip4("10.1.1.1", "10.1.7.9")).public_key == k1.public
    assert dev.route(ip6("fd00::1", "fd12::1")).public_key == k2.public
    assert dev.route(ip4("10.1.1.1", "10.2.0.1")) is None


def test_a_prefix_claimed_twice_belongs_to_the_last_claim_for_both_directions(
        net: Net, caplog: pytest.LogCaptureFixture) -> None:
    """Cryptokey routing is exclusive: the peer that routes a prefix is the only one whose
    packets may come from it, and a longer prefix of another peer is that peer's alone."""
    a, b, ka, kb = pair(net)
    kc = PrivateKey.generate()
    c = net.add(C, kc)
    b.set_peers({ka.public: PeerConfig((NET_A,), A), kc.public: PeerConfig((NET_C,), C)})
    # A claims NET_A first, then C claims it too, and C's /25 inside A's whole /16
    a.set_peers({kb.public: PeerConfig((NET_B,), B)})
    c.set_peers({kb.public: PeerConfig((NET_B,), B)})
    table = {ka.public: PeerConfig(("10.1.0.0/16", NET_A), A),
             kc.public: PeerConfig((NET_C, NET_A, "10.1.4.0/25"), C)}
    b.set_peers(table)
    b.set_peers(table)  # said once, not at every install
    claimed = [r.getMessage() for r in caplog.records if "claimed by" in r.getMessage()]
    assert len(claimed) == 1 and claimed[0].startswith("wireguard: 10.1.1.0/24 is claimed")
    assert b.route(ip4("10.1.2.7", "10.1.1.5")).public_key == kc.public
    assert b.route(ip4("10.1.2.7", "10.1.4.5")).public_key == kc.public
    assert b.route(ip4("10.1.2.7", "10.1.4.200")).public_key == ka.public
    for sender, src in ((a, "10.1.1.5"), (c, "10.1.1.6"), (a, "10.1.4.7"), (a, "10.1.4.201"),
                        (c, "10.1.3.9")):
        sender.send(ip4(src, "10.1.2.7"))
    net.pump()
    delivered = sorted((p[12:16], peer.public_key == kc.public) for p, peer in net.tun[B])
    assert delivered == sorted([
        (bytes([10, 1, 1, 6]), True), (bytes([10, 1, 4, 201]), False),
        (bytes([10, 1, 3, 9]), True)])
    assert b.drops["inner_src"] == 2  # A's packets from C's 10.1.1.0/24 and 10.1.4.0/25


def test_endpoint_follows_authenticated_packets(net: Net) -> None:
    a, b, ka, _ = connect(net)
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    (msg, _), = a.drain()[1]
    roamed = ("198.18.0.99", 40000)
    b.receive(msg, roamed)
    assert b.peers[ka.public].endpoint == roamed
    b.send(ip4("10.1.2.7", "10.1.1.5"))
    assert b.drain()[1][0][1] == roamed


# --- timers --------------------------------------------------------------------------------


def test_initiator_rekeys_after_rekey_after_time(net: Net) -> None:
    a, b, ka, kb = connect(net)
    pa = a.peers[kb.public]
    first = pa.current
    net.clock.advance(SHORT.rekey_after_time + 0.01)
    a.send(ip4("10.1.1.5", "10.1.2.7", b"old key"))  # still sent, and a rekey starts
    net.pump()
    assert len(net.sent(A, MSG_INITIATION)) == 2
    assert pa.current is not first and pa.previous is first
    assert [p[20:] for p, _ in net.tun[B]] == [b"old key"]
    a.send(ip4("10.1.1.5", "10.1.2.7", b"new key"))
    net.pump()
    assert net.tun[B][-1][0][20:] == b"new key"
    assert b.peers[ka.public].current.local_index == pa.current.remote_index


def test_responder_does_not_rekey_on_time_but_stops_at_reject_after_time(net: Net) -> None:
    a, b, ka, kb = connect(net)
    b.send(ip4("10.1.2.7", "10.1.1.5"))
    net.pump()
    net.clock.advance(SHORT.rekey_after_time + 0.01)
    b.send(ip4("10.1.2.7", "10.1.1.5"))
    net.pump()
    assert not net.sent(B, MSG_INITIATION)  # only the initiator rekeys on time when sending
    net.clock.advance(SHORT.reject_after_time)
    b.send(ip4("10.1.2.7", "10.1.1.5", b"late"))
    assert b.peers[ka.public].staged  # the old keys are dead: held, and a handshake starts
    net.pump()
    assert len(net.sent(B, MSG_INITIATION)) == 1
    assert net.tun[A][-1][0][20:] == b"late"


def test_initiator_that_only_receives_rekeys_before_expiry(net: Net) -> None:
    a, b, _, _ = connect(net)
    net.clock.advance(SHORT.receive_rekey_age + 0.01)
    b.send(ip4("10.1.2.7", "10.1.1.5"))
    net.pump()
    assert len(net.sent(A, MSG_INITIATION)) == 2


def test_rekey_after_messages(net: Net) -> None:
    limits = Limits(rekey_after_messages=5, reject_after_messages=8, rekey_timeout=0.2,
                    jitter_max=0.0)
    a, b, _, kb = pair(net, limits=limits)
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump()
    first = a.peers[kb.public].current
    net.clock.advance(limits.rekey_timeout)  # initiations are at most one per REKEY_TIMEOUT
    for _ in range(4):
        a.send(ip4("10.1.1.5", "10.1.2.7"))
    assert len(net.sent(A, MSG_INITIATION)) == 1 and not a.peers[kb.public].pending
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump()
    assert len(net.sent(A, MSG_INITIATION)) == 2  # counter passed the rekey limit
    assert a.peers[kb.public].current is not first


def test_sending_stops_at_reject_after_messages(net: Net) -> None:
    limits = Limits(rekey_after_messages=100, reject_after_messages=4, rekey_timeout=0.2)
    a, b, _, kb = pair(net, limits=limits)
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump(drop=lambda s, d, m: s == A and m[0] == MSG_INITIATION and
             len(net.sent(A, MSG_INITIATION)) > 1)
    pa = a.peers[kb.public]
    while pa.current.send_counter < 4:
        a.send(ip4("10.1.1.5", "10.1.2.7"))
    a.drain()
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    assert pa.staged and not [m for m, _ in a.drain()[1] if m[0] == MSG_TRANSPORT]


def test_keys_are_rejected_after_reject_after_time(net: Net) -> None:
    a, b, ka, kb = connect(net)
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    (late, _), = a.drain()[1]
    net.clock.advance(SHORT.reject_after_time)
    b.receive(late, A)
    assert b.drops["stale_key"] == 1 and not b.drain()[0]
    a.send(ip4("10.1.1.5", "10.1.2.7", b"fresh"))
    assert a.peers[kb.public].staged
    net.pump()
    assert net.tun[B][-1][0][20:] == b"fresh"


def test_handshake_retransmission_with_jitter_until_rekey_attempt_time(net: Net) -> None:
    a, b, _, kb = pair(net)
    lost = lambda s, d, m: s == A  # noqa: E731 - b never hears a
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump(drop=lost)
    times = [net.clock.t]
    for _ in range(2000):  # 2 s in 1 ms steps
        net.clock.advance(0.001)
        net.tick()
        net.pump(drop=lost)
        if len(net.sent(A, MSG_INITIATION)) > len(times):
            times.append(net.clock.t)
    gaps = [round(b2 - b1, 3) for b1, b2 in zip(times, times[1:], strict=False)]
    assert len(times) == SHORT.max_handshake_attempts == 5
    assert all(SHORT.rekey_timeout <= g <= SHORT.rekey_timeout + SHORT.jitter_max + 0.002
               for g in gaps), gaps
    assert len(set(gaps)) > 1  # jittered
    assert a.stats["handshakes_abandoned"] == 1
    assert not a.peers[kb.public].staged  # given up: queued packets are dropped


def test_passive_keepalive(net: Net) -> None:
    a, b, ka, kb = connect(net)
    n_keepalives = len([m for m in net.sent(B, MSG_TRANSPORT) if len(m) == DATA_MIN_LEN])
    net.clock.advance(SHORT.keepalive_timeout - 0.01)
    net.tick()
    net.pump()
    assert len([m for m in net.sent(B, MSG_TRANSPORT) if len(m) == DATA_MIN_LEN]) == n_keepalives
    net.clock.advance(0.02)
    net.tick()
    net.pump()
    keepalives = [m for m in net.sent(B, MSG_TRANSPORT) if len(m) == DATA_MIN_LEN]
    assert len(keepalives) == n_keepalives + 1  # b heard data and had nothing to say
    assert a.stats["keepalives_received"] >= 1
    # b replying with data of its own cancels the keepalive
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump()
    b.send(ip4("10.1.2.7", "10.1.1.5"))
    net.pump()
    net.clock.advance(SHORT.keepalive_timeout + 0.01)
    net.tick()
    net.pump()
    assert len([m for m in net.sent(B, MSG_TRANSPORT) if len(m) == DATA_MIN_LEN]) == (
        n_keepalives + 1)


def test_persistent_keepalive(net: Net) -> None:
    a, b, _, kb = pair(net, keepalive_a=1.0, limits=Limits())  # no rekey in the way
    net.tick()  # configured: say hello at once, which needs a handshake
    net.pump()
    assert a.stats["handshakes_completed"] == 1
    count = len(net.sent(A, MSG_TRANSPORT))
    for _ in range(3):
        net.clock.advance(0.5)
        net.tick()
        net.pump()
    assert len(net.sent(A, MSG_TRANSPORT)) == count + 1
    net.clock.advance(0.6)
    net.tick()
    net.pump()
    assert len(net.sent(A, MSG_TRANSPORT)) == count + 2
    assert a.next_deadline() is not None


def test_new_handshake_when_sent_data_gets_no_answer(net: Net) -> None:
    a, b, _, kb = connect(net)
    net.clock.advance(0.1)
    a.send(ip4("10.1.1.5", "10.1.2.7"))
    net.pump(drop=lambda s, d, m: s == B)  # b's answers are lost
    before = len(net.sent(A, MSG_INITIATION))
    net.clock.advance(SHORT.new_handshake_after + SHORT.jitter_max + 0.01)
    net.tick()
    assert len(a.to_net) == 1 and a.to_net[0][0][0] == MSG_INITIATION
    net.pump()
    assert len(net.sent(A, MSG_INITIATION)) == before + 1
    assert a.stats["handshakes_for_silence"] == 1


def test_keys_are_zeroed_long_after_the_last_handshake(net: Net) -> None:
    a, b, ka, kb = connect(net)
    net.clock.advance(SHORT.zero_keys_after + 0.01)
    net.tick()
    for dev, key in ((a, kb), (b, ka)):
        p = dev.peers[key.public]
        assert p.current is None and p.previous is None and p.next is None


def test_cookie_reply_under_load_then_mac2(net: Net) -> None:
    a, b, ka, kb = pair(net)
    b.force_under_load = True
    a.send(ip4("10.1.1.5", "10.1.2.7", b"under load"))
    net.pump()
    assert b.stats["cookie_replies_sent"] == 1 and b.drops["bad_mac2"] == 1
    assert a.stats["cookie_replies_received"] == 1
    reply = net.sent(B, MSG_COOKIE_REPLY)[0]
    assert len(reply) == COOKIE_REPLY_LEN
    assert not net.sent(B, MSG_RESPONSE) and not net.tun[B]
    # the retransmission carries mac2 and gets through
    net.clock.advance(SHORT.rekey_timeout + SHORT.jitter_max)
    net.tick()
    net.pump()
    assert b.stats["responses_sent"] == 1
    assert [p[20:] for p, _ in net.tun[B]] == [b"under load"]
    assert net.sent(A, MSG_INITIATION)[-1][-16:] != bytes(16)
    # a cookie for one source address does not help another
    twin = Device(ka, clock=net.clock, wall_clock=net.clock.wall, limits=SHORT)
    twin.set_peers({kb.public: PeerConfig((NET_B,), B)})
    twin.peers[kb.public].cookie = a.peers[kb.public].cookie
    twin.peers[kb.public].cookie_time = net.clock.t
    net.clock.advance(1.0)
    twin.initiate(kb.public)
    (msg, _), = twin.drain()[1]
    b.receive(msg, C)
    assert b.drops["bad_mac2"] == 2


def test_cookie_reply_for_an_unknown_index_is_dropped(net: Net) -> None:
    a, _, _, _ = pair(net)
    a.receive(bytes([3, 0, 0, 0]) + os.urandom(COOKIE_REPLY_LEN - 4), B)
    assert a.drops["unknown_index"] == 1


def test_load_detection_by_rate(net: Net) -> None:
    a, b, ka, kb = pair(net)
    b.load_threshold = 3
    junk_inits = []
    for _ in range(5):
        twin = Device(ka, clock=net.clock, wall_clock=net.clock.wall, limits=SHORT)
        twin.set_peers({kb.public: PeerConfig((NET_B,), B)})
        net.clock.advance(0.03)
        twin.initiate(kb.public)
        junk_inits.append(twin.drain()[1][0][0])
    for m in junk_inits:
        b.receive(m, A)
    assert b.stats["cookie_replies_sent"] >= 1


def test_repr_shows_no_secrets(net: Net) -> None:
    a, b, ka, kb = connect(net)
    text = repr(a) + repr(a.peers[kb.public]) + repr(a.peers[kb.public].current) + repr(a.local)
    assert ka.to_base64()[:10] not in text and kb.to_base64()[:10] not in text


# --- the batch entry points the fast path uses ---------------------------------------------


def _mixed_batch(net: Net, a: Device, rng: random.Random) -> list[tuple[bytes, tuple]]:
    """Data, keepalives, replays, forgeries, spoofed sources and junk, shuffled a little."""
    peer_b = next(iter(a.peers.values()))
    for i in range(60):
        a.send_to(peer_b, ip4("10.1.1.5", "10.1.2.7", bytes([i]) * rng.randint(0, 40)))
        if i % 7 == 0:
            a.send_to(peer_b, b"")
        if i % 11 == 0:
            a.send_to(peer_b, ip4("10.9.9.9", "10.1.2.7"))
    msgs = [bytes(m) for m, _ in a.drain()[1]]
    batch = [(m, A) for m in msgs]
    batch += [(m, A) for m in rng.sample(msgs, 10)]  # replays
    forged = bytearray(msgs[3])
    forged[-1] ^= 1
    batch += [(bytes(forged), A), (b"\x04\0\0\0" + bytes(40), C), (b"junk", C),
              (bytes(INIT_LEN), C)]
    batch += [(m, ("198.18.0.77", 1234)) for m in msgs[-3:]]  # replays from elsewhere
    for i in range(0, len(batch) - 1, 9):  # some reordering inside the window
        batch[i], batch[i + 1] = batch[i + 1], batch[i]
    return batch


def test_receive_many_matches_receive(clock: Clock) -> None:
    results = []
    for batched in (False, True):
        net = Net(clock)
        a, b, _, _ = connect(net)
        batch = _mixed_batch(net, a, random.Random(9))
        b.drops.clear()
        if batched:
            b.receive_many(batch)
        else:
            for data, src in batch:
                b.receive(data, src)
        tun, _ = b.drain()
        results.append(([p for p, _ in tun], dict(b.drops), b.peers[a.public_key].rx_bytes,
                         b.peers[a.public_key].endpoint))
    assert results[0] == results[1]
    assert results[0][1]["replay"] >= 13 and results[0][1]["inner_src"] == 6
    assert results[0][3] == A  # replays from another address do not move the endpoint


def test_receive_many_confirms_the_responders_next_session(net: Net) -> None:
    a, b, ka, kb = pair(net)
    a.send(ip4("10.1.1.5", "10.1.2.7", b"one"))
    init = a.drain()[1]
    for m, _ in init:
        b.receive(bytes(m), A)
    for m, _ in b.drain()[1]:
        a.receive(bytes(m), B)
    batch = [(bytes(m), A) for m, _ in a.drain()[1]]
    b.receive_many(batch)  # the first message uses `next`: the slow path confirms it
    assert b.peers[ka.public].current is not None
    assert [p[20:] for p, _ in b.drain()[0]] == [b"one"]


def test_sender_and_sent_for_batches(net: Net) -> None:
    a, b, ka, kb = connect(net)
    peer = a.peers[kb.public]
    kp = a.sender(peer)
    assert kp is peer.current
    buf = bytearray(4096)
    mv = memoryview(buf)
    out = []
    for i in range(3):
        packet = ip4("10.1.1.5", "10.1.2.7", bytes([i]) * 30)
        buf[16:16 + len(packet)] = packet
        n = kp.seal_into(mv, len(packet))
        out.append(bytes(buf[:n]))
    a.sent(peer, kp, sum(map(len, out)))
    assert peer.t_new_handshake is not None
    b.receive_many([(m, A) for m in out])
    assert [p[20] for p, _ in b.drain()[0]] == [0, 1, 2]
    net.clock.advance(SHORT.reject_after_time)
    assert a.sender(peer) is None  # expired: the caller falls back to send_to


def test_a_bad_table_row_is_left_out_and_never_holds_up_the_others(net: Net) -> None:
    """A low-order key, a short key, our own key, a bad subnet: each row is refused alone
    (and said why); the good row keeps its session and still carries traffic."""
    a, b, ka, kb = connect(net)
    good = {kb.public: PeerConfig((NET_B,), B)}
    for bad, why in (({bytes(32): PeerConfig((NET_C,), C)}, "low-order"),
                     ({b"short": PeerConfig((NET_C,), C)}, "32 bytes"),
                     ({ka.public: PeerConfig((NET_C,), C)}, "own"),
                     ({PrivateKey.generate().public: PeerConfig(("not-a-subnet",), C)},
                      "not-a-subnet")):
        refused = a.set_peers({**good, **bad})
        assert list(refused) == list(bad) and why in next(iter(refused.values()))
        assert list(a.peers) == [kb.public] and a.peers[kb.public].current is not None
    a.send(ip4("10.1.1.5", "10.1.2.7", b"still"))
    net.pump()
    assert net.tun[B][-1][0][20:] == b"still"
    assert a.set_peers({kb.public: PeerConfig(("not-a-subnet",), B)}) and not a.peers


def test_table_update_keeps_sessions_and_applies_changes(net: Net) -> None:
    a, b, ka, kb = connect(net)
    session = a.peers[kb.public].current
    a.set_peers({kb.public: PeerConfig((NET_B, NET_C), C)})
    peer = a.peers[kb.public]
    assert peer.current is session and peer.endpoint == C
    assert a.route(ip4("10.1.1.5", "10.1.3.1")) is peer
    a.set_peers({})
    assert not a.peers and a.route(ip4("10.1.1.5", "10.1.2.7")) is None


def test_status_rows_have_no_secrets(net: Net) -> None:
    a, b, ka, kb = connect(net)
    (row,) = a.status()
    assert row["public_key"] == kb.public_base64[:8] + "…"
    assert row["endpoint"] == "198.18.0.2:51820" and row["session"] is True
    assert row["latest_handshake"] == net.clock.wall()
    assert row["tx_bytes"] > 0 and row["rx_bytes"] > 0
    assert kb.to_base64()[:10] not in repr(row) and ka.to_base64()[:10] not in repr(row)


def test_under_load_a_proven_source_is_still_rate_limited(net: Net) -> None:
    a, b, ka, kb = pair(net)
    b.force_under_load = True
    a.initiate(kb.public)
    net.pump()  # cookie reply: a now holds a cookie for its address
    assert a.peers[kb.public].cookie is not None
    accepted = 0
    for _ in range(20):  # 20 initiations 21 ms apart (past the per-peer 20 ms), valid mac2
        twin = Device(ka, clock=net.clock, wall_clock=net.clock.wall, limits=SHORT)
        twin.set_peers({kb.public: PeerConfig((NET_B,), B)})
        twin.peers[kb.public].cookie = a.peers[kb.public].cookie
        twin.peers[kb.public].cookie_time = net.clock.t
        net.clock.advance(0.021)
        twin.initiate(kb.public)
        before = b.stats["responses_sent"]
        b.receive(bytes(twin.drain()[1][0][0]), A)
        accepted += b.stats["responses_sent"] - before
    assert b.drops["rate_limited"] >= 5, (b.drops, accepted)
    assert 12 <= accepted <= 15  # the burst of 5, then 20 a second over 0.42 s


def test_ipv6_underlay_endpoints_and_cookies(clock: Clock) -> None:
    net = Net(clock)
    a6, b6 = ("fd00:77::1", 51821, 0, 0), ("fd00:77::2", 51821)  # as recvfrom, as configured
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = net.add(a6, ka)
    b = net.add(b6, kb)
    a.set_peers({kb.public: PeerConfig((NET6_B,), b6)})
    b.set_peers({ka.public: PeerConfig((NET6_A,), None)})  # learns a's endpoint
    b.force_under_load = True
    a.send(ip6("fd00:1:1::5", "fd00:1:2::7", b"v6 underlay"))
    net.pump()
    assert b.stats["cookie_replies_sent"] == 1 and a.stats["cookie_replies_received"] == 1
    net.clock.advance(SHORT.rekey_timeout + SHORT.jitter_max)
    net.tick()
    net.pump()
    assert [p for p, _ in net.tun[b6]] == [ip6("fd00:1:1::5", "fd00:1:2::7", b"v6 underlay")]
    assert b.peers[ka.public].endpoint == a6
    assert b.status()[0]["endpoint"] == "fd00:77::1:51821"


def test_default_jitter_is_at_most_a_third_of_a_second() -> None:
    dev = Device(PrivateKey.generate(), rng=random.Random(3))
    samples = [dev._jitter() for _ in range(1000)]
    assert min(samples) >= 0.0 and max(samples) <= 0.333 and max(samples) > 0.3
