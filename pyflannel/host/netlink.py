"""Links, addresses and routes through pyroute2 (never by parsing ``ip`` output).

Calls are synchronous and short; the asyncio daemon runs them with ``asyncio.to_thread``
because pyroute2's synchronous API drives an event loop of its own.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

ESRCH, EEXIST, ENODEV = 3, 17, 19


class InterfaceError(RuntimeError):
    """No usable external interface could be found for the given flags."""


@dataclass(frozen=True)
class ExternalInterface:
    """The interface that carries overlay traffic between hosts."""

    name: str
    index: int
    address: IPv4Address  # the interface's own address (where we bind)
    public_ip: IPv4Address  # what peers send to (-public-ip overrides)
    mtu: int


def _ipv4_addrs(ipr: IPRoute, index: int | None = None) -> list[tuple[int, IPv4Address]]:
    kw = {"index": index} if index is not None else {}
    return [(a["index"], IPv4Address(a.get("address")))
            for a in ipr.get_addr(family=socket.AF_INET, **kw)]


def _link(ipr: IPRoute, index: int):
    links = ipr.get_links(index)
    return links[0] if links else None


def _by_name(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _by_address(ipr: IPRoute, addr: IPv4Address) -> int | None:
    for index, a in _ipv4_addrs(ipr):
        if a == addr:
            return index
    return None


def find_external_interface(
    iface: Sequence[str] = (),
    iface_regex: Sequence[str] = (),
    iface_can_reach: str = "",
    public_ip: str = "",
) -> ExternalInterface:
    """Pick the interface as flanneld does: ``-iface`` entries in order, then
    ``-iface-regex`` (addresses first, then names), then ``-iface-can-reach``; with none
    of them, the interface holding ``-public-ip``, else the default route's interface."""
    with IPRoute() as ipr:
        index, addr = _select(ipr, iface, iface_regex, iface_can_reach, public_ip)
        link = _link(ipr, index)
        if link is None:
            raise InterfaceError(f"interface index {index} vanished")
        name = link.get("ifname")
        if addr is None:
            addrs = _ipv4_addrs(ipr, index)
            if not addrs:
                raise InterfaceError(f"interface {name} has no IPv4 address")
            addr = addrs[0][1]
        pub = IPv4Address(public_ip) if public_ip else addr
        return ExternalInterface(name, index, addr, pub, int(link.get("mtu")))


def _select(ipr: IPRoute, iface: Sequence[str], iface_regex: Sequence[str],
            can_reach: str, public_ip: str) -> tuple[int, IPv4Address | None]:
    if iface:
        for entry in iface:
            try:
                addr = IPv4Address(entry)
            except ValueError:
                index = _by_name(ipr, entry)
                if index is not None:
                    return index, None
                continue
            index = _by_address(ipr, addr)
            if index is not None:
                return index, addr
        raise InterfaceError(f"none of -iface {', '.join(iface)} names an interface here")
    if iface_regex:
        patterns = [re.compile(p) for p in iface_regex]
        for pat in patterns:
            for index, addr in _ipv4_addrs(ipr):
                if pat.fullmatch(str(addr)) or pat.match(str(addr)):
                    return index, addr
        for pat in patterns:
            for link in ipr.get_links():
                if pat.match(link.get("ifname")) and _ipv4_addrs(ipr, link["index"]):
                    return link["index"], None
        raise InterfaceError(f"no interface address or name matches -iface-regex "
                             f"{', '.join(iface_regex)}")
    if can_reach:
        try:
            routes = ipr.route("get", dst=can_reach)
        except NetlinkError as e:
            raise InterfaceError(f"-iface-can-reach {can_reach}: no route ({e})") from None
        r = routes[0]
        src = r.get("prefsrc")
        return r.get("oif"), IPv4Address(src) if src else None
    if public_ip:
        index = _by_address(ipr, IPv4Address(public_ip))
        if index is not None:
            return index, IPv4Address(public_ip)
    defaults = ipr.get_default_routes(family=socket.AF_INET)
    for r in defaults:
        if r.get("oif"):
            return r.get("oif"), None
    raise InterfaceError("no default route: say which interface to use with -iface")


def link_index(name: str) -> int | None:
    with IPRoute() as ipr:
        return _by_name(ipr, name)


def set_device_address(name: str, address: IPv4Address, mtu: int,
                       txqueuelen: int | None = None, gso_max_size: int | None = None) -> int:
    """Give the overlay device exactly one address (``address``/32), its MTU (and queue
    length), and bring it up; returns its index."""
    with IPRoute() as ipr:
        index = _by_name(ipr, name)
        if index is None:
            raise InterfaceError(f"device {name} does not exist")
        for a in ipr.get_addr(family=socket.AF_INET, index=index):
            if IPv4Address(a.get("address")) != address or a.get("prefixlen") != 32:
                ipr.addr("del", index=index, address=a.get("address"),
                         prefixlen=a.get("prefixlen"))
        try:
            ipr.addr("add", index=index, address=str(address), prefixlen=32)
        except NetlinkError as e:
            if e.code != EEXIST:
                raise
        kw = {"txqlen": txqueuelen} if txqueuelen else {}
        if gso_max_size:
            kw["gso_max_size"] = gso_max_size
        ipr.link("set", index=index, mtu=mtu, state="up", **kw)
        return index


@dataclass(frozen=True)
class VxlanParams:
    name: str
    vni: int
    local: IPv4Address
    link: int
    port: int
    gbp: bool


def ensure_vxlan(p: VxlanParams) -> tuple[int, str, bool]:
    """The VXLAN device as asked (learning off), reusing an identical one so its MAC, and
    the peers' FDB entries pointing at it, survive our restarts. Returns (index, MAC,
    created)."""
    with IPRoute() as ipr:
        index = _by_name(ipr, p.name)
        if index is not None:
            if _vxlan_matches(ipr.get_links(index)[0], p):
                link = ipr.get_links(index)[0]
                return index, link.get("address"), False
            ipr.link("del", index=index)
        kw = {"vxlan_gbp": True} if p.gbp else {}
        ipr.link("add", ifname=p.name, kind="vxlan", vxlan_id=p.vni, vxlan_local=str(p.local),
                 vxlan_link=p.link, vxlan_port=p.port, vxlan_learning=0, **kw)
        index = _by_name(ipr, p.name)
        link = ipr.get_links(index)[0]
        return index, link.get("address"), True


def _vxlan_matches(link, p: VxlanParams) -> bool:
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    if data is None:
        return False
    return (data.get_attr("IFLA_VXLAN_ID") == p.vni
            and data.get_attr("IFLA_VXLAN_LOCAL") == str(p.local)
            and data.get_attr("IFLA_VXLAN_LINK") == p.link
            and data.get_attr("IFLA_VXLAN_PORT") == p.port
            and not data.get_attr("IFLA_VXLAN_LEARNING")
            and bool(data.get_attr("IFLA_VXLAN_GBP") is not None) == p.gbp)


def link_kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def remove_stale_devices(keep: str | None) -> list[str]:
    """Delete overlay devices of other backends (``flannel0``, ``flannel.<VNI>``) left by an
    earlier run, except ``keep``. Their routes, neighbours and FDB entries go with them."""
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            ours = name == "flannel0" or (name.startswith("flannel.")
                                          and link_kind(link) == "vxlan")
            if ours and name != keep:
                try:
                    ipr.link("del", index=link["index"])
                    removed.append(name)
                except NetlinkError as e:
                    if e.code != ENODEV:
                        raise
    return removed


def interface_networks(index: int) -> list[IPv4Network]:
    """The IPv4 networks directly connected through interface ``index``."""
    with IPRoute() as ipr:
        return [IPv4Network(f"{a.get('address')}/{a.get('prefixlen')}", strict=False)
                for a in ipr.get_addr(family=socket.AF_INET, index=index)]


def interface_addresses(index: int) -> set[IPv4Address]:
    with IPRoute() as ipr:
        return {a for _i, a in _ipv4_addrs(ipr, index)}


def local_ipv4_addresses() -> set[IPv4Address]:
    with IPRoute() as ipr:
        return {a for _i, a in _ipv4_addrs(ipr)}
