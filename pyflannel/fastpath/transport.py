"""The transport half of every fast path: TUN and UDP I/O, GSO batches, the loop.

A framing (flannel/vnet1 in ``forwarder.py``, WireGuard in ``wg.py``) subclasses
:class:`Transport` and supplies three methods: ``from_tun`` (packets the kernel routed to
the overlay device), ``from_udp`` (datagrams from the underlay) and ``apply`` (a control
message). Everything else is shared here, so a new framing costs its own logic only:

* the control socket (newline-delimited JSON, ``stop`` and per-peer ``stats``);
* the GSO batch: equal-sized datagrams to one address gathered into one ``sendmsg`` with
  ``UDP_SEGMENT`` (the last may be shorter), falling back to one datagram each where the
  kernel has no UDP GSO; framings either copy a finished datagram in (:meth:`batch`) or
  build it in place (:meth:`reserve` then :meth:`commit`);
* UDP GRO: :func:`gro_size` reads the segment size from the control message;
* ICMP "net unreachable" (ICMPv6 "no route") for destinations nobody leases;
* counters in shared memory, written once per loop turn; the epoll loop, with an
  optional timer (:meth:`next_timeout` / :meth:`on_timer`) for protocols that need one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time

from pyflannel.fastpath import counters
from pyflannel.fastpath.frames import MAX_DATAGRAM, ZERO_VNET
from pyflannel.fastpath.packet import (
    icmp_net_unreachable,
    icmpv6_no_route,
    wants_icmp_error,
    wants_icmpv6_error,
)

BATCH = 256  # reads per readiness event before looking at the other fds
SOCKET_BUFFER = 8 << 20
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
ANC_SIZE = socket.CMSG_SPACE(4)
IDLE_POLL_S = 0.5  # the loop wakes at least this often (counters, control EOF)

_seg = struct.Struct("=H").pack
_int = struct.Struct("=i").unpack_from
C = counters.INDEX
TX_P, TX_B, RX_P, RX_B = C["tx_packets"], C["tx_bytes"], C["rx_packets"], C["rx_bytes"]


def gro_size(anc: list, n: int) -> int:
    """The datagram size of a GRO run (UDP_GRO is our only control message), else ``n``."""
    return _int(anc[0][2])[0] if anc else n


class Transport:
    """TUN fd, UDP socket, control socket and shared counters, and the loop over them.

    ``vnet``: the TUN was opened with IFF_VNET_HDR and offloads (reads and writes carry a
    virtio-net header). ``gso``/``gro``: use UDP segmentation/receive offload.
    ``datagram_size``: the largest datagram the underlay carries unfragmented.
    """

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, *, vnet: bool = False, gso: bool = True,
                 gro: bool = True, datagram_size: int = 1472) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.ctl = ctl
        self.mem = mem
        self.vnet = vnet
        self.gso = gso
        self.gro = gro and enable_gro(sock)
        self.c = [0] * len(counters.NAMES)
        self.peer_stats: dict[str, list] = {}
        self.rx_dropped = 0
        self.icmp_src = b"\0\0\0\0"
        self.icmp_src6: bytes | None = None  # None: the network has no IPv6 to sign with
        self.running = True
        self.generation = 0  # tables installed so far
        self._ctl_buf = b""
        self.datagram_size = datagram_size
        # The pending GSO batch towards one address.
        self._bbuf = bytearray(MAX_DATAGRAM + 65536)
        self._bmv = memoryview(self._bbuf)
        self._b_addr: tuple | None = None
        self._b_off = self._b_seg = self._b_count = self._packets_in_batch = 0
        self._b_overhead = 0  # framing bytes in the batch (not traffic)
        self._b_closed = False

    # -- control -----------------------------------------------------------------------

    def apply(self, msg: dict) -> list | None:
        """Handle one control message; framings extend this with their table, and return
        the rows they refused as [index, why] pairs."""
        if msg.get("op") == "stop":
            self.running = False
            return
        if msg.get("op") == "stats":
            # The id lets the control plane tell this reply from a late one.
            self.answer(msg.get("id"), {"stats": self.stats_reply()})
            return
        raise KeyError(f"unknown op {msg.get('op')!r}")

    def stats_reply(self) -> dict:
        """Per-peer counters: [tx_p, tx_b, rx_p, rx_b, last_rx age, drops] by address."""
        now = time.monotonic()
        return {ip: [st[0], st[1], st[2], st[3], now - st[4] if st[4] else None, st[5]]
                for ip, st in self.peer_stats.items()}

    def on_control(self) -> None:
        data = self.ctl.recv(1 << 20)
        if not data:  # the control plane is gone: so are we
            self.running = False
            return
        self._ctl_buf += data
        *lines, self._ctl_buf = self._ctl_buf.split(b"\n")
        for line in lines:
            if line.strip():
                self.on_request(line)

    def on_request(self, line: bytes) -> None:
        """Carry out one control line. A table install (it carries an ``id``) is answered
        with the generation applied and the rows refused, or with the error that refused
        it whole; the old table then stays in force."""
        msg = None
        try:
            msg = json.loads(line)
            refused = self.apply(msg)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            # A request cut short by a send timeout on the other side, or one we cannot
            # use: skip it, keep forwarding by the table we have. (Only the exception's
            # type: a control message may carry a pre-shared key.)
            why = f"{type(e).__name__} in a control message"
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pyflannel-fastpath: ignored a "
                  f"bad control message: {why}", file=sys.stderr, flush=True)
            if isinstance(msg, dict) and msg.get("op") == "config" and "id" in msg:
                self.answer(msg["id"], {"error": why})
            return
        if msg.get("op") == "config" and "id" in msg:
            self.answer(msg["id"], {"applied": self.generation, "refused": refused or []})

    def answer(self, rid: object, doc: dict) -> None:
        """One reply line to request ``rid``."""
        self.ctl.sendall(json.dumps({"id": rid, **doc}).encode() + b"\n")

    # -- UDP out: GSO batches ------------------------------------------------------------

    def batch(self, addr: tuple, pkt, overhead: int = 0) -> None:
        """Queue one finished datagram; a GSO batch holds equal-sized datagrams to one
        address, the last of which may be shorter. ``overhead``: its framing bytes (not
        counted as traffic)."""
        # reserve() and commit(), inlined: this runs once per packet
        n = len(pkt)
        if (addr != self._b_addr or n > self._b_seg or self._b_closed
                or self._b_off + n > MAX_DATAGRAM or self._b_count >= GSO_MAX_SEGMENTS
                or not self.gso):
            self.flush()
            self._b_addr, self._b_seg = addr, n
        off = self._b_off
        self._bbuf[off:off + n] = pkt
        self._b_off = off + n
        self._b_count += 1
        self._packets_in_batch += 1
        self._b_overhead += overhead
        if n < self._b_seg:
            self._b_closed = True

    def reserve(self, addr: tuple, n: int) -> int:
        """Room for an ``n``-byte datagram to ``addr`` in the batch (flushing first when it
        cannot join): its offset, where the framing builds the datagram in place."""
        if (addr != self._b_addr or n > self._b_seg or self._b_closed
                or self._b_off + n > MAX_DATAGRAM or self._b_count >= GSO_MAX_SEGMENTS
                or not self.gso):
            self.flush()
            self._b_addr, self._b_seg = addr, n
        return self._b_off

    def commit(self, n: int, overhead: int = 0) -> None:
        """The datagram at the reserved offset is ``n`` bytes long and complete."""
        self._b_off += n
        self._b_count += 1
        self._packets_in_batch += 1
        self._b_overhead += overhead
        if n < self._b_seg:
            self._b_closed = True

    def reserve_many(self, addr: tuple, n: int, k: int) -> tuple[int, int]:
        """Room for up to ``k`` ``n``-byte datagrams to ``addr``: (the offset of the first,
        how many fit in this batch, at least one). Build them there, then
        :meth:`commit_many`."""
        off = self.reserve(addr, n)
        return off, max(1, min(k, GSO_MAX_SEGMENTS - self._b_count, (MAX_DATAGRAM - off) // n))

    def commit_many(self, k: int, n: int, overhead: int = 0) -> None:
        """``k`` datagrams of ``n`` bytes each (``overhead`` framing bytes in each) are
        complete from the reserved offset on."""
        self._b_off += k * n
        self._b_count += k
        self._packets_in_batch += k
        self._b_overhead += k * overhead
        if n < self._b_seg:
            self._b_closed = True

    def flush(self) -> None:
        count = self._b_count
        if not count:
            return
        size, seg, addr = self._b_off, self._b_seg, self._b_addr
        packets, inner = self._packets_in_batch, size - self._b_overhead
        self._b_off = self._b_count = self._packets_in_batch = self._b_overhead = 0
        self._b_closed = False
        data = self._bmv[:size]
        if count > 1 and not self.gso:
            for off in range(0, size, seg):
                self._send_one(data[off:off + seg], addr)
            self._count_tx(addr, packets, inner)
            return
        try:
            if count == 1:
                self.sock.sendto(data, addr)
            else:
                self.sock.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, _seg(seg))], 0, addr)
        except OSError as e:
            if count > 1 and e.errno in (errno.EINVAL, errno.EIO, errno.EOPNOTSUPP):
                self.gso = False  # no UDP GSO here: one datagram per packet from now on
                for off in range(0, size, seg):
                    self._send_one(data[off:off + seg], addr)
                self._count_tx(addr, packets, inner)
                return
            self.c[C["drop_send_error"]] += packets
            return
        self._count_tx(addr, packets, inner)

    def _count_tx(self, addr: tuple, packets: int, inner_bytes: int) -> None:
        """Traffic counts inner packets and their bytes, whatever the framing."""
        self.c[TX_P] += packets
        self.c[TX_B] += inner_bytes
        st = self.peer_stats.get(addr[0])
        if st is not None:
            st[0] += packets
            st[1] += inner_bytes

    def _send_one(self, data, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.c[C["drop_send_error"]] += 1

    # -- TUN -----------------------------------------------------------------------------

    def unreachable(self, pkt) -> None:
        """No node leases the destination: tell the sender, as a router would (ICMP net
        unreachable, or ICMPv6 no route to destination)."""
        self.c[C["drop_no_route"]] += 1
        n = len(pkt)
        if n and pkt[0] >> 4 == 6:
            reply = (icmpv6_no_route(pkt, n, self.icmp_src6)
                     if self.icmp_src6 is not None and wants_icmpv6_error(pkt, n) else None)
        else:
            reply = (icmp_net_unreachable(pkt, n, self.icmp_src)
                     if wants_icmp_error(pkt, n) else None)
        if reply is not None:
            try:
                os.write(self.tun_fd, ZERO_VNET + reply if self.vnet else reply)
                self.c[C["icmp_unreachable_sent"]] += 1
            except OSError:
                pass

    def drop(self, reason: str, k: int = 1) -> None:
        """Count a packet from a known peer that did not make it into the TUN."""
        self.c[C[reason]] += k
        self.rx_dropped += k

    # -- the framing's part ----------------------------------------------------------------

    def from_tun(self) -> None:
        raise NotImplementedError

    def from_udp(self) -> None:
        raise NotImplementedError

    def next_timeout(self) -> float:
        """Seconds until the framing's next timer (the loop never sleeps longer)."""
        return IDLE_POLL_S

    def on_timer(self) -> None:
        """Called once per loop turn after I/O: run what is due."""

    def publish_counters(self) -> None:
        """Write the counters to shared memory (once per loop turn, not per packet)."""
        if self.mem is not None:
            counters.write(self.mem, self.c)

    # -- loop --------------------------------------------------------------------------

    def run(self) -> None:
        ep = select.epoll()
        tun, udp, ctl = self.tun_fd, self.sock.fileno(), self.ctl.fileno()
        for fd in (tun, udp, ctl):
            ep.register(fd, select.EPOLLIN)
        try:
            while self.running:
                events = ep.poll(self.next_timeout())
                # A new table is installed before the packets that woke us are handled.
                if any(fd == ctl for fd, _ev in events):
                    self.on_control()
                for fd, _ev in events:
                    if fd == tun:
                        self.from_tun()
                    elif fd == udp:
                        self.from_udp()
                self.on_timer()
                self.publish_counters()
        finally:
            ep.close()


def enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        return False


def tune_socket(sock: socket.socket) -> None:
    """Buffers sized for the rate: the kernel's 208 KiB default drops bursts (flanneld)."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def die_with_parent() -> None:
    """SIGTERM when the daemon dies, so the TUN device is released with it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
