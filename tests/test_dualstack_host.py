"""The host side of dual-stack: -public-ipv6, how the IPv6 side of the external interface is
found, and route ownership in the IPv6 table (kernel tests in a lab namespace)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pyflannel.flags import FlagError, parse_flags
from pyflannel.lab import Lab
from tests.labtools import require_lab

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ flags


def test_public_ipv6_flag_and_variable():
    assert parse_flags([], {}).public_ipv6 == ""
    assert parse_flags(["-public-ipv6=fd00:198::2"], {}).public_ipv6 == "fd00:198::2"
    assert parse_flags([], {"FLANNELD_PUBLIC_IPV6": "2001:db8::1"}).public_ipv6 == "2001:db8::1"
    both = parse_flags(["--public-ipv6", "fd00::1"], {"FLANNELD_PUBLIC_IPV6": "fd00::2"})
    assert both.public_ipv6 == "fd00::1"  # the command line wins


@pytest.mark.parametrize("value", ["198.18.0.1", "fd00::1/64", "fe80::1%eth0", "x"])
def test_public_ipv6_must_be_an_ipv6_address(value):
    with pytest.raises(FlagError, match=r"^flag -public-ipv6: .* is not an IPv6 address$"):
        parse_flags([f"-public-ipv6={value}"], {})


# ------------------------------------------------------------------------------ kernel

FIND = r"""
import json, sys
from pyflannel.host.netlink import InterfaceError, find_external_interface
for case in json.loads(sys.argv[1]):
    try:
        e = find_external_interface(**case)
        print(json.dumps([e.name, str(e.address), str(e.public_ip), str(e.address6),
                          str(e.public_ipv6)]))
    except InterfaceError as err:
        print(json.dumps(["error", str(err)]))
"""

SYNC = r"""
import subprocess
from ipaddress import ip_address, ip_network
from pyroute2 import IPRoute
from pyflannel.host.routes import RouteSpec, sync_routes

sh = lambda *a: subprocess.run(a, check=True)
show = lambda *a: subprocess.run(["ip", *a], capture_output=True, text=True).stdout.strip()
with IPRoute() as ipr:
    eth = ipr.link_lookup(ifname="eth0")[0]
net, other = ip_network("fc00:10:1::/48"), ip_network("fc00:10:2::/64")
v4 = ip_network("10.1.79.0/24")
gw, gw4 = ip_address("fd00:198::2"), ip_address("198.18.0.2")
# an operator's route to the network: reported, never replaced nor deleted
sh("ip", "-6", "route", "add", str(net), "dev", "eth0", "proto", "static")
added, removed, errors = sync_routes({net: RouteSpec(net, eth, gw)})
print("errors", added, len(errors), errors[0] if errors else "")
sync_routes({})
print("operator", show("-6", "route", "show", str(net)))
# flanneld's own route, equal to what we want, is adopted when a node switches daemon
sh("ip", "-6", "route", "add", str(other), "via", str(gw), "dev", "eth0")
print("adopt", sync_routes({other: RouteSpec(other, eth, gw)}))
print("ours", show("-6", "route", "show", "proto", "120"))
# both families in one table of wanted routes; dropping one family's leaves the other
print("both", sync_routes({other: RouteSpec(other, eth, gw), v4: RouteSpec(v4, eth, gw4)}))
print("drop6", sync_routes({v4: RouteSpec(v4, eth, gw4)}))
print("left4", show("-4", "route", "show", "proto", "120"))
print("left6", show("-6", "route", "show", "proto", "120") or "-")
print("still", show("-6", "route", "show", str(net)))
"""


@pytest.fixture(scope="module")
def lab():
    require_lab()
    with Lab(1, with_etcd=False) as lab:
        yield lab


def run_py(lab: Lab, script: str, *args: str) -> list[str]:
    proc = lab.run(lab.nodes[0].ns, [sys.executable, "-c", script, *args],
                   env={"PYTHONPATH": str(REPO_ROOT)}, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def find(lab: Lab, *cases: dict) -> list[list[str]]:
    return [json.loads(line) for line in run_py(lab, FIND, json.dumps(list(cases)))]


def test_the_ipv6_side_of_the_external_interface(lab):
    got = find(
        lab,
        {"iface": ["eth0"]},
        {"iface": ["eth0"], "want_ipv6": True},
        {"iface": ["eth0"], "want_ipv6": True, "public_ipv6": "2001:db8::9"},
        {"iface": ["fd00:198::1"], "want_ipv6": True},
        {"iface_regex": ["^198\\.18\\."], "want_ipv6": True},
        {"want_ipv6": True, "want_ipv4": False},  # IPv6-only: the IPv6 default route
        {"want_ipv6": True},  # dual-stack needs the IPv4 default route as well
        {"iface": ["lo"], "want_ipv6": True},
    )
    assert got == [
        ["eth0", "198.18.0.1", "198.18.0.1", "None", "None"],
        ["eth0", "198.18.0.1", "198.18.0.1", "fd00:198::1", "fd00:198::1"],
        ["eth0", "198.18.0.1", "198.18.0.1", "fd00:198::1", "2001:db8::9"],
        ["eth0", "198.18.0.1", "198.18.0.1", "fd00:198::1", "fd00:198::1"],
        ["eth0", "198.18.0.1", "198.18.0.1", "fd00:198::1", "fd00:198::1"],
        ["eth0", "198.18.0.1", "198.18.0.1", "fd00:198::1", "fd00:198::1"],
        ["error", "no default route: say which interface to use with -iface"],
        ["error", "interface lo has no global IPv6 address"],
    ]


def test_ipv4_and_ipv6_default_routes_must_share_the_interface(lab):
    ns = lab.nodes[0].ns
    for argv in (["ip", "link", "add", "x0", "type", "veth", "peer", "name", "x1"],
                 ["ip", "addr", "add", "192.0.2.1/24", "dev", "x0"],
                 ["ip", "link", "set", "x0", "up"], ["ip", "link", "set", "x1", "up"],
                 ["ip", "route", "add", "default", "via", "192.0.2.254", "dev", "x0"]):
        lab.run(ns, argv)
    try:
        got = find(lab, {"want_ipv6": True}, {}, {"iface": ["eth0"], "want_ipv6": True})
    finally:
        lab.run(ns, ["ip", "link", "del", "x0"])
    assert got == [
        ["error", "the IPv6 default route leaves through eth0, the IPv4 one through x0; they "
                  "must be the same interface (or name it with -iface)"],
        ["x0", "192.0.2.1", "192.0.2.1", "None", "None"],
        ["eth0", "198.18.0.1", "198.18.0.1", "fd00:198::1", "fd00:198::1"],
    ]


def test_ipv6_routes_of_others_are_never_taken_over_or_deleted(lab):
    out = dict(line.split(" ", 1) for line in run_py(lab, SYNC))
    assert out["errors"].startswith("0 1 fc00:10:1::/48: a route to it exists and is not "
                                    "pyflannel's (proto 4); not touching it")
    assert out["operator"] == "fc00:10:1::/48 dev eth0 proto static metric 1024 pref medium"
    assert out["adopt"] == "(1, 0, [])"
    assert out["ours"] == "fc00:10:2::/64 via fd00:198::2 dev eth0 metric 1024 pref medium"
    assert out["both"] == "(1, 0, [])"
    assert out["drop6"] == "(0, 1, [])"
    assert out["left4"] == "10.1.79.0/24 via 198.18.0.2 dev eth0"
    assert out["left6"] == "-"
    assert out["still"] == out["operator"]
