"""The daemon in dual-stack and IPv6-only clusters, on the lab's dual-stack underlay:
lease keys and subnet.env as flanneld writes them, ip6tables masquerading, both subnets
kept across a restart, IPv6-only nodes each on their own lease.

host-gw is used because it needs nothing but routes; the backends' own dual-stack data
paths are tested with the backends.
"""

from __future__ import annotations

import json

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, HEALTHZ_PORT, ready, require_lab, wait_until

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
DUAL = ('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:10:1::/48",'
        '"Backend":{"Type":"host-gw"}}')
V6ONLY = ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00:10:1::/48",'
          '"Backend":{"Type":"host-gw"}}')


def leases(lab: Lab) -> dict[str, dict]:
    out = lab.etcdctl("get", f"{PREFIX}/subnets/", "--prefix").splitlines()
    return {k.rsplit("/", 1)[-1]: json.loads(v) for k, v in zip(out[::2], out[1::2],
                                                                 strict=True)}


def masq6(lab: Lab, ns: str) -> list[str]:
    out = lab.run(ns, ["ip6tables-save", "-t", "nat"], text=True).stdout
    return [line for line in out.splitlines() if line.startswith("-A FLANNEL-POSTRTG")]


def start(lab: Lab, node, *extra: str) -> dict[str, str]:
    if node.subnet_file.exists():
        node.subnet_file.unlink()
    lab.start_daemon(node, f"-healthz-port={HEALTHZ_PORT}", *extra)
    return lab.wait_subnet_file(node)


@pytest.fixture(scope="module")
def dual_lab():
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, DUAL)
        envs = [start(lab, n, "-ip-masq", "-iptables-resync=1") for n in lab.nodes]
        yield lab, envs


def test_dual_stack_keys_values_and_subnet_env_are_flanneld_s(dual_lab):
    lab, envs = dual_lab
    n1 = lab.nodes[0]
    env = envs[0]
    assert list(env) == ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK",
                         "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]
    assert env["FLANNEL_IPV6_NETWORK"] == "fc00:10:1::/48"
    v4, v6 = env["FLANNEL_SUBNET"], env["FLANNEL_IPV6_SUBNET"]
    name = f"{v4.replace('.1/', '.0-')}&{v6.replace('::1/', '::-')}"
    stored = leases(lab)
    assert stored[name] == {"PublicIP": n1.underlay_ip, "PublicIPv6": n1.underlay_ip6,
                            "BackendType": "host-gw"}
    assert len(stored) == 2 and all("&fc00:10:1:" in k for k in stored)


def test_ip6tables_masquerade_the_ipv6_network_in_flanneld_s_order(dual_lab):
    lab, envs = dual_lab
    ns = lab.nodes[0].ns
    sub6 = envs[0]["FLANNEL_IPV6_SUBNET"].replace("::1/", "::/")
    rules = masq6(lab, ns)
    assert len(rules) == 6 and all('--comment "flanneld masq"' in r for r in rules)
    assert f"-s {sub6} -d fc00:10:1::/48" in rules[1]
    assert f"! -s fc00:10:1::/48 -d {sub6}" in rules[3]
    assert "-s fc00:10:1::/48 ! -d ff00::/8" in rules[4] and "MASQUERADE" in rules[4]
    fwd = lab.run(ns, ["ip6tables-save", "-t", "filter"], text=True).stdout
    assert "-A FLANNEL-FWD -s fc00:10:1::/48" in fwd
    # and the IPv4 rules as before
    v4 = lab.run(ns, ["iptables-save", "-t", "nat"], text=True).stdout
    assert "-s 10.1.0.0/16 ! -d 224.0.0.0/4" in v4
    # a rule deleted by hand comes back within the resync period
    lab.run(ns, ["ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"])
    wait_until(lambda: masq6(lab, ns) == rules, 5, "ip6tables rules restored")
    # (the line is logged just after the restore: the rules may be back a moment before)
    wait_until(lambda: "ip6tables rules restored" in lab.tail_log(lab.nodes[0], 100), 5,
               "restore logged")


def test_a_restart_keeps_both_subnets(dual_lab):
    lab, envs = dual_lab
    n2 = lab.nodes[1]
    before = envs[1]
    lab.stop_daemon(n2)
    # The key is gone as well (say it expired while the node was down): only the subnet
    # file remembers the two subnets.
    name = (f"{before['FLANNEL_SUBNET'].replace('.1/', '.0-')}&"
            f"{before['FLANNEL_IPV6_SUBNET'].replace('::1/', '::-')}")
    lab.etcdctl("del", f"{PREFIX}/subnets/{name}")
    lab.start_daemon(n2, f"-healthz-port={HEALTHZ_PORT}", "-ip-masq", "-iptables-resync=1")
    wait_until(lambda: ready(lab, n2), 20, "restarted node ready")
    after = lab.wait_subnet_file(n2)
    assert after == before
    assert name in leases(lab)


@pytest.fixture(scope="module")
def v6_lab():
    require_lab()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY, V6ONLY)
        envs = [start(lab, n) for n in lab.nodes]
        yield lab, envs


def test_ipv6_only_nodes_hold_a_lease_each(v6_lab):
    lab, envs = v6_lab
    assert [list(env) for env in envs] == [
        ["FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]] * 2
    assert envs[0]["FLANNEL_IPV6_SUBNET"] != envs[1]["FLANNEL_IPV6_SUBNET"]
    stored = leases(lab)
    assert len(stored) == 2 and all(k.startswith("0.0.0.0-0&fc00:10:1:") for k in stored)
    assert sorted(v["PublicIPv6"] for v in stored.values()) == sorted(
        n.underlay_ip6 for n in lab.nodes)
    assert {v["PublicIP"] for v in stored.values()} == {"0.0.0.0"}
    # a restart takes back the node's own key, not the other node's
    n1 = lab.nodes[0]
    lab.stop_daemon(n1)
    lab.start_daemon(n1, f"-healthz-port={HEALTHZ_PORT}")
    wait_until(lambda: ready(lab, n1), 20, "restarted node ready")
    assert lab.wait_subnet_file(n1) == envs[0] and leases(lab) == stored
