"""Pure IP packet helpers for the fast paths: IPv4 and IPv6 validation, TTL and hop
limit, ICMP and ICMPv6 errors.

Functions work on a buffer plus a length so the loop can reuse one preallocated buffer.
"""

from __future__ import annotations

import struct

# IPv4 header fields (offsets from the start of the header), so loops never carry a bare
# index such as ``buf[24]``.
IP_VER_IHL = 0
IP_TOS = 1
IP_TOTAL_LEN = 2  # 2 bytes, big-endian
IP_ID = 4
IP_FRAG = 6  # flags and fragment offset, 2 bytes
IP_TTL = 8
IP_PROTO = 9
IP_CSUM = 10  # 2 bytes
IP_SRC = 12  # 4 bytes
IP_DST = 16  # 4 bytes
IPV4_MIN_HEADER = 20
# IPv6 header fields
V6_PAYLOAD_LEN = 4  # 2 bytes: the length after the 40-byte header
V6_NEXT = 6  # next header (6: TCP, no extension headers)
V6_HOPS = 7
V6_SRC = 8  # 16 bytes, then the destination's 16
IPV6_HEADER_LEN = 40
# TCP header fields (offsets from the start of the TCP header)
TCP_PROTO = 6
TCP_SEQ = 4
TCP_ACK = 8
TCP_DOFF = 12  # data offset, high nibble
TCP_FLAGS = 13
TCP_WINDOW = 14
TCP_CSUM = 16
TCP_MIN_HEADER = 20

ICMP_PROTO = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
# ICMP types that are themselves errors: never answer those with another error (RFC 1122).
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})

# Drop reasons: the names are part of the metrics interface.
NOT_IP = "not_ip"  # neither IPv4 nor IPv6 (empty, or another version); once "not_ipv4"
TRUNCATED = "truncated"
BAD_HEADER_LENGTH = "bad_header_length"


def check_ipv4(buf: bytes | bytearray | memoryview, n: int, at: int = 0) -> str | None:
    """Why the ``n`` bytes at ``buf[at:]`` are not a usable IPv4 packet, or None if they
    are."""
    if n < 1 or buf[at] >> 4 != 4:
        return NOT_IP
    if n < 20:
        return TRUNCATED
    ihl = (buf[at] & 0x0F) * 4
    if ihl < 20:
        return BAD_HEADER_LENGTH
    total = (buf[at + IP_TOTAL_LEN] << 8) | buf[at + IP_TOTAL_LEN + 1]
    if total < ihl:
        return BAD_HEADER_LENGTH
    if total > n or ihl > n:
        return TRUNCATED
    return None


def decrement_ttl(buf: bytearray | memoryview, at: int = 0) -> bool:
    """Decrement the TTL of the packet at ``buf[at:]`` in place with an incremental
    checksum update (RFC 1624).

    Returns False, leaving the packet untouched, when the TTL would reach zero.
    """
    ttl = buf[at + IP_TTL]
    if ttl <= 1:
        return False
    buf[at + IP_TTL] = ttl - 1
    # The TTL is the high byte of header word 4: the word drops by 0x0100, so the
    # one's-complement checksum rises by 0x0100 with end-around carry.
    ck = at + IP_CSUM
    csum = ((buf[ck] << 8) | buf[ck + 1]) + 0x0100
    csum = (csum & 0xFFFF) + (csum >> 16)
    buf[ck] = csum >> 8
    buf[ck + 1] = csum & 0xFF
    return True


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def header_checksum_ok(buf: bytes | bytearray | memoryview) -> bool:
    ihl = (buf[IP_VER_IHL] & 0x0F) * 4
    return checksum(bytes(buf[:ihl])) == 0


def wants_icmp_error(buf: bytes | bytearray | memoryview, n: int) -> bool:
    """May this packet be answered with an ICMP error? Not if it is a non-first fragment,
    an ICMP error itself, or addressed from nowhere."""
    if check_ipv4(buf, n) is not None:
        return False
    if ((buf[IP_FRAG] & 0x1F) << 8 | buf[IP_FRAG + 1]) != 0:  # fragment offset
        return False
    src = bytes(buf[IP_SRC:IP_SRC + 4])
    if src == b"\0\0\0\0" or src[0] >= 224:
        return False
    if buf[IP_PROTO] == ICMP_PROTO:
        ihl = (buf[IP_VER_IHL] & 0x0F) * 4
        if n <= ihl or buf[ihl] in ICMP_ERROR_TYPES:
            return False
    return True


def icmp_net_unreachable(orig: bytes | bytearray | memoryview, n: int, src: bytes) -> bytes:
    """An ICMP destination-unreachable/net-unreachable from ``src`` back to the sender of
    ``orig``, quoting its header and first 8 data bytes as RFC 792 asks."""
    ihl = (orig[IP_VER_IHL] & 0x0F) * 4
    quoted = bytes(orig[: min(n, ihl + 8)])
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quoted)
    struct.pack_into("!H", icmp, 2, checksum(icmp))
    total = 20 + len(icmp)
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, total, 0, 0, 64, ICMP_PROTO, 0, src,
                    bytes(orig[IP_SRC:IP_SRC + 4]))
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr + icmp)


# -- IPv6 -------------------------------------------------------------------------------

V6_DST = V6_SRC + 16
ICMPV6_PROTO = 58
ICMPV6_DEST_UNREACH = 1
ICMPV6_NO_ROUTE = 0
ICMPV6_INFO_MIN = 128  # types below this are errors: never answered with another error
FRAGMENT_HEADER = 44
IPV6_MIN_MTU = 1280  # an ICMPv6 error never exceeds this (RFC 4443 2.4 c)


def ipv6_key(pkt: bytes | bytearray | memoryview, at: int, shift: int) -> int:
    """The peer-table key of the IPv6 address at ``pkt[at:at + 16]``: its top bits."""
    return int.from_bytes(pkt[at:at + 16], "big") >> shift


def check_ipv6(buf: bytes | bytearray | memoryview, n: int, at: int = 0) -> str | None:
    """Why the ``n`` bytes at ``buf[at:]`` are not a usable IPv6 packet, or None if they
    are."""
    if n < 1 or buf[at] >> 4 != 6:
        return NOT_IP
    if n < IPV6_HEADER_LEN:
        return TRUNCATED
    if ipv6_total(buf, at) > n:
        return TRUNCATED
    return None


def ipv6_total(buf: bytes | bytearray | memoryview, at: int = 0) -> int:
    """The length of the IPv6 packet at ``buf[at:]`` by its header (no jumbograms here:
    they need 64 KiB+)."""
    return IPV6_HEADER_LEN + ((buf[at + V6_PAYLOAD_LEN] << 8) | buf[at + V6_PAYLOAD_LEN + 1])


def decrement_hop_limit(buf: bytearray | memoryview, at: int = 0) -> bool:
    """Count the hop limit of the packet at ``buf[at:]`` down in place (IPv6 has no header
    checksum to fix); False, leaving the packet untouched, when it would reach zero."""
    hops = buf[at + V6_HOPS]
    if hops <= 1:
        return False
    buf[at + V6_HOPS] = hops - 1
    return True


def wants_icmpv6_error(buf: bytes | bytearray | memoryview, n: int) -> bool:
    """May this IPv6 packet be answered with an ICMPv6 error (RFC 4443 2.4 e)? Not if it
    is an ICMPv6 error itself, a non-first fragment, or from or to no single host."""
    if check_ipv6(buf, n) is not None:
        return False
    src = bytes(buf[V6_SRC:V6_SRC + 16])
    if src == bytes(16) or src[0] == 0xFF or buf[V6_DST] == 0xFF:
        return False
    nxt = buf[V6_NEXT]
    if nxt == ICMPV6_PROTO:
        return n > IPV6_HEADER_LEN and buf[IPV6_HEADER_LEN] >= ICMPV6_INFO_MIN
    if nxt == FRAGMENT_HEADER:
        at = IPV6_HEADER_LEN + 2  # the fragment offset, above three flag bits
        return n >= at + 2 and ((buf[at] << 8) | buf[at + 1]) >> 3 == 0
    return True


def icmpv6_no_route(orig: bytes | bytearray | memoryview, n: int, src: bytes) -> bytes:
    """An ICMPv6 destination-unreachable/no-route from ``src`` back to the sender of
    ``orig``, quoting as much of it as fits in the IPv6 minimum MTU (RFC 4443 3.1)."""
    room = IPV6_MIN_MTU - IPV6_HEADER_LEN - 8
    quoted = bytes(orig[:min(n, room)])
    dst = bytes(orig[V6_SRC:V6_SRC + 16])
    body = bytearray(struct.pack("!BBHI", ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE, 0, 0)
                     + quoted)
    pseudo = src + dst + struct.pack("!I3xB", len(body), ICMPV6_PROTO)
    struct.pack_into("!H", body, 2, checksum(pseudo + bytes(body)))
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(body), ICMPV6_PROTO, 64, src, dst)
    return hdr + bytes(body)
