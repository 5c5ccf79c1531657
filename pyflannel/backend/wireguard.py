"""The wireguard backend: flanneld v0.20.2's, with a WireGuard data path of our own.

flanneld creates a kernel WireGuard device ``flannel-wg``; where the kernel has none (as on
these hosts) there would be no encrypted option at all. Here ``flannel-wg`` is a TUN device
(virtio-net headers, TSO) driven by the fast-path process running
:class:`pyflannel.wireguard.device.Device` (:mod:`pyflannel.fastpath.wg`), so peers may be
flanneld's kernel devices, wireguard-go or other pyflannel nodes alike.

What is flanneld's, on purpose:

* config ``{"Type": "wireguard"}`` with ``ListenPort`` (51820), ``ListenPortV6`` (51821),
  ``PSK`` (base64), ``PersistentKeepaliveInterval`` (seconds, 0 = off) and ``Mode``
  (``separate``, the default, or ``auto``/``ipv4``/``ipv6``);
* the private key in ``/run/flannel/wgkey`` or ``$WIREGUARD_KEY_FILE``, created 0600 when
  absent and reused on restart (so the node's public key stays put);
* the lease ``"BackendType":"wireguard","BackendData":{"PublicKey":"<base64>"}``;
* the device holds the lease subnet's network address as /32, the whole Network is routed
  through it, its MTU is the external MTU - 80;
* per peer lease: AllowedIPs = its subnet, Endpoint = PublicIP:ListenPort; a lease whose key
  changed replaces the peer (and, as flanneld does, a newer key at the same endpoint address
  replaces an older one); a removed lease removes the peer.

IPv4 only for now: in a dual-stack network the IPv4 side is carried and IPv6 gets a warning.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from ipaddress import IPv4Network

from pyflannel.backend.base import Backend, BackendError
from pyflannel.fastpath.handle import FastPath, WgRoute
from pyflannel.fastpath.transport import tune_socket
from pyflannel.host import netlink
from pyflannel.host.routes import RouteSpec
from pyflannel.host.tun import open_tun
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.wireguard.keys import (
    InvalidKeyError,
    KeyFileError,
    decode_key,
    key_file_path,
    load_or_create_key,
    public_from_base64,
    short_key,
)

log = logging.getLogger("pyflannel.wireguard")

DEVICE = "flannel-wg"
DEVICE_V6 = "flannel-wg-v6"
OVERHEAD = 80  # flannel's figure: outer IPv6 (40) + UDP (8) + WireGuard header (16) + tag (16)
UDP_OVERHEAD = 28  # outer IPv4 + UDP: the largest datagram that is not fragmented
TX_QUEUE_LEN = 10000
DEFAULT_PORT = 51820
DEFAULT_PORT_V6 = 51821
MODES = ("separate", "auto", "ipv4", "ipv6")


def lease_public_key(lease: Lease) -> str | None:
    """The peer's base64 public key from its lease's BackendData, if it is a valid one."""
    data = lease.attrs.backend_data
    key = data.get("PublicKey") if isinstance(data, dict) else None
    if not isinstance(key, str):
        return None
    try:
        public_from_base64(key)
    except (InvalidKeyError, ValueError):
        return None
    return key


class WireguardBackend(Backend):
    type = "wireguard"

    def __init__(self, cfg, ext, *, mode: str = "process", gso: bool = True,
                 gro: bool = True) -> None:
        super().__init__(cfg, ext)
        self.fastpath_mode, self.gso, self.gro = mode, gso, gro
        self.listen_port = _port(cfg.backend_option("ListenPort", DEFAULT_PORT), "ListenPort")
        self.listen_port_v6 = _port(cfg.backend_option("ListenPortV6", DEFAULT_PORT_V6),
                                    "ListenPortV6")
        psk = cfg.backend_option("PSK", "") or ""
        if not isinstance(psk, str):
            raise BackendError("Backend.PSK must be a base64 key string")
        if psk:
            try:
                decode_key(psk)
            except InvalidKeyError:
                # never echo the value: it is a secret
                raise BackendError("Backend.PSK is not a valid WireGuard key "
                                   "(44 base64 characters, as `wg genpsk` prints)") from None
        self.psk = psk or None
        keepalive = cfg.backend_option("PersistentKeepaliveInterval", 0) or 0
        if isinstance(keepalive, bool) or not isinstance(keepalive, int | float) \
                or not 0 <= keepalive <= 65535:
            raise BackendError("Backend.PersistentKeepaliveInterval must be 0..65535 seconds")
        self.keepalive = float(keepalive)
        wg_mode = cfg.backend_option("Mode", "separate") or "separate"
        if wg_mode not in MODES:
            raise BackendError(f"Backend.Mode must be one of {', '.join(MODES)}, "
                               f"got {wg_mode!r}")
        self.wg_mode = wg_mode
        self.public_key = ""
        self.tun = None
        self.tun_index = 0
        self.sock: socket.socket | None = None
        self.fastpath: FastPath | None = None
        self._order = itertools.count()
        self._seen: dict[str, int] = {}  # lease key_name -> when its current form arrived

    @property
    def mtu(self) -> int:
        return self.ext.mtu - OVERHEAD

    async def prepare(self) -> LeaseAttrs:
        if not self.cfg.enable_ipv4:
            raise BackendError("the wireguard backend carries IPv4 only for now; an IPv6-only "
                               "network (EnableIPv4 false) needs vxlan or host-gw")
        if self.cfg.enable_ipv6:
            log.warning("IPv6 over the wireguard backend is not yet supported: this node "
                        "carries IPv4 only (IPv6Network %s gets no traffic here)",
                        self.cfg.ipv6_network)
        if self.wg_mode == "ipv6":
            raise BackendError("Backend.Mode ipv6 needs an IPv6 underlay, which the wireguard "
                               "backend does not carry yet; use separate, auto or ipv4")
        path = key_file_path()
        try:
            key = await asyncio.to_thread(load_or_create_key, path)
        except (KeyFileError, OSError) as e:
            raise BackendError(str(e) if isinstance(e, KeyFileError)
                               else f"cannot create WireGuard key file {path}: {e.strerror}"
                               ) from None
        self.public_key = key.public_base64
        del key  # the fast path reads the file itself; the secret stays out of here
        gone = await asyncio.to_thread(netlink.remove_stale_devices, DEVICE)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        self.tun = await asyncio.to_thread(open_tun, DEVICE, vnet=True)
        _disable_ipv6(DEVICE)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # all addresses, as a kernel WireGuard device listens
            sock.bind(("0.0.0.0", self.listen_port))
        except OSError as e:
            sock.close()
            raise BackendError(
                f"cannot bind udp 0.0.0.0:{self.listen_port}: {e.strerror}") from None
        tune_socket(sock)
        self.sock = sock
        self.fastpath = FastPath(self.tun.fileno(), sock, mode=self.fastpath_mode, vnet=True,
                                 gso=self.gso, gro=self.gro,
                                 datagram_size=self.ext.mtu - UDP_OVERHEAD,
                                 framing="wireguard", wg_key_file=str(path), wg_mtu=self.mtu)
        self.fastpath.start()
        log.info("wireguard: device %s, port %d, public key %s", DEVICE, self.listen_port,
                 short_key(decode_key(self.public_key)))
        return LeaseAttrs(public_ip=self.ext.public_ip, backend_type="wireguard",
                          backend_data={"PublicKey": self.public_key})

    async def activate(self, lease: Lease) -> None:
        self.tun_index = await asyncio.to_thread(
            netlink.set_device_address, DEVICE, lease.subnet.network_address, self.mtu,
            TX_QUEUE_LEN)
        await super().activate(lease)

    async def add_peer(self, lease: Lease) -> None:
        old = self.peers.get(lease.key_name)
        if old is None or old.attrs != lease.attrs:
            self._seen[lease.key_name] = next(self._order)
        await super().add_peer(lease)

    async def remove_peer(self, lease: Lease) -> None:
        self._seen.pop(lease.key_name, None)
        await super().remove_peer(lease)

    def peer_table(self) -> list[WgRoute]:
        """One WireGuard peer per key: AllowedIPs = the subnets of its leases, Endpoint =
        PublicIP:ListenPort. A lease without a valid key is skipped (one warning); of two
        keys at one endpoint address the newer wins, as flanneld removes the older."""
        by_key: dict[str, tuple[list[str], Lease, int]] = {}
        for name, lease in self.peers.items():
            if not lease.has_ipv4:
                continue
            key = lease_public_key(lease)
            if key is None:
                self._warn.warn(("wg-key", name, str(lease.attrs.backend_data)),
                                "peer %s has no valid BackendData.PublicKey; ignored",
                                lease.subnet)
                continue
            if key == self.public_key:
                continue  # our own key (a stale lease of ours): never a peer
            order = self._seen.get(name, 0)
            if key in by_key:
                subnets, first, seen = by_key[key]
                subnets.append(str(lease.subnet))
                by_key[key] = (subnets, lease if order > seen else first, max(order, seen))
            else:
                by_key[key] = ([str(lease.subnet)], lease, order)
        newest_at: dict[str, tuple[int, str]] = {}
        for key, (_subnets, lease, order) in by_key.items():
            ip = str(lease.attrs.public_ip)
            if ip not in newest_at or order > newest_at[ip][0]:
                newest_at[ip] = (order, key)
        return [WgRoute(key, tuple(sorted(subnets)), lease.attrs.public_ip, self.listen_port)
                for key, (subnets, lease, _o) in sorted(by_key.items())
                if newest_at[str(lease.attrs.public_ip)][1] == key]

    def desired_routes(self) -> dict[IPv4Network, RouteSpec]:
        if not self.tun_index or self.lease is None:
            return {}
        net = self.cfg.network
        return {net: RouteSpec(net, self.tun_index)}

    async def commit(self) -> None:
        if self.fastpath is not None and self.lease is not None:
            await self.fastpath.configure_wg_async(
                self.lease.subnet, self.cfg.network.network_address, self.peer_table(),
                self.psk, self.keepalive)
        await self.reconcile()

    def healthy(self) -> bool:
        return self.fastpath is not None and self.fastpath.alive()

    def counters(self) -> dict[str, int]:
        return self.fastpath.counters() if self.fastpath is not None else {}

    async def peer_counters(self) -> dict[str, dict] | None:
        """Per peer subnet: traffic, short key, endpoint and last handshake."""
        if self.fastpath is None:
            return None
        by_key = await asyncio.to_thread(self.fastpath.peer_stats)
        out: dict[str, dict] = {}
        for lease in self.peers.values():
            key = lease_public_key(lease)
            if key is not None and key in by_key:
                out[str(lease.subnet)] = by_key[key]
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


def _port(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise BackendError(f"Backend.{name} must be a port number 1..65535")
    return value


def _disable_ipv6(device: str) -> None:
    """flannel-wg carries IPv4 only for now; keep the kernel's IPv6 chatter off it."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
