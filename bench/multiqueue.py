"""Does a multi-queue TUN with several forwarder processes help many-flow loads?

A measurement prototype, outside the daemon: each lab node gets ``flannel0`` opened with
IFF_MULTI_QUEUE (one queue per worker; the kernel picks the queue by flow hash), one UDP
socket per worker bound to :8285 with SO_REUSEPORT, and a classic-BPF program on the group
that steers each datagram by its *inner* flow (all datagrams between two nodes share ports
8285 to 8285, so the kernel's own hash would send everything to one worker).

    python -m bench.multiqueue          # 1 vs 2 workers, iperf3 TCP with 1 and 4 streams

Flannel's framing is used (one packet per datagram), where per-packet work dominates and
parallelism could pay most. Results and conclusions: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import struct
import sys
import time
from ipaddress import IPv4Address, IPv4Network

from bench.measure import iperf_tcp
from pyflannel.lab import Lab

SO_ATTACH_REUSEPORT_CBPF = 51


def steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """The socket index from the inner flow: saddr ^ daddr ^ ports, mixed by a
    multiplicative hash (Linux gives connect() even ports only, so the low bits of the
    ports alone would send every stream to the same worker), modulo ``workers``."""
    ld_abs, tax, xor_x, rsh_k, mul_k, mod_k, ret_a = 0x20, 0x07, 0xAC, 0x74, 0x24, 0x94, 0x16
    return [(ld_abs, 0, 0, 20), (tax, 0, 0, 0), (ld_abs, 0, 0, 12), (xor_x, 0, 0, 0),
            (tax, 0, 0, 0), (ld_abs, 0, 0, 16), (xor_x, 0, 0, 0),
            (tax, 0, 0, 0), (rsh_k, 0, 0, 16), (xor_x, 0, 0, 0),  # fold the halves
            (mul_k, 0, 0, 0x9E3779B1), (rsh_k, 0, 0, 24),
            (mod_k, 0, 0, workers), (ret_a, 0, 0, 0)]


def attach_steering(sock: socket.socket, workers: int) -> object:
    prog = steering_program(workers)
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    return buf  # keep the program's memory alive while the socket uses it


def node_main(argv: list[str]) -> int:
    """Runs inside a node's namespace: devices, sockets and N forwarder processes."""
    import pytun

    from pyflannel.fastpath.forwarder import tune_socket
    from pyflannel.fastpath.handle import FastPath, Route
    from pyflannel.host import netlink
    from pyflannel.host.routes import RouteSpec, sync_routes

    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--local", required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--peer", required=True)  # subnet=public ip
    ap.add_argument("--gso", type=int, default=1)
    args = ap.parse_args(argv)
    local = IPv4Network(args.local)
    peer_net, peer_ip = args.peer.split("=")
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_MULTI_QUEUE
    queues = [pytun.TunTapDevice(name="flannel0", flags=flags) for _ in range(args.workers)]
    index = netlink.set_device_address("flannel0", local.network_address, 1472, 10000)
    sync_routes({IPv4Network("10.1.0.0/16"): RouteSpec(IPv4Network("10.1.0.0/16"), index)})
    socks, keep = [], []
    for _ in range(args.workers):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((args.address, 8285))
        tune_socket(s)
        socks.append(s)
    if args.workers > 1:
        keep.append(attach_steering(socks[0], args.workers))
    paths = []
    for q, s in zip(queues, socks, strict=True):
        import os

        os.set_blocking(q.fileno(), False)
        fp = FastPath(q.fileno(), s, gso=bool(args.gso), gro=bool(args.gso))
        fp.start()
        fp.configure(local, IPv4Address("10.1.0.0"),
                     [Route(IPv4Network(peer_net), IPv4Address(peer_ip), 8285)])
        paths.append(fp)
    print("ready", flush=True)
    try:
        sys.stdin.read()  # until the bench closes our stdin
    finally:
        shares = [{k: fp.counters()[k] for k in ("tx_packets", "rx_packets")} for fp in paths]
        print(json.dumps(shares), flush=True)
        for fp in paths:
            fp.stop()
    return 0


def measure(workers: int, seconds: float, runs: int, gso: bool) -> dict[str, list[float]]:
    import subprocess

    out: dict[str, list[float]] = {"tcp1_gbps": [], "tcp4_gbps": [], "tcp8_gbps": []}
    with Lab(2, with_etcd=False) as lab:
        a, b = lab.nodes
        nets = {a.name: "10.1.1.0/24", b.name: "10.1.2.0/24"}
        procs = []
        for node, other in ((a, b), (b, a)):
            p = lab.popen(node.ns, [sys.executable, "-m", "bench.multiqueue", "--node",
                                    "--workers", str(workers), "--local", nets[node.name],
                                    "--address", node.underlay_ip,
                                    "--peer", f"{nets[other.name]}={other.underlay_ip}",
                                    "--gso", str(int(gso))],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert p.stdout.readline().strip() == b"ready"
            procs.append(p)
            lab.add_docker0(node, nets[node.name].replace(".0/", ".1/"))
        src, dst = "10.1.1.1", "10.1.2.1"
        deadline = time.monotonic() + 10
        while not lab.ping(a, dst, src_ip=src, timeout=1):
            if time.monotonic() > deadline:
                raise RuntimeError("prototype nodes cannot reach each other")
        for _ in range(runs):
            for streams in (1, 4, 8):
                out[f"tcp{streams}_gbps"].append(
                    iperf_tcp(lab, a, b, dst, src, seconds, streams))
        for p in procs:
            p.stdin.close()
        out["per_worker_packets"] = [json.loads(p.stdout.readline()) for p in procs]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--node"]:
        return node_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench.multiqueue", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    # GSO batches mix flows, and steering sees only a batch's first packet: the queues then
    # collapse onto one worker. So the comparison that can show parallelism is without GSO;
    # the single worker with GSO (the shipped design) is measured alongside.
    for workers, gso in ((1, True), (1, False), (2, False)):
        result = measure(workers, args.seconds, args.runs, gso)
        print(f"workers={workers} gso={gso}: " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
