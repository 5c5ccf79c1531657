"""The BGP speaker's I/O over asyncio: sockets (with TCP MD5), timers, and the RIB around them.

Nothing is decided here. Bytes become events for :class:`~pyflannel.bgp.fsm.Fsm`, and its
actions are carried out in order: messages written, timers set on the loop, connections opened
or closed, UPDATEs handed to the :class:`~pyflannel.bgp.rib.Rib`. What the RIB says changed
goes to ``on_routes`` (the backend's kernel routes) and, as UPDATEs, to every other session.

A session's trouble stays in that session: a peer sending garbage gets its NOTIFICATION and
its connection closed, and the speaker's other sessions, listeners and the RIB go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from . import errors as E
from .attributes import CodecOptions, Prefix
from .errors import BgpError
from .fsm import (
    AdoptConnection,
    Connect,
    DeliverRouteRefresh,
    DeliverUpdate,
    DropConnection,
    Event,
    Fsm,
    ManualStart,
    ManualStop,
    NotifMsg,
    PeerConfig,
    RejectConnection,
    Send,
    SessionDown,
    SessionUp,
    StartTimer,
    State,
    StateChanged,
    StopTimer,
    SweepStale,
    TcpConnectionConfirmed,
    TcpConnectionFails,
    TcpCRAcked,
    Timer,
    TimerExpired,
    event_for_error,
    receive,
)
from .messages import Notification, Update, encode, end_of_rib, split_stream, withdraw
from .rib import (
    Changes,
    Export,
    ImportPolicy,
    LocalSpeaker,
    PeerInfo,
    Rib,
    family_of,
    out_changes,
    updates_for,
)

log = logging.getLogger("pyflannel.bgp")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
TCP_MD5SIG = 14  # linux/tcp.h
TCP_MD5SIG_MAXKEYLEN = 80
READ_SIZE = 65536

# Hints for `status`: a wrong TCP MD5 password is invisible to BGP. The peer's kernel drops
# our SYNs (or ours drops its), so the session only ever fails to connect.
PASSWORD_HINT = ("no TCP answer from the peer; with a TCP MD5 password set, a password "
                 "mismatch looks exactly like this")


def md5sig(address: Address, key: bytes) -> bytes:
    """``struct tcp_md5sig`` (linux/tcp.h) for ``address``: sockaddr_storage (128 octets),
    flags, prefixlen, keylen, ifindex, key[80]. An empty key deletes the entry."""
    if len(key) > TCP_MD5SIG_MAXKEYLEN:
        raise ValueError(f"a TCP MD5 key is at most {TCP_MD5SIG_MAXKEYLEN} bytes")
    if address.version == 4:
        sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + address.packed
    else:
        sa = (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 0, 0) + address.packed
              + struct.pack("=I", 0))
    return (sa.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, len(key), 0)
            + key.ljust(TCP_MD5SIG_MAXKEYLEN, b"\0"))


def set_md5(sock: socket.socket, address: Address, password: str) -> None:
    """Sign (and require signed) segments to and from ``address`` (RFC 2385); "" removes it."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, md5sig(address, password.encode()))
    except OSError as e:
        if password or e.errno != errno.ENOENT:
            raise


def plain_address(text: str) -> Address:
    """A socket's peer address, with an IPv4-mapped IPv6 address made IPv4 again."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class PeerSpec:
    """One peer as the backend wants it; a change of any field means a new session."""

    address: Address
    asn: int
    port: int = 179
    password: str = field(default="", repr=False)
    kind: str = "configured"  # mesh, reflector, client or configured: for status
    passive: bool = False  # the higher address of a mesh pair only listens
    rr_client: bool = False  # this node reflects routes to it
    keep_next_hop: bool = False  # KeepOriginalNextHop: see rib.Rib._passes_on

    @property
    def key(self) -> str:
        return str(self.address)


@dataclass(frozen=True)
class Timing:
    """The speaker's timers and restart state; every session uses the same."""

    hold_time: int = 90
    keepalive_time: int | None = 30
    graceful_restart_time: int | None = 120
    restarting: bool = False  # this daemon has just restarted (RFC 4724 R bit)
    connect_timeout: float = 5.0  # a SYN without answer (a wrong password) fails this soon
    connect_retry_time: float = 120.0
    idle_hold_first: float = 1.0
    idle_hold_max: float = 60.0


class Connection:
    """One TCP connection and the task reading it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.task: asyncio.Task | None = None

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.writer.close()


class Session:
    """One peer: its FSM, its connection and what it was last sent (its Adj-RIB-Out)."""

    def __init__(self, speaker: Speaker, spec: PeerSpec) -> None:
        self.speaker, self.spec = speaker, spec
        t = speaker.timing
        self.config = PeerConfig(
            local_as=speaker.rib.local.asn, router_id=speaker.rib.local.router_id,
            peer_as=spec.asn, hold_time=t.hold_time, keepalive_time=t.keepalive_time,
            connect_retry_time=t.connect_retry_time, passive=spec.passive,
            graceful_restart_time=t.graceful_restart_time, restarting=t.restarting,
            forwarding_preserved=t.restarting, idle_hold_first=t.idle_hold_first,
            idle_hold_max=t.idle_hold_max)
        self.fsm = Fsm(self.config, jitter=speaker.jitter)
        self.conn: Connection | None = None
        self.pending: Connection | None = None  # the one the last TCP event was about
        self.connecting: asyncio.Task | None = None
        self.timers: dict[Timer, asyncio.TimerHandle] = {}
        self.sent: dict[Prefix, Export] = {}
        self.since = time.monotonic()
        self.connect_error = ""
        self.end_of_rib: set[tuple[int, int]] = set()  # families the peer finished sending
        self.messages_in: Counter = Counter()
        self.messages_out: Counter = Counter()
        self.notifications_in: Counter = Counter()  # "code/subcode"
        self.notifications_out: Counter = Counter()
        self.graceful_restart: Counter = Counter()  # helper-side events, by name

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def options(self) -> CodecOptions:
        n = self.fsm.negotiated
        return n.codec_options if n is not None else CodecOptions()

    @property
    def established(self) -> bool:
        return self.fsm.state is State.ESTABLISHED

    @property
    def synced(self) -> bool:
        """Established, and the peer has sent End-of-RIB for every family negotiated: all
        it had to tell us is in the RIB."""
        n = self.fsm.negotiated
        return self.established and n is not None and set(n.families) <= self.end_of_rib

    # -- events in

    def handle(self, event: Event, implicit_adopt: bool = False) -> None:
        """Feed one event; carry out every action in order. ``implicit_adopt``: our own
        connection (TcpCRAcked) becomes the session's unless the FSM rejects it."""
        actions = self.fsm.handle(event)
        if implicit_adopt and not any(isinstance(a, RejectConnection) for a in actions):
            self._adopt()
        for action in actions:
            self._carry_out(action)

    def start(self) -> None:
        self.handle(ManualStart())

    def stop(self, graceful: bool = False, subcode: int = E.CEASE_ADMIN_SHUTDOWN) -> None:
        self.handle(ManualStop(graceful=graceful, subcode=subcode))
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.pending is not None:
            self.pending.close()
            self.pending = None

    def incoming(self, conn: Connection) -> None:
        """The peer connected to our listener."""
        self.pending = conn
        self.handle(TcpConnectionConfirmed())
        if self.pending is conn:  # neither adopted nor rejected: never leave it open
            conn.close()
            self.pending = None

    async def _connect(self) -> None:
        spec, t = self.spec, self.speaker.timing
        family = socket.AF_INET if spec.address.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        handed_over = False
        try:
            sock.setblocking(False)
            if spec.password:
                set_md5(sock, spec.address, spec.password)
            local = self.speaker.source_for(spec.address)
            if local is not None:
                sock.bind((str(local), 0))
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                sock, (str(spec.address), spec.port)), t.connect_timeout)
            reader, writer = await asyncio.open_connection(sock=sock)
            handed_over = True
        except (OSError, TimeoutError) as e:
            self.connect_error = "timed out" if isinstance(e, TimeoutError) else (
                e.strerror or str(e))
            if self.connecting is asyncio.current_task():
                self.connecting = None
                self.handle(TcpConnectionFails())
            return
        finally:
            if not handed_over:
                sock.close()
        if self.connecting is not asyncio.current_task():
            writer.close()
            return
        self.connecting = None
        self.connect_error = ""
        self.pending = Connection(reader, writer)
        self.handle(TcpCRAcked(), implicit_adopt=True)
        if self.pending is not None and self.pending is not self.conn:
            self.pending.close()
        self.pending = None

    async def _read(self, conn: Connection) -> None:
        buffer = b""
        try:
            while True:
                data = await conn.reader.read(READ_SIZE)
                if not data:
                    break
                buffer += data
                try:
                    messages, buffer = split_stream(buffer)
                except BgpError as error:
                    self._count_in(None)
                    self.handle(event_for_error(error))
                    return
                for raw in messages:
                    if self.conn is not conn:
                        return
                    event = receive(raw, self.options)
                    self._count_in(event)
                    self.handle(event)
        except asyncio.CancelledError:
            raise
        except OSError as e:
            self.connect_error = e.strerror or str(e)
        except Exception:  # a bug must cost this connection, not the speaker
            log.exception("bgp peer %s: error handling its messages", self.key)
        if self.conn is conn:
            self.handle(TcpConnectionFails())

    def _count_in(self, event: Event | None) -> None:
        name = "malformed" if event is None else type(event).__name__
        self.messages_in[name] += 1
        if isinstance(event, NotifMsg):
            m = event.message
            self.notifications_in[f"{m.code}/{m.subcode}"] += 1

    def _timer(self, timer: Timer) -> None:
        self.timers.pop(timer, None)
        self.handle(TimerExpired(timer))

    # -- actions out

    def _carry_out(self, action) -> None:
        if isinstance(action, Send):
            self.send(action.message)
        elif isinstance(action, StartTimer):
            old = self.timers.pop(action.timer, None)
            if old is not None:
                old.cancel()
            # A cancelled handle never runs, even if already due: no late expiries here.
            handle = asyncio.get_running_loop().call_later(action.seconds, self._timer,
                                                           action.timer)
            self.timers[action.timer] = handle
        elif isinstance(action, StopTimer):
            old = self.timers.pop(action.timer, None)
            if old is not None:
                old.cancel()
        elif isinstance(action, Connect):
            if self.connecting is not None:
                self.connecting.cancel()
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
        elif isinstance(action, DropConnection):
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            if self.conn is not None:
                self.conn.close()
                self.conn = None
        elif isinstance(action, AdoptConnection):
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            self._adopt()
        elif isinstance(action, RejectConnection):
            if self.pending is not None and self.pending is not self.conn:
                if action.notification is not None:
                    self.pending.write(encode(action.notification))
                    self._count_out(action.notification)
                self.pending.close()
            self.pending = None
        elif isinstance(action, DeliverUpdate):
            self.speaker.delivered(self, action.message)
        elif isinstance(action, DeliverRouteRefresh):
            self.speaker.refresh(self, (action.afi, action.safi))
        elif isinstance(action, SessionUp):
            self.speaker.session_up(self, action.negotiated)
        elif isinstance(action, SessionDown):
            self.speaker.session_down(self, action.graceful, action.reason)
        elif isinstance(action, SweepStale):
            self.speaker.sweep(self)
        elif isinstance(action, StateChanged):
            self.since = time.monotonic()
            log.info("bgp peer %s (AS %d, %s): %s -> %s (%s)", self.key, self.spec.asn,
                     self.spec.kind, action.old.value, action.new.value, action.reason)

    def _adopt(self) -> None:
        conn, self.pending = self.pending, None
        if conn is None or conn is self.conn:
            return
        if self.conn is not None:
            self.conn.close()
        self.conn = conn
        conn.task = asyncio.get_running_loop().create_task(self._read(conn))

    def send(self, message) -> None:
        if self.conn is None:
            return
        self.conn.write(encode(message, self.options))
        self._count_out(message)

    def _count_out(self, message) -> None:
        self.messages_out[type(message).__name__] += 1
        if isinstance(message, Notification):
            self.notifications_out[f"{message.code}/{message.subcode}"] += 1

    # -- the operator's view

    def status(self) -> dict:
        counters = self.speaker.rib.counters.get(self.key)
        hint = ""
        if self.spec.password and self.fsm.state in (State.IDLE, State.CONNECT, State.ACTIVE) \
                and (self.connect_error == "timed out" or self.spec.passive):
            hint = PASSWORD_HINT
        return {
            "peer": self.key, "asn": self.spec.asn, "kind": self.spec.kind,
            "state": self.fsm.state.value,
            "state_for_s": round(time.monotonic() - self.since, 1),
            "received": counters.received if counters else 0,
            "accepted": len(self.speaker.rib.adj_in.get(self.key, {})),
            "refused": dict(counters.refused) if counters else {},
            "sent": len(self.sent),
            "last_error": self.fsm.last_error + (
                f" ({self.connect_error})" if self.connect_error else ""),
            "hint": hint,
            "password": bool(self.spec.password),
            "messages_in": dict(self.messages_in), "messages_out": dict(self.messages_out),
            "notifications_in": dict(self.notifications_in),
            "notifications_out": dict(self.notifications_out),
            "graceful_restart": dict(self.graceful_restart),
        }


class Speaker:
    """The RIB and one :class:`Session` per peer, the listeners, and the kernel callback.

    ``on_routes(changes)`` is called with what the RIB changed for the kernel; ``rib.routes()``
    is then the whole table to have.
    """

    def __init__(self, local: LocalSpeaker, policy: ImportPolicy, *,
                 on_routes: Callable[[Changes], None] = lambda changes: None,
                 listen: tuple[str, ...] = ("0.0.0.0", "::"), port: int = 179,
                 source: tuple[Address, ...] = (), timing: Timing = Timing(),
                 jitter: Callable[[], float] = random.random) -> None:
        self.rib = Rib(local, policy)
        self.on_routes, self.timing, self.jitter = on_routes, timing, jitter
        self.listen_hosts, self.port, self.source = listen, port, source
        self.sessions: dict[str, Session] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._listen_socks: list[socket.socket] = []
        self.unknown_connections = 0
        self._advertise_pending = False
        self.started = time.monotonic()

    # -- life cycle

    async def start(self) -> None:
        """Listen on the port (IPv4 and, where the host has it, IPv6)."""
        for host in self.listen_hosts:
            addr = ipaddress.ip_address(host)
            family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as e:
                log.warning("bgp: cannot listen on [%s]:%d: %s", host, self.port, e)
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, self.port))
            except OSError as e:
                sock.close()
                if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                    continue  # no IPv6 on this host
                raise
            sock.listen(64)
            sock.setblocking(False)
            self._listen_socks.append(sock)
            self._servers.append(await asyncio.start_server(self._accepted, sock=sock))
        for session in self.sessions.values():
            self._listener_md5(session.spec, session.spec.password)

    async def stop(self, graceful: bool = False) -> None:
        """Close every session: ``graceful`` without NOTIFICATION, so that peers doing graceful
        restart keep our routes while this daemon restarts (RFC 4724, restarting speaker)."""
        for server in self._servers:
            server.close()
        for session in list(self.sessions.values()):
            session.stop(graceful=graceful)
        await asyncio.sleep(0)  # let the transports flush a last NOTIFICATION
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        self._listen_socks.clear()

    def source_for(self, peer: Address) -> Address | None:
        return next((a for a in self.source if a.version == peer.version), None)

    # -- peers

    def add_peer(self, spec: PeerSpec) -> Session:
        """Start a session with ``spec`` (replacing one with the same address if it differs)."""
        old = self.sessions.get(spec.key)
        if old is not None:
            if old.spec == spec:
                return old
            self.remove_peer(spec.key)
        session = self.sessions[spec.key] = Session(self, spec)
        self._listener_md5(spec, spec.password)
        self.rib.add_peer(PeerInfo(spec.key, spec.asn, spec.address, rr_client=spec.rr_client,
                                   keep_next_hop=spec.keep_next_hop))
        session.start()
        return session

    def remove_peer(self, key: str) -> None:
        session = self.sessions.pop(key, None)
        if session is None:
            return
        session.stop(subcode=E.CEASE_PEER_DECONFIGURED)
        if session.spec.password:
            self._listener_md5(session.spec, "")
        self._changed(self.rib.remove_peer(key))

    def _listener_md5(self, spec: PeerSpec, password: str) -> None:
        for sock in self._listen_socks:
            if (sock.family == socket.AF_INET) == (spec.address.version == 4) and (
                    password or spec.password):
                try:
                    set_md5(sock, spec.address, password)
                except OSError as e:
                    log.error("bgp peer %s: cannot set its TCP MD5 password on the listener: "
                              "%s", spec.key, e.strerror or e)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        session = self.sessions.get(str(plain_address(peer[0]))) if peer else None
        if session is None:
            self.unknown_connections += 1
            if self.unknown_connections <= 3 or self.unknown_connections % 1000 == 0:
                log.warning("bgp: connection from %s refused: not a configured peer (%d so far)",
                            peer[0] if peer else "?", self.unknown_connections)
            writer.close()
            return
        session.incoming(Connection(reader, writer))

    # -- our own routes

    def originate(self, prefix: Prefix) -> None:
        self.rib.originate(prefix)
        self.advertise()

    def withdraw_local(self, prefix: Prefix) -> None:
        self.rib.withdraw_local(prefix)
        self.advertise()

    # -- what sessions report

    def delivered(self, session: Session, update: Update) -> None:
        changes = self.rib.apply_update(session.key, update)
        family = update.end_of_rib()
        if family is not None:
            session.end_of_rib.add(family)
            changes.update(self.rib.end_of_rib(session.key, family))
        self._changed(changes)

    def refresh(self, session: Session, family: tuple[int, int]) -> None:
        export = {p: e for p, e in self.rib.export(session.key).items()
                  if family_of(p) == family}
        for update in updates_for(export, session.options):
            session.send(update)
        session.send(end_of_rib(*family))
        session.sent.update(export)

    def session_up(self, session: Session, negotiated) -> None:
        spec = session.spec
        self.rib.add_peer(PeerInfo(spec.key, spec.asn, spec.address,
                                   router_id=negotiated.peer_open.router_id,
                                   rr_client=spec.rr_client,
                                   keep_next_hop=spec.keep_next_hop))
        changes = self.rib.peer_reestablished(spec.key, negotiated.peer_graceful_restart)
        if negotiated.peer_open.capabilities.graceful_restart and \
                negotiated.peer_open.capabilities.graceful_restart.restarting:
            session.graceful_restart["peer_restarted"] += 1
        session.end_of_rib = set()
        export = self._export_for(session)
        for update in updates_for(export, negotiated.codec_options):
            session.send(update)
        for family in negotiated.families:
            session.send(end_of_rib(*family))
        session.sent = export
        self._changed(changes)

    def session_down(self, session: Session, graceful: bool, reason: str) -> None:
        session.sent = {}
        if graceful:
            session.graceful_restart["routes_kept"] += 1
            self.rib.mark_stale(session.key)
            return
        self._changed(self.rib.drop_routes(session.key))

    def sweep(self, session: Session) -> None:
        session.graceful_restart["stale_swept"] += 1
        self._changed(self.rib.sweep_stale(session.key))

    def _changed(self, changes: Changes) -> None:
        """Learned routes changed. Only a reflector passes learned routes on: anybody
        else's Adj-RIBs-Out hold just its own subnets, so there is nothing to send (and a
        mesh of N nodes does not cost N x N exports per UPDATE)."""
        if changes:
            if self.rib.local.cluster_id is not None:
                self._advertise_soon()
            self.on_routes(changes)

    def _advertise_soon(self) -> None:
        """One advertise for a burst of UPDATEs: a reflector hearing from N clients at once
        computes every Adj-RIB-Out once, not N times."""
        if not self._advertise_pending:
            self._advertise_pending = True
            asyncio.get_running_loop().call_soon(self.advertise)

    def advertise(self) -> None:
        """Bring every established peer's Adj-RIB-Out up to date."""
        self._advertise_pending = False
        for session in self.sessions.values():
            if not session.established or session.key not in self.rib.peers:
                continue
            wanted = self._export_for(session)
            changed, gone = out_changes(session.sent, wanted)
            for update in withdraw(gone) + updates_for(changed, session.options):
                session.send(update)
            session.sent = wanted

    def _export_for(self, session: Session) -> dict:
        """The peer's Adj-RIB-Out in the families it negotiated only (RFC 4760): a router
        peering over IPv6 for IPv6 alone is never sent our IPv4 subnet."""
        n = session.fsm.negotiated
        families = n.families if n is not None else ()
        return {p: e for p, e in self.rib.export(session.key).items()
                if family_of(p) in families}

    def synced(self) -> bool:
        """Every established session has sent End-of-RIB for all it negotiated: what is not
        learned by now is not coming back (our own restart sweeps then)."""
        return all(s.synced for s in self.sessions.values() if s.established)

    def status(self) -> list[dict]:
        return [s.status() for s in sorted(self.sessions.values(), key=lambda s: s.key)]


__all__ = ["PASSWORD_HINT", "Connection", "PeerSpec", "Session", "Speaker", "Timing", "md5sig",
           "set_md5"]
