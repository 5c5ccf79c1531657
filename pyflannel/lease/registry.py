"""What every lease registry offers (etcd, or the in-memory one the tests use).

The manager talks to a :class:`Registry`; :mod:`.etcd` implements it over aetcd and
:mod:`.memory` in a dict. Both turn raw keys and values into leases with the same
functions here, so a malformed, oversized or foreign value is judged the same way whichever
registry it came from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from pyflannel.lease.model import (
    NO_IPV4_SUBNET,
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    lease_key_name,
    parse_lease_key,
)

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

    ``subnet``/``ipv6_subnet``/``key_name`` are set when the key names subnets but its
    value is unusable: those subnets still count as taken (the key exists, so nobody else
    can create it). ``key_name`` tells apart IPv6-only keys, which all have the IPv4
    subnet 0.0.0.0/0.
    """

    key: str
    reason: str
    subnet: IPv4Network | None = None
    ipv6_subnet: IPv6Network | None = None
    key_name: str | None = None

    @property
    def subnets(self) -> list[IPv4Network | IPv6Network]:
        """The real subnets this key occupies (not the IPv6-only placeholder 0.0.0.0/0)."""
        out: list[IPv4Network | IPv6Network] = []
        if self.subnet is not None and self.subnet != NO_IPV4_SUBNET:
            out.append(self.subnet)
        if self.ipv6_subnet is not None:
            out.append(self.ipv6_subnet)
        return out


@dataclass(frozen=True)
class WatchEvent:
    """A change under ``<prefix>/subnets/``.

    ``lease`` is set for a usable put; ``rejected`` for a key or value we cannot use; both
    are None for a delete of the key ``key_name`` (subnets ``subnet``/``ipv6_subnet``).
    Tables of leases are keyed by ``key_name``: IPv6-only keys share ``subnet`` 0.0.0.0/0.
    """

    subnet: IPv4Network | None
    lease: Lease | None
    revision: int
    rejected: Rejected | None = None
    key_name: str | None = None
    ipv6_subnet: IPv6Network | None = None


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
    def occupied(self) -> set[IPv4Network | IPv6Network]:
        """Every subnet, of either family, whose key exists, whatever its value.

        IPv4 and IPv6 networks never compare equal, so one set serves both families; the
        IPv6-only placeholder 0.0.0.0/0 is left out (it is no subnet anybody holds).
        """
        taken: set[IPv4Network | IPv6Network] = set()
        for lease in self.leases:
            if lease.has_ipv4:
                taken.add(lease.subnet)
            if lease.ipv6_subnet is not None:
                taken.add(lease.ipv6_subnet)
        for r in self.rejected:
            taken.update(r.subnets)
        return taken

    def occupied_in(self, version: int) -> set[IPv4Network | IPv6Network]:
        """The occupied subnets of one address family (4 or 6)."""
        return {s for s in self.occupied if s.version == version}


def _rejected(key: str, reason: str, subnet: IPv4Network | None = None,
              ipv6_subnet: IPv6Network | None = None) -> Rejected:
    name = lease_key_name(subnet, ipv6_subnet) if subnet is not None else None
    return Rejected(key, reason, subnet, ipv6_subnet, name)


def decode(kv: RawKV) -> Lease | Rejected:
    """A stored key as a lease, or the reason it is not one (any of flanneld's three key
    layouts: IPv4, dual-stack ``a.b.c.d-n&v6-m`` and IPv6-only ``0.0.0.0-0&v6-m``)."""
    key = kv.key.decode(errors="replace")
    try:
        subnet, ipv6_subnet = parse_lease_key(key)
    except LeaseFormatError as e:
        return Rejected(key, str(e))
    if len(kv.value) > MAX_LEASE_VALUE:
        return _rejected(key, f"value is {len(kv.value)} bytes, far larger than any lease",
                         subnet, ipv6_subnet)
    try:
        attrs = LeaseAttrs.from_json(kv.value)
    except LeaseFormatError as e:
        return _rejected(key, str(e), subnet, ipv6_subnet)
    return Lease(subnet, attrs, lease_id=kv.lease_id, mod_revision=kv.mod_revision,
                 ipv6_subnet=ipv6_subnet)


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
            return WatchEvent(got.subnet, got, kv.mod_revision, key_name=got.key_name,
                              ipv6_subnet=got.ipv6_subnet)
        return WatchEvent(got.subnet, None, kv.mod_revision, got, key_name=got.key_name,
                          ipv6_subnet=got.ipv6_subnet)
    key = kv.key.decode(errors="replace")
    try:
        subnet, ipv6_subnet = parse_lease_key(key)
    except LeaseFormatError as e:
        return WatchEvent(None, None, kv.mod_revision, Rejected(key, str(e)))
    return WatchEvent(subnet, None, kv.mod_revision, key_name=lease_key_name(subnet, ipv6_subnet),
                      ipv6_subnet=ipv6_subnet)


class Registry(Protocol):
    """The lease operations the life cycle needs; each raises EtcdUnavailable or
    EtcdAuthError, nothing else, on failure."""

    errors: int

    async def get_config(self) -> bytes | None: ...

    def watch_config(self) -> AsyncIterator[bytes | None]: ...

    async def list_leases(self) -> Listing: ...

    async def get_lease(self, subnet: IPv4Network,
                        ipv6_subnet: IPv6Network | None = None) -> Lease | None: ...

    async def create(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                     ipv6_subnet: IPv6Network | None = None) -> Lease | None: ...

    async def reclaim(self, existing: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None: ...

    async def refresh(self, lease_id: int) -> int: ...

    async def revoke(self, lease_id: int) -> None: ...

    async def put_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, lease_id: int = 0,
                        ipv6_subnet: IPv6Network | None = None) -> None: ...

    async def delete_if_unchanged(self, lease: Lease) -> bool: ...

    async def watch(self, start_revision: int) -> AsyncIterator[WatchEvent]: ...

    async def close(self) -> None: ...
