"""A burst of peer changes is one change of the peer table: one diff, one backend commit
(one route reconcile) and, past a few peers, one log line, however many leases it holds.

A thousand host-gw leases removed with one etcd range delete used to cost a thousand
commits, each reconciling a table of up to a thousand routes: minutes of a core, two log
lines a peer, and every later peer change waiting behind them.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.backend import hostgw
from pyflannel.config import parse_config
from pyflannel.daemon.core import Daemon
from pyflannel.flags import Options
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.manager import LeaseManager, batches
from pyflannel.lease.memory import MemoryRegistry
from pyflannel.lease.model import LeaseAttrs, subnets_prefix
from pyflannel.lease.registry import EtcdUnavailable
from tests.conftest import until

CFG = parse_config(b'{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw"}}')
PREFIX = "/coreos.com/network"
ME = IPv4Address("198.18.0.1")
MINE = IPv4Network("10.200.0.0/24")
PEERS = 1000


def peer(i: int) -> tuple[IPv4Network, LeaseAttrs]:
    """Peer ``i``: a /24 under 10.16.0.0 (keys ``10.1...``), routed via an underlay host."""
    subnet = IPv4Network((int(IPv4Address("10.16.0.0")) + i * 256, 24))
    return subnet, LeaseAttrs(IPv4Address(f"198.18.0.{150 + i % 100}"), "host-gw")


class CountingHostGw(hostgw.HostGwBackend):
    """host-gw with its kernel side replaced by a count of commits and the routes each
    would have left in the table."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.commits = 0
        self.routes: list[int] = []

    async def commit(self) -> None:
        self.commits += 1
        await super().commit()

    async def reconcile(self) -> None:
        self.routes.append(len(self.desired_routes()))


@pytest.fixture
async def node():
    reg = MemoryRegistry(PREFIX)
    daemon = Daemon(Options())
    daemon.registry = reg  # type: ignore[assignment]
    backend = CountingHostGw(CFG, ExternalInterface("eth0", 2, ME, ME, 1500))
    manager = LeaseManager(reg, CFG, LeaseAttrs(ME, "host-gw"), on_peers=daemon.on_peers)
    daemon.backend, daemon.cfg, daemon.manager = backend, CFG, manager
    lease = await manager.acquire(previous=MINE)
    backend.lease = lease
    manager.activated(lease)
    watch = asyncio.create_task(manager.watch_forever())
    yield reg, backend
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)


def lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_a_range_delete_of_a_thousand_peers_is_one_commit_and_one_line(node, caplog):
    caplog.set_level(logging.INFO)
    reg, backend = node
    for i in range(PEERS):
        reg.put_lease_raw(*peer(i))  # one batch: all arrive before the watch runs again
    await until(lambda: len(backend.peers) == PEERS, 5)
    assert backend.commits == 1 and backend.routes == [PEERS]
    assert lines(caplog, f"peers changed in one batch: 0 removed, {PEERS} added") != []
    assert lines(caplog, "peer added:") == []
    caplog.clear()

    gone = reg.delete_range_raw(f"{subnets_prefix(PREFIX)}10.1")
    assert gone == PEERS
    await until(lambda: not backend.peers, 5)
    assert backend.commits == 2 and backend.routes[-1] == 0
    summary = lines(caplog, "peers changed in one batch")
    assert len(summary) == 1 and summary[0].startswith(f"peers changed in one batch: "
                                                        f"{PEERS} removed (10.16.0.0/24, ")
    assert lines(caplog, "peer removed:") == []

    reg.put_lease_raw(IPv4Network("10.20.0.0/24"), LeaseAttrs(IPv4Address("198.18.0.9"),
                                                               "host-gw"))
    await until(lambda: len(backend.peers) == 1, 5)
    assert backend.commits == 3 and backend.routes[-1] == 1
    assert lines(caplog, "peer added: 10.20.0.0/24 via 198.18.0.9") != []  # a few: a line each


async def test_changes_arriving_during_a_slow_commit_are_applied_together(node):
    reg, backend = node
    slow, real = asyncio.Event(), backend.reconcile

    async def reconcile_held_open() -> None:
        await slow.wait()
        await real()

    backend.reconcile = reconcile_held_open  # type: ignore[method-assign]
    reg.put_lease_raw(*peer(0))
    await until(lambda: backend.commits == 1)
    for i in range(1, 50):  # one at a time, while the first commit is still running
        reg.put_lease_raw(*peer(i))
        await asyncio.sleep(0)
    slow.set()
    await until(lambda: len(backend.peers) == 50)
    assert backend.commits == 2


async def _items(*items, then: BaseException | None = None):
    for item in items:
        yield item
    if then is not None:
        raise then


async def test_batches_hand_over_what_came_before_an_error_then_the_error():
    got = []
    with pytest.raises(EtcdUnavailable, match="stream broke"):
        async for batch in batches(_items(1, 2, 3, then=EtcdUnavailable("stream broke"))):
            got.append(batch)
    assert got == [[1, 2, 3]]


async def test_batches_end_when_the_events_end_and_leave_no_reader_behind():
    before = asyncio.all_tasks()
    assert [b async for b in batches(_items("a", "b"))] == [["a", "b"]]
    stream = batches(_items(then=None))
    assert [b async for b in stream] == []
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == before


async def test_a_lease_the_backend_leaves_out_is_said_once_and_never_as_added_or_removed(
        node, caplog):
    """The backend's warning is the one line for it: the daemon does not also announce a
    peer it never put in the data path, nor one it takes out of it when the lease goes."""
    caplog.set_level(logging.INFO)
    reg, backend = node
    reg.put_lease_raw(IPv4Network("10.20.0.0/24"), LeaseAttrs(IPv4Address("240.0.0.9"),
                                                               "host-gw"))
    reg.put_lease_raw(IPv4Network("10.21.0.0/24"), LeaseAttrs(IPv4Address("198.18.0.9"),
                                                               "host-gw"))
    await until(lambda: len(backend.peers) == 2, 5)
    assert lines(caplog, "10.20.0.0/24") == [
        "peer 10.20.0.0/24 (240.0.0.9) ignored: its address 240.0.0.9 is a loopback, "
        "multicast, broadcast or reserved one"]
    assert lines(caplog, "peer added:") == ["peer added: 10.21.0.0/24 via 198.18.0.9"]
    caplog.clear()

    reg.delete_raw(f"{subnets_prefix(PREFIX)}10.20.0.0-24")
    reg.put_lease_raw(IPv4Network("10.22.0.0/24"), LeaseAttrs(IPv4Address("198.18.0.10"),
                                                               "host-gw"))
    await until(lambda: lines(caplog, "peer added: 10.22.0.0/24"), 5)  # the delete is done
    assert "10.20.0.0-24" not in backend.peers and lines(caplog, "10.20.0.0/24") == []
