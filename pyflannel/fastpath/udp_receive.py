"""UDP -> TUN for the udp backend: only from leased peers, only for our subnets.

UDP GRO hands us runs of datagrams (a whole train, usually) in one ``recvmsg``; a vnet1
super-packet goes into the TUN in one write with its offload header, and plain TCP
segments of one flow are joined into one super-packet before the write (GRO in user space).
Inner IPv4 and IPv6 alike, each admitted by the rules of its family in one place
(:meth:`UdpReceive.admit4`, :meth:`UdpReceive.admit6`), whichever way the packet came.

Only segments whose integrity is known are joined, since the super-packet is written for a
fresh checksum (:mod:`.coalesce`): those of a GRO run, which the kernel merges only from
datagrams with a non-zero UDP checksum it has verified; a datagram that came alone may have
carried a zero UDP checksum (none at all), so its TCP checksum is verified first, and a
segment that fails is written on its own for the kernel to refuse.

vnet1 packets often carry a partial checksum the kernel completes, so nothing but the UDP
checksum protects them: a socket filter refuses a vnet1 datagram without one (pyflannel
always sends one, and only pyflannel speaks vnet1).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

from pyflannel.fastpath import counters
from pyflannel.fastpath.coalesce import flow_run, join, joinable
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
    IP_DST,
    IP_PROTO,
    IP_SRC,
    IP_TOTAL_LEN,
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
from pyflannel.fastpath.sockfilter import (
    ACCEPT_ALL,
    BPF_JEQ_K,
    BPF_LD_W_LEN,
    BPF_RET_K,
    UDP_HEADER_LEN,
    Program,
    attach,
    socket_drops,
)
from pyflannel.fastpath.transport import ANC_SIZE, BATCH, Transport, gro_size

_u32 = struct.Struct("!I").unpack_from
_INDICES = bytes(range(256))
C = counters.INDEX
RX_P, RX_B = C["rx_packets"], C["rx_bytes"]
RX6_P, RX6_B = C["rx_packets_ipv6"], C["rx_bytes_ipv6"]
COALESCED = C["coalesced"]
SOCKET_DROPS = C["drop_socket"]
BPF_LD_H_ABS = 0x28  # A = ntohs(packet[k:k+2])
BPF_LD_B_ABS = 0x30  # A = packet[k]
BPF_JGT_K = 0x25
UDP_CHECKSUM_AT = 6  # in the UDP header, which the socket's filter sees first


def vnet1_needs_checksum_filter() -> bytes:
    """A classic BPF program for the udp backend's socket: refuse a vnet1 datagram whose
    UDP checksum is zero (none was computed), pass anything else. (A checksum left for
    offload is never zero either: it holds the pseudo-header sum.)"""
    p = Program()
    p.op(BPF_LD_H_ABS, UDP_CHECKSUM_AT)
    p.op(BPF_JEQ_K, 0, "unchecked", "accept")
    p.label("unchecked")
    p.op(BPF_LD_W_LEN)
    p.op(BPF_JGT_K, UDP_HEADER_LEN, "framing", "accept")
    p.label("framing")
    p.op(BPF_LD_B_ABS, UDP_HEADER_LEN)
    p.op(BPF_JEQ_K, FAST_MAGIC, "drop", "accept")
    p.label("accept")
    p.op(BPF_RET_K, ACCEPT_ALL)
    p.label("drop")
    p.op(BPF_RET_K, 0)
    return p.assemble()


class PeerSource:
    """One address's row in the receive table: what it may send us and its counters.

    ``keys4``/``keys6``: the subnets (as table keys) its inner sources may lie in, per
    family; ``vnet1``: it may send the fast framing; ``stats``: its counters,
    [tx_p, tx_b, rx_p, rx_b, last_rx, drops], shared with the transport's stats reply.
    """

    __slots__ = ("keys4", "keys6", "vnet1", "stats")

    def __init__(self, keys4: frozenset[int], keys6: frozenset[int], vnet1: bool,
                 stats: list) -> None:
        self.keys4, self.keys6, self.vnet1, self.stats = keys4, keys6, vnet1, stats


class UdpReceive(Transport):
    """UDP -> TUN for the udp backend: only from leased peers, only for our subnet, and
    only with an inner source in the sending peer's subnet of the packet's family."""

    sources: dict[str, PeerSource]  # by peer address
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
        self._pending: list[tuple[bytes, PeerSource]] = []
        if sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            attach(sock, vnet1_needs_checksum_filter())
        self._kernel_drops = socket_drops(sock)

    def publish_counters(self) -> None:
        """Also count what the kernel dropped for the socket: refused by its filter, or
        arriving with the receive queue full."""
        now = socket_drops(self.sock)
        self.c[SOCKET_DROPS] += (now - self._kernel_drops) & 0xFFFFFFFF  # a u32 that wraps
        self._kernel_drops = now
        super().publish_counters()

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

    def hold(self, pkt, src: PeerSource, intact: bool) -> bool:
        """Keep a plain packet to be joined with its flow's next (:meth:`flush_pending`),
        unless its integrity is unknown (``intact`` false: it came alone, perhaps without
        a UDP checksum) and its TCP checksum fails: then False, and it is written alone,
        for the kernel to verify and refuse."""
        if intact or joinable(pkt):
            self._pending.append((bytes(pkt), src))
            return True
        return False

    # -- UDP -> TUN --------------------------------------------------------------------

    def from_udp(self) -> None:
        rbuf, rmv, c = self._rbuf, self._rmv, self.c
        recv, sources = self.sock.recvmsg_into, self.sources
        fd, write, writev, vnet = self.tun_fd, os.write, os.writev, self.vnet
        coalesce, admit4 = self.coalesce, self.admit4
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
            prev_st, prev = src.stats, now
            prev_st[4] = clock()
            if seg <= 0:  # an empty datagram
                self.drop("drop_not_ip", 1)
                continue
            # A GRO run: the kernel merged only datagrams whose non-zero UDP checksum it
            # verified, so their packets are intact; one that came alone is not known to be.
            intact = seg < n
            if rbuf[0] == FAST_MAGIC:
                self.flush_pending()
                if intact and src.vnet1 and self.whole_train(n, seg, src):
                    continue
                for off in range(0, n, seg):
                    self.deliver(rmv[off:off + seg], src, addr[0], intact)
                continue
            keys4 = src.keys4
            for off in range(0, n, seg):
                # The flannel framing's common case, IPv4, without the calls of deliver.
                end = off + seg if off + seg < n else n
                if rbuf[off] >> 4 != 4:
                    self.deliver(rmv[off:end], src, addr[0], intact)
                    continue
                total = admit4(rbuf, off, end - off, keys4)
                if not total:
                    continue
                if coalesce and rbuf[off + IP_PROTO] == TCP_PROTO and (
                        intact or self.hold(rmv[off:off + total], src, intact)):
                    if intact:  # hold, inlined for a GRO run's segments
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

    def deliver(self, dgram: memoryview, src: PeerSource, peer_ip: str,
                intact: bool = False) -> None:
        """One datagram from a leased peer into the TUN, if it carries a packet for us.
        ``intact``: it came in a GRO run (its UDP checksum was verified)."""
        n = len(dgram)
        first = dgram[0] if n else 0
        if first >> 4 in (4, 6):
            self.to_tun(dgram, ZERO_VNET, src, self.coalesce, intact)
            return
        if first != FAST_MAGIC or n <= CHUNK_HDR_LEN or dgram[CHUNK_VERSION] != FAST_VERSION \
                or not dgram[CHUNK_INDEX] < dgram[CHUNK_COUNT] <= MAX_CHUNKS:
            self.drop("drop_not_ip", 1)
            return
        if not src.vnet1:
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

    def whole_train(self, n: int, seg: int, src: PeerSource) -> bool:
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
        # The train is the packet: its IP header must say so, before the rules of its family.
        if size != (ipv6_total(pkt) if v6 else (pkt[IP_TOTAL_LEN] << 8) | pkt[IP_TOTAL_LEN + 1]):
            self.drop("drop_bad_header_length", 1)
            return True
        if not (self.admit6(pkt, 0, size, src.keys6) if v6
                else self.admit4(pkt, 0, size, src.keys4)):
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

    def admit4(self, buf, at: int, room: int, keys: frozenset[int]) -> int:
        """The IPv4 rules for a packet from a peer, the one place they live: a usable
        header within the ``room`` bytes at ``buf[at:]``, for our subnet, from one of the
        sending peer's subnets (``keys``), TTL left. Returns the packet's length with its
        TTL counted down, or 0 when refused (the reason counted)."""
        bad = check_ipv4(buf, room, at)
        if bad is not None:
            self.drop("drop_" + bad, 1)
            return 0
        shift = self.shift
        if _u32(buf, at + IP_DST)[0] >> shift != self.local_key:
            self.drop("drop_wrong_subnet", 1)
            return 0
        if _u32(buf, at + IP_SRC)[0] >> shift not in keys:
            self.drop("drop_spoofed_source", 1)
            return 0
        if not decrement_ttl(buf, at):
            self.drop("drop_ttl_exceeded", 1)
            return 0
        return (buf[at + IP_TOTAL_LEN] << 8) | buf[at + IP_TOTAL_LEN + 1]

    def admit6(self, buf, at: int, room: int, keys: frozenset[int]) -> int:
        """The IPv6 rules, as :meth:`admit4`'s: a usable header within ``room`` bytes, for
        our IPv6 subnet, from one of the sending peer's IPv6 subnets, hops left. Returns the
        packet's length with its hop limit counted down, or 0 when refused (counted)."""
        bad = check_ipv6(buf, room, at)
        if bad is not None:
            self.drop("drop_" + bad, 1)
            return 0
        if ipv6_key(buf, at + V6_DST, self.shift6) != self.local_key6:
            self.drop("drop_wrong_subnet", 1)
            return 0
        if ipv6_key(buf, at + V6_SRC, self.shift6) not in keys:
            self.drop("drop_spoofed_source", 1)
            return 0
        if not decrement_hop_limit(buf, at):
            self.drop("drop_ttl_exceeded", 1)
            return 0
        return ipv6_total(buf, at)

    def to_tun(self, pkt: memoryview, vnet_hdr, src: PeerSource, hold: bool = False,
               intact: bool = False) -> None:
        """Admit an inner packet from peer ``src`` by its family's rules and write it to
        the TUN; with ``hold``, keep a plain packet to be merged with its flow's next
        (:meth:`hold`; ``intact``: it came in a GRO run)."""
        n = len(pkt)
        v6 = n > 0 and pkt[0] >> 4 == 6
        total = self.admit6(pkt, 0, n, src.keys6) if v6 else self.admit4(pkt, 0, n, src.keys4)
        if not total:
            return
        if not (hold and self.hold(pkt[:total], src, intact)):
            self.flush_pending()  # keep the order of what came before
            try:
                if self.vnet:
                    os.writev(self.tun_fd, [vnet_hdr, pkt[:total]])
                else:
                    os.write(self.tun_fd, pkt[:total])
            except OSError:
                self.drop("drop_tun_write", 1)
                return
        c = self.c
        c[RX_P] += 1
        c[RX_B] += total
        if v6:
            c[RX6_P] += 1
            c[RX6_B] += total


def _settle(st: list, before: tuple[int, int, int], after: tuple[int, int, int]) -> None:
    st[2] += after[0] - before[0]
    st[3] += after[1] - before[1]
    st[5] += after[2] - before[2]
