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

Both families: in flanneld's ``separate`` mode a second device ``flannel-wg-v6`` on
``ListenPortV6`` over the IPv6 underlay, with ``BackendV6Data``; in the single-device modes
(``auto``, ``ipv4``, ``ipv6``) ``flannel-wg`` carries both, its peers reached over IPv4
(``ipv4``; ``auto`` wherever the node has IPv4) or IPv6 (``ipv6``) on ``ListenPort``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import itertools
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.backend.base import Backend, BackendError, endpoint_problem, peer_address
from pyflannel.fastpath.handle import FastPath, WgRoute
from pyflannel.fastpath.transport import tune_socket
from pyflannel.host import netlink
from pyflannel.host.nlsession import iproute, run_netlink
from pyflannel.host.routes import IPNetwork, RouteSpec
from pyflannel.host.tun import (
    TUN_F_CSUM,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUNSETOFFLOAD,
    open_tun,
    set_overlay_ipv6,
)
from pyflannel.lease.manager import describe
from pyflannel.lease.model import NO_PUBLIC_IP, Lease, LeaseAttrs
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
UDP6_OVERHEAD = 48  # outer IPv6 + UDP
TX_QUEUE_LEN = 10000
DEFAULT_PORT = 51820
DEFAULT_PORT_V6 = 51821
MODES = ("separate", "auto", "ipv4", "ipv6")


def lease_key(lease: Lease, family: int = 4, own: str | None = None
              ) -> tuple[str | None, str]:
    """The peer's base64 public key from its lease's BackendData (IPv6: BackendV6Data) if
    it is usable (:func:`~pyflannel.wireguard.keys.check_public_key`; ``own``: this
    node's key), else (None, why not)."""
    what = "BackendData" if family == 4 else "BackendV6Data"
    data = lease.attrs.backend_data if family == 4 else lease.attrs.backend_v6_data
    key = data.get("PublicKey") if isinstance(data, dict) else None
    if not isinstance(key, str):
        return None, f"its lease has no {what}.PublicKey"
    why = _key_problem(key, own)
    return (None, f"its {what}.PublicKey is unusable: {why}") if why else (key, "")


@functools.lru_cache(maxsize=4096)
def _key_problem(key: str, own: str | None) -> str | None:
    """Why a base64 public key is unusable, or None (cached: each check is a DH)."""
    try:
        public_from_base64(key, decode_key(own) if own else None)
    except InvalidKeyError as e:
        return str(e)
    return None


def lease_public_key(lease: Lease, family: int = 4) -> str | None:
    """The peer's base64 public key from its lease's BackendData (IPv6: BackendV6Data), if
    it is a usable one."""
    return lease_key(lease, family)[0]


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
        self.sides: list[Side] = []
        self._order = itertools.count()
        self._seen: dict[str, int] = {}  # lease key_name -> when its current form arrived

    @property
    def mtu(self) -> int:
        return self.ext.mtu - OVERHEAD

    @property
    def fastpath(self) -> FastPath | None:
        """The IPv4 side's fast path (the IPv6 side's in an IPv6-only network)."""
        return self.sides[0].fastpath if self.sides else None

    async def prepare(self) -> LeaseAttrs:
        v4 = self.cfg.enable_ipv4
        v6 = self.cfg.enable_ipv6
        if v6 and (self.ext.address6 is None or self.ext.public_ipv6 is None):
            raise BackendError(
                f"wireguard: the network has IPv6 (EnableIPv6) but interface {self.ext.name} "
                "has no IPv6 address to carry it; give it one, or pick another with -iface")
        path = key_file_path()
        try:
            key = await asyncio.to_thread(load_or_create_key, path)
        except (KeyFileError, OSError) as e:
            raise BackendError(str(e) if isinstance(e, KeyFileError)
                               else f"cannot create WireGuard key file {path}: {e.strerror}"
                               ) from None
        self.public_key = key.public_base64
        del key  # the fast path reads the file itself; the secret stays out of here
        gone = await run_netlink(netlink.remove_stale_devices, (DEVICE, DEVICE_V6))
        gone += await run_netlink(remove_kernel_wireguard, (DEVICE, DEVICE_V6))
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        families = tuple(f for f, on in ((4, v4), (6, v6)) if on)
        if self.wg_mode == "separate":
            for family in families:
                self.sides.append(await self._open_side(
                    family, (family,), DEVICE if family == 4 else DEVICE_V6,
                    self.listen_port if family == 4 else self.listen_port_v6, str(path)))
        else:
            # one device for both families, its peers reached over one underlay family:
            # ipv4, ipv6, or (auto) IPv4 wherever this node has it
            underlay = 6 if self.wg_mode == "ipv6" or not v4 else 4
            if underlay == 6 and (self.ext.address6 is None or self.ext.public_ipv6 is None):
                raise BackendError(f"wireguard: Mode {self.wg_mode} needs an IPv6 address on "
                                   f"interface {self.ext.name}")
            self.sides.append(await self._open_side(underlay, families, DEVICE,
                                                    self.listen_port, str(path)))
        data = {"PublicKey": self.public_key}
        return LeaseAttrs(public_ip=self.ext.public_ip if v4 else NO_PUBLIC_IP,
                          backend_type="wireguard", backend_data=data if v4 else None,
                          public_ipv6=self.ext.public_ipv6 if v6 else None,
                          backend_v6_data=data if v6 else None)

    async def _open_side(self, family: int, inner: tuple[int, ...], device: str, port: int,
                         key_file: str) -> Side:
        """One device: its TUN, socket (underlay ``family``) and fast path, carrying the
        ``inner`` families (flanneld: one kernel device each)."""
        tun = await asyncio.to_thread(open_tun, device, vnet=True)
        set_overlay_ipv6(device, 6 in inner)
        if 4 not in inner:  # TSO for the family it carries (open_tun turned on both)
            fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN)
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        sock = socket.socket(af, socket.SOCK_DGRAM)
        any_addr = "0.0.0.0" if family == 4 else "::"
        try:
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # all addresses, as a kernel WireGuard device listens
            sock.bind((any_addr, port))
        except OSError as e:
            sock.close()
            tun.close()
            raise BackendError(f"cannot bind udp {any_addr} port {port}: {e.strerror}") from None
        tune_socket(sock)
        outer = UDP_OVERHEAD if family == 4 else UDP6_OVERHEAD
        fastpath = FastPath(tun.fileno(), sock, mode=self.fastpath_mode, vnet=True,
                            gso=self.gso, gro=self.gro, datagram_size=self.ext.mtu - outer,
                            framing="wireguard", wg_key_file=key_file, wg_mtu=self.mtu,
                            wg_public_key=self.public_key)
        fastpath.start()
        log.info("wireguard: device %s, port %d, public key %s", device, port,
                 short_key(decode_key(self.public_key)))
        return Side(family, inner, device, port, tun, sock, fastpath)

    async def activate(self, lease: Lease) -> None:
        for side in self.sides:
            for family in side.inner:
                subnet = _subnet(lease, family)
                if subnet is not None:
                    side.tun_index = await run_netlink(
                        netlink.set_device_address, side.device, subnet.network_address,
                        self.mtu, TX_QUEUE_LEN)
        await super().activate(lease)

    async def add_peer(self, lease: Lease) -> None:
        old = self.peers.get(lease.key_name)
        if old is None or old.attrs != lease.attrs:
            self._seen[lease.key_name] = next(self._order)
        await super().add_peer(lease)

    async def remove_peer(self, lease: Lease) -> None:
        self._seen.pop(lease.key_name, None)
        await super().remove_peer(lease)

    def peer_table(self, family: int = 4, inner: tuple[int, ...] | None = None
                   ) -> list[WgRoute]:
        """One WireGuard peer per key, reached over the ``family`` underlay: AllowedIPs =
        its lease's subnets of the ``inner`` families (default: the underlay's), Endpoint
        = PublicIP:ListenPort (IPv6: [PublicIPv6] and, in separate mode, ListenPortV6).

        A lease whose key or address is unusable is left out, with one warning naming it
        (:meth:`_plan` says which and why); of two keys at one endpoint address the newer
        wins, as flanneld removes the older."""
        rows, problems = self._plan(family, inner)
        for name, why in problems.items():
            self.skip_peer(self.peers[name], why)
        return rows

    def peer_problems(self) -> dict[str, str]:
        sides = [(s.family, s.inner) for s in self.sides] or [
            (4 if self.cfg.enable_ipv4 else 6, None)]
        problems: dict[str, str] = {}
        for family, inner in sides:
            problems.update(self._plan(family, inner)[1])
        return problems

    def _plan(self, family: int, inner: tuple[int, ...] | None
              ) -> tuple[list[WgRoute], dict[str, str]]:
        """The peer table of one side, and the leases left out of it with why: an
        unusable key (not a key, a low-order point, our own), an unusable address, or a
        key another lease published first (a cloned node: the first keeps it)."""
        inner = inner or (family,)
        problems: dict[str, str] = {}
        usable: list[tuple[int, str, str, list[str], Lease]] = []
        for name, lease in self.peers.items():
            subnets = [str(net) for f in inner if (net := _subnet(lease, f)) is not None]
            at = _endpoint(lease, family)
            if not subnets or at is None:
                continue
            if (why := endpoint_problem(at)) is not None:
                problems[name] = why
                continue
            found = [lease_key(lease, f, self.public_key or None)
                     for f in dict.fromkeys((family, *inner))]
            key = next((k for k, _why in found if k is not None), None)
            if key is None:
                problems[name] = found[0][1]
                continue
            usable.append((self._seen.get(name, 0), name, key, subnets, lease))
        by_key: dict[str, tuple[list[str], Lease, int]] = {}
        for order, name, key, subnets, lease in sorted(usable, key=lambda u: u[:2]):
            if key in by_key:
                first = by_key[key][1]
                problems[name] = (f"it repeats the WireGuard public key of peer "
                                  f"{describe(first)} ({peer_address(first)}), which "
                                  "published it first (a cloned node?)")
                continue
            by_key[key] = (subnets, lease, order)
        newest_at: dict[str, tuple[int, str]] = {}
        for key, (_subnets, lease, order) in by_key.items():
            ip = str(_endpoint(lease, family))
            if ip not in newest_at or order > newest_at[ip][0]:
                newest_at[ip] = (order, key)
        port = self.listen_port_v6 if family == 6 and self.wg_mode == "separate" \
            else self.listen_port
        rows = [WgRoute(key, tuple(sorted(subnets)), _endpoint(lease, family), port)
                for key, (subnets, lease, _o) in sorted(by_key.items())
                if newest_at[str(_endpoint(lease, family))][1] == key]
        return rows, problems

    def identity_conflict(self, others: Iterable[Lease]) -> str | None:
        """Another node's live lease with our public key: its copy of our key file (a
        cloned VM), and the two would lose each other's traffic."""
        for lease in others:
            if self.public_key and self.public_key in (lease_public_key(lease, 4),
                                                       lease_public_key(lease, 6)):
                return (f"this node's WireGuard public key {self.public_key[:8]}… is already "
                        f"published by lease {describe(lease)} ({peer_address(lease)}); "
                        f"two nodes with one key lose each other's traffic: delete "
                        f"{key_file_path()} and start again to make a new key (if that lease "
                        f"is this node's own from an earlier address, `pyflannel lease "
                        f"release {lease.key_name}` instead)")
        return None

    def desired_routes(self) -> dict[IPNetwork, RouteSpec]:
        if self.lease is None:
            return {}
        routes: dict[IPNetwork, RouteSpec] = {}
        for side in self.sides:
            for family in side.inner:
                net = self.cfg.network if family == 4 else self.cfg.ipv6_network
                if side.tun_index and net is not None:
                    routes[net] = RouteSpec(net, side.tun_index)
        return routes

    async def commit(self) -> None:
        lease = self.lease
        if lease is not None:
            for side in self.sides:
                family = side.inner[0]  # ICMP errors: IPv4 where the device carries it
                local = _subnet(lease, family)
                net = self.cfg.network if family == 4 else self.cfg.ipv6_network
                if local is None or net is None:
                    continue
                net6 = self.cfg.ipv6_network if 6 in side.inner else None
                peers = self.peer_table(side.family, side.inner)
                await self.install_table(side.device, side.fastpath.configure_wg_async(
                    local, net.network_address, peers, self.psk, self.keepalive,
                    icmp_src6=net6.network_address if net6 is not None else None),
                    [f"peer {p.public_key[:8]}… ({', '.join(p.subnets)} at {p.public_ip})"
                     for p in peers])
        await self.reconcile()

    def data_path_behind(self) -> bool:
        return self.lease is not None and any(s.fastpath.behind for s in self.sides)

    def healthy(self) -> bool:
        return bool(self.sides) and all(s.fastpath.alive() for s in self.sides)

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for side in self.sides:
            for name, value in side.fastpath.counters().items():
                total[name] = total.get(name, 0) + value
        return total

    async def peer_counters(self) -> dict[str, dict] | None:
        """Per peer subnet (IPv4, else IPv6): traffic, short key, endpoint, handshake."""
        if not self.sides:
            return None
        out: dict[str, dict] = {}
        left_out = self.peer_problems()  # a repeated key's traffic is its first lease's
        for side in self.sides:
            by_key = await asyncio.to_thread(side.fastpath.peer_stats)
            for name, lease in self.peers.items():
                if name in left_out:
                    continue
                key = next((k for f in (side.family, *side.inner)
                            if (k := lease_public_key(lease, f)) is not None), None)
                subnet = next((n for f in side.inner if (n := _subnet(lease, f))), None)
                if key is None or key not in by_key or subnet is None:
                    continue
                out[str(subnet)] = by_key[key]
        return out

    async def teardown(self) -> None:
        await super().teardown()
        sides, self.sides = self.sides, []
        for side in sides:
            await asyncio.to_thread(side.fastpath.stop)
            side.sock.close()
            side.tun.close()  # a non-persistent TUN disappears, with its routes


@dataclass
class Side:
    """One device: flannel-wg (IPv4, or both families in the single-device modes) or
    flannel-wg-v6 (IPv6, separate mode). ``family``: its underlay; ``inner``: what it
    carries."""

    family: int
    inner: tuple[int, ...]
    device: str
    port: int
    tun: Any
    sock: socket.socket
    fastpath: FastPath
    tun_index: int = 0


def _subnet(lease: Lease, family: int) -> IPNetwork | None:
    """The lease's subnet of one family (None for the placeholder of IPv6-only leases)."""
    if family == 4:
        return lease.subnet if lease.has_ipv4 else None
    return lease.ipv6_subnet


def _endpoint(lease: Lease, family: int):
    """Where the peer is reached over the ``family`` underlay (None: not at all)."""
    if family == 4:
        ip = lease.attrs.public_ip
        return None if ip == NO_PUBLIC_IP else ip
    return lease.attrs.public_ipv6


def remove_kernel_wireguard(names: tuple[str, ...]) -> list[str]:
    """Delete kernel WireGuard devices of these names: flanneld's, left behind when a node
    moves from flanneld to pyflannel (its TUN of the same name could not be created)."""
    removed = []
    with iproute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            if name in names and netlink.link_kind(link) == "wireguard":
                try:
                    ipr.link("del", index=link["index"])
                    removed.append(name)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        raise
    return removed


def _port(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise BackendError(f"Backend.{name} must be a port number 1..65535")
    return value
