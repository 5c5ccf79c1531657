"""pyflanneld: the start-up sequence, and the wiring between leases, backend and host.

Order matters and is flanneld's (v0.15 on), with one check first: the subnet file's path
is checked before anything is touched; then read and validate the network config (before
any device is touched: it says which address families the node needs), find the interface
and its addresses for those families, prepare the backend, take a lease, program the data
path, write the subnet file, and tell systemd we are ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path

from pyflannel.backend import Backend, BackendError, make_backend
from pyflannel.backend.base import peer_address
from pyflannel.config import NetworkConfig
from pyflannel.daemon import startup
from pyflannel.daemon.address_watch import AddressWatch
from pyflannel.daemon.config_watcher import ConfigWatcher
from pyflannel.daemon.iptables_keeper import IptablesKeeper
from pyflannel.daemon.snapshot import NodeSnapshot, StatePublisher
from pyflannel.daemon.supervise import Fatal, supervise
from pyflannel.flags import Options
from pyflannel.host import netlink, systemd
from pyflannel.host.extaddr import Pins
from pyflannel.host.subnetfile import (
    SubnetEnv,
    first_host,
    write_subnet_file,
)
from pyflannel.host.tun import TunError
from pyflannel.lease.etcd import EtcdAuthError, EtcdUnavailable, registry_for
from pyflannel.lease.manager import LeaseManager, describe
from pyflannel.lease.model import NO_PUBLIC_IP, Lease
from pyflannel.lease.policy import LEASE_TTL_S, PeerDiff
from pyflannel.logutil import RateLimitedLog, WarnOnce
from pyflannel.metrics import HealthServer, Metrics
from pyflannel.policy.docker import DockerWatcher
from pyflannel.policy.keeper import PolicyKeeper, node_labels, with_node_labels

log = logging.getLogger("pyflannel")


class Daemon:
    """One node: owns the registry, the lease manager, the backend and the helpers around
    them, and runs them as supervised tasks."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.registry = registry_for(opts)
        self.errors = RateLimitedLog(log)
        self.backend: Backend | None = None
        self.manager: LeaseManager | None = None
        self.cfg: NetworkConfig | None = None
        self.iptables: IptablesKeeper | None = None
        self.address_watch: AddressWatch | None = None
        self.ready = asyncio.Event()
        self.peer_counters: dict[str, dict] = {}
        self.task_restarts: dict[str, int] = {}
        self._warn = WarnOnce(log)
        self.metrics = Metrics(lambda: self.snapshot().for_metrics())
        self.http: HealthServer | None = None
        self.policy_keeper: PolicyKeeper | None = None

    # -- what the node looks like ------------------------------------------------------

    def is_ready(self) -> bool:
        """Ready while we hold a lease and the data path it needs is programmed and running."""
        m, b = self.manager, self.backend
        return (self.ready.is_set() and m is not None and m.holds_subnet()
                and b is not None and b.healthy() and not b.data_path_behind()
                and (self.address_watch is None or self.address_watch.settled))

    def snapshot(self) -> NodeSnapshot:
        m, b = self.manager, self.backend
        lease = m.lease if m is not None else None
        ignored = b.peer_problems() if b is not None else {}
        return NodeSnapshot(
            backend=b.type if b is not None else "",
            subnet=str(lease.subnet) if lease is not None and lease.has_ipv4 else "",
            ipv6_subnet=str(lease.ipv6_subnet or "") if lease is not None else "",
            peers=len(b.peers) - len(ignored) if b is not None else 0,
            peers_ignored=ignored,
            data_path_behind=b is not None and b.data_path_behind(),
            refused_rows=sum(map(len, b.refused_rows.values())) if b is not None else 0,
            lease_expiry=m.expires_at if lease is not None and m is not None else 0.0,
            renewals=m.renewals if m is not None else 0,
            etcd_errors=self.registry.errors,
            ready=self.is_ready(),
            counters=b.counters() if b is not None else {},
            peer_counters=self.peer_counters,
            task_restarts=dict(self.task_restarts),
            bgp=b.bgp_status() if b is not None and hasattr(b, "bgp_status") else [],
            policy=self.policy_keeper.status() if self.policy_keeper is not None else {},
        )

    def state_file(self) -> Path:
        """Where ``pyflannel status`` finds this daemon's view of its peers."""
        return Path(self.opts.subnet_file).with_name("pyflannel-state.json")

    # -- start-up ----------------------------------------------------------------------

    async def start(self) -> None:
        """The start-up sequence (module docstring); each step fails with one line."""
        opts = self.opts
        await startup.check_subnet_file(opts.subnet_file)
        self.http = await startup.open_health_port(opts, self.metrics, self.is_ready)
        self.cfg = cfg = await startup.wait_for_config(self.registry, opts.etcd_prefix,
                                                       self.errors)
        for pool in cfg.pools:
            log.info("IPv%d network %s, subnets /%d from %s to %s, backend %s", pool.version,
                     pool.network, pool.subnet_len, pool.subnet_min, pool.subnet_max,
                     cfg.backend_type)
        ext = await startup.find_interface(opts, cfg)
        log.info("using interface %s (%s, mtu %d)", ext.name, _addresses(ext, cfg), ext.mtu)
        self.iptables = IptablesKeeper(opts, cfg)
        try:
            self.backend = make_backend(cfg, ext, opts)
            attrs = await self.backend.prepare()
            attrs = with_node_labels(attrs, node_labels(opts.node_labels))  # network policy
        except (BackendError, TunError) as e:
            raise Fatal(str(e)) from None
        self.manager = LeaseManager(
            self.registry, cfg, attrs,
            renew_margin_s=opts.subnet_lease_renew_margin * 60,
            ttl_s=opts.test_lease_ttl or LEASE_TTL_S,
            on_peers=self.on_peers, on_lease=self.on_lease, on_lease_lost=self.on_lease_lost,
        )
        if opts.test_lease_ttl:
            log.warning("-test-lease-ttl=%d: lease TTL shortened for testing",
                        opts.test_lease_ttl)
        self.backend.publish = lambda a: self.manager.republish(  # type: ignore[union-attr]
            replace(a, labels=attrs.labels))
        await startup.refuse_a_repeated_identity(self.registry, self.backend, cfg, attrs,
                                                 self.errors)
        self.address_watch = AddressWatch(
            ext, Pins.from_flags(opts.iface, opts.public_ip, opts.public_ipv6),
            self.follow_address, want_ipv4=cfg.enable_ipv4, want_ipv6=cfg.enable_ipv6,
            patterns=opts.iface_regex)
        await self.iptables.remove_disabled()
        lease = await startup.acquire_first(self.manager, opts.subnet_file, self.errors)
        try:
            await self.on_lease(lease, first=True)
        except (BackendError, TunError, OSError) as e:
            raise Fatal(f"cannot program subnet {describe(lease)}: {e}") from None
        self.manager.activated(lease)
        await self.initial_peers()
        self.ready.set()
        systemd.notify("READY=1")
        log.info("ready: subnet %s, mtu %d", describe(lease), self.backend.mtu)

    async def initial_peers(self) -> None:
        """Program the peers we know before claiming readiness (best effort)."""
        assert self.manager is not None
        try:
            await self.manager.resync()
        except (EtcdUnavailable, EtcdAuthError) as e:
            self.errors.error("watch", "cannot list peers yet: %s", e)

    # -- callbacks from the lease manager ----------------------------------------------

    async def on_lease(self, lease: Lease, first: bool = False) -> None:
        """Program the data path for a subnet we now hold, then hand it to Docker."""
        assert self.backend is not None and self.cfg is not None and self.iptables
        await self.backend.activate(lease)
        await self.iptables.ensure(lease, fatal=first)
        env = subnet_env(self.cfg, lease, self.backend.mtu, self.opts.ip_masq)
        await asyncio.to_thread(write_subnet_file, self.opts.subnet_file, env)
        said = [f"FLANNEL_SUBNET={env.subnet}"] if env.subnet else []
        said += [f"FLANNEL_IPV6_SUBNET={env.ipv6_subnet}"] if env.ipv6_subnet else []
        log.info("wrote %s (%s)", self.opts.subnet_file, ", ".join(said))

    async def follow_address(self, ext: netlink.ExternalInterface) -> None:
        """The node's address changed (the address watch decided so): close the etcd
        connections made from the old address (they hang rather than fail), move the data
        path to the new one, then republish the lease so peers send there."""
        assert self.backend is not None and self.manager is not None and self.cfg
        await self.registry.close()  # the next request connects again, from the new address
        changed = await self.backend.follow_address(ext)
        attrs = replace(changed or self.manager.attrs, labels=self.manager.attrs.labels,
                        public_ip=ext.public_ip if self.cfg.enable_ipv4 else NO_PUBLIC_IP,
                        public_ipv6=ext.public_ipv6 if self.cfg.enable_ipv6 else None)
        await self.manager.republish(attrs)
        lease = self.manager.lease  # None or lost: re-acquiring publishes the new attrs
        if lease is not None and not self.manager.lease_is_lost() and lease.attrs != attrs:
            raise EtcdUnavailable("the lease could not be republished")

    async def on_lease_lost(self, old: Lease) -> None:
        """The subnet is no longer ours: stop routing for it. The subnet file stays, so a
        later acquisition prefers the same subnet and Docker keeps its bridge meanwhile."""
        assert self.backend is not None and self.iptables is not None
        self.iptables.forget()
        await self.backend.deactivate()
        log.warning("subnet %s is no longer ours; its routes are removed", describe(old))

    async def on_peers(self, diff: PeerDiff) -> None:
        assert self.backend is not None
        started = time.monotonic()
        removed = [lease for lease in diff.removed if self._compatible(lease)]
        added = [lease for lease in diff.added if self._compatible(lease)]
        left_out_before = self.backend.peer_problems()
        for lease in removed:
            await self.backend.remove_peer(lease)
        for lease in added:
            await self.backend.add_peer(lease)
        await self.backend.commit()
        # A lease the backend leaves out was said by its one warning (Backend.skip_peer):
        # it is neither added to the data path nor, later, removed from it.
        left_out = self.backend.peer_problems()
        log_peer_changes([lease for lease in removed if lease.key_name not in left_out_before],
                         [lease for lease in added if lease.key_name not in left_out])
        self.metrics.programming.observe(time.monotonic() - started)

    def _compatible(self, lease: Lease) -> bool:
        assert self.backend is not None
        kind = lease.attrs.effective_backend
        if kind == self.backend.type or self.backend.takes_foreign_lease(lease):
            return True
        self._warn.warn(("backend", lease.key_name, kind), "peer %s uses backend %s, not "
                        "%s; ignored", describe(lease), kind, self.backend.type)
        return False

    async def poll_peer_counters(self) -> None:
        if self.backend is not None:
            self.peer_counters = await self.backend.peer_counters() or {}

    # -- running -----------------------------------------------------------------------

    async def watch_health(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self.backend is not None and not self.backend.healthy():
                raise Fatal("the data path stopped unexpectedly")

    async def run(self, stop: asyncio.Event) -> None:
        tasks: list[asyncio.Task] = []
        try:
            starter = asyncio.create_task(self.start())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not starter.done():
                starter.cancel()
                await asyncio.gather(starter, return_exceptions=True)
                return
            stopper.cancel()
            starter.result()
            m, b, ipt, cfg = self.manager, self.backend, self.iptables, self.cfg
            assert m is not None and b is not None and ipt is not None and cfg is not None
            assert self.address_watch is not None
            state = StatePublisher(self.state_file(), self.snapshot, self.poll_peer_counters)
            docker = DockerWatcher(self.opts.docker_socket) if self.opts.docker_socket else None
            self.policy_keeper = keeper = PolicyKeeper(
                self.registry, self.opts.etcd_prefix, lambda: m.lease,
                node_labels(self.opts.node_labels),
                containers=lambda: docker.containers.values() if docker is not None else ())
            parts = {
                "watch": m.watch_forever,
                "lease": m.renew_forever,
                "reconcile": b.run,
                "iptables": ipt.keep,
                "state": state.run,
                "config": ConfigWatcher(self.registry, cfg,
                                        getattr(b, "take_config", None)).run,
                "address": self.address_watch.run,
                "policy": keeper.run,
            }
            if docker is not None:
                docker.changed = keeper.poke
                parts["docker"] = docker.run
            tasks = [asyncio.create_task(supervise(run, name, self.task_restarts), name=name)
                     for name, run in parts.items()]
            tasks.append(asyncio.create_task(self.watch_health(), name="health"))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper:
                    t.result()  # re-raise a task's failure
            stopper.cancel()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop the data path and leave the lease in etcd, so a restart keeps the subnet."""
        if self.backend is not None:
            await self.backend.teardown()
        if self.http is not None:
            await self.http.close()
        await self.registry.close()


def subnet_env(cfg: NetworkConfig, lease: Lease, mtu: int, ipmasq: bool) -> SubnetEnv:
    """subnet.env for ``lease``: each enabled family's network and the first address of its
    subnet (flanneld's lines and order; IPv6-only has no IPv4 lines)."""
    v4 = cfg.enable_ipv4 and lease.has_ipv4
    v6 = cfg.enable_ipv6 and lease.ipv6_subnet is not None
    return SubnetEnv(
        network=cfg.network if v4 else None,
        subnet=first_host(lease.subnet) if v4 else None,  # type: ignore[arg-type]
        mtu=mtu,
        ipmasq=ipmasq,
        ipv6_network=cfg.ipv6_network if v6 else None,
        ipv6_subnet=first_host(lease.ipv6_subnet) if v6 else None,  # type: ignore[arg-type]
    )


def _addresses(ext: netlink.ExternalInterface, cfg: NetworkConfig) -> str:
    parts = []
    if cfg.enable_ipv4:
        parts.append(f"address {ext.address}, public address {ext.public_ip}")
    if cfg.enable_ipv6:
        parts.append(f"IPv6 address {ext.address6}, public IPv6 address {ext.public_ipv6}")
    return "; ".join(parts)


PEER_LINES = 10  # a batch with more peer changes than this is summed up in one line


def log_peer_changes(removed: list[Lease], added: list[Lease]) -> None:
    """A line per peer for a few changes, one line for a large batch: a range delete of a
    thousand keys must not write two thousand lines."""
    if len(removed) + len(added) <= PEER_LINES:
        for lease in removed:
            log.info("peer removed: %s (%s)", describe(lease), peer_address(lease))
        for lease in added:
            log.info("peer added: %s via %s", describe(lease), peer_address(lease))
        return

    def some(leases: list[Lease]) -> str:
        named = ", ".join(describe(lease) for lease in leases[:3])
        return f" ({named}{', ...' if len(leases) > 3 else ''})" if leases else ""

    log.info("peers changed in one batch: %d removed%s, %d added%s",
             len(removed), some(removed), len(added), some(added))
