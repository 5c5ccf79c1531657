"""UDP -> TUN for the udp backend: only from leased peers, only for our subnets.

UDP GRO hands us runs of datagrams (a whole train, usually) in one ``recvmsg``; a vnet1
super-packet goes into the TUN in one write with its offload header, and plain TCP
segments of one flow are joined into one super-packet before the write (GRO in user space).
Inner IPv4 and IPv6 alike, each checked by the rules of its family.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

from pyflannel.fastpath import counters
from pyflannel.fastpath.coalesce import flow_run, join
from pyflannel.fastpath.frames import (
    BUF_SIZE,
    CHUNK_COUNT,
    CHUNK_HDR_LEN,
    CHUNK_INDEX,
    CHUNK_MAGIC,
    CHUNK_TRAIN_HI,
    CHUNK_TRAIN_LO,
    CHUNK_VERSION,
    FAST_MAGIC,
    FAST_VERSION,
    MAX_CHUNKS,
    VNET_FLAGS,
    VNET_GSO_TYPE,
    VNET_LEN,
    ZERO_VNET,
    FrameError,
    Reassembler,
    check_vnet,
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
    V6_SRC,
    check_ipv4,
    check_ipv6,
    decrement_hop_limit,
    decrement_ttl,
    ipv6_key,
    ipv6_total,
)
from pyflannel.fastpath.transport import ANC_SIZE, BATCH, Transport, gro_size

_u32 = struct.Struct("!I").unpack_from
_INDICES = bytes(range(256))
C = counters.INDEX
RX_P, RX_B = C["rx_packets"], C["rx_bytes"]
RX6_P, RX6_B = C["rx_packets_ipv6"], C["rx_bytes_ipv6"]
COALESCED = C["coalesced"]


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
            if not self.admit4(pkt, src[0]):
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

    def admit4(self, pkt, src_keys: frozenset[int]) -> bool:
        """The IPv4 rules of :meth:`to_tun` (for us, from the sending peer's subnet, TTL
        left), the TTL counted down; a refusal is counted. (The flannel framing's inline
        loop in :meth:`from_udp` applies the same rules without the call.)"""
        if _u32(pkt, IP_DST)[0] >> self.shift != self.local_key:
            self.drop("drop_wrong_subnet", 1)
            return False
        if _u32(pkt, IP_SRC)[0] >> self.shift not in src_keys:
            self.drop("drop_spoofed_source", 1)
            return False
        if not decrement_ttl(pkt):
            self.drop("drop_ttl_exceeded", 1)
            return False
        return True

    def admit6(self, pkt, src6_keys: frozenset[int]) -> bool:
        """The IPv6 rules of :meth:`to_tun` (for us, from the sending peer's IPv6 subnet,
        hops left), the hop limit counted down; a refusal is counted."""
        if ipv6_key(pkt, V6_DST, self.shift6) != self.local_key6:
            self.drop("drop_wrong_subnet", 1)
            return False
        if ipv6_key(pkt, V6_SRC, self.shift6) not in src6_keys:
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
        bad = check_ipv6(pkt, len(pkt)) if v6 else check_ipv4(pkt, len(pkt))
        if bad is not None:
            self.drop("drop_" + bad)
            return
        if v6:
            if not self.admit6(pkt, src[3]):
                return
            total = ipv6_total(pkt)
        else:
            if not self.admit4(pkt, src[0]):
                return
            total = (pkt[IP_TOTAL_LEN] << 8) | pkt[IP_TOTAL_LEN + 1]
        if hold:  # a plain packet: held for merging with its flow's next
            self._pending.append((bytes(pkt[:total]), src))
        else:
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
        if v6:
            c[RX6_P] += 1
            c[RX6_B] += total


def _settle(st: list, before: tuple[int, int, int], after: tuple[int, int, int]) -> None:
    st[2] += after[0] - before[0]
    st[3] += after[1] - before[1]
    st[5] += after[2] - before[2]
