"""Fast framing on the lab: two pyflannel nodes on auto (vnet1 between them) and one forced
to flannel's plain framing, all in one cluster, moving 100 MB intact every way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    UDP_SEND_FROM,
    UDP_SOURCE_OF,
    metric,
    require_lab,
    start_node,
    tcp_transfer,
    wait_until,
)

pytestmark = pytest.mark.lab

SIZE = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def mixed():
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}}')
        auto1 = start_node(lab, lab.nodes[0])
        auto2 = start_node(lab, lab.nodes[1])
        plain = start_node(lab, lab.nodes[2], "-udp-framing=flannel")
        yield lab, auto1, auto2, plain


def transfer(lab: Lab, src, dst, port: int) -> None:
    tcp_transfer(lab, src.lab_node, src.gw, dst.lab_node, dst.gw, SIZE, port, timeout=240)


def test_the_leases_advertise_the_framings_each_node_accepts(mixed):
    lab, auto1, _auto2, plain = mixed

    def value(node):
        key = node.key()
        return json.loads(lab.etcdctl("get", key, "--print-value-only"))

    assert value(auto1)["BackendData"] == {"Framings": ["vnet1"]}
    assert "BackendData" not in value(plain)  # exactly what flanneld publishes


def test_100mb_between_two_auto_nodes_over_vnet1(mixed):
    lab, auto1, auto2, _plain = mixed
    before = metric(lab, auto1.lab_node, "pyflannel_bytes_total", direction="tx")
    packets = metric(lab, auto1.lab_node, "pyflannel_packets_total", direction="tx")
    transfer(lab, auto1, auto2, 5101)
    sent_bytes = metric(lab, auto1.lab_node, "pyflannel_bytes_total", direction="tx") - before
    sent_packets = metric(lab, auto1.lab_node, "pyflannel_packets_total", direction="tx") - packets
    assert sent_bytes / sent_packets > 4000  # super-packets, not 1.4 kB datagrams


def test_100mb_from_the_plain_node(mixed):
    lab, auto1, _auto2, plain = mixed
    transfer(lab, plain, auto1, 5102)


def test_100mb_from_an_auto_node_to_the_plain_node_is_segmented_correctly(mixed):
    """... and the plain node joins each flow's run of plain packets into super-packets
    before its TUN write (GRO in user space), as flanneld's C proxy never does."""
    lab, auto1, _auto2, plain = mixed
    before = metric(lab, auto1.lab_node, "pyflannel_dropped_packets_total", reason="bad_offload")
    joined = metric(lab, plain.lab_node, "pyflannel_coalesced_segments_total")
    transfer(lab, auto1, plain, 5103)
    assert metric(lab, auto1.lab_node, "pyflannel_dropped_packets_total",
                  reason="bad_offload") == before
    wait_until(lambda: metric(lab, plain.lab_node, "pyflannel_coalesced_segments_total")
               > joined + 1000, 5, "segments joined on the plain node")
    value = json.loads(lab.etcdctl("get", plain.key(), "--print-value-only"))
    assert "BackendData" not in value  # still exactly what flanneld publishes


def test_partial_udp_checksums_are_finished_for_the_plain_node(mixed):
    """The auto node's kernel leaves UDP checksums to the "hardware" (us); the plain node's
    kernel verifies them and would drop the datagram if we had not finished them."""
    lab, auto1, _auto2, plain = mixed
    finished = metric(lab, auto1.lab_node, "pyflannel_offload_finished_total")
    rx = lab.popen(plain.lab_node.ns, [sys.executable, "-c", UDP_SOURCE_OF, plain.gw, "7101"],
                   stdout=subprocess.PIPE)
    assert rx.stdout.readline().strip() == b"ready"
    lab.run(auto1.lab_node.ns, [sys.executable, "-c", UDP_SEND_FROM, auto1.gw, plain.gw, "7101"])
    assert rx.stdout.readline().decode().strip() == auto1.gw
    assert metric(lab, auto1.lab_node, "pyflannel_offload_finished_total") > finished
