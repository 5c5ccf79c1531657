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

from pyflannel.fastpath.handle import FastPath, Installed, InstallError, Route, WgRoute

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


def _confirming(fake: socket.socket, answer=None) -> tuple[threading.Thread, list[dict]]:
    """Play a forwarder that answers one table: by default, that it applied it whole."""
    got: list[dict] = []

    def run() -> None:
        msg = _read_request(fake)
        got.append(msg)
        doc = answer(msg) if answer else {"applied": msg["generation"], "refused": []}
        fake.sendall(json.dumps({"id": msg["id"], **doc}).encode() + b"\n")

    t = threading.Thread(target=run)
    t.start()
    return t, got


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

    answerer, got = _confirming(fake)
    ticks, took = asyncio.run(main())
    answerer.join(5)
    assert took >= 0.25 and ticks >= 10
    assert got[0]["op"] == "config" and len(got[0]["peers"]) == 3
    fp.stop()


def test_a_send_cut_short_does_not_garble_the_next_request():
    fp, fake = _fake_forwarder()
    fp._cut = True  # as after a send timeout in the middle of a line
    with pytest.raises(InstallError):
        fp.configure(LOCAL, ICMP_SRC, [], timeout=0.1)  # nobody answers here
    data = fake.recv(65536)
    assert data.startswith(b"\n{") and json.loads(data)["op"] == "config"
    assert fp._cut is False
    fp.stop()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_the_wireguard_framing_takes_its_table_and_reports_peers_by_key(tmp_path, mode):
    """The forwarder reads the node's key from the key file itself (the secret never
    crosses the command line or the control socket) and answers stats per public key."""
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


# -- every table is confirmed (issue 15, item 2) -------------------------------------------

LOW_ORDER = "A" * 43 + "="  # the all-zero point: X25519 with it gives no shared secret


def test_a_table_is_confirmed_with_the_generation_the_fast_path_applied(fastpath):
    done = fastpath.configure(LOCAL, ICMP_SRC, _table(1, 3))
    assert done == Installed(done.generation, ())
    assert _generation(fastpath) == done.generation and not fastpath.behind


def test_the_fast_path_names_the_rows_it_refuses_and_applies_the_others(fastpath):
    good = _table(1, 3)
    bad = Route(IPv4Network("10.9.9.0/24"), IPv4Address("127.1.0.9"), 0)  # no such port
    done = fastpath.configure(LOCAL, ICMP_SRC, [good[0], bad, *good[1:]])
    assert [i for i, _why in done.refused] == [1] and "port" in done.refused[0][1]
    assert fastpath.forwarder.peers.keys() == {
        int(r.subnet.network_address) >> 8 for r in good}
    assert not fastpath.behind


def test_a_message_the_fast_path_cannot_use_is_answered_with_an_error(fastpath):
    fastpath.configure(LOCAL, ICMP_SRC, _table(1, 2))
    with fastpath._lock:
        reply = fastpath._request({"op": "config", "subnet_len": "wide", "peers": []}, 5)
    assert reply["error"].startswith("ValueError") and "applied" not in reply
    assert len(fastpath.forwarder.peers) == 2  # the table it had stays in force


def test_an_unanswered_table_leaves_the_data_path_behind_until_one_is_confirmed():
    fp, fake = _fake_forwarder()
    with pytest.raises(InstallError, match="no answer within 0.1s"):
        fp.configure(LOCAL, ICMP_SRC, _table(1, 2), timeout=0.1)
    assert fp.behind
    _read_request(fake)  # the table nobody answered
    answerer, _got = _confirming(fake)
    assert fp.configure(LOCAL, ICMP_SRC, _table(1, 2)) is not None
    answerer.join(5)
    assert not fp.behind
    fp.stop()


def test_a_table_refused_whole_is_an_install_error():
    fp, fake = _fake_forwarder()
    answerer, _got = _confirming(fake, lambda msg: {"error": "ValueError in a control message"})
    with pytest.raises(InstallError, match="refused: ValueError"):
        fp.configure(LOCAL, ICMP_SRC, _table(1, 2))
    answerer.join(5)
    assert fp.behind
    fp.stop()


def test_an_older_table_never_lands_after_a_newer_one(fastpath):
    """Two tasks number their snapshots in order, then hand them to two threads, which may
    run in either order: the older one, coming second, is never sent."""
    older, newer = fastpath.next_generation(), fastpath.next_generation()
    assert fastpath.configure(LOCAL, ICMP_SRC, _table(2, 2), generation=newer) is not None
    assert fastpath.configure(LOCAL, ICMP_SRC, _table(1, 5), generation=older) is None
    assert _generation(fastpath) == newer and len(fastpath.forwarder.peers) == 2
    assert not fastpath.behind


def test_stop_never_writes_into_a_line_another_thread_is_sending():
    """A caller stuck halfway through a table holds the socket: stop() must not write its
    own line into the middle of it; ending the stream stops the fast path all the same."""
    tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fp = FastPath(tun_fwd.fileno(), udp, mode="thread")
    fp.start()
    seen: list[bytes] = []
    fwd = fp.forwarder
    fwd.on_request = seen.append  # what the fast path reads, line by line
    fp._lock.acquire()  # the other thread, in the middle of its message
    fp._ctl.sendall(b'{"op": "config", "peers": [')
    threading.Timer(1.0, fp._lock.release).start()
    fp.stop(timeout=0.2)
    assert not fp.alive()
    assert seen == [] and fwd._ctl_buf == b'{"op": "config", "peers": ['
    for s in (tun_app, tun_fwd, udp):
        s.close()


@pytest.mark.parametrize("unusable", ["low-order", "our own"])
def test_a_wireguard_row_with_an_unusable_key_is_refused_and_every_other_row_applies(
        tmp_path, unusable):
    """Issue 15, item 1: one such lease froze the whole table in every node."""
    from pyflannel.wireguard.keys import PrivateKey, load_or_create_key

    key_file = tmp_path / "wgkey"
    ours = load_or_create_key(key_file).public_base64
    tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_fwd.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fp = FastPath(tun_fwd.fileno(), udp, mode="thread", vnet=True, framing="wireguard",
                  wg_key_file=str(key_file))
    fp.start()
    a, b = (PrivateKey.generate().public_base64 for _ in range(2))
    bad = WgRoute(LOW_ORDER if unusable == "low-order" else ours, ("10.1.9.0/24",),
                  IPv4Address("192.0.2.77"), 51820)
    try:
        done = fp.configure_wg(LOCAL, ICMP_SRC, [
            WgRoute(a, ("10.1.2.0/24",), IPv4Address("127.0.0.2"), 51820), bad,
            WgRoute(b, ("10.1.3.0/24",), IPv4Address("127.0.0.3"), 51820)])
        assert [i for i, _why in done.refused] == [1]
        assert set(fp.peer_stats(timeout=5)) == {a, b}
        # ... and the next change (a removed, the bad row still there) applies too
        fp.configure_wg(LOCAL, ICMP_SRC, [
            bad, WgRoute(b, ("10.1.3.0/24",), IPv4Address("127.0.0.3"), 51820)])
        assert set(fp.peer_stats(timeout=5)) == {b}
    finally:
        fp.stop()
        for s in (tun_app, tun_fwd, udp):
            s.close()
