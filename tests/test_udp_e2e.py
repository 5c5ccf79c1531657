"""The udp backend end to end: three (then four) nodes in namespaces, a real etcd,
real TUN devices and real packets between Docker-style bridges."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    UDP_SPRAY,
    metric,
    ready,
    require_lab,
    restart_node,
    start_node,
    status_json,
    tcp_transfer,
    wait_until,
)

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def cluster():
    require_lab()
    with Lab(4) as lab:
        lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}}')
        nodes = {n.name: start_node(lab, n) for n in lab.nodes[:3]}
        yield lab, nodes


def pings(lab, a, b, count=1) -> bool:
    return lab.ping(a.lab_node, b.gw, src_ip=a.gw, count=count, timeout=2)


def test_every_ordered_pair_pings_between_docker0_addresses(cluster):
    lab, nodes = cluster
    for a in nodes.values():
        for b in nodes.values():
            if a is not b:
                assert pings(lab, a, b), f"{a.lab_node.name} -> {b.lab_node.name}"


def test_each_node_wrote_flanneld_s_subnet_file(cluster):
    lab, nodes = cluster
    env = lab.wait_subnet_file(nodes["n1"].lab_node)
    assert env["FLANNEL_NETWORK"] == "10.1.0.0/16"
    assert env["FLANNEL_SUBNET"].endswith(".1/24")
    assert env["FLANNEL_MTU"] == "1472"
    assert env["FLANNEL_IPMASQ"] == "false"
    assert len({n.subnet for n in nodes.values()}) == 3


def test_a_50mb_tcp_transfer_arrives_intact(cluster):
    lab, nodes = cluster
    a, b = nodes["n1"], nodes["n2"]
    tcp_transfer(lab, a.lab_node, a.gw, b.lab_node, b.gw, 50 * 1024 * 1024)


def test_status_lists_every_node_and_marks_this_host(cluster):
    lab, nodes = cluster
    rows = status_json(lab, nodes["n1"].lab_node)
    by_subnet = {r["subnet"]: r for r in rows}
    for n in nodes.values():
        subnet = n.network
        row = by_subnet[subnet]
        assert row["public_ip"] == n.lab_node.underlay_ip
        assert row["backend"] == "udp"
        assert 23 * 3600 < row["expires_in_s"] <= 24 * 3600
        assert row["this_node"] == (n is nodes["n1"])


def test_status_joins_the_local_daemon_s_per_peer_counters(cluster):
    lab, nodes = cluster
    assert pings(lab, nodes["n1"], nodes["n2"], count=3)

    def n2_row():
        rows = status_json(lab, nodes["n1"].lab_node)
        return next(r for r in rows if r["public_ip"] == nodes["n2"].lab_node.underlay_ip)

    wait_until(lambda: (n2_row()["counters"] or {}).get("rx_packets", 0) >= 3, 6,
               "per-peer counters in status")
    c = n2_row()["counters"]
    assert c["tx_packets"] >= 3 and c["tx_bytes"] > 0 and c["last_rx_age_s"] < 10
    table = lab.run(nodes["n1"].lab_node.ns, [sys.executable, "-m", "pyflannel", "status",
                                              f"-etcd-endpoints={lab.etcd_endpoint}",
                                              f"-subnet-file={nodes['n1'].lab_node.subnet_file}"],
                    text=True).stdout
    assert "RX PKTS" in table and "s ago" in table


def test_readiness_and_counters_on_the_metrics_endpoint(cluster):
    lab, nodes = cluster
    n1 = nodes["n1"].lab_node
    assert ready(lab, n1)
    before = metric(lab, n1, "pyflannel_packets_total", direction="tx")
    assert pings(lab, nodes["n1"], nodes["n3"], count=3)
    time.sleep(0.6)
    assert metric(lab, n1, "pyflannel_packets_total", direction="tx") >= before + 3
    assert metric(lab, n1, "pyflannel_peers") == 2
    wait_until(lambda: metric(lab, n1, "pyflannel_peer_packets_total", direction="tx",
                              peer=nodes["n3"].network) >= 3, 6,
               "per-peer metric")
    assert metric(lab, n1, "pyflannel_peer_programming_seconds_count") >= 1


def test_sigkill_then_restart_keeps_the_subnet_and_traffic(cluster):
    lab, nodes = cluster
    n2 = nodes["n2"]
    lab.stop_daemon(n2.lab_node, sig=signal.SIGKILL)
    again = restart_node(lab, n2.lab_node)
    assert again.subnet == n2.subnet
    wait_until(lambda: pings(lab, nodes["n1"], n2), 5, "ping n1 -> n2 after restart")


def test_with_its_key_deleted_meanwhile_a_node_takes_its_subnet_from_its_file(cluster):
    lab, nodes = cluster
    n2 = nodes["n2"]
    lab.stop_daemon(n2.lab_node, sig=signal.SIGKILL)
    key = n2.key()
    assert lab.etcdctl("del", key).strip() == "1"
    again = restart_node(lab, n2.lab_node)
    assert again.subnet == n2.subnet
    wait_until(lambda: pings(lab, nodes["n3"], n2), 5, "ping n3 -> n2")


def test_sigterm_stops_within_two_seconds_and_keeps_the_lease(cluster):
    lab, nodes = cluster
    n3 = nodes["n3"]
    started = time.monotonic()
    code = lab.stop_daemon(n3.lab_node, sig=signal.SIGTERM, timeout=5)
    assert code == 0 and time.monotonic() - started < 2.0
    assert any(r["subnet"] == n3.network
               for r in status_json(lab, nodes["n1"].lab_node))
    assert restart_node(lab, n3.lab_node).subnet == n3.subnet


def test_a_node_whose_key_is_deleted_disappears_from_the_others(cluster):
    lab, nodes = cluster
    n1, n3 = nodes["n1"], nodes["n3"]
    lab.stop_daemon(n3.lab_node, sig=signal.SIGKILL)  # down, its lease still in etcd
    key = n3.key()
    lab.etcdctl("del", key)
    wait_until(lambda: metric(lab, n1.lab_node, "pyflannel_peers") == 1, 5, "peer removed")
    out = lab.run(n1.lab_node.ns, ["ping", "-n", "-c", "1", "-W", "2", "-I", n1.gw, n3.gw],
                  check=False, text=True)
    assert out.returncode != 0
    assert "Destination Net Unreachable" in out.stdout
    nodes["n3"] = restart_node(lab, n3.lab_node)
    wait_until(lambda: pings(lab, n1, nodes["n3"]), 5, "n3 back")


def test_a_node_that_joins_later_is_reachable_without_restarting_the_others(cluster):
    lab, nodes = cluster
    n4 = start_node(lab, lab.nodes[3])
    try:
        for other in ("n1", "n2", "n3"):
            wait_until(lambda o=other: pings(lab, nodes[o], n4) and pings(lab, n4, nodes[o]),
                       5, f"{other} <-> n4")
    finally:
        lab.stop_daemon(n4.lab_node, sig=signal.SIGKILL)


@pytest.fixture(scope="module")
def sprayers(cluster):
    """Datagram senders towards n1:8285: one from a host with no lease, one from n2."""
    lab, nodes = cluster
    stranger = lab.add_host("junk", "198.18.0.200")
    procs = {}
    for name, ns in (("stranger", stranger), ("peer", nodes["n2"].lab_node.ns)):
        procs[name] = lab.popen(ns, [sys.executable, "-u", "-c", UDP_SPRAY,
                                     nodes["n1"].lab_node.underlay_ip, "8285"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield procs
    for p in procs.values():
        p.stdin.close()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.one_of(
    st.binary(max_size=64),  # random bytes
    st.binary(min_size=1, max_size=19).map(lambda b: bytes([0x45]) + b),  # truncated headers
    st.binary(min_size=20, max_size=60).map(lambda b: bytes([0x60]) + b[1:]),  # IPv6
), min_size=1, max_size=20))
def test_garbage_datagrams_are_counted_and_never_hurt(sprayers, data):
    for p in sprayers.values():
        p.stdin.write(b"".join(d.hex().encode() + b"\n" for d in data if d))
        p.stdin.flush()


def test_after_the_garbage_real_traffic_still_flows_and_drops_were_counted(cluster, sprayers):
    lab, nodes = cluster
    n1 = nodes["n1"].lab_node
    time.sleep(0.6)
    unknown = metric(lab, n1, "pyflannel_dropped_packets_total", reason="unknown_source")
    malformed = sum(metric(lab, n1, "pyflannel_dropped_packets_total", reason=r)
                    for r in ("not_ip", "truncated", "bad_header_length", "wrong_subnet",
                              "ttl_exceeded"))
    assert unknown > 0 and malformed > 0
    assert lab.stop_daemon  # the daemon is alive:
    assert nodes["n1"].lab_node.process.poll() is None
    assert pings(lab, nodes["n1"], nodes["n2"]) and pings(lab, nodes["n2"], nodes["n1"])
