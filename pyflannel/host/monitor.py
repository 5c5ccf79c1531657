"""Netlink link and route events, delivered to the asyncio loop.

flanneld polls and so loses routes on a link flap until its next pass; we listen instead.
A thread waits on a plain netlink socket and an eventfd, parses messages with pyroute2's
marshal and wakes the loop. The eventfd lets ``stop`` end the thread at once, and the
thread closes both fds on its way out, so a restarted backend leaks neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger("pyflannel.monitor")

RCVBUF = 4 << 20  # a burst of route changes (a peer table of hundreds) must not overflow
OVERFLOW = "overflow"  # events were lost (ENOBUFS): the listener must check everything
ROUTE_EVENTS = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE  # what backends keep
ADDRESS_EVENTS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR  # the node's address


class NetlinkMonitor:
    """Calls ``on_event(kind, name_or_dst)`` in the loop for every event of ``groups``: by
    default link and route events (both families: dual-stack backends keep IPv6 routes
    too); ``ADDRESS_EVENTS`` for links and addresses."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_event: Callable[[str, str], None], groups: int = ROUTE_EVENTS) -> None:
        self.loop = loop
        self.on_event = on_event
        self.groups = groups
        self._stop = threading.Event()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="netlink-monitor", daemon=True)
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Subscribe before returning, so no event after ``start`` is missed."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
            try:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                sock.bind((0, self.groups))
            except OSError:
                sock.close()
                raise
        except OSError as e:  # the periodic reconcile still covers us
            log.warning("netlink monitor not started: %s; falling back to periodic checks", e)
            self._close_fds()
            return
        self._sock = sock
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """End the thread and release the socket and eventfd; safe to call twice."""
        self._stop.set()
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_fds()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _close_fds(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._sock is not None:
                self._sock.close()
            os.close(self._wake)

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        marshal = MarshalRtnl()
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while not self._stop.is_set():
                ready = {fd for fd, _ev in poller.poll()}
                if self._wake in ready or self._stop.is_set():
                    return
                try:
                    data = sock.recv(1 << 16)
                except OSError as e:
                    if e.errno == errno.ENOBUFS:  # the kernel dropped events for us
                        self._emit(OVERFLOW, "")
                        continue
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    raise
                for msg in marshal.parse(data):
                    self._emit(str(msg.get("event", "")),
                               msg.get("ifname") or str(msg.get("dst") or ""))
        except Exception as e:  # noqa: BLE001 - the periodic reconcile still covers us
            log.warning("netlink monitor stopped: %s; falling back to periodic checks", e)
        finally:
            self._close_fds()

    def _emit(self, kind: str, what: str) -> None:
        if self._stop.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self.loop.call_soon_threadsafe(self.on_event, kind, what)
