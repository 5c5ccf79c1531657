"""The lease life cycle: acquire, program, renew, re-acquire when lost, and follow the peers.

The manager owns no devices: it tells its owner (the daemon) through callbacks,
``on_lease(lease)`` to program the data path for a subnet we hold, ``on_lease_lost(old)``
to tear down a subnet that is no longer ours, and ``on_peers(diff)``. It keeps retrying
etcd with bounded back-off, and every await is a point where the world may have changed:
after each one it checks that the lease it was working on is still the one it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import IPv4Address, IPv4Network

from pyflannel.backoff import Backoff
from pyflannel.config import NetworkConfig
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.lease.policy import (
    LEASE_TTL_S,
    RENEW_RETRY_S,
    PeerDiff,
    SubnetPoolExhausted,
    choose_subnet,
    diff_peers,
    renew_delay,
)
from pyflannel.lease.registry import (
    EtcdAuthError,
    EtcdUnavailable,
    Registry,
    Rejected,
    WatchCompacted,
    WatchEvent,
)
from pyflannel.logutil import RateLimitedLog, WarnOnce

log = logging.getLogger("pyflannel.lease")

ACQUIRE_ATTEMPTS = 20
EtcdTrouble = (EtcdUnavailable, EtcdAuthError)

__all__ = ["Backoff", "LeaseManager"]


class LeaseManager:
    """Holds this node's lease and the table of its peers' leases."""

    # Re-acquire and activation retries; tests shorten them.
    retry_first_s, retry_ceiling_s = 0.5, 10.0
    watch_retry_first_s, watch_retry_ceiling_s = 0.2, 5.0

    def __init__(
        self,
        registry: Registry,
        cfg: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        renew_margin_s: float = 3600,
        ttl_s: int = LEASE_TTL_S,
        on_peers: Callable[[PeerDiff], Awaitable[None]] | None = None,
        on_lease: Callable[[Lease], Awaitable[None]] | None = None,
        on_lease_lost: Callable[[Lease], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.attrs = attrs
        self.renew_margin_s = renew_margin_s
        self.ttl_s = ttl_s
        self.on_peers = on_peers
        self.on_lease = on_lease
        self.on_lease_lost = on_lease_lost
        self.lease: Lease | None = None  # the key we hold in etcd (None while re-acquiring)
        self.active = False  # on_lease has programmed the data path for self.lease
        self.expires_at: float = 0.0
        self.peers: dict[IPv4Network, Lease] = {}
        self.renewals = 0
        self._epoch = 0  # bumped whenever self.lease changes
        self._lost = asyncio.Event()
        self._loss_reason = "own lease lost"
        self._pool_changed = asyncio.Event()  # a key went away: a subnet may be free
        self._errors = RateLimitedLog(log)
        self._warn = WarnOnce(log)

    @property
    def public_ip(self) -> IPv4Address:
        return self.attrs.public_ip

    def _backoff(self) -> Backoff:
        return Backoff(self.retry_first_s, self.retry_ceiling_s)

    # -- acquisition -------------------------------------------------------------------

    async def acquire(self, previous: IPv4Network | None = None) -> Lease:
        """Take a subnet, retrying lost races; raises SubnetPoolExhausted when full."""
        lost_races: set[IPv4Network] = set()
        for _attempt in range(ACQUIRE_ATTEMPTS):
            listing = await self.registry.list_leases()
            self._report_rejected(listing.rejected)
            choice = choose_subnet(self.cfg, listing.leases, self.public_ip, previous,
                                   occupied=listing.occupied | lost_races)
            if choice.existing is not None:
                lease = await self.registry.reclaim(choice.existing, self.attrs, self.ttl_s)
            else:
                lease = await self.registry.create(choice.subnet, self.attrs, self.ttl_s)
                lost_races.add(choice.subnet)
            if lease is not None:
                self._took(lease, choice.reason)
                return lease
            log.info("subnet %s was taken by another node meanwhile; trying again",
                     choice.subnet)
        raise EtcdUnavailable(f"could not acquire a subnet in {ACQUIRE_ATTEMPTS} attempts")

    def _took(self, lease: Lease, reason: str) -> None:
        self.lease = lease
        self.active = False
        self._epoch += 1
        self._lost.clear()
        self.expires_at = float("inf") if lease.reserved else time.time() + self.ttl_s
        kind = "reserved subnet" if lease.reserved else f"lease {lease.lease_id:x}"
        log.info("acquired %s (%s, %s)", lease.subnet, reason, kind)

    def _report_rejected(self, rejected: Iterable[Rejected]) -> None:
        for r in rejected:
            taken = f"; subnet {r.subnet} counts as taken" if r.subnet is not None else ""
            self._warn.warn(("rejected", r.key, r.reason), "ignoring key %s: %s%s",
                            r.key, r.reason, taken)

    # -- the life cycle ----------------------------------------------------------------

    async def renew_forever(self) -> None:
        """Hold a lease for ever: program it, renew it at expiry minus the margin, and take
        one again (and program that) whenever it is lost."""
        while True:
            lease = self.lease
            if lease is None or self._lost.is_set():
                await self._reacquire()
                continue
            if not self.active:
                await self._activate(lease)
                continue
            if lease.reserved:
                await self._lost.wait()
                continue
            # A margin longer than the lease (only with the test-only short TTL) must not
            # turn renewal into a hot loop.
            margin = min(self.renew_margin_s, self.ttl_s / 2)
            if await self._wait_lost(renew_delay(self.expires_at, time.time(), margin)):
                continue
            await self._renew(lease)

    async def _renew(self, lease: Lease) -> None:
        try:
            ttl = await self.registry.refresh(lease.lease_id)
        except EtcdTrouble as e:
            # Every minute, as flanneld; sooner when the lease is about to run out.
            retry = min(RENEW_RETRY_S, max(1.0, (self.expires_at - time.time()) / 4))
            self._errors.error("renew", "lease renewal failed, retrying in %.0fs: %s",
                               retry, e)
            await self._wait_lost(retry)
            return
        if self.lease is not lease:
            return
        if ttl <= 0:
            self.lease_lost("etcd no longer has our lease")
            return
        self._errors.clear("renew", "lease renewal works again")
        self.renewals += 1
        self.expires_at = time.time() + ttl
        log.info("renewed lease for %s (%ds)", lease.subnet, ttl)

    async def _wait_lost(self, seconds: float) -> bool:
        """Sleep, waking early if the lease is lost; True if it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lost.wait(), seconds)
        return self._lost.is_set()

    async def _activate(self, lease: Lease) -> None:
        """Program the data path for ``lease``, retrying until it works or the lease goes: a
        device deleted at the wrong moment must not leave the node on its old subnet."""
        backoff = self._backoff()
        while self.lease is lease and not self._lost.is_set():
            try:
                if self.on_lease is not None:
                    await self.on_lease(lease)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure here is retried
                self._errors.error("activate", "cannot program subnet %s yet: %s",
                                   lease.subnet, _one_line(e))
                await self._wait_lost(backoff.next())
                continue
            if self.lease is lease:
                self.active = True
                self._errors.clear("activate", f"subnet {lease.subnet} programmed")
            return

    async def _reacquire(self) -> None:
        old = self.lease
        log.warning("%s: acquiring a lease again", self._loss_reason)
        self.lease, self.active = None, False
        self._epoch += 1
        if old is not None:
            await self._drop(old)
        backoff = self._backoff()
        while True:
            self._pool_changed.clear()
            try:
                lease = await self.acquire(previous=old.subnet if old else None)
                break
            except SubnetPoolExhausted as e:
                self._errors.error("reacquire", "cannot take a lease: %s; waiting for one "
                                   "to free up", e)
            except EtcdTrouble as e:
                self._errors.error("reacquire", "cannot take a lease: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool_changed.wait(), backoff.next())
        self._errors.clear("reacquire", f"lease re-acquired: {lease.subnet}")
        if old is not None and old.lease_id and old.lease_id != lease.lease_id:
            await self._revoke(old.lease_id)

    async def _drop(self, old: Lease) -> None:
        """The subnet is no longer ours: stop using it, and give back its etcd lease unless
        the key still hangs on it (then the next acquisition adopts it)."""
        if self.on_lease_lost is not None:
            try:
                await self.on_lease_lost(old)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - tearing down must not stop re-acquiring
                log.error("cannot tear down subnet %s: %s", old.subnet, _one_line(e))
        if old.reserved:
            return
        try:
            current = await self.registry.get_lease(old.subnet)
        except EtcdTrouble:
            return  # revoked after the next acquisition instead
        if current is None or current.lease_id != old.lease_id:
            await self._revoke(old.lease_id)

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self.registry.revoke(lease_id)
            log.info("revoked etcd lease %x, which no longer holds our key", lease_id)
        except EtcdTrouble as e:
            log.warning("cannot revoke etcd lease %x (it expires by itself): %s", lease_id, e)

    async def republish(self, attrs: LeaseAttrs) -> None:
        """Publish changed attributes (a new VtepMAC) on the lease we hold."""
        self.attrs = attrs
        backoff = Backoff(0.5, 5.0)
        for _attempt in range(10):
            lease = self.lease
            if lease is None or self._lost.is_set():
                return  # re-acquiring publishes self.attrs anyway
            try:
                await self.registry.put_lease(lease.subnet, attrs, lease.lease_id)
            except EtcdTrouble as e:
                self._errors.error("publish", "cannot publish lease attributes: %s", e)
                await asyncio.sleep(backoff.next())
                continue
            if self.lease is lease:
                self.lease = Lease(lease.subnet, attrs, lease.lease_id, lease.mod_revision)
            log.info("published new lease attributes for %s", lease.subnet)
            return

    def activated(self, lease: Lease) -> None:
        """The owner programmed ``lease`` itself (at start-up)."""
        if self.lease is lease:
            self.active = True

    def lease_is_lost(self) -> bool:
        return self._lost.is_set()

    def lease_lost(self, reason: str = "own lease key disappeared") -> None:
        """Signal (from the watch or a renewal) that our key is gone or not ours."""
        self._loss_reason = reason
        self._lost.set()

    def holds_subnet(self) -> bool:
        """A lease is held and its data path programmed."""
        return self.lease is not None and self.active and not self._lost.is_set()

    # -- peers -------------------------------------------------------------------------

    def _usable_peer(self, lease: Lease) -> bool:
        own = self.lease
        if own is not None and lease.subnet == own.subnet:
            return False
        if lease.attrs.public_ip == self.public_ip:
            # Our own new key seen before we recorded it, or a stale or mistyped lease for
            # our address: never a peer (it would route our traffic to ourselves).
            if own is not None:
                self._warn.warn(("own-address", lease.subnet), "lease %s names this node's "
                                "address %s but is not our lease (%s); not programmed",
                                lease.subnet, self.public_ip, own.subnet)
            return False
        if lease.subnet.prefixlen != self.cfg.subnet_len or not lease.subnet.subnet_of(
            self.cfg.network
        ):
            self._warn.warn(("outside", lease.subnet), "peer lease %s lies outside the "
                            "network config; ignored", lease.subnet)
            return False
        return True

    async def _apply(self, table: dict[IPv4Network, Lease]) -> None:
        diff = diff_peers(self.peers, table)
        self.peers = table
        if not diff or self.on_peers is None:
            return
        try:
            await self.on_peers(diff)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the backend's reconciler retries
            self._errors.error("peers", "cannot program peers yet: %s", _one_line(e))

    async def resync(self) -> int:
        """List every lease and diff against the table; returns the revision to watch from."""
        epoch = self._epoch
        listing = await self.registry.list_leases()
        self._report_rejected(listing.rejected)
        own = self.lease
        # A listing begun before our lease changed says nothing about the new one.
        if own is not None and epoch == self._epoch and not any(
            lease.subnet == own.subnet and lease.attrs.public_ip == self.public_ip
            for lease in listing.leases
        ):
            self.lease_lost()
        table = {lease.subnet: lease for lease in listing.leases if self._usable_peer(lease)}
        await self._apply(table)
        self._pool_changed.set()
        return listing.revision + 1

    async def watch_forever(self) -> None:
        """Follow ``<prefix>/subnets/``; after any break, list again and diff (bounded)."""
        backoff = Backoff(self.watch_retry_first_s, self.watch_retry_ceiling_s)
        while True:
            try:
                revision = await self.resync()
                events = await self.registry.watch(revision)
                backoff.reset()
                self._errors.clear("watch", "watching leases again")
                async for ev in events:
                    await self._on_event(ev)
            except WatchCompacted as e:
                log.warning("watch revision compacted (%s); listing leases again", e)
                continue
            except EtcdTrouble as e:
                self._errors.error("watch", "lease watch interrupted: %s", e)
            await asyncio.sleep(backoff.next())

    async def _on_event(self, ev: WatchEvent) -> None:
        if ev.rejected is not None:
            self._report_rejected([ev.rejected])
        subnet = ev.subnet
        if subnet is None:
            return
        own = self.lease
        if own is not None and subnet == own.subnet:
            if ev.lease is None or ev.lease.attrs.public_ip != self.public_ip:
                self.lease_lost("own lease key was deleted" if ev.rejected is None and
                                ev.lease is None else "own lease key was taken over")
            return
        if ev.lease is None and ev.rejected is None:
            self._pool_changed.set()
        table = dict(self.peers)
        if ev.lease is not None and self._usable_peer(ev.lease):
            table[subnet] = ev.lease
        else:
            table.pop(subnet, None)
        await self._apply(table)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())[:300]
