"""The bgp backend's decisions, pure: who peers with whom, what a lease says, which kernel
routes the RIB's table becomes."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, ip_address

from pyflannel.backend.bgp import NodeRole, kernel_routes, plan_peers, role_of
from pyflannel.config import parse_config
from pyflannel.host.routes import NextHop, RouteSpec
from pyflannel.lease.model import Lease, LeaseAttrs


def cfg(**backend):
    return parse_config(json.dumps({"Network": "10.1.0.0/16",
                                    "Backend": {"Type": "bgp", **backend}}))


def node(n: int, rr: str | None = None, asn: int = 64512) -> NodeRole:
    return NodeRole(IPv4Address(f"198.18.0.{n}"), asn, IPv4Address(rr) if rr else None)


def summary(plan) -> dict:
    return {k: (s.kind, s.passive, s.rr_client, s.asn, s.port) for k, s in plan.items()}


def test_mesh_every_other_node_and_the_lower_address_connects():
    plan = plan_peers(node(2), [node(1), node(2), node(3)], cfg())
    assert summary(plan) == {"198.18.0.1": ("mesh", True, False, 64512, 179),
                             "198.18.0.3": ("mesh", False, False, 64512, 179)}


def test_without_the_mesh_only_configured_peers():
    plan = plan_peers(node(2), [node(1), node(3)], cfg(NodeToNodeMesh=False, Peers=[
        {"PeerIP": "198.18.0.200", "ASNumber": 64600, "Password": "pw", "Port": 1179}]))
    assert summary(plan) == {"198.18.0.200": ("configured", False, False, 64600, 1179)}
    assert plan["198.18.0.200"].password == "pw"
    assert not plan["198.18.0.200"].keep_next_hop
    keep = plan_peers(node(2), [], cfg(Peers=[
        {"PeerIP": "198.18.0.200", "ASNumber": 64600, "KeepOriginalNextHop": True}]))
    assert keep["198.18.0.200"].keep_next_hop


def test_reflectors_peer_with_everybody_and_the_others_only_with_reflectors():
    nodes = [node(1, "10.0.0.1"), node(2), node(3), node(4, "10.0.0.1")]
    assert summary(plan_peers(node(1, "10.0.0.1"), nodes, cfg())) == {
        "198.18.0.2": ("client", False, True, 64512, 179),
        "198.18.0.3": ("client", False, True, 64512, 179),
        "198.18.0.4": ("reflector", False, False, 64512, 179)}
    assert summary(plan_peers(node(3), nodes, cfg())) == {
        "198.18.0.1": ("reflector", True, False, 64512, 179),
        "198.18.0.4": ("reflector", False, False, 64512, 179)}


def lease(n: int, data=None) -> Lease:
    return Lease(IPv4Network(f"10.1.{n}.0/24"),
                 LeaseAttrs(IPv4Address(f"198.18.0.{n}"), "bgp", data), 1)


def test_a_lease_publishes_its_as_and_cluster_id():
    assert NodeRole(IPv4Address("198.18.0.1"), 64512, IPv4Address("10.0.0.1")).backend_data() \
        == {"ASNumber": 64512, "RouteReflectorClusterID": "10.0.0.1"}
    assert role_of(lease(1, {"ASNumber": 65001, "RouteReflectorClusterID": "10.0.0.1"}),
                   64512) == (node(1, "10.0.0.1", 65001), None)
    assert role_of(lease(1), 64512) == (node(1), None)


def test_a_lease_with_bad_backend_data_is_left_out_with_why():
    assert role_of(lease(1, {"ASNumber": "x"}), 64512) == (
        None, "its BackendData.ASNumber 'x' is not an AS number")
    assert role_of(lease(1, {"RouteReflectorClusterID": "nope"}), 64512) == (
        None, "its BackendData.RouteReflectorClusterID 'nope' is not an IPv4 address")
    assert role_of(lease(1, [1]), 64512)[1] == "its BackendData is not a JSON object"


def test_next_hops_resolve_through_the_kernel_and_several_make_ecmp():
    a, b, c = (ip_address(f"198.19.0.{i}") for i in (1, 2, 3))
    router = ip_address("198.18.0.254")
    resolved = {a: (a, 2), b: (router, 2)}  # c: no route to it
    routes = {IPv4Network("10.1.1.0/24"): frozenset({a}),
              IPv4Network("10.1.2.0/24"): frozenset({b}),
              IPv4Network("10.1.3.0/24"): frozenset({a, b}),
              IPv4Network("10.1.4.0/24"): frozenset({c})}
    assert kernel_routes(routes, resolved) == {
        IPv4Network("10.1.1.0/24"): RouteSpec(IPv4Network("10.1.1.0/24"), 2, a),
        IPv4Network("10.1.2.0/24"): RouteSpec(IPv4Network("10.1.2.0/24"), 2, router),
        IPv4Network("10.1.3.0/24"): RouteSpec(IPv4Network("10.1.3.0/24"), 0, nexthops=(
            NextHop(router, 2), NextHop(a, 2)))}


def test_status_has_a_bgp_section_that_names_a_password_mismatch():
    from pyflannel.bgp.session import PASSWORD_HINT
    from pyflannel.status import render_bgp

    text = render_bgp([{"peer": "192.0.2.200", "asn": 64600, "kind": "configured",
                        "state": "Idle", "state_for_s": 75.0, "received": 0, "accepted": 0,
                        "sent": 0, "last_error": "connection failed (timed out)",
                        "hint": PASSWORD_HINT}])
    header, row = text.strip().splitlines()[1:]
    assert header.split() == ["PEER", "AS", "KIND", "STATE", "FOR", "RECEIVED", "ACCEPTED",
                              "SENT", "LAST", "ERROR"]
    assert row.split()[:8] == ["192.0.2.200", "64600", "configured", "Idle", "1m15s", "0",
                               "0", "0"]
    assert "connection failed (timed out) (no TCP answer" in row and "password mismatch" in row
    assert render_bgp([]) == ""


def test_an_ipv6_only_node_needs_a_router_id_and_says_so_in_one_line():
    import pytest

    from pyflannel.backend.base import BackendError
    from pyflannel.backend.bgp import BgpBackend
    from pyflannel.flags import parse_flags
    from pyflannel.host.netlink import ExternalInterface
    from pyflannel.lease.model import NO_PUBLIC_IP

    v6 = parse_config(json.dumps({"EnableIPv4": False, "EnableIPv6": True,
                                  "IPv6Network": "fc00:10:1::/48",
                                  "Backend": {"Type": "bgp"}}))
    ext = ExternalInterface("eth0", 2, NO_PUBLIC_IP, NO_PUBLIC_IP, 1500,
                            ip_address("fd00::1"), ip_address("fd00::1"))
    with pytest.raises(BackendError) as e:
        BgpBackend(v6, ext)
    assert str(e.value) == ("bgp: an IPv6-only node needs -bgp-router-id=A.B.C.D (a BGP "
                            "router ID is an IPv4 address)")
    backend = BgpBackend(v6, ext, parse_flags(["-bgp-router-id=192.0.2.7"], environ={}))
    assert backend.router_id == IPv4Address("192.0.2.7")


async def test_a_port_in_use_is_one_line():
    import socket

    import pytest

    from pyflannel.backend.base import BackendError
    from pyflannel.backend.bgp import BgpBackend
    from pyflannel.host.netlink import ExternalInterface

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ext = ExternalInterface("eth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"),
                                1500)
        backend = BgpBackend(cfg(ListenPort=port), ext)
        with pytest.raises(BackendError) as e:
            await backend._start_speaker()
        assert str(e.value) == f"bgp: cannot listen on port {port}: Address already in use"


def test_a_change_of_peers_is_taken_at_once_anything_else_waits_for_a_restart():
    from pyflannel.backend.bgp import BgpBackend
    from pyflannel.host.netlink import ExternalInterface

    ext = ExternalInterface("eth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)
    backend = BgpBackend(cfg(), ext)
    peers = [{"PeerIP": "192.0.2.200", "ASNumber": 64600}]
    assert backend.take_config(cfg(Peers=peers, NodeToNodeMesh=False))
    assert backend.cfg.backend["Peers"][0].asn == 64600
    assert not backend.take_config(cfg(Peers=peers, NodeToNodeMesh=False, HoldTime=30,
                                       KeepaliveTime=10))
    assert not backend.take_config(parse_config(json.dumps(
        {"Network": "10.2.0.0/16", "Backend": {"Type": "bgp", "Peers": peers,
                                               "NodeToNodeMesh": False}})))
    assert backend.cfg.backend["HoldTime"] == 90


def test_the_config_watcher_hands_a_change_to_the_backend_that_takes_it(caplog):
    import logging

    from pyflannel.daemon.config_watcher import ConfigWatcher

    caplog.set_level(logging.INFO)
    taken = []
    running = cfg()
    watcher = ConfigWatcher(None, running, lambda new: taken.append(new) or
                            new.backend["HoldTime"] == 90)
    peers = json.dumps({"Network": "10.1.0.0/16", "Backend": {
        "Type": "bgp", "Peers": [{"PeerIP": "192.0.2.200", "ASNumber": 64600}]}})
    watcher.notice(peers.encode())
    assert watcher.running.backend["Peers"][0].asn == 64600
    assert "follows it without a restart" in caplog.text
    watcher.notice(json.dumps({"Network": "10.1.0.0/16", "Backend": {
        "Type": "bgp", "HoldTime": 30, "KeepaliveTime": 10}}).encode())
    assert "keeping the running one until pyflanneld restarts" in caplog.text
    assert watcher.running.backend["HoldTime"] == 90


async def test_an_address_change_restarts_the_speaker_with_the_new_next_hop(monkeypatch):
    import socket

    from pyflannel.backend.bgp import BgpBackend
    from pyflannel.host.netlink import ExternalInterface

    async def no_kernel():
        pass

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    old = ExternalInterface("eth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)
    new = ExternalInterface("eth0", 2, IPv4Address("192.0.2.9"), IPv4Address("192.0.2.9"), 1500)
    backend = BgpBackend(cfg(ListenPort=port), old)
    monkeypatch.setattr(backend, "reconcile", no_kernel)
    await backend._start_speaker()
    try:
        first = backend.speaker
        assert await backend.follow_address(new) is None
        assert backend.speaker is not first
        local = backend.speaker.rib.local
        assert (local.router_id, local.next_hops) == (IPv4Address("192.0.2.9"),
                                                      (IPv4Address("192.0.2.9"),))
        assert backend.speaker.source == (IPv4Address("192.0.2.9"),)
    finally:
        await backend.speaker.stop()


class FakeSession:
    def __init__(self, key: str, synced: bool = False) -> None:
        self.key, self.synced = key, synced


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_starting_node_is_ready_once_every_session_brought_its_routes():
    from pyflannel.backend.bgp import FirstSync

    clock = FakeClock()
    first = FirstSync(30, clock)
    mesh, tor = FakeSession("198.18.0.2"), FakeSession("192.0.2.200")
    assert first.behind([mesh, tor])
    mesh.synced = True
    assert first.behind([mesh, tor])
    mesh.synced = False  # once synced is enough: a flap later does not count against it
    tor.synced = True
    assert not first.behind([mesh, tor])
    # Ready stays ready: a node joining later (a new session) never takes it back.
    assert not first.behind([mesh, tor, FakeSession("198.18.0.9")])


def test_a_peer_that_never_comes_up_delays_readiness_only_for_the_grace():
    from pyflannel.backend.bgp import FirstSync

    clock = FakeClock()
    first = FirstSync(5, clock)
    dead = FakeSession("198.18.0.7")
    clock.now += 4.9
    assert first.behind([dead])
    clock.now += 0.1
    assert not first.behind([dead])
    assert not FirstSync(30, clock).behind([])  # nobody to wait for: the first node


def test_the_backend_is_behind_until_its_sessions_synced_and_the_grace_is_capped():
    from types import SimpleNamespace

    from pyflannel.backend.bgp import READY_GRACE_MAX_S, BgpBackend
    from pyflannel.host.netlink import ExternalInterface

    ext = ExternalInterface("eth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)
    backend = BgpBackend(cfg(), ext)  # GracefulRestartTime 120: the wait is capped at 30 s
    assert backend.first_sync.deadline - backend.first_sync.clock() <= READY_GRACE_MAX_S
    assert backend.data_path_behind()  # no speaker yet
    peer = FakeSession("198.18.0.2")
    backend.speaker = SimpleNamespace(sessions={peer.key: peer})
    assert backend.data_path_behind()
    peer.synced = True
    assert not backend.data_path_behind()
    short = BgpBackend(cfg(GracefulRestartTime=5), ext)
    assert short.first_sync.deadline - short.first_sync.clock() <= 5
