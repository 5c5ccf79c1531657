"""A node's underlay address changes under the running daemon (DHCP renumbering, a moved
VM): on every backend, pings resume both ways within 5 s, the lease carries the new
PublicIP, and the log says what happened in one line."""

from __future__ import annotations

import json
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, ready, require_lab, start_node, wait_until

pytestmark = pytest.mark.lab

NEW_IP = "198.18.0.51"  # unused in a 2-node lab (nodes .1 and .2, etcd .100)
RESUME_S = 5.0


def both_ways(lab: Lab, a, b) -> bool:
    return (lab.ping(a.lab_node, b.gw, src_ip=a.gw, count=1, timeout=0.5)
            and lab.ping(b.lab_node, a.gw, src_ip=b.gw, count=1, timeout=0.5))


def public_ip(lab: Lab, node) -> str:
    return json.loads(lab.etcdctl("get", node.key(), "--print-value-only"))["PublicIP"]


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw", "wireguard"])
def test_pings_resume_within_5s_after_the_node_s_address_changes(backend):
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY,
                    json.dumps({"Network": "10.1.0.0/16", "Backend": {"Type": backend}}))
        n1, n2 = (start_node(lab, n) for n in lab.nodes)
        wait_until(lambda: both_ways(lab, n1, n2), 10, "pings before the change")
        old_ip = n1.lab_node.underlay_ip
        changed = time.monotonic()
        lab.run(n1.lab_node.ns, ["ip", "addr", "del", f"{old_ip}/24", "dev", "eth0"])
        lab.run(n1.lab_node.ns, ["ip", "addr", "add", f"{NEW_IP}/24", "dev", "eth0"])
        while not both_ways(lab, n1, n2):
            assert time.monotonic() - changed < RESUME_S, (
                f"pings did not resume within {RESUME_S}s\n{lab.tail_log(n1.lab_node)}")
        # (wireguard roams: its pings may resume before the lease says where n1 went)
        left = RESUME_S - (time.monotonic() - changed)
        wait_until(lambda: public_ip(lab, n1) == NEW_IP and ready(lab, n1.lab_node), left,
                   "lease republished and n1 ready again")
        log = lab.tail_log(n1.lab_node, 200)
        said = [line for line in log.splitlines() if f"{old_ip} -> {NEW_IP}" in line]
        assert len(said) == 1, log
