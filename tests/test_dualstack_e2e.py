"""Dual-stack and IPv6-only data planes on the lab, with flanneld v0.20.2's kernel state.

The backend-level tests drive the backend objects directly inside lab namespaces (prepare,
activate, add_peer, commit with hand-made leases), so they pin down the data plane on its
own: device names, MTUs, addresses, routes, neighbour and FDB entries, lease attributes, and
pings between the nodes' docker0 bridges over IPv4 and IPv6. The daemon-level tests at the
end run whole pyflanneld nodes against etcd.

Leases used below: n1 holds 10.1.92.0/24 and fc00:10:1:5c::/64, n2 holds 10.1.79.0/24 and
fc00:10:1:4f::/64 (the issue's examples).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from pyflannel.lab import Lab, LabNode
from tests.labtools import (
    CONFIG_KEY,
    Node,
    metric,
    require_lab,
    start_node,
    status_json,
    tcp_transfer,
    wait_until,
)

pytestmark = pytest.mark.lab

REPO_ROOT = Path(__file__).resolve().parent.parent

DUAL = {"vxlan": '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:10:1::/48",'
                 '"Backend":{"Type":"vxlan"}}',
        "host-gw": '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:10:1::/48",'
                   '"Backend":{"Type":"host-gw"}}'}
V6ONLY = {kind: cfg.replace('{"Network":"10.1.0.0/16",', '{"EnableIPv4":false,')
          for kind, cfg in DUAL.items()}

KEYS = {"n1": "10.1.92.0-24&fc00:10:1:5c::-64", "n2": "10.1.79.0-24&fc00:10:1:4f::-64"}
KEYS6 = {"n1": "0.0.0.0-0&fc00:10:1:5c::-64", "n2": "0.0.0.0-0&fc00:10:1:4f::-64"}
DOCKER4 = {"n1": "10.1.92.1/24", "n2": "10.1.79.1/24"}
DOCKER6 = {"n1": "fc00:10:1:5c::1/64", "n2": "fc00:10:1:4f::1/64"}
MAC_RE = r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}"

# Run inside a lab namespace: find eth0 as the daemon does, make the backend the config asks
# for, prepare it, and (given our lease key) activate it with hand-made peer leases. Optional
# steps: remove peers, delete devices under it and let one reconcile pass repair them.
# Prints the lease attributes it would publish, and any it republished, as JSON.
DRIVE_BACKEND = r"""
import asyncio, json, logging, subprocess, sys
from pyflannel.backend import make_backend
from pyflannel.config import parse_config
from pyflannel.host.netlink import find_external_interface
from pyflannel.lease.model import Lease

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s %(message)s")
job = json.loads(sys.argv[1])
cfg = parse_config(job["config"])


async def main():
    # pyroute2's synchronous calls run in a thread, as in the daemon
    ext = await asyncio.to_thread(find_external_interface, ["eth0"],
                                  want_ipv6=cfg.enable_ipv6, want_ipv4=cfg.enable_ipv4)
    backend = make_backend(cfg, ext)
    out = {"address": str(ext.address), "address6": str(ext.address6), "mtu": backend.mtu}
    attrs = await backend.prepare()
    out["attrs"] = attrs.to_json()
    published = []

    async def publish(a):
        published.append(a.to_json())

    backend.publish = publish
    if job.get("own"):
        await backend.activate(Lease.from_kv(job["own"], attrs.to_json()))
        for key, value in job.get("peers", {}).items():
            await backend.add_peer(Lease.from_kv(key, value))
        await backend.commit()
        for key, value in job.get("remove", {}).items():
            await backend.remove_peer(Lease.from_kv(key, value))
        if job.get("remove"):
            await backend.commit()
        for dev in job.get("delete", []):
            subprocess.run(["ip", "link", "del", dev], check=True)
        if job.get("delete"):
            await backend.reconcile_all()
    out["published"] = published
    await backend.teardown()
    print(json.dumps(out))


asyncio.run(main())
"""


def drive(lab: Lab, node: LabNode, config: str, **job) -> dict:
    proc = lab.run(node.ns, [sys.executable, "-c", DRIVE_BACKEND,
                             json.dumps({"config": config, **job})],
                   env={"PYTHONPATH": str(REPO_ROOT)}, text=True, check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    out["log"] = proc.stderr
    return out


def sh(lab: Lab, node: LabNode, *argv: str) -> str:
    return lab.run(node.ns, list(argv), text=True).stdout


def lines(lab: Lab, node: LabNode, *argv: str) -> list[str]:
    return [" ".join(line.split()) for line in sh(lab, node, *argv).splitlines()]


def two_nodes(lab: Lab, config: str, keys: dict[str, str]) -> dict[str, dict]:
    """Prepare both nodes, then activate each with the other as its peer."""
    n1, n2 = lab.nodes
    first = {n.name: drive(lab, n, config) for n in (n1, n2)}
    second = {}
    for me, other in ((n1, n2), (n2, n1)):
        second[me.name] = drive(lab, me, config, own=keys[me.name],
                                peers={keys[other.name]: first[other.name]["attrs"]})
        # the device left by the first run is reused: same MACs, same lease attributes
        assert second[me.name]["attrs"] == first[me.name]["attrs"]
    return second


def docker0_pings(lab: Lab, ipv4: bool = True) -> None:
    n1, n2 = lab.nodes
    for n in (n1, n2):
        lab.add_docker0(n, DOCKER4[n.name] if ipv4 else None, DOCKER6[n.name])
    for a, b in ((n1, n2), (n2, n1)):
        src6, dst6 = DOCKER6[a.name].split("/")[0], DOCKER6[b.name].split("/")[0]
        wait_until(lambda a=a, s=src6, d=dst6: lab.ping(a, d, src_ip=s), 5,
                   f"{a.name} -> {b.name} over IPv6")
        if ipv4:
            src4, dst4 = DOCKER4[a.name].split("/")[0], DOCKER4[b.name].split("/")[0]
            assert lab.ping(a, dst4, src_ip=src4), f"{a.name} -> {b.name} over IPv4"


@pytest.fixture
def lab():
    require_lab()
    with Lab(2, with_etcd=False) as lab:
        yield lab


# ------------------------------------------------------------------------------ vxlan


def test_vxlan_dual_stack_devices_routes_and_lease(lab):
    n1, n2 = lab.nodes
    out = two_nodes(lab, DUAL["vxlan"], KEYS)
    assert out["n1"]["mtu"] == 1450  # FLANNEL_MTU: flanneld writes external MTU - 50
    attrs = out["n1"]["attrs"]
    m = re.fullmatch(
        r'\{"PublicIP":"198\.18\.0\.1","PublicIPv6":"fd00:198::1","BackendType":"vxlan",'
        rf'"BackendData":\{{"VNI":1,"VtepMAC":"({MAC_RE})"\}},'
        rf'"BackendV6Data":\{{"VNI":1,"VtepMAC":"({MAC_RE})"\}}\}}', attrs)
    assert m, attrs
    mac4, mac6 = m.groups()
    assert mac4 != mac6

    dev = json.loads(sh(lab, n1, "ip", "-d", "-j", "link", "show", "flannel-v6.1"))[0]
    data = dev["linkinfo"]["info_data"]
    assert (dev["mtu"], dev["address"]) == (1430, mac6)
    assert (data["id"], data["local6"], data["link"], data["port"], data["learning"]) == (
        1, "fd00:198::1", "eth0", 8472, False)
    dev4 = json.loads(sh(lab, n1, "ip", "-d", "-j", "link", "show", "flannel.1"))[0]
    assert (dev4["mtu"], dev4["address"], dev4["linkinfo"]["info_data"]["local"]) == (
        1450, mac4, "198.18.0.1")
    assert lines(lab, n1, "ip", "-6", "-o", "addr", "show", "dev", "flannel-v6.1",
                 "scope", "global")[0].split()[3] == "fc00:10:1:5c::/128"
    assert lines(lab, n1, "ip", "-4", "-o", "addr", "show", "dev", "flannel.1")[0].split()[3] \
        == "10.1.92.0/32"

    peer = json.loads(out["n2"]["attrs"])
    peer_mac4, peer_mac6 = peer["BackendData"]["VtepMAC"], peer["BackendV6Data"]["VtepMAC"]
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == [
        "fc00:10:1:4f::/64 via fc00:10:1:4f:: dev flannel-v6.1 metric 1024 onlink pref medium"]
    assert lines(lab, n1, "ip", "-4", "route", "show", "proto", "120") == [
        "10.1.79.0/24 via 10.1.79.0 dev flannel.1 onlink"]
    assert lines(lab, n1, "ip", "-6", "neigh", "show", "dev", "flannel-v6.1", "nud",
                 "permanent") == [f"fc00:10:1:4f:: lladdr {peer_mac6} PERMANENT"]
    assert lines(lab, n1, "ip", "-4", "neigh", "show", "dev", "flannel.1") == [
        f"10.1.79.0 lladdr {peer_mac4} PERMANENT"]
    assert lines(lab, n1, "bridge", "fdb", "show", "dev", "flannel-v6.1") == [
        f"{peer_mac6} dst fd00:198::2 self permanent"]
    assert lines(lab, n1, "bridge", "fdb", "show", "dev", "flannel.1") == [
        f"{peer_mac4} dst 198.18.0.2 self permanent"]
    docker0_pings(lab)


def test_vxlan_ipv6_only_has_only_the_v6_device(lab):
    n1, _n2 = lab.nodes
    out = two_nodes(lab, V6ONLY["vxlan"], KEYS6)
    attrs = out["n1"]["attrs"]
    assert re.fullmatch(r'\{"PublicIP":"0\.0\.0\.0","PublicIPv6":"fd00:198::1",'
                        r'"BackendType":"vxlan",'
                        rf'"BackendV6Data":\{{"VNI":1,"VtepMAC":"{MAC_RE}"\}}\}}', attrs), attrs
    links = [link["ifname"] for link in json.loads(sh(lab, n1, "ip", "-j", "link"))]
    assert "flannel-v6.1" in links and "flannel.1" not in links
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == [
        "fc00:10:1:4f::/64 via fc00:10:1:4f:: dev flannel-v6.1 metric 1024 onlink pref medium"]
    assert lines(lab, n1, "ip", "-4", "route", "show", "proto", "120") == []
    docker0_pings(lab, ipv4=False)


def test_vxlan_peer_removal_and_a_deleted_v6_device(lab):
    """A departed peer takes its IPv6 route, neighbour and FDB entry along; a deleted
    flannel-v6.1 comes back with a new MAC that is republished, and its peers reprogrammed."""
    n1, n2 = lab.nodes
    out = two_nodes(lab, DUAL["vxlan"], KEYS)
    peers = {KEYS["n2"]: drive(lab, n2, DUAL["vxlan"])["attrs"]}
    removed = drive(lab, n1, DUAL["vxlan"], own=KEYS["n1"], peers=peers, remove=peers)
    assert removed["published"] == []
    assert lines(lab, n1, "ip", "route", "show", "proto", "120") == []
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == []
    assert lines(lab, n1, "ip", "-6", "neigh", "show", "dev", "flannel-v6.1", "nud",
                 "permanent") == []
    assert lines(lab, n1, "bridge", "fdb", "show", "dev", "flannel-v6.1") == []

    repaired = drive(lab, n1, DUAL["vxlan"], own=KEYS["n1"], peers=peers,
                     delete=["flannel-v6.1"])
    assert len(repaired["published"]) == 1
    new = json.loads(repaired["published"][0])
    old = json.loads(out["n1"]["attrs"])
    assert new["BackendData"] == old["BackendData"]  # flannel.1 untouched
    assert new["BackendV6Data"]["VtepMAC"] != old["BackendV6Data"]["VtepMAC"]
    mac = json.loads(sh(lab, n1, "ip", "-j", "link", "show", "flannel-v6.1"))[0]["address"]
    assert new["BackendV6Data"]["VtepMAC"] == mac
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == [
        "fc00:10:1:4f::/64 via fc00:10:1:4f:: dev flannel-v6.1 metric 1024 onlink pref medium"]
    assert lines(lab, n1, "ip", "-6", "-o", "addr", "show", "dev", "flannel-v6.1",
                 "scope", "global")[0].split()[3] == "fc00:10:1:5c::/128"


def test_vxlan_direct_routing_in_both_families(lab):
    """Peers on our own underlay segment get plain routes via their PublicIP and PublicIPv6
    (host-gw for neighbours), and no neighbour or FDB entries."""
    n1, _n2 = lab.nodes
    config = DUAL["vxlan"].replace('"Type":"vxlan"', '"Type":"vxlan","DirectRouting":true')
    two_nodes(lab, config, KEYS)
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == [
        "fc00:10:1:4f::/64 via fd00:198::2 dev eth0 metric 1024 pref medium"]
    assert lines(lab, n1, "ip", "-4", "route", "show", "proto", "120") == [
        "10.1.79.0/24 via 198.18.0.2 dev eth0"]
    assert lines(lab, n1, "bridge", "fdb", "show", "dev", "flannel-v6.1") == []
    assert lines(lab, n1, "ip", "-6", "neigh", "show", "dev", "flannel-v6.1", "nud",
                 "permanent") == []
    docker0_pings(lab)


def test_switching_back_to_ipv4_only_removes_the_v6_device(lab):
    n1, _n2 = lab.nodes
    two_nodes(lab, DUAL["vxlan"], KEYS)
    out = drive(lab, n1, '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}',
                own="10.1.92.0-24", peers={"10.1.79.0-24": '{"PublicIP":"198.18.0.2",'
                '"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:00:00:00:00:02"}}'})
    assert '"PublicIPv6":null' in out["attrs"] and "BackendV6Data" not in out["attrs"]
    assert "removed devices of an earlier backend: flannel-v6.1" in out["log"]
    links = [link["ifname"] for link in json.loads(sh(lab, n1, "ip", "-j", "link"))]
    assert "flannel.1" in links and "flannel-v6.1" not in links
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == []
    assert lines(lab, n1, "ip", "-4", "route", "show", "proto", "120") == [
        "10.1.79.0/24 via 10.1.79.0 dev flannel.1 onlink"]


def test_vxlan_ipv6_needs_an_ipv6_address_on_the_interface(lab):
    n1 = lab.nodes[0]
    lab.run(n1.ns, ["ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global"])
    proc = lab.run(n1.ns, [sys.executable, "-c", DRIVE_BACKEND,
                           json.dumps({"config": DUAL["vxlan"]})],
                   env={"PYTHONPATH": str(REPO_ROOT)}, text=True, check=False)
    assert proc.returncode != 0
    assert "interface eth0 has no global IPv6 address" in proc.stderr


# ------------------------------------------------------------------------------ host-gw


def test_hostgw_dual_stack_routes_and_lease(lab):
    n1, _n2 = lab.nodes
    out = two_nodes(lab, DUAL["host-gw"], KEYS)
    assert out["n1"]["attrs"] == (
        '{"PublicIP":"198.18.0.1","PublicIPv6":"fd00:198::1","BackendType":"host-gw"}')
    assert out["n1"]["mtu"] == 1500
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == [
        "fc00:10:1:4f::/64 via fd00:198::2 dev eth0 metric 1024 pref medium"]
    assert lines(lab, n1, "ip", "-4", "route", "show", "proto", "120") == [
        "10.1.79.0/24 via 198.18.0.2 dev eth0"]
    docker0_pings(lab)


def test_hostgw_ipv6_only(lab):
    n1, _n2 = lab.nodes
    out = two_nodes(lab, V6ONLY["host-gw"], KEYS6)
    assert out["n1"]["attrs"] == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198::1","BackendType":"host-gw"}')
    assert lines(lab, n1, "ip", "-6", "route", "show", "proto", "120") == [
        "fc00:10:1:4f::/64 via fd00:198::2 dev eth0 metric 1024 pref medium"]
    assert lines(lab, n1, "ip", "-4", "route", "show", "proto", "120") == []
    docker0_pings(lab, ipv4=False)


# ------------------------------------------------------------------------------ udp


def test_udp_ipv6_only_needs_an_ipv6_address_on_the_interface(lab):
    n1 = lab.nodes[0]
    lab.run(n1.ns, ["ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global"])
    cfg = V6ONLY["vxlan"].replace('"vxlan"', '"udp"')
    proc = lab.run(n1.ns, [sys.executable, "-c", DRIVE_BACKEND, json.dumps({"config": cfg})],
                   env={"PYTHONPATH": str(REPO_ROOT)}, text=True, check=False)
    assert proc.returncode != 0
    assert "interface eth0 has no global IPv6 address" in proc.stderr
    assert "flannel0" not in sh(lab, n1, "ip", "link")


# ------------------------------------------------------------------------------ daemons


def wait_ping(lab: Lab, a: Node, dst: str, src: str, what: str) -> None:
    wait_until(lambda: lab.ping(a.lab_node, dst, src_ip=src), 5, what)


MTU = {"host-gw": "1500", "vxlan": "1450", "udp": "1472", "udp-v6only": "1452"}
UDP = {"dual": DUAL["vxlan"].replace('"vxlan"', '"udp"'),
       "v6only": V6ONLY["vxlan"].replace('"vxlan"', '"udp"')}


@pytest.mark.parametrize("kind,config,flags", [
    pytest.param(kind, cfg, flags, id=kind) for kind, cfg, flags in (
        ("vxlan", DUAL["vxlan"], ()), ("host-gw", DUAL["host-gw"], ()),
        ("vxlan-v6only", V6ONLY["vxlan"], ()), ("host-gw-v6only", V6ONLY["host-gw"], ()),
        ("udp", UDP["dual"], ()),
        ("udp-flannel", UDP["dual"], ("-udp-framing=flannel",)),
        ("udp-v6only", UDP["v6only"], ()))
])
def test_daemons_ping_over_ipv4_and_ipv6(kind, config, flags):
    """Every backend in dual-stack and IPv6-only. udp goes past flanneld's (IPv4 only):
    IPv6 inside IPv4 in both framings, and inside IPv6 on an IPv6-only network."""
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, config)
        n1, n2 = (start_node(lab, n, *flags) for n in lab.nodes)
        env = lab.wait_subnet_file(n1.lab_node)
        assert env["FLANNEL_IPV6_NETWORK"] == "fc00:10:1::/48"
        assert bool(n1.subnet) == ("FLANNEL_NETWORK" in env) == (not kind.endswith("v6only"))
        assert env["FLANNEL_MTU"] == MTU[kind if kind in MTU else kind.split("-v6only")[0]
                                         .replace("udp-flannel", "udp")]
        if kind.startswith("host-gw"):
            want = [f"{n2.network6} via fd00:198::2 dev eth0 metric 1024 pref medium"]
        elif kind.startswith("udp"):
            want = ["fc00:10:1::/48 dev flannel0 metric 1024 pref medium"]
        else:
            want = [f"{n2.network6} via {n2.network6.split('/')[0]} dev flannel-v6.1 "
                    "metric 1024 onlink pref medium"]
        wait_until(lambda: lines(lab, n1.lab_node, "ip", "-6", "route", "show", "proto", "120")
                   == want, 10, f"{want} on n1")
        for a, b in ((n1, n2), (n2, n1)):
            wait_ping(lab, a, b.gw6, a.gw6, f"{a.lab_node.name} -> {b.lab_node.name} over IPv6")
            if a.subnet:
                assert lab.ping(a.lab_node, b.gw, src_ip=a.gw), "over IPv4"
        if kind.startswith("udp"):
            check_udp_ipv6(lab, kind, n1, n2)


def tcp6_transfer(lab: Lab, src: Node, dst: Node, size: int, port: int = 5001) -> None:
    """``size`` seeded random bytes over TCP between the nodes' IPv6 pod addresses,
    arriving intact (length and SHA-256 as sent)."""
    tcp_transfer(lab, src.lab_node, src.gw6, dst.lab_node, dst.gw6, size, port, timeout=60)


def test_udp_ipv6_between_a_vnet1_node_and_a_plain_framing_node():
    """A mixed udp cluster on a dual-stack network: the vnet1 node cuts its TSO6
    super-packets into checked TCPv6 segments for the plain node, which joins them again
    before its TUN write; TCP over IPv6 arrives intact both ways."""
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, UDP["dual"])
        auto = start_node(lab, lab.nodes[0])
        plain = start_node(lab, lab.nodes[1], "-udp-framing=flannel")
        wait_ping(lab, auto, plain.gw6, auto.gw6, "auto -> plain over IPv6")
        finished = metric(lab, auto.lab_node, "pyflannel_offload_finished_total")
        joined = metric(lab, plain.lab_node, "pyflannel_coalesced_segments_total")
        tcp6_transfer(lab, auto, plain, 8 << 20)
        tcp6_transfer(lab, plain, auto, 8 << 20, port=5002)
        wait_until(lambda: metric(lab, auto.lab_node, "pyflannel_offload_finished_total")
                   > finished and metric(lab, plain.lab_node,
                                         "pyflannel_coalesced_segments_total") > joined,
                   5, "super-packets cut on the vnet1 node and joined on the plain node")
        assert metric(lab, auto.lab_node, "pyflannel_dropped_packets_total",
                      reason="bad_offload") == 0


def check_udp_ipv6(lab: Lab, kind: str, n1: Node, n2: Node) -> None:
    """The udp lease says which framing each family takes; TCP over IPv6 arrives intact
    (TSO6 super-packets in vnet1 trains, or one packet per datagram); a destination
    nobody leases is answered with ICMPv6 no-route; the counters are per family."""
    value = json.loads(lab.etcdctl("get", n1.key(), "--print-value-only"))
    assert value["BackendV6Data"] == {"Framings": [] if kind == "udp-flannel" else ["vnet1"]}
    assert value["PublicIPv6"] == "fd00:198::1"
    assert value.get("BackendData") == ({"Framings": ["vnet1"]} if kind == "udp" else None)
    assert lines(lab, n1.lab_node, "ip", "-6", "-o", "addr", "show", "dev", "flannel0",
                 "scope", "global")[0].split()[3] == n1.network6.split("/")[0] + "/128"
    size = 8 << 20
    tcp6_transfer(lab, n2, n1, size)
    reply = lab.run(n1.lab_node.ns, ["ping", "-6", "-c", "1", "-W", "2", "-I", n1.gw6,
                                     "fc00:10:1:ff00::1"], check=False, text=True).stdout
    assert "No route" in reply, reply
    # (the counters reach /metrics within a second or two)
    wait_until(lambda: (c := metric_counters(lab, n1.lab_node))["rx_ipv6"] > 0
               and c["tx_ipv6"] > 0, 5, "IPv6 counted apart")
    c = metric_counters(lab, n1.lab_node)
    wait_until(lambda: any(r["counters"] and r["counters"]["rx_packets"] > 0
                           for r in status_json(lab, n1.lab_node) if not r["this_node"]),
               5, "pyflannel status shows the peer's traffic")
    if kind.endswith("v6only"):
        assert c["rx"] == c["rx_ipv6"], c
    else:
        assert c["rx"] > c["rx_ipv6"], c  # the IPv4 ping's reply, too


def metric_counters(lab: Lab, node: LabNode) -> dict[str, float]:
    return {"rx": metric(lab, node, "pyflannel_packets_total", direction="rx"),
            "rx_ipv6": metric(lab, node, "pyflannel_ipv6_packets_total", direction="rx"),
            "tx_ipv6": metric(lab, node, "pyflannel_ipv6_packets_total", direction="tx")}


def test_daemon_recreates_a_deleted_v6_device_and_republishes_its_mac():
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, DUAL["vxlan"])
        n1, n2 = (start_node(lab, n) for n in lab.nodes)
        wait_ping(lab, n2, n1.gw6, n2.gw6, "n2 -> n1 over IPv6")
        key = f"/coreos.com/network/subnets/{n1.network.replace('/', '-')}&" \
              f"{n1.network6.replace('/', '-')}"

        def v6_mac_in_etcd() -> str:
            value = lab.etcdctl("get", key, "--print-value-only").strip()
            return json.loads(value)["BackendV6Data"]["VtepMAC"] if value else ""

        # an IPv6 route deleted by hand is back at once (netlink events, not the 10 s check)
        route = ["ip", "-6", "route", "show", "proto", "120"]
        before = lines(lab, n1.lab_node, *route)
        assert before == [f"{n2.network6} via {n2.network6.split('/')[0]} dev flannel-v6.1 "
                          "metric 1024 onlink pref medium"]
        lab.run(n1.lab_node.ns, ["ip", "-6", "route", "del", n2.network6])
        wait_until(lambda: lines(lab, n1.lab_node, *route) == before, 2, "IPv6 route restored")

        old = v6_mac_in_etcd()
        lab.run(n1.lab_node.ns, ["ip", "link", "del", "flannel-v6.1"])

        def device_mac() -> str:
            out = lab.run(n1.lab_node.ns, ["ip", "-j", "link", "show", "flannel-v6.1"],
                          check=False, text=True).stdout
            return json.loads(out)[0]["address"] if out.strip() else ""

        wait_until(lambda: device_mac() not in ("", old) and v6_mac_in_etcd() == device_mac(),
                   5, "flannel-v6.1 recreated and its new MAC published")
        wait_until(lambda: f"{device_mac()} dst fd00:198::1 self permanent" in lines(
            lab, n2.lab_node, "bridge", "fdb", "show", "dev", "flannel-v6.1"), 5,
            "n2's FDB entry follows the new MAC")
        wait_ping(lab, n2, n1.gw6, n2.gw6, "n2 -> n1 over IPv6 after the repair")
        assert lab.ping(n2.lab_node, n1.gw, src_ip=n2.gw)
