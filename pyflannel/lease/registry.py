"""What every lease registry offers (etcd, or the in-memory one the tests use).

The manager talks to a :class:`Registry`; :mod:`.etcd` implements it over aetcd and
:mod:`.memory` in a dict. Both turn raw keys and values into leases with the same
functions here, so a malformed, oversized or foreign value is judged the same way whichever
registry it came from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Protocol

from pyflannel.lease.model import Lease, LeaseAttrs, LeaseFormatError, parse_subnet_key

# A lease value is ~200 bytes; anything this large is a mistake or an attack.
MAX_LEASE_VALUE = 64 * 1024


class EtcdUnavailable(ConnectionError):
    """No endpoint answered; the caller retries with back-off."""


class EtcdAuthError(PermissionError):
    """etcd refused our credentials: retrying will not help until an operator acts."""


class WatchCompacted(RuntimeError):
    """The watch start revision was compacted away: list again, then watch anew."""


@dataclass(frozen=True)
class RawKV:
    """One key as a registry stores it, before any parsing."""

    key: bytes
    value: bytes
    lease_id: int = 0
    mod_revision: int = 0


@dataclass(frozen=True)
class Rejected:
    """A key under ``subnets/`` that is not a usable lease, and why.

    ``subnet`` is set when the key names a subnet but its value is unusable: that subnet
    still counts as taken (the key exists, so nobody else can create it).
    """

    key: str
    reason: str
    subnet: IPv4Network | None = None


@dataclass(frozen=True)
class WatchEvent:
    """A change under ``<prefix>/subnets/``.

    ``lease`` is set for a usable put; ``rejected`` for a key or value we cannot use; both
    are None for a delete of ``subnet``.
    """

    subnet: IPv4Network | None
    lease: Lease | None
    revision: int
    rejected: Rejected | None = None


@dataclass(frozen=True)
class Listing:
    leases: list[Lease]
    revision: int
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def malformed(self) -> list[tuple[str, str]]:
        """(key, reason) of every key that is not a usable lease."""
        return [(r.key, r.reason) for r in self.rejected]

    @property
    def occupied(self) -> set[IPv4Network]:
        """Every subnet whose key exists, whatever its value."""
        taken = {lease.subnet for lease in self.leases}
        taken.update(r.subnet for r in self.rejected if r.subnet is not None)
        return taken


def decode(kv: RawKV) -> Lease | Rejected:
    """A stored key as a lease, or the reason it is not one."""
    key = kv.key.decode(errors="replace")
    try:
        subnet = parse_subnet_key(key)
    except LeaseFormatError as e:
        return Rejected(key, str(e))
    if len(kv.value) > MAX_LEASE_VALUE:
        return Rejected(key, f"value is {len(kv.value)} bytes, far larger than any lease",
                        subnet)
    try:
        attrs = LeaseAttrs.from_json(kv.value)
    except LeaseFormatError as e:
        return Rejected(key, str(e), subnet)
    return Lease(subnet, attrs, lease_id=kv.lease_id, mod_revision=kv.mod_revision)


def build_listing(kvs: Iterable[RawKV], revision: int) -> Listing:
    leases: list[Lease] = []
    rejected: list[Rejected] = []
    for kv in kvs:
        got = decode(kv)
        (leases if isinstance(got, Lease) else rejected).append(got)
    return Listing(leases, revision, rejected)


def event_for(kv: RawKV, deleted: bool) -> WatchEvent:
    """The watch event for a put (``deleted`` False) or delete of ``kv.key``."""
    if not deleted:
        got = decode(kv)
        if isinstance(got, Lease):
            return WatchEvent(got.subnet, got, kv.mod_revision)
        return WatchEvent(got.subnet, None, kv.mod_revision, got)
    key = kv.key.decode(errors="replace")
    try:
        return WatchEvent(parse_subnet_key(key), None, kv.mod_revision)
    except LeaseFormatError as e:
        return WatchEvent(None, None, kv.mod_revision, Rejected(key, str(e)))


class Registry(Protocol):
    """The lease operations the life cycle needs; each raises EtcdUnavailable or
    EtcdAuthError, nothing else, on failure."""

    errors: int

    async def get_config(self) -> bytes | None: ...

    def watch_config(self) -> AsyncIterator[bytes | None]: ...

    async def list_leases(self) -> Listing: ...

    async def get_lease(self, subnet: IPv4Network) -> Lease | None: ...

    async def create(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> Lease | None: ...

    async def reclaim(self, existing: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None: ...

    async def refresh(self, lease_id: int) -> int: ...

    async def revoke(self, lease_id: int) -> None: ...

    async def put_lease(self, subnet: IPv4Network, attrs: LeaseAttrs,
                        lease_id: int = 0) -> None: ...

    async def watch(self, start_revision: int) -> AsyncIterator[WatchEvent]: ...

    async def close(self) -> None: ...
