"""flanneld's masquerade and forward rules: installed for our lease and kept in place."""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Network

from pyflannel.daemon.supervise import Fatal
from pyflannel.flags import Options
from pyflannel.host.iptables import Iptables, IptablesError, RuleSet
from pyflannel.logutil import RateLimitedLog

log = logging.getLogger("pyflannel")


class IptablesKeeper:
    """Owns pyflannel's iptables rules: the set for the current lease, restored whenever
    someone removes one (every -iptables-resync seconds), and none that the flags turn off."""

    def __init__(self, opts: Options, network: IPv4Network,
                 iptables: Iptables | None = None) -> None:
        self.opts = opts
        self.network = network
        self.iptables = iptables or Iptables()
        self.subnet: IPv4Network | None = None
        self._installed_once = False
        self._errors = RateLimitedLog(log)

    def rule_set(self, subnet: IPv4Network) -> RuleSet:
        return RuleSet(self.network, subnet, masq=self.opts.ip_masq,
                       forward=self.opts.iptables_forward_rules, random_fully=True)

    async def ensure(self, subnet: IPv4Network, *, fatal: bool = False) -> None:
        """Rules for ``subnet``; with ``fatal`` (start-up, -ip-masq) a failure exits."""
        self.subnet = subnet
        rules = self.rule_set(subnet)
        if not rules.tables():
            return
        try:
            restored = await asyncio.to_thread(self.iptables.ensure, rules)
        except IptablesError as e:
            if fatal and self.opts.ip_masq and not self._installed_once:
                raise Fatal(f"-ip-masq: cannot install iptables rules: {e}") from None
            self._errors.error("iptables", "iptables rules: %s", e)
            return
        if restored:
            log.info("iptables rules %s", "restored" if self._installed_once else "installed")
        self._installed_once = True
        self._errors.clear("iptables", "iptables rules in place again")

    async def remove_disabled(self) -> None:
        """Rules an earlier run installed that the flags now turn off (e.g. -ip-masq)."""
        nat, fwd = not self.opts.ip_masq, not self.opts.iptables_forward_rules
        if nat or fwd:
            try:
                await asyncio.to_thread(self.iptables.remove, nat=nat, filter=fwd)
            except IptablesError as e:
                log.warning("cannot check for old iptables rules: %s", e)

    async def keep(self) -> None:
        """Put back any rule someone removed, every -iptables-resync seconds."""
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            if self.subnet is not None:
                await self.ensure(self.subnet)
