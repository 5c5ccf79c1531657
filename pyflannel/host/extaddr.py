"""When the external interface's address changes: which address the node uses now, and
whether the change is one to follow.

The decisions are pure (``pick``, ``judge``); ``read_interface`` is the one netlink read
they need, run in the netlink thread. The daemon's address watch (``daemon/address_watch.py``)
carries out the verdicts.

A change counts only when the address in use is gone from the interface (or the interface
itself went and came back under a new index): adding a second address, as a DHCP client
does before it drops the old one, moves nothing. An address the operator named
(``-public-ip``, ``-public-ipv6``, an address in ``-iface``) is never replaced by another.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address

from pyflannel.host import netlink
from pyflannel.host.netlink import NO_IPV4, ExternalInterface
from pyflannel.host.nlsession import iproute

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class Seen:
    """What the interface of that name holds now (addresses in kernel order)."""

    name: str
    index: int
    ipv4: tuple[IPv4Address, ...] = ()
    ipv6: tuple[IPv6Address, ...] = ()  # global ones (ULAs count), as at start-up


@dataclass(frozen=True)
class Pins:
    """For each family, the flag that names the node's address ("" when chosen from the
    interface): such an address is never swapped for another one."""

    ipv4: str = ""
    ipv6: str = ""

    @classmethod
    def from_flags(cls, iface: Sequence[str] = (), public_ip: str = "",
                   public_ipv6: str = "") -> Pins:
        named = {4: "", 6: ""}
        for entry in iface:
            try:
                named[ipaddress.ip_address(entry).version] = f"-iface={entry}"
            except ValueError:
                continue
        return cls(ipv4=f"-public-ip={public_ip}" if public_ip else named[4],
                   ipv6=f"-public-ipv6={public_ipv6}" if public_ipv6 else named[6])


@dataclass(frozen=True)
class Verdict:
    """``same``: nothing to do (ready). ``moved``: follow ``ext``. ``waiting`` (the
    interface or its address is gone) and ``pinned`` (a named address is gone): not ready
    until it changes. ``line`` says what happened, once."""

    kind: str
    line: str = ""
    ext: ExternalInterface | None = None

    @property
    def settled(self) -> bool:
        return self.kind == "same"


def pick(current: IPAddress | None, held: Sequence[IPAddress],
         patterns: Sequence[str] = ()) -> IPAddress | None:
    """The address to use among ``held``: the current one while the interface keeps it;
    else the first matching one of the -iface-regex patterns (in pattern order), else the
    first one; None when there is none."""
    if current is not None and current in held:
        return current
    for p in patterns:
        pat = re.compile(p)
        for a in held:
            if pat.match(str(a)):
                return a
    return held[0] if held else None


def judge(running: ExternalInterface, seen: Seen | None, pins: Pins, *, want_ipv4: bool,
          want_ipv6: bool, patterns: Sequence[str] = ()) -> Verdict:
    """What the daemon must do, given the interface it runs on and what that interface
    holds now (None: it is gone)."""
    name = running.name
    if seen is None:
        return Verdict("waiting", f"interface {name} is gone; waiting for it to come back")
    new4, new6 = running.address, running.address6
    what: list[str] = []
    for family, on, pin, old, held in ((4, want_ipv4, pins.ipv4, running.address, seen.ipv4),
                                       (6, want_ipv6, pins.ipv6, running.address6, seen.ipv6)):
        if not on or (family == 4 and old == NO_IPV4):
            continue
        label = "address" if family == 4 else "IPv6 address"
        if pin:
            if old not in held:
                return Verdict("pinned", f"{label} {old} is no longer on {name}, and {pin} "
                               "names it: not following another address; not ready until "
                               "it is back")
            continue
        chosen = pick(old, held, patterns)
        if chosen is None:
            return Verdict("waiting", f"interface {name} has no {label} any more (was "
                           f"{old}); waiting for one")
        if chosen != old:
            what.append(f"{label} {old} -> {chosen}")
        if family == 4:
            new4 = chosen  # type: ignore[assignment]
        else:
            new6 = chosen  # type: ignore[assignment]
    if seen.index != running.index:
        what.append(f"index {running.index} -> {seen.index}")
    if not what:
        return Verdict("same")
    ext = replace(running, index=seen.index, address=new4, address6=new6,
                  public_ip=running.public_ip if pins.ipv4 else new4,
                  public_ipv6=running.public_ipv6 if pins.ipv6 else new6)
    return Verdict("moved", f"interface {name} changed ({', '.join(what)})", ext)


def read_interface(name: str) -> Seen | None:
    """The interface's index and addresses now; None when no interface has that name
    (runs in the netlink thread)."""
    with iproute() as ipr:
        index = netlink._by_name(ipr, name)
        if index is None:
            return None
        return Seen(name, index,
                    tuple(a for _i, a in netlink._ipv4_addrs(ipr, index)),
                    tuple(a for _i, a in netlink._ipv6_addrs(ipr, index)))
