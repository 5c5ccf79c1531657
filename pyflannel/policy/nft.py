"""The whole policy model of one node compiled to one nftables ruleset, applied atomically.

Layout (table ``inet pyflannel``, both families)::

    chain egress   hook forward, priority filter - 2   packets from this node's subnets
    chain ingress  hook forward, priority filter - 1   packets to this node's subnets
    chain ep<N>_<dir>   one per local endpoint and direction: jumps to each selecting
                        policy's chain in order, then drops (no rule decided)
    chain p<N>_<dir>    one per policy and direction: its rules; Allow accepts, Deny drops,
                        Pass returns to the endpoint chain (next policy), Log logs
    set s<N>_<4|6>      the addresses a rule selector matches (interval sets: one lookup)

Two base chains, because an accept ends only its own base chain: a packet allowed by egress
is still checked by ingress (a routed packet between two local endpoints).  Both start with
``ct state established,related accept`` (return traffic).  The iptables rules the daemon
writes live in other tables and hooks' other chains; a packet must pass all of them.

The file given to ``nft -f`` declares the table, deletes it and declares it again with its
full content: one transaction, so the kernel holds the old ruleset or the new one, never a
half.  Compiling is pure; only :func:`apply` runs ``nft``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import collapse_addresses

from pyflannel.host.childstdin import stdin_file
from pyflannel.policy.model import DIRECTIONS, EntityRule, IPNetwork, Policy, PortRange, Rule
from pyflannel.policy.selector import Selector
from pyflannel.policy.verdict import Endpoint, PolicyModel

TABLE = "pyflannel"
FAMILY = "inet"
LOG_RATE = "10/second"
_ACTION = {"Allow": "accept", "Deny": "drop", "Pass": "return"}
_DIR = {"Ingress": "in", "Egress": "out"}


class NftError(RuntimeError):
    """``nft`` refused or could not run; the kernel still holds the previous ruleset."""


def _ip(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _nets(nets: Iterable[IPNetwork], version: int) -> list[IPNetwork]:
    return list(collapse_addresses(n for n in nets if n.version == version))  # type: ignore


def _elements(nets: Sequence[IPNetwork]) -> str:
    return "{ " + ", ".join(str(n) for n in nets) + " }"


def _ports(ports: Sequence[PortRange]) -> str:
    return "{ " + ", ".join(str(p) for p in ports) + " }"


@dataclass
class Compiled:
    """The ruleset text and what it holds (for logs and metrics)."""

    text: str
    chains: int = 0
    rules: int = 0
    sets: int = 0
    elements: int = 0
    digest: str = ""  # set by the keeper: what the table's comment names


@dataclass
class _Builder:
    model: PolicyModel
    sets: dict[tuple[str, int], tuple[str, list[IPNetwork]]] = field(default_factory=dict)
    rules: int = 0

    def selector_set(self, selector: Selector, version: int) -> tuple[str, list[IPNetwork]]:
        """The named set of addresses ``selector`` matches, shared by every rule using it."""
        key = (str(selector), version)
        if key not in self.sets:
            nets = _nets(self.model.selected_nets(selector), version)
            self.sets[key] = (f"s{len(self.sets)}_{version}", nets)
        return self.sets[key]

    def entity(self, ent: EntityRule, side: str, version: int) -> list[str] | None:
        """Match expressions for one side, or None when the side can never match."""
        ip, out = _ip(version), []
        if ent.nets:
            nets = _nets(ent.nets, version)
            if not nets:
                return None
            out.append(f"{ip} {side}addr {_elements(nets)}")
        not_nets = _nets(ent.not_nets, version)
        if not_nets:
            out.append(f"{ip} {side}addr != {_elements(not_nets)}")
        if ent.selector is not None:
            name, nets = self.selector_set(ent.selector, version)
            if not nets:
                return None
            out.append(f"{ip} {side}addr @{name}")
        if ent.not_selector is not None:
            name, nets = self.selector_set(ent.not_selector, version)
            if nets:
                out.append(f"{ip} {side}addr != @{name}")
        if ent.ports:
            out.append(f"th {side}port {_ports(ent.ports)}")
        if ent.not_ports:
            out.append(f"th {side}port != {_ports(ent.not_ports)}")
        return out

    def rule(self, policy: Policy, direction: str, index: int, rule: Rule) -> list[str]:
        lines = []
        for version in rule.families():
            matches = [f"meta nfproto ipv{version}"]
            if rule.protocol is not None:
                matches.append(f"meta l4proto {rule.protocol}")
            icmp = "icmp" if version == 4 else "icmpv6"
            if rule.icmp_type is not None:
                matches.append(f"{icmp} type {rule.icmp_type}")
            if rule.icmp_code is not None:
                matches.append(f"{icmp} code {rule.icmp_code}")
            src = self.entity(rule.source, "s", version)
            dst = self.entity(rule.destination, "d", version)
            if src is None or dst is None:
                continue
            comment = json.dumps(f"{policy.name[:100]} {direction}[{index}]")
            if rule.action == "Log":
                prefix = json.dumps(f"pyflannel {policy.name[:60]} {direction}[{index}] ")
                verdict = f"limit rate {LOG_RATE} log prefix {prefix}"
            else:
                verdict = _ACTION[rule.action]
            lines.append(" ".join([*matches, *src, *dst, "counter", verdict,
                                   "comment", comment]))
        self.rules += len(lines)
        return lines


def compile_ruleset(model: PolicyModel, local: Sequence[Endpoint]) -> Compiled:
    """The ruleset for a node holding the workloads ``local``: every policy that selects one
    of them, the sets their rule selectors need, and the dispatch by address."""
    b = _Builder(model)
    chains: list[tuple[str, list[str]]] = []
    policy_chain: dict[tuple[str, str], str] = {}
    dispatch: dict[str, list[tuple[int, int, str]]] = {"Egress": [], "Ingress": []}
    hosts = sorted({a for e in local for a in e.host_addresses}, key=lambda a: (a.version, a))
    for k, ep in enumerate(local):
        for direction in DIRECTIONS:
            selecting = model.selecting(ep, direction)
            side = "s" if direction == "Egress" else "d"
            if not selecting:  # selected by no policy: allowed, also inside its node's range
                for version in (4, 6) if _nested(ep, local) else ():
                    nets = _nets(ep.nets, version)
                    if nets:
                        dispatch[direction].append((version, -max(n.prefixlen for n in nets),
                            f"{_ip(version)} {side}addr {_elements(nets)} accept"))
                continue
            body = []
            for policy in selecting:
                key = (policy.name, direction)
                if key not in policy_chain:
                    name = f"p{len(policy_chain)}_{_DIR[direction]}"
                    policy_chain[key] = name
                    rules = [line for i, r in enumerate(policy.rules(direction))
                             for line in b.rule(policy, direction, i, r)]
                    chains.append((name, rules))
                body.append(f"jump {policy_chain[key]}")
            body.append(f"counter drop comment {json.dumps('no rule decided ' + direction)}")
            ep_chain = f"ep{k}_{_DIR[direction]}"
            chains.append((ep_chain, body))
            for version in (4, 6):
                nets = _nets(ep.nets, version)
                if nets:
                    dispatch[direction].append((version, -max(n.prefixlen for n in nets),
                        f"{_ip(version)} {side}addr {_elements(nets)} goto {ep_chain}"))
    out = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}",
           f"table {FAMILY} {TABLE} {{"]
    elements = 0
    for name, nets in b.sets.values():
        if not nets:
            continue
        kind = "ipv4_addr" if name.endswith("_4") else "ipv6_addr"
        out.append(f"  set {name} {{ type {kind}; flags interval; "
                   f"elements = {_elements(nets)} }}")
        elements += len(nets)
    for direction, prio in (("Egress", 2), ("Ingress", 1)):
        side = "s" if direction == "Egress" else "d"
        out.append(f"  chain {direction.lower()} {{")
        out.append(f"    type filter hook forward priority filter - {prio}; policy accept;")
        out.append("    ct state established,related accept")
        for version in (4, 6):
            own = [a for a in hosts if a.version == version]
            if own:  # the node's own addresses are not workloads
                addrs = "{ " + ", ".join(map(str, own)) + " }"
                out.append(f"    {_ip(version)} {side}addr {addrs} accept")
                if direction == "Ingress":
                    out.append(f"    {_ip(version)} saddr {addrs} accept")
        # most specific first (per family): a container's own rule before its node's
        ordered = sorted(dispatch[direction], key=lambda item: item[:2])
        out.extend(f"    {line}" for _, _, line in ordered)
        out.append("  }")
    for name, body in chains:
        out.append(f"  chain {name} {{")
        out.extend(f"    {line}" for line in body)
        out.append("  }")
    out.append("}")
    return Compiled("\n".join(out) + "\n", len(chains) + 2, b.rules,
                    sum(1 for _, nets in b.sets.values() if nets), elements)


def _nested(ep: Endpoint, local: Sequence[Endpoint]) -> bool:
    """Whether another local endpoint's range holds ``ep``'s (a container in its node's)."""
    return any(o is not ep and any(n != m and n.version == m.version and n.subnet_of(m)
                                   for n in ep.nets for m in o.nets) for o in local)


EMPTY = (f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
         f"table {FAMILY} {TABLE} {{\n}}\n")


def apply_sync(text: str, netns: str | None = None, timeout: float = 30) -> None:
    """Hand one ruleset to ``nft -f -``: applied whole or not at all."""
    argv = ["nft", "-f", "-"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        proc = subprocess.run(argv, input=text.encode(), capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NftError(f"cannot run nft: {e}") from None
    if proc.returncode != 0:
        first = (proc.stderr.decode(errors="replace").strip().splitlines() or ["?"])[0]
        raise NftError(f"nft refused the ruleset: {first}")


async def _run_nft(args: Sequence[str], what: str, timeout: float, text: str = "") -> str:
    """Run ``nft ARGS`` off the event loop, ``text`` on its stdin; its output, or NftError
    with ``what`` and nft's first line. The input waits in a file (host/childstdin.py), so
    an nft that stops reading early is its own error, not a broken pipe."""
    try:
        with stdin_file(text.encode()) as stdin:
            proc = await asyncio.create_subprocess_exec(
                "nft", *args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise NftError(f"cannot run nft: {e}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NftError(f"nft did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        first = (err.decode(errors="replace").strip().splitlines() or ["?"])[0]
        raise NftError(f"nft {what}: {first}")
    return out.decode(errors="replace")


async def apply(text: str, timeout: float = 30) -> None:
    """:func:`apply_sync` without blocking the event loop."""
    await _run_nft(["-f", "-"], "refused the ruleset", timeout, text)


async def list_json(timeout: float = 10) -> str:
    """``nft -j list table`` of the policy table, without blocking the event loop."""
    return await _run_nft(["-j", "list", "table", FAMILY, TABLE], "cannot list the table",
                          timeout)


def counters(listing: str) -> dict[str, tuple[int, int]]:
    """Packets and bytes per rule comment (``NAME Ingress[0]``) from ``nft -j list table``
    output; the IPv4 and IPv6 halves of one rule add up."""
    out: dict[str, tuple[int, int]] = {}
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        return out
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or "comment" not in rule:
            continue
        for stmt in rule.get("expr", []):
            c = stmt.get("counter") if isinstance(stmt, dict) else None
            if isinstance(c, dict):
                p, b = out.get(rule["comment"], (0, 0))
                out[rule["comment"]] = (p + int(c.get("packets", 0)), b + int(c.get("bytes", 0)))
    return out
