"""The wireguard backend's data path: WireGuard framing over the shared transport.

The protocol (handshakes, sessions, timers, cookies, the peer table and every security
check) is :class:`pyflannel.wireguard.device.Device`; this module feeds it and moves its
output, with the udp fast path's batching:

* **send** (:class:`WgSend`): the TUN runs with virtio-net headers and TSO, so the kernel
  hands us TCP super-packets of up to 64 KiB; they are cut into MTU-sized segments here
  (``fastpath/tso.py``), each segment is sealed straight into the GSO batch buffer
  (``Keypair.seal_parts``, which takes its counter from the session, never past
  REJECT_AFTER_MESSAGES) and one peer's equal-sized messages leave in one UDP GSO
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

import ipaddress
import os
import socket
import sys
import time

from pyflannel.fastpath import counters
from pyflannel.fastpath.coalesce import flow_run, join
from pyflannel.fastpath.frames import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET,
    VNET_FLAGS,
    VNET_GSO_TYPE,
    VNET_LEN,
    ZERO_VNET,
    FrameError,
    finish_checksum,
    segment_tcp4,
    segment_tcp6,
)
from pyflannel.fastpath.packet import (
    IPV4_MIN_HEADER,
)
from pyflannel.fastpath.sockfilter import Shedding, attach, socket_drops, wireguard_filter
from pyflannel.fastpath.transport import (
    ANC_SIZE,
    BATCH,
    IDLE_POLL_S,
    Transport,
    gro_size,
)
from pyflannel.fastpath.tso import TcpCut
from pyflannel.wireguard.constants import (
    DATA_MIN_LEN,
    DATA_PAYLOAD,
    MSG_TRANSPORT,
    PAD_MULTIPLE,
)
from pyflannel.wireguard.device import Device
from pyflannel.wireguard.keys import PrivateKey, decode_key, encode_key, short_key
from pyflannel.wireguard.peer import Peer, PeerConfig

C = counters.INDEX
TX_P, TX_B, RX_P, RX_B = C["tx_packets"], C["tx_bytes"], C["rx_packets"], C["rx_bytes"]
BUF_SIZE = 65536 + 64
# A TUN read lands so that the packet starts where a transport message's payload does:
# the virtio-net header sits just before it.
READ_AT = DATA_PAYLOAD - VNET_LEN
# Device drop reasons that have a udp-backend name for the same thing.
# (Its "no_route" never happens here: the loop routes packets itself and counts
# drop_no_route when it answers with ICMP.)
DROP_NAMES = {"inner_src": "drop_spoofed_source", "no_route": ""}
COALESCED = counters.INDEX["coalesced"]
HANDSHAKE_OVER_BUDGET = C["drop_handshake_budget"]
SOCKET_DROPS = C["drop_socket"]
# Handshake messages looked at per loop turn (after the turn's transport data); a flood
# beyond this is dropped unread, and the socket filter sheds most of it in the kernel.
HANDSHAKE_BUDGET = 16

PAD_ROUND = PAD_MULTIPLE - 1
PAD_MASK = ~PAD_ROUND

_ZEROS = bytes(64)


class WgBase(Transport):
    """The device, its clock and the counters both directions share."""

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, *, private_key: PrivateKey,
                 mtu: int = 1420, **options) -> None:
        super().__init__(tun_fd, sock, ctl, mem, **options)
        self.mtu = mtu
        self.dev = Device(private_key, mtu=mtu)
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
                c[C["drop_not_ip"]] += 1
                continue
            pkt = mv[DATA_PAYLOAD:end]
            peer = route(pkt)
            if peer is None:
                self.unreachable(pkt)
                continue
            if vnet and (buf[READ_AT + VNET_FLAGS] or buf[READ_AT + VNET_GSO_TYPE]):
                flags, gso_type, _hl, gso_size, csum_start, csum_off = VNET.unpack_from(
                    buf, READ_AT)
                kind = gso_type & ~GSO_ECN
                try:
                    if kind in (GSO_TCPV4, GSO_TCPV6):
                        self.seal_super(peer, pkt, gso_size)
                        c[C["segmented"]] += 1
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

    def start_run(self, peer: Peer) -> None:
        """Packets for another peer: settle the last run, fetch this peer's session."""
        self.end_run()
        self._run_peer = peer
        self._run_kp = self.dev.sender(peer)
        self._run_addr = peer.endpoint

    def seal(self, peer: Peer, data) -> None:
        """Encrypt one packet for ``peer`` straight into the GSO batch (or hand it to the
        device, which holds it and starts a handshake, when there is no session or the
        session has no counter left)."""
        if peer is not self._run_peer:
            self.start_run(peer)
        kp = self._run_kp
        counter = kp.take_counters() if kp is not None else -1
        if counter < 0:
            self.stage(peer, data)
            return
        n = len(data)
        padded = (n + PAD_ROUND) & PAD_MASK
        if padded > self.mtu >= n:
            padded = self.mtu
        m = DATA_MIN_LEN + padded
        off = self.reserve(self._run_addr, m)  # type: ignore[arg-type]
        kp.seal_parts(self._bbuf, off, counter, (b"".join((data, _ZEROS[:padded - n])),), m)
        self.commit(m, m - n)
        self._run_bytes += m
        self._run_pkts += 1
        self._run_inner += n

    def stage(self, peer: Peer, data) -> None:
        """No session yet: the device holds the packet and starts a handshake (or counts
        it as staged_overflow)."""
        self.dev.send_to(peer, data)
        self._count_tx((), 1, len(data))
        st = self.wg_stats.get(peer)
        if st is not None:
            st[0] += 1
            st[1] += len(data)

    def seal_super(self, peer: Peer, pkt: memoryview, mss: int) -> None:
        """Cut a TCP super-packet into ``mss``-sized segments as TSO would
        (:class:`~pyflannel.fastpath.tso.TcpCut`) and seal each straight into the GSO
        batch, a group of equal-sized ones at a time. The counters for all of them are
        taken at once: when the session has too few left (or there is none), the device
        holds the segments instead and starts a handshake."""
        cut = TcpCut(pkt, mss)
        if peer is not self._run_peer:
            self.start_run(peer)
        kp = self._run_kp
        count = cut.count
        first = kp.take_counters(count) if kp is not None else -1
        if first < 0:
            for seg in (segment_tcp6 if cut.v6 else segment_tcp4)(pkt, mss):
                self.stage(peer, seg)
            return
        bbuf, mtu, addr = self._bbuf, self.mtu, self._run_addr
        last = count - 1
        inner = wire = i = 0
        while i < count:
            seg_len = cut.length(i)
            padded = (seg_len + PAD_ROUND) & PAD_MASK
            if padded > mtu >= seg_len:
                padded = mtu
            m = DATA_MIN_LEN + padded
            # every segment but the last is full-sized: a group of them fills the batch
            off, k = self.reserve_many(addr, m, last - i if i < last else 1)  # type: ignore[arg-type]
            kp.seal_parts(bbuf, off, first + i,  # type: ignore[union-attr]
                          cut.plaintexts(i, k, _ZEROS[:padded - seg_len]), m)
            self.commit_many(k, m, m - seg_len)
            wire += k * m
            inner += k * seg_len
            i += k
        self._run_bytes += wire
        self._run_pkts += count
        self._run_inner += inner

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
        self.shedding = Shedding()
        self._filtered = self._set_filter(0)
        self._kernel_drops = socket_drops(sock)

    def _set_filter(self, shed_shift: int) -> bool:
        """The socket filter (sockfilter.py): shapes WireGuard cannot use, and under a
        flood all but one handshake message in 2^shed_shift, die in the kernel; those from
        the peers' endpoints as we know them now are spared (their rekeys go on)."""
        exempt = [peer.endpoint[0] for peer in self.dev.peers.values()
                  if shed_shift and peer.endpoint is not None]
        try:
            attach(self.sock, wireguard_filter(shed_shift, exempt))
            return True
        except OSError as e:  # the loop's own checks still refuse them, at more cost
            print(f"pyflannel-fastpath: no socket filter on the WireGuard port: {e}",
                  file=sys.stderr, flush=True)
            return False

    def from_udp(self) -> None:
        """Transport data first, as it is read; handshake messages after the batch, at
        most HANDSHAKE_BUDGET a turn (the rest dropped: the peer retries), their rate
        also steering how many the kernel sheds."""
        rbuf = self._rbuf
        recv = self.sock.recvmsg_into
        receive_many = self.dev.receive_many
        bufs = [rbuf]
        handshakes: list[tuple[bytes, tuple]] = []
        over = 0
        for _ in range(BATCH):
            try:
                n, anc, _flags, addr = recv(bufs, ANC_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP: nothing lost here
                continue
            if n and rbuf[0] != MSG_TRANSPORT:
                if len(handshakes) < HANDSHAKE_BUDGET:
                    handshakes.append((bytes(rbuf[:n]), addr))
                else:
                    over += 1
                continue
            seg = gro_size(anc, n)
            try:
                # bytearray slices, not memoryviews: `cryptography` decrypts them faster
                if seg >= n or seg <= 0:
                    receive_many(((rbuf[:n], addr),))
                else:
                    receive_many([(rbuf[off:min(off + seg, n)], addr)
                                  for off in range(0, n, seg)])
            except Exception:  # a bug must not take the data path down: count, go on
                self.dev.drops["internal_error"] += 1
        if handshakes:
            self.pump()  # the sessions' data leaves before any handshake is looked at
            receive = self.dev.receive
            for msg, addr in handshakes:
                receive(msg, addr)
            self.c[HANDSHAKE_OVER_BUDGET] += over
            self._shed(self.shedding.seen(len(handshakes) + over, time.monotonic()))
        self.pump()

    def _shed(self, shift: int | None) -> None:
        if shift is not None and self._filtered:
            self._set_filter(shift)

    def on_timer(self) -> None:
        super().on_timer()
        self._shed(self.shedding.tick(time.monotonic()))

    def publish_counters(self) -> None:
        now = socket_drops(self.sock)
        self.c[SOCKET_DROPS] += (now - self._kernel_drops) & 0xFFFFFFFF  # a u32 that wraps
        self._kernel_drops = now
        super().publish_counters()

    def write_tun(self, packets: list) -> None:
        """Decrypted packets into the TUN; runs of one TCP flow's segments as one
        super-packet (the kernel segments or delivers it as GRO would have)."""
        fd, c = self.tun_fd, self.c
        writev = os.writev
        stats = self.wg_stats
        now = time.monotonic()
        rx_p = rx_b = 0
        i, total = 0, len(packets)
        merge, vnet = self.coalesce, self.vnet
        while i < total:
            pkt, peer = packets[i]
            j, size = flow_run(packets, i) if merge else (i + 1, len(pkt))
            st = stats.get(peer)
            try:
                if j - i > 1:
                    writev(fd, join(packets, i, j, size))
                    c[COALESCED] += j - i
                elif vnet:
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


class WgForwarder(WgSend, WgReceive):
    """The wireguard backend's fast path: a Device between the TUN and the UDP socket."""

    def apply(self, msg: dict) -> list | None:
        """Install the peer table: ``peers`` rows are [public key, [subnets], ip, port].
        Returns the rows refused, [index, why]: each is left out (the device checks every
        row, :meth:`Device.set_peers`), and never holds up the others. A key no longer
        listed loses its sessions at once (a restarted peer's old key, a removed lease).
        """
        if msg.get("op") in ("stop", "stats"):
            return super().apply(msg)
        generation = int(msg.get("generation") or self.generation + 1)
        psk = msg.get("psk")
        keepalive = float(msg.get("keepalive") or 0)
        psk_raw = decode_key(psk) if psk else None  # a bad one refuses the message whole
        # ICMP errors come from the overlay network's own address, per family
        icmp_src, icmp_src6 = self.icmp_src, self.icmp_src6
        if msg.get("family") == 6:
            icmp_src6 = int(msg["icmp_src"]).to_bytes(16, "big")
        else:
            icmp_src = int(msg["icmp_src"]).to_bytes(4, "big")
        if msg.get("icmp_src6") is not None:
            icmp_src6 = int(msg["icmp_src6"]).to_bytes(16, "big")
        table, row_of, refused = {}, {}, []
        for i, row in enumerate(msg["peers"]):
            try:
                pub, subnets, ip, port = row
                key, port = decode_key(pub), int(port)
                if not 0 < port < 65536 or not isinstance(subnets, list):
                    raise ValueError("port out of range, or subnets not a list")
                endpoint = (str(ipaddress.ip_address(ip)), port)
                if key in table:
                    raise ValueError("repeats the public key of an earlier row")
            except (ValueError, TypeError) as e:
                refused.append([i, f"{type(e).__name__}: {e}"[:200]])
                continue
            table[key] = PeerConfig(tuple(map(str, subnets)), endpoint, keepalive)
            row_of[key] = i
        self.dev.psk = psk_raw
        for key, why in self.dev.set_peers(table).items():
            refused.append([row_of[key], why])
        self.icmp_src, self.icmp_src6 = icmp_src, icmp_src6
        self.wg_stats = {p: self.wg_stats.get(p) or [0, 0, 0, 0, 0.0, 0]
                         for p in self.dev.peers.values()}
        self.generation = generation
        return sorted(refused)

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
