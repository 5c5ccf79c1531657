"""Links, addresses and routes through pyroute2 (never by parsing ``ip`` output).

Calls are synchronous and short; the asyncio daemon runs them with ``asyncio.to_thread``
because pyroute2's synchronous API drives an event loop of its own.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.host.nlsession import iproute

ESRCH, EEXIST, ENODEV = 3, 17, 19
IFA_F_NODAD = 0x02
NO_IPV4 = IPv4Address("0.0.0.0")  # what an IPv6-only node has instead of an IPv4 address


class InterfaceError(RuntimeError):
    """No usable external interface could be found for the given flags."""


@dataclass(frozen=True)
class ExternalInterface:
    """The interface that carries overlay traffic between hosts.

    ``address6``/``public_ipv6`` are set when the daemon asked for IPv6 (dual-stack or
    IPv6-only networks); an IPv6-only node without IPv4 has ``address == NO_IPV4``.
    """

    name: str
    index: int
    address: IPv4Address  # the interface's own address (where we bind)
    public_ip: IPv4Address  # what peers send to (-public-ip overrides)
    mtu: int
    address6: IPv6Address | None = None  # the interface's global IPv6 address
    public_ipv6: IPv6Address | None = None  # what peers send to (-public-ipv6 overrides)


def _ipv4_addrs(ipr: IPRoute, index: int | None = None) -> list[tuple[int, IPv4Address]]:
    kw = {"index": index} if index is not None else {}
    return [(a["index"], IPv4Address(a.get("address")))
            for a in ipr.get_addr(family=socket.AF_INET, **kw)]


def _ipv6_addrs(ipr: IPRoute, index: int | None = None) -> list[tuple[int, IPv6Address]]:
    """Global IPv6 addresses (ULAs count, as in Go; link-local ones do not), kernel order."""
    kw = {"index": index} if index is not None else {}
    found = []
    for a in ipr.get_addr(family=socket.AF_INET6, **kw):
        addr = IPv6Address(a.get("address"))
        if not (addr.is_link_local or addr.is_loopback or addr.is_multicast):
            found.append((a["index"], addr))
    return found


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
    public_ipv6: str = "",
    want_ipv6: bool = False,
    want_ipv4: bool = True,
) -> ExternalInterface:
    """Pick the interface as flanneld does: ``-iface`` entries in order, then
    ``-iface-regex`` (addresses first, then names), then ``-iface-can-reach``; with none
    of them, the interface holding ``-public-ip`` (or ``-public-ipv6``), else the default
    route's interface.

    ``want_ipv6`` (dual-stack or IPv6-only networks) also finds the interface's IPv6
    address; without other flags the IPv6 default route must leave through the same
    interface as the IPv4 one, as flanneld requires. ``want_ipv4=False`` (IPv6-only) lets
    the interface have no IPv4 address and uses the IPv6 default route alone.
    """
    if not (want_ipv4 or want_ipv6):
        raise InterfaceError("neither IPv4 nor IPv6 is enabled")
    with iproute() as ipr:
        index, addr, addr6 = _select(ipr, iface, iface_regex, iface_can_reach, public_ip,
                                     public_ipv6, want_ipv4, want_ipv6)
        link = _link(ipr, index)
        if link is None:
            raise InterfaceError(f"interface index {index} vanished")
        name = link.get("ifname")
        if addr is None:
            addrs = _ipv4_addrs(ipr, index)
            if addrs:
                addr = addrs[0][1]
            elif want_ipv4:
                raise InterfaceError(f"interface {name} has no IPv4 address")
            else:
                addr = NO_IPV4
        if want_ipv6 and addr6 is None:
            addrs6 = _ipv6_addrs(ipr, index)
            if not addrs6:
                raise InterfaceError(f"interface {name} has no global IPv6 address")
            addr6 = _regex_pick(addrs6, iface_regex) if iface_regex else addrs6[0][1]
        pub = IPv4Address(public_ip) if public_ip else addr
        pub6 = None
        if want_ipv6:
            pub6 = IPv6Address(public_ipv6) if public_ipv6 else addr6
        return ExternalInterface(name, index, addr, pub, int(link.get("mtu")),
                                 addr6 if want_ipv6 else None, pub6)


def _regex_pick(addrs6: list[tuple[int, IPv6Address]], iface_regex: Sequence[str]) -> IPv6Address:
    """The first IPv6 address matching one of the patterns (in pattern order), else the
    first address: a regex that chose the interface by its IPv4 address or name still
    leaves it one IPv6 address to use."""
    for p in iface_regex:
        pat = re.compile(p)
        for _i, a in addrs6:
            if pat.match(str(a)):
                return a
    return addrs6[0][1]


def _by_address6(ipr: IPRoute, addr: IPv6Address) -> int | None:
    for index, a in _ipv6_addrs(ipr):
        if a == addr:
            return index
    return None


def _default_oif(ipr: IPRoute, family: int) -> int | None:
    for r in ipr.get_default_routes(family=family):
        if r.get("oif"):
            return r.get("oif")
        for nh in r.get("multipath") or ():  # an ECMP default: its first hop's interface
            if nh.get("oif"):
                return nh.get("oif")
    return None


def _select(ipr: IPRoute, iface: Sequence[str], iface_regex: Sequence[str], can_reach: str,
            public_ip: str, public_ipv6: str, want_ipv4: bool, want_ipv6: bool,
            ) -> tuple[int, IPv4Address | None, IPv6Address | None]:
    if iface:
        for entry in iface:
            try:
                ip = ipaddress.ip_address(entry)
            except ValueError:
                index = _by_name(ipr, entry)
                if index is not None:
                    return index, None, None
                continue
            if isinstance(ip, IPv4Address):
                index = _by_address(ipr, ip)
                if index is not None:
                    return index, ip, None
            else:
                index = _by_address6(ipr, ip)
                if index is not None:
                    return index, None, ip
        raise InterfaceError(f"none of -iface {', '.join(iface)} names an interface here")
    if iface_regex:
        patterns = [re.compile(p) for p in iface_regex]
        for pat in patterns:
            if want_ipv4:
                for index, addr in _ipv4_addrs(ipr):
                    if pat.match(str(addr)):
                        return index, addr, None
            else:
                for index, addr6 in _ipv6_addrs(ipr):
                    if pat.match(str(addr6)):
                        return index, None, addr6
        for pat in patterns:
            for link in ipr.get_links():
                index = link["index"]
                has = (_ipv4_addrs(ipr, index) if want_ipv4 else _ipv6_addrs(ipr, index))
                if pat.match(link.get("ifname")) and has:
                    return index, None, None
        raise InterfaceError(f"no interface address or name matches -iface-regex "
                             f"{', '.join(iface_regex)}")
    if can_reach:
        try:
            routes = ipr.route("get", dst=can_reach)
        except NetlinkError as e:
            raise InterfaceError(f"-iface-can-reach {can_reach}: no route ({e})") from None
        r = routes[0]
        src = r.get("prefsrc")
        return r.get("oif"), IPv4Address(src) if src else None, None
    if public_ip and want_ipv4:
        index = _by_address(ipr, IPv4Address(public_ip))
        if index is not None:
            return index, IPv4Address(public_ip), None
    if public_ipv6 and want_ipv6 and not want_ipv4:
        index = _by_address6(ipr, IPv6Address(public_ipv6))
        if index is not None:
            return index, None, IPv6Address(public_ipv6)
    oif4 = _default_oif(ipr, socket.AF_INET) if want_ipv4 else None
    oif6 = _default_oif(ipr, socket.AF_INET6) if want_ipv6 else None
    if want_ipv4 and oif4 is None:
        raise InterfaceError("no default route: say which interface to use with -iface")
    if want_ipv6 and oif6 is None:
        raise InterfaceError("no IPv6 default route: say which interface to use with -iface")
    if oif4 is not None and oif6 is not None and oif4 != oif6:
        raise InterfaceError(
            f"the IPv6 default route leaves through {_name_of(ipr, oif6)}, the IPv4 one "
            f"through {_name_of(ipr, oif4)}; they must be the same interface (or name it "
            "with -iface)")
    return (oif4 if oif4 is not None else oif6), None, None  # type: ignore[return-value]


def _name_of(ipr: IPRoute, index: int) -> str:
    link = _link(ipr, index)
    return link.get("ifname") if link is not None else f"index {index}"


def link_index(name: str) -> int | None:
    with iproute() as ipr:
        return _by_name(ipr, name)


def set_device_address(name: str, address: IPv4Address | IPv6Address, mtu: int,
                       txqueuelen: int | None = None, gso_max_size: int | None = None) -> int:
    """Give the overlay device exactly one address of ``address``'s family (``/32`` or
    ``/128``; IPv6 link-local addresses stay), its MTU (and queue length), and bring it up;
    returns its index.

    An IPv6 address is added without duplicate address detection: nobody else can hold
    a subnet's network address, and a tentative address would hold traffic back a second.
    """
    v6 = isinstance(address, IPv6Address)
    family, plen = (socket.AF_INET6, 128) if v6 else (socket.AF_INET, 32)
    with iproute() as ipr:
        index = _by_name(ipr, name)
        if index is None:
            raise InterfaceError(f"device {name} does not exist")
        for a in ipr.get_addr(family=family, index=index):
            have = ipaddress.ip_address(a.get("address"))
            if v6 and have.is_link_local:
                continue
            if have != address or a.get("prefixlen") != plen:
                ipr.addr("del", index=index, address=a.get("address"),
                         prefixlen=a.get("prefixlen"))
        kw_addr = {"flags": IFA_F_NODAD} if v6 else {}
        try:
            ipr.addr("add", index=index, address=str(address), prefixlen=plen, **kw_addr)
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
    """A VXLAN device; ``local`` is an IPv4 or an IPv6 underlay address."""

    name: str
    vni: int
    local: IPv4Address | IPv6Address
    link: int
    port: int
    gbp: bool


def ensure_vxlan(p: VxlanParams) -> tuple[int, str, bool]:
    """The VXLAN device as asked (learning off), reusing an identical one so its MAC, and
    the peers' FDB entries pointing at it, survive our restarts. Returns (index, MAC,
    created)."""
    with iproute() as ipr:
        index = _by_name(ipr, p.name)
        if index is not None:
            if _vxlan_matches(ipr.get_links(index)[0], p):
                link = ipr.get_links(index)[0]
                return index, link.get("address"), False
            ipr.link("del", index=index)
        kw: dict = {"vxlan_gbp": True} if p.gbp else {}
        kw["vxlan_local6" if p.local.version == 6 else "vxlan_local"] = str(p.local)
        ipr.link("add", ifname=p.name, kind="vxlan", vxlan_id=p.vni, vxlan_link=p.link,
                 vxlan_port=p.port, vxlan_learning=0, **kw)
        _no_router_adverts(p.name)
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
    local = data.get_attr("IFLA_VXLAN_LOCAL6" if p.local.version == 6 else "IFLA_VXLAN_LOCAL")
    try:
        same_local = local is not None and ipaddress.ip_address(local) == p.local
    except ValueError:
        same_local = False
    return (data.get_attr("IFLA_VXLAN_ID") == p.vni
            and same_local
            and data.get_attr("IFLA_VXLAN_LINK") == p.link
            and data.get_attr("IFLA_VXLAN_PORT") == p.port
            and not data.get_attr("IFLA_VXLAN_LEARNING")
            and bool(data.get_attr("IFLA_VXLAN_GBP") is not None) == p.gbp)


def _no_router_adverts(name: str) -> None:
    """flanneld turns router advertisements off on its VTEPs: an overlay device must not
    pick up addresses or routes from the overlay."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as f:
            f.write("0")
    except OSError:
        pass


def link_kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def remove_stale_devices(keep: str | Collection[str] | None) -> list[str]:
    """Delete overlay devices of other backends (``flannel0``, ``flannel.<VNI>``,
    ``flannel-v6.<VNI>``) left by an earlier run, except those named in ``keep``. Their
    routes, neighbours and FDB entries go with them."""
    kept = {keep} if isinstance(keep, str) else set(keep or ())
    removed = []
    with iproute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            ours = name == "flannel0" or (name.startswith(("flannel.", "flannel-v6."))
                                          and link_kind(link) == "vxlan")
            if ours and name not in kept:
                try:
                    ipr.link("del", index=link["index"])
                    removed.append(name)
                except NetlinkError as e:
                    if e.code != ENODEV:
                        raise
    return removed


def interface_networks(index: int) -> list[IPv4Network | IPv6Network]:
    """The networks (both families; IPv6 link-local left out) directly connected through
    interface ``index``."""
    with iproute() as ipr:
        nets: list[IPv4Network | IPv6Network] = [
            IPv4Network(f"{a.get('address')}/{a.get('prefixlen')}", strict=False)
            for a in ipr.get_addr(family=socket.AF_INET, index=index)]
        for a in ipr.get_addr(family=socket.AF_INET6, index=index):
            net = IPv6Network(f"{a.get('address')}/{a.get('prefixlen')}", strict=False)
            if not net.is_link_local:
                nets.append(net)
        return nets


def interface_addresses(index: int) -> set[IPv4Address | IPv6Address]:
    """The interface's IPv4 and global IPv6 addresses."""
    with iproute() as ipr:
        return {a for _i, a in _ipv4_addrs(ipr, index)} | {a for _i, a in _ipv6_addrs(ipr, index)}


def local_ipv4_addresses() -> set[IPv4Address]:
    with iproute() as ipr:
        return {a for _i, a in _ipv4_addrs(ipr)}
