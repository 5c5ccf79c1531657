"""The udp backend: TUN ``flannel0``, each inner packet sent raw to the peer on 8285.

The data path is the fast-path process; this module sets the host up around it and keeps
its peer table current.

flanneld's udp backend is IPv4 only. Here the TUN carries IPv6 inner packets too, in both
framings: over the IPv4 underlay in a dual-stack network, and over the IPv6 underlay in an
IPv6-only one (where the lease's PublicIP is the 0.0.0.0 placeholder). A peer receives
IPv6 only when its lease says it carries it (``BackendV6Data``, which flanneld's udp
backend never writes), so a flanneld udp node is never sent a packet it would mangle.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from ipaddress import IPv4Address, IPv6Address

from pyflannel.backend.base import Backend, BackendError, endpoint_problem
from pyflannel.fastpath.forwarder import tune_socket
from pyflannel.fastpath.frames import FRAMING_NAME, MAX_DATAGRAM, VNET_LEN
from pyflannel.fastpath.handle import FastPath, Route
from pyflannel.host import netlink
from pyflannel.host.netlink import ExternalInterface
from pyflannel.host.nlsession import run_netlink
from pyflannel.host.routes import IPNetwork, RouteSpec
from pyflannel.host.tun import open_tun, set_overlay_ipv6
from pyflannel.lease.model import NO_PUBLIC_IP, Lease, LeaseAttrs

log = logging.getLogger("pyflannel.udp")

DEVICE = "flannel0"
UDP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
UDP6_OVERHEAD = 48  # outer IPv6 (40) + UDP (8)
TX_QUEUE_LEN = 10000  # flanneld keeps the default 500 and drops bursts
# Keep the kernel's super-packets small enough for one train (one GSO send of at most
# 65507 bytes, with a 6-byte header per chunk and the virtio-net header).
GSO_MAX_SIZE = MAX_DATAGRAM - VNET_LEN - 6 * 64


def advertised_framings(lease: Lease, family: int = 4) -> list[str]:
    """Extra framings a peer accepts for one inner family, from its udp lease's
    BackendData (IPv4) or BackendV6Data (IPv6); flanneld advertises none."""
    data = lease.attrs.backend_data if family == 4 else lease.attrs.backend_v6_data
    found = data.get("Framings") if isinstance(data, dict) else None
    return [f for f in found if isinstance(f, str)] if isinstance(found, list) else []


def carries_ipv6(lease: Lease) -> bool:
    """Does this udp peer take IPv6 inner packets? Only a lease with an IPv6 subnet and
    BackendV6Data says so (flanneld's udp backend writes neither)."""
    return lease.ipv6_subnet is not None and isinstance(lease.attrs.backend_v6_data, dict)


class UdpBackend(Backend):
    type = "udp"
    device = DEVICE  # the TUN; the raw-socket tunnels name their own

    def __init__(self, cfg, ext, framing: str = "", *, mode: str = "process",
                 gso: bool = True, gro: bool = True, coalesce: bool = True) -> None:
        super().__init__(cfg, ext)
        self.fastpath_mode, self.gso, self.gro, self.coalesce = mode, gso, gro, coalesce
        self.port = int(cfg.backend_option("Port", 8285))
        # "auto": vnet1 towards peers that advertise it, flannel's framing to the rest;
        # "flannel": plain packets only, as flanneld (for benchmarks and old kernels).
        self.framing = framing or str(cfg.backend_option("Framing", "auto"))
        self.vnet = self.framing == "auto"
        # The TUN carries virtio-net headers for vnet1 (TSO super-packets both ways) and,
        # in either framing, so that plain packets from a peer can be joined per TCP flow
        # into one super-packet write; flannel's framing reads plain packets all the same.
        self.vnet_tun = self.vnet or coalesce
        # The underlay: IPv4 wherever the network has it (IPv6 rides inside), else IPv6.
        self.underlay = 4 if cfg.enable_ipv4 else 6
        self.tun = None
        self.tun_index = 0
        self.sock: socket.socket | None = None
        self.fastpath: FastPath | None = None

    @property
    def mtu(self) -> int:
        return self.ext.mtu - (UDP_OVERHEAD if self.underlay == 4 else UDP6_OVERHEAD)

    async def prepare(self) -> LeaseAttrs:
        v4, v6 = self.cfg.enable_ipv4, self.cfg.enable_ipv6
        if self.underlay == 6 and (self.ext.address6 is None or self.ext.public_ipv6 is None):
            raise BackendError(
                f"udp: an IPv6-only network (EnableIPv4 false) needs an IPv6 address on "
                f"interface {self.ext.name} to carry it; give it one, or pick another "
                "with -iface")
        gone = await run_netlink(netlink.remove_stale_devices, DEVICE)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        self.tun = await asyncio.to_thread(open_tun, DEVICE, vnet=self.vnet_tun,
                                           offloads=self.vnet)
        set_overlay_ipv6(DEVICE, v6)
        self.sock = self._bind()
        self.fastpath = self._start_fastpath(self.sock)
        log.info("udp framing %s%s", "auto (vnet1 to peers that take it)" if self.vnet
                 else "flannel (one packet per datagram)",
                 {(True, True): ", IPv4 and IPv6 inside IPv4", (False, True): ", IPv6 only",
                  }.get((v4, v6), ""))
        framings = {"Framings": [FRAMING_NAME] if self.vnet else []}
        return LeaseAttrs(
            public_ip=self.ext.public_ip if v4 else NO_PUBLIC_IP, backend_type="udp",
            backend_data=framings if v4 and self.vnet else None,
            public_ipv6=self.ext.public_ipv6 if v6 else None,
            backend_v6_data=framings if v6 else None)

    def _start_fastpath(self, sock: socket.socket) -> FastPath:
        """A forwarder between the TUN and ``sock``."""
        assert self.tun is not None
        fastpath = FastPath(self.tun.fileno(), sock, mode=self.fastpath_mode,
                            vnet=self.vnet_tun, vnet1=self.vnet, coalesce=self.coalesce,
                            gso=self.gso, gro=self.gro, datagram_size=self.mtu)
        fastpath.start()
        return fastpath

    def _bind(self) -> socket.socket:
        """The underlay socket on our own address, port 8285 (flanneld's)."""
        if self.underlay == 4:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            where = (str(self.ext.address), self.port)
        else:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            where = (str(self.ext.address6), self.port)
        try:
            sock.bind(where)
        except OSError as e:
            sock.close()
            raise BackendError(
                f"cannot bind udp {where[0]} port {self.port}: {e.strerror}") from None
        tune_socket(sock)
        return sock

    async def activate(self, lease: Lease) -> None:
        gso = GSO_MAX_SIZE if self.vnet else None
        if lease.has_ipv4:
            self.tun_index = await run_netlink(
                netlink.set_device_address, DEVICE, lease.subnet.network_address, self.mtu,
                TX_QUEUE_LEN, gso)
        if lease.ipv6_subnet is not None and self.cfg.enable_ipv6:
            self.tun_index = await run_netlink(
                netlink.set_device_address, DEVICE, lease.ipv6_subnet.network_address,
                self.mtu, TX_QUEUE_LEN, gso)
        await super().activate(lease)

    def desired_routes(self) -> dict[IPNetwork, RouteSpec]:
        if not self.tun_index or self.lease is None:
            return {}
        nets = [n for n, on in ((self.cfg.network, self.cfg.enable_ipv4),
                                (self.cfg.ipv6_network, self.cfg.enable_ipv6))
                if on and n is not None]
        return {net: RouteSpec(net, self.tun_index) for net in nets}

    def _underlay_address(self, p: Lease) -> tuple[IPv4Address | IPv6Address | None,
                                                   str | None]:
        """Where peer ``p`` is reached over our underlay, or (None, why) when its lease
        says so unusably; (None, None) for a peer that is not on it at all (an IPv6-only
        peer beside an IPv4 underlay)."""
        if self.underlay == 4:
            if not p.has_ipv4:
                return None, None
            at: IPv4Address | IPv6Address | None = p.attrs.public_ip
        elif p.attrs.public_ipv6 is None and p.attrs.public_ip == NO_PUBLIC_IP:
            return None, None
        else:
            at = p.attrs.public_ipv6
        why = endpoint_problem(at)
        return (None, why) if why else (at, None)

    def peer_problems(self) -> dict[str, str]:
        return {name: why for name, p in self.peers.items()
                if (why := self._underlay_address(p)[1]) is not None}

    def routes(self) -> list[Route]:
        """The fast path's peer table: each peer's subnets, each to its underlay address,
        in the framing it advertised for that family; a peer whose address is unusable is
        left out (one warning)."""
        out = []
        for p in self.peers.values():
            at, why = self._underlay_address(p)
            if why is not None:
                self.skip_peer(p, why)
            if at is None:
                continue
            if self.underlay == 4:
                out.append(Route(p.subnet, at, self.port,
                                 vnet1=FRAMING_NAME in advertised_framings(p, 4)))
            if self.cfg.enable_ipv6 and carries_ipv6(p):
                out.append(Route(p.ipv6_subnet, at, self.port,
                                 vnet1=FRAMING_NAME in advertised_framings(p, 6)))
        return out

    async def commit(self) -> None:
        lease, fastpath = self.lease, self.fastpath
        if fastpath is not None and lease is not None:
            v6 = self.cfg.enable_ipv6 and lease.ipv6_subnet is not None
            routes = fastpath.route_rows(self.routes())
            await self.install_table(self.device, fastpath.configure_async(
                lease.subnet if lease.has_ipv4 else None,
                self.cfg.network.network_address if lease.has_ipv4 else None,
                routes,
                lease.ipv6_subnet if v6 else None,
                self.cfg.ipv6_network.network_address if v6 else None),
                [f"{r.subnet} via {r.public_ip}" for r in routes])
        await self.reconcile()

    def data_path_behind(self) -> bool:
        return self.lease is not None and self.fastpath is not None and self.fastpath.behind

    def healthy(self) -> bool:
        return self.fastpath is not None and self.fastpath.alive()

    async def follow_address(self, ext: ExternalInterface) -> LeaseAttrs | None:
        """The socket is bound to the address the node no longer has: bind one to the new
        address, start a fast path on it, hand it the table, and only then stop the old
        one (both read the one TUN meanwhile, so the device is never left unread)."""
        self.ext = ext
        if self.sock is not None and self.sock.getsockname()[0] == self._bind_address():
            await self.commit()  # a retry after the rebind worked
            return None
        sock = self._bind()
        try:
            fastpath = await asyncio.to_thread(self._start_fastpath, sock)
        except BaseException:
            sock.close()
            raise
        old_fastpath, old_sock = self.fastpath, self.sock
        self.fastpath, self.sock = fastpath, sock
        try:
            await self.commit()
        finally:
            if old_fastpath is not None:
                await asyncio.to_thread(old_fastpath.stop)
            if old_sock is not None:
                old_sock.close()
        log.info("udp socket bound to %s port %d", self._bind_address(), self.port)
        return None

    def _bind_address(self) -> str:
        return str(self.ext.address if self.underlay == 4 else self.ext.address6)

    def counters(self) -> dict[str, int]:
        return self.fastpath.counters() if self.fastpath is not None else {}

    async def peer_counters(self) -> dict[str, dict] | None:
        if self.fastpath is None:
            return None
        by_ip = await asyncio.to_thread(self.fastpath.peer_stats)
        out = {}
        for p in self.peers.values():
            at = p.attrs.public_ip if self.underlay == 4 else p.attrs.public_ipv6
            if str(at) in by_ip:
                out[str(p.subnet) if p.has_ipv4 else str(p.ipv6_subnet)] = by_ip[str(at)]
        return out

    async def teardown(self) -> None:
        await super().teardown()
        if self.fastpath is not None:
            await asyncio.to_thread(self.fastpath.stop)
            self.fastpath = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.tun is not None:
            self.tun.close()  # a non-persistent TUN disappears, with its routes
            self.tun = None
