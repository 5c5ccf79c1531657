"""The backend interface: what the daemon asks of udp, vxlan and host-gw alike."""

from __future__ import annotations

import abc
from typing import ClassVar

from pyflannel.config import NetworkConfig
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.model import Lease, LeaseAttrs


class BackendError(RuntimeError):
    """The backend cannot run on this host with this config (one line for the operator)."""


class Backend(abc.ABC):
    """One overlay implementation.

    Life cycle: ``prepare`` (devices that do not depend on the subnet, and the lease
    attributes to publish) -> ``activate(lease)`` (again whenever our subnet changes) ->
    ``add_peer``/``remove_peer`` as leases come and go -> ``teardown``.
    """

    type: ClassVar[str]

    def __init__(self, cfg: NetworkConfig, ext: ExternalInterface) -> None:
        self.cfg = cfg
        self.ext = ext

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """The MTU containers must use over this backend."""

    @abc.abstractmethod
    async def prepare(self) -> LeaseAttrs: ...

    @abc.abstractmethod
    async def activate(self, lease: Lease) -> None: ...

    @abc.abstractmethod
    async def add_peer(self, lease: Lease) -> None: ...

    @abc.abstractmethod
    async def remove_peer(self, lease: Lease) -> None: ...

    @abc.abstractmethod
    async def teardown(self) -> None: ...

    def healthy(self) -> bool:
        """False when the data path has died and the daemon must not claim readiness."""
        return True

    def counters(self) -> dict[str, int]:
        return {}
