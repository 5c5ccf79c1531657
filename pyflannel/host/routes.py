"""Routes, neighbours and FDB entries the backends own, and the reconciler that keeps them.

Every route pyflannel installs carries its own routing protocol number, so the set of
``proto pyflannel`` routes in the main table is exactly what the current backend wants:
reconciling removes what is extra (a peer that left, another backend's routes after a switch)
and restores what is missing (after a link flap, or someone's ``ip route del``).

Both address families go through the same functions: the family of a route, neighbour or FDB
entry is the family of its destination, so a dual-stack backend hands IPv4 and IPv6 entries
over together and each is programmed in its own table.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.host.nlsession import iproute

log = logging.getLogger("pyflannel.routes")

RTPROT_PYFLANNEL = 120  # our routes, whatever backend: `ip route show proto 120`
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
ENOENT, ESRCH, EEXIST = 2, 3, 17
FAMILIES = (socket.AF_INET, socket.AF_INET6)

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


def _family(addr: IPNetwork | IPAddress) -> int:
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


@dataclass(frozen=True, order=True)
class NextHop:
    """One path of a multipath (ECMP) route: ``nexthop via gateway dev oif [onlink]``."""

    gateway: IPAddress
    oif: int
    onlink: bool = False


@dataclass(frozen=True)
class RouteSpec:
    """``dst [via gateway] dev oif [onlink]``, IPv4 or IPv6 (the family of ``dst``); with
    ``nexthops`` (sorted, two or more) an ECMP route instead, and ``oif`` 0."""

    dst: IPNetwork
    oif: int
    gateway: IPAddress | None = None
    onlink: bool = False
    nexthops: tuple[NextHop, ...] = ()


def _spec(r, family: int) -> RouteSpec:
    default = "::" if family == socket.AF_INET6 else "0.0.0.0"
    net_cls = IPv6Network if family == socket.AF_INET6 else IPv4Network
    dst = net_cls(f"{r.get('dst') or default}/{r['dst_len']}")
    multipath = r.get("multipath")
    if multipath:
        return RouteSpec(dst, 0, nexthops=tuple(sorted(
            NextHop(ip_address(hop.get("gateway")), hop["oif"],
                    bool(hop["flags"] & RTNH_F_ONLINK))
            for hop in multipath if hop.get("gateway"))))
    gw = r.get("gateway")
    return RouteSpec(dst, r.get("oif"), ip_address(gw) if gw else None,
                     bool(r["flags"] & RTNH_F_ONLINK))


def route_to(ipr: IPRoute, addr: IPAddress) -> tuple[IPAddress, int] | None:
    """Where the kernel sends packets for ``addr``: (the gateway, or ``addr`` itself when it
    is on a connected network; the device), or None without a route. Resolving a BGP next
    hop this way is what BIRD's ``gateway recursive`` does."""
    try:
        found = ipr.route("get", dst=str(addr), family=_family(addr))
    except NetlinkError:
        return None
    for r in found:
        if r.get("type", 1) != 1 or not r.get("oif"):
            return None
        gw = r.get("gateway")
        return (ip_address(gw) if gw else addr), r.get("oif")
    return None


def kernel_routes(ipr: IPRoute) -> dict[IPNetwork, RouteSpec]:
    """Our routes (both families) as the kernel has them now."""
    return {spec.dst: spec for family in FAMILIES
            for spec in (_spec(r, family) for r in ipr.get_routes(
                family=family, table=MAIN_TABLE, proto=RTPROT_PYFLANNEL))}


def foreign_routes(ipr: IPRoute) -> dict[IPNetwork, tuple[int, RouteSpec]]:
    """Unicast routes in the main table (both families) that we did not create, with their
    protocol."""
    return {spec.dst: (r.get("proto"), spec)
            for family in FAMILIES
            for r in ipr.get_routes(family=family, table=MAIN_TABLE)
            if r.get("proto") != RTPROT_PYFLANNEL and r.get("type", 1) == 1
            for spec in [_spec(r, family)]}


def sync_routes(desired: dict[IPNetwork, RouteSpec],
                remove_extra: bool = True) -> tuple[int, int, list[str]]:
    """Make our routes equal ``desired``; returns (added, removed, errors). With
    ``remove_extra`` False our other routes stay (bgp after a restart, until its peers have
    sent all they have).

    Only routes we created (``proto 120``) are ever replaced or deleted. A destination that
    an operator's route already holds is left alone and reported, as flanneld refuses with
    EEXIST, rather than taken over and later deleted. The one exception is a route equal to
    the one we want (flanneld's own, left behind when a node switches daemon): adopting it
    changes nothing on the wire.
    """
    added = removed = 0
    errors: list[str] = []
    with iproute() as ipr:
        current = kernel_routes(ipr)
        foreign = foreign_routes(ipr) if any(d not in current for d in desired) else {}
        for dst in current:
            if dst not in desired and remove_extra:
                try:
                    ipr.route("del", dst=str(dst), table=MAIN_TABLE, proto=RTPROT_PYFLANNEL,
                              family=_family(dst))
                    removed += 1
                except NetlinkError as e:
                    if e.code not in (ENOENT, ESRCH):
                        errors.append(f"del {dst}: {e.args[1] if len(e.args) > 1 else e}")
        for dst, spec in desired.items():
            if current.get(dst) == spec:
                continue
            adopt = dst not in current and dst in foreign
            if adopt and foreign[dst][1] != spec:
                errors.append(f"{dst}: a route to it exists and is not pyflannel's "
                              f"(proto {foreign[dst][0]}); not touching it")
                continue
            kw: dict = {"dst": str(dst), "oif": spec.oif, "table": MAIN_TABLE,
                        "proto": RTPROT_PYFLANNEL, "family": _family(dst)}
            if spec.nexthops:
                del kw["oif"]
                kw["multipath"] = [{"gateway": str(h.gateway), "oif": h.oif,
                                    "flags": RTNH_F_ONLINK if h.onlink else 0}
                                   for h in spec.nexthops]
            elif spec.gateway is not None:
                kw["gateway"] = str(spec.gateway)
            else:
                kw["scope"] = "link"
            if spec.onlink:
                kw["flags"] = RTNH_F_ONLINK
            try:
                # "add" when the destination was free: if someone took it meanwhile the
                # kernel says EEXIST instead of handing their route over to us.
                ipr.route("replace" if dst in current or adopt else "add", **kw)
                added += 1
            except NetlinkError as e:
                if e.code == EEXIST:
                    errors.append(f"{dst}: a route to it exists and is not pyflannel's; "
                                  "not touching it")
                else:
                    errors.append(f"{dst}: {e.args[1] if len(e.args) > 1 else e}")
    return added, removed, errors


def replace_neighbour(ifindex: int, ip: IPAddress, mac: str) -> None:
    """A permanent neighbour entry (ARP for IPv4, NDP for IPv6) from ``ip`` to ``mac``."""
    with iproute() as ipr:
        ipr.neigh("replace", dst=str(ip), lladdr=mac, ifindex=ifindex, state=NUD_PERMANENT,
                  family=_family(ip))


def delete_neighbour(ifindex: int, ip: IPAddress) -> None:
    with iproute() as ipr:
        try:
            ipr.neigh("del", dst=str(ip), ifindex=ifindex, family=_family(ip))
        except NetlinkError as e:
            if e.code not in (ENOENT, ESRCH):
                raise


def replace_fdb(ifindex: int, mac: str, dst: IPAddress) -> None:
    """Send frames for ``mac`` to the VTEP at ``dst`` (an IPv4 or IPv6 underlay address)."""
    with iproute() as ipr:
        ipr.fdb("replace", ifindex=ifindex, lladdr=mac, dst=str(dst), state=NUD_PERMANENT,
                flags=NTF_SELF)


def delete_fdb(ifindex: int, mac: str, dst: IPAddress) -> None:
    with iproute() as ipr:
        try:
            ipr.fdb("del", ifindex=ifindex, lladdr=mac, dst=str(dst), flags=NTF_SELF)
        except NetlinkError as e:
            if e.code not in (ENOENT, ESRCH):
                raise


def neighbours(ifindex: int) -> dict[IPAddress, str]:
    """The device's neighbour entries of both families: address -> MAC."""
    with iproute() as ipr:
        return {ip_address(n.get("dst")): n.get("lladdr")
                for family in FAMILIES
                for n in ipr.get_neighbours(ifindex=ifindex, family=family)
                if n.get("dst") and n.get("lladdr")}


def fdb_entries(ifindex: int) -> dict[str, IPAddress]:
    """The device's FDB entries that name a remote VTEP: MAC -> its underlay address."""
    with iproute() as ipr:
        return {n.get("lladdr"): ip_address(n.get("dst"))
                for n in ipr.fdb("dump", ifindex=ifindex) if n.get("dst")}
