"""An in-memory lease registry with the etcd adapter's interface, for tests of the life cycle.

It keeps etcd's semantics that the manager relies on (revisions, create-if-absent
transactions, leases that take their keys with them, watches from a revision, compaction)
and lets a test break it at any await point: queue a failure for an operation (before it
takes effect, or after, as when etcd commits and the answer is lost on the way back), run a
callback just before an operation takes effect, take the whole store down, or break the
watches. The idea is flannel's mock registry and Faucet's fake tables: the races live in the
life cycle, so the life cycle is driven deterministically, in milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network

from pyflannel.lease.model import Lease, LeaseAttrs, config_key, subnet_key, subnets_prefix
from pyflannel.lease.registry import (
    EtcdUnavailable,
    Listing,
    RawKV,
    WatchCompacted,
    WatchEvent,
    build_listing,
    decode,
    event_for,
)

Hook = Callable[[], Awaitable[None] | None]


class MemoryRegistry:
    """A dict behaving like the etcd keyspace under one network prefix."""

    def __init__(self, prefix: str = "/coreos.com/network") -> None:
        self.prefix = prefix.rstrip("/")
        self.revision = 1
        self.compacted = 0
        self.kvs: dict[bytes, RawKV] = {}
        self.lease_ttl: dict[int, int] = {}  # etcd lease id -> TTL granted
        self.history: list[tuple[RawKV, bool]] = []  # (kv, deleted) by revision order
        self.errors = 0
        self.down = False
        self.calls: dict[str, int] = defaultdict(int)
        self._ids = itertools.count(0x1000)
        self._failures: dict[str, deque[BaseException]] = defaultdict(deque)
        self._lost_answers: dict[str, deque[BaseException]] = defaultdict(deque)
        self._hooks: dict[str, deque[Hook]] = defaultdict(deque)
        self._watchers: list[asyncio.Queue] = []
        self.endpoint = "memory://"

    # -- test controls -----------------------------------------------------------------

    def fail(self, op: str, exc: BaseException, times: int = 1) -> None:
        """The next ``times`` calls of ``op`` raise ``exc`` (after their await point)."""
        self._failures[op].extend([exc] * times)

    def fail_after(self, op: str, exc: BaseException, times: int = 1) -> None:
        """The next ``times`` calls of ``op`` take effect, then raise ``exc``: the caller
        cannot tell whether its write happened."""
        self._lost_answers[op].extend([exc] * times)

    def before(self, op: str, hook: Hook) -> None:
        """Run ``hook`` once, at the await point just before the next ``op`` takes effect."""
        self._hooks[op].append(hook)

    def put_raw(self, key: str | bytes, value: str | bytes, lease_id: int = 0) -> int:
        """Write any key and value, as another node or an operator could."""
        k = key.encode() if isinstance(key, str) else key
        v = value.encode() if isinstance(value, str) else value
        return self._put(k, v, lease_id)

    def put_lease_raw(self, subnet: IPv4Network, attrs: LeaseAttrs, lease_id: int = 0,
                      ipv6_subnet: IPv6Network | None = None) -> int:
        return self.put_raw(subnet_key(self.prefix, subnet, ipv6_subnet), attrs.to_json(),
                            lease_id)

    def delete_raw(self, key: str | bytes) -> bool:
        k = key.encode() if isinstance(key, str) else key
        return self._delete(k)

    def delete_range_raw(self, prefix: str | bytes) -> int:
        """Delete every key under ``prefix`` in one revision, as one etcd range delete
        does: watchers get all the events at once. Returns how many keys went."""
        p = prefix.encode() if isinstance(prefix, str) else prefix
        keys = [k for k in self.kvs if k.startswith(p)]
        if keys:
            self.revision += 1
            for k in keys:
                del self.kvs[k]
                self._publish(RawKV(k, b"", 0, self.revision), deleted=True)
        return len(keys)

    def expire(self, lease_id: int) -> None:
        """The etcd lease runs out: its keys go with it."""
        self.lease_ttl.pop(lease_id, None)
        for key in [k for k, kv in self.kvs.items() if kv.lease_id == lease_id]:
            self._delete(key)

    def break_watches(self, exc: BaseException | None = None) -> None:
        for q in list(self._watchers):
            q.put_nowait(exc or EtcdUnavailable("memory registry: watch broken"))

    def compact(self) -> None:
        self.compacted = self.revision

    def lease_of(self, subnet: IPv4Network,
                 ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        got = self.kvs.get(subnet_key(self.prefix, subnet, ipv6_subnet).encode())
        lease = decode(got) if got is not None else None
        return lease if isinstance(lease, Lease) else None

    def live_leases(self) -> set[int]:
        return set(self.lease_ttl)

    def orphaned_leases(self) -> set[int]:
        """etcd leases that hold no key: what a careless node leaves behind for a day."""
        held = {kv.lease_id for kv in self.kvs.values()}
        return self.live_leases() - held

    # -- the store ---------------------------------------------------------------------

    def _put(self, key: bytes, value: bytes, lease_id: int) -> int:
        self.revision += 1
        kv = RawKV(key, value, lease_id, self.revision)
        self.kvs[key] = kv
        self._publish(kv, deleted=False)
        return self.revision

    def _delete(self, key: bytes) -> bool:
        if key not in self.kvs:
            return False
        self.revision += 1
        del self.kvs[key]
        self._publish(RawKV(key, b"", 0, self.revision), deleted=True)
        return True

    def _publish(self, kv: RawKV, deleted: bool) -> None:
        self.history.append((kv, deleted))
        if kv.key.startswith(subnets_prefix(self.prefix).encode()):
            for q in self._watchers:
                q.put_nowait(event_for(kv, deleted))

    async def _enter(self, op: str) -> None:
        """Every operation is an await point where a test may interleave or fail it."""
        self.calls[op] += 1
        await asyncio.sleep(0)
        while self._hooks[op]:
            result = self._hooks[op].popleft()()
            if asyncio.iscoroutine(result):
                await result
        if self.down:
            self.errors += 1
            raise EtcdUnavailable("etcd unreachable (memory registry is down)")
        if self._failures[op]:
            self.errors += 1
            raise self._failures[op].popleft()

    def _answer(self, op: str) -> None:
        """After ``op`` took effect: its answer may still be lost."""
        if self._lost_answers[op]:
            self.errors += 1
            raise self._lost_answers[op].popleft()

    # -- the Registry interface --------------------------------------------------------

    async def get_config(self) -> bytes | None:
        await self._enter("get_config")
        kv = self.kvs.get(config_key(self.prefix).encode())
        return kv.value if kv is not None else None

    async def watch_config(self) -> AsyncIterator[bytes | None]:
        await self._enter("watch_config")
        await asyncio.Event().wait()  # config changes are not simulated
        yield None

    async def list_leases(self) -> Listing:
        await self._enter("list_leases")
        prefix = subnets_prefix(self.prefix).encode()
        kvs = [kv for k, kv in sorted(self.kvs.items()) if k.startswith(prefix)]
        return build_listing(kvs, self.revision)

    async def get_lease(self, subnet: IPv4Network,
                        ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        await self._enter("get_lease")
        return self.lease_of(subnet, ipv6_subnet)

    async def create(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                     ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        await self._enter("create")
        key = subnet_key(self.prefix, subnet, ipv6_subnet).encode()
        if key in self.kvs:
            return None
        lease_id = next(self._ids)
        self.lease_ttl[lease_id] = ttl
        rev = self._put(key, attrs.to_json().encode(), lease_id)
        self._answer("create")
        return Lease(subnet, attrs, lease_id=lease_id, mod_revision=rev,
                     ipv6_subnet=ipv6_subnet)

    async def reclaim(self, existing: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        await self._enter("reclaim")
        key = existing.key(self.prefix).encode()
        kv = self.kvs.get(key)
        if kv is None or kv.mod_revision != existing.mod_revision:
            return None
        lease_id = 0
        if not existing.reserved:
            lease_id = next(self._ids)
            self.lease_ttl[lease_id] = ttl
        rev = self._put(key, attrs.to_json().encode(), lease_id)
        if existing.lease_id:
            self.lease_ttl.pop(existing.lease_id, None)
        self._answer("reclaim")
        return replace(existing, attrs=attrs, lease_id=lease_id, mod_revision=rev)

    async def refresh(self, lease_id: int) -> int:
        await self._enter("refresh")
        self._answer("refresh")
        return self.lease_ttl.get(lease_id, 0)

    async def revoke(self, lease_id: int) -> None:
        await self._enter("revoke")
        self.expire(lease_id)
        self._answer("revoke")

    async def put_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, lease_id: int = 0,
                        ipv6_subnet: IPv6Network | None = None) -> None:
        await self._enter("put_lease")
        self.put_lease_raw(subnet, attrs, lease_id, ipv6_subnet)
        self._answer("put_lease")

    async def delete_if_unchanged(self, lease: Lease) -> bool:
        await self._enter("delete_if_unchanged")
        key = lease.key(self.prefix).encode()
        kv = self.kvs.get(key)
        if kv is None or kv.mod_revision != lease.mod_revision:
            return False
        deleted = self._delete(key)
        self._answer("delete_if_unchanged")
        return deleted

    async def watch(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        await self._enter("watch")
        if start_revision <= self.compacted:
            raise WatchCompacted(f"revision {start_revision} compacted")
        q: asyncio.Queue = asyncio.Queue()
        prefix = subnets_prefix(self.prefix).encode()
        for kv, deleted in self.history:
            if kv.mod_revision >= start_revision and kv.key.startswith(prefix):
                q.put_nowait(event_for(kv, deleted))
        self._watchers.append(q)
        return self._events(q)

    async def _events(self, q: asyncio.Queue) -> AsyncIterator[WatchEvent]:
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if q in self._watchers:
                self._watchers.remove(q)

    async def close(self) -> None:
        self.break_watches()
