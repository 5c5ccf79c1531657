"""Months of peer churn must not grow the daemon: thousands of peer leases come and go
through the in-memory registry, the lease manager, the daemon's peer handling, a backend,
the metrics and the state snapshot, and the Python heap ends where it started."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from ipaddress import IPv4Address, IPv4Network

from pyflannel.backend import hostgw
from pyflannel.backend.base import Backend
from pyflannel.config import parse_config
from pyflannel.daemon.core import Daemon
from pyflannel.flags import Options
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.memory import MemoryRegistry
from pyflannel.lease.model import LeaseAttrs, subnet_key

CFG = parse_config(b'{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}')
PREFIX = "/coreos.com/network"
ME = IPv4Address("198.18.0.1")


def pyflannel_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    return sum(s.size_diff for s in after.compare_to(before, "filename")
               if s.traceback and "pyflannel" in s.traceback[0].filename)


async def test_thousands_of_peer_events_through_the_daemon_leave_the_heap_flat(monkeypatch):
    routed: list[int] = []
    monkeypatch.setattr("pyflannel.backend.base.sync_routes",
                        lambda desired: routed.append(len(desired)) or (0, 0, []))

    async def on_the_loop(fn, *args, **kwargs):  # no thread hop: the heap is what counts
        return fn(*args, **kwargs)

    monkeypatch.setattr("pyflannel.backend.base.run_netlink", on_the_loop)
    reg = MemoryRegistry(PREFIX)
    daemon = Daemon(Options())
    daemon.registry = reg  # type: ignore[assignment]
    ext = ExternalInterface("eth0", 2, ME, ME, 1500)
    backend: Backend = hostgw.HostGwBackend(CFG, ext)
    daemon.backend, daemon.cfg = backend, CFG
    manager = LeaseManager(reg, CFG, LeaseAttrs(ME, "host-gw"), on_peers=daemon.on_peers)
    daemon.manager = manager
    lease = await manager.acquire()
    backend.lease = lease
    manager.activated(lease)
    watch = asyncio.create_task(manager.watch_forever())
    await asyncio.sleep(0.01)

    async def drained() -> None:
        """Until the node has handled every event (so nothing waits in a queue)."""
        while any(not q.empty() for q in reg._watchers):
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)

    async def churn(n: int) -> None:
        for i in range(n):
            subnet = IPv4Network(f"10.1.{100 + i % 100}.0/24")
            kind = "udp" if i % 10 == 0 else "host-gw"  # some on another backend: warned
            reg.put_lease_raw(subnet, LeaseAttrs(IPv4Address(f"198.18.1.{i % 200 + 1}"), kind))
            await drained()
            daemon.snapshot()
            daemon.metrics.render()
            reg.delete_raw(subnet_key(PREFIX, subnet))
            await drained()
        reg.history.clear()  # the fake's own record of revisions, not the node's

    await churn(500)  # warm up: caches, first warnings, the histogram's buckets
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    await churn(3000)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    grown = pyflannel_growth(before, after)
    assert grown < 64 * 1024, f"pyflannel's heap grew {grown} bytes over 6000 peer events"
    assert manager.peers == {} and backend.peers == {}
    assert len(routed) > 6000  # the events really reached the backend
