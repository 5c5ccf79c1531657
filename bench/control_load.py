"""Does a busy control plane slow the data path? 250 simulated peers in etcd, with lease
churn, while iperf3 runs over the udp backend between two real nodes.

    python -m bench.control_load

The simulated peers are leases (with unreachable public addresses) that the daemons watch
and program into their fast path; the churn re-puts and deletes them while traffic flows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.measure import cpu_percent_during, iperf_tcp
from pyflannel.lab import Lab

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.control_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=250)
    ap.add_argument("--rate", type=float, default=20.0, help="lease changes per second")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
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
