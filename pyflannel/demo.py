"""``pyflannel demo``: a local cluster in network namespaces, pinging across the overlay.

Everything it builds (namespaces, an etcd, the daemons) is removed when it ends. With
``--docker`` each node also runs a real dockerd started from mk-docker-opts' output, and
containers on different nodes ping each other and fetch a page over HTTP.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from pyflannel.lab import Lab, LabError, require_root_and_tools


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pyflannel demo", description=__doc__)
    ap.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    ap.add_argument("--backend", default="udp", help="backend type (default udp)")
    ap.add_argument("--network", default="10.1.0.0/16", help="overlay network")
    ap.add_argument("--ipv6", metavar="NETWORK", help="dual-stack: also this IPv6 overlay "
                    "network (e.g. fc00:10:1::/48), pinged over IPv6 as well")
    ap.add_argument("--docker", action="store_true", help="run a real dockerd on every node "
                    "(options from mk-docker-opts) and ping between containers; needs "
                    "Debian's docker.io and busybox-static")
    args = ap.parse_args(argv)
    reason = require_root_and_tools()
    if not reason and args.docker:
        if args.ipv6:
            reason = "--docker is IPv4 only (mk-docker-opts has no IPv6 options)"
        else:
            from pyflannel.labdocker import docker_missing

            reason = docker_missing()
            reason = reason and f"--docker {reason}"
    if reason:
        print(f"pyflannel demo: {reason}", file=sys.stderr)
        return 1
    doc: dict = {"Network": args.network, "Backend": {"Type": args.backend}}
    if args.ipv6:
        doc.update(EnableIPv6=True, IPv6Network=args.ipv6)
    config = json.dumps(doc)
    with Lab(args.nodes) as lab:
        say(f"lab {lab.prefix}: etcd at {lab.etcd_endpoint}, {args.nodes} nodes on 198.18.0.0/24"
            + (f", work directory {lab.workdir}" if args.docker else ""))
        lab.etcdctl("put", "/coreos.com/network/config", config)
        say(f"network config: {config}")
        gateways: dict[str, list[str]] = {}
        if args.docker:
            for node in lab.nodes:
                # What Docker itself sets when it turns forwarding on: real Docker hosts
                # forward only what someone (here pyflanneld) allows.
                lab.run(node.ns, ["iptables", "-P", "FORWARD", "DROP"])
            say("FORWARD policy DROP on every node, as on a Docker host")
        for node in lab.nodes:
            lab.start_daemon(node)
        if args.docker:
            try:
                failures = containers(lab)
            except LabError as exc:  # dockerd would not start: its log tail says why
                print(f"pyflannel demo: {exc}", file=sys.stderr)
                return 1
            return finish(lab, failures)
        for node in lab.nodes:
            env = lab.wait_subnet_file(node)
            subnet6 = env.get("FLANNEL_IPV6_SUBNET")
            lab.add_docker0(node, env["FLANNEL_SUBNET"], subnet6)
            gateways[node.name] = [s.split("/")[0] for s in (env["FLANNEL_SUBNET"], subnet6)
                                   if s]
            say(f"{node.name} ({node.underlay_ip}): FLANNEL_SUBNET={env['FLANNEL_SUBNET']} "
                + (f"FLANNEL_IPV6_SUBNET={subnet6} " if subnet6 else "")
                + f"FLANNEL_MTU={env['FLANNEL_MTU']}")
        failures = 0
        for a, b in itertools.permutations(lab.nodes, 2):
            for src, dst in zip(gateways[a.name], gateways[b.name], strict=True):
                ok = lab.ping(a, dst, src_ip=src, count=2)
                failures += not ok
                say(f"ping {a.name} docker0 {src} -> {b.name} docker0 {dst}: "
                    f"{'ok' if ok else 'FAILED'}")
        return finish(lab, failures)


def containers(lab: Lab) -> int:
    """A dockerd per node from mk-docker-opts, one web-serving container on each, and
    every container pinging and fetching from every other; the number of failures."""
    from pyflannel.labdocker import LabDocker

    docker = LabDocker(lab)
    addresses: dict[str, str] = {}
    envs = {node.name: lab.wait_subnet_file(node) for node in lab.nodes}
    options = docker.start_all()
    for node in lab.nodes:
        env = envs[node.name]
        say(f"{node.name} ({node.underlay_ip}): FLANNEL_SUBNET={env['FLANNEL_SUBNET']} "
            f"FLANNEL_MTU={env['FLANNEL_MTU']}; dockerd {' '.join(options[node.name])}")
        docker[node].import_busybox()
        page = f"hello from a container on {node.name}"
        addresses[node.name] = docker[node].run(
            "web", "sh", "-c", f"echo '{page}' > /www/index.html; exec httpd -f -p 80 -h /www")
        say(f"{node.name}: container 'web' at {addresses[node.name]}")
    failures = 0
    for a, b in itertools.permutations(lab.nodes, 2):
        dst = addresses[b.name]
        pinged = docker[a].exec("web", f"ping -c 2 -W 2 {dst}", check=False).returncode == 0
        page = docker[a].exec("web", f"timeout 10 wget -q -O - http://{dst}/",
                              check=False).stdout.strip()
        ok = pinged and page.endswith(b.name)
        failures += not ok
        say(f"ping+http {a.name} container {addresses[a.name]} -> {b.name} container {dst}: "
            f"{'ok' if ok else 'FAILED'}" + (f" ({page!r})" if ok else ""))
    return failures


def finish(lab: Lab, failures: int) -> int:
    """Print the status table, stop the daemons and say how it went; the exit status."""
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
