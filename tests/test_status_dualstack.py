"""``pyflannel status`` with dual-stack and IPv6-only leases: both subnets in the table and
the JSON, this host found by its IPv6 address too."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from pyflannel.lease.model import NO_IPV4_SUBNET, NO_PUBLIC_IP, Lease, LeaseAttrs
from pyflannel.status import (
    _counters,
    local_ipv6_addresses,
    render_table,
    subnet_file_key,
    this_host,
)

V4 = Lease(IPv4Network("10.1.5.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), "vxlan"))
DUAL = Lease(IPv4Network("10.1.6.0/24"),
             LeaseAttrs(IPv4Address("198.18.0.2"), "vxlan", public_ipv6="fd00:198::2"),
             ipv6_subnet=IPv6Network("fc00:10:1:6::/64"))
V6A = Lease(NO_IPV4_SUBNET, LeaseAttrs(NO_PUBLIC_IP, "vxlan", public_ipv6="fd00:198::3"),
            ipv6_subnet=IPv6Network("fc00:10:1:7::/64"))
V6B = Lease(NO_IPV4_SUBNET, LeaseAttrs(NO_PUBLIC_IP, "vxlan", public_ipv6="fd00:198::4"),
            ipv6_subnet=IPv6Network("fc00:10:1:8::/64"))


def row(lease: Lease, **kw) -> dict:
    v6 = lease.ipv6_subnet
    base = {"key": lease.key_name, "subnet": str(lease.subnet) if lease.has_ipv4 else None,
            "ipv6_subnet": str(v6) if v6 else None, "public_ip": str(lease.attrs.public_ip),
            "public_ipv6": str(lease.attrs.public_ipv6) if lease.attrs.public_ipv6 else None,
            "backend": "vxlan", "backend_data": {"VNI": 1, "VtepMAC": "96:cd:e4:4f:c9:30"},
            "backend_v6_data": {"VNI": 1, "VtepMAC": "5e:80:d2:17:9a:d2"} if v6 else None,
            "expires_in_s": 3600, "this_node": False, "counters": None}
    return {**base, **kw}


def test_ipv6_only_leases_are_told_apart_and_this_host_found_by_its_ipv6_address():
    local = {IPv6Address("fd00:198::4"), IPv4Address("127.0.0.1")}
    assert this_host([V4, DUAL, V6A, V6B], local, None) == {V6B.key_name}
    # the subnet file breaks a tie between two leases naming us
    local = {IPv4Address("198.18.0.2"), IPv6Address("fd00:198::3")}
    assert this_host([DUAL, V6A], local, None) == {DUAL.key_name, V6A.key_name}
    assert this_host([DUAL, V6A], local, V6A.key_name) == {V6A.key_name}


def test_the_subnet_file_names_a_key_in_every_layout(tmp_path: Path):
    f = tmp_path / "subnet.env"
    f.write_text("FLANNEL_SUBNET=10.1.6.1/24\nFLANNEL_IPV6_SUBNET=fc00:10:1:6::1/64\n")
    assert subnet_file_key(str(f)) == "10.1.6.0-24&fc00:10:1:6::-64"
    f.write_text("FLANNEL_IPV6_NETWORK=fc00:10:1::/48\nFLANNEL_IPV6_SUBNET=fc00:10:1:7::1/64\n")
    assert subnet_file_key(str(f)) == "0.0.0.0-0&fc00:10:1:7::-64"
    f.write_text("FLANNEL_SUBNET=10.1.5.1/24\n")
    assert subnet_file_key(str(f)) == "10.1.5.0-24"
    assert subnet_file_key(str(tmp_path / "missing")) is None


def test_the_table_shows_both_subnets_and_both_macs_of_a_lease():
    text = render_table([row(V4), row(DUAL, this_node=True), row(V6A)])
    lines = text.splitlines()
    assert lines[0].split() == ["SUBNET", "IPV6", "SUBNET", "PUBLIC", "IP", "PUBLIC", "IPV6",
                                "BACKEND", "VTEP", "MAC", "VTEP", "MAC", "V6", "LEASE", "LEFT",
                                "TX", "PKTS", "TX", "BYTES", "RX", "PKTS", "RX", "BYTES",
                                "DROPS", "LAST", "RX"]
    assert lines[1].split()[:6] == ["10.1.5.0/24", "-", "198.18.0.1", "-", "vxlan",
                                    "96:cd:e4:4f:c9:30"]
    assert lines[2].split()[:7] == ["10.1.6.0/24", "fc00:10:1:6::/64", "198.18.0.2",
                                    "fd00:198::2", "vxlan", "96:cd:e4:4f:c9:30",
                                    "5e:80:d2:17:9a:d2"]
    assert lines[2].endswith("<- this host")
    assert lines[3].split()[:4] == ["-", "fc00:10:1:7::/64", "0.0.0.0", "fd00:198::3"]


def test_an_ipv4_cluster_s_table_has_no_ipv6_columns():
    text = render_table([row(V4)])
    assert "IPV6" not in text and text.splitlines()[0].startswith("SUBNET  ")


def test_local_ipv6_addresses_come_from_the_kernel_table(tmp_path: Path):
    f = tmp_path / "if_inet6"
    f.write_text("fd000198000000000000000000000001 02 40 00 80     eth0\n"
                 "00000000000000000000000000000001 01 80 10 80       lo\n"
                 "garbage\n")
    assert local_ipv6_addresses(str(f)) == {IPv6Address("fd00:198::1"), IPv6Address("::1")}
    assert local_ipv6_addresses(str(tmp_path / "none")) == set()


def test_an_ipv6_only_peer_s_counters_are_found_by_its_ipv6_subnet():
    """The udp and wireguard backends name an IPv6-only peer by its IPv6 subnet (the IPv4
    placeholder is every such lease's): status finds its traffic there."""
    traffic = {"tx_packets": 1, "tx_bytes": 2, "rx_packets": 3, "rx_bytes": 4}
    view = {"fc00:10:1:7::/64": traffic, "10.1.6.0/24": {**traffic, "tx_packets": 9}}
    assert _counters(view, V6A) == traffic
    assert _counters(view, V6B) is None
    assert _counters(view, DUAL)["tx_packets"] == 9  # IPv4 first, as before
