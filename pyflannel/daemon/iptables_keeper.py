"""flanneld's masquerade and forward rules: installed for our lease and kept in place.

One rule set per enabled address family: iptables for the IPv4 network and subnet,
ip6tables for the IPv6 ones (dual-stack and IPv6-only), as flanneld does.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Network, IPv6Network

from pyflannel.config import NetworkConfig
from pyflannel.daemon.supervise import Fatal
from pyflannel.flags import Options
from pyflannel.host.iptables import Iptables, IptablesError, RuleSet
from pyflannel.lease.model import Lease
from pyflannel.logutil import RateLimitedLog

log = logging.getLogger("pyflannel")

IPNetwork = IPv4Network | IPv6Network


class IptablesKeeper:
    """Owns pyflannel's iptables and ip6tables rules: the sets for the current lease,
    restored whenever someone removes one (every -iptables-resync seconds), and none that
    the flags turn off.

    ``tools`` maps an address family (4, 6) to the Iptables that runs its tools; only the
    families the network config enables are used.
    """

    def __init__(self, opts: Options, cfg: NetworkConfig,
                 tools: dict[int, Iptables] | None = None) -> None:
        self.opts = opts
        self.networks: dict[int, IPNetwork] = {
            pool.version: pool.network for pool in cfg.pools}
        tools = tools or {}
        self.tools = {v: tools.get(v) or Iptables(family=v) for v in self.networks}
        self.lease: Lease | None = None
        self._installed_once: set[int] = set()
        self._errors = RateLimitedLog(log)

    @property
    def iptables(self) -> Iptables | None:
        """The IPv4 tools (None in IPv6-only mode)."""
        return self.tools.get(4)

    def rule_set(self, subnet: IPNetwork) -> RuleSet:
        """The rules for one of our subnets, in its family's network."""
        return RuleSet(self.networks[subnet.version], subnet, masq=self.opts.ip_masq,
                       forward=self.opts.iptables_forward_rules, random_fully=True)

    def _subnets(self, lease: Lease) -> list[IPNetwork]:
        out: list[IPNetwork] = []
        if 4 in self.networks and lease.has_ipv4:
            out.append(lease.subnet)
        if 6 in self.networks and lease.ipv6_subnet is not None:
            out.append(lease.ipv6_subnet)
        return out

    async def ensure(self, lease: Lease, *, fatal: bool = False) -> None:
        """Rules for each subnet of ``lease``; with ``fatal`` (start-up, -ip-masq) a
        failure exits."""
        self.lease = lease
        for subnet in self._subnets(lease):
            await self._ensure_one(subnet, fatal)

    async def _ensure_one(self, subnet: IPNetwork, fatal: bool) -> None:
        family = subnet.version
        rules = self.rule_set(subnet)
        if not rules.tables():
            return
        tool = "iptables" if family == 4 else "ip6tables"
        try:
            restored = await asyncio.to_thread(self.tools[family].ensure, rules)
        except IptablesError as e:
            if fatal and self.opts.ip_masq and family not in self._installed_once:
                raise Fatal(f"-ip-masq: cannot install {tool} rules: {e}") from None
            self._errors.error(tool, "%s rules: %s", tool, e)
            return
        if restored:
            again = family in self._installed_once
            log.info("%s rules %s", tool, "restored" if again else "installed")
        self._installed_once.add(family)
        self._errors.clear(tool, f"{tool} rules in place again")

    def forget(self) -> None:
        """The lease is gone: stop restoring its rules (they stay until the next lease)."""
        self.lease = None

    async def remove_disabled(self) -> None:
        """Rules an earlier run installed that the flags now turn off (e.g. -ip-masq)."""
        nat, fwd = not self.opts.ip_masq, not self.opts.iptables_forward_rules
        if not (nat or fwd):
            return
        for family, tools in self.tools.items():
            try:
                await asyncio.to_thread(tools.remove, nat=nat, filter=fwd)
            except IptablesError as e:
                log.warning("cannot check for old %s rules: %s",
                            "iptables" if family == 4 else "ip6tables", e)

    async def keep(self) -> None:
        """Put back any rule someone removed, every -iptables-resync seconds."""
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            if self.lease is not None:
                await self.ensure(self.lease)
