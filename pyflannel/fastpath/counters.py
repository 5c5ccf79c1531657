"""Fast-path counters in shared memory: the forwarder writes, the control plane reads.

A fixed array of unsigned 64-bit integers in a memfd both processes map: reading costs the
fast path nothing, and writing is one ``pack_into`` per batch, not per packet.
"""

from __future__ import annotations

import mmap
import os
import struct

NAMES = (
    "tx_packets",
    "tx_bytes",
    "rx_packets",
    "rx_bytes",
    "drop_no_route",
    "drop_ttl_exceeded",
    "drop_unknown_source",
    "drop_not_ipv4",
    "drop_truncated",
    "drop_bad_header_length",
    "drop_wrong_subnet",
    "drop_spoofed_source",  # inner source outside the sending peer's subnet
    "drop_tun_write",
    "drop_send_error",
    "drop_unexpected_framing",
    "drop_bad_offload",
    "drop_train_incomplete",
    "icmp_unreachable_sent",
    "segmented",  # super-packets cut up (or checksums finished) for flannel-framing peers
)
INDEX = {name: i for i, name in enumerate(NAMES)}
FORMAT = f"={len(NAMES)}Q"
SIZE = struct.calcsize(FORMAT)


def create_shared() -> tuple[int, mmap.mmap]:
    """A memfd holding zeroed counters, and our mapping of it."""
    fd = os.memfd_create("pyflannel-counters", 0)
    os.ftruncate(fd, SIZE)
    return fd, mmap.mmap(fd, SIZE)


def attach(fd: int) -> mmap.mmap:
    return mmap.mmap(fd, SIZE)


def read(mem: mmap.mmap) -> dict[str, int]:
    return dict(zip(NAMES, struct.unpack_from(FORMAT, mem, 0), strict=True))


def write(mem: mmap.mmap, values: list[int]) -> None:
    struct.pack_into(FORMAT, mem, 0, *values)
