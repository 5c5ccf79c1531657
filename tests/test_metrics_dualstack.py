"""``pyflannel_info`` names both subnets of the lease."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pyflannel.daemon.snapshot import NodeSnapshot
from pyflannel.metrics import Metrics


def info_labels(snap: NodeSnapshot) -> dict[str, str]:
    body = Metrics(snap.for_metrics).render().decode()
    (sample,) = [s for f in text_string_to_metric_families(body) for s in f.samples
                 if s.name == "pyflannel_info"]
    return sample.labels


def test_pyflannel_info_has_an_ipv6_subnet_label():
    labels = info_labels(NodeSnapshot(backend="vxlan", subnet="10.1.86.0/24",
                                      ipv6_subnet="fc00:10:1:5c::/64"))
    assert labels["subnet"] == "10.1.86.0/24"
    assert labels["ipv6_subnet"] == "fc00:10:1:5c::/64"


def test_ipv6_only_and_ipv4_only_leave_the_other_label_empty():
    v6 = info_labels(NodeSnapshot(backend="vxlan", ipv6_subnet="fc00:10:1:5c::/64"))
    assert (v6["subnet"], v6["ipv6_subnet"]) == ("", "fc00:10:1:5c::/64")
    v4 = info_labels(NodeSnapshot(backend="udp", subnet="10.1.86.0/24"))
    assert (v4["subnet"], v4["ipv6_subnet"]) == ("10.1.86.0/24", "")
