"""The netlink monitor ends with its owner: restarts of Backend.run leak no thread or fd."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyflannel.backend.base import Backend
from pyflannel.host.monitor import NetlinkMonitor
from tests.conftest import _need

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 40


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _monitor_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "netlink-monitor")


def _settled(expect_threads: int, timeout: float = 2.0) -> int:
    deadline = time.monotonic() + timeout
    while _monitor_threads() > expect_threads and time.monotonic() < deadline:
        time.sleep(0.01)
    return _monitor_threads()


def test_start_stop_many_times_leaks_no_thread_and_no_fd():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # One round first: lazy imports and the loop's own fds are not leaks.
        m = NetlinkMonitor(loop, lambda kind, what: None)
        m.start()
        m.stop()
        threads, fds = _monitor_threads(), _fds()
        for _ in range(ROUNDS):
            m = NetlinkMonitor(loop, lambda kind, what: None)
            m.start()
            assert m._thread.is_alive()
            t0 = time.monotonic()
            m.stop()
            assert time.monotonic() - t0 < 0.5, "stop must not wait for an event"
            assert not m._thread.is_alive()
            m.stop()  # twice is harmless
        assert _settled(threads) == threads
        assert _fds() == fds

    asyncio.run(main())


class _Idle(Backend):
    type = "idle"

    @property
    def mtu(self) -> int:
        return 1500

    async def prepare(self):  # pragma: no cover - never called here
        raise NotImplementedError

    async def reconcile_all(self) -> None:
        return None


def test_cancelled_and_restarted_backend_run_leaks_nothing():
    async def main() -> None:
        backend = _Idle(None, None)  # type: ignore[arg-type]

        async def one_round() -> None:
            task = asyncio.create_task(backend.run())
            await asyncio.sleep(0.01)
            assert backend._monitor is not None and backend._monitor._thread.is_alive()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        await one_round()
        threads, fds = _monitor_threads(), _fds()
        for _ in range(ROUNDS):
            await one_round()
        assert _settled(threads) == threads
        assert _fds() == fds
        await backend.teardown()

    asyncio.run(main())


EVENTS = r"""
import asyncio, subprocess
from pyflannel.host.monitor import NetlinkMonitor

async def main():
    seen = []
    m = NetlinkMonitor(asyncio.get_running_loop(), lambda k, w: seen.append((k, w)))
    m.start()
    subprocess.run(["ip", "link", "add", "mon0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", "mon0", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "203.0.113.1/24", "dev", "mon0"], check=True)
    subprocess.run(["ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.2"], check=True)
    for _ in range(100):
        if ("RTM_NEWROUTE", "198.51.100.0") in seen:
            break
        await asyncio.sleep(0.02)
    m.stop()
    print(sorted(set(seen)))

asyncio.run(main())
"""


def test_link_and_route_events_reach_the_loop():
    """In a private network namespace (no effect on this host's links)."""
    _need(None if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
          else "needs root, unshare and ip")
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", EVENTS],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "('RTM_NEWLINK', 'mon0')" in out.stdout
    assert "('RTM_NEWROUTE', '198.51.100.0')" in out.stdout
