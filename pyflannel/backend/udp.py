"""The udp backend: TUN ``flannel0``, each inner IPv4 packet sent raw to the peer on 8285.

The data path is the fast-path process; this module sets the host up around it and keeps
its peer table current.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from ipaddress import IPv4Network

from pyflannel.backend.base import Backend, BackendError
from pyflannel.fastpath.forwarder import tune_socket
from pyflannel.fastpath.frames import FRAMING_NAME, MAX_DATAGRAM, VNET_LEN
from pyflannel.fastpath.handle import FastPath, Route
from pyflannel.host import netlink
from pyflannel.host.nlsession import run_netlink
from pyflannel.host.routes import RouteSpec
from pyflannel.host.tun import open_tun
from pyflannel.lease.model import LeaseAttrs

log = logging.getLogger("pyflannel.udp")

DEVICE = "flannel0"
UDP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
TX_QUEUE_LEN = 10000  # flanneld keeps the default 500 and drops bursts
# Keep the kernel's super-packets small enough for one train (one GSO send of at most
# 65507 bytes, with a 6-byte header per chunk and the virtio-net header).
GSO_MAX_SIZE = MAX_DATAGRAM - VNET_LEN - 6 * 64


def advertised_framings(lease) -> list[str]:
    """Extra framings a peer accepts, from its udp lease's BackendData (flanneld: none)."""
    data = lease.attrs.backend_data
    found = data.get("Framings") if isinstance(data, dict) else None
    return [f for f in found if isinstance(f, str)] if isinstance(found, list) else []


class UdpBackend(Backend):
    type = "udp"

    def __init__(self, cfg, ext, framing: str = "", *, mode: str = "process",
                 gso: bool = True, gro: bool = True) -> None:
        super().__init__(cfg, ext)
        self.fastpath_mode, self.gso, self.gro = mode, gso, gro
        self.port = int(cfg.backend_option("Port", 8285))
        # "auto": vnet1 towards peers that advertise it, flannel's framing to the rest;
        # "flannel": plain packets only, as flanneld (for benchmarks and old kernels).
        self.framing = framing or str(cfg.backend_option("Framing", "auto"))
        self.vnet = self.framing == "auto"
        self.tun = None
        self.tun_index = 0
        self.sock: socket.socket | None = None
        self.fastpath: FastPath | None = None

    @property
    def mtu(self) -> int:
        return self.ext.mtu - UDP_OVERHEAD

    async def prepare(self) -> LeaseAttrs:
        # flanneld's udp backend is IPv4 only; carrying IPv6 inside it comes later.
        if not self.cfg.enable_ipv4:
            raise BackendError("udp backend carries IPv4 only; an IPv6-only network "
                               "(EnableIPv4 false) needs vxlan or host-gw")
        if self.cfg.enable_ipv6:
            log.warning("IPv6 over the udp backend is not yet supported: this node carries "
                        "IPv4 only (IPv6Network %s gets no traffic here)", self.cfg.ipv6_network)
        gone = await run_netlink(netlink.remove_stale_devices, DEVICE)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        self.tun = await asyncio.to_thread(open_tun, DEVICE, vnet=self.vnet)
        _disable_ipv6(DEVICE)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((str(self.ext.address), self.port))
        except OSError as e:
            sock.close()
            raise BackendError(
                f"cannot bind udp {self.ext.address}:{self.port}: {e.strerror}") from None
        tune_socket(sock)
        self.sock = sock
        self.fastpath = FastPath(self.tun.fileno(), sock, mode=self.fastpath_mode,
                                 vnet=self.vnet, gso=self.gso, gro=self.gro,
                                 datagram_size=self.ext.mtu - UDP_OVERHEAD)
        self.fastpath.start()
        log.info("udp framing %s", "auto (vnet1 to peers that take it)" if self.vnet
                 else "flannel (one packet per datagram)")
        data = {"Framings": [FRAMING_NAME]} if self.vnet else None
        return LeaseAttrs(public_ip=self.ext.public_ip, backend_type="udp", backend_data=data)

    async def activate(self, lease) -> None:
        self.tun_index = await run_netlink(
            netlink.set_device_address, DEVICE, lease.subnet.network_address, self.mtu,
            TX_QUEUE_LEN, GSO_MAX_SIZE if self.vnet else None)
        await super().activate(lease)

    def desired_routes(self) -> dict[IPv4Network, RouteSpec]:
        if not self.tun_index or self.lease is None:
            return {}
        net = self.cfg.network
        return {net: RouteSpec(net, self.tun_index)}

    async def commit(self) -> None:
        if self.fastpath is not None and self.lease is not None:
            routes = [Route(p.subnet, p.attrs.public_ip, self.port,
                            vnet1=FRAMING_NAME in advertised_framings(p))
                      for p in self.peers.values() if p.has_ipv4]
            await self.fastpath.configure_async(self.lease.subnet,
                                                self.cfg.network.network_address, routes)
        await self.reconcile()

    def healthy(self) -> bool:
        return self.fastpath is not None and self.fastpath.alive()

    def counters(self) -> dict[str, int]:
        return self.fastpath.counters() if self.fastpath is not None else {}

    async def peer_counters(self) -> dict[str, dict] | None:
        if self.fastpath is None:
            return None
        by_ip = await asyncio.to_thread(self.fastpath.peer_stats)
        return {str(p.subnet): by_ip[str(p.attrs.public_ip)] for p in self.peers.values()
                if str(p.attrs.public_ip) in by_ip}

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


def _disable_ipv6(device: str) -> None:
    """flannel0 carries IPv4 only; keep the kernel's IPv6 chatter out of the drop counters."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
