"""The extension backend on a lab, as flannel's docs use it: the operator's commands build a
vxlan mesh by hand with ``ip`` (the device and its MAC before the lease, the address after
it, a route, a neighbour and an fdb entry per peer), and pods ping over it. Then alloc on
the same lab: a lease and a subnet file, and nothing in the kernel."""

from __future__ import annotations

import json

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, require_lab, start_node, status_json, wait_until

pytestmark = pytest.mark.lab

DEV = "flannel-vx"
# The operator's shell, as in flannel's docs (the commands may run ip; pyflannel never
# parses what they print, it only stores PreStartupCommand's output).
EXTENSION = {
    "Type": "extension",
    "PreStartupCommand": f"ip link del {DEV} 2>/dev/null; "
                         f"ip link add {DEV} type vxlan id 7 dstport 4789 nolearning "
                         f"&& cat /sys/class/net/{DEV}/address",
    "PostStartupCommand": f"ip addr replace ${{SUBNET%/*}}/32 dev {DEV} && ip link set {DEV} up",
    "SubnetAddCommand": f"read VTEP; ip route replace $SUBNET via ${{SUBNET%/*}} dev {DEV} "
                        f"onlink && ip neigh replace ${{SUBNET%/*}} lladdr $VTEP dev {DEV} "
                        f"&& bridge fdb append $VTEP dev {DEV} dst $PUBLIC_IP",
    "SubnetRemoveCommand": f"read VTEP; ip route del $SUBNET dev {DEV}; "
                           f"bridge fdb del $VTEP dev {DEV}",
}


@pytest.fixture(scope="module")
def lab():
    require_lab()
    with Lab(3) as lab:
        yield lab


@pytest.fixture(scope="module")
def cluster(lab):
    lab.etcdctl("put", CONFIG_KEY, json.dumps({"Network": "10.1.0.0/16",
                                               "Backend": EXTENSION}))
    nodes = {n.name: start_node(lab, n) for n in lab.nodes}
    yield nodes
    for n in lab.nodes:
        lab.stop_daemon(n)


def test_pods_ping_over_the_mesh_the_commands_built(lab, cluster):
    for a in cluster.values():
        for b in cluster.values():
            if a is not b:
                wait_until(lambda a=a, b=b: lab.ping(a.lab_node, b.gw, src_ip=a.gw), 10,
                           f"{a.lab_node.name} -> {b.lab_node.name}")


def test_the_lease_carries_the_prestartup_output_and_the_mtu_is_the_external_one(lab, cluster):
    n1 = cluster["n1"]
    mac = lab.run(n1.lab_node.ns, ["cat", f"/sys/class/net/{DEV}/address"],
                  text=True).stdout.strip()
    subnet = n1.subnet.split("/")[0].rsplit(".", 1)[0] + ".0-24"
    value = json.loads(lab.etcdctl("get", "--print-value-only",
                                   f"/coreos.com/network/subnets/{subnet}"))
    assert value["BackendType"] == "extension" and value["BackendData"] == mac
    assert lab.wait_subnet_file(n1.lab_node)["FLANNEL_MTU"] == "1500"
    rows = status_json(lab, n1.lab_node)
    assert len(rows) == 3, rows  # status lists the node and its two peers


def test_a_departed_peer_is_removed_by_its_command(lab, cluster):
    n1, n3 = cluster["n1"], cluster["n3"]
    subnet3 = n3.subnet.split("/")[0].rsplit(".", 1)[0] + ".0/24"
    lab.stop_daemon(n3.lab_node)
    lab.etcdctl("del", f"/coreos.com/network/subnets/{subnet3.replace('/', '-')}")

    def route_gone() -> bool:
        out = lab.run(n1.lab_node.ns, ["ip", "route", "show", subnet3], text=True).stdout
        return out.strip() == ""

    wait_until(route_gone, 10, "n1's route to n3's subnet removed")


def test_alloc_takes_a_lease_and_writes_the_file_and_touches_nothing(lab, cluster):
    for n in lab.nodes:
        lab.stop_daemon(n)
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16", "Backend": {"Type": "alloc"}}')
    node = lab.nodes[1]
    lab.run(node.ns, ["ip", "link", "del", DEV])
    before = lab.run(node.ns, ["ip", "-o", "link"], text=True).stdout.count("\n")
    routes = lab.run(node.ns, ["ip", "route"], text=True).stdout
    n = start_node(lab, node)
    env = lab.wait_subnet_file(node)
    assert env["FLANNEL_MTU"] == "1500" and env["FLANNEL_SUBNET"] == n.subnet
    key = n.subnet.split("/")[0].rsplit(".", 1)[0] + ".0-24"
    value = lab.etcdctl("get", "--print-value-only", f"/coreos.com/network/subnets/{key}")
    assert json.loads(value) == {"PublicIP": node.underlay_ip, "PublicIPv6": None}
    # the daemon added no device and no route (docker0's are the test's own)
    assert lab.run(node.ns, ["ip", "-o", "link"], text=True).stdout.count("\n") == before
    after = lab.run(node.ns, ["ip", "route"], text=True).stdout
    assert ([r for r in after.splitlines() if "docker0" not in r]
            == [r for r in routes.splitlines() if "docker0" not in r])
