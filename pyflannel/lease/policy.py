"""Pure lease policy: which subnet to take, when to renew, how the peer table changes.

Nothing here does I/O, so every decision is tested without etcd (the idea of Faucet's
``valve.py``): the etcd layer gathers facts, asks this module, and carries out the answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyflannel.config import NetworkConfig
from pyflannel.lease.model import Lease

LEASE_TTL_S = 24 * 3600
RENEW_RETRY_S = 60.0


class SubnetPoolExhausted(RuntimeError):
    """Every subnet between SubnetMin and SubnetMax is held by some node."""


@dataclass(frozen=True)
class Choice:
    """The acquisition decision: adopt an existing key of ours, or create a new one."""

    subnet: IPv4Network
    existing: Lease | None = None  # set when re-claiming a key that already names us

    @property
    def reason(self) -> str:
        return "existing lease for this address" if self.existing else "free subnet"


def choose_subnet(
    cfg: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
    occupied: Iterable[IPv4Network] = (),
) -> Choice:
    """flanneld's acquisition order.

    1. a key that already carries our PublicIP and still fits the config (a restart);
       reservations (keys without TTL) win over ordinary leases;
    2. else the subnet from our last subnet file, if free and still valid;
    3. else a random free subnet between SubnetMin and SubnetMax.

    ``occupied`` names subnets whose keys exist but hold no usable lease (a malformed or
    oversized value): nobody can create them, so they count as taken.
    """
    leases = list(leases)
    taken = {lease.subnet for lease in leases} | set(occupied)
    ours = [
        lease for lease in leases
        if lease.attrs.public_ip == public_ip and cfg.contains_subnet(lease.subnet)
    ]
    if ours:
        ours.sort(key=lambda lease: (not lease.reserved, -lease.mod_revision))
        return Choice(ours[0].subnet, existing=ours[0])
    if previous is not None and previous not in taken and cfg.contains_subnet(previous):
        return Choice(previous)
    return Choice(random_free_subnet(cfg, taken, rng or random.SystemRandom()))


def random_free_subnet(
    cfg: NetworkConfig, taken: set[IPv4Network], rng: random.Random
) -> IPv4Network:
    """Pick uniformly among free subnets without listing a huge pool (a /8 of /30s)."""
    total = cfg.subnet_count()
    in_pool = sum(1 for s in taken if cfg.contains_subnet(s))
    if in_pool >= total:
        raise SubnetPoolExhausted(
            f"no free subnet: all {total} subnets between {cfg.subnet_min} and "
            f"{cfg.subnet_max} are leased"
        )
    # Sampling is fast while the pool is mostly free; fall back to a scan when it is crowded.
    for _ in range(64):
        candidate = cfg.nth_subnet(rng.randrange(total))
        if candidate not in taken:
            return candidate
    free = [i for i in range(total) if cfg.nth_subnet(i) not in taken]
    return cfg.nth_subnet(rng.choice(free))


def renew_delay(expires_at: float, now: float, margin_s: float) -> float:
    """Seconds until the lease should be renewed: at expiry minus the margin, never < 0."""
    return max(0.0, expires_at - margin_s - now)


@dataclass(frozen=True)
class PeerDiff:
    added: tuple[Lease, ...]
    removed: tuple[Lease, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff_peers(old: Mapping[IPv4Network, Lease], new: Mapping[IPv4Network, Lease]) -> PeerDiff:
    """What changed between two peer tables; a changed lease is a removal plus an addition."""
    removed = [lease for s, lease in old.items() if s not in new or new[s].attrs != lease.attrs]
    added = [lease for s, lease in new.items() if s not in old or old[s].attrs != lease.attrs]
    key = lambda lease: int(lease.subnet.network_address)  # noqa: E731
    return PeerDiff(tuple(sorted(added, key=key)), tuple(sorted(removed, key=key)))
