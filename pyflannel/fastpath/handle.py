"""The control plane's side of the fast-path boundary.

The whole interface is: start with the fds, ``configure`` with a peer table, read
``counters``, ``stop``. Messages are newline-delimited JSON on a socketpair.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyflannel.fastpath import counters
from pyflannel.fastpath.forwarder import Forwarder

log = logging.getLogger("pyflannel.fastpath")


@dataclass(frozen=True)
class Route:
    """Where the fast path sends a peer's subnet."""

    subnet: IPv4Network
    public_ip: IPv4Address
    port: int
    vnet1: bool = False  # the peer accepts pyflannel's vnet1 framing


class FastPath:
    """A forwarder in a child process (default) or, for measurement, a thread."""

    def __init__(self, tun_fd: int, sock: socket.socket, mode: str = "process", *,
                 vnet: bool = False, gso: bool = True, gro: bool = True,
                 datagram_size: int = 1472) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"fast path mode {mode!r} is not process or thread")
        self.mode = mode
        self.options = {"vnet": vnet, "gso": gso, "gro": gro, "datagram_size": datagram_size}
        self.tun_fd = tun_fd
        self.sock = sock
        self._ctl, self._child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._mem_fd, self._mem = counters.create_shared()
        self._proc: subprocess.Popen | None = None
        self._replies = b""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.mode == "thread":
            fwd = Forwarder(self.tun_fd, self.sock, self._child_ctl, self._mem, **self.options)
            self._thread = threading.Thread(target=fwd.run, name="fastpath", daemon=True)
            self._thread.start()
            return
        fds = (self.tun_fd, self.sock.fileno(), self._child_ctl.fileno(), self._mem_fd)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pyflannel.fastpath.forwarder",
             "--tun-fd", str(fds[0]), "--udp-fd", str(fds[1]),
             "--ctl-fd", str(fds[2]), "--counters-fd", str(fds[3]),
             "--datagram-size", str(self.options["datagram_size"]),
             *(["--vnet"] if self.options["vnet"] else []),
             *(["--no-gso"] if not self.options["gso"] else []),
             *(["--no-gro"] if not self.options["gro"] else [])],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        self._child_ctl.close()
        log.info("fast path running in process %d", self._proc.pid)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def configure(self, local: IPv4Network, icmp_src: IPv4Address,
                  routes: Iterable[Route]) -> None:
        """Install our subnet and the peer table; ``icmp_src`` signs our ICMP errors."""
        msg = {
            "op": "config",
            "subnet_len": local.prefixlen,
            "local_net": int(local.network_address),
            "icmp_src": int(icmp_src),
            "peers": [[int(r.subnet.network_address), str(r.public_ip), r.port, r.vnet1]
                      for r in routes],
        }
        self._ctl.sendall(json.dumps(msg).encode() + b"\n")

    def counters(self) -> dict[str, int]:
        return counters.read(self._mem)

    def peer_stats(self, timeout: float = 1.0) -> dict[str, dict]:
        """Per-peer counters by public IP (blocking: call it from a worker thread)."""
        self._ctl.sendall(b'{"op":"stats"}\n')
        self._ctl.settimeout(timeout)
        try:
            while b"\n" not in self._replies:
                data = self._ctl.recv(1 << 20)
                if not data:
                    return {}
                self._replies += data
        finally:
            self._ctl.settimeout(None)
        line, _, self._replies = self._replies.partition(b"\n")
        names = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "last_rx_age_s",
                 "rx_dropped")
        return {ip: dict(zip(names, values, strict=True))
                for ip, values in json.loads(line)["stats"].items()}

    def stop(self, timeout: float = 1.5) -> None:
        with contextlib.suppress(OSError):
            self._ctl.sendall(b'{"op":"stop"}\n')
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout)
        self._ctl.close()
        os.close(self._mem_fd)
