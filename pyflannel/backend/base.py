"""The backend interface: what the daemon asks of udp, vxlan and host-gw alike."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar

from pyflannel.config import NetworkConfig
from pyflannel.fastpath.handle import Installed, InstallError
from pyflannel.host.monitor import NetlinkMonitor
from pyflannel.host.netlink import ExternalInterface
from pyflannel.host.nlsession import run_netlink
from pyflannel.host.routes import IPNetwork, RouteSpec, sync_routes
from pyflannel.lease.manager import describe
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.logutil import RateLimitedLog, WarnOnce

log = logging.getLogger("pyflannel.backend")

RECONCILE_EVERY_S = 10.0  # safety net behind the netlink events
DEBOUNCE_S = 0.05
RETRY_INSTALL_S = 1.0  # a table the fast path did not confirm is sent again this soon


def endpoint_problem(ip: IPv4Address | IPv6Address | None) -> str | None:
    """Why a peer's underlay address (PublicIP, PublicIPv6) cannot carry its traffic, or
    None when it can: the one rule every backend applies to it."""
    if ip is None or ip.is_unspecified:
        return "it publishes no address"
    if ip.is_loopback or ip.is_multicast or (ip.version == 4 and ip.is_reserved):
        return f"its address {ip} is a loopback, multicast, broadcast or reserved one"
    if ip.version == 6 and (ip.ipv4_mapped is not None or ip.is_link_local):
        return f"its address {ip} is IPv4-mapped or link-local"
    return None


def peer_address(lease: Lease) -> str:
    """Where a peer is: its PublicIP, or PublicIPv6 for an IPv6-only peer."""
    if lease.has_ipv4 or lease.attrs.public_ipv6 is None:
        return str(lease.attrs.public_ip)
    return str(lease.attrs.public_ipv6)


class BackendError(RuntimeError):
    """The backend cannot run on this host with this config (one line for the operator)."""


class Backend(abc.ABC):
    """One overlay implementation.

    Life cycle: ``prepare`` (devices that do not depend on the subnet, and the lease
    attributes to publish) -> ``activate(lease)`` (again whenever our subnet changes) ->
    ``add_peer``/``remove_peer`` as leases come and go, each batch closed by ``commit`` ->
    ``teardown``. ``run`` keeps the kernel state equal to the wanted state meanwhile.

    Peers are keyed by :attr:`Lease.key_name`: IPv6-only leases all share the IPv4
    placeholder 0.0.0.0/0, so the IPv4 subnet cannot tell them apart.
    """

    type: ClassVar[str]

    def __init__(self, cfg: NetworkConfig, ext: ExternalInterface) -> None:
        self.cfg = cfg
        self.ext = ext
        self.lease: Lease | None = None
        self.peers: dict[str, Lease] = {}
        # Set by the daemon: publish changed lease attributes (e.g. a new VtepMAC).
        self.publish: Callable[[LeaseAttrs], Awaitable[None]] | None = None
        self._dirty: asyncio.Event | None = None
        self._monitor: NetlinkMonitor | None = None
        self._errors = RateLimitedLog(log)
        self._warn = WarnOnce(log)
        self.refused_rows: dict[str, list[str]] = {}  # by device: rows its fast path refused

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """The MTU containers must use over this backend."""

    @abc.abstractmethod
    async def prepare(self) -> LeaseAttrs: ...

    async def activate(self, lease: Lease) -> None:
        self.lease = lease
        await self.commit()

    async def deactivate(self) -> None:
        """Our subnet is no longer ours: remove its routes (peers stay known, so the next
        ``activate`` programs them again at once)."""
        self.lease = None
        await self.commit()

    async def add_peer(self, lease: Lease) -> None:
        self.peers[lease.key_name] = lease

    async def remove_peer(self, lease: Lease) -> None:
        self.peers.pop(lease.key_name, None)

    async def commit(self) -> None:
        """Apply the peer changes made since the last commit."""
        await self.reconcile()

    async def teardown(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            await asyncio.to_thread(monitor.stop)

    def desired_routes(self) -> dict[IPNetwork, RouteSpec]:
        """Every route (both families) this backend wants in the main table, and no other
        of ours."""
        return {}

    async def reconcile(self) -> None:
        desired = self.desired_routes() if self.lease is not None else {}
        self.report_route_sync(*await run_netlink(sync_routes, desired))

    def report_route_sync(self, added: int, removed: int, errors: list[str]) -> None:
        """One line for what a route reconcile changed; a failure said once until it clears."""
        if added or removed:
            log.info("routes reconciled: %d set, %d removed", added, removed)
        if errors:
            self._errors.error("routes", "cannot set routes yet (%s); will retry",
                               "; ".join(errors[:3]))
        else:
            self._errors.clear("routes", "all routes in place")

    def on_netlink(self, kind: str, what: str) -> None:
        """A link or route changed somewhere on the host: check ours soon."""
        if self._dirty is not None:
            self._dirty.set()

    async def run(self) -> None:
        """Keep kernel state as wanted: react to netlink events, and check every 10 s."""
        self._dirty = asyncio.Event()
        if self.data_path_behind():  # a table not confirmed before we ran: at once
            self._dirty.set()
        # Each supervised restart makes a new monitor: the old one must be gone (its
        # thread and netlink socket) however this run ends.
        monitor = self._monitor = NetlinkMonitor(asyncio.get_running_loop(), self.on_netlink)
        try:
            monitor.start()
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), RECONCILE_EVERY_S)
                await asyncio.sleep(DEBOUNCE_S)
                self._dirty.clear()
                await self.reconcile_all()
        finally:
            monitor.stop()  # wakes the thread through its eventfd: returns at once
            if self._monitor is monitor:
                self._monitor = None

    async def reconcile_all(self) -> None:
        """Periodic/event-driven repair; backends with devices extend it. A peer table the
        fast path did not confirm, or took only in part, is installed again."""
        if self.data_path_behind() or any(self.refused_rows.values()):
            await self.commit()
        else:
            await self.reconcile()

    # -- the peer table in the data path ---------------------------------------------------

    def data_path_behind(self) -> bool:
        """True while the data path has not confirmed the newest peer table (the daemon
        is not ready then, and the reconciler installs it again)."""
        return False

    def peer_problems(self) -> dict[str, str]:
        """Peers known but left out of the data path, by lease key name, with why."""
        return {}

    def takes_foreign_lease(self, lease: Lease) -> bool:
        """Whether a lease naming another backend (or none: flanneld's udp) is a peer
        all the same: gre's static peers, alloc's silence. Default: no."""
        return False

    def identity_conflict(self, others: Iterable[Lease]) -> str | None:
        """Why this node must not start beside these live leases of other nodes (one line
        for the operator), or None."""
        return None

    def skip_peer(self, lease: Lease, why: str) -> None:
        """Leave one lease out of the data path, with one warning naming its subnet and
        address; the rest of the table goes ahead."""
        self._warn.warn(("skip", lease.key_name, str(lease.attrs), why),
                        "peer %s (%s) ignored: %s", describe(lease), peer_address(lease), why)

    async def install_table(self, device: str, install: Awaitable[Installed | None],
                            rows: Sequence[str]) -> None:
        """Hand ``device``'s fast path a table (``rows`` names its rows) and hear its
        answer: silence or a refusal is said (rate-limited) and the table sent again soon;
        each row it refused is named once."""
        try:
            done = await install
        except InstallError as e:
            self._errors.error(f"install {device}", "the fast path of %s did not take the "
                               "peer table (%s); sending it again", device, e)
            self._retry_soon()
            return
        if done is None:  # a newer table went first
            return
        self._errors.clear(f"install {device}", f"the fast path of {device} has the peer "
                           "table again")
        refused = [(rows[i] if 0 <= i < len(rows) else f"row {i}", why)
                   for i, why in done.refused]
        for name, why in refused:
            self._warn.warn(("refused", device, name, why), "the fast path of %s left "
                            "out %s: %s", device, name, why)
        self.refused_rows[device] = [name for name, _why in refused]

    def _retry_soon(self) -> None:
        if self._dirty is not None:
            asyncio.get_running_loop().call_later(RETRY_INSTALL_S, self._dirty.set)

    def healthy(self) -> bool:
        """False when the data path has died and the daemon must not claim readiness."""
        return True

    async def follow_address(self, ext: ExternalInterface) -> LeaseAttrs | None:
        """The external interface's address or index changed: carry traffic on ``ext`` from
        now on. Returns the lease attributes to publish when more than the addresses change
        (None: the daemon puts the new addresses into the ones it published). Here nothing
        is bound to the address (host-gw): the routes follow the new index."""
        self.ext = ext
        await self.commit()
        return None

    def counters(self) -> dict[str, int]:
        return {}

    async def peer_counters(self) -> dict[str, dict] | None:
        """Per-peer traffic by peer subnet, where the backend sees it (udp); else None."""
        return None
