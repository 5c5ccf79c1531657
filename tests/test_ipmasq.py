"""-ip-masq: traffic leaving the overlay is masqueraded, overlay traffic keeps its source,
and flanneld's rules are put back when someone removes one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    UDP_SEND_FROM,
    UDP_SOURCE_OF,
    require_lab,
    start_node,
    wait_until,
)

pytestmark = pytest.mark.lab

INTERNET = "198.18.0.200"


@pytest.fixture(scope="module")
def masq_lab():
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan"}}')
        internet = lab.add_host("inet", INTERNET)
        nodes = [start_node(lab, n, "-ip-masq", "-iptables-resync=1") for n in lab.nodes]
        yield lab, internet, nodes


def source_seen(lab: Lab, receiver_ns: str, listen_ip: str, sender_ns: str, src_ip: str,
                port: int) -> str:
    rx = lab.popen(receiver_ns, [sys.executable, "-c", UDP_SOURCE_OF, listen_ip, str(port)],
                   stdout=subprocess.PIPE)
    assert rx.stdout.readline().strip() == b"ready"
    lab.run(sender_ns, [sys.executable, "-c", UDP_SEND_FROM, src_ip, listen_ip, str(port)])
    return rx.stdout.readline().decode().strip()


def test_the_subnet_file_says_ipmasq(masq_lab):
    lab, _internet, nodes = masq_lab
    assert lab.wait_subnet_file(nodes[0].lab_node)["FLANNEL_IPMASQ"] == "true"


def test_a_container_reaching_outside_the_network_leaves_with_the_node_s_address(masq_lab):
    lab, internet, (n1, _n2) = masq_lab
    seen = source_seen(lab, internet, INTERNET, n1.lab_node.ns, n1.gw, 7001)
    assert seen == n1.lab_node.underlay_ip


def test_container_to_container_traffic_keeps_its_source(masq_lab):
    lab, _internet, (n1, n2) = masq_lab
    seen = source_seen(lab, n2.lab_node.ns, n2.gw, n1.lab_node.ns, n1.gw, 7002)
    assert seen == n1.gw


def nat_rules(lab: Lab, ns: str) -> list[str]:
    out = lab.run(ns, ["iptables-save", "-t", "nat"], text=True).stdout
    return [line for line in out.splitlines() if line.startswith("-A FLANNEL-POSTRTG")]


def test_flanneld_s_rules_in_flanneld_s_order(masq_lab):
    lab, _internet, (n1, _n2) = masq_lab
    subnet = n1.network
    rules = nat_rules(lab, n1.lab_node.ns)
    assert len(rules) == 6 and all('--comment "flanneld masq"' in r for r in rules)
    assert "--mark 0x4000/0x4000" in rules[0] and rules[0].endswith("-j RETURN")
    assert f"-s {subnet} -d 10.1.0.0/16" in rules[1]
    assert f"-s 10.1.0.0/16 -d {subnet}" in rules[2]
    assert f"! -s 10.1.0.0/16 -d {subnet}" in rules[3]
    assert "-s 10.1.0.0/16 ! -d 224.0.0.0/4" in rules[4] and "MASQUERADE" in rules[4]
    assert "! -s 10.1.0.0/16 -d 10.1.0.0/16" in rules[5] and "MASQUERADE" in rules[5]
    fwd = lab.run(n1.lab_node.ns, ["iptables-save", "-t", "filter"], text=True).stdout
    assert "-A FLANNEL-FWD -s 10.1.0.0/16" in fwd and "-A FLANNEL-FWD -d 10.1.0.0/16" in fwd


def test_a_rule_deleted_by_hand_is_restored_within_the_resync_period(masq_lab):
    lab, _internet, (n1, _n2) = masq_lab
    ns = n1.lab_node.ns
    before = nat_rules(lab, ns)
    lab.run(ns, ["iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"])
    assert len(nat_rules(lab, ns)) == 5
    wait_until(lambda: nat_rules(lab, ns) == before, 3, "rules restored")
    # (the line is logged just after the restore: the rules may be back a moment before)
    wait_until(lambda: "iptables rules restored" in lab.tail_log(n1.lab_node, 100), 3,
               "restore logged")
