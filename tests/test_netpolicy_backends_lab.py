"""Network policy on the backends that tests/test_netpolicy_lab.py does not build: wireguard,
bgp and gre each carry the pods differently (a WireGuard tunnel, plain routes learnt over BGP,
GRE in user space), yet the forwarding node's nftables ruleset decides alike on all three."""

from __future__ import annotations

import json

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, require_lab, start_node, wait_until
from tests.test_netpolicy_lab import BLUE_PAIRS, LABELS, Cluster, isolation

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("backend", ["wireguard", "bgp", "gre"])
def test_blue_pings_blue_and_red_is_denied(backend):
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, json.dumps({"Network": "10.1.0.0/16",
                                                   "Backend": {"Type": backend}}))
        c = Cluster(lab)
        for n in lab.nodes:
            c.nodes[n.name] = start_node(lab, n, f"-node-labels={LABELS[n.name]}")
            c.add_container(c.nodes[n.name])
        wait_until(lambda: c.ping("n3", "n1") and c.ping("n1", "n2"), 10,
                   "pods ping across nodes, no policy")
        c.apply(isolation("blue"), isolation("red"))
        wait_until(lambda: not c.ping("n3", "n1"), 5, "red -> blue denied")
        assert {p for p, ok in c.pings().items() if ok} == BLUE_PAIRS
