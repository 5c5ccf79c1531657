"""gre and ipip on a lab, in user space over raw IP sockets (this kernel has no GRE): pods
ping both ways and a TCP transfer arrives intact, with and without a key; a datagram with
another key is refused and counted; a lease with another key is left out and shown so;
ipip carries pods, and with DirectRouting routes a same-network peer directly."""

from __future__ import annotations

import json
import sys

import pytest

from pyflannel.fastpath.rawip import gre_header
from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    metric,
    require_lab,
    start_node,
    status_json,
    tcp_transfer,
    wait_until,
)

pytestmark = pytest.mark.lab

# Send argv[3] (hex) as one raw GRE datagram from argv[1] to argv[2].
RAW_GRE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47); s.bind((sys.argv[1], 0))
for _ in range(5):
    s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[2], 0))
"""


@pytest.fixture(scope="module")
def lab():
    require_lab()
    with Lab(3) as lab:
        yield lab


def cluster(lab: Lab, backend: dict) -> dict:
    for n in lab.nodes:
        lab.stop_daemon(n)
    lab.etcdctl("put", CONFIG_KEY, json.dumps({"Network": "10.1.0.0/16", "Backend": backend}))
    return {n.name: start_node(lab, n) for n in lab.nodes}


def all_ping(lab: Lab, nodes: dict) -> None:
    for a in nodes.values():
        for b in nodes.values():
            if a is not b:
                wait_until(lambda a=a, b=b: lab.ping(a.lab_node, b.gw, src_ip=a.gw), 10,
                           f"{a.lab_node.name} -> {b.lab_node.name}")


def test_gre_without_a_key(lab):
    nodes = cluster(lab, {"Type": "gre"})
    all_ping(lab, nodes)
    n1, n2 = nodes["n1"], nodes["n2"]
    tcp_transfer(lab, n1.lab_node, n1.gw, n2.lab_node, n2.gw, 5 * 1024 * 1024)
    assert lab.wait_subnet_file(n1.lab_node)["FLANNEL_MTU"] == "1476"
    subnet2 = n2.subnet.rsplit(".", 1)[0] + ".0/24"

    def counted() -> bool:  # status shows the peer's traffic (the state file, every 2 s)
        c = {r["subnet"]: r for r in status_json(lab, n1.lab_node)}[subnet2]["counters"]
        return bool(c) and c["tx_packets"] > 0 and c["rx_packets"] > 0

    wait_until(counted, 6, "per-peer counters in status")


def test_gre_with_a_key_and_checksums_and_a_wrong_key_refused_and_counted(lab):
    nodes = cluster(lab, {"Type": "gre", "Key": 42, "Checksum": True})
    all_ping(lab, nodes)
    n1, n3 = nodes["n1"], nodes["n3"]
    tcp_transfer(lab, n3.lab_node, n3.gw, n1.lab_node, n1.gw, 5 * 1024 * 1024, port=5003)
    assert lab.wait_subnet_file(n1.lab_node)["FLANNEL_MTU"] == "1468"
    # n3's own address, an inner packet from n3's subnet to n1's: only the key is wrong
    from tests.test_backend_gre import ipv4

    inner = ipv4(n3.gw, n1.gw, 17, b"\0" * 16)
    forged = gre_header(4, 7, False) + inner
    lab.run(n3.lab_node.ns, [sys.executable, "-c", RAW_GRE, n3.lab_node.underlay_ip,
                             n1.lab_node.underlay_ip, forged.hex()])
    wait_until(lambda: metric(lab, n1.lab_node, "pyflannel_dropped_packets_total",
                              reason="key_mismatch") >= 5, 5, "key mismatches counted")


def test_a_lease_with_another_key_is_ignored_and_status_says_why(lab):
    nodes = cluster(lab, {"Type": "gre", "Key": 42})
    n1 = nodes["n1"]
    lab.etcdctl("put", "/coreos.com/network/subnets/10.1.250.0-24",
                '{"PublicIP":"198.18.0.250","PublicIPv6":null,"BackendType":"gre",'
                '"BackendData":{"Key":9}}')

    def ignored() -> str | None:
        rows = {r["subnet"]: r for r in status_json(lab, n1.lab_node)}
        return rows["10.1.250.0/24"].get("ignored")

    wait_until(lambda: ignored() == "its GRE key is 9, ours is 42", 8, "status shows why")
    all_ping(lab, nodes)  # the others are not held up by it
    lab.etcdctl("del", "/coreos.com/network/subnets/10.1.250.0-24")


def test_ipip_carries_pods_and_direct_routing_goes_direct(lab):
    nodes = cluster(lab, {"Type": "ipip"})
    all_ping(lab, nodes)
    n1, n2 = nodes["n1"], nodes["n2"]
    tcp_transfer(lab, n2.lab_node, n2.gw, n1.lab_node, n1.gw, 2 * 1024 * 1024, port=5004)
    assert lab.wait_subnet_file(n1.lab_node)["FLANNEL_MTU"] == "1480"
    lease = lab.etcdctl("get", "--print-value-only", "--prefix", "/coreos.com/network/subnets/")
    assert '"BackendType":"ipip"' in lease and "BackendData" not in lease
    nodes = cluster(lab, {"Type": "ipip", "DirectRouting": True})
    all_ping(lab, nodes)
    n1, n2 = nodes["n1"], nodes["n2"]
    route = lab.run(n1.lab_node.ns, ["ip", "route", "get", n2.gw], text=True).stdout
    assert f"via {n2.lab_node.underlay_ip} dev eth0" in route, route


def test_gre_carries_ipv6_pods_inside_ipv4_in_a_dual_stack_network(lab):
    for n in lab.nodes:
        lab.stop_daemon(n)
    lab.etcdctl("put", CONFIG_KEY, json.dumps({
        "Network": "10.1.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00:10:1::/48",
        "Backend": {"Type": "gre", "Key": 5}}))
    nodes = {n.name: start_node(lab, n) for n in lab.nodes}
    n1, n2 = nodes["n1"], nodes["n2"]
    assert n1.gw6 and n2.gw6
    wait_until(lambda: lab.ping(n1.lab_node, n2.gw6, src_ip=n1.gw6), 10, "n1 -> n2 over IPv6")
    wait_until(lambda: lab.ping(n2.lab_node, n1.gw, src_ip=n2.gw), 5, "n2 -> n1 over IPv4")
    tcp_transfer(lab, n2.lab_node, n2.gw6, n1.lab_node, n1.gw6, 2 * 1024 * 1024, port=5005)
    assert metric(lab, n1.lab_node, "pyflannel_ipv6_packets_total", direction="rx") > 0


def test_gre_over_an_ipv6_underlay_in_an_ipv6_only_network(lab):
    for n in lab.nodes:
        lab.stop_daemon(n)
    lab.etcdctl("put", CONFIG_KEY, json.dumps({
        "EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fc00:10:1::/48",
        "Backend": {"Type": "gre"}}))
    nodes = {n.name: start_node(lab, n) for n in lab.nodes}
    n1, n3 = nodes["n1"], nodes["n3"]
    wait_until(lambda: lab.ping(n1.lab_node, n3.gw6, src_ip=n1.gw6), 10, "n1 -> n3")
    wait_until(lambda: lab.ping(n3.lab_node, n1.gw6, src_ip=n3.gw6), 5, "n3 -> n1")
    tcp_transfer(lab, n1.lab_node, n1.gw6, n3.lab_node, n3.gw6, 2 * 1024 * 1024, port=5007)
    assert lab.wait_subnet_file(n1.lab_node)["FLANNEL_MTU"] == "1456"  # 1500 - 40 - 4
