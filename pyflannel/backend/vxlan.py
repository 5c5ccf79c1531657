"""The vxlan backend: kernel devices ``flannel.<VNI>`` and ``flannel-v6.<VNI>``, programmed
per peer from etcd.

Per peer and family: a route ``<subnet> via <peer's subnet address> dev flannel.1 onlink``
(``flannel-v6.1`` for the IPv6 subnet), a permanent neighbour entry from that address to the
peer's VTEP MAC, and an FDB entry sending that MAC to the peer's host (``PublicIP``, or
``PublicIPv6`` for the IPv6 device). The kernel does the encapsulation; this module only keeps
the tables right, and republishes our VTEP MACs whenever a device had to be created anew.

The two devices are independent, as in flanneld v0.20.2: the IPv6 one runs over the IPv6
underlay (its local address is the external interface's IPv6 address) and has its own MAC,
published as ``BackendV6Data``; an IPv6-only network has only that one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyflannel.backend.base import Backend, BackendError, endpoint_problem
from pyflannel.config import NetworkConfig
from pyflannel.host import netlink, routes
from pyflannel.host.netlink import ExternalInterface
from pyflannel.host.nlsession import run_netlink
from pyflannel.host.routes import IPNetwork, RouteSpec
from pyflannel.lease.model import NO_PUBLIC_IP, Lease, LeaseAttrs

log = logging.getLogger("pyflannel.vxlan")

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
VXLAN6_OVERHEAD = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14
DEFAULT_PORT = 8472  # the Linux kernel's historical VXLAN port, as flanneld uses

IPAddress = IPv4Address | IPv6Address
# (peer's VTEP address on the overlay, VTEP MAC, the peer's host on the underlay)
L2Entry = tuple[IPAddress, str, IPAddress]


@dataclass
class Vtep:
    """One VXLAN device (IPv4 or IPv6 underlay) and the L2 entries programmed on it, by
    peer lease key."""

    version: int  # 4 or 6: the family of both the overlay subnet and the underlay
    device: str
    overhead: int
    index: int = 0
    mac: str = ""
    programmed: dict[str, L2Entry] = field(default_factory=dict)


class VxlanBackend(Backend):
    type = "vxlan"

    def __init__(self, cfg: NetworkConfig, ext: ExternalInterface) -> None:
        super().__init__(cfg, ext)
        self.vni = int(cfg.backend_option("VNI", 1))
        self.port = int(cfg.backend_option("Port", 0)) or DEFAULT_PORT
        self.gbp = bool(cfg.backend_option("GBP", False))
        self.direct_routing = bool(cfg.backend_option("DirectRouting", False))
        self.base_mtu = int(cfg.backend_option("MTU", 0)) or ext.mtu
        self.v4 = Vtep(4, f"flannel.{self.vni}", VXLAN_OVERHEAD)
        self.v6 = Vtep(6, f"flannel-v6.{self.vni}", VXLAN6_OVERHEAD)
        # The devices this network uses: IPv4 first, as flanneld creates them.
        self.vteps = [vt for vt, on in ((self.v4, cfg.enable_ipv4), (self.v6, cfg.enable_ipv6))
                      if on]
        self.l2_networks: list[IPv4Network | IPv6Network] = []
        self._l2_lock = asyncio.Lock()

    # The IPv4 device's state under its historical names (status, tests and tools use them).
    @property
    def device(self) -> str:
        return self.v4.device

    @property
    def index(self) -> int:
        return self.v4.index

    @index.setter
    def index(self, value: int) -> None:
        self.v4.index = value

    @property
    def mac(self) -> str:
        return self.v4.mac

    @property
    def programmed(self) -> dict[str, L2Entry]:
        return self.v4.programmed

    @programmed.setter
    def programmed(self, value: dict[str, L2Entry]) -> None:
        self.v4.programmed = value

    @property
    def mtu(self) -> int:
        """FLANNEL_MTU: the external MTU - 50 in every mode, as flanneld writes it (the IPv6
        device itself gets - 70; see :meth:`device_mtu`)."""
        return self.base_mtu - VXLAN_OVERHEAD

    def device_mtu(self, vt: Vtep) -> int:
        return self.base_mtu - vt.overhead

    def attrs(self) -> LeaseAttrs:
        v4, v6 = self.cfg.enable_ipv4, self.cfg.enable_ipv6
        return LeaseAttrs(
            public_ip=self.ext.public_ip if v4 else NO_PUBLIC_IP,
            backend_type=self.type,
            backend_data={"VNI": self.vni, "VtepMAC": self.v4.mac} if v4 else None,
            public_ipv6=self.ext.public_ipv6 if v6 else None,
            backend_v6_data={"VNI": self.vni, "VtepMAC": self.v6.mac} if v6 else None,
        )

    async def prepare(self) -> LeaseAttrs:
        if self.cfg.enable_ipv6 and (self.ext.address6 is None or self.ext.public_ipv6 is None):
            raise BackendError(
                f"vxlan: the network has IPv6 (EnableIPv6) but interface {self.ext.name} has "
                "no IPv6 address to carry it; give it one, or pick another with -iface")
        keep = {vt.device for vt in self.vteps}
        gone = await run_netlink(netlink.remove_stale_devices, keep)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        for vt in self.vteps:
            await self._ensure_device(vt)
        self.l2_networks = await run_netlink(netlink.interface_networks, self.ext.index)
        return self.attrs()

    async def _ensure_device(self, vt: Vtep) -> bool:
        local = self.ext.address if vt.version == 4 else self.ext.address6
        assert local is not None
        params = netlink.VxlanParams(vt.device, self.vni, local, self.ext.index, self.port,
                                     self.gbp)
        try:
            vt.index, vt.mac, created = await run_netlink(netlink.ensure_vxlan, params)
        except Exception as e:  # noqa: BLE001 - netlink errors carry errno text only
            raise BackendError(f"cannot create vxlan device {vt.device}: {e}") from None
        if created:
            log.info("created %s (VNI %d, port %d, local %s, VtepMAC %s)", vt.device, self.vni,
                     self.port, local, vt.mac)
            vt.programmed.clear()
        return created

    async def _set_address(self, vt: Vtep, lease: Lease) -> None:
        """Our subnet's network address on the device (/32 or /128), as flanneld does, so the
        host has an overlay source address for traffic it sends to pods."""
        if vt.version == 4 and lease.has_ipv4:
            addr: IPAddress = lease.subnet.network_address
        elif vt.version == 6 and lease.ipv6_subnet is not None:
            addr = lease.ipv6_subnet.network_address
        else:
            return
        await run_netlink(netlink.set_device_address, vt.device, addr,
                                self.device_mtu(vt))

    async def activate(self, lease: Lease) -> None:
        for vt in self.vteps:
            await self._set_address(vt, lease)
        await super().activate(lease)

    def _peer_vtep(self, peer: Lease, vt: Vtep) -> L2Entry | None:
        """(the peer's VTEP address, MAC, host) for device ``vt``; None when the peer has no
        subnet of that family, or (with one warning) no usable VTEP for it."""
        entry, why = self._vtep_of(peer, vt)
        if why is not None:
            self.skip_peer(peer, why)
        return entry

    def _vtep_of(self, peer: Lease, vt: Vtep) -> tuple[L2Entry | None, str | None]:
        """The peer's VTEP on ``vt``, or (None, why its lease gives no usable one), or
        (None, None) when the peer has no subnet of that family."""
        if vt.version == 4:
            if not peer.has_ipv4:
                return None, None
            data, gw = peer.attrs.backend_data, peer.subnet.network_address
            host: IPAddress | None = peer.attrs.public_ip
            what = "BackendData"
        else:
            if peer.ipv6_subnet is None:
                return None, None
            data, gw = peer.attrs.backend_v6_data, peer.ipv6_subnet.network_address
            host = peer.attrs.public_ipv6
            what = "BackendV6Data"
            if host is None:
                return None, "it has an IPv6 subnet but no PublicIPv6; its IPv6 subnet is left out"
        mac = data.get("VtepMAC") if isinstance(data, dict) else None
        why = endpoint_problem(host) or vtep_mac_problem(mac, what)
        if why is not None:
            return None, why
        assert isinstance(mac, str) and host is not None
        return (gw, mac.lower(), host), None

    def peer_problems(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        for vt in self.vteps:
            for name, peer in self.peers.items():
                why = None if self._direct(peer, vt) else self._vtep_of(peer, vt)[1]
                if why is not None:
                    problems.setdefault(name, why)
        return problems

    def _host(self, peer: Lease, vt: Vtep) -> IPAddress | None:
        return peer.attrs.public_ip if vt.version == 4 else peer.attrs.public_ipv6

    def _direct(self, peer: Lease, vt: Vtep) -> bool:
        if not self.direct_routing:
            return False
        host = self._host(peer, vt)
        return host is not None and any(host in n for n in self.l2_networks)

    def _dst(self, peer: Lease, vt: Vtep) -> IPNetwork | None:
        if vt.version == 4:
            return peer.subnet if peer.has_ipv4 else None
        return peer.ipv6_subnet

    def desired_routes(self) -> dict[IPNetwork, RouteSpec]:
        out: dict[IPNetwork, RouteSpec] = {}
        for vt in self.vteps:
            for key, peer in self.peers.items():
                dst = self._dst(peer, vt)
                if dst is None:
                    continue
                if self._direct(peer, vt):
                    out[dst] = RouteSpec(dst, self.ext.index, self._host(peer, vt))
                elif key in vt.programmed:
                    out[dst] = RouteSpec(dst, vt.index, vt.programmed[key][0], onlink=True)
        return out

    async def commit(self) -> None:
        await self._sync_l2()
        await self.reconcile()

    def _wanted_l2(self, vt: Vtep) -> dict[str, L2Entry]:
        """Neighbour and FDB entries on ``vt`` for every encapsulated peer, none for others."""
        want = {}
        for key, peer in self.peers.items():
            entry = None if self._direct(peer, vt) else self._peer_vtep(peer, vt)
            if entry is not None:
                want[key] = entry
        return want

    async def _sync_l2(self) -> None:
        """Program the L2 tables in a worker thread from a snapshot taken here on the loop:
        the thread never reads ``self.peers`` or writes ``programmed``, which the loop
        changes meanwhile, and one lock keeps two syncs from interleaving."""
        errors: list[str] = []
        async with self._l2_lock:
            for vt in self.vteps:
                want, have = self._wanted_l2(vt), dict(vt.programmed)
                programmed, errs = await run_netlink(apply_l2, vt.index, have, want)
                vt.programmed = programmed
                errors += [f"{vt.device}: {e}" for e in errs]
        if errors:
            self._errors.error("l2", "cannot program neighbour/FDB entries yet (%s); will "
                               "retry", "; ".join(errors[:3]))
        else:
            self._errors.clear("l2", "neighbour and FDB entries in place")

    def on_netlink(self, kind: str, what: str) -> None:
        if kind == "RTM_DELLINK" and any(what == vt.device for vt in self.vteps):
            log.warning("%s was deleted; recreating it", what)
        super().on_netlink(kind, what)

    async def reconcile_all(self) -> None:
        """Recreate a device that went away, republish its new MAC, reprogram everything."""
        recreated = False
        for vt in self.vteps:
            if await run_netlink(netlink.link_index, vt.device) is None:
                try:
                    await self._ensure_device(vt)
                except BackendError as e:
                    self._errors.error("device", "%s", e)
                    return
                recreated = True
                if self.lease is not None:
                    await self._set_address(vt, self.lease)
            else:
                await self._check_l2(vt)
        if recreated and self.publish is not None:
            await self.publish(self.attrs())
        await self.commit()

    async def follow_address(self, ext: ExternalInterface) -> LeaseAttrs | None:
        """Each VTEP's local address (and lower device) is the old one: make it anew on
        ``ext``. A new device has a new MAC, so the attributes to publish change too."""
        self.ext = ext
        for vt in self.vteps:
            await self._ensure_device(vt)
            if self.lease is not None:
                await self._set_address(vt, self.lease)
        self.l2_networks = await run_netlink(netlink.interface_networks, ext.index)
        await self.commit()
        return self.attrs()

    async def _check_l2(self, vt: Vtep) -> None:
        """Forget entries someone removed by hand, so the next sync puts them back."""
        async with self._l2_lock:
            gone = await run_netlink(missing_l2, vt.index, dict(vt.programmed))
            for key in gone:
                vt.programmed.pop(key, None)

    async def teardown(self) -> None:
        # flanneld leaves its vxlan devices in place so traffic survives a restart; so do we.
        await super().teardown()


def vtep_mac_problem(mac: object, what: str = "BackendData") -> str | None:
    """Why a lease's VtepMAC cannot be a peer's VTEP, or None: it must be a unicast MAC
    (six hex octets, not all zero, whose all-zero FDB entry would flood to that host)."""
    if not isinstance(mac, str):
        return f"its lease has no {what}.VtepMAC"
    octets = mac.split(":")
    try:
        values = [int(o, 16) for o in octets if len(o) == 2]
    except ValueError:
        values = []
    if len(values) != 6 or len(octets) != 6:
        return f"its {what}.VtepMAC {mac[:40]!r} is not a MAC address"
    if values[0] & 1 or not any(values):
        return f"its {what}.VtepMAC {mac} is not a unicast address"
    return None


def apply_l2(index: int, have: dict[str, L2Entry],
             want: dict[str, L2Entry]) -> tuple[dict[str, L2Entry], list[str]]:
    """Make the device's neighbour and FDB entries go from ``have`` to ``want`` (runs in a
    worker thread; touches only its arguments). Returns what is now programmed, and errors:
    an entry that failed is left out, so the next sync tries it again."""
    programmed, errors = dict(have), []
    for key, (ip, mac, host) in have.items():
        if want.get(key) != (ip, mac, host):
            try:
                routes.delete_neighbour(index, ip)
                routes.delete_fdb(index, mac, host)
            except Exception as e:  # noqa: BLE001 - netlink errors carry errno text only
                errors.append(f"del {key}: {e}")
            programmed.pop(key, None)
    for key, entry in want.items():
        if key not in programmed:
            ip, mac, host = entry
            try:
                routes.replace_fdb(index, mac, host)
                routes.replace_neighbour(index, ip, mac)
                programmed[key] = entry
            except Exception as e:  # noqa: BLE001
                errors.append(f"{key}: {e}")
    return programmed, errors


def missing_l2(index: int, programmed: dict[str, L2Entry]) -> list[str]:
    """Lease keys whose entries are no longer in the kernel (worker thread)."""
    try:
        neigh = routes.neighbours(index)
        fdb = routes.fdb_entries(index)
    except Exception:  # noqa: BLE001 - the device may be going away right now
        return []
    return [key for key, (ip, mac, host) in programmed.items()
            if neigh.get(ip) != mac or fdb.get(mac) != host]
