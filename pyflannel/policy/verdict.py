"""The pure evaluation of a flow against the policy model: what ``pyflannel policy trace``
prints, and the specification the nftables ruleset (``nft.py``) must agree with.

Calico's semantics: for each direction an endpoint is checked on the node that holds it
(egress on the source's node, ingress on the destination's).  Policies selecting the endpoint
for that direction are taken in order (Order, then name); in each, the first rule that
matches with Allow or Deny decides, Pass skips to the next policy, Log notes and goes on.
Selected but undecided means deny; selected by no policy means allow.  Return traffic of an
allowed connection and traffic from a node to its own endpoints are not evaluated (allowed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from pyflannel.policy.model import (
    EntityRule,
    IPNetwork,
    NetworkSet,
    Policy,
    Rule,
    ordered,
)
from pyflannel.policy.selector import Selector

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class Endpoint:
    """Addresses that share labels.  ``node`` names the node that holds and enforces them
    (its lease key name); None for a network set, which is outside the overlay.

    A seam for container labels: a container endpoint would be a Workload with the
    container's own addresses, labels merged over its node's, and the same ``node``; the
    most specific workload holding an address gives its labels.
    """

    name: str
    nets: tuple[IPNetwork, ...]
    labels: Mapping[str, str]
    node: str | None = None
    host_addresses: frozenset[IPAddress] = frozenset()  # the node's own (bridge gateway)

    def holds(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.nets)

    def prefixlen(self, addr: IPAddress) -> int:
        return max((n.prefixlen for n in self.nets if addr in n), default=-1)


@dataclass(frozen=True)
class Flow:
    src: IPAddress
    dst: IPAddress
    protocol: int = 1
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    @classmethod
    def of(cls, src: str, dst: str, protocol: int = 1, dport: int | None = None,
           sport: int | None = None, icmp_type: int | None = None,
           icmp_code: int | None = None) -> Flow:
        s, d = ip_address(src), ip_address(dst)
        if s.version != d.version:
            raise ValueError(f"{src} and {dst} are not of one IP version")
        if icmp_type is None and protocol in (1, 58):
            icmp_type = 8 if protocol == 1 else 128  # an echo request, as ping sends
            icmp_code = 0
        return cls(s, d, protocol, sport, dport, icmp_type, icmp_code)

    @property
    def version(self) -> int:
        return self.src.version


@dataclass(frozen=True)
class Decision:
    """One direction's outcome; ``policy``/``rule`` name what decided (None: the default)."""

    direction: str
    allowed: bool
    reason: str
    policy: str | None = None
    rule: int | None = None
    selecting: tuple[str, ...] = ()
    logged: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Trace:
    flow: Flow
    src_labels: Mapping[str, str] | None
    dst_labels: Mapping[str, str] | None
    egress: Decision
    ingress: Decision

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed


def _exclude(nets: list[IPNetwork], holes: Sequence[IPNetwork]) -> list[IPNetwork]:
    """``nets`` less ``holes`` (each hole inside one of them)."""
    for hole in holes:
        if not any(n.version == hole.version and hole.subnet_of(n) for n in nets):
            continue
        nets = [part for n in nets for part in (
            n.address_exclude(hole) if n.version == hole.version and hole.subnet_of(n)
            else [n])]
    return nets


@dataclass
class PolicyModel:
    """Everything a node needs to decide: the policies, the cluster's workloads (one per
    node's subnets today) and the network sets."""

    policies: Sequence[Policy]
    workloads: Sequence[Endpoint]
    network_sets: Sequence[NetworkSet] = ()
    _sets: list[Endpoint] = field(default_factory=list, init=False)
    _nested_cache: dict[int, list[Endpoint]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.policies = ordered(self.policies)
        self._sets = [Endpoint(f"networkset/{s.name}", s.nets, s.labels)
                      for s in self.network_sets]

    def labelled(self) -> Iterable[Endpoint]:
        """Every labelled address range: workloads, then network sets."""
        yield from self.workloads
        yield from self._sets

    def workload_of(self, addr: IPAddress) -> Endpoint | None:
        """The most specific workload holding ``addr``."""
        best = max((w for w in self.workloads if w.holds(addr)),
                   key=lambda w: w.prefixlen(addr), default=None)
        return best

    def labels_of(self, addr: IPAddress) -> Mapping[str, str] | None:
        w = self.workload_of(addr)
        if w is not None:
            return w.labels
        merged: dict[str, str] = {}
        for s in self._sets:
            if s.holds(addr):
                merged.update(s.labels)
        return merged if any(s.holds(addr) for s in self._sets) else None

    def selected(self, selector: Selector, addr: IPAddress) -> bool:
        """Whether ``addr``'s workload (the most specific one: a container inside its
        node's subnet) or a network set holding it has labels ``selector`` matches."""
        w = self.workload_of(addr)
        if w is not None and selector.matches(w.labels):
            return True
        return any(s.holds(addr) and selector.matches(s.labels) for s in self._sets)

    def selected_nets(self, selector: Selector) -> list[IPNetwork]:
        """The address ranges :meth:`selected` is true for (the nft set of a rule
        selector): matching workloads less the workloads nested in them that do not match,
        and matching network sets."""
        out: list[IPNetwork] = []
        nested = self._nested()
        for k, w in enumerate(self.workloads):
            if selector.matches(w.labels):
                out.extend(_exclude(list(w.nets), [
                    n for inner in nested.get(k, ()) if not selector.matches(inner.labels)
                    for n in inner.nets]))
        out.extend(n for s in self._sets if selector.matches(s.labels) for n in s.nets)
        return out

    def _nested(self) -> dict[int, list[Endpoint]]:
        """Workload index -> the workloads inside its ranges (containers in their node's
        subnet); found through each range's supernets, not by comparing every pair."""
        if self._nested_cache is None:
            owner = {n: k for k, w in enumerate(self.workloads) for n in w.nets}
            lengths = sorted({n.prefixlen for n in owner})
            found: dict[int, list[Endpoint]] = {}
            for w in self.workloads:
                for n in w.nets:
                    for p in (p for p in lengths if p < n.prefixlen):
                        k = owner.get(n.supernet(new_prefix=p))
                        if k is not None and self.workloads[k] is not w and \
                                w not in found.setdefault(k, []):
                            found[k].append(w)
            self._nested_cache = found
        return self._nested_cache

    def selecting(self, endpoint: Endpoint, direction: str) -> list[Policy]:
        return [p for p in self.policies
                if direction in p.types and p.selector.matches(endpoint.labels)]


def _entity_matches(model: PolicyModel, ent: EntityRule, addr: IPAddress,
                    port: int | None) -> bool:
    if ent.nets and not any(addr in n for n in ent.nets):
        return False
    if any(addr in n for n in ent.not_nets):
        return False
    if ent.selector is not None and not model.selected(ent.selector, addr):
        return False
    if ent.not_selector is not None and model.selected(ent.not_selector, addr):
        return False
    if ent.ports and not any(port in r for r in ent.ports):
        return False
    return not (ent.not_ports and any(port in r for r in ent.not_ports))


def rule_matches(model: PolicyModel, rule: Rule, flow: Flow) -> bool:
    if flow.version not in rule.families():
        return False
    if rule.protocol is not None and rule.protocol != flow.protocol:
        return False
    if rule.icmp_type is not None and rule.icmp_type != flow.icmp_type:
        return False
    if rule.icmp_code is not None and rule.icmp_code != flow.icmp_code:
        return False
    return (_entity_matches(model, rule.source, flow.src, flow.sport)
            and _entity_matches(model, rule.destination, flow.dst, flow.dport))


def decide(model: PolicyModel, endpoint: Endpoint | None, flow: Flow,
           direction: str) -> Decision:
    """One direction's verdict for the endpoint that sends (Egress) or receives (Ingress)."""
    if endpoint is None:
        return Decision(direction, True, "not a workload: no policy here")
    other = flow.dst if direction == "Egress" else flow.src
    own = flow.src if direction == "Egress" else flow.dst
    if own in endpoint.host_addresses:
        return Decision(direction, True, "the node's own address: not a workload")
    if direction == "Ingress" and other in endpoint.host_addresses:
        return Decision(direction, True, "from the node to its own endpoint: always allowed")
    policies = model.selecting(endpoint, direction)
    names = tuple(p.name for p in policies)
    if not policies:
        return Decision(direction, True, "selected by no policy: allowed")
    logged: list[tuple[str, int]] = []
    for policy in policies:
        for i, rule in enumerate(policy.rules(direction)):
            if not rule_matches(model, rule, flow):
                continue
            if rule.action == "Log":
                logged.append((policy.name, i))
                continue
            if rule.action == "Pass":
                break
            return Decision(direction, rule.action == "Allow",
                            f"{rule.action} by {policy.name} {direction}[{i}]",
                            policy.name, i, names, tuple(logged))
    return Decision(direction, False, "no rule decided: denied", None, None, names,
                    tuple(logged))


def trace(model: PolicyModel, flow: Flow) -> Trace:
    """Both directions of a flow: egress where the source lives, ingress where the
    destination lives; the flow passes when both allow."""
    src_ep, dst_ep = model.workload_of(flow.src), model.workload_of(flow.dst)
    return Trace(flow, model.labels_of(flow.src), model.labels_of(flow.dst),
                 decide(model, src_ep, flow, "Egress"), decide(model, dst_ep, flow, "Ingress"))
