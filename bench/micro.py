"""Per-packet cost of the fast path's Python, without the kernel's share: the forwarder is
driven through a datagram socketpair standing in for the TUN, on loopback; and the
WireGuard fast path's pieces (sealing, receiving, joining, cipher, checksum), in CPU time.

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


class WireRecorder:
    """Stands for a forwarder's UDP socket: keeps the datagrams its sends would put on the
    wire (a GSO send cut at its segment size), so the Transport batches and flushes as it
    does in service, and the bench times its Python, not the kernel."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data, addr) -> None:
        self.sent.append(bytes(data))

    def sendmsg(self, buffers, ancillary, flags, addr) -> None:
        data = b"".join(buffers)
        (seg,) = struct.unpack("=H", ancillary[0][2])
        self.sent.extend(data[o:o + seg] for o in range(0, len(data), seg))


def wireguard_costs(rounds: int = 200) -> dict[str, float]:
    """CPU time (µs, best of 5) of the WireGuard fast path's Python, sockets left out:
    per segment of a 64 KiB TSO super-packet cut and sealed into the GSO batch, per
    message through ``Device.receive_many``, per packet joined for the TUN, and the two C
    calls that dominate (cipher, checksum)."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from pyflannel.fastpath.coalesce import flow_run, join
    from pyflannel.fastpath.frames import ones_sum
    from pyflannel.fastpath.wg import WgForwarder
    from pyflannel.wireguard.device import Device
    from pyflannel.wireguard.keys import PrivateKey
    from pyflannel.wireguard.peer import PeerConfig

    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    tun, ctl = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fa = WgForwarder(tun.fileno(), udp, ctl, None, private_key=ka, mtu=1420, vnet=True)
    db = Device(kb)
    ep = ("127.0.0.1", 9)
    fa.dev.set_peers({kb.public: PeerConfig(("10.1.2.0/24",), ep)})
    db.set_peers({ka.public: PeerConfig(("10.1.1.0/24",), ep)})
    fa.dev.initiate(kb.public)
    for m, _ in fa.dev.drain()[1]:
        db.receive(m, ep)
    for m, _ in db.drain()[1]:
        fa.dev.receive(m, ep)
    peer = fa.dev.peers[kb.public]
    mss, segments = 1368, 47
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1000, 1, 5 << 4, 0x10, 512, 0, 0)
    payload = os.urandom(mss * segments)
    sp = bytearray(ipv4("10.1.1.5", "10.1.2.7", 40 + len(payload))[:20] + tcp + payload)
    sp[9] = 6
    sp[10:12] = b"\0\0"
    sp[10:12] = struct.pack("!H", checksum(sp[:20]))
    struct.pack_into("!H", sp, 36, ones_sum(bytes(sp[12:20]) + b"\0\x06"
                                          + struct.pack("!H", len(sp) - 20)))
    pkt = memoryview(sp)
    wire = fa.sock = WireRecorder()  # type: ignore[assignment]
    sent = wire.sent

    def best(fn, per: int) -> float:
        times = []
        for _ in range(5):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return min(times) / per * 1e6

    def send() -> None:
        for _ in range(rounds):
            fa.seal_super(peer, pkt, mss)
        fa.end_run()
        fa.flush()

    out = {"wg_send_per_segment_us": best(send, rounds * segments)}
    messages = sent[:rounds * segments]
    db.receive_many([(bytearray(messages[0]), ep)])  # confirms the responder's session
    batches = [[(bytearray(m), ep) for m in messages[k:k + 45]]
               for k in range(1, len(messages), 45)]
    t0 = time.process_time()
    for batch in batches:
        db.receive_many(batch)
    out["wg_receive_per_message_us"] = (time.process_time() - t0) / (len(messages) - 1) * 1e6
    packets = db.to_tun
    t0 = time.process_time()
    i = 0
    while i < len(packets):
        j, size = flow_run(packets, i)
        if j - i > 1:
            join(packets, i, j, size)
        i = j
    out["wg_gro_join_per_packet_us"] = (time.process_time() - t0) / len(packets) * 1e6
    aead = ChaCha20Poly1305(os.urandom(32))
    plain, nonce = bytearray(os.urandom(1408)), bytes(12)
    cipher = aead.encrypt(nonce, bytes(plain), None)
    chunk = pkt[40:40 + mss]
    for name, stmt in (("wg_encrypt_1408B_us", lambda: aead.encrypt(nonce, plain, None)),
                       ("wg_decrypt_1424B_us", lambda: aead.decrypt(nonce, cipher, None)),
                       ("wg_checksum_1368B_us",
                        lambda: int.from_bytes(chunk, "little") % 0xFFFF)):
        out[name] = min(timeit.repeat(stmt, number=20_000, repeat=5)) / 20_000 * 1e6
    for s in (tun, ctl, udp):
        s.close()
    return out


def main() -> None:
    out = {}
    out.update(wireguard_costs())
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
