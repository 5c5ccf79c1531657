"""Adj-RIB-In and Loc-RIB with the import policy, route reflection and graceful restart: pure.

What it decides, and nothing else touches:

* **Import.** Only prefixes inside the Network(s), of exactly the subnet length, never this
  node's own subnet, from a path without loops and with a usable next hop. Every refused prefix
  is counted by reason and ignored; one bad prefix never costs the others of its UPDATE.
* **Selection.** Higher LOCAL_PREF, shorter AS_PATH, lower ORIGIN, lower MED, eBGP before
  iBGP, shorter CLUSTER_LIST. Every path that ties on all of these is kept: their next hops
  form the prefix's ECMP route. A lone best path, for reflecting, is then the one from the
  lowest originator identifier, then the lowest peer address.
* **Export.** Everybody gets this node's own subnets. A route reflector (RFC 4456) reflects
  what clients sent to every iBGP peer, and what non-clients sent to clients only, adding
  ORIGINATOR_ID and its cluster to CLUSTER_LIST. Nothing learned is ever sent to an eBGP peer
  and a node that does not reflect sends nothing learned at all: nodes are not transit routers.
* **Graceful restart** (RFC 4724, helper). A peer's routes are marked stale when its session
  ends gracefully, kept for forwarding, replaced as it announces them again, and swept at its
  End-of-RIB for a family or when its restart time runs out (the session layer's timer).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .attributes import (
    AFI_IPV6,
    DEFAULT_OPTIONS,
    IPV4_UNICAST,
    IPV6_UNICAST,
    CodecOptions,
    MpReach,
    PathAttributes,
    Prefix,
    as_path_contains,
    as_path_length,
    prepend_as,
)
from .messages import GracefulRestart, Update, announce

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_LOCAL_PREF = 100

# Reasons a prefix is refused (metric labels; keep them stable).
OUTSIDE_NETWORK = "outside_network"
WRONG_LENGTH = "wrong_length"
OWN_SUBNET = "own_subnet"
AS_PATH_LOOP = "as_path_loop"
ORIGINATOR_LOOP = "originator_is_us"
CLUSTER_LOOP = "cluster_list_loop"
BAD_NEXT_HOP = "bad_next_hop"
TREAT_AS_WITHDRAW = "treat_as_withdraw"


def family_of(prefix: Prefix) -> tuple[int, int]:
    return IPV4_UNICAST if prefix.version == 4 else IPV6_UNICAST


@dataclass(frozen=True, slots=True)
class ImportPolicy:
    """Which prefixes may be learned at all; ``own`` is this node's lease subnet(s)."""

    pools: tuple[tuple[Prefix, int], ...]  # (Network, SubnetLen) per family
    own: frozenset[Prefix] = frozenset()

    @classmethod
    def from_pools(cls, pools: Iterable, own: Iterable[Prefix] = ()) -> ImportPolicy:
        """From config.SubnetPool-like objects (``.network``, ``.subnet_len``)."""
        return cls(tuple((p.network, p.subnet_len) for p in pools), frozenset(own))

    def refuse(self, prefix: Prefix) -> str | None:
        """None if ``prefix`` may be learned, else the reason it may not."""
        if prefix in self.own:
            return OWN_SUBNET
        inside = [length for net, length in self.pools
                  if net.version == prefix.version and prefix.subnet_of(net)]
        if not inside:
            return OUTSIDE_NETWORK
        if prefix.prefixlen not in inside:
            return WRONG_LENGTH
        return None


@dataclass(frozen=True, slots=True)
class LocalSpeaker:
    """This node as a BGP speaker."""

    asn: int
    router_id: ipaddress.IPv4Address
    next_hops: tuple[Address, ...]  # this node's addresses: next hop self, one per family
    cluster_id: ipaddress.IPv4Address | None = None  # set: this node is a route reflector
    communities: tuple[int, ...] = ()

    def next_hop_for(self, prefix: Prefix) -> Address | None:
        return next((a for a in self.next_hops if a.version == prefix.version), None)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    key: str  # the session's name, e.g. the peer's address
    asn: int
    address: Address
    router_id: ipaddress.IPv4Address | None = None  # from its OPEN, once known
    rr_client: bool = False  # we are its route reflector
    keep_next_hop: bool = False  # eBGP: a reflector passes on learned routes, next hop kept


@dataclass(frozen=True, slots=True)
class Path:
    """One way to reach a prefix; ``attributes`` carry no NLRI and no next hop of their own."""

    prefix: Prefix
    next_hop: Address
    attributes: PathAttributes
    peer: str | None  # None: originated by this node
    ebgp: bool = False
    stale: bool = False
    peer_router_id: ipaddress.IPv4Address | None = None
    peer_address: Address | None = None

    def rank(self) -> tuple:
        """Lower is better; equal ranks share the prefix as ECMP."""
        a = self.attributes
        return (self.peer is not None,
                -(a.local_pref if a.local_pref is not None else DEFAULT_LOCAL_PREF),
                as_path_length(a.as_path), a.origin or 0, a.med or 0, not self.ebgp,
                len(a.cluster_list))

    def tie_break(self) -> tuple:
        origin = self.attributes.originator_id or self.peer_router_id
        return (int(origin) if origin else 0, int(self.peer_address) if self.peer_address else 0)


@dataclass(frozen=True, slots=True)
class Selected:
    """Loc-RIB entry: the best paths (ECMP), best first."""

    paths: tuple[Path, ...]

    @property
    def best(self) -> Path:
        return self.paths[0]

    @property
    def next_hops(self) -> frozenset[Address]:
        return frozenset(p.next_hop for p in self.paths)


@dataclass(frozen=True, slots=True)
class Export:
    """What one peer should be told about one prefix."""

    attributes: PathAttributes
    next_hop: Address


@dataclass
class PeerCounters:
    received: int = 0  # prefixes announced to us, all told
    refused: Counter = field(default_factory=Counter)


Changes = dict[Prefix, frozenset[Address] | None]  # new next hops, None: no route any more


class Rib:
    """The speaker's routing table; methods return what changed for the kernel."""

    def __init__(self, local: LocalSpeaker, policy: ImportPolicy) -> None:
        self.local, self.policy = local, policy
        self.peers: dict[str, PeerInfo] = {}
        self.adj_in: dict[str, dict[Prefix, Path]] = {}
        self.counters: dict[str, PeerCounters] = {}
        self.refused: Counter = Counter()  # by reason, all peers
        self._candidates: dict[Prefix, dict[str | None, Path]] = {}
        self.loc: dict[Prefix, Selected] = {}

    # -- peers

    def add_peer(self, peer: PeerInfo) -> None:
        """Add or update a peer (its router ID is known only once its OPEN arrived)."""
        self.peers[peer.key] = peer
        self.adj_in.setdefault(peer.key, {})
        self.counters.setdefault(peer.key, PeerCounters())

    def remove_peer(self, key: str) -> Changes:
        changes = self.drop_routes(key)
        self.peers.pop(key, None)
        self.adj_in.pop(key, None)
        self.counters.pop(key, None)
        return changes

    def _ebgp(self, peer: PeerInfo) -> bool:
        return peer.asn != self.local.asn

    # -- this node's own subnets

    def originate(self, prefix: Prefix) -> None:
        next_hop = self.local.next_hop_for(prefix)
        if next_hop is None:
            raise ValueError(f"no {prefix.version == 4 and 'IPv4' or 'IPv6'} next hop to "
                             f"announce {prefix} with")
        attrs = PathAttributes(origin=0, as_path=(), local_pref=DEFAULT_LOCAL_PREF,
                               communities=self.local.communities)
        self._put(Path(prefix, next_hop, attrs, None))
        self._select(prefix)

    def withdraw_local(self, prefix: Prefix) -> None:
        self._candidates.get(prefix, {}).pop(None, None)
        self._select(prefix)

    # -- learning

    def apply_update(self, key: str, update: Update) -> Changes:
        """Take in one UPDATE from peer ``key``: withdrawals first, then each announcement."""
        peer = self.peers[key]
        counters = self.counters[key]
        touched: set[Prefix] = set()
        for prefix in update.withdrawals():
            if self.adj_in[key].pop(prefix, None) is not None:
                self._candidates[prefix].pop(key, None)
                touched.add(prefix)
        announced = update.announcements()
        counters.received += len(announced)
        if update.treat_as_withdraw:
            mp = update.attributes.mp_reach
            malformed = len(update.nlri) + (len(mp.nlri) if mp else 0)
            counters.received += malformed
            self._refuse(counters, TREAT_AS_WITHDRAW, malformed)
        if announced:
            attrs = update.attributes
            path_refusal = self._path_refusal(peer, attrs)
            shared = replace(attrs, next_hop=None, mp_reach=None, mp_unreach=None)
            v4_hop = attrs.next_hop
            v6_hop = attrs.mp_reach.next_hop[0] if attrs.mp_reach else None
            mp_family = (attrs.mp_reach.afi, attrs.mp_reach.safi) if attrs.mp_reach else None
            mp_prefixes = set(attrs.mp_reach.nlri) if attrs.mp_reach else set()
            for prefix in announced:
                next_hop = v6_hop if prefix in mp_prefixes else v4_hop
                reason = path_refusal or self.policy.refuse(prefix) or self._next_hop_refusal(
                    next_hop, prefix, mp_family if prefix in mp_prefixes else IPV4_UNICAST)
                if reason is not None:
                    self._refuse(counters, reason)
                    # The new announcement replaces the old: a refused one leaves nothing.
                    if self.adj_in[key].pop(prefix, None) is not None:
                        self._candidates[prefix].pop(key, None)
                        touched.add(prefix)
                    continue
                assert next_hop is not None
                path = Path(prefix, next_hop, shared, key, self._ebgp(peer),
                            peer_router_id=peer.router_id, peer_address=peer.address)
                self.adj_in[key][prefix] = path
                self._put(path)
                touched.add(prefix)
        return self._reselect(touched)

    def _refuse(self, counters: PeerCounters, reason: str, count: int = 1) -> None:
        if count:
            counters.refused[reason] += count
            self.refused[reason] += count

    def _path_refusal(self, peer: PeerInfo, attrs: PathAttributes) -> str | None:
        if self._ebgp(peer) and as_path_contains(attrs.as_path, self.local.asn):
            return AS_PATH_LOOP
        if attrs.originator_id is not None and attrs.originator_id == self.local.router_id:
            return ORIGINATOR_LOOP
        if self.local.cluster_id is not None and self.local.cluster_id in attrs.cluster_list:
            return CLUSTER_LOOP
        return None

    def _next_hop_refusal(self, next_hop: Address | None, prefix: Prefix,
                          family: tuple[int, int] | None) -> str | None:
        if (next_hop is None or next_hop.version != prefix.version
                or family != family_of(prefix) or next_hop.is_unspecified
                or next_hop.is_multicast or next_hop.is_loopback
                or next_hop in self.local.next_hops):
            return BAD_NEXT_HOP
        return None

    # -- graceful restart (helper side)

    def mark_stale(self, key: str) -> None:
        """The peer's session ended gracefully: keep its routes, but as stale."""
        for prefix, path in list(self.adj_in.get(key, {}).items()):
            stale = replace(path, stale=True)
            self.adj_in[key][prefix] = stale
            self._candidates[prefix][key] = stale
            if prefix in self.loc:
                self.loc[prefix] = Selected(tuple(stale if p.peer == key else p
                                                  for p in self.loc[prefix].paths))

    def stale_count(self, key: str) -> int:
        return sum(p.stale for p in self.adj_in.get(key, {}).values())

    def peer_reestablished(self, key: str, capability: GracefulRestart | None) -> Changes:
        """RFC 4724 4.2: without the capability, or for a family whose forwarding state was
        not kept, the stale routes go at once; the others wait for End-of-RIB."""
        kept = {(f.afi, f.safi) for f in capability.families
                if f.forwarding_preserved} if capability else set()
        return self._sweep(key, lambda p: family_of(p.prefix) not in kept)

    def end_of_rib(self, key: str, family: tuple[int, int]) -> Changes:
        """The peer has sent all it has for ``family``: what is still stale is gone."""
        return self._sweep(key, lambda p: family_of(p.prefix) == family)

    def sweep_stale(self, key: str) -> Changes:
        """The peer's restart time ran out: all its stale routes go."""
        return self._sweep(key, lambda p: True)

    def drop_routes(self, key: str) -> Changes:
        """The session ended without graceful restart: every route of the peer goes."""
        routes = self.adj_in.get(key, {})
        touched = set(routes)
        for prefix in touched:
            self._candidates[prefix].pop(key, None)
        routes.clear()
        return self._reselect(touched)

    def _sweep(self, key: str, which) -> Changes:
        routes = self.adj_in.get(key, {})
        gone = [prefix for prefix, path in routes.items() if path.stale and which(path)]
        for prefix in gone:
            del routes[prefix]
            self._candidates[prefix].pop(key, None)
        return self._reselect(set(gone))

    # -- selection

    def _put(self, path: Path) -> None:
        self._candidates.setdefault(path.prefix, {})[path.peer] = path

    def _select(self, prefix: Prefix) -> bool:
        """Recompute one prefix; True if its next hops changed."""
        before = self.loc.get(prefix)
        paths = list(self._candidates.get(prefix, {}).values())
        if not paths:
            self._candidates.pop(prefix, None)
            self.loc.pop(prefix, None)
            return before is not None
        top = min(p.rank() for p in paths)
        best = sorted((p for p in paths if p.rank() == top), key=Path.tie_break)
        self.loc[prefix] = Selected(tuple(best))
        return before is None or before.next_hops != self.loc[prefix].next_hops or (
            before.best.peer is None) != (best[0].peer is None)

    def _reselect(self, touched: set[Prefix]) -> Changes:
        changes: Changes = {}
        for prefix in touched:
            if self._select(prefix):
                selected = self.loc.get(prefix)
                learned = selected is not None and selected.best.peer is not None
                changes[prefix] = selected.next_hops if learned else None
        return changes

    def routes(self) -> dict[Prefix, frozenset[Address]]:
        """Learned prefixes and their next hops: the kernel routes to have (never our own)."""
        return {prefix: sel.next_hops for prefix, sel in self.loc.items()
                if sel.best.peer is not None}

    # -- export

    def export(self, key: str) -> dict[Prefix, Export]:
        """Everything peer ``key`` should hold from us now (its whole Adj-RIB-Out)."""
        peer = self.peers[key]
        ebgp = self._ebgp(peer)
        out: dict[Prefix, Export] = {}
        for prefix, selected in self.loc.items():
            best = selected.best
            if best.peer is None:
                out[prefix] = self._export_local(best, ebgp)
            elif not ebgp and self._reflects(best, peer):
                out[prefix] = self._reflect(best)
            elif ebgp and peer.keep_next_hop and self._passes_on(best):
                out[prefix] = self._pass_on(best)
        return out

    def _passes_on(self, path: Path) -> bool:
        """Calico's keepOriginalNextHop: a reflector tells an eBGP peer (a router that peers
        only with the reflectors) every node's subnet with that node as next hop. Only
        routes from iBGP peers: no node carries one external AS's routes to another."""
        return self.local.cluster_id is not None and not path.ebgp

    def _pass_on(self, path: Path) -> Export:
        attrs = replace(path.attributes, as_path=prepend_as(path.attributes.as_path,
                                                            self.local.asn),
                        local_pref=None, originator_id=None, cluster_list=())
        return Export(attrs, path.next_hop)

    def _export_local(self, path: Path, ebgp: bool) -> Export:
        attrs = path.attributes
        if ebgp:
            attrs = replace(attrs, as_path=prepend_as(attrs.as_path, self.local.asn),
                            local_pref=None)
        return Export(attrs, path.next_hop)

    def _reflects(self, path: Path, to: PeerInfo) -> bool:
        """RFC 4456 8: from a client to all iBGP peers, from a non-client to clients only."""
        if self.local.cluster_id is None or path.ebgp or path.peer == to.key:
            return False
        origin = path.attributes.originator_id or path.peer_router_id
        if origin is not None and origin == to.router_id:
            return False  # it would only drop it (RFC 4456 8)
        source = self.peers.get(path.peer or "")
        return source is not None and (source.rr_client or to.rr_client)

    def _reflect(self, path: Path) -> Export:
        attrs = path.attributes
        assert self.local.cluster_id is not None
        return Export(replace(
            attrs, originator_id=attrs.originator_id or path.peer_router_id,
            cluster_list=(self.local.cluster_id, *attrs.cluster_list)), path.next_hop)


def updates_for(exports: dict[Prefix, Export],
                options: CodecOptions = DEFAULT_OPTIONS) -> list[Update]:
    """UPDATEs announcing ``exports``, grouped by identical attributes and next hop."""
    groups: dict[tuple[PathAttributes, Address], list[Prefix]] = {}
    for prefix, export in sorted(exports.items(), key=lambda kv: (kv[0].version, kv[0])):
        groups.setdefault((export.attributes, export.next_hop), []).append(prefix)
    out: list[Update] = []
    for (attrs, next_hop), prefixes in groups.items():
        if next_hop.version == 4:
            base = replace(attrs, next_hop=next_hop)
        else:
            base = replace(attrs, mp_reach=MpReach(AFI_IPV6, 1, (next_hop,)))
        out += announce(base, prefixes, options)
    return out



def out_changes(sent: dict[Prefix, Export],
                wanted: dict[Prefix, Export]) -> tuple[dict[Prefix, Export], list[Prefix]]:
    """What to announce and withdraw so a peer that was sent ``sent`` ends up with ``wanted``:
    the session layer keeps ``sent`` per peer and calls this after every change of the RIB."""
    changed = {p: e for p, e in wanted.items() if sent.get(p) != e}
    return changed, [p for p in sent if p not in wanted]
