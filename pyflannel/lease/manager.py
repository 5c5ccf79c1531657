"""The lease life cycle: acquire, renew, re-acquire when lost, and follow the peers.

The manager owns no devices: it tells its owner (the daemon) through two callbacks,
``on_peers(diff)`` and ``on_lease(lease)``, and keeps retrying etcd with bounded back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network

from pyflannel.config import NetworkConfig
from pyflannel.lease.etcd import EtcdRegistry, EtcdUnavailable, WatchCompacted
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.lease.policy import (
    LEASE_TTL_S,
    RENEW_RETRY_S,
    PeerDiff,
    choose_subnet,
    diff_peers,
    renew_delay,
)
from pyflannel.logutil import RateLimitedLog

log = logging.getLogger("pyflannel.lease")

ACQUIRE_ATTEMPTS = 20


class Backoff:
    """Exponential retry delays with a ceiling: no hot loop, no endless wait."""

    def __init__(self, first: float = 0.2, ceiling: float = 5.0) -> None:
        self.first, self.ceiling, self.current = first, ceiling, first

    def next(self) -> float:
        delay, self.current = self.current, min(self.current * 2, self.ceiling)
        return delay

    def reset(self) -> None:
        self.current = self.first


class LeaseManager:
    """Holds this node's lease and the table of its peers' leases."""

    def __init__(
        self,
        registry: EtcdRegistry,
        cfg: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        renew_margin_s: float = 3600,
        ttl_s: int = LEASE_TTL_S,
        on_peers: Callable[[PeerDiff], Awaitable[None]] | None = None,
        on_lease: Callable[[Lease], Awaitable[None]] | None = None,
        on_lease_lost: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.attrs = attrs
        self.renew_margin_s = renew_margin_s
        self.ttl_s = ttl_s
        self.on_peers = on_peers
        self.on_lease = on_lease
        self.on_lease_lost = on_lease_lost
        self.lease: Lease | None = None
        self.expires_at: float = 0.0
        self.peers: dict[IPv4Network, Lease] = {}
        self.renewals = 0
        self._lost = asyncio.Event()
        self._errors = RateLimitedLog(log)
        self._ignored: set[tuple[IPv4Network, str]] = set()

    @property
    def public_ip(self) -> IPv4Address:
        return self.attrs.public_ip

    # -- acquisition -------------------------------------------------------------------

    async def acquire(self, previous: IPv4Network | None = None) -> Lease:
        """Take a subnet, retrying lost races; raises SubnetPoolExhausted when full."""
        for _attempt in range(ACQUIRE_ATTEMPTS):
            listing = await self.registry.list_leases()
            choice = choose_subnet(self.cfg, listing.leases, self.public_ip, previous)
            if choice.existing is not None:
                lease = await self.registry.reclaim(choice.existing, self.attrs, self.ttl_s)
            else:
                lease = await self.registry.create(choice.subnet, self.attrs, self.ttl_s)
            if lease is not None:
                self._took(lease, choice.reason)
                return lease
            log.info("subnet %s was taken by another node meanwhile; trying again",
                     choice.subnet)
        raise EtcdUnavailable(f"could not acquire a subnet in {ACQUIRE_ATTEMPTS} attempts")

    def _took(self, lease: Lease, reason: str) -> None:
        self.lease = lease
        self._lost.clear()
        self.expires_at = float("inf") if lease.reserved else time.time() + self.ttl_s
        kind = "reserved subnet" if lease.reserved else f"lease {lease.lease_id:x}"
        log.info("acquired %s (%s, %s)", lease.subnet, reason, kind)

    # -- renewal -----------------------------------------------------------------------

    async def renew_forever(self) -> None:
        """Renew at expiry minus the margin; retry every minute; re-acquire when lost."""
        while True:
            lease = self.lease
            if lease is None or lease.reserved:
                await self._lost.wait()
                await self._reacquire("own lease lost")
                continue
            # A margin longer than the lease (only with the test-only short TTL) must not
            # turn renewal into a hot loop.
            margin = min(self.renew_margin_s, self.ttl_s / 2)
            delay = renew_delay(self.expires_at, time.time(), margin)
            try:
                await asyncio.wait_for(self._lost.wait(), delay)
                await self._reacquire("own lease key disappeared")
                continue
            except TimeoutError:
                pass
            try:
                ttl = await self.registry.refresh(lease.lease_id)
            except EtcdUnavailable as e:
                # Every minute, as flanneld; sooner when the lease is about to run out.
                retry = min(RENEW_RETRY_S, max(1.0, (self.expires_at - time.time()) / 4))
                self._errors.error("renew", "lease renewal failed, retrying in %.0fs: %s",
                                   retry, e)
                await self._sleep_or_lost(retry)
                continue
            if ttl <= 0:
                await self._reacquire("etcd no longer has our lease")
                continue
            self._errors.clear("renew", "lease renewal works again")
            self.renewals += 1
            self.expires_at = time.time() + ttl
            log.info("renewed lease for %s (%ds)", lease.subnet, ttl)

    async def _sleep_or_lost(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lost.wait(), seconds)

    async def _reacquire(self, why: str) -> None:
        old = self.lease
        log.warning("%s: acquiring a lease again", why)
        if self.on_lease_lost is not None:
            await self.on_lease_lost()
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                lease = await self.acquire(previous=old.subnet if old else None)
                break
            except EtcdUnavailable as e:
                self._errors.error("reacquire", "cannot re-acquire a lease: %s", e)
                await asyncio.sleep(backoff.next())
        self._errors.clear("reacquire", "lease re-acquired")
        if self.on_lease is not None:
            await self.on_lease(lease)

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
                self.lease = Lease(lease.subnet, attrs, lease.lease_id, lease.mod_revision)
                log.info("published new lease attributes for %s", lease.subnet)
                return
            except EtcdUnavailable as e:
                self._errors.error("publish", "cannot publish lease attributes: %s", e)
                await asyncio.sleep(backoff.next())

    def lease_is_lost(self) -> bool:
        return self._lost.is_set()

    def lease_lost(self) -> None:
        """Signal (from the watch) that our key is gone."""
        self._lost.set()

    # -- peers -------------------------------------------------------------------------

    def _usable_peer(self, lease: Lease) -> bool:
        if self.lease is not None and lease.subnet == self.lease.subnet:
            return False
        if lease.subnet.prefixlen != self.cfg.subnet_len or not lease.subnet.subnet_of(
            self.cfg.network
        ):
            self._warn_once(lease.subnet, "lies outside the network config; ignored")
            return False
        return True

    def _warn_once(self, subnet: IPv4Network, what: str) -> None:
        if (subnet, what) not in self._ignored:
            self._ignored.add((subnet, what))
            log.warning("peer lease %s %s", subnet, what)

    async def _apply(self, table: dict[IPv4Network, Lease]) -> None:
        diff = diff_peers(self.peers, table)
        self.peers = table
        if diff and self.on_peers is not None:
            await self.on_peers(diff)

    async def resync(self) -> int:
        """List every lease and diff against the table; returns the revision to watch from."""
        listing = await self.registry.list_leases()
        for key, reason in listing.malformed:
            self._warn_once(IPv4Network("0.0.0.0/32"), f"{key} is malformed ({reason})")
        own = self.lease.subnet if self.lease else None
        if own is not None and not any(
            lease.subnet == own and lease.attrs.public_ip == self.public_ip
            for lease in listing.leases
        ):
            self.lease_lost()
        table = {lease.subnet: lease for lease in listing.leases if self._usable_peer(lease)}
        await self._apply(table)
        return listing.revision + 1

    async def watch_forever(self) -> None:
        """Follow ``<prefix>/subnets/``; after any break, list again and diff (bounded)."""
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                revision = await self.resync()
                async for ev in self.registry.watch(revision):
                    backoff.reset()
                    self._errors.clear("watch", "watching leases again")
                    await self._on_event(ev.subnet, ev.lease)
            except WatchCompacted as e:
                log.warning("watch revision compacted (%s); listing leases again", e)
                continue
            except EtcdUnavailable as e:
                self._errors.error("watch", "lease watch interrupted: %s", e)
            await asyncio.sleep(backoff.next())

    async def _on_event(self, subnet: IPv4Network, lease: Lease | None) -> None:
        own = self.lease.subnet if self.lease else None
        if subnet == own:
            if lease is None or lease.attrs.public_ip != self.public_ip:
                self.lease_lost()
            return
        table = dict(self.peers)
        if lease is None:
            table.pop(subnet, None)
        elif self._usable_peer(lease):
            table[subnet] = lease
        await self._apply(table)
