"""gre against Open vSwitch, as a new user would set it up: a host running a private
ovsdb-server and ovs-vswitchd (userspace datapath, no kernel module) with one ``type=gre``
port per pyflannel node (``packet_type=legacy_l3``), its subnet reserved with ``pyflannel
lease reserve`` as a static peer. Pings both ways and a TCP transfer, with and without a
key; a key mismatch is refused and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    metric,
    require_lab,
    start_node,
    tcp_transfer,
    wait_until,
)

pytestmark = pytest.mark.lab

OVS_IP = "198.18.0.200"
OVS_SUBNET = "10.1.200.0/24"
OVS_POD = "10.1.200.1"
GW_IP, GW_MAC = "10.1.200.254", "02:00:0a:01:c8:fe"  # a made-up next hop for the overlay


class OvsHost:
    """A namespace with Open vSwitch in it: br-phy holds the underlay address (so that OVS's
    own tunnel code routes and resolves it), br-int the gre ports and the pod address."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ns = lab.add_host("ovs", OVS_IP)
        self.dir = lab.workdir / "ovs"
        self.dir.mkdir()
        d = self.dir
        self.env = {"OVS_RUNDIR": str(d), "OVS_DBDIR": str(d), "OVS_LOGDIR": str(d),
                    "OVS_SYSCONFDIR": str(d), "OVS_PKGDATADIR": "/usr/share/openvswitch"}
        self.run("ovsdb-tool", "create", f"{d}/conf.db",
                 "/usr/share/openvswitch/vswitch.ovsschema")
        self.procs = [lab.popen(self.ns, ["ovsdb-server", f"{d}/conf.db",
                                          f"--remote=punix:{d}/db.sock",
                                          f"--unixctl={d}/ovsdb.ctl", "--no-chdir",
                                          f"--log-file={d}/ovsdb.log"],
                                env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)]
        wait_until(lambda: (d / "db.sock").exists(), 10, "ovsdb-server's socket")
        self.vsctl("--no-wait", "init")
        self.procs.append(lab.popen(self.ns, ["ovs-vswitchd", f"unix:{d}/db.sock",
                                              f"--unixctl={d}/vswitchd.ctl", "--no-chdir",
                                              f"--log-file={d}/vswitchd.log"],
                                    env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
        lab.add_cleanup(before=self.stop)
        mac = self.sh("cat /sys/class/net/eth0/address").strip()
        self.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev",
                   f"other_config:hwaddr={mac}", "--", "add-port", "br-phy", "eth0")
        self.sh(f"ip addr flush dev eth0 && ip addr add {OVS_IP}/24 dev br-phy && "
                "ip link set br-phy up")
        self.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev")
        self.sh(f"ip addr add {OVS_POD}/24 dev br-int && ip link set br-int up && "
                f"ip route add 10.1.0.0/16 via {GW_IP} dev br-int")
        self.br_int_mac = self.sh("cat /sys/class/net/br-int/address").strip()

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)

    def run(self, *argv: str) -> str:
        return self.lab.run(self.ns, list(argv), env=self.env, text=True).stdout

    def sh(self, script: str) -> str:
        return self.run("sh", "-c", script)

    def vsctl(self, *args: str) -> str:
        return self.run("ovs-vsctl", f"--db=unix:{self.dir}/db.sock", "--timeout=10", *args)

    def peer_with(self, nodes: dict, key: int | None) -> None:
        """One gre port per node and the explicit flows that carry L3 both ways."""
        for i, n in enumerate(nodes.values()):
            port = f"gre{i}"
            self.vsctl("--if-exists", "del-port", "br-int", port)
            options = [f"options:remote_ip={n.lab_node.underlay_ip}",
                       "options:packet_type=legacy_l3"]
            if key is not None:
                options.append(f"options:key={key}")
            self.vsctl("add-port", "br-int", port, "--", "set", "interface", port, "type=gre",
                       *options)
        gw_hex = GW_MAC.replace(":", "")
        flows = [
            # answer ARP for the made-up gateway
            f"priority=100,arp,arp_op=1,arp_tpa={GW_IP},actions="
            "move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],"
            f"mod_dl_src:{GW_MAC},load:0x2->NXM_OF_ARP_OP[],"
            "move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],"
            f"load:0x{gw_hex}->NXM_NX_ARP_SHA[],"
            "move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[],"
            "load:0x0a01c8fe->NXM_OF_ARP_SPA[],in_port",
        ]
        for i, n in enumerate(nodes.values()):
            subnet = n.subnet.rsplit(".", 1)[0] + ".0/24"
            flows.append(f"priority=50,ip,in_port=LOCAL,nw_dst={subnet},actions=output:gre{i}")
            # decapsulated packets come with all-zero MACs: give them real ones
            flows.append(f"priority=50,ip,in_port=gre{i},actions=mod_dl_src:{GW_MAC},"
                         f"mod_dl_dst:{self.br_int_mac},LOCAL")
        path = self.dir / "flows"
        path.write_text("\n".join(flows) + "\n")
        self.run("ovs-ofctl", "del-flows", "br-int")
        self.run("ovs-ofctl", "add-flows", "br-int", str(path))


@pytest.fixture(scope="module")
def lab():
    require_lab()
    for tool in ("ovs-vswitchd", "ovsdb-server", "ovs-vsctl", "ovs-ofctl"):
        if not any(os.access(os.path.join(p, tool), os.X_OK)
                   for p in ("/usr/sbin", "/usr/bin")):
            (pytest.fail if os.environ.get("CI") else pytest.skip)(
                f"{tool} is missing (apt-get install openvswitch-switch)")
    with Lab(2) as lab:
        yield lab


def cluster(lab: Lab, ovs: OvsHost, key: int | None) -> dict:
    for n in lab.nodes:
        lab.stop_daemon(n)
    backend = {"Type": "gre", **({"Key": key} if key is not None else {})}
    lab.etcdctl("put", CONFIG_KEY, json.dumps({"Network": "10.1.0.0/16", "Backend": backend}))
    nodes = {n.name: start_node(lab, n) for n in lab.nodes}
    return nodes


def reserve(lab: Lab) -> None:
    lab.run(lab.nodes[0].ns, [sys.executable, "-m", "pyflannel", "lease", "reserve",
                              OVS_SUBNET, OVS_IP, f"-etcd-endpoints={lab.etcd_endpoint}"])


def carries(lab: Lab, ovs: OvsHost, nodes: dict) -> None:
    for n in nodes.values():
        wait_until(lambda n=n: lab.ping(n.lab_node, OVS_POD, src_ip=n.gw), 15,
                   f"{n.lab_node.name} -> OVS")
        wait_until(lambda n=n: lab.ping(ovs.ns, n.gw, src_ip=OVS_POD), 5,
                   f"OVS -> {n.lab_node.name}")


@pytest.fixture(scope="module")
def ovs(lab):
    host = OvsHost(lab)
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16", "Backend": {"Type": "gre"}}')
    reserve(lab)
    return host


def test_pings_and_a_transfer_both_ways_without_a_key(lab, ovs):
    nodes = cluster(lab, ovs, None)
    ovs.peer_with(nodes, None)
    carries(lab, ovs, nodes)
    n1 = nodes["n1"]
    tcp_transfer(lab, n1.lab_node, n1.gw, _ovs_node(lab, ovs), OVS_POD, 2 * 1024 * 1024)


def test_with_key_42_and_a_mismatch_refused_and_counted(lab, ovs):
    nodes = cluster(lab, ovs, 42)
    ovs.peer_with(nodes, 42)
    carries(lab, ovs, nodes)
    n2 = nodes["n2"]
    tcp_transfer(lab, _ovs_node(lab, ovs), OVS_POD, n2.lab_node, n2.gw, 2 * 1024 * 1024,
                 port=5006)
    ovs.peer_with(nodes, 7)
    before = metric(lab, n2.lab_node, "pyflannel_dropped_packets_total", reason="key_mismatch")
    assert not lab.ping(ovs.ns, n2.gw, src_ip=OVS_POD, count=3, timeout=1)
    time.sleep(0.2)
    after = metric(lab, n2.lab_node, "pyflannel_dropped_packets_total", reason="key_mismatch")
    assert after >= before + 3


def _ovs_node(lab: Lab, ovs: OvsHost):
    """The OVS host as tcp_transfer wants a node: something with a namespace."""
    class _Host:
        ns = ovs.ns
    return _Host()
