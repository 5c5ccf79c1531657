"""``pyflannel demo``: a local cluster in network namespaces, pinging across the overlay.

Everything it builds (namespaces, an etcd, the daemons) is removed when it ends.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from pyflannel.lab import Lab, require_root_and_tools


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pyflannel demo", description=__doc__)
    ap.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    ap.add_argument("--backend", default="udp", help="backend type (default udp)")
    ap.add_argument("--network", default="10.1.0.0/16", help="overlay network")
    args = ap.parse_args(argv)
    reason = require_root_and_tools()
    if reason:
        print(f"pyflannel demo: {reason}", file=sys.stderr)
        return 1
    config = f'{{"Network": "{args.network}", "Backend": {{"Type": "{args.backend}"}}}}'
    with Lab(args.nodes) as lab:
        say(f"lab {lab.prefix}: etcd at {lab.etcd_endpoint}, {args.nodes} nodes on 198.18.0.0/24")
        lab.etcdctl("put", "/coreos.com/network/config", config)
        say(f"network config: {config}")
        gateways = {}
        for node in lab.nodes:
            lab.start_daemon(node)
        for node in lab.nodes:
            env = lab.wait_subnet_file(node)
            lab.add_docker0(node, env["FLANNEL_SUBNET"])
            gateways[node.name] = env["FLANNEL_SUBNET"].split("/")[0]
            say(f"{node.name} ({node.underlay_ip}): FLANNEL_SUBNET={env['FLANNEL_SUBNET']} "
                f"FLANNEL_MTU={env['FLANNEL_MTU']}")
        failures = 0
        for a, b in itertools.permutations(lab.nodes, 2):
            ok = lab.ping(a, gateways[b.name], src_ip=gateways[a.name], count=2)
            failures += not ok
            say(f"ping {a.name} docker0 {gateways[a.name]} -> {b.name} docker0 "
                f"{gateways[b.name]}: {'ok' if ok else 'FAILED'}")
        time.sleep(2.5)  # the daemons publish per-peer counters every 2 s
        say("pyflannel status (from n1):")
        out = lab.run(lab.nodes[0].ns, [sys.executable, "-m", "pyflannel", "status",
                                        f"-etcd-endpoints={lab.etcd_endpoint}",
                                        f"-subnet-file={lab.nodes[0].subnet_file}"], text=True)
        print(out.stdout, flush=True)
        for node in lab.nodes:
            lab.stop_daemon(node)
        if failures:
            for node in lab.nodes:
                print(lab.tail_log(node), file=sys.stderr)
        say(f"{'all' if not failures else 'NOT all'} pairs reachable over the overlay; "
            "tearing the lab down")
    return 1 if failures else 0


def say(text: str) -> None:
    print(f"== {text}", flush=True)
