"""The daemon task that keeps this node's nftables ruleset equal to the policy in etcd.

It lists ``<prefix>/policies/``, ``<prefix>/networksets/`` and the leases (their Labels),
compiles, and applies when the ruleset changed; then it watches the whole prefix and does
it again after any change there (a short pause joins a burst of changes into one rebuild).

Failure choices (docs/policy.md, "Which way it fails"):

* a policy or network set that does not parse is reported once by name; the node keeps
  the last version of it that parsed, and one that never parsed is left out;
* while etcd cannot be read, or the node holds no lease, the kernel keeps the last
  ruleset (closed for what it denied); the daemon never deletes the table, so a restart
  has no allow-all window;
* ``nft`` refusing a ruleset leaves the previous one whole (one transaction) and is
  retried at the next change or after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_network
from typing import Any

from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.lease.registry import EtcdAuthError, EtcdUnavailable, WatchCompacted
from pyflannel.logutil import WarnOnce
from pyflannel.policy import nft
from pyflannel.policy.model import (
    NetworkSet,
    Policy,
    PolicyError,
    check_labels,
    networksets_prefix,
    parse_label_flag,
    parse_network_set,
    parse_policy,
    policies_prefix,
)
from pyflannel.policy.verdict import Endpoint, PolicyModel

log = logging.getLogger("pyflannel")
SETTLE_S = 0.05  # a burst of etcd changes becomes one rebuild
RETRY_S = 2.0
HITS_EVERY_S = 10.0  # how often the per-rule nft counters are read for the metrics
NO_RULE_DECIDED = "NoRuleDecided"  # the action label of an endpoint chain's final drop


def with_node_labels(attrs: LeaseAttrs, labels: Mapping[str, str]) -> LeaseAttrs:
    """The lease attributes with this node's labels (published as "Labels")."""
    return replace(attrs, labels=tuple(sorted(labels.items())))


def node_labels(text: str) -> dict[str, str]:
    return parse_label_flag(text)


def workload_of(lease: Lease, labels: Mapping[str, str]) -> Endpoint:
    """A node's subnets as one workload endpoint; the first address of each subnet is the
    node's own (Docker's bridge), not a workload."""
    nets = ([lease.subnet] if lease.has_ipv4 else []) + (
        [lease.ipv6_subnet] if lease.ipv6_subnet is not None else [])
    hosts = frozenset(ip_address(n.network_address + 1) for n in nets)
    return Endpoint(lease.key_name, tuple(nets), dict(labels), node=lease.key_name,
                    host_addresses=hosts)


def container_workloads(own: Lease, labels: Mapping[str, str], containers: Iterable[Any],
                        warn: Callable[[str, str], Any] | None = None) -> list[Endpoint]:
    """This node's Docker containers as workloads: each its own addresses (those in the
    node's subnets), its labels over the node's (a label Kubernetes would refuse is left
    out, said once)."""
    nets = [n for n in (own.subnet if own.has_ipv4 else None, own.ipv6_subnet) if n]
    out = []
    for c in containers:
        mine = tuple(ip_network(a) for a in c.addresses if any(a in n for n in nets))
        if not mine:
            continue  # a host-network or other-bridge container: not in the overlay
        merged = dict(labels)
        for key, value in sorted(c.labels.items()):
            try:
                merged.update(check_labels({key: value}, f"container {c.name} Labels"))
            except PolicyError as e:
                if warn is not None:
                    warn(f"{c.id}/{key}", f"{e}; that label is left out")
        out.append(Endpoint(f"{own.key_name}/{c.name}", mine, merged, node=own.key_name))
    return out


@dataclass
class PolicyBook:
    """What etcd says, parsed: the last good version of each policy and network set, and
    the ones that are broken now (with their one-line reason). Pure."""

    policies: dict[str, Policy] = field(default_factory=dict)
    network_sets: dict[str, NetworkSet] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # "policy/NAME" -> reason
    _seen_bad: dict[str, bytes] = field(default_factory=dict)

    def update(self, policies: Mapping[str, bytes], sets: Mapping[str, bytes]) -> list[str]:
        """Take a full listing; return the lines to report (each bad value once)."""
        lines: list[str] = []
        for kind, raw_items, good, parse in (
                ("policy", policies, self.policies, parse_policy),
                ("networkset", sets, self.network_sets, parse_network_set)):
            for name in list(good):
                if name not in raw_items:
                    del good[name]
            for tag in [t for t in self.broken if t.startswith(kind + "/")]:
                if tag.split("/", 1)[1] not in raw_items:
                    del self.broken[tag]
                    self._seen_bad.pop(tag, None)
            for name, raw in raw_items.items():
                tag = f"{kind}/{name}"
                try:
                    good[name] = parse(raw, name)
                except PolicyError as e:
                    self.broken[tag] = str(e)
                    if self._seen_bad.get(tag) != raw:
                        self._seen_bad[tag] = raw
                        kept = "keeping its last good version" if name in good else \
                            "it is left out"
                        lines.append(f"{e}; {kept}")
                else:
                    self.broken.pop(tag, None)
                    self._seen_bad.pop(tag, None)
        return lines


def build_model(book: PolicyBook, leases: Iterable[Lease],
                own: tuple[Lease, Mapping[str, str]] | None = None,
                warn: Callable[[str, str], Any] | None = None,
                containers: Iterable[Any] = ()) -> PolicyModel:
    """The model from the policy book and every lease (a node's labels from its lease;
    this node's from its own flag, its containers' from Docker)."""
    workloads = []
    own_key = own[0].key_name if own is not None else None
    for lease in leases:
        if lease.key_name == own_key:
            continue
        labels = dict(lease.attrs.labels)
        try:
            labels = check_labels(labels, f"lease {lease.key_name} Labels")
        except PolicyError as e:
            if warn is not None:
                warn(lease.key_name, f"{e}; the node counts as unlabelled")
            labels = {}
        workloads.append(workload_of(lease, labels))
    if own is not None:
        workloads.append(workload_of(own[0], own[1]))
        workloads.extend(container_workloads(own[0], own[1], containers, warn))
    return PolicyModel(list(book.policies.values()), workloads,
                       list(book.network_sets.values()))


def ruleset_for(model: PolicyModel, own: Lease) -> nft.Compiled:
    """This node's ruleset, its digest in the table's comment (``trace`` reads it back to
    know that the kernel holds exactly the ruleset of the model it evaluates)."""
    local = [w for w in model.workloads if w.node == own.key_name]
    compiled = nft.compile_ruleset(model, local)
    digest = compiled.digest = hashlib.sha256(compiled.text.encode()).hexdigest()[:16]
    compiled.text = compiled.text.replace(
        f"table {nft.FAMILY} {nft.TABLE} {{\n",
        f"table {nft.FAMILY} {nft.TABLE} {{\n  comment \"pyflannel {own.key_name} {digest}\"\n",
        1)
    return compiled


class EtcdKeys:
    """Raw keys under a prefix and a watch over the network's prefix, through the daemon's
    registry (its endpoint fail-over and re-authentication)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    async def list(self, prefix: str) -> dict[str, bytes]:
        from aetcd.utils import prefix_range_end

        from pyflannel.lease import etcd

        start = prefix.encode()
        reply = await self.registry._call(
            lambda c: etcd._range(c, start, prefix_range_end(start), 0, 0))
        out = {}
        for kv in reply.kvs:
            name = bytes(kv.key).decode(errors="replace")[len(prefix):]
            if name and "/" not in name:
                out[name] = bytes(kv.value)
        return out

    async def changes(self) -> Any:
        """An async iterator that yields once per change under the network's prefix."""
        from aetcd.utils import prefix_range_end

        start = (self.registry.prefix.rstrip("/") + "/").encode()
        _, watch = await self.registry._open_watch(start, range_end=prefix_range_end(start))
        return watch


class PolicyKeeper:
    """Keeps ``table inet pyflannel`` equal to the policy in etcd, for this node's subnets."""

    def __init__(self, registry: Any, etcd_prefix: str, own_lease: Callable[[], Lease | None],
                 labels: Mapping[str, str], apply: Callable[[str], Any] = nft.apply,
                 containers: Callable[[], Iterable[Any]] = lambda: ()) -> None:
        self.keys = EtcdKeys(registry)
        self.registry = registry
        self.prefix = etcd_prefix
        self.own_lease = own_lease
        self.labels = dict(labels)
        self.book = PolicyBook()
        self.apply = apply
        self.applied = ""
        self.applied_without_policy = False
        self.rebuilds = 0
        self.last_rebuild_s = 0.0
        self.hits: dict[str, int] = {}  # packets by rule action, from the nft counters
        self.containers = containers  # this node's Docker containers, now
        self._changed: asyncio.Event | None = None
        self._warn = WarnOnce(log)

    def poke(self) -> None:
        """Rebuild soon (something outside etcd changed: this node's containers)."""
        if self._changed is not None:
            self._changed.set()

    def status(self) -> dict[str, Any]:
        """What the metrics and ``pyflannel status`` show (plain data, for the snapshot)."""
        return {"policies": len(self.book.policies),
                "network_sets": len(self.book.network_sets),
                "broken": dict(self.book.broken), "rebuilds": self.rebuilds,
                "last_rebuild_s": self.last_rebuild_s, "hits": dict(self.hits)}

    def actions(self) -> dict[str, str]:
        """Each rule's counter comment (``NAME Direction[i]``, as the compiler writes it)
        to its action."""
        out = {f"no rule decided {d}": NO_RULE_DECIDED for d in ("Ingress", "Egress")}
        for p in self.book.policies.values():
            for direction in ("Ingress", "Egress"):
                for i, rule in enumerate(p.rules(direction)):
                    out[f"{p.name[:100]} {direction}[{i}]"] = rule.action
        return out

    def count_hits(self, listing: str) -> None:
        """Packets by action from ``nft -j list table`` output."""
        actions = self.actions()
        hits = dict.fromkeys(("Allow", "Deny", "Log", "Pass", NO_RULE_DECIDED), 0)
        for comment, (packets, _) in nft.counters(listing).items():
            action = actions.get(comment)
            if action is not None:
                hits[action] = hits.get(action, 0) + packets
        self.hits = hits

    async def read_hits_forever(self, every: float = HITS_EVERY_S) -> None:
        """Read the table's counters now and then (only while a ruleset is applied)."""
        while True:
            if self.applied and not self.applied_without_policy:
                try:
                    self.count_hits(await nft.list_json())
                except nft.NftError as e:
                    self._warn.warn(("hits", str(e)), "policy: cannot read rule counters: %s", e)
            await asyncio.sleep(every)

    async def rebuild(self) -> bool:
        """List, compile, apply if changed; True when the kernel holds the current model."""
        own = self.own_lease()
        if own is None:
            return False  # keep whatever the kernel holds
        started = time.monotonic()
        policies = await self.keys.list(policies_prefix(self.prefix))
        sets = await self.keys.list(networksets_prefix(self.prefix))
        for line in self.book.update(policies, sets):
            log.warning("%s", line)
        if not self.book.policies and self.applied_without_policy:
            return True  # nothing to enforce, and the kernel holds no policy: no lease list
        listing = await self.registry.list_leases()
        model = build_model(self.book, listing.leases, (own, self.labels),
                            lambda key, msg: self._warn.warn(("labels", key), "%s", msg),
                            list(self.containers()))
        compiled = ruleset_for(model, own)
        if compiled.text == self.applied:
            return True
        try:
            await self.apply(compiled.text)
        except nft.NftError as e:
            if not self.book.policies and not self.applied:
                log.debug("policy: no policies and %s", e)
                self.applied_without_policy = True
                return True  # nothing to enforce: a node without nft is fine
            self._warn.warn(("nft", str(e)), "policy: %s; the previous ruleset stays", e)
            return False
        self.applied = compiled.text
        self.applied_without_policy = not self.book.policies
        self.rebuilds += 1
        self.last_rebuild_s = time.monotonic() - started
        log.info("policy: %d policies, %d network sets, %d broken; ruleset %d rules, %d sets "
                 "in %.0f ms", len(self.book.policies), len(self.book.network_sets),
                 len(self.book.broken), compiled.rules, compiled.sets,
                 1000 * self.last_rebuild_s)
        return True

    async def run(self) -> None:
        hits = asyncio.create_task(self.read_hits_forever())
        try:
            while True:
                try:
                    await self._follow()
                except (EtcdUnavailable, EtcdAuthError, WatchCompacted) as e:
                    self._warn.warn(("etcd", type(e).__name__), "policy: cannot follow etcd "
                                    "(%s); the kernel keeps the last ruleset", str(e)[:200])
                await asyncio.sleep(RETRY_S)
        finally:
            hits.cancel()

    async def _follow(self) -> None:
        """Rebuild now and after each change under the prefix, until the watch ends."""
        watch = await self.keys.changes()
        changed = self._changed = asyncio.Event()
        ended: list[BaseException] = []

        async def consume() -> None:
            try:
                async for _ in watch:
                    changed.set()
            except Exception as e:  # noqa: BLE001 - aetcd's errors on a broken stream
                ended.append(e)
            changed.set()

        reader = asyncio.create_task(consume())
        try:
            current = await self.rebuild()
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), None if current else RETRY_S)
                if reader.done():
                    raise EtcdUnavailable(f"watch ended: {ended[0] if ended else 'closed'}")
                await asyncio.sleep(SETTLE_S)
                changed.clear()
                current = await self.rebuild()
        finally:
            reader.cancel()
            await _cancel(watch)


async def _cancel(watch: Any) -> None:
    with contextlib.suppress(Exception):  # the stream may be gone already
        await asyncio.wait_for(watch.cancel(), 1)
