"""The udp backend's forwarding loop: flannel's framing and vnet1 over the shared transport.

Runs alone in its own process so that nothing in the control plane (gRPC, JSON, logging) can
take the interpreter from it. The cost that matters is system calls per packet, so:

* out (:class:`UdpSend`): datagrams to one peer are gathered into UDP GSO batches (one
  ``sendmsg`` for up to 64 equal-sized datagrams); with the TUN in vnet mode the kernel
  hands us TCP super-packets of up to 64 KiB, each sent to a vnet1 peer as one train of
  chunks in one ``sendmsg``;
* in (:class:`UdpReceive`): UDP GRO hands us runs of datagrams (a whole train, usually) in
  one ``recvmsg``; a vnet1 super-packet goes into the TUN in one write, with its offload
  header.

TUN and UDP I/O, batching, the control socket and the loop are :mod:`.transport`'s; the
WireGuard framing over the same transport is :mod:`.wg`.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import struct
import sys
import time

from pyflannel.fastpath import counters
from pyflannel.fastpath.coalesce import flow_run, join
from pyflannel.fastpath.frames import (
    CHUNK,
    CHUNK_COUNT,
    CHUNK_HDR_LEN,
    CHUNK_INDEX,
    CHUNK_MAGIC,
    CHUNK_TRAIN_HI,
    CHUNK_TRAIN_LO,
    CHUNK_VERSION,
    FAST_MAGIC,
    FAST_VERSION,
    INNER_OFFSET,
    MAX_CHUNKS,
    MAX_DATAGRAM,
    VNET_FLAGS,
    VNET_GSO_TYPE,
    VNET_LEN,
    ZERO_VNET,
    FrameError,
    Reassembler,
    check_vnet,
    to_plain,
)
from pyflannel.fastpath.packet import (
    IP_CSUM,
    IP_DST,
    IP_PROTO,
    IP_SRC,
    IP_TOTAL_LEN,
    IP_TTL,
    IPV4_MIN_HEADER,
    IPV6_HEADER_LEN,
    TCP_PROTO,
    V6_DST,
    V6_HOPS,
    V6_SRC,
    check_ipv4,
    check_ipv6,
    decrement_hop_limit,
    decrement_ttl,
    ipv6_total,
)
from pyflannel.fastpath.transport import (  # noqa: F401 - tune_socket: the backends' import
    ANC_SIZE,
    BATCH,
    GSO_MAX_SEGMENTS,
    SOCKET_BUFFER,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    Transport,
    die_with_parent,
    enable_gro,
    gro_size,
    tune_socket,
)

BUF_SIZE = 65536 + INNER_OFFSET

_u32 = struct.Struct("!I").unpack_from
_INDICES = bytes(range(256))
_seg = struct.Struct("=H").pack
C = counters.INDEX
TX_P, TX_B, RX_P, RX_B = C["tx_packets"], C["tx_bytes"], C["rx_packets"], C["rx_bytes"]
# Where the inner packet's fields sit in the send buffer (the packet starts at INNER_OFFSET).
TTL_AT = INNER_OFFSET + IP_TTL
CSUM_AT = INNER_OFFSET + IP_CSUM
DST_AT = INNER_OFFSET + IP_DST
COALESCED = C["coalesced"]
TX6_P, TX6_B = C["tx_packets_ipv6"], C["tx_bytes_ipv6"]
RX6_P, RX6_B = C["rx_packets_ipv6"], C["rx_bytes_ipv6"]
DST6_AT = INNER_OFFSET + V6_DST
HOPS_AT = INNER_OFFSET + V6_HOPS


def _key6(pkt, at: int, shift: int) -> int:
    """The peer-table key of the IPv6 address at ``pkt[at:at + 16]``."""
    return int.from_bytes(pkt[at:at + 16], "big") >> shift


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
                c[C["drop_not_ipv4"]] += 1  # neither IPv4 nor IPv6 (the name is older)
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
        peer = self.peers6.get(_key6(buf, DST6_AT, self.shift6))
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


class UdpReceive(Transport):
    """UDP -> TUN for the udp backend: only from leased peers, only for our subnet, and
    only with an inner source in the sending peer's subnet of the packet's family."""

    # address -> (IPv4 keys, vnet1?, stats, IPv6 keys)
    sources: dict[str, tuple[frozenset[int], bool, list, frozenset[int]]]
    shift: int
    local_key: int
    shift6: int
    local_key6: int

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, **options) -> None:
        super().__init__(tun_fd, sock, ctl, mem, **options)
        self._rx_iovs: dict[tuple[int, int], list] = {}  # (seg, count) -> receive views
        self._reasm = Reassembler()
        self._rbuf = bytearray(BUF_SIZE)
        self._rmv = memoryview(self._rbuf)
        # With virtio-net headers on the TUN, flannel-framed packets (one per datagram)
        # are merged per TCP flow before the write: GRO in user space.
        self.coalesce = self.vnet
        self._pending: list[tuple[bytes, tuple]] = []

    def flush_pending(self) -> None:
        """Write the held plain packets: each TCP flow's run as one super-packet."""
        packets = self._pending
        if not packets:
            return
        self._pending = []
        fd, c = self.tun_fd, self.c
        writev = os.writev
        i, total = 0, len(packets)
        while i < total:
            j, size = flow_run(packets, i)
            try:
                if j - i > 1:
                    writev(fd, join(packets, i, j, size))
                    c[COALESCED] += j - i
                else:
                    writev(fd, [ZERO_VNET, packets[i][0]])
            except OSError:
                c[RX_P] -= j - i
                c[RX_B] -= size
                self.drop("drop_tun_write", j - i)
            i = j

    # -- UDP -> TUN --------------------------------------------------------------------

    def from_udp(self) -> None:
        rbuf, rmv, c = self._rbuf, self._rmv, self.c
        recv, sources = self.sock.recvmsg_into, self.sources
        fd, write, writev, vnet = self.tun_fd, os.write, os.writev, self.vnet
        shift, local_key, coalesce = self.shift, self.local_key, self.coalesce
        bufs = [rbuf]
        rx_p = rx_b = 0
        clock = time.monotonic
        prev_st: list | None = None
        prev = (0, 0, 0)
        for _ in range(BATCH):
            try:
                n, anc, _flags, addr = recv(bufs, ANC_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP; nothing lost here
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            seg = gro_size(anc, n)
            src = sources.get(addr[0])
            if src is None:
                # Not self.drop: these belong to no peer.
                c[C["drop_unknown_source"]] += -(-n // seg) if seg else 1
                continue
            # Per-peer counters: settle the previous datagram's peer with what happened
            # since, and start this one's tally (a few additions per datagram).
            now = (c[RX_P] + rx_p, c[RX_B] + rx_b, self.rx_dropped)
            if prev_st is not None:
                _settle(prev_st, prev, now)
            prev_st, prev = src[2], now
            prev_st[4] = clock()
            src_keys = src[0]
            if seg <= 0:  # an empty datagram
                self.drop("drop_not_ipv4", 1)
                continue
            if rbuf[0] == FAST_MAGIC:
                self.flush_pending()
                if seg < n and src[1] and self.whole_train(n, seg, src):
                    continue
                for off in range(0, n, seg):
                    self.deliver(rmv[off:off + seg], src, addr[0])
                continue
            for off in range(0, n, seg):
                # The flannel framing, inline: the common case must cost little.
                end = min(off + seg, n)
                if (rbuf[off] & 0xF0 != 0x40 or end - off < IPV4_MIN_HEADER
                        or rbuf[off] & 0x0F < 5):
                    self.deliver(rmv[off:end], src, addr[0])
                    continue
                total = (rbuf[off + IP_TOTAL_LEN] << 8) | rbuf[off + IP_TOTAL_LEN + 1]
                if total > end - off or total < (rbuf[off] & 0x0F) * 4:
                    self.deliver(rmv[off:end], src, addr[0])  # counts the reason
                    continue
                if _u32(rbuf, off + IP_DST)[0] >> shift != local_key:
                    self.drop("drop_wrong_subnet", 1)
                    continue
                if _u32(rbuf, off + IP_SRC)[0] >> shift not in src_keys:
                    self.drop("drop_spoofed_source", 1)
                    continue
                ttl = rbuf[off + IP_TTL]
                if ttl <= 1:
                    self.drop("drop_ttl_exceeded", 1)
                    continue
                rbuf[off + IP_TTL] = ttl - 1
                ck = off + IP_CSUM
                csum = ((rbuf[ck] << 8) | rbuf[ck + 1]) + 0x0100
                csum = (csum & 0xFFFF) + (csum >> 16)
                rbuf[ck] = csum >> 8
                rbuf[ck + 1] = csum & 0xFF
                if coalesce and rbuf[off + IP_PROTO] == TCP_PROTO:
                    # held, to be joined with its flow's next segments (flush_pending)
                    self._pending.append((bytes(rmv[off:off + total]), src))
                    rx_p += 1
                    rx_b += total
                    continue
                if self._pending:
                    self.flush_pending()  # keep the order of what came before
                try:
                    if vnet:
                        writev(fd, [ZERO_VNET, rmv[off:off + total]])
                    else:
                        write(fd, rmv[off:off + total])
                except OSError:
                    self.drop("drop_tun_write", 1)
                    continue
                rx_p += 1
                rx_b += total
        if prev_st is not None:
            _settle(prev_st, prev, (c[RX_P] + rx_p, c[RX_B] + rx_b, self.rx_dropped))
        c[RX_P] += rx_p
        c[RX_B] += rx_b
        self.flush_pending()

    def deliver(self, dgram: memoryview, src: tuple, peer_ip: str) -> None:
        """One datagram from a leased peer into the TUN, if it carries a packet for us."""
        n = len(dgram)
        first = dgram[0] if n else 0
        if first >> 4 in (4, 6):
            self.to_tun(dgram, ZERO_VNET, src, self.coalesce)
            return
        if first != FAST_MAGIC or n <= CHUNK_HDR_LEN or dgram[CHUNK_VERSION] != FAST_VERSION \
                or not dgram[CHUNK_INDEX] < dgram[CHUNK_COUNT] <= MAX_CHUNKS:
            self.drop("drop_not_ipv4", 1)
            return
        if not src[1]:
            self.drop("drop_unexpected_framing", 1)
            return
        if dgram[CHUNK_INDEX] == 0 and dgram[CHUNK_COUNT] == 1:  # one chunk: nothing to join
            payload = dgram[CHUNK_HDR_LEN:]
        else:
            dropped = self._reasm.dropped
            payload = self._reasm.feed(peer_ip, dgram)
            if self._reasm.dropped != dropped:
                self.drop("drop_train_incomplete", self._reasm.dropped - dropped)
            if payload is None:
                return
        if len(payload) <= VNET_LEN:
            self.drop("drop_truncated", 1)
            return
        vnet_hdr = payload[:VNET_LEN]
        if vnet_hdr[VNET_FLAGS] or vnet_hdr[VNET_GSO_TYPE]:  # an all-zero header needs no checking
            try:
                check_vnet(vnet_hdr, len(payload) - VNET_LEN)
            except FrameError:
                self.drop("drop_bad_offload", 1)
                return
        self.to_tun(payload[VNET_LEN:], vnet_hdr, src)

    def whole_train(self, n: int, seg: int, src: tuple) -> bool:
        """GRO handed us exactly one complete train: check every chunk header with a few
        slice comparisons, then write the payload to the TUN with one gathering write."""
        rbuf = self._rbuf
        count = -(-n // seg)
        if (rbuf[CHUNK_COUNT] != count or rbuf[CHUNK_INDEX] != 0
                or rbuf[CHUNK_VERSION] != FAST_VERSION or count > MAX_CHUNKS):
            return False
        hi, lo = rbuf[CHUNK_TRAIN_HI], rbuf[CHUNK_TRAIN_LO]
        if (rbuf[CHUNK_MAGIC:n:seg] != bytes((FAST_MAGIC,)) * count
                or rbuf[CHUNK_VERSION:n:seg] != bytes((FAST_VERSION,)) * count
                or rbuf[CHUNK_INDEX:n:seg] != _INDICES[:count]
                or rbuf[CHUNK_COUNT:n:seg] != bytes((count,)) * count
                or rbuf[CHUNK_TRAIN_HI:n:seg] != bytes((hi,)) * count
                or rbuf[CHUNK_TRAIN_LO:n:seg] != bytes((lo,)) * count):
            return False
        key = (seg, count)
        template = self._rx_iovs.get(key)
        if template is None:
            rmv = self._rmv
            template = self._rx_iovs[key] = [rmv[off + CHUNK_HDR_LEN:off + seg]
                                             for off in range(0, count * seg, seg)]
        iov = template[:]
        iov[-1] = self._rmv[(count - 1) * seg + CHUNK_HDR_LEN:n]
        size = n - count * CHUNK_HDR_LEN - VNET_LEN
        c = self.c
        first = iov[0]
        v6 = len(first) > VNET_LEN and first[VNET_LEN] >> 4 == 6
        if len(first) < VNET_LEN + (IPV6_HEADER_LEN if v6 else IPV4_MIN_HEADER):
            self.drop("drop_truncated", 1)
            return True
        vnet_hdr, pkt = first[:VNET_LEN], first[VNET_LEN:]
        try:
            check_vnet(vnet_hdr, size)
        except FrameError:
            self.drop("drop_bad_offload", 1)
            return True
        if v6:
            if ipv6_total(pkt) != size:
                self.drop("drop_bad_header_length", 1)
                return True
            if not self.admit6(pkt, src[3]):
                return True
        else:
            if (pkt[0] >> 4 != 4 or ((pkt[IP_TOTAL_LEN] << 8) | pkt[IP_TOTAL_LEN + 1]) != size
                    or (pkt[0] & 0x0F) < 5):
                self.drop("drop_bad_header_length", 1)
                return True
            if _u32(pkt, IP_DST)[0] >> self.shift != self.local_key:
                self.drop("drop_wrong_subnet", 1)
                return True
            if _u32(pkt, IP_SRC)[0] >> self.shift not in src[0]:
                self.drop("drop_spoofed_source", 1)
                return True
            if not decrement_ttl(pkt):
                self.drop("drop_ttl_exceeded", 1)
                return True
        try:
            os.writev(self.tun_fd, iov)
        except OSError:
            self.drop("drop_tun_write", 1)
            return True
        c[RX_P] += 1
        c[RX_B] += size
        if v6:
            c[RX6_P] += 1
            c[RX6_B] += size
        return True

    def admit6(self, pkt, src6_keys: frozenset[int]) -> bool:
        """The IPv6 rules of :meth:`to_tun` (for us, from the sending peer's IPv6 subnet,
        hops left), the hop limit counted down; a refusal is counted."""
        if _key6(pkt, V6_DST, self.shift6) != self.local_key6:
            self.drop("drop_wrong_subnet", 1)
            return False
        if _key6(pkt, V6_SRC, self.shift6) not in src6_keys:
            self.drop("drop_spoofed_source", 1)
            return False
        if not decrement_hop_limit(pkt):
            self.drop("drop_ttl_exceeded", 1)
            return False
        return True

    def to_tun(self, pkt: memoryview, vnet_hdr, src: tuple, hold: bool = False) -> None:
        """Check an inner packet from peer ``src``, count down its TTL (hop limit) and
        write it to the TUN; with ``hold``, keep a plain packet to be merged with its
        flow's next (:meth:`flush_pending`)."""
        c = self.c
        v6 = len(pkt) > 0 and pkt[0] >> 4 == 6
        if v6:
            bad = check_ipv6(pkt, len(pkt))
            if bad is not None:
                self.drop("drop_" + bad)
                return
            if not self.admit6(pkt, src[3]):
                return
            total = ipv6_total(pkt)
        else:
            bad = check_ipv4(pkt, len(pkt))
            if bad is not None:
                self.drop("drop_" + bad)
                return
            if _u32(pkt, IP_DST)[0] >> self.shift != self.local_key:
                self.drop("drop_wrong_subnet", 1)
                return
            if _u32(pkt, IP_SRC)[0] >> self.shift not in src[0]:
                self.drop("drop_spoofed_source", 1)
                return
            if not decrement_ttl(pkt):
                self.drop("drop_ttl_exceeded", 1)
                return
            total = (pkt[IP_TOTAL_LEN] << 8) | pkt[IP_TOTAL_LEN + 1]
        if v6:
            c[RX6_P] += 1
            c[RX6_B] += total
        if hold:  # a plain packet: held for merging with its flow's next
            self._pending.append((bytes(pkt[:total]), src))
            c[RX_P] += 1
            c[RX_B] += total
            return
        self.flush_pending()  # keep the order of what came before
        try:
            if self.vnet:
                os.writev(self.tun_fd, [vnet_hdr, pkt[:total]])
            else:
                os.write(self.tun_fd, pkt[:total])
        except OSError:
            self.drop("drop_tun_write", 1)
            return
        c[RX_P] += 1
        c[RX_B] += total


def _settle(st: list, before: tuple[int, int, int], after: tuple[int, int, int]) -> None:
    st[2] += after[0] - before[0]
    st[3] += after[1] - before[1]
    st[5] += after[2] - before[2]


class Forwarder(UdpSend, UdpReceive):
    """Moves packets between ``tun_fd`` and ``sock`` by the peer table it is given.

    ``vnet``: the TUN was opened with IFF_VNET_HDR and offloads (reads and writes carry a
    virtio-net header). ``gso``/``gro``: use UDP segmentation/receive offload.
    """

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, *, vnet: bool = False, gso: bool = True,
                 gro: bool = True, datagram_size: int = 1472, vnet1: bool = True,
                 coalesce: bool = True) -> None:
        super().__init__(tun_fd, sock, ctl, mem, vnet=vnet, gso=gso, gro=gro,
                         datagram_size=datagram_size)
        # vnet1: send and accept the fast framing where a peer advertises it (never in
        # flannel-framing mode, whose TUN may still carry virtio-net headers to coalesce)
        self.vnet1 = vnet and vnet1
        self.coalesce = vnet and coalesce
        self.peers = {}  # IPv4 key -> (addr, vnet1?)
        self.peers6 = {}  # IPv6 key -> (addr, vnet1?)
        # ip -> (IPv4 keys of every subnet routed to it, vnet1 from any of its routes?,
        #        stats, IPv6 keys)
        self.sources = {}
        self.shift, self.shift6 = 8, 64
        self.local_key = self.local_key6 = -1

    # -- control -----------------------------------------------------------------------

    def apply(self, msg: dict) -> None:
        """Install a new table atomically (whole dicts are swapped, never edited).

        Several subnets may name one address (a stale lease, a typo in a reservation): each
        subnet is sent by its own route, but what an address may send us is the union of
        its routes, so a second route can never downgrade the first (its vnet1 framing,
        the subnets its inner sources may lie in, its counters).
        """
        if msg.get("op") in ("stop", "stats"):
            super().apply(msg)
            return
        shift = 32 - int(msg["subnet_len"])
        shift6 = 128 - int(msg.get("subnet6_len") or 128)
        peers = self._table(msg["peers"], shift)
        peers6 = self._table(msg.get("peers6") or (), shift6)
        keys: dict[str, tuple[set[int], set[int]]] = {}
        fast_any: dict[str, bool] = {}
        for family, table in enumerate((peers, peers6)):
            for key, ((ip, _port), fast) in table.items():
                keys.setdefault(ip, (set(), set()))[family].add(key)
                fast_any[ip] = fast_any.get(ip, False) or fast
        local, local6 = msg.get("local_net"), msg.get("local_net6")
        local_key = int(local) >> shift if local is not None else -1
        local_key6 = int(local6) >> shift6 if local6 is not None else -1
        # ICMP errors come from the overlay network's own address (10.1.0.0): never a
        # local address, which the kernel would drop as a martian source.
        icmp_src = struct.pack("!I", int(msg.get("icmp_src") or 0))
        icmp_src6 = msg.get("icmp_src6")
        # Per-peer counters survive table changes: [tx_p, tx_b, rx_p, rx_b, last_rx, drops];
        # a departed address loses them, and its half-joined train.
        stats = {ip: self.peer_stats.get(ip) or [0, 0, 0, 0, 0.0, 0] for ip in keys}
        for gone in self.sources.keys() - keys.keys():
            self._reasm.forget(gone)
        self.shift, self.local_key, self.icmp_src = shift, local_key, icmp_src
        self.shift6, self.local_key6 = shift6, local_key6
        self.icmp_src6 = int(icmp_src6).to_bytes(16, "big") if icmp_src6 is not None else None
        self.peer_stats = stats
        self.sources = {ip: (frozenset(k4), fast_any[ip], stats[ip], frozenset(k6))
                        for ip, (k4, k6) in keys.items()}
        self.peers, self.peers6 = peers, peers6
        self.generation += 1

    def _table(self, rows, shift: int) -> dict[int, tuple[tuple[str, int], bool]]:
        """One family's peer table: subnet key -> ((address, port), vnet1?)."""
        table = {}
        for net, ip, port, *rest in rows:
            table[int(net) >> shift] = ((str(ip), int(port)),
                                        bool(rest and rest[0]) and self.vnet1)
        return table


def main(argv: list[str] | None = None) -> int:
    """Entry point of the fast-path process; the fds are inherited from the daemon."""
    ap = argparse.ArgumentParser(prog="pyflannel-fastpath")
    for name in ("tun-fd", "udp-fd", "ctl-fd", "counters-fd"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--vnet", action="store_true")
    ap.add_argument("--datagram-size", type=int, default=1472)
    ap.add_argument("--no-gso", action="store_true")
    ap.add_argument("--no-gro", action="store_true")
    ap.add_argument("--no-vnet1", action="store_true", help="flannel's framing only")
    ap.add_argument("--no-coalesce", action="store_true",
                    help="write plain packets to the TUN one by one")
    ap.add_argument("--framing", choices=("udp", "wireguard"), default="udp")
    ap.add_argument("--wg-key-file", help="the node's WireGuard private key (read here, "
                    "so the secret never crosses the command line or the control socket)")
    ap.add_argument("--wg-mtu", type=int, default=1420)
    ap.add_argument("--wg-public-key", help="the public key the backend published: the "
                    "key file must still hold its private half")
    args = ap.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(fileno=args.udp_fd)
    ctl = socket.socket(fileno=args.ctl_fd)
    options = {"vnet": args.vnet, "gso": not args.no_gso, "gro": not args.no_gro,
               "datagram_size": args.datagram_size}
    fwd: Transport
    if args.framing == "wireguard":
        from pyflannel.fastpath.wg import WgForwarder
        from pyflannel.wireguard.keys import KeyFileError, key_file_path, read_key_file

        try:
            key = read_key_file(args.wg_key_file or key_file_path())
        except KeyFileError as e:
            print(f"pyflannel-fastpath: {e}", file=sys.stderr, flush=True)
            return 1
        if args.wg_public_key and key.public_base64 != args.wg_public_key:
            print(f"pyflannel-fastpath: WireGuard key file {args.wg_key_file} changed "
                  "since the backend read it; not starting", file=sys.stderr, flush=True)
            return 1
        fwd = WgForwarder(args.tun_fd, sock, ctl, counters.attach(args.counters_fd),
                          private_key=key, mtu=args.wg_mtu, **options)
    else:
        fwd = Forwarder(args.tun_fd, sock, ctl, counters.attach(args.counters_fd),
                        vnet1=not args.no_vnet1, coalesce=not args.no_coalesce, **options)
    fwd.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
