"""The bgp backend across two L2 segments, with a pyflannel node as the route reflector.

n1 and n2 sit on the lab bridge; n3 sits on a second link (198.19.6.0/24) behind the BIRD
router, its only way to the others. n1 is a route reflector
(``-bgp-route-reflector-cluster-id``), so n2 and n3 peer only with it and with the router;
their sessions and their pods' traffic cross the router, and each next hop that is not on a
connected network is resolved through the kernel's route to it. gobgpd and a second BIRD,
iBGP peers of n1 only, learn every node's subnet from n1 with the originating node as next
hop; so does a second gobgpd, an eBGP peer of n1 only with ``KeepOriginalNextHop``.
"""

from __future__ import annotations

import json
import re

import pytest

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    pods_ping_every_ordered_pair,
    require_lab,
    start_node,
    status_json,
    wait_until,
)
from tests.test_bgp_lab import Bird, GoBgp

pytestmark = pytest.mark.lab

TOR, GOBGP, BIRD_IBGP = "198.18.0.201", "198.18.0.202", "198.18.0.203"
GOBGP_KEEP = "198.18.0.204"  # eBGP, AS 64700: a router that peers with the reflector only
SEGMENT2, TOR2, N3 = "198.19.6.0/24", "198.19.6.1", "198.19.6.3"
CONFIG = {"Network": "10.1.0.0/16", "Backend": {
    "Type": "bgp", "HoldTime": 9, "KeepaliveTime": 3,
    "Peers": [{"PeerIP": TOR, "ASNumber": 64600}, {"PeerIP": GOBGP, "ASNumber": 64512},
              {"PeerIP": BIRD_IBGP, "ASNumber": 64512},
              {"PeerIP": GOBGP_KEEP, "ASNumber": 64700, "KeepOriginalNextHop": True}]}}

ROUTER = """
router id {me};
protocol device {{ }}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}
template bgp node {{
  local as 64600;
  hold time 9; keepalive time 3;
  ipv4 {{ import all; export none; }};
}}
{neighbors}
"""

IBGP = """
router id {me};
protocol device {{ }}
protocol direct {{ ipv4; interface "eth0"; }}
protocol static {{ ipv4; route {segment2} via {tor}; }}
protocol bgp n1 {{
  local {me} as 64512; neighbor 198.18.0.1 as 64512;
  hold time 9; keepalive time 3;
  ipv4 {{ import all; export none; }};
}}
"""


class Router(Bird):
    def write(self, neighbors: str, own: str = "") -> None:
        (self.dir / "bird.conf").write_text(ROUTER.format(me=self.ip, neighbors=neighbors))


class IbgpBird(Bird):
    def write(self, neighbors: str, own: str = "") -> None:
        (self.dir / "bird.conf").write_text(IBGP.format(me=self.ip, segment2=SEGMENT2,
                                                        tor=TOR))

    def next_hops(self) -> dict[str, str]:
        """prefix -> BGP.next_hop of BIRD's routes."""
        text = self.birdc("show", "route", "all")
        out, prefix = {}, None
        for line in text.splitlines():
            m = re.match(r"^(\d+\.\d+\.\d+\.\d+/\d+)\s", line)
            if m:
                prefix = m.group(1)
            m = re.search(r"BGP\.next_hop: (\S+)", line)
            if m and prefix:
                out[prefix] = m.group(1)
        return out


def second_segment(lab: Lab, router: Bird, node) -> None:
    """Move ``node`` from the bridge to its own link behind the router."""
    lab._ip(node.ns, "link", "del", "eth0")  # noqa: SLF001 - the lab has one bridge only
    lab._ip(router.ns, "link", "add", "s2", "type", "veth", "peer", "name", "eth0",  # noqa: SLF001
            "netns", node.ns)
    lab._ip(router.ns, "addr", "add", f"{TOR2}/24", "dev", "s2")  # noqa: SLF001
    lab._ip(router.ns, "link", "set", "s2", "up")  # noqa: SLF001
    lab._ip(node.ns, "addr", "add", f"{N3}/24", "dev", "eth0")  # noqa: SLF001
    lab._ip(node.ns, "link", "set", "eth0", "up")  # noqa: SLF001
    lab._ip(node.ns, "route", "add", "default", "via", TOR2)  # noqa: SLF001
    lab.run(router.ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    for ns in [n.ns for n in lab.nodes if n is not node] + [lab.etcd_ns, *lab.hosts.values()]:
        if ns != router.ns:
            lab.run(ns, ["ip", "route", "add", SEGMENT2, "via", TOR])


@pytest.fixture(scope="module")
def cluster():
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, json.dumps(CONFIG))
        n1, n2, n3 = lab.nodes
        router = Router(lab, "tor", TOR)
        gobgp = GoBgp(lab, "gobgp", GOBGP)
        gobgp_keep = GoBgp(lab, "gobgpkeep", GOBGP_KEEP)
        bird = IbgpBird(lab, "bird", BIRD_IBGP)
        second_segment(lab, router, n3)
        router.start("\n".join(f"protocol bgp {n.name} from node {{ neighbor {ip} as 64512; }}"
                               for n, ip in ((n1, n1.underlay_ip), (n2, n2.underlay_ip),
                                             (n3, N3))))
        gobgp.start(64512, [n1.underlay_ip])
        gobgp_keep.start(64700, [n1.underlay_ip])
        bird.start("")
        nodes = {"n1": start_node(lab, n1, "-bgp-route-reflector-cluster-id=10.0.0.1"),
                 "n2": start_node(lab, n2), "n3": start_node(lab, n3)}
        yield lab, nodes, router, gobgp, bird, gobgp_keep


def kernel_routes(lab: Lab, ns: str) -> dict[str, str]:
    return {r["dst"]: r.get("gateway", "") for r in json.loads(
        lab.run(ns, ["ip", "-j", "route", "show", "proto", "120"], text=True).stdout)}


def established(lab: Lab, node) -> dict[str, str]:
    return {r["peer"]: r["kind"] for r in status_json(lab, node.lab_node)
            if "bgp_peer" in r and r["state"] == "Established"}


def test_clients_peer_only_with_the_reflector_and_the_router(cluster):
    lab, nodes, *_ = cluster
    for name in ("n2", "n3"):
        wait_until(lambda name=name: established(lab, nodes[name]) == {
            "198.18.0.1": "reflector", TOR: "configured"}, 15, f"{name}'s sessions")
    wait_until(lambda: established(lab, nodes["n1"]) == {
        "198.18.0.2": "client", N3: "client", TOR: "configured", GOBGP: "configured",
        BIRD_IBGP: "configured", GOBGP_KEEP: "configured"}, 15, "n1's sessions")


def test_next_hops_across_the_router_are_resolved_through_it(cluster):
    lab, nodes, *_ = cluster
    n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
    # n2 learns n3's subnet from the reflector with n3 (another segment) as next hop: the
    # kernel route goes via the router, the way to n3.
    wait_until(lambda: kernel_routes(lab, n2.lab_node.ns) == {
        n1.network: "198.18.0.1", n3.network: TOR}, 15, "n2's routes")
    wait_until(lambda: kernel_routes(lab, n3.lab_node.ns) == {
        n1.network: TOR2, n2.network: TOR2}, 15, "n3's routes")


def test_pods_ping_every_ordered_pair_across_the_segments(cluster):
    lab, nodes, *_ = cluster
    pods_ping_every_ordered_pair(lab, list(nodes.values()))


def test_gobgp_and_bird_learn_every_node_from_the_reflector(cluster):
    _lab, nodes, _router, gobgp, bird, gobgp_keep = cluster
    want = {n.network: ip for n, ip in ((nodes["n1"], "198.18.0.1"),
                                        (nodes["n2"], "198.18.0.2"), (nodes["n3"], N3))}
    wait_until(lambda: gobgp.rib() == want, 15, f"gobgpd's rib {want}")
    wait_until(lambda: bird.next_hops() == want, 15, f"BIRD's routes {want}")
    # KeepOriginalNextHop: an eBGP router peering with the reflector alone learns every node
    # with that node as next hop (only n1's own subnet without it).
    wait_until(lambda: gobgp_keep.rib() == want, 15, f"the eBGP gobgpd's rib {want}")


def test_a_peer_removed_from_the_config_goes_without_a_restart(cluster):
    lab, nodes, _router, gobgp, *_ = cluster
    pid = nodes["n1"].lab_node.process.pid
    config = dict(CONFIG, Backend=dict(CONFIG["Backend"], Peers=[
        p for p in CONFIG["Backend"]["Peers"] if p["PeerIP"] != GOBGP]))
    lab.etcdctl("put", CONFIG_KEY, json.dumps(config))
    wait_until(lambda: GOBGP not in established(lab, nodes["n1"]), 15,
               "n1 to end its session with gobgpd")
    wait_until(lambda: gobgp.rib() == {}, 15, "gobgpd to lose the routes")
    assert nodes["n1"].lab_node.process.pid == pid and nodes["n1"].lab_node.process.poll() is None
