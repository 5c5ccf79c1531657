"""subnet.env in dual-stack and IPv6-only mode, line for line as flanneld v0.20.2 writes it."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

import pytest

from pyflannel.host.subnetfile import (
    SubnetEnv,
    first_host,
    previous_ipv6_subnet,
    previous_subnet,
    previous_subnets,
    write_subnet_file,
)

DUAL_STACK = (
    "FLANNEL_NETWORK=10.1.0.0/16\n"
    "FLANNEL_SUBNET=10.1.86.1/24\n"
    "FLANNEL_IPV6_NETWORK=fc00:10:1::/48\n"
    "FLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\n"
)
IPV6_ONLY = (
    "FLANNEL_IPV6_NETWORK=fc00:10:1::/48\n"
    "FLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=true\n"
)


def dual_env() -> SubnetEnv:
    return SubnetEnv(
        IPv4Network("10.1.0.0/16"), IPv4Interface("10.1.86.1/24"), 1450, False,
        ipv6_network=IPv6Network("fc00:10:1::/48"),
        ipv6_subnet=IPv6Interface("fc00:10:1:5c::1/64"),
    )


def test_dual_stack_lines_in_flanneld_order():
    assert dual_env().render() == DUAL_STACK


def test_ipv6_only_has_no_ipv4_lines():
    env = SubnetEnv(None, None, 1450, True, IPv6Network("fc00:10:1::/48"),
                    IPv6Interface("fc00:10:1:5c::1/64"))
    assert env.render() == IPV6_ONLY


def test_ipv4_only_is_unchanged():
    env = SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Interface("10.1.15.1/24"), 1472, False)
    assert env.render() == (
        "FLANNEL_NETWORK=10.1.0.0/16\n"
        "FLANNEL_SUBNET=10.1.15.1/24\n"
        "FLANNEL_MTU=1472\n"
        "FLANNEL_IPMASQ=false\n"
    )


def test_subnet_lines_hold_the_first_host_address():
    assert first_host(IPv4Network("10.1.86.0/24")) == IPv4Interface("10.1.86.1/24")
    assert first_host(IPv6Network("fc00:10:1:5c::/64")) == IPv6Interface("fc00:10:1:5c::1/64")
    env = SubnetEnv(IPv4Network("10.1.0.0/16"), first_host(IPv4Network("10.1.86.0/24")),
                    1450, False, IPv6Network("fc00:10:1::/48"),
                    first_host(IPv6Network("fc00:10:1:5c::/64")))
    assert env.render() == DUAL_STACK


def test_written_file_is_the_rendering(tmp_path: Path):
    path = tmp_path / "subnet.env"
    write_subnet_file(path, dual_env())
    assert path.read_text() == DUAL_STACK


def test_restart_reads_back_both_previous_subnets(tmp_path: Path):
    path = tmp_path / "subnet.env"
    write_subnet_file(path, dual_env())
    v4, v6 = IPv4Network("10.1.86.0/24"), IPv6Network("fc00:10:1:5c::/64")
    assert previous_subnets(path) == (v4, v6)
    assert previous_subnet(path) == v4
    assert previous_ipv6_subnet(path) == v6


def test_ipv6_only_file_has_only_a_previous_ipv6_subnet(tmp_path: Path):
    path = tmp_path / "subnet.env"
    path.write_text(IPV6_ONLY)
    assert previous_subnets(path) == (None, IPv6Network("fc00:10:1:5c::/64"))


def test_ipv4_only_file_has_no_previous_ipv6_subnet(tmp_path: Path):
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.15.1/24\n")
    assert previous_subnets(path) == (IPv4Network("10.1.15.0/24"), None)


def test_missing_file_has_no_previous_subnets(tmp_path: Path):
    assert previous_subnets(tmp_path / "nope.env") == (None, None)
    assert previous_ipv6_subnet(tmp_path / "nope.env") is None


@pytest.mark.parametrize(("text", "expected"), [
    ("FLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_IPV6_SUBNET=banana\n",
     (IPv4Network("10.1.15.0/24"), None)),
    ("FLANNEL_SUBNET=banana\nFLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64\n",
     (None, IPv6Network("fc00:10:1:5c::/64"))),
    ("FLANNEL_SUBNET=fc00:10:1:5c::1/64\nFLANNEL_IPV6_SUBNET=10.1.15.1/24\n", (None, None)),
    ('FLANNEL_IPV6_SUBNET="fc00:10:1:5c::1/64"\n', (None, IPv6Network("fc00:10:1:5c::/64"))),
])
def test_a_bad_line_spoils_only_its_own_family(tmp_path: Path, text, expected):
    path = tmp_path / "subnet.env"
    path.write_text(text)
    assert previous_subnets(path) == expected
