"""One snapshot of the node's state, read by the metrics and written to the state file."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyflannel.host.subnetfile import write_json_atomic
from pyflannel.logutil import RateLimitedLog

log = logging.getLogger("pyflannel")

STATE_EVERY_S = 2.0


@dataclass(frozen=True)
class NodeSnapshot:
    backend: str = ""
    subnet: str = ""  # "" while no lease is held (and in IPv6-only mode)
    ipv6_subnet: str = ""  # "" while no lease is held, or without IPv6
    peers: int = 0  # in the data path
    peers_ignored: dict[str, str] = field(default_factory=dict)  # left out: key name -> why
    data_path_behind: bool = False  # the newest peer table is not confirmed by the data path
    refused_rows: int = 0  # rows of the last tables the fast path left out
    lease_expiry: float = 0.0  # 0: no lease, +inf: reserved
    renewals: int = 0
    etcd_errors: int = 0
    ready: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    peer_counters: dict[str, dict] = field(default_factory=dict)
    task_restarts: dict[str, int] = field(default_factory=dict)
    bgp: list[dict] = field(default_factory=list)  # the bgp backend's sessions
    policy: dict = field(default_factory=dict)  # the policy keeper's status() ({}: none yet)

    def for_metrics(self) -> dict[str, Any]:
        return asdict(self)

    def for_state_file(self) -> dict[str, Any]:
        """What ``pyflannel status`` reads (its format predates the snapshot)."""
        return {
            "pid": os.getpid(), "time": time.time(), "backend": self.backend or None,
            "subnet": self.subnet or None, "ipv6_subnet": self.ipv6_subnet or None,
            "lease_expiry": self.lease_expiry if self.subnet or self.ipv6_subnet else None,
            "ready": self.ready, "counters": self.counters, "peers": self.peer_counters,
            "ignored": self.peers_ignored, "bgp": self.bgp, "policy": self.policy,
        }


class StatePublisher:
    """Every 2 s: refresh the per-peer counters and rewrite the state file."""

    def __init__(self, path: Path, snapshot, poll_peer_counters) -> None:
        self.path = path
        self.snapshot = snapshot
        self.poll_peer_counters = poll_peer_counters
        self._errors = RateLimitedLog(log)

    async def run(self) -> None:
        while True:
            try:
                await self.poll_peer_counters()
            except (OSError, ValueError) as e:
                self._errors.error("stats", "cannot read per-peer counters: %s", e)
            doc = self.snapshot().for_state_file()
            try:
                await asyncio.to_thread(write_json_atomic, self.path, doc)
            except OSError as e:
                self._errors.error("state", "cannot write %s: %s", self.path, e)
            await asyncio.sleep(STATE_EVERY_S)

