"""Faults a cluster sees, each proven on the lab with traffic flowing: etcd down for 30 s,
etcd wiped, a daemon killed, a node gone for good."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    Node,
    http_get,
    metric,
    ready,
    require_lab,
    restart_node,
    start_node,
    wait_until,
)

pytestmark = pytest.mark.lab

TTL = 8  # the test-only short lease (FLANNELD_TEST_LEASE_TTL), so expiry happens in-test


@pytest.fixture
def cluster():
    require_lab()
    os.environ["FLANNELD_TEST_LEASE_TTL"] = str(TTL)
    try:
        with Lab(3) as lab:
            lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
            nodes = [start_node(lab, n) for n in lab.nodes]
            yield lab, nodes
    finally:
        del os.environ["FLANNELD_TEST_LEASE_TTL"]


def ping_flood(lab: Lab, a, b, seconds: float, interval: float = 0.1) -> subprocess.Popen:
    count = int(seconds / interval)
    return lab.popen(a.lab_node.ns, ["ping", "-n", "-q", "-i", str(interval), "-c", str(count),
                                     "-W", "1", "-I", a.gw, b.gw], stdout=subprocess.PIPE)


def loss(proc: subprocess.Popen) -> tuple[int, int]:
    out = proc.communicate(timeout=120)[0].decode()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def subnets(lab: Lab) -> set[str]:
    keys = lab.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--keys-only")
    return {k.rsplit("/", 1)[1] for k in keys.split()}


def test_etcd_down_for_30s_loses_no_ping_and_the_daemons_carry_on(cluster):
    lab, (n1, n2, n3) = cluster
    before = subnets(lab)
    flood = ping_flood(lab, n1, n2, 38)
    time.sleep(2)
    lab.stop_etcd()
    for t in range(30):
        time.sleep(1)
        if t % 10 == 5:  # ready all along: the lease is still valid, the data path runs
            assert ready(lab, n1.lab_node) and ready(lab, n3.lab_node)
    lab.start_etcd()
    sent, received = loss(flood)
    assert received == sent, f"{sent - received} of {sent} pings lost"
    assert subnets(lab) == before
    renewals = metric(lab, n1.lab_node, "pyflannel_lease_renewals_total")
    wait_until(lambda: metric(lab, n1.lab_node, "pyflannel_lease_renewals_total") > renewals,
               TTL + 5, "a renewal after the outage")
    assert subnets(lab) == before
    assert lab.ping(n2.lab_node, n3.gw, src_ip=n2.gw)


def test_etcd_wiped_every_node_takes_back_its_own_subnet(cluster):
    lab, nodes = cluster
    before = subnets(lab)
    lab.stop_etcd(wipe=True)
    lab.start_etcd()
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
    wait_until(lambda: subnets(lab) == before, 20, "all subnets back")
    for a in nodes:
        for b in nodes:
            if a is not b:
                wait_until(lambda a=a, b=b: lab.ping(a.lab_node, b.gw, src_ip=a.gw, timeout=1),
                           10, "connectivity back")


def test_a_daemon_killed_under_traffic_comes_back_with_its_subnet_within_2s(cluster):
    lab, (n1, n2, _n3) = cluster
    flood = ping_flood(lab, n1, n2, 30, interval=0.05)
    time.sleep(1)
    lab.stop_daemon(n2.lab_node, sig=signal.SIGKILL)
    time.sleep(1)
    # the peers never dropped it: its lease is still there
    assert metric(lab, n1.lab_node, "pyflannel_peers") == 2
    again = restart_node(lab, n2.lab_node)  # returns once /readyz says 200
    assert again.subnet == n2.subnet
    wait_until(lambda: lab.ping(n1.lab_node, n2.gw, src_ip=n1.gw, timeout=0.5), 2,
               "traffic within 2 s of the restart")
    flood.kill()


def test_a_node_gone_for_good_leaves_every_peer_within_a_second_of_its_lease_expiry(cluster):
    lab, (n1, n2, n3) = cluster
    key = n3.key()
    lease_hex = re.search(r'"lease":(\d+)', lab.etcdctl("get", key, "-w", "json"))
    assert lease_hex
    lab.stop_daemon(n3.lab_node, sig=signal.SIGKILL)
    killed = time.monotonic()
    ttl = lab.etcdctl("lease", "timetolive", format(int(lease_hex.group(1)), "x"))
    remaining = int(re.search(r"remaining\((-?\d+)s\)", ttl).group(1))
    wait_until(lambda: metric(lab, n1.lab_node, "pyflannel_peers") == 1
               and metric(lab, n2.lab_node, "pyflannel_peers") == 1, TTL + 5, "peer removed")
    assert time.monotonic() - killed <= remaining + 1.0 + 1.0  # expiry + 1 s (+ polling)
    status, _ = http_get(lab, n1.lab_node, "/readyz")
    assert status == 200


def test_a_three_member_etcd_losing_its_leader_then_another_member(tmp_path):
    from tests.labtools import EtcdCluster

    require_lab()
    with Lab(2, with_etcd=False) as lab:
        etcd = EtcdCluster(lab)
        etcd.start()
        etcd.ctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
        eps = f"-etcd-endpoints={etcd.endpoints}"
        env = {"FLANNELD_TEST_LEASE_TTL": str(TTL)}
        for n in lab.nodes:
            lab.start_daemon(n, eps, "-healthz-port=9180", env=env)
        n1, n2 = (Node(n, lab.wait_subnet_file(n)["FLANNEL_SUBNET"]) for n in lab.nodes)
        for n in (n1, n2):
            lab.add_docker0(n.lab_node, n.subnet)

        def leases() -> dict[str, int]:
            doc = json.loads(etcd.ctl("get", "--prefix", "/coreos.com/network/subnets/",
                                      "-w", "json"))
            return {base64.b64decode(kv["key"]).decode(): kv["create_revision"]
                    for kv in doc["kvs"]}

        before = leases()
        assert len(before) == 2
        renewals = metric(lab, n1.lab_node, "pyflannel_lease_renewals_total")
        flood = ping_flood(lab, n1, n2, 26)
        time.sleep(1)
        leader = etcd.leader()
        etcd.kill(leader)
        time.sleep(TTL)  # a renewal has to go to a surviving member meanwhile
        etcd.start(leader)
        other = (leader + 1) % 3
        etcd.kill(other)
        time.sleep(TTL)
        etcd.start(other)
        sent, received = loss(flood)
        assert received == sent, f"{sent - received} of {sent} pings lost"
        assert leases() == before  # same keys, never re-created: no lease changed hands
        assert metric(lab, n1.lab_node, "pyflannel_lease_renewals_total") > renewals
