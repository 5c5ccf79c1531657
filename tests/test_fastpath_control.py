"""The control socket to the fast path: one request at a time, replies matched by id.

``configure`` runs from the event loop and ``peer_stats`` from a worker thread; these drive
both at once against a real forwarder in thread mode (a socketpair stands in for the TUN).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.fastpath.handle import FastPath, Route

LOCAL = IPv4Network("10.1.1.0/24")
ICMP_SRC = IPv4Address("10.1.0.0")


def _table(k: int, size: int) -> list[Route]:
    """``size`` peers, all on addresses that name table ``k`` (127.k.x.y)."""
    return [Route(IPv4Network(f"10.{2 + i // 250}.{i % 250}.0/24"),
                  IPv4Address(f"127.{k}.{i // 250}.{1 + i % 250}"), 8285)
            for i in range(size)]


@pytest.fixture
def fastpath():
    tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_fwd.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fp = FastPath(tun_fwd.fileno(), udp, mode="thread")
    fp.start()
    yield fp
    fp.stop()
    for s in (tun_app, tun_fwd, udp):
        s.close()


def test_concurrent_configure_and_peer_stats_never_mix_replies(fastpath):
    """Big tables (bigger than the socket buffer) from several threads, stats from others:
    every table arrives whole and every stats reply is one whole table's peers."""
    sizes = {k: 600 + 50 * k for k in range(1, 7)}  # ~30 KB of JSON each
    tables = {k: _table(k, n) for k, n in sizes.items()}
    ip_sets = [{str(r.public_ip) for r in t} for t in tables.values()] + [set()]
    fastpath.configure(LOCAL, ICMP_SRC, [])
    fwd_generation_before = _generation(fastpath)
    errors: list[BaseException] = []
    seen: list[set[str]] = []
    rounds = 5

    def configurer(k: int) -> None:
        try:
            for _ in range(rounds):
                fastpath.configure(LOCAL, ICMP_SRC, tables[k])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def asker() -> None:
        try:
            for _ in range(rounds * 3):
                seen.append(set(fastpath.peer_stats(timeout=5)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=configurer, args=(k,)) for k in tables]
    threads += [threading.Thread(target=asker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(seen) == 3 * rounds * 3
    assert all(ips in ip_sets for ips in seen), "a stats reply mixed two tables"
    assert fastpath.alive()
    deadline = time.monotonic() + 5
    while _generation(fastpath) < fwd_generation_before + len(tables) * rounds:
        assert time.monotonic() < deadline, "some tables were lost or garbled"
        time.sleep(0.01)


def _generation(fp: FastPath) -> int:
    """The forwarder's count of installed tables (thread mode: same process)."""
    assert fp.forwarder is not None
    return fp.forwarder.generation


def _fake_forwarder() -> tuple[FastPath, socket.socket]:
    """A FastPath whose other end of the control socket is played by the test."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fp = FastPath(a.fileno(), udp, mode="thread")  # never started
    fp._keep = (a, b, udp)  # type: ignore[attr-defined]
    fake = fp._child_ctl
    fake.settimeout(5)
    return fp, fake


def _read_request(fake: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        buf += fake.recv(65536)
    return json.loads(buf)


def _reply(fake: socket.socket, rid: object, ip: str) -> None:
    fake.sendall(json.dumps({"id": rid, "stats": {ip: [1, 2, 3, 4, None, 0]}}).encode()
                 + b"\n")


def test_a_late_reply_is_never_taken_for_the_next_call():
    fp, fake = _fake_forwarder()
    with pytest.raises(TimeoutError):
        fp.peer_stats(timeout=0.1)  # the forwarder is slow this time
    first = _read_request(fake)
    _reply(fake, first.get("id"), "192.0.2.1")  # ... and answers after the caller gave up
    result: list = []
    t = threading.Thread(target=lambda: result.append(fp.peer_stats(timeout=5)))
    t.start()
    second = _read_request(fake)
    _reply(fake, "junk-id", "192.0.2.9")  # not ours either
    _reply(fake, second.get("id"), "192.0.2.2")
    t.join(5)
    assert list(result[0]) == ["192.0.2.2"]
    assert second["op"] == "stats" and second["id"] != first["id"]
    fp.stop()


def test_configure_async_does_not_hold_up_the_loop():
    """While a stats call holds the socket, a configure waits in a worker thread."""
    fp, fake = _fake_forwarder()

    async def main() -> tuple[int, float]:
        fp._lock.acquire()  # a stats request in flight
        threading.Timer(0.3, fp._lock.release).start()
        task = asyncio.create_task(fp.configure_async(LOCAL, ICMP_SRC, _table(1, 3)))
        ticks = 0
        t0 = time.monotonic()
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await task
        return ticks, time.monotonic() - t0

    ticks, took = asyncio.run(main())
    assert took >= 0.25 and ticks >= 10
    msg = _read_request(fake)
    assert msg["op"] == "config" and len(msg["peers"]) == 3
    fp.stop()


def test_a_send_cut_short_does_not_garble_the_next_request():
    fp, fake = _fake_forwarder()
    fp._cut = True  # as after a send timeout in the middle of a line
    fp.configure(LOCAL, ICMP_SRC, [])
    data = fake.recv(65536)
    assert data.startswith(b"\n{") and json.loads(data)["op"] == "config"
    assert fp._cut is False
    fp.stop()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_the_wireguard_framing_takes_its_table_and_reports_peers_by_key(tmp_path, mode):
    """The forwarder reads the node's key from the key file itself (the secret never
    crosses the command line or the control socket) and answers stats per public key."""
    from pyflannel.fastpath.handle import WgRoute
    from pyflannel.wireguard.keys import PrivateKey, load_or_create_key

    key_file = tmp_path / "wgkey"
    ours = load_or_create_key(key_file)
    peer = PrivateKey.generate().public_base64
    tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_fwd.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fp = FastPath(tun_fwd.fileno(), udp, mode=mode, vnet=True, framing="wireguard",
                  wg_key_file=str(key_file), wg_mtu=1420)
    fp.start()
    try:
        if mode == "process":
            assert ours.to_base64() not in " ".join(fp._proc.args)
        fp.configure_wg(LOCAL, ICMP_SRC, [WgRoute(peer, ("10.1.2.0/24",),
                                                  IPv4Address("127.0.0.2"), 51820)])
        stats = fp.peer_stats(timeout=5)
        assert list(stats) == [peer]
        row = stats[peer]
        assert row["public_key"] == peer[:8] + "…" and row["endpoint"] == "127.0.0.2:51820"
        assert row["latest_handshake"] is None and row["tx_packets"] == 0
        assert fp.alive()
    finally:
        fp.stop()
        for s in (tun_app, tun_fwd, udp):
            s.close()


def test_the_wireguard_fast_path_refuses_a_key_file_that_changed(tmp_path):
    """The published public key must be the one the data path uses: a key file replaced
    between the backend's read and the fast path's start stops the fast path."""
    from pyflannel.wireguard.keys import PrivateKey, load_or_create_key

    key_file = tmp_path / "wgkey"
    load_or_create_key(key_file)
    tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fp = FastPath(tun_fwd.fileno(), udp, vnet=True, framing="wireguard",
                  wg_key_file=str(key_file),
                  wg_public_key=PrivateKey.generate().public_base64)
    fp.start()
    try:
        deadline = time.monotonic() + 10
        while fp.alive():
            assert time.monotonic() < deadline, "the fast path kept running"
            time.sleep(0.05)
    finally:
        fp.stop()
        for s in (tun_app, tun_fwd, udp):
            s.close()
