"""The start-up steps that wait or fail: each either returns what the next step needs or
raises Fatal with the one line the operator must act on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pyflannel.backend.base import Backend
from pyflannel.backoff import Backoff
from pyflannel.config import ConfigError, NetworkConfig, parse_config
from pyflannel.daemon.supervise import Fatal
from pyflannel.flags import Options
from pyflannel.host import netlink
from pyflannel.host.netlink import ExternalInterface
from pyflannel.host.nlsession import run_netlink
from pyflannel.host.subnetfile import SubnetFileError, check_writable, previous_subnets
from pyflannel.lease.etcd import EtcdAuthError, EtcdUnavailable
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.model import Lease, LeaseAttrs, config_key
from pyflannel.lease.policy import SubnetPoolExhausted, names_us
from pyflannel.lease.registry import Registry
from pyflannel.logutil import RateLimitedLog
from pyflannel.metrics import HealthServer, Metrics

log = logging.getLogger("pyflannel")


async def check_subnet_file(path: str) -> None:
    """First of all: the subnet file is how the lease reaches Docker; if it cannot be
    written, nothing else may be touched."""
    try:
        await asyncio.to_thread(check_writable, path)
    except SubnetFileError as e:
        raise Fatal(f"-subnet-file: {e}") from None


async def open_health_port(opts: Options, metrics: Metrics,
                           ready: Callable[[], bool]) -> HealthServer | None:
    if not opts.healthz_port:
        return None
    http = HealthServer(opts.healthz_ip, opts.healthz_port, metrics, ready)
    try:
        await http.start()
    except OSError as e:
        raise Fatal(f"cannot listen on {opts.healthz_ip}:{opts.healthz_port} for "
                    f"-healthz-port: {e.strerror}") from None
    return http


async def wait_for_config(registry: Registry, prefix: str,
                          errors: RateLimitedLog) -> NetworkConfig:
    """Read ``<prefix>/config``; wait (saying so once) while it is missing or etcd is
    down; a config that breaks a rule, or refused credentials, are fatal."""
    key = config_key(prefix)
    backoff = Backoff(0.5, 5.0)
    said_missing = False
    while True:
        try:
            raw = await registry.get_config()
        except EtcdUnavailable as e:
            errors.error("etcd", "%s; retrying", e)
            await asyncio.sleep(backoff.next())
            continue
        except EtcdAuthError as e:
            raise Fatal(str(e)) from None
        errors.clear("etcd", f"connected to etcd at {getattr(registry, 'endpoint', '')}")
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


async def find_interface(opts: Options, cfg: NetworkConfig) -> ExternalInterface:
    """The external interface, for the families the config enables."""
    try:
        return await run_netlink(
            netlink.find_external_interface, opts.iface, opts.iface_regex,
            opts.iface_can_reach, opts.public_ip, public_ipv6=opts.public_ipv6,
            want_ipv6=cfg.enable_ipv6, want_ipv4=cfg.enable_ipv4,
        )
    except netlink.InterfaceError as e:
        raise Fatal(str(e)) from None


async def refuse_a_repeated_identity(registry: Registry, backend: Backend,
                                     cfg: NetworkConfig, attrs: LeaseAttrs,
                                     errors: RateLimitedLog) -> None:
    """Before taking a lease: another node's live lease must not publish what is this
    node's alone (a cloned VM's copy of the WireGuard key file), or the two nodes lose
    each other's traffic silently. etcd trouble is waited out, as for the lease."""
    backoff = Backoff(0.5, 5.0)
    while True:
        try:
            listing = await registry.list_leases()
            break
        except EtcdAuthError as e:
            raise Fatal(str(e)) from None
        except EtcdUnavailable as e:
            errors.error("acquire", "cannot list leases: %s", e)
            await asyncio.sleep(backoff.next())
    others = [lease for lease in listing.leases
              if not names_us(cfg, lease, attrs.public_ip, attrs.public_ipv6)]
    conflict = backend.identity_conflict(others)
    if conflict is not None:
        raise Fatal(conflict)


async def acquire_first(manager: LeaseManager, subnet_file: str,
                        errors: RateLimitedLog) -> Lease:
    """The first lease, preferring the subnets of the last run's subnet file; etcd trouble
    is waited out, a full pool or refused credentials are fatal (systemd retries)."""
    previous, previous_ipv6 = previous_subnets(subnet_file)
    backoff = Backoff(0.5, 5.0)
    while True:
        try:
            lease = await manager.acquire(previous, previous_ipv6)
            errors.clear("acquire", "etcd reachable again")
            return lease
        except (SubnetPoolExhausted, EtcdAuthError) as e:
            raise Fatal(str(e)) from None
        except EtcdUnavailable as e:
            errors.error("acquire", "cannot acquire a lease: %s", e)
            await asyncio.sleep(backoff.next())
