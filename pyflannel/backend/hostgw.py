"""The host-gw backend ("direct routing"): a route to each peer's subnet via its host.

No encapsulation at all, so every host must share one L2 segment with the others. Routes
are reconciled on netlink events, so a link flap costs a second, not the routes.

Dual-stack works the same way in each family: the IPv6 subnet goes via the peer's
``PublicIPv6`` on the same interface (``fc00:10:1:24::/64 via fd00:198::2 dev eth0``), and
the lease carries ``PublicIPv6`` and, as flanneld's, no backend data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

from pyflannel.backend.base import Backend, BackendError, endpoint_problem
from pyflannel.host import netlink
from pyflannel.host.nlsession import run_netlink
from pyflannel.host.routes import IPNetwork, RouteSpec
from pyflannel.lease.model import NO_PUBLIC_IP, Lease, LeaseAttrs

log = logging.getLogger("pyflannel.hostgw")

IPAddress = IPv4Address | IPv6Address


class HostGwBackend(Backend):
    type = "host-gw"

    @property
    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseAttrs:
        v4, v6 = self.cfg.enable_ipv4, self.cfg.enable_ipv6
        if v6 and self.ext.public_ipv6 is None:
            raise BackendError(
                f"host-gw: the network has IPv6 (EnableIPv6) but interface {self.ext.name} "
                "has no IPv6 address to route it; give it one, or pick another with -iface")
        own = await run_netlink(netlink.interface_addresses, self.ext.index)
        for on, addr, flag in ((v4, self.ext.public_ip, "-public-ip"),
                               (v6, self.ext.public_ipv6, "-public-ipv6")):
            if on and addr not in own:
                raise BackendError(
                    f"host-gw: the published address {addr} is not an address of "
                    f"{self.ext.name} (host-gw routes to peers directly and cannot work "
                    f"through NAT; drop {flag} or use vxlan)")
        gone = await run_netlink(netlink.remove_stale_devices, None)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        return LeaseAttrs(public_ip=self.ext.public_ip if v4 else NO_PUBLIC_IP,
                          backend_type=self.type,
                          public_ipv6=self.ext.public_ipv6 if v6 else None)

    def desired_routes(self) -> dict[IPNetwork, RouteSpec]:
        """A route to each peer subnet via the peer's address in that family; a subnet
        whose address is unusable is left out (one warning)."""
        out: dict[IPNetwork, RouteSpec] = {}
        for peer in self.peers.values():
            for dst, via, why in self._next_hops(peer):
                if why is not None:
                    self.skip_peer(peer, why)
                elif via is not None:
                    out[dst] = RouteSpec(dst, self.ext.index, via)
        return out

    def peer_problems(self) -> dict[str, str]:
        return {name: why for name, peer in self.peers.items()
                for _dst, _via, why in self._next_hops(peer) if why is not None}

    def _next_hops(self, peer: Lease) -> Iterator[tuple[IPNetwork, IPAddress, str | None]]:
        """(subnet, via, why not) per family the peer and the network have."""
        pub, pub6 = peer.attrs.public_ip, peer.attrs.public_ipv6
        if self.cfg.enable_ipv4 and peer.has_ipv4 and pub != self.ext.public_ip:
            yield peer.subnet, pub, endpoint_problem(pub)
        if (self.cfg.enable_ipv6 and peer.ipv6_subnet is not None and pub6 is not None
                and pub6 != self.ext.public_ipv6):
            yield peer.ipv6_subnet, pub6, endpoint_problem(pub6)
