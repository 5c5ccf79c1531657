"""pyflanneld: the per-node control plane, wiring config, leases, backend and hand-off.

Order matters and is flanneld's: find the interface, read and validate the network config
(before any device is touched), prepare the backend, take a lease, program the data path,
write the subnet file, then tell systemd we are ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from ipaddress import IPv4Interface
from pathlib import Path

from pyflannel import __version__
from pyflannel.backend import Backend, BackendError, make_backend
from pyflannel.config import ConfigError, NetworkConfig, parse_config
from pyflannel.flags import Options
from pyflannel.host import netlink, systemd
from pyflannel.host.iptables import Iptables, IptablesError, RuleSet
from pyflannel.host.subnetfile import (
    SubnetEnv,
    previous_subnet,
    write_json_atomic,
    write_subnet_file,
)
from pyflannel.host.tun import TunError
from pyflannel.lease.etcd import (
    EtcdAuthError,
    EtcdTlsError,
    EtcdUnavailable,
    registry_for,
)
from pyflannel.lease.manager import Backoff, LeaseManager
from pyflannel.lease.model import Lease, config_key
from pyflannel.lease.policy import LEASE_TTL_S, PeerDiff, SubnetPoolExhausted
from pyflannel.logutil import RateLimitedLog
from pyflannel.metrics import HealthServer, Metrics

log = logging.getLogger("pyflannel")


class Fatal(Exception):
    """An error the operator must fix; the daemon exits non-zero with this one line."""


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.registry = registry_for(opts)
        self.errors = RateLimitedLog(log)
        self.backend: Backend | None = None
        self.manager: LeaseManager | None = None
        self.cfg: NetworkConfig | None = None
        self.ready = asyncio.Event()
        self._ignored_backends: set[str] = set()
        self.metrics = Metrics(self.state)
        self.http: HealthServer | None = None
        self.iptables = Iptables()
        self._iptables_ok = False
        self.peer_counters: dict[str, dict] | None = None

    def is_ready(self) -> bool:
        """Ready while we hold a lease and the data path it needs is running."""
        m, b = self.manager, self.backend
        return (self.ready.is_set() and m is not None and m.lease is not None
                and not m.lease_is_lost() and b is not None and b.healthy())

    def state(self) -> dict:
        """A snapshot for the metrics collector."""
        m, b = self.manager, self.backend
        lease = m.lease if m is not None else None
        return {
            "backend": b.type if b is not None else "",
            "subnet": str(lease.subnet) if lease is not None else "",
            "peers": len(m.peers) if m is not None else 0,
            "lease_expiry": m.expires_at if m is not None else 0.0,
            "renewals": m.renewals if m is not None else 0,
            "etcd_errors": self.registry.errors,
            "ready": self.is_ready(),
            "counters": b.counters() if b is not None else {},
            "peer_counters": self.peer_counters or {},
        }

    # -- start-up ----------------------------------------------------------------------

    async def wait_for_config(self) -> NetworkConfig:
        """Read ``<prefix>/config``; wait (saying so once) while it is missing or etcd is
        down; a config that breaks a rule is fatal."""
        key = config_key(self.opts.etcd_prefix)
        backoff = Backoff(0.5, 5.0)
        said_missing = False
        while True:
            try:
                raw = await self.registry.get_config()
            except EtcdUnavailable as e:
                self.errors.error("etcd", "%s; retrying", e)
                await asyncio.sleep(backoff.next())
                continue
            except EtcdAuthError as e:
                raise Fatal(str(e)) from None
            self.errors.clear("etcd", f"connected to etcd at {self.registry.endpoint}")
            if raw is None:
                if not said_missing:
                    log.warning("network config %s not found in etcd; waiting for it", key)
                    said_missing = True
                await asyncio.sleep(backoff.next())
                continue
            try:
                return parse_config(raw)
            except ConfigError as e:
                raise Fatal(f"{e} (key {key})") from None

    async def acquire(self) -> Lease:
        assert self.manager is not None
        previous = previous_subnet(self.opts.subnet_file)
        backoff = Backoff(0.5, 5.0)
        while True:
            try:
                lease = await self.manager.acquire(previous)
                self.errors.clear("acquire", "etcd reachable again")
                return lease
            except SubnetPoolExhausted as e:
                raise Fatal(str(e)) from None
            except EtcdUnavailable as e:
                self.errors.error("acquire", "cannot acquire a lease: %s", e)
                await asyncio.sleep(backoff.next())

    async def start(self) -> None:
        opts = self.opts
        if opts.healthz_port:
            self.http = HealthServer(opts.healthz_ip, opts.healthz_port, self.metrics,
                                     self.is_ready)
            try:
                await self.http.start()
            except OSError as e:
                raise Fatal(f"cannot listen on {opts.healthz_ip}:{opts.healthz_port} for "
                            f"-healthz-port: {e.strerror}") from None
        try:
            ext = await asyncio.to_thread(
                netlink.find_external_interface, opts.iface, opts.iface_regex,
                opts.iface_can_reach, opts.public_ip,
            )
        except netlink.InterfaceError as e:
            raise Fatal(str(e)) from None
        log.info("using interface %s (address %s, public address %s, mtu %d)",
                 ext.name, ext.address, ext.public_ip, ext.mtu)
        self.cfg = cfg = await self.wait_for_config()
        log.info("network %s, subnets /%d from %s to %s, backend %s", cfg.network,
                 cfg.subnet_len, cfg.subnet_min, cfg.subnet_max, cfg.backend_type)
        try:
            self.backend = make_backend(cfg, ext, opts.udp_framing)
            attrs = await self.backend.prepare()
        except (BackendError, TunError) as e:
            raise Fatal(str(e)) from None
        self.manager = LeaseManager(
            self.registry, cfg, attrs,
            renew_margin_s=opts.subnet_lease_renew_margin * 60, ttl_s=lease_ttl(),
            on_peers=self.on_peers, on_lease=self.on_lease,
        )
        self.backend.publish = self.manager.republish
        await self.remove_disabled_iptables()
        lease = await self.acquire()
        await self.on_lease(lease)
        await self.initial_peers()
        self.ready.set()
        systemd.notify("READY=1")
        log.info("ready: subnet %s, mtu %d", lease.subnet, self.backend.mtu)

    async def initial_peers(self) -> None:
        """Program the peers we know before claiming readiness (best effort)."""
        assert self.manager is not None
        try:
            await self.manager.resync()
        except EtcdUnavailable as e:
            self.errors.error("watch", "cannot list peers yet: %s", e)

    # -- callbacks from the lease manager ----------------------------------------------

    async def on_lease(self, lease: Lease) -> None:
        assert self.backend is not None and self.cfg is not None
        await self.backend.activate(lease)
        env = SubnetEnv(
            network=self.cfg.network,
            subnet=IPv4Interface(f"{lease.subnet.network_address + 1}/{lease.subnet.prefixlen}"),
            mtu=self.backend.mtu,
            ipmasq=self.opts.ip_masq,
        )
        await self.ensure_iptables(lease)
        write_subnet_file(self.opts.subnet_file, env)
        log.info("wrote %s (FLANNEL_SUBNET=%s)", self.opts.subnet_file, env.subnet)

    # -- iptables ----------------------------------------------------------------------

    def rule_set(self, lease: Lease) -> RuleSet:
        assert self.cfg is not None
        return RuleSet(self.cfg.network, lease.subnet, masq=self.opts.ip_masq,
                       forward=self.opts.iptables_forward_rules, random_fully=True)

    async def ensure_iptables(self, lease: Lease) -> None:
        """Masquerade and forward rules for this lease; fatal at first only for -ip-masq."""
        rules = self.rule_set(lease)
        if not rules.tables():
            return
        try:
            restored = await asyncio.to_thread(self.iptables.ensure, rules)
        except IptablesError as e:
            if self.opts.ip_masq and not self._iptables_ok:
                raise Fatal(f"-ip-masq: cannot install iptables rules: {e}") from None
            self.errors.error("iptables", "iptables rules: %s", e)
            return
        if restored:
            log.info("iptables rules %s", "restored" if self._iptables_ok else "installed")
        self._iptables_ok = True
        self.errors.clear("iptables", "iptables rules in place again")

    async def remove_disabled_iptables(self) -> None:
        """Rules an earlier run installed that the flags now turn off (e.g. -ip-masq)."""
        nat, fwd = not self.opts.ip_masq, not self.opts.iptables_forward_rules
        if nat or fwd:
            try:
                await asyncio.to_thread(self.iptables.remove, nat=nat, filter=fwd)
            except IptablesError as e:
                log.warning("cannot check for old iptables rules: %s", e)

    async def keep_iptables(self) -> None:
        """Put back any rule someone removed, every -iptables-resync seconds."""
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            if self.manager is not None and self.manager.lease is not None:
                await self.ensure_iptables(self.manager.lease)

    async def on_peers(self, diff: PeerDiff) -> None:
        assert self.backend is not None
        started = time.monotonic()
        for lease in diff.removed:
            if self._compatible(lease):
                await self.backend.remove_peer(lease)
                log.info("peer removed: %s (%s)", lease.subnet, lease.attrs.public_ip)
        for lease in diff.added:
            if self._compatible(lease):
                await self.backend.add_peer(lease)
                log.info("peer added: %s via %s", lease.subnet, lease.attrs.public_ip)
        await self.backend.commit()
        self.metrics.programming.observe(time.monotonic() - started)

    def _compatible(self, lease: Lease) -> bool:
        assert self.backend is not None
        kind = lease.attrs.effective_backend
        if kind == self.backend.type:
            return True
        if str(lease.subnet) not in self._ignored_backends:
            self._ignored_backends.add(str(lease.subnet))
            log.warning("peer %s uses backend %s, not %s; ignored", lease.subnet, kind,
                        self.backend.type)
        return False

    # -- running -----------------------------------------------------------------------

    def state_file(self) -> Path:
        """Where ``pyflannel status`` finds this daemon's view of its peers."""
        return Path(self.opts.subnet_file).with_name("pyflannel-state.json")

    async def publish_state(self) -> None:
        """Every 2 s: per-peer counters for the metrics, and a state file for status."""
        path = self.state_file()
        while True:
            if self.backend is not None:
                try:
                    self.peer_counters = await self.backend.peer_counters()
                except (OSError, ValueError) as e:
                    self.errors.error("stats", "cannot read per-peer counters: %s", e)
            m = self.manager
            doc = {
                "pid": os.getpid(), "time": time.time(),
                "backend": self.backend.type if self.backend else None,
                "subnet": str(m.lease.subnet) if m and m.lease else None,
                "lease_expiry": m.expires_at if m and m.lease else None,
                "ready": self.is_ready(),
                "counters": self.backend.counters() if self.backend else {},
                "peers": self.peer_counters,
            }
            try:
                write_json_atomic(path, doc)
            except OSError as e:
                self.errors.error("state", "cannot write %s: %s", path, e)
            await asyncio.sleep(2)

    async def watch_config(self) -> None:
        """Notice a changed network config and say so, once per change; the running config
        stays in force until the daemon restarts, so nothing is ever half-reprogrammed."""
        backoff = Backoff(1.0, 10.0)
        seen: object = None
        while True:
            try:
                raw = await self.registry.get_config()  # what changed while not watching
                seen = self._config_changed(raw, seen)
                async for raw in self.registry.watch_config():
                    backoff.reset()
                    seen = self._config_changed(raw, seen)
            except (EtcdUnavailable, EtcdAuthError):
                pass  # the lease tasks report etcd trouble
            await asyncio.sleep(backoff.next())

    def _config_changed(self, raw: bytes | None, seen: object) -> object:
        assert self.cfg is not None
        if raw is None:
            return seen
        try:
            cfg = parse_config(raw)
        except ConfigError as e:
            if seen != ("invalid", raw):
                log.error("network config changed to an invalid one (%s); keeping %s", e,
                          self.cfg.network)
            return ("invalid", raw)
        if cfg.raw != self.cfg.raw and seen != cfg.raw:
            log.warning("network config changed (network %s -> %s, backend %s -> %s); "
                        "keeping the running one until pyflanneld restarts", self.cfg.network,
                        cfg.network, self.cfg.backend_type, cfg.backend_type)
        return cfg.raw

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
            assert self.manager is not None and self.backend is not None
            tasks = [
                asyncio.create_task(supervise(self.manager.watch_forever, "watch")),
                asyncio.create_task(supervise(self.manager.renew_forever, "renew")),
                asyncio.create_task(self.watch_health(), name="health"),
                asyncio.create_task(supervise(self.backend.run, "reconcile")),
                asyncio.create_task(supervise(self.keep_iptables, "iptables")),
                asyncio.create_task(supervise(self.publish_state, "state")),
                asyncio.create_task(supervise(self.watch_config, "config")),
            ]
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


async def supervise(run, name: str) -> None:
    """Keep a control-plane task alive: an unexpected error is logged (with its traceback,
    it is a bug) and the task restarted after a pause; the data path never notices."""
    backoff = Backoff(1.0, 30.0)
    while True:
        try:
            await run()
            return
        except (asyncio.CancelledError, Fatal):
            raise
        except Exception:  # noqa: BLE001 - the point is to survive our own bugs
            log.exception("task %s failed; restarting it", name)
            await asyncio.sleep(backoff.next())


TEST_TTL_ENV = "PYFLANNEL_TEST_LEASE_TTL"


def lease_ttl() -> int:
    """24 h as flanneld, unless a test shortens it through ``PYFLANNEL_TEST_LEASE_TTL``
    (seconds; for tests of expiry only, never for production)."""
    raw = os.environ.get(TEST_TTL_ENV, "")
    if raw.isdigit() and int(raw) >= 2:
        log.warning("%s=%s: lease TTL shortened for testing", TEST_TTL_ENV, raw)
        return int(raw)
    return LEASE_TTL_S


async def _amain(opts: Options) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        daemon = Daemon(opts)
    except EtcdTlsError as e:
        log.error("%s", e)
        return 1
    try:
        await daemon.run(stop)
    except Fatal as e:
        log.error("%s", e)
        return 1
    log.info("stopped; lease kept for restart")
    return 0


def run(opts: Options) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit status."""
    import uvloop

    log.info("pyflanneld %s starting", __version__)
    return uvloop.run(_amain(opts))
