"""The alloc backend: a lease and a subnet file, and no data path at all.

flanneld's ``alloc`` is the hook for operators who bring their own data path (routes from
their routers, a CNI plugin of their own): it takes and renews a subnet lease and writes
subnet.env, and it never touches a device or a route. Like flanneld's, the lease publishes
only the node's address (no ``BackendType``, no ``BackendData``) and ``FLANNEL_MTU`` is the
external interface's own MTU, since nothing is encapsulated.
"""

from __future__ import annotations

from pyflannel.backend.base import Backend
from pyflannel.lease.model import NO_PUBLIC_IP, Lease, LeaseAttrs


class AllocBackend(Backend):
    type = "alloc"

    @property
    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseAttrs:
        v4, v6 = self.cfg.enable_ipv4, self.cfg.enable_ipv6
        return LeaseAttrs(public_ip=self.ext.public_ip if v4 else NO_PUBLIC_IP,
                          public_ipv6=self.ext.public_ipv6 if v6 else None)

    def takes_foreign_lease(self, lease: Lease) -> bool:
        """Every lease is a peer we do nothing with: no warning about its backend (alloc's
        own leases carry no BackendType, which reads as udp)."""
        return True

    async def reconcile(self) -> None:
        """Nothing to keep: the kernel's tables are the operator's."""
