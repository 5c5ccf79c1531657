"""Policies, rules and network sets as stored in etcd, and the one place they are validated.

``<prefix>/policies/NAME`` holds a policy and ``<prefix>/networksets/NAME`` a network set
(docs/policy.md has the schema).  Every error is a :class:`PolicyError` whose message is one
line naming the object and the field, e.g. ``policy "blue": Ingress[0].Source.Ports[1]: ...``.
Unknown fields are refused: a misspelt ``Selecter`` would otherwise silently select nothing.
Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from pyflannel.policy.selector import All, Selector, SelectorError, parse_selector

IPNetwork = IPv4Network | IPv6Network

ACTIONS = ("Allow", "Deny", "Log", "Pass")
DIRECTIONS = ("Ingress", "Egress")
PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPV6": 58, "SCTP": 132, "UDPLITE": 136}
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
MAX_RULES = 500
MAX_NETS = 1024
MAX_PORTS = 256
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_LABEL_KEY_RE = re.compile(
    r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


class PolicyError(ValueError):
    """A policy, network set or label that cannot be used; one line naming the field."""


def policies_prefix(etcd_prefix: str) -> str:
    return etcd_prefix.rstrip("/") + "/policies/"


def networksets_prefix(etcd_prefix: str) -> str:
    return etcd_prefix.rstrip("/") + "/networksets/"


@dataclass(frozen=True)
class PortRange:
    lo: int
    hi: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class EntityRule:
    """One side (Source or Destination) of a rule; every criterion given must match."""

    nets: tuple[IPNetwork, ...] = ()
    not_nets: tuple[IPNetwork, ...] = ()
    selector: Selector | None = None
    not_selector: Selector | None = None
    ports: tuple[PortRange, ...] = ()
    not_ports: tuple[PortRange, ...] = ()


@dataclass(frozen=True)
class Rule:
    action: str
    protocol: int | None = None
    ip_version: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    source: EntityRule = field(default_factory=EntityRule)
    destination: EntityRule = field(default_factory=EntityRule)

    def families(self) -> tuple[int, ...]:
        """The IP versions this rule can match at all."""
        if self.ip_version is not None:
            return (self.ip_version,)
        if self.protocol == 1:
            return (4,)
        if self.protocol == 58:
            return (6,)
        return (4, 6)


@dataclass(frozen=True)
class Policy:
    name: str
    order: float | None
    selector: Selector
    types: frozenset[str]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    doc: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def sort_key(self) -> tuple[bool, float, str]:
        """Calico's order: by Order (a policy without one comes last), then by name."""
        return (self.order is None, self.order or 0.0, self.name)

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == "Ingress" else self.egress

    def to_json(self) -> str:
        return json.dumps(self.doc, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class NetworkSet:
    """Labels for addresses outside the overlay (an office network, a partner's hosts)."""

    name: str
    labels: Mapping[str, str]
    nets: tuple[IPNetwork, ...]


# -- parsing ---------------------------------------------------------------------------------


def _load(raw: bytes | str | Mapping[str, Any], what: str) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise PolicyError(f"{what}: not JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{what}: not a JSON object")
    return doc


def _unknown(doc: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    extra = sorted(set(doc) - set(known))
    if extra:
        raise PolicyError(f"{where}{extra[0]}: unknown field (known: {', '.join(known)})")


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PolicyError(f"{what}: Name {str(name)[:60]!r} is not a lower-case DNS-style name "
                          "(a-z, 0-9, '-', '.', at most 253)")
    return name


def check_labels(labels: Any, where: str) -> dict[str, str]:
    """Label maps as Kubernetes spells them: keys ``[prefix/]name``, values up to 63."""
    if not isinstance(labels, Mapping):
        raise PolicyError(f"{where}: not an object of label keys to values")
    out = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_KEY_RE.fullmatch(k):
            raise PolicyError(f"{where}: label key {str(k)[:60]!r} is not valid")
        if not isinstance(v, str) or not _LABEL_VALUE_RE.fullmatch(v):
            raise PolicyError(f"{where}.{k}: label value {str(v)[:70]!r} is not valid")
        out[k] = v
    return out


def parse_label_flag(text: str) -> dict[str, str]:
    """``tenant=blue,zone=a`` (the -node-labels flag) as a label map."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise PolicyError(f"-node-labels: {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return check_labels(labels, "-node-labels")


def _nets(value: Any, where: str) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}: not a list of CIDRs")
    if len(value) > MAX_NETS:
        raise PolicyError(f"{where}: more than {MAX_NETS} entries")
    out = []
    for i, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError("not a string")
            net = ip_network(item, strict=False)
            if getattr(net.network_address, "scope_id", None):
                raise ValueError("scoped")
        except ValueError:
            raise PolicyError(f"{where}[{i}]: {str(item)[:60]!r} is not a CIDR") from None
        out.append(net)
    return tuple(out)


def _ports(value: Any, where: str) -> tuple[PortRange, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}: not a list of ports")
    if len(value) > MAX_PORTS:
        raise PolicyError(f"{where}: more than {MAX_PORTS} entries")
    out = []
    for i, item in enumerate(value):
        lo = hi = None
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\d{1,5}(:\d{1,5})?", item):
            a, _, b = item.partition(":")
            lo, hi = int(a), int(b or a)
        if lo is None or hi is None or not 0 <= lo <= hi <= 65535:
            raise PolicyError(f"{where}[{i}]: {str(item)[:30]!r} is not a port (0-65535) or "
                              "a \"lo:hi\" range")
        out.append(PortRange(lo, hi))
    return tuple(out)


def _selector(value: Any, where: str) -> Selector:
    try:
        return parse_selector(value)
    except SelectorError as e:
        raise PolicyError(f"{where}: {e}") from None


ENTITY_FIELDS = ("Nets", "NotNets", "Selector", "NotSelector", "Ports", "NotPorts")
RULE_FIELDS = ("Action", "Protocol", "IPVersion", "ICMP", "Source", "Destination")
POLICY_FIELDS = ("Name", "Order", "Selector", "Types", "Ingress", "Egress")


def _entity(doc: Any, where: str, protocol: int | None, version: int | None) -> EntityRule:
    if not isinstance(doc, Mapping):
        raise PolicyError(f"{where}: not an object")
    _unknown(doc, ENTITY_FIELDS, where + ".")
    nets = _nets(doc.get("Nets", []), where + ".Nets")
    not_nets = _nets(doc.get("NotNets", []), where + ".NotNets")
    for name, group in (("Nets", nets), ("NotNets", not_nets)):
        for i, net in enumerate(group):
            if version is not None and net.version != version:
                raise PolicyError(f"{where}.{name}[{i}]: {net} is not IPv{version} (IPVersion)")
    ports = _ports(doc.get("Ports", []), where + ".Ports")
    not_ports = _ports(doc.get("NotPorts", []), where + ".NotPorts")
    if (ports or not_ports) and protocol not in PORT_PROTOCOLS:
        raise PolicyError(f"{where}.{'Ports' if ports else 'NotPorts'}: ports need Protocol "
                          "TCP, UDP, SCTP or UDPLite")
    sel = _selector(doc["Selector"], where + ".Selector") if "Selector" in doc else None
    nsel = _selector(doc["NotSelector"], where + ".NotSelector") if "NotSelector" in doc \
        else None
    return EntityRule(nets, not_nets, sel, nsel, ports, not_ports)


def _protocol(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 255:
        return value
    if isinstance(value, str) and value.upper() in PROTOCOLS:
        return PROTOCOLS[value.upper()]
    raise PolicyError(f"{where}: {str(value)[:30]!r} is not TCP, UDP, ICMP, ICMPv6, SCTP, "
                      "UDPLite or a number 1-255")


def parse_rule(doc: Any, where: str) -> Rule:
    if not isinstance(doc, Mapping):
        raise PolicyError(f"{where}: not an object")
    _unknown(doc, RULE_FIELDS, where + ".")
    action = doc.get("Action")
    match = [a for a in ACTIONS if isinstance(action, str) and a.lower() == action.lower()]
    if not match:
        raise PolicyError(f"{where}.Action: {str(action)[:30]!r} is not Allow, Deny, Log or Pass")
    protocol = _protocol(doc.get("Protocol"), where + ".Protocol")
    version = doc.get("IPVersion")
    if version is not None and version not in (4, 6) or isinstance(version, bool):
        raise PolicyError(f"{where}.IPVersion: {version!r} is not 4 or 6")
    if (protocol == 1 and version == 6) or (protocol == 58 and version == 4):
        raise PolicyError(f"{where}.IPVersion: {version} does not fit Protocol "
                          f"{'ICMP' if protocol == 1 else 'ICMPv6'}")
    icmp_type = icmp_code = None
    if "ICMP" in doc:
        icmp = doc["ICMP"]
        if protocol not in (1, 58):
            raise PolicyError(f"{where}.ICMP: needs Protocol ICMP or ICMPv6")
        if not isinstance(icmp, Mapping):
            raise PolicyError(f"{where}.ICMP: not an object")
        _unknown(icmp, ("Type", "Code"), where + ".ICMP.")
        icmp_type, icmp_code = icmp.get("Type"), icmp.get("Code")
        for name, v, top in (("Type", icmp_type, 254), ("Code", icmp_code, 255)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v <= top):
                raise PolicyError(f"{where}.ICMP.{name}: {v!r} is not a number 0-{top}")
        if icmp_code is not None and icmp_type is None:
            raise PolicyError(f"{where}.ICMP.Code: needs a Type")
    return Rule(
        match[0], protocol, version, icmp_type, icmp_code,
        _entity(doc.get("Source", {}), where + ".Source", protocol, version),
        _entity(doc.get("Destination", {}), where + ".Destination", protocol, version),
    )


def parse_policy(raw: bytes | str | Mapping[str, Any], key_name: str | None = None) -> Policy:
    """A policy from its JSON; ``key_name`` (the key's last part) must equal its Name."""
    what = f"policy {key_name!r}" if key_name else "policy"
    doc = _load(raw, what)
    name = check_name(doc.get("Name"), what)
    what = f"policy {name!r}"
    if key_name is not None and key_name != name:
        raise PolicyError(f"{what}: Name differs from the key's last part {key_name!r}")
    _unknown(doc, POLICY_FIELDS, what + ": ")
    order = doc.get("Order")
    if order is not None and (not isinstance(order, int | float) or isinstance(order, bool)
                              or order != order or abs(order) > 1e15):
        raise PolicyError(f"{what}: Order {str(order)[:30]!r} is not a number")
    selector = _selector(doc.get("Selector", ""), f"{what}: Selector")
    rules: dict[str, tuple[Rule, ...]] = {}
    for direction in DIRECTIONS:
        items = doc.get(direction, [])
        if not isinstance(items, list):
            raise PolicyError(f"{what}: {direction}: not a list of rules")
        if len(items) > MAX_RULES:
            raise PolicyError(f"{what}: {direction}: more than {MAX_RULES} rules")
        rules[direction] = tuple(parse_rule(r, f"{what}: {direction}[{i}]")
                                 for i, r in enumerate(items))
    types = doc.get("Types")
    if types is None:  # Calico's default
        kinds = {"Ingress"} | ({"Egress"} if rules["Egress"] else set())
    else:
        if not isinstance(types, list) or any(t not in DIRECTIONS for t in types):
            raise PolicyError(f"{what}: Types {str(types)[:60]} is not a list of Ingress/Egress")
        kinds = set(types)
    for direction in DIRECTIONS:
        if rules[direction] and direction not in kinds:
            raise PolicyError(f"{what}: {direction}: rules given but Types leaves it out")
    return Policy(name, order, selector if selector is not None else All(), frozenset(kinds),
                  rules["Ingress"], rules["Egress"], doc)


def parse_network_set(raw: bytes | str | Mapping[str, Any], key_name: str) -> NetworkSet:
    what = f"network set {key_name!r}"
    doc = _load(raw, what)
    _unknown(doc, ("Name", "Labels", "Nets"), what + ": ")
    if "Name" in doc and doc["Name"] != key_name:
        raise PolicyError(f"{what}: Name differs from the key's last part")
    check_name(key_name, what)
    labels = check_labels(doc.get("Labels", {}), f"{what}: Labels")
    nets = _nets(doc.get("Nets", []), f"{what}: Nets")
    return NetworkSet(key_name, labels, nets)


def ordered(policies: Iterable[Policy]) -> list[Policy]:
    return sorted(policies, key=Policy.sort_key)
