"""Leases someone else wrote, on the lab with traffic flowing: a lease naming a node's own
address on another subnet (a stale lease, a typo in a reservation, or hostility) must not
cut that node's traffic, and is named once."""

from __future__ import annotations

import json
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, require_lab, start_node

pytestmark = pytest.mark.lab


def test_a_lease_naming_a_nodes_own_address_on_another_subnet_changes_nothing():
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}}')
        n1, n2 = (start_node(lab, n) for n in lab.nodes)
        assert lab.ping(n1.lab_node, n2.gw, src_ip=n1.gw, count=2, timeout=2)
        hostile = {"PublicIP": n1.lab_node.underlay_ip, "BackendType": "udp"}
        # a subnet neither node holds (a fixed one is some run's own lease)
        other = next(f"10.1.{i}.0/24" for i in range(77, 255)
                     if f"10.1.{i}.0/24" not in (n1.network, n2.network))
        lab.etcdctl("put", "/coreos.com/network/subnets/" + other.replace("/", "-"),
                    json.dumps(hostile))
        time.sleep(1)  # the watch delivers it to both nodes
        for a, b in ((n1, n2), (n2, n1)):
            assert lab.ping(a.lab_node, b.gw, src_ip=a.gw, count=5, timeout=2), \
                f"{a.lab_node.name} -> {b.lab_node.name} after the hostile lease"
        log = n1.lab_node.log_file.read_text()
        assert log.count("names this node's address") == 1, log[-2000:]
