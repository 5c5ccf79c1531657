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
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

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
    names_us,
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

__all__ = ["Backoff", "LeaseManager", "batches"]

T = TypeVar("T")


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
        self.peers: dict[str, Lease] = {}  # by Lease.key_name
        self.renewals = 0
        self._epoch = 0  # bumped whenever self.lease changes
        self._publishing = 0  # republish calls in flight: etcd may show either form
        self._lost = asyncio.Event()
        self._loss_reason = "own lease lost"
        self._pool_changed = asyncio.Event()  # a key went away: a subnet may be free
        self._errors = RateLimitedLog(log)
        self._warn = WarnOnce(log)

    @property
    def public_ip(self) -> IPv4Address:
        return self.attrs.public_ip

    @property
    def public_ipv6(self) -> IPv6Address | None:
        return self.attrs.public_ipv6

    def _names_us(self, lease: Lease) -> bool:
        """Written by this node: PublicIP decides, PublicIPv6 in IPv6-only mode."""
        return names_us(self.cfg, lease, self.public_ip, self.public_ipv6)

    def _our_address(self) -> str:
        return str(self.public_ip) if self.cfg.enable_ipv4 else str(self.public_ipv6)

    def _backoff(self) -> Backoff:
        return Backoff(self.retry_first_s, self.retry_ceiling_s)

    # -- acquisition -------------------------------------------------------------------

    async def acquire(self, previous: IPv4Network | None = None,
                      previous_ipv6: IPv6Network | None = None) -> Lease:
        """Take a subnet (one per enabled family, in one key), retrying lost races;
        ``previous``/``previous_ipv6`` are preferred each on its own; raises
        SubnetPoolExhausted when a family's pool is full."""
        if not self.cfg.enable_ipv4 and self.public_ipv6 is None:
            self._warn.warn(("no-public-ipv6",), "IPv6-only network, but this node publishes "
                            "no PublicIPv6: after a restart it cannot recognise its lease")
        lost_races: set[IPv4Network | IPv6Network] = set()
        for _attempt in range(ACQUIRE_ATTEMPTS):
            listing = await self.registry.list_leases()
            self._report_rejected(listing.rejected)
            choice = choose_subnet(self.cfg, listing.leases, self.public_ip, previous,
                                   occupied=listing.occupied | lost_races,
                                   public_ipv6=self.public_ipv6, previous_ipv6=previous_ipv6)
            if choice.stale:
                await self._delete_stale(choice.stale)
                continue  # list again: their subnets may now be free for us
            if choice.existing is not None:
                lease = await self.registry.reclaim(choice.existing, self.attrs, self.ttl_s)
            else:
                lease = await self.registry.create(choice.subnet, self.attrs, self.ttl_s,
                                                   ipv6_subnet=choice.ipv6_subnet)
                lost_races.update(s for s in (choice.subnet, choice.ipv6_subnet)
                                  if s is not None and s.prefixlen)
            if lease is not None:
                self._took(lease, choice.reason)
                return lease
            log.info("subnet %s was taken by another node meanwhile; trying again",
                     choice.key_name)
        raise EtcdUnavailable(f"could not acquire a subnet in {ACQUIRE_ATTEMPTS} attempts")

    async def _delete_stale(self, stale: Iterable[Lease]) -> None:
        """Delete keys of ours that no longer fit the config (as flanneld does), unless
        someone rewrote them since we listed."""
        for lease in stale:
            if await self.registry.delete_if_unchanged(lease):
                log.warning("deleted lease %s: it names this node (%s) but does not fit the "
                            "network config", lease.key_name, self._our_address())
                if lease.lease_id:
                    await self._revoke(lease.lease_id)

    def _took(self, lease: Lease, reason: str) -> None:
        self.lease = lease
        self.active = False
        self._epoch += 1
        self._lost.clear()
        self.expires_at = float("inf") if lease.reserved else time.time() + self.ttl_s
        kind = "reserved subnet" if lease.reserved else f"lease {lease.lease_id:x}"
        log.info("acquired %s (%s, %s)", describe(lease), reason, kind)

    def _report_rejected(self, rejected: Iterable[Rejected]) -> None:
        for r in rejected:
            subnets = " and ".join(str(s) for s in r.subnets)
            taken = f"; subnet {subnets} counts as taken" if subnets else ""
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
            # Every minute, as flanneld; sooner when the lease is about to run out. The
            # line names the expiry, which stays put, not the delay, which shrinks: one
            # line for the outage, not one per retry.
            retry = min(RENEW_RETRY_S, max(1.0, (self.expires_at - time.time()) / 4))
            self._errors.error("renew", "lease renewal failed, retrying until the lease runs "
                               "out at %s: %s", _clock(self.expires_at), e)
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
        log.info("renewed lease for %s (%ds)", describe(lease), ttl)

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
                                   describe(lease), _one_line(e))
                await self._wait_lost(backoff.next())
                continue
            if self.lease is lease:
                self.active = True
                self._errors.clear("activate", f"subnet {describe(lease)} programmed")
            return

    async def _reacquire(self) -> None:
        old = self.lease
        log.warning("%s: acquiring a lease again", self._loss_reason)
        self.lease, self.active = None, False
        self._epoch += 1
        revoked = old is not None and await self._drop(old)
        backoff = self._backoff()
        while True:
            self._pool_changed.clear()
            try:
                lease = await self.acquire(
                    previous=old.subnet if old is not None and old.has_ipv4 else None,
                    previous_ipv6=old.ipv6_subnet if old is not None else None)
                break
            except SubnetPoolExhausted as e:
                self._errors.error("reacquire", "cannot take a lease: %s; waiting for one "
                                   "to free up", e)
            except EtcdTrouble as e:
                self._errors.error("reacquire", "cannot take a lease: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool_changed.wait(), backoff.next())
        self._errors.clear("reacquire", f"lease re-acquired: {describe(lease)}")
        if old is not None and old.lease_id and old.lease_id != lease.lease_id and not revoked:
            await self._revoke(old.lease_id)

    async def _drop(self, old: Lease) -> bool:
        """The subnet is no longer ours: stop using it, and give back its etcd lease unless
        the key still hangs on it (then the next acquisition adopts it). True once that
        etcd lease is given back."""
        if self.on_lease_lost is not None:
            try:
                await self.on_lease_lost(old)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - tearing down must not stop re-acquiring
                log.error("cannot tear down subnet %s: %s", describe(old), _one_line(e))
        if old.reserved:
            return False
        try:
            current = await self.registry.get_lease(old.subnet, old.ipv6_subnet)
        except EtcdTrouble:
            return False  # revoked after the next acquisition instead
        if current is None or current.lease_id != old.lease_id:
            return await self._revoke(old.lease_id)
        return False

    async def _revoke(self, lease_id: int) -> bool:
        """Give an etcd lease back; True if etcd took it (else it expires by itself)."""
        try:
            await self.registry.revoke(lease_id)
        except EtcdTrouble as e:
            log.warning("cannot revoke etcd lease %x (it expires by itself): %s", lease_id, e)
            return False
        log.info("revoked etcd lease %x, which no longer holds our key", lease_id)
        return True

    async def republish(self, attrs: LeaseAttrs) -> None:
        """Publish changed attributes (a new VtepMAC, a new PublicIP) on the lease we hold.
        Until it is done, a listing that shows our key in its old form is no loss."""
        self.attrs = attrs
        self._publishing += 1
        try:
            await self._republish(attrs)
        finally:
            self._publishing -= 1

    async def _republish(self, attrs: LeaseAttrs) -> None:
        backoff = Backoff(0.5, 5.0)
        for _attempt in range(10):
            lease = self.lease
            if lease is None or self._lost.is_set():
                return  # re-acquiring publishes self.attrs anyway
            try:
                await self.registry.put_lease(lease.subnet, attrs, lease.lease_id,
                                              ipv6_subnet=lease.ipv6_subnet)
            except EtcdTrouble as e:
                self._errors.error("publish", "cannot publish lease attributes: %s", e)
                await asyncio.sleep(backoff.next())
                continue
            if self.lease is lease:
                self.lease = replace(lease, attrs=attrs)
                self._epoch += 1
            log.info("published new lease attributes for %s", describe(lease))
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
        """A lease to program as a peer: not ours, and routable with this config.

        Each family the lease has and the config enables must fit that family's network and
        subnet length; a family the config does not enable is left to nobody (a dual-stack
        peer in an IPv4-only cluster is an IPv4 peer), and a lease without any enabled
        family (an IPv6-only key, subnet 0.0.0.0/0, in an IPv4-only cluster) is no peer.
        """
        own = self.lease
        if own is not None and lease.key_name == own.key_name:
            return False
        if self._names_us(lease):
            # Our own new key seen before we recorded it, or a stale or mistyped lease for
            # our address: never a peer (it would route our traffic to ourselves).
            if own is not None:
                self._warn.warn(("own-address", lease.key_name), "lease %s names this node's "
                                "address %s but is not our lease (%s); not programmed",
                                lease.key_name, self._our_address(), own.key_name)
            return False
        v4 = self.cfg.ipv4 is not None and lease.has_ipv4
        v6 = self.cfg.ipv6 is not None and lease.has_ipv6
        if (not v4 and not v6) or (v4 and not _fits(self.cfg.ipv4, lease.subnet)) or (
                v6 and not _fits(self.cfg.ipv6, lease.ipv6_subnet)):
            self._warn.warn(("outside", lease.key_name), "peer lease %s lies outside the "
                            "network config; ignored", lease.key_name)
            return False
        return True

    async def _apply(self, table: dict[str, Lease]) -> None:
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
        if own is not None and epoch == self._epoch and not self._publishing and not any(
            lease.key_name == own.key_name and self._names_us(lease)
            for lease in listing.leases
        ):
            self.lease_lost()
        table = {lease.key_name: lease for lease in listing.leases
                 if self._usable_peer(lease)}
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
                async with contextlib.aclosing(batches(events)) as stream:
                    async for batch in stream:
                        await self._on_events(batch)
            except WatchCompacted as e:
                log.warning("watch revision compacted (%s); listing leases again", e)
                continue
            except EtcdTrouble as e:
                self._errors.error("watch", "lease watch interrupted: %s", e)
            await asyncio.sleep(backoff.next())

    async def _on_events(self, batch: list[WatchEvent]) -> None:
        """Apply every event that arrived together as one change of the table: a range
        delete of N keys is one diff and one backend commit, not N of each over a table
        of N (which took minutes for a thousand host-gw peers)."""
        table = dict(self.peers)
        for ev in batch:
            self._take_event(ev, table)
        await self._apply(table)

    def _take_event(self, ev: WatchEvent, table: dict[str, Lease]) -> None:
        if ev.rejected is not None:
            self._report_rejected([ev.rejected])
        name = ev.key_name
        if name is None:
            return
        own = self.lease
        if own is not None and name == own.key_name:
            if ev.lease is None or not self._names_us(ev.lease):
                self.lease_lost("own lease key was deleted" if ev.rejected is None and
                                ev.lease is None else "own lease key was taken over")
            return
        if ev.lease is None and ev.rejected is None:
            self._pool_changed.set()
        if ev.lease is not None and self._usable_peer(ev.lease):
            table[name] = ev.lease
        else:
            table.pop(name, None)


async def batches(events: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """The items of ``events`` in lists of all that arrived while the last list was being
    handled. A reader task keeps taking items meanwhile, so a burst (one etcd response of a
    thousand deletes, or changes trickling in during a slow commit) becomes one list; an
    error from ``events`` is raised after the items that came before it."""
    pending: deque[T] = deque()
    arrived = asyncio.Event()
    ended: list[BaseException] = []

    async def read() -> None:
        try:
            async for item in events:
                pending.append(item)
                arrived.set()
        except Exception as e:  # noqa: BLE001 - handed to the consumer, in order
            ended.append(e)
        else:
            ended.append(StopAsyncIteration())
        arrived.set()

    reader = asyncio.create_task(read(), name="watch-reader")
    try:
        while True:
            if pending:
                batch = list(pending)
                pending.clear()
                yield batch
            elif ended:
                if isinstance(ended[0], StopAsyncIteration):
                    return
                raise ended[0]
            else:
                arrived.clear()
                await arrived.wait()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def describe(lease: Lease) -> str:
    """A lease's subnets for a log line: ``10.1.5.0/24``, ``10.1.5.0/24 + fc00:..::/64``."""
    parts = [str(lease.subnet)] if lease.has_ipv4 else []
    if lease.ipv6_subnet is not None:
        parts.append(str(lease.ipv6_subnet))
    return " + ".join(parts)


def _fits(pool, subnet) -> bool:
    return (pool is not None and subnet is not None and subnet.version == pool.version
            and subnet.prefixlen == pool.subnet_len and subnet.subnet_of(pool.network))


def _clock(when: float) -> str:
    """A wall-clock time (UTC) for a log line."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())[:300]
