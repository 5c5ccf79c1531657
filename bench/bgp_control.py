"""The BGP control plane alone: N speakers in one process on loopback.

    python -m bench.bgp_control --nodes 25 50 100 200 --topology mesh rr

Each speaker is a node on its own 127.0.x.y with its own /24 of 10.0.0.0/8 (next hop a
documentation address: nothing is installed). ``mesh``: every pair peers, the lower address
connects. ``rr``: two reflectors peer with each other and with every node; nodes peer only with
them. Reported per run: sessions per node, seconds until every speaker has every other's route
(convergence), memory per session (traced Python allocations, all speakers together), and the
time for every speaker to forget a node that is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import time
import tracemalloc
from ipaddress import IPv4Address, IPv4Network

from pyflannel.bgp.rib import ImportPolicy, LocalSpeaker
from pyflannel.bgp.session import PeerSpec, Speaker, Timing
from pyflannel.config import parse_config

CFG = parse_config('{"Network": "10.0.0.0/8", "SubnetLen": 24}')
PORT = 17900
TIMING = Timing(hold_time=90, keepalive_time=30, connect_timeout=5, idle_hold_first=0.2,
                idle_hold_max=2)


def address(i: int) -> IPv4Address:
    return IPv4Address(f"127.1.{i // 250}.{i % 250 + 1}")


def make(i: int, reflector: bool) -> Speaker:
    subnet = IPv4Network(f"10.{i // 250}.{i % 250}.0/24")
    local = LocalSpeaker(64512, address(i), (IPv4Address(int(IPv4Address("198.51.0.0")) + i),),
                         cluster_id=IPv4Address("10.255.255.1") if reflector else None)
    speaker = Speaker(local, ImportPolicy.from_pools(CFG.pools, [subnet]),
                      listen=(str(address(i)),), port=PORT, source=(address(i),),
                      timing=TIMING)
    speaker.subnet = subnet  # type: ignore[attr-defined]
    return speaker


def plan(n: int, topology: str) -> list[tuple[int, int, bool]]:
    """(a, b, b_is_client_of_a) pairs that peer."""
    if topology == "mesh":
        return [(a, b, False) for a in range(n) for b in range(a + 1, n)]
    return [(0, 1, False)] + [(r, b, True) for r in (0, 1) for b in range(2, n)]


async def run(n: int, topology: str) -> dict:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    reflectors = {0, 1} if topology == "rr" else set()
    speakers = [make(i, i in reflectors) for i in range(n)]
    for s in speakers:
        await s.start()
    started = time.monotonic()
    pairs = plan(n, topology)
    for a, b, client in pairs:
        sa, sb = speakers[a], speakers[b]
        sa.add_peer(PeerSpec(address(b), 64512, PORT, kind="mesh", rr_client=client))
        sb.add_peer(PeerSpec(address(a), 64512, PORT, kind="mesh", passive=True))
    for s in speakers:
        s.originate(s.subnet)

    def converged(count: int) -> bool:
        return all(len(s.rib.routes()) == count - 1 for s in speakers)

    while not converged(n):
        await asyncio.sleep(0.05)
        if time.monotonic() - started > 600:
            raise TimeoutError("no convergence in 600 s")
    convergence = time.monotonic() - started
    memory = tracemalloc.get_traced_memory()[0] - before
    sessions = sum(len(s.sessions) for s in speakers)
    # A node leaves: its neighbours remove the peer (as the leases say), everybody forgets.
    leaving = speakers[-1]
    t0 = time.monotonic()
    for s in speakers[:-1]:
        s.remove_peer(str(address(n - 1)))
    await leaving.stop()
    while not all(len(s.rib.routes()) == n - 2 for s in speakers[:-1]):
        await asyncio.sleep(0.05)
    removal = time.monotonic() - t0
    for s in speakers[:-1]:
        await s.stop()
    tracemalloc.stop()
    return {"topology": topology, "nodes": n, "sessions_per_node": round(sessions / n, 1),
            "convergence_s": round(convergence, 2), "removal_s": round(removal, 2),
            "memory_per_session_kib": round(memory / sessions / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--topology", nargs="+", default=["mesh", "rr"])
    args = parser.parse_args()
    # Both ends of every session are in this process: a mesh of 200 is 39,800 sockets.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for topology in args.topology:
        for n in args.nodes:
            sockets = 2 * len(plan(n, topology)) + n + 64
            if sockets > hard:
                print(json.dumps({"topology": topology, "nodes": n, "skipped": f"needs "
                                  f"{sockets} sockets in one process, limit {hard}"}))
                continue
            print(json.dumps(asyncio.run(run(n, topology))), flush=True)


if __name__ == "__main__":
    main()
