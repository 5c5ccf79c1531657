"""The host-gw backend ("direct routing"): a route to each peer's subnet via its host.

No encapsulation at all, so every host must share one L2 segment with the others. Routes
are reconciled on netlink events, so a link flap costs a second, not the routes.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Network

from pyflannel.backend.base import Backend, BackendError
from pyflannel.host import netlink
from pyflannel.host.routes import RouteSpec
from pyflannel.lease.model import LeaseAttrs

log = logging.getLogger("pyflannel.hostgw")


class HostGwBackend(Backend):
    type = "host-gw"

    @property
    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseAttrs:
        own = await asyncio.to_thread(netlink.interface_addresses, self.ext.index)
        if self.ext.public_ip not in own:
            raise BackendError(
                f"host-gw: the published address {self.ext.public_ip} is not an address of "
                f"{self.ext.name} (host-gw routes to peers directly and cannot work through "
                "NAT; drop -public-ip or use vxlan)")
        gone = await asyncio.to_thread(netlink.remove_stale_devices, None)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        return LeaseAttrs(public_ip=self.ext.public_ip, backend_type=self.type)

    def desired_routes(self) -> dict[IPv4Network, RouteSpec]:
        return {
            subnet: RouteSpec(subnet, self.ext.index, peer.attrs.public_ip)
            for subnet, peer in self.peers.items()
            if peer.attrs.public_ip != self.ext.public_ip
        }
