"""The control plane under load.

    python -m bench.control_load               # churn: does a busy control plane slow traffic?
    python -m bench.control_load --mass 1000   # a thousand host-gw peers added, then removed

Churn: 250 simulated peers in etcd, with lease churn, while iperf3 runs over the udp backend
between two real nodes. The simulated peers are leases (with unreachable public addresses)
that the daemons watch and program into their fast path; the churn re-puts and deletes them
while traffic flows.

Mass: one host-gw node; N peer leases are put in etcd in transactions of 100, then removed
with one range delete, and a new peer is put right after it. Reported: seconds until the
node's routes show all N, until they are all gone, until the new peer's route is there, the
daemon's CPU seconds for the removal, and its log lines per removed peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.measure import cpu_percent_during, iperf_tcp
from pyflannel.lab import Lab, LabNode

CHURN = r"""
import asyncio, random, sys, time
from ipaddress import IPv4Address, IPv4Network
from pyflannel.lease.etcd import EtcdRegistry
from pyflannel.lease.model import LeaseAttrs

async def main(endpoint, peers, seconds, rate):
    reg = EtcdRegistry([endpoint], "/coreos.com/network")
    lease = await reg._call(lambda c: c.lease(3600))
    nets = [IPv4Network((int(IPv4Address("10.2.0.0")) + i * 256, 24)) for i in range(peers)]
    def attrs(i):
        return LeaseAttrs(IPv4Address(f"198.19.{i // 250}.{i % 250 + 1}"), "udp")
    for i, n in enumerate(nets):
        await reg.put_lease(n, attrs(i), lease.id)
    print("loaded", flush=True)
    if seconds:
        end, changes = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            i = random.randrange(peers)
            if random.random() < 0.5:
                await reg.delete_lease(nets[i])
            else:
                await reg.put_lease(nets[i], attrs(i), lease.id)
            changes += 1
            await asyncio.sleep(1 / rate)
        print("changes", changes, flush=True)
    await reg.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
"""


MASS_CONFIG = ('{"Network": "10.0.0.0/8", "SubnetMin": "10.200.0.0", '
               '"SubnetMax": "10.200.255.0", "Backend": {"Type": "host-gw"}}')
SUBNETS = "/coreos.com/network/subnets/"
MASS_KEYS = SUBNETS + "10.1"  # the peers are 10.16.0.0/24 on: keys 10.16.0.0-24, ...
NEW_PEER = ("10.20.0.0/24", SUBNETS + "10.20.0.0-24",
            '{"PublicIP":"198.18.0.249","BackendType":"host-gw"}')

PUT_MASS = r"""
import asyncio, sys, time
from ipaddress import IPv4Address, IPv4Network
import aetcd

async def main(endpoint, n):
    host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as c:
        ops = []
        for i in range(n):
            net = IPv4Network((int(IPv4Address("10.16.0.0")) + i * 256, 24))
            key = f"/coreos.com/network/subnets/{net.network_address}-24"
            value = ('{"PublicIP":"198.18.0.%d","BackendType":"host-gw"}' % (150 + i % 99))
            ops.append(c.transactions.put(key.encode(), value.encode()))
        print("start", time.time(), flush=True)
        for k in range(0, n, 100):
            await c.transaction(compare=[], success=ops[k:k + 100], failure=[])

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def start_mass_node(lab: Lab) -> LabNode:
    """One host-gw node, ready, with no peers yet."""
    lab.etcdctl("put", "/coreos.com/network/config", MASS_CONFIG)
    node = lab.nodes[0]
    lab.start_daemon(node)
    lab.wait_subnet_file(node)
    return node


def our_routes(lab: Lab, node: LabNode) -> set[str]:
    """The destinations of the node's proto-pyflannel routes (IPv4)."""
    out = lab.run(node.ns, ["ip", "-j", "route", "show", "table", "main", "proto", "120"],
                  text=True).stdout
    return {r["dst"] for r in json.loads(out or "[]")}


def _wait_routes(lab: Lab, node: LabNode, timeout: float, **wanted) -> dict[str, float]:
    """Poll the node's routes until each ``wanted`` condition has held; the time.time() at
    which each was first seen to."""
    deadline, seen = time.monotonic() + timeout, {}
    while True:
        routes = our_routes(lab, node)
        now = time.time()
        for name, done in wanted.items():
            if name not in seen and done(routes):
                seen[name] = now
        if len(seen) == len(wanted):
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.name}: {', '.join(set(wanted) - set(seen))} not seen "
                               f"after {timeout:.0f}s ({len(routes)} of our routes in the table)")
        time.sleep(0.05)


def mass_change(lab: Lab, node: LabNode, peers: int, timeout: float = 60) -> dict[str, float]:
    """Put ``peers`` host-gw leases, then remove them with one range delete followed by a
    new peer; how long the node took for each (see the module docstring)."""
    put = lab.run(lab.etcd_ns, [sys.executable, "-c", PUT_MASS, lab.etcd_endpoint,
                                str(peers)], timeout=120, text=True)
    started = float(put.stdout.split()[1])
    added = _wait_routes(lab, node, timeout, all=lambda r: len(r) >= peers)["all"]
    log_lines = len(node.log_file.read_bytes().splitlines())

    def remove() -> tuple[float, float, dict[str, float]]:
        t_delete = time.time()
        lab.etcdctl("del", "--prefix", MASS_KEYS)
        t_new = time.time()
        lab.etcdctl("put", NEW_PEER[1], NEW_PEER[2])
        return t_delete, t_new, _wait_routes(
            lab, node, timeout, new=lambda r: NEW_PEER[0] in r,
            gone=lambda r: not any(d.startswith("10.1") for d in r))

    t0 = time.monotonic()
    (t_delete, t_new, seen), cpu_pct = cpu_percent_during([node.process.pid], remove)
    cpu_s = cpu_pct / 100 * (time.monotonic() - t0)
    lines = len(node.log_file.read_bytes().splitlines()) - log_lines
    return {"peers": peers, "add_s": round(added - started, 3),
            "remove_s": round(seen["gone"] - t_delete, 3),
            "new_peer_s": round(seen["new"] - t_new, 3), "remove_cpu_s": round(cpu_s, 3),
            "log_lines_per_removed_peer": round(lines / peers, 3)}


def mass(peers: int) -> int:
    with Lab(1) as lab:
        got = mass_change(lab, start_mass_node(lab), peers)
    print(f"host-gw, {peers} peers: added in {got['add_s']:.2f} s, removed (one range delete) "
          f"in {got['remove_s']:.2f} s using {got['remove_cpu_s']:.2f} s of CPU, a new peer "
          f"routed {got['new_peer_s']:.2f} s after it was put, "
          f"{got['log_lines_per_removed_peer']:.3f} log lines per removed peer")
    print(json.dumps({"mass": got}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.control_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=250)
    ap.add_argument("--rate", type=float, default=20.0, help="lease changes per second")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mass", type=int, metavar="N",
                    help="instead: N host-gw peers added, then removed at once")
    args = ap.parse_args(argv)
    if args.mass:
        return mass(args.mass)
    # The real nodes lease from 10.3.0.0/16, the simulated peers live in 10.2.0.0/16.
    config = ('{"Network": "10.0.0.0/14", "SubnetMin": "10.3.0.0", "SubnetMax": "10.3.255.0",'
              ' "Backend": {"Type": "udp"}}')
    results: dict[str, list[float]] = {"quiet": [], "churn": [], "quiet_cpu": [], "churn_cpu": []}
    with Lab(2) as lab:
        lab.etcdctl("put", "/coreos.com/network/config", config)
        a, b = lab.nodes
        gws = []
        for n in lab.nodes:
            lab.start_daemon(n, "-healthz-port=9180")
        for n in lab.nodes:
            sub = lab.wait_subnet_file(n)["FLANNEL_SUBNET"]
            lab.add_docker0(n, sub)
            gws.append(sub.split("/")[0])
        pids = [n.process.pid for n in lab.nodes]
        load = lab.run(lab.etcd_ns, [sys.executable, "-c", CHURN, lab.etcd_endpoint,
                                     str(args.peers), "0", "1"], timeout=120, text=True)
        assert "loaded" in load.stdout, load.stderr
        time.sleep(2)
        for _ in range(args.runs):
            gbps, cpu = cpu_percent_during(
                pids, lambda: iperf_tcp(lab, a, b, gws[1], gws[0], args.seconds, 1))
            results["quiet"].append(gbps)
            results["quiet_cpu"].append(cpu)
            churn = lab.popen(lab.etcd_ns, [sys.executable, "-c", CHURN, lab.etcd_endpoint,
                                            str(args.peers), str(args.seconds + 1),
                                            str(args.rate)])
            gbps, cpu = cpu_percent_during(
                pids, lambda: iperf_tcp(lab, a, b, gws[1], gws[0], args.seconds, 1))
            churn.wait(60)
            results["churn"].append(gbps)
            results["churn_cpu"].append(cpu)
    summary = {k: round(statistics.median(v), 3) for k, v in results.items()}
    summary["churn_over_quiet"] = round(summary["churn"] / summary["quiet"], 3)
    print(json.dumps({"peers": args.peers, "rate": args.rate, "samples": results,
                      "medians": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
