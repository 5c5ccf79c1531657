"""TUN devices through python-pytun, optionally with virtio-net headers and offloads."""

from __future__ import annotations

import errno
import fcntl
import os
import time

import pytun

TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01  # we accept packets with partial checksums
TUN_F_TSO4 = 0x02  # ... and TCP super-packets over IPv4
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08


class TunError(RuntimeError):
    """The TUN device could not be created (no /dev/net/tun, no permission, name in use)."""


def open_tun(name: str, *, vnet: bool = False, offloads: bool = True,
             wait_busy_s: float = 3.0) -> pytun.TunTapDevice:
    """Create (or attach to) TUN ``name`` without the packet-information header.

    With ``vnet`` every read and write carries a 10-byte virtio-net header and the kernel may
    hand us TCP super-packets of up to 64 KiB with partial checksums (TSO/checksum offload),
    which is how the fast framing moves a 64 KiB TCP burst in one system call. Without
    ``offloads`` the header stays (writes may still be super-packets) but reads are plain,
    finished packets.

    A daemon restarted right after a crash may find the name still held by the old fast
    path for a moment (EBUSY); wait for it rather than fail.
    """
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet else 0)
    deadline = time.monotonic() + wait_busy_s
    while True:
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e:
            msg = str(e.args[-1]) if e.args else str(e)
            busy = e.errno == errno.EBUSY or "busy" in msg.lower()
            if busy and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise TunError(f"cannot create TUN device {name}: {msg}") from None
        if vnet and offloads:
            try:
                fcntl.ioctl(dev.fileno(), TUNSETOFFLOAD,
                            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            except OSError as e:
                dev.close()
                raise TunError(f"cannot enable offloads on {name}: {e.strerror}") from None
        os.set_blocking(dev.fileno(), False)
        return dev


def set_overlay_ipv6(name: str, carries_ipv6: bool) -> None:
    """IPv6 on an overlay TUN: with IPv6 inside, no link-local address and no router
    solicitations of its own; without, IPv6 off, so the kernel's chatter stays out of the
    drop counters. Best effort: a kernel without IPv6 has no knob to turn."""
    settings = {"addr_gen_mode": "1", "accept_ra": "0"} if carries_ipv6 else {
        "disable_ipv6": "1"}
    for key, value in settings.items():
        try:
            with open(f"/proc/sys/net/ipv6/conf/{name}/{key}", "w") as f:
                f.write(value)
        except OSError:
            pass
