"""TUN devices through python-pytun."""

from __future__ import annotations

import errno
import os
import time

import pytun


class TunError(RuntimeError):
    """The TUN device could not be created (no /dev/net/tun, no permission, name in use)."""


def open_tun(name: str, wait_busy_s: float = 3.0) -> pytun.TunTapDevice:
    """Create (or attach to) TUN ``name`` without the packet-information header.

    A daemon restarted right after a crash may find the name still held by the old fast
    path for a moment (EBUSY); wait for it rather than fail.
    """
    deadline = time.monotonic() + wait_busy_s
    while True:
        try:
            dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as e:
            msg = str(e.args[-1]) if e.args else str(e)
            busy = e.errno == errno.EBUSY or "busy" in msg.lower()
            if busy and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise TunError(f"cannot create TUN device {name}: {msg}") from None
        os.set_blocking(dev.fileno(), False)
        return dev
