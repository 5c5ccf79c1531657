"""The wireguard backend's data path: WireGuard framing over the shared transport.

The protocol (handshakes, sessions, timers, cookies, the peer table and every security
check) is :class:`pyflannel.wireguard.device.Device`; this module feeds it and moves its
output, with the udp fast path's batching:

* **send** (:class:`WgSend`): the TUN runs with virtio-net headers and TSO, so the kernel
  hands us TCP super-packets of up to 64 KiB; they are cut into MTU-sized segments here,
  each segment is encrypted in place inside the GSO batch buffer (``Keypair.seal_into``:
  no copy of the ciphertext) and one peer's equal-sized messages leave in one UDP GSO
  ``sendmsg``. WireGuard pads to 16 bytes, so a run of full segments has equal sizes.
* **receive** (:class:`WgReceive`): UDP GRO hands us runs of datagrams, decrypted by
  ``Device.receive_many`` in one call per run. What comes out was authenticated by a peer
  and has an inner source in that peer's subnet (the device checks both); consecutive TCP
  segments of one flow are joined into one super-packet with a virtio-net header before
  the TUN write (GRO in user space), the rest is written one packet each.

Drops are counted by the device by reason and copied into the shared counters once per
loop turn; per-peer figures come back through the ``stats`` control request.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from pyflannel.fastpath import counters
from pyflannel.fastpath.frames import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    VNET,
    VNET_FLAGS,
    VNET_GSO_TYPE,
    VNET_LEN,
    ZERO_VNET,
    FrameError,
    finish_checksum,
    ones_sum,
    segment_tcp4,
)
from pyflannel.fastpath.packet import (
    IP_CSUM,
    IP_DST,
    IP_FRAG,
    IP_PROTO,
    IP_SRC,
    IP_TOTAL_LEN,
    IPV4_MIN_HEADER,
)
from pyflannel.fastpath.transport import ANC_SIZE, BATCH, IDLE_POLL_S, Transport, gro_size
from pyflannel.wireguard.constants import DATA_MIN_LEN, DATA_PAYLOAD
from pyflannel.wireguard.device import Device
from pyflannel.wireguard.keys import PrivateKey, decode_key, encode_key, short_key
from pyflannel.wireguard.peer import Peer, PeerConfig
from pyflannel.wireguard.transport import padded_length

C = counters.INDEX
TX_P, TX_B, RX_P, RX_B = C["tx_packets"], C["tx_bytes"], C["rx_packets"], C["rx_bytes"]
BUF_SIZE = 65536 + 64
# A TUN read lands so that the packet starts where a transport message's payload does:
# the virtio-net header sits just before it.
READ_AT = DATA_PAYLOAD - VNET_LEN
# Device drop reasons that have a udp-backend name for the same thing.
DROP_NAMES = {"no_route": "drop_no_route", "inner_src": "drop_spoofed_source"}
TCP_PROTO = 6
TCP_SEQ = 4  # TCP header fields (offsets from the TCP header)
TCP_DOFF = 12
TCP_FLAGS = 13
TCP_CSUM = 16
TCP_ACK_ONLY = 0x10
TCP_ACK_PSH = 0x18
COALESCE_MAX = 65000  # a joined super-packet stays below 64 KiB with its headers

_u16 = struct.Struct("!H")
_u32 = struct.Struct("!I")


class WgBase(Transport):
    """The device, its clock and the counters both directions share."""

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, *, private_key: PrivateKey,
                 mtu: int = 1420, **options) -> None:
        super().__init__(tun_fd, sock, ctl, mem, **options)
        self.mtu = mtu
        self.dev = Device(private_key, mtu=mtu)
        self.local_net = 0
        self.local_mask = 0
        # per peer: [tx_p, tx_b, rx_p, rx_b, last_rx (monotonic), drops]
        self.wg_stats: dict[Peer, list] = {}

    def _count_tx(self, addr: tuple, packets: int, inner_bytes: int) -> None:
        """Totals only: per-peer figures are kept per key, not per address (roaming)."""
        self.c[TX_P] += packets
        self.c[TX_B] += inner_bytes

    def pump(self) -> None:
        """Write what the device decrypted to the TUN and send what it produced."""
        dev = self.dev
        if dev.to_tun:
            tun, dev.to_tun = dev.to_tun, []
            self.write_tun(tun)
        if dev.to_net:
            net, dev.to_net = dev.to_net, []
            self.flush()
            for msg, endpoint in net:
                self._send_one(msg, endpoint)

    def write_tun(self, packets: list) -> None:
        raise NotImplementedError

    def next_timeout(self) -> float:
        deadline = self.dev.next_deadline()
        if deadline is None:
            return IDLE_POLL_S
        return max(0.0, min(IDLE_POLL_S, deadline - self.dev.clock()))

    def on_timer(self) -> None:
        deadline = self.dev.next_deadline()
        if deadline is not None and deadline <= self.dev.clock():
            self.dev.tick()
            self.pump()

    def publish_counters(self) -> None:
        c = self.c
        for reason, k in self.dev.drops.items():
            i = C.get(DROP_NAMES.get(reason, "drop_" + reason))
            if i is not None:
                c[i] = k
        for name, k in self.dev.stats.items():
            i = C.get("wg_" + name)
            if i is not None:
                c[i] = k
        super().publish_counters()


class WgSend(WgBase):
    """TUN -> UDP: route by destination, segment, seal in place, batch per peer."""

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, **options) -> None:
        super().__init__(tun_fd, sock, ctl, mem, **options)
        self._buf = bytearray(BUF_SIZE)
        self._mv = memoryview(self._buf)
        self._rd = [self._mv[READ_AT:]] if self.vnet else [self._mv[DATA_PAYLOAD:]]
        self._run_peer: Peer | None = None
        self._run_kp = None
        self._run_addr: tuple | None = None
        self._run_bytes = self._run_pkts = self._run_inner = 0

    def from_tun(self) -> None:
        buf, mv, c = self._buf, self._mv, self.c
        rd, fd = self._rd, self.tun_fd
        readv = os.readv
        route = self.dev.route
        vnet = self.vnet
        base = READ_AT if vnet else DATA_PAYLOAD
        for _ in range(BATCH):
            try:
                n = readv(fd, rd)
            except BlockingIOError:
                break
            end = base + n
            if end - DATA_PAYLOAD < IPV4_MIN_HEADER or buf[DATA_PAYLOAD] >> 4 not in (4, 6):
                c[C["drop_not_ipv4"]] += 1
                continue
            pkt = mv[DATA_PAYLOAD:end]
            peer = route(pkt)
            if peer is None:
                if buf[DATA_PAYLOAD] >> 4 == 4:
                    self.unreachable(pkt)
                else:
                    c[C["drop_no_route"]] += 1
                continue
            if vnet and (buf[READ_AT + VNET_FLAGS] or buf[READ_AT + VNET_GSO_TYPE]):
                flags, gso_type, _hl, gso_size, csum_start, csum_off = VNET.unpack_from(
                    buf, READ_AT)
                kind = gso_type & ~GSO_ECN
                try:
                    if kind == GSO_TCPV4:
                        segments = segment_tcp4(pkt, gso_size)
                        c[C["segmented"]] += 1
                        for s in segments:
                            self.seal(peer, s)
                        continue
                    if kind != GSO_NONE:
                        raise FrameError(f"unsupported GSO type {gso_type}")
                    if flags & F_NEEDS_CSUM:
                        finish_checksum(pkt, csum_start, csum_off)
                except FrameError:
                    c[C["drop_bad_offload"]] += 1
                    continue
            self.seal(peer, pkt)
        self.end_run()
        self.flush()
        self.pump()

    def seal(self, peer: Peer, data) -> None:
        """Encrypt one packet for ``peer`` straight into the GSO batch (or hand it to the
        device, which holds it and starts a handshake, when there is no session)."""
        if peer is not self._run_peer:
            self.end_run()
            self._run_peer = peer
            self._run_kp = self.dev.sender(peer)
            self._run_addr = peer.endpoint
        kp = self._run_kp
        if kp is None:
            # held until the handshake completes (or counted as staged_overflow)
            self.dev.send_to(peer, data)
            self._count_tx((), 1, len(data))
            st = self.wg_stats.get(peer)
            if st is not None:
                st[0] += 1
                st[1] += len(data)
            return
        n = len(data)
        m = DATA_MIN_LEN + padded_length(n, self.mtu)
        off = self.reserve(self._run_addr, m)  # type: ignore[arg-type]
        self._bbuf[off + DATA_PAYLOAD:off + DATA_PAYLOAD + n] = data
        kp.seal_into(self._bmv[off:off + m], n, self.mtu)
        self.commit(m, m - n)
        self._run_bytes += m
        self._run_pkts += 1
        self._run_inner += n

    def end_run(self) -> None:
        """Once per run of packets to one peer: the device's timers and counters."""
        peer, kp = self._run_peer, self._run_kp
        if peer is not None and kp is not None and self._run_pkts:
            self.dev.sent(peer, kp, self._run_bytes)
            st = self.wg_stats.get(peer)
            if st is not None:
                st[0] += self._run_pkts
                st[1] += self._run_inner
        self._run_peer = self._run_kp = self._run_addr = None
        self._run_bytes = self._run_pkts = self._run_inner = 0


class WgReceive(WgBase):
    """UDP -> TUN: decrypt runs of datagrams, coalesce TCP, write to the TUN."""

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, *, coalesce: bool = True,
                 **options) -> None:
        super().__init__(tun_fd, sock, ctl, mem, **options)
        self.coalesce = coalesce and self.vnet
        self._rbuf = bytearray(BUF_SIZE)
        self._rmv = memoryview(self._rbuf)

    def from_udp(self) -> None:
        rbuf, rmv = self._rbuf, self._rmv
        recv = self.sock.recvmsg_into
        receive_many = self.dev.receive_many
        bufs = [rbuf]
        for _ in range(BATCH):
            try:
                n, anc, _flags, addr = recv(bufs, ANC_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP: nothing lost here
                continue
            seg = gro_size(anc, n)
            try:
                if seg >= n or seg <= 0:
                    receive_many(((rmv[:n], addr),))
                else:
                    receive_many([(rmv[off:min(off + seg, n)], addr)
                                  for off in range(0, n, seg)])
            except Exception:  # a bug must not take the data path down: count, go on
                self.dev.drops["internal_error"] += 1
        self.pump()

    def write_tun(self, packets: list) -> None:
        """Decrypted packets into the TUN; runs of one TCP flow's segments as one
        super-packet (the kernel segments or delivers it as GRO would have)."""
        fd, c = self.tun_fd, self.c
        writev = os.writev
        stats = self.wg_stats
        now = time.monotonic()
        rx_p = rx_b = 0
        i, total = 0, len(packets)
        while i < total:
            pkt, peer = packets[i]
            j = self._flow_run(packets, i) if self.coalesce else i + 1
            st = stats.get(peer)
            size = sum(len(p) for p, _ in packets[i:j]) if j - i > 1 else len(pkt)
            try:
                if j - i > 1:
                    hdr, parts = self._join(packets, i, j)
                    writev(fd, [hdr, *parts])
                    c[C["wg_coalesced"]] += j - i
                elif self.vnet:
                    writev(fd, [ZERO_VNET, pkt])
                else:
                    writev(fd, [pkt])
            except OSError:
                c[C["drop_tun_write"]] += j - i
                if st is not None:
                    st[5] += j - i
                i = j
                continue
            rx_p += j - i
            rx_b += size
            if st is not None:
                st[2] += j - i
                st[3] += size
                st[4] = now
            i = j
        c[RX_P] += rx_p
        c[RX_B] += rx_b

    @staticmethod
    def _flow_run(packets: list, i: int) -> int:
        """The end of the run of TCP segments from ``i`` that one super-packet can carry:
        same peer and flow, plain 20-byte IPv4 headers, contiguous sequence numbers, equal
        sizes (the last may be shorter), only ACK (and PSH on the last), no IP options or
        fragments."""
        first, peer = packets[i]
        n = len(packets)
        if i + 1 >= n or len(first) < 40 or first[0] != 0x45 or first[IP_PROTO] != TCP_PROTO:
            return i + 1
        if first[IP_FRAG] & 0x3F or first[IP_FRAG + 1]:  # a fragment
            return i + 1
        doff = (first[IPV4_MIN_HEADER + TCP_DOFF] >> 4) * 4
        hl = IPV4_MIN_HEADER + doff
        mss = len(first) - hl
        if mss <= 0 or first[IPV4_MIN_HEADER + TCP_FLAGS] != TCP_ACK_ONLY or doff < 20:
            return i + 1
        flow = first[IP_SRC:IP_DST + 4] + first[IPV4_MIN_HEADER:IPV4_MIN_HEADER + 4]
        opts = first[IPV4_MIN_HEADER + 20:hl]
        seq = _u32.unpack_from(first, IPV4_MIN_HEADER + TCP_SEQ)[0] + mss
        total = len(first)
        j = i + 1
        while j < n:
            p, q = packets[j]
            if q is not peer or len(p) < hl or p[0] != 0x45 or p[IP_PROTO] != TCP_PROTO:
                break
            plen = len(p) - hl
            if (p[IP_SRC:IP_DST + 4] + p[IPV4_MIN_HEADER:IPV4_MIN_HEADER + 4] != flow
                    or (p[IPV4_MIN_HEADER + TCP_DOFF] >> 4) * 4 != doff
                    or p[IPV4_MIN_HEADER + 20:hl] != opts
                    or _u32.unpack_from(p, IPV4_MIN_HEADER + TCP_SEQ)[0] != seq
                    or plen <= 0 or plen > mss or p[IP_FRAG] & 0x3F or p[IP_FRAG + 1]
                    or total + plen > COALESCE_MAX):
                break
            flags = p[IPV4_MIN_HEADER + TCP_FLAGS]
            if flags not in (TCP_ACK_ONLY, TCP_ACK_PSH):
                break
            total += plen
            seq = (seq + plen) & 0xFFFFFFFF
            j += 1
            if plen < mss or flags == TCP_ACK_PSH:
                break  # a short or pushed segment ends a super-packet
        return j

    @staticmethod
    def _join(packets: list, i: int, j: int) -> tuple[bytes, list]:
        """virtio-net header + first segment's headers (length, checksums fixed) and the
        payloads of segments i..j-1 as a gather list."""
        first = packets[i][0]
        doff = (first[IPV4_MIN_HEADER + TCP_DOFF] >> 4) * 4
        hl = IPV4_MIN_HEADER + doff
        mss = len(first) - hl
        payload_len = sum(len(p) - hl for p, _ in packets[i:j])
        total = hl + payload_len
        head = bytearray(first[:hl])
        _u16.pack_into(head, IP_TOTAL_LEN, total)
        head[IP_CSUM] = head[IP_CSUM + 1] = 0
        _u16.pack_into(head, IP_CSUM, ~ones_sum(head[:IPV4_MIN_HEADER]) & 0xFFFF)
        # the last segment's flags (PSH) go on the super-packet
        head[IPV4_MIN_HEADER + TCP_FLAGS] = packets[j - 1][0][IPV4_MIN_HEADER + TCP_FLAGS]
        # partial checksum: the pseudo-header sum, the kernel adds the rest
        pseudo = bytes(head[IP_SRC:IP_DST + 4]) + bytes((0, TCP_PROTO)) + _u16.pack(total - 20)
        _u16.pack_into(head, IPV4_MIN_HEADER + TCP_CSUM, ones_sum(pseudo))
        hdr = VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, hl, mss, IPV4_MIN_HEADER, TCP_CSUM)
        return hdr + bytes(head), [memoryview(p)[hl:] for p, _ in packets[i:j]]


class WgForwarder(WgSend, WgReceive):
    """The wireguard backend's fast path: a Device between the TUN and the UDP socket."""

    def apply(self, msg: dict) -> None:
        """Install the peer table: ``peers`` rows are [public key, [subnets], ip, port].

        The device checks the whole table before it replaces the old one; a key no longer
        listed loses its sessions at once (a restarted peer's old key, a removed lease).
        """
        if msg.get("op") in ("stop", "stats"):
            super().apply(msg)
            return
        shift = 32 - int(msg["subnet_len"])
        psk = msg.get("psk")
        keepalive = float(msg.get("keepalive") or 0)
        table = {}
        for pub, subnets, ip, port in msg["peers"]:
            table[decode_key(pub)] = PeerConfig(tuple(subnets), (str(ip), int(port)),
                                                keepalive)
        self.dev.psk = decode_key(psk) if psk else None
        self.dev.set_peers(table)
        self.local_net = int(msg["local_net"])
        self.local_mask = (0xFFFFFFFF << shift) & 0xFFFFFFFF
        self.icmp_src = struct.pack("!I", int(msg["icmp_src"]))
        self.wg_stats = {p: self.wg_stats.get(p) or [0, 0, 0, 0, 0.0, 0]
                         for p in self.dev.peers.values()}
        self.generation += 1

    def stats_reply(self) -> dict:
        """Per peer (by public key): traffic, and what `wg show` prints; no secrets."""
        now = time.monotonic()
        wall = time.time()
        reply = {}
        for key, peer in self.dev.peers.items():
            st = self.wg_stats.get(peer) or [0, 0, 0, 0, 0.0, 0]
            ep = peer.endpoint
            reply[encode_key(key)] = {
                "tx_packets": st[0], "tx_bytes": st[1], "rx_packets": st[2],
                "rx_bytes": st[3], "last_rx_age_s": now - st[4] if st[4] else None,
                "rx_dropped": st[5],
                "public_key": short_key(key),
                "endpoint": None if ep is None else f"{ep[0]}:{ep[1]}",
                "latest_handshake": peer.last_handshake,
                "handshake_age_s": (wall - peer.last_handshake
                                    if peer.last_handshake else None),
                "wire_rx_bytes": peer.rx_bytes, "wire_tx_bytes": peer.tx_bytes,
                "session": peer.current is not None,
            }
        return reply
