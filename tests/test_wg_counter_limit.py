"""REJECT_AFTER_MESSAGES holds for every message, whichever path sealed it.

A session may send at most REJECT_AFTER_MESSAGES messages (a nonce is never reused). The
limit is shortened here so that it is reached in a few packets: through the device, the
fast path's per-packet batch and its TSO cutter, no message ever carries a counter at or
past it, and what does not fit waits for the next session.
"""

from __future__ import annotations

import socket

import pytest

from pyflannel.fastpath.wg import WgForwarder
from pyflannel.wireguard.constants import DATA_COUNTER, DATA_PAYLOAD, MSG_TRANSPORT, Limits
from pyflannel.wireguard.device import Device
from pyflannel.wireguard.keys import PrivateKey
from pyflannel.wireguard.peer import PeerConfig
from pyflannel.wireguard.transport import CounterExhausted
from tests.test_packet import ipv4
from tests.test_wg_fastpath import tcp_super_packet
from tests.test_wg_transport import _pair

LIMIT = 20
LIMITS = Limits(reject_after_messages=LIMIT, rekey_after_messages=LIMIT,
                max_staged_packets=4, rekey_timeout=1e-9)
A_EP = ("127.0.0.3", 51820)


def test_a_keypair_takes_no_counter_past_the_limit() -> None:
    tx, rx = _pair(limit=3)
    assert [rx.open(tx.seal(b"x")) for _ in range(3)] == [b"x" + bytes(15)] * 3
    with pytest.raises(CounterExhausted):
        tx.seal(b"x")
    with pytest.raises(CounterExhausted):
        tx.seal_into(memoryview(bytearray(64)), 1)
    assert tx.take_counters() == -1 and tx.counters_left() == 0 and tx.send_counter == 3
    again, _ = _pair(limit=3)
    assert again.take_counters(4) == -1 and again.send_counter == 0  # none taken
    assert again.take_counters(3) == 0 and again.take_counters() == -1


class Sender:
    """A WireGuard fast path (send half, driven by hand) with a session to a plain device,
    its datagrams landing on a socket the test reads."""

    def __init__(self) -> None:
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        self.wire = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.wire.bind(("127.0.0.1", 0))
        self.wire.settimeout(0.2)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tun, ctl = socket.socketpair()
        self._keep = ctl
        self.fwd = WgForwarder(self.tun.fileno(), self.udp, ctl, None, private_key=ka,
                               mtu=1420, vnet=True)
        self.fwd.dev = dev = Device(ka, mtu=1420, limits=LIMITS)
        b_ep = self.wire.getsockname()
        dev.set_peers({kb.public: PeerConfig(("10.1.2.0/24",), b_ep)})
        self.peer_dev = Device(kb, limits=LIMITS)
        self.peer_dev.set_peers({ka.public: PeerConfig(("10.1.1.0/24",), A_EP)})
        dev.initiate(kb.public)
        for m, _ in dev.drain()[1]:
            self.peer_dev.receive(m, A_EP)
        for m, _ in self.peer_dev.drain()[1]:
            dev.receive(m, b_ep)
        dev.drain()  # the keepalive that confirms the session: counter 0
        self.peer = dev.peers[kb.public]
        self.session = self.peer.current
        assert self.session is not None and self.session.send_counter == 1

    def sent(self) -> list[bytes]:
        self.fwd.end_run()
        self.fwd.flush()
        self.fwd.pump()
        out = []
        while True:
            try:
                out.append(self.wire.recv(65536))
            except TimeoutError:
                return out

    def close(self) -> None:
        for s in (self.wire, self.udp, self.tun, self._keep):
            s.close()


@pytest.fixture
def sender():
    s = Sender()
    yield s
    s.close()


def _counters(datagrams: list[bytes]) -> list[int]:
    return [int.from_bytes(d[DATA_COUNTER:DATA_PAYLOAD], "little")
            for d in datagrams if d[0] == MSG_TRANSPORT]


def test_the_fast_path_s_per_packet_batch_stops_at_the_limit(sender: Sender) -> None:
    pkt = ipv4("10.1.1.5", "10.1.2.7", payload=b"p" * 100)
    for _ in range(LIMIT + 5):
        sender.fwd.seal(sender.peer, pkt)
    counters = _counters(sender.sent())
    assert counters == list(range(1, LIMIT))  # every counter the session had, none past
    assert sender.session.send_counter == LIMIT
    assert sender.peer.staged  # the rest waits for the new session, which is asked for
    assert sender.fwd.dev.stats["initiations_sent"] >= 2 and sender.peer.pending


def test_a_tso_super_packet_never_passes_the_limit(sender: Sender) -> None:
    _hdr, sp = tcp_super_packet("10.1.1.5", "10.1.2.7", 1380, 8)
    sender.fwd.seal_super(sender.peer, memoryview(bytearray(sp)), 1380)  # 8 segments fit
    sender.fwd.seal_super(sender.peer, memoryview(bytearray(sp)), 1380)  # 8 more fit
    assert sender.session.send_counter == LIMIT - 3
    # 8 do not: cut by the reference segmenter, handed to the device, which seals the
    # three the session still allows and holds the rest for the next session
    sender.fwd.seal_super(sender.peer, memoryview(bytearray(sp)), 1380)
    counters = _counters(sender.sent())
    assert counters == list(range(1, LIMIT))
    assert sender.session.send_counter == LIMIT and sender.peer.staged

