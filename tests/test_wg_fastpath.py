"""The WireGuard fast path (fastpath/wg.py) between two forwarders on loopback.

Datagram socketpairs stand in for the TUN devices (one packet per read, as a TUN), so
these run without root: handshakes, transport both ways, the inner-source rule, garbage,
unknown keys, replays, a peer's key change, and the offload paths (a TSO super-packet cut
into segments on one side, joined into one super-packet on the other).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from ipaddress import IPv4Address

import pytest

from pyflannel.fastpath import counters
from pyflannel.fastpath.frames import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET,
    VNET_LEN,
    ones_sum,
    segment_tcp4,
)
from pyflannel.fastpath.wg import WgForwarder
from pyflannel.wireguard.device import Device
from pyflannel.wireguard.keys import PrivateKey
from pyflannel.wireguard.peer import PeerConfig
from tests.test_forwarder import install
from tests.test_packet import ipv4


class WgNode:
    """A WgForwarder on 127.0.0.x with a socketpair as its TUN."""

    def __init__(self, ip: str, net: str, *, vnet: bool = False) -> None:
        self.key = PrivateKey.generate()
        self.net, self.ip, self.vnet = net, ip, vnet
        self.app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun.setblocking(False)
        self.app.settimeout(2)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((ip, 0))
        self.ctl, fctl = socket.socketpair()
        self.mem_fd, self.mem = counters.create_shared()
        self.fwd = WgForwarder(tun.fileno(), self.udp, fctl, self.mem, private_key=self.key,
                               mtu=1420, vnet=vnet)
        self._keep = (tun, fctl)
        self.thread = threading.Thread(target=self.fwd.run, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.udp.getsockname()[1]

    def configure(self, *peers: tuple[str, str, str, int], psk: str | None = None) -> None:
        """peers: (public key, subnet, ip, port)."""
        msg = {"op": "config", "subnet_len": 24, "local_net": int(IPv4Address(self.net)),
               "icmp_src": int(IPv4Address("10.1.0.0")), "psk": psk, "keepalive": 0,
               "peers": [[k, [s], ip, port] for k, s, ip, port in peers]}
        install(self.ctl, self.fwd, msg)

    def peer_row(self) -> tuple[str, str, str, int]:
        return (self.key.public_base64, self.net + "/24", self.ip, self.port)

    def counters(self) -> dict[str, int]:
        time.sleep(0.05)
        return counters.read(self.mem)

    def stop(self) -> None:
        self.ctl.sendall(b'{"op":"stop"}\n')
        self.thread.join(2)


def pair(vnet: bool = False) -> tuple[WgNode, WgNode]:
    a = WgNode("127.0.0.1", "10.1.1.0", vnet=vnet)
    b = WgNode("127.0.0.2", "10.1.2.0", vnet=vnet)
    a.configure(b.peer_row())
    b.configure(a.peer_row())
    return a, b


@pytest.fixture
def nodes():
    a, b = pair()
    yield a, b
    a.stop()
    b.stop()


def wait_for(cond, what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_packets_cross_both_ways_after_one_handshake(nodes):
    a, b = nodes
    p = ipv4("10.1.1.5", "10.1.2.7", payload=b"y" * 100)
    a.app.send(p)
    assert b.app.recv(65536) == p
    q = ipv4("10.1.2.7", "10.1.1.5", payload=b"z" * 1380)
    b.app.send(q)
    assert a.app.recv(65536) == q
    for _ in range(40):
        a.app.send(ipv4("10.1.1.5", "10.1.2.7", payload=b"w" * 1380))
    for _ in range(40):
        assert len(b.app.recv(65536)) == 1400
    ca, cb = a.counters(), b.counters()
    assert ca["wg_handshakes_completed"] == cb["wg_handshakes_completed"] == 1
    assert ca["tx_packets"] >= 40 and cb["rx_packets"] >= 41
    assert not any(v for k, v in cb.items() if k.startswith("drop_"))


def test_an_inner_source_outside_the_peer_s_subnet_never_reaches_the_tun(nodes):
    a, b = nodes
    b.app.send(ipv4("10.1.2.7", "10.1.1.5"))
    assert a.app.recv(65536)  # session up
    b.app.send(ipv4("10.1.3.7", "10.1.1.5"))  # b claims to be 10.1.3.0/24
    wait_for(lambda: a.counters()["drop_spoofed_source"] == 1, "spoof counted")
    a.app.settimeout(0.3)
    with pytest.raises(TimeoutError):
        a.app.recv(65536)


def test_garbage_is_counted_and_harmless(nodes):
    a, b = nodes
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for junk in (b"junk", b"\x04\0\0\0" + bytes(40), b"\x01\0\0\0" + bytes(144),
                 b"\x02\0\0\0" + bytes(88), b"\x04\0\0\0" + bytes(12)):
        s.sendto(junk, (a.ip, a.port))
    wait_for(lambda: sum(v for k, v in a.counters().items() if k.startswith("drop_")) >= 5,
             "garbage counted")
    c = a.counters()
    assert c["drop_unknown_index"] >= 1 and c["drop_bad_mac1"] >= 1
    # the wrong shapes ("junk", a 16-byte transport message) die in the socket filter
    assert c["drop_socket"] == 2 and c["drop_malformed"] == 0
    p = ipv4("10.1.2.7", "10.1.1.5")
    b.app.send(p)
    assert a.app.recv(65536) == p
    assert a.thread.is_alive()


def test_a_handshake_from_a_key_without_lease_is_refused(nodes):
    a, _b = nodes
    stranger = Device(PrivateKey.generate())
    stranger.set_peers({a.key.public: PeerConfig(("10.1.0.0/16",), (a.ip, a.port))})
    stranger.initiate(a.key.public)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for msg, ep in stranger.drain()[1]:
        s.sendto(msg, ep)
    wait_for(lambda: a.counters()["drop_unknown_peer"] == 1, "stranger refused")
    assert a.counters()["wg_responses_sent"] == 0


def test_a_replayed_datagram_is_dropped():
    """A relay between the nodes duplicates every transport message from a to b."""
    a = WgNode("127.0.0.1", "10.1.1.0")
    b = WgNode("127.0.0.2", "10.1.2.0")
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.3", 0))
    relay.settimeout(0.2)
    a.configure((b.key.public_base64, "10.1.2.0/24", "127.0.0.3", relay.getsockname()[1]))
    b.configure(a.peer_row())
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                data, src = relay.recvfrom(65536)
            except TimeoutError:
                continue
            if src[1] == a.port:
                relay.sendto(data, (b.ip, b.port))
                if data[0] == 4:
                    relay.sendto(data, (b.ip, b.port))  # the replay
            else:
                relay.sendto(data, (a.ip, a.port))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        for i in range(3):
            a.app.send(ipv4("10.1.1.5", "10.1.2.7", ident=i))
            assert b.app.recv(65536)
        wait_for(lambda: b.counters()["drop_replay"] >= 2, "replays counted")
        assert b.counters()["rx_packets"] == 3
    finally:
        stop.set()
        t.join(2)
        a.stop()
        b.stop()


def test_a_peer_s_new_key_replaces_the_old_one(nodes):
    a, b = nodes
    b.app.send(ipv4("10.1.2.7", "10.1.1.5"))
    assert a.app.recv(65536)
    # b restarts with a new key (same subnet, address and port)
    b.stop()
    b2 = WgNode("127.0.0.2", "10.1.2.0")
    try:
        b2.configure(a.peer_row())
        a.configure(b2.peer_row())
        assert list(a.fwd.dev.peers) == [b2.key.public]
        p = ipv4("10.1.1.5", "10.1.2.7")
        a.app.send(p)
        assert b2.app.recv(65536) == p
        q = ipv4("10.1.2.7", "10.1.1.5")
        b2.app.send(q)
        assert a.app.recv(65536) == q
    finally:
        b2.stop()


def test_stats_name_each_peer_by_key_without_secrets(nodes):
    a, b = nodes
    a.app.send(ipv4("10.1.1.5", "10.1.2.7"))
    assert b.app.recv(65536)
    a.ctl.sendall(b'{"op":"stats","id":7}\n')
    reply = json.loads(a.ctl.recv(1 << 20))
    assert reply["id"] == 7
    row = reply["stats"][b.key.public_base64]
    assert row["public_key"] == b.key.public_base64[:8] + "…"
    assert row["latest_handshake"] is not None and row["session"]
    assert row["endpoint"] == f"{b.ip}:{b.port}"
    assert a.key.to_base64() not in json.dumps(reply)


def tcp_super_packet(src: str, dst: str, mss: int, segments: int,
                     trim: int = 100) -> tuple[bytes, bytes]:
    """(virtio-net header, IPv4/TCP super-packet with a partial checksum)."""
    payload = bytes((i * 7 + i // 251) & 0xFF for i in range(mss * segments - trim))
    tcp = bytearray(20)
    struct.pack_into("!HHIIBBHHH", tcp, 0, 40000, 5001, 1000, 1, 5 << 4, 0x18, 65535, 0, 0)
    pkt = ipv4(src, dst, proto=6, payload=bytes(tcp) + payload)
    pkt = bytearray(pkt)
    pseudo = bytes(pkt[12:20]) + bytes((0, 6)) + struct.pack("!H", len(pkt) - 20)
    struct.pack_into("!H", pkt, 36, ones_sum(pseudo))
    hdr = VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16)
    return hdr, bytes(pkt)


def tcp_checksum_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0x0F) * 4
    pseudo = pkt[12:20] + bytes((0, 6)) + struct.pack("!H", len(pkt) - ihl)
    return ones_sum(pseudo + pkt[ihl:]) == 0xFFFF and ones_sum(pkt[:ihl]) == 0xFFFF


@pytest.mark.parametrize("mss, segments, odd", [(1380, 20, 0), (1368, 47, 0), (536, 5, 1)])
def test_tso_segments_carry_correct_headers_and_checksums(mss, segments, odd):
    a, b = pair(vnet=True)
    b.fwd.coalesce = False
    try:
        hdr, sp = tcp_super_packet("10.1.1.5", "10.1.2.7", mss, segments, trim=100 + odd)
        a.app.send(hdr + sp)
        want = segment_tcp4(bytearray(sp), mss)
        for i, expected in enumerate(want):
            data = b.app.recv(70000)
            assert data[:VNET_LEN] == bytes(VNET_LEN)
            pkt = data[VNET_LEN:]
            assert tcp_checksum_ok(pkt), i
            assert pkt == bytes(expected), i
    finally:
        a.stop()
        b.stop()


def test_a_tso_super_packet_is_segmented_sent_and_joined_again():
    a, b = pair(vnet=True)
    try:
        # a session first, so that the segments leave in one GSO batch (one GRO receive)
        a.app.send(bytes(VNET_LEN) + ipv4("10.1.1.5", "10.1.2.7"))
        assert b.app.recv(70000)
        hdr, sp = tcp_super_packet("10.1.1.5", "10.1.2.7", 1380, 20)
        a.app.send(hdr + sp)
        got = b""
        joined = 0
        deadline = time.monotonic() + 3
        want = len(sp) - 40
        while len(got) < want and time.monotonic() < deadline:
            data = b.app.recv(70000)
            vh, pkt = data[:VNET_LEN], data[VNET_LEN:]
            flags, gso_type, _hl, gso_size, _cs, _co = VNET.unpack(vh)
            if gso_type == GSO_TCPV4:
                joined += 1
                segs = segment_tcp4(bytearray(pkt), gso_size)
            else:
                segs = [pkt]
            for s in segs:
                got += bytes(s[40:])
        assert got == sp[40:]
        c = a.counters()
        assert c["segmented"] == 1 and c["tx_packets"] == 21
        cb = b.counters()
        assert joined >= 1 and cb["coalesced"] >= 2
        # the run's last, shorter datagram too: nothing refused
        assert not any(v for k, v in cb.items() if k.startswith("drop_"))
    finally:
        a.stop()
        b.stop()


def tcp6_super_packet(mss: int, segments: int, trim: int = 100) -> tuple[bytes, bytes]:
    """(virtio-net header, IPv6/TCP super-packet fc00:1::5 -> fc00:2::7, partial csum)."""
    from ipaddress import IPv6Address

    payload = bytes((i * 13 + i // 241) & 0xFF for i in range(mss * segments - trim))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 7000, 1, 5 << 4, 0x18, 65535, 0, 0)
    src, dst = IPv6Address("fc00:1::5").packed, IPv6Address("fc00:2::7").packed
    body = bytearray(tcp + payload)
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 6, 64) + src + dst
    pseudo = src + dst + struct.pack("!I", len(body)) + bytes((0, 0, 0, 6))
    struct.pack_into("!H", body, 16, ones_sum(pseudo))
    hdr = VNET.pack(F_NEEDS_CSUM, GSO_TCPV6, 60, mss, 40, 16)
    return hdr, ip6 + bytes(body)


def tcp6_checksum_ok(pkt: bytes) -> bool:
    pseudo = pkt[8:40] + struct.pack("!I", len(pkt) - 40) + bytes((0, 0, 0, 6))
    return ones_sum(pseudo + pkt[40:]) == 0xFFFF


def pair6() -> tuple[WgNode, WgNode]:
    a = WgNode("127.0.0.1", "10.1.1.0", vnet=True)
    b = WgNode("127.0.0.2", "10.1.2.0", vnet=True)
    for me, other, net in ((a, b, "fc00:2::/64"), (b, a, "fc00:1::/64")):
        me.configure((other.key.public_base64, net, other.ip, other.port))
    return a, b


@pytest.mark.parametrize("coalesce", [False, True])
def test_ipv6_tso_super_packets_are_cut_sealed_and_joined_again(coalesce):
    from pyflannel.fastpath.frames import segment_tcp6

    a, b = pair6()
    b.fwd.coalesce = coalesce
    try:
        ping = struct.pack("!IHBB", 6 << 28, 8, 17, 64) + bytes.fromhex(
            "fc000001000000000000000000000005fc000002000000000000000000000007") + bytes(8)
        a.app.send(bytes(VNET_LEN) + ping)  # a session first: one GSO batch below
        assert b.app.recv(70000)[VNET_LEN:] == ping
        hdr, sp = tcp6_super_packet(1360, 12)
        a.app.send(hdr + sp)
        want = segment_tcp6(bytearray(sp), 1360)
        got = []
        while sum(len(s) - 60 for s in got) < len(sp) - 60:
            data = b.app.recv(70000)
            vh, pkt = VNET.unpack(data[:VNET_LEN]), data[VNET_LEN:]
            if vh[1] == GSO_TCPV6:
                assert vh[3] == 1360 and vh[4] == 40 and vh[5] == 16
                got += segment_tcp6(bytearray(pkt), vh[3])
            else:
                assert tcp6_checksum_ok(pkt)
                got.append(pkt)
        assert [bytes(s) for s in got] == [bytes(s) for s in want]
        cb = b.counters()
        assert (cb["coalesced"] >= 2) == coalesce
        assert not any(v for k, v in cb.items() if k.startswith("drop_"))
    finally:
        a.stop()
        b.stop()


def test_a_pre_shared_key_must_match_on_both_sides():
    import base64
    import os

    def key() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    same = key()
    for psk_a, psk_b in ((same, same), (key(), key())):
        a = WgNode("127.0.0.1", "10.1.1.0")
        b = WgNode("127.0.0.2", "10.1.2.0")
        try:
            a.configure(b.peer_row(), psk=psk_a)
            b.configure(a.peer_row(), psk=psk_b)
            p = ipv4("10.1.1.5", "10.1.2.7")
            a.app.send(p)
            if psk_a == psk_b:
                assert b.app.recv(65536) == p
                continue
            # the responder mixes its key in: the initiator cannot open the response
            wait_for(lambda a=a: a.counters()["drop_bad_auth"] >= 1, "response refused")
            b.app.settimeout(0.5)
            with pytest.raises(TimeoutError):
                b.app.recv(65536)
            assert a.counters()["wg_handshakes_completed"] == 0
        finally:
            a.stop()
            b.stop()


def test_persistent_keepalives_start_a_session_and_keep_it_warm():
    a = WgNode("127.0.0.1", "10.1.1.0")
    b = WgNode("127.0.0.2", "10.1.2.0")
    try:
        b.configure(a.peer_row())
        msg = {"op": "config", "subnet_len": 24, "local_net": int(IPv4Address(a.net)),
               "icmp_src": int(IPv4Address("10.1.0.0")), "psk": None, "keepalive": 1,
               "peers": [[b.key.public_base64, [b.net + "/24"], b.ip, b.port]]}
        a.ctl.sendall(json.dumps(msg).encode() + b"\n")
        wait_for(lambda: a.counters()["wg_handshakes_completed"] >= 1, "a session, unasked")
        wait_for(lambda: b.counters()["wg_keepalives_received"] >= 2, "keepalives", 5)
    finally:
        a.stop()
        b.stop()


def test_no_peer_for_an_ipv6_destination_answers_icmpv6_no_route():
    """As the udp backend does: a destination nobody's AllowedIPs cover gets ICMPv6
    destination unreachable / no route, from the IPv6 network's own address."""
    from ipaddress import IPv6Address

    from tests.test_packet import icmpv6_checksum_ok, ipv6

    node = WgNode("127.0.0.1", "10.1.1.0", vnet=True)
    try:
        msg = {"op": "config", "family": 6, "subnet_len": 64,
               "local_net": int(IPv6Address("fc00:1::")), "icmp_src": int(IPv6Address("fc00::")),
               "psk": None, "keepalive": 0, "peers": []}
        install(node.ctl, node.fwd, msg)
        node.app.send(bytes(VNET_LEN) + ipv6(src="fc00:1::5", dst="fc00:77::1", nxt=58,
                                             payload=bytes([128, 0]) + bytes(6)))
        reply = node.app.recv(70000)[VNET_LEN:]
        assert reply[40] == 1 and reply[41] == 0 and icmpv6_checksum_ok(reply)
        assert reply[8:24] == IPv6Address("fc00::").packed
        assert node.counters()["icmp_unreachable_sent"] == 1
    finally:
        node.stop()
