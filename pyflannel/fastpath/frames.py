"""Wire formats on port 8285, and the offload arithmetic the fast framing needs.

Two framings share the port (docs/wire-format.md):

* **flannel**: the datagram is one raw IPv4 packet (first nibble 4), as flanneld sends,
  or one raw IPv6 packet (first nibble 6) between pyflannel peers that carry IPv6;
* **vnet1** (between pyflannel peers that advertise it): the payload is the 10-byte
  virtio-net header the TUN device handed us followed by the packet, which may be a TCP
  super-packet of up to 64 KiB with a partial checksum. It travels as a *train* of
  datagrams no larger than the underlay allows, each starting with a 6-byte chunk header::

      0xF7 0x01 <chunk index> <chunk count> <train id, 2 bytes big-endian> <chunk>

  A train leaves in one UDP GSO ``sendmsg`` and usually arrives in one GRO ``recvmsg``;
  nothing is ever IP-fragmented. ``0xF`` can never start an IPv4 or IPv6 packet, so the two
  framings are told apart by the first byte alone.

When a super-packet or a partial checksum must go to a peer that only knows flannel's
framing, it is finished here: checksums completed, super-packets cut into MSS-sized segments.
"""

from __future__ import annotations

import struct

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
    TCP_MIN_HEADER,
    TCP_PROTO,
    TCP_SEQ,
    V6_NEXT,
    V6_PAYLOAD_LEN,
    V6_SRC,
)

VNET_LEN = 10
FAST_MAGIC = 0xF7
FAST_VERSION = 1
CHUNK_HDR_LEN = 6
CHUNK = struct.Struct("!BBBBH")  # magic, version, index, count, train id
# Chunk header fields (offsets in a vnet1 datagram).
CHUNK_MAGIC = 0
CHUNK_VERSION = 1
CHUNK_INDEX = 2
CHUNK_COUNT = 3
CHUNK_TRAIN_HI = 4  # train id, big-endian
CHUNK_TRAIN_LO = 5
MAX_CHUNKS = 64
INNER_OFFSET = CHUNK_HDR_LEN + VNET_LEN  # where the packet starts in a one-chunk datagram
BUF_SIZE = 65536 + INNER_OFFSET  # a read or receive buffer: 64 KiB after the headers
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4 (also a whole GSO send)
FRAMING_NAME = "vnet1"  # as advertised in the lease's BackendData

# virtio_net_hdr (native byte order: little-endian here, as the TUN device uses it)
VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_FLAGS = 0  # virtio-net header fields (offsets)
VNET_GSO_TYPE = 1
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80
ZERO_VNET = bytes(VNET_LEN)

_u16 = struct.Struct("!H")
_u32 = struct.Struct("!I")


class FrameError(ValueError):
    """A datagram or super-packet this side cannot use (counted, never raised to the loop)."""


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's-complement sum of ``data`` (RFC 1071), folded, 0..0xFFFF.

    2**16 is 1 modulo 0xFFFF, so the sum of the 16-bit words equals the whole buffer read as
    one big integer, modulo 0xFFFF: one C-speed operation instead of a Python loop. It is
    read little-endian (faster from a memoryview, and an odd length needs no padding): that
    is the byte-swapped sum, which is the sum times 256, modulo 0xFFFF.
    """
    if not data:
        return 0
    r = (int.from_bytes(data, "little") % 0xFFFF) * 256 % 0xFFFF
    if r == 0 and any(data):
        return 0xFFFF
    return r


def finish_checksum(pkt: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Complete a partial (offloaded) checksum in place, as a NIC would: the field already
    holds the pseudo-header sum; sum from ``csum_start`` to the end and store the complement."""
    field = csum_start + csum_offset
    if csum_start >= len(pkt) or field + 2 > len(pkt):
        raise FrameError("partial checksum points outside the packet")
    s = ones_sum(pkt[csum_start:])
    _u16.pack_into(pkt, field, ~s & 0xFFFF)


def ipv4_header_checksum(pkt: bytearray | memoryview, ihl: int) -> None:
    pkt[IP_CSUM] = pkt[IP_CSUM + 1] = 0
    _u16.pack_into(pkt, IP_CSUM, ~ones_sum(pkt[:ihl]) & 0xFFFF)


def segment_tcp4(pkt: bytes | bytearray | memoryview, gso_size: int) -> list[bytearray]:
    """Cut an IPv4/TCP super-packet into MSS-sized packets with complete checksums (what
    the kernel's TSO would have done), for peers that take one packet per datagram."""
    n = len(pkt)
    if (n < IPV4_MIN_HEADER + TCP_MIN_HEADER or pkt[IP_VER_IHL] >> 4 != 4
            or pkt[IP_PROTO] != TCP_PROTO):
        raise FrameError("super-packet is not IPv4/TCP")
    ihl = (pkt[IP_VER_IHL] & 0x0F) * 4
    thl = (pkt[ihl + TCP_DOFF] >> 4) * 4 if n > ihl + TCP_DOFF else 0
    hl = ihl + thl
    total = _u16.unpack_from(pkt, IP_TOTAL_LEN)[0]
    if ihl < 20 or thl < 20 or hl > n or total > n or total < hl or gso_size <= 0:
        raise FrameError("super-packet has inconsistent header lengths")
    header = bytes(pkt[:hl])
    payload = memoryview(pkt)[hl:total]
    seq = _u32.unpack_from(header, ihl + TCP_SEQ)[0]
    ip_id = _u16.unpack_from(header, IP_ID)[0]
    flags = header[ihl + TCP_FLAGS]
    pseudo = header[IP_SRC:IP_DST + 4] + bytes((0, TCP_PROTO))
    out = []
    count = max(1, -(-len(payload) // gso_size))
    for i in range(count):
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        seg = bytearray(header)
        seg += chunk
        _u16.pack_into(seg, IP_TOTAL_LEN, hl + len(chunk))
        _u16.pack_into(seg, IP_ID, (ip_id + i) & 0xFFFF)
        ipv4_header_checksum(seg, ihl)
        _u32.pack_into(seg, ihl + TCP_SEQ, (seq + i * gso_size) & 0xFFFFFFFF)
        if i != count - 1:
            seg[ihl + TCP_FLAGS] = flags & ~0x09  # FIN and PSH only on the last segment
        seg[ihl + TCP_CSUM] = seg[ihl + TCP_CSUM + 1] = 0
        tcp_len = len(seg) - ihl
        s = ones_sum(pseudo + _u16.pack(tcp_len) + bytes(seg[ihl:]))
        _u16.pack_into(seg, ihl + TCP_CSUM, ~s & 0xFFFF)
        out.append(seg)
    return out


def segment_tcp6(pkt: bytes | bytearray | memoryview, gso_size: int) -> list[bytearray]:
    """Cut an IPv6/TCP super-packet (no extension headers) into MSS-sized packets with
    complete checksums, as the kernel's TSO would."""
    n = len(pkt)
    if (n < IPV6_HEADER_LEN + TCP_MIN_HEADER or pkt[IP_VER_IHL] >> 4 != 6
            or pkt[V6_NEXT] != TCP_PROTO):
        raise FrameError("super-packet is not IPv6/TCP")
    thl = (pkt[IPV6_HEADER_LEN + TCP_DOFF] >> 4) * 4
    hl = IPV6_HEADER_LEN + thl
    total = IPV6_HEADER_LEN + _u16.unpack_from(pkt, V6_PAYLOAD_LEN)[0]
    if thl < 20 or hl > n or total > n or total < hl or gso_size <= 0:
        raise FrameError("super-packet has inconsistent header lengths")
    at = IPV6_HEADER_LEN
    header = bytes(pkt[:hl])
    payload = memoryview(pkt)[hl:total]
    seq = _u32.unpack_from(header, at + TCP_SEQ)[0]
    flags = header[at + TCP_FLAGS]
    addresses = header[V6_SRC:IPV6_HEADER_LEN]
    out = []
    count = max(1, -(-len(payload) // gso_size))
    for i in range(count):
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        seg = bytearray(header)
        seg += chunk
        _u16.pack_into(seg, V6_PAYLOAD_LEN, len(seg) - IPV6_HEADER_LEN)
        _u32.pack_into(seg, at + TCP_SEQ, (seq + i * gso_size) & 0xFFFFFFFF)
        fl = flags if i == count - 1 else flags & ~0x09  # FIN and PSH only on the last
        seg[at + TCP_FLAGS] = fl & ~0x80 if i else fl  # CWR only on the first
        seg[at + TCP_CSUM] = seg[at + TCP_CSUM + 1] = 0
        tcp_len = len(seg) - at
        s = ones_sum(addresses + _u32.pack(tcp_len) + bytes((0, 0, 0, TCP_PROTO))
                     + bytes(seg[at:]))
        _u16.pack_into(seg, at + TCP_CSUM, ~s & 0xFFFF)
        out.append(seg)
    return out


def to_plain(vnet: bytes | bytearray | memoryview,
             pkt: bytearray | memoryview) -> list[bytearray | memoryview]:
    """What a flannel-framing peer must receive for this (vnet header, packet) pair."""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(vnet)
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            finish_checksum(pkt, csum_start, csum_offset)
        return [pkt]
    if kind == GSO_TCPV4:
        return segment_tcp4(pkt, gso_size)
    if kind == GSO_TCPV6:
        return segment_tcp6(pkt, gso_size)
    raise FrameError(f"unsupported GSO type {gso_type}")


def encode_train(payload: bytes, train_id: int, datagram_size: int) -> list[bytes]:
    """The datagrams of one vnet1 train (``payload`` = virtio-net header + packet).

    The loop builds the same bytes in place; this is the reference and the test oracle.
    """
    room = datagram_size - CHUNK_HDR_LEN
    if room <= 0:
        raise FrameError("datagram size too small for a chunk")
    count = max(1, -(-len(payload) // room))
    if count > MAX_CHUNKS:
        raise FrameError(f"payload needs {count} chunks, more than {MAX_CHUNKS}")
    return [CHUNK.pack(FAST_MAGIC, FAST_VERSION, i, count, train_id & 0xFFFF)
            + payload[i * room:(i + 1) * room] for i in range(count)]


def classify(datagram: bytes | bytearray | memoryview) -> str:
    """'flannel', 'vnet1' or 'garbage' by the first bytes: never ambiguous."""
    if not datagram:
        return "garbage"
    first = datagram[0]
    if first >> 4 in (4, 6):
        return "flannel"
    if (first == FAST_MAGIC and len(datagram) > CHUNK_HDR_LEN
            and datagram[CHUNK_VERSION] == FAST_VERSION
            and datagram[CHUNK_INDEX] < datagram[CHUNK_COUNT] <= MAX_CHUNKS):
        return "vnet1"
    return "garbage"


class Reassembler:
    """Joins the chunks of vnet1 trains, one train in flight per sending peer.

    Trains from one peer arrive in order over one UDP flow; a gap (a lost or reordered
    chunk) drops that train, and TCP above recovers as from any loss.
    """

    def __init__(self) -> None:
        self._state: dict[object, list] = {}  # peer -> [train id, next index, count, buf, len]
        self.dropped = 0

    def feed(self, peer: object, dgram: bytes | bytearray | memoryview) -> memoryview | None:
        """The whole payload when ``dgram`` completes a train, else None."""
        index, count = dgram[CHUNK_INDEX], dgram[CHUNK_COUNT]
        train = (dgram[CHUNK_TRAIN_HI] << 8) | dgram[CHUNK_TRAIN_LO]
        chunk = dgram[CHUNK_HDR_LEN:]
        st = self._state.get(peer)
        if index == 0:
            if st is not None and st[1] != 0:
                self.dropped += 1  # an unfinished train was cut short
            if count == 1:
                if st is not None:
                    st[1] = 0
                return memoryview(chunk)
            if st is None:
                st = self._state[peer] = [0, 0, 0, bytearray(MAX_CHUNKS * 1500 + 65536), 0]
            n = len(chunk)
            st[3][:n] = chunk
            st[0], st[1], st[2], st[4] = train, 1, count, n
            return None
        if st is None or st[1] != index or st[0] != train or st[2] != count:
            if st is not None and st[1] != 0:
                self.dropped += 1
                st[1] = 0
            return None
        buf, off = st[3], st[4]
        n = len(chunk)
        if off + n > len(buf):
            self.dropped += 1
            st[1] = 0
            return None
        buf[off:off + n] = chunk
        st[4] = off + n
        st[1] = index + 1
        if st[1] == count:
            st[1] = 0
            return memoryview(buf)[:off + n]
        return None

    def forget(self, peer: object) -> None:
        """Drop a departed peer's train buffer (about 160 KiB each)."""
        self._state.pop(peer, None)


def check_vnet(vnet: bytes | bytearray | memoryview, pkt_len: int) -> None:
    """Reject headers the kernel would refuse or that point outside the packet."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(vnet)
    kind = gso_type & ~GSO_ECN
    if kind not in (GSO_NONE, GSO_TCPV4, GSO_TCPV6):
        raise FrameError(f"unsupported GSO type {gso_type}")
    if flags & F_NEEDS_CSUM and csum_start + csum_offset + 2 > pkt_len:
        raise FrameError("checksum offset outside the packet")
    if kind != GSO_NONE and (gso_size == 0 or hdr_len > pkt_len):
        raise FrameError("GSO header inconsistent with the packet")
