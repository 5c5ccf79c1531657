"""The control plane's side of the fast-path boundary.

The whole interface is: start with the fds, ``configure`` with a peer table, read
``counters``, ``stop``. Messages are newline-delimited JSON on a socketpair.

The event loop configures while a worker thread asks for per-peer stats, so every request
holds one lock for its whole exchange, and carries an id that its reply echoes: a reply
that arrives after its caller gave up is recognised and dropped by the next caller instead
of being taken for its own.

Each table is numbered (its generation) when its snapshot is taken, and the fast path
confirms the generation it applied, naming the rows it refused. A table older than one
already sent is never sent (two tasks hand snapshots to two threads, which may run in
either order), and :attr:`FastPath.behind` says whether the newest table is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyflannel.fastpath import counters
from pyflannel.fastpath.forwarder import Forwarder
from pyflannel.fastpath.transport import Transport

log = logging.getLogger("pyflannel.fastpath")

SEND_TIMEOUT_S = 5.0  # a forwarder that reads nothing for this long is stuck or gone


@dataclass(frozen=True)
class Route:
    """Where the fast path sends a peer's subnet."""

    subnet: IPv4Network | IPv6Network  # a peer's subnet of either family
    public_ip: IPv4Address | IPv6Address  # on the underlay: IPv4, or IPv6 in IPv6-only
    port: int
    vnet1: bool = False  # the peer accepts pyflannel's vnet1 framing


@dataclass(frozen=True)
class Installed:
    """What the fast path confirmed: the table it applied, and the rows it left out as
    (index in the table sent, why)."""

    generation: int
    refused: tuple[tuple[int, str], ...] = ()


class InstallError(RuntimeError):
    """The fast path did not confirm a table: no answer in time, an error, or gone. The
    table it had stays in force."""


@dataclass(frozen=True)
class WgRoute:
    """A WireGuard peer as the fast path needs it: key, allowed subnets, endpoint."""

    public_key: str  # base64, as in the lease
    subnets: tuple[str, ...]
    public_ip: IPv4Address | IPv6Address
    port: int


class FastPath:
    """A forwarder in a child process (default) or, for measurement, a thread.

    ``framing`` "udp" (flannel's and vnet1) or "wireguard"; the WireGuard forwarder reads
    the node's private key from ``wg_key_file`` itself, so the secret never crosses a
    command line or the control socket.
    """

    def __init__(self, tun_fd: int, sock: socket.socket, mode: str = "process", *,
                 vnet: bool = False, gso: bool = True, gro: bool = True,
                 datagram_size: int = 1472, framing: str = "udp", vnet1: bool = True,
                 coalesce: bool = True,
                 wg_key_file: str | None = None, wg_mtu: int = 1420,
                 wg_public_key: str | None = None, gre_key: int | None = None,
                 gre_checksum: bool = False) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"fast path mode {mode!r} is not process or thread")
        if framing not in ("udp", "wireguard", "gre", "ipip"):
            raise ValueError(f"fast path framing {framing!r} is not udp, wireguard, gre "
                             "or ipip")
        self.gre_key, self.gre_checksum = gre_key, gre_checksum  # framing "gre" only
        self.mode = mode
        self.framing = framing
        self.wg_key_file = wg_key_file
        self.wg_mtu = wg_mtu
        self.wg_public_key = wg_public_key
        self.options = {"vnet": vnet, "gso": gso, "gro": gro, "datagram_size": datagram_size}
        if framing == "udp":
            self.options.update(vnet1=vnet1, coalesce=coalesce)
        self.tun_fd = tun_fd
        self.sock = sock
        self._ctl, self._child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._mem_fd, self._mem = counters.create_shared()
        self._proc: subprocess.Popen | None = None
        self._ctl.settimeout(SEND_TIMEOUT_S)
        self._replies = b""
        self._thread: threading.Thread | None = None
        self.forwarder: Transport | None = None  # thread mode only: for tests and debugging
        self._lock = threading.Lock()  # one request (and its reply) at a time
        self._ids = itertools.count(1)
        self._cut = False  # a send was cut short: the forwarder holds half a line
        self._generations = itertools.count(1)
        self._gen_lock = threading.Lock()
        self.desired = 0  # the newest table's generation
        self.applied = 0  # the newest generation the fast path confirmed
        self._sent = 0  # the newest generation sent (under the lock)
        self.reply_timeout = SEND_TIMEOUT_S  # for a table's confirmation

    def start(self) -> None:
        if self.mode == "thread":
            if self.framing == "wireguard":
                from pyflannel.fastpath.wg import WgForwarder
                from pyflannel.wireguard.keys import key_file_path, read_key_file

                fwd: Transport = WgForwarder(
                    self.tun_fd, self.sock, self._child_ctl, self._mem,
                    private_key=read_key_file(self.wg_key_file or key_file_path()),
                    mtu=self.wg_mtu, **self.options)
            elif self.framing in ("gre", "ipip"):
                from pyflannel.fastpath.rawip import IPPROTO_GRE, IPPROTO_IPIP, RawIpForwarder

                fwd = RawIpForwarder(
                    self.tun_fd, self.sock, self._child_ctl, self._mem,
                    protocol=IPPROTO_GRE if self.framing == "gre" else IPPROTO_IPIP,
                    key=self.gre_key, csum=self.gre_checksum, **self.options)
            else:
                fwd = Forwarder(self.tun_fd, self.sock, self._child_ctl, self._mem,
                                **self.options)
            self.forwarder = fwd
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
             *(["--no-gro"] if not self.options["gro"] else []),
             *(["--no-vnet1"] if not self.options.get("vnet1", True) else []),
             *(["--no-coalesce"] if not self.options.get("coalesce", True) else []),
             *(["--framing", "wireguard", "--wg-mtu", str(self.wg_mtu)]
               + (["--wg-key-file", self.wg_key_file] if self.wg_key_file else [])
               + (["--wg-public-key", self.wg_public_key] if self.wg_public_key else [])
               if self.framing == "wireguard" else []),
             *(["--framing", self.framing]
               + (["--gre-key", str(self.gre_key)] if self.gre_key is not None else [])
               + (["--gre-checksum"] if self.gre_checksum else [])
               if self.framing in ("gre", "ipip") else [])],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        self._child_ctl.close()
        log.info("fast path running in process %d", self._proc.pid)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    # -- installing tables ---------------------------------------------------------------

    def next_generation(self) -> int:
        """Number a new table (call it where its snapshot is taken): it becomes the one
        the fast path must confirm."""
        with self._gen_lock:
            generation = next(self._generations)
            self.desired = max(self.desired, generation)
            return generation

    @property
    def behind(self) -> bool:
        """The newest table is not confirmed yet (in flight, lost, or refused)."""
        return self.applied < self.desired

    def _install(self, msg: dict, generation: int | None,
                 timeout: float | None) -> Installed | None:
        """Send one table and wait (``timeout``, else :attr:`reply_timeout`) for its
        confirmation; None when a newer table went first (it carries this one's changes).
        Raises InstallError."""
        timeout = self.reply_timeout if timeout is None else timeout
        if generation is None:
            generation = self.next_generation()
        msg["generation"] = generation
        with self._lock:
            if generation <= self._sent:
                return None
            self._sent = generation
            try:
                reply = self._request(msg, timeout)
            except TimeoutError:
                raise InstallError(f"no answer within {timeout:g}s") from None
            except (OSError, EOFError) as e:
                raise InstallError(f"no answer: {e or type(e).__name__}") from None
        if "error" in reply or reply.get("applied") != generation:
            raise InstallError(f"refused: {reply.get('error') or 'another table applied'}")
        refused = tuple((int(i), str(why)) for i, why in reply.get("refused") or ())
        with self._gen_lock:
            self.applied = max(self.applied, generation)
        return Installed(generation, refused)

    def configure(self, local: IPv4Network | None, icmp_src: IPv4Address | None,
                  routes: Iterable[Route], local6: IPv6Network | None = None,
                  icmp_src6: IPv6Address | None = None, *, generation: int | None = None,
                  timeout: float | None = None) -> Installed | None:
        """Install our subnets and the peer table, one per family; ``icmp_src`` and
        ``icmp_src6`` sign our ICMP errors. A family the network lacks is None.

        Returns what the fast path confirmed (refused rows are indexed IPv4 rows first,
        then IPv6, as :meth:`route_rows` orders them), None for a table older than one
        already sent; raises InstallError when it is not confirmed. Blocking (up to the
        send timeout while a stats request holds the socket, then up to ``timeout`` or
        :attr:`reply_timeout` for the answer): from the event loop use
        :meth:`configure_async`.
        """
        routes = self.route_rows(routes)
        msg = {
            "op": "config",
            "subnet_len": local.prefixlen if local is not None else 32,
            "local_net": int(local.network_address) if local is not None else None,
            "icmp_src": int(icmp_src) if icmp_src is not None else 0,
            "peers": [[int(r.subnet.network_address), str(r.public_ip), r.port, r.vnet1]
                      for r in routes if r.subnet.version == 4],
            "subnet6_len": local6.prefixlen if local6 is not None else 128,
            "local_net6": int(local6.network_address) if local6 is not None else None,
            "icmp_src6": int(icmp_src6) if icmp_src6 is not None else None,
            "peers6": [[int(r.subnet.network_address), str(r.public_ip), r.port, r.vnet1]
                       for r in routes if r.subnet.version == 6],
        }
        return self._install(msg, generation, timeout)

    @staticmethod
    def route_rows(routes: Iterable[Route]) -> list[Route]:
        """The routes in the order the table's rows are sent: IPv4, then IPv6."""
        routes = list(routes)
        return ([r for r in routes if r.subnet.version == 4]
                + [r for r in routes if r.subnet.version == 6])

    async def configure_async(self, local: IPv4Network | None, icmp_src: IPv4Address | None,
                              routes: Iterable[Route], local6: IPv6Network | None = None,
                              icmp_src6: IPv6Address | None = None) -> Installed | None:
        """:meth:`configure` in a worker thread, so the loop never waits for the lock; the
        table is numbered here, where its snapshot is taken."""
        return await asyncio.to_thread(
            partial(self.configure, local, icmp_src, list(routes), local6, icmp_src6,
                    generation=self.next_generation()))

    def configure_wg(self, local: IPv4Network | IPv6Network,
                     icmp_src: IPv4Address | IPv6Address,
                     peers: Iterable[WgRoute], psk: str | None = None,
                     keepalive: float = 0.0, icmp_src6: IPv6Address | None = None, *,
                     generation: int | None = None,
                     timeout: float | None = None) -> Installed | None:
        """Install our subnet and the WireGuard peer table (blocking, and answered, like
        configure; refused rows are indexed in ``peers``' order).

        ``psk`` travels on the private socketpair only, and is never logged.
        ``icmp_src6`` signs ICMPv6 errors where the device carries IPv6.
        """
        msg = {
            "op": "config",
            "family": local.version,
            "subnet_len": local.prefixlen,
            "local_net": int(local.network_address),
            "icmp_src": int(icmp_src),
            "icmp_src6": int(icmp_src6) if icmp_src6 is not None else None,
            "psk": psk,
            "keepalive": keepalive,
            "peers": [[p.public_key, list(p.subnets), str(p.public_ip), p.port]
                      for p in peers],
        }
        return self._install(msg, generation, timeout)

    async def configure_wg_async(self, local: IPv4Network | IPv6Network,
                                 icmp_src: IPv4Address | IPv6Address,
                                 peers: Iterable[WgRoute], psk: str | None = None,
                                 keepalive: float = 0.0,
                                 icmp_src6: IPv6Address | None = None) -> Installed | None:
        """:meth:`configure_wg` in a worker thread, numbered here like configure_async."""
        return await asyncio.to_thread(
            partial(self.configure_wg, local, icmp_src, list(peers), psk, keepalive,
                    icmp_src6, generation=self.next_generation()))

    # -- requests ------------------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        """Send one request line; the caller holds the lock."""
        if self._cut:  # end the half line the forwarder holds, so it skips just that
            line = b"\n" + line
        try:
            self._ctl.sendall(line)
        except BaseException:
            self._cut = True
            raise
        self._cut = False

    def counters(self) -> dict[str, int]:
        return counters.read(self._mem)

    def peer_stats(self, timeout: float = 1.0) -> dict[str, dict]:
        """Per-peer counters by public IP (blocking: call it from a worker thread).

        Raises TimeoutError when the forwarder does not answer within ``timeout``; its late
        reply is then discarded by the next call (by id), never returned to it.
        """
        with self._lock:
            try:
                reply = self._request({"op": "stats"}, timeout)
            except EOFError:
                return {}
        stats = reply.get("stats")
        if not isinstance(stats, dict):
            raise ValueError("fast path answered stats without them")
        names = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "last_rx_age_s",
                 "rx_dropped")
        return {ip: values if isinstance(values, dict) else dict(zip(names, values, strict=True))
                for ip, values in stats.items()}

    def _request(self, msg: dict, timeout: float) -> dict:
        """Send ``msg`` with a new id and return the reply that echoes it; the caller holds
        the lock. Raises TimeoutError after ``timeout``, EOFError when the fast path is
        gone."""
        deadline = time.monotonic() + timeout
        rid = msg["id"] = next(self._ids)
        self._send(json.dumps(msg).encode() + b"\n")
        try:
            while True:
                reply = self._take_reply(rid)
                if reply is not None:
                    return reply
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fast path did not answer {msg['op']} within "
                                       f"{timeout}s")
                self._ctl.settimeout(left)
                data = self._ctl.recv(1 << 20)
                if not data:
                    raise EOFError("fast path closed its control socket")
                self._replies += data
        finally:
            self._ctl.settimeout(SEND_TIMEOUT_S)

    def _take_reply(self, rid: int) -> dict | None:
        """Reply ``rid`` if it is buffered; replies to earlier (timed-out) requests and
        lines that are not replies are dropped on the way."""
        while b"\n" in self._replies:
            line, _, self._replies = self._replies.partition(b"\n")
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("id") == rid:
                return doc
            log.debug("dropped a stale fast-path reply (id %s)",
                      doc.get("id") if isinstance(doc, dict) else None)
        return None

    def stop(self, timeout: float = 1.5) -> None:
        """Stop the fast path. A request in flight ends within its own timeout; if it
        still holds the socket after ``timeout``, its line is never cut into: shutting
        the socket down ends it, and the fast path, seeing the end of its control
        stream, stops all the same."""
        if self._lock.acquire(timeout=timeout):
            try:
                with contextlib.suppress(OSError):
                    self._send(b'{"op":"stop"}\n')
            finally:
                self._lock.release()
        else:
            with contextlib.suppress(OSError):
                self._ctl.shutdown(socket.SHUT_RDWR)
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout)
        closing = self._lock.acquire(timeout=timeout)  # the caller in flight has let go
        self._ctl.close()
        if closing:
            self._lock.release()
        os.close(self._mem_fd)
