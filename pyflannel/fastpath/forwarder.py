"""The udp backend's forwarding loop (flannel framing: one raw IPv4 packet per datagram).

Runs alone in its own process so that nothing in the control plane (gRPC, JSON, logging) can
take the interpreter from it. Every packet costs one read and one send system call; the
Python between them is kept to dictionary look-ups and byte arithmetic on a reused buffer.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import sys

from pyflannel.fastpath import counters
from pyflannel.fastpath.packet import check_ipv4, icmp_net_unreachable, wants_icmp_error

BATCH = 256  # packets handled per readiness event before looking at the other fds
BUF_SIZE = 65536
SOCKET_BUFFER = 8 << 20

_u32 = struct.Struct("!I").unpack_from
C = counters.INDEX


class Forwarder:
    """Moves packets between ``tun_fd`` and ``sock`` by the peer table it is given."""

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.ctl = ctl
        self.mem = mem
        self.c = [0] * len(counters.NAMES)
        self.peers: dict[int, tuple[str, int]] = {}  # subnet key -> (public ip, port)
        self.sources: dict[str, int] = {}  # public ip -> subnet key
        self.shift = 8
        self.local_key = -1
        self.icmp_src = b"\0\0\0\0"
        self.running = True
        self.generation = 0  # tables installed so far
        self._ctl_buf = b""
        self._buf = bytearray(BUF_SIZE)
        self._mv = memoryview(self._buf)

    # -- control -----------------------------------------------------------------------

    def apply(self, msg: dict) -> None:
        """Install a new table atomically (whole dicts are swapped, never edited)."""
        if msg.get("op") == "stop":
            self.running = False
            return
        shift = 32 - int(msg["subnet_len"])
        local_net = int(msg["local_net"])
        peers = {int(net) >> shift: (ip, int(port)) for net, ip, port in msg["peers"]}
        self.shift = shift
        self.local_key = local_net >> shift
        # ICMP errors come from the overlay network's own address (10.1.0.0): never a
        # local address, which the kernel would drop as a martian source.
        self.icmp_src = struct.pack("!I", int(msg["icmp_src"]))
        self.sources = {ip: key for key, (ip, _port) in peers.items()}
        self.peers = peers
        self.generation += 1

    def on_control(self) -> None:
        data = self.ctl.recv(1 << 20)
        if not data:  # the control plane is gone: so are we
            self.running = False
            return
        self._ctl_buf += data
        *lines, self._ctl_buf = self._ctl_buf.split(b"\n")
        for line in lines:
            if line:
                self.apply(json.loads(line))

    # -- TUN -> UDP --------------------------------------------------------------------

    def from_tun(self) -> None:
        buf, mv, c = self._buf, self._mv, self.c
        bufs = [buf]
        fd, readv = self.tun_fd, os.readv
        peers, shift, sendto = self.peers, self.shift, self.sock.sendto
        tx_p = tx_b = 0
        for _ in range(BATCH):
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                break
            if n < 20 or buf[0] >> 4 != 4:
                c[C["drop_not_ipv4"]] += 1
                continue
            peer = peers.get(_u32(buf, 16)[0] >> shift)
            if peer is None:
                self.unreachable(n)
                continue
            ttl = buf[8]
            if ttl <= 1:
                c[C["drop_ttl_exceeded"]] += 1
                continue
            buf[8] = ttl - 1
            csum = ((buf[10] << 8) | buf[11]) + 0x0100
            csum = (csum & 0xFFFF) + (csum >> 16)
            buf[10] = csum >> 8
            buf[11] = csum & 0xFF
            try:
                sendto(mv[:n], peer)
            except OSError:
                c[C["drop_send_error"]] += 1
                continue
            tx_p += 1
            tx_b += n
        c[C["tx_packets"]] += tx_p
        c[C["tx_bytes"]] += tx_b

    def unreachable(self, n: int) -> None:
        """No node leases the destination: tell the sender, as a router would."""
        self.c[C["drop_no_route"]] += 1
        if wants_icmp_error(self._buf, n):
            try:
                os.write(self.tun_fd, icmp_net_unreachable(self._buf, n, self.icmp_src))
                self.c[C["icmp_unreachable_sent"]] += 1
            except OSError:
                pass

    # -- UDP -> TUN --------------------------------------------------------------------

    def from_udp(self) -> None:
        buf, mv, c = self._buf, self._mv, self.c
        recv = self.sock.recvfrom_into
        fd, write = self.tun_fd, os.write
        sources, shift, local_key = self.sources, self.shift, self.local_key
        rx_p = rx_b = 0
        for _ in range(BATCH):
            try:
                n, addr = recv(buf, BUF_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP; nothing lost here
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            if addr[0] not in sources:
                c[C["drop_unknown_source"]] += 1
                continue
            bad = check_ipv4(buf, n)
            if bad is not None:
                c[C["drop_" + bad]] += 1
                continue
            if _u32(buf, 16)[0] >> shift != local_key:
                c[C["drop_wrong_subnet"]] += 1
                continue
            ttl = buf[8]
            if ttl <= 1:
                c[C["drop_ttl_exceeded"]] += 1
                continue
            buf[8] = ttl - 1
            csum = ((buf[10] << 8) | buf[11]) + 0x0100
            csum = (csum & 0xFFFF) + (csum >> 16)
            buf[10] = csum >> 8
            buf[11] = csum & 0xFF
            total = (buf[2] << 8) | buf[3]
            try:
                write(fd, mv[:total])
            except OSError:
                c[C["drop_tun_write"]] += 1
                continue
            rx_p += 1
            rx_b += total
        c[C["rx_packets"]] += rx_p
        c[C["rx_bytes"]] += rx_b

    # -- loop --------------------------------------------------------------------------

    def run(self) -> None:
        ep = select.epoll()
        tun, udp, ctl = self.tun_fd, self.sock.fileno(), self.ctl.fileno()
        for fd in (tun, udp, ctl):
            ep.register(fd, select.EPOLLIN)
        mem = self.mem
        try:
            while self.running:
                events = ep.poll(0.5)
                # A new table is installed before the packets that woke us are handled.
                if any(fd == ctl for fd, _ev in events):
                    self.on_control()
                for fd, _ev in events:
                    if fd == tun:
                        self.from_tun()
                    elif fd == udp:
                        self.from_udp()
                if mem is not None:
                    counters.write(mem, self.c)
        finally:
            ep.close()


def tune_socket(sock: socket.socket) -> None:
    """Buffers sized for the rate: the kernel's 208 KiB default drops bursts (flanneld)."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the fast-path process; the fds are inherited from the daemon."""
    ap = argparse.ArgumentParser(prog="pyflannel-fastpath")
    for name in ("tun-fd", "udp-fd", "ctl-fd", "counters-fd"):
        ap.add_argument(f"--{name}", type=int, required=True)
    args = ap.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(fileno=args.udp_fd)
    ctl = socket.socket(fileno=args.ctl_fd)
    fwd = Forwarder(args.tun_fd, sock, ctl, counters.attach(args.counters_fd))
    fwd.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
