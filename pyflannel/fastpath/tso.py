"""TCP segmentation as TSO does it, one segment at a time, for a framing that seals each
segment straight into its send buffer (the WireGuard fast path).

:func:`frames.segment_tcp4`/``segment_tcp6`` are the plain reference (whole packets, the
checksum summed per segment). :class:`TcpCut` gives the same segments, padded as the
framing asks, a group at a time: the headers are a template copied per segment with only
the changing fields written, and both checksums come from sums of the constant parts
computed once, so per segment only its data is summed.
"""

from __future__ import annotations

import struct

from pyflannel.fastpath.frames import FrameError
from pyflannel.fastpath.packet import (
    IP_CSUM,
    IP_DST,
    IP_ID,
    IP_PROTO,
    IP_SRC,
    IP_TOTAL_LEN,
    IP_VER_IHL,
    IPV4_MIN_HEADER,
    IPV6_HEADER_LEN,
    TCP_CSUM,
    TCP_DOFF,
    TCP_FLAGS,
    TCP_PROTO,
    TCP_SEQ,
    V6_NEXT,
    V6_PAYLOAD_LEN,
    V6_SRC,
)

TCP_MIN_HEADER = 20
TCP_FIN_PSH = 0x09  # only on the last segment of a super-packet
TCP_CWR = 0x80  # only on the first
_ZEROS = bytes(8)
_pack_ip = struct.Struct("!HH").pack_into  # IPv4 total length, ID
_pack_seq = struct.Struct("!I").pack_into
_pack16 = struct.Struct("!H").pack_into
_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from


class TcpCut:
    """One TCP super-packet (IPv4, or IPv6 without extension headers) and its ``count``
    segments of at most ``mss`` data bytes; :meth:`plaintexts` builds them.

    Raises FrameError for anything that is not such a packet or whose lengths disagree.
    """

    __slots__ = ("pkt", "mss", "v6", "ihl", "hl", "total", "count", "_head", "_seq0",
                 "_id0", "_flags", "_ip_base", "_tcp_base")

    def __init__(self, pkt: memoryview, mss: int) -> None:
        n = len(pkt)
        v6 = n > 0 and pkt[IP_VER_IHL] >> 4 == 6
        if v6:
            if n < IPV6_HEADER_LEN + TCP_MIN_HEADER or pkt[V6_NEXT] != TCP_PROTO or mss <= 0:
                raise FrameError("super-packet is not IPv6/TCP")
            ihl = IPV6_HEADER_LEN
            total = ihl + _u16(pkt, V6_PAYLOAD_LEN)[0]
        else:
            if (n < IPV4_MIN_HEADER + TCP_MIN_HEADER or pkt[IP_VER_IHL] >> 4 != 4
                    or pkt[IP_PROTO] != TCP_PROTO or mss <= 0):
                raise FrameError("super-packet is not IPv4/TCP")
            ihl = (pkt[IP_VER_IHL] & 0x0F) * 4
            total = _u16(pkt, IP_TOTAL_LEN)[0]
        doff = (pkt[ihl + TCP_DOFF] >> 4) * 4 if n > ihl + TCP_DOFF else 0
        hl = ihl + doff
        if ihl < IPV4_MIN_HEADER or doff < TCP_MIN_HEADER or total > n or total < hl:
            raise FrameError("super-packet has inconsistent header lengths")
        self.pkt, self.mss, self.v6, self.ihl, self.hl, self.total = pkt, mss, v6, ihl, hl, total
        self.count = max(1, -(-(total - hl) // mss))
        head = bytearray(pkt[:hl])
        self._seq0 = _u32(head, ihl + TCP_SEQ)[0]
        self._id0 = 0 if v6 else _u16(head, IP_ID)[0]
        self._flags = head[ihl + TCP_FLAGS]
        # sums of the parts that stay put (the changing fields zeroed), mod 0xFFFF
        varying = ((V6_PAYLOAD_LEN, 2),) if v6 else ((IP_TOTAL_LEN, 2), (IP_ID, 2), (IP_CSUM, 2))
        for at, size in (*varying, (ihl + TCP_SEQ, 4), (ihl + TCP_FLAGS, 1),
                         (ihl + TCP_CSUM, 2)):
            head[at:at + size] = _ZEROS[:size]
        self._head = head
        self._ip_base = 0 if v6 else int.from_bytes(head[:ihl], "big") % 0xFFFF
        addresses = head[V6_SRC:IPV6_HEADER_LEN] if v6 else head[IP_SRC:IP_DST + 4]
        self._tcp_base = (int.from_bytes(head[ihl:hl], "big") + int.from_bytes(addresses, "big")
                          + TCP_PROTO + doff) % 0xFFFF

    def length(self, g: int) -> int:
        """Segment ``g``'s size, headers included (all but the last carry ``mss`` bytes)."""
        return self.hl + min(self.mss, self.total - self.hl - g * self.mss)

    def plaintexts(self, i: int, k: int, pad: bytes) -> list[bytes]:
        """Segments ``i`` to ``i + k - 1``, each as its headers, its data and ``pad``
        joined (the headers: lengths, IPv4 ID and checksum, sequence number, flags - CWR on
        the first segment only, FIN and PSH on the last only - and the TCP checksum)."""
        pkt, head, hl, mss, ihl, total = (self.pkt, self._head, self.hl, self.mss, self.ihl,
                                          self.total)
        v6, id0, seq0, flags0, last = self.v6, self._id0, self._seq0, self._flags, self.count - 1
        ip_base, tcp_base = self._ip_base, self._tcp_base
        at_seq, at_flags, at_csum = ihl + TCP_SEQ, ihl + TCP_FLAGS, ihl + TCP_CSUM
        out = []
        for g in range(i, i + k):
            start = hl + g * mss
            chunk = pkt[start:min(start + mss, total)]
            clen = len(chunk)
            seg_len = hl + clen
            h = head[:]
            if v6:
                _pack16(h, V6_PAYLOAD_LEN, seg_len - IPV6_HEADER_LEN)
            else:
                ip_id = (id0 + g) & 0xFFFF
                c = (ip_base + seg_len + ip_id) % 0xFFFF
                _pack_ip(h, IP_TOTAL_LEN, seg_len, ip_id)
                _pack16(h, IP_CSUM, 0xFFFF - c if c else 0)
            seq = (seq0 + g * mss) & 0xFFFFFFFF
            flags = flags0
            if g:
                flags &= ~TCP_CWR
            if g != last:
                flags &= ~TCP_FIN_PSH
            # the data's one's-complement sum: read little-endian (twice as fast as
            # big-endian from a memoryview) it is the byte-swapped sum, which is the sum
            # times 256 modulo 0xFFFF; odd lengths need no padding this way
            data_sum = (int.from_bytes(chunk, "little") % 0xFFFF) << 8
            c = (tcp_base + clen + (seq >> 16) + (seq & 0xFFFF) + flags + data_sum) % 0xFFFF
            _pack_seq(h, at_seq, seq)
            h[at_flags] = flags
            _pack16(h, at_csum, 0xFFFF - c if c else 0)
            h += chunk
            h += pad
            out.append(h)
        return out
