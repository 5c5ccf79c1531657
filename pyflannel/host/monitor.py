"""Netlink link and route events, delivered to the asyncio loop.

flanneld polls and so loses routes on a link flap until its next pass; we listen instead.
A thread blocks on the netlink socket (pyroute2's synchronous API) and wakes the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_LINK

log = logging.getLogger("pyflannel.monitor")


class NetlinkMonitor:
    """Calls ``on_event(kind, name_or_dst)`` in the loop for every link or IPv4 route event."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_event: Callable[[str, str], None]) -> None:
        self.loop = loop
        self.on_event = on_event
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="netlink-monitor", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(2)

    def stop(self) -> None:
        self._stop.set()  # the thread is a daemon: it ends with us if still blocked

    def _run(self) -> None:
        try:
            with IPRoute() as ipr:
                ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_ROUTE)
                self._ready.set()
                while not self._stop.is_set():
                    for msg in ipr.get():
                        kind = msg.get("event", "")
                        what = msg.get("ifname") or str(msg.get("dst") or "")
                        if self._stop.is_set():
                            return
                        self.loop.call_soon_threadsafe(self.on_event, kind, what)
        except Exception as e:  # noqa: BLE001 - the periodic reconcile still covers us
            log.warning("netlink monitor stopped: %s; falling back to periodic checks", e)
        finally:
            self._ready.set()
