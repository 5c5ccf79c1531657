"""The RFC 4271 section 8 state machine, pure: events in, actions out; no I/O, no clock.

The session layer owns the socket and the timers. It feeds every happening in as an event
(``fsm.handle(TimerExpired(Timer.HOLD))``) and carries out the actions returned, in order:
send a message, start or stop a timer, open or drop a connection, deliver an UPDATE. That keeps
every protocol decision here, testable with a fake clock and a fake transport.

Where this differs from the RFC, on purpose:

* No DelayOpen and no per-connection FSMs. One FSM per peer holds at most one connection.
  Connection collisions (RFC 4271 6.8) are simplified because in the mesh only the node with
  the lower address connects: a second connection in OpenSent is refused with Cease/7; in
  OpenConfirm the BGP identifiers decide as 6.8 says (the connection initiated by the higher
  identifier stays); in Established it is refused, unless the peer does graceful restart, when
  RFC 4724 says the new connection replaces the old session.
* After any failure the FSM rests in Idle for a jittered, exponentially growing time (the
  IdleHoldTimer of RFC 4271 8.1.1's DampPeerOscillations) and then starts again by itself, where
  the RFC would go to Active and wait for the ConnectRetryTimer. The delay starts over once a
  session reaches Established.
* A passive FSM (``PeerConfig.passive``: the higher address of a mesh pair) never connects.
* A NOTIFICATION received in OpenSent closes the session without answering it (the RFC would
  send an FSM error back; a NOTIFICATION is never answered elsewhere either).

Graceful restart, helper side: when a session with a peer that sent the capability ends without
a NOTIFICATION, ``SessionDown(graceful=True)`` tells the RIB to mark its routes stale and the
RestartTimer runs for the peer's restart time; once the peer is back the StalePathTimer bounds
the wait for its End-of-RIB. Either running out gives ``SweepStale``. ``ManualStop(graceful=True)``
is the restarting side: close without NOTIFICATION so that the peers keep our routes.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from . import errors as E
from .attributes import IPV4_UNICAST, IPV6_UNICAST, CodecOptions
from .errors import BgpError
from .messages import (
    BGP_VERSION,
    Capabilities,
    GracefulRestart,
    GracefulRestartFamily,
    Keepalive,
    Message,
    Notification,
    Open,
    RouteRefresh,
    Update,
    decode,
)

LARGE_HOLD_TIME = 240  # RFC 4271 8.2.2: the hold timer while waiting for the peer's OPEN
ZERO_ID = ipaddress.IPv4Address(0)


class State(enum.Enum):
    IDLE = "Idle"
    CONNECT = "Connect"
    ACTIVE = "Active"
    OPENSENT = "OpenSent"
    OPENCONFIRM = "OpenConfirm"
    ESTABLISHED = "Established"


class Timer(enum.Enum):
    CONNECT_RETRY = "ConnectRetryTimer"
    HOLD = "HoldTimer"
    KEEPALIVE = "KeepaliveTimer"
    IDLE_HOLD = "IdleHoldTimer"
    # Graceful restart, helper side (RFC 4724 4.2): how long a restarting peer's routes are
    # kept while its session is down, and after it is back while waiting for End-of-RIB.
    RESTART = "RestartTimer"
    STALE = "StalePathTimer"


# The graceful-restart timers outlive a session: they are about the routes, not the connection.
_ROUTE_TIMERS = frozenset({Timer.RESTART, Timer.STALE})


# --- configuration and what was negotiated ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer as the backend configured it; nothing here changes while the FSM runs."""

    local_as: int
    router_id: ipaddress.IPv4Address
    peer_as: int
    hold_time: int = 90
    keepalive_time: int | None = None  # None: a third of the negotiated hold time
    connect_retry_time: float = 120.0
    passive: bool = False  # only accept connections: the higher address of a mesh pair
    families: tuple[tuple[int, int], ...] = (IPV4_UNICAST, IPV6_UNICAST)
    graceful_restart_time: int | None = 120  # None: no graceful restart capability
    restarting: bool = False  # R bit: we restarted and the peers should keep our routes
    forwarding_preserved: bool = False  # our kernel routes survived the restart
    idle_hold_first: float = 1.0
    idle_hold_max: float = 120.0
    stale_time: float = 360.0  # after a graceful restart, the longest wait for End-of-RIB

    @property
    def ibgp(self) -> bool:
        return self.local_as == self.peer_as

    def open_message(self) -> Open:
        """The OPEN we send: 4-octet AS, route refresh, MP for our families, graceful restart."""
        gr = None
        if self.graceful_restart_time is not None:
            gr = GracefulRestart(self.graceful_restart_time, self.restarting, False, tuple(
                GracefulRestartFamily(afi, safi, self.forwarding_preserved)
                for afi, safi in self.families))
        return Open(self.local_as, self.hold_time, self.router_id, Capabilities(
            multiprotocol=self.families, route_refresh=True, four_octet_as=True,
            graceful_restart=gr))


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What both OPENs agreed on; fixed for the life of one session."""

    peer_open: Open
    hold_time: int  # 0: no keepalives and no hold timer
    keepalive_time: int
    four_octet_as: bool
    ibgp: bool
    families: tuple[tuple[int, int], ...]
    route_refresh: bool

    @property
    def peer_graceful_restart(self) -> GracefulRestart | None:
        return self.peer_open.capabilities.graceful_restart

    @property
    def codec_options(self) -> CodecOptions:
        return CodecOptions(four_octet_as=self.four_octet_as, ibgp=self.ibgp)


def negotiate(config: PeerConfig, peer: Open) -> Negotiated:
    hold = min(config.hold_time, peer.hold_time)
    keepalive = hold // 3
    if config.keepalive_time is not None:
        keepalive = min(config.keepalive_time, keepalive)
    caps = peer.capabilities
    # A peer without any multiprotocol capability speaks IPv4 unicast only (RFC 4760 8).
    offered = caps.multiprotocol or (IPV4_UNICAST,)
    return Negotiated(
        peer, hold, max(keepalive, 1) if hold else 0, caps.four_octet_as, config.ibgp,
        tuple(f for f in config.families if f in offered), caps.route_refresh)


def check_open(config: PeerConfig, peer: Open) -> BgpError | None:
    """RFC 4271 6.2 checks on the peer's OPEN; the error says which NOTIFICATION to send."""
    if peer.version != BGP_VERSION:
        return BgpError(E.OPEN_MESSAGE_ERROR, E.UNSUPPORTED_VERSION, b"\x00\x04",
                        reason=f"peer speaks BGP version {peer.version}")
    if peer.asn != config.peer_as:
        return BgpError(E.OPEN_MESSAGE_ERROR, E.BAD_PEER_AS,
                        reason=f"peer says AS {peer.asn}, configured {config.peer_as}")
    if peer.router_id == ZERO_ID or (config.ibgp and peer.router_id == config.router_id):
        return BgpError(E.OPEN_MESSAGE_ERROR, E.BAD_BGP_IDENTIFIER,
                        reason=f"peer BGP identifier {peer.router_id} is not usable")
    if peer.hold_time in (1, 2):
        return BgpError(E.OPEN_MESSAGE_ERROR, E.UNACCEPTABLE_HOLD_TIME,
                        reason=f"peer hold time {peer.hold_time} s (must be 0 or 3 or more)")
    return None


def keep_connection_initiated_by_us(local_id: ipaddress.IPv4Address,
                                    remote_id: ipaddress.IPv4Address) -> bool:
    """RFC 4271 6.8: of two colliding connections, the one the higher identifier opened stays."""
    return int(local_id) > int(remote_id)


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManualStart:
    pass


@dataclass(frozen=True, slots=True)
class ManualStop:
    """Stop the session; ``graceful`` closes without NOTIFICATION so that a peer doing graceful
    restart keeps our routes while this daemon restarts (RFC 4724, restarting speaker)."""

    graceful: bool = False
    subcode: int = E.CEASE_ADMIN_SHUTDOWN


@dataclass(frozen=True, slots=True)
class TimerExpired:
    timer: Timer


@dataclass(frozen=True, slots=True)
class TcpCRAcked:
    """Our outgoing connection is up (RFC event 16)."""


@dataclass(frozen=True, slots=True)
class TcpConnectionConfirmed:
    """A peer connected to us (RFC event 17); the FSM answers Adopt- or RejectConnection."""


@dataclass(frozen=True, slots=True)
class TcpConnectionFails:
    pass


@dataclass(frozen=True, slots=True)
class BGPOpen:
    message: Open


@dataclass(frozen=True, slots=True)
class KeepAliveMsg:
    pass


@dataclass(frozen=True, slots=True)
class UpdateMsg:
    message: Update


@dataclass(frozen=True, slots=True)
class RouteRefreshMsg:
    message: RouteRefresh


@dataclass(frozen=True, slots=True)
class NotifMsg:
    message: Notification


@dataclass(frozen=True, slots=True)
class BGPHeaderErr:
    error: BgpError


@dataclass(frozen=True, slots=True)
class BGPOpenMsgErr:
    error: BgpError


@dataclass(frozen=True, slots=True)
class UpdateMsgErr:
    error: BgpError


Event = (ManualStart | ManualStop | TimerExpired | TcpCRAcked | TcpConnectionConfirmed
         | TcpConnectionFails | BGPOpen | KeepAliveMsg | UpdateMsg | RouteRefreshMsg | NotifMsg
         | BGPHeaderErr | BGPOpenMsgErr | UpdateMsgErr)


def event_for_error(error: BgpError) -> Event:
    if error.code == E.MESSAGE_HEADER_ERROR:
        return BGPHeaderErr(error)
    if error.code == E.OPEN_MESSAGE_ERROR:
        return BGPOpenMsgErr(error)
    return UpdateMsgErr(error)


def event_for_message(message: Message) -> Event:
    if isinstance(message, Open):
        return BGPOpen(message)
    if isinstance(message, Update):
        return UpdateMsg(message)
    if isinstance(message, Notification):
        return NotifMsg(message)
    if isinstance(message, RouteRefresh):
        return RouteRefreshMsg(message)
    return KeepAliveMsg()


def receive(data: bytes, options: CodecOptions) -> Event:
    """The event for one whole message from the wire: decoded, or the error it carries."""
    try:
        return event_for_message(decode(data, options))
    except BgpError as error:
        return event_for_error(error)


# --- actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Start, or restart if running, ``timer`` to fire ``TimerExpired`` after ``seconds``."""

    timer: Timer
    seconds: float


@dataclass(frozen=True, slots=True)
class StopTimer:
    timer: Timer


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a TCP connection to the peer; report TcpCRAcked or TcpConnectionFails."""


@dataclass(frozen=True, slots=True)
class DropConnection:
    """Close the session's connection and give up any outgoing attempt, if there is one."""


@dataclass(frozen=True, slots=True)
class AdoptConnection:
    """The connection the last TcpConnectionConfirmed reported becomes the session's; an
    outgoing attempt still in progress is abandoned."""


@dataclass(frozen=True, slots=True)
class RejectConnection:
    """Close the connection the last TcpConnectionConfirmed or TcpCRAcked reported, after
    sending it ``notification`` (if any); the session's own connection is untouched."""

    notification: Notification | None = None


@dataclass(frozen=True, slots=True)
class DeliverUpdate:
    message: Update


@dataclass(frozen=True, slots=True)
class DeliverRouteRefresh:
    """The peer asks us to send it that family again (RFC 2918)."""

    afi: int
    safi: int


@dataclass(frozen=True, slots=True)
class SessionUp:
    negotiated: Negotiated


@dataclass(frozen=True, slots=True)
class SessionDown:
    """An Established session ended; ``graceful`` means keep its routes as stale (RFC 4724):
    the peer does graceful restart and no NOTIFICATION went either way."""

    graceful: bool
    reason: str


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: State
    new: State
    reason: str


@dataclass(frozen=True, slots=True)
class SweepStale:
    """The peer's routes still marked stale must go now: its restart time, or the wait for
    its End-of-RIB, ran out (RFC 4724 4.2)."""


Action = (SweepStale | Send | StartTimer | StopTimer | Connect | DropConnection | AdoptConnection
          | RejectConnection | DeliverUpdate | DeliverRouteRefresh | SessionUp | SessionDown
          | StateChanged)

_UNEXPECTED = {State.OPENSENT: E.FSM_UNEXPECTED_IN_OPENSENT,
               State.OPENCONFIRM: E.FSM_UNEXPECTED_IN_OPENCONFIRM,
               State.ESTABLISHED: E.FSM_UNEXPECTED_IN_ESTABLISHED}


# --- the machine -----------------------------------------------------------------------


@dataclass
class Fsm:
    """One peer's session state. ``handle(event)`` returns the actions to carry out, in order.

    One method per state of RFC 4271 8.2.2, reacting to these events (any other is ignored in
    Idle, ends the attempt in Connect/Active, and is an FSM error NOTIFICATION after that;
    ManualStart outside Idle changes nothing):

    * Idle: ManualStart or the IdleHoldTimer starts; ManualStop; connections are rejected.
    * Connect, Active (alike here): ManualStop; ConnectRetryTimer; TcpCRAcked and
      TcpConnectionConfirmed send our OPEN; TcpConnectionFails.
    * OpenSent, OpenConfirm, Established share ``_common``: ManualStop, HoldTimer,
      TcpConnectionFails, NotifMsg, header and OPEN errors, TcpCRAcked (a collision).
      Then OpenSent: BGPOpen, TcpConnectionConfirmed (a collision);
      OpenConfirm: KeepaliveTimer, KeepAliveMsg, TcpConnectionConfirmed (6.8 collision);
      Established: KeepaliveTimer, KeepAliveMsg, UpdateMsg, RouteRefreshMsg, UpdateMsgErr,
      TcpConnectionConfirmed (a graceful restart, else a collision).

    ``jitter`` returns a number in [0, 1); timers that RFC 4271 10 says to jitter run for
    0.75..1.0 of their length by it. Tests inject a fixed one.
    """

    config: PeerConfig
    jitter: Callable[[], float] = random.random
    state: State = State.IDLE
    negotiated: Negotiated | None = None
    connect_retry_counter: int = 0
    last_error: str = ""
    _started: bool = False
    _outgoing: bool = False  # the session's connection is the one we opened
    _running: set[Timer] = field(default_factory=set)
    _out: list[Action] = field(default_factory=list)

    @property
    def running_timers(self) -> frozenset[Timer]:
        return frozenset(self._running)

    def handle(self, event: Event) -> list[Action]:
        self._out = []
        if isinstance(event, TimerExpired):
            if event.timer not in self._running:
                return []  # stopped while its expiry was on its way: nothing to do
            self._running.discard(event.timer)
            if event.timer in _ROUTE_TIMERS:
                return [SweepStale()]
        if isinstance(event, ManualStop):
            self._stop(*_ROUTE_TIMERS)  # stopped by hand: the routes go with the session
        handler = getattr(self, f"_in_{self.state.name.lower()}")
        handler(event)
        out, self._out = self._out, []
        return out

    # -- helpers

    def _emit(self, *actions: Action) -> None:
        self._out.extend(actions)

    def _start(self, timer: Timer, seconds: float, jittered: bool = False) -> None:
        if jittered:
            seconds *= 0.75 + 0.25 * min(max(self.jitter(), 0.0), 1.0)
        self._running.add(timer)
        self._emit(StartTimer(timer, seconds))

    def _stop(self, *timers: Timer) -> None:
        for timer in timers:
            if timer in self._running:
                self._running.discard(timer)
                self._emit(StopTimer(timer))

    def _goto(self, new: State, reason: str) -> None:
        old, self.state = self.state, new
        if old is not new:
            self._emit(StateChanged(old, new, reason))

    def _begin(self) -> None:
        """Leave Idle: connect, or (passive) wait for the peer to connect."""
        if self.config.passive:
            self._goto(State.ACTIVE, "waiting for the peer to connect")
        else:
            self._connect("connecting")

    def _connect(self, reason: str) -> None:
        self._start(Timer.CONNECT_RETRY, self.config.connect_retry_time, jittered=True)
        self._emit(Connect())
        self._goto(State.CONNECT, reason)

    def _stopped_by_hand(self) -> None:
        """ManualStop: no restart after the idle hold time, and the backoff starts over."""
        self._started = False
        self.connect_retry_counter = 0

    def _reject_collision(self) -> None:
        """Refuse the connection just reported: the session already has one (RFC 4271 6.8)."""
        self._emit(RejectConnection(Notification(E.CEASE, E.CEASE_CONNECTION_COLLISION)))

    def _send_open(self, reason: str) -> None:
        self._stop(Timer.CONNECT_RETRY)
        self._emit(Send(self.config.open_message()))
        self._start(Timer.HOLD, LARGE_HOLD_TIME)
        self._goto(State.OPENSENT, reason)

    def _to_idle(self, reason: str, send: Notification | None = None, restart: bool = True,
                 graceful: bool = False) -> None:
        """Close everything; unless stopped by hand, start again after the idle hold time."""
        if send is not None:
            self._emit(Send(send))
        if self.state is not State.IDLE:
            self._emit(DropConnection())
        self._stop(*(self._running - _ROUTE_TIMERS))
        if self.state is State.ESTABLISHED:
            peer_gr = self.negotiated.peer_graceful_restart if self.negotiated else None
            kept = peer_gr is not None and graceful
            self._emit(SessionDown(kept, reason))
            if kept and self._started:
                self._stop(Timer.STALE)
                self._start(Timer.RESTART, peer_gr.restart_time)
            else:
                self._stop(*_ROUTE_TIMERS)
        self.negotiated = None
        self.last_error = reason
        if restart and self._started:
            self.connect_retry_counter += 1
            delay = min(self.config.idle_hold_first * 2 ** (self.connect_retry_counter - 1),
                        self.config.idle_hold_max)
            self._start(Timer.IDLE_HOLD, delay, jittered=True)
        self._goto(State.IDLE, reason)

    def _notify_and_idle(self, error: BgpError) -> None:
        self._to_idle(f"sent NOTIFICATION: {error.reason} ({error.code}/{error.subcode})",
                      Notification.of(error))

    def _unexpected(self, event: Event) -> None:
        error = BgpError(E.FSM_ERROR, _UNEXPECTED[self.state],
                         reason=f"unexpected {type(event).__name__} in {self.state.value}")
        self._notify_and_idle(error)

    def _common(self, event: Event) -> bool:
        """Events handled alike in OpenSent, OpenConfirm and Established; True if handled."""
        if isinstance(event, ManualStop):
            self._stopped_by_hand()  # before _to_idle: no restart, no restart timer
            if event.graceful:
                self._to_idle("stopped for a graceful restart", restart=False, graceful=True)
            else:
                self._to_idle("stopped", Notification(E.CEASE, event.subcode), restart=False)
        elif isinstance(event, TimerExpired) and event.timer is Timer.HOLD:
            self._notify_and_idle(BgpError(E.HOLD_TIMER_EXPIRED, 0, reason="hold timer expired"))
        elif isinstance(event, TcpConnectionFails):
            self._to_idle("connection closed by the peer", graceful=True)
        elif isinstance(event, NotifMsg):
            self._to_idle(f"peer sent NOTIFICATION: {event.message.describe()}")
        elif isinstance(event, BGPHeaderErr | BGPOpenMsgErr):
            self._notify_and_idle(event.error)
        elif isinstance(event, TcpCRAcked):
            self._reject_collision()
        elif isinstance(event, ManualStart):
            pass
        else:
            return False
        return True

    # -- one method per state

    def _in_idle(self, event: Event) -> None:
        if isinstance(event, ManualStart) or (
                isinstance(event, TimerExpired) and event.timer is Timer.IDLE_HOLD):
            self._started = True
            self._begin()
        elif isinstance(event, ManualStop):
            self._stopped_by_hand()
            self._stop(Timer.IDLE_HOLD)
        elif isinstance(event, TcpConnectionConfirmed | TcpCRAcked):
            self._emit(RejectConnection(Notification(E.CEASE, E.CEASE_CONNECTION_REJECTED)))

    def _in_connect(self, event: Event) -> None:
        self._connect_or_active(event)

    def _in_active(self, event: Event) -> None:
        self._connect_or_active(event)

    def _connect_or_active(self, event: Event) -> None:
        if isinstance(event, ManualStart):
            return
        if isinstance(event, ManualStop):
            self._stopped_by_hand()
            self._to_idle("stopped", restart=False)
        elif isinstance(event, TimerExpired) and event.timer is Timer.CONNECT_RETRY:
            self._emit(DropConnection())
            self._connect("connect retry")
        elif isinstance(event, TcpCRAcked):
            self._outgoing = True
            self._send_open("connected")
        elif isinstance(event, TcpConnectionConfirmed):
            self._outgoing = False
            self._emit(AdoptConnection())
            self._send_open("peer connected")
        elif isinstance(event, TcpConnectionFails):
            self._to_idle("connection failed")
        else:
            self._to_idle(f"unexpected {type(event).__name__} in {self.state.value}")

    def _in_opensent(self, event: Event) -> None:
        if self._common(event):
            return
        if isinstance(event, TcpConnectionConfirmed):
            self._reject_collision()
        elif isinstance(event, BGPOpen):
            error = check_open(self.config, event.message)
            if error is not None:
                return self._notify_and_idle(error)
            self.negotiated = n = negotiate(self.config, event.message)
            self._emit(Send(Keepalive()))
            if n.hold_time:
                self._start(Timer.HOLD, n.hold_time)
                self._start(Timer.KEEPALIVE, n.keepalive_time, jittered=True)
            else:
                self._stop(Timer.HOLD)
            self._goto(State.OPENCONFIRM, "OPEN received")
        else:
            self._unexpected(event)
        return None

    def _keepalive_timer(self) -> None:
        self._emit(Send(Keepalive()))
        assert self.negotiated is not None
        self._start(Timer.KEEPALIVE, self.negotiated.keepalive_time, jittered=True)

    def _restart_hold(self) -> None:
        if self.negotiated is not None and self.negotiated.hold_time:
            self._start(Timer.HOLD, self.negotiated.hold_time)

    def _in_openconfirm(self, event: Event) -> None:
        if self._common(event):
            return
        if isinstance(event, TimerExpired) and event.timer is Timer.KEEPALIVE:
            self._keepalive_timer()
        elif isinstance(event, KeepAliveMsg):
            assert self.negotiated is not None
            self._restart_hold()
            self.connect_retry_counter = 0
            self._goto(State.ESTABLISHED, "session established")
            self._emit(SessionUp(self.negotiated))
            if Timer.RESTART in self._running:  # the peer is back: now wait for End-of-RIB
                self._stop(Timer.RESTART)
                self._start(Timer.STALE, self.config.stale_time)
        elif isinstance(event, TcpConnectionConfirmed):
            assert self.negotiated is not None
            peer_id = self.negotiated.peer_open.router_id
            if self._outgoing and not keep_connection_initiated_by_us(self.config.router_id,
                                                                      peer_id):
                self._emit(Send(Notification(E.CEASE, E.CEASE_CONNECTION_COLLISION)),
                           DropConnection(), AdoptConnection())
                self._stop(*(self._running - _ROUTE_TIMERS))
                self.negotiated = None
                self._outgoing = False
                self._send_open("connection collision: the peer's connection stays")
            else:
                self._reject_collision()
        else:
            self._unexpected(event)

    def _in_established(self, event: Event) -> None:
        if self._common(event):
            return
        n = self.negotiated
        assert n is not None
        if isinstance(event, TimerExpired) and event.timer is Timer.KEEPALIVE:
            self._keepalive_timer()
        elif isinstance(event, KeepAliveMsg):
            self._restart_hold()
        elif isinstance(event, UpdateMsg):
            self._restart_hold()
            self._emit(DeliverUpdate(event.message))
        elif isinstance(event, RouteRefreshMsg):
            self._restart_hold()
            rr = event.message
            if (rr.afi, rr.safi) in n.families:  # RFC 2918: others are ignored
                self._emit(DeliverRouteRefresh(rr.afi, rr.safi))
        elif isinstance(event, UpdateMsgErr):
            self._notify_and_idle(event.error)
        elif isinstance(event, TcpConnectionConfirmed):
            if n.peer_graceful_restart is None:
                self._reject_collision()
                return
            # RFC 4724 4.2: a new connection from a restarting peer ends the old session.
            self._to_idle("peer reconnected (graceful restart)", restart=False, graceful=True)
            self._emit(AdoptConnection())
            self._outgoing = False
            self._send_open("peer connected again")
        else:
            self._unexpected(event)
