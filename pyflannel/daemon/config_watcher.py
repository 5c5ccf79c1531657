"""Noticing a changed network config without ever half-applying it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pyflannel.backoff import Backoff
from pyflannel.config import ConfigError, NetworkConfig, parse_config
from pyflannel.lease.registry import EtcdAuthError, EtcdUnavailable, Registry

log = logging.getLogger("pyflannel")


class ConfigWatcher:
    """Says once per change that ``<prefix>/config`` changed; the running config stays in
    force until the daemon restarts, so nothing is ever half-reprogrammed. The exception is
    a change the backend says it takes whole while running (``take``: the bgp backend's
    peers)."""

    def __init__(self, registry: Registry, running: NetworkConfig,
                 take: Callable[[NetworkConfig], bool] | None = None) -> None:
        self.registry = registry
        self.running = running
        self.take = take
        self._seen: object = None

    async def run(self) -> None:
        backoff = Backoff(1.0, 10.0)
        while True:
            try:
                self.notice(await self.registry.get_config())  # changes while not watching
                async for raw in self.registry.watch_config():
                    backoff.reset()
                    self.notice(raw)
            except (EtcdUnavailable, EtcdAuthError):
                pass  # the lease tasks report etcd trouble
            await asyncio.sleep(backoff.next())

    def notice(self, raw: bytes | None) -> None:
        if raw is None:
            return
        try:
            cfg = parse_config(raw)
        except ConfigError as e:
            if self._seen != ("invalid", raw):
                log.error("network config changed to an invalid one (%s); keeping %s", e,
                          networks(self.running))
            self._seen = ("invalid", raw)
            return
        if cfg.raw != self.running.raw and self.take is not None and self.take(cfg):
            log.info("network config changed; the %s backend follows it without a restart",
                     cfg.backend_type)
            self.running = cfg
        elif cfg.raw != self.running.raw and self._seen != cfg.raw:
            log.warning("network config changed (network %s -> %s, backend %s -> %s); "
                        "keeping the running one until pyflanneld restarts",
                        networks(self.running), networks(cfg), self.running.backend_type,
                        cfg.backend_type)
        self._seen = cfg.raw


def networks(cfg: NetworkConfig) -> str:
    """The config's networks for a log line: ``10.1.0.0/16 + fc00:10:1::/48`` (IPv6-only:
    just the IPv6 one)."""
    return " + ".join(str(pool.network) for pool in cfg.pools)
