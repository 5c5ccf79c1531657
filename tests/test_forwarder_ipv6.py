"""IPv6 inner packets through the udp backend's fast path, in both framings.

flanneld's udp backend carries IPv4 only; pyflannel's carries IPv6 too, with the same
rules per family: routed by the peer's IPv6 subnet, accepted only for our IPv6 subnet and
only from an inner source in the sending peer's IPv6 subnet, answered with ICMPv6 when
nobody leases the destination. The rig is test_forwarder's (a socketpair for the TUN).
"""

import struct
import time
from ipaddress import IPv6Address

import pytest

from pyflannel.fastpath.frames import (
    GSO_TCPV6,
    VNET,
    VNET_LEN,
    encode_train,
    ones_sum,
    segment_tcp6,
    to_plain,
)
from tests.test_forwarder import Rig, Unthreaded
from tests.test_packet import icmpv6_checksum_ok, ipv4, ipv6

OURS = "fc00:10:1:1::5"
THEIRS = "fc00:10:1:2::7"


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


@pytest.fixture
def vnet_rig():
    r = Rig(vnet=True)
    yield r
    r.close()


def tcp6(src: str, dst: str, seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    """An IPv6/TCP segment with a complete checksum."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", 5001, 40000, seq, 1, 5 << 4, flags, 512, 0, 0))
    pkt = ipv6(src=src, dst=dst, nxt=6, payload=bytes(tcp) + payload)
    pseudo = bytes(pkt[8:40]) + struct.pack("!I3xB", len(pkt) - 40, 6)
    struct.pack_into("!H", pkt, 56, ~ones_sum(pseudo + bytes(pkt[40:])) & 0xFFFF)
    return bytes(pkt)


def tcp6_ok(pkt: bytes) -> bool:
    pseudo = pkt[8:40] + struct.pack("!I3xB", len(pkt) - 40, 6)
    return ones_sum(pseudo + pkt[40:]) in (0, 0xFFFF)


# -- flannel's plain framing -------------------------------------------------------------

def test_an_ipv6_packet_for_a_peer_goes_out_as_it_came_but_for_the_hop_limit(rig):
    pkt = ipv6(src=OURS, dst=THEIRS, hops=64, payload=b"hello")
    rig.tun_app.send(pkt)
    data, _ = rig.peer.recvfrom(65536)
    assert data[7] == 63 and data[:7] == pkt[:7] and data[8:] == pkt[8:]
    c = rig.counters()
    assert c["tx_packets"] == c["tx_packets_ipv6"] == 1
    assert c["tx_bytes_ipv6"] == len(pkt)


def test_an_ipv6_packet_from_a_peer_reaches_the_tun(rig):
    pkt = ipv6(src=THEIRS, dst=OURS, hops=9)
    rig.peer.sendto(pkt, rig.udp.getsockname())
    got = rig.tun_app.recv(65536)
    assert got[7] == 8 and got[8:] == pkt[8:]
    c = rig.counters()
    assert c["rx_packets"] == c["rx_packets_ipv6"] == 1 and c["rx_bytes_ipv6"] == len(pkt)


def test_the_families_are_counted_apart(rig):
    rig.tun_app.send(ipv4(src="10.1.1.5", dst="10.1.2.7"))
    rig.tun_app.send(ipv6(src=OURS, dst=THEIRS))
    rig.peer.recvfrom(65536)
    rig.peer.recvfrom(65536)
    c = rig.counters()
    assert c["tx_packets"] == 2 and c["tx_packets_ipv6"] == 1


def test_no_lease_for_an_ipv6_destination_answers_icmpv6_no_route(rig):
    rig.tun_app.send(ipv6(src=OURS, dst="fc00:10:1:77::1", nxt=58,
                          payload=bytes([128, 0]) + bytes(6)))
    reply = rig.tun_app.recv(65536)
    assert reply[6] == 58 and reply[40] == 1 and reply[41] == 0
    assert reply[24:40] == IPv6Address(OURS).packed
    assert reply[8:24] == IPv6Address("fc00:10:1::").packed  # the network's own address
    assert icmpv6_checksum_ok(reply)
    c = rig.counters()
    assert c["drop_no_route"] == 1 and c["icmp_unreachable_sent"] == 1


@pytest.mark.parametrize(("src", "dst", "hops", "reason"), [
    ("fc00:10:1:3::7", OURS, 64, "drop_spoofed_source"),  # not the peer's /64
    ("10.1.2.7", OURS, 64, "drop_spoofed_source"),  # v4-mapped tricks do not count either
    (THEIRS, "fc00:10:1:9::5", 64, "drop_wrong_subnet"),  # not our /64
    (THEIRS, OURS, 1, "drop_ttl_exceeded"),
])
def test_ipv6_from_a_peer_follows_the_ipv4_rules(rig, src, dst, hops, reason):
    if "." in src:
        src = f"::ffff:{src}"
    rig.peer.sendto(ipv6(src=src, dst=dst, hops=hops), rig.udp.getsockname())
    rig.peer.sendto(ipv6(src=THEIRS, dst=OURS, payload=b"honest"), rig.udp.getsockname())
    assert rig.tun_app.recv(65536).endswith(b"honest")  # only the honest one
    c = rig.counters()
    assert c[reason] == 1 and c["rx_packets"] == 1


def test_a_truncated_ipv6_packet_is_dropped_by_reason(rig):
    pkt = ipv6(src=THEIRS, dst=OURS, payload=b"x" * 30)
    rig.peer.sendto(pkt[:50], rig.udp.getsockname())
    time.sleep(0.1)
    assert rig.counters()["drop_truncated"] == 1


def test_an_ipv4_subnet_grants_no_ipv6_source(rig):
    """The peer tables are per family: holding 10.1.2.0/24 says nothing about IPv6."""
    rig.configure(peers6=[])
    rig.peer.sendto(ipv6(src=THEIRS, dst=OURS), rig.udp.getsockname())
    rig.peer.sendto(ipv4(src="10.1.2.7", dst="10.1.1.5"), rig.udp.getsockname())
    assert rig.tun_app.recv(65536)[0] == 0x45
    assert rig.counters()["drop_spoofed_source"] == 1
    rig.tun_app.send(ipv6(src=OURS, dst=THEIRS))  # nor a route
    assert rig.tun_app.recv(65536)[40] == 1  # ICMPv6 no route


def test_ipv6_segments_of_one_flow_are_joined_on_a_vnet_tun():
    """GRO in user space for IPv6 plain packets, as for IPv4 (the kernel's TCPv6 rules)."""
    rig = Rig(vnet=True)
    try:
        port = rig.peer.getsockname()[1]
        rig.configure(peers=[], peers6=[[int(IPv6Address("fc00:10:1:2::")), "127.0.0.2", port,
                                         False]])  # a plain-framing peer
        segs = [tcp6(THEIRS, OURS, 1000 + i * 1000, bytes([i]) * 1000) for i in range(4)]
        rig.peer.sendto(segs[0], rig.udp.getsockname())  # alone: no run to join yet
        time.sleep(0.05)
        rig.fwd.sock.setblocking(True)
        got = [rig.tun_app.recv(65536)]
        for s in segs[1:]:
            rig.peer.sendto(s, rig.udp.getsockname())
        while sum(len(g) - VNET_LEN - 60 for g in got) < 4000:
            got.append(rig.tun_app.recv(65536))
        payload = b"".join(bytes(g[VNET_LEN + 60:]) for g in got)
        assert payload == b"".join(bytes([i]) * 1000 for i in range(4))
        for g in got:
            hdr = VNET.unpack_from(g)
            if hdr[1]:
                assert hdr[1] == GSO_TCPV6 and hdr[3] == 1000
        assert rig.counters()["rx_packets_ipv6"] == 4
    finally:
        rig.close()


# -- the vnet1 framing, with TSO6 ---------------------------------------------------------

def tso6(segments: int, mss: int = 1400) -> tuple[bytes, bytes]:
    """A TCPv6 super-packet as a vnet TUN hands it up: header, packet."""
    pkt = bytearray(tcp6(OURS, THEIRS, 5000, bytes(range(256)) * (segments * mss // 256)
                         + bytes(segments * mss % 256)))
    hdr = VNET.pack(1, GSO_TCPV6, 60, mss, 40, 16)
    return hdr, bytes(pkt)


def test_an_ipv6_super_packet_travels_as_one_train_and_arrives_whole(vnet_rig):
    rig = vnet_rig
    hdr, big = tso6(4)
    rig.tun_app.send(hdr + big)
    payload = rig.receive_train()
    assert bytes(payload[:VNET_LEN]) == hdr
    assert bytes(payload[VNET_LEN:])[8:] == big[8:] and payload[VNET_LEN + 7] == 63
    # and back, as the peer's fast path sends it: joined, checked, written with its header
    back = bytearray(tso6(4)[1])
    back[8:24], back[24:40] = IPv6Address(THEIRS).packed, IPv6Address(OURS).packed
    for d in encode_train(hdr + bytes(back), 3, 1472):
        rig.peer.sendto(d, rig.udp.getsockname())
    got = rig.tun_app.recv(65536)
    assert got[:VNET_LEN] == hdr and got[VNET_LEN + 7] == 63
    assert got[VNET_LEN + 8:] == bytes(back)[8:]
    c = rig.counters()
    assert c["rx_packets_ipv6"] == 1 and c["rx_bytes_ipv6"] == len(back)


def test_a_spoofed_ipv6_train_is_refused_whole(vnet_rig):
    rig = vnet_rig
    hdr, big = tso6(3)
    spoofed = bytearray(big)
    spoofed[8:24] = IPv6Address("fc00:10:1:3::7").packed
    spoofed[24:40] = IPv6Address(OURS).packed
    for d in encode_train(hdr + bytes(spoofed), 5, 1472):
        rig.peer.sendto(d, rig.udp.getsockname())
    time.sleep(0.1)
    c = rig.counters()
    assert c["drop_spoofed_source"] == 1 and c["rx_packets"] == 0


def test_an_ipv6_super_packet_for_a_plain_framing_peer_is_cut_into_segments(vnet_rig):
    rig = vnet_rig
    port = rig.peer.getsockname()[1]
    rig.configure(peers6=[[int(IPv6Address("fc00:10:1:2::")), "127.0.0.2", port, False]])
    hdr, big = tso6(3)
    rig.tun_app.send(hdr + big)
    got = [rig.peer.recvfrom(65536)[0] for _ in range(3)]
    assert all(g[0] >> 4 == 6 and tcp6_ok(g) for g in got)
    assert b"".join(g[60:] for g in got) == big[60:]
    assert rig.counters()["segmented"] == 1


def test_to_plain_cuts_tcpv6_as_segment_tcp6_does():
    hdr, big = tso6(5, mss=1000)
    want = segment_tcp6(big, 1000)
    assert [bytes(p) for p in to_plain(hdr, bytearray(big))] == [bytes(w) for w in want]


def test_a_corrupted_ipv6_segment_that_came_alone_is_never_joined():
    """As for IPv4: a segment from a datagram that came alone is verified before joining;
    a corrupted one is written on its own, as it came."""
    u = Unthreaded(peers=[], peers6=[[int(IPv6Address("fc00:10:1:2::")), "127.0.0.2", 1,
                                      False]])
    try:
        segs = [bytearray(tcp6(THEIRS, OURS, 1000 + i * 1000, bytes([i]) * 1000))
                for i in range(4)]
        segs[1][500] ^= 0x01
        written = u.turn(segs)
        assert [(hdr[:2], len(p)) for hdr, p in written] == [
            ((0, 0), 1060), ((0, 0), 1060), ((1, GSO_TCPV6), 2060)]
        first, corrupted, joined = (p for _hdr, p in written)
        assert tcp6_ok(first) and not tcp6_ok(corrupted)
        segs[1][7] -= 1  # the hop limit the forwarder counted down
        assert corrupted == bytes(segs[1])
        assert [bytes(s[60:]) for s in segment_tcp6(joined, 1000)] == [
            bytes([2]) * 1000, bytes([3]) * 1000]
    finally:
        u.close()
