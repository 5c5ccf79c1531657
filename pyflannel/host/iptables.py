"""flanneld's masquerade (nat) and forward (filter) rules, kept in place with iptables tools.

Why the command-line tools: there is no netlink API for iptables rules here, and the
tools work the same on the nft and legacy backends. Why this shape:

* our rules live in our own chains (``FLANNEL-POSTRTG`` in nat, ``FLANNEL-FWD`` in
  filter), reached by one jump each from POSTROUTING / FORWARD, so we never have to
  reason about other software's rules;
* checking is cheap (one ``iptables-save`` per table) and runs every few seconds;
* repairing is one atomic ``iptables-restore --noflush``: re-declaring a user chain in
  that mode flushes it, so the chain is always refilled from scratch in the right order
  and a changed subnet leaves nothing of the old one behind.

Rules are rendered in exactly the spelling ``iptables-save`` prints, so "is it there?" is
a string comparison.

IPv6 (dual-stack and IPv6-only networks) gets the same chains and rules in ip6tables, for
the IPv6 network and subnet, with ``ff00::/8`` as the multicast range: what flanneld
installs (its MasqIP6Rules and ForwardRules for the IPv6 network). One :class:`Iptables`
per family runs that family's tools.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network

__all__ = [
    "FWD_CHAIN",
    "FWD_COMMENT",
    "MASQ_COMMENT",
    "NAT_CHAIN",
    "Iptables",
    "IptablesError",
    "RuleSet",
    "Snapshot",
    "missing",
    "unexpected",
]

NAT_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
MULTICAST = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"
# Packets carrying this mark are to be masqueraded by someone else (kube-proxy): leave them.
SKIP_MARK = "0x4000/0x4000"

_PROBE_CHAIN = "FLANNEL-RF-PROBE"
_TIMEOUT = 30.0
# (table, built-in chain we jump from, our chain)
_NAT = ("nat", "POSTROUTING", NAT_CHAIN)
_FILTER = ("filter", "FORWARD", FWD_CHAIN)


class IptablesError(RuntimeError):
    """An iptables tool failed; the message is one line and carries the tool's stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = " ".join(stderr.split()) or "no error output"
        status = "timed out" if returncode is None else f"exit {returncode}"
        super().__init__(f"{' '.join(self.argv)} failed ({status}): {detail}")


def _jump(builtin: str, chain: str, comment: str) -> str:
    return f'-A {builtin} -m comment --comment "{comment}" -j {chain}'


@dataclass(frozen=True)
class RuleSet:
    """What the tables should contain for one lease and one address family; pure, so it
    is easy to test.

    ``network``/``subnet`` are both IPv4 (iptables) or both IPv6 (ip6tables) and also
    accept strings ("10.1.0.0/16", "fc00:10:1::/48").
    """

    network: IPv4Network | IPv6Network
    subnet: IPv4Network | IPv6Network
    masq: bool = True
    forward: bool = True
    random_fully: bool = False

    def __post_init__(self) -> None:
        # Accept strings for convenience; keep the dataclass frozen.
        network, subnet = ip_network(self.network), ip_network(self.subnet)
        if network.version != subnet.version:
            raise ValueError(f"network {network} and subnet {subnet} are of different "
                             "address families")
        object.__setattr__(self, "network", network)
        object.__setattr__(self, "subnet", subnet)

    @property
    def version(self) -> int:
        """4 for iptables, 6 for ip6tables."""
        return self.network.version

    def nat_rules(self) -> list[str]:
        """FLANNEL-POSTRTG's rules in order (empty when masquerading is off)."""
        if not self.masq:
            return []
        net, sub, c = self.network, self.subnet, f'-m comment --comment "{MASQ_COMMENT}"'
        masq = "-j MASQUERADE --random-fully" if self.random_fully else "-j MASQUERADE"
        multicast = MULTICAST if self.version == 4 else MULTICAST6
        a = f"-A {NAT_CHAIN}"
        return [
            f"{a} -m mark --mark {SKIP_MARK} {c} -j RETURN",
            f"{a} -s {sub} -d {net} {c} -j RETURN",
            f"{a} -s {net} -d {sub} {c} -j RETURN",
            f"{a} ! -s {net} -d {sub} {c} -j RETURN",
            f"{a} -s {net} ! -d {multicast} {c} {masq}",
            f"{a} ! -s {net} -d {net} {c} {masq}",
        ]

    def filter_rules(self) -> list[str]:
        """FLANNEL-FWD's rules in order (empty when forward rules are off)."""
        if not self.forward:
            return []
        c = f'-m comment --comment "{FWD_COMMENT}"'
        return [
            f"-A {FWD_CHAIN} -s {self.network} {c} -j ACCEPT",
            f"-A {FWD_CHAIN} -d {self.network} {c} -j ACCEPT",
        ]

    def nat_jump(self) -> str:
        """The POSTROUTING rule that sends packets through our nat chain."""
        return _jump("POSTROUTING", NAT_CHAIN, MASQ_COMMENT)

    def filter_jump(self) -> str:
        """The FORWARD rule that sends packets through our filter chain."""
        return _jump("FORWARD", FWD_CHAIN, FWD_COMMENT)

    def tables(self) -> list[tuple[str, str, str, str, list[str]]]:
        """(table, builtin chain, our chain, jump line, chain rules) for each enabled table."""
        out = []
        if self.masq:
            out.append(("nat", "POSTROUTING", NAT_CHAIN, self.nat_jump(), self.nat_rules()))
        if self.forward:
            out.append(("filter", "FORWARD", FWD_CHAIN, self.filter_jump(), self.filter_rules()))
        return out

    def restore_payload(self, present: Snapshot) -> str:
        """One ``iptables-restore --noflush`` input that puts everything in place.

        Our chains are re-declared (which flushes them) and refilled; a jump is added only
        when ``present`` lacks it, and surplus copies of it are deleted. Empty string when
        nothing is enabled.
        """
        parts: list[str] = []
        for table, builtin, chain, jump, rules in self.tables():
            lines = [f"*{table}", f":{chain} - [0:0]"]
            count = present.count(table, builtin, jump)
            if count == 0:
                lines.append(jump)
            lines.extend("-D" + jump[2:] for _ in range(count - 1))
            lines.extend(rules)
            lines.append("COMMIT")
            parts.append("\n".join(lines) + "\n")
        return "".join(parts)


@dataclass
class Snapshot:
    """The rules of some tables as ``iptables-save`` printed them, grouped by chain."""

    chains: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, *texts: str) -> Snapshot:
        """Parse one or more ``iptables-save`` outputs (any tables; comments ignored)."""
        snap = cls()
        table: dict[str, list[str]] | None = None
        for text in texts:
            for raw in text.splitlines():
                line = raw.rstrip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("*"):
                    table = snap.chains.setdefault(line[1:], {})
                elif table is None or line == "COMMIT":
                    continue
                elif line.startswith(":"):
                    table.setdefault(line[1:].split(" ", 1)[0], [])
                elif line.startswith("-A "):
                    name = line.split(" ", 2)[1]
                    table.setdefault(name, []).append(line)
        return snap

    def has_chain(self, table: str, chain: str) -> bool:
        """True if ``chain`` exists in ``table``."""
        return chain in self.chains.get(table, {})

    def rules(self, table: str, chain: str) -> list[str]:
        """The ``-A`` lines of ``chain`` in order (empty if it does not exist)."""
        return list(self.chains.get(table, {}).get(chain, []))

    def count(self, table: str, chain: str, line: str) -> int:
        """How many times exactly ``line`` appears in ``chain``."""
        return self.chains.get(table, {}).get(chain, []).count(line)


def _in_order(expected: list[str], actual: list[str]) -> tuple[list[str], list[str]]:
    """Greedy in-order match: (expected lines not matched, actual lines not matched)."""
    absent: list[str] = []
    extra: list[str] = []
    i = 0
    for line in expected:
        j = i
        while j < len(actual) and actual[j] != line:
            j += 1
        if j == len(actual):
            absent.append(line)
            continue
        extra.extend(actual[i:j])
        i = j + 1
    extra.extend(actual[i:])
    return absent, extra


def missing(expected: RuleSet, snapshot: Snapshot) -> list[str]:
    """Expected lines that are absent or out of order (jump first, then chain rules)."""
    out: list[str] = []
    for table, builtin, chain, jump, rules in expected.tables():
        if snapshot.count(table, builtin, jump) == 0:
            out.append(jump)
        out.extend(_in_order(rules, snapshot.rules(table, chain))[0])
    return out


def unexpected(expected: RuleSet, snapshot: Snapshot) -> list[str]:
    """Lines that should not be there: foreign or stale rules in our chains, extra jumps."""
    out: list[str] = []
    for table, builtin, chain, jump, rules in expected.tables():
        out.extend([jump] * max(0, snapshot.count(table, builtin, jump) - 1))
        out.extend(_in_order(rules, snapshot.rules(table, chain))[1])
    return out


class Iptables:
    """Runs one family's tools (iptables-* for ``family=4``, ip6tables-* for 6), optionally
    behind an argv prefix (e.g. ``ip netns exec``)."""

    def __init__(self, prefix: Sequence[str] = (), family: int = 4) -> None:
        if family not in (4, 6):
            raise ValueError(f"address family {family!r} is not 4 or 6")
        self.prefix = list(prefix)
        self.family = family
        self._tool = "iptables" if family == 4 else "ip6tables"
        self._random_fully: bool | None = None

    def _run(self, tool: str, *args: str, input: str | None = None) -> str:
        argv = [*self.prefix, tool, *args]
        try:
            proc = subprocess.run(
                argv, input=input, capture_output=True, text=True, timeout=_TIMEOUT,
                stdin=subprocess.DEVNULL if input is None else None,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr or ""
            if isinstance(err, bytes):
                err = err.decode(errors="replace")
            raise IptablesError(argv, None, err) from exc
        except OSError as exc:
            raise IptablesError(argv, -1, str(exc)) from exc
        if proc.returncode != 0:
            raise IptablesError(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def _restore(self, payload: str) -> None:
        self._run(f"{self._tool}-restore", "-w", "5", "--noflush", input=payload)

    def supports_random_fully(self) -> bool:
        """Whether MASQUERADE accepts --random-fully here; probed once, then cached.

        The probe restores a scratch nat chain holding such a rule and deletes it again.
        """
        if self._random_fully is None:
            declare = f"*nat\n:{_PROBE_CHAIN} - [0:0]\n"
            try:
                self._restore(f"{declare}-A {_PROBE_CHAIN} -j MASQUERADE --random-fully\nCOMMIT\n")
                ok = True
            except IptablesError:
                ok = False
            # Declaring flushes the chain (whatever the probe left), then it is deleted.
            self._restore(f"{declare}-X {_PROBE_CHAIN}\nCOMMIT\n")
            self._random_fully = ok
        return self._random_fully

    def snapshot(self, tables: Iterable[str] = ("nat", "filter")) -> Snapshot:
        """Current rules of ``tables``: one ``iptables-save`` per table."""
        return Snapshot.parse(*(self._run(f"{self._tool}-save", "-t", t) for t in tables))

    def _effective(self, rules: RuleSet) -> RuleSet:
        if rules.version != self.family:
            raise ValueError(f"IPv{rules.version} rules given to {self._tool}")
        if rules.masq and rules.random_fully and not self.supports_random_fully():
            return replace(rules, random_fully=False)
        return rules

    def ensure(self, rules: RuleSet) -> bool:
        """Repair anything missing or wrong in one restore; True if a restore was needed.

        Only the enabled tables are checked; ``random_fully`` silently falls back to plain
        MASQUERADE when the kernel or tools lack it.
        """
        rules = self._effective(rules)
        tables = [t[0] for t in rules.tables()]
        if not tables:
            return False
        snap = self.snapshot(tables)
        if not missing(rules, snap) and not unexpected(rules, snap):
            return False
        self._restore(rules.restore_payload(snap))
        return True

    def remove(self, *, nat: bool = True, filter: bool = True) -> None:
        """Delete our jumps and chains (by default in both tables); absent ones are fine."""
        wanted = [spec for spec, on in ((_NAT, nat), (_FILTER, filter)) if on]
        if not wanted:
            return
        snap = self.snapshot([spec[0] for spec in wanted])
        parts: list[str] = []
        for table, builtin, chain in wanted:
            # Any jump to our chain, also one spelled differently (older versions, by hand).
            jumps = [r for r in snap.rules(table, builtin) if r.endswith(f" -j {chain}")]
            if not jumps and not snap.has_chain(table, chain):
                continue
            # Declaring makes sure the chain exists and is empty, so -X cannot fail.
            lines = [f"*{table}", f":{chain} - [0:0]"]
            lines.extend("-D" + jump[2:] for jump in jumps)
            lines += [f"-X {chain}", "COMMIT"]
            parts.append("\n".join(lines) + "\n")
        if parts:
            self._restore("".join(parts))
