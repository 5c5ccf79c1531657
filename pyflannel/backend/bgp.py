"""The bgp backend (Calico's routed model): subnets spread by BGP, carried by the kernel.

The data path is host-gw's: no device, a kernel route per peer subnet. What differs is where
the routes come from. Each node announces its own subnet(s) over BGP, to the other nodes (a
full mesh, or through route reflectors) and to the configured peers (top-of-rack routers),
and installs what its peers announce, after the import policy (:mod:`pyflannel.bgp.rib`).
Leases stay the address plan: they say who the peers are, never what the routes are.

* **Sessions** (:func:`plan_peers`): with the mesh on, every other bgp node; of each pair the
  lower address connects and the higher one only listens. Once any node publishes a
  ``RouteReflectorClusterID``, reflectors peer with everybody and the others only with the
  reflectors. Configured ``Peers`` always.
* **Routes**: several paths to one prefix become one ECMP route; a next hop not on a connected
  network is resolved through the kernel's own route to it (BIRD's ``gateway recursive``).
* **Restart**: the speaker starts as a restarting one (RFC 4724), so peers keep our routes and
  ours stay in the kernel; what nobody announces again is removed once every peer has sent
  End-of-RIB (or after the graceful-restart time). Shutdown closes sessions gracefully.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from pyflannel.backend.base import Backend, BackendError, endpoint_problem, peer_address
from pyflannel.bgp.attributes import community
from pyflannel.bgp.rib import ImportPolicy, LocalSpeaker
from pyflannel.bgp.session import PeerSpec, Session, Speaker, Timing
from pyflannel.config import NetworkConfig
from pyflannel.flags import Options
from pyflannel.host import netlink
from pyflannel.host.netlink import ExternalInterface
from pyflannel.host.nlsession import iproute, run_netlink
from pyflannel.host.routes import IPNetwork, NextHop, RouteSpec, route_to, sync_routes
from pyflannel.lease.model import NO_PUBLIC_IP, Lease, LeaseAttrs

log = logging.getLogger("pyflannel.bgp")

IPAddress = IPv4Address | IPv6Address
# A new node refuses our connection until it has listed the leases and knows us (tens of ms):
# the first retry comes this soon, then the wait doubles (jittered) up to a minute.
FIRST_RETRY_S = 0.2
# The longest a starting node waits for its sessions before it says ready all the same: a
# peer whose lease outlived it (or a router that is down) must not keep the node unready.
READY_GRACE_MAX_S = 30.0


class FirstSync:
    """Readiness at start: not ready until every session planned has been synced once
    (Established and End-of-RIB received, so its routes are in the RIB) or the grace ran
    out, whichever comes first. Once ready, later peers (a node joining) never take it back:
    the routes to everybody else are still there."""

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline = clock() + grace
        self.synced: set[str] = set()
        self.done = False

    def behind(self, sessions: Iterable[Session]) -> bool:
        if not self.done:
            pending = []
            for s in sessions:
                if s.synced:
                    self.synced.add(s.key)
                elif s.key not in self.synced:
                    pending.append(s.key)
            self.done = not pending or self.clock() >= self.deadline
        return not self.done


@dataclass(frozen=True)
class NodeRole:
    """What a bgp node publishes in its lease's BackendData."""

    address: IPAddress
    asn: int
    cluster_id: IPv4Address | None = None  # set: a route reflector

    def backend_data(self) -> dict:
        return {"ASNumber": self.asn, "RouteReflectorClusterID":
                str(self.cluster_id) if self.cluster_id else None}


def role_of(lease: Lease, default_asn: int) -> tuple[NodeRole | None, str | None]:
    """A bgp lease's role, or why it cannot be peered with (one line)."""
    address = ip_address(peer_address(lease))
    why = endpoint_problem(address)
    if why is not None:
        return None, why
    data = lease.attrs.backend_data
    if data is None:
        return NodeRole(address, default_asn), None
    if not isinstance(data, dict):
        return None, "its BackendData is not a JSON object"
    asn = data.get("ASNumber", default_asn)
    if isinstance(asn, bool) or not isinstance(asn, int) or not 1 <= asn <= 4_294_967_295:
        return None, f"its BackendData.ASNumber {str(asn)[:20]!r} is not an AS number"
    cluster = data.get("RouteReflectorClusterID")
    try:
        cluster_id = IPv4Address(cluster) if cluster else None
    except ValueError:
        return None, (f"its BackendData.RouteReflectorClusterID {str(cluster)[:40]!r} is not "
                      "an IPv4 address")
    return NodeRole(address, asn, cluster_id), None


def plan_peers(me: NodeRole, others: Iterable[NodeRole], cfg: NetworkConfig
               ) -> dict[str, PeerSpec]:
    """The sessions this node should have, by peer address."""
    port = cfg.backend["ListenPort"]
    nodes = [n for n in others if n.address != me.address]
    reflectors = [n for n in nodes if n.cluster_id is not None]
    out: dict[str, PeerSpec] = {}

    def node_peer(n: NodeRole, kind: str, client: bool = False) -> None:
        if n.address.version != me.address.version:
            return
        out[str(n.address)] = PeerSpec(n.address, n.asn, port, kind=kind,
                                       passive=int(me.address) > int(n.address),
                                       rr_client=client)

    if me.cluster_id is not None:
        for n in nodes:
            if n.cluster_id is not None:
                node_peer(n, "reflector")
            else:
                node_peer(n, "client", client=True)
    elif reflectors:
        for n in reflectors:
            node_peer(n, "reflector")
    elif cfg.backend["NodeToNodeMesh"]:
        for n in nodes:
            node_peer(n, "mesh")
    for p in cfg.backend["Peers"]:
        out[str(p.peer_ip)] = PeerSpec(p.peer_ip, p.asn, p.port, p.password, "configured",
                                       keep_next_hop=p.keep_original_next_hop)
    return out


def kernel_routes(routes: dict, resolved: dict[IPAddress, tuple[IPAddress, int]]
                  ) -> dict[IPNetwork, RouteSpec]:
    """Kernel routes for the RIB's ``{prefix: next hops}``: each next hop through the kernel's
    route to it (``resolved``); unresolvable ones left out; two or more make ECMP."""
    out: dict[IPNetwork, RouteSpec] = {}
    for prefix, hops in routes.items():
        paths = sorted({NextHop(*resolved[h]) for h in hops if h in resolved})
        if len(paths) == 1:
            out[prefix] = RouteSpec(prefix, paths[0].oif, paths[0].gateway)
        elif paths:
            out[prefix] = RouteSpec(prefix, 0, nexthops=tuple(paths))
    return out


def _resolve_and_sync(routes: dict, remove_extra: bool) -> tuple[int, int, list[str]]:
    """In the netlink thread: resolve every next hop, then reconcile."""
    with iproute() as ipr:
        hops = {h for hs in routes.values() for h in hs}
        resolved = {h: r for h in hops if (r := route_to(ipr, h)) is not None}
    added, removed, errors = sync_routes(kernel_routes(routes, resolved), remove_extra)
    missing = sorted(str(h) for h in hops if h not in resolved)
    if missing:
        errors.append(f"no route to next hop(s) {', '.join(missing[:3])}")
    return added, removed, errors


class BgpBackend(Backend):
    type = "bgp"

    def __init__(self, cfg: NetworkConfig, ext: ExternalInterface,
                 opts: Options | None = None) -> None:
        super().__init__(cfg, ext)
        opts = opts or Options()
        b = cfg.backend
        self.asn = opts.bgp_as_number or b["ASNumber"]
        self.cluster_id = (IPv4Address(opts.bgp_route_reflector_cluster_id)
                           if opts.bgp_route_reflector_cluster_id else None)
        self._router_id_flag = opts.bgp_router_id
        self.router_id = self._router_id(ext)
        self.speaker: Speaker | None = None
        self._announced: set = set()
        self._started = time.monotonic()
        self._swept = False
        gr = cfg.backend["GracefulRestartTime"]
        self.first_sync = FirstSync(min(gr, READY_GRACE_MAX_S) if gr else READY_GRACE_MAX_S)

    def _router_id(self, ext: ExternalInterface) -> IPv4Address:
        router_id = self._router_id_flag or (
            str(ext.public_ip) if self.cfg.enable_ipv4 and ext.public_ip != NO_PUBLIC_IP
            else "")
        if not router_id:
            raise BackendError("bgp: an IPv6-only node needs -bgp-router-id=A.B.C.D (a BGP "
                               "router ID is an IPv4 address)")
        return IPv4Address(router_id)

    @property
    def mtu(self) -> int:
        return self.ext.mtu

    async def follow_address(self, ext: ExternalInterface) -> LeaseAttrs | None:
        """The node's address moved: the speaker starts again with the new next hop, source
        address and router ID (its sessions end; the peers learn the new next hop from the
        new ones), and the sessions follow the republished lease."""
        moved = (ext.public_ip, ext.public_ipv6) != (self.ext.public_ip, self.ext.public_ipv6)
        self.ext = ext
        if moved and self.speaker is not None:
            await self.speaker.stop()
            self.router_id = self._router_id(ext)
            self._announced = set()
            await self._start_speaker()
        await self.commit()
        return None

    @property
    def me(self) -> NodeRole:
        address = self.ext.public_ip if self.cfg.enable_ipv4 else self.ext.public_ipv6
        return NodeRole(address, self.asn, self.cluster_id)

    async def prepare(self) -> LeaseAttrs:
        v4, v6 = self.cfg.enable_ipv4, self.cfg.enable_ipv6
        if v6 and self.ext.public_ipv6 is None:
            raise BackendError(
                f"bgp: the network has IPv6 (EnableIPv6) but interface {self.ext.name} has no "
                "IPv6 address to route it; give it one, or pick another with -iface")
        own = await run_netlink(netlink.interface_addresses, self.ext.index)
        for on, addr, flag in ((v4, self.ext.public_ip, "-public-ip"),
                               (v6, self.ext.public_ipv6, "-public-ipv6")):
            if on and addr not in own:
                raise BackendError(
                    f"bgp: the published address {addr} is not an address of {self.ext.name} "
                    f"(routes lead to it directly and cannot cross NAT; drop {flag})")
        gone = await run_netlink(netlink.remove_stale_devices, None)
        if gone:
            log.info("removed devices of an earlier backend: %s", ", ".join(gone))
        await self._start_speaker()
        return LeaseAttrs(public_ip=self.ext.public_ip if v4 else NO_PUBLIC_IP,
                          backend_type=self.type, backend_data=self.me.backend_data(),
                          public_ipv6=self.ext.public_ipv6 if v6 else None)

    async def _start_speaker(self) -> None:
        b = self.cfg.backend
        next_hops = tuple(a for a, on in ((self.ext.public_ip, self.cfg.enable_ipv4),
                                          (self.ext.public_ipv6, self.cfg.enable_ipv6))
                          if on and a is not None)
        local = LocalSpeaker(self.asn, self.router_id, next_hops, self.cluster_id,
                             tuple(community(c) for c in b["Communities"]))
        timing = Timing(hold_time=b["HoldTime"], keepalive_time=b["KeepaliveTime"],
                        graceful_restart_time=b["GracefulRestartTime"] or None,
                        restarting=True, idle_hold_first=FIRST_RETRY_S)
        self.speaker = Speaker(local, ImportPolicy.from_pools(self.cfg.pools),
                               on_routes=lambda changes: self.on_netlink("bgp", "routes"),
                               port=b["ListenPort"], source=next_hops, timing=timing)
        try:
            await self.speaker.start()
        except OSError as e:
            raise BackendError(f"bgp: cannot listen on port {b['ListenPort']}: "
                               f"{e.strerror or e}") from None
        log.info("bgp: AS %d, router ID %s%s, listening on port %d", self.asn, self.router_id,
                 f", route reflector for cluster {self.cluster_id}" if self.cluster_id else "",
                 b["ListenPort"])

    async def commit(self) -> None:
        self._sync_speaker()
        await self.reconcile()

    def take_config(self, cfg: NetworkConfig) -> bool:
        """Follow a new network config at once if only ``Peers`` or ``NodeToNodeMesh``
        changed (sessions come and go); anything else waits for a restart (False)."""
        live = ("Peers", "NodeToNodeMesh")
        if (cfg.backend_type != self.type or cfg.pools != self.cfg.pools
                or {k: v for k, v in cfg.backend.items() if k not in live}
                != {k: v for k, v in self.cfg.backend.items() if k not in live}):
            return False
        self.cfg = cfg
        self._sync_speaker()
        return True

    def _sync_speaker(self) -> None:
        """Announce our subnet(s) and follow the leases and the config with the sessions."""
        speaker = self.speaker
        if speaker is None:
            return
        own = set()
        if self.lease is not None:
            if self.cfg.enable_ipv4 and self.lease.has_ipv4:
                own.add(self.lease.subnet)
            if self.cfg.enable_ipv6 and self.lease.ipv6_subnet is not None:
                own.add(self.lease.ipv6_subnet)
        speaker.rib.policy = ImportPolicy.from_pools(self.cfg.pools, own)
        for prefix in self._announced - own:
            speaker.withdraw_local(prefix)
        for prefix in own - self._announced:
            speaker.originate(prefix)
        self._announced = own
        roles = []
        for lease in self.peers.values():
            role, why = role_of(lease, self.cfg.backend["ASNumber"])
            if why is not None:
                self.skip_peer(lease, why)
            elif role is not None:
                roles.append(role)
        wanted = plan_peers(self.me, roles, self.cfg)
        for key in [k for k in speaker.sessions if k not in wanted]:
            speaker.remove_peer(key)
        for spec in wanted.values():
            speaker.add_peer(spec)

    def data_path_behind(self) -> bool:
        """Not ready while the sessions of a starting node have not brought in the routes
        (see :class:`FirstSync`)."""
        return self.speaker is None or self.first_sync.behind(self.speaker.sessions.values())

    def _sweep_allowed(self) -> bool:
        """Our own leftover routes go once every peer is back and finished (End-of-RIB), or
        the graceful-restart time ran out."""
        if not self._swept:
            speaker = self.speaker
            all_back = speaker is not None and all(s.established for s in
                                                   speaker.sessions.values())
            late = time.monotonic() - self._started > (self.cfg.backend["GracefulRestartTime"]
                                                       or 0)
            if (all_back and speaker.synced()) or late:
                self._swept = True
        return self._swept

    async def reconcile(self) -> None:
        routes = self.speaker.rib.routes() if self.speaker and self.lease is not None else {}
        self.report_route_sync(*await run_netlink(_resolve_and_sync, routes,
                                                  self._sweep_allowed()))

    async def teardown(self) -> None:
        """Close the sessions without NOTIFICATION: peers keep our routes as stale while
        pyflanneld restarts, and the kernel keeps theirs (RFC 4724)."""
        if self.speaker is not None:
            await self.speaker.stop(graceful=True)
        await super().teardown()

    def bgp_status(self) -> list[dict]:
        return self.speaker.status() if self.speaker is not None else []
