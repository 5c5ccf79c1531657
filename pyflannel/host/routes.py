"""Routes, neighbours and FDB entries the backends own, and the reconciler that keeps them.

Every route pyflannel installs carries its own routing protocol number, so the set of
``proto pyflannel`` routes in the main table is exactly what the current backend wants:
reconciling removes what is extra (a peer that left, another backend's routes after a switch)
and restores what is missing (after a link flap, or someone's ``ip route del``).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("pyflannel.routes")

RTPROT_PYFLANNEL = 120  # our routes, whatever backend: `ip route show proto 120`
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
ENOENT, ESRCH, EEXIST = 2, 3, 17


@dataclass(frozen=True)
class RouteSpec:
    """``dst [via gateway] dev oif [onlink]``."""

    dst: IPv4Network
    oif: int
    gateway: IPv4Address | None = None
    onlink: bool = False


def _spec(r) -> RouteSpec:
    dst = IPv4Network(f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}")
    gw = r.get("gateway")
    return RouteSpec(dst, r.get("oif"), IPv4Address(gw) if gw else None,
                     bool(r["flags"] & RTNH_F_ONLINK))


def kernel_routes(ipr: IPRoute) -> dict[IPv4Network, RouteSpec]:
    """Our routes as the kernel has them now."""
    return {spec.dst: spec for spec in map(_spec, ipr.get_routes(
        family=socket.AF_INET, table=MAIN_TABLE, proto=RTPROT_PYFLANNEL))}


def foreign_routes(ipr: IPRoute) -> dict[IPv4Network, tuple[int, RouteSpec]]:
    """Unicast routes in the main table that we did not create, with their protocol."""
    return {spec.dst: (r.get("proto"), spec)
            for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
            if r.get("proto") != RTPROT_PYFLANNEL and r.get("type", 1) == 1
            for spec in [_spec(r)]}


def sync_routes(desired: dict[IPv4Network, RouteSpec]) -> tuple[int, int, list[str]]:
    """Make our routes equal ``desired``; returns (added, removed, errors).

    Only routes we created (``proto 120``) are ever replaced or deleted. A destination that
    an operator's route already holds is left alone and reported, as flanneld refuses with
    EEXIST, rather than taken over and later deleted. The one exception is a route equal to
    the one we want (flanneld's own, left behind when a node switches daemon): adopting it
    changes nothing on the wire.
    """
    added = removed = 0
    errors: list[str] = []
    with IPRoute() as ipr:
        current = kernel_routes(ipr)
        foreign = foreign_routes(ipr) if any(d not in current for d in desired) else {}
        for dst in current:
            if dst not in desired:
                try:
                    ipr.route("del", dst=str(dst), table=MAIN_TABLE, proto=RTPROT_PYFLANNEL)
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
                        "proto": RTPROT_PYFLANNEL}
            if spec.gateway is not None:
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


def replace_neighbour(ifindex: int, ip: IPv4Address, mac: str) -> None:
    with IPRoute() as ipr:
        ipr.neigh("replace", dst=str(ip), lladdr=mac, ifindex=ifindex, state=NUD_PERMANENT)


def delete_neighbour(ifindex: int, ip: IPv4Address) -> None:
    with IPRoute() as ipr:
        try:
            ipr.neigh("del", dst=str(ip), ifindex=ifindex)
        except NetlinkError as e:
            if e.code not in (ENOENT, ESRCH):
                raise


def replace_fdb(ifindex: int, mac: str, dst: IPv4Address) -> None:
    with IPRoute() as ipr:
        ipr.fdb("replace", ifindex=ifindex, lladdr=mac, dst=str(dst), state=NUD_PERMANENT,
                flags=NTF_SELF)


def delete_fdb(ifindex: int, mac: str, dst: IPv4Address) -> None:
    with IPRoute() as ipr:
        try:
            ipr.fdb("del", ifindex=ifindex, lladdr=mac, dst=str(dst), flags=NTF_SELF)
        except NetlinkError as e:
            if e.code not in (ENOENT, ESRCH):
                raise


def neighbours(ifindex: int) -> dict[IPv4Address, str]:
    with IPRoute() as ipr:
        return {IPv4Address(n.get("dst")): n.get("lladdr")
                for n in ipr.get_neighbours(ifindex=ifindex, family=socket.AF_INET)
                if n.get("dst") and n.get("lladdr")}


def fdb_entries(ifindex: int) -> dict[str, IPv4Address]:
    with IPRoute() as ipr:
        return {n.get("lladdr"): IPv4Address(n.get("dst"))
                for n in ipr.fdb("dump", ifindex=ifindex) if n.get("dst")}
