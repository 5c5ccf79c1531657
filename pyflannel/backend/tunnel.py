"""The gre and ipip backends: IP-in-GRE and IP-in-IP carried in user space.

These hosts' kernels may lack the ip_gre and ipip modules, and a raw IP socket is enough: the
fast path (:mod:`pyflannel.fastpath.rawip`) moves packets between a TUN device and a raw
``IPPROTO_GRE`` or ``IPPROTO_IPIP`` socket with the udp backend's peer table and admission
rules. Everything around it (TUN, routes, the table, following a new address) is the udp
backend's; what differs is the device, the socket, the MTU and which leases are peers.

* gre: ``{"Type": "gre", "Key": 42, "Checksum": false}``; the lease says
  ``"BackendType": "gre"`` with ``{"Key": 42}`` (``null`` without a key) in BackendData, so
  a peer with another key is seen and left out (one warning). Inner IPv6 rides as
  protocol type 0x86DD over the IPv4 underlay in dual-stack networks.
  ``FLANNEL_MTU`` = external MTU - 24 (outer IPv4 20, GRE 4), 4 less with a key and 4 less
  with checksums.
* ipip: flanneld's ``{"Type": "ipip", "DirectRouting": false}``; lease
  ``"BackendType": "ipip"`` and no BackendData, as flanneld writes it; IPv4 only;
  ``FLANNEL_MTU`` = external MTU - 20. With DirectRouting, peers on our interface's own
  networks are routed to directly (as host-gw) and never encapsulated.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from pyflannel.backend.base import BackendError, endpoint_problem
from pyflannel.backend.udp import UdpBackend, carries_ipv6
from pyflannel.fastpath.forwarder import tune_socket
from pyflannel.fastpath.handle import FastPath, Route
from pyflannel.fastpath.rawip import IPPROTO_GRE, IPPROTO_IPIP, gre_overhead, open_raw_socket
from pyflannel.host import netlink
from pyflannel.host.nlsession import run_netlink
from pyflannel.host.routes import IPNetwork, RouteSpec
from pyflannel.host.tun import open_tun, set_overlay_ipv6
from pyflannel.lease.model import NO_PUBLIC_IP, Lease, LeaseAttrs

log = logging.getLogger("pyflannel.tunnel")

OUTER_IPV4 = 20
OUTER_IPV6 = 40
TX_QUEUE_LEN = 10000


def gre_key_of(lease: Lease) -> tuple[bool, int | None]:
    """(whether the lease states a key, the key): ``{"Key": n}`` or ``{"Key": null}``."""
    data = lease.attrs.backend_data
    if not isinstance(data, dict):  # an IPv6-only lease states it in BackendV6Data
        data = lease.attrs.backend_v6_data
    if not isinstance(data, dict) or "Key" not in data:
        return False, None
    key = data["Key"]
    if key is None or (isinstance(key, int) and not isinstance(key, bool)
                       and 0 <= key < 1 << 32):
        return True, key
    return False, None


def static_peer(lease: Lease) -> bool:
    """``pyflannel lease reserve``'s lease for a host without a daemon."""
    return lease.reserved and not lease.attrs.backend_type


class RawTunnelBackend(UdpBackend):
    """What gre and ipip share: a TUN, a raw IP socket, the udp backend's table."""

    device: str
    protocol: int

    def __init__(self, cfg, ext, *, mode: str = "process") -> None:
        super().__init__(cfg, ext, framing="flannel", mode=mode, gso=False, gro=False,
                         coalesce=False)
        self.vnet = self.vnet_tun = False
        # gre: IPv4 wherever the network has it (IPv6 rides inside), else IPv6
        self.underlay = 4 if cfg.enable_ipv4 else 6
        self.l2_networks: list = []

    @property
    def overhead(self) -> int:
        raise NotImplementedError

    @property
    def mtu(self) -> int:
        return self.ext.mtu - self.overhead - (OUTER_IPV6 - OUTER_IPV4
                                               if self.underlay == 6 else 0)

    def lease_data(self) -> tuple[object, object]:
        """(BackendData, BackendV6Data) to publish."""
        return None, None

    def takes_foreign_lease(self, lease: Lease) -> bool:
        return static_peer(lease)

    def peer_refused(self, peer: Lease) -> str | None:
        """Why a lease cannot be our peer at all (another backend), or None. A reservation
        no daemon has taken (no TTL, no BackendType) is a static peer: a router or an Open
        vSwitch host configured by hand to match us."""
        if static_peer(peer):
            return None
        if peer.attrs.backend_type != self.type:
            return (f"its BackendType is {peer.attrs.backend_type or 'empty'!r}, "
                    f"not {self.type!r}")
        return None

    async def prepare(self) -> LeaseAttrs:
        if self.underlay == 6 and (self.ext.address6 is None or self.ext.public_ipv6 is None):
            raise BackendError(f"{self.type}: an IPv6-only network (EnableIPv4 false) needs "
                               f"an IPv6 address on interface {self.ext.name}; give it one, "
                               "or pick another with -iface")
        gone = await run_netlink(netlink.remove_stale_devices, self.device)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        self.sock = self._bind()
        self.tun = await asyncio.to_thread(open_tun, self.device, vnet=False, offloads=False)
        set_overlay_ipv6(self.device, self.cfg.enable_ipv6)
        self.fastpath = self._start_fastpath(self.sock)
        self.l2_networks = await run_netlink(netlink.interface_networks, self.ext.index)
        data, data6 = self.lease_data()
        v6 = self.cfg.enable_ipv6
        return LeaseAttrs(public_ip=self.ext.public_ip if self.cfg.enable_ipv4 else NO_PUBLIC_IP,
                          backend_type=self.type,
                          backend_data=data if self.cfg.enable_ipv4 else None,
                          public_ipv6=self.ext.public_ipv6 if v6 else None,
                          backend_v6_data=data6 if v6 else None)

    def fastpath_options(self) -> dict:
        return {}

    def _start_fastpath(self, sock: socket.socket) -> FastPath:
        assert self.tun is not None
        fastpath = FastPath(self.tun.fileno(), sock, mode=self.fastpath_mode, gso=False,
                            gro=False, datagram_size=self.mtu, framing=self.type,
                            **self.fastpath_options())
        fastpath.start()
        return fastpath

    def _bind(self) -> socket.socket:
        try:
            sock = open_raw_socket(self.protocol, self._bind_address())
        except OSError as e:
            raise BackendError(f"{self.type}: cannot open a raw IP socket (protocol "
                               f"{self.protocol}) on {self._bind_address()}: "
                               f"{e.strerror}") from None
        tune_socket(sock)
        return sock

    async def activate(self, lease: Lease) -> None:
        if lease.has_ipv4:
            self.tun_index = await run_netlink(netlink.set_device_address, self.device,
                                               lease.subnet.network_address, self.mtu,
                                               TX_QUEUE_LEN, None)
        if lease.ipv6_subnet is not None and self.cfg.enable_ipv6:
            self.tun_index = await run_netlink(
                netlink.set_device_address, self.device, lease.ipv6_subnet.network_address,
                self.mtu, TX_QUEUE_LEN, None)
        self.lease = lease
        await self.commit()

    def _direct(self, peer: Lease) -> bool:
        return False

    def _on_underlay(self, peer: Lease) -> bool:
        """Is the peer on our underlay at all (an IPv6-only peer is not on an IPv4 one)?"""
        return peer.has_ipv4 if self.underlay == 4 else peer.ipv6_subnet is not None

    def _problem(self, peer: Lease) -> str | None:
        at = peer.attrs.public_ip if self.underlay == 4 else peer.attrs.public_ipv6
        return self.peer_refused(peer) or endpoint_problem(at)

    def peer_problems(self) -> dict[str, str]:
        return {name: why for name, p in self.peers.items()
                if self._on_underlay(p) and (why := self._problem(p)) is not None}

    def routes(self) -> list[Route]:
        out = []
        for p in self.peers.values():
            if not self._on_underlay(p):
                continue
            why = self._problem(p)
            if why is not None:
                self.skip_peer(p, why)
                continue
            if self.underlay == 6:
                out.append(Route(p.ipv6_subnet, p.attrs.public_ipv6, self.port))
                continue
            if self._direct(p):
                continue
            out.append(Route(p.subnet, p.attrs.public_ip, self.port))
            if self.cfg.enable_ipv6 and self.protocol == IPPROTO_GRE and carries_ipv6(p):
                out.append(Route(p.ipv6_subnet, p.attrs.public_ip, self.port))
        return out

    def desired_routes(self) -> dict[IPNetwork, RouteSpec]:
        out = super().desired_routes()
        if self.lease is not None:
            for p in self.peers.values():
                if p.has_ipv4 and self._problem(p) is None and self._direct(p):
                    out[p.subnet] = RouteSpec(p.subnet, self.ext.index, p.attrs.public_ip)
        return out


class GreBackend(RawTunnelBackend):
    type = "gre"
    device = "flannel-gre"
    protocol = IPPROTO_GRE

    def __init__(self, cfg, ext, *, mode: str = "process") -> None:
        super().__init__(cfg, ext, mode=mode)
        key = cfg.backend_option("Key", None)
        self.key: int | None = None if key is None else int(key)
        self.checksum = bool(cfg.backend_option("Checksum", False))

    @property
    def overhead(self) -> int:
        return OUTER_IPV4 + gre_overhead(self.key, self.checksum)

    def lease_data(self) -> tuple[object, object]:
        return {"Key": self.key}, {"Key": self.key}

    def fastpath_options(self) -> dict:
        return {"gre_key": self.key, "gre_checksum": self.checksum}

    def peer_refused(self, peer: Lease) -> str | None:
        why = super().peer_refused(peer)
        if why is not None or static_peer(peer):
            return why  # a static peer is configured with our key
        stated, key = gre_key_of(peer)
        if not stated:
            return "its BackendData states no GRE key ({\"Key\": n} or {\"Key\": null})"
        if key != self.key:
            return (f"its GRE key is {'none' if key is None else key}, ours is "
                    f"{'none' if self.key is None else self.key}")
        return None


class IpipBackend(RawTunnelBackend):
    type = "ipip"
    device = "flannel-ipip"
    protocol = IPPROTO_IPIP

    def __init__(self, cfg, ext, *, mode: str = "process") -> None:
        super().__init__(cfg, ext, mode=mode)
        self.direct_routing = bool(cfg.backend_option("DirectRouting", False))

    @property
    def overhead(self) -> int:
        return OUTER_IPV4

    async def prepare(self) -> LeaseAttrs:
        if self.cfg.enable_ipv6:
            raise BackendError("ipip: carries IPv4 only, as flanneld's (EnableIPv6 needs "
                               "gre, udp, vxlan, host-gw, wireguard or bgp)")
        return await super().prepare()

    def _direct(self, peer: Lease) -> bool:
        return self.direct_routing and any(peer.attrs.public_ip in n
                                           for n in self.l2_networks)
