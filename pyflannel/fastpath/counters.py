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
    "drop_not_ip",  # neither IPv4 nor IPv6, or empty (metrics also show it as not_ipv4)
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
    # WireGuard (the wireguard backend): refusals by reason, as Device.drops names them
    # (its "no_route" is drop_no_route and its "inner_src" drop_spoofed_source above) ...
    "drop_malformed",
    "drop_bad_mac1",
    "drop_bad_mac2",
    "drop_unknown_peer",  # a handshake from a key that holds no lease
    "drop_unknown_index",
    "drop_bad_auth",  # failed decryption: forged, corrupted or for a forgotten session
    "drop_replay",
    "drop_handshake_replay",
    "drop_handshake_flood",
    "drop_stale_key",
    "drop_bad_cookie",
    "drop_inner_malformed",
    "drop_no_endpoint",
    "drop_staged_overflow",
    "drop_rate_limited",
    "drop_internal_error",
    # ... and protocol events, as Device.stats names them.
    "wg_handshakes_completed",
    "wg_initiations_sent",
    "wg_initiations_received",
    "wg_responses_sent",
    "wg_responses_received",
    "wg_initiation_retransmits",
    "wg_handshakes_abandoned",
    "wg_handshakes_for_silence",
    "wg_cookie_replies_sent",
    "wg_cookie_replies_received",
    "wg_keepalives_sent",
    "wg_keepalives_received",
    "coalesced",  # TCP segments joined into super-packets before the TUN write (the
    # framings with one packet per datagram: WireGuard, flannel's on a vnet TUN)
    # The IPv6 share of tx/rx above (the udp backend; IPv4 is the rest).
    "tx_packets_ipv6",
    "tx_bytes_ipv6",
    "rx_packets_ipv6",
    "rx_bytes_ipv6",
    # WireGuard under a handshake flood: handshake messages over the loop's per-turn
    # budget, datagrams the kernel dropped for the socket (its filter refused their shape
    # or shed them, or the queue was full), and cookie replies not sent (global limit).
    "drop_handshake_budget",
    "drop_socket",
    "wg_cookie_replies_limited",
    # gre: a datagram from a peer with another key (or none), or a wrong GRE checksum.
    "drop_key_mismatch",
    "drop_bad_checksum",
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
