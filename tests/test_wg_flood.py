"""A WireGuard node under a handshake flood: what each defence guarantees, without root.

* HChaCha20 (every cookie reply needs one) is one ChaCha20 block from ``cryptography``:
  the draft's vector, the reference rounds, and microseconds instead of 130 µs.
* The socket filter lets only WireGuard's shapes reach Python, and under a flood sheds
  handshake messages, never transport data (real UDP sockets on loopback).
* The receive loop serves transport data first and looks at no more than its budget of
  handshake messages a turn; cookie replies are limited for the whole device.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from bench.flood import lab_target, mac1_initiations
from pyflannel.fastpath import counters, sockfilter
from pyflannel.fastpath.wg import HANDSHAKE_BUDGET
from pyflannel.wireguard.crypto import hchacha20, xaead_encrypt
from pyflannel.wireguard.device import COOKIE_REPLIES_PER_SECOND, COOKIE_REPLY_BURST, Device
from pyflannel.wireguard.keys import PrivateKey
from pyflannel.wireguard.noise import CookieChecker, LocalIdentity
from tests.test_packet import ipv4
from tests.test_wg_fastpath import pair

# --- HChaCha20 ---------------------------------------------------------------------------


def reference_hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """The function as draft-irtf-cfrg-xchacha section 2.2 defines it: 20 rounds, no
    final addition (the implementation this module had before)."""
    m = 0xFFFFFFFF
    s = [*struct.unpack("<4I", b"expand 32-byte k"), *struct.unpack("<8I", key),
         *struct.unpack("<4I", nonce16)]

    def quarter(a: int, b: int, c: int, d: int) -> None:
        for x, y, z, r in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
            s[x] = (s[x] + s[y]) & m
            v = s[z] ^ s[x]
            s[z] = ((v << r) & m) | (v >> (32 - r))

    for _ in range(10):
        for q in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                  (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(*q)
    return struct.pack("<8I", *s[0:4], *s[12:16])


def test_hchacha20_is_the_draft_s_function():
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert reference_hchacha20(key, nonce).hex() == expected  # the reference is right
    assert hchacha20(key, nonce).hex() == expected
    for _ in range(200):  # counter words with the top bits set, all-ones keys included
        key, nonce = os.urandom(32), os.urandom(16)
        assert hchacha20(key, nonce) == reference_hchacha20(key, nonce)
    ones = b"\xff" * 32
    assert hchacha20(ones, ones[:16]) == reference_hchacha20(ones, ones[:16])


def python_lines_run(fn, *args) -> int:
    """How many lines of Python ``fn(*args)`` runs, all callees included: a measure of work
    that, unlike a timing, does not depend on the machine or on what else runs beside it."""
    import sys

    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return lines


def test_a_cookie_reply_runs_no_chacha_rounds_in_python():
    """A flood is answered with cookie replies: the rounds in Python made each cost
    about 250 µs (130 µs of it HChaCha20, 320 quarter-round lines). One ChaCha20 block
    from ``cryptography`` leaves a handful of lines."""
    key, nonce = os.urandom(32), os.urandom(24)
    checker = CookieChecker(LocalIdentity(PrivateKey.generate()), 120.0)
    checker.make_reply(bytes(148), 7, b"\xc6\x12\x00\x02\xca\x6c", 1.0)  # imports done
    assert python_lines_run(reference_hchacha20, key, nonce[:16]) > 1000  # the old way
    assert python_lines_run(hchacha20, key, nonce[:16]) < 40
    reply = python_lines_run(checker.make_reply, bytes(148), 7, b"\xc6\x12\x00\x02\xca\x6c", 1.0)
    assert reply < 200, f"a cookie reply runs {reply} lines of Python"
    assert len(xaead_encrypt(key, nonce, b"x" * 16, b"")) == 32


# --- the socket filter -------------------------------------------------------------------

GOOD = {
    "initiation": b"\x01\0\0\0" + bytes(144),
    "response": b"\x02\0\0\0" + bytes(88),
    "cookie reply": b"\x03\0\0\0" + bytes(60),
    "keepalive": b"\x04\0\0\0" + bytes(28),
    "transport, not a multiple of 16": b"\x04\0\0\0" + bytes(1000),
    "transport, 64 KiB": b"\x04\0\0\0" + bytes(65000),
}
BAD = {
    "empty": b"",
    "three bytes": b"\x04\0\0",
    "initiation, one byte long": b"\x01\0\0\0" + bytes(145),
    "initiation, one byte short": b"\x01\0\0\0" + bytes(143),
    "response, 96 bytes": b"\x02\0\0\0" + bytes(92),
    "cookie reply, 48 bytes": b"\x03\0\0\0" + bytes(44),
    "transport, 31 bytes": b"\x04\0\0\0" + bytes(27),
    "reserved byte set": b"\x04\0\x01\0" + bytes(60),
    "type 0": bytes(148),
    "type 5": b"\x05\0\0\0" + bytes(60),
    "random text": b"hello, wireguard",
}


def receiver(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(0.5)
    return sock


def drain(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.1)
    got = []
    try:
        while True:
            got.append(sock.recv(70000))
    except TimeoutError:
        return got


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_the_socket_filter_passes_wireguard_s_shapes_only(family):
    rx = receiver(family)
    sockfilter.attach(rx, sockfilter.wireguard_filter())
    tx = socket.socket(family, socket.SOCK_DGRAM)
    dst = rx.getsockname()[:2]
    # interleaved, so that a good datagram after a bad one must still arrive
    for bad, good in zip(BAD.values(), [*GOOD.values()] * 2, strict=False):
        tx.sendto(bad, dst)
        tx.sendto(good, dst)
    sent_good = [*GOOD.values()] * 2
    assert sorted(drain(rx)) == sorted(sent_good[:len(BAD)])
    assert sockfilter.socket_drops(rx) == len(BAD)


def test_shedding_drops_handshakes_in_the_kernel_but_never_transport():
    rx = receiver(socket.AF_INET)
    sockfilter.attach(rx, sockfilter.wireguard_filter(sockfilter.MAX_SHED_SHIFT))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dst = rx.getsockname()
    for _ in range(300):
        tx.sendto(GOOD["initiation"], dst)
        tx.sendto(GOOD["response"], dst)
        tx.sendto(GOOD["keepalive"], dst)
    got = drain(rx)
    transport = [d for d in got if d[0] == 4]
    assert len(transport) == 300
    assert len(got) - len(transport) <= 2  # 600 handshakes at one in 65536
    sockfilter.attach(rx, sockfilter.wireguard_filter(1))  # one in two
    for _ in range(400):
        tx.sendto(GOOD["initiation"], dst)
    assert 120 < len(drain(rx)) < 280


def sources(sock: socket.socket) -> list[str]:
    sock.settimeout(0.1)
    got = []
    try:
        while True:
            got.append(sock.recvfrom(2000)[1][0])
    except TimeoutError:
        return got


def test_shedding_spares_handshakes_from_the_peers_addresses():
    rx = receiver(socket.AF_INET)
    many = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(sockfilter.MAX_EXEMPT_V4 + 50)]
    sockfilter.attach(rx, sockfilter.wireguard_filter(
        sockfilter.MAX_SHED_SHIFT, ["127.0.0.2", "::ffff:127.0.0.4", "fd00::9", *many]))
    senders = {}
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        senders[ip] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        senders[ip].bind((ip, 0))
    for _ in range(100):
        for tx in senders.values():
            tx.sendto(GOOD["initiation"], rx.getsockname())
    got = sources(rx)
    assert got.count("127.0.0.2") == got.count("127.0.0.4") == 100  # peers: all
    assert got.count("127.0.0.3") <= 1  # anyone else: one in 65536
    rx6 = receiver(socket.AF_INET6)
    tx6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for exempt, expected in ((["::1"], 50), (["fd00::9", "198.18.0.1"], 0)):
        sockfilter.attach(rx6, sockfilter.wireguard_filter(sockfilter.MAX_SHED_SHIFT, exempt))
        for _ in range(50):
            tx6.sendto(GOOD["response"], rx6.getsockname()[:2])
        assert len(sources(rx6)) in (expected, expected + 1)
    # the longest lists still make a program the kernel takes
    six = [f"fd00::{i:x}" for i in range(sockfilter.MAX_EXEMPT_V6 + 10)]
    sockfilter.attach(rx6, sockfilter.wireguard_filter(1, many + six))


def test_shedding_tightens_at_once_under_a_flood_and_relaxes_when_it_stops():
    shed = sockfilter.Shedding(rate=1000.0, window=0.1)
    assert shed.seen(50, 0.0) is None and shed.shift == 0  # a burst of real handshakes
    assert shed.seen(60, 0.05) == 2  # over 100 in the window: one in four
    changes = [shed.seen(101, 0.06 + i * 0.001) for i in range(3)]
    assert changes == [4, 6, 8] and shed.shift == 8
    assert shed.seen(10, 0.1) is None  # a trickle passes within the window: no change
    assert shed.tick(0.15) is None  # the window is not over yet
    assert shed.tick(0.17) == 7  # a quiet window: twice as many may pass
    steps = [shed.tick(0.17 + 0.11 * i) for i in range(1, 9)]
    assert steps == [6, 5, 4, 3, 2, 1, 0, None] and shed.shift == 0
    shed.seen(100, 0.95)  # a busy window (but within the rate) keeps the shift
    shed.shift = 3
    assert shed.tick(1.1) is None and shed.shift == 3


def test_the_flood_tool_refuses_targets_outside_the_lab():
    assert lab_target("198.18.0.1") == "198.18.0.1"
    assert lab_target("fd00:198:18::1") == "fd00:198:18::1"
    for outside in ("127.0.0.1", "10.1.2.3", "8.8.8.8", "2001:db8::1"):
        with pytest.raises(ValueError):
            lab_target(outside)


# --- the receive loop and the device -----------------------------------------------------


def test_transport_is_served_first_and_handshakes_beyond_the_budget_are_dropped():
    a, b = pair()
    try:
        p = ipv4("10.1.2.7", "10.1.1.5", payload=b"x" * 100)
        b.app.send(p)
        assert a.app.recv(65536) == p  # the session is up
        a.stop()  # from here the test turns a's loop by hand
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for msg in mac1_initiations(a.key.public, 60):
            flood.sendto(msg, (a.ip, a.port))
        data = [ipv4("10.1.2.7", "10.1.1.5", payload=bytes([i]) * 100) for i in range(10)]
        for pkt in data:
            b.app.send(pkt)
        deadline = time.monotonic() + 3
        while b.counters()["tx_packets"] < 11:
            assert time.monotonic() < deadline, "b did not send"
        time.sleep(0.05)
        written: list = []
        looked_at: list[int] = []  # TUN packets written when each handshake was looked at
        fwd = a.fwd
        write_tun, receive = fwd.write_tun, fwd.dev.receive
        fwd.write_tun = lambda packets: (written.extend(packets), write_tun(packets))
        fwd.dev.receive = lambda d, src: (looked_at.append(len(written)), receive(d, src))
        fwd.from_udp()
        assert looked_at == [len(data)] * HANDSHAKE_BUDGET
        assert fwd.c[counters.INDEX["drop_handshake_budget"]] == 60 - HANDSHAKE_BUDGET
        assert [a.app.recv(65536) for _ in data] == data
    finally:
        a.stop()
        b.stop()


def test_cookie_replies_are_limited_for_the_whole_device():
    now = [100.0]
    dev = Device(PrivateKey.generate(), clock=lambda: now[0])
    dev.force_under_load = True
    flood = mac1_initiations(dev.public_key, 400)
    for i, msg in enumerate(flood):  # from 400 addresses: no per-source limit helps
        dev.receive(msg, (f"198.18.{i // 200}.{i % 200 + 1}", 40000))
    replies = [m for m, _ep in dev.drain()[1] if m[0] == 3]
    assert len(replies) == COOKIE_REPLY_BURST
    assert dev.stats["cookie_replies_limited"] == 400 - COOKIE_REPLY_BURST
    assert dev.drops["bad_mac2"] == 400
    now[0] += COOKIE_REPLY_BURST / COOKIE_REPLIES_PER_SECOND + 0.01  # refilled at its rate
    for msg in flood[:200]:
        dev.receive(msg, ("198.18.0.1", 40000))
    assert len(dev.drain()[1]) == COOKIE_REPLY_BURST
