"""The forwarding loop's decisions, driven through real sockets on loopback.

A datagram socketpair stands in for the TUN device (both carry one IP packet per read),
so these run without root; the namespace tests drive a real TUN end to end.
"""

import json
import socket
import struct
import threading
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflannel.fastpath import counters
from pyflannel.fastpath.forwarder import Forwarder
from pyflannel.fastpath.packet import header_checksum_ok
from tests.test_packet import ipv4

LOCAL = IPv4Network("10.1.1.0/24")
LOCAL6 = IPv6Network("fc00:10:1:1::/64")


def install(ctl: socket.socket, fwd, msg: dict) -> None:
    """Send a forwarder a control message and wait until it has taken the table."""
    generation = fwd.generation
    ctl.sendall(json.dumps(msg).encode() + b"\n")
    deadline = time.monotonic() + 2
    while fwd.generation == generation:
        assert time.monotonic() < deadline, "forwarder did not take the table"
        time.sleep(0.005)


class Rig:
    """A forwarder between a fake TUN (socketpair) and a UDP socket on 127.0.0.1."""

    def __init__(self, vnet: bool = False) -> None:
        self.vnet = vnet
        self.tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun_fwd.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # plays node 10.1.2.0/24
        self.peer.bind(("127.0.0.2", 0))
        self.peer.settimeout(2)
        self.tun_app.settimeout(2)
        self.ctl, fwd_ctl = socket.socketpair()
        self.mem_fd, self.mem = counters.create_shared()
        self.fwd = Forwarder(tun_fwd.fileno(), self.udp, fwd_ctl, self.mem, vnet=vnet)
        self._keep = (tun_fwd, fwd_ctl)
        self.thread = threading.Thread(target=self.fwd.run, daemon=True)
        self.thread.start()
        self.configure()

    def configure(self, peers=None, peers6=None) -> None:
        """Our subnets are 10.1.1.0/24 and fc00:10:1:1::/64; the peer on 127.0.0.2 holds
        10.1.2.0/24 and fc00:10:1:2::/64 unless told otherwise."""
        port = self.peer.getsockname()[1]
        peers = peers if peers is not None else [
            [int(IPv4Address("10.1.2.0")), "127.0.0.2", port, self.vnet]]
        peers6 = peers6 if peers6 is not None else [
            [int(IPv6Address("fc00:10:1:2::")), "127.0.0.2", port, self.vnet]]
        msg = {"op": "config", "subnet_len": 24, "local_net": int(LOCAL.network_address),
               "icmp_src": int(IPv4Address("10.1.0.0")), "peers": peers,
               "subnet6_len": 64, "local_net6": int(LOCAL6.network_address),
               "icmp_src6": int(IPv6Address("fc00:10:1::")), "peers6": peers6}
        install(self.ctl, self.fwd, msg)

    def receive_train(self) -> memoryview:
        """The payload of the next vnet1 train the peer receives (no datagram over 1472)."""
        from pyflannel.fastpath.frames import Reassembler

        r = Reassembler()
        payload = None
        while payload is None:
            dgram, _ = self.peer.recvfrom(65536)
            assert len(dgram) <= 1472
            payload = r.feed("p", dgram)
        return payload

    def counters(self) -> dict:
        time.sleep(0.05)
        return counters.read(self.mem)

    def close(self) -> None:
        self.ctl.sendall(b'{"op":"stop"}\n')
        self.thread.join(2)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_a_packet_for_a_peer_goes_out_unchanged_but_for_the_ttl(rig):
    pkt = ipv4(src="10.1.1.5", dst="10.1.2.7", ttl=64, payload=b"hello")
    rig.tun_app.send(pkt)
    data, _ = rig.peer.recvfrom(65536)
    assert data[8] == 63 and header_checksum_ok(data)
    assert data[:8] == pkt[:8] and data[12:] == pkt[12:]
    c = rig.counters()
    assert c["tx_packets"] == 1 and c["tx_bytes"] == len(pkt)


def test_a_packet_from_a_peer_reaches_the_tun(rig):
    pkt = ipv4(src="10.1.2.7", dst="10.1.1.5", ttl=64)
    rig.peer.sendto(pkt, rig.udp.getsockname())
    got = rig.tun_app.recv(65536)
    assert got[8] == 63 and got[16:20] == pkt[16:20] and header_checksum_ok(got)
    assert rig.counters()["rx_packets"] == 1


def test_no_lease_for_the_destination_answers_net_unreachable(rig):
    rig.tun_app.send(ipv4(src="10.1.1.5", dst="10.1.77.1", proto=1,
                          payload=bytes([8, 0]) + bytes(6)))
    reply = rig.tun_app.recv(65536)
    assert reply[9] == 1 and reply[20] == 3 and reply[21] == 0
    assert reply[16:20] == bytes([10, 1, 1, 5])
    assert reply[12:16] == bytes([10, 1, 0, 0])  # from the overlay, not a local address
    c = rig.counters()
    assert c["drop_no_route"] == 1 and c["icmp_unreachable_sent"] == 1


def test_datagrams_from_hosts_without_a_lease_are_dropped(rig):
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.3", 0))
    stranger.sendto(ipv4(src="10.1.2.7", dst="10.1.1.5"), rig.udp.getsockname())
    time.sleep(0.1)
    assert rig.counters()["drop_unknown_source"] == 1
    stranger.close()


@pytest.mark.parametrize(("payload", "reason"), [
    (bytes([0x50]) + bytes(39), "drop_not_ip"),  # neither IPv4 nor IPv6
    (ipv4(src="10.1.2.7", dst="10.1.1.5")[:15], "drop_truncated"),
    (ipv4(src="10.1.2.7", dst="10.1.3.5"), "drop_wrong_subnet"),
    (ipv4(src="10.1.2.7", dst="10.1.1.5", ttl=1), "drop_ttl_exceeded"),
])
def test_bad_inner_packets_are_dropped_by_reason(rig, payload, reason):
    rig.peer.sendto(payload, rig.udp.getsockname())
    time.sleep(0.1)
    assert rig.counters()[reason] == 1


def test_a_new_table_applies_at_once(rig):
    rig.configure(peers=[])
    rig.tun_app.send(ipv4(src="10.1.1.5", dst="10.1.2.7"))
    time.sleep(0.1)
    assert rig.counters()["drop_no_route"] == 1


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=120))
def test_garbage_from_a_peer_never_stops_the_loop(rig, data):
    rig.peer.sendto(data, rig.udp.getsockname())
    assert rig.thread.is_alive()


def test_the_loop_still_forwards_after_garbage(rig):
    for junk in (b"", b"\x45", b"\xff" * 100, struct.pack("!BBH", 0x4F, 0, 65535)):
        rig.peer.sendto(junk, rig.udp.getsockname())
    rig.peer.sendto(ipv4(src="10.1.2.7", dst="10.1.1.5"), rig.udp.getsockname())
    assert rig.tun_app.recv(65536)[16:20] == bytes([10, 1, 1, 5])


def test_per_peer_counters_follow_each_peer(rig):
    for _ in range(3):
        rig.tun_app.send(ipv4(src="10.1.1.5", dst="10.1.2.7", payload=b"x" * 100))
        rig.peer.recvfrom(65536)
    rig.peer.sendto(ipv4(src="10.1.2.7", dst="10.1.1.5"), rig.udp.getsockname())
    rig.tun_app.recv(65536)
    rig.peer.sendto(ipv4(src="10.1.2.7", dst="10.1.9.5"), rig.udp.getsockname())  # dropped
    time.sleep(0.1)
    st = rig.fwd.peer_stats["127.0.0.2"]
    assert st[0] == 3 and st[1] == 3 * 120
    assert st[2] == 1 and st[3] == 28
    assert st[5] == 1  # the packet for a foreign subnet
    assert st[4] > 0


def test_an_inner_source_outside_the_sending_peer_s_subnet_is_dropped_as_spoofed(rig):
    rig.peer.sendto(ipv4(src="10.1.3.7", dst="10.1.1.5"), rig.udp.getsockname())  # not 10.1.2/24
    rig.peer.sendto(ipv4(src="10.1.2.7", dst="10.1.1.5"), rig.udp.getsockname())
    assert rig.tun_app.recv(65536)[12:16] == bytes([10, 1, 2, 7])  # only the honest one
    assert rig.counters()["drop_spoofed_source"] == 1


@pytest.fixture
def vnet_rig():
    r = Rig(vnet=True)
    yield r
    r.close()


def test_vnet1_super_packets_travel_as_trains_both_ways(vnet_rig):
    from pyflannel.fastpath.frames import VNET, encode_train

    rig = vnet_rig
    big = ipv4(src="10.1.1.5", dst="10.1.2.7", payload=bytes(range(256)) * 20)  # 5140 bytes
    hdr = VNET.pack(0, 0, 0, 0, 0, 0)
    rig.tun_app.send(hdr + big)  # what a vnet TUN hands up
    payload = rig.receive_train()
    assert bytes(payload[:10]) == hdr and bytes(payload[10:])[12:] == bytes(big)[12:]
    # and back: a train arriving chunk by chunk is joined and written with its header
    back = ipv4(src="10.1.2.7", dst="10.1.1.5", payload=b"z" * 4000)
    for d in encode_train(hdr + bytes(back), 7, 1472):
        rig.peer.sendto(d, rig.udp.getsockname())
    got = rig.tun_app.recv(65536)
    assert got[:10] == hdr and got[10 + 16:10 + 20] == bytes([10, 1, 1, 5])
    assert got[10 + 20:] == b"z" * 4000


def test_vnet1_from_a_peer_that_did_not_advertise_it_is_refused(rig):
    from pyflannel.fastpath.frames import encode_train

    for d in encode_train(bytes(10) + bytes(ipv4(src="10.1.2.7", dst="10.1.1.5")), 1, 1472):
        rig.peer.sendto(d, rig.udp.getsockname())
    time.sleep(0.1)
    assert rig.counters()["drop_unexpected_framing"] == 1


def _routes(rig, *entries):
    """Peer-table rows for ``(subnet, vnet1)`` pairs, all naming the rig's one peer."""
    port = rig.peer.getsockname()[1]
    return [[int(IPv4Address(net)), "127.0.0.2", port, fast] for net, fast in entries]


@pytest.mark.parametrize("order", ["stale-last", "stale-first"])
def test_a_second_lease_for_an_address_does_not_downgrade_its_framing(vnet_rig, order):
    """Issue 9 item 4: a stale lease naming a vnet1 peer's address without Framings."""
    from pyflannel.fastpath.frames import encode_train

    rig = vnet_rig
    rows = [("10.1.2.0", True), ("10.1.77.0", False)]
    rig.configure(peers=_routes(rig, *(rows if order == "stale-last" else rows[::-1])))
    hdr = bytes(10)
    small = ipv4(src="10.1.2.7", dst="10.1.1.5", payload=b"a" * 50)
    big = ipv4(src="10.1.2.7", dst="10.1.1.5", payload=b"b" * 4000)
    other = ipv4(src="10.1.77.9", dst="10.1.1.5", payload=b"c" * 50)  # any routed subnet
    for tid, pkt in enumerate((small, big, other), 1):
        for d in encode_train(hdr + bytes(pkt), tid, 1472):
            rig.peer.sendto(d, rig.udp.getsockname())
        got = rig.tun_app.recv(65536)
        assert got[10 + 12:10 + 16] == bytes(pkt)[12:16] and got[10 + 20:] == bytes(pkt)[20:]
    c = rig.counters()
    assert c["drop_unexpected_framing"] == 0 and c["rx_packets"] == 3
    # Each subnet is still sent by its own route: vnet1 to one, flannel framing to the other.
    rig.tun_app.send(hdr + ipv4(src="10.1.1.5", dst="10.1.2.7", payload=b"x"))
    assert rig.peer.recvfrom(65536)[0][0] != 0x45  # a vnet1 chunk
    rig.tun_app.send(hdr + ipv4(src="10.1.1.5", dst="10.1.77.7", payload=b"y"))
    assert rig.peer.recvfrom(65536)[0][0] == 0x45  # a plain packet


def test_an_inner_source_in_any_subnet_routed_to_the_address_is_accepted(rig):
    rig.configure(peers=_routes(rig, ("10.1.2.0", False), ("10.1.77.0", False)))
    for src in ("10.1.2.7", "10.1.77.7", "10.1.9.7"):
        rig.peer.sendto(ipv4(src=src, dst="10.1.1.5"), rig.udp.getsockname())
    assert rig.tun_app.recv(65536)[12:16] == bytes([10, 1, 2, 7])
    assert rig.tun_app.recv(65536)[12:16] == bytes([10, 1, 77, 7])
    assert rig.counters()["drop_spoofed_source"] == 1  # 10.1.9.0/24 is nobody's


def test_a_departed_peer_loses_its_train_buffer_and_counters(vnet_rig):
    """Issue 9 item 19."""
    from pyflannel.fastpath.frames import encode_train

    rig = vnet_rig
    train = encode_train(bytes(10) + bytes(ipv4(src="10.1.2.7", dst="10.1.1.5",
                                                  payload=b"z" * 4000)), 9, 1472)
    rig.peer.sendto(train[0], rig.udp.getsockname())  # the rest never comes
    deadline = time.monotonic() + 2
    while "127.0.0.2" not in rig.fwd._reasm._state:
        assert time.monotonic() < deadline, "the first chunk was not taken"
        time.sleep(0.005)
    assert "127.0.0.2" in rig.fwd.peer_stats
    rig.configure(peers=[], peers6=[])
    assert "127.0.0.2" not in rig.fwd._reasm._state
    assert "127.0.0.2" not in rig.fwd.peer_stats and "127.0.0.2" not in rig.fwd.sources


def test_a_garbled_control_line_is_skipped_and_the_next_one_applies(rig):
    generation = rig.fwd.generation
    rig.ctl.sendall(b'{"op": "config", "subnet_len"\n')  # cut short
    rig.configure(peers=[])
    assert rig.fwd.generation == generation + 1 and rig.thread.is_alive()


def tcp_segment(seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    """An IPv4/TCP segment 10.1.2.7:5001 -> 10.1.1.5:40000 with complete checksums."""
    from pyflannel.fastpath.frames import ones_sum

    tcp = bytearray(struct.pack("!HHIIBBHHH", 5001, 40000, seq, 1, 5 << 4, flags, 512, 0, 0))
    pkt = bytearray(ipv4(src="10.1.2.7", dst="10.1.1.5", proto=6,
                         payload=bytes(tcp) + payload))
    pseudo = bytes(pkt[12:20]) + bytes((0, 6)) + struct.pack("!H", len(pkt) - 20)
    struct.pack_into("!H", pkt, 36, ~ones_sum(pseudo + bytes(pkt[20:])) & 0xFFFF)
    return bytes(pkt)


def test_flannel_framed_segments_of_one_flow_reach_the_tun_as_one_super_packet():
    """GRO in user space for flannel's framing: on a vnet TUN, a run of one flow's
    segments from a flanneld peer is one write with a TCPv4 virtio-net header."""
    from pyflannel.fastpath.frames import GSO_TCPV4, VNET, VNET_LEN, segment_tcp4

    tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_fwd.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.2", 0))
    ctl, fwd_ctl = socket.socketpair()
    fwd = Forwarder(tun_fwd.fileno(), udp, fwd_ctl, None, vnet=True)
    fwd.apply({"op": "config", "subnet_len": 24, "local_net": int(LOCAL.network_address),
               "icmp_src": int(IPv4Address("10.1.0.0")),
               "peers": [[int(IPv4Address("10.1.2.0")), "127.0.0.2", 1, False]]})
    mss = 1000
    data = bytes(range(256)) * 20
    segs = [tcp_segment(1000 + i * mss, data[i * mss:(i + 1) * mss],
                        0x18 if i == 4 else 0x10) for i in range(5)]
    for s in segs:
        peer.sendto(s, udp.getsockname())
    time.sleep(0.05)
    fwd.from_udp()
    tun_app.settimeout(1)
    got = tun_app.recv(70000)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack(got[:VNET_LEN])
    assert (gso_type, gso_size, hdr_len, csum_start, csum_offset) == (GSO_TCPV4, mss, 40, 20, 16)
    sp = bytearray(got[VNET_LEN:])
    assert len(sp) == 40 + 5 * mss and sp[33] == 0x18  # PSH of the last segment
    out = segment_tcp4(sp, mss)
    for i, s in enumerate(out):
        want = bytearray(segs[i])
        want[8] -= 1  # the TTL the forwarder counted down
        assert bytes(s[20:]) == bytes(want[20:]) and s[8] == want[8]
    assert fwd.c[counters.INDEX["coalesced"]] == 5 and fwd.c[counters.INDEX["rx_packets"]] == 5
    for s in (tun_app, tun_fwd, udp, peer, ctl, fwd_ctl):
        s.close()


def test_flannel_framing_on_a_vnet_tun_never_sends_or_takes_vnet1():
    """-udp-framing=flannel keeps virtio-net headers on the TUN only to join packets: a
    peer that advertises vnet1 still gets, and may only send, plain packets."""
    from pyflannel.fastpath.frames import encode_train

    rig = Rig(vnet=True)
    try:
        rig.fwd.vnet1 = False
        rig.configure()  # the peer's rows say vnet1
        rig.tun_app.send(bytes(10) + ipv4(src="10.1.1.5", dst="10.1.2.7", payload=b"x"))
        assert rig.peer.recvfrom(65536)[0][0] == 0x45  # a plain packet
        for d in encode_train(bytes(10) + bytes(ipv4(src="10.1.2.7", dst="10.1.1.5")), 1, 1472):
            rig.peer.sendto(d, rig.udp.getsockname())
        time.sleep(0.1)
        assert rig.counters()["drop_unexpected_framing"] == 1
    finally:
        rig.close()


def test_held_tcp_segments_keep_their_place_before_other_packets():
    """On a vnet TUN only TCP segments wait to be joined; anything else is written at once,
    after whatever was held before it, so the order on the wire is the order in the TUN."""
    from pyflannel.fastpath.frames import VNET_LEN

    rig = Rig(vnet=True)
    try:
        port = rig.peer.getsockname()[1]
        rig.configure(peers=[[int(IPv4Address("10.1.2.0")), "127.0.0.2", port, False]])
        first = tcp_segment(1000, b"a" * 100)
        other = ipv4(src="10.1.2.7", dst="10.1.1.5", payload=b"udp!")
        last = tcp_segment(1100, b"b" * 100)
        rig.fwd.sock.setblocking(True)
        for pkt in (first, other, last):
            rig.peer.sendto(pkt, rig.udp.getsockname())
        got = [rig.tun_app.recv(65536)[VNET_LEN:] for _ in range(3)]
        assert [g[20:] if g[9] == 17 else g[40:] for g in got] == [
            b"a" * 100, b"udp!", b"b" * 100]
    finally:
        rig.close()


class Unthreaded:
    """A vnet-TUN forwarder whose loop the test turns itself (``fwd.from_udp()``), so
    that datagrams sent before the turn are read in one batch, as under load."""

    def __init__(self, peers: list | None = None, peers6: list | None = None) -> None:
        self.tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun_fwd.setblocking(False)
        self.tun_app.settimeout(1)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.2", 0))
        ctl, fwd_ctl = socket.socketpair()
        self.fwd = Forwarder(tun_fwd.fileno(), self.udp, fwd_ctl, None, vnet=True)
        self.fwd.apply({
            "op": "config", "subnet_len": 24, "local_net": int(LOCAL.network_address),
            "icmp_src": int(IPv4Address("10.1.0.0")), "subnet6_len": 64,
            "local_net6": int(LOCAL6.network_address),
            "peers": [[int(IPv4Address("10.1.2.0")), "127.0.0.2", 1, False]]
            if peers is None else peers, "peers6": peers6 or []})
        self._sockets = (self.tun_app, tun_fwd, self.udp, self.peer, ctl, fwd_ctl)

    def turn(self, datagrams: list) -> list[tuple[tuple, bytes]]:
        """Send the datagrams, let the forwarder read them in one turn: what it wrote to
        the TUN, as (virtio-net header fields, packet)."""
        from pyflannel.fastpath.frames import VNET, VNET_LEN

        for d in datagrams:
            self.peer.sendto(d, self.udp.getsockname())
        time.sleep(0.05)
        self.fwd.from_udp()
        out = []
        self.tun_app.setblocking(False)
        while True:
            try:
                got = self.tun_app.recv(70000)
            except BlockingIOError:
                return out
            out.append((VNET.unpack(got[:VNET_LEN]), got[VNET_LEN:]))

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def test_a_corrupted_segment_that_came_alone_is_never_joined():
    """A joined super-packet is written for a fresh TCP checksum, so only segments whose
    integrity is known are joined. A datagram that came alone may have had a zero UDP
    checksum (none at all): its segment is verified first. A corrupted one goes to the
    TUN on its own, as it came, for the kernel to refuse; the rest are still joined."""
    from pyflannel.fastpath.frames import F_NEEDS_CSUM, segment_tcp4

    u = Unthreaded()
    try:
        mss = 1000
        segs = [bytearray(tcp_segment(1000 + i * mss, bytes([i]) * mss)) for i in range(5)]
        segs[2][700] ^= 0x40  # one bit flipped on the way; its checksum no longer matches
        written = u.turn(segs)
        joined = [bytearray(p) for hdr, p in written if hdr[0] & F_NEEDS_CSUM]
        alone = [p for hdr, p in written if hdr == (0, 0, 0, 0, 0, 0)]
        assert len(joined) + len(alone) == len(written) == 3
        payloads = [bytes(s[40:]) for sp in joined for s in segment_tcp4(sp, mss)]
        assert payloads == [bytes([i]) * mss for i in (0, 1, 3, 4)]
        segs[2][8] -= 1  # the TTL the forwarder counted down
        assert [p[20:] for p in alone] == [bytes(segs[2][20:])]
        c = u.fwd.c
        assert c[counters.INDEX["coalesced"]] == 4 and c[counters.INDEX["rx_packets"]] == 5
    finally:
        u.close()


def test_a_peer_s_row_is_named_fields_in_slots():
    """What an address may send us is one small object per address, read by name."""
    from pyflannel.fastpath.udp_receive import PeerSource

    r = Rig()
    try:
        row = r.fwd.sources["127.0.0.2"]
        assert isinstance(row, PeerSource) and not hasattr(row, "__dict__")
        assert row.keys4 == {int(IPv4Address("10.1.2.0")) >> 8} and row.vnet1 is False
        assert row.keys6 == {int(IPv6Address("fc00:10:1:2::")) >> 64}
        assert row.stats is r.fwd.peer_stats["127.0.0.2"]
    finally:
        r.close()


SO_NO_CHECK = 11  # send UDP over IPv4 without a checksum (zero)


def test_a_vnet1_datagram_without_a_udp_checksum_is_refused_by_the_kernel():
    """vnet1 packets may carry a partial checksum the kernel completes, so only the UDP
    checksum protects them: the socket's filter refuses a vnet1 datagram whose UDP
    checksum is zero (none). Flannel's framing still passes: its segments are verified."""
    from pyflannel.fastpath.frames import ZERO_VNET, encode_train

    u = Unthreaded(peers=[[int(IPv4Address("10.1.2.0")), "127.0.0.2", 1, True]])
    try:
        pkt = ipv4(src="10.1.2.7", dst="10.1.1.5", payload=b"vnet1")
        (dgram,) = encode_train(ZERO_VNET + pkt, 9, 1472)
        u.peer.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        assert u.turn([dgram]) == []
        u.fwd.publish_counters()
        assert u.fwd.c[counters.INDEX["drop_socket"]] == 1  # the kernel's drop, counted
        plain = ipv4(src="10.1.2.7", dst="10.1.1.5", payload=b"flannel")
        assert [p[20:] for _hdr, p in u.turn([plain])] == [b"flannel"]
        u.peer.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 0)
        assert [p[20:] for _hdr, p in u.turn([dgram])] == [b"vnet1"]
    finally:
        u.close()
