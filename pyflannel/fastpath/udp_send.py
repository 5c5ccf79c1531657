"""TUN -> UDP for the udp backend: flannel's framing, or vnet1 trains.

Datagrams to one peer are gathered into UDP GSO batches (one ``sendmsg`` for up to 64
equal-sized datagrams); with the TUN in vnet mode the kernel hands us TCP super-packets of up
to 64 KiB, each sent to a vnet1 peer as one train of chunks in one ``sendmsg``, or cut into
segments for a peer that takes flannel's framing only. Inner IPv4 and IPv6 alike, one peer
table per family.
"""

from __future__ import annotations

import os
import socket
import struct

from pyflannel.fastpath import counters
from pyflannel.fastpath.frames import (
    BUF_SIZE,
    CHUNK,
    CHUNK_HDR_LEN,
    CHUNK_TRAIN_HI,
    CHUNK_TRAIN_LO,
    FAST_MAGIC,
    FAST_VERSION,
    INNER_OFFSET,
    MAX_CHUNKS,
    MAX_DATAGRAM,
    VNET_FLAGS,
    VNET_GSO_TYPE,
    VNET_LEN,
    FrameError,
    to_plain,
)
from pyflannel.fastpath.packet import (
    IP_CSUM,
    IP_DST,
    IP_TTL,
    IPV4_MIN_HEADER,
    IPV6_HEADER_LEN,
    V6_DST,
    V6_HOPS,
    ipv6_key,
)
from pyflannel.fastpath.transport import BATCH, SOL_UDP, UDP_SEGMENT, Transport

_u32 = struct.Struct("!I").unpack_from
_seg = struct.Struct("=H").pack
C = counters.INDEX
TX6_P, TX6_B = C["tx_packets_ipv6"], C["tx_bytes_ipv6"]
# Where the inner packet's fields sit in the send buffer (the packet starts at INNER_OFFSET).
TTL_AT = INNER_OFFSET + IP_TTL
CSUM_AT = INNER_OFFSET + IP_CSUM
DST_AT = INNER_OFFSET + IP_DST
DST6_AT = INNER_OFFSET + V6_DST
HOPS_AT = INNER_OFFSET + V6_HOPS


class UdpSend(Transport):
    """TUN -> UDP for the udp backend: flannel's framing, or vnet1 trains, for inner
    IPv4 and IPv6 packets alike (one peer table per family)."""

    peers: dict[int, tuple[tuple[str, int], bool]]
    peers6: dict[int, tuple[tuple[str, int], bool]]
    shift: int
    shift6: int

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, **options) -> None:
        super().__init__(tun_fd, sock, ctl, mem, **options)
        self._train_id = 0
        self._train_headers: dict[int, bytearray] = {}  # chunk count -> header template
        self._train_iovs: dict[int, list] = {}  # chunk count -> gather list template
        # Reads land after a chunk header (vnet) or after chunk + virtio headers (plain):
        # either way the inner packet starts at INNER_OFFSET and a one-chunk vnet1
        # datagram is buf[:end] in place.
        self._buf = bytearray(BUF_SIZE)
        self._mv = memoryview(self._buf)
        self._rd = [self._mv[CHUNK_HDR_LEN:]] if self.vnet else [self._mv[INNER_OFFSET:]]

    # -- TUN -> UDP --------------------------------------------------------------------

    def from_tun(self) -> None:
        buf, mv, c = self._buf, self._mv, self.c
        rd, fd, readv = self._rd, self.tun_fd, os.readv
        peers, shift = self.peers, self.shift
        vnet, single = self.vnet, self.datagram_size
        base = CHUNK_HDR_LEN if vnet else INNER_OFFSET  # where the read landed
        for _ in range(BATCH):
            try:
                n = readv(fd, rd)
            except BlockingIOError:
                break
            end = base + n
            version = buf[INNER_OFFSET] >> 4
            if version == 4 and end - INNER_OFFSET >= IPV4_MIN_HEADER:
                peer = peers.get(_u32(buf, DST_AT)[0] >> shift)
                if peer is None:
                    self.unreachable(mv[INNER_OFFSET:end])
                    continue
                # packet.decrement_ttl, inlined: this loop runs once per packet.
                ttl = buf[TTL_AT]
                if ttl <= 1:
                    c[C["drop_ttl_exceeded"]] += 1
                    continue
                buf[TTL_AT] = ttl - 1
                csum = ((buf[CSUM_AT] << 8) | buf[CSUM_AT + 1]) + 0x0100
                csum = (csum & 0xFFFF) + (csum >> 16)
                buf[CSUM_AT] = csum >> 8
                buf[CSUM_AT + 1] = csum & 0xFF
            elif version == 6:
                peer = self.route6(end)
                if peer is None:
                    continue
            else:
                c[C["drop_not_ip"]] += 1  # neither IPv4 nor IPv6
                continue
            addr, fast = peer
            if fast:
                self._train_id = tid = (self._train_id + 1) & 0xFFFF
                if end <= single:  # the common small packet: one chunk, built in place
                    CHUNK.pack_into(buf, 0, FAST_MAGIC, FAST_VERSION, 0, 1, tid)
                    self.batch(addr, mv[:end], INNER_OFFSET)
                else:
                    self.send_train(addr, end, tid)
            elif vnet and (buf[CHUNK_HDR_LEN + VNET_FLAGS] & 1
                          or buf[CHUNK_HDR_LEN + VNET_GSO_TYPE]):
                # A partial checksum or a super-packet for a flannel-framing peer.
                try:
                    pkts = to_plain(mv[CHUNK_HDR_LEN:INNER_OFFSET], mv[INNER_OFFSET:end])
                except FrameError:
                    c[C["drop_bad_offload"]] += 1
                    continue
                c[C["segmented"]] += 1
                for p in pkts:
                    self.batch(addr, p)
            else:
                self.batch(addr, mv[INNER_OFFSET:end])
        self.flush()

    def route6(self, end: int) -> tuple[tuple[str, int], bool] | None:
        """The peer for the IPv6 packet in the read buffer, its hop limit counted down;
        None (counted, or answered with ICMPv6) when it goes nowhere."""
        buf, c = self._buf, self.c
        if end - INNER_OFFSET < IPV6_HEADER_LEN:
            c[C["drop_truncated"]] += 1
            return None
        peer = self.peers6.get(ipv6_key(buf, DST6_AT, self.shift6))
        if peer is None:
            self.unreachable(self._mv[INNER_OFFSET:end])
            return None
        hops = buf[HOPS_AT]
        if hops <= 1:
            c[C["drop_ttl_exceeded"]] += 1
            return None
        buf[HOPS_AT] = hops - 1
        c[TX6_P] += 1
        c[TX6_B] += end - INNER_OFFSET
        return peer

    def send_train(self, addr: tuple[str, int], end: int, tid: int) -> None:
        """The super-packet in the read buffer (``buf[CHUNK_HDR_LEN:end]``) as a train of
        full-sized chunks in one GSO ``sendmsg``, gathered from the buffer and a header
        template: no copy, and no per-chunk work, in Python."""
        payload = self._mv[CHUNK_HDR_LEN:end]
        room = self.datagram_size - CHUNK_HDR_LEN
        total = len(payload)
        count = -(-total // room)
        if count > MAX_CHUNKS or total + count * CHUNK_HDR_LEN > MAX_DATAGRAM or not self.gso:
            self.send_train_copied(addr, payload, tid, room, count)
            return
        self.flush()
        iov = self._train_iov(count, room)
        iov[-1] = payload[(count - 1) * room:]
        hdr = self._train_headers[count]
        hdr[CHUNK_TRAIN_HI::CHUNK_HDR_LEN] = bytes((tid >> 8,)) * count
        hdr[CHUNK_TRAIN_LO::CHUNK_HDR_LEN] = bytes((tid & 0xFF,)) * count
        try:
            self.sock.sendmsg(iov, [(SOL_UDP, UDP_SEGMENT, _seg(self.datagram_size))], 0, addr)
        except OSError:
            self.c[C["drop_send_error"]] += 1
            return
        self._count_tx(addr, 1, total - VNET_LEN)

    def _train_iov(self, count: int, room: int) -> list:
        """A fresh copy of the gather list for a train of ``count`` chunks: header views
        and payload views over the fixed read buffer, built once per count."""
        iov = self._train_iovs.get(count)
        if iov is None:
            hdr = self._train_headers[count] = bytearray(
                b"".join(CHUNK.pack(FAST_MAGIC, FAST_VERSION, i, count, 0)
                         for i in range(count)))
            hv = memoryview(hdr)
            payload = self._mv[CHUNK_HDR_LEN:]
            iov = []
            for i in range(count):
                iov.append(hv[i * CHUNK_HDR_LEN:(i + 1) * CHUNK_HDR_LEN])
                iov.append(payload[i * room:(i + 1) * room])
            self._train_iovs[count] = iov
        return iov[:]

    def send_train_copied(self, addr: tuple[str, int], payload: memoryview, tid: int,
                          room: int, count: int) -> None:
        """The general case: chunks copied into the batch buffer, as many GSO sends as the
        64 KiB limit needs (or one datagram each without GSO)."""
        if count > MAX_CHUNKS:
            self.c[C["drop_bad_offload"]] += 1
            return
        self.flush()
        bbuf = self._bbuf
        self._b_addr, self._b_seg = addr, self.datagram_size
        off = 0
        for i in range(count):
            chunk = payload[i * room:(i + 1) * room]
            n = CHUNK_HDR_LEN + len(chunk)
            if off + n > MAX_DATAGRAM:  # a GSO send holds at most 64 KiB: start another
                self._b_off = off
                self.flush()
                self._b_addr, self._b_seg = addr, self.datagram_size
                off = 0
            CHUNK.pack_into(bbuf, off, FAST_MAGIC, FAST_VERSION, i, count, tid)
            bbuf[off + CHUNK_HDR_LEN:off + n] = chunk
            off += n
            self._b_count += 1
        self._b_off = off
        self._packets_in_batch += 1
        self._b_overhead += count * CHUNK_HDR_LEN + VNET_LEN
        self.flush()
