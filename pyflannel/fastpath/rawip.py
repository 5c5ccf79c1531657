"""IP-in-GRE (RFC 2784/2890) and IP-in-IP (RFC 2003) in user space, over a raw IP socket.

``socket(AF_INET, SOCK_RAW, IPPROTO_GRE)`` (or ``IPPROTO_IPIP``) is the whole kernel
interface: a send carries the GRE header and the inner packet and the kernel adds the outer
IPv4 header; a receive returns the datagram with its outer header. Every such socket on
the host sees every datagram of its protocol, so the outer source decides first: only an
address holding a lease gets in, and then by the same per-family rules as the udp backend
(:meth:`UdpReceive.admit4` / ``admit6``: for our subnet, from the sender's subnet, TTL left).

The codecs (:func:`gre_header`, :func:`parse_gre`, :func:`outer_ipv4`) are pure; the
forwarder reuses the udp fast path's peer table, TUN side, counters and control socket and
replaces only the socket side.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from pyflannel.fastpath import counters
from pyflannel.fastpath.forwarder import Forwarder
from pyflannel.fastpath.packet import IPV4_MIN_HEADER
from pyflannel.fastpath.transport import BATCH

IPPROTO_GRE = 47
IPPROTO_IPIP = 4
GRE_CSUM = 0x8000  # C: checksum and reserved1 present (RFC 2784)
GRE_ROUTING = 0x4000  # R: RFC 1701 source routing, long deprecated
GRE_KEY = 0x2000  # K: key present (RFC 2890)
GRE_SEQ = 0x1000  # S: sequence number present (RFC 2890)
GRE_RESERVED0 = 0x0FF8  # strict source route, recursion, flags: must be zero
GRE_VERSION = 0x0007
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
OUTER_IPV4 = 20  # the header the kernel adds (no options)
HEAD_ROOM = 16  # room before the inner packet in the send buffer (GRE: 12 at most)
BUF = 65536 + HEAD_ROOM

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
C = counters.INDEX
UNEXPECTED = C["drop_unexpected_framing"]

# Why a datagram was refused, as counter names.
REFUSED_KEY = "drop_key_mismatch"
REFUSED_CHECKSUM = "drop_bad_checksum"
REFUSED_FRAMING = "drop_unexpected_framing"
REFUSED_TRUNCATED = "drop_truncated"


def fast_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071), as :func:`packet.checksum`, in one big-integer
    operation: 2**16 is 1 modulo 0xFFFF, so the ones' complement sum of the 16-bit words is
    the number the bytes spell, modulo 0xFFFF (0xFFFF for a non-zero multiple)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    total = n % 0xFFFF
    if total == 0 and n:
        total = 0xFFFF
    return ~total & 0xFFFF


def gre_overhead(key: int | None, csum: bool) -> int:
    """Bytes the GRE header adds to each inner packet (outer IPv4 not counted)."""
    return 4 + (4 if csum else 0) + (4 if key is not None else 0)


def gre_header(inner_version: int, key: int | None, csum: bool,
               payload: bytes | bytearray | memoryview = b"") -> bytes:
    """The GRE header for one inner packet: protocol type 0x0800 or 0x86DD, the key when
    there is one, and with ``csum`` the checksum over header and ``payload``."""
    flags = (GRE_CSUM if csum else 0) | (GRE_KEY if key is not None else 0)
    proto = ETH_P_IPV6 if inner_version == 6 else ETH_P_IP
    head = struct.pack("!HH", flags, proto)
    if csum:
        head += b"\0\0\0\0"
    if key is not None:
        head += struct.pack("!I", key)
    if csum:
        value = fast_checksum(bytes(head) + bytes(payload))
        head = head[:4] + struct.pack("!H", value) + head[6:]
    return head


def parse_gre(buf: bytes | bytearray | memoryview, at: int, end: int,
              key: int | None) -> tuple[int, str | None]:
    """(where the inner packet starts, None) for a GRE header at ``buf[at:end]`` that we
    take, or (0, the drop counter's name). Taken: version 0 without routing, reserved bits
    zero, our key (or no key when we have none), a correct checksum when there is one, an
    IPv4 or IPv6 payload."""
    if end - at < 4:
        return 0, REFUSED_TRUNCATED
    flags, proto = _u16(buf, at)[0], _u16(buf, at + 2)[0]
    if flags & (GRE_ROUTING | GRE_RESERVED0 | GRE_VERSION) or proto not in (ETH_P_IP,
                                                                             ETH_P_IPV6):
        return 0, REFUSED_FRAMING
    off = at + 4
    if flags & GRE_CSUM:
        off += 4
    theirs = None
    if flags & GRE_KEY:
        if end - off < 4:
            return 0, REFUSED_TRUNCATED
        theirs = _u32(buf, off)[0]
        off += 4
    if flags & GRE_SEQ:
        off += 4
    if off > end:
        return 0, REFUSED_TRUNCATED
    if theirs != key:
        return 0, REFUSED_KEY
    if flags & GRE_CSUM and fast_checksum(buf[at:end]) != 0:
        return 0, REFUSED_CHECKSUM
    return off, None


def outer_ipv4(buf: bytes | bytearray | memoryview, n: int) -> tuple[int, bytes] | None:
    """(the outer header's length, its source address) of a raw-socket datagram, or None
    when the header is not a usable IPv4 one."""
    if n < IPV4_MIN_HEADER or buf[0] >> 4 != 4:
        return None
    ihl = (buf[0] & 0x0F) * 4
    if ihl < IPV4_MIN_HEADER or ihl > n:
        return None
    return ihl, bytes(buf[12:16])


def open_raw_socket(protocol: int, bind_address: str) -> socket.socket:
    """The raw socket of ``protocol`` (GRE or IPIP) in the family of ``bind_address``, our
    underlay address, bound to it so that what we send leaves from it."""
    family = socket.AF_INET6 if ":" in bind_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_RAW, protocol)
    try:
        sock.bind((bind_address, 0))
    except OSError:
        sock.close()
        raise
    return sock


class RawIpForwarder(Forwarder):
    """TUN <-> raw IP socket, GRE (``protocol`` 47, with ``key`` and ``csum``) or IPIP
    (4: IPv4 inner packets only, no header of its own). The peer table and its rules are
    :class:`Forwarder`'s; the port in its rows is unused."""

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, *, protocol: int = IPPROTO_GRE,
                 key: int | None = None, csum: bool = False, **options) -> None:
        options.update(vnet=False, gso=False, gro=False, vnet1=False, coalesce=False)
        super().__init__(tun_fd, sock, ctl, mem, **options)
        self.protocol, self.key, self.csum = protocol, key, csum
        self._sbuf = bytearray(BUF)
        self._smv = memoryview(self._sbuf)
        self._srd = [self._smv[HEAD_ROOM:]]
        self._rbuf2 = bytearray(BUF)
        self._rmv2 = memoryview(self._rbuf2)
        # Without a checksum, a GRE header is the same for every packet of one family.
        self._fixed = {v: gre_header(v, key, False) for v in (4, 6)}

    def from_tun(self) -> None:
        buf, mv, c = self._sbuf, self._smv, self.c
        fd, rd, readv = self.tun_fd, self._srd, os.readv
        gre = self.protocol == IPPROTO_GRE
        for _ in range(BATCH):
            try:
                n = readv(fd, rd)
            except BlockingIOError:
                break
            end = HEAD_ROOM + n
            pkt = mv[HEAD_ROOM:end]
            version = buf[HEAD_ROOM] >> 4 if n else 0
            if version == 4 and n >= IPV4_MIN_HEADER:
                peer = self.peers.get(_u32(buf, HEAD_ROOM + 16)[0] >> self.shift)
            elif version == 6 and gre and n >= 40:
                peer = self.peers6.get(
                    int.from_bytes(buf[HEAD_ROOM + 24:HEAD_ROOM + 40], "big") >> self.shift6)
            else:
                c[C["drop_not_ip"]] += 1
                continue
            if peer is None:
                self.unreachable(pkt)
                continue
            if gre:
                head = (gre_header(version, self.key, True, pkt) if self.csum
                        else self._fixed[version])
                start = HEAD_ROOM - len(head)
                buf[start:HEAD_ROOM] = head
            else:
                start = HEAD_ROOM
            addr = peer[0]
            try:  # the port of a raw IPv6 socket's address names the protocol: leave it 0
                self.sock.sendto(mv[start:end], (addr[0], 0))
            except OSError:
                c[C["drop_send_error"]] += 1
                continue
            self._count_tx(addr, 1, n)

    def from_udp(self) -> None:
        buf, mv, c = self._rbuf2, self._rmv2, self.c
        recv, sources = self.sock.recvfrom_into, self.sources
        gre, key = self.protocol == IPPROTO_GRE, self.key
        v6 = self.sock.family == socket.AF_INET6
        for _ in range(BATCH):
            try:
                n, sender = recv(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if v6:  # an IPv6 raw socket hands over the payload alone
                ihl, src_ip = 0, sender[0]
            else:
                outer = outer_ipv4(buf, n)
                if outer is None:
                    c[UNEXPECTED] += 1
                    continue
                ihl, src_ip = outer[0], socket.inet_ntoa(outer[1])
            src = sources.get(src_ip)
            if src is None:
                c[C["drop_unknown_source"]] += 1
                continue
            if gre:
                at, why = parse_gre(buf, ihl, n, key)
                if why is not None:
                    self.drop(why)
                    src.stats[5] += 1
                    continue
            elif n <= ihl or buf[ihl] >> 4 != 4:  # IPIP carries IPv4 only
                self.drop(REFUSED_FRAMING)
                src.stats[5] += 1
                continue
            else:
                at = ihl
            before = (c[C["rx_packets"]], c[C["rx_bytes"]])
            self.to_tun(mv[at:n], None, src)
            st = src.stats
            st[2] += c[C["rx_packets"]] - before[0]
            st[3] += c[C["rx_bytes"]] - before[1]
            st[4] = time.monotonic()
