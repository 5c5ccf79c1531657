"""The vxlan backend: kernel device ``flannel.<VNI>``, programmed per peer from etcd.

Per peer: a route ``<subnet> via <peer's subnet address> dev flannel.1 onlink``, a permanent
neighbour entry from that address to the peer's VTEP MAC, and an FDB entry sending that MAC to
the peer's host. The kernel does the encapsulation; this module only keeps the tables right,
and republishes our VTEP MAC whenever the device had to be created anew.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv4Network

from pyflannel.backend.base import Backend, BackendError
from pyflannel.host import netlink, routes
from pyflannel.host.routes import RouteSpec
from pyflannel.lease.model import Lease, LeaseAttrs

log = logging.getLogger("pyflannel.vxlan")

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
DEFAULT_PORT = 8472  # the Linux kernel's historical VXLAN port, as flanneld uses

L2Entry = tuple[IPv4Address, str, IPv4Address]  # (peer's VTEP address, VTEP MAC, host)


class VxlanBackend(Backend):
    type = "vxlan"

    def __init__(self, cfg, ext) -> None:
        super().__init__(cfg, ext)
        self.vni = int(cfg.backend_option("VNI", 1))
        self.port = int(cfg.backend_option("Port", 0)) or DEFAULT_PORT
        self.gbp = bool(cfg.backend_option("GBP", False))
        self.direct_routing = bool(cfg.backend_option("DirectRouting", False))
        self.base_mtu = int(cfg.backend_option("MTU", 0)) or ext.mtu
        self.device = f"flannel.{self.vni}"
        self.index = 0
        self.mac = ""
        self.l2_networks: list[IPv4Network] = []
        self.programmed: dict[IPv4Network, L2Entry] = {}
        self._l2_lock = asyncio.Lock()

    @property
    def mtu(self) -> int:
        return self.base_mtu - VXLAN_OVERHEAD

    def attrs(self) -> LeaseAttrs:
        return LeaseAttrs(public_ip=self.ext.public_ip, backend_type=self.type,
                          backend_data={"VNI": self.vni, "VtepMAC": self.mac})

    async def prepare(self) -> LeaseAttrs:
        gone = await asyncio.to_thread(netlink.remove_stale_devices, self.device)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        await self._ensure_device()
        self.l2_networks = await asyncio.to_thread(netlink.interface_networks, self.ext.index)
        return self.attrs()

    async def _ensure_device(self) -> bool:
        params = netlink.VxlanParams(self.device, self.vni, self.ext.address, self.ext.index,
                                     self.port, self.gbp)
        try:
            self.index, self.mac, created = await asyncio.to_thread(netlink.ensure_vxlan, params)
        except Exception as e:  # noqa: BLE001 - netlink errors carry errno text only
            raise BackendError(f"cannot create vxlan device {self.device}: {e}") from None
        if created:
            log.info("created %s (VNI %d, port %d, VtepMAC %s)", self.device, self.vni,
                     self.port, self.mac)
        if created:
            self.programmed.clear()
        return created

    async def activate(self, lease: Lease) -> None:
        await asyncio.to_thread(netlink.set_device_address, self.device,
                                lease.subnet.network_address, self.mtu)
        await super().activate(lease)

    def _peer_vtep(self, peer: Lease) -> tuple[IPv4Address, str] | None:
        data = peer.attrs.backend_data
        mac = data.get("VtepMAC") if isinstance(data, dict) else None
        if not isinstance(mac, str) or len(mac.split(":")) != 6:
            self._warn.warn(("vtep", peer.subnet, str(mac)[:40]), "peer %s has no usable "
                            "VtepMAC in its lease; ignored", peer.subnet)
            return None
        return peer.subnet.network_address, mac.lower()

    def _direct(self, peer: Lease) -> bool:
        return self.direct_routing and any(peer.attrs.public_ip in n for n in self.l2_networks)

    def desired_routes(self) -> dict[IPv4Network, RouteSpec]:
        out = {}
        for subnet, peer in self.peers.items():
            if self._direct(peer):
                out[subnet] = RouteSpec(subnet, self.ext.index, peer.attrs.public_ip)
            elif subnet in self.programmed:
                gw = self.programmed[subnet][0]
                out[subnet] = RouteSpec(subnet, self.index, gw, onlink=True)
        return out

    async def commit(self) -> None:
        await self._sync_l2()
        await self.reconcile()

    def _wanted_l2(self) -> dict[IPv4Network, L2Entry]:
        """Neighbour and FDB entries for every encapsulated peer, none for others."""
        want = {}
        for subnet, peer in self.peers.items():
            vtep = None if self._direct(peer) else self._peer_vtep(peer)
            if vtep is not None:
                want[subnet] = (vtep[0], vtep[1], peer.attrs.public_ip)
        return want

    async def _sync_l2(self) -> None:
        """Program the L2 tables in a worker thread from a snapshot taken here on the loop:
        the thread never reads ``self.peers`` or writes ``self.programmed``, which the loop
        changes meanwhile, and one lock keeps two syncs from interleaving."""
        async with self._l2_lock:
            want, have = self._wanted_l2(), dict(self.programmed)
            programmed, errors = await asyncio.to_thread(apply_l2, self.index, have, want)
            self.programmed = programmed
        if errors:
            self._errors.error("l2", "cannot program neighbour/FDB entries yet (%s); will "
                               "retry", "; ".join(errors[:3]))
        else:
            self._errors.clear("l2", "neighbour and FDB entries in place")

    def on_netlink(self, kind: str, what: str) -> None:
        if kind == "RTM_DELLINK" and what == self.device:
            log.warning("%s was deleted; recreating it", self.device)
        super().on_netlink(kind, what)

    async def reconcile_all(self) -> None:
        """Recreate the device if it went away, republish a new MAC, reprogram everything."""
        if await asyncio.to_thread(netlink.link_index, self.device) is None:
            try:
                await self._ensure_device()
            except BackendError as e:
                self._errors.error("device", "%s", e)
                return
            if self.lease is not None:
                await asyncio.to_thread(netlink.set_device_address, self.device,
                                        self.lease.subnet.network_address, self.mtu)
            if self.publish is not None:
                await self.publish(self.attrs())
        else:
            await self._check_l2()
        await self.commit()

    async def _check_l2(self) -> None:
        """Forget entries someone removed by hand, so the next sync puts them back."""
        async with self._l2_lock:
            gone = await asyncio.to_thread(missing_l2, self.index, dict(self.programmed))
            for subnet in gone:
                self.programmed.pop(subnet, None)

    async def teardown(self) -> None:
        # flanneld leaves flannel.<VNI> in place so traffic survives a restart; so do we.
        await super().teardown()


def apply_l2(index: int, have: dict[IPv4Network, L2Entry],
             want: dict[IPv4Network, L2Entry]) -> tuple[dict[IPv4Network, L2Entry], list[str]]:
    """Make the device's neighbour and FDB entries go from ``have`` to ``want`` (runs in a
    worker thread; touches only its arguments). Returns what is now programmed, and errors:
    an entry that failed is left out, so the next sync tries it again."""
    programmed, errors = dict(have), []
    for subnet, (ip, mac, host) in have.items():
        if want.get(subnet) != (ip, mac, host):
            try:
                routes.delete_neighbour(index, ip)
                routes.delete_fdb(index, mac, host)
            except Exception as e:  # noqa: BLE001 - netlink errors carry errno text only
                errors.append(f"del {subnet}: {e}")
            programmed.pop(subnet, None)
    for subnet, entry in want.items():
        if subnet not in programmed:
            ip, mac, host = entry
            try:
                routes.replace_fdb(index, mac, host)
                routes.replace_neighbour(index, ip, mac)
                programmed[subnet] = entry
            except Exception as e:  # noqa: BLE001
                errors.append(f"{subnet}: {e}")
    return programmed, errors


def missing_l2(index: int, programmed: dict[IPv4Network, L2Entry]) -> list[IPv4Network]:
    """Subnets whose entries are no longer in the kernel (worker thread)."""
    try:
        neigh = routes.neighbours(index)
        fdb = routes.fdb_entries(index)
    except Exception:  # noqa: BLE001 - the device may be going away right now
        return []
    return [subnet for subnet, (ip, mac, host) in programmed.items()
            if neigh.get(ip) != mac or fdb.get(mac) != host]
