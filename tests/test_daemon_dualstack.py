"""The daemon's dual-stack wiring without devices: subnet.env lines, ip(6)tables rule sets
per family, the state snapshot, log lines for IPv6-only configs."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from pyflannel.config import parse_config
from pyflannel.daemon.config_watcher import networks
from pyflannel.daemon.core import subnet_env
from pyflannel.daemon.iptables_keeper import IptablesKeeper
from pyflannel.daemon.snapshot import NodeSnapshot
from pyflannel.daemon.supervise import Fatal
from pyflannel.flags import Options
from pyflannel.host.iptables import IptablesError, RuleSet
from pyflannel.lease.model import NO_IPV4_SUBNET, NO_PUBLIC_IP, Lease, LeaseAttrs

DUAL = parse_config('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:10:1::/48",'
                    '"Backend":{"Type":"vxlan"}}')
V6ONLY = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00:10:1::/48"}')
V4ONLY = parse_config('{"Network":"10.1.0.0/16"}')

DUAL_LEASE = Lease(IPv4Network("10.1.86.0/24"), LeaseAttrs(IPv4Address("192.0.2.2"), "vxlan",
                   public_ipv6="fd00:198::2"), 7, 1, IPv6Network("fc00:10:1:5c::/64"))
V6_LEASE = Lease(NO_IPV4_SUBNET, LeaseAttrs(NO_PUBLIC_IP, "vxlan", public_ipv6="fd00:198::2"),
                 7, 1, IPv6Network("fc00:10:1:5c::/64"))


def test_subnet_env_is_flanneld_s_for_a_dual_stack_lease():
    """The golden file from issue 10 (flanneld v0.20.2, vxlan)."""
    env = subnet_env(DUAL, DUAL_LEASE, 1450, False)
    assert env.render() == (
        "FLANNEL_NETWORK=10.1.0.0/16\n"
        "FLANNEL_SUBNET=10.1.86.1/24\n"
        "FLANNEL_IPV6_NETWORK=fc00:10:1::/48\n"
        "FLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )


def test_subnet_env_of_an_ipv6_only_lease_has_only_ipv6_lines():
    env = subnet_env(V6ONLY, V6_LEASE, 1430, True)
    assert env.render() == (
        "FLANNEL_IPV6_NETWORK=fc00:10:1::/48\n"
        "FLANNEL_IPV6_SUBNET=fc00:10:1:5c::1/64\n"
        "FLANNEL_MTU=1430\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_subnet_env_of_an_ipv4_only_lease_is_unchanged():
    lease = Lease(IPv4Network("10.1.15.0/24"), LeaseAttrs(IPv4Address("192.0.2.2")))
    assert subnet_env(V4ONLY, lease, 1472, False).render() == (
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.15.1/24\n"
        "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")


class FakeTools:
    """Records the rule sets one family's Iptables was asked to put in place."""

    def __init__(self, family: int, fail: bool = False) -> None:
        self.family = family
        self.fail = fail
        self.ensured: list[RuleSet] = []
        self.removed: list[dict] = []

    def ensure(self, rules: RuleSet) -> bool:
        assert rules.version == self.family
        if self.fail:
            raise IptablesError(["ip6tables-restore"], 1, "no nat table")
        self.ensured.append(rules)
        return True

    def remove(self, **kw) -> None:
        self.removed.append(kw)


def keeper(cfg, **flags) -> tuple[IptablesKeeper, dict[int, FakeTools]]:
    tools = {4: FakeTools(4), 6: FakeTools(6)}
    opts = Options(ip_masq=flags.get("ip_masq", True),
                   iptables_forward_rules=flags.get("forward", True))
    return IptablesKeeper(opts, cfg, tools), tools  # type: ignore[arg-type]


async def test_dual_stack_gets_iptables_and_ip6tables_rules_each_for_its_family():
    k, tools = keeper(DUAL)
    await k.ensure(DUAL_LEASE, fatal=True)
    (v4,) = tools[4].ensured
    (v6,) = tools[6].ensured
    assert (str(v4.network), str(v4.subnet)) == ("10.1.0.0/16", "10.1.86.0/24")
    assert (str(v6.network), str(v6.subnet)) == ("fc00:10:1::/48", "fc00:10:1:5c::/64")
    assert "ff00::/8" in "\n".join(v6.nat_rules())


async def test_ipv6_only_touches_no_iptables_and_never_the_0000_subnet():
    k, tools = keeper(V6ONLY)
    await k.ensure(V6_LEASE)
    assert tools[4].ensured == [] and [str(r.subnet) for r in tools[6].ensured] == [
        "fc00:10:1:5c::/64"]
    await k.remove_disabled()  # -ip-masq on and forward rules on: nothing to remove
    k2, tools2 = keeper(V6ONLY, ip_masq=False)
    await k2.remove_disabled()
    assert tools2[6].removed == [{"nat": True, "filter": False}] and tools2[4].removed == []


async def test_an_ipv4_only_config_never_runs_ip6tables():
    k, tools = keeper(V4ONLY)
    await k.ensure(DUAL_LEASE)  # a dual-stack key read back in an IPv4-only cluster
    assert len(tools[4].ensured) == 1 and tools[6].ensured == []


async def test_ip6tables_failing_at_start_up_with_ip_masq_is_fatal_and_named():
    k, tools = keeper(DUAL)
    tools[6].fail = True
    with pytest.raises(Fatal, match="-ip-masq: cannot install ip6tables rules"):
        await k.ensure(DUAL_LEASE, fatal=True)
    await k.ensure(DUAL_LEASE)  # later (the resync): an error line, no exit
    k.forget()
    assert k.lease is None


def test_state_file_of_an_ipv6_only_node_names_its_subnet_and_expiry():
    snap = NodeSnapshot(backend="vxlan", subnet="", ipv6_subnet="fc00:10:1:5c::/64",
                        lease_expiry=1234.0)
    doc = snap.for_state_file()
    assert doc["subnet"] is None and doc["ipv6_subnet"] == "fc00:10:1:5c::/64"
    assert doc["lease_expiry"] == 1234.0


def test_log_lines_name_each_network_even_without_ipv4():
    assert networks(DUAL) == "10.1.0.0/16 + fc00:10:1::/48"
    assert networks(V6ONLY) == "fc00:10:1::/48"
