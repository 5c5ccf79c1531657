"""Which udp peers get which of our packets: the peer table the udp backend hands its fast
path, per family, from the leases alone (no devices needed)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from pyflannel.backend.udp import UdpBackend
from pyflannel.config import parse_config
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.model import Lease

DUAL = ('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:10:1::/48",'
        '"Backend":{"Type":"udp"}}')
V6ONLY = DUAL.replace('"Network":"10.1.0.0/16",', '"EnableIPv4":false,')
EXT = ExternalInterface("eth0", 2, IPv4Address("198.18.0.1"), IPv4Address("198.18.0.1"), 1500,
                        IPv6Address("fd00:198::1"), IPv6Address("fd00:198::1"))


def backend(config: str, *leases: tuple[str, str]) -> UdpBackend:
    b = UdpBackend(parse_config(config), EXT)
    for key, value in leases:
        lease = Lease.from_kv(key, value)
        b.peers[lease.key_name] = lease
    return b


def table(b: UdpBackend) -> list[tuple[str, str, bool]]:
    return sorted((str(r.subnet), str(r.public_ip), r.vnet1) for r in b.routes())


def test_a_pyflannel_peer_gets_both_families_over_ipv4_in_the_framing_it_advertised():
    b = backend(DUAL, ("10.1.79.0-24&fc00:10:1:4f::-64",
                       '{"PublicIP":"198.18.0.2","PublicIPv6":"fd00:198::2","BackendType":"udp",'
                       '"BackendData":{"Framings":["vnet1"]},"BackendV6Data":{"Framings":[]}}'))
    assert table(b) == [("10.1.79.0/24", "198.18.0.2", True),
                        ("fc00:10:1:4f::/64", "198.18.0.2", False)]


def test_a_flanneld_udp_peer_is_never_sent_ipv6():
    """flanneld's udp proxy reads every packet as IPv4: its lease (no BackendV6Data, even
    with an IPv6 subnet and address) gets IPv4 only."""
    b = backend(DUAL, ("10.1.79.0-24&fc00:10:1:4f::-64",
                       '{"PublicIP":"198.18.0.2","PublicIPv6":"fd00:198::2",'
                       '"BackendType":"udp"}'))
    assert table(b) == [("10.1.79.0/24", "198.18.0.2", False)]


def test_ipv6_only_peers_are_reached_over_the_ipv6_underlay():
    b = backend(V6ONLY, ("0.0.0.0-0&fc00:10:1:4f::-64",
                         '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198::2","BackendType":"udp",'
                         '"BackendV6Data":{"Framings":["vnet1"]}}'),
                ("0.0.0.0-0&fc00:10:1:50::-64",
                 '{"PublicIP":"0.0.0.0","PublicIPv6":null,"BackendType":"udp",'
                 '"BackendV6Data":{"Framings":[]}}'))  # no address to send to: skipped
    assert table(b) == [("fc00:10:1:4f::/64", "fd00:198::2", True)]
    assert b.mtu == 1452  # 1500 - outer IPv6 (40) - UDP (8)


def test_an_ipv4_only_network_ignores_ipv6_in_leases():
    b = backend('{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}',
                ("10.1.79.0-24", '{"PublicIP":"198.18.0.2","BackendType":"udp",'
                                 '"BackendV6Data":{"Framings":["vnet1"]}}'))
    assert table(b) == [("10.1.79.0/24", "198.18.0.2", False)]
    assert b.mtu == 1472
