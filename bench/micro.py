"""Per-packet cost of the fast path's Python, without the kernel's share: the forwarder is
driven through a datagram socketpair standing in for the TUN, on loopback.

    python -m bench.micro

Also measures what counting costs: the counter operations the loop performs per packet
and per wake-up, timed on their own, as a share of the measured per-packet cost.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import timeit
from ipaddress import IPv4Address

from pyflannel.fastpath import counters
from pyflannel.fastpath.forwarder import Forwarder
from pyflannel.fastpath.packet import checksum

N = 200_000


def ipv4(src: str, dst: str, size: int) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0,
                                IPv4Address(src).packed, IPv4Address(dst).packed))
    hdr[10:12] = struct.pack("!H", checksum(hdr))
    return bytes(hdr) + bytes(size - 20)


def rig(gso: bool = True):
    tun_app, tun_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_fwd.setblocking(False)
    for s in (tun_app, tun_fwd):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.2", 0))
    for s in (udp, peer):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    ctl, fwd_ctl = socket.socketpair()
    mem_fd, mem = counters.create_shared()
    fwd = Forwarder(tun_fwd.fileno(), udp, fwd_ctl, mem, gso=gso)
    fwd.apply({"op": "config", "subnet_len": 24, "local_net": int(IPv4Address("10.1.1.0")),
               "icmp_src": int(IPv4Address("10.1.0.0")),
               "peers": [[int(IPv4Address("10.1.2.0")), "127.0.0.2", peer.getsockname()[1]]]})
    return fwd, tun_app, peer, udp, (tun_fwd, ctl, fwd_ctl, mem_fd)


def per_packet_rx(size: int) -> float:
    """Seconds of forwarder time per packet, peer -> UDP -> forwarder -> TUN."""
    fwd, tun_app, peer, udp, _keep = rig()
    pkt = ipv4("10.1.2.7", "10.1.1.5", size)
    dst = udp.getsockname()
    done = threading.Event()

    def drain():
        n = 0
        while n < N:
            n += 1
            tun_app.recv(65536)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    busy = 0.0
    sent = 0
    while sent < N:
        for _ in range(64):
            peer.sendto(pkt, dst)
        sent += 64
        t0 = time.perf_counter()
        fwd.from_udp()
        busy += time.perf_counter() - t0
    done.wait(30)
    return busy / N


def per_packet_tx(size: int) -> float:
    """Seconds of forwarder time per packet, TUN -> forwarder -> UDP (GSO batches)."""
    fwd, tun_app, peer, _udp, _keep = rig()
    pkt = ipv4("10.1.1.5", "10.1.2.7", size)
    done = threading.Event()

    def drain():
        peer.settimeout(2)
        try:
            while True:
                peer.recv(65536)
        except OSError:
            done.set()

    threading.Thread(target=drain, daemon=True).start()
    busy = 0.0
    sent = 0
    while sent < N:
        for _ in range(64):
            tun_app.send(pkt)
        sent += 64
        t0 = time.perf_counter()
        fwd.from_tun()
        busy += time.perf_counter() - t0
    return busy / N


def counting_cost() -> dict[str, float]:
    """The counter work, timed alone: per packet (two list increments) and per wake-up
    (one shared-memory write of every counter)."""
    c = [0] * len(counters.NAMES)
    fd, mem = counters.create_shared()
    g = {"c": c, "mem": mem, "counters": counters}
    per_packet = min(timeit.repeat("c[2] += 1; c[3] += 1400", globals=g, number=200_000,
                                   repeat=5)) / 200_000
    per_wakeup = min(timeit.repeat("counters.write(mem, c)", globals=g, number=100_000,
                                   repeat=5)) / 100_000
    return {"per_packet_s": per_packet, "per_wakeup_s": per_wakeup}


def main() -> None:
    out = {}
    for size in (64, 1400):
        out[f"rx_{size}B_us"] = per_packet_rx(size) * 1e6
        out[f"tx_{size}B_us"] = per_packet_tx(size) * 1e6
    cost = counting_cost()
    out["count_per_packet_us"] = cost["per_packet_s"] * 1e6
    out["count_per_wakeup_us"] = cost["per_wakeup_s"] * 1e6
    out["counting_share_rx_1400B_pct"] = 100 * cost["per_packet_s"] / (out["rx_1400B_us"] / 1e6)
    print(json.dumps({k: round(v, 3) for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
