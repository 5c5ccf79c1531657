"""Network policy with real packets: three nodes, each with a container behind its docker0
(n1 and n2 tenant=blue, n3 tenant=red), policy applied with `pyflannel policy` and enforced
by each node's nftables ruleset, alike on host-gw, vxlan and udp, over IPv4 and IPv6 (every
cluster here is dual-stack)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, require_lab, restart_node, start_node, wait_until

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
LABELS = {"n1": "tenant=blue", "n2": "tenant=blue", "n3": "tenant=red"}
SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(16); print("up", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hi"); c.close()
"""
CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 8080), timeout=1); print(s.recv(2).decode())
except OSError as e:
    print("refused", e); sys.exit(1)
"""


def isolation(tenant: str, ingress: list | None = None, egress: list | None = None) -> dict:
    same = f"tenant == '{tenant}'"
    return {"Name": tenant, "Order": 100, "Selector": same, "Types": ["Ingress", "Egress"],
            "Ingress": [{"Action": "Allow", "Source": {"Selector": same}}] + (ingress or []),
            "Egress": [{"Action": "Allow", "Destination": {"Selector": same}}] + (egress or [])}


FLOOD = r"""
import select, socket, struct, sys, time
# ICMP echo requests every 2 ms until stdin closes; print how many replies came back
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.setblocking(False)
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF
sent = replies = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    sent += 1
    body = struct.pack("!BBHHH", 8, 0, 0, 0x4242, sent & 0xFFFF) + b"x" * 16
    s.sendto(body[:2] + struct.pack("!H", csum(body)) + body[4:], (sys.argv[1], 0))
    time.sleep(0.002)
    try:
        while True:
            data = s.recv(2048)
            if data[20] == 0 and data[24:26] == b"\x42\x42":
                replies += 1
    except BlockingIOError:
        pass
print(sent, replies)
"""
OUTSIDE = "198.18.0.200"


class Cluster:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.nodes = {}
        self.containers: dict[str, tuple[str, str]] = {}  # node -> (netns, address)
        self.containers6: dict[str, str] = {}  # node -> IPv6 address (dual-stack clusters)

    def add_container(self, node) -> None:
        """A namespace behind the node's docker0 at .2 of its subnet: traffic to and from it
        is forwarded by the node, where policy applies."""
        ns = f"{self.lab.prefix}-c{node.lab_node.name}"
        addr = node.gw.rsplit(".", 1)[0] + ".2"
        addr6 = node.gw6[:-1] + "2" if node.subnet6 else ""
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.lab.add_cleanup(after=lambda: subprocess.run(["ip", "netns", "del", ns],
                                                          check=False))
        host = node.lab_node.ns
        for argv in (["ip", "-n", host, "link", "add", "veth-c", "type", "veth", "peer",
                      "name", "eth0", "netns", ns],
                     ["ip", "-n", host, "link", "set", "veth-c", "master", "docker0", "up"],
                     ["ip", "-n", ns, "link", "set", "lo", "up"],
                     ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"],
                     ["ip", "-n", ns, "link", "set", "eth0", "up"],
                     ["ip", "-n", ns, "route", "add", "default", "via", node.gw]):
            subprocess.run(argv, check=True, capture_output=True)
        if addr6:
            for argv in (["ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", "eth0",
                          "nodad"],
                         ["ip", "-n", ns, "-6", "route", "add", "default", "via", node.gw6]):
                subprocess.run(argv, check=True, capture_output=True)
            self.containers6[node.lab_node.name] = addr6
        self.containers[node.lab_node.name] = (ns, addr)

    def in_container(self, name: str, argv: list[str], timeout: float = 5) -> bool:
        ns, _ = self.containers[name]
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              timeout=timeout).returncode == 0

    def ping(self, a: str, b: str) -> bool:
        return self.in_container(a, ["ping", "-n", "-q", "-c", "1", "-W", "0.3",
                                     self.containers[b][1]])

    def ping6(self, a: str, b: str) -> bool:
        return self.in_container(a, ["ping", "-6", "-n", "-q", "-c", "1", "-W", "0.3",
                                     self.containers6[b]])

    def tcp(self, a: str, b: str) -> bool:
        return self.in_container(a, [sys.executable, "-c", CLIENT, self.containers[b][1]])

    def policy(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """`pyflannel policy ...` run on n1 against the lab's etcd."""
        return self.lab.run(self.lab.nodes[0].ns,
                            [sys.executable, "-m", "pyflannel", "policy", *args,
                             f"-etcd-endpoints={self.lab.etcd_endpoint}"],
                            check=False, text=True,
                            input=None if stdin is None else stdin.encode())

    def apply(self, *docs: dict) -> None:
        done = self.policy("apply", "-f", "-", stdin=json.dumps(list(docs)))
        assert done.returncode == 0, done.stderr

    def pings(self) -> dict[tuple[str, str], bool]:
        return {(a, b): self.ping(a, b) for a in LABELS for b in LABELS if a != b}

    def pings6(self) -> dict[tuple[str, str], bool]:
        return {(a, b): self.ping6(a, b) for a in LABELS for b in LABELS if a != b}


@pytest.fixture(scope="module", params=["host-gw", "vxlan", "udp"])
def cluster(request):
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, json.dumps({
            "Network": "10.1.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00:10:1::/48",
            "Backend": {"Type": request.param}}))
        c = Cluster(lab)
        for n in lab.nodes:
            c.nodes[n.name] = start_node(lab, n, f"-node-labels={LABELS[n.name]}")
            c.add_container(c.nodes[n.name])
        ns, _ = c.containers["n1"]
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert server.stdout is not None and server.stdout.readline() == b"up\n"
            wait_until(lambda: all(c.pings().values()), 10, "every pair pings, no policy")
            wait_until(lambda: all(c.pings6().values()), 10, "every pair pings -6, no policy")
            yield c
        finally:
            server.kill()
            server.wait()


@pytest.fixture
def policies(cluster):
    yield cluster
    for name in ("blue", "red"):
        cluster.policy("delete", name)


ALL_PAIRS = {(a, b) for a in LABELS for b in LABELS if a != b}
BLUE_PAIRS = {("n1", "n2"), ("n2", "n1")}


def test_tenants_by_node_label_blue_pings_blue_and_red_is_denied_both_ways(policies):
    c = policies
    c.apply(isolation("blue"), isolation("red"))
    wait_until(lambda: {p for p, ok in c.pings().items() if ok} == BLUE_PAIRS, 5,
               "only blue <-> blue pings")
    # `apply` puts blue, then red: blue alone already gives these pings, so wait for n1 to
    # hold the ruleset of both before reading the trace
    trace = ["trace", "--from", c.containers["n3"][1], "--to", c.containers["n1"][1]]
    wait_until(lambda: "holds this model's ruleset" in c.policy(*trace).stdout, 5,
               "n1 holds the ruleset of both policies")
    traced = c.policy(*trace)
    assert traced.returncode == 0, traced.stderr
    out = traced.stdout
    assert "tenant=red" in out and "tenant=blue" in out and "verdict: DENY" in out, out
    assert "egress  (on 10.1." in out and "policies red; DENY: no rule decided" in out, out
    # trace ran on n1, which holds the destination: its kernel holds this model's ruleset
    assert "kernel: this node" in out and "holds this model's ruleset" in out, out
    assert "ingress DENY" in out, out


def test_the_tenants_are_isolated_over_ipv6_too(policies):
    """The node labels cover the IPv6 subnet as well: the same two policies decide IPv6."""
    c = policies
    c.apply(isolation("blue"), isolation("red"))
    wait_until(lambda: {p for p, ok in c.pings6().items() if ok} == BLUE_PAIRS, 5,
               "only blue <-> blue pings over IPv6")
    traced = c.policy("trace", "--from", c.containers6["n3"], "--to", c.containers6["n1"])
    assert traced.returncode == 0, traced.stderr
    assert "verdict: DENY" in traced.stdout, traced.stdout


def test_a_rule_for_tcp_8080_from_red_lets_it_through_while_ping_stays_denied(policies):
    c = policies
    from_red = {"Action": "Allow", "Protocol": "TCP", "Source": {"Selector": "tenant == 'red'"},
                "Destination": {"Ports": [8080]}}
    to_blue = {"Action": "Allow", "Protocol": "TCP",
               "Destination": {"Selector": "tenant == 'blue'", "Ports": [8080]}}
    c.apply(isolation("blue", ingress=[from_red]), isolation("red", egress=[to_blue]))
    wait_until(lambda: not c.ping("n3", "n1") and not c.ping("n1", "n3"), 5, "isolated")
    assert c.tcp("n3", "n1"), "TCP 8080 from red to blue"
    assert not c.ping("n3", "n1")
    assert c.tcp("n2", "n1")  # blue to blue, any port
    out = c.policy("trace", "--from", c.containers["n3"][1], "--to", c.containers["n1"][1],
                   "--protocol", "tcp", "--port", "8080").stdout
    assert "ALLOW: Allow by blue Ingress[1]" in out and "Allow by red Egress[1]" in out, out
    listed = c.policy("list").stdout
    assert "Ingress[1] Allow" in listed and " 0 packets" in listed, listed
    hits = [line for line in listed.splitlines() if "Ingress[1] Allow" in line]
    assert hits and not hits[0].strip().endswith("0 packets 0 bytes"), listed


def test_a_malformed_policy_in_etcd_keeps_the_previous_verdicts_and_is_reported_once(policies):
    c = policies
    c.apply(isolation("blue"), isolation("red"))
    wait_until(lambda: {p for p, ok in c.pings().items() if ok} == BLUE_PAIRS, 5, "isolated")
    bad = json.dumps({"Name": "blue", "Selector": "tenant == 'blue'",
                      "Ingress": [{"Action": "Alow"}]})
    c.lab.etcdctl("put", f"{PREFIX}/policies/blue", bad)
    c.lab.etcdctl("put", f"{PREFIX}/policies/blue", bad)  # the same again: no second line
    c.lab.etcdctl("put", f"{PREFIX}/networksets/x", "{}")  # a change: every node rebuilds
    time.sleep(0.5)
    assert {p for p, ok in c.pings().items() if ok} == BLUE_PAIRS
    log = c.lab.tail_log(c.nodes["n1"].lab_node, 400)
    said = [ln for ln in log.splitlines() if "policy 'blue': Ingress[0].Action" in ln]
    assert len(said) == 1 and "keeping its last good version" in said[0], log
    assert "BROKEN policy/blue" in c.policy("list").stdout
    c.lab.etcdctl("del", f"{PREFIX}/networksets/x")


def test_deleting_the_policies_restores_every_pair_within_2s(policies):
    c = policies
    c.apply(isolation("blue"), isolation("red"))
    wait_until(lambda: {p for p, ok in c.pings().items() if ok} == BLUE_PAIRS, 5, "isolated")
    deleted = time.monotonic()
    for name in ("blue", "red"):
        assert c.policy("delete", name).returncode == 0
    wait_until(lambda: all(c.ping(a, b) for a, b in ALL_PAIRS), 2, "every pair again")
    print(f"restored in {time.monotonic() - deleted:.2f} s")


def test_a_network_set_lets_an_outside_host_reach_one_port_only(policies):
    c = policies
    lab = c.lab
    host = lab.hosts.get("out") or lab.add_host("out", OUTSIDE)
    n1 = c.nodes["n1"]
    subprocess.run(["ip", "-n", host, "route", "replace", n1.network, "via",
                    n1.lab_node.underlay_ip], check=True)
    office = {"Labels": {"role": "office"}, "Nets": [f"{OUTSIDE}/32"]}
    done = c.policy("apply", "-f", "-", "--networkset", "office", stdin=json.dumps(office))
    assert done.returncode == 0, done.stderr
    from_office = {"Action": "Allow", "Protocol": "TCP",
                   "Source": {"Selector": "role == 'office'"}, "Destination": {"Ports": [8080]}}
    c.apply(isolation("blue", ingress=[from_office]))
    dst = c.containers["n1"][1]

    def reach(argv: list[str]) -> bool:
        return subprocess.run(["ip", "netns", "exec", host, *argv], capture_output=True,
                              timeout=5).returncode == 0

    try:
        wait_until(lambda: not reach(["ping", "-c1", "-W0.3", dst]), 5, "ping denied")
        assert reach([sys.executable, "-c", CLIENT, dst]), "TCP 8080 from the office"
        out = c.policy("trace", "--from", OUTSIDE, "--to", dst, "--protocol", "tcp",
                       "--port", "22").stdout
        assert "role=office" in out and "verdict: DENY" in out, out
    finally:
        c.policy("delete", "office", "--networkset")


def test_a_daemon_restart_keeps_the_verdicts_with_no_allow_all_window(policies):
    c = policies
    c.apply(isolation("blue"), isolation("red"))
    wait_until(lambda: {p for p, ok in c.pings().items() if ok} == BLUE_PAIRS, 5, "isolated")
    ns, _ = c.containers["n3"]
    flood = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", FLOOD,
                              c.containers["n1"][1]], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    n1 = c.nodes["n1"].lab_node
    c.lab.stop_daemon(n1)
    c.nodes["n1"] = restart_node(c.lab, n1, f"-node-labels={LABELS['n1']}")
    time.sleep(0.5)  # the restarted keeper's first rebuild
    out, _ = flood.communicate("", timeout=30)
    sent, replies = map(int, out.split())
    print(f"red -> blue across n1's restart: {sent} echo requests, {replies} replies")
    assert sent > 300 and replies == 0
    assert {p for p, ok in c.pings().items() if ok} == BLUE_PAIRS
