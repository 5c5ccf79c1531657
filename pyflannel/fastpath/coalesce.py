"""GRO in user space: consecutive TCP segments of one flow written to the TUN as one
super-packet with a virtio-net header, instead of one write each.

The kernel then handles the super-packet as its own GRO would have made it: one trip
through the stack (one ACK decision, one socket wake-up) for up to 64 KiB. Used by every
framing whose datagrams carry one packet each (WireGuard, flannel's).

:func:`flow_run` applies the kernel's TCP GRO rules on the headers. The kernel's GRO also
merges only segments whose checksum it has verified, and a joined super-packet is written
for a fresh checksum (``F_NEEDS_CSUM``), so a corrupted segment would be accepted. So the
framing passes only segments whose integrity is already known, each by what guarantees it:

* WireGuard: the AEAD tag, checked on decryption, covers every byte of the inner packet;
* flannel's framing: the outer UDP checksum, verified by the kernel, when it is not zero.
  UDP GRO merges only datagrams with a non-zero checksum it has verified, so a GRO run's
  packets are intact; a datagram that came alone may have had a zero checksum (none at all
  over IPv4), so its segment must pass :func:`joinable` first, or is not joined.

Under these, a merged packet is one the kernel would have merged itself.

``packets`` is a list of ``(packet bytes, owner)``; only packets of the same owner (the
peer they came from, compared by identity) are merged.
"""

from __future__ import annotations

import struct

from pyflannel.fastpath.frames import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET,
    VNET_LEN,
    ones_sum,
)
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
    IPV6_HEADER_LEN,
    TCP_ACK,
    TCP_CSUM,
    TCP_DOFF,
    TCP_FLAGS,
    TCP_PROTO,
    TCP_SEQ,
    TCP_WINDOW,
    V6_HOPS,
    V6_NEXT,
    V6_PAYLOAD_LEN,
    V6_SRC,
)

TCP_AT = IPV4_MIN_HEADER  # the TCP header, after an IPv4 header without options
TCP_ACK_ONLY = 0x10
TCP_ACK_PSH = 0x18
IPV4_VERSION_IHL5 = 0x45
IPV6_HEADER = IPV6_HEADER_LEN
COALESCE_MAX = 65000  # a joined super-packet stays below 64 KiB with its headers

_u16 = struct.Struct("!H")


def _layout(pkt) -> tuple[int, int, bytes] | None:
    """(TCP header offset, start of the flow key, bytes the IP headers of one flow share)
    for a TCP segment GRO can take: IPv4 without options or fragments, or IPv6 without
    extension headers; None otherwise."""
    if len(pkt) < TCP_AT + 20:
        return None
    if pkt[IP_VER_IHL] == IPV4_VERSION_IHL5:
        at, flow_at = TCP_AT, IP_SRC
    elif pkt[IP_VER_IHL] >> 4 == 6 and len(pkt) >= IPV6_HEADER + 20:
        at, flow_at = IPV6_HEADER, V6_SRC
    else:
        return None
    shared = _shared(pkt, at)
    return None if shared is None else (at, flow_at, shared)


def _shared(pkt, at: int) -> bytes | None:
    """What two segments' IP headers must have in common to be joined."""
    if at == TCP_AT:
        if (pkt[IP_VER_IHL] != IPV4_VERSION_IHL5 or pkt[IP_PROTO] != TCP_PROTO
                or pkt[IP_FRAG] & 0x3F or pkt[IP_FRAG + 1]):
            return None
        return bytes((pkt[IP_TOS], pkt[IP_TTL]))
    if pkt[IP_VER_IHL] >> 4 != 6 or pkt[V6_NEXT] != TCP_PROTO:
        return None
    return bytes(pkt[:V6_PAYLOAD_LEN]) + bytes((pkt[V6_HOPS],))


def joinable(pkt) -> bool:
    """False for a TCP segment with data whose checksum fails: the segment the kernel's
    GRO would not merge. (Segments without data, and packets :func:`flow_run` never
    joins, need no check.) Costs one pass over the data at C speed."""
    n = len(pkt)
    if n and pkt[IP_VER_IHL] == IPV4_VERSION_IHL5:
        if (n < TCP_AT + 20 or pkt[IP_PROTO] != TCP_PROTO
                or pkt[IP_FRAG] & 0x3F or pkt[IP_FRAG + 1]):
            return True
        at, addresses = TCP_AT, pkt[IP_SRC:IP_DST + 4]
    elif n and pkt[IP_VER_IHL] >> 4 == 6:
        if n < IPV6_HEADER + 20 or pkt[V6_NEXT] != TCP_PROTO:
            return True
        at, addresses = IPV6_HEADER, pkt[V6_SRC:IPV6_HEADER]
    else:
        return True
    if n <= at + (pkt[at + TCP_DOFF] >> 4) * 4:
        return True
    # one's-complement sum of pseudo-header and segment, modulo 0xFFFF (as ones_sum: the
    # data read little-endian is its byte-swapped sum, times 256 swaps it back); a correct
    # checksum makes it 0, as the kernel's check does
    data = int.from_bytes(pkt[at:], "little") % 0xFFFF * 256
    return (data + int.from_bytes(addresses, "big") + TCP_PROTO + n - at) % 0xFFFF == 0


def flow_run(packets: list, i: int) -> tuple[int, int]:
    """(end, bytes) of the run of TCP segments from ``i`` that one super-packet can
    carry, as the kernel's TCP GRO decides: same peer and flow, 20-byte IPv4 headers
    with equal TOS and TTL, no fragments, equal TCP options, ack and window,
    contiguous sequence numbers, equal sizes (the last may be shorter), ACK only (PSH
    allowed on the last)."""
    first, peer = packets[i]
    size = len(first)
    n = len(packets)
    layout = _layout(first) if i + 1 < n else None
    if layout is None:
        return i + 1, size
    at, flow_at, _shared_bytes = layout
    # the IP header bytes every segment of the flow repeats: version and TOS (IPv4) or
    # version, traffic class and flow label (IPv6); then from byte 6: IPv4 fragment
    # field (DF, offset 0), TTL and protocol, or IPv6 next header and hop limit
    ip_a = first[:2] if at == TCP_AT else first[:V6_PAYLOAD_LEN]
    ip_b = first[IP_FRAG:IP_CSUM] if at == TCP_AT else first[V6_NEXT:V6_SRC]
    if first[at + TCP_FLAGS] != TCP_ACK_ONLY:
        return i + 1, size
    hl = at + (first[at + TCP_DOFF] >> 4) * 4
    mss = size - hl
    if mss <= 0 or hl < at + 20:
        return i + 1, size
    flow = first[flow_at:at + TCP_SEQ]  # addresses and ports
    ack_doff = first[at + TCP_ACK:at + TCP_FLAGS]
    window = first[at + TCP_WINDOW:at + TCP_CSUM]
    opts = first[at + 20:hl]
    seq = int.from_bytes(first[at + TCP_SEQ:at + TCP_ACK], "big") + mss
    total = size
    j = i + 1
    while j < n:
        p, q = packets[j]
        plen = len(p) - hl
        if (q is not peer or plen <= 0 or plen > mss or total + plen > COALESCE_MAX
                or not p.startswith(flow, flow_at)
                or not p.startswith((seq & 0xFFFFFFFF).to_bytes(4, "big"), at + TCP_SEQ)
                or not p.startswith(ack_doff, at + TCP_ACK)
                or not p.startswith(window, at + TCP_WINDOW)
                or (opts and not p.startswith(opts, at + 20))
                or not p.startswith(ip_a) or not p.startswith(ip_b, IP_FRAG)):
            break
        flags = p[at + TCP_FLAGS]
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
    headers (length, IPv4 checksum, PSH of the last, partial TCP checksum) in one piece,
    then every segment's payload."""
    first = packets[i][0]
    v6 = first[IP_VER_IHL] >> 4 == 6
    at = IPV6_HEADER if v6 else TCP_AT
    hl = at + (first[at + TCP_DOFF] >> 4) * 4
    head = bytearray(VNET_LEN + hl)
    VNET.pack_into(head, 0, F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hl,
                   len(first) - hl, at, TCP_CSUM)
    head[VNET_LEN:] = first[:hl]
    ip = VNET_LEN
    if v6:
        _u16.pack_into(head, ip + V6_PAYLOAD_LEN, size - IPV6_HEADER)
        addresses = first[V6_SRC:IPV6_HEADER]
    else:
        _u16.pack_into(head, ip + IP_TOTAL_LEN, size)
        head[ip + IP_CSUM] = head[ip + IP_CSUM + 1] = 0
        _u16.pack_into(head, ip + IP_CSUM, ~ones_sum(head[ip:ip + TCP_AT]) & 0xFFFF)
        addresses = first[IP_SRC:IP_DST + 4]
    head[ip + at + TCP_FLAGS] = packets[j - 1][0][at + TCP_FLAGS]
    # partial checksum: the pseudo-header sum; the kernel adds the rest
    pseudo = (int.from_bytes(addresses, "big") + TCP_PROTO + size - at) % 0xFFFF
    _u16.pack_into(head, ip + at + TCP_CSUM, pseudo or 0xFFFF)
    return [head, *[memoryview(p)[hl:] for p, _ in packets[i:j]]]
