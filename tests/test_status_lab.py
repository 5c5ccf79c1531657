"""``pyflannel status`` on a node finds its own row by the node's addresses.

Real etcd and a real namespace (the node's eth0 holds 198.18.0.1); no daemon is needed, the
leases are put into etcd directly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyflannel.lab import Lab
from tests.labtools import require_lab

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
LEASES = {"10.1.5.0-24": "198.18.0.1", "10.1.6.0-24": "198.18.0.2"}


@pytest.fixture(scope="module")
def lab():
    require_lab()
    with Lab(nodes=2) as lab:
        lab.etcdctl("put", f"{PREFIX}/config", '{"Network": "10.1.0.0/16"}')
        for key, ip in LEASES.items():
            lab.etcdctl("put", f"{PREFIX}/subnets/{key}",
                        json.dumps({"PublicIP": ip, "BackendType": "udp"}))
        yield lab


def _status(lab: Lab, subnet_file: str, *extra: str) -> subprocess.CompletedProcess:
    node = lab.node("n1")
    return lab.run(node.ns, [sys.executable, "-m", "pyflannel", "status", *extra,
                             f"-etcd-endpoints={lab.etcd_endpoint}",
                             f"-subnet-file={subnet_file}"],
                   text=True, env={"PYTHONWARNINGS": "default"}, timeout=60)


def _marked(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines() if line.endswith("<- this host")]


def test_status_marks_this_host_without_a_subnet_file(lab):
    """The subnet file is not where status looks (a non-default -subnet-file path)."""
    missing = lab.node("n1").workdir / "elsewhere" / "subnet.env"
    out = _status(lab, str(missing))
    assert out.stderr == ""  # no RuntimeWarning from pyroute2 inside the loop
    assert _marked(out.stdout) == ["10.1.5.0/24"], out.stdout
    rows = json.loads(_status(lab, str(missing), "--json").stdout)
    assert [r["subnet"] for r in rows if r["this_node"]] == ["10.1.5.0/24"]


def test_local_addresses_win_over_a_stale_subnet_file(lab):
    stale = lab.node("n1").workdir / "stale.env"
    stale.write_text("FLANNEL_SUBNET=10.1.6.1/24\n")  # n2's subnet, from an older life
    out = _status(lab, str(stale))
    assert out.stderr == ""
    assert _marked(out.stdout) == ["10.1.5.0/24"], out.stdout


def test_the_subnet_file_settles_which_of_two_leases_for_our_address_is_ours(lab):
    key = f"{PREFIX}/subnets/10.1.77.0-24"
    lab.etcdctl("put", key, json.dumps({"PublicIP": "198.18.0.1", "BackendType": "udp"}))
    try:
        own = lab.node("n1").workdir / "own.env"
        own.write_text("FLANNEL_SUBNET=10.1.5.1/24\n")
        out = _status(lab, str(own))
        assert out.stderr == ""
        assert _marked(out.stdout) == ["10.1.5.0/24"], out.stdout
    finally:
        lab.etcdctl("del", key)


def test_an_ipv6_only_lease_is_shown_whole_and_found_by_the_subnet_file(lab):
    key = f"{PREFIX}/subnets/0.0.0.0-0&fc00:10:1:4f::-64"
    n2 = lab.node("n2")
    lab.etcdctl("put", key, json.dumps({"PublicIP": "0.0.0.0", "PublicIPv6": n2.underlay_ip6,
                                        "BackendType": "vxlan"}))
    try:
        own = n2.workdir / "own6.env"
        own.write_text("FLANNEL_IPV6_NETWORK=fc00:10:1::/48\n"
                       "FLANNEL_IPV6_SUBNET=fc00:10:1:4f::1/64\n")
        out = lab.run(n2.ns, [sys.executable, "-m", "pyflannel", "status", "--json",
                              f"-etcd-endpoints={lab.etcd_endpoint}", f"-subnet-file={own}"],
                      text=True, timeout=60)
        rows = {r["key"]: r for r in json.loads(out.stdout)}
        row = rows["0.0.0.0-0&fc00:10:1:4f::-64"]
        assert row["subnet"] is None and row["ipv6_subnet"] == "fc00:10:1:4f::/64"
        assert row["public_ipv6"] == n2.underlay_ip6 and row["this_node"]
        assert [k for k, r in rows.items() if r["this_node"]] == [row["key"]]
        table = _status(lab, str(own)).stdout
        assert "IPV6 SUBNET" in table and "fc00:10:1:4f::/64" in table
    finally:
        lab.etcdctl("del", key)
