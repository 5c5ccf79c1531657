"""The BGP speaker's I/O as a specification: real sockets on loopback, several speakers in one
process, no lab. Each speaker listens on its own 127.0.0.x, so peers are told apart by address
as on a real network; next hops are documentation addresses (they are only attributes here).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

import pytest

from pyflannel.bgp import errors as E
from pyflannel.bgp.attributes import PathAttributes
from pyflannel.bgp.messages import (
    Keepalive,
    Notification,
    Open,
    Update,
    decode,
    encode,
    split_stream,
)
from pyflannel.bgp.rib import OUTSIDE_NETWORK, OWN_SUBNET, WRONG_LENGTH, ImportPolicy, LocalSpeaker
from pyflannel.bgp.session import PASSWORD_HINT, PeerSpec, Speaker, Timing, md5sig
from pyflannel.config import parse_config

CFG = parse_config('{"Network": "10.1.0.0/16"}')
FAST = Timing(hold_time=9, keepalive_time=3, connect_timeout=0.5, idle_hold_first=0.1,
              idle_hold_max=0.5)
AS = 64512


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Node:
    """One speaker on 127.0.0.n, announcing 10.1.n.0/24 with next hop 192.0.2.n."""

    def __init__(self, n: int, asn: int = AS, timing: Timing = FAST) -> None:
        self.n, self.asn = n, asn
        self.host = f"127.0.0.{n}"
        self.port = free_port(self.host)
        self.subnet = IPv4Network(f"10.1.{n}.0/24")
        self.changes: list[dict] = []
        local = LocalSpeaker(asn, IPv4Address(f"10.255.0.{n}"), (IPv4Address(f"192.0.2.{n}"),))
        self.speaker = Speaker(local, ImportPolicy.from_pools(CFG.pools, [self.subnet]),
                               on_routes=self.changes.append, listen=(self.host,),
                               port=self.port, source=(IPv4Address(self.host),), timing=timing)

    async def start(self) -> Node:
        await self.speaker.start()
        self.speaker.originate(self.subnet)
        return self

    def spec_for(self, other: Node, password: str = "") -> PeerSpec:
        """Our side of the pair; the lower address connects, the higher one listens."""
        return PeerSpec(ip_address(other.host), other.asn, other.port, password, "mesh",
                        passive=self.n > other.n)

    def state(self, other: Node | str) -> str:
        key = other if isinstance(other, str) else other.host
        return self.speaker.sessions[key].fsm.state.value

    def routes(self) -> dict:
        return {str(p): sorted(map(str, hops)) for p, hops in self.speaker.rib.routes().items()}


async def until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def pair(password_a: str = "", password_b: str = "") -> tuple[Node, Node]:
    a, b = await Node(1).start(), await Node(2).start()
    a.speaker.add_peer(a.spec_for(b, password_a))
    b.speaker.add_peer(b.spec_for(a, password_b))
    return a, b


async def stop(*nodes: Node) -> None:
    for node in nodes:
        await node.speaker.stop()


async def test_two_speakers_learn_each_others_subnet_and_forget_it_on_withdraw():
    a, b = await pair()
    try:
        await until(lambda: a.routes() == {"10.1.2.0/24": ["192.0.2.2"]}, what="a learns b")
        await until(lambda: b.routes() == {"10.1.1.0/24": ["192.0.2.1"]}, what="b learns a")
        assert a.state(b) == b.state(a) == "Established"
        assert a.changes == [{IPv4Network("10.1.2.0/24"): frozenset({IPv4Address("192.0.2.2")})}]
        b.speaker.withdraw_local(b.subnet)
        await until(lambda: a.routes() == {}, what="the withdrawal")
        assert a.changes[-1] == {IPv4Network("10.1.2.0/24"): None}
        status = a.speaker.status()[0]
        assert (status["peer"], status["kind"], status["state"], status["accepted"],
                status["sent"]) == ("127.0.0.2", "mesh", "Established", 0, 1)
    finally:
        await stop(a, b)


async def test_removing_a_peer_at_runtime_takes_its_routes_and_ends_its_session():
    a, b = await pair()
    try:
        await until(lambda: a.routes() != {}, what="a learns b")
        a.speaker.remove_peer(b.host)
        assert a.routes() == {}
        assert a.changes[-1] == {IPv4Network("10.1.2.0/24"): None}
        # b hears Cease/3 (peer de-configured) and forgets a's subnet.
        await until(lambda: b.routes() == {}, what="b to drop a's routes")
        assert b.speaker.sessions[a.host].notifications_in == {"6/3": 1}
    finally:
        await stop(a, b)


class RawPeer:
    """A hand-driven peer on 127.0.0.n: what a hostile or broken speaker can send."""

    def __init__(self, n: int) -> None:
        self.host = f"127.0.0.{n}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self, node: Node) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            node.host, node.port, local_addr=(self.host, 0))

    async def establish(self, node: Node) -> None:
        await self.connect(node)
        self.send(Open(AS, 90, IPv4Address("10.255.0.99")))
        self.send(Keepalive())
        await self.read_until(Keepalive)

    def send(self, message) -> None:
        self.writer.write(encode(message))

    async def read_until(self, kind) -> object:
        buffer = b""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                raise AssertionError(f"closed before a {kind.__name__}")
            buffer += data
            messages, buffer = split_stream(buffer)
            for raw in messages:
                msg = decode(raw)
                if isinstance(msg, kind):
                    return msg


async def test_garbage_and_a_malformed_update_cost_only_that_session():
    a, b = await pair()
    hostile = RawPeer(3)
    a.speaker.add_peer(PeerSpec(ip_address(hostile.host), AS, 179, kind="configured",
                                passive=True))
    try:
        await until(lambda: a.state(b) == "Established", what="a-b session")
        # Garbage instead of a BGP header: Message Header Error, Connection Not Synchronized.
        await hostile.connect(a)
        hostile.writer.write(b"GET / HTTP/1.0\r\n\r\n" + b"\0" * 20)
        notification = await hostile.read_until(Notification)
        assert (notification.code, notification.subcode) == (E.MESSAGE_HEADER_ERROR,
                                                             E.CONNECTION_NOT_SYNCHRONIZED)
        assert await hostile.reader.read() == b""
        # Established, then prefixes nobody may announce: counted, never installed.
        await until(lambda: a.state(hostile.host) == "Active", what="a to listen again")
        await hostile.establish(a)
        attrs = PathAttributes(origin=0, as_path=(), next_hop=IPv4Address("192.0.2.3"),
                               local_pref=100)
        hostile.send(Update(attributes=attrs, nlri=(
            IPv4Network("192.168.0.0/24"),  # outside the Network
            IPv4Network("10.1.1.0/24"),  # a's own subnet
            IPv4Network("10.1.0.0/16"),  # an aggregate
            IPv4Network("10.1.3.0/24"))))  # its own: fine
        await until(lambda: "10.1.3.0/24" in a.routes(), what="the good prefix")
        assert a.speaker.rib.counters[hostile.host].refused == {
            OUTSIDE_NETWORK: 1, OWN_SUBNET: 1, WRONG_LENGTH: 1}
        # An UPDATE whose NLRI cannot be parsed: UPDATE Message Error, this session only.
        body = b"\x00\x00" + b"\x00\x00" + b"\x21\x0a"  # a /33 IPv4 prefix
        hostile.writer.write(b"\xff" * 16 + struct.pack("!HB", 19 + len(body), 2) + body)
        notification = await hostile.read_until(Notification)
        assert notification.code == E.UPDATE_MESSAGE_ERROR
        await until(lambda: "10.1.3.0/24" not in a.routes(), what="its routes to go")
        assert a.state(b) == "Established" and b.state(a) == "Established"
        assert a.routes() == {"10.1.2.0/24": ["192.0.2.2"]}
    finally:
        hostile.writer.close()
        await stop(a, b)


async def test_a_connection_from_an_unknown_address_is_closed_and_counted():
    a = await Node(1).start()
    try:
        stranger = RawPeer(9)
        await stranger.connect(a)
        assert await asyncio.wait_for(stranger.reader.read(), 5) == b""
        assert a.speaker.unknown_connections == 1
    finally:
        await stop(a)


def test_md5sig_is_linuxs_struct_tcp_md5sig():
    raw = md5sig(IPv4Address("192.0.2.200"), b"s3cret")
    assert len(raw) == 128 + 1 + 1 + 2 + 4 + 80
    assert raw[:2] == struct.pack("=H", socket.AF_INET) and raw[4:8] == bytes([192, 0, 2, 200])
    assert struct.unpack_from("=BBHi", raw, 128) == (0, 0, 6, 0)
    assert raw[136:142] == b"s3cret" and raw[142:] == b"\0" * 74
    v6 = md5sig(ip_address("fd00::1"), b"k")
    assert v6[:2] == struct.pack("=H", socket.AF_INET6) and v6[8:24] == ip_address("fd00::1").packed
    with pytest.raises(ValueError):
        md5sig(IPv4Address("192.0.2.1"), b"x" * 81)


async def test_the_same_tcp_md5_password_establishes():
    a, b = await pair("s3cret", "s3cret")
    try:
        await until(lambda: a.routes() != {} and b.routes() != {}, what="routes over MD5")
    finally:
        await stop(a, b)


async def test_a_wrong_password_never_establishes_and_status_says_why():
    a, b = await pair("s3cret", "wrong")
    try:
        await until(lambda: a.speaker.sessions[b.host].connect_error == "timed out",
                    what="a's connect to time out")
        await asyncio.sleep(0.3)
        assert a.state(b) != "Established" and a.routes() == {}
        status = a.speaker.status()[0]
        assert status["hint"] == PASSWORD_HINT
        assert "connection failed (timed out)" in status["last_error"]
        assert "s3cret" not in repr(status) and "wrong" not in repr(status)
    finally:
        await stop(a, b)


async def test_a_graceful_stop_leaves_our_routes_with_the_peer_as_stale():
    a, b = await pair()
    try:
        await until(lambda: b.routes() != {}, what="b learns a")
        await a.speaker.stop(graceful=True)
        await until(lambda: b.state(a) != "Established", what="b to see the session end")
        assert b.routes() == {"10.1.1.0/24": ["192.0.2.1"]}
        assert b.speaker.rib.stale_count(a.host) == 1
        assert b.speaker.sessions[a.host].graceful_restart == {"routes_kept": 1}
    finally:
        await stop(b)


async def test_a_peer_is_sent_only_the_families_it_negotiated():
    """RFC 4760: a peer whose OPEN offers no multiprotocol capability speaks IPv4 unicast
    only; our IPv6 subnet is never sent to it (nor, the other way, IPv4 to an IPv6-only one)."""
    a = await Node(1).start()
    a.speaker.rib.local = replace(a.speaker.rib.local, next_hops=(
        IPv4Address("192.0.2.1"), ip_address("2001:db8::1")))
    a.speaker.originate(ip_network("fc00:10:1:1::/64"))
    ipv4_only = RawPeer(3)
    a.speaker.add_peer(PeerSpec(ip_address(ipv4_only.host), AS, 179, passive=True))
    try:
        await until(lambda: a.state(ipv4_only.host) == "Active", what="a to listen")
        await ipv4_only.establish(a)
        announced, buffer, done = [], b"", False
        while not done:
            buffer += await asyncio.wait_for(ipv4_only.reader.read(65536), 5)
            messages, buffer = split_stream(buffer)
            for update in (m for m in map(decode, messages) if isinstance(m, Update)):
                done = done or update.end_of_rib() is not None
                announced += update.announcements()
        assert announced == [IPv4Network("10.1.1.0/24")]
        assert a.speaker.status()[0]["sent"] == 1
    finally:
        ipv4_only.writer.close()
        await stop(a)
