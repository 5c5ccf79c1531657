"""Encapsulation throughput, side by side in one run: the bare underlay, pyflannel udp with
flannel's framing (with and without joining received packets per TCP flow), pyflannel udp
with the vnet1 fast framing, pyflannel's wireguard backend, wireguard-go (set up as
flanneld sets up its device: the encrypted peer to beat), vxlan and host-gw; then TCP over
IPv6 inner packets on udp-fast, vxlan and host-gw (a dual-stack network, "-v6" rows).

    python -m bench.run            # the full run (about 6-8 minutes on 2 vCPUs)
    python -m bench.run --quick    # a smoke run (about a minute)

The wireguard and wireguard-go setups are also measured under a handshake flood from one
host (bench/flood.py, 100k datagrams a second: initiations with a valid mac1, and random
bytes; the smoke run pings under the first only): ping loss, and TCP as a share of
unflooded.

Prints a table of medians (min-max), ratios to the underlay and to vxlan, and writes JSON
and (with the ``bench`` extra, matplotlib) a PNG chart to bench/results/. Timings are
figures to compare, never test assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import chart, flood, wg
from bench.measure import (
    cpu_percent_during,
    idle_fraction,
    iperf_tcp,
    iperf_udp,
    ping_latency,
)
from pyflannel.lab import Lab, LabNode, require_root_and_tools

CONFIG_KEY = "/coreos.com/network/config"


@dataclass
class Setup:
    name: str
    backend: str | None  # None: no overlay at all (or, with ``wireguard_go``, not ours)
    extra: tuple[str, ...] = ()
    wireguard_go: bool = False  # wireguard-go devices instead of pyflannel daemons
    ipv6: bool = False  # measure between the nodes' IPv6 pod addresses (dual-stack)


SETUPS = [
    Setup("underlay", None),
    # flannel's framing before and after joining received packets per TCP flow
    Setup("udp-flannel-nocoalesce", "udp", ("-udp-framing=flannel", "-udp-coalesce=false")),
    Setup("udp-flannel", "udp", ("-udp-framing=flannel",)),
    Setup("udp-fast", "udp"),
    Setup("wireguard", "wireguard"),
    Setup("wireguard-go", None, wireguard_go=True),
    Setup("vxlan", "vxlan"),
    Setup("host-gw", "host-gw"),
    Setup("bgp", "bgp"),  # routes learned over BGP: the same kernel path as host-gw
    # raw-socket tunnels, one inner packet per datagram like udp-flannel
    Setup("gre", "gre"),
    Setup("ipip", "ipip"),
    Setup("udp-fast-v6", "udp", ipv6=True),
    Setup("vxlan-v6", "vxlan", ipv6=True),
    Setup("host-gw-v6", "host-gw", ipv6=True),
]
IPV6_NETWORK = "fc00:10:1::/48"
_wggo: wg.WireguardGo | None = None


@dataclass
class Plan:
    tcp_runs: int
    tcp_seconds: int  # iperf3 takes whole seconds (0 would mean "forever")
    udp_seconds: int
    pings: int
    udp_pps: int = 100_000
    idle_check_s: float = 1.0  # how long to watch the machine idle before each setup
    tcp4: bool = True  # the 4-stream runs (the smoke run leaves them out) ...
    udp_sizes: tuple[int, ...] = (1400, 64)  # ... and the 64-byte flood
    # the WireGuard setups under a handshake flood from one host (bench/flood.py): pings
    # for this long, then (flood_tcp) one TCP stream for tcp_seconds, while it runs
    flood_kinds: tuple[str, ...] = ("mac1", "random")
    flood_ping_s: float = 3.0
    flood_rate: int = 100_000
    flood_tcp: bool = True

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(1, 1, 1, 20, idle_check_s=0.25, tcp4=False, udp_sizes=(1400,),
                       flood_kinds=("mac1",), flood_ping_s=1.0, flood_tcp=False)
        return cls(3, 8, 4, 200)


@dataclass
class Result:
    setup: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        xs = self.samples.get(metric)
        return statistics.median(xs) if xs else None


def endpoints(lab: Lab, setup: Setup) -> tuple[LabNode, LabNode, str, str]:
    """(client node, server node, client address, server address) for this setup."""
    global _wggo
    a, b = lab.nodes
    if setup.backend is None and not setup.wireguard_go:
        return a, b, a.underlay_ip, b.underlay_ip
    subnets = []
    for node in (a, b):
        if node.process is not None:
            lab.stop_daemon(node)
    if setup.wireguard_go:
        _wggo = wg.WireguardGo(lab)
        a, b, src, dst = _wggo.start()
        deadline = time.monotonic() + 10
        while not lab.ping(a, dst, src_ip=src, timeout=1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{setup.name}: nodes cannot reach each other")
        return a, b, src, dst
    config = {"Network": "10.1.0.0/16", "Backend": {"Type": setup.backend}}
    if setup.ipv6:
        config.update(EnableIPv6=True, IPv6Network=IPV6_NETWORK)
    lab.etcdctl("put", CONFIG_KEY, json.dumps(config))
    for node in (a, b):
        if node.subnet_file.exists():
            node.subnet_file.unlink()
        env = wg.daemon_env(node) if setup.backend == "wireguard" else None
        lab.start_daemon(node, *setup.extra, env=env)
    for node in (a, b):
        env = lab.wait_subnet_file(node, timeout=30)
        lab.add_docker0(node, env["FLANNEL_SUBNET"], env.get("FLANNEL_IPV6_SUBNET"))
        subnet = env["FLANNEL_IPV6_SUBNET"] if setup.ipv6 else env["FLANNEL_SUBNET"]
        subnets.append(subnet.split("/")[0])
    deadline = time.monotonic() + 10
    while not (lab.ping(a, subnets[1], src_ip=subnets[0], timeout=1)
               and lab.ping(b, subnets[0], src_ip=subnets[1], timeout=1)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{setup.name}: nodes cannot reach each other")
    return a, b, subnets[0], subnets[1]


def daemon_pids(lab: Lab) -> list[int]:
    pids = [n.process.pid for n in lab.nodes if n.process is not None]
    return pids + (_wggo.pids() if _wggo is not None else [])


def measure(lab: Lab, setup: Setup, plan: Plan) -> Result:
    global _wggo
    if setup.wireguard_go and not wg.WireguardGo.available():
        res = Result(setup.name)
        res.notes.append("wireguard-go or wg not installed: not measured")
        return res
    try:
        return _measure(lab, setup, plan)
    finally:
        if _wggo is not None:
            _wggo.stop()
            _wggo = None


def _measure(lab: Lab, setup: Setup, plan: Plan) -> Result:
    res = Result(setup.name)
    client, server, src, dst = endpoints(lab, setup)
    idle = idle_fraction(plan.idle_check_s)
    if idle < 0.85:
        res.notes.append(f"machine only {idle:.0%} idle before the run: disturbed")
    lat = ping_latency(lab, client, dst, src, plan.pings)
    res.add("ping_p50_ms", lat[0])
    res.add("ping_p99_ms", lat[1])
    for _ in range(plan.tcp_runs):
        gbps, cpu = cpu_percent_during(
            daemon_pids(lab), lambda: iperf_tcp(lab, client, server, dst, src,
                                                plan.tcp_seconds, 1))
        res.add("tcp1_gbps", gbps)
        if setup.backend is not None or setup.wireguard_go:
            res.add("daemon_cpu_pct", cpu)
    for _ in range(plan.tcp_runs if plan.tcp4 else 0):
        res.add("tcp4_gbps", iperf_tcp(lab, client, server, dst, src, plan.tcp_seconds, 4))
    for size in plan.udp_sizes:
        delivered, loss = iperf_udp(lab, client, server, dst, src, plan.udp_seconds, size,
                                    plan.udp_pps)
        res.add(f"udp{size}_pps", delivered)
        res.add(f"udp{size}_loss_pct", loss)
    if setup.backend == "wireguard" or setup.wireguard_go:
        for kind in plan.flood_kinds:
            under_flood(lab, setup, plan, kind, client, server, src, dst, res)
    spread = res.samples.get("tcp1_gbps", [])
    if len(spread) > 1 and (max(spread) - min(spread)) > 0.25 * statistics.median(spread):
        res.notes.append("TCP runs vary by more than 25%: disturbed or unstable")
    return res


def server_key(lab: Lab, setup: Setup, server: LabNode) -> str:
    """The server's WireGuard public key, as a flooder reads it from the lease (for
    wireguard-go, from the key it was given)."""
    if setup.wireguard_go:
        assert _wggo is not None
        return _wggo.keys[1].public_base64
    out = lab.etcdctl("get", "--prefix", "--print-value-only", "/coreos.com/network/subnets/")
    for line in out.splitlines():
        lease = json.loads(line) if line.startswith("{") else {}
        if lease.get("PublicIP") == server.underlay_ip:
            return lease["BackendData"]["PublicKey"]
    raise RuntimeError(f"{setup.name}: no lease for {server.underlay_ip}")


def under_flood(lab: Lab, setup: Setup, plan: Plan, kind: str, client: LabNode,
                server: LabNode, src: str, dst: str, res: Result) -> None:
    """Pings, then one TCP stream, from the client while one host on the underlay (the
    etcd namespace, no peer's address) floods the server's WireGuard port with 148-byte
    datagrams: initiations with a valid mac1, or random bytes."""
    port = flood.PORT_WIREGUARD
    key = server_key(lab, setup, server) if kind == "mac1" else None
    seconds = plan.flood_ping_s + plan.tcp_seconds + 10  # stopped when the work is done
    attack = flood.Flood(kind, server.underlay_ip, port, key, plan.flood_rate, seconds)

    def work() -> tuple[float, float, float | None]:
        loss, p50 = flood.ping_loss(lab, client, dst, src, plan.flood_ping_s)
        gbps = (iperf_tcp(lab, client, server, dst, src, plan.tcp_seconds, 1)
                if plan.flood_tcp else None)
        return loss, p50, gbps

    (loss, p50, gbps), sent = attack.during(lab, lab.etcd_ns, work)
    res.add(f"flood_{kind}_ping_loss_pct", loss)
    res.add(f"flood_{kind}_ping_p50_ms", p50)
    if gbps is not None:
        res.add(f"flood_{kind}_tcp1_gbps", gbps)
    res.add(f"flood_{kind}_sent_pps", float(sent.get("rate", 0)))


COLUMNS = [
    ("tcp1_gbps", "TCP 1 stream Gbit/s"),
    ("tcp4_gbps", "TCP 4 streams Gbit/s"),
    ("udp1400_pps", "UDP 1400B pkt/s"),
    ("udp1400_loss_pct", "loss %"),
    ("udp64_pps", "UDP 64B pkt/s"),
    ("udp64_loss_pct", "loss %"),
    ("ping_p50_ms", "ping p50 ms"),
    ("ping_p99_ms", "ping p99 ms"),
    ("daemon_cpu_pct", "daemon CPU %"),
]


def fmt(xs: list[float] | None) -> str:
    if not xs:
        return "-"
    med = statistics.median(xs)
    digits = 3 if med < 10 else 0 if med > 1000 else 1
    if len(xs) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def table(results: list[Result]) -> str:
    head = ["setup", *(label for _k, label in COLUMNS), "x underlay", "x vxlan",
            "x wireguard-go"]
    under = next((r.median("tcp1_gbps") for r in results if r.setup == "underlay"), None)
    vxlan = next((r.median("tcp1_gbps") for r in results if r.setup == "vxlan"), None)
    wggo = next((r.median("tcp1_gbps") for r in results if r.setup == "wireguard-go"), None)
    rows = [head]
    for r in results:
        tcp = r.median("tcp1_gbps") or 0.0
        rows.append([r.setup, *(fmt(r.samples.get(k)) for k, _l in COLUMNS),
                     f"{tcp / under:.2f}" if under else "-",
                     f"{tcp / vxlan:.2f}" if vxlan else "-",
                     f"{tcp / wggo:.2f}" if wggo else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.setup}: {n}" for r in results for n in r.notes]
    return "\n".join(lines + flood_table(results) + (["notes:", *notes] if notes else []))


def flood_table(results: list[Result]) -> list[str]:
    """The WireGuard setups under each flood: ping loss and p50, TCP and its share of
    the same setup's unflooded TCP."""
    rows = []
    for r in results:
        for kind in ("mac1", "random"):
            if not r.samples.get(f"flood_{kind}_ping_loss_pct"):
                continue
            tcp, base = r.median(f"flood_{kind}_tcp1_gbps"), r.median("tcp1_gbps")
            rows.append([r.setup, kind, fmt(r.samples.get(f"flood_{kind}_sent_pps")),
                         fmt(r.samples.get(f"flood_{kind}_ping_loss_pct")),
                         fmt(r.samples.get(f"flood_{kind}_ping_p50_ms")),
                         fmt(r.samples.get(f"flood_{kind}_tcp1_gbps")),
                         f"{tcp / base:.0%}" if tcp is not None and base else "-"])
    if not rows:
        return []
    head = ["under a flood", "datagrams", "flood pkt/s", "ping loss %", "ping p50 ms",
            "TCP 1 stream Gbit/s", "of unflooded"]
    rows.insert(0, head)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ["", *lines]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one short sample each")
    ap.add_argument("--only", nargs="*", help="setups to run (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    reason = require_root_and_tools()
    if reason:
        print(f"bench: {reason}", file=sys.stderr)
        return 1
    plan = Plan.of(args.quick)
    setups = [s for s in SETUPS if not args.only or s.name in args.only]
    results = []
    started = time.time()
    try:
        with Lab(2) as lab:
            for setup in setups:
                print(f"== {setup.name} ...", flush=True)
                results.append(measure(lab, setup, plan))
    finally:
        wg.cleanup()
    print(table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {"started": started, "seconds": time.time() - started, "quick": args.quick,
           "plan": plan.__dict__, "machine": machine(),
           "results": [{"setup": r.setup, "samples": r.samples, "notes": r.notes,
                        "medians": {k: r.median(k) for k in r.samples}} for r in results]}
    (out / f"bench-{stamp}.json").write_text(json.dumps(doc, indent=2))
    wrote = "json"
    if chart.available():
        chart.render(doc, out / f"bench-{stamp}.png")
        wrote = "json and .png"
    else:
        print("bench: no chart: matplotlib is not installed (pip install '.[bench]')",
              file=sys.stderr)
    print(f"wrote {out}/bench-{stamp}.{wrote} ({time.time() - started:.0f}s)")
    return 0


def machine() -> dict:
    import os
    import platform

    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
