"""Small programs run inside lab namespaces, and the cluster set-up e2e tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request  # noqa: F401 - used by the snippets below, run in other processes
from dataclasses import dataclass

import pytest

from pyflannel.lab import Lab, LabNode, require_root_and_tools

HEALTHZ_PORT = 9180
CONFIG_KEY = "/coreos.com/network/config"

# Receive one TCP stream and print its length and SHA-256.
TCP_SINK = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

# Send N bytes of seeded pseudo-random data and print length and SHA-256.
TCP_SOURCE = r"""
import hashlib, random, socket, sys
dst, port, size, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(1234); h = hashlib.sha256(); sent = 0
c = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
c.bind((src, 0)); c.connect((dst, port))
while sent < size:
    chunk = rng.randbytes(min(1 << 20, size - sent))
    c.sendall(chunk); h.update(chunk); sent += len(chunk)
c.close()
print(sent, h.hexdigest(), flush=True)
"""

# Send each hex-encoded line of stdin as one UDP datagram to argv[1]:argv[2].
UDP_SPRAY = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = (sys.argv[1], int(sys.argv[2]))
for line in sys.stdin:
    s.sendto(bytes.fromhex(line.strip()), dst)
print("sent", flush=True)
"""

FETCH = r"""
import sys, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
"""


@dataclass
class Node:
    lab_node: LabNode
    subnet: str  # FLANNEL_SUBNET, e.g. 10.1.15.1/24 ("" on an IPv6-only node)
    subnet6: str = ""  # FLANNEL_IPV6_SUBNET, e.g. fc00:10:1:5c::1/64 (IPv6 networks)

    @property
    def gw(self) -> str:
        return self.subnet.split("/")[0]

    @property
    def gw6(self) -> str:
        """docker0's IPv6 address, fc00:10:1:5c::1 for FLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64."""
        return self.subnet6.split("/")[0]

    @property
    def network6(self) -> str:
        """The leased IPv6 subnet, fc00:10:1:5c::/64 for fc00:10:1:5c::1/64."""
        return self.subnet6.replace("::1/", "::/")

    @property
    def network(self) -> str:
        """The leased subnet, 10.1.15.0/24 for FLANNEL_SUBNET=10.1.15.1/24."""
        return self.subnet.replace(".1/", ".0/")

    def key(self, prefix: str = "/coreos.com/network") -> str:
        """The node's lease key in etcd (both subnets on an IPv6 network)."""
        name = self.network.replace("/", "-") if self.subnet else "0.0.0.0-0"
        if self.subnet6:
            name += "&" + self.network6.replace("/", "-")
        return f"{prefix}/subnets/{name}"


def require_lab() -> None:
    """Fail in CI, skip elsewhere, when this machine cannot run the lab (root, tools)."""
    reason = require_root_and_tools()
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def _docker0(lab: Lab, node: LabNode, env: dict[str, str]) -> Node:
    """docker0 from the subnet file, as Docker would set it up (both families when the
    network has IPv6)."""
    lab.add_docker0(node, env.get("FLANNEL_SUBNET"), env.get("FLANNEL_IPV6_SUBNET"))
    return Node(node, env.get("FLANNEL_SUBNET", ""), env.get("FLANNEL_IPV6_SUBNET", ""))


def start_node(lab: Lab, node: LabNode, *extra: str, timeout: float = 20) -> Node:
    """Start pyflanneld on ``node``, wait for its subnet file, give it a docker0."""
    if node.subnet_file.exists():
        node.subnet_file.unlink()
    lab.start_daemon(node, f"-healthz-port={HEALTHZ_PORT}", *extra)
    env = lab.wait_subnet_file(node, timeout=timeout)
    return _docker0(lab, node, env)


def restart_node(lab: Lab, node: LabNode, *extra: str) -> Node:
    """Start again after a stop, keeping the old subnet file (as a real host would)."""
    lab.start_daemon(node, f"-healthz-port={HEALTHZ_PORT}", *extra)
    deadline = time.monotonic() + 20
    while not ready(lab, node):
        assert time.monotonic() < deadline, lab.tail_log(node)
        time.sleep(0.1)
    env = lab.wait_subnet_file(node)
    return _docker0(lab, node, env)


def http_get(lab: Lab, node: LabNode, path: str) -> tuple[int, str]:
    out = lab.run(node.ns, [sys.executable, "-c", FETCH,
                            f"http://127.0.0.1:{HEALTHZ_PORT}{path}"], check=False, text=True)
    lines = out.stdout.split("\n", 1)
    if not lines[0].strip().isdigit():
        return 0, out.stderr
    return int(lines[0]), lines[1] if len(lines) > 1 else ""


def ready(lab: Lab, node: LabNode) -> bool:
    return http_get(lab, node, "/readyz")[0] == 200


def metric(lab: Lab, node: LabNode, name: str, **labels: str) -> float:
    """One sample from the node's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    _status, body = http_get(lab, node, "/metrics")
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def status_json(lab: Lab, node: LabNode) -> list[dict]:
    out = lab.run(node.ns, [sys.executable, "-m", "pyflannel", "status", "--json",
                            f"-etcd-endpoints={lab.etcd_endpoint}",
                            f"-subnet-file={node.subnet_file}"], text=True)
    return json.loads(out.stdout)


def tcp_transfer(lab: Lab, src: LabNode, src_ip: str, dst: LabNode, dst_ip: str, size: int,
                 port: int = 5001, timeout: float = 120) -> None:
    """``size`` seeded random bytes over one TCP connection from ``src_ip`` (in ``src``'s
    namespace) to ``dst_ip``, IPv4 or IPv6; fails unless they arrive intact (the length
    and SHA-256 the sink counted are the ones sent)."""
    sink = lab.popen(dst.ns, [sys.executable, "-c", TCP_SINK, dst_ip, str(port)],
                     stdout=subprocess.PIPE)
    try:
        assert sink.stdout.readline().strip() == b"listening"
        sent = lab.run(src.ns, [sys.executable, "-c", TCP_SOURCE, dst_ip, str(port),
                                str(size), src_ip], timeout=timeout, text=True)
        received = sink.stdout.readline().decode().strip()
        sink.wait(10)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(5)
    assert received == sent.stdout.strip(), (received, sent.stdout)
    assert received.startswith(f"{size} "), received


def wait_until(cond, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.1)


def pods_ping_every_ordered_pair(lab: Lab, nodes, *, ipv6: bool = False,
                                 timeout: float = 10) -> None:
    """Each node's docker0 pings every other's, from its own docker0 address (and over
    IPv6 too with ``ipv6``), waiting up to ``timeout`` for each pair."""
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            wait_until(lambda a=a, b=b: lab.ping(a.lab_node, b.gw, src_ip=a.gw), timeout,
                       f"{a.lab_node.name} -> {b.lab_node.name}")
            if ipv6:
                wait_until(lambda a=a, b=b: lab.ping(a.lab_node, b.gw6, src_ip=a.gw6), timeout,
                           f"{a.lab_node.name} -> {b.lab_node.name} over IPv6")

# Print the source address of the first UDP datagram to argv[1]:argv[2].
UDP_SOURCE_OF = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(10)
_data, addr = s.recvfrom(2048)
print(addr[0], flush=True)
"""

# Send a few UDP datagrams from argv[1] to argv[2]:argv[3].
UDP_SEND_FROM = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0))
for _ in range(3):
    s.sendto(b"hello", (sys.argv[2], int(sys.argv[3]))); time.sleep(0.1)
"""


class EtcdCluster:
    """A real 3-member etcd cluster, each member in its own lab namespace."""

    def __init__(self, lab: Lab, members: int = 3) -> None:
        self.lab = lab
        self.ips = [f"198.18.0.{110 + i}" for i in range(1, members + 1)]
        self.ns = [lab.add_host(f"e{i}", ip) for i, ip in enumerate(self.ips, 1)]
        self.procs: list = [None] * members
        peers = ",".join(f"m{i}=http://{ip}:2380" for i, ip in enumerate(self.ips, 1))
        self.argvs = [
            ["etcd", "--name", f"m{i}", "--data-dir", str(lab.workdir / f"m{i}"),
             "--listen-client-urls", f"http://{ip}:2379",
             "--advertise-client-urls", f"http://{ip}:2379",
             "--listen-peer-urls", f"http://{ip}:2380",
             "--initial-advertise-peer-urls", f"http://{ip}:2380",
             "--initial-cluster", peers, "--initial-cluster-state", "new",
             "--initial-cluster-token", lab.prefix, "--log-level", "warn"]
            for i, ip in enumerate(self.ips, 1)]

    @property
    def endpoints(self) -> str:
        return ",".join(f"http://{ip}:2379" for ip in self.ips)

    def start(self, i: int | None = None) -> None:
        for k in [i] if i is not None else range(len(self.ips)):
            log = open(self.lab.workdir / f"m{k + 1}.log", "ab")  # noqa: SIM115
            self.procs[k] = self.lab.popen(self.ns[k], self.argvs[k], stdout=log, stderr=log)
        wait_until(self.healthy, 30, "etcd cluster healthy")

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        proc.send_signal(9)
        proc.wait(10)
        self.procs[i] = None

    def ctl(self, *args: str) -> str:
        up = [k for k, p in enumerate(self.procs) if p is not None]
        eps = ",".join(f"http://{self.ips[k]}:2379" for k in up)
        return self.lab.run(self.ns[up[0]], ["etcdctl", f"--endpoints={eps}", *args],
                            env={"ETCDCTL_API": "3"}, text=True, timeout=30).stdout

    def healthy(self) -> bool:
        up = [k for k, p in enumerate(self.procs) if p is not None]
        eps = ",".join(f"http://{self.ips[k]}:2379" for k in up)
        out = self.lab.run(self.ns[up[0]], ["etcdctl", f"--endpoints={eps}", "endpoint",
                                            "health", "--command-timeout=2s"],
                           env={"ETCDCTL_API": "3"}, check=False, text=True, timeout=30)
        return out.returncode == 0

    def leader(self) -> int:
        doc = json.loads(self.ctl("endpoint", "status", "-w", "json"))
        for entry in doc:
            if entry["Status"]["leader"] == entry["Status"]["header"]["member_id"]:
                return self.ips.index(entry["Endpoint"].split("//")[1].split(":")[0])
        raise AssertionError("no leader")
