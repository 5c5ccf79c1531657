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
ENOENT, ESRCH = 2, 3


@dataclass(frozen=True)
class RouteSpec:
    """``dst [via gateway] dev oif [onlink]``."""

    dst: IPv4Network
    oif: int
    gateway: IPv4Address | None = None
    onlink: bool = False


def kernel_routes(ipr: IPRoute) -> dict[IPv4Network, RouteSpec]:
    """Our routes as the kernel has them now."""
    out = {}
    for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE, proto=RTPROT_PYFLANNEL):
        dst = IPv4Network(f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}")
        gw = r.get("gateway")
        out[dst] = RouteSpec(dst, r.get("oif"), IPv4Address(gw) if gw else None,
                             bool(r["flags"] & RTNH_F_ONLINK))
    return out


def sync_routes(desired: dict[IPv4Network, RouteSpec]) -> tuple[int, int, list[str]]:
    """Make our routes equal ``desired``; returns (added, removed, errors)."""
    added = removed = 0
    errors: list[str] = []
    with IPRoute() as ipr:
        current = kernel_routes(ipr)
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
            kw: dict = {"dst": str(dst), "oif": spec.oif, "table": MAIN_TABLE,
                        "proto": RTPROT_PYFLANNEL}
            if spec.gateway is not None:
                kw["gateway"] = str(spec.gateway)
            else:
                kw["scope"] = "link"
            if spec.onlink:
                kw["flags"] = RTNH_F_ONLINK
            try:
                ipr.route("replace", **kw)
                added += 1
            except NetlinkError as e:
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
