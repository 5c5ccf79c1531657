"""The bgp backend with BIRD 2 as the route reflector, on a dual-stack network.

The node-to-node mesh is off: each node has one session, with BIRD (RFC 4456 reflector), and
learns the other nodes' IPv4 and IPv6 subnets through it with the originating node as next
hop. IPv6 travels on the same IPv4 sessions (MP-BGP). A second BIRD, a router peering over
eBGP on the IPv6 underlay (a configured peer whose PeerIP is IPv6), learns every node's IPv6
subnet.
"""

from __future__ import annotations

import json

import pytest

from pyflannel.lab import Lab, underlay_ip6
from tests.labtools import (
    CONFIG_KEY,
    pods_ping_every_ordered_pair,
    require_lab,
    start_node,
    status_json,
    wait_until,
)
from tests.test_bgp_lab import Bird

pytestmark = pytest.mark.lab

RR, ROUTER6 = "198.18.0.201", "198.18.0.202"
CONFIG = {"Network": "10.1.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00:10:1::/48",
          "Backend": {"Type": "bgp", "NodeToNodeMesh": False, "HoldTime": 9,
                      "KeepaliveTime": 3, "Peers": [
                          {"PeerIP": RR, "ASNumber": 64512},
                          {"PeerIP": underlay_ip6(ROUTER6), "ASNumber": 64600}]}}

REFLECTOR = """
router id {me};
protocol device {{ }}
protocol direct {{ ipv4; ipv6; interface "eth0"; }}
template bgp rrclient {{
  local {me} as 64512;
  rr client; rr cluster id {me};
  hold time 9; keepalive time 3;
  ipv4 {{ import all; export all; }};
  ipv6 {{ import all; export all; }};
}}
{neighbors}
"""


ROUTER_V6 = """
router id {router_id};
protocol device {{ }}
protocol kernel {{ ipv6 {{ import none; export all; }}; }}
template bgp node {{
  local {me} as 64600;
  hold time 9; keepalive time 3;
  ipv6 {{ import all; export none; }};
}}
{neighbors}
"""


class RouterV6(Bird):
    """A router that peers with the nodes over the IPv6 underlay only."""

    def write(self, neighbors: str, own: str = "") -> None:
        (self.dir / "bird.conf").write_text(ROUTER_V6.format(
            router_id=self.ip, me=underlay_ip6(self.ip), neighbors=neighbors))


class Reflector(Bird):
    def write(self, neighbors: str, own: str = "") -> None:
        (self.dir / "bird.conf").write_text(REFLECTOR.format(me=self.ip, neighbors=neighbors))


@pytest.fixture(scope="module")
def cluster():
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, json.dumps(CONFIG))
        rr = Reflector(lab, "rr", RR)
        rr.start("\n".join(f"protocol bgp {n.name} from rrclient {{ neighbor {n.underlay_ip} "
                           "as 64512; }" for n in lab.nodes))
        router6 = RouterV6(lab, "router6", ROUTER6)
        router6.start("\n".join(f"protocol bgp {n.name} from node {{ neighbor "
                                f"{underlay_ip6(n.underlay_ip)} as 64512; }}" for n in lab.nodes))
        nodes = {n.name: start_node(lab, n) for n in lab.nodes}
        yield lab, nodes, rr, router6


def routes(lab: Lab, ns: str, family: str, proto: str = "120") -> dict[str, str]:
    out = {}
    for r in json.loads(lab.run(ns, ["ip", "-j", family, "route", "show", "proto", proto],
                                text=True).stdout):
        out[r["dst"]] = r.get("gateway", "")
    return out


def test_nodes_learn_each_other_through_the_reflector_with_the_origin_as_next_hop(cluster):
    lab, nodes, rr, _router6 = cluster
    wait_until(lambda: all(rr.established(name) for name in nodes), 15, "BIRD sessions")
    for a in nodes.values():
        others = [b for b in nodes.values() if b is not a]
        want4 = {b.network: b.lab_node.underlay_ip for b in others}
        want6 = {b.network6: underlay_ip6(b.lab_node.underlay_ip) for b in others}
        wait_until(lambda a=a, want4=want4: routes(lab, a.lab_node.ns, "-4") == want4, 10,
                   f"{a.lab_node.name}'s IPv4 routes {want4}")
        wait_until(lambda a=a, want6=want6: routes(lab, a.lab_node.ns, "-6") == want6, 10,
                   f"{a.lab_node.name}'s IPv6 routes {want6}")
        sessions = [r for r in status_json(lab, a.lab_node) if "bgp_peer" in r]
        assert (RR, "Established") in [(r["peer"], r["state"]) for r in sessions]


def test_pods_ping_every_ordered_pair_over_ipv4_and_ipv6(cluster):
    lab, nodes, *_ = cluster
    pods_ping_every_ordered_pair(lab, list(nodes.values()), ipv6=True)


def test_a_router_peering_over_the_ipv6_underlay_learns_every_nodes_ipv6_subnet(cluster):
    lab, nodes, _rr, router6 = cluster
    wait_until(lambda: all(router6.established(name) for name in nodes), 15,
               "the IPv6 sessions")
    want = {n.network6: underlay_ip6(n.lab_node.underlay_ip) for n in nodes.values()}
    wait_until(lambda: routes(lab, router6.ns, "-6", proto="bird") == want, 10,
               f"the router's IPv6 routes {want}")
    for n in nodes.values():
        rows = {r["peer"]: r for r in status_json(lab, n.lab_node) if "bgp_peer" in r}
        row = rows[underlay_ip6(ROUTER6)]
        assert (row["state"], row["kind"], row["sent"]) == ("Established", "configured", 1), row
