"""bgp beside host-gw on the lab: TCP throughput, and how fast a node's route spreads.

    python -m bench.bgp_routes --rounds 10

Per backend, a three-node lab: iperf3 TCP between two nodes' pods (the same kernel path for
both), then ``rounds`` times: start n3's daemon and time from its lease appearing in etcd (an
``etcdctl watch`` sees the PUT) until its route is on n1 and on n2; then stop it, delete its
lease, and time until the route is gone from both. host-gw spreads routes through the etcd
watch, bgp over BGP sessions (the lease only says who the peers are). Prints one JSON line per
backend with p50 and p99 (of n1 and n2 together).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time

from bench.measure import iperf_tcp
from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, start_node

CONFIGS = {
    "host-gw": {"Network": "10.1.0.0/16", "Backend": {"Type": "host-gw"}},
    "bgp": {"Network": "10.1.0.0/16", "Backend": {"Type": "bgp", "GracefulRestartTime": 1}},
}
PREFIX = "/coreos.com/network/subnets/"


class LeaseWatch:
    """``etcdctl watch`` in the etcd namespace: the arrival time of each PUT and DELETE."""

    def __init__(self, lab: Lab) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.proc = lab.popen(lab.etcd_ns, ["etcdctl", f"--endpoints={lab.etcd_endpoint}",
                                            "watch", "--prefix", PREFIX],
                              stdout=subprocess.PIPE, env={"ETCDCTL_API": "3"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind = None
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line in ("PUT", "DELETE"):
                kind = line
            elif kind and line.startswith(PREFIX):
                self.events.append((time.monotonic(), kind, line))
                kind = None

    def first_put_after(self, t: float, timeout: float = 30) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, kind, key in self.events:
                if kind == "PUT" and when >= t:
                    return when, key
            time.sleep(0.005)
        raise TimeoutError("no lease appeared")


def subnet_of(key: str) -> str:
    return key.rsplit("/", 1)[1].split("&")[0].replace("-", "/")


def has_route(lab: Lab, ns: str, subnet: str) -> bool:
    return bool(lab.run(ns, ["ip", "route", "show", subnet], text=True).stdout.strip())


def until_each(lab: Lab, nss: list[str], subnet: str, present: bool, since: float
               ) -> list[float]:
    """Seconds from ``since`` until each namespace has (or no longer has) the route."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(done) < len(nss):
        for ns in nss:
            if ns not in done and has_route(lab, ns, subnet) == present:
                done[ns] = time.monotonic() - since
        if time.monotonic() > deadline:
            raise TimeoutError(f"route {subnet} {'in' if present else 'out'}: {done}")
    return list(done.values())


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def run(kind: str, rounds: int, seconds: float) -> dict:
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, json.dumps(CONFIGS[kind]))
        n1, n2, n3 = lab.nodes
        a, b = start_node(lab, n1), start_node(lab, n2)
        time.sleep(1)
        gbit = iperf_tcp(lab, n1, n2, b.gw, a.gw, seconds, 1)
        watch = LeaseWatch(lab)
        time.sleep(0.5)
        appear: list[float] = []
        gone: list[float] = []
        for _ in range(rounds):
            t = time.monotonic()
            lab.start_daemon(n3)
            when, key = watch.first_put_after(t)
            appear += until_each(lab, [n1.ns, n2.ns], subnet_of(key), True, when)
            lab.stop_daemon(n3)
            t_del = time.monotonic()
            lab.etcdctl("del", key)
            gone += until_each(lab, [n1.ns, n2.ns], subnet_of(key), False, t_del)
        watch.proc.terminate()
        return {"backend": kind, "tcp_gbit_s": round(gbit, 2), "rounds": rounds,
                "route_appears_ms_p50": p(appear, 0.5), "route_appears_ms_p99": p(appear, 0.99),
                "route_gone_ms_p50": p(gone, 0.5), "route_gone_ms_p99": p(gone, 0.99),
                "route_appears_ms_mean": round(statistics.mean(appear) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--backends", nargs="+", default=["host-gw", "bgp"])
    args = parser.parse_args()
    for kind in args.backends:
        print(json.dumps(run(kind, args.rounds, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
