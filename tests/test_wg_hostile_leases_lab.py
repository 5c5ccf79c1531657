"""Hostile and copied WireGuard keys on real nodes (issue 15, items 1 and 7).

One lab: n1 runs; a lease with a low-order key is put under subnets/; n2 starts and must
become n1's peer (the bad lease froze every node's table before), and both ping; n3 starts
with a copy of n1's key file (a cloned VM) and must refuse to start, saying why.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, metric, ready, require_lab, start_node, wait_until

LOW_ORDER_LEASE = {"PublicIP": "192.0.2.77", "BackendType": "wireguard",
                   "BackendData": {"PublicKey": "A" * 43 + "="}}
HOSTILE = "10.1.77.0/24"


@pytest.fixture(scope="module")
def lab():
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY,
                    '{"Network": "10.1.0.0/16", "Backend": {"Type": "wireguard"}}')
        yield lab


def test_a_low_order_key_does_not_stop_a_new_peer_being_applied_and_pinged(lab):
    n1 = start_node(lab, lab.nodes[0])
    assert n1.network != HOSTILE, "n1 took the subnet this test puts the bad lease on"
    lab.etcdctl("put", "/coreos.com/network/subnets/" + HOSTILE.replace("/", "-"),
                json.dumps(LOW_ORDER_LEASE))
    n2 = start_node(lab, lab.nodes[1])
    for a, b in ((n1, n2), (n2, n1)):
        wait_until(lambda a=a, b=b: lab.ping(a.lab_node, b.gw, src_ip=a.gw, timeout=1),
                   15, f"{a.lab_node.name} pings {b.lab_node.name}")
    for n in (n1, n2):
        node = n.lab_node
        assert ready(lab, node)
        assert metric(lab, node, "pyflannel_peers") == 1, lab.tail_log(node)
        assert metric(lab, node, "pyflannel_peers_ignored") == 1
        said = [line for line in node.log_file.read_text().splitlines()
                if HOSTILE in line and "192.0.2.77" in line and " W " in line]
        assert len(said) == 1 and "low-order" in said[0], said


def test_a_node_with_a_copy_of_another_node_s_key_refuses_to_start(lab):
    """Before it takes a lease: one error line naming the lease that has its key, and
    how to make a new one; exit status 1 (systemd says so)."""
    n1, n3 = lab.nodes[0], lab.nodes[2]
    if not ready(lab, n1):
        start_node(lab, n1)
    n1_subnet = lab.wait_subnet_file(n1)["FLANNEL_SUBNET"].replace(".1/", ".0/")
    n3.workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(n1.workdir / "wgkey", n3.workdir / "wgkey")
    proc = lab.start_daemon(n3)
    assert proc.wait(30) == 1, lab.tail_log(n3)
    errors = [line for line in n3.log_file.read_text().splitlines() if " E pyflannel" in line]
    assert len(errors) == 1, errors
    assert f"already published by lease {n1_subnet} ({n1.underlay_ip})" in errors[0]
    assert "to make a new key" in errors[0]
    leases = lab.etcdctl("get", "--prefix", "/coreos.com/network/subnets/")
    assert f'"{n3.underlay_ip}"' not in leases  # it took no lease
