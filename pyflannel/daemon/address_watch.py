"""Following the node's address when it changes under the daemon (DHCP renumbering, a VM
moved to another network).

Netlink link and address events wake the watch; it reads the external interface again and
asks :func:`pyflannel.host.extaddr.judge` what the change means. A change to follow is
handed to ``follow`` (the daemon rebinds the data path and republishes the lease), retried
until it works; meanwhile, and while the interface or a pinned address is gone, the node
is not ready. Each new situation is said in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from pyflannel.backoff import Backoff
from pyflannel.host.extaddr import Pins, Verdict, judge, read_interface
from pyflannel.host.monitor import ADDRESS_EVENTS, NetlinkMonitor
from pyflannel.host.netlink import ExternalInterface
from pyflannel.host.nlsession import run_netlink
from pyflannel.logutil import RateLimitedLog

log = logging.getLogger("pyflannel.address")

CHECK_EVERY_S = 10.0  # safety net behind the netlink events
DEBOUNCE_S = 0.05  # "ip addr del" and "ip addr add" a moment apart are one change


class AddressWatch:
    """Keeps the data path and the lease on the external interface's current address."""

    def __init__(self, ext: ExternalInterface, pins: Pins,
                 follow: Callable[[ExternalInterface], Awaitable[None]], *,
                 want_ipv4: bool, want_ipv6: bool, patterns: Sequence[str] = ()) -> None:
        self.running = ext  # the interface the data path and the lease use
        self.pins = pins
        self.follow = follow
        self.want_ipv4, self.want_ipv6, self.patterns = want_ipv4, want_ipv6, patterns
        self.verdict = Verdict("same")
        self.changes = 0  # changes followed, for tests and the log
        self._errors = RateLimitedLog(log)
        self._backoff = Backoff(0.5, 5.0)
        self._retry_in: float | None = None

    @property
    def settled(self) -> bool:
        """False while the node runs on an address it no longer has."""
        return self.verdict.settled

    async def run(self) -> None:
        dirty = asyncio.Event()
        monitor = NetlinkMonitor(asyncio.get_running_loop(), lambda _k, _w: dirty.set(),
                                 ADDRESS_EVENTS)
        try:
            monitor.start()
            await self.check()  # a change between start-up and now
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(dirty.wait(), self._retry_in or CHECK_EVERY_S)
                await asyncio.sleep(DEBOUNCE_S)
                dirty.clear()
                await self.check()
        finally:
            monitor.stop()

    async def check(self) -> None:
        """Read the interface, judge, and carry out the verdict."""
        seen = await run_netlink(read_interface, self.running.name)
        verdict = judge(self.running, seen, self.pins, want_ipv4=self.want_ipv4,
                        want_ipv6=self.want_ipv6, patterns=self.patterns)
        before, self.verdict = self.verdict, verdict
        if verdict.kind == "same":
            self._retry_in = None
            if not before.settled:
                log.info("interface %s is usable again on %s; ready", self.running.name,
                         self.running.address if self.want_ipv4 else self.running.address6)
            return
        if verdict.kind != "moved":
            if verdict.line != before.line:
                log.warning("%s (not ready)", verdict.line)
            return
        assert verdict.ext is not None
        if verdict.line != before.line:
            log.warning("%s: moving the data path and the lease to it (not ready meanwhile)",
                        verdict.line)
        started = time.monotonic()
        try:
            await self.follow(verdict.ext)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - retried until it works
            self._retry_in = self._backoff.next()
            self._errors.error("follow", "cannot move to the new address yet: %s; retrying "
                               "in %.1fs", " ".join(str(e).split())[:300] or type(e).__name__,
                               self._retry_in)
            return
        self.running, self.verdict, self._retry_in = verdict.ext, Verdict("same"), None
        self._backoff.reset()
        self.changes += 1
        self._errors.clear("follow", "moved to the new address")
        log.info("now on %s: lease republished, data path moved in %.2fs; ready",
                 _addresses(verdict.ext, self.want_ipv4, self.want_ipv6),
                 time.monotonic() - started)


def _addresses(ext: ExternalInterface, v4: bool, v6: bool) -> str:
    parts = [f"{ext.name} {ext.address}"] if v4 else [ext.name]
    if v6:
        parts.append(str(ext.address6))
    return " ".join(parts)
