"""Pure lease policy: which subnet to take, when to renew, how the peer table changes.

Nothing here does I/O, so every decision is tested without etcd (the idea of Faucet's
``valve.py``): the etcd layer gathers facts, asks this module, and carries out the answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyflannel.config import NetworkConfig, SubnetPool
from pyflannel.lease.model import NO_IPV4_SUBNET, Lease, lease_key_name

LEASE_TTL_S = 24 * 3600
RENEW_RETRY_S = 60.0

IPNetwork = IPv4Network | IPv6Network


class SubnetPoolExhausted(RuntimeError):
    """Every subnet between SubnetMin and SubnetMax (of one family) is held by some node."""


@dataclass(frozen=True)
class Choice:
    """The acquisition decision: adopt an existing key of ours, or create a new one.

    ``subnet`` is NO_IPV4_SUBNET when IPv4 is off (IPv6-only); ``ipv6_subnet`` is None
    when IPv6 is off. ``stale`` lists keys that name us but no longer fit the config
    (another family set, another pool): flanneld deletes those before taking a new key,
    so their subnets can be reused and peers never see two keys for one node.
    """

    subnet: IPv4Network
    existing: Lease | None = None  # set when re-claiming a key that already names us
    ipv6_subnet: IPv6Network | None = None
    stale: tuple[Lease, ...] = ()

    @property
    def reason(self) -> str:
        return "existing lease for this address" if self.existing else "free subnet"

    @property
    def key_name(self) -> str:
        return lease_key_name(self.subnet, self.ipv6_subnet)


def names_us(cfg: NetworkConfig, lease: Lease, public_ip: IPv4Address,
             public_ipv6: IPv6Address | None) -> bool:
    """Whether ``lease`` was written by this node, judged by its public address.

    With IPv4 on, PublicIP decides (as in flanneld). IPv6-only nodes all publish PublicIP
    0.0.0.0, so there PublicIPv6 decides: flanneld v0.20.2 compares PublicIP even then and
    hands one lease to every IPv6-only node.
    """
    if cfg.enable_ipv4:
        return lease.attrs.public_ip == public_ip
    return public_ipv6 is not None and lease.attrs.public_ipv6 == public_ipv6


def fits_config(cfg: NetworkConfig, lease: Lease) -> bool:
    """A lease of ours is reusable only with exactly the config's families, each in its pool."""
    if lease.has_ipv4 != cfg.enable_ipv4 or lease.has_ipv6 != cfg.enable_ipv6:
        return False
    if cfg.ipv4 is not None and not cfg.ipv4.contains_subnet(lease.subnet):
        return False
    return cfg.ipv6 is None or cfg.ipv6.contains_subnet(lease.ipv6_subnet)


def choose_subnet(
    cfg: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
    occupied: Iterable[IPNetwork] = (),
    *,
    public_ipv6: IPv6Address | None = None,
    previous_ipv6: IPv6Network | None = None,
) -> Choice:
    """flanneld's acquisition order, for each enabled family.

    1. a key that already names us (see :func:`names_us`) and fits the config (a restart);
       reservations (keys without TTL) win over ordinary leases;
    2. else, per family, the subnet from our last subnet file, if free and still valid;
    3. else, per family, a random free subnet between SubnetMin and SubnetMax.

    ``occupied`` names subnets (of either family) whose keys exist but hold no usable lease
    (a malformed or oversized value): nobody can create them, so they count as taken.
    """
    leases = list(leases)
    rng = rng or random.SystemRandom()
    mine = [lease for lease in leases if names_us(cfg, lease, public_ip, public_ipv6)]
    ours = [lease for lease in mine if fits_config(cfg, lease)]
    if ours:
        ours.sort(key=lambda lease: (not lease.reserved, -lease.mod_revision))
        return Choice(ours[0].subnet, existing=ours[0], ipv6_subnet=ours[0].ipv6_subnet)
    # Keys of ours that no longer fit are deleted first (reservations are the operator's).
    stale = tuple(lease for lease in mine if not lease.reserved)
    stale_keys = {lease.key_name for lease in stale}
    live = [lease for lease in leases if lease.key_name not in stale_keys]
    taken: set[IPNetwork] = set(occupied)
    for lease in live:
        if lease.has_ipv4:
            taken.add(lease.subnet)
        if lease.ipv6_subnet is not None:
            taken.add(lease.ipv6_subnet)
    subnet: IPv4Network = NO_IPV4_SUBNET
    ipv6_subnet: IPv6Network | None = None
    if cfg.ipv4 is not None:
        subnet = _pick(cfg.ipv4, previous, taken, rng)  # type: ignore[assignment]
    if cfg.ipv6 is not None:
        ipv6_subnet = _pick(cfg.ipv6, previous_ipv6, taken, rng)  # type: ignore[assignment]
    return Choice(subnet, ipv6_subnet=ipv6_subnet, stale=stale)


def _pick(pool: SubnetPool, previous: IPNetwork | None, taken: set[IPNetwork],
          rng: random.Random) -> IPNetwork:
    if previous is not None and previous not in taken and pool.contains_subnet(previous):
        return previous
    return random_free_subnet(pool, taken, rng)


def random_free_subnet(pool: SubnetPool, taken: set[IPNetwork],
                       rng: random.Random) -> IPNetwork:
    """Pick uniformly among one family's free subnets without listing a huge pool (a /8 of
    /30s, or a /32 of IPv6 /64s); SubnetPoolExhausted names the family when none is free."""
    total = pool.subnet_count()
    in_pool = sum(1 for s in taken if pool.contains_subnet(s))
    if in_pool >= total:
        field = "Network" if pool.version == 4 else "IPv6Network"
        raise SubnetPoolExhausted(
            f"no free subnet: all {total} subnets between {pool.subnet_min} and "
            f"{pool.subnet_max} are leased (IPv{pool.version} pool, {field} {pool.network})"
        )
    # Sampling is fast while the pool is mostly free; fall back to a scan when it is crowded
    # (then the pool is small: it holds little more than the keys that exist).
    for _ in range(64):
        candidate = pool.nth_subnet(rng.randrange(total))
        if candidate not in taken:
            return candidate
    if total <= 1 << 20:
        free = [i for i in range(total) if pool.nth_subnet(i) not in taken]
        return pool.nth_subnet(rng.choice(free))
    start = rng.randrange(total)
    for k in range(total):
        candidate = pool.nth_subnet((start + k) % total)
        if candidate not in taken:
            return candidate
    raise SubnetPoolExhausted(f"no free subnet in {pool.network}")  # unreachable


def renew_delay(expires_at: float, now: float, margin_s: float) -> float:
    """Seconds until the lease should be renewed: at expiry minus the margin, never < 0."""
    return max(0.0, expires_at - margin_s - now)


@dataclass(frozen=True)
class PeerDiff:
    added: tuple[Lease, ...]
    removed: tuple[Lease, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff_peers(old: Mapping[str, Lease], new: Mapping[str, Lease]) -> PeerDiff:
    """What changed between two peer tables (keyed by ``Lease.key_name``); a changed lease
    is a removal plus an addition."""
    removed = [lease for k, lease in old.items() if k not in new or new[k].attrs != lease.attrs]
    added = [lease for k, lease in new.items() if k not in old or old[k].attrs != lease.attrs]
    return PeerDiff(tuple(sorted(added, key=_order)), tuple(sorted(removed, key=_order)))


def _order(lease: Lease) -> tuple[int, int]:
    v6 = lease.ipv6_subnet
    return int(lease.subnet.network_address), int(v6.network_address) if v6 else -1
