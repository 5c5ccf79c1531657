"""The BGP state machine as a specification, run against a fake clock and a fake transport.

``Rig`` carries out the FSM's actions the way the session layer will: timers on a fake clock,
messages encoded and decoded by the real codec, connections as flags. No sockets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.bgp import errors as E
from pyflannel.bgp.errors import BgpError
from pyflannel.bgp.fsm import (
    AdoptConnection,
    BGPHeaderErr,
    BGPOpen,
    BGPOpenMsgErr,
    Connect,
    DeliverRouteRefresh,
    DeliverUpdate,
    DropConnection,
    Fsm,
    KeepAliveMsg,
    ManualStart,
    ManualStop,
    NotifMsg,
    PeerConfig,
    RejectConnection,
    RouteRefreshMsg,
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
    UpdateMsg,
    UpdateMsgErr,
    check_open,
    event_for_error,
    keep_connection_initiated_by_us,
    receive,
)
from pyflannel.bgp.messages import (
    Capabilities,
    GracefulRestart,
    Keepalive,
    Notification,
    Open,
    RouteRefresh,
    Update,
    encode,
    split_stream,
)

ME = ipaddress.IPv4Address("198.18.0.1")
PEER = ipaddress.IPv4Address("198.18.0.2")


def config(**kw) -> PeerConfig:
    return PeerConfig(**{"local_as": 64512, "router_id": ME, "peer_as": 64512, **kw})


def peer_open(asn: int = 64512, hold: int = 90, rid=PEER, gr: bool = True, **caps) -> Open:
    return Open(asn, hold, rid, Capabilities(
        multiprotocol=((1, 1), (2, 1)), route_refresh=True, four_octet_as=True,
        graceful_restart=GracefulRestart(120) if gr else None, **caps))


@dataclass
class Rig:
    """The session layer, faked: a clock, timers, a connection flag and what went out."""

    fsm: Fsm
    now: float = 0.0
    timers: dict = field(default_factory=dict)
    sent: list = field(default_factory=list)
    connected: bool = False
    connects: int = 0
    rejected: list = field(default_factory=list)
    delivered: list = field(default_factory=list)
    states: list = field(default_factory=list)
    downs: list = field(default_factory=list)
    ups: list = field(default_factory=list)

    def feed(self, event) -> list:
        if isinstance(event, TimerExpired):
            self.timers.pop(event.timer, None)  # a timer that fires is no longer pending
        actions = self.fsm.handle(event)
        for action in actions:
            if isinstance(action, Send):
                encode(action.message)  # everything the FSM sends must be encodable
                self.sent.append(action.message)
            elif isinstance(action, StartTimer):
                self.timers[action.timer] = self.now + action.seconds
            elif isinstance(action, StopTimer):
                self.timers.pop(action.timer)
            elif isinstance(action, Connect):
                self.connects += 1
            elif isinstance(action, DropConnection):
                self.connected = False
            elif isinstance(action, AdoptConnection):
                self.connected = True
            elif isinstance(action, RejectConnection):
                self.rejected.append(action.notification)
            elif isinstance(action, DeliverUpdate | DeliverRouteRefresh):
                self.delivered.append(action)
            elif isinstance(action, StateChanged):
                self.states.append(action.new)
            elif isinstance(action, SessionDown):
                self.downs.append(action)
            elif isinstance(action, SessionUp):
                self.ups.append(action)
        return actions

    def advance(self, seconds: float) -> None:
        """Move the clock on, firing each timer that comes due, earliest first."""
        end = self.now + seconds
        while True:
            due = [(t, timer) for timer, t in self.timers.items() if t <= end]
            if not due:
                break
            t, timer = min(due, key=lambda d: d[0])
            self.now = t
            del self.timers[timer]
            self.feed(TimerExpired(timer))
        self.now = end

    def notifications(self) -> list[tuple[int, int]]:
        return [(m.code, m.subcode) for m in self.sent if isinstance(m, Notification)]

    def establish(self, open_msg: Open | None = None) -> None:
        self.feed(ManualStart())
        self.feed(TcpCRAcked())
        self.connected = True
        self.feed(BGPOpen(open_msg or peer_open()))
        self.feed(KeepAliveMsg())
        assert self.fsm.state is State.ESTABLISHED


def _opts():
    from pyflannel.bgp.attributes import CodecOptions
    return CodecOptions()


def rig(**kw) -> Rig:
    return Rig(Fsm(config(**kw), jitter=lambda: 0.0))


# --- the happy path ---------------------------------------------------------------------------


def test_connecting_side_reaches_established():
    r = rig()
    r.feed(ManualStart())
    assert r.fsm.state is State.CONNECT and r.connects == 1
    assert r.timers[Timer.CONNECT_RETRY] == 90.0  # 120 s jittered by 0.75
    r.feed(TcpCRAcked())
    assert r.fsm.state is State.OPENSENT
    assert isinstance(r.sent[0], Open) and Timer.CONNECT_RETRY not in r.timers
    assert r.sent[0].capabilities.four_octet_as and r.sent[0].capabilities.route_refresh
    assert r.timers[Timer.HOLD] == 240  # the large hold time until the OPEN comes
    r.feed(BGPOpen(peer_open(hold=30)))
    assert r.fsm.state is State.OPENCONFIRM and isinstance(r.sent[-1], Keepalive)
    assert r.timers[Timer.HOLD] == 30  # min(90, 30)
    assert r.timers[Timer.KEEPALIVE] == 10 * 0.75  # a third, jittered
    r.feed(KeepAliveMsg())
    assert r.fsm.state is State.ESTABLISHED
    assert r.states == [State.CONNECT, State.OPENSENT, State.OPENCONFIRM, State.ESTABLISHED]
    n = r.ups[0].negotiated
    assert (n.hold_time, n.keepalive_time, n.four_octet_as, n.families) == (
        30, 10, True, ((1, 1), (2, 1)))


def test_passive_side_waits_and_adopts_the_peers_connection():
    r = rig(passive=True)
    r.feed(ManualStart())
    assert r.fsm.state is State.ACTIVE and r.connects == 0 and not r.timers
    actions = r.feed(TcpConnectionConfirmed())
    assert isinstance(actions[0], AdoptConnection) and r.fsm.state is State.OPENSENT
    r.feed(BGPOpen(peer_open()))
    r.feed(KeepAliveMsg())
    assert r.fsm.state is State.ESTABLISHED
    r.advance(90)  # the peer sends no keepalives: its hold time runs out
    assert r.fsm.state is State.IDLE and r.notifications() == [(4, 0)]
    r.advance(0.75)  # and after the (jittered) idle hold time it listens again by itself
    assert r.fsm.state is State.ACTIVE and r.connects == 0


def test_two_machines_talking_through_the_codec_both_establish():
    a = Rig(Fsm(config(router_id=ME), jitter=lambda: 0.5))
    b = Rig(Fsm(config(router_id=PEER, passive=True), jitter=lambda: 0.5))
    a.feed(ManualStart())
    b.feed(ManualStart())
    a.feed(TcpCRAcked())
    b.feed(TcpConnectionConfirmed())
    for _ in range(4):  # deliver what each sent to the other, through the wire format
        for src, dst in ((a, b), (b, a)):
            pending, src.sent = src.sent, []
            for msg in pending:
                opts = dst.fsm.negotiated.codec_options if dst.fsm.negotiated else _opts()
                dst.feed(receive(encode(msg), opts))
    assert a.fsm.state is b.fsm.state is State.ESTABLISHED
    # Keepalives keep both up for an hour of fake time.
    for _ in range(3600):
        a.advance(1)
        b.advance(1)
        for src, dst in ((a, b), (b, a)):
            pending, src.sent = src.sent, []
            for msg in pending:
                dst.feed(receive(encode(msg), dst.fsm.negotiated.codec_options))
    assert a.fsm.state is b.fsm.state is State.ESTABLISHED


def test_established_delivers_updates_and_route_refresh_and_restarts_the_hold_timer():
    r = rig()
    r.establish()
    r.advance(60)
    r.feed(UpdateMsg(Update()))
    assert r.timers[Timer.HOLD] == r.now + 90
    r.feed(RouteRefreshMsg(RouteRefresh(2, 1)))
    r.feed(RouteRefreshMsg(RouteRefresh(1, 128)))  # a family never negotiated: ignored
    assert r.delivered == [DeliverUpdate(Update()), DeliverRouteRefresh(2, 1)]
    r.advance(89)
    assert r.fsm.state is State.ESTABLISHED


def test_hold_time_zero_means_no_keepalives_and_no_hold_timer():
    r = rig()
    r.establish(peer_open(hold=0))
    assert not r.timers
    r.advance(100_000)
    assert r.fsm.state is State.ESTABLISHED and not any(isinstance(m, Keepalive)
                                                         for m in r.sent[2:])


def test_configured_keepalive_time_is_used_when_shorter():
    r = rig(keepalive_time=5)
    r.establish()
    assert r.ups[0].negotiated.keepalive_time == 5


# --- errors and the NOTIFICATION each sends --------------------------------------------------


def opensent(**kw) -> Rig:
    r = rig(**kw)
    r.feed(ManualStart())
    r.feed(TcpCRAcked())
    return r


def test_open_checks_send_the_right_notification():
    cases = [
        (peer_open(asn=64513), (2, 2)),  # not the configured AS
        (peer_open(rid=ipaddress.IPv4Address(0)), (2, 3)),
        (peer_open(rid=ME), (2, 3)),  # iBGP peer with our identifier
        (peer_open(hold=2), (2, 6)),
        (peer_open(hold=1), (2, 6)),
    ]
    for message, expected in cases:
        r = opensent()
        r.feed(BGPOpen(message))
        assert r.notifications() == [expected], message
        assert r.fsm.state is State.IDLE and not r.connected
        assert Timer.IDLE_HOLD in r.timers


def test_ebgp_peer_may_share_our_identifier_and_4_octet_as_is_checked():
    r = opensent(peer_as=4200000001)
    r.feed(BGPOpen(peer_open(asn=4200000001, rid=ME)))
    assert r.fsm.state is State.OPENCONFIRM
    # Without the 4-octet capability its My AS is AS_TRANS, not the configured AS.
    two_octet = Open(23456, 90, PEER, Capabilities())
    assert check_open(config(peer_as=4200000001), two_octet).subcode == E.BAD_PEER_AS
    assert check_open(config(), Open(64512, 90, PEER, version=3)).subcode == 1


def test_hold_timer_expiry_sends_4_0_in_each_state_that_has_one():
    for states in (0, 1, 2):
        r = opensent()
        if states >= 1:
            r.feed(BGPOpen(peer_open(hold=9)))
        if states >= 2:
            r.feed(KeepAliveMsg())
        r.advance(240 if states == 0 else 9)
        assert r.notifications() == [(4, 0)]
        assert r.fsm.state is State.IDLE


def test_established_session_hold_expiry_is_not_graceful():
    r = rig()
    r.establish()
    r.advance(91)
    assert r.notifications() == [(4, 0)]
    assert r.downs == [SessionDown(False, "sent NOTIFICATION: hold timer expired (4/0)")]


def test_unexpected_messages_are_fsm_errors_with_rfc6608_subcodes():
    r = opensent()
    r.feed(KeepAliveMsg())
    assert r.notifications() == [(5, 1)]
    r = opensent()
    r.feed(BGPOpen(peer_open()))
    r.feed(UpdateMsg(Update()))
    assert r.notifications() == [(5, 2)]
    r = rig()
    r.establish()
    r.feed(BGPOpen(peer_open()))
    assert r.notifications() == [(5, 3)]


def test_message_errors_send_their_own_notification():
    for event, expected in [
        (BGPHeaderErr(BgpError(1, 2, b"\x00\x12")), (1, 2)),
        (BGPOpenMsgErr(BgpError(2, 4)), (2, 4)),
    ]:
        r = opensent()
        r.feed(event)
        assert r.notifications() == [expected]
        assert r.sent[-1].data == event.error.data
    r = rig()
    r.establish()
    r.feed(UpdateMsgErr(BgpError(3, 1)))
    assert r.notifications() == [(3, 1)] and r.fsm.state is State.IDLE
    assert not r.downs[0].graceful


def test_received_notification_is_never_answered():
    r = rig()
    r.establish()
    r.feed(NotifMsg(Notification(6, 2)))
    assert r.notifications() == [] and r.fsm.state is State.IDLE
    assert r.fsm.last_error == "peer sent NOTIFICATION: cease (6/2)"
    assert r.downs == [SessionDown(False, r.fsm.last_error)]


def test_receive_maps_bytes_to_events():
    opts = _opts()
    assert isinstance(receive(encode(Keepalive()), opts), KeepAliveMsg)
    assert isinstance(receive(b"\x00" * 19, opts), BGPHeaderErr)
    bad_open = b"\xff" * 16 + bytes([0, 29, 1, 3]) + bytes(9)
    assert isinstance(receive(bad_open, opts), BGPOpenMsgErr)
    bad_update = b"\xff" * 16 + bytes([0, 23, 2, 0, 9, 0, 0])
    assert isinstance(receive(bad_update, opts), UpdateMsgErr)


# --- connection loss, retry, backoff ---------------------------------------------------------


def test_failed_connects_back_off_exponentially_with_jitter():
    r = Rig(Fsm(config(idle_hold_first=1, idle_hold_max=8), jitter=lambda: 1.0))
    r.feed(ManualStart())
    delays = []
    for _ in range(6):
        r.feed(TcpConnectionFails())
        assert r.fsm.state is State.IDLE
        delays.append(r.timers[Timer.IDLE_HOLD] - r.now)
        r.advance(delays[-1])
        assert r.fsm.state is State.CONNECT
    assert delays == [1, 2, 4, 8, 8, 8]
    assert r.connects == 7
    r.feed(TcpCRAcked())
    r.feed(BGPOpen(peer_open()))
    r.feed(KeepAliveMsg())
    r.feed(TcpConnectionFails())  # established once: the delay starts over
    assert r.timers[Timer.IDLE_HOLD] - r.now == 1


def test_jitter_shortens_timers_by_up_to_a_quarter():
    low = Rig(Fsm(config(), jitter=lambda: 0.0))
    high = Rig(Fsm(config(), jitter=lambda: 0.999))
    for r in (low, high):
        r.feed(ManualStart())
    assert low.timers[Timer.CONNECT_RETRY] == 90
    assert 119 < high.timers[Timer.CONNECT_RETRY] <= 120


def test_connect_retry_timer_tries_again():
    r = rig(connect_retry_time=10)
    r.feed(ManualStart())
    r.advance(7.5)
    assert r.connects == 2 and r.fsm.state is State.CONNECT


def test_connection_loss_of_a_graceful_restart_peer_keeps_its_routes():
    r = rig()
    r.establish()
    r.feed(TcpConnectionFails())
    assert r.downs == [SessionDown(True, "connection closed by the peer")]
    r = rig()
    r.establish(peer_open(gr=False))
    r.feed(TcpConnectionFails())
    assert r.downs[0].graceful is False


def test_a_gracefully_lost_peer_has_its_restart_time_then_the_stale_timer():
    r = rig(stale_time=300)
    r.establish()
    r.feed(TcpConnectionFails())
    assert r.timers[Timer.RESTART] == 120  # the peer's restart time, from its OPEN
    r.advance(119)  # the peer comes back in time
    r.feed(TcpCRAcked())
    r.feed(BGPOpen(peer_open()))
    r.feed(KeepAliveMsg())
    assert Timer.RESTART not in r.timers and r.timers[Timer.STALE] == r.now + 300
    assert r.feed(TimerExpired(Timer.STALE)) == [SweepStale()]  # no End-of-RIB in time
    assert r.fsm.state is State.ESTABLISHED


def test_restart_time_running_out_sweeps_the_stale_routes():
    r = rig()
    r.establish()
    r.feed(TcpConnectionFails())
    assert r.feed(TimerExpired(Timer.RESTART)) == [SweepStale()]
    r = rig()
    r.establish()
    r.feed(TcpConnectionFails())
    r.feed(ManualStop())  # the peer is deconfigured meanwhile: its routes go with it
    assert not r.timers


def test_a_session_ended_by_notification_keeps_no_stale_timers():
    r = rig()
    r.establish()
    r.feed(TcpConnectionFails())
    r.advance(1)
    r.feed(TcpCRAcked())
    r.feed(BGPOpen(peer_open()))
    r.feed(KeepAliveMsg())
    r.feed(NotifMsg(Notification(6, 4)))
    assert set(r.timers) == {Timer.IDLE_HOLD}


def test_manual_stop_sends_cease_or_for_our_own_restart_nothing():
    r = rig()
    r.establish()
    r.feed(ManualStop())
    assert r.notifications() == [(6, 2)] and r.fsm.state is State.IDLE and not r.timers
    r = rig()
    r.establish()
    r.feed(ManualStop(graceful=True))
    assert r.notifications() == [] and not r.connected and not r.timers
    r.advance(10_000)
    assert r.fsm.state is State.IDLE and r.connects == 1  # stopped stays stopped


def test_restarting_speaker_says_so_in_its_open():
    r = rig(restarting=True, forwarding_preserved=True)
    r.feed(ManualStart())
    r.feed(TcpCRAcked())
    gr = r.sent[0].capabilities.graceful_restart
    assert gr.restarting and all(f.forwarding_preserved for f in gr.families)


# --- collisions and extra connections --------------------------------------------------------


def test_idle_refuses_connections():
    r = rig()
    r.feed(TcpConnectionConfirmed())
    assert r.rejected == [Notification(6, 5)] and r.fsm.state is State.IDLE


def test_collision_in_openconfirm_keeps_the_connection_of_the_higher_identifier():
    assert keep_connection_initiated_by_us(PEER, ME)
    # We (198.18.0.1) connected; the peer (198.18.0.2, higher) connects too: its one stays.
    r = opensent()
    r.feed(BGPOpen(peer_open()))
    r.feed(TcpConnectionConfirmed())
    assert r.notifications() == [(6, 7)] and r.connected
    assert r.fsm.state is State.OPENSENT and isinstance(r.sent[-1], Open)
    # Had we the higher identifier, the new connection is refused instead.
    r = Rig(Fsm(config(router_id=ipaddress.IPv4Address("198.18.0.9")), jitter=lambda: 0.0))
    r.feed(ManualStart())
    r.feed(TcpCRAcked())
    r.feed(BGPOpen(peer_open()))
    r.feed(TcpConnectionConfirmed())
    assert r.rejected == [Notification(6, 7)] and r.fsm.state is State.OPENCONFIRM


def test_established_refuses_a_second_connection_unless_the_peer_restarted_gracefully():
    r = rig()
    r.establish(peer_open(gr=False))
    r.feed(TcpConnectionConfirmed())
    assert r.rejected == [Notification(6, 7)] and r.fsm.state is State.ESTABLISHED
    r = rig()
    r.establish()
    r.feed(TcpConnectionConfirmed())
    assert r.downs == [SessionDown(True, "peer reconnected (graceful restart)")]
    assert r.fsm.state is State.OPENSENT and r.connected and isinstance(r.sent[-1], Open)


def test_garbage_on_the_wire_ends_only_that_session():
    hit, other = rig(), rig()
    hit.establish()
    other.establish()
    try:
        split_stream(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    except BgpError as error:
        hit.feed(event_for_error(error))
    assert hit.notifications() == [(1, 1)] and hit.fsm.state is State.IDLE
    assert other.fsm.state is State.ESTABLISHED


def test_malformed_attribute_withdraws_routes_but_keeps_the_session():
    r = rig()
    r.establish()
    bad = b"\xff" * 16 + bytes([0, 41, 2, 0, 0, 0, 14]) + bytes([0x40, 1, 1, 9]) \
        + bytes([0x40, 2, 0]) + bytes([0x40, 3, 4, 198, 18, 0, 2]) + bytes([24, 10, 1, 2])
    event = receive(bad, r.fsm.negotiated.codec_options)
    assert isinstance(event, UpdateMsg) and event.message.treat_as_withdraw
    r.feed(event)
    assert r.fsm.state is State.ESTABLISHED and r.notifications() == []
    assert r.delivered == [DeliverUpdate(event.message)]


def test_stale_timer_expiry_is_ignored():
    r = rig()
    r.establish()
    assert r.fsm.handle(TimerExpired(Timer.CONNECT_RETRY)) == []
    assert r.fsm.state is State.ESTABLISHED


# --- any sequence of events ------------------------------------------------------------------

events = st.one_of(
    st.sampled_from([ManualStart(), ManualStop(), ManualStop(graceful=True), TcpCRAcked(),
                     TcpConnectionConfirmed(), TcpConnectionFails(), KeepAliveMsg(),
                     UpdateMsg(Update()), RouteRefreshMsg(RouteRefresh(1, 1)),
                     NotifMsg(Notification(6, 2)), BGPHeaderErr(BgpError(1, 1)),
                     BGPOpenMsgErr(BgpError(2, 0)), UpdateMsgErr(BgpError(3, 1))]),
    st.builds(TimerExpired, st.sampled_from(list(Timer))),
    st.builds(lambda asn, hold, rid, gr: BGPOpen(peer_open(asn, hold, rid, gr)),
              st.sampled_from([64512, 64513, 4200000000]), st.sampled_from([0, 1, 3, 90]),
              st.sampled_from([PEER, ME, ipaddress.IPv4Address(0)]), st.booleans()),
)


@settings(max_examples=400)
@given(st.lists(st.tuples(events, st.floats(0, 300)), max_size=40), st.booleans(),
       st.floats(0, 0.999), st.booleans())
def test_any_event_sequence_leaves_the_fsm_in_one_of_the_six_states(steps, passive, j, up):
    r = Rig(Fsm(config(passive=passive), jitter=lambda: j))
    if up:
        r.establish()
    for event, wait in steps:
        r.feed(event)
        r.advance(wait)
        fsm = r.fsm
        assert fsm.state in set(State)
        assert set(r.timers) == set(fsm.running_timers)
        assert (fsm.negotiated is not None) == (fsm.state in (State.OPENCONFIRM,
                                                              State.ESTABLISHED))
        if fsm.state is State.IDLE:
            assert set(r.timers) <= {Timer.IDLE_HOLD, Timer.RESTART, Timer.STALE}
