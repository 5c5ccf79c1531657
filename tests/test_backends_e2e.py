"""vxlan and host-gw end to end on the lab, and what each keeps in the kernel's tables."""

from __future__ import annotations

import json
import signal
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    require_lab,
    restart_node,
    start_node,
    tcp_transfer,
    wait_until,
)

pytestmark = pytest.mark.lab

CONFIGS = {
    "vxlan": '{"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan"}}',
    "host-gw": '{"Network": "10.1.0.0/16", "Backend": {"Type": "host-gw"}}',
}


def _cluster(kind: str):
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, CONFIGS[kind])
        nodes = {n.name: start_node(lab, n) for n in lab.nodes}
        yield kind, lab, nodes


@pytest.fixture(scope="module")
def vxlan_cluster():
    yield from _cluster("vxlan")


@pytest.fixture(scope="module")
def hostgw_cluster():
    yield from _cluster("host-gw")


@pytest.fixture(params=["vxlan_cluster", "hostgw_cluster"])
def cluster(request):
    """Each generic test runs once on a vxlan cluster and once on a host-gw cluster."""
    return request.getfixturevalue(request.param)


def pings(lab, a, b, count=1, timeout=2) -> bool:
    return lab.ping(a.lab_node, b.gw, src_ip=a.gw, count=count, timeout=timeout)


def ns_json(lab, ns: str, *args: str):
    return json.loads(lab.run(ns, ["ip", "-j", *args], text=True).stdout or "[]")


def test_every_ordered_pair_pings(cluster):
    _kind, lab, nodes = cluster
    for a in nodes.values():
        for b in nodes.values():
            if a is not b:
                wait_until(lambda a=a, b=b: pings(lab, a, b), 5,
                           f"{a.lab_node.name} -> {b.lab_node.name}")


def test_a_50mb_transfer_arrives_intact(cluster):
    _kind, lab, nodes = cluster
    a, b = nodes["n1"], nodes["n3"]
    tcp_transfer(lab, a.lab_node, a.gw, b.lab_node, b.gw, 50 * 1024 * 1024, port=5002)


def test_mtu_rule(cluster):
    kind, lab, nodes = cluster
    env = lab.wait_subnet_file(nodes["n1"].lab_node)
    assert env["FLANNEL_MTU"] == {"vxlan": "1450", "host-gw": "1500"}[kind]


def lease_value(lab, node) -> dict:
    key = node.key()
    return json.loads(lab.etcdctl("get", key, "--print-value-only"))


def vtep_mac(lab, node) -> str:
    (link,) = ns_json(lab, node.lab_node.ns, "link", "show", "dev", "flannel.1")
    return link["address"]


def test_vxlan_publishes_the_device_s_real_mac_also_after_restart_and_deletion(vxlan_cluster):
    _kind, lab, nodes = vxlan_cluster
    n2 = nodes["n2"]
    value = lease_value(lab, n2)
    assert value["BackendType"] == "vxlan" and value["BackendData"]["VNI"] == 1
    assert value["BackendData"]["VtepMAC"] == vtep_mac(lab, n2)
    lab.stop_daemon(n2.lab_node, sig=signal.SIGKILL)
    nodes["n2"] = n2 = restart_node(lab, n2.lab_node)
    assert lease_value(lab, n2)["BackendData"]["VtepMAC"] == vtep_mac(lab, n2)
    old = vtep_mac(lab, n2)
    lab.run(n2.lab_node.ns, ["ip", "link", "del", "flannel.1"])
    wait_until(lambda: lab.run(n2.lab_node.ns, ["ip", "link", "show", "flannel.1"],
                               check=False).returncode == 0, 5, "flannel.1 recreated")
    wait_until(lambda: lease_value(lab, n2)["BackendData"]["VtepMAC"] == vtep_mac(lab, n2)
               != old, 5, "new VtepMAC published")
    for other in ("n1", "n3"):
        wait_until(lambda o=other: pings(lab, nodes[o], n2) and pings(lab, n2, nodes[o]), 5,
                   f"{other} <-> n2 after recreation")


def test_vxlan_a_removed_peer_leaves_no_route_neighbour_or_fdb_entry(vxlan_cluster):
    _kind, lab, nodes = vxlan_cluster
    n1, n3 = nodes["n1"], nodes["n3"]
    ns = n1.lab_node.ns
    peer_net = n3.network
    peer_ip, peer_mac = peer_net.split("/")[0], vtep_mac(lab, n3)
    assert any(r["dst"] == peer_net for r in ns_json(lab, ns, "route", "show", "dev",
                                                     "flannel.1"))
    lab.stop_daemon(n3.lab_node, sig=signal.SIGKILL)
    lab.etcdctl("del", "/coreos.com/network/subnets/" + peer_net.replace("/", "-"))

    def gone() -> bool:
        routes = ns_json(lab, ns, "route", "show", "dev", "flannel.1")
        neigh = ns_json(lab, ns, "neigh", "show", "dev", "flannel.1")
        fdb = json.loads(lab.run(ns, ["bridge", "-j", "fdb", "show", "dev", "flannel.1"],
                                 text=True).stdout or "[]")
        return (not any(r["dst"] == peer_net for r in routes)
                and not any(n["dst"] == peer_ip for n in neigh)
                and not any(f["mac"] == peer_mac for f in fdb))

    wait_until(gone, 5, "peer state removed")
    nodes["n3"] = restart_node(lab, n3.lab_node)
    wait_until(lambda: pings(lab, n1, nodes["n3"]), 5, "n3 back")


def test_host_gw_routes_come_back_within_seconds_after_a_link_flap(hostgw_cluster):
    _kind, lab, nodes = hostgw_cluster
    n1 = nodes["n1"]
    routes = ns_json(lab, n1.lab_node.ns, "route", "show", "proto", "120")
    assert {r["dst"] for r in routes} == {nodes[o].network
                                          for o in ("n2", "n3")}
    lab.run(n1.lab_node.ns, ["ip", "link", "set", "dev", "eth0", "down"])
    time.sleep(0.3)
    lab.run(n1.lab_node.ns, ["ip", "link", "set", "dev", "eth0", "up"])
    started = time.monotonic()
    wait_until(lambda: all(pings(lab, n1, nodes[o], timeout=1) for o in ("n2", "n3")), 5,
               "pings after the flap")
    assert time.monotonic() - started < 3.0


def test_host_gw_refuses_a_public_ip_that_is_not_on_the_interface():
    require_lab()
    with Lab(1) as lab:
        lab.etcdctl("put", CONFIG_KEY, CONFIGS["host-gw"])
        node = lab.nodes[0]
        proc = lab.start_daemon(node, "-public-ip=203.0.113.9")
        assert proc.wait(20) == 1
        assert "cannot work through NAT" in lab.tail_log(node)


def test_switching_backends_leaves_no_stale_device_or_route():
    require_lab()
    with Lab(2) as lab:
        udp = '{"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}}'
        state = {}
        for kind, config in (("udp", udp), ("vxlan", CONFIGS["vxlan"]),
                             ("host-gw", CONFIGS["host-gw"]), ("udp", udp)):
            lab.etcdctl("put", CONFIG_KEY, config)
            for n in lab.nodes:
                if n.process is not None:
                    lab.stop_daemon(n)
            nodes = [restart_node(lab, n) for n in lab.nodes]
            a, b = nodes
            wait_until(lambda a=a, b=b: pings(lab, a, b) and pings(lab, b, a), 5,
                       f"pings on {kind}")
            ns = a.lab_node.ns
            links = {link["ifname"] for link in ns_json(lab, ns, "link", "show")}
            ours = {r["dst"]: r.get("dev") for r in ns_json(lab, ns, "route", "show",
                                                              "proto", "120")}
            state[kind] = (links, ours)
            peer = b.network
            if kind == "udp":
                assert "flannel0" in links and not any(x.startswith("flannel.") for x in links)
                assert ours == {"10.1.0.0/16": "flannel0"}
            elif kind == "vxlan":
                assert "flannel.1" in links and "flannel0" not in links
                assert ours == {peer: "flannel.1"}
            else:
                assert "flannel0" not in links and "flannel.1" not in links
                assert ours == {peer: "eth0"}


def test_a_peer_on_another_backend_is_ignored_with_one_warning(vxlan_cluster):
    _kind, lab, nodes = vxlan_cluster
    # a subnet no node holds (a fixed one is some run's own lease)
    other = next(f"10.1.{i}.0/24" for i in range(250, 0, -1)
                 if f"10.1.{i}.0/24" not in {n.network for n in nodes.values()})
    key = "/coreos.com/network/subnets/" + other.replace("/", "-")
    value = '{"PublicIP":"198.18.0.77","PublicIPv6":null,"BackendType":"host-gw"}'
    lab.etcdctl("put", key, value)
    lab.etcdctl("put", key, value)  # the same lease again: still one warning
    n1 = nodes["n1"].lab_node

    def warnings() -> list[str]:
        return [line for line in lab.tail_log(n1, 400).splitlines()
                if f"{other} uses backend host-gw" in line]

    wait_until(lambda: len(warnings()) == 1, 5, "one warning")
    time.sleep(0.5)
    assert len(warnings()) == 1
    routes = ns_json(lab, n1.ns, "route", "show", "proto", "120")
    assert not any(r["dst"] == other for r in routes)
    lab.etcdctl("del", key)
