"""Docker container labels on a real dockerd: two containers on one node, labelled
differently, get different verdicts from the same remote container (the node's own
labels would give them one); the rule hits show in the node's metrics."""

from __future__ import annotations

import json

import pytest

from pyflannel.lab import Lab
from pyflannel.labdocker import IMAGE, LabDocker
from tests.labtools import CONFIG_KEY, HEALTHZ_PORT, metric, wait_until
from tests.test_docker_lab import require_docker

ONLY_RED_IN = {"Name": "only-red-in", "Selector": "tenant == 'red'",
               "Ingress": [{"Action": "Allow", "Source": {"Selector": "tenant == 'red'"}}]}
ONLY_BLUE_IN = {"Name": "only-blue-in", "Selector": "tenant == 'blue'",
                "Ingress": [{"Action": "Allow", "Source": {"Selector": "tenant == 'blue'"}}]}


@pytest.mark.lab
def test_two_containers_on_one_node_with_different_labels_get_different_verdicts():
    require_docker()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, json.dumps({"Network": "10.1.0.0/16",
                                                   "Backend": {"Type": "host-gw"}}))
        n1, n2 = lab.nodes
        docker = LabDocker(lab)
        # -ip-masq: Docker does not masquerade, so n2 sees the remote container's address
        lab.start_daemon(n1, f"-healthz-port={HEALTHZ_PORT}", "-ip-masq",
                         "-node-labels=tenant=red", "-docker-socket=")
        lab.start_daemon(n2, f"-healthz-port={HEALTHZ_PORT}", "-ip-masq",
                         f"-docker-socket={docker[n2].socket}")
        for node in lab.nodes:
            lab.wait_subnet_file(node)
        docker.start_all()
        for node in lab.nodes:
            docker[node].import_busybox()
        remote = docker[n1].run("remote", "sleep", "3600")
        addr = {}
        for tenant in ("red", "blue"):
            docker[n2].docker("run", "-d", "--name", tenant, "--label", f"tenant={tenant}",
                              IMAGE, "sleep", "3600")
            addr[tenant] = docker[n2].address(tenant)
        for name, doc in (("only-red-in", ONLY_RED_IN), ("only-blue-in", ONLY_BLUE_IN)):
            lab.etcdctl("put", f"/coreos.com/network/policies/{name}", json.dumps(doc))

        def pings(tenant: str) -> bool:
            return docker[n1].exec("remote", f"ping -c 1 -W 1 {addr[tenant]}",
                                   check=False).returncode == 0

        # n2 follows its dockerd (retrying with back-off until it came up): the red
        # container takes the red node's container in, the blue one keeps it out
        wait_until(lambda: pings("red") and not pings("blue"), 40,
                   f"red {addr['red']} reachable from {remote}, blue not")
        # the metrics read the per-rule nft counters (every 10 s)
        assert metric(lab, n2, "pyflannel_policies") == 2
        wait_until(lambda: metric(lab, n2, "pyflannel_policy_rule_hits_total",
                                  action="Allow") > 0
                   and metric(lab, n2, "pyflannel_policy_rule_hits_total",
                              action="NoRuleDecided") > 0, 15, "rule hits in the metrics")
