"""GRO in user space: consecutive TCP segments of one flow written to the TUN as one
super-packet with a virtio-net header, instead of one write each.

The kernel then handles the super-packet as its own GRO would have made it: one trip
through the stack (one ACK decision, one socket wake-up) for up to 64 KiB. Used by every
framing whose datagrams carry one packet each (WireGuard, flannel's). The rules are the
kernel's TCP GRO rules, so a merged packet is one the kernel would have merged itself.

``packets`` is a list of ``(packet bytes, owner)``; only packets of the same owner (the
peer they came from, compared by identity) are merged.
"""

from __future__ import annotations

import struct

from pyflannel.fastpath.frames import F_NEEDS_CSUM, GSO_TCPV4, VNET, VNET_LEN, ones_sum
from pyflannel.fastpath.packet import (
    IP_CSUM,
    IP_DST,
    IP_FRAG,
    IP_PROTO,
    IP_SRC,
    IP_TOS,
    IP_TOTAL_LEN,
    IP_TTL,
    IP_VER_IHL,
    IPV4_MIN_HEADER,
    TCP_ACK,
    TCP_CSUM,
    TCP_DOFF,
    TCP_FLAGS,
    TCP_PROTO,
    TCP_SEQ,
    TCP_WINDOW,
)

TCP_AT = IPV4_MIN_HEADER  # the TCP header, after an IPv4 header without options
TCP_ACK_ONLY = 0x10
TCP_ACK_PSH = 0x18
IPV4_VERSION_IHL5 = 0x45
COALESCE_MAX = 65000  # a joined super-packet stays below 64 KiB with its headers

_u16 = struct.Struct("!H")


def flow_run(packets: list, i: int) -> tuple[int, int]:
    """(end, bytes) of the run of TCP segments from ``i`` that one super-packet can
    carry, as the kernel's TCP GRO decides: same peer and flow, 20-byte IPv4 headers
    with equal TOS and TTL, no fragments, equal TCP options, ack and window,
    contiguous sequence numbers, equal sizes (the last may be shorter), ACK only (PSH
    allowed on the last)."""
    first, peer = packets[i]
    size = len(first)
    n = len(packets)
    if (i + 1 >= n or size < TCP_AT + 20 or first[IP_VER_IHL] != IPV4_VERSION_IHL5
            or first[IP_PROTO] != TCP_PROTO or first[TCP_AT + TCP_FLAGS] != TCP_ACK_ONLY
            or first[IP_FRAG] & 0x3F or first[IP_FRAG + 1]):
        return i + 1, size
    hl = TCP_AT + (first[TCP_AT + TCP_DOFF] >> 4) * 4
    mss = size - hl
    if mss <= 0 or hl < TCP_AT + 20:
        return i + 1, size
    flow = first[IP_SRC:TCP_AT + TCP_SEQ]  # addresses and ports
    ack_doff = first[TCP_AT + TCP_ACK:TCP_AT + TCP_FLAGS]
    window = first[TCP_AT + TCP_WINDOW:TCP_AT + TCP_CSUM]
    opts = first[TCP_AT + 20:hl]
    tos_ttl = (first[IP_TOS], first[IP_TTL])
    seq = int.from_bytes(first[TCP_AT + TCP_SEQ:TCP_AT + TCP_ACK], "big") + mss
    total = size
    j = i + 1
    while j < n:
        p, q = packets[j]
        plen = len(p) - hl
        if (q is not peer or plen <= 0 or plen > mss or p[IP_VER_IHL] != IPV4_VERSION_IHL5
                or total + plen > COALESCE_MAX
                or not p.startswith(flow, IP_SRC)
                or not p.startswith((seq & 0xFFFFFFFF).to_bytes(4, "big"),
                                    TCP_AT + TCP_SEQ)
                or not p.startswith(ack_doff, TCP_AT + TCP_ACK)
                or not p.startswith(window, TCP_AT + TCP_WINDOW)
                or (opts and not p.startswith(opts, TCP_AT + 20))
                or (p[IP_TOS], p[IP_TTL]) != tos_ttl
                or p[IP_FRAG] & 0x3F or p[IP_FRAG + 1]):
            break
        flags = p[TCP_AT + TCP_FLAGS]
        if flags != TCP_ACK_ONLY and flags != TCP_ACK_PSH:
            break
        total += plen
        seq += plen
        j += 1
        if plen < mss or flags == TCP_ACK_PSH:
            break  # a short or pushed segment ends a super-packet
    return j, total

def join(packets: list, i: int, j: int, size: int) -> list:
    """The gather list for one super-packet: virtio-net header and the first segment's
    headers (length, IP checksum, PSH of the last, partial TCP checksum) in one piece,
    then every segment's payload."""
    first = packets[i][0]
    hl = TCP_AT + (first[TCP_AT + TCP_DOFF] >> 4) * 4
    head = bytearray(VNET_LEN + hl)
    VNET.pack_into(head, 0, F_NEEDS_CSUM, GSO_TCPV4, hl, len(first) - hl, TCP_AT,
                   TCP_CSUM)
    head[VNET_LEN:] = first[:hl]
    ip = VNET_LEN
    _u16.pack_into(head, ip + IP_TOTAL_LEN, size)
    head[ip + IP_CSUM] = head[ip + IP_CSUM + 1] = 0
    _u16.pack_into(head, ip + IP_CSUM, ~ones_sum(head[ip:ip + TCP_AT]) & 0xFFFF)
    head[ip + TCP_AT + TCP_FLAGS] = packets[j - 1][0][TCP_AT + TCP_FLAGS]
    # partial checksum: the pseudo-header sum; the kernel adds the rest
    pseudo = (int.from_bytes(first[IP_SRC:IP_DST + 4], "big") + TCP_PROTO
              + size - TCP_AT) % 0xFFFF
    _u16.pack_into(head, ip + TCP_AT + TCP_CSUM, pseudo or 0xFFFF)
    return [head, *[memoryview(p)[hl:] for p, _ in packets[i:j]]]
